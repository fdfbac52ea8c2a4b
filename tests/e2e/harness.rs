//! The end-to-end harness: a real control plane (etcd, kube-apiserver, kube-controller-manager
//! from `build-k8s.sh`, run by `control-plane.sh`) and a stand-in kubelet that runs pods from
//! their specs.
//!
//! The kubelet registers a Node, binds unscheduled pods to it (there is no scheduler), and runs
//! each pod in a network namespace of its own, attached to a bridge with an address from
//! 198.18.0.0/16: init containers in order, then containers, each as a process (the image name
//! is mapped to a local binary by a table the test gives). It evaluates readiness probes as
//! kubelet would and patches the pod's status (podIP, phase, Ready), so the real EndpointSlice
//! controller publishes endpoints. Deleting a pod stops its processes (SIGTERM, then SIGKILL
//! after the grace period) and removes its namespace.
//!
//! The bridge address 198.18.0.1 also forwards to the API server, so processes in pods reach
//! it (`Cluster::pod_kubeconfig`).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Container, Node, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

pub const BRIDGE: &str = "mlbr0";
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE: &str = "meshlet-e2e-node";

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
        let status = Command::new("bash")
            .arg(e2e.join("build-k8s.sh"))
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("tests/e2e/build-k8s.sh failed".into());
        }
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
    /// account, which this harness cannot mount). World-readable: sidecars run as UID 7102.
    pub fn pod_kubeconfig(&self) -> PathBuf {
        self.kubelet.kubeconfig.clone()
    }

    /// Stops the API server only (kube-apiserver's PID from the control plane's record).
    pub fn stop_apiserver(&self) -> Result<(), String> {
        self.control("stop-apiserver")
    }

    pub fn start_apiserver(&self) -> Result<(), String> {
        self.control("start-apiserver")
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

    /// Creates namespace `ns` with `ip` on eth0 and a default route via the bridge.
    pub fn add_pod(ns: &str, idx: u32, ip: Ipv4Addr) -> Result<(), String> {
        let (host, peer) = (format!("mlh{idx}"), format!("mlc{idx}"));
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
        let _ = sh("ip", &["link", "del", &format!("mlh{idx}")]);
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

/// The stand-in kubelet.
pub struct Kubelet {
    client: kube::Client,
    images: HashMap<String, PathBuf>,
    log_dir: PathBuf,
    /// Given to every container as `KUBECONFIG`.
    kubeconfig: PathBuf,
    pods: Mutex<HashMap<String, RunningPod>>,
    next: AtomicU32,
    /// When each pod was last marked Ready, by `namespace/name` (for latency measurements).
    pub ready_at: Mutex<HashMap<String, Instant>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
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
            pods: Mutex::new(HashMap::new()),
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
                    let k = key(&p);
                    let this = self.clone();
                    tokio::task::spawn_blocking(move || this.stop_pod(&k));
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
            let this = self.clone();
            let uid = pod.metadata.uid.clone();
            tokio::spawn(async move {
                let k2 = k.clone();
                let t = this.clone();
                let _ = tokio::task::spawn_blocking(move || t.stop_pod(&k2)).await;
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

    fn command_for(&self, c: &Container) -> Result<(PathBuf, Vec<String>), String> {
        let image = c.image.clone().unwrap_or_default();
        let bin = self
            .images
            .get(&image)
            .or_else(|| self.images.get(image.split(':').next().unwrap_or("")))
            .cloned()
            .ok_or_else(|| {
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
        Ok((bin, argv))
    }

    fn env_for(&self, pod: &Pod, c: &Container, ip: Ipv4Addr) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ),
            (
                "KUBECONFIG".to_string(),
                self.kubeconfig.display().to_string(),
            ),
        ];
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                        Some("metadata.name") => pod.metadata.name.clone().unwrap_or_default(),
                        Some("metadata.namespace") => {
                            pod.metadata.namespace.clone().unwrap_or_default()
                        }
                        Some("status.podIP") => ip.to_string(),
                        Some("spec.nodeName") => NODE.to_string(),
                        Some("spec.serviceAccountName") => pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.service_account_name.clone())
                            .unwrap_or_else(|| "default".into()),
                        _ => String::new(),
                    }
                }
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
    ) -> Result<Child, String> {
        let (bin, argv) = self.command_for(c)?;
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
        cmd.env_clear().envs(self.env_for(pod, c, ip));
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))
    }

    async fn start_pod(self: Arc<Self>, pod: &Pod) -> Result<(), String> {
        let k = key(pod);
        let spec = pod.spec.clone().unwrap_or_default();
        let idx = self.next.fetch_add(1, Ordering::SeqCst);
        let ip = Ipv4Addr::new(198, 18, 1 + (idx / 250) as u8, 2 + (idx % 250) as u8);
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
            let mut child = match self.spawn_container(pod, c, &netns, ip) {
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
            match self.spawn_container(pod, c, &netns, ip) {
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
            let _ = ch.kill();
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
        loop {
            if probe(p, c, ip).await {
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
                let ok = probe(p, c, ip).await;
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
        let Some(mut p) = self.pods.lock().unwrap().remove(k) else {
            return;
        };
        if let Some(t) = p.prober.take() {
            t.abort();
        }
        for (_, c) in &p.children {
            // SAFETY: kill(2) on a PID this harness started and has not reaped yet.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + p.grace;
        for (_, c) in p.children.iter_mut() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        Network::remove_pod(&p.netns, p.idx);
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

    pub fn pod_netns(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods
            .lock()
            .unwrap()
            .get(&format!("{namespace}/{name}"))
            .map(|p| p.netns.clone())
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

fn resolve_port(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// One readiness probe, with kubelet's semantics: HTTP 200-399 succeeds, a TCP connect
/// succeeds, each within the probe's timeout.
async fn probe(p: &Probe, c: &Container, ip: Ipv4Addr) -> bool {
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    let attempt = async {
        if let Some(h) = &p.http_get {
            let port = resolve_port(&h.port, c)?;
            let host = h.host.clone().unwrap_or_else(|| ip.to_string());
            let addr: SocketAddr = format!("{host}:{port}").parse().ok()?;
            let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .ok()?;
            tokio::spawn(conn);
            let mut req = http::Request::get(h.path.clone().unwrap_or_else(|| "/".into()))
                .header("host", format!("{host}:{port}"))
                .header("user-agent", "kube-probe/meshlet-e2e");
            for hh in h.http_headers.iter().flatten() {
                req = req.header(hh.name.as_str(), hh.value.as_str());
            }
            let req = req
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .ok()?;
            let rsp = sender.send_request(req).await.ok()?;
            let code = rsp.status().as_u16();
            Some((200..400).contains(&code))
        } else if let Some(t) = &p.tcp_socket {
            let port = resolve_port(&t.port, c)?;
            Some(tokio::net::TcpStream::connect((ip, port)).await.is_ok())
        } else {
            // exec and grpc probes are not run by this harness: treated as passing.
            Some(true)
        }
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
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

/// Paths of the binaries the tests map images to.
pub fn binaries() -> HashMap<String, PathBuf> {
    let meshlet = PathBuf::from(env!("CARGO_BIN_EXE_meshlet"));
    let target = meshlet.parent().expect("target dir").to_path_buf();
    let mut m = HashMap::new();
    m.insert("meshlet".to_string(), meshlet);
    m.insert("e2e-app".to_string(), target.join("examples/e2e-app"));
    m.insert("iptables".to_string(), PathBuf::from("/usr/sbin/iptables"));
    m.insert("sh".to_string(), PathBuf::from("/bin/sh"));
    m
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
