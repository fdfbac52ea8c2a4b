//! `meshlet identity`: the gRPC service (`meshlet.identity.v1.Identity`, proto/), its TLS, the
//! issuer it reads from a Secret, and a small admin server (health and metrics).
//!
//! The service's own serving certificate is signed by the same issuer, for its Service's DNS
//! names and its own SPIFFE ID, so that a sidecar verifies it with the trust bundle it already
//! has. It is re-signed at 70 % of its lifetime and whenever the issuer changes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Secret;
use parking_lot::RwLock;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response as GrpcResponse, Status};

use super::ca::{Ca, CertifyError, IssuerPem, SpiffeId, check_csr_size};
use super::review::{ReviewError, Reviewer};
use crate::proto::identity::v1::identity_server::{Identity, IdentityServer};
use crate::proto::identity::v1::{CertifyRequest, CertifyResponse};

/// A handshake or a call slower than this is a client problem.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request: a token and a CSR, both bounded well below this.
const MAX_MESSAGE: usize = 64 * 1024;

/// `meshlet identity`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityArgs {
    /// The address to serve gRPC over TLS on.
    #[arg(long, default_value = "0.0.0.0:7150")]
    pub listen: SocketAddr,
    /// The admin address: `/live`, `/ready` and `/metrics` over plain HTTP.
    #[arg(long, default_value = "0.0.0.0:7151")]
    pub admin_listen: SocketAddr,
    /// The SPIFFE trust domain of every identity signed.
    #[arg(long, env = "MESHLET_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The audience a sidecar's projected ServiceAccount token must be for.
    #[arg(long, default_value = "meshlet.dev/identity")]
    pub audience: String,
    /// The Secret (in `--namespace`) holding the issuer: `tls.crt` (the issuer certificate, then
    /// any intermediates), `tls.key` and `ca.crt` (the trust anchors).
    #[arg(long, default_value = "meshlet-identity-issuer")]
    pub issuer_secret: String,
    /// How often the issuer Secret is read again (a new issuer is used without a restart).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub issuer_refresh: Duration,
    /// The namespace this service runs in (the chart passes the pod's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "meshlet")]
    pub namespace: String,
    /// This service's own ServiceAccount: the SPIFFE ID of its serving certificate.
    #[arg(
        long,
        env = "MESHLET_SERVICE_ACCOUNT",
        default_value = "meshlet-identity"
    )]
    pub service_account: String,
    /// DNS names of the serving certificate (repeat the flag); by default
    /// `meshlet-identity.<namespace>.svc` and `meshlet-identity.<namespace>.svc.cluster.local`.
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
    /// The lifetime of a signed certificate.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
    /// A certificate is valid from this long before it was signed, for clocks behind ours.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    pub clock_skew: Duration,
    /// A kubeconfig file; without it, the in-cluster configuration (or `KUBECONFIG`).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

impl IdentityArgs {
    /// The flags' values that cannot be right, named.
    pub fn check(&self) -> Result<(), String> {
        super::ca::check_trust_domain(&self.trust_domain)
            .map_err(|e| format!("--trust-domain: {e}"))?;
        if self.cert_ttl < Duration::from_secs(60)
            || self.cert_ttl > Duration::from_secs(90 * 86400)
        {
            return Err(format!(
                "--cert-ttl {}: use 1m to 90d",
                humantime::format_duration(self.cert_ttl)
            ));
        }
        if self.clock_skew > Duration::from_secs(3600) {
            return Err(format!(
                "--clock-skew {}: use at most 1h",
                humantime::format_duration(self.clock_skew)
            ));
        }
        if self.audience.is_empty() {
            return Err("--audience: empty".into());
        }
        if self.issuer_refresh < Duration::from_secs(1) {
            return Err("--issuer-refresh: at least 1s".into());
        }
        self.me()?;
        Ok(())
    }

    /// The service's own identity, from --trust-domain, --namespace and --service-account.
    fn me(&self) -> Result<SpiffeId, String> {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account).ok_or_else(|| {
            format!(
                "--namespace {:?} or --service-account {:?}: not a Kubernetes name (lowercase letters, digits, '.', '-')",
                self.namespace, self.service_account
            )
        })
    }

    fn server_names(&self) -> Vec<String> {
        if !self.server_names.is_empty() {
            return self.server_names.clone();
        }
        let svc = format!("meshlet-identity.{}.svc", self.namespace);
        vec![svc.clone(), format!("{svc}.cluster.local")]
    }
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    issued: AtomicU64,
    refused_unauthenticated: AtomicU64,
    refused_invalid: AtomicU64,
    unavailable: AtomicU64,
    issuer_loads: AtomicU64,
    issuer_load_errors: AtomicU64,
}

