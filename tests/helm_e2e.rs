//! The chart end to end, as a user meets it: `helm install`, annotate a namespace, deploy two
//! services (Deployments) that call each other, and see them meshed; kill a replica under load;
//! `helm upgrade`; `helm uninstall`.
//!
//! One test code, two targets, chosen by configuration:
//! - **local** (default): a real control plane on loopback and the stand-in kubelet of
//!   tests/e2e/harness.rs (needs root and Go, like k8s_e2e). Images map to local binaries:
//!   `meshlet` and `meshlet-init` to target/*/meshlet, `meshlet-e2e-app` to the e2e-app example.
//!   Pods get service-account tokens (not the admin kubeconfig), so the chart's RBAC is what
//!   they run with.
//! - **kind** (`MESHLET_E2E_TARGET=kind`, with `KUBECONFIG` pointing at the cluster and
//!   `MESHLET_E2E_IMAGE_TAG` naming the tag of the `meshlet`, `meshlet-init` and
//!   `meshlet-e2e-app` images loaded into it): tests/e2e/kind.sh sets that up.
//!
//! Everything the tests do goes through the Kubernetes API (kube-rs, helm, kubectl): traffic is
//! generated inside the cluster by an app pod's `/burst` (examples/e2e-app.rs) and read back
//! through the API server's pod proxy, which works the same in both targets.

#[path = "e2e/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::wait_for;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use libtest_mimic::{Arguments, Failed, Trial};
use serde_json::json;

type TestResult = Result<(), String>;

const RELEASE: &str = "meshlet";
const SYSTEM_NS: &str = "meshlet-system";
const APPS_NS: &str = "meshlet-apps";
const REPLICAS: usize = 3;

struct Ctx {
    kubeconfig: PathBuf,
    client: kube::Client,
    helm: PathBuf,
    kubectl: PathBuf,
    tag: String,
    /// The harness's control plane and kubelet (local target only).
    cluster: Option<harness::Cluster>,
    rt: tokio::runtime::Handle,
    /// Set once the install test got two meshed services running; later tests need them.
    installed: AtomicBool,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command to completion: Ok(stdout) or Err(the command and its output).
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{:?} {:?} failed ({}):\n{}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Ctx {
    fn helm(&self) -> Command {
        let mut c = Command::new(&self.helm);
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    fn kubectl(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.env("KUBECONFIG", &self.kubeconfig);
        c
    }

    /// `--set` arguments pointing the chart at the images under test.
    fn image_values(&self) -> Vec<String> {
        vec![
            "--set".into(),
            "image.repository=meshlet".into(),
            "--set".into(),
            format!("image.tag={}", self.tag),
            "--set".into(),
            "initImage.repository=meshlet-init".into(),
            "--set".into(),
            format!("initImage.tag={}", self.tag),
            "--set".into(),
            "proxy.imagePullPolicy=IfNotPresent".into(),
        ]
    }

    fn chart(&self) -> String {
        repo().join("charts/meshlet").display().to_string()
    }

    /// Creates (or labels) a namespace; pods in it get service-account tokens from the local
    /// harness (the label means nothing to a real kubelet, which always does).
    async fn namespace(&self, name: &str, annotations: serde_json::Value) -> TestResult {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = json!({
            "metadata": {
                "name": name,
                "labels": {"e2e.meshlet.dev/service-account-tokens": "true"},
                "annotations": annotations,
            }
        });
        match api
            .create(
                &PostParams::default(),
                &serde_json::from_value(ns.clone()).map_err(|e| e.to_string())?,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => api
                .patch(name, &PatchParams::default(), &Patch::Merge(&ns))
                .await
                .map(|_| ())
                .map_err(|e| format!("patch namespace {name}: {e}")),
            Err(e) => Err(format!("create namespace {name}: {e}")),
        }
    }

    async fn pod_get(&self, ns: &str, pod: &str, port: u16, path: &str) -> Result<String, String> {
        self.apps().pod_get(ns, pod, port, path).await
    }

    async fn ready_pods(&self, ns: &str, app: &str) -> Vec<Pod> {
        self.apps().ready_pods(ns, app).await
    }

    /// Scales `app` to `REPLICAS + 1`, checks that every one of its pods is meshed, then bursts
    /// from the first Ready pod of `caller` until all of them have answered.
    async fn scale_up_and_reach(&self, app: &str, caller: &str) -> Result<Burst, String> {
        Api::<Deployment>::namespaced(self.client.clone(), APPS_NS)
            .patch(
                app,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": REPLICAS + 1}})),
            )
            .await
            .map_err(|e| format!("scale {app}: {e}"))?;
        for p in &self.wait_ready_pods(APPS_NS, app, REPLICAS + 1).await? {
            check_meshed(p, &self.tag)?;
        }
        let h = self.apps();
        let from = h.ready(caller).await?;
        let from = from.first().ok_or(format!("no Ready {caller} pod"))?;
        h.reach_all(from, (400, 4), REPLICAS + 1, Duration::from_secs(30))
            .await
    }

    async fn wait_ready_pods(&self, ns: &str, app: &str, n: usize) -> Result<Vec<Pod>, String> {
        wait_for(
            &format!("{n} Ready pods of {app}"),
            Duration::from_secs(120),
            || async {
                let pods = self.ready_pods(ns, app).await;
                (pods.len() == n).then_some(pods)
            },
        )
        .await
    }

    /// Whether a pod created now in `ns` would be meshed: a server-side dry run goes through
    /// the admission webhooks without creating anything.
    async fn would_inject(&self, ns: &str) -> Result<bool, String> {
        self.apps().would_inject(ns).await
    }
}

impl Apps {
    /// See [`Ctx::would_inject`].
    async fn would_inject(&self, ns: &str) -> Result<bool, String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let pod: Pod = serde_json::from_value(app_pod_spec("dry-run", "dry-run", None))
            .map_err(|e| e.to_string())?;
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let pod = api
            .create(&pp, &pod)
            .await
            .map_err(|e| format!("dry-run pod: {e}"))?;
        Ok(pod
            .metadata
            .annotations
            .unwrap_or_default()
            .get("meshlet.dev/injected")
            .is_some_and(|v| v == "true"))
    }
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// What `/burst` reports.
#[derive(Debug, Default)]
struct Burst {
    /// Successful answers per backend pod.
    ok: BTreeMap<String, usize>,
    failed: usize,
    first_error: Option<String>,
}

impl Burst {
    fn parse(text: &str) -> Result<Burst, String> {
        let mut b = Burst::default();
        for line in text.lines() {
            let mut words = line.splitn(2, ' ');
            match (words.next(), words.next()) {
                (Some("ok"), Some(rest)) => {
                    let (body, count) = rest
                        .rsplit_once(' ')
                        .ok_or(format!("bad /burst line {line:?}"))?;
                    let pod = body.split(':').next().unwrap_or(body).to_string();
                    *b.ok.entry(pod).or_default() += count
                        .parse::<usize>()
                        .map_err(|e| format!("{line:?}: {e}"))?;
                }
                (Some("failed"), Some(n)) => {
                    b.failed = n.trim().parse().map_err(|e| format!("{line:?}: {e}"))?;
                }
                (Some("first_error"), Some(e)) => b.first_error = Some(e.to_string()),
                _ => {}
            }
        }
        Ok(b)
    }

    fn total(&self) -> usize {
        self.ok.values().sum::<usize>() + self.failed
    }
}

/// The e2e app's pod spec (a Deployment's template, or a pod of its own).
fn app_pod_spec(name: &str, app: &str, call: Option<&str>) -> serde_json::Value {
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    ];
    if let Some(url) = call {
        env.push(json!({"name": "CALL", "value": url}));
    }
    json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "app",
                "image": format!("meshlet-e2e-app:{}", image_tag()),
                "imagePullPolicy": "IfNotPresent",
                "env": env,
                "ports": [{"containerPort": 8080, "name": "http"}],
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
                "securityContext": {"runAsUser": 1000, "runAsNonRoot": true},
            }],
        },
    })
}

