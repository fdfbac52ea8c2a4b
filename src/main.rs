//! Subcommand dispatch only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshlet::app::App;
use meshlet::config::{Config, LogFormat};
use meshlet::health::probes::AppProbes;

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
    // Inbound limits from the pod's annotations, which the injector passes as MESHLET_* env.
    let pod_errors = meshlet::pod::apply_inbound_limits(&mut config, |k| std::env::var(k).ok());
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
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshlet: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut app = match App::bind(config) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "startup failed");
                eprintln!("meshlet: {e}");
                return ExitCode::FAILURE;
            }
        };
        app.set_app_probes(app_probes);
        app.set_pod_errors(pod_errors);
        if let Err(e) = app.connect().await {
            eprintln!("meshlet: discovery.kubernetes: {e}");
            return ExitCode::FAILURE;
        }
        let shutdown = app.shutdown_token();
        tokio::spawn(async move {
            wait_for_signal().await;
            shutdown.cancel();
        });
        app.run().await;
        ExitCode::SUCCESS
    })
}

/// The app's original kubelet probes, written by the injector into `MESHLET_APP_PROBES`
/// (format: `meshlet::health::probes`). Unset or empty: none. A bad value stops the start,
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
    let deadline = std::time::Instant::now() + timeout;
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
        if std::time::Instant::now() >= deadline {
            eprintln!("meshlet wait-ready: the proxy at {admin} was not ready within {timeout:?}");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; use POST /shutdown");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn init_logging(config: &Config, log_json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
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
