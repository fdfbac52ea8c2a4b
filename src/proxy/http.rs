//! HTTP proxying: every request is balanced on its own, sent with the client's protocol over a
//! pooled connection, and answered with the upstream's response streamed back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::Target;
use super::body::Body;
use super::client::SendError;

/// Connect attempts for one request, each on a different endpoint.
const MAX_CONNECT_ATTEMPTS: usize = 3;

pub static MESHLET_ERROR: HeaderName = HeaderName::from_static("meshlet-error");

/// The hyper service function: forwards and records metrics. Never fails: errors become
/// responses with a `meshlet-error` header.
pub async fn handle(t: Arc<Target>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let rsp = forward(&t, req).await;
    t.metrics
        .requests
        .with_label_values(&[t.direction.as_str(), &t.service, rsp.status().as_str()])
        .inc();
    t.duration.observe(start.elapsed().as_secs_f64());
    Ok(rsp)
}

async fn forward(t: &Target, mut req: Request<Incoming>) -> Response<Body> {
    let grpc = is_grpc(req.headers());
    let upgrade = if req.version() != Version::HTTP_2 && is_upgrade(req.headers()) {
        Some(hyper::upgrade::on(&mut req))
    } else {
        None
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    if parts.version == Version::HTTP_2 && parts.uri.authority().is_none() {
        set_authority(&mut parts, &t.service);
    }
    let mut req = Request::from_parts(parts, Body::incoming(body));

    t.route.wait_synced().await;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_error = None;
    while tried.len() < MAX_CONNECT_ATTEMPTS {
        let Some(ep) = t.route.pick(&tried) else {
            break;
        };
        let inflight = ep.start();
        let res = if upgrade.is_some() {
            ep.pool.send_upgrade(req).await
        } else {
            ep.pool.send(req).await
        };
        match res {
            Ok(mut rsp) => {
                ep.connect_succeeded();
                drop(inflight);
                if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client) = upgrade {
                        splice_upgrade(t, client, &mut rsp);
                        return rsp;
                    }
                }
                strip_hop_by_hop(rsp.headers_mut(), false);
                return rsp;
            }
            Err(SendError::Connect {
                addr,
                error,
                request,
            }) => {
                inflight.forget();
                ep.connect_failed();
                t.metrics
                    .connect_errors
                    .with_label_values(&[&*t.service, &addr.to_string()])
                    .inc();
                tracing::debug!(service = %t.service, endpoint = %addr, %error, "connect failed; trying another endpoint");
                last_error = Some(format!("connect to {addr}: {error}"));
                tried.push(addr);
                req = *request;
            }
            Err(e @ SendError::Upstream { .. }) => {
                tracing::debug!(service = %t.service, error = %e, "upstream request failed");
                return error_response(
                    StatusCode::BAD_GATEWAY,
                    grpc,
                    &format!("upstream error for {}: {e}", t.service),
                );
            }
        }
    }
    match last_error {
        None => {
            t.metrics
                .no_endpoints
                .with_label_values(&[t.direction.as_str(), &t.service, "http"])
                .inc();
            error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                grpc,
                &format!("no endpoints for {}", t.service),
            )
        }
        Some(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            grpc,
            &format!("no reachable endpoint for {} ({e})", t.service),
        ),
    }
}

/// After a `101 Switching Protocols`, joins the client's and the endpoint's upgraded streams.
/// Bytes are counted as they are written, so that a long-lived stream shows while it lasts and
/// one that ends in an error (a reset) keeps what it carried.
fn splice_upgrade(t: &Target, client: hyper::upgrade::OnUpgrade, rsp: &mut Response<Body>) {
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
        super::tcp::splice(TokioIo::new(client), TokioIo::new(server), counters).await;
    });
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE) && connection_has(h, "upgrade")
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
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
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

/// An error answer from meshlet itself. gRPC clients get a trailers-only response with
/// grpc-status UNAVAILABLE (14), which they understand, and the same `meshlet-error` header.
pub fn error_response(status: StatusCode, grpc: bool, msg: &str) -> Response<Body> {
    let value = HeaderValue::from_str(msg).unwrap_or(HeaderValue::from_static("error"));
    let mut rsp = if grpc {
        let mut r = Response::new(Body::empty());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("14"));
        r.headers_mut().insert("grpc-message", value.clone());
        r
    } else {
        let mut r = Response::new(Body::full(format!("{msg}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    rsp.headers_mut().insert(MESHLET_ERROR.clone(), value);
    rsp
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

    #[test]
    fn grpc_errors_are_trailers_only() {
        let r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            true,
            "no endpoints for a.b",
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()[&MESHLET_ERROR], "no endpoints for a.b");
        let r = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "no endpoints for a.b",
        );
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
