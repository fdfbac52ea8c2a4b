//! meshlet: a small, fast Kubernetes sidecar.
//!
//! The request path: a listener accepts a connection ([`socket`]), the protocol is detected
//! ([`proxy::detect`]), discovery ([`discovery`]) maps the destination to a service whose
//! endpoints the [`balance`] module picks from (power of two choices over peak-EWMA latency), and
//! [`proxy::client`] carries the request over a pooled connection. [`app`] wires it together.

// The proxy's data path: listeners, detection, the HTTP request pipeline (proxy::http), and the
// decisions it consults.
pub mod balance;
pub mod breaker;
pub mod limits;
pub mod proxy;
pub mod socket;

// Identity: the client of `meshlet identity` (and, next, the rustls configs of the mTLS hop).
pub mod tls;

// Its inputs: the config file, the pod settings table and per-destination policy; discovery.
pub mod config;
pub mod discovery;

// Operating it: the admin server and health (they read the data path's state, never the
// reverse); metrics and readiness are registries every layer records into.
pub mod metrics;
pub mod ops;
pub mod readiness;

// Wiring of `meshlet proxy`, startup order, shutdown.
pub mod app;

// Separate programs in the same binary, never imported by the proxy: `meshlet init` (the
// iptables rules), `meshlet inject` (the admission webhook) and `meshlet identity` (the
// certificate authority).
pub mod identity;
pub mod init;
pub mod inject;

// Generated gRPC code for meshlet's own protocols (proto/), and what the side programs start
// with (logs, runtime, signals).
pub mod program;
pub mod proto;

/// The version printed by `meshlet version` and reported on the admin server.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
