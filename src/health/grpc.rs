//! `grpc.health.v1.Health` (Check and Watch) on `admin.grpc_listen`, so that kubelet's native
//! gRPC probes and `grpc_health_probe` work against the sidecar.
//!
//! Services: `""` is overall readiness (exactly what `/ready` says), `meshlet.live` is liveness
//! (SERVING while meshlet answers), and each dependency by name (`name.namespace`) is SERVING
//! unless it is unhealthy. Check of any other name answers the gRPC status NOT_FOUND; Watch of
//! one streams SERVICE_UNKNOWN (and follows it, should it become a dependency), as the health
//! protocol asks. Watch sends the current status at once and then every change; statuses are
//! re-evaluated when the dependency model publishes and at least every second (for `""`, which
//! also follows the proxy's own readiness and the app's readiness probes).
//!
//! Plain hyper HTTP/2 with hand-encoded protobuf: `HealthCheckRequest { string service = 1; }`,
//! `HealthCheckResponse { ServingStatus status = 1; }`, gRPC's 5-byte message framing and the
//! status in trailers. No gRPC stack is needed outside the tests.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::model::State;
use super::probes::{get_varint, put_varint};
use crate::admin::Admin;

pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
pub const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";
/// The liveness service name.
pub const LIVE_SERVICE: &str = "meshlet.live";

/// `HealthCheckResponse.ServingStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Serving {
    Unknown = 0,
    Serving = 1,
    NotServing = 2,
    ServiceUnknown = 3,
}

/// A request is a service name: a few bytes. More than this is not a health check.
const MAX_REQUEST: usize = 16 * 1024;

/// gRPC status codes used here.
const OK: u8 = 0;
const INVALID_ARGUMENT: u8 = 3;
const NOT_FOUND: u8 = 5;
const UNIMPLEMENTED: u8 = 12;
const UNAVAILABLE: u8 = 14;

type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;
pub type GrpcBody = StreamBody<FrameStream>;

