//! The client-facing edge of the HTTP data path: what a connection and a request may cost
//! before meshlet gives up on them, and whose fault a failure is.
//!
//! - [`ConnState`] and [`EdgeIo`]: an HTTP/1 connection is either idle between requests
//!   (closed quietly after `http.idle_timeout`), receiving a request head (408 and close after
//!   `http.header_timeout` from its first byte), or busy with a request (no connection timer;
//!   the request's own timers apply). hyper's single header-read timer cannot tell idle from
//!   slow, so it is off and this wrapper keeps the two apart.
//! - [`Exchange`]: per request, whether the client's side failed (its body broke off or was
//!   malformed: the client's fault, never the endpoint's) and a count of body frames moving
//!   either way, for the stream idle timeout.
//! - [`check_head`]: RFC 9110/9112 rules on the request head before it goes anywhere.
//! - [`ServedBody`]: the response body as the client gets it, still under the request's
//!   deadline and the stream idle timeout after the head went out.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::body::{Body, BodyError};
use super::outcome::{End, RequestEnd};

/// What the edge enforces (`http:` in the config).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub stream_idle_timeout: Duration,
}

impl Settings {
    pub fn from_config(h: &crate::config::HttpConfig) -> Settings {
        Settings {
            max_header_bytes: h.max_header_bytes as usize,
            header_timeout: h.header_timeout.0,
            idle_timeout: h.idle_timeout.0,
            stream_idle_timeout: h.stream_idle_timeout.0,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_config(&crate::config::HttpConfig::default())
    }
}

/// One client connection's state, shared by its IO wrapper and its requests.
pub struct ConnState {
    /// What the client connected to: the original destination, or the listener's address.
    pub dst: SocketAddr,
    pub settings: Settings,
    /// Requests started on this connection.
    started: AtomicU64,
    /// Requests whose response has not ended.
    busy: AtomicUsize,
    /// When the last response ended (ms since `base`).
    last_end_ms: AtomicU64,
    /// The connection was upgraded (WebSocket and the like): no HTTP timers any more.
    upgraded: AtomicBool,
    /// The connection's reader, parked while a request was in flight: woken when the last
    /// response ends, so that its idle timer starts.
    reader: parking_lot::Mutex<Option<std::task::Waker>>,
    /// Bytes of a request head are arriving (HTTP/1): the connection is not idle.
    reading_head: AtomicBool,
    /// hyper is being stopped to park the connection: its shutdown must not close the socket.
    parking: AtomicBool,
    base: std::time::Instant,
}

impl ConnState {
    pub fn new(dst: SocketAddr, settings: Settings) -> Arc<ConnState> {
        Arc::new(ConnState {
            dst,
            settings,
            started: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            reader: parking_lot::Mutex::new(None),
            reading_head: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            base: std::time::Instant::now(),
        })
    }

    /// A request started; the guard marks its response's end when dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// Marks hyper's coming shutdown of an HTTP/1 connection as a park (the socket stays open)
    /// or not.
    pub fn set_parking(&self, parking: bool) {
        self.parking.store(parking, Ordering::Release);
    }

    /// How long the connection has had no request in flight and (HTTP/1) no byte of a next
    /// request head; `None` while it has.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0
            || self.upgraded.load(Ordering::Acquire)
            || self.reading_head.load(Ordering::Acquire)
        {
            return None;
        }
        let since = Duration::from_millis(self.last_end_ms.load(Ordering::Acquire));
        Some(self.base.elapsed().saturating_sub(since))
    }
}

/// A request in flight on a connection (see [`ConnState::begin`]).
pub struct Busy(Arc<ConnState>);

