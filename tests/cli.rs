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
        ("workers: 0\n", "config.yaml: workers: 0 is not allowed"),
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
            "config.yaml: detect.timeout: \"0s\" is not allowed",
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
    assert!(
        stderr.contains(&format!(
            "cannot listen on 127.0.0.1:{port} for admin.listen"
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let slow = Backend::start("slow", Duration::from_millis(1500)).await;
    let (admin, upstream) = (free_port(), free_port());
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
    let nobody = free_port();
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
