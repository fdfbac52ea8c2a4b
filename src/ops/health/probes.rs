//! The app container's original kubelet probes, run by meshlet with kubelet's semantics.
//!
//! The injector rewrites a pod's probes to `GET /app-health/<container>/<probe>` on the
//! sidecar's admin server and hands the originals to meshlet in the environment variable
//! `MESHLET_APP_PROBES`. Probing through the sidecar keeps probes working when inbound traffic
//! is intercepted, and gives meshlet the app's own health.
//!
//! # The format of `MESHLET_APP_PROBES`
//!
//! A JSON object keyed by container name. Each value is an object with these keys, each
//! optional (unknown keys are rejected, so a typo is a startup error, not a silently missing
//! probe):
//!
//! - `ports`: the container's named ports, `{"<name>": <number>, ...}`, so that a probe's
//!   `port: "http"` resolves as kubelet resolves it against the container spec;
//! - `livez`, `readyz`, `startupz`: the container's `livenessProbe`, `readinessProbe` and
//!   `startupProbe`, each a Kubernetes core/v1 `Probe` exactly as in the pod spec.
//!
//! ```json
//! {
//!   "app": {
//!     "ports": {"http": 8080, "grpc": 9090},
//!     "livez":    {"httpGet": {"path": "/healthz", "port": "http",
//!                  "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 2},
//!     "readyz":   {"grpc": {"port": 9090, "service": "ready"}},
//!     "startupz": {"tcpSocket": {"port": 8080}}
//!   }
//! }
//! ```
//!
//! An empty or unset variable means no app probes. Anything else that is not valid (bad JSON,
//! a probe without a handler, a named port missing from `ports`, an `exec` probe) stops the
//! start with a message naming the container and the probe: a probe that silently never runs
//! would leave a pod ready that should not be.
//!
//! # Semantics (kubelet's)
//!
//! - One attempt per call, bounded by `timeoutSeconds` (default 1 s) for the whole of it:
//!   connect, TLS, request and answer. The thresholds and periods stay kubelet's business: it
//!   still calls the rewritten probe with the pod's `periodSeconds` and `failureThreshold`.
//! - `httpGet`: connects to `host` (default: the probe host, where inbound traffic goes:
//!   the pod's address by default, see `crate::config::pod::probe_host`) on
//!   `port` (a number, or a name from `ports`), sends `GET <path>` with `httpHeaders` (a `Host`
//!   among them sets the Host header; default `User-Agent: kube-probe/1.34` and `Accept: */*`
//!   unless given), and succeeds on status 200-399. `HTTPS` skips certificate verification, as
//!   kubelet does. Unlike kubelet, redirects are not followed: a 3xx answer is itself the
//!   success (kubelet would follow a redirect to the same host and judge its target).
//! - `tcpSocket`: succeeds when the connection is established.
//! - `grpc`: calls `grpc.health.v1.Health/Check` with `service` (default "") over plaintext
//!   HTTP/2 and succeeds only on `SERVING`.
//! - `exec` is not supported: meshlet cannot run a command inside the app container, so such a
//!   probe must stay on the container.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use prost::Message as _;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The probe names of the `/app-health/<container>/<probe>` route, in the JSON's key names.
pub const PROBE_NAMES: [&str; 3] = ["livez", "readyz", "startupz"];

/// The User-Agent kubelet sends (`kube-probe/<major>.<minor>`); apps sometimes match on it to
/// keep probes out of their access logs.
const USER_AGENT: &str = "kube-probe/1.34";

/// Kubelet's default and minimum `timeoutSeconds`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Kubelet reads at most this much of an HTTP probe's answer (and reports it on failure).
const MAX_BODY: usize = 10 * 1024;

/// How much of a failed HTTP probe's body goes into the message.
const MAX_BODY_IN_MESSAGE: usize = 1024;

/// A gRPC health answer is a few bytes; anything bigger than this is not one.
const MAX_GRPC_BODY: usize = 64 * 1024;

/// The app's probes, parsed and validated once at startup.
#[derive(Debug, Clone, Default)]
pub struct AppProbes {
    containers: BTreeMap<String, ContainerProbes>,
}

#[derive(Debug, Clone, Default)]
struct ContainerProbes {
    livez: Option<Check>,
    readyz: Option<Check>,
    startupz: Option<Check>,
}

