//! Per-destination policy: timeouts, retries, circuit breaking, request deduplication.
//!
//! A policy is built from layers, each a [`PolicySpec`] of optional keys: the built-in
//! defaults, the config file's `defaults:`, then the destination's own settings (a static
//! service's `policy:` in the file, or the `meshlet.dev/*` annotations on its Kubernetes
//! Service). Every key has one name in YAML (snake_case) and one as an annotation (kebab-case),
//! both generated from the table below, so the two can never drift apart.
//!
//! A bad value in the config file is a config error (exit 2, naming key and value); a bad
//! annotation is ignored with a warning naming the object, key and value, counted in
//! `meshlet_policy_errors_total`, and the layer below is used: never a crash, never traffic
//! stopped.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::breaker::{HttpFailures, Mode};
use crate::config::{ANY_DURATION, Bound, Dur, InBounds, POSITIVE_DURATION as POSITIVE};
use crate::proxy::http::retry::RetryOn;

pub const ANNOTATION_PREFIX: &str = "meshlet.dev/";

/// Whole numbers from `min` to `max`.
const fn count(min: u64, max: u64) -> Bound {
    Bound::Count { min, max }
}

macro_rules! policy {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $default:expr, $annotation:literal, $bound:expr; )*) => {
        /// One layer of policy keys, each optional.
        #[derive(Debug, Clone, Default, PartialEq, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct PolicySpec {
            $( $(#[doc = $doc])* pub $field: Option<$ty>, )*
        }

        /// A destination's resolved policy.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Policy {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for Policy {
            fn default() -> Self {
                Policy { $( $field: $default, )* }
            }
        }

        impl PolicySpec {
            /// `over`'s keys where set, else this layer's.
            pub fn overlay(&self, over: &PolicySpec) -> PolicySpec {
                PolicySpec { $( $field: over.$field.clone().or_else(|| self.$field.clone()), )* }
            }

            /// The policy: every key set in this layer, the built-in default otherwise.
            pub fn resolve(&self) -> Policy {
                let d = Policy::default();
                Policy { $( $field: self.$field.clone().unwrap_or(d.$field), )* }
            }

            /// Sets one key from an annotation value, if it parses and is in its key's range.
            /// `None`: not a policy key.
            fn set(&mut self, key: &str, value: &str) -> Option<Result<(), String>> {
                match key {
                    $( $annotation => Some(
                        value
                            .trim()
                            .parse::<$ty>()
                            .map_err(|e| quote(value, e.to_string()))
                            .and_then(|v| {
                                InBounds::in_bounds(&v, &$bound)?;
                                self.$field = Some(v);
                                Ok(())
                            }),
                    ), )*
                    _ => None,
                }
            }

            /// Checks every key set in this layer against its range (the same check as for an
            /// annotation). The error names the YAML key.
            pub fn validate(&self) -> Result<(), (&'static str, String)> {
                $(
                    if let Some(v) = &self.$field {
                        InBounds::in_bounds(v, &$bound).map_err(|e| (stringify!($field), e))?;
                    }
                )*
                Ok(())
            }
        }

        /// Every policy key: its annotation (without the `meshlet.dev/` prefix), its YAML key
        /// and the values it allows.
        pub const KEYS: &[(&str, &str, Bound)] = &[ $( ($annotation, stringify!($field), $bound), )* ];
    };
}

