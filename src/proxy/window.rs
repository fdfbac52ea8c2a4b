//! A destination's recent request outcomes: a sliding window of one-second buckets, each with
//! success and failure counts and a fixed log-scale latency histogram. Recording is one short
//! mutex-protected update with no allocation (the last error is kept as a cheap clone of the
//! error header meshlet already built).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::HeaderValue;
use parking_lot::Mutex;

/// One-second buckets in the window.
pub const SECONDS: usize = 10;

/// Latency classes: class `i` holds latencies in microseconds from `lower(i)` to `lower(i + 1)`,
/// two classes per power of two (about 41 % apart), up to about 67 s.
const CLASSES: usize = 52;

#[derive(Clone, Copy)]
struct Bucket {
    /// The second (since the window's epoch) the counts belong to.
    second: u64,
    ok: u32,
    failed: u32,
    latency: [u32; CLASSES],
}

const EMPTY: Bucket = Bucket {
    second: u64::MAX,
    ok: 0,
    failed: 0,
    latency: [0; CLASSES],
};

struct Inner {
    buckets: [Bucket; SECONDS],
    last_error: Option<(Instant, LastError)>,
}

#[derive(Clone)]
enum LastError {
    /// The text of meshlet's own `meshlet-error` header.
    Meshlet(HeaderValue),
    /// An upstream answer with a failing status.
    Status(u16),
    /// A gRPC answer with a failing grpc-status.
    Grpc(u16),
    /// An upstream answer that broke off or was cut mid-body.
    Broken(u16),
}

/// How one request ended, for the window.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub status: u16,
    pub grpc: Option<u16>,
    /// The request's classification (see `proxy::outcome`) said failure.
    pub failed: bool,
    /// The stream ended early: it broke or was cut.
    pub broken: bool,
}

/// The window; see the module doc.
pub struct Window {
    epoch: Instant,
    inner: Mutex<Inner>,
    /// Whether anything (an HTTP request, a TCP connection) ever went to the destination.
    used: AtomicBool,
}

/// What the window held when it was read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub ok: u64,
    pub failed: u64,
    latency: Vec<u64>,
    pub last_error: Option<String>,
    /// How long ago the last error happened.
    pub last_error_age: Option<Duration>,
}

impl Stats {
    pub fn requests(&self) -> u64 {
        self.ok + self.failed
    }

    /// The share of successful requests, if there were any.
    pub fn success_rate(&self) -> Option<f64> {
        let n = self.requests();
        (n > 0).then(|| self.ok as f64 / n as f64)
    }

    /// The latency at quantile `q` (0..=1): the upper bound of its class, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let n: u64 = self.latency.iter().sum();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, c) in self.latency.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some((upper_us(i) as f64 / 10.0).round() / 100.0);
            }
        }
        None
    }

    /// Adds another window's stats (a service reached on several ports).
    pub fn merge(&mut self, other: &Stats) {
        self.ok += other.ok;
        self.failed += other.failed;
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
        if other.last_error_age.is_some()
            && (self.last_error_age.is_none() || other.last_error_age < self.last_error_age)
        {
            self.last_error = other.last_error.clone();
            self.last_error_age = other.last_error_age;
        }
    }
}

/// The latency class of `us` microseconds.
fn class(us: u64) -> usize {
    let x = us.max(1);
    let log = 63 - x.leading_zeros() as usize;
    let half = if log > 0 {
        ((x >> (log - 1)) & 1) as usize
    } else {
        0
    };
    (2 * log + half).min(CLASSES - 1)
}

/// The (exclusive) upper bound of class `i`, in microseconds.
fn upper_us(i: usize) -> u64 {
    if i == 0 {
        return 2;
    }
    let log = (i / 2) as u32;
    let base = 1u64 << log;
    if i % 2 == 0 {
        base + base / 2
    } else {
        base * 2
    }
}

impl Default for Window {
    fn default() -> Self {
        Window::new()
    }
}

