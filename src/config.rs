//! The config model: a YAML file (serde_yaml), every key optional with a documented default,
//! unknown keys rejected, and every error naming the file, the key path and the value.
//!
//! Parsing happens in two steps: serde (with `serde_path_to_error`, so a bad value is reported
//! at its key path) and then [`Config::validate`] for the rules that span several keys.

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
    pub balance: BalanceConfig,
    /// The policy every destination starts from (timeouts, retries, breaker, dedup); a static
    /// service's `policy:` or a Kubernetes Service's `meshlet.dev/*` annotations override it.
    pub defaults: crate::policy::PolicySpec,
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
            balance: BalanceConfig::default(),
            defaults: crate::policy::PolicySpec::default(),
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

/// `health:`: the dependency health model (see `crate::health::model`).
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
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            listen: Addr(DEFAULT_OUTBOUND.parse().expect("valid default")),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundConfig {
    pub listen: Addr,
    /// Inbound traffic is delivered to `app_host:<original destination port>`.
    pub app_host: Host,
    /// Requests to the local app in flight at once; more are refused at once (503, or
    /// RESOURCE_EXHAUSTED for gRPC). Default: no limit.
    pub concurrency_limit: Option<u32>,
    /// Requests per second to the local app (a token bucket); more are refused at once.
    /// Default: no limit.
    pub rate_limit: Option<f64>,
    /// The token bucket's burst (default: one second's worth of `rate_limit`).
    pub rate_limit_burst: Option<u32>,
}

impl Default for InboundConfig {
    fn default() -> Self {
        InboundConfig {
            listen: Addr(DEFAULT_INBOUND.parse().expect("valid default")),
            app_host: Host(IpAddr::from([127, 0, 0, 1])),
            concurrency_limit: None,
            rate_limit: None,
            rate_limit_burst: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub listen: Addr,
    /// `name.namespace`, or `name.namespace:port` (a Service port) with Kubernetes discovery.
    pub service: ServiceRef,
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
    pub policy: crate::policy::PolicySpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Give up detecting the protocol after this long without a decision and proxy opaque TCP.
    pub timeout: Dur,
    /// Destination ports whose server speaks first: no detection, opaque TCP at once.
    pub server_first_ports: Vec<u16>,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            timeout: Dur(Duration::from_millis(300)),
            server_first_ports: DEFAULT_SERVER_FIRST_PORTS.to_vec(),
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

/// An IP address written as a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host(pub IpAddr);

impl<'de> Deserialize<'de> for Host {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = scalar_string(d)?;
        s.parse()
            .map(Host)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an IP address")))
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
        if self.workers == Some(0) {
            return Err((
                "workers".into(),
                "0 is not allowed: at least 1 worker thread".into(),
            ));
        }
        if self.detect.timeout.0.is_zero() {
            return Err((
                "detect.timeout".into(),
                "\"0s\" is not allowed: the detection timeout must be positive".into(),
            ));
        }
        if self.balance.decay.0.is_zero() {
            return Err((
                "balance.decay".into(),
                "\"0s\" is not allowed: the decay must be positive".into(),
            ));
        }
        let defaults = self.defaults.resolve();
        if defaults.connect_timeout.0.is_zero() {
            return Err((
                "defaults.connect_timeout".into(),
                "\"0s\" is not allowed: the connect timeout must be positive".into(),
            ));
        }
        if let Some(i) = &self.inbound {
            if i.concurrency_limit == Some(0) {
                return Err((
                    "inbound.concurrency_limit".into(),
                    "0 would refuse every request; leave it out for no limit".into(),
                ));
            }
            if let Some(r) = i.rate_limit {
                if !(r > 0.0 && r.is_finite()) {
                    return Err((
                        "inbound.rate_limit".into(),
                        format!("{r} is not a positive rate (requests per second)"),
                    ));
                }
            }
        }

        if self.health.outage_grace.0.is_zero() {
            return Err((
                "health.outage_grace".into(),
                "\"0s\" is not allowed: a critical dependency would never fail readiness; \
                 use ready_requires: none for that"
                    .into(),
            ));
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

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err((
                "log.level".into(),
                format!(
                    "{:?} is not a log filter ({e}); try \"info\" or \"meshlet=debug,info\"",
                    self.log.level
                ),
            ));
        }

        // Every listener's address is used once.
        let mut listeners: HashMap<SocketAddr, String> = HashMap::new();
        let mut claim = |addr: SocketAddr, path: String| -> Result<(), (String, String)> {
            if addr.port() != 0 {
                if let Some(other) = listeners.insert(addr, path.clone()) {
                    return Err((path, format!("\"{addr}\" is already used by {other}")));
                }
            }
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
    /// machine's parallelism; at least 1.
    pub fn worker_threads(&self) -> usize {
        self.workers
            .or_else(cgroup_cpu_limit)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }
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
        assert!(e.contains("workers: 0 is not allowed"), "{e}");
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
            e.contains("health.outage_grace: \"0s\" is not allowed"),
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
}
