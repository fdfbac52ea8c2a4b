//! The injection itself: a pure function from a pod (and its namespace) to the RFC 6902 JSON
//! Patch that meshes it, or the reason it is left alone.
//!
//! What the patch does (the README's "meshlet inject" section says it for users):
//!
//! - adds the init container `meshlet-init` (`meshlet init`, NET_ADMIN and NET_RAW only, as
//!   root) first among the init containers, with the skip ports and CIDRs from the annotations;
//! - adds the sidecar `meshlet-proxy` (`meshlet proxy`, UID 7102, non-root, read-only root
//!   filesystem, every capability dropped): a native sidecar (an init container with
//!   `restartPolicy: Always` right after `meshlet-init`, with a startup probe on `/ready`), or in
//!   classic mode the first regular container, with a `postStart` hook waiting for `/ready`;
//! - rewrites the app containers' `httpGet`, `tcpSocket` and `grpc` probes to the sidecar's
//!   `/app-health/<container>/<livez|readyz|startupz>` and hands the originals to the sidecar in
//!   `MESHLET_APP_PROBES` (`exec` probes stay as they are);
//! - records `meshlet.dev/injected: "true"` and `meshlet.dev/version`.
//!
//! A bad annotation value never rejects a pod: it becomes a warning (naming the key and the
//! value) and the default is used.

use std::collections::BTreeMap;
use std::net::IpAddr;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{Map, Value, json};

use crate::config::ServiceName;

/// The annotation that asks for injection (`enabled`) or refuses it (`disabled`).
pub const ANNOTATION_INJECT: &str = "meshlet.dev/inject";
/// Set on an injected pod; its presence makes injection a no-op.
pub const ANNOTATION_INJECTED: &str = "meshlet.dev/injected";
/// The meshlet version that injected the pod.
pub const ANNOTATION_VERSION: &str = "meshlet.dev/version";

pub const INIT_NAME: &str = "meshlet-init";
pub const PROXY_NAME: &str = "meshlet-proxy";
pub const PROXY_UID: i64 = 7102;
pub const OUTBOUND_PORT: i32 = 7140;
pub const INBOUND_PORT: i32 = 7143;
pub const ADMIN_PORT: i32 = 7190;
pub const GRPC_HEALTH_PORT: i32 = 7191;

/// Skip reasons (also the `reason` label of the skip metric).
pub const SKIP_ALREADY_INJECTED: &str = "already injected";
pub const SKIP_HOST_NETWORK: &str = "host network";
pub const SKIP_OPTED_OUT: &str = "opted out";
pub const SKIP_NOT_OPTED_IN: &str = "not opted in";
pub const SKIP_INVALID_INJECT: &str = "invalid meshlet.dev/inject value";
/// A pod without containers (or without a spec) is not valid; the patch would not apply to it.
pub const SKIP_NO_CONTAINERS: &str = "no containers";

const DEFAULT_CPU_REQUEST: &str = "10m";
const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
const DEFAULT_MEMORY_LIMIT: &str = "64Mi";

/// How to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    /// The meshlet image of the sidecar (and of the init container unless `init_image`).
    pub image: String,
    /// The init container's image, when it differs: the published sidecar image is `FROM
    /// scratch` (no iptables), so the chart points this at the `meshlet-init` image.
    pub init_image: Option<String>,
    /// `imagePullPolicy` of both containers; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Native sidecar (init container with `restartPolicy: Always`, Kubernetes 1.29+) or the
    /// classic first regular container.
    pub native_sidecars: bool,
    /// Recorded in `meshlet.dev/version`.
    pub version: String,
    /// A ConfigMap (in the pod's namespace) with the proxy's config file under the key
    /// `config.yaml`: mounted at `/etc/meshlet` and named in `MESHLET_CONFIG`. `None`: the
    /// proxy runs on its defaults.
    pub proxy_config_map: Option<String>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            image: format!("ghcr.io/meshlet/meshlet:{}", crate::VERSION),
            init_image: None,
            image_pull_policy: None,
            native_sidecars: true,
            version: crate::VERSION.to_string(),
            proxy_config_map: None,
        }
    }
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The JSON Patch and the warnings (bad annotation values, conflicts).
    Patch(Patch, Vec<String>),
    /// Leave the pod alone, for this reason (one of the `SKIP_*` constants).
    Skip(String),
}

fn annotations_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> BTreeMap<String, String> {
    meta.annotations.clone().unwrap_or_default()
}

