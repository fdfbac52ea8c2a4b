//! Per-request balancing: power of two choices over peak-EWMA latency.
//!
//! A [`Balancer`] holds one destination service's endpoints, kept up to date by a task that
//! applies discovery's insert/remove changes. Each request (or opaque TCP connection) picks two
//! distinct endpoints at random and takes the one with the lower cost, where cost is the
//! endpoint's peak-EWMA latency times its in-flight requests plus one (Finagle's algorithm, as
//! in tower's `PeakEwma`).
//!
//! Why not tower's `p2c::Balance` directly: it is a `&mut self` service, so sharing it among
//! connection tasks needs a `Buffer` worker (a channel hop per request and one task that every
//! request waits behind), and its `poll_ready` waits, rather than fails, when no endpoint is
//! available, while a proxy must answer 503 at once and must be able to exclude the endpoint a
//! request just failed to connect to. The selection here is lock-free on the read path save for
//! a read lock on the endpoint list; the load estimate is the same as tower's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use prometheus::IntGauge;

use crate::breaker::{self, Admission, Breaker, Transition};
use crate::discovery::Change;
use crate::proxy::http::client::Pool;

/// Knobs shared by a service's endpoints.
#[derive(Debug, Clone, Copy)]
pub struct BalanceSettings {
    pub default_rtt: Duration,
    pub decay: Duration,
    /// How long a request waits for a service's first endpoint set (on-demand discovery).
    pub sync_timeout: Duration,
}

/// One endpoint of a service: its address, its connections and its load.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub pool: Arc<Pool>,
    pending: AtomicU32,
    rtt: Mutex<Rtt>,
    decay_ns: f64,
    /// After a failed connect the endpoint is skipped until this time (ns since `epoch`),
    /// growing with consecutive failures: a cheap guard so that p2c does not keep choosing an
    /// endpoint that refuses connections (a refusal is fast and would look attractive).
    skip_until_ns: AtomicU64,
    connect_failures: AtomicU32,
    epoch: Instant,
    /// The circuit breaker; replaced when the service's breaker settings change.
    breaker: RwLock<Arc<Breaker>>,
    /// The breaker would have ejected this endpoint but the service's ejection cap kept it in:
    /// it is failing all the same (see [`Balancer::may_eject`]).
    suppressed: std::sync::atomic::AtomicBool,
}

struct Rtt {
    ns: f64,
    at: Instant,
    /// Whether the estimate comes from a real answer (else it is `default_rtt`, decaying).
    sampled: bool,
}

/// An in-flight request on an endpoint; its drop records the observed latency.
pub struct InFlight {
    ep: Arc<Endpoint>,
    start: Instant,
    record: bool,
}

impl InFlight {
    /// Ends the request without a latency sample (it never reached the endpoint, or its end
    /// was the client's doing). Dropping the guard does the same: a request abandoned by its
    /// client says nothing about the endpoint.
    pub fn forget(mut self) {
        self.record = false;
    }

    /// Ends the request with its latency as a sample for the endpoint's peak-EWMA.
    pub fn complete(mut self) {
        self.record = true;
    }

    /// Leaves `d` (time spent opening a connection) out of the latency sample.
    pub fn discount(&mut self, d: Duration) {
        self.start += d.min(self.start.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.ep.pending.fetch_sub(1, Ordering::AcqRel);
        if !self.record {
            return;
        }
        let now = Instant::now();
        let sample = now.saturating_duration_since(self.start).as_nanos() as f64;
        let mut rtt = self.ep.rtt.lock();
        rtt.observe(sample, now, self.ep.decay_ns);
    }
}

impl Rtt {
    /// Decays the estimate toward zero for the time since the last update.
    fn decayed(&mut self, now: Instant, decay_ns: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
        let w = (-elapsed / decay_ns).exp();
        self.ns *= w;
        self.at = now;
        self.ns
    }

