//! The `meshlet` binary as a user runs it: config errors, exit codes, signals.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_meshlet");

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("config.yaml");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

/// Runs `meshlet proxy --config` on the text; returns (exit code, stderr).
fn run_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, text);
    let out = Command::new(BIN)
        .args(["proxy", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "config.yaml");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn each_kind_of_config_error_exits_2_naming_key_and_value() {
    let cases: &[(&str, &str)] = &[
        (
            "discovery:\n  static:\n    - service: web.default\nupstreams:\n  - listen: 127.0.0.1:9000\n    service: web.default\n  - listen: \"127.0.0.1:99999\"\n    service: web.default\n",
            r#"config.yaml: upstreams[1].listen: "127.0.0.1:99999" is not a socket address"#,
        ),
        (
            "admin:\n  listn: 127.0.0.1:1\n",
            "config.yaml: admin.listn: unknown field `listn`, expected `listen`",
        ),
        (
            "shutdown_grace: forever\n",
            r#"config.yaml: shutdown_grace: "forever" is not a duration"#,
        ),
        (
            "discovery:\n  static:\n    - service: webdefault\n",
            r#"config.yaml: discovery.static[0].service: "webdefault" is not a service name"#,
        ),
        (
            "upstreams:\n  - listen: 127.0.0.1:9000\n    service: api.prod\n",
            r#"config.yaml: upstreams[0].service: "api.prod" is not a known service"#,
        ),
        (
            "workers: 0\n",
            "config.yaml: workers: 0 is out of range (allowed: 1 to 1024)",
        ),
        (
            "inbound:\n  app_host: localhost\n",
            r#"config.yaml: inbound.app_host: "localhost" is not an IP address"#,
        ),
        (
            "log:\n  format: xml\n",
            "config.yaml: log.format: unknown variant `xml`",
        ),
        (
            "detect:\n  timeout: 0s\n",
            "config.yaml: detect.timeout: \"0s\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            "discovery:\n  static:\n    - service: a.b\n      endpoints: [\"10.0.0.1\"]\n",
            r#"config.yaml: discovery.static[0].endpoints[0]: "10.0.0.1" is not a socket address"#,
        ),
        ("admin: [1, 2\n", "config.yaml: "),
    ];
    for (text, want) in cases {
        let (code, stderr) = run_config(text);
        assert_eq!(code, 2, "config {text:?} gave {code}: {stderr}");
        assert!(
            stderr.contains(want),
            "config {text:?}: want {want:?} in {stderr:?}"
        );
    }
}

/// Values that parse but used to crash the proxy or misbehave: each is refused at start with
/// exit 2 and one line naming the key, the value and the allowed range.
#[test]
fn values_out_of_range_exit_2_naming_key_value_and_range() {
    let svc = "discovery:\n  static:\n    - service: web.default\n";
    let cases: Vec<(String, &str)> = vec![
        (
            // Used to panic on the first connection (Instant + timeout overflowed): exit 134.
            "detect:\n  timeout: 500000000000years\n".into(),
            "config.yaml: detect.timeout: \"500000000000years\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            // Used to panic starting the runtime.
            "workers: 100000\n".into(),
            "config.yaml: workers: 100000 is out of range (allowed: 1 to 1024)",
        ),
        (
            format!("{svc}      endpoints: [\"127.0.0.1:8080\", \"127.0.0.1:0\"]\n"),
            "config.yaml: discovery.static[0].endpoints[1]: \"127.0.0.1:0\": port 0 is not a port to connect to (allowed: 1 to 65535)",
        ),
        (
            format!("{svc}      policy:\n        breaker_latency_factor: -3\n"),
            "config.yaml: discovery.static[0].policy.breaker_latency_factor: -3 is out of range (allowed: 1 to 1000)",
        ),
        (
            "defaults:\n  timeout: 0s\n".into(),
            "config.yaml: defaults.timeout: \"0s\" is out of range (allowed: above 0s, up to 1year); write \"off\" for no timeout",
        ),
        (
            "admin:\n  listen: 0.0.0.0:7190\n  grpc_listen: \"[::]:7190\"\n".into(),
            "config.yaml: admin.grpc_listen: \"[::]:7190\" overlaps \"0.0.0.0:7190\" of admin.listen",
        ),
    ];
    for (text, want) in &cases {
        let (code, stderr) = run_config(text);
        assert_eq!(code, 2, "config {text:?} gave {code}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line for {text:?}: {stderr:?}");
        assert!(
            lines[0].starts_with(&format!("meshlet: {want}")),
            "config {text:?}: want {want:?}, got {stderr:?}"
        );
    }
}

#[test]
fn missing_config_file_exits_2() {
    let out = Command::new(BIN)
        .args(["proxy", "--config", "/nonexistent/meshlet.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/meshlet.yaml: cannot read the config file"),
        "{stderr}"
    );
}

#[test]
fn config_path_from_env_and_port_conflict_is_a_clear_error() {
    // Hold a port so that meshlet cannot bind it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(&dir, &format!("admin:\n  listen: 127.0.0.1:{port}\n"));
    let out = Command::new(BIN)
        .arg("proxy")
        .env("MESHLET_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // One message, not a log line and a second copy of it.
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&format!(
            "cannot listen on 127.0.0.1:{port} for admin.listen: Address already in use"
        )),
        "{stderr}"
    );
}

#[test]
fn version_prints() {
    let out = Command::new(BIN).arg("version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("meshlet 0."));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let slow = Backend::start("slow", Duration::from_millis(1500)).await;
    let (admin, upstream) = (support::free_port(), support::free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        &dir,
        &format!(
            "admin:\n  listen: 127.0.0.1:{admin}\nupstreams:\n  - listen: 127.0.0.1:{upstream}\n    service: web.default\ndiscovery:\n  static:\n    - service: web.default\n      endpoints: [\"{}\"]\nshutdown_grace: 10s\n",
            slow.addr
        ),
    );
    let mut child = Command::new(BIN)
        .args(["proxy", "--config"])
        .arg(&path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    eventually("meshlet ready", Duration::from_secs(10), || async {
        matches!(admin_get(admin_addr, "/ready").await, Ok((200, _)))
    })
    .await;

    let up: SocketAddr = format!("127.0.0.1:{upstream}").parse().unwrap();
    let mut c = H1Client::connect(up).await.unwrap();
    let inflight = tokio::spawn(async move { c.get("/slow").await });
    eventually(
        "request reached the backend",
        Duration::from_secs(5),
        || async { slow.hits() == 1 },
    )
    .await;

    let t0 = Instant::now();
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    // New connections are refused once the listeners stop.
    eventually("listener closed", Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(up).await.is_err()
    })
    .await;
    let answer = inflight
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body_text(), "slow");

    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_waits_for_the_proxy_and_gives_up_in_time() {
    let b = Backend::start("a", Duration::ZERO).await;
    let m = Meshlet::start(&upstream_config("web.default", &[b.addr])).await;
    let admin = m.addrs.admin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["wait-ready", "--timeout", "5s", "--admin", &admin])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Nothing listens there: it gives up after the timeout, saying so.
    let nobody = support::free_port();
    let t0 = Instant::now();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "wait-ready",
                "--timeout",
                "300ms",
                "--admin",
                &format!("127.0.0.1:{nobody}"),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("was not ready within"));
}

