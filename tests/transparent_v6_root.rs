//! Transparent outbound proxying over IPv6 with real ip6tables REDIRECT rules: the IPv6 twin of
//! `transparent_root.rs`. Needs root (network namespaces, ip6tables) and the `ip6tables`,
//! `ip` (iproute2) and `setpriv` (util-linux) tools. Each test skips, with a message, when it
//! cannot run.
//!
//! Every test gets a network namespace of its own with `lo` and a veth pair addressed from the
//! IPv6 benchmarking range 2001:2::/48 (RFC 5180) only: 2001:2::1/64 and the backends'
//! addresses on the interface (without duplicate address detection, so usable at once); the
//! virtual service address 2001:2::10 is on that link but owned by nobody. Inside it: backends,
//! clients, the meshlet binary (as uid 7102, which the rules exempt from redirection) and an
//! ip6tables NAT OUTPUT chain that redirects every other TCP connection, save to ::1, to
//! meshlet's outbound listener [::1]:7140, where IP6T_SO_ORIGINAL_DST gives the destination
//! back. The namespace is removed at the end of the test, also on failure.

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use netns::{Family, MeshletProcess, Netns, OUTBOUND_PORT, STEP, backends, can_run, echo_server};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "[::1]:7190";
/// The namespace's own address (veth `mv0`).
const NS_ADDR: &str = "2001:2::1";
/// A service's virtual address: nothing listens there; only the redirect makes it answer.
const VIP: &str = "[2001:2::10]:80";
const BACKEND_ADDRS: [&str; 3] = ["2001:2::11", "2001:2::12", "2001:2::13"];

/// The test's namespace: 2001:2::1/64 and the backends' addresses on `mv0`, and the
/// ip6tables redirect rules.
fn create_netns() -> Netns {
    let addrs: Vec<&str> = std::iter::once(NS_ADDR)
        .chain(BACKEND_ADDRS.iter().copied())
        .collect();
    Netns::create(Family::V6, &addrs, &[], ADMIN.parse().unwrap())
}

/// The meshlet config: the outbound listener on [::1], an admin server inside the namespace
/// and one static service at the virtual address.
fn config(endpoints: &[SocketAddr]) -> String {
    format!(
        "admin:\n  listen: \"{ADMIN}\"\noutbound:\n  listen: \"[::1]:{OUTBOUND_PORT}\"\n\
         discovery:\n  static:\n    - service: web.default\n      addresses: [\"{VIP}\"]\n      endpoints: {}\n\
         detect:\n  timeout: 100ms\nshutdown_grace: 1s\nworkers: 2\nlog:\n  level: meshlet=debug,info\n",
        yaml_list(endpoints)
    )
}

/// The namespace, its three backends and meshlet in front of them. Dropped in reverse order:
/// meshlet, the backends, then the namespace.
async fn setup() -> (Arc<Netns>, Vec<Backend>, MeshletProcess) {
    setup_in(create_netns()).await
}

async fn setup_in(ns: Netns) -> (Arc<Netns>, Vec<Backend>, MeshletProcess) {
    let ns = Arc::new(ns);
    let backends = backends(&ns, &BACKEND_ADDRS).await;
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    assert!(eps.iter().all(|e| e.is_ipv6()), "{eps:?}");
    let meshlet = MeshletProcess::start(&ns, &config(&eps)).await;
    (ns, backends, meshlet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v6_redirected_virtual_address_is_balanced_over_endpoints() {
    if !can_run(
        "v6_redirected_virtual_address_is_balanced_over_endpoints",
        Family::V6,
    ) {
        return;
    }
    let (ns, backends, meshlet) = setup().await;

    let vip: SocketAddr = VIP.parse().unwrap();
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
    // meshlet read the IPv6 virtual address back as the original destination.
    let log = meshlet.log();
    assert!(log.contains(VIP), "no {VIP} in the meshlet log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v6_unknown_destination_passes_through_unchanged() {
    if !can_run(
        "v6_unknown_destination_passes_through_unchanged",
        Family::V6,
    ) {
        return;
    }
    let (ns, backends, _meshlet) = setup().await;
    let echo_addr = SocketAddr::new(NS_ADDR.parse().unwrap(), 9000);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v6_redirect_loop_to_the_listener_is_refused_and_counted() {
    if !can_run(
        "v6_redirect_loop_to_the_listener_is_refused_and_counted",
        Family::V6,
    ) {
        return;
    }
    let (ns, backends, _meshlet) = setup().await;

    // Straight to the listener's port on the namespace's own address: the REDIRECT brings it
    // back to the listener with the listener's own port as the original destination. Were it
    // proxied, meshlet would connect to itself, over and over.
    // The listener's address itself (::1: not redirected) is refused the same way.
    let own = SocketAddr::new(NS_ADDR.parse().unwrap(), OUTBOUND_PORT);
    let listener: SocketAddr = format!("[::1]:{OUTBOUND_PORT}").parse().unwrap();
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
    let s = ns.connect(VIP.parse().unwrap()).await.unwrap();
    let mut c = H1Client::over(s).await.unwrap();
    let a = tokio::time::timeout(STEP, c.get("/after"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200);
}

/// With `net.ipv6.flowlabel_reflect` set, an accepted socket takes on its client's flow label
/// and IP6T_SO_ORIGINAL_DST reports it as the original destination's `sin6_flowinfo`. The
/// service must still be found by its address (a `SocketAddrV6` compares its flowinfo too),
/// not passed through to the virtual address, where nothing answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v6_reflected_flow_labels_do_not_hide_the_service() {
    let test = "v6_reflected_flow_labels_do_not_hide_the_service";
    if !can_run(test, Family::V6) {
        return;
    }
    let sysctl = "/proc/sys/net/ipv6/flowlabel_reflect";
    if !std::path::Path::new(sysctl).exists() {
        println!("skipping {test}: the kernel has no {sysctl}");
        return;
    }
    let ns = create_netns();
    // Before meshlet starts: a listener takes the setting when it is created. /proc/sys/net
    // opened from inside the namespace is the namespace's own.
    ns.enter(move || {
        std::fs::write("/proc/sys/net/ipv6/auto_flowlabels", "1")?;
        std::fs::write(sysctl, "1")
    })
    .await
    .expect("enable flow label reflection in the namespace");
    let (ns, backends, _meshlet) = setup_in(ns).await;

    let vip: SocketAddr = VIP.parse().unwrap();
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