impl Drop for Busy {
    fn drop(&mut self) {
        let now = self.0.base.elapsed().as_millis() as u64;
        self.0.last_end_ms.store(now, Ordering::Release);
        if self.0.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waker = self.0.reader.lock().take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

enum Phase {
    /// Receiving the head of the request that follows the `started`-th one.
    Head { after: u64 },
    /// No request in flight and no byte of the next one yet.
    Idle,
    /// A request in flight (or the connection upgraded).
    Busy,
}

pin_project! {
    /// The HTTP/1 client connection as hyper sees it: idle and head timers (see the module
    /// docs). Writes pass through untouched. Its shutdown leaves the socket open while the
    /// connection is being parked ([`ConnState::set_parking`]).
    pub struct EdgeIo<I> {
        #[pin]
        io: I,
        state: Arc<ConnState>,
        settings: Settings,
        phase: Phase,
        // Boxed so that the wrapper is `Unpin` and its stream can be taken back to park it.
        timer: Pin<Box<Sleep>>,
        // A write that may not have reached the socket yet: no 408 may be written then.
        write_pending: bool,
    }
}

impl<I> EdgeIo<I> {
    /// `head_deadline`: when the head of the request whose first byte has arrived must be
    /// complete (`http.header_timeout` from that byte).
    pub fn new(io: I, state: Arc<ConnState>, settings: Settings, head_deadline: Instant) -> Self {
        let after = state.started.load(Ordering::Acquire);
        state.reading_head.store(true, Ordering::Release);
        EdgeIo {
            io,
            state,
            phase: Phase::Head { after },
            timer: Box::pin(tokio::time::sleep_until(head_deadline)),
            settings,
            write_pending: false,
        }
    }

    /// The stream, for a connection being parked.
    pub fn into_inner(self) -> I {
        self.io
    }
}

/// The 408 answer to a request head that did not arrive within `http.header_timeout`.
pub fn timeout_response(after: Duration) -> String {
    format!(
        "HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\
         meshlet-error: request head not received within {} (http.header_timeout)\r\n\r\n",
        humantime::format_duration(after)
    )
}

impl<I: AsyncRead + AsyncWrite> AsyncRead for EdgeIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let state = &**this.state;
        let started = state.started.load(Ordering::Acquire);
        let in_flight =
            state.busy.load(Ordering::Acquire) > 0 || state.upgraded.load(Ordering::Acquire);
        // Move between phases on what the requests did since the last read.
        match *this.phase {
            _ if in_flight => {
                *this.phase = Phase::Busy;
                state.reading_head.store(false, Ordering::Release);
            }
            Phase::Busy => {
                *this.phase = Phase::Idle;
                this.timer
                    .as_mut()
                    .reset(Instant::now() + this.settings.idle_timeout);
            }
            Phase::Head { after } if after != started => {
                // That head arrived and its request ended meanwhile.
                *this.phase = Phase::Idle;
                state.reading_head.store(false, Ordering::Release);
                this.timer
                    .as_mut()
                    .reset(Instant::now() + this.settings.idle_timeout);
            }
            _ => {}
        }
        let before = buf.filled().len();
        match this.io.as_mut().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && matches!(this.phase, Phase::Idle) {
                    *this.phase = Phase::Head { after: started };
                    state.reading_head.store(true, Ordering::Release);
                    this.timer
                        .as_mut()
                        .reset(Instant::now() + this.settings.header_timeout);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if matches!(this.phase, Phase::Busy) {
                    if !state.upgraded.load(Ordering::Acquire) {
                        *state.reader.lock() = Some(cx.waker().clone());
                        // The request may have ended meanwhile.
                        if state.busy.load(Ordering::Acquire) == 0 {
                            cx.waker().wake_by_ref();
                        }
                    }
                    return Poll::Pending;
                }
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                match this.phase {
                    // Idle too long: end it like a client that closed (hyper closes quietly).
                    Phase::Idle => Poll::Ready(Ok(())),
                    _ => {
                        if !*this.write_pending {
                            let rsp = timeout_response(this.settings.header_timeout);
                            let _ = this.io.as_mut().poll_write(cx, rsp.as_bytes());
                        }
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not received within http.header_timeout",
                        )))
                    }
                }
            }
        }
    }
}

impl<I: AsyncWrite> AsyncWrite for EdgeIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        *this.write_pending = true;
        this.io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        *this.write_pending = true;
        this.io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let r = ready!(this.io.poll_flush(cx));
        if r.is_ok() {
            *this.write_pending = false;
        }
        Poll::Ready(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.state.parking.load(Ordering::Acquire) {
            // Parked, not closed: what was written still goes out; the socket stays open.
            return this.io.poll_flush(cx);
        }
        this.io.poll_shutdown(cx)
    }
}