policy! {
    /// Per-request timeout (`off`, or a duration): past it the answer is 504.
    timeout: Timeout = Timeout(None), "timeout", POSITIVE;
    /// A connection to an endpoint not made by then fails (and another endpoint is tried).
    connect_timeout: Dur = Dur(Duration::from_secs(1)), "connect-timeout", POSITIVE;
    /// Pooled upstream connections idle for longer are closed.
    idle_timeout: Dur = Dur(Duration::from_secs(4)), "idle-timeout", POSITIVE;
    /// What is retried besides connect failures (always retried): `5xx`, `gateway-error`,
    /// `reset`, `retriable-grpc`, `none`.
    retry_on: RetryOn = RetryOn::default_policy(), "retry-on", Bound::Any;
    /// Retries per request at most.
    max_retries: u32 = 2, "max-retries", count(0, 100);
    /// Retries allowed as a share of requests (`20%` or `0.2`).
    retry_budget: Ratio = Ratio(0.2), "retry-budget", Bound::Any;
    /// A reserve of retries always allowed on top of the budget, per second of its 10 s
    /// window (10: 100 retries in any 10 s).
    retry_budget_min: u32 = 10, "retry-budget-min", count(0, 1_000_000);
    /// The first retry's backoff bound (exponential, full jitter).
    retry_backoff: Dur = Dur(Duration::from_millis(25)), "retry-backoff", ANY_DURATION;
    /// The largest backoff.
    retry_backoff_max: Dur = Dur(Duration::from_secs(1)), "retry-backoff-max", ANY_DURATION;
    /// A Retry-After longer than this is not waited for: the answer goes back to the client.
    retry_after_max: Dur = Dur(Duration::from_secs(2)), "retry-after-max", ANY_DURATION;
    /// Circuit breaking per endpoint: `consecutive`, `success-rate`, `latency`, `off`.
    breaker: Mode = Mode::Consecutive, "breaker", Bound::Any;
    /// Consecutive failures that eject an endpoint.
    breaker_failures: u32 = 7, "breaker-failures", count(1, 1_000_000);
    /// First ejection; doubles with each failed probe.
    breaker_backoff: Dur = Dur(Duration::from_secs(1)), "breaker-backoff", POSITIVE;
    /// Longest ejection.
    breaker_backoff_max: Dur = Dur(Duration::from_secs(60)), "breaker-backoff-max", POSITIVE;
    /// `success-rate` mode: eject below this success rate.
    breaker_success_rate: Ratio = Ratio(0.8), "breaker-success-rate", Bound::Any;
    /// `success-rate` and `latency` modes: the sliding window.
    breaker_window: Dur = Dur(Duration::from_secs(10)), "breaker-window", POSITIVE;
    /// `success-rate` and `latency` modes: requests needed in the window before judging.
    breaker_min_requests: u32 = 20, "breaker-min-requests", count(1, 1_000_000);
    /// `latency` mode: eject an endpoint slower than this many times its peers' median.
    breaker_latency_factor: f64 = 3.0, "breaker-latency-factor", Bound::Number { min: 1.0, above: false, max: 1000.0 };
    /// Never eject more than this share of a service's endpoints.
    breaker_max_ejected: Ratio = Ratio(0.5), "breaker-max-ejected", Bound::Any;
    /// HTTP answers that count as failures: `5xx` or `gateway` (502, 503, 504 only).
    failure_statuses: HttpStatuses = HttpStatuses(HttpFailures::All5xx), "failure-statuses", Bound::Any;
    /// gRPC statuses that count as failures (names or numbers).
    failure_grpc: GrpcCodes = GrpcCodes(vec![14, 4, 13, 8]), "failure-grpc", Bound::Any;
    /// Deduplicate identical requests in flight (opt-in: it changes semantics for APIs that
    /// misuse GET).
    dedup: bool = false, "dedup", Bound::Any;
    /// Methods that may be deduplicated.
    dedup_methods: Methods = Methods(vec![http::Method::GET, http::Method::HEAD]), "dedup-methods", Bound::Any;
    /// Headers whose values join the key besides those that always do (credentials, cookies,
    /// encodings, ranges, conditionals).
    dedup_headers: HeaderNames = HeaderNames(vec![http::header::ACCEPT, http::header::ACCEPT_LANGUAGE]), "dedup-headers", Bound::Any;
    /// Larger responses are not shared: each waiter goes upstream on its own.
    dedup_max_body: ByteSize = ByteSize(1 << 20), "dedup-max-body", Bound::Bytes { max: 64 << 20 };
    /// A waiter waits this long for the leader's answer, then goes on its own.
    dedup_timeout: Dur = Dur(Duration::from_secs(5)), "dedup-timeout", POSITIVE;
    /// Waiters per key at most; more go on their own.
    dedup_max_waiters: u32 = 1000, "dedup-max-waiters", count(1, 1_000_000);
}

