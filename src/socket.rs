//! Listeners and the original destination of redirected connections.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// Binds a listener with SO_REUSEADDR (so a restarted proxy can bind while old connections
/// sit in TIME_WAIT) and a generous backlog. `what` names the listener in the error.
pub fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, BindError> {
    let inner = || -> io::Result<TcpListener> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        sock.set_reuse_address(true)?;
        if addr.is_ipv6() {
            // [::]:port serves IPv6 only; bind 0.0.0.0 separately for IPv4.
            sock.set_only_v6(true)?;
        }
        sock.set_nonblocking(true)?;
        sock.bind(&addr.into())?;
        sock.listen(1024)?;
        TcpListener::from_std(sock.into())
    };
    inner().map_err(|source| BindError {
        what: what.to_string(),
        addr,
        source,
    })
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {what}: {source}")]
pub struct BindError {
    pub what: String,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// The destination the client originally connected to, before an iptables REDIRECT sent it to
/// us (SO_ORIGINAL_DST for IPv4, IP6T_SO_ORIGINAL_DST for IPv6). For a connection that was not
/// redirected this is the listener's own address.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let addr = if local.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    let mut addr = addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original destination is not an inet address",
        )
    })?;
    // IP6T_SO_ORIGINAL_DST also reports our socket's flow label as `sin6_flowinfo` (the
    // client's, with net.ipv6.flowlabel_reflect), and a SocketAddrV6 compares and hashes its
    // flowinfo: left in, a service's virtual address would not match its own connections.
    if let SocketAddr::V6(a) = &mut addr {
        a.set_flowinfo(0);
    }
    Ok(addr)
}

/// Connects with TCP_NODELAY set (proxied requests are latency-bound, not throughput-bound).
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}
