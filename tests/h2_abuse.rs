//! HTTP/2 abuse on real loopback sockets: a client that resets every stream after the proxy
//! sent it upstream ("paced" rapid reset) is sent GOAWAY ENHANCE_YOUR_CALM within a bounded
//! number of streams while a well-behaved client on another connection keeps its success rate
//! and latency; an ordinary client that cancels some of its streams is never cut off; and a
//! connection still open when the shutdown grace is over gets a GOAWAY before the close.
//!
//! The abusive and cancelling clients are the `h2` crate driven by hand, over a socket that
//! records the frames the proxy sends (so GOAWAY frames are seen exactly as sent).

mod support;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use support::{H2Client, Meshlet, eventually, metric, upstream_config};

const ENHANCE_YOUR_CALM: u32 = 0xb;
const NO_ERROR: u32 = 0x0;

// ===== the backend: counts what reaches it =====

#[derive(Default)]
struct Counts {
    /// Requests for the abusive paths (`/slow-*`, `/hang`).
    abusive: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// Held while a request is in the backend (its service future, then its response body).
struct InFlight(Arc<Counts>);

impl InFlight {
    fn new(c: &Arc<Counts>) -> InFlight {
        let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A body that sends its bytes after a delay.
struct LateBody {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    data: Option<Bytes>,
    _in_flight: InFlight,
}

impl http_body::Body for LateBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(s) = self.sleep.as_mut() {
            std::task::ready!(s.as_mut().poll(cx));
            self.sleep = None;
        }
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }
}

/// An h2c backend. `/` answers at once; `/slow-body` sends its head at once and its body after
/// 5 s (an attacker resets it long before); `/slow-head` answers after 100 ms; `/hang` sends its head and never its body.
/// It runs on a thread of its own, as a server in another process would, not on the runtime
/// that drives the attacker and meshlet.
async fn backend() -> (SocketAddr, Arc<Counts>, CancellationToken) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let stop = CancellationToken::new();
    let (c, s) = (counts.clone(), stop.clone());
    let serve = async move {
        let listener = TcpListener::from_std(listener).unwrap();
        loop {
            let (stream, _) = tokio::select! {
                _ = s.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            let c = c.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let c = c.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        if path != "/" {
                            c.abusive.fetch_add(1, Ordering::SeqCst);
                        }
                        let g = InFlight::new(&c);
                        let (head_delay, body_delay) = match path.as_str() {
                            "/slow-body" => (None, Some(Duration::from_secs(5))),
                            "/slow-head" => (Some(Duration::from_millis(100)), None),
                            "/hang" => (None, Some(Duration::from_secs(3600))),
                            _ => (None, None),
                        };
                        if let Some(d) = head_delay {
                            tokio::time::sleep(d).await;
                        }
                        let body = LateBody {
                            sleep: body_delay.map(|d| Box::pin(tokio::time::sleep(d))),
                            data: Some(Bytes::from_static(b"ok")),
                            _in_flight: g,
                        };
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(1000)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    };
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(serve)
    });
    (addr, counts, stop)
}

// ===== a client socket that records the frames it receives =====

#[derive(Debug, Clone)]
struct GoAway {
    at: Instant,
    last_stream_id: u32,
    code: u32,
    debug: String,
}

#[derive(Default)]
struct Seen {
    goaways: Vec<GoAway>,
    /// Frames received after the last GOAWAY.
    frames_after_goaway: usize,
    eof: Option<Instant>,
}

struct Sniff {
    io: TcpStream,
    buf: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
}

impl Sniff {
    async fn connect(addr: SocketAddr) -> (Sniff, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let io = TcpStream::connect(addr).await.unwrap();
        (
            Sniff {
                io,
                buf: Vec::new(),
                seen: seen.clone(),
            },
            seen,
        )
    }

