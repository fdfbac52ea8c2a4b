//! End-to-end tests against a real Kubernetes control plane (needs root and Go; CI has both).
//!
//! One control plane per run of this test binary (a custom harness: libtest-mimic), shared by
//! every test; each test works in a namespace of its own. Pods run under the harness's
//! stand-in kubelet (tests/e2e/harness.rs) in network namespaces on 198.18.0.0/16.

#[path = "e2e/harness.rs"]
mod harness;
mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use harness::{Cluster, wait_for};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use libtest_mimic::{Arguments, Failed, Trial};
use serde::Deserialize;
use serde_json::json;
use support::{H1Client, Meshlet, metric};

type TestResult = Result<(), String>;

struct Ctx {
    cluster: Cluster,
    rt: tokio::runtime::Handle,
}

static NS_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Ctx {
    async fn namespace(&self, prefix: &str) -> Result<String, String> {
        let name = format!("{prefix}-{}", NS_COUNTER.fetch_add(1, Ordering::SeqCst));
        let api: Api<Namespace> = Api::all(self.cluster.client.clone());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .map_err(|e| format!("create namespace {name}: {e}"))?;
        Ok(name)
    }

    async fn apply_service(&self, ns: &str, svc: serde_json::Value) -> Result<Service, String> {
        let api: Api<Service> = Api::namespaced(self.cluster.client.clone(), ns);
        let svc: Service = serde_json::from_value(svc).map_err(|e| e.to_string())?;
        api.create(&PostParams::default(), &svc)
            .await
            .map_err(|e| format!("create service: {e}"))
    }

    async fn create_pod(&self, ns: &str, pod: serde_json::Value) -> Result<(), String> {
        let api: Api<Pod> = Api::namespaced(self.cluster.client.clone(), ns);
        let pod: Pod = serde_json::from_value(pod).map_err(|e| e.to_string())?;
        api.create(&PostParams::default(), &pod)
            .await
            .map(|_| ())
            .map_err(|e| format!("create pod: {e}"))
    }

    async fn delete_pod(&self, ns: &str, name: &str) -> Result<(), String> {
        let api: Api<Pod> = Api::namespaced(self.cluster.client.clone(), ns);
        api.delete(name, &DeleteParams::default())
            .await
            .map(|_| ())
            .map_err(|e| format!("delete pod {name}: {e}"))
    }

    /// Ready endpoint addresses of a service, as the EndpointSlice controller publishes them.
    async fn ready_endpoints(&self, ns: &str, svc: &str) -> Vec<String> {
        let api: Api<EndpointSlice> = Api::namespaced(self.cluster.client.clone(), ns);
        let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
        let Ok(list) = api.list(&lp).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for s in list {
            for e in s.endpoints {
                if e.conditions.and_then(|c| c.ready).unwrap_or(true) {
                    out.extend(e.addresses);
                }
            }
        }
        out.sort();
        out
    }

    async fn wait_endpoints(&self, ns: &str, svc: &str, n: usize) -> Result<Vec<String>, String> {
        wait_for(
            &format!("{n} ready endpoints of {svc}.{ns}"),
            Duration::from_secs(60),
            || async {
                let eps = self.ready_endpoints(ns, svc).await;
                (eps.len() == n).then_some(eps)
            },
        )
        .await
    }

    /// Creates ServiceAccount `sa` in `ns` and writes a kubeconfig that authenticates as it (a
    /// token from the TokenRequest API, an hour long), for a process that must run with only
    /// the permissions a manifest grants.
    async fn service_account_kubeconfig(&self, ns: &str, sa: &str) -> Result<PathBuf, String> {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let sas: Api<ServiceAccount> = Api::namespaced(self.cluster.client.clone(), ns);
        create(&sas, json!({"metadata": {"name": sa}})).await?;
        let token = sa_token(self, ns, sa, None, None).await?;
        let admin = std::fs::read_to_string(&self.cluster.kubeconfig).map_err(|e| e.to_string())?;
        let line = |key: &str| {
            admin
                .lines()
                .find(|l| l.trim_start().starts_with(key))
                .map(|l| l.trim().to_string())
                .unwrap_or_default()
        };
        let kubeconfig = self.cluster.dir.join(format!("{ns}-{sa}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    {}\n    {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
                line("server:"),
                line("certificate-authority-data:")
            ),
        )
        .map_err(|e| e.to_string())?;
        Ok(kubeconfig)
    }

    /// meshlet in this process with Kubernetes discovery and an upstream listener per service.
    async fn meshlet(&self, upstreams: &[String]) -> Meshlet {
        // A 20ms peak-EWMA decay (not the default 10s): these tests check that every pod gets a
        // share, and one slow answer on a loaded machine would otherwise keep its pod out of a
        // whole sub-second run (see `short_decay` in tests/support).
        let mut yaml = format!(
            "admin:\n  listen: 127.0.0.1:0\ndiscovery:\n  kubernetes:\n    kubeconfig: {}\nshutdown_grace: 2s\nbalance:\n  decay: 20ms\nupstreams:\n",
            self.cluster.kubeconfig.display()
        );
        for u in upstreams {
            yaml.push_str(&format!("  - listen: 127.0.0.1:0\n    service: {u}\n"));
        }
        Meshlet::start(&yaml).await
    }
}

/// A pod running the e2e app on the given ports, with a readiness probe on the first.
fn app_pod(name: &str, app: &str, ports: &[(u16, &str)]) -> serde_json::Value {
    let listen: Vec<String> = ports.iter().map(|(p, _)| format!(":{p}")).collect();
    let cports: Vec<_> = ports
        .iter()
        .map(|(p, n)| json!({"containerPort": p, "name": n}))
        .collect();
    json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "app", "image": "e2e-app",
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "LISTEN", "value": listen.join(",")},
                ],
                "ports": cports,
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": ports[0].0}, "periodSeconds": 1},
            }],
        },
    })
}

fn service(
    name: &str,
    app: &str,
    ports: &[(u16, &str, serde_json::Value)],
    headless: bool,
) -> serde_json::Value {
    let ports: Vec<_> = ports
        .iter()
        .map(|(p, n, t)| json!({"port": p, "name": n, "targetPort": t, "protocol": "TCP"}))
        .collect();
    let mut spec = json!({"selector": {"app": app}, "ports": ports});
    if headless {
        spec["clusterIP"] = json!("None");
    }
    json!({"metadata": {"name": name}, "spec": spec})
}

/// Sends `n` requests over one keep-alive connection; returns the count per pod.
async fn spread(addr: std::net::SocketAddr, n: usize) -> Result<BTreeMap<String, usize>, String> {
    let mut c = H1Client::connect(addr).await.map_err(|e| e.to_string())?;
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let a = c.get("/").await.map_err(|e| e.to_string())?;
        if a.status != 200 {
            return Err(format!(
                "status {} ({:?})",
                a.status,
                a.header("meshlet-error")
            ));
        }
        *seen.entry(a.body_text()).or_insert(0) += 1;
    }
    Ok(seen)
}

/// `clients` keep-alive connections sending `per_client` requests each, concurrently (p2c
/// weighs in-flight requests; strictly sequential requests all go to the fastest endpoint).
async fn spread_concurrent(
    addr: std::net::SocketAddr,
    clients: usize,
    per_client: usize,
) -> Result<BTreeMap<String, usize>, String> {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(spread(addr, per_client)));
    }
    let mut seen = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.map_err(|e| e.to_string())?? {
            *seen.entry(k).or_insert(0) += v;
        }
    }
    Ok(seen)
}

