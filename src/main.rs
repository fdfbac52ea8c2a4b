//! Subcommand dispatch only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshlet::app::App;
use meshlet::config::{Config, LogFormat};
use meshlet::ops::health::probes::AppProbes;

/// jemalloc, for memory that goes back to the system after a burst of connections: glibc's
/// malloc kept 10,000 closed connections' memory (see README, "Memory").
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start: a background thread purges unused pages (without
/// it, purging happens only on later allocations, so an idle proxy after a burst would keep
/// them), dirty pages are returned after about 5 s unused, and not kept as "muzzy" (MADV_FREE)
/// pages that still count in RSS and the cgroup's usage until the kernel takes them back.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:5000,muzzy_decay_ms:0\0";

#[derive(Parser)]
#[command(name = "meshlet", version = meshlet::VERSION, about = "A small, fast Kubernetes sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy.
    Proxy {
        /// The config file (YAML). Without one, every key takes its default.
        #[arg(long, env = "MESHLET_CONFIG")]
        config: Option<PathBuf>,
        /// Log as JSON lines (overrides `log.format`).
        #[arg(long)]
        log_json: bool,
        /// Without a config file: the sidecar layout (admin 0.0.0.0:7190, gRPC health
        /// 0.0.0.0:7191, outbound 127.0.0.1:7140, inbound 0.0.0.0:7143, Kubernetes discovery).
        #[arg(long)]
        sidecar: bool,
    },
    /// Write the pod's iptables NAT rules that send its TCP traffic through the sidecar.
    Init(meshlet::init::InitArgs),
    /// Serve the mutating admission webhook that meshes pods by annotation.
    Inject(meshlet::inject::server::InjectArgs),
    /// Serve the mesh's certificate authority: signs short-lived SPIFFE certificates for
    /// sidecars that prove their ServiceAccount with a projected token.
    Identity(meshlet::identity::server::IdentityArgs),
    /// Wait until the local proxy is ready (`/ready/proxy` on the admin port): the classic
    /// sidecar's postStart hook, so that the app never starts before its proxy.
    WaitReady {
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// The admin server.
        #[arg(long, default_value = "127.0.0.1:7190")]
        admin: std::net::SocketAddr,
    },
    /// Print the version and build information.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!(
                "meshlet {} ({} {})",
                meshlet::VERSION,
                std::env::consts::OS,
                std::env::consts::ARCH
            );
            ExitCode::SUCCESS
        }
        Command::Proxy {
            config,
            log_json,
            sidecar,
        } => proxy(config, log_json, sidecar),
        Command::Init(args) => meshlet::init::run(&args),
        Command::WaitReady { timeout, admin } => wait_ready(admin, timeout),
        Command::Inject(args) => meshlet::inject::server::main(args),
        Command::Identity(args) => meshlet::identity::server::main(args),
    }
}

fn proxy(path: Option<PathBuf>, log_json: bool, sidecar: bool) -> ExitCode {
    let config = match &path {
        Some(p) => Config::load(p),
        None if sidecar => Config::parse("(--sidecar)", meshlet::config::SIDECAR_LAYOUT),
        None => Config::parse("(defaults)", ""),
    };
    let mut config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshlet: {e}");
            return ExitCode::from(2);
        }
    };
    // Dependencies named by the injector (from the pod's meshlet.dev/dependencies and
    // meshlet.dev/critical-dependencies annotations) add to the config file's.
    let deps = std::env::var("MESHLET_DEPENDENCIES").ok();
    let critical = std::env::var("MESHLET_CRITICAL_DEPENDENCIES").ok();
    if let Err(e) = config
        .health
        .add_from_env(deps.as_deref(), critical.as_deref())
    {
        eprintln!("meshlet: {e}");
        return ExitCode::from(2);
    }
    // The pod's meshlet.dev/ready-requires, passed by the injector (it validated the value;
    // anything else here is ignored with a warning below, like a bad annotation).
    let ready_requires = std::env::var("MESHLET_READY_REQUIRES").ok();
    let ready_requires_error = match ready_requires.as_deref().map(str::trim) {
        None | Some("") => None,
        Some("none") => {
            config.health.ready_requires = meshlet::config::ReadyRequires::None;
            None
        }
        Some("critical") => {
            config.health.ready_requires = meshlet::config::ReadyRequires::Critical;
            None
        }
        Some(other) => Some(other.to_string()),
    };
    // Inbound limits, opaque ports and inbound delivery from the pod's annotations, which the
    // injector passes as MESHLET_* env.
    let pod_errors = meshlet::config::pod::apply(&mut config, |k| std::env::var(k).ok());
    let app_probes = match app_probes() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("meshlet: MESHLET_APP_PROBES: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config, log_json);
    if let Some(v) = &ready_requires_error {
        tracing::warn!(
            key = "meshlet.dev/ready-requires", value = %v,
            "ignoring MESHLET_READY_REQUIRES: not one of none, critical; the config file's value is used"
        );
    }
    for e in &pod_errors {
        tracing::warn!(
            key = %e.key, value = %e.value, error = %e.error,
            "ignoring a meshlet annotation of this pod; the config file's value is used"
        );
    }

    let workers = config.worker_threads();
    let runtime = match build_runtime(workers) {
        Ok(r) => r,
        Err(e) => {
            fatal(&format!(
                "cannot start the runtime with {workers} worker threads: {e}; set `workers` lower"
            ));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut app = match App::bind(config) {
            Ok(a) => a,
            Err(e) => {
                fatal(&e.to_string());
                return ExitCode::FAILURE;
            }
        };
        app.set_app_probes(app_probes);
        // The pod's address (the injector passes status.podIP): where the app probes go.
        app.set_pod_ip(
            std::env::var("POD_IP")
                .ok()
                .and_then(|v| v.trim().parse().ok()),
        );
        app.set_pod_errors(pod_errors);
        if let Err(e) = app.connect().await {
            fatal(&format!("discovery.kubernetes: {e}"));
            return ExitCode::FAILURE;
        }
        let shutdown = app.shutdown_token();
        tokio::spawn(async move {
            let Some(mut signals) = Signals::install() else {
                return;
            };
            let first = signals.next().await;
            if shutdown.is_cancelled() {
                tracing::info!(signal = first.name(), "graceful shutdown already under way");
            } else {
                tracing::info!(signal = first.name(), "starting the graceful shutdown");
                shutdown.cancel();
            }
            // The drain may take up to shutdown_grace; whoever sends a second signal wants out.
            let second = signals.next().await;
            tracing::warn!(
                signal = second.name(),
                exit_code = second.exit_code(),
                "second signal during the graceful shutdown: exiting now, without waiting for \
                 the connections still open"
            );
            std::process::exit(second.exit_code());
        });
        app.run().await;
        ExitCode::SUCCESS
    })
}

