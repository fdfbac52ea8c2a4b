//! Kubernetes discovery with kube-rs's runtime watcher.
//!
//! Watch scope, chosen for a sidecar in every pod of a large cluster:
//! - **Services, cluster-wide, reduced on arrival** to what routing needs (cluster IPs, ports,
//!   their names and declared protocols, type). An app may call any ClusterIP, so the proxy
//!   must recognise all of them; Services are few next to endpoints and change rarely, and only
//!   a few hundred bytes per Service are kept (the watcher keeps no object store of its own
//!   here).
//! - **EndpointSlices only of the services this pod talks to**, watched by the
//!   `kubernetes.io/service-name` label in the service's namespace from the first connection
//!   (or at startup for services named in the config), each service's slices in a kube
//!   reflector store of their own. A pod never holds the endpoints of the whole cluster.
//!
//! Failures: the watchers reconnect with `WatchBackoff` (at most 4 s apart); while a watch is
//! failing the last known endpoints keep serving (a re-list replaces a set only when it
//! completes, so an API error never empties a service), and the staleness shows in `/ready`'s
//! detail and in the `meshlet_discovery_stale` gauge. A reconnected watch goes on from its last
//! resource version when the API server still has it, else lists again; each completed list
//! counts in `meshlet_discovery_watch_syncs_total`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, watch};

use super::{Change, DeclaredProtocol, Resolve, ServiceRef, Update, UpdateStream};
use crate::config::ServiceName;
use crate::config::policy::{AnnotationError, PolicySpec};
use crate::metrics::Metrics;
use crate::readiness::Readiness;

/// What routing needs of a Service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceInfo {
    pub cluster_ips: Vec<IpAddr>,
    /// The TCP ports.
    pub ports: Vec<PortInfo>,
    /// `ClusterIP: None`: clients connect to pod IPs directly; nothing to balance.
    pub headless: bool,
    /// `type: ExternalName`: a DNS alias with no cluster IP; nothing to balance.
    pub external_name: bool,
    /// The policy keys among the Service's `meshlet.dev/*` annotations.
    pub policy: PolicySpec,
    /// Annotations that could not be used (reported when the Service changes).
    pub policy_errors: Vec<AnnotationError>,
}

impl ServiceInfo {
    pub fn from_service(svc: &Service) -> Option<(ServiceName, ServiceInfo)> {
        let name = ServiceName {
            name: svc.metadata.name.clone()?,
            namespace: svc.metadata.namespace.clone()?,
        };
        let spec = svc.spec.as_ref()?;
        let external_name = spec.type_.as_deref() == Some("ExternalName");
        let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if let Some(ip) = &spec.cluster_ip {
            if !ips.contains(ip) {
                ips.push(ip.clone());
            }
        }
        let headless = ips.iter().any(|ip| ip == "None");
        let cluster_ips = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let name = p.name.clone().unwrap_or_default();
                Some(PortInfo {
                    port: u16::try_from(p.port).ok()?,
                    protocol: DeclaredProtocol::of_service_port(p.app_protocol.as_deref(), &name),
                    name,
                })
            })
            .collect();
        let (policy, policy_errors) = svc
            .metadata
            .annotations
            .as_ref()
            .map(PolicySpec::from_annotations)
            .unwrap_or_default();
        Some((
            name,
            ServiceInfo {
                cluster_ips,
                ports,
                headless,
                external_name,
                policy,
                policy_errors,
            },
        ))
    }

    /// A service port; `None` when the service has no such port. A reference without a port
    /// means the service's only port.
    pub fn port(&self, port: Option<u16>) -> Option<&PortInfo> {
        match port {
            Some(p) => self.ports.iter().find(|i| i.port == p),
            None if self.ports.len() == 1 => self.ports.first(),
            None => None,
        }
    }

    /// The port name of a service port (see [`ServiceInfo::port`]).
    pub fn port_name(&self, port: Option<u16>) -> Option<&str> {
        self.port(port).map(|p| p.name.as_str())
    }
}

