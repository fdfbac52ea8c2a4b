//! The container image, without Docker: runs `tests/image/check.sh`, which lints the
//! Dockerfile (hadolint), builds the static musl binaries from a copy of the build stage's
//! context and runs them in an otherwise empty root, as the `FROM scratch` images would run
//! them (see `tests/image/README.md`). Needs root (chroot), bash and coreutils' `timeout`;
//! skips with a message otherwise. The script installs hadolint, the rustup musl target and
//! musl-tools when they are missing, and builds in its own target dir (`target/image`).

mod support;

use std::io::{Read, Seek};
use std::path::Path;
use std::process::{Command, Stdio};
use support::find_tool;

/// A cold build of both binaries takes about 4 minutes on 2 cores; this bounds a stuck one.
const LIMIT: &str = "1800";

fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipping {test}: needs root (chroot into the image's empty root)");
        return false;
    }
    for (tool, package) in [("bash", "bash"), ("timeout", "coreutils")] {
        if find_tool(tool).is_none() {
            println!("skipping {test}: `{tool}` is not installed (apt-get install {package})");
            return false;
        }
    }
    true
}

#[test]
fn minimal_image_runs_the_static_binary_root() {
    if !can_run("minimal_image_runs_the_static_binary_root") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    // One file for stdout and stderr, so that the output reads in order.
    let mut log = tempfile::tempfile().expect("a temporary file");
    let status = Command::new("timeout")
        .args(["--kill-after=10", LIMIT, "bash", "tests/image/check.sh"])
        .current_dir(repo)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("a second handle"))
        .stderr(log.try_clone().expect("a second handle"))
        .status()
        .expect("cannot run bash tests/image/check.sh");
    let mut output = String::new();
    log.rewind().expect("rewind the log");
    log.read_to_string(&mut output).expect("read the log");
    assert!(
        status.success(),
        "tests/image/check.sh failed ({status}; 124 is the {LIMIT} s limit):\n{output}"
    );
    // Shown with --nocapture: what was proved, and the sizes.
    for line in output.lines().filter(|l| l.starts_with("image check:")) {
        println!("{line}");
    }
}