fn image_tag() -> String {
    std::env::var("MESHLET_E2E_IMAGE_TAG").unwrap_or_else(|_| "e2e".into())
}

fn deployment(app: &str, call: &str) -> serde_json::Value {
    let mut template = app_pod_spec(app, app, Some(call));
    template["metadata"].as_object_mut().unwrap().remove("name");
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app, "labels": {"app": app}},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": {"app": app}},
            "template": template,
        },
    })
}

/// Every pod of the two apps carries the sidecar and is Ready through it.
fn check_meshed(pod: &Pod, tag: &str) -> TestResult {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let inits = spec.init_containers.unwrap_or_default();
    let images: Vec<(String, String)> = inits
        .iter()
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .collect();
    let want = vec![
        ("meshlet-init".to_string(), format!("meshlet-init:{tag}")),
        ("meshlet-proxy".to_string(), format!("meshlet:{tag}")),
    ];
    if images != want {
        return Err(format!("{name}: init containers {images:?}, want {want:?}"));
    }
    let probe = spec
        .containers
        .iter()
        .find(|c| c.name == "app")
        .and_then(|c| c.readiness_probe.as_ref())
        .and_then(|p| p.http_get.as_ref())
        .and_then(|h| h.path.clone());
    if probe.as_deref() != Some("/app-health/app/readyz") {
        return Err(format!(
            "{name}: readiness does not go through the sidecar: {probe:?}"
        ));
    }
    if !is_ready(pod) {
        return Err(format!("{name}: not Ready"));
    }
    Ok(())
}

/// `helm upgrade --install --wait`; Ok(its output, NOTES included).
async fn helm_install(ctx: &Ctx, extra: &[&str]) -> Result<String, String> {
    let mut cmd = ctx.helm();
    cmd.args(["upgrade", "--install", RELEASE, &ctx.chart()])
        .args(["--namespace", SYSTEM_NS, "--create-namespace"])
        .args(["--wait", "--timeout", "180s"])
        .args(ctx.image_values())
        .args(extra);
    tokio::task::block_in_place(|| run(&mut cmd))
}

/// One key of a Secret's data; an error names what is missing.
async fn secret_key(api: &Api<Secret>, name: &str, key: &str) -> Result<Vec<u8>, String> {
    let secret = api
        .get(name)
        .await
        .map_err(|e| format!("get Secret {name}: {e}"))?;
    secret
        .data
        .unwrap_or_default()
        .get(key)
        .map(|b| b.0.clone())
        .ok_or(format!("Secret {name} has no {key}"))
}

async fn webhook_ca(ctx: &Ctx) -> Result<String, String> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(ctx.client.clone());
    let hook = api
        .get("meshlet-injector")
        .await
        .map_err(|e| format!("get the MutatingWebhookConfiguration: {e}"))?;
    hook.webhooks
        .unwrap_or_default()
        .first()
        .and_then(|w| w.client_config.ca_bundle.clone())
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or("the webhook has no caBundle".into())
}

