//! HTTP through meshlet's explicit upstream listener, against real backends on loopback.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_requests_are_balanced_per_request() {
    let backends = [
        Backend::start("a", Duration::ZERO).await,
        Backend::start("b", Duration::ZERO).await,
        Backend::start("c", Duration::ZERO).await,
    ];
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let m = Meshlet::start(&short_decay(upstream_config("web.default", &eps))).await;

    // Four keep-alive client connections at once, 75 requests each. Each connection's own
    // requests spread over the backends (per-connection balancing would pin each connection to
    // one backend), and every backend serves a share. (Strictly sequential requests on a single
    // connection lean toward the fastest backend by design: peak-EWMA, as in tower and Linkerd.)
    let up = m.upstream(0);
    let clients: Vec<_> = (0..4)
        .map(|c| {
            tokio::spawn(async move {
                let mut conn = H1Client::connect(up).await.unwrap();
                let mut seen: HashMap<String, usize> = HashMap::new();
                for i in 0..75 {
                    let a = conn.get(&format!("/item/{c}-{i}?q=1")).await.unwrap();
                    assert_eq!(a.status, 200);
                    assert_eq!(a.header("x-path").unwrap(), format!("/item/{c}-{i}"));
                    assert_eq!(a.header("x-version").unwrap(), "HTTP/1.1");
                    *seen.entry(a.header("x-backend").unwrap()).or_default() += 1;
                }
                seen
            })
        })
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in clients {
        let per_conn = c.await.unwrap();
        assert!(
            per_conn.len() >= 2,
            "one connection's requests all went to one backend: {per_conn:?}"
        );
        for (k, v) in per_conn {
            *seen.entry(k).or_default() += v;
        }
    }
    for b in &backends {
        let n = seen.get(&b.name).copied().unwrap_or(0);
        assert!(
            n >= 15,
            "backend {} served only {n} of 300: {seen:?}",
            b.name
        );
    }

    let text = m.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_requests_total{classification="success",direction="outbound",service="web.default",status="200"}"#
        ),
        Some(300.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"meshlet_endpoints{service="web.default"}"#),
        Some(3.0)
    );
    assert!(text.contains("meshlet_response_duration_seconds_bucket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_avoids_a_slow_backend() {
    let fast1 = Backend::start("fast1", Duration::ZERO).await;
    let fast2 = Backend::start("fast2", Duration::ZERO).await;
    let slow = Backend::start("slow", Duration::from_millis(50)).await;
    let m = Meshlet::start(&upstream_config(
        "web.default",
        &[fast1.addr, fast2.addr, slow.addr],
    ))
    .await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    for _ in 0..1000 {
        assert_eq!(c.get("/").await.unwrap().status, 200);
    }
    let share = slow.hits() as f64 / 1000.0;
    println!(
        "slow backend share: {:.1}% (fast1 {}, fast2 {}, slow {})",
        share * 100.0,
        fast1.hits(),
        fast2.hits(),
        slow.hits()
    );
    assert!(share < 0.10, "slow backend got {:.1}%", share * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_on_one_connection_spread_over_backends() {
    let backends = [
        Backend::start("a", Duration::from_millis(5)).await,
        Backend::start("b", Duration::from_millis(5)).await,
        Backend::start("c", Duration::from_millis(5)).await,
    ];
    let eps: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let m = Meshlet::start(&short_decay(upstream_config("web.default", &eps))).await;
    let c = H2Client::connect(m.upstream(0)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.get(&format!("/s/{i}")).await.unwrap()
        }));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200);
        // h2 stays h2 toward the endpoint.
        assert_eq!(a.header("x-version").unwrap(), "HTTP/2.0");
        *seen.entry(a.header("x-backend").unwrap()).or_default() += 1;
    }
    for b in &backends {
        assert!(
            seen.get(&b.name).copied().unwrap_or(0) >= 20,
            "backend {} underused: {seen:?}",
            b.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoints_is_a_fast_503_naming_the_service() {
    let m = Meshlet::start(&upstream_config("empty.default", &[])).await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    let start = std::time::Instant::now();
    let a = c.get("/").await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(200));
    assert_eq!(a.status, 503);
    assert_eq!(
        a.header("meshlet-error").unwrap(),
        "no endpoints for empty.default"
    );
    assert!(a.body_text().contains("no endpoints for empty.default"));
    let h2 = H2Client::connect(m.upstream(0)).await.unwrap();
    assert_eq!(h2.get("/").await.unwrap().status, 503);
    let text = m.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"meshlet_no_endpoints_total{direction="outbound",protocol="http",service="empty.default"}"#
        ),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_fall_through_to_another_endpoint() {
    // Two endpoints refuse connections (nothing listens there); one answers.
    let dead1 = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dead2 = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let live = Backend::start("live", Duration::ZERO).await;
    let m = Meshlet::start(&upstream_config("web.default", &[dead1, dead2, live.addr])).await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    for _ in 0..50 {
        // POST with a body: nothing was sent to a dead endpoint, so the body reaches the live one.
        let req = http::Request::post("/submit")
            .header("host", "web.default")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"payload",
            )))
            .unwrap();
        let a = c.send(req).await.unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(a.body_text(), "payload");
    }
    assert_eq!(live.hits(), 50);
    let text = m.metrics().await;
    assert!(text.contains("meshlet_connect_errors_total"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_unreachable_is_a_503() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let m = Meshlet::start(&upstream_config("web.default", &[dead])).await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    let a = c.get("/").await.unwrap();
    assert_eq!(a.status, 503);
    assert!(
        a.header("meshlet-error")
            .unwrap()
            .starts_with("no reachable endpoint for web.default"),
        "{:?}",
        a.header("meshlet-error")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let b = Backend::start("a", Duration::ZERO).await;
    let mut m = Meshlet::start(&upstream_config("web.default", &[b.addr])).await;
    assert_eq!(admin_get(m.addrs.admin, "/live").await.unwrap().0, 200);
    assert_eq!(admin_get(m.addrs.admin, "/ready").await.unwrap().0, 200);
    assert_eq!(
        admin_get(m.addrs.admin, "/ready/proxy").await.unwrap().0,
        200
    );
    assert_eq!(admin_get(m.addrs.admin, "/nope").await.unwrap().0, 404);
    // GET /shutdown is refused; POST from loopback starts the shutdown.
    assert_eq!(admin_get(m.addrs.admin, "/shutdown").await.unwrap().0, 405);
    let mut c = H1Client::connect(m.addrs.admin).await.unwrap();
    let req = http::Request::post("/shutdown")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(c.send(req).await.unwrap().status, 200);
    let drained = tokio::time::timeout(Duration::from_secs(10), &mut m.done)
        .await
        .expect("meshlet stops after /shutdown")
        .unwrap();
    assert!(drained);
}

/// A backend that answers 503 to everything.
async fn failing_backend() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let mut r = http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                    *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_breaker_state_is_shown_on_the_admin_server() {
    let good = Backend::start("good", Duration::ZERO).await;
    let bad = failing_backend().await;
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nupstreams:\n  - listen: 127.0.0.1:0\n    service: web.default\ndiscovery:\n  static:\n    - service: web.default\n      endpoints: [\"{}\", \"{bad}\"]\n      policy:\n        breaker_failures: 2\n        breaker_backoff: 30s\n        breaker_backoff_max: 30s\n        max_retries: 0\n",
        good.addr
    );
    let m = Meshlet::start(&yaml).await;
    let up = m.upstream(0);
    let state = |v: &serde_json::Value, addr: std::net::SocketAddr| {
        v["services"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == addr.to_string())
            .map(|e| e["breaker"].as_str().unwrap().to_string())
    };
    eventually(
        "the failing endpoint ejected",
        Duration::from_secs(10),
        || async {
            if let Ok(mut c) = H1Client::connect(up).await {
                let _ = c.get("/").await;
            }
            let (_, body) = admin_get(m.addrs.admin, "/endpoints").await.unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            state(&v, bad).as_deref() == Some("ejected")
        },
    )
    .await;
    let (status, body) = admin_get(m.addrs.admin, "/endpoints").await.unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["services"][0]["service"], "web.default");
    assert_eq!(state(&v, good.addr).as_deref(), Some("closed"), "{body}");
    let text = m.metrics().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("meshlet_endpoint_breaker_state{")
                && l.contains(&bad.to_string())
                && l.ends_with(" 1")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_closed_after_the_idle_timeout() {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::Instant;
    // A keep-alive backend (no idle timeout of its own) that notes when each of its
    // connections closes.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let closed: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let c2 = closed.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let c = c2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
                c.lock().unwrap().push(Instant::now());
            });
        }
    });
    let config = upstream_config("web.default", &[addr]).replace(
        &format!("endpoints: {}\n", yaml_list(&[addr])),
        &format!(
            "endpoints: {}\n      policy: {{idle_timeout: 300ms}}\n",
            yaml_list(&[addr])
        ),
    );
    let m = Meshlet::start(&config).await;
    let mut c = H1Client::connect(m.upstream(0)).await.unwrap();
    assert_eq!(c.get("/").await.unwrap().status, 200);
    let answered = Instant::now();
    // No other request comes: meshlet itself closes its idle connection to the endpoint.
    eventually(
        "the pooled connection closed",
        Duration::from_secs(5),
        || async { !closed.lock().unwrap().is_empty() },
    )
    .await;
    let after = closed.lock().unwrap()[0] - answered;
    println!("pooled connection closed {after:?} after its answer");
    assert!(after >= Duration::from_millis(250), "{after:?}");
    // A new request opens a new connection and is answered.
    assert_eq!(c.get("/").await.unwrap().status, 200);
    server.abort();
}
