//! Inbound admission limits: a cap on concurrent requests ([`ConcurrencyLimit`]) and a token
//! bucket on their rate ([`RateLimit`]). Both are lock-free (one atomic each) and answer at
//! once, so that a request over the limit can be refused cheaply instead of queued: queueing
//! in the sidecar only hides the overload from the callers' own timeouts and retry budgets.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Inbound concurrency limit: at most `max` requests at once. Cloning shares the limit.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit {
    inner: Arc<ConcurrencyInner>,
}

#[derive(Debug)]
struct ConcurrencyInner {
    max: usize,
    in_flight: AtomicUsize,
}

/// One admitted request; the slot is released when this is dropped (it holds the limit, so it
/// can move into the task or the response body that outlives the handler).
#[derive(Debug)]
#[must_use = "the request counts against the limit only while the permit is held"]
pub struct ConcurrencyPermit {
    inner: Arc<ConcurrencyInner>,
}

impl ConcurrencyLimit {
    /// A limit of `max` concurrent requests. 0 admits none (leave the limit out to have none).
    pub fn new(max: usize) -> ConcurrencyLimit {
        ConcurrencyLimit {
            inner: Arc::new(ConcurrencyInner {
                max,
                in_flight: AtomicUsize::new(0),
            }),
        }
    }

    /// A permit if fewer than `max` requests are in flight, else `None` (refuse the request).
    pub fn try_acquire(&self) -> Option<ConcurrencyPermit> {
        let max = self.inner.max;
        self.inner
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConcurrencyPermit {
            inner: Arc::clone(&self.inner),
        })
    }

    /// Requests holding a permit now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.inner.max
    }
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        self.inner.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Inbound token-bucket rate limit: `rate` requests per second on average, bursts of up to
/// `burst` at once. Cloning is not offered: share it in an `Arc`.
///
/// Implemented as GCRA (the "virtual scheduling" form of a token bucket): one atomic holds the
/// theoretical arrival time of the next request, in nanoseconds since the first call, so that
/// admitting a request is one compare-and-swap with exact integer arithmetic, and no refill
/// ever runs in the background.
#[derive(Debug)]
pub struct RateLimit {
    /// Nanoseconds per token; `None` when the rate admits nothing.
    interval: Option<u64>,
    /// How far ahead of now the arrival time may run: `burst` intervals.
    tolerance: u128,
    origin: OnceLock<Instant>,
    /// The theoretical arrival time, in nanoseconds since `origin`.
    tat: AtomicU64,
}

impl RateLimit {
    /// A bucket refilled at `rate` tokens per second that holds up to `burst` (and starts
    /// full). A `burst` of 0 is taken as 1: a bucket that can hold no token admits nothing at
    /// any rate. A rate that is not a positive number admits nothing (the configuration should
    /// reject it); an infinite one, or one above a billion per second, admits everything.
    pub fn new(rate: f64, burst: u32) -> RateLimit {
        let interval = (rate > 0.0).then(|| {
            // Saturating float-to-int cast: a tiny rate gives an interval too long to reach.
            (1e9 / rate).round() as u64
        });
        let burst = u128::from(burst.max(1));
        RateLimit {
            interval,
            tolerance: interval.map_or(0, |i| u128::from(i) * burst),
            origin: OnceLock::new(),
            tat: AtomicU64::new(0),
        }
    }

    /// Takes a token if there is one: `false` means the request is over the rate.
    pub fn try_acquire(&self, now: Instant) -> bool {
        let Some(interval) = self.interval else {
            return false;
        };
        let origin = *self.origin.get_or_init(|| now);
        // A `now` older than the first call (a racing caller) counts as the first call.
        let now = u128::from(
            u64::try_from(now.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX),
        );
        self.tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                let next = u128::from(tat).max(now) + u128::from(interval);
                if next - now > self.tolerance {
                    return None;
                }
                // An arrival time past u64 nanoseconds (584 years) is never reached: refuse.
                u64::try_from(next).ok()
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn concurrency_permits_release_on_drop() {
        let limit = ConcurrencyLimit::new(2);
        let a = limit.try_acquire().expect("first");
        let b = limit.try_acquire().expect("second");
        assert_eq!(limit.in_flight(), 2);
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.in_flight(), 2);
        drop(a);
        assert_eq!(limit.in_flight(), 1);
        let c = limit.clone().try_acquire().expect("after release");
        assert!(limit.try_acquire().is_none());
        drop((b, c));
        assert_eq!(limit.in_flight(), 0);
        assert_eq!(limit.max(), 2);
        assert!(ConcurrencyLimit::new(0).try_acquire().is_none());
    }

    #[test]
    fn concurrency_permit_outlives_the_limit_and_moves_across_threads() {
        fn send_static<T: Send + 'static>(_: &T) {}
        let limit = ConcurrencyLimit::new(1);
        let p = limit.try_acquire().expect("permit");
        send_static(&p);
        let l2 = limit.clone();
        drop(limit);
        std::thread::spawn(move || drop(p)).join().unwrap();
        assert_eq!(l2.in_flight(), 0);

        let limit = ConcurrencyLimit::new(8);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let limit = limit.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let p = limit.try_acquire();
                        assert!(limit.in_flight() <= 8);
                        drop(p);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(limit.in_flight(), 0);
    }

    #[test]
    fn rate_limit_bursts_then_refills() {
        let t0 = Instant::now();
        let r = RateLimit::new(10.0, 5);
        assert_eq!((0..20).filter(|_| r.try_acquire(t0)).count(), 5);
        // One token every 100 ms.
        let t = t0 + Duration::from_millis(99);
        assert!(!r.try_acquire(t));
        let t = t0 + Duration::from_millis(100);
        assert!(r.try_acquire(t));
        assert!(!r.try_acquire(t));
        let t = t0 + Duration::from_millis(350);
        assert_eq!((0..20).filter(|_| r.try_acquire(t)).count(), 2);
        // A long pause refills only up to the burst.
        let t = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| r.try_acquire(t)).count(), 5);
        // A stale `now` does not get tokens back.
        assert!(!r.try_acquire(t0));
    }

    #[test]
    fn rate_limit_steady_rate() {
        let t0 = Instant::now();
        let r = RateLimit::new(2.0, 1);
        let admitted = (0..100)
            .filter(|i| r.try_acquire(t0 + Duration::from_millis(100 * i)))
            .count();
        // 10 s at 2/s, plus the token the bucket started with.
        assert_eq!(admitted, 20);
    }

    #[test]
    fn rate_limit_odd_parameters() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN] {
            assert!(!RateLimit::new(rate, 10).try_acquire(t0));
        }
        let r = RateLimit::new(1.0, 0);
        assert!(r.try_acquire(t0));
        assert!(!r.try_acquire(t0));
        let r = RateLimit::new(f64::INFINITY, 1);
        assert!((0..1000).all(|_| r.try_acquire(t0)));
        let r = RateLimit::new(1e-30, 3);
        assert!(r.try_acquire(t0));
        assert!(!r.try_acquire(t0 + Duration::from_secs(3600)));
    }
}
