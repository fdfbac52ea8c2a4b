//! The proxy: accepts connections on the outbound, inbound and explicit upstream listeners,
//! detects their protocol and hands them to HTTP or TCP proxying toward a [`Target`].

pub mod body;
pub mod client;
pub mod detect;
pub mod http;
pub mod tcp;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::Histogram;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::balance::{BalanceSettings, Balancer, Endpoint};
use crate::config::{Config, ServiceRef};
use crate::discovery::Resolve;
use crate::metrics::Metrics;
use crate::readiness::{Readiness, lock};
use detect::{PrefixedIo, Protocol};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Where a connection's requests go.
pub enum Route {
    /// A destination service's endpoints, balanced per request.
    Balanced(Arc<Balancer>),
    /// One fixed endpoint (inbound: the local app's port).
    Fixed(Arc<Endpoint>),
    /// Nowhere (unknown destinations pass through without a route).
    None,
}

impl Route {
    /// Waits for the route's first endpoint set, if it has to.
    pub async fn wait_synced(&self) {
        if let Route::Balanced(b) = self {
            b.wait_synced().await
        }
    }

    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        match self {
            Route::Balanced(b) => b.pick(exclude),
            Route::Fixed(e) => Some(e.clone()).filter(|e| !exclude.contains(&e.addr)),
            Route::None => None,
        }
    }
}

/// A destination as the data path sees it: the route plus what it records. Built once per
/// service (or inbound port) and shared by every connection to it.
pub struct Target {
    pub direction: Direction,
    /// The metric label: `name.namespace`, `app:<port>` inbound, `passthrough`.
    pub service: Arc<str>,
    pub route: Route,
    pub metrics: Arc<Metrics>,
    pub duration: Histogram,
    /// Tasks that outlive a request (upgraded streams) are tracked for graceful shutdown.
    pub tasks: TaskTracker,
}

impl Target {
    pub(crate) fn byte_counters(&self) -> tcp::ByteCounters {
        let c = |flow| {
            self.metrics.tcp_bytes.with_label_values(&[
                self.direction.as_str(),
                &self.service,
                flow,
            ])
        };
        tcp::ByteCounters {
            to_server: c("to_server"),
            to_client: c("to_client"),
        }
    }
}

/// The shared state of all listeners.
pub struct Proxy {
    metrics: Arc<Metrics>,
    resolver: Arc<dyn Resolve>,
    readiness: Readiness,
    settings: BalanceSettings,
    detect_timeout: Duration,
    server_first_ports: Vec<u16>,
    outbound: Mutex<HashMap<ServiceRef, Arc<Target>>>,
    inbound: Mutex<HashMap<u16, Arc<Target>>>,
    passthrough: Arc<Target>,
    app_host: IpAddr,
    pub tasks: TaskTracker,
    pub drain: CancellationToken,
}

/// Which listener accepted a connection.
#[derive(Debug, Clone)]
pub enum Listener {
    Outbound,
    Inbound,
    Upstream(ServiceRef),
}

/// Counts a connection in the open-connections gauge while it lives.
struct OpenConn(prometheus::IntGauge);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Proxy {
    pub fn new(
        config: &Config,
        resolver: Arc<dyn Resolve>,
        metrics: Arc<Metrics>,
        readiness: Readiness,
        drain: CancellationToken,
    ) -> Arc<Proxy> {
        let tasks = TaskTracker::new();
        let passthrough = Arc::new(Target {
            direction: Direction::Outbound,
            service: "passthrough".into(),
            route: Route::None,
            duration: metrics
                .response_duration
                .with_label_values(&["outbound", "passthrough"]),
            metrics: metrics.clone(),
            tasks: tasks.clone(),
        });
        Arc::new(Proxy {
            metrics,
            resolver,
            readiness,
            settings: BalanceSettings {
                default_rtt: config.balance.default_rtt.0,
                decay: config.balance.decay.0,
                connect_timeout: config.connect_timeout.0,
                sync_timeout: config.discovery.sync_timeout.0,
            },
            detect_timeout: config.detect.timeout.0,
            server_first_ports: config.detect.server_first_ports.clone(),
            outbound: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            passthrough,
            app_host: config
                .inbound
                .as_ref()
                .map_or(IpAddr::from([127, 0, 0, 1]), |i| i.app_host.0),
            tasks,
            drain,
        })
    }

    /// The target for a destination service, created (and its discovery started) on first use.
    pub fn service(&self, name: &ServiceRef) -> Arc<Target> {
        let mut map = lock(&self.outbound);
        if let Some(t) = map.get(name) {
            return t.clone();
        }
        let label: Arc<str> = name.to_string().into();
        let balancer = Balancer::new(
            label.clone(),
            self.settings,
            self.metrics.endpoints.with_label_values(&[&label]),
        );
        let ready = self.readiness.register(format!("discovery of {name}"));
        let updates = self.resolver.resolve(name);
        tokio::spawn(balancer.clone().follow(updates, ready));
        let t = Arc::new(Target {
            direction: Direction::Outbound,
            duration: self
                .metrics
                .response_duration
                .with_label_values(&["outbound", &label]),
            service: label,
            route: Route::Balanced(balancer),
            metrics: self.metrics.clone(),
            tasks: self.tasks.clone(),
        });
        map.insert(name.clone(), t.clone());
        t
    }

