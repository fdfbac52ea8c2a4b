//! Protocol detection on a connection's first bytes: the HTTP/2 prior-knowledge preface, an
//! HTTP/1.x request, or else opaque TCP.
//!
//! The rule that matters most: a client that speaks HTTP is never downgraded to opaque TCP,
//! where limits, retries, balancing and metrics do not apply. So:
//! - a request line is recognised by its *end*: `METHOD SP target SP HTTP/x.y`, the line ended
//!   by CRLF or a bare LF (RFC 9112 2.2 lets a server accept a bare LF), the version token
//!   matched case-insensitively. An odd version (`HTTP/1.2`, `http/1.1`) is still HTTP: the
//!   HTTP/1 server answers it as a server would (400 or 505), instead of the bytes passing
//!   opaquely;
//! - once the first token is a registered HTTP method followed by a space, the connection is
//!   waited on as HTTP: a slow request line has the header timeout (then 408), not the short
//!   detection timeout, and a long one is HTTP up to the header size limit (then 431);
//! - anything else is opaque TCP as soon as it cannot be HTTP, or when the detection timeout
//!   passes without a complete request line.
//!
//! A client that sends nothing at all is not decided here (see `Proxy::silent` in the parent
//! module): it may be an HTTP client that pre-connected, or a server-speaks-first protocol.
//!
//! The bytes read are kept and replayed in front of the stream ([`PrefixedIo`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest request line waited for when the method is not a registered HTTP method: such a
/// client is opaque TCP unless a complete HTTP request line arrives within this.
const MAX_UNKNOWN_LINE: usize = 8 * 1024;
/// The longest method token considered.
const MAX_METHOD: usize = 32;
/// The head size limit [`classify_prefix`] assumes (the proxy uses `http.max_header_bytes`).
pub const DEFAULT_MAX_HEAD: usize = 64 * 1024;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Is(Protocol),
    /// Undecided; `http` when the first token is a registered HTTP method followed by a space
    /// (then the wait is the header timeout's, not the detection timeout's).
    NeedMore {
        http: bool,
    },
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Methods from the IANA HTTP method registry that clients send (RFC 9110, PATCH, WebDAV).
fn is_registered_method(m: &[u8]) -> bool {
    matches!(
        m,
        b"GET"
            | b"HEAD"
            | b"POST"
            | b"PUT"
            | b"DELETE"
            | b"CONNECT"
            | b"OPTIONS"
            | b"TRACE"
            | b"PATCH"
            | b"PROPFIND"
            | b"PROPPATCH"
            | b"MKCOL"
            | b"COPY"
            | b"MOVE"
            | b"LOCK"
            | b"UNLOCK"
            | b"REPORT"
            | b"SEARCH"
            | b"MKCALENDAR"
            | b"ACL"
            | b"QUERY"
    )
}