/// What routing needs of a Service port.
#[derive(Debug, Clone, PartialEq)]
pub struct PortInfo {
    /// The service port.
    pub port: u16,
    /// The port's name; "" when unnamed.
    pub name: String,
    /// What the port declares it speaks (its `appProtocol`, else its name).
    pub protocol: Option<DeclaredProtocol>,
}

/// An endpoint's conditions as EndpointSlices state them (with the API's defaults for unset
/// fields: ready = true, serving = ready, terminating = false).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// The endpoints of one slice for a port name: address (with the slice's port for that name,
/// which resolves named target ports per slice) and conditions.
pub fn slice_endpoints(slice: &EndpointSlice, port_name: &str) -> Vec<(SocketAddr, Conditions)> {
    if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
        return Vec::new();
    }
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .find(|p| p.name.as_deref().unwrap_or("") == port_name)
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ep in &slice.endpoints {
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let cond = Conditions {
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        };
        for a in &ep.addresses {
            if let Ok(ip) = a.parse::<IpAddr>() {
                out.push((SocketAddr::new(ip, port), cond));
            }
        }
    }
    out
}

/// The endpoints to route to: the ready ones; when none is ready, the serving ones (including
/// terminating), as kube-proxy does; never an endpoint that is neither.
pub fn effective<'a>(
    all: impl Iterator<Item = &'a (SocketAddr, Conditions)> + Clone,
) -> HashSet<SocketAddr> {
    let ready: HashSet<SocketAddr> = all
        .clone()
        .filter(|(_, c)| c.ready)
        .map(|(a, _)| *a)
        .collect();
    if !ready.is_empty() {
        return ready;
    }
    all.filter(|(_, c)| c.serving).map(|(a, _)| *a).collect()
}

/// Health of one watch, for `/ready`'s detail and the staleness gauge.
#[derive(Default)]
struct WatchHealth {
    /// Since when, why, and when last the watch has failed.
    failing: BTreeMap<String, Failing>,
}

struct Failing {
    since: Instant,
    why: String,
    last: Instant,
}

/// A failing watch is retried with [`WatchBackoff`], at most [`WATCH_BACKOFF_MAX`] apart, and
/// each failed try is an error we see. A watch that resumes from its last resource version after
/// an outage yields no event until something changes, so "no error for longer than the longest
/// backoff" is what tells that it is working again.
const RECOVERED_AFTER: Duration = Duration::from_secs(10);

const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(250);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(4);

/// The backoff of a failing watch: from 250 ms doubling up to 4 s, each wait drawn between half
/// and all of its step. After an API server restart the watches resume within 5 s (kube's
/// default backoff grows to 30 s, so a restart could cost a sidecar's discovery half a minute),
/// and the jitter keeps a fleet of sidecars from reconnecting in step. It starts again from
/// 250 ms when the watch yields an event (kube's `StreamBackoff` resets it on every success), or
/// a minute after its last wait (`ResetTimerBackoff`). A watch that fails without ever yielding
/// an event keeps growing to the 4 s cap.
struct WatchBackoff {
    step: Duration,
}

impl WatchBackoff {
    fn new() -> kube::runtime::utils::ResetTimerBackoff<WatchBackoff> {
        kube::runtime::utils::ResetTimerBackoff::new(
            WatchBackoff {
                step: WATCH_BACKOFF_MIN,
            },
            Duration::from_secs(60),
        )
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let step = self.step;
        self.step = (step * 2).min(WATCH_BACKOFF_MAX);
        Some(step.mul_f64(0.5 + fastrand::f64() * 0.5))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.step = WATCH_BACKOFF_MIN;
    }
}

impl WatchHealth {
    /// Forgets failures not repeated within [`RECOVERED_AFTER`]; returns the watches that
    /// recovered so.
    fn expire(&mut self) -> Vec<String> {
        let gone: Vec<String> = self
            .failing
            .iter()
            .filter(|(_, f)| f.last.elapsed() > RECOVERED_AFTER)
            .map(|(w, _)| w.clone())
            .collect();
        for w in &gone {
            self.failing.remove(w);
        }
        gone
    }
}

