//! In-flight request deduplication (coalescing): identical bodiless requests that arrive while
//! one of them is already on its way upstream wait for that one's answer instead of each making
//! their own upstream request. A thundering herd on a hot, slow endpoint (a cold cache behind
//! it, a config fetch at rollout) then costs the upstream one request instead of hundreds.
//!
//! This is not a cache: a response is shared only among requests that were in flight together,
//! and nothing is kept once it is published. The price is the usual one of coalescing: a waiter
//! may get an answer the upstream started computing slightly before the waiter's request
//! arrived (at most `leader_timeout` earlier), which is why only safe methods and bodiless
//! requests are eligible and why everything that can change the answer is in the [`Key`].
//!
//! How a flight works:
//! - The first caller for a key is the leader. Its upstream future runs in a detached task, so
//!   the leader's client going away does not cancel the request the waiters depend on.
//! - The task buffers the response while it is at most `max_body` and publishes it to the
//!   waiters and the leader. Each gets an identical response; the body's chunks are shared
//!   (`Bytes` are reference counted), only the header map is cloned per caller.
//! - A response that cannot be shared (too large, `Set-Cookie`, `Cache-Control: private`,
//!   `101`, a body error) releases the waiters to make their own upstream requests; the leader
//!   gets its own response in full, the buffered prefix followed by the rest of the stream.
//! - A flight lasts at most `leader_timeout`: then its key is removed (the next identical
//!   request leads a new flight) and its waiters go on their own. A hung upstream therefore
//!   delays identical requests by `leader_timeout` at most, once, not forever.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::response::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus::IntCounter;
use tokio::sync::{oneshot, watch};

use crate::proxy::http::body::Body;

/// Request fields that are always in the key, whatever the settings: a difference in any of them
/// can change the answer in a way that must never leak to another client. Credentials (the
/// answer may be someone else's data), the encodings the client can decode, and range and
/// conditional requests (a `206` or a `304` answers only the request that asked for it).
const ALWAYS_IN_KEY: [HeaderName; 10] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    header::ACCEPT_ENCODING,
    header::RANGE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
];

/// What may be coalesced and for how long a flight is shared.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Methods eligible for coalescing. Only safe methods belong here: two identical `POST`s
    /// are two actions, not one. Default: `GET`, `HEAD`.
    pub methods: Vec<Method>,
    /// Request headers whose values are in the key in addition to [`ALWAYS_IN_KEY`] (credentials,
    /// `Accept-Encoding`, range and conditional fields). Default: `Accept` and `Accept-Language`,
    /// the content negotiation fields most services honour; add any header the upstream varies
    /// its answer on (a tenant id, `X-Forwarded-For` for per-client answers...).
    pub headers: Vec<HeaderName>,
    /// Responses larger than this are not shared: buffering them would cost more memory than the
    /// coalescing saves, and the leader's client would wait for the whole body before its first
    /// byte. Default: 1 MiB.
    pub max_body: usize,
    /// The longest a flight is shared. A waiter waits at most this long for the leader's answer
    /// and then makes its own request; the flight's key is dropped at the same time, so a hung
    /// upstream request does not hold later identical requests. Default: 5 s.
    pub leader_timeout: Duration,
    /// Waiters per flight; more make their own requests. Bounds the fan-out of one upstream
    /// answer (each waiter costs a header map clone and a wakeup). Default: 1000.
    pub max_waiters: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            methods: vec![Method::GET, Method::HEAD],
            headers: vec![header::ACCEPT, header::ACCEPT_LANGUAGE],
            max_body: 1 << 20,
            leader_timeout: Duration::from_secs(5),
            max_waiters: 1000,
        }
    }
}

/// What makes two requests identical: method, authority (from the URI, else the `Host` header;
/// compared case-insensitively), path and query, and the values of the headers in
/// [`ALWAYS_IN_KEY`] and [`Settings::headers`]. An absent header and an empty one differ, and so
/// do repeated fields in a different order (that only costs a missed coalescing).
///
/// The destination is not in the key: use one [`Dedup`] per destination service (or per proxy
/// direction and service), or two services answering the same authority and path would share.
///
/// `Debug` shows the method, authority and path only: header values hold credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    method: Method,
    authority: Option<Authority>,
    path: Option<PathAndQuery>,
    /// The header values, in key order, encoded without ambiguity in one allocation: per header a
    /// `u32` count of values (0 = absent), then per value a `u32` length and the bytes.
    headers: Box<[u8]>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("method", &self.method)
            .field("authority", &self.authority)
            .field("path", &self.path)
            .field("headers", &format_args!("<{} bytes>", self.headers.len()))
            .finish()
    }
}