    /// The inbound target for a local app port.
    fn inbound_target(&self, port: u16) -> Arc<Target> {
        let mut map = lock(&self.inbound);
        map.entry(port)
            .or_insert_with(|| {
                let label: Arc<str> = format!("app:{port}").into();
                Arc::new(Target {
                    direction: Direction::Inbound,
                    duration: self
                        .metrics
                        .response_duration
                        .with_label_values(&["inbound", &label]),
                    service: label,
                    route: Route::Fixed(Endpoint::new(
                        SocketAddr::new(self.app_host, port),
                        self.settings,
                    )),
                    metrics: self.metrics.clone(),
                    tasks: self.tasks.clone(),
                })
            })
            .clone()
    }

    /// Accepts connections until the drain signal; each connection runs in a task of its own
    /// inside a span named for its direction.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, kind: Listener) {
        let local = match listener.local_addr() {
            Ok(a) => a,
            Err(_) => return,
        };
        loop {
            let (stream, peer) = tokio::select! {
                _ = self.drain.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(listener = %local, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let kind = kind.clone();
            let direction = match kind {
                Listener::Inbound => Direction::Inbound,
                _ => Direction::Outbound,
            };
            let span = tracing::info_span!("conn", direction = direction.as_str(), %peer);
            self.tasks.spawn(
                async move {
                    let gauge = this
                        .metrics
                        .open_connections
                        .with_label_values(&[direction.as_str()]);
                    gauge.inc();
                    let _open = OpenConn(gauge);
                    match kind {
                        Listener::Outbound => this.outbound(stream, local).await,
                        Listener::Inbound => this.inbound(stream, local).await,
                        Listener::Upstream(svc) => {
                            let t = this.service(&svc);
                            this.detect_and_proxy(stream, &t, None).await
                        }
                    }
                }
                .instrument(span),
            );
        }
    }

    /// Is `dst` this very listener (a connection that was not redirected, or a redirect loop)?
    fn is_own_listener(dst: SocketAddr, local: SocketAddr) -> bool {
        dst == local || (dst.port() == local.port() && is_local_ip(dst.ip()))
    }

    fn refuse_loop(&self, direction: Direction, dst: SocketAddr) {
        self.metrics
            .redirect_loops
            .with_label_values(&[direction.as_str()])
            .inc();
        tracing::warn!(%dst, "refusing a connection to meshlet's own listener (redirect loop?)");
    }

    async fn outbound(&self, stream: TcpStream, local: SocketAddr) {
        let dst = match crate::socket::original_dst(&stream) {
            Ok(d) => d,
            Err(error) => {
                tracing::warn!(%error, "cannot read the original destination");
                return;
            }
        };
        if Self::is_own_listener(dst, local) {
            return self.refuse_loop(Direction::Outbound, dst);
        }
        match self.resolver.lookup(dst) {
            Some(svc) => {
                let t = self.service(&svc);
                tracing::debug!(%dst, service = %svc, "outbound");
                self.detect_and_proxy(stream, &t, Some(dst.port())).await
            }
            None => {
                self.count_conn(Direction::Outbound, "passthrough");
                tracing::debug!(%dst, "unknown destination; passing through");
                tcp::passthrough(&self.passthrough, stream, dst).await
            }
        }
    }

    async fn inbound(&self, stream: TcpStream, local: SocketAddr) {
        let dst = match crate::socket::original_dst(&stream) {
            Ok(d) => d,
            Err(error) => {
                tracing::warn!(%error, "cannot read the original destination");
                return;
            }
        };
        if Self::is_own_listener(dst, local) {
            return self.refuse_loop(Direction::Inbound, dst);
        }
        let t = self.inbound_target(dst.port());
        self.detect_and_proxy(stream, &t, Some(dst.port())).await
    }

    fn count_conn(&self, direction: Direction, protocol: &str) {
        self.metrics
            .connections
            .with_label_values(&[direction.as_str(), protocol])
            .inc();
    }

    /// Detects the protocol (skipped for server-speaks-first ports) and proxies.
    async fn detect_and_proxy(&self, mut stream: TcpStream, t: &Arc<Target>, port: Option<u16>) {
        let (proto, prefix) = if port.is_some_and(|p| self.server_first_ports.contains(&p)) {
            (Protocol::Tcp, bytes::BytesMut::new())
        } else {
            match detect::detect(&mut stream, self.detect_timeout).await {
                Ok(d) => d,
                Err(error) => {
                    tracing::debug!(%error, "connection failed during protocol detection");
                    return;
                }
            }
        };
        self.count_conn(t.direction, proto.as_str());
        match proto {
            Protocol::Tcp => tcp::proxy(t, stream, prefix).await,
            Protocol::Http1 | Protocol::Http2 => {
                let io = PrefixedIo::new(prefix, stream);
                serve_http(io, proto, t.clone(), self.drain.clone()).await
            }
        }
    }
}

/// Serves one client connection with hyper, every request through [`http::handle`]. On the
/// drain signal the connection shuts down gracefully: in-flight requests finish, HTTP/1.1
/// stops keeping alive, HTTP/2 sends GOAWAY.
async fn serve_http<I>(io: I, proto: Protocol, t: Arc<Target>, drain: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| http::handle(t.clone(), req));
    let io = TokioIo::new(io);
    let result = if proto == Protocol::Http2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(io, svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "http connection ended with an error");
    }
}

/// Whether an address belongs to this host: binding a UDP socket to it succeeds only then.
/// Called only when a connection's original port equals our listener's, so rarely.
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}
