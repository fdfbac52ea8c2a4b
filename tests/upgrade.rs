//! HTTP/1.1 Upgrade through meshlet's explicit upstream listener: a WebSocket session with a
//! real echo server on loopback, from handshake to closing handshake.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use support::*;

/// What the echo server saw of an upgrade request.
#[derive(Debug, Clone)]
struct Handshake {
    path: String,
    host: Option<String>,
    protocol: Option<String>,
}

/// A WebSocket echo server: text and binary messages come back as they are.
struct WsEcho {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    stop: CancellationToken,
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl WsEcho {
    async fn start() -> WsEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (h, s) = (handshakes.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                let h = h.clone();
                tokio::spawn(async move {
                    // tungstenite's callback type fixes the (large) error type.
                    #[allow(clippy::result_large_err)]
                    let record = |req: &Request, mut rsp: Response| {
                        let get = |n: &str| {
                            req.headers()
                                .get(n)
                                .map(|v| v.to_str().unwrap().to_string())
                        };
                        let protocol = get("sec-websocket-protocol");
                        if let Some(p) = &protocol {
                            rsp.headers_mut()
                                .insert("sec-websocket-protocol", p.parse().unwrap());
                        }
                        h.lock().unwrap().push(Handshake {
                            path: req.uri().to_string(),
                            host: get("host"),
                            protocol,
                        });
                        Ok(rsp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await
                    else {
                        return;
                    };
                    // Echo until the client's close, which tungstenite answers by itself.
                    while let Some(Ok(m)) = ws.next().await {
                        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WsEcho {
            addr,
            handshakes,
            stop,
        }
    }
}

const BYTES: &str = r#"meshlet_tcp_bytes_total{direction="outbound",flow="#;

fn tcp_bytes(text: &str, flow: &str) -> f64 {
    metric(text, &format!(r#"{BYTES}"{flow}",service="ws.default"}}"#)).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_round_trips_and_closes_cleanly() {
    let echo = WsEcho::start().await;
    let m = Meshlet::start(&upstream_config("ws.default", &[echo.addr])).await;
    let before = m.metrics().await;
    assert_eq!(tcp_bytes(&before, "to_server"), 0.0, "{before}");
    assert_eq!(tcp_bytes(&before, "to_client"), 0.0, "{before}");

    let stream = TcpStream::connect(m.upstream(0)).await.unwrap();
    let req = http::Request::get("ws://ws.default/chat?room=7")
        .header("host", "ws.default")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .header("sec-websocket-protocol", "echo.v1")
        .body(())
        .unwrap();
    let (mut ws, rsp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(req, stream),
    )
    .await
    .expect("handshake in time")
    .expect("handshake through meshlet");
    assert_eq!(rsp.status(), 101);
    assert_eq!(rsp.headers()["sec-websocket-protocol"], "echo.v1");

    let hs = echo.handshakes.lock().unwrap().clone();
    assert_eq!(hs.len(), 1, "{hs:?}");
    assert_eq!(hs[0].path, "/chat?room=7");
    assert_eq!(hs[0].host.as_deref(), Some("ws.default"));
    assert_eq!(hs[0].protocol.as_deref(), Some("echo.v1"));

    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let messages = vec![
        Message::text("hello"),
        Message::binary(vec![0u8, 1, 2, 3, 255]),
        Message::text("ünïcödé ✓ through a sidecar"),
        Message::binary(big),
        Message::text(""),
        Message::binary((0..=255u8).collect::<Vec<u8>>()),
    ];
    let payload: usize = messages.iter().map(|m| m.len()).sum();
    let echoed = tokio::time::timeout(Duration::from_secs(10), async {
        for m in &messages {
            ws.send(m.clone()).await.unwrap();
            let got = ws.next().await.expect("an echo").unwrap();
            assert_eq!(&got, m);
        }
        // A ping is answered by the server itself.
        ws.send(Message::Ping(b"are you there".to_vec().into()))
            .await
            .unwrap();
        match ws.next().await.expect("a pong").unwrap() {
            Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
            other => panic!("unexpected {other:?}"),
        }
        messages.len()
    })
    .await
    .expect("echoes in time");
    assert_eq!(echoed, 6);

    // The bytes show while the session is still open: a WebSocket may last for hours.
    eventually(
        "meshlet_tcp_bytes_total counts the open upgraded stream",
        Duration::from_secs(5),
        || async {
            let text = m.metrics().await;
            tcp_bytes(&text, "to_server") >= payload as f64
                && tcp_bytes(&text, "to_client") >= payload as f64
        },
    )
    .await;
    let open = m.metrics().await;

    // The closing handshake: our close frame comes back, then the stream ends.
    tokio::time::timeout(Duration::from_secs(10), async {
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
        match ws.next().await {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Normal),
            other => panic!("expected the server's close frame, got {other:?}"),
        }
        assert!(ws.next().await.is_none(), "the stream ends after the close");
    })
    .await
    .expect("close in time");
    drop(ws);

    // The closing handshake's frames are counted too.
    eventually(
        "meshlet_tcp_bytes_total counts the closing handshake",
        Duration::from_secs(5),
        || async {
            let text = m.metrics().await;
            tcp_bytes(&text, "to_server") > tcp_bytes(&open, "to_server")
                && tcp_bytes(&text, "to_client") > tcp_bytes(&open, "to_client")
        },
    )
    .await;
    let last = m.metrics().await;
    // Frames add only a few bytes each: the counts are the session, not something larger.
    for flow in ["to_server", "to_client"] {
        let n = tcp_bytes(&last, flow);
        assert!(
            n < (payload + 2048) as f64,
            "{flow} = {n}, payload {payload}"
        );
    }
    assert_eq!(
        metric(
            &last,
            r#"meshlet_requests_total{classification="success",direction="outbound",service="ws.default",status="101"}"#
        ),
        Some(1.0),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_websocket_sessions_stay_apart() {
    // Each upgraded stream holds a connection of its own to the endpoint: two interleaved
    // sessions neither mix nor wait for each other.
    let echo = WsEcho::start().await;
    let m = Meshlet::start(&upstream_config("ws.default", &[echo.addr])).await;
    let stream = TcpStream::connect(m.upstream(0)).await.unwrap();
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async("ws://ws.default/a", stream),
    )
    .await
    .unwrap()
    .unwrap();
    let stream2 = TcpStream::connect(m.upstream(0)).await.unwrap();
    let (mut ws2, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async("ws://ws.default/b", stream2),
    )
    .await
    .unwrap()
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        for i in 0..10 {
            ws.send(Message::text(format!("a{i}"))).await.unwrap();
            ws2.send(Message::text(format!("b{i}"))).await.unwrap();
            assert_eq!(
                ws2.next().await.unwrap().unwrap(),
                Message::text(format!("b{i}"))
            );
            assert_eq!(
                ws.next().await.unwrap().unwrap(),
                Message::text(format!("a{i}"))
            );
        }
        ws.close(None).await.unwrap();
        ws2.close(None).await.unwrap();
        while ws.next().await.is_some() {}
        while ws2.next().await.is_some() {}
    })
    .await
    .expect("two sessions in time");
    let paths: Vec<String> = echo
        .handshakes
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.path.clone())
        .collect();
    assert_eq!(paths, ["/a", "/b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_refused_by_one_endpoint_goes_to_another() {
    // One of the service's two endpoints refuses connections. Each upgrade that lands on it
    // first is sent to the other endpoint (nothing was sent yet) and still gets its 101 and a
    // working session: the client never sees the dead endpoint.
    let echo = WsEcho::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let m = Meshlet::start(&upstream_config("ws.default", &[dead, echo.addr])).await;
    let dead_errors =
        format!(r#"meshlet_connect_errors_total{{endpoint="{dead}",service="ws.default"}}"#);
    // p2c picks the dead endpoint for a given upgrade with probability 1/2 until it has, so
    // 40 upgrades all but surely include one that tried it first.
    let mut upgrades = 0;
    for i in 0..40 {
        let stream = TcpStream::connect(m.upstream(0)).await.unwrap();
        let (mut ws, rsp) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::client_async(format!("ws://ws.default/s{i}"), stream),
        )
        .await
        .expect("handshake in time")
        .unwrap_or_else(|e| panic!("upgrade {i} through meshlet: {e}"));
        assert_eq!(rsp.status(), 101);
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("m{i}"))
        );
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
        upgrades += 1;
        if metric(&m.metrics().await, &dead_errors).unwrap_or(0.0) >= 1.0 && upgrades >= 4 {
            break;
        }
    }
    let text = m.metrics().await;
    assert!(
        metric(&text, &dead_errors).unwrap_or(0.0) >= 1.0,
        "the dead endpoint was never tried: {text}"
    );
    assert_eq!(echo.handshakes.lock().unwrap().len(), upgrades);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_upgraded_stream_keeps_its_byte_counts() {
    let echo = WsEcho::start().await;
    let m = Meshlet::start(&upstream_config("ws.default", &[echo.addr])).await;
    let stream = TcpStream::connect(m.upstream(0)).await.unwrap();
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async("ws://ws.default/r", stream),
    )
    .await
    .unwrap()
    .unwrap();
    let payload = 10 * 1000;
    tokio::time::timeout(Duration::from_secs(10), async {
        for i in 0..10u8 {
            ws.send(Message::binary(vec![i; 1000])).await.unwrap();
            assert_eq!(
                ws.next().await.unwrap().unwrap(),
                Message::binary(vec![i; 1000])
            );
        }
    })
    .await
    .expect("echoes in time");
    // The client vanishes without a closing handshake: SO_LINGER 0 makes its close a RST.
    socket2::SockRef::from(ws.get_ref())
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(ws);
    eventually(
        "the reset stream's bytes are counted",
        Duration::from_secs(5),
        || async {
            let text = m.metrics().await;
            tcp_bytes(&text, "to_server") >= payload as f64
                && tcp_bytes(&text, "to_client") >= payload as f64
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_bytes_in_the_same_write_as_the_101_are_not_lost() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;

    // A hand-rolled server whose 101 and first frame leave in one write (so they likely share
    // a segment and meshlet reads them together), then an echo server on the same socket.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if stream.read(&mut b).await.unwrap() == 0 {
                return;
            }
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| v.trim().to_string())
            })
            .unwrap();
        let mut out = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .into_bytes();
        out.extend_from_slice(&[0x81, 7]);
        out.extend_from_slice(b"welcome");
        stream.write_all(&out).await.unwrap();
        let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
        while let Some(Ok(m)) = ws.next().await {
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                return;
            }
        }
    });

    let m = Meshlet::start(&upstream_config("ws.default", &[addr])).await;
    let stream = TcpStream::connect(m.upstream(0)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        let (mut ws, rsp) = tokio_tungstenite::client_async("ws://ws.default/w", stream)
            .await
            .unwrap();
        assert_eq!(rsp.status(), 101);
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("welcome"));
        ws.send(Message::text("and back")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("and back"));
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
    })
    .await
    .expect("session in time");
}
