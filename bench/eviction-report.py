#!/usr/bin/env python3
"""The Markdown report of bench/eviction.sh, from its work dir.

    bench/eviction-report.py WORKDIR

Reads WORKDIR/figures.txt and stage-LABEL.txt (KEY=VALUE lines written by the script), the API
server's /metrics before meshlet started and at each reading, meshlet's /metrics at each
reading, samples.txt (RSS and the destinations gauge every second), touch.json and live.json
(the client's results). The WATCH counting is discovery-scale-report.py's.
"""
import importlib.util
import json
import os
import re
import sys

sys.dont_write_bytecode = True  # no __pycache__ in bench/
_spec = importlib.util.spec_from_file_location(
    "discovery_scale_report", os.path.join(os.path.dirname(os.path.abspath(__file__)), "discovery-scale-report.py"))
dsr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dsr)
figures, watches, family = dsr.figures, dsr.watches, dsr.family

NAMES = {
    "ready": "ready (no destination yet)",
    "start": "start: the live services in use",
    "peak": "after touching every service (peak)",
    "evicted": "after eviction",
    "after": "later",
}


def mib(kb):
    return f"{int(kb) / 1024:.1f}"


def series(path):
    """Sample lines (not comments) and bytes of a /metrics text; the lines naming a bench
    service (`svc-NNNNN.`), which are per-destination series."""
    try:
        text = open(path).read()
    except OSError:
        return None, None, None
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    per_svc = sum(1 for l in lines if re.search(r"svc-\d{5}\.", l))
    return len(lines), len(text), per_svc


def per_service_families(path):
    """{family: lines} of the sample lines naming a bench service."""
    out = {}
    try:
        for l in open(path):
            if l.startswith("#") or not re.search(r"svc-\d{5}\.", l):
                continue
            fam = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", l).group(0)
            for suffix in ("_bucket", "_sum", "_count"):
                if fam.endswith(suffix):
                    fam = fam[: -len(suffix)]
            out[fam] = out.get(fam, 0) + 1
    except OSError:
        pass
    return out


