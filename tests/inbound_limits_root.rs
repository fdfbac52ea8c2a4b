//! Inbound concurrency and rate limits through the real transparent inbound path: needs root
//! (network namespaces, iptables) and the `iptables`, `ip` (iproute2) and `setpriv`
//! (util-linux) tools. Each test skips, with a message, when it cannot run.
//!
//! Each test gets a network namespace of its own (see `support/netns.rs`) where the local app
//! listens on the pod's address 198.18.0.1:8080 and connections to it are redirected (iptables
//! NAT) to meshlet's inbound listener 127.0.0.1:7150, as a sidecar's inbound rules do, save
//! meshlet's own; meshlet, the binary, runs as uid 7102 and delivers to the original
//! destination, 198.18.0.1:8080.

#[path = "support/netns.rs"]
mod netns;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use netns::{Family, MeshletProcess, Netns, STEP, can_run};
use support::*;

const ADMIN: &str = "127.0.0.1:7190";
/// The pod's address (veth `mv0`): what clients connect to.
const POD_ADDR: &str = "198.18.0.1";
const APP_PORT: u16 = 8080;
const INBOUND_PORT: u16 = 7150;

/// The namespace, with the inbound redirect on top of the outbound rules `Netns::create` adds:
/// connections to the app's port on the pod address go to the inbound listener. OUTPUT for
/// clients inside the namespace (the ones these tests have), except meshlet's own (uid 7102:
/// its delivery to that very address), PREROUTING for any from outside.
fn create_netns() -> Netns {
    let ns = Netns::create(Family::V4, &[POD_ADDR], &[], ADMIN.parse().unwrap());
    let (port, to) = (APP_PORT.to_string(), INBOUND_PORT.to_string());
    let uid = netns::MESHLET_UID.to_string();
    ns.iptables(&[
        "-I",
        "OUTPUT",
        "1",
        "-m",
        "owner",
        "!",
        "--uid-owner",
        &uid,
        "-p",
        "tcp",
        "-d",
        POD_ADDR,
        "--dport",
        &port,
        "-j",
        "REDIRECT",
        "--to-ports",
        &to,
    ]);
    ns.iptables(&[
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        &port,
        "-j",
        "REDIRECT",
        "--to-ports",
        &to,
    ]);
    ns
}

fn config(limits: &str) -> String {
    format!(
        "admin:\n  listen: {ADMIN}\ninbound:\n  listen: 127.0.0.1:{INBOUND_PORT}\n{limits}\
         detect:\n  timeout: 5s\nshutdown_grace: 1s\nworkers: 2\nlog:\n  level: meshlet=debug,info\n"
    )
}

fn pod() -> SocketAddr {
    format!("{POD_ADDR}:{APP_PORT}").parse().unwrap()
}

/// The local app inside the namespace, on the pod's address.
async fn app(ns: &Netns, delay: Duration) -> Backend {
    let l = ns.listen(pod()).await;
    Backend::serve(l, "app", delay)
}

/// An h2c connection to the pod (through the redirect).
async fn h2(ns: &Netns) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = ns.connect(pod()).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// A unary gRPC-shaped call (an empty message): the answer.
async fn grpc_call(sender: &hyper::client::conn::http2::SendRequest<Full<Bytes>>) -> Answer {
    let req = Request::post(format!("http://{POD_ADDR}:{APP_PORT}/test.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let mut s = sender.clone();
    tokio::time::timeout(STEP, async {
        s.ready().await.unwrap();
        collect(s.send_request(req).await.unwrap()).await.unwrap()
    })
    .await
    .expect("gRPC answer in time")
}

/// `n` HTTP/1.1 connections to the pod, opened before any request is sent.
async fn clients(ns: &Netns, n: usize) -> Vec<H1Client> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(
            H1Client::over(ns.connect(pod()).await.unwrap())
                .await
                .unwrap(),
        );
    }
    v
}

