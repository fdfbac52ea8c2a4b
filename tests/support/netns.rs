//! Network-namespace support for the root tests (`transparent_root.rs`, for IPv4 and IPv6, and
//! the `inbound_*_root.rs` files): a namespace with a veth pair and iptables/ip6tables
//! REDIRECT rules, sockets made inside it, and the meshlet binary run inside it as uid 7102.
//! Included by those test files with `#[path = "support/netns.rs"] mod netns;` next to
//! `mod support;`.
#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::support::{Backend, H1Client};

/// The uid (and gid) meshlet runs as; its own connections are not redirected.
pub const MESHLET_UID: u32 = 7102;
pub const OUTBOUND_PORT: u16 = 7140;
/// Every step of a test is bounded by this.
pub const STEP: Duration = Duration::from_secs(10);

static NEXT_NS: AtomicUsize = AtomicUsize::new(0);

/// The address family a namespace is set up for: which firewall tool writes its rules and
/// which loopback range they exempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// Connections to loopback are never redirected (meshlet's listener and admin live there).
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    /// The prefix length of the addresses on the veth interface.
    fn prefix_len(self) -> u8 {
        match self {
            Family::V4 => 24,
            Family::V6 => 64,
        }
    }

    fn ns_prefix(self) -> &'static str {
        match self {
            Family::V4 => "meshlet-t",
            Family::V6 => "meshlet-t6",
        }
    }
}

// ===== environment checks =====

pub use crate::support::find_tool;

/// Whether the test can run here; prints why not when it cannot.
pub fn can_run(test: &str, family: Family) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipping {test}: needs root (network namespaces and iptables)");
        return false;
    }
    for (tool, package) in [
        (family.iptables(), "iptables"),
        ("ip", "iproute2"),
        ("setpriv", "util-linux"),
    ] {
        if find_tool(tool).is_none() {
            println!("skipping {test}: `{tool}` is not installed (apt-get install {package})");
            return false;
        }
    }
    if family == Family::V6 && !Path::new("/proc/net/if_inet6").exists() {
        println!("skipping {test}: the kernel has IPv6 disabled (no /proc/net/if_inet6)");
        return false;
    }
    true
}

