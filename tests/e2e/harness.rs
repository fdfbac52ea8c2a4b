//! The end-to-end harness: a real control plane (etcd, kube-apiserver, kube-controller-manager
//! from `build-k8s.sh`, run by `control-plane.sh`) and a stand-in kubelet that runs pods from
//! their specs.
//!
//! The kubelet registers a Node, binds unscheduled pods to it (there is no scheduler), and runs
//! each pod in a network namespace of its own, attached to a bridge with an address from
//! 198.18.0.0/16: init containers in order, then containers, each as a process (the image name
//! is mapped to a local binary by a table the test gives: the tag and digest are dropped, and
//! failing the full name, the last path segment is looked up, so `ghcr.io/x/meshlet:0.1.0` runs
//! the `meshlet` binary). It evaluates readiness and startup probes as kubelet would (with the
//! crate's own kubelet-style prober, `meshlet::ops::health::probes`: httpGet over HTTP or HTTPS
//! without certificate checks, tcpSocket, grpc; exec probes are not run and pass) and patches
//! the pod's status (podIP, phase, Ready), so the real EndpointSlice controller publishes
//! endpoints. Deleting a pod stops its processes (SIGTERM, then SIGKILL after the pod's
//! `deletionGracePeriodSeconds`, at most 30 s; at once for grace 0) and removes its namespace.
//!
//! The bridge address 198.18.0.1 also forwards to the API server, so processes in pods reach
//! it (`Cluster::pod_kubeconfig`). Every container gets `KUBECONFIG`: the admin kubeconfig
//! through the bridge, or, in a namespace labelled `e2e.meshlet.dev/service-account-tokens:
//! "true"`, a kubeconfig of its own with a token of the pod's service account (TokenRequest,
//! bound to the pod, 1 h), so only RBAC grants what the pod may do; none at all with
//! `automountServiceAccountToken: false` on the pod.
//!
//! Volumes: `secret`, `configMap` (keys, `items`, `optional`; a missing non-optional object is
//! waited for 10 s, then fails the pod), `emptyDir`, `projected` (service account token when
//! the namespace is labelled as above: a token of its own, bound to the pod, when the
//! projection names an `audience` (and its `expirationSeconds`), as a kubelet mints it; not
//! refreshed), `kube-root-ca.crt` from the cluster's CA, other
//! Secrets/ConfigMaps, downward API names) and `hostPath` (the host path itself); any other
//! kind is an empty directory. They are written to `<log dir>/<namespace>_<pod>/volumes/<volume>/`
//! (files 0644, directories 0755, readable by any `runAsUser`; an emptyDir is 0777).
//!
//! **Limitation: there is no mount namespace.** A process sees the host's file system, not its
//! `mountPath`s. The harness therefore rewrites every `command` word after the first, every
//! `args` entry and every literal `env` value that starts with one of the container's
//! `mountPath`s (whole path components; the longest mountPath wins; `subPath` is joined), and
//! the value part of a `--flag=<path>` argument, to the materialized directory. A path inside
//! a longer string (`sh -c "cat /etc/x/key"`), a config file naming another mounted path, or
//! a program's built-in default path (the in-cluster service account directory) is not
//! rewritten. `valueFrom.secretKeyRef`/`configMapKeyRef` and `envFrom` are not supported.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, KeyToPath, Namespace, Node, Pod, Probe, Secret, ServiceAccount,
};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use meshlet::ops::health::probes::AppProbes;
use serde_json::json;

pub const BRIDGE: &str = "mlbr0";
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE: &str = "meshlet-e2e-node";
/// A namespace with this label set to `"true"` gets service account tokens instead of the
/// admin kubeconfig (see the module doc).
pub const SA_TOKENS_LABEL: &str = "e2e.meshlet.dev/service-account-tokens";
/// How long a pod's start waits for a Secret, ConfigMap or ServiceAccount to appear (helm may
/// create them in the same moment as the pod).
const OBJECT_WAIT: Duration = Duration::from_secs(10);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The control plane, started once per test binary run.
pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub client: kube::Client,
    pub kubelet: Arc<Kubelet>,
    api_port: u16,
    forward: tokio::task::JoinHandle<()>,
}

impl Cluster {
    /// Builds the binaries if the cache lacks them (`build-k8s.sh`), starts the control plane,
    /// the bridge, the API forwarder and the kubelet.
    pub async fn start(images: HashMap<String, PathBuf>) -> Result<Cluster, String> {
        let e2e = repo().join("tests/e2e");
        k8s_bin()?;
        let dir = std::env::temp_dir().join(format!("meshlet-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let dir_s = dir.display().to_string();
        let status = Command::new("bash")
            .arg(e2e.join("control-plane.sh"))
            .args(["start", &dir_s])
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!(
                "control-plane.sh start {dir_s} failed (logs in {dir_s}/logs)"
            ));
        }
        let kubeconfig = dir.join("kubeconfig");
        let client =
            meshlet::discovery::kubernetes::KubeResolver::client(Some(&kubeconfig)).await?;
        let api_port = std::fs::read_to_string(&kubeconfig)
            .ok()
            .and_then(|k| {
                let server = k
                    .lines()
                    .find(|l| l.trim_start().starts_with("server:"))?
                    .to_string();
                server.rsplit(':').next()?.trim().parse().ok()
            })
            .ok_or("cannot read the API server port from the kubeconfig")?;

        Network::setup()?;
        let forward = tokio::spawn(forward_api(api_port));
        let pod_kubeconfig = write_pod_kubeconfig(&dir, &kubeconfig, api_port)?;
        let kubelet = Kubelet::start(
            client.clone(),
            images,
            dir.join("logs/pods"),
            pod_kubeconfig,
        )
        .await?;
        Ok(Cluster {
            dir,
            kubeconfig,
            client,
            kubelet,
            api_port,
            forward,
        })
    }

