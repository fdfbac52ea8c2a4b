//! The outcome of a request, classified once, when its response ends.
//!
//! What became of a request is known only at the end of its response: a gRPC server reports a
//! failure in trailers after a `200` head, a backend may die mid-body, meshlet may cut a stream
//! at its deadline, and the client may go away. [`Seen`] follows a response to its end and
//! [`Seen::class`] turns that into one [`Class`]; the same rule feeds two sinks:
//! - the endpoint, through an [`Attempt`]: its circuit breaker (and, for a breaker probe whose
//!   client went away, the release of the probe);
//! - the destination, through a [`RequestEnd`]: `meshlet_requests_total` and the health window
//!   behind `/health` and readiness.
//!
//! A failure that is not the endpoint's (the client cancelled, the client's own body broke) is
//! [`Class::Cancelled`] and counts against nobody.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use hyper::body::Frame;

use super::edge::Exchange;
use crate::balance::{Endpoint, InFlight};
use crate::breaker::FailureClass;
use crate::proxy::{Destination, Resilience};

/// How a response stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Read to its end (trailers included).
    Complete,
    /// The endpoint's side broke: a connect or send error, a reset or EOF mid-body.
    Failed,
    /// meshlet cut it short: the request's deadline or the stream idle timeout.
    Cut,
    /// Dropped before its end by the client's side (the client went away or its own request
    /// body failed).
    Cancelled,
}

impl End {
    /// A response dropped before its end: cut by meshlet, else cancelled by its client.
    pub fn dropped(ex: &Exchange) -> End {
        if ex.was_cut() {
            End::Cut
        } else {
            End::Cancelled
        }
    }
}

/// What a request's outcome says about the endpoint and the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Success,
    /// The endpoint's (or the destination's) failure.
    Failure,
    /// Not the endpoint's doing; counted against nobody.
    Cancelled,
}

impl Class {
    /// The `classification` label of `meshlet_requests_total`.
    pub fn label(self) -> &'static str {
        match self {
            Class::Success => "success",
            Class::Failure => "failure",
            Class::Cancelled => "cancelled",
        }
    }
}

/// What has been seen of a response so far: its status and its grpc-status (from the head of a
/// trailers-only answer, or from trailers).
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub status: StatusCode,
    pub grpc: Option<u16>,
}

impl Seen {
    pub fn head(status: StatusCode, headers: &HeaderMap) -> Seen {
        Seen {
            status,
            grpc: crate::proxy::http::retry::grpc_status(headers),
        }
    }

    /// Notes a body frame: trailers may carry the grpc-status.
    pub fn frame(&mut self, f: &Frame<Bytes>) {
        if let Some(code) = f
            .trailers_ref()
            .and_then(crate::proxy::http::retry::grpc_status)
        {
            self.grpc = Some(code);
        }
    }

    /// The one classification: a stream that broke or was cut is a failure whatever its head
    /// said; a complete one is judged by its status and grpc-status (`failures`).
    pub fn class(&self, failures: &FailureClass, end: End) -> Class {
        match end {
            End::Cancelled => Class::Cancelled,
            End::Failed | End::Cut => Class::Failure,
            End::Complete if failures.is_failure(self.status, self.grpc) => Class::Failure,
            End::Complete => Class::Success,
        }
    }
}

/// One attempt of a request on one endpoint, from the pick to the end of its response. It
/// records the attempt's outcome on the endpoint's breaker exactly once: explicitly (an attempt
/// judged at its head and retried, a connect failure), at the end of the response stream it
/// rides along with (see `Body::observed`), or when dropped unfinished (a deadline cut it: the
/// endpoint's failure; the client went away: nobody's, and a breaker probe is released).
pub struct Attempt {
    target: Arc<Destination>,
    resilience: Arc<Resilience>,
    exchange: Arc<Exchange>,
    pub ep: Arc<Endpoint>,
    probe: bool,
    /// The load the attempt puts on the endpoint, and its latency sample for peak-EWMA.
    inflight: Option<InFlight>,
    started: Instant,
    /// Time to the response head: the latency the breaker judges (a stream's length says
    /// nothing about the endpoint's speed).
    latency: Option<Duration>,
    seen: Option<Seen>,
    done: bool,
}

impl Attempt {
    pub fn new(
        target: &Arc<Destination>,
        resilience: &Arc<Resilience>,
        exchange: &Arc<Exchange>,
        ep: Arc<Endpoint>,
        probe: bool,
    ) -> Attempt {
        Attempt {
            target: target.clone(),
            resilience: resilience.clone(),
            exchange: exchange.clone(),
            inflight: Some(ep.start()),
            ep,
            probe,
            started: Instant::now(),
            latency: None,
            seen: None,
            done: false,
        }
    }

    /// The response head arrived; returns what it says on its own (a failure may yet come in
    /// trailers or mid-body).
    /// `connect`: time spent opening a new connection, left out of the latency sample.
    pub fn head(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        connect: Option<Duration>,
    ) -> Class {
        self.latency = Some(self.started.elapsed());
        if let Some(mut inflight) = self.inflight.take() {
            if let Some(d) = connect {
                inflight.discount(d);
            }
            inflight.complete();
        }
        let seen = Seen::head(status, headers);
        self.seen = Some(seen);
        seen.class(&self.resilience.failures, End::Complete)
    }

    pub fn exchange(&self) -> &Exchange {
        &self.exchange
    }

