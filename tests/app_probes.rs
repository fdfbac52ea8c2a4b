//! App probe proxying: `GET /app-health/<container>/<probe>` on the admin server runs the app's
//! original kubelet probe (from `MESHLET_APP_PROBES`) against real backends on loopback, with
//! kubelet's semantics: HTTP 200-399 passes, the probe timeout bounds the attempt, headers and
//! named ports are honoured, tcpSocket connects, grpc asks grpc.health.v1 and wants SERVING.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet::app::App;
use meshlet::config::Config;
use meshlet::ops::health::probes::AppProbes;
use support::{Meshlet, admin_get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic_prost::ProstCodec;
use tower::ServiceExt;

/// Starts meshlet in-process with `probes` as `MESHLET_APP_PROBES`.
async fn meshlet_with(probes: &str) -> Meshlet {
    let config = Config::parse(
        "test.yaml",
        "admin:\n  listen: 127.0.0.1:0\nshutdown_grace: 1s\n",
    )
    .expect("valid config");
    let mut app = App::bind(config).expect("bind");
    app.set_app_probes(Some(AppProbes::parse(probes).expect("valid probes")));
    let m = Meshlet::spawn(app);
    // Not `/ready`: it includes the app's readyz probes, which some tests make fail. Wait
    // for the proxy's own readiness, as `/health` reports it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, body)) = admin_get(m.addrs.admin, "/health").await {
            let h: serde_json::Value = serde_json::from_str(&body).expect("/health is JSON");
            if h["proxy"]["ready"] == true {
                break;
            }
        }
        assert!(Instant::now() < deadline, "meshlet not ready in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    m
}

async fn probe(m: &Meshlet, container: &str, probe: &str) -> (u16, String) {
    admin_get(m.addrs.admin, &format!("/app-health/{container}/{probe}"))
        .await
        .expect("admin answers")
}

/// Stops serving when dropped.
struct Server {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accepts connections on loopback and hands each to `serve` until dropped.
fn accept_loop<F, Fut>(listener: TcpListener, serve: F) -> Server
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = s.cancelled() => return,
                r = listener.accept() => r.unwrap(),
            };
            tokio::spawn(serve(stream));
        }
    });
    Server { addr, stop }
}

/// The app's HTTP side. `/status/<n>` answers n; `/slow` answers after 3 s; `/header` answers
/// 200 only with `x-probe-token: secret`; `/host` 200 only for `Host: app.example`; `/ua` 200
/// only for a kube-probe User-Agent.
async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (status, body) = if let Some(n) = path.strip_prefix("/status/") {
        (n.parse().unwrap(), format!("answered {n}"))
    } else if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
        (200, "late".into())
    } else if path == "/header" {
        if h("x-probe-token") == "secret" {
            (200, "token ok".into())
        } else {
            (401, "no token".into())
        }
    } else if path == "/host" {
        if h("host") == "app.example" {
            (200, "host ok".into())
        } else {
            (400, format!("host was {:?}", h("host")))
        }
    } else if path == "/ua" {
        if h("user-agent").starts_with("kube-probe/") && h("accept") == "*/*" {
            (200, "ua ok".into())
        } else {
            (400, format!("ua was {:?}", h("user-agent")))
        }
    } else {
        (404, "no such path".into())
    };
    Ok(Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .body(Full::new(Bytes::from(body)))
        .unwrap())
}

async fn http_app() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    accept_loop(listener, |stream| async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service_fn(answer))
            .await;
    })
}

