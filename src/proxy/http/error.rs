//! Every answer meshlet gives in place of an endpoint, in one enum: its HTTP status, its
//! `meshlet-error` reason, the gRPC status of its trailers-only form, and its metric label
//! (`meshlet_errors_total{reason}`) are all decided here.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use super::body::Body;
use super::edge::Refusal;

pub static MESHLET_ERROR: HeaderName = HeaderName::from_static("meshlet-error");

const GRPC_CANCELLED: &str = "1";
const GRPC_INVALID_ARGUMENT: &str = "3";
const GRPC_DEADLINE_EXCEEDED: &str = "4";
const GRPC_RESOURCE_EXHAUSTED: &str = "8";
const GRPC_UNAVAILABLE: &str = "14";

/// Why meshlet answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request head is not one meshlet forwards (see `edge::check_head`).
    #[error("{}", .0.reason)]
    Refused(Refusal),
    /// An inbound concurrency or rate limit is reached.
    #[error("inbound {limit} limit reached for {service}")]
    InboundLimit {
        limit: &'static str,
        service: Arc<str>,
    },
    /// Reading the client's request body (to keep it for retries) failed.
    #[error("reading the request body failed: {0}")]
    RequestBody(String),
    /// The client's request body broke off or was malformed while it was being sent.
    #[error("the client's request body failed: {0}")]
    ClientBody(String),
    /// Discovery knows no endpoint of the service.
    #[error("no endpoints for {0}")]
    NoEndpoints(Arc<str>),
    /// Every endpoint is ejected by its breaker (or backing off after failed connects).
    #[error("no available endpoints for {0}")]
    NoneAvailable(Arc<str>),
    /// Connecting failed on every endpoint tried.
    #[error("no reachable endpoint for {service} ({last})")]
    Unreachable { service: Arc<str>, last: String },
    /// The request was sent and the exchange with the endpoint failed.
    #[error("upstream error for {service}: {error}")]
    Upstream { service: Arc<str>, error: String },
    /// The request's deadline passed before an answer came.
    #[error("request to {service} timed out after {after:?}")]
    Timeout { service: Arc<str>, after: Duration },
    /// No byte moved either way for `http.stream_idle_timeout`.
    #[error(
        "no bytes moved either way for {} (http.stream_idle_timeout)",
        humantime::format_duration(*.0)
    )]
    StreamIdle(Duration),
    /// The client's HTTP/2 connection is being closed for abuse (see `h2_guard`).
    #[error("this HTTP/2 connection is closing: too many streams reset by the client")]
    ConnectionClosing,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Refused(r) => r.status,
            ProxyError::RequestBody(_) | ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::InboundLimit { .. }
            | ProxyError::NoEndpoints(_)
            | ProxyError::NoneAvailable(_)
            | ProxyError::Unreachable { .. }
            | ProxyError::ConnectionClosing => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } | ProxyError::StreamIdle(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The grpc-status of the trailers-only answer a gRPC client gets.
    fn grpc_status(&self) -> &'static str {
        match self {
            ProxyError::Refused(_) => GRPC_INVALID_ARGUMENT,
            ProxyError::InboundLimit { .. } => GRPC_RESOURCE_EXHAUSTED,
            ProxyError::ClientBody(_) => GRPC_CANCELLED,
            ProxyError::Timeout { .. } => GRPC_DEADLINE_EXCEEDED,
            ProxyError::RequestBody(_)
            | ProxyError::NoEndpoints(_)
            | ProxyError::NoneAvailable(_)
            | ProxyError::Unreachable { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::StreamIdle(_)
            | ProxyError::ConnectionClosing => GRPC_UNAVAILABLE,
        }
    }

    /// The `reason` label of `meshlet_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::Refused(_) => "refused",
            ProxyError::InboundLimit { .. } => "inbound_limit",
            ProxyError::RequestBody(_) | ProxyError::ClientBody(_) => "client_body",
            ProxyError::NoEndpoints(_) => "no_endpoints",
            ProxyError::NoneAvailable(_) => "no_available_endpoints",
            ProxyError::Unreachable { .. } => "unreachable",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::StreamIdle(_) => "stream_idle",
            ProxyError::ConnectionClosing => "connection_closing",
        }
    }

    /// The answer: for a gRPC client, a trailers-only response (HTTP 200) with the gRPC status;
    /// for others the HTTP status and the reason as text. Both carry `meshlet-error`.
    pub fn response(&self, grpc: bool) -> Response<Body> {
        let msg = self.to_string();
        let value = HeaderValue::from_str(&msg).unwrap_or(HeaderValue::from_static("error"));
        let mut rsp = if grpc {
            let mut r = Response::new(Body::empty());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            r.headers_mut()
                .insert("grpc-status", HeaderValue::from_static(self.grpc_status()));
            r.headers_mut().insert("grpc-message", value.clone());
            r
        } else {
            let mut r = Response::new(Body::full(format!("{msg}\n")));
            *r.status_mut() = self.status();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        };
        rsp.headers_mut().insert(MESHLET_ERROR.clone(), value);
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_errors_are_trailers_only() {
        let e = ProxyError::NoEndpoints("a.b".into());
        let r = e.response(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()[&MESHLET_ERROR], "no endpoints for a.b");
        let r = e.response(false);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[&MESHLET_ERROR], "no endpoints for a.b");
    }

    #[test]
    fn each_kind_has_its_status_and_grpc_status() {
        let s: Arc<str> = "a.b".into();
        let cases = [
            (
                ProxyError::Timeout {
                    service: s.clone(),
                    after: Duration::from_millis(250),
                },
                504,
                "4",
                "request to a.b timed out after 250ms",
            ),
            (
                ProxyError::InboundLimit {
                    limit: "rate",
                    service: s.clone(),
                },
                503,
                "8",
                "inbound rate limit reached for a.b",
            ),
            (
                ProxyError::ClientBody("unexpected EOF".into()),
                400,
                "1",
                "the client's request body failed: unexpected EOF",
            ),
            (
                ProxyError::StreamIdle(Duration::from_secs(300)),
                504,
                "14",
                "no bytes moved either way for 5m (http.stream_idle_timeout)",
            ),
        ];
        for (e, status, grpc, msg) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
            assert_eq!(e.response(true).headers()["grpc-status"], grpc, "{e}");
            assert_eq!(e.to_string(), msg);
        }
    }
}