    /// A kubeconfig that processes inside pods can use (the API server through the bridge).
    /// Every container gets it as `KUBECONFIG` (the stand-in for the in-cluster service
    /// account), unless its namespace asks for service account tokens (`SA_TOKENS_LABEL`) or
    /// the pod sets `automountServiceAccountToken: false`. World-readable: sidecars run as UID
    /// 7102.
    pub fn pod_kubeconfig(&self) -> PathBuf {
        self.kubelet.kubeconfig.clone()
    }

    /// Stops the API server only (kube-apiserver's PID from the control plane's record).
    pub fn stop_apiserver(&self) -> Result<(), String> {
        self.control("stop-apiserver")
    }

    /// Starts the API server again without waiting for it: the returned script ends once the
    /// API server answers /readyz (polled every 0.5 s), so a test can time the return itself.
    pub fn start_apiserver(&self) -> Result<std::process::Child, String> {
        Command::new("bash")
            .arg(repo().join("tests/e2e/control-plane.sh"))
            .args(["start-apiserver", &self.dir.display().to_string()])
            .spawn()
            .map_err(|e| format!("control-plane.sh start-apiserver: {e}"))
    }

    fn control(&self, what: &str) -> Result<(), String> {
        let status = Command::new("bash")
            .arg(repo().join("tests/e2e/control-plane.sh"))
            .args([what, &self.dir.display().to_string()])
            .status()
            .map_err(|e| e.to_string())?;
        status
            .success()
            .then_some(())
            .ok_or_else(|| format!("control-plane.sh {what} failed"))
    }

    /// Stops every pod, the control plane, and removes the bridge: nothing is left behind.
    pub fn stop(self) {
        self.kubelet.stop_all();
        self.forward.abort();
        Network::teardown();
        let _ = Command::new("bash")
            .arg(repo().join("tests/e2e/control-plane.sh"))
            .args(["stop", &self.dir.display().to_string()])
            .status();
    }
}

/// Writes `pod.kubeconfig` in `dir`: the API server through the bridge, readable by all.
fn write_pod_kubeconfig(dir: &Path, kubeconfig: &Path, api_port: u16) -> Result<PathBuf, String> {
    let path = dir.join("pod.kubeconfig");
    let text = std::fs::read_to_string(kubeconfig).map_err(|e| format!("kubeconfig: {e}"))?;
    let text = text.replace(
        &format!("https://127.0.0.1:{api_port}"),
        &format!("https://{BRIDGE_IP}:{api_port}"),
    );
    std::fs::write(&path, text).map_err(|e| format!("write pod kubeconfig: {e}"))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|e| format!("chmod pod kubeconfig: {e}"))?;
    Ok(path)
}

/// Forwards BRIDGE_IP:port to the API server on loopback, so pods reach it.
async fn forward_api(port: u16) {
    let listener = match tokio::net::TcpListener::bind((BRIDGE_IP, port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("harness: cannot forward the API server on {BRIDGE_IP}:{port}: {e}");
            return;
        }
    };
    while let Ok((mut client, _)) = listener.accept().await {
        tokio::spawn(async move {
            if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

/// The pods' network: a bridge in the host namespace; a veth into each pod's namespace.
pub struct Network;

impl Network {
    pub fn setup() -> Result<(), String> {
        Network::teardown();
        sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        sh(
            "ip",
            &["addr", "add", &format!("{BRIDGE_IP}/16"), "dev", BRIDGE],
        )?;
        sh("ip", &["link", "set", BRIDGE, "up"])?;
        Ok(())
    }

    pub fn teardown() {
        let _ = sh("ip", &["link", "del", BRIDGE]);
    }

    /// The pod's veth pair: named after this process too, so that interfaces left behind by
    /// a run that was killed never collide with this run's (at most 15 characters).
    fn veth(idx: u32) -> (String, String) {
        let run = std::process::id() & 0xffff;
        (format!("mh{run:04x}h{idx}"), format!("mh{run:04x}c{idx}"))
    }

    /// Creates namespace `ns` with `ip` on eth0 and a default route via the bridge.
    pub fn add_pod(ns: &str, idx: u32, ip: Ipv4Addr) -> Result<(), String> {
        let (host, peer) = Network::veth(idx);
        sh("ip", &["netns", "add", ns])?;
        sh(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        )?;
        sh("ip", &["link", "set", &peer, "netns", ns])?;
        sh("ip", &["-n", ns, "link", "set", &peer, "name", "eth0"])?;
        sh(
            "ip",
            &["-n", ns, "addr", "add", &format!("{ip}/16"), "dev", "eth0"],
        )?;
        sh("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        sh(
            "ip",
            &[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &BRIDGE_IP.to_string(),
            ],
        )?;
        sh("ip", &["link", "set", &host, "master", BRIDGE])?;
        sh("ip", &["link", "set", &host, "up"])?;
        Ok(())
    }

    pub fn remove_pod(ns: &str, idx: u32) {
        let _ = sh("ip", &["link", "del", &Network::veth(idx).0]);
        let _ = sh("ip", &["netns", "del", ns]);
    }
}

struct RunningPod {
    uid: String,
    netns: String,
    idx: u32,
    ip: Ipv4Addr,
    children: Vec<(String, Child)>,
    grace: Duration,
    prober: Option<tokio::task::JoinHandle<()>>,
}

/// What a pod's containers get from the harness besides their spec.
struct PodFiles {
    /// Volume name -> the directory (or, for hostPath, the path) standing in for it.
    volumes: HashMap<String, PathBuf>,
    /// Every container's `KUBECONFIG`; `None` with `automountServiceAccountToken: false`.
    kubeconfig: Option<PathBuf>,
}

/// A container's mounts as (mountPath without a trailing '/', host path), longest first.
fn mounts_for(c: &Container, files: &PodFiles) -> Result<Vec<(String, PathBuf)>, String> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let base = files.volumes.get(&m.name).ok_or_else(|| {
            format!(
                "container {}: volumeMount {:?}: the pod has no such volume",
                c.name, m.name
            )
        })?;
        let mut host = base.clone();
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            host = host.join(safe_path(
                sub,
                &format!("volumeMount {:?} subPath", m.name),
            )?);
            // As kubelet does, a missing subPath becomes a directory (writable: it is in a
            // writable volume, an emptyDir most likely).
            if !host.exists() {
                make_dir(&host)?;
                chmod(&host, 0o777)?;
            }
        }
        let path = m.mount_path.trim_end_matches('/');
        if !path.is_empty() {
            out.push((path.to_string(), host));
        }
    }
    out.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    Ok(out)
}

/// `value` with a leading mountPath (or that of a `--flag=<path>`) replaced by its host path.
fn rewrite(value: &str, mounts: &[(String, PathBuf)]) -> String {
    if let Some(r) = rewrite_path(value, mounts) {
        return r;
    }
    if value.starts_with('-')
        && let Some((flag, v)) = value.split_once('=')
        && let Some(r) = rewrite_path(v, mounts)
    {
        return format!("{flag}={r}");
    }
    value.to_string()
}

fn rewrite_path(value: &str, mounts: &[(String, PathBuf)]) -> Option<String> {
    mounts.iter().find_map(|(mount, host)| {
        let rest = value.strip_prefix(mount.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then(|| format!("{}{rest}", host.display()))
    })
}

/// A `fieldRef` as kubelet resolves it (the fields the harness knows; others are empty).
fn field_value(pod: &Pod, path: &str, ip: Ipv4Addr) -> String {
    let spec = pod.spec.as_ref();
    match path {
        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
        "status.podIP" => ip.to_string(),
        "status.hostIP" => BRIDGE_IP.to_string(),
        "spec.nodeName" => NODE.to_string(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        _ => String::new(),
    }
}

/// A relative path without `..`, as volume item paths and subPaths must be.
fn safe_path<'a>(p: &'a str, what: &str) -> Result<&'a Path, String> {
    let path = Path::new(p);
    let ok = !p.is_empty()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    ok.then_some(path)
        .ok_or_else(|| format!("{what}: {p:?} is not a relative path without '..'"))
}

fn chmod(path: &Path, mode: u32) -> Result<(), String> {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// Creates a directory (and its parents), 0755.
fn make_dir(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
    chmod(path, 0o755)
}

/// Writes a file (creating its directory), 0644.
fn write_file(path: &Path, data: &[u8]) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        make_dir(parent)?;
    }
    std::fs::write(path, data).map_err(|e| format!("write {}: {e}", path.display()))?;
    chmod(path, 0o644)
}