async fn three_pods_all_get_traffic(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("three").await?;
    ctx.apply_service(
        &ns,
        service("web", "web", &[(80, "http", json!("http"))], false),
    )
    .await?;
    for i in 0..3 {
        ctx.create_pod(&ns, app_pod(&format!("web-{i}"), "web", &[(8080, "http")]))
            .await?;
    }
    ctx.wait_endpoints(&ns, "web", 3).await?;
    let m = ctx.meshlet(&[format!("web.{ns}:80")]).await;
    let seen = spread_concurrent(m.upstream(0), 6, 30).await?;
    println!("    requests per pod: {seen:?}");
    if seen.len() != 3 || seen.values().any(|n| *n < 10) {
        return Err(format!("not every pod got a share: {seen:?}"));
    }
    let text = m.metrics().await;
    let eps = metric(
        &text,
        &format!("meshlet_endpoints{{service=\"web.{ns}:80\"}}"),
    );
    if eps != Some(3.0) {
        return Err(format!("meshlet_endpoints is {eps:?}"));
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn scale_up_reaches_new_pod_within_1s(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("scaleup").await?;
    ctx.apply_service(
        &ns,
        service("web", "web", &[(80, "http", json!(8080))], false),
    )
    .await?;
    ctx.create_pod(&ns, app_pod("web-0", "web", &[(8080, "http")]))
        .await?;
    ctx.wait_endpoints(&ns, "web", 1).await?;
    let m = ctx.meshlet(&[format!("web.{ns}:80")]).await;
    let mut lat = Vec::new();
    for trial in 1..=5 {
        let name = format!("web-{trial}");
        ctx.create_pod(&ns, app_pod(&name, "web", &[(8080, "http")]))
            .await?;
        let key = format!("{ns}/{name}");
        let ready_at = wait_for(
            "the new pod marked Ready",
            Duration::from_secs(30),
            || async {
                ctx.cluster
                    .kubelet
                    .ready_at
                    .lock()
                    .unwrap()
                    .get(&key)
                    .copied()
            },
        )
        .await?;
        // A client sends as soon as it connects (a connection silent for longer than
        // detect.timeout is proxied as opaque TCP, balanced per connection).
        let mut c = H1Client::connect(m.upstream(0))
            .await
            .map_err(|e| e.to_string())?;
        let first = loop {
            let a = c.get("/").await.map_err(|e| e.to_string())?;
            if a.body_text().starts_with(&format!("{name}:")) {
                break Instant::now();
            }
            if ready_at.elapsed() > Duration::from_secs(10) {
                let text = m.metrics().await;
                let eps: Vec<&str> = text
                    .lines()
                    .filter(|l| {
                        l.starts_with("meshlet_endpoints")
                            || l.starts_with("meshlet_connect_errors")
                            || l.starts_with("meshlet_requests_total")
                    })
                    .collect();
                return Err(format!(
                    "{name} got no request 10 s after Ready; endpoints in the API: {:?}; meshlet: {eps:?}",
                    ctx.ready_endpoints(&ns, "web").await
                ));
            }
        };
        lat.push(first.saturating_duration_since(ready_at));
    }
    lat.sort();
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!(
        "    Ready -> first request: p50 {p50:?}, p99 {p99:?} over {} trials: {lat:?}",
        lat.len()
    );
    if p99 > Duration::from_secs(1) {
        return Err(format!("a new pod took {p99:?} to receive traffic"));
    }
    Ok(())
}

async fn rolling_replacement_loses_no_request(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("rolling").await?;
    ctx.apply_service(
        &ns,
        service("web", "web", &[(80, "http", json!("http"))], false),
    )
    .await?;
    for i in 0..3 {
        ctx.create_pod(&ns, app_pod(&format!("old-{i}"), "web", &[(8080, "http")]))
            .await?;
    }
    ctx.wait_endpoints(&ns, "web", 3).await?;
    let m = ctx.meshlet(&[format!("web.{ns}:80")]).await;
    let addr = m.upstream(0);

    // Steady load: 4 clients in a loop until told to stop; every answer is recorded.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log: Arc<std::sync::Mutex<Vec<(Instant, u16, String)>>> = Arc::default();
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, log) = (stop.clone(), log.clone());
        load.push(tokio::spawn(async move {
            let mut c = H1Client::connect(addr).await.unwrap();
            while !stop.load(Ordering::SeqCst) {
                let a = match c.get("/").await {
                    Ok(a) => (a.status, a.body_text()),
                    Err(e) => (0, e.to_string()),
                };
                log.lock().unwrap().push((Instant::now(), a.0, a.1));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let mut deleted_at: HashMap<String, Instant> = HashMap::new();
    for i in 0..3 {
        ctx.create_pod(&ns, app_pod(&format!("new-{i}"), "web", &[(8080, "http")]))
            .await?;
        ctx.wait_endpoints(&ns, "web", 4).await?;
        let old = format!("old-{i}");
        deleted_at.insert(old.clone(), Instant::now());
        ctx.delete_pod(&ns, &old).await?;
        ctx.wait_endpoints(&ns, "web", 3).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        let _ = l.await;
    }
    let log = log.lock().unwrap();
    let failed: Vec<_> = log.iter().filter(|(_, s, _)| *s != 200).collect();
    println!(
        "    {} requests during the rollout, {} failed",
        log.len(),
        failed.len()
    );
    if !failed.is_empty() {
        return Err(format!(
            "failed requests: {:?}",
            &failed[..failed.len().min(5)]
        ));
    }
    // A deleted pod stops receiving new requests within 1 s of its deletion.
    for (pod, at) in &deleted_at {
        let late = log
            .iter()
            .filter(|(t, _, body)| {
                body.starts_with(&format!("{pod}:")) && *t > *at + Duration::from_secs(1)
            })
            .count();
        if late > 0 {
            return Err(format!(
                "{pod} still served {late} requests more than 1 s after deletion"
            ));
        }
    }
    Ok(())
}

async fn named_ports_two_ports_and_headless(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("ports").await?;
    // Two service ports, both with named target ports resolved per pod.
    ctx.apply_service(
        &ns,
        service(
            "web",
            "web",
            &[(80, "http", json!("http")), (9090, "admin", json!("admin"))],
            false,
        ),
    )
    .await?;
    ctx.apply_service(
        &ns,
        service("direct", "web", &[(80, "http", json!(8080))], true),
    )
    .await?;
    for i in 0..2 {
        ctx.create_pod(
            &ns,
            app_pod(
                &format!("web-{i}"),
                "web",
                &[(8080, "http"), (9091, "admin")],
            ),
        )
        .await?;
    }
    ctx.wait_endpoints(&ns, "web", 2).await?;
    let m = ctx
        .meshlet(&[
            format!("web.{ns}:80"),
            format!("web.{ns}:9090"),
            format!("direct.{ns}"),
        ])
        .await;
    for (i, port) in [(0, "8080"), (1, "9091"), (2, "8080")] {
        let seen = spread_concurrent(m.upstream(i), 4, 10).await?;
        if seen.keys().any(|k| !k.ends_with(&format!(":{port}"))) || seen.len() != 2 {
            return Err(format!(
                "upstream {i}: want both pods on port {port}, got {seen:?}"
            ));
        }
    }
    Ok(())
}

/// `service()` with `meshlet.dev/*` (or any) annotations on the Service.
fn annotated_service(
    name: &str,
    app: &str,
    ports: &[(u16, &str, serde_json::Value)],
    annotations: serde_json::Value,
) -> serde_json::Value {
    let mut svc = service(name, app, ports, false);
    svc["metadata"]["annotations"] = annotations;
    svc
}

/// `app_pod()` with extra environment variables (the e2e app's FAIL_STATUS, DELAY_MS, ...).
fn app_pod_env(
    name: &str,
    app: &str,
    ports: &[(u16, &str)],
    env: &[(&str, &str)],
) -> serde_json::Value {
    let mut pod = app_pod(name, app, ports);
    let vars = pod["spec"]["containers"][0]["env"]
        .as_array_mut()
        .expect("app_pod has env");
    for (k, v) in env {
        vars.push(json!({"name": k, "value": v}));
    }
    pod
}

/// A sample's value from Prometheus text: the metric `name` whose labels include all of
/// `labels` (in whatever order the encoder writes them).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            let set = l.split_once('{').and_then(|(_, r)| r.rsplit_once('}'));
            set.is_some_and(|(set, _)| {
                labels
                    .iter()
                    .all(|(k, v)| set.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            })
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// How many requests a pod has served (the e2e app's `/hits`, asked directly at its pod IP on
/// port 8080, not through meshlet).
async fn pod_hits(ctx: &Ctx, ns: &str, pod: &str) -> Result<u64, String> {
    let ip = ctx
        .cluster
        .kubelet
        .pod_ip(ns, pod)
        .ok_or_else(|| format!("no IP for pod {pod}"))?;
    let mut c = H1Client::connect((ip, 8080).into())
        .await
        .map_err(|e| format!("connect to {pod} at {ip}: {e}"))?;
    let a = c.get("/hits").await.map_err(|e| e.to_string())?;
    a.body_text()
        .parse()
        .map_err(|e| format!("{pod}'s /hits: {:?}: {e}", a.body_text()))
}

/// `n` concurrent GETs of `path`, each on a connection of its own: (status, body, x-hits) each.
async fn burst(
    addr: std::net::SocketAddr,
    n: usize,
    path: &'static str,
) -> Result<Vec<(u16, String, Option<String>)>, String> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        tasks.push(tokio::spawn(async move {
            let mut c = H1Client::connect(addr).await.map_err(|e| e.to_string())?;
            let a = c.get(path).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((a.status, a.body_text(), a.header("x-hits")))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

/// The circuit breaker configured only by annotations on the Service: a pod that always answers
/// 503 (while its readiness probe passes, so it stays in the EndpointSlice) is ejected after
/// `breaker-failures` consecutive failures and then gets one probe per `breaker-backoff`, while
/// the clients see at least 99% success.
async fn breaker_from_service_annotations(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("breaker").await?;
    ctx.apply_service(
        &ns,
        annotated_service(
            "web",
            "web",
            &[(80, "http", json!("http"))],
            json!({
                "meshlet.dev/breaker": "consecutive",
                "meshlet.dev/breaker-failures": "3",
                "meshlet.dev/breaker-backoff": "500ms",
                "meshlet.dev/breaker-backoff-max": "500ms",
                // No retries: a retry would hide the failing pod's answers from the clients.
                "meshlet.dev/max-retries": "0",
            }),
        ),
    )
    .await?;
    for i in 0..2 {
        ctx.create_pod(&ns, app_pod(&format!("web-{i}"), "web", &[(8080, "http")]))
            .await?;
    }
    ctx.create_pod(
        &ns,
        app_pod_env("bad", "web", &[(8080, "http")], &[("FAIL_STATUS", "503")]),
    )
    .await?;
    ctx.wait_endpoints(&ns, "web", 3).await?;
    let m = ctx.meshlet(&[format!("web.{ns}:80")]).await;
    let addr = m.upstream(0);
    let svc = format!("web.{ns}:80");
    let transitions = |text: &str, tr: &str| {
        sample(
            text,
            "meshlet_breaker_transitions_total",
            &[("service", &svc), ("transition", tr)],
        )
        .unwrap_or(0.0)
    };

    // Sequential requests until the failing pod is ejected: exactly `breaker-failures` (3, not
    // the default 7) of them fail first.
    let mut c = H1Client::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sent, mut failed) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = c.get("/").await.map_err(|e| e.to_string())?;
        sent += 1;
        match a.status {
            200 => {}
            503 if a.body_text() == "bad:8080 failing" => failed += 1,
            s => return Err(format!("unexpected answer {s}: {}", a.body_text())),
        }
        if transitions(&m.metrics().await, "ejected") >= 1.0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no ejection after {sent} requests ({failed} failed):\n{}",
                m.metrics().await
            ));
        }
    }
    println!("    ejected after {sent} requests, {failed} of them failed");
    if failed != 3 {
        return Err(format!(
            "want ejection after 3 consecutive failures (meshlet.dev/breaker-failures), saw {failed}"
        ));
    }

    // Two seconds of concurrent load: the ejected pod only sees the probes.
    let hits_before = pod_hits(ctx, &ns, "bad").await?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut load = Vec::new();
    for _ in 0..8 {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut c = H1Client::connect(addr).await.map_err(|e| e.to_string())?;
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            while !stop.load(Ordering::SeqCst) {
                let a = c.get("/").await.map_err(|e| e.to_string())?;
                *seen
                    .entry(format!("{} {}", a.status, a.body_text()))
                    .or_insert(0) += 1;
            }
            Ok::<_, String>(seen)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for l in load {
        for (k, v) in l.await.map_err(|e| e.to_string())?? {
            *seen.entry(k).or_insert(0) += v;
        }
    }
    let elapsed = started.elapsed();
    let probes = pod_hits(ctx, &ns, "bad").await? - hits_before;
    let total: usize = seen.values().sum();
    let ok: usize = seen
        .iter()
        .filter(|(k, _)| k.starts_with("200 "))
        .map(|(_, v)| v)
        .sum();
    let text = m.metrics().await;
    println!(
        "    {total} requests in {elapsed:?}: {seen:?}; the failing pod got {probes} (probes); \
         transitions: ejected {}, probe_failed {}, restored {}",
        transitions(&text, "ejected"),
        transitions(&text, "probe_failed"),
        transitions(&text, "restored"),
    );
    // One probe per 500 ms (+/- 10% jitter), as soon as one is due under this load.
    let most = (elapsed.as_millis() / 450) as u64 + 1;
    if probes < 2 || probes > most {
        return Err(format!(
            "the ejected pod got {probes} requests in {elapsed:?}; want about one per 500 ms (2..={most})"
        ));
    }
    if (ok as f64) < 0.99 * total as f64 || total < 200 {
        return Err(format!("{ok} of {total} requests succeeded: {seen:?}"));
    }
    if transitions(&text, "restored") != 0.0 {
        return Err("an always-failing pod was restored".into());
    }
    // Everything the failing pod got in the window was a probe, and each probe failed.
    if transitions(&text, "probe_failed") != probes as f64 {
        return Err(format!(
            "the failing pod got {probes} requests but {} failed probes were counted",
            transitions(&text, "probe_failed")
        ));
    }
    Ok(())
}

/// Request deduplication switched on by an annotation, then off by changing it on the live
/// Service: a running meshlet follows.
async fn dedup_from_service_annotation_follows_changes(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("dedup").await?;
    ctx.apply_service(
        &ns,
        annotated_service(
            "web",
            "web",
            &[(80, "http", json!("http"))],
            json!({"meshlet.dev/dedup": "true"}),
        ),
    )
    .await?;
    ctx.create_pod(
        &ns,
        app_pod_env("web-0", "web", &[(8080, "http")], &[("DELAY_MS", "300")]),
    )
    .await?;
    ctx.wait_endpoints(&ns, "web", 1).await?;
    let m = ctx.meshlet(&[format!("web.{ns}:80")]).await;
    let addr = m.upstream(0);

    // 50 identical GETs while the first is upstream (300 ms): one upstream request.
    let before = pod_hits(ctx, &ns, "web-0").await?;
    let answers = burst(addr, 50, "/same").await?;
    let grew = pod_hits(ctx, &ns, "web-0").await? - before;
    let distinct: std::collections::BTreeSet<_> = answers.iter().collect();
    let coalesced = sample(
        &m.metrics().await,
        "meshlet_dedup_coalesced_total",
        &[("service", &format!("web.{ns}:80"))],
    );
    println!(
        "    dedup on: 50 requests, {grew} upstream, answers {distinct:?}, coalesced {coalesced:?}"
    );
    if grew != 1 {
        return Err(format!(
            "dedup on: 50 identical requests made {grew} upstream"
        ));
    }
    if distinct.len() != 1 || answers[0].0 != 200 || answers[0].2.is_none() {
        return Err(format!("dedup on: the answers differ: {distinct:?}"));
    }
    if coalesced != Some(49.0) {
        return Err(format!("meshlet_dedup_coalesced_total is {coalesced:?}"));
    }

    // Switch it off on the live Service.
    let api: Api<Service> = Api::namespaced(ctx.cluster.client.clone(), &ns);
    let patched = Instant::now();
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"meshlet.dev/dedup": "false"}}})),
    )
    .await
    .map_err(|e| format!("patch service: {e}"))?;
    let bursts = wait_for(
        "meshlet to stop deduplicating",
        Duration::from_secs(20),
        || async {
            let before = pod_hits(ctx, &ns, "web-0").await.ok()?;
            burst(addr, 10, "/same").await.ok()?;
            let grew = pod_hits(ctx, &ns, "web-0").await.ok()? - before;
            (grew > 1).then_some(grew)
        },
    )
    .await?;
    println!(
        "    dedup off {:?} after the patch (a burst of 10 made {bursts} upstream)",
        patched.elapsed()
    );
    // And now every request goes upstream on its own.
    let before = pod_hits(ctx, &ns, "web-0").await?;
    let answers = burst(addr, 10, "/same").await?;
    let grew = pod_hits(ctx, &ns, "web-0").await? - before;
    let distinct: std::collections::BTreeSet<_> = answers.iter().map(|a| &a.2).collect();
    if grew != 10 || distinct.len() != 10 {
        return Err(format!(
            "dedup off: 10 requests made {grew} upstream, {} distinct answers",
            distinct.len()
        ));
    }
    Ok(())
}

