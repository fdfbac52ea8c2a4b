//! Per-endpoint circuit breaking (outlier ejection): pure logic, no I/O.
//!
//! A [`Breaker`] watches one endpoint's request outcomes and ejects the endpoint when it looks
//! broken, so that p2c stops sending it traffic. Three detectors ([`Mode`]): a run of
//! consecutive failures, a low success rate over a sliding window, or a latency far above the
//! service's other endpoints. An ejection lasts a backoff (with jitter, so that endpoints ejected
//! together do not come back together); when it is over, exactly one request is let through as a
//! probe. A good probe restores the endpoint; a bad one ejects it again for twice as long, up to
//! a cap.
//!
//! The caller supplies `now` everywhere, so that the logic is testable without sleeping and the
//! breaker never reads the clock itself. Limits that need the whole service (the maximum ejected
//! share, the peers' median latency) are decided by the balancer and passed in.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Which detector ejects an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `failures` consecutive failures.
    Consecutive,
    /// A success rate below `success_rate` over `window`.
    SuccessRate,
    /// A mean latency above `latency_factor` times the peers' median over `window`.
    Latency,
    /// No circuit breaking.
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "consecutive" => Ok(Mode::Consecutive),
            "success-rate" => Ok(Mode::SuccessRate),
            "latency" => Ok(Mode::Latency),
            "off" => Ok(Mode::Off),
            _ => Err(format!(
                "unknown circuit breaker mode {s:?}: expected \"consecutive\", \"success-rate\", \
                 \"latency\" or \"off\""
            )),
        }
    }
}

/// A service's circuit-breaking knobs, shared by its endpoints' breakers.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub mode: Mode,
    /// Consecutive failures that eject (consecutive mode). 0 is taken as 1.
    pub failures: u32,
    /// The first ejection's backoff.
    pub backoff_min: Duration,
    /// The cap on the backoff, which doubles with each failed probe.
    pub backoff_max: Duration,
    /// The backoff varies by +/- this share of itself (clamped to 0..=1).
    pub jitter: f64,
    /// Success-rate mode: eject below this share of successful requests.
    pub success_rate: f64,
    /// Success-rate and latency modes: the sliding window the statistics cover.
    pub window: Duration,
    /// Success-rate and latency modes: fewer requests in the window than this never eject (a
    /// rate or a mean over a handful of requests is noise).
    pub min_requests: u32,
    /// Latency mode: eject when the endpoint's latency exceeds this many times the peers' median.
    pub latency_factor: f64,
    /// The largest share of a service's endpoints ejected at once (see `Balancer::may_eject`).
    pub max_ejected: f64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            mode: Mode::Consecutive,
            failures: 7,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            jitter: 0.1,
            success_rate: 0.8,
            window: Duration::from_secs(10),
            min_requests: 20,
            latency_factor: 3.0,
            max_ejected: 0.5,
        }
    }
}

/// What [`Breaker::admit`] says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it.
    Closed,
    /// Send it as the one probe of an ejected endpoint; record its outcome with `probe: true`.
    Probe,
    /// Do not send it here.
    Ejected,
}

/// The breaker's state, for metrics (gauge values 0, 1, 2) and the admin server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    /// Ejected, the backoff still running.
    Open,
    /// Ejected, the backoff over: a probe is due or in flight.
    HalfOpen,
}

/// A state change worth logging and counting, returned by [`Breaker::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The endpoint was ejected for `backoff` (jitter included).
    Ejected { backoff: Duration },
    /// A probe succeeded: the endpoint takes traffic again.
    Restored,
    /// A probe failed: ejected again for `backoff` (doubled, capped, jitter included).
    ProbeFailed { backoff: Duration },
    /// The endpoint met the ejection rule but the service already has its maximum share of
    /// ejected endpoints, so it stays in.
    EjectionSuppressed,
}

/// Buckets in the sliding window: the window slides in steps of a tenth of its length.
const BUCKETS: usize = 10;

/// One endpoint's circuit breaker. Cheap to share: one short mutex-protected update per call.
pub struct Breaker {
    settings: Arc<Settings>,
    inner: Mutex<Inner>,
}

struct Inner {
    phase: Phase,
    /// The un-jittered backoff of the next (re-)ejection: `backoff_min` after a restore, doubled
    /// by each failed probe.
    backoff: Duration,
    consecutive: u32,
    window: Window,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    /// Ejected at `since` for `backoff`. Stored as a start and a length rather than an end
    /// instant so that a huge configured backoff cannot overflow `Instant`.
    Open {
        since: Instant,
        backoff: Duration,
    },
    /// The probe was handed out at `since` and its outcome is awaited.
    Probing {
        since: Instant,
    },
}