/// Decides and builds the patch for `pod` (see the module doc). Pure: same input, same output.
pub fn inject(pod: &Pod, namespace: Option<&Namespace>, cfg: &InjectConfig) -> Outcome {
    let ann = annotations_of(&pod.metadata);
    let spec = pod.spec.clone().unwrap_or_default();

    let has_container = |name: &str| {
        spec.containers.iter().any(|c| c.name == name)
            || spec
                .init_containers
                .iter()
                .flatten()
                .any(|c| c.name == name)
    };
    if ann.contains_key(ANNOTATION_INJECTED)
        || has_container(PROXY_NAME)
        || has_container(INIT_NAME)
    {
        return Outcome::Skip(SKIP_ALREADY_INJECTED.into());
    }
    match ann.get(ANNOTATION_INJECT).map(|v| v.trim()) {
        Some("enabled") => {}
        Some("disabled") => return Outcome::Skip(SKIP_OPTED_OUT.into()),
        Some(_) => return Outcome::Skip(SKIP_INVALID_INJECT.into()),
        None => {
            let ns_enabled = namespace
                .map(|n| annotations_of(&n.metadata))
                .is_some_and(|a| a.get(ANNOTATION_INJECT).map(|v| v.trim()) == Some("enabled"));
            if !ns_enabled {
                return Outcome::Skip(SKIP_NOT_OPTED_IN.into());
            }
        }
    }
    if spec.host_network == Some(true) {
        return Outcome::Skip(SKIP_HOST_NETWORK.into());
    }
    // Found by fuzz/ (admission): without `spec` or `spec.containers` the patch's paths
    // (`/spec/initContainers`, `/spec/containers/0`) do not exist and the API server would fail
    // the request on the patch instead of naming what is wrong with the pod.
    if spec.containers.is_empty() {
        return Outcome::Skip(SKIP_NO_CONTAINERS.into());
    }

    let pod_json = serde_json::to_value(pod).unwrap_or(Value::Null);
    let ns_ann = namespace
        .map(|n| annotations_of(&n.metadata))
        .unwrap_or_default();
    let mut b = Builder {
        ann: &ann,
        ns_ann: &ns_ann,
        warnings: Vec::new(),
    };
    let mut ops = Vec::new();

    // 1. The app containers' probes, at their original indices (before any insertion).
    let containers = pod_json
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut app_probes = Map::new();
    for (i, c) in containers.iter().enumerate() {
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        for p in [OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT, GRPC_HEALTH_PORT] {
            let clash = c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|cp| cp.get("containerPort").and_then(Value::as_i64) == Some(p.into()));
            if clash {
                b.warnings.push(format!(
                    "container {name:?} declares port {p}, which the meshlet sidecar uses"
                ));
            }
        }
        let ports: Map<String, Value> = c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|cp| {
                Some((
                    cp.get("name")?.as_str()?.to_string(),
                    cp.get("containerPort")?.clone(),
                ))
            })
            .collect();
        let mut entry = Map::new();
        for (field, key) in [
            ("livenessProbe", "livez"),
            ("readinessProbe", "readyz"),
            ("startupProbe", "startupz"),
        ] {
            let Some(probe) = c.get(field).and_then(Value::as_object) else {
                continue;
            };
            if !["httpGet", "tcpSocket", "grpc"]
                .iter()
                .any(|h| probe.contains_key(*h))
            {
                continue; // exec (or nothing): stays on the container
            }
            if let Some(missing) = unresolved_named_port(probe, &ports) {
                b.warnings.push(format!(
                    "container {name:?}: the {field} names port {missing:?}, which the container \
                     does not declare; the probe is left as it is"
                ));
                continue;
            }
            let mut rewritten: Map<String, Value> = probe
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "httpGet" | "tcpSocket" | "grpc" | "exec"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            rewritten.insert(
                "httpGet".into(),
                json!({
                    "path": format!("/app-health/{name}/{key}"),
                    "port": ADMIN_PORT,
                    "scheme": "HTTP",
                }),
            );
            ops.push(PatchOperation::Replace(ReplaceOperation {
                path: PointerBuf::from_tokens(["spec", "containers", &i.to_string(), field]),
                value: Value::Object(rewritten),
            }));
            entry.insert(key.into(), Value::Object(probe.clone()));
        }
        if !entry.is_empty() {
            if !ports.is_empty() {
                entry.insert("ports".into(), Value::Object(ports));
            }
            app_probes.insert(name.to_string(), Value::Object(entry));
        }
    }

    // 2. The init container and (native mode) the sidecar, first among the init containers.
    let init = b.init_container(cfg);
    let proxy = b.proxy_container(cfg, &app_probes);
    let has_inits = pod_json
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .is_some();
    let mut first_inits = vec![init];
    if cfg.native_sidecars {
        first_inits.push(proxy.clone());
    }
    if has_inits {
        for (i, c) in first_inits.into_iter().enumerate() {
            ops.push(add(["spec", "initContainers", &i.to_string()], c));
        }
    } else {
        ops.push(add(["spec", "initContainers"], first_inits.into()));
    }
    // 3. Classic mode: the sidecar first among the regular containers.
    if !cfg.native_sidecars {
        ops.push(add(["spec", "containers", "0"], proxy));
    }
    // 4. The proxy's config, when there is one.
    if let Some(cm) = &cfg.proxy_config_map {
        let volume =
            json!({"name": "meshlet-config", "configMap": {"name": cm, "optional": false}});
        if pod_json
            .pointer("/spec/volumes")
            .and_then(Value::as_array)
            .is_some()
        {
            ops.push(add(["spec", "volumes", "-"], volume));
        } else {
            ops.push(add(["spec", "volumes"], json!([volume])));
        }
    }
    // 5. The record of the injection.
    if pod_json
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some()
    {
        for (k, v) in [
            (ANNOTATION_INJECTED, "true"),
            (ANNOTATION_VERSION, cfg.version.as_str()),
        ] {
            ops.push(add(["metadata", "annotations", k], v.into()));
        }
    } else {
        ops.push(add(
            ["metadata", "annotations"],
            json!({ANNOTATION_INJECTED: "true", ANNOTATION_VERSION: cfg.version}),
        ));
    }
    Outcome::Patch(Patch(ops), b.warnings)
}

