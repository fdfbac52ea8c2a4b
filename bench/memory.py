#!/usr/bin/env python3
"""meshlet's memory benchmark. Three parts, each a subcommand:

  conns  per-connection memory of idle connections (silent, HTTP/1.1 keep-alive, HTTP/2), and
         the RSS after they close (sampled every --step s for --after s)
  oom    the proxy in a memory cgroup (--limit, default 64M) while --n connections are
         attempted: OOM kills (must stay 0), refusals, and whether it still answers
  soak   a paced load (--rate req/s, HTTP/1.1 and HTTP/2) for --seconds with endpoint churn
         (one of the backends is stopped and started again in turn), RSS every --sample s

Everything listens on 127.0.0.1. The proxy (`target/release/meshlet`) and the backends
(`examples/e2e-app`, one process per endpoint) are built with `cargo build --release` unless
--no-build; both are copied into the work dir first. Every process started here is ended by
its PID. The report (Markdown) goes to stdout, raw samples to WORK/*.json. See bench/README.md.
"""

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in the work tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memclient  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NOFILE = 250_000
KIB = 1024


def log(msg):
    print(f"[memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile(n=NOFILE):
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (ValueError, OSError):
        memclient.raise_nofile()


# ----------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Every process started here, ended by PID (TERM, then KILL after 5 s)."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, work, env=None, cgroup_procs=None):
        out = open(os.path.join(work, f"{name}.log"), "ab")

        def pre():
            os.setpgid(0, 0)
            raise_nofile()
            if cgroup_procs:
                with open(cgroup_procs, "w") as f:
                    f.write(str(os.getpid()))

        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, preexec_fn=pre)
        self.procs.append(p)
        return p

    def stop(self, p, grace=5.0):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def http_get(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return None, ""


def wait_until(what, f, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f():
            return
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def metric(text, prefix):
    total = None
    for line in text.splitlines():
        if line.startswith(prefix):
            total = (total or 0) + float(line.rsplit(" ", 1)[1])
    return total


# ----------------------------------------------------------------------------------------------
# Memory readings


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def rollup_kib(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return out


def reading(pid):
    r = rollup_kib(pid)
    return {
        "rss_kib": status_kib(pid, "VmRSS"),
        "hwm_kib": status_kib(pid, "VmHWM"),
        "anon_kib": r.get("Anonymous"),
        "private_dirty_kib": r.get("Private_Dirty"),
        "threads": status_kib(pid, "Threads"),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def mib(kib):
    return f"{kib / 1024:.1f}"


# ----------------------------------------------------------------------------------------------
# Setup


def build(args, work):
    if not args.no_build:
        log("cargo build --release --bin meshlet --example e2e-app")
        env = dict(os.environ)
        env.setdefault("CARGO_BUILD_JOBS", "1")
        subprocess.run(["cargo", "build", "--release", "--bin", "meshlet", "--example", "e2e-app"],
                       cwd=REPO, check=True, env=env)
    meshlet = args.bin or os.path.join(REPO, "target/release/meshlet")
    app = args.app or os.path.join(REPO, "target/release/examples/e2e-app")
    for src in (meshlet, app):
        if not os.path.exists(src):
            raise SystemExit(f"{src} does not exist: build it (cargo build --release --bin meshlet "
                             f"--example e2e-app) or drop --no-build")
    shutil.copy(meshlet, os.path.join(work, "meshlet"))
    shutil.copy(app, os.path.join(work, "e2e-app"))
    return os.path.join(work, "meshlet"), os.path.join(work, "e2e-app")


def start_backend(procs, app, work, port, name):
    env = dict(os.environ, LISTEN=f"127.0.0.1:{port}", POD_NAME=name, SHUTDOWN_DELAY_MS="0")
    p = procs.start(name, [app], work, env=env)
    wait_until(f"backend {name} on :{port}",
               lambda: http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200)
    return p


def proxy_config(args, endpoints, extra="", defaults=""):
    eps = ", ".join(f'"127.0.0.1:{p}"' for p in endpoints)
    return (f"admin:\n  listen: 127.0.0.1:{args.port_base}\n"
            f"upstreams:\n  - listen: 127.0.0.1:{args.port_base + 1}\n    service: web.bench\n"
            f"{extra}"
            f"discovery:\n  static:\n    - service: web.bench\n      endpoints: [{eps}]\n"
            f"{defaults}"
            f"workers: {args.workers}\nlog:\n  level: {args.log_level}\nshutdown_grace: 2s\n")


# The idle-connection parts measure the proxy, not the backend: a backend slow to accept
# thousands of opaque TCP connections at once (silent clients, after the detection timeout)
# must not eject it and close them.
PATIENT = "defaults:\n  breaker: \"off\"\n  connect_timeout: 20s\n"


def start_proxy(procs, meshlet, work, config, name="meshlet", cgroup_procs=None, env=None):
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(config)
    p = procs.start(name, [meshlet, "proxy", "--config", path], work, env=env,
                    cgroup_procs=cgroup_procs)
    return p


def wait_ready(args, p):
    def ready():
        if p.poll() is not None:
            raise SystemExit(f"meshlet exited ({p.returncode}) before it was ready")
        return http_get(f"http://127.0.0.1:{args.port_base}/ready")[0] == 200
    wait_until("meshlet /ready", ready)


def admin_metrics(args):
    return http_get(f"http://127.0.0.1:{args.port_base}/metrics")[1]


# ----------------------------------------------------------------------------------------------
# conns: per-connection memory and the RSS after a burst


async def conns_one(args, kind, meshlet, app, work, procs):
    backend = start_backend(procs, app, work, args.port_base + 10, f"backend-{kind}")
    p = start_proxy(procs, meshlet, work,
                    proxy_config(args, [args.port_base + 10], defaults=PATIENT,
                                 extra=args.extra.replace("\\n", "\n")),
                    name=f"meshlet-{kind}")
    wait_ready(args, p)
    host, port = "127.0.0.1", args.port_base + 1
    # Warm-up: a few connections of this kind opened and closed, so that what is allocated once
    # (the destination, its endpoint pool, the upstream connection, metric series) is counted in
    # the baseline, not per connection.
    warm = memclient.Holder()
    await warm.open(host, port, kind, 20, 20, "web.bench")
    await asyncio.sleep(1.0)
    await warm.close()
    await asyncio.sleep(2.0)
    before = reading(p.pid)
    log(f"{kind}: idle RSS {mib(before['rss_kib'])} MiB; opening {args.n}")
    holder = memclient.Holder()
    t0 = time.monotonic()
    await holder.open(host, port, kind, args.n, args.concurrency, "web.bench")
    opened = time.monotonic() - t0
    # The detection timeout (300 ms) must pass for silent ones; let everything settle.
    await asyncio.sleep(args.settle)
    held = reading(p.pid)
    gauge = metric(admin_metrics(args), 'meshlet_open_connections{direction="outbound"}')
    n = holder.open_count()
    log(f"{kind}: {n} held ({holder.failed} failed {holder.errors}) in {opened:.1f} s; "
        f"RSS {mib(held['rss_kib'])} MiB, gauge {gauge}")
    await holder.close()
    t_closed = time.monotonic()
    after = []
    for i in range(args.after // args.step + 1):
        target = t_closed + i * args.step
        await asyncio.sleep(max(0.0, target - time.monotonic()))
        r = reading(p.pid)
        r["t"] = i * args.step
        after.append(r)
    gauge_after = metric(admin_metrics(args), 'meshlet_open_connections{direction="outbound"}')
    procs.stop(p)
    procs.stop(backend)
    per_conn = (held["rss_kib"] - before["rss_kib"]) * KIB / max(n, 1)
    per_conn_anon = ((held["anon_kib"] or 0) - (before["anon_kib"] or 0)) * KIB / max(n, 1)
    return {
        "kind": kind, "n": args.n, "held": n, "failed": holder.failed, "errors": holder.errors,
        "open_seconds": round(opened, 2), "gauge_held": gauge, "gauge_after": gauge_after,
        "before": before, "held_reading": held, "after": after,
        "per_conn_bytes": round(per_conn), "per_conn_anon_bytes": round(per_conn_anon),
    }


def cmd_conns(args, work, procs):
    meshlet, app = build(args, work)
    results = []
    for kind in args.kinds.split(","):
        results.append(asyncio.run(conns_one(args, kind, meshlet, app, work, procs)))
        # Let TIME_WAIT and the backend's sockets go before the next kind.
        time.sleep(2)
    with open(os.path.join(work, "conns.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n### Idle connections: {args.n} per kind, workers {args.workers}, "
          f"log level {args.log_level}, {args.label}\n")
    print("| kind | held | RSS idle MiB | RSS held MiB | KiB per connection (RSS) "
          "| anon KiB/conn | RSS 0 s after close | 30 s | 60 s | peak (VmHWM) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        a = {x["t"]: x["rss_kib"] for x in r["after"]}
        print(f"| {r['kind']} | {r['held']} | {mib(r['before']['rss_kib'])} "
              f"| {mib(r['held_reading']['rss_kib'])} | {r['per_conn_bytes'] / KIB:.1f} "
              f"| {r['per_conn_anon_bytes'] / KIB:.1f} | {mib(a[0])} | {mib(a.get(30, 0))} "
              f"| {mib(a.get(args.after, 0))} | {mib(r['after'][-1]['hwm_kib'])} |")
    print("\nRSS (MiB) every %d s after closing:\n" % args.step)
    for r in results:
        series = " ".join(mib(x["rss_kib"]) for x in r["after"])
        ratio = r["after"][-1]["rss_kib"] / r["before"]["rss_kib"]
        print(f"- {r['kind']}: {series} (last / idle = {ratio:.2f}x)")


# ----------------------------------------------------------------------------------------------
# oom: the proxy in a memory cgroup


def own_cgroup_dir():
    """(kind, directory) where a child cgroup can be made: v2 when its memory controller is
    enabled for children, else v1's memory hierarchy (this process's own memory cgroup)."""
    with open("/proc/self/cgroup") as f:
        lines = [line.strip().split(":", 2) for line in f]
    for _, ctrl, path in lines:
        if ctrl == "":
            base = "/sys/fs/cgroup" + path
            try:
                with open(os.path.join(base, "cgroup.subtree_control")) as f:
                    if "memory" in f.read().split():
                        return "v2", base
            except OSError:
                pass
    for _, ctrl, path in lines:
        if "memory" in ctrl.split(","):
            base = "/sys/fs/cgroup/memory" + path
            if os.path.isdir(base):
                return "v1", base
    raise SystemExit("no writable memory cgroup (neither a v2 memory controller for children "
                     "nor the v1 memory hierarchy)")


class Cgroup:
    def __init__(self, limit):
        self.kind, parent = own_cgroup_dir()
        self.dir = os.path.join(parent, f"meshlet-oom-{os.getpid()}")
        os.mkdir(self.dir)
        if self.kind == "v2":
            self._write("memory.max", str(limit))
            self._write("memory.swap.max", "0", optional=True)
        else:
            self._write("memory.limit_in_bytes", str(limit))
            self._write("memory.memsw.limit_in_bytes", str(limit), optional=True)
        self.procs = os.path.join(self.dir, "cgroup.procs")

    def _write(self, name, value, optional=False):
        try:
            with open(os.path.join(self.dir, name), "w") as f:
                f.write(value)
        except OSError:
            if not optional:
                raise

    def _read(self, name):
        with open(os.path.join(self.dir, name)) as f:
            return f.read()

    def usage(self):
        return int(self._read("memory.current" if self.kind == "v2" else "memory.usage_in_bytes"))

    def peak(self):
        try:
            return int(self._read("memory.peak" if self.kind == "v2"
                                  else "memory.max_usage_in_bytes"))
        except OSError:
            return None

    def oom_kills(self):
        text = self._read("memory.events" if self.kind == "v2" else "memory.oom_control")
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def remove(self):
        for _ in range(50):
            try:
                os.rmdir(self.dir)
                return
            except OSError:
                time.sleep(0.1)


async def oom_run(args, meshlet, app, work, procs):
    cg = Cgroup(args.limit)
    log(f"cgroup {cg.kind} {cg.dir}: limit {args.limit} bytes")
    try:
        backend = start_backend(procs, app, work, args.port_base + 10, "backend-oom")
        p = start_proxy(procs, meshlet, work,
                        proxy_config(args, [args.port_base + 10], defaults=PATIENT),
                        name="meshlet-oom", cgroup_procs=cg.procs)
        wait_ready(args, p)
        host, port = "127.0.0.1", args.port_base + 1
        idle = reading(p.pid)
        idle_cg = cg.usage()
        m = admin_metrics(args)
        results = {"cgroup": cg.kind, "limit": args.limit, "idle": idle, "idle_cgroup": idle_cg}
        log(f"idle: RSS {mib(idle['rss_kib'])} MiB, cgroup {idle_cg / 2**20:.1f} MiB")
        holders = []
        per_kind = {}
        for kind in args.kinds.split(","):
            h = memclient.Holder()
            t0 = time.monotonic()
            await h.open(host, port, kind, args.n, args.concurrency, "web.bench",
                         deadline_s=args.deadline)
            await asyncio.sleep(1.0)
            alive = p.poll() is None
            r = reading(p.pid) if alive else {}
            m = admin_metrics(args) if alive else ""
            per_kind[kind] = {
                "attempted": args.n, "held": h.open_count(), "failed": h.failed,
                "errors": h.errors, "seconds": round(time.monotonic() - t0, 1), "reading": r,
                "cgroup_usage": cg.usage(), "oom_kills": cg.oom_kills(),
                "refused_total": metric(m, "meshlet_connections_refused_total"),
                "open_gauge": metric(m, 'meshlet_open_connections{direction="outbound"}'),
            }
            log(f"{kind}: {per_kind[kind]}")
            holders.append(h)
            if not alive:
                break
        # Does it still answer? A fresh connection is refused while the listener is full; one
        # request on an already open HTTP/1.1 connection must still get 200.
        alive = p.poll() is None
        answered = None
        if alive:
            try:
                _, writer_ok, _ = await memclient.open_idle(host, port, "h1", "web.bench")
                writer_ok.close()
                answered = "new connection: 200"
            except (OSError, ConnectionError, asyncio.IncompleteReadError,
                    asyncio.TimeoutError) as e:
                answered = f"new connection refused ({type(e).__name__})"
        for h in holders:
            await h.close()
        await asyncio.sleep(2.0)
        after_ok = None
        if p.poll() is None:
            try:
                _, w, _ = await memclient.open_idle(host, port, "h1", "web.bench")
                w.close()
                after_ok = True
            except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                after_ok = False
        results.update({
            "kinds": per_kind, "alive": p.poll() is None, "oom_kills": cg.oom_kills(),
            "peak_cgroup": cg.peak(), "while_full": answered, "after_close_200": after_ok,
            "exit": p.returncode,
        })
        if p.poll() is None:
            results["final"] = reading(p.pid)
        procs.stop(p)
        procs.stop(backend)
        return results
    finally:
        procs.stop_all()
        cg.remove()


def cmd_oom(args, work, procs):
    if os.geteuid() != 0:
        raise SystemExit("oom needs root (a memory cgroup)")
    meshlet, app = build(args, work)
    r = asyncio.run(oom_run(args, meshlet, app, work, procs))
    with open(os.path.join(work, "oom.json"), "w") as f:
        json.dump(r, f, indent=1)
    print(f"\n### Under a {args.limit // 2**20} MiB memory limit (cgroup {r['cgroup']}), "
          f"{args.label}\n")
    print("| kind | attempted | held | refused/failed | proxy RSS MiB | cgroup MiB | OOM kills |")
    print("|---|---|---|---|---|---|---|")
    for kind, k in r["kinds"].items():
        rss = mib(k["reading"]["rss_kib"]) if k["reading"] else "dead"
        print(f"| {kind} | {k['attempted']} | {k['held']} | {k['failed']} | {rss} "
              f"| {k['cgroup_usage'] / 2**20:.1f} | {k['oom_kills']} |")
    peak = r["peak_cgroup"]
    print(f"\nalive at the end: {r['alive']}; OOM kills: {r['oom_kills']}; cgroup peak: "
          f"{peak / 2**20 if peak else 0:.1f} MiB; a new connection while full: "
          f"{r['while_full']}; a new connection after closing them: "
          f"{'200' if r['after_close_200'] else r['after_close_200']}")


# ----------------------------------------------------------------------------------------------
# soak: paced load with endpoint churn


async def soak_run(args, meshlet, app, work, procs):
    ports = [args.port_base + 10 + i for i in range(args.backends)]
    backends = {port: start_backend(procs, app, work, port, f"backend-{port}") for port in ports}
    extra = ""
    p = start_proxy(procs, meshlet, work, proxy_config(args, ports, extra), name="meshlet-soak")
    wait_ready(args, p)
    load = memclient.Load("127.0.0.1", args.port_base + 1, "web.bench", args.rate, args.conns,
                          args.load_kinds.split(","), reconnect_every=args.reconnect_every)
    samples = []
    t0 = time.monotonic()
    stop_at = t0 + args.seconds

    async def sampler():
        i = 0
        while True:
            target = t0 + i * args.sample
            if target > stop_at + 0.5:
                return
            await asyncio.sleep(max(0.0, target - time.monotonic()))
            r = reading(p.pid)
            r["t"] = round(time.monotonic() - t0)
            r["sent"] = load.sent
            samples.append(r)
            i += 1

    async def churn():
        # Every --churn-every s the next backend is stopped (its connections fail, the breaker
        # ejects it) and started again --churn-down s later.
        i = 0
        while time.monotonic() + args.churn_every < stop_at:
            await asyncio.sleep(args.churn_every)
            port = ports[i % len(ports)]
            procs.stop(backends[port], grace=1.0)
            await asyncio.sleep(args.churn_down)
            backends[port] = await asyncio.to_thread(start_backend, procs, app, work, port,
                                                     f"backend-{port}")
            i += 1

    churner = asyncio.ensure_future(churn())
    await asyncio.gather(load.run(args.seconds), sampler())
    churner.cancel()
    m = admin_metrics(args)
    procs.stop(p)
    return {"samples": samples, "statuses": load.statuses, "errors": load.errors,
            "sent": load.sent, "requests_metric": metric(m, "meshlet_requests_total"),
            "breaker_transitions": metric(m, "meshlet_breaker_transitions_total"),
            "connect_errors": metric(m, "meshlet_connect_errors_total")}


def cmd_soak(args, work, procs):
    meshlet, app = build(args, work)
    r = asyncio.run(soak_run(args, meshlet, app, work, procs))
    with open(os.path.join(work, "soak.json"), "w") as f:
        json.dump(r, f, indent=1)
    s = r["samples"]
    rss = [x["rss_kib"] for x in s]
    print(f"\n### Soak: {args.rate} req/s for {args.seconds} s, {args.backends} endpoints with "
          f"churn, workers {args.workers}, {args.label}\n")
    print(f"requests sent {r['sent']}, answers by status {r['statuses']}, client errors "
          f"{r['errors']}, breaker transitions {r['breaker_transitions']}, connect errors "
          f"{r['connect_errors']}\n")
    print(f"RSS MiB: start {mib(rss[0])}, max {mib(max(rss))}, end {mib(rss[-1])}; "
          f"VmHWM {mib(s[-1]['hwm_kib'])}\n")
    print("RSS series (MiB, every %d s): %s" % (args.sample, " ".join(mib(x) for x in rss)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--no-build", action="store_true", help="use the built binaries as they are")
    ap.add_argument("--bin", help="meshlet binary (default target/release/meshlet)")
    ap.add_argument("--app", help="backend binary (default target/release/examples/e2e-app)")
    ap.add_argument("--out", help="work dir (default: a new temp dir)")
    ap.add_argument("--port-base", type=int, default=19600,
                    help="admin on this port, the proxy's listener +1, backends +10...")
    ap.add_argument("--workers", type=int, default=2, help="meshlet's workers (default 2)")
    ap.add_argument("--label", default="", help="a note for the report's heading")
    ap.add_argument("--log-level", default="warn",
                    help="meshlet's log.level (default warn; info enables the per-connection spans)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("conns", help="per-connection memory and RSS after a burst")
    c.add_argument("--n", type=int, default=10000)
    c.add_argument("--kinds", default="silent,h1,h2")
    c.add_argument("--concurrency", type=int, default=200)
    c.add_argument("--extra", default="",
                   help="YAML lines added to the upstream listener, e.g. '    max_connections: 20000\\n'")
    c.add_argument("--settle", type=float, default=3.0)
    c.add_argument("--after", type=int, default=60)
    c.add_argument("--step", type=int, default=5)
    o = sub.add_parser("oom", help="connections under a memory cgroup limit (root)")
    o.add_argument("--n", type=int, default=10000)
    o.add_argument("--kinds", default="h1")
    o.add_argument("--limit", type=lambda v: int(v[:-1]) * 2**20 if v.endswith("M") else int(v),
                   default=64 * 2**20)
    o.add_argument("--concurrency", type=int, default=200)
    o.add_argument("--deadline", type=float, default=120.0)
    s = sub.add_parser("soak", help="paced load with endpoint churn")
    s.add_argument("--seconds", type=int, default=1800)
    s.add_argument("--rate", type=float, default=1000)
    s.add_argument("--conns", type=int, default=8, help="connections per load kind")
    s.add_argument("--load-kinds", default="h1,h2")
    s.add_argument("--reconnect-every", type=int, default=500)
    s.add_argument("--backends", type=int, default=3)
    s.add_argument("--churn-every", type=float, default=30)
    s.add_argument("--churn-down", type=float, default=10)
    s.add_argument("--sample", type=int, default=10)
    args = ap.parse_args()
    raise_nofile()
    work = args.out or tempfile.mkdtemp(prefix="meshlet-memory.")
    os.makedirs(work, exist_ok=True)
    log(f"work dir {work}")
    procs = Procs()

    def on_signal(signum, _):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        {"conns": cmd_conns, "oom": cmd_oom, "soak": cmd_soak}[args.cmd](args, work, procs)
    finally:
        procs.stop_all()


if __name__ == "__main__":
    main()
