//! Connections to one endpoint: an HTTP/1.1 pool of idle connections, one multiplexed HTTP/2
//! connection, and dedicated connections for upgrades and opaque TCP.
//!
//! Why our own small pool over hyper's connection API rather than hyper-util's `Client`: the
//! connection is established *before* the request is handed over, so a connect failure gives
//! the request back untouched ([`SendError::Connect`]) and the caller can send it to another
//! endpoint even when it has a streaming body; a request refused by a pooled connection that
//! the server closed meanwhile is retried on a fresh one the same way (hyper's
//! `try_send_request`). hyper-util's `Client` consumes the request on a connect error and
//! rewrites the HTTP/2 `:authority` to the pool key, which a transparent proxy must not do.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response, Version};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::net::TcpStream;

use super::body::Body;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 256;

/// Put in a response's extensions when its request had to open a new connection first: how
/// long that took. The balancer leaves it out of the endpoint's latency sample, so that the
/// first request to an endpoint (or after its connections idled out) does not make it look
/// slow and keep p2c away from it for the decay time.
#[derive(Debug, Clone, Copy)]
pub struct ConnectTime(pub Duration);

/// The timeouts of a destination's connections (from its policy).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Idle pooled HTTP/1.1 connections are closed after this long.
    pub idle: Duration,
}

pub struct Pool {
    addr: SocketAddr,
    /// Idle HTTP/1.1 connections, with when each became idle.
    idle_h1: Mutex<Vec<(http1::SendRequest<Body>, Instant)>>,
    /// A reaper task is running: it closes idle connections as their idle timeout passes.
    reaping: AtomicBool,
    /// The idle timeout of the latest connection returned (the destination's `idle_timeout`).
    idle_timeout_ns: AtomicU64,
    /// Held across a connect so that concurrent HTTP/2 requests share one new connection.
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: nothing was sent, the request is handed back.
    #[error("connect to {addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: io::Error,
        request: Box<Request<Body>>,
    },
    /// The request was (maybe partly) sent and then failed.
    #[error("upstream {addr}: {error}")]
    Upstream {
        addr: SocketAddr,
        error: hyper::Error,
    },
}

/// Hands an HTTP/1.1 connection back to its pool when the response body ends.
pub(crate) struct PoolReturn {
    pool: Arc<Pool>,
    sender: http1::SendRequest<Body>,
    idle_timeout: Duration,
}

impl PoolReturn {
    pub(crate) fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.pool.idle_h1.lock();
        if idle.len() < MAX_IDLE_H1 {
            idle.push((self.sender, Instant::now()));
            drop(idle);
            self.pool.reap_later(self.idle_timeout);
        }
    }
}

impl Pool {
    pub fn new(addr: SocketAddr) -> Arc<Pool> {
        Arc::new(Pool {
            addr,
            idle_h1: Mutex::new(Vec::new()),
            reaping: AtomicBool::new(false),
            idle_timeout_ns: AtomicU64::new(0),
            h2: tokio::sync::Mutex::new(None),
        })
    }