#[derive(Default)]
struct Index {
    by_vip: HashMap<SocketAddr, (ServiceName, u16)>,
    services: HashMap<ServiceName, ServiceInfo>,
}

impl Index {
    /// The new info's unusable annotations, reported once per change of the Service.
    fn report(metrics: &Metrics, name: &ServiceName, old: Option<&ServiceInfo>, new: &ServiceInfo) {
        if old.is_some_and(|o| o.policy_errors == new.policy_errors) {
            return;
        }
        for e in &new.policy_errors {
            tracing::warn!(
                service = %name, key = %e.key, value = %e.value, error = %e.error,
                "ignoring a meshlet annotation on a Service; the default is used"
            );
            metrics
                .policy_errors
                .with_label_values(&[&name.to_string(), &e.key])
                .inc();
        }
    }
}

impl Index {
    fn rebuild(services: HashMap<ServiceName, ServiceInfo>) -> Index {
        let mut by_vip = HashMap::new();
        for (name, info) in &services {
            for ip in &info.cluster_ips {
                for p in &info.ports {
                    by_vip.insert(SocketAddr::new(*ip, p.port), (name.clone(), p.port));
                }
            }
        }
        Index { by_vip, services }
    }

    /// Adds or replaces one service, touching only its own addresses.
    fn upsert(&mut self, name: ServiceName, info: ServiceInfo) {
        self.remove(&name);
        for ip in &info.cluster_ips {
            for p in &info.ports {
                self.by_vip
                    .insert(SocketAddr::new(*ip, p.port), (name.clone(), p.port));
            }
        }
        self.services.insert(name, info);
    }

    /// The protocol a service port declares.
    fn protocol(&self, service: &ServiceRef) -> Option<DeclaredProtocol> {
        self.services
            .get(&service.name)?
            .port(service.port)?
            .protocol
    }

    fn remove(&mut self, name: &ServiceName) {
        if let Some(old) = self.services.remove(name) {
            for ip in &old.cluster_ips {
                for p in &old.ports {
                    self.by_vip.remove(&SocketAddr::new(*ip, p.port));
                }
            }
        }
    }
}

/// When a slice watch ends (its destination was evicted), its staleness record and series go
/// with it.
struct WatchEnded<'a> {
    resolver: &'a KubeResolver,
    watch: &'a str,
}

impl Drop for WatchEnded<'_> {
    fn drop(&mut self) {
        self.resolver.health().failing.remove(self.watch);
        let _ = self
            .resolver
            .metrics
            .discovery_stale
            .remove_label_values(&[self.watch]);
    }
}

pub struct KubeResolver {
    client: kube::Client,
    index: Arc<RwLock<Index>>,
    /// Becomes true once the first full list of Services is in.
    services_synced: watch::Receiver<bool>,
    /// Bumped on every change of the Services index (so slice watchers re-read policies).
    services_changed: watch::Sender<u64>,
    health: Arc<Mutex<WatchHealth>>,
    metrics: Arc<Metrics>,
}