/// The rendered chart, and the plain manifests, pass the API server's own validation and
/// admission (`kubectl apply --dry-run=server`).
async fn chart_and_manifests_pass_server_side_dry_run(ctx: &Ctx) -> TestResult {
    let ns = "meshlet-dry-run";
    ctx.namespace(ns, json!({})).await?;
    for values in [
        vec![],
        vec![
            "--set".to_string(),
            "proxy.rbac.scope=namespaces".to_string(),
            "--set".to_string(),
            "proxy.rbac.namespaces={a,b}".to_string(),
        ],
    ] {
        let rendered = tokio::task::block_in_place(|| {
            run(ctx
                .helm()
                .args([
                    "template",
                    "meshlet-dry-run",
                    &ctx.chart(),
                    "--namespace",
                    ns,
                ])
                .args(&values))
        })?;
        let file =
            std::env::temp_dir().join(format!("meshlet-dry-run-{}.yaml", std::process::id()));
        std::fs::write(&file, rendered).map_err(|e| e.to_string())?;
        let out = tokio::task::block_in_place(|| {
            run(ctx
                .kubectl()
                .args(["apply", "--dry-run=server", "-f"])
                .arg(&file))
        });
        let _ = std::fs::remove_file(&file);
        let out = out?;
        for kind in [
            "deployment.apps/meshlet-dry-run-injector",
            "mutatingwebhookconfiguration.admissionregistration.k8s.io/meshlet-dry-run-injector",
            "clusterrole.rbac.authorization.k8s.io/meshlet-dry-run-proxy",
            "poddisruptionbudget.policy/meshlet-dry-run-injector",
            "secret/meshlet-dry-run-injector-tls",
        ] {
            if !out.contains(kind) {
                return Err(format!("{kind} missing from the dry run:\n{out}"));
            }
        }
    }
    // manifests/meshlet.yaml creates its namespace: the dry run needs it to exist.
    ctx.namespace(SYSTEM_NS, json!({})).await?;
    let out = tokio::task::block_in_place(|| {
        run(ctx
            .kubectl()
            .args(["apply", "--dry-run=server", "-f"])
            .arg(repo().join("manifests/meshlet.yaml")))
    })?;
    if !out.contains("deployment.apps/meshlet-injector") {
        return Err(format!("manifests/meshlet.yaml dry run:\n{out}"));
    }
    let _ = Api::<Namespace>::all(ctx.client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
    Ok(())
}

/// cert-manager's CRDs (`deploy/crds` of its Go module, from the Go module proxy); the values
/// that ask for cert-manager render objects those CRDs' schemas accept.
const CERT_MANAGER: &str = "github.com/cert-manager/cert-manager@v1.21.2";

async fn cert_manager_values_pass_server_side_dry_run(ctx: &Ctx) -> TestResult {
    let dir = tokio::task::block_in_place(|| {
        let out = run(Command::new("go")
            .args(["mod", "download", "-json", CERT_MANAGER])
            .current_dir(std::env::temp_dir())
            .env("GOFLAGS", "-mod=mod"))?;
        let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
        v["Dir"]
            .as_str()
            .map(|d| Path::new(d).join("deploy/crds"))
            .ok_or(format!("go mod download {CERT_MANAGER}: no Dir in {out}"))
    })?;
    let crds = ["certificates", "issuers", "clusterissuers"];
    let files: Vec<PathBuf> = crds
        .iter()
        .map(|c| dir.join(format!("cert-manager.io_{c}.yaml")))
        .collect();
    tokio::task::block_in_place(|| {
        let mut cmd = ctx.kubectl();
        cmd.arg("apply");
        for f in &files {
            cmd.arg("-f").arg(f);
        }
        run(&mut cmd)?;
        run(ctx
            .kubectl()
            .args(["wait", "--for=condition=Established", "--timeout=60s"])
            .args(crds.iter().map(|c| format!("crd/{c}.cert-manager.io"))))
    })?;
    let ns = "meshlet-dry-run-cm";
    ctx.namespace(ns, json!({})).await?;
    let mut result = Ok(());
    for values in ["cert-manager", "cert-manager-issuer"] {
        let file = repo().join(format!("tests/golden/chart/{values}.values.yaml"));
        let out = tokio::task::block_in_place(|| {
            let rendered = run(ctx
                .helm()
                .args([
                    "template",
                    "meshlet",
                    &ctx.chart(),
                    "--namespace",
                    ns,
                    "--values",
                ])
                .arg(&file))?;
            let tmp = std::env::temp_dir().join(format!("meshlet-cm-{}.yaml", std::process::id()));
            std::fs::write(&tmp, rendered).map_err(|e| e.to_string())?;
            let out = run(ctx
                .kubectl()
                .args(["apply", "--dry-run=server", "-f"])
                .arg(&tmp));
            let _ = std::fs::remove_file(&tmp);
            out
        });
        match out {
            Ok(out) if out.contains("certificate.cert-manager.io/meshlet-injector created") => {
                println!(
                    "    {values}: {} cert-manager objects accepted",
                    out.matches("cert-manager.io/").count()
                );
            }
            Ok(out) => {
                result = Err(format!("{values}: no Certificate in the dry run:\n{out}"));
                break;
            }
            Err(e) => {
                result = Err(format!("{values}: {e}"));
                break;
            }
        }
    }
    let _ = Api::<Namespace>::all(ctx.client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
    let _ = tokio::task::block_in_place(|| {
        let mut cmd = ctx.kubectl();
        cmd.args(["delete", "--ignore-not-found", "--wait=false"]);
        for f in &files {
            cmd.arg("-f").arg(f);
        }
        run(&mut cmd)
    });
    result
}

/// helm install; annotate a namespace; two Deployments calling each other are meshed, Ready
/// through their sidecars, and every request is balanced over the other's replicas.
async fn helm_install_meshes_two_services(ctx: &Ctx) -> TestResult {
    ctx.namespace(SYSTEM_NS, json!({})).await?;
    let t = Instant::now();
    let out = helm_install(ctx, &[]).await?;
    println!("    helm install --wait: {:?}", t.elapsed());
    // NOTES.txt tells the user the next step.
    if !out.contains("kubectl annotate namespace <ns> meshlet.dev/inject=enabled") {
        return Err(format!("helm install's notes lack the opt-in step:\n{out}"));
    }
    let deploy: Api<Deployment> = Api::namespaced(ctx.client.clone(), SYSTEM_NS);
    let d = deploy
        .get("meshlet-injector")
        .await
        .map_err(|e| format!("get the injector Deployment: {e}"))?;
    let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
    if ready != 2 {
        return Err(format!("the injector has {ready} ready replicas, want 2"));
    }

    ctx.namespace(APPS_NS, json!({})).await?;
    Api::<Namespace>::all(ctx.client.clone())
        .patch(
            APPS_NS,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"meshlet.dev/inject": "enabled"}}})),
        )
        .await
        .map_err(|e| format!("annotate {APPS_NS}: {e}"))?;
    // The injector learns the annotation from its Namespace watch: wait until a dry-run pod
    // shows it (a few ms, bounded).
    wait_for(
        "the injector to see the annotation",
        Duration::from_secs(20),
        || async { ctx.would_inject(APPS_NS).await.ok().filter(|b| *b) },
    )
    .await?;

    let services: Api<Service> = Api::namespaced(ctx.client.clone(), APPS_NS);
    let mut vips = BTreeMap::new();
    for app in ["alpha", "beta"] {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": app},
            "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))
        .map_err(|e| e.to_string())?;
        let svc = services
            .create(&PostParams::default(), &svc)
            .await
            .map_err(|e| format!("create service {app}: {e}"))?;
        vips.insert(
            app,
            svc.spec.and_then(|s| s.cluster_ip).ok_or("no ClusterIP")?,
        );
    }
    // Each calls the other by ClusterIP (no cluster DNS in the local target); the sidecar
    // intercepts it and balances per request.
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), APPS_NS);
    for (app, other) in [("alpha", "beta"), ("beta", "alpha")] {
        let d: Deployment =
            serde_json::from_value(deployment(app, &format!("http://{}:80/", vips[other])))
                .map_err(|e| e.to_string())?;
        deployments
            .create(&PostParams::default(), &d)
            .await
            .map_err(|e| format!("create deployment {app}: {e}"))?;
    }
    for app in ["alpha", "beta"] {
        let pods = ctx.wait_ready_pods(APPS_NS, app, REPLICAS).await?;
        for p in &pods {
            check_meshed(p, &ctx.tag)?;
        }
    }
    println!("    {} pods meshed and Ready", 2 * REPLICAS);

    // Per-request balancing, both ways: one keep-alive connection per worker, so a spread over
    // all replicas shows that requests, not connections, are balanced. The callers' sidecars
    // learn the last endpoints from their own watch a moment after the pods are Ready: the
    // first burst may still miss one, so allow a few rounds.
    for (from, to) in [("alpha", "beta"), ("beta", "alpha")] {
        let mut last = None;
        for _ in 0..10 {
            let b = ctx.apps().burst(from, 300, 4).await?;
            let spread_ok = b.ok.len() == REPLICAS && b.ok.values().all(|n| *n >= 30);
            if b.failed > 0 {
                return Err(format!("{from} -> {to}: {b:?}"));
            }
            if spread_ok {
                println!("    {from} -> {to}: {:?}", b.ok);
                last = None;
                break;
            }
            last = Some(b);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Some(b) = last {
            return Err(format!(
                "{from} -> {to} not balanced over {REPLICAS} replicas: {b:?}"
            ));
        }
    }

    // What a user sees on a sidecar's admin port: /health and the metrics.
    let alpha = ctx.ready_pods(APPS_NS, "alpha").await;
    let pod = alpha[0].metadata.name.clone().unwrap_or_default();
    let health = ctx.pod_get(APPS_NS, &pod, 7190, "/health").await?;
    let health: serde_json::Value =
        serde_json::from_str(&health).map_err(|e| format!("/health: {e}: {health}"))?;
    let metrics = ctx.pod_get(APPS_NS, &pod, 7190, "/metrics").await?;
    if !metrics.contains("meshlet_") {
        return Err(format!("{pod} /metrics: {metrics}"));
    }
    println!("    {pod} /health status: {}", health["status"]);
    ctx.installed.store(true, Ordering::SeqCst);
    Ok(())
}

