//! Protocol detection on a connection's first bytes: the HTTP/2 prior-knowledge preface, an
//! HTTP/1.x request line, or else opaque TCP. A client that sends nothing (a server-speaks-first
//! protocol) is given up on after a short timeout and proxied as TCP.
//!
//! The bytes read are kept and replayed in front of the stream ([`PrefixedIo`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest request line we wait for before calling the stream opaque.
const MAX_REQUEST_LINE: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Tcp => "tcp",
        }
    }
}

enum Verdict {
    Is(Protocol),
    NeedMore,
}

/// Decides from the bytes seen so far.
fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    // An HTTP/1 request line: METHOD SP request-target SP HTTP/1.x CRLF
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == 0 || method_len >= 32 {
        return Verdict::Is(Protocol::Tcp);
    }
    if method_len == buf.len() {
        return Verdict::NeedMore;
    }
    if buf[method_len] != b' ' {
        return Verdict::Is(Protocol::Tcp);
    }
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = &buf[..end];
            let ok = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
            // The request target sits between the method's space and " HTTP/1.x".
            let target = line.get(method_len + 1..line.len().saturating_sub(9));
            let target_ok = target.is_some_and(|t| !t.is_empty() && !t.contains(&b' '));
            Verdict::Is(if ok && target_ok {
                Protocol::Http1
            } else {
                Protocol::Tcp
            })
        }
        None if buf.len() >= MAX_REQUEST_LINE => Verdict::Is(Protocol::Tcp),
        None if buf[method_len + 1..]
            .iter()
            .any(|b| b.is_ascii_control() && *b != b'\r') =>
        {
            Verdict::Is(Protocol::Tcp)
        }
        None => Verdict::NeedMore,
    }
}

/// [`classify`] as an `Option` (`None`: more bytes are needed), for the fuzz targets in fuzz/.
#[doc(hidden)]
pub fn classify_prefix(buf: &[u8]) -> Option<Protocol> {
    match classify(buf) {
        Verdict::Is(p) => Some(p),
        Verdict::NeedMore => None,
    }
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads from `io` until the protocol is known or `timeout` passes (then TCP). Returns the
/// protocol and the bytes read, to be replayed.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> io::Result<(Protocol, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Verdict::Is(p) = classify(&buf) {
            return Ok((p, buf));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => return Ok((Protocol::Tcp, buf)),
            // The client closed its side before we could tell: whatever it sent is opaque.
            Ok(Ok(0)) => return Ok((Protocol::Tcp, buf)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct PrefixedIo<I> {
    prefix: BytesMut,
    io: I,
}

impl<I> PrefixedIo<I> {
    pub fn new(prefix: BytesMut, io: I) -> Self {
        PrefixedIo { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefixedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(b: &[u8]) -> Option<Protocol> {
        match classify(b) {
            Verdict::Is(p) => Some(p),
            Verdict::NeedMore => None,
        }
    }

    #[test]
    fn classifies() {
        assert_eq!(verdict(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(verdict(&H2_PREFACE[..10]), None);
        assert_eq!(
            verdict(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(verdict(b"POST /x?y=1 HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(verdict(b"GET /partial"), None);
        assert_eq!(verdict(b"GE"), None);
        assert_eq!(
            verdict(b"\x16\x03\x01\x02\x00"),
            Some(Protocol::Tcp),
            "TLS hello"
        );
        assert_eq!(verdict(b"hello world\r\n"), Some(Protocol::Tcp));
        assert_eq!(verdict(b"GET / HTTP/2.0\r\n"), Some(Protocol::Tcp));
        assert_eq!(verdict(b"PING\r\n"), Some(Protocol::Tcp));
        assert_eq!(
            verdict(b"*3\r\n$3\r\nSET\r\n"),
            Some(Protocol::Tcp),
            "redis"
        );
    }

    #[tokio::test]
    async fn silent_client_times_out_to_tcp() {
        let (mut a, _b) = tokio::io::duplex(64);
        let start = std::time::Instant::now();
        let (p, buf) = detect(&mut a, Duration::from_millis(50)).await.unwrap();
        assert_eq!(p, Protocol::Tcp);
        assert!(buf.is_empty());
        assert!(start.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn prefix_is_replayed() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GET / HTTP/1.1\r\nrest").await.unwrap();
        drop(b);
        let (p, buf) = detect(&mut a, Duration::from_secs(1)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        let mut io = PrefixedIo::new(buf, a);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\nrest");
    }
}
