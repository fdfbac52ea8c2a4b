//! The webhook server: AdmissionReview v1 over TLS (rustls).
//!
//! - `POST /mutate`: an AdmissionReview v1 in, an AdmissionReview v1 out (kube's admission
//!   types), `allowed: true` always, with a JSON Patch (`patchType: JSONPatch`) when the pod is
//!   meshed and the reasons and annotation problems in `warnings`. A body that is not an
//!   AdmissionReview v1 with a request uid is answered 400 with the reason; an object that is not
//!   a Pod, or a Pod that cannot be read, is allowed unchanged with a warning: the webhook never
//!   blocks a pod.
//! - `GET /healthz`: 200 `ok`.
//! - `GET /metrics`: Prometheus text (`meshlet_inject_*`).
//!
//! The serving certificate is re-read when its files change (checked on each TLS handshake:
//! two `stat` calls), so a renewed Secret is picked up by new connections without a restart; a
//! half-written or mismatched pair is ignored (the previous one stays) until it is whole.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use json_patch::Patch;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND, Operation,
};
use kube::core::{DynamicObject, TypeMeta};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::patch::{self, InjectConfig, Outcome};

/// The API server sends at most 3 MiB objects; leave room for the review around it.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// The API server's default webhook timeout is 10 s; a handshake or request slower than this
/// is a client problem.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// `meshlet inject`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// The serving certificate chain (PEM); re-read when it changes.
    #[arg(long)]
    pub tls_cert: PathBuf,
    /// The serving certificate's private key (PEM); re-read when it changes.
    #[arg(long)]
    pub tls_key: PathBuf,
    /// The meshlet image injected as the sidecar (and as the init container without
    /// `--init-image`).
    #[arg(long, env = "MESHLET_INJECT_IMAGE", default_value_t = InjectConfig::default().image)]
    pub image: String,
    /// The init container's image (it needs iptables, which the minimal sidecar image lacks).
    #[arg(long, env = "MESHLET_INJECT_INIT_IMAGE")]
    pub init_image: Option<String>,
    /// The injected containers' imagePullPolicy (default: Kubernetes').
    #[arg(long)]
    pub image_pull_policy: Option<String>,
    /// Inject the sidecar as the first regular container with a postStart hook, for clusters
    /// without native sidecars (Kubernetes < 1.29).
    #[arg(long)]
    pub classic_sidecars: bool,
    /// A ConfigMap in the pod's namespace holding the proxy's config under `config.yaml`.
    #[arg(long)]
    pub proxy_config_map: Option<String>,
    /// Do not watch Namespaces (namespace opt-in then never applies; pod annotations still do).
    #[arg(long)]
    pub no_namespace_watch: bool,
    /// Log as JSON lines (one object per event) instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// After SIGTERM, keep accepting reviews this long before draining: the API server may
    /// still pick this pod for a moment after it began terminating, and with `failurePolicy:
    /// Ignore` a refused call is a pod created unmeshed. The chart sets 5s.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,
}

/// Looks a namespace up by name (for namespace-level opt-in).
pub type NamespaceLookup = Arc<dyn Fn(&str) -> Option<Namespace> + Send + Sync>;

/// The webhook's counters.
#[derive(Default)]
pub struct Metrics {
    injected: AtomicU64,
    skipped: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    fn skip(&self, reason: &str) {
        *self.skipped.lock().entry(reason.to_string()).or_default() += 1;
    }

    fn error(&self, kind: &'static str) {
        *self.errors.lock().entry(kind).or_default() += 1;
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut s = String::from(
            "# HELP meshlet_inject_injected_total Pods meshed.\n\
             # TYPE meshlet_inject_injected_total counter\n",
        );
        s += &format!(
            "meshlet_inject_injected_total {}\n",
            self.injected.load(Ordering::Relaxed)
        );
        s += "# HELP meshlet_inject_skipped_total Pods left alone, by reason.\n\
              # TYPE meshlet_inject_skipped_total counter\n";
        for (reason, n) in self.skipped.lock().iter() {
            s += &format!("meshlet_inject_skipped_total{{reason={reason:?}}} {n}\n");
        }
        s += "# HELP meshlet_inject_errors_total Requests that could not be handled normally.\n\
              # TYPE meshlet_inject_errors_total counter\n";
        for (kind, n) in self.errors.lock().iter() {
            s += &format!("meshlet_inject_errors_total{{kind={kind:?}}} {n}\n");
        }
        s
    }
}

/// The admission logic, apart from HTTP and TLS.
pub struct Webhook {
    pub config: InjectConfig,
    pub namespaces: NamespaceLookup,
    pub metrics: Metrics,
}

