//! Where the inbound listener delivers, and what it never forwards to, through the real
//! transparent inbound path: needs root (network namespaces, iptables) and the `iptables`, `ip`
//! (iproute2) and `setpriv` (util-linux) tools. Each test skips, with a message, when it
//! cannot run.
//!
//! Topology: two namespaces joined by a veth pair, addresses from 198.18.0.0/15 only: the "pod"
//! (198.18.0.1/24), whose NAT rules are written by `meshlet init` itself (the built binary, as
//! the injected init container runs it) and where meshlet runs as uid 7102 with the apps, and a
//! "peer" pod (198.18.0.2/24) whose connections arrive as a remote caller's do, through
//! `PREROUTING` and the redirect to the inbound listener. Both are removed at the end of each
//! test, also on failure.

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use netns::{Family, MeshletProcess, Netns, STEP, can_run};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The pod's address (veth `mv0`): what callers connect to.
const POD: &str = "198.18.0.1";
/// The calling pod's address (veth `mv1`, in a namespace of its own).
const PEER: &str = "198.18.0.2";

/// The sidecar layout's listeners, on the ports `meshlet init` assumes by default.
const SIDECAR: &str = "admin:\n  listen: 0.0.0.0:7190\n  grpc_listen: 0.0.0.0:7191\n\
    outbound:\n  listen: 127.0.0.1:7140\ninbound:\n  listen: 0.0.0.0:7143\n\
    detect:\n  timeout: 100ms\nshutdown_grace: 1s\nworkers: 2\nlog:\n  level: meshlet=debug,info\n";

/// The app's probes (`MESHLET_APP_PROBES`): readyz on the port bound to every address (passes
/// in both modes, so the pod gets ready), livez on the port bound to the pod's address only,
/// startupz on the port bound to loopback only.
const PROBES: &str = r#"{"app": {
    "readyz": {"httpGet": {"path": "/", "port": 8083}},
    "livez": {"httpGet": {"path": "/", "port": 8082}},
    "startupz": {"tcpSocket": {"port": 8081}}}}"#;

/// The pod (its rules by `meshlet init` with its defaults: inbound 7143, outbound 7140, admin
/// 7190 and gRPC health 7191 not redirected, uid 7102 exempt) and the peer pod.
fn pods(admin: &str) -> (Netns, Netns) {
    let pod = Netns::bare(Family::V4, &[POD], &[], admin.parse().unwrap());
    pod.meshlet_init(&[]);
    let peer = pod.peer(PEER);
    (pod, peer)
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::new(POD.parse().unwrap(), port)
}

/// A TCP server in the pod that writes its client's address (as it sees it) and closes.
async fn who(ns: &Netns, addr: &str) -> tokio::task::JoinHandle<()> {
    let l = ns.listen(addr.parse().unwrap()).await;
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            let _ = s.write_all(peer.to_string().as_bytes()).await;
            let _ = s.shutdown().await;
        }
    })
}

