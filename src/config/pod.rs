//! Settings that belong to the sidecar's own pod, set by the pod's `meshlet.dev/*`
//! annotations (inbound limits, opaque ports, inbound delivery to loopback), and where its app
//! probes go. The injector copies those annotations into the sidecar's environment
//! (`MESHLET_<KEY>`), so the proxy needs no permission to read its own Pod. A bad value is
//! treated like a bad annotation on a Service: logged with the key and value, counted in
//! `meshlet_policy_errors_total{service="pod"}`, and ignored (the config file's value stays).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::policy::AnnotationError;
use crate::config::{
    AppHost, CONCURRENCY_LIMIT, Config, InboundConfig, RATE_LIMIT, RATE_LIMIT_BURST,
};

/// The pod annotations carried in the environment: (annotation, environment variable).
pub const POD_ENV: &[(&str, &str)] = &[
    ("meshlet.dev/concurrency-limit", "MESHLET_CONCURRENCY_LIMIT"),
    ("meshlet.dev/rate-limit", "MESHLET_RATE_LIMIT"),
    ("meshlet.dev/rate-limit-burst", "MESHLET_RATE_LIMIT_BURST"),
];

/// The pod's (or its namespace's) `meshlet.dev/opaque-ports`, as the injector passes it.
pub const OPAQUE_PORTS: (&str, &str) = ("meshlet.dev/opaque-ports", "MESHLET_OPAQUE_PORTS");

/// The pod's `meshlet.dev/inbound-to-loopback`, as the injector passes it: the opt-out of
/// inbound delivery to the pod's own address (see `inbound.app_host`).
pub const INBOUND_TO_LOOPBACK: (&str, &str) = (
    "meshlet.dev/inbound-to-loopback",
    "MESHLET_INBOUND_TO_LOOPBACK",
);

/// Every pod setting carried in the environment: the inbound limits, the opaque ports and
/// inbound delivery to loopback. Returns the values that could not be used.
pub fn apply(config: &mut Config, get: impl Fn(&str) -> Option<String>) -> Vec<AnnotationError> {
    let mut errors = apply_inbound_limits(config, &get);
    errors.extend(apply_opaque_ports(config, &get));
    errors.extend(apply_inbound_to_loopback(config, &get));
    errors
}

/// `MESHLET_INBOUND_TO_LOOPBACK`: `true` sets `inbound.app_host` to `loopback` (when there is
/// an inbound section); `false` leaves the file's choice.
pub fn apply_inbound_to_loopback(
    config: &mut Config,
    get: impl Fn(&str) -> Option<String>,
) -> Vec<AnnotationError> {
    let (annotation, var) = INBOUND_TO_LOOPBACK;
    let (Some(inbound), Some(value)) = (config.inbound.as_mut(), get(var)) else {
        return Vec::new();
    };
    match inbound_to_loopback(&value) {
        Ok(true) => inbound.app_host = AppHost::Loopback,
        Ok(false) => {}
        Err(error) => {
            return vec![AnnotationError {
                key: annotation.to_string(),
                value,
                error,
            }];
        }
    }
    Vec::new()
}

/// `meshlet.dev/inbound-to-loopback`: `true` or `false`.
pub fn inbound_to_loopback(v: &str) -> Result<bool, String> {
    match v.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{v:?} is not true or false")),
    }
}