impl Webhook {
    pub fn new(config: InjectConfig, namespaces: NamespaceLookup) -> Self {
        Webhook {
            config,
            namespaces,
            metrics: Metrics::default(),
        }
    }

    /// Answers one AdmissionReview body: `Ok(the response review)`, or `Err(why)` when the
    /// body is not an AdmissionReview v1 with a request uid (a 400).
    pub fn review(&self, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, String> {
        let (request, object) =
            parse(body).inspect_err(|_| self.metrics.error("malformed_review"))?;
        let (patch, warnings) = self.mutation(&request, object);
        let mut response = AdmissionResponse::from(&request);
        if !warnings.is_empty() {
            response.warnings = Some(warnings);
        }
        if let Some(patch) = patch {
            // Only serializes the patch, which is made of JSON values: it cannot fail.
            response = response.with_patch(patch).expect("a JSON Patch serializes");
        }
        Ok(response.into_review())
    }

    /// The patch, if the pod is to be meshed, and the warnings for the API client.
    /// `object` is the request's object as sent: the pod is read from it, not from the
    /// `DynamicObject`, which can lose a field on the way (see `parse`).
    fn mutation(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        object: Option<Value>,
    ) -> (Option<Patch>, Vec<String>) {
        let kind = &request.kind;
        if !kind.group.is_empty() || kind.kind != "Pod" {
            self.metrics.error("unknown_kind");
            let (group, version, k) = (&kind.group, &kind.version, &kind.kind);
            let why =
                format!("meshlet inject: {group}/{version} {k:?} is not a Pod; left unchanged");
            return (None, vec![why]);
        }
        if request
            .sub_resource
            .as_deref()
            .is_some_and(|s| !s.is_empty())
        {
            self.metrics.skip("subresource");
            return (None, Vec::new());
        }
        if request.operation != Operation::Create {
            self.metrics.skip("not a create");
            return (None, Vec::new());
        }
        let Some(object) = object.filter(|o| !o.is_null()) else {
            self.metrics.error("unparsable_pod");
            let why = "meshlet inject: the request has no object; not meshed";
            return (None, vec![why.into()]);
        };
        let pod: Pod = match serde_json::from_value(object) {
            Ok(p) => p,
            Err(e) => {
                self.metrics.error("unparsable_pod");
                let why = format!("meshlet inject: cannot read the pod ({e}); not meshed");
                return (None, vec![why]);
            }
        };
        let ns_name = request
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or("");
        let namespace = if ns_name.is_empty() {
            None
        } else {
            (self.namespaces)(ns_name)
        };
        match patch::inject(&pod, namespace.as_ref(), &self.config) {
            Outcome::Patch(ops, warnings) => {
                self.metrics.injected.fetch_add(1, Ordering::Relaxed);
                let warnings = warnings
                    .into_iter()
                    .map(|w| format!("meshlet inject: {w}"))
                    .collect();
                (Some(ops), warnings)
            }
            Outcome::Skip(reason) => {
                self.metrics.skip(&reason);
                // Not opting in is the normal case for most pods: no noise for it.
                if reason == patch::SKIP_NOT_OPTED_IN {
                    (None, Vec::new())
                } else {
                    (None, vec![format!("meshlet inject: not meshed: {reason}")])
                }
            }
        }
    }

    /// One HTTP request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/mutate") => {
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        self.metrics.error("malformed_review");
                        return text(
                            StatusCode::BAD_REQUEST,
                            format!("cannot read the request body: {e}\n"),
                        );
                    }
                };
                match self.review(&body) {
                    Ok(v) => {
                        let mut r = Response::new(Full::new(Bytes::from(
                            serde_json::to_vec(&v).unwrap_or_default(),
                        )));
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("application/json"),
                        );
                        r
                    }
                    Err(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
                }
            }
            (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            (&Method::GET, "/metrics") => text(StatusCode::OK, self.metrics.render()),
            (_, "/mutate") => text(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST an AdmissionReview to /mutate\n".into(),
            ),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: POST /mutate, GET /healthz, GET /metrics\n".into(),
            ),
        }
    }
}

