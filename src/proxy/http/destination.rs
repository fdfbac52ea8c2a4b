//! A destination: everything one service (or one inbound delivery address) needs on the data
//! path, built once and shared by every connection to it.
//!
//! - its [`Route`]: the balancer over the service's endpoints (endpoints and load only), or the
//!   one local app address inbound;
//! - its [`Resilience`]: the policy and what it calls for (retry budget, deduplication, what
//!   counts as a failure), published by the discovery follower when the policy changes and read
//!   per request without building anything;
//! - where outcomes go: [`Destination::record_endpoint`] for one attempt on one endpoint (its
//!   breaker), [`Destination::record_request`] for the client's request (the request counter
//!   and the health window), both judged by the one rule of [`super::outcome`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use prometheus::Histogram;
use tokio_util::task::TaskTracker;

use super::edge;
use super::outcome::Class;
use crate::balance::{Balancer, Endpoint};
use crate::breaker::Transition;
use crate::config::policy::{Policy, PolicySpec};
use crate::discovery::{Update, UpdateStream};
use crate::metrics::Metrics;
use crate::readiness::Guard;

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

    /// Picks an endpoint its breaker admits: `(endpoint, is the breaker's probe)`.
    pub fn pick_admitted(&self, exclude: &[SocketAddr]) -> Option<(Arc<Endpoint>, bool)> {
        match self {
            Route::Balanced(b) => b.pick_admitted(exclude),
            _ => self.pick(exclude).map(|e| (e, false)),
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
            Route::Fixed(e) => Some(e.clone()).filter(|e| !exclude.contains(&e.addr)),
            Route::None => None,
        }
    }
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
    pub budget: crate::proxy::http::retry::TpsBudget,
    pub dedup: Option<crate::proxy::http::dedup::Dedup>,
    /// What counts as a failure for the breaker.
    pub failures: crate::breaker::FailureClass,
}

impl Resilience {
    fn new(policy: Policy, metrics: &Metrics, service: &str) -> Resilience {
        let dedup = policy.dedup.then(|| {
            crate::proxy::http::dedup::Dedup::new(
                crate::proxy::http::dedup::Settings {
                    methods: policy.dedup_methods.0.clone(),
                    headers: policy.dedup_headers.0.clone(),
                    max_body: policy.dedup_max_body.0,
                    leader_timeout: policy.dedup_timeout.0,
                    max_waiters: policy.dedup_max_waiters as usize,
                },
                metrics.dedup_coalesced.with_label_values(&[service]),
                metrics.dedup_saved.with_label_values(&[service]),
            )
        });
        Resilience {
            budget: crate::proxy::http::retry::budget(
                policy.retry_budget.0,
                policy.retry_budget_min,
            ),
            dedup,
            failures: crate::breaker::FailureClass {
                http: policy.failure_statuses.0,
                grpc: policy.failure_grpc.0.clone(),
            },
            policy: Arc::new(policy),
        }
    }
}

/// A destination as the data path sees it: the route, the current resilience settings, and
/// where its outcomes are recorded. Built once per service (or inbound delivery address) and
/// shared by every connection to it.
pub struct Destination {
    pub direction: Direction,
    /// The metric label: `name.namespace`, `app:<port>` inbound, `passthrough`.
    pub service: Arc<str>,
    pub route: Route,
    pub metrics: Arc<Metrics>,
    pub duration: Histogram,
    /// Tasks that outlive a request (upgraded streams) are tracked for graceful shutdown.
    pub tasks: TaskTracker,
    /// Inbound limits protecting the local app (inbound destinations only).
    pub limits: Option<Arc<InboundLimits>>,
    /// The current policy and what it calls for; replaced (never mutated) when the policy
    /// changes, so that a request keeps the settings it started with.
    resilience: tokio::sync::watch::Sender<Arc<Resilience>>,
    /// Recent request outcomes (success rate, latency, last error) for the health model.
    pub window: crate::proxy::window::Window,
    /// Counts responses cut short (deadline, stream idle timeout).
    pub cut_counters: edge::CutCounters,
    /// `http.stream_idle_timeout`.
    pub stream_idle_timeout: Duration,
}

