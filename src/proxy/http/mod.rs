//! HTTP proxying: every request is balanced on its own, sent with the client's protocol over a
//! pooled connection, and answered with the upstream's response streamed back.

pub mod body;
pub mod client;
pub mod dedup;
pub mod destination;
pub mod edge;
pub mod error;
pub mod h2_guard;
pub mod outcome;
pub mod replay;
pub mod retry;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;

use super::{Destination, Resilience};
use std::pin::Pin;
use std::task::{Context, Poll};

use body::{Body, BodyError};
use bytes::Bytes;
use client::{ConnectTime, SendError, Timeouts};
use edge::{ConnState, Exchange, ServedBody};
pub use error::MESHLET_ERROR;
use error::ProxyError;
use http_body::Frame;
use outcome::{Attempt, Class, End, RequestEnd, Seen};
use replay::{Kept, Tee};
use retry::Budget as _;

/// Connect attempts for one request, each on a different endpoint.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// The hyper service function. Never fails: errors become responses with a `meshlet-error`
/// header. The response body stays under the request's deadline and the stream idle timeout
/// while it streams, and the request is recorded when it ends ([`ServedBody`], [`RequestEnd`]).
pub async fn handle(
    t: Arc<Destination>,
    conn: Arc<ConnState>,
    req: Request<Incoming>,
) -> Result<Response<ServedBody>, Infallible> {
    let busy = conn.begin();
    let start = Instant::now();
    let grpc = is_grpc(req.headers());
    let exchange = Arc::new(Exchange::default());
    let f = forward(&t, &conn, &exchange, req).await;
    let rsp = f.rsp;
    let elapsed = start.elapsed();
    t.duration.observe(elapsed.as_secs_f64());
    let record = RequestEnd::new(
        t.clone(),
        f.resilience,
        exchange.clone(),
        Seen::head(rsp.status(), rsp.headers()),
        rsp.headers().get(&MESHLET_ERROR).cloned(),
        elapsed,
    );
    let deadline = f
        .deadline
        .map(|d| (tokio::time::Instant::from_std(start) + d, d));
    let idle = conn.settings.stream_idle_timeout;
    Ok(rsp.map(|b| ServedBody::new(b, exchange, deadline, idle, grpc, Some(busy), Some(record))))
}

/// One request's answer from [`forward`], with what still applies to its body.
struct Forwarded {
    rsp: Response<Body>,
    /// The request's time limit, which still applies to the response body.
    deadline: Option<Duration>,
    /// The destination's settings the request ran with (what counts as a failure).
    resilience: Option<Arc<Resilience>>,
}

/// Counts meshlet's own answer and builds it.
fn answer(t: &Destination, e: &ProxyError, grpc: bool) -> Response<Body> {
    t.metrics
        .errors
        .with_label_values(&[t.direction.as_str(), &t.service, e.label()])
        .inc();
    e.response(grpc)
}

