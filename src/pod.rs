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
    fn without_an_inbound_listener_nothing_applies() {
        let mut c = Config::parse("c.yaml", "").unwrap();
        assert!(
            apply_inbound_limits(&mut c, env(&[("MESHLET_CONCURRENCY_LIMIT", "0")])).is_empty()
        );
        assert!(c.inbound.is_none());
    }
}
