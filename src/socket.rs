//! Listeners and the original destination of redirected connections.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// Binds a listener with SO_REUSEADDR (so a restarted proxy can bind while old connections
/// sit in TIME_WAIT) and a generous backlog. `what` names the listener in the error.
///
/// `[::]:port` is bound dual-stack: it takes IPv4 connections as well (as IPv4-mapped IPv6
/// addresses, which [`canonical`] and [`original_dst`] turn back into IPv4), whatever the
/// host's `net.ipv6.bindv6only`. So one address serves both families, the way `0.0.0.0` serves
/// all of IPv4, and it cannot be bound next to `0.0.0.0` on the same port (the config refuses
/// that). Any other IPv6 address is IPv6 only.
pub fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, BindError> {
    let inner = || -> io::Result<TcpListener> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        sock.set_reuse_address(true)?;
        if addr.is_ipv6() {
            sock.set_only_v6(!is_dual_stack(addr))?;
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

/// Whether [`bind`] binds this address for both IPv4 and IPv6: `[::]:port`.
pub fn is_dual_stack(addr: SocketAddr) -> bool {
    matches!(addr, SocketAddr::V6(a) if a.ip().is_unspecified())
}

/// The address families a listener bound by [`bind`] serves, for the startup log.
pub fn families(addr: SocketAddr) -> &'static str {
    if is_dual_stack(addr) {
        "IPv4 and IPv6"
    } else if addr.is_ipv6() {
        "IPv6"
    } else {
        "IPv4"
    }
}

/// An address as the client knows it: an IPv4-mapped IPv6 address (an IPv4 client of a
/// dual-stack listener) as the IPv4 address it is.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), a.port()),
            None => addr,
        },
        v4 => v4,
    }
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
/// redirected this is the listener's own address. An IPv4 connection accepted by a dual-stack
/// listener is an IPv4 connection to conntrack: it is asked the IPv4 way, and the answer is
/// IPv4.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let local = canonical(stream.local_addr()?);
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

/// The next connection on `listener`, or `None` once `stop` is cancelled: the one accept loop
/// of every server (proxy listeners, admin, gRPC health, the injector). A failed accept (out of
/// file descriptors and the like) is logged and retried after a short pause, not spun on.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    stop: &tokio_util::sync::CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(error) => {
                    tracing::warn!(listener = what, %error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv6() -> bool {
        std::path::Path::new("/proc/net/if_inet6").exists()
    }

    #[tokio::test]
    async fn the_unspecified_ipv6_address_takes_both_families() {
        if !ipv6() {
            println!("skipping: the kernel has IPv6 disabled");
            return;
        }
        let l = bind("[::]:0".parse().unwrap(), "test").unwrap();
        let port = l.local_addr().unwrap().port();
        for (client, peer_ip) in [("127.0.0.1", "127.0.0.1"), ("::1", "::1")] {
            let addr = SocketAddr::new(client.parse().unwrap(), port);
            let _c = TcpStream::connect(addr).await.unwrap();
            let (_s, peer) = l.accept().await.unwrap();
            assert_eq!(canonical(peer).ip().to_string(), peer_ip);
        }
        assert_eq!(families("[::]:1".parse().unwrap()), "IPv4 and IPv6");
    }

    #[tokio::test]
    async fn other_ipv6_addresses_are_ipv6_only() {
        if !ipv6() {
            println!("skipping: the kernel has IPv6 disabled");
            return;
        }
        let l = bind("[::1]:0".parse().unwrap(), "test").unwrap();
        let port = l.local_addr().unwrap().port();
        let v4 = SocketAddr::from(([127, 0, 0, 1], port));
        assert!(TcpStream::connect(v4).await.is_err());
        assert_eq!(families(l.local_addr().unwrap()), "IPv6");
        // `[::]` next to `0.0.0.0` on one port: the second bind fails (the config refuses it
        // before it gets here).
        let v4 = bind("0.0.0.0:0".parse().unwrap(), "test").unwrap();
        let port = v4.local_addr().unwrap().port();
        let e = bind(SocketAddr::new("::".parse().unwrap(), port), "admin.listen").unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot listen on [::]:{port} for admin.listen")),
            "{e}"
        );
    }

    #[test]
    fn canonical_maps_ipv4_mapped_addresses_back() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(canonical(a("[::ffff:10.1.2.3]:80")), a("10.1.2.3:80"));
        assert_eq!(canonical(a("[::1]:80")), a("[::1]:80"));
        assert_eq!(canonical(a("10.1.2.3:80")), a("10.1.2.3:80"));
    }
}
