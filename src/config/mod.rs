//! The config model: a YAML file (serde_yaml), every key optional with a documented default,
//! unknown keys rejected, and every error naming the file, the key path and the value.
//!
//! Parsing happens in two steps: serde (with `serde_path_to_error`, so a bad value is reported
//! at its key path) and then [`Config::validate`] for each key's range ([`Bound`]: values that
//! parse but would crash or misbehave, such as a zero timeout or a duration so long that the
//! clock arithmetic overflows) and the rules that span several keys.

pub mod pod;
pub mod policy;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A config error: always printed as `<file>: <key path>: <what is wrong>`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the config file: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {path}: {message}")]
    Invalid {
        file: String,
        path: String,
        message: String,
    },
}

pub const DEFAULT_ADMIN: &str = "127.0.0.1:7190";

/// The sidecar layout (`meshlet proxy --sidecar`, what the injector runs): the admin and gRPC
/// health ports on the pod's addresses for kubelet (the admin server's mutating endpoint still
/// answers only loopback clients), the redirected outbound and inbound listeners, and
/// Kubernetes discovery.
pub const SIDECAR_LAYOUT: &str = "\
admin:
  listen: 0.0.0.0:7190
  grpc_listen: 0.0.0.0:7191
outbound:
  listen: 127.0.0.1:7140
inbound:
  listen: 0.0.0.0:7143
discovery:
  kubernetes: {}
";
pub const DEFAULT_OUTBOUND: &str = "127.0.0.1:7140";
pub const DEFAULT_INBOUND: &str = "0.0.0.0:7143";

/// Ports whose protocols speak first from the server (FTP, SSH, SMTP, POP3, IMAP, submission,
/// MySQL): protocol detection is skipped for them and the connection is proxied as opaque TCP
/// at once, so the client never waits for a detection timeout.
pub const DEFAULT_SERVER_FIRST_PORTS: &[u16] = &[21, 22, 25, 110, 143, 587, 3306];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The admin server: /live /ready /metrics /shutdown. Always started.
    pub admin: AdminConfig,
    /// The transparent outbound listener; not started when absent.
    pub outbound: Option<OutboundConfig>,
    /// The transparent inbound listener; not started when absent.
    pub inbound: Option<InboundConfig>,
    /// Explicit mode: a local port per destination service.
    pub upstreams: Vec<UpstreamConfig>,
    pub discovery: DiscoveryConfig,
    pub detect: DetectConfig,
    /// Limits and timeouts of the HTTP servers that face clients.
    pub http: HttpConfig,
    pub balance: BalanceConfig,
    /// Limits on HTTP/2 client connections (both listeners).
    pub http2: Http2Config,
    /// The policy every destination starts from (timeouts, retries, breaker, dedup); a static
    /// service's `policy:` or a Kubernetes Service's `meshlet.dev/*` annotations override it.
    pub defaults: crate::config::policy::PolicySpec,
    /// How long in-flight requests and connections may take to finish after a shutdown starts.
    pub shutdown_grace: Dur,
    /// Runtime worker threads; default: the cgroup CPU limit (rounded up), at least 1.
    pub workers: Option<usize>,
    pub log: LogConfig,
    /// Dependency health: which destinations the app depends on and whether `/ready` follows
    /// the critical ones.
    pub health: HealthConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            admin: AdminConfig::default(),
            outbound: None,
            inbound: None,
            upstreams: Vec::new(),
            discovery: DiscoveryConfig::default(),
            detect: DetectConfig::default(),
            http: HttpConfig::default(),
            balance: BalanceConfig::default(),
            http2: Http2Config::default(),
            defaults: crate::config::policy::PolicySpec::default(),
            shutdown_grace: Dur(Duration::from_secs(30)),
            workers: None,
            log: LogConfig::default(),
            health: HealthConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: Addr,
    /// The gRPC health server (grpc.health.v1.Health); not started when absent.
    pub grpc_listen: Option<Addr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Addr(DEFAULT_ADMIN.parse().expect("valid default")),
            grpc_listen: None,
        }
    }
}

/// `health:`: the dependency health model (see `crate::ops::health::model`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Destination services the app depends on (`name.namespace`), watched from the start
    /// (every service the proxy is used for is a dependency as well).
    pub dependencies: Vec<ServiceName>,
    /// Dependencies whose trouble may fail `/ready` (with `ready_requires: critical`). A
    /// critical service is a dependency whether or not it is listed there.
    pub critical: Vec<ServiceName>,
    /// What `/ready` requires of the dependencies.
    pub ready_requires: ReadyRequires,
    /// A dependency's new state takes effect once it has held this long.
    pub hysteresis: Dur,
    /// A critical dependency unhealthy for longer than this stops failing `/ready` (a shared
    /// outage: taking every replica out of service would make it worse).
    pub outage_grace: Dur,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            dependencies: Vec::new(),
            critical: Vec::new(),
            ready_requires: ReadyRequires::None,
            hysteresis: Dur(Duration::from_secs(5)),
            outage_grace: Dur(Duration::from_secs(30)),
        }
    }
}

impl HealthConfig {
    /// Adds the dependencies named in the environment (`MESHLET_DEPENDENCIES`,
    /// `MESHLET_CRITICAL_DEPENDENCIES`: comma-separated `name.namespace` lists, which the
    /// injector writes from the pod annotations `meshlet.dev/dependencies` and
    /// `meshlet.dev/critical-dependencies`). Errors name the variable and the value.
    pub fn add_from_env(
        &mut self,
        dependencies: Option<&str>,
        critical: Option<&str>,
    ) -> Result<(), String> {
        fn list(var: &str, v: Option<&str>) -> Result<Vec<ServiceName>, String> {
            v.unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| ServiceName::parse(s).map_err(|e| format!("{var}: {e}")))
                .collect()
        }
        for d in list("MESHLET_DEPENDENCIES", dependencies)? {
            if !self.dependencies.contains(&d) {
                self.dependencies.push(d);
            }
        }
        for d in list("MESHLET_CRITICAL_DEPENDENCIES", critical)? {
            if !self.critical.contains(&d) {
                self.critical.push(d);
            }
        }
        Ok(())
    }

    /// Every dependency named up front: `dependencies` and `critical`, each once.
    pub fn declared(&self) -> Vec<ServiceName> {
        let mut all: Vec<ServiceName> = self.dependencies.clone();
        for c in &self.critical {
            if !all.contains(c) {
                all.push(c.clone());
            }
        }
        all
    }
}

