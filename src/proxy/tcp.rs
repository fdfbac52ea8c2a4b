//! Opaque TCP: balanced per connection, bytes copied both ways, half-close respected
//! (`copy_bidirectional` shuts down each direction's write side when the other side's read
//! ends, and keeps the other direction flowing).

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Target;

const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Connects to an endpoint of the target (falling through to another on a connect failure),
/// sends the bytes already read, then copies both ways. Without an endpoint the client's
/// connection is closed.
pub async fn proxy<I>(t: &Target, mut client: I, prefix: BytesMut)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut tried: Vec<SocketAddr> = Vec::new();
    while tried.len() < MAX_CONNECT_ATTEMPTS {
        let Some(ep) = t.route.pick(&tried) else {
            break;
        };
        let inflight = ep.start();
        match ep.pool.connect_tcp().await {
            Ok(server) => {
                ep.connect_succeeded();
                // The connect time is a latency sample; the connection's lifetime is not.
                drop(inflight);
                let _conn = ep.hold();
                copy(t, client, server, prefix).await;
                return;
            }
            Err(error) => {
                inflight.forget();
                ep.connect_failed();
                t.metrics
                    .connect_errors
                    .with_label_values(&[&*t.service, &ep.addr.to_string()])
                    .inc();
                tracing::debug!(service = %t.service, endpoint = %ep.addr, %error, "connect failed");
                tried.push(ep.addr);
            }
        }
    }
    if tried.is_empty() {
        t.metrics
            .no_endpoints
            .with_label_values(&[t.direction.as_str(), &t.service, "tcp"])
            .inc();
        tracing::info!(service = %t.service, "no endpoints; closing the connection");
    } else {
        tracing::info!(service = %t.service, "no reachable endpoint; closing the connection");
    }
    let _ = client.shutdown().await;
}

/// Passes a connection through, unchanged, to its original destination.
pub async fn passthrough<I>(t: &Target, client: I, dst: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    match crate::socket::connect(dst).await {
        Ok(server) => copy(t, client, server, BytesMut::new()).await,
        Err(error) => tracing::debug!(%dst, %error, "passthrough connect failed"),
    }
}

async fn copy<I>(t: &Target, mut client: I, mut server: TcpStream, prefix: BytesMut)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    if !prefix.is_empty() {
        if let Err(error) = server.write_all(&prefix).await {
            tracing::debug!(%error, "write to endpoint failed");
            return;
        }
    }
    let (up, down) = match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok(n) => n,
        Err(error) => {
            tracing::debug!(%error, "tcp copy ended with an error");
            return;
        }
    };
    let dir = t.direction.as_str();
    t.metrics
        .tcp_bytes
        .with_label_values(&[dir, &t.service, "to_server"])
        .inc_by(up + prefix.len() as u64);
    t.metrics
        .tcp_bytes
        .with_label_values(&[dir, &t.service, "to_client"])
        .inc_by(down);
}