impl Breaker {
    pub fn new(settings: Arc<Settings>) -> Breaker {
        let inner = Inner {
            phase: Phase::Closed,
            backoff: base_backoff(&settings),
            consecutive: 0,
            window: Window::new(settings.window),
        };
        Breaker {
            settings,
            inner: Mutex::new(inner),
        }
    }

    /// Closed: send. Open and the backoff not over: Ejected. Backoff over and no probe in
    /// flight: Probe (exactly one caller gets it; the breaker is HalfOpen until that probe's
    /// outcome is recorded); while the probe is in flight: Ejected.
    ///
    /// A probe whose outcome is never recorded (its request was dropped on the floor) would keep
    /// the endpoint ejected forever, so a probe older than `backoff_max` counts as lost and the
    /// next caller gets a new one.
    pub fn admit(&self, now: Instant) -> Admission {
        if self.settings.mode == Mode::Off {
            return Admission::Closed;
        }
        let mut inner = self.inner.lock();
        match inner.phase {
            Phase::Closed => Admission::Closed,
            Phase::Open { since, backoff } if !elapsed(since, now, backoff) => Admission::Ejected,
            Phase::Probing { since } if !elapsed(since, now, self.probe_lease()) => {
                Admission::Ejected
            }
            Phase::Open { .. } | Phase::Probing { .. } => {
                inner.phase = Phase::Probing { since: now };
                Admission::Probe
            }
        }
    }

    /// A cheap check for the balancer: would `admit` say Ejected now (without taking a probe)?
    pub fn is_ejected(&self, now: Instant) -> bool {
        if self.settings.mode == Mode::Off {
            return false;
        }
        match self.inner.lock().phase {
            Phase::Closed => false,
            Phase::Open { since, backoff } => !elapsed(since, now, backoff),
            Phase::Probing { since } => !elapsed(since, now, self.probe_lease()),
        }
    }

    /// Records one request's outcome. `probe` says whether it was admitted as the probe.
    ///
    /// `may_eject` is false when ejecting this endpoint would exceed the service's maximum
    /// ejected share; then the breaker stays closed and returns `Some(EjectionSuppressed)` at
    /// each outcome that would have ejected it (the statistics are kept, so it is ejected on the
    /// first such outcome once the share allows). A failed probe re-ejects regardless: the
    /// endpoint already counts as ejected.
    ///
    /// `peer_median_latency`: for the latency mode, the median latency of the service's other
    /// endpoints (None when unknown; then the latency mode neither ejects nor judges a probe by
    /// latency).
    ///
    /// Outcomes while ejected, other than the probe's, are ignored: they are requests that were
    /// already in flight when the endpoint was ejected and say nothing new.
    pub fn record(
        &self,
        now: Instant,
        success: bool,
        latency: Duration,
        probe: bool,
        may_eject: bool,
        peer_median_latency: Option<Duration>,
    ) -> Option<Transition> {
        let s = &*self.settings;
        if s.mode == Mode::Off {
            return None;
        }
        let mut inner = self.inner.lock();
        match inner.phase {
            Phase::Open { .. } => None,
            Phase::Probing { .. } if !probe => None,
            Phase::Probing { .. } => {
                let too_slow = s.mode == Mode::Latency
                    && peer_median_latency.is_some_and(|m| exceeds(latency, m, s.latency_factor));
                if success && !too_slow {
                    inner.phase = Phase::Closed;
                    inner.backoff = base_backoff(s);
                    inner.consecutive = 0;
                    inner.window = Window::new(s.window);
                    Some(Transition::Restored)
                } else {
                    inner.backoff = inner.backoff.saturating_mul(2).min(s.backoff_max);
                    let backoff = inner.eject(now, s.jitter);
                    Some(Transition::ProbeFailed { backoff })
                }
            }
            // A `probe` outcome arriving while closed is a stale probe (one presumed lost whose
            // successor already restored the endpoint): an ordinary request outcome.
            Phase::Closed => {
                inner.window.add(now, success, latency);
                inner.consecutive = if success {
                    0
                } else {
                    inner.consecutive.saturating_add(1)
                };
                if !inner.trips(s, success, peer_median_latency) {
                    None
                } else if !may_eject {
                    Some(Transition::EjectionSuppressed)
                } else {
                    let backoff = inner.eject(now, s.jitter);
                    Some(Transition::Ejected { backoff })
                }
            }
        }
    }

    /// The probe's request ended without an outcome (its client went away before the answer
    /// ended): the endpoint is due a probe again at once, rather than when the probe lease (see
    /// [`Breaker::admit`]) runs out. A probe that has already been judged is left alone.
    pub fn release_probe(&self, now: Instant) {
        let mut inner = self.inner.lock();
        if let Phase::Probing { .. } = inner.phase {
            inner.phase = Phase::Open {
                since: now,
                backoff: Duration::ZERO,
            };
        }
    }