/// The key of a request, or `None` when it may not be coalesced: its method is not in
/// `settings.methods`, it may have a body (`has_body`, which the caller sets from the body's
/// `is_end_stream()`, a `Content-Length` other than 0, or any `Transfer-Encoding`), it asks for
/// a protocol upgrade (a WebSocket handshake is a `GET`, but its connection is its own), or its
/// `Host` header is not a valid authority.
pub fn key<B>(req: &Request<B>, has_body: bool, settings: &Settings) -> Option<Key> {
    if !settings.methods.contains(req.method()) || has_body {
        return None;
    }
    let h = req.headers();
    if h.contains_key(header::TRANSFER_ENCODING) || h.contains_key(header::UPGRADE) {
        return None;
    }
    for v in h.get_all(header::CONTENT_LENGTH) {
        // An unparsable length is treated as a body: we cannot tell there is none.
        if v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) != Some(0) {
            return None;
        }
    }
    let authority = match req.uri().authority() {
        Some(a) => Some(a.clone()),
        None => match h.get(header::HOST) {
            Some(v) => Some(Authority::try_from(v.as_bytes()).ok()?),
            None => None,
        },
    };
    let names = || ALWAYS_IN_KEY.iter().chain(settings.headers.iter());
    // Size first so the encoding is one exact allocation.
    let size: usize = names()
        .map(|n| 4 + h.get_all(n).iter().map(|v| 4 + v.len()).sum::<usize>())
        .sum();
    let mut buf = Vec::with_capacity(size);
    for name in names() {
        let values = h.get_all(name);
        let count = values.iter().count();
        buf.extend_from_slice(&u32::try_from(count).unwrap_or(u32::MAX).to_le_bytes());
        for v in values {
            // Header values are far below 4 GiB; hyper limits the whole head.
            buf.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_le_bytes());
            buf.extend_from_slice(v.as_bytes());
        }
    }
    Some(Key {
        method: req.method().clone(),
        authority,
        path: req.uri().path_and_query().cloned(),
        headers: buf.into_boxed_slice(),
    })
}

/// Coalesces identical in-flight requests. Cheap to share: wrap it in an `Arc` (or keep one per
/// destination service, see [`Key`]).
///
/// Counters (the caller registers them):
/// - `coalesced` (`meshlet_dedup_coalesced_total`): requests answered with another request's
///   upstream response.
/// - `saved` (`meshlet_dedup_saved_total`): upstream requests not made.
///
/// Both are incremented together, once per waiter that receives the shared answer, so they are
/// equal. A waiter whose client goes away before the answer arrives counts in neither: it made
/// no upstream request, but it would not have completed one either. A leader whose client went
/// away still completes its upstream request for the waiters; that request is not counted as
/// saved or wasted.
pub struct Dedup {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    flights: Mutex<HashMap<Key, Flight>>,
    coalesced: IntCounter,
    saved: IntCounter,
}

/// A key's entry while its leader's request is in flight.
struct Flight {
    outcome: watch::Receiver<Outcome>,
    /// Waiters that joined (including any that timed out or went away since): caps the fan-out.
    waiters: usize,
}

/// What a flight tells its waiters, over a watch channel: unlike a broadcast, a waiter that
/// starts waiting after the value was sent still sees it, so no wakeup can be missed.
#[derive(Clone)]
enum Outcome {
    Pending,
    Shared(Arc<Shared>),
    /// Not shareable, or the flight ended without an answer: make your own request.
    OnYourOwn,
}

/// A buffered response, shared by everyone in the flight.
struct Shared {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    chunks: Box<[Bytes]>,
    trailers: Option<HeaderMap>,
}

impl Shared {
    fn response(self: &Arc<Shared>) -> Response<ResponseBody> {
        let mut rsp = Response::new(ResponseBody::shared(self.clone()));
        *rsp.status_mut() = self.status;
        *rsp.version_mut() = self.version;
        *rsp.headers_mut() = self.headers.clone();
        rsp
    }
}

/// A caller's part in a flight.
enum Role {
    Leader(Key, watch::Sender<Outcome>),
    Waiter(watch::Receiver<Outcome>),
    /// The flight is full: go upstream without joining.
    Alone,
}