/// Makes sure an error message quotes the value (the value types' own errors do; the standard
/// number parsers' do not).
fn quote(value: &str, error: String) -> String {
    if error.contains('"') {
        error
    } else {
        format!("{value:?}: {error}")
    }
}

/// A policy annotation that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationError {
    pub key: String,
    pub value: String,
    pub error: String,
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:?}: {}", self.key, self.value, self.error)
    }
}

impl PolicySpec {
    /// The policy keys among an object's annotations. Invalid values and unknown `meshlet.dev/`
    /// keys are reported and skipped; other annotations are not ours and are left alone.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> (PolicySpec, Vec<AnnotationError>) {
        let mut spec = PolicySpec::default();
        let mut errors = Vec::new();
        for (k, v) in annotations {
            let Some(key) = k.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            match spec.set(key, v) {
                Some(Ok(())) => {}
                Some(Err(error)) => errors.push(AnnotationError {
                    key: k.clone(),
                    value: v.clone(),
                    error,
                }),
                // Pod-level keys (inject, dependencies, ...) are not errors on a Service.
                None if POD_KEYS.contains(&key) => {}
                None => errors.push(AnnotationError {
                    key: k.clone(),
                    value: v.clone(),
                    error: "not a meshlet policy annotation".into(),
                }),
            }
        }
        (spec, errors)
    }
}

/// `meshlet.dev/` annotations that belong to pods and namespaces, not to policies. Every
/// annotation the injector or the sidecar reads is here or a policy key (a unit test reads
/// their sources to keep it so).
const POD_KEYS: &[&str] = &[
    "inject",
    "injected",
    "version",
    "dependencies",
    "critical-dependencies",
    "ready-requires",
    "skip-inbound-ports",
    "skip-outbound-ports",
    "skip-outbound-cidrs",
    "proxy-cpu",
    "proxy-memory",
    "proxy-cpu-limit",
    "proxy-memory-limit",
    "log-level",
    "opaque-ports",
    "inbound-to-loopback",
    "concurrency-limit",
    "rate-limit",
    "rate-limit-burst",
];

// ===== value types: each parses from a string (annotations) and from YAML =====

/// Deserializes a YAML scalar through `FromStr`, so that a value reads the same in the file and
/// in an annotation, and an error quotes it.
macro_rules! from_str_deserialize {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = crate::config::scalar_string(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

from_str_deserialize!(
    Timeout,
    Ratio,
    HttpStatuses,
    GrpcCodes,
    Methods,
    HeaderNames,
    ByteSize,
    Mode,
    RetryOn
);

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s).map(Dur).map_err(|e| {
            format!("{s:?} is not a duration ({e}); write it like \"300ms\", \"30s\" or \"1m\"")
        })
    }
}

/// A timeout that may be `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

impl FromStr for Timeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" | "0" => Ok(Timeout(None)),
            // A zero duration ("0s") is kept, and refused by the key's range: it reads like a
            // timeout that fails every request, not like "no timeout".
            _ => s.parse::<Dur>().map(|d| Timeout(Some(d.0))),
        }
    }
}

impl InBounds for Timeout {
    fn in_bounds(&self, bound: &Bound) -> Result<(), String> {
        match self.0 {
            None => Ok(()),
            Some(d) if d.is_zero() => bound
                .duration(d)
                .map_err(|e| format!("{e}; write \"off\" for no timeout")),
            Some(d) => bound.duration(d),
        }
    }
}

impl InBounds for ByteSize {
    fn in_bounds(&self, bound: &Bound) -> Result<(), String> {
        bound.bytes(u64::try_from(self.0).unwrap_or(u64::MAX))
    }
}

// Their parsers accept only valid values.
impl InBounds for Ratio {}
impl InBounds for HttpStatuses {}
impl InBounds for GrpcCodes {}
impl InBounds for Methods {}
impl InBounds for HeaderNames {}
impl InBounds for Mode {}
impl InBounds for RetryOn {}

/// A share: `20%` or `0.2`, between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio(pub f64);

