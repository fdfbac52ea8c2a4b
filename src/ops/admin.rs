//! The admin server: `/live`, `/ready`, `/health`, `/metrics`, `/endpoints`,
//! `/app-health/<container>/<probe>` (the app's own kubelet probes, run by meshlet), and
//! `POST /shutdown` (loopback clients only).
//!
//! `/live` is the proxy's liveness only: dependency trouble never gets a pod restarted.
//! `/ready` ([`Admin::verdict`]) is the proxy's readiness (listeners, discovery synced), the app's
//! own readiness probes when configured, and, with `health.ready_requires: critical`, every
//! critical dependency not unhealthy, except one unhealthy for longer than
//! `health.outage_grace` (a shared outage: see README, "Health").

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ReadyRequires;
use crate::metrics::Metrics;
use crate::ops::health::model::{Dependency, Snapshot, State};
use crate::ops::health::probes::{AppProbes, ProbeResult};
use crate::proxy::http::body::Body;
use crate::readiness::Readiness;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    /// Cancelled to start the graceful shutdown (by `/shutdown` or a signal).
    pub shutdown: CancellationToken,
    pub started: Instant,
    /// Extra lines for `/ready` (e.g. discovery serving stale endpoints while its watch fails).
    pub detail: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// The app's original kubelet probes (`MESHLET_APP_PROBES`), if any.
    pub app_probes: Option<Arc<AppProbes>>,
    /// Where the app's probes go: where inbound traffic goes ([`crate::config::pod::probe_host`]).
    pub probe_host: IpAddr,
    /// Every destination service in use and its endpoints' breaker state (`/endpoints`).
    pub endpoints: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The dependency health model's latest evaluation.
    pub dependencies: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    /// `health.ready_requires`.
    pub ready_requires: ReadyRequires,
    /// `health.outage_grace`.
    pub outage_grace: Duration,
}

/// What `/ready` (and gRPC health service "") says.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub ready: bool,
    /// Why not ready.
    pub reasons: Vec<String>,
    /// Worth knowing but not failing readiness (stale discovery, an outage not gating).
    pub notes: Vec<String>,
}

/// One app probe run for `/health`.
struct AppResult {
    container: String,
    probe: &'static str,
    result: ProbeResult,
}

