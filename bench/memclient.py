"""Client side of the memory benchmark (bench/memory.py): many idle connections of one kind,
and a paced HTTP load. Standard library only (asyncio); HTTP/1.1 and a minimal HTTP/2
(prior knowledge, h2c) written out by hand, enough to send one GET and read its answer.

Kinds of idle connection:
  silent  connected, nothing sent
  h1      one HTTP/1.1 keep-alive GET answered, then nothing
  h2      the HTTP/2 preface, SETTINGS, one GET answered, then nothing (PINGs are answered)
"""

import asyncio
import resource
import struct
import time

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def raise_nofile():
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def h1_request(host, path="/"):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def read_h1_response(reader):
    """Reads one HTTP/1.1 response; returns its status code (body read and dropped)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


def h2_frame(ftype, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", stream) + payload


def h2_get(stream, authority, path="/"):
    """A HEADERS frame (END_STREAM | END_HEADERS) for GET http://authority/path."""
    block = bytes([0x82, 0x86])  # :method GET, :scheme http (static table)
    if path == "/":
        block += bytes([0x84])
    else:
        block += bytes([0x04, len(path)]) + path.encode()  # :path, literal without indexing
    block += bytes([0x01, len(authority)]) + authority.encode()  # :authority, literal
    return h2_frame(0x1, 0x5, stream, block)


async def read_h2_frame(reader):
    head = await reader.readexactly(9)
    length = int.from_bytes(head[0:3], "big")
    ftype, flags = head[3], head[4]
    stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
    payload = await reader.readexactly(length) if length else b""
    return ftype, flags, stream, payload


class H2Conn:
    """One HTTP/2 client connection; requests one at a time (enough for a benchmark)."""

    def __init__(self, reader, writer, authority):
        self.reader, self.writer, self.authority = reader, writer, authority
        self.next_stream = 1

    async def handshake(self):
        self.writer.write(H2_PREFACE + h2_frame(0x4, 0, 0))
        await self.writer.drain()

    async def get(self, path="/"):
        """Sends a GET and reads frames until its stream ends; returns the status (200 when
        the answer's first header is the static table's :status 200)."""
        sid = self.next_stream
        self.next_stream += 2
        self.writer.write(h2_get(sid, self.authority, path))
        await self.writer.drain()
        status = None
        while True:
            ftype, flags, stream, payload = await read_h2_frame(self.reader)
            if ftype == 0x4 and not flags & 0x1:  # SETTINGS: acknowledge
                self.writer.write(h2_frame(0x4, 0x1, 0))
            elif ftype == 0x6 and not flags & 0x1:  # PING: answer
                self.writer.write(h2_frame(0x6, 0x1, 0, payload))
            elif ftype == 0x7:
                raise ConnectionError("GOAWAY")
            elif stream == sid and ftype == 0x3:
                raise ConnectionError("RST_STREAM")
            elif stream == sid and ftype == 0x1:
                block = payload
                if flags & 0x8:  # PADDED
                    block = block[1 : len(block) - block[0]]
                if flags & 0x20:  # PRIORITY
                    block = block[5:]
                status = 200 if block[:1] == b"\x88" else (status or 0)
            elif stream == sid and ftype == 0x0 and payload:
                # Give the flow-control window back so long runs never stall.
                inc = struct.pack(">I", len(payload))
                self.writer.write(h2_frame(0x8, 0, 0, inc) + h2_frame(0x8, 0, sid, inc))
            if stream == sid and ftype in (0x0, 0x1) and flags & 0x1:
                await self.writer.drain()
                return status or 0

    async def idle(self):
        """While held idle: answer PINGs and SETTINGS until the connection ends."""
        while True:
            ftype, flags, _, payload = await read_h2_frame(self.reader)
            if ftype == 0x4 and not flags & 0x1:
                self.writer.write(h2_frame(0x4, 0x1, 0))
            elif ftype == 0x6 and not flags & 0x1:
                self.writer.write(h2_frame(0x6, 0x1, 0, payload))
            elif ftype == 0x7:
                return