impl Metrics {
    fn render(&self, issuer_not_after: Option<SystemTime>) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut s = String::new();
        s +=
            "# HELP meshlet_identity_certificates_issued_total Certificates signed for sidecars.\n";
        s += "# TYPE meshlet_identity_certificates_issued_total counter\n";
        s += &format!(
            "meshlet_identity_certificates_issued_total {}\n",
            get(&self.issued)
        );
        s += "# HELP meshlet_identity_refused_total Certify calls refused, by gRPC status.\n";
        s += "# TYPE meshlet_identity_refused_total counter\n";
        for (code, c) in [
            ("unauthenticated", &self.refused_unauthenticated),
            ("invalid_argument", &self.refused_invalid),
            ("unavailable", &self.unavailable),
        ] {
            s += &format!(
                "meshlet_identity_refused_total{{code=\"{code}\"}} {}\n",
                get(c)
            );
        }
        s += "# HELP meshlet_identity_issuer_loads_total Reads of the issuer Secret that changed the issuer, by result.\n";
        s += "# TYPE meshlet_identity_issuer_loads_total counter\n";
        s += &format!(
            "meshlet_identity_issuer_loads_total{{result=\"ok\"}} {}\n",
            get(&self.issuer_loads)
        );
        s += &format!(
            "meshlet_identity_issuer_loads_total{{result=\"error\"}} {}\n",
            get(&self.issuer_load_errors)
        );
        if let Some(t) = issuer_not_after {
            let secs = t
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            s += "# HELP meshlet_identity_serving_certificate_expiry_seconds When the service's own serving certificate expires (Unix time).\n";
            s += "# TYPE meshlet_identity_serving_certificate_expiry_seconds gauge\n";
            s += &format!("meshlet_identity_serving_certificate_expiry_seconds {secs}\n");
        }
        s
    }
}

/// What the service runs on: the current issuer and serving certificate, swapped as a whole.
pub struct Authority {
    ca: RwLock<Arc<Ca>>,
    serving: RwLock<(Arc<CertifiedKey>, SystemTime)>,
    reviewer: Reviewer,
    metrics: Metrics,
    me: SpiffeId,
    names: Vec<String>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").field("me", &self.me).finish()
    }
}

impl ResolvesServerCert for Authority {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.serving.read().0.clone())
    }
}

impl Authority {
    fn new(ca: Ca, reviewer: Reviewer, me: SpiffeId, names: Vec<String>) -> Result<Self, String> {
        let serving = serving_cert(&ca, &me, &names)?;
        Ok(Authority {
            ca: RwLock::new(Arc::new(ca)),
            serving: RwLock::new(serving),
            reviewer,
            metrics: Metrics::default(),
            me,
            names,
        })
    }

    /// Uses a new issuer from now on, and a serving certificate signed by it.
    fn replace_ca(&self, ca: Ca) -> Result<(), String> {
        let serving = serving_cert(&ca, &self.me, &self.names)?;
        *self.ca.write() = Arc::new(ca);
        *self.serving.write() = serving;
        Ok(())
    }

    fn renew_serving(&self) -> Result<(), String> {
        let ca = self.ca.read().clone();
        *self.serving.write() = serving_cert(&ca, &self.me, &self.names)?;
        Ok(())
    }

