//! Retries: which outcomes are retried ([`RetryOn`]), which methods may be ([`is_idempotent`]),
//! how long to wait ([`backoff`], [`retry_after`]), how many retries the proxy can afford
//! ([`budget`]). How a request body is kept so that it can be sent again is
//! [`super::replay`].
//!
//! Everything here is pure logic with the clock passed in, so that it can be tested without
//! sleeping; the proxy wires it into the forwarding loop.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, StatusCode};
pub use tower::retry::budget::{Budget, TpsBudget};

/// The outcomes that are retried, besides connect failures, which always are: a request that
/// never reached an endpoint cannot have been processed, so trying another is always safe.
///
/// The HTTP conditions (`5xx`, `gateway-error`, `reset`) are meant for idempotent methods only
/// ([`is_idempotent`]): the endpoint may have acted on the request before it failed.
/// `retriable-grpc` applies to any gRPC call (they are all POSTs), because a status from
/// [`RETRIABLE_GRPC`] is the one gRPC reserves for "not done, try again"; see
/// [`RetryOn::retries_response`], which applies these rules.
///
/// `Default` is [`RetryOn::DEFAULT_POLICY`], not "nothing".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryOn {
    /// Any 5xx response. Off by default: a 500 is usually a bug that the next attempt hits too,
    /// and retrying it only multiplies the load on a failing service.
    pub server_error: bool,
    /// 502, 503 and 504: the answers of gateways and overloaded or restarting servers, which
    /// another endpoint (or the same one a moment later) often does not give.
    pub gateway_error: bool,
    /// The connection was reset, or failed in another way, after the request was sent.
    pub reset: bool,
    /// A `grpc-status` from [`RETRIABLE_GRPC`] in the response headers (a trailers-only
    /// response: a status in real trailers comes after the body has been streamed to the
    /// client, too late to retry).
    pub retriable_grpc: bool,
}

/// The names [`RetryOn::parse`] accepts, for its error messages.
const ACCEPTED: &str = "5xx, gateway-error, reset, connect-failure, retriable-grpc, none";

impl RetryOn {
    /// Retry nothing but connect failures.
    pub const NONE: RetryOn = RetryOn {
        server_error: false,
        gateway_error: false,
        reset: false,
        retriable_grpc: false,
    };

    /// The default policy. Every condition in it means the request most likely was not
    /// processed, or may be processed twice without harm: connect failures; gateway errors and
    /// resets, for idempotent methods; gRPC UNAVAILABLE, which servers answer while shedding
    /// load or shutting down (the same choice Istio makes by default). `5xx` is left out: a
    /// plain 500 is rarely transient. The retry budget bounds what retries can add to the load
    /// whatever the policy.
    pub const DEFAULT_POLICY: &'static str = "connect-failure,gateway-error,reset,retriable-grpc";

    /// [`RetryOn::DEFAULT_POLICY`], as a value (usable in constants).
    pub const fn default_policy() -> RetryOn {
        RetryOn {
            server_error: false,
            gateway_error: true,
            reset: true,
            retriable_grpc: true,
        }
    }