    pub fn state(&self, now: Instant) -> State {
        if self.settings.mode == Mode::Off {
            return State::Closed;
        }
        match self.inner.lock().phase {
            Phase::Closed => State::Closed,
            Phase::Open { since, backoff } if !elapsed(since, now, backoff) => State::Open,
            Phase::Open { .. } | Phase::Probing { .. } => State::HalfOpen,
        }
    }

    /// This endpoint's recent latency estimate used by the latency mode: the mean latency of the
    /// successful requests in the window (as of the latest recorded outcome), for computing
    /// peers' medians. None before any success in the window, after a restore, and in mode Off.
    pub fn latency(&self) -> Option<Duration> {
        if self.settings.mode == Mode::Off {
            return None;
        }
        self.inner.lock().window.stats().mean_latency()
    }

    /// How long a handed-out probe may go unrecorded before it counts as lost.
    fn probe_lease(&self) -> Duration {
        self.settings.backoff_max.max(self.settings.backoff_min)
    }
}

impl Inner {
    /// Whether the latest outcome (already counted) meets the mode's ejection rule.
    fn trips(&self, s: &Settings, success: bool, peer_median: Option<Duration>) -> bool {
        match s.mode {
            Mode::Consecutive => !success && self.consecutive >= s.failures.max(1),
            // Only a failure can push the rate down, so only a failure ejects: an endpoint is
            // never ejected on the strength of a request that just worked.
            Mode::SuccessRate => {
                let st = self.window.stats();
                let total = st.ok + st.failed;
                !success
                    && total > 0
                    && total >= u64::from(s.min_requests)
                    && (st.ok as f64) < s.success_rate * total as f64
            }
            // The mean covers successful requests only, so the minimum counts those.
            Mode::Latency => {
                let st = self.window.stats();
                st.ok > 0
                    && st.ok >= u64::from(s.min_requests)
                    && match (st.mean_latency(), peer_median) {
                        (Some(mean), Some(median)) => exceeds(mean, median, s.latency_factor),
                        _ => false,
                    }
            }
            Mode::Off => false,
        }
    }

    /// Opens the breaker for the current backoff with jitter; returns the jittered backoff.
    fn eject(&mut self, now: Instant, jitter: f64) -> Duration {
        let backoff = jittered(self.backoff, jitter);
        self.phase = Phase::Open {
            since: now,
            backoff,
        };
        backoff
    }
}

/// The first ejection's backoff; never above the cap, even if misconfigured.
fn base_backoff(s: &Settings) -> Duration {
    s.backoff_min.min(s.backoff_max)
}

/// Whether `len` has passed since `since` (false if `now` is earlier, as it may be for a caller
/// that read the clock just before another one that got the lock first).
fn elapsed(since: Instant, now: Instant, len: Duration) -> bool {
    now.saturating_duration_since(since) >= len
}

/// `latency > factor x median`, in floating point so that a fractional factor needs no
/// `Duration` arithmetic (which panics on overflow or negative values).
fn exceeds(latency: Duration, median: Duration, factor: f64) -> bool {
    latency.as_secs_f64() > factor * median.as_secs_f64()
}

/// `d` scaled by a uniform factor in `1 +/- jitter`. Desynchronises endpoints that were ejected
/// together (say, by one bad deploy) so that their probes do not all arrive at once.
fn jittered(d: Duration, jitter: f64) -> Duration {
    let j = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let factor = 1.0 + j * (fastrand::f64() * 2.0 - 1.0);
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(d)
}

/// A sliding window of request outcomes: `BUCKETS` buckets, each a tenth of the window, so the
/// statistics cover the last 90-100% of the window and old outcomes age out in steps.
struct Window {
    /// Bucket indices count bucket widths since this instant (the first outcome recorded).
    epoch: Option<Instant>,
    width_ns: u128,
    /// The highest bucket index seen; buckets older than `BUCKETS` behind it are stale.
    latest: u64,
    buckets: [Bucket; BUCKETS],
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    index: u64,
    ok: u64,
    failed: u64,
    /// The sum of successful requests' latencies.
    ok_latency: Duration,
}

/// Totals over the live buckets.
#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    ok: u64,
    failed: u64,
    ok_latency: Duration,
}

impl Stats {
    fn mean_latency(&self) -> Option<Duration> {
        if self.ok == 0 {
            return None;
        }
        let ns = self.ok_latency.as_nanos() / u128::from(self.ok);
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }
}