    /// A peak is taken at once; lower samples move the estimate by the decay weight.
    fn observe(&mut self, sample_ns: f64, now: Instant, decay_ns: f64) {
        if !self.sampled {
            // The first answer replaces the default outright.
            self.sampled = true;
            self.ns = sample_ns;
            self.at = now;
        } else if sample_ns > self.ns {
            self.ns = sample_ns;
            self.at = now;
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
            let w = (-elapsed / decay_ns).exp();
            self.ns = self.ns * w + sample_ns * (1.0 - w);
            self.at = now;
        }
    }
}

impl Endpoint {
    pub fn new(addr: SocketAddr, settings: BalanceSettings) -> Arc<Endpoint> {
        Self::with_breaker(addr, settings, Arc::new(breaker::Settings::default()))
    }

    pub fn with_breaker(
        addr: SocketAddr,
        settings: BalanceSettings,
        breaker: Arc<breaker::Settings>,
    ) -> Arc<Endpoint> {
        let now = Instant::now();
        Arc::new(Endpoint {
            addr,
            pool: Pool::new(addr),
            pending: AtomicU32::new(0),
            rtt: Mutex::new(Rtt {
                ns: settings.default_rtt.as_nanos() as f64,
                at: now,
                sampled: false,
            }),
            decay_ns: (settings.decay.as_nanos() as f64).max(1.0),
            skip_until_ns: AtomicU64::new(0),
            connect_failures: AtomicU32::new(0),
            epoch: now,
            breaker: RwLock::new(Arc::new(Breaker::new(breaker))),
            suppressed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn breaker(&self) -> Arc<Breaker> {
        self.breaker.read().clone()
    }

    fn is_ejected(&self, now: Instant) -> bool {
        self.breaker().is_ejected(now)
    }

    /// Failing: ejected, or kept in only by the ejection cap.
    fn is_failing(&self, now: Instant) -> bool {
        self.suppressed.load(Ordering::Acquire) || self.is_ejected(now)
    }

    /// Peak-EWMA latency times (in-flight + 1).
    pub fn cost(&self) -> f64 {
        let (est, _) = self.estimate();
        est * self.load_factor()
    }

    /// What the admin server shows of an endpoint.
    pub fn report(&self) -> serde_json::Value {
        let now = Instant::now();
        let (rtt_ns, sampled) = self.estimate();
        let state = match self.breaker().state(now) {
            breaker::State::Closed => "closed",
            breaker::State::Open => "ejected",
            breaker::State::HalfOpen => "probing",
        };
        serde_json::json!({
            "address": self.addr.to_string(),
            "breaker": state,
            "in_flight": self.pending.load(Ordering::Acquire),
            "latency_ms": sampled.then_some((rtt_ns / 1e4).round() / 100.0),
            "connect_backoff": !self.available(),
        })
    }

    /// The decayed latency estimate, and whether it comes from real answers.
    fn estimate(&self) -> (f64, bool) {
        let mut rtt = self.rtt.lock();
        (rtt.decayed(Instant::now(), self.decay_ns), rtt.sampled)
    }

    fn load_factor(&self) -> f64 {
        f64::from(self.pending.load(Ordering::Acquire) + 1)
    }

    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::AcqRel);
        InFlight {
            ep: self.clone(),
            start: Instant::now(),
            record: false,
        }
    }

    /// Counts an open opaque TCP connection as load for as long as the guard lives, without
    /// taking its lifetime as a latency sample: how long a client keeps a connection open says
    /// nothing about the endpoint's latency (a long-lived connection would otherwise make its
    /// endpoint look slow, and p2c shun it, long after the connection closed).
    pub fn hold(self: &Arc<Self>) -> InFlight {
        self.start()
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Not backing off after a failed connect, or ejected by the breaker with its probe due:
    /// once the breaker has taken an endpoint out, the breaker's (configured) backoff decides
    /// when it is tried again. The connect backoff (up to 10 s) would otherwise keep p2c from
    /// ever choosing it for its probe while another endpoint is available, and an endpoint back
    /// from a crash would stay out for up to 10 s whatever `breaker_backoff_max` says.
    fn available(&self) -> bool {
        self.skip_until_ns.load(Ordering::Acquire) <= self.now_ns()
            || self.breaker().state(Instant::now()) == breaker::State::HalfOpen
    }

    /// Records a failed connect: skip this endpoint for 100 ms doubling to 10 s.
    pub fn connect_failed(&self) {
        let n = self.connect_failures.fetch_add(1, Ordering::AcqRel).min(7);
        let backoff = Duration::from_millis(100) * (1u32 << n);
        let until = self.now_ns() + backoff.min(Duration::from_secs(10)).as_nanos() as u64;
        self.skip_until_ns.store(until, Ordering::Release);
    }

    pub fn connect_succeeded(&self) {
        if self.connect_failures.load(Ordering::Acquire) != 0 {
            self.connect_failures.store(0, Ordering::Release);
            self.skip_until_ns.store(0, Ordering::Release);
        }
    }
}

/// One destination service's endpoints and their load. It knows the breaker's settings (the
/// endpoints' breakers are built from them) and nothing else of the service's policy: the
/// [`crate::proxy::Destination`] owns that.
pub struct Balancer {
    pub service: Arc<str>,
    endpoints: RwLock<Arc<[Arc<Endpoint>]>>,
    settings: BalanceSettings,
    endpoint_gauge: IntGauge,
    /// Where the per-endpoint series live (breaker state, connect errors): an endpoint's go
    /// with it.
    metrics: Arc<crate::metrics::Metrics>,
    /// True once discovery has delivered the first full endpoint set.
    synced: tokio::sync::watch::Sender<bool>,
    breaker_settings: RwLock<Arc<breaker::Settings>>,
}

/// The breaker knobs of a policy.
pub fn breaker_settings(p: &crate::config::policy::Policy) -> breaker::Settings {
    breaker::Settings {
        mode: p.breaker,
        failures: p.breaker_failures,
        backoff_min: p.breaker_backoff.0,
        backoff_max: p.breaker_backoff_max.0,
        success_rate: p.breaker_success_rate.0,
        window: p.breaker_window.0,
        min_requests: p.breaker_min_requests,
        latency_factor: p.breaker_latency_factor,
        max_ejected: p.breaker_max_ejected.0,
        ..breaker::Settings::default()
    }
}

/// What one request's outcome did to an endpoint's breaker.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub success: bool,
    pub latency: Duration,
    pub probe: bool,
}

impl Balancer {
    pub fn new(
        service: Arc<str>,
        settings: BalanceSettings,
        metrics: &Arc<crate::metrics::Metrics>,
        breaker: breaker::Settings,
    ) -> Arc<Self> {
        let endpoint_gauge = metrics.endpoints.with_label_values(&[&service]);
        Arc::new(Balancer {
            breaker_settings: RwLock::new(Arc::new(breaker)),
            service,
            endpoints: RwLock::new(Arc::from(Vec::new())),
            settings,
            endpoint_gauge,
            metrics: metrics.clone(),
            synced: tokio::sync::watch::Sender::new(false),
        })
    }