/// An `add` at the path of these (unescaped) tokens.
fn add<'t>(tokens: impl IntoIterator<Item = &'t str>, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens),
        value,
    })
}

/// The name of a probe's named port that the container does not declare, if any.
fn unresolved_named_port(probe: &Map<String, Value>, ports: &Map<String, Value>) -> Option<String> {
    ["httpGet", "tcpSocket"]
        .iter()
        .filter_map(|h| probe.get(*h)?.get("port")?.as_str())
        .find(|name| name.parse::<u16>().is_err() && !ports.contains_key(*name))
        .map(str::to_string)
}

struct Builder<'a> {
    ann: &'a BTreeMap<String, String>,
    /// The namespace's annotations, for the keys a namespace may set for all its pods.
    ns_ann: &'a BTreeMap<String, String>,
    warnings: Vec<String>,
}

impl Builder<'_> {
    /// The annotation's trimmed value, if set and not empty.
    fn get(&self, key: &str) -> Option<String> {
        self.ann
            .get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// The annotation's value when `check` accepts it; otherwise a warning and `None`.
    fn valid(&mut self, key: &str, check: impl Fn(&str) -> Result<(), String>) -> Option<String> {
        let v = self.get(key)?;
        match check(&v) {
            Ok(()) => Some(v),
            Err(why) => {
                self.warnings.push(format!(
                    "annotation {key}: {v:?} {why}; the default is used"
                ));
                None
            }
        }
    }

    /// A key a namespace may set for all its pods: the pod's valid value, else the namespace's
    /// valid value (each bad one is a warning naming where it is set).
    fn valid_pod_or_namespace(
        &mut self,
        key: &str,
        check: impl Fn(&str) -> Result<(), String>,
    ) -> Option<String> {
        let ns = self
            .ns_ann
            .get(key)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
        if let Some(v) = self.get(key) {
            match check(&v) {
                Ok(()) => return Some(v),
                Err(why) => self.warnings.push(format!(
                    "annotation {key}: {v:?} {why}; {}",
                    if ns.is_some() {
                        "the namespace's value is used"
                    } else {
                        "the default is used"
                    }
                )),
            }
        }
        let v = ns?;
        match check(&v) {
            Ok(()) => Some(v),
            Err(why) => {
                self.warnings.push(format!(
                    "namespace annotation {key}: {v:?} {why}; the default is used"
                ));
                None
            }
        }
    }

    fn image_fields(&self, image: &str, cfg: &InjectConfig, c: &mut Map<String, Value>) {
        c.insert("image".into(), image.into());
        if let Some(p) = &cfg.image_pull_policy {
            c.insert("imagePullPolicy".into(), p.clone().into());
        }
    }

    fn init_container(&mut self, cfg: &InjectConfig) -> Value {
        let mut env = Vec::new();
        for (key, var, check) in [
            (
                "meshlet.dev/skip-inbound-ports",
                "MESHLET_SKIP_INBOUND_PORTS",
                check_ports as fn(&str) -> Result<(), String>,
            ),
            (
                "meshlet.dev/skip-outbound-ports",
                "MESHLET_SKIP_OUTBOUND_PORTS",
                check_ports,
            ),
            (
                "meshlet.dev/skip-outbound-cidrs",
                "MESHLET_SKIP_OUTBOUND_CIDRS",
                check_cidrs,
            ),
        ] {
            if let Some(v) = self.valid(key, check) {
                env.push(json!({"name": var, "value": normalize_list(&v)}));
            }
        }
        let mut c = Map::new();
        c.insert("name".into(), INIT_NAME.into());
        let image = cfg.init_image.as_deref().unwrap_or(&cfg.image);
        self.image_fields(image, cfg, &mut c);
        c.insert("command".into(), json!(["meshlet"]));
        c.insert("args".into(), json!(["init"]));
        if !env.is_empty() {
            c.insert("env".into(), Value::Array(env));
        }
        c.insert(
            "resources".into(),
            json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}),
        );
        c.insert(
            "securityContext".into(),
            json!({
                "allowPrivilegeEscalation": false,
                "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                "privileged": false,
                "runAsNonRoot": false,
                "runAsUser": 0,
                "runAsGroup": 0,
            }),
        );
        Value::Object(c)
    }

    fn proxy_container(&mut self, cfg: &InjectConfig, app_probes: &Map<String, Value>) -> Value {
        let mut env = vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
            field_env("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ];
        let list = [
            // The proxy's log filter (tracing's EnvFilter reads RUST_LOG).
            (
                "meshlet.dev/log-level",
                "RUST_LOG",
                check_log as fn(&str) -> Result<(), String>,
            ),
            (
                "meshlet.dev/dependencies",
                "MESHLET_DEPENDENCIES",
                check_services,
            ),
            (
                "meshlet.dev/critical-dependencies",
                "MESHLET_CRITICAL_DEPENDENCIES",
                check_services,
            ),
            (
                "meshlet.dev/ready-requires",
                "MESHLET_READY_REQUIRES",
                check_ready_requires,
            ),
            (
                "meshlet.dev/concurrency-limit",
                "MESHLET_CONCURRENCY_LIMIT",
                check_concurrency_limit,
            ),
            (
                "meshlet.dev/rate-limit",
                "MESHLET_RATE_LIMIT",
                check_rate_limit,
            ),
            (
                "meshlet.dev/rate-limit-burst",
                "MESHLET_RATE_LIMIT_BURST",
                check_rate_limit_burst,
            ),
            // The opt-out of inbound delivery to the pod's address: see crate::config::pod.
            (
                crate::config::pod::INBOUND_TO_LOOPBACK.0,
                crate::config::pod::INBOUND_TO_LOOPBACK.1,
                check_inbound_to_loopback,
            ),
        ];
        for (key, var, check) in list {
            if let Some(v) = self.valid(key, check) {
                env.push(json!({"name": var, "value": v}));
            }
        }
        // Opaque ports: the pod's, else its namespace's.
        let (key, var) = crate::config::pod::OPAQUE_PORTS;
        if let Some(v) = self.valid_pod_or_namespace(key, check_ports) {
            env.push(json!({"name": var, "value": normalize_list(&v)}));
        }
        if !app_probes.is_empty() {
            let text = serde_json::to_string(app_probes).unwrap_or_default();
            env.push(json!({"name": "MESHLET_APP_PROBES", "value": text}));
        }
        if cfg.proxy_config_map.is_some() {
            env.push(json!({"name": "MESHLET_CONFIG", "value": "/etc/meshlet/config.yaml"}));
        }

        let cpu = self.valid("meshlet.dev/proxy-cpu", check_quantity);
        let cpu_limit = self.valid("meshlet.dev/proxy-cpu-limit", check_quantity);
        let memory = self.valid("meshlet.dev/proxy-memory", check_quantity);
        let memory_limit = self.valid("meshlet.dev/proxy-memory-limit", check_quantity);
        let cpu = cpu.unwrap_or_else(|| DEFAULT_CPU_REQUEST.into());
        let memory = memory.unwrap_or_else(|| DEFAULT_MEMORY_REQUEST.into());
        let memory_limit = self.at_least(
            "meshlet.dev/proxy-memory-limit",
            memory_limit.unwrap_or_else(|| DEFAULT_MEMORY_LIMIT.into()),
            &memory,
        );
        let mut limits = Map::new();
        if let Some(l) = cpu_limit {
            limits.insert(
                "cpu".into(),
                self.at_least("meshlet.dev/proxy-cpu-limit", l, &cpu).into(),
            );
        }
        limits.insert("memory".into(), memory_limit.into());

        let mut c = Map::new();
        c.insert("name".into(), PROXY_NAME.into());
        self.image_fields(&cfg.image, cfg, &mut c);
        c.insert("command".into(), json!(["meshlet"]));
        c.insert("args".into(), json!(["proxy", "--sidecar"]));
        c.insert("env".into(), Value::Array(env));
        c.insert(
            "ports".into(),
            json!([
                {"name": "meshlet-out", "containerPort": OUTBOUND_PORT, "protocol": "TCP"},
                {"name": "meshlet-in", "containerPort": INBOUND_PORT, "protocol": "TCP"},
                {"name": "meshlet-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
                {"name": "meshlet-grpc", "containerPort": GRPC_HEALTH_PORT, "protocol": "TCP"},
            ]),
        );
        c.insert(
            "resources".into(),
            json!({"requests": {"cpu": cpu, "memory": memory}, "limits": limits}),
        );
        c.insert(
            "securityContext".into(),
            json!({
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]},
                "privileged": false,
                "readOnlyRootFilesystem": true,
                "runAsNonRoot": true,
                "runAsUser": PROXY_UID,
                "runAsGroup": PROXY_UID,
            }),
        );
        if cfg.proxy_config_map.is_some() {
            c.insert(
                "volumeMounts".into(),
                json!([{"name": "meshlet-config", "mountPath": "/etc/meshlet", "readOnly": true}]),
            );
        }
        if cfg.native_sidecars {
            c.insert("restartPolicy".into(), "Always".into());
            c.insert(
                "startupProbe".into(),
                json!({
                    "httpGet": {"path": "/ready/proxy", "port": ADMIN_PORT, "scheme": "HTTP"},
                    "periodSeconds": 1,
                    "timeoutSeconds": 1,
                    "failureThreshold": 120,
                }),
            );
        } else {
            c.insert(
                "lifecycle".into(),
                json!({"postStart": {"exec": {
                    "command": ["meshlet", "wait-ready", "--timeout", "60s"]
                }}}),
            );
        }
        Value::Object(c)
    }

    /// `limit`, or `request` with a warning when the limit is below the request.
    fn at_least(&mut self, key: &str, limit: String, request: &str) -> String {
        match (quantity(&limit), quantity(request)) {
            (Some(l), Some(r)) if l < r => {
                self.warnings.push(format!(
                    "annotation {key}: {limit:?} is below the request {request:?}; the request is \
                     used as the limit"
                ));
                request.to_string()
            }
            _ => limit,
        }
    }
}

