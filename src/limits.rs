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

// ===== connection caps =====

/// What one open client connection is budgeted to cost, user-space and kernel together (see
/// README, "Memory"): an idle HTTP/2 connection, the costliest kind, measured 34 KiB in a
/// memory cgroup with 1,706 held; parked HTTP/1.1 connections cost far less, but the cap must
/// hold whatever the mix and with every connection busy.
pub const CONNECTION_BUDGET: u64 = 32 * 1024;
/// Memory kept out of the connection budget: the idle proxy, its discovery state and the
/// working memory of requests in flight.
pub const MEMORY_RESERVE: u64 = 24 * 1024 * 1024;
/// Connections (all listeners together) when no memory limit is known.
pub const UNLIMITED_TOTAL: u64 = 32_768;
/// No listener's default cap is below this, however small the memory limit.
pub const MIN_PER_LISTENER: u64 = 64;
/// File descriptors kept out of the connection budget (listeners, the admin server, the
/// Kubernetes watches, logs).
const FD_RESERVE: u64 = 256;

/// The default `max_connections` of each of `listeners` proxy listeners: the connections that
/// fit in the memory limit after [`MEMORY_RESERVE`], at [`CONNECTION_BUDGET`] each
/// ([`UNLIMITED_TOTAL`] without a limit), and at most half the file descriptors left after a
/// reserve (a proxied connection may hold two: the client's and the endpoint's), shared evenly
/// by the listeners; at least [`MIN_PER_LISTENER`].
pub fn default_max_connections(
    memory_limit: Option<u64>,
    fd_limit: Option<u64>,
    listeners: usize,
) -> u32 {
    let by_memory = memory_limit.map_or(UNLIMITED_TOTAL, |m| {
        m.saturating_sub(MEMORY_RESERVE) / CONNECTION_BUDGET
    });
    let by_fds = fd_limit.map_or(u64::MAX, |f| f.saturating_sub(FD_RESERVE) / 2);
    let per = by_memory.min(by_fds) / listeners.max(1) as u64;
    per.max(MIN_PER_LISTENER).min(u32::MAX as u64) as u32
}

/// This process's soft limit on open files (`RLIMIT_NOFILE`), if it has one.
pub fn fd_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0
        || r.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 here, not on every target
    Some(r.rlim_cur as u64)
}

/// The memory limit this process runs under: the smallest limit of its cgroup and the cgroups
/// above it, cgroup v2 (`memory.max`) or v1 (`memory.limit_in_bytes`). `None` without one.
pub fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    memory_limit_from(&own, |path| std::fs::read_to_string(path).ok())
}

/// [`cgroup_memory_limit`] over `/proc/self/cgroup`'s text and a file reader. Every directory
/// from the process's own cgroup up to the hierarchy's root is read, so that the limit is found
/// both with a cgroup namespace (the own cgroup is the root) and without one (the path named
/// in `/proc/self/cgroup` does not exist in the container's view, but the root is its cgroup).
fn memory_limit_from(proc_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    let mut limit: Option<u64> = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (root, file) = if controllers.is_empty() {
            ("/sys/fs/cgroup", "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
        } else {
            continue;
        };
        let mut dir = path.trim_end_matches('/').to_string();
        loop {
            if let Some(v) = read(&format!("{root}{dir}/{file}")) {
                // "max" (v2) or a huge number (v1's "no limit", a page-rounded i64::MAX).
                if let Ok(n) = v.trim().parse::<u64>() {
                    if n < 1 << 60 {
                        limit = Some(limit.map_or(n, |l| l.min(n)));
                    }
                }
            }
            match dir.rfind('/') {
                Some(i) => dir.truncate(i),
                None => break,
            }
        }
    }
    limit
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
    #[test]
    fn default_connection_caps() {
        let mib = 1024 * 1024;
        // 64 MiB: what the reserve leaves, at the budget each, shared by two listeners.
        let total = (64 * mib - MEMORY_RESERVE) / CONNECTION_BUDGET;
        assert_eq!(
            default_max_connections(Some(64 * mib), None, 2) as u64,
            total / 2
        );
        assert_eq!(
            default_max_connections(Some(64 * mib), None, 1) as u64,
            total
        );
        // No memory limit: the fixed total.
        assert_eq!(
            default_max_connections(None, None, 2) as u64,
            UNLIMITED_TOTAL / 2
        );
        // File descriptors bound it too: two per connection after the reserve.
        assert_eq!(
            default_max_connections(None, Some(1024), 1),
            (1024 - 256) / 2
        );
        // A limit smaller than the reserve still admits some.
        assert_eq!(
            default_max_connections(Some(8 * mib), None, 3) as u64,
            MIN_PER_LISTENER
        );
        assert_eq!(
            default_max_connections(Some(64 * mib), None, 0),
            default_max_connections(Some(64 * mib), None, 1)
        );
    }

    #[test]
    fn cgroup_memory_limits() {
        use std::collections::HashMap;
        let files = |entries: &[(&str, &str)]| {
            let m: HashMap<String, String> = entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move |p: &str| m.get(p).cloned()
        };
        // v2 with a cgroup namespace: the own cgroup is the root.
        let f = files(&[("/sys/fs/cgroup/memory.max", "67108864\n")]);
        assert_eq!(memory_limit_from("0::/\n", &f), Some(64 << 20));
        // v2 without one: the own path and its parents; the smallest limit wins.
        let f = files(&[
            ("/sys/fs/cgroup/kubepods/pod1/c1/memory.max", "max\n"),
            ("/sys/fs/cgroup/kubepods/pod1/memory.max", "134217728\n"),
            ("/sys/fs/cgroup/memory.max", "max\n"),
        ]);
        assert_eq!(
            memory_limit_from("0::/kubepods/pod1/c1\n", &f),
            Some(128 << 20)
        );
        // v1 (hybrid hierarchy), the limit on the own cgroup; "no limit" is a huge number.
        let f = files(&[
            (
                "/sys/fs/cgroup/memory/a/b/memory.limit_in_bytes",
                "67108864\n",
            ),
            (
                "/sys/fs/cgroup/memory/a/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
        ]);
        let text = "12:cpu,cpuacct:/a/b\n4:memory:/a/b\n0::/\n";
        assert_eq!(memory_limit_from(text, &f), Some(64 << 20));
        // v1 in a container without a cgroup namespace: the named path is not there, the
        // root of the mount is the container's cgroup.
        let f = files(&[("/sys/fs/cgroup/memory/memory.limit_in_bytes", "33554432")]);
        assert_eq!(
            memory_limit_from("4:memory:/docker/abc\n", &f),
            Some(32 << 20)
        );
        // No limit anywhere, or nothing readable.
        let f = files(&[("/sys/fs/cgroup/memory.max", "max")]);
        assert_eq!(memory_limit_from("0::/\n", &f), None);
        assert_eq!(memory_limit_from("", &f), None);
    }
}