    /// Parses a comma-separated list of `5xx`, `gateway-error`, `reset`, `connect-failure`
    /// (accepted for familiarity; always on), `retriable-grpc`, or `none` alone. Names are
    /// case-insensitive and may be surrounded by spaces. The error names the bad item and lists
    /// the accepted ones.
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::NONE;
        let mut none = false;
        let mut others = false;
        for item in s.split(',') {
            let item = item.trim();
            if item.is_empty() {
                return Err(format!(
                    "empty retry condition in {s:?} (accepted: {ACCEPTED})"
                ));
            }
            if item.eq_ignore_ascii_case("none") {
                none = true;
                continue;
            }
            others = true;
            if item.eq_ignore_ascii_case("5xx") {
                on.server_error = true;
            } else if item.eq_ignore_ascii_case("gateway-error") {
                on.gateway_error = true;
            } else if item.eq_ignore_ascii_case("reset") {
                on.reset = true;
            } else if item.eq_ignore_ascii_case("retriable-grpc") {
                on.retriable_grpc = true;
            } else if !item.eq_ignore_ascii_case("connect-failure") {
                return Err(format!(
                    "unknown retry condition {item:?} (accepted: {ACCEPTED})"
                ));
            }
        }
        if none && others {
            return Err(format!(
                "retry condition \"none\" cannot be combined with others in {s:?}"
            ));
        }
        Ok(on)
    }

    /// Whether a response calls for another attempt of a request with this method: the HTTP
    /// conditions only for idempotent methods, `retriable-grpc` for any.
    pub fn retries_response(&self, method: &Method, status: StatusCode, h: &HeaderMap) -> bool {
        if self.retriable_grpc && grpc_status(h).is_some_and(|s| RETRIABLE_GRPC.contains(&s)) {
            return true;
        }
        if !is_idempotent(method) {
            return false;
        }
        (self.server_error && status.is_server_error())
            || (self.gateway_error && matches!(status.as_u16(), 502..=504))
    }

    /// Whether a request whose connection failed after it was sent may be tried again.
    pub fn retries_reset(&self, method: &Method) -> bool {
        self.reset && is_idempotent(method)
    }
}

impl Default for RetryOn {
    fn default() -> RetryOn {
        RetryOn::default_policy()
    }
}

impl FromStr for RetryOn {
    type Err = String;

    fn from_str(s: &str) -> Result<RetryOn, String> {
        RetryOn::parse(s)
    }
}

/// The canonical policy string, which [`RetryOn::parse`] reads back to the same value.
impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connect-failure")?;
        for (on, name) in [
            (self.server_error, "5xx"),
            (self.gateway_error, "gateway-error"),
            (self.reset, "reset"),
            (self.retriable_grpc, "retriable-grpc"),
        ] {
            if on {
                write!(f, ",{name}")?;
            }
        }
        Ok(())
    }
}

/// The gRPC status codes worth another attempt: only UNAVAILABLE (14), which gRPC defines as
/// transient and which servers answer when they did not process the call. DEADLINE_EXCEEDED
/// (4) is not retried: the caller's deadline is spent, so another attempt could not finish in
/// time. RESOURCE_EXHAUSTED (8) is not either: it is usually a quota, which retrying worsens.
pub const RETRIABLE_GRPC: &[u16] = &[14];