/// Forwards one request: the edge checks, the inbound limits, then deduplication or the
/// attempts, all under the request's deadline and the stream idle timeout.
async fn forward(
    t: &Arc<Destination>,
    conn: &ConnState,
    ex: &Arc<Exchange>,
    mut req: Request<Incoming>,
) -> Forwarded {
    let grpc = is_grpc(req.headers());
    let upgrade = if req.version() != Version::HTTP_2 && is_upgrade(req.headers()) {
        Some(hyper::upgrade::on(&mut req))
    } else {
        None
    };
    let early = |rsp| Forwarded {
        rsp,
        deadline: None,
        resilience: None,
    };
    let (mut parts, body) = req.into_parts();
    if let Err(r) = edge::check_head(&mut parts, conn.dst) {
        tracing::debug!(status = %r.status, reason = %r.reason, "request refused at the edge");
        let mut rsp = answer(t, &ProxyError::Refused(r), grpc);
        if !grpc && parts.version != Version::HTTP_2 {
            // The connection may be out of step with the client after a malformed head.
            rsp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return early(rsp);
    }
    // Inbound limits answer at once, before anything else is spent on the request.
    let _permit = match admit_inbound(t) {
        Ok(p) => p,
        Err(limit) => {
            t.metrics.inbound_refused.with_label_values(&[limit]).inc();
            let e = ProxyError::InboundLimit {
                limit,
                service: t.service.clone(),
            };
            return early(answer(t, &e, grpc));
        }
    };
    strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    if parts.version == Version::HTTP_2 && parts.uri.authority().is_none() {
        set_authority(&mut parts, &t.service);
    }
    t.route.wait_synced().await;
    let r = t.resilience();
    let deadline = deadline(&r.policy, &parts.headers);
    let work = async {
        if let (Some(dedup), None) = (&r.dedup, &upgrade) {
            let head = Request::from_parts(parts, ());
            if let Some(key) =
                crate::proxy::http::dedup::key(&head, !body.is_end_stream(), dedup.settings())
            {
                // Bodiless: every caller (leader, or a waiter that must go alone) can send its
                // own copy of the request.
                let (parts, ()) = head.into_parts();
                let template = Template::of(&parts);
                let (t, r2, ex2) = (t.clone(), r.clone(), ex.clone());
                let rsp = dedup
                    .run(key, move || {
                        let req = template.build(Body::empty());
                        let (t, r, ex) = (t.clone(), r2.clone(), ex2.clone());
                        async move { send(&t, &r, &ex, req, None, grpc).await }
                    })
                    .await;
                return rsp.map(|b| Body::boxed("shared", b));
            }
            parts = head.into_parts().0;
        }
        let req = Request::from_parts(parts, Body::from_client(body, ex.clone()));
        send(t, &r, ex, req, upgrade, grpc).await
    };
    let idle = conn.settings.stream_idle_timeout;
    // Both timers mark the exchange cut before it is dropped, so that an attempt in flight
    // ends as its endpoint's failure (see `outcome::Attempt`), not as a cancellation.
    let rsp = tokio::select! {
        rsp = work => rsp,
        _ = edge::stream_idle(ex, idle) => {
            t.cut_counters.idle.inc();
            answer(t, &ProxyError::StreamIdle(idle), grpc)
        }
        _ = edge::deadline_passed(ex, deadline) => {
            t.cut_counters.deadline.inc();
            let e = ProxyError::Timeout {
                service: t.service.clone(),
                after: deadline.unwrap_or_default(),
            };
            answer(t, &e, grpc)
        }
    };
    Forwarded {
        rsp,
        deadline,
        resilience: Some(r),
    }
}

const GRPC_DEADLINE_GRACE: Duration = Duration::from_millis(25);

/// The inbound concurrency and rate limits: a permit, or the limit that refuses the request.
fn admit_inbound(
    t: &Destination,
) -> Result<Option<crate::limits::ConcurrencyPermit>, &'static str> {
    let Some(limits) = &t.limits else {
        return Ok(None);
    };
    if let Some(rate) = &limits.rate {
        if !rate.try_acquire(Instant::now()) {
            return Err("rate");
        }
    }
    match &limits.concurrency {
        Some(c) => c.try_acquire().map(Some).ok_or("concurrency"),
        None => Ok(None),
    }
}