impl FromStr for Ratio {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let v = match s.strip_suffix('%') {
            Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
            None => s.parse::<f64>(),
        };
        match v {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(Ratio(v)),
            _ => Err(format!(
                "{s:?} is not a share: write it like \"20%\" or \"0.2\" (0 to 1)"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpStatuses(pub HttpFailures);

impl FromStr for HttpStatuses {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::breaker::FailureClass::parse_http(s).map(HttpStatuses)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcCodes(pub Vec<u16>);

impl FromStr for GrpcCodes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::breaker::FailureClass::parse_grpc(s).map(GrpcCodes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Methods(pub Vec<http::Method>);

impl FromStr for Methods {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| {
                http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("{m:?} is not an HTTP method"))
            })
            .collect::<Result<_, _>>()
            .map(Methods)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderNames(pub Vec<http::HeaderName>);

impl FromStr for HeaderNames {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                http::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| format!("{h:?} is not a header name"))
            })
            .collect::<Result<_, _>>()
            .map(HeaderNames)
    }
}

/// A size in bytes: `1048576`, `64KiB`, `1MiB`, `1MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (n, unit) = t.split_at(split);
        let mult: usize = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            _ => {
                return Err(format!(
                    "{s:?} is not a size: write it like \"65536\", \"64KiB\" or \"1MiB\""
                ));
            }
        };
        n.parse::<usize>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(ByteSize)
            .ok_or_else(|| {
                format!("{s:?} is not a size: write it like \"65536\", \"64KiB\" or \"1MiB\"")
            })
    }
}

#[cfg(test)]
mod tests {
    /// The keys the injector and the sidecar read, from their sources (tests excluded).
    #[test]
    fn every_meshlet_annotation_read_anywhere_is_known() {
        let sources = [
            include_str!("../inject/patch.rs"),
            include_str!("../inject/server.rs"),
            include_str!("pod.rs"),
            include_str!("../main.rs"),
        ];
        let mut seen = 0;
        for src in sources {
            let code = src.split("#[cfg(test)]").next().unwrap_or(src);
            for rest in code.split("\"meshlet.dev/").skip(1) {
                let key = rest.split('"').next().unwrap_or("");
                seen += 1;
                assert!(
                    POD_KEYS.contains(&key) || KEYS.iter().any(|k| k.0 == key),
                    "meshlet.dev/{key} is read but is neither in POD_KEYS nor a policy key"
                );
            }
        }
        assert!(seen > 10, "{seen}");
    }

    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_documentation() {
        let p = Policy::default();
        assert_eq!(p.timeout, Timeout(None));
        assert_eq!(p.connect_timeout.0, Duration::from_secs(1));
        assert_eq!(p.max_retries, 2);
        assert_eq!(p.retry_budget, Ratio(0.2));
        assert_eq!(p.retry_budget_min, 10);
        assert_eq!(p.breaker, Mode::Consecutive);
        assert_eq!(p.breaker_failures, 7);
        assert_eq!(p.breaker_max_ejected, Ratio(0.5));
        assert!(!p.dedup);
        assert_eq!(p.dedup_max_body, ByteSize(1 << 20));
    }