/// `health.ready_requires`: whether `/ready` follows the critical dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyRequires {
    /// `/ready` never depends on dependencies (they are reported only).
    None,
    /// `/ready` fails while a critical dependency is unhealthy (within `outage_grace`).
    Critical,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    pub listen: Addr,
    /// Client connections open at once on this listener; more are closed at once (and
    /// counted). Default: derived from the memory limit (see [`crate::limits::default_max_connections`]).
    pub max_connections: Option<MaxConnections>,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            listen: Addr(DEFAULT_OUTBOUND.parse().expect("valid default")),
            max_connections: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundConfig {
    pub listen: Addr,
    /// Where inbound traffic is delivered: by default the connection's original destination
    /// (the pod's own address and the port the caller asked for), so that ports the app binds
    /// to loopback stay private; `loopback`, or a fixed IP address, with the original port.
    pub app_host: AppHost,
    /// Requests to the local app in flight at once; more are refused at once (503, or
    /// RESOURCE_EXHAUSTED for gRPC). Default: no limit.
    pub concurrency_limit: Option<u32>,
    /// Requests per second to the local app (a token bucket); more are refused at once.
    /// Default: no limit.
    pub rate_limit: Option<f64>,
    /// The token bucket's burst (default: one second's worth of `rate_limit`).
    pub rate_limit_burst: Option<u32>,
    /// Client connections open at once on this listener; more are closed at once (and
    /// counted). Default: derived from the memory limit.
    pub max_connections: Option<MaxConnections>,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            listen: Addr(DEFAULT_INBOUND.parse().expect("valid default")),
            app_host: AppHost::OriginalDst,
            concurrency_limit: None,
            rate_limit: None,
            rate_limit_burst: None,
            max_connections: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub listen: Addr,
    /// `name.namespace`, or `name.namespace:port` (a Service port) with Kubernetes discovery.
    pub service: ServiceRef,
    /// Client connections open at once on this listener; more are closed at once (and
    /// counted). Default: derived from the memory limit.
    #[serde(default)]
    pub max_connections: Option<MaxConnections>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Services with a fixed endpoint list (the embedded default, no cluster needed).
    #[serde(rename = "static")]
    pub static_services: Vec<StaticService>,
    /// Discovery through the Kubernetes API. Enabled when present, and by default when running
    /// in a cluster (`KUBERNETES_SERVICE_HOST` set) with no static services configured.
    pub kubernetes: Option<KubernetesConfig>,
    /// How long a request to a service seen for the first time waits for its endpoints.
    pub sync_timeout: Dur,
    /// A destination service not used for this long (no connection asked for it, none open)
    /// is dropped with its discovery watch.
    pub evict_after: Dur,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// A kubeconfig file; default: `KUBECONFIG`, `~/.kube/config`, else the in-cluster
    /// service account.
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            static_services: Vec::new(),
            kubernetes: None,
            sync_timeout: Dur(Duration::from_secs(5)),
            evict_after: Dur(Duration::from_secs(600)),
        }
    }
}

impl DiscoveryConfig {
    /// The Kubernetes discovery settings, if it is enabled (explicitly or by running in a
    /// cluster without static services).
    pub fn kubernetes_enabled(&self) -> Option<KubernetesConfig> {
        self.kubernetes.clone().or_else(|| {
            (self.static_services.is_empty()
                && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
            .then(KubernetesConfig::default)
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticService {
    pub service: ServiceName,
    /// Virtual addresses (a ClusterIP:port) that mean this service to the outbound listener.
    #[serde(default)]
    pub addresses: Vec<Addr>,
    #[serde(default)]
    pub endpoints: Vec<Addr>,
    /// This service's policy keys, over `defaults`.
    #[serde(default)]
    pub policy: crate::config::policy::PolicySpec,
    /// The protocol the service speaks (`http1`, `http2`, `opaque`): detection is skipped.
    /// Absent: detected on each connection.
    #[serde(default)]
    pub protocol: Option<crate::discovery::DeclaredProtocol>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Give up detecting the protocol after this long without a decision and proxy opaque TCP.
    pub timeout: Dur,
    /// Destination ports whose server speaks first: no detection, opaque TCP at once.
    pub server_first_ports: Vec<u16>,
    /// Destination ports (and ranges) proxied as opaque TCP without detection, outbound and
    /// inbound; the pod's `meshlet.dev/opaque-ports` (`MESHLET_OPAQUE_PORTS`) adds to it.
    pub opaque_ports: crate::discovery::PortSet,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            timeout: Dur(Duration::from_millis(300)),
            server_first_ports: DEFAULT_SERVER_FIRST_PORTS.to_vec(),
            opaque_ports: crate::discovery::PortSet::default(),
        }
    }
}

/// `http:`: what a client connection may cost before meshlet gives up on it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// The largest request head: HTTP/1 request line and header fields (bytes as sent), or an
    /// HTTP/2 header list (as SETTINGS_MAX_HEADER_LIST_SIZE counts it: each field's name and
    /// value plus 32). Larger heads are answered 431.
    pub max_header_bytes: u32,
    /// A request head must arrive within this, from its first byte (else 408 and close).
    pub header_timeout: Dur,
    /// A client connection with no request in flight is closed after this long (HTTP/1.1:
    /// between keep-alive requests; HTTP/2: with no open stream, after a GOAWAY).
    pub idle_timeout: Dur,
    /// A request with no byte moving in either direction for this long is ended (504 before
    /// the response head; the stream is cut after it). Also ends opaque TCP and upgraded
    /// connections idle for this long, and silent connections that never spoke.
    pub stream_idle_timeout: Dur,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_header_bytes: 64 * 1024,
            header_timeout: Dur(Duration::from_secs(10)),
            idle_timeout: Dur(Duration::from_secs(300)),
            stream_idle_timeout: Dur(Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// The latency assumed for an endpoint before it has answered anything.
    pub default_rtt: Dur,
    /// How fast the peak-EWMA latency estimate forgets a peak (the decay time constant).
    pub decay: Dur,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            default_rtt: Dur(Duration::from_millis(30)),
            decay: Dur(Duration::from_secs(10)),
        }
    }
}

/// `http2:`: limits on HTTP/2 client connections, against stream floods (see
/// `proxy::h2_guard`). A connection that breaks one is closed with GOAWAY ENHANCE_YOUR_CALM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    /// SETTINGS_MAX_CONCURRENT_STREAMS announced to clients (hyper's default).
    pub max_concurrent_streams: u32,
    /// Streams the client may have reset before the server accepted them, at once (h2's
    /// default): back-to-back rapid reset.
    pub max_pending_accept_reset_streams: usize,
    /// Streams h2 may reset for the client's protocol errors, over the connection's life
    /// (hyper's default).
    pub max_local_error_reset_streams: usize,
    /// Premature-reset rule: once a connection has ended this many streams, more than half of
    /// them reset by the client within `premature_reset_lifetime` closes it. 0 turns it off.
    pub premature_reset_min_streams: u32,
    /// A stream the client resets within this long of its start is premature.
    pub premature_reset_lifetime: Dur,
}

