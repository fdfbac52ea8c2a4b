//! HTTP/2 client connections: the abuse guard, and GOAWAY rather than a bare close.
//!
//! hyper and h2 bound what h2 sees by itself: concurrent streams
//! (`SETTINGS_MAX_CONCURRENT_STREAMS`), streams the client resets before the server accepted
//! them (back-to-back rapid reset), streams h2 had to reset for the client's protocol errors,
//! and CONTINUATION floods; each ends the connection with GOAWAY ENHANCE_YOUR_CALM. What h2
//! cannot see is a stream that was accepted, handed to the service and sent upstream, and
//! then reset by the client ("paced" rapid reset, CVE-2023-44487): each one costs an upstream
//! request while the client never holds more than its concurrency. This module adds:
//!
//! - **Premature-reset accounting** (`StreamGuard`, `ConnState`): every stream the service
//!   is called for carries a guard, moved into the response body; dropped before the response
//!   ended, the client reset it (or left). A reset within `premature_reset_lifetime` of the
//!   stream's start is *premature*. Once a connection has ended `premature_reset_min_streams`
//!   streams, more than half of them premature closes it with GOAWAY ENHANCE_YOUR_CALM
//!   (Envoy's rule). The counts are halved whenever they reach twice the minimum, so the rule
//!   looks at roughly the last `min..2*min` streams: a client cannot bank a long good history
//!   and then reset freely. Streams that arrive once the connection is condemned are answered
//!   503 at once and never sent upstream.
//! - **A frame-boundary IO wrapper** ([`Wire`]): hyper has no GOAWAY with a chosen code. The
//!   wrapper follows the HTTP/2 frame boundaries of the bytes hyper writes (9-byte frame
//!   headers; payloads skipped) and the stream ids of the HEADERS the client sends. To close,
//!   hyper may finish the frame it is writing and no more; it is then dropped, and our GOAWAY
//!   (last stream id: the highest the client opened, never above one h2 already announced)
//!   goes out on the same socket, followed by a FIN and a short lingering read so that the
//!   client gets to read it.
//! - **Resets relayed gently** (`ConnState::settle`): a request the client resets right after
//!   it was sent upstream runs on until the endpoint answered its head (for 100 ms at most)
//!   before it is cancelled there, so that the endpoint's own rapid-reset limits (hyper's: 20
//!   streams reset before it accepted them) never close meshlet's pooled connection, which
//!   every client shares.
//! - **The end of the shutdown grace** ([`Limits::close_all`]): connections still open when
//!   `shutdown_grace` is over get the same close with GOAWAY NO_ERROR instead of a bare EOF.
//!
//! GOAWAY frames h2 writes on its own (NO_ERROR when draining or idle, its ENHANCE_YOUR_CALM limits,
//! protocol errors) are seen by the wrapper and counted too.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use parking_lot::Mutex;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::body::{Body, BodyError};
use crate::config::Http2Config;
use crate::proxy::Direction;

/// How long hyper may take to finish the frame it is writing when we close; a client that
/// does not read keeps it from finishing, and then the connection is closed without GOAWAY.
const FINISH_FRAME: Duration = Duration::from_secs(1);
/// How long writing our GOAWAY may take.
const WRITE_GOAWAY: Duration = Duration::from_secs(1);
/// After a GOAWAY and FIN (ours or h2's), what the client still sends is read and dropped for
/// this long, or up to `LINGER_BYTES` (see `linger`).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;
/// A stream the client resets this soon after it started is not cancelled upstream at once: the
/// upstream request runs on until its response head arrives, for this long at most (see
/// `ConnState::settle`).
const RESET_SETTLE: Duration = Duration::from_millis(100);
/// At most this many upstream requests settle at once (proxy-wide); more are cancelled at once.
const MAX_SETTLING: usize = 1024;

const FRAME_HEADERS: u8 = 0x1;
const FRAME_GOAWAY: u8 = 0x7;
const NO_ERROR: u32 = 0x0;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const CLIENT_PREFACE_LEN: usize = 24;
const MAX_STREAM_ID: u32 = (1 << 31) - 1;

/// The metric families of this module, registered on the proxy's registry (one proxy per
/// registry).
struct Metrics {
    goaway: IntCounterVec,
    premature: IntCounterVec,
}

impl Metrics {
    fn new(r: &Registry) -> Metrics {
        let goaway = IntCounterVec::new(
            Opts::new(
                "meshlet_http2_goaway_total",
                "HTTP/2 client connections sent GOAWAY, by reason",
            ),
            &["direction", "reason"],
        )
        .expect("valid metric");
        let premature = IntCounterVec::new(
            Opts::new(
                "meshlet_http2_premature_resets_total",
                "HTTP/2 streams the client reset soon after they were sent upstream",
            ),
            &["direction"],
        )
        .expect("valid metric");
        for c in [&goaway, &premature] {
            r.register(Box::new(c.clone())).expect("unique metric");
        }
        Metrics { goaway, premature }
    }
}