/// The request of an AdmissionReview v1 body and its object as sent, or why there is none.
///
/// The object is kept as JSON because `DynamicObject` is not a faithful copy of it: its
/// flattened `TypeMeta` takes `apiVersion` and, when `kind` is missing, drops both, so an
/// object of `apiVersion: v0` without a kind would read as a Pod. The fuzz target found it.
fn parse(body: &[u8]) -> Result<(AdmissionRequest<DynamicObject>, Option<Value>), String> {
    // JSON is UTF-8 (RFC 8259). serde skips the fields it ignores without checking them, so a
    // body with invalid bytes there would otherwise pass as a review.
    if let Err(e) = std::str::from_utf8(body) {
        return Err(format!("the body is not JSON: not UTF-8 ({e})"));
    }
    // The type first, so that another kind or version (say v1beta1) is named as such rather
    // than by the first of its fields that v1 lacks.
    let mut body: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let types: TypeMeta = TypeMeta::deserialize(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            format!("expected an admission.k8s.io/v1 AdmissionReview: {e}")
        }
        _ => format!("the body is not JSON: {e}"),
    })?;
    if types.api_version != META_API_VERSION_V1 || types.kind != META_KIND {
        return Err(format!(
            "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion {:?} kind {:?}",
            types.api_version, types.kind
        ));
    }
    let object = body.pointer_mut("/request/object").map(Value::take);
    let review: AdmissionReview<DynamicObject> = serde_path_to_error::deserialize(&body)
        .map_err(|e| format!("the AdmissionReview is not valid: {e}"))?;
    let request: AdmissionRequest<_> = review
        .try_into()
        .map_err(|_| "the AdmissionReview has no request")?;
    if request.uid.is_empty() {
        return Err("the AdmissionReview has no request.uid".into());
    }
    Ok((request, object))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The serving certificate, re-read from its files when they change.
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<(Option<Stamp>, Arc<CertifiedKey>)>,
}

/// What identifies a version of the two files: modification time, size and inode of each (a
/// Secret volume swaps a symlink, which changes the inode).
type Stamp = [(SystemTime, u64, u64); 2];

impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

impl CertReloader {
    /// Loads the pair; an error names the file and the problem.
    pub fn new(cert: &Path, key: &Path) -> Result<Arc<Self>, String> {
        let stamp = stamp(cert, key);
        let loaded = load(cert, key)?;
        Ok(Arc::new(CertReloader {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            state: Mutex::new((stamp, loaded)),
        }))
    }

    /// The current pair, re-read first if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let now = stamp(&self.cert, &self.key);
        let mut state = self.state.lock();
        if now.is_some() && now != state.0 {
            match load(&self.cert, &self.key) {
                Ok(k) => {
                    tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                    *state = (now, k);
                }
                // Maybe half-written: keep the old pair and look again at the next handshake.
                Err(e) => tracing::warn!(error = %e, "cannot reload the serving certificate"),
            }
        }
        state.1.clone()
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn stamp(cert: &Path, key: &Path) -> Option<Stamp> {
    let one = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len(), m.ino()))
    };
    Some([one(cert)?, one(key)?])
}

fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: not a PEM private key: {e}", key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| format!("{}: unsupported private key: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        format!(
            "{} and {} do not go together: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(ck))
}

/// The TLS config serving `certs`' current pair (HTTP/1.1).
pub fn tls_config(certs: Arc<CertReloader>) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves the webhook on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    webhook: Arc<Webhook>,
    shutdown: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    // In-flight reviews finish (bounded by IO_TIMEOUT) before serve returns and the process
    // exits: a review cut short is a pod created unmeshed.
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let Some((stream, peer)) = crate::socket::accept(&listener, &shutdown, "webhook").await
        else {
            connections.close();
            let _ = tokio::time::timeout(IO_TIMEOUT, connections.wait()).await;
            return;
        };
        let acceptor = acceptor.clone();
        let webhook = webhook.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    webhook.metrics.error("tls");
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    webhook.metrics.error("tls");
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let webhook = webhook.clone();
                async move { Ok::<_, Infallible>(webhook.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IO_TIMEOUT)
                .serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// Namespaces from the cluster: a watch kept in a local store.
async fn namespace_watch() -> Result<NamespaceLookup, String> {
    use futures_util::StreamExt;
    use kube::runtime::reflector::{self, ObjectRef};
    use kube::runtime::{WatchStreamExt, watcher};

    let client = crate::discovery::kubernetes::KubeResolver::client(None).await?;
    let api: kube::Api<Namespace> = kube::Api::all(client);
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .boxed();
    tokio::spawn(async move {
        stream
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "namespace watch failing; retrying");
                }
            })
            .await;
    });
    // Pods created before the first list would miss their namespace's opt-in: wait for it a
    // little (the watch keeps retrying in the background either way).
    if tokio::time::timeout(IO_TIMEOUT, store.wait_until_ready())
        .await
        .is_err()
    {
        tracing::warn!("Namespaces not listed yet; namespace opt-in applies once they are");
    }
    Ok(Arc::new(move |name: &str| {
        store
            .get(&ObjectRef::<Namespace>::new(name))
            .map(|ns| (*ns).clone())
    }))
}