/// One request's exchange with its client: whether the client's side failed, and how much
/// moved either way (for the stream idle timeout).
#[derive(Default)]
pub struct Exchange {
    client_failed: AtomicBool,
    /// meshlet cut the exchange short: its deadline passed or it was idle too long.
    cut: AtomicBool,
    frames: AtomicU64,
}

impl Exchange {
    /// meshlet cut the exchange short (deadline, stream idle timeout): whatever was in flight
    /// to an endpoint then ended as the endpoint's failure, not as a cancellation.
    pub fn was_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    pub(crate) fn mark_cut(&self) {
        self.cut.store(true, Ordering::Release);
    }

    /// The client's request body broke off or was malformed.
    pub fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Acquire)
    }

    pub(crate) fn mark_client_failed(&self) {
        self.client_failed.store(true, Ordering::Release);
    }

    /// A body frame moved (either way).
    pub(crate) fn touch(&self) {
        self.frames.fetch_add(1, Ordering::Relaxed);
    }

    fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}

/// Tracks quiet time in steps of a quarter of the timeout: an exchange is idle once no frame
/// moved for (between 1 and 1.25 times) the timeout. Cheaper than a timer reset per frame.
struct Quiet {
    seen: u64,
    quiet: Duration,
}

impl Quiet {
    fn new(ex: &Exchange) -> Quiet {
        Quiet {
            seen: ex.frames(),
            quiet: Duration::ZERO,
        }
    }

    fn step(timeout: Duration) -> Duration {
        (timeout / 4).max(Duration::from_millis(1))
    }

    /// One step passed: whether the exchange has now been quiet for `timeout`.
    fn expired(&mut self, ex: &Exchange, timeout: Duration) -> bool {
        let now = ex.frames();
        if now != self.seen {
            self.seen = now;
            self.quiet = Duration::ZERO;
            return false;
        }
        self.quiet += Self::step(timeout);
        self.quiet >= timeout
    }
}

/// Resolves once no body frame has moved either way for `timeout`, marking the exchange cut.
pub async fn stream_idle(ex: &Exchange, timeout: Duration) {
    let mut q = Quiet::new(ex);
    loop {
        tokio::time::sleep(Quiet::step(timeout)).await;
        if q.expired(ex, timeout) {
            ex.mark_cut();
            return;
        }
    }
}

/// Resolves when the request's time is up (never without a deadline), marking the exchange
/// cut.
pub async fn deadline_passed(ex: &Exchange, deadline: Option<Duration>) {
    match deadline {
        Some(d) => {
            tokio::time::sleep(d).await;
            ex.mark_cut();
        }
        None => std::future::pending().await,
    }
}

/// Why a request head was refused at the edge: its status and `meshlet-error` reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: String,
}

fn refuse(status: StatusCode, reason: impl Into<String>) -> Result<(), Refusal> {
    Err(Refusal {
        status,
        reason: reason.into(),
    })
}

/// Checks and normalises a request head as an HTTP intermediary must (RFC 9110, RFC 9112)
/// before it is forwarded:
/// - `CONNECT` is refused (405): meshlet forwards requests to services, it is not a tunnel;
/// - HTTP/1.1 needs exactly one valid Host (else 400); HTTP/1.0 without one gets the target's
///   authority or `dst` (what the client connected to), since it goes out as HTTP/1.1;
/// - an absolute-form target's authority replaces Host (RFC 9112 3.2.2) and the target goes out
///   in origin form, as an origin server expects it.
pub fn check_head(parts: &mut http::request::Parts, dst: SocketAddr) -> Result<(), Refusal> {
    if parts.method == Method::CONNECT {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported: meshlet forwards requests to services and tunnels nothing",
        );
    }
    if parts.version == Version::HTTP_2 {
        return Ok(());
    }
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return refuse(StatusCode::BAD_REQUEST, "more than one Host header field");
    }
    let host_ok = parts
        .headers
        .get(header::HOST)
        .map(|h| h.as_bytes().parse_authority());
    if host_ok == Some(false) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the Host header field is not a valid host",
        );
    }
    if let Some(authority) = parts.uri.authority().cloned() {
        // Absolute form: the target's authority wins.
        let value = HeaderValue::from_str(authority.as_str()).map_err(|_| Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: "the request target's authority is not a valid host".into(),
        })?;
        parts.headers.insert(header::HOST, value);
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = http::Uri::from(pq);
    } else if hosts == 0 {
        if parts.version == Version::HTTP_11 {
            return refuse(
                StatusCode::BAD_REQUEST,
                "an HTTP/1.1 request needs a Host header field",
            );
        }
        let value = HeaderValue::from_str(&dst.to_string()).expect("an address is a valid value");
        parts.headers.insert(header::HOST, value);
    }
    Ok(())
}