fn need_install(ctx: &Ctx) -> TestResult {
    if ctx.installed.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err("helm_install_meshes_two_services did not get the apps running".into())
    }
}

/// A replica killed (deleted with no grace) under load: no idempotent request fails.
async fn killed_replica_fails_no_idempotent_request(ctx: &Ctx) -> TestResult {
    need_install(ctx)?;
    let beta = ctx.ready_pods(APPS_NS, "beta").await;
    let victim = beta
        .last()
        .and_then(|p| p.metadata.name.clone())
        .ok_or("no beta pod")?;
    let c = ctx.apps();
    let load = tokio::spawn(async move { c.burst("alpha", 4000, 4).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), APPS_NS);
    let killed_at = Instant::now();
    pods.delete(
        &victim,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| format!("delete {victim}: {e}"))?;
    let b = load.await.map_err(|e| e.to_string())??;
    println!(
        "    killed {victim} {:?} into the load; {} requests: {:?}, failed {}",
        Duration::from_millis(400),
        b.total(),
        b.ok,
        b.failed
    );
    if b.failed > 0 || b.total() != 4000 {
        return Err(format!("requests failed around the kill: {b:?}"));
    }
    if !b.ok.contains_key(&victim) {
        return Err(format!("{victim} got no traffic before the kill: {b:?}"));
    }
    // The ReplicaSet replaces it, and the newcomer is meshed.
    let pods = ctx.wait_ready_pods(APPS_NS, "beta", REPLICAS).await?;
    for p in &pods {
        check_meshed(p, &ctx.tag)?;
    }
    println!("    replaced in {:?}", killed_at.elapsed());
    Ok(())
}

