//! Opaque TCP: balanced per connection, bytes copied both ways, half-close respected (each
//! direction's write side is shut down when the other side's read ends, and the other
//! direction keeps flowing), no buffer held while a stream is idle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::Destination;
use super::http::outcome::Class;

const MAX_CONNECT_ATTEMPTS: usize = 3;

/// A connection made to one of a target's endpoints, counted as load on it while it lives.
pub struct Upstream {
    pub stream: TcpStream,
    _hold: crate::balance::InFlight,
}

/// Connects to an endpoint of the target, falling through to another on a connect failure
/// (each failure recorded on the endpoint). `None` (logged) when no endpoint could be reached.
pub async fn connect(t: &Destination) -> Option<Upstream> {
    t.window.mark_used();
    t.route.wait_synced().await;
    let connect_timeout = t.resilience().policy.connect_timeout.0;
    let mut tried: Vec<SocketAddr> = Vec::new();
    while tried.len() < MAX_CONNECT_ATTEMPTS {
        let Some((ep, probe)) = t.route.pick_admitted(&tried) else {
            break;
        };
        let inflight = ep.start();
        let started = std::time::Instant::now();
        match ep.pool.connect_tcp(connect_timeout).await {
            Ok(server) => {
                ep.connect_succeeded();
                // For opaque TCP, a made connection is the success the breaker can see.
                t.record_endpoint(&ep, Class::Success, started.elapsed(), probe);
                // The connect time is a latency sample; the connection's lifetime is not.
                inflight.complete();
                return Some(Upstream {
                    stream: server,
                    _hold: ep.hold(),
                });
            }
            Err(error) => {
                inflight.forget();
                ep.connect_failed();
                t.record_endpoint(&ep, Class::Failure, started.elapsed(), probe);
                t.metrics
                    .connect_errors
                    .with_label_values(&[&*t.service, &ep.addr.to_string()])
                    .inc();
                tracing::debug!(service = %t.service, endpoint = %ep.addr, %error, "connect failed");
                tried.push(ep.addr);
            }
        }
    }
    if tried.is_empty() && t.route.is_empty() {
        t.metrics
            .no_endpoints
            .with_label_values(&[t.direction.as_str(), &t.service, "tcp"])
            .inc();
        tracing::info!(service = %t.service, "no endpoints; closing the connection");
    } else if tried.is_empty() {
        tracing::info!(service = %t.service, "no available endpoint (all ejected); closing the connection");
    } else {
        tracing::info!(service = %t.service, "no reachable endpoint; closing the connection");
    }
    None
}

/// Connects to an endpoint of the target, sends the bytes already read, then copies both
/// ways. Without an endpoint the client's connection is closed.
pub async fn proxy<I>(t: &Destination, mut client: I, prefix: BytesMut, idle: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    match connect(t).await {
        Some(up) => proxy_to(t, client, up, prefix, idle).await,
        None => {
            let _ = client.shutdown().await;
        }
    }
}

/// Sends the bytes already read to a connected endpoint, then copies both ways.
pub async fn proxy_to<I>(t: &Destination, client: I, up: Upstream, prefix: BytesMut, idle: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let Upstream { stream, _hold } = up;
    copy(t, client, stream, prefix, idle).await
}

/// Passes a connection through, unchanged, to its original destination.
pub async fn passthrough<I>(t: &Destination, client: I, dst: SocketAddr, idle: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    match crate::socket::connect(dst).await {
        Ok(server) => copy(t, client, server, BytesMut::new(), idle).await,
        Err(error) => tracing::debug!(%dst, %error, "passthrough connect failed"),
    }
}

async fn copy<I>(t: &Destination, client: I, server: TcpStream, prefix: BytesMut, idle: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let counters = t.byte_counters();
    let mut server = CountWrites::new(server, counters.to_server.clone());
    if !prefix.is_empty() {
        if let Err(error) = server.write_all(&prefix).await {
            tracing::debug!(%error, "write to endpoint failed");
            return;
        }
    }
    splice(client, server.io, counters, idle).await
}

/// The byte counters of one target, by flow.
pub(crate) struct ByteCounters {
    pub to_server: IntCounter,
    pub to_client: IntCounter,
}

/// Copies both ways until both directions end (half-close kept), counting bytes as they are
/// written: a long-lived stream shows while it lasts, and one that ends in a reset keeps what
/// it carried. A stream on which no byte moved either way for `idle` is closed (in steps of a
/// quarter of it, so between 1 and 1.25 times `idle`).
pub(crate) async fn splice<A, B>(client: A, server: B, counters: ByteCounters, idle: Duration)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Arc::new(AtomicU64::new(0));
    let mut c = CountWrites::new(client, counters.to_client).tracking(activity.clone());
    let mut s = CountWrites::new(server, counters.to_server).tracking(activity.clone());
    let moved = move || activity.load(Ordering::Relaxed);
    let (mut to_server, mut to_client) = (Flow::default(), Flow::default());
    let copy = std::future::poll_fn(|cx| {
        let up = to_server.poll(cx, &mut c, &mut s)?;
        let down = to_client.poll(cx, &mut s, &mut c)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok::<_, io::Error>(()))
        } else {
            Poll::Pending
        }
    });
    tokio::pin!(copy);
    let step = (idle / 4).max(Duration::from_millis(1));
    let (mut seen, mut quiet) = (moved(), Duration::ZERO);
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(error) = r {
                    tracing::debug!(%error, "stream ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep(step) => {
                let now = moved();
                if now != seen {
                    (seen, quiet) = (now, Duration::ZERO);
                } else {
                    quiet += step;
                    if quiet >= idle {
                        tracing::debug!(idle = ?idle, "closing a stream idle for http.stream_idle_timeout");
                        return;
                    }
                }
            }
        }
    }
}

