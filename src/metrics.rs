//! The Prometheus registry and the metric families meshlet records.
//!
//! Names carry the `meshlet_` prefix and base units; labels stay bounded: direction, service
//! (a configured or discovered service, or `app:<port>` inbound), endpoint address, status code
//! and protocol. Never a path or anything else a client controls.

use std::collections::HashMap;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every family the proxy records.
pub struct Metrics {
    pub registry: Registry,
    /// Every labelled family, for [`Metrics::forget`].
    all: Vec<Box<dyn Forget>>,
    /// HTTP requests answered, by direction, service and status code.
    pub requests: IntCounterVec,
    /// meshlet's own answers, by reason (see `proxy::error::ProxyError::label`).
    pub errors: IntCounterVec,
    /// Time from receiving the request head to sending the response head.
    pub response_duration: HistogramVec,
    /// Connections accepted, by direction and detected protocol.
    pub connections: IntCounterVec,
    /// Connections open now, by direction.
    pub open_connections: IntGaugeVec,
    /// Idle HTTP/1 client connections parked now (hyper's state and buffers freed).
    pub parked_connections: IntGaugeVec,
    /// Connections closed at once on accept, by direction and reason (`limit`: the listener's
    /// `max_connections`).
    pub connections_refused: IntCounterVec,
    /// Bytes copied over opaque TCP and upgraded (e.g. WebSocket) connections.
    pub tcp_bytes: IntCounterVec,
    /// Endpoints known per service.
    pub endpoints: IntGaugeVec,
    /// Destination services held (each with its discovery watch).
    pub destinations: prometheus::IntGauge,
    /// Requests or connections refused because a service had no endpoints.
    pub no_endpoints: IntCounterVec,
    /// Connections refused because their original destination was meshlet itself.
    pub redirect_loops: IntCounterVec,
    /// Failed connection attempts to endpoints.
    pub connect_errors: IntCounterVec,
    /// 1 while a discovery watch is failing (the last known endpoints keep serving).
    pub discovery_stale: IntGaugeVec,
    /// Discovery watch errors.
    pub discovery_errors: IntCounterVec,
    /// Full lists completed by discovery watches (at start, and on a reconnect that cannot go
    /// on from the last resource version), by watch kind: `services` or `endpointslices`.
    pub discovery_syncs: IntCounterVec,
    /// `meshlet.dev/*` annotations ignored for a bad value.
    pub policy_errors: IntCounterVec,
    /// Retries sent, by reason.
    pub retries: IntCounterVec,
    /// Retries not sent although the answer was retryable, by reason.
    pub retries_skipped: IntCounterVec,
    /// Circuit breaker state per endpoint: 0 closed, 1 open (ejected), 2 half-open (probing).
    pub breaker_state: IntGaugeVec,
    /// Circuit breaker transitions.
    pub breaker_transitions: IntCounterVec,
    /// Requests answered from another identical request's upstream answer.
    pub dedup_coalesced: IntCounterVec,
    /// Upstream requests not made thanks to deduplication.
    pub dedup_saved: IntCounterVec,
    /// Requests that ran out of time (the request timeout or grpc-timeout).
    pub timeouts: IntCounterVec,
    /// Protocol detection decisions, by direction and result.
    pub protocol_detect: IntCounterVec,
    /// Requests ended because no byte moved either way for `http.stream_idle_timeout`.
    pub idle_timeouts: IntCounterVec,
    /// Inbound requests refused by the concurrency or rate limit.
    pub inbound_refused: IntCounterVec,
    /// Inbound connections refused before anything is forwarded: to one of meshlet's own
    /// ports (`meshlet_port`), or to an address that is not the pod's (`not_local`).
    pub inbound_connections_refused: IntCounterVec,
    /// 1 for each dependency's current state, 0 for its other states.
    pub dependency_state: IntGaugeVec,
    /// Dependency state changes (after hysteresis), by the state changed to.
    pub dependency_transitions: IntCounterVec,
    /// The app's original probes run through `/app-health`, `/ready` and `/health`.
    pub app_probes: IntCounterVec,
    /// How long the app's probes took.
    pub app_probe_duration: HistogramVec,
}

