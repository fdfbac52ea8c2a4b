//! Static discovery: services and endpoints listed in the config file (`discovery.static`).

use std::collections::HashMap;
use std::net::SocketAddr;

use futures_util::{StreamExt, stream};

use super::{Change, DeclaredProtocol, Resolve, ServiceRef, Update, UpdateStream};
use crate::config::{ServiceName, StaticService};

pub struct StaticResolver {
    by_address: HashMap<SocketAddr, ServiceName>,
    endpoints: HashMap<ServiceName, Vec<SocketAddr>>,
    policies: HashMap<ServiceName, crate::config::policy::PolicySpec>,
    /// Every static service, with its `protocol:` if it declares one.
    protocols: HashMap<ServiceName, Option<DeclaredProtocol>>,
}

impl StaticResolver {
    pub fn new(services: &[StaticService]) -> StaticResolver {
        let mut by_address = HashMap::new();
        let mut endpoints = HashMap::new();
        let mut policies = HashMap::new();
        let mut protocols = HashMap::new();
        for s in services {
            policies.insert(s.service.clone(), s.policy.clone());
            protocols.insert(s.service.clone(), s.protocol);
            for a in &s.addresses {
                by_address.insert(a.0, s.service.clone());
            }
            endpoints.insert(s.service.clone(), s.endpoints.iter().map(|e| e.0).collect());
        }
        StaticResolver {
            by_address,
            endpoints,
            policies,
            protocols,
        }
    }
}

impl StaticResolver {
    pub fn has(&self, service: &ServiceRef) -> bool {
        self.endpoints.contains_key(&service.name)
    }

    /// `Some(protocol:)` for a static service (which wins over any other source, declared or
    /// not), `None` for a service not listed here. One hash lookup.
    pub fn declared(&self, service: &ServiceRef) -> Option<Option<DeclaredProtocol>> {
        self.protocols.get(&service.name).copied()
    }
}

impl Resolve for StaticResolver {
    fn lookup(&self, dst: SocketAddr) -> Option<ServiceRef> {
        self.by_address.get(&dst).cloned().map(ServiceRef::from)
    }

    fn protocol(&self, service: &ServiceRef) -> Option<DeclaredProtocol> {
        self.declared(service).flatten()
    }

    /// Every endpoint as an insert, then `Synced`, then nothing more (the stream stays open,
    /// as a live source's would).
    fn resolve(&self, service: &ServiceRef) -> UpdateStream {
        let policy = self
            .policies
            .get(&service.name)
            .cloned()
            .unwrap_or_default();
        let updates: Vec<Update> = std::iter::once(Update::Policy(Box::new(policy)))
            .chain(
                self.endpoints
                    .get(&service.name)
                    .into_iter()
                    .flatten()
                    .map(|addr| Update::Change(Change::Insert(*addr, ()))),
            )
            .chain(std::iter::once(Update::Synced))
            .collect();
        Box::pin(stream::iter(updates).chain(stream::pending()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Addr;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn emits_inserts_then_synced() {
        let svc = ServiceName::parse("web.default").unwrap();
        let r = StaticResolver::new(&[StaticService {
            service: svc.clone(),
            addresses: vec![Addr("198.19.0.10:80".parse().unwrap())],
            endpoints: vec![Addr("127.0.0.1:1".parse().unwrap())],
            policy: Default::default(),
            protocol: None,
        }]);
        let svc = ServiceRef::from(svc);
        assert_eq!(
            r.lookup("198.19.0.10:80".parse().unwrap()),
            Some(svc.clone())
        );
        assert_eq!(r.lookup("198.19.0.10:81".parse().unwrap()), None);
        let got: Vec<Update> = r.resolve(&svc).take(3).collect().await;
        let want: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(got[0], Update::Policy(_)));
        assert!(matches!(got[1], Update::Change(Change::Insert(a, ()) ) if a == want));
        assert!(matches!(got[2], Update::Synced));
    }

    #[test]
    fn declared_protocols() {
        let c = crate::config::Config::parse(
            "c.yaml",
            "discovery:\n  static:\n    - service: db.prod\n      protocol: opaque\n    - service: api.prod\n      protocol: http2\n    - service: web.prod\n",
        )
        .unwrap();
        let r = StaticResolver::new(&c.discovery.static_services);
        let svc = |s: &str| ServiceRef::parse(s).unwrap();
        assert_eq!(r.protocol(&svc("db.prod")), Some(DeclaredProtocol::Opaque));
        assert_eq!(
            r.protocol(&svc("api.prod:8080")),
            Some(DeclaredProtocol::Http2)
        );
        assert_eq!(r.protocol(&svc("web.prod")), None);
        assert_eq!(
            r.declared(&svc("web.prod")),
            Some(None),
            "listed, declares nothing"
        );
        assert_eq!(r.declared(&svc("other.prod")), None, "not listed");
    }
}
