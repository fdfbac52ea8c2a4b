//! Declared protocols: what a destination says it speaks, so that detection can be skipped.
//!
//! A protocol is declared by a Kubernetes Service port (its `appProtocol`, else its name by the
//! `<protocol>[-<suffix>]` convention), by a static service's `protocol:` key, or, for opaque
//! TCP, by a list of ports (`detect.opaque_ports`, the pod or namespace annotation
//! `meshlet.dev/opaque-ports`, and `detect.server_first_ports`). The tables here are pure and
//! case-insensitive; the README's "Declaring protocols" section says them for users.

use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Deserializer};

/// What a destination declares it speaks. Skipping detection never downgrades HTTP to opaque
/// TCP: a declared HTTP port is always served as HTTP (a client that is not gets an HTTP error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclaredProtocol {
    /// HTTP, version chosen by the client: HTTP/2 when the connection opens with the HTTP/2
    /// prior-knowledge preface, else HTTP/1.x. Never opaque TCP. (`appProtocol: http`; in the
    /// config `protocol: http1`.)
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC): the client opens with the HTTP/2 preface.
    Http2,
    /// Opaque TCP, proxied at once without reading the client's first bytes (server-speaks-first
    /// protocols, TLS, databases).
    Opaque,
}

impl DeclaredProtocol {
    /// The value as written in the config file (`http1`, `http2`, `opaque`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeclaredProtocol::Http1 => "http1",
            DeclaredProtocol::Http2 => "http2",
            DeclaredProtocol::Opaque => "opaque",
        }
    }

    /// A Service port's `appProtocol` (case-insensitive): Kubernetes' own `kubernetes.io/*`
    /// names and IANA service names. `None` for a value not in the table (detect).
    pub fn from_app_protocol(value: &str) -> Option<DeclaredProtocol> {
        use DeclaredProtocol::*;
        const TABLE: &[(&str, DeclaredProtocol)] = &[
            ("http", Http1),
            // WebSocket over cleartext starts as an HTTP/1.1 request (the upgrade is proxied).
            ("kubernetes.io/ws", Http1),
            // gRPC-Web is plain HTTP/1.1 or HTTP/2 from browsers, not prior-knowledge HTTP/2.
            ("grpc-web", Http1),
            ("http2", Http2),
            ("h2c", Http2),
            ("kubernetes.io/h2c", Http2),
            ("grpc", Http2),
            ("tcp", Opaque),
            ("tls", Opaque),
            ("https", Opaque),
            ("kubernetes.io/wss", Opaque),
            ("mysql", Opaque),
            ("postgresql", Opaque),
            ("postgres", Opaque),
            ("redis", Opaque),
            ("mongo", Opaque),
            ("mongodb", Opaque),
            ("memcache", Opaque),
            ("amqp", Opaque),
            ("amqps", Opaque),
            ("kafka", Opaque),
            ("nats", Opaque),
            ("ssh", Opaque),
            ("smtp", Opaque),
            ("ldap", Opaque),
            ("ldaps", Opaque),
        ];
        let value = value.trim();
        TABLE
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(value))
            .map(|(_, p)| *p)
    }

    /// A Service port's name by the `<protocol>[-<suffix>]` convention (as Istio documents it:
    /// `http`, `http-web`, `grpc-api`, `tcp-db`, ...; `grpc-web` is a protocol of its own).
    /// `None` for any other name (detect).
    pub fn from_port_name(name: &str) -> Option<DeclaredProtocol> {
        use DeclaredProtocol::*;
        const TABLE: &[(&str, DeclaredProtocol)] = &[
            ("http", Http1),
            ("http2", Http2),
            ("grpc", Http2),
            ("tcp", Opaque),
            ("tls", Opaque),
            ("https", Opaque),
            ("mongo", Opaque),
            ("mysql", Opaque),
            ("redis", Opaque),
        ];
        let name = name.trim();
        if name
            .get(..8)
            .is_some_and(|p| p.eq_ignore_ascii_case("grpc-web"))
            && matches!(name.as_bytes().get(8), None | Some(b'-'))
        {
            return Some(Http1);
        }
        let prefix = name.split_once('-').map_or(name, |(p, _)| p);
        TABLE
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(prefix))
            .map(|(_, p)| *p)
    }

    /// A Service port's declaration: its `appProtocol` when we know the value (it wins over the
    /// name), else its name.
    pub fn of_service_port(app_protocol: Option<&str>, name: &str) -> Option<DeclaredProtocol> {
        app_protocol
            .and_then(DeclaredProtocol::from_app_protocol)
            .or_else(|| DeclaredProtocol::from_port_name(name))
    }
}

