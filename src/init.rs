//! `meshlet init`: the pod's NAT rules, which send its TCP traffic through the sidecar.
//!
//! [`rules`] is a pure function from an [`InitConfig`] to `iptables-restore` input for the nat
//! table, one address family at a time; [`run`] detects the iptables backend, applies the rules
//! and makes sure the built-in chains jump to ours exactly once.
//!
//! The chains (all ours, all in the nat table):
//! - `MESHLET_INBOUND`, jumped to from `PREROUTING` for TCP: returns for the admin and gRPC
//!   health ports and the skip-inbound ports, then goes to `MESHLET_IN_REDIRECT`, which
//!   redirects to the inbound port.
//! - `MESHLET_OUTPUT`, jumped to from `OUTPUT` for TCP: returns for the proxy's own uid, for
//!   traffic leaving through `lo` or addressed to loopback, for the skip-outbound ports and
//!   CIDRs of the family, then goes to `MESHLET_OUT_REDIRECT`, which redirects to the outbound
//!   port.
//!
//! Idempotence: the rules are applied with `iptables-restore --noflush`. In that format a chain
//! declaration (`:MESHLET_OUTPUT - [0:0]`) creates the chain when it is missing and flushes it
//! when it exists, so our four chains end up holding exactly the rules below however often this
//! runs, and nobody else's rules are touched. The jumps from the built-in `PREROUTING` and
//! `OUTPUT` chains cannot be written that way (flushing those chains would delete other
//! components' rules, and a `-D` of a missing rule fails the whole restore), so they are not in
//! the restore input: after it, [`run`] checks each jump with `iptables -C` and inserts it only
//! when the check fails. Running twice therefore leaves one copy of every rule and every jump.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};
use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

/// Our chains, in the order they are declared.
pub const INBOUND_CHAIN: &str = "MESHLET_INBOUND";
pub const IN_REDIRECT_CHAIN: &str = "MESHLET_IN_REDIRECT";
pub const OUTPUT_CHAIN: &str = "MESHLET_OUTPUT";
pub const OUT_REDIRECT_CHAIN: &str = "MESHLET_OUT_REDIRECT";

/// The address family a rule set is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// A port or an inclusive port range (`8000-8100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    /// In iptables' syntax: `80` or `8000:8100`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// A network: an address with its host bits cleared and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What `meshlet init` needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitConfig {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub grpc_port: u16,
    pub skip_inbound_ports: Vec<PortRange>,
    pub skip_outbound_ports: Vec<PortRange>,
    /// Both families; [`rules`] uses those of the family it writes.
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Also write the IPv6 rules (with ip6tables).
    pub ipv6: bool,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            proxy_uid: 7102,
            inbound_port: 7143,
            outbound_port: 7140,
            admin_port: 7190,
            grpc_port: 7191,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: Vec::new(),
            ipv6: false,
        }
    }
}

/// The `iptables-restore` input (to apply with `--noflush`) for the nat table: our four chains,
/// declared (created or flushed) and filled. The jumps to them from the built-in chains are
/// listed as comments; [`run`] adds them (see the module docs).
pub fn rules(cfg: &InitConfig, family: Family) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# meshlet init: {} nat rules (iptables-restore --noflush input)",
        family.name()
    );
    let _ = writeln!(
        w,
        "# then, once each (checked with -C, inserted with -I ... 1 when missing):"
    );
    for jump in jumps() {
        let _ = writeln!(w, "#   {}", jump.join(" "));
    }
    let _ = writeln!(w, "*nat");
    for chain in [
        INBOUND_CHAIN,
        IN_REDIRECT_CHAIN,
        OUTPUT_CHAIN,
        OUT_REDIRECT_CHAIN,
    ] {
        let _ = writeln!(w, ":{chain} - [0:0]");
    }

    // Inbound: the proxy's own ports and the skipped ones reach their listeners unchanged.
    for (port, why) in [
        (cfg.admin_port, "admin port"),
        (cfg.grpc_port, "gRPC health port"),
    ] {
        let _ = writeln!(
            w,
            "-A {INBOUND_CHAIN} -p tcp --dport {port} -m comment --comment \"meshlet: {why}\" -j RETURN"
        );
    }
    for p in &cfg.skip_inbound_ports {
        let _ = writeln!(
            w,
            "-A {INBOUND_CHAIN} -p tcp --dport {p} -m comment --comment \"meshlet: skip inbound port\" -j RETURN"
        );
    }
    let _ = writeln!(w, "-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}");
    let _ = writeln!(
        w,
        "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        cfg.inbound_port
    );

    // Outbound: the proxy's own connections, loopback and the skipped ones go out as they are.
    let _ = writeln!(
        w,
        "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -m comment --comment \"meshlet: the proxy's own traffic\" -j RETURN",
        cfg.proxy_uid
    );
    let _ = writeln!(
        w,
        "-A {OUTPUT_CHAIN} -o lo -m comment --comment \"meshlet: loopback\" -j RETURN"
    );
    let _ = writeln!(
        w,
        "-A {OUTPUT_CHAIN} -d {} -m comment --comment \"meshlet: loopback\" -j RETURN",
        family.loopback()
    );
    for p in &cfg.skip_outbound_ports {
        let _ = writeln!(
            w,
            "-A {OUTPUT_CHAIN} -p tcp --dport {p} -m comment --comment \"meshlet: skip outbound port\" -j RETURN"
        );
    }
    for c in cfg
        .skip_outbound_cidrs
        .iter()
        .filter(|c| c.addr.is_ipv4() == (family == Family::V4))
    {
        let _ = writeln!(
            w,
            "-A {OUTPUT_CHAIN} -d {c} -m comment --comment \"meshlet: skip outbound CIDR\" -j RETURN"
        );
    }
    let _ = writeln!(w, "-A {OUTPUT_CHAIN} -p tcp -j {OUT_REDIRECT_CHAIN}");
    let _ = writeln!(
        w,
        "-A {OUT_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        cfg.outbound_port
    );
    let _ = writeln!(w, "COMMIT");
    out
}

