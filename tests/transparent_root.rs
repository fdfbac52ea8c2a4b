//! Transparent outbound proxying with real iptables (IPv4) and ip6tables (IPv6) REDIRECT rules:
//! one suite, each shared scenario written once for a [`Family`] and run for both (`…_v4`,
//! `…_v6`), plus a few tests for one family only. Needs root (network namespaces, iptables) and
//! the `iptables` (or `ip6tables`), `ip` (iproute2) and `setpriv` (util-linux) tools. Each test
//! skips, with a message, when it cannot run.
//!
//! Every test gets a network namespace of its own with `lo` and a veth pair `mv0`, addressed:
//! - IPv4: from 198.18.0.0/15 only: 198.18.0.0/24 on the interface, 198.19.0.0/16 routed to it
//!   for virtual service addresses;
//! - IPv6: from the benchmarking range 2001:2::/48 (RFC 5180) only: 2001:2::1/64 and the
//!   backends' addresses on the interface (without duplicate address detection, so usable at
//!   once); the virtual service address 2001:2::10 is on that link but owned by nobody.
//!
//! Inside it: backends, clients, the meshlet binary (as uid 7102, which the rules exempt from
//! redirection) and a NAT OUTPUT chain that redirects every other TCP connection, save to
//! loopback, to meshlet's outbound listener (127.0.0.1:7140 or [::1]:7140), where
//! SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST) gives the destination back. The namespace is removed
//! at the end of the test, also on failure.

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use netns::{Family, MeshletProcess, Netns, OUTBOUND_PORT, STEP, backends, can_run, echo_server};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The suite's address plan and meshlet config for each family. (Which firewall tool writes
/// the rules, and which loopback range they exempt, [`Family`] itself says in support/netns.rs.)
impl Family {
    /// Loopback: meshlet's listener and admin server live there, never redirected.
    fn loopback_ip(self) -> IpAddr {
        match self {
            Family::V4 => "127.0.0.1",
            Family::V6 => "::1",
        }
        .parse()
        .unwrap()
    }

    /// meshlet's outbound listener, where the redirect rules send every other connection.
    fn listener(self) -> SocketAddr {
        SocketAddr::new(self.loopback_ip(), OUTBOUND_PORT)
    }

    /// meshlet's admin server inside the namespace.
    fn admin(self) -> SocketAddr {
        SocketAddr::new(self.loopback_ip(), 7190)
    }

    /// The namespace's own address (veth `mv0`).
    fn ns_addr(self) -> IpAddr {
        match self {
            Family::V4 => "198.18.0.1",
            Family::V6 => "2001:2::1",
        }
        .parse()
        .unwrap()
    }

    /// A service's virtual address: nothing listens there; only the redirect makes it answer.
    fn vip(self) -> SocketAddr {
        match self {
            Family::V4 => "198.19.0.10:80",
            Family::V6 => "[2001:2::10]:80",
        }
        .parse()
        .unwrap()
    }

    /// The backends' addresses, on `mv0` next to the namespace's own.
    fn backend_addrs(self) -> &'static [&'static str] {
        match self {
            Family::V4 => &["198.18.0.11", "198.18.0.12", "198.18.0.13"],
            Family::V6 => &["2001:2::11", "2001:2::12", "2001:2::13"],
        }
    }

    /// The test's namespace: the namespace's own address and `backend_addrs` on `mv0`, for
    /// IPv4 a route for the virtual service range 198.19.0.0/16 (the IPv6 virtual address is
    /// on the link), and the redirect rules.
    fn netns(self, backend_addrs: &[&str]) -> Netns {
        let own = self.ns_addr().to_string();
        let addrs: Vec<&str> = std::iter::once(own.as_str())
            .chain(backend_addrs.iter().copied())
            .collect();
        let routes: &[&str] = match self {
            Family::V4 => &["198.19.0.0/16"],
            Family::V6 => &[],
        };
        Netns::create(self, &addrs, routes, self.admin())
    }

    /// The meshlet config: the outbound listener on loopback, an admin server inside the
    /// namespace and one static service at the virtual address.
    fn config(self, endpoints: &[SocketAddr]) -> String {
        format!(
            "admin:\n  listen: \"{}\"\noutbound:\n  listen: \"{}\"\n\
             discovery:\n  static:\n    - service: web.default\n      addresses: [\"{}\"]\n      endpoints: {}\n\
             detect:\n  timeout: 100ms\nshutdown_grace: 1s\nworkers: 2\nlog:\n  level: meshlet=debug,info\n",
            self.admin(),
            self.listener(),
            self.vip(),
            yaml_list(endpoints)
        )
    }
}

/// The namespace, its three backends and meshlet in front of them. Dropped in reverse order:
/// meshlet, the backends, then the namespace.
async fn setup(family: Family) -> (Arc<Netns>, Vec<Backend>, MeshletProcess) {
    setup_in(family, family.netns(family.backend_addrs())).await
}

