//! Resilience as a client sees it: circuit breaking, fast failure, recovery, deduplication,
//! retries (and what is never retried), timeouts. Real sockets on 127.0.0.1 only: meshlet runs
//! in-process in front of backends that inject faults (error statuses, latency, connections
//! reset or killed mid-request, listeners gone).
//!
//! The tests in this file run one at a time (a file-wide lock): several measure latencies and
//! time gaps, which a neighbour's load on a small machine would blur.

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Tests run one at a time (see the module comment).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ===== fault-injecting backends =====

type Rsp = Response<BoxBody<Bytes, Infallible>>;
type Handler = Arc<dyn Fn(Hit) -> Pin<Box<dyn Future<Output = Rsp> + Send>> + Send + Sync>;

/// One request as a backend received it.
struct Hit {
    /// 1 for the backend's first request, 2 for the next...
    n: usize,
    method: Method,
    /// Path and query.
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Hit) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Rsp> + Send + 'static,
{
    Arc::new(move |h| Box::pin(f(h)))
}

fn text(status: u16, body: impl Into<Bytes>) -> Rsp {
    Response::builder()
        .status(status)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

/// Answers 200 with `name` (or the request body, echoed, if it has one).
fn ok(name: &'static str) -> Handler {
    handler(move |h| async move {
        let body = if h.body.is_empty() {
            Bytes::from_static(name.as_bytes())
        } else {
            h.body
        };
        text(200, body)
    })
}

/// Answers `status` to everything.
fn status(status: u16) -> Handler {
    handler(move |_| async move { text(status, "failing\n") })
}

/// Sleeps `d`, then answers 200 with `name`.
fn slow(name: &'static str, d: Duration) -> Handler {
    handler(move |_| async move {
        tokio::time::sleep(d).await;
        text(200, name)
    })
}

/// An HTTP/1.1 and h2c backend whose answers come from a [`Handler`]. It counts its requests
/// and the instants they arrived, and it can be killed: its listener and every connection it
/// holds are closed at once, in-flight requests included.
struct FaultBackend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    times: Arc<Mutex<Vec<Instant>>>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl FaultBackend {
    async fn start(h: Handler) -> FaultBackend {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), h)
    }

    /// A new backend on the address of a killed one.
    fn start_at(addr: SocketAddr, h: Handler) -> FaultBackend {
        let s = TcpSocket::new_v4().unwrap();
        s.set_reuseaddr(true).unwrap();
        s.bind(addr).unwrap();
        Self::serve(s.listen(1024).unwrap(), h)
    }

    fn serve(listener: TcpListener, h: Handler) -> FaultBackend {
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let times = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (hits2, times2, conns2) = (hits.clone(), times.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, hits, times) = (h.clone(), hits2.clone(), times2.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (h, hits, times) = (h.clone(), hits.clone(), times.clone());
                    async move {
                        times.lock().unwrap().push(Instant::now());
                        let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let hit = Hit {
                            n,
                            method: parts.method,
                            path: parts
                                .uri
                                .path_and_query()
                                .map_or("/".into(), |p| p.to_string()),
                            headers: parts.headers,
                            body,
                        };
                        Ok::<_, Infallible>(h(hit).await)
                    }
                });
                let mut set = conns2.lock().unwrap();
                while set.try_join_next().is_some() {}
                set.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FaultBackend {
            addr,
            hits,
            times,
            accept: Some(accept),
            conns,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn times(&self) -> Vec<Instant> {
        self.times.lock().unwrap().clone()
    }

    /// Closes the listener and every open connection (in-flight requests get no answer).
    /// Returns once they are closed.
    async fn kill(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
            let _ = a.await;
        }
        let mut set = std::mem::take(&mut *self.conns.lock().unwrap());
        set.shutdown().await;
    }
}

impl Drop for FaultBackend {
    fn drop(&mut self) {
        if let Some(a) = &self.accept {
            a.abort();
        }
        self.conns.lock().unwrap().abort_all();
    }
}

/// A raw TCP backend that reads one request (head and Content-Length body) and resets the
/// connection (RST) without answering.
struct ResetBackend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl ResetBackend {
    async fn start() -> ResetBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    if read_request(&mut s).await.is_some() {
                        h.fetch_add(1, Ordering::SeqCst);
                    }
                    // SO_LINGER 0: close() sends RST.
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    drop(s);
                });
            }
        });
        ResetBackend { addr, hits, accept }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for ResetBackend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Reads one HTTP/1.1 request with a Content-Length body (or none): its head, or None.
async fn read_request(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(head)
}

/// An address where nothing listens (connections are refused).
fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

// ===== meshlet config, clients, metrics =====

