//! Annotation and pod-environment parsing: the `meshlet.dev/*` policy annotations of a Service
//! (`policy::PolicySpec::from_annotations`) and the values the injector hands the sidecar in
//! its environment (`pod::apply_inbound_limits`, `HealthConfig::add_from_env`,
//! `MESHLET_READY_REQUIRES`, `AppProbes::parse` of `MESHLET_APP_PROBES`).
//!
//! Input: text, one `key=value` per line. Keys starting with `MESHLET_` are environment
//! variables, any other key is an annotation (`meshlet.dev/timeout=2s`).
//!
//! Invariants checked besides "no panic":
//! - every reported annotation error names a `meshlet.dev/` key of the input and its value;
//! - a policy value reads the same as an annotation and in the config file (the module's
//!   promise): for each annotation, `from_annotations` accepts it exactly when the YAML key
//!   with the same (quoted) value parses, and both give the same policy;
//! - limits taken from the environment are positive (and finite), dependencies are listed once.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use meshlet::config::Config;
use meshlet::ops::health::probes::AppProbes;
use meshlet::config::policy::{ANNOTATION_PREFIX, KEYS, PolicySpec};

/// Keys read natively by YAML (numbers and booleans), not through the value types' `FromStr`:
/// `max_retries: "3"` is a string there, while the annotation `"3"` is a number.
const NATIVE_YAML: &[&str] = &[
    "max_retries",
    "retry_budget_min",
    "breaker_failures",
    "breaker_min_requests",
    "breaker_latency_factor",
    "dedup",
    "dedup_max_waiters",
];

fn annotations(ann: &BTreeMap<String, String>) {
    let (spec, errors) = PolicySpec::from_annotations(ann);
    for e in &errors {
        assert!(e.key.starts_with(ANNOTATION_PREFIX), "{e}");
        assert_eq!(ann.get(&e.key), Some(&e.value), "{e}");
        assert!(!e.error.is_empty(), "{e}");
    }
    let _ = spec.resolve();
    let _ = PolicySpec::default().overlay(&spec).resolve();

    for (k, v) in ann {
        let Some(key) = k.strip_prefix(ANNOTATION_PREFIX) else {
            continue;
        };
        let Some((_, yaml_key, _)) = KEYS.iter().find(|(a, _, _)| *a == key) else {
            continue;
        };
        if NATIVE_YAML.contains(yaml_key) {
            continue;
        }
        let one = BTreeMap::from([(k.clone(), v.clone())]);
        let (from_annotation, errors) = PolicySpec::from_annotations(&one);
        let value = serde_yaml::to_string(v.trim()).expect("a string serializes");
        let yaml = format!("{yaml_key}: {value}");
        // The config file checks ranges after parsing (`validate`), as the annotations do.
        let from_yaml = serde_yaml::from_str::<PolicySpec>(&yaml)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                p.validate()
                    .map(|()| p)
                    .map_err(|(k, e)| format!("{k}: {e}"))
            });
        match (&from_yaml, errors.is_empty()) {
            (Ok(y), true) => assert_eq!(
                *y, from_annotation,
                "{k}={v:?} reads differently in YAML:\n{yaml}"
            ),
            (Err(_), false) => {}
            (Ok(_), false) => panic!(
                "{k}={v:?} is refused as an annotation ({}) but accepted in YAML:\n{yaml}",
                errors[0]
            ),
            (Err(e), true) => {
                panic!("{k}={v:?} is accepted as an annotation but refused in YAML ({e}):\n{yaml}")
            }
        }
    }
}

fn environment(env: &BTreeMap<String, String>) {
    let get = |k: &str| env.get(k).cloned();
    let mut config =
        Config::parse("fuzz.yaml", "inbound:\n  listen: 127.0.0.1:0\n").expect("a valid config");
    let errors = meshlet::config::pod::apply_inbound_limits(&mut config, get);
    for e in &errors {
        assert!(e.key.starts_with(ANNOTATION_PREFIX), "{e}");
    }
    let inbound = config.inbound.as_ref().expect("the inbound section");
    assert!(inbound.concurrency_limit.is_none_or(|n| n > 0));
    assert!(inbound.rate_limit_burst.is_none_or(|n| n > 0));
    assert!(inbound.rate_limit.is_none_or(|r| r > 0.0 && r.is_finite()));

    let deps = get("MESHLET_DEPENDENCIES");
    let critical = get("MESHLET_CRITICAL_DEPENDENCIES");
    if config
        .health
        .add_from_env(deps.as_deref(), critical.as_deref())
        .is_ok()
    {
        let declared = config.health.declared();
        for (i, d) in declared.iter().enumerate() {
            assert!(!declared[..i].contains(d), "{d} declared twice");
        }
    }
    if let Some(probes) = get("MESHLET_APP_PROBES") {
        if let Ok(p) = AppProbes::parse(&probes) {
            for (container, probe) in p.list() {
                let check = p.check(container, probe).expect("a listed probe exists");
                let _ = check.timeout();
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut ann = BTreeMap::new();
    let mut env = BTreeMap::new();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.starts_with("MESHLET_") {
            env.insert(k.to_string(), v.to_string());
        } else {
            ann.insert(k.to_string(), v.to_string());
        }
    }
    annotations(&ann);
    environment(&env);
});
