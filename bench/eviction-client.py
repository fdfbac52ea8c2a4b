#!/usr/bin/env python3
"""The client of bench/eviction.sh: HTTP/1.1 GETs to Service ClusterIPs (run inside the
namespace where iptables redirects them to meshlet's outbound listener). Standard library only.

    eviction-client.py touch TARGETS OUT.json [--concurrency 32] [--timeout 10] [--deadline 600]
    eviction-client.py live  TARGETS OUT.json [--interval 1] [--timeout 5] [--max-seconds 1800]

TARGETS: lines "IP PORT NAME". Every request is a new connection (`Connection: close`), so each
one makes meshlet look the destination up again (and refreshes its last use).

touch: one request to each target, at most --concurrency at a time, all within --deadline s
(what is left then is counted as not sent); each request's outcome is the answer's status code,
or "connect error" / "no answer" / "reset" (a request counts as touched once the connection to
meshlet is established: meshlet has read its original destination by then).
live: every --interval s one request to each target, until SIGTERM or --max-seconds; counts by
target and outcome, and the longest request.
"""
import argparse
import asyncio
import json
import signal
import time


def targets(path):
    out = []
    for line in open(path):
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[0], int(parts[1]), parts[2]))
    return out


async def request(ip, port, name, timeout):
    """One GET on a fresh connection: (outcome, connected)."""
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout)
    except asyncio.TimeoutError:
        return "connect timeout", False
    except OSError as e:
        return f"connect error ({e.strerror or e})", False
    try:
        w.write(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        line = await asyncio.wait_for(r.readline(), timeout)
        if not line:
            return "closed without an answer", True
        parts = line.split()
        status = parts[1].decode() if len(parts) > 1 else "malformed"
        # Read the rest (Connection: close: meshlet closes after the answer).
        try:
            await asyncio.wait_for(r.read(), timeout)
        except asyncio.TimeoutError:
            pass
        return status, True
    except asyncio.TimeoutError:
        return "no answer", True
    except OSError as e:
        return f"reset ({e.strerror or e})", True
    finally:
        w.close()


async def touch(args):
    ts = targets(args.targets)
    queue = asyncio.Queue()
    for t in ts:
        queue.put_nowait(t)
    outcomes, connected = {}, 0
    t0 = time.monotonic()
    deadline = t0 + args.deadline

    async def worker():
        nonlocal connected
        while time.monotonic() < deadline:
            try:
                ip, port, name = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            o, c = await request(ip, port, name, args.timeout)
            outcomes[o] = outcomes.get(o, 0) + 1
            connected += c

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.monotonic() - t0
    json.dump(
        {
            "targets": len(ts),
            "sent": sum(outcomes.values()),
            "not_sent": queue.qsize(),
            "connected": connected,
            "outcomes": outcomes,
            "seconds": elapsed,
            "concurrency": args.concurrency,
        },
        open(args.out, "w"),
        indent=1,
    )


async def live(args):
    ts = targets(args.targets)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    by = {name: {} for _, _, name in ts}
    slowest = 0.0
    t0 = time.monotonic()

    async def one(ip, port, name):
        nonlocal slowest
        s = time.monotonic()
        o, _ = await request(ip, port, name, args.timeout)
        slowest = max(slowest, time.monotonic() - s)
        by[name][o] = by[name].get(o, 0) + 1

    def dump():
        json.dump({"by_target": by, "slowest_s": slowest, "seconds": time.monotonic() - t0,
                   "interval": args.interval}, open(args.out, "w"), indent=1)

    while not stop.is_set() and time.monotonic() - t0 < args.max_seconds:
        tick = time.monotonic()
        await asyncio.gather(*(one(*t) for t in ts))
        dump()
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, args.interval - (time.monotonic() - tick)))
        except asyncio.TimeoutError:
            pass
    dump()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["touch", "live"])
    p.add_argument("targets")
    p.add_argument("out")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--deadline", type=float, default=600.0)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=1800.0)
    args = p.parse_args()
    asyncio.run(touch(args) if args.mode == "touch" else live(args))


if __name__ == "__main__":
    main()