impl Admin {
    /// Serves until `stop` is cancelled. The admin server outlives the drain of the proxy
    /// listeners, so that `/ready` can report the shutdown while connections finish.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let Some((stream, peer)) = crate::socket::accept(&listener, &stop, "admin").await
            else {
                return;
            };
            // An IPv4 client of a dual-stack `[::]` listener as the IPv4 address it is (so
            // that 127.0.0.1 is loopback).
            let peer = crate::socket::canonical(peer);
            let this = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.route(req, peer).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    }

    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        if let Some(rest) = req.uri().path().strip_prefix("/app-health/") {
            if req.method() == Method::GET || req.method() == Method::HEAD {
                return self.app_health(rest).await;
            }
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/live") => text(StatusCode::OK, "live\n".into()),
            (&Method::GET | &Method::HEAD, "/ready") => self.ready().await,
            (&Method::GET | &Method::HEAD, "/ready/proxy") => self.proxy_ready(),
            (&Method::GET | &Method::HEAD, "/health") => {
                let text_format = req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv == "format=text"));
                self.health(text_format).await
            }
            (&Method::GET, "/endpoints") => {
                let mut r = text(StatusCode::OK, format!("{:#}\n", (self.endpoints)()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            (&Method::GET, "/metrics") => {
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (&Method::POST, "/shutdown") => {
                if !is_loopback_peer(peer) {
                    tracing::debug!(%peer, "refusing POST /shutdown from a client not on loopback");
                    return text(
                        StatusCode::FORBIDDEN,
                        "/shutdown answers only to loopback clients\n".into(),
                    );
                }
                tracing::info!(%peer, "shutdown requested on the admin server");
                self.shutdown.cancel();
                text(StatusCode::OK, "shutting down\n".into())
            }
            (_, "/shutdown") => {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n".into());
                r.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
                r
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live /ready /health /metrics /endpoints /app-health/<container>/<probe> or POST /shutdown\n".into(),
            ),
        }
    }

    /// `/app-health/<container>/<probe>`: runs the app's original probe now and answers 200 or
    /// 503 with what happened, so a rewritten kubelet probe passes or fails as the original
    /// would have. 404 when no such probe was configured: the injector and meshlet disagree.
    async fn app_health(&self, rest: &str) -> Response<Body> {
        let Some((container, probe)) = rest.split_once('/') else {
            return text(
                StatusCode::NOT_FOUND,
                "use /app-health/<container>/<probe>, probe one of livez, readyz, startupz\n"
                    .into(),
            );
        };
        let Some(probes) = &self.app_probes else {
            return text(
                StatusCode::NOT_FOUND,
                "no app probes are configured (MESHLET_APP_PROBES is not set)\n".into(),
            );
        };
        match self.run_probe(probes, container, probe).await {
            None => text(
                StatusCode::NOT_FOUND,
                format!("no {probe:?} probe is configured for container {container:?}\n"),
            ),
            Some(r) => {
                let status = if r.success {
                    StatusCode::OK
                } else {
                    tracing::debug!(container, probe, message = %r.message, "app probe failed");
                    StatusCode::SERVICE_UNAVAILABLE
                };
                text(status, format!("{}\n", r.message))
            }
        }
    }

    /// Runs one of the app's probes and counts its result and duration.
    async fn run_probe(
        &self,
        probes: &AppProbes,
        container: &str,
        probe: &str,
    ) -> Option<crate::ops::health::probes::ProbeResult> {
        let r = probes.run(container, probe, self.probe_host).await?;
        let result = if r.success { "success" } else { "failure" };
        self.metrics
            .app_probes
            .with_label_values(&[container, probe, result])
            .inc();
        self.metrics
            .app_probe_duration
            .with_label_values(&[container, probe])
            .observe(r.duration.as_secs_f64());
        Some(r)
    }

    /// Runs the app's probes of kind `only` (or all of them), concurrently.
    async fn run_app_probes(&self, only: Option<&str>) -> Vec<AppResult> {
        let Some(probes) = &self.app_probes else {
            return Vec::new();
        };
        let runs = probes
            .list()
            .into_iter()
            .filter(|(_, p)| only.is_none_or(|o| o == *p))
            .map(|(c, p)| async move {
                self.run_probe(probes, c, p).await.map(|result| AppResult {
                    container: c.to_string(),
                    probe: p,
                    result,
                })
            });
        futures_util::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The readiness verdict: the proxy's own, the app's readiness probes, and (by policy) the
    /// critical dependencies.
    pub async fn verdict(&self) -> Verdict {
        let app = self.run_app_probes(Some("readyz")).await;
        let snap = self.dependencies.borrow().clone();
        self.verdict_from(&app, &snap)
    }

    fn verdict_from(&self, app: &[AppResult], snap: &Snapshot) -> Verdict {
        let mut v = Verdict::default();
        if self.shutdown.is_cancelled() {
            v.reasons.push("shutting down".into());
        }
        for p in self.readiness.pending() {
            v.reasons.push(format!("waiting for {p}"));
        }
        for a in app.iter().filter(|a| a.probe == "readyz") {
            if !a.result.success {
                v.reasons.push(format!(
                    "app container {:?} readyz failed: {}",
                    a.container, a.result.message
                ));
            }
        }
        for d in snap.dependencies.iter().filter(|d| d.critical) {
            if d.state == State::Unknown && self.ready_requires == ReadyRequires::Critical {
                // Not known yet (discovery, or the model's next evaluation): not ready until it is.
                v.reasons.push(format!(
                    "critical dependency {}: state not known yet ({})",
                    d.name, d.reason
                ));
                continue;
            }
            if d.state != State::Unhealthy {
                continue;
            }
            match (self.ready_requires, d.outage) {
                (ReadyRequires::Critical, false) => v.reasons.push(format!(
                    "critical dependency {} unhealthy: {}",
                    d.name, d.reason
                )),
                (ReadyRequires::Critical, true) => v.notes.push(format!(
                    "critical dependency {} unhealthy for {}: {}; {} (unhealthy for longer \
                     than health.outage_grace {}: a shared outage)",
                    d.name,
                    secs(d.since.elapsed()),
                    d.reason,
                    readiness_role(d, self.ready_requires),
                    humantime::format_duration(self.outage_grace)
                )),
                (ReadyRequires::None, _) => v.notes.push(format!(
                    "critical dependency {} unhealthy: {}; {}",
                    d.name,
                    d.reason,
                    readiness_role(d, self.ready_requires)
                )),
            }
        }
        v.notes.extend((self.detail)());
        v.ready = v.reasons.is_empty();
        v
    }

    /// The proxy's own readiness only (listeners bound, discovery synced, not shutting down):
    /// what a native sidecar's startup probe waits for. `/ready` also asks the app's readiness
    /// probes, which cannot pass before the app starts, and the app starts only after the
    /// sidecar's startup probe has passed.
    fn proxy_ready(&self) -> Response<Body> {
        if self.shutdown.is_cancelled() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
        }
        let pending = self.readiness.pending();
        if pending.is_empty() {
            return text(StatusCode::OK, "proxy ready\n".into());
        }
        let mut body = String::from("proxy not ready; waiting for:\n");
        for p in pending {
            let _ = writeln!(body, "- {p}");
        }
        text(StatusCode::SERVICE_UNAVAILABLE, body)
    }

    async fn ready(&self) -> Response<Body> {
        if self.shutdown.is_cancelled() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
        }
        let v = self.verdict().await;
        let (status, mut body) = if v.ready {
            (StatusCode::OK, String::from("ready\n"))
        } else {
            let mut body = String::from("not ready:\n");
            for r in &v.reasons {
                let _ = writeln!(body, "- {r}");
            }
            (StatusCode::SERVICE_UNAVAILABLE, body)
        };
        for line in &v.notes {
            let _ = writeln!(body, "- {line}");
        }
        text(status, body)
    }

    /// `/health`: everything at once, as JSON or (`?format=text`) for people. Always 200: the
    /// verdict is in the body (`status`); `/ready` is the probe.
    async fn health(&self, text_format: bool) -> Response<Body> {
        let app = self.run_app_probes(None).await;
        let snap = self.dependencies.borrow().clone();
        let v = self.verdict_from(&app, &snap);
        let troubled = snap
            .dependencies
            .iter()
            .any(|d| matches!(d.state, State::Degraded | State::Unhealthy))
            || app.iter().any(|a| !a.result.success);
        let status = if !v.ready {
            "unavailable"
        } else if troubled {
            "degraded"
        } else {
            "healthy"
        };
        let pending = self.readiness.pending();
        let proxy_ready = pending.is_empty() && !self.shutdown.is_cancelled();
        let uptime = self.started.elapsed().as_secs();
        if text_format {
            let mut b = String::new();
            let _ = writeln!(
                b,
                "status: {status} (meshlet {}, up {})",
                crate::VERSION,
                secs(Duration::from_secs(uptime))
            );
            let _ = writeln!(
                b,
                "proxy: {}",
                if proxy_ready { "ready" } else { "not ready" }
            );
            for p in &pending {
                let _ = writeln!(b, "  waiting for {p}");
            }
            for r in v.reasons.iter().chain(&v.notes) {
                let _ = writeln!(b, "  - {r}");
            }
            let _ = writeln!(b, "dependencies:");
            if snap.dependencies.is_empty() {
                let _ = writeln!(b, "  (none)");
            }
            for d in &snap.dependencies {
                let _ = writeln!(
                    b,
                    "  {} ({}): {}: {} (for {}; {})",
                    d.name,
                    if d.critical { "critical" } else { "optional" },
                    d.state.as_str(),
                    d.reason,
                    secs(d.since.elapsed()),
                    readiness_role(d, self.ready_requires)
                );
                if let Some((s, why)) = &d.pending {
                    let _ = writeln!(b, "    observed {}: {why} (hysteresis)", s.as_str());
                }
                let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
                let _ = writeln!(
                    b,
                    "    endpoints: {} total, {} ready, {} ejected; {} requests, success rate {}; p50 {}, p99 {}",
                    d.endpoints.total,
                    d.endpoints.ready,
                    d.endpoints.ejected,
                    d.requests,
                    d.success_rate
                        .map_or("-".to_string(), |r| format!("{:.1}%", r * 100.0)),
                    ms(d.p50_ms),
                    ms(d.p99_ms)
                );
                if let Some(e) = &d.last_error {
                    let _ = writeln!(b, "    last error: {e}");
                }
            }
            if !app.is_empty() {
                let _ = writeln!(b, "app probes:");
                for a in &app {
                    let _ = writeln!(
                        b,
                        "  {}/{}: {}: {}",
                        a.container,
                        a.probe,
                        if a.result.success { "ok" } else { "failed" },
                        a.result.message
                    );
                }
            }
            return text(StatusCode::OK, b);
        }
        let deps: Vec<serde_json::Value> = snap
            .dependencies
            .iter()
            .map(|d| {
                serde_json::json!({
                    "name": d.name,
                    "critical": d.critical,
                    "declared": d.declared,
                    "state": d.state.as_str(),
                    "reason": d.reason,
                    "observed": d.pending.as_ref().map(|(s, why)| serde_json::json!({
                        "state": s.as_str(),
                        "reason": why,
                    })),
                    "readiness": readiness_role(d, self.ready_requires),
                    "endpoints": {
                        "total": d.endpoints.total,
                        "ready": d.endpoints.ready,
                        "ejected": d.endpoints.ejected,
                    },
                    "requests": d.requests,
                    "success_rate": d.success_rate,
                    "latency_ms": { "p50": d.p50_ms, "p99": d.p99_ms },
                    "last_error": d.last_error,
                    "last_change": humantime::format_rfc3339_seconds(d.last_change).to_string(),
                    "state_seconds": d.since.elapsed().as_secs(),
                })
            })
            .collect();
        let probes: Vec<serde_json::Value> = app
            .iter()
            .map(|a| {
                serde_json::json!({
                    "container": a.container,
                    "probe": a.probe,
                    "success": a.result.success,
                    "message": a.result.message,
                    "duration_ms": a.result.duration.as_millis() as u64,
                })
            })
            .collect();
        let body = serde_json::json!({
            "status": status,
            "version": crate::VERSION,
            "uptime_seconds": uptime,
            "ready": v.ready,
            "reasons": v.reasons,
            "notes": v.notes,
            "proxy": { "ready": proxy_ready, "pending": pending },
            "dependencies": deps,
            "app_probes": probes,
        });
        let mut r = text(StatusCode::OK, format!("{body:#}\n"));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// Whether the admin connection's peer is on loopback, the only clients `POST /shutdown` obeys.
/// The peer is the admin socket's own TCP peer: a process in the pod that connected to
/// 127.0.0.1 (or `::1`, or `::ffff:127.0.0.1` on a dual-stack listener). A connection from the
/// pod's own address is not loopback, and that is how one forwarded by meshlet's inbound
/// listener would arrive (it delivers to the original destination, from the pod's address),
/// had the inbound listener not refused to forward to meshlet's own ports in the first place.
fn is_loopback_peer(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// How a dependency takes part in readiness, in words.
fn readiness_role(d: &Dependency, policy: ReadyRequires) -> &'static str {
    match (d.critical, policy) {
        (false, _) => "optional: not gating readiness",
        (true, ReadyRequires::None) => "not gating readiness: health.ready_requires is none",
        (true, ReadyRequires::Critical) if d.outage => "outage: not gating readiness",
        (true, ReadyRequires::Critical) => "gating readiness",
    }
}

/// A duration in whole seconds, for people.
fn secs(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::is_loopback_peer;

    #[test]
    fn only_loopback_peers_may_shut_down() {
        for (peer, ok) in [
            ("127.0.0.1:40000", true),
            ("127.0.0.9:40000", true),
            ("[::1]:40000", true),
            ("[::ffff:127.0.0.1]:40000", true),
            ("198.18.0.1:40000", false),
            ("[::ffff:198.18.0.1]:40000", false),
            ("[2001:2::1]:40000", false),
            ("0.0.0.0:40000", false),
        ] {
            assert_eq!(is_loopback_peer(peer.parse().unwrap()), ok, "{peer}");
        }
    }
}
