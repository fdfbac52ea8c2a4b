//! The protocol a connection's destination declares, so that detection can be skipped.
//!
//! How detection decides (the README's "How detection decides" says it for users):
//! 1. The destination port is in `detect.opaque_ports`, the pod's (or its namespace's)
//!    `meshlet.dev/opaque-ports`, or `detect.server_first_ports`: opaque TCP at once. These are
//!    this pod's own declarations, so they win over what a Service declares.
//! 2. Outbound (and explicit upstreams): the destination service declares a protocol (a
//!    Kubernetes Service port's `appProtocol`, else its name; a static service's `protocol:`).
//! 3. Nothing declared: the protocol is detected on the client's first bytes.

use crate::config::ServiceRef;
use crate::discovery::{DeclaredProtocol, PortSet};

use super::Proxy;

/// The ports proxied as opaque TCP without detection: `detect.opaque_ports` (with the pod's
/// annotation already added to it) and `detect.server_first_ports`.
pub(super) fn opaque_ports(config: &crate::config::Config) -> PortSet {
    let mut ports = PortSet::from_ports(config.detect.server_first_ports.iter().copied());
    ports.extend(&config.detect.opaque_ports);
    ports
}

impl Proxy {
    /// The protocol declared for a connection, if any: `Some` means "skip detection".
    ///
    /// `svc` is the destination service (outbound: what discovery found for the original
    /// destination; an explicit upstream's service; `None` inbound and for passthrough).
    /// `dst_port` is the original destination port (`None` on an explicit upstream listener,
    /// which has none; the service's own declaration still applies there).
    ///
    /// Called once per connection: a binary search over the port list, then (with a service)
    /// one [`crate::discovery::Resolve::protocol`] lookup; no allocation.
    pub fn declared_protocol(
        &self,
        svc: Option<&ServiceRef>,
        dst_port: Option<u16>,
    ) -> Option<DeclaredProtocol> {
        if dst_port.is_some_and(|p| self.opaque_ports.contains(p)) {
            return Some(DeclaredProtocol::Opaque);
        }
        svc.and_then(|s| self.resolver.protocol(s))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::discovery::Chain;
    use crate::discovery::static_list::StaticResolver;

    fn proxy(yaml: &str) -> Arc<Proxy> {
        let config = Config::parse("c.yaml", yaml).unwrap();
        let resolver = Arc::new(Chain {
            first: StaticResolver::new(&config.discovery.static_services),
            then: None,
        });
        Proxy::new(
            &config,
            resolver,
            Arc::new(crate::metrics::Metrics::new()),
            Default::default(),
            Default::default(),
            Vec::new(),
        )
    }

    #[test]
    fn port_lists_then_the_service_then_detect() {
        let p = proxy(
            "detect:\n  server_first_ports: [22]\n  opaque_ports: [5432, \"8000-8010\"]\n\
             discovery:\n  static:\n    - service: api.prod\n      protocol: http2\n    \
             - service: web.prod\n",
        );
        let api = ServiceRef::parse("api.prod").unwrap();
        let web = ServiceRef::parse("web.prod").unwrap();
        use DeclaredProtocol::*;
        // The pod's own port lists win, outbound (with a service) and inbound (without).
        assert_eq!(p.declared_protocol(Some(&api), Some(8005)), Some(Opaque));
        assert_eq!(p.declared_protocol(None, Some(5432)), Some(Opaque));
        assert_eq!(p.declared_protocol(None, Some(22)), Some(Opaque));
        assert_eq!(
            p.declared_protocol(None, Some(3306)),
            None,
            "replaced default"
        );
        // Then the service's declaration, with or without a port.
        assert_eq!(p.declared_protocol(Some(&api), Some(80)), Some(Http2));
        assert_eq!(p.declared_protocol(Some(&api), None), Some(Http2));
        // Nothing declared: detect.
        assert_eq!(p.declared_protocol(Some(&web), Some(80)), None);
        assert_eq!(p.declared_protocol(None, Some(80)), None);
        assert_eq!(p.declared_protocol(None, None), None);

        let d = proxy("");
        assert_eq!(
            d.declared_protocol(None, Some(3306)),
            Some(Opaque),
            "defaults"
        );
        assert_eq!(d.declared_protocol(None, Some(5432)), None);
    }
}