impl fmt::Display for DeclaredProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of TCP ports, written as ports and inclusive ranges: `5432,6379,8000-8010` (an
/// annotation) or `[5432, "8000-8010"]` (YAML). Kept as sorted, merged ranges: a lookup is a
/// binary search, with no allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

impl PortSet {
    /// Parses a comma-separated list of ports (1-65535) and ranges (`8000-8010`); blanks around
    /// items and empty items are ignored. The error quotes the item that is wrong.
    pub fn parse(list: &str) -> Result<PortSet, String> {
        let ranges = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(parse_item)
            .collect::<Result<_, _>>()?;
        Ok(PortSet::normalized(ranges))
    }

    /// Builds a set from single ports (e.g. `detect.server_first_ports`).
    pub fn from_ports(ports: impl IntoIterator<Item = u16>) -> PortSet {
        PortSet::normalized(ports.into_iter().map(|p| p..=p).collect())
    }

    pub fn contains(&self, port: u16) -> bool {
        // The first range ending at or after `port`; it holds `port` if it starts at or before.
        let i = self.0.partition_point(|r| *r.end() < port);
        self.0.get(i).is_some_and(|r| *r.start() <= port)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds every port of `other`.
    pub fn extend(&mut self, other: &PortSet) {
        let mut all = std::mem::take(&mut self.0);
        all.extend(other.0.iter().cloned());
        *self = PortSet::normalized(all);
    }

    /// Sorted, with overlapping and adjacent ranges merged.
    fn normalized(mut ranges: Vec<RangeInclusive<u16>>) -> PortSet {
        ranges.sort_by_key(|r| *r.start());
        let mut merged: Vec<RangeInclusive<u16>> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                // Overlapping or adjacent: one range.
                Some(last) if u32::from(*r.start()) <= u32::from(*last.end()) + 1 => {
                    if r.end() > last.end() {
                        *last = *last.start()..=*r.end();
                    }
                }
                _ => merged.push(r),
            }
        }
        merged.shrink_to_fit();
        PortSet(merged)
    }
}

impl fmt::Display for PortSet {
    /// The canonical form, e.g. `5432,8000-8010`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.start() == r.end() {
                write!(f, "{}", r.start())?;
            } else {
                write!(f, "{}-{}", r.start(), r.end())?;
            }
        }
        Ok(())
    }
}

fn parse_item(item: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|&n| n > 0);
    let range = match item.split_once('-') {
        Some((a, b)) => port(a).zip(port(b)).filter(|(a, b)| a <= b),
        None => port(item).map(|p| (p, p)),
    };
    range.map(|(a, b)| a..=b).ok_or_else(|| {
        format!("{item:?} is not a port (1-65535) or a range of ports like 8000-8010")
    })
}

/// YAML: a list whose items are ports (`5432`) or ranges (`"8000-8010"`).
impl<'de> Deserialize<'de> for PortSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Item {
            Port(i64),
            Text(String),
        }
        let ranges = Vec::<Item>::deserialize(d)?
            .into_iter()
            .map(|item| {
                let text = match item {
                    Item::Port(p) => p.to_string(),
                    Item::Text(s) => s,
                };
                parse_item(text.trim()).map_err(serde::de::Error::custom)
            })
            .collect::<Result<_, _>>()?;
        Ok(PortSet::normalized(ranges))
    }
}

#[cfg(test)]
mod tests {
    use super::DeclaredProtocol::*;
    use super::*;

    #[test]
    fn app_protocol_table() {
        for (v, want) in [
            ("http", Some(Http1)),
            ("HTTP", Some(Http1)),
            (" http ", Some(Http1)),
            ("kubernetes.io/ws", Some(Http1)),
            ("grpc-web", Some(Http1)),
            ("kubernetes.io/h2c", Some(Http2)),
            ("h2c", Some(Http2)),
            ("grpc", Some(Http2)),
            ("http2", Some(Http2)),
            ("kubernetes.io/wss", Some(Opaque)),
            ("https", Some(Opaque)),
            ("tls", Some(Opaque)),
            ("tcp", Some(Opaque)),
            ("mysql", Some(Opaque)),
            ("postgresql", Some(Opaque)),
            ("redis", Some(Opaque)),
            ("mongodb", Some(Opaque)),
            ("example.com/custom", None),
            ("http-web", None),
            ("", None),
        ] {
            assert_eq!(DeclaredProtocol::from_app_protocol(v), want, "{v:?}");
        }
    }