impl KubeResolver {
    /// Connects with the given kubeconfig, or else `KUBECONFIG`/`~/.kube/config`, or else the
    /// in-cluster service account.
    pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
        let config = match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .map_err(|e| format!("bad kubeconfig {}: {e}", path.display()))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| format!("no Kubernetes configuration found: {e}"))?,
        };
        kube::Client::try_from(config).map_err(|e| format!("cannot build a Kubernetes client: {e}"))
    }

    /// Starts the Services watch; readiness waits for its first full list.
    pub fn start(client: kube::Client, readiness: &Readiness, metrics: Arc<Metrics>) -> Arc<Self> {
        let (synced_tx, synced_rx) = watch::channel(false);
        let r = Arc::new(KubeResolver {
            client,
            index: Arc::default(),
            services_synced: synced_rx,
            services_changed: watch::Sender::new(0),
            health: Arc::default(),
            metrics,
        });
        let guard = readiness.register("kubernetes: first list of Services");
        tokio::spawn(r.clone().watch_services(guard, synced_tx));
        r
    }

    fn mark(&self, watch: &str, error: Option<String>) {
        let mut h = self.health.lock();
        let stale = self.metrics.discovery_stale.with_label_values(&[watch]);
        match error {
            Some(e) => {
                self.metrics
                    .discovery_errors
                    .with_label_values(&[watch])
                    .inc();
                let now = Instant::now();
                h.failing
                    .entry(watch.to_string())
                    .and_modify(|f| {
                        f.why = e.clone();
                        f.last = now;
                    })
                    .or_insert(Failing {
                        since: now,
                        why: e,
                        last: now,
                    });
                stale.set(1);
            }
            None => {
                if h.failing.remove(watch).is_some() {
                    tracing::info!(watch, "watch recovered");
                }
                stale.set(0);
            }
        }
    }

    /// The failing watches, after forgetting those that recovered quietly.
    fn health(&self) -> parking_lot::MutexGuard<'_, WatchHealth> {
        let mut h = self.health.lock();
        for w in h.expire() {
            tracing::info!(watch = %w, "watch recovered (no error for {RECOVERED_AFTER:?})");
            self.metrics.discovery_stale.with_label_values(&[&w]).set(0);
        }
        h
    }

    /// Lines for `/ready`'s detail: watches that are failing, for how long, and why.
    pub fn staleness(&self) -> Vec<String> {
        let h = self.health();
        h.failing
            .iter()
            .map(|(w, f)| {
                format!(
                    "discovery stale: watch {w} failing for {:?} (serving the last known endpoints): {}",
                    Duration::from_secs(f.since.elapsed().as_secs()),
                    f.why
                )
            })
            .collect()
    }

    async fn watch_services(
        self: Arc<Self>,
        guard: crate::readiness::Guard,
        synced: watch::Sender<bool>,
    ) {
        let mut guard = Some(guard);
        let api: Api<Service> = Api::all(self.client.clone());
        let mut stream = watcher(api, watcher::Config::default())
            .backoff(WatchBackoff::new())
            .boxed();
        let mut buffer: Option<HashMap<ServiceName, ServiceInfo>> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::Init) => buffer = Some(HashMap::new()),
                Ok(watcher::Event::InitApply(s)) => {
                    if let (Some(b), Some((n, i))) =
                        (buffer.as_mut(), ServiceInfo::from_service(&s))
                    {
                        b.insert(n, i);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let services = buffer.take().unwrap_or_default();
                    tracing::debug!(services = services.len(), "services listed");
                    let mut idx = self.index.write();
                    for (n, i) in &services {
                        Index::report(&self.metrics, n, idx.services.get(n), i);
                    }
                    *idx = Index::rebuild(services);
                    drop(idx);
                    self.services_changed.send_modify(|g| *g += 1);
                    synced.send_replace(true);
                    guard.take();
                    self.metrics
                        .discovery_syncs
                        .with_label_values(&["services"])
                        .inc();
                    self.mark("services", None);
                }
                Ok(watcher::Event::Apply(s)) => {
                    if let Some((n, i)) = ServiceInfo::from_service(&s) {
                        let mut idx = self.index.write();
                        Index::report(&self.metrics, &n, idx.services.get(&n), &i);
                        idx.upsert(n, i);
                        drop(idx);
                        self.services_changed.send_modify(|g| *g += 1);
                    }
                    self.mark("services", None);
                }
                Ok(watcher::Event::Delete(s)) => {
                    if let Some((n, _)) = ServiceInfo::from_service(&s) {
                        let mut idx = self.index.write();
                        idx.remove(&n);
                        drop(idx);
                        self.services_changed.send_modify(|g| *g += 1);
                    }
                    self.mark("services", None);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Services watch failed; retrying with backoff");
                    self.mark("services", Some(e.to_string()));
                }
            }
        }
    }

    fn service_info(&self, name: &ServiceName) -> Option<ServiceInfo> {
        let idx = self.index.read();
        idx.services.get(name).cloned()
    }

    /// Follows one service's EndpointSlices and sends the changes of its effective endpoint set.
    async fn watch_slices(self: Arc<Self>, target: ServiceRef, tx: mpsc::UnboundedSender<Update>) {
        let label = format!("endpointslices {target}");
        let _ended = WatchEnded {
            resolver: &self,
            watch: &label,
        };
        // The port name comes from the Service, so wait for the first list of Services.
        let mut synced = self.services_synced.clone();
        if synced.wait_for(|s| *s).await.is_err() {
            return;
        }
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &target.name.namespace);
        let cfg = watcher::Config::default()
            .labels(&format!("kubernetes.io/service-name={}", target.name.name));
        let (slices, writer) = reflector::store();
        let mut stream = watcher(api, cfg)
            .backoff(WatchBackoff::new())
            .reflect(writer)
            .boxed();
        let mut current: HashSet<SocketAddr> = HashSet::new();
        let mut sent_synced = false;
        let mut policy: Option<PolicySpec> = None;
        let mut services_changed = self.services_changed.subscribe();
        services_changed.mark_changed();
        loop {
            let ev = tokio::select! {
                // The destination was dropped (see `Proxy::evict_unused`): so is its watch.
                _ = tx.closed() => return,
                ev = stream.next() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                r = services_changed.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // The Service changed: its annotations may carry a new policy.
                    let own = self.service_info(&target.name).map(|i| i.policy).unwrap_or_default();
                    if policy.as_ref() != Some(&own) {
                        policy = Some(own.clone());
                        if tx.send(Update::Policy(Box::new(own))).is_err() {
                            return;
                        }
                    }
                    continue;
                }
            };
            // A list fills the store's buffer, which replaces the store whole when the list
            // completes; so the set is read only then and after each later change.
            match ev {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                Ok(watcher::Event::InitDone) => self
                    .metrics
                    .discovery_syncs
                    .with_label_values(&["endpointslices"])
                    .inc(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(service = %target, error = %e, "EndpointSlice watch failed; keeping the last known endpoints");
                    self.mark(&label, Some(e.to_string()));
                    continue;
                }
            }
            self.mark(&label, None);
            let port_name = match self.service_info(&target.name) {
                Some(info) => match info.port_name(target.port) {
                    Some(n) => n.to_string(),
                    None => {
                        tracing::warn!(service = %target, ports = ?info.ports, "the service has no such port");
                        String::new()
                    }
                },
                // A service without a Service object (hand-made EndpointSlices only): an
                // unnamed port.
                None => String::new(),
            };
            let all: Vec<(SocketAddr, Conditions)> = slices
                .state()
                .iter()
                .flat_map(|s| slice_endpoints(s, &port_name))
                .collect();
            let next = effective(all.iter());
            for gone in current.difference(&next) {
                if tx.send(Update::Change(Change::Remove(*gone))).is_err() {
                    return;
                }
            }
            for new in next.difference(&current) {
                if tx.send(Update::Change(Change::Insert(*new, ()))).is_err() {
                    return;
                }
            }
            current = next;
            if !sent_synced {
                sent_synced = true;
                if tx.send(Update::Synced).is_err() {
                    return;
                }
            }
        }
    }
}

