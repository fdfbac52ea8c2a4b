//! `meshlet init`: its flags and environment (`InitArgs::config`) and the iptables-restore
//! rules built from them (`init::rules`, both families).
//!
//! Input: text, one setting per line, as a flag or as its environment variable:
//! `--skip-inbound-ports=8080,9000-9100` or `MESHLET_SKIP_OUTBOUND_CIDRS=10.0.0.0/8`. Settings
//! not given keep their defaults.
//!
//! Invariants checked besides "no panic":
//! - every line of the rules is a comment, `*nat`, a chain declaration, an `-A` on one of our
//!   four chains, or `COMMIT` (last); nothing a value contains can start a line of its own;
//! - every skipped port and CIDR of the family is in the rules, and every `-d` network is one of
//!   the family with its host bits cleared;
//! - the validated config, written back as flags, validates to itself.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use meshlet::init::{
    Family, IN_REDIRECT_CHAIN, INBOUND_CHAIN, InitArgs, InitConfig, OUT_REDIRECT_CHAIN,
    OUTPUT_CHAIN, PortRange, rules,
};

const CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    OUT_REDIRECT_CHAIN,
];

fn defaults() -> InitArgs {
    InitArgs {
        dry_run: true,
        proxy_uid: "7102".into(),
        inbound_port: "7143".into(),
        outbound_port: "7140".into(),
        admin_port: "7190".into(),
        grpc_port: "7191".into(),
        skip_inbound_ports: String::new(),
        skip_outbound_ports: String::new(),
        skip_outbound_cidrs: String::new(),
        ipv6: "false".into(),
    }
}

fn set(args: &mut InitArgs, key: &str, value: String) {
    let field = match key.trim_start_matches("--") {
        "proxy-uid" | "MESHLET_PROXY_UID" => &mut args.proxy_uid,
        "inbound-port" | "MESHLET_INBOUND_PORT" => &mut args.inbound_port,
        "outbound-port" | "MESHLET_OUTBOUND_PORT" => &mut args.outbound_port,
        "admin-port" | "MESHLET_ADMIN_PORT" => &mut args.admin_port,
        "grpc-port" | "MESHLET_GRPC_PORT" => &mut args.grpc_port,
        "skip-inbound-ports" | "MESHLET_SKIP_INBOUND_PORTS" => &mut args.skip_inbound_ports,
        "skip-outbound-ports" | "MESHLET_SKIP_OUTBOUND_PORTS" => &mut args.skip_outbound_ports,
        "skip-outbound-cidrs" | "MESHLET_SKIP_OUTBOUND_CIDRS" => &mut args.skip_outbound_cidrs,
        "ipv6" | "MESHLET_IPV6" => &mut args.ipv6,
        _ => return,
    };
    *field = value;
}

/// The config as flags again (ranges as `a-b`, the flags' syntax).
fn as_args(c: &InitConfig) -> InitArgs {
    let ports = |v: &[PortRange]| {
        v.iter()
            .map(|r| format!("{}-{}", r.first, r.last))
            .collect::<Vec<_>>()
            .join(",")
    };
    InitArgs {
        dry_run: true,
        proxy_uid: c.proxy_uid.to_string(),
        inbound_port: c.inbound_port.to_string(),
        outbound_port: c.outbound_port.to_string(),
        admin_port: c.admin_port.to_string(),
        grpc_port: c.grpc_port.to_string(),
        skip_inbound_ports: ports(&c.skip_inbound_ports),
        skip_outbound_ports: ports(&c.skip_outbound_ports),
        skip_outbound_cidrs: c
            .skip_outbound_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(","),
        ipv6: c.ipv6.to_string(),
    }
}

fn check_rules(cfg: &InitConfig, family: Family) {
    let text = rules(cfg, family);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"COMMIT"), "{text}");
    assert!(text.ends_with("COMMIT\n"), "{text}");
    let v4 = family == Family::V4;
    for line in &lines {
        if line.starts_with('#') || *line == "*nat" || *line == "COMMIT" {
            continue;
        }
        if let Some(chain) = line.strip_prefix(':') {
            let name = chain.strip_suffix(" - [0:0]").expect("a chain declaration");
            assert!(CHAINS.contains(&name), "{line}");
            continue;
        }
        let rest = line
            .strip_prefix("-A ")
            .unwrap_or_else(|| panic!("not a rule: {line:?}\n{text}"));
        let chain = rest.split(' ').next().unwrap_or_default();
        assert!(CHAINS.contains(&chain), "{line}");
        let words: Vec<&str> = rest.split(' ').collect();
        for w in words.windows(2) {
            match w[0] {
                "--dport" | "--to-ports" => {
                    let ok = match w[1].split_once(':') {
                        Some((a, b)) => a
                            .parse::<u16>()
                            .ok()
                            .zip(b.parse::<u16>().ok())
                            .is_some_and(|(a, b)| 0 < a && a < b),
                        None => w[1].parse::<u16>().is_ok_and(|p| p > 0),
                    };
                    assert!(ok, "bad port {:?} in {line}", w[1]);
                }
                "-d" => {
                    let (a, p) = w[1].split_once('/').expect("a CIDR");
                    let addr: IpAddr = a.parse().expect("an address");
                    let prefix: u32 = p.parse().expect("a prefix length");
                    assert_eq!(addr.is_ipv4(), v4, "{line}");
                    let cleared = match addr {
                        IpAddr::V4(a) => {
                            prefix <= 32 && u32::from(a).checked_shl(prefix).unwrap_or(0) == 0
                        }
                        IpAddr::V6(a) => {
                            prefix <= 128 && u128::from(a).checked_shl(prefix).unwrap_or(0) == 0
                        }
                    };
                    assert!(cleared || w[1] == "::1/128", "host bits set: {line}");
                }
                _ => {}
            }
        }
    }
    let has = |needle: String| assert!(text.contains(&needle), "{needle:?} missing:\n{text}");
    for p in &cfg.skip_inbound_ports {
        has(format!("-A {INBOUND_CHAIN} -p tcp --dport {p} "));
    }
    for p in &cfg.skip_outbound_ports {
        has(format!("-A {OUTPUT_CHAIN} -p tcp --dport {p} "));
    }
    for c in cfg
        .skip_outbound_cidrs
        .iter()
        .filter(|c| c.addr.is_ipv4() == v4)
    {
        has(format!("-A {OUTPUT_CHAIN} -d {c} "));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut args = defaults();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            set(&mut args, k, v.to_string());
        }
    }
    let Ok(cfg) = args.config() else {
        return;
    };
    check_rules(&cfg, Family::V4);
    check_rules(&cfg, Family::V6);
    match as_args(&cfg).config() {
        Ok(again) => assert_eq!(again, cfg, "the config written back as flags differs"),
        Err(e) => panic!("the config written back as flags is refused: {e}\n{cfg:?}"),
    }
});
