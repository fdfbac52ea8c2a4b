//! The proxy: accepts connections on the outbound, inbound and explicit upstream listeners,
//! detects their protocol and hands them to HTTP or TCP proxying toward a [`Destination`].

mod declared;
pub mod detect;
pub mod http;
pub mod tcp;
pub mod window;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::balance::{BalanceSettings, Balancer, Endpoint};
use crate::config::policy::{Policy, PolicySpec};
use crate::config::{AppHost, Config, ServiceRef};
use crate::discovery::{DeclaredProtocol, Resolve};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use detect::{PrefixedIo, Protocol};
use http::destination::Parts;
pub use http::destination::{Destination, Direction, InboundLimits, Resilience, Route};
use http::{edge, h2_guard};

/// The shared state of all listeners.
pub struct Proxy {
    metrics: Arc<Metrics>,
    resolver: Arc<dyn Resolve>,
    readiness: Readiness,
    settings: BalanceSettings,
    /// The config file's `defaults:` policy layer.
    defaults: PolicySpec,
    detect: detect::Limits,
    http: edge::Settings,
    /// `detect.opaque_ports` and `detect.server_first_ports` (see [`Proxy::declared_protocol`]).
    opaque_ports: crate::discovery::PortSet,
    outbound: Mutex<HashMap<ServiceRef, Held>>,
    /// `discovery.evict_after`: a destination unused this long is dropped with its watch.
    evict_after: Duration,
    /// Inbound targets by delivery address: the original destination (`inbound.app_host:
    /// original_dst`, the default), else `app_host:<original port>`.
    inbound: Mutex<HashMap<SocketAddr, Arc<Destination>>>,
    passthrough: Arc<Destination>,
    limits: Option<Arc<InboundLimits>>,
    app_host: AppHost,
    /// meshlet's own ports and their listeners' names: inbound never forwards to them.
    own_ports: Vec<(u16, &'static str)>,
    /// Own ports already warned about (each is logged at warn once, then at debug).
    warned_ports: Mutex<HashSet<u16>>,
    /// Whether a non-local original destination was already warned about.
    warned_not_local: AtomicBool,
    pub tasks: TaskTracker,
    pub drain: CancellationToken,
    /// HTTP/2 client connections: stream limits, the abuse guard, GOAWAY at the grace's end.
    pub h2: Arc<h2_guard::Limits>,
}

/// A destination service the proxy holds: its target, and what eviction needs to know.
struct Held {
    target: Arc<Destination>,
    /// The last time a connection asked for it.
    last_used: std::time::Instant,
    /// Named in the config (static services, upstream listeners, declared dependencies): kept
    /// for the proxy's lifetime.
    pinned: bool,
    /// The task applying discovery's updates: aborting it drops the update stream, which ends
    /// the discovery watch.
    follow: tokio::task::AbortHandle,
}

/// Which listener accepted a connection.
#[derive(Debug, Clone)]
pub enum Listener {
    Outbound,
    Inbound,
    Upstream(ServiceRef),
}

/// Counts a connection in a gauge (open, parked) while it lives.
struct Counted(prometheus::IntGauge);

impl Counted {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Counted(gauge)
    }
}

impl Drop for Counted {
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
        own_ports: Vec<(u16, &'static str)>,
    ) -> Arc<Proxy> {
        let tasks = TaskTracker::new();
        let http = edge::Settings::from_config(&config.http);
        let passthrough = Arc::new(Destination::new(
            Direction::Outbound,
            "passthrough".into(),
            Route::None,
            Policy::default(),
            Parts {
                metrics: &metrics,
                tasks: &tasks,
                limits: None,
                stream_idle_timeout: http.stream_idle_timeout,
            },
        ));
        let limits = config.inbound.as_ref().and_then(|i| {
            let concurrency = i
                .concurrency_limit
                .map(|n| crate::limits::ConcurrencyLimit::new(n as usize));
            let rate = i.rate_limit.map(|r| {
                let burst = i.rate_limit_burst.unwrap_or(r.ceil().max(1.0) as u32);
                crate::limits::RateLimit::new(r, burst)
            });
            (concurrency.is_some() || rate.is_some())
                .then(|| Arc::new(InboundLimits { concurrency, rate }))
        });
        let h2 = h2_guard::Limits::new(&config.http2, &metrics.registry);
        Arc::new(Proxy {
            metrics,
            resolver,
            readiness,
            settings: BalanceSettings {
                default_rtt: config.balance.default_rtt.0,
                decay: config.balance.decay.0,
                sync_timeout: config.discovery.sync_timeout.0,
            },
            defaults: config.defaults.clone(),
            detect: detect::Limits {
                timeout: config.detect.timeout.0,
                header_timeout: http.header_timeout,
                max_head: http.max_header_bytes,
            },
            http,
            opaque_ports: declared::opaque_ports(config),
            outbound: Mutex::new(HashMap::new()),
            evict_after: config.discovery.evict_after.0,
            inbound: Mutex::new(HashMap::new()),
            passthrough,
            limits,
            app_host: config
                .inbound
                .as_ref()
                .map_or(AppHost::OriginalDst, |i| i.app_host),
            own_ports,
            warned_ports: Mutex::new(HashSet::new()),
            warned_not_local: AtomicBool::new(false),
            tasks,
            drain,
            h2,
        })
    }

