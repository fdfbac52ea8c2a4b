//! `meshlet inject` over real TLS: a test CA and serving certificate from rcgen, the webhook on
//! loopback, a hyper client trusting the CA.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshlet::inject::InjectConfig;
use meshlet::inject::server::{CertReloader, Webhook, serve, tls_config};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, RootCertStore, pki_types::CertificateDer, pki_types::ServerName};
use tokio_util::sync::CancellationToken;

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "meshlet test CA");
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A serving certificate for localhost signed by `ca`: (cert PEM, key PEM, cert DER).
fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, cn: &str) -> (String, String, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

/// Replaces a file the way a Secret volume does: write aside, then rename over.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Server {
    addr: SocketAddr,
    roots: Arc<RootCertStore>,
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    first_cert: Vec<u8>,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> Server {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, der) = leaf(&ca, "webhook-1");
    std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), key).unwrap();
    let certs =
        CertReloader::new(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
    let tls = tls_config(certs).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let webhook = Arc::new(Webhook::new(
        InjectConfig::default(),
        Arc::new(|_: &str| None),
    ));
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, tls, webhook, stop.clone()));
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
    Server {
        addr,
        roots: Arc::new(roots),
        dir,
        ca,
        first_cert: der,
        stop,
    }
}

/// One request on a new TLS connection: (status, body, the server's certificate).
async fn call(s: &Server, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>, Vec<u8>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(s.roots.clone())
        .with_no_client_auth();
    let tcp = TcpStream::connect(s.addr).await.unwrap();
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the test CA");
    let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let rsp = sender.send_request(req).await.unwrap();
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, body, peer)
}

fn review(annotations: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0d9d2b6c-1111-4c3a-9a57-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "namespace": "default",
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web", "namespace": "default", "annotations": annotations},
                "spec": {"containers": [{
                    "name": "web",
                    "image": "nginx",
                    "readinessProbe": {"httpGet": {"path": "/", "port": 80}}
                }]}
            }
        }
    }))
    .unwrap()
}

#[tokio::test]
async fn annotated_pod_gets_the_patch() {
    let s = start().await;
    let body = review(json!({"meshlet.dev/inject": "enabled", "meshlet.dev/proxy-cpu": "lots"}));
    let (status, body, peer) = call(&s, "POST", "/mutate", body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(peer, s.first_cert);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    let r = &v["response"];
    assert_eq!(r["uid"], "0d9d2b6c-1111-4c3a-9a57-000000000001");
    assert_eq!(r["allowed"], true);
    assert_eq!(r["patchType"], "JSONPatch");
    // kube's AdmissionResponse sends the patch's bytes as a JSON array of numbers, which the API
    // server's decoder reads into the same []byte as the documented base64 string.
    let patch: Vec<u8> = serde_json::from_value(r["patch"].clone()).unwrap();
    let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
    let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"/spec/initContainers"), "{paths:?}");
    assert!(
        paths.contains(&"/spec/containers/0/readinessProbe"),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/metadata/annotations/meshlet.dev~1injected"),
        "{paths:?}"
    );
    let warnings = r["warnings"].to_string();
    assert!(
        warnings.contains("meshlet.dev/proxy-cpu") && warnings.contains("lots"),
        "{warnings}"
    );

    let (status, body, _) = call(&s, "GET", "/metrics", Vec::new()).await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8(body).unwrap();
    assert!(
        metrics.contains("meshlet_inject_injected_total 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn pod_without_the_annotation_is_allowed_unchanged() {
    let s = start().await;
    let (status, body, _) = call(&s, "POST", "/mutate", review(json!({}))).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["response"],
        json!({"uid": "0d9d2b6c-1111-4c3a-9a57-000000000001", "allowed": true, "status": {}})
    );
    let body = review(json!({"meshlet.dev/inject": "disabled"}));
    let (_, body, _) = call(&s, "POST", "/mutate", body).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v["response"].get("patch").is_none());
    assert_eq!(
        v["response"]["warnings"][0],
        "meshlet inject: not meshed: opted out"
    );
    let (status, body, _) = call(&s, "GET", "/healthz", Vec::new()).await;
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
}

#[tokio::test]
async fn malformed_review_is_a_400() {
    let s = start().await;
    let (status, body, _) = call(&s, "POST", "/mutate", b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("not JSON"));
    let wrong = serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Pod"})).unwrap();
    let (status, body, _) = call(&s, "POST", "/mutate", wrong).await;
    assert_eq!(status, 400);
    let text = String::from_utf8_lossy(&body).to_string();
    assert!(
        text.contains("admission.k8s.io/v1 AdmissionReview"),
        "{text}"
    );
    let no_uid = serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}
    }))
    .unwrap();
    let (status, body, _) = call(&s, "POST", "/mutate", no_uid).await;
    assert_eq!(status, 400);
    let text = String::from_utf8_lossy(&body).to_string();
    assert!(text.contains("request: missing field `uid`"), "{text}");
    // Still serving.
    let (status, _, _) = call(&s, "GET", "/healthz", Vec::new()).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_new_connections() {
    let s = start().await;
    let (_, _, peer) = call(&s, "GET", "/healthz", Vec::new()).await;
    assert_eq!(peer, s.first_cert);

    let (cert, key, der) = leaf(&s.ca, "webhook-2");
    assert_ne!(der, s.first_cert);
    replace(&s.dir.path().join("tls.key"), &key);
    replace(&s.dir.path().join("tls.crt"), &cert);
    let (status, _, peer) = call(&s, "GET", "/healthz", Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(peer, der, "the new certificate is served");

    // A broken file does not take the webhook down: the last good pair stays.
    replace(
        &s.dir.path().join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnope\n",
    );
    let (status, _, peer) = call(&s, "GET", "/healthz", Vec::new()).await;
    assert_eq!(status, 200);
    assert_eq!(peer, der);
}

/// The process: after SIGTERM it keeps serving for `--shutdown-delay`, then exits 0.
#[tokio::test]
async fn sigterm_keeps_serving_for_the_shutdown_delay() {
    let mut s = start().await;
    // The in-process server above only lends its CA and certificate files.
    s.stop.cancel();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshlet"))
        .args(["inject", "--no-namespace-watch", "--shutdown-delay", "1s"])
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg("--tls-cert")
        .arg(s.dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(s.dir.path().join("tls.key"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    s.addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while TcpStream::connect(s.addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "meshlet inject never listened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // SAFETY: kill(2) on the child this test started and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let signalled = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, _, _) = call(
        &s,
        "POST",
        "/mutate",
        review(json!({"meshlet.dev/inject": "enabled"})),
    )
    .await;
    assert_eq!(
        status, 200,
        "a review 300 ms after SIGTERM is still answered"
    );
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            signalled.elapsed() < std::time::Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= std::time::Duration::from_millis(950),
        "exited {took:?} after SIGTERM, before the 1 s delay"
    );
}
