//! Wires config to discovery, proxy and admin; owns the startup order and the shutdown.
//!
//! Startup: every listener is bound first ([`App::bind`]), so a port conflict fails the start
//! with a clear error instead of half-starting; then the servers run ([`App::run`]).
//! Shutdown: the drain token stops the listeners from accepting, HTTP connections shut down
//! gracefully, and in-flight work gets up to `shutdown_grace` to finish.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::discovery::kubernetes::KubeResolver;
use crate::discovery::static_list::StaticResolver;
use crate::discovery::{Chain, Resolve};
use crate::metrics::Metrics;
use crate::ops::admin::Admin;
use crate::ops::health::probes::AppProbes;
use crate::proxy::{Listener, Proxy};
use crate::readiness::Readiness;
use crate::socket::{self, BindError};

/// The addresses the listeners are bound to (port 0 in the config becomes a real port here).
#[derive(Debug, Clone)]
pub struct Addresses {
    pub admin: SocketAddr,
    /// The gRPC health server (`admin.grpc_listen`), if configured.
    pub grpc: Option<SocketAddr>,
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub upstreams: Vec<SocketAddr>,
}

impl Addresses {
    /// meshlet's own ports, each with the name of its listener: the inbound listener never
    /// forwards to them.
    pub fn own_ports(&self) -> Vec<(u16, &'static str)> {
        let mut v = vec![(self.admin.port(), "admin")];
        v.extend(self.grpc.map(|a| (a.port(), "grpc_health")));
        v.extend(self.outbound.map(|a| (a.port(), "outbound")));
        v.extend(self.inbound.map(|a| (a.port(), "inbound")));
        v.extend(self.upstreams.iter().map(|a| (a.port(), "upstream")));
        v
    }
}

pub struct App {
    config: Config,
    admin_listener: TcpListener,
    grpc_listener: Option<TcpListener>,
    /// Each proxy listener, with its connection cap.
    listeners: Vec<(Listener, TcpListener, u32)>,
    addresses: Addresses,
    shutdown: CancellationToken,
    kube: Option<kube::Client>,
    app_probes: Option<Arc<AppProbes>>,
    /// The pod's own address (`POD_IP`), where the app probes go by default.
    pod_ip: Option<IpAddr>,
    /// Pod annotations (via the environment) that could not be used; counted at start.
    pod_errors: Vec<crate::config::policy::AnnotationError>,
}

impl App {
    /// Binds every configured listener; nothing is served yet.
    pub fn bind(config: Config) -> Result<App, BindError> {
        let admin_listener = socket::bind(config.admin.listen.0, "admin.listen")?;
        let mut listeners = Vec::new();
        let mut addresses = Addresses {
            admin: admin_listener.local_addr().map_err(|source| BindError {
                what: "admin.listen".into(),
                addr: config.admin.listen.0,
                source,
            })?,
            grpc: None,
            outbound: None,
            inbound: None,
            upstreams: Vec::new(),
        };
        let local = |l: &TcpListener, what: &str, addr: SocketAddr| {
            l.local_addr().map_err(|source| BindError {
                what: what.into(),
                addr,
                source,
            })
        };
        // Connection caps: the configured ones, else a share of what the memory limit holds.
        let proxy_listeners = usize::from(config.outbound.is_some())
            + usize::from(config.inbound.is_some())
            + config.upstreams.len();
        let default_cap = crate::limits::default_max_connections(
            crate::limits::cgroup_memory_limit(),
            crate::limits::fd_limit(),
            proxy_listeners,
        );
        let cap = |c: Option<crate::config::MaxConnections>| c.map_or(default_cap, |c| c.0);
        let mut grpc_listener = None;
        if let Some(g) = &config.admin.grpc_listen {
            let l = socket::bind(g.0, "admin.grpc_listen")?;
            addresses.grpc = Some(local(&l, "admin.grpc_listen", g.0)?);
            grpc_listener = Some(l);
        }
        if let Some(o) = &config.outbound {
            let l = socket::bind(o.listen.0, "outbound.listen")?;
            addresses.outbound = Some(local(&l, "outbound.listen", o.listen.0)?);
            listeners.push((Listener::Outbound, l, cap(o.max_connections)));
        }
        if let Some(i) = &config.inbound {
            let l = socket::bind(i.listen.0, "inbound.listen")?;
            addresses.inbound = Some(local(&l, "inbound.listen", i.listen.0)?);
            listeners.push((Listener::Inbound, l, cap(i.max_connections)));
        }
        for (n, u) in config.upstreams.iter().enumerate() {
            let what = format!("upstreams[{n}].listen");
            let l = socket::bind(u.listen.0, &what)?;
            addresses.upstreams.push(local(&l, &what, u.listen.0)?);
            listeners.push((
                Listener::Upstream(u.service.clone()),
                l,
                cap(u.max_connections),
            ));
        }
        Ok(App {
            config,
            admin_listener,
            grpc_listener,
            listeners,
            addresses,
            shutdown: CancellationToken::new(),
            kube: None,
            app_probes: None,
            pod_ip: None,
            pod_errors: Vec::new(),
        })
    }

