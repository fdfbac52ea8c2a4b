#!/usr/bin/env python3
"""Aggregate the raw results of bench/run.sh into a Markdown report.

    report.py WORKDIR                                   print the Markdown report
    report.py --check-warmup WORKDIR PROTO [TARGET...]  check the warm-up runs (every target answers)

Inputs under WORKDIR/results/ (written by run.sh):
    env.txt                 key=value facts (date, nproc, cpu, kernel, versions, settings)
    cpu.tsv                 proto, target, label, kind (rate|sat), cpu ticks, wall seconds
    mem.tsv                 proto, target, idle_rss_kb|peak_rss_kb, kB
    loadavg.tsv             label, the load average (1/5/15 min) just before that run
    backend.tsv             label, requests the slow backend received during that run (BENCH_DEDUP)
    metrics/LABEL.{before,after}.prom   meshlet's /metrics around a run (BENCH_STACK, BENCH_DEDUP)
    LABEL.json              one load-generator run: oha JSON (http, stack, dedup) or ghz JSON (grpc)
Labels: PROTO-rROUND-qRATE-TARGET (fixed rate) and PROTO-sat-TARGET (unthrottled);
stack-rROUND-qRATE-(bare|full) (BENCH_STACK); dedup-rROUND-(on|off) (BENCH_DEDUP).
"""

import json
import math
import os
import re
import statistics
import sys

# "baseline" is there only when run.sh had MESHLET_BASELINE_BIN; absent targets are skipped.
TARGETS = ["direct", "meshlet", "baseline", "haproxy"]
# oha counts requests still in flight at the -z deadline as errors with this message.
OHA_DEADLINE = "aborted due to deadline"


def percentile(sorted_values, p):
    """Nearest-rank percentile (p in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(k, len(sorted_values)) - 1]


def parse_run(proto, path):
    """One load-generator run -> dict(ok, errors, rps, p50, p99, p999) with latencies in s."""
    with open(path) as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path}: empty output")
    d = json.loads(text)
    if proto != "grpc":  # oha (http, stack, dedup)
        s = d["summary"]
        lp = d.get("latencyPercentiles") or {}
        ok = sum(v for k, v in (d.get("statusCodeDistribution") or {}).items() if str(k).startswith("2"))
        non2xx = sum(v for k, v in (d.get("statusCodeDistribution") or {}).items() if not str(k).startswith("2"))
        errs = {k: v for k, v in (d.get("errorDistribution") or {}).items() if k != OHA_DEADLINE}
        return {
            "ok": ok,
            "errors": non2xx + sum(errs.values()),
            "error_kinds": errs,
            "rps": s.get("requestsPerSec") or 0.0,
            "p50": lp.get("p50"),
            "p99": lp.get("p99"),
            "p999": lp.get("p99.9"),
        }
    # ghz: percentiles from the per-request details (its own summary stops at p99)
    details = d.get("details") or []
    lat = sorted(x["latency"] / 1e9 for x in details if not x.get("error") and x.get("status", "OK") == "OK")
    errors = sum(1 for x in details if x.get("error") or x.get("status", "OK") != "OK")
    total_s = (d.get("total") or 0) / 1e9
    return {
        "ok": len(lat),
        "errors": errors,
        "error_kinds": d.get("errorDistribution") or {},
        "rps": (len(lat) + errors) / total_s if total_s > 0 else float(d.get("rps") or 0.0),
        "p50": percentile(lat, 50) if lat else None,
        "p99": percentile(lat, 99) if lat else None,
        "p999": percentile(lat, 99.9) if lat else None,
    }


def read_env(res):
    env = {}
    with open(os.path.join(res, "env.txt")) as f:
        for line in f:
            if "=" in line:
                k, v = line.rstrip("\n").split("=", 1)
                env[k] = v
    return env


def read_tsv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def prom_sum(path, family):
    """Sum of every sample of one metric family in a Prometheus text file (None: no file)."""
    if not os.path.exists(path):
        return None
    total = 0.0
    with open(path) as f:
        for line in f:
            if line.startswith(family + "{") or line.startswith(family + " "):
                try:
                    total += float(line.rsplit(None, 1)[1])
                except (IndexError, ValueError):
                    pass
    return total


def prom_delta(res, label, family):
    """How much a family's sum grew during the run LABEL (None: not scraped)."""
    a = prom_sum(os.path.join(res, "metrics", f"{label}.before.prom"), family)
    b = prom_sum(os.path.join(res, "metrics", f"{label}.after.prom"), family)
    if a is None or b is None:
        return None
    return int(round(b - a))