/// The time a request may take: the policy's timeout, or the client's grpc-timeout if sooner.
/// grpc-timeout travels to the server, which should end the call itself with its own status and
/// message; meshlet gives it a moment to do so (`GRPC_DEADLINE_GRACE`) and only then answers
/// DEADLINE_EXCEEDED for a server that ignores deadlines.
fn deadline(policy: &crate::config::policy::Policy, h: &HeaderMap) -> Option<Duration> {
    let grpc = h
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map(|d| d.saturating_add(GRPC_DEADLINE_GRACE));
    match (policy.timeout.0, grpc) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What is needed to send a request again: its head without the body.
#[derive(Clone)]
struct Template {
    method: http::Method,
    uri: http::Uri,
    version: Version,
    headers: HeaderMap,
}

impl Template {
    fn of(parts: &http::request::Parts) -> Template {
        Template {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn build(&self, body: Body) -> Request<Body> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Sends a request to the destination's endpoints; meshlet's own answer when that fails.
async fn send(
    t: &Arc<Destination>,
    r: &Arc<Resilience>,
    ex: &Arc<Exchange>,
    req: Request<Body>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    grpc: bool,
) -> Response<Body> {
    match attempts(t, r, ex, req, upgrade, grpc).await {
        Ok(rsp) => rsp,
        Err(e) => answer(t, &e, grpc),
    }
}

/// The attempts of one request, with the policy's protections: breaker-aware picking (a probe
/// when an ejected endpoint's backoff is over), connect failures tried on another endpoint
/// (nothing was sent; an upgrade too), retries of retryable answers within the budget with
/// backoff and full jitter, preferring another endpoint. Each attempt's outcome is recorded
/// once, by its [`Attempt`]: at once when it is judged at its head, else when the response
/// that rides back to the client ends.
async fn attempts(
    t: &Arc<Destination>,
    r: &Arc<Resilience>,
    ex: &Arc<Exchange>,
    req: Request<Body>,
    mut upgrade: Option<hyper::upgrade::OnUpgrade>,
    grpc: bool,
) -> Result<Response<Body>, ProxyError> {
    let p = &r.policy;
    let timeouts = Timeouts {
        connect: p.connect_timeout.0,
        idle: p.idle_timeout.0,
    };
    r.budget.deposit();
    let method = req.method().clone();
    // A request that may be sent again after it was sent keeps its head, and a copy of its body
    // as the first attempt sends it, without holding the request back (see `replay`): it is
    // retried only if that body ended within 64 KiB. Others are sent once; a connect failure
    // still hands them back.
    let may_retry = upgrade.is_none()
        && p.max_retries > 0
        && (retry::is_idempotent(&method) || (grpc && p.retry_on.retriable_grpc));
    let (mut next, replay) = if may_retry {
        let (parts, body) = req.into_parts();
        let template = Template::of(&parts);
        let (head, body) = settled(body)?;
        let (tee, kept) = Tee::new(head, body, replay::DEFAULT_REPLAY_LIMIT);
        let first = Request::from_parts(parts, Body::boxed("tee", tee));
        (Some(first), Some((template, kept)))
    } else {
        (Some(req), None)
    };

    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut connect_failures = 0usize;
    let mut retries = 0u32;
    let mut last_error: Option<String> = None;
    loop {
        let Some(req) = next.take() else {
            return Err(ProxyError::Upstream {
                service: t.service.clone(),
                error: "no request to send".into(),
            });
        };
        // Prefer an endpoint this request has not failed on; any admitted one otherwise.
        let picked = t.route.pick_admitted(&tried).or_else(|| {
            (!tried.is_empty() && connect_failures == 0)
                .then(|| t.route.pick_admitted(&[]))
                .flatten()
        });
        let Some((ep, probe)) = picked else {
            return Err(unavailable(t, last_error));
        };
        let mut attempt = Attempt::new(t, r, ex, ep.clone(), probe);
        let res = if upgrade.is_some() {
            ep.pool.send_upgrade(req, timeouts).await
        } else {
            ep.pool.send(req, timeouts).await
        };
        match res {
            Ok(mut rsp) => {
                ep.connect_succeeded();
                let connect = rsp.extensions().get::<ConnectTime>().map(|c| c.0);
                let class = attempt.head(rsp.status(), rsp.headers(), connect);
                if let Some(client) = upgrade.take() {
                    // An upgrade's outcome is its answer: 101, or a refusal.
                    attempt.end(End::Complete);
                    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        splice_upgrade(t, client, &mut rsp, t.stream_idle_timeout);
                    } else {
                        strip_hop_by_hop(rsp.headers_mut(), false);
                    }
                    return Ok(rsp);
                }
                let status = rsp.status();
                if class == Class::Failure
                    && p.retry_on.retries_response(&method, status, rsp.headers())
                {
                    match may_send_again(t, r, &replay, retries, rsp.headers()) {
                        Ok((wait, again_req)) => {
                            attempt.end(End::Complete);
                            drop(rsp);
                            retries += 1;
                            tried.push(ep.addr);
                            next = again(t, wait, again_req, "status").await;
                            continue;
                        }
                        Err(reason) => count_skipped(t, reason),
                    }
                }
                strip_hop_by_hop(rsp.headers_mut(), false);
                return Ok(rsp.map(|b| b.observed(attempt)));
            }
            Err(SendError::Connect {
                addr,
                error,
                request,
            }) => {
                ep.connect_failed();
                attempt.not_connected();
                t.metrics
                    .connect_errors
                    .with_label_values(&[&*t.service, &addr.to_string()])
                    .inc();
                tracing::debug!(service = %t.service, endpoint = %addr, %error, "connect failed; trying another endpoint");
                last_error = Some(format!("connect to {addr}: {error}"));
                tried.push(addr);
                connect_failures += 1;
                if connect_failures >= MAX_CONNECT_ATTEMPTS {
                    return Err(unavailable(t, last_error));
                }
                count_retry(t, "connect");
                // Nothing was sent: the same request (an upgrade's too) goes to another
                // endpoint.
                next = Some(*request);
            }
            Err(e @ SendError::Upstream { .. }) if ex.client_failed() => {
                // The client's body broke off or was malformed: the client's fault, not the
                // endpoint's. Nothing is recorded against the endpoint and nothing retried.
                attempt.end(End::Cancelled);
                tracing::debug!(service = %t.service, error = %e, "the client's request body failed");
                return Err(ProxyError::ClientBody(client_error(&e)));
            }
            Err(e @ SendError::Upstream { .. }) => {
                attempt.end(End::Failed);
                tracing::debug!(service = %t.service, error = %e, "upstream request failed");
                if p.retry_on.retries_reset(&method)
                    || (grpc && p.retry_on.reset && replay.is_some())
                {
                    match may_send_again(t, r, &replay, retries, &HeaderMap::new()) {
                        Ok((wait, again_req)) => {
                            retries += 1;
                            tried.push(ep.addr);
                            next = again(t, wait, again_req, "reset").await;
                            continue;
                        }
                        Err(reason) => count_skipped(t, reason),
                    }
                }
                return Err(ProxyError::Upstream {
                    service: t.service.clone(),
                    error: e.to_string(),
                });
            }
        }
    }
}

/// A frame already read from a body.
type Ready = Result<Frame<Bytes>, BodyError>;

/// A request body looked at once, without waiting: its end may already be there (an HTTP/2
/// request whose HEADERS carried END_STREAM may say so only once polled), and then the upstream
/// request goes out with the empty body it has, holding nothing of the client's stream; a
/// client that already reset its stream is answered here and nothing goes upstream. Returns a
/// frame that was ready (to be sent first) and the body.
fn settled(mut body: Body) -> Result<(Option<Ready>, Body), ProxyError> {
    if body.is_end_stream() {
        return Ok((None, Body::empty()));
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Ready(None) => Ok((None, Body::empty())),
        Poll::Ready(Some(Err(e))) => Err(ProxyError::RequestBody(e.to_string())),
        Poll::Ready(Some(frame)) => Ok((Some(frame), body)),
        Poll::Pending => Ok((None, body)),
    }
}

/// Whether a request that got a retryable answer may be sent again, after how long, and the
/// request to send; or why not (a metric label).
fn may_send_again(
    t: &Destination,
    r: &Resilience,
    replay: &Option<(Template, Kept)>,
    retries: u32,
    headers: &HeaderMap,
) -> Result<(Duration, Request<Body>), &'static str> {
    let p = &r.policy;
    // The body must have gone by whole, within the limit: a stream still open, or a long body,
    // is not sent twice.
    let Some(next) = replay
        .as_ref()
        .and_then(|(tpl, kept)| kept.body().map(|b| tpl.build(b)))
    else {
        return Err("body");
    };
    if retries >= p.max_retries {
        return Err("attempts");
    }
    let wait = match retry::retry_after(headers, std::time::SystemTime::now(), Duration::MAX) {
        Some(after) if after > p.retry_after_max.0 => return Err("retry_after"),
        Some(after) => after,
        None => retry::backoff(retries, p.retry_backoff.0, p.retry_backoff_max.0),
    };
    if !r.budget.withdraw() {
        tracing::debug!(service = %t.service, "retry budget exhausted");
        return Err("budget");
    }
    Ok((wait, next))
}

/// Counts a retry and waits its backoff.
async fn again(
    t: &Destination,
    wait: Duration,
    next: Request<Body>,
    reason: &str,
) -> Option<Request<Body>> {
    count_retry(t, reason);
    tokio::time::sleep(wait).await;
    Some(next)
}

fn count_retry(t: &Destination, reason: &str) {
    t.metrics
        .retries
        .with_label_values(&[&t.service, reason])
        .inc();
}

fn count_skipped(t: &Destination, reason: &str) {
    t.metrics
        .retries_skipped
        .with_label_values(&[&t.service, reason])
        .inc();
}

/// No endpoint could take the request: none known, all ejected, or none reachable.
fn unavailable(t: &Destination, last_error: Option<String>) -> ProxyError {
    let service = t.service.clone();
    if t.route.is_empty() {
        t.metrics
            .no_endpoints
            .with_label_values(&[t.direction.as_str(), &t.service, "http"])
            .inc();
    }
    match last_error {
        Some(last) => ProxyError::Unreachable { service, last },
        None if t.route.is_empty() => ProxyError::NoEndpoints(service),
        None => ProxyError::NoneAvailable(service),
    }
}

/// After a `101 Switching Protocols`, joins the client's and the endpoint's upgraded streams.
/// Bytes are counted as they are written, so that a long-lived stream shows while it lasts and
/// one that ends in an error (a reset) keeps what it carried.
fn splice_upgrade(
    t: &Destination,
    client: hyper::upgrade::OnUpgrade,
    rsp: &mut Response<Body>,
    idle: Duration,
) {
    let server = hyper::upgrade::on(&mut *rsp);
    let counters = t.byte_counters();
    t.tasks.spawn(async move {
        let (client, server) = match tokio::try_join!(client, server) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        super::tcp::splice(TokioIo::new(client), TokioIo::new(server), counters, idle).await;
    });
}

/// The innermost cause of an upstream error caused by the client's body, for the answer.
fn client_error(e: &SendError) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// An HTTP/1.1 protocol upgrade meshlet carries (WebSocket and the like). `h2c` is declined:
/// the request is served as the HTTP/1.1 request it also is (RFC 9113 dropped h2c upgrades;
/// clients that want HTTP/2 in the clear send the preface, which meshlet detects).
fn is_upgrade(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"h2c"))
        && connection_has(h, "upgrade")
}

fn connection_has(h: &HeaderMap, token: &str) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Removes hop-by-hop fields (RFC 9110 7.6.1): those named in Connection and the fixed set.
/// `TE: trailers` is kept (gRPC needs it end to end); Upgrade and Connection are kept on an
/// upgrade request so that the endpoint sees it.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(conn) = h.get(header::CONNECTION) {
        // Host and Content-Length are never removed: a client naming them in Connection is
        // wrong (RFC 9110 7.6.1), and dropping them would change where and how the request
        // goes.
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            .filter(|n| n != header::HOST && n != header::CONTENT_LENGTH)
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    if !keep_upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
    h.remove("http2-settings");
    h.remove(header::TRANSFER_ENCODING);
    if h.get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
}

fn set_authority(parts: &mut http::request::Parts, service: &str) {
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or(service)
        .to_string();
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    if uri.scheme.is_none() {
        uri.scheme = Some(http::uri::Scheme::HTTP);
    }
    uri.authority = authority.parse().ok();
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.contains_key(header::TE));
    }

    #[test]
    fn upgrade_fields_are_kept_for_upgrades() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert!(h.contains_key(header::UPGRADE) && h.contains_key(header::CONNECTION));
    }
}
