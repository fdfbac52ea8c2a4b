//! Health as kubelet and people see it.
//!
//! [`probes`]: the app container's original kubelet probes, run by meshlet on kubelet's behalf
//! (`GET /app-health/<container>/<probe>` on the admin server). The injector rewrites a pod's
//! probes to go through the sidecar, which keeps them working when inbound traffic is
//! intercepted, and lets meshlet fold the app's own health into its readiness.

//!
//! [`model`]: the dependency health model (per destination service: healthy, degraded or
//! unhealthy, with the reason), fed by each destination's [`crate::proxy::window`], its recent request outcomes.
//! [`grpc`]: grpc.health.v1.Health on `admin.grpc_listen`.

pub mod grpc;
pub mod model;
pub mod probes;