def loadavg_during(res):
    """(min, max) of the 1-minute load average sampled before each measured run."""
    vals = []
    for row in read_tsv(os.path.join(res, "loadavg.tsv")):
        if len(row) >= 2 and not row[0].startswith("warmup"):
            try:
                vals.append(float(row[1].split()[0]))
            except (IndexError, ValueError):
                pass
    return (min(vals), max(vals)) if vals else None


def med(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def ms(v, signed=False):
    if v is None:
        return "n/a"
    return f"{v * 1000:+.3f}" if signed else f"{v * 1000:.3f}"


def check_warmup(work, proto, targets=None):
    bad = False
    for t in targets or TARGETS:
        path = os.path.join(work, f"warmup-{proto}-{t}.out")
        try:
            r = parse_run(proto, path)
        except Exception as e:  # noqa: BLE001 - report any parse failure
            print(f"[bench] warm-up {proto} {t}: cannot read {path}: {e}", file=sys.stderr)
            bad = True
            continue
        total = r["ok"] + r["errors"]
        print(f"[bench] warm-up {proto} {t}: {r['ok']} ok, {r['errors']} errors, p50 {ms(r['p50'])} ms",
              file=sys.stderr)
        if r["ok"] == 0 or r["errors"] > 0.01 * max(total, 1):
            print(f"[bench]   errors: {json.dumps(r['error_kinds'])[:500]}", file=sys.stderr)
            bad = True
    return 1 if bad else 0


def report(work):
    res = os.path.join(work, "results")
    env = read_env(res)
    clk = float(env.get("clk_tck", "100"))
    cpu_rows = read_tsv(os.path.join(res, "cpu.tsv"))
    mem_rows = read_tsv(os.path.join(res, "mem.tsv"))
    cpu = {row[2]: (int(row[4]), float(row[5])) for row in cpu_rows}
    mem = {(row[0], row[1], row[2]): int(row[3]) for row in mem_rows if row[3].isdigit()}

    runs = {}  # (proto, round, rate, target) -> parsed
    sat = {}  # (proto, target) -> parsed
    problems = []
    for name in sorted(os.listdir(res)):
        m = re.fullmatch(r"(http|grpc)-r(\d+)-q(\d+)-(direct|meshlet|baseline|haproxy)\.json", name)
        s = re.fullmatch(r"(http|grpc)-sat-(direct|meshlet|baseline|haproxy)\.json", name)
        if not (m or s):
            continue
        proto = (m or s).group(1)
        try:
            r = parse_run(proto, os.path.join(res, name))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: {e}")
            continue
        r["label"] = name[:-5]
        if m:
            runs[(proto, int(m.group(2)), int(m.group(3)), m.group(4))] = r
        else:
            sat[(proto, s.group(2))] = r

    out = []
    w = out.append
    during = loadavg_during(res)
    during_s = f"; 1-min load average {during[0]:.2f}–{during[1]:.2f} during the runs (sampled before each)" \
        if during else ""
    w(f"### meshlet benchmark, {env.get('date', '?')}")
    w("")
    w(f"- Machine: {env.get('nproc', '?')} CPUs ({env.get('cpu', '?')}), Linux {env.get('kernel', '?')}; "
      f"load average (1/5/15 min) {env.get('loadavg_start', '?')} at start, {env.get('loadavg_end', '?')} at end"
      f"{during_s}.")
    if runs or sat:
        order = ", ".join(t for t in TARGETS if any(k[-1] == t for k in list(runs) + list(sat)))
        w(f"- Method: {env.get('rounds', '?')} alternating rounds ({order}) of "
          f"{env.get('seconds', '?')} s per fixed rate, {env.get('conns', '?')} connections; medians over rounds; "
          f"\"added\" = target minus direct in the same round, then the median. Load generator on CPU 0, "
          f"backends and proxies on CPU 1 (taskset); meshlet `workers: 1`, HAProxy `nbthread 1`. "
          f"Saturation: one unthrottled {env.get('sat_seconds', '?')} s run per target.")
    vers = [f"meshlet {env.get('meshlet', '?')}"]
    if env.get("meshlet_prebuilt"):
        vers[0] += f" (BENCH_NO_BUILD: {env['meshlet_prebuilt']}; the git revision is the work tree's, not the binary's)"
    if env.get("baseline_prebuilt"):
        vers.append(f"baseline meshlet {env.get('baseline', '?')} ({env['baseline_prebuilt']})")
    if runs or sat:
        vers.append(f"HAProxy {env.get('haproxy', '?')}")
    if runs or sat or any(n.startswith("stack-r") for n in os.listdir(res)):
        vers.append(f"nginx {env.get('nginx', '?')}")
    if any(n.startswith("dedup-r") for n in os.listdir(res)):
        vers.append(f"slow-backend {env.get('go', 'Go')}")
    if "oha" in env:
        vers.append(f"oha {env['oha']}")
    if "ghz" in env:
        vers.append(f"ghz {env['ghz']}, grpc-go {env.get('grpc_go', '?')}, {env.get('go', '')}")
    w(f"- Versions: {', '.join(vers)}.")
    w("")

    titles = {
        "http": "HTTP/1.1: oha (`--latency-correction`) → nginx `return 200 \"ok\"`",
        "grpc": "gRPC unary over h2c: ghz → grpc-go `grpc.health.v1.Health/Check` "
                "(ghz has no latency correction)",
    }
    for proto in ("http", "grpc"):
        keys = [k for k in runs if k[0] == proto]
        if not keys:
            continue
        rates = sorted({k[2] for k in keys})
        rounds = sorted({k[1] for k in keys})
        w(f"#### {titles[proto]}")
        w("")
        w("| rate (req/s) | target | achieved req/s | p50 ms | p99 ms | p99.9 ms "
          "| added p50 ms | added p99 ms | added p99.9 ms | CPU per 1k req/s (% of a core) | errors "
          "| p99 per round ms |")
        w("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for rate in rates:
            for t in TARGETS:
                rs = [runs.get((proto, r, rate, t)) for r in rounds]
                rs = [x for x in rs if x]
                if not rs:
                    continue
                added = {}
                for q in ("p50", "p99", "p999"):
                    diffs = []
                    for r in rounds:
                        a, b = runs.get((proto, r, rate, t)), runs.get((proto, r, rate, "direct"))
                        if a and b and a[q] is not None and b[q] is not None:
                            diffs.append(a[q] - b[q])
                    added[q] = med(diffs)
                cpus = []
                for x in rs:
                    ticks, _wall = cpu.get(x["label"], (0, 0.0))
                    n = x["ok"] + x["errors"]
                    if t != "direct" and n > 0:
                        cpus.append(100.0 * 1000.0 * (ticks / clk) / n)
                cpu_s = f"{med(cpus):.1f}" if cpus else "—"
                errors = sum(x["errors"] for x in rs)
                if t == "direct":
                    add_cells = "— | — | —"
                else:
                    add_cells = " | ".join(ms(added[q], signed=True) for q in ("p50", "p99", "p999"))
                w(f"| {rate:,} | {t} | {med([x['rps'] for x in rs]):,.0f} | {ms(med([x['p50'] for x in rs]))} "
                  f"| {ms(med([x['p99'] for x in rs]))} | {ms(med([x['p999'] for x in rs]))} | {add_cells} "
                  f"| {cpu_s} | {errors} | {' / '.join(ms(x['p99']) for x in rs)} |")
        w("")

    if sat or any(k[0] in ("http", "grpc") for k in mem):
        w("#### Saturation and memory")
        w("")
        w("| protocol | target | max req/s (unthrottled, 16 conns) | proxy CPU at max (% of a core) "
          "| idle RSS MiB | peak RSS MiB (VmHWM) |")
        w("|---|---|---:|---:|---:|---:|")
        for proto in ("http", "grpc"):
            for t in TARGETS:
                x = sat.get((proto, t))
                if not x and (proto, t, "idle_rss_kb") not in mem:
                    continue
                rps = f"{x['rps']:,.0f}" if x else "n/a"
                if x and x["errors"]:
                    rps += f" ({x['errors']} errors)"
                c = "—"
                if x and t != "direct" and x["label"] in cpu:
                    ticks, wall = cpu[x["label"]]
                    c = f"{100.0 * (ticks / clk) / wall:.0f}" if wall > 0 else "n/a"
                idle = mem.get((proto, t, "idle_rss_kb"))
                peak = mem.get((proto, t, "peak_rss_kb"))
                idle_s = f"{idle / 1024:.1f}" if idle is not None else "—"
                peak_s = f"{peak / 1024:.1f}" if peak is not None else "—"
                w(f"| {'HTTP/1.1' if proto == 'http' else 'gRPC h2c'} | {t} | {rps} | {c} | {idle_s} | {peak_s} |")
        w("")
        w("Direct = the load generator against one backend, no proxy. The max req/s is bounded by the load "
          "generator and the backends sharing this machine, so compare the proxies with each other, "
          "not with a real deployment.")
        w("")

    stack_report(w, res, env, cpu, clk, mem, problems)
    dedup_report(w, res, env, cpu, clk, problems)

    if problems:
        w("Problems reading results:")
        for p in problems:
            w(f"- {p}")
        w("")
    print("\n".join(out))
    return 0


def stack_report(w, res, env, cpu, clk, mem, problems):
    """BENCH_STACK: meshlet bare vs meshlet with the full resilience stack."""
    runs = {}  # (round, rate, target) -> parsed
    for name in sorted(os.listdir(res)):
        m = re.fullmatch(r"stack-r(\d+)-q(\d+)-(bare|full)\.json", name)
        if not m:
            continue
        try:
            r = parse_run("stack", os.path.join(res, name))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: {e}")
            continue
        r["label"] = name[:-5]
        for fam, key in (("meshlet_dedup_coalesced_total", "coalesced"), ("meshlet_retries_total", "retries"),
                         ("meshlet_requests_total", "answered")):
            r[key] = prom_delta(res, r["label"], fam)
        ticks, _wall = cpu.get(r["label"], (0, 0.0))
        n = r["ok"] + r["errors"]
        r["cpu1k"] = 100.0 * 1000.0 * (ticks / clk) / n if n > 0 else None
        runs[(int(m.group(1)), int(m.group(2)), m.group(3))] = r
    if not runs:
        return
    rates = sorted({k[1] for k in runs})
    rounds = sorted({k[0] for k in runs})
    w("#### Resilience stack: meshlet bare vs full (HTTP/1.1, oha → meshlet → nginx)")
    w("")
    w(f"- bare: `defaults: {env.get('stack_bare', '?')}`; full: `defaults: {env.get('stack_full', '?')}` "
      "(the other keys at their defaults in both: no request timeout, retry budget 20 %, ...).")
    w(f"- {len(rounds)} rounds of {env.get('seconds', '?')} s per rate, bare and full alternating (the order "
      f"flips every round), {env.get('conns', '?')} connections, oha `-q RATE --latency-correction`; "
      + (f"every request has its own path (`--rand-regex-url '/{env['stack_path']}'`), so dedup keys, looks up "
         "and registers every request but never coalesces two (see the coalesced column). "
         if env.get("stack_path") else
         "every request is `GET /`, so with dedup on, requests in flight together are coalesced "
         "(see the coalesced column). ")
      + "Medians over rounds; \"added\" = full minus bare in the same round, then the median.")
    w("")
    w("| rate (req/s) | meshlet | achieved req/s | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms "
      "| added p99.9 ms | CPU per 1k req/s (% of a core) | added CPU per 1k req/s | coalesced (per round) "
      "| retries | errors | p99 per round ms |")
    w("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|")
    for rate in rates:
        for t in ("bare", "full"):
            rs = [runs.get((r, rate, t)) for r in rounds]
            rs = [x for x in rs if x]
            if not rs:
                continue
            if t == "full":
                added = {}
                for q in ("p50", "p99", "p999", "cpu1k"):
                    diffs = []
                    for r in rounds:
                        a, b = runs.get((r, rate, "full")), runs.get((r, rate, "bare"))
                        if a and b and a[q] is not None and b[q] is not None:
                            diffs.append(a[q] - b[q])
                    added[q] = med(diffs)
                add_cells = " | ".join(ms(added[q], signed=True) for q in ("p50", "p99", "p999"))
                add_cpu = f"{added['cpu1k']:+.1f}" if added["cpu1k"] is not None else "n/a"
            else:
                add_cells, add_cpu = "— | — | —", "—"
            c = med([x["cpu1k"] for x in rs])
            coalesced = " / ".join("n/a" if x["coalesced"] is None else str(x["coalesced"]) for x in rs)
            retries = [x["retries"] for x in rs if x["retries"] is not None]
            w(f"| {rate:,} | {t} | {med([x['rps'] for x in rs]):,.0f} | {ms(med([x['p50'] for x in rs]))} "
              f"| {ms(med([x['p99'] for x in rs]))} | {ms(med([x['p999'] for x in rs]))} | {add_cells} "
              f"| {'n/a' if c is None else f'{c:.1f}'} | {add_cpu} | {coalesced} "
              f"| {sum(retries) if retries else 'n/a'} | {sum(x['errors'] for x in rs)} "
              f"| {' / '.join(ms(x['p99']) for x in rs)} |")
    w("")
    rss = []
    for t in ("bare", "full"):
        idle, peak = mem.get(("stack", t, "idle_rss_kb")), mem.get(("stack", t, "peak_rss_kb"))
        if idle is not None and peak is not None:
            rss.append(f"{t} {idle / 1024:.1f} / {peak / 1024:.1f} MiB")
    if rss:
        w(f"Idle / peak RSS: {'; '.join(rss)}. Coalesced = `meshlet_dedup_coalesced_total` read from `/metrics` "
          "before and after each run (the requests answered with another request's upstream answer); "
          "retries = `meshlet_retries_total`, summed over the rounds.")
        w("")


def dedup_report(w, res, env, cpu, clk, problems):
    """BENCH_DEDUP: bursts of identical GETs, dedup on vs off."""
    backend = {row[0]: int(row[1]) for row in read_tsv(os.path.join(res, "backend.tsv"))
               if len(row) >= 2 and row[1].lstrip("-").isdigit()}
    runs = {}  # (round, target) -> parsed
    for name in sorted(os.listdir(res)):
        m = re.fullmatch(r"dedup-r(\d+)-(on|off)\.json", name)
        if not m:
            continue
        try:
            r = parse_run("dedup", os.path.join(res, name))
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: {e}")
            continue
        label = name[:-5]
        r["label"] = label
        r["client"] = r["ok"] + r["errors"]
        r["upstream"] = backend.get(label)
        for fam, key in (("meshlet_requests_total", "answered"), ("meshlet_dedup_saved_total", "saved"),
                         ("meshlet_dedup_coalesced_total", "coalesced"), ("meshlet_retries_total", "retries")):
            r[key] = prom_delta(res, label, fam)
        ticks, wall = cpu.get(label, (0, 0.0))
        r["cpu"] = 100.0 * (ticks / clk) / wall if wall > 0 else None
        runs[(int(m.group(1)), m.group(2))] = r
    if not runs:
        return
    rounds = sorted({k[0] for k in runs})
    size, every, delay = env.get("burst_size", "?"), env.get("burst_interval_ms", "?"), env.get("backend_delay_ms", "?")
    w(f"#### Dedup under bursts: {size} identical concurrent GETs every {every} ms, backend {delay} ms per request")
    w("")
    w(f"- oha `-c {size} --burst-rate {size} --burst-delay {every}ms -z {env.get('seconds', '?')}s -w` "
      f"→ meshlet (`defaults: {{dedup: true}}` or `{{dedup: false}}`, other keys at their defaults) → "
      f"`bench/slow-backend` (Go, two ports, answers 200 \"ok\" after {delay} ms). {len(rounds)} rounds, dedup on "
      "and off alternating (the order flips every round). Client requests = oha's requests (`-w`: every request "
      "sent is answered); upstream requests = counted at the backend; meshlet's own view: "
      "`meshlet_requests_total` − `meshlet_dedup_saved_total` + `meshlet_retries_total`. "
      "Counts are totals over the rounds; latencies are medians over rounds (oha has no latency correction "
      "in burst mode: each request is timed from its actual send).")
    w("")
    w("| meshlet | client requests | upstream requests (backend) | saved | share saved | meshlet: upstream = "
      "answered − saved + retries | coalesced | p50 ms | p99 ms | p99.9 ms | meshlet CPU (% of a core) | errors "
      "| share saved per round |")
    w("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for t in ("on", "off"):
        rs = [runs.get((r, t)) for r in rounds]
        rs = [x for x in rs if x]
        if not rs:
            continue
        client = sum(x["client"] for x in rs)
        ups = [x["upstream"] for x in rs]
        up = sum(ups) if all(u is not None for u in ups) else None
        saved = client - up if up is not None else None
        share = f"{100.0 * saved / client:.1f} %" if saved is not None and client else "n/a"

        def total(key):
            v = [x[key] for x in rs]
            return sum(v) if all(u is not None for u in v) else None

        ans, sv, ret, coal = total("answered"), total("saved"), total("retries"), total("coalesced")
        mview = (f"{ans - sv + ret:,} = {ans:,} − {sv:,} + {ret:,}" if None not in (ans, sv, ret) else "n/a")
        per_round = " / ".join(
            f"{100.0 * (x['client'] - x['upstream']) / x['client']:.1f} %" if x["upstream"] is not None and x["client"]
            else "n/a" for x in rs)
        c = med([x["cpu"] for x in rs])
        w(f"| dedup {t} | {client:,} | {'n/a' if up is None else f'{up:,}'} "
          f"| {'n/a' if saved is None else f'{saved:,}'} | {share} | {mview} | {'n/a' if coal is None else f'{coal:,}'} "
          f"| {ms(med([x['p50'] for x in rs]))} | {ms(med([x['p99'] for x in rs]))} | {ms(med([x['p999'] for x in rs]))} "
          f"| {'n/a' if c is None else f'{c:.1f}'} | {sum(x['errors'] for x in rs)} | {per_round} |")
    w("")


def main(argv):
    if len(argv) >= 4 and argv[1] == "--check-warmup":
        return check_warmup(argv[2], argv[3], argv[4:])
    if len(argv) == 2:
        return report(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