/// What a [`Destination`] is made of, besides its route and policy.
pub struct Parts<'a> {
    pub metrics: &'a Arc<Metrics>,
    pub tasks: &'a TaskTracker,
    pub limits: Option<Arc<InboundLimits>>,
    pub stream_idle_timeout: Duration,
}

impl Destination {
    pub fn new(
        direction: Direction,
        service: Arc<str>,
        route: Route,
        policy: Policy,
        parts: Parts<'_>,
    ) -> Destination {
        let metrics = parts.metrics;
        let labels = [direction.as_str(), &*service];
        if let Route::Balanced(b) = &route {
            b.set_breaker(crate::balance::breaker_settings(&policy));
        }
        let resilience = Arc::new(Resilience::new(policy, metrics, &service));
        Destination {
            cut_counters: edge::CutCounters {
                deadline: metrics.timeouts.with_label_values(&labels),
                idle: metrics.idle_timeouts.with_label_values(&labels),
            },
            stream_idle_timeout: parts.stream_idle_timeout,
            direction,
            duration: metrics.response_duration.with_label_values(&labels),
            service,
            route,
            metrics: metrics.clone(),
            tasks: parts.tasks.clone(),
            limits: parts.limits,
            resilience: tokio::sync::watch::Sender::new(resilience),
            window: crate::proxy::window::Window::new(),
        }
    }

    /// The current policy and what it calls for.
    pub fn resilience(&self) -> Arc<Resilience> {
        self.resilience.borrow().clone()
    }

    /// Takes a new policy: the settings are rebuilt (a fresh retry budget and deduplication
    /// table) and the endpoints' breakers start afresh only when something changed.
    fn set_policy(&self, policy: Policy) {
        if *self.resilience.borrow().policy == policy {
            return;
        }
        tracing::debug!(service = %self.service, ?policy, "policy");
        if let Route::Balanced(b) = &self.route {
            b.set_breaker(crate::balance::breaker_settings(&policy));
        }
        let r = Resilience::new(policy, &self.metrics, &self.service);
        self.resilience.send_replace(Arc::new(r));
    }

    /// Applies discovery's updates for as long as the stream lasts (or the destination lives:
    /// the follower holds it weakly, so that it does not keep an unused destination in use):
    /// endpoint changes to the balancer, the service's own policy (over the config's
    /// `defaults`) to the resilience settings. `ready` is dropped at the first `Synced`, the
    /// service's first full endpoint set.
    pub async fn follow(
        this: std::sync::Weak<Self>,
        mut updates: UpdateStream,
        ready: Guard,
        defaults: PolicySpec,
    ) {
        let mut ready = Some(ready);
        while let Some(update) = updates.next().await {
            let Some(d) = this.upgrade() else { return };
            let Route::Balanced(balancer) = &d.route else {
                return;
            };
            match update {
                Update::Change(c) => balancer.apply(c),
                Update::Synced => {
                    ready.take();
                    balancer.mark_synced();
                }
                Update::Policy(own) => d.set_policy(defaults.overlay(&own).resolve()),
            }
        }
    }

    /// Records one attempt's outcome on its endpoint's breaker (balanced routes; a fixed route
    /// has no breaker), and shows a state change in the metrics.
    pub fn record_endpoint(&self, ep: &Endpoint, class: Class, latency: Duration, probe: bool) {
        let Route::Balanced(b) = &self.route else {
            return;
        };
        let success = match class {
            Class::Success => true,
            Class::Failure => false,
            Class::Cancelled => {
                if probe {
                    ep.breaker().release_probe(std::time::Instant::now());
                }
                return;
            }
        };
        let outcome = crate::balance::Outcome {
            success,
            latency,
            probe,
        };
        let Some(tr) = b.record(ep, outcome) else {
            return;
        };
        let (label, state) = match tr {
            Transition::Ejected { .. } => ("ejected", 1),
            Transition::ProbeFailed { .. } => ("probe_failed", 1),
            Transition::Restored => ("restored", 0),
            Transition::EjectionSuppressed => ("suppressed", 0),
        };
        let m = &self.metrics;
        m.breaker_transitions
            .with_label_values(&[&self.service, label])
            .inc();
        m.breaker_state
            .with_label_values(&[&*self.service, &ep.addr.to_string()])
            .set(state);
    }