/// helm upgrade rolls the injector (a changed flag) and keeps its certificate; pods created
/// after it are still meshed.
async fn helm_upgrade_keeps_the_webhook_working(ctx: &Ctx) -> TestResult {
    need_install(ctx)?;
    let ca_before = webhook_ca(ctx).await?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), SYSTEM_NS);
    let crt_before = secret_key(&secrets, "meshlet-injector-tls", "tls.crt").await?;
    // The upgrade changes a flag of the injector (it rolls) and narrows the sidecars' RBAC to
    // the meshed namespace.
    // Pods created during the rollout must all be meshed: dry-run pods every 50 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let during = {
        let (apps, stop) = (ctx.apps(), stop.clone());
        tokio::spawn(async move {
            let (mut meshed, mut missed, mut errors) = (0usize, 0usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match apps.would_inject(APPS_NS).await {
                    Ok(true) => meshed += 1,
                    Ok(false) => missed += 1,
                    Err(e) => errors.push(e),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (meshed, missed, errors)
        })
    };
    let t = Instant::now();
    let apps = format!("proxy.rbac.namespaces={{{APPS_NS}}}");
    let upgraded = helm_install(
        ctx,
        &[
            "--set",
            "injector.logLevel=debug",
            "--set",
            "proxy.rbac.scope=namespaces",
            "--set",
            &apps,
        ],
    )
    .await;
    // A moment more: the old injector pods are still terminating when helm returns.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let (meshed, missed, errors) = during.await.map_err(|e| e.to_string())?;
    upgraded?;
    println!(
        "    helm upgrade --wait: {:?}; pods created during it: {meshed} meshed, {missed} not, {} errors",
        t.elapsed(),
        errors.len()
    );
    if missed > 0 || !errors.is_empty() || meshed < 20 {
        return Err(format!(
            "pods created during the upgrade: {meshed} meshed, {missed} not meshed, errors {errors:?}"
        ));
    }
    for (ns, want) in [(APPS_NS, "yes"), ("default", "no")] {
        let got = tokio::task::block_in_place(|| {
            let mut cmd = ctx.kubectl();
            cmd.args(["auth", "can-i", "list", "services"])
                .arg(format!("--as=system:serviceaccount:{ns}:default"))
                .arg("--as-group=system:serviceaccounts")
                .arg(format!("--as-group=system:serviceaccounts:{ns}"));
            // can-i exits 1 for "no": read its answer, not its status.
            cmd.output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .map_err(|e| e.to_string())
        })?;
        if got != want {
            return Err(format!(
                "after scope=namespaces, can a service account of {ns} list services? {got:?}, want {want:?}"
            ));
        }
    }
    if webhook_ca(ctx).await? != ca_before {
        return Err("helm upgrade replaced the webhook's CA".into());
    }
    let crt_after = secret_key(&secrets, "meshlet-injector-tls", "tls.crt").await?;
    if crt_after != crt_before {
        return Err("helm upgrade replaced the serving certificate".into());
    }
    let d: Deployment = Api::namespaced(ctx.client.clone(), SYSTEM_NS)
        .get("meshlet-injector")
        .await
        .map_err(|e| e.to_string())?;
    let env = d
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| format!("{:?}", s.containers[0].env))
        .unwrap_or_default();
    if !env.contains("debug") {
        return Err(format!("the upgrade did not reach the injector: {env}"));
    }
    // A scale-up after the upgrade is meshed by the new injector pods.
    let b = ctx
        .scale_up_and_reach("alpha", "beta")
        .await
        .map_err(|e| format!("beta -> alpha after the scale-up: {e}"))?;
    println!(
        "    beta -> alpha after the upgrade and scale-up: {:?}",
        b.ok
    );
    Ok(())
}