/// One upstream listener per service (in order: `m.upstream(i)` is service i), each service
/// static with its endpoints and its `policy:` (a YAML flow map, or empty).
fn config(defaults: &str, services: &[(&str, &[SocketAddr], &str)]) -> String {
    let mut y = String::from("admin:\n  listen: 127.0.0.1:0\n");
    if !defaults.is_empty() {
        y += &format!("defaults: {defaults}\n");
    }
    y += "upstreams:\n";
    for (s, _, _) in services {
        y += &format!("  - listen: 127.0.0.1:0\n    service: {s}\n");
    }
    y += "discovery:\n  static:\n";
    for (s, eps, policy) in services {
        y += &format!("    - service: {s}\n      endpoints: {}\n", yaml_list(eps));
        if !policy.is_empty() {
            y += &format!("      policy: {policy}\n");
        }
    }
    // Clients here may connect a while before they send (to fire many requests at once):
    // protocol detection must wait for them.
    y += "detect:\n  timeout: 5s\nshutdown_grace: 1s\n";
    y
}

fn req(method: Method, host: &str, path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(body.into()))
        .unwrap()
}

async fn get(c: &mut H1Client, host: &str, path: &str) -> Answer {
    c.send(req(Method::GET, host, path, "")).await.unwrap()
}

/// An h2c connection for requests with custom heads (gRPC).
async fn h2_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// A unary gRPC-shaped request (an empty message) over h2c.
fn grpc_request(authority: &str, grpc_timeout: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("http://{authority}/test.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = grpc_timeout {
        b = b.header("grpc-timeout", t);
    }
    b.body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap()
}

/// The sum of the samples of `name` whose labels include all of `labels` (None: no sample).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((head, value)) = l.rsplit_once(' ') else {
            continue;
        };
        let (n, rest) = head.split_once('{').unwrap_or((head, "}"));
        if n != name {
            continue;
        }
        let set = rest.strip_suffix('}').unwrap_or(rest);
        let pairs: Vec<&str> = set.split("\",").map(|p| p.trim_end_matches('"')).collect();
        if labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}").as_str()))
        {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap();
        }
    }
    found
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