impl Dedup {
    pub fn new(settings: Settings, coalesced: IntCounter, saved: IntCounter) -> Dedup {
        Dedup {
            inner: Arc::new(Inner {
                settings,
                flights: Mutex::new(HashMap::new()),
                coalesced,
                saved,
            }),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Flights in progress now (keys with a leader's request in flight).
    pub fn in_flight(&self) -> usize {
        self.inner.flights.lock().len()
    }

    /// Sends the request upstream once for all identical requests in flight at the same time.
    ///
    /// `upstream` makes this caller's own upstream request; it is called at most once per call
    /// of `run`: by the leader (its future then runs in a detached task, so dropping this
    /// future does not cancel it) or by a waiter that has to go on its own. The request is
    /// bodiless, so the caller can build it as often as needed.
    pub async fn run<F, Fut>(&self, key: Key, upstream: F) -> Response<ResponseBody>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let role = self.join(key);
        match role {
            Role::Leader(key, tx) => {
                let (leader_tx, leader_rx) = oneshot::channel();
                let publish = Publish {
                    inner: self.inner.clone(),
                    key,
                    tx: Some(tx),
                };
                tokio::spawn(publish.fly(upstream(), leader_tx));
                match leader_rx.await {
                    Ok(rsp) => rsp,
                    // The task died without answering (a panic in `upstream`, or a runtime
                    // shutting down): answer like any proxy failure rather than hang.
                    Err(_) => {
                        let mut rsp = Response::new(ResponseBody::own(Body::full(
                            "meshlet: upstream request failed\n",
                        )));
                        *rsp.status_mut() = StatusCode::BAD_GATEWAY;
                        rsp
                    }
                }
            }
            Role::Waiter(rx) => match wait(rx, self.inner.settings.leader_timeout).await {
                Some(shared) => {
                    self.inner.coalesced.inc();
                    self.inner.saved.inc();
                    shared.response()
                }
                None => upstream().await.map(ResponseBody::own),
            },
            Role::Alone => upstream().await.map(ResponseBody::own),
        }
    }

    fn join(&self, key: Key) -> Role {
        let mut flights = self.inner.flights.lock();
        match flights.entry(key) {
            Entry::Occupied(mut e) => {
                let f = e.get_mut();
                if f.waiters >= self.inner.settings.max_waiters {
                    return Role::Alone;
                }
                f.waiters += 1;
                Role::Waiter(f.outcome.clone())
            }
            Entry::Vacant(e) => {
                let key = e.key().clone();
                let (tx, rx) = watch::channel(Outcome::Pending);
                e.insert(Flight {
                    outcome: rx,
                    waiters: 0,
                });
                Role::Leader(key, tx)
            }
        }
    }
}

/// Waits for the flight's answer: `None` means go on your own (not shareable, the flight ended
/// without an answer, or `timeout` passed).
async fn wait(mut rx: watch::Receiver<Outcome>, timeout: Duration) -> Option<Arc<Shared>> {
    let done = tokio::time::timeout(timeout, rx.wait_for(|o| !matches!(o, Outcome::Pending)));
    match &*done.await.ok()?.ok()? {
        Outcome::Shared(s) => Some(s.clone()),
        Outcome::Pending | Outcome::OnYourOwn => None,
    }
}

/// The leader's task: owns the flight's entry and removes it exactly once, when the answer is
/// published or, on drop, whatever happened (the waiters then go on their own).
struct Publish {
    inner: Arc<Inner>,
    key: Key,
    tx: Option<watch::Sender<Outcome>>,
}

/// The leader's response, read as far as deciding whether it can be shared.
enum Collected {
    Shared(Parts, Arc<Shared>),
    Own(Response<ResponseBody>),
}

impl Collected {
    fn into_response(self) -> Response<ResponseBody> {
        match self {
            Collected::Shared(parts, shared) => {
                Response::from_parts(parts, ResponseBody::shared(shared))
            }
            Collected::Own(rsp) => rsp,
        }
    }
}

impl Publish {
    /// Removes the key, then tells the waiters. In this order a caller either joined before the
    /// removal (and holds a receiver that will see `outcome`) or finds no entry and leads a new
    /// flight: nobody joins a flight that will never answer.
    fn close(&mut self, outcome: Outcome) {
        if let Some(tx) = self.tx.take() {
            self.inner.flights.lock().remove(&self.key);
            tx.send_replace(outcome);
        }
    }

    async fn fly<Fut>(mut self, upstream: Fut, leader: oneshot::Sender<Response<ResponseBody>>)
    where
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let settings = &self.inner.settings;
        let collect = collect(upstream, settings.max_body, self.key.method == Method::HEAD);
        let mut collect = std::pin::pin!(collect);
        let deadline = tokio::time::sleep(settings.leader_timeout);
        let collected = tokio::select! {
            c = &mut collect => c,
            () = deadline => {
                // Shared long enough: release the waiters and the key, and finish for the
                // leader alone, unless its client is gone too.
                self.close(Outcome::OnYourOwn);
                let mut leader = leader;
                tokio::select! {
                    c = collect => { let _ = leader.send(c.into_response()); }
                    () = leader.closed() => {}
                }
                return;
            }
        };
        let outcome = match &collected {
            Collected::Shared(_, shared) => Outcome::Shared(shared.clone()),
            Collected::Own(_) => Outcome::OnYourOwn,
        };
        self.close(outcome);
        // The leader's client may be gone; the waiters are served already.
        let _ = leader.send(collected.into_response());
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        self.close(Outcome::OnYourOwn);
    }
}

/// Runs the upstream request and reads the response body while it may still be shared.
async fn collect<Fut>(upstream: Fut, max_body: usize, head: bool) -> Collected
where
    Fut: Future<Output = Response<Body>>,
{
    let (parts, mut body) = upstream.await.into_parts();
    let own = |parts, body| Collected::Own(Response::from_parts(parts, body));
    if !shareable(&parts) {
        return own(parts, ResponseBody::own(body));
    }
    // A HEAD response's Content-Length describes the GET's body; it has none itself.
    if !head && declared_too_long(&parts.headers, max_body) {
        return own(parts, ResponseBody::own(body));
    }
    let mut chunks = Vec::new();
    let mut len = 0usize;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            // The waiters retry on their own; the leader sees what arrived, then the error.
            Err(e) => return own(parts, ResponseBody::stream(chunks, Some(e), None)),
        };
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                len += data.len();
                chunks.push(data);
                if len > max_body {
                    return own(parts, ResponseBody::stream(chunks, None, Some(body)));
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    match &mut trailers {
                        Some(all) => all.extend(t),
                        None => trailers = Some(t),
                    }
                }
            }
        }
    }
    let shared = Arc::new(Shared {
        status: parts.status,
        version: parts.version,
        headers: parts.headers.clone(),
        chunks: chunks.into_boxed_slice(),
        trailers,
    });
    Collected::Shared(parts, shared)
}