/// A labelled family whose series can be dropped by one label's value.
trait Forget: Send + Sync {
    fn forget(&self, label: &str, gone: &dyn Fn(&str) -> bool);
}

impl<T: MetricVecBuilder + 'static> Forget for MetricVec<T> {
    fn forget(&self, label: &str, gone: &dyn Fn(&str) -> bool) {
        for family in self.collect() {
            for m in family.get_metric() {
                let labels: HashMap<&str, &str> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                if labels.get(label).is_some_and(|v| gone(v)) {
                    let _ = self.remove(&labels);
                }
            }
        }
    }
}

/// The registry being filled, and every family in it (for [`Metrics::forget`]).
struct Families {
    registry: Registry,
    all: Vec<Box<dyn Forget>>,
}

impl Families {
    fn add<T: MetricVecBuilder + 'static>(&mut self, v: &MetricVec<T>) {
        self.registry
            .register(Box::new(v.clone()))
            .expect("unique metric");
        self.all.push(Box::new(v.clone()));
    }
}

fn counter(f: &mut Families, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    f.add(&c);
    c
}

fn gauge(f: &mut Families, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    f.add(&g);
    g
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Families {
            registry: Registry::new(),
            all: Vec::new(),
        };
        let response_duration = HistogramVec::new(
            HistogramOpts::new(
                "meshlet_response_duration_seconds",
                "Time from a request's head arriving to its response's head leaving",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["direction", "service"],
        )
        .expect("valid metric");
        r.add(&response_duration);
        Metrics {
            requests: counter(
                &mut r,
                "meshlet_requests_total",
                "HTTP requests answered, by direction, service, status code and classification \
                 (success, failure, cancelled), counted when the response ends",
                &["direction", "service", "status", "classification"],
            ),
            errors: counter(
                &mut r,
                "meshlet_errors_total",
                "Requests meshlet answered itself instead of an endpoint, by direction, service \
                 and reason",
                &["direction", "service", "reason"],
            ),
            response_duration,
            connections: counter(
                &mut r,
                "meshlet_connections_total",
                "Connections accepted, by direction and protocol (http1, http2, tcp, passthrough)",
                &["direction", "protocol"],
            ),
            open_connections: gauge(
                &mut r,
                "meshlet_open_connections",
                "Client connections open now",
                &["direction"],
            ),
            parked_connections: gauge(
                &mut r,
                "meshlet_parked_connections",
                "Idle HTTP/1 client connections parked now: open, holding no HTTP state or buffers until their next byte",
                &["direction"],
            ),
            connections_refused: counter(
                &mut r,
                "meshlet_connections_refused_total",
                "Client connections closed at once on accept, by direction and reason (limit: the listener's max_connections)",
                &["direction", "reason"],
            ),
            tcp_bytes: counter(
                &mut r,
                "meshlet_tcp_bytes_total",
                "Bytes copied over opaque TCP and upgraded connections; flow is to_server or to_client",
                &["direction", "service", "flow"],
            ),
            endpoints: gauge(
                &mut r,
                "meshlet_endpoints",
                "Endpoints known per destination service",
                &["service"],
            ),
            destinations: {
                let g = prometheus::IntGauge::new(
                    "meshlet_destinations",
                    "Destination services held, each with its discovery watch (unused ones are \
                     dropped after discovery.evict_after)",
                )
                .expect("valid metric");
                r.registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            no_endpoints: counter(
                &mut r,
                "meshlet_no_endpoints_total",
                "Requests (http) or connections (tcp) refused because the service had no available endpoint",
                &["direction", "service", "protocol"],
            ),
            redirect_loops: counter(
                &mut r,
                "meshlet_redirect_loops_total",
                "Connections refused because their original destination was meshlet's own listener",
                &["direction"],
            ),
            connect_errors: counter(
                &mut r,
                "meshlet_connect_errors_total",
                "Failed connection attempts to endpoints",
                &["service", "endpoint"],
            ),
            discovery_stale: gauge(
                &mut r,
                "meshlet_discovery_stale",
                "1 while a discovery watch is failing and the last known endpoints are served",
                &["watch"],
            ),
            discovery_errors: counter(
                &mut r,
                "meshlet_discovery_errors_total",
                "Discovery watch errors (each is retried with backoff)",
                &["watch"],
            ),
            discovery_syncs: counter(
                &mut r,
                "meshlet_discovery_watch_syncs_total",
                "Full lists completed by discovery watches (at start, and on a reconnect that cannot resume from the last resource version), by watch (services, endpointslices)",
                &["watch"],
            ),
            policy_errors: counter(
                &mut r,
                "meshlet_policy_errors_total",
                "meshlet.dev/* annotations on Services ignored for a bad value (the default is used)",
                &["service", "key"],
            ),
            retries: counter(
                &mut r,
                "meshlet_retries_total",
                "Retries sent, by reason (connect, status, reset)",
                &["service", "reason"],
            ),
            retries_skipped: counter(
                &mut r,
                "meshlet_retries_skipped_total",
                "Retryable answers not retried, by reason (budget, retry_after, attempts, body)",
                &["service", "reason"],
            ),
            breaker_state: gauge(
                &mut r,
                "meshlet_endpoint_breaker_state",
                "Circuit breaker state per endpoint: 0 closed, 1 open (ejected), 2 half-open",
                &["service", "endpoint"],
            ),
            breaker_transitions: counter(
                &mut r,
                "meshlet_breaker_transitions_total",
                "Circuit breaker transitions (ejected, restored, probe_failed, suppressed)",
                &["service", "transition"],
            ),
            dedup_coalesced: counter(
                &mut r,
                "meshlet_dedup_coalesced_total",
                "Requests answered from an identical in-flight request's upstream answer",
                &["service"],
            ),
            dedup_saved: counter(
                &mut r,
                "meshlet_dedup_saved_total",
                "Upstream requests not made thanks to deduplication",
                &["service"],
            ),
            timeouts: counter(
                &mut r,
                "meshlet_timeouts_total",
                "Requests ended because the request timeout or grpc-timeout passed (504 before the response head, the stream cut after it)",
                &["direction", "service"],
            ),
            protocol_detect: counter(
                &mut r,
                "meshlet_protocol_detect_total",
                "Protocol decisions on accepted connections: http1, h2, tcp (by the client's first bytes), timeout (the client stayed silent), declared (no detection)",
                &["direction", "result"],
            ),
            idle_timeouts: counter(
                &mut r,
                "meshlet_idle_timeouts_total",
                "Requests ended because no byte moved either way for http.stream_idle_timeout",
                &["direction", "service"],
            ),
            inbound_refused: counter(
                &mut r,
                "meshlet_inbound_refused_total",
                "Inbound requests refused at once by a limit (concurrency, rate)",
                &["limit"],
            ),
            inbound_connections_refused: counter(
                &mut r,
                "meshlet_inbound_connections_refused_total",
                "Inbound connections closed unforwarded: to meshlet's own ports (meshlet_port) or to an address not of this pod (not_local)",
                &["reason"],
            ),
            dependency_state: gauge(
                &mut r,
                "meshlet_dependency_state",
                "1 for a dependency's current state (unknown, healthy, degraded, unhealthy), 0 for the others",
                &["dependency", "state"],
            ),
            dependency_transitions: counter(
                &mut r,
                "meshlet_dependency_transitions_total",
                "Dependency state changes (after hysteresis), by the state changed to",
                &["dependency", "to"],
            ),
            app_probes: counter(
                &mut r,
                "meshlet_app_probes_total",
                "The app's original kubelet probes run by meshlet, by result (success, failure)",
                &["container", "probe", "result"],
            ),
            app_probe_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "meshlet_app_probe_duration_seconds",
                        "How long the app's original kubelet probes took",
                    )
                    .buckets(vec![
                        0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
                    &["container", "probe"],
                )
                .expect("valid metric");
                r.add(&h);
                h
            },
            registry: r.registry,
            all: r.all,
        }
    }

    /// Drops every series whose `label` has a value `gone` accepts (destinations that are gone:
    /// their services, their dependencies), so that what a sidecar once talked to does not stay
    /// in its memory and in every scrape. It walks every series once: call it once for a batch,
    /// never once per value, and never under a lock the data path takes.
    pub fn forget(&self, label: &str, gone: &dyn Fn(&str) -> bool) {
        for family in &self.all {
            family.forget(label, gone);
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = enc.encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