/// The address meshlet runs the app's kubelet probes against (`/app-health`): the address the
/// inbound listener delivers to, so that a probe reaches the app where its callers do. By
/// default that is the pod's own address (`POD_IP`, which the injector passes from
/// `status.podIP`), the very address kubelet probes when the pod is not meshed: a port the app
/// binds to loopback only fails its probe as it would without meshlet. Outside a pod (no
/// `POD_IP`), 127.0.0.1. With `loopback` (the opt-out), loopback of the pod's family.
pub fn probe_host(inbound: Option<&InboundConfig>, pod_ip: Option<IpAddr>) -> IpAddr {
    let app_host = inbound.map_or(AppHost::OriginalDst, |i| i.app_host);
    let loopback = match pod_ip {
        Some(IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    match app_host {
        AppHost::Ip(ip) => ip,
        AppHost::Loopback => loopback,
        AppHost::OriginalDst => pod_ip.unwrap_or(loopback),
    }
}

/// Adds the ports of `MESHLET_OPAQUE_PORTS` (ports and ranges, `5432,8000-8010`) to
/// `detect.opaque_ports`; a bad list is reported whole and none of it is used.
pub fn apply_opaque_ports(
    config: &mut Config,
    get: impl Fn(&str) -> Option<String>,
) -> Vec<AnnotationError> {
    let (annotation, var) = OPAQUE_PORTS;
    let Some(value) = get(var) else {
        return Vec::new();
    };
    match crate::discovery::PortSet::parse(&value) {
        Ok(ports) => {
            config.detect.opaque_ports.extend(&ports);
            Vec::new()
        }
        Err(why) => vec![AnnotationError {
            key: annotation.to_string(),
            value,
            error: format!("not a comma-separated list of ports and ranges: {why}"),
        }],
    }
}

/// Applies the pod's inbound limits from `get(env var)` to the config's `inbound` section
/// (when there is one); returns the values that could not be used.
pub fn apply_inbound_limits(
    config: &mut Config,
    get: impl Fn(&str) -> Option<String>,
) -> Vec<AnnotationError> {
    let mut errors = Vec::new();
    let Some(inbound) = config.inbound.as_mut() else {
        return errors;
    };
    for (annotation, var) in POD_ENV {
        let Some(value) = get(var) else { continue };
        let result = match *var {
            "MESHLET_CONCURRENCY_LIMIT" => {
                concurrency_limit(&value).map(|n| inbound.concurrency_limit = Some(n))
            }
            "MESHLET_RATE_LIMIT" => rate_limit(&value).map(|r| inbound.rate_limit = Some(r)),
            _ => rate_limit_burst(&value).map(|n| inbound.rate_limit_burst = Some(n)),
        };
        if let Err(error) = result {
            errors.push(AnnotationError {
                key: annotation.to_string(),
                value,
                error,
            });
        }
    }
    errors
}

/// `meshlet.dev/concurrency-limit`: the range of `inbound.concurrency_limit`.
pub fn concurrency_limit(v: &str) -> Result<u32, String> {
    let n = whole(v)?;
    CONCURRENCY_LIMIT.bound.count(u64::from(n))?;
    Ok(n)
}

/// `meshlet.dev/rate-limit`: the range of `inbound.rate_limit`.
pub fn rate_limit(v: &str) -> Result<f64, String> {
    let r = v
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("{v:?} is not a number of requests per second"))?;
    RATE_LIMIT.bound.number(r)?;
    Ok(r)
}

/// `meshlet.dev/rate-limit-burst`: the range of `inbound.rate_limit_burst`.
pub fn rate_limit_burst(v: &str) -> Result<u32, String> {
    let n = whole(v)?;
    RATE_LIMIT_BURST.bound.count(u64::from(n))?;
    Ok(n)
}

fn whole(v: &str) -> Result<u32, String> {
    v.trim()
        .parse::<u32>()
        .map_err(|_| format!("{v:?} is not a whole number of requests"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn pod_limits_override_the_file_and_bad_values_are_reported() {
        let mut c = Config::parse("c.yaml", "inbound:\n  concurrency_limit: 50\n").unwrap();
        let errors = apply_inbound_limits(
            &mut c,
            env(&[
                ("MESHLET_CONCURRENCY_LIMIT", "10"),
                ("MESHLET_RATE_LIMIT", "fast"),
                ("MESHLET_RATE_LIMIT_BURST", "20"),
            ]),
        );
        let i = c.inbound.unwrap();
        assert_eq!(i.concurrency_limit, Some(10));
        assert_eq!(i.rate_limit, None, "a bad value leaves the file's (none)");
        assert_eq!(i.rate_limit_burst, Some(20));
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "meshlet.dev/rate-limit");
        assert_eq!(errors[0].value, "fast");
    }

    #[test]
    fn opaque_ports_add_to_the_file_and_a_bad_list_is_reported() {
        let mut c = Config::parse("c.yaml", "detect:\n  opaque_ports: [5432]\n").unwrap();
        let errors = apply(&mut c, env(&[("MESHLET_OPAQUE_PORTS", "6379, 8000-8010")]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(c.detect.opaque_ports.to_string(), "5432,6379,8000-8010");

        let mut c = Config::parse("c.yaml", "detect:\n  opaque_ports: [5432]\n").unwrap();
        let errors = apply(&mut c, env(&[("MESHLET_OPAQUE_PORTS", "6379,db")]));
        assert_eq!(
            c.detect.opaque_ports.to_string(),
            "5432",
            "the file's stays"
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "meshlet.dev/opaque-ports");
        assert_eq!(errors[0].value, "6379,db");
        assert!(
            errors[0].error.contains("\"db\" is not a port"),
            "{}",
            errors[0].error
        );
    }

    #[test]
    fn inbound_to_loopback_is_the_opt_out_of_original_destination_delivery() {
        let parse = |t| Config::parse("c.yaml", t).unwrap();
        let mut c = parse("inbound: {}\n");
        assert!(apply(&mut c, env(&[])).is_empty());
        assert_eq!(c.inbound.as_ref().unwrap().app_host, AppHost::OriginalDst);
        apply(&mut c, env(&[("MESHLET_INBOUND_TO_LOOPBACK", " true ")]));
        assert_eq!(c.inbound.as_ref().unwrap().app_host, AppHost::Loopback);

        // "false" keeps the file's choice; anything else is reported and ignored.
        let mut c = parse("inbound:\n  app_host: 198.18.0.9\n");
        apply(&mut c, env(&[("MESHLET_INBOUND_TO_LOOPBACK", "false")]));
        let fixed = AppHost::Ip("198.18.0.9".parse().unwrap());
        assert_eq!(c.inbound.as_ref().unwrap().app_host, fixed);
        let errors = apply(&mut c, env(&[("MESHLET_INBOUND_TO_LOOPBACK", "yes")]));
        assert_eq!(c.inbound.as_ref().unwrap().app_host, fixed);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "meshlet.dev/inbound-to-loopback");
        assert_eq!(errors[0].error, "\"yes\" is not true or false");
    }

    #[test]
    fn probes_go_where_inbound_traffic_goes() {
        let pod4: IpAddr = "198.18.0.1".parse().unwrap();
        let pod6: IpAddr = "2001:2::1".parse().unwrap();
        let inbound = |t: &str| Config::parse("c.yaml", t).unwrap().inbound;
        let default = inbound("inbound: {}\n");
        assert_eq!(probe_host(default.as_ref(), Some(pod4)), pod4);
        assert_eq!(probe_host(None, Some(pod6)), pod6);
        assert_eq!(probe_host(default.as_ref(), None).to_string(), "127.0.0.1");
        let lo = inbound("inbound:\n  app_host: loopback\n");
        assert_eq!(probe_host(lo.as_ref(), Some(pod4)).to_string(), "127.0.0.1");
        assert_eq!(probe_host(lo.as_ref(), Some(pod6)).to_string(), "::1");
        let fixed = inbound("inbound:\n  app_host: 198.18.0.7\n");
        assert_eq!(
            probe_host(fixed.as_ref(), Some(pod4)).to_string(),
            "198.18.0.7"
        );
    }

    #[test]
    fn without_an_inbound_listener_nothing_applies() {
        let mut c = Config::parse("c.yaml", "").unwrap();
        assert!(
            apply_inbound_limits(&mut c, env(&[("MESHLET_CONCURRENCY_LIMIT", "0")])).is_empty()
        );
        assert!(c.inbound.is_none());
    }

    #[test]
    fn pod_limits_use_the_ranges_of_the_config_keys() {
        let mut c = Config::parse("c.yaml", "inbound:\n  concurrency_limit: 50\n").unwrap();
        let errors = apply_inbound_limits(
            &mut c,
            env(&[
                ("MESHLET_CONCURRENCY_LIMIT", "0"),
                ("MESHLET_RATE_LIMIT", "inf"),
                ("MESHLET_RATE_LIMIT_BURST", "2000000000"),
            ]),
        );
        let got: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.key.as_str(), e.error.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "meshlet.dev/concurrency-limit",
                    "0 is out of range (allowed: 1 to 1000000)"
                ),
                (
                    "meshlet.dev/rate-limit",
                    "inf is out of range (allowed: above 0, up to 1000000000)"
                ),
                (
                    "meshlet.dev/rate-limit-burst",
                    "2000000000 is out of range (allowed: 1 to 1000000000)"
                ),
            ]
        );
        let i = c.inbound.unwrap();
        assert_eq!(i.concurrency_limit, Some(50), "the file's value stays");
        assert_eq!((i.rate_limit, i.rate_limit_burst), (None, None));
        // The same values in the file are refused at start.
        for (text, want) in [
            (
                "inbound:\n  concurrency_limit: 0\n",
                "c.yaml: inbound.concurrency_limit: 0 is out of range (allowed: 1 to 1000000)",
            ),
            (
                "inbound:\n  rate_limit: .inf\n",
                "c.yaml: inbound.rate_limit: inf is out of range (allowed: above 0, up to 1000000000)",
            ),
        ] {
            assert_eq!(Config::parse("c.yaml", text).unwrap_err().to_string(), want);
        }
    }
}
