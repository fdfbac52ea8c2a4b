//! The injection webhook: an AdmissionReview body in (`Webhook::review`, which calls the pure
//! `inject::patch::inject`), the response review and its JSON Patch out.
//!
//! Input: the request body, as the API server would POST it. The input's length picks the
//! injector's settings (native or classic sidecars, with or without a proxy ConfigMap); the
//! namespace `meshed` has `meshlet.dev/inject: enabled`.
//!
//! Invariants checked besides "no panic":
//! - the response is an AdmissionReview v1 for the request's uid, always `allowed: true`;
//! - a patch applies (json-patch, RFC 6902) to the pod object as the API server holds it, and
//!   the patched object is still a Pod;
//! - injecting the patched pod again changes nothing (skipped: already injected);
//! - what the webhook accepts, the containers it adds accept: the init container's
//!   `MESHLET_SKIP_*` values pass `meshlet init`'s parsing, and the proxy's dependency, limit,
//!   ready-requires and app-probe variables pass the proxy's start-up parsing.
#![no_main]

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use libfuzzer_sys::fuzz_target;
use meshlet::config::Config;
use meshlet::ops::health::probes::AppProbes;
use meshlet::init::InitArgs;
use meshlet::inject::patch::{self, InjectConfig, Outcome};
use meshlet::inject::server::Webhook;
use serde_json::Value;

fn settings(pick: usize) -> InjectConfig {
    InjectConfig {
        image: "ghcr.io/meshlet/meshlet:fuzz".into(),
        init_image: (pick & 4 != 0).then(|| "ghcr.io/meshlet/meshlet-init:fuzz".into()),
        image_pull_policy: (pick & 8 != 0).then(|| "IfNotPresent".into()),
        native_sidecars: pick & 1 == 0,
        version: "0.0.0-fuzz".into(),
        proxy_config_map: (pick & 2 != 0).then(|| "meshlet-proxy".into()),
    }
}

fn namespace(name: &str) -> Option<Namespace> {
    let meshed = name == "meshed";
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name,
            "annotations": if meshed { serde_json::json!({"meshlet.dev/inject": "enabled"}) }
                           else { serde_json::json!({}) },
        }
    }))
    .ok()
}