/// `meshlet proxy` started as a child process, its stderr in a file; killed (by its PID) if
/// a test ends before it exits.
struct Proxy {
    child: std::process::Child,
    stderr: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(config: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(&dir, config);
        let stderr = dir.path().join("stderr.log");
        let child = Command::new(BIN)
            .args(["proxy", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Proxy {
            child,
            stderr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory preconditions; the PID is our own child's.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    async fn wait_log(&self, what: &str, timeout: Duration) {
        eventually(&format!("log line {what:?}"), timeout, || async {
            self.log().contains(what)
        })
        .await;
    }

    /// The exit status, waiting up to `timeout` (polling); `None` if still running then.
    async fn exit_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_the_drain_exits_at_once() {
    // A request that holds the drain open for a minute.
    let slow = Backend::start("slow", Duration::from_secs(60)).await;
    let (admin, upstream) = (support::free_port(), support::free_port());
    let mut proxy = Proxy::start(&format!(
        "admin:\n  listen: 127.0.0.1:{admin}\nupstreams:\n  - listen: 127.0.0.1:{upstream}\n    service: web.default\ndiscovery:\n  static:\n    - service: web.default\n      endpoints: [\"{}\"]\nshutdown_grace: 10m\n",
        slow.addr
    ));
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    eventually("meshlet ready", Duration::from_secs(10), || async {
        matches!(admin_get(admin_addr, "/ready").await, Ok((200, _)))
    })
    .await;
    let up: SocketAddr = format!("127.0.0.1:{upstream}").parse().unwrap();
    let mut c = H1Client::connect(up).await.unwrap();
    let _inflight = tokio::spawn(async move { c.get("/slow").await });
    eventually(
        "request reached the backend",
        Duration::from_secs(5),
        || async { slow.hits() == 1 },
    )
    .await;

    proxy.signal(libc::SIGINT);
    proxy
        .wait_log(
            "shutting down: draining connections",
            Duration::from_secs(5),
        )
        .await;
    // The drain waits for the request in flight.
    assert!(
        proxy
            .exit_within(Duration::from_millis(300))
            .await
            .is_none(),
        "exited before the request finished: {}",
        proxy.log()
    );

    let t0 = Instant::now();
    proxy.signal(libc::SIGTERM);
    let status = proxy
        .exit_within(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running 10s after the second signal: {}", proxy.log()));
    assert_eq!(status.code(), Some(143), "{}", proxy.log());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    let log = proxy.log();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("second signal"))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("SIGTERM"), "{log}");
}

/// Every duration at the largest value allowed: accepted, and the first connections (HTTP,
/// deduplicated, and one that sends nothing) do not overflow the clock arithmetic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_durations_allowed_survive_the_first_connections() {
    let b = Backend::start("a", Duration::ZERO).await;
    let (admin, upstream) = (support::free_port(), support::free_port());
    let max = "1year";
    let policy = [
        "timeout",
        "connect_timeout",
        "idle_timeout",
        "retry_backoff",
        "retry_backoff_max",
        "retry_after_max",
        "breaker_backoff",
        "breaker_backoff_max",
        "breaker_window",
        "dedup_timeout",
    ]
    .map(|k| format!("  {k}: {max}\n"))
    .concat();
    let mut proxy = Proxy::start(&format!(
        "admin:\n  listen: 127.0.0.1:{admin}\nupstreams:\n  - listen: 127.0.0.1:{upstream}\n    service: web.default\n\
         discovery:\n  sync_timeout: {max}\n  static:\n    - service: web.default\n      endpoints: [\"{}\"]\n\
         detect:\n  timeout: {max}\nbalance:\n  default_rtt: {max}\n  decay: {max}\n\
         health:\n  hysteresis: {max}\n  outage_grace: {max}\nshutdown_grace: {max}\nworkers: 2\n\
         defaults:\n  dedup: true\n{policy}",
        b.addr
    ));
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    eventually("meshlet ready", Duration::from_secs(10), || async {
        matches!(admin_get(admin_addr, "/ready").await, Ok((200, _)))
    })
    .await;
    let up: SocketAddr = format!("127.0.0.1:{upstream}").parse().unwrap();
    for _ in 0..2 {
        let mut c = H1Client::connect(up).await.unwrap();
        let a = c.get("/").await.unwrap();
        assert_eq!((a.status, a.body_text()), (200, "a".to_string()));
    }
    // A client that connects and leaves without a byte: detection's deadline is computed too.
    drop(tokio::net::TcpStream::connect(up).await.unwrap());
    let (status, _) = admin_get(admin_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        proxy
            .exit_within(Duration::from_millis(200))
            .await
            .is_none(),
        "meshlet exited: {}",
        proxy.log()
    );
    assert!(!proxy.log().contains("panicked"), "{}", proxy.log());
    proxy.signal(libc::SIGTERM);
    let status = proxy.exit_within(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", proxy.log());
}

/// `[::]:port` serves IPv4 clients too, and sees 127.0.0.1 as the loopback client it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_server_on_the_unspecified_ipv6_address_serves_ipv4_too() {
    if !std::path::Path::new("/proc/net/if_inet6").exists() {
        println!("skipping: the kernel has IPv6 disabled");
        return;
    }
    let admin = support::free_port();
    let mut proxy = Proxy::start(&format!("admin:\n  listen: \"[::]:{admin}\"\n"));
    let v4: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{admin}").parse().unwrap();
    eventually(
        "ready over IPv4 and IPv6",
        Duration::from_secs(10),
        || async {
            matches!(admin_get(v4, "/ready").await, Ok((200, _)))
                && matches!(admin_get(v6, "/ready").await, Ok((200, _)))
        },
    )
    .await;
    assert!(proxy.log().contains("\"IPv4 and IPv6\""), "{}", proxy.log());
    let mut c = H1Client::connect(v4).await.unwrap();
    let rsp = c
        .send(
            http::Request::post("/shutdown")
                .header("host", "meshlet")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status, 200, "{}", rsp.body_text());
    let status = proxy.exit_within(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", proxy.log());
}