trait ParseAuthority {
    fn parse_authority(&self) -> bool;
}

impl ParseAuthority for [u8] {
    fn parse_authority(&self) -> bool {
        !self.is_empty() && !self.contains(&b'@') && http::uri::Authority::try_from(self).is_ok()
    }
}

/// Why a served response body ended early.
#[derive(Debug, thiserror::Error)]
pub enum Cut {
    #[error("the request timed out after {0:?} while its response was streaming")]
    Deadline(Duration),
    #[error("no bytes moved either way for {0:?} (http.stream_idle_timeout)")]
    Idle(Duration),
}

/// Counts the requests a [`ServedBody`] cut short.
#[derive(Clone)]
pub struct CutCounters {
    pub deadline: prometheus::IntCounter,
    pub idle: prometheus::IntCounter,
}

pin_project! {
    /// The response body as the client gets it: the request's deadline and the stream idle
    /// timeout still apply while it streams. A gRPC response cut short ends with trailers
    /// (DEADLINE_EXCEEDED or UNAVAILABLE) that the client understands; any other is cut with
    /// an error (HTTP/1.1: the connection closes mid-body; HTTP/2: the stream is reset), never
    /// ended as if it were complete.
    pub struct ServedBody {
        inner: Body,
        #[pin]
        deadline: Sleep,
        has_deadline: bool,
        deadline_after: Duration,
        #[pin]
        idle_timer: Sleep,
        idle: Duration,
        quiet: Quiet,
        exchange: Arc<Exchange>,
        grpc: bool,
        ended: bool,
        busy: Option<Busy>,
        // Records the request when it ends, and counts the cuts.
        record: Option<RequestEnd>,
    }
    impl PinnedDrop for ServedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut r) = this.record.take() {
                let end = if *this.ended || http_body::Body::is_end_stream(&*this.inner) {
                    End::Complete
                } else {
                    End::dropped(this.exchange)
                };
                r.end(end);
            }
        }
    }
}

impl ServedBody {
    /// `deadline`: when the request's time is up and how long it had.
    pub fn new(
        inner: Body,
        exchange: Arc<Exchange>,
        deadline: Option<(Instant, Duration)>,
        idle: Duration,
        grpc: bool,
        busy: Option<Busy>,
        mut record: Option<RequestEnd>,
    ) -> ServedBody {
        if http_body::Body::is_end_stream(&inner) {
            // A bodiless answer is complete with its head: hyper may never poll it.
            if let Some(r) = record.as_mut() {
                r.end(End::Complete);
            }
        }
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        ServedBody {
            inner,
            deadline: tokio::time::sleep_until(deadline.map_or(far, |d| d.0)),
            has_deadline: deadline.is_some(),
            deadline_after: deadline.map_or(Duration::ZERO, |d| d.1),
            idle_timer: tokio::time::sleep(Quiet::step(idle)),
            quiet: Quiet::new(&exchange),
            idle,
            exchange,
            grpc,
            ended: false,
            busy,
            record,
        }
    }
}

fn grpc_trailers(code: &'static str, msg: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static(code));
    if let Ok(v) = HeaderValue::from_str(msg) {
        t.insert("grpc-message", v.clone());
        t.insert(super::MESHLET_ERROR.clone(), v);
    }
    t
}

