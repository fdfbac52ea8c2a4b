//! Transparent outbound proxying with real iptables REDIRECT rules: needs root (network
//! namespaces, iptables) and the `iptables`, `ip` (iproute2) and `setpriv` (util-linux) tools.
//! Each test skips, with a message, when it cannot run.
//!
//! Every test gets a network namespace of its own with `lo` and a veth pair addressed from
//! 198.18.0.0/15 only (198.18.0.0/24 on the interface, 198.19.0.0/16 routed to it for virtual
//! service addresses). Inside it: backends, clients, the meshlet binary (as uid 7102, which the
//! iptables rules exempt from redirection) and a NAT OUTPUT chain that redirects every other TCP
//! connection, save to loopback, to meshlet's outbound listener 127.0.0.1:7140. The namespace is
//! removed at the end of the test, also on failure.

mod support;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The uid (and gid) meshlet runs as; its own connections are not redirected.
const MESHLET_UID: u32 = 7102;
const OUTBOUND_PORT: u16 = 7140;
const ADMIN: &str = "127.0.0.1:7190";
/// The namespace's own address (veth `mv0`).
const NS_ADDR: &str = "198.18.0.1";
/// A service's virtual address: nothing listens there; only the redirect makes it answer.
const VIP: &str = "198.19.0.10:80";
/// Every step of a test is bounded by this.
const STEP: Duration = Duration::from_secs(10);

static NEXT_NS: AtomicUsize = AtomicUsize::new(0);

// ===== environment checks =====

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether the test can run here; prints why not when it cannot.
fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipping {test}: needs root (network namespaces and iptables)");
        return false;
    }
    for (tool, package) in [
        ("iptables", "iptables"),
        ("ip", "iproute2"),
        ("setpriv", "util-linux"),
    ] {
        if find_tool(tool).is_none() {
            println!("skipping {test}: `{tool}` is not installed (apt-get install {package})");
            return false;
        }
    }
    true
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ===== the network namespace =====