impl Window {
    fn new(window: Duration) -> Window {
        Window {
            epoch: None,
            width_ns: (window.as_nanos() / BUCKETS as u128).max(1),
            latest: 0,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn add(&mut self, now: Instant, success: bool, latency: Duration) {
        let epoch = *self.epoch.get_or_insert(now);
        let index = now.saturating_duration_since(epoch).as_nanos() / self.width_ns;
        // An outcome stamped slightly earlier than the latest one (callers race to the lock)
        // goes into the current bucket: time never runs backwards in the window.
        let index = u64::try_from(index).unwrap_or(u64::MAX).max(self.latest);
        self.latest = index;
        let b = &mut self.buckets[(index % BUCKETS as u64) as usize];
        if b.index != index {
            *b = Bucket {
                index,
                ..Bucket::default()
            };
        }
        if success {
            b.ok += 1;
            b.ok_latency = b.ok_latency.saturating_add(latency);
        } else {
            b.failed += 1;
        }
    }

    fn stats(&self) -> Stats {
        let oldest = self.latest.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| b.index >= oldest)
            .fold(Stats::default(), |acc, b| Stats {
                ok: acc.ok + b.ok,
                failed: acc.failed + b.failed,
                ok_latency: acc.ok_latency.saturating_add(b.ok_latency),
            })
    }
}

/// What counts as a failure: status classes from the config.
#[derive(Debug, Clone)]
pub struct FailureClass {
    pub http: HttpFailures,
    /// gRPC status codes that count as failures.
    pub grpc: Vec<u16>,
}

/// Which HTTP statuses count as failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFailures {
    /// Any 5xx.
    All5xx,
    /// Only 502, 503 and 504: the endpoint (or what is behind it) is unreachable or overloaded,
    /// while a 500 may be the application's answer to one bad request.
    Gateway,
}

/// gRPC status codes by their names in the gRPC spec, kebab-cased (the index is the code).
const GRPC_CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

impl Default for FailureClass {
    /// All 5xx; gRPC UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL and RESOURCE_EXHAUSTED: the codes
    /// that say the server is in trouble, not that the request was wrong.
    fn default() -> FailureClass {
        FailureClass {
            http: HttpFailures::All5xx,
            grpc: vec![14, 4, 13, 8],
        }
    }
}

impl FailureClass {
    /// An HTTP status (and, for gRPC, the grpc-status from the response headers of a
    /// trailers-only response or from trailers, when known) is a failure?
    ///
    /// Either signal suffices: a gRPC server answers HTTP 200, so a 5xx on a gRPC call comes from
    /// a broken server or an intermediary and is a failure whatever the grpc-status.
    pub fn is_failure(&self, status: http::StatusCode, grpc_status: Option<u16>) -> bool {
        let http = match self.http {
            HttpFailures::All5xx => status.is_server_error(),
            HttpFailures::Gateway => matches!(status.as_u16(), 502..=504),
        };
        http || grpc_status.is_some_and(|c| self.grpc.contains(&c))
    }

    /// Parses "5xx" | "gateway" (ASCII case ignored).
    pub fn parse_http(s: &str) -> Result<HttpFailures, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("5xx") {
            Ok(HttpFailures::All5xx)
        } else if t.eq_ignore_ascii_case("gateway") {
            Ok(HttpFailures::Gateway)
        } else {
            Err(format!(
                "unknown HTTP failure class {s:?}: expected \"5xx\" or \"gateway\""
            ))
        }
    }

    /// Parses a comma list of gRPC code names or numbers ("unavailable,deadline-exceeded" or
    /// "14,4"; names also as in the spec, "DEADLINE_EXCEEDED"), or "none" for the empty list.
    /// Duplicates are dropped. Errors name the bad item.
    pub fn parse_grpc(s: &str) -> Result<Vec<u16>, String> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(Vec::new());
        }
        let mut codes = Vec::new();
        for item in s.split(',') {
            let code = grpc_code(item.trim())?;
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
        Ok(codes)
    }
}

