//! Settings that belong to the sidecar's own pod, set by the pod's `meshlet.dev/*`
//! annotations. The injector copies those annotations into the sidecar's environment
//! (`MESHLET_<KEY>`), so the proxy needs no permission to read its own Pod. A bad value is
//! treated like a bad annotation on a Service: logged with the key and value, counted in
//! `meshlet_policy_errors_total{service="pod"}`, and ignored (the config file's value stays).

use crate::config::Config;
use crate::policy::AnnotationError;

/// The pod annotations carried in the environment: (annotation, environment variable).
pub const POD_ENV: &[(&str, &str)] = &[
    ("meshlet.dev/concurrency-limit", "MESHLET_CONCURRENCY_LIMIT"),
    ("meshlet.dev/rate-limit", "MESHLET_RATE_LIMIT"),
    ("meshlet.dev/rate-limit-burst", "MESHLET_RATE_LIMIT_BURST"),
];

/// The pod's (or its namespace's) `meshlet.dev/opaque-ports`, as the injector passes it.
pub const OPAQUE_PORTS: (&str, &str) = ("meshlet.dev/opaque-ports", "MESHLET_OPAQUE_PORTS");

/// Every pod setting carried in the environment: the inbound limits and the opaque ports.
/// Returns the values that could not be used.
pub fn apply(config: &mut Config, get: impl Fn(&str) -> Option<String>) -> Vec<AnnotationError> {
    let mut errors = apply_inbound_limits(config, &get);
    errors.extend(apply_opaque_ports(config, &get));
    errors
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
        let v = value.trim();
        let bad = |why: &str| AnnotationError {
            key: annotation.to_string(),
            value: value.clone(),
            error: why.to_string(),
        };
        match *var {
            "MESHLET_CONCURRENCY_LIMIT" => match v.parse::<u32>() {
                Ok(n) if n > 0 => inbound.concurrency_limit = Some(n),
                _ => errors.push(bad("not a positive whole number of requests")),
            },
            "MESHLET_RATE_LIMIT" => match v.parse::<f64>() {
                Ok(r) if r > 0.0 && r.is_finite() => inbound.rate_limit = Some(r),
                _ => errors.push(bad("not a positive rate (requests per second)")),
            },
            _ => match v.parse::<u32>() {
                Ok(n) if n > 0 => inbound.rate_limit_burst = Some(n),
                _ => errors.push(bad("not a positive whole number of requests")),
            },
        }
    }
    errors
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
    fn without_an_inbound_listener_nothing_applies() {
        let mut c = Config::parse("c.yaml", "").unwrap();
        assert!(
            apply_inbound_limits(&mut c, env(&[("MESHLET_CONCURRENCY_LIMIT", "0")])).is_empty()
        );
        assert!(c.inbound.is_none());
    }
}