/// helm uninstall removes every object of the release; running meshed pods keep serving and
/// calling each other; new pods are created unmeshed.
/// `identity.enabled=true`: the identity service runs with the chart's RBAC (its pods get only
/// their ServiceAccount's token here), its trust anchor is generated once and kept across
/// upgrades, and (local target) it signs a certificate for a meshed pod's bound token, served
/// under the name and anchor a sidecar will check. Turned off again, the anchor stays
/// (`helm.sh/resource-policy: keep`); the test then deletes it for the uninstall test.
async fn identity_service_from_the_chart(ctx: &Ctx) -> TestResult {
    need_install(ctx)?;
    let on = ["--set", "identity.enabled=true"];
    let t = Instant::now();
    helm_install(ctx, &on).await?;
    println!(
        "    helm upgrade --wait with identity.enabled: {:?}",
        t.elapsed()
    );
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), SYSTEM_NS);
    let issuer = "meshlet-identity-issuer";
    let first = secret_key(&secrets, issuer, "ca.crt").await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), SYSTEM_NS);
    let ready = wait_for("2 Ready identity pods", Duration::from_secs(60), || async {
        let lp = ListParams::default().labels("app.kubernetes.io/component=identity");
        let list = pods.list(&lp).await.ok()?;
        let ready: Vec<Pod> = list.items.into_iter().filter(is_ready).collect();
        (ready.len() == 2).then_some(ready)
    })
    .await?;

    if ctx.cluster.is_some() {
        // From the host, as a sidecar would: the pod's address, the Service's name, the anchor.
        use tokio_rustls::rustls::pki_types::CertificateDer;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        let ip = ready[0]
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.clone())
            .ok_or("no pod IP")?;
        let endpoint = meshlet::tls::client::Endpoint {
            address: format!("{ip}:7150"),
            server_name: format!("meshlet-identity.{SYSTEM_NS}.svc"),
            anchors: vec![CertificateDer::from_pem_slice(&first).map_err(|e| e.to_string())?],
            timeout: Duration::from_secs(10),
        };
        let alpha = ctx.ready_pods(APPS_NS, "alpha").await;
        let pod = alpha.first().ok_or("no Ready alpha pod")?;
        let tr: k8s_openapi::api::authentication::v1::TokenRequest =
            serde_json::from_value(json!({
                "spec": {
                    "audiences": ["meshlet.dev/identity"], "expirationSeconds": 600,
                    "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                                       "name": pod.metadata.name, "uid": pod.metadata.uid},
                }
            }))
            .map_err(|e| e.to_string())?;
        let token = Api::<ServiceAccount>::namespaced(ctx.client.clone(), APPS_NS)
            .create_token_request("default", &PostParams::default(), &tr)
            .await
            .map_err(|e| format!("token request: {e}"))?
            .status
            .ok_or("no token")?
            .token;
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .map_err(|e| e.to_string())?;
        let signed = endpoint
            .certify(&token, csr.der())
            .await
            .map_err(|e| e.to_string())?;
        let want = format!("spiffe://cluster.local/ns/{APPS_NS}/sa/default");
        if signed.spiffe_id != want {
            return Err(format!("signed for {}, want {want}", signed.spiffe_id));
        }
        println!("    signed {want} through the chart's identity service");
    }

    // An upgrade that rolls the pods keeps the trust anchor.
    helm_install(ctx, &[on[0], on[1], "--set", "identity.logLevel=debug"]).await?;
    let second = secret_key(&secrets, issuer, "ca.crt").await?;
    if first != second {
        return Err("the upgrade replaced the trust anchor".into());
    }
    // Off again: the service goes, the anchor stays, by design.
    helm_install(ctx, &[]).await?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), SYSTEM_NS);
    if deployments
        .get_opt("meshlet-identity")
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Err("identity.enabled=false left the identity Deployment".into());
    }
    let kept = secret_key(&secrets, issuer, "ca.crt").await?;
    if kept != first {
        return Err("the trust anchor changed when the identity service was turned off".into());
    }
    secrets
        .delete(issuer, &DeleteParams::default())
        .await
        .map_err(|e| format!("delete the kept anchor: {e}"))?;
    Ok(())
}

async fn helm_uninstall_leaves_nothing_behind(ctx: &Ctx) -> TestResult {
    need_install(ctx)?;
    // Every alpha sidecar calls beta once first: after uninstall a sidecar keeps what it knows
    // but can no longer discover a service it never called (its RBAC is gone with the chart).
    let h = ctx.apps();
    let alphas = h.ready("alpha").await?;
    for pod in &alphas {
        let b = h.burst_from(pod, 40, 2).await?;
        if b.failed > 0 {
            return Err(format!("{pod} -> beta before uninstall: {b:?}"));
        }
    }
    let t = Instant::now();
    tokio::task::block_in_place(|| {
        run(ctx
            .helm()
            .args(["uninstall", RELEASE, "--namespace", SYSTEM_NS])
            .args(["--wait", "--timeout", "120s"]))
    })?;
    println!("    helm uninstall --wait: {:?}", t.elapsed());
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let lp = ListParams::default().labels(&selector);
    let left = wait_for(
        "the release's objects to be gone",
        Duration::from_secs(90),
        || async {
            let c = ctx.client.clone();
            let mut left = Vec::new();
            macro_rules! none_left {
                ($kind:ty, $api:expr) => {{
                    let api: Api<$kind> = $api;
                    match api.list(&lp).await {
                        Ok(l) => left.extend(l.items.into_iter().map(|o| {
                            format!("{} {}", stringify!($kind), kube::ResourceExt::name_any(&o))
                        })),
                        Err(e) => left.push(format!("{}: {e}", stringify!($kind))),
                    }
                }};
            }
            none_left!(MutatingWebhookConfiguration, Api::all(c.clone()));
            none_left!(ClusterRole, Api::all(c.clone()));
            none_left!(ClusterRoleBinding, Api::all(c.clone()));
            none_left!(Deployment, Api::namespaced(c.clone(), SYSTEM_NS));
            none_left!(ReplicaSet, Api::namespaced(c.clone(), SYSTEM_NS));
            none_left!(Pod, Api::namespaced(c.clone(), SYSTEM_NS));
            none_left!(Service, Api::namespaced(c.clone(), SYSTEM_NS));
            none_left!(Secret, Api::namespaced(c.clone(), SYSTEM_NS));
            none_left!(ServiceAccount, Api::namespaced(c.clone(), SYSTEM_NS));
            none_left!(PodDisruptionBudget, Api::namespaced(c.clone(), SYSTEM_NS));
            left.is_empty().then_some(())
        },
    )
    .await;
    if let Err(e) = left {
        return Err(format!("{e}: objects of release {RELEASE} are left"));
    }
    // Meshed pods keep working on what their sidecars know: every alpha pod, to all of beta.
    for pod in &alphas {
        let b = h
            .reach_all(pod, (150, 3), REPLICAS, Duration::from_secs(30))
            .await
            .map_err(|e| format!("{pod} -> beta after uninstall: {e}"))?;
        println!("    {pod} -> beta after uninstall: {:?}", b.ok);
    }
    if ctx.would_inject(APPS_NS).await? {
        return Err("a pod is still injected after uninstall".into());
    }
    Ok(())
}