/// The jumps from the built-in chains to ours, as `iptables -t nat` arguments (with `-A`).
pub fn jumps() -> [Vec<&'static str>; 2] {
    [
        vec!["-A", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN],
        vec!["-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN],
    ]
}

// ===== input: flags and env =====

/// `meshlet init`'s flags; each can also come from its `MESHLET_*` variable (what the injector
/// writes). Values are strings here and validated by [`InitArgs::config`], so that an error
/// names both the flag and the variable.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Print the rules (iptables-restore format) instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
    /// The proxy's uid: its own connections are not redirected.
    #[arg(long, env = "MESHLET_PROXY_UID", default_value = "7102")]
    pub proxy_uid: String,
    /// Where inbound TCP is redirected.
    #[arg(long, env = "MESHLET_INBOUND_PORT", default_value = "7143")]
    pub inbound_port: String,
    /// Where outbound TCP is redirected.
    #[arg(long, env = "MESHLET_OUTBOUND_PORT", default_value = "7140")]
    pub outbound_port: String,
    /// The admin port: inbound connections to it are not redirected.
    #[arg(long, env = "MESHLET_ADMIN_PORT", default_value = "7190")]
    pub admin_port: String,
    /// The gRPC health port: inbound connections to it are not redirected.
    #[arg(long, env = "MESHLET_GRPC_PORT", default_value = "7191")]
    pub grpc_port: String,
    /// Inbound ports not redirected: comma-separated ports or ranges (`8000-8100`).
    #[arg(long, env = "MESHLET_SKIP_INBOUND_PORTS", default_value = "")]
    pub skip_inbound_ports: String,
    /// Outbound destination ports not redirected: comma-separated ports or ranges.
    #[arg(long, env = "MESHLET_SKIP_OUTBOUND_PORTS", default_value = "")]
    pub skip_outbound_ports: String,
    /// Outbound destinations not redirected: comma-separated CIDRs or addresses, IPv4 and
    /// IPv6 (each family's go to its own rules).
    #[arg(long, env = "MESHLET_SKIP_OUTBOUND_CIDRS", default_value = "")]
    pub skip_outbound_cidrs: String,
    /// Also write the IPv6 rules: `true` or `false` (`--ipv6` alone: true).
    #[arg(
        long,
        env = "MESHLET_IPV6",
        default_value = "false",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub ipv6: String,
}

/// A bad input: which flag (and variable), the value, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag} (env {env}): invalid value {value:?}: {reason}")]
pub struct InputError {
    pub flag: &'static str,
    pub env: &'static str,
    pub value: String,
    pub reason: String,
}