    #[test]
    fn port_name_convention() {
        for (v, want) in [
            ("http", Some(Http1)),
            ("http-web", Some(Http1)),
            ("http-", Some(Http1)),
            ("HTTP-Web", Some(Http1)),
            ("http2", Some(Http2)),
            ("http2-api", Some(Http2)),
            ("grpc", Some(Http2)),
            ("grpc-api", Some(Http2)),
            ("grpc-web", Some(Http1)),
            ("grpc-web-ui", Some(Http1)),
            ("grpc-webhook", Some(Http2)),
            ("tcp", Some(Opaque)),
            ("tcp-db", Some(Opaque)),
            ("tls-x", Some(Opaque)),
            ("https", Some(Opaque)),
            ("mongo", Some(Opaque)),
            ("mysql-primary", Some(Opaque)),
            ("redis", Some(Opaque)),
            ("web", None),
            ("httpapi", None),
            ("h2c", None),
            ("metrics", None),
            ("", None),
        ] {
            assert_eq!(DeclaredProtocol::from_port_name(v), want, "{v:?}");
        }
    }

    #[test]
    fn app_protocol_wins_over_the_name() {
        let of = DeclaredProtocol::of_service_port;
        assert_eq!(of(Some("kubernetes.io/h2c"), "http"), Some(Http2));
        assert_eq!(of(Some("tcp"), "http-web"), Some(Opaque));
        // An appProtocol we do not know says nothing: the name still may.
        assert_eq!(of(Some("example.com/custom"), "http-web"), Some(Http1));
        assert_eq!(of(Some("example.com/custom"), "web"), None);
        assert_eq!(of(None, "grpc"), Some(Http2));
        assert_eq!(of(None, ""), None);
    }

    #[test]
    fn port_sets_parse_merge_and_match() {
        let s = PortSet::parse(" 6379, 8000-8010,5432,,8011, 8005-8006 ").unwrap();
        assert_eq!(s.to_string(), "5432,6379,8000-8011");
        for p in [5432, 6379, 8000, 8005, 8011] {
            assert!(s.contains(p), "{p}");
        }
        for p in [1, 5431, 5433, 7999, 8012, 65535] {
            assert!(!s.contains(p), "{p}");
        }
        assert!(PortSet::parse("").unwrap().is_empty());
        let full = PortSet::parse("1-65535").unwrap();
        assert!(full.contains(1) && full.contains(65535));
        assert_eq!(PortSet::parse("65535,1").unwrap().to_string(), "1,65535");

        for (bad, item) in [
            ("5432,db", "db"),
            ("0", "0"),
            ("65536", "65536"),
            ("8010-8000", "8010-8000"),
            ("80-", "80-"),
            ("-80", "-80"),
            ("1-2-3", "1-2-3"),
            ("80 81", "80 81"),
        ] {
            let e = PortSet::parse(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("{item:?} is not a port (1-65535)")),
                "{bad}: {e}"
            );
        }

        let mut s = PortSet::from_ports([22, 21, 25]);
        assert_eq!(s.to_string(), "21-22,25");
        s.extend(&PortSet::parse("23-24").unwrap());
        assert_eq!(s.to_string(), "21-25");
    }

    #[test]
    fn port_sets_from_yaml() {
        let s: PortSet = serde_yaml::from_str("[5432, \"8000-8010\", \" 9000 \"]").unwrap();
        assert_eq!(s.to_string(), "5432,8000-8010,9000");
        let e = serde_yaml::from_str::<PortSet>("[5432, 70000]").unwrap_err();
        assert!(e.to_string().contains("\"70000\" is not a port"), "{e}");
        let e = serde_yaml::from_str::<PortSet>("[\"x-y\"]").unwrap_err();
        assert!(e.to_string().contains("\"x-y\" is not a port"), "{e}");
    }

    #[test]
    fn config_errors_name_the_key_and_the_value() {
        let err = |text: &str| {
            crate::config::Config::parse("config.yaml", text)
                .unwrap_err()
                .to_string()
        };
        let e = err("detect:\n  opaque_ports: [5432, \"8010-8000\"]\n");
        assert!(
            e.starts_with("config.yaml: detect.opaque_ports: \"8010-8000\" is not a port"),
            "{e}"
        );
        let e = err("discovery:\n  static:\n    - service: a.b\n      protocol: grpc\n");
        assert!(
            e.starts_with("config.yaml: discovery.static[0].protocol: unknown variant `grpc`")
                && e.contains("`http1`, `http2`, `opaque`"),
            "{e}"
        );
    }
}