/// One validated probe: what to do and how long it may take.
#[derive(Debug, Clone)]
pub struct Check {
    action: Action,
    timeout: Duration,
}

#[derive(Debug, Clone)]
enum Action {
    Http {
        tls: bool,
        /// `None`: the app host.
        host: Option<String>,
        port: u16,
        path: PathAndQuery,
        /// The request headers, defaults included, except `Host` when not given.
        headers: HeaderMap,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
}

/// The outcome of one probe run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    pub success: bool,
    /// What happened, for people (the admin route answers with it).
    pub message: String,
    pub duration: Duration,
}

/// One container's entry in `MESHLET_APP_PROBES`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerJson {
    #[serde(default)]
    ports: BTreeMap<String, i64>,
    livez: Option<Probe>,
    readyz: Option<Probe>,
    startupz: Option<Probe>,
}

impl AppProbes {
    /// Parses and validates `MESHLET_APP_PROBES` (the format is in the module doc). Every
    /// error names the container, the probe and what is wrong.
    pub fn parse(json: &str) -> Result<AppProbes, String> {
        let mut de = serde_json::Deserializer::from_str(json);
        let raw: BTreeMap<String, ContainerJson> = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| {
                let path = e.path().to_string();
                if path.is_empty() || path == "." {
                    format!("invalid JSON: {}", e.inner())
                } else {
                    format!("invalid JSON at {path}: {}", e.inner())
                }
            })?;
        de.end().map_err(|e| format!("invalid JSON: {e}"))?;