pub fn run(program: &str, args: &[&str]) {
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
pub struct Netns {
    pub name: String,
    family: Family,
    /// meshlet's admin server inside the namespace.
    admin: SocketAddr,
}

impl Netns {
    /// A namespace with `lo` up, veth `mv0` (peer `mv1`) holding `addrs` (the first is the
    /// namespace's own address; IPv6 ones without duplicate address detection, so usable at
    /// once), `routes` to `mv0`, and the redirect rules: a NAT chain MESHLET_OUTPUT that
    /// returns for uid 7102 and for loopback and redirects every other TCP connection to
    /// port 7140, jumped to from OUTPUT.
    pub fn create(family: Family, addrs: &[&str], routes: &[&str], admin: SocketAddr) -> Netns {
        let ns = Netns::bare(family, addrs, routes, admin);
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
        ns.iptables(&[
            "-A",
            "MESHLET_OUTPUT",
            "-d",
            family.loopback(),
            "-j",
            "RETURN",
        ]);
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

    /// As [`Netns::create`] without any firewall rule: for tests that write their own, or
    /// let `meshlet init` write them ([`Netns::meshlet_init`]).
    pub fn bare(family: Family, addrs: &[&str], routes: &[&str], admin: SocketAddr) -> Netns {
        let name = format!(
            "{}-{}-{}",
            family.ns_prefix(),
            std::process::id(),
            NEXT_NS.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        // From here on the guard removes the namespace, whatever fails next.
        let ns = Netns {
            name,
            family,
            admin,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["link", "add", "mv0", "type", "veth", "peer", "name", "mv1"]);
        ns.ip(&["link", "set", "mv1", "up"]);
        ns.ip(&["link", "set", "mv0", "up"]);
        for a in addrs {
            let cidr = format!("{a}/{}", family.prefix_len());
            let mut args = vec!["addr", "add", &cidr, "dev", "mv0"];
            if family == Family::V6 {
                args.push("nodad");
            }
            ns.ip(&args);
        }
        for r in routes {
            ns.ip(&["route", "add", r, "dev", "mv0"]);
        }
        ns
    }

    /// Another pod: a namespace of its own on the far end of the veth pair (`mv1`, moved out
    /// of this namespace) holding `addr`, on the same subnet. No firewall rules: its
    /// connections reach this namespace as a remote caller's would (through `PREROUTING`).
    /// Deleted on drop, like this one.
    pub fn peer(&self, addr: &str) -> Netns {
        let name = format!("{}-peer", self.name);
        run("ip", &["netns", "add", &name]);
        let peer = Netns {
            name,
            family: self.family,
            admin: self.admin,
        };
        peer.ip(&["link", "set", "lo", "up"]);
        self.ip(&["link", "set", "mv1", "netns", &peer.name]);
        let cidr = format!("{addr}/{}", self.family.prefix_len());
        let mut args = vec!["addr", "add", &cidr, "dev", "mv1"];
        if self.family == Family::V6 {
            args.push("nodad");
        }
        peer.ip(&args);
        peer.ip(&["link", "set", "mv1", "up"]);
        peer
    }

    /// Runs `meshlet init` (the built binary, as root) in the namespace: the pod's real NAT
    /// rules, as the injected init container writes them.
    pub fn meshlet_init(&self, args: &[&str]) {
        let mut all = vec![
            "netns",
            "exec",
            &self.name,
            env!("CARGO_BIN_EXE_meshlet"),
            "init",
        ];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// A NAT chain's rules with their packet counters (`iptables -L -v -x`): (packets, rule).
    pub fn nat_counters(&self, chain: &str) -> Vec<(u64, String)> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, self.family.iptables()])
            .args(["-w", "-t", "nat", "-L", chain, "-n", "-v", "-x"])
            .stdin(Stdio::null())
            .output()
            .expect("run iptables -L");
        assert!(out.status.success(), "iptables -L {chain}: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(2)
            .filter_map(|l| {
                let pkts = l.split_whitespace().next()?.parse().ok()?;
                Some((pkts, l.to_string()))
            })
            .collect()
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `iptables` (or `ip6tables`) on the namespace's NAT table.
    pub fn iptables(&self, args: &[&str]) {
        let mut all = vec![
            "netns",
            "exec",
            &self.name,
            self.family.iptables(),
            "-w",
            "-t",
            "nat",
        ];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// Runs `f` on a new thread that has entered the namespace: sockets it creates live there
    /// (and stay there when handed back).
    pub async fn enter<T, F>(&self, f: F) -> io::Result<T>
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
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
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
    pub async fn listen(&self, addr: SocketAddr) -> tokio::net::TcpListener {
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
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String), String> {
        let s = self.connect(self.admin).await.map_err(|e| e.to_string())?;
        let mut c = H1Client::over(s).await.map_err(|e| e.to_string())?;
        let a = tokio::time::timeout(STEP, c.get(path))
            .await
            .map_err(|_| "admin request timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok((a.status, a.body_text()))
    }

    pub async fn metrics(&self) -> String {
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
pub struct MeshletProcess {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl MeshletProcess {
    pub async fn start(ns: &Netns, yaml: &str) -> MeshletProcess {
        Self::start_with_env(ns, yaml, &[]).await
    }

    /// As [`MeshletProcess::start`], with environment variables (what the injector sets).
    pub async fn start_with_env(ns: &Netns, yaml: &str, env: &[(&str, &str)]) -> MeshletProcess {
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
            .env_remove("POD_IP")
            .envs(env.iter().copied())
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

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn log(&self) -> String {
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

// ===== servers inside the namespace =====

/// HTTP backends listening inside the namespace at port 8080 of each address, named b0, b1...
pub async fn backends(ns: &Netns, addrs: &[&str]) -> Vec<Backend> {
    let mut v = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let ip: IpAddr = a.parse().unwrap();
        let l = ns.listen(SocketAddr::new(ip, 8080)).await;
        v.push(Backend::serve(l, &format!("b{i}"), Duration::ZERO));
    }
    v
}

/// A raw TCP echo server inside the namespace; it closes after its client's half-close.
pub async fn echo_server(ns: &Netns, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
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