/// The `env` of the container `name` among the patched pod's containers, as (name, value).
fn env_of(pod: &Value, name: &str) -> Vec<(String, String)> {
    let containers = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| pod.pointer(&format!("/spec/{k}"))?.as_array())
        .flatten();
    containers
        .filter(|c| c.get("name").and_then(Value::as_str) == Some(name))
        .flat_map(|c| {
            c.get("env")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|e| {
            Some((
                e.get("name")?.as_str()?.to_string(),
                e.get("value")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

fn check_env(pod: &Value, input: &str) {
    let init = env_of(pod, patch::INIT_NAME);
    let get = |env: &[(String, String)], k: &str| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    };
    let args = InitArgs {
        dry_run: true,
        proxy_uid: "7102".into(),
        inbound_port: "7143".into(),
        outbound_port: "7140".into(),
        admin_port: "7190".into(),
        grpc_port: "7191".into(),
        skip_inbound_ports: get(&init, "MESHLET_SKIP_INBOUND_PORTS").unwrap_or_default(),
        skip_outbound_ports: get(&init, "MESHLET_SKIP_OUTBOUND_PORTS").unwrap_or_default(),
        skip_outbound_cidrs: get(&init, "MESHLET_SKIP_OUTBOUND_CIDRS").unwrap_or_default(),
        ipv6: "false".into(),
    };
    if let Err(e) = args.config() {
        panic!("the webhook passed meshlet init a value it refuses: {e}\ninput: {input}");
    }

    let proxy = env_of(pod, patch::PROXY_NAME);
    let mut config =
        Config::parse("fuzz.yaml", "inbound:\n  listen: 127.0.0.1:0\n").expect("a valid config");
    if let Err(e) = config.health.add_from_env(
        get(&proxy, "MESHLET_DEPENDENCIES").as_deref(),
        get(&proxy, "MESHLET_CRITICAL_DEPENDENCIES").as_deref(),
    ) {
        panic!("the webhook passed the proxy dependencies it refuses: {e}\ninput: {input}");
    }
    let errors = meshlet::config::pod::apply_inbound_limits(&mut config, |k| get(&proxy, k));
    assert!(
        errors.is_empty(),
        "the webhook passed the proxy limits it refuses: {errors:?}\ninput: {input}"
    );
    if let Some(r) = get(&proxy, "MESHLET_READY_REQUIRES") {
        assert!(
            matches!(r.trim(), "none" | "critical"),
            "ready-requires {r:?} passed\ninput: {input}"
        );
    }
    if let Some(probes) = get(&proxy, "MESHLET_APP_PROBES") {
        if let Err(e) = AppProbes::parse(&probes).map_err(|e| (k8s_rejects(&e), e)) {
            if e.0 {
                return;
            }
            let e = e.1;
            panic!(
                "the proxy cannot read the probes the webhook handed it: {e}\n\
                 MESHLET_APP_PROBES={probes}\ninput: {input}"
            );
        }
    }
}

/// Whether an `AppProbes::parse` error is about a value the API server's validation refuses
/// in the pod anyway (it validates after the mutating webhooks): such a pod never runs, so the
/// sidecar refusing it too is no bug. Everything else the API server accepts (a path with a
/// space, say) must work in the sidecar as it does in kubelet.
fn k8s_rejects(error: &str) -> bool {
    [
        // IsHTTPHeaderName
        "is not a valid header name",
        // ports: 1-65535 or an IANA service name
        "is not a port number",
        "missing (a port number",
        // (a probe's port given as a string of digits: not an IANA service name)
        "is not a named port of the container",
        // scheme: HTTP or HTTPS
        "is not one of HTTP or HTTPS",
        // timeoutSeconds >= 0
        "is negative",
        // exactly one handler
        "more than one handler",
        // not validated by the API server, but kubelet's Go client cannot send it either
        "is not a valid header value",
    ]
    .iter()
    .any(|m| error.contains(m))
}

fuzz_target!(|data: &[u8]| {
    let cfg = settings(data.len());
    let webhook = Webhook::new(cfg.clone(), Arc::new(namespace));
    let Ok(answer) = webhook.review(data) else {
        return;
    };
    let answer = serde_json::to_value(answer).expect("a review serializes");
    let input = String::from_utf8_lossy(data);
    let review: Value = serde_json::from_slice(data).expect("review() accepted it as JSON");
    let request = &review["request"];

    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], request["uid"], "input: {input}");
    assert_eq!(response["allowed"], true, "input: {input}");
    let Some(encoded) = response.get("patch") else {
        return;
    };
    assert_eq!(response["patchType"], "JSONPatch");
    // kube's AdmissionResponse sends the bytes as a JSON array of numbers (read by the API
    // server as the same []byte as the documented base64 string).
    let bytes: Vec<u8> = serde_json::from_value(encoded.clone()).expect("the patch is bytes");
    let ops: json_patch::Patch = serde_json::from_slice(&bytes).expect("the patch is a JSON Patch");

    let mut pod = request["object"].clone();
    // The API server always sends the object with its metadata (the namespace, a name or
    // generateName); the patch may rely on it.
    if !pod["metadata"].is_object() {
        return;
    }
    if let Err(e) = json_patch::patch(&mut pod, &ops) {
        panic!(
            "the patch does not apply to the pod: {e}\npatch: {}\ninput: {input}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let typed: Pod = match serde_json::from_value(pod.clone()) {
        Ok(p) => p,
        Err(e) => panic!("the patched object is no longer a Pod: {e}\npod: {pod}\ninput: {input}"),
    };
    let ns = request["namespace"]
        .as_str()
        .filter(|n| !n.is_empty())
        .or(typed.metadata.namespace.as_deref())
        .and_then(namespace);
    match patch::inject(&typed, ns.as_ref(), &cfg) {
        Outcome::Skip(r) if r == patch::SKIP_ALREADY_INJECTED => {}
        other => panic!("injecting the patched pod again: {other:?}\ninput: {input}"),
    }
    check_env(&pod, &input);
});