        let mut containers = BTreeMap::new();
        for (name, c) in raw {
            let mut ports = BTreeMap::new();
            for (port_name, n) in c.ports {
                let n = u16::try_from(n).ok().filter(|&n| n != 0).ok_or_else(|| {
                    format!(
                        "container {name:?}: ports.{port_name}: {n} is not a port number (1-65535)"
                    )
                })?;
                ports.insert(port_name, n);
            }
            let check = |kind: &str, p: Option<Probe>| {
                p.map(|p| Check::from_probe(&format!("container {name:?}: {kind}"), p, &ports))
                    .transpose()
            };
            let probes = ContainerProbes {
                livez: check("livez", c.livez)?,
                readyz: check("readyz", c.readyz)?,
                startupz: check("startupz", c.startupz)?,
            };
            containers.insert(name, probes);
        }
        Ok(AppProbes { containers })
    }

    /// The probe `probe` (`livez`, `readyz` or `startupz`) of `container`, if configured.
    pub fn check(&self, container: &str, probe: &str) -> Option<&Check> {
        let c = self.containers.get(container)?;
        match probe {
            "livez" => c.livez.as_ref(),
            "readyz" => c.readyz.as_ref(),
            "startupz" => c.startupz.as_ref(),
            _ => None,
        }
    }

    /// Every configured probe as `(container, probe name)`, in a stable order.
    pub fn list(&self) -> Vec<(&str, &'static str)> {
        let mut out = Vec::new();
        for (name, c) in &self.containers {
            for (kind, p) in PROBE_NAMES.iter().zip([&c.livez, &c.readyz, &c.startupz]) {
                if p.is_some() {
                    out.push((name.as_str(), *kind));
                }
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.list().is_empty()
    }

    /// Runs one probe once against the app at `app_host`. `None`: no such container or probe.
    pub async fn run(&self, container: &str, probe: &str, app_host: IpAddr) -> Option<ProbeResult> {
        let check = self.check(container, probe)?;
        Some(check.run(app_host).await)
    }
}

impl Check {
    /// Validates one core/v1 Probe; `what` (`container "app": livez`) prefixes every error.
    fn from_probe(what: &str, p: Probe, ports: &BTreeMap<String, u16>) -> Result<Check, String> {
        let handlers: Vec<&str> = [
            ("exec", p.exec.is_some()),
            ("httpGet", p.http_get.is_some()),
            ("tcpSocket", p.tcp_socket.is_some()),
            ("grpc", p.grpc.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, set)| set.then_some(n))
        .collect();
        match handlers.len() {
            0 => {
                return Err(format!(
                    "{what}: the probe has no handler (one of httpGet, tcpSocket or grpc is needed)"
                ));
            }
            1 => {}
            _ => {
                return Err(format!(
                    "{what}: the probe has more than one handler ({}); a probe has exactly one",
                    handlers.join(", ")
                ));
            }
        }
        let timeout = match p.timeout_seconds {
            // 0 is what an unset field looks like after some conversions: kubelet's default.
            None | Some(0) => DEFAULT_TIMEOUT,
            Some(n) if n > 0 => Duration::from_secs(n.unsigned_abs().into()),
            Some(n) => return Err(format!("{what}: timeoutSeconds: {n} is negative")),
        };
        let action = if p.exec.is_some() {
            return Err(format!(
                "{what}: exec probes are not supported: meshlet cannot run a command in the app \
                 container; leave this probe on the container instead of passing it to meshlet"
            ));
        } else if let Some(h) = p.http_get {
            let tls = match h.scheme.as_deref() {
                None | Some("") => false,
                Some(s) if s.eq_ignore_ascii_case("http") => false,
                Some(s) if s.eq_ignore_ascii_case("https") => true,
                Some(s) => {
                    return Err(format!(
                        "{what}: httpGet.scheme: {s:?} is not one of HTTP or HTTPS"
                    ));
                }
            };
            let port = resolve_port(what, "httpGet.port", &h.port, ports)?;
            // As kubelet builds the URL: an empty path is "/", and a path without a leading
            // slash gets one.
            let raw = h.path.unwrap_or_default();
            let path = if raw.starts_with('/') {
                raw.clone()
            } else {
                format!("/{raw}")
            };
            let path = PathAndQuery::try_from(escape_path(&path)).map_err(|_| {
                format!("{what}: httpGet.path: {raw:?} is not a valid request path")
            })?;
            let mut headers = HeaderMap::new();
            for (i, hh) in h.http_headers.unwrap_or_default().into_iter().enumerate() {
                let name = HeaderName::from_bytes(hh.name.as_bytes()).map_err(|_| {
                    format!(
                        "{what}: httpGet.httpHeaders[{i}].name: {:?} is not a valid header name",
                        hh.name
                    )
                })?;
                let value = HeaderValue::from_str(&hh.value).map_err(|_| {
                    format!(
                        "{what}: httpGet.httpHeaders[{i}].value: {:?} is not a valid header value",
                        hh.value
                    )
                })?;
                headers.append(name, value);
            }
            if !headers.contains_key(header::USER_AGENT) {
                headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
            }
            if !headers.contains_key(header::ACCEPT) {
                headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            }
            // Kubelet does not keep probe connections alive; neither does meshlet.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            Action::Http {
                tls,
                host: h.host.filter(|s| !s.is_empty()),
                port,
                path,
                headers,
            }
        } else if let Some(t) = p.tcp_socket {
            Action::Tcp {
                host: t.host.filter(|s| !s.is_empty()),
                port: resolve_port(what, "tcpSocket.port", &t.port, ports)?,
            }
        } else if let Some(g) = p.grpc {
            let port = u16::try_from(g.port)
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| {
                    format!(
                        "{what}: grpc.port: {} is not a port number (1-65535)",
                        g.port
                    )
                })?;
            Action::Grpc {
                port,
                service: g.service.unwrap_or_default(),
            }
        } else {
            // Unreachable: exactly one handler was counted above. Report rather than panic.
            return Err(format!("{what}: the probe has no handler"));
        };
        Ok(Check { action, timeout })
    }

    /// The probe's timeout (`timeoutSeconds`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs the probe once, the whole attempt bounded by its timeout.
    pub async fn run(&self, app_host: IpAddr) -> ProbeResult {
        let started = Instant::now();
        let (success, message) =
            match tokio::time::timeout(self.timeout, self.attempt(app_host)).await {
                Ok(Ok(m)) => (true, m),
                Ok(Err(m)) => (false, m),
                Err(_) => (
                    false,
                    format!(
                        "{}: no answer within the probe timeout ({}s)",
                        self.target(app_host),
                        self.timeout.as_secs()
                    ),
                ),
            };
        ProbeResult {
            success,
            message,
            duration: started.elapsed(),
        }
    }

    /// What is probed, for messages: a URL, `tcp host:port` or `grpc host:port service "x"`.
    fn target(&self, app_host: IpAddr) -> String {
        match &self.action {
            Action::Http {
                tls,
                host,
                port,
                path,
                ..
            } => {
                let host = host.clone().unwrap_or_else(|| app_host.to_string());
                let scheme = if *tls { "https" } else { "http" };
                format!("{scheme}://{}{path}", authority(&host, *port))
            }
            Action::Tcp { host, port } => {
                let host = host.clone().unwrap_or_else(|| app_host.to_string());
                format!("tcp {}", authority(&host, *port))
            }
            Action::Grpc { port, service } => format!(
                "grpc {} service {service:?}",
                authority(&app_host.to_string(), *port)
            ),
        }
    }

    /// One attempt: `Ok(message)` on success, `Err(message)` on failure.
    async fn attempt(&self, app_host: IpAddr) -> Result<String, String> {
        let target = self.target(app_host);
        match &self.action {
            Action::Http {
                tls,
                host,
                port,
                path,
                headers,
            } => {
                let host = host.clone().unwrap_or_else(|| app_host.to_string());
                let mut req = Request::new(Empty::<Bytes>::new());
                *req.uri_mut() = http::Uri::from(path.clone());
                *req.headers_mut() = headers.clone();
                if !req.headers().contains_key(header::HOST) {
                    let value = HeaderValue::from_str(&authority(&host, *port))
                        .map_err(|_| format!("{target}: {host:?} is not a valid host name"))?;
                    req.headers_mut().insert(header::HOST, value);
                }
                let tcp = connect(&host, *port)
                    .await
                    .map_err(|e| format!("{target}: cannot connect: {e}"))?;
                if *tls {
                    let stream = tls_connect(tcp, &host)
                        .await
                        .map_err(|e| format!("{target}: {e}"))?;
                    http_exchange(stream, req, &target).await
                } else {
                    http_exchange(tcp, req, &target).await
                }
            }
            Action::Tcp { host, port } => {
                let host = host.clone().unwrap_or_else(|| app_host.to_string());
                connect(&host, *port)
                    .await
                    .map(|_| format!("{target}: connected"))
                    .map_err(|e| format!("{target}: cannot connect: {e}"))
            }
            Action::Grpc { port, service } => {
                let tcp = connect(&app_host.to_string(), *port)
                    .await
                    .map_err(|e| format!("{target}: cannot connect: {e}"))?;
                grpc_check(tcp, app_host, *port, service, self.timeout)
                    .await
                    .map(|m| format!("{target}: {m}"))
                    .map_err(|m| format!("{target}: {m}"))
            }
        }
    }
}