fn field_env(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
}

/// A comma-separated list, trimmed, without empty items.
fn normalize_list(v: &str) -> String {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

fn items(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn check_ports(v: &str) -> Result<(), String> {
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|&n| n > 0);
    for item in items(v) {
        let ok = match item.split_once('-') {
            Some((a, b)) => port(a).zip(port(b)).is_some_and(|(a, b)| a <= b),
            None => port(item).is_some(),
        };
        if !ok {
            return Err(format!(
                "is not a comma-separated list of ports and port ranges ({item:?} is not a port \
                 1-65535 or a range like 8000-8099)"
            ));
        }
    }
    Ok(())
}

fn check_cidrs(v: &str) -> Result<(), String> {
    for c in items(v) {
        // As `meshlet init` reads it: after a `/` comes a prefix length (found by fuzz/: the
        // webhook took `10.0.0.0/`, which made the init container, and so the pod, fail).
        let (ip, prefix) = match c.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (c, None),
        };
        let ok = match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= 32)),
            Ok(IpAddr::V6(_)) => prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= 128)),
            Err(_) => false,
        };
        if !ok {
            return Err(format!(
                "is not a comma-separated list of CIDRs ({c:?} is not one)"
            ));
        }
    }
    Ok(())
}

fn check_services(v: &str) -> Result<(), String> {
    for s in items(v) {
        ServiceName::parse(s).map_err(|e| {
            format!("is not a comma-separated list of name.namespace services ({e})")
        })?;
    }
    Ok(())
}