/// Why we close a connection with our own GOAWAY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    PrematureResets,
    ShutdownGrace,
}

impl Close {
    fn code(self) -> u32 {
        match self {
            Close::PrematureResets => ENHANCE_YOUR_CALM,
            Close::ShutdownGrace => NO_ERROR,
        }
    }

    /// The metric label.
    fn reason(self) -> &'static str {
        match self {
            Close::PrematureResets => "premature_resets",
            Close::ShutdownGrace => "shutdown_grace",
        }
    }

    /// The GOAWAY's debug data, for the client's logs.
    fn debug_data(self) -> &'static [u8] {
        match self {
            Close::PrematureResets => b"meshlet: too many streams reset by the client",
            Close::ShutdownGrace => b"meshlet: shutdown grace period over",
        }
    }
}

/// The metric label of a GOAWAY that h2 wrote on its own.
fn h2_reason(code: u32) -> &'static str {
    match code {
        NO_ERROR => "graceful",
        ENHANCE_YOUR_CALM => "enhance_your_calm",
        _ => "protocol_error",
    }
}

/// A GOAWAY frame (RFC 9113 6.8).
fn goaway_frame(last_stream_id: u32, code: u32, debug: &[u8]) -> Vec<u8> {
    let len = 8 + debug.len();
    let mut f = Vec::with_capacity(9 + len);
    f.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    f.push(FRAME_GOAWAY);
    f.push(0);
    f.extend_from_slice(&0u32.to_be_bytes());
    f.extend_from_slice(&(last_stream_id & MAX_STREAM_ID).to_be_bytes());
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(debug);
    f
}

/// The HTTP/2 settings and state shared by every client connection of the proxy.
pub struct Limits {
    settings: Http2Config,
    metrics: Metrics,
    /// Cancelled when the shutdown grace is over.
    grace_over: CancellationToken,
    /// The connections open now.
    conns: TaskTracker,
    /// Upstream requests settling after their client reset them.
    settling: Arc<AtomicUsize>,
}

impl Limits {
    pub fn new(config: &Http2Config, registry: &Registry) -> Arc<Limits> {
        Arc::new(Limits {
            settings: config.clone(),
            metrics: Metrics::new(registry),
            grace_over: CancellationToken::new(),
            conns: TaskTracker::new(),
            settling: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Applies the stream limits to hyper's HTTP/2 server builder.
    pub fn configure<'b, E>(
        &self,
        b: &'b mut hyper::server::conn::http2::Builder<E>,
    ) -> &'b mut hyper::server::conn::http2::Builder<E> {
        let s = &self.settings;
        b.max_concurrent_streams(s.max_concurrent_streams)
            .max_pending_accept_reset_streams(s.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(s.max_local_error_reset_streams)
    }

    /// Starts guarding a client connection: the IO to hand to hyper, and the guard that
    /// wraps the service and drives the connection.
    pub fn connection<I>(self: &Arc<Self>, io: I, direction: Direction) -> (Wire<I>, ConnGuard<I>)
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let state = Arc::new(ConnState::new(
            &self.settings,
            self.metrics
                .premature
                .with_label_values(&[direction.as_str()]),
            self.settling.clone(),
        ));
        let wire = Arc::new(Mutex::new(WireInner {
            io,
            out: Frames::default(),
            inp: Frames {
                preface: CLIENT_PREFACE_LEN,
                ..Frames::default()
            },
            stopping: false,
            max_client_stream: 0,
            h2_goaway: None,
            counted: None,
            goaway: self.metrics.goaway.clone(),
            direction,
        }));
        (
            Wire {
                inner: wire.clone(),
                state: state.clone(),
            },
            ConnGuard {
                wire,
                state,
                limits: self.clone(),
                direction,
                _open: self.conns.token(),
            },
        )
    }

    /// The shutdown grace is over: every HTTP/2 client connection still open is sent GOAWAY
    /// NO_ERROR and closed. Waits up to `wait` for them to be done.
    pub async fn close_all(&self, wait: Duration) {
        self.grace_over.cancel();
        self.conns.close();
        let _ = tokio::time::timeout(wait, self.conns.wait()).await;
    }
}

// ===== per connection =====

/// A connection's stream accounting.
struct ConnState {
    min_streams: u64,
    lifetime: Duration,
    counts: Mutex<Counts>,
    /// Cancelled when the connection is to be closed for its resets.
    condemned: CancellationToken,
    /// Set once the connection is ending: streams dropped from then on were not reset by the
    /// client.
    ending: AtomicBool,
    /// Woken when hyper reached a frame boundary after we asked it to stop.
    boundary: Notify,
    premature: IntCounter,
    /// The proxy-wide count of settling upstream requests.
    settling: Arc<AtomicUsize>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    /// Streams ended (completed, failed or reset), in the current window.
    ended: u64,
    /// Of those, reset by the client within the lifetime.
    premature: u64,
}

impl ConnState {
    fn new(s: &Http2Config, premature: IntCounter, settling: Arc<AtomicUsize>) -> ConnState {
        ConnState {
            min_streams: u64::from(s.premature_reset_min_streams),
            lifetime: s.premature_reset_lifetime.0,
            counts: Mutex::new(Counts::default()),
            condemned: CancellationToken::new(),
            ending: AtomicBool::new(false),
            boundary: Notify::new(),
            premature,
            settling,
        }
    }