    fn breaker_settings(&self) -> Arc<breaker::Settings> {
        self.breaker_settings.read().clone()
    }

    /// Takes the service's breaker settings; new ones start every endpoint's breaker afresh.
    pub fn set_breaker(&self, new: breaker::Settings) {
        let mut slot = self.breaker_settings.write();
        if **slot == new {
            return;
        }
        let new = Arc::new(new);
        *slot = new.clone();
        drop(slot);
        for ep in self.endpoints.read().iter() {
            *ep.breaker.write() = Arc::new(Breaker::new(new.clone()));
            ep.suppressed.store(false, Ordering::Release);
        }
    }

    /// Whether `ep` may be ejected: while fewer than the maximum share of the service's
    /// endpoints are ejected, or when every other endpoint is failing too (then all are out and
    /// requests fail fast instead of waiting on failing endpoints).
    fn may_eject(&self, ep: &Endpoint, now: Instant) -> bool {
        let list = self.endpoints.read();
        let n = list.len();
        let share = self.breaker_settings().max_ejected;
        let cap = (share * n as f64).floor() as usize;
        let others = list.iter().filter(|e| e.addr != ep.addr);
        let ejected = others.clone().filter(|e| e.is_ejected(now)).count();
        ejected < cap || others.clone().all(|e| e.is_failing(now))
    }

    /// The median of the other endpoints' latencies (for the latency mode).
    fn peer_median_latency(&self, ep: &Endpoint) -> Option<Duration> {
        let list = self.endpoints.read();
        let mut l: Vec<Duration> = list
            .iter()
            .filter(|e| e.addr != ep.addr)
            .filter_map(|e| e.breaker().latency())
            .collect();
        if l.is_empty() {
            return None;
        }
        l.sort();
        Some(l[l.len() / 2])
    }

