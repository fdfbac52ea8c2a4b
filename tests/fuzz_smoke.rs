//! Runs every fuzz target in fuzz/ briefly, over its seed corpus, and fails on any crash.
//!
//! The targets are cargo-fuzz (libFuzzer) targets: they need the nightly toolchain and
//! cargo-fuzz (`cargo install cargo-fuzz --locked`). Without either, this test says so and
//! passes. The build goes to a directory outside the repository
//! (`$HOME/.cache/meshlet-tools/fuzz-target`), so that a second run on the same machine reuses
//! it. libFuzzer first replays the whole seed corpus (fuzz/corpus/<target>/, never written to:
//! new inputs go to a temporary directory), then mutates for `SECONDS_PER_TARGET`. A crashing
//! input is saved in fuzz/artifacts/<target>/ and printed.
//!
//! The README's "Fuzzing" section has the commands for longer runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Every target in fuzz/Cargo.toml.
const TARGETS: &[&str] = &[
    "detect",
    "http1_edge",
    "admission",
    "policy",
    "config",
    "grpc_health",
    "iptables",
];
const SECONDS_PER_TARGET: u32 = 15;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache/meshlet-tools/fuzz-target")
}

/// `cargo +nightly <args>` from the repository root, without the variables this test's own
/// (stable) cargo set, which would otherwise leak into the nightly build.
fn nightly(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly").args(args).current_dir(repo());
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let cargo_own = k.starts_with("CARGO_")
            && !matches!(&*k, "CARGO_HOME" | "CARGO_BUILD_JOBS" | "CARGO_NET_OFFLINE");
        if cargo_own
            || matches!(
                &*k,
                "CARGO"
                    | "RUSTUP_TOOLCHAIN"
                    | "RUSTC"
                    | "RUSTDOC"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
            )
        {
            cmd.env_remove(&*k);
        }
    }
    cmd
}

/// Why the targets cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    let works = |args: &[&str]| {
        nightly(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works(&["--version"]) {
        return Some(
            "`cargo +nightly` does not run (no rustup, or no nightly toolchain: \
             `rustup toolchain install nightly`)"
                .into(),
        );
    }
    if !works(&["fuzz", "--version"]) {
        return Some(
            "cargo-fuzz is not installed (`cargo install cargo-fuzz --locked`; .ci/run does it)"
                .into(),
        );
    }
    None
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A libFuzzer final statistic (`stat::<name>: <value>`).
fn stat(output: &str, name: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
        .map_or("?".into(), |v| v.trim().to_string())
}

fn run_target(target: &str, work: &Path) -> Result<String, String> {
    let corpus = work.join(target);
    std::fs::create_dir_all(&corpus).map_err(|e| format!("{}: {e}", corpus.display()))?;
    let seeds = repo().join("fuzz/corpus").join(target);
    let target_dir = target_dir();
    let regressions = repo().join("fuzz/regressions").join(target);
    let max_time = format!("-max_total_time={SECONDS_PER_TARGET}");
    let started = Instant::now();
    let (target_dir, corpus, seeds, regressions) = (
        target_dir.to_string_lossy(),
        corpus.to_string_lossy(),
        seeds.to_string_lossy(),
        regressions.to_string_lossy(),
    );
    let mut args = vec![
        "fuzz",
        "run",
        "--sanitizer",
        "none",
        "--target-dir",
        &target_dir,
        target,
        &corpus,
        &seeds,
    ];
    if Path::new(regressions.as_ref()).is_dir() {
        args.push(&regressions);
    }
    args.extend([
        "--",
        &max_time,
        // The same mutations on every run: what this finds, it finds again (new inputs are
        // the long run's job, fuzz/long-run.sh).
        "-seed=1",
        // One input taking this long is a hang: a failure, not a slow run.
        "-timeout=10",
        "-rss_limit_mb=1024",
        "-print_final_stats=1",
    ]);
    let out = nightly(&args)
        .output()
        .map_err(|e| format!("cannot run cargo +nightly fuzz: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!(
            "fuzz target {target} failed ({}); the end of its output:\n{}",
            out.status,
            tail(&text, 60)
        ));
    }
    Ok(format!(
        "{target}: {:.0?}, {} execs, corpus {} inputs, no crash",
        started.elapsed(),
        stat(&text, "number_of_executed_units"),
        std::fs::read_dir(&*corpus).map_or(0, |d| d.count())
            + std::fs::read_dir(&*seeds).map_or(0, |d| d.count()),
    ))
}

#[test]
fn every_fuzz_target_runs_its_seeds_and_a_few_seconds_without_a_crash() {
    // Every target listed here is one of fuzz/Cargo.toml's, and the reverse; each has seeds.
    let manifest = std::fs::read_to_string(repo().join("fuzz/Cargo.toml")).unwrap();
    let declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "meshlet-fuzz")
        .collect();
    assert_eq!(
        declared, TARGETS,
        "fuzz/Cargo.toml's targets and this list differ"
    );
    for target in TARGETS {
        let seeds = repo().join("fuzz/corpus").join(target);
        let n = std::fs::read_dir(&seeds).map_or(0, |d| d.count());
        assert!(n > 0, "{}: no seed corpus", seeds.display());
    }

    if let Some(why) = unavailable() {
        eprintln!("fuzz_smoke: skipped: {why}");
        return;
    }
    let started = Instant::now();
    // One build of all the targets first, so that each run below starts at once.
    let build = nightly(&[
        "fuzz",
        "build",
        "--sanitizer",
        "none",
        "--target-dir",
        &target_dir().to_string_lossy(),
    ])
    .output()
    .expect("cargo +nightly fuzz build");
    assert!(
        build.status.success(),
        "cargo +nightly fuzz build failed:\n{}",
        tail(&String::from_utf8_lossy(&build.stderr), 60)
    );
    eprintln!("fuzz_smoke: built in {:.0?}", started.elapsed());

    let work = tempfile::tempdir().expect("a temporary directory");
    let mut failures = Vec::new();
    for target in TARGETS {
        match run_target(target, work.path()) {
            Ok(summary) => eprintln!("fuzz_smoke: {summary}"),
            Err(e) => failures.push(e),
        }
    }
    eprintln!("fuzz_smoke: took {:.0?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} fuzz target(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
