//! The dependency health model: how each destination service the app depends on is doing, as
//! the proxy sees it.
//!
//! Dependencies are the services named up front (`health.dependencies` and `health.critical`
//! in the config file, `MESHLET_DEPENDENCIES` and `MESHLET_CRITICAL_DEPENDENCIES` in the
//! environment) plus every destination service the proxy has been used for. Services reached on
//! several ports count as one dependency.
//!
//! A background task evaluates every dependency every second (more often when the hysteresis is
//! shorter than 4 s, so that it is honoured) from what the proxy already knows: the balancer's
//! endpoints, the breaker's ejections, the request outcomes of the last ten seconds
//! ([`crate::proxy::window`]), and whether discovery is stale. The observed state is
//!
//! - unknown: discovery has not delivered the service's endpoints yet, or a service never used
//!   and not declared has no endpoints (it is not reported as a problem);
//! - unhealthy: no endpoints, every endpoint ejected, or fewer than half of at least
//!   [`MIN_REQUESTS`] recent requests succeeded;
//! - degraded: discovery stale, some endpoints ejected, or fewer than 90 % of at least
//!   [`MIN_REQUESTS`] recent requests succeeded;
//! - healthy otherwise.
//!
//! A new state takes effect once it has been observed continuously for `health.hysteresis`
//! (the first known state takes effect at once). Each evaluation is published as a
//! [`Snapshot`] on a `tokio::sync::watch` channel, which `/health`, `/ready` and the gRPC health
//! service read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{HealthConfig, ServiceName};
use crate::metrics::Metrics;
use crate::proxy::window::{SECONDS, Stats};
use crate::proxy::{Proxy, Route};

/// Fewer recent requests than this say nothing about a success rate.
pub const MIN_REQUESTS: u64 = 10;
/// Below this success rate a dependency is unhealthy.
const UNHEALTHY_RATE: f64 = 0.5;
/// Below this success rate a dependency is degraded.
const DEGRADED_RATE: f64 = 0.9;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Unknown,
    Healthy,
    Degraded,
    Unhealthy,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Unknown,
        State::Healthy,
        State::Degraded,
        State::Unhealthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Healthy => "healthy",
            State::Degraded => "degraded",
            State::Unhealthy => "unhealthy",
        }
    }
}

/// The model's knobs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub declared: Vec<ServiceName>,
    pub critical: Vec<ServiceName>,
    pub hysteresis: Duration,
    pub outage_grace: Duration,
}

impl Settings {
    pub fn from_config(h: &HealthConfig) -> Settings {
        Settings {
            declared: h.declared(),
            critical: h.critical.clone(),
            hysteresis: h.hysteresis.0,
            outage_grace: h.outage_grace.0,
        }
    }