    /// Records a request's outcome on its endpoint's breaker; returns a state change.
    pub fn record(&self, ep: &Endpoint, outcome: Outcome) -> Option<Transition> {
        let now = Instant::now();
        let b = ep.breaker();
        let latency_mode = self.breaker_settings().mode == breaker::Mode::Latency;
        let peer = if latency_mode {
            self.peer_median_latency(ep)
        } else {
            None
        };
        let may_eject = outcome.success || self.may_eject(ep, now);
        let t = b.record(
            now,
            outcome.success,
            outcome.latency,
            outcome.probe,
            may_eject,
            peer,
        );
        match t {
            Some(Transition::EjectionSuppressed) => ep.suppressed.store(true, Ordering::Release),
            Some(Transition::Restored) | None if outcome.success => {
                ep.suppressed.store(false, Ordering::Release)
            }
            _ => {}
        }
        if let Some(t) = t {
            tracing::info!(service = %self.service, endpoint = %ep.addr, transition = ?t, "circuit breaker");
        }
        t
    }

    /// Waits, up to `sync_timeout`, for discovery's first full endpoint set: the first request
    /// to a service discovered on demand waits for its watch instead of being refused with
    /// "no endpoints" while the watch starts. Free once synced.
    pub async fn wait_synced(&self) {
        if *self.synced.borrow() {
            return;
        }
        let mut rx = self.synced.subscribe();
        let _ = tokio::time::timeout(self.settings.sync_timeout, rx.wait_for(|s| *s)).await;
    }

    /// Discovery delivered the service's first full endpoint set.
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    pub fn apply(&self, change: Change) {
        let mut guard = self.endpoints.write();
        let mut list: Vec<Arc<Endpoint>> = guard.iter().cloned().collect();
        match change {
            Change::Insert(addr, ()) => {
                if list.iter().any(|e| e.addr == addr) {
                    return;
                }
                tracing::debug!(service = %self.service, endpoint = %addr, "endpoint added");
                let b = self.breaker_settings();
                list.push(Endpoint::with_breaker(addr, self.settings, b));
            }
            Change::Remove(addr) => {
                let before = list.len();
                list.retain(|e| e.addr != addr);
                if list.len() == before {
                    return;
                }
                tracing::debug!(service = %self.service, endpoint = %addr, "endpoint removed");
                self.forget_series(addr);
            }
        }
        self.endpoint_gauge.set(list.len() as i64);
        *guard = Arc::from(list);
    }

    /// Removes a gone endpoint's metric series, so that an endpoint removed while ejected does
    /// not report its breaker state forever (and the series do not pile up with churn).
    fn forget_series(&self, addr: SocketAddr) {
        let ep = addr.to_string();
        let labels = [&*self.service, ep.as_str()];
        let _ = self.metrics.breaker_state.remove_label_values(&labels);
        let _ = self.metrics.connect_errors.remove_label_values(&labels);
    }

    /// Whether discovery has delivered the first full endpoint set.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// `(endpoints, ejected by the breaker now)`.
    pub fn ejection_counts(&self) -> (usize, usize) {
        let now = Instant::now();
        let list = self.endpoints.read();
        let ejected = list
            .iter()
            .filter(|e| e.breaker().state(now) != breaker::State::Closed)
            .count();
        (list.len(), ejected)
    }