impl Resolve for Arc<KubeResolver> {
    fn lookup(&self, dst: SocketAddr) -> Option<ServiceRef> {
        let idx = self.index.read();
        idx.by_vip.get(&dst).map(|(name, port)| ServiceRef {
            name: name.clone(),
            port: Some(*port),
        })
    }

    /// One read of the index (the lock `lookup` takes; writers hold it only to apply a Service
    /// change) and a hash lookup; no allocation.
    fn protocol(&self, service: &ServiceRef) -> Option<DeclaredProtocol> {
        let idx = self.index.read();
        idx.protocol(service)
    }

    fn resolve(&self, target: &ServiceRef) -> UpdateStream {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(self.clone().watch_slices(target.clone(), tx));
        Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|u| (u, rx))
        }))
    }

    fn detail(&self) -> Vec<String> {
        self.staleness()
    }

    fn stale(&self, service: &ServiceRef) -> Option<String> {
        let h = self.health();
        let label = format!("endpointslices {service}");
        ["services", label.as_str()].iter().find_map(|w| {
            h.failing.get(*w).map(|f| {
                format!(
                    "discovery stale: watch {w} failing for {:?}: {}",
                    Duration::from_secs(f.since.elapsed().as_secs()),
                    f.why
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn watch_backoff_stays_under_five_seconds_and_is_jittered() {
        use kube::runtime::utils::Backoff as _;
        let mut b = super::WatchBackoff {
            step: super::WATCH_BACKOFF_MIN,
        };
        let waits: Vec<_> = (&mut b).take(12).collect();
        assert!(
            waits.iter().all(|w| *w <= super::WATCH_BACKOFF_MAX),
            "{waits:?}"
        );
        assert!(
            waits[0] >= std::time::Duration::from_millis(125),
            "{waits:?}"
        );
        // From the fifth try on, between 2 and 4 s.
        assert!(
            waits[5..]
                .iter()
                .all(|w| *w >= std::time::Duration::from_secs(2)),
            "{waits:?}"
        );
        // Not all the same: jittered.
        assert!(waits[5..].windows(2).any(|w| w[0] != w[1]), "{waits:?}");
        b.reset();
        assert!(b.next().unwrap() <= std::time::Duration::from_millis(250));
    }

    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use kube::api::ObjectMeta;

    fn service(ip: &str, ports: &[(i32, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("prod".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(p, n)| ServicePort {
                            port: *p,
                            name: (!n.is_empty()).then(|| n.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// (address, ready, serving, terminating)
    type Ep<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(ports: &[(&str, i32)], eps: &[Ep]) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            metadata: ObjectMeta::default(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| EndpointPort {
                        name: Some(n.to_string()),
                        port: Some(*p),
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: eps
                .iter()
                .map(|(ip, ready, serving, terminating)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        serving: *serving,
                        terminating: *terminating,
                    }),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn service_info_and_port_names() {
        let (n, info) =
            ServiceInfo::from_service(&service("198.19.0.10", &[(80, "http"), (9090, "admin")]))
                .unwrap();
        assert_eq!(n.to_string(), "web.prod");
        assert_eq!(
            info.cluster_ips,
            vec!["198.19.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(info.port_name(Some(80)), Some("http"));
        assert_eq!(info.port_name(Some(81)), None);
        assert_eq!(
            info.port_name(None),
            None,
            "two ports: a port must be named"
        );
        let (_, headless) = ServiceInfo::from_service(&service("None", &[(80, "")])).unwrap();
        assert!(headless.headless && headless.cluster_ips.is_empty());
        assert_eq!(headless.port_name(None), Some(""));
        let mut idx = Index::rebuild([(n.clone(), info)].into_iter().collect());
        assert_eq!(idx.by_vip.len(), 2);
        // A port removed by an update leaves no stale address behind.
        let (_, fewer) =
            ServiceInfo::from_service(&service("198.19.0.10", &[(80, "http")])).unwrap();
        idx.upsert(n.clone(), fewer);
        assert_eq!(idx.by_vip.len(), 1);
        idx.remove(&n);
        assert!(idx.by_vip.is_empty() && idx.services.is_empty());
    }

    #[test]
    fn declared_protocols_of_service_ports() {
        // (port, name, appProtocol)
        let ports: &[(i32, &str, Option<&str>)] = &[
            (80, "http-web", None),
            (81, "http", Some("kubernetes.io/h2c")),
            (82, "grpc", Some("example.com/custom")),
            (83, "metrics", Some("TCP")),
            (84, "web", None),
            (85, "db", Some("postgresql")),
        ];
        let mut svc = service("198.19.0.10", &[]);
        svc.spec.as_mut().unwrap().ports = Some(
            ports
                .iter()
                .map(|(p, n, a)| ServicePort {
                    port: *p,
                    name: Some(n.to_string()),
                    app_protocol: a.map(str::to_string),
                    ..Default::default()
                })
                .chain(std::iter::once(ServicePort {
                    port: 86,
                    name: Some("udp-dns".into()),
                    protocol: Some("UDP".into()),
                    app_protocol: Some("tcp".into()),
                    ..Default::default()
                }))
                .collect(),
        );
        let (n, info) = ServiceInfo::from_service(&svc).unwrap();
        let idx = Index::rebuild([(n.clone(), info)].into_iter().collect());
        let at = |port: Option<u16>| {
            idx.protocol(&ServiceRef {
                name: n.clone(),
                port,
            })
        };
        assert_eq!(at(Some(80)), Some(DeclaredProtocol::Http1), "by name");
        assert_eq!(
            at(Some(81)),
            Some(DeclaredProtocol::Http2),
            "appProtocol wins"
        );
        assert_eq!(
            at(Some(82)),
            Some(DeclaredProtocol::Http2),
            "unknown appProtocol: the name"
        );
        assert_eq!(at(Some(83)), Some(DeclaredProtocol::Opaque));
        assert_eq!(at(Some(84)), None, "nothing declared: detect");
        assert_eq!(at(Some(85)), Some(DeclaredProtocol::Opaque));
        assert_eq!(at(Some(86)), None, "UDP ports are not proxied");
        assert_eq!(at(None), None, "several ports: a port must be named");
        let other = ServiceRef::parse("api.prod:80").unwrap();
        assert_eq!(idx.protocol(&other), None, "unknown service");

        // A single-port Service: a reference without a port means that port.
        let mut one = service("198.19.0.11", &[(9090, "grpc-api")]);
        one.metadata.name = Some("api".into());
        let (n, info) = ServiceInfo::from_service(&one).unwrap();
        let idx = Index::rebuild([(n.clone(), info)].into_iter().collect());
        assert_eq!(idx.protocol(&n.into()), Some(DeclaredProtocol::Http2));
    }

    #[test]
    fn named_target_ports_resolve_per_slice() {
        // Two slices name the same port differently numbered (a rolling change of targetPort).
        let a = slice(&[("http", 8080)], &[("198.18.0.1", Some(true), None, None)]);
        let b = slice(&[("http", 8081)], &[("198.18.0.2", Some(true), None, None)]);
        let got: Vec<SocketAddr> = [a, b]
            .iter()
            .flat_map(|s| slice_endpoints(s, "http"))
            .map(|(a, _)| a)
            .collect();
        assert_eq!(
            got,
            vec![
                "198.18.0.1:8080".parse().unwrap(),
                "198.18.0.2:8081".parse().unwrap()
            ]
        );
        let none = slice(
            &[("metrics", 9000)],
            &[("198.18.0.1", Some(true), None, None)],
        );
        assert!(slice_endpoints(&none, "http").is_empty());
    }

    #[test]
    fn ready_first_then_serving_never_neither() {
        let s = slice(
            &[("", 80)],
            &[
                ("198.18.0.1", Some(true), Some(true), Some(false)),
                ("198.18.0.2", Some(false), Some(true), Some(true)),
                ("198.18.0.3", Some(false), Some(false), Some(false)),
            ],
        );
        let all = slice_endpoints(&s, "");
        let eff = effective(all.iter());
        assert_eq!(
            eff,
            ["198.18.0.1:80".parse().unwrap()].into_iter().collect()
        );
        // No ready endpoint: fall back to serving (terminating) ones, never the third.
        let all: Vec<_> = all
            .into_iter()
            .filter(|(a, _)| a.ip().to_string() != "198.18.0.1")
            .collect();
        let eff = effective(all.iter());
        assert_eq!(
            eff,
            ["198.18.0.2:80".parse().unwrap()].into_iter().collect()
        );
        // Unset conditions mean ready.
        let s = slice(&[("", 80)], &[("198.18.0.9", None, None, None)]);
        assert_eq!(effective(slice_endpoints(&s, "").iter()).len(), 1);
    }
}