// ===== 1. one failing endpoint of three =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoint_is_ejected_and_probed_once_per_backoff() {
    let _serial = SERIAL.lock().await;
    let a = FaultBackend::start(ok("a")).await;
    let b = FaultBackend::start(ok("b")).await;
    let bad = FaultBackend::start(status(503)).await;
    let m = Meshlet::start(&config(
        "{breaker_backoff: 200ms, breaker_backoff_max: 200ms}",
        &[("web.default", &[a.addr, b.addr, bad.addr], "")],
    ))
    .await;

    // Until the breaker trips: one request at a time, so that the failing endpoint's 7th
    // failure is recorded before anything else is sent (no request is in flight to it when it
    // is ejected). Each 503 is retried on another endpoint: the client sees 200s only.
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    let mut before = 0;
    while bad.hits() < 7 {
        assert!(
            before < 5000,
            "the failing endpoint got {} requests",
            bad.hits()
        );
        let r = get(&mut c, "web.default", "/").await;
        assert_eq!(r.status, 200, "{:?}", r.body_text());
        before += 1;
    }
    let text = m.metrics().await;
    let ejected = [("service", "web.default"), ("transition", "ejected")];
    assert_eq!(
        sample(&text, "meshlet_breaker_transitions_total", &ejected),
        Some(1.0),
        "{text}"
    );
    let bad_label = bad.addr.to_string();
    let bad_state = [("service", "web.default"), ("endpoint", bad_label.as_str())];
    assert_eq!(
        sample(&text, "meshlet_endpoint_breaker_state", &bad_state),
        Some(1.0)
    );
    let tripped = bad.times()[6];

    // 10,000 GETs from 4 keep-alive clients, going on (if they are that fast) until 2 s have
    // passed, so that the probe schedule is seen over a useful window.
    let started = Arc::new(AtomicUsize::new(0));
    let oks = Arc::new(AtomicUsize::new(0));
    let load_start = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (started, oks, addr) = (started.clone(), oks.clone(), m.upstream(0));
            tokio::spawn(async move {
                let mut c = H1Client::connect(addr).await.unwrap();
                loop {
                    let elapsed = load_start.elapsed();
                    let n = started.load(Ordering::SeqCst);
                    if (n >= 10_000 && elapsed >= Duration::from_secs(2))
                        || elapsed >= Duration::from_secs(15)
                    {
                        return;
                    }
                    started.fetch_add(1, Ordering::SeqCst);
                    if get(&mut c, "web.default", "/").await.status == 200 {
                        oks.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in clients {
        t.await.unwrap();
    }
    let load_end = Instant::now();
    let (total, oks) = (started.load(Ordering::SeqCst), oks.load(Ordering::SeqCst));
    let share = oks as f64 / total as f64;
    println!(
        "one endpoint of three failing: {oks} of {total} GETs answered 200 ({:.3}%) in {:?} \
         (plus {before} before the breaker tripped)",
        share * 100.0,
        load_end - load_start
    );
    assert!(total >= 10_000, "only {total} requests sent");
    assert!(share >= 0.999, "{oks} of {total} succeeded");

    // Every request the failing endpoint got since it was ejected is a probe: one per backoff
    // (200 ms, +/- 10% jitter), never two within one.
    let times = bad.times();
    let probes = &times[7..];
    let mut marks = vec![tripped];
    marks.extend_from_slice(probes);
    let gaps: Vec<Duration> = marks.windows(2).map(|w| w[1] - w[0]).collect();
    let ms: Vec<u128> = gaps.iter().map(|g| g.as_millis()).collect();
    let window = load_end - tripped;
    println!(
        "probes: {} over {window:?} since the ejection (backoff 200 ms: ~{:.1} expected); \
         gaps (ms): {ms:?}",
        probes.len(),
        window.as_secs_f64() / 0.2
    );
    for g in &gaps {
        assert!(
            *g >= Duration::from_millis(180),
            "two probes within one backoff: gaps {ms:?}"
        );
        assert!(
            *g <= Duration::from_millis(350),
            "a probe came late: gaps {ms:?}"
        );
    }
    let expected = window.as_secs_f64() / 0.2;
    assert!(
        (probes.len() as f64) >= expected * 200.0 / 350.0 - 1.0
            && (probes.len() as f64) <= expected * 200.0 / 180.0 + 1.0,
        "{} probes over {window:?}",
        probes.len()
    );

    let text = m.metrics().await;
    assert_eq!(
        sample(&text, "meshlet_breaker_transitions_total", &ejected),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "meshlet_breaker_transitions_total",
            &[("service", "web.default"), ("transition", "probe_failed")]
        ),
        Some(probes.len() as f64),
        "every probe failed and was counted: {text}"
    );
    assert_eq!(
        sample(&text, "meshlet_endpoint_breaker_state", &bad_state),
        Some(1.0),
        "still ejected"
    );
    for good in [&a, &b] {
        let l = good.addr.to_string();
        let s = [("service", "web.default"), ("endpoint", l.as_str())];
        assert_eq!(
            sample(&text, "meshlet_endpoint_breaker_state", &s).unwrap_or(0.0),
            0.0
        );
    }
}

// ===== 2. every endpoint down =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_endpoints_down_fail_fast_and_recover() {
    let _serial = SERIAL.lock().await;
    let mut backends = vec![
        FaultBackend::start(ok("a")).await,
        FaultBackend::start(ok("b")).await,
        FaultBackend::start(ok("c")).await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let m = Meshlet::start(&config(
        "",
        &[(
            "web.default",
            &addrs,
            "{breaker_backoff: 200ms, breaker_backoff_max: 200ms}",
        )],
    ))
    .await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    for _ in 0..30 {
        assert_eq!(get(&mut c, "web.default", "/").await.status, 200);
    }

    // Every backend dies: connections are refused from now on.
    for b in &mut backends {
        b.kill().await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut tries = 0;
    loop {
        let r = get(&mut c, "web.default", "/").await;
        assert_eq!(r.status, 503, "{}", r.body_text());
        tries += 1;
        if r.header("meshlet-error").as_deref() == Some("no available endpoints for web.default") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the breakers did not eject every endpoint"
        );
    }
    println!("every endpoint ejected after {tries} failed requests");
    let text = m.metrics().await;
    for a in &addrs {
        let l = a.to_string();
        assert_eq!(
            sample(
                &text,
                "meshlet_endpoint_breaker_state",
                &[("service", "web.default"), ("endpoint", l.as_str())]
            ),
            Some(1.0),
            "{a} ejected: {text}"
        );
    }

    // Now every answer is a fast 503 from meshlet itself. A request that happens to take an
    // endpoint's probe (one per 200 ms each) tries to connect first and names the refusal.
    let mut lat = Vec::with_capacity(500);
    let (mut unavailable, mut probed) = (0, 0);
    for _ in 0..500 {
        let t = Instant::now();
        let r = get(&mut c, "web.default", "/").await;
        lat.push(t.elapsed());
        assert_eq!(r.status, 503);
        let e = r.header("meshlet-error").unwrap();
        if e == "no available endpoints for web.default" {
            unavailable += 1;
        } else {
            assert!(
                e.starts_with("no reachable endpoint for web.default (connect to"),
                "{e}"
            );
            probed += 1;
        }
    }
    lat.sort();
    let (p50, p99, max) = (percentile(&lat, 0.5), percentile(&lat, 0.99), lat[499]);
    println!(
        "all endpoints down: 500 requests, p50 {p50:?}, p99 {p99:?}, max {max:?}; \
         {unavailable} \"no available endpoints\", {probed} took a probe"
    );
    // "Fast" means no connect attempt and no waiting: well under the endpoints' backoff. The bound
    // leaves room for scheduler hiccups on a loaded 2-core CI machine (typical p99 is < 1ms).
    assert!(p99 < Duration::from_millis(20), "p99 {p99:?}");
    assert!(unavailable >= 475, "{unavailable} of 500");

    // The backends come back on the same ports: the next probes restore them.
    let restarted = Instant::now();
    backends = addrs
        .iter()
        .zip(["a", "b", "c"])
        .map(|(a, n)| FaultBackend::start_at(*a, ok(n)))
        .collect();
    let deadline = restarted + Duration::from_secs(5);
    let mut first_ok: Option<Duration> = None;
    while backends.iter().any(|b| b.hits() == 0) {
        assert!(
            Instant::now() < deadline,
            "not every endpoint back in time: hits {:?}",
            backends.iter().map(|b| b.hits()).collect::<Vec<_>>()
        );
        let r = get(&mut c, "web.default", "/").await;
        match first_ok {
            None if r.status == 200 => first_ok = Some(restarted.elapsed()),
            None => assert_eq!(r.status, 503),
            // Once an endpoint is back, nothing fails again.
            Some(_) => assert_eq!(r.status, 200, "{}", r.body_text()),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_back = restarted.elapsed();
    for _ in 0..50 {
        assert_eq!(get(&mut c, "web.default", "/").await.status, 200);
    }
    println!(
        "recovery: first 200 {:?} after the restart, every endpoint serving after {all_back:?}",
        first_ok.unwrap(),
    );
    // Each endpoint is probed on the breaker's schedule (200 ms here), also while others are
    // up again: not after the connect backoff (up to 10 s) of an endpoint that refused
    // connections.
    assert!(all_back < Duration::from_secs(1), "{all_back:?}");
    let text = m.metrics().await;
    assert_eq!(
        sample(
            &text,
            "meshlet_breaker_transitions_total",
            &[("service", "web.default"), ("transition", "restored")]
        ),
        Some(3.0),
        "{text}"
    );
}

// ===== 3. deduplication =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_gets_are_deduplicated() {
    let _serial = SERIAL.lock().await;
    // 300 ms per answer, so that requests sent together overlap. /big answers 64 KiB in 4 KiB
    // chunks without a Content-Length (the response is found too large while it streams).
    let backend = FaultBackend::start(handler(|h| async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if h.path == "/big" {
            let chunks = (0..16).map(|i| Ok::<_, Infallible>(Frame::data(big_chunk(i))));
            return Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed());
        }
        let auth = h
            .headers
            .get("authorization")
            .map_or("-", |v| v.to_str().unwrap())
            .to_string();
        text(200, format!("answer #{} to {} (auth {auth})", h.n, h.path))
    }))
    .await;
    let m = Meshlet::start(&config(
        "",
        &[(
            "web.default",
            &[backend.addr],
            "{dedup: true, dedup_max_body: 1KiB}",
        )],
    ))
    .await;
    let coalesced = |text: &str| {
        sample(
            text,
            "meshlet_dedup_coalesced_total",
            &[("service", "web.default")],
        )
        .unwrap_or(0.0)
    };

    // 100 identical GETs at once: one upstream request, 100 identical answers.
    let answers = fire(&m, 100, |_| req(Method::GET, "web.default", "/hot", "")).await;
    assert_eq!(
        backend.hits(),
        1,
        "upstream requests for 100 identical GETs"
    );
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(a.body_text(), "answer #1 to /hot (auth -)");
    }
    assert_eq!(coalesced(&m.metrics().await), 99.0);

    // Two credentials: two upstream requests, each answer to its own credential's group.
    let answers = fire(&m, 20, |i| {
        let mut r = req(Method::GET, "web.default", "/me", "");
        let who = if i % 2 == 0 {
            "Bearer alice"
        } else {
            "Bearer bob"
        };
        r.headers_mut()
            .insert("authorization", who.parse().unwrap());
        r
    })
    .await;
    assert_eq!(backend.hits(), 3, "one upstream request per credential");
    for (i, a) in answers.iter().enumerate() {
        let who = if i % 2 == 0 { "alice" } else { "bob" };
        assert!(
            a.body_text().ends_with(&format!("(auth Bearer {who})")),
            "request {i} got {:?}",
            a.body_text()
        );
    }
    assert_eq!(coalesced(&m.metrics().await), 99.0 + 18.0);

    // The leader's client goes away while its upstream request is in flight: the request goes
    // on for the others, who all get its answer.
    let upstream = m.upstream(0);
    let leader = tokio::spawn(async move {
        let mut s = TcpStream::connect(upstream).await.unwrap();
        s.write_all(b"GET /cancel HTTP/1.1\r\nhost: web.default\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
    });
    eventually(
        "the leader's request upstream",
        Duration::from_secs(5),
        || {
            let n = backend.hits();
            async move { n == 4 }
        },
    )
    .await;
    let waiters = tokio::spawn({
        let m_upstream = m.upstream(0);
        async move {
            let mut clients = Vec::new();
            for _ in 0..10 {
                clients.push(H1Client::connect(m_upstream).await.unwrap());
            }
            let tasks: Vec<_> = clients
                .into_iter()
                .map(|mut c| {
                    tokio::spawn(async move { get(&mut c, "web.default", "/cancel").await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    });
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    let answers = waiters.await.unwrap();
    assert_eq!(
        backend.hits(),
        4,
        "the waiters made no request of their own"
    );
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(a.body_text(), "answer #4 to /cancel (auth -)");
    }
    assert_eq!(coalesced(&m.metrics().await), 99.0 + 18.0 + 10.0);

    // Too large to share (1 KiB limit, 64 KiB answer): each request goes upstream on its own
    // and each client gets the whole body, the leader included.
    let expected: Vec<u8> = (0..16).flat_map(|i| big_chunk(i).to_vec()).collect();
    let answers = fire(&m, 10, |_| req(Method::GET, "web.default", "/big", "")).await;
    assert_eq!(backend.hits(), 4 + 10, "one upstream request per client");
    for a in &answers {
        assert_eq!(a.status, 200);
        assert!(
            a.body[..] == expected[..],
            "wrong body: {} bytes",
            a.body.len()
        );
    }
    assert_eq!(coalesced(&m.metrics().await), 99.0 + 18.0 + 10.0);
    // 100 + 20 + 10 + 10 answered, and the cancelled leader's: its client's close reaches the
    // proxy as a FIN, which is a half-close to HTTP/1 (the client may still read: such a
    // client gets its answer, tests/edge.rs), so the request runs on (the waiters share it)
    // and is answered 200, to a socket the client has closed.
    assert_eq!(
        sample(
            &m.metrics().await,
            "meshlet_requests_total",
            &[("service", "web.default"), ("status", "200")]
        ),
        Some(141.0)
    );
    let saved = sample(
        &m.metrics().await,
        "meshlet_dedup_saved_total",
        &[("service", "web.default")],
    );
    assert_eq!(saved, Some(127.0));
}

fn big_chunk(i: u8) -> Bytes {
    Bytes::from(
        (0..4096u32)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
            .collect::<Vec<u8>>(),
    )
}

/// Opens `n` client connections, then sends one request on each, all at once; the answers in
/// order.
async fn fire(m: &Meshlet, n: usize, make: impl Fn(usize) -> Request<Full<Bytes>>) -> Vec<Answer> {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(H1Client::connect(m.upstream(0)).await.unwrap());
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let r = make(i);
            tokio::spawn(async move { c.send(r).await.unwrap() })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

// ===== 4. a backend killed under load =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_under_load_loses_no_idempotent_request() {
    let _serial = SERIAL.lock().await;
    let ms2 = Duration::from_millis(2);
    let a = FaultBackend::start(slow("a", ms2)).await;
    let b = FaultBackend::start(slow("b", ms2)).await;
    let mut victim = FaultBackend::start(slow("c", ms2)).await;
    let m = Meshlet::start(&config(
        "",
        &[("web.default", &[a.addr, b.addr, victim.addr], "")],
    ))
    .await;

    const TOTAL: usize = 2000;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (next, done, addr) = (next.clone(), done.clone(), m.upstream(0));
            tokio::spawn(async move {
                let mut c = H1Client::connect(addr).await.unwrap();
                let mut failed = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < TOTAL {
                    let r = get(&mut c, "web.default", "/").await;
                    if r.status != 200 {
                        failed.push((r.status, r.header("meshlet-error")));
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
                failed
            })
        })
        .collect();
    eventually("half the requests", Duration::from_secs(20), || {
        let n = done.load(Ordering::SeqCst);
        async move { n >= TOTAL / 2 }
    })
    .await;
    let victim_hits = victim.hits();
    victim.kill().await;
    println!(
        "killed c after {} requests (c had served {victim_hits})",
        done.load(Ordering::SeqCst)
    );
    let mut failed = Vec::new();
    for t in clients {
        failed.extend(t.await.unwrap());
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(failed, vec![], "failed requests");
    assert!(victim_hits > 0 && victim.hits() - victim_hits <= 4);

    let text = m.metrics().await;
    let svc = [("service", "web.default")];
    let retries = sample(&text, "meshlet_retries_total", &svc).unwrap_or(0.0);
    let by_reason: Vec<(&str, f64)> = ["connect", "reset", "status"]
        .into_iter()
        .map(|r| {
            let l = [("service", "web.default"), ("reason", r)];
            (r, sample(&text, "meshlet_retries_total", &l).unwrap_or(0.0))
        })
        .collect();
    // 20% of the requests, plus the reserve: 10/s over each 10 s window (tower's TpsBudget
    // lends a window's reserve at once).
    let budget = 0.2 * TOTAL as f64 + 10.0 * secs.max(10.0);
    println!(
        "{TOTAL} GETs in {secs:.2} s, 0 failed; retries {retries} {by_reason:?}, \
         budget 20% + 10/s reserve = {budget:.0}"
    );
    assert!(retries >= 1.0, "the kill cost no retry? {text}");
    assert!(
        retries <= budget + 5.0,
        "{retries} retries, budget {budget}"
    );
    assert_eq!(
        sample(
            &text,
            "meshlet_requests_total",
            &[("service", "web.default"), ("status", "200")]
        ),
        Some(TOTAL as f64)
    );
}

// ===== 5. non-idempotent requests =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_are_never_retried_after_sending_nor_deduplicated() {
    let _serial = SERIAL.lock().await;
    let resets = [ResetBackend::start().await, ResetBackend::start().await];
    let unavailable = [
        FaultBackend::start(status(503)).await,
        FaultBackend::start(status(503)).await,
    ];
    let slow_post = FaultBackend::start(handler(|h| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        text(200, format!("#{} {} {:?}", h.n, h.method, h.body))
    }))
    .await;
    let live = FaultBackend::start(ok("live")).await;
    let m = Meshlet::start(&config(
        "",
        &[
            ("reset.default", &[resets[0].addr, resets[1].addr], ""),
            (
                "unavail.default",
                &[unavailable[0].addr, unavailable[1].addr],
                "",
            ),
            ("posts.default", &[slow_post.addr], "{dedup: true}"),
            ("mixed.default", &[dead_addr(), live.addr], ""),
        ],
    ))
    .await;

    // Reset after the request was read: a POST may have been acted on, so it is not retried.
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    let r = c
        .send(req(Method::POST, "reset.default", "/order", "buy 1"))
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.body_text());
    let e = r.header("meshlet-error").unwrap();
    assert!(e.starts_with("upstream error for reset.default"), "{e}");
    assert_eq!(resets[0].hits() + resets[1].hits(), 1, "sent exactly once");

    // A 503 to a POST goes back to the client as is; the same to a GET is retried (twice).
    let mut c = H1Client::connect(m.upstream(1)).await.unwrap();
    let hits = || unavailable[0].hits() + unavailable[1].hits();
    let r = c
        .send(req(Method::POST, "unavail.default", "/order", "buy 1"))
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("meshlet-error"), None, "the endpoint's own answer");
    assert_eq!(hits(), 1, "sent exactly once");
    let r = get(&mut c, "unavail.default", "/order").await;
    assert_eq!(r.status, 503);
    assert_eq!(hits(), 1 + 3, "a GET is sent once and retried twice");

    // dedup: true does not make identical POSTs one.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(H1Client::connect(m.upstream(2)).await.unwrap());
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                c.send(req(Method::POST, "posts.default", "/charge", "same"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200);
        bodies.push(a.body_text());
    }
    assert_eq!(slow_post.hits(), 10, "10 POSTs upstream: {bodies:?}");
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 10, "each its own answer");

    // Connection refused: nothing was sent, so even a POST goes to another endpoint, body
    // intact.
    let mut c = H1Client::connect(m.upstream(3)).await.unwrap();
    for i in 0..20 {
        let body = format!("payment {i}");
        let r = c
            .send(req(Method::POST, "mixed.default", "/pay", body.clone()))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.header("meshlet-error"));
        assert_eq!(r.body_text(), body);
    }
    assert_eq!(live.hits(), 20);

    let text = m.metrics().await;
    let connect_errors = sample(
        &text,
        "meshlet_connect_errors_total",
        &[("service", "mixed.default")],
    )
    .unwrap_or(0.0);
    let connect_retries = sample(
        &text,
        "meshlet_retries_total",
        &[("service", "mixed.default"), ("reason", "connect")],
    );
    println!("POSTs to [dead, live]: {connect_errors} refused connects, each sent on to live");
    assert!(connect_errors >= 1.0, "{text}");
    assert_eq!(connect_retries, Some(connect_errors));
    for s in ["reset.default", "posts.default"] {
        assert_eq!(
            sample(&text, "meshlet_retries_total", &[("service", s)]),
            None,
            "{s}: {text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            "meshlet_dedup_coalesced_total",
            &[("service", "posts.default")]
        )
        .unwrap_or(0.0),
        0.0
    );
}