impl Window {
    pub fn new() -> Window {
        Window {
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                buckets: [EMPTY; SECONDS],
                last_error: None,
            }),
            used: AtomicBool::new(false),
        }
    }

    /// Marks the destination as used (opaque TCP connections, which have no outcome here).
    pub fn mark_used(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    pub fn is_used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// Records one answered request. `error`: meshlet's own error text, if it answered itself
    /// (always a failure).
    pub fn record(&self, a: Answer, latency: Duration, error: Option<&HeaderValue>) {
        let now = Instant::now();
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let failed = error.is_some() || a.failed;
        self.mark_used();
        let mut inner = self.inner.lock();
        let b = &mut inner.buckets[(second % SECONDS as u64) as usize];
        if b.second != second {
            *b = EMPTY;
            b.second = second;
        }
        if failed {
            b.failed = b.failed.saturating_add(1);
        } else {
            b.ok = b.ok.saturating_add(1);
        }
        let c = &mut b.latency[class(latency.as_micros() as u64)];
        *c = c.saturating_add(1);
        if failed {
            let e = match error {
                Some(v) => LastError::Meshlet(v.clone()),
                None if a.broken => LastError::Broken(a.status),
                None if a.grpc.is_some_and(|c| c != 0) => LastError::Grpc(a.grpc.unwrap_or(0)),
                None => LastError::Status(a.status),
            };
            inner.last_error = Some((now, e));
        }
    }

    /// The outcomes of the last [`SECONDS`] seconds.
    pub fn stats(&self) -> Stats {
        let now = Instant::now();
        let second = now.saturating_duration_since(self.epoch).as_secs();
        let inner = self.inner.lock();
        let mut s = Stats {
            latency: vec![0; CLASSES],
            ..Stats::default()
        };
        for b in &inner.buckets {
            if b.second == u64::MAX || b.second + (SECONDS as u64) <= second {
                continue;
            }
            s.ok += u64::from(b.ok);
            s.failed += u64::from(b.failed);
            for (a, c) in s.latency.iter_mut().zip(&b.latency) {
                *a += u64::from(*c);
            }
        }
        if let Some((at, e)) = &inner.last_error {
            s.last_error_age = Some(now.saturating_duration_since(*at));
            s.last_error = Some(match e {
                LastError::Meshlet(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
                LastError::Status(code) => format!("HTTP {code} from the upstream"),
                LastError::Grpc(code) => format!("grpc-status {code} from the upstream"),
                LastError::Broken(code) => {
                    format!("an HTTP {code} answer from the upstream broke off before its end")
                }
            });
        }
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn classes_cover_latencies_in_order() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            2,
            3,
            5,
            100,
            150,
            1000,
            1500,
            10_000,
            1_000_000,
            u64::MAX,
        ] {
            let c = class(us);
            assert!(c >= last, "{us}");
            if us > 0 && us < 60_000_000 {
                assert!(upper_us(c) > us, "{us}: class {c} ends at {}", upper_us(c));
            }
            last = c;
        }
    }

    pub(crate) fn status(status: u16) -> Answer {
        Answer {
            status,
            grpc: None,
            failed: status >= 500,
            broken: false,
        }
    }

    #[test]
    fn counts_rates_and_quantiles() {
        let w = Window::new();
        for _ in 0..98 {
            w.record(status(200), Duration::from_millis(2), None);
        }
        w.record(status(503), Duration::from_millis(400), None);
        let err = HeaderValue::from_static("no endpoints for a.b");
        w.record(status(503), Duration::from_millis(400), Some(&err));
        let s = w.stats();
        assert_eq!((s.ok, s.failed), (98, 2));
        assert_eq!(s.success_rate(), Some(0.98));
        let p50 = s.quantile_ms(0.5).unwrap();
        assert!((2.0..=3.0).contains(&p50), "{p50}");
        let p99 = s.quantile_ms(0.99).unwrap();
        assert!((400.0..=600.0).contains(&p99), "{p99}");
        assert_eq!(s.last_error.as_deref(), Some("no endpoints for a.b"));
        assert_eq!(Stats::default().quantile_ms(0.5), None);
    }

    #[test]
    fn last_error_says_what_failed() {
        let w = Window::new();
        let grpc = Answer {
            grpc: Some(14),
            failed: true,
            ..status(200)
        };
        w.record(grpc, Duration::from_millis(1), None);
        let s = w.stats();
        assert_eq!((s.ok, s.failed), (0, 1));
        assert_eq!(
            s.last_error.as_deref(),
            Some("grpc-status 14 from the upstream")
        );
        let broken = Answer {
            failed: true,
            broken: true,
            ..status(200)
        };
        w.record(broken, Duration::from_millis(1), None);
        assert_eq!(
            w.stats().last_error.as_deref(),
            Some("an HTTP 200 answer from the upstream broke off before its end")
        );
    }
}
