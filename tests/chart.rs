//! The Helm chart (charts/meshlet), rendered by the real helm CLI: lint, golden renders for a
//! few value sets, the schema's refusals, the certificate it generates, and the plain
//! manifests in manifests/ being the chart's current render.
//!
//! helm comes from `tests/e2e/build-k8s.sh` (built from its Go module, cached per version);
//! without Go the tests are skipped with a message, unless `CI` is set (then they fail).
//! `UPDATE_GOLDEN=1 cargo test --test chart` rewrites the golden files and the manifests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const RELEASE: &str = "meshlet";
const NAMESPACE: &str = "meshlet-system";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The helm binary, or None (skip) where it cannot be built.
fn helm() -> Option<PathBuf> {
    static HELM: OnceLock<Option<PathBuf>> = OnceLock::new();
    HELM.get_or_init(|| {
        if let Some(p) = std::env::var_os("MESHLET_HELM") {
            return Some(PathBuf::from(p));
        }
        let go = Command::new("go").arg("version").output().is_ok();
        if !go {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but Go is missing: helm cannot be built"
            );
            eprintln!("chart tests skipped: needs Go to build helm (tests/e2e/build-k8s.sh)");
            return None;
        }
        let out = Command::new("bash")
            .arg(repo().join("tests/e2e/build-k8s.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run tests/e2e/build-k8s.sh");
        assert!(out.status.success(), "tests/e2e/build-k8s.sh failed");
        let bin = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("build-k8s.sh prints its bin directory")
            .trim()
            .to_string();
        Some(Path::new(&bin).join("helm"))
    })
    .clone()
}