impl Http2Config {
    fn validate(&self) -> Result<(), (String, String)> {
        HTTP2_MAX_CONCURRENT_STREAMS.check(&self.max_concurrent_streams)?;
        HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS.check(&self.max_pending_accept_reset_streams)?;
        HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS.check(&self.max_local_error_reset_streams)?;
        HTTP2_PREMATURE_RESET_MIN_STREAMS.check(&self.premature_reset_min_streams)?;
        HTTP2_PREMATURE_RESET_LIFETIME.check(&self.premature_reset_lifetime)
    }
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_concurrent_streams: 200,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            premature_reset_min_streams: 100,
            premature_reset_lifetime: Dur(Duration::from_secs(1)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `RUST_LOG`-style filter; the `RUST_LOG` environment variable overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

// ===== allowed ranges =====

/// The longest duration any key takes: one year (`1y`, 365.25 days as humantime counts it).
/// Far beyond any useful timeout, and well inside what `Instant + duration` and tokio's timer
/// (about 2.2 years before it clamps) handle; a larger value would have no use but could
/// overflow the clock arithmetic on the first connection.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// The most runtime worker threads (`workers`): more than any machine this runs on has cores,
/// and few enough for the thread and memory limits of a container to allow.
pub const MAX_WORKERS: u64 = 1024;

/// The values one key allows. Each key's bound is defined once (the policy table, or the
/// constants below for the other config keys) and used by the config file's validation and by
/// the annotation parser alike, and its description is what the README's tables show.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    /// Any value that parses (the type itself says what is allowed).
    Any,
    /// A duration up to `max`; `positive`: zero is not allowed.
    Duration { positive: bool, max: Duration },
    /// A whole number from `min` to `max`.
    Count { min: u64, max: u64 },
    /// A number from `min` (excluded when `above`) to `max`, never NaN or infinite.
    Number { min: f64, above: bool, max: f64 },
    /// A size in bytes up to `max`.
    Bytes { max: u64 },
}

/// Durations from 0 to [`MAX_DURATION`].
pub const ANY_DURATION: Bound = Bound::Duration {
    positive: false,
    max: MAX_DURATION,
};
/// Durations above 0, up to [`MAX_DURATION`].
pub const POSITIVE_DURATION: Bound = Bound::Duration {
    positive: true,
    max: MAX_DURATION,
};

/// A config key with a range.
#[derive(Debug, Clone, Copy)]
pub struct Ranged {
    pub key: &'static str,
    pub bound: Bound,
}

impl Ranged {
    /// Checks a value; the error is `(key path, message)`.
    pub fn check(&self, value: &impl InBounds) -> Result<(), (String, String)> {
        value
            .in_bounds(&self.bound)
            .map_err(|m| (self.key.to_string(), m))
    }
}

const fn ranged(key: &'static str, bound: Bound) -> Ranged {
    Ranged { key, bound }
}

pub const SHUTDOWN_GRACE: Ranged = ranged("shutdown_grace", ANY_DURATION);
pub const WORKERS: Ranged = ranged(
    "workers",
    Bound::Count {
        min: 1,
        max: MAX_WORKERS,
    },
);
pub const SYNC_TIMEOUT: Ranged = ranged("discovery.sync_timeout", ANY_DURATION);
pub const EVICT_AFTER: Ranged = ranged("discovery.evict_after", POSITIVE_DURATION);
pub const DETECT_TIMEOUT: Ranged = ranged("detect.timeout", POSITIVE_DURATION);
pub const HTTP_MAX_HEADER_BYTES: Ranged = ranged(
    "http.max_header_bytes",
    Bound::Count {
        min: 1024,
        max: 16 * 1024 * 1024,
    },
);
pub const HTTP_HEADER_TIMEOUT: Ranged = ranged("http.header_timeout", POSITIVE_DURATION);
pub const HTTP_IDLE_TIMEOUT: Ranged = ranged("http.idle_timeout", POSITIVE_DURATION);
pub const HTTP_STREAM_IDLE_TIMEOUT: Ranged = ranged("http.stream_idle_timeout", POSITIVE_DURATION);
pub const DEFAULT_RTT: Ranged = ranged("balance.default_rtt", ANY_DURATION);
pub const DECAY: Ranged = ranged("balance.decay", POSITIVE_DURATION);
pub const HYSTERESIS: Ranged = ranged("health.hysteresis", ANY_DURATION);
pub const OUTAGE_GRACE: Ranged = ranged("health.outage_grace", POSITIVE_DURATION);
/// Also `meshlet.dev/concurrency-limit`.
pub const CONCURRENCY_LIMIT: Ranged = ranged(
    "inbound.concurrency_limit",
    Bound::Count {
        min: 1,
        max: 1_000_000,
    },
);
/// Requests per second; also `meshlet.dev/rate-limit`.
pub const RATE_LIMIT: Ranged = ranged(
    "inbound.rate_limit",
    Bound::Number {
        min: 0.0,
        above: true,
        max: 1e9,
    },
);
/// Also `meshlet.dev/rate-limit-burst`.
pub const RATE_LIMIT_BURST: Ranged = ranged(
    "inbound.rate_limit_burst",
    Bound::Count {
        min: 1,
        max: 1_000_000_000,
    },
);

pub const HTTP2_MAX_CONCURRENT_STREAMS: Ranged = ranged(
    "http2.max_concurrent_streams",
    Bound::Count {
        min: 1,
        max: 1_000_000,
    },
);
pub const HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: Ranged = ranged(
    "http2.max_pending_accept_reset_streams",
    Bound::Count {
        min: 0,
        max: 1_000_000,
    },
);
pub const HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: Ranged = ranged(
    "http2.max_local_error_reset_streams",
    Bound::Count {
        min: 0,
        max: 1_000_000,
    },
);
pub const HTTP2_PREMATURE_RESET_MIN_STREAMS: Ranged = ranged(
    "http2.premature_reset_min_streams",
    Bound::Count {
        min: 0,
        max: 1_000_000,
    },
);
pub const HTTP2_PREMATURE_RESET_LIFETIME: Ranged =
    ranged("http2.premature_reset_lifetime", ANY_DURATION);

/// Every config key with a range besides the policy keys (`crate::config::policy::KEYS`) and the
/// addresses and ports (checked in [`Config::validate`]).
pub const RANGED: &[Ranged] = &[
    SHUTDOWN_GRACE,
    WORKERS,
    SYNC_TIMEOUT,
    EVICT_AFTER,
    DETECT_TIMEOUT,
    HTTP_MAX_HEADER_BYTES,
    HTTP_HEADER_TIMEOUT,
    HTTP_IDLE_TIMEOUT,
    HTTP_STREAM_IDLE_TIMEOUT,
    HTTP2_MAX_CONCURRENT_STREAMS,
    HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS,
    HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS,
    HTTP2_PREMATURE_RESET_MIN_STREAMS,
    HTTP2_PREMATURE_RESET_LIFETIME,
    DEFAULT_RTT,
    DECAY,
    HYSTERESIS,
    OUTAGE_GRACE,
    CONCURRENCY_LIMIT,
    RATE_LIMIT,
    RATE_LIMIT_BURST,
];

impl Bound {
    /// The allowed range in words, as error messages and the README say it.
    pub fn describe(&self) -> String {
        let dur = |d: Duration| humantime::format_duration(d).to_string();
        match *self {
            Bound::Any => String::new(),
            Bound::Duration {
                positive: true,
                max,
            } => format!("above 0s, up to {}", dur(max)),
            Bound::Duration { max, .. } => format!("0s to {}", dur(max)),
            Bound::Count { min, max } => format!("{min} to {max}"),
            Bound::Number {
                min,
                above: true,
                max,
            } => format!("above {min}, up to {max}"),
            Bound::Number { min, max, .. } => format!("{min} to {max}"),
            Bound::Bytes { max } => format!("0 to {}", bytes(max)),
        }
    }