/// The `grpc-status` in a set of headers (a trailers-only response), if any and valid.
pub fn grpc_status(h: &HeaderMap) -> Option<u16> {
    std::str::from_utf8(h.get("grpc-status")?.as_bytes())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether a method is idempotent (RFC 9110 9.2.2): GET, HEAD, OPTIONS, TRACE, PUT, DELETE.
/// Only requests with such a method may be sent again after the endpoint may have seen them.
pub fn is_idempotent(m: &Method) -> bool {
    *m == Method::GET
        || *m == Method::HEAD
        || *m == Method::OPTIONS
        || *m == Method::TRACE
        || *m == Method::PUT
        || *m == Method::DELETE
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base * 2^attempt)]`, with
/// `attempt` starting at 0. Full jitter (rather than a fixed or half-jittered delay) spreads
/// the retries of many clients that failed together, so that they do not come back together.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = backoff_ceiling(attempt, base, max);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// `min(max, base * 2^attempt)`, without overflowing.
fn backoff_ceiling(attempt: u32, base: Duration, max: Duration) -> Duration {
    1u32.checked_shl(attempt)
        .and_then(|factor| base.checked_mul(factor))
        .map_or(max, |d| d.min(max))
}

/// The delay a response asks for in `Retry-After` (RFC 9110 10.2.3), delta-seconds or an
/// HTTP-date, at most `cap`; `None` when absent or invalid. A date in the past means no delay.
/// The cap keeps a server from parking a request in the proxy for long; a delta-seconds too
/// large for a `u64` is still a long delay, and is capped like one.
pub fn retry_after(headers: &HeaderMap, now: SystemTime, cap: Duration) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let delay = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse::<u64>().map_or(cap, Duration::from_secs)
    } else {
        let at = httpdate::parse_http_date(v).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(cap))
}

/// The window over which a retry budget's deposits and withdrawals count (Linkerd's and
/// Finagle's default).
pub const BUDGET_TTL: Duration = Duration::from_secs(10);

/// A retry budget (tower's `TpsBudget`, Finagle's algorithm), so that retries cannot multiply
/// the load on a failing service: each request deposits `ratio` of a retry and each retry
/// withdraws one, over the last [`BUDGET_TTL`]; besides, a reserve of `min_per_sec` retries
/// per second of the TTL is always there, so that a service with little traffic can still
/// retry. A ratio that is not a positive number funds nothing (the reserve still applies).
pub fn budget(ratio: f64, min_per_sec: u32) -> TpsBudget {
    // TpsBudget asserts its bounds: keep the policy's values inside them.
    let ratio = if ratio > 0.0 { ratio.min(1000.0) } else { 0.0 };
    TpsBudget::new(
        BUDGET_TTL,
        min_per_sec.min(i32::MAX as u32 - 1),
        ratio as f32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn parse_policies() {
        assert_eq!(RetryOn::parse("none"), Ok(RetryOn::NONE));
        assert_eq!(RetryOn::parse("connect-failure"), Ok(RetryOn::NONE));
        assert_eq!(
            RetryOn::parse(" 5xx , Reset"),
            Ok(RetryOn {
                server_error: true,
                reset: true,
                ..RetryOn::NONE
            })
        );
        assert_eq!(
            RetryOn::parse(RetryOn::DEFAULT_POLICY),
            Ok(RetryOn::default())
        );
        assert_eq!(RetryOn::default(), RetryOn::default_policy());
        for on in [
            RetryOn::NONE,
            RetryOn::default(),
            RetryOn::parse("5xx,retriable-grpc").unwrap(),
        ] {
            assert_eq!(RetryOn::parse(&on.to_string()), Ok(on));
        }
        assert_eq!(
            "gateway-error".parse::<RetryOn>().map(|r| r.gateway_error),
            Ok(true)
        );
    }

    #[test]
    fn parse_errors_name_the_item_and_the_accepted_ones() {
        let e = RetryOn::parse("5xx,gateway-eror").unwrap_err();
        assert!(e.contains("\"gateway-eror\""), "{e}");
        assert!(e.contains(ACCEPTED), "{e}");
        let e = RetryOn::parse("5xx,,reset").unwrap_err();
        assert!(e.contains("empty"), "{e}");
        assert!(RetryOn::parse("").is_err());
        let e = RetryOn::parse("none,reset").unwrap_err();
        assert!(e.contains("none"), "{e}");
    }

    #[test]
    fn responses_are_retried_per_policy_and_method() {
        let h = HeaderMap::new();
        let on = RetryOn::default();
        assert!(on.retries_response(&Method::GET, StatusCode::SERVICE_UNAVAILABLE, &h));
        assert!(on.retries_response(&Method::PUT, StatusCode::GATEWAY_TIMEOUT, &h));
        assert!(!on.retries_response(&Method::GET, StatusCode::INTERNAL_SERVER_ERROR, &h));
        assert!(!on.retries_response(&Method::POST, StatusCode::SERVICE_UNAVAILABLE, &h));
        assert!(!on.retries_response(&Method::GET, StatusCode::OK, &h));
        let all5 = RetryOn::parse("5xx").unwrap();
        assert!(all5.retries_response(&Method::GET, StatusCode::INTERNAL_SERVER_ERROR, &h));
        assert!(!all5.retries_response(&Method::GET, StatusCode::TOO_MANY_REQUESTS, &h));

        let mut g = HeaderMap::new();
        g.insert("grpc-status", HeaderValue::from_static("14"));
        assert!(on.retries_response(&Method::POST, StatusCode::OK, &g));
        assert!(!RetryOn::NONE.retries_response(&Method::POST, StatusCode::OK, &g));
        g.insert("grpc-status", HeaderValue::from_static("4"));
        assert!(!on.retries_response(&Method::POST, StatusCode::OK, &g));
        g.insert("grpc-status", HeaderValue::from_static("x"));
        assert!(!on.retries_response(&Method::POST, StatusCode::OK, &g));

        assert!(on.retries_reset(&Method::DELETE));
        assert!(!on.retries_reset(&Method::POST));
        assert!(!RetryOn::NONE.retries_reset(&Method::GET));
    }

    #[test]
    fn idempotent_methods() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(is_idempotent(&m.parse().unwrap()), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "PURGE"] {
            assert!(!is_idempotent(&m.parse().unwrap()), "{m}");
        }
    }

    #[test]
    fn backoff_is_bounded_and_capped() {
        let base = Duration::from_millis(25);
        let max = Duration::from_secs(1);
        assert_eq!(backoff_ceiling(0, base, max), base);
        assert_eq!(backoff_ceiling(3, base, max), Duration::from_millis(200));
        assert_eq!(backoff_ceiling(6, base, max), max);
        assert_eq!(backoff_ceiling(31, base, max), max);
        assert_eq!(backoff_ceiling(32, base, max), max);
        assert_eq!(backoff_ceiling(u32::MAX, Duration::MAX, max), max);
        for attempt in [0, 1, 2, 5, 10, 64, u32::MAX] {
            let ceiling = backoff_ceiling(attempt, base, max);
            for _ in 0..200 {
                assert!(backoff(attempt, base, max) <= ceiling);
            }
        }
        // Jittered: not always the same delay.
        let first = backoff(4, base, max);
        assert!((0..100).any(|_| backoff(4, base, max) != first));
        assert_eq!(backoff(3, Duration::ZERO, max), Duration::ZERO);
    }

    #[test]
    fn retry_after_seconds_dates_and_cap() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let cap = Duration::from_secs(30);
        let ra = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::RETRY_AFTER, HeaderValue::from_static(v));
            retry_after(&h, now, cap)
        };
        assert_eq!(retry_after(&HeaderMap::new(), now, cap), None);
        assert_eq!(ra("5"), Some(Duration::from_secs(5)));
        assert_eq!(ra(" 0 "), Some(Duration::ZERO));
        assert_eq!(ra("120"), Some(cap));
        assert_eq!(ra("99999999999999999999999"), Some(cap));
        let in_10s = httpdate::fmt_http_date(now + Duration::from_secs(10));
        let mut h = HeaderMap::new();
        h.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_str(&in_10s).unwrap(),
        );
        assert_eq!(retry_after(&h, now, cap), Some(Duration::from_secs(10)));
        assert_eq!(
            retry_after(&h, now, Duration::from_secs(3)),
            Some(Duration::from_secs(3))
        );
        // A date in the past: no wait.
        assert_eq!(ra("Sun, 06 Nov 1994 08:49:37 GMT"), Some(Duration::ZERO));
        assert_eq!(ra("-5"), None);
        assert_eq!(ra("1.5"), None);
        assert_eq!(ra("soon"), None);
        assert_eq!(ra(""), None);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_ratio_of_requests_plus_reserve_over_its_window() {
        let b = budget(0.2, 0);
        assert!(!b.withdraw());
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!((0..100).filter(|_| b.withdraw()).count(), 20);

        // A reserve of 1 per second is 10 over the window, with or without traffic.
        let b = budget(0.2, 1);
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!((0..100).filter(|_| b.withdraw()).count(), 30);
        // The deposits expire with the window; what was spent comes back with it.
        tokio::time::advance(BUDGET_TTL + Duration::from_secs(2)).await;
        assert_eq!((0..100).filter(|_| b.withdraw()).count(), 10);
        for _ in 0..10 {
            b.deposit();
        }
        assert_eq!((0..100).filter(|_| b.withdraw()).count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_odd_parameters_do_not_panic() {
        for ratio in [f64::NAN, -1.0, 0.0] {
            let b = budget(ratio, 0);
            b.deposit();
            assert!(!b.withdraw(), "ratio {ratio}");
        }
        let b = budget(f64::INFINITY, u32::MAX);
        b.deposit();
        assert!(b.withdraw());
    }
}