fn http_probe(port: u16, path: &str) -> String {
    format!(r#"{{"httpGet": {{"port": {port}, "path": "{path}"}}, "timeoutSeconds": 1}}"#)
}

#[tokio::test]
async fn http_get_passes_on_200_to_399_and_fails_otherwise() {
    let app = http_app().await;
    let port = app.addr.port();
    let probes = format!(
        r#"{{"ok": {{"livez": {}, "readyz": {}}}, "bad": {{"livez": {}, "readyz": {}}}}}"#,
        http_probe(port, "/status/200"),
        http_probe(port, "/status/399"),
        http_probe(port, "/status/400"),
        http_probe(port, "/status/500"),
    );
    let m = meshlet_with(&probes).await;

    let (status, body) = probe(&m, "ok", "livez").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("HTTP 200 OK"), "{body}");
    let (status, body) = probe(&m, "ok", "readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("HTTP 399"), "{body}");

    let (status, body) = probe(&m, "bad", "livez").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("HTTP 400 Bad Request: answered 400"),
        "{body}"
    );
    let (status, body) = probe(&m, "bad", "readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("HTTP 500 Internal Server Error"), "{body}");

    // Every probe run is counted by result, with its duration.
    let text = m.metrics().await;
    let sample = |line: &str| {
        text.lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    // (/health, polled at startup, runs every probe too.)
    assert!(
        sample(r#"meshlet_app_probes_total{container="bad",probe="livez",result="failure"}"#)
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        sample(r#"meshlet_app_probes_total{container="ok",probe="livez",result="success"}"#)
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        text.contains("meshlet_app_probe_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn a_slow_app_fails_after_the_probe_timeout() {
    let app = http_app().await;
    let probes = format!(
        r#"{{"app": {{"livez": {}}}}}"#,
        http_probe(app.addr.port(), "/slow")
    );
    let m = meshlet_with(&probes).await;
    let started = Instant::now();
    let (status, body) = probe(&m, "app", "livez").await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("no answer within the probe timeout (1s)"),
        "{body}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1800),
        "took {took:?}"
    );
}

#[tokio::test]
async fn custom_headers_host_and_named_ports() {
    let app = http_app().await;
    let port = app.addr.port();
    let probes = format!(
        r#"{{
          "app": {{
            "ports": {{"web": {port}}},
            "livez": {{"httpGet": {{"port": "web", "path": "/header",
                       "httpHeaders": [{{"name": "X-Probe-Token", "value": "secret"}}]}}}},
            "readyz": {{"httpGet": {{"port": {port}, "path": "/host",
                       "httpHeaders": [{{"name": "Host", "value": "app.example"}}]}}}},
            "startupz": {{"httpGet": {{"port": "web", "path": "ua"}}}}
          }},
          "nohdr": {{"livez": {{"httpGet": {{"port": {port}, "path": "/header"}}}}}}
        }}"#
    );
    let m = meshlet_with(&probes).await;
    for p in ["livez", "readyz", "startupz"] {
        let (status, body) = probe(&m, "app", p).await;
        assert_eq!(status, 200, "{p}: {body}");
    }
    let (status, body) = probe(&m, "nohdr", "livez").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("401 Unauthorized: no token"), "{body}");
}

#[tokio::test]
async fn tcp_socket_open_passes_and_closed_fails() {
    let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let probes = format!(
        r#"{{"app": {{"ports": {{"db": {}}}, "livez": {{"tcpSocket": {{"port": "db"}}}},
                     "readyz": {{"tcpSocket": {{"port": {closed_port}}}}}}}}}"#,
        open.local_addr().unwrap().port()
    );
    let m = meshlet_with(&probes).await;
    let (status, body) = probe(&m, "app", "livez").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("connected"), "{body}");
    let (status, body) = probe(&m, "app", "readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot connect"), "{body}");
}

#[tokio::test]
async fn unknown_containers_and_probes_are_404() {
    let app = http_app().await;
    let probes = format!(
        r#"{{"app": {{"livez": {}}}}}"#,
        http_probe(app.addr.port(), "/status/200")
    );
    let m = meshlet_with(&probes).await;
    for path in [
        "/app-health/app/readyz",
        "/app-health/other/livez",
        "/app-health/app/nope",
        "/app-health/app",
    ] {
        let (status, body) = admin_get(m.addrs.admin, path).await.unwrap();
        assert_eq!(status, 404, "{path}: {body}");
    }
}

// ===== HTTPS: a self-signed certificate, not verified (as kubelet does) =====

const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBfjCCASOgAwIBAgIUAQ476hysjWJcK2kXj+MWIzU4bGkwCgYIKoZIzj0EAwIw
EzERMA8GA1UEAwwIYXBwLnRlc3QwIBcNMjYxMTI4MTEwODA2WhgPMjEyNjExMDQx
MTA4MDZaMBMxETAPBgNVBAMMCGFwcC50ZXN0MFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAE/T6oWQJ0iTWEIqc+MFbgeWnkL+EBmLMPYxJremOufgYEQ3lijW2LI3DG
BsLXwuSIYXxiGWZ7wvveFLFJpNms2KNTMFEwHQYDVR0OBBYEFEd64MZDT+BZt+Cl
+Rxs5SDtHcoyMB8GA1UdIwQYMBaAFEd64MZDT+BZt+Cl+Rxs5SDtHcoyMA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSQAwRgIhALgx/AtUxG7YyxqXO3kTlkNX
/78xMzQEzecFcKmjyT2gAiEAmf2xLcEhLJimPkJciddJ0ezN+HD759CiytIqdmrw
uzw=
-----END CERTIFICATE-----
";

const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKuhLQw7Nm+Dv1Ilz
rrKBxE554khPLLDOcMORM6/fuCmhRANCAAT9PqhZAnSJNYQipz4wVuB5aeQv4QGY
sw9jEmt6Y65+BgRDeWKNbYsjcMYGwtfC5IhhfGIZZnvC+94UsUmk2azY
-----END PRIVATE KEY-----
";