/// Decides from the bytes seen so far; `max_head` is the HTTP head size limit.
fn classify(buf: &[u8], max_head: usize) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore { http: false };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Is(Protocol::Http2)
        } else {
            Verdict::NeedMore { http: true }
        };
    }
    let method_len = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == 0 || method_len > MAX_METHOD {
        return Verdict::Is(Protocol::Tcp);
    }
    if method_len == buf.len() {
        return Verdict::NeedMore { http: false };
    }
    if buf[method_len] != b' ' {
        return Verdict::Is(Protocol::Tcp);
    }
    let http = is_registered_method(&buf[..method_len]);
    let Some(lf) = buf.iter().position(|b| *b == b'\n') else {
        // No line end yet. A control byte (other than CR at the very end) cannot be part of a
        // request line: that is not HTTP.
        let rest = &buf[method_len + 1..];
        let bad_control = rest.iter().enumerate().any(|(i, b)| {
            (b.is_ascii_control() && *b != b'\t') && !(*b == b'\r' && i + 1 == rest.len())
        });
        if bad_control {
            return Verdict::Is(Protocol::Tcp);
        }
        return match (http, buf.len()) {
            // A registered method: HTTP, and the HTTP server answers 431 for a head too big.
            (true, len) if len >= max_head => Verdict::Is(Protocol::Http1),
            (false, len) if len >= MAX_UNKNOWN_LINE => Verdict::Is(Protocol::Tcp),
            _ => Verdict::NeedMore { http },
        };
    };
    // A prefix without the line end decided already past these lengths: decisions never change.
    if !http && lf >= MAX_UNKNOWN_LINE {
        return Verdict::Is(Protocol::Tcp);
    }
    if http && lf >= max_head {
        return Verdict::Is(Protocol::Http1);
    }
    let line = &buf[..lf];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.iter().any(|b| b.is_ascii_control() && *b != b'\t') {
        return Verdict::Is(Protocol::Tcp);
    }
    // METHOD SP target SP version: at least three tokens, the last one HTTP's.
    let mut tokens = line.split(|b| *b == b' ').filter(|t| !t.is_empty());
    let (_method, target, version) = (
        tokens.next(),
        tokens.next(),
        line.rsplit(|b| *b == b' ').next(),
    );
    let versioned = version.is_some_and(|v| v.len() >= 5 && v[..5].eq_ignore_ascii_case(b"HTTP/"));
    if target.is_some() && versioned && tokens.next().is_some() {
        Verdict::Is(Protocol::Http1)
    } else {
        Verdict::Is(Protocol::Tcp)
    }
}

/// The protocol the first bytes of a connection say, or `None` when more bytes are needed (with
/// the default head limit). A decision never changes as more bytes arrive.
pub fn classify_prefix(buf: &[u8]) -> Option<Protocol> {
    match classify(buf, DEFAULT_MAX_HEAD) {
        Verdict::Is(p) => Some(p),
        Verdict::NeedMore { .. } => None,
    }
}

/// What the version of a detected HTTP/1 request line calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0 or HTTP/1.1, or a later HTTP/1 minor version now read as HTTP/1.1 (RFC 9110
    /// 2.5: a recipient processes a higher minor version as the highest it implements).
    Supported,
    /// `HTTP/x.y` with a major version other than 1: 505.
    Unsupported,
    /// Anything else (`http/1.1`, `HTTP/1`): left to the HTTP/1 server, which answers 400.
    Malformed,
}

/// Checks the version of the request line at the start of `buf` (detected as HTTP/1) and
/// rewrites a later HTTP/1 minor version to `HTTP/1.1` in place.
pub fn request_version(buf: &mut [u8]) -> Version {
    let Some(lf) = buf.iter().position(|b| *b == b'\n') else {
        return Version::Supported; // a long line given to the HTTP server as is
    };
    let end = if lf > 0 && buf[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    };
    let start = buf[..end]
        .iter()
        .rposition(|b| *b == b' ')
        .map_or(0, |i| i + 1);
    let v = &mut buf[start..end];
    match v {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor] if minor.is_ascii_digit() => {
            if *minor > b'1' {
                *minor = b'1';
            }
            Version::Supported
        }
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Version::Unsupported
        }
        _ => Version::Malformed,
    }
}

/// How long detection may wait, and the HTTP head limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Undecided bytes that are not (yet) recognisably HTTP become opaque TCP after this long.
    pub timeout: Duration,
    /// A request that started with a registered HTTP method has this long, from its first
    /// byte, to complete its request line (and, later, its head).
    pub header_timeout: Duration,
    /// `http.max_header_bytes`.
    pub max_head: usize,
}

/// How detection on a client that has started speaking ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bytes say which protocol.
    Is(Protocol),
    /// An HTTP request line that did not complete within the header timeout: answer 408.
    HeadTimeout,
    /// The client closed its side in the middle of an HTTP request line: nothing to answer.
    Closed,
}

