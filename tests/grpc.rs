//! gRPC (h2c) through meshlet's explicit upstream listener, with tonic on both ends: the four
//! call kinds, trailers, deadlines, cancellation and per-call balancing. The messages are
//! hand-written prost types and the server is a small hand-written router over tonic's generic
//! `server::Grpc`, so no protoc is needed.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower::ServiceExt;

use support::*;

/// The one message type of the test service: a number and a text.
#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(int64, tag = "1")]
    n: i64,
    #[prost(string, tag = "2")]
    text: String,
}

fn msg(n: i64, text: &str) -> Msg {
    Msg {
        n,
        text: text.to_string(),
    }
}

const UNARY: &str = "/meshlet.test.Echo/Unary";
const SERVER_STREAM: &str = "/meshlet.test.Echo/ServerStream";
const CLIENT_STREAM: &str = "/meshlet.test.Echo/ClientStream";
const BIDI: &str = "/meshlet.test.Echo/Bidi";
const FAIL: &str = "/meshlet.test.Echo/Fail";
const STREAM_THEN_FAIL: &str = "/meshlet.test.Echo/StreamThenFail";
const SLEEP: &str = "/meshlet.test.Echo/Sleep";
const ENDLESS: &str = "/meshlet.test.Echo/Endless";
const HANG: &str = "/meshlet.test.Echo/Hang";

/// How long the `Sleep` handler sleeps unless its deadline cuts it short.
const SLEEP_FOR: Duration = Duration::from_secs(10);

/// The status `Fail` returns: a message with spaces, punctuation and non-ASCII characters,
/// which gRPC percent-encodes in `grpc-message`.
const FAIL_MESSAGE: &str = "widget 7 is locked: ask «ops» (100% sure)";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a backend's handlers observed.
#[derive(Default)]
struct Observed {
    hits: AtomicUsize,
    /// TCP connections accepted.
    conns: AtomicUsize,
    /// The `grpc-timeout` header the `Sleep` handler received.
    grpc_timeout: Mutex<Option<String>>,
    /// The `Sleep` handler's deadline fired.
    deadline_fired: AtomicBool,
    /// The `Sleep` handler ended, by its own deadline or cancelled by the stream's reset (when
    /// meshlet's timer, 25 ms behind the propagated deadline, wins on a loaded machine).
    sleep_ended_early: AtomicBool,
    /// The `Endless` stream's producer saw its send fail (the response stream was dropped).
    endless_send_failed: AtomicBool,
    /// Messages the `Endless` producer handed over before that.
    endless_sent: AtomicUsize,
    /// `Hang` handlers started, and dropped before they finished.
    hang_started: AtomicUsize,
    hang_dropped: AtomicUsize,
}

/// Counts a handler's future dropped before it completed.
struct DropFlag(Arc<Observed>, bool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.hang_dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The server side: routes by path to tonic's generic `server::Grpc` with a prost codec.
#[derive(Clone)]
struct Router {
    name: Arc<str>,
    /// How long `Unary` takes.
    delay: Duration,
    seen: Arc<Observed>,
}

fn codec() -> ProstCodec<Msg, Msg> {
    ProstCodec::default()
}

type ResponseStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<Msg, Status>> + Send>>;

impl tower::Service<http::Request<Incoming>> for Router {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.route(req).await) })
    }
}

