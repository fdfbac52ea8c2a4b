//! Dependency health against real backends on loopback: the health model's states and
//! hysteresis, `/health`, dependency-aware `/ready` and its shared-outage guard, `/live`, and
//! grpc.health.v1 (Check and Watch) with tonic as the client.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet::app::App;
use meshlet::config::Config;
use support::{H1Client, Meshlet, admin_get};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_prost::ProstCodec;

/// Starts meshlet without waiting for `/ready` (which may be meant to fail).
async fn start(yaml: &str) -> Meshlet {
    let config = Config::parse("test.yaml", yaml).expect("valid config");
    Meshlet::spawn(App::bind(config).expect("bind"))
}

/// Polls `f` every 20 ms until it gives a value, failing the test after `limit`.
async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn health(m: &Meshlet) -> serde_json::Value {
    let (status, body) = admin_get(m.addrs.admin, "/health").await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn dep<'a>(h: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    h["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no dependency {name} in {h:#}"))
}

async fn status(m: &Meshlet, path: &str) -> (u16, String) {
    admin_get(m.addrs.admin, path).await.unwrap()
}

/// An HTTP backend that can be killed (listener and open connections) and restarted on the
/// same port.
struct Killable {
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    conns: std::sync::Arc<std::sync::Mutex<JoinSet<()>>>,
}

impl Killable {
    async fn start(addr: SocketAddr) -> Killable {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let c = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let svc = service_fn(|_: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                c.lock().unwrap().spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Killable {
            addr,
            accept: Some(accept),
            conns,
        }
    }

    async fn kill(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
            let _ = a.await;
        }
        let mut set = std::mem::take(&mut *self.conns.lock().unwrap());
        set.shutdown().await;
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        if let Some(a) = &self.accept {
            a.abort();
        }
        self.conns.lock().unwrap().abort_all();
    }
}

/// `n` GET requests through the upstream listener; the statuses.
async fn requests(addr: SocketAddr, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    let mut c = H1Client::connect(addr).await.unwrap();
    for _ in 0..n {
        out.push(c.get("/").await.unwrap().status);
    }
    out
}