/// The plain manifests: `kubectl apply -f manifests/meshlet.yaml` and
/// `manifests/webhook-cert.sh` (the images swapped for the ones under test) mesh new pods.
async fn plain_manifests_and_webhook_cert_script_mesh_pods(ctx: &Ctx) -> TestResult {
    need_install(ctx)?;
    let text = std::fs::read_to_string(repo().join("manifests/meshlet.yaml"))
        .map_err(|e| format!("manifests/meshlet.yaml: {e}"))?;
    let version = env!("CARGO_PKG_VERSION");
    let text = text
        .replace(
            &format!("ghcr.io/meshlet/meshlet-init:{version}"),
            &format!("meshlet-init:{}", ctx.tag),
        )
        .replace(
            &format!("ghcr.io/meshlet/meshlet:{version}"),
            &format!("meshlet:{}", ctx.tag),
        );
    let file = std::env::temp_dir().join(format!("meshlet-manifests-{}.yaml", std::process::id()));
    std::fs::write(&file, text).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let applied = tokio::task::block_in_place(|| {
        run(ctx.kubectl().args(["apply", "-f"]).arg(&file))?;
        run(Command::new("bash")
            .arg(repo().join("manifests/webhook-cert.sh"))
            .env("KUBECTL", &ctx.kubectl)
            .env("KUBECONFIG", &ctx.kubeconfig))
    });
    let result = match applied {
        Ok(out) => {
            println!("    {}", out.trim());
            manifests_mesh_pods(ctx, t).await
        }
        Err(e) => Err(e),
    };
    // Leave no cluster-scoped object behind (the namespaces go at the end of the run).
    let _ = tokio::task::block_in_place(|| {
        run(ctx
            .kubectl()
            .args(["delete", "--ignore-not-found", "--wait=false", "-f"])
            .arg(&file))
    });
    let _ = std::fs::remove_file(&file);
    result
}

async fn manifests_mesh_pods(ctx: &Ctx, t: Instant) -> TestResult {
    let deploy: Api<Deployment> = Api::namespaced(ctx.client.clone(), SYSTEM_NS);
    wait_for(
        "the injector from manifests/ to be available",
        Duration::from_secs(120),
        || async {
            let d = deploy.get("meshlet-injector").await.ok()?;
            (d.status?.ready_replicas? == 2).then_some(())
        },
    )
    .await?;
    wait_for(
        "pods to be injected again",
        Duration::from_secs(30),
        || async { ctx.would_inject(APPS_NS).await.ok().filter(|b| *b) },
    )
    .await?;
    println!(
        "    injector from manifests/ available in {:?}",
        t.elapsed()
    );
    // A new replica of beta is meshed by it, and balanced to.
    let b = ctx
        .scale_up_and_reach("beta", "alpha")
        .await
        .map_err(|e| format!("the new beta replica gets no traffic: {e}"))?;
    println!("    alpha -> beta with the manifests' injector: {:?}", b.ok);
    Ok(())
}

impl Ctx {
    /// The apps' pods through the API, on a handle a spawned task can own.
    fn apps(&self) -> Apps {
        Apps {
            client: self.client.clone(),
        }
    }
}

struct Apps {
    client: kube::Client,
}

impl Apps {
    /// GET through the API server's pod proxy (`pods/<name>:<port>/proxy/<path>`).
    async fn pod_get(&self, ns: &str, pod: &str, port: u16, path: &str) -> Result<String, String> {
        let uri = format!("/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy{path}");
        let req = http::Request::get(&uri)
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        self.client
            .request_text(req)
            .await
            .map_err(|e| format!("GET {uri}: {e}"))
    }