async def open_idle(host, port, kind, authority, timeout=20.0):
    """Opens one connection of `kind` and makes its one request. Returns (reader, writer,
    h2conn-or-None). Raises on failure (refused, closed, bad status, timeout)."""

    async def go():
        reader, writer = await asyncio.open_connection(host, port, limit=16 * 1024)
        if kind == "silent":
            return reader, writer, None
        if kind == "h1":
            writer.write(h1_request(authority))
            await writer.drain()
            status = await read_h1_response(reader)
            if status != 200:
                raise ConnectionError(f"status {status}")
            return reader, writer, None
        conn = H2Conn(reader, writer, authority)
        await conn.handshake()
        status = await conn.get()
        if status != 200:
            raise ConnectionError(f"status {status}")
        return reader, writer, conn

    return await asyncio.wait_for(go(), timeout)


class Holder:
    """Holds many idle connections; counts those the server closed while held."""

    def __init__(self):
        self.conns = []
        self.tasks = []
        self.failed = 0
        self.errors = {}
        self.closed_by_server = 0

    async def _watch(self, reader, h2conn):
        try:
            if h2conn is not None:
                await h2conn.idle()
            else:
                while await reader.read(4096):
                    pass
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        self.closed_by_server += 1

    async def open(self, host, port, kind, n, concurrency, authority, deadline_s=300.0):
        """Opens n connections, at most `concurrency` being set up at once."""
        sem = asyncio.Semaphore(concurrency)
        deadline = time.monotonic() + deadline_s

        async def one():
            async with sem:
                if time.monotonic() > deadline:
                    self.failed += 1
                    self.errors["deadline"] = self.errors.get("deadline", 0) + 1
                    return
                try:
                    reader, writer, h2conn = await open_idle(host, port, kind, authority)
                except (OSError, ConnectionError, asyncio.IncompleteReadError,
                        asyncio.TimeoutError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
                    self.failed += 1
                    key = type(e).__name__
                    self.errors[key] = self.errors.get(key, 0) + 1
                    return
                self.conns.append(writer)
                self.tasks.append(asyncio.ensure_future(self._watch(reader, h2conn)))

        await asyncio.gather(*(one() for _ in range(n)))

    def open_count(self):
        return len(self.conns) - self.closed_by_server

    async def close(self):
        for w in self.conns:
            w.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.conns.clear()
        self.tasks.clear()


class Load:
    """A paced HTTP load: `rate` requests per second in all, spread over `conns` connections of
    each of the given kinds (h1 / h2), each connection reopened after `reconnect_every`
    requests. Counts answers by status and errors; never sends faster than the rate (a late
    slot is sent at once, an answer that takes long delays only its connection)."""

    def __init__(self, host, port, authority, rate, conns, kinds, reconnect_every=200):
        self.host, self.port, self.authority = host, port, authority
        self.rate, self.conns, self.kinds = rate, conns, kinds
        self.reconnect_every = reconnect_every
        self.statuses = {}
        self.errors = {}
        self.sent = 0

    def _count(self, d, key):
        d[key] = d.get(key, 0) + 1

    async def _worker(self, kind, per_worker_rate, stop_at):
        interval = 1.0 / per_worker_rate
        next_at = time.monotonic()
        conn = None
        used = 0
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at += interval
            try:
                if conn is None or used >= self.reconnect_every:
                    if conn is not None:
                        conn[1].close()
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), 5.0)
                    h2 = None
                    if kind == "h2":
                        h2 = H2Conn(reader, writer, self.authority)
                        await h2.handshake()
                    conn = (reader, writer, h2)
                    used = 0
                reader, writer, h2 = conn
                self.sent += 1
                used += 1
                if h2 is not None:
                    status = await asyncio.wait_for(h2.get(), 10.0)
                else:
                    writer.write(h1_request(self.authority))
                    await writer.drain()
                    status = await asyncio.wait_for(read_h1_response(reader), 10.0)
                self._count(self.statuses, status)
            except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                    asyncio.LimitOverrunError, ValueError, IndexError) as e:
                self._count(self.errors, type(e).__name__)
                if conn is not None:
                    conn[1].transport.abort()
                conn = None
        if conn is not None:
            conn[1].close()

    async def run(self, seconds):
        stop_at = time.monotonic() + seconds
        workers = [(k, i) for k in self.kinds for i in range(self.conns)]
        per = self.rate / len(workers)
        await asyncio.gather(*(self._worker(k, per, stop_at) for k, _ in workers))