/// The webhook on a real API server: `meshlet inject` as a child process of the test,
/// registered by URL on loopback, scoped by a namespace label to this test's namespaces.
async fn injected_pods_are_meshed_end_to_end(ctx: &Ctx) -> TestResult {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    };

    let tag = format!("meshlet-e2e-inject-{}", std::process::id());
    // Namespaces first, so the injector's namespace watch lists them at its start.
    let mesh = ctx.namespace("inject").await?;
    let plain = ctx.namespace("inject-plain").await?;
    let nss: Api<Namespace> = Api::all(ctx.cluster.client.clone());
    for (ns, annotations) in [
        (&mesh, json!({"meshlet.dev/inject": "enabled"})),
        (&plain, json!({})),
    ] {
        let patch = json!({"metadata": {"labels": {"meshlet-e2e-inject": tag}, "annotations": annotations}});
        nss.patch(ns, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| format!("label namespace {ns}: {e}"))?;
    }

    // A CA and a serving certificate for 127.0.0.1.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "meshlet e2e CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.subject_alt_names = vec![SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())];
    params
        .distinguished_name
        .push(DnType::CommonName, "meshlet-inject");
    let cert = params.signed_by(&key, &ca).map_err(|e| e.to_string())?;
    let dir = ctx.cluster.dir.join(&mesh);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (crt, pem_key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&crt, cert.pem()).map_err(|e| e.to_string())?;
    std::fs::write(&pem_key, key.serialize_pem()).map_err(|e| e.to_string())?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let log = std::fs::File::create(dir.join("inject.log")).map_err(|e| e.to_string())?;
    let child = std::process::Command::new(&harness::binaries()["meshlet"])
        .args(["inject", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(&crt)
        .arg("--tls-key")
        .arg(&pem_key)
        .args(["--image", "meshlet"])
        .env("KUBECONFIG", &ctx.cluster.kubeconfig)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("start meshlet inject: {e}"))?;
    let mut inject = InjectProcess(Some(child));

    let hooks: Api<MutatingWebhookConfiguration> = Api::all(ctx.cluster.client.clone());
    let hook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": tag},
        "webhooks": [{
            "name": "inject.meshlet.dev",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{port}/mutate"),
                "caBundle": base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    ca.pem().as_bytes(),
                ),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            "namespaceSelector": {"matchLabels": {"meshlet-e2e-inject": tag}},
        }],
    }))
    .map_err(|e| e.to_string())?;
    hooks
        .create(&PostParams::default(), &hook)
        .await
        .map_err(|e| format!("create the MutatingWebhookConfiguration: {e}"))?;

    let result = injected_pods_inner(ctx, &mesh, &plain, port, &mut inject).await;
    drop(inject);
    let _ = hooks.delete(&tag, &DeleteParams::default()).await;
    result
}