impl InitArgs {
    pub fn config(&self) -> Result<InitConfig, InputError> {
        let err = |flag: &'static str, env: &'static str, value: &str, reason: String| InputError {
            flag,
            env,
            value: value.to_string(),
            reason,
        };
        let port =
            |flag, env, v: &str| parse_port(v.trim()).map_err(|reason| err(flag, env, v, reason));
        let ports = |flag, env, v: &str| parse_ports(v).map_err(|reason| err(flag, env, v, reason));
        let cfg = InitConfig {
            proxy_uid: self.proxy_uid.trim().parse().map_err(|_| {
                err(
                    "proxy-uid",
                    "MESHLET_PROXY_UID",
                    &self.proxy_uid,
                    "not a uid (0 to 4294967295)".into(),
                )
            })?,
            inbound_port: port("inbound-port", "MESHLET_INBOUND_PORT", &self.inbound_port)?,
            outbound_port: port(
                "outbound-port",
                "MESHLET_OUTBOUND_PORT",
                &self.outbound_port,
            )?,
            admin_port: port("admin-port", "MESHLET_ADMIN_PORT", &self.admin_port)?,
            grpc_port: port("grpc-port", "MESHLET_GRPC_PORT", &self.grpc_port)?,
            skip_inbound_ports: ports(
                "skip-inbound-ports",
                "MESHLET_SKIP_INBOUND_PORTS",
                &self.skip_inbound_ports,
            )?,
            skip_outbound_ports: ports(
                "skip-outbound-ports",
                "MESHLET_SKIP_OUTBOUND_PORTS",
                &self.skip_outbound_ports,
            )?,
            skip_outbound_cidrs: parse_cidrs(&self.skip_outbound_cidrs).map_err(|reason| {
                err(
                    "skip-outbound-cidrs",
                    "MESHLET_SKIP_OUTBOUND_CIDRS",
                    &self.skip_outbound_cidrs,
                    reason,
                )
            })?,
            ipv6: parse_bool(&self.ipv6)
                .map_err(|reason| err("ipv6", "MESHLET_IPV6", &self.ipv6, reason))?,
        };
        if cfg.inbound_port == cfg.outbound_port {
            return Err(err(
                "outbound-port",
                "MESHLET_OUTBOUND_PORT",
                &self.outbound_port,
                "the same as --inbound-port".into(),
            ));
        }
        Ok(cfg)
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s:?} is not a port (1 to 65535)")),
        Ok(p) => Ok(p),
    }
}

/// Comma-separated ports and ranges; empty items are ignored; sorted, duplicates removed.
fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    let mut set = BTreeSet::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let r = match item.split_once('-') {
            Some((a, b)) => {
                let (first, last) = (parse_port(a.trim())?, parse_port(b.trim())?);
                if first > last {
                    return Err(format!("{item:?} is an empty range"));
                }
                PortRange { first, last }
            }
            None => {
                let p = parse_port(item)?;
                PortRange { first: p, last: p }
            }
        };
        set.insert(r);
    }
    Ok(set.into_iter().collect())
}

/// Comma-separated CIDRs (or bare addresses, taken as /32 or /128); host bits are cleared.
fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    let mut set = BTreeSet::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (a, p) = match item.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (item, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{item:?} is not a CIDR (like 10.0.0.0/8 or fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{item:?}: the prefix length must be 0 to {max}")),
            },
        };
        let addr = match addr {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from((u32::from(v4) & mask).to_be_bytes())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from((u128::from(v6) & mask).to_be_bytes())
            }
        };
        set.insert(Cidr { addr, prefix });
    }
    Ok(set.into_iter().collect())
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

// ===== the executor =====

/// Which iptables the rules go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
    /// Plain `iptables`, whatever it is (when neither variant is installed by name).
    Default,
}

impl Backend {
    fn suffix(self) -> &'static str {
        match self {
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
            Backend::Default => "",
        }
    }

    /// `iptables-nft-restore`, `ip6tables-legacy`, ...: `tool` is `restore`, `save` or `` (the
    /// plain command).
    fn tool(self, family: Family, tool: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        if tool.is_empty() {
            format!("{base}{}", self.suffix())
        } else {
            format!("{base}{}-{tool}", self.suffix())
        }
    }

    fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::Default => "default (plain iptables)",
        }
    }
}

/// A tool on `PATH` (only there: the error says so).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Rules already present in a backend (all tables), the way kube-proxy's iptables-wrapper,
/// istio and linkerd decide: the kubelet's hint chains win outright; otherwise the backend
/// holding more rules. `None` when the save tool is missing or fails.
fn existing_rules(save: &Path) -> Option<(bool, usize)> {
    let out = Command::new(save)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let hint = text.contains("KUBE-IPTABLES-HINT") || text.contains("KUBE-KUBELET-CANARY");
    let count = text.lines().filter(|l| l.starts_with("-A ")).count();
    Some((hint, count))
}