/// Whether the declared body length (if any) rules out sharing. A malformed one does: we could
/// not tell where the body ends.
fn declared_too_long(h: &HeaderMap, max_body: usize) -> bool {
    h.get(header::CONTENT_LENGTH).is_some_and(|v| {
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_none_or(|n| n > max_body as u64)
    })
}

/// Whether a response may go to clients other than the one it answers. `Set-Cookie` would hand
/// one client's new session to all of them; `Cache-Control: private` says the answer is for one
/// user, who may be told apart by something outside the key (a client certificate, the source
/// address); a `101` gives the leader a connection, not a response.
fn shareable(parts: &Parts) -> bool {
    parts.status != StatusCode::SWITCHING_PROTOCOLS
        && !parts.headers.contains_key(header::SET_COOKIE)
        && !parts
            .headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .any(|v| {
                v.to_str().is_ok_and(|s| {
                    s.split(',').any(|d| {
                        let d = d.trim();
                        let name = d.split_once('=').map_or(d, |(n, _)| n).trim();
                        name.eq_ignore_ascii_case("private")
                    })
                })
            })
}

/// The body of a response from [`Dedup::run`]: a shared buffered body, the caller's own upstream
/// body, or the leader's body that turned out too large to share (its buffered prefix, then the
/// rest of the stream). Carries trailers when the upstream sent any.
pub struct ResponseBody {
    kind: Kind,
}

enum Kind {
    Own(Body),
    Shared {
        shared: Arc<Shared>,
        next: usize,
        trailers_sent: bool,
    },
    Stream {
        prefix: std::vec::IntoIter<Bytes>,
        error: Option<crate::proxy::http::body::BodyError>,
        rest: Option<Body>,
    },
}

impl ResponseBody {
    /// The caller's own upstream body, unchanged.
    pub fn own(body: Body) -> ResponseBody {
        ResponseBody {
            kind: Kind::Own(body),
        }
    }

    fn shared(shared: Arc<Shared>) -> ResponseBody {
        ResponseBody {
            kind: Kind::Shared {
                shared,
                next: 0,
                trailers_sent: false,
            },
        }
    }

