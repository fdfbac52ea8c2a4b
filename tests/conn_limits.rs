//! A listener's connection cap (`max_connections`): over it, a new connection is closed at once
//! and counted, while the connections already open keep working; once some close, new ones
//! are accepted again.

mod support;

use std::time::Duration;

use meshlet::config::Config;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CAP: usize = 20;

fn refused(metrics: &str) -> f64 {
    metric(
        metrics,
        "meshlet_connections_refused_total{direction=\"outbound\",reason=\"limit\"}",
    )
    .unwrap_or(0.0)
}

fn open(metrics: &str) -> f64 {
    metric(metrics, "meshlet_open_connections{direction=\"outbound\"}").unwrap_or(0.0)
}

/// Connects and sends a GET; the answer's status line, or the error that ended it.
async fn try_get(addr: std::net::SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = s
        .write_all(b"GET / HTTP/1.1\r\nHost: web.default\r\n\r\n")
        .await;
    let mut buf = vec![0u8; 1024];
    match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
        Err(_) => Err("no answer within 10 s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(0)) => Err("closed".into()),
        Ok(Ok(n)) => Ok(String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()),
    }
}

#[tokio::test]
async fn over_the_cap_new_connections_are_refused_and_open_ones_keep_working() {
    let backend = Backend::start("b1", Duration::ZERO).await;
    let config = upstream_config("web.default", &[backend.addr]).replace(
        "    service: web.default\n",
        &format!("    service: web.default\n    max_connections: {CAP}\n"),
    );
    let m = Meshlet::start(&config).await;
    let addr = m.upstream(0);

    // Fill the listener with idle keep-alive connections, each after one request.
    let mut clients = Vec::new();
    for _ in 0..CAP {
        let mut c = H1Client::connect(addr).await.unwrap();
        assert_eq!(c.get("/").await.unwrap().status, 200);
        clients.push(c);
    }
    eventually(
        "all connections counted open",
        Duration::from_secs(10),
        || async { open(&m.metrics().await) == CAP as f64 },
    )
    .await;

    // One more is closed at once (a reset or an end of stream, never an answer) and counted.
    let r = try_get(addr).await;
    assert!(r.is_err(), "a connection over the cap was answered: {r:?}");
    eventually("the refusal counted", Duration::from_secs(10), || async {
        refused(&m.metrics().await) == 1.0
    })
    .await;
    assert_eq!(open(&m.metrics().await), CAP as f64);

    // The open connections are not disturbed: each still gets its answer.
    for c in clients.iter_mut() {
        assert_eq!(c.get("/").await.unwrap().status, 200);
    }

    // Once some close, new connections are accepted again.
    clients.truncate(CAP - 5);
    eventually(
        "closed connections leave the count",
        Duration::from_secs(10),
        || async { open(&m.metrics().await) == (CAP - 5) as f64 },
    )
    .await;
    for _ in 0..5 {
        let status = try_get(addr).await;
        assert_eq!(status.as_deref(), Ok("HTTP/1.1 200 OK"), "{status:?}");
    }
    assert_eq!(refused(&m.metrics().await), 1.0);
    let last = clients.last_mut().unwrap();
    assert_eq!(last.get("/").await.unwrap().status, 200);
}

#[test]
fn max_connections_must_be_positive() {
    let base = "discovery:\n  static:\n    - service: web.default\n";
    let e = Config::parse(
        "c.yaml",
        &format!("{base}upstreams:\n  - listen: 127.0.0.1:0\n    service: web.default\n    max_connections: 0\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("c.yaml: upstreams[0].max_connections: 0 would refuse every connection"),
        "{e}"
    );
    let e = Config::parse("c.yaml", "outbound:\n  max_connections: lots\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("c.yaml: outbound.max_connections: \"lots\" is not a number of connections"),
        "{e}"
    );
    let c = Config::parse(
        "c.yaml",
        "outbound:\n  max_connections: 500\ninbound:\n  max_connections: 1000\n",
    )
    .unwrap();
    assert_eq!(c.outbound.unwrap().max_connections.unwrap().0, 500);
    assert_eq!(c.inbound.unwrap().max_connections.unwrap().0, 1000);
}