// ===== 6. timeouts =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_answer_504_and_grpc_deadline_exceeded() {
    let _serial = SERIAL.lock().await;
    let sleepy = FaultBackend::start(slow("sleepy", Duration::from_secs(2))).await;
    let hang = FaultBackend::start(slow("hang", Duration::from_secs(60))).await;
    let m = Meshlet::start(&config(
        "",
        &[
            ("slow.default", &[sleepy.addr], "{timeout: 200ms}"),
            ("hang.default", &[hang.addr], ""),
        ],
    ))
    .await;

    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    let t = Instant::now();
    let r = get(&mut c, "slow.default", "/").await;
    let took = t.elapsed();
    println!("timeout 200ms: 504 after {took:?}");
    assert_eq!(r.status, 504);
    assert_eq!(
        r.header("meshlet-error").as_deref(),
        Some("request to slow.default timed out after 200ms")
    );
    assert!(
        // Upper bound: well below the backend's 2s, with room for a loaded machine.
        took >= Duration::from_millis(200) && took < Duration::from_millis(1000),
        "{took:?}"
    );
    assert_eq!(sleepy.hits(), 1, "a timeout is not retried");

    // No policy timeout, but the gRPC client's own deadline: trailers-only DEADLINE_EXCEEDED.
    let mut h2 = h2_connect(m.upstream(1)).await;
    h2.ready().await.unwrap();
    let t = Instant::now();
    let rsp = h2
        .send_request(grpc_request("hang.default", Some("100m")))
        .await
        .unwrap();
    let took = t.elapsed();
    let a = collect(rsp).await.unwrap();
    println!("grpc-timeout 100m: grpc-status 4 after {took:?}");
    assert_eq!(a.status, 200);
    assert_eq!(a.header("grpc-status").as_deref(), Some("4"));
    assert!(a.header("meshlet-error").unwrap().contains("timed out"));
    assert!(a.body.is_empty());
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(1000),
        "{took:?}"
    );
    assert_eq!(hang.hits(), 1);

    let text = m.metrics().await;
    for s in ["slow.default", "hang.default"] {
        assert_eq!(
            sample(
                &text,
                "meshlet_timeouts_total",
                &[("direction", "outbound"), ("service", s)]
            ),
            Some(1.0),
            "{s}: {text}"
        );
    }
}