/// As [`setup`], in a namespace made (and perhaps changed) by the caller.
async fn setup_in(family: Family, ns: Netns) -> (Arc<Netns>, Vec<Backend>, MeshletProcess) {
    let ns = Arc::new(ns);
    let backends = backends(&ns, family.backend_addrs()).await;
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    assert!(
        eps.iter().all(|e| e.is_ipv6() == (family == Family::V6)),
        "{eps:?}"
    );
    let meshlet = MeshletProcess::start(&ns, &family.config(&eps)).await;
    (ns, backends, meshlet)
}

// ===== scenarios for both families =====

/// Two tests, `$v4` and `$v6`, each running `$scenario` for its family when it can run here.
macro_rules! for_both_families {
    ($scenario:ident: $v4:ident, $v6:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $v4() {
            if can_run(stringify!($v4), Family::V4) {
                $scenario(Family::V4).await
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $v6() {
            if can_run(stringify!($v6), Family::V6) {
                $scenario(Family::V6).await
            }
        }
    };
}

for_both_families!(
    redirected_virtual_address_is_balanced_over_endpoints:
    redirected_virtual_address_is_balanced_over_endpoints_v4,
    redirected_virtual_address_is_balanced_over_endpoints_v6
);
for_both_families!(
    unknown_destination_passes_through_unchanged:
    unknown_destination_passes_through_unchanged_v4,
    unknown_destination_passes_through_unchanged_v6
);
for_both_families!(
    redirect_loop_to_the_listener_is_refused_and_counted:
    redirect_loop_to_the_listener_is_refused_and_counted_v4,
    redirect_loop_to_the_listener_is_refused_and_counted_v6
);

async fn redirected_virtual_address_is_balanced_over_endpoints(family: Family) {
    let (ns, backends, meshlet) = setup(family).await;

    let vip = family.vip();
    // 6 clients at once, 20 requests each: three open a fresh connection per request, three
    // keep one connection alive. Every request is balanced on its own.
    let tasks: Vec<_> = (0..6)
        .map(|c| {
            let ns = ns.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut keep: Option<H1Client> = None;
                for i in 0..20 {
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
    assert_eq!(seen.values().sum::<usize>(), 120);
    // Each backend gets a share: at least 5%. (Not an even split: peak-EWMA favours whichever
    // answered fastest lately, and in a loaded test run that can be one backend for a while.)
    for b in &backends {
        let n = seen.get(&b.name).copied().unwrap_or(0);
        assert!(
            n >= 6,
            "backend {} served only {n} of 120: {seen:?}",
            b.name
        );
        assert_eq!(b.hits(), n);
    }

    let text = ns.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_requests_total{classification="success",direction="outbound",service="web.default",status="200"}"#
        ),
        Some(120.0),
        "{text}"
    );
    // 60 fresh connections plus 3 kept alive, all detected as HTTP/1.
    assert_eq!(
        metric(
            &text,
            r#"meshlet_connections_total{direction="outbound",protocol="http1"}"#
        ),
        Some(63.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"meshlet_connections_total{direction="outbound",protocol="passthrough"}"#
        ),
        None,
        "{text}"
    );
    // meshlet read the virtual address back as the original destination.
    let log = meshlet.log();
    assert!(
        log.contains(&vip.to_string()),
        "no {vip} in the meshlet log:\n{log}"
    );
}

async fn unknown_destination_passes_through_unchanged(family: Family) {
    let (ns, backends, _meshlet) = setup(family).await;
    let echo_addr = SocketAddr::new(family.ns_addr(), 9000);
    let _echo = echo_server(&ns, echo_addr).await;

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
    assert_eq!(
        metric(
            &text,
            r#"meshlet_connections_total{direction="outbound",protocol="http1"}"#
        ),
        None,
        "nothing was balanced: {text}"
    );
}

async fn redirect_loop_to_the_listener_is_refused_and_counted(family: Family) {
    let (ns, backends, _meshlet) = setup(family).await;

    // Straight to the listener's port on the namespace's own address: the REDIRECT brings it
    // back to the listener with the listener's own port as the original destination. Were it
    // proxied, meshlet would connect to itself, over and over.
    // The listener's address itself (loopback: not redirected) is refused the same way.
    let own = SocketAddr::new(family.ns_addr(), OUTBOUND_PORT);
    for dst in [own, own, family.listener()] {
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
                "meshlet answered a redirect loop to {dst}: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{dst}: {e}"),
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
    let s = ns.connect(family.vip()).await.unwrap();
    let mut c = H1Client::over(s).await.unwrap();
    let a = tokio::time::timeout(STEP, c.get("/after"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200);
}

// ===== IPv4 only =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_silent_and_unusual_http_clients_stay_http() {
    let family = Family::V4;
    if !can_run(
        "redirected_silent_and_unusual_http_clients_stay_http",
        family,
    ) {
        return;
    }
    let backend_addrs = &family.backend_addrs()[..2];
    let ns = family.netns(backend_addrs);
    let backends = backends(&ns, backend_addrs).await;
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let _meshlet = MeshletProcess::start(&ns, &family.config(&eps)).await;
    let vip = family.vip();

    // A client that connects ahead of use (as Go's net/http does) and is silent for longer
    // than detect.timeout (100ms here) is still HTTP: every request is its own.
    let s = ns.connect(vip).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let mut c = H1Client::over(s).await.unwrap();
    for i in 0..10 {
        let a = tokio::time::timeout(STEP, c.get(&format!("/late/{i}")))
            .await
            .expect("answer in time")
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.body_text());
        assert_eq!(a.header("x-path").unwrap(), format!("/late/{i}"));
    }

    // A request line ended by a bare LF is HTTP too, not opaque bytes.
    let mut s = ns.connect(vip).await.unwrap();
    s.write_all(b"GET /lf HTTP/1.1\nhost: web.default\nconnection: close\n\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(STEP, s.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let text = ns.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_requests_total{classification="success",direction="outbound",service="web.default",status="200"}"#
        ),
        Some(11.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"meshlet_protocol_detect_total{direction="outbound",result="timeout"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            r#"meshlet_connections_total{direction="outbound",protocol="tcp"}"#
        )
        .is_none(),
        "{text}"
    );
}

/// An outbound listener on `[::]` (dual-stack) takes the IPv4 redirect as an IPv4-mapped
/// connection: its original destination is still read (the IPv4 way) and proxied, and a
/// redirect loop to it is still recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_listener_reads_ipv4_original_destinations() {
    let family = Family::V4;
    if !can_run(
        "a_dual_stack_listener_reads_ipv4_original_destinations",
        family,
    ) {
        return;
    }
    if !std::path::Path::new("/proc/net/if_inet6").exists() {
        println!("skipping a_dual_stack_listener_reads_ipv4_original_destinations: IPv6 disabled");
        return;
    }
    let ns = family.netns(family.backend_addrs());
    let backends = backends(&ns, family.backend_addrs()).await;
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let yaml = family.config(&eps).replace(
        &format!("listen: \"{}\"", family.listener()),
        &format!("listen: \"[::]:{OUTBOUND_PORT}\""),
    );
    assert!(yaml.contains("[::]"), "{yaml}");
    let meshlet = MeshletProcess::start(&ns, &yaml).await;
    assert!(meshlet.log().contains("IPv4 and IPv6"), "{}", meshlet.log());

    for i in 0..6 {
        let s = ns.connect(family.vip()).await.unwrap();
        let mut c = H1Client::over(s).await.unwrap();
        let a = tokio::time::timeout(STEP, c.get(&format!("/v4/{i}")))
            .await
            .expect("answer in time")
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.body_text());
        assert_eq!(a.header("x-path").unwrap(), format!("/v4/{i}"));
    }
    assert_eq!(backends.iter().map(|b| b.hits()).sum::<usize>(), 6);

    // The listener's own port on the namespace's address: redirected back to itself.
    let own = SocketAddr::new(family.ns_addr(), OUTBOUND_PORT);
    let mut s = ns.connect(own).await.unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(STEP, s.read(&mut buf))
        .await
        .expect("meshlet closes the connection");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "answered a redirect loop: {r:?}"
    );
    let text = ns.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_redirect_loops_total{direction="outbound"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

// ===== IPv6 only =====

/// With `net.ipv6.flowlabel_reflect` set, an accepted socket takes on its client's flow label
/// and IP6T_SO_ORIGINAL_DST reports it as the original destination's `sin6_flowinfo`. The
/// service must still be found by its address (a `SocketAddrV6` compares its flowinfo too),
/// not passed through to the virtual address, where nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v6_reflected_flow_labels_do_not_hide_the_service() {
    let test = "v6_reflected_flow_labels_do_not_hide_the_service";
    let family = Family::V6;
    if !can_run(test, family) {
        return;
    }
    let sysctl = "/proc/sys/net/ipv6/flowlabel_reflect";
    if !std::path::Path::new(sysctl).exists() {
        println!("skipping {test}: the kernel has no {sysctl}");
        return;
    }
    let ns = family.netns(family.backend_addrs());
    // Before meshlet starts: a listener takes the setting when it is created. /proc/sys/net
    // opened from inside the namespace is the namespace's own.
    ns.enter(move || {
        std::fs::write("/proc/sys/net/ipv6/auto_flowlabels", "1")?;
        std::fs::write(sysctl, "1")
    })
    .await
    .expect("enable flow label reflection in the namespace");
    let (ns, backends, _meshlet) = setup_in(family, ns).await;

    let vip = family.vip();
    for i in 0..6 {
        let s = ns
            .connect(vip)
            .await
            .expect("connect to the virtual address");
        let mut c = H1Client::over(s).await.unwrap();
        let a = tokio::time::timeout(STEP, c.get(&format!("/label/{i}")))
            .await
            .expect("answer in time")
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.body_text());
        assert!(a.header("x-backend").is_some(), "not from a backend");
    }
    assert_eq!(backends.iter().map(|b| b.hits()).sum::<usize>(), 6);
    let text = ns.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_requests_total{classification="success",direction="outbound",service="web.default",status="200"}"#
        ),
        Some(6.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"meshlet_connections_total{direction="outbound",protocol="passthrough"}"#
        ),
        None,
        "the virtual address was taken for an unknown destination: {text}"
    );
}