/// Writes a Secret's or ConfigMap's keys into `dir`: all of them, or `items` (key -> path; a
/// missing key is an error unless the source is optional).
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    optional: bool,
    what: &str,
) -> Result<(), String> {
    match items {
        None => {
            for (k, v) in data {
                write_file(&dir.join(safe_path(k, what)?), v)?;
            }
        }
        Some(items) => {
            for it in items {
                match data.get(&it.key) {
                    Some(v) => write_file(&dir.join(safe_path(&it.path, what)?), v)?,
                    None if optional => {}
                    None => return Err(format!("{what}: no key {:?}", it.key)),
                }
            }
        }
    }
    Ok(())
}

/// The stand-in kubelet.
pub struct Kubelet {
    client: kube::Client,
    images: HashMap<String, PathBuf>,
    /// Containers' logs, and per pod `<namespace>_<pod>/` (volumes, its kubeconfig).
    log_dir: PathBuf,
    /// Given to every container as `KUBECONFIG` (unless service account tokens are asked for).
    kubeconfig: PathBuf,
    /// The API server as pods reach it (`server:` of `kubeconfig`).
    pod_server: String,
    /// The cluster CA, base64 PEM (`certificate-authority-data:` of `kubeconfig`).
    ca_data: String,
    pods: Mutex<HashMap<String, RunningPod>>,
    /// Pods whose processes are being stopped (taken out of `pods`), by UID.
    stopping: Mutex<HashSet<String>>,
    next: AtomicU32,
    /// When each pod was last marked Ready, by `namespace/name` (for latency measurements).
    pub ready_at: Mutex<HashMap<String, Instant>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The grace period a deletion asked for (`metadata.deletionGracePeriodSeconds`).
fn deletion_grace(pod: &Pod) -> Option<Duration> {
    pod.metadata
        .deletion_grace_period_seconds
        .map(|s| Duration::from_secs(s.clamp(0, 30) as u64))
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

impl Kubelet {
    pub async fn start(
        client: kube::Client,
        images: HashMap<String, PathBuf>,
        log_dir: PathBuf,
        kubeconfig: PathBuf,
    ) -> Result<Arc<Kubelet>, String> {
        std::fs::create_dir_all(&log_dir).map_err(|e| e.to_string())?;
        // Per-pod volumes live below: any runAsUser must be able to reach them.
        for d in [Some(log_dir.as_path()), log_dir.parent()]
            .into_iter()
            .flatten()
        {
            chmod(d, 0o755)?;
        }
        let text = std::fs::read_to_string(&kubeconfig)
            .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("{}: no {key}", kubeconfig.display()))
        };
        let (pod_server, ca_data) = (field("server:")?, field("certificate-authority-data:")?);
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        }))
        .map_err(|e| e.to_string())?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(format!("create node: {e}")),
        }
        let status = json!({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "meshlet e2e harness", "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
            "addresses": [{"type": "InternalIP", "address": BRIDGE_IP.to_string()}],
        }});
        nodes
            .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|e| format!("node status: {e}"))?;

        let k = Arc::new(Kubelet {
            client,
            images,
            log_dir,
            kubeconfig,
            pod_server,
            ca_data,
            pods: Mutex::new(HashMap::new()),
            stopping: Mutex::new(HashSet::new()),
            next: AtomicU32::new(0),
            ready_at: Mutex::new(HashMap::new()),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(k.clone().run());
        *k.task.lock().unwrap() = Some(task);
        Ok(k)
    }

    async fn run(self: Arc<Self>) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => {
                    self.clone().reconcile(p).await
                }
                Ok(watcher::Event::Delete(p)) => {
                    // Gone from the API while its processes still run: deleted with grace 0
                    // (or forced), which kills at once. A graceful deletion was handled when
                    // the deletionTimestamp appeared.
                    let k = key(&p);
                    let grace = deletion_grace(&p).unwrap_or(Duration::ZERO);
                    if let Some(running) = self.take_pod(&k) {
                        let this = self.clone();
                        tokio::task::spawn_blocking(move || this.kill_pod(running, grace));
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!("harness kubelet: pod watch: {e}"),
            }
        }
    }

    async fn reconcile(self: Arc<Self>, pod: Pod) {
        let k = key(&pod);
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let spec = match &pod.spec {
            Some(s) => s,
            None => return,
        };
        if pod.metadata.deletion_timestamp.is_some() {
            let uid = pod.metadata.uid.clone();
            if self
                .stopping
                .lock()
                .unwrap()
                .contains(uid.as_deref().unwrap_or_default())
            {
                // Another event started the stop; that task removes the object.
                return;
            }
            let running = self.take_pod(&k);
            let grace = deletion_grace(&pod);
            let this = self.clone();
            tokio::spawn(async move {
                if let Some(running) = running {
                    let grace = grace.unwrap_or(running.grace);
                    let _ =
                        tokio::task::spawn_blocking(move || this.kill_pod(running, grace)).await;
                }
                // The kubelet's last word: remove the pod object now that it has stopped.
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: uid.map(|u| kube::api::Preconditions {
                        uid: Some(u),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                let _ = api.delete(&name, &dp).await;
            });
            return;
        }
        match spec.node_name.as_deref() {
            None => {
                // No scheduler here: bind every pending pod to our node.
                let binding = json!({
                    "apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": name, "namespace": ns},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
                });
                if let Err(e) = api
                    .create_subresource::<_, serde_json::Value>(
                        "binding",
                        &name,
                        &PostParams::default(),
                        &binding,
                    )
                    .await
                {
                    eprintln!("harness kubelet: bind {k}: {e}");
                }
            }
            Some(n) if n == NODE => {
                let known = self.pods.lock().unwrap().contains_key(&k);
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                if !known
                    && phase.as_deref() != Some("Succeeded")
                    && phase.as_deref() != Some("Failed")
                {
                    if let Err(e) = self.clone().start_pod(&pod).await {
                        eprintln!("harness kubelet: start {k}: {e}");
                        let _ = api
                            .patch_status(
                                &name,
                                &PatchParams::default(),
                                &Patch::Merge(json!({"status": {"phase": "Failed", "message": e}})),
                            )
                            .await;
                    }
                }
            }
            Some(_) => {}
        }
    }

    /// The local binary an image stands for: the full name, else without its digest and tag,
    /// else the last path segment of that (`ghcr.io/x/meshlet:0.1.0` -> `meshlet`).
    fn binary_for(&self, image: &str) -> Option<PathBuf> {
        let name = image.split('@').next().unwrap_or("");
        // The tag follows the last ':' after the last '/' (a registry may have a port).
        let repo = match name.rfind(':') {
            Some(i) if !name[i..].contains('/') => &name[..i],
            _ => name,
        };
        let base = repo.rsplit('/').next().unwrap_or(repo);
        [image, repo, base]
            .into_iter()
            .find_map(|n| self.images.get(n))
            .cloned()
    }

    fn command_for(
        &self,
        c: &Container,
        mounts: &[(String, PathBuf)],
    ) -> Result<(PathBuf, Vec<String>), String> {
        let image = c.image.clone().unwrap_or_default();
        let bin = self.binary_for(&image).ok_or_else(|| {
            format!(
                "no local binary for image {image:?} (known: {:?})",
                self.images.keys()
            )
        })?;
        // `command` replaces the image's entrypoint: its first word names the entrypoint
        // (mapped to the image's binary), the rest are arguments before `args`.
        let mut argv: Vec<String> = c
            .command
            .clone()
            .unwrap_or_default()
            .into_iter()
            .skip(1)
            .collect();
        argv.extend(c.args.clone().unwrap_or_default());
        let argv = argv.iter().map(|a| rewrite(a, mounts)).collect();
        Ok((bin, argv))
    }

    fn env_for(
        &self,
        pod: &Pod,
        c: &Container,
        ip: Ipv4Addr,
        files: &PodFiles,
        mounts: &[(String, PathBuf)],
    ) -> Vec<(String, String)> {
        let mut env = vec![(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )];
        if let Some(k) = &files.kubeconfig {
            env.push(("KUBECONFIG".to_string(), k.display().to_string()));
        }
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => rewrite(v, mounts),
                (None, Some(from)) => from
                    .field_ref
                    .as_ref()
                    .map(|f| field_value(pod, &f.field_path, ip))
                    .unwrap_or_default(),
                _ => String::new(),
            };
            env.push((e.name.clone(), value));
        }
        env
    }

    fn spawn_container(
        &self,
        pod: &Pod,
        c: &Container,
        netns: &str,
        ip: Ipv4Addr,
        files: &PodFiles,
    ) -> Result<Child, String> {
        let mounts = mounts_for(c, files)?;
        let (bin, argv) = self.command_for(c, &mounts)?;
        let log = self
            .log_dir
            .join(format!("{}_{}.log", key(pod).replace('/', "_"), c.name));
        let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns]);
        let sc = c.security_context.as_ref();
        if let Some(uid) = sc.and_then(|s| s.run_as_user) {
            let gid = sc.and_then(|s| s.run_as_group).unwrap_or(uid);
            cmd.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
            ]);
        }
        cmd.arg(&bin).args(&argv);
        cmd.env_clear()
            .envs(self.env_for(pod, c, ip, files, &mounts));
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // Its own process group, so stopping the container also stops what it started (as
        // killing a container's cgroup does).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))
    }

    /// The pod's credentials and volumes, written below `<log dir>/<namespace>_<pod>/`.
    async fn prepare_files(&self, pod: &Pod, ip: Ipv4Addr) -> Result<PodFiles, String> {
        let dir = self.log_dir.join(key(pod).replace('/', "_"));
        // A pod of the same name may have run before: start from nothing.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        make_dir(&dir)?;
        let (kubeconfig, token) = self.credentials(pod, &dir).await?;
        let volumes = self
            .materialize_volumes(pod, &dir, ip, token.as_deref())
            .await?;
        Ok(PodFiles {
            volumes,
            kubeconfig,
        })
    }

    /// The pod's `KUBECONFIG` and service account token (see the module doc).
    async fn credentials(
        &self,
        pod: &Pod,
        dir: &Path,
    ) -> Result<(Option<PathBuf>, Option<String>), String> {
        let spec = pod.spec.clone().unwrap_or_default();
        let automount = spec.automount_service_account_token != Some(false);
        let projected_token = spec.volumes.iter().flatten().any(|v| {
            v.projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten())
                .any(|s| s.service_account_token.is_some())
        });
        if !automount && !projected_token {
            return Ok((None, None));
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let labelled = Api::<Namespace>::all(self.client.clone())
            .get(&ns)
            .await
            .map_err(|e| format!("get namespace {ns}: {e}"))?
            .metadata
            .labels
            .and_then(|l| l.get(SA_TOKENS_LABEL).cloned())
            .is_some_and(|v| v == "true");
        if !labelled {
            return Ok((automount.then(|| self.kubeconfig.clone()), None));
        }
        let sa = service_account(pod);
        let token = self.request_token(pod, &ns, &sa, None, 3600).await?;
        if !automount {
            return Ok((None, Some(token)));
        }
        let path = dir.join("kubeconfig");
        let server = &self.pod_server;
        let ca = &self.ca_data;
        let text = [
            "apiVersion: v1",
            "kind: Config",
            "clusters:",
            "- name: e2e",
            "  cluster:",
            &format!("    server: {server}"),
            &format!("    certificate-authority-data: {ca}"),
            "users:",
            &format!("- name: {sa}"),
            "  user:",
            &format!("    token: {token}"),
            "contexts:",
            &format!("- name: {sa}"),
            "  context:",
            "    cluster: e2e",
            &format!("    user: {sa}"),
            &format!("    namespace: {ns}"),
            &format!("current-context: {sa}"),
            "",
        ]
        .join("\n");
        write_file(&path, text.as_bytes())?;
        Ok((Some(path), Some(token)))
    }

    /// A token of service account `sa` bound to the pod (TokenRequest, 1 h); waits up to
    /// `OBJECT_WAIT` for the service account to exist.
    /// A token of `sa` bound to `pod` (TokenRequest), for `audience` (default: the API
    /// server's), as a kubelet asks for one.
    async fn request_token(
        &self,
        pod: &Pod,
        ns: &str,
        sa: &str,
        audience: Option<&str>,
        expiration_seconds: i64,
    ) -> Result<String, String> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let audiences: Vec<&str> = audience.into_iter().collect();
        let tr: TokenRequest = serde_json::from_value(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "audiences": audiences, "expirationSeconds": expiration_seconds,
                "boundObjectRef": {
                    "apiVersion": "v1", "kind": "Pod",
                    "name": pod.metadata.name, "uid": pod.metadata.uid,
                },
            },
        }))
        .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + OBJECT_WAIT;
        loop {
            let err = match sas
                .create_token_request(sa, &PostParams::default(), &tr)
                .await
            {
                Ok(t) => match t.status.map(|s| s.token).filter(|t| !t.is_empty()) {
                    Some(token) => return Ok(token),
                    None => "the answer has no token".to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "token of service account {ns}/{sa} (waited {OBJECT_WAIT:?}): {err}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes the pod's volumes below `dir/volumes/`: volume name -> host path. `token` is the
    /// pod's service account token, when its namespace asks for them.
    async fn materialize_volumes(
        &self,
        pod: &Pod,
        dir: &Path,
        ip: Ipv4Addr,
        token: Option<&str>,
    ) -> Result<HashMap<String, PathBuf>, String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let mut out = HashMap::new();
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            if let Some(h) = &v.host_path {
                out.insert(v.name.clone(), PathBuf::from(&h.path));
                continue;
            }
            let path = dir.join("volumes").join(&v.name);
            make_dir(&path)?;
            let what = format!("volume {:?}", v.name);
            if let Some(s) = &v.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                let optional = s.optional.unwrap_or(false);
                let data = self.secret_data(&ns, &name, optional, &what).await?;
                write_keys(&path, &data, s.items.as_deref(), optional, &what)?;
            } else if let Some(cm) = &v.config_map {
                let optional = cm.optional.unwrap_or(false);
                let data = self.config_map_data(&ns, &cm.name, optional, &what).await?;
                write_keys(&path, &data, cm.items.as_deref(), optional, &what)?;
            } else if let Some(p) = &v.projected {
                for src in p.sources.iter().flatten() {
                    if let Some(t) = &src.service_account_token {
                        // A token of its own for a projection that names an audience (as the
                        // kubelet does); else the pod's token.
                        let own = match (token, t.audience.as_deref().filter(|a| !a.is_empty())) {
                            (Some(_), Some(audience)) => Some(
                                self.request_token(
                                    pod,
                                    &ns,
                                    &service_account(pod),
                                    Some(audience),
                                    t.expiration_seconds.unwrap_or(3600),
                                )
                                .await?,
                            ),
                            (Some(token), None) => Some(token.to_string()),
                            (None, _) => None,
                        };
                        if let Some(token) = own {
                            write_file(&path.join(safe_path(&t.path, &what)?), token.as_bytes())?;
                        }
                    } else if let Some(s) = &src.secret {
                        let optional = s.optional.unwrap_or(false);
                        let data = self.secret_data(&ns, &s.name, optional, &what).await?;
                        write_keys(&path, &data, s.items.as_deref(), optional, &what)?;
                    } else if let Some(cm) = &src.config_map {
                        let optional = cm.optional.unwrap_or(false);
                        let data = if cm.name == "kube-root-ca.crt" {
                            // Its publisher does not run here: the cluster's CA stands in.
                            BTreeMap::from([("ca.crt".to_string(), self.ca_pem())])
                        } else {
                            self.config_map_data(&ns, &cm.name, optional, &what).await?
                        };
                        write_keys(&path, &data, cm.items.as_deref(), optional, &what)?;
                    } else if let Some(d) = &src.downward_api {
                        for item in d.items.iter().flatten() {
                            if let Some(f) = &item.field_ref {
                                let value = field_value(pod, &f.field_path, ip);
                                write_file(
                                    &path.join(safe_path(&item.path, &what)?),
                                    value.as_bytes(),
                                )?;
                            }
                        }
                    }
                }
            }
            if v.secret.is_none() && v.config_map.is_none() && v.projected.is_none() {
                // emptyDir and any other kind: an empty directory anyone may write to, as
                // kubelet makes an emptyDir (0777).
                chmod(&path, 0o777)?;
            }
            out.insert(v.name.clone(), path);
        }
        Ok(out)
    }

    /// The cluster CA in PEM.
    fn ca_pem(&self) -> Vec<u8> {
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &self.ca_data)
            .unwrap_or_default()
    }

    async fn secret_data(
        &self,
        ns: &str,
        name: &str,
        optional: bool,
        what: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>, String> {
        let Some(s) = self.fetch::<Secret>(ns, name, optional, what).await? else {
            return Ok(BTreeMap::new());
        };
        // The API server folds stringData into data; kept in case an object carries it.
        Ok(file_data(s.data, s.string_data))
    }

    async fn config_map_data(
        &self,
        ns: &str,
        name: &str,
        optional: bool,
        what: &str,
    ) -> Result<BTreeMap<String, Vec<u8>>, String> {
        let Some(cm) = self.fetch::<ConfigMap>(ns, name, optional, what).await? else {
            return Ok(BTreeMap::new());
        };
        Ok(file_data(cm.binary_data, cm.data))
    }

    /// Gets a namespaced object; a missing one is `None` when optional, else waited for up to
    /// `OBJECT_WAIT` and then an error.
    async fn fetch<K>(
        &self,
        ns: &str,
        name: &str,
        optional: bool,
        what: &str,
    ) -> Result<Option<K>, String>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        let kind = K::kind(&Default::default()).to_string();
        let deadline = Instant::now() + OBJECT_WAIT;
        loop {
            let err = match api.get_opt(name).await {
                Ok(Some(o)) => return Ok(Some(o)),
                Ok(None) if optional => return Ok(None),
                Ok(None) => "not found".to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "{what}: {kind} {ns}/{name}: {err} (waited {OBJECT_WAIT:?})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn start_pod(self: Arc<Self>, pod: &Pod) -> Result<(), String> {
        let k = key(pod);
        let spec = pod.spec.clone().unwrap_or_default();
        let idx = self.next.fetch_add(1, Ordering::SeqCst);
        let ip = Ipv4Addr::new(198, 18, 1 + (idx / 250) as u8, 2 + (idx % 250) as u8);
        let files = self.prepare_files(pod, ip).await?;
        let netns = format!("mlp{}-{idx}", std::process::id());
        Network::add_pod(&netns, idx, ip)?;
        let mut running = RunningPod {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            netns: netns.clone(),
            idx,
            ip,
            children: Vec::new(),
            grace: Duration::from_secs(
                spec.termination_grace_period_seconds
                    .unwrap_or(30)
                    .clamp(0, 30) as u64,
            ),
            prober: None,
        };
        // Init containers, in order, each to completion; a native sidecar (`restartPolicy:
        // Always`) is started and kept running, and the next one starts once its startupProbe
        // passes.
        for c in spec.init_containers.iter().flatten() {
            let mut child = match self.spawn_container(pod, c, &netns, ip, &files) {
                Ok(child) => child,
                Err(e) => {
                    Self::abort_start(running, &netns, idx);
                    return Err(e);
                }
            };
            if c.restart_policy.as_deref() == Some("Always") {
                running.children.push((c.name.clone(), child));
                if let Some(p) = &c.startup_probe {
                    if let Err(e) = Self::wait_started(p, c, ip, &mut running).await {
                        Self::abort_start(running, &netns, idx);
                        return Err(e);
                    }
                }
                continue;
            }
            let status = tokio::task::spawn_blocking(move || child.wait())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if !status.success() {
                Self::abort_start(running, &netns, idx);
                return Err(format!("init container {} failed: {status}", c.name));
            }
        }
        for c in &spec.containers {
            match self.spawn_container(pod, c, &netns, ip, &files) {
                Ok(child) => running.children.push((c.name.clone(), child)),
                Err(e) => {
                    Self::abort_start(running, &netns, idx);
                    return Err(e);
                }
            }
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let containers = spec.containers.clone();
        let this = self.clone();
        let kk = k.clone();
        running.prober = Some(tokio::spawn(async move {
            this.probe_loop(api, name, kk, ip, containers).await;
        }));
        self.pods.lock().unwrap().insert(k, running);
        Ok(())
    }

    /// Kills what a failed start left running and removes the pod's network namespace.
    fn abort_start(running: RunningPod, netns: &str, idx: u32) {
        for (_, mut ch) in running.children {
            signal_group(&ch, libc::SIGKILL);
            let _ = ch.wait();
        }
        Network::remove_pod(netns, idx);
    }

    /// Polls a native sidecar's startupProbe every 100 ms until it passes, bounded by the
    /// probe's failureThreshold × period; fails early when the sidecar exits.
    async fn wait_started(
        p: &Probe,
        c: &Container,
        ip: Ipv4Addr,
        running: &mut RunningPod,
    ) -> Result<(), String> {
        let bound = Duration::from_secs(
            (p.failure_threshold.unwrap_or(3).max(1) as u64)
                * (p.period_seconds.unwrap_or(10).max(1) as u64)
                + p.initial_delay_seconds.unwrap_or(0).max(0) as u64,
        );
        let deadline = Instant::now() + bound;
        let check = PodProbe::new(p, c, "startupz");
        loop {
            if check.passes(ip).await {
                return Ok(());
            }
            if let Some((_, child)) = running.children.iter_mut().find(|(n, _)| *n == c.name)
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "sidecar {} exited before starting: {status}",
                    c.name
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "sidecar {}: startupProbe still failing after {bound:?}",
                    c.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Evaluates readiness probes as kubelet does and keeps the pod's status up to date.
    async fn probe_loop(
        self: Arc<Self>,
        api: Api<Pod>,
        name: String,
        k: String,
        ip: Ipv4Addr,
        containers: Vec<Container>,
    ) {
        let started = Instant::now();
        let mut state: BTreeMap<String, (bool, i32, i32)> = containers
            .iter()
            .map(|c| (c.name.clone(), (c.readiness_probe.is_none(), 0, 0)))
            .collect();
        let checks: BTreeMap<String, PodProbe> = containers
            .iter()
            .filter_map(|c| {
                Some((
                    c.name.clone(),
                    PodProbe::new(c.readiness_probe.as_ref()?, c, "readyz"),
                ))
            })
            .collect();
        let mut last_ready: Option<bool> = None;
        let period = containers
            .iter()
            .filter_map(|c| c.readiness_probe.as_ref())
            .map(|p| p.period_seconds.unwrap_or(10).max(1) as u64)
            .min()
            .unwrap_or(1);
        loop {
            for c in &containers {
                let Some(p) = &c.readiness_probe else {
                    continue;
                };
                if started.elapsed()
                    < Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64)
                {
                    continue;
                }
                let ok = checks[&c.name].passes(ip).await;
                let entry = state.get_mut(&c.name).expect("container state");
                if ok {
                    entry.1 += 1;
                    entry.2 = 0;
                    if entry.1 >= p.success_threshold.unwrap_or(1) {
                        entry.0 = true;
                    }
                } else {
                    entry.2 += 1;
                    entry.1 = 0;
                    if entry.2 >= p.failure_threshold.unwrap_or(3) || !entry.0 {
                        entry.0 = false;
                    }
                }
            }
            let ready = state.values().all(|(r, _, _)| *r);
            if last_ready != Some(ready) {
                let statuses: Vec<_> = containers
                    .iter()
                    .map(|c| json!({
                        "name": c.name, "ready": state[&c.name].0, "started": true, "restartCount": 0,
                        "image": c.image.clone().unwrap_or_default(), "imageID": "",
                        "state": {"running": {"startedAt": now()}},
                    }))
                    .collect();
                let status = json!({"status": {
                    "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                    "hostIP": BRIDGE_IP.to_string(), "startTime": now(),
                    "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
                        {"type": "ContainersReady", "status": if ready {"True"} else {"False"}, "lastTransitionTime": now()},
                        {"type": "Ready", "status": if ready {"True"} else {"False"}, "lastTransitionTime": now()},
                    ],
                    "containerStatuses": statuses,
                }});
                match api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                {
                    Ok(_) => {
                        last_ready = Some(ready);
                        if ready {
                            self.ready_at
                                .lock()
                                .unwrap()
                                .insert(k.clone(), Instant::now());
                        }
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => return,
                    Err(e) => eprintln!("harness kubelet: status of {k}: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_secs(period)).await;
        }
    }

    /// Stops a pod's processes (SIGTERM, then SIGKILL after its grace period) and removes its
    /// network namespace. Blocking.
    pub fn stop_pod(&self, k: &str) {
        self.stop_pod_within(k, None);
    }

    /// As `stop_pod`, with `grace` instead of the pod's `terminationGracePeriodSeconds` (at most
    /// 30 s; zero sends SIGKILL at once). Whether the pod was running.
    pub fn stop_pod_within(&self, k: &str, grace: Option<Duration>) -> bool {
        let Some(p) = self.take_pod(k) else {
            return false;
        };
        let grace = grace.unwrap_or(p.grace);
        self.kill_pod(p, grace);
        true
    }

    /// Takes a pod out of the running set (stops its prober) and marks it as stopping.
    fn take_pod(&self, k: &str) -> Option<RunningPod> {
        let mut pods = self.pods.lock().unwrap();
        let mut p = pods.remove(k)?;
        self.stopping.lock().unwrap().insert(p.uid.clone());
        drop(pods);
        if let Some(t) = p.prober.take() {
            t.abort();
        }
        Some(p)
    }

    /// Stops a taken pod's processes and removes its network namespace. Blocking.
    fn kill_pod(&self, mut p: RunningPod, grace: Duration) {
        let grace = grace.min(Duration::from_secs(30));
        let signal = if grace.is_zero() {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        for (_, c) in &p.children {
            signal_group(c, signal);
        }
        let deadline = Instant::now() + grace;
        for (_, c) in &p.children {
            while !exited(c) {
                if Instant::now() >= deadline {
                    signal_group(c, libc::SIGKILL);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // What the containers started and left behind goes too; then reap them.
        for (_, c) in p.children.iter_mut() {
            signal_group(c, libc::SIGKILL);
            let _ = c.wait();
        }
        Network::remove_pod(&p.netns, p.idx);
        self.stopping.lock().unwrap().remove(&p.uid);
    }

    /// Stops every pod (at the end of the run).
    pub fn stop_all(&self) {
        if let Some(t) = self.task.lock().unwrap().take() {
            t.abort();
        }
        let keys: Vec<String> = self.pods.lock().unwrap().keys().cloned().collect();
        for k in keys {
            self.stop_pod(&k);
        }
    }

    /// The pod IP the harness gave a pod.
    pub fn pod_ip(&self, namespace: &str, name: &str) -> Option<Ipv4Addr> {
        self.pods
            .lock()
            .unwrap()
            .get(&format!("{namespace}/{name}"))
            .map(|p| p.ip)
    }

    /// Where the pod's volume `volume` is written: what its containers see at the mountPath.
    pub fn volume_dir(&self, namespace: &str, pod: &str, volume: &str) -> PathBuf {
        self.log_dir
            .join(format!("{namespace}_{pod}"))
            .join("volumes")
            .join(volume)
    }

    pub fn pod_netns(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods
            .lock()
            .unwrap()
            .get(&format!("{namespace}/{name}"))
            .map(|p| p.netns.clone())
    }
}

/// Whether a container's process has exited, without reaping it: until it is reaped its PID,
/// which is also its process group's ID, cannot be reused.
fn exited(c: &Child) -> bool {
    // SAFETY: waitid(2) with WNOWAIT on our own child only reads its state into `info`.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            c.id(),
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        // An error (ECHILD) means it was reaped already.
        r != 0 || info.si_pid() != 0
    }
}

/// Sends `sig` to a container's process group (it leads one), unless the container was
/// reaped already (then its PID may belong to someone else by now).
fn signal_group(c: &Child, sig: i32) {
    // SAFETY: waitid(2) with WNOWAIT only reads; kill(2) targets the group of a child that
    // has not been reaped, so the group ID is still ours.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            c.id(),
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if r == 0 {
            libc::kill(-(c.id() as i32), sig);
        }
    }
}

fn now() -> String {
    // RFC 3339 in UTC, seconds precision, as the API expects for timestamps.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// A readiness or startup probe, compiled once with the crate's kubelet-style prober
/// (`meshlet::ops::health::probes`, the JSON of `MESHLET_APP_PROBES`): httpGet over HTTP or HTTPS
/// (no certificate checks; 200-399 passes), tcpSocket and grpc, each within `timeoutSeconds`.
enum PodProbe {
    /// exec probes are not run by this harness: they pass.
    Pass,
    /// The compiled probe, under the key `c` and the probe name given.
    Run(AppProbes, &'static str),
    /// A probe the prober refuses (say, a named port the container does not declare) fails,
    /// as kubelet's would.
    Invalid,
}

impl PodProbe {
    /// `kind`: `readyz` or `startupz`.
    fn new(p: &Probe, c: &Container, kind: &'static str) -> PodProbe {
        if p.exec.is_some() {
            return PodProbe::Pass;
        }
        let ports: BTreeMap<String, i32> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone()?, p.container_port)))
            .collect();
        let mut container = serde_json::Map::new();
        container.insert("ports".into(), json!(ports));
        container.insert(kind.into(), json!(p));
        let json = json!({ "c": container }).to_string();
        match AppProbes::parse(&json) {
            Ok(probes) => PodProbe::Run(probes, kind),
            Err(e) => {
                eprintln!(
                    "harness kubelet: container {}: {kind} probe always fails: {e}",
                    c.name
                );
                PodProbe::Invalid
            }
        }
    }

    async fn passes(&self, ip: Ipv4Addr) -> bool {
        match self {
            PodProbe::Pass => true,
            PodProbe::Invalid => false,
            PodProbe::Run(probes, kind) => probes
                .run("c", kind, ip.into())
                .await
                .is_some_and(|r| r.success),
        }
    }
}

/// Polls `f` until it returns Some or the deadline passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A volume's files from an object's binary and text maps: a Secret's data and stringData (the
/// text wins on a clash, as in the API), or a ConfigMap's binaryData and data (keys never clash).
fn file_data(
    bytes: Option<BTreeMap<String, k8s_openapi::ByteString>>,
    text: Option<BTreeMap<String, String>>,
) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = bytes
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    for (k, v) in text.unwrap_or_default() {
        data.insert(k, v.into_bytes());
    }
    data
}

/// Runs one e2e test's body on `rt`, bounded by `limit`, and prints how long it took (the
/// libtest-mimic trials of both e2e suites).
pub fn run_trial<F>(
    rt: &tokio::runtime::Handle,
    name: &str,
    limit: Duration,
    body: F,
) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    // The timeout is made inside the runtime: its timer needs the runtime's context.
    let r = rt.block_on(async { tokio::time::timeout(limit, body).await });
    println!("    {name} took {:?}", started.elapsed());
    r.unwrap_or_else(|_| Err(format!("timed out after {} s", limit.as_secs())))
}

/// The directory of the Kubernetes binaries and helm: `tests/e2e/build-k8s.sh` builds them when
/// the cache lacks them (its progress goes to stderr) and prints the directory last.
pub fn k8s_bin() -> Result<PathBuf, String> {
    let out = Command::new("bash")
        .arg(repo().join("tests/e2e/build-k8s.sh"))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("tests/e2e/build-k8s.sh: {e}"))?;
    if !out.status.success() {
        return Err("tests/e2e/build-k8s.sh failed".into());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bin = stdout.lines().last().unwrap_or("").trim();
    if bin.is_empty() {
        return Err("tests/e2e/build-k8s.sh printed no directory".into());
    }
    Ok(PathBuf::from(bin))
}

/// Why the suites on the local control plane cannot run here, if they cannot: they need root
/// (network namespaces, iptables) and Go (to build the Kubernetes binaries).
pub fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        Some("needs root (network namespaces, iptables)")
    } else if Command::new("go").arg("version").output().is_err() {
        Some("needs Go to build the Kubernetes binaries")
    } else {
        None
    }
}

/// The e2e app is built by `cargo test --all-targets`; this builds it when a suite runs alone.
pub fn ensure_e2e_app() {
    if !binaries()["e2e-app"].exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--example", "e2e-app"])
            .status()
            .expect("cargo");
        assert!(status.success(), "cargo build --example e2e-app failed");
    }
}

/// Paths of the binaries the tests map images to.
pub fn binaries() -> HashMap<String, PathBuf> {
    let meshlet = PathBuf::from(env!("CARGO_BIN_EXE_meshlet"));
    let target = meshlet.parent().expect("target dir").to_path_buf();
    let mut m = HashMap::new();
    m.insert("meshlet".to_string(), meshlet.clone());
    // The chart's init container image (meshlet plus iptables).
    m.insert("meshlet-init".to_string(), meshlet);
    m.insert("e2e-app".to_string(), target.join("examples/e2e-app"));
    m.insert(
        "meshlet-e2e-app".to_string(),
        target.join("examples/e2e-app"),
    );
    m.insert("iptables".to_string(), PathBuf::from("/usr/sbin/iptables"));
    m.insert("sh".to_string(), PathBuf::from("/bin/sh"));
    m
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// The pod's service account (`default` when it names none).
fn service_account(pod: &Pod) -> String {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.service_account_name.clone().or(s.service_account.clone()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}