def main():
    work = sys.argv[1]
    f = figures(f"{work}/figures.txt")
    stages = f["stages"].split()
    live = int(f["live"])
    lr0, _ = watches(f"{work}/apiserver-metrics-before.txt")

    def w(d, pred):
        return int(sum(v for k, v in d.items() if pred(k)) - sum(v for k, v in lr0.items() if pred(k)))

    rows = []
    for s in stages:
        st = figures(f"{work}/stage-{s}.txt")
        lr, _ = watches(f"{work}/apiserver-metrics-{s}.txt")
        m = f"{work}/meshlet-metrics-{s}.txt"
        dest = family(m, "meshlet_destinations")
        n, size, per_svc = series(m)
        rows.append({
            "stage": s,
            "t": st["t"],
            "dest": int(next(iter(dest.values()))) if dest else "?",
            "w_all": w(lr, lambda k: True),
            "w_svc": w(lr, lambda k: k[0] == "services"),
            "w_eps": w(lr, lambda k: k[0] == "endpointslices"),
            "conns": st["api_conns"],
            "rss": st["rss"],
            "hwm": st["hwm"],
            "fds": st["fds"],
            "series": n,
            "per_svc": per_svc,
            "size": size,
            "load": st["load"],
        })

    # Samples every second: the highest RSS and gauge.
    samples = []
    for line in open(f"{work}/samples.txt").read().splitlines()[1:]:
        p = line.split()
        if len(p) == 4 and p[1].isdigit():
            samples.append((float(p[0]), int(p[1]), int(p[2]) if p[2].isdigit() else 0,
                            int(p[3]) if p[3].isdigit() else None))
    rss_max = max((s[1] for s in samples), default=0)
    conns_max = max((s[2] for s in samples), default=0)

    touch = json.load(open(f"{work}/touch.json")) if os.path.exists(f"{work}/touch.json") else {}
    livej = json.load(open(f"{work}/live.json")) if os.path.exists(f"{work}/live.json") else {}
    live_out = {}
    for by in (livej.get("by_target") or {}).values():
        for o, c in by.items():
            live_out[o] = live_out.get(o, 0) + c
    live_n = sum(live_out.values())
    live_bad = sum(c for o, c in live_out.items() if o != "200")

    print(f"{f['date']}; {f['machine']}; Kubernetes {f['k8s_version']}; meshlet git {f['git_rev']} "
          f"({f['build_note']}), `workers: 1`, `discovery.evict_after: {f['evict_after']}s` (eviction pass every "
          f"{f['evict_period']} s), a transparent outbound listener and no `upstreams`. Load average "
          f"{f['load_start']} at the start, {f['load_end']} at the end.")
    print()
    print(f"Cluster: {f['n_svc']} Services, {f['n_slices']} EndpointSlices of {f['endpoints']} endpoints in "
          f"{f['namespaces']} namespaces (created in {f['create_s']} s); {live} of them backed by an nginx. "
          f"meshlet ready in {f['ready_s']} s.")
    print()
    print("| reading | s after ready | `meshlet_destinations` | API server WATCHes of this meshlet (services + endpointslices) "
          "| meshlet's TCP connections to the API server | RSS MiB | open fds | /metrics samples (of them per service) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {NAMES.get(r['stage'], r['stage'])} | {r['t']} | {r['dest']} | {r['w_all']} ({r['w_svc']} + {r['w_eps']}) "
              f"| {r['conns']} | {mib(r['rss'])} | {r['fds']} | {r['series']} ({r['per_svc']}) |")
    print()
    outcomes = ", ".join(f"{o}: {c}" for o, c in sorted((touch.get("outcomes") or {}).items(), key=lambda x: -x[1]))
    print(f"- Touch: {touch.get('sent', '?')} of {touch.get('targets', '?')} services, one request each on a new connection "
          f"({touch.get('concurrency', '?')} at a time) in {f['touch_s']} s; connected to meshlet {touch.get('connected', '?')}, "
          f"not sent {touch.get('not_sent', '?')}; answers {outcomes or '?'}.")
    print(f"- Highest of the samples (every second): RSS {mib(rss_max)} MiB, meshlet's connections to the API server "
          f"{conns_max}; VmHWM at the end {mib(rows[-1]['hwm']) if rows else '?'} MiB.")
    if f.get("evicted_s"):
        print(f"- Eviction: the gauge was back to {live} or fewer {f['evicted_s']} s after the touch ended "
              f"(read every {f['sample_seconds']} s; due evict_after = {f['evict_after']} s after each service's "
              f"last use, done by the next pass, every {f['evict_period']} s).")
    else:
        print(f"- Eviction: the gauge was NOT back to {live} within {f['evict_deadline']} s of the last touch.")
    if float(f["touch_s"]) >= float(f["evict_after"]):
        print(f"- NOTE: the touch took {f['touch_s']} s, not less than evict_after ({f['evict_after']} s): the first "
              f"services touched could be evicted before the last were, so the peak may hold fewer than all of them.")
    print(f"- Live services: {live_n} requests over {livej.get('seconds', 0):.0f} s (every {livej.get('interval', '?')} s each), "
          f"{live_bad} not answered 200 ({', '.join(f'{o}: {c}' for o, c in live_out.items())}); slowest {livej.get('slowest_s', 0) * 1000:.0f} ms.")
    fams = per_service_families(f"{work}/meshlet-metrics-{stages[-1]}.txt") if stages else {}
    if fams:
        print(f"- Per-service /metrics samples left at the last reading, by family: "
              + ", ".join(f"`{k}` {v}" for k, v in sorted(fams.items(), key=lambda x: -x[1])) + ".")
    disc_err = int(sum(family(f"{work}/meshlet-metrics-{stages[-1]}.txt", "meshlet_discovery_errors_total").values())) if stages else 0
    print(f"- meshlet discovery errors {disc_err}; lines in meshlet's log (level warn): {f['mesh_log_lines']}.")


if __name__ == "__main__":
    main()