/// Reads from `io` until the protocol is known. Returns how it ended and the bytes read (to be
/// replayed in front of the stream). Call it once the client has something to read: the
/// detection timeout runs from the call.
pub async fn detect_with<I: AsyncRead + Unpin>(
    io: &mut I,
    limits: &Limits,
) -> io::Result<(Outcome, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    let start = Instant::now();
    loop {
        let http = match classify(&buf, limits.max_head) {
            Verdict::Is(p) => return Ok((Outcome::Is(p), buf)),
            Verdict::NeedMore { http } => http,
        };
        let deadline = start
            + if http {
                limits.header_timeout
            } else {
                limits.timeout
            };
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) if http => return Ok((Outcome::HeadTimeout, buf)),
            Err(_) => return Ok((Outcome::Is(Protocol::Tcp), buf)),
            Ok(Ok(0)) if http => return Ok((Outcome::Closed, buf)),
            // The client closed its side before we could tell: whatever it sent is opaque.
            Ok(Ok(0)) => return Ok((Outcome::Is(Protocol::Tcp), buf)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// For a connection declared HTTP: HTTP/2 when it opens with the preface, else HTTP/1 (the
/// HTTP/1 server answers whatever it is). `None` when the preface did not complete within the
/// header timeout.
pub async fn detect_http_version<I: AsyncRead + Unpin>(
    io: &mut I,
    limits: &Limits,
) -> io::Result<Option<(Protocol, BytesMut)>> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    let deadline = Instant::now() + limits.header_timeout;
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if !buf.is_empty() && buf[..n] != H2_PREFACE[..n] {
            return Ok(Some((Protocol::Http1, buf)));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some((Protocol::Http2, buf)));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => return Ok(None),
            Ok(Ok(0)) if buf.is_empty() => return Ok(None),
            Ok(Ok(0)) => return Ok(Some((Protocol::Http1, buf))),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Reads from `io` until the protocol is known or `timeout` passes (then TCP), with the
/// default head limit and the timeout as header timeout too. Returns the protocol and the
/// bytes read, to be replayed.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> io::Result<(Protocol, BytesMut)> {
    let limits = Limits {
        timeout,
        header_timeout: timeout,
        max_head: DEFAULT_MAX_HEAD,
    };
    let (outcome, buf) = detect_with(io, &limits).await?;
    Ok(match outcome {
        Outcome::Is(p) => (p, buf),
        Outcome::HeadTimeout | Outcome::Closed => (Protocol::Tcp, buf),
    })
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

    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// The bytes not read yet, and the stream.
    pub fn into_parts(self) -> (BytesMut, I) {
        (self.prefix, self.io)
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
            if self.prefix.is_empty() {
                // Give the detection buffer back now rather than with the connection.
                self.prefix = BytesMut::new();
            }
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
        classify_prefix(b)
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
        assert_eq!(verdict(b"PING\r\n"), Some(Protocol::Tcp));
        assert_eq!(
            verdict(b"*3\r\n$3\r\nSET\r\n"),
            Some(Protocol::Tcp),
            "redis"
        );
        // Redis inline commands and HTTP/0.9 have no version: not HTTP/1.
        assert_eq!(verdict(b"GET foo\r\n"), Some(Protocol::Tcp));
        assert_eq!(verdict(b"SET a b\r\n"), Some(Protocol::Tcp));
    }

    #[test]
    fn unusual_http_is_still_http() {
        // Bare LF (RFC 9112 2.2 allows a server to accept it).
        assert_eq!(
            verdict(b"GET / HTTP/1.1\nHost: a\n\n"),
            Some(Protocol::Http1)
        );
        // Versions the HTTP/1 server answers itself (505 / 400) rather than passing opaquely.
        assert_eq!(verdict(b"GET / HTTP/1.2\r\n"), Some(Protocol::Http1));
        assert_eq!(verdict(b"GET / http/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(verdict(b"GET / HTTP/2.0\r\n"), Some(Protocol::Http1));
        // A custom method with a complete request line.
        assert_eq!(verdict(b"PURGE /x HTTP/1.1\r\n"), Some(Protocol::Http1));
        // A long request line with a registered method stays HTTP up to the head limit.
        let mut long = b"GET /".to_vec();
        long.extend(std::iter::repeat_n(b'a', 9000));
        assert_eq!(verdict(&long), None);
        long.extend(std::iter::repeat_n(b'a', DEFAULT_MAX_HEAD));
        assert_eq!(verdict(&long), Some(Protocol::Http1));
        // Not so for an unknown method.
        let mut long = b"FOO /".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_UNKNOWN_LINE));
        assert_eq!(verdict(&long), Some(Protocol::Tcp));
        // A partial line ending in CR waits for its LF.
        assert_eq!(verdict(b"GET / HTTP/1.1\r"), None);
    }

    #[test]
    fn versions() {
        let mut b = *b"GET / HTTP/1.2\r\nHost: a\r\n\r\n";
        assert_eq!(request_version(&mut b), Version::Supported);
        assert_eq!(&b[..16], b"GET / HTTP/1.1\r\n");
        let mut b = *b"GET / HTTP/1.0\n";
        assert_eq!(request_version(&mut b), Version::Supported);
        assert_eq!(&b, b"GET / HTTP/1.0\n");
        assert_eq!(
            request_version(&mut b"GET / HTTP/2.0\r\n".to_vec()),
            Version::Unsupported
        );
        assert_eq!(
            request_version(&mut b"GET / HTTP/3.0\r\n".to_vec()),
            Version::Unsupported
        );
        assert_eq!(
            request_version(&mut b"GET / http/1.1\r\n".to_vec()),
            Version::Malformed
        );
    }

    #[test]
    fn registered_methods_wait_as_http() {
        assert_eq!(
            classify(b"GET / HT", DEFAULT_MAX_HEAD),
            Verdict::NeedMore { http: true }
        );
        assert_eq!(
            classify(b"FOO / HT", DEFAULT_MAX_HEAD),
            Verdict::NeedMore { http: false }
        );
    }

    #[test]
    fn decisions_are_stable_as_bytes_arrive() {
        let inputs: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\nHost: a\n\n",
            b"FOO bar baz\r\n",
            b"GET foo\r\n",
            H2_PREFACE,
            b"\x16\x03\x01\x02\x00",
            b"GET /\x01 HTTP/1.1\r\n",
            &[b"FOO /".as_slice(), &[b'a'; 8186], b" HTTP/1.1\r\n"].concat(),
            &[b"GET /".as_slice(), &[b'a'; 70000], b"\r\n"].concat(),
            b"GET /\r HTTP/1.1\r\n",
        ];
        for input in inputs {
            let full = verdict(input);
            let n = input.len();
            // Every prefix of a short input; of a long one, a sample and the last bytes.
            for i in (1..n).filter(|i| {
                n < 2000
                    || i % 509 == 0
                    || *i + 64 > n
                    || *i + 64 > MAX_UNKNOWN_LINE && *i < MAX_UNKNOWN_LINE + 64
            }) {
                if let Some(p) = verdict(&input[..i]) {
                    assert_eq!(Some(p), full, "{:?} at {i}", String::from_utf8_lossy(input));
                }
            }
        }
    }

    fn limits(ms: u64) -> Limits {
        Limits {
            timeout: Duration::from_millis(ms),
            header_timeout: Duration::from_millis(ms * 4),
            max_head: DEFAULT_MAX_HEAD,
        }
    }

    #[tokio::test]
    async fn slow_http_request_line_times_out_as_http() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GET / HT").await.unwrap();
        let start = std::time::Instant::now();
        let (o, buf) = detect_with(&mut a, &limits(50)).await.unwrap();
        assert_eq!(o, Outcome::HeadTimeout);
        assert_eq!(&buf[..], b"GET / HT");
        assert!(start.elapsed() >= Duration::from_millis(200));
        // An unknown token gives up at the detection timeout, as opaque TCP.
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"FOO / HT").await.unwrap();
        let (o, _) = detect_with(&mut a, &limits(50)).await.unwrap();
        assert_eq!(o, Outcome::Is(Protocol::Tcp));
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
