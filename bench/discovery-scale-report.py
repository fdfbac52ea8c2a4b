#!/usr/bin/env python3
"""The Markdown report of bench/discovery-scale.sh, from its work dir.

    bench/discovery-scale-report.py WORKDIR

Reads WORKDIR/figures.txt (KEY=VALUE lines written by the script), the API server's /metrics
before and during meshlet's run, meshlet's /metrics, the oha JSON results and the JSON lists of
all Services and EndpointSlices.
"""
import glob
import json
import os
import re
import sys


def figures(path):
    f = {}
    for line in open(path):
        k, _, v = line.rstrip("\n").partition("=")
        f[k] = v
    return f


def watches(path):
    """In-flight WATCH requests (apiserver_longrunning_requests) by (resource, scope), and
    apiserver_registered_watchers by kind when the API server exports it."""
    lr, reg = {}, {}
    for line in open(path):
        m = re.match(r"(apiserver_longrunning_requests|apiserver_registered_watchers)\{(.*)\} (\S+)$", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        v = float(m.group(3))
        if m.group(1) == "apiserver_longrunning_requests":
            if labels.get("verb") == "WATCH":
                k = (labels.get("resource", ""), labels.get("scope", ""))
                lr[k] = lr.get(k, 0) + v
        else:
            k = labels.get("kind", labels.get("resource", ""))
            reg[k] = reg.get(k, 0) + v
    return lr, reg


def family(path, fam):
    """{labels: value} of one metric family in Prometheus text."""
    out = {}
    for line in open(path):
        line = line.strip()
        if line.startswith(fam + "{") or line.startswith(fam + " "):
            m = re.match(r"\S+?(\{.*\})? (\S+)$", line)
            if m:
                out[m.group(1) or ""] = float(m.group(2))
    return out


def sizes(path):
    raw = os.path.getsize(path)
    items = json.load(open(path))["items"]
    return raw, items


def compact(obj):
    return len(json.dumps(obj, separators=(",", ":")))


def human(b):
    return f"{b / 1048576:.2f} MiB" if b >= 1048576 else f"{b / 1024:.0f} KiB"


def mib(kb):
    return f"{int(kb) / 1024:.1f} MiB"


def main():
    work = sys.argv[1]
    f = figures(f"{work}/figures.txt")
    n_svc_bench = int(f["services"])

    # Watches: the difference meshlet makes on the API server.
    lr0, reg0 = watches(f"{work}/apiserver-metrics-before.txt")
    lr1, reg1 = watches(f"{work}/apiserver-metrics-during.txt")

    def delta(d0, d1, pred):
        return int(sum(v for k, v in d1.items() if pred(k)) - sum(v for k, v in d0.items() if pred(k)))

    w_all = delta(lr0, lr1, lambda k: True)
    w_svc = delta(lr0, lr1, lambda k: k[0] == "services")
    w_svc_cluster = delta(lr0, lr1, lambda k: k == ("services", "cluster"))
    w_eps = delta(lr0, lr1, lambda k: k[0] == "endpointslices")
    w_eps_ns = delta(lr0, lr1, lambda k: k == ("endpointslices", "namespace"))
    w_before = int(sum(lr0.values()))

    # The load.
    codes, errors, rps, p50s, p99s = {}, {}, 0.0, [], []
    for path in sorted(glob.glob(f"{work}/oha/*.json")):
        try:
            r = json.load(open(path))
        except (OSError, ValueError):
            errors[f"unreadable oha output {os.path.basename(path)}"] = 1
            continue
        for c, n in (r.get("statusCodeDistribution") or {}).items():
            codes[c] = codes.get(c, 0) + n
        for e, n in (r.get("errorDistribution") or {}).items():
            if "aborted due to deadline" in e:  # in flight when the run ended: not an error
                continue
            errors[e] = errors.get(e, 0) + n
        rps += r["summary"].get("requestsPerSec") or 0
        lp = r.get("latencyPercentiles") or {}
        if lp.get("p50") is not None:
            p50s.append(lp["p50"])
        if lp.get("p99") is not None:
            p99s.append(lp["p99"])
    n_req = sum(codes.values())
    n_non2xx = sum(n for c, n in codes.items() if not c.startswith("2"))
    n_err = n_non2xx + sum(errors.values())

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    # meshlet's own view.
    eps = family(f"{work}/meshlet-metrics-idle.txt", "meshlet_endpoints")
    eps_vals = sorted(int(v) for v in eps.values())
    disc_err = int(sum(family(f"{work}/meshlet-metrics-end.txt", "meshlet_discovery_errors_total").values()))
    by_status = {}
    for k, v in family(f"{work}/meshlet-metrics-end.txt", "meshlet_requests_total").items():
        m = re.search(r'status="(\d+)"', k)
        s = m.group(1) if m else "?"
        by_status[s] = by_status.get(s, 0) + int(v)

    # What watching everything would mean.
    eps_raw, eps_items = sizes(f"{work}/all-endpointslices.json")
    svc_raw, svc_items = sizes(f"{work}/all-services.json")
    n_endpoints = sum(len(i.get("endpoints") or []) for i in eps_items)
    live = set(f["live_names"].split())

    def slice_service(i):
        return f'{(i["metadata"].get("labels") or {}).get("kubernetes.io/service-name")}.{i["metadata"]["namespace"]}'

    live_bytes = sum(compact(i) for i in eps_items if slice_service(i) in live)
    eps_compact = sum(compact(i) for i in eps_items)
    svc_compact = sum(compact(i) for i in svc_items)

    hwm = int(f["hwm_end"])
    target_kb = int(f["target_rss_mib"]) * 1024
    live_n, per = int(f["live"]), int(f["per"])

    rows = [
        ("date", f["date"]),
        ("machine", f["machine"]),
        ("load average (1 / 5 / 15 min)", f"{f['load_start']} at the start, {f['load_end']} at the end (a shared machine)"),
        ("Kubernetes", f"{f['k8s_version']} (tests/e2e/control-plane.sh: etcd, kube-apiserver, kube-controller-manager)"),
        ("meshlet", f"git {f['git_rev']}, release build ({f['build_note']}), `workers: 1`, {live_n} `upstreams`"),
        ("objects in the cluster",
         f"{len(svc_items)} Services, {len(eps_items)} EndpointSlices, {n_endpoints} endpoints "
         f"({n_svc_bench} selectorless Services × 1 slice × {f['endpoints']} endpoints in {f['namespaces']} namespaces)"),
        (f"creating {n_svc_bench} Services + {n_svc_bench} EndpointSlices",
         f"{f['create_s']} s (`kubectl create -f`, {f['batch']} Services + their slices per call, {f['parallel']} calls at a time)"),
        ("meshlet start to `/ready` 200", f"{f['ready_s']} s (list of all Services, then the {live_n} upstreams' slices)"),
        (f"idle RSS ({f['settle_seconds']} s after ready) / peak RSS (VmHWM) then",
         f"**{mib(f['idle_rss'])}** / {mib(f['idle_hwm'])} (threads: {f['threads']})"),
        (f"idle CPU ({f['idle_seconds']} s)", f"**{f['idle_cpu']} %** of a core ({f['idle_ticks']} ticks of 1/{f['clk_tck']} s; "
         f"one tick is {100 / int(f['clk_tck']) / int(f['idle_seconds']):.2f} %)"),
        ("load", f"{live_n} services × {per} req/s = {live_n * per} req/s for {f['load_seconds']} s "
                 f"(one oha per upstream port, 2 keep-alive connections each); {n_req} answered, {rps:.0f} req/s"),
        (f"CPU at {live_n * per} req/s", f"**{f['load_cpu']} %** of a core"),
        (f"RSS at {live_n * per} req/s (mean / max of 1 s samples) / peak RSS (VmHWM) at the end",
         f"{mib(f['load_rss_avg'])} / {mib(f['rss_max'])} / **{mib(hwm)}**"),
        ("errors under load",
         f"**{n_err}** (non-2xx {n_non2xx}, client errors {sum(errors.values())}{': ' + str(errors) if errors else ''}); "
         f"meshlet_requests_total by status {by_status}"),
        (f"latency p50 / p99 (median of the {live_n} oha runs)",
         f"{median(p50s) * 1000:.2f} ms / {median(p99s) * 1000:.2f} ms" if p50s and p99s else "n/a"),
        ("API server watches held by one meshlet",
         f"**{w_all}**: services {w_svc} (cluster-wide {w_svc_cluster}), endpointslices {w_eps} (namespaced {w_eps_ns}); "
         f"the API server had {w_before} WATCH requests open before meshlet started; meshlet's TCP connections to it: {f['api_conns']} when idle, {f.get('api_conns_end', '?')} after the load"),
        ("endpoints meshlet knows", f"{len(eps)} services, {eps_vals[0] if eps_vals else 0}..{eps_vals[-1] if eps_vals else 0} endpoints each; discovery errors {disc_err}; lines in meshlet's log (level warn): {f.get('mesh_log_lines', '?')}"),
        ("all EndpointSlices (what a sidecar watching every slice would receive)",
         f"**{human(eps_raw)}** (`kubectl get endpointslices -A -o json`), {human(eps_compact)} compact JSON; "
         f"the {live_n} slices meshlet watches: {human(live_bytes)} compact"),
        ("all Services (watched cluster-wide, reduced on arrival)",
         f"{human(svc_raw)} (`kubectl get services -A -o json`), {human(svc_compact)} compact JSON"),
        (f"target: under {f['target_rss_mib']} MiB RSS", f"peak {mib(hwm)}: {'met' if hwm < target_kb else 'NOT met'}"),
    ]
    print("| measure | value |")
    print("| --- | --- |")
    for k, v in rows:
        print(f"| {k} | {v} |")
    detail = ", ".join(
        f"{r}/{s} {int(lr0.get((r, s), 0))}->{int(v)}"
        for (r, s), v in sorted(lr1.items())
        if r in ("services", "endpointslices")
    )
    reg = (
        "apiserver_registered_watchers: " + ", ".join(f"{k} {int(reg0.get(k, 0))}->{int(v)}" for k, v in sorted(reg1.items()))
        if reg1
        else "apiserver_registered_watchers: not exported"
    )
    print()
    print(f"Open WATCH requests (apiserver_longrunning_requests) by resource/scope, before -> during meshlet: {detail or 'none'}; {reg}.")


if __name__ == "__main__":
    main()