/// `meshlet.dev/ready-requires`: whether `/ready` follows the critical dependencies.
fn check_ready_requires(v: &str) -> Result<(), String> {
    match v {
        "none" | "critical" => Ok(()),
        _ => Err("not one of none, critical".into()),
    }
}

// A pod's inbound limits go through the proxy's own checks (`crate::config::pod`), so that the injector
// passes on exactly the values the proxy will use.
fn check_concurrency_limit(v: &str) -> Result<(), String> {
    refused(crate::config::pod::concurrency_limit(v))
}

fn check_rate_limit(v: &str) -> Result<(), String> {
    refused(crate::config::pod::rate_limit(v))
}

fn check_rate_limit_burst(v: &str) -> Result<(), String> {
    refused(crate::config::pod::rate_limit_burst(v))
}

fn check_inbound_to_loopback(v: &str) -> Result<(), String> {
    refused(crate::config::pod::inbound_to_loopback(v))
}

fn refused<T>(r: Result<T, String>) -> Result<(), String> {
    r.map(drop).map_err(|e| format!("is refused: {e}"))
}

fn check_log(v: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let ok = v.split(',').all(|d| {
        let level = d.rsplit_once('=').map_or(
            d,
            |(target, level)| {
                if target.is_empty() { "" } else { level }
            },
        );
        LEVELS.contains(&level.trim())
    });
    if ok {
        Ok(())
    } else {
        Err("is not a log level (trace, debug, info, warn, error, off, or target=level,...)".into())
    }
}