    /// Builds the Kubernetes client when Kubernetes discovery is enabled (a kubeconfig, or the
    /// in-cluster service account). Nothing is contacted yet: the watches start in `run` and
    /// retry with backoff, so an unreachable API server delays readiness, not startup.
    pub async fn connect(&mut self) -> Result<(), String> {
        if self.kube.is_none() {
            if let Some(k) = self.config.discovery.kubernetes_enabled() {
                self.kube = Some(KubeResolver::client(k.kubeconfig.as_deref()).await?);
            }
        }
        Ok(())
    }

    /// The app's original kubelet probes (from `MESHLET_APP_PROBES`), served on the admin
    /// server's `/app-health/<container>/<probe>`.
    pub fn set_app_probes(&mut self, probes: Option<AppProbes>) {
        self.app_probes = probes.map(Arc::new);
    }

    /// The pod's own address (`POD_IP`, from `status.podIP`): the app probes run against it
    /// unless `inbound.app_host` says otherwise (see [`crate::config::pod::probe_host`]).
    pub fn set_pod_ip(&mut self, ip: Option<IpAddr>) {
        self.pod_ip = ip;
    }

    pub fn set_pod_errors(&mut self, errors: Vec<crate::config::policy::AnnotationError>) {
        self.pod_errors = errors;
    }

    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// Cancel it to start the graceful shutdown (signals and `/shutdown` do).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then drains. Returns whether every
    /// connection finished within the grace period.
    pub async fn run(mut self) -> bool {
        if let Err(e) = self.connect().await {
            tracing::error!(error = %e, "discovery.kubernetes: cannot start");
            return false;
        }
        let metrics = Arc::new(Metrics::new());
        for e in &self.pod_errors {
            metrics
                .policy_errors
                .with_label_values(&["pod", &e.key])
                .inc();
        }
        let readiness = Readiness::default();
        let kube = self
            .kube
            .take()
            .map(|c| KubeResolver::start(c, &readiness, metrics.clone()));
        let resolver = Arc::new(Chain {
            first: StaticResolver::new(&self.config.discovery.static_services),
            then: kube,
        });
        let detail: Arc<dyn Resolve> = resolver.clone();
        let drain = CancellationToken::new();
        let proxy = Proxy::new(
            &self.config,
            resolver,
            metrics.clone(),
            readiness.clone(),
            drain.clone(),
            self.addresses.own_ports(),
        );
        // Services named up front are resolved at startup, so readiness waits for them.
        for s in &self.config.discovery.static_services {
            proxy.pinned_service(&s.service.clone().into());
        }
        for u in &self.config.upstreams {
            proxy.pinned_service(&u.service);
        }
        // Declared dependencies are watched from the start, used or not.
        for d in self.config.health.declared() {
            proxy.pinned_service(&d.into());
        }
        let admin_stop = CancellationToken::new();
        tokio::spawn(proxy.clone().evict_loop(admin_stop.clone()));
        let dependencies = crate::ops::health::model::start(
            crate::ops::health::model::Settings::from_config(&self.config.health),
            proxy.clone(),
            metrics.clone(),
            admin_stop.clone(),
        );

        let report = proxy.clone();
        let admin = Arc::new(Admin {
            endpoints: Box::new(move || report.endpoints_report()),
            metrics,
            readiness,
            shutdown: self.shutdown.clone(),
            started: Instant::now(),
            detail: Box::new(move || detail.detail()),
            app_probes: self.app_probes.take(),
            probe_host: crate::config::pod::probe_host(self.config.inbound.as_ref(), self.pod_ip),
            dependencies,
            ready_requires: self.config.health.ready_requires,
            outage_grace: self.config.health.outage_grace.0,
        });
        let grpc_task = self.grpc_listener.take().map(|l| {
            let address = l.local_addr().ok();
            let families = address.map(socket::families);
            tracing::info!(?address, families, "gRPC health listening");
            tokio::spawn(crate::ops::health::grpc::serve(
                admin.clone(),
                l,
                admin_stop.clone(),
            ))
        });
        let admin_task = tokio::spawn(admin.serve(self.admin_listener, admin_stop.clone()));

        let mut servers = Vec::new();
        for (kind, l, max_connections) in self.listeners {
            let address = l.local_addr().ok();
            let families = address.map(socket::families);
            tracing::info!(listener = ?kind, ?address, families, max_connections, "listening");
            servers.push(tokio::spawn(proxy.clone().serve(l, kind, max_connections)));
        }
        tracing::info!(
            admin = %self.addresses.admin,
            families = socket::families(self.addresses.admin),
            version = crate::VERSION,
            "meshlet proxy started"
        );

        self.shutdown.cancelled().await;
        let grace = self.config.shutdown_grace.0;
        tracing::info!(grace = ?grace, "shutting down: draining connections");
        let started = Instant::now();
        drain.cancel();
        for s in servers {
            let _ = s.await;
        }
        proxy.tasks.close();
        let drained = tokio::time::timeout(grace, proxy.tasks.wait())
            .await
            .is_ok();
        if drained {
            tracing::info!(took = ?started.elapsed(), "drained");
        } else {
            tracing::warn!(
                open = proxy.tasks.len(),
                "shutdown grace period over; closing the remaining connections"
            );
            // HTTP/2 clients get a GOAWAY before the close, not a bare EOF.
            proxy.h2.close_all(Duration::from_millis(250)).await;
        }
        admin_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), admin_task).await;
        if let Some(t) = grpc_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        drained
    }
}