async fn https_app() -> Server {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(KEY.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    accept_loop(listener, move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service_fn(answer))
                .await;
        }
    })
}

#[tokio::test]
async fn https_skips_certificate_verification() {
    let tls = https_app().await;
    let plain = http_app().await;
    let probes = format!(
        r#"{{"app": {{
            "livez": {{"httpGet": {{"port": {}, "path": "/status/204", "scheme": "HTTPS"}}}},
            "readyz": {{"httpGet": {{"port": {}, "path": "/status/500", "scheme": "HTTPS"}}}},
            "startupz": {{"httpGet": {{"port": {}, "path": "/status/200", "scheme": "HTTPS"}}}}
        }}}}"#,
        tls.addr.port(),
        tls.addr.port(),
        plain.addr.port(),
    );
    let m = meshlet_with(&probes).await;
    let (status, body) = probe(&m, "app", "livez").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("https://"), "{body}");
    let (status, body) = probe(&m, "app", "readyz").await;
    assert_eq!(status, 503, "{body}");
    // A plaintext app behind an HTTPS probe fails the handshake, and says so.
    let (status, body) = probe(&m, "app", "startupz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("TLS handshake failed"), "{body}");
}

// ===== gRPC: a real grpc.health.v1 server on tonic =====

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// grpc.health.v1.Health/Check: "" and "up" are SERVING, "down" is NOT_SERVING, anything else
/// NOT_FOUND (as the reference implementation answers an unknown service).
#[derive(Clone)]
struct Health;

impl tower::Service<Request<Incoming>> for Health {
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        Box::pin(async move {
            if req.uri().path() != "/grpc.health.v1.Health/Check" {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<
                HealthCheckResponse,
                HealthCheckRequest,
            >::default());
            let svc = tower::service_fn(|r: tonic::Request<HealthCheckRequest>| async move {
                let status = match r.into_inner().service.as_str() {
                    "" | "up" => 1,
                    "down" => 2,
                    other => return Err(Status::not_found(format!("unknown service {other}"))),
                };
                Ok(tonic::Response::new(HealthCheckResponse { status }))
            });
            Ok(grpc.unary(svc, req).await)
        })
    }
}

async fn grpc_app() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    accept_loop(listener, |stream| async move {
        let _ = stream.set_nodelay(true);
        let svc = service_fn(|req| Health.oneshot(req));
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    })
}

#[tokio::test]
async fn grpc_serving_passes_and_not_serving_fails() {
    let app = grpc_app().await;
    let port = app.addr.port();
    let closed_port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let probes = format!(
        r#"{{
          "a": {{"livez": {{"grpc": {{"port": {port}}}}},
                "readyz": {{"grpc": {{"port": {port}, "service": "up"}}}},
                "startupz": {{"grpc": {{"port": {port}, "service": "down"}}}}}},
          "b": {{"livez": {{"grpc": {{"port": {port}, "service": "nope"}}}},
                "readyz": {{"grpc": {{"port": {closed_port}}}}}}}
        }}"#
    );
    let m = meshlet_with(&probes).await;
    for p in ["livez", "readyz"] {
        let (status, body) = probe(&m, "a", p).await;
        assert_eq!(status, 200, "{p}: {body}");
        assert!(body.ends_with("SERVING\n"), "{p}: {body}");
    }
    let (status, body) = probe(&m, "a", "startupz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("NOT_SERVING"), "{body}");
    let (status, body) = probe(&m, "b", "livez").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("NOT_FOUND: unknown service nope"), "{body}");
    let (status, body) = probe(&m, "b", "readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cannot connect"), "{body}");
}

// ===== startup errors =====

fn run_with_probes(value: &str) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshlet"))
        .arg("proxy")
        .env_remove("MESHLET_CONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("MESHLET_APP_PROBES", value)
        .output()
        .expect("run meshlet");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn malformed_probe_json_is_a_clear_startup_error() {
    let (code, stderr) = run_with_probes(r#"{"app": {"livez": {"httpGet": }}}"#);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("meshlet: MESHLET_APP_PROBES: invalid JSON at app.livez.httpGet: "),
        "{stderr}"
    );
    assert!(stderr.contains("line 1 column"), "{stderr}");

    let (code, stderr) = run_with_probes(r#"{"app": {"readyz": {"exec": {"command": ["true"]}}}}"#);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("container \"app\": readyz: exec probes are not supported"),
        "{stderr}"
    );

    let (code, stderr) = run_with_probes(r#"{"app": {"livez": {"httpGet": {"port": "http"}}}}"#);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("httpGet.port: \"http\" is not a named port"),
        "{stderr}"
    );
}
