//! Protocol detection on a connection's first bytes (`meshlet::proxy::detect`).
//!
//! Input: the bytes a client sends first. The first byte (when there are two or more) picks
//! how the bytes arrive in `detect` (read sizes), and one split point for the prefix check.
//!
//! Invariants checked besides "no panic":
//! - a decision never changes as more bytes arrive: `classify_prefix(b)` = `Some(p)` implies
//!   `classify_prefix(b + more)` = `Some(p)` (checked at every prefix of short inputs and at a
//!   few split points of long ones);
//! - `detect` over a reader of these bytes, however they are split into reads, returns a prefix
//!   of the input with the decision `classify_prefix` makes on it, or TCP at the end of the
//!   input when nothing was decided (the reader ends like a half-closed client).
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshlet::proxy::detect::{Protocol, classify_prefix, detect};
use tokio::io::{AsyncRead, ReadBuf};

/// Tolerate the one known way today's `classify` changes its mind: it calls a request line
/// opaque TCP on a prefix (a control byte in it, or 8 KiB without CRLF) and HTTP/1 once the
/// CRLF arrives (`GET /\x01 HTTP/1.1\r\n`: TCP at `GET /\x01`, HTTP/1 in full; a request line
/// of exactly 8 KiB whose CRLF is split between two reads). The inputs are in
/// fuzz/regressions/detect/ (replay them with `MESHLET_FUZZ_DETECT_STRICT=1`, which turns this
/// tolerance off). Set this to false once detect.rs no longer does it; every other change of
/// decision fails the target.
const TOLERATE_KNOWN_TCP_THEN_HTTP1: bool = false;

fn tolerate_known() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    TOLERATE_KNOWN_TCP_THEN_HTTP1
        && !*STRICT.get_or_init(|| std::env::var_os("MESHLET_FUZZ_DETECT_STRICT").is_some())
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("tokio runtime")
    })
}

/// Hands out `data` at most `chunk` bytes per read, then EOF.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.data.len().min(self.chunk).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// Checks that deciding on `prefix` and on `full` (which starts with `prefix`) agree.
fn check_monotonic(prefix: &[u8], full: &[u8]) {
    let Some(early) = classify_prefix(prefix) else {
        return;
    };
    let late = classify_prefix(full);
    if late == Some(early) {
        return;
    }
    if tolerate_known() && early == Protocol::Tcp && late == Some(Protocol::Http1) {
        static SAID: AtomicBool = AtomicBool::new(false);
        if !SAID.swap(true, Ordering::Relaxed) {
            eprintln!(
                "detect: known issue tolerated (TCP on a prefix, HTTP/1 in full): {:?} then {:?}",
                String::from_utf8_lossy(&prefix[..prefix.len().min(64)]),
                String::from_utf8_lossy(&full[..full.len().min(64)]),
            );
        }
        return;
    }
    panic!(
        "detection changed its mind: {early:?} on the first {} bytes, {late:?} on all {}\n\
         prefix: {:?}\nfull: {:?}",
        prefix.len(),
        full.len(),
        String::from_utf8_lossy(prefix),
        String::from_utf8_lossy(full),
    );
}

fuzz_target!(|data: &[u8]| {
    let full = classify_prefix(data);

    // Every prefix of short inputs; a few split points of long ones (classify is linear).
    if data.len() <= 256 {
        for k in 0..data.len() {
            check_monotonic(&data[..k], data);
        }
    } else {
        let pick = usize::from(data[0]);
        for k in [
            pick,
            data.len() / 2,
            data.len() - 1,
            data.len().saturating_sub(pick + 1),
        ] {
            check_monotonic(&data[..k.min(data.len())], data);
        }
    }

    // detect() over the bytes in reads of 1..=256 bytes (or all at once).
    let chunk = match data.first() {
        Some(&b) if data.len() > 1 && b != 0 => usize::from(b),
        _ => usize::MAX,
    };
    let mut reader = Chunked { data, chunk };
    let (p, buf) = runtime()
        .block_on(detect(&mut reader, Duration::from_millis(10)))
        .expect("reading from a slice cannot fail");
    assert!(
        data.starts_with(&buf),
        "detect returned bytes that are not a prefix of the input"
    );
    match classify_prefix(&buf) {
        Some(q) => assert_eq!(
            p, q,
            "detect disagrees with classify_prefix on its own bytes"
        ),
        None => {
            assert_eq!(p, Protocol::Tcp, "undecided at EOF must be TCP");
            assert_eq!(
                buf.len(),
                data.len(),
                "undecided before the end of the input"
            );
        }
    }
    // What detect decided on its prefix is what the whole input decides.
    check_monotonic(&buf, data);
    if buf.len() < data.len() {
        assert!(
            full.is_some(),
            "decided on a prefix, undecided on the whole input"
        );
    }
});