/// The backend to use and why.
fn detect_backend() -> Result<(Backend, String), String> {
    let have = |b: Backend| which(&b.tool(Family::V4, "restore")).is_some();
    let (nft, legacy) = (have(Backend::Nft), have(Backend::Legacy));
    if !nft && !legacy {
        return if have(Backend::Default) {
            Ok((
                Backend::Default,
                "neither iptables-nft nor iptables-legacy is installed by name".into(),
            ))
        } else {
            Err("iptables-restore not found in PATH; install iptables".into())
        };
    }
    if nft != legacy {
        let b = if nft { Backend::Nft } else { Backend::Legacy };
        return Ok((b, "the only variant installed".into()));
    }
    let look = |b: Backend| which(&b.tool(Family::V4, "save")).and_then(|p| existing_rules(&p));
    let (n, l) = (look(Backend::Nft), look(Backend::Legacy));
    let (nh, nc) = n.unwrap_or((false, 0));
    let (lh, lc) = l.unwrap_or((false, 0));
    Ok(if lh && !nh {
        (
            Backend::Legacy,
            "the kubelet's hint chain is in legacy".into(),
        )
    } else if nh && !lh {
        (Backend::Nft, "the kubelet's hint chain is in nft".into())
    } else if lc > nc {
        (
            Backend::Legacy,
            format!("legacy holds more rules ({lc} against {nc} in nft)"),
        )
    } else {
        (
            Backend::Nft,
            format!("nft holds as many rules or more ({nc} against {lc} in legacy)"),
        )
    })
}

/// A failed iptables command, told plainly.
fn explain(tool: &str, stderr: &str) -> String {
    let s = stderr.trim();
    let lower = s.to_ascii_lowercase();
    if lower.contains("permission denied")
        || lower.contains("operation not permitted")
        || lower.contains("you must be root")
    {
        format!("meshlet init needs the NET_ADMIN capability ({tool}: {s})")
    } else {
        format!("{tool} failed: {s}")
    }
}

fn run_tool(path: &Path, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    use std::io::Write as _;
    let tool = path.file_name().unwrap_or_default().to_string_lossy();
    let mut child = Command::new(path)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => format!("{tool} not found in PATH; install iptables"),
            _ => format!("cannot run {tool}: {e}"),
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as the tool's failure below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(explain(&tool, &String::from_utf8_lossy(&out.stderr)))
    }
}

/// Applies one family's rules and jumps with `backend`.
fn apply(cfg: &InitConfig, family: Family, backend: Backend) -> Result<(), String> {
    let find = |tool: &str| {
        let name = backend.tool(family, tool);
        which(&name).ok_or_else(|| format!("{name} not found in PATH; install iptables"))
    };
    let restore = find("restore")?;
    let iptables = find("")?;
    run_tool(&restore, &["-w", "--noflush"], Some(&rules(cfg, family)))?;
    for jump in jumps() {
        // `-C` fails when the jump is missing (or on any other error, which `-I` then reports).
        let mut check = jump.clone();
        check[0] = "-C";
        let mut args = vec!["-w", "-t", "nat"];
        args.extend(&check);
        if run_tool(&iptables, &args, None).is_ok() {
            continue;
        }
        let mut insert = vec!["-w", "-t", "nat", "-I", jump[1], "1"];
        insert.extend(&jump[2..]);
        run_tool(&iptables, &insert, None)?;
    }
    Ok(())
}

