//! The app the end-to-end tests run in pods (the harness maps an image name to this binary).
//!
//! It serves HTTP/1.1 and h2c on every port in `LISTEN` (comma-separated, default `:8080`) on
//! all of the pod's addresses, and answers every request with its pod name (`POD_NAME`, else
//! the hostname) and port, so a test can tell which pod and port served a request:
//! `x-pod: <name>`, `x-port: <port>`, body `<name>:<port>`. `/healthz` answers 200.
//!
//! On SIGTERM it keeps serving for `SHUTDOWN_DELAY_MS` (default 1000) before exiting.
//!
//! `CALL=<url>` makes it also act as a client: `GET /call` requests that URL (host:port/path)
//! and returns the answer, so a test can show an app's outbound calls going through its sidecar.
//!
//! Knobs for resilience tests (they never touch `/healthz`, so the pod stays Ready, nor `/hits`):
//! - `FAIL_STATUS=<code>` answers every request with that status (an endpoint always failing
//!   while its readiness probe passes);
//! - `DELAY_MS=<ms>` delays every answer by that long;
//! - `/hits` answers (body) how many requests the pod has served on all its ports, not counting
//!   `/healthz` and `/hits`; every other answer carries `x-hits: <n>`, its own number in that
//!   count (1 for the first), so identical answers show one upstream request shared.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

async fn call(url: &str) -> Result<(u16, String), String> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", authority)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let rsp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = rsp.status().as_u16();
    let body = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let name = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_else(|| "unknown".into())
        .trim()
        .to_string();
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| ":8080".into());
    let call_url = std::env::var("CALL").ok();
    let fail_status: Option<u16> = std::env::var("FAIL_STATUS").ok().map(|v| {
        v.trim()
            .parse()
            .ok()
            .filter(|s| http::StatusCode::from_u16(*s).is_ok())
            .unwrap_or_else(|| {
                eprintln!("e2e-app: FAIL_STATUS={v:?} is not an HTTP status");
                std::process::exit(1)
            })
    });
    let delay = std::env::var("DELAY_MS").ok().map(|v| {
        Duration::from_millis(v.trim().parse().unwrap_or_else(|_| {
            eprintln!("e2e-app: DELAY_MS={v:?} is not a number of milliseconds");
            std::process::exit(1)
        }))
    });
    let hits = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for spec in listen.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr: SocketAddr = if let Some(port) = spec.strip_prefix(':') {
            format!("0.0.0.0:{port}").parse().expect("a port")
        } else {
            spec.parse().expect("an address")
        };
        let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| {
            eprintln!("e2e-app: cannot listen on {addr}: {e}");
            std::process::exit(1)
        });
        eprintln!("e2e-app {name}: listening on {addr}");
        let (name, call_url, hits) = (name.clone(), call_url.clone(), hits.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (name, call_url, hits) = (name.clone(), call_url.clone(), hits.clone());
                let port = addr.port();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (name, call_url, hits) = (name.clone(), call_url.clone(), hits.clone());
                        async move {
                            let path = req.uri().path();
                            let mut hit = None;
                            if path != "/healthz" && path != "/hits" {
                                hit = Some(hits.fetch_add(1, Ordering::SeqCst) + 1);
                                if let Some(d) = delay {
                                    tokio::time::sleep(d).await;
                                }
                            }
                            let (status, body) = match (path, &call_url, fail_status) {
                                ("/healthz", _, _) => (200, "ok".to_string()),
                                ("/hits", _, _) => (200, hits.load(Ordering::SeqCst).to_string()),
                                (_, _, Some(s)) => (s, format!("{name}:{port} failing")),
                                ("/call", Some(url), None) => match call(url).await {
                                    Ok(r) => r,
                                    Err(e) => (599, format!("call failed: {e}")),
                                },
                                _ => (200, format!("{name}:{port}")),
                            };
                            let mut rsp = http::Response::builder()
                                .status(status)
                                .header("x-pod", name.as_str())
                                .header("x-port", port.to_string());
                            if let Some(n) = hit {
                                rsp = rsp.header("x-hits", n.to_string());
                            }
                            Ok::<_, Infallible>(
                                rsp.body(Full::new(Bytes::from(body)))
                                    .expect("valid response"),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    term.recv().await;
    // Keep serving for a moment, as a well-behaved app (or a preStop sleep) does, so that
    // proxies see the endpoint leave before the process does.
    let delay: u64 = std::env::var("SHUTDOWN_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    eprintln!("e2e-app {name}: SIGTERM, exiting in {delay} ms");
    tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
}