    fn parts(&self, limits: Option<Arc<InboundLimits>>) -> Parts<'_> {
        Parts {
            metrics: &self.metrics,
            tasks: &self.tasks,
            limits,
            stream_idle_timeout: self.http.stream_idle_timeout,
        }
    }

    /// The target for a destination service, created (and its discovery started) on first use.
    pub fn service(&self, name: &ServiceRef) -> Arc<Destination> {
        self.hold(name, false)
    }

    /// The target for a service named in the config: never evicted.
    pub fn pinned_service(&self, name: &ServiceRef) -> Arc<Destination> {
        self.hold(name, true)
    }

    fn hold(&self, name: &ServiceRef, pin: bool) -> Arc<Destination> {
        let mut map = self.outbound.lock();
        if let Some(h) = map.get_mut(name) {
            h.last_used = std::time::Instant::now();
            h.pinned |= pin;
            return h.target.clone();
        }
        let label: Arc<str> = name.to_string().into();
        let balancer = Balancer::new(
            label.clone(),
            self.settings,
            &self.metrics,
            Default::default(),
        );
        let t = Arc::new(Destination::new(
            Direction::Outbound,
            label,
            Route::Balanced(balancer),
            self.defaults.resolve(),
            self.parts(None),
        ));
        let ready = self.readiness.register(format!("discovery of {name}"));
        let updates = self.resolver.resolve(name);
        let follow = Destination::follow(Arc::downgrade(&t), updates, ready, self.defaults.clone());
        let follow = tokio::spawn(follow).abort_handle();
        map.insert(
            name.clone(),
            Held {
                target: t.clone(),
                last_used: std::time::Instant::now(),
                pinned: pin,
                follow,
            },
        );
        self.metrics.destinations.set(map.len() as i64);
        t
    }

    /// Drops the destinations nobody has asked for in `discovery.evict_after` and nobody holds
    /// (no open connection, no request in flight), with their discovery watches and endpoint
    /// metric series: a sidecar that once touched many services keeps the memory and the
    /// watches of the ones it still uses. Returns how many were dropped.
    pub fn evict_unused(&self, now: std::time::Instant) -> usize {
        let mut evicted: HashSet<Arc<str>> = HashSet::new();
        {
            let mut map = self.outbound.lock();
            map.retain(|name, h| {
                let idle = now.saturating_duration_since(h.last_used);
                let keep =
                    h.pinned || idle < self.evict_after || Arc::strong_count(&h.target) > 1;
                if !keep {
                    tracing::debug!(service = %name, ?idle, "destination unused: dropped with its watch");
                    h.follow.abort();
                    evicted.insert(h.target.service.clone());
                }
                keep
            });
            self.metrics.destinations.set(map.len() as i64);
        }
        if !evicted.is_empty() {
            // Every series naming them goes (requests, latency, endpoints, breakers...), in one
            // pass and outside the lock that new connections take; a service asked for again
            // meanwhile keeps its new series.
            let held = |service: &str| {
                let map = self.outbound.lock();
                map.values().any(|h| &*h.target.service == service)
            };
            let gone = |service: &str| evicted.contains(service) && !held(service);
            self.metrics.forget("service", &gone);
        }
        evicted.len()
    }

    /// Runs [`Proxy::evict_unused`] every quarter of `discovery.evict_after` (at most every
    /// minute) until `stop`.
    pub async fn evict_loop(self: Arc<Self>, stop: CancellationToken) {
        let every =
            (self.evict_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            // Off the runtime: forgetting the series of thousands of destinations walks every
            // series (seconds at 300,000), which on a one-worker runtime would hold every
            // connection that long.
            let p = self.clone();
            let _ = tokio::task::spawn_blocking(move || p.evict_unused(std::time::Instant::now()))
                .await;
        }
    }

    /// Every destination service in use (the outbound targets), for the health model.
    pub fn outbound_targets(&self) -> Vec<(ServiceRef, Arc<Destination>)> {
        self.outbound
            .lock()
            .iter()
            .map(|(k, h)| (k.clone(), h.target.clone()))
            .collect()
    }

    /// Whether discovery has something to say about a service going stale.
    pub fn discovery_stale(&self, service: &ServiceRef) -> Option<String> {
        self.resolver.stale(service)
    }

    /// Every destination service in use and its endpoints' state, for the admin server's
    /// `/endpoints`.
    pub fn endpoints_report(&self) -> serde_json::Value {
        let targets: Vec<Arc<Destination>> = self
            .outbound
            .lock()
            .values()
            .map(|h| h.target.clone())
            .collect();
        let mut services: Vec<serde_json::Value> = targets
            .iter()
            .filter_map(|t| match &t.route {
                Route::Balanced(b) => {
                    let mut eps: Vec<_> = b.endpoints().into_values().collect();
                    eps.sort_by_key(|e| e.addr);
                    Some(serde_json::json!({
                        "service": &*t.service,
                        "endpoints": eps.iter().map(|e| e.report()).collect::<Vec<_>>(),
                    }))
                }
                _ => None,
            })
            .collect();
        services.sort_by(|a, b| a["service"].as_str().cmp(&b["service"].as_str()));
        serde_json::json!({ "services": services })
    }

    /// The inbound target for a connection's original destination `dst`: delivered to `dst`
    /// itself (the default) or to `inbound.app_host` at `dst`'s port. `None` (counted and
    /// logged) when the delivery address would be `dst` but `dst` is not an address of this
    /// pod: only a crafted packet gets here with such a destination, and forwarding it would
    /// make the sidecar an open relay to anywhere its pod may connect.
    fn inbound_target(&self, dst: SocketAddr) -> Option<Arc<Destination>> {
        let to = self.app_host.deliver_to(dst);
        if let Some(t) = self.inbound.lock().get(&to) {
            return Some(t.clone());
        }
        if self.app_host == AppHost::OriginalDst && !is_own_address(dst.ip()) {
            self.refuse_inbound("not_local");
            if self.warned_not_local.swap(true, Ordering::Relaxed) {
                tracing::debug!(%dst, "refusing an inbound connection to an address not of this pod");
            } else {
                tracing::warn!(
                    %dst,
                    "refusing an inbound connection to an address not of this pod (a crafted \
                     packet?); further ones are logged at debug"
                );
            }
            return None;
        }
        let port = dst.port();
        let mut map = self.inbound.lock();
        let t = map.entry(to).or_insert_with(|| {
            let label: Arc<str> = format!("app:{port}").into();
            Arc::new(Destination::new(
                Direction::Inbound,
                label,
                Route::Fixed(Endpoint::new(to, self.settings)),
                self.inbound_policy(),
                self.parts(self.limits.clone()),
            ))
        });
        Some(t.clone())
    }

    /// Which of meshlet's own listeners has `port`, if one does.
    fn own_port(&self, port: u16) -> Option<&'static str> {
        self.own_ports
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, name)| *name)
    }

    fn refuse_inbound(&self, reason: &str) {
        self.metrics
            .inbound_connections_refused
            .with_label_values(&[reason])
            .inc();
    }

    /// Refuses an inbound connection to one of meshlet's own ports: forwarded, a remote caller
    /// would reach the admin server (its `/shutdown`), the outbound or explicit listeners (an
    /// open relay into the mesh) or this very listener (a loop). Logged at warn once per port.
    fn refuse_own_port(&self, dst: SocketAddr, listener: &'static str) {
        self.refuse_inbound("meshlet_port");
        let port = dst.port();
        if self.warned_ports.lock().insert(port) {
            tracing::warn!(
                %dst, port, listener,
                "refusing an inbound connection to meshlet's own port; further ones to this \
                 port are logged at debug"
            );
        } else {
            tracing::debug!(%dst, port, listener, "refusing an inbound connection to meshlet's own port");
        }
    }

    /// Inbound delivery to the local app: the file's timeouts, but no retries, no breaker and
    /// no deduplication (those belong to the calling side's sidecar).
    fn inbound_policy(&self) -> Policy {
        let mut p = self.defaults.resolve();
        p.max_retries = 0;
        p.breaker = crate::breaker::Mode::Off;
        p.dedup = false;
        p
    }

    /// Accepts connections until the drain signal; each connection runs in a task of its own
    /// inside a span named for its direction. At most `max_connections` are open at once: one
    /// more is accepted and closed at once with a reset (the client learns it without waiting
    /// out a connect timeout in a full backlog, and nothing of it stays here), counted in
    /// `meshlet_connections_refused_total{reason="limit"}`; the open ones are not disturbed.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        kind: Listener,
        max_connections: u32,
    ) {
        let local = match listener.local_addr() {
            Ok(a) => a,
            Err(_) => return,
        };
        let direction = match kind {
            Listener::Inbound => Direction::Inbound,
            _ => Direction::Outbound,
        };
        let cap = crate::limits::ConcurrencyLimit::new(max_connections as usize);
        let refused = self
            .metrics
            .connections_refused
            .with_label_values(&[direction.as_str(), "limit"]);
        let mut warned: Option<std::time::Instant> = None;
        let mut refused_since_warning = 0u64;
        loop {
            let Some((stream, peer)) =
                crate::socket::accept(&listener, &self.drain, direction.as_str()).await
            else {
                return;
            };
            let Some(permit) = cap.try_acquire() else {
                refused.inc();
                refused_since_warning += 1;
                let _ = stream.set_zero_linger();
                drop(stream);
                // One line per 10 s at most while the listener stays full.
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    tracing::warn!(
                        listener = %local,
                        max_connections,
                        refused = refused_since_warning,
                        "listener at its connection limit: refusing new connections (max_connections)"
                    );
                    warned = Some(std::time::Instant::now());
                    refused_since_warning = 0;
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let kind = kind.clone();
            let span = tracing::info_span!("conn", direction = direction.as_str(), %peer);
            self.tasks.spawn(
                async move {
                    let _permit = permit;
                    let _open = Counted::new(
                        this.metrics
                            .open_connections
                            .with_label_values(&[direction.as_str()]),
                    );
                    match kind {
                        Listener::Outbound => this.outbound(stream, local).await,
                        Listener::Inbound => this.inbound(stream).await,
                        Listener::Upstream(svc) => {
                            let t = this.service(&svc);
                            let declared = this.declared_protocol(Some(&svc), None);
                            this.detect_and_proxy(stream, &t, local, declared).await
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

    /// The original destination of a redirected connection; `None` (logged and counted) when
    /// it cannot be read or is this very listener.
    fn original_dst(
        &self,
        stream: &TcpStream,
        local: SocketAddr,
        d: Direction,
    ) -> Option<SocketAddr> {
        let dst = match crate::socket::original_dst(stream) {
            Ok(dst) => dst,
            Err(error) => {
                tracing::warn!(%error, "cannot read the original destination");
                return None;
            }
        };
        if Self::is_own_listener(dst, local) {
            self.refuse_loop(d, dst);
            return None;
        }
        Some(dst)
    }

    async fn outbound(&self, stream: TcpStream, local: SocketAddr) {
        let Some(dst) = self.original_dst(&stream, local, Direction::Outbound) else {
            return;
        };
        match self.resolver.lookup(dst) {
            Some(svc) => {
                let t = self.service(&svc);
                tracing::debug!(%dst, service = %svc, "outbound");
                let declared = self.declared_protocol(Some(&svc), Some(dst.port()));
                self.detect_and_proxy(stream, &t, dst, declared).await
            }
            None => {
                self.count_conn(Direction::Outbound, "passthrough");
                tracing::debug!(%dst, "unknown destination; passing through");
                tcp::passthrough(
                    &self.passthrough,
                    stream,
                    dst,
                    self.http.stream_idle_timeout,
                )
                .await
            }
        }
    }

    /// Inbound: delivered to the app at the original destination (or `inbound.app_host`),
    /// never to meshlet's own ports, this listener's included (a connection that was not
    /// redirected has the listener's own address as its original destination).
    async fn inbound(&self, stream: TcpStream) {
        let dst = match crate::socket::original_dst(&stream) {
            Ok(dst) => dst,
            Err(error) => {
                tracing::warn!(%error, "cannot read the original destination");
                return;
            }
        };
        if let Some(listener) = self.own_port(dst.port()) {
            return self.refuse_own_port(dst, listener);
        }
        let Some(t) = self.inbound_target(dst) else {
            return;
        };
        tracing::debug!(%dst, to = %self.app_host.deliver_to(dst), "inbound");
        let declared = self.declared_protocol(None, Some(dst.port()));
        self.detect_and_proxy(stream, &t, dst, declared).await
    }

    fn count_conn(&self, direction: Direction, protocol: &str) {
        self.metrics
            .connections
            .with_label_values(&[direction.as_str(), protocol])
            .inc();
    }

    fn count_detect(&self, direction: Direction, result: &str) {
        self.metrics
            .protocol_detect
            .with_label_values(&[direction.as_str(), result])
            .inc();
    }

    /// Detects the protocol (unless `declared`) and proxies. `dst` is what the client
    /// connected to (the original destination, or the explicit listener's address).
    async fn detect_and_proxy(
        &self,
        mut stream: TcpStream,
        t: &Arc<Destination>,
        dst: SocketAddr,
        declared: Option<DeclaredProtocol>,
    ) {
        let idle = self.http.stream_idle_timeout;
        match declared {
            None => {}
            Some(DeclaredProtocol::Opaque) => {
                self.count_detect(t.direction, "declared");
                self.count_conn(t.direction, Protocol::Tcp.as_str());
                return tcp::proxy(t, stream, bytes::BytesMut::new(), idle).await;
            }
            Some(DeclaredProtocol::Http2) => {
                self.count_detect(t.direction, "declared");
                self.count_conn(t.direction, Protocol::Http2.as_str());
                let io = PrefixedIo::new(bytes::BytesMut::new(), stream);
                let conn = edge::ConnState::new(dst, self.http);
                let now = tokio::time::Instant::now();
                return serve_http(
                    io,
                    Protocol::Http2,
                    t.clone(),
                    self.drain.clone(),
                    conn,
                    now,
                    &self.h2,
                )
                .await;
            }
            Some(DeclaredProtocol::Http1) => {
                // HTTP of either version, never opaque: a silent client is an HTTP client
                // that connected ahead of use, and bytes that are not HTTP get an HTTP error.
                self.count_detect(t.direction, "declared");
                match tokio::time::timeout(idle, first_byte(&stream)).await {
                    Ok(Ok(true)) => {}
                    _ => return,
                }
                let first = tokio::time::Instant::now();
                let (proto, prefix) =
                    match detect::detect_http_version(&mut stream, &self.detect).await {
                        Ok(Some(d)) => d,
                        Ok(None) => {
                            let _ = write_and_close(
                                &mut stream,
                                &edge::timeout_response(self.http.header_timeout),
                            )
                            .await;
                            return;
                        }
                        Err(_) => return,
                    };
                self.count_conn(t.direction, proto.as_str());
                let io = PrefixedIo::new(prefix, stream);
                let conn = edge::ConnState::new(dst, self.http);
                return serve_http(
                    io,
                    proto,
                    t.clone(),
                    self.drain.clone(),
                    conn,
                    first,
                    &self.h2,
                )
                .await;
            }
        }
        // Wait for the first bytes without holding a buffer: idle connections stay cheap.
        match tokio::time::timeout(self.detect.timeout, first_byte(&stream)).await {
            Err(_) => self.silent(stream, t, dst).await,
            Ok(Err(error)) => tracing::debug!(%error, "connection failed before its first byte"),
            Ok(Ok(false)) => tracing::debug!("connection closed before its first byte"),
            Ok(Ok(true)) => self.detect_then_proxy(stream, t, dst, None, true).await,
        }
    }

    /// Detects on the client's first bytes, then proxies: HTTP through the HTTP server, opaque
    /// TCP to an endpoint (over `up` when a connection was made already).
    async fn detect_then_proxy(
        &self,
        mut stream: TcpStream,
        t: &Arc<Destination>,
        dst: SocketAddr,
        up: Option<tcp::Upstream>,
        count: bool,
    ) {
        let first_byte = tokio::time::Instant::now();
        let idle = self.http.stream_idle_timeout;
        let (outcome, prefix) = match detect::detect_with(&mut stream, &self.detect).await {
            Ok(d) => d,
            Err(error) => {
                tracing::debug!(%error, "connection failed during protocol detection");
                return;
            }
        };
        let mut prefix = prefix;
        let proto = match outcome {
            detect::Outcome::Is(Protocol::Http1)
                if detect::request_version(&mut prefix) == detect::Version::Unsupported =>
            {
                if count {
                    self.count_detect(t.direction, "http1");
                }
                self.count_conn(t.direction, Protocol::Http1.as_str());
                let rsp = "HTTP/1.1 505 HTTP Version Not Supported\r\nconnection: close\r\n\
                           content-length: 0\r\nmeshlet-error: only HTTP/1.x request lines \
                           are supported (HTTP/2 starts with its connection preface)\r\n\r\n";
                write_and_close(&mut stream, rsp).await;
                return;
            }
            detect::Outcome::Is(p) => p,
            detect::Outcome::HeadTimeout => {
                if count {
                    self.count_detect(t.direction, "http1");
                }
                self.count_conn(t.direction, Protocol::Http1.as_str());
                tracing::debug!("request line not received within http.header_timeout");
                write_and_close(
                    &mut stream,
                    &edge::timeout_response(self.http.header_timeout),
                )
                .await;
                return;
            }
            detect::Outcome::Closed => return,
        };
        if count {
            let result = if proto == Protocol::Http2 {
                "h2"
            } else {
                proto.as_str()
            };
            self.count_detect(t.direction, result);
        }
        self.count_conn(t.direction, proto.as_str());
        match (proto, up) {
            (Protocol::Tcp, Some(up)) => tcp::proxy_to(t, stream, up, prefix, idle).await,
            (Protocol::Tcp, None) => tcp::proxy(t, stream, prefix, idle).await,
            (Protocol::Http1 | Protocol::Http2, up) => {
                // A connection made while the client was silent is not needed for HTTP.
                drop(up);
                let io = PrefixedIo::new(prefix, stream);
                let conn = edge::ConnState::new(dst, self.http);
                serve_http(
                    io,
                    proto,
                    t.clone(),
                    self.drain.clone(),
                    conn,
                    first_byte,
                    &self.h2,
                )
                .await
            }
        }
    }

    /// A client that said nothing within the detection timeout: an HTTP client that connected
    /// ahead of use, or a protocol whose server speaks first. An endpoint connection is made
    /// and both sides are watched: if the server speaks first, it is opaque TCP over that
    /// connection; if the client does, detection runs on its bytes as usual (HTTP stays HTTP,
    /// balanced per request). Nothing from either side for `http.stream_idle_timeout` closes
    /// both; so does finding no endpoint to connect to.
    async fn silent(&self, stream: TcpStream, t: &Arc<Destination>, dst: SocketAddr) {
        self.count_detect(t.direction, "timeout");
        let idle = self.http.stream_idle_timeout;
        let mut up = tcp::connect(t).await;
        if up.is_none() {
            // Nothing to talk to: a server-speaks-first client learns it at once, and an HTTP
            // client that connected ahead of use connects again when it has a request.
            self.count_conn(t.direction, Protocol::Tcp.as_str());
            return;
        }
        let quiet_until = tokio::time::sleep(idle);
        tokio::pin!(quiet_until);
        loop {
            let server_spoke = async {
                match &up {
                    Some(u) => first_byte(&u.stream).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = first_byte(&stream) => {
                    if matches!(r, Ok(true)) {
                        self.detect_then_proxy(stream, t, dst, up, false).await;
                    }
                    return;
                }
                r = server_spoke => {
                    if !matches!(r, Ok(true)) {
                        // The endpoint closed the connection before anyone spoke: wait for the
                        // client alone; it gets a new connection if it turns out to be TCP.
                        up = None;
                        continue;
                    }
                    self.count_conn(t.direction, Protocol::Tcp.as_str());
                    let up = up.take().expect("checked above");
                    return tcp::proxy_to(t, stream, up, bytes::BytesMut::new(), idle).await;
                }
                _ = &mut quiet_until => {
                    tracing::debug!("closing a connection on which nobody spoke for http.stream_idle_timeout");
                    return;
                }
            }
        }
    }
}

/// Serves one client connection with hyper, every request through [`http::handle`]. HTTP/1
/// runs behind [`edge::EdgeIo`] (idle and head timers, 408); HTTP/2 connections with no open
/// stream for `http.idle_timeout` are sent GOAWAY. On the drain signal the connection shuts
/// down gracefully: in-flight requests finish, HTTP/1.1 stops keeping alive, HTTP/2 sends
/// GOAWAY (see [`h2_guard`] for the HTTP/2 guard and the GOAWAY at the end of the shutdown
/// grace).
async fn serve_http(
    io: PrefixedIo<TcpStream>,
    proto: Protocol,
    t: Arc<Destination>,
    drain: CancellationToken,
    conn: Arc<edge::ConnState>,
    first_byte: tokio::time::Instant,
    h2: &Arc<h2_guard::Limits>,
) {
    let settings = conn.settings;
    let state = conn.clone();
    let direction = t.direction;
    let parked = t
        .metrics
        .parked_connections
        .with_label_values(&[direction.as_str()]);
    let svc = service_fn(move |req| http::handle(t.clone(), conn.clone(), req));
    let result = if proto == Protocol::Http2 {
        // h2_guard: the IO wrapper, a guard per stream, our GOAWAY when closing.
        let (io, guard) = h2.connection(io, direction);
        let conn = h2
            .configure(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(settings.max_header_bytes.min(u32::MAX as usize) as u32),
            )
            .serve_connection(TokioIo::new(io), guard.service(svc));
        let idle = idle_for(&state, settings.idle_timeout);
        let graceful = async {
            tokio::select! {
                _ = drain.cancelled() => {}
                _ = idle => {
                    tracing::debug!("closing an HTTP/2 connection idle for http.idle_timeout");
                }
            }
        };
        // Boxed: hyper's HTTP/2 connection is large (about 9 KiB measured), and inline it
        // would size every connection's task, a parked HTTP/1 or a silent one too, to it.
        Box::pin(guard.drive(conn, |c| c.graceful_shutdown(), graceful)).await
    } else {
        let deadline = first_byte + settings.header_timeout;
        serve_http1(io, svc, state, deadline, &drain, &parked).await
    };
    if let Err(error) = result {
        tracing::debug!(%error, "http connection ended with an error");
    }
}

/// An HTTP/1 connection idle this long leaves hyper and is parked: see [`serve_http1`].
const PARK_AFTER: Duration = Duration::from_secs(1);

/// Serves an HTTP/1 connection with hyper behind [`edge::EdgeIo`]. A connection with no
/// request in flight and no byte of a next one for [`PARK_AFTER`] is parked: hyper is stopped
/// (its state and buffers, about 16 KiB, are freed; the socket stays open) and the connection
/// waits for its next byte holding only the socket, then is served by a new hyper connection.
/// Bytes hyper had read but not parsed are put back in front. A parked connection is closed
/// quietly after `http.idle_timeout` from its last response, as hyper would, or on the drain
/// signal.
async fn serve_http1<S, B>(
    mut io: PrefixedIo<TcpStream>,
    svc: S,
    state: Arc<edge::ConnState>,
    mut head_deadline: tokio::time::Instant,
    drain: &CancellationToken,
    parked: &prometheus::IntGauge,
) -> hyper::Result<()>
where
    S: hyper::service::Service<
            ::http::Request<hyper::body::Incoming>,
            Response = ::http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Unpin
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let settings = state.settings;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // EdgeIo keeps the idle and head timers apart; hyper's one timer cannot.
        .header_read_timeout(None)
        // A client that half-closes after its request still gets its answer.
        .half_close(true)
        .max_header_size(settings.max_header_bytes);
    if settings.max_header_bytes > 256 * 1024 {
        builder.max_buf_size(settings.max_header_bytes + 64 * 1024);
    }
    loop {
        state.set_parking(false);
        let edge = edge::EdgeIo::new(io, state.clone(), settings, head_deadline);
        // Boxed: freed while the connection is parked, so that the task itself stays small.
        let mut conn = Box::new(
            builder
                .serve_connection(TokioIo::new(edge), svc.clone())
                .with_upgrades(),
        );
        let park = idle_for(&state, PARK_AFTER);
        tokio::pin!(park);
        let (mut parking, mut draining) = (false, false);
        loop {
            tokio::select! {
                r = &mut *conn => {
                    r?;
                    break;
                }
                _ = drain.cancelled(), if !draining => {
                    draining = true;
                    // A park under way becomes a close.
                    state.set_parking(false);
                    std::pin::Pin::new(&mut *conn).graceful_shutdown();
                }
                _ = &mut park, if !parking && !draining => {
                    parking = true;
                    state.set_parking(true);
                    std::pin::Pin::new(&mut *conn).graceful_shutdown();
                }
            }
        }
        if !parking || draining {
            return Ok(());
        }
        // `None`: upgraded meanwhile (the upgrade owns the stream now).
        let Some(parts) = conn.into_parts() else {
            return Ok(());
        };
        let (unread, stream) = parts.io.into_inner().into_inner().into_parts();
        // hyper's read buffer is freed here, not held while parked.
        let mut prefix = bytes::BytesMut::from(&parts.read_buf[..]);
        prefix.extend_from_slice(&unread);
        drop((parts.read_buf, parts.service, unread));
        if prefix.is_empty() {
            let _parked = Counted::new(parked.clone());
            let left = state
                .idle_for()
                .map_or(Duration::ZERO, |d| settings.idle_timeout.saturating_sub(d));
            tokio::select! {
                r = tokio::time::timeout(left, first_byte(&stream)) => {
                    if !matches!(r, Ok(Ok(true))) {
                        return Ok(());
                    }
                }
                _ = drain.cancelled() => return Ok(()),
            }
        }
        head_deadline = tokio::time::Instant::now() + settings.header_timeout;
        io = PrefixedIo::new(prefix, stream);
    }
}

/// Writes meshlet's own short answer (a 408 or 505) and closes, within a second.
async fn write_and_close(stream: &mut TcpStream, answer: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Waits until `stream` has a byte to read (true) or its peer closed (false), without reading
/// it. Readiness alone can be a false positive; a peek tells.
async fn first_byte(stream: &TcpStream) -> std::io::Result<bool> {
    loop {
        stream.readable().await?;
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            socket2::SockRef::from(stream).peek(&mut b)
        });
        match peeked {
            Ok(n) => return Ok(n > 0),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Resolves once a connection has had no request in flight (see [`edge::ConnState::idle_for`])
/// for `idle`.
async fn idle_for(state: &edge::ConnState, idle: Duration) {
    let mut wait = idle;
    loop {
        tokio::time::sleep(wait).await;
        match state.idle_for() {
            Some(d) if d >= idle => return,
            Some(d) => wait = idle - d,
            None => wait = idle,
        }
    }
}

/// Whether an address belongs to this host: binding a UDP socket to it succeeds only then.
/// Called only when a connection's original port equals our listener's, so rarely.
fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Whether `ip` is an address of this host (the pod), by the kernel's own routing: a UDP
/// socket connected to a local address gets that very address as its source (the local
/// table's route says so), any other gets the address of the interface it would leave by.
/// Unlike a bind test, `net.ipv4.ip_nonlocal_bind` does not fool it. Nothing is sent.
/// Called once per new inbound delivery address and for each refused connection.
fn is_own_address(ip: IpAddr) -> bool {
    if ip.is_loopback() {
        return true;
    }
    let any: IpAddr = match ip {
        IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let Ok(s) = std::net::UdpSocket::bind((any, 0)) else {
        return false;
    };
    s.connect((ip, 9)).is_ok() && s.local_addr().is_ok_and(|a| a.ip() == ip)
}

#[cfg(test)]
mod tests {
    use super::is_own_address;

    #[test]
    fn own_addresses_are_told_from_others() {
        assert!(is_own_address("127.0.0.1".parse().unwrap()));
        assert!(is_own_address("127.0.0.53".parse().unwrap()));
        // Documentation ranges (RFC 5737, RFC 3849): never an address of this host.
        assert!(!is_own_address("192.0.2.1".parse().unwrap()));
        assert!(!is_own_address("0.0.0.0".parse().unwrap()));
        if std::path::Path::new("/proc/net/if_inet6").exists() {
            assert!(is_own_address("::1".parse().unwrap()));
            assert!(!is_own_address("2001:db8::1".parse().unwrap()));
        }
    }
}

#[cfg(test)]
mod eviction_tests {
    use std::time::Instant;

    use super::*;
    use crate::config::Config;
    use crate::discovery::Chain;
    use crate::discovery::static_list::StaticResolver;

    /// A proxy over the config's static services, and its metrics.
    fn proxy(config: &Config) -> (Arc<Proxy>, Arc<crate::metrics::Metrics>) {
        let resolver = Arc::new(Chain {
            first: StaticResolver::new(&config.discovery.static_services),
            then: None,
        });
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let p = Proxy::new(
            config,
            resolver,
            metrics.clone(),
            Default::default(),
            Default::default(),
            Vec::new(),
        );
        (p, metrics)
    }

    #[tokio::test]
    async fn unused_destinations_are_dropped_with_their_watch() {
        let config = Config::parse(
            "c.yaml",
            "discovery:\n  evict_after: 10m\n  static:\n    - service: kept.prod\n      \
             endpoints: [\"127.0.0.1:1\"]\n    - service: a.prod\n      endpoints: \
             [\"127.0.0.1:2\"]\n    - service: b.prod\n      endpoints: [\"127.0.0.1:3\"]\n",
        )
        .unwrap();
        let (p, metrics) = proxy(&config);
        let name = |s: &str| ServiceRef::parse(s).unwrap();
        p.pinned_service(&name("kept.prod"));
        let a = p.service(&name("a.prod"));
        let b = p.service(&name("b.prod"));
        b.route.wait_synced().await;
        // It served a request: counted by status, in the latency histogram, with its endpoint.
        b.record_request(::http::StatusCode::OK, http::outcome::Class::Success, None);
        b.duration.observe(0.001);
        let text = metrics.render();
        for family in [
            "requests_total",
            "response_duration_seconds_count",
            "endpoints",
        ] {
            let series = format!("meshlet_{family}{{");
            let b_series = text
                .lines()
                .filter(|l| l.starts_with(&series) && l.contains("service=\"b.prod\""));
            assert_eq!(b_series.count(), 1, "{family}: {text}");
        }
        drop(b);
        assert_eq!(metrics.destinations.get(), 3);
        let t0 = Instant::now();
        // Used recently: nothing goes.
        assert_eq!(p.evict_unused(t0), 0);
        // Ten minutes on: b.prod goes; a.prod stays while held (an open connection), and
        // kept.prod, named in the config, always.
        let later = t0 + Duration::from_secs(601);
        assert_eq!(p.evict_unused(later), 1);
        let left: HashSet<String> = p
            .outbound_targets()
            .into_iter()
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(left, HashSet::from(["kept.prod".into(), "a.prod".into()]));
        assert_eq!(metrics.destinations.get(), 2);
        // None of its series is left (a sidecar that touched many services keeps none of them).
        let text = metrics.render();
        assert!(!text.contains("b.prod"), "{text}");
        drop(a);
        assert_eq!(p.evict_unused(later), 1);
        assert_eq!(metrics.destinations.get(), 1);
        // A dropped destination asked for again starts afresh.
        let b = p.service(&name("b.prod"));
        b.route.wait_synced().await;
        assert_eq!(b.route.len(), 1);
    }

    /// Evicting many destinations at once walks the series once, not once per destination
    /// (10,000 evicted at once in the eviction benchmark stalled the proxy when it did).
    #[tokio::test]
    async fn evicting_thousands_at_once_is_one_pass_over_the_series() {
        let config = Config::parse("c.yaml", "discovery:\n  evict_after: 1m\n").unwrap();
        let (p, metrics) = proxy(&config);
        const N: usize = 3000;
        for i in 0..N {
            let d = p.service(&ServiceRef::parse(&format!("s{i}.prod")).unwrap());
            d.record_request(::http::StatusCode::OK, http::outcome::Class::Success, None);
            d.duration.observe(0.001);
        }
        let started = Instant::now();
        assert_eq!(p.evict_unused(started + Duration::from_secs(61)), N);
        let took = started.elapsed();
        assert!(!metrics.render().contains("s1.prod"));
        // One pass over ~6 series x 3,000 takes milliseconds; a pass per destination took
        // minutes.
        assert!(took < Duration::from_secs(5), "eviction took {took:?}");
    }
}