/// A network namespace, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// A namespace with `lo` up, veth `mv0` (peer `mv1`) holding `198.18.0.1/24` plus the
    /// backends' addresses, a route for the virtual service range 198.19.0.0/16, and the
    /// redirect rules.
    fn create(backend_addrs: &[&str]) -> Netns {
        let name = format!(
            "meshlet-t-{}-{}",
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        // From here on the guard removes the namespace, whatever fails next.
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "add", "mv0", "type", "veth", "peer", "name", "mv1"]);
        ns.ip(&["link", "set", "mv1", "up"]);
        ns.ip(&["link", "set", "mv0", "up"]);
        for a in std::iter::once(&NS_ADDR).chain(backend_addrs) {
            ns.ip(&["addr", "add", &format!("{a}/24"), "dev", "mv0"]);
        }
        ns.ip(&["route", "add", "198.19.0.0/16", "dev", "mv0"]);

        let uid = MESHLET_UID.to_string();
        let port = OUTBOUND_PORT.to_string();
        ns.iptables(&["-N", "MESHLET_OUTPUT"]);
        // meshlet's own connections (to endpoints and passthrough destinations) go out as is.
        ns.iptables(&[
            "-A",
            "MESHLET_OUTPUT",
            "-m",
            "owner",
            "--uid-owner",
            &uid,
            "-j",
            "RETURN",
        ]);
        ns.iptables(&["-A", "MESHLET_OUTPUT", "-d", "127.0.0.0/8", "-j", "RETURN"]);
        ns.iptables(&[
            "-A",
            "MESHLET_OUTPUT",
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &port,
        ]);
        ns.iptables(&["-A", "OUTPUT", "-p", "tcp", "-j", "MESHLET_OUTPUT"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    fn iptables(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "iptables", "-w", "-t", "nat"];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `f` on a new thread that has entered the namespace: sockets it creates live there
    /// (and stay there when handed back).
    async fn enter<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let path = self.path();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let r = (|| {
                let ns = File::open(&path)?;
                // SAFETY: a valid namespace fd; only this thread's network namespace changes.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })();
            let _ = tx.send(r);
        });
        rx.await.expect("the namespace thread answers")
    }

    /// A TCP connection made from inside the namespace (so subject to its iptables rules).
    async fn connect(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let s = self
            .enter(move || {
                let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .await?;
        tokio::net::TcpStream::from_std(s)
    }

    /// A listener bound inside the namespace.
    async fn listen(&self, addr: SocketAddr) -> tokio::net::TcpListener {
        let l = self
            .enter(move || {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .await
            .unwrap_or_else(|e| panic!("cannot listen on {addr} in the namespace: {e}"));
        tokio::net::TcpListener::from_std(l).unwrap()
    }

    /// GET on meshlet's admin server inside the namespace: (status, body).
    async fn admin_get(&self, path: &str) -> Result<(u16, String), String> {
        let s = self
            .connect(ADMIN.parse().unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let mut c = H1Client::over(s).await.map_err(|e| e.to_string())?;
        let a = tokio::time::timeout(STEP, c.get(path))
            .await
            .map_err(|_| "admin request timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok((a.status, a.body_text()))
    }

    async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.expect("metrics").1
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let r = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
        match r {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "cannot delete network namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot delete network namespace {}: {e}", self.name),
        }
    }
}

// ===== meshlet, the binary, inside the namespace =====

/// The meshlet binary running in a namespace as uid 7102; killed on drop, and its log printed
/// if the test failed.
struct MeshletProcess {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl MeshletProcess {
    async fn start(ns: &Netns, yaml: &str) -> MeshletProcess {
        // Readable by uid 7102: a 0755 directory holding a 0644 file.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("meshlet.yaml");
        std::fs::write(&config, yaml).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let log = dir.path().join("meshlet.log");
        let log_file = File::create(&log).unwrap();
        let id = MESHLET_UID.to_string();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "setpriv"])
            .arg(format!("--reuid={id}"))
            .arg(format!("--regid={id}"))
            .arg("--clear-groups")
            .arg(env!("CARGO_BIN_EXE_meshlet"))
            .args(["proxy", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("MESHLET_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone().unwrap()))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn meshlet");
        let mut m = MeshletProcess {
            child,
            log,
            _dir: dir,
        };
        m.wait_ready(ns).await;
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls /ready until it answers 200, with a deadline.
    async fn wait_ready(&mut self, ns: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("meshlet exited early ({status}):\n{}", self.log());
            }
            let last = match ns.admin_get("/ready").await {
                Ok((200, _)) => return,
                Ok((status, body)) => format!("{status}: {body}"),
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "meshlet not ready in time (last answer: {last}):\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for MeshletProcess {
    fn drop(&mut self) {
        // Only our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- meshlet log -----\n{}", self.log());
        }
    }
}

/// The meshlet config: the outbound listener, an admin server inside the namespace and one
/// static service at the virtual address.
fn config(endpoints: &[SocketAddr]) -> String {
    format!(
        "admin:\n  listen: {ADMIN}\noutbound:\n  listen: 127.0.0.1:{OUTBOUND_PORT}\n\
         discovery:\n  static:\n    - service: web.default\n      addresses: [\"{VIP}\"]\n      endpoints: {}\n\
         detect:\n  timeout: 100ms\nshutdown_grace: 1s\nworkers: 2\nlog:\n  level: meshlet=debug,info\n",
        yaml_list(endpoints)
    )
}

/// HTTP backends listening inside the namespace at `addr:8080` each.
async fn backends(ns: &Netns, addrs: &[&str]) -> Vec<Backend> {
    let mut v = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let l = ns.listen(format!("{a}:8080").parse().unwrap()).await;
        v.push(Backend::serve(l, &format!("b{i}"), Duration::ZERO));
    }
    v
}

/// A raw TCP echo server inside the namespace; it closes after its client's half-close.
async fn echo_server(ns: &Netns, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = ns.listen(addr).await;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

const BACKEND_ADDRS: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_virtual_address_is_balanced_over_endpoints() {
    if !can_run("redirected_virtual_address_is_balanced_over_endpoints") {
        return;
    }
    // Shared with the client tasks; declared first, so dropped (deleted) last.
    let ns = std::sync::Arc::new(Netns::create(&BACKEND_ADDRS));
    let backends = backends(&ns, &BACKEND_ADDRS).await;
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let _meshlet = MeshletProcess::start(&ns, &config(&eps)).await;

    let vip: SocketAddr = VIP.parse().unwrap();
    // 6 clients at once, 10 requests each: three open a fresh connection per request, three
    // keep one connection alive. Every request is balanced on its own.
    let tasks: Vec<_> = (0..6)
        .map(|c| {
            let ns = ns.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut keep: Option<H1Client> = None;
                for i in 0..10 {
                    let fresh = c < 3;
                    if fresh || keep.is_none() {
                        let s = ns
                            .connect(vip)
                            .await
                            .expect("connect to the virtual address");
                        keep = Some(H1Client::over(s).await.unwrap());
                    }
                    let client = keep.as_mut().unwrap();
                    let a = tokio::time::timeout(STEP, client.get(&format!("/c{c}/{i}")))
                        .await
                        .expect("answer in time")
                        .unwrap();
                    assert_eq!(a.status, 200, "{}", a.body_text());
                    assert_eq!(a.header("x-path").unwrap(), format!("/c{c}/{i}"));
                    seen.push(a.header("x-backend").unwrap());
                    if fresh {
                        keep = None;
                    }
                }
                seen
            })
        })
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for b in t.await.unwrap() {
            *seen.entry(b).or_default() += 1;
        }
    }
    println!("requests per backend: {seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 60);
    for b in &backends {
        let n = seen.get(&b.name).copied().unwrap_or(0);
        assert!(n >= 6, "backend {} served only {n} of 60: {seen:?}", b.name);
        assert_eq!(b.hits(), n);
    }

    let text = ns.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_requests_total{direction="outbound",service="web.default",status="200"}"#
        ),
        Some(60.0),
        "{text}"
    );
    // 30 fresh connections plus 3 kept alive, all detected as HTTP/1.
    assert_eq!(
        metric(
            &text,
            r#"meshlet_connections_total{direction="outbound",protocol="http1"}"#
        ),
        Some(33.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_destination_passes_through_unchanged() {
    if !can_run("unknown_destination_passes_through_unchanged") {
        return;
    }
    let ns = Netns::create(&BACKEND_ADDRS);
    let backends = backends(&ns, &BACKEND_ADDRS).await;
    let echo_addr: SocketAddr = format!("{NS_ADDR}:9000").parse().unwrap();
    let _echo = echo_server(&ns, echo_addr).await;
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let _meshlet = MeshletProcess::start(&ns, &config(&eps)).await;

    // Opaque bytes to a plain address: through meshlet (the redirect catches every TCP
    // connection) and on to that very address, bytes unchanged, half-close respected.
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i * 13 + 1) as u8).collect();
    let s = ns.connect(echo_addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&to_send).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut got = Vec::new();
    tokio::time::timeout(STEP, rd.read_to_end(&mut got))
        .await
        .expect("echo in time")
        .unwrap();
    drop(writer.await.unwrap());
    assert!(
        got == data,
        "echo differs ({} of {} bytes)",
        got.len(),
        data.len()
    );

    // HTTP straight to one backend's own address stays with that backend: no balancing.
    let mut c = H1Client::over(ns.connect(backends[1].addr).await.unwrap())
        .await
        .unwrap();
    for _ in 0..10 {
        let a = tokio::time::timeout(STEP, c.get("/direct"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.header("x-backend").unwrap(), "b1");
    }
    assert_eq!(backends[1].hits(), 10);
    assert_eq!(backends[0].hits() + backends[2].hits(), 0);

    let text = ns.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_connections_total{direction="outbound",protocol="passthrough"}"#
        ),
        Some(2.0),
        "both connections went through meshlet: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_loop_to_the_listener_is_refused_and_counted() {
    if !can_run("redirect_loop_to_the_listener_is_refused_and_counted") {
        return;
    }
    let ns = Netns::create(&BACKEND_ADDRS);
    let backends = backends(&ns, &BACKEND_ADDRS).await;
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let _meshlet = MeshletProcess::start(&ns, &config(&eps)).await;

    // Straight to the listener's port on the namespace's own address: the REDIRECT brings it
    // back to the listener with the listener's own port as the original destination. Were it
    // proxied, meshlet would connect to itself, over and over.
    // The listener's address itself (loopback: not redirected) is refused the same way.
    let own: SocketAddr = format!("{NS_ADDR}:{OUTBOUND_PORT}").parse().unwrap();
    let listener: SocketAddr = format!("127.0.0.1:{OUTBOUND_PORT}").parse().unwrap();
    for dst in [own, own, listener] {
        let mut s = ns
            .connect(dst)
            .await
            .expect("the connection reaches the listener");
        let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(STEP, s.read(&mut buf))
            .await
            .expect("meshlet closes the connection");
        match r {
            Ok(0) => {}
            Ok(n) => panic!(
                "meshlet answered a redirect loop: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
    }

    let text = ns.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_redirect_loops_total{direction="outbound"}"#
        ),
        Some(3.0),
        "{text}"
    );
    // Nothing reached a backend, and meshlet still serves the real service.
    assert!(backends.iter().all(|b| b.hits() == 0));
    let s = ns.connect(VIP.parse().unwrap()).await.unwrap();
    let mut c = H1Client::over(s).await.unwrap();
    let a = tokio::time::timeout(STEP, c.get("/after"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200);
}