fn grpc_code(item: &str) -> Result<u16, String> {
    if item.is_empty() {
        return Err("empty item in gRPC status list".to_string());
    }
    let code = if item.bytes().all(|b| b.is_ascii_digit()) {
        item.parse::<u16>()
            .ok()
            .filter(|&c| usize::from(c) < GRPC_CODES.len())
    } else {
        let name = item.to_ascii_lowercase().replace('_', "-");
        GRPC_CODES
            .iter()
            .position(|&n| n == name)
            .and_then(|i| u16::try_from(i).ok())
    };
    code.ok_or_else(|| {
        format!(
            "unknown gRPC status {item:?}: expected a code 0-16 or a name such as \
             \"unavailable\" or \"deadline-exceeded\""
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    /// Default settings without jitter, so that backoffs are exact.
    fn exact(mode: Mode) -> Settings {
        Settings {
            mode,
            jitter: 0.0,
            ..Settings::default()
        }
    }

    fn breaker(s: Settings) -> Breaker {
        Breaker::new(Arc::new(s))
    }

    fn ok(b: &Breaker, now: Instant) -> Option<Transition> {
        b.record(now, true, 10 * MS, false, true, None)
    }

    fn fail(b: &Breaker, now: Instant) -> Option<Transition> {
        b.record(now, false, 10 * MS, false, true, None)
    }

    /// Ejects a consecutive-mode breaker at `now` (7 failures); returns the backoff.
    fn eject(b: &Breaker, now: Instant) -> Duration {
        for _ in 0..6 {
            assert_eq!(fail(b, now), None);
        }
        match fail(b, now) {
            Some(Transition::Ejected { backoff }) => backoff,
            t => panic!("expected an ejection, got {t:?}"),
        }
    }

    #[test]
    fn a_released_probe_is_due_again_at_once() {
        let b = breaker(exact(Mode::Consecutive));
        let t0 = Instant::now();
        let backoff = eject(&b, t0);
        let due = t0 + backoff;
        assert_eq!(b.admit(due), Admission::Probe);
        // Without a release, the endpoint stays out for the probe lease.
        assert_eq!(b.admit(due + MS), Admission::Ejected);
        b.release_probe(due + MS);
        assert_eq!(b.state(due + MS), State::HalfOpen);
        assert_eq!(b.admit(due + MS), Admission::Probe);
        // A release after the probe's outcome changes nothing.
        assert_eq!(
            b.record(due + MS, true, 10 * MS, true, true, None),
            Some(Transition::Restored)
        );
        b.release_probe(due + 2 * MS);
        assert_eq!(b.state(due + 2 * MS), State::Closed);
    }

    /// Takes the probe at `now` and fails it; returns the new backoff.
    fn fail_probe(b: &Breaker, now: Instant) -> Duration {
        assert_eq!(b.admit(now), Admission::Probe);
        match b.record(now, false, 10 * MS, true, true, None) {
            Some(Transition::ProbeFailed { backoff }) => backoff,
            t => panic!("expected a failed probe, got {t:?}"),
        }
    }

    #[test]
    fn mode_parses() {
        assert_eq!("consecutive".parse(), Ok(Mode::Consecutive));
        assert_eq!("success-rate".parse(), Ok(Mode::SuccessRate));
        assert_eq!("latency".parse(), Ok(Mode::Latency));
        assert_eq!("off".parse(), Ok(Mode::Off));
        let e = "sometimes".parse::<Mode>().unwrap_err();
        assert!(e.contains("sometimes") && e.contains("success-rate"), "{e}");
    }

    #[test]
    fn defaults() {
        let s = Settings::default();
        assert_eq!(s.mode, Mode::Consecutive);
        assert_eq!(s.failures, 7);
        assert_eq!((s.backoff_min, s.backoff_max), (SEC, 60 * SEC));
        assert_eq!(
            (s.jitter, s.success_rate, s.latency_factor),
            (0.1, 0.8, 3.0)
        );
        assert_eq!((s.window, s.min_requests), (10 * SEC, 20));
    }

    #[test]
    fn consecutive_failures_eject() {
        let b = breaker(exact(Mode::Consecutive));
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Admission::Closed);
        assert_eq!(eject(&b, t0), SEC);
        assert_eq!(b.state(t0), State::Open);
        assert!(b.is_ejected(t0));
        assert_eq!(b.admit(t0 + 999 * MS), Admission::Ejected);
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let b = breaker(exact(Mode::Consecutive));
        let t0 = Instant::now();
        for _ in 0..6 {
            assert_eq!(fail(&b, t0), None);
        }
        assert_eq!(ok(&b, t0), None);
        for _ in 0..6 {
            assert_eq!(fail(&b, t0), None);
        }
        assert_eq!(b.state(t0), State::Closed);
        assert!(matches!(fail(&b, t0), Some(Transition::Ejected { .. })));
    }

    #[test]
    fn exactly_one_probe_per_backoff_period() {
        let b = breaker(exact(Mode::Consecutive));
        let t0 = Instant::now();
        eject(&b, t0);
        let t1 = t0 + SEC;
        assert_eq!(b.state(t1), State::HalfOpen);
        assert!(
            !b.is_ejected(t1),
            "a probe is due: the balancer may pick it"
        );
        let probes = (0..100).filter(|_| b.admit(t1) == Admission::Probe).count();
        assert_eq!(probes, 1);
        assert_eq!(b.state(t1), State::HalfOpen);
        assert!(b.is_ejected(t1), "the probe is in flight");
        assert_eq!(b.admit(t1 + 30 * SEC), Admission::Ejected);
    }

    #[test]
    fn probe_success_restores_and_resets() {
        let b = breaker(exact(Mode::Consecutive));
        let t0 = Instant::now();
        eject(&b, t0);
        let t1 = t0 + SEC;
        let t2 = t1 + fail_probe(&b, t1);
        assert_eq!(b.admit(t2), Admission::Probe);
        let restored = b.record(t2, true, 10 * MS, true, true, None);
        assert_eq!(restored, Some(Transition::Restored));
        assert_eq!(b.state(t2), State::Closed);
        assert_eq!(b.admit(t2), Admission::Closed);
        // Counters reset: six failures do not eject; the seventh does, for backoff_min again.
        assert_eq!(eject(&b, t2), SEC);
    }

    #[test]
    fn failed_probes_double_the_backoff_up_to_the_cap() {
        let b = breaker(Settings {
            backoff_max: 5 * SEC,
            ..exact(Mode::Consecutive)
        });
        let mut now = Instant::now();
        let mut backoff = eject(&b, now);
        let mut seen = vec![backoff];
        for _ in 0..4 {
            now += backoff;
            assert_eq!(b.admit(now - MS), Admission::Ejected, "still backing off");
            backoff = fail_probe(&b, now);
            assert_eq!(b.state(now), State::Open);
            seen.push(backoff);
        }
        assert_eq!(seen, [SEC, 2 * SEC, 4 * SEC, 5 * SEC, 5 * SEC]);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let mut backoffs = Vec::new();
        for _ in 0..200 {
            let b = breaker(Settings::default());
            backoffs.push(eject(&b, Instant::now()));
        }
        assert!(
            backoffs
                .iter()
                .all(|&d| (900 * MS..=1100 * MS).contains(&d))
        );
        assert!(backoffs.iter().any(|&d| d != backoffs[0]), "no jitter");

        // Jitter applies after the cap: 60 s +/- 10%.
        let b = breaker(Settings {
            backoff_min: 60 * SEC,
            ..Settings::default()
        });
        let now = Instant::now();
        let first = eject(&b, now);
        assert!((54 * SEC..=66 * SEC).contains(&first), "{first:?}");
        let second = fail_probe(&b, now + first);
        assert!((54 * SEC..=66 * SEC).contains(&second), "{second:?}");
    }

    #[test]
    fn outcomes_while_ejected_are_ignored() {
        let b = breaker(exact(Mode::Consecutive));
        let t0 = Instant::now();
        eject(&b, t0);
        // In-flight requests finishing while open change nothing, success or failure.
        assert_eq!(fail(&b, t0 + MS), None);
        assert_eq!(ok(&b, t0 + MS), None);
        assert_eq!(b.state(t0 + MS), State::Open);
        // Nor do non-probe outcomes while the probe is in flight.
        let t1 = t0 + SEC;
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(ok(&b, t1), None);
        assert_eq!(fail(&b, t1), None);
        assert_eq!(b.state(t1), State::HalfOpen);
        assert_eq!(
            b.record(t1, true, MS, true, true, None),
            Some(Transition::Restored)
        );
    }

    #[test]
    fn a_lost_probe_is_replaced_after_backoff_max() {
        let b = breaker(exact(Mode::Consecutive));
        let t0 = Instant::now();
        eject(&b, t0);
        let t1 = t0 + SEC;
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(b.admit(t1 + 60 * SEC - MS), Admission::Ejected);
        assert_eq!(b.admit(t1 + 60 * SEC), Admission::Probe);
        assert_eq!(b.admit(t1 + 60 * SEC), Admission::Ejected);
    }

    #[test]
    fn ejection_is_suppressed_when_the_share_is_full() {
        let b = breaker(exact(Mode::Consecutive));
        let t0 = Instant::now();
        for _ in 0..6 {
            assert_eq!(b.record(t0, false, MS, false, false, None), None);
        }
        let t = b.record(t0, false, MS, false, false, None);
        assert_eq!(t, Some(Transition::EjectionSuppressed));
        assert_eq!(b.state(t0), State::Closed);
        assert_eq!(b.admit(t0), Admission::Closed);
        // Still over the threshold: suppressed again, then ejected once the share allows.
        let t = b.record(t0, false, MS, false, false, None);
        assert_eq!(t, Some(Transition::EjectionSuppressed));
        assert!(matches!(fail(&b, t0), Some(Transition::Ejected { .. })));
    }

    #[test]
    fn success_rate_ejects_below_the_threshold() {
        let b = breaker(exact(Mode::SuccessRate));
        let t0 = Instant::now();
        // 15 successes and 4 failures: 19 requests, under min_requests.
        for _ in 0..15 {
            assert_eq!(ok(&b, t0), None);
        }
        for _ in 0..4 {
            assert_eq!(fail(&b, t0), None);
        }
        // The 20th, a failure: 15/20 = 0.75 < 0.8.
        assert_eq!(fail(&b, t0), Some(Transition::Ejected { backoff: SEC }));
        assert_eq!(b.state(t0), State::Open);
    }

    #[test]
    fn success_rate_at_the_threshold_stays_closed() {
        let b = breaker(exact(Mode::SuccessRate));
        let t0 = Instant::now();
        for _ in 0..16 {
            ok(&b, t0);
        }
        for _ in 0..4 {
            assert_eq!(fail(&b, t0), None); // 16/20 = 0.8, not below
        }
        assert_eq!(b.state(t0), State::Closed);
    }

    #[test]
    fn success_rate_window_slides() {
        let b = breaker(exact(Mode::SuccessRate));
        let t0 = Instant::now();
        for _ in 0..15 {
            ok(&b, t0);
        }
        for _ in 0..4 {
            fail(&b, t0);
        }
        // 10 s later the old outcomes have aged out: 1 request in the window, no ejection.
        assert_eq!(fail(&b, t0 + 10 * SEC), None);
        // Within the window they still count (9.5 s: the first bucket is live).
        let b = breaker(exact(Mode::SuccessRate));
        for _ in 0..15 {
            ok(&b, t0);
        }
        for _ in 0..4 {
            fail(&b, t0);
        }
        let t = fail(&b, t0 + 9500 * MS);
        assert!(matches!(t, Some(Transition::Ejected { .. })), "{t:?}");
    }

    #[test]
    fn success_rate_window_resets_on_restore() {
        let b = breaker(exact(Mode::SuccessRate));
        let t0 = Instant::now();
        for _ in 0..20 {
            fail(&b, t0);
        }
        assert_eq!(b.state(t0), State::Open);
        let t1 = t0 + SEC;
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(
            b.record(t1, true, MS, true, true, None),
            Some(Transition::Restored)
        );
        // A fresh window: 19 failures are under min_requests, whatever came before.
        for _ in 0..19 {
            assert_eq!(fail(&b, t1), None);
        }
        assert!(matches!(fail(&b, t1), Some(Transition::Ejected { .. })));
    }

    #[test]
    fn success_rate_suppressed() {
        let b = breaker(exact(Mode::SuccessRate));
        let t0 = Instant::now();
        for _ in 0..19 {
            b.record(t0, false, MS, false, false, None);
        }
        let t = b.record(t0, false, MS, false, false, None);
        assert_eq!(t, Some(Transition::EjectionSuppressed));
        assert_eq!(b.state(t0), State::Closed);
    }

    #[test]
    fn latency_mode_ejects_slow_endpoints() {
        let b = breaker(exact(Mode::Latency));
        let t0 = Instant::now();
        let median = Some(10 * MS);
        // 40 ms against a 10 ms median (factor 3): too slow, but only from 20 requests.
        for _ in 0..19 {
            assert_eq!(b.record(t0, true, 40 * MS, false, true, median), None);
        }
        assert_eq!(b.latency(), Some(40 * MS));
        let t = b.record(t0, true, 40 * MS, false, true, median);
        assert_eq!(t, Some(Transition::Ejected { backoff: SEC }));
        assert_eq!(b.state(t0), State::Open);
    }

    #[test]
    fn latency_mode_keeps_endpoints_within_the_factor_or_without_a_median() {
        let b = breaker(exact(Mode::Latency));
        let t0 = Instant::now();
        // 30 ms is exactly 3 x 10 ms: not above the factor.
        for _ in 0..50 {
            let t = b.record(t0, true, 30 * MS, false, true, Some(10 * MS));
            assert_eq!(t, None);
        }
        // Slower, but without a median nothing ejects.
        for _ in 0..50 {
            assert_eq!(b.record(t0, true, 90 * MS, false, true, None), None);
        }
        assert_eq!(b.latency(), Some(60 * MS));
        // Failures do not count toward the mean.
        for _ in 0..50 {
            assert_eq!(b.record(t0, false, SEC, false, true, None), None);
        }
        assert_eq!(b.latency(), Some(60 * MS));
        // But the mean is now 60 ms: the next sample with a median known ejects.
        let t = b.record(t0, true, 60 * MS, false, true, Some(10 * MS));
        assert!(matches!(t, Some(Transition::Ejected { .. })), "{t:?}");
    }

    #[test]
    fn latency_probe_must_be_fast_enough() {
        let b = breaker(exact(Mode::Latency));
        let t0 = Instant::now();
        let median = Some(10 * MS);
        for _ in 0..20 {
            b.record(t0, true, 50 * MS, false, true, median);
        }
        assert_eq!(b.state(t0), State::Open);
        // A successful but slow probe fails and doubles the backoff.
        let t1 = t0 + SEC;
        assert_eq!(b.admit(t1), Admission::Probe);
        let t = b.record(t1, true, 31 * MS, true, true, median);
        assert_eq!(t, Some(Transition::ProbeFailed { backoff: 2 * SEC }));
        // A fast enough one restores; the window (and so the latency estimate) starts over.
        let t2 = t1 + 2 * SEC;
        assert_eq!(b.admit(t2), Admission::Probe);
        let t = b.record(t2, true, 30 * MS, true, true, median);
        assert_eq!(t, Some(Transition::Restored));
        assert_eq!(b.latency(), None);
        // Without a median, any successful probe restores.
        for _ in 0..20 {
            b.record(t2, true, 50 * MS, false, true, median);
        }
        let t3 = t2 + SEC;
        assert_eq!(b.admit(t3), Admission::Probe);
        let t = b.record(t3, true, SEC, true, true, None);
        assert_eq!(t, Some(Transition::Restored));
    }

    #[test]
    fn latency_is_the_windowed_mean_of_successes() {
        let b = breaker(exact(Mode::Consecutive));
        let t0 = Instant::now();
        assert_eq!(b.latency(), None);
        b.record(t0, true, 10 * MS, false, true, None);
        b.record(t0, true, 30 * MS, false, true, None);
        b.record(t0, false, SEC, false, true, None);
        assert_eq!(b.latency(), Some(20 * MS));
        // Aged out by a later outcome.
        b.record(t0 + 11 * SEC, true, 5 * MS, false, true, None);
        assert_eq!(b.latency(), Some(5 * MS));
    }

    #[test]
    fn off_never_ejects() {
        let b = breaker(exact(Mode::Off));
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(fail(&b, t0), None);
        }
        assert_eq!(b.admit(t0), Admission::Closed);
        assert_eq!(b.state(t0), State::Closed);
        assert!(!b.is_ejected(t0));
        assert_eq!(b.latency(), None);
    }

    #[test]
    fn misconfigured_values_do_not_panic() {
        let b = breaker(Settings {
            failures: 0,
            backoff_min: Duration::MAX,
            backoff_max: Duration::MAX,
            jitter: f64::NAN,
            window: Duration::ZERO,
            ..Settings::default()
        });
        let t0 = Instant::now();
        assert_eq!(
            fail(&b, t0),
            Some(Transition::Ejected {
                backoff: Duration::MAX
            })
        );
        assert_eq!(b.admit(t0 + 1000 * SEC), Admission::Ejected);
        assert!(b.is_ejected(t0));
    }

    #[test]
    fn breaker_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Breaker>();
    }

    #[test]
    fn http_failure_classes() {
        let all = FailureClass::default();
        let gw = FailureClass {
            http: HttpFailures::Gateway,
            ..FailureClass::default()
        };
        for code in [500, 501, 502, 503, 504, 599] {
            let s = StatusCode::from_u16(code).unwrap();
            assert!(all.is_failure(s, None), "{code}");
            assert_eq!(
                gw.is_failure(s, None),
                (502..=504).contains(&code),
                "{code}"
            );
        }
        for code in [200, 204, 301, 400, 404, 429] {
            let s = StatusCode::from_u16(code).unwrap();
            assert!(
                !all.is_failure(s, None) && !gw.is_failure(s, None),
                "{code}"
            );
        }
    }

    #[test]
    fn grpc_failure_codes() {
        let c = FailureClass::default();
        for code in [14, 4, 13, 8] {
            assert!(c.is_failure(StatusCode::OK, Some(code)), "{code}");
        }
        for code in [0, 1, 3, 5, 7, 12, 16] {
            assert!(!c.is_failure(StatusCode::OK, Some(code)), "{code}");
        }
        // A 5xx on a gRPC call is a failure whatever the grpc-status.
        assert!(c.is_failure(StatusCode::SERVICE_UNAVAILABLE, Some(0)));
        let only_unavailable = FailureClass {
            grpc: vec![14],
            ..FailureClass::default()
        };
        assert!(!only_unavailable.is_failure(StatusCode::OK, Some(4)));
    }

    #[test]
    fn parse_http_classes() {
        assert_eq!(FailureClass::parse_http("5xx"), Ok(HttpFailures::All5xx));
        assert_eq!(FailureClass::parse_http("5XX"), Ok(HttpFailures::All5xx));
        assert_eq!(
            FailureClass::parse_http(" gateway "),
            Ok(HttpFailures::Gateway)
        );
        let e = FailureClass::parse_http("4xx").unwrap_err();
        assert!(e.contains("4xx") && e.contains("gateway"), "{e}");
    }

    #[test]
    fn parse_grpc_codes() {
        let p = FailureClass::parse_grpc;
        assert_eq!(
            p("unavailable,deadline-exceeded,internal,resource-exhausted"),
            Ok(FailureClass::default().grpc)
        );
        assert_eq!(p("14,4"), Ok(vec![14, 4]));
        assert_eq!(p(" UNAVAILABLE , deadline_exceeded ,0"), Ok(vec![14, 4, 0]));
        assert_eq!(p("14,unavailable"), Ok(vec![14]));
        assert_eq!(p("unauthenticated,16"), Ok(vec![16]));
        assert_eq!(p("none"), Ok(vec![]));
        for (bad, item) in [
            ("14,bogus", "bogus"),
            ("17", "17"),
            ("-1", "-1"),
            ("99999999", "99999999"),
        ] {
            let e = p(bad).unwrap_err();
            assert!(e.contains(item), "{bad}: {e}");
        }
        assert!(p("14,,4").unwrap_err().contains("empty"));
        assert!(p("").is_err());
    }
}