    fn parse(&mut self) {
        let mut seen = self.seen.lock().unwrap();
        loop {
            if self.buf.len() < 9 {
                return;
            }
            let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
            if self.buf.len() < 9 + len {
                return;
            }
            let kind = self.buf[3];
            let payload = &self.buf[9..9 + len];
            if kind == 0x7 && len >= 8 {
                seen.goaways.push(GoAway {
                    at: Instant::now(),
                    last_stream_id: u32::from_be_bytes(payload[0..4].try_into().unwrap())
                        & 0x7fff_ffff,
                    code: u32::from_be_bytes(payload[4..8].try_into().unwrap()),
                    debug: String::from_utf8_lossy(&payload[8..]).into_owned(),
                });
                seen.frames_after_goaway = 0;
            } else if !seen.goaways.is_empty() {
                seen.frames_after_goaway += 1;
            }
            self.buf.drain(..9 + len);
        }
    }
}

impl AsyncRead for Sniff {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before => {
                self.seen.lock().unwrap().eof.get_or_insert(Instant::now());
            }
            Poll::Ready(Ok(())) => {
                let new = buf.filled()[before..].to_vec();
                self.buf.extend_from_slice(&new);
                self.parse();
            }
            Poll::Ready(Err(_)) => {
                self.seen.lock().unwrap().eof.get_or_insert(Instant::now());
            }
            Poll::Pending => {}
        }
        r
    }
}

impl AsyncWrite for Sniff {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An `h2` client connection over a recording socket; the connection runs in a task.
async fn h2_client(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    Arc<Mutex<Seen>>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let (io, seen) = Sniff::connect(addr).await;
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    (client, seen, conn)
}

/// Runs a client on a thread and runtime of its own, as another process would, so that its
/// tasks do not queue behind meshlet's on the test's runtime (or the other way round).
fn on_thread<F>(f: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
}

fn get(path: &str) -> Request<()> {
    Request::get(format!("http://web.default{path}"))
        .body(())
        .unwrap()
}

// ===== the attacker =====

#[derive(Debug, Clone, Copy)]
enum Reset {
    /// Reset each stream once its response head arrived (the body is still to come).
    AfterHead,
    /// Reset each stream a moment after opening it (its response head is still to come).
    AfterDelay,
}

#[derive(Debug)]
struct Attack {
    opened: usize,
    goaway: Option<GoAway>,
    took: Duration,
    /// Why the workers stopped.
    ended: Vec<String>,
}

/// One attacking connection: `concurrency` workers open streams and reset them, until the
/// connection is refused or `max_streams` were opened.
async fn attack(addr: SocketAddr, concurrency: usize, reset: Reset, max_streams: usize) -> Attack {
    let start = Instant::now();
    let (client, seen, conn) = h2_client(addr).await;
    let opened = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, opened) = (client.clone(), opened.clone());
        workers.push(tokio::spawn(async move {
            while opened.load(Ordering::SeqCst) < max_streams {
                let mut c = match client.clone().ready().await {
                    Ok(c) => c,
                    Err(e) => return format!("ready: {e}"),
                };
                let path = match reset {
                    Reset::AfterHead => "/slow-body",
                    Reset::AfterDelay => "/slow-head",
                };
                let (rsp, mut send) = match c.send_request(get(path), true) {
                    Ok(s) => s,
                    Err(e) => return format!("send: {e}"),
                };
                opened.fetch_add(1, Ordering::SeqCst);
                match reset {
                    Reset::AfterHead => {
                        if let Err(e) = rsp.await {
                            return format!("response: {e}");
                        }
                    }
                    Reset::AfterDelay => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        drop(rsp);
                    }
                }
                send.send_reset(h2::Reason::CANCEL);
            }
            "max streams".to_string()
        }));
    }
    drop(client);
    let mut ended = Vec::new();
    for w in workers {
        match tokio::time::timeout(Duration::from_secs(20), w).await {
            Ok(Ok(why)) if !ended.contains(&why) => ended.push(why),
            Ok(_) => {}
            Err(_) => ended.push("worker stuck".into()),
        }
    }
    match tokio::time::timeout(Duration::from_secs(5), conn).await {
        Ok(Ok(r)) => ended.push(format!("connection: {r:?}")),
        _ => ended.push("connection still open".into()),
    }
    let goaway = seen.lock().unwrap().goaways.last().cloned();
    Attack {
        opened: opened.load(Ordering::SeqCst),
        goaway,
        took: start.elapsed(),
        ended,
    }
}