    /// How often the model is evaluated: every second, or a quarter of the hysteresis when
    /// that is shorter (at least every 50 ms).
    pub fn tick(&self) -> Duration {
        (self.hysteresis / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointCounts {
    /// Endpoints discovery gave the balancer.
    pub total: usize,
    /// Of those, the ones taking requests (not ejected).
    pub ready: usize,
    /// Ejected by the circuit breaker (or probing after an ejection).
    pub ejected: usize,
}

/// One dependency as last evaluated.
#[derive(Debug, Clone, PartialEq)]
pub struct Dependency {
    /// `name.namespace`.
    pub name: String,
    pub critical: bool,
    /// Named up front (config or environment), as opposed to found in use.
    pub declared: bool,
    /// The state in effect.
    pub state: State,
    /// Why, in words.
    pub reason: String,
    /// A different state observed but not yet in effect (hysteresis), with its reason.
    pub pending: Option<(State, String)>,
    pub endpoints: EndpointCounts,
    /// Requests in the last [`SECONDS`] seconds.
    pub requests: u64,
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub last_error: Option<String>,
    /// When the state in effect took effect.
    pub last_change: SystemTime,
    pub since: Instant,
    /// Critical, unhealthy for longer than `outage_grace`: reported, but no longer failing
    /// readiness (a shared outage).
    pub outage: bool,
}

/// Every dependency, sorted by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub dependencies: Vec<Dependency>,
}

impl Snapshot {
    pub fn get(&self, name: &str) -> Option<&Dependency> {
        self.dependencies.iter().find(|d| d.name == name)
    }
}

/// What one evaluation observed of a dependency (before hysteresis).
#[derive(Debug, Clone)]
pub struct Observation {
    pub name: String,
    pub declared: bool,
    pub critical: bool,
    pub state: State,
    pub reason: String,
    pub endpoints: EndpointCounts,
    pub stats: Stats,
}

/// Decides a dependency's observed state from its numbers.
pub fn judge(
    declared: bool,
    used: bool,
    synced: bool,
    e: EndpointCounts,
    stale: Option<&str>,
    stats: &Stats,
) -> (State, String) {
    if !synced {
        return (State::Unknown, "waiting for discovery".into());
    }
    if e.total == 0 {
        return if declared || used {
            (State::Unhealthy, "no endpoints".into())
        } else {
            (State::Unknown, "no endpoints known and never used".into())
        };
    }
    if e.ejected == e.total {
        return (
            State::Unhealthy,
            format!("{} of {} endpoints ejected", e.ejected, e.total),
        );
    }
    let rate = stats
        .success_rate()
        .filter(|_| stats.requests() >= MIN_REQUESTS);
    let rate_text = |r: f64| {
        format!(
            "success rate {}% over {SECONDS} s",
            (r * 100.0).floor() as u32
        )
    };
    if let Some(r) = rate.filter(|r| *r < UNHEALTHY_RATE) {
        return (State::Unhealthy, rate_text(r));
    }
    if let Some(s) = stale {
        return (State::Degraded, s.to_string());
    }
    if e.ejected > 0 {
        return (
            State::Degraded,
            format!("{} of {} endpoints ejected", e.ejected, e.total),
        );
    }
    if let Some(r) = rate.filter(|r| *r < DEGRADED_RATE) {
        return (State::Degraded, rate_text(r));
    }
    let mut reason = format!(
        "{} endpoint{} ready",
        e.ready,
        if e.ready == 1 { "" } else { "s" }
    );
    if let Some(r) = rate {
        reason.push_str(", ");
        reason.push_str(&rate_text(r));
    }
    (State::Healthy, reason)
}

struct Track {
    state: State,
    reason: String,
    since: Instant,
    wall: SystemTime,
    /// A different observed state and since when it has held.
    candidate: Option<(State, Instant)>,
}

/// The evaluation state: the state in effect per dependency, and the metrics.
pub struct Model {
    settings: Settings,
    metrics: Arc<Metrics>,
    tracks: HashMap<String, Track>,
}

impl Model {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Model {
        Model {
            settings,
            metrics,
            tracks: HashMap::new(),
        }
    }

    /// Observes every dependency through the proxy.
    pub fn observe(&self, proxy: &Proxy) -> Vec<Observation> {
        struct Acc {
            synced: bool,
            used: bool,
            endpoints: EndpointCounts,
            stats: Stats,
            stale: Option<String>,
        }
        let mut by_name: BTreeMap<String, Acc> = BTreeMap::new();
        for d in &self.settings.declared {
            by_name.insert(
                d.to_string(),
                Acc {
                    synced: false,
                    used: false,
                    endpoints: EndpointCounts::default(),
                    stats: Stats::default(),
                    stale: None,
                },
            );
        }
        let mut seen_target: Vec<String> = Vec::new();
        for (svc, t) in proxy.outbound_targets() {
            let Route::Balanced(b) = &t.route else {
                continue;
            };
            let name = svc.name.to_string();
            let declared = self.settings.declared.contains(&svc.name);
            let used = t.window.is_used();
            if !declared && !used {
                continue;
            }
            let (total, ejected) = b.ejection_counts();
            let stats = t.window.stats();
            let stale = proxy.discovery_stale(&svc);
            let first = !seen_target.contains(&name);
            if first {
                seen_target.push(name.clone());
            }
            let acc = by_name.entry(name).or_insert(Acc {
                synced: true,
                used: false,
                endpoints: EndpointCounts::default(),
                stats: Stats::default(),
                stale: None,
            });
            // A declared dependency starts unsynced until its first target says otherwise.
            acc.synced = if first {
                b.is_synced()
            } else {
                acc.synced && b.is_synced()
            };
            acc.used |= used;
            acc.endpoints.total += total;
            acc.endpoints.ejected += ejected;
            acc.endpoints.ready += total - ejected;
            acc.stats.merge(&stats);
            if acc.stale.is_none() {
                acc.stale = stale;
            }
        }
        by_name
            .into_iter()
            .map(|(name, a)| {
                let svc = ServiceName::parse(&name).ok();
                let declared = svc
                    .as_ref()
                    .is_some_and(|s| self.settings.declared.contains(s));
                let critical = svc
                    .as_ref()
                    .is_some_and(|s| self.settings.critical.contains(s));
                let (state, reason) = judge(
                    declared,
                    a.used,
                    a.synced,
                    a.endpoints,
                    a.stale.as_deref(),
                    &a.stats,
                );
                Observation {
                    name,
                    declared,
                    critical,
                    state,
                    reason,
                    endpoints: a.endpoints,
                    stats: a.stats,
                }
            })
            .collect()
    }

    /// Applies hysteresis to the observations and returns the snapshot.
    pub fn evaluate(&mut self, observations: Vec<Observation>, now: Instant) -> Snapshot {
        let hysteresis = self.settings.hysteresis;
        let mut deps = Vec::with_capacity(observations.len());
        for o in observations {
            let track = self.tracks.entry(o.name.clone()).or_insert_with(|| Track {
                state: State::Unknown,
                reason: o.reason.clone(),
                since: now,
                wall: SystemTime::now(),
                candidate: None,
            });
            let mut changed = None;
            if o.state == track.state {
                track.candidate = None;
                track.reason = o.reason.clone();
            } else if track.state == State::Unknown {
                // The first known state takes effect at once.
                changed = Some(o.state);
            } else {
                let since = match track.candidate {
                    Some((s, since)) if s == o.state => since,
                    _ => now,
                };
                track.candidate = Some((o.state, since));
                if now.saturating_duration_since(since) >= hysteresis {
                    changed = Some(o.state);
                }
            }
            if let Some(to) = changed {
                let from = track.state;
                tracing::info!(
                    dependency = %o.name,
                    from = from.as_str(),
                    to = to.as_str(),
                    reason = %o.reason,
                    "dependency state changed"
                );
                if from != State::Unknown {
                    self.metrics
                        .dependency_transitions
                        .with_label_values(&[o.name.as_str(), to.as_str()])
                        .inc();
                }
                track.state = to;
                track.reason = o.reason.clone();
                track.since = now;
                track.wall = SystemTime::now();
                track.candidate = None;
            }
            for s in State::ALL {
                self.metrics
                    .dependency_state
                    .with_label_values(&[o.name.as_str(), s.as_str()])
                    .set(i64::from(s == track.state));
            }
            let outage = o.critical
                && track.state == State::Unhealthy
                && now.saturating_duration_since(track.since) > self.settings.outage_grace;
            deps.push(Dependency {
                name: o.name.clone(),
                critical: o.critical,
                declared: o.declared,
                state: track.state,
                reason: track.reason.clone(),
                pending: track
                    .candidate
                    .map(|(s, _)| (s, o.reason.clone()))
                    .filter(|_| o.state != track.state),
                endpoints: o.endpoints,
                requests: o.stats.requests(),
                success_rate: o.stats.success_rate(),
                p50_ms: o.stats.quantile_ms(0.5),
                p99_ms: o.stats.quantile_ms(0.99),
                last_error: o.stats.last_error.clone(),
                last_change: track.wall,
                since: track.since,
                outage,
            });
        }
        deps.sort_by(|a, b| a.name.cmp(&b.name));
        // A dependency no longer observed (its destination was evicted) is forgotten, with its
        // series: the model's memory follows the destinations in use.
        let mut gone = std::collections::HashSet::new();
        self.tracks.retain(|name, _| {
            let seen = deps.binary_search_by(|d| d.name.cmp(name)).is_ok();
            if !seen {
                gone.insert(name.clone());
            }
            seen
        });
        if !gone.is_empty() {
            let metrics = self.metrics.clone();
            let forget = move || metrics.forget("dependency", &|name| gone.contains(name));
            // Off the runtime when there is one: the pass over every series can take seconds
            // after a mass eviction.
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(forget)),
                Err(_) => forget(),
            }
        }
        Snapshot { dependencies: deps }
    }
}