    fn stream(
        prefix: Vec<Bytes>,
        error: Option<crate::proxy::http::body::BodyError>,
        rest: Option<Body>,
    ) -> ResponseBody {
        ResponseBody {
            kind: Kind::Stream {
                prefix: prefix.into_iter(),
                error,
                rest,
            },
        }
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Own(_) => "own",
            Kind::Shared { .. } => "shared",
            Kind::Stream { .. } => "stream",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = crate::proxy::http::body::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::proxy::http::body::BodyError>>> {
        match &mut self.kind {
            Kind::Own(b) => Pin::new(b).poll_frame(cx),
            Kind::Shared {
                shared,
                next,
                trailers_sent,
            } => {
                if let Some(chunk) = shared.chunks.get(*next) {
                    *next += 1;
                    return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
                }
                match &shared.trailers {
                    Some(t) if !*trailers_sent => {
                        *trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(t.clone()))))
                    }
                    _ => Poll::Ready(None),
                }
            }
            Kind::Stream {
                prefix,
                error,
                rest,
            } => {
                if let Some(chunk) = prefix.next() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                if let Some(e) = error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                match rest {
                    Some(b) => Pin::new(b).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Own(b) => b.is_end_stream(),
            Kind::Shared {
                shared,
                next,
                trailers_sent,
            } => *next >= shared.chunks.len() && (*trailers_sent || shared.trailers.is_none()),
            Kind::Stream {
                prefix,
                error,
                rest,
            } => {
                prefix.len() == 0
                    && error.is_none()
                    && rest.as_ref().is_none_or(|b| b.is_end_stream())
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Own(b) => b.size_hint(),
            Kind::Shared { shared, next, .. } => {
                let left = shared.chunks.get(*next..).unwrap_or_default();
                SizeHint::with_exact(left.iter().map(|c| c.len() as u64).sum())
            }
            Kind::Stream { prefix, rest, .. } => {
                let buffered: u64 = prefix.as_slice().iter().map(|c| c.len() as u64).sum();
                let mut hint = rest.as_ref().map(|b| b.size_hint()).unwrap_or_default();
                // Upper first: `set_lower` panics above the current upper bound.
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper.saturating_add(buffered));
                }
                hint.set_lower(hint.lower().saturating_add(buffered));
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use http::HeaderValue;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;

    fn dedup(settings: Settings) -> Arc<Dedup> {
        let coalesced = IntCounter::new("coalesced", "test").unwrap();
        let saved = IntCounter::new("saved", "test").unwrap();
        Arc::new(Dedup::new(settings, coalesced, saved))
    }

    fn coalesced(d: &Dedup) -> (u64, u64) {
        (d.inner.coalesced.get(), d.inner.saved.get())
    }

    fn get(uri: &str) -> Request<()> {
        Request::get(uri).body(()).unwrap()
    }

    fn key_of(req: &Request<()>) -> Key {
        key(req, false, &Settings::default()).unwrap()
    }

    fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
        let mut rsp = Response::new(Body::full(body));
        *rsp.status_mut() = StatusCode::from_u16(status).unwrap();
        rsp
    }

    /// Bytes whose value depends on their position, so a lost or reordered chunk shows.
    fn pattern(len: usize) -> Bytes {
        (0..len)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    /// A real streamed upstream body (HTTP/2 DATA frames of unknown total length, then
    /// trailers) over an in-memory connection: what `Body::incoming` carries in the proxy.
    async fn streamed(chunks: Vec<Bytes>, trailers: Option<HeaderMap>) -> Response<Body> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let svc = hyper::service::service_fn(move |_req| {
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
                .iter()
                .cloned()
                .map(|c| Ok(Frame::data(c)))
                .chain(trailers.clone().map(|t| Ok(Frame::trailers(t))))
                .collect();
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            async move { Ok::<_, Infallible>(Response::new(body)) }
        });
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(server_io), svc),
        );
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://upstream/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let rsp = send.send_request(req).await.unwrap();
        assert!(rsp.headers().get(header::CONTENT_LENGTH).is_none());
        rsp.map(Body::incoming)
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    }

    async fn read(rsp: Response<ResponseBody>) -> Answer {
        let (parts, body) = rsp.into_parts();
        let collected = body.collect().await.unwrap();
        Answer {
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            body: collected.to_bytes(),
        }
    }

    /// An upstream that counts its calls and answers `answer <n>` with an `x-call: <n>` header
    /// after `delay`.
    fn counting(
        calls: &Arc<AtomicUsize>,
        delay: Duration,
    ) -> impl Fn() -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Clone + Send + Sync + 'static
    {
        let calls = calls.clone();
        move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let mut rsp = full(200, format!("answer {n}"));
                rsp.headers_mut().insert("x-call", n.into());
                rsp
            })
        }
    }

    /// Runs `n` identical requests at once, the first one starting first (the leader).
    async fn concurrently<F, Fut>(d: &Arc<Dedup>, key: &Key, n: usize, up: F) -> Vec<Answer>
    where
        F: Fn() -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (d, key, up) = (d.clone(), key.clone(), up.clone());
                tokio::spawn(async move { read(d.run(key, up).await).await })
            })
            .collect();
        let mut answers = Vec::with_capacity(n);
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        answers
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn identical_requests_share_one_upstream_request() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let key = key_of(&get("http://svc/items?page=1"));
        let up = counting(&calls, Duration::from_millis(200));
        let answers = concurrently(&d, &key, 100, up).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(answers.len(), 100);
        for a in &answers {
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.headers, answers[0].headers);
            assert_eq!(a.headers["x-call"], "1");
            assert_eq!(a.body, "answer 1");
        }
        assert_eq!(coalesced(&d), (99, 99));
        assert_eq!(d.in_flight(), 0);
    }

    #[tokio::test]
    async fn different_keys_make_separate_requests() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let up = counting(&calls, Duration::from_millis(100));
        let mut a = get("http://svc/me");
        a.headers_mut()
            .insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
        let mut b = get("http://svc/me");
        b.headers_mut()
            .insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
        let (ra, rb) = tokio::join!(d.run(key_of(&a), up.clone()), d.run(key_of(&b), up));
        let (ra, rb) = (read(ra).await, read(rb).await);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_ne!(ra.body, rb.body);
        assert_eq!(coalesced(&d), (0, 0));
    }

    #[tokio::test]
    async fn waiters_are_answered_when_the_leaders_client_goes_away() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let key = key_of(&get("http://svc/slow"));
        let up = counting(&calls, Duration::from_millis(200));
        let leader = {
            let (d, key, up) = (d.clone(), key.clone(), up.clone());
            tokio::spawn(async move { d.run(key, up).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiters = {
            let (d, key, up) = (d.clone(), key.clone(), up.clone());
            tokio::spawn(async move { concurrently(&d, &key, 5, up).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        assert!(leader.await.unwrap_err().is_cancelled());
        for a in waiters.await.unwrap() {
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.body, "answer 1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(coalesced(&d), (5, 5));
        assert_eq!(d.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_body_declared_too_large_is_not_shared() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let big = pattern(2 << 20);
        let up = {
            let (calls, big) = (calls.clone(), big.clone());
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                let big = big.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut rsp = full(200, big.clone());
                    rsp.headers_mut()
                        .insert(header::CONTENT_LENGTH, big.len().into());
                    rsp
                }
            }
        };
        let key = key_of(&get("http://svc/big"));
        for a in concurrently(&d, &key, 5, up).await {
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.body, big);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(coalesced(&d), (0, 0));
        assert_eq!(d.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_streamed_body_found_too_large_is_not_shared_and_the_leader_gets_all_of_it() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let big = pattern(2 << 20);
        let chunks: Vec<Bytes> = big.chunks(64 << 10).map(|c| big.slice_ref(c)).collect();
        let up = {
            let calls = calls.clone();
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                let chunks = chunks.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    streamed(chunks, None).await
                }
            }
        };
        let key = key_of(&get("http://svc/big"));
        for a in concurrently(&d, &key, 5, up).await {
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.body.len(), big.len());
            assert_eq!(a.body, big);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(coalesced(&d), (0, 0));
    }

    #[tokio::test]
    async fn an_unsized_body_in_one_large_chunk_is_not_shared() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let big = pattern((1 << 20) + 1);
        let up = {
            let (calls, big) = (calls.clone(), big.clone());
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                let big = big.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    full(200, big)
                }
            }
        };
        let key = key_of(&get("http://svc/big"));
        for a in concurrently(&d, &key, 3, up).await {
            assert_eq!(a.body, big);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_streamed_body_within_the_limit_is_shared_with_its_trailers() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let body = pattern(64 << 10);
        let chunks: Vec<Bytes> = body.chunks(1000).map(|c| body.slice_ref(c)).collect();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        let up = {
            let calls = calls.clone();
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                let (chunks, trailers) = (chunks.clone(), trailers.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    streamed(chunks, Some(trailers)).await
                }
            }
        };
        let key = key_of(&get("http://svc/stream"));
        for a in concurrently(&d, &key, 10, up).await {
            assert_eq!(a.body, body);
            assert_eq!(a.trailers.unwrap()["x-checksum"], "abc");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(coalesced(&d), (9, 9));
    }

    #[tokio::test]
    async fn a_waiter_goes_on_its_own_after_the_leader_timeout() {
        let d = dedup(Settings {
            leader_timeout: Duration::from_millis(100),
            ..Settings::default()
        });
        let calls = Arc::new(AtomicUsize::new(0));
        // The first call hangs for 10 s, later ones answer at once.
        let up = {
            let calls = calls.clone();
            move || {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    if n == 1 {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                    full(200, format!("answer {n}"))
                }
            }
        };
        let key = key_of(&get("http://svc/hangs"));
        let leader = {
            let (d, key, up) = (d.clone(), key.clone(), up.clone());
            tokio::spawn(async move { d.run(key, up).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let start = Instant::now();
        let a = read(d.run(key.clone(), up.clone()).await).await;
        let waited = start.elapsed();
        assert_eq!(a.body, "answer 2");
        assert!(waited >= Duration::from_millis(80), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        // The hung flight's key is gone: the next identical request leads a new one at once.
        assert_eq!(d.in_flight(), 0);
        let start = Instant::now();
        let a = read(d.run(key, up).await).await;
        assert_eq!(a.body, "answer 3");
        assert!(start.elapsed() < Duration::from_millis(80));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(coalesced(&d), (0, 0));
        leader.abort();
    }

    #[tokio::test]
    async fn callers_beyond_max_waiters_go_on_their_own() {
        let d = dedup(Settings {
            max_waiters: 2,
            ..Settings::default()
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let key = key_of(&get("http://svc/x"));
        let up = counting(&calls, Duration::from_millis(100));
        let answers = concurrently(&d, &key, 5, up).await;
        // The leader and its 2 waiters share call 1; the other 2 make calls 2 and 3.
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let shared = answers.iter().filter(|a| a.body == "answer 1").count();
        assert_eq!(shared, 3);
        assert_eq!(coalesced(&d), (2, 2));
    }

    #[tokio::test]
    async fn nothing_is_kept_after_the_response() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let key = key_of(&get("http://svc/x"));
        let up = counting(&calls, Duration::from_millis(10));
        let first = read(d.run(key.clone(), up.clone()).await).await;
        assert_eq!(d.in_flight(), 0);
        let second = read(d.run(key, up).await).await;
        assert_eq!(
            (&*first.body, &*second.body),
            (&b"answer 1"[..], &b"answer 2"[..])
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// Waves of identical requests overlapping the end of each flight: a waiter stranded on a
    /// removed entry would wait the whole (long) leader timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_waiter_is_stranded_when_flights_end() {
        let d = dedup(Settings {
            leader_timeout: Duration::from_secs(30),
            ..Settings::default()
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let key = key_of(&get("http://svc/x"));
        let up = counting(&calls, Duration::from_millis(1));
        let start = Instant::now();
        let tasks: Vec<_> = (0..2000)
            .map(|i| {
                let (d, key, up) = (d.clone(), key.clone(), up.clone());
                tokio::spawn(async move {
                    if i % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                    read(d.run(key, up).await).await.status
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), StatusCode::OK);
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        let (c, s) = coalesced(&d);
        assert_eq!(c, s);
        assert_eq!(c as usize + calls.load(Ordering::SeqCst), 2000);
        assert_eq!(d.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_error_response_is_shared() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let up = {
            let calls = calls.clone();
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    full(503, "no endpoints\n")
                }
            }
        };
        let key = key_of(&get("http://svc/x"));
        for a in concurrently(&d, &key, 10, up).await {
            assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(a.body, "no endpoints\n");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_setting_a_cookie_is_not_shared() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let up = {
            let calls = calls.clone();
            move || {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut rsp = full(200, "hello");
                    let cookie = HeaderValue::from_str(&format!("session={n}")).unwrap();
                    rsp.headers_mut().insert(header::SET_COOKIE, cookie);
                    rsp
                }
            }
        };
        let key = key_of(&get("http://svc/login"));
        let answers = concurrently(&d, &key, 3, up).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let mut cookies: Vec<_> = answers
            .iter()
            .map(|a| a.headers[header::SET_COOKIE].clone())
            .collect();
        cookies.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        cookies.dedup();
        assert_eq!(cookies.len(), 3);
    }

    #[tokio::test]
    async fn a_head_response_is_shared_whatever_its_content_length() {
        let d = dedup(Settings::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let up = {
            let calls = calls.clone();
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut rsp = full(200, Bytes::new());
                    rsp.headers_mut()
                        .insert(header::CONTENT_LENGTH, (5usize << 20).into());
                    rsp
                }
            }
        };
        let req = Request::head("http://svc/big").body(()).unwrap();
        for a in concurrently(&d, &key_of(&req), 3, up).await {
            assert_eq!(a.headers[header::CONTENT_LENGTH], "5242880");
            assert!(a.body.is_empty());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn shareable_responses() {
        let parts = |name: HeaderName, value: &'static str| {
            let mut rsp = Response::new(());
            rsp.headers_mut()
                .insert(name, HeaderValue::from_static(value));
            rsp.into_parts().0
        };
        assert!(shareable(&parts(
            header::CACHE_CONTROL,
            "max-age=60, public"
        )));
        assert!(!shareable(&parts(
            header::CACHE_CONTROL,
            "max-age=60, Private"
        )));
        assert!(!shareable(&parts(
            header::CACHE_CONTROL,
            "private=\"x-user\""
        )));
        assert!(!shareable(&parts(header::SET_COOKIE, "a=b")));
        let mut switching = parts(header::CACHE_CONTROL, "public");
        switching.status = StatusCode::SWITCHING_PROTOCOLS;
        assert!(!shareable(&switching));
    }

    #[test]
    fn only_bodiless_safe_requests_have_a_key() {
        let s = Settings::default();
        let post = Request::post("http://svc/x").body(()).unwrap();
        assert!(key(&post, false, &s).is_none());
        assert!(key(&get("http://svc/x"), false, &s).is_some());
        assert!(key(&get("http://svc/x"), true, &s).is_none());
        let with = |name: HeaderName, value: &'static str| {
            let mut r = get("http://svc/x");
            r.headers_mut()
                .insert(name, HeaderValue::from_static(value));
            r
        };
        assert!(key(&with(header::CONTENT_LENGTH, "5"), false, &s).is_none());
        assert!(key(&with(header::CONTENT_LENGTH, "nope"), false, &s).is_none());
        assert!(key(&with(header::CONTENT_LENGTH, "0"), false, &s).is_some());
        assert!(key(&with(header::TRANSFER_ENCODING, "chunked"), false, &s).is_none());
        assert!(key(&with(header::UPGRADE, "websocket"), false, &s).is_none());
        let origin_form = Request::get("/x").body(()).unwrap();
        assert!(key(&origin_form, false, &s).is_some());
        let mut bad_host = Request::get("/x").body(()).unwrap();
        bad_host
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("bad host"));
        assert!(key(&bad_host, false, &s).is_none());
    }

    #[test]
    fn the_key_tells_requests_apart() {
        let with = |uri: &str, headers: &[(HeaderName, &'static str)]| {
            let mut r = get(uri);
            for (n, v) in headers {
                r.headers_mut().append(n, HeaderValue::from_static(v));
            }
            key_of(&r)
        };
        let plain = with("http://svc/x?a=1", &[]);
        assert_eq!(plain, with("http://svc/x?a=1", &[]));
        assert_ne!(plain, with("http://svc/x?a=2", &[]));
        assert_ne!(plain, with("http://svc/y?a=1", &[]));
        assert_ne!(plain, with("http://other/x?a=1", &[]));
        let head = key_of(&Request::head("http://svc/x?a=1").body(()).unwrap());
        assert_ne!(plain, head);
        // The authority from the Host header of an origin-form request, case-insensitively.
        let mut origin_form = Request::get("/x?a=1").body(()).unwrap();
        origin_form
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("SVC"));
        assert_eq!(plain, key_of(&origin_form));

        let cookie_a = with("http://svc/x?a=1", &[(header::COOKIE, "s=a")]);
        assert_ne!(plain, cookie_a);
        assert_ne!(
            cookie_a,
            with("http://svc/x?a=1", &[(header::COOKIE, "s=b")])
        );
        assert_eq!(
            cookie_a,
            with("http://svc/x?a=1", &[(header::COOKIE, "s=a")])
        );
        let auth = with("http://svc/x?a=1", &[(header::AUTHORIZATION, "Bearer a")]);
        assert_ne!(plain, auth);
        assert_ne!(
            auth,
            with("http://svc/x?a=1", &[(header::AUTHORIZATION, "Bearer b")])
        );
        // Absent and empty differ, and so do the same bytes split differently.
        assert_ne!(plain, with("http://svc/x?a=1", &[(header::COOKIE, "")]));
        assert_ne!(
            with("http://svc/x?a=1", &[(header::COOKIE, "ab")]),
            with(
                "http://svc/x?a=1",
                &[(header::COOKIE, "a"), (header::COOKIE, "b")]
            )
        );
        // A value cannot pass for another header's.
        assert_ne!(
            with("http://svc/x?a=1", &[(header::AUTHORIZATION, "x")]),
            with("http://svc/x?a=1", &[(header::COOKIE, "x")])
        );
        assert_ne!(
            plain,
            with("http://svc/x?a=1", &[(header::ACCEPT_ENCODING, "gzip")])
        );
        assert_ne!(
            plain,
            with("http://svc/x?a=1", &[(header::RANGE, "bytes=0-9")])
        );
        assert_ne!(
            plain,
            with("http://svc/x?a=1", &[(header::IF_NONE_MATCH, "\"v1\"")])
        );
        // A header that is not in the key does not matter; configured ones do.
        let tenant = HeaderName::from_static("x-tenant");
        assert_eq!(plain, with("http://svc/x?a=1", &[(tenant.clone(), "t1")]));
        let s = Settings {
            headers: vec![tenant.clone()],
            ..Settings::default()
        };
        let keyed = |v: &'static str| {
            let mut r = get("http://svc/x?a=1");
            r.headers_mut().insert(&tenant, HeaderValue::from_static(v));
            key(&r, false, &s).unwrap()
        };
        assert_ne!(keyed("t1"), keyed("t2"));
        assert_eq!(keyed("t1"), keyed("t1"));
        // Debug does not show credentials.
        assert!(!format!("{auth:?}").contains("Bearer"));
    }
}