/// The injector child process, killed by its PID when dropped.
struct InjectProcess(Option<std::process::Child>);

impl InjectProcess {
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for InjectProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether the stored pod was meshed, checked in detail when it was.
fn meshed(pod: &Pod) -> Result<bool, String> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("meshlet.dev/injected"))
        .cloned();
    let inits: Vec<_> = spec.init_containers.clone().unwrap_or_default();
    let has_meshlet = inits
        .iter()
        .chain(&spec.containers)
        .any(|c| c.name.starts_with("meshlet"));
    if annotated.is_none() {
        return if has_meshlet {
            Err(format!("{name}: meshlet containers without the annotation"))
        } else {
            Ok(false)
        };
    }
    if annotated.as_deref() != Some("true") {
        return Err(format!("{name}: meshlet.dev/injected = {annotated:?}"));
    }
    let names: Vec<_> = inits.iter().map(|c| c.name.as_str()).collect();
    if names != ["meshlet-init", "meshlet-proxy"] {
        return Err(format!("{name}: init containers {names:?}"));
    }
    let proxy = &inits[1];
    let uid = proxy.security_context.as_ref().and_then(|s| s.run_as_user);
    if uid != Some(7102) || proxy.restart_policy.as_deref() != Some("Always") {
        return Err(format!(
            "{name}: the sidecar runs as {uid:?}, restartPolicy {:?}",
            proxy.restart_policy
        ));
    }
    let app = spec
        .containers
        .iter()
        .find(|c| c.name == "app")
        .ok_or(format!("{name}: no app container"))?;
    let probe = app
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .ok_or(format!("{name}: the app lost its readinessProbe"))?;
    let port = match &probe.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
        _ => 0,
    };
    if probe.path.as_deref() != Some("/app-health/app/readyz") || port != 7190 {
        return Err(format!(
            "{name}: the app's readinessProbe is {:?} on {:?}",
            probe.path, probe.port
        ));
    }
    Ok(true)
}

async fn injected_pods_inner(
    ctx: &Ctx,
    mesh: &str,
    plain: &str,
    port: u16,
    inject: &mut InjectProcess,
) -> TestResult {
    let pods: Api<Pod> = Api::namespaced(ctx.cluster.client.clone(), mesh);
    // The injector serves once its namespace watch has listed (up to 10 s).
    wait_for(
        "meshlet inject to listen",
        Duration::from_secs(15),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await?;

    let svc = ctx
        .apply_service(
            mesh,
            service("backend", "backend", &[(80, "http", json!(8080))], false),
        )
        .await?;
    let vip = svc.spec.and_then(|s| s.cluster_ip).ok_or("no ClusterIP")?;
    for i in 0..2 {
        ctx.create_pod(
            mesh,
            app_pod_env(
                &format!("backend-{i}"),
                "backend",
                &[(8080, "http")],
                &[("DELAY_MS", "20")],
            ),
        )
        .await?;
    }
    let call = format!("http://{vip}:80/");
    ctx.create_pod(
        mesh,
        app_pod_env("client", "client", &[(8080, "http")], &[("CALL", &call)]),
    )
    .await?;
    for name in ["backend-0", "backend-1", "client"] {
        let pod = pods
            .get(name)
            .await
            .map_err(|e| format!("get {name}: {e}"))?;
        if !meshed(&pod)? {
            return Err(format!("{name} was not injected: {:?}", pod.metadata));
        }
    }

    // The harness runs them unchanged; readiness goes through the sidecars' /app-health.
    ctx.wait_endpoints(mesh, "backend", 2).await?;
    wait_for("the client pod Ready", Duration::from_secs(30), || async {
        ctx.cluster
            .kubelet
            .ready_at
            .lock()
            .unwrap()
            .get(&format!("{mesh}/client"))
            .copied()
    })
    .await?;
    let ip = ctx
        .cluster
        .kubelet
        .pod_ip(mesh, "client")
        .ok_or("no IP for the client")?;
    // The client's sidecar learns the second endpoint from its own watch, a moment after the
    // EndpointSlice shows it: wait (bounded) until a call reaches each backend once.
    let mut c = H1Client::connect((ip, 8080).into())
        .await
        .map_err(|e| e.to_string())?;
    let mut warm: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while warm.len() < 2 && Instant::now() < deadline {
        if let Ok(a) = c.get("/call").await
            && a.status == 200
        {
            *warm.entry(a.body_text()).or_insert(0) += 1;
        }
    }
    // Concurrent calls (P2C over peak-EWMA weighs in-flight requests; sequential calls to two
    // equal endpoints may all go to the faster one), 8 app connections × 10 calls.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            let mut c = H1Client::connect((ip, 8080).into())
                .await
                .map_err(|e| e.to_string())?;
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..10 {
                let a = c.get("/call").await.map_err(|e| e.to_string())?;
                if a.status != 200 {
                    return Err(format!(
                        "call through the sidecar: {} {}",
                        a.status,
                        a.body_text()
                    ));
                }
                *seen.entry(a.body_text()).or_insert(0) += 1;
            }
            Ok::<_, String>(seen)
        }));
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await.map_err(|e| e.to_string())?? {
            *seen.entry(k).or_insert(0) += v;
        }
    }
    println!("    calls to {vip}:80 per pod: {seen:?}");
    if seen.len() != 2
        || !seen.keys().all(|k| k.starts_with("backend-"))
        || seen.values().any(|n| *n < 8)
    {
        return Err(format!(
            "the ClusterIP calls did not reach both backends: {seen:?}"
        ));
    }
    for name in ["backend-0", "backend-1"] {
        let bip = ctx
            .cluster
            .kubelet
            .pod_ip(mesh, name)
            .ok_or(format!("no IP for {name}"))?;
        let (status, text) = support::admin_get((bip, 7190).into(), "/metrics").await?;
        let inbound: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("meshlet_requests_total{") && l.contains("direction=\"inbound\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        println!("    {name}: {inbound} inbound requests in its sidecar's metrics");
        if status != 200 || inbound < 1.0 {
            return Err(format!(
                "{name}'s sidecar shows no inbound requests ({status}): {text}"
            ));
        }
    }

    // A namespace without the annotation: the webhook is called and leaves the pod alone.
    ctx.create_pod(plain, app_pod("plain", "plain", &[(8080, "http")]))
        .await?;
    let pod = Api::<Pod>::namespaced(ctx.cluster.client.clone(), plain)
        .get("plain")
        .await
        .map_err(|e| format!("get plain: {e}"))?;
    if meshed(&pod)? {
        return Err("a pod in a namespace without the annotation was injected".into());
    }

    // The webhook down: pods are still created (failurePolicy Ignore), visibly un-meshed.
    inject.kill();
    let started = Instant::now();
    ctx.create_pod(mesh, app_pod("late", "late", &[(8080, "http")]))
        .await?;
    println!(
        "    pod created with the webhook down in {:?}",
        started.elapsed()
    );
    let pod = pods
        .get("late")
        .await
        .map_err(|e| format!("get late: {e}"))?;
    if meshed(&pod)? {
        return Err("a pod created with the webhook down was injected".into());
    }
    // Let the harness finish starting the last two pods, so none is mid-start at the end of
    // the run (the kubelet's stop_all only stops pods whose start completed).
    for (ns, name) in [(plain, "plain"), (mesh, "late")] {
        wait_for(
            &format!("{name} Ready"),
            Duration::from_secs(20),
            || async {
                ctx.cluster
                    .kubelet
                    .ready_at
                    .lock()
                    .unwrap()
                    .get(&format!("{ns}/{name}"))
                    .copied()
            },
        )
        .await?;
    }
    Ok(())
}

