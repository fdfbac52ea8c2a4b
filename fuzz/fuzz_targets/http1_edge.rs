//! HTTP/1 request heads at the edge, end to end: a meshlet proxy runs in this process (an
//! explicit upstream listener in front of a static service whose one endpoint is a small hyper
//! backend answering 200), and each input is written to it on a new connection, which is then
//! half-closed (after the answer's first byte, or 5 ms without one: see `exchange`); the answer
//! is read for up to 100 ms.
//!
//! Invariants checked besides "no panic":
//! - an answer that starts like an HTTP/1 response has a well-formed status line and headers
//!   (both the proxy and the backend are hyper servers);
//! - every 100 inputs (and at the first), the proxy still answers a well-formed GET with 200
//!   within 1 s: a connection, task or breaker state left behind by a bad client must not hurt
//!   the next good one.
#![no_main]

use std::convert::Infallible;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use libfuzzer_sys::fuzz_target;
use meshlet::app::App;
use meshlet::config::Config;

/// The answer to one input is read for this long at most.
const READ_DEADLINE: Duration = Duration::from_millis(100);
/// The client half-closes after the first byte of an answer, or after this without one.
const HALF_CLOSE_AFTER: Duration = Duration::from_millis(5);
/// The well-formed GET is checked every this many inputs.
const CHECK_EVERY: u64 = 100;
/// ... and must be answered 200 within this.
const CHECK_DEADLINE: Duration = Duration::from_secs(1);

struct Proxy {
    upstream: SocketAddr,
    admin: SocketAddr,
}

/// Starts (once per process) the backend and the proxy on a runtime thread of their own.
fn proxy() -> &'static Proxy {
    static PROXY: OnceLock<Proxy> = OnceLock::new();
    PROXY.get_or_init(|| {
        // As in the meshlet binary: Rust's own `main` ignores SIGPIPE, libFuzzer's does not, and
        // a write to a connection the peer has closed must be an error, not the end.
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        match private_loopback() {
            Ok(()) => {}
            Err(e) => eprintln!(
                "http1_edge: running on the host's loopback (a private network namespace needs \
                 root: {e}); the connections' TIME_WAIT states hold its ephemeral ports"
            ),
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("meshlet".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind the backend");
                    let backend_addr = backend.local_addr().expect("backend address");
                    tokio::spawn(serve_backend(backend));
                    let yaml = format!(
                        "admin:\n  listen: 127.0.0.1:0\n\
                         upstreams:\n  - listen: 127.0.0.1:0\n    service: fuzz.default\n\
                         discovery:\n  static:\n    - service: fuzz.default\n      endpoints: [\"{backend_addr}\"]\n\
                         shutdown_grace: 1s\n"
                    );
                    let config = Config::parse("fuzz.yaml", &yaml).expect("valid config");
                    let app = App::bind(config).expect("bind the proxy");
                    let addrs = app.addresses().clone();
                    tx.send((addrs.upstreams[0], addrs.admin)).expect("send");
                    app.run().await;
                });
            })
            .expect("spawn the proxy thread");
        let (upstream, admin) = rx.recv().expect("the proxy started");
        wait_ready(admin);
        Proxy { upstream, admin }
    })
}

/// Moves this thread (and the threads it starts later: the proxy's) into a new network
/// namespace with its loopback up. Each input is a new connection, half-closed by this side,
/// which therefore holds it in TIME_WAIT for a minute: thousands a second would otherwise use up
/// the host's ephemeral ports, which other programs on the machine need.
fn private_loopback() -> Result<(), String> {
    let os_error = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: plain system calls on values owned here; `ifreq` is plain old data.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(os_error("unshare(CLONE_NEWNET)"));
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(os_error("socket"));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo") {
            *d = *s as libc::c_char;
        }
        let ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 && {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) == 0
        };
        let e = os_error("bringing lo up");
        libc::close(fd);
        if !ok {
            return Err(e);
        }
    }
    Ok(())
}