/// Percent-encodes what a request target cannot hold (spaces, controls, non-ASCII, and `"`, `<`,
/// `>`, `\`, `^`, the backquote, `{`, `|`, `}`), as kubelet's Go URL handling does: the API
/// server accepts `path: /health check` and kubelet sends `GET /health%20check`. `%` is kept: a
/// path already encoded stays as it is.
fn escape_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b <= b' ' || b >= 0x7f || b"\"<>\\^`{|}".contains(&b) {
            let _ = write!(out, "%{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
    out
}

/// Resolves a probe's port as kubelet does: a number, or a container port name, or failing
/// that a number written as a string.
fn resolve_port(
    what: &str,
    field: &str,
    port: &IntOrString,
    ports: &BTreeMap<String, u16>,
) -> Result<u16, String> {
    match port {
        // A missing port arrives as 0: say so rather than only "0 is not a port".
        IntOrString::Int(0) => Err(format!(
            "{what}: {field}: missing (a port number 1-65535 or a named port is needed)"
        )),
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .ok_or_else(|| format!("{what}: {field}: {n} is not a port number (1-65535)")),
        IntOrString::String(name) => {
            if let Some(&n) = ports.get(name) {
                return Ok(n);
            }
            if let Some(n) = name.parse::<u16>().ok().filter(|&n| n != 0) {
                return Ok(n);
            }
            let known = if ports.is_empty() {
                "the container has no named ports in \"ports\"".to_string()
            } else {
                let names: Vec<&str> = ports.keys().map(String::as_str).collect();
                format!("its named ports: {}", names.join(", "))
            };
            Err(format!(
                "{what}: {field}: {name:?} is not a named port of the container ({known})"
            ))
        }
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn authority(host: &str, port: u16) -> String {
    if host.parse::<Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Connects to `host:port`; a host name is resolved and its addresses tried in turn.
async fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let tcp = match host.parse::<IpAddr>() {
        Ok(ip) => TcpStream::connect((ip, port)).await?,
        Err(_) => TcpStream::connect((host, port)).await?,
    };
    // Probe requests are one small write each: no reason to wait for Nagle.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// One HTTP/1.1 request and its answer, judged as kubelet does (200-399 is a success). The
/// connection is driven inside this future, not spawned, so a timed-out probe leaves nothing
/// running behind it.
async fn http_exchange<T>(io: T, req: Request<Empty<Bytes>>, target: &str) -> Result<String, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("{target}: {e}"))?;
    let exchange = async move {
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{target}: the request failed: {e}"))?;
        let status = rsp.status();
        let body = read_at_most(rsp.into_body(), MAX_BODY)
            .await
            .map_err(|e| format!("{target}: HTTP {status}, reading the body failed: {e}"))?;
        Ok::<_, String>((status, body))
    };
    let (status, body) = drive(conn, exchange).await?;
    if (200..400).contains(&status.as_u16()) {
        Ok(format!("{target}: HTTP {}", status_text(status)))
    } else {
        let mut m = format!("{target}: HTTP {}", status_text(status));
        let text = String::from_utf8_lossy(&body);
        let text = text.trim();
        if !text.is_empty() {
            let cut: String = text.chars().take(MAX_BODY_IN_MESSAGE).collect();
            let _ = write!(m, ": {cut}");
            if cut.len() < text.len() {
                m.push_str(" (cut)");
            }
        }
        Err(m)
    }
}

/// Polls a client connection alongside the exchange that uses it until the exchange is done.
/// If the connection ends first (closed, or an error), the exchange sees that and finishes.
async fn drive<C, E, F, R>(conn: C, exchange: F) -> R
where
    C: Future<Output = Result<(), E>>,
    F: Future<Output = R>,
{
    tokio::pin!(conn);
    tokio::pin!(exchange);
    tokio::select! {
        biased;
        r = &mut exchange => r,
        _ = &mut conn => exchange.await,
    }
}

fn status_text(s: StatusCode) -> String {
    match s.canonical_reason() {
        Some(r) => format!("{} {r}", s.as_u16()),
        None => s.as_u16().to_string(),
    }
}

/// Reads a body up to `limit` bytes; the rest is left unread (kubelet does the same).
async fn read_at_most(mut body: Incoming, limit: usize) -> Result<Bytes, hyper::Error> {
    let mut out = BytesMut::new();
    while out.len() < limit {
        match body.frame().await {
            None => break,
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    let room = limit - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
        }
    }
    Ok(out.freeze())
}

/// The TLS client for HTTPS probes: certificates are not verified, as kubelet does not verify
/// them either (apps serve probes with self-signed certificates all the time). Only the
/// handshake signatures are checked, so the connection is still a real TLS connection.
fn tls_config() -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    use tokio_rustls::rustls;
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("cannot set up TLS: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}

async fn tls_connect(
    tcp: TcpStream,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    use tokio_rustls::rustls::pki_types::ServerName;
    let config = tls_config()?;
    // An IP address sends no SNI; a host name does, as kubelet's Go client does.
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))
}

/// Accepts any server certificate (see [`tls_config`]) but checks handshake signatures.
#[derive(Debug)]
struct AnyCertificate(Arc<tokio_rustls::rustls::crypto::CryptoProvider>);

impl tokio_rustls::rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[tokio_rustls::rustls::pki_types::CertificateDer<'_>],
        _server_name: &tokio_rustls::rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: tokio_rustls::rustls::pki_types::UnixTime,
    ) -> Result<tokio_rustls::rustls::client::danger::ServerCertVerified, tokio_rustls::rustls::Error>
    {
        Ok(tokio_rustls::rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &tokio_rustls::rustls::pki_types::CertificateDer<'_>,
        dss: &tokio_rustls::rustls::DigitallySignedStruct,
    ) -> Result<
        tokio_rustls::rustls::client::danger::HandshakeSignatureValid,
        tokio_rustls::rustls::Error,
    > {
        tokio_rustls::rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<tokio_rustls::rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ===== gRPC health =====

const GRPC_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// `grpc.health.v1.Health/Check` over plaintext HTTP/2: the one unary call kubelet makes,
/// hand-encoded so that no gRPC stack is needed outside the tests.
async fn grpc_check(
    tcp: TcpStream,
    host: IpAddr,
    port: u16,
    service: &str,
    timeout: Duration,
) -> Result<String, String> {
    let body = encode_check_request(service)?;
    let uri = format!(
        "http://{}{GRPC_CHECK_PATH}",
        authority(&host.to_string(), port)
    );
    let req = Request::post(uri)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, USER_AGENT)
        // The deadline, as kubelet's client sends it, so the app can stop working on it.
        .header("grpc-timeout", format!("{}m", timeout.as_millis()))
        .body(Full::new(body))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
    let exchange = async move {
        let rsp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("the call failed: {e}"))?;
        let (parts, mut body) = rsp.into_parts();
        if parts.status != StatusCode::OK {
            return Err(format!(
                "HTTP {}: not a gRPC answer",
                status_text(parts.status)
            ));
        }
        let mut data = BytesMut::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the answer failed: {e}"))?;
            match frame.into_data() {
                Ok(d) => {
                    if data.len() + d.len() > MAX_GRPC_BODY {
                        return Err("the answer is too big for a health check".to_string());
                    }
                    data.extend_from_slice(&d);
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        Ok((parts.headers, trailers, data.freeze()))
    };
    let (headers, trailers, data) = drive(conn, exchange).await?;
    // A trailers-only answer (an error without a message) carries the status in the headers.
    let status_from = trailers.as_ref().unwrap_or(&headers);
    let code = status_from
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| "the answer has no grpc-status".to_string())?;
    if code != 0 {
        let message = status_from
            .get("grpc-message")
            .map(|v| percent_decode(v.as_bytes()))
            .unwrap_or_default();
        return Err(format!(
            "gRPC status {} {}{}{}",
            code,
            grpc_code_name(code),
            if message.is_empty() { "" } else { ": " },
            message
        ));
    }
    let status = decode_check_response(&data)?;
    let name = serving_status_name(status);
    if status == 1 {
        Ok(name.to_string())
    } else {
        Err(name.to_string())
    }
}

/// Decodes `grpc-message`, which the gRPC spec percent-encodes; a malformed escape is kept as
/// it is.
#[doc(hidden)] // pub for the fuzz targets in fuzz/
pub fn percent_decode(v: &[u8]) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while let Some(&b) = v.get(i) {
        if b == b'%' {
            if let (Some(h), Some(l)) = (
                v.get(i + 1).copied().and_then(hex),
                v.get(i + 2).copied().and_then(hex),
            ) {
                // Two hex digits: at most 0xff, so the cast is exact.
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `HealthCheckRequest` (prost, from tonic-health) in a gRPC frame (uncompressed flag,
/// length).
#[doc(hidden)] // pub for the fuzz targets in fuzz/
pub fn encode_check_request(service: &str) -> Result<Bytes, String> {
    let msg = HealthCheckRequest {
        service: service.to_string(),
    }
    .encode_to_vec();
    let len = u32::try_from(msg.len()).map_err(|_| "the service name is too long".to_string())?;
    let mut out = Vec::with_capacity(5 + msg.len());
    out.push(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&msg);
    Ok(Bytes::from(out))
}

/// The `status` of a `HealthCheckResponse` in one gRPC frame, decoded by prost (unknown fields
/// skipped; a missing status is 0, UNKNOWN).
#[doc(hidden)] // pub for the fuzz targets in fuzz/
pub fn decode_check_response(frame: &[u8]) -> Result<i32, String> {
    let header = frame
        .get(..5)
        .ok_or_else(|| "the answer holds no message".to_string())?;
    if header[0] != 0 {
        return Err("the answer is compressed, which meshlet did not ask for".to_string());
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let msg = frame
        .get(5..5usize.saturating_add(len))
        .ok_or_else(|| "the answer's message is cut short".to_string())?;
    HealthCheckResponse::decode(msg)
        .map(|r| r.status)
        .map_err(|_| "the answer is not a HealthCheckResponse".to_string())
}

fn serving_status_name(s: i32) -> &'static str {
    match s {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "an unknown serving status",
    }
}

fn grpc_code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|c| NAMES.get(c))
        .copied()
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(json: &str) -> String {
        AppProbes::parse(json).expect_err("should not parse")
    }

    #[test]
    fn parses_every_handler_and_resolves_named_ports() {
        let p = AppProbes::parse(
            r#"{
              "app": {
                "ports": {"http": 8080},
                "livez": {"httpGet": {"path": "healthz?full=1", "port": "http", "scheme": "HTTPS",
                          "httpHeaders": [{"name": "X-A", "value": "1"}, {"name": "User-Agent", "value": "me"}]},
                          "timeoutSeconds": 3},
                "readyz": {"tcpSocket": {"port": "9000"}},
                "startupz": {"grpc": {"port": 9090, "service": "s"}}
              },
              "side": {}
            }"#,
        )
        .unwrap();
        assert_eq!(
            p.list(),
            vec![("app", "livez"), ("app", "readyz"), ("app", "startupz")]
        );
        let live = p.check("app", "livez").unwrap();
        assert_eq!(live.timeout(), Duration::from_secs(3));
        match &live.action {
            Action::Http {
                tls,
                port,
                path,
                headers,
                host,
            } => {
                assert!(*tls);
                assert_eq!(*port, 8080);
                assert_eq!(path.as_str(), "/healthz?full=1");
                assert_eq!(headers["x-a"], "1");
                assert_eq!(headers["user-agent"], "me");
                assert_eq!(headers["accept"], "*/*");
                assert!(host.is_none());
            }
            other => panic!("not http: {other:?}"),
        }
        let ready = p.check("app", "readyz").unwrap();
        assert_eq!(ready.timeout(), DEFAULT_TIMEOUT);
        assert!(matches!(ready.action, Action::Tcp { port: 9000, .. }));
        assert!(matches!(
            &p.check("app", "startupz").unwrap().action,
            Action::Grpc { port: 9090, service } if service == "s"
        ));
        assert!(p.check("side", "livez").is_none());
        assert!(p.check("app", "nope").is_none());
        assert!(p.check("nope", "livez").is_none());
    }

    #[test]
    fn default_path_and_user_agent() {
        let p = AppProbes::parse(r#"{"c": {"livez": {"httpGet": {"port": 80}}}}"#).unwrap();
        match &p.check("c", "livez").unwrap().action {
            Action::Http { path, headers, .. } => {
                assert_eq!(path.as_str(), "/");
                assert_eq!(headers["user-agent"], USER_AGENT);
            }
            other => panic!("not http: {other:?}"),
        }
    }

    /// Found by fuzz/ (admission): the API server accepts such paths and kubelet encodes them,
    /// but the sidecar refused the probe and so would not start.
    #[test]
    fn paths_are_encoded_as_kubelet_sends_them() {
        for (given, sent) in [
            ("/health check", "/health%20check"),
            ("/sant\u{e9}?q=a b", "/sant%C3%A9?q=a%20b"),
            ("/a%20b|{c}", "/a%20b%7C%7Bc%7D"),
            ("ready", "/ready"),
        ] {
            let json =
                serde_json::json!({"c": {"livez": {"httpGet": {"port": 80, "path": given}}}});
            let p = AppProbes::parse(&json.to_string()).unwrap();
            match &p.check("c", "livez").unwrap().action {
                Action::Http { path, .. } => assert_eq!(path.as_str(), sent, "{given:?}"),
                other => panic!("not http: {other:?}"),
            }
        }
    }

    #[test]
    fn invalid_json_names_the_position() {
        let e = parse_err(r#"{"app": {"livez": }"#);
        assert!(e.starts_with("invalid JSON"), "{e}");
        assert!(e.contains("line 1 column"), "{e}");
        let e = parse_err("[1]");
        assert!(e.contains("invalid JSON"), "{e}");
        let e = parse_err(r#"{"app": {}} x"#);
        assert!(e.contains("trailing characters"), "{e}");
    }

    #[test]
    fn wrong_types_and_unknown_keys_name_the_path() {
        let e =
            parse_err(r#"{"app": {"livez": {"httpGet": {"port": 80}, "timeoutSeconds": "x"}}}"#);
        assert!(e.contains("app.livez"), "{e}");
        let e = parse_err(r#"{"app": {"liveness": {}}}"#);
        assert!(e.contains("unknown field `liveness`"), "{e}");
        let e = parse_err(r#"{"app": {"livez": {"httpGet": {"path": "/"}}}}"#);
        assert!(e.contains("httpGet.port: missing"), "{e}");
    }

    #[test]
    fn a_probe_without_a_handler_is_refused() {
        let e = parse_err(r#"{"app": {"readyz": {"timeoutSeconds": 2}}}"#);
        assert_eq!(
            e,
            "container \"app\": readyz: the probe has no handler (one of httpGet, tcpSocket or grpc is needed)"
        );
    }

    #[test]
    fn two_handlers_are_refused() {
        let e =
            parse_err(r#"{"app": {"readyz": {"tcpSocket": {"port": 1}, "grpc": {"port": 2}}}}"#);
        assert!(e.contains("more than one handler (tcpSocket, grpc)"), "{e}");
    }

    #[test]
    fn an_unknown_named_port_is_refused() {
        let e = parse_err(
            r#"{"app": {"ports": {"web": 8080}, "livez": {"httpGet": {"port": "http"}}}}"#,
        );
        assert_eq!(
            e,
            "container \"app\": livez: httpGet.port: \"http\" is not a named port of the container (its named ports: web)"
        );
        let e = parse_err(r#"{"app": {"readyz": {"tcpSocket": {"port": "db"}}}}"#);
        assert!(e.contains("no named ports"), "{e}");
    }

    #[test]
    fn exec_probes_are_unsupported() {
        let e = parse_err(r#"{"app": {"startupz": {"exec": {"command": ["true"]}}}}"#);
        assert!(
            e.starts_with("container \"app\": startupz: exec probes are not supported"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let e = parse_err(r#"{"app": {"livez": {"httpGet": {"port": 70000}}}}"#);
        assert!(
            e.contains("httpGet.port: 70000 is not a port number"),
            "{e}"
        );
        let e = parse_err(r#"{"app": {"livez": {"grpc": {"port": 0}}}}"#);
        assert!(e.contains("grpc.port: 0 is not a port number"), "{e}");
        let e = parse_err(r#"{"app": {"livez": {"httpGet": {"port": 1, "scheme": "FTP"}}}}"#);
        assert!(e.contains("httpGet.scheme: \"FTP\""), "{e}");
        let e = parse_err(
            r#"{"app": {"livez": {"httpGet": {"port": 1, "httpHeaders": [{"name": "a b", "value": "x"}]}}}}"#,
        );
        assert!(e.contains("httpHeaders[0].name: \"a b\""), "{e}");
        let e =
            parse_err(r#"{"app": {"livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": -1}}}"#);
        assert!(e.contains("timeoutSeconds: -1 is negative"), "{e}");
        let e = parse_err(r#"{"app": {"ports": {"web": -1}}}"#);
        assert!(e.contains("ports.web: -1"), "{e}");
    }

    #[test]
    fn grpc_messages_round_trip() {
        assert_eq!(&encode_check_request("").unwrap()[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &encode_check_request("ab").unwrap()[..],
            &[0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']
        );
        // status = SERVING, after an unknown length-delimited field 2.
        assert_eq!(
            decode_check_response(&[0, 0, 0, 0, 5, 0x12, 1, b'x', 0x08, 1]),
            Ok(1)
        );
        assert_eq!(decode_check_response(&[0, 0, 0, 0, 0]), Ok(0));
        assert!(decode_check_response(&[0, 0, 0, 0, 9, 0x08]).is_err());
        assert!(decode_check_response(&[0, 0, 0, 0, 1, 0x08]).is_err());
        assert!(decode_check_response(&[1, 0, 0, 0, 0]).is_err());
        assert!(decode_check_response(&[0, 0]).is_err());
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(percent_decode(b"a%20b%2"), "a b%2");
        assert_eq!(percent_decode(b"%zz%41"), "%zzA");
    }

    #[test]
    fn authority_brackets_ipv6() {
        assert_eq!(authority("::1", 80), "[::1]:80");
        assert_eq!(authority("10.0.0.1", 80), "10.0.0.1:80");
        assert_eq!(authority("web", 80), "web:80");
    }
}