impl Router {
    async fn route(self, req: http::Request<Incoming>) -> http::Response<tonic::body::Body> {
        self.seen.hits.fetch_add(1, Ordering::SeqCst);
        let mut grpc = tonic::server::Grpc::new(codec());
        let (name, delay) = (self.name.clone(), self.delay);
        let path = req.uri().path().to_string();
        match path.as_str() {
            UNARY => {
                let svc = tower::service_fn(move |r: tonic::Request<Msg>| {
                    let name = name.clone();
                    async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        let m = r.into_inner();
                        let mut rsp = tonic::Response::new(msg(m.n + 1, &name));
                        rsp.metadata_mut()
                            .insert("x-backend", name.parse().unwrap());
                        Ok::<_, Status>(rsp)
                    }
                });
                grpc.unary(svc, req).await
            }
            SERVER_STREAM => {
                let svc = tower::service_fn(|r: tonic::Request<Msg>| async move {
                    let m = r.into_inner();
                    let items = (0..m.n).map(move |i| Ok(msg(i, &format!("{}-{i}", m.text))));
                    let s: ResponseStream = Box::pin(tokio_stream::iter(items));
                    Ok::<_, Status>(tonic::Response::new(s))
                });
                grpc.server_streaming(svc, req).await
            }
            CLIENT_STREAM => {
                let svc =
                    tower::service_fn(|r: tonic::Request<tonic::Streaming<Msg>>| async move {
                        let mut s = r.into_inner();
                        let (mut sum, mut count) = (0, 0);
                        while let Some(m) = s.message().await? {
                            sum += m.n;
                            count += 1;
                        }
                        Ok::<_, Status>(tonic::Response::new(msg(sum, &count.to_string())))
                    });
                grpc.client_streaming(svc, req).await
            }
            BIDI => {
                let svc =
                    tower::service_fn(|r: tonic::Request<tonic::Streaming<Msg>>| async move {
                        let s = r.into_inner();
                        // Each message is answered as it arrives (nothing is buffered).
                        let out: ResponseStream = Box::pin(s.map(|m| {
                            m.map(|m| Msg {
                                n: m.n * 2,
                                text: m.text.to_uppercase(),
                            })
                        }));
                        Ok::<_, Status>(tonic::Response::new(out))
                    });
                grpc.streaming(svc, req).await
            }
            FAIL => {
                let svc = tower::service_fn(|_: tonic::Request<Msg>| async move {
                    Err::<tonic::Response<Msg>, _>(Status::new(
                        Code::FailedPrecondition,
                        FAIL_MESSAGE,
                    ))
                });
                grpc.unary(svc, req).await
            }
            STREAM_THEN_FAIL => {
                let svc = tower::service_fn(|_: tonic::Request<Msg>| async move {
                    let items = vec![
                        Ok(msg(1, "one")),
                        Ok(msg(2, "two")),
                        Err(Status::new(Code::ResourceExhausted, "quota: 2 per call")),
                    ];
                    let s: ResponseStream = Box::pin(tokio_stream::iter(items));
                    Ok::<_, Status>(tonic::Response::new(s))
                });
                grpc.server_streaming(svc, req).await
            }
            SLEEP => {
                // Honours the propagated deadline as gRPC servers do (grpc-go, grpc-java):
                // the handler is cut short and the call ends with DEADLINE_EXCEEDED.
                let header = req
                    .headers()
                    .get("grpc-timeout")
                    .map(|v| v.to_str().unwrap().to_string());
                let deadline = header.as_deref().and_then(parse_grpc_timeout);
                *self.seen.grpc_timeout.lock().unwrap() = header;
                let seen = self.seen.clone();
                let svc = tower::service_fn(move |_: tonic::Request<Msg>| {
                    let seen = seen.clone();
                    async move {
                        struct Ended(Arc<Observed>, Instant);
                        impl Drop for Ended {
                            fn drop(&mut self) {
                                if self.1.elapsed() < SLEEP_FOR {
                                    self.0.sleep_ended_early.store(true, Ordering::SeqCst);
                                }
                            }
                        }
                        let _ended = Ended(seen.clone(), Instant::now());
                        let work = tokio::time::sleep(SLEEP_FOR);
                        match deadline {
                            Some(d) if tokio::time::timeout(d, work).await.is_err() => {
                                seen.deadline_fired.store(true, Ordering::SeqCst);
                                Err(Status::deadline_exceeded("deadline exceeded"))
                            }
                            _ => Ok(tonic::Response::new(msg(0, "slept"))),
                        }
                    }
                });
                grpc.unary(svc, req).await
            }
            ENDLESS => {
                let seen = self.seen.clone();
                let svc = tower::service_fn(move |_: tonic::Request<Msg>| {
                    let seen = seen.clone();
                    async move {
                        let (tx, rx) = tokio::sync::mpsc::channel(4);
                        tokio::spawn(async move {
                            for i in 0.. {
                                if tx.send(Ok(msg(i, "tick"))).await.is_err() {
                                    seen.endless_send_failed.store(true, Ordering::SeqCst);
                                    return;
                                }
                                seen.endless_sent.fetch_add(1, Ordering::SeqCst);
                                // Keep ticking without flooding the flow-control window.
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        });
                        let s: ResponseStream = Box::pin(ReceiverStream::new(rx));
                        Ok::<_, Status>(tonic::Response::new(s))
                    }
                });
                grpc.server_streaming(svc, req).await
            }
            HANG => {
                let seen = self.seen.clone();
                let svc = tower::service_fn(move |_: tonic::Request<Msg>| {
                    let seen = seen.clone();
                    async move {
                        seen.hang_started.fetch_add(1, Ordering::SeqCst);
                        let mut flag = DropFlag(seen, false);
                        tokio::time::sleep(SLEEP_FOR).await;
                        flag.1 = true;
                        Ok::<_, Status>(tonic::Response::new(msg(0, "woke")))
                    }
                });
                grpc.unary(svc, req).await
            }
            _ => Status::unimplemented(format!("no method {path}")).into_http(),
        }
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC backend on loopback speaking h2c.
struct GrpcBackend {
    addr: SocketAddr,
    name: String,
    seen: Arc<Observed>,
    stop: CancellationToken,
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl GrpcBackend {
    async fn start(name: &str, delay: Duration) -> GrpcBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Observed::default());
        let conns = seen.clone();
        let stop = CancellationToken::new();
        let router = Router {
            name: name.into(),
            delay,
            seen: seen.clone(),
        };
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                // As tonic's own server does: small h2 frames must not wait for ACKs (Nagle).
                stream.set_nodelay(true).unwrap();
                conns.conns.fetch_add(1, Ordering::SeqCst);
                let router = router.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| router.clone().oneshot(req));
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        GrpcBackend {
            addr,
            name: name.to_string(),
            seen,
            stop,
        }
    }