    fn refuse(&self, value: impl fmt::Display) -> String {
        format!("{value} is out of range (allowed: {})", self.describe())
    }

    /// Checks a duration.
    pub fn duration(&self, d: Duration) -> Result<(), String> {
        match *self {
            Bound::Duration { positive, max } if (positive && d.is_zero()) || d > max => {
                Err(self.refuse(format_args!("\"{}\"", humantime::format_duration(d))))
            }
            _ => Ok(()),
        }
    }

    /// Checks a whole number.
    pub fn count(&self, n: u64) -> Result<(), String> {
        match *self {
            Bound::Count { min, max } if n < min || n > max => Err(self.refuse(n)),
            _ => Ok(()),
        }
    }

    /// Checks a number (NaN and the infinities are never allowed).
    pub fn number(&self, v: f64) -> Result<(), String> {
        match *self {
            Bound::Number { min, above, max } => {
                let low_ok = if above { v > min } else { v >= min };
                if low_ok && v <= max {
                    Ok(())
                } else {
                    Err(self.refuse(v))
                }
            }
            _ if v.is_finite() => Ok(()),
            _ => Err(format!("{v} is not a finite number")),
        }
    }

    /// Checks a size in bytes.
    pub fn bytes(&self, n: u64) -> Result<(), String> {
        match *self {
            Bound::Bytes { max } if n > max => Err(self.refuse(format_args!("\"{}\"", bytes(n)))),
            _ => Ok(()),
        }
    }
}

/// A value checked against its key's [`Bound`]. Types whose parser already allows only valid
/// values (enums, lists, shares) keep the default: anything is in bounds.
pub trait InBounds {
    fn in_bounds(&self, _bound: &Bound) -> Result<(), String> {
        Ok(())
    }
}

impl InBounds for Dur {
    fn in_bounds(&self, bound: &Bound) -> Result<(), String> {
        bound.duration(self.0)
    }
}

impl InBounds for u32 {
    fn in_bounds(&self, bound: &Bound) -> Result<(), String> {
        bound.count(u64::from(*self))
    }
}

impl InBounds for usize {
    fn in_bounds(&self, bound: &Bound) -> Result<(), String> {
        bound.count(u64::try_from(*self).unwrap_or(u64::MAX))
    }
}

impl InBounds for f64 {
    fn in_bounds(&self, bound: &Bound) -> Result<(), String> {
        bound.number(*self)
    }
}

impl InBounds for bool {}

/// A byte count the way it is written in the config: `64MiB`, `1KiB`, or plain bytes.
fn bytes(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        n.to_string()
    }
}

// ===== value types with errors that quote the value =====

/// A socket address written as a string, e.g. `127.0.0.1:7140` or `[::1]:80`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Addr(pub SocketAddr);

impl fmt::Debug for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        s.parse()
            .map(Addr)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a socket address")))
    }
}

/// `inbound.app_host`: where the inbound listener delivers a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppHost {
    /// `original_dst` (the default): the connection's original destination, address and
    /// port: the pod's own address, as kubelet and an unmeshed caller reach the app. A port the
    /// app binds to loopback only stays unreachable from other pods.
    OriginalDst,
    /// `loopback`: 127.0.0.1 (`::1` for an IPv6 connection) at the original port, meshlet's
    /// behaviour before the inbound address change: every port the app binds to loopback is
    /// reachable from other pods through the inbound listener. The opt-out for apps that
    /// listen on loopback only (`meshlet.dev/inbound-to-loopback: "true"`).
    Loopback,
    /// A fixed address, at the original port.
    Ip(IpAddr),
}

impl AppHost {
    /// Where a connection whose original destination is `dst` is delivered.
    pub fn deliver_to(self, dst: SocketAddr) -> SocketAddr {
        match self {
            AppHost::OriginalDst => dst,
            AppHost::Loopback if dst.is_ipv6() => {
                SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), dst.port())
            }
            AppHost::Loopback => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), dst.port()),
            AppHost::Ip(ip) => SocketAddr::new(ip, dst.port()),
        }
    }
}

impl fmt::Display for AppHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppHost::OriginalDst => f.write_str("original_dst"),
            AppHost::Loopback => f.write_str("loopback"),
            AppHost::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl<'de> Deserialize<'de> for AppHost {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        match s.trim() {
            "original_dst" => Ok(AppHost::OriginalDst),
            "loopback" => Ok(AppHost::Loopback),
            t => t.parse().map(AppHost::Ip).map_err(|_| {
                serde::de::Error::custom(format!(
                    "{s:?} is not an IP address, `original_dst` (the default) or `loopback`"
                ))
            }),
        }
    }
}

/// A listener's connection cap (`max_connections`): a positive count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxConnections(pub u32);

impl<'de> Deserialize<'de> for MaxConnections {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        match s.trim().parse::<u32>() {
            Ok(0) => Err(serde::de::Error::custom(
                "0 would refuse every connection; leave the key out for the default \
                 (derived from the memory limit)",
            )),
            Ok(n) => Ok(MaxConnections(n)),
            Err(_) => Err(serde::de::Error::custom(format!(
                "{s:?} is not a number of connections (1 to {})",
                u32::MAX
            ))),
        }
    }
}

/// A duration written like `300ms`, `30s`, `1m`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}); write it like \"300ms\", \"30s\" or \"1m\""
            ))
        })
    }
}

/// A Kubernetes service named `name.namespace`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    pub name: String,
    pub namespace: String,
}

impl ServiceName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some((name, namespace)) = s.split_once('.') else {
            return Err(format!(
                "{s:?} is not a service name: write it as name.namespace"
            ));
        };
        for part in [name, namespace] {
            if !is_dns_label(part) {
                return Err(format!(
                    "{s:?} is not a service name: {part:?} is not a DNS label \
                     (lower-case letters, digits and '-', at most 63, starting with a letter)"
                ));
            }
        }
        Ok(ServiceName {
            name: name.to_string(),
            namespace: namespace.to_string(),
        })
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.as_bytes()[0].is_ascii_lowercase()
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// A destination service, optionally with a service port: `name.namespace[:port]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub name: ServiceName,
    pub port: Option<u16>,
}