/// Bytes read at most at once in one direction (as tokio's `copy_bidirectional`).
const FLOW_BUF: usize = 8 * 1024;

/// One direction of a spliced stream. Its buffer exists only while bytes are on their way: it
/// is allocated for a read and freed when a read would block with nothing left to write, so an
/// idle stream holds no buffer (`copy_bidirectional` keeps two 8 KiB buffers, zero-filled, for
/// a stream's whole life: 16 KiB of an idle opaque connection's ~20).
#[derive(Default)]
struct Flow {
    buf: BytesMut,
    read_done: bool,
    unflushed: bool,
    done: bool,
}

impl Flow {
    /// Copies from `r` to `w` until `r` ends, then shuts `w` down. Ready once, after that.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while !self.buf.is_empty() {
                let n = std::task::ready!(Pin::new(&mut *w).poll_write(cx, &self.buf))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                bytes::Buf::advance(&mut self.buf, n);
                self.unflushed = true;
            }
            if self.read_done {
                if self.unflushed {
                    std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                    self.unflushed = false;
                }
                std::task::ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            self.buf.reserve(FLOW_BUF);
            match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to write and nothing to read: give the buffer back.
                    self.buf = BytesMut::new();
                    if self.unflushed {
                        std::task::ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// A stream that adds the bytes written to it to a counter as they go.
pub(crate) struct CountWrites<I> {
    io: I,
    written: IntCounter,
    /// Bytes written, for this stream only (the counter is shared by a target's streams).
    moved: Option<Arc<AtomicU64>>,
}

impl<I> CountWrites<I> {
    pub(crate) fn new(io: I, written: IntCounter) -> Self {
        CountWrites {
            io,
            written,
            moved: None,
        }
    }

    fn tracking(mut self, moved: Arc<AtomicU64>) -> Self {
        self.moved = Some(moved);
        self
    }

    fn count(&self, n: usize) {
        self.written.inc_by(n as u64);
        if let Some(m) = &self.moved {
            m.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for CountWrites<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for CountWrites<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.count(n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.count(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn counters() -> ByteCounters {
        ByteCounters {
            to_server: IntCounter::new("to_server", "test").unwrap(),
            to_client: IntCounter::new("to_client", "test").unwrap(),
        }
    }

    /// Both directions at once, each larger than many buffers and written in odd pieces over
    /// small pipes (so writes block), each half-closed on its own: every byte arrives, in
    /// order, each side sees the other's end, and the counters match.
    #[tokio::test]
    async fn splice_moves_every_byte_both_ways_and_keeps_half_close() {
        let (client, client_far) = tokio::io::duplex(1000);
        let (server, server_far) = tokio::io::duplex(700);
        let c = counters();
        let (to_server, to_client) = (c.to_server.clone(), c.to_client.clone());
        let task = tokio::spawn(splice(client_far, server_far, c, Duration::from_secs(30)));
        let up: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let down: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 241) as u8).collect();
        let talk = |mut io: tokio::io::DuplexStream, send: Vec<u8>| async move {
            let (mut r, mut w) = tokio::io::split(&mut io);
            let write = async {
                for piece in send.chunks(3_001) {
                    w.write_all(piece).await.unwrap();
                }
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let read = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(write, read);
            n.unwrap();
            got
        };
        let (at_server, at_client) =
            tokio::join!(talk(server, down.clone()), talk(client, up.clone()));
        assert!(at_server == up, "to the server: {} bytes", at_server.len());
        assert!(
            at_client == down,
            "to the client: {} bytes",
            at_client.len()
        );
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("splice ends when both sides ended")
            .unwrap();
        assert_eq!(to_server.get(), up.len() as u64);
        assert_eq!(to_client.get(), down.len() as u64);
    }

    /// An idle direction holds no buffer.
    #[tokio::test]
    async fn an_idle_flow_holds_no_buffer() {
        let (mut a, mut a_far) = tokio::io::duplex(64);
        let (mut b, mut b_far) = tokio::io::duplex(64);
        let mut flow = Flow::default();
        a.write_all(b"hello").await.unwrap();
        let poll = std::future::poll_fn(|cx| Poll::Ready(flow.poll(cx, &mut a_far, &mut b_far)));
        assert!(poll.await.is_pending());
        assert_eq!(flow.buf.capacity(), 0);
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