/// Serves until `stop` is cancelled.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(%error, "gRPC health accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (admin, stop) = (admin.clone(), stop.clone());
        tokio::spawn(async move {
            let stop2 = stop.clone();
            let svc = service_fn(move |req| {
                let (admin, stop) = (admin.clone(), stop2.clone());
                async move { Ok::<_, Infallible>(route(admin, req, stop).await) }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}

async fn route(
    admin: Arc<Admin>,
    req: Request<Incoming>,
    stop: CancellationToken,
) -> Response<GrpcBody> {
    let watch = match (req.method(), req.uri().path()) {
        (&Method::POST, CHECK_PATH) => false,
        (&Method::POST, WATCH_PATH) => true,
        (_, path) => {
            return trailers_only(UNIMPLEMENTED, &format!("unknown method {path}"));
        }
    };
    let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return trailers_only(INVALID_ARGUMENT, &format!("reading the request: {e}")),
    };
    let service = match decode_request(&body) {
        Ok(s) => s,
        Err(e) => return trailers_only(INVALID_ARGUMENT, &e),
    };
    if !watch {
        return match status_of(&admin, &service).await {
            Some(s) => {
                let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                    Ok(Frame::data(encode_response(s))),
                    Ok(Frame::trailers(status_trailers(OK, ""))),
                ];
                grpc_response(Box::pin(futures_util::stream::iter(frames)))
            }
            None => trailers_only(NOT_FOUND, &format!("unknown service {service:?}")),
        };
    }
    struct W {
        admin: Arc<Admin>,
        service: String,
        last: Option<Serving>,
        rx: tokio::sync::watch::Receiver<Arc<super::model::Snapshot>>,
        stop: CancellationToken,
        done: bool,
    }
    let w = W {
        rx: admin.dependencies.clone(),
        admin,
        service,
        last: None,
        stop,
        done: false,
    };
    let frames = futures_util::stream::unfold(w, |mut w| async move {
        if w.done {
            return None;
        }
        loop {
            let s = status_of(&w.admin, &w.service)
                .await
                .unwrap_or(Serving::ServiceUnknown);
            if w.last != Some(s) {
                w.last = Some(s);
                return Some((Ok(Frame::data(encode_response(s))), w));
            }
            tokio::select! {
                _ = w.stop.cancelled() => {
                    w.done = true;
                    let t = status_trailers(UNAVAILABLE, "meshlet is shutting down");
                    return Some((Ok(Frame::trailers(t)), w));
                }
                changed = w.rx.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    grpc_response(Box::pin(frames))
}

/// The serving status of a service name; `None` for a name meshlet does not know.
async fn status_of(admin: &Admin, service: &str) -> Option<Serving> {
    let serving = |ok: bool| {
        if ok {
            Serving::Serving
        } else {
            Serving::NotServing
        }
    };
    match service {
        "" => Some(serving(admin.verdict().await.ready)),
        LIVE_SERVICE => Some(Serving::Serving),
        name => {
            let snap = admin.dependencies.borrow().clone();
            snap.get(name).map(|d| serving(d.state != State::Unhealthy))
        }
    }
}

fn grpc_response(frames: FrameStream) -> Response<GrpcBody> {
    let mut r = Response::new(StreamBody::new(frames));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    r
}

/// An error answer: the status in the headers and no body.
fn trailers_only(code: u8, message: &str) -> Response<GrpcBody> {
    let mut r = grpc_response(Box::pin(futures_util::stream::empty()));
    r.headers_mut().extend(status_trailers(code, message));
    r
}

fn status_trailers(code: u8, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    if !message.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
            h.insert("grpc-message", v);
        }
    }
    h
}

/// `grpc-message` is percent-encoded (outside printable ASCII, and `%` itself).
#[doc(hidden)] // pub for the fuzz targets in fuzz/
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `service` of a `HealthCheckRequest` in one uncompressed gRPC frame. No frame at all is
/// taken as the empty request (service "").
pub fn decode_request(body: &[u8]) -> Result<String, String> {
    if body.is_empty() {
        return Ok(String::new());
    }
    let header = body
        .get(..5)
        .ok_or_else(|| "the request's gRPC frame is cut short".to_string())?;
    if header[0] != 0 {
        return Err("compressed requests are not supported".to_string());
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let msg = body
        .get(5..5usize.saturating_add(len))
        .ok_or_else(|| "the request's message is cut short".to_string())?;
    let bad = || "the request is not a HealthCheckRequest".to_string();
    let mut service = String::new();
    let mut at = 0;
    while at < msg.len() {
        let key = get_varint(msg, &mut at).ok_or_else(bad)?;
        let (start, skip) = match key & 7 {
            0 => {
                get_varint(msg, &mut at).ok_or_else(bad)?;
                (at, 0)
            }
            1 => (at, 8),
            2 => {
                let n = get_varint(msg, &mut at).ok_or_else(bad)?;
                (at, usize::try_from(n).map_err(|_| bad())?)
            }
            5 => (at, 4),
            _ => return Err(bad()),
        };
        let end = start
            .checked_add(skip)
            .filter(|&e| e <= msg.len())
            .ok_or_else(bad)?;
        if key == (1 << 3 | 2) {
            service = std::str::from_utf8(&msg[start..end])
                .map_err(|_| "the service name is not UTF-8".to_string())?
                .to_string();
        }
        at = end;
    }
    Ok(service)
}

/// `HealthCheckResponse { status }` in a gRPC frame.
pub fn encode_response(s: Serving) -> Bytes {
    let mut msg = Vec::with_capacity(2);
    if s != Serving::Unknown {
        // Field 1, varint; proto3 leaves the zero value out.
        msg.push(0x08);
        put_varint(&mut msg, s as u64);
    }
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_encoding() {
        assert_eq!(decode_request(b"").unwrap(), "");
        assert_eq!(decode_request(&[0, 0, 0, 0, 0]).unwrap(), "");
        let mut req = vec![0, 0, 0, 0, 12, 0x0a, 10];
        req.extend_from_slice(b"db.default");
        assert_eq!(decode_request(&req).unwrap(), "db.default");
        // An unknown varint field before it is skipped.
        let mut req = vec![0, 0, 0, 0, 14, 0x10, 0x01, 0x0a, 10];
        req.extend_from_slice(b"db.default");
        assert_eq!(decode_request(&req).unwrap(), "db.default");
        assert!(decode_request(&[1, 0, 0, 0, 0]).is_err());
        assert!(decode_request(&[0, 0, 0, 0, 5, 0x0a, 9, b'a']).is_err());
        assert_eq!(
            &encode_response(Serving::Serving)[..],
            &[0, 0, 0, 0, 2, 8, 1]
        );
        assert_eq!(&encode_response(Serving::Unknown)[..], &[0, 0, 0, 0, 0]);
        assert_eq!(percent_encode("a%b\u{e9}"), "a%25b%C3%A9");
    }
}