    #[test]
    fn annotations_set_keys_and_report_bad_ones() {
        let (spec, errors) = PolicySpec::from_annotations(&ann(&[
            ("meshlet.dev/timeout", "2s"),
            ("meshlet.dev/dedup", "true"),
            ("meshlet.dev/max-retries", "many"),
            ("meshlet.dev/retry-budget", "25%"),
            ("meshlet.dev/breaker", "sometimes"),
            ("meshlet.dev/timout", "1s"),
            ("meshlet.dev/inject", "enabled"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
        ]));
        assert_eq!(spec.timeout, Some(Timeout(Some(Duration::from_secs(2)))));
        assert_eq!(spec.dedup, Some(true));
        assert_eq!(spec.retry_budget, Some(Ratio(0.25)));
        assert_eq!(
            spec.max_retries, None,
            "a bad value leaves the key to the layer below"
        );
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "meshlet.dev/breaker",
                "meshlet.dev/max-retries",
                "meshlet.dev/timout"
            ]
        );
        assert!(
            errors[0].to_string().contains("\"sometimes\""),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn layers_overlay_in_order() {
        let file: PolicySpec = serde_yaml::from_str("timeout: 5s\nmax_retries: 3\n").unwrap();
        let (svc, _) = PolicySpec::from_annotations(&ann(&[("meshlet.dev/timeout", "1s")]));
        let p = file.overlay(&svc).resolve();
        assert_eq!(p.timeout, Timeout(Some(Duration::from_secs(1))));
        assert_eq!(p.max_retries, 3);
        assert_eq!(p.breaker_failures, 7);
    }

    #[test]
    fn yaml_names_are_snake_case_and_checked() {
        let spec: PolicySpec = serde_yaml::from_str(
            "timeout: off\nbreaker: success-rate\nretry_on: \"5xx,connect-failure\"\ndedup_max_body: 64KiB\nbreaker_max_ejected: 30%\n",
        )
        .unwrap();
        let p = spec.resolve();
        assert_eq!(p.timeout, Timeout(None));
        assert_eq!(p.breaker, Mode::SuccessRate);
        assert_eq!(p.dedup_max_body, ByteSize(65536));
        assert_eq!(p.breaker_max_ejected, Ratio(0.3));
        let e = serde_yaml::from_str::<PolicySpec>("retry_budget: 150%\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"150%\" is not a share"), "{e}");
        let e = serde_yaml::from_str::<PolicySpec>("bogus: 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        // Every annotation is the kebab-case twin of its YAML key.
        for (annotation, yaml, _) in KEYS {
            assert_eq!(annotation.replace('-', "_"), *yaml);
        }
    }

    #[test]
    fn value_types() {
        assert_eq!("1MiB".parse::<ByteSize>().unwrap(), ByteSize(1 << 20));
        assert!("1 GiB".parse::<ByteSize>().is_err());
        assert_eq!("0.5".parse::<Ratio>().unwrap(), Ratio(0.5));
        assert_eq!(
            "get, head".parse::<Methods>().unwrap().0,
            vec![http::Method::GET, http::Method::HEAD]
        );
        assert!("x-tenant, bad header".parse::<HeaderNames>().is_err());
        assert_eq!("0".parse::<Timeout>().unwrap(), Timeout(None));
        assert_eq!("off".parse::<Timeout>().unwrap(), Timeout(None));
    }

    /// Every policy value that parses but is out of its key's range: refused the same way as
    /// an annotation (reported, the key left to the layer below) and in the config file (exit 2
    /// with the key path). (annotation, value, message).
    const OUT_OF_RANGE: &[(&str, &str, &str)] = &[
        (
            "timeout",
            "0s",
            "\"0s\" is out of range (allowed: above 0s, up to 1year); write \"off\" for no timeout",
        ),
        (
            "timeout",
            "2y",
            "\"2years\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            "connect-timeout",
            "0s",
            "\"0s\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            "connect-timeout",
            "500000000000years",
            "\"500000000000years\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            "idle-timeout",
            "0ms",
            "\"0s\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            "max-retries",
            "101",
            "101 is out of range (allowed: 0 to 100)",
        ),
        (
            "retry-budget-min",
            "1000001",
            "1000001 is out of range (allowed: 0 to 1000000)",
        ),
        (
            "retry-backoff",
            "2y",
            "\"2years\" is out of range (allowed: 0s to 1year)",
        ),
        (
            "retry-backoff-max",
            "2y",
            "\"2years\" is out of range (allowed: 0s to 1year)",
        ),
        (
            "retry-after-max",
            "2y",
            "\"2years\" is out of range (allowed: 0s to 1year)",
        ),
        (
            "breaker-failures",
            "0",
            "0 is out of range (allowed: 1 to 1000000)",
        ),
        (
            "breaker-backoff",
            "0s",
            "\"0s\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            "breaker-backoff-max",
            "2y",
            "\"2years\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            "breaker-window",
            "0s",
            "\"0s\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            "breaker-min-requests",
            "0",
            "0 is out of range (allowed: 1 to 1000000)",
        ),
        (
            "breaker-latency-factor",
            "-3",
            "-3 is out of range (allowed: 1 to 1000)",
        ),
        (
            "breaker-latency-factor",
            "0.5",
            "0.5 is out of range (allowed: 1 to 1000)",
        ),
        (
            "breaker-latency-factor",
            "1001",
            "1001 is out of range (allowed: 1 to 1000)",
        ),
        (
            "breaker-latency-factor",
            "NaN",
            "NaN is out of range (allowed: 1 to 1000)",
        ),
        (
            "breaker-latency-factor",
            "inf",
            "inf is out of range (allowed: 1 to 1000)",
        ),
        (
            "dedup-max-body",
            "65MiB",
            "\"65MiB\" is out of range (allowed: 0 to 64MiB)",
        ),
        (
            "dedup-timeout",
            "0s",
            "\"0s\" is out of range (allowed: above 0s, up to 1year)",
        ),
        (
            "dedup-max-waiters",
            "0",
            "0 is out of range (allowed: 1 to 1000000)",
        ),
    ];

    #[test]
    fn out_of_range_annotations_are_reported_and_ignored() {
        for (key, value, message) in OUT_OF_RANGE {
            let k = format!("{ANNOTATION_PREFIX}{key}");
            let (spec, errors) = PolicySpec::from_annotations(&ann(&[(&k, value)]));
            assert_eq!(spec, PolicySpec::default(), "{k}={value} must not be set");
            assert_eq!(
                errors,
                vec![AnnotationError {
                    key: k.clone(),
                    value: value.to_string(),
                    error: message.to_string(),
                }]
            );
        }
    }

    #[test]
    fn out_of_range_config_values_are_refused_with_the_same_message() {
        for (key, value, message) in OUT_OF_RANGE {
            let yaml = key.replace('-', "_");
            // YAML's own spelling of NaN and infinity.
            let v = match *value {
                "NaN" => ".nan",
                "inf" => ".inf",
                v => v,
            };
            for (text, path) in [
                (
                    format!("defaults:\n  {yaml}: {v}\n"),
                    format!("defaults.{yaml}"),
                ),
                (
                    format!(
                        "discovery:\n  static:\n    - service: a.b\n      policy:\n        {yaml}: {v}\n"
                    ),
                    format!("discovery.static[0].policy.{yaml}"),
                ),
            ] {
                let e = crate::config::Config::parse("config.yaml", &text)
                    .unwrap_err()
                    .to_string();
                assert_eq!(e, format!("config.yaml: {path}: {message}"), "{text}");
            }
        }
    }

    #[test]
    fn the_limits_of_each_range_are_accepted() {
        let (spec, errors) = PolicySpec::from_annotations(&ann(&[
            ("meshlet.dev/timeout", "1y"),
            ("meshlet.dev/connect-timeout", "1ns"),
            ("meshlet.dev/max-retries", "100"),
            ("meshlet.dev/retry-backoff", "0s"),
            ("meshlet.dev/breaker-latency-factor", "1"),
            ("meshlet.dev/dedup-max-body", "64MiB"),
            ("meshlet.dev/dedup-max-waiters", "1000000"),
        ]));
        assert_eq!(errors, vec![]);
        assert_eq!(
            spec.timeout,
            Some(Timeout(Some(crate::config::MAX_DURATION)))
        );
        assert_eq!(spec.dedup_max_body, Some(ByteSize(64 << 20)));
    }

    /// The README's policy table shows every key's range as `Bound::describe` says it.
    #[test]
    fn the_readme_documents_every_policy_range() {
        let readme = include_str!("../../README.md");
        for (annotation, yaml, bound) in KEYS {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{yaml}` / `{annotation}` |")))
                .unwrap_or_else(|| panic!("README has no policy row for {yaml}"));
            let allowed = row.split(" | ").nth(2).unwrap_or_default();
            if *bound != Bound::Any {
                assert!(
                    allowed.ends_with(&bound.describe()),
                    "README's row for {yaml} should give the range {:?}: {row}",
                    bound.describe()
                );
            }
        }
    }
}