    /// One Certify call, with its refusal counted and logged.
    async fn certify(
        &self,
        token: &str,
        csr: &[u8],
        peer: &str,
    ) -> Result<CertifyResponse, Status> {
        let refuse = |code: tonic::Code, who: Option<&SpiffeId>, why: String| {
            let counter = match code {
                tonic::Code::Unauthenticated => &self.metrics.refused_unauthenticated,
                tonic::Code::InvalidArgument => &self.metrics.refused_invalid,
                _ => &self.metrics.unavailable,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let who = who.map(ToString::to_string).unwrap_or_default();
            tracing::warn!(%peer, identity = %who, code = ?code, reason = %why, "certificate refused");
            Status::new(code, why)
        };
        // Cheap checks before asking the API server anything.
        if let Err(e) = check_csr_size(csr) {
            return Err(refuse(tonic::Code::InvalidArgument, None, e.to_string()));
        }
        let id = match self.reviewer.review(token).await {
            Ok(id) => id,
            Err(ReviewError::Refused(why)) => {
                return Err(refuse(tonic::Code::Unauthenticated, None, why));
            }
            Err(e @ ReviewError::Unavailable(_)) => {
                return Err(refuse(tonic::Code::Unavailable, None, e.to_string()));
            }
        };
        let ca = self.ca.read().clone();
        let issued = match ca.certify(&id, csr, SystemTime::now()) {
            Ok(i) => i,
            Err(e @ CertifyError::Signing(_)) => {
                return Err(refuse(tonic::Code::Internal, Some(&id), e.to_string()));
            }
            Err(e) => {
                return Err(refuse(
                    tonic::Code::InvalidArgument,
                    Some(&id),
                    e.to_string(),
                ));
            }
        };
        self.metrics.issued.fetch_add(1, Ordering::Relaxed);
        let not_after = issued
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        tracing::info!(%peer, identity = %id, not_after, "certificate issued");
        Ok(CertifyResponse {
            leaf_der: issued.leaf.to_vec(),
            intermediates_der: issued.intermediates.iter().map(|c| c.to_vec()).collect(),
            spiffe_id: id.to_string(),
            not_after_unix: not_after,
        })
    }
}

/// A fresh key and a leaf for the service itself.
fn serving_cert(
    ca: &Ca,
    me: &SpiffeId,
    names: &[String],
) -> Result<(Arc<CertifiedKey>, SystemTime), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let issued = ca
        .sign_with(me, names, &key, SystemTime::now())
        .map_err(|e| format!("cannot sign the serving certificate: {e}"))?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| format!("serving key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("serving key: {e}"))?;
    let mut chain = vec![issued.leaf];
    chain.extend(issued.intermediates);
    Ok((Arc::new(CertifiedKey::new(chain, signer)), issued.not_after))
}

struct Service(Arc<Authority>);

#[tonic::async_trait]
impl Identity for Service {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<GrpcResponse<CertifyResponse>, Status> {
        let peer = request
            .extensions()
            .get::<PeerAddr>()
            .map(|a| a.0.to_string())
            .unwrap_or_default();
        let r = request.into_inner();
        self.0
            .certify(&r.token, &r.csr_der, &peer)
            .await
            .map(GrpcResponse::new)
    }
}

/// The caller's address, put in each request's extensions by [`AddPeer`].
#[derive(Clone, Copy)]
struct PeerAddr(SocketAddr);

/// Reads the issuer Secret: `Ok(None)` when its resourceVersion is `seen`.
async fn read_issuer(
    api: &kube::Api<Secret>,
    name: &str,
    seen: Option<&str>,
    args: &IdentityArgs,
) -> Result<Option<(Ca, Option<String>)>, String> {
    let secret = api.get(name).await.map_err(|e| {
        format!(
            "cannot read the issuer Secret {}/{name}: {e}",
            args.namespace
        )
    })?;
    let version = secret.metadata.resource_version.clone();
    if version.is_some() && version.as_deref() == seen {
        return Ok(None);
    }
    let data = secret.data.unwrap_or_default();
    let get = |k: &str| {
        data.get(k).map(|b| b.0.clone()).ok_or_else(|| {
            format!(
                "the issuer Secret {}/{name} has no {k:?} (it needs tls.crt, tls.key and ca.crt)",
                args.namespace
            )
        })
    };
    let (chain, key, anchors) = (get("tls.crt")?, get("tls.key")?, get("ca.crt")?);
    let ca = Ca::new(
        IssuerPem {
            chain: &chain,
            key: &key,
            anchors: &anchors,
        },
        &args.trust_domain,
        args.cert_ttl,
        args.clock_skew,
    )
    .map_err(|e| format!("the issuer Secret {}/{name}: {e}", args.namespace))?;
    Ok(Some((ca, version)))
}

/// Keeps the issuer current (re-read every `issuer_refresh`) and the serving certificate fresh
/// (re-signed at 70 % of its lifetime).
async fn maintain(
    authority: Arc<Authority>,
    api: kube::Api<Secret>,
    args: IdentityArgs,
    mut seen: Option<String>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(args.issuer_refresh) => {}
        }
        let read = read_issuer(&api, &args.issuer_secret, seen.as_deref(), &args).await;
        let replaced = match read {
            Ok(None) => Ok(None),
            Ok(Some((ca, version))) => authority.replace_ca(ca).map(|()| Some(version)),
            Err(e) => Err(e),
        };
        match replaced {
            Ok(None) => {}
            Ok(Some(version)) => {
                authority
                    .metrics
                    .issuer_loads
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(secret = %args.issuer_secret, "new issuer in use");
                seen = version;
            }
            Err(e) => {
                authority
                    .metrics
                    .issuer_load_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "keeping the current issuer");
            }
        }
        let (_, not_after) = *authority.serving.read();
        let ttl = authority.ca.read().ttl();
        let renew_at = not_after - ttl.mul_f64(0.3);
        if SystemTime::now() >= renew_at {
            match authority.renew_serving() {
                Ok(()) => tracing::info!("serving certificate renewed"),
                Err(e) => tracing::warn!(error = %e, "cannot renew the serving certificate"),
            }
        }
    }
}