// ===== the well-behaved client =====

struct Run {
    ok: usize,
    failed: usize,
    p99: Duration,
}

/// `n` GETs of `/` over one HTTP/2 connection, 4 at a time.
async fn good_client(addr: SocketAddr, n: usize) -> Run {
    let client = H2Client::connect(addr).await.unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let t = Instant::now();
                let ok = matches!(client.get("/").await, Ok(a) if a.status == 200);
                out.push((ok, t.elapsed()));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let mut lat: Vec<Duration> = all.iter().map(|(_, d)| *d).collect();
    lat.sort();
    let p99 = lat[(lat.len() * 99 / 100).min(lat.len() - 1)];
    let ok = all.iter().filter(|(ok, _)| *ok).count();
    Run {
        ok,
        failed: all.len() - ok,
        p99,
    }
}

async fn meshlet(backend: SocketAddr, extra: &str) -> Meshlet {
    let mut config = upstream_config("web.default", &[backend]);
    config.push_str(extra);
    Meshlet::start(&config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_gets_goaway_and_spares_other_clients() {
    let (backend, counts, _stop) = backend().await;
    let m = meshlet(backend, "").await;
    let addr = m.upstream(0);
    const GOOD_REQUESTS: usize = 1000;
    const CONCURRENCY: usize = 50;
    // The default premature_reset_min_streams.
    const MIN_STREAMS: usize = 100;

    // Without an attacker.
    let base = on_thread(good_client(addr, GOOD_REQUESTS)).await.unwrap();
    assert_eq!(base.failed, 0, "baseline requests failed");

    // With one: attacking connections one after another while the good client runs.
    let abusive_before = counts.abusive.load(Ordering::SeqCst);
    let good_done = Arc::new(AtomicBool::new(false));
    let done = good_done.clone();
    let attacker = on_thread(async move {
        let mut attacks = Vec::new();
        let started = Instant::now();
        while attacks.len() < 4 || (!done.load(Ordering::SeqCst) && attacks.len() < 300) {
            let reset = if attacks.len() % 2 == 0 {
                Reset::AfterHead
            } else {
                Reset::AfterDelay
            };
            let a = attack(addr, CONCURRENCY, reset, 5_000).await;
            attacks.push((reset, a));
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the attack took too long"
            );
        }
        attacks
    });
    let good = on_thread(good_client(addr, GOOD_REQUESTS)).await.unwrap();
    good_done.store(true, Ordering::SeqCst);
    let attacks = attacker.await.unwrap();
    let abusive = counts.abusive.load(Ordering::SeqCst) - abusive_before;
    // Without an attacker again: the machine's load drifts (other jobs share its two cores);
    // the slower of the two runs is the baseline.
    let after = on_thread(good_client(addr, GOOD_REQUESTS)).await.unwrap();
    assert_eq!(after.failed, 0, "requests failed after the attack");

    for (reset, a) in &attacks {
        let g = a.goaway.as_ref().unwrap_or_else(|| {
            panic!(
                "{reset:?}: no GOAWAY after {} streams; the client saw: {:?}",
                a.opened, a.ended
            )
        });
        assert_eq!(g.code, ENHANCE_YOUR_CALM, "{reset:?}: {g:?}");
        // The streams the proxy read before sending GOAWAY (client streams are odd: 1, 3, ...);
        // the client may have opened more while the GOAWAY was on its way, which the proxy
        // does not process. Resets are counted as the streams' tasks see them: on a loaded
        // machine that lags the wire by up to a few times the client's concurrency (those
        // late streams are answered at once, not sent upstream: see `per_conn` below).
        let processed = (g.last_stream_id as usize).div_ceil(2);
        assert!(
            processed <= MIN_STREAMS + 5 * CONCURRENCY,
            "{reset:?}: GOAWAY only after {processed} streams ({a:?})"
        );
    }
    let per_conn = abusive / attacks.len();
    let max_in_flight = counts.max_in_flight.load(Ordering::SeqCst);
    eprintln!(
        "attacks: {}, streams opened / taken per connection: {:?}, upstream requests per \
         connection: {per_conn}, backend max in flight: {max_in_flight}; good p99 {:?} alone \
         (before), {:?} under attack, {:?} alone (after)",
        attacks.len(),
        attacks
            .iter()
            .map(|(_, a)| format!(
                "{}/{} in {:?}",
                a.opened,
                a.goaway
                    .as_ref()
                    .map_or(0, |g| g.last_stream_id.div_ceil(2)),
                a.took
            ))
            .collect::<Vec<_>>(),
        base.p99,
        good.p99,
        after.p99,
    );
    // What reaches upstream is bounded by the client's concurrency, not by its stream rate.
    assert!(
        per_conn <= MIN_STREAMS + 3 * CONCURRENCY,
        "upstream saw {per_conn} requests per attacking connection"
    );
    // In flight at the backend: the attacker's concurrency, plus the streams it reset in the
    // last 100 ms (a request reset that young runs on until the backend answered its head, for
    // 100 ms at most: see `h2_guard::RESET_SETTLE`), at most about one connection's worth,
    // plus the good client's.
    assert!(
        max_in_flight <= MIN_STREAMS + 4 * CONCURRENCY,
        "the backend had {max_in_flight} requests in flight"
    );
    // The well-behaved client does not notice.
    assert_eq!(good.failed, 0, "good requests failed under attack");
    assert_eq!(good.ok, GOOD_REQUESTS);
    let alone = base.p99.max(after.p99);
    let bound = alone * 10 + Duration::from_millis(50);
    assert!(
        good.p99 <= bound,
        "good p99 {:?} under attack, {:?} alone (before {:?}, after {:?})",
        good.p99,
        alone,
        base.p99,
        after.p99
    );

    let text = m.metrics().await;
    // Most connections are closed by the premature-reset rule; a stream reset before the proxy
    // even accepted it is h2's own limit (`max_pending_accept_reset_streams`).
    let goaways: f64 = ["premature_resets", "enhance_your_calm"]
        .iter()
        .filter_map(|r| {
            metric(
                &text,
                &format!("meshlet_http2_goaway_total{{direction=\"outbound\",reason=\"{r}\"}}"),
            )
        })
        .sum();
    assert_eq!(
        goaways as usize,
        attacks.len(),
        "{}",
        text.lines()
            .filter(|l| l.starts_with("meshlet_http2"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let premature = metric(
        &text,
        "meshlet_http2_premature_resets_total{direction=\"outbound\"}",
    )
    .unwrap_or(0.0);
    assert!(
        premature as usize >= attacks.len() * MIN_STREAMS / 2,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cancelling_some_streams_is_not_cut_off() {
    let (backend, _counts, _stop) = backend().await;
    let m = meshlet(backend, "").await;
    let (client, seen, conn) = h2_client(m.upstream(0)).await;
    const STREAMS: usize = 1000;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..20 {
        let (client, next) = (client.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut cancelled) = (0, 0);
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= STREAMS {
                    return Ok::<_, String>((ok, cancelled));
                }
                let mut c = client.clone().ready().await.map_err(|e| e.to_string())?;
                // Every fifth call is cancelled once its response head arrived (a deadline,
                // a user who navigated away); the others are read to the end.
                let cancel = i % 5 == 0;
                let path = if cancel { "/slow-body" } else { "/" };
                let (rsp, mut send) = c.send_request(get(path), true).map_err(|e| e.to_string())?;
                let rsp = rsp.await.map_err(|e| format!("stream {i}: {e}"))?;
                if cancel {
                    send.send_reset(h2::Reason::CANCEL);
                    cancelled += 1;
                    continue;
                }
                assert_eq!(rsp.status(), 200);
                let mut body = rsp.into_body();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk.map_err(|e| format!("stream {i} body: {e}"))?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                ok += 1;
            }
        }));
    }
    let (mut ok, mut cancelled) = (0, 0);
    for w in workers {
        let (o, c) = w.await.unwrap().unwrap();
        ok += o;
        cancelled += c;
    }
    assert_eq!((ok, cancelled), (800, 200));
    assert!(!conn.is_finished(), "the connection ended");
    assert!(
        seen.lock().unwrap().goaways.is_empty(),
        "GOAWAY sent to a client that cancelled 20% of its streams"
    );
    let text = m.metrics().await;
    assert!(
        !text.contains("reason=\"premature_resets\""),
        "{}",
        text.lines()
            .filter(|l| l.contains("http2"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let premature = metric(
        &text,
        "meshlet_http2_premature_resets_total{direction=\"outbound\"}",
    )
    .unwrap_or(0.0);
    assert!(
        (150.0..=200.0).contains(&premature),
        "premature resets: {premature}"
    );
}

/// The built binary, as a user runs it: SIGTERM with a stream still open, and the process
/// exits when the grace is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_open_past_the_shutdown_grace_gets_goaway_before_the_close() {
    let (backend, counts, _stop) = backend().await;
    let grace = Duration::from_millis(500);
    let (admin, upstream) = (support::free_port(), support::free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "admin:\n  listen: 127.0.0.1:{admin}\nupstreams:\n  - listen: 127.0.0.1:{upstream}\n    \
             service: web.default\ndiscovery:\n  static:\n    - service: web.default\n      \
             endpoints: [\"{backend}\"]\nshutdown_grace: {}ms\n",
            grace.as_millis()
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_meshlet"))
        .args(["proxy", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = support::Process(child);
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    eventually("meshlet ready", Duration::from_secs(10), || async {
        matches!(support::admin_get(admin, "/ready").await, Ok((200, _)))
    })
    .await;

    let upstream: SocketAddr = format!("127.0.0.1:{upstream}").parse().unwrap();
    let (client, seen, conn) = h2_client(upstream).await;
    let mut c = client.ready().await.unwrap();
    let (rsp, _send) = c.send_request(get("/hang"), true).unwrap();
    let rsp = rsp.await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(counts.in_flight.load(Ordering::SeqCst), 1);

    let shutdown = Instant::now();
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGTERM);
    }
    eventually("the connection to close", Duration::from_secs(10), || {
        let eof = seen.lock().unwrap().eof.is_some();
        async move { eof }
    })
    .await;
    let (goaways, frames_after_goaway) = {
        let seen = seen.lock().unwrap();
        (seen.goaways.clone(), seen.frames_after_goaway)
    };
    eprintln!("GOAWAY frames: {goaways:?}");
    // The drain's GOAWAY frames come first (hyper's graceful shutdown), then ours.
    let last = goaways.last().expect("no GOAWAY at all").clone();
    assert_eq!(last.code, NO_ERROR, "{last:?}");
    assert!(last.debug.contains("shutdown grace"), "{last:?}");
    assert_eq!(last.last_stream_id, 1, "{last:?}");
    assert!(
        last.at.duration_since(shutdown) >= grace,
        "GOAWAY {:?} after the shutdown started, before the grace was over",
        last.at.duration_since(shutdown)
    );
    assert_eq!(frames_after_goaway, 0, "frames after the last GOAWAY");
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    let exited = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })
    .await
    .unwrap();
    assert!(exited.is_some(), "meshlet did not exit");
    drop(rsp);
}