    pub fn len(&self) -> usize {
        self.endpoints.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The endpoints by address (for tests and the admin server).
    pub fn endpoints(&self) -> HashMap<SocketAddr, Arc<Endpoint>> {
        let list = self.endpoints.read();
        list.iter().map(|e| (e.addr, e.clone())).collect()
    }

    /// Picks an endpoint by power of two choices, never one in `exclude`, preferring endpoints
    /// that are not backing off after a failed connect. `None` when no endpoint is left.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let now = Instant::now();
        let list = self.endpoints.read();
        let n = list.len();
        // Ejected endpoints are never picked; their one probe goes out once the backoff is
        // over, when `is_ejected` turns false and `admit` hands out the probe.
        let usable = |e: &Arc<Endpoint>| !exclude.contains(&e.addr) && !e.is_ejected(now);
        let chosen = match n {
            0 => None,
            1 => Some(&list[0]).filter(|e| usable(e)),
            _ => {
                let i = fastrand::usize(..n);
                let mut j = fastrand::usize(..n - 1);
                if j >= i {
                    j += 1;
                }
                let (a, b) = (&list[i], &list[j]);
                let ok = |e: &Arc<Endpoint>| usable(e) && e.available();
                match (ok(a), ok(b)) {
                    (true, true) => Some(if prefer_second(a, b) { b } else { a }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => None,
                }
            }
        };
        // Both choices unusable: scan for any available endpoint, then for any not excluded
        // (an endpoint in backoff is still better than no answer).
        chosen
            .or_else(|| {
                list.iter()
                    .filter(|e| usable(e) && e.available())
                    .min_by(cost_order)
            })
            .or_else(|| list.iter().filter(|e| usable(e)).min_by(cost_order))
            .cloned()
    }

    /// Picks an endpoint and asks its breaker: `(endpoint, probe)`. An endpoint whose probe
    /// another request took meanwhile is passed over. `None`: no endpoint may take a request.
    pub fn pick_admitted(&self, exclude: &[SocketAddr]) -> Option<(Arc<Endpoint>, bool)> {
        let mut skipped: Vec<SocketAddr> = Vec::new();
        loop {
            let ep = if skipped.is_empty() {
                self.pick(exclude)?
            } else {
                let all: Vec<SocketAddr> = exclude.iter().chain(&skipped).copied().collect();
                self.pick(&all)?
            };
            match ep.breaker().admit(Instant::now()) {
                Admission::Closed => return Some((ep, false)),
                Admission::Probe => return Some((ep, true)),
                Admission::Ejected => skipped.push(ep.addr),
            }
        }
    }
}

/// The p2c comparison. An endpoint that has not answered anything yet competes with its peer's
/// latency estimate (its in-flight requests still count): with `default_rtt` alone, a new
/// endpoint next to a warm one that answers faster than `default_rtt` would never be chosen,
/// and would wait for the default to decay before getting any traffic (a scale-up that takes
/// tens of seconds to matter). Ties are broken at random.
fn prefer_second(a: &Endpoint, b: &Endpoint) -> bool {
    let ((ea, sa), (eb, sb)) = (a.estimate(), b.estimate());
    let (ea, eb) = match (sa, sb) {
        (false, true) => (eb, eb),
        (true, false) => (ea, ea),
        _ => (ea, eb),
    };
    let (ca, cb) = (ea * a.load_factor(), eb * b.load_factor());
    cb < ca || (cb == ca && fastrand::bool())
}

fn cost_order(a: &&Arc<Endpoint>, b: &&Arc<Endpoint>) -> std::cmp::Ordering {
    a.cost().total_cmp(&b.cost())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BalanceSettings {
        BalanceSettings {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
            sync_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_removed_endpoint_takes_its_series_with_it() {
        let m = Arc::new(crate::metrics::Metrics::new());
        let b = Balancer::new("web.default".into(), settings(), &m, Default::default());
        let (gone, kept) = (
            SocketAddr::from(([127, 0, 0, 1], 1000)),
            SocketAddr::from(([127, 0, 0, 1], 1001)),
        );
        b.apply(Change::Insert(gone, ()));
        b.apply(Change::Insert(kept, ()));
        for ep in [gone, kept] {
            let labels = ["web.default", &ep.to_string()];
            m.breaker_state.with_label_values(&labels).set(1);
            m.connect_errors.with_label_values(&labels).inc();
        }
        b.apply(Change::Remove(gone));
        let text = m.render();
        assert!(!text.contains(&gone.to_string()), "{text}");
        assert!(
            text.contains(&format!(
                "meshlet_endpoint_breaker_state{{endpoint=\"{kept}\",service=\"web.default\"}} 1"
            )),
            "{text}"
        );
    }

    fn balancer(n: u16) -> Arc<Balancer> {
        let b = Balancer::new(
            "web.default".into(),
            settings(),
            &Arc::new(crate::metrics::Metrics::new()),
            Default::default(),
        );
        for p in 0..n {
            b.apply(Change::Insert(
                SocketAddr::from(([127, 0, 0, 1], 1000 + p)),
                (),
            ));
        }
        b
    }

    #[test]
    fn insert_remove_and_gauge() {
        let b = balancer(3);
        assert_eq!(b.len(), 3);
        b.apply(Change::Insert(SocketAddr::from(([127, 0, 0, 1], 1000)), ()));
        assert_eq!(b.len(), 3, "duplicate insert ignored");
        b.apply(Change::Remove(SocketAddr::from(([127, 0, 0, 1], 1001))));
        assert_eq!(b.len(), 2);
        assert_eq!(b.endpoint_gauge.get(), 2);
    }

    #[test]
    fn excluded_and_empty() {
        let b = balancer(0);
        assert!(b.pick(&[]).is_none());
        let b = balancer(2);
        let a0 = SocketAddr::from(([127, 0, 0, 1], 1000));
        for _ in 0..50 {
            assert_ne!(b.pick(&[a0]).unwrap().addr, a0);
        }
        let a1 = SocketAddr::from(([127, 0, 0, 1], 1001));
        assert!(b.pick(&[a0, a1]).is_none());
    }

    #[test]
    fn slow_endpoint_loses() {
        let b = balancer(3);
        let slow = SocketAddr::from(([127, 0, 0, 1], 1002));
        let eps = b.endpoints();
        // The slow endpoint has been seen at 50 ms, the others at 1 ms.
        for (addr, ep) in &eps {
            let ms = if *addr == slow { 50 } else { 1 };
            let mut r = ep.rtt.lock();
            r.ns = Duration::from_millis(ms).as_nanos() as f64;
            r.sampled = true;
        }
        let picked_slow = (0..1000)
            .filter(|_| b.pick(&[]).unwrap().addr == slow)
            .count();
        assert_eq!(picked_slow, 0);
    }

    #[test]
    fn a_new_endpoint_competes_with_a_warm_one() {
        let b = balancer(1);
        let warm = b.pick(&[]).unwrap();
        {
            let mut r = warm.rtt.lock();
            r.ns = Duration::from_micros(300).as_nanos() as f64;
            r.sampled = true;
        }
        b.apply(Change::Insert(SocketAddr::from(([127, 0, 0, 1], 2000)), ()));
        let new = (0..200)
            .filter(|_| b.pick(&[]).unwrap().addr.port() == 2000)
            .count();
        assert!(new > 50, "the new endpoint was picked {new} times of 200");
    }

    #[test]
    fn pending_requests_raise_cost() {
        let b = balancer(1);
        let ep = b.pick(&[]).unwrap();
        let c0 = ep.cost();
        let g = ep.start();
        assert!(ep.cost() > c0 * 1.5);
        drop(g);
    }

    #[test]
    fn connect_failure_backs_off() {
        let b = balancer(2);
        let eps = b.endpoints();
        let bad = eps[&SocketAddr::from(([127, 0, 0, 1], 1000))].clone();
        bad.connect_failed();
        for _ in 0..100 {
            assert_ne!(b.pick(&[]).unwrap().addr, bad.addr);
        }
        bad.connect_succeeded();
        assert!(bad.available());
    }

    #[test]
    fn a_due_probe_is_not_held_back_by_the_connect_backoff() {
        let b = balancer(2);
        let eps = b.endpoints();
        let bad = eps[&SocketAddr::from(([127, 0, 0, 1], 1000))].clone();
        // Refused connects put it in connect backoff (10 s after 7)...
        for _ in 0..7 {
            bad.connect_failed();
        }
        // ... and got it ejected by the breaker two seconds ago, for about 1 s: its probe is due.
        let then = Instant::now() - Duration::from_secs(2);
        for _ in 0..7 {
            bad.breaker()
                .record(then, false, Duration::ZERO, false, true, None);
        }
        assert!(!bad.is_ejected(Instant::now()));
        let probed = (0..200)
            .filter_map(|_| b.pick_admitted(&[]))
            .filter(|(e, probe)| e.addr == bad.addr && *probe)
            .count();
        assert_eq!(probed, 1, "exactly one probe, despite the connect backoff");
    }
}