/// Connects from the peer pod and reads what the pod answers without being asked: the bytes,
/// or nothing (meshlet closed the connection, by FIN or reset).
async fn read_all(peer: &Netns, dst: SocketAddr) -> String {
    let mut s = peer.connect(dst).await.expect("connect to the pod");
    let mut got = Vec::new();
    match tokio::time::timeout(STEP, s.read_to_end(&mut got))
        .await
        .expect("the pod answers or closes in time")
    {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// An HTTP GET from the peer pod: (status, x-backend, meshlet-error).
async fn get(peer: &Netns, port: u16) -> (u16, Option<String>, Option<String>) {
    let s = peer.connect(at(port)).await.expect("connect to the pod");
    let mut c = H1Client::over(s).await.unwrap();
    let a = tokio::time::timeout(STEP, c.get("/"))
        .await
        .expect("answer in time")
        .expect("an HTTP answer");
    (a.status, a.header("x-backend"), a.header("meshlet-error"))
}

/// Writes `request` from the peer pod to `dst` and returns whatever comes back before the
/// connection ends (nothing, when meshlet refuses it).
async fn exchange(peer: &Netns, dst: SocketAddr, request: &[u8]) -> String {
    let mut s = peer
        .connect(dst)
        .await
        .expect("the redirect accepts the connection");
    let _ = s.write_all(request).await;
    let mut got = Vec::new();
    match tokio::time::timeout(STEP, s.read_to_end(&mut got))
        .await
        .expect("meshlet closes the connection in time")
    {
        Ok(_) => {}
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The text without terminal colour codes (`ESC [ ... m`), which the log may hold.
fn without_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The packets counted by the first rule of a NAT chain (each redirected connection counts
/// its first packet once).
fn redirected(ns: &Netns, chain: &str) -> u64 {
    let rules = ns.nat_counters(chain);
    rules
        .first()
        .map(|r| r.0)
        .unwrap_or_else(|| panic!("{chain} is empty: {rules:?}"))
}

/// The delivery checks of both modes: `loopback` false is the default (the original
/// destination), true the `meshlet.dev/inbound-to-loopback` opt-out, passed as the injector
/// passes it.
async fn delivery(test: &str, loopback: bool) {
    if !can_run(test, Family::V4) {
        return;
    }
    let (pod, peer) = pods("127.0.0.1:7190");
    // The app: one HTTP port bound to loopback only, one to the pod's address only, one to
    // every address; and the same for raw TCP, telling each client its address.
    let _loopback_only = Backend::serve(
        pod.listen("127.0.0.1:8081".parse().unwrap()).await,
        "loopback-only",
        Duration::ZERO,
    );
    let _pod_only = Backend::serve(
        pod.listen(at(8082)).await,
        "pod-address-only",
        Duration::ZERO,
    );
    let _any = Backend::serve(
        pod.listen("0.0.0.0:8083".parse().unwrap()).await,
        "any-address",
        Duration::ZERO,
    );
    let _who_lo = who(&pod, "127.0.0.1:9001").await;
    let _who_any = who(&pod, "0.0.0.0:9002").await;
    let mut env = vec![("POD_IP", POD), ("MESHLET_APP_PROBES", PROBES)];
    if loopback {
        env.push(("MESHLET_INBOUND_TO_LOOPBACK", "true"));
    }
    let m = MeshletProcess::start_with_env(&pod, SIDECAR, &env).await;

    let (lo, pod_addr, any) = (
        get(&peer, 8081).await,
        get(&peer, 8082).await,
        get(&peer, 8083).await,
    );
    println!(
        "8081 (loopback only): {lo:?}\n8082 (pod address only): {pod_addr:?}\n8083 (any): {any:?}"
    );
    assert_eq!((any.0, any.1.as_deref()), (200, Some("any-address")));
    let (reachable, unreachable) = if loopback {
        (lo, pod_addr)
    } else {
        (pod_addr, lo)
    };
    assert_eq!(reachable.0, 200, "{reachable:?}");
    assert!(reachable.1.is_some(), "{reachable:?}");
    // Nothing listens there for meshlet: the app's port is refused, as any unreachable
    // endpoint's (503, with the reason).
    assert_eq!(unreachable.0, 503, "{unreachable:?}");
    let why = unreachable.2.expect("a meshlet-error header");
    assert!(why.contains("Connection refused"), "{why}");

    // Opaque TCP the same way; the app sees the connection come from where it is delivered:
    // the pod's own address, or loopback with the opt-out.
    let (tcp_lo, tcp_any) = (
        read_all(&peer, at(9001)).await,
        read_all(&peer, at(9002)).await,
    );
    println!("9001 (loopback only): {tcp_lo:?}; 9002 (any): {tcp_any:?}");
    let from = if loopback {
        "127.0.0.1:"
    } else {
        "198.18.0.1:"
    };
    assert!(tcp_any.starts_with(from), "{tcp_any}");
    if loopback {
        assert!(tcp_lo.starts_with("127.0.0.1:"), "{tcp_lo}");
    } else {
        assert_eq!(tcp_lo, "", "a loopback-only port answered a remote caller");
    }

    // The app probes go where inbound traffic goes: the pod's address (POD_IP), as kubelet's
    // would without meshlet; loopback with the opt-out.
    let probe = |p: &'static str| {
        let pod = &pod;
        async move {
            pod.admin_get(&format!("/app-health/app/{p}"))
                .await
                .unwrap()
        }
    };
    let (ready, live, startup) = (
        probe("readyz").await,
        probe("livez").await,
        probe("startupz").await,
    );
    println!("probes: readyz {ready:?}, livez {live:?}, startupz {startup:?}");
    assert_eq!(ready.0, 200, "{ready:?}");
    assert_eq!(live.0, if loopback { 503 } else { 200 }, "{live:?}");
    assert_eq!(startup.0, if loopback { 200 } else { 503 }, "{startup:?}");

    // Each of the 5 remote connections was redirected once, in PREROUTING. meshlet's own
    // connections to the pod's address (deliveries and probes) were not redirected again:
    // OUTPUT returns for uid 7102 (and for `lo`), and a locally made connection never meets
    // the nat PREROUTING chain on its way back in through `lo`.
    assert_eq!(redirected(&pod, "MESHLET_IN_REDIRECT"), 5);
    assert_eq!(redirected(&pod, "MESHLET_OUT_REDIRECT"), 0);
    let text = pod.metrics().await;
    for (protocol, n) in [("http1", 3.0), ("tcp", 2.0)] {
        assert_eq!(
            metric(
                &text,
                &format!(
                    r#"meshlet_connections_total{{direction="inbound",protocol="{protocol}"}}"#
                )
            ),
            Some(n),
            "{text}"
        );
    }
    assert_eq!(
        metric(&text, "meshlet_inbound_connections_refused_total"),
        None,
        "{text}"
    );
    if loopback {
        return;
    }

    // A crafted packet: addressed to 198.18.5.5 (not the pod's) but sent to the pod's MAC
    // address. The redirect takes it to the inbound listener all the same; forwarded to its
    // original destination, meshlet would connect anywhere on the caller's behalf. Refused.
    let mac = link_address(&pod, "mv0");
    peer.ip(&["neigh", "add", "198.18.5.5", "lladdr", &mac, "dev", "mv1"]);
    peer.ip(&["route", "add", "198.18.5.5/32", "dev", "mv1"]);
    let answer = exchange(
        &peer,
        "198.18.5.5:8083".parse().unwrap(),
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    assert_eq!(answer, "", "a connection to another address was forwarded");
    assert_eq!(redirected(&pod, "MESHLET_IN_REDIRECT"), 6);
    let text = pod.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_inbound_connections_refused_total{reason="not_local"}"#
        ),
        Some(1.0),
        "{text}"
    );
    drop(m);
}

/// The hardware address of a namespace's interface.
fn link_address(ns: &Netns, dev: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "-o", "link", "show", dev])
        .output()
        .expect("run ip link show");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words.find(|w| *w == "link/ether");
    words
        .next()
        .unwrap_or_else(|| panic!("no link/ether in {text:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_only_app_ports_are_not_reachable_from_other_pods() {
    delivery(
        "loopback_only_app_ports_are_not_reachable_from_other_pods",
        false,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_to_loopback_opt_out_reaches_loopback_ports_again() {
    delivery(
        "inbound_to_loopback_opt_out_reaches_loopback_ports_again",
        true,
    )
    .await
}

/// meshlet's own ports are not the ones `meshlet init` was told (admin 9190 and gRPC health
/// 9191 instead of 7190 and 7191), so the redirect sends them to the inbound listener; an
/// explicit upstream listener on every address too. None is forwarded, in either delivery mode:
/// a remote `POST /shutdown` is refused and meshlet keeps running.
async fn own_ports(test: &str, loopback: bool) {
    if !can_run(test, Family::V4) {
        return;
    }
    let (pod, peer) = pods("127.0.0.1:9190");
    let _app = Backend::serve(
        pod.listen("0.0.0.0:8083".parse().unwrap()).await,
        "app",
        Duration::ZERO,
    );
    let config = format!(
        "admin:\n  listen: 0.0.0.0:9190\n  grpc_listen: 0.0.0.0:9191\n\
         outbound:\n  listen: 127.0.0.1:7140\ninbound:\n  listen: 0.0.0.0:7143\n\
         upstreams:\n  - listen: 0.0.0.0:9300\n    service: web.default\n\
         discovery:\n  static:\n    - service: web.default\n      endpoints: [\"{POD}:8083\"]\n\
         detect:\n  timeout: 100ms\nshutdown_grace: 1s\nworkers: 2\nlog:\n  level: meshlet=debug,info\n"
    );
    let env: &[(&str, &str)] = if loopback {
        &[("MESHLET_INBOUND_TO_LOOPBACK", "true")]
    } else {
        &[]
    };
    let mut m = MeshletProcess::start_with_env(&pod, &config, env).await;

    let shutdown = b"POST /shutdown HTTP/1.1\r\nhost: meshlet\r\ncontent-length: 0\r\n\r\n";
    let get = b"GET /upstream HTTP/1.1\r\nhost: web.default\r\n\r\n";
    // Admin (twice: logged at warn once), gRPC health, outbound, inbound, explicit upstream.
    let attempts: [(u16, &[u8]); 6] = [
        (9190, shutdown),
        (9190, shutdown),
        (9191, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        (7140, get),
        (7143, get),
        (9300, get),
    ];
    for (port, request) in attempts {
        let answer = exchange(&peer, at(port), request).await;
        assert_eq!(answer, "", "port {port} was forwarded to");
    }
    assert!(m.exited().is_none(), "meshlet exited:\n{}", m.log());
    let (status, body) = pod.admin_get("/live").await.unwrap();
    assert_eq!(status, 200, "{body}");
    // The app itself is still reachable from the peer pod.
    let s = peer.connect(at(8083)).await.unwrap();
    let mut c = H1Client::over(s).await.unwrap();
    let a = tokio::time::timeout(STEP, c.get("/"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200);

    let text = pod.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_inbound_connections_refused_total{reason="meshlet_port"}"#
        ),
        Some(6.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"meshlet_connections_total{direction="inbound",protocol="http1"}"#
        ),
        Some(1.0),
        "only the app's connection was proxied: {text}"
    );
    let log = without_ansi(&m.log());
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("meshlet's own port"))
        .collect();
    assert_eq!(warned.len(), 5, "one warning per port: {warned:#?}");
    for port in [9190, 9191, 7140, 7143, 9300] {
        assert!(
            warned.iter().any(|l| l.contains(&format!("port={port}"))),
            "no warning names port {port}: {warned:#?}"
        );
    }

    // The real peer: a process in the pod calling the admin server at the pod's own address
    // (what a forwarded connection would look like now) is not on loopback: 403. On loopback,
    // the shutdown proceeds.
    let post = |addr: SocketAddr| {
        let pod = &pod;
        async move {
            let s = pod.connect(addr).await.unwrap();
            let mut c = H1Client::over(s).await.unwrap();
            let req = Request::post("/shutdown")
                .header("host", "meshlet")
                .body(Full::new(Bytes::new()))
                .unwrap();
            tokio::time::timeout(STEP, c.send(req))
                .await
                .unwrap()
                .unwrap()
        }
    };
    let a = post(at(9190)).await;
    assert_eq!(a.status, 403, "{}", a.body_text());
    assert!(m.exited().is_none(), "meshlet exited:\n{}", m.log());
    let a = post("127.0.0.1:9190".parse().unwrap()).await;
    assert_eq!(a.status, 200, "{}", a.body_text());
    let deadline = Instant::now() + STEP;
    while m.exited().is_none() {
        assert!(
            Instant::now() < deadline,
            "meshlet did not exit after /shutdown:\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_never_forwards_to_meshlets_own_ports() {
    own_ports("inbound_never_forwards_to_meshlets_own_ports", false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_never_forwards_to_meshlets_own_ports_with_the_opt_out() {
    own_ports(
        "inbound_never_forwards_to_meshlets_own_ports_with_the_opt_out",
        true,
    )
    .await
}