/// A bad annotation value is ignored (with a warning and a count), the default is used, and
/// traffic flows: `max-retries: lots` leaves the default 2 retries, which hide a failing pod.
async fn invalid_annotation_is_ignored_and_counted(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("badannot").await?;
    ctx.apply_service(
        &ns,
        annotated_service(
            "web",
            "web",
            &[(80, "http", json!("http"))],
            json!({"meshlet.dev/max-retries": "lots"}),
        ),
    )
    .await?;
    ctx.create_pod(&ns, app_pod("web-0", "web", &[(8080, "http")]))
        .await?;
    ctx.create_pod(
        &ns,
        app_pod_env("bad", "web", &[(8080, "http")], &[("FAIL_STATUS", "503")]),
    )
    .await?;
    ctx.wait_endpoints(&ns, "web", 2).await?;
    let m = ctx.meshlet(&[format!("web.{ns}:80")]).await;
    // Every request succeeds: those sent to the failing pod are retried on the other. p2c may
    // avoid the failing pod for a while, so send until one retry shows (every answer a 200).
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        for (k, v) in spread(m.upstream(0), 20).await? {
            *seen.entry(k).or_insert(0) += v;
        }
        let text = m.metrics().await;
        let retried = sample(
            &text,
            "meshlet_retries_total",
            &[("service", &format!("web.{ns}:80")), ("reason", "status")],
        );
        if retried.is_some_and(|r| r >= 1.0) || Instant::now() > deadline {
            break text;
        }
    };
    let errors = sample(
        &text,
        "meshlet_policy_errors_total",
        &[
            ("service", &format!("web.{ns}")),
            ("key", "meshlet.dev/max-retries"),
        ],
    );
    let retries = sample(
        &text,
        "meshlet_retries_total",
        &[("service", &format!("web.{ns}:80")), ("reason", "status")],
    );
    let bad_hits = pod_hits(ctx, &ns, "bad").await?;
    println!(
        "    answers {seen:?}; policy errors {errors:?}; retries on status {retries:?}; \
         the failing pod got {bad_hits}"
    );
    if errors != Some(1.0) {
        return Err(format!(
            "meshlet_policy_errors_total for max-retries is {errors:?}:\n{}",
            text.lines()
                .filter(|l| l.contains("policy_errors"))
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    if bad_hits == 0 || retries.unwrap_or(0.0) < 1.0 {
        return Err(format!(
            "no retry shown (the failing pod got {bad_hits} requests, retries {retries:?})"
        ));
    }
    Ok(())
}

async fn api_server_down_keeps_traffic_flowing(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("apidown").await?;
    ctx.apply_service(
        &ns,
        service("web", "web", &[(80, "http", json!(8080))], false),
    )
    .await?;
    for i in 0..2 {
        ctx.create_pod(&ns, app_pod(&format!("web-{i}"), "web", &[(8080, "http")]))
            .await?;
    }
    ctx.wait_endpoints(&ns, "web", 2).await?;
    let m = ctx.meshlet(&[format!("web.{ns}:80")]).await;
    spread(m.upstream(0), 10).await?;
    let syncs_before = watch_syncs(&m.metrics().await);

    ctx.cluster.stop_apiserver()?;
    let result = async {
        // Traffic keeps flowing to the known endpoints while the API server is away.
        let t0 = Instant::now();
        let mut total = 0;
        while t0.elapsed() < Duration::from_secs(8) {
            let seen = spread_concurrent(m.upstream(0), 4, 10).await?;
            total += seen.values().sum::<usize>();
            let eps = metric(
                &m.metrics().await,
                &format!("meshlet_endpoints{{service=\"web.{ns}:80\"}}"),
            );
            if eps != Some(2.0) {
                return Err(format!(
                    "with the API server down meshlet has {eps:?} endpoints; served {seen:?}"
                ));
            }
        }
        println!("    {total} requests served while the API server was down");
        // The staleness shows in /ready's detail and the metric (watches notice the failure
        // when they reconnect).
        wait_for("staleness in /ready", Duration::from_secs(120), || async {
            let (_, body) = support::admin_get(m.addrs.admin, "/ready").await.ok()?;
            body.contains("discovery stale").then_some(())
        })
        .await?;
        let text = m.metrics().await;
        if !text
            .lines()
            .any(|l| l.starts_with("meshlet_discovery_stale{") && l.ends_with(" 1"))
        {
            return Err(format!("no stale watch in the metrics:\n{text}"));
        }
        // Both watches, each noticing on its next try.
        wait_for("both watches stale", Duration::from_secs(30), || async {
            (stale(&m.metrics().await, &ns) == [Some(1.0); 2]).then_some(())
        })
        .await?;
        Ok::<_, String>(())
    }
    .await;
    let mut script = ctx.cluster.start_apiserver()?;
    let resumed = watches_resumed(ctx, &m, &ns).await;
    let started = tokio::task::spawn_blocking(move || script.wait())
        .await
        .map_err(|e| e.to_string())?;
    if !started.as_ref().is_ok_and(|s| s.success()) {
        return Err(format!("control-plane.sh start-apiserver: {started:?}"));
    }
    result?;
    // meshlet's watches resume within 5 s of the API server's return (their backoff is at
    // most 4 s).
    let (back, after_ready) = resumed?;
    let syncs = watch_syncs(&m.metrics().await);
    println!(
        "    the watches resumed {after_ready:?} after the API server answered /readyz \
         (lists completed by the Services and EndpointSlice watches: {syncs_before:?} before, \
         {syncs:?} after)"
    );
    if after_ready > Duration::from_secs(5) {
        return Err(format!(
            "the watches resumed {after_ready:?} after the API server's return (at most 5 s)"
        ));
    }
    // Changes flow again: a third pod joins. Once the EndpointSlice holds the third endpoint,
    // meshlet has it within 5 s.
    ctx.create_pod(&ns, app_pod("web-2", "web", &[(8080, "http")]))
        .await?;
    ctx.wait_endpoints(&ns, "web", 3).await?;
    let sliced = Instant::now();
    let gauge = format!("meshlet_endpoints{{service=\"web.{ns}:80\"}}");
    wait_for(
        "meshlet to see the third endpoint",
        Duration::from_secs(30),
        || async { (metric(&m.metrics().await, &gauge) == Some(3.0)).then_some(()) },
    )
    .await?;
    let (after_slice, after_back) = (sliced.elapsed(), back.elapsed());
    println!(
        "    the third endpoint reached meshlet {after_slice:?} after its EndpointSlice \
         ({after_back:?} after the API server was back)"
    );
    if after_slice > Duration::from_secs(5) {
        return Err(format!(
            "the watch took {after_slice:?} to deliver the third endpoint (at most 5 s)"
        ));
    }
    wait_for(
        "the third pod to get traffic",
        Duration::from_secs(60),
        || async {
            let seen = spread_concurrent(m.upstream(0), 6, 10).await.ok()?;
            (seen.len() == 3).then_some(())
        },
    )
    .await?;
    wait_for(
        "the watches to recover",
        // A watch counts as recovered after 10 s without an error (see RECOVERED_AFTER).
        Duration::from_secs(60),
        || async {
            let (_, body) = support::admin_get(m.addrs.admin, "/ready").await.ok()?;
            (!body.contains("discovery stale")).then_some(())
        },
    )
    .await
}

/// `meshlet_discovery_watch_syncs_total` of the Services watch and of the EndpointSlice
/// watches: the lists they completed.
fn watch_syncs(metrics: &str) -> [f64; 2] {
    ["services", "endpointslices"].map(|w| {
        sample(
            metrics,
            "meshlet_discovery_watch_syncs_total",
            &[("watch", w)],
        )
        .unwrap_or(0.0)
    })
}

/// `meshlet_discovery_stale` of the Services watch and of web.`ns`:80's EndpointSlice watch.
fn stale(metrics: &str, ns: &str) -> [Option<f64>; 2] {
    [
        "services".to_string(),
        format!("endpointslices web.{ns}:80"),
    ]
    .map(|w| sample(metrics, "meshlet_discovery_stale", &[("watch", &w)]))
}

/// While the API server starts again: when it first answers /readyz (polled every 20 ms), and
/// how long after that both of meshlet's failing watches work again (zero if before). A watch
/// that can go on from its last resource version resumes without a list, and says nothing
/// until something changes: so at once after /readyz a change is made for each watch (an
/// annotation on the Service, an EndpointSlice of no endpoints), and a watch has resumed when
/// it is no longer stale (it clears on the first event after its failures).
async fn watches_resumed(ctx: &Ctx, m: &Meshlet, ns: &str) -> Result<(Instant, Duration), String> {
    let ready = || async {
        let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
        let answer = ctx.cluster.client.request_text(req);
        tokio::time::timeout(Duration::from_secs(1), answer)
            .await
            .ok()?
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut t0, mut resumed) = (None, None);
    while Instant::now() < deadline {
        if t0.is_none() && ready().await.is_some() {
            t0 = Some(Instant::now());
            let services: Api<Service> = Api::namespaced(ctx.cluster.client.clone(), ns);
            let poke = json!({"metadata": {"annotations": {"e2e.meshlet.dev/poke": "1"}}});
            services
                .patch("web", &PatchParams::default(), &Patch::Merge(&poke))
                .await
                .map_err(|e| format!("annotate the Service: {e}"))?;
            let slices: Api<EndpointSlice> = Api::namespaced(ctx.cluster.client.clone(), ns);
            let slice = json!({
                "metadata": {"name": "web-poke", "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "e2e.meshlet.dev",
                }},
                "addressType": "IPv4",
                "endpoints": [],
            });
            let slice = serde_json::from_value(slice).map_err(|e| e.to_string())?;
            slices
                .create(&PostParams::default(), &slice)
                .await
                .map_err(|e| format!("create an EndpointSlice: {e}"))?;
        }
        if resumed.is_none() && stale(&m.metrics().await, ns) == [Some(0.0); 2] {
            resumed = Some(Instant::now());
        }
        if let (Some(t0), Some(resumed)) = (t0, resumed) {
            return Ok((t0, resumed.saturating_duration_since(t0)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!(
        "after 120 s: /readyz answered at {t0:?}; stale watches {:?}",
        stale(&m.metrics().await, ns)
    ))
}

async fn transparent_mode_in_a_pod(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("transparent").await?;
    let svc = ctx
        .apply_service(
            &ns,
            service("web", "web", &[(80, "http", json!(8080))], false),
        )
        .await?;
    let vip = svc.spec.and_then(|s| s.cluster_ip).ok_or("no ClusterIP")?;
    for i in 0..3 {
        ctx.create_pod(&ns, app_pod(&format!("web-{i}"), "web", &[(8080, "http")]))
            .await?;
    }
    ctx.wait_endpoints(&ns, "web", 3).await?;

    // A client pod: iptables rules from an init container (what `meshlet init` will write),
    // the meshlet sidecar as UID 7102 (exempt from the redirect), and the app, whose calls to
    // the Service's ClusterIP only work because meshlet intercepts them (no kube-proxy here).
    let kubeconfig = ctx.cluster.pod_kubeconfig();
    std::fs::set_permissions(
        &kubeconfig,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .ok();
    let config = ctx.cluster.dir.join(format!("{ns}-meshlet.yaml"));
    std::fs::write(
        &config,
        format!(
            // The short decay as in `Ctx::meshlet`: 60 sequential calls must reach all 3 pods.
            "admin:\n  listen: 0.0.0.0:7190\noutbound:\n  listen: 127.0.0.1:7140\ndiscovery:\n  kubernetes:\n    kubeconfig: {}\nbalance:\n  decay: 20ms\n",
            kubeconfig.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).ok();
    let rules = "iptables -t nat -N MESHLET_OUTPUT && \
                 iptables -t nat -A MESHLET_OUTPUT -m owner --uid-owner 7102 -j RETURN && \
                 iptables -t nat -A MESHLET_OUTPUT -d 127.0.0.0/8 -j RETURN && \
                 iptables -t nat -A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 7140 && \
                 iptables -t nat -A OUTPUT -p tcp -j MESHLET_OUTPUT";
    ctx.create_pod(
        &ns,
        json!({
            "metadata": {"name": "client", "labels": {"app": "client"}},
            "spec": {
                "terminationGracePeriodSeconds": 2,
                "initContainers": [{"name": "init", "image": "sh", "command": ["sh", "-c", rules]}],
                "containers": [
                    {"name": "meshlet", "image": "meshlet", "args": ["proxy", "--config", config.display().to_string()],
                     "securityContext": {"runAsUser": 7102, "runAsGroup": 7102},
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": 7190}, "periodSeconds": 1}},
                    {"name": "app", "image": "e2e-app",
                     "env": [{"name": "POD_NAME", "value": "client"}, {"name": "LISTEN", "value": ":8080"},
                             {"name": "CALL", "value": format!("http://{vip}:80/")}]},
                ],
            },
        }),
    )
    .await?;
    let ip = wait_for("the client pod's IP", Duration::from_secs(30), || async {
        ctx.cluster.kubelet.pod_ip(&ns, "client")
    })
    .await?;
    wait_for("the client pod Ready", Duration::from_secs(60), || async {
        ctx.cluster
            .kubelet
            .ready_at
            .lock()
            .unwrap()
            .get(&format!("{ns}/client"))
            .copied()
    })
    .await?;
    // Ask the app (from outside the pod) to call the ClusterIP; its sidecar balances the calls.
    let mut c = H1Client::connect((ip, 8080).into())
        .await
        .map_err(|e| e.to_string())?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..60 {
        let a = c.get("/call").await.map_err(|e| e.to_string())?;
        if a.status != 200 {
            return Err(format!(
                "call through the sidecar: {} {}",
                a.status,
                a.body_text()
            ));
        }
        *seen.entry(a.body_text()).or_insert(0) += 1;
    }
    println!("    calls to {vip}:80 per pod: {seen:?}");
    if seen.len() != 3 {
        return Err(format!(
            "the ClusterIP calls did not reach all 3 pods: {seen:?}"
        ));
    }
    Ok(())
}

/// The dependency `name`'s entry in the JSON of a sidecar's `/health`.
async fn dependency_health(
    admin: std::net::SocketAddr,
    name: &str,
) -> Result<serde_json::Value, String> {
    let (status, body) = support::admin_get(admin, "/health").await?;
    if status != 200 {
        return Err(format!("/health answered {status}: {body}"));
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("/health: {e}: {body}"))?;
    v["dependencies"]
        .as_array()
        .and_then(|deps| deps.iter().find(|d| d["name"] == name))
        .cloned()
        .ok_or_else(|| format!("/health does not list {name}: {body}"))
}

/// A pod's readiness follows a critical dependency: the meshlet sidecar's `/ready` (the pod's
/// readinessProbe) fails while the dependency has no endpoints, so the pod leaves its Service's
/// EndpointSlice, and comes back once the dependency does.
async fn readiness_follows_a_critical_dependency(ctx: &Ctx) -> TestResult {
    let ns = ctx.namespace("readiness").await?;
    let dep = format!("db.{ns}");
    ctx.apply_service(
        &ns,
        service("db", "db", &[(80, "http", json!("http"))], false),
    )
    .await?;
    ctx.apply_service(
        &ns,
        service("web", "web", &[(80, "http", json!(8080))], false),
    )
    .await?;
    ctx.create_pod(&ns, app_pod("db-0", "db", &[(8080, "http")]))
        .await?;
    ctx.wait_endpoints(&ns, "db", 1).await?;

    // web-0: the app, and the meshlet sidecar whose /ready is the pod's readiness probe.
    let kubeconfig = ctx.cluster.pod_kubeconfig();
    std::fs::set_permissions(
        &kubeconfig,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .ok();
    let config = ctx.cluster.dir.join(format!("{ns}-meshlet.yaml"));
    std::fs::write(
        &config,
        format!(
            "admin:\n  listen: 0.0.0.0:7190\ndiscovery:\n  kubernetes:\n    kubeconfig: {}\nhealth:\n  dependencies: [{dep}]\n  critical: [{dep}]\n  ready_requires: critical\n  hysteresis: 1s\n  outage_grace: 10m\n",
            kubeconfig.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).ok();
    ctx.create_pod(
        &ns,
        json!({
            "metadata": {"name": "web-0", "labels": {"app": "web"}},
            "spec": {
                "terminationGracePeriodSeconds": 2,
                "containers": [
                    {"name": "app", "image": "e2e-app",
                     "env": [{"name": "POD_NAME", "value": "web-0"}, {"name": "LISTEN", "value": ":8080"}],
                     "ports": [{"containerPort": 8080, "name": "http"}]},
                    {"name": "meshlet", "image": "meshlet", "args": ["proxy", "--config", config.display().to_string()],
                     "securityContext": {"runAsUser": 7102, "runAsGroup": 7102},
                     "readinessProbe": {"httpGet": {"path": "/ready", "port": 7190},
                                        "periodSeconds": 1, "failureThreshold": 1}},
                ],
            },
        }),
    )
    .await?;
    ctx.wait_endpoints(&ns, "web", 1).await?;
    let ip = ctx
        .cluster
        .kubelet
        .pod_ip(&ns, "web-0")
        .ok_or("no IP for web-0")?;
    let admin: std::net::SocketAddr = (ip, 7190).into();
    let d = dependency_health(admin, &dep).await?;
    if d["state"] != "healthy" || d["critical"] != true || d["declared"] != true {
        return Err(format!("{dep} before the change: {d}"));
    }

    // Take the dependency away: web-0 must leave web's EndpointSlice.
    ctx.delete_pod(&ns, "db-0").await?;
    let removed = Instant::now();
    wait_for(
        "web-0 not ready in web's EndpointSlice",
        Duration::from_secs(30),
        || async {
            ctx.ready_endpoints(&ns, "web")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await?;
    let out_after = removed.elapsed();
    let d = dependency_health(admin, &dep).await?;
    let reason = d["reason"].as_str().unwrap_or_default();
    if d["state"] != "unhealthy" || !reason.contains("endpoints") {
        return Err(format!("{dep} without endpoints: {d}"));
    }
    let (status, body) = support::admin_get(admin, "/ready").await?;
    if status != 503 || !body.contains(&format!("critical dependency {dep} unhealthy")) {
        return Err(format!("/ready without {dep}: {status} {body}"));
    }

    // Bring it back: web-0 must return to the slice.
    ctx.create_pod(&ns, app_pod("db-1", "db", &[(8080, "http")]))
        .await?;
    let restored = Instant::now();
    wait_for(
        "web-0 ready again in web's EndpointSlice",
        Duration::from_secs(30),
        || async { (ctx.ready_endpoints(&ns, "web").await.len() == 1).then_some(()) },
    )
    .await?;
    let back_after = restored.elapsed();
    let d = dependency_health(admin, &dep).await?;
    if d["state"] != "healthy" {
        return Err(format!("{dep} after db-1: {d}"));
    }
    println!(
        "    db-0 deleted -> web-0 out of web's EndpointSlice in {out_after:?}; \
         db-1 created -> web-0 back in {back_after:?}"
    );
    Ok(())
}

/// The RBAC manifest is what meshlet needs, and enough: with a service account token bound only
/// by manifests/meshlet-proxy-rbac.yaml, discovery works; without it, meshlet stays unready; and
/// the token can do nothing else (listing pods is forbidden).
async fn least_privilege_rbac_is_enough(ctx: &Ctx) -> TestResult {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};

    let ns = ctx.namespace("rbac").await?;
    ctx.apply_service(
        &ns,
        service("web", "web", &[(80, "http", json!(8080))], false),
    )
    .await?;
    ctx.create_pod(&ns, app_pod("web-0", "web", &[(8080, "http")]))
        .await?;
    ctx.wait_endpoints(&ns, "web", 1).await?;

    let client = ctx.cluster.client.clone();
    let kubeconfig = ctx.service_account_kubeconfig(&ns, "app").await?;

    // The token alone can do nothing: list pods is forbidden.
    let sa_client = meshlet::discovery::kubernetes::KubeResolver::client(Some(&kubeconfig)).await?;
    let pods: Api<Pod> = Api::namespaced(sa_client.clone(), &ns);
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => return Err(format!("listing pods with the proxy's token: {other:?}")),
    }

    // Without the binding, meshlet cannot list Services and is not ready.
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\ndiscovery:\n  kubernetes:\n    kubeconfig: {}\nupstreams:\n  - listen: 127.0.0.1:0\n    service: web.{ns}:80\n",
        kubeconfig.display()
    );
    let app = meshlet::app::App::bind(
        meshlet::config::Config::parse("rbac.yaml", &yaml).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let addrs = app.addresses().clone();
    let stop = app.shutdown_token();
    let run = tokio::spawn(app.run());
    let guard = scopeguard(stop);
    wait_for(
        "meshlet to report what it waits for",
        Duration::from_secs(10),
        || async {
            let (status, body) = support::admin_get(addrs.admin, "/ready").await.ok()?;
            (status == 503 && body.contains("first list of Services")).then_some(())
        },
    )
    .await?;

    // Apply the manifest (as `kubectl apply -f manifests/meshlet-proxy-rbac.yaml` would).
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/manifests/meshlet-proxy-rbac.yaml"
    ))
    .map_err(|e| e.to_string())?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_json::Value::deserialize(doc).map_err(|e| e.to_string())?;
        match v["kind"].as_str() {
            Some("ClusterRole") => {
                let o: ClusterRole = serde_json::from_value(v).map_err(|e| e.to_string())?;
                Api::<ClusterRole>::all(client.clone())
                    .create(&PostParams::default(), &o)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Some("ClusterRoleBinding") => {
                let o: ClusterRoleBinding = serde_json::from_value(v).map_err(|e| e.to_string())?;
                Api::<ClusterRoleBinding>::all(client.clone())
                    .create(&PostParams::default(), &o)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            other => return Err(format!("unexpected kind in the manifest: {other:?}")),
        }
    }
    // The watches retry with backoff and get through.
    wait_for(
        "meshlet ready with the least-privilege token",
        Duration::from_secs(90),
        || async {
            let (status, _) = support::admin_get(addrs.admin, "/ready").await.ok()?;
            (status == 200).then_some(())
        },
    )
    .await?;
    let seen = spread(addrs.upstreams[0], 10).await?;
    if seen.keys().next().map(String::as_str) != Some("web-0:8080") {
        return Err(format!("through the least-privilege meshlet: {seen:?}"));
    }
    drop(guard);
    let _ = run.await;
    Ok(())
}

/// Creates the object `v` describes through `api`; an error names its kind and name.
async fn create<K>(api: &Api<K>, v: serde_json::Value) -> Result<K, String>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
    K::DynamicType: Default,
{
    let what = format!(
        "{} {}",
        K::kind(&K::DynamicType::default()),
        v["metadata"]["name"]
    );
    let object: K = serde_json::from_value(v).map_err(|e| format!("{what}: {e}"))?;
    api.create(&PostParams::default(), &object)
        .await
        .map_err(|e| format!("create {what}: {e}"))
}

/// A trust anchor and an issuer signed by it, as PEM: (anchor, issuer certificate, issuer key).
fn test_issuer() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca = |name: &str| {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root = ca("e2e trust anchor");
    let anchor = root.self_signed(&root_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let issuer = ca("e2e issuer")
        .signed_by(&key, &Issuer::new(root, root_key))
        .unwrap();
    (anchor.pem(), issuer.pem(), key.serialize_pem())
}

/// A token of ServiceAccount `sa` from the TokenRequest API, an hour long: for `audience`
/// (default: the API server's) and bound to `pod`, if given.
async fn sa_token(
    ctx: &Ctx,
    ns: &str,
    sa: &str,
    audience: Option<&str>,
    pod: Option<&Pod>,
) -> Result<String, String> {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    let audiences: Vec<&str> = audience.into_iter().collect();
    let mut spec = json!({"audiences": audiences, "expirationSeconds": 3600});
    if let Some(p) = pod {
        spec["boundObjectRef"] = json!({
            "kind": "Pod", "apiVersion": "v1",
            "name": p.metadata.name, "uid": p.metadata.uid,
        });
    }
    let tr: TokenRequest = serde_json::from_value(json!({ "spec": spec })).unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(ctx.cluster.client.clone(), ns);
    Ok(sas
        .create_token_request(sa, &PostParams::default(), &tr)
        .await
        .map_err(|e| format!("token request for {sa}: {e}"))?
        .status
        .ok_or("no token")?
        .token)
}

/// `meshlet identity` with the least privilege (its own ServiceAccount may create TokenReviews
/// and read the issuer Secret, nothing else) signs for a pod-bound token of the right audience
/// and refuses every other token and every bad CSR, each with its gRPC status and a log line.
async fn identity_service_signs_for_bound_tokens_only(ctx: &Ctx) -> TestResult {
    use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    use meshlet::tls::client::{CallError, Endpoint};
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;

    let ns = ctx.namespace("identity").await?;
    let client = ctx.cluster.client.clone();

    // The issuer Secret, as the chart makes it, and another Secret it must not be able to read.
    let (anchor, chain, key) = test_issuer();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    create(
        &secrets,
        json!({
            "metadata": {"name": "meshlet-identity-issuer"},
            "type": "kubernetes.io/tls",
            "stringData": {"tls.crt": chain, "tls.key": key, "ca.crt": anchor},
        }),
    )
    .await?;
    create(
        &secrets,
        json!({"metadata": {"name": "not-yours"}, "stringData": {"x": "y"}}),
    )
    .await?;

    // Its permissions: create TokenReviews; get that one Secret.
    let kubeconfig = ctx
        .service_account_kubeconfig(&ns, "meshlet-identity")
        .await?;
    let subject = json!([{"kind": "ServiceAccount", "name": "meshlet-identity", "namespace": ns}]);
    let rbac = "rbac.authorization.k8s.io";
    create(&Api::<ClusterRole>::all(client.clone()), json!({
        "metadata": {"name": format!("{ns}-identity")},
        "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}],
    }))
    .await?;
    create(
        &Api::<ClusterRoleBinding>::all(client.clone()),
        json!({
            "metadata": {"name": format!("{ns}-identity")},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": format!("{ns}-identity")},
            "subjects": subject,
        }),
    )
    .await?;
    create(&Api::<Role>::namespaced(client.clone(), &ns), json!({
        "metadata": {"name": "identity-issuer"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["meshlet-identity-issuer"], "verbs": ["get"]}],
    }))
    .await?;
    create(
        &Api::<RoleBinding>::namespaced(client.clone(), &ns),
        json!({
            "metadata": {"name": "identity-issuer"},
            "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "identity-issuer"},
            "subjects": subject,
        }),
    )
    .await?;
    let restricted =
        meshlet::discovery::kubernetes::KubeResolver::client(Some(&kubeconfig)).await?;
    match Api::<Secret>::namespaced(restricted, &ns)
        .get("not-yours")
        .await
    {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => {
            return Err(format!(
                "the identity service's token reads another Secret: {other:?}"
            ));
        }
    }

    // A workload: ServiceAccount cart, pod cart-0 running as it.
    create(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
        json!({"metadata": {"name": "cart"}}),
    )
    .await?;
    // Its token as a sidecar will get it: a projected volume for the identity audience, which
    // the stand-in kubelet mints through the TokenRequest API, bound to the pod (the namespace
    // label asks it for real service account tokens).
    Api::<Namespace>::all(client.clone())
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {harness::SA_TOKENS_LABEL: "true"}}})),
        )
        .await
        .map_err(|e| format!("label {ns}: {e}"))?;
    let mut pod = app_pod("cart-0", "cart", &[(8080, "http")]);
    pod["spec"]["serviceAccountName"] = json!("cart");
    pod["spec"]["volumes"] = json!([{"name": "identity-token", "projected": {"sources": [
        {"serviceAccountToken": {"audience": "meshlet.dev/identity", "expirationSeconds": 600, "path": "token"}},
    ]}}]);
    pod["spec"]["containers"][0]["volumeMounts"] =
        json!([{"name": "identity-token", "mountPath": "/var/run/secrets/meshlet"}]);
    ctx.create_pod(&ns, pod).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let cart = pods.get("cart-0").await.map_err(|e| e.to_string())?;

    let (port, admin_port) = (support::free_port(), support::free_port());
    let log = ctx.cluster.dir.join(format!("{ns}-identity.log"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_meshlet"))
        .args([
            "identity",
            "--namespace",
            &ns,
            "--cert-ttl",
            "1h",
            "--kubeconfig",
        ])
        .arg(&kubeconfig)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .stderr(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("meshlet identity: {e}"))?;
    let _child = support::Process(child);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    wait_for(
        "meshlet identity ready",
        Duration::from_secs(30),
        || async {
            matches!(support::admin_get(admin, "/ready").await, Ok((200, _))).then_some(())
        },
    )
    .await
    .map_err(|e| {
        format!(
            "{e}; log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    })?;

    let endpoint = Endpoint {
        address: format!("127.0.0.1:{port}"),
        server_name: format!("meshlet-identity.{ns}.svc"),
        anchors: vec![CertificateDer::from_pem_slice(anchor.as_bytes()).unwrap()],
        timeout: Duration::from_secs(10),
    };
    let csr = |names: &[String]| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        for n in names {
            p.subject_alt_names
                .push(rcgen::SanType::URI(n.clone().try_into().unwrap()));
        }
        p.serialize_request(&key).unwrap().der().to_vec()
    };
    let want = format!("spiffe://cluster.local/ns/{ns}/sa/cart");

    // The good case: the pod's projected token (bound to it, for the service's audience).
    let file = ctx
        .cluster
        .kubelet
        .volume_dir(&ns, "cart-0", "identity-token")
        .join("token");
    let token = wait_for(
        "cart-0's projected token",
        Duration::from_secs(30),
        || async {
            std::fs::read_to_string(&file)
                .ok()
                .filter(|t| !t.is_empty())
        },
    )
    .await?;
    let signed = endpoint
        .certify(&token, &csr(std::slice::from_ref(&want)))
        .await
        .map_err(|e| e.to_string())?;
    if signed.spiffe_id != want {
        return Err(format!("signed for {}, not {want}", signed.spiffe_id));
    }
    let ca = meshlet::identity::ca::Ca::new(
        meshlet::identity::ca::IssuerPem {
            chain: chain.as_bytes(),
            key: key.as_bytes(),
            anchors: anchor.as_bytes(),
        },
        "cluster.local",
        Duration::from_secs(3600),
        Duration::ZERO,
    )?;
    let issued = meshlet::identity::ca::Issued {
        leaf: CertificateDer::from(signed.leaf_der.clone()),
        intermediates: signed
            .intermediates_der
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect(),
        not_after: std::time::UNIX_EPOCH + Duration::from_secs(signed.not_after_unix as u64),
    };
    ca.verify(&issued, std::time::SystemTime::now())?;
    let left = signed.not_after_unix
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    if !(3500..=3600).contains(&left) {
        return Err(format!(
            "the certificate has {left} s left, not about an hour"
        ));
    }

    // Every refusal: the status code and the reason the caller sees.
    let refused = |case: &str,
                   r: Result<meshlet::proto::identity::v1::CertifyResponse, CallError>,
                   code: tonic::Code,
                   reason: &str| match r {
        Err(CallError::Refused { status, .. })
            if status.code() == code && status.message().contains(reason) =>
        {
            Ok(())
        }
        Err(other) => Err(format!("{case}: wanted {code:?} \"{reason}\", got {other}")),
        Ok(r) => Err(format!(
            "{case}: wanted {code:?} \"{reason}\", got a certificate for {}",
            r.spiffe_id
        )),
    };
    let other_audience = sa_token(ctx, &ns, "cart", Some("other"), Some(&cart)).await?;
    let unbound = sa_token(ctx, &ns, "cart", Some("meshlet.dev/identity"), None).await?;
    let someone_else = csr(&["spiffe://cluster.local/ns/kube-system/sa/admin".to_string()]);
    use tonic::Code::{InvalidArgument, Unauthenticated};
    let cases: [(&str, &str, Vec<u8>, tonic::Code, &str); 6] = [
        (
            "a token for another audience",
            &other_audience,
            csr(&[]),
            Unauthenticated,
            "does not accept the token",
        ),
        (
            "a token bound to no pod",
            &unbound,
            csr(&[]),
            Unauthenticated,
            "not bound to a pod",
        ),
        (
            "not a token",
            "not-a-token",
            csr(&[]),
            Unauthenticated,
            "does not accept the token",
        ),
        (
            "a CSR for someone else",
            &token,
            someone_else,
            InvalidArgument,
            "the CSR asks for spiffe://cluster.local/ns/kube-system/sa/admin",
        ),
        (
            "a garbage CSR",
            &token,
            b"garbage".to_vec(),
            InvalidArgument,
            "not a PKCS#10 request",
        ),
        (
            "an oversized CSR",
            &token,
            vec![0x30; 9000],
            InvalidArgument,
            "more than the 8192",
        ),
    ];
    for (case, token, csr, code, reason) in cases {
        refused(case, endpoint.certify(token, &csr).await, code, reason)?;
    }
    // A token of a pod that is gone: the API server no longer accepts it.
    let deleted = Instant::now();
    ctx.delete_pod(&ns, "cart-0").await?;
    wait_for("cart-0 gone", Duration::from_secs(30), || async {
        matches!(pods.get_opt("cart-0").await, Ok(None)).then_some(())
    })
    .await?;
    // The API server checks the pod in its informer cache, which learns of the deletion a
    // moment after the object is gone: poll for the refusal.
    wait_for(
        "the token of the deleted pod refused",
        Duration::from_secs(30),
        || async {
            refused(
                "the token of a deleted pod",
                endpoint.certify(&token, &csr(&[])).await,
                tonic::Code::Unauthenticated,
                "does not accept the token",
            )
            .ok()
        },
    )
    .await?;
    println!(
        "    the deleted pod's token refused {:?} after the delete",
        deleted.elapsed()
    );

    let (_, metrics) = support::admin_get(admin, "/metrics").await?;
    let count = |name: &str| metric(&metrics, name).unwrap_or(-1.0) as i64;
    let issued = count("meshlet_identity_certificates_issued_total");
    let unauthenticated = count("meshlet_identity_refused_total{code=\"unauthenticated\"}");
    let invalid = count("meshlet_identity_refused_total{code=\"invalid_argument\"}");
    // The deleted pod's token may have been signed for a few polls more before it was refused.
    if issued < 1 || unauthenticated < 4 || invalid != 3 {
        return Err(format!(
            "issued {issued}, unauthenticated {unauthenticated}, invalid {invalid}:\n{metrics}"
        ));
    }
    let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
    let refusals = text.matches("certificate refused").count() as i64;
    if refusals != unauthenticated + invalid || text.contains(&token) {
        return Err(format!(
            "{refusals} refusals logged (want {}), token in the log: {}\n{text}",
            unauthenticated + invalid,
            text.contains(&token)
        ));
    }
    Ok(())
}

/// Cancels the token when dropped (so a failing test still stops its meshlet).
fn scopeguard(t: tokio_util::sync::CancellationToken) -> impl Drop {
    struct G(tokio_util::sync::CancellationToken);
    impl Drop for G {
        fn drop(&mut self) {
            self.0.cancel();
        }
    }
    G(t)
}

fn main() {
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        // The tests share one control plane and two cores: one at a time keeps timings honest.
        args.test_threads = Some(1);
    }
    if let Some(why) = harness::skip_reason() {
        println!("k8s_e2e: skipped: {why}");
        libtest_mimic::run(&args, Vec::new()).exit();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    harness::ensure_e2e_app();
    let cluster = match rt.block_on(Cluster::start(harness::binaries())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("k8s_e2e: cannot start the control plane: {e}");
            std::process::exit(1);
        }
    };
    let ctx = Arc::new(Ctx {
        cluster,
        rt: rt.handle().clone(),
    });
    macro_rules! trial {
        ($name:ident) => {{
            let ctx = ctx.clone();
            Trial::test(stringify!($name), move || {
                let limit = Duration::from_secs(240);
                harness::run_trial(&ctx.rt, stringify!($name), limit, $name(&ctx))
                    .map_err(Failed::from)
            })
        }};
    }
    let trials = vec![
        trial!(three_pods_all_get_traffic),
        trial!(scale_up_reaches_new_pod_within_1s),
        trial!(rolling_replacement_loses_no_request),
        trial!(named_ports_two_ports_and_headless),
        trial!(transparent_mode_in_a_pod),
        trial!(least_privilege_rbac_is_enough),
        trial!(identity_service_signs_for_bound_tokens_only),
        trial!(breaker_from_service_annotations),
        trial!(dedup_from_service_annotation_follows_changes),
        trial!(invalid_annotation_is_ignored_and_counted),
        trial!(readiness_follows_a_critical_dependency),
        trial!(injected_pods_are_meshed_end_to_end),
        trial!(api_server_down_keeps_traffic_flowing),
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    match Arc::try_unwrap(ctx) {
        Ok(ctx) => {
            let dir = ctx.cluster.dir.clone();
            ctx.cluster.stop();
            // Logs, etcd data and certificates stay for a failed run (the path is printed at
            // start) and go after a passing one: repeated runs would otherwise fill /tmp.
            if !conclusion.has_failed() {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        Err(_) => {
            eprintln!("k8s_e2e: the control plane is still shared; stopping it anyway is skipped")
        }
    }
    drop(rt);
    conclusion.exit();
}