    fn is_ending(&self) -> bool {
        self.ending.load(Ordering::Relaxed)
    }

    fn set_ending(&self) {
        self.ending.store(true, Ordering::Relaxed);
    }

    /// A stream ended; `reset_after` is how long it had lived when the client reset it.
    fn stream_ended(&self, reset_after: Option<Duration>) {
        if self.is_ending() {
            return;
        }
        let premature = reset_after.is_some_and(|d| d < self.lifetime);
        if premature {
            self.premature.inc();
        }
        if self.min_streams == 0 {
            return;
        }
        let mut c = self.counts.lock();
        let verdict = count(&mut c, premature, self.min_streams);
        drop(c);
        if verdict {
            self.condemned.cancel();
        }
    }

    fn condemned(&self) -> bool {
        self.condemned.is_cancelled()
    }

    /// A stream's service future was dropped before its response (the client reset the stream,
    /// or the connection ended). Dropping it cancels the upstream request: an RST_STREAM to the
    /// endpoint. Sent right after the request, that reset can reach the endpoint before it
    /// accepted the stream, and h2 servers (hyper's among them) count such resets as rapid
    /// reset and close the connection with ENHANCE_YOUR_CALM: meshlet's pooled connection,
    /// shared by every client, and its in-flight requests fail. So a request younger than
    /// `RESET_SETTLE` settles first: it runs on until its response head arrives (the endpoint
    /// accepted it; the response is then dropped, which resets an accepted stream), for
    /// `RESET_SETTLE` at most. That is at most `RESET_SETTLE` of extra life for requests the
    /// client gave up on, and at most `MAX_SETTLING` of them at once. A future never polled
    /// sent nothing: it is just dropped.
    fn settle<F>(&self, f: Pin<Box<F>>, age: Duration)
    where
        F: Future + Send + 'static,
    {
        if age >= RESET_SETTLE {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.settling.fetch_add(1, Ordering::Relaxed) >= MAX_SETTLING {
            self.settling.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let settling = Settling(self.settling.clone());
        rt.spawn(async move {
            let _settling = settling;
            let _ = tokio::time::timeout(RESET_SETTLE, f).await;
        });
    }
}

/// Counts a settling request while it lives.
struct Settling(Arc<AtomicUsize>);

impl Drop for Settling {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts an ended stream; true when the connection has to go: at least `min` streams ended
/// and more than half of them premature. The window decays: at `2 * min` both counts halve.
fn count(c: &mut Counts, premature: bool, min: u64) -> bool {
    c.ended += 1;
    if premature {
        c.premature += 1;
    }
    let condemned = c.ended >= min && c.premature * 2 > c.ended;
    if c.ended >= 2 * min {
        c.ended /= 2;
        c.premature /= 2;
    }
    condemned
}

/// The connection as `serve_http` holds it: wraps the service and drives hyper's connection.
pub struct ConnGuard<I> {
    wire: Arc<Mutex<WireInner<I>>>,
    state: Arc<ConnState>,
    limits: Arc<Limits>,
    direction: Direction,
    _open: TaskTrackerToken,
}

impl<I> ConnGuard<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    /// The service for hyper: every stream carries a `StreamGuard`.
    pub fn service<S>(&self, inner: S) -> GuardedService<S> {
        GuardedService {
            inner,
            state: self.state.clone(),
        }
    }

    /// Runs hyper's connection: `graceful` once `graceful_when` resolves (the drain signal, an
    /// idle connection: hyper's GOAWAY and drain); our GOAWAY and close when the connection is
    /// condemned or the shutdown grace is over.
    pub async fn drive<C>(
        self,
        conn: C,
        graceful: impl FnOnce(Pin<&mut C>),
        graceful_when: impl Future<Output = ()>,
    ) -> hyper::Result<()>
    where
        C: Future<Output = hyper::Result<()>>,
    {
        let end = {
            let mut conn = std::pin::pin!(conn);
            let mut graceful_when = std::pin::pin!(graceful_when);
            let mut graceful = Some(graceful);
            let close = loop {
                tokio::select! {
                    r = conn.as_mut() => break Err(r),
                    _ = &mut graceful_when, if graceful.is_some() => {
                        if let Some(g) = graceful.take() {
                            g(conn.as_mut());
                        }
                    }
                    _ = self.state.condemned.cancelled() => break Ok(Close::PrematureResets),
                    _ = self.limits.grace_over.cancelled() => break Ok(Close::ShutdownGrace),
                }
            };
            self.state.set_ending();
            match close {
                Err(r) => End::Hyper(r),
                Ok(close) => {
                    // hyper may finish the frame it is writing, and no more.
                    self.wire.lock().stopping = true;
                    let finish = tokio::time::sleep(FINISH_FRAME);
                    tokio::pin!(finish);
                    loop {
                        if self.wire.lock().out.at_boundary() {
                            break End::Ours(close);
                        }
                        tokio::select! {
                            r = conn.as_mut() => break End::Hyper(r),
                            _ = self.state.boundary.notified() => {}
                            _ = &mut finish => break End::Stuck,
                        }
                    }
                }
            }
            // hyper's connection (and its end of the IO) is dropped here.
        };
        let Ok(wire) = Arc::try_unwrap(self.wire) else {
            return Ok(());
        };
        let wire = wire.into_inner();
        let last = wire.last_stream_id();
        let h2_sent_goaway = wire.h2_goaway.is_some();
        let wrote_any = wire.out.frames > 0;
        let (mut io, goaway) = (wire.io, wire.goaway);
        let close = match end {
            End::Hyper(r) => {
                if h2_sent_goaway {
                    linger(&mut io).await;
                }
                return r;
            }
            End::Stuck => {
                tracing::debug!("http2: the client does not read; closing without GOAWAY");
                return Ok(());
            }
            // Before hyper's SETTINGS a GOAWAY would break the server preface.
            End::Ours(_) if !wrote_any => return Ok(()),
            End::Ours(close) => close,
        };
        let frame = goaway_frame(last, close.code(), close.debug_data());
        let sent = tokio::time::timeout(WRITE_GOAWAY, async {
            io.write_all(&frame).await?;
            io.flush().await?;
            io.shutdown().await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::debug!("http2: could not write GOAWAY; closing");
            return Ok(());
        }
        goaway
            .with_label_values(&[self.direction.as_str(), close.reason()])
            .inc();
        tracing::debug!(
            reason = close.reason(),
            last_stream_id = last,
            "http2: closed the client connection with GOAWAY"
        );
        linger(&mut io).await;
        Ok(())
    }
}

/// How a connection's drive ended.
enum End {
    /// hyper's connection ended by itself (the client left, or h2 closed it).
    Hyper(hyper::Result<()>),
    /// We close it with our GOAWAY.
    Ours(Close),
    /// We wanted to close it, but hyper could not finish its frame (the client does not read).
    Stuck,
}

/// A lingering close: after a GOAWAY and FIN, what the client still sends is read and dropped
/// until it closes (briefly), so that closing with unread data (a TCP RST) does not destroy the
/// GOAWAY before the client read it.
async fn linger<I: AsyncRead + Unpin>(io: &mut I) {
    let _ = tokio::time::timeout(LINGER, async {
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

// ===== per stream =====

/// Lives as long as a stream is served: in the service's future, then in the response body.
/// Dropped before the response ended, the stream was reset by the client (or the connection
/// ended, which `ConnState` tells apart).
struct StreamGuard {
    state: Arc<ConnState>,
    started: Instant,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let reset_after = (!self.finished).then(|| self.started.elapsed());
        self.state.stream_ended(reset_after);
    }
}

/// The connection's service, with a `StreamGuard` per stream. A condemned connection's new
/// streams are answered 503 at once, never sent upstream.
pub struct GuardedService<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for GuardedService<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes, Error = BodyError>,
{
    type Response = Response<GuardedBody<B>>;
    type Error = Infallible;
    type Future = GuardedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        if self.state.condemned() {
            let grpc = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            return GuardedFuture {
                inner: None,
                guard: None,
                grpc,
                polled: false,
            };
        }
        GuardedFuture {
            guard: Some(StreamGuard {
                state: self.state.clone(),
                started: Instant::now(),
                finished: false,
            }),
            inner: Some(Box::pin(self.inner.call(req))),
            grpc: false,
            polled: false,
        }
    }
}

/// The service's future for one stream, with the stream's guard. Dropped before it is done,
/// the client reset the stream: the guard counts it, and the upstream request settles (see
/// `ConnState::settle`).
pub struct GuardedFuture<F>
where
    F: Future + Send + 'static,
{
    inner: Option<Pin<Box<F>>>,
    guard: Option<StreamGuard>,
    grpc: bool,
    /// Whether `inner` was polled (and may have sent its request upstream).
    polled: bool,
}

impl<F, B> Future for GuardedFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = Bytes, Error = BodyError>,
{
    type Output = Result<Response<GuardedBody<B>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            let rsp = super::error::ProxyError::ConnectionClosing.response(this.grpc);
            return Poll::Ready(Ok(rsp.map(|b| GuardedBody {
                inner: None,
                own: Some(b),
                guard: None,
            })));
        };
        this.polled = true;
        let Ok(rsp) = ready!(inner.as_mut().poll(cx));
        this.inner = None;
        let guard = this.guard.take();
        Poll::Ready(Ok(rsp.map(|b| GuardedBody {
            inner: Some(b),
            own: None,
            guard,
        })))
    }
}

impl<F> Drop for GuardedFuture<F>
where
    F: Future + Send + 'static,
{
    fn drop(&mut self) {
        let (Some(inner), Some(guard)) = (self.inner.take(), self.guard.take()) else {
            return;
        };
        let (state, age) = (guard.state.clone(), guard.started.elapsed());
        // Counted now, whatever the upstream request does next.
        drop(guard);
        if self.polled {
            state.settle(inner, age);
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body carrying its stream's guard: read to its end (or failed on the
    /// server's side: an upstream error, a deadline), the stream is finished; dropped before
    /// that, the client reset it. `own`: meshlet's answer to a stream it refused.
    pub struct GuardedBody<B>
    where
        B: http_body::Body,
    {
        #[pin]
        inner: Option<B>,
        own: Option<Body>,
        guard: Option<StreamGuard>,
    }

    impl<B> PinnedDrop for GuardedBody<B>
    where
        B: http_body::Body,
    {
        fn drop(this: Pin<&mut Self>) {
            // hyper stops polling once `is_end_stream` says so.
            if this.is_end_stream() {
                if let Some(g) = this.project().guard.as_mut() {
                    g.finished = true;
                }
            }
        }
    }
}

impl<B: http_body::Body> GuardedBody<B> {
    fn is_end_stream(&self) -> bool {
        match (&self.inner, &self.own) {
            (Some(b), _) => b.is_end_stream(),
            (None, Some(b)) => http_body::Body::is_end_stream(b),
            (None, None) => true,
        }
    }
}

impl<B> http_body::Body for GuardedBody<B>
where
    B: http_body::Body<Data = Bytes, Error = BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.as_mut().project();
        let r = match (this.inner.as_pin_mut(), this.own) {
            (Some(b), _) => ready!(b.poll_frame(cx)),
            (None, Some(b)) => ready!(Pin::new(b).poll_frame(cx)),
            (None, None) => None,
        };
        // An error is the server's side (upstream, a deadline), not the client's doing.
        let finished = match &r {
            None | Some(Err(_)) => true,
            Some(Ok(_)) => GuardedBody::is_end_stream(&self),
        };
        if finished {
            if let Some(g) = self.as_mut().project().guard.as_mut() {
                g.finished = true;
            }
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        GuardedBody::is_end_stream(self)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.own) {
            (Some(b), _) => b.size_hint(),
            (None, Some(b)) => http_body::Body::size_hint(b),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

// ===== the frame-boundary IO wrapper =====

/// The client connection's IO as hyper sees it: follows HTTP/2 frame boundaries both ways.
pub struct Wire<I> {
    inner: Arc<Mutex<WireInner<I>>>,
    state: Arc<ConnState>,
}

struct WireInner<I> {
    io: I,
    /// Frames hyper writes.
    out: Frames,
    /// Frames the client sends (after its preface).
    inp: Frames,
    /// Closing: hyper may finish the frame it is writing, no more.
    stopping: bool,
    /// The highest stream id the client opened (HEADERS on an odd stream).
    max_client_stream: u32,
    /// The last stream id of the last GOAWAY h2 wrote.
    h2_goaway: Option<u32>,
    /// The last GOAWAY code counted (h2 drains with two GOAWAY frames: one count).
    counted: Option<u32>,
    goaway: IntCounterVec,
    direction: Direction,
}

impl<I> WireInner<I> {
    /// For our GOAWAY: the streams the client opened, and never more than h2 announced.
    fn last_stream_id(&self) -> u32 {
        self.max_client_stream
            .min(self.h2_goaway.unwrap_or(MAX_STREAM_ID))
    }
}

/// What the frame parser reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Header { kind: u8, stream: u32 },
    GoAway { last_stream_id: u32, code: u32 },
}

/// Follows frame boundaries in a byte stream: frame headers are read, payloads skipped (but
/// for the first 8 bytes of a GOAWAY's).
#[derive(Debug, Clone, Default)]
struct Frames {
    /// Bytes of the client connection preface still to pass.
    preface: usize,
    head: [u8; 9],
    /// Bytes of the current frame's header seen; 9 while in its payload.
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    kind: u8,
    goaway: [u8; 8],
    goaway_len: usize,
    /// Frame headers seen.
    frames: u64,
}

impl Frames {
    fn at_boundary(&self) -> bool {
        self.preface == 0 && self.have == 0 && self.left == 0
    }

    /// Consumes `buf`, reporting frame headers and GOAWAY payloads. With `stop`, consumes only
    /// up to the end of the current frame (nothing when at a boundary already). Returns the
    /// bytes consumed.
    fn feed(&mut self, mut buf: &[u8], stop: bool, on: &mut impl FnMut(Event)) -> usize {
        if stop && self.at_boundary() {
            return 0;
        }
        let total = buf.len();
        while !buf.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(buf.len());
                self.preface -= n;
                buf = &buf[n..];
                continue;
            }
            if self.have < 9 {
                let n = (9 - self.have).min(buf.len());
                self.head[self.have..self.have + n].copy_from_slice(&buf[..n]);
                self.have += n;
                buf = &buf[n..];
                if self.have == 9 {
                    let h = self.head;
                    self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                    self.kind = h[3];
                    self.goaway_len = 0;
                    self.frames += 1;
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & MAX_STREAM_ID;
                    on(Event::Header {
                        kind: self.kind,
                        stream,
                    });
                    if self.left == 0 {
                        self.have = 0;
                        if stop {
                            break;
                        }
                    }
                }
                continue;
            }
            let n = self.left.min(buf.len());
            if self.kind == FRAME_GOAWAY && self.goaway_len < 8 {
                let c = (8 - self.goaway_len).min(n);
                self.goaway[self.goaway_len..self.goaway_len + c].copy_from_slice(&buf[..c]);
                self.goaway_len += c;
                if self.goaway_len == 8 {
                    let g = self.goaway;
                    on(Event::GoAway {
                        last_stream_id: u32::from_be_bytes([g[0], g[1], g[2], g[3]])
                            & MAX_STREAM_ID,
                        code: u32::from_be_bytes([g[4], g[5], g[6], g[7]]),
                    });
                }
            }
            self.left -= n;
            buf = &buf[n..];
            if self.left == 0 {
                self.have = 0;
                if stop {
                    break;
                }
            }
        }
        total - buf.len()
    }
}

impl<I> WireInner<I> {
    /// Accounts for bytes written to the client.
    fn wrote<'a>(&mut self, bufs: impl IntoIterator<Item = &'a [u8]>, mut n: usize) {
        let WireInner {
            out,
            h2_goaway,
            counted,
            goaway,
            direction,
            ..
        } = self;
        let mut on = |e: Event| {
            if let Event::GoAway {
                last_stream_id,
                code,
            } = e
            {
                *h2_goaway = Some(last_stream_id);
                if *counted != Some(code) {
                    *counted = Some(code);
                    goaway
                        .with_label_values(&[direction.as_str(), h2_reason(code)])
                        .inc();
                }
            }
        };
        for b in bufs {
            if n == 0 {
                break;
            }
            let k = n.min(b.len());
            out.feed(&b[..k], false, &mut on);
            n -= k;
        }
    }

    /// While stopping: how much of `buf` hyper may still write (the rest of its frame).
    fn allowed(&self, buf: &[u8]) -> usize {
        if !self.stopping {
            return buf.len();
        }
        self.out.clone().feed(buf, true, &mut |_| {})
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Wire<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut w = self.inner.lock();
        let before = buf.filled().len();
        ready!(Pin::new(&mut w.io).poll_read(cx, buf))?;
        let WireInner {
            inp,
            max_client_stream,
            ..
        } = &mut *w;
        inp.feed(&buf.filled()[before..], false, &mut |e| {
            if let Event::Header {
                kind: FRAME_HEADERS,
                stream,
            } = e
            {
                if stream % 2 == 1 && stream > *max_client_stream {
                    *max_client_stream = stream;
                }
            }
        });
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> Wire<I> {
    fn poll_write_one(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut w = self.inner.lock();
        let allowed = w.allowed(buf);
        if allowed == 0 && !buf.is_empty() {
            // At a boundary while stopping: hyper waits here until it is dropped.
            self.state.boundary.notify_one();
            return Poll::Pending;
        }
        let n = ready!(Pin::new(&mut w.io).poll_write(cx, &buf[..allowed]))?;
        w.wrote([buf], n);
        if w.stopping && w.out.at_boundary() {
            self.state.boundary.notify_one();
        }
        Poll::Ready(Ok(n))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Wire<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_one(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let stopping = self.inner.lock().stopping;
        if stopping {
            // Rare (once per closing connection): one slice at a time.
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.poll_write_one(cx, first);
        }
        let mut w = self.inner.lock();
        let n = ready!(Pin::new(&mut w.io).poll_write_vectored(cx, bufs))?;
        w.wrote(bufs.iter().map(|b| &b[..]), n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.lock().io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner.lock().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner.lock().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(0);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn events(f: &mut Frames, bytes: &[u8], chunk: usize) -> Vec<Event> {
        let mut out = Vec::new();
        for c in bytes.chunks(chunk) {
            assert_eq!(f.feed(c, false, &mut |e| out.push(e)), c.len());
        }
        out
    }

    #[test]
    fn frames_are_followed_across_any_split() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, &[]));
        bytes.extend(frame(FRAME_HEADERS, 1, &[0x82, 0x86, 0x84]));
        bytes.extend(frame(0x0, 1, &[7; 100]));
        bytes.extend(goaway_frame(5, ENHANCE_YOUR_CALM, b"calm"));
        bytes.extend(frame(FRAME_HEADERS, 3, &[0x82]));
        for chunk in 1..=bytes.len() {
            let mut f = Frames {
                preface: CLIENT_PREFACE_LEN,
                ..Frames::default()
            };
            let ev = events(&mut f, &bytes, chunk);
            assert_eq!(
                ev,
                vec![
                    Event::Header { kind: 4, stream: 0 },
                    Event::Header {
                        kind: FRAME_HEADERS,
                        stream: 1
                    },
                    Event::Header { kind: 0, stream: 1 },
                    Event::Header {
                        kind: FRAME_GOAWAY,
                        stream: 0
                    },
                    Event::GoAway {
                        last_stream_id: 5,
                        code: ENHANCE_YOUR_CALM
                    },
                    Event::Header {
                        kind: FRAME_HEADERS,
                        stream: 3
                    },
                ],
                "chunks of {chunk}"
            );
            assert!(f.at_boundary(), "chunks of {chunk}");
            assert_eq!(f.frames, 5);
        }
    }

    #[test]
    fn stopping_consumes_only_the_rest_of_the_current_frame() {
        let a = frame(0x0, 1, &[1; 10]);
        let b = frame(0x0, 3, &[2; 10]);
        let both = [a.clone(), b].concat();
        let mut f = Frames::default();
        assert_eq!(
            f.feed(&both, true, &mut |_| {}),
            0,
            "at a boundary: nothing"
        );
        // Mid-header, mid-payload, at the last byte.
        for done in [1, 5, 9, 12, 18] {
            let mut f = Frames::default();
            f.feed(&both[..done], false, &mut |_| {});
            assert!(!f.at_boundary());
            let n = f.clone().feed(&both[done..], true, &mut |_| {});
            assert_eq!(done + n, a.len(), "after {done} bytes");
            f.feed(&both[done..done + n], false, &mut |_| {});
            assert!(f.at_boundary());
        }
        // The rest of the header not yet in hand: all of it is before the boundary.
        let mut f = Frames::default();
        f.feed(&a[..3], false, &mut |_| {});
        assert_eq!(f.clone().feed(&a[3..6], true, &mut |_| {}), 3);
    }

    #[test]
    fn goaway_frame_layout() {
        let f = goaway_frame(7, NO_ERROR, b"bye");
        assert_eq!(
            f,
            [
                &[0, 0, 11, FRAME_GOAWAY, 0, 0, 0, 0, 0][..],
                &[0, 0, 0, 7, 0, 0, 0, 0],
                b"bye"
            ]
            .concat()
        );
    }

    fn run(pattern: impl Fn(u64) -> bool, n: u64, min: u64) -> Option<u64> {
        let mut c = Counts::default();
        (0..n)
            .find(|&i| count(&mut c, pattern(i), min))
            .map(|i| i + 1)
    }

    #[test]
    fn the_premature_reset_rule() {
        // Every stream reset: condemned at the minimum.
        assert_eq!(run(|_| true, 10_000, 100), Some(100));
        // One in five, or every other one (not more than half): never.
        assert_eq!(run(|i| i % 5 == 0, 100_000, 100), None);
        assert_eq!(run(|i| i % 2 == 1, 100_000, 100), None);
        // Two in three: condemned once the minimum is reached.
        assert!(run(|i| i % 3 != 0, 10_000, 100).is_some_and(|n| n <= 101));
        // A long good history buys at most about `min` resets, not its length.
        let good = 1_000_000;
        let n = run(|i| i >= good, good + 10_000, 100).expect("condemned");
        assert!(
            n - good <= 200,
            "{} resets after the good history",
            n - good
        );
    }

    #[test]
    fn config_refuses_zero_concurrent_streams() {
        let e = crate::config::Config::parse("c.yaml", "http2:\n  max_concurrent_streams: 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("http2.max_concurrent_streams: 0 is out of range (allowed: 1 to 1000000)"),
            "{e}"
        );
        let c = crate::config::Config::parse(
            "c.yaml",
            "http2:\n  premature_reset_min_streams: 0\n  premature_reset_lifetime: 250ms\n",
        )
        .unwrap();
        assert_eq!(c.http2.premature_reset_min_streams, 0);
        assert_eq!(
            c.http2.premature_reset_lifetime.0,
            Duration::from_millis(250)
        );
        assert_eq!(c.http2.max_concurrent_streams, 200);
    }

    fn limits() -> Arc<Limits> {
        Limits::new(&Http2Config::default(), &Registry::new())
    }

    #[test]
    fn a_stream_dropped_before_its_end_is_a_client_reset() {
        let l = limits();
        let (_wire, guard) = l.connection(tokio::io::empty(), Direction::Inbound);
        let state = guard.state.clone();
        let g = || StreamGuard {
            state: state.clone(),
            started: Instant::now(),
            finished: false,
        };
        // Ended: read to the end, or an empty body.
        drop(GuardedBody {
            inner: Some(Body::empty()),
            own: None,
            guard: Some(g()),
        });
        // Dropped mid-body, and dropped before the response: reset.
        drop(GuardedBody {
            inner: Some(Body::full("x")),
            own: None,
            guard: Some(g()),
        });
        drop(g());
        assert_eq!(
            *state.counts.lock(),
            Counts {
                ended: 3,
                premature: 2
            }
        );
        assert_eq!(state.premature.get(), 2);
        // Once the connection is ending, drops are not the client's doing.
        state.set_ending();
        drop(g());
        assert_eq!(state.premature.get(), 2);
    }

    /// A future standing for `http::handle`: answers after `delay`, and says whether it
    /// finished or was dropped before.
    fn upstream(
        delay: Duration,
        done: &Arc<AtomicUsize>,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + 'static {
        struct Dropped(Arc<AtomicUsize>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(100, Ordering::SeqCst);
            }
        }
        let d = Dropped(done.clone());
        let done = done.clone();
        async move {
            let _d = d;
            tokio::time::sleep(delay).await;
            done.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(Body::empty()))
        }
    }

    fn guarded<F>(f: F, state: &Arc<ConnState>) -> GuardedFuture<F>
    where
        F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
    {
        GuardedFuture {
            inner: Some(Box::pin(f)),
            guard: Some(StreamGuard {
                state: state.clone(),
                started: Instant::now(),
                finished: false,
            }),
            grpc: false,
            polled: false,
        }
    }

    /// Polls once: whether it is pending.
    async fn poll_once<F>(f: &mut GuardedFuture<F>) -> bool
    where
        F: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
    {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx).is_pending())).await
    }

    #[tokio::test]
    async fn a_request_reset_young_settles_upstream_for_a_while() {
        let l = limits();
        let (_wire, guard) = l.connection(tokio::io::empty(), Direction::Outbound);
        let state = &guard.state;
        let future = |delay, done| guarded(upstream(delay, done), state);
        // Sent, then reset: it runs on and gets its answer.
        let (answered, slow, unsent) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let mut f = future(Duration::from_millis(10), &answered);
        assert!(poll_once(&mut f).await);
        drop(f);
        // Sent, reset, and its answer is slow: cancelled after RESET_SETTLE.
        let mut f = future(Duration::from_secs(30), &slow);
        assert!(poll_once(&mut f).await);
        drop(f);
        // Never polled: nothing was sent, nothing runs.
        drop(future(Duration::from_millis(10), &unsent));
        assert_eq!(unsent.load(Ordering::SeqCst), 100);
        assert_eq!(l.settling.load(Ordering::SeqCst), 2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while l.settling.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "still settling");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            answered.load(Ordering::SeqCst),
            101,
            "answered, then dropped"
        );
        assert_eq!(slow.load(Ordering::SeqCst), 100, "dropped unanswered");
        // All three were the client's resets.
        assert_eq!(guard.state.counts.lock().premature, 3);
    }

    #[tokio::test]
    async fn a_stopping_wire_lets_the_current_frame_finish_and_no_more() {
        let l = limits();
        let (client, server) = tokio::io::duplex(1 << 16);
        let (mut wire, guard) = l.connection(server, Direction::Outbound);
        let a = frame(0x0, 1, &[1; 10]);
        let b = frame(0x0, 3, &[2; 10]);
        wire.write_all(&a[..4]).await.unwrap();
        guard.wire.lock().stopping = true;
        // The rest of `a` goes out; `b` is held.
        let both = [&a[4..], &b[..]].concat();
        let n = std::future::poll_fn(|cx| Pin::new(&mut wire).poll_write(cx, &both))
            .await
            .unwrap();
        assert_eq!(n, a.len() - 4);
        let held = std::future::poll_fn(|cx| {
            Poll::Ready(Pin::new(&mut wire).poll_write(cx, &b).is_pending())
        })
        .await;
        assert!(held);
        assert!(guard.wire.lock().out.at_boundary());
        drop((client, wire));
    }
}