    /// Records the client's request: `meshlet_requests_total` always; the health window
    /// when `window` is given (not for what says nothing about the destination).
    pub fn record_request(
        &self,
        status: http::StatusCode,
        class: Class,
        window: Option<(
            crate::proxy::window::Answer,
            Duration,
            Option<&http::HeaderValue>,
        )>,
    ) {
        self.metrics
            .requests
            .with_label_values(&[
                self.direction.as_str(),
                &self.service,
                status.as_str(),
                class.label(),
            ])
            .inc();
        if let Some((answer, latency, error)) = window {
            self.window.record(answer, latency, error);
        }
    }

    pub(crate) fn byte_counters(&self) -> crate::proxy::tcp::ByteCounters {
        let c = |flow| {
            self.metrics.tcp_bytes.with_label_values(&[
                self.direction.as_str(),
                &self.service,
                flow,
            ])
        };
        crate::proxy::tcp::ByteCounters {
            to_server: c("to_server"),
            to_client: c("to_client"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::BalanceSettings;
    use crate::discovery::Change;

    #[tokio::test]
    async fn the_follower_publishes_a_policy_only_when_it_changes() {
        let metrics = Arc::new(Metrics::new());
        let settings = BalanceSettings {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
            sync_timeout: Duration::from_secs(5),
        };
        let b = Balancer::new("web.prod".into(), settings, &metrics, Default::default());
        let defaults: PolicySpec = serde_yaml::from_str("breaker_failures: 3\n").unwrap();
        let tasks = TaskTracker::new();
        let parts = Parts {
            metrics: &metrics,
            tasks: &tasks,
            limits: None,
            stream_idle_timeout: Duration::from_secs(300),
        };
        let d = Arc::new(Destination::new(
            Direction::Outbound,
            "web.prod".into(),
            Route::Balanced(b.clone()),
            defaults.resolve(),
            parts,
        ));
        let first = d.resilience();
        assert_eq!(first.policy.breaker_failures, 3);

        let own = |yaml: &str| Update::Policy(Box::new(serde_yaml::from_str(yaml).unwrap()));
        let addr = SocketAddr::from(([127, 0, 0, 1], 1000));
        let updates = vec![
            Update::Change(Change::Insert(addr, ())),
            // The same policy as the defaults give: nothing is rebuilt.
            own("breaker_failures: 3\n"),
        ];
        let readiness = crate::readiness::Readiness::default();
        let follow = |u: Vec<Update>| {
            let stream: UpdateStream = Box::pin(futures_util::stream::iter(u));
            Destination::follow(
                Arc::downgrade(&d),
                stream,
                readiness.register("t"),
                defaults.clone(),
            )
        };
        follow(updates).await;
        assert!(
            Arc::ptr_eq(&first, &d.resilience()),
            "an unchanged policy keeps its state"
        );
        let breaker = b.endpoints()[&addr].breaker();

        // A changed retry setting is published; the breakers are kept (their settings are the same).
        follow(vec![own("breaker_failures: 3\nmax_retries: 1\n")]).await;
        let second = d.resilience();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.policy.max_retries, 1);
        assert!(Arc::ptr_eq(&breaker, &b.endpoints()[&addr].breaker()));

        // Changed breaker settings start every endpoint's breaker afresh. The service's own
        // policy goes over the defaults, it does not replace them.
        follow(vec![own("breaker_failures: 5\n")]).await;
        assert_eq!(d.resilience().policy.breaker_failures, 5);
        assert!(!Arc::ptr_eq(&breaker, &b.endpoints()[&addr].breaker()));
        let overlay: PolicySpec = serde_yaml::from_str("timeout: 2s\n").unwrap();
        follow(vec![Update::Policy(Box::new(overlay))]).await;
        assert_eq!(d.resilience().policy.breaker_failures, 3);
        let p = d.resilience().policy.clone();
        assert_eq!(p.timeout.0, Some(Duration::from_secs(2)));
    }
}