/// `helm template` of the chart with these extra arguments: Ok(stdout) or Err(stderr).
fn render(helm: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm)
        .args(["template", RELEASE])
        .arg(repo().join("charts/meshlet"))
        .args(["--namespace", NAMESPACE])
        .args(args)
        .output()
        .expect("run helm");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Replaces what the chart generates afresh on each render (the webhook's CA, certificate
/// and key) with a placeholder, so that golden files are stable.
fn normalize(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        match ["tls.crt: ", "tls.key: ", "ca.crt: ", "caBundle: "]
            .iter()
            .find(|k| trimmed.starts_with(**k))
        {
            Some(k) if trimmed.len() > k.len() + 100 => {
                out.push_str(&format!("{indent}{k}<generated>\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn update() -> bool {
    std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1")
}

/// Compares `got` with the file, or rewrites the file under UPDATE_GOLDEN=1.
fn check_file(path: &Path, got: &str) -> Result<(), String> {
    if update() {
        std::fs::write(path, got).unwrap();
        return Ok(());
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    if want == got {
        return Ok(());
    }
    let first = want
        .lines()
        .zip(got.lines())
        .position(|(a, b)| a != b)
        .unwrap_or(want.lines().count().min(got.lines().count()));
    Err(format!(
        "{} differs from the chart's render from line {} (want {:?}, got {:?}); \
         UPDATE_GOLDEN=1 cargo test --test chart rewrites it",
        path.display(),
        first + 1,
        want.lines().nth(first),
        got.lines().nth(first)
    ))
}

#[test]
fn chart_lints() {
    let Some(helm) = helm() else { return };
    let mut cases = vec![vec![]];
    for v in golden_value_files() {
        cases.push(vec!["--values".to_string(), v.display().to_string()]);
    }
    for extra in cases {
        let out = Command::new(&helm)
            .args(["lint", "--strict", "--namespace", NAMESPACE])
            .arg(repo().join("charts/meshlet"))
            .args(&extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm lint {extra:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// tests/golden/chart/<name>.values.yaml, sorted.
fn golden_value_files() -> Vec<PathBuf> {
    let dir = repo().join("tests/golden/chart");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".values.yaml"))
        .collect();
    v.sort();
    v
}

#[test]
fn renders_match_golden_files() {
    let Some(helm) = helm() else { return };
    let dir = repo().join("tests/golden/chart");
    let mut failures = Vec::new();
    let got = normalize(&render(&helm, &[]).expect("default render"));
    if let Err(e) = check_file(&dir.join("default.yaml"), &got) {
        failures.push(e);
    }
    let values = golden_value_files();
    assert!(values.len() >= 3, "the value sets are missing: {values:?}");
    for v in values {
        let name = v.file_name().unwrap().to_string_lossy().to_string();
        let name = name.strip_suffix(".values.yaml").unwrap();
        let got = match render(&helm, &["--values", &v.display().to_string()]) {
            Ok(t) => normalize(&t),
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if let Err(e) = check_file(&dir.join(format!("{name}.yaml")), &got) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn schema_and_templates_refuse_bad_values_naming_them() {
    let Some(helm) = helm() else { return };
    for (set, expect) in [
        ("injector.replicas=two", "/injector/replicas"),
        ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
        ("webhook.timeoutSeconds=60", "/webhook/timeoutSeconds"),
        ("webhook.certs.source=vault", "/webhook/certs/source"),
        ("proxy.rbac.scope=everyone", "/proxy/rbac/scope"),
        ("injector.replcas=3", "replcas"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("injector.shutdownDelay=soon", "/injector/shutdownDelay"),
        ("proxy.rbac.scope=namespaces", "proxy.rbac.namespaces"),
        ("webhook.certs.source=secret", "webhook.certs.secretName"),
        ("identity.issuer.source=vault", "/identity/issuer/source"),
        ("identity.trustDomain=Example.org", "/identity/trustDomain"),
        ("identity.certTTL=soon", "/identity/certTTL"),
        (
            "identity.enabled=true,identity.issuer.source=secret",
            "identity.issuer.secretName",
        ),
    ] {
        match render(&helm, &["--set", set]) {
            Ok(_) => panic!("--set {set} was accepted"),
            Err(e) => assert!(e.contains(expect), "--set {set}: {e}"),
        }
    }
}

#[test]
fn cluster_versions_and_replica_counts_are_checked() {
    let Some(helm) = helm() else { return };
    // Native sidecars need 1.29: the default is refused on 1.28, naming the value to change.
    let e = render(&helm, &["--kube-version", "1.28.9"]).unwrap_err();
    assert!(e.contains("proxy.nativeSidecars=false"), "{e}");
    let ok = render(
        &helm,
        &[
            "--kube-version",
            "1.28.9",
            "--set",
            "proxy.nativeSidecars=false",
        ],
    )
    .unwrap();
    assert!(ok.contains("--classic-sidecars"), "{ok}");
    // Below the chart's kubeVersion, helm itself refuses.
    let e = render(&helm, &["--kube-version", "1.24.0"]).unwrap_err();
    assert!(e.contains("kubeVersion"), "{e}");
    // One replica gets no PodDisruptionBudget (minAvailable 1 would block node drains).
    let one = render(&helm, &["--set", "injector.replicas=1"]).unwrap();
    assert!(!one.contains("kind: PodDisruptionBudget"), "{one}");
    let two = render(&helm, &[]).unwrap();
    assert!(two.contains("kind: PodDisruptionBudget"));
}

/// The base64 value of the first `key` line of a render, decoded.
fn base64_field(text: &str, key: &str) -> Vec<u8> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in\n{text}"));
    base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        line[key.len()..].trim(),
    )
    .unwrap()
}

#[test]
fn generated_certificate_serves_the_injector_service() {
    let Some(helm) = helm() else { return };
    let text = render(&helm, &["--show-only", "templates/webhook.yaml"]).unwrap();
    let field = |key: &str| base64_field(&text, key);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), field("tls.crt:")).unwrap();
    std::fs::write(dir.path().join("ca.crt"), field("ca.crt:")).unwrap();
    assert_eq!(
        field("ca.crt:"),
        field("caBundle:"),
        "the webhook trusts another CA"
    );
    let verify = Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "verify",
            "-CAfile",
            "ca.crt",
            "-verify_hostname",
            "meshlet-injector.meshlet-system.svc",
            "tls.crt",
        ])
        .output()
        .expect("openssl");
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// The chart's generated trust anchor (an ECDSA key in SEC1 PEM, as Helm writes it) is an
/// issuer `meshlet identity` loads: it signs a sidecar's leaf that verifies against it.
#[test]
fn generated_identity_issuer_signs_for_sidecars() {
    let Some(helm) = helm() else { return };
    let text = render(
        &helm,
        &[
            "--show-only",
            "templates/identity.yaml",
            "--set",
            "identity.enabled=true",
        ],
    )
    .unwrap();
    let field = |key: &str| base64_field(&text, key);
    let key = field("tls.key:");
    assert!(key.starts_with(b"-----BEGIN EC PRIVATE KEY-----"));
    use meshlet::identity::ca::{Ca, IssuerPem, SpiffeId};
    let ca = Ca::new(
        IssuerPem {
            chain: &field("tls.crt:"),
            key: &key,
            anchors: &field("ca.crt:"),
        },
        "cluster.local",
        std::time::Duration::from_secs(3600),
        std::time::Duration::from_secs(60),
    )
    .unwrap();
    let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
    let sidecar = rcgen::KeyPair::generate().unwrap();
    let now = std::time::SystemTime::now();
    let issued = ca.sign(&id, &sidecar, now).unwrap();
    ca.verify(&issued, now).unwrap();
    // The service is told the issuer Secret it may read, and the Role names the same one.
    assert!(
        text.contains("--issuer-secret=meshlet-identity-issuer"),
        "{text}"
    );
    assert!(
        text.contains("resourceNames: [\"meshlet-identity-issuer\"]"),
        "{text}"
    );
}

/// The plain manifests: what `kubectl apply -f manifests/` users get.
pub fn manifest_renders(helm: &Path) -> Vec<(&'static str, String)> {
    let values = repo().join("manifests/values.yaml").display().to_string();
    let header = "# Rendered from charts/meshlet with manifests/values.yaml by tests/chart.rs\n\
                  # (UPDATE_GOLDEN=1 cargo test --test chart); do not edit by hand.\n";
    let all = render(helm, &["--values", &values]).expect("render manifests");
    let ns = format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    app.kubernetes.io/name: meshlet\n"
    );
    let rbac = render(
        helm,
        &[
            "--values",
            &values,
            "--show-only",
            "templates/proxy-rbac.yaml",
        ],
    )
    .expect("render proxy RBAC");
    vec![
        (
            "meshlet.yaml",
            format!(
                "{header}# Then run manifests/webhook-cert.sh to give the injector its certificate.\n{ns}{all}"
            ),
        ),
        (
            "meshlet-proxy-rbac.yaml",
            format!(
                "{header}# Only the sidecars' RBAC (list/watch Services and EndpointSlices), for\n\
                 # running meshlet proxy with Kubernetes discovery without the injector.\n{rbac}"
            ),
        ),
    ]
}

#[test]
fn manifests_are_the_charts_current_render() {
    let Some(helm) = helm() else { return };
    let mut failures = Vec::new();
    for (file, text) in manifest_renders(&helm) {
        if text.contains("kind: Secret") {
            failures.push(format!(
                "manifests/{file} holds a Secret (a key shared by all users)"
            ));
        }
        if let Err(e) = check_file(&repo().join("manifests").join(file), &text) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart = std::fs::read_to_string(repo().join("charts/meshlet/Chart.yaml")).unwrap();
    let app = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .expect("appVersion in Chart.yaml")
        .trim()
        .trim_matches('"');
    assert_eq!(app, env!("CARGO_PKG_VERSION"));
}

/// Every key of values.yaml (leaves, and maps or lists given as a whole) is documented in the
/// chart README's values table.
#[test]
fn every_value_is_documented() {
    let text = std::fs::read_to_string(repo().join("charts/meshlet/values.yaml")).unwrap();
    let values: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let readme = std::fs::read_to_string(repo().join("charts/meshlet/README.md")).unwrap();
    let mut keys = Vec::new();
    fn walk(prefix: &str, v: &serde_yaml::Value, keys: &mut Vec<String>) {
        match v {
            serde_yaml::Value::Mapping(m) if !m.is_empty() && !prefix.ends_with(".resources") => {
                for (k, v) in m {
                    let k = k.as_str().unwrap();
                    let p = if prefix.is_empty() {
                        k.to_string()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v, keys);
                }
            }
            _ => keys.push(prefix.to_string()),
        }
    }
    walk("", &values, &mut keys);
    assert!(keys.len() > 30, "{keys:?}");
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !readme.contains(&format!("| `{k}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "values missing from the chart README's table: {missing:?}"
    );
}