    /// Running, Ready pods of an app (by the `app` label), sorted by name.
    async fn ready_pods(&self, ns: &str, app: &str) -> Vec<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let Ok(list) = api
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
        else {
            return Vec::new();
        };
        let mut pods: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p))
            .collect();
        pods.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        pods
    }

    /// Answers per backend pod, and failures, from the first Ready pod of `from`.
    async fn burst(&self, from: &str, n: usize, c: usize) -> Result<Burst, String> {
        let pods = self.ready(from).await?;
        let pod = pods.first().ok_or(format!("no Ready pod of {from}"))?;
        self.burst_from(pod, n, c).await
    }

    /// Names of the Ready pods of an app, sorted.
    async fn ready(&self, app: &str) -> Result<Vec<String>, String> {
        let pods = self.ready_pods(APPS_NS, app).await;
        Ok(pods.into_iter().filter_map(|p| p.metadata.name).collect())
    }

    /// Bursts from `pod` until `want` backend pods have answered, for at most `within`; any
    /// failed call is an error. Repeated rather than one burst: a caller's sidecar learns a new
    /// replica from its watch a moment after the replica is Ready, and a replica whose latency
    /// estimate took a peak (one slow answer on a loaded machine) is rightly passed over until
    /// the estimate decays (10 s by default), so one burst may miss it while all is well.
    async fn reach_all(
        &self,
        pod: &str,
        (n, c): (usize, usize),
        want: usize,
        within: Duration,
    ) -> Result<Burst, String> {
        let deadline = Instant::now() + within;
        let mut all = Burst::default();
        loop {
            let b = self.burst_from(pod, n, c).await?;
            if b.failed > 0 {
                return Err(format!("{pod}: {b:?}"));
            }
            for (k, v) in b.ok {
                *all.ok.entry(k).or_default() += v;
            }
            if all.ok.len() >= want {
                return Ok(all);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{pod}: {} of {want} backend pods answered in {within:?}: {all:?}",
                    all.ok.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `/burst` from this pod, bounded: a stuck burst is an error naming the pod, not a hang.
    async fn burst_from(&self, pod: &str, n: usize, c: usize) -> Result<Burst, String> {
        let path = format!("/burst?n={n}&c={c}");
        let text = tokio::time::timeout(
            Duration::from_secs(90),
            self.pod_get(APPS_NS, pod, 8080, &path),
        )
        .await
        .map_err(|_| format!("{pod} {path}: no answer in 90 s"))??;
        Burst::parse(&text)
    }
}

/// helm and kubectl: from MESHLET_K8S_BIN, else built by tests/e2e/build-k8s.sh (local), else
/// from PATH (kind).
fn tools(local: bool) -> Result<(PathBuf, PathBuf), String> {
    if let Some(bin) = std::env::var_os("MESHLET_K8S_BIN") {
        let bin = PathBuf::from(bin);
        return Ok((bin.join("helm"), bin.join("kubectl")));
    }
    if local {
        let bin = harness::k8s_bin()?;
        return Ok((bin.join("helm"), bin.join("kubectl")));
    }
    Ok((PathBuf::from("helm"), PathBuf::from("kubectl")))
}

fn main() {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        // One scenario, in order: each test builds on the previous one's cluster state.
        args.test_threads = Some(1);
    }
    let target = std::env::var("MESHLET_E2E_TARGET").unwrap_or_else(|_| "local".into());
    let local = match target.as_str() {
        "local" => true,
        "kind" => false,
        other => {
            eprintln!("helm_e2e: MESHLET_E2E_TARGET={other:?}: expected local or kind");
            std::process::exit(2);
        }
    };
    if local && let Some(why) = harness::skip_reason() {
        println!("helm_e2e: skipped: {why}");
        libtest_mimic::run(&args, Vec::new()).exit();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (helm, kubectl) = tools(local).unwrap_or_else(|e| {
        eprintln!("helm_e2e: {e}");
        std::process::exit(1)
    });
    let ctx = if local {
        harness::ensure_e2e_app();
        let cluster = match rt.block_on(harness::Cluster::start(harness::binaries())) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("helm_e2e: cannot start the control plane: {e}");
                std::process::exit(1);
            }
        };
        Ctx {
            kubeconfig: cluster.kubeconfig.clone(),
            client: cluster.client.clone(),
            helm,
            kubectl,
            tag: image_tag(),
            cluster: Some(cluster),
            rt: rt.handle().clone(),
            installed: AtomicBool::new(false),
        }
    } else {
        let kubeconfig = std::env::var_os("KUBECONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                eprintln!("helm_e2e: MESHLET_E2E_TARGET=kind needs KUBECONFIG");
                std::process::exit(2)
            });
        if std::env::var_os("MESHLET_E2E_IMAGE_TAG").is_none() {
            eprintln!("helm_e2e: MESHLET_E2E_TARGET=kind needs MESHLET_E2E_IMAGE_TAG");
            std::process::exit(2);
        }
        let client = rt
            .block_on(meshlet::discovery::kubernetes::KubeResolver::client(Some(
                &kubeconfig,
            )))
            .unwrap_or_else(|e| {
                eprintln!("helm_e2e: {e}");
                std::process::exit(1)
            });
        Ctx {
            kubeconfig,
            client,
            helm,
            kubectl,
            tag: image_tag(),
            cluster: None,
            rt: rt.handle().clone(),
            installed: AtomicBool::new(false),
        }
    };
    let ctx = Arc::new(ctx);
    macro_rules! trial {
        ($name:ident) => {{
            let ctx = ctx.clone();
            Trial::test(stringify!($name), move || {
                let limit = Duration::from_secs(300);
                harness::run_trial(&ctx.rt, stringify!($name), limit, $name(&ctx))
                    .map_err(Failed::from)
            })
        }};
    }
    let trials = vec![
        trial!(chart_and_manifests_pass_server_side_dry_run),
        trial!(cert_manager_values_pass_server_side_dry_run),
        trial!(helm_install_meshes_two_services),
        trial!(killed_replica_fails_no_idempotent_request),
        trial!(helm_upgrade_keeps_the_webhook_working),
        trial!(identity_service_from_the_chart),
        trial!(helm_uninstall_leaves_nothing_behind),
        trial!(plain_manifests_and_webhook_cert_script_mesh_pods),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    // Leave the cluster as found (kind) or stop it (local).
    rt.block_on(async {
        let nss: Api<Namespace> = Api::all(ctx.client.clone());
        for ns in [APPS_NS, SYSTEM_NS] {
            let _ = nss.delete(ns, &DeleteParams::default()).await;
        }
    });
    match Arc::try_unwrap(ctx) {
        Ok(ctx) => {
            if let Some(c) = ctx.cluster {
                let dir = c.dir.clone();
                c.stop();
                // Kept for a failed run, removed after a passing one (as in k8s_e2e).
                if !conclusion.has_failed() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        Err(_) => eprintln!("helm_e2e: the context is still shared; the cluster is left running"),
    }
    drop(rt);
    conclusion.exit();
}