// ===== outcomes, classified when the response ends =====

/// A gRPC answer: 200, one empty message, then trailers with `code`.
fn grpc_answer(code: &'static str) -> Handler {
    handler(move |_| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", code.parse().unwrap());
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
            Ok(Frame::trailers(trailers)),
        ];
        Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
            .unwrap()
    })
}

/// Asserts the sum of the samples of `name` with `labels` (see [`sample`]).
fn assert_sample(text: &str, name: &str, labels: &[(&str, &str)], want: Option<f64>) {
    assert_eq!(
        sample(text, name, labels),
        want,
        "{name} {labels:?}:\n{text}"
    );
}

/// The `/health` entry of `service`, once it shows `requests` (the health model is
/// evaluated on a tick).
async fn dependency(m: &Meshlet, service: &str, requests: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = admin_get(m.addrs.admin, "/health").await.unwrap();
        let h: serde_json::Value = serde_json::from_str(&body).unwrap();
        let d = h["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == service)
            .cloned();
        if let Some(d) = d.filter(|d| d["requests"] == requests) {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "no dependency {service} with {requests} requests in {h:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unavailable_in_trailers_is_a_failure_for_breaker_and_health() {
    let _serial = SERIAL.lock().await;
    let bad = FaultBackend::start(grpc_answer("14")).await;
    let m = Meshlet::start(&config(
        "",
        &[(
            "grpc.default",
            &[bad.addr],
            "{breaker_backoff: 30s, breaker_backoff_max: 30s}",
        )],
    ))
    .await;
    let mut h2 = h2_connect(m.upstream(0)).await;
    // Seven consecutive failures eject (the default breaker); each call gets the server's
    // own answer, its trailers included.
    for i in 0..7 {
        h2.ready().await.unwrap();
        let rsp = h2
            .send_request(grpc_request("grpc.default", None))
            .await
            .unwrap();
        let mut body = rsp.into_body();
        let mut status = None;
        while let Some(f) = body.frame().await {
            if let Ok(t) = f.unwrap().into_trailers() {
                status = t
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_string());
            }
        }
        assert_eq!(status.as_deref(), Some("14"), "call {i}");
    }
    assert_eq!(bad.hits(), 7);
    let ejected = [("service", "grpc.default"), ("transition", "ejected")];
    eventually("the endpoint ejected", Duration::from_secs(5), || async {
        sample(
            &m.metrics().await,
            "meshlet_breaker_transitions_total",
            &ejected,
        ) == Some(1.0)
    })
    .await;
    // The next call is answered by meshlet: no endpoint is available.
    h2.ready().await.unwrap();
    let a = collect(
        h2.send_request(grpc_request("grpc.default", None))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(a.header("grpc-status").as_deref(), Some("14"));
    assert_eq!(
        a.header("meshlet-error").as_deref(),
        Some("no available endpoints for grpc.default")
    );
    assert_eq!(bad.hits(), 7);

    let d = dependency(&m, "grpc.default", 8).await;
    assert_eq!(d["success_rate"], 0.0, "{d:#}");
    let text = m.metrics().await;
    let failed = [
        ("service", "grpc.default"),
        ("status", "200"),
        ("classification", "failure"),
    ];
    assert_sample(&text, "meshlet_requests_total", &failed, Some(8.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_endpoint_times_out_and_is_ejected() {
    let _serial = SERIAL.lock().await;
    // Accepts connections and never answers.
    let hole = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            conns.push(s);
        }
    });
    let m = Meshlet::start(&config(
        "",
        &[(
            "web.default",
            &[hole_addr],
            "{timeout: 100ms, max_retries: 0, breaker_failures: 3, breaker_backoff: 30s, \
             breaker_backoff_max: 30s}",
        )],
    ))
    .await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    for i in 0..3 {
        let r = get(&mut c, "web.default", "/").await;
        assert_eq!(r.status, 504, "request {i}: {:?}", r.body_text());
    }
    let text = m.metrics().await;
    let ejected = [("service", "web.default"), ("transition", "ejected")];
    assert_sample(
        &text,
        "meshlet_breaker_transitions_total",
        &ejected,
        Some(1.0),
    );
    let hole_label = hole_addr.to_string();
    let state = [
        ("service", "web.default"),
        ("endpoint", hole_label.as_str()),
    ];
    assert_sample(&text, "meshlet_endpoint_breaker_state", &state, Some(1.0));
    // Ejected: the next request fails fast instead of waiting out another timeout.
    let t = Instant::now();
    let r = get(&mut c, "web.default", "/").await;
    assert_eq!(r.status, 503, "{:?}", r.body_text());
    assert_eq!(
        r.header("meshlet-error").as_deref(),
        Some("no available endpoints for web.default")
    );
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_breaker_probe_releases_its_endpoint_at_once() {
    let _serial = SERIAL.lock().await;
    // 0: answer 503; 1: hang; 2: answer 200.
    let mode = Arc::new(AtomicUsize::new(0));
    let m2 = mode.clone();
    let b = FaultBackend::start(handler(move |_| {
        let mode = m2.load(Ordering::SeqCst);
        async move {
            match mode {
                0 => text(503, "failing\n"),
                1 => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    text(200, "late")
                }
                _ => text(200, "back"),
            }
        }
    }))
    .await;
    // The probe lease (30 s) is far longer than the test: only a release lets the endpoint
    // be probed again soon.
    let m = Meshlet::start(&config(
        "",
        &[(
            "web.default",
            &[b.addr],
            "{max_retries: 0, breaker_failures: 2, breaker_backoff: 200ms, \
             breaker_backoff_max: 30s}",
        )],
    ))
    .await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    for _ in 0..2 {
        assert_eq!(get(&mut c, "web.default", "/").await.status, 503);
    }
    assert_eq!(get(&mut c, "web.default", "/").await.status, 503);
    assert_eq!(b.hits(), 2, "ejected after two failures");

    // After the backoff, the next request is the probe; its client gives up on it.
    mode.store(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Over HTTP/2, where giving up cancels the stream (RST_STREAM) and meshlet drops the
    // request at once.
    let mut probe = h2_connect(m.upstream(0)).await;
    probe.ready().await.unwrap();
    let call = probe.send_request(
        Request::get("http://web.default/")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    );
    let gave_up = tokio::time::timeout(Duration::from_millis(300), call).await;
    assert!(gave_up.is_err(), "the probe hangs");
    assert_eq!(b.hits(), 3, "the probe reached the endpoint");

    // The endpoint recovered: the next request is a new probe, answered by it.
    mode.store(2, Ordering::SeqCst);
    eventually("a new probe", Duration::from_secs(5), || async {
        let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
        get(&mut c, "web.default", "/").await.status == 200
    })
    .await;
    let text = m.metrics().await;
    let restored = [("service", "web.default"), ("transition", "restored")];
    assert_sample(
        &text,
        "meshlet_breaker_transitions_total",
        &restored,
        Some(1.0),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_mid_response_is_counted_as_a_failure() {
    let _serial = SERIAL.lock().await;
    // Sends a head promising 1,000 bytes, then 10 bytes, then closes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if read_request(&mut s).await.is_some() {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                        .await;
                }
            });
        }
    });
    let m = Meshlet::start(&config("", &[("web.default", &[addr], "{max_retries: 0}")])).await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    let r = c.send(req(Method::GET, "web.default", "/", "")).await;
    assert!(
        r.is_err(),
        "the client sees the answer break off: {:?}",
        r.map(|a| a.status)
    );
    let failed = [
        ("service", "web.default"),
        ("status", "200"),
        ("classification", "failure"),
    ];
    eventually(
        "the request counted as failed",
        Duration::from_secs(5),
        || async { sample(&m.metrics().await, "meshlet_requests_total", &failed) == Some(1.0) },
    )
    .await;
    let text = m.metrics().await;
    assert_sample(
        &text,
        "meshlet_requests_total",
        &[("service", "web.default"), ("classification", "success")],
        None,
    );
    let d = dependency(&m, "web.default", 1).await;
    assert_eq!(d["success_rate"], 0.0, "{d:#}");
    assert!(
        d["last_error"].as_str().unwrap().contains("broke off"),
        "{d:#}"
    );
    server.abort();
}