fn outage_config(backend: SocketAddr, ready_requires: &str) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:0\nupstreams:\n  - listen: 127.0.0.1:0\n    service: web.default\n\
         discovery:\n  static:\n    - service: web.default\n      endpoints: [\"{backend}\"]\n      policy:\n        breaker_backoff: 100ms\n        breaker_backoff_max: 200ms\n\
         health:\n  critical: [web.default]\n  ready_requires: {ready_requires}\n  hysteresis: 300ms\n  outage_grace: 30s\nshutdown_grace: 1s\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_outage_and_recovery_with_ready_requires_critical() {
    let mut b = Killable::start("127.0.0.1:0".parse().unwrap()).await;
    let m = start(&outage_config(b.addr, "critical")).await;
    m.wait_ready().await;
    let up = m.upstream(0);
    assert!(requests(up, 20).await.iter().all(|s| *s == 200));
    wait_for("healthy", Duration::from_secs(5), || async {
        (dep(&health(&m).await, "web.default")["state"] == "healthy").then_some(())
    })
    .await;

    // The backend goes away: requests fail, the breaker ejects the endpoint.
    b.kill().await;
    let killed = Instant::now();
    let statuses = requests(up, 15).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    let h = wait_for("unhealthy", Duration::from_secs(5), || async {
        let h = health(&m).await;
        (dep(&h, "web.default")["state"] == "unhealthy").then_some(h)
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "unhealthy after {took:?}: before the hysteresis"
    );
    let d = dep(&h, "web.default");
    let reason = d["reason"].as_str().unwrap();
    assert!(
        reason == "1 of 1 endpoints ejected" || reason.starts_with("success rate"),
        "{d:#}"
    );
    assert_eq!(d["critical"], true);
    assert_eq!(d["endpoints"]["total"], 1);
    assert!(
        d["last_error"].as_str().unwrap().contains("web.default"),
        "{d:#}"
    );
    assert_eq!(h["status"], "unavailable");
    let (code, body) = status(&m, "/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("critical dependency web.default unhealthy"),
        "{body}"
    );
    assert_eq!(
        status(&m, "/live").await.0,
        200,
        "/live never follows dependencies"
    );
    let (_, text) = status(&m, "/health?format=text").await;
    assert!(text.contains("web.default (critical): unhealthy"), "{text}");
    let metrics = m.metrics().await;
    assert!(
        metrics
            .contains("meshlet_dependency_state{dependency=\"web.default\",state=\"unhealthy\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "meshlet_dependency_transitions_total{dependency=\"web.default\",to=\"unhealthy\"} 1"
        ),
        "{metrics}"
    );

    // Back on the same port: the breaker's probe restores it, successes outweigh the failures.
    let _b2 = Killable::start(b.addr).await;
    wait_for(
        "requests to succeed again",
        Duration::from_secs(5),
        || async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            (requests(up, 1).await == [200]).then_some(())
        },
    )
    .await;
    assert!(requests(up, 300).await.iter().all(|s| *s == 200));
    let h = wait_for("healthy again", Duration::from_secs(5), || async {
        let h = health(&m).await;
        (dep(&h, "web.default")["state"] == "healthy").then_some(h)
    })
    .await;
    assert_eq!(h["status"], "healthy", "{h:#}");
    assert_eq!(status(&m, "/ready").await.0, 200);
    assert_eq!(status(&m, "/live").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_requires_none_reports_but_never_gates() {
    let mut b = Killable::start("127.0.0.1:0".parse().unwrap()).await;
    let m = start(&outage_config(b.addr, "none")).await;
    m.wait_ready().await;
    let up = m.upstream(0);
    b.kill().await;
    requests(up, 15).await;
    let h = wait_for("unhealthy", Duration::from_secs(5), || async {
        let h = health(&m).await;
        (dep(&h, "web.default")["state"] == "unhealthy").then_some(h)
    })
    .await;
    assert_eq!(
        dep(&h, "web.default")["readiness"],
        "not gating readiness: health.ready_requires is none"
    );
    assert_eq!(h["status"], "degraded", "{h:#}");
    let (code, body) = status(&m, "/ready").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("web.default unhealthy"), "{body}");
    assert_eq!(status(&m, "/live").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_outage_stops_gating_readiness_after_the_grace() {
    // db.default is declared critical and has no endpoints at all: unhealthy from the start.
    let m = start(
        "admin:\n  listen: 127.0.0.1:0\nhealth:\n  dependencies: [db.default]\n  critical: [db.default]\n  ready_requires: critical\n  hysteresis: 300ms\n  outage_grace: 1s\n",
    )
    .await;
    let started = Instant::now();
    let body = wait_for("/ready to fail", Duration::from_secs(5), || async {
        let (code, body) = status(&m, "/ready").await;
        (code == 503 && body.contains("critical dependency db.default unhealthy: no endpoints"))
            .then_some(body)
    })
    .await;
    assert!(!body.contains("outage"), "{body}");
    let h = health(&m).await;
    assert_eq!(dep(&h, "db.default")["reason"], "no endpoints");
    assert_eq!(dep(&h, "db.default")["readiness"], "gating readiness");

    // After the grace, the dependency still down: reported, but no longer failing readiness.
    let body = wait_for("/ready to pass again", Duration::from_secs(5), || async {
        let (code, body) = status(&m, "/ready").await;
        (code == 200).then_some(body)
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the guard let go before the grace"
    );
    assert!(
        body.contains("critical dependency db.default unhealthy")
            && body.contains("outage: not gating readiness"),
        "{body}"
    );
    let h = health(&m).await;
    let d = dep(&h, "db.default");
    assert_eq!(d["state"], "unhealthy");
    assert_eq!(d["readiness"], "outage: not gating readiness");
    assert_eq!(h["status"], "degraded");
    assert_eq!(status(&m, "/live").await.0, 200);
}

// ===== gRPC health =====

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

async fn grpc_client(addr: SocketAddr) -> tonic::client::Grpc<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC health port");
    tonic::client::Grpc::new(channel)
}

async fn check(c: &mut tonic::client::Grpc<Channel>, service: &str) -> Result<i32, tonic::Status> {
    c.ready().await.unwrap();
    let rsp = c
        .unary(
            tonic::Request::new(HealthCheckRequest {
                service: service.into(),
            }),
            PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
            ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default(),
        )
        .await?;
    Ok(rsp.into_inner().status)
}

/// A Watch of "" (overall readiness).
async fn watch_overall(
    mut c: tonic::client::Grpc<Channel>,
) -> tonic::Streaming<HealthCheckResponse> {
    c.ready().await.unwrap();
    c.server_streaming(
        tonic::Request::new(HealthCheckRequest::default()),
        PathAndQuery::from_static("/grpc.health.v1.Health/Watch"),
        ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default(),
    )
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_check_and_watch() {
    let b = Killable::start("127.0.0.1:0".parse().unwrap()).await;
    let m = start(&format!(
        "admin:\n  listen: 127.0.0.1:0\n  grpc_listen: 127.0.0.1:0\n\
         discovery:\n  static:\n    - service: web.default\n      endpoints: [\"{}\"]\n\
         health:\n  dependencies: [web.default, db.default]\n  critical: [db.default]\n  ready_requires: critical\n  hysteresis: 300ms\n  outage_grace: 1500ms\n",
        b.addr
    ))
    .await;
    let addr = m.addrs.grpc.expect("gRPC health listener");
    let mut c = grpc_client(addr).await;

    // Watch "" from the start: NOT_SERVING (db.default has no endpoints), then SERVING once
    // the shared-outage guard lets go.
    let w = c.clone();
    let watch = tokio::spawn(async move {
        let mut s = watch_overall(w).await;
        let mut got = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            got.push(m.status);
            if m.status == SERVING {
                break;
            }
        }
        got
    });

    wait_for("db.default to be known", Duration::from_secs(5), || async {
        let h = health(&m).await;
        (h["dependencies"].as_array().unwrap().len() == 2).then_some(())
    })
    .await;
    assert_eq!(check(&mut c, "meshlet.live").await.unwrap(), SERVING);
    assert_eq!(check(&mut c, "web.default").await.unwrap(), SERVING);
    assert_eq!(check(&mut c, "db.default").await.unwrap(), NOT_SERVING);
    let e = check(&mut c, "nope.default").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    let got = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("Watch saw the change in time")
        .unwrap();
    assert_eq!(got, vec![NOT_SERVING, SERVING]);
    assert_eq!(check(&mut c, "").await.unwrap(), SERVING);
    // Still down: the dependency itself is not serving.
    assert_eq!(check(&mut c, "db.default").await.unwrap(), NOT_SERVING);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_app_readiness_probe() {
    // A port nothing listens on: the app is not ready.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let config = Config::parse("test.yaml", "admin:\n  listen: 127.0.0.1:0\n").unwrap();
    let mut app = App::bind(config).expect("bind");
    app.set_app_probes(Some(
        meshlet::ops::health::probes::AppProbes::parse(&format!(
            r#"{{"app": {{"readyz": {{"tcpSocket": {{"port": {port}}}}}, "livez": {{"tcpSocket": {{"port": {port}}}}}}}}}"#
        ))
        .unwrap(),
    ));
    let m = Meshlet::spawn(app);
    let body = wait_for(
        "/ready to fail on the app",
        Duration::from_secs(5),
        || async {
            let (code, body) = status(&m, "/ready").await;
            (code == 503 && body.contains("app container \"app\" readyz failed")).then_some(body)
        },
    )
    .await;
    assert!(!body.contains("waiting for"), "{body}");
    let h = health(&m).await;
    assert_eq!(h["status"], "unavailable");
    assert_eq!(h["proxy"]["ready"], true);
    let probes = h["app_probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2, "{h:#}");
    assert!(probes.iter().all(|p| p["success"] == false), "{h:#}");
    assert_eq!(status(&m, "/live").await.0, 200);

    // The app comes up: ready.
    let _app = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    assert_eq!(status(&m, "/ready").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watchers_share_one_evaluation_per_tick() {
    // The app's readiness probe is a TCP connect to a listener that counts them: each
    // evaluation of "" runs it once.
    let app_port = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = app_port.local_addr().unwrap().port();
    let probes = Arc::new(AtomicUsize::new(0));
    let p = probes.clone();
    let counter = tokio::spawn(async move {
        while let Ok((s, _)) = app_port.accept().await {
            p.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let config = Config::parse(
        "test.yaml",
        "admin:\n  listen: 127.0.0.1:0\n  grpc_listen: 127.0.0.1:0\n",
    )
    .unwrap();
    let mut app = App::bind(config).expect("bind");
    app.set_app_probes(Some(
        meshlet::ops::health::probes::AppProbes::parse(&format!(
            r#"{{"app": {{"readyz": {{"tcpSocket": {{"port": {port}}}}}}}}}"#
        ))
        .unwrap(),
    ));
    let m = Meshlet::spawn(app);
    let addr = m.addrs.grpc.expect("gRPC health listener");
    let c = grpc_client(addr).await;
    let mut watchers = Vec::new();
    for _ in 0..20 {
        let mut s = watch_overall(c.clone()).await;
        let first = s.message().await.unwrap().expect("the current status");
        assert_eq!(first.status, SERVING);
        watchers.push(s);
    }
    // Four seconds of watching: about one evaluation a second in all (each tick, and each
    // publish of the dependency model), not one per watcher per second (80 and more).
    let before = probes.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = probes.load(Ordering::SeqCst) - before;
    println!("20 watchers, 4 s: {during} evaluations of the readiness probe");
    assert!(
        during >= 2,
        "the table is re-evaluated while watched: {during}"
    );
    assert!(during <= 16, "{during} evaluations for 20 watchers in 4 s");
    drop(watchers);
    counter.abort();
}
