//! meshlet: a small, fast Kubernetes sidecar.
//!
//! The request path: a listener accepts a connection ([`socket`]), the protocol is detected
//! ([`proxy::detect`]), discovery ([`discovery`]) maps the destination to a service whose
//! endpoints the [`balance`] module picks from (power of two choices over peak-EWMA latency), and
//! [`proxy::client`] carries the request over a pooled connection. [`app`] wires it together.

pub mod admin;
pub mod app;
pub mod balance;
pub mod breaker;
pub mod config;
pub mod dedup;
pub mod discovery;
pub mod health;
pub mod init;
pub mod inject;
pub mod limits;
pub mod metrics;
pub mod pod;
pub mod policy;
pub mod proxy;
pub mod readiness;
pub mod retry;
pub mod socket;

/// The version printed by `meshlet version` and reported on the admin server.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