/// Issue 14: a retried request's body is the copy kept while the first attempt streamed it
/// (no wait for the body before sending); a body over the 64 KiB replay limit is sent once and
/// not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_put_resends_the_body_its_first_attempt_streamed() {
    let _serial = SERIAL.lock().await;
    let seen = Arc::new(Mutex::new(Vec::<Bytes>::new()));
    let seen2 = seen.clone();
    // The first request of each pair is refused (after reading its body), the second echoed.
    let flaky = FaultBackend::start(handler(move |h| {
        seen2.lock().unwrap().push(h.body.clone());
        async move {
            if h.n % 2 == 1 {
                text(503, "busy\n")
            } else {
                text(200, h.body)
            }
        }
    }))
    .await;
    let m = Meshlet::start(&config("", &[("flaky.default", &[flaky.addr], "")])).await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();

    let body = Bytes::from(vec![b'x'; 48 * 1024]);
    let r = c
        .send(req(Method::PUT, "flaky.default", "/doc", body.clone()))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(r.body, body, "the answer echoes the second attempt's body");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![body.clone(), body],
        "the same body, twice"
    );

    // Over the limit: sent whole once, answered as the endpoint answered, counted as skipped.
    let big = Bytes::from(vec![b'y'; 80 * 1024]);
    let r = c
        .send(req(Method::PUT, "flaky.default", "/doc", big.clone()))
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(seen.lock().unwrap().len(), 3, "not sent again");
    assert_eq!(seen.lock().unwrap()[2], big);
    let text = m.metrics().await;
    let skipped = [("service", "flaky.default"), ("reason", "body")];
    assert_eq!(
        sample(&text, "meshlet_retries_skipped_total", &skipped),
        Some(1.0),
        "{text}"
    );
}