    pub fn frame(&mut self, f: &Frame<Bytes>) {
        if let Some(s) = &mut self.seen {
            s.frame(f);
        }
    }

    /// No connection could be made: a failure, with no latency sample.
    pub fn not_connected(&mut self) {
        if let Some(inflight) = self.inflight.take() {
            inflight.forget();
        }
        self.end(End::Failed);
    }

    /// Records the attempt's outcome (once).
    pub fn end(&mut self, end: End) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let class = match self.seen {
            Some(s) => s.class(&self.resilience.failures, end),
            None if end == End::Complete => Class::Success,
            None if end == End::Cancelled => Class::Cancelled,
            None => Class::Failure,
        };
        // Without a head: a cut or a failure mid-exchange (the endpoint took at least that long)
        // is a latency sample; a cancellation is none (nor a connect failure, see
        // `not_connected`).
        if let Some(inflight) = self.inflight.take() {
            if end == End::Cancelled {
                inflight.forget();
            } else {
                inflight.complete();
            }
        }
        let latency = self.latency.unwrap_or_else(|| self.started.elapsed());
        self.target
            .record_endpoint(&self.ep, class, latency, self.probe);
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done {
            self.end(End::dropped(&self.exchange));
        }
    }
}

/// One client request, from its head to the end of the response the client got: records it
/// once in `meshlet_requests_total` (status and classification) and, unless it was refused at
/// the edge or broken by its client, in the destination's health window.
pub struct RequestEnd {
    target: Arc<Destination>,
    /// The destination's settings the request ran with (none when meshlet answered before
    /// reading them: then the default failure class applies).
    resilience: Option<Arc<Resilience>>,
    exchange: Arc<Exchange>,
    seen: Seen,
    /// meshlet's own `meshlet-error` reason, when meshlet answered.
    error: Option<HeaderValue>,
    /// Refused at the edge (a 4xx of meshlet's): says nothing about the destination.
    refused: bool,
    latency: Duration,
    done: bool,
}

impl RequestEnd {
    pub fn new(
        target: Arc<Destination>,
        resilience: Option<Arc<Resilience>>,
        exchange: Arc<Exchange>,
        seen: Seen,
        error: Option<HeaderValue>,
        latency: Duration,
    ) -> RequestEnd {
        RequestEnd {
            refused: seen.status.is_client_error() && error.is_some(),
            target,
            resilience,
            exchange,
            seen,
            error,
            latency,
            done: false,
        }
    }

    pub fn frame(&mut self, f: &Frame<Bytes>) {
        self.seen.frame(f);
    }

    /// The destination's counters of responses cut short.
    pub fn cut_counters(&self) -> &super::edge::CutCounters {
        &self.target.cut_counters
    }

    pub fn end(&mut self, end: End) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        static DEFAULT: std::sync::LazyLock<FailureClass> =
            std::sync::LazyLock::new(FailureClass::default);
        let failures = self.resilience.as_ref().map_or(&*DEFAULT, |r| &r.failures);
        let class = self.seen.class(failures, end);
        // Refused at the edge or broken by its client: says nothing about the destination.
        let judged = !(self.refused || self.exchange.client_failed() || class == Class::Cancelled);
        let answer = crate::proxy::window::Answer {
            status: self.seen.status.as_u16(),
            grpc: self.seen.grpc,
            failed: class == Class::Failure,
            broken: matches!(end, End::Failed | End::Cut),
        };
        let window = judged.then_some((answer, self.latency, self.error.as_ref()));
        self.target.record_request(self.seen.status, class, window);
    }
}

impl Drop for RequestEnd {
    fn drop(&mut self) {
        if !self.done {
            self.end(End::dropped(&self.exchange));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trailers(code: &'static str) -> Frame<Bytes> {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static(code));
        Frame::trailers(h)
    }

    #[test]
    fn one_rule_from_head_to_end() {
        let f = FailureClass::default();
        let ok = Seen::head(StatusCode::OK, &HeaderMap::new());
        assert_eq!(ok.class(&f, End::Complete), Class::Success);
        // A 200 that broke mid-body, or was cut, is a failure; a cancelled one counts for none.
        assert_eq!(ok.class(&f, End::Failed), Class::Failure);
        assert_eq!(ok.class(&f, End::Cut), Class::Failure);
        assert_eq!(ok.class(&f, End::Cancelled), Class::Cancelled);
        let e = Seen::head(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new());
        assert_eq!(e.class(&f, End::Complete), Class::Failure);
    }

    #[test]
    fn grpc_status_counts_from_head_or_trailers() {
        let f = FailureClass::default();
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("14"));
        let trailers_only = Seen::head(StatusCode::OK, &h);
        assert_eq!(trailers_only.class(&f, End::Complete), Class::Failure);

        let mut s = Seen::head(StatusCode::OK, &HeaderMap::new());
        s.frame(&Frame::data(Bytes::from_static(b"msg")));
        assert_eq!(s.class(&f, End::Complete), Class::Success);
        s.frame(&trailers("14"));
        assert_eq!(s.class(&f, End::Complete), Class::Failure);

        let mut s = Seen::head(StatusCode::OK, &HeaderMap::new());
        s.frame(&trailers("0"));
        assert_eq!(s.class(&f, End::Complete), Class::Success);
        // NOT_FOUND is the application's answer, not the endpoint's failure.
        s.frame(&trailers("5"));
        assert_eq!(s.class(&f, End::Complete), Class::Success);
    }
}