/// Sends one GET on each client at once: (status, meshlet-error, time to answer) in order.
async fn fire(clients: Vec<H1Client>, path: &str) -> Vec<(u16, Option<String>, Duration)> {
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let path = path.to_string();
            tokio::spawn(async move {
                let t = Instant::now();
                let a = tokio::time::timeout(STEP, c.get(&path))
                    .await
                    .expect("answer in time")
                    .unwrap();
                (a.status, a.header("meshlet-error"), t.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_concurrency_limit_refuses_at_once() {
    if !can_run("inbound_concurrency_limit_refuses_at_once", Family::V4) {
        return;
    }
    let ns = create_netns();
    let app = app(&ns, Duration::from_millis(500)).await;
    let _meshlet = MeshletProcess::start(&ns, &config("  concurrency_limit: 2\n")).await;
    let refused = Some(format!(
        "inbound concurrency limit reached for app:{APP_PORT}"
    ));

    // 5 slow requests at once: 2 reach the app, 3 are refused at once.
    let answers = fire(clients(&ns, 5).await, "/slow").await;
    println!("5 concurrent requests, limit 2: {answers:?}");
    let ok: Vec<_> = answers.iter().filter(|a| a.0 == 200).collect();
    let no: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!((ok.len(), no.len()), (2, 3), "{answers:?}");
    for a in &ok {
        assert!(a.2 >= Duration::from_millis(500), "{a:?}");
    }
    for a in &no {
        assert_eq!(a.1, refused);
        assert!(
            a.2 < Duration::from_millis(250),
            "not refused at once: {a:?}"
        );
    }
    assert_eq!(app.hits(), 2);

    // While two requests hold the limit, a gRPC client is told RESOURCE_EXHAUSTED.
    let holders = tokio::spawn(fire(clients(&ns, 2).await, "/hold"));
    eventually("two requests at the app", STEP, || {
        let n = app.hits();
        async move { n == 4 }
    })
    .await;
    let sender = h2(&ns).await;
    let a = grpc_call(&sender).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("grpc-status").as_deref(), Some("8"));
    assert_eq!(a.header("meshlet-error"), refused);
    assert!(holders.await.unwrap().iter().all(|a| a.0 == 200));

    // The slots are free again.
    let answers = fire(clients(&ns, 2).await, "/after").await;
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");

    let text = ns.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_inbound_refused_total{limit="concurrency"}"#
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"meshlet_inbound_refused_total{limit="rate"}"#),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_rate_limit_lets_the_burst_through() {
    if !can_run("inbound_rate_limit_lets_the_burst_through", Family::V4) {
        return;
    }
    let ns = create_netns();
    let app = app(&ns, Duration::ZERO).await;
    let _meshlet =
        MeshletProcess::start(&ns, &config("  rate_limit: 10\n  rate_limit_burst: 5\n")).await;
    let refused = Some(format!("inbound rate limit reached for app:{APP_PORT}"));

    // 20 requests at once against 10/s with a burst of 5: the burst, and a token per 100 ms
    // the volley took.
    let conns = clients(&ns, 20).await;
    let start = Instant::now();
    let answers = fire(conns, "/burst").await;
    let took = start.elapsed();
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    for a in answers.iter().filter(|a| a.0 != 200) {
        assert_eq!(a.0, 503);
        assert_eq!(a.1, refused);
    }
    let most = 5 + (took.as_secs_f64() * 10.0).ceil() as usize;
    println!("20 requests at once, 10/s burst 5: {ok} admitted in {took:?} (at most {most})");
    assert!((5..=most).contains(&ok), "{ok} admitted: {answers:?}");
    assert_eq!(app.hits(), ok);

    // gRPC callers over the rate get RESOURCE_EXHAUSTED.
    let sender = h2(&ns).await;
    let start = Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let s = sender.clone();
            tokio::spawn(async move { grpc_call(&s).await })
        })
        .collect();
    let mut grpc_refused = 0;
    for c in calls {
        let a = c.await.unwrap();
        if a.header("grpc-status").as_deref() == Some("8") {
            assert_eq!(a.status, 200);
            assert_eq!(a.header("meshlet-error"), refused);
            grpc_refused += 1;
        } else {
            assert_eq!(a.header("x-backend").as_deref(), Some("app"), "admitted");
        }
    }
    let took = start.elapsed();
    println!("10 gRPC calls right after: {grpc_refused} RESOURCE_EXHAUSTED in {took:?}");
    assert!(
        10 - grpc_refused <= 1 + (took.as_secs_f64() * 10.0).ceil() as usize,
        "{grpc_refused} refused"
    );

    let text = ns.metrics().await;
    assert_eq!(
        metric(&text, r#"meshlet_inbound_refused_total{limit="rate"}"#),
        Some((20 - ok + grpc_refused) as f64),
        "{text}"
    );
}
