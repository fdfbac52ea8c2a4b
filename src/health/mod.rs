//! Health as kubelet and people see it.
//!
//! [`probes`]: the app container's original kubelet probes, run by meshlet on kubelet's behalf
//! (`GET /app-health/<container>/<probe>` on the admin server). The injector rewrites a pod's
//! probes to go through the sidecar, which keeps them working when inbound traffic is
//! intercepted, and lets meshlet fold the app's own health into its readiness.

pub mod probes;
