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

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;

use netns::{Family, MeshletProcess, Netns, OUTBOUND_PORT, STEP, backends, can_run, echo_server};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "127.0.0.1:7190";
/// The namespace's own address (veth `mv0`).
const NS_ADDR: &str = "198.18.0.1";
/// A service's virtual address: nothing listens there; only the redirect makes it answer.
const VIP: &str = "198.19.0.10:80";

/// The test's namespace: `198.18.0.1/24` plus the backends' addresses on `mv0`, a route for
/// the virtual service range 198.19.0.0/16, and the iptables redirect rules.
fn create_netns(backend_addrs: &[&str]) -> Netns {
    let addrs: Vec<&str> = std::iter::once(NS_ADDR)
        .chain(backend_addrs.iter().copied())
        .collect();
    Netns::create(
        Family::V4,
        &addrs,
        &["198.19.0.0/16"],
        ADMIN.parse().unwrap(),
    )
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

const BACKEND_ADDRS: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_virtual_address_is_balanced_over_endpoints() {
    if !can_run(
        "redirected_virtual_address_is_balanced_over_endpoints",
        Family::V4,
    ) {
        return;
    }
    // Shared with the client tasks; declared first, so dropped (deleted) last.
    let ns = std::sync::Arc::new(create_netns(&BACKEND_ADDRS));
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
        assert!(n >= 3, "backend {} served only {n} of 60: {seen:?}", b.name);
        assert_eq!(b.hits(), n);
    }

    let text = ns.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_requests_total{classification="success",direction="outbound",service="web.default",status="200"}"#
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
    if !can_run("unknown_destination_passes_through_unchanged", Family::V4) {
        return;
    }
    let ns = create_netns(&BACKEND_ADDRS);
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
    if !can_run(
        "redirect_loop_to_the_listener_is_refused_and_counted",
        Family::V4,
    ) {
        return;
    }
    let ns = create_netns(&BACKEND_ADDRS);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_silent_and_unusual_http_clients_stay_http() {
    if !can_run(
        "redirected_silent_and_unusual_http_clients_stay_http",
        Family::V4,
    ) {
        return;
    }
    let ns = create_netns(&BACKEND_ADDRS[..2]);
    let backends = backends(&ns, &BACKEND_ADDRS[..2]).await;
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let _meshlet = MeshletProcess::start(&ns, &config(&eps)).await;
    let vip: SocketAddr = VIP.parse().unwrap();

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
    if !can_run(
        "a_dual_stack_listener_reads_ipv4_original_destinations",
        Family::V4,
    ) {
        return;
    }
    if !std::path::Path::new("/proc/net/if_inet6").exists() {
        println!("skipping a_dual_stack_listener_reads_ipv4_original_destinations: IPv6 disabled");
        return;
    }
    let ns = create_netns(&BACKEND_ADDRS);
    let backends = backends(&ns, &BACKEND_ADDRS).await;
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let yaml = config(&eps).replace(
        &format!("listen: 127.0.0.1:{OUTBOUND_PORT}"),
        &format!("listen: \"[::]:{OUTBOUND_PORT}\""),
    );
    assert!(yaml.contains("[::]"), "{yaml}");
    let meshlet = MeshletProcess::start(&ns, &yaml).await;
    assert!(meshlet.log().contains("IPv4 and IPv6"), "{}", meshlet.log());

    for i in 0..6 {
        let s = ns.connect(VIP.parse().unwrap()).await.unwrap();
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
    let own: SocketAddr = format!("{NS_ADDR}:{OUTBOUND_PORT}").parse().unwrap();
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
