//! The admin server: `/live`, `/ready`, `/metrics`, `/app-health/<container>/<probe>` (the app's
//! own kubelet probes, run by meshlet), and `POST /shutdown` (loopback clients only).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::probes::AppProbes;
use crate::metrics::Metrics;
use crate::proxy::body::Body;
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
    /// Where the app listens: `inbound.app_host`, else 127.0.0.1.
    pub app_host: IpAddr,
    /// Every destination service in use and its endpoints' breaker state (`/endpoints`).
    pub endpoints: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
}

impl Admin {
    /// Serves until `stop` is cancelled. The admin server outlives the drain of the proxy
    /// listeners, so that `/ready` can report the shutdown while connections finish.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
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
            (&Method::GET | &Method::HEAD, "/ready") => self.ready(),
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
                if !peer.ip().is_loopback() {
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
                "not found; try /live /ready /metrics /app-health/<container>/<probe> or POST /shutdown\n".into(),
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
        match probes.run(container, probe, self.app_host).await {
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

    fn ready(&self) -> Response<Body> {
        if self.shutdown.is_cancelled() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
        }
        let pending = self.readiness.pending();
        let (status, mut body) = if pending.is_empty() {
            (StatusCode::OK, String::from("ready\n"))
        } else {
            let mut body = String::from("not ready; waiting for:\n");
            for p in pending {
                body.push_str("- ");
                body.push_str(&p);
                body.push('\n');
            }
            (StatusCode::SERVICE_UNAVAILABLE, body)
        };
        for line in (self.detail)() {
            body.push_str("- ");
            body.push_str(&line);
            body.push('\n');
        }
        text(status, body)
    }
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