/// A startup error after logging is set up: one line, through the log (so JSON logs stay
/// JSON), or on stderr when the log filter would hide it.
fn fatal(message: &str) {
    if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{message}");
    } else {
        eprintln!("meshlet: {message}");
    }
}

/// The tokio runtime. tokio panics when the OS refuses it a thread before it has any (a
/// container's pid or memory limit already reached); that is turned into an error here, so
/// that it is reported like any other.
fn build_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let build = move || {
        if workers == 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .enable_all()
                .build()
        }
    };
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(build);
    std::panic::set_hook(hook);
    result.unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the runtime panicked");
        Err(std::io::Error::other(why.to_string()))
    })
}

/// The app's original kubelet probes, written by the injector into `MESHLET_APP_PROBES`
/// (format: `meshlet::ops::health::probes`). Unset or empty: none. A bad value stops the start,
/// like a bad config key, rather than leaving probes that silently never run.
fn app_probes() -> Result<Option<AppProbes>, String> {
    match std::env::var("MESHLET_APP_PROBES") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err("the value is not valid UTF-8".into()),
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => AppProbes::parse(&v).map(Some),
    }
}

/// Polls `GET /ready/proxy` until it answers 200 or `timeout` passes.
fn wait_ready(admin: std::net::SocketAddr, timeout: std::time::Duration) -> ExitCode {
    use std::io::{Read, Write};
    // A timeout too long for the clock is no deadline at all.
    let deadline = std::time::Instant::now().checked_add(timeout);
    let ready = || -> std::io::Result<bool> {
        let mut s =
            std::net::TcpStream::connect_timeout(&admin, std::time::Duration::from_secs(1))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
        s.write_all(b"GET /ready/proxy HTTP/1.0\r\nHost: meshlet\r\n\r\n")?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(&head[9..12] == b"200")
    };
    loop {
        if matches!(ready(), Ok(true)) {
            return ExitCode::SUCCESS;
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            eprintln!("meshlet wait-ready: the proxy at {admin} was not ready within {timeout:?}");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// SIGTERM and SIGINT, as a stream.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[derive(Clone, Copy)]
enum Received {
    Term,
    Int,
}

impl Received {
    fn name(self) -> &'static str {
        match self {
            Received::Term => "SIGTERM",
            Received::Int => "SIGINT",
        }
    }

    /// The shell's convention for a process ended by a signal: 128 + its number (143, 130).
    fn exit_code(self) -> i32 {
        128 + match self {
            Received::Term => libc::SIGTERM,
            Received::Int => libc::SIGINT,
        }
    }
}

impl Signals {
    fn install() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(term), Ok(int)) => Some(Signals { term, int }),
            _ => {
                tracing::warn!("cannot install signal handlers; use POST /shutdown");
                None
            }
        }
    }

    async fn next(&mut self) -> Received {
        tokio::select! {
            _ = self.term.recv() => Received::Term,
            _ = self.int.recv() => Received::Int,
        }
    }
}

fn init_logging(config: &Config, log_json: bool) {
    use tracing_subscriber::EnvFilter;
    // A non-ASCII RUST_LOG can panic tracing-subscriber's parser: such a value is ignored.
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| v.is_ascii())
        .and_then(|v| EnvFilter::try_new(v).ok());
    let filter = from_env
        .ok_or(())
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log_json || config.log.format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}
