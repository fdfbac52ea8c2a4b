#!/usr/bin/env python3
"""Forwards a loopback TCP port of a network namespace to the same port on the host's loopback.

    netns-forward.py NETNS PORT

Listens on 127.0.0.1:PORT inside /var/run/netns/NETNS and connects each client to
127.0.0.1:PORT in the namespace this process started in, so that a process in NETNS reaches the
API server of tests/e2e/control-plane.sh (bound to the host's 127.0.0.1) at the very address of
its kubeconfig, and the server's certificate matches. The listening socket is made inside the
namespace (setns), then the thread returns to its own namespace: the connections out are made
there. Each connection is closed both ways as soon as either side closes (enough for HTTP).
Several may run on one port (SO_REUSEPORT), to spread the descriptors over processes.
Needs root (setns). Python standard library only (ctypes for setns: os.setns is Python 3.12+).
"""
import asyncio
import ctypes
import os
import resource
import socket
import sys

CLONE_NEWNET = 0x40000000


def setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def listener_in(netns, port):
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    setns(target)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Several forwarders may share the port (the kernel spreads the connections): each
        # connection takes two descriptors, and without CAP_SYS_RESOURCE one process cannot
        # raise its limit above the hard limit it was given.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        s.listen(4096)
        s.setblocking(False)
    finally:
        setns(own)
        os.close(own)
        os.close(target)
    return s


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def main():
    netns, port = sys.argv[1], int(sys.argv[2])
    # One connection per watch (kube-rs speaks HTTP/1.1): two descriptors each.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sock = listener_in(netns, port)

    async def handle(cr, cw):
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            cw.close()
            return
        a = asyncio.ensure_future(pipe(cr, sw))
        b = asyncio.ensure_future(pipe(sr, cw))
        # Either side closing ends both (an HTTP client dropping a watch closes its connection).
        await asyncio.wait([a, b], return_when=asyncio.FIRST_COMPLETED)
        sw.close()
        cw.close()
        await asyncio.gather(a, b, return_exceptions=True)

    server = await asyncio.start_server(handle, sock=sock, limit=1 << 16)
    print(f"forwarding 127.0.0.1:{port} in {netns} to 127.0.0.1:{port} "
          f"(descriptor limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
