//! Discovery: which service an address means, and a live stream of each service's endpoints.
//!
//! Every source (the static list in the config file now, the Kubernetes API next) implements
//! [`Resolve`]. Endpoint sets are delivered as a stream of insert/remove changes (tower's
//! [`Change`]) even when a source only ever emits them once, so the balancer is written once
//! for live updates.

pub mod kubernetes;
pub mod protocol;
pub mod static_list;

use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::Stream;

pub use crate::config::ServiceRef;
pub use protocol::{DeclaredProtocol, PortSet};

/// One change to a service's endpoint set. The value is empty for now; per-endpoint metadata
/// (zone, weight) can travel here later without changing the balancer's shape.
pub type Change = tower::discover::Change<SocketAddr, ()>;

/// A service's endpoint changes. [`Update::Synced`] marks that the source has delivered its
/// first full endpoint set (readiness waits for it).
#[derive(Debug, Clone)]
pub enum Update {
    Change(Change),
    Synced,
    /// The destination's own policy keys (a static service's `policy:`, a Service's
    /// annotations), over the config's `defaults`. Sent first and whenever they change.
    Policy(Box<crate::config::policy::PolicySpec>),
}

pub type UpdateStream = Pin<Box<dyn Stream<Item = Update> + Send + 'static>>;

pub trait Resolve: Send + Sync + 'static {
    /// The service (and service port) a virtual address (a ClusterIP:port) means, if any.
    fn lookup(&self, dst: SocketAddr) -> Option<ServiceRef>;

    /// A live stream of the service's endpoint changes.
    fn resolve(&self, service: &ServiceRef) -> UpdateStream;

    /// The protocol the service (port) declares, if it declares one: a Service port's
    /// `appProtocol` or name, a static service's `protocol:`. `None`: detect. A reference
    /// without a port means the service's only port. Called once per connection, after
    /// [`Resolve::lookup`]: it must not allocate, and may take only the read lock `lookup`
    /// takes.
    fn protocol(&self, _service: &ServiceRef) -> Option<DeclaredProtocol> {
        None
    }

    /// Lines worth showing in `/ready`'s detail (for example a stale watch).
    fn detail(&self) -> Vec<String> {
        Vec::new()
    }

    /// Why the service's endpoints may be out of date (its watch is failing), if they may.
    fn stale(&self, _service: &ServiceRef) -> Option<String> {
        None
    }
}

/// Static services first, then the Kubernetes API: a service listed in the config file wins.
pub struct Chain {
    pub first: static_list::StaticResolver,
    pub then: Option<std::sync::Arc<kubernetes::KubeResolver>>,
}

impl Resolve for Chain {
    fn lookup(&self, dst: SocketAddr) -> Option<ServiceRef> {
        self.first
            .lookup(dst)
            .or_else(|| self.then.as_ref().and_then(|k| k.lookup(dst)))
    }

    fn resolve(&self, service: &ServiceRef) -> UpdateStream {
        match &self.then {
            Some(k) if !self.first.has(service) => k.resolve(service),
            _ => self.first.resolve(service),
        }
    }

    fn protocol(&self, service: &ServiceRef) -> Option<DeclaredProtocol> {
        match self.first.declared(service) {
            Some(p) => p,
            None => self.then.as_ref().and_then(|k| k.protocol(service)),
        }
    }

    fn detail(&self) -> Vec<String> {
        self.then.as_ref().map(|k| k.detail()).unwrap_or_default()
    }

    fn stale(&self, service: &ServiceRef) -> Option<String> {
        match &self.then {
            Some(k) if !self.first.has(service) => k.stale(service),
            _ => None,
        }
    }
}