impl ServiceRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (name, port) = match s.rsplit_once(':') {
            Some((n, p)) => {
                let port = p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    format!("{s:?} is not a service: {p:?} is not a port (1-65535)")
                })?;
                (n, Some(port))
            }
            None => (s, None),
        };
        Ok(ServiceRef {
            name: ServiceName::parse(name)?,
            port,
        })
    }
}

impl From<ServiceName> for ServiceRef {
    fn from(name: ServiceName) -> Self {
        ServiceRef { name, port: None }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

impl fmt::Debug for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl<'de> Deserialize<'de> for ServiceRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        ServiceRef::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        ServiceName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Reads a YAML scalar as a string, so that `port: 80` and `port: "80"` are read alike and an
/// error can quote what was written.
pub(crate) fn scalar_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

// ===== loading and validation =====

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Config::parse(&file, &text)
    }

    /// Parses and validates config text; `file` is only used in error messages.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let message = strip_yaml_path(&path, &e.into_inner().to_string());
                ConfigError::Invalid {
                    file: file.to_string(),
                    // "." for the document itself; "" for a key that is empty (`? ` alone).
                    path: if path == "." || path.is_empty() {
                        "(top level)".to_string()
                    } else {
                        path
                    },
                    message,
                }
            })?
        };
        config
            .validate()
            .map_err(|(path, message)| ConfigError::Invalid {
                file: file.to_string(),
                path,
                message,
            })?;
        Ok(config)
    }

    /// The rules that span several keys. Returns (key path, message) of the first violation.
    fn validate(&self) -> Result<(), (String, String)> {
        if let Some(w) = &self.workers {
            WORKERS.check(w)?;
        }
        SHUTDOWN_GRACE.check(&self.shutdown_grace)?;
        SYNC_TIMEOUT.check(&self.discovery.sync_timeout)?;
        EVICT_AFTER.check(&self.discovery.evict_after)?;
        DETECT_TIMEOUT.check(&self.detect.timeout)?;
        HTTP_MAX_HEADER_BYTES.check(&self.http.max_header_bytes)?;
        HTTP_HEADER_TIMEOUT.check(&self.http.header_timeout)?;
        HTTP_IDLE_TIMEOUT.check(&self.http.idle_timeout)?;
        HTTP_STREAM_IDLE_TIMEOUT.check(&self.http.stream_idle_timeout)?;
        self.http2.validate()?;
        for (i, p) in self.detect.server_first_ports.iter().enumerate() {
            if *p == 0 {
                return Err((
                    format!("detect.server_first_ports[{i}]"),
                    "0 is not a port (allowed: 1 to 65535)".into(),
                ));
            }
        }
        DEFAULT_RTT.check(&self.balance.default_rtt)?;
        DECAY.check(&self.balance.decay)?;
        HYSTERESIS.check(&self.health.hysteresis)?;
        OUTAGE_GRACE
            .check(&self.health.outage_grace)
            .map_err(|(k, m)| {
                if self.health.outage_grace.0.is_zero() {
                    (k, format!("{m}; for readiness that never follows dependencies, use ready_requires: none"))
                } else {
                    (k, m)
                }
            })?;
        if let Some(i) = &self.inbound {
            if let Some(n) = &i.concurrency_limit {
                CONCURRENCY_LIMIT.check(n)?;
            }
            if let Some(r) = &i.rate_limit {
                RATE_LIMIT.check(r)?;
            }
            if let Some(b) = &i.rate_limit_burst {
                RATE_LIMIT_BURST.check(b)?;
            }
        }
        self.defaults
            .validate()
            .map_err(|(key, m)| (format!("defaults.{key}"), m))?;
        for (i, s) in self.discovery.static_services.iter().enumerate() {
            s.policy
                .validate()
                .map_err(|(key, m)| (format!("discovery.static[{i}].policy.{key}"), m))?;
            let mut seen = BTreeSet::new();
            for (j, e) in s.endpoints.iter().enumerate() {
                let path = || format!("discovery.static[{i}].endpoints[{j}]");
                connectable(e.0).map_err(|m| (path(), m))?;
                if !seen.insert(e.0) {
                    return Err((path(), format!("\"{}\" is listed twice", e.0)));
                }
            }
            for (j, a) in s.addresses.iter().enumerate() {
                if a.0.port() == 0 {
                    return Err((
                        format!("discovery.static[{i}].addresses[{j}]"),
                        format!(
                            "\"{}\": port 0 is not a port a client connects to (allowed: 1 to 65535)",
                            a.0
                        ),
                    ));
                }
            }
        }

        for (key, list) in [
            ("health.dependencies", &self.health.dependencies),
            ("health.critical", &self.health.critical),
        ] {
            let mut seen = BTreeSet::new();
            for (i, d) in list.iter().enumerate() {
                if !seen.insert(d) {
                    return Err((format!("{key}[{i}]"), format!("\"{d}\" is listed twice")));
                }
            }
        }

        // tracing-subscriber's directive parser panics on some non-ASCII input (found by
        // fuzz/config); filters name Rust targets and levels, which are ASCII.
        if !self.log.level.is_ascii() {
            return Err((
                "log.level".into(),
                format!(
                    "{:?} is not a log filter (only ASCII characters); try \"info\" or \"meshlet=debug,info\"",
                    self.log.level
                ),
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err((
                "log.level".into(),
                format!(
                    "{:?} is not a log filter ({e}); try \"info\" or \"meshlet=debug,info\"",
                    self.log.level
                ),
            ));
        }

        // Every listener's address is used once, and no two overlap: `0.0.0.0:p` takes every
        // IPv4 address's port p, and `[::]:p` (dual-stack) every address's of both families.
        let mut listeners: Vec<(SocketAddr, String)> = Vec::new();
        let mut claim = |addr: SocketAddr, path: String| -> Result<(), (String, String)> {
            if addr.port() == 0 {
                return Ok(());
            }
            if let Some((other_addr, other)) = listeners.iter().find(|(a, _)| overlaps(*a, addr)) {
                let message = if *other_addr == addr {
                    format!("\"{addr}\" is already used by {other}")
                } else {
                    format!(
                        "\"{addr}\" overlaps \"{other_addr}\" of {other} (0.0.0.0 takes every IPv4 \
                         address, [::] every IPv4 and IPv6 address); use another port"
                    )
                };
                return Err((path, message));
            }
            listeners.push((addr, path));
            Ok(())
        };
        claim(self.admin.listen.0, "admin.listen".into())?;
        if let Some(g) = &self.admin.grpc_listen {
            claim(g.0, "admin.grpc_listen".into())?;
        }
        if let Some(o) = &self.outbound {
            claim(o.listen.0, "outbound.listen".into())?;
        }
        if let Some(i) = &self.inbound {
            claim(i.listen.0, "inbound.listen".into())?;
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            claim(u.listen.0, format!("upstreams[{i}].listen"))?;
        }

        // Static services: unique names, unique virtual addresses.
        let mut names = BTreeSet::new();
        let mut vips: HashMap<SocketAddr, String> = HashMap::new();
        for (i, s) in self.discovery.static_services.iter().enumerate() {
            if !names.insert(s.service.clone()) {
                return Err((
                    format!("discovery.static[{i}].service"),
                    format!("\"{}\" is listed twice", s.service),
                ));
            }
            for (j, a) in s.addresses.iter().enumerate() {
                if let Some(other) = vips.insert(a.0, s.service.to_string()) {
                    return Err((
                        format!("discovery.static[{i}].addresses[{j}]"),
                        format!("\"{}\" already means service {other}", a.0),
                    ));
                }
            }
        }

        // Explicit upstreams name a known service (with Kubernetes discovery, any service).
        let kubernetes = self.discovery.kubernetes.is_some();
        for (i, u) in self.upstreams.iter().enumerate() {
            if !kubernetes && !names.contains(&u.service.name) {
                let known: Vec<String> = names.iter().map(|n| n.to_string()).collect();
                return Err((
                    format!("upstreams[{i}].service"),
                    format!(
                        "\"{}\" is not a known service (discovery.static has: {}; or enable discovery.kubernetes)",
                        u.service,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Worker threads to run: the configured number, else the cgroup CPU limit, else the
    /// machine's parallelism; at least 1, at most [`MAX_WORKERS`].
    pub fn worker_threads(&self) -> usize {
        self.workers
            .or_else(cgroup_cpu_limit)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .clamp(1, MAX_WORKERS as usize)
    }
}

/// Whether two listeners' addresses take a port in common (binding both would fail). `[::]`
/// is bound dual-stack (see `crate::socket::bind`), so it takes the IPv4 addresses as well.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    fn covers(x: IpAddr, y: IpAddr) -> bool {
        x.is_unspecified() && (x.is_ipv6() || y.is_ipv4())
    }
    a.port() == b.port() && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// An endpoint must be an address a connection can be made to.
fn connectable(a: SocketAddr) -> Result<(), String> {
    let ip = a.ip();
    let why = if a.port() == 0 {
        "port 0 is not a port to connect to (allowed: 1 to 65535)"
    } else if ip.is_unspecified() {
        "an unspecified address is not an address to connect to; write 127.0.0.1 or ::1 for this host"
    } else if ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        "a multicast or broadcast address cannot take a TCP connection"
    } else {
        return Ok(());
    };
    Err(format!("\"{a}\": {why}"))
}

/// serde_yaml prefixes its messages with the part of the key path it knows; ours is complete,
/// so that prefix is dropped to say the path once.
fn strip_yaml_path(path: &str, message: &str) -> String {
    match message.split_once(": ") {
        Some((head, rest))
            if !head.contains([' ', '"', '`']) && (head == "." || path.starts_with(head)) =>
        {
            rest.to_string()
        }
        _ => message.to_string(),
    }
}

/// Reads the cgroup v2 CPU quota (`cpu.max`: "<quota> <period>" or "max <period>") and rounds
/// it up to whole CPUs.
fn cgroup_cpu_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/cpu.max").ok()?;
    let mut parts = text.split_whitespace();
    let quota: f64 = parts.next()?.parse().ok()?;
    let period: f64 = parts.next()?.parse().ok()?;
    if period <= 0.0 {
        return None;
    }
    Some(((quota / period).ceil() as usize).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse("config.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn the_sidecar_layout_parses() {
        let c = Config::parse("(sidecar)", SIDECAR_LAYOUT).unwrap();
        assert_eq!(c.admin.listen.0.to_string(), "0.0.0.0:7190");
        assert_eq!(c.outbound.unwrap().listen.0.port(), 7140);
        assert_eq!(c.inbound.unwrap().listen.0.port(), 7143);
        assert!(c.discovery.kubernetes.is_some());
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("c.yaml", "").unwrap();
        assert_eq!(c.admin.listen.0.to_string(), DEFAULT_ADMIN);
        assert!(c.outbound.is_none() && c.inbound.is_none());
        assert_eq!(c.shutdown_grace.0, Duration::from_secs(30));
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(
            "c.yaml",
            r#"
admin:
  listen: 127.0.0.1:7190
outbound:
  listen: 127.0.0.1:7140
inbound:
  listen: 0.0.0.0:7143
  app_host: 127.0.0.1
upstreams:
  - listen: 127.0.0.1:9000
    service: web.default
discovery:
  static:
    - service: web.default
      addresses: ["198.19.0.10:80"]
      endpoints: ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
shutdown_grace: 30s
workers: 2
"#,
        )
        .unwrap();
        assert_eq!(c.discovery.static_services[0].endpoints.len(), 3);
        assert_eq!(c.worker_threads(), 2);
        assert_eq!(c.outbound.unwrap().listen.0.port(), 7140);
    }

    #[test]
    fn inbound_app_host_is_the_original_destination_unless_set() {
        let dst: SocketAddr = "198.18.0.1:8080".parse().unwrap();
        let dst6: SocketAddr = "[2001:2::1]:8080".parse().unwrap();
        let host = |text: &str| {
            Config::parse("c.yaml", text)
                .unwrap()
                .inbound
                .unwrap()
                .app_host
        };
        let default = host("inbound: {}\n");
        assert_eq!(default, AppHost::OriginalDst);
        assert_eq!(default.deliver_to(dst), dst);
        assert_eq!(
            host("inbound:\n  app_host: original_dst\n"),
            AppHost::OriginalDst
        );
        let lo = host("inbound:\n  app_host: loopback\n");
        assert_eq!(lo.deliver_to(dst).to_string(), "127.0.0.1:8080");
        assert_eq!(lo.deliver_to(dst6).to_string(), "[::1]:8080");
        let fixed = host("inbound:\n  app_host: 198.18.0.7\n");
        assert_eq!(fixed.deliver_to(dst).to_string(), "198.18.0.7:8080");
        let e = err("inbound:\n  app_host: localhost\n");
        assert!(
            e.starts_with(
                "config.yaml: inbound.app_host: \"localhost\" is not an IP address, \
                 `original_dst` (the default) or `loopback`"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_socket_address_names_key_and_value() {
        let e = err(r#"
discovery:
  static:
    - service: web.default
upstreams:
  - listen: 127.0.0.1:9000
    service: web.default
  - listen: "127.0.0.1:99999"
    service: web.default
"#);
        assert!(
            e.starts_with(
                r#"config.yaml: upstreams[1].listen: "127.0.0.1:99999" is not a socket address"#
            ),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_rejected() {
        let e = err("admin:\n  listne: 127.0.0.1:1\n");
        assert!(
            e.contains("admin") && e.contains("unknown field `listne`"),
            "{e}"
        );
        let e = err("bogus: 1\n");
        assert!(e.contains("unknown field `bogus`"), "{e}");
        // Found by fuzz/ (config): an empty key had an empty key path, "c.yaml: : unknown ...".
        let e = err("?\n");
        assert!(
            e.starts_with("config.yaml: (top level): unknown field ``"),
            "{e}"
        );
    }

    #[test]
    fn bad_duration_service_and_workers() {
        let e = err("shutdown_grace: soon\n");
        assert!(
            e.contains("shutdown_grace: \"soon\" is not a duration"),
            "{e}"
        );
        let e = err("discovery:\n  static:\n    - service: Web\n");
        assert!(
            e.contains("discovery.static[0].service: \"Web\" is not a service name"),
            "{e}"
        );
        let e = err("workers: 0\n");
        assert!(e.contains("workers: 0 is out of range"), "{e}");
        let e = err("workers: many\n");
        assert!(e.contains("workers") && e.contains("many"), "{e}");
    }

    #[test]
    fn health_section() {
        let c = Config::parse(
            "c.yaml",
            "admin:\n  grpc_listen: 127.0.0.1:7191\nhealth:\n  dependencies: [web.default, db.default]\n  critical: [db.default, cache.default]\n  ready_requires: critical\n  hysteresis: 300ms\n  outage_grace: 1s\n",
        )
        .unwrap();
        assert_eq!(c.health.ready_requires, ReadyRequires::Critical);
        assert_eq!(c.health.hysteresis.0, Duration::from_millis(300));
        assert_eq!(c.health.declared().len(), 3);
        assert_eq!(c.admin.grpc_listen.unwrap().0.port(), 7191);
        let d = Config::parse("c.yaml", "").unwrap().health;
        assert_eq!(d.ready_requires, ReadyRequires::None);
        assert_eq!(d.hysteresis.0, Duration::from_secs(5));
        assert_eq!(d.outage_grace.0, Duration::from_secs(30));

        let e = err("health:\n  ready_requires: all\n");
        assert!(
            e.contains("health.ready_requires") && e.contains("all"),
            "{e}"
        );
        let e = err("health:\n  dependencies: [Db]\n");
        assert!(
            e.contains("health.dependencies[0]: \"Db\" is not a service name"),
            "{e}"
        );
        let e = err("health:\n  critical: [a.b, a.b]\n");
        assert!(
            e.contains("health.critical[1]: \"a.b\" is listed twice"),
            "{e}"
        );
        let e = err("health:\n  outage_grace: 0s\n");
        assert!(
            e.contains("health.outage_grace: \"0s\" is out of range"),
            "{e}"
        );
        let e = err("health:\n  hysteresis: later\n");
        assert!(
            e.contains("health.hysteresis: \"later\" is not a duration"),
            "{e}"
        );
        let e = err("health:\n  bogus: 1\n");
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = err("admin:\n  listen: 127.0.0.1:7190\n  grpc_listen: 127.0.0.1:7190\n");
        assert!(
            e.contains("admin.grpc_listen: \"127.0.0.1:7190\" is already used by admin.listen"),
            "{e}"
        );

        let mut h = HealthConfig::default();
        h.add_from_env(Some("db.prod, users.prod,"), Some("db.prod"))
            .unwrap();
        assert_eq!(h.declared().len(), 2);
        let e = h.add_from_env(None, Some("nope")).unwrap_err();
        assert!(
            e.starts_with("MESHLET_CRITICAL_DEPENDENCIES: \"nope\""),
            "{e}"
        );
    }

    #[test]
    fn a_non_ascii_log_filter_is_refused_not_a_panic() {
        let e = err(
            "log:\n  level: \"mMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM\u{9a3cc}x,info\"\n",
        );
        assert!(e.contains("log.level") && e.contains("only ASCII"), "{e}");
    }

    #[test]
    fn cross_key_rules() {
        let e = err("upstreams:\n  - listen: 127.0.0.1:9000\n    service: api.prod\n");
        assert!(
            e.contains("upstreams[0].service: \"api.prod\" is not a known service"),
            "{e}"
        );
        let e = err(
            "admin:\n  listen: 127.0.0.1:9000\nupstreams:\n  - listen: 127.0.0.1:9000\n    service: a.b\ndiscovery:\n  static:\n    - service: a.b\n",
        );
        assert!(
            e.contains("upstreams[0].listen: \"127.0.0.1:9000\" is already used by admin.listen"),
            "{e}"
        );
        let e = err(
            "discovery:\n  static:\n    - service: a.b\n      addresses: [\"198.19.0.1:80\"]\n    - service: c.b\n      addresses: [\"198.19.0.1:80\"]\n",
        );
        assert!(e.contains("discovery.static[1].addresses[0]"), "{e}");
    }

    /// Every value that parses but is refused: (config, the whole error line).
    #[test]
    fn out_of_range_values_are_refused_naming_key_value_and_range() {
        let svc = "discovery:\n  static:\n    - service: a.b\n";
        let cases: Vec<(String, &str)> = vec![
            (
                "workers: 0\n".into(),
                "workers: 0 is out of range (allowed: 1 to 1024)",
            ),
            (
                "workers: 100000\n".into(),
                "workers: 100000 is out of range (allowed: 1 to 1024)",
            ),
            (
                "shutdown_grace: 2y\n".into(),
                "shutdown_grace: \"2years\" is out of range (allowed: 0s to 1year)",
            ),
            (
                "detect:\n  timeout: 0s\n".into(),
                "detect.timeout: \"0s\" is out of range (allowed: above 0s, up to 1year)",
            ),
            (
                // Parses (just under u64 seconds) and used to overflow `Instant + timeout`.
                "detect:\n  timeout: 500000000000years\n".into(),
                "detect.timeout: \"500000000000years\" is out of range (allowed: above 0s, up to 1year)",
            ),
            (
                "detect:\n  server_first_ports: [22, 0]\n".into(),
                "detect.server_first_ports[1]: 0 is not a port (allowed: 1 to 65535)",
            ),
            (
                "discovery:\n  sync_timeout: 2y\n".into(),
                "discovery.sync_timeout: \"2years\" is out of range (allowed: 0s to 1year)",
            ),
            (
                "balance:\n  default_rtt: 2y\n".into(),
                "balance.default_rtt: \"2years\" is out of range (allowed: 0s to 1year)",
            ),
            (
                "balance:\n  decay: 0s\n".into(),
                "balance.decay: \"0s\" is out of range (allowed: above 0s, up to 1year)",
            ),
            (
                "health:\n  hysteresis: 2y\n".into(),
                "health.hysteresis: \"2years\" is out of range (allowed: 0s to 1year)",
            ),
            (
                "health:\n  outage_grace: 0s\n".into(),
                "health.outage_grace: \"0s\" is out of range (allowed: above 0s, up to 1year); \
                 for readiness that never follows dependencies, use ready_requires: none",
            ),
            (
                "inbound:\n  concurrency_limit: 0\n".into(),
                "inbound.concurrency_limit: 0 is out of range (allowed: 1 to 1000000)",
            ),
            (
                "inbound:\n  concurrency_limit: 2000000\n".into(),
                "inbound.concurrency_limit: 2000000 is out of range (allowed: 1 to 1000000)",
            ),
            (
                "inbound:\n  rate_limit: 0\n".into(),
                "inbound.rate_limit: 0 is out of range (allowed: above 0, up to 1000000000)",
            ),
            (
                "inbound:\n  rate_limit: -5\n".into(),
                "inbound.rate_limit: -5 is out of range (allowed: above 0, up to 1000000000)",
            ),
            (
                "inbound:\n  rate_limit: .nan\n".into(),
                "inbound.rate_limit: NaN is out of range (allowed: above 0, up to 1000000000)",
            ),
            (
                "inbound:\n  rate_limit: 2e9\n".into(),
                "inbound.rate_limit: 2000000000 is out of range (allowed: above 0, up to 1000000000)",
            ),
            (
                "inbound:\n  rate_limit: 10\n  rate_limit_burst: 0\n".into(),
                "inbound.rate_limit_burst: 0 is out of range (allowed: 1 to 1000000000)",
            ),
            (
                format!("{svc}      endpoints: [\"127.0.0.1:0\"]\n"),
                "discovery.static[0].endpoints[0]: \"127.0.0.1:0\": port 0 is not a port to connect to (allowed: 1 to 65535)",
            ),
            (
                format!("{svc}      endpoints: [\"127.0.0.1:80\", \"0.0.0.0:80\"]\n"),
                "discovery.static[0].endpoints[1]: \"0.0.0.0:80\": an unspecified address is not an address to connect to; write 127.0.0.1 or ::1 for this host",
            ),
            (
                format!("{svc}      endpoints: [\"224.0.0.1:80\"]\n"),
                "discovery.static[0].endpoints[0]: \"224.0.0.1:80\": a multicast or broadcast address cannot take a TCP connection",
            ),
            (
                format!("{svc}      endpoints: [\"127.0.0.1:80\", \"127.0.0.1:80\"]\n"),
                "discovery.static[0].endpoints[1]: \"127.0.0.1:80\" is listed twice",
            ),
            (
                format!("{svc}      addresses: [\"198.19.0.1:0\"]\n"),
                "discovery.static[0].addresses[0]: \"198.19.0.1:0\": port 0 is not a port a client connects to (allowed: 1 to 65535)",
            ),
            (
                "admin:\n  listen: 0.0.0.0:7190\n  grpc_listen: \"[::]:7190\"\n".into(),
                "admin.grpc_listen: \"[::]:7190\" overlaps \"0.0.0.0:7190\" of admin.listen \
                 (0.0.0.0 takes every IPv4 address, [::] every IPv4 and IPv6 address); use another port",
            ),
            (
                "admin:\n  listen: 127.0.0.1:7190\n  grpc_listen: 0.0.0.0:7190\n".into(),
                "admin.grpc_listen: \"0.0.0.0:7190\" overlaps \"127.0.0.1:7190\" of admin.listen \
                 (0.0.0.0 takes every IPv4 address, [::] every IPv4 and IPv6 address); use another port",
            ),
            (
                "defaults:\n  connect_timeout: 0s\n".into(),
                "defaults.connect_timeout: \"0s\" is out of range (allowed: above 0s, up to 1year)",
            ),
            (
                format!("{svc}      policy:\n        breaker_latency_factor: -2\n"),
                "discovery.static[0].policy.breaker_latency_factor: -2 is out of range (allowed: 1 to 1000)",
            ),
        ];
        for (text, want) in &cases {
            let e = err(text);
            assert_eq!(e, format!("config.yaml: {want}"), "config:\n{text}");
        }
    }

    #[test]
    fn the_largest_values_allowed_are_accepted() {
        let c = Config::parse(
            "c.yaml",
            "workers: 1024\nshutdown_grace: 1y\ndetect:\n  timeout: 1year\n  server_first_ports: [65535]\n\
             discovery:\n  sync_timeout: 1y\nbalance:\n  default_rtt: 1y\n  decay: 1y\n\
             health:\n  hysteresis: 1y\n  outage_grace: 1y\n\
             inbound:\n  concurrency_limit: 1000000\n  rate_limit: 1e9\n  rate_limit_burst: 1000000000\n\
             admin:\n  listen: \"[::]:7190\"\n  grpc_listen: \"[::1]:7191\"\n",
        )
        .unwrap();
        assert_eq!(c.detect.timeout.0, MAX_DURATION);
        assert_eq!(c.worker_threads(), 1024);
        // The smallest, too: zero where zero means something.
        Config::parse(
            "c.yaml",
            "shutdown_grace: 0s\ndiscovery:\n  sync_timeout: 0s\nbalance:\n  default_rtt: 0s\nhealth:\n  hysteresis: 0s\n\
             inbound:\n  concurrency_limit: 1\n  rate_limit: 0.001\n  rate_limit_burst: 1\n",
        )
        .unwrap();
    }

    #[test]
    fn listeners_on_one_port_must_not_overlap() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(a("[::]:80"), a("0.0.0.0:80")));
        assert!(overlaps(a("[::]:80"), a("127.0.0.1:80")));
        assert!(overlaps(a("[::]:80"), a("[::1]:80")));
        assert!(overlaps(a("0.0.0.0:80"), a("10.0.0.1:80")));
        assert!(
            !overlaps(a("0.0.0.0:80"), a("[::1]:80")),
            "0.0.0.0 is IPv4 only"
        );
        assert!(!overlaps(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!overlaps(a("[::]:80"), a("0.0.0.0:81")));
        // Port 0 (an ephemeral port each) never conflicts.
        Config::parse(
            "c.yaml",
            "admin:\n  listen: \"[::]:0\"\n  grpc_listen: 0.0.0.0:0\n",
        )
        .unwrap();
    }

    /// The README's config reference shows every key's range as `Bound::describe` says it.
    #[test]
    fn the_readme_documents_every_range() {
        let readme = include_str!("../../README.md");
        for r in RANGED {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", r.key)))
                .unwrap_or_else(|| panic!("README has no row for {}", r.key));
            assert!(
                row.contains(&format!("| {} |", r.bound.describe())),
                "README's row for {} should give the range {:?}: {row}",
                r.key,
                r.bound.describe()
            );
        }
    }
}