/// Serves the gRPC service over TLS until `stop`.
pub async fn serve(listener: TcpListener, authority: Arc<Authority>, stop: CancellationToken) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = match rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
    {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "TLS 1.3 unavailable");
            return;
        }
    };
    let mut tls = tls
        .with_no_client_auth()
        .with_cert_resolver(authority.clone());
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let grpc = IdentityServer::new(Service(authority))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let Some((stream, peer)) = crate::socket::accept(&listener, &stop, "identity").await else {
            connections.close();
            let _ = tokio::time::timeout(IO_TIMEOUT, connections.wait()).await;
            return;
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, grpc, stop) = (acceptor.clone(), grpc.clone(), stop.clone());
        connections.spawn(async move {
            let tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc = AddPeer { svc: grpc, peer };
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(64)
                .serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(IO_TIMEOUT, conn).await;
                }
            }
        });
    }
}

/// The gRPC service with the peer's address in each request's extensions (for the logs).
#[derive(Clone)]
struct AddPeer<S> {
    svc: S,
    peer: SocketAddr,
}

impl<S> tower::Service<http::Request<hyper::body::Incoming>> for AddPeer<S>
where
    S: tower::Service<http::Request<hyper::body::Incoming>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.svc.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<hyper::body::Incoming>) -> Self::Future {
        req.extensions_mut().insert(PeerAddr(self.peer));
        self.svc.call(req)
    }
}

/// `/live`, `/ready` and `/metrics`.
async fn admin(listener: TcpListener, authority: Arc<Authority>, stop: CancellationToken) {
    loop {
        let Some((stream, _)) = crate::socket::accept(&listener, &stop, "identity admin").await
        else {
            return;
        };
        let authority = authority.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let authority = authority.clone();
                    async move {
                        let (status, body) = match (req.method(), req.uri().path()) {
                            (&Method::GET, "/live" | "/ready") => {
                                (StatusCode::OK, "ok\n".to_string())
                            }
                            (&Method::GET, "/metrics") => {
                                let not_after = authority.serving.read().1;
                                (StatusCode::OK, authority.metrics.render(Some(not_after)))
                            }
                            _ => (
                                StatusCode::NOT_FOUND,
                                "not found: GET /live, /ready, /metrics\n".to_string(),
                            ),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        Ok::<_, Infallible>(r)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IO_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `meshlet identity`: loads the issuer, then serves until SIGTERM or SIGINT. Exit 2 on a bad
/// flag or issuer, 1 when it cannot start.
pub fn main(args: IdentityArgs) -> ExitCode {
    crate::program::init_logs(args.log_json);
    if let Err(e) = args.check() {
        eprintln!("meshlet identity: {e}");
        return ExitCode::from(2);
    }
    match crate::program::runtime("identity") {
        Ok(r) => r.block_on(run(args)),
        Err(code) => code,
    }
}

async fn run(args: IdentityArgs) -> ExitCode {
    let client = match crate::discovery::kubernetes::KubeResolver::client(
        args.kubeconfig.as_deref(),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshlet identity: {e}");
            return ExitCode::FAILURE;
        }
    };
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), &args.namespace);
    // Without an issuer there is nothing to serve: retry for a while (the chart may still be
    // creating the Secret), then give up and let the restart policy try again.
    let mut tries = 0;
    let (ca, seen) = loop {
        match read_issuer(&api, &args.issuer_secret, None, &args).await {
            Ok(Some(found)) => break found,
            Ok(None) => unreachable!("nothing was seen yet"),
            Err(e) if tries < 30 => {
                tries += 1;
                tracing::warn!(error = %e, "no issuer yet; retrying in 2s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => {
                eprintln!("meshlet identity: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let reviewer = Reviewer::new(client, &args.audience, &args.trust_domain);
    let authority = match args
        .me()
        .and_then(|me| Authority::new(ca, reviewer, me, args.server_names()))
    {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("meshlet identity: {e}");
            return ExitCode::from(2);
        }
    };
    // Bind both before serving either.
    let listener = match TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("meshlet identity: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let admin_listener = match TcpListener::bind(args.admin_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "meshlet identity: cannot listen on {}: {e}",
                args.admin_listen
            );
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    tokio::spawn(crate::program::stop_on_signal(stop.clone(), Duration::ZERO));
    tokio::spawn(maintain(
        authority.clone(),
        api,
        args.clone(),
        seen,
        stop.clone(),
    ));
    tokio::spawn(admin(admin_listener, authority.clone(), stop.clone()));
    tracing::info!(
        listen = %args.listen,
        admin = %args.admin_listen,
        trust_domain = %args.trust_domain,
        audience = %args.audience,
        "meshlet identity serving"
    );
    serve(listener, authority, stop).await;
    ExitCode::SUCCESS
}
