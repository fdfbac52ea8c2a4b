//! `meshlet init` for real: the built binary writes its NAT rules in a network namespace, twice
//! (one copy of each rule remains), and real connections are redirected, or not, as they should
//! be. Needs root, `ip` (iproute2), `iptables` and `setpriv` (util-linux); skips with a message
//! otherwise. The dry run and the missing-iptables error need none of that and run everywhere.
//!
//! Topology: two namespaces joined by a veth pair, addresses from 198.18.0.0/15 only: the "pod"
//! (`mv0`, 198.18.0.1/24), where `meshlet init` runs, and its "peer" (`mv1`, 198.18.0.2/24),
//! standing for the node and the rest of the network. Both are removed at the end of the test,
//! also on failure.

mod support;

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::find_tool;

const BIN: &str = env!("CARGO_BIN_EXE_meshlet");
const POD: &str = "198.18.0.1";
const PEER: &str = "198.18.0.2";
/// An address on the pod's subnet where nothing listens: only the redirect makes it answer.
const NOWHERE: &str = "198.18.0.99:80";
/// Every wait is bounded by this.
const STEP: Duration = Duration::from_secs(5);

static NEXT: AtomicUsize = AtomicUsize::new(0);

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
        ("bash", "bash"),
        ("timeout", "coreutils"),
    ] {
        if find_tool(tool).is_none() {
            println!("skipping {test}: `{tool}` is not installed (apt-get install {package})");
            return false;
        }
    }
    true
}

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn run(program: &str, args: &[&str]) -> String {
    let out = output(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted on drop.
struct Ns {
    name: String,
}

impl Ns {
    fn new(role: &str) -> Ns {
        let name = format!(
            "meshlet-init-{role}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `program args...` inside the namespace.
    fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        output("ip", &all)
    }

    /// Runs `f` on a thread that has entered the namespace: sockets made there live there.
    fn enter<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let path = Path::new("/var/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path)?;
            // SAFETY: a valid namespace fd; only this thread's network namespace changes.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .expect("the namespace thread")
    }

    fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        let l = self
            .enter(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("cannot listen on {addr} in {}: {e}", self.name));
        l.set_nonblocking(true).unwrap();
        l
    }

    /// A connection made from inside the namespace (by this process, uid 0).
    fn connect(&self, addr: &str) -> TcpStream {
        let addr: SocketAddr = addr.parse().unwrap();
        self.enter(move || TcpStream::connect_timeout(&addr, STEP))
            .unwrap_or_else(|e| panic!("cannot connect to {addr} from {}: {e}", self.name))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let out = output("ip", &["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "cannot delete network namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The pod and its peer, joined by a veth pair.
fn pod_and_peer() -> (Ns, Ns) {
    let pod = Ns::new("pod");
    let peer = Ns::new("peer");
    pod.ip(&["link", "add", "mv0", "type", "veth", "peer", "name", "mv1"]);
    pod.ip(&["link", "set", "mv1", "netns", &peer.name]);
    pod.ip(&["addr", "add", &format!("{POD}/24"), "dev", "mv0"]);
    peer.ip(&["addr", "add", &format!("{PEER}/24"), "dev", "mv1"]);
    pod.ip(&["link", "set", "mv0", "up"]);
    peer.ip(&["link", "set", "mv1", "up"]);
    (pod, peer)
}

/// The next connection on `l` within `within`, if any.
fn accepted(l: &TcpListener, within: Duration) -> Option<TcpStream> {
    let deadline = Instant::now() + within;
    loop {
        match l.accept() {
            Ok((s, _)) => return Some(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Where a redirected connection was headed (SO_ORIGINAL_DST).
fn original_dst(s: &TcpStream) -> SocketAddr {
    socket2::SockRef::from(s)
        .original_dst_v4()
        .expect("SO_ORIGINAL_DST")
        .as_socket()
        .unwrap()
}

/// `meshlet init` in the pod, with extra env; panics unless it succeeds. Returns its stderr.
fn init(pod: &Ns, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &pod.name, BIN, "init"])
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run meshlet init");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "meshlet init failed: {stderr}");
    stderr
}

/// The `-A` lines of the pod's nat table, as the backend meshlet chose saves them.
fn nat_rules(pod: &Ns, log: &str, family: &str) -> Vec<String> {
    let suffix = if log.contains("iptables backend: nft") {
        "-nft"
    } else if log.contains("iptables backend: legacy") {
        "-legacy"
    } else {
        ""
    };
    let save = format!("{family}{suffix}-save");
    let out = pod.exec(&save, &["-t", "nat"]);
    assert!(out.status.success(), "{save}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(str::to_string)
        .collect()
}

fn assert_one_copy(rules: &[String], expected_ours: usize) {
    let mut sorted = rules.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), rules.len(), "duplicate rules: {rules:#?}");
    for jump in [
        "-A PREROUTING -p tcp -j MESHLET_INBOUND",
        "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
    ] {
        assert_eq!(
            rules.iter().filter(|r| *r == jump).count(),
            1,
            "{jump}: {rules:#?}"
        );
    }
    let ours = rules
        .iter()
        .filter(|r| r.starts_with("-A MESHLET_"))
        .count();
    assert_eq!(ours, expected_ours, "{rules:#?}");
}

#[test]
fn init_twice_leaves_one_copy_and_redirects_real_traffic() {
    if !can_run("init_twice_leaves_one_copy_and_redirects_real_traffic") {
        return;
    }
    let (pod, peer) = pod_and_peer();
    let v6 = Path::new("/proc/net/if_inet6").exists() && find_tool("ip6tables").is_some();
    let ipv6 = if v6 { "true" } else { "false" };
    // Inputs from env, as the injector writes them.
    let env = [
        ("MESHLET_SKIP_OUTBOUND_PORTS", "9002"),
        ("MESHLET_SKIP_OUTBOUND_CIDRS", "198.19.0.0/16,2001:2::/48"),
        ("MESHLET_IPV6", ipv6),
    ];
    let first_log = init(&pod, &env);
    println!("first run:\n{first_log}");
    let first = nat_rules(&pod, &first_log, "iptables");
    let log = init(&pod, &env);
    println!("second run:\n{log}");
    assert!(log.contains("meshlet init: iptables backend: "), "{log}");
    let second = nat_rules(&pod, &log, "iptables");
    assert_eq!(first, second, "the second run changed the rules");
    // In our chains, 4 inbound rules (admin, gRPC, the jump to the redirect, the redirect) and
    // 7 outbound (uid, lo, loopback, 1 port, 1 CIDR, the jump to the redirect, the redirect).
    assert_one_copy(&second, 4 + 7);
    println!("iptables nat rules:\n{}", second.join("\n"));
    if v6 {
        let rules6 = nat_rules(&pod, &log, "ip6tables");
        assert_one_copy(&rules6, 4 + 7);
        assert!(
            rules6.iter().any(|r| r.contains("-d 2001:2::/48")),
            "{rules6:#?}"
        );
    } else {
        println!("IPv6 unavailable: only the IPv4 rules checked");
    }

    let outbound = pod.listen("127.0.0.1:7140");
    let inbound = pod.listen("0.0.0.0:7143");
    let admin = pod.listen(&format!("{POD}:7190"));
    let app_dest = peer.listen(&format!("{PEER}:9000"));
    let skipped_dest = peer.listen(&format!("{PEER}:9002"));
    let short = Duration::from_millis(300);

    // Outbound, from the app (uid 0 here): to an address where nothing listens, and to one
    // where something does; both land on the outbound port, their destination preserved.
    for dest in [NOWHERE.to_string(), format!("{PEER}:9000")] {
        let _c = pod.connect(&dest);
        let s = accepted(&outbound, STEP)
            .unwrap_or_else(|| panic!("the connection to {dest} was not redirected"));
        assert_eq!(original_dst(&s).to_string(), dest);
    }
    assert!(accepted(&app_dest, short).is_none(), "not redirected");

    // A skipped port goes out as is.
    let _c = pod.connect(&format!("{PEER}:9002"));
    assert!(accepted(&skipped_dest, STEP).is_some(), "skipped port");
    assert!(
        accepted(&outbound, short).is_none(),
        "skipped port redirected"
    );

    // The proxy's own connections (uid 7102) are not redirected.
    let script = format!("exec 3<>/dev/tcp/{PEER}/9000 && echo connected");
    let out = pod.exec(
        "setpriv",
        &[
            "--reuid=7102",
            "--regid=7102",
            "--clear-groups",
            "timeout",
            "5",
            "bash",
            "-c",
            &script,
        ],
    );
    assert!(
        out.status.success(),
        "uid 7102 cannot connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        accepted(&app_dest, STEP).is_some(),
        "uid 7102's connection did not reach {PEER}:9000"
    );
    assert!(
        accepted(&outbound, short).is_none(),
        "uid 7102's connection was redirected"
    );

    // Inbound, from the peer: an app port lands on the inbound port; the admin port does not.
    let _c = peer.connect(&format!("{POD}:8080"));
    let s = accepted(&inbound, STEP).expect("the inbound connection was not redirected");
    assert_eq!(original_dst(&s).to_string(), format!("{POD}:8080"));
    let _c = peer.connect(&format!("{POD}:7190"));
    assert!(accepted(&admin, STEP).is_some(), "admin port");
    assert!(accepted(&inbound, short).is_none(), "admin port redirected");
}

#[test]
fn without_net_admin_it_says_so() {
    if !can_run("without_net_admin_it_says_so") {
        return;
    }
    let pod = Ns::new("nocap");
    // uid 7102 has no capabilities.
    let out = pod.exec(
        "setpriv",
        &[
            "--reuid=7102",
            "--regid=7102",
            "--clear-groups",
            BIN,
            "init",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("meshlet init needs the NET_ADMIN capability"),
        "{stderr}"
    );
}

#[test]
fn without_iptables_it_says_so() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("init")
        .env("PATH", empty.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "meshlet init: iptables-restore not found in PATH; install iptables"
    );
}

#[test]
fn dry_run_prints_both_families_and_bad_input_exits_2() {
    let out = Command::new(BIN)
        .args([
            "init",
            "--dry-run",
            "--skip-outbound-cidrs",
            "198.19.0.0/16",
        ])
        .env("MESHLET_IPV6", "true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("*nat").count(), 2, "{text}");
    assert!(text.contains("-d 198.19.0.0/16"), "{text}");
    assert!(text.contains("-d ::1/128"), "{text}");

    let out = Command::new(BIN)
        .args(["init", "--dry-run"])
        .env("MESHLET_OUTBOUND_PORT", "http")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--outbound-port (env MESHLET_OUTBOUND_PORT): invalid value \"http\""),
        "{stderr}"
    );
}