    fn hits(&self) -> usize {
        self.seen.hits.load(Ordering::SeqCst)
    }
}

/// A tonic client channel (one h2c connection) to meshlet's upstream listener.
async fn client(addr: SocketAddr) -> tonic::client::Grpc<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to meshlet");
    tonic::client::Grpc::new(channel)
}

async fn unary<T>(
    c: &mut tonic::client::Grpc<T>,
    path: &'static str,
    req: tonic::Request<Msg>,
) -> Result<tonic::Response<Msg>, Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<BoxError>,
{
    c.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {}", e.into())))?;
    c.unary(req, PathAndQuery::from_static(path), codec()).await
}

async fn one_backend() -> (GrpcBackend, Meshlet) {
    let b = GrpcBackend::start("g1", Duration::ZERO).await;
    let m = Meshlet::start(&upstream_config("grpc.default", &[b.addr])).await;
    (b, m)
}

/// Bounds a step of a test so that a stuck stream fails the test instead of hanging it.
async fn within<T>(what: &str, d: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(d, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {d:?}"))
}

const STEP: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_call_kinds_round_trip() {
    let (b, m) = one_backend().await;
    let mut c = client(m.upstream(0)).await;

    // Unary, with response metadata.
    let rsp = within(
        "unary",
        STEP,
        unary(&mut c, UNARY, tonic::Request::new(msg(41, "hi"))),
    )
    .await
    .unwrap();
    assert_eq!(rsp.metadata().get("x-backend").unwrap(), "g1");
    assert_eq!(rsp.into_inner(), msg(42, "g1"));

    // Server streaming: 25 messages, in order, then OK.
    c.ready().await.unwrap();
    let got: Vec<Msg> = within("server streaming", STEP, async {
        let mut s = c
            .server_streaming(
                tonic::Request::new(msg(25, "s")),
                PathAndQuery::from_static(SERVER_STREAM),
                codec(),
            )
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            got.push(m);
        }
        got
    })
    .await;
    let want: Vec<Msg> = (0..25).map(|i| msg(i, &format!("s-{i}"))).collect();
    assert_eq!(got, want);

    // Client streaming: 100 messages summed.
    c.ready().await.unwrap();
    let sum = within(
        "client streaming",
        STEP,
        c.client_streaming(
            tonic::Request::new(tokio_stream::iter((1..=100).map(|i| msg(i, "")))),
            PathAndQuery::from_static(CLIENT_STREAM),
            codec(),
        ),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(sum, msg(5050, "100"));

    // Bidi, in lock step: each message is sent only after the previous answer came back,
    // which deadlocks unless both directions stream through meshlet without buffering.
    c.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    tx.send(msg(0, "m0")).await.unwrap();
    let mut answers = within(
        "bidi start",
        STEP,
        c.streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static(BIDI),
            codec(),
        ),
    )
    .await
    .unwrap()
    .into_inner();
    // One message of 1 MiB in the middle: far more than an h2 flow-control window.
    let text = |i: i64| match i {
        10 => format!("m{i}{}", "abcdefgh".repeat(128 * 1024)),
        _ => format!("m{i}"),
    };
    for i in 0..20 {
        let a = within("bidi answer", STEP, answers.message())
            .await
            .unwrap()
            .expect("an answer");
        assert_eq!(a.n, i * 2);
        assert!(a.text == text(i).to_uppercase(), "answer {i} differs");
        if i + 1 < 20 {
            tx.send(msg(i + 1, &text(i + 1))).await.unwrap();
        }
    }
    drop(tx);
    // Half-closing our side ends the call with OK.
    assert_eq!(
        within("bidi end", STEP, answers.message()).await.unwrap(),
        None
    );

    // Everything went through meshlet, all of it to the one backend.
    assert_eq!(b.hits(), 4);
    let text = m.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_requests_total{classification="success",direction="outbound",service="grpc.default",status="200"}"#
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            r#"meshlet_connections_total{direction="outbound",protocol="http2"}"#
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_message_arrive_in_trailers() {
    let (_b, m) = one_backend().await;
    let mut c = client(m.upstream(0)).await;

    // A unary error: a trailers-only response.
    for _ in 0..3 {
        let st = within(
            "failing unary",
            STEP,
            unary(&mut c, FAIL, tonic::Request::new(msg(1, ""))),
        )
        .await
        .unwrap_err();
        assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
        assert_eq!(st.message(), FAIL_MESSAGE, "{st:?}");
        // meshlet did not make this answer up.
        assert!(st.metadata().get("meshlet-error").is_none(), "{st:?}");
    }

    // Messages first, then the status in real trailers after the data.
    c.ready().await.unwrap();
    let (got, end) = within("stream then fail", STEP, async {
        let mut s = c
            .server_streaming(
                tonic::Request::new(msg(0, "")),
                PathAndQuery::from_static(STREAM_THEN_FAIL),
                codec(),
            )
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        loop {
            match s.message().await {
                Ok(Some(m)) => got.push(m),
                Ok(None) => return (got, None),
                Err(st) => return (got, Some(st)),
            }
        }
    })
    .await;
    assert_eq!(got, vec![msg(1, "one"), msg(2, "two")]);
    let st = end.expect("the stream ends with an error status");
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert_eq!(st.message(), "quota: 2 per call");

    // And the channel is still good for successful calls.
    let ok = unary(&mut c, UNARY, tonic::Request::new(msg(1, "")))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_deadline_is_deadline_exceeded_promptly() {
    let (b, m) = one_backend().await;
    // A client that leaves its deadline to the server: tonic's channel enforces `grpc-timeout`
    // locally too, but reports its own expiry as CANCELLED, which would race the server's
    // DEADLINE_EXCEEDED. This one sends the request over a plain h2c connection to meshlet.
    let stream = TcpStream::connect(m.upstream(0)).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, tonic::body::Body>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let h2 = tower::service_fn(move |req: http::Request<tonic::body::Body>| {
        let mut s = sender.clone();
        async move {
            s.ready().await?;
            s.send_request(req).await
        }
    });
    let mut c = tonic::client::Grpc::with_origin(h2, "http://grpc.default".parse().unwrap());

    let mut req = tonic::Request::new(msg(0, "zzz"));
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let st = within("deadline call", STEP, unary(&mut c, SLEEP, req))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(st.code(), Code::DeadlineExceeded, "{st:?}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "DEADLINE_EXCEEDED after {took:?} (the handler would sleep {SLEEP_FOR:?})"
    );
    // The deadline travelled through meshlet and the server cut its handler short.
    let header = b.seen.grpc_timeout.lock().unwrap().clone();
    let d = header.as_deref().and_then(parse_grpc_timeout);
    assert!(
        d.is_some_and(|d| d <= Duration::from_millis(300) && d > Duration::from_millis(100)),
        "grpc-timeout seen by the server: {header:?}"
    );
    // Usually by its own timer (deadline_fired); on a loaded machine meshlet's timer may win
    // and reset the stream, which cancels the handler: either way it ends long before
    // SLEEP_FOR.
    let ended = Instant::now();
    while !b.seen.sleep_ended_early.load(Ordering::SeqCst) {
        assert!(
            ended.elapsed() < Duration::from_secs(1),
            "the server's handler still runs 1 s after the deadline (deadline fired: {})",
            b.seen.deadline_fired.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The same through a tonic channel: the call ends promptly too, with tonic's own code
    // (CANCELLED when its local timer wins the race, DEADLINE_EXCEEDED when the server's does).
    let mut c = client(m.upstream(0)).await;
    let mut req = tonic::Request::new(msg(0, "zzz"));
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let st = within("deadline call (channel)", STEP, unary(&mut c, SLEEP, req))
        .await
        .unwrap_err();
    assert!(
        matches!(st.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{st:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(3), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_is_cancelled_upstream() {
    let (b, m) = one_backend().await;
    let mut c = client(m.upstream(0)).await;
    c.ready().await.unwrap();
    let mut s = within(
        "endless call",
        STEP,
        c.server_streaming(
            tonic::Request::new(msg(0, "")),
            PathAndQuery::from_static(ENDLESS),
            codec(),
        ),
    )
    .await
    .unwrap()
    .into_inner();
    for i in 0..5 {
        let m = within("tick", STEP, s.message())
            .await
            .unwrap()
            .expect("a tick");
        assert_eq!(m.n, i);
    }
    assert!(!b.seen.endless_send_failed.load(Ordering::SeqCst));

    // The client walks away: RST_STREAM to meshlet, which must reset its upstream stream so
    // that the server's producer notices.
    drop(s);
    eventually(
        "the server sees the cancelled stream",
        Duration::from_secs(5),
        || async { b.seen.endless_send_failed.load(Ordering::SeqCst) },
    )
    .await;
    let sent = b.seen.endless_sent.load(Ordering::SeqCst);
    assert!(sent < 1000, "the producer ran on for {sent} messages");

    // A unary call given up while it waits for its answer: the handler is dropped too.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        unary(&mut c, HANG, tonic::Request::new(msg(0, ""))),
    )
    .await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    assert_eq!(b.seen.hang_started.load(Ordering::SeqCst), 1);
    eventually(
        "the server drops the abandoned handler",
        Duration::from_secs(5),
        || async { b.seen.hang_dropped.load(Ordering::SeqCst) == 1 },
    )
    .await;

    // The connection to meshlet is unharmed, and so is meshlet's to the server: the streams
    // were reset, not the connections.
    let ok = unary(&mut c, UNARY, tonic::Request::new(msg(7, "")))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().n, 8);
    assert_eq!(b.seen.conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_on_one_channel_spread_over_backends() {
    let backends = [
        GrpcBackend::start("a", Duration::from_millis(3)).await,
        GrpcBackend::start("b", Duration::from_millis(3)).await,
        GrpcBackend::start("c", Duration::from_millis(3)).await,
    ];
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let m = Meshlet::start(&short_decay(upstream_config("grpc.default", &eps))).await;
    // One channel (one h2c connection to meshlet), cloned into 10 callers of 30 calls each.
    let c = client(m.upstream(0)).await;
    let mut tasks = Vec::new();
    for w in 0..10i64 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut names = Vec::new();
            for i in 0..30 {
                let n = w * 100 + i;
                let rsp = unary(&mut c, UNARY, tonic::Request::new(msg(n, "")))
                    .await
                    .unwrap();
                let (meta, body, _) = rsp.into_parts();
                assert_eq!(body.n, n + 1);
                assert_eq!(meta.get("x-backend").unwrap(), body.text.as_str());
                names.push(body.text);
            }
            names
        }));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for name in within("callers", Duration::from_secs(30), t).await.unwrap() {
            *seen.entry(name).or_default() += 1;
        }
    }
    assert_eq!(seen.values().sum::<usize>(), 300);
    for b in &backends {
        let n = seen.get(&b.name).copied().unwrap_or(0);
        assert!(
            n >= 30,
            "backend {} served only {n} of 300: {seen:?}",
            b.name
        );
        assert_eq!(b.hits(), n);
    }
}