impl http_body::Body for ServedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut *this.inner).poll_frame(cx) {
            Poll::Ready(Some(f)) => {
                this.exchange.touch();
                if let Some(r) = this.record.as_mut() {
                    match &f {
                        Ok(frame) => {
                            r.frame(frame);
                            // Recorded before the last bytes go out, so that a client that
                            // has its answer finds it counted.
                            if this.inner.is_end_stream() {
                                r.end(End::Complete);
                            }
                        }
                        Err(_) => r.end(End::Failed),
                    }
                }
                return Poll::Ready(Some(f));
            }
            Poll::Ready(None) => {
                *this.ended = true;
                this.busy.take();
                if let Some(r) = this.record.as_mut() {
                    r.end(End::Complete);
                }
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        let cut = if *this.has_deadline && this.deadline.as_mut().poll(cx).is_ready() {
            if let Some(r) = this.record.as_ref() {
                r.cut_counters().deadline.inc();
            }
            Cut::Deadline(*this.deadline_after)
        } else {
            loop {
                if this.idle_timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if this.quiet.expired(this.exchange, *this.idle) {
                    break;
                }
                let next = Instant::now() + Quiet::step(*this.idle);
                this.idle_timer.as_mut().reset(next);
            }
            if let Some(r) = this.record.as_ref() {
                r.cut_counters().idle.inc();
            }
            Cut::Idle(*this.idle)
        };
        *this.ended = true;
        this.busy.take();
        this.exchange.mark_cut();
        if let Some(r) = this.record.as_mut() {
            r.end(End::Cut);
        }
        tracing::debug!(error = %cut, "response cut short");
        if *this.grpc {
            let code = match cut {
                Cut::Deadline(_) => "4",
                Cut::Idle(_) => "14",
            };
            return Poll::Ready(Some(Ok(Frame::trailers(grpc_trailers(
                code,
                &cut.to_string(),
            )))));
        }
        Poll::Ready(Some(Err(BodyError::new(cut))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: &str) -> http::request::Parts {
        // "METHOD target VERSION|host1|host2"
        let mut it = req.split('|');
        let mut line = it.next().unwrap().split(' ');
        let (m, t, v) = (
            line.next().unwrap(),
            line.next().unwrap(),
            line.next().unwrap(),
        );
        let mut b = http::Request::builder().method(m).uri(t).version(match v {
            "1.0" => Version::HTTP_10,
            "2" => Version::HTTP_2,
            _ => Version::HTTP_11,
        });
        for h in it {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn dst() -> SocketAddr {
        "198.18.0.1:8080".parse().unwrap()
    }

    #[test]
    fn host_rules() {
        let mut p = parts("GET / 1.1|a.example");
        assert_eq!(check_head(&mut p, dst()), Ok(()));
        assert_eq!(p.headers[header::HOST], "a.example");

        let e = check_head(&mut parts("GET / 1.1"), dst()).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.reason.contains("needs a Host"), "{e:?}");

        let e = check_head(&mut parts("GET / 1.1|a|b"), dst()).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.reason.contains("more than one Host"), "{e:?}");

        let e = check_head(&mut parts("GET / 1.1|a b"), dst()).unwrap_err();
        assert!(e.reason.contains("not a valid host"), "{e:?}");

        // HTTP/1.0 without Host goes out as HTTP/1.1 with one.
        let mut p = parts("GET / 1.0");
        assert_eq!(check_head(&mut p, dst()), Ok(()));
        assert_eq!(p.headers[header::HOST], "198.18.0.1:8080");
    }

    #[test]
    fn absolute_form_authority_wins() {
        let mut p = parts("GET http://b.example:81/x?y=1 1.1|a.example");
        assert_eq!(check_head(&mut p, dst()), Ok(()));
        assert_eq!(p.headers[header::HOST], "b.example:81");
        assert_eq!(p.uri.to_string(), "/x?y=1");
        assert!(p.uri.authority().is_none());
    }

    #[test]
    fn connect_is_refused() {
        let mut p = http::Request::builder()
            .method(Method::CONNECT)
            .uri("a.example:443")
            .header(header::HOST, "a.example:443")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let e = check_head(&mut p, dst()).unwrap_err();
        assert_eq!(e.status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[test]
    fn h2_heads_pass() {
        let mut p = parts("GET http://a/ 2");
        assert_eq!(check_head(&mut p, dst()), Ok(()));
    }

    #[test]
    fn quiet_counts_steps_without_frames() {
        let ex = Exchange::default();
        let t = Duration::from_secs(4);
        let mut q = Quiet::new(&ex);
        assert!(!q.expired(&ex, t));
        assert!(!q.expired(&ex, t));
        ex.touch();
        assert!(!q.expired(&ex, t), "a frame moved: quiet starts over");
        for _ in 0..3 {
            assert!(!q.expired(&ex, t));
        }
        assert!(q.expired(&ex, t));
    }
}