/// `meshlet init`: prints (`--dry-run`) or applies the rules. Exit 2 on bad input, 1 when the
/// rules cannot be applied.
pub fn run(args: &InitArgs) -> ExitCode {
    let cfg = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshlet init: {e}");
            return ExitCode::from(2);
        }
    };
    let families: &[Family] = if cfg.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    if args.dry_run {
        for (i, f) in families.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print!("{}", rules(&cfg, *f));
        }
        return ExitCode::SUCCESS;
    }
    let (backend, why) = match detect_backend() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("meshlet init: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("meshlet init: iptables backend: {} ({why})", backend.name());
    for f in families {
        if let Err(e) = apply(&cfg, *f, backend) {
            eprintln!("meshlet init: {} rules: {e}", f.name());
            return ExitCode::FAILURE;
        }
        eprintln!(
            "meshlet init: {} rules applied: inbound TCP to port {}, outbound TCP to port {}",
            f.name(),
            cfg.inbound_port,
            cfg.outbound_port
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InitArgs,
    }

    fn args(argv: &[&str]) -> InitArgs {
        let mut all = vec!["init"];
        all.extend_from_slice(argv);
        Cli::try_parse_from(all).unwrap().args
    }

    /// Compares with `tests/golden/init/<name>.rules`; `UPDATE_GOLDEN=1` rewrites the file.
    fn golden(name: &str, got: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/init")
            .join(format!("{name}.rules"));
        if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, got).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e} (UPDATE_GOLDEN=1 writes it)",
                path.display()
            )
        });
        assert!(
            want == got,
            "{} differs (UPDATE_GOLDEN=1 rewrites it); got:\n{got}",
            path.display()
        );
    }

    fn with_skips() -> InitConfig {
        args(&[
            "--skip-inbound-ports",
            "9090, 8000-8100",
            "--skip-outbound-ports",
            "5432,3306",
            "--skip-outbound-cidrs",
            "198.18.5.7/16,198.19.0.9,2001:2::/48",
        ])
        .config()
        .unwrap()
    }

    #[test]
    fn golden_default_v4() {
        let cfg = args(&[]).config().unwrap();
        assert_eq!(cfg, InitConfig::default());
        golden("default", &rules(&cfg, Family::V4));
    }

    #[test]
    fn golden_skips_v4() {
        golden("skips", &rules(&with_skips(), Family::V4));
    }

    #[test]
    fn golden_skips_v6() {
        let mut cfg = with_skips();
        cfg.ipv6 = true;
        golden("skips-v6", &rules(&cfg, Family::V6));
    }

    #[test]
    fn rules_are_declared_before_use_and_committed() {
        let r = rules(&with_skips(), Family::V4);
        let lines: Vec<&str> = r.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        // Only our chains are written to: the built-in ones are left to `-C`/`-I`.
        for l in &lines[1..lines.len() - 1] {
            assert!(
                l.starts_with(":MESHLET_") || l.starts_with("-A MESHLET_"),
                "{l}"
            );
        }
        // The skipped CIDRs of the other family are left out.
        assert!(!r.contains("2001:2::"), "{r}");
        assert!(rules(&with_skips(), Family::V6).contains("-d 2001:2::/48"));
    }

    #[test]
    fn parses_lists() {
        let cfg = with_skips();
        assert_eq!(
            cfg.skip_inbound_ports,
            vec![
                PortRange {
                    first: 8000,
                    last: 8100
                },
                PortRange {
                    first: 9090,
                    last: 9090
                }
            ]
        );
        let cidrs: Vec<String> = cfg
            .skip_outbound_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            cidrs,
            ["198.18.0.0/16", "198.19.0.9/32", "2001:2::/48"],
            "host bits cleared, bare addresses are hosts"
        );
        assert!(args(&["--ipv6", "TRUE"]).config().unwrap().ipv6);
        assert!(args(&["--ipv6"]).config().unwrap().ipv6);
    }

    #[test]
    fn errors_name_the_flag_the_env_and_the_value() {
        let cases: [(&[&str], &str); 7] = [
            (
                &["--inbound-port", "70000"],
                "--inbound-port (env MESHLET_INBOUND_PORT): invalid value \"70000\": \"70000\" is not a port (1 to 65535)",
            ),
            (
                &["--admin-port", "0"],
                "--admin-port (env MESHLET_ADMIN_PORT)",
            ),
            (
                &["--skip-outbound-ports", "80,http"],
                "--skip-outbound-ports (env MESHLET_SKIP_OUTBOUND_PORTS): invalid value \"80,http\": \"http\" is not a port",
            ),
            (
                &["--skip-inbound-ports", "9000-8000"],
                "\"9000-8000\" is an empty range",
            ),
            (
                &["--skip-outbound-cidrs", "198.18.0.0/33"],
                "--skip-outbound-cidrs (env MESHLET_SKIP_OUTBOUND_CIDRS): invalid value \"198.18.0.0/33\": \"198.18.0.0/33\": the prefix length must be 0 to 32",
            ),
            (
                &["--proxy-uid=-1"],
                "--proxy-uid (env MESHLET_PROXY_UID): invalid value \"-1\"",
            ),
            (
                &["--ipv6", "maybe"],
                "--ipv6 (env MESHLET_IPV6): invalid value \"maybe\": expected true or false",
            ),
        ];
        for (argv, want) in cases {
            let e = args(argv).config().unwrap_err().to_string();
            assert!(e.starts_with(want) || e.contains(want), "{argv:?}: {e}");
        }
        let e = args(&["--outbound-port", "7143"]).config().unwrap_err();
        assert_eq!(e.flag, "outbound-port");
    }

    #[test]
    fn permission_errors_ask_for_net_admin() {
        let e = explain(
            "iptables-restore",
            "iptables-restore v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)\n",
        );
        assert!(
            e.starts_with("meshlet init needs the NET_ADMIN capability"),
            "{e}"
        );
        let e = explain("iptables-restore", "line 3 failed");
        assert_eq!(e, "iptables-restore failed: line 3 failed");
    }
}