fn check_quantity(v: &str) -> Result<(), String> {
    match quantity(v) {
        Some(q) if q > 0.0 => Ok(()),
        _ => Err("is not a positive Kubernetes quantity (e.g. 100m, 0.5, 64Mi, 1G)".into()),
    }
}

/// The value of a Kubernetes resource quantity (`100m`, `64Mi`, `1.5G`, `1e3`), if it is one.
pub fn quantity(v: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 15] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Pi", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("Ei", 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let number = |s: &str, exponent: bool| -> Option<f64> {
        let first = s.chars().next()?;
        let allowed = |c: char| {
            c.is_ascii_digit()
                || matches!(c, '.' | '+')
                || (exponent && matches!(c, 'e' | 'E' | '-'))
        };
        if !(first.is_ascii_digit() || matches!(first, '.' | '+')) || !s.chars().all(allowed) {
            return None;
        }
        s.parse::<f64>().ok().filter(|f| f.is_finite())
    };
    for (suffix, mult) in SUFFIXES {
        if let Some(n) = v.strip_suffix(suffix).and_then(|n| number(n, false)) {
            return Some(n * mult);
        }
    }
    number(v, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("10m"), Some(0.01));
        assert_eq!(quantity("64Mi"), Some(64.0 * 1024.0 * 1024.0));
        assert_eq!(quantity("1.5"), Some(1.5));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("2E"), Some(2e18));
        for bad in ["lots", "", "-1", "Mi", "1.5x", "inf", "NaN", "1 Mi"] {
            assert_eq!(quantity(bad), None, "{bad}");
        }
    }

    #[test]
    fn opt_in_rules() {
        let cfg = InjectConfig::default();
        let plain = pod("metadata: {name: p}\nspec: {containers: [{name: app, image: x}]}");
        let ns = |v: &str| -> Namespace {
            serde_yaml::from_str(&format!(
                "metadata: {{name: n, annotations: {{meshlet.dev/inject: {v}}}}}"
            ))
            .unwrap()
        };
        assert_eq!(
            inject(&plain, None, &cfg),
            Outcome::Skip(SKIP_NOT_OPTED_IN.into())
        );
        assert!(matches!(
            inject(&plain, Some(&ns("enabled")), &cfg),
            Outcome::Patch(..)
        ));
        assert_eq!(
            inject(&plain, Some(&ns("disabled")), &cfg),
            Outcome::Skip(SKIP_NOT_OPTED_IN.into())
        );
        let out = pod(
            "metadata: {name: p, annotations: {meshlet.dev/inject: disabled}}\n\
             spec: {containers: [{name: app, image: x}]}",
        );
        assert_eq!(
            inject(&out, Some(&ns("enabled")), &cfg),
            Outcome::Skip(SKIP_OPTED_OUT.into())
        );
        let odd = pod(
            "metadata: {name: p, annotations: {meshlet.dev/inject: \"yes\"}}\n\
             spec: {containers: [{name: app, image: x}]}",
        );
        assert_eq!(
            inject(&odd, None, &cfg),
            Outcome::Skip(SKIP_INVALID_INJECT.into())
        );
        // Found by fuzz/ (admission): a patch for these would not apply.
        for yaml in [
            "metadata: {name: p, annotations: {meshlet.dev/inject: enabled}}",
            "metadata: {name: p, annotations: {meshlet.dev/inject: enabled}}\nspec: {}",
            "metadata: {name: p, annotations: {meshlet.dev/inject: enabled}}\nspec: {containers: []}",
        ] {
            assert_eq!(
                inject(&pod(yaml), None, &cfg),
                Outcome::Skip(SKIP_NO_CONTAINERS.into()),
                "{yaml}"
            );
        }
    }

    #[test]
    fn bad_annotations_are_warnings_with_defaults() {
        let p = pod(
            "metadata: {name: p, annotations: {meshlet.dev/inject: enabled, \
             meshlet.dev/proxy-cpu: lots, meshlet.dev/proxy-memory: 128Mi, \
             meshlet.dev/dependencies: 'not a service', meshlet.dev/rate-limit: fast}}\n\
             spec: {containers: [{name: app, image: x}]}",
        );
        let Outcome::Patch(ops, warnings) = inject(&p, None, &InjectConfig::default()) else {
            panic!("not injected");
        };
        let text = warnings.join("\n");
        assert!(text.contains("meshlet.dev/proxy-cpu: \"lots\""), "{text}");
        assert!(text.contains("meshlet.dev/dependencies"), "{text}");
        assert!(text.contains("meshlet.dev/rate-limit: \"fast\""), "{text}");
        assert!(
            text.contains("proxy-memory-limit: \"64Mi\" is below the request"),
            "{text}"
        );
        let ops = serde_json::to_value(ops).unwrap();
        let proxy = &ops[0]["value"][1];
        assert_eq!(proxy["name"], PROXY_NAME);
        assert_eq!(
            proxy["resources"],
            json!({"requests": {"cpu": "10m", "memory": "128Mi"}, "limits": {"memory": "128Mi"}})
        );
        let env = proxy["env"].as_array().unwrap();
        assert!(!env.iter().any(|e| e["name"] == "MESHLET_RATE_LIMIT"));
    }

    #[test]
    fn opaque_ports_from_the_pod_else_the_namespace() {
        let ns = |v: &str| -> Namespace {
            serde_yaml::from_str(&format!(
                "metadata: {{name: n, annotations: {{meshlet.dev/inject: enabled, \
                 meshlet.dev/opaque-ports: {v:?}}}}}"
            ))
            .unwrap()
        };
        let pod_with = |v: Option<&str>| {
            pod(&format!(
                "metadata: {{name: p, annotations: {{{}}}}}\nspec: {{containers: [{{name: app, image: x}}]}}",
                v.map(|v| format!("meshlet.dev/opaque-ports: {v:?}"))
                    .unwrap_or_default()
            ))
        };
        let run = |p: &Pod, n: Option<&Namespace>| {
            let Outcome::Patch(ops, warnings) = inject(p, n, &InjectConfig::default()) else {
                panic!("not injected");
            };
            let env = serde_json::to_value(ops).unwrap()[0]["value"][1]["env"].clone();
            let value = env
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "MESHLET_OPAQUE_PORTS")
                .map(|e| e["value"].as_str().unwrap().to_string());
            (value, warnings.join("\n"))
        };
        let (v, w) = run(&pod_with(None), Some(&ns("5432, 8000-8010")));
        assert_eq!(v.as_deref(), Some("5432,8000-8010"), "{w}");
        let (v, _) = run(&pod_with(Some("6379")), Some(&ns("5432")));
        assert_eq!(v.as_deref(), Some("6379"), "the pod wins");
        let (v, w) = run(&pod_with(Some("6379,db")), Some(&ns("5432")));
        assert_eq!(
            v.as_deref(),
            Some("5432"),
            "a bad pod value: the namespace's"
        );
        assert!(
            w.contains("annotation meshlet.dev/opaque-ports: \"6379,db\"")
                && w.contains("the namespace's value is used"),
            "{w}"
        );
        let (v, w) = run(&pod_with(None), Some(&ns("99999")));
        assert_eq!(v, None);
        assert!(
            w.contains("namespace annotation meshlet.dev/opaque-ports: \"99999\""),
            "{w}"
        );
        let mut p = pod_with(None);
        p.metadata
            .annotations
            .get_or_insert_default()
            .insert(ANNOTATION_INJECT.into(), "enabled".into());
        assert_eq!(run(&p, None).0, None);
    }

    /// Found by fuzz/ (admission): every list the webhook accepts, `meshlet init` accepts.
    #[test]
    fn skip_lists_are_checked_as_meshlet_init_reads_them() {
        for v in [
            "10.0.0.0/",
            "fd00::/",
            "10.0.0.0/8/8",
            "10.0.0.0/+",
            "10.0.0.0/33",
        ] {
            assert!(check_cidrs(v).is_err(), "{v}");
        }
        for ok in ["10.0.0.0/8, fd00::/8, 10.1.2.3", "", " , "] {
            assert!(check_cidrs(ok).is_ok(), "{ok:?}");
            let args = crate::init::InitArgs {
                dry_run: true,
                proxy_uid: "7102".into(),
                inbound_port: "7143".into(),
                outbound_port: "7140".into(),
                admin_port: "7190".into(),
                grpc_port: "7191".into(),
                skip_inbound_ports: "9090, 9100-9110".into(),
                skip_outbound_ports: String::new(),
                skip_outbound_cidrs: normalize_list(ok),
                ipv6: "false".into(),
            };
            assert!(args.config().is_ok(), "{ok:?}");
        }
    }

    /// The golden corpus: `tests/golden/inject/<name>.pod.yaml` (and an optional
    /// `<name>.ns.yaml`) -> `<name>.patch.json`. `UPDATE_GOLDEN=1` rewrites the expectations.
    /// Names with `classic` use classic mode, names with `config` a proxy ConfigMap.
    #[test]
    fn golden() {
        use crate::ops::health::probes::AppProbes;
        use std::path::Path;

        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/inject");
        let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let n = e.ok()?.file_name().into_string().ok()?;
                Some(n.strip_suffix(".pod.yaml")?.to_string())
            })
            .collect();
        names.sort();
        assert!(names.len() >= 10, "the corpus is missing: {names:?}");
        let mut failures = Vec::new();
        for name in &names {
            let pod: Pod = serde_yaml::from_str(
                &std::fs::read_to_string(dir.join(format!("{name}.pod.yaml"))).unwrap(),
            )
            .unwrap_or_else(|e| panic!("{name}.pod.yaml: {e}"));
            let ns: Option<Namespace> =
                std::fs::read_to_string(dir.join(format!("{name}.ns.yaml")))
                    .ok()
                    .map(|t| serde_yaml::from_str(&t).unwrap());
            let cfg = InjectConfig {
                image: "meshlet:test".into(),
                init_image: name
                    .contains("init-image")
                    .then(|| "meshlet-init:test".into()),
                image_pull_policy: Some("IfNotPresent".into()),
                native_sidecars: !name.contains("classic"),
                version: "0.0.0-test".into(),
                proxy_config_map: name.contains("config").then(|| "meshlet-proxy".into()),
            };
            let outcome = inject(&pod, ns.as_ref(), &cfg);
            let got = match &outcome {
                Outcome::Patch(ops, warnings) => json!({"patch": ops, "warnings": warnings}),
                Outcome::Skip(reason) => json!({"skip": reason}),
            };
            let got = serde_json::to_string_pretty(&got).unwrap() + "\n";
            let golden = dir.join(format!("{name}.patch.json"));
            if update {
                std::fs::write(&golden, &got).unwrap();
            } else {
                let want = std::fs::read_to_string(&golden).unwrap_or_default();
                if want != got {
                    failures.push(format!(
                        "{name}: the patch differs from {}:\n{got}",
                        golden.display()
                    ));
                }
            }
            assert_eq!(
                inject(&pod, ns.as_ref(), &cfg),
                outcome,
                "{name}: not deterministic"
            );

            let Outcome::Patch(ops, _) = outcome else {
                continue;
            };
            // Apply it as the API server would; the result must be a pod, meshed, and final.
            let mut doc = serde_json::to_value(&pod).unwrap();
            json_patch::patch(&mut doc, &ops).unwrap_or_else(|e| panic!("{name}: {e}"));
            let meshed: Pod = serde_json::from_value(doc).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                inject(&meshed, ns.as_ref(), &cfg),
                Outcome::Skip(SKIP_ALREADY_INJECTED.into()),
                "{name}: injection is not idempotent"
            );
            let spec = meshed.spec.unwrap();
            let inits = spec.init_containers.unwrap();
            assert_eq!(inits[0].name, INIT_NAME, "{name}");
            let caps = inits[0]
                .security_context
                .as_ref()
                .unwrap()
                .capabilities
                .as_ref()
                .unwrap();
            assert_eq!(
                caps.add.as_deref(),
                Some(&["NET_ADMIN".to_string(), "NET_RAW".into()][..])
            );
            let proxy = if cfg.native_sidecars {
                assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"), "{name}");
                &inits[1]
            } else {
                assert!(inits.iter().all(|c| c.name != PROXY_NAME), "{name}");
                &spec.containers[0]
            };
            assert_eq!(proxy.name, PROXY_NAME, "{name}");
            let sc = proxy.security_context.as_ref().unwrap();
            assert_eq!(sc.run_as_user, Some(PROXY_UID));
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            let probes = proxy
                .env
                .iter()
                .flatten()
                .find(|e| e.name == "MESHLET_APP_PROBES")
                .and_then(|e| e.value.clone());
            if let Some(p) = &probes {
                AppProbes::parse(p).unwrap_or_else(|e| panic!("{name}: MESHLET_APP_PROBES: {e}"));
            }
            for c in spec.containers.iter().filter(|c| c.name != PROXY_NAME) {
                for p in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
                    .into_iter()
                    .flatten()
                {
                    assert!(p.grpc.is_none() && p.tcp_socket.is_none(), "{name}: {p:?}");
                    if let Some(h) = &p.http_get {
                        let path = h.path.as_deref().unwrap_or_default();
                        if !path.starts_with("/app-health/") {
                            // left alone: its named port is not declared
                            assert!(!probes.as_deref().unwrap_or_default().contains(path));
                        }
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{}\n(UPDATE_GOLDEN=1 rewrites them)",
            failures.join("\n")
        );
    }
}