/// Starts the evaluation task; it stops when `stop` is cancelled. The receiver always holds the
/// latest snapshot (the first evaluation happens before this returns).
pub fn start(
    settings: Settings,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> watch::Receiver<Arc<Snapshot>> {
    let tick = settings.tick();
    let mut model = Model::new(settings, metrics);
    let first = model.evaluate(model.observe(&proxy), Instant::now());
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            let snap = model.evaluate(model.observe(&proxy), Instant::now());
            tx.send_if_modified(|cur| {
                if **cur == snap {
                    false
                } else {
                    *cur = Arc::new(snap);
                    true
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(state: State, critical: bool) -> Observation {
        Observation {
            name: "db.default".into(),
            declared: true,
            critical,
            state,
            reason: state.as_str().into(),
            endpoints: EndpointCounts::default(),
            stats: Stats::default(),
        }
    }

    fn settings(hysteresis: Duration) -> Settings {
        Settings {
            declared: vec![ServiceName::parse("db.default").unwrap()],
            critical: vec![],
            hysteresis,
            outage_grace: Duration::from_secs(30),
        }
    }

    #[test]
    fn judging() {
        let e = |total, ejected| EndpointCounts {
            total,
            ready: total - ejected,
            ejected,
        };
        let none = Stats::default();
        assert_eq!(
            judge(true, false, false, e(0, 0), None, &none).0,
            State::Unknown
        );
        assert_eq!(
            judge(true, false, true, e(0, 0), None, &none),
            (State::Unhealthy, "no endpoints".into())
        );
        assert_eq!(
            judge(false, false, true, e(0, 0), None, &none).0,
            State::Unknown
        );
        assert_eq!(
            judge(false, true, true, e(3, 2), None, &none),
            (State::Degraded, "2 of 3 endpoints ejected".into())
        );
        assert_eq!(
            judge(false, true, true, e(3, 3), None, &none),
            (State::Unhealthy, "3 of 3 endpoints ejected".into())
        );
        assert_eq!(
            judge(false, true, true, e(2, 0), Some("discovery stale"), &none).0,
            State::Degraded
        );
        let w = crate::proxy::window::Window::new();
        for i in 0..100 {
            w.record(
                crate::proxy::window::tests::status(if i < 42 { 200 } else { 503 }),
                Duration::from_millis(1),
                None,
            );
        }
        assert_eq!(
            judge(false, true, true, e(2, 0), None, &w.stats()),
            (State::Unhealthy, "success rate 42% over 10 s".into())
        );
        let (s, reason) = judge(false, true, true, e(1, 0), None, &none);
        assert_eq!((s, reason.as_str()), (State::Healthy, "1 endpoint ready"));
    }

    #[test]
    fn a_dependency_no_longer_observed_is_forgotten_with_its_series() {
        let metrics = Arc::new(Metrics::new());
        let mut m = Model::new(settings(Duration::ZERO), metrics.clone());
        let t0 = Instant::now();
        m.evaluate(vec![obs(State::Healthy, false)], t0);
        assert!(metrics.render().contains("dependency=\"db.default\""));
        // Its destination was evicted: the next tick does not see it.
        let s = m.evaluate(Vec::new(), t0 + Duration::from_secs(1));
        assert!(s.dependencies.is_empty());
        assert!(m.tracks.is_empty());
        assert!(
            !metrics.render().contains("db.default"),
            "{}",
            metrics.render()
        );
    }

    #[test]
    fn hysteresis_delays_changes() {
        let metrics = Arc::new(Metrics::new());
        let mut m = Model::new(settings(Duration::from_secs(5)), metrics.clone());
        let t0 = Instant::now();
        let s = m.evaluate(vec![obs(State::Healthy, false)], t0);
        assert_eq!(
            s.dependencies[0].state,
            State::Healthy,
            "first state at once"
        );
        let s = m.evaluate(
            vec![obs(State::Unhealthy, false)],
            t0 + Duration::from_secs(1),
        );
        assert_eq!(s.dependencies[0].state, State::Healthy);
        assert_eq!(
            s.dependencies[0].pending.as_ref().unwrap().0,
            State::Unhealthy
        );
        // One good second resets the candidate.
        m.evaluate(
            vec![obs(State::Healthy, false)],
            t0 + Duration::from_secs(2),
        );
        let s = m.evaluate(
            vec![obs(State::Unhealthy, false)],
            t0 + Duration::from_secs(3),
        );
        assert_eq!(s.dependencies[0].state, State::Healthy);
        let s = m.evaluate(
            vec![obs(State::Unhealthy, false)],
            t0 + Duration::from_secs(7),
        );
        assert_eq!(s.dependencies[0].state, State::Healthy);
        let s = m.evaluate(
            vec![obs(State::Unhealthy, false)],
            t0 + Duration::from_secs(8),
        );
        assert_eq!(s.dependencies[0].state, State::Unhealthy);
        assert_eq!(s.dependencies[0].pending, None);
        let text = metrics.render();
        assert!(
            text.contains(
                "meshlet_dependency_state{dependency=\"db.default\",state=\"unhealthy\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "meshlet_dependency_transitions_total{dependency=\"db.default\",to=\"unhealthy\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn outage_after_grace() {
        let mut st = settings(Duration::ZERO);
        st.outage_grace = Duration::from_secs(30);
        let mut m = Model::new(st, Arc::new(Metrics::new()));
        let t0 = Instant::now();
        m.evaluate(vec![obs(State::Healthy, true)], t0);
        let s = m.evaluate(
            vec![obs(State::Unhealthy, true)],
            t0 + Duration::from_secs(1),
        );
        assert!(!s.dependencies[0].outage);
        let s = m.evaluate(
            vec![obs(State::Unhealthy, true)],
            t0 + Duration::from_secs(32),
        );
        assert!(s.dependencies[0].outage);
        let s = m.evaluate(
            vec![obs(State::Unhealthy, false)],
            t0 + Duration::from_secs(33),
        );
        assert!(!s.dependencies[0].outage, "only critical dependencies");
    }
}
