//! `grpc.health.v1.Health` (Check and Watch) on `admin.grpc_listen`, so that kubelet's native
//! gRPC probes and `grpc_health_probe` work against the sidecar.
//!
//! Services: `""` is overall readiness (exactly what `/ready` says), `meshlet.live` is liveness
//! (SERVING while meshlet answers), and each dependency by name (`name.namespace`) is SERVING
//! unless it is unhealthy. Check of any other name answers the gRPC status NOT_FOUND; Watch of
//! one streams SERVICE_UNKNOWN (and follows it, should it become a dependency), as the health
//! protocol asks. Watch sends the current status at once and then every change; statuses are
//! re-evaluated when the dependency model publishes and at least every second (for `""`, which
//! also follows the proxy's own readiness and the app's readiness probes).
//!
//! The protocol is tonic-health's: its generated `Health` service and prost messages, served by
//! hyper's HTTP/2 on meshlet's own listener. What the statuses are is meshlet's (this module).
//!
//! Watch follows one status table shared by every watcher: a single task re-evaluates it when the
//! dependency model publishes and every second while anyone watches, so that a hundred watchers
//! of `""` run the app's readiness probes once per tick, not a hundred times.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::model::State;
use crate::ops::admin::Admin;

/// The liveness service name.
pub const LIVE_SERVICE: &str = "meshlet.live";

/// A request is a service name: a few bytes. More than this is not a health check.
const MAX_REQUEST: usize = 16 * 1024;

/// How often the shared table is re-evaluated while anyone watches (besides every publish of
/// the dependency model).
const TICK: Duration = Duration::from_secs(1);

/// Every service name meshlet knows, with its status.
type Table = HashMap<String, ServingStatus>;

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

struct HealthService {
    admin: Arc<Admin>,
    table: watch::Sender<Arc<Table>>,
    /// Wakes the table task when a watcher arrives, so that its table is current.
    joined: Arc<Notify>,
    stop: CancellationToken,
}

/// Serves until `stop` is cancelled.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener, stop: CancellationToken) {
    let table = watch::Sender::new(Arc::new(Table::new()));
    let joined = Arc::new(Notify::new());
    tokio::spawn(follow(
        admin.clone(),
        table.clone(),
        joined.clone(),
        stop.clone(),
    ));
    let health = HealthServer::new(HealthService {
        admin,
        table,
        joined,
        stop: stop.clone(),
    })
    .max_decoding_message_size(MAX_REQUEST);
    loop {
        let Some((stream, _)) = crate::socket::accept(&listener, &stop, "grpc health").await else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let (svc, stop) = (TowerToHyperService::new(health.clone()), stop.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}

/// Keeps the shared table current while anyone watches: at each publish of the dependency
/// model, each tick, and when a watcher arrives.
async fn follow(
    admin: Arc<Admin>,
    table: watch::Sender<Arc<Table>>,
    joined: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut deps = admin.dependencies.clone();
    loop {
        if table.receiver_count() > 0 {
            let now = evaluate(&admin).await;
            table.send_if_modified(|t| {
                let changed = **t != now;
                if changed {
                    *t = Arc::new(now);
                }
                changed
            });
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = deps.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(TICK).await;
                }
            }
            _ = tokio::time::sleep(TICK) => {}
            _ = joined.notified() => {}
        }
    }
}

/// The status of every service name meshlet knows.
async fn evaluate(admin: &Admin) -> Table {
    let mut t = Table::new();
    t.insert(String::new(), serving(admin.verdict().await.ready));
    t.insert(LIVE_SERVICE.to_string(), ServingStatus::Serving);
    let snap = admin.dependencies.borrow().clone();
    for d in &snap.dependencies {
        t.insert(d.name.clone(), dependency_status(d));
    }
    t
}

/// A dependency is SERVING unless it is unhealthy.
fn dependency_status(d: &super::model::Dependency) -> ServingStatus {
    serving(d.state != State::Unhealthy)
}

fn serving(ok: bool) -> ServingStatus {
    if ok {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// The serving status of a service name, evaluated now; `None` for a name meshlet does not
/// know.
async fn status_of(admin: &Admin, service: &str) -> Option<ServingStatus> {
    match service {
        "" => Some(serving(admin.verdict().await.ready)),
        LIVE_SERVICE => Some(ServingStatus::Serving),
        name => {
            let snap = admin.dependencies.borrow().clone();
            snap.get(name).map(dependency_status)
        }
    }
}

fn answer(s: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: s as i32 }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let service = &req.get_ref().service;
        match status_of(&self.admin, service).await {
            Some(s) => Ok(tonic::Response::new(answer(s))),
            None => Err(tonic::Status::not_found(format!(
                "unknown service {service:?}"
            ))),
        }
    }

    type WatchStream = WatchStream;

    /// The current status at once, then each change; an unknown name streams SERVICE_UNKNOWN
    /// (and follows it, should it become a dependency), as the health protocol asks. Ends with
    /// UNAVAILABLE when meshlet shuts down.
    async fn watch(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<WatchStream>, tonic::Status> {
        let service = req.into_inner().service;
        let rx = self.table.subscribe();
        self.joined.notify_one();
        let first = status_of(&self.admin, &service)
            .await
            .unwrap_or(ServingStatus::ServiceUnknown);
        struct W {
            service: String,
            rx: watch::Receiver<Arc<Table>>,
            next: Option<ServingStatus>,
            last: Option<ServingStatus>,
            stop: CancellationToken,
            done: bool,
        }
        let w = W {
            service,
            rx,
            next: Some(first),
            last: None,
            stop: self.stop.clone(),
            done: false,
        };
        let stream = futures_util::stream::unfold(w, |mut w| async move {
            if w.done {
                return None;
            }
            loop {
                if let Some(s) = w.next.take() {
                    if w.last != Some(s) {
                        w.last = Some(s);
                        return Some((Ok(answer(s)), w));
                    }
                }
                tokio::select! {
                    _ = w.stop.cancelled() => {
                        w.done = true;
                        let e = tonic::Status::unavailable("meshlet is shutting down");
                        return Some((Err(e), w));
                    }
                    changed = w.rx.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                        let t = w.rx.borrow_and_update().clone();
                        w.next = Some(
                            t.get(&w.service)
                                .copied()
                                .unwrap_or(ServingStatus::ServiceUnknown),
                        );
                    }
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}