    /// Makes sure idle connections are closed once idle for `timeout`, whether or not another
    /// request comes: meshlet closes a kept-alive connection before the server does (its
    /// `idle_timeout` is shorter than common server keep-alives), so that no request is sent on
    /// a connection the server is closing. One task per endpoint while anything is idle; it
    /// holds the pool weakly, so a removed endpoint's connections close with its pool.
    fn reap_later(self: &Arc<Self>, timeout: Duration) {
        let ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        self.idle_timeout_ns.store(ns, Ordering::Relaxed);
        if self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.reaping.store(false, Ordering::Release);
            return;
        };
        let pool: Weak<Pool> = Arc::downgrade(self);
        rt.spawn(async move {
            loop {
                let next = match pool.upgrade() {
                    Some(p) => p.reap(Instant::now()),
                    None => return,
                };
                match next {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => return,
                }
            }
        });
    }

    /// Closes the idle connections whose timeout has passed (dropping a sender closes its
    /// connection). Returns how long until the next one's does; `None` when nothing is idle
    /// any more, and the reaper stops.
    fn reap(&self, now: Instant) -> Option<Duration> {
        let timeout = Duration::from_nanos(self.idle_timeout_ns.load(Ordering::Relaxed));
        let mut idle = self.idle_h1.lock();
        idle.retain(|(s, since)| !s.is_closed() && now.saturating_duration_since(*since) < timeout);
        match idle.iter().map(|(_, since)| *since).min() {
            Some(oldest) => Some(
                (oldest + timeout)
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(10)),
            ),
            None => {
                // Under the lock: a connection returned after this sees `false` and starts a
                // new reaper.
                self.reaping.store(false, Ordering::Release);
                None
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Opens a new TCP connection to the endpoint within the connect timeout.
    pub async fn connect_tcp(&self, timeout: Duration) -> io::Result<TcpStream> {
        match tokio::time::timeout(timeout, crate::socket::connect(self.addr)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )),
        }
    }

    /// Sends a request with the protocol the client used (HTTP/2 stays HTTP/2, HTTP/1.x stays
    /// HTTP/1.1).
    pub async fn send(
        self: &Arc<Self>,
        req: Request<Body>,
        t: Timeouts,
    ) -> Result<Response<Body>, SendError> {
        if req.version() == Version::HTTP_2 {
            self.send_h2(req, t).await
        } else {
            self.send_h1(req, t).await
        }
    }

    fn connect_error(&self, error: io::Error, request: Request<Body>) -> SendError {
        SendError::Connect {
            addr: self.addr,
            error,
            request: Box::new(request),
        }
    }

    fn upstream_error(&self, error: hyper::Error) -> SendError {
        SendError::Upstream {
            addr: self.addr,
            error,
        }
    }

    /// An idle connection that is ready for a request, dropping closed ones.
    async fn checkout_h1(&self, idle_timeout: Duration) -> Option<http1::SendRequest<Body>> {
        loop {
            let (mut sender, since) = self.idle_h1.lock().pop()?;
            if since.elapsed() > idle_timeout {
                // Stale: the server may be about to close it. Dropping closes it.
                continue;
            }
            // A connection returns to the pool as its response body ends; hyper marks it ready
            // a moment later, or closed if the server said `Connection: close`.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    async fn handshake_h1(
        &self,
        upgrades: bool,
        connect: Duration,
    ) -> io::Result<http1::SendRequest<Body>> {
        let io = TokioIo::new(self.connect_tcp(connect).await?);
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(io::Error::other)?;
        if upgrades {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
        } else {
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        Ok(sender)
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<Body>,
        t: Timeouts,
    ) -> Result<Response<Body>, SendError> {
        *req.version_mut() = Version::HTTP_11;
        loop {
            let started = Instant::now();
            let (mut sender, reused) = match self.checkout_h1(t.idle).await {
                Some(s) => (s, true),
                None => match self.handshake_h1(false, t.connect).await {
                    Ok(s) => (s, false),
                    Err(e) => return Err(self.connect_error(e, req)),
                },
            };
            let connect_time = (!reused).then(|| started.elapsed());
            match sender.try_send_request(req).await {
                Ok(mut rsp) => {
                    if let Some(d) = connect_time {
                        rsp.extensions_mut().insert(ConnectTime(d));
                    }
                    let ret = PoolReturn {
                        pool: self.clone(),
                        sender,
                        idle_timeout: t.idle,
                    };
                    return Ok(rsp.map(|b| Body::pooled(b, ret)));
                }
                Err(mut e) => match e.take_message() {
                    // The pooled connection was closed before our request went out: try a
                    // fresh one (a new connection failing this way is an upstream error).
                    Some(r) if reused => req = r,
                    _ => return Err(self.upstream_error(e.into_error())),
                },
            }
        }
    }

    async fn h2_sender(&self, connect: Duration) -> io::Result<http2::SendRequest<Body>> {
        let mut slot = self.h2.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let io = TokioIo::new(self.connect_tcp(connect).await?);
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(io)
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }

    async fn send_h2(
        &self,
        mut req: Request<Body>,
        t: Timeouts,
    ) -> Result<Response<Body>, SendError> {
        let mut retried = false;
        loop {
            let mut sender = match self.h2_sender(t.connect).await {
                Ok(s) => s,
                Err(e) => return Err(self.connect_error(e, req)),
            };
            match sender.try_send_request(req).await {
                Ok(rsp) => return Ok(rsp.map(Body::incoming)),
                Err(mut e) => match e.take_message() {
                    Some(r) if !retried => {
                        retried = true;
                        req = r;
                    }
                    _ => return Err(self.upstream_error(e.into_error())),
                },
            }
        }
    }

    /// Sends an HTTP/1.1 upgrade request (e.g. WebSocket) on a connection of its own, which
    /// becomes the upgraded stream after a `101 Switching Protocols`.
    pub async fn send_upgrade(
        &self,
        req: Request<Body>,
        t: Timeouts,
    ) -> Result<Response<Body>, SendError> {
        let mut sender = match self.handshake_h1(true, t.connect).await {
            Ok(s) => s,
            Err(e) => return Err(self.connect_error(e, req)),
        };
        match sender.send_request(req).await {
            Ok(rsp) => Ok(rsp.map(Body::incoming)),
            Err(e) => Err(self.upstream_error(e)),
        }
    }
}
