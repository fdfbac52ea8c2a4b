//! Under the sidecar's default memory limit (64 MiB), a flood of 10,000 connections does not
//! get the proxy OOM-killed: the default connection cap (derived from the cgroup's limit)
//! refuses what does not fit, the proxy keeps answering on the connections it holds, and takes
//! new ones again once they close. The proxy binary runs in a memory cgroup this test makes
//! (cgroup v2 where its memory controller is available to children, else v1). Needs root; skips
//! with a message without it or without a writable memory cgroup. Loopback only; bounded.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: u64 = 64 * 1024 * 1024;
const ATTEMPTS: usize = 10_000;
const AT_ONCE: usize = 200;

/// A memory cgroup of our own, removed on drop.
struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

impl Cgroup {
    fn create() -> Result<Cgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let name = format!("meshlet-test-{}", std::process::id());
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let (Some(controllers), Some(path)) = (controllers, path) else {
                continue;
            };
            let v2 = controllers.is_empty();
            let base = if v2 {
                let base = PathBuf::from(format!("/sys/fs/cgroup{path}"));
                let sub = std::fs::read_to_string(base.join("cgroup.subtree_control"))
                    .unwrap_or_default();
                if !sub.split_whitespace().any(|c| c == "memory") {
                    continue;
                }
                base
            } else if controllers.split(',').any(|c| c == "memory") {
                PathBuf::from(format!("/sys/fs/cgroup/memory{path}"))
            } else {
                continue;
            };
            let dir = base.join(&name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            let cg = Cgroup { dir, v2 };
            let limit = LIMIT.to_string();
            let ok = if v2 {
                let _ = cg.write("memory.swap.max", "0");
                cg.write("memory.max", &limit)
            } else {
                let ok = cg.write("memory.limit_in_bytes", &limit);
                let _ = cg.write("memory.memsw.limit_in_bytes", &limit);
                ok
            };
            if ok.is_ok() {
                return Ok(cg);
            }
        }
        Err("no writable memory cgroup (v2 memory controller for children, or v1)".into())
    }

    fn write(&self, file: &str, value: &str) -> std::io::Result<()> {
        std::fs::write(self.dir.join(file), value)
    }

    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    fn usage_mib(&self) -> f64 {
        let file = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0.0, |b| b / 1048576.0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends a GET on `s` and reads the answer's status line (the answers here are small).
async fn get(s: &mut TcpStream) -> Result<String, String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: web.default\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 2048];
    match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
        Err(_) => Err("no answer within 20 s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(n)) => Ok(String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()),
    }
}

async fn connect_and_get(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    match get(&mut s).await? {
        l if l == "HTTP/1.1 200 OK" => Ok(s),
        l => Err(l),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_under_64_mib_do_not_oom_kill_the_proxy_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipping: needs root (a memory cgroup)");
        return;
    }
    let cg = match Cgroup::create() {
        Ok(c) => c,
        Err(e) => {
            println!("skipping: {e}");
            return;
        }
    };
    let backend = Backend::start("b1", Duration::ZERO).await;
    let (admin, listen) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "admin:\n  listen: 127.0.0.1:{admin}\nupstreams:\n  - listen: 127.0.0.1:{listen}\n    service: web.default\ndiscovery:\n  static:\n    - service: web.default\n      endpoints: [\"{}\"]\nlog:\n  level: warn\nworkers: 2\n",
            backend.addr
        ),
    )
    .unwrap();
    // The shell moves itself into the cgroup and then becomes meshlet, so that meshlet reads
    // its limit from inside.
    let child = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$1\" && exec \"$2\" proxy --config \"$3\"")
        .arg("sh")
        .arg(cg.dir.join("cgroup.procs"))
        .arg(env!("CARGO_BIN_EXE_meshlet"))
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start meshlet");
    let mut proxy = Proxy(child);
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    let addr: SocketAddr = ([127, 0, 0, 1], listen).into();
    eventually("meshlet ready", Duration::from_secs(30), || async {
        matches!(admin_get(admin, "/ready").await, Ok((200, _)))
    })
    .await;

    // 10,000 attempts, 200 at a time; the answered ones are held open.
    let sem = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..ATTEMPTS {
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let r = connect_and_get(addr).await;
            drop(permit);
            r
        });
    }
    let mut held = Vec::new();
    let mut refused = 0;
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    let usage = cg.usage_mib();
    println!(
        "held {} refused {refused} of {ATTEMPTS}; cgroup usage {usage:.1} MiB; OOM kills {}",
        held.len(),
        cg.oom_kills()
    );
    assert_eq!(cg.oom_kills(), 0, "the proxy was OOM-killed");
    assert!(
        proxy.0.try_wait().unwrap().is_none(),
        "the proxy exited during the flood"
    );
    assert!(!held.is_empty(), "no connection was answered");
    assert!(
        refused > 0,
        "nothing was refused: is the default cap derived from the limit?"
    );
    let metrics = admin_get(admin, "/metrics").await.unwrap().1;
    let counted = metric(
        &metrics,
        "meshlet_connections_refused_total{direction=\"outbound\",reason=\"limit\"}",
    )
    .unwrap_or(0.0);
    assert!(counted >= 1.0, "refusals not counted:\n{metrics}");

    // The held connections keep working.
    for s in held.iter_mut().step_by(97) {
        assert_eq!(get(s).await.as_deref(), Ok("HTTP/1.1 200 OK"));
    }
    // Once they close, new connections are taken again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match connect_and_get(addr).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no new connection answered after the held ones closed: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cg.oom_kills(), 0);
}