/// `meshlet inject`: runs the webhook until SIGTERM or SIGINT.
pub fn main(args: InjectArgs) -> ExitCode {
    crate::program::init_logs(args.log_json);
    let certs = match CertReloader::new(&args.tls_cert, &args.tls_key) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshlet inject: {e}");
            return ExitCode::from(2);
        }
    };
    let tls = match tls_config(certs) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("meshlet inject: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = InjectConfig {
        image: args.image.clone(),
        init_image: args.init_image.clone(),
        image_pull_policy: args.image_pull_policy.clone(),
        native_sidecars: !args.classic_sidecars,
        version: crate::VERSION.to_string(),
        proxy_config_map: args.proxy_config_map.clone(),
    };
    let runtime = match crate::program::runtime("inject") {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let namespaces: NamespaceLookup = if args.no_namespace_watch {
            Arc::new(|_: &str| None)
        } else {
            match namespace_watch().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "cannot watch Namespaces: namespace opt-in is off, pod annotations still apply"
                    );
                    Arc::new(|_: &str| None)
                }
            }
        };
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("meshlet inject: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(listen = %args.listen, image = %config.image, "meshlet inject serving /mutate");
        let webhook = Arc::new(Webhook::new(config, namespaces));
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::program::stop_on_signal(
            shutdown.clone(),
            args.shutdown_delay,
        ));
        serve(listener, tls, webhook, shutdown).await;
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn webhook() -> Webhook {
        let ns: Namespace = serde_json::from_value(json!({
            "metadata": {"name": "meshed", "annotations": {"meshlet.dev/inject": "enabled"}}
        }))
        .unwrap();
        Webhook::new(
            InjectConfig::default(),
            Arc::new(move |n: &str| (n == "meshed").then(|| ns.clone())),
        )
    }

    fn review(namespace: &str, kind: &str, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "namespace": namespace,
                "object": object,
            }
        }))
        .unwrap()
    }

    /// The response to a valid review.
    fn respond(w: &Webhook, body: &[u8]) -> AdmissionResponse {
        w.review(body).unwrap().response.unwrap()
    }

    #[test]
    fn a_body_that_is_not_utf8_is_not_a_review() {
        let w = webhook();
        let pod = json!({"metadata": {"name": "p", "annotations": {"x": "y"}},
                         "spec": {"containers": [{"name": "a"}]}});
        let mut body = review("meshed", "Pod", pod);
        let at = body.windows(3).position(|b| b == b"\"x\"").unwrap() + 1;
        body[at] = 0xff;
        let e = w.review(&body).unwrap_err();
        assert!(e.contains("not JSON") && e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn namespace_opt_in_and_reasons() {
        let w = webhook();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}});
        let meshed = w.review(&review("meshed", "Pod", pod.clone())).unwrap();
        let wire = serde_json::to_value(&meshed).unwrap();
        assert_eq!(wire["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(wire["response"]["uid"], "u-1");
        assert_eq!(wire["response"]["allowed"], true);
        assert_eq!(wire["response"]["patchType"], "JSONPatch");
        assert!(meshed.response.unwrap().patch.is_some());
        let r = respond(&w, &review("plain", "Pod", pod));
        assert!(
            r.allowed && r.patch.is_none() && r.warnings.is_none(),
            "{r:?}"
        );
        let r = respond(&w, &review("meshed", "Service", json!({})));
        assert!(r.allowed);
        assert!(r.warnings.unwrap()[0].contains("not a Pod"));
        let r = respond(&w, &review("meshed", "Pod", json!({"spec": 5})));
        assert!(r.warnings.unwrap()[0].contains("cannot read the pod"));
        // Read as a DynamicObject, this lost its apiVersion and passed as a Pod (fuzz find).
        let v0 = json!({"apiVersion": "v0", "metadata": {"name": "p"},
                        "spec": {"containers": [{"name": "a"}]}});
        let r = respond(&w, &review("meshed", "Pod", v0));
        assert!(r.patch.is_none(), "{r:?}");
        let why = &r.warnings.unwrap()[0];
        assert!(
            why.contains("cannot read the pod") && why.contains("v0"),
            "{why}"
        );
        assert!(w.review(b"{").unwrap_err().contains("not JSON"));
        assert!(
            w.review(b"{\"kind\":\"Pod\"}")
                .unwrap_err()
                .contains("AdmissionReview")
        );
        let v1beta1 = br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#;
        assert!(w.review(v1beta1).unwrap_err().contains("v1beta1"));
        let m = w.metrics.render();
        assert!(m.contains("meshlet_inject_injected_total 1\n"), "{m}");
        assert!(
            m.contains("meshlet_inject_skipped_total{reason=\"not opted in\"} 1\n"),
            "{m}"
        );
        assert!(
            m.contains("meshlet_inject_errors_total{kind=\"unknown_kind\"} 1\n"),
            "{m}"
        );
    }
}