async fn serve_backend(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = exchange(
            admin,
            b"GET /ready HTTP/1.1\r\nHost: meshlet\r\nConnection: close\r\n\r\n",
            None,
            Duration::from_secs(1),
        );
        if answer.starts_with(b"HTTP/1.1 200") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy was not ready within 10s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Connects, writes `input`, waits up to `half_close_after` for the first byte of an answer,
/// half-closes (with `None`: never), and reads until EOF, an error or `deadline`.
///
/// Why not half-close at once: meshlet's HTTP/1 server (hyper, without `half_close`) drops a
/// request in flight when the client half-closes, so the answer would always be empty and the
/// request path after the head untested. Waiting a few milliseconds lets a complete request be
/// answered; an incomplete one still ends at once at the half-close.
fn exchange(
    addr: SocketAddr,
    input: &[u8],
    half_close_after: Option<Duration>,
    deadline: Duration,
) -> Vec<u8> {
    let end = Instant::now() + deadline;
    let Ok(mut s) = TcpStream::connect_timeout(&addr, deadline) else {
        return Vec::new();
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_write_timeout(Some(deadline));
    // The proxy may answer and close before reading everything: a write error is fine.
    let written = s.write_all(input).is_ok();
    let mut half_close_at = half_close_after
        .filter(|_| written)
        .map(|d| Instant::now() + d);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let now = Instant::now();
        if let Some(at) = half_close_at {
            if now >= at || !answer.is_empty() {
                let _ = s.shutdown(Shutdown::Write);
                half_close_at = None;
            }
        }
        let until = half_close_at.map_or(end, |at| at.min(end));
        let left = until.saturating_duration_since(now);
        if left.is_zero() {
            if now >= end {
                break;
            }
            continue;
        }
        if s.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        if answer.len() > 1 << 20 {
            break;
        }
    }
    answer
}

/// The first response head in `answer`, if it looks like HTTP/1, must parse.
fn check_answer(input: &[u8], answer: &[u8]) {
    if !answer.starts_with(b"HTTP/1.") {
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut rsp = httparse::Response::new(&mut headers);
    if let Err(e) = rsp.parse(answer) {
        panic!(
            "malformed response head ({e}) to {:?}:\n{:?}",
            String::from_utf8_lossy(input),
            String::from_utf8_lossy(&answer[..answer.len().min(2048)])
        );
    }
}

fn check_alive(p: &Proxy) {
    let start = Instant::now();
    let answer = exchange(
        p.upstream,
        b"GET /alive HTTP/1.1\r\nHost: fuzz.default\r\nConnection: close\r\n\r\n",
        None,
        CHECK_DEADLINE,
    );
    if !answer.starts_with(b"HTTP/1.1 200") {
        let took = start.elapsed();
        // What the proxy says about its endpoint, and how many descriptors this process holds.
        let endpoints = exchange(
            p.admin,
            b"GET /endpoints HTTP/1.1\r\nHost: meshlet\r\nConnection: close\r\n\r\n",
            None,
            CHECK_DEADLINE,
        );
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        panic!(
            "the proxy no longer answers a well-formed GET with 200 within {CHECK_DEADLINE:?} \
             (after {took:?}): {:?}\nGET /endpoints: {:?}\nopen file descriptors: {fds}",
            String::from_utf8_lossy(&answer[..answer.len().min(2048)]),
            String::from_utf8_lossy(&endpoints[..endpoints.len().min(4096)]),
        );
    }
}

fuzz_target!(|data: &[u8]| {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let p = proxy();
    if RUNS.fetch_add(1, Ordering::Relaxed) % CHECK_EVERY == 0 {
        check_alive(p);
    }
    let answer = exchange(p.upstream, data, Some(HALF_CLOSE_AFTER), READ_DEADLINE);
    check_answer(data, &answer);
});
