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
use crate::policy::{Policy, PolicySpec};
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
    /// One fixed endpoint (inbound: the local app's port), with its policy.
    Fixed(Arc<Endpoint>, Arc<Policy>),
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

    /// The route's current policy.
    pub fn policy(&self) -> Arc<Policy> {
        match self {
            Route::Balanced(b) => b.policy(),
            Route::Fixed(_, p) => p.clone(),
            Route::None => Arc::new(Policy::default()),
        }
    }

    /// Picks an endpoint its breaker admits: `(endpoint, is the breaker's probe)`.
    pub fn pick_admitted(&self, exclude: &[SocketAddr]) -> Option<(Arc<Endpoint>, bool)> {
        match self {
            Route::Balanced(b) => b.pick_admitted(exclude),
            _ => self.pick(exclude).map(|e| (e, false)),
        }
    }

    /// Records an outcome on the endpoint's breaker (balanced routes only).
    pub fn record(
        &self,
        ep: &Endpoint,
        outcome: crate::balance::Outcome,
    ) -> Option<crate::breaker::Transition> {
        match self {
            Route::Balanced(b) => b.record(ep, outcome),
            _ => None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Endpoints known (0: the service has none at all).
    pub fn len(&self) -> usize {
        match self {
            Route::Balanced(b) => b.len(),
            Route::Fixed(..) => 1,
            Route::None => 0,
        }
    }

    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        match self {
            Route::Balanced(b) => b.pick(exclude),
            Route::Fixed(e, _) => Some(e.clone()).filter(|e| !exclude.contains(&e.addr)),
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
    /// Inbound limits protecting the local app (inbound targets only).
    pub limits: Option<Arc<InboundLimits>>,
    /// The retry budget and deduplication of the current policy.
    resilience: Mutex<Option<Arc<Resilience>>>,
    /// Recent request outcomes (success rate, latency, last error) for the health model.
    pub window: crate::health::window::Window,
}

/// Limits on requests to the local app, shared by every inbound port.
pub struct InboundLimits {
    pub concurrency: Option<crate::limits::ConcurrencyLimit>,
    pub rate: Option<crate::limits::RateLimit>,
}

/// The state a destination's policy calls for: built when the policy changes, shared by its
/// requests.
pub struct Resilience {
    pub policy: Arc<Policy>,
    pub budget: crate::retry::RetryBudget,
    pub dedup: Option<crate::dedup::Dedup>,
    /// What counts as a failure for the breaker.
    pub failures: crate::breaker::FailureClass,
}

impl Target {
    fn new(
        direction: Direction,
        service: Arc<str>,
        route: Route,
        metrics: &Arc<Metrics>,
        tasks: &TaskTracker,
        limits: Option<Arc<InboundLimits>>,
    ) -> Target {
        Target {
            direction,
            duration: metrics
                .response_duration
                .with_label_values(&[direction.as_str(), &service]),
            service,
            route,
            metrics: metrics.clone(),
            tasks: tasks.clone(),
            limits,
            resilience: Mutex::new(None),
            window: crate::health::window::Window::new(),
        }
    }

    /// The policy and what it calls for, rebuilt when the policy changed.
    pub fn resilience(&self) -> Arc<Resilience> {
        let policy = self.route.policy();
        let mut slot = lock(&self.resilience);
        if let Some(r) = slot.as_ref() {
            if Arc::ptr_eq(&r.policy, &policy) || *r.policy == *policy {
                return r.clone();
            }
        }
        let dedup = policy.dedup.then(|| {
            crate::dedup::Dedup::new(
                crate::dedup::Settings {
                    methods: policy.dedup_methods.0.clone(),
                    headers: policy.dedup_headers.0.clone(),
                    max_body: policy.dedup_max_body.0,
                    leader_timeout: policy.dedup_timeout.0,
                    max_waiters: policy.dedup_max_waiters as usize,
                },
                self.metrics
                    .dedup_coalesced
                    .with_label_values(&[&self.service]),
                self.metrics.dedup_saved.with_label_values(&[&self.service]),
            )
        });
        let r = Arc::new(Resilience {
            budget: crate::retry::RetryBudget::new(
                policy.retry_budget.0,
                policy.retry_budget_min,
                Duration::from_secs(10),
            ),
            dedup,
            failures: crate::breaker::FailureClass {
                http: policy.failure_statuses.0,
                grpc: policy.failure_grpc.0.clone(),
            },
            policy,
        });
        *slot = Some(r.clone());
        r
    }

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
    /// The config file's `defaults:` policy layer.
    defaults: PolicySpec,
    detect_timeout: Duration,
    server_first_ports: Vec<u16>,
    outbound: Mutex<HashMap<ServiceRef, Arc<Target>>>,
    inbound: Mutex<HashMap<u16, Arc<Target>>>,
    passthrough: Arc<Target>,
    limits: Option<Arc<InboundLimits>>,
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
        let passthrough = Arc::new(Target::new(
            Direction::Outbound,
            "passthrough".into(),
            Route::None,
            &metrics,
            &tasks,
            None,
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
            detect_timeout: config.detect.timeout.0,
            server_first_ports: config.detect.server_first_ports.clone(),
            outbound: Mutex::new(HashMap::new()),
            inbound: Mutex::new(HashMap::new()),
            passthrough,
            limits,
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
            self.defaults.clone(),
        );
        let ready = self.readiness.register(format!("discovery of {name}"));
        let updates = self.resolver.resolve(name);
        tokio::spawn(balancer.clone().follow(updates, ready));
        let t = Arc::new(Target::new(
            Direction::Outbound,
            label,
            Route::Balanced(balancer),
            &self.metrics,
            &self.tasks,
            None,
        ));
        map.insert(name.clone(), t.clone());
        t
    }

    /// Every destination service in use (the outbound targets), for the health model.
    pub fn outbound_targets(&self) -> Vec<(ServiceRef, Arc<Target>)> {
        lock(&self.outbound)
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect()
    }

    /// Whether discovery has something to say about a service going stale.
    pub fn discovery_stale(&self, service: &ServiceRef) -> Option<String> {
        self.resolver.stale(service)
    }

    /// Every destination service in use and its endpoints' state, for the admin server's
    /// `/endpoints`.
    pub fn endpoints_report(&self) -> serde_json::Value {
        let targets: Vec<Arc<Target>> = lock(&self.outbound).values().cloned().collect();
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

    /// The inbound target for a local app port.
    fn inbound_target(&self, port: u16) -> Arc<Target> {
        let mut map = lock(&self.inbound);
        map.entry(port)
            .or_insert_with(|| {
                let label: Arc<str> = format!("app:{port}").into();
                Arc::new(Target::new(
                    Direction::Inbound,
                    label,
                    Route::Fixed(
                        Endpoint::new(SocketAddr::new(self.app_host, port), self.settings),
                        Arc::new(self.inbound_policy()),
                    ),
                    &self.metrics,
                    &self.tasks,
                    self.limits.clone(),
                ))
            })
            .clone()
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
        let Some(dst) = self.original_dst(&stream, local, Direction::Inbound) else {
            return;
        };
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
