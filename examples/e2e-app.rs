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
//! `GET /burst?n=<N>&c=<C>` (default 100 and 4; at most 10000 and 64) makes N GETs of that URL
//! (with `x-burst: 1`) from C workers, each over one HTTP/1.1 keep-alive connection (a new one
//! after an error), and answers 200 with one line per distinct body of the 2xx answers,
//! `ok <body> <count>`, then `failed <count>` and, if any failed, `first_error <status> <body>`
//! or `first_error <error>` for the first failure (each request gets 10 s). Without `CALL`,
//! `/burst` answers 400.
//!
//! Knobs for resilience tests (they never touch `/healthz`, so the pod stays Ready, nor `/hits`
//! and `/burst`):
//! - `FAIL_STATUS=<code>` answers every request with that status (an endpoint always failing
//!   while its readiness probe passes);
//! - `DELAY_MS=<ms>` delays every answer by that long;
//! - `/hits` answers (body) how many requests the pod has served on all its ports, not counting
//!   `/healthz`, `/hits` and `/burst`; every other answer carries `x-hits: <n>`, its own number
//!   in that count (1 for the first), so identical answers show one upstream request shared.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

async fn call(url: &str) -> Result<(u16, String), String> {
    let (authority, path) = split_url(url);
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

/// `http://authority/path` (the scheme optional) as (authority, path).
fn split_url(url: &str) -> (&str, &str) {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    (authority, if path.is_empty() { "/" } else { path })
}

/// What `/burst` gathered.
#[derive(Default)]
struct BurstTally {
    ok: BTreeMap<String, u64>,
    failed: u64,
    first_error: Option<String>,
}

impl BurstTally {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        self.first_error.get_or_insert(what);
    }
}

/// One line of text: newlines and runs of whitespace become one space; at most 200 chars.
fn one_line(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    s.chars().take(200).collect()
}

/// The `n` and `c` of `/burst`'s query, defaulted and capped.
fn burst_params(query: Option<&str>) -> (u64, usize) {
    let (mut n, mut c) = (100u64, 4usize);
    for (k, v) in query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
    {
        match k {
            "n" => n = v.parse().unwrap_or(n),
            "c" => c = v.parse().unwrap_or(c),
            _ => {}
        }
    }
    (n.min(10_000), c.clamp(1, 64))
}

/// `/burst`: `n` GETs of `url` from `c` workers, each keeping one connection alive.
async fn burst(url: &str, n: u64, c: usize) -> String {
    let (authority, path) = split_url(url);
    let remaining = Arc::new(AtomicU64::new(n));
    let tally = Arc::new(Mutex::new(BurstTally::default()));
    let mut workers = Vec::new();
    for _ in 0..c.min(n as usize) {
        let (authority, path) = (authority.to_string(), path.to_string());
        let (remaining, tally) = (remaining.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            let mut conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
            // Take a ticket per request until none are left.
            while remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1))
                .is_ok()
            {
                let attempt = async {
                    // A connection the server closed is replaced before sending, not counted.
                    let reuse = match conn.take() {
                        Some(mut s) => s.ready().await.is_ok().then_some(s),
                        None => None,
                    };
                    let mut sender = match reuse {
                        Some(s) => s,
                        None => {
                            let stream = TcpStream::connect(authority.as_str())
                                .await
                                .map_err(|e| format!("connect {authority}: {e}"))?;
                            let (mut s, c) =
                                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                                    .await
                                    .map_err(|e| format!("handshake: {e}"))?;
                            tokio::spawn(c);
                            s.ready().await.map_err(|e| format!("handshake: {e}"))?;
                            s
                        }
                    };
                    let req = http::Request::get(path.as_str())
                        .header("host", authority.as_str())
                        .header("x-burst", "1")
                        .body(Full::new(Bytes::new()))
                        .map_err(|e| e.to_string())?;
                    let rsp = sender
                        .send_request(req)
                        .await
                        .map_err(|e| format!("request: {e}"))?;
                    let status = rsp.status().as_u16();
                    let body = rsp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| format!("body: {e}"))?
                        .to_bytes();
                    // Answered in full: the connection can carry the next request.
                    conn = Some(sender);
                    Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
                };
                let outcome = tokio::time::timeout(Duration::from_secs(10), attempt).await;
                let mut t = tally.lock().unwrap();
                match outcome {
                    Ok(Ok((status, body))) if (200..300).contains(&status) => {
                        *t.ok.entry(one_line(&body)).or_insert(0) += 1;
                    }
                    Ok(Ok((status, body))) => t.fail(one_line(&format!("{status} {body}"))),
                    Ok(Err(e)) => t.fail(one_line(&e)),
                    Err(_) => t.fail("timeout: no answer within 10 s".into()),
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    let t = tally.lock().unwrap();
    let mut out = String::new();
    for (body, count) in &t.ok {
        out.push_str(&format!("ok {body} {count}\n"));
    }
    out.push_str(&format!("failed {}\n", t.failed));
    if let Some(e) = &t.first_error {
        out.push_str(&format!("first_error {e}\n"));
    }
    out
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
                            if path != "/healthz" && path != "/hits" && path != "/burst" {
                                hit = Some(hits.fetch_add(1, Ordering::SeqCst) + 1);
                                if let Some(d) = delay {
                                    tokio::time::sleep(d).await;
                                }
                            }
                            let (status, body) = match (path, &call_url, fail_status) {
                                ("/healthz", _, _) => (200, "ok".to_string()),
                                ("/hits", _, _) => (200, hits.load(Ordering::SeqCst).to_string()),
                                ("/burst", Some(url), _) => {
                                    let (n, c) = burst_params(req.uri().query());
                                    (200, burst(url, n, c).await)
                                }
                                ("/burst", None, _) => (400, "/burst needs CALL=<url>".to_string()),
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
