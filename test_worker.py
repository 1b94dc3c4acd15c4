"""Tests of worker.py: vectors from the real JS code, codecs, the sans-I/O cores,
real sockets on 127.0.0.1, real JS bugout peers (interop/), real subprocesses.

The file reads in worker.py's order. Support sections come first: time limits,
cleanups and the safety nets; wires in memory and on loopback; the DHT in
memory; trackers and WebRTC; the tasks a master hands out; masters and
workers; npm. Then the tests of each worker.py section, from settings to the
command line, and last the suites that cross sections (faults, master.py, the
test data). Importing this file starts, reads and patches nothing:
setUpModule() puts up the safety nets (no public DHT router, tracker or STUN
server), and every asyncio test is an AsyncTest, which ends what it started
and fails at its time limit instead of hanging. Tests that need a network
namespace run a ``child_...`` function of this file in one (``in_namespace``).

Run: python test_worker.py (all; the last line says N passed, N failed, N skipped)
     python -m unittest -v test_worker.TestTcp (one class; test_worker.TestTcp.test_... one test)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import fnmatch
import functools
import hashlib
import importlib.util
import inspect
import io
import itertools
import json
import logging
import os
import random
import re
import select
import shlex
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import types
import unittest
from pathlib import Path
from unittest import mock

import worker as w
from support import (
    HERE,
    IN_CI,
    INTEROP,
    KEY,
    NODE,
    JsProcess,
    clean_env,
    free_port,
    fuzz_inputs,
    huge_sdp,
    identity,
    js_peer,
    js_ready,
    mutations,
    need,
    prng,
    sdp_pair,
    until,
    vector_swarm,
    vectors,
    write_assets,
    write_loopback_env,
)

# Support: time limits, cleanups, safety nets, namespaces ####################

#: asyncio's debug mode as asyncio.run sets it (IsolatedAsyncioTestCase would turn it on)
ASYNCIO_DEBUG = sys.flags.dev_mode or bool(os.environ.get("PYTHONASYNCIODEBUG"))
_safety_nets: list = []  # the patches in force
_public_defaults: dict = {}  # worker.py's defaults as they are without the safety nets


def install_safety_nets() -> None:
    """No test reaches a public DHT router, tracker or STUN server. Idempotent.

    The DHT refuses to bootstrap from anything but loopback, and nodes that do
    not name their trackers or ICE servers get none (``public_default()`` keeps
    the real defaults, which tests check as values).
    """
    if _safety_nets:
        return
    real_start = w.Dht.start

    async def loopback_only(dht):
        for host, _port in dht.bootstrap:
            if not host.startswith("127."):
                raise AssertionError(f"a test tried to bootstrap the DHT from {host}")
        return await real_start(dht)
    _public_defaults.update(DEFAULT_TRACKERS=w.DEFAULT_TRACKERS, DEFAULT_ICE_SERVERS=w.DEFAULT_ICE_SERVERS)
    nets = (mock.patch.object(w.Dht, "start", loopback_only), mock.patch.object(w, "DEFAULT_TRACKERS", ()),
            mock.patch.object(w, "DEFAULT_ICE_SERVERS", ()))
    for net in nets:
        net.start()
        _safety_nets.append(net)


def remove_safety_nets() -> None:
    while _safety_nets:
        _safety_nets.pop().stop()


def public_default(name: str) -> object:
    """worker.py's default ``name`` as users get it (the safety nets hide it from tests)."""
    return _public_defaults.get(name, getattr(w, name))


def setUpModule() -> None:  # unittest calls it before the first test of this module
    install_safety_nets()


def tearDownModule() -> None:
    remove_safety_nets()


def full_tier(test):
    """Decorator: a test of a QUICK class that needs a socket or a process runs in the full suite only."""
    test.full_tier = True
    return test


def time_limit(seconds: float):
    """Decorator: the most an AsyncTest test may take (else ``AsyncTest.TIME_LIMIT``)."""
    def mark(test):
        test.time_limit = seconds
        return test
    return mark


def _limited(test):
    """``test`` within its time limit: past it, the test fails where it waits, it never hangs."""
    @functools.wraps(test)
    async def limited(self, *args, **kwargs):
        limit = getattr(test, "time_limit", self.TIME_LIMIT)
        try:
            async with asyncio.timeout(limit) as deadline:
                return await test(self, *args, **kwargs)
        except TimeoutError:
            if deadline.expired():
                raise self.failureException(f"not done within its time limit, {limit:g} s")
            raise
    return limited


class AsyncTest(unittest.IsolatedAsyncioTestCase):
    """Tests with an event loop of their own, which end what they start, pass or fail.

    Each ``async def test_...`` runs within TIME_LIMIT seconds (or ``@time_limit``).
    ``tmp()``, ``started()``, ``will_close()`` and ``will_kill()`` register what to
    end; cleanups run last first, each within CLOSE_LIMIT, so a folder made first
    goes after everything started in it.
    """

    TIME_LIMIT = 60.0
    CLOSE_LIMIT = 60.0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, test in list(vars(cls).items()):
            if name.startswith("test") and inspect.iscoroutinefunction(test):
                setattr(cls, name, _limited(test))

    async def asyncSetUp(self) -> None:
        install_safety_nets()
        asyncio.get_running_loop().set_debug(ASYNCIO_DEBUG)  # not slowed down by debug mode

    def tmp(self) -> Path:
        """A new temporary folder, removed at the end of the test."""
        folder = tempfile.TemporaryDirectory()
        self.addCleanup(folder.cleanup)
        return Path(folder.name)

    async def started(self, thing, *args, **kwargs):
        """``await thing.start(*args, **kwargs)``, and close ``thing`` at the end of the test."""
        await thing.start(*args, **kwargs)
        return self.will_close(thing)

    def will_close(self, thing):
        """Close ``thing`` at the end of the test: a Worker stops, a Runner waits for its children."""
        close = (thing.stop if isinstance(thing, w.Worker) else
                 thing.wait_closed if isinstance(thing, w.Runner) else thing.close)

        async def bounded():
            async with asyncio.timeout(self.CLOSE_LIMIT):
                if inspect.isawaitable(closing := close()):
                    await closing
        self.addAsyncCleanup(bounded)
        return thing

    def will_kill(self, proc: asyncio.subprocess.Process) -> asyncio.subprocess.Process:
        """SIGKILL the subprocess ``proc`` at the end of the test if it still runs; reap it."""
        async def kill():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if proc.stdin is not None:
                proc.stdin.close()
            async with asyncio.timeout(self.CLOSE_LIMIT):
                await proc.wait()
        self.addAsyncCleanup(kill)
        return proc


def patched_environ(values):
    return mock.patch.dict(os.environ, values)


async def until_logged(logs, text, timeout=10.0):
    """Wait until a line captured by assertLogs contains ``text``."""
    await until(lambda: any(text in line for line in logs.output), timeout)


#: How lo is set up in a namespace: a multicast route for LSD; for WebRTC a second
#: address, since aioice gathers every IPv4 address except 127.0.0.1 (libwebrtc
#: takes loopback as it is).
LO_FOR_LSD = "ip route add 224.0.0.0/4 dev lo src 127.0.0.1"
LO_FOR_WEBRTC = "ip addr add 127.0.0.2/32 dev lo"


def in_namespace(child, *args, timeout=90.0, lo=LO_FOR_LSD):
    """``await child(*args)`` in a fresh network namespace; what it returned (JSON).

    ``child`` is an async function of this module, run by ``namespace_child`` in
    a new ``python`` under ``unshare -n``: lo is its only link, so nothing leaves
    the namespace. The child has ``timeout`` less 10 seconds; its process ends
    with it, and so do the JS peers it started (their stdin closes).
    """
    need(shutil.which("unshare") and shutil.which("ip") and os.geteuid() == 0, "unshare -n needs root")
    argv = [sys.executable, "-c", "import test_worker; test_worker.namespace_child()", child.__name__,
            json.dumps(args), str(timeout - 10)]
    script = f"ip link set lo up && {lo} && exec {shlex.join(argv)}"
    done = subprocess.run(["unshare", "-n", "sh", "-c", script], check=False, cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"namespace run failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def namespace_child() -> None:
    """In the namespace: the safety nets, then the child ``argv[1]``; its result is the last line."""
    name, args, limit = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    install_safety_nets()
    w.Logger("warn")
    print(json.dumps(asyncio.run(asyncio.wait_for(globals()[name](*args), limit))))


def rtc_ready() -> None:
    """WebRTC for real needs the JS WebRTC stack, the tracker and aiortc."""
    js_ready()
    for package in ("@roamhq/wrtc", "bittorrent-tracker"):
        need((INTEROP / "node_modules" / package).is_dir(), "run npm ci in interop/ (%s)" % package)
    for module in ("aiortc", "websockets"):
        need(importlib.util.find_spec(module), "pip install -r requirements.txt (%s)" % module)


# Support: wires in memory and on loopback ###################################

def wire_pair(max_message=w.DEFAULT_MAX_MESSAGE):
    """Two PeerWires joined in memory (a dialer and a listener)."""
    infohash, info = w.infohash_of(vector_swarm())
    ext = {"ek": "e", "id": vector_swarm(), "m": w.OUR_EXT_IDS, "metadata_size": len(info), "pk": "p"}
    a = w.PeerWire(infohash, b"-QP0100-aaaaaaaaaaaa", ext, initiator=True,
                   metadata=info, max_message=max_message)
    b = w.PeerWire(infohash, b"-QP0100-bbbbbbbbbbbb", ext, initiator=False,
                   metadata=info, max_message=max_message)
    pump(a, b)
    return a, b


def pump(a, b):
    for _ in range(5):
        b.receive_data(a.data_to_send())
        a.receive_data(b.data_to_send())


def py_node(ident, **kw):
    """A Bugout on 127.0.0.1 that answers ``echo`` and records its events; not started."""
    kw.setdefault("dht", False)
    kw.setdefault("trackers", [])
    node = w.Bugout(ident, host="127.0.0.1", lsd=False, **kw)
    node.register("echo", lambda address, args: {**args, "echoedBy": "py"})
    node.events = []
    for name in ("seen", "message", "left"):
        node.on(name, lambda *a, name=name: node.events.append((name,) + a))
    return node


def js_like(node):
    """A Python node whose handshakes carry a JS peer's id (as WebTorrent's, ``-WW``)."""
    node.peer_id = b"-WW1000-" + node.peer_id[8:]
    return node


class MemoryTransport(asyncio.Transport):
    """One end of an in-memory TCP stream; the test decides when bytes move.

    Bytes written to an end whose peer is closed are lost, as TCP loses them.
    """

    def __init__(self, protocol, local, remote):
        super().__init__()
        self.protocol, self.peer = protocol, None
        self.outbox = collections.deque()  # bytes written and not delivered; b"" is our EOF
        self.closed = self.eof_written = self.eof_read = False
        self.reading, self.held = True, False
        self._extra = {"peername": remote, "sockname": local}

    def get_extra_info(self, name, default=None):
        return self._extra.get(name, default)

    def write(self, data):
        if self.eof_written and not self.closed:
            raise RuntimeError("Cannot call write() after write_eof()")  # as asyncio's transports
        if data and not self.closed:
            self.outbox.append(bytes(data))

    def can_write_eof(self):
        return True

    def write_eof(self):
        if not (self.closed or self.eof_written):
            self.eof_written = True
            self.outbox.append(b"")

    def is_closing(self):
        return self.closed

    def close(self):
        if not self.closed:
            self.write_eof()
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self):
        self.outbox.clear()
        self.eof_written = False
        self.close()

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def get_write_buffer_size(self):
        return sum(map(len, self.outbox))

    def deliver(self):
        """Move what was written to the peer, while the peer reads; True if something moved."""
        peer, moved = self.peer, False
        while self.outbox and not self.held and peer.reading:
            data, moved = self.outbox.popleft(), True
            if peer.closed:
                continue
            if data:
                peer.protocol.data_received(data)
            elif not peer.eof_read:
                peer.eof_read = True
                if not peer.protocol.eof_received():
                    peer.close()
        return moved


class MemoryWires:
    """TCP connections between nodes, in memory; a background task moves the bytes."""

    def __init__(self):
        self.ends = []
        self._ports = itertools.count(40000)
        self._task = asyncio.ensure_future(self._pump())

    def connect(self, dialer, listener):
        """``dialer`` dials ``listener``: (dialer's end, listener's end)."""
        here, there = ("10.0.0.1", next(self._ports)), ("10.0.0.2", 6881)
        out = w.WireConnection(dialer, True, there)
        inc = w.WireConnection(listener, False)
        a, b = MemoryTransport(out, here, there), MemoryTransport(inc, there, here)
        a.peer, b.peer = b, a
        self.ends += [a, b]
        out.connection_made(a)
        inc.connection_made(b)
        return a, b

    async def _pump(self):
        while True:
            moved = [end.deliver() for end in self.ends]  # every end, each turn
            if not any(moved):
                await asyncio.sleep(0.002)
            else:
                await asyncio.sleep(0)

    def close(self):
        self._task.cancel()


def memory_node(peer_id=None, **kw):
    node = w.Bugout("wire-attack", lsd=False, dht=False, listen=False, trackers=[], **kw)
    if peer_id is not None:
        node.peer_id = peer_id
    node.register("echo", lambda address, args: args)
    return node


async def raw_wire(node, ident=None, rcvbuf=None, local="127.0.0.1", ext=None, peer_id=None, port=0):
    """A TCP connection to ``node`` that said its BitTorrent and BEP 10 handshakes (keys of ``ident``,
    ``peer_id``, from ``port``)."""
    ident = ident or w.Identity()
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((local, port))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", node.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    ext = ext or {"m": {"bo_channel": 4}, "id": node.identifier, "pk": ident.pk, "ek": ident.ek}
    writer.write(w.handshake_bytes(node.infohash, peer_id or b"-XX0000-" + os.urandom(6).hex().encode())
                 + w.frame(20, b"\0" + w.bencode(ext)))
    await writer.drain()
    return reader, writer


def port_below(port):
    """A TCP port free on 127.0.0.1 and lower than ``port`` (a dialer that wants to sort first)."""
    for candidate in range(min(port, 30000) - 1, 10000, -1):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", candidate))
            return candidate
    raise AssertionError("no free port below %d" % port)


def bo_frame(payload):
    return w.frame(20, b"\x04" + payload)


def signed_by(ident, fields, identifier=None, t=None):
    """A packet signed by ``ident`` for ``identifier`` (the vectors' swarm), made at ``t`` (now)."""
    return w.BugoutCore(identifier or vector_swarm(), ident).make_packet(fields, w._now() if t is None else t)


async def closed_by_peer(reader, timeout=10.0):
    """True once the node closed this raw connection (EOF or reset)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not await asyncio.wait_for(reader.read(1 << 16), deadline - time.monotonic()):
                return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False
    return False


# Support: the DHT in memory, generated KRPC #################################

ASKER = b"abcdefghij0123456789"
OURS = b"mnopqrstuvwxyz123456"
HERE_ADDR = ("10.1.2.3", 6881)


def quiet_core(node_id=OURS):
    """A core whose secrets and transaction ids are fixed (zero bytes)."""
    return w.DhtCore(node_id, random=lambda n: bytes(n))


def sent(core):
    """What a core sends: [(parsed message, address)]."""
    return [(w.parse_krpc(data), addr) for data, addr in core.data_to_send()]


class DhtNet:
    """Cores linked in memory: datagrams between them are delivered at once."""

    def __init__(self, count, now=1000.0):
        self.now = now
        self.cores = {("127.0.0.%d" % (i + 1), 6881): w.DhtCore(hashlib.sha1(b"node %d" % i).digest())
                      for i in range(count)}
        self.events = {addr: [] for addr in self.cores}

    def __getitem__(self, i):
        return list(self.cores.values())[i]

    def addr(self, i):
        return list(self.cores)[i]

    def pump(self, seconds=0.0, lost=()):
        """Deliver until quiet; addresses in ``lost`` never answer; then let time pass."""
        moving = True
        while moving:
            moving = False
            for src, core in self.cores.items():
                for data, dst in core.data_to_send():
                    moving = True
                    if dst not in lost:
                        self.deliver(data, src, dst)
                self.events[src] += core.events_received()
        if seconds:
            self.now += seconds
            for core in self.cores.values():
                core.tick(self.now)
            self.pump(lost=lost)

    def peers_found(self, i, info_hash):
        return {p for e in self.events[self.addr(i)] if isinstance(e, w.DhtPeers)
                and e.info_hash == info_hash for p in e.peers}

    def deliver(self, data, src, dst):
        if dst in self.cores:
            self.cores[dst].receive_datagram(data, src, self.now)


class SybilNet(DhtNet):
    """DhtNet and one host posing as many nodes (SYBIL_IP, any port): it answers every query
    with 8 more of its ports, with ids the target's but for the last 16 bits, and a get_peers
    with 50 peers of its own."""

    SYBIL_IP = "10.66.0.1"
    BOGUS = tuple(("10.77.0.%d" % i, 6881) for i in range(1, 51))

    def deliver(self, data, src, dst):
        if dst[0] != self.SYBIL_IP:
            return super().deliver(data, src, dst)
        query = w.parse_krpc(data)
        near = query.args.get("target") or query.args.get("info_hash") or bytes(20)
        ports = [(dst[1] * 8 + i) % 60000 + 1 for i in range(1, 9)]
        values = {"id": near[:18] + dst[1].to_bytes(2, "big"), "token": b"tok",
                  "nodes": b"".join(near[:18] + p.to_bytes(2, "big") + w.compact_addr((self.SYBIL_IP, p))
                                    for p in ports)}
        if query.method == "get_peers":
            values["values"] = [w.compact_addr(a) for a in self.BOGUS]
        self.cores[src].receive_datagram(bytes(w.KrpcResponse(query.t, values)), dst, self.now)


_KRPC_KEYS = ["t", "y", "q", "a", "r", "e", "id", "target", "info_hash", "token", "port",
              "implied_port", "values", "nodes", "ro", "v"]


def krpc_seeds():
    ids = [hashlib.sha1(b"%d" % i).digest() for i in range(4)]
    nodes = b"".join(i + bytes([127, 0, 0, n + 1]) + struct.pack(">H", 6000 + n) for n, i in enumerate(ids))
    values = [bytes([10, 0, 0, n]) + struct.pack(">H", 7000 + n) for n in range(3)]
    messages = [w.KrpcQuery(b"aa", "ping", {"id": ids[0]}),
                w.KrpcQuery(b"ab", "find_node", {"id": ids[1], "target": ids[2]}),
                w.KrpcQuery(b"ac", "get_peers", {"id": ids[1], "info_hash": ids[3]}),
                w.KrpcQuery(b"ad", "announce_peer", {"id": ids[2], "info_hash": ids[3], "port": 6881,
                                                     "token": b"12345678", "implied_port": 1}),
                w.KrpcQuery(b"ae", "get", {"id": ids[2], "target": ids[0]}),
                w.KrpcResponse(b"\0\1", {"id": ids[0], "nodes": nodes, "values": values, "token": b"tok"}),
                w.KrpcError(b"aa", 201, "A Generic Error Ocurred")]
    return [bytes(m) for m in messages]


def random_krpc(rng, depth=0):
    """A random bencodable value shaped like KRPC: its keys, odd types and sizes."""
    kind = rng.randrange(6 if depth < 3 else 3)
    if kind == 0:
        return rng.choice([0, 1, -1, 6881, 65535, 65536, 1 << 40])
    if kind == 1:
        return rng.randbytes(rng.choice([0, 1, 2, 6, 8, 19, 20, 21, 26, 52, 300]))
    if kind == 2:
        return rng.choice([b"q", b"r", b"e", b"ping", b"find_node", b"get_peers", b"announce_peer"])
    if kind == 3:
        return [random_krpc(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(_KRPC_KEYS): random_krpc(rng, depth + 1) for _ in range(rng.randrange(6))}


def random_body(rng):
    """Arguments or answer values: the right keys, often the right sizes, sometimes not."""
    body = {k: random_krpc(rng) for k in rng.sample(_KRPC_KEYS[6:], rng.randrange(1, 6))}
    for key in ("id", "target", "info_hash"):
        if rng.random() < 0.7:
            body[key] = rng.randbytes(20)
    if rng.random() < 0.3:
        body["nodes"] = rng.randbytes(26 * rng.randrange(12) + rng.choice([0, 0, 1, 25]))
    return body


def random_message(rng, t=None):
    """A message with a sound envelope (t, y) and random contents."""
    y = rng.choice([b"q", b"q", b"r", b"e"]) if t is None else rng.choice([b"r", b"r", b"r", b"e"])
    message = {"t": t or rng.randbytes(rng.randint(1, 4)), "y": y}
    if y == b"q":
        message.update(q=rng.choice([b"ping", b"find_node", b"get_peers", b"announce_peer", b"x"]),
                       a=random_body(rng))
    elif y == b"r":
        message["r"] = random_body(rng)
    else:
        message["e"] = rng.choice([[201, b"x"], [], [b"x"], random_krpc(rng)])
    if rng.random() < 0.1:
        message[rng.choice(_KRPC_KEYS)] = random_krpc(rng)
    return w.bencode(message)


def krpc_inputs(core, count, rng):
    """Mutated valid messages, random messages, and random answers to our pending queries."""
    mutated = mutations(krpc_seeds(), count, rng)
    for i in range(count):
        addr = ("10.0.%d.%d" % (i % 7, i % 61 + 1), 6881)
        if i % 3 == 0:
            yield next(mutated), addr
        elif i % 3 == 1 or not core._pending:
            yield random_message(rng), addr
        else:
            t, pending = rng.choice(list(core._pending.items()))
            yield random_message(rng, t), pending.addr


# Support: trackers and WebRTC ###############################################

SAMPLE_INFOHASH = bytes.fromhex("5d89b217eba4a9f0d27593289ea6439cf875d329")


@functools.cache
def samples():
    """The frames the real JS tracker code wrote (testdata/tracker-samples.json), read on first use."""
    return json.loads((HERE / "testdata/tracker-samples.json").read_text())["full_examples"]


def sample(kind):
    return json.loads(samples()[kind]["raw_json_text"])


def sample_peer_ids():
    """(ours, the other's): the peer ids of the samples' answer."""
    fields = samples()["client->tracker answer (to_peer_id)"]["hex_fields"]
    return bytes.fromhex(fields["peer_id__hex"]), bytes.fromhex(fields["to_peer_id__hex"])


def tracker_client(peer_id=None, now=0.0, **kw):
    peer_id = peer_id or sample_peer_ids()[0]
    client = w.TrackerClient("ws://tracker.test", SAMPLE_INFOHASH, peer_id, **kw)
    assert client.start_connecting(now)
    client.connection_made(now)
    return client


class FakeTracker:
    """bittorrent-tracker's relay rules in memory, to pair TrackerClients."""

    def __init__(self, interval=120):
        self.interval = interval
        self.clients = {}

    def add(self, client):
        self.clients[client._peer_id] = client
        return client

    def pump(self, now):
        """Deliver frames until every client is quiet."""
        moved = True
        while moved:
            moved = False
            for sender, client in list(self.clients.items()):
                for text in client.data_to_send():
                    moved = True
                    self._handle(sender, json.loads(text), now)

    def _handle(self, sender, frame, now):
        relay = {"action": "announce", "peer_id": sender, "info_hash": frame["info_hash"],
                 "offer_id": frame.get("offer_id")}
        if "answer" in frame:
            self.clients[frame["to_peer_id"]].receive_frame({**relay, "answer": frame["answer"]}, now)
            return
        self.clients[sender].receive_frame({"complete": len(self.clients), "incomplete": 0,
                                            "action": "announce", "interval": self.interval,
                                            "info_hash": frame["info_hash"]}, now)
        others = [c for peer_id, c in self.clients.items() if peer_id != sender]
        for other, offer in zip(others, frame.get("offers", [])):
            other.receive_frame({**relay, "offer": offer["offer"], "offer_id": offer["offer_id"]}, now)


class FakeChannel:
    """An RTCDataChannel stand-in that delivers to another RtcConnection."""

    def __init__(self):
        self.readyState, self.bufferedAmount = "open", 0
        self.sizes, self.peer = [], None

    def on(self, event, handler):
        pass

    def send(self, data):
        assert isinstance(data, bytes)
        self.sizes.append(len(data))
        asyncio.get_running_loop().call_soon(self.peer._on_message, data)

    def close(self):
        self.readyState = "closed"


class FakePeerConnection:
    connectionState = "connected"

    def on(self, event, handler):
        pass

    async def close(self):
        self.connectionState = "closed"


async def local_tracker(**env):
    return await JsProcess("tracker.js", {k: str(v) for k, v in env.items()}).start()


async def rtc_node(ident, trackers, numwant=w.TRACKER_NUMWANT, **kw):
    """A Python node reachable only through WebRTC (no TCP listener, no LSD), as py_node."""
    node = w.Bugout(ident, lsd=False, dht=False, listen=False, trackers=trackers, ice_servers=[], **kw)
    node.webrtc.numwant = numwant
    node.register("echo", lambda address, args: {**args, "echoedBy": "py"})
    node.events = []
    for name in ("seen", "message", "left"):
        node.on(name, lambda *a, name=name: node.events.append((name,) + a))
    return await node.start()


def only_webrtc(*nodes):
    return all(isinstance(c, w.RtcConnection) for node in nodes for c in node._connections)


async def js_master_run(tmp, transport, url, count):
    """The JS master harness and a Python Worker over WebRTC or TCP: timings and results."""
    webrtc = transport == "webrtc"
    master = await JsProcess("master.js", {
        "QX_TOKEN": "rtc-jsm-" + transport, "QX_KEY": KEY, "QX_JOBS": str(count),
        "QX_ASSETS": str(Path(tmp) / "assets.json"), **({"QX_TRACKER": url} if webrtc else {})}).start()
    worker = w.Worker("rtc-jsm-" + transport, "py", "warn", KEY, env={}, folder=Path(tmp) / transport,
                      host="127.0.0.1", lsd=False, dht=False, get_batch=True, batch_size=10,
                      peers=[] if webrtc else ["127.0.0.1:%d" % master.ready["port"]],
                      trackers=[url] if webrtc else [], ice_servers=[])
    started = time.monotonic()
    await worker.start()
    await until(lambda: worker.master is not None, 30)
    found = time.monotonic() - started
    await until(lambda: sum(e["event"] == "result" for e in master.events) >= 1, 30)
    first = time.monotonic()
    await until(lambda: sum(e["event"] == "result" for e in master.events) >= count, 120)
    rate = (count - 1) / (time.monotonic() - first)
    results = [e["result"] for e in master.events if e["event"] == "result"]
    result = {"found_s": found, "rate": rate, "only_webrtc": only_webrtc(worker.node),
              "ids": sorted(r["jobID"] for r in results),
              "right": all(r["data"] == {"sum": r["jobID"] * 2} for r in results)}
    await worker.stop()
    await master.close()
    return result


async def flow_rate(master, worker, jobs, get_batch, start=0):
    """Push jobs, time them from the first result to the last (jobs/s)."""
    worker.job_loop.settings = dataclasses.replace(worker.settings, get_batch=get_batch)
    done = master.stats["results"]
    for i in range(start, start + jobs):
        master.push_new_job({"id": i, "data": json.dumps({"x": i})})
    worker.job_loop.nudge()
    await until(lambda: master.stats["results"] >= done + 1, 30)
    first, first_done = time.monotonic(), master.stats["results"]
    await until(lambda: master.stats["results"] >= done + jobs, 120)
    return (done + jobs - first_done) / (time.monotonic() - first)


async def dead_answer_sdp():
    """A well-formed answer whose ICE and DTLS ends are already gone."""
    return (await sdp_pair())["answer"]


async def bad_answerer(url, infohash, stop):
    """A tracker client that answers every offer it is sent with a dead answer."""
    from websockets.asyncio.client import connect
    sdp = await dead_answer_sdp()
    ih, me = infohash.decode("latin-1"), "-XX0000-deadanswerer"
    answered = 0
    async with connect(url, compression=None) as ws:
        await ws.send(json.dumps({"numwant": 0, "uploaded": 0, "downloaded": 0, "left": 0, "event": "started",
                                  "action": "announce", "info_hash": ih, "peer_id": me, "offers": []}))
        while not stop.is_set():
            try:
                async with asyncio.timeout(0.2):
                    frame = json.loads(await ws.recv())
            except TimeoutError:
                continue
            if "offer" in frame:
                answered += 1
                await ws.send(json.dumps({"action": "announce", "info_hash": ih, "peer_id": me,
                                          "to_peer_id": frame["peer_id"], "offer_id": frame["offer_id"],
                                          "answer": {"type": "answer", "sdp": sdp}}))
    return answered


def live_peer_connections():
    import gc

    import aiortc
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, aiortc.RTCPeerConnection)]


# Support: tasks a master hands out ##########################################

TASK_PY = '''\
import json
from pathlib import Path

FACTOR = json.loads((Path(__file__).parent / "data" / "conf" / "factor.json").read_text())["factor"]


class Task:
    def run(self, job):
        data = json.loads(job["data"]) if isinstance(job["data"], str) else job["data"]
        if data.get("fail"):
            raise ValueError("boom %s" % job["id"])
        if data.get("sleep"):
            import time
            time.sleep(data["sleep"])
        return {"sum": (data["x"] + data.get("y", 0)) * FACTOR}
'''


# An async task that notes its event loop; "exit" calls sys.exit, "hang" blocks its child.
LOOP_TASK_PY = '''\
import asyncio
import json
import os
import sys
import time
import traceback


class Task:
    loop = None

    async def run(self, job):
        data = json.loads(job["data"])
        if data.get("exit"):
            sys.exit(data["exit"])
        if data.get("hang"):
            time.sleep(data["hang"])
        if Task.loop is None:
            Task.loop = asyncio.get_running_loop()
        return {"same_loop": Task.loop is asyncio.get_running_loop(), "pid": os.getpid()}
'''
DEFAULT_FILES = {"/workplace/task.py": TASK_PY,
                 "/workplace/data/conf/factor.json": '{"factor": 2}'}


MASTER_TASK = '''\
import json


class Task:
    def run(self, job):
        return {"double": json.loads(job["data"])["x"] * 2}
'''


# What each row of issue 12's table did to a worker, and more, on request.
TRICKY_TASK_PY = '''\
import ctypes
import json
import os
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path


def meet(folder, deadline=15.0):
    """True once a partner job has come to ``folder`` too: both ran at once."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / str(os.getpid())).touch()
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if len(list(Path(folder).iterdir())) >= 2:
            return True
        time.sleep(0.01)
    return False


class Task:
    def run(self, job):
        data = json.loads(job["data"])
        do = data.get("do")
        if do == "exit":
            os._exit(3)
        if do == "segfault":
            ctypes.string_at(0)  # a crash in a C extension
        if do == "oom-kill":
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer sends
        if do == "nan":
            return {"x": float("nan")}
        if do == "infinity":
            return [float("inf")]
        if do == "set":
            return {1, 2}
        if do == "patch-json":
            json.dumps = lambda *args, **kwargs: "NaN"
            json.JSONEncoder.encode = lambda *args, **kwargs: "NaN"
            return "patched"
        if do == "thread":
            threading.Thread(target=time.sleep, args=(3600,)).start()  # not a daemon
            return "thread started"
        if do == "allocate":
            return len(b"x" * (data["mb"] << 20))  # every page touched
        if do == "spin":
            Path(data["pidfile"]).write_text(str(os.getpid()))
            while True:
                pass
        if do == "meet":
            return {"met": meet(data["folder"]), "pid": os.getpid()}
        if do == "raise":
            raise ValueError("z" * data["size"])
        if do == "print":
            for i in range(data["lines"]):
                print("line", i)
            return data["lines"]
        if do == "surrogate":  # a file name that is not UTF-8, as os.listdir() gives it
            name = b"caf\\xe9".decode(errors="surrogateescape")
            if data.get("raise"):
                raise ValueError(name)
            return name
        if do == "orphans":  # processes of its own: one holds its stdout, a fork all its fds
            pids = [subprocess.Popen(["sleep", "600"]).pid]
            pid = os.fork()
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            pids.append(pid)
            Path(data["pidfile"]).write_text(" ".join(map(str, pids)))
            if data.get("exit"):
                os._exit(3)
            return {"pid": os.getpid(), "orphans": pids}
        return {"pid": os.getpid(), "x": data.get("x")}
'''


TRICKY_TASK_JS = """\
const fs = require('fs');
const path = require('path');

async function meet(folder) {
  fs.mkdirSync(folder, { recursive: true });
  fs.writeFileSync(path.join(folder, String(process.pid)), '');
  const end = Date.now() + 15000;
  while (Date.now() < end) {
    if (fs.readdirSync(folder).length >= 2) return true;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  return false;
}

class Task {
  async run(job) {
    const data = JSON.parse(job.data);
    if (data.do === 'exit') process.exit(3);
    if (data.do === 'spin') {
      fs.writeFileSync(data.pidfile, String(process.pid));
      for (;;);
    }
    if (data.do === 'heap') {
      const kept = [];
      for (;;) kept.push({ x: Math.random(), s: `abc${kept.length}` });
    }
    if (data.do === 'buffer') return Buffer.alloc((data.mb || 2000) * 1024 * 1024).length;
    if (data.do === 'meet') return { met: await meet(data.folder), pid: process.pid };
    if (data.do === 'surrogate') { // half an emoji: JSON.stringify writes it as \\ud83d
      if (data.raise) throw new Error('\\ud83d');
      return '\\ud83d\\ude00'.slice(0, 1);
    }
    return { pid: process.pid, x: data.x };
  }
}

module.exports = Task;
"""


DEP_INDEX_JS = "module.exports = { add: (a, b) => a + b, version: require('./package.json').version };\n"


# In the style of the JS Master's examples/basic/task.js, with an npm dependency.
BASIC_TASK_JS = """\
const dep = require('qx-demo-dep');

class Task {
  constructor() {
    this.data = null;
  }

  async run(job) {
    this.data = JSON.parse(job.data);
    return { sum: dep.add(this.data.x, this.data.y), dep: dep.version };
  }
}

module.exports = Task;
"""


# A plain (not async) run that throws, rejects, logs or exits when the job asks.
EDGE_TASK_JS = """\
class Task {
  run(job) {
    const data = JSON.parse(job.data);
    if (data.throw) throw new TypeError(`thrown by job ${job.id}`);
    if (data.reject) return Promise.reject(new RangeError(`rejected by job ${job.id}`));
    if (data.log) console.log(`console.log from job ${job.id}`);
    if (data.exit) {
      console.error(`job ${job.id} exits`);
      process.exit(3);
    }
    return { sum: data.x + data.y, pid: process.pid };
  }
}

module.exports = Task;
"""


# The JS worker harness's task against master.py: the sum Cluster's jobs expect.
SUM_TASK_JS = """\
class Task {
  async run(job) {
    return { sum: JSON.parse(job.data).x * 2 };
  }
}

module.exports = Task;
"""


VERSION_TASK_JS = """\
module.exports = class Task {
  run(job) {
    return { version: %d, pid: process.pid };
  }
};
"""


# Support: masters and workers ###############################################

WORKER_PY = str(HERE / "worker.py")
MASTER_PY = str(HERE / "master.py")


class Cluster:
    """master.py and Python workers on 127.0.0.1 in one event loop."""

    def __init__(self, tmp, files=DEFAULT_FILES, deps=(), key=KEY, **master_kw):
        self.tmp = Path(tmp)
        self.token = "cluster-%d" % random.randrange(1 << 40)
        self.results = []
        from master import Master
        files = write_assets(self.tmp / "master", files)
        self.master = Master(self.token, {"files": files, "dependencies": list(deps)},
                             self.results.append, None, key, folder=self.tmp / "master",
                             env={}, host="127.0.0.1", lsd=False, dht=False, trackers=[], **master_kw)
        self.statuses = []
        serve = self.master._request_exec_assets

        def recording(address, args):
            answer = serve(address, args)
            self.statuses.append(answer["status"])
            return answer
        self.master._request_exec_assets = recording

    async def start(self):
        await self.master.start()
        return self

    async def close(self):
        await self.master.close()

    def worker(self, name="w1", key=KEY, **kw):
        kw.setdefault("peers", ["127.0.0.1:%d" % self.master.port])
        kw.setdefault("trackers", [])
        return w.Worker(self.token, name, "warn", key, env={}, folder=self.tmp / name,
                        host="127.0.0.1", lsd=False, dht=False, **kw)

    def push(self, count, start=0, **extra):
        for i in range(start, start + count):
            self.master.push_new_job({"id": i, "data": json.dumps({"x": i, "y": 1, **extra})})

    async def until_results(self, count, timeout=60):
        await until(lambda: len(self.results) >= count, timeout)


def loopback_worker(token, folder, name="w", loglevel="warn", **kw):
    """A Worker on 127.0.0.1 without LSD, DHT or trackers (``peers`` names a master)."""
    kw.setdefault("trackers", [])
    return w.Worker(token, name, loglevel, KEY, env={}, folder=folder, host="127.0.0.1", lsd=False, dht=False,
                    **kw)


def loopback_master(token, folder, on_results=None, files=DEFAULT_FILES, key=KEY, **kw):
    """master.py's Master on 127.0.0.1 serving ``files`` from ``folder``, without LSD, DHT or trackers."""
    from master import Master
    kw.setdefault("trackers", [])
    return Master(token, {"files": write_assets(folder, files), "dependencies": []}, on_results, None, key,
                  folder=folder, env={}, host="127.0.0.1", lsd=False, dht=False, **kw)


def js_master_assets(folder, files=DEFAULT_FILES):
    """interop/master.js's QX_ASSETS: ``files`` in ``folder``/master, listed by absolute path."""
    listed = write_assets(folder / "master", files)
    for f in listed:
        f["masterPath"] = str(folder / "master" / f["masterPath"].lstrip("/"))
    (folder / "assets.json").write_text(json.dumps({"files": listed, "dependencies": []}))
    return folder / "assets.json"


def make_wheel(folder, name, version, code):
    """A minimal pure-Python wheel, built by hand (no network, no build backend)."""
    import base64 as b64
    import zipfile
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": code,
             dist + "/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n".format(name.replace("_", "-"), version),
             dist + "/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = b64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append("%s,sha256=%s,%d" % (path, digest, len(text.encode())))
    record.append(dist + "/RECORD,,")
    files[dist + "/RECORD"] = "\n".join(record) + "\n"
    with zipfile.ZipFile(folder / (f"{name}-{version}-py3-none-any.whl"), "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)


def asset_answer(files, key=KEY, status="changed", deps=()):
    """A requestExecAssets answer as a master makes it: {workerPath: bytes} -> files."""
    crypt = w.Crypt(key)
    listed = [{"masterPath": p, "name": Path(p).name, "workerPath": p,
               "sha256": hashlib.sha256(data).hexdigest(), "content": crypt.encrypt(data)}
              for p, data in files.items()]
    return {"status": status, "dependencies": list(deps), "files": listed}


class Impostor:
    """A token-only peer on worker.py's own Bugout: claims to be the master, records every call."""

    def __init__(self, token, assets=None, caps=None, work=None):
        self.token, self.calls = token, []
        self.assets = assets  # requestExecAssets answer: a dict, a function of args, or None (no answer)
        self.caps = caps or {}
        self.work = work

    async def start(self, **kw):
        self.node = await py_node(self.token, **kw).start()
        self.node.on("rpc", lambda address, name, args: self.calls.append((name, args)))
        self.node.register("isMaster", lambda a, args: {**args, "isMaster": "yes", **self.caps})
        self.node.register("requestExecAssets", self._assets)
        self.node.register("requestWork", lambda a, args: {**args, "task": self.work})
        for name in ("shareResults", "shareResultsBatch"):
            self.node.register(name, lambda a, args: w.NO_ANSWER)
        return self

    def _assets(self, address, args):
        if self.assets is None:
            return asyncio.Event().wait()  # never answers
        return self.assets(args) if callable(self.assets) else self.assets

    def names(self):
        return [name for name, _ in self.calls]

    async def close(self):
        await self.node.close()


class IdentityFlood:
    """One TCP wire to a worker carrying packets of many fresh bugout identities.

    Each identity answers isMaster "yes" and requestExecAssets with ``probe()``:
    the shape of a padding-oracle attack by a peer that knows only the token.
    """

    def __init__(self, token, port, probe, answer=True):
        self.token, self.port, self.probe, self.answer = token, port, probe, answer
        self.cores = collections.deque(maxlen=4)  # the newest identities: boxes are opened with these
        self.calls = collections.Counter()
        #: envelopes none of the newest identities could open: calls to older ones
        self.unopened = 0
        self.worker = None

    async def start(self):
        infohash, _ = w.infohash_of(self.token)
        first = w.Identity()
        self.wire = w.PeerWire(infohash, w.make_peer_id(), {"ek": first.ek, "id": self.token,
                                                            "m": {"bo_channel": 4}, "pk": first.pk},
                               initiator=True)
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(self.wire.data_to_send())
        self._reading = asyncio.ensure_future(self._read())
        await until(lambda: self.worker is not None, 10)
        return self

    async def _read(self):
        while data := await self.reader.read(1 << 16):
            self.wire.receive_data(data)
            for event in self.wire.events_received():
                if isinstance(event, w.ExtendedHandshake):
                    self.worker = (event.fields["pk"].decode(), event.fields["ek"].decode())
                elif isinstance(event, w.ExtensionPayload):
                    self._payload(event.payload)
            self._send()

    def _payload(self, payload):
        envelope = w.bdecode(payload)
        if isinstance(envelope, dict) and "e" in envelope:
            self.unopened += 1
        for core in list(self.cores):
            events = core.receive_payload(payload, w._now())
            if any(isinstance(e, (w.Call, w.Response)) for e in events):
                self.unopened -= 1
            for event in events:
                if isinstance(event, w.Call):
                    self.calls[event.name] += 1
                    answer = ({**event.args, "isMaster": "yes"} if event.name == "isMaster"
                              else self.probe() if event.name == "requestExecAssets" else None)
                    if answer is not None and self.answer:
                        core.send_response(event.address, event.nonce, answer, w._now())

    def new_identity(self):
        core = w.BugoutCore(self.token, w.Identity())
        core.saw_peer(*self.worker, w._now(), verified=True)  # and pings: the worker sees it
        self.cores.append(core)
        self._send()

    def _send(self):
        for core in self.cores:
            for payload, _ in core.data_to_send():
                self.wire.send_extension(payload)
        if data := self.wire.data_to_send():
            self.writer.write(data)

    async def close(self):
        self._reading.cancel()
        self.writer.close()


class LeavingFlood(IdentityFlood):
    """Identities that answer isMaster "yes" and leave (bugout's ``x``) in the same write."""

    def _payload(self, payload):
        asked = self.calls["isMaster"]
        super()._payload(payload)
        if self.calls["isMaster"] > asked:
            self.cores[-1].send_leave(w._now())
            self._send()

    def come_back(self):
        self.cores[-1].send_ping(w._now())
        self._send()


def padding_probe(rng):
    """An asset answer whose one file is random ciphertext (a CBC-R step), sometimes malformed."""
    def probe():
        content = {"iv": rng.randbytes(16).hex(), "encryptedData": rng.randbytes(32).hex()}
        name = rng.choice(["task.py", 5, None])
        return {"status": "changed", "dependencies": [], "files": [
            {"masterPath": "/task.py", "name": name, "workerPath": "/task.py",
             "sha256": rng.randbytes(32).hex(), "content": content}]}
    return probe


def open_journal(folder, token="journal-swarm", key=KEY):
    journal = w.Journal.of(Path(folder), token, w.Crypt(key))
    journal.submit(journal.open).result()
    return journal


def file_mode(path):
    """The permission bits of ``path``, as "0o600"."""
    return oct(os.stat(path).st_mode & 0o777)


def result_text(i):
    return json.dumps({"jobID": i, "worker": {"id": "bWorker", "name": "w"}, "data": i})


def add_owned(outbox, i, master="master", run=None):
    """The result of job ``i``, a job ``master`` gave (in its ``run``), into ``outbox``."""
    outbox.given([(i, json.dumps({"id": i}))], (master, run))
    outbox.add(i, result_text(i))


def journal_count(folder, table="results"):
    """Rows in a running worker's journal, read beside it (WAL lets a reader in)."""
    try:
        with contextlib.closing(sqlite3.connect("file:%s?mode=ro" % (Path(folder) / w.JOURNAL_NAME),
                                                uri=True, timeout=5)) as db:
            return db.execute("SELECT count(*) FROM %s" % table).fetchone()[0]
    except sqlite3.Error:
        return -1


class QuietMaster:
    """master.py in this process, on a fixed port and seed, that never requeues on its own:
    a job lost by the worker stays lost, so a test sees it."""

    def __init__(self, tmp, token, port, seed, name, db=None):
        from master import Master
        files = write_assets(Path(tmp) / name, DEFAULT_FILES)
        self.results, self.handed = [], []
        self.master = Master(token, {"files": files, "dependencies": []}, self.results.append, None, KEY,
                             folder=Path(tmp) / name, env={}, host="127.0.0.1", port=port, seed=seed,
                             lsd=False, dht=False, trackers=[], lease_seconds=3600.0, db=db or ":memory:")
        self.master._requeue_worker = lambda address: None
        serve = self.master._request_work

        def record(answer):
            self.handed.append((time.monotonic(), [json.loads(w.Crypt(KEY).decrypt(j))["id"] for j in
                                                   answer.get("batchTasks") or [answer.get("task")] if j]))
            return answer

        async def synced(answer):
            return record(await answer)

        def recording(address, args):
            answer = serve(address, args)
            return synced(answer) if inspect.isawaitable(answer) else record(answer)  # db: once synced
        self.master._request_work = recording

    async def start(self):
        await self.master.start()
        return self

    async def close(self):
        await self.master.close()

    def push(self, ids, **extra):
        for i in ids:
            self.master.push_new_job({"id": i, "data": json.dumps({"x": i, **extra})})


def push_jobs(cluster, jobs, start=0):
    """Queue ``jobs`` (dicts, the job's data) with ids from ``start``; return the ids.

    The JS rule hands out a batch only while more jobs wait than ``batchSize``:
    with ``batchSize=len(jobs) - 1``, all but the last come in one batch.
    """
    for i, data in enumerate(jobs, start):
        cluster.master.push_new_job({"id": i, "data": json.dumps(data)})
    return list(range(start, start + len(jobs)))


def alive(pid):
    """True while process ``pid`` exists and is not a zombie."""
    try:
        return Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def peak_rss_mb(pid):
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class WorkerPy:
    """``python worker.py`` in a folder of its own (its .env on loopback), output in a file."""

    def __init__(self, tmp, cluster, name="wp", **keys):
        self.folder = Path(tmp) / name
        self.folder.mkdir()
        keys.setdefault("LOG_LEVEL", "info")
        write_loopback_env(self.folder, cluster.token, peers="127.0.0.1:%d" % cluster.master.port, **keys)
        self._out = (self.folder / "out.log").open("wb")

    async def start(self):
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, WORKER_PY, cwd=self.folder, env=clean_env(), stdout=self._out,
                stderr=subprocess.STDOUT)
        finally:
            self._out.close()  # the worker has its own copy
        return self

    async def close(self):
        """SIGKILL if it still runs (its task children die with it: PR_SET_PDEATHSIG)."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    def output(self):
        return (self.folder / "out.log").read_text(errors="replace")

    async def sigterm(self, timeout):
        """SIGTERM; the exit code, which must come within ``timeout`` seconds."""
        self.proc.send_signal(15)
        return await asyncio.wait_for(self.proc.wait(), timeout)


def readme_block(name):
    """The fenced block after ``<!-- compat.sh: NAME -->`` in README.md, which interop/compat.sh runs."""
    after = (HERE / "README.md").read_text().split("<!-- compat.sh: %s -->\n" % name, 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def readme_task():
    """The task.py the README shows ("Writing a task")."""
    return (HERE / "README.md").read_text().split("```python\n# task.py\n", 1)[1].split("```", 1)[0]


def readme_unit():
    """The README's systemd unit: each key of its [Service] section, with its values in order."""
    unit = collections.defaultdict(list)
    service = readme_block("unit").split("[Service]\n", 1)[1].split("\n[", 1)[0]
    for line in service.splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            unit[key].append(value)
    return unit


async def unit_process(folder, **kwargs):
    """The README unit's ExecStart in ``folder``, with its Environment and UMask; this checkout's
    worker.py and python for the installed ones."""
    unit = readme_unit()
    installed = Path(unit["ExecStart"][-1].split()[0]).parents[2]  # /opt/qx-worker/venv/bin/python
    env = {k: v for k, v in os.environ.items() if k not in w.SETTINGS and k != "PYTHONPATH"}
    for pair in " ".join(unit["Environment"]).split():
        key, value = pair.split("=", 1)
        env[key] = value.replace(str(installed), str(HERE))
    argv = [sys.executable, *unit["ExecStart"][-1].split()[1:]]
    return await asyncio.create_subprocess_exec(*argv, cwd=folder, env=env, umask=int(unit["UMask"][-1], 8),
                                                **kwargs)


class MasterProcess:
    """``python master.py`` with its settings in a .env; jobs over stdin."""

    def __init__(self, folder, token, port, seed, task_text=TASK_PY):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_assets(self.folder, DEFAULT_FILES)
        (self.folder / "workplace/task.py").write_text(task_text)
        write_loopback_env(self.folder, token, port=port, masterSeed=seed, LOG_LEVEL="warn")
        self.results = []

    async def start(self):
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, MASTER_PY, "--task", "workplace/task.py", "--task",
            "workplace/data/conf/factor.json", "--jobs", "-", "--lease", "5", cwd=self.folder,
            env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ready = json.loads(await self.proc.stdout.readline())
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self):
        async for line in self.proc.stdout:
            event = json.loads(line)
            if event["event"] == "result":
                self.results.append(event["result"])

    def push(self, ids, **extra):
        for i in ids:
            job = {"id": i, "data": json.dumps({"x": i, **extra})}
            self.proc.stdin.write((json.dumps(job) + "\n").encode())

    async def kill(self):
        self.proc.kill()
        await self.proc.wait()
        self.proc.stdin.close()  # else the transport's finaliser writes EOF on a closed loop
        self._reader.cancel()

    async def close(self):
        """SIGKILL if it still runs; idempotent."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        self.proc.stdin.close()
        self._reader.cancel()


class EventsMasterProcess(MasterProcess):
    """MasterProcess that keeps every event it prints, not only results."""

    async def _read(self):
        self.events = []
        async for line in self.proc.stdout:
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == "result":
                self.results.append(event["result"])

    def write(self, text):
        self.proc.stdin.write(text.encode())


def watch_requests(master):
    """(time, caller) of each requestWork the master serves, as it serves it."""
    times = []
    master.node.on("rpc", lambda address, name, args: name == "requestWork"
                   and times.append((time.monotonic(), address)))
    return times


async def thief_of(cluster):
    """A bare node that leases a job with requestWork and never runs it."""
    node = await py_node(cluster.token, peers=["127.0.0.1:%d" % cluster.master.port]).start()
    await until(lambda: cluster.master.address in node.peers)
    return node


async def prove_key(node, master, key=KEY):
    """Prove the key to master.py from a bare node, as worker.py does; proveKey's answer."""
    answer = await node.rpc(master, "isMaster", {"challenge": os.urandom(32).hex()})
    proof = w.worker_proof(w.Crypt(key).derive(w.WORKER_PROOF_LABEL), bytes.fromhex(answer["workerChallenge"]),
                           node.address, master)
    return await node.rpc(master, "proveKey", {"proof": proof})


async def proven_thief(cluster):
    """A thief that proved the key: a Python worker that took jobs and went quiet."""
    node = await thief_of(cluster)
    await prove_key(node, cluster.master.address)
    await until(lambda: node.address in cluster.master.policy.proven)
    return node


def end_lease(master, job_id, deadline):
    """Move the end of a job's lease (a ``time.time()``) in master.py's database."""
    master.store.db.execute("UPDATE jobs SET deadline = ? WHERE job_key = ?", (deadline, json.dumps(job_id)))


async def lsd_run(root, worker_first):
    """master.py and worker.py with LSD on, 1,000 jobs: results, seconds, RPC timeouts in the log.

    The worker starts ``worker_first`` seconds before the master (0: after it),
    so that both ends' announces cross and both dial.
    """
    token = "lsd-runs-%d" % random.randrange(1 << 40)
    m, wk = root / "m", root / "w"
    m.mkdir()
    wk.mkdir()
    write_assets(m, DEFAULT_FILES)
    write_loopback_env(m, token, lsd="true", host="0.0.0.0", LOG_LEVEL="warn")
    write_loopback_env(wk, token, lsd="true", host="0.0.0.0", LOG_LEVEL="info")
    procs, results, reader = [], set(), None

    async def worker():
        with (root / "worker.log").open("wb") as log:
            procs.append(await asyncio.create_subprocess_exec(sys.executable, WORKER_PY, cwd=wk, env=clean_env(),
                                                              stderr=log))

    async def read():
        async for line in master.stdout:
            event = json.loads(line)
            if event["event"] == "result":
                results.add(event["result"]["jobID"])
    try:
        if worker_first:
            await worker()
        await asyncio.sleep(worker_first)  # the worker's LSD announces and the master's cross
        master = await asyncio.create_subprocess_exec(
            sys.executable, MASTER_PY, "--task", "workplace/task.py", "--task", "workplace/data/conf/factor.json",
            "--jobs", "-", cwd=m, env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(master)
        await master.stdout.readline()
        for i in range(1000):
            master.stdin.write((json.dumps({"id": i, "data": json.dumps({"x": i})}) + "\n").encode())
        if not worker_first:
            await worker()
        reader = asyncio.ensure_future(read())
        start = time.monotonic()
        try:
            await until(lambda: len(results) >= 1000, 30)
        except AssertionError:
            pass
        took = time.monotonic() - start
    finally:  # a run cut short by the child's time limit leaves no process in the namespace
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
        if reader is not None:
            reader.cancel()
    text = (root / "worker.log").read_text()
    return {"results": len(results), "seconds": round(took, 2), "rpc_timeouts": text.count("no answer in")}


def write_jobs(path, count, fail=(), sleep=0.0, bad_every=0):
    """A jobs file for TASK_PY (result: sum = 2 * x); every ``bad_every``-th line is not JSON."""
    with open(path, "w") as f:
        for i in range(count):
            if bad_every and i and i % bad_every == 0:
                f.write("{not json %d\n" % i)
            data = json.dumps({"x": i, "sleep": sleep, "fail": i in fail})
            f.write(json.dumps({"id": i, "data": data}) + "\n")


def held_in_memory(master):
    """Items in the containers a Master (and its Store) holds: what grows with jobs if anything does."""
    sized = (dict, list, set, tuple, collections.deque)
    return sum(len(v) for obj in (master, master.store) for v in vars(obj).values() if isinstance(v, sized))


class MasterCli:
    """``python master.py`` with its folder's .env, master.db and task; stdout events of every run."""

    def __init__(self, folder, token=None, port=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token = token or "durable-%d" % random.randrange(1 << 40)
        self.port = port or free_port()
        write_assets(self.folder, DEFAULT_FILES)
        write_loopback_env(self.folder, self.token, port=self.port, masterSeed=w.make_seed(), LOG_LEVEL="warn")
        self.events = []  # every run's, in order
        self.torn = 0  # last lines of killed runs cut short

    async def start(self, *args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE):
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, MASTER_PY, "--task", "workplace/task.py", "--task",
            "workplace/data/conf/factor.json", "--lease", "3", *args, cwd=self.folder, env=clean_env(),
            stdin=stdin, stdout=subprocess.PIPE, stderr=stderr)
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self):
        async for line in self.proc.stdout:
            if line.endswith(b"\n"):
                self.events.append(json.loads(line))
            else:
                self.torn += 1

    def of(self, kind):
        return [e for e in self.events if e["event"] == kind]

    @property
    def results(self):
        return [e["result"] for e in self.of("result")]

    async def exit(self, timeout=90):
        """The exit status, once stdout is read to its end; stderr in ``self.stderr``."""
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        self.stderr = (await self.proc.stderr.read()).decode() if self.proc.stderr else ""
        return code

    async def kill(self):
        self.proc.kill()
        await self.proc.wait()
        await self._reader

    async def close(self):
        """SIGKILL the last run if it still runs; idempotent."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        await self._reader


#: Run as ``python -c CTTY PROGRAM ARGS...`` in a session of its own: the terminal on its stdin
#: becomes its controlling terminal (/dev/tty, where getpass reads), as a login shell's is.
CTTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


class Terminal:
    """``python ARGS...`` on a pseudo-terminal of its own: what a user types and sees."""

    def __init__(self, *args, timeout=30.0):
        self.fd, child = os.openpty()
        self.timeout = timeout
        self.proc = subprocess.Popen([sys.executable, "-c", CTTY, *args], stdin=child, stdout=child, stderr=child,
                                     start_new_session=True, env=clean_env())
        os.close(child)
        self.seen = b""
        self.pos = 0  # where the next prompt is looked for

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.fd)

    def read_until(self, text=None):
        """Read what it prints until ``text`` shows after the last one found (None: until
        it closed the terminal); whether it did."""
        needle = None if text is None else text.encode()
        deadline = time.monotonic() + self.timeout
        while (needle is None or self.seen.find(needle, self.pos) < 0) and time.monotonic() < deadline:
            if not select.select([self.fd], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # EIO: every process on the terminal has closed it
                data = b""
            if not data:
                break
            self.seen += data
        at = -1 if needle is None else self.seen.find(needle, self.pos)
        if at >= 0:
            self.pos = at + len(needle)
        return at >= 0

    def answer(self, prompt, text, end="\r"):
        """Type ``text`` (and Enter) once ``prompt`` shows."""
        if not self.read_until(prompt):
            raise AssertionError("no %r in %r" % (prompt, self.text()))
        os.write(self.fd, (text + end).encode())

    def wait(self):
        """Its exit status, once it ended and everything it printed is read."""
        self.read_until()
        return self.proc.wait(self.timeout)

    def text(self):
        return self.seen.decode(errors="replace")


def parse_exposition(text):
    """The Prometheus text format, parsed strictly: {name: {labels tuple: value}}, {name: type}."""
    samples, types, helps = collections.defaultdict(dict), {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
        else:
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            pairs = tuple(tuple(pair.split("=", 1)) for pair in labels.rstrip("}").split(",") if pair)
            samples[name][tuple((k, json.loads(v)) for k, v in pairs)] = float(value)
            family = name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert family in types or name in types, line
    assert set(types) <= helps
    return samples, types


def http_get(url, timeout=10):
    """(status, body) with a real HTTP client."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# Support: npm, offline ######################################################

NPM = shutil.which("npm")


_npm_env: dict = {}


def offline_npm():
    """Environment for an npm that installs ``qx-demo-dep`` offline, from its cache."""
    need(NODE, "node is not installed")
    need(NPM, "npm is not installed")
    if not _npm_env:
        import atexit
        root = Path(tempfile.mkdtemp(prefix="qx-npm-"))
        atexit.register(shutil.rmtree, root, True)
        _npm_env.update(_prime_npm_cache(root))
    return dict(_npm_env)


def _prime_npm_cache(root):
    """Pack qx-demo-dep 1.0.0 from a folder and put it in a fresh npm cache.

    A registry on 127.0.0.1 serves it once to ``npm cache add`` and stops; from
    then on npm runs with ``npm_config_offline=true`` and never asks a registry.
    """
    package = root / "qx-demo-dep"
    package.mkdir()
    (package / "package.json").write_text(json.dumps({"name": "qx-demo-dep", "version": "1.0.0",
                                                      "main": "index.js"}))
    (package / "index.js").write_text(DEP_INDEX_JS)
    env = {"npm_config_cache": str(root / "cache"), "npm_config_offline": "true",
           "npm_config_update_notifier": "false", "npm_config_audit": "false",
           "npm_config_fund": "false"}
    subprocess.run([NPM, "pack", str(package)], cwd=root, env=dict(os.environ, **env), check=True,
                   capture_output=True, timeout=120)
    server = _loopback_registry((root / "qx-demo-dep-1.0.0.tgz").read_bytes())
    env["npm_config_registry"] = "http://127.0.0.1:%d/" % server.server_address[1]
    try:
        subprocess.run([NPM, "cache", "add", "qx-demo-dep@1.0.0"], cwd=root, check=True,
                       env=dict(os.environ, **{**env, "npm_config_offline": "false"}),
                       capture_output=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    return env


def _loopback_registry(tarball):
    """A one-package npm registry on 127.0.0.1, serving in a thread."""
    import base64
    import http.server
    import threading

    class Registry(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            base = "http://127.0.0.1:%d" % self.server.server_address[1]
            body = tarball if self.path.endswith(".tgz") else json.dumps({
                "name": "qx-demo-dep", "dist-tags": {"latest": "1.0.0"},
                "versions": {"1.0.0": {"name": "qx-demo-dep", "version": "1.0.0", "main": "index.js", "dist": {
                    "tarball": base + "/qx-demo-dep/-/qx-demo-dep-1.0.0.tgz",
                    "shasum": hashlib.sha1(tarball).hexdigest(),
                    "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()}}}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# Settings: .env and the environment #########################################

class TestEnvFile(unittest.TestCase):
    def test_parse(self):
        text = ('# comment\n\nexport token=abc\nname = "my worker" # c\n'
                "quoted='a # b'\nbare=x # tail\nempty=\nLOG_LEVEL=debug\n  # indented\n")
        self.assertEqual(w.parse_env(text), {"token": "abc", "name": "my worker",
                                             "quoted": "a # b", "bare": "x", "empty": "",
                                             "LOG_LEVEL": "debug"})

    def test_environment_wins_and_writer_keeps_keys(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / ".env"
            path.write_text("# keep me\ntoken=old\nother=1\n")
            w.write_env_file(path, {"token": "new value", "transferEncryptToken": "k" * 32})
            self.assertEqual(path.stat().st_mode & 0o777, 0o600)
            text = path.read_text()
            self.assertIn("# keep me", text)
            self.assertEqual(w.read_env_file(path),
                             {"token": "new value", "other": "1", "transferEncryptToken": "k" * 32})
            with patched_environ({"other": "from-env", "batchSize": "7"}):
                loaded = w.load_env(path)
            self.assertEqual(loaded["other"], "from-env")
            self.assertEqual(loaded["batchSize"], "7")  # a setting from the environment alone
            self.assertNotIn("PATH", loaded)

    def test_readme_and_env_example_name_every_setting(self):
        readme, example = (HERE / "README.md").read_text(), (HERE / ".env.example").read_text()
        row = next(line for line in readme.splitlines() if line.startswith("| `new Worker("))
        for name, field in w.Settings.__dataclass_fields__.items():
            key = field.metadata["key"]
            self.assertIn("| `%s` |" % key, readme)  # the settings table
            self.assertRegex(example, r"\n#?%s=" % key)
            if name != "master_seed":  # master.py's alone
                self.assertRegex(row, r"[(, ]%s[,)]" % name)  # JS API to Python API


    def test_unknown_keys_are_named_with_the_key_meant(self):
        # issue 25: concurency=2, getbatch=true and batchsize=50 were ignored without a word.
        # The JS worker's and master's env.sample keys (LOG_LEVEL=fatal too) and master.py's
        # masterSeed are settings: never called unknown.
        js_keys = {"token": "t" * 20, "transferEncryptToken": KEY, "getBatch": "true", "batchSize": "5",
                   "LOG_LEVEL": "fatal", "seed": w.make_seed(), "masterSeed": w.make_seed()}
        with self.assertLogs("worker", "WARNING") as logs:
            settings = w.Settings.load({**js_keys, "concurency": "2", "getbatch": "true", "batchsize": "50",
                                        "NODE_ENV": "production"})
        self.assertEqual([line.split(":", 2)[2] for line in logs.output], [
            "unknown key 'concurency' (did you mean concurrency?): " + UNKNOWN_KEY,
            "unknown key 'getbatch' (did you mean getBatch?): " + UNKNOWN_KEY,
            "unknown key 'batchsize' (did you mean batchSize?): " + UNKNOWN_KEY,
            "unknown key 'NODE_ENV': " + UNKNOWN_KEY])
        self.assertEqual((settings.concurrency, settings.batch_size, settings.get_batch), (1, 5, True))
        with self.assertNoLogs("worker", "WARNING"):
            w.Settings.load({**js_keys, **w.read_env_file(HERE / ".env.example")})

    def test_every_key_has_its_range(self):
        # issue 25: these were taken as they were, or ended in a traceback or a wrong port later
        for key, bad in (("statusPort", "99999"), ("statusPort", "0"), ("peers", "127.0.0.1:99999"),
                         ("peers", "127.0.0.1:1,nohost"), ("port", "70000"), ("port", "-1"), ("maxMessage", "0"),
                         ("maxMessage", str(1 << 40)), ("maxInbound", "-1"), ("maxPeers", "0"),
                         ("getBatch", "maybe"), ("lsd", "2"), ("dht", "enabled"), ("dhtPort", "65536"),
                         ("dhtBootstrap", "router.example"), ("batchSize", "10001"), ("jobTimeout", "inf"),
                         ("stopTimeout", "1e999"), ("concurrency", "100000"), ("LOG_LEVEL", "loud"),
                         ("taskRunner", "threads")):
            with self.subTest(key=key, value=bad), self.assertRaisesRegex(w.WorkerError, "^%s=%r: give " % (
                    key, bad)):
                w.Settings.load({key: bad})
        edges = w.Settings.load({"port": "65535", "statusPort": "OFF", "peers": "[::1]:1,a:65535",
                                 "maxMessage": "65536", "maxInbound": "1", "maxPeers": "1", "getBatch": "Yes",
                                 "lsd": "off", "dhtPort": "0", "batchSize": "10000", "taskRunner": "Thread"})
        self.assertEqual((edges.port, edges.status_port, edges.peers, edges.max_message, edges.get_batch,
                          edges.lsd, edges.batch_size, edges.task_runner),
                         (65535, None, ("[::1]:1", "a:65535"), 65536, True, False, 10000, "thread"))
        self.assertEqual(w.Settings.load({"statusPort": "9184"}).status_port, 9184)


#: The end of each line for an unknown key.
UNKNOWN_KEY = 'it is ignored (README, "Settings", lists every key)'


# Helper, Logger, Crypt ######################################################

class TestLogger(unittest.TestCase):
    def test_log_file_takes_any_text(self):
        """A task's error message may hold a lone surrogate (a file name that is not UTF-8)."""
        saved = w.log.handlers[:], w.log.level, w.log.propagate
        self.addCleanup(lambda: (setattr(w.log, "handlers", saved[0]), w.log.setLevel(saved[1]),
                                 setattr(w.log, "propagate", saved[2])))
        tmp = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, tmp)
        stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as most streams are
        w.Logger("info", str(tmp / "worker.log"), stream=stream)
        with mock.patch.object(logging.Handler, "handleError", side_effect=AssertionError("a logging error")):
            w.log.warning("job 1 failed: ValueError: %s", b"caf\xe9".decode(errors="surrogateescape"))
        for handler in w.log.handlers:
            handler.flush()
            handler.close()
        self.assertIn("job 1 failed: ValueError: caf\\udce9", (tmp / "worker.log").read_text())
        self.assertIn(b"job 1 failed: ValueError: caf\\udce9", stream.buffer.getvalue())

    def test_a_log_file_that_cannot_be_written_is_one_error(self):
        saved = w.log.handlers[:], w.log.level, w.log.propagate
        self.addCleanup(lambda: (setattr(w.log, "handlers", saved[0]), w.log.setLevel(saved[1]),
                                 setattr(w.log, "propagate", saved[2])))
        with self.assertRaisesRegex(w.WorkerError, r"^logFile='/nonexistent/worker.log': cannot write it "
                                    r"\(No such file or directory\): give a file in a folder this user may write$"):
            w.Logger("info", "/nonexistent/worker.log", stream=io.StringIO())


class TestCrypt(unittest.TestCase):
    KEY = "0123456789abcdef0123456789abcdef"

    def test_roundtrip_fresh_iv(self):
        crypt = w.Crypt(self.KEY)
        one, two = crypt.encrypt("hello é"), crypt.encrypt("hello é")
        self.assertNotEqual(one["iv"], two["iv"])
        self.assertEqual(len(one["iv"]), 32)
        self.assertEqual(crypt.decrypt(one), "hello é")
        self.assertEqual(crypt.decrypt_json(crypt.encrypt_json({"a": [1]})), {"a": [1]})

    @full_tier
    def test_matches_openssl_cbc(self):
        need(shutil.which("node"), "node is needed to cross-check AES with Node's crypto")
        crypt = w.Crypt(self.KEY)
        box = crypt.encrypt('{"id":1}')
        script = ("const c=require('crypto');const d=c.createDecipheriv('aes-256-cbc',"
                  "Buffer.from(process.argv[1]),Buffer.from(process.argv[2],'hex'));"
                  "process.stdout.write(Buffer.concat([d.update(Buffer.from(process.argv[3],'hex')),"
                  "d.final()]).toString())")
        out = subprocess.run(["node", "-e", script, self.KEY, box["iv"], box["encryptedData"]],
                             capture_output=True, text=True, check=True).stdout
        self.assertEqual(out, '{"id":1}')

    def test_bad_key_length(self):
        with self.assertRaisesRegex(w.CryptError, "exactly 32"):
            w.Crypt("short")

    def test_wrong_key_says_so(self):
        box = w.Crypt(self.KEY).encrypt("x" * 40)
        with self.assertRaisesRegex(w.CryptError, "transferEncryptToken probably differs"):
            w.Crypt("f" * 32).decrypt(box)
        with self.assertRaises(w.CryptError):
            w.Crypt(self.KEY).decrypt({"iv": "zz", "encryptedData": ""})


# Codecs: bencode, base58, RIPEMD-160 ########################################

class TestCodecs(unittest.TestCase):
    def test_bencode_js_rules(self):
        self.assertEqual(w.bencode({"b": True, "a": False, "c": None, "d": 2.9, "e": [1, None]}),
                         b"d1:ai0e1:bi1e1:di2e1:eli1eee")
        self.assertEqual(w.bencode("é"), b"2:\xc3\xa9")
        self.assertEqual(w.bdecode(b"d1:ai-3e1:bl1:xee"), {"a": -3, "b": [b"x"]})

    def test_bdecode_rejects_with_decode_error_only(self):
        for bad in [b"", b"i", b"ie", b"i1", b"5:abc", b"d1:ae", b"di1ei2ee", b"l",
                    b"x", b"i1ei2e", b"99999999999:x", b"d" * 1000 + b"e" * 1000, b"i--1e",
                    b"1_0:0123456789", b"3 :abc", b"l3 :abce", b"+3:abc"]:
            with self.assertRaises(w.DecodeError, msg=bad):
                w.bdecode(bad)

    def test_base58(self):
        for raw in [b"", b"\0", b"\0\0\1", os.urandom(32)]:
            self.assertEqual(w.b58decode(w.b58encode(raw)), raw)
        with self.assertRaises(w.DecodeError):
            w.b58decode("0OIl")
        seed = w.make_seed()
        broken = seed[:-1] + ("2" if seed[-1] != "2" else "3")
        with self.assertRaises(w.DecodeError):
            w.b58check_decode(broken)

    def test_ripemd160_fallback_matches(self):
        for n in (0, 1, 55, 56, 64, 119, 1000):
            data = os.urandom(n)
            self.assertEqual(w._ripemd160_py(data), w.ripemd160(data))
        self.assertEqual(w._ripemd160_py(b"abc").hex(), "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc")


# bugout: identity, packets, BugoutCore (vectors made by the real JS code) ####

class TestVectors(unittest.TestCase):
    def test_torrent_and_handshake(self):
        infohash, info = w.infohash_of(vector_swarm())
        self.assertEqual(info.hex(), vectors()["torrent"]["info_bencoded_hex"])
        self.assertEqual(len(info), vectors()["torrent"]["info_bencoded_len"])
        self.assertEqual(infohash.hex(), vectors()["torrent"]["infoHash_hex"])
        bt = vectors()["bittorrent"]
        peer_id = b"-WW0109-AAAAAAAAAAAA"
        self.assertEqual(w.handshake_bytes(infohash, peer_id, dht=True).hex(),
                         bt["example_handshake_with_dht_hex"])
        self.assertEqual(w.handshake_bytes(infohash, peer_id).hex(),
                         bt["example_handshake_without_dht_hex"])

    def test_captured_handshakes_parse(self):
        infohash, _ = w.infohash_of(vector_swarm())
        for msg in vectors()["bittorrent"]["captured_first_messages"]:
            if msg["type"] == "handshake":
                wire = w.PeerWire(infohash, b"-QP0100-xxxxxxxxxxxx", {}, initiator=True)
                wire.receive_data(bytes.fromhex(msg["hex"]))
                [event] = wire.events_received()
                self.assertEqual(event.peer_id, bytes.fromhex(msg["hex"])[48:])
            if msg["type"] == "extended" and "dict" in msg:
                self.assertEqual(w.bencode(msg["dict"]).decode(), msg["dict_bencoded"])

    def test_keys_and_addresses(self):
        for role in ("master", "worker"):
            keys = vectors()["keys"][role]
            seed = w.make_seed(bytes.fromhex(keys["seed_material_hex"]))
            self.assertEqual(seed, keys["seed_bs58check"])
            self.assertEqual(w.b58check_decode(seed).hex(), keys["seed_decoded_hex"])
            ident = identity(role)
            self.assertEqual(ident.sign_public.hex(), keys["sign_public_key_hex"])
            self.assertEqual(ident.sign_secret.hex(), keys["sign_secret_key_hex"])
            self.assertEqual(ident.pk, keys["pk_bs58"])
            self.assertEqual(ident.ek, keys["ek_bs58"])
            self.assertEqual(ident.box_public.hex(), keys["ek_public_key_hex"])
            self.assertEqual(ident.address, keys["address"])
            digest = hashlib.sha512(ident.sign_public).digest()
            self.assertEqual(digest.hex(), keys["sha512_of_pk_hex"])
            self.assertEqual(w.ripemd160(digest).hex(), keys["ripemd160_of_sha512_hex"])
            self.assertEqual(w._ripemd160_py(digest).hex(), keys["ripemd160_of_sha512_hex"])
            self.assertEqual(w.b58check_decode(ident.address).hex(), keys["address_payload_hex"])
        for extra in vectors()["extra_seed_vectors"]:
            ident = w.Identity(w.make_seed(bytes.fromhex(extra["seed_material_hex"])))
            self.assertEqual(ident.seed, extra["seed_bs58check"])
            self.assertEqual(ident.pk, extra["pk_bs58"])
            self.assertEqual(ident.sign_public.hex(), extra["sign_public_key_hex"])
            self.assertEqual(ident.address, extra["address"])

    def test_extended_handshake(self):
        for role in ("master", "worker"):
            keys = vectors()["keys"][role]
            node = w.Bugout(vector_swarm(), seed=keys["seed_bs58check"], lsd=False, dht=False, trackers=[])
            node.identity = identity(role)
            node._extended.update(pk=node.identity.pk, ek=node.identity.ek)
            self.assertEqual(w.bencode(node._extended).hex(),
                             keys["full_extended_handshake_bencoded_hex"])
            wire = node._new_wire(initiator=False)
            infohash, _ = w.infohash_of(vector_swarm())
            wire.receive_data(w.handshake_bytes(infohash, b"-WW0109-AAAAAAAAAAAA", dht=True))
            out = wire.data_to_send()
            self.assertEqual(out[:68], w.handshake_bytes(infohash, node.peer_id))
            framed = bytes.fromhex(keys["full_extended_handshake_message_hex"])
            self.assertEqual(out[68:68 + len(framed)], framed)
            self.assertEqual(out[68 + len(framed):], bytes.fromhex("000000010e"))

    def test_rpc_call_envelope_and_frame(self):
        vec = vectors()["rpc_isMaster"]
        master, worker = identity("master"), identity("worker")
        t = vectors()["fixed"]["t_ms"]
        core = w.BugoutCore(vector_swarm(), worker,
                            random=prng(d["label"] for d in vec["random_draws_in_order"]))
        core.peers[master.address] = w.PeerKeys(master.pk, master.ek, t)
        nonce = core.send_call(master.address, "isMaster", {}, t)
        self.assertEqual(nonce.hex(), vec["inner_packet_fields"]["rn"]["hex"])
        [(payload, origin)] = core.data_to_send()
        self.assertIsNone(origin)
        self.assertEqual(payload.hex(), vec["envelope_hex"])
        self.assertEqual(hashlib.sha512(payload).digest()[16:].hex(), vec["seen_hash_hex"])
        wire = self._open_wire({"bo_channel": 4})
        wire.send_extension(payload)
        self.assertEqual(wire.data_to_send().hex(), vec["framed_message_hex"])
        # the signed packet inside, and the master opening it
        self.assertIn(vec["signed_packet_hex"], w.bencode({"s": bytes.fromhex(vec["signature_hex"]),
                                                           "p": bytes.fromhex(vec["p_bencoded_hex"])}).hex())
        mcore = w.BugoutCore(vector_swarm(), master)
        events = mcore.receive_payload(payload, t + 1)
        self.assertEqual(events, [w.Seen(worker.address),
                                  w.Call(worker.address, "isMaster", {}, nonce)])

    def test_rpc_response_opens(self):
        vec = vectors()["rpc_isMaster"]
        master, worker = identity("master"), identity("worker")
        t = vectors()["fixed"]["t_ms"]
        core = w.BugoutCore(vector_swarm(), worker)
        events = core.receive_payload(bytes.fromhex(vec["response"]["payload_hex"]), t + 5)
        self.assertEqual(events[-1], w.Response(master.address, bytes.fromhex("59594df1817116e3"),
                                                vec["callback_result"]))
        wire = self._open_wire({"bo_channel": 4})
        wire.send_extension(bytes.fromhex(vec["response"]["payload_hex"]))
        self.assertEqual(wire.data_to_send().hex(), vec["response"]["framed_hex"])

    def test_exchange_log_opens_and_pings_reproduce(self):
        t = vectors()["fixed"]["t_ms"]
        ids = {"master": identity("master"), "worker": identity("worker")}
        for entry in vectors()["exchange_log"]:
            payload = bytes.fromhex(entry["payload_hex"])
            self.assertEqual(hashlib.sha512(payload).digest()[16:].hex(), entry["seen_hash_hex"])
            core = w.BugoutCore(vector_swarm(), ids[entry["to"]])
            events = core.receive_payload(payload, t + 10)
            decoded = entry["decoded_by_receiver"]
            sender = ids[entry["from"]] if decoded.get("packet") else None
            if sender is None:
                continue
            if decoded["packet"]["pk"] == ids[entry["to"]].pk:
                self.assertEqual(events, [])  # our own packet echoed back
            else:
                self.assertTrue(events, entry["step"])
            if decoded["packet"]["y"] == "p" and decoded["packet"]["pk"] == sender.pk:
                label = {d["hex"]: d["label"] for d in vectors()["handshake_phase_random_draws"]}[
                    decoded["packet"]["n"]["hex"]]
                again = w.BugoutCore(vector_swarm(), sender, random=prng([label]))
                again.send_ping(t)
                [(mine, _)] = again.data_to_send()
                self.assertEqual(mine, payload)
                self.assertEqual(bytes.fromhex(entry["framed_hex"])[6:], payload)

    @staticmethod
    def _open_wire(remote_m):
        infohash, _ = w.infohash_of(vector_swarm())
        wire = w.PeerWire(infohash, b"-QP0100-xxxxxxxxxxxx", {}, initiator=True)
        wire.receive_data(w.handshake_bytes(infohash, b"-WW0109-AAAAAAAAAAAA"))
        ext = w.bencode({"m": remote_m})
        wire.receive_data(w.frame(20, b"\0" + ext))
        wire.data_to_send()
        wire.events_received()
        return wire


class TestBugoutCore(unittest.TestCase):
    def setUp(self):
        self.a = w.BugoutCore(vector_swarm(), w.Identity())
        self.b = w.BugoutCore(vector_swarm(), w.Identity())
        self.now = w._now()
        self.a.saw_peer(self.b.identity.pk, self.b.identity.ek, self.now)
        self.b.saw_peer(self.a.identity.pk, self.a.identity.ek, self.now)
        self.a.data_to_send(), self.b.data_to_send()

    def deliver(self, src, dst):
        events = []
        for payload, _ in src.data_to_send():
            events += dst.receive_payload(payload, self.now, origin="wire")
        return events

    def test_call_response_and_messages(self):
        nonce = self.a.send_call(self.b.identity.address, "f", {"x": "é"}, self.now)
        [call] = self.deliver(self.a, self.b)
        self.assertEqual(call, w.Call(self.a.identity.address, "f", {"x": "é"}, nonce))
        self.assertEqual(self.b.data_to_send(), [])  # boxed for b: not relayed
        self.b.send_response(call.address, nonce, [1, 2], self.now)
        self.assertEqual(self.deliver(self.b, self.a), [w.Response(self.b.identity.address, nonce, [1, 2])])
        self.a.send_message({"hi": 1}, self.now)
        self.assertEqual(self.deliver(self.a, self.b), [w.Message(self.a.identity.address, {"hi": 1}, False)])
        [(_relayed, origin)] = self.b.data_to_send()  # plain: relayed to the other wires
        self.assertEqual(origin, "wire")
        self.a.send_message("secret", self.now, address=self.b.identity.address)
        self.assertEqual(self.deliver(self.a, self.b), [w.Message(self.a.identity.address, "secret", True)])

    def test_duplicates_bad_signature_old_and_foreign_dropped(self):
        self.a.send_ping(self.now)
        [(payload, _)] = self.a.data_to_send()
        self.assertEqual(self.b.receive_payload(payload, self.now), [w.Ping(self.a.identity.address)])
        self.assertEqual(self.b.receive_payload(payload, self.now), [])
        self.assertEqual(self.b.stats["duplicate"], 1)
        signed = w.bdecode(payload)
        forged = w.bencode({"s": bytes(64), "p": signed["p"]})
        self.assertEqual(self.b.receive_payload(forged, self.now), [])
        self.assertEqual(self.b.stats["dropped: bad signature"], 1)
        old = self.a.make_packet({"y": "p"}, self.now - w.PEER_TIMEOUT_MS)
        self.assertEqual(self.b.receive_payload(old, self.now), [])
        other = w.BugoutCore("another swarm", self.a.identity)
        self.assertEqual(self.b.receive_payload(other.make_packet({"y": "p"}, self.now), self.now), [])
        self.assertEqual(self.b.stats["dropped: too old"], 1)
        self.assertEqual(self.b.stats["dropped: other identifier"], 1)

    def test_leave_and_expiry(self):
        self.a.send_leave(self.now)
        self.assertEqual(self.deliver(self.a, self.b), [w.Left(self.a.identity.address, "left")])
        self.assertNotIn(self.a.identity.address, self.b.peers)
        self.assertEqual(self.a.expire(self.now + w.PEER_TIMEOUT_MS + 1),
                         [w.Left(self.b.identity.address, "timeout")])

    def test_a_peer_started_again_is_known_by_its_signed_new_key_never_by_a_claim(self):
        # issue 25: after kill -9 of master.py the worker boxed its calls for the dead process's
        # key; the new process could not open them, and the worker waited 30 s
        a = self.a.identity.address
        self.a.send_ping(self.now)
        self.assertEqual(self.deliver(self.a, self.b), [w.Ping(a)])  # its keys are proven
        again = w.BugoutCore(vector_swarm(), w.Identity(self.a.identity.seed))  # same address, new box key
        again.saw_peer(self.b.identity.pk, self.b.identity.ek, self.now)
        again.data_to_send()
        nonce = self.b.send_call(a, "isMaster", {}, self.now)
        self.assertEqual(self.deliver(self.b, again), [])  # boxed for the old key: unreadable
        self.assertEqual(self.b.saw_peer(again.identity.pk, again.identity.ek, self.now), [])  # a claim
        again.send_ping(self.now)
        self.assertEqual(self.deliver(again, self.b), [w.Rekeyed(a), w.Ping(a)])  # signed: proven
        self.b.send_call(a, "isMaster", {}, self.now, nonce=nonce)  # what the node does then
        self.assertEqual(self.deliver(self.b, again), [w.Call(self.b.identity.address, "isMaster", {}, nonce)])
        again.send_ping(self.now + 1)
        self.assertEqual(self.deliver(again, self.b), [w.Ping(a)])  # the same key: nothing new

    def test_an_old_process_packet_replayed_does_not_change_a_peers_key(self):
        # a proof is fresh or nothing: the dead process's signed ping, replayed 11 s after it was
        # made to a worker that never saw it, keeps the new process's key
        a = self.a.identity.address
        self.a.send_ping(self.now)
        [(old_ping, _)] = self.a.data_to_send()
        again = w.BugoutCore(vector_swarm(), w.Identity(self.a.identity.seed))  # started again
        fresh = w.BugoutCore(vector_swarm(), w.Identity())  # a worker that never saw the old ping
        again.send_ping(self.now + 11_000)
        [(new_ping, _)] = again.data_to_send()
        fresh.receive_payload(new_ping, self.now + 11_000)
        self.assertEqual(fresh.peers[a].ek, again.identity.ek)
        self.assertEqual(fresh.receive_payload(old_ping, self.now + 11_000), [w.Ping(a)])
        self.assertEqual(fresh.peers[a].ek, again.identity.ek)  # not the dead key
        self.assertEqual(fresh.stats["stale key"], 1)
        # a peer whose clock is a minute behind, started again: its newer packet is taken
        skewed, other = w.BugoutCore(vector_swarm(), w.Identity()), w.BugoutCore(vector_swarm(), w.Identity())
        s = skewed.identity.address
        skewed.send_ping(self.now - 60_000)
        [(first, _)] = skewed.data_to_send()
        self.assertIn(w.Ping(s), other.receive_payload(first, self.now))
        restarted = w.BugoutCore(vector_swarm(), w.Identity(skewed.identity.seed))
        restarted.send_ping(self.now - 59_000)
        [(second, _)] = restarted.data_to_send()
        self.assertEqual(other.receive_payload(second, self.now + 1_000), [w.Rekeyed(s), w.Ping(s)])
        self.assertEqual(other.peers[s].ek, restarted.identity.ek)

    def test_seen_cache_is_bounded(self):
        core = w.BugoutCore(vector_swarm(), w.Identity(), seen_limit=100)
        for i in range(1000):
            core.receive_payload(b"junk %d" % i, self.now)
        self.assertLessEqual(len(core._seen), 100)
        self.assertEqual(core.stats["dropped"], 1000)

    def test_own_sends_do_not_flush_what_was_just_received(self):
        core = w.BugoutCore(vector_swarm(), w.Identity(), seen_limit=4)  # a generation holds 2
        self.b.send_message("first", self.now)
        self.b.send_message("second", self.now)
        [(first, _), (second, _)] = self.b.data_to_send()
        self.assertTrue(core.receive_payload(first, self.now))  # and a ping: the generation is full
        core.send_message("mine", self.now)  # this send starts the next generation
        core.receive_payload(second, self.now + 1)
        self.assertEqual(core.receive_payload(first, self.now + 2), [])  # still known
        self.assertEqual(core.stats["duplicate"], 1)


    def test_verified_names_the_signer_its_time_and_how_it_came(self):
        a = self.a.identity.address
        self.a.send_ping(self.now)
        [(ping, _)] = self.a.data_to_send()
        self.b.receive_payload(ping, self.now + 5)
        self.assertEqual(self.b.verified, w.Verified(a, self.now, "p", False))
        self.b.receive_payload(ping, self.now + 5)  # a copy: nothing passed; it names what it copies
        self.assertIsNone(self.b.verified)
        self.assertEqual(self.b.copied, w.Verified(a, self.now, "p", False))
        nonce = self.a.send_call(self.b.identity.address, "f", {}, self.now)
        self.deliver(self.a, self.b)
        self.assertEqual(self.b.verified, w.Verified(a, self.now, "r", True))
        self.b.awaiting = set()
        self.b.send_response(a, nonce, 1, self.now)
        answer = self.b.data_to_send()[-1].payload
        self.a.awaiting = set()  # an answer to no call of ours: dropped, and proves nothing
        self.a.receive_payload(answer, self.now)
        self.assertIsNone(self.a.verified)
        self.b.receive_payload(b"junk", self.now)
        self.assertIsNone(self.b.verified)
        self.b.send_ping(self.now)
        [own] = [out.payload for out in self.b.data_to_send() if not out.relay]
        self.b.receive_payload(own, self.now)  # our own, echoed back: a copy of nothing we took
        self.assertIsNone(self.b.verified or self.b.copied)

    def test_a_hello_is_a_ping_for_one_peer_alone(self):
        hello = self.a.hello_for(self.b.identity.ek, self.now)
        self.assertEqual(self.a.data_to_send(), [])  # the caller sends it, on one wire
        self.assertEqual(self.b.receive_payload(hello, self.now, origin="wire"), [w.Ping(self.a.identity.address)])
        self.assertEqual(self.b.verified, w.Verified(self.a.identity.address, self.now, "p", True))
        self.assertEqual(self.b.data_to_send(), [])  # boxed for b: never relayed
        third = w.BugoutCore(vector_swarm(), w.Identity())
        self.assertEqual(third.receive_payload(self.a.hello_for(self.b.identity.ek, self.now), self.now), [])
        self.assertIsNone(third.verified)  # another's hello: it cannot open it
        with self.assertRaises(w.DecodeError):
            self.a.hello_for("not a key", self.now)


    def test_a_peer_greeted_on_a_wire_of_its_own_gets_no_broadcast_ping(self):
        core, one, two = w.BugoutCore(vector_swarm(), w.Identity()), w.Identity(), w.Identity()
        core.hello_for(one.ek, self.now)  # sent on its wire; then its handshake's keys
        self.assertEqual(core.saw_peer(one.pk, one.ek, self.now), [w.Seen(one.address)])
        core.tick(self.now + w.HELLO_GAP_MS)
        self.assertEqual(core.data_to_send(), [])  # its hello went on its wire: no ping to all
        self.assertEqual(core.saw_peer(two.pk, two.ek, self.now + 1), [w.Seen(two.address)])
        [ping] = core.data_to_send()  # one seen only so (a relayed packet, a JS peer's wire): as bugout
        self.assertEqual((ping.to, ping.relay, w.bdecode(w.bdecode(ping.payload)["p"])["y"]), (None, False, b"p"))
        for _ in range(w.GREETED_KEPT + 5):
            core.hello_for(w.Identity().ek, self.now)
        self.assertEqual(len(core._greeted), w.GREETED_KEPT)  # bounded, whatever wires claim


class TestCoreBounds(unittest.TestCase):
    """BugoutCore: what it relays, the JSON it takes, the peers it admits."""

    def setUp(self):
        self.now = w._now()
        self.core = w.BugoutCore(vector_swarm(), w.Identity())
        self.peer = w.Identity()

    def relayed(self, payload, source="10.0.0.9"):
        self.core.receive_payload(payload, self.now, origin="wire", source=source)
        return [out.payload for out in self.core.data_to_send() if out.relay]

    def test_relays_only_verified_packets_and_envelopes(self):
        ping = signed_by(self.peer, {"y": "p"}, t=self.now)
        outer = w.bdecode(ping)
        other = w.BugoutCore(vector_swarm(), w.Identity())
        other.peers[self.peer.address] = w.PeerKeys(self.peer.pk, self.peer.ek, self.now)
        other.send_message("for someone else", self.now, self.peer.address)
        [envelope] = [out.payload for out in other.data_to_send()]
        bad_envelope = w.bencode({**w.bdecode(envelope), "n": b"short"})
        for junk in (b"not bencode at all", w.bencode({"s": bytes(64), "p": outer["p"]}),
                     signed_by(self.peer, {"y": "p"}, identifier="another swarm", t=self.now),
                     signed_by(self.peer, {"y": "p"}, t=self.now - w.PEER_TIMEOUT_MS), bad_envelope,
                     w.bencode([1, 2]), os.urandom(4096)):
            self.assertEqual(self.relayed(junk), [], junk[:40])
        self.assertEqual(self.core.stats["relayed"], 0)
        self.assertEqual(self.relayed(ping), [ping])  # verified: passed on
        self.assertEqual(self.relayed(envelope), [envelope])  # boxed for another: passed on unopened
        self.assertEqual(self.core.stats["dropped"], 7)

    def test_json_is_bounded_in_depth_and_size_and_the_message_dropped(self):
        def message(value):
            events = self.core.receive_payload(
                signed_by(self.peer, {"y": "m", "v": value}, t=self.now), self.now)
            return [e.value for e in events if isinstance(e, w.Message)]
        depth = w.MAX_JSON_DEPTH
        self.assertEqual(message("[" * depth + "]" * depth), [json.loads("[" * depth + "]" * depth)])
        self.assertEqual(message("[" * (depth + 1) + "]" * (depth + 1)), [])
        self.assertEqual(message("[" * 100_000 + "]" * 100_000), [])  # ~200 KB: RecursionError today
        self.assertEqual(message('["' + "[" * 5000 + '"]'), [["[" * 5000]])  # brackets in a string
        self.assertEqual(self.core.stats["dropped: JSON nested too deeply"], 2)
        small = w.BugoutCore(vector_swarm(), w.Identity(), max_json=1000)
        call = signed_by(self.peer, {"y": "r", "c": "echo", "a": json.dumps(["x" * 2000]), "rn": b"12345678"},
                         t=self.now)
        self.assertEqual(small.receive_payload(call, self.now), [w.Seen(self.peer.address)])
        self.assertEqual(small.stats["dropped: JSON over the size limit"], 1)

    def test_answers_are_taken_only_for_calls_awaited(self):
        caller = w.BugoutCore(vector_swarm(), self.peer)
        caller.saw_peer(self.core.identity.pk, self.core.identity.ek, self.now)
        self.core.saw_peer(self.peer.pk, self.peer.ek, self.now)
        caller.data_to_send()
        self.core.awaiting = {b"expected"}
        for nonce, taken in ((b"whatever", False), (b"expected", True)):
            caller.send_response(self.core.identity.address, nonce, {"big": "x" * 1000}, self.now)
            [out] = caller.data_to_send()
            events = self.core.receive_payload(out.payload, self.now)
            self.assertEqual([e.nonce for e in events if isinstance(e, w.Response)],
                             [nonce] if taken else [])
        self.assertEqual(self.core.stats["dropped: answer to no call of ours"], 1)

    def test_peer_table_and_new_identities_per_address_are_bounded(self):
        core = w.BugoutCore(vector_swarm(), w.Identity(), max_peers=50)
        admitted = collections.Counter()
        for source in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
            for _ in range(40):
                events = core.receive_payload(signed_by(w.Identity(), {"y": "p"}, t=self.now),
                                              self.now, origin="wire", source=source)
                admitted[source] += any(isinstance(e, w.Seen) for e in events)
        self.assertEqual(admitted["10.0.0.1"], w.NEW_PEERS_BURST)  # then one a second
        self.assertEqual(len(core.peers), 50)
        self.assertEqual(admitted["10.0.0.3"], 0)
        self.assertEqual(core.stats["dropped: new identities over the rate"], 40 - w.NEW_PEERS_BURST)
        self.assertEqual(core.stats["dropped: peer table full"], 40 + 40 - (50 - w.NEW_PEERS_BURST))
        later = self.now + 1000 * w.NEW_PEERS_BURST  # the source's bucket is full again, the table not
        refused = core.receive_payload(signed_by(w.Identity(), {"y": "p"}, t=later), later, source="10.0.0.1")
        self.assertEqual(refused, [])
        # a peer on a wire of its own (its handshake) takes the place of the one silent longest
        master = w.Identity()
        core.protected = {a for a in core.peers}  # ... unless all are protected
        self.assertEqual(core.saw_peer(master.pk, master.ek, later), [])
        core.protected = set(list(core.peers)[1:])
        oldest = next(iter(core.peers))
        self.assertEqual(core.saw_peer(master.pk, master.ek, later),
                         [w.Left(oldest, "evicted"), w.Seen(master.address)])
        self.assertEqual(len(core.peers), 50)

    def test_a_handshake_never_replaces_keys_a_signed_packet_gave(self):
        self.core.receive_payload(signed_by(self.peer, {"y": "p"}, t=self.now), self.now)
        self.assertTrue(self.core.peers[self.peer.address].verified)
        impostor = w.Identity()
        self.core.saw_peer(self.peer.pk, impostor.ek, self.now + 1)  # the master's pk, its own ek
        self.assertEqual(self.core.peers[self.peer.address].ek, self.peer.ek)
        self.core.send_message("secret", self.now, self.peer.address)
        [out] = [out for out in self.core.data_to_send() if out.to]
        opened = w.BugoutCore(vector_swarm(), self.peer).receive_payload(out.payload, self.now)
        self.assertIn(w.Message(self.core.identity.address, "secret", True), opened)


# The peer wire (BEP 3, 6, 10) ###############################################

class TestPeerWire(unittest.TestCase):
    def test_pair_handshakes_and_payloads(self):
        a, b = wire_pair()
        self.assertTrue(a.ready and b.ready)
        kinds = [type(e).__name__ for e in b.events_received()]
        self.assertEqual(kinds, ["Handshake", "ExtendedHandshake"])
        a.events_received()
        a.send_extension(b"hello")
        a.send_keepalive()
        a.send_extension(b"x" * 100_000)
        data = a.data_to_send()
        for i in range(0, len(data), 7):  # byte-dribbled
            b.receive_data(data[i:i + 7])
        self.assertEqual(b.events_received(), [w.ExtensionPayload(b"hello"),
                                               w.ExtensionPayload(b"x" * 100_000)])

    def test_metadata_served_and_requests_refused(self):
        _a, b = wire_pair()
        b.events_received()
        _, info = w.infohash_of(vector_swarm())
        b.receive_data(w.frame(20, bytes([1]) + w.bencode({"msg_type": 0, "piece": 0})))
        out = b.data_to_send()
        self.assertTrue(out.endswith(info))
        self.assertEqual(w.bdecode(out[6:-len(info)]), {"msg_type": 1, "piece": 0, "total_size": 88})
        b.receive_data(w.frame(20, bytes([1]) + w.bencode({"msg_type": 0, "piece": 3})))
        self.assertEqual(w.bdecode(b.data_to_send()[6:]), {"msg_type": 2, "piece": 3})
        request = struct.pack(">III", 0, 0, 12)
        b.receive_data(w.frame(6, request))
        self.assertEqual(b.data_to_send(), w.frame(16, request))
        for unknown in (w.frame(2), w.frame(5, b"\xff"), w.frame(99, b"abc"), w.frame(20, b"\x07zz")):
            b.receive_data(unknown)
        self.assertEqual(b.state, w.WireState.OPEN)
        self.assertEqual(b.events_received(), [])

    def test_huge_length_prefix_allocates_nothing(self):
        _a, b = wire_pair(max_message=1 << 20)
        b.receive_data(struct.pack(">I", 0xFFFFFFF0) + b"\x14\x04")
        self.assertEqual(b.state, w.WireState.ERROR)
        self.assertIn("over the limit", b.error)
        self.assertEqual(len(b._buffer), 0)

    def test_pending_names_one_message_and_what_it_lacks(self):
        a, b = wire_pair()
        self.assertIsNone(b.pending)
        a.send_extension(b"x" * 1000)
        a.send_extension(b"y" * 500)
        data = a.data_to_send()
        b.receive_data(data[:2])  # part of the length prefix
        first = b.pending
        self.assertEqual(first[1], 2)
        b.receive_data(data[2:400])
        self.assertEqual(b.pending, (first[0], 1006 - 400))  # the same message, 606 bytes short
        b.receive_data(data[400:1100])  # it ends; the next begins
        self.assertEqual(b.pending, (first[0] + 1, 506 - 94))
        b.receive_data(data[1100:])
        self.assertIsNone(b.pending)

    def test_garbage_handshake_is_an_error(self):
        infohash, _ = w.infohash_of(vector_swarm())
        for garbage in (b"GET / HTTP/1.1\r\n", b"\x13BitTorrent protocoX" + b"\0" * 48,
                        w.handshake_bytes(b"\1" * 20, b"-WW0109-AAAAAAAAAAAA")):
            wire = w.PeerWire(infohash, b"-QP0100-aaaaaaaaaaaa", {}, initiator=False)
            wire.receive_data(garbage)
            self.assertEqual(wire.state, w.WireState.ERROR, garbage)
            self.assertEqual(wire.data_to_send(), b"")


# Bad input, generated and mutated: bencode, packets, the wire ###############

class TestBadInput(unittest.TestCase):
    def test_bdecode_and_packet_opener(self):
        core = w.BugoutCore(vector_swarm(), identity("master"))
        count = 0
        for data in fuzz_inputs(12_000):
            try:
                w.bdecode(data)
            except w.DecodeError:
                pass
            core.receive_payload(data, w._now())  # never raises
            count += 1
        self.assertEqual(count, 12_000)
        self.assertGreater(core.stats["dropped"], 5_000)

    def test_wire_parser(self):
        rng = random.Random(99)
        infohash, info = w.infohash_of(vector_swarm())
        good = (w.handshake_bytes(infohash, b"-WW0109-AAAAAAAAAAAA", dht=True)
                + bytes.fromhex(vectors()["keys"]["master"]["full_extended_handshake_message_hex"])
                + bytes.fromhex(vectors()["rpc_isMaster"]["framed_message_hex"]) + b"\0\0\0\0"
                + bytes.fromhex("000000010e"))
        states = collections.Counter()
        for data in mutations([good], 10_000, rng):
            wire = w.PeerWire(infohash, b"-QP0100-aaaaaaaaaaaa", {"m": {}}, initiator=False,
                              metadata=info, max_message=1 << 16)
            cut = rng.randrange(len(data) + 1)
            wire.receive_data(data[:cut])
            wire.receive_data(data[cut:])
            wire.events_received()
            wire.data_to_send()
            states[wire.state] += 1
            self.assertLessEqual(len(wire._buffer), (1 << 16) + 4)
        self.assertGreater(states[w.WireState.ERROR], 100)
        self.assertGreater(states[w.WireState.OPEN], 100)


# Connections and TCP ########################################################

class TestTcp(AsyncTest):
    async def test_python_python_rpc_messages_and_reconnect(self):
        a = await self.started(py_node("tcp-swarm"))
        b = await self.started(py_node("tcp-swarm", peers=["127.0.0.1:%d" % a.port]))
        await until(lambda: a.address in b.peers and b.address in a.peers)
        self.assertEqual(await b.rpc(a.address, "echo", {"x": 1}), {"x": 1, "echoedBy": "py"})
        self.assertEqual(await a.rpc(b.address, "nope"), {"error": "No such API call."})
        a.send({"to": "all"})
        b.send("only a", address=a.address)
        await until(lambda: ("message", a.address, {"to": "all"}) in b.events
                    and ("message", b.address, "only a") in a.events)
        old = set(b._connections)
        for conn in list(a._connections):  # drop the wire: b dials again
            conn.close()
        await until(lambda: b.connections() == 1 and not (b._connections & old))
        self.assertEqual(await b.rpc(a.address, "echo", {"y": 2}, timeout=5), {"y": 2, "echoedBy": "py"})

    async def test_python_peers_greet_each_other_on_their_wire_alone(self):
        a = await self.started(py_node("greet-swarm"))
        b = py_node("greet-swarm", peers=["127.0.0.1:%d" % a.port])
        pings = [mock.patch.object(node.core, "send_ping", wraps=node.core.send_ping) for node in (a, b)]
        spies = [patch.start() for patch in pings]
        for patch in pings:
            self.addCleanup(patch.stop)
        await self.started(b)
        await until(lambda: a.has_signed_wire(b.address) and b.has_signed_wire(a.address))
        await asyncio.sleep(w.HELLO_GAP_MS / 1000 + 0.2)  # a hello that waited would be out by now
        self.assertEqual((a.stats["hellos sent"], b.stats["hellos sent"]), (1, 1))
        self.assertEqual([spy.call_count for spy in spies], [0, 0])  # no ping to every wire (N² copies)

    async def test_a_node_listening_on_one_address_dials_from_it(self):
        a = await self.started(py_node("source-swarm"))
        b = await self.started(w.Bugout("source-swarm", host="127.0.0.3", lsd=False, dht=False, trackers=[],
                                        peers=["127.0.0.1:%d" % a.port]))
        await until(lambda: a.has_signed_wire(b.address))
        self.assertEqual({c.remote_host for c in a._connections}, {"127.0.0.3"})  # its own, not 127.0.0.1
        self.assertEqual(w.sending_address("127.0.0.3", "127.0.0.1"), "127.0.0.3")
        self.assertEqual(w.sending_address("127.0.0.3"), "127.0.0.3")  # LSD: announces leave from it
        for host, target in (("0.0.0.0", "127.0.0.1"), ("127.0.0.3", "192.0.2.1"), ("192.0.2.7", "127.0.0.1"),
                             ("::1", "::1"), ("127.0.0.3", "example.org"), ("", None)):
            self.assertIsNone(w.sending_address(host, target), (host, target))  # the kernel picks

    async def test_rpc_fails_at_once_when_no_wire_is_left(self):
        a = await self.started(py_node("unreachable-swarm"))
        b = await self.started(py_node("unreachable-swarm", peers=["127.0.0.1:%d" % a.port]))
        called = asyncio.Event()

        async def hang(address, args):
            called.set()
            await asyncio.Event().wait()
        b.register("hang", hang)
        await until(lambda: a.address in b.peers and b.address in a.peers)
        call = asyncio.ensure_future(a.rpc(b.address, "hang", {}, timeout=60))
        await asyncio.wait_for(called.wait(), 10)
        for conn in list(a._connections):  # b's process "dies": no goodbye, the wire just closes
            conn.close()
        with self.assertRaises(w.RpcUnreachable):  # now, not after 60 s
            await asyncio.wait_for(call, 10)
        lonely = await self.started(py_node("unreachable-swarm"))
        with self.assertRaises(w.RpcUnreachable):
            await asyncio.wait_for(lonely.rpc(b.address, "echo", {}), 1)
        await until(lambda: a.address in b.peers and b.connections() == 1)  # b dials again
        self.assertEqual(await b.rpc(a.address, "echo", {}, timeout=5), {"echoedBy": "py"})

    async def test_rpc_to_a_peer_that_says_goodbye_fails_at_once_with_other_wires_up(self):
        a = await self.started(py_node("goodbye-swarm"))
        b = await self.started(py_node("goodbye-swarm", peers=["127.0.0.1:%d" % a.port]))
        await self.started(py_node("goodbye-swarm", peers=["127.0.0.1:%d" % a.port]))  # a stays wired
        called = asyncio.Event()

        async def hang(address, args):
            called.set()
            await asyncio.Event().wait()
        b.register("hang", hang)
        await until(lambda: b.address in a.peers and len(a.peers) == 2)
        call = asyncio.ensure_future(a.rpc(b.address, "hang", {}, timeout=60))
        await asyncio.wait_for(called.wait(), 10)
        await b.close()  # its goodbye (a master restarting, say): no answer will come from it
        with self.assertRaises(w.RpcUnreachable):
            await asyncio.wait_for(call, 5)

    async def test_malformed_host_names_are_unreachable_peers_not_crashes(self):
        self.assertEqual(await w.Dht(bytes(20), bootstrap=[])._resolve("router..example", 6881), [])
        with self.assertNoLogs("worker", "ERROR"):  # a failed internal task logs an error
            a = await self.started(py_node("bad-names", peers=["a..b:1"]))
            await asyncio.sleep(1.0)  # two dials, 0.5 s apart
            b = await self.started(py_node("bad-names", peers=["127.0.0.1:%d" % a.port]))
            await until(lambda: a.address in b.peers)
            await b.close()  # and no error while closing
            await a.close()

    async def test_garbage_peer_dropped_others_go_on(self):
        a = await self.started(py_node("garbage-swarm", max_message=1 << 16))
        b = await self.started(py_node("garbage-swarm", peers=["127.0.0.1:%d" % a.port]))
        await until(lambda: a.address in b.peers)
        infohash = a.infohash
        sent = []
        for garbage in (b"\xff" * 100, w.handshake_bytes(infohash, b"-XX0000-garbagegarba")
                        + struct.pack(">I", 1 << 30) + b"\x14", w.handshake_bytes(infohash, b"-XX0000-garbagegarbb")
                        + w.frame(20, b"\0not bencode")):
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            writer.write(garbage)
            await writer.drain()
            sent.append((reader, writer))
        for reader, writer in sent:
            rest = await asyncio.wait_for(reader.read(), 5)  # the server closes it
            self.assertIsInstance(rest, bytes)
            writer.close()
        self.assertGreaterEqual(a.stats["peers dropped for bad input"], 3)
        self.assertEqual(await b.rpc(a.address, "echo", {"still": "here"}), {"still": "here", "echoedBy": "py"})

    async def test_a_call_made_while_its_peer_had_no_wire_goes_on_the_wire_it_dials_in_by(self):
        a = await self.started(py_node("wireless-swarm"))
        b = await self.started(py_node("wireless-swarm"))
        c = await self.started(py_node("wireless-swarm", peers=["127.0.0.1:%d" % a.port]))  # a wire, not b's
        b.add_peer("127.0.0.1", a.port)
        await until(lambda: b.address in a.peers and c.address in a.peers, 5)
        for conn in [x for x in a._connections if x.address == b.address]:
            conn.close()  # b goes, without a goodbye (a restarting master, say)
        await until(lambda: not a.has_wire(b.address), 5)
        call = asyncio.ensure_future(a.rpc(b.address, "echo", {"late": 1}, timeout=20))  # failover's isMaster
        await asyncio.sleep(0.3)  # it went to c's wire, as spare traffic: nobody there can open it
        started = time.monotonic()
        b.add_peer("127.0.0.1", a.port)  # b dials in again
        self.assertEqual(await asyncio.wait_for(call, 5), {"late": 1, "echoedBy": "py"})
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(a._wireless, {})

    async def test_duplicate_wires_resolve_to_one(self):
        a = await self.started(py_node("dup-swarm"))
        b = await self.started(py_node("dup-swarm"))
        for _ in range(3):
            a.add_peer("127.0.0.1", b.port)
            b.add_peer("127.0.0.1", a.port)
        await until(lambda: a.address in b.peers and b.address in a.peers)
        await until(lambda: len(a._connections) == 1 and len(b._connections) == 1, 10)
        await asyncio.sleep(0.5)  # and no duplicate comes back
        self.assertEqual(len(a._connections), 1)
        self.assertEqual(len(b._connections), 1)
        self.assertEqual(await a.rpc(b.address, "echo", {}), {"echoedBy": "py"})


class TestEchoPacing(AsyncTest):
    """Our own payloads to a peer that echoes them (JS bugout) wait for their echoes; a silent
    wire is renewed (issue 20)."""

    async def echoing_pair(self, ident):
        """Node a wired to b, which echoes every payload it gets when told to (``echo()``)."""
        a = await self.started(py_node(ident))
        b = await self.started(py_node(ident, peers=["127.0.0.1:%d" % a.port]))
        await until(lambda: a.address in b.peers and b.address in a.peers)
        got, held = [], []
        handle = b.wire_events

        def wire_events(conn, events):
            for event in events:
                if isinstance(event, w.ExtensionPayload):
                    got.append(len(event.payload))
                    held.append((conn, event.payload))
            handle(conn, events)
        b.wire_events = wire_events

        def echo():
            for conn, payload in held:
                conn.send_payload(payload)
            held.clear()
        echo.held = held  # what b got and holds: a test may hand a its echoes itself
        conn = next(iter(a._connections))
        a.send("first")  # its echo shows that b echoes
        await until(lambda: held)
        echo()
        await until(lambda: conn.echoes)
        got.clear()
        return a, b, conn, got, echo

    @staticmethod
    def send_big(a, b, tag, count):
        """``count`` messages of ~1 KB from a to b, tagged and numbered."""
        for i in range(count):
            a.send({"tag": tag, "i": i, "pad": "x" * 1000}, address=b.address)

    def messages(self, node, tag):
        return [e for e in node.events if e[0] == "message" and isinstance(e[2], dict) and e[2].get("tag") == tag]

    async def test_what_is_not_echoed_stays_within_the_window(self):
        a, b, conn, got, echo = await self.echoing_pair("echo-window")
        self.send_big(a, b, "big", 20)
        await asyncio.sleep(0.3)  # b echoes nothing meanwhile
        self.assertLessEqual(sum(got), w.ECHO_WINDOW)
        self.assertLess(len(self.messages(b, "big")), 20)
        self.assertGreater(a.stats["payloads paced by echoes"], 0)
        while len(self.messages(b, "big")) < 20:  # each echo lets more go
            echo()
            await asyncio.sleep(0.02)
        self.assertEqual([e[2]["i"] for e in self.messages(b, "big")], list(range(20)))
        self.assertTrue(conn.echoes)

    async def test_room_for_waits_for_the_echoes(self):
        # results to a JS master stay in the journal until they would leave at once
        a, b, _conn, got, echo = await self.echoing_pair("echo-room")
        self.send_big(a, b, "big", 8)
        await until(lambda: got)
        waiting = asyncio.ensure_future(a.room_for(b.address, 2000))
        await asyncio.sleep(0.2)
        self.assertFalse(waiting.done())
        while not waiting.done():
            echo()
            await asyncio.sleep(0.02)
        await until(lambda: len(self.messages(b, "big")) == 8, 5)

    async def test_room_for_says_so_when_its_time_ran_out_without_room(self):
        # the caller keeps its result in the journal then: it must not send it to wait in memory
        a, b, conn, got, echo = await self.echoing_pair("echo-no-room")
        with mock.patch.object(w, "ECHO_WAIT", 0.5):
            self.send_big(a, b, "big", 8)
            await until(lambda: got)
            waiting = asyncio.ensure_future(a.room_for(b.address, 2000))
            await asyncio.sleep(0.3)
            self.assertFalse(waiting.done())
            # all of them echoed, and in the same turn as many more sent (a requestWork, say)
            conn._echoed([w.ExtensionPayload(payload) for _, payload in echo.held])
            self.send_big(a, b, "big2", 8)
            room = await waiting  # its deadline comes 0.2 s after the newest went: no room yet
        self.assertFalse(conn.sends_at_once(2000))
        self.assertIs(room, False)

    async def test_one_echo_that_never_comes_does_not_stop_the_pacing(self):
        # bugout echoes only what is new to it: a copy of ours that reached it first by another
        # wire is never echoed here; that alone must not let all that waits go in one burst
        a, b, conn, got, echo = await self.echoing_pair("echo-one-lost")
        with mock.patch.object(w, "ECHO_WAIT", 0.5):
            a.send({"tag": "lost", "pad": "x" * 1000}, address=b.address)
            await until(lambda: echo.held)
            echo.held.clear()  # b saw that one before: no echo of it
            self.send_big(a, b, "big", 20)
            until_overdue = time.monotonic() + 0.8
            while time.monotonic() < until_overdue:  # the others are echoed as they come
                echo()
                await asyncio.sleep(0.02)
            self.assertTrue(conn.echoes)
            got.clear()
            self.send_big(a, b, "more", 20)
            await asyncio.sleep(0.2)  # b echoes nothing meanwhile
            self.assertLessEqual(sum(got), w.ECHO_WINDOW)
            while len(self.messages(b, "more")) < 20:
                echo()
                await asyncio.sleep(0.02)

    async def test_what_waits_for_echoes_counts_in_all_send_queues(self):
        # each wire may hold ECHO_HELD_MAX for echoes: a token holder's many wires must not hold
        # that beyond max_send_total (it echoes once, then never again)
        a, b, conn, _got, _echo = await self.echoing_pair("echo-total")
        a.max_send_total = 64 * 1024
        self.send_big(a, b, "big", 100)
        await until(lambda: conn.state is w.ConnState.CLOSED, 5)
        self.assertEqual(a.stats["peers dropped: send queues full"], 1)

    async def test_a_peer_that_stops_echoing_gets_what_waits_anyway(self):
        a, b, conn, _got, _echo = await self.echoing_pair("echo-stops")
        with mock.patch.object(w, "ECHO_WAIT", 0.5):
            self.send_big(a, b, "big", 20)
            await until(lambda: len(self.messages(b, "big")) == 20, 5)  # no echo at all
        self.assertFalse(conn.echoes)

    async def test_what_waits_goes_before_the_wire_closes(self):
        a, b, conn, _got, _echo = await self.echoing_pair("echo-close")
        self.send_big(a, b, "big", 20)
        conn.close()
        await until(lambda: len(self.messages(b, "big")) == 20, 5)

    async def test_a_silent_wire_renewed_is_dialed_again_where_lsd_said(self):
        # issue 20: a JS master dialed us; its wire renewed, we dial the endpoint its peer id
        # announced by LSD (WebTorrent would come back over uTP first, ~30 s later)
        a = await self.started(py_node("renew-lsd"))
        b = await self.started(js_like(py_node("renew-lsd", peers=["127.0.0.1:%d" % a.port])))
        await until(lambda: a.address in b.peers and b.address in a.peers)
        a.discovery.lsd_peer("127.0.0.1", b.port, "bittorrent-lsd-" + b.peer_id.hex())  # wired already: no dial
        old = set(a._connections)
        self.assertEqual(a.renew_silent_wires(b.address, 60.0), 0)  # it spoke lately
        self.assertEqual(a.renew_silent_wires(b.address, 0.0), 1)
        await until(lambda: any(c.dialed == ("127.0.0.1", b.port) and c.state is w.ConnState.OPEN
                                for c in a._connections if c not in old), 5)
        self.assertEqual(a.stats["silent wires renewed"], 1)


    async def test_a_renewed_wire_is_not_dialed_where_another_host_announced_its_peer_id(self):
        # a token holder's LSD announce claiming the master's peer id, from a host of its own, must
        # not make us dial it in place of the master (an LSD announce is a claim)
        trap_hits = []
        trap = await asyncio.start_server(lambda r, wr: (trap_hits.append(1), wr.close()), "127.0.0.2", 0)
        self.addAsyncCleanup(trap.wait_closed)
        self.addCleanup(trap.close)
        trap_port = trap.sockets[0].getsockname()[1]
        a = await self.started(py_node("renew-lsd-claim"))
        b = await self.started(js_like(py_node("renew-lsd-claim", peers=["127.0.0.1:%d" % a.port])))
        await until(lambda: a.address in b.peers and b.address in a.peers)
        cookie = "bittorrent-lsd-" + b.peer_id.hex()
        a.discovery.lsd_peer("127.0.0.1", b.port, cookie)  # b's own announce, then the claim: the latest
        a.discovery.lsd_peer("127.0.0.2", trap_port, cookie)
        old = set(a._connections)
        self.assertEqual(a.renew_silent_wires(b.address, 0.0), 1)
        await until(lambda: any(c.dialed == ("127.0.0.1", b.port) and c.state is w.ConnState.OPEN
                                for c in a._connections if c not in old), 5)
        self.assertEqual(trap_hits, [])
        self.assertNotIn(("127.0.0.2", trap_port), [c.dialed for c in a._connections])


    async def test_a_python_peers_silent_wire_is_not_renewed(self):
        # master.py echoes nothing and pings every 30 s: a slow answer of its is no stall, and
        # a slow proven master is never cut for slowness (its RPC timeouts decide)
        a = await self.started(py_node("renew-py"))
        b = await self.started(py_node("renew-py", peers=["127.0.0.1:%d" % a.port]))
        await until(lambda: a.address in b.peers and b.address in a.peers)
        self.assertEqual(a.renew_silent_wires(b.address, 0.0), 0)
        self.assertTrue(a.has_signed_wire(b.address))
        self.assertEqual(a.stats["silent wires renewed"], 0)


class TestWireUnderAttack(AsyncTest):
    async def _second_wire(self, ids_favour_wire_2, window=60.0):
        """Wire 1 carries RPCs both ways (some served, some still on the wire) when the other end
        dials again and wire 2 proves itself too; every call is answered, and one wire is left.

        ``window``: DUP_WINDOW. Wires that came to stand within it opened together, and the one
        dialed by the lower peer id stays; further apart, the one that stood first stays.
        """
        low, high = sorted([w.make_peer_id(), w.make_peer_id()])
        # by peer ids the wire kept is the one dialed by the lower; a dials wire 1, b wire 2
        a = self.will_close(memory_node(high if ids_favour_wire_2 else low))
        b = self.will_close(memory_node(low if ids_favour_wire_2 else high))
        first_wire_loses = ids_favour_wire_2 and window > 1.0
        release, serving = asyncio.Event(), []

        async def slow(address, args):
            serving.append(args)
            await release.wait()
            return {"late": args}
        for node in (a, b):
            node.register("slow", slow)
        wires = self.will_close(MemoryWires())
        one_a, _ = wires.connect(a, b)
        await until(lambda: a.connections() == b.connections() == 1 and a.has_signed_wire(b.address)
                    and b.has_signed_wire(a.address), 5)
        calls = [a.rpc(b.address, "slow", 1, timeout=8), b.rpc(a.address, "slow", 2, timeout=8)]
        calls = [asyncio.ensure_future(c) for c in calls]
        await until(lambda: len(serving) == 2, 5)  # being served ...
        one_a.held = one_a.peer.held = True  # ... and more on the wire, both ways
        calls += [asyncio.ensure_future(a.rpc(b.address, "echo", "a", timeout=8)),
                  asyncio.ensure_future(b.rpc(a.address, "echo", "b", timeout=8))]
        await asyncio.sleep(0.05)
        self.assertTrue(one_a.outbox and one_a.peer.outbox)
        with mock.patch.object(w, "DUP_WINDOW", window):
            two_b, _ = wires.connect(b, a)  # both ends dialed
            await until(lambda: a.connections() == b.connections() == 2, 5)
            self.assertEqual(a.stats["hellos sent"] + b.stats["hellos sent"], 2)  # wire 1's: a peer wired gets none
            a.ping()  # by wire 2 first (wire 1 holds): it proves wire 2 at both ends
            b.ping()
            await until(lambda: a.stats["duplicate wires"] and b.stats["duplicate wires"], 5)
        if first_wire_loses:  # a request (BEP 6) on the draining wire: its reject is not written
            one_a.protocol.data_received(w.frame(6, struct.pack(">III", 0, 0, 16384)))
        one_a.held = one_a.peer.held = False
        release.set()
        answers = await asyncio.gather(*calls)
        self.assertEqual(answers, [{"late": 1}, {"late": 2}, "a", "b"])
        await until(lambda: len(a._connections) == len(b._connections) == 1, 8)
        kept = two_b if first_wire_loses else one_a
        self.assertIn(kept.protocol, b._connections | a._connections)
        self.assertEqual(await a.rpc(b.address, "echo", "after", timeout=5), "after")
        self.assertEqual(await b.rpc(a.address, "echo", "after", timeout=5), "after")
        self.assertEqual(a.stats["peers dropped for an internal error"], 0)
        self.assertTrue(a.has_signed_wire(b.address) and b.has_signed_wire(a.address))

    async def test_simultaneous_open_the_busy_wire_loses(self):
        await self._second_wire(ids_favour_wire_2=True)

    async def test_simultaneous_open_the_new_wire_loses(self):
        await self._second_wire(ids_favour_wire_2=False)

    async def test_a_wire_that_stood_first_stays_whatever_the_peer_ids(self):
        await self._second_wire(ids_favour_wire_2=True, window=0.0)

    async def test_a_wire_hands_over_a_budget_of_payloads_per_loop_turn(self):
        a, b = self.will_close(memory_node()), self.will_close(memory_node())
        wires = self.will_close(MemoryWires())
        _, at_a = wires.connect(b, a)
        await until(lambda: a.address in b.peers and b.address in a.peers, 5)
        batches = []
        real = a.wire_events
        a.wire_events = lambda conn, events: (batches.append(len(events)), real(conn, events))
        flood = b"".join(bo_frame(signed_by(b.identity, {"y": "m", "v": '"%d"' % i}, "wire-attack"))
                         for i in range(200))
        paused = []
        at_a.pause_reading = lambda: (paused.append(True), MemoryTransport.pause_reading(at_a))
        at_a.protocol.data_received(flood)  # 200 payloads in one read
        self.assertEqual(batches, [w.WIRE_BUDGET])
        self.assertTrue(paused and not at_a.reading)
        await until(lambda: sum(batches) == 200, 5)
        self.assertTrue(at_a.reading)
        self.assertLessEqual(max(batches), w.WIRE_BUDGET)
        a.prioritize(b.address)  # the master's wire: all at once
        b.ping()
        await until(lambda: a.is_protected(at_a.protocol), 5)
        batches.clear()
        at_a.protocol.data_received(b"".join(bo_frame(signed_by(b.identity, {"y": "p"}, "wire-attack"))
                                             for _ in range(100)))
        self.assertEqual(batches, [100])

    async def test_the_protected_peers_call_is_served_before_a_flood_that_came_first(self):
        """master.py protects its proven workers: others' calls that come in the same loop turn
        wait in the SlowLane, unread, and are all served after, none dropped."""
        node, worker, flooder, newcomer = (self.will_close(memory_node()) for _ in range(4))
        wires = self.will_close(MemoryWires())
        from_worker, at_node = wires.connect(worker, node)
        from_flooder, _ = wires.connect(flooder, node)
        from_newcomer, _ = wires.connect(newcomer, node)
        await until(lambda: {worker.address, flooder.address, newcomer.address} <= set(node.peers)
                    and all(node.address in p.peers for p in (worker, flooder, newcomer)), 5)
        node.prioritize(worker.address)
        worker.ping()
        await until(lambda: node.is_protected(at_node.protocol), 5)
        worker.ping()  # it talks (as a working worker always does): the others wait their turn
        await until(lambda: node.lane.active(time.monotonic()), 5)
        served = []
        node.register("work", lambda address, args: served.append(args) or args)
        from_worker.held = from_flooder.held = from_newcomer.held = True
        calls = [asyncio.ensure_future(flooder.rpc(node.address, "work", "flood %d" % i, timeout=5))
                 for i in range(30)]
        calls.append(asyncio.ensure_future(newcomer.rpc(node.address, "work", "newcomer", timeout=5)))
        calls.append(asyncio.ensure_future(worker.rpc(node.address, "work", "proven", timeout=5)))
        await until(lambda: from_worker.outbox and from_flooder.outbox and from_newcomer.outbox, 5)
        from_worker.held = from_flooder.held = from_newcomer.held = False
        from_flooder.deliver()  # one loop turn reads the flood first, a newcomer's call ...
        from_newcomer.deliver()
        from_worker.deliver()  # ... then the proven worker's call
        self.assertEqual(served, ["proven"])
        flood = ["flood %d" % i for i in range(30)]
        self.assertEqual(await asyncio.gather(*calls), flood + ["newcomer", "proven"])
        # the newcomer waits for one short visit of the flooder's wire, not for its backlog
        self.assertEqual(served, ["proven"] + flood[:w.LANE_VISIT] + ["newcomer"] + flood[w.LANE_VISIT:])
        with mock.patch.object(w, "LANE_ACTIVE", 0.0):  # the proven worker is quiet: nobody waits
            from_flooder.held = True
            call = asyncio.ensure_future(flooder.rpc(node.address, "work", "alone", timeout=5))
            await until(lambda: from_flooder.outbox, 5)
            from_flooder.held = False
            from_flooder.deliver()
            self.assertEqual(served[-1], "alone")
            self.assertEqual(await call, "alone")

    async def test_relays_never_wait_in_front_of_the_protected_wire(self):
        node, master, other, flooder = (self.will_close(memory_node()) for _ in range(4))
        wires = self.will_close(MemoryWires())
        to_master, _ = wires.connect(node, master)
        to_other, _ = wires.connect(node, other)
        wires.connect(flooder, node)
        await until(lambda: node.connections() == 3 and master.address in node.peers, 5)
        node.prioritize(master.address)
        master.ping()
        await until(lambda: node.is_protected(to_master.protocol), 5)
        to_master.held = to_other.held = True  # neither reads for now
        node.send("ours, for everyone")
        node.send("ours, for the master", master.address)
        await asyncio.sleep(0.05)
        before = node.stats["relays dropped: queues full"]
        for i in range(40):  # relayed messages, 40 KB each
            flooder.send({"flood": i, "pad": "x" * 40_000})
        await until(lambda: node.core.stats["relayed"] >= 40, 5)
        await asyncio.sleep(0.05)
        dropped = node.stats["relays dropped: queues full"] - before
        self.assertLessEqual(to_master.get_write_buffer_size(), w.RELAY_PROTECTED + 50_000)
        self.assertGreater(to_other.get_write_buffer_size(), to_master.get_write_buffer_size())
        self.assertGreater(dropped, 10)
        seen = []
        master.on("message", lambda address, value: seen.append(value))
        to_master.held = False
        await until(lambda: "ours, for the master" in seen, 5)
        self.assertLessEqual(seen.index("ours, for the master"), 2)  # behind a relay or two at most

    async def test_unfinished_handshakes_meet_a_deadline(self):
        node = w.Bugout("deadline-swarm", host="127.0.0.1", lsd=False, dht=False, trackers=[])
        node.handshake_timeout = 0.5
        await self.started(node)
        conns = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(5)]
        conns[0][1].write(w.handshake_bytes(node.infohash, b"-XX0000-halfhalfhalf"))  # no BEP 10
        for reader, _ in conns:
            self.assertTrue(await closed_by_peer(reader, 5))
        self.assertEqual(node.stats["handshake timeouts"], 5)
        self.assertEqual(len(node._connections), 0)
        for _, writer in conns:
            writer.close()

    async def test_inbound_cap_keeps_room_for_a_peer_that_speaks(self):
        node = w.Bugout("cap-swarm", host="127.0.0.1", lsd=False, dht=False, trackers=[])
        node.max_inbound = 10
        node.register("echo", lambda address, args: {**args, "echoedBy": "py"})
        await self.started(node)
        half = []
        for i in range(30):  # from many addresses: the per-host limit does not bite
            sock = socket.socket()
            sock.bind(("127.0.0.%d" % (2 + i), 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", node.port))
            half.append(await asyncio.open_connection(sock=sock))
        await asyncio.sleep(0.5)
        self.assertLessEqual(len(node._connections), 10)
        self.assertGreater(node.stats["inbound refused"] + node.stats["handshakes cut: inbound cap"], 0)
        peer = await self.started(py_node("cap-swarm", peers=["127.0.0.1:%d" % node.port]))
        await until(lambda: peer.address in node.peers and node.address in peer.peers, 10)
        self.assertEqual(await peer.rpc(node.address, "echo", {"in": 1}), {"in": 1, "echoedBy": "py"})
        self.assertLessEqual(len(node._connections), 10)
        for _, writer in half:
            writer.close()

    async def test_one_host_holds_a_few_finished_wires_the_silent_make_room(self):
        node = await self.started(py_node("host-slots"))
        silent = []
        for _ in range(w.INBOUND_PER_HOST + 8):  # finished handshakes, then nothing
            with contextlib.suppress(OSError):
                silent.append(await raw_wire(node, local="127.0.0.2"))
        self.addCleanup(lambda: [writer.close() for _, writer in silent])
        await until(lambda: node.stats["inbound refused: wires from one host"] >= 1, 5)
        from_host = lambda: [c for c in node._connections if c.remote_host == "127.0.0.2"
                             and c.state is w.ConnState.OPEN]
        self.assertEqual(len(from_host()), w.INBOUND_PER_HOST)
        with mock.patch.object(w, "NEWCOMER_SECONDS", 0.0):  # they are old now, and never spoke
            reader, writer = await raw_wire(node, w.Identity(), local="127.0.0.2")
            ident = w.Identity()
            writer.write(bo_frame(signed_by(ident, {"y": "p"}, "host-slots")))
            await until(lambda: node.stats["wires closed: room for a host's newcomer"] >= 1, 5)
        self.assertEqual(len(from_host()), w.INBOUND_PER_HOST)
        self.assertFalse(reader.at_eof())  # the newcomer that speaks is in, a silent one made room
        writer.close()

    async def test_a_hosts_wires_in_use_are_not_capped_and_give_way_at_the_inbound_cap(self):
        node = w.Bugout("nat-slots", host="127.0.0.1", lsd=False, dht=False, trackers=[], max_inbound=30)
        node.register("echo", lambda address, args: {**args, "echoedBy": "py"})
        await self.started(node)
        wires = []
        for _ in range(w.INBOUND_PER_HOST + 8):  # workers behind one NAT: each signs a packet now and then
            ident = w.Identity()
            reader, writer = await raw_wire(node, ident, local="127.0.0.3")
            writer.write(bo_frame(signed_by(ident, {"y": "p"}, "nat-slots")))
            wires.append((reader, writer))
        self.addCleanup(lambda: [writer.close() for _, writer in wires])
        await until(lambda: sum(c.last_verified is not None for c in node._connections) == len(wires), 10)
        self.assertEqual(node.stats["inbound refused: wires from one host"], 0)
        node.max_inbound = len(wires)  # the cap is full of one host's wires, all in use
        with mock.patch.object(w, "NEWCOMER_SECONDS", 0.0):
            master = await self.started(py_node("nat-slots", peers=["127.0.0.1:%d" % node.port]))
            await until(lambda: master.address in node.peers and node.address in master.peers, 10)
        self.assertEqual(node.stats["wires closed: inbound cap"], 1)  # one of the crowded host's
        self.assertEqual(await master.rpc(node.address, "echo", {"in": 1}), {"in": 1, "echoedBy": "py"})

    async def test_at_the_inbound_cap_a_master_dialing_in_gets_through(self):
        node = w.Bugout("cap-slots", host="127.0.0.1", lsd=False, dht=False, trackers=[], max_inbound=10)
        node.register("echo", lambda address, args: {**args, "echoedBy": "py"})
        await self.started(node)
        silent = [await raw_wire(node, local="127.0.0.%d" % (10 + i)) for i in range(10)]  # ten hosts
        self.addCleanup(lambda: [writer.close() for _, writer in silent])
        await until(lambda: node.connections() == 10, 5)
        with mock.patch.object(w, "NEWCOMER_SECONDS", 0.5):
            await asyncio.sleep(0.6)  # they never spoke and are no newcomers any more
            master = await self.started(py_node("cap-slots", peers=["127.0.0.1:%d" % node.port]))
            await until(lambda: master.address in node.peers and node.address in master.peers, 5)
            self.assertEqual(await master.rpc(node.address, "echo", {"in": 1}), {"in": 1, "echoedBy": "py"})
            node.prioritize(master.address)
            master.ping()
            await until(lambda: any(node.is_protected(c) for c in node._connections), 5)
            ours = next(c for c in node._connections if node.is_protected(c))
            ours.started, ours.last_verified = ours.started - 1000, None  # the best victim, but protected
            more = [await raw_wire(node, local="127.0.1.%d" % (10 + i)) for i in range(20)]
            self.addCleanup(lambda: [writer.close() for _, writer in more])
            await until(lambda: node.stats["wires closed: inbound cap"] >= 5, 10)
        self.assertIn(ours, node._connections)
        self.assertEqual(ours.state, w.ConnState.OPEN)
        self.assertLessEqual(len(node._inbound()), 10)
        self.assertEqual(await master.rpc(node.address, "echo", {"still": 1}), {"still": 1, "echoedBy": "py"})

    async def test_one_host_over_its_handshake_limit_does_not_lock_others_out(self):
        node = await self.started(w.Bugout("crowd-swarm", host="127.0.0.1", lsd=False, dht=False, trackers=[],
                                           handshake_timeout=60))
        loop, socks = asyncio.get_running_loop(), []

        async def dial_from(host):
            sock = socket.socket()
            socks.append(sock)
            sock.bind((host, 0))
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", node.port))
        for _ in range(w.PENDING_PER_HOST):  # one host's share of unfinished handshakes ...
            await dial_from("127.0.0.2")
        await until(lambda: len(node._connections) == w.PENDING_PER_HOST, 5)

        async def crowd():  # ... and a stream of its callers in the listen backlog
            while True:
                await asyncio.gather(*(dial_from("127.0.0.2") for _ in range(20)), return_exceptions=True)
                await asyncio.sleep(0.1)
        crowding = asyncio.ensure_future(crowd())
        self.addCleanup(lambda: [sock.close() for sock in socks])

        async def stop_crowding():
            crowding.cancel()
            await asyncio.gather(crowding, return_exceptions=True)
        self.addAsyncCleanup(stop_crowding)
        await until(lambda: node.stats["inbound refused: handshakes from one host"], 5)
        peer = await self.started(py_node("crowd-swarm", peers=["127.0.0.1:%d" % node.port]))
        await until(lambda: node.address in peer.peers, 4)  # another host gets in at its first dial
        self.assertEqual(len([c for c in node._connections if c.remote_host == "127.0.0.2"]), w.PENDING_PER_HOST)

    async def test_peers_found_are_dialed_up_to_a_bound_and_the_rest_wait_their_turn(self):
        node = await self.started(py_node("dialed-swarm"))
        others = [await self.started(py_node("dialed-swarm")) for _ in range(5)]
        with mock.patch.object(w, "MAX_DIALED", 3):  # say, one host announcing port after port
            for other in others:
                node.add_peer("127.0.0.1", other.port)
            await until(lambda: node.connections() == 3, 5)
            await asyncio.sleep(0.3)
            found = node.discovery
            self.assertEqual((len(found._dialing), len(found._dials), node.connections()), (0, 2, 3))
            node.add_peer("127.0.0.1", others[-1].port)  # already waiting: once
            self.assertEqual(len(node.discovery._dials), 2)
            next(c for c in node._connections if c.initiator).close()  # a dialed wire goes: room
            await until(lambda: node.connections() == 3 and len(node.discovery._dials) == 1, 5)

    async def test_a_dht_node_answering_first_with_hanging_peers_hides_no_master(self):
        node = await self.started(py_node("hang-swarm"))
        master = await self.started(py_node("hang-swarm"))
        real = node.discovery._dial

        async def dial(host, port):
            if host.startswith("10."):  # a peer that never answers the SYN
                await asyncio.sleep(30)
                return None
            return await real(host, port)
        node.discovery._dial = dial
        hanging = [("10.9.%d.%d" % (i // 200, i % 200), 6881) for i in range(w.MAX_DIALING + 8)]
        node.discovery._on_dht_peers(node.infohash, hanging, ("10.8.0.1", 6881))  # it answered first
        node.discovery._on_dht_peers(node.infohash, [("127.0.0.1", master.port)], ("127.0.0.2", 6881))
        await until(lambda: master.address in node.peers, 3)  # its turn came in the first burst
        self.assertLessEqual(len(node.discovery._dialing), w.MAX_DIALING)
        self.assertGreater(len(node.discovery._dials), 0)  # the rest wait, none dropped

    async def test_lsd_flood_dials_at_a_bounded_rate_and_a_known_master_first(self):
        node = await self.started(py_node("flood-swarm"))
        master = await self.started(py_node("flood-swarm"))
        node.add_peer("127.0.0.1", master.port)
        await until(lambda: master.address in node.peers, 5)
        node.prioritize(master.address)
        master.ping()
        await until(lambda: node.discovery._whereabouts.get(master.address), 5)
        dials = []
        real = node.discovery._dial

        async def counted(host, port):
            dials.append((time.monotonic(), port))
            return await real(host, port)
        node.discovery._dial = counted
        next(c for c in node._connections if c.initiator).close()  # the master's wire is lost
        await until(lambda: node.connections() == 0, 5)
        lsd = w._LsdProtocol(node.discovery)
        start = time.monotonic()
        for port in itertools.chain(range(20000, 20020), [master.port], range(20020, 23000)):
            announce = w.lsd_announcement(node.infohash, port, "bittorrent-lsd-" + os.urandom(20).hex())
            sender = "127.0.0.1" if port == master.port else "127.0.0.9"  # one sender, port after port
            lsd.datagram_received(announce, (sender, w.LSD_PORT))
        await until(lambda: master.address in node.peers and node.connections() >= 1, 5)
        self.assertEqual(dials[0][1], master.port)  # first, though announced after others
        await asyncio.sleep(2.0)
        flood = [t for t, port in dials if port != master.port]
        self.assertLessEqual(len(flood), w.DISCOVERY_DIALS_PER_SECOND * (time.monotonic() - start + 1))
        dropped = node.stats["lsd: over the rate, not read"] + node.stats["lsd: sender over its rate"]
        self.assertGreater(dropped, 2900)
        self.assertLessEqual(len(node.discovery._dials), w.DIAL_QUEUE_PER_SOURCE)

    async def test_out_of_descriptors_pauses_accepting_with_one_log_line(self):
        child = textwrap.dedent("""
            import asyncio, resource, sys, worker as w
            async def main():
                w.Logger("info")
                node = await w.Bugout("fd-swarm", host="127.0.0.1", lsd=False, dht=False, trackers=[]).start()
                node.register("echo", lambda address, args: args)
                resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
                print(node.port, flush=True)
                await asyncio.Event().wait()
            asyncio.run(main())
            """)
        proc = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, "-c", child, cwd=HERE, env=clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE))
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        held = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.%d" % (2 + i % 16), 0))
                for i in range(80)]  # from many hosts: the limit per host does not bite
        lines = []

        async def out_of_descriptors():
            while raw := await proc.stderr.readline():
                lines.append(raw.decode().rstrip("\n"))
                if "cannot accept connections" in lines[-1]:
                    return
        await asyncio.wait_for(out_of_descriptors(), 20)
        for _, writer in held:
            writer.close()
        peer = await self.started(py_node("fd-swarm", peers=["127.0.0.1:%d" % port]))
        await until(lambda: peer.connections() == 1 and len(peer.peers) == 1, 15)
        address = next(iter(peer.peers))
        self.assertEqual(await peer.rpc(address, "echo", {"back": 1}), {"back": 1})
        await peer.close()
        proc.terminate()
        _, err = await proc.communicate()
        lines += err.decode().splitlines()
        self.assertEqual(sum("cannot accept connections" in line for line in lines), 1, lines[:20])
        self.assertLessEqual(len(lines), 5, lines[:20])

    async def test_a_wire_that_does_not_read_is_closed_and_relays_to_it_dropped(self):
        node = await self.started(py_node("sink-swarm", max_message=1 << 16))
        other = await self.started(py_node("sink-swarm", peers=["127.0.0.1:%d" % node.port]))
        reader, writer = await raw_wire(node, rcvbuf=4096)
        await until(lambda: node.connections() == 2 and other.address in node.peers)
        sent = 0  # relayed through node: past the kernel's buffers its queue to the sink stays small
        while not node.stats["relays dropped: queues full"] and sent < 2000:
            for _ in range(50):
                other.send({"relay": sent, "pad": "r" * 30_000})
                sent += 1
            await until(lambda sent=sent: node.core.stats["relayed"] >= sent, 10)
        self.assertGreater(node.stats["relays dropped: queues full"], 0)
        self.assertEqual(node.stats["peers dropped: not reading"], 0)
        sink = next(c for c in node._connections if c.address != other.address)
        self.assertLessEqual(sink.buffered, w.RELAY_QUEUE + 40_000)
        for i in range(2000):  # our own broadcasts must reach it: it does not read, it goes
            node.send({"own": i, "pad": "o" * 30_000})
            await asyncio.sleep(0)
            if node.stats["peers dropped: not reading"]:
                break
        self.assertEqual(node.stats["peers dropped: not reading"], 1)
        self.assertTrue(await closed_by_peer(reader, 5))
        self.assertEqual(await other.rpc(node.address, "echo", {"ok": 1}), {"ok": 1, "echoedBy": "py"})
        writer.close()

    async def test_a_wire_closed_while_it_does_not_read_lets_go_of_what_it_holds(self):
        node = await self.started(py_node("zombie-swarm"))
        _, writer = await raw_wire(node, rcvbuf=4096)
        await until(lambda: node.connections() == 1, 5)
        sink = next(iter(node._connections))
        while sink.buffered < 4 << 20:  # ours, for everyone: it reads none of it
            node.send({"pad": "o" * 100_000})
            await asyncio.sleep(0)
        with mock.patch.object(w, "DRAIN_GRACE", 0.5):
            writer.write(b"\xff\xff\xff\xff")  # a message over any limit: bad input, the wire is closed
            await until(lambda: node.stats["peers dropped for bad input"], 5)
            await until(lambda: sink not in node._connections, 5)  # its unsent bytes are dropped, not kept
        self.assertEqual(sink.write_buffer(), 0)
        writer.close()

    async def test_partly_received_messages_are_bounded_on_all_wires(self):
        node = await self.started(py_node("partial-swarm", max_message=1 << 20))  # all wires: 2 MiB at most
        master = await self.started(py_node("partial-swarm", peers=["127.0.0.1:%d" % node.port],
                                            max_message=1 << 20))
        await until(lambda: master.address in node.peers and node.address in master.peers)
        node.prioritize(master.address)
        master.ping()
        await until(lambda: any(node.is_protected(c) for c in node._connections))
        raws = [await raw_wire(node, local="127.0.0.%d" % (2 + i)) for i in range(4)]
        for _, writer in raws:  # 900 KiB of a 1 MiB message each, then nothing
            writer.write(struct.pack(">IBB", (1 << 20) - 10, 20, 4) + bytes(900 * 1024))
            await writer.drain()
        await until(lambda: node.stats["peers dropped: partial messages over the bound"] >= 2, 10)
        self.assertLessEqual(node.policy.held_total, node.max_partial)
        big = {"blob": "b" * 900_000}  # the protected peer's large message still comes in whole
        self.assertEqual(await master.rpc(node.address, "echo", big, timeout=10), {**big, "echoedBy": "py"})
        for _, writer in raws:
            writer.close()

    async def test_a_message_that_stops_coming_closes_its_wire(self):
        with mock.patch.object(w, "PROGRESS_SECONDS", 0.3):
            node = await self.started(py_node("stall-swarm", heartbeat=0.1))
            reader, writer = await raw_wire(node)
            await until(lambda: node.connections() == 1)
            writer.write(struct.pack(">IBB", 100_000, 20, 4) + bytes(40_000))  # 40 % of it, then silence
            self.assertTrue(await closed_by_peer(reader, 5))
            self.assertEqual(node.stats["peers dropped: stalled message"], 1)
            writer.close()
            await node.close()  # while PROGRESS_SECONDS is patched

    async def _slow_message(self, proven, pieces, pause):
        """A peer sends one 40 KB message in ``pieces`` with ``pause`` seconds between them
        (on the node's clock, which the test moves); (wire kept, message arrived)."""
        node, peer = self.will_close(memory_node()), self.will_close(memory_node())
        wires = self.will_close(MemoryWires())
        at_peer, at_node = wires.connect(peer, node)
        await until(lambda: peer.address in node.peers and node.address in peer.peers, 5)
        if proven:  # the master, proven: protected, its packets come by this wire
            node.prioritize(peer.address)
            peer.ping()
            await until(lambda: node.is_protected(at_node.protocol), 5)
        arrived = []
        node.on("message", lambda address, value: arrived.append(value))
        at_peer.held = True  # from now on the test alone feeds the node's end
        await asyncio.sleep(0.05)
        data = bo_frame(signed_by(peer.identity, {"y": "m", "v": json.dumps("x" * 40_000)}, "wire-attack"))
        size = -(-len(data) // pieces)
        now = time.monotonic() + 100  # ahead of the node's own timer, which then changes nothing
        node.check_wires(now)
        for i in range(pieces):
            at_node.protocol.data_received(data[i * size:(i + 1) * size])
            for _ in range(int(pause)):  # the node's timer looks every second of the pause
                now += 1
                node.check_wires(now)
        await asyncio.sleep(0.05)
        kept = at_node.protocol.state is w.ConnState.OPEN
        return kept, arrived == ["x" * 40_000], node.stats["peers dropped: stalled message"]

    async def test_a_proven_master_is_never_cut_for_slowness(self):
        self.assertEqual(await self._slow_message(True, 4, 12), (True, True, 0))  # 12 s pauses
        self.assertEqual(await self._slow_message(True, 40, 1), (True, True, 0))  # 1 KiB/s

    async def test_a_slow_message_on_an_unproven_wire_is_still_cut(self):
        self.assertEqual(await self._slow_message(False, 4, 12), (False, False, 1))
        self.assertEqual(await self._slow_message(False, 40, 1), (False, False, 1))

    async def test_a_message_we_did_not_read_is_no_stall(self):
        """Payloads held back for later loop turns (WIRE_BUDGET) leave the socket unread: the
        message behind them waits on us. Once we read again, silence is a stall as before."""
        node, peer, at_node = await self._fed_by_test()
        pings = self._numbered(peer, w.WIRE_BUDGET + 8)
        big = bo_frame(signed_by(peer.identity, {"y": "m", "v": json.dumps("x" * 40_000)}, "wire-attack"))
        now = time.monotonic() + 100
        node.check_wires(now)
        at_node.protocol.data_received(pings + big[:20_000])  # a backlog, then half a message
        for _ in range(2):  # the loop does not turn: the backlog stays, the socket unread
            now += w.PROGRESS_SECONDS
            node.check_wires(now)
        self.assertEqual(at_node.protocol.state, w.ConnState.OPEN)
        await asyncio.sleep(0.05)  # the backlog is handled; the rest of the message never comes
        for _ in range(3):
            now += w.PROGRESS_SECONDS
            node.check_wires(now)
        self.assertEqual(at_node.protocol.state, w.ConnState.CLOSED)
        self.assertEqual(node.stats["peers dropped: stalled message"], 1)

    async def _fed_by_test(self):
        """(node, peer, the node's end of their wire), the test alone feeding that end from now on."""
        node, peer = self.will_close(memory_node()), self.will_close(memory_node())
        wires = self.will_close(MemoryWires())
        at_peer, at_node = wires.connect(peer, node)
        await until(lambda: peer.address in node.peers, 5)
        at_peer.held = True
        await asyncio.sleep(0.05)
        return node, peer, at_node

    @staticmethod
    def _numbered(peer, count):
        """``count`` small messages signed by ``peer``, framed, back to back."""
        return b"".join(bo_frame(signed_by(peer.identity, {"y": "m", "v": '"%d"' % i}, "wire-attack"))
                        for i in range(count))

    async def test_a_slow_stream_of_whole_messages_is_no_stall(self):
        node, peer, at_node = await self._fed_by_test()
        data = self._numbered(peer, 40)
        now = time.monotonic() + 100
        for i in range(0, len(data), 300):  # 300 bytes every 5 s: a message partly in at each look
            at_node.protocol.data_received(data[i:i + 300])
            now += w.PROGRESS_SECONDS
            node.check_wires(now)
        self.assertEqual(at_node.protocol.state, w.ConnState.OPEN)
        self.assertEqual(node.stats["peers dropped: stalled message"], 0)

    async def test_deep_json_is_dropped_and_the_wire_kept(self):
        node = await self.started(py_node("json-swarm"))
        ident = w.Identity()
        _, writer = await raw_wire(node, ident)
        deep = "[" * 100_000 + "]" * 100_000
        for value in (deep, '"after"'):
            writer.write(bo_frame(signed_by(ident, {"y": "m", "v": value}, "json-swarm")))
        await until(lambda: ("message", ident.address, "after") in node.events, 5)
        self.assertEqual(node.core.stats["dropped: JSON nested too deeply"], 1)
        self.assertEqual(node.connections(), 1)
        self.assertEqual(node.stats["peers dropped for bad input"], 0)
        writer.close()

    async def test_lsd_does_not_dial_a_peer_already_wired(self):
        a = await self.started(py_node("lsd-once"))
        b = await self.started(py_node("lsd-once", peers=["127.0.0.1:%d" % a.port]))
        await until(lambda: a.connections() == b.connections() == 1)
        announce = w.lsd_announcement(b.infohash, b.port, "bittorrent-lsd-" + b.peer_id.hex())
        for _ in range(3):  # b re-announces: a is wired to it already
            w._LsdProtocol(a.discovery).datagram_received(announce, ("127.0.0.1", w.LSD_PORT))
        await asyncio.sleep(0.5)
        self.assertEqual((a.stats["duplicate wires"], b.stats["duplicate wires"]), (0, 0))
        self.assertEqual(a.stats["lsd: already wired"], 3)
        self.assertEqual(len(a._connections), 1)


# LSD (BEP 14) ###############################################################

async def child_lsd():
    """In a namespace: the JS peer (LSD on, as by default) and a Python node find each other."""
    ident = "lsd-swarm"
    js = await JsProcess("peer.js", {"BO_ID": ident, "BO_MODE": "lsd"}).start()
    start = time.monotonic()
    py = await w.Bugout(ident, host="0.0.0.0", lsd=True, dht=False, trackers=[]).start()
    py.register("echo", lambda a, args: args)
    await js.wait_for(lambda e: e["event"] == "seen" and e["address"] == py.address, 30)
    await until(lambda: js.ready["address"] in py.peers, 30)
    found = time.monotonic() - start
    echo = await py.rpc(js.ready["address"], "echo", {"lsd": True})
    await py.close()
    await js.close()
    return {"found_s": found, "echo": echo}


class TestLsd(unittest.TestCase):
    def test_js_default_and_python_find_each_other(self):
        js_ready()
        out = in_namespace(child_lsd)
        self.assertEqual(out["echo"], {"lsd": True, "echoedBy": "js"})
        self.assertLess(out["found_s"], 30)


async def child_lsd_own_addresses():
    """In a namespace: two Python nodes, each listening on a loopback address of its own, meet by LSD."""
    nodes = [await w.Bugout("lsd-addresses", host=host, lsd=True, dht=False, trackers=[]).start()
             for host in ("127.0.0.5", "127.0.0.6")]
    await until(lambda: all(n.has_signed_wire(m.address) for n in nodes for m in nodes if m is not n), 30)
    hosts = [sorted({c.remote_host for c in n._connections}) for n in nodes]
    for node in nodes:
        await node.close()
    return hosts


class TestLsdOwnAddress(unittest.TestCase):
    def test_nodes_on_addresses_of_their_own_announce_and_dial_from_them(self):
        """Peers dial an announce's sender, and count wires per address: each must be the node's own."""
        self.assertEqual(in_namespace(child_lsd_own_addresses), [["127.0.0.6"], ["127.0.0.5"]])


async def child_lsd_runs():
    """In a namespace: ten runs of master.py and worker.py that meet over LSD."""
    runs = []
    for i in range(10):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(await lsd_run(Path(tmp), (0, 0.5, 0.9)[i % 3]))
    return runs


class TestLsdDuplicates(unittest.TestCase):
    def test_master_py_and_worker_py_over_lsd_ten_runs_every_result(self):
        """The issue's stall: both ends dial on LSD, one wire is closed with an answer on it."""
        runs = in_namespace(child_lsd_runs, timeout=600)
        for run_ in runs:
            self.assertEqual((run_["results"], run_["rpc_timeouts"]), (1000, 0), runs)
            self.assertLess(run_["seconds"], 20, runs)


# DHT (BEP 5) ################################################################

class TestKrpc(unittest.TestCase):
    def test_bep5_examples_byte_for_byte(self):
        core = quiet_core()
        core.receive_datagram(b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe", HERE_ADDR, 1.0)
        [(answer, to), (ping, to2)] = core.data_to_send()
        self.assertEqual(answer, b"d1:rd2:id20:mnopqrstuvwxyz123456e1:t2:aa1:y1:re")
        self.assertEqual((to, to2), (HERE_ADDR, HERE_ADDR))
        # good citizen: an unknown asker is pinged, and joins the table when it answers
        self.assertEqual(ping, b"d1:ad2:id20:mnopqrstuvwxyz123456e1:q4:ping1:t2:\0\x011:y1:qe")
        core.receive_datagram(b"d1:rd2:id20:abcdefghij0123456789e1:t2:\0\x011:y1:re", HERE_ADDR, 1.1)
        self.assertEqual([c.id for c in core.table.closest(ASKER)], [ASKER])
        core.receive_datagram(b"d1:ad2:id20:abcdefghij01234567896:target20:mnopqrstuvwxyz123456e"
                              b"1:q9:find_node1:t2:aa1:y1:qe", HERE_ADDR, 1.2)
        node = ASKER + bytes([10, 1, 2, 3]) + struct.pack(">H", 6881)
        self.assertEqual(core.data_to_send(), [(b"d1:rd2:id20:mnopqrstuvwxyz1234565:nodes26:" + node
                                                + b"e1:t2:aa1:y1:re", HERE_ADDR)])
        self.assertEqual(core.stats["dht queries answered"], 2)

    def test_get_peers_tokens_and_announce(self):
        core = quiet_core()
        token = hashlib.sha1(bytes(16) + b"10.1.2.3").digest()[:8]
        get_peers = (b"d1:ad2:id20:abcdefghij01234567899:info_hash20:mnopqrstuvwxyz123456e"
                     b"1:q9:get_peers1:t2:aa1:y1:qe")
        core.receive_datagram(get_peers, HERE_ADDR, 1.0)
        self.assertEqual(core.data_to_send()[0][0], b"d1:rd2:id20:mnopqrstuvwxyz1234565:nodes0:5:token8:"
                         + token + b"e1:t2:aa1:y1:re")
        announce = (b"d1:ad2:id20:abcdefghij012345678912:implied_porti1e9:info_hash20:mnopqrstuvwxyz123456"
                    b"4:porti6881e5:token8:%se1:q13:announce_peer1:t2:aa1:y1:qe")
        core.receive_datagram(announce % b"aoeusnth", ("10.1.2.3", 7000), 2.0)
        self.assertEqual(core.data_to_send(), [(b"d1:eli203e9:bad tokene1:t2:aa1:y1:ee", ("10.1.2.3", 7000))])
        core.receive_datagram(announce % token, ("10.1.2.3", 7000), 3.0)
        self.assertEqual(core.data_to_send()[0][0], b"d1:rd2:id20:mnopqrstuvwxyz123456e1:t2:aa1:y1:re")
        core.receive_datagram(get_peers, ("10.9.9.9", 1), 4.0)
        [(answer, _), *_] = sent(core)
        self.assertEqual(answer.values["values"], [bytes([10, 1, 2, 3]) + struct.pack(">H", 7000)])  # implied
        # the token of another address does not work, and secrets rotate every 5 minutes
        core.receive_datagram(announce % token, ("10.1.2.4", 7000), 5.0)
        self.assertEqual(sent(core)[0][0].code, 203)
        core._random = os.urandom  # fresh secrets from now on
        for now in (5.0, 5.0 + 301, 5.0 + 602):
            core.tick(now)
        core.receive_datagram(announce % token, ("10.1.2.3", 7000), 610.0)
        self.assertEqual(sent(core)[0][0].code, 203)
        self.assertEqual(core.stats["dht bad tokens"], 3)

    def test_errors_and_unknown_methods(self):
        core = quiet_core()
        self.assertEqual(w.parse_krpc(b"d1:eli201e23:A Generic Error Ocurrede1:t2:aa1:y1:ee"),
                         w.KrpcError(b"aa", 201, "A Generic Error Ocurred"))
        core.receive_datagram(b"d1:ad2:id20:abcdefghij01234567896:target20:mnopqrstuvwxyz123456e"
                              b"1:q3:get1:t2:aa1:y1:qe", HERE_ADDR, 1.0)
        self.assertEqual(core.data_to_send(), [(b"d1:eli204e14:Method Unknowne1:t2:aa1:y1:ee", HERE_ADDR)])
        core.receive_datagram(b"d1:ad2:id3:abce1:q4:ping1:t2:aa1:y1:qe", HERE_ADDR, 1.0)
        self.assertEqual(core.data_to_send(), [(b"d1:eli203e6:bad ide1:t2:aa1:y1:ee", HERE_ADDR)])
        for junk in (b"", b"le", b"d1:t2:aa1:y1:xe", b"d1:y1:qe", b"d1:t2:aa1:y1:q1:q4:pinge"):
            core.receive_datagram(junk, HERE_ADDR, 1.0)
        self.assertEqual(core.data_to_send(), [])
        self.assertEqual(core.stats["dht malformed"], 5)
        # an answer nobody asked for, or from another address than asked
        core.receive_datagram(b"d1:rd2:id20:abcdefghij0123456789e1:t2:zz1:y1:re", HERE_ADDR, 1.0)
        core.ping(("10.0.0.1", 1), 1.0)
        [(ping, _)] = sent(core)
        core.receive_datagram(bytes(w.KrpcResponse(ping.t, {"id": ASKER})), ("10.0.0.2", 1), 1.0)
        self.assertEqual(core.stats["dht unexpected answers"], 2)
        self.assertEqual(len(core.table), 0)

    def test_lookup_and_announce_in_memory_both_ways(self):
        for first, second in ((1, 2), (2, 1)):
            net = DhtNet(3)
            boot = net.addr(0)
            for i in (1, 2):
                net[i].bootstrap([boot], net.now)
            net.pump()
            info_hash = hashlib.sha1(b"swarm %d" % first).digest()
            net[first].get_peers(info_hash, net.now, 5000 + first)
            net.pump()
            net[second].get_peers(info_hash, net.now)
            net.pump()
            self.assertEqual(net.peers_found(second, info_hash), {(net.addr(first)[0], 5000 + first)})
            done = [e for e in net.events[net.addr(second)] if isinstance(e, w.DhtLookupDone)
                    and e.target == info_hash]
            self.assertEqual(done[0].peers, 1)
            # every node now knows the two others
            for i in range(3):
                self.assertEqual(len(net[i].table), 2)

    def test_lookup_walks_towards_the_target(self):
        net = DhtNet(40)
        for i in range(1, 40):
            net[i].bootstrap([net.addr(0) if i < 20 else net.addr(i - 1)], net.now)
            net.pump()
        info_hash = hashlib.sha1(b"far away").digest()
        net[39].get_peers(info_hash, net.now, 7777)
        net.pump()
        net[5].get_peers(info_hash, net.now)
        net.pump()
        self.assertEqual(net.peers_found(5, info_hash), {(net.addr(39)[0], 7777)})
        holders = [i for i in range(40) if net[i]._store.get(info_hash, net.now)]
        distance = sorted(range(40), key=lambda i: int.from_bytes(net[i].node_id, "big")
                          ^ int.from_bytes(info_hash, "big"))
        self.assertLessEqual(len(holders), w.DHT_K)
        self.assertIn(distance[0], holders)  # the closest node holds the announce

    def test_timeouts_failures_and_rate_limits(self):
        net = DhtNet(3)
        net[1].bootstrap([net.addr(0)], net.now)
        net.pump()
        self.assertEqual(len(net[1].table), 1)
        for target in (b"x" * 20, b"y" * 20):  # node 0 stays silent: after two misses it is bad
            net[1].get_peers(target, net.now)
            for _ in range(5):
                net.pump(1.0, lost={net.addr(0)})
        self.assertEqual(net[1].stats["dht timeouts"], 2)
        self.assertEqual(net[1].lookups, 0)
        self.assertEqual(net[1].table.closest(b"x" * 20), [])
        # a flood of queries from one address: a burst is answered, the rest dropped
        core = quiet_core()
        for i in range(1000):
            core.receive_datagram(bytes(w.KrpcQuery(b"%d" % i, "ping", {"id": ASKER})), HERE_ADDR, 5.0)
        answers = [m for m, _ in sent(core) if isinstance(m, w.KrpcResponse)]
        self.assertEqual(len(answers), 2 * w.DHT_ANSWERS_PER_IP)
        self.assertEqual(core.stats["dht rate limited"], 1000 - len(answers))
        # our own queries are bounded too: in flight and per second
        core = quiet_core()
        for i in range(500):
            core.ping(("10.0.%d.%d" % (i // 250, i % 250 + 1), 1), 10.0)
        self.assertEqual(len(core.data_to_send()), w.DHT_QUERIES_PER_SECOND)
        self.assertEqual(core.stats["dht queries deferred"], 500 - w.DHT_QUERIES_PER_SECOND)

    def test_late_answer_to_an_ended_lookup_leaves_the_new_one_running(self):
        net = DhtNet(3)
        me, target = net[2], b"t" * 20
        me.bootstrap([net.addr(0), net.addr(1)], net.now)
        net.pump()
        me.get_peers(target, net.now)
        later = net.now + w.DHT_LOOKUP_SECONDS + 1
        answers = []
        for data, dst in me.data_to_send():  # answered, but the answers come late
            net.cores[dst].receive_datagram(data, net.addr(2), later)
            answers += [(reply, dst) for reply, _ in net.cores[dst].data_to_send()]
        self.assertEqual(len(answers), 2)
        me.receive_datagram(*answers[0], later)  # the first ends the lookup: its time is up
        self.assertEqual(me.lookups, 0)
        me.get_peers(target, later)  # a new lookup for the same target
        me.receive_datagram(*answers[1], later)  # the old lookup's last answer
        self.assertEqual(me.lookups, 1)

    def test_peer_store_bounded_and_expiring(self):
        core = quiet_core()
        now = 1.0

        def announce(info_hash, ip, port):
            nonlocal now
            now += 0.01
            args = {"id": ASKER, "info_hash": info_hash, "port": port, "token": core._token(ip)}
            core.receive_datagram(bytes(w.KrpcQuery(b"a", "announce_peer", args)), (ip, 1), now)
            core.data_to_send()
        for i in range(w.DHT_STORE_HASHES + 100):
            announce(hashlib.sha1(b"%d" % i).digest(), "10.3.%d.%d" % (i // 250, i % 250 + 1), 1000)
        busy = b"b" * 20
        for i in range(w.DHT_STORE_PEERS + 50):
            announce(busy, "10.4.%d.%d" % (i // 250, i % 250 + 1), 2000 + i)
        self.assertEqual(len(core._store._hashes), w.DHT_STORE_HASHES)
        self.assertEqual(len(core._store._hashes[busy]), w.DHT_STORE_PEERS)
        newest = core._store.get(busy, now)
        self.assertEqual(len(newest), w.DHT_MAX_VALUES)
        self.assertEqual(newest[0][1], 2000 + w.DHT_STORE_PEERS + 49)  # most recent first
        self.assertIsNone(core._store._hashes.get(hashlib.sha1(b"0").digest()))  # oldest forgotten
        core.tick(now + w.DHT_PEER_TTL + 1)
        self.assertEqual(len(core._store), 0)

    def test_routing_table_bounded_ordered_and_spares(self):
        rng = random.Random(5)
        table = w.RoutingTable(OURS)
        for i in range(20_000):
            table.heard(rng.randbytes(20), ("10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 1), 1.0)
        self.assertLessEqual(len(table), 160 * w.DHT_K)
        self.assertTrue(all(len(b) <= w.DHT_K for b in table.buckets))
        self.assertEqual(len(table.buckets[0]), w.DHT_K)
        target = rng.randbytes(20)
        found = table.closest(target, 20)
        key = int.from_bytes(target, "big")
        distances = [int.from_bytes(c.id, "big") ^ key for c in found]
        self.assertEqual(distances, sorted(distances))
        self.assertEqual(found[0].id, min((c for b in table.buckets for c in b),
                                          key=lambda c: int.from_bytes(c.id, "big") ^ key).id)
        # a contact that misses twice gives way to a spare of its bucket
        victim = table.buckets[0][0]
        table.failed(victim.addr, 2.0)
        self.assertIn(victim, table.buckets[0])
        table.failed(victim.addr, 2.0)
        self.assertNotIn(victim, table.buckets[0])
        self.assertEqual(len(table.buckets[0]), w.DHT_K)
        for index in (0, 7, 159):
            self.assertEqual(table.index(table.random_id(index, rng.randbytes(20))), index)
        self.assertIsNone(table.heard(OURS, ("10.0.0.1", 1), 1.0))  # never ourselves

    # hostile nodes: one host posing as many nodes (a Sybil), floods

    def test_one_host_posing_as_many_nodes_cannot_hide_a_peer(self):
        """A Sybil first in our bootstrap (SybilNet); the peer announced on the real nodes is
        still found, our announce reaches them, and the Sybil holds 2 places in the table."""
        net = SybilNet(31)
        for i in range(1, 30):
            net[i].bootstrap([net.addr(0) if i < 15 else net.addr(i - 1)], net.now)
            net.pump(1.0)
        info_hash = hashlib.sha1(b"swarm").digest()
        net[29].get_peers(info_hash, net.now, 4000)
        net.pump(1.0)
        me, here = net[30], net.addr(30)
        me.bootstrap([(net.SYBIL_IP, 1), net.addr(0)], net.now)
        me.get_peers(info_hash, net.now, 5000)  # at once, as a worker does when it starts
        for _ in range(10):
            net.pump(1.0)
        for _ in range(3):  # and later, the table full
            net.events[here].clear()
            me.get_peers(info_hash, net.now, 5000)
            for _ in range(10):
                net.pump(1.0)
            found = net.peers_found(30, info_hash)
            self.assertIn((net.addr(29)[0], 4000), found)
            self.assertLessEqual(len(found & set(net.BOGUS)), w.DHT_PEERS_PER_IP)
        sybils = [c for c in me.table._by_addr.values() if c.addr[0] == net.SYBIL_IP]
        self.assertLessEqual(len(sybils), w.DHT_PER_IP)
        self.assertGreaterEqual(len(me.table), 10)  # real nodes are in
        holders = [i for i in range(30) if (here[0], 5000) in net[i]._store.get(info_hash, net.now)]
        self.assertTrue(holders)  # our announce reached real nodes

    def test_datagrams_over_the_budget_dropped_before_decoding(self):
        core = quiet_core()
        for _ in range(10_000):  # junk from one address
            core.receive_datagram(b"d1:t2:aa1:y1:xe", HERE_ADDR, 1.0)
        self.assertEqual(core.stats["dht malformed"], 2 * w.DHT_DATAGRAMS_PER_IP)
        self.assertEqual(core.stats["dht rate limited"], 10_000 - 2 * w.DHT_DATAGRAMS_PER_IP)
        self.assertEqual(core.read_delay(1.0), 0.0)
        # from many addresses: DHT_DATAGRAMS_PER_SECOND in all, then the socket is read later
        for i in range(3000):
            core.receive_datagram(b"x", ("10.5.%d.%d" % (i // 250, i % 250 + 1), 1), 2.0)
        self.assertEqual(core.stats["dht malformed"], 2 * w.DHT_DATAGRAMS_PER_IP + w.DHT_DATAGRAMS_PER_SECOND)
        self.assertAlmostEqual(core.read_delay(2.0), 1 / w.DHT_DATAGRAMS_PER_SECOND, places=4)
        self.assertEqual(core.read_delay(2.0 + 2 / w.DHT_DATAGRAMS_PER_SECOND), 0.0)
        # a node of ours is answered once the second has passed
        core.receive_datagram(bytes(w.KrpcQuery(b"aa", "ping", {"id": ASKER})), ("10.1.1.1", 1), 3.0)
        self.assertIsInstance(sent(core)[0][0], w.KrpcResponse)

    def test_node_id_follows_the_seed_and_config(self):
        seed = vectors()["keys"]["worker"]["seed_bs58check"]
        self.assertEqual(w.dht_node_id(seed), w.dht_node_id(seed))
        self.assertNotEqual(w.dht_node_id(seed), w.dht_node_id(vectors()["keys"]["master"]["seed_bs58check"]))
        self.assertEqual(len(w.dht_node_id(seed)), 20)
        default = w.Bugout("cfg", lsd=False)
        self.assertTrue(default.dht)
        self.assertEqual(default.dht_bootstrap, ["router.bittorrent.com:6881", "router.utorrent.com:6881",
                                                 "dht.transmissionbt.com:6881"])
        base = {"token": "t" * 20, "transferEncryptToken": KEY, "LOG_LEVEL": "warn"}
        env = {**base, "dht": "false",
               "dhtBootstrap": "127.0.0.1:1, 127.0.0.1:2", "dhtPort": "7001", "seed": seed}
        worker = w.Worker(env=env, folder=tempfile.gettempdir())
        self.assertEqual((worker.node.dht, worker.node.dht_bootstrap, worker.node.dht_port),
                         (False, ["127.0.0.1:1", "127.0.0.1:2"], 7001))
        self.assertTrue(w.Worker(env=base).node.dht)
        from master import Master
        self.assertFalse(Master(env={**base, "dht": "0"}).node.dht)
        self.assertTrue(Master(env=base).node.dht)
        with self.assertRaises(w.WorkerError):
            w.Bugout("cfg", dht_bootstrap=["no-port"])

    def test_wire_dht_bit_and_port_message(self):
        infohash, _ = w.infohash_of(vector_swarm())
        ours = w.PeerWire(infohash, b"-QP0100-aaaaaaaaaaaa", {"m": {}}, initiator=True, dht_port=6881)
        theirs = w.PeerWire(infohash, b"-WW0109-AAAAAAAAAAAA", {"m": {}}, initiator=False, dht_port=40000)
        pump(ours, theirs)
        self.assertEqual(ours.remote_reserved[7] & 1, 1)
        self.assertIn(w.DhtPort(40000), ours.events_received())
        self.assertIn(w.DhtPort(6881), theirs.events_received())
        plain = w.PeerWire(infohash, b"-QP0100-bbbbbbbbbbbb", {"m": {}}, initiator=True)
        other = w.PeerWire(infohash, b"-WW0109-BBBBBBBBBBBB", {"m": {}}, initiator=False, dht_port=40000)
        pump(plain, other)
        self.assertNotIn(w.DhtPort(40000), plain.events_received())  # no DHT bit: no port message


# DHT: generated bad input ###################################################

class TestKrpcBadInput(unittest.TestCase):
    def test_12000_generated_inputs(self):
        rng = random.Random(2024)
        core = w.DhtCore(OURS)
        core.bootstrap([("10.2.0.%d" % i, 6881) for i in range(1, 9)], 0.0)
        now, count, undecodable = 0.0, 0, 0
        for data, addr in krpc_inputs(core, 12_000, rng):
            try:
                w.parse_krpc(data)
            except w.DecodeError:
                undecodable += 1
            core.receive_datagram(data, addr, now)  # never raises
            core.data_to_send()
            core.events_received()
            count += 1
            now += 0.01
            if count % 50 == 0:
                core.tick(now)
                core.get_peers(rng.randbytes(20), now, 6881)
        self.assertEqual(count, 12_000)
        self.assertEqual(core.stats["dht malformed"], undecodable)
        self.assertGreater(undecodable, 3_000)
        self.assertGreater(core.stats["dht queries answered"], 500)
        self.assertGreater(core.stats["dht errors sent"], 500)
        self.assertGreater(core.stats["dht queries sent"], 500)
        self.assertLessEqual(len(core._pending), w.DHT_MAX_PENDING)
        self.assertLessEqual(core.lookups, w.DHT_MAX_LOOKUPS)
        self.assertLessEqual(len(core.table), 160 * w.DHT_K)
        self.assertLessEqual(len(core._store), w.DHT_STORE_HASHES * w.DHT_STORE_PEERS)


# DHT: real sockets and real JS DHT nodes ####################################

class TestDhtLoopback(AsyncTest):
    async def test_two_python_nodes_through_a_python_bootstrap_node(self):
        boot = await self.started(w.Dht(hashlib.sha1(b"boot").digest(), host="127.0.0.1", bootstrap=()))
        where = ["127.0.0.1:%d" % boot.port]
        a = await self.started(py_node("dht-swarm", dht=True, dht_bootstrap=where))
        await until(lambda: boot.stats["dht announces stored"], 10)
        started = time.monotonic()
        b = await self.started(py_node("dht-swarm", dht=True, dht_bootstrap=where))
        await until(lambda: a.address in b.peers and b.address in a.peers, 20)
        found = time.monotonic() - started
        self.assertEqual(await b.rpc(a.address, "echo", {"via": "dht"}), {"via": "dht", "echoedBy": "py"})
        self.assertEqual(await a.rpc(b.address, "echo", {}), {"echoedBy": "py"})
        await until(lambda: boot.stats["dht announces stored"] >= 2, 10)
        # the DHT bit and port message: each node's DHT knows the other's
        await until(lambda: len(a.discovery.dht.core.table) == 2 and len(b.discovery.dht.core.table) == 2, 10)
        self.assertEqual(a.discovery.dht.port, a.port)  # the TCP port's number, one port to forward
        await b.close()
        await a.close()
        await boot.close()
        await boot.close()  # idempotent
        print("\n  DHT: python found python through a python bootstrap node in %.3f s" % found,
              file=sys.stderr)
        self.assertLess(found, 10)


    async def test_a_failed_bootstrap_lookup_is_said_again_only_when_it_changes(self):
        # issue 25: offline, "dht bootstrap ...: name resolution" came every minute for each name
        dht = w.Dht(bytes(20), bootstrap=["router.example:6881"])
        outcomes = [OSError("no network"), OSError("no network"), OSError("no network"),
                    OSError("no such name"), [(socket.AF_INET, socket.SOCK_DGRAM, 0, "", ("127.0.0.1", 6881))],
                    OSError("no network")]

        async def getaddrinfo(*args, **kwargs):
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        with mock.patch.object(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo), \
                self.assertLogs("worker", "INFO") as logs:
            while outcomes:  # a round a minute, offline
                await dht._bootstrap()
        self.assertEqual([line.split(":", 2)[2].split(" (")[0] for line in logs.output],
                         ["dht bootstrap router.example:6881: no network",
                          "dht bootstrap router.example:6881: no such name",
                          "dht bootstrap router.example:6881 found again",
                          "dht bootstrap router.example:6881: no network"])


async def child_dht_js():
    """In a namespace: a Python node and a JS peer meet through a JS DHT; a JS DHT client uses ours."""
    ident = "dht-js-swarm"
    boot = await JsProcess("dht-node.js", {}).start()
    where = "127.0.0.1:%d" % boot.ready["port"]
    js = await JsProcess("peer.js", {"BO_ID": ident, "BO_MODE": "dht", "BO_DHT_BOOTSTRAP": where}).start()
    await boot.wait_for(lambda e: e["event"] == "announce" and e["port"] == js.ready["port"], 20)
    start = time.monotonic()
    py = await w.Bugout(ident, host="0.0.0.0", lsd=False, dht=True, dht_bootstrap=[where], trackers=[]).start()
    py.register("echo", lambda a, args: {**args, "echoedBy": "py"})
    await until(lambda: js.ready["address"] in py.peers, 30)
    found = time.monotonic() - start
    echo = await py.rpc(js.ready["address"], "echo", {"dht": True})
    js.send(cmd="rpc", id=1, address=py.address, call="echo", args={"from": "js"})
    back = (await js.wait_for(lambda e: e["event"] == "rpc-result" and e["id"] == 1))["result"]
    ours = await boot.wait_for(lambda e: e["event"] == "announce" and e["port"] == py.port, 20)
    # a JS DHT client bootstrapped from the Python node: find_node, get_peers, announce_peer
    client = await JsProcess("dht-node.js", {"DHT_BOOTSTRAP": "127.0.0.1:%d" % py.discovery.dht.port}).start()
    topic = hashlib.sha1(b"topic").hexdigest()
    client.send(cmd="announce", id=1, infoHash=topic, port=4242)
    announced = await client.wait_for(lambda e: e["event"] == "announced", 20)
    stored = py.discovery.dht.core._store.get(bytes.fromhex(topic), time.monotonic())
    client.send(cmd="lookup", id=2, infoHash=topic)
    dht_port = py.discovery.dht.port
    peer = await client.wait_for(lambda e: e["event"] == "peer" and e["fromPort"] == dht_port, 20)
    stats = dict(py.discovery.dht.stats)
    for closing in (py, js, client, boot):
        await closing.close()
    return {"found_s": found, "echo": echo, "back": back, "ours": ours, "announced": announced,
            "stored": stored, "peer": peer, "stats": stats, "js_port": js.ready["port"]}


async def child_dht_master():
    """In a namespace: a Worker finds the JS master over a JS DHT and runs its 20 jobs."""
    with tempfile.TemporaryDirectory(prefix="qx-dht-") as folder:
        tmp = Path(folder)
        (tmp / "task.py").write_text(MASTER_TASK)
        task = {"masterPath": str(tmp / "task.py"), "name": "task.py", "workerPath": "/workplace/task.py"}
        (tmp / "assets.json").write_text(json.dumps({"files": [task], "dependencies": []}))
        boot = await JsProcess("dht-node.js", {}).start()
        where = "127.0.0.1:%d" % boot.ready["port"]
        master = await JsProcess("master.js", {"QX_TOKEN": "dht-flow-token-0123456789", "QX_KEY": KEY,
                                               "QX_JOBS": "20", "QX_ASSETS": str(tmp / "assets.json"),
                                               "QX_DHT_BOOTSTRAP": where}).start()
        await boot.wait_for(lambda e: e["event"] == "announce" and e["port"] == master.ready["port"], 20)
        worker = w.Worker("dht-flow-token-0123456789", "dht-worker", "warn", KEY, env={}, folder=tmp / "w",
                          host="0.0.0.0", lsd=False, dht=True, dht_bootstrap=[where], get_batch=True, batch_size=5,
                          trackers=[])
        start = time.monotonic()
        await worker.start()
        await until(lambda: worker.master is not None, 30)
        found = time.monotonic() - start
        results = []
        while len(results) < 20:
            results.append(await master.wait_for(lambda e: e["event"] == "result" and e not in results, 60))
        elapsed = time.monotonic() - start
        await worker.stop()
        await master.close()
        await boot.close()
    return {"found_s": found, "all_s": elapsed, "results": [r["result"] for r in results],
            "master": master.ready["address"], "worker": worker.address, "lsd": worker.node.lsd}


async def child_dht_late_master():
    """In a namespace: a JS master that comes after the Worker's first lookups is found by a later one."""
    w.DHT_LOOKUP_AT, w.DHT_LOOKUP_ALONE = (0.0, 1.0), 1.0  # the schedule, shortened for the test
    with tempfile.TemporaryDirectory(prefix="qx-dht-") as folder:
        boot = await JsProcess("dht-node.js", {}).start()
        where = "127.0.0.1:%d" % boot.ready["port"]
        worker = w.Worker("dht-late-token-0123456789", "late", "warn", KEY, env={}, folder=Path(folder) / "w",
                          host="0.0.0.0", lsd=False, dht=True, dht_bootstrap=[where], trackers=[])
        await worker.start()
        await asyncio.sleep(2.5)
        assert worker.master is None
        master = await JsProcess("master.js", {"QX_TOKEN": "dht-late-token-0123456789", "QX_KEY": KEY,
                                               "QX_DHT_BOOTSTRAP": where}).start()
        start = time.monotonic()
        await until(lambda: worker.master is not None, 20)
        found, adopted = time.monotonic() - start, worker.master
        await worker.stop()
        await master.close()
        await boot.close()
    return {"found_s": found, "master": adopted, "js": master.ready["address"]}


async def child_dht_hostile(scenario, seconds=30.0):
    """In a namespace: a hostile DHT node (``scenario``) first in our bootstrap, a real bittorrent-dht
    node second. A peer of our swarm announces itself there 3 s after we start; do we find it?"""
    from support import HostileDht
    w.DHT_LOOKUP_AT, w.DHT_LOOKUP_ALONE = (0.0, 1.0, 2.0), 2.0  # the schedule, shortened for the test
    boot = await JsProcess("dht-node.js", {}).start()
    where = "127.0.0.1:%d" % boot.ready["port"]
    hostile = await HostileDht.start("127.0.5.1", [0] * (1 if scenario == "peers" else 64),
                                     sybil=scenario != "peers")
    victim = py_node("dht-hostile", dht=True, dht_bootstrap=["127.0.5.1:%d" % hostile.ports[0], where])
    dialed = []
    real_dial = victim.discovery._dial

    async def dial(host, port):
        dialed.append((host, port))
        return await real_dial(host, port)
    victim.discovery._dial = dial
    await victim.start()
    flood = None
    if scenario == "flood":
        async def junk():
            target = ("127.0.0.1", victim.discovery.dht.port)
            while True:
                for port, transport in hostile.transports.items():
                    transport.sendto(bytes(w.KrpcQuery(os.urandom(2), "ping", {"id": hostile.node_id(port)})), target)
                    transport.sendto(os.urandom(random.choice([10, 1400, 5000])), target)
                await asyncio.sleep(0.002)
        flood = asyncio.ensure_future(junk())
    await asyncio.sleep(3.0)
    master = py_node("dht-hostile", dht=True, dht_bootstrap=[where])
    master.discovery._on_dht_peers = lambda info_hash, peers: None  # it announces, dials nobody: find it
    await master.start()
    start, found, announced = time.monotonic(), None, None
    with contextlib.suppress(AssertionError):  # its lookup, too, may meet the Sybil (through us)
        await boot.wait_for(lambda e: e["event"] == "announce" and e["port"] == master.port, 10)
        announced = time.monotonic() - start
    with contextlib.suppress(AssertionError):
        await until(lambda: master.address in victim.peers, seconds)
        found = time.monotonic() - start
    if flood is not None:
        flood.cancel()
    table = victim.discovery.dht.core.table
    result = {"found_s": found, "announced_s": announced, "dials": len(dialed), "distinct dials": len(set(dialed)),
              "master dialed": sum(1 for d in dialed if d == ("127.0.0.1", master.port)),
              "hanging dialed": sum(1 for d in dialed if d in hostile.peers),
              "stats": {k: v for k, v in victim.stats.items() if "dial" in k},
              "dht": dict(victim.discovery.dht.stats), "table": len(table),
              "sybils in table": sum(1 for c in table._by_addr.values() if c.addr[0] == "127.0.5.1"),
              "hostile queries": dict(hostile.queries)}
    await victim.close()
    await master.close()
    hostile.close()
    await boot.close()
    return result


class TestDhtJs(unittest.TestCase):
    def setUp(self):
        js_ready()
        need((INTEROP / "node_modules" / "bittorrent-dht").is_dir(), "run npm ci in interop/")

    def test_python_and_js_peers_meet_through_a_js_dht(self):
        out = in_namespace(child_dht_js)
        self.assertEqual(out["echo"], {"dht": True, "echoedBy": "js"})
        self.assertEqual(out["back"], {"from": "js", "echoedBy": "py"})
        self.assertEqual(out["announced"]["error"], None)  # JS announce_peer to Python: accepted
        self.assertEqual(out["stored"], [["127.0.0.1", 4242]])
        self.assertEqual(out["peer"]["port"], 4242)  # JS get_peers answered from our store
        self.assertGreaterEqual(out["stats"]["dht queries answered"], 3)
        self.assertNotIn("dht malformed", out["stats"])
        print("\n  DHT: python found the JS peer through a JS bootstrap node in %.3f s" % out["found_s"],
              file=sys.stderr)
        self.assertLess(out["found_s"], 30)

    def test_job_flow_with_a_js_master_found_over_the_dht(self):
        out = in_namespace(child_dht_master, timeout=150)
        self.assertFalse(out["lsd"])
        self.assertEqual(sorted(r["jobID"] for r in out["results"]), list(range(20)))
        for r in out["results"]:
            self.assertEqual(r["data"], {"double": r["jobID"] * 2})
            self.assertEqual(r["worker"], {"id": out["worker"], "name": "dht-worker"})
        print("\n  DHT: worker found the JS master in %.3f s, 20 jobs done in %.3f s"
              % (out["found_s"], out["all_s"]), file=sys.stderr)
        self.assertLess(out["found_s"], 30)

    def test_master_started_later_is_found_by_a_later_lookup(self):
        out = in_namespace(child_dht_late_master)
        self.assertEqual(out["master"], out["js"])
        self.assertLess(out["found_s"], 20)

    def test_hostile_node_first_in_the_bootstrap_hides_nothing(self):
        """It answers first with 50 peers that hang (``peers``); poses as 64 nodes nearest to
        every target (``sybil``); and floods us too (``flood``): the peer is found, few dials hang."""
        for scenario in ("peers", "sybil", "flood"):
            with self.subTest(scenario):
                out = in_namespace(child_dht_hostile, scenario, timeout=100)
                print("\n  DHT, hostile node (%s): peer found in %s s; %d dials, %d of them hanging; "
                      "%d datagrams dropped" % (scenario, out["found_s"] and round(out["found_s"], 2),
                                                out["dials"], out["hanging dialed"],
                                                out["dht"].get("dht rate limited", 0)), file=sys.stderr)
                # found within the 30 s watched (before the DHT bounds: not in 30 s, each time);
                # how soon is a figure (1-5 s quiet, 17 s on a loaded machine), not a test
                self.assertIsNotNone(out["found_s"], out)
                self.assertEqual(out["master dialed"], 1)
                self.assertLessEqual(out["distinct dials"] - 1, w.DHT_PEERS_PER_IP)
                self.assertLessEqual(out["sybils in table"], w.DHT_PER_IP)
                if scenario == "flood":
                    self.assertGreater(out["dht"]["dht rate limited"], 10_000)


# Trackers and WebRTC ########################################################

class TestTrackerClient(unittest.TestCase):
    """The sans-I/O tracker core, fed the real frames of tracker-samples.json."""

    def test_real_frames_in_and_out(self):
        client = tracker_client()
        client.tick(0.0)
        [make] = client.events_received()
        self.assertEqual(len(make.offer_ids), 5)
        self.assertTrue(all(w._is_binary_id(i) for i in make.offer_ids))
        real = sample("client->tracker announce (with offers)")
        offers = [(o["offer_id"], o["offer"]["sdp"]) for o in real["offers"]]
        client.send_announce(offers, 0.0)
        [text] = client.data_to_send()
        self.assertEqual(json.loads(text), {**real, "downloaded": 0})
        self.assertEqual(list(json.loads(text)), list(real))  # the JS key order too
        client.receive_frame(samples()["tracker->client announce response"]["raw_json_text"], 0.1)
        self.assertEqual(client.events_received(), [w.TrackerUpdate(1, 0, 120.0)])
        self.assertEqual(client.interval, 120.0)
        # another peer's offer in, our answer out, byte for byte as JS wrote it
        relayed = sample("tracker->other client: relayed offer")
        client.receive_frame(samples()["tracker->other client: relayed offer"]["raw_json_text"], 1.0)
        [offer] = client.events_received()
        other = sample_peer_ids()[1].decode()
        self.assertEqual(offer, w.RelayedOffer(other, relayed["offer_id"], relayed["offer"]["sdp"]))
        answer = sample("client->tracker answer (to_peer_id)")
        self.assertTrue(client.send_answer(offer.peer_id, offer.offer_id, answer["answer"]["sdp"]))
        self.assertEqual(client.data_to_send(),
                         [samples()["client->tracker answer (to_peer_id)"]["raw_json_text"]])

    def test_pair_offer_answer_matched_by_offer_id(self):
        tracker = FakeTracker()
        a = tracker.add(tracker_client(b"-QP0100-aaaaaaaaaaaa"))
        b = tracker.add(tracker_client(b"-QP0100-bbbbbbbbbbbb"))
        for client in (a, b):
            client.tick(0.0)
        [make_a], [_] = a.events_received(), b.events_received()
        b.send_announce([], 0.0)
        a.send_announce([(make_a.offer_ids[0], "sdp-a0"), (make_a.offer_ids[1], "sdp-a1")], 0.0)
        tracker.pump(0.0)
        self.assertEqual([type(e) for e in a.events_received()], [w.TrackerUpdate])
        events = [e for e in b.events_received() if not isinstance(e, w.TrackerUpdate)]
        self.assertEqual(events, [w.RelayedOffer(a._peer_id, make_a.offer_ids[0], "sdp-a0")])
        self.assertEqual(a.pending_offers, 2)
        b.send_answer(a._peer_id, make_a.offer_ids[0], "sdp-b")
        b.send_answer(a._peer_id, make_a.offer_ids[0], "sdp-b again")  # a second answer is ignored
        b.send_answer(a._peer_id, "x" * 20, "sdp-b unknown")
        tracker.pump(0.5)
        self.assertEqual(a.events_received(), [w.RelayedAnswer(b._peer_id, make_a.offer_ids[0], "sdp-b")])
        self.assertEqual(a.stats["answers unexpected"], 2)
        self.assertEqual(a.pending_offers, 1)

    def test_interval_announces_and_offer_expiry(self):
        client = tracker_client(offer_timeout=50.0)
        client.tick(0.0)
        [make] = client.events_received()
        client.tick(0.0)
        self.assertEqual(client.events_received(), [])  # one MakeOffers at a time
        client.send_announce([(make.offer_ids[0], "sdp")], 0.0)
        client.receive_frame({"action": "announce", "interval": 1, "info_hash": client._info_hash}, 0.1)
        client.events_received()
        self.assertEqual(client.interval, w.TRACKER_MIN_INTERVAL)  # a floor against hot loops
        self.assertEqual(client.next_deadline(), w.TRACKER_MIN_INTERVAL)
        client.tick(4.9)
        self.assertEqual(client.events_received(), [])
        client.tick(5.0)
        [make2] = client.events_received()
        self.assertIsInstance(make2, w.MakeOffers)
        client.send_announce([], 5.0)
        self.assertNotIn('"event"', client.data_to_send()[-1])  # "started" only once per socket
        self.assertEqual(client.next_deadline(), 10.0)
        client.tick(50.0)
        self.assertIn(w.DropOffer(make.offer_ids[0], "unanswered"), client.events_received())
        fixed = tracker_client(interval=0.05)
        fixed.receive_frame({"action": "announce", "interval": 120, "info_hash": fixed._info_hash}, 0.0)
        self.assertEqual(fixed.interval, 0.05)

    def test_offers_never_pile_up(self):
        client = tracker_client(numwant=3, interval=1.0)
        dropped = 0
        for now in map(float, range(300)):
            client.tick(now)
            events = client.events_received()
            for event in events:
                if isinstance(event, w.MakeOffers):
                    client.send_announce([(i, "sdp") for i in event.offer_ids], now)
            events += client.events_received()
            dropped += sum(isinstance(e, w.DropOffer) for e in events)
            self.assertLessEqual(client.pending_offers, 6)
        self.assertEqual(client.stats["announces"], 300)
        self.assertEqual(dropped, 300 * 3 - 6)

    def test_ignored_frames_and_failures(self):
        client = tracker_client()
        ih = client._info_hash
        for frame in ["not json", "[]", "[" * 1_000_000, {"action": "scrape"}, {"action": "announce", "info_hash": "x" * 20},
                      {"action": "announce", "info_hash": ih, "peer_id": client._peer_id, "offer": {}},
                      {"action": "announce", "info_hash": ih, "peer_id": "short", "offer_id": "y" * 20,
                       "offer": {"type": "offer", "sdp": "v=0"}},
                      {"action": "announce", "info_hash": ih, "peer_id": "p" * 20, "offer_id": "\u0100" * 20,
                       "offer": {"type": "offer", "sdp": "v=0"}},
                      {"action": "announce", "info_hash": ih, "peer_id": "p" * 20, "offer_id": "y" * 20,
                       "offer": {"type": "answer", "sdp": "v=0"}},
                      {"action": "announce", "info_hash": ih, "interval": True}]:
            client.receive_frame(frame, 1.0)
        self.assertEqual(client.events_received(), [])
        client.receive_frame({"action": "announce", "info_hash": ih, "failure reason": "invalid info_hash"}, 1.0)
        self.assertEqual(client.events_received(), [w.TrackerWarning("invalid info_hash")])

    def test_reconnect_backoff_and_close(self):
        client = w.TrackerClient("ws://t", SAMPLE_INFOHASH, sample_peer_ids()[0], random=lambda n: b"\0" * n)
        self.assertTrue(client.start_connecting(0.0))
        self.assertFalse(client.start_connecting(0.0))
        delays, now = [], 0.0
        for _ in range(10):
            client.connection_lost(now)
            delays.append(client.next_deadline() - now)
            now = client.next_deadline()
            self.assertFalse(client.start_connecting(now - 0.01))
            self.assertTrue(client.start_connecting(now))
        self.assertEqual(delays[:4], [5.0, 10.0, 20.0, 40.0])
        self.assertEqual(delays[-1], w.RECONNECT_LAST)
        client.connection_made(now)
        client.tick(now)
        [make] = client.events_received()
        client.send_announce([(make.offer_ids[0], "sdp")], now)
        client.receive_frame({"action": "announce", "interval": 120, "info_hash": client._info_hash}, now)
        self.assertEqual(client.retries, 0)  # a real answer resets the back-off
        client.data_to_send()
        client.close(now)
        [stopped] = client.data_to_send()
        self.assertEqual(json.loads(stopped)["event"], "stopped")
        self.assertNotIn("offers", json.loads(stopped))
        self.assertIn(w.DropOffer(make.offer_ids[0], "closing"), client.events_received())
        client.close(now)
        self.assertEqual((client.state, client.data_to_send()), (w.TrackerState.CLOSED, []))
        with self.assertRaises(w.InvalidState):
            client.connection_made(now)

    def test_garbage_frames_raise_nothing(self):
        client = tracker_client()
        client.tick(0.0)
        [make] = client.events_received()
        client.send_announce([(i, "sdp") for i in make.offer_ids], 0.0)
        frames = [sample(kind) for kind in samples()]
        for frame in frames:
            frame.update(info_hash=client._info_hash, offer_id=make.offer_ids[0])
            for key in list(frame):
                for value in (None, 1, -1.5, True, "x", "y" * 20, [], {}, {"type": "offer"},
                              {"type": "answer", "sdp": 1}, {"type": "answer", "sdp": "v=0"}):
                    client.receive_frame({**frame, key: value}, 1.0)
        texts = [json.dumps(f).encode("latin-1", "replace") for f in frames]
        for data in mutations(texts, 3000, random.Random(5)):
            client.receive_frame(data.decode("latin-1"), 2.0)
            client.receive_frame(data, 2.0)
            client.tick(2.0)
        self.assertEqual({type(e) for e in client.events_received()} - {
            w.TrackerUpdate, w.TrackerWarning, w.RelayedOffer, w.RelayedAnswer, w.DropOffer, w.MakeOffers}, set())
        self.assertEqual(client.state, w.TrackerState.OPEN)

    def test_lost_connection_drops_offers(self):
        client = tracker_client()
        client.tick(0.0)
        [make] = client.events_received()
        client.connection_lost(1.0)
        client.send_announce([(make.offer_ids[0], "sdp")], 1.0)  # offers made too late
        self.assertEqual(client.events_received(), [w.DropOffer(make.offer_ids[0], "tracker not connected")])
        self.assertEqual(client.data_to_send(), [])

    # bounds: a hostile tracker costs a frame budget, a log line a minute, no aiortc work

    def test_frame_budget_read_later_then_a_flood_is_left_with_backoff(self):
        client = w.TrackerClient("ws://t", SAMPLE_INFOHASH, sample_peer_ids()[0], random=lambda n: b"\0" * n)
        client.start_connecting(0.0)
        client.connection_made(0.0)
        update = {"action": "announce", "interval": 120, "info_hash": client._info_hash}
        for _ in range(int(w.TRACKER_FRAME_BURST) + 10):  # a burst at once: what is over it is dropped
            client.receive_frame(update, 0.0)
        self.assertEqual(len(client.events_received()), w.TRACKER_FRAME_BURST)
        self.assertEqual(client.stats["frames over budget"], 10)
        self.assertAlmostEqual(client.read_delay(0.0), 1 / w.TRACKER_FRAMES_PER_SECOND, places=4)
        # an adapter that waits as told reads at the budget's rate; after TRACKER_FLOOD_SECONDS
        # of that, the tracker is left, and its back-off doubles for each flood
        now, taken = 0.0, 0
        while client.state is w.TrackerState.OPEN:
            now += client.read_delay(now)
            client.receive_frame(update, now)
            taken += 1
        self.assertAlmostEqual(now, w.TRACKER_FLOOD_SECONDS, delta=1.0)
        self.assertAlmostEqual(taken / now, w.TRACKER_FRAMES_PER_SECOND, delta=1.0)
        self.assertEqual(client.stats["frames over budget"], 10)
        flood = [e for e in client.events_received() if isinstance(e, w.TrackerWarning)]
        self.assertEqual([e.kind for e in flood], ["flood"])
        self.assertIn("more than 20 frames a second", flood[0].message)
        self.assertEqual(client.state, w.TrackerState.WAITING)
        self.assertAlmostEqual(client.next_deadline() - now, 2 * w.RECONNECT_FIRST)  # retries 0, floods 1
        now = client.next_deadline()
        self.assertTrue(client.start_connecting(now))
        client.connection_made(now)
        client.receive_frame(update, now)
        self.assertEqual(client.retries, 0)  # a good answer resets the retries, not the floods
        client.connection_lost(100.0, "sent a frame over 128 KiB")  # the adapter's other bound
        self.assertAlmostEqual(client.next_deadline() - 100.0, 4 * w.RECONNECT_FIRST)
        self.assertEqual(client.floods, 2)
        # a tracker that keeps to the budget is never left
        calm = tracker_client()
        for i in range(3000):
            calm.receive_frame(update, i * 0.1)
        self.assertEqual((calm.state, calm.stats["frames over budget"]), (w.TrackerState.OPEN, 0))

    def test_messages_said_once_a_minute_per_kind_printable_and_short(self):
        client = tracker_client()
        ih = client._info_hash
        failure = {"action": "announce", "info_hash": ih, "failure reason": "bad\n\x1b[31m" + "x" * 1000}
        warning = {"action": "announce", "info_hash": ih, "interval": 120, "warning message": "slow down"}
        said = []
        for i in range(1300):  # 130 s at 10 frames a second: under the frame budget
            client.receive_frame(failure if i % 2 else warning, i * 0.1)
            said += [e for e in client.events_received() if isinstance(e, w.TrackerWarning)]
        self.assertEqual([(e.kind, e.held) for e in said],
                         [("warning message", 0), ("failure reason", 0), ("warning message", 299),
                          ("failure reason", 299), ("warning message", 299), ("failure reason", 299)])
        text = said[1].message
        self.assertTrue(text.startswith("bad ?[31mxxx"), text)
        self.assertTrue(text.endswith("... (1009 characters)"), text)
        self.assertLess(len(text), w.TRACKER_MESSAGE_CHARS + 30)
        self.assertTrue(text.isprintable())
        self.assertEqual(client.stats["failures"], 650)

    def test_sdp_caps_and_offer_rate_before_any_event(self):
        client = tracker_client()
        ih = client._info_hash

        def offer(sdp, offer_id=None):
            return {"action": "announce", "info_hash": ih, "peer_id": "p" * 20,
                    "offer_id": offer_id or os.urandom(20).decode("latin-1"), "offer": {"type": "offer", "sdp": sdp}}
        candidate = "a=candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host\r\n"
        client.receive_frame(offer("v=0\r\n" + "a=x\r\n" * (w.RTC_MAX_SDP // 5)), 0.0)
        client.receive_frame(offer("v=0\r\n" + candidate * (w.RTC_MAX_CANDIDATES + 1)), 0.0)
        self.assertEqual(client.events_received(), [])
        self.assertEqual(client.stats["offers refused: SDP too large"], 2)
        client.receive_frame(offer("v=0\r\n" + candidate * w.RTC_MAX_CANDIDATES), 0.0)
        self.assertEqual(len(client.events_received()), 1)  # at the caps: taken
        # relayed offers: a burst, then TRACKER_OFFERS_PER_SECOND; the rest refused unread
        for i in range(30):
            client.receive_frame(offer("v=0"), 0.5)
        self.assertEqual(len(client.events_received()), w.TRACKER_OFFER_BURST - 1)
        self.assertEqual(client.stats["offers refused: too many"], 30 - (w.TRACKER_OFFER_BURST - 1))
        client.receive_frame(offer("v=0"), 0.5 + 1 / w.TRACKER_OFFERS_PER_SECOND)
        self.assertEqual(len(client.events_received()), 1)
        # an answer over the caps to one of our offers: that offer is dropped, aiortc never sees it
        client.tick(10.0)
        [make] = [e for e in client.events_received() if isinstance(e, w.MakeOffers)]
        client.send_announce([(make.offer_ids[0], "sdp")], 10.0)
        client.receive_frame({"action": "announce", "info_hash": ih, "peer_id": "q" * 20,
                              "offer_id": make.offer_ids[0],
                              "answer": {"type": "answer", "sdp": candidate * 51}}, 10.5)
        self.assertEqual(client.events_received(), [w.DropOffer(make.offer_ids[0], "answer too large")])
        self.assertEqual((client.pending_offers, client.stats["answers refused: SDP too large"]), (0, 1))


class TestWebRtcSettings(AsyncTest):
    def test_ice_servers(self):
        stun, turn, turns = w.parse_ice_servers(
            "stun:stun.example.org:3478, turn:al%40ice:p%3Ass@turn.example.org:3478?transport=tcp,"
            "turns:u:p@[2001:db8::1]:5349")
        self.assertEqual(stun, w.IceServer("stun:stun.example.org:3478"))
        self.assertEqual(turn, w.IceServer("turn:turn.example.org:3478?transport=tcp", "al@ice", "p:ss"))
        self.assertEqual(turns, w.IceServer("turns:[2001:db8::1]:5349", "u", "p"))
        self.assertEqual(w.parse_ice_servers(""), [])
        self.assertEqual(w.parse_ice_servers([]), [])
        self.assertEqual(public_default("DEFAULT_ICE_SERVERS"),
                         ("stun:stun.l.google.com:19302", "stun:global.stun.twilio.com:3478"))
        for bad in ["stun:", "http://x", "turn:host:3478", "turn::p@h:1", "stun:h:1?transport=sctp",
                    "stun:h:123456", "stun:a b"]:
            with self.assertRaises(w.WorkerError, msg=bad):
                w.parse_ice_servers(bad)

    def test_trackers_and_env_keys(self):
        self.assertEqual(public_default("DEFAULT_TRACKERS"), ("wss://hub.bugout.link",
                         "wss://tracker.openwebtorrent.com", "wss://tracker.btorrent.xyz"))
        self.assertEqual(w.parse_trackers(" ws://127.0.0.1:8000 ,wss://t.example/announce,"),
                         ["ws://127.0.0.1:8000", "wss://t.example/announce"])
        for bad in ["http://t.example", "udp://t.example:80", "ws://"]:
            with self.assertRaises(w.WorkerError, msg=bad):
                w.parse_trackers(bad)
        base = {"token": "t" * 20, "transferEncryptToken": KEY}
        with tempfile.TemporaryDirectory() as tmp:
            def node(**env):
                return w.Worker(env={**base, "dht": "false", **env}, folder=tmp, loglevel="warn").node
            rtc = node(trackers="ws://127.0.0.1:1,wss://t.example", iceServers="stun:s.example:3478",
                       maxPeers="7").webrtc
            self.assertEqual((rtc.trackers, rtc.ice_servers, rtc.max_peers),
                             (["ws://127.0.0.1:1", "wss://t.example"], [w.IceServer("stun:s.example:3478")], 7))
            self.assertEqual((node(trackers="", iceServers="").webrtc.trackers, node().webrtc.max_peers),
                             ([], w.DEFAULT_MAX_PEERS))
            from unittest import mock
            with mock.patch.object(w, "DEFAULT_TRACKERS", ("wss://default.example",)):
                self.assertEqual(node().webrtc.trackers, ["wss://default.example"])
                self.assertEqual(node(trackers="").webrtc.trackers, [])
            from master import Master
            m = Master("t" * 20, transfer_encrypt_token=KEY,
                       env={"trackers": "ws://127.0.0.1:2", "maxPeers": "3", "dht": "false"})
            self.assertEqual((m.node.webrtc.trackers, m.node.webrtc.max_peers), (["ws://127.0.0.1:2"], 3))

    async def test_without_aiortc_one_info_line_and_tcp_goes_on(self):
        saved = {name: sys.modules.get(name) for name in ("aiortc",)}
        sys.modules["aiortc"] = None  # import aiortc now raises ImportError

        def restore():
            for name, module in saved.items():
                sys.modules.pop(name, None) if module is None else sys.modules.__setitem__(name, module)
        self.addCleanup(restore)
        with self.assertLogs("worker", "INFO") as logs:
            a = await self.started(py_node("no-aiortc", trackers=["ws://127.0.0.1:9"]))
        b = await self.started(py_node("no-aiortc", peers=["127.0.0.1:%d" % a.port]))
        await until(lambda: a.address in b.peers)
        self.assertEqual(await b.rpc(a.address, "echo", {}), {"echoedBy": "py"})
        self.assertFalse(a.webrtc.running)
        off = [line for line in logs.output if "WebRTC is off" in line]
        self.assertEqual(len(off), 1, logs.output)
        self.assertIn("aiortc", off[0])


class TestRtcConnection(AsyncTest):
    async def test_wire_over_data_channel_pair_in_memory(self):
        """Two Bugouts joined by RtcConnections over fake channels: chunks of 16 KiB at most."""
        a, b = (self.will_close(w.Bugout("rtc-mem", lsd=False, dht=False, listen=False, trackers=[]))
                for _ in range(2))
        for node in (a, b):
            node.register("echo", lambda address, args: args)
        conns = [w.RtcConnection(n.webrtc, FakePeerConnection(), offerer=n is a) for n in (a, b)]
        channels = [FakeChannel(), FakeChannel()]
        channels[0].peer, channels[1].peer = conns[1], conns[0]
        for conn, channel in zip(conns, channels):
            conn.attach(channel)
        await until(lambda: a.address in b.peers and b.address in a.peers, 5)
        big = {"blob": "z" * 1_000_000}
        self.assertEqual(await b.rpc(a.address, "echo", big, timeout=10), big)
        self.assertEqual((a.connections(), b.connections()), (1, 1))
        for node in (a, b):
            await node.close()
        for channel in channels:
            self.assertLessEqual(max(channel.sizes), w.RTC_CHUNK)
            self.assertGreater(sum(channel.sizes), 1_000_000)

    async def test_sctp_guard_bounds_what_aiortc_reassembles(self):
        """aiortc's own SCTP receive path, guarded: whole messages pass, no message grows past the
        cap, chunks held (their first never comes) stop at RTC_MAX_BUFFERED, streams at 16."""
        need(importlib.util.find_spec("aiortc"), "pip install -r requirements.txt (aiortc)")
        from aiortc import rtcsctptransport as sctp_module

        def association(cap):
            sctp = sctp_module.RTCSctpTransport(types.SimpleNamespace(state="new"))
            sctp._last_received_tsn, got, over = 0, [], []

            async def receive(stream_id, protocol, data):
                got.append(data)
            sctp._receive = receive
            return sctp, w.SctpGuard.install(sctp, cap, over.append), got, over

        def chunks(data, tsn, stream_id=1, seq=0, size=1200, first=True):
            out = []
            for start in range(0, len(data), size):
                chunk = sctp_module.DataChunk(
                    (sctp_module.SCTP_DATA_FIRST_FRAG if start == 0 and first else 0)
                    | (sctp_module.SCTP_DATA_LAST_FRAG if start + size >= len(data) else 0))
                chunk.tsn, chunk.stream_id, chunk.stream_seq, chunk.protocol = tsn + len(out), stream_id, seq, 53
                chunk.user_data = data[start:start + size]
                out.append(chunk)
            return out

        sctp, guard, got, over = association(100_000)
        tsn, messages = 1, [os.urandom(16 * 1024) for _ in range(20)] + [os.urandom(100_000)]
        for seq, message in enumerate(messages):
            for chunk in chunks(message, tsn, seq=seq):
                await sctp._receive_data_chunk(chunk)
                tsn += 1
        await asyncio.sleep(0)
        self.assertEqual((got, over, guard.held()), (messages, [], 0))
        # one byte more than the cap: refused when the cap is passed, never whole, reported once
        fed = 0
        for chunk in chunks(bytes(100_001 + 50 * 1200), tsn, seq=len(messages)):
            await sctp._receive_data_chunk(chunk)
            fed += len(chunk.user_data)
            if guard.tripped:
                break
        await asyncio.sleep(0)
        self.assertEqual(len(got), len(messages))
        self.assertLess(fed, 100_001 + 1200)
        self.assertEqual(over, ["message: a data-channel message over 100000 bytes"])
        self.assertEqual(guard.held(), 0)
        # chunks whose first never comes: held up to RTC_MAX_BUFFERED (small ones weigh 1 KiB each)
        sctp, guard, got, over = association(w.DEFAULT_MAX_MESSAGE)
        held = 0
        for chunk in chunks(bytes(10_000_000), 2, size=100, first=False):  # TSN 1 never comes
            await sctp._receive_data_chunk(chunk)
            if guard.tripped:
                break
            held += 1
        await asyncio.sleep(0)
        self.assertEqual(held, w.RTC_MAX_BUFFERED // w.RTC_CHUNK_WEIGHT)
        self.assertEqual(len(over), 1)
        self.assertTrue(over[0].startswith("held: "), over)
        # a data channel each, on more than RTC_MAX_STREAMS streams
        sctp, guard, got, over = association(w.DEFAULT_MAX_MESSAGE)
        for stream_id in range(w.RTC_MAX_STREAMS + 5):
            for chunk in chunks(b"hi", stream_id + 1, stream_id=stream_id):
                await sctp._receive_data_chunk(chunk)
        await asyncio.sleep(0)
        self.assertEqual(len(got), w.RTC_MAX_STREAMS)
        self.assertEqual(len(sctp._inbound_streams), w.RTC_MAX_STREAMS)
        self.assertEqual(over, ["streams: more than %d data channels" % w.RTC_MAX_STREAMS])


# WebRTC for real: aiortc, @roamhq/wrtc and a local tracker in a namespace ####

async def child_rtc_python_python():
    """Two Python nodes through the tracker (and a dead one); the tracker restarts; a third joins."""
    w.RECONNECT_FIRST = 0.3  # the tracker restarts below: come back quickly
    tracker = await local_tracker()
    url, dead = tracker.ready["url"], "ws://127.0.0.1:9"  # nothing listens on 9
    a = await rtc_node("rtc-pp", [dead, url])
    started = time.monotonic()
    b = await rtc_node("rtc-pp", [url, dead])
    await until(lambda: a.address in b.peers and b.address in a.peers, 30)
    connected = time.monotonic() - started
    result = {"connected_s": connected, "echo": await b.rpc(a.address, "echo", {"x": "é"}),
              "unknown": await a.rpc(b.address, "nope")}
    a.send({"to": "all"})
    b.send("only a", address=a.address)
    await until(lambda: ("message", a.address, {"to": "all"}) in b.events
                and ("message", b.address, "only a") in a.events)
    await asyncio.sleep(0.5)
    result["wires"] = [len(a._connections), len(b._connections)]
    result["only_webrtc"] = only_webrtc(a, b)
    # the tracker goes away and comes back on its port: a newcomer still meets both
    port = tracker.ready["port"]
    await tracker.close()
    tracker = await local_tracker(TR_PORT=port)
    c = await rtc_node("rtc-pp", [url])
    await until(lambda: {a.address, b.address} <= set(c.peers), 30)
    result["newcomer_echo"] = await c.rpc(a.address, "echo", {"via": "restarted tracker"})
    result["dead_tracker_retries"] = a.webrtc.sessions[0].client.retries
    result["interval"] = a.webrtc.sessions[1].client.interval  # the tracker's: 600 s / 5
    b_id = b.peer_id.decode("latin-1")
    await b.close()
    await until(lambda: ("left", b.address) in a.events, 10)
    await until(lambda: not any(c.address == b.address for c in a._connections), 10)
    await until(lambda: not any(c.remote_id == b_id for c in a.webrtc.connections), 10)
    await c.close()
    await a.close()
    await tracker.close()
    result["after_close"] = [len(n.webrtc.connections) for n in (a, b, c)]
    return result


async def child_rtc_python_js(python_offers):
    """Python and JS meet through the tracker; only one side makes offers.

    The offering side starts second, so the tracker has someone to relay to.
    """
    tracker = await local_tracker()
    url = tracker.ready["url"]
    js = JsProcess("peer.js", {"BO_ID": "rtc-js", "BO_MODE": "webrtc", "BO_TRACKER": url,
                               "BO_NUMWANT": "0" if python_offers else "5"})
    if python_offers:
        await js.start()
    started = time.monotonic()
    py = await rtc_node("rtc-js", [url], numwant=5 if python_offers else 0)
    if not python_offers:
        await js.start()
    js_address = js.ready["address"]
    await js.wait_for(lambda e: e["event"] == "seen" and e["address"] == py.address, 30)
    await until(lambda: js_address in py.peers, 30)
    result = {"connected_s": time.monotonic() - started, "only_webrtc": only_webrtc(py),
              "python_offered": [c.initiator for c in py._connections]}
    result["py_to_js"] = await py.rpc(js_address, "echo", {"n": "é", "pad": "p" * 40_000})
    result["py_to_js_unknown"] = await py.rpc(js_address, "nope", {})
    js.send(cmd="rpc", id=1, address=py.address, call="echo", args={"from": "js"})
    result["js_to_py"] = (await js.wait_for(lambda e: e["event"] == "rpc-result" and e["id"] == 1))["result"]
    py.send({"hello": "all"})
    py.send({"hello": "you"}, address=js_address)
    for message in ({"hello": "all"}, {"hello": "you"}):
        await js.wait_for(lambda e, m=message: e["event"] == "message" and e["message"] == m)
    js.send(cmd="send", address=py.address, message={"js": "you"})
    await until(lambda: ("message", js_address, {"js": "you"}) in py.events)
    await py.close()
    await js.wait_for(lambda e: e["event"] == "left" and e["address"] == py.address, 10)
    await js.close()
    await tracker.close()
    return result


async def child_rtc_js_master_worker(count=200):
    """The JS master and a Worker, over WebRTC and over TCP: how soon it is found, jobs/s."""
    tracker = await local_tracker()
    with tempfile.TemporaryDirectory() as tmp:
        js_master_assets(Path(tmp))
        result = {transport: await js_master_run(tmp, transport, tracker.ready["url"], count)
                  for transport in ("webrtc", "tcp")}
    await tracker.close()
    return result


async def child_rtc_master_py():
    """master.py and a Worker: a 5 MB asset over WebRTC, then jobs/s over WebRTC and TCP."""
    from master import Master
    tracker = await local_tracker()
    url = tracker.ready["url"]
    result = {}
    blob = os.urandom(5 * 1024 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_assets(Path(tmp) / "master", DEFAULT_FILES)
        (Path(tmp) / "master/workplace/data/blob.bin").write_bytes(blob)
        files.append({"masterPath": "/workplace/data/blob.bin", "name": "blob.bin",
                      "workerPath": "/workplace/data/blob.bin"})
        for transport in ("webrtc", "tcp"):
            token = "rtc-mpy-" + transport
            rtc = {"trackers": [url], "ice_servers": []} if transport == "webrtc" else {"trackers": []}
            master = Master(token, {"files": files, "dependencies": []}, None, None, KEY,
                            folder=Path(tmp) / "master", env={}, host="127.0.0.1", lsd=False, dht=False, **rtc)
            await master.start()
            peers = [] if transport == "webrtc" else ["127.0.0.1:%d" % master.port]
            folder = Path(tmp) / ("w-" + transport)
            worker = w.Worker(token, "w", "warn", KEY, env={}, folder=folder, host="127.0.0.1", lsd=False,
                              dht=False, peers=peers, batch_size=10, **rtc)
            started = time.monotonic()
            await worker.start()
            await until(lambda worker=worker: worker.keeper.runner is not None, 120)
            result[transport] = {
                "assets_s": time.monotonic() - started, "only_webrtc": only_webrtc(worker.node, master.node),
                "blob_ok": (folder / w.ASSET_FOLDER / "workplace/data/blob.bin").read_bytes() == blob,
                "unbatched": await flow_rate(master, worker, 300, False),
                "batched": await flow_rate(master, worker, 1000, True, start=1000)}
            await worker.stop()
            await master.close()
    await tracker.close()
    return result


async def child_rtc_hygiene(seconds=15.0, interval=0.05, max_peers=6):
    """Hundreds of announce cycles with a peer that answers with dead answers."""
    tracker = await local_tracker()
    url = tracker.ready["url"]
    nodes = []
    for _ in range(2):
        node = w.Bugout("rtc-hygiene", lsd=False, dht=False, listen=False, trackers=[url], ice_servers=[],
                        max_peers=max_peers, announce_interval=interval)
        node.register("echo", lambda address, args: args)
        node.webrtc.connect_timeout = 1.0
        nodes.append(await node.start())
    a, b = nodes
    await until(lambda: a.address in b.peers and b.address in a.peers, 30)
    stop = asyncio.Event()
    answerer = asyncio.ensure_future(bad_answerer(url, a.infohash, stop))
    peak = peak_gc = 0
    wires_max = 0
    started = time.monotonic()
    next_gc = started

    def fewest_announces():
        return min(n.webrtc.sessions[0].client.stats["announces"] for n in nodes)

    # at least `seconds`, and on a slow machine on until 200 announces each (60 s at most)
    while (time.monotonic() - started < seconds or fewest_announces() < 200) \
            and time.monotonic() - started < 60:
        await asyncio.sleep(0.02)
        peak = max(peak, *(len(n.webrtc.connections) for n in nodes))
        wires_max = max(wires_max, *(len(n._connections) for n in nodes))
        if time.monotonic() >= next_gc:
            next_gc += 1.0
            peak_gc = max(peak_gc, len(live_peer_connections()))
    stop.set()
    answered = await answerer
    result = {"announces": [n.webrtc.sessions[0].client.stats["announces"] for n in nodes],
              "peak_live": peak, "peak_gc": peak_gc, "wires_max": wires_max, "answered": answered,
              "timeouts": [n.stats["webrtc timeouts"] for n in nodes],
              "declined": [n.stats["webrtc answers declined"] + n.stats["webrtc offers declined"] for n in nodes],
              "bound": max_peers + 2 * w.TRACKER_NUMWANT,
              "echo": await a.rpc(b.address, "echo", {"still": "here"}, timeout=10),
              "wires": [n.connections() for n in nodes]}
    for node in nodes:
        await node.close()
    await tracker.close()
    await asyncio.sleep(0.2)
    result["left_open"] = [pc.connectionState for pc in live_peer_connections()
                           if pc.connectionState != "closed"]
    return result


async def child_rtc_peer_cap():
    """A node capped at one peer meets one of two others; those two meet each other."""
    tracker = await local_tracker()
    url = tracker.ready["url"]
    capped = await rtc_node("rtc-cap", [url], max_peers=1, announce_interval=0.3)
    b = await rtc_node("rtc-cap", [url], announce_interval=0.3)
    c = await rtc_node("rtc-cap", [url], announce_interval=0.3)
    await until(lambda: b.address in c.peers and c.address in b.peers and capped.connections() == 1, 30)
    most = 0
    for _ in range(150):  # 3 s, about ten announces each
        await asyncio.sleep(0.02)
        rtc = capped.webrtc
        most = max(most, len(capped._connections), rtc.max_peers - rtc.free_slots())
    result = {"most": most, "capped_wires": capped.connections(), "b_c": [b.connections(), c.connections()],
              "declined": capped.stats["webrtc offers declined"] + capped.stats["webrtc answers declined"]}
    for node in (capped, b, c):
        await node.close()
    await tracker.close()
    return result


class TestWebRtc(unittest.TestCase):
    """Real WebRTC (aiortc; @roamhq/wrtc for JS) through a local bittorrent-tracker."""

    def setUp(self):
        rtc_ready()

    @staticmethod
    def in_namespace(child, *args):
        """No STUN/TURN server and a local bittorrent-tracker: nothing leaves the namespace."""
        return in_namespace(child, *args, timeout=300, lo=LO_FOR_WEBRTC)

    def test_python_python_through_tracker(self):
        out = self.in_namespace(child_rtc_python_python)
        self.assertEqual(out["echo"], {"x": "é", "echoedBy": "py"})
        self.assertEqual(out["unknown"], {"error": "No such API call."})
        self.assertEqual(out["wires"], [1, 1])
        self.assertTrue(out["only_webrtc"])
        self.assertEqual(out["newcomer_echo"], {"via": "restarted tracker", "echoedBy": "py"})
        self.assertGreaterEqual(out["dead_tracker_retries"], 1)
        self.assertEqual(out["after_close"], [0, 0, 0])
        self.assertEqual(out["interval"], 120.0)
        print("\n  python-python: connected through the tracker in %.2f s" % out["connected_s"], file=sys.stderr)

    def _python_js(self, python_offers):
        out = self.in_namespace(child_rtc_python_js, python_offers)
        self.assertTrue(out["only_webrtc"])
        self.assertEqual(out["python_offered"], [python_offers])
        self.assertEqual(out["py_to_js"], {"n": "é", "pad": "p" * 40_000, "echoedBy": "js"})
        self.assertEqual(out["py_to_js_unknown"], {"error": "No such API call."})
        self.assertEqual(out["js_to_py"], {"from": "js", "echoedBy": "py"})
        print("\n  python-js (%s offered): connected through the tracker in %.2f s"
              % ("python" if python_offers else "js", out["connected_s"]), file=sys.stderr)

    def test_python_offers_js_answers(self):
        self._python_js(python_offers=True)

    def test_js_offers_python_answers(self):
        self._python_js(python_offers=False)

    def test_worker_jobs_from_js_master(self):
        out = self.in_namespace(child_rtc_js_master_worker)
        self.assertTrue(out["webrtc"]["only_webrtc"])
        self.assertFalse(out["tcp"]["only_webrtc"])
        for transport in ("webrtc", "tcp"):
            self.assertEqual(out[transport]["ids"], list(range(200)))
            self.assertTrue(out[transport]["right"])
        print("\n  JS master -> worker: master found in %.2f s over WebRTC (%.2f s over TCP); "
              "%.0f jobs/s over WebRTC, %.0f over TCP (batches of 10)"
              % (out["webrtc"]["found_s"], out["tcp"]["found_s"], out["webrtc"]["rate"], out["tcp"]["rate"]),
              file=sys.stderr)

    def test_master_py_5mb_asset_and_rates(self):
        out = self.in_namespace(child_rtc_master_py)
        self.assertTrue(out["webrtc"]["only_webrtc"])
        for transport in ("webrtc", "tcp"):
            self.assertTrue(out[transport]["blob_ok"], transport)
        print("\n  master.py -> worker, 5 MB asset: %.2f s over WebRTC, %.2f s over TCP"
              % (out["webrtc"]["assets_s"], out["tcp"]["assets_s"]), file=sys.stderr)
        for mode in ("unbatched", "batched"):
            print("  %s jobs/s: %.0f over WebRTC, %.0f over TCP" % (mode, out["webrtc"][mode], out["tcp"][mode]),
                  file=sys.stderr)

    def test_hundreds_of_announces_stay_bounded(self):
        out = self.in_namespace(child_rtc_hygiene)
        self.assertGreaterEqual(min(out["announces"]), 200)
        self.assertGreater(out["answered"], 20)  # failed connections were really tried
        self.assertGreater(sum(out["timeouts"]) + sum(out["declined"]), 10)
        self.assertLessEqual(out["peak_live"], out["bound"] + 3)
        self.assertLessEqual(out["peak_gc"], 2 * (out["bound"] + 3) + 2)
        self.assertLessEqual(out["wires_max"], 6)
        self.assertEqual(out["echo"], {"still": "here"})
        self.assertEqual(out["wires"], [1, 1])
        self.assertEqual(out["left_open"], [])
        print("\n  %d/%d announces: at most %d live peer connections per node (%d in the process)"
              % (*out["announces"], out["peak_live"], out["peak_gc"]), file=sys.stderr)

    def test_peer_cap(self):
        out = self.in_namespace(child_rtc_peer_cap)
        self.assertEqual(out["most"], 1)
        self.assertEqual(out["capped_wires"], 1)
        self.assertEqual(out["b_c"][0] + out["b_c"][1], 3)
        self.assertGreater(out["declined"], 0)


# Trackers and WebRTC: a hostile tracker and peers, for real #################

class LoopProbe:
    """How late a 10 ms timer of the loop ran at worst (the loop held by something)."""

    def __init__(self):
        self.longest = 0.0
        self._task = asyncio.ensure_future(self._run())

    async def _run(self):
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.longest, last = max(self.longest, now - last - 0.01), now

    def stop(self):
        self._task.cancel()
        return self.longest


async def child_hostile_tracker(attack, seconds=3.0):
    """In a namespace: a node whose only tracker attacks it for ``seconds``; what it cost."""
    from support import HostileTracker
    tracker = await HostileTracker("hostile-tracker").start()
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("worker").addHandler(handler)
    logging.getLogger("worker").setLevel(logging.INFO)
    try:
        return await _hostile_tracker_attack(attack, seconds, tracker, lines)
    finally:
        logging.getLogger("worker").removeHandler(handler)


async def child_hostile_trackers(attacks):
    """In a namespace: each attack of ``attacks`` in turn (child_hostile_tracker: a tracker and a
    node of its own each); {attack: what it cost, or {"error": its traceback}}."""
    out = {}
    for attack in attacks:
        try:
            out[attack] = await child_hostile_tracker(attack)
        except Exception:  # noqa: BLE001 - that attack's test fails with it; the others go on
            out[attack] = {"error": traceback.format_exc()}
    return out


async def _hostile_tracker_attack(attack, seconds, tracker, lines):
    node = await rtc_node("hostile-tracker", [tracker.url])
    await until(lambda: tracker.sockets and node.webrtc.sessions[0].client.stats["announces"], 10)
    client = node.webrtc.sessions[0].client
    probe, end, notes = LoopProbe(), time.monotonic() + seconds, {}
    before = len(lines)
    if attack == "failure reasons":
        frame = json.dumps({"action": "announce", "info_hash": tracker.info_hash,
                            "failure reason": "\x1b[2J" + "x" * 1000 + "\n"})
        notes = await tracker.flood(end, lambda: frame)
    elif attack == "offers":
        notes = await tracker.flood(end, lambda: tracker.relay("offer", tracker.sdp["offer"]))
        notes["peer connections"] = sum(not c.initiator for c in node.webrtc.connections)  # not our offers
        notes["tasks"] = len(node.webrtc._tasks)
    elif attack == "answers":
        notes = await tracker.flood(end, lambda: tracker.relay("answer", tracker.sdp["answer"]))
    elif attack == "sdp":
        ws = next(iter(tracker.sockets))
        for sdp in ["v=0", "garbage", tracker.sdp["offer"][:200], tracker.sdp["offer"].replace("a=fingerprint", "a=x"),
                    tracker.sdp["offer"] + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"]:
            await ws.send(tracker.relay("offer", sdp))
        await ws.send(tracker.relay("offer", huge_sdp(tracker.sdp["offer"], 1200)))  # ~55 KB: within a frame
        await asyncio.sleep(0.5)
        notes["peer connections"] = sum(not c.initiator for c in node.webrtc.connections)
        await ws.send(tracker.relay("offer", huge_sdp(tracker.sdp["offer"])))  # 1 MB: over a frame
        await asyncio.sleep(end - time.monotonic())
    await asyncio.sleep(0.5)
    result = {"lines": lines[before:], "gap": probe.stop(), "client": dict(client.stats), "floods": getattr(client, "floods", 0),
              "node": {k: v for k, v in node.stats.items() if k.startswith("webrtc")},
              "tracker connections": tracker.connections, **notes}
    await node.close()
    await tracker.close()
    return result


async def child_rtc_message_over_cap():
    """In a namespace: a peer sends one data-channel message of 1 MB; later a new wire works."""
    tracker = await local_tracker()
    url = tracker.ready["url"]
    a = await rtc_node("rtc-big", [url], announce_interval=0.5)
    b = await rtc_node("rtc-big", [url], announce_interval=0.5)
    await until(lambda: a.address in b.peers and b.address in a.peers, 30)
    [conn] = [c for c in b._connections if isinstance(c, w.RtcConnection)]
    conn.pc.sctp._remote_max_message_size = 0  # b ignores the max-message-size of a's SDP
    conn._write = conn.channel.send  # and writes its wire in one message
    b.send({"big": "x" * 1_000_000}, address=a.address)
    await until(lambda: a.stats["webrtc closed: message"] or any(e[0] == "message" for e in a.events), 30)
    result = {"closed": a.stats["webrtc closed: message"], "delivered": any(e[0] == "message" for e in a.events),
              "cap": next((c.guard.message_cap for c in a.webrtc.connections if getattr(c, "guard", None)), None)}
    await until(lambda: any(c.state is w.ConnState.OPEN and c is not conn for c in b._connections), 30)
    result["echo"] = await b.rpc(a.address, "echo", {"again": True}, timeout=10)
    for node in (a, b):
        await node.close()
    await tracker.close()
    return result


class TestHostileTracker(unittest.TestCase):
    """A tracker that attacks (a Python one in the test), and a peer that sends too much."""

    ATTACKS = ("failure reasons", "offers", "answers", "sdp")

    @classmethod
    def setUpClass(cls):
        cls.attacks = None  # run on first use, all four in one namespace (one process start, not four)

    def setUp(self):
        rtc_ready()

    def attack(self, name):
        cls = type(self)
        if cls.attacks is None:
            cls.attacks = in_namespace(child_hostile_trackers, self.ATTACKS, timeout=300, lo=LO_FOR_WEBRTC)
        out = cls.attacks[name]
        if "error" in out:
            self.fail("the attack failed in its namespace:\n" + out["error"])
        print("\n  tracker %s: %s frames sent, loop held %.3f s at worst, %d log lines"
              % (name, out.get("frames sent", "a few"), out["gap"], len(out["lines"])), file=sys.stderr)
        return out

    def test_failure_reasons_in_a_loop_one_line_and_a_frame_budget(self):
        out = self.attack("failure reasons")
        self.assertGreater(out["frames sent"], 1000)
        said = [line for line in out["lines"] if "failure reason" in line]
        self.assertEqual(len(said), 1, out["lines"])
        self.assertLess(len(said[0]), 400)
        self.assertNotIn("\x1b", said[0])
        budget = w.TRACKER_FRAME_BURST + 4 * w.TRACKER_FRAMES_PER_SECOND  # 3 s, and the 0.5 s after
        self.assertLessEqual(out["client"]["failures"], budget)
        self.assertLess(out["gap"], 2.0)  # the loop is never held long (a loaded machine: 2 s)

    def test_offer_flood_costs_a_few_connections_and_no_task_each(self):
        out = self.attack("offers")
        self.assertGreater(out["frames sent"], 500)
        taken = w.TRACKER_OFFER_BURST + 4 * w.TRACKER_OFFERS_PER_SECOND
        self.assertLessEqual(out["client"]["offers relayed"], taken)
        self.assertLessEqual(out["peer connections"], taken)
        self.assertLessEqual(out["tasks"], taken + 3)  # the session, and an announce
        self.assertLess(out["gap"], 2.0)

    def test_answers_to_no_offer_read_within_the_budget(self):
        out = self.attack("answers")
        self.assertGreater(out["frames sent"], 500)
        self.assertLessEqual(out["client"]["answers unexpected"],
                             w.TRACKER_FRAME_BURST + 4 * w.TRACKER_FRAMES_PER_SECOND)
        self.assertEqual(out["node"].get("webrtc answers", 0), 0)

    def test_bad_and_huge_sdp_refused_before_aiortc(self):
        out = self.attack("sdp")
        self.assertEqual(out["client"]["offers refused: SDP too large"], 1)  # 1,200 candidates
        self.assertEqual(out["node"]["webrtc offers refused: bad SDP"], 5)
        self.assertEqual(out["peer connections"], 0)
        self.assertEqual(out["floods"], 1)  # the 1 MB frame: the tracker is left, with back-off
        self.assertEqual(out["tracker connections"], 1)
        self.assertIn("frame over 128 KiB", " ".join(line for line in out["lines"] if "flood" in line))
        self.assertLess(out["gap"], 2.0)  # without the bounds: 64 s

    def test_data_channel_message_over_the_cap_closes_before_it_is_whole(self):
        out = in_namespace(child_rtc_message_over_cap, timeout=120, lo=LO_FOR_WEBRTC)
        self.assertEqual((out["closed"], out["delivered"]), (1, False))
        self.assertLessEqual(out["cap"], 256 * 1024)
        self.assertEqual(out["echo"], {"again": True, "echoedBy": "py"})


# The node: inbound slots and the dial queue (sans-I/O, a clock passed in) ####

def slot(started, last_verified=None, name=""):
    """What inbound_victim reads of a wire."""
    return types.SimpleNamespace(started=started, last_verified=last_verified, name=name)


def inbound_wire(started, last_verified=None, name="", host="10.0.0.2", state=None):
    """What InboundSlots reads of an inbound wire."""
    return types.SimpleNamespace(started=started, last_verified=last_verified, name=name, remote_host=host,
                                 state=state or w.ConnState.OPEN)


class TestNodePolicy(unittest.TestCase):
    def test_the_slow_lane_takes_its_slice_of_each_turn_and_drops_nothing(self):
        clock, handled, turns = [0.0], [], []

        def handle(wire):  # each wire costs 0.4 ms; "again" comes back while it is handled
            handled.append(wire)
            clock[0] += 0.0004
            if wire == "again" and handled.count("again") == 1:
                lane.add("again")

        def run_turn(delay=0.0):
            self.assertEqual(turns[0][0], delay)
            clock[0] += delay
            turns.pop(0)[1]()
        lane = w.SlowLane(handle, lambda delay, turn: turns.append((delay, turn)), lambda: clock[0],
                          slice_seconds=0.001)
        for wire in ("a", "b", "a", "again", "c", "d"):
            lane.add(wire)
        self.assertEqual((len(lane), len(turns), handled), (5, 1, []))  # each wire once; one turn asked
        self.assertFalse(lane.active(0.0))  # no protected peer heard: others' wires need not wait
        lane.heard(5.0)
        self.assertTrue(lane.active(5.0 + w.LANE_ACTIVE - 0.01) and not lane.active(5.0 + w.LANE_ACTIVE))
        run_turn()
        self.assertEqual(handled, ["a", "b", "again"])  # 1.2 ms: the slice is spent
        self.assertEqual((len(lane), len(turns)), (3, 1))  # the rest at the next loop turn
        run_turn()
        self.assertEqual(handled[3:], ["c", "d", "again"])
        self.assertEqual((len(lane), turns), (0, []))  # nothing left, no turn asked
        slow = w.SlowLane(lambda wire: clock.__setitem__(0, clock[0] + 1.0), lambda delay, turn: turns.append(
            (delay, turn)), lambda: clock[0])
        slow.add("x")
        slow.add("y")
        run_turn()  # one wire over the slice: one wire a turn, never none
        self.assertEqual((len(slow), len(turns)), (1, 1))

    def test_a_bounded_slow_lane_rests_until_its_share_of_the_time_is_earned(self):
        clock, handled, turns = [0.0], [], []

        def handle(wire):  # 1 ms each
            handled.append(wire)
            clock[0] += 0.001
        lane = w.SlowLane(handle, lambda delay, turn: turns.append((delay, turn)), lambda: clock[0],
                          slice_seconds=0.001, share=0.1)
        for i in range(200):
            lane.add(i)
        while turns and clock[0] < 10.0:
            delay, turn = turns.pop(0)
            clock[0] += delay
            turn()
        self.assertEqual(handled, list(range(200)))  # all of them, in order, none dropped
        self.assertAlmostEqual(clock[0], (0.2 - w.LANE_BURST) / 0.1, delta=0.02)  # 10 % of the time after the burst
        lane.add("later")
        self.assertGreater(turns[0][0], 0.0)  # it rests: the time is spent
        clock[0] += 60
        lane.add("after a rest")
        self.assertEqual(len(turns), 1)
        turns.pop(0)[1]()
        self.assertEqual(handled[-2:], ["later", "after a rest"])  # a rested lane works at once

    def test_inbound_victim_idle_first_then_silent_never_kept_or_new(self):
        now = 1000.0
        keep_none = lambda conn: False
        active = slot(now - 100, now - 1, "active")  # verified a second ago
        silent = slot(now - 20, None, "silent")  # never said anything, 20 s old
        older_silent = slot(now - 25, None, "older silent")
        idle = slot(now - 300, now - 40, "idle")  # verified 40 s ago
        idler = slot(now - 300, now - 90, "idler")
        newcomer = slot(now - 2, None, "newcomer")
        pick = lambda wires, keep=keep_none: getattr(w.inbound_victim(wires, now, keep), "name", None)
        self.assertEqual(pick([active, silent, idle, idler, newcomer]), "idler")
        self.assertEqual(pick([active, silent, older_silent, newcomer]), "older silent")
        self.assertEqual(pick([silent, slot(now - 40, None, "silent 40 s")]), "silent 40 s")  # idle too
        self.assertIsNone(pick([active, newcomer]))  # a master dialing in has NEWCOMER_SECONDS
        self.assertEqual(pick([idler, idle], keep=lambda c: c is idler), "idle")  # the master: never
        self.assertIsNone(pick([idler], keep=lambda c: True))
        talking = slot(now - 100, now - 5, "talking")  # in use, but used less lately than active
        self.assertIsNone(pick([active, talking, newcomer]))
        self.assertEqual(w.inbound_victim([active, talking, newcomer], now, keep_none, in_use_too=True).name,
                         "talking")
        self.assertEqual([w.in_use(c, now, keep_none) for c in (active, idle, silent)], [True, False, False])
        self.assertTrue(w.in_use(idle, now, lambda c: True))

    def test_inbound_slots_at_a_hosts_cap_close_the_longest_unused_never_a_kept_or_young_wire(self):
        now, kept = 1000.0, {"master", "in flight"}
        slots = w.InboundSlots(lambda c: c.name in kept)
        master = inbound_wire(now - 900, None, "master")  # the longest unused, but the master's
        busy = inbound_wire(now - 800, now - 300, "in flight")  # a call in flight on it
        idle = [inbound_wire(now - 600, now - 100 - i, "idle %d" % i) for i in range(w.INBOUND_PER_HOST)]
        young = inbound_wire(now - 1, None, "newcomer")  # it has NEWCOMER_SECONDS to speak
        ok, victim = slots.host_room([master, busy, *idle, young], now)
        self.assertTrue(ok)
        self.assertEqual(victim.name, "idle %d" % (w.INBOUND_PER_HOST - 1))  # unused longest
        self.assertEqual(slots.stats["wires closed: room for a host's newcomer"], 1)
        self.assertEqual(slots.host_room([master, busy, *idle[1:], young], now), (True, None))  # fits
        kept.update(wire.name for wire in idle)  # every one has a call in flight: in use
        self.assertEqual(slots.host_room([master, busy, *idle, young], now), (True, None))
        newcomers = [inbound_wire(now - 1, None, "new %d" % i) for i in range(w.INBOUND_PER_HOST + 1)]
        self.assertEqual(slots.host_room(newcomers, now), (False, None))  # none may go: it is refused
        self.assertEqual(slots.stats["inbound refused: wires from one host"], 1)

    def test_inbound_slots_refuse_a_crowded_host(self):
        now, slots = 1000.0, w.InboundSlots(lambda c: False)
        shaking = [inbound_wire(now - 1, state=w.ConnState.HANDSHAKE) for _ in range(w.PENDING_PER_HOST)]
        self.assertTrue(slots.crowded(shaking, now))
        self.assertFalse(slots.crowded(shaking[1:], now))
        young = [inbound_wire(now - 1) for _ in range(w.INBOUND_PER_HOST)]
        self.assertTrue(slots.crowded(young, now))  # not in use, and none may make room yet
        self.assertFalse(slots.crowded(young + [inbound_wire(now - 60, now - 40)], now))  # an idle one may
        self.assertEqual((slots.stats["inbound refused: handshakes from one host"],
                          slots.stats["inbound refused: wires from one host"]), (1, 1))

    def test_inbound_slots_at_max_inbound(self):
        now, slots = 1000.0, w.InboundSlots(lambda c: c.name == "master")
        talking = [inbound_wire(now - 100, now - 1 - i / 10, "talking %d" % i) for i in range(20)]  # one host
        master = inbound_wire(now - 900, None, "master", host="10.0.0.3")
        wires = talking + [master]
        self.assertEqual(slots.make_room(wires, 0, 22, now), (True, None))  # under the cap
        self.assertEqual(slots.make_room(wires, 1, 22, now)[1].name, "talking 19")  # the crowded host's
        shaking = inbound_wire(now - 3, None, "handshake", state=w.ConnState.HANDSHAKE)
        self.assertEqual(slots.make_room(wires + [shaking], 0, 21, now)[1].name, "handshake")  # first
        self.assertEqual(slots.make_room(talking[:16] + [master], 0, 17, now), (False, None))  # none may go
        for _ in range(int(w.EVICTIONS_PER_SECOND) - 2):
            self.assertTrue(slots.make_room(wires, 0, 21, now)[0])
        self.assertEqual(slots.make_room(wires, 0, 21, now), (False, None))  # churn is bounded
        self.assertTrue(slots.make_room(wires, 0, 21, now + 1)[0])
        self.assertEqual(slots.stats["wires closed: inbound cap"], int(w.EVICTIONS_PER_SECOND))
        self.assertEqual(slots.stats["handshakes cut: inbound cap"], 1)

    def test_dial_queue_rate_and_turns(self):
        queue, now = w.DialQueue(rate=10, per_source=64), 100.0
        for port in range(1000, 1100):  # one source floods: its share is queued, the rest dropped
            queue.offer(("10.0.0.9", port), "10.0.0.9", now)
        self.assertEqual(len(queue), 64)
        self.assertEqual(queue.stats["found peers dropped: the source's share is full"], 36)
        queue.offer(("10.0.0.2", 6881), "10.0.0.2", now)  # an honest peer, after the flood
        queue.offer(("10.0.0.3", 6881), "dht", now)
        first = queue.take(now, room=32)
        self.assertEqual(len(first), 10)  # a burst of the rate, room or not
        self.assertIn(("10.0.0.2", 6881), [q.endpoint for q in first[:3]])  # the sources in turn
        self.assertIn(("10.0.0.3", 6881), [q.endpoint for q in first[:3]])
        self.assertEqual(queue.take(now, room=32), [])
        self.assertEqual(len(queue.take(now + 0.5, room=32)), 5)
        self.assertEqual(len(queue.take(now + 10, room=3)), 3)  # no more than the room
        given = sum(len(queue.take(now + 10 + t / 10, room=32)) for t in range(1, 101))
        self.assertEqual(given, 64 + 2 - 18)  # 10 s: all the rest, 10 a second at most
        self.assertEqual(len(queue), 0)

    def test_dial_queue_a_known_master_first_and_queued_not_dropped(self):
        queue, now = w.DialQueue(), 100.0
        master = ("10.0.0.5", 7000)
        for i in range(40):  # a DHT node answers first with peers that hang
            queue.offer(("10.9.0.%d" % i, 6881), "dht", now)
        queue.offer(("10.0.0.5", 7001), "dht", now)  # another port on the master's host
        queue.offer(master, "dht", now)
        queue.prefer([master])
        out = queue.take(now, room=0)  # every dial slot taken: the master's endpoint goes anyway
        self.assertEqual([q.endpoint for q in out], [master])
        self.assertEqual(len(queue), 41)  # the others wait, none dropped
        out = queue.take(now, room=2)
        self.assertEqual(out[0].endpoint, ("10.0.0.5", 7001))  # the master's host before the rest
        self.assertEqual(len(out), 2)
        queue.offer(master, "10.0.0.5", now + 1)
        self.assertEqual([q.endpoint for q in queue.take(now + 1, room=0)], [master])  # rate spent or not

    def test_dial_queue_bounds_delay_skip_expiry(self):
        queue, now = w.DialQueue(size=8, per_source=4, ttl=60), 100.0
        for i in range(3):
            for port in range(5):
                queue.offer(("10.0.%d.1" % i, port + 1), "s%d" % i, now)
        self.assertEqual(len(queue), 8)  # 4 + 4, then the queue is full
        self.assertEqual(queue.stats["found peers dropped: the queue is full"], 5)
        queue.prefer([("10.0.9.9", 1)])
        self.assertTrue(queue.offer(("10.0.9.9", 1), "s9", now))  # a preferred one makes room
        self.assertEqual(len(queue), 8)
        later = w.DialQueue()
        later.offer(("10.0.0.1", 1), "lsd", now, delay=1.0, peer_id=b"p" * 20)
        self.assertEqual(later.take(now, room=10), [])  # LSD_YIELD: the other end may dial first
        self.assertEqual(later.take(now + 1, room=10, skip=lambda q: q.peer_id == b"p" * 20), [])
        self.assertEqual(len(later), 0)  # it did: dropped, no rate spent
        for i in range(20):
            later.offer(("10.0.0.1", 100 + i), "lsd", now)
        self.assertEqual(len(later.take(now, room=10, skip=lambda q: q.endpoint[1] < 110)), 10)
        stale = w.DialQueue(ttl=60)
        stale.offer(("10.0.0.1", 1), "lsd", now)
        self.assertEqual(stale.take(now + 61, room=10), [])
        self.assertEqual(stale.stats["found peers expired"], 1)


# The node: Python and JS bugout peers #######################################

class TestWirePolicy(unittest.TestCase):
    """The node's wire policy with a clock: which wire is whose, from what came by each."""

    X, Y = "bPeerXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "bPeerYYYYYYYYYYYYYYYYYYYYYYYYYYYYY"
    PEER = b"-QP0100-peerpeerpeer"

    def setUp(self):
        self.policy = w.WirePolicy()
        self.now, self.ms = 100.0, 1_700_000_000_000

    def open(self, wire, address, dialer=PEER, port=None, python=True, policy=None):
        return (policy or self.policy).opened(wire, address, dialer, port, self.now, python)

    def packet(self, wire, address, kind="p", boxed=False, age_ms=0, policy=None):
        (policy or self.policy).packet(wire, w.Verified(address, self.ms - age_ms, kind, boxed), self.now, self.ms)

    def advance(self, seconds, policy=None):
        self.now += seconds
        self.ms += int(seconds * 1000)
        return (policy or self.policy).due(self.now)

    def test_the_wires_never_closed_for_room(self):
        self.open("w1", self.X)
        self.open("w2", self.Y)
        self.open("w3", None)  # no bugout claim
        self.packet("w1", self.X)
        self.packet("w2", self.Y)
        self.assertFalse(self.policy.keeps("w1", []))
        self.assertTrue(self.policy.keeps("w1", [self.X]))  # a call to X in flight: its route stays
        self.assertFalse(self.policy.keeps("w2", [self.X]))
        self.assertEqual(self.policy.largest({"w1": 10, "w2": 99, "w3": 50}), "w2")
        self.policy.protected = frozenset({self.Y})
        self.assertTrue(self.policy.keeps("w2", []))  # the master's
        self.assertEqual(self.policy.largest({"w1": 10, "w2": 99, "w3": 50}), "w3")  # not the master's
        self.assertIsNone(self.policy.largest({"w2": 99}))

    def test_the_protected_route_follows_the_proofs_and_thousands_cost_one_look(self):
        self.policy.protected = frozenset({self.X} | {"bWorker%d" % i for i in range(4000)})
        self.open("w1", self.X)
        self.open("w2", self.Y)
        self.assertFalse(self.policy.is_protected("w1"))  # a claim is no route
        self.packet("w2", self.X)  # X's fresh packet, relayed by Y's wire
        self.assertTrue(self.policy.is_protected("w2") and not self.policy.is_protected("w1"))
        self.packet("w1", self.X)  # by its own wire: that one is the route now
        self.assertTrue(self.policy.is_protected("w1") and not self.policy.is_protected("w2"))
        with mock.patch.object(self.policy, "route", wraps=self.policy.route) as route:
            for _ in range(1000):  # what a flood asks, wire after wire
                self.assertFalse(self.policy.is_protected("w2"))
            self.packet("w2", self.Y)  # others' packets move no protected route
            self.assertFalse(self.policy.is_protected("w2"))
            for i in range(100):  # nor do others' wires that come and go
                self.open("flood%d" % i, self.Y)
                self.policy.closed("flood%d" % i)
            self.assertTrue(self.policy.is_protected("w1"))
            self.assertEqual(route.call_count, 0)
        self.policy.closed("w1")
        self.assertFalse(self.policy.is_protected("w1") or self.policy.is_protected("w2"))
        self.policy.protected = frozenset({self.Y})
        self.packet("w2", self.Y)
        self.assertTrue(self.policy.is_protected("w2"))

    def test_bytes_held_past_the_bound_close_the_unprotected_wire_holding_most(self):
        self.open("w1", self.X)
        self.packet("w1", self.X)
        self.policy.protected = frozenset({self.X})
        self.assertEqual(self.policy.hold("w1", 900, 1000), [])
        self.assertEqual(self.policy.hold("w2", 50, 1000), [])
        self.assertEqual(self.policy.hold("w3", 80, 1000), [("w3", 80)])  # 1,030: not the master's
        self.assertEqual(self.policy.held_total, 950)
        self.assertEqual(self.policy.hold("w3", 0, 1000), [])  # closed: it holds nothing more
        self.assertEqual(self.policy.hold("w2", 0, 1000), [])
        self.assertEqual(self.policy.held_total, 900)
        self.assertEqual(self.policy.hold("w1", 1200, 1000), [])  # the master's alone: it stays
        self.assertEqual(self.policy.hold("w4", 300, 1000), [("w4", 300)])
        self.assertEqual(self.policy.held_total, 1200)

    def test_a_handshake_claim_proves_nothing_and_drains_nothing(self):
        self.open("w1", self.X)
        self.open("w2", self.X)
        self.assertEqual(self.advance(0), [])
        self.assertEqual(self.advance(600), [])
        self.assertIsNone(self.policy.direct(self.X))
        self.assertFalse(self.policy.stands("w1") or self.policy.stands("w2"))
        self.assertEqual(self.policy.targets(self.X), (["w1", "w2"], False))  # a hint for routes only
        self.assertEqual(self.policy.targets(self.Y), ([], True))  # no route: spare to every wire

    def test_a_fresh_packet_its_peer_signed_makes_the_wire_its_own(self):
        self.open("w1", self.X)
        self.open("w2", self.Y)
        self.packet("w1", self.X)
        self.assertEqual(self.advance(0), [])
        self.assertEqual(self.policy.direct(self.X), "w1")
        self.assertTrue(self.policy.stands("w1"))
        self.assertEqual(self.policy.targets(self.X), (["w1"], False))
        self.assertEqual(self.advance(3600), [])  # a quiet peer keeps its wire
        self.assertEqual(self.policy.direct(self.X), "w1")

    def test_what_proves_a_wire(self):
        cases = [("p", False, 0, True), ("m", False, w.FRESH_MS, True), ("p", True, 0, True),
                 ("p", False, w.FRESH_MS + 1, False),  # replayed
                 ("p", False, -w.FRESH_MS - 1, False),  # from the future
                 ("r", False, 0, False), ("rr", False, 0, False),  # unboxed: someone opened them
                 ("r", True, 0, True), ("m", True, 0, True),
                 ("rr", True, 3_600_000, True),  # an answer to a call of ours, whatever its time
                 ("x", False, 0, False)]
        for kind, boxed, age_ms, proves in cases:
            policy = w.WirePolicy()
            self.open("w1", self.X, policy=policy)
            self.packet("w1", self.X, kind, boxed, age_ms, policy=policy)
            self.assertEqual(policy.direct(self.X) == "w1", proves, (kind, boxed, age_ms))
            self.assertEqual(policy.route(self.X) == "w1", proves, (kind, boxed, age_ms))

    def test_a_copy_by_another_peers_wire_proves_neither(self):
        self.open("w1", self.Y)
        self.packet("w1", self.X)
        self.assertIsNone(self.policy.direct(self.X))
        self.assertIsNone(self.policy.direct(self.Y))
        self.assertEqual(self.policy.route(self.X), "w1")  # X is reached through Y
        self.assertEqual(self.policy.targets(self.X), (["w1"], False))

    def test_a_claimant_of_a_peer_proven_elsewhere_drains_unless_it_proves(self):
        self.open("w1", self.X, dialer=b"-QP0100-zzzzzzzzzzzz")
        self.packet("w1", self.X)
        self.assertEqual(self.advance(30), [])
        self.assertFalse(self.open("w2", self.X, dialer=b"-QP0100-000000000000", port=1))  # no hello
        self.packet("w2", self.X, age_ms=60_000)  # a replay
        self.assertEqual(self.advance(0), [])
        self.assertEqual(self.policy.next_due(), self.now + w.PROVE_SECONDS)
        self.assertEqual(self.policy.targets(self.X), (["w1"], False))  # never by the claimant
        self.assertEqual(self.advance(w.PROVE_SECONDS - 0.1), [])
        self.assertEqual(self.advance(0.1), [("w2", "unproven")])
        self.assertEqual(self.policy.direct(self.X), "w1")
        self.assertIsNone(self.policy.next_due())

    def test_a_wire_that_stood_first_stays_when_a_later_one_proves_too(self):
        self.open("w1", self.X, dialer=b"-QP0100-zzzzzzzzzzzz")
        self.packet("w1", self.X)
        self.advance(w.DUP_WINDOW)
        self.open("w2", self.X, dialer=b"-QP0100-000000000000", port=1)  # lower id, lower port
        self.packet("w2", self.X)  # say, a relay of a fresh packet that overtook the other
        self.assertEqual(self.advance(0), [("w2", "duplicate")])
        self.assertEqual(self.policy.direct(self.X), "w1")

    def test_wires_that_came_to_stand_together_keep_the_same_one_at_both_ends(self):
        for ours_lower in (True, False):
            low, high = b"-QP0100-000000000000", b"-QP0100-zzzzzzzzzzzz"
            a_id, b_id = (low, high) if ours_lower else (high, low)
            at_a, at_b = w.WirePolicy(), w.WirePolicy()  # wire 1 dialed by a, wire 2 by b
            for policy, peer, first in ((at_a, self.Y, "w1"), (at_b, self.X, "w2")):
                self.open("w1", peer, dialer=a_id, port=5000, policy=policy)
                self.open("w2", peer, dialer=b_id, port=4000, policy=policy)
                second = "w2" if first == "w1" else "w1"
                self.packet(first, peer, boxed=True, policy=policy)  # the hellos cross
                self.assertEqual(self.advance(0, policy), [])
                self.packet(second, peer, boxed=True, policy=policy)
            loser = "w2" if ours_lower else "w1"
            self.assertEqual(at_a.due(self.now), [(loser, "duplicate")])
            self.assertEqual(at_b.due(self.now), [(loser, "duplicate")])
        at_a = w.WirePolicy()  # both dialed by one end: the lower dialer port stays
        self.open("w1", self.X, port=5000, policy=at_a)
        self.open("w2", self.X, port=4000, policy=at_a)
        self.packet("w1", self.X, policy=at_a)
        self.packet("w2", self.X, policy=at_a)
        self.assertEqual(at_a.due(self.now), [("w1", "duplicate")])

    def test_the_peer_half_closing_a_wire_decides(self):
        self.open("w1", self.X, dialer=b"-QP0100-000000000000")
        self.open("w2", self.X, dialer=b"-QP0100-zzzzzzzzzzzz")
        self.packet("w1", self.X)
        self.advance(0)
        self.policy.peer_eof("w1")  # the peer drains w1: w2 is not drained for want of proof
        self.assertEqual(self.advance(w.PROVE_SECONDS + 1), [])
        self.packet("w2", self.X)
        self.assertEqual(self.advance(0), [])  # nor as a duplicate of the wire being drained
        self.assertEqual(self.policy.direct(self.X), "w2")
        self.policy.closed("w1")
        self.assertEqual(self.policy.direct(self.X), "w2")

    def test_a_wire_stops_standing_when_its_peers_packets_come_by_others(self):
        self.open("w1", self.X)
        self.open("w2", self.Y)
        self.packet("w1", self.X)
        self.advance(1)
        self.packet("w2", self.X)  # relayed copies come first ...
        self.advance(w.STANDING_LAPSE - 1)
        self.packet("w2", self.X)
        self.assertEqual(self.policy.direct(self.X), "w1")
        self.advance(1)
        self.packet("w2", self.X)  # ... for STANDING_LAPSE, and none by its own wire
        self.assertEqual(self.advance(0), [])
        self.assertIsNone(self.policy.direct(self.X))
        self.assertEqual(self.policy.targets(self.X), (["w1", "w2"], False))
        self.packet("w1", self.X)
        self.assertEqual(self.policy.direct(self.X), "w1")

    def test_a_wire_that_brings_copies_of_its_peers_packets_keeps_standing(self):
        self.open("w1", self.X)
        self.open("w2", self.Y)
        self.packet("w1", self.X)
        for _ in range(3):  # each of the peer's packets comes first by a relay, then by its wire
            self.advance(w.STANDING_LAPSE)
            self.packet("w2", self.X)
            self.policy.packet("w1", w.Verified(self.X, self.ms, "p", False), self.now, self.ms, copy=True)
        self.assertEqual(self.advance(0), [])
        self.assertEqual(self.policy.direct(self.X), "w1")
        self.policy.packet("w2", w.Verified(self.X, self.ms, "p", False), self.now, self.ms, copy=True)
        self.assertIsNone(self.policy.direct(self.Y))  # a copy proves nothing

    def test_when_a_peers_wire_closes_its_other_wires_prove_it_again(self):
        self.open("w1", self.X)
        self.packet("w1", self.X)
        self.open("w2", self.X)
        self.packet("w2", self.X, age_ms=60_000)  # a replay of an old packet: nothing
        self.advance(1)
        self.policy.closed("w1")
        self.assertEqual(self.advance(w.PROVE_SECONDS), [])  # no wire of X stands: w2 waits
        self.assertIsNone(self.policy.direct(self.X))
        self.assertEqual(self.policy.targets(self.X), (["w2"], False))
        self.packet("w2", self.X)
        self.assertEqual(self.policy.direct(self.X), "w2")

    def test_only_a_python_peer_not_wired_yet_gets_a_hello(self):
        self.assertTrue(self.open("w1", self.X))
        self.assertFalse(self.open("w2", self.Y, python=False))  # JS: what JS bugout sends, no more
        self.assertFalse(self.open("w3", None))
        self.packet("w1", self.X)
        self.assertFalse(self.open("w4", self.X))  # X has a wire: no hello a relay could show as ours

    def test_protection_follows_what_was_proven(self):
        self.policy.protected = frozenset([self.X])
        self.open("w1", self.X)
        self.open("w2", self.Y)
        self.packet("w1", self.X, age_ms=60_000)
        self.assertFalse(self.policy.is_protected("w1"))  # a claim and a replay
        self.packet("w2", self.X)
        self.assertTrue(self.policy.is_protected("w2"))  # its only route, through Y
        self.packet("w1", self.X)
        self.assertTrue(self.policy.is_protected("w1"))
        self.packet("w2", self.X)  # a relayed copy that came first never replaces its own wire
        self.assertTrue(self.policy.is_protected("w1"))
        self.assertFalse(self.policy.is_protected("w2"))

    def test_a_relay_takes_only_room_that_delays_nothing(self):
        self.policy.protected = frozenset([self.X])
        self.open("master", self.X)
        self.packet("master", self.X)
        self.open("other", self.Y)
        def spare(wire, size, waiting, total=0, relay=True):
            return self.policy.spare(wire, size, waiting, lambda: total, relay, self.now)
        self.assertIsNone(spare("other", 10 * w.RELAY_QUEUE, 0, relay=False))  # an empty queue takes any one
        self.assertIsNone(spare("other", 1000, w.RELAY_QUEUE - 1000, relay=False))
        self.assertEqual(spare("other", 1001, w.RELAY_QUEUE - 1000), "queues full")
        self.assertEqual(spare("master", 1001, w.RELAY_PROTECTED - 1000), "queues full")  # the master's: less
        self.assertEqual(spare("other", 1, 0, total=w.RELAY_TOTAL + 1), "queues full")
        allowed = sum(spare("other", 1, 0) is None for _ in range(int(w.RELAY_WRITES_PER_SECOND) + 100))
        self.assertEqual(allowed, w.RELAY_WRITES_PER_SECOND)  # a second's worth, then over the rate
        self.assertEqual(spare("other", 1, 0), "over the rate")
        self.assertIsNone(spare("other", 1, 0, relay=False))  # ours, for want of a route: no rate
        self.now += 1.0
        self.assertIsNone(spare("other", 1, 0))

    def test_closed_wires_and_forgotten_peers_leave_nothing(self):
        for i in range(100):
            self.open(i, self.X if i % 2 else self.Y)
            self.packet(i, self.X)
            self.advance(1)
        for i in range(100):
            self.policy.closed(i)
        self.advance(w.PROVE_SECONDS)
        self.policy.forget(set())
        state = {k: v for k, v in vars(self.policy).items() if isinstance(v, (dict, list, set))}
        self.assertEqual([k for k, v in state.items() if v], [])


class TestCopiedIdentity(AsyncTest):
    """A token-only peer copies another peer's BitTorrent peer id and handshake keys: claims only."""

    async def _copied_master(self, master_dials):
        ident = "copied-%d" % random.randrange(1 << 30)
        low, high = sorted([w.make_peer_id(), w.make_peer_id()])
        listener = py_node(ident)
        listener.peer_id = high if master_dials else low  # the copied id sorts first, whoever dials
        await self.started(listener)
        dialer = py_node(ident, peers=["127.0.0.1:%d" % listener.port])
        dialer.peer_id = low if master_dials else high
        await self.started(dialer)
        master, worker = (dialer, listener) if master_dials else (listener, dialer)
        worker.prioritize(master.address)
        await until(lambda: worker.has_signed_wire(master.address) and master.has_signed_wire(worker.address))
        [real] = list(worker._connections)
        local = real.transport.get_extra_info("peername" if master_dials else "sockname")[1]
        with mock.patch.object(w, "PROVE_SECONDS", 0.5), mock.patch.object(w, "DRAIN_GRACE", 1.0):
            # the attacker read the master's peer id and keys, dials the worker from a lower port
            reader, writer = await raw_wire(worker, master.identity, peer_id=master.peer_id,
                                            port=port_below(local))
            self.addCleanup(writer.close)
            await until(lambda: worker.connections() == 2, 5)
            attacker = next(c for c in worker._connections if c is not real)
            self.assertEqual(attacker.address, master.address)
            self.assertFalse(worker.is_protected(attacker))
            self.assertEqual(await worker.rpc(master.address, "echo", {"during": 1}, timeout=5),
                             {"during": 1, "echoedBy": "py"})
            self.assertTrue(await closed_by_peer(reader, 5))  # it did not prove the claim: drained
        self.assertIn(real, worker._connections)
        self.assertIs(real.state, w.ConnState.OPEN)
        self.assertTrue(worker.has_signed_wire(master.address) and worker.is_protected(real))
        self.assertEqual((worker.stats["duplicate wires"], worker.stats["wires drained: claim not proven"]),
                         (0, 1))
        self.assertEqual(await worker.rpc(master.address, "echo", {"after": 1}, timeout=5),
                         {"after": 1, "echoedBy": "py"})

    async def test_a_copied_peer_id_does_not_cut_the_master_that_dialed(self):
        await self._copied_master(master_dials=True)

    async def test_a_copied_peer_id_does_not_cut_the_master_the_worker_dialed(self):
        await self._copied_master(master_dials=False)

    @time_limit(90)
    async def test_a_copied_worker_does_not_cut_it_from_master_py(self):
        cluster = await self.started(Cluster(self.tmp()))
        worker = await self.started(cluster.worker(get_batch=True, batch_size=10))
        cluster.push(3000, sleep=0.001)
        await cluster.until_results(300, 60)
        node = cluster.master.node
        [real] = [c for c in node._connections if c.address == worker.address]
        local = real.transport.get_extra_info("peername")[1]  # the worker dialed from there
        with mock.patch.object(w, "PROVE_SECONDS", 0.5), mock.patch.object(w, "DRAIN_GRACE", 1.0):
            reader, writer = await raw_wire(node, worker.node.identity, peer_id=worker.node.peer_id,
                                            port=port_below(local))
            self.addCleanup(writer.close)
            self.assertTrue(await closed_by_peer(reader, 5))
        await cluster.until_results(3000, 60)
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), list(range(3000)))
        self.assertIn(real, node._connections)
        self.assertEqual(node.stats["duplicate wires"], 0)
        self.assertEqual(node.stats["wires drained: claim not proven"], 1)

    async def test_a_replayed_ping_does_not_make_a_wire_the_masters(self):
        ident = "replayed-%d" % random.randrange(1 << 30)
        master = await self.started(py_node(ident))
        old = signed_by(master.identity, {"y": "p"}, ident, t=w._now() - w.FRESH_MS - 5000)
        worker = await self.started(py_node(ident))  # a worker just (re)started: it saw nothing yet
        worker.prioritize(master.address)
        _, writer = await raw_wire(worker, master.identity, peer_id=master.peer_id)
        self.addCleanup(writer.close)
        writer.write(bo_frame(old))
        await until(lambda: ("seen", master.address) in worker.events, 5)  # the packet passed ...
        [claimant] = list(worker._connections)
        self.assertFalse(worker.has_signed_wire(master.address))  # ... and proves nothing
        self.assertFalse(worker.is_protected(claimant))
        worker.add_peer("127.0.0.1", master.port)  # the master's own wire proves it at once
        await until(lambda: worker.has_signed_wire(master.address), 5)
        self.assertIsNot(worker.policy.direct(master.address), claimant)


class TestJsInterop(AsyncTest):
    def setUp(self):
        js_ready()

    async def _both_ways(self, python_dials):
        ident = "interop-%d" % random.randrange(1 << 30)
        js = self.will_close(await js_peer(ident))
        peers = ["127.0.0.1:%d" % js.ready["port"]] if python_dials else ()
        py = await self.started(py_node(ident, peers=peers))
        if not python_dials:
            js.send(cmd="addPeer", addr="127.0.0.1:%d" % py.port)
        js_address = js.ready["address"]
        await js.wait_for(lambda e: e["event"] == "seen" and e["address"] == py.address)
        await until(lambda: js_address in py.peers)
        # RPC both ways
        self.assertEqual(await py.rpc(js_address, "echo", {"n": "é"}), {"n": "é", "echoedBy": "js"})
        self.assertEqual(await py.rpc(js_address, "nope", {}), {"error": "No such API call."})
        js.send(cmd="rpc", id=1, address=py.address, call="echo", args={"from": "js"})
        event = await js.wait_for(lambda e: e["event"] == "rpc-result" and e["id"] == 1)
        self.assertEqual(event["result"], {"from": "js", "echoedBy": "py"})
        js.send(cmd="rpc", id=2, address=py.address, call="missing", args={})
        event = await js.wait_for(lambda e: e["event"] == "rpc-result" and e["id"] == 2)
        self.assertEqual(event["result"], {"error": "No such API call."})
        # broadcast and addressed messages both ways
        py.send({"hello": "all"})
        py.send({"hello": "you"}, address=js_address)
        for message in ({"hello": "all"}, {"hello": "you"}):
            await js.wait_for(lambda e, m=message: e["event"] == "message" and e["message"] == m)
        js.send(cmd="send", message={"js": "all"})
        js.send(cmd="send", address=py.address, message={"js": "you"})
        await until(lambda: ("message", js_address, {"js": "all"}) in py.events
                    and ("message", js_address, {"js": "you"}) in py.events)
        await py.close()
        await js.wait_for(lambda e: e["event"] == "left" and e["address"] == py.address)

    async def test_python_dials_js(self):
        await self._both_ways(python_dials=True)

    async def test_js_dials_python(self):
        await self._both_ways(python_dials=False)

    async def test_line_js_python_js_relays(self):
        ident = "line-%d" % random.randrange(1 << 30)
        py = await self.started(py_node(ident))
        js1, js2 = self.will_close(await js_peer(ident)), self.will_close(await js_peer(ident))
        for js in (js1, js2):
            js.send(cmd="addPeer", addr="127.0.0.1:%d" % py.port)
        a1, a2 = js1.ready["address"], js2.ready["address"]
        # each JS peer sees the other only through the Python relay
        await js1.wait_for(lambda e: e["event"] == "seen" and e["address"] == a2)
        await js2.wait_for(lambda e: e["event"] == "seen" and e["address"] == a1)
        js1.send(cmd="send", message={"across": 1})
        await js2.wait_for(lambda e: e["event"] == "message" and e["message"] == {"across": 1})
        js1.send(cmd="rpc", id=7, address=a2, call="echo", args={"via": "py"})
        event = await js1.wait_for(lambda e: e["event"] == "rpc-result" and e["id"] == 7)
        self.assertEqual(event["result"], {"via": "py", "echoedBy": "js"})
        self.assertGreater(py.core.stats["relayed"], 3)


# Status: /metrics and /healthz (issue 14) ###################################

class TestStatusServer(AsyncTest):
    async def test_pages_and_hostile_clients(self):
        healthy = [True]
        hist = w.Histogram()
        hist.observe(0.02)

        def metrics():
            out = w.Exposition()
            out.add("jobs_done_total", "counter", "Jobs done.", 3)
            out.add("peers", "gauge", "Peers by transport.", {(("transport", "tcp"),): 2})
            out.histogram("job_duration_seconds", "Job time.", hist)
            return out.text()
        server = await self.started(w.StatusServer("127.0.0.1", 0, metrics,
                                                   lambda: (healthy[0], {"master": "bX"} if healthy[0] else
                                                            {"reason": "no master"})))
        base = "http://127.0.0.1:%d" % server.port
        status, body = await asyncio.to_thread(http_get, base + "/metrics")
        self.assertEqual(status, 200)
        samples, types = parse_exposition(body)
        self.assertEqual(samples["qx_jobs_done_total"][()], 3)
        self.assertEqual(types["qx_job_duration_seconds"], "histogram")
        self.assertEqual(samples["qx_job_duration_seconds_bucket"][(("le", "0.05"),)], 1)
        self.assertEqual(await asyncio.to_thread(http_get, base + "/healthz"), (200, '{"master":"bX"}'))
        healthy[0] = False
        self.assertEqual((await asyncio.to_thread(http_get, base + "/healthz"))[0], 503)
        self.assertEqual((await asyncio.to_thread(http_get, base + "/nope"))[0], 404)
        # slow clients take their own connection only; the loop stays free; the cap holds
        lag = []

        async def ticker():
            while True:
                started = time.monotonic()
                await asyncio.sleep(0.01)
                lag.append(time.monotonic() - started - 0.01)
        tick = asyncio.ensure_future(ticker())
        slow = [await asyncio.open_connection("127.0.0.1", server.port)
                for _ in range(w.STATUS_MAX_CLIENTS)]
        for _, writer in slow:
            writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the end of it
        _, huge = await asyncio.open_connection("127.0.0.1", server.port)
        await until(lambda: server.stats["dropped"] >= 1, 5)  # over the cap: the oldest still sending goes
        started = time.monotonic()
        for reader, _ in slow:
            self.assertEqual(await asyncio.wait_for(reader.read(), 10), b"")  # dropped after the timeout
        self.assertLess(time.monotonic() - started, w.STATUS_READ_TIMEOUT + 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (w.STATUS_MAX_REQUEST * 2))
        self.assertEqual(await asyncio.wait_for(reader.read(), 10), b"")  # too big: dropped
        self.assertEqual((await asyncio.to_thread(http_get, base + "/metrics"))[0], 200)
        tick.cancel()
        self.assertLess(max(lag), 0.1)
        self.assertGreaterEqual(server.stats["dropped"], w.STATUS_MAX_CLIENTS + 1)
        huge.close()
        writer.close()
        for _, slow_writer in slow:
            slow_writer.close()

    async def test_out_of_descriptors_costs_one_log_line_a_minute(self):
        # asyncio's own listener reports each failed accept() (once a second while clients wait)
        child = textwrap.dedent("""
            import asyncio, os, resource, worker as w
            async def main():
                w.Logger("info")
                w.limit_loop_errors()
                server = await w.StatusServer("127.0.0.1", 0, lambda: "", lambda: (True, {})).start()
                used = len(os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (used + 2, used + 2))
                print(server.port, flush=True)
                await asyncio.Event().wait()
            asyncio.run(main())
            """)
        proc = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, "-c", child, cwd=HERE, env=clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE))
        port = int(await asyncio.wait_for(proc.stdout.readline(), 20))
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(6)]  # they wait
        lines = []

        async def read_lines():
            while raw := await proc.stderr.readline():
                lines.append(raw.decode())
        reading = asyncio.ensure_future(read_lines())
        await until(lambda: any("out of system resource" in line for line in lines), 10)
        await asyncio.sleep(3.5)  # asyncio tries again every second
        proc.kill()
        await proc.wait()
        await asyncio.wait_for(reading, 10)
        for _, writer in held:
            writer.close()
        self.assertEqual(sum("out of system resource" in line for line in lines), 1, lines[:20])

    async def test_a_slowloris_does_not_keep_a_scraper_out(self):
        server = await self.started(w.StatusServer("127.0.0.1", 0, lambda: "qx_up 1\n",
                                                   lambda: (True, {"status": "ok"})))
        base = "http://127.0.0.1:%d" % server.port
        slow = [await asyncio.open_connection("127.0.0.1", server.port)
                for _ in range(3 * w.STATUS_MAX_CLIENTS)]  # more than the cap, each sending a little
        for _, writer in slow:
            writer.write(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        self.assertEqual(await asyncio.to_thread(http_get, base + "/healthz"), (200, '{"status":"ok"}'))
        self.assertEqual(await asyncio.to_thread(http_get, base + "/metrics"), (200, "qx_up 1\n"))
        self.assertGreaterEqual(server.stats["dropped"], 2 * w.STATUS_MAX_CLIENTS)  # the oldest made room
        await until(lambda: len(server._clients) <= w.STATUS_MAX_CLIENTS, 5)
        for _, writer in slow:
            writer.close()


class TestWorkerStatus(AsyncTest):
    async def test_metrics_and_health_of_a_real_worker_process(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        cluster.push(20)
        cluster.push(5, start=20, fail=True)
        folder, port = tmp / "wp", free_port()
        folder.mkdir()
        write_loopback_env(folder, cluster.token, peers="127.0.0.1:%d" % cluster.master.port,
                           statusPort=port, getBatch="true", batchSize=5, LOG_LEVEL="warn")
        proc = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, WORKER_PY, cwd=folder, env=clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT))
        base = "http://127.0.0.1:%d" % port
        await cluster.until_results(25)

        async def metrics():
            status, body = await asyncio.to_thread(http_get, base + "/metrics")
            self.assertEqual(status, 200)
            return parse_exposition(body)
        samples, types = await metrics()
        self.assertEqual(samples["qx_jobs_done_total"][()], 20)
        self.assertEqual(samples["qx_jobs_failed_total"][(("error", "ValueError"),)], 5)
        self.assertEqual(types["qx_job_duration_seconds"], "histogram")
        self.assertEqual(samples["qx_job_duration_seconds_count"][()], 25)
        self.assertEqual(samples["qx_job_duration_seconds_bucket"][(("le", "+Inf"),)], 25)
        self.assertEqual(samples["qx_master_connected"][()], 1)
        self.assertEqual(samples["qx_peers"][(("transport", "tcp"),)], 1)
        self.assertGreater(samples["qx_resident_memory_bytes"][()], 10e6)
        self.assertGreater(samples["qx_bytes_received_total"][()], 1000)
        self.assertIn("qx_assets_age_seconds", samples)
        self.assertIn("qx_packets_dropped_total", samples)
        status, body = await asyncio.to_thread(http_get, base + "/healthz")
        self.assertEqual((status, json.loads(body)["master"]), (200, cluster.master.address))
        cluster.push(10, start=100)  # the counters move with real jobs
        await cluster.until_results(35)
        await until(lambda: cluster.master.stats["results"] >= 35)
        samples, _ = await metrics()
        self.assertEqual(samples["qx_jobs_done_total"][()], 30)
        self.assertGreaterEqual(samples["qx_delivery_latency_seconds_count"][()], 30)
        self.assertEqual((await asyncio.to_thread(http_get, base + "/nothing"))[0], 404)
        await cluster.master.close()  # the master goes away: not healthy
        status, body = await asyncio.to_thread(http_get, base + "/healthz")
        for _ in range(50):
            if status == 503:
                break
            await asyncio.sleep(0.1)
            status, body = await asyncio.to_thread(http_get, base + "/healthz")
        self.assertEqual(status, 503)
        self.assertIn("master", json.loads(body)["reason"])
        proc.send_signal(15)
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
        self.assertIn(b" warn  ", output)  # level names print whole
        self.assertNotIn(b"warni ", output)

    async def test_master_py_status_page(self):
        tmp = self.tmp()
        token, port, status = "mstatus-%d" % random.randrange(1 << 30), free_port(), free_port()
        folder = tmp / "m"
        folder.mkdir()
        write_assets(folder, DEFAULT_FILES)
        write_loopback_env(folder, token, port=port, LOG_LEVEL="warn")
        proc = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, MASTER_PY, "--task", "workplace/task.py", "--task", "workplace/data/conf/factor.json",
            "--jobs", "-", "--status-port", str(status), cwd=folder, env=clean_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        await proc.stdout.readline()  # ready
        base = "http://127.0.0.1:%d" % status
        for i in range(30):
            proc.stdin.write(b'{"id": %d, "data": "{\\"x\\": %d}"}\n' % (i, i))
        await proc.stdin.drain()

        async def samples():
            return parse_exposition((await asyncio.to_thread(http_get, base + "/metrics"))[1])[0]
        before = None
        for _ in range(100):
            before = await samples()
            if before["qx_master_jobs_waiting"][()] == 30:
                break
            await asyncio.sleep(0.05)
        self.assertEqual(before["qx_master_jobs_waiting"][()], 30)
        self.assertEqual(before["qx_master_results_total"][()], 0)
        worker = await self.started(loopback_worker(token, tmp / "w", peers=["127.0.0.1:%d" % port],
                                                    get_batch=True, batch_size=5))
        for _ in range(200):
            after = await samples()
            if after["qx_master_results_total"][()] == 30:
                break
            await asyncio.sleep(0.05)
        self.assertEqual(after["qx_master_results_total"][()], 30)
        self.assertEqual(after["qx_master_error_results_total"][()], 0)
        self.assertEqual(after["qx_master_jobs_waiting"][()], 0)
        self.assertEqual(after["qx_master_workers"][()], 1)
        self.assertEqual(json.loads((await asyncio.to_thread(http_get, base + "/healthz"))[1])["status"], "ok")
        await worker.stop()
        proc.send_signal(15)
        await asyncio.wait_for(proc.wait(), 15)

    async def test_systemd_ready_watchdog_and_stopping(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        folder = tmp / "wp"
        folder.mkdir()
        write_loopback_env(folder, cluster.token, peers="127.0.0.1:%d" % cluster.master.port)
        path = str(tmp / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setblocking(False)
        self.addCleanup(sock.close)
        proc = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, WORKER_PY, cwd=folder, stderr=subprocess.DEVNULL,
            env={**clean_env(), "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}))
        said = []

        def read():
            with contextlib.suppress(BlockingIOError):
                while True:
                    said.append(sock.recv(100).decode())
            return said
        await until(lambda: read().count("WATCHDOG=1") >= 3, 20)  # about every 0.2 s
        self.assertEqual(said[0], "READY=1")
        proc.send_signal(15)
        await asyncio.wait_for(proc.wait(), 30)
        self.assertIn("STOPPING=1", read())

    async def test_status_line_at_most_once_a_minute_while_anything_happened(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        cluster.push(12)
        worker = cluster.worker(get_batch=True, batch_size=4)
        with mock.patch.object(w, "STATUS_LINE_SECONDS", 0.3), self.assertLogs("worker", "INFO") as logs:
            await self.started(worker)
            await cluster.until_results(12)
            await until(lambda: any("status: " in line for line in logs.output), 5)
            await asyncio.sleep(1.2)  # nothing happens: no more lines
        lines = [line for line in logs.output if "status: " in line]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r"status: 12 done \(\d+\.\d/s\), 0 failed, 0 held, master b\w{7}… "
                                   r"\(proven\), peers 1 \(tcp 1\)")


# Worker: assets and dependencies ############################################

class TestSafety(unittest.TestCase):
    def test_asset_paths(self):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            files = root.resolve() / w.ASSET_FOLDER
            files.mkdir()
            (files / "out").symlink_to("/tmp")
            self.assertEqual(w.safe_asset_path(root, "/workplace/a/b.py"), files / "workplace/a/b.py")
            self.assertEqual(w.safe_asset_path(root, "task.py"), files / "task.py")
            for bad in ["/../x", "/a/../../x", "//etc/passwd", "/", "", None, "/a\\..\\x", "/a/\0",
                        "/out/x.py", "C:/x", "/a//b", "/../.env", "/.deps/x.py", "/node_modules/x",
                        "/a/Node_Modules/x/index.js", "/workplace/__pycache__/helper.cpython-311.pyc"]:
                with self.assertRaises(w.UnsafeAsset, msg=bad):
                    w.safe_asset_path(root, bad)

    def test_asset_names_land_where_no_import_looks(self):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp).resolve()
            for name in ["/worker/__init__.py", "/argparse.py", "/worker.py", "/.env", "/json.py",
                         "/" + w.NODE_RUNNER_NAME, "/cryptography/__init__.py", "/.qx-journal.db"]:
                self.assertEqual(w.safe_asset_path(root, name).parent.parts[:len(root.parts) + 1],
                                 (*root.parts, w.ASSET_FOLDER), name)
            self.assertFalse(w.ASSET_FOLDER.isidentifier())  # not even a namespace package

    def test_requirements(self):
        for good in ["requests", "requests==2.31.0", "Pillow[extra]>=9,<11", "a.b-c_d~=1.0"]:
            self.assertEqual(w.check_requirement(good), good)
        for bad in ["-e .", "--index-url=x", "git+https://x/y", "./local", "/abs/path",
                    "pkg @ https://x", "pkg; os_name=='nt'", "", 3, "a b"]:
            with self.assertRaises(w.UnsafeAsset, msg=bad):
                w.check_requirement(bad)

    def test_installed_versions_are_compared_by_pep_440(self):
        # True: the installed version serves and pip is not run; False: pip decides.
        for version, spec, ok in [("2.0", "<2.0.0", False), ("1.26.0", "==1.26", True),
                                  ("1.26", "==1.26.0", True), ("1.4.2", "~=1.4", True),
                                  ("2.0", "~=1.4", False), ("1.26.4", ">=1.26,<2", True),
                                  ("3.0", "!=3.0", False), ("1.0", "", True), ("1.0", "[x]>=1", True),
                                  ("1.0rc1", ">=0.9", True), ("1.2.3", "==1.2.*", True),
                                  ("not a version", ">=1", False), ("1.0", ">=x.y", False)]:
            self.assertIs(w._version_ok(version, spec), ok, msg=(version, spec))


class TestTaskJsSafety(unittest.TestCase):
    def test_npm_package_names(self):
        for good in ["moment", "big.js", "lodash@4.17.21", "@scope/pkg", "@scope/pkg@^1.2.0", "JSONStream",
                     "pkg@latest", "pkg@>=1.0.0 <2", "pkg@~1.2.x", "pkg@1.x || 2.x", "pkg@1.2.3 - 2.0.0"]:
            self.assertEqual(w.check_npm_package(good), good)
        for bad in ["", None, 3, "-g", "--registry=http://evil", "http://x/y.tgz", "git+https://github.com/a/b",
                    "github:a/b", "a/b", "./local", "../x", "/abs", "file:../x", "pkg@file:../x", "pkg@npm:other",
                    "pkg@git+ssh://x", "pkg@http://x/y", ".hidden", "_under", "pkg@", "a b", "pkg@1.0.0#x",
                    "@scope/", "@/x", "pkg@1 --registry=x", "x" * 300]:
            with self.assertRaises(w.UnsafeAsset, msg=bad):
                w.check_npm_package(bad)

    def test_runner_file_cannot_be_overwritten(self):
        with tempfile.TemporaryDirectory() as tmp:
            for name in ["/" + w.NODE_RUNNER_NAME, w.NODE_RUNNER_NAME]:
                runner = Path(tmp).resolve() / w.NODE_RUNNER_NAME
                self.assertNotEqual(w.safe_asset_path(Path(tmp), name), runner)


PLANTED = "raise SystemExit('a planted module ran')\n"


class TestAssetNames(AsyncTest):
    """Issue 20: asset names are claims; none reaches an import of the worker or its tasks."""

    async def test_a_task_child_imports_the_standard_library_before_the_masters_files(self):
        folder = self.tmp()
        (folder / "task.py").write_text(
            "import sys\nclass Task:\n    def run(self, job):\n        import csv, helper\n"
            "        if job == 'fail':\n            raise ValueError('as asked')\n"
            "        return [csv.__file__, helper.NAME]\n")
        (folder / "helper.py").write_text("NAME = 'the task finds its own modules'\n")
        for planted in ("csv.py", "traceback.py", "json.py"):  # json: the child's own, at its start
            (folder / planted).write_text(PLANTED)
        runner = await self.started(w.PythonRunner(folder / "task.py", folder, 20))
        where, helper = await runner.run("ok")
        self.assertNotEqual(Path(where).parent, folder)  # the standard library's csv
        self.assertEqual(helper, "the task finds its own modules")
        with self.assertRaises(w.TaskError) as failed:  # describing it imports traceback: the real one
            await runner.run("fail")
        self.assertEqual(failed.exception.error["message"], "as asked")

    async def test_dependencies_stay_off_the_workers_own_path_in_process_mode(self):
        worker = loopback_worker("deps-path", self.tmp() / "w")
        self.assertTrue(await worker.install_dependencies(["pip"]))  # present: nothing to install
        self.assertNotIn(str(worker.deps_folder), sys.path)
        deps = str(worker.deps_folder)
        self.addCleanup(lambda: deps in sys.path and sys.path.remove(deps))
        w.use_path(worker.deps_folder)  # thread mode: the task imports in our process
        at = sys.path.index(deps)
        self.assertTrue(all("-packages" not in p for p in sys.path[:at]))  # site-packages after it
        self.assertTrue(any(p.endswith("lib-dynload") for p in sys.path[:at]))  # the stdlib before it

    async def test_files_an_earlier_version_wrote_move_where_no_import_looks(self):
        folder = self.tmp()
        manifest = []
        for name, text in (("/workplace/task.js", "module.exports = class {}"), ("/argparse.py", PLANTED),
                           ("/workplace/changed.txt", "as received"), ("/.env", "token=mine")):
            path = folder / name.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            manifest.append({"name": path.name, "workerPath": name, "sha256": "0" * 64,
                             "received": hashlib.sha256(text.encode()).hexdigest()})
        (folder / "workplace/changed.txt").write_text("changed since")  # not ours to move any more
        self.assertEqual(w.move_earlier_assets(folder, manifest), 2)
        files = folder / w.ASSET_FOLDER
        self.assertEqual((files / "argparse.py").read_text(), PLANTED)
        self.assertTrue((files / "workplace/task.js").is_file())
        self.assertFalse((folder / "argparse.py").exists())
        self.assertTrue((folder / "workplace/changed.txt").is_file())
        self.assertEqual((folder / ".env").read_text(), "token=mine")  # the worker's own: never
        self.assertEqual(w.move_earlier_assets(folder, manifest), 0)  # once

    @time_limit(120)
    async def test_planted_module_names_reach_no_import_and_the_worker_restarts(self):
        """A replayer of the master's files names them worker/__init__.py and argparse.py (and
        node_modules/x, refused); both ways of starting the worker come back up cleanly."""
        tmp = self.tmp()
        token = "planted-%d" % random.randrange(1 << 30)
        task = b"class Task:\n    def run(self, job):\n        return job\n"
        replay = asset_answer({"/workplace/task.py": task, "/worker/__init__.py": task, "/argparse.py": task})
        replayer = await self.started(Impostor(token, replay))
        refused = await self.started(Impostor(token, asset_answer({"/workplace/task.py": task,
                                                                   "/node_modules/x": task})))
        unit = tmp / "unit"  # the README's unit: WorkingDirectory=the folder, PYTHONPATH=worker.py's
        layouts = {"python -m worker": ([sys.executable, "-m", "worker"], unit / "worker", unit),
                   "python worker.py": ([sys.executable, "worker.py"], tmp / "use", tmp / "use")}
        for name, (argv, folder, home) in layouts.items():
            folder.mkdir(parents=True)
            shutil.copy(WORKER_PY, home / "worker.py")
            write_loopback_env(folder, token, LOG_LEVEL="info", peers="127.0.0.1:%d,127.0.0.1:%d" % (
                refused.node.port, replayer.node.port))
            env = {**clean_env(), "PYTHONPATH": str(home)}
            for run in range(2):  # the attack, then a restart
                log = folder / ("run%d.log" % run)
                with log.open("wb") as out:
                    proc = self.will_kill(await asyncio.create_subprocess_exec(
                        *argv, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT))
                if run == 0:
                    await until(lambda folder=folder: (folder / w.ASSET_FOLDER / "argparse.py").is_file()
                                and "task loaded" in (folder / "run0.log").read_text(), 30)
                else:
                    await until(lambda log=log: "listening on" in log.read_text(), 20)
                    await asyncio.sleep(1.0)
                self.assertIsNone(proc.returncode, name + ": " + log.read_text()[-2000:])
                proc.terminate()
                self.assertEqual(await asyncio.wait_for(proc.wait(), 30), 0, name)
                self.assertNotIn("Traceback", log.read_text(), name)
            for planted in ("worker/__init__.py", "argparse.py", "node_modules/x"):
                self.assertFalse((folder / planted).exists(), (name, planted))
            self.assertFalse((folder / w.ASSET_FOLDER / "node_modules").exists())
        self.assertIn("requestExecAssets", refused.names())  # it was asked, and nothing of it written


# Worker: trusting a master (issue 10) #######################################

class TestMasterProof(unittest.TestCase):
    """The proof rules and the trust table, in memory."""

    def verify(self, answer, text_reads=True, key=KEY):
        with tempfile.TemporaryDirectory() as tmp:
            return w.verify_assets(answer, w.Crypt(key), Path(tmp), text_reads=text_reads)

    def test_the_task_file_and_text_files_must_hash_as_the_master_says(self):
        good = asset_answer({"/workplace/task.py": TASK_PY.encode(), "/workplace/data/x.txt": b"text\n"})
        verified = self.verify(good)
        self.assertTrue(verified.python)
        self.assertEqual(verified.unified, "".join(f["sha256"] for f in good["files"]))
        self.assertEqual([c for _, _, c in verified.files], [TASK_PY.encode(), b"text\n"])
        for index in (0, 1):  # a wrong hash on the task or on a text file
            bad = json.loads(json.dumps(good))
            bad["files"][index]["sha256"] = "0" * 64
            with self.assertRaises(w.AssetError):
                self.verify(bad)
        with self.assertRaises(w.CryptError):  # another key: nothing decrypts
            self.verify(good, key="x" * 32)

    def test_a_binary_file_read_as_utf8_by_a_js_master(self):
        binary = bytes(range(256))
        answer = asset_answer({"/task.js": b"module.exports = class {}\n", "/blob.bin": binary})
        mangled = binary.decode("utf-8", "replace").encode()  # what the JS master's read sends
        answer["files"][1]["content"] = w.Crypt(KEY).encrypt(mangled)
        with self.assertLogs("worker", "WARNING") as logs:
            verified = self.verify(answer)  # accepted from a JS master, as received
        self.assertEqual(verified.files[1][2], mangled)
        self.assertIn("binary file", logs.output[0])
        with self.assertRaises(w.AssetError):  # master.py reads bytes: never from it
            self.verify(answer, text_reads=False)
        answer["files"][0]["content"] = w.Crypt(KEY).encrypt("\ufffd".encode())  # never the task file
        with self.assertRaises(w.AssetError):
            self.verify(answer)

    def test_shapes_and_caps(self):
        good = asset_answer({"/task.py": b"class Task: pass\n"})
        cases = [None, [], {"status": "same", "files": []}, {**good, "files": []},
                 {**good, "files": "task.py"}, {**good, "dependencies": "numpy"},
                 {**good, "dependencies": ["numpy"] * (w.MAX_DEPENDENCIES + 1)},
                 {**good, "files": good["files"] * (w.MAX_ASSET_FILES + 1)},
                 {**good, "files": [{**good["files"][0], "name": 5}]},
                 {**good, "files": [{**good["files"][0], "sha256": None}]},
                 {**good, "files": [{**good["files"][0], "content": "x"}]},
                 asset_answer({"/other.py": b"x"})]
        for answer in cases:
            with self.assertRaises(w.AssetError, msg=str(answer)[:200]):
                self.verify(answer)
        with self.assertRaises(w.UnsafeAsset):
            self.verify({**good, "files": [{**good["files"][0], "workerPath": "/../x.py"}]})
        with self.assertRaises(w.UnsafeAsset):
            self.verify({**good, "dependencies": ["--index-url=http://evil/"]})

    def test_the_challenges_bind_nonce_both_addresses_and_a_key_of_their_own(self):
        crypt = w.Crypt(KEY)
        prover, asker, other = (w.Identity().address for _ in range(3))
        nonce = os.urandom(32)
        proofs = set()
        for prove, label in ((w.master_proof, w.PROOF_LABEL), (w.worker_proof, w.WORKER_PROOF_LABEL)):
            key = crypt.derive(label)
            proof = prove(key, nonce, prover, asker)
            self.assertEqual(proof, prove(key, nonce, prover, asker))
            for changed in (prove(key, os.urandom(32), prover, asker), prove(key, nonce, other, asker),
                            prove(key, nonce, prover, other), prove(key, nonce, asker, prover),
                            prove(w.Crypt("y" * 32).derive(label), nonce, prover, asker)):
                self.assertNotEqual(changed, proof)
            proofs.add(proof)
        self.assertEqual(len(proofs), 2)  # a master's proof never passes for a worker's
        same_key = crypt.derive(w.WORKER_PROOF_LABEL)
        self.assertNotEqual(w.master_proof(same_key, nonce, prover, asker),
                            w.worker_proof(same_key, nonce, prover, asker))  # nor with the other's key

    def test_master_py_counts_a_worker_proof_once_and_while_its_challenge_is_open(self):
        from master import CHALLENGE_SECONDS, MAX_CHALLENGES, WorkerProofs
        key = w.Crypt(KEY).derive(w.WORKER_PROOF_LABEL)
        master, worker, other = (w.Identity().address for _ in range(3))
        proofs = WorkerProofs(key, master)
        answer = lambda nonce, by=worker: w.worker_proof(key, bytes.fromhex(nonce), by, master)
        nonce = proofs.challenge(worker, os.urandom(32), 100.0)
        self.assertIsNone(proofs.check(other, answer(nonce, other), 100.0))  # never challenged
        self.assertTrue(proofs.check(worker, answer(nonce), 101.0))
        self.assertIsNone(proofs.check(worker, answer(nonce), 101.0))  # replayed: nothing open
        for bad in ("0" * 64, "é" * 64, None, 12, ["x"], answer(nonce, other)):
            nonce = proofs.challenge(worker, os.urandom(32), 100.0)
            self.assertIs(proofs.check(worker, bad, 100.0), False)
        nonce = proofs.challenge(worker, os.urandom(32), 100.0)
        self.assertIsNone(proofs.check(worker, answer(nonce), 100.0 + CHALLENGE_SECONDS + 1))  # run out
        first = proofs.challenge(worker, os.urandom(32), 100.0)
        for _ in range(MAX_CHALLENGES):  # a flood of challenges by other identities pushes it out
            proofs.challenge(w.Identity().address, os.urandom(32), 100.0)
        self.assertIsNone(proofs.check(worker, answer(first), 100.0))
        self.assertLessEqual(len(proofs._open), MAX_CHALLENGES)

    def test_trust_bans_budget_and_pins(self):
        trust = w.MasterTrust()
        peers = [w.Identity().address for _ in range(60)]
        now = 1000.0
        self.assertTrue(trust.may_ask(peers[0], now))
        hour, per_hour = w.PROOF_BUDGET[0]
        for i in range(per_hour - 1):
            self.assertFalse(trust.proof_failed(peers[i], now + i))
            self.assertFalse(trust.may_ask(peers[i], now + i + 1))  # banned
        self.assertTrue(trust.may_ask(peers[per_hour], now + per_hour))
        self.assertTrue(trust.proof_failed(peers[per_hour - 1], now + per_hour))  # the budget is spent
        self.assertFalse(trust.may_ask(peers[per_hour], now + per_hour))
        self.assertFalse(trust.may_prove(peers[per_hour], now + hour - 1))
        self.assertTrue(trust.may_prove(peers[per_hour], now + hour + 1))  # an hour later
        self.assertFalse(trust.may_ask(peers[0], now + w.PROOF_BAN_SECONDS - 1))
        trust.adopt(peers[50])
        self.assertEqual(trust.master, peers[50])
        trust.said_yes(peers[51], w.MasterCaps())
        self.assertIn(peers[51], trust.candidates)
        self.assertTrue(trust.lose(peers[50]))
        self.assertEqual(trust.next_to_ask([peers[52]], now)[:3], [peers[50], peers[51], peers[52]])
        # a fresh identity every minute for two days: no window holds more failures than allowed
        day, spent = w.MasterTrust(), []
        for i in range(2 * 24 * 60):
            t = now + 60 * i
            if day.may_prove("peer-%d" % i, t):
                day.proof_failed("peer-%d" % i, t)
                spent.append(t)
        for window, allowed in w.PROOF_BUDGET:
            self.assertLessEqual(max(sum(1 for u in spent if t - window < u <= t) for t in spent), allowed)
        self.assertLessEqual(len(spent), 2 * w.PROOF_BUDGET[1][1])
        pinned = w.MasterTrust(pinned=[peers[0]])
        self.assertFalse(pinned.may_ask(peers[1], now))
        self.assertTrue(pinned.may_ask(peers[0], now))

    def test_a_failed_challenge_spends_no_budget_and_its_ban_ends_when_the_peer_comes_back(self):
        # issue 25: a master.py whose key was fixed and that was started again was ignored for an
        # hour. Its challenge decrypts nothing (no padding oracle): only asset proofs need the hour.
        trust = w.MasterTrust()
        master, js, both, other = (w.Identity().address for _ in range(4))
        now = 1000.0
        for i in range(3 * w.PROOF_BUDGET[1][1]):  # failing again and again, as each restart did
            self.assertFalse(trust.proof_failed(master, now + i, oracle=False))
            self.assertFalse(trust.may_ask(master, now + i + 0.5))  # not asked while it stays
            self.assertNotIn(master, trust.next_to_ask([master], now + i + 0.5))
            trust.left(master)  # gone: its next wire is a new start, perhaps with the key fixed
            self.assertTrue(trust.may_ask(master, now + i + 0.5))
        self.assertEqual(len(trust.failures), 0)  # no budget spent
        self.assertTrue(trust.may_prove(other, now + 200))
        trust.proof_failed(master, now + 300, oracle=False)
        self.assertFalse(trust.may_ask(master, now + 300 + w.PROOF_BAN_SECONDS - 1))  # it never left
        self.assertTrue(trust.may_ask(master, now + 300 + w.PROOF_BAN_SECONDS + 1))
        # an asset proof decrypts what the peer sent: its hour and its budget stay, left or not
        trust.proof_failed(js, now, oracle=True)
        trust.left(js)
        self.assertFalse(trust.may_ask(js, now + w.PROOF_BAN_SECONDS - 1))
        self.assertEqual(len(trust.failures), 1)
        trust.proof_failed(both, now, oracle=False)  # a challenge, then an asset proof, failed
        trust.proof_failed(both, now + 1, oracle=True)
        trust.left(both)
        self.assertFalse(trust.may_ask(both, now + 2))
        for i in range(2 * w.MAX_REMEMBERED):  # bounded, whatever fails
            trust.proof_failed("peer-%d" % i, now, oracle=False)
        self.assertLessEqual(len(trust._failed_challenge), w.MAX_REMEMBERED)


class TestMasterTrust(AsyncTest):
    """Token-only peers against a real worker over loopback sockets."""

    @time_limit(120)
    async def test_padding_oracle_loop_gets_the_budget_and_nothing_else(self):
        tmp = self.tmp()
        token = "oracle-%d" % random.randrange(1 << 30)
        worker = loopback_worker(token, tmp / "w")
        with self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            flood = IdentityFlood(token, worker.node.port, padding_probe(random.Random(3)))
            await self.started(flood)
            probes = 0
            while probes < 10_000:  # one identity per probe, each asked as soon as the last is done
                flood.new_identity()
                probes += 1
                try:
                    await until(lambda n=probes: flood.calls["requestExecAssets"] >= n, 2.0)
                except AssertionError:
                    break  # the worker asks no more: the rest come at once
            flood.unopened = 0  # the worker asked the handshake's identity too, at the start
            for _ in range(10_000 - probes):
                flood.new_identity()
                await flood.writer.drain()
            await asyncio.sleep(3.0)  # a worker that still asked would have by now
        budget = w.PROOF_BUDGET[0][1]
        self.assertEqual(flood.calls["requestExecAssets"], budget)  # the budget, not 10,000
        self.assertEqual(flood.calls["isMaster"], budget)  # the next identity was not even asked
        self.assertEqual(flood.unopened, 0)
        self.assertEqual(sum("did not prove" in line for line in logs.output), budget)
        self.assertEqual(sum("failed to prove the key lately" in line for line in logs.output), 1)
        self.assertEqual(worker.current_hash(), "")
        self.assertIsNone(worker.keeper.runner)
        self.assertIsNone(worker.master)
        self.assertEqual([p.name for p in (tmp / "w").iterdir() if not p.name.startswith(w.JOURNAL_NAME)], [])
        self.assertFalse(any(name.startswith("qx_task") for name in sys.modules))

    @time_limit(90)
    async def test_the_master_is_found_at_once_behind_a_flood_of_silent_identities(self):
        tmp = self.tmp()
        token = "silent-%d" % random.randrange(1 << 30)
        worker = await self.started(loopback_worker(token, tmp / "w"))
        flood = await self.started(IdentityFlood(token, worker.node.port, None, answer=False))
        for _ in range(2000):  # identities that never answer isMaster: every check waits its timeout
            flood.new_identity()
            await flood.writer.drain()
        await until(lambda: flood.unopened + flood.calls["isMaster"] >= w.CHECK_CONCURRENCY - 1, 10)
        results = []
        master = loopback_master(token, tmp / "master", results.append,
                                 peers=["127.0.0.1:%d" % worker.node.port])
        master.push_new_job({"id": 1, "data": json.dumps({"x": 1})})
        started = time.monotonic()
        await self.started(master)
        await until(lambda: results, 20)
        self.assertLess(time.monotonic() - started, w.CHECK_TIMEOUT / 2)  # not behind the flood

    @time_limit(60)
    async def test_a_peer_that_leaves_before_its_proof_costs_no_log_line_and_no_re_ask(self):
        tmp = self.tmp()
        token = "leaver-%d" % random.randrange(1 << 30)
        worker = await self.started(loopback_worker(token, tmp / "w"))
        flood = await self.started(LeavingFlood(token, worker.node.port, padding_probe(random.Random(5))))
        with self.assertLogs("worker", "WARNING") as logs:
            w.log.warning("start")  # assertLogs needs one line
            flood.new_identity()
            await until(lambda: flood.calls["isMaster"] >= 1, 10)
            for _ in range(30):  # it says yes, leaves at once, and comes back: again and again
                await asyncio.sleep(0.1)
                flood.come_back()
        self.assertEqual(flood.calls["isMaster"], 1)  # not asked again at once
        self.assertEqual(flood.calls["requestExecAssets"], 0)
        self.assertEqual([line for line in logs.output if "task failed" in line], [])
        self.assertIsNone(worker.master)

    async def test_a_wire_that_only_claims_the_js_masters_address_gets_no_result(self):
        await self._claimer(replay=False)

    async def test_a_replayed_ping_on_a_wire_claiming_the_js_master_gets_no_result(self):
        await self._claimer(replay=True)

    async def _claimer(self, replay):
        """A wire claims the master's keys and peer id (and replays a ping it signed a while ago);
        the master's own wire goes: the worker keeps its results, and sees the master leave."""
        tmp = self.tmp()
        token = "claimer-%d" % random.randrange(1 << 30)
        master = await self.started(Impostor(token, asset_answer(
            {p: t.encode() for p, t in DEFAULT_FILES.items()})))  # a JS master: the key, no acks
        old = signed_by(master.node.core.identity, {"y": "p"}, token, t=w._now() - w.FRESH_MS - 5000)
        worker = await self.started(loopback_worker(token, tmp / "w", peers=["127.0.0.1:%d" % master.node.port]))
        await until(lambda: worker.master == master.node.address and worker.keeper.runner is not None, 20)
        # The check of the master's wire waits CHECK_TIMEOUT for an answer that never comes: 10 s in
        # production, 4 here (the steps below take about one second).
        self.enterContext(mock.patch.object(w, "CHECK_TIMEOUT", 4.0))
        ident = master.node.core.identity
        _, writer = await raw_wire(worker.node, peer_id=master.node.peer_id, ext={
            "m": {"bo_channel": 4}, "id": token, "pk": ident.pk, "ek": ident.ek})
        self.addCleanup(writer.close)
        if replay:
            writer.write(bo_frame(old))
        await until(lambda: sum(c.address == master.node.address for c in worker.node._connections) == 2, 10)
        acceptor, master.node._acceptor = master.node._acceptor, None
        acceptor.close()  # the master's own wire goes, without a goodbye, and is not dialed again
        for conn in [c for c in worker.node._connections if c.address == master.node.address]:
            if conn.peer_name.endswith(":%d" % master.node.port):
                conn.close(abort=True)
        await until(lambda: sum(c.address == master.node.address for c in worker.node._connections) == 1, 10)
        self.assertFalse(worker.node.has_signed_wire(master.node.address))
        worker.outbox.given([(10**6, "{}")], (master.node.address, None))  # a job it gave
        worker.job_loop.result_ready({"jobID": 1, "worker": {"id": worker.address, "name": "w"}, "data": 2}, 10**6)
        await worker.outbox.flush()
        self.assertEqual(worker.outbox.owes(master.node.address), 1)
        worker.job_loop.kick_delivery()
        await asyncio.sleep(1.0)
        self.assertEqual(worker.master, master.node.address)  # its check still waits: not gone yet
        self.assertEqual(len(worker.outbox), 1)  # kept for a master that signed what came by its wire
        self.assertNotIn("shareResults", master.names())
        await until(lambda: worker.master is None, w.CHECK_TIMEOUT + 5)  # its own wires gone: it left
        self.assertEqual(len(worker.outbox), 1)

    async def test_every_rejection_looks_the_same(self):
        good_padding = asset_answer({"/task.py": b"import os\nclass Task: pass\n"})
        good_padding["files"][0]["sha256"] = "1" * 64  # decrypts, but not to that hash
        bad_padding = asset_answer({"/task.py": b"x"})
        bad_padding["files"][0]["content"]["encryptedData"] = os.urandom(16).hex()
        not_a_name = asset_answer({"/task.py": b"x"})
        not_a_name["files"][0]["name"] = 7
        wrong_key = asset_answer({"/task.py": b"class Task: pass\n"}, key="q" * 32)
        variants = {"good padding, wrong hash": good_padding, "bad padding": bad_padding,
                    "name not a string": not_a_name, "another key": wrong_key}
        tmp = self.tmp()
        token = "same-%d" % random.randrange(1 << 30)
        worker = await self.started(loopback_worker(token, tmp / "w", loglevel="error"))
        peers = ["127.0.0.1:%d" % worker.node.port]
        impostors = {name: await self.started(Impostor(token, answer), peers=peers)
                     for name, answer in variants.items()}
        await until(lambda: all(i.names()[-1:] == ["requestExecAssets"] for i in impostors.values()), 20)
        old = {name: set(i.node._connections) for name, i in impostors.items()}
        for impostor in impostors.values():  # new wires: a worker that re-asked would say so
            for conn in list(impostor.node._connections):
                conn.close()
        await until(lambda: all(i.node.connections() and not (set(i.node._connections) & old[name])
                                for name, i in impostors.items()), 20)
        await asyncio.sleep(1.5)
        for name, impostor in impostors.items():
            self.assertEqual(impostor.names(), ["isMaster", "requestExecAssets"], name)
            self.assertEqual(impostor.calls[1][1], {"currentHash": ""})
        self.assertEqual(worker.current_hash(), "")
        self.assertIsNone(worker.keeper.runner)

    async def hijack(self, caps):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        results_at = []
        cluster.master.on_results = lambda r: (cluster.results.append(r), results_at.append(time.monotonic()))
        cluster.push(3000, sleep=0.001)  # a run of a few seconds, which the rogue joins and leaves
        worker = await self.started(cluster.worker(get_batch=True, batch_size=10))
        await cluster.until_results(500, 60)
        rogue = await self.started(Impostor(cluster.token, asset_answer({"/task.py": b"x"}), caps),
                                   peers=["127.0.0.1:%d" % worker.node.port])
        await until(lambda: "isMaster" in rogue.names(), 10)
        await asyncio.sleep(2.0)
        await rogue.close()  # it leaves
        self.assertLess(len(cluster.results), 3000)  # it came and left during the run
        await cluster.until_results(3000, 60)
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), list(range(3000)))
        self.assertEqual(rogue.names(), ["isMaster"])  # a candidate: never asked more, never given results
        gaps = [b - a for a, b in itertools.pairwise(results_at)]
        self.assertLess(max(gaps), 1.0)
        self.assertEqual(worker.master, cluster.master.address)

    @time_limit(120)
    async def test_a_rogue_claiming_master_during_a_run_gets_nothing(self):
        await self.hijack({"resultAcks": True, "resultBatches": True, "keyProof": 1})

    @time_limit(120)
    async def test_a_js_style_rogue_claiming_master_during_a_run_gets_nothing(self):
        await self.hijack({})

    @time_limit(90)
    async def test_rogues_up_before_the_master_get_nothing_and_the_master_is_adopted(self):
        tmp = self.tmp()
        token = "early-%d" % random.randrange(1 << 30)
        rogues = [await self.started(Impostor(token, None)),  # never answers its proof
                  await self.started(Impostor(token, asset_answer({"/task.py": b"class Task: pass\n"},
                                                                  key="r" * 32))),
                  await self.started(Impostor(token, None, {"keyProof": 1, "resultAcks": True}))]
        worker = await self.started(loopback_worker(token, tmp / "w", get_batch=True, batch_size=5,
                                                    peers=["127.0.0.1:%d" % r.node.port for r in rogues]))
        await until(lambda: all(r.calls for r in rogues), 20)
        await asyncio.sleep(1.0)
        self.assertIsNone(worker.master)
        results = []
        master = loopback_master(token, tmp / "master", results.append,
                                 peers=["127.0.0.1:%d" % worker.node.port])
        for i in range(20):
            master.push_new_job({"id": i, "data": json.dumps({"x": i})})
        started = time.monotonic()
        await self.started(master)
        await until(lambda: worker.master == master.address, 10)
        adopted = time.monotonic() - started
        await until(lambda: len(results) >= 20, 30)
        self.assertLess(adopted, 5.0)
        for rogue in rogues:
            self.assertNotIn("requestWork", rogue.names())
            self.assertFalse({"shareResults", "shareResultsBatch"} & set(rogue.names()))
        self.assertEqual(rogues[1].names(), ["isMaster", "requestExecAssets"])

    async def test_when_the_master_leaves_a_candidate_takes_over_within_seconds(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        backup_results = []
        backup = loopback_master(cluster.token, tmp / "master", backup_results.append)
        cluster.push(10)
        worker = await self.started(cluster.worker())
        await cluster.until_results(10)
        await self.started(backup)
        worker.node.add_peer("127.0.0.1", backup.port)
        await until(lambda: backup.address in worker.trust.candidates, 10)  # said yes: a candidate
        self.assertEqual(worker.master, cluster.master.address)
        for i in range(10, 20):
            backup.push_new_job({"id": i, "data": json.dumps({"x": i})})
        await asyncio.sleep(0.5)
        self.assertEqual(backup_results, [])  # nothing from a candidate while the master serves
        left = time.monotonic()
        await cluster.master.close()
        await until(lambda: len(backup_results) >= 10, 10)
        self.assertLess(time.monotonic() - left, 5.0)
        self.assertEqual(worker.master, backup.address)

    async def test_a_proof_not_in_ascii_is_a_failed_proof_and_master_py_is_told_ours(self):
        tmp = self.tmp()
        token = "nonascii-%d" % random.randrange(1 << 30)
        rogue = await self.started(Impostor(token, None, {"keyProof": 1, "proof": "é" * 64,
                                                          "workerChallenge": "0" * 64}))
        worker = loopback_worker(token, tmp / "w", peers=["127.0.0.1:%d" % rogue.node.port])
        with self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            await until(lambda: any("holds a different transferEncryptToken" in line for line in logs.output), 10)
            await until(lambda: "proveKey" in rogue.names(), 10)  # ours, so that its user may know
        self.assertFalse([line for line in logs.output if "task failed" in line])
        self.assertFalse(worker.trust.may_ask(rogue.node.address, time.monotonic()))  # banned, as any failure
        proof = rogue.calls[rogue.names().index("proveKey")][1]["proof"]
        self.assertEqual(proof, w.worker_proof(w.Crypt(KEY).derive(w.WORKER_PROOF_LABEL), bytes(32),
                                               worker.address, rogue.node.address))

    async def test_a_worker_proves_the_key_again_to_master_py_started_again(self):
        tmp = self.tmp()
        token, port, seed = "again-%d" % random.randrange(1 << 30), free_port(), w.make_seed()
        first = await self.started(loopback_master(token, tmp / "m1", port=port, seed=seed))
        worker = await self.started(loopback_worker(token, tmp / "w", peers=["127.0.0.1:%d" % port]))
        await until(lambda: worker.master == first.address and worker.address in first.policy.proven, 10)
        await first.close()
        await until(lambda: worker.master is None, 10)
        second = await self.started(loopback_master(token, tmp / "m2", port=port, seed=seed))
        self.assertEqual(second.address, first.address)  # the master it proved before
        await until(lambda: worker.address in second.policy.proven, 15)  # a new process: proven anew
        self.assertEqual(worker.master, second.address)

    async def test_pinned_master_only(self):
        cluster = await self.started(Cluster(self.tmp()))
        cluster.push(10)
        rogue = await self.started(Impostor(cluster.token, asset_answer({"/task.py": b"x"}), {"keyProof": 1}))
        worker = await self.started(cluster.worker(master=cluster.master.address,
                                                   peers=["127.0.0.1:%d" % rogue.node.port,
                                                          "127.0.0.1:%d" % cluster.master.port]))
        await cluster.until_results(10)
        await until(lambda: worker.address in rogue.node.peers, 10)
        await asyncio.sleep(0.5)
        self.assertEqual(rogue.calls, [])  # never even asked
        with self.assertRaises(w.WorkerError):
            cluster.worker(master="not-an-address")

    @time_limit(90)
    async def test_a_replayed_js_answer_cannot_bring_dependencies_of_its_own(self):
        # The asset proof covers file contents, not the plain dependency list: a replayer of a
        # JS master's files may not add dependencies (pip would run its package's code).
        cluster = await self.started(Cluster(self.tmp()))
        cluster.push(10)
        worker = await self.started(cluster.worker())
        await cluster.until_results(10)
        before = worker.current_hash()
        replay = asset_answer({"/task.py": b"class Task:\n    def run(self, job):\n        return 1\n"},
                              deps=["cryptography>=1"])  # importable here: never a pip run
        replayer = await self.started(Impostor(cluster.token, replay, work={"id": 1, "data": "{}"}))
        worker.node.add_peer("127.0.0.1", replayer.node.port)
        await until(lambda: replayer.node.address in worker.trust.candidates, 10)
        with self.assertLogs("worker", "INFO") as logs:
            await cluster.master.close()  # the worker is masterless: the replayer proves by the files
            await until(lambda: worker.master == replayer.node.address, 10)
            await until(lambda: any("not installed before" in line for line in logs.output), 10)
            await worker.sync_assets()  # asked again: refused again, no second line
            await asyncio.sleep(0.5)
        self.assertEqual(sum("not installed before" in line for line in logs.output), 1)
        self.assertFalse(any("installing" in line or "assets changed" in line for line in logs.output))
        self.assertNotIn("requestWork", replayer.names())
        self.assertEqual(worker.current_hash(), before)  # nothing written
        await worker.stop()
        # pinned, the same master's list is trusted (and remembered for later masters)
        pinned = await self.started(cluster.worker(master=replayer.node.address,
                                                   peers=["127.0.0.1:%d" % replayer.node.port]))
        await until(lambda: "requestWork" in replayer.names(), 20)
        self.assertIn("cryptography>=1", pinned.keeper.accepted_deps)

    async def test_master_py_answers_results_that_do_not_decrypt_as_any_others(self):
        cluster = await self.started(Cluster(self.tmp()))
        thief = self.will_close(await thief_of(cluster))
        good, other = w.Crypt(KEY), w.Crypt("o" * 32)
        result = {"jobID": "x", "worker": {"id": thief.address, "name": "t"}, "data": 1}
        calls = [("shareResults", good.encrypt(json.dumps(result))),
                 ("shareResultsBatch", other.encrypt_json([result])),
                 ("shareResults", {"iv": "00" * 16, "encryptedData": os.urandom(32).hex()}),
                 ("requestWork", {"results": other.encrypt_json([result])})]
        with self.assertLogs("worker", "ERROR") as logs:
            answers = [await thief.rpc(cluster.master.address, name, args) for name, args in calls * 30]
        self.assertEqual({json.dumps(a) for a in answers[0::4] + answers[1::4] + answers[2::4]},
                         {'{"received": true}'})
        self.assertEqual(len(logs.output), 1)  # one line a minute, whatever comes
        self.assertEqual(cluster.results, [])  # it decrypts, but answers no job on lease to the thief
        self.assertEqual(cluster.master.stats["results refused"], 30)

    @staticmethod
    def master_py_address(folder):
        """The address in the ready line of ``python master.py`` started in ``folder``, then ended."""
        with subprocess.Popen([sys.executable, MASTER_PY, "--task", "task.py"], cwd=folder, env=clean_env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as proc:
            try:
                return json.loads(proc.stdout.readline())["address"]
            finally:
                proc.terminate()

    def test_master_py_keeps_its_address_across_restarts(self):
        with tempfile.TemporaryDirectory() as tmp:
            write_loopback_env(tmp, "stable-%d" % random.randrange(1 << 30))
            (Path(tmp) / "task.py").write_text(TASK_PY)
            addresses = [self.master_py_address(tmp) for _ in range(2)]
            self.assertEqual(addresses[0], addresses[1])
            values = w.read_env_file(Path(tmp) / ".env")
            self.assertEqual(w.Identity(values["masterSeed"]).address, addresses[0])
            # issue 25: it wrote seed=, which a worker reading the same .env took too: the two never met
            self.assertNotIn("seed", values)
            self.assertIsNone(w.Settings.load(values).seed)

    def test_the_seed_an_older_master_py_wrote_keeps_its_address_and_is_no_workers_any_more(self):
        # issue 25: users pin master.py's address (master=): an older master.py's .env keeps it
        with tempfile.TemporaryDirectory() as tmp:
            old = w.make_seed()
            write_loopback_env(tmp, "older-%d" % random.randrange(1 << 30), seed=old, name="kept")
            (Path(tmp) / "task.py").write_text(TASK_PY)
            before = (Path(tmp) / ".env").read_text()
            self.assertEqual(self.master_py_address(tmp), w.Identity(old).address)
            self.assertEqual((Path(tmp) / ".env").read_text(), before.replace("seed=", "masterSeed="))
            self.assertEqual(file_mode(Path(tmp) / ".env"), "0o600")
            self.assertEqual(self.master_py_address(tmp), w.Identity(old).address)
            self.assertIsNone(w.Settings.load(w.read_env_file(Path(tmp) / ".env")).seed)

    @time_limit(60)
    async def test_master_py_started_again_with_the_key_fixed_is_taken_back_within_seconds(self):
        # issue 25: the worker ignored it for an hour, and neither side said a word (0 results in 90 s)
        tmp = self.tmp()
        token, port, seed = "fixed-%d" % random.randrange(1 << 30), free_port(), w.make_seed()
        worker = loopback_worker(token, tmp / "w", peers=["127.0.0.1:%d" % port])
        with self.assertLogs("worker", "ERROR") as logs:
            wrong = await self.started(loopback_master(token, tmp / "m1", port=port, seed=seed, key="w" * 32))
            await self.started(worker)
            await until_logged(logs, "%s holds a different transferEncryptToken, or is no master" % wrong.address)
            await until_logged(logs, "%s holds a different transferEncryptToken:" % worker.address)  # master.py's
        self.assertIn("asked again when it comes back", "\n".join(logs.output))
        await wrong.close()
        results = []
        fixed = await self.started(loopback_master(token, tmp / "m2", results.append, port=port, seed=seed))
        self.assertEqual(fixed.address, wrong.address)  # the same address: it kept its seed
        fixed.push_new_job({"id": 1, "data": json.dumps({"x": 1})})
        started = time.monotonic()
        with self.assertLogs("worker", "INFO") as logs:
            await until(lambda: results, 20)
        took = time.monotonic() - started
        self.assertLess(took, 10.0)  # seconds, not the hour of a padding oracle
        print("\n  master.py started again with the key fixed: first result after %.2f s" % took, file=sys.stderr)
        self.assertEqual(worker.master, fixed.address)
        self.assertTrue(any("master found: %s" % fixed.address in line for line in logs.output), logs.output)
        self.assertEqual(len(worker.trust.failures), 0)  # no budget spent: other masters may still prove


class TestMasterTrustJs(AsyncTest):
    """The same attacks with the unchanged JS master (harness on npm bugout) as the real master."""

    def setUp(self):
        js_ready()

    @time_limit(180)
    async def test_rogue_during_a_js_master_run_and_rogue_first(self):
        tmp = self.tmp()
        token = "jsrogue-%d" % random.randrange(1 << 30)
        early = await self.started(Impostor(token, None))
        worker = await self.started(loopback_worker(token, tmp / "w", "py", get_batch=True, batch_size=10,
                                                    peers=["127.0.0.1:%d" % early.node.port]))
        await until(lambda: "requestExecAssets" in early.names(), 20)
        master = await self.started(JsProcess("master.js", {
            "QX_TOKEN": token, "QX_KEY": KEY, "QX_JOBS": "300", "QX_ASSETS": str(js_master_assets(tmp))}))
        master.send(cmd="addPeer", addr="127.0.0.1:%d" % worker.node.port)
        await until(lambda: worker.master == master.ready["address"], 20)
        rogue = await self.started(Impostor(token, asset_answer({"/task.py": b"x"})),
                                   peers=["127.0.0.1:%d" % worker.node.port])
        await until(lambda: sum(e["event"] == "result" for e in master.events) >= 300, 120)
        for impostor in (early, rogue):
            self.assertFalse({"requestWork", "shareResults", "shareResultsBatch"} & set(impostor.names()))
        self.assertEqual(rogue.names(), ["isMaster"])
        self.assertEqual(worker.master, master.ready["address"])


# Worker: the journal and outbox (issue 13) ##################################

class TestOutbox(AsyncTest):
    """The delivery rules, in memory: no socket, a journal in a temporary folder."""

    async def test_rules(self):
        tmp = self.tmp()
        journal = self.will_close(open_journal(tmp))
        outbox = w.Outbox(journal, lambda address: address == "master")
        for i in range(3):
            add_owned(outbox, i)
        self.assertEqual(await outbox.take("master", 10), [])  # 1: not committed yet
        await outbox.flush()
        self.assertEqual(await outbox.take("rogue", 10), [])  # 2: only the proven master
        first = await outbox.take("master", 2)
        self.assertEqual([json.loads(t)["jobID"] for _, t in first], [0, 1])  # oldest first
        self.assertEqual(await outbox.take("master", 10), [])  # one delivery at a time
        outbox.settle(first, False)  # 4: a failed delivery keeps them, in order
        again = await outbox.take("master", 10)
        self.assertEqual([json.loads(t)["jobID"] for _, t in again], [0, 1, 2])
        outbox.settle(again[:2], True)  # 3: delivered, forgotten
        outbox.settle(again[2:], False)
        self.assertEqual(len(outbox), 1)
        await asyncio.to_thread(journal.close)
        reopened = w.Outbox(self.will_close(open_journal(tmp)), lambda address: True)
        self.assertEqual(await reopened.load(), 1)
        self.assertEqual(await reopened.take("m", 10), [])  # 2: only the master that gave its job
        self.assertEqual([json.loads(t)["jobID"] for _, t in await reopened.take("master", 10)], [2])

    async def test_a_held_result_goes_only_to_the_master_and_run_that_gave_its_job(self):
        # issue 25: a result held from a killed master.py (job 398) was taken by a JS master as its own
        tmp = self.tmp()
        outbox = w.Outbox(self.will_close(open_journal(tmp)), lambda address: True)
        add_owned(outbox, 1, "A")
        add_owned(outbox, 2, "B")
        add_owned(outbox, 3, "A", run="r1")
        add_owned(outbox, 4, "A")
        await outbox.flush()
        ids = lambda batch: [json.loads(t)["jobID"] for _, t in batch]
        self.assertEqual((outbox.owes("A"), outbox.owes("B"), outbox.owes("A", "r1"), outbox.owes("C")), (2, 1, 1, 0))
        self.assertEqual(await outbox.take("C", 10), [])
        self.assertEqual(await outbox.take("A", 10, run="r2"), [])  # the same address in another run
        batch = await outbox.take("B", 10)
        self.assertEqual(ids(batch), [2])
        outbox.settle(batch, True)
        batch = await outbox.take("A", 10)
        self.assertEqual(ids(batch), [1, 4])
        outbox.settle(batch, True)
        self.assertEqual(ids(await outbox.take("A", 10, run="r1")), [3])
        self.assertEqual(len(outbox), 1)

    async def test_who_gave_a_job_survives_a_restart_with_the_job(self):
        tmp = self.tmp()
        journal = self.will_close(open_journal(tmp))
        outbox = w.Outbox(journal, lambda address: True)
        outbox.given([(7, '{"id": 7}')], ("A", "r1"))
        await journal.call(lambda: None)  # the background write is done
        await asyncio.to_thread(journal.close)  # as a kill: the job held, not yet run
        reopened = w.Outbox(self.will_close(open_journal(tmp)), lambda address: True)
        await reopened.load()
        reopened.add(7, result_text(7))  # run after the restart
        await reopened.flush()
        self.assertEqual(await reopened.take("A", 10), [])
        self.assertEqual([json.loads(t)["jobID"] for _, t in await reopened.take("A", 10, "r1")], [7])

    async def test_results_no_master_took_in_time_are_written_out_once_with_one_line(self):
        tmp = self.tmp()
        clock = [1_000_000.0]
        outbox = w.Outbox(self.will_close(open_journal(tmp)), lambda address: True, clock=lambda: clock[0])
        add_owned(outbox, 1, "A")
        await outbox.flush()
        clock[0] += 3600
        add_owned(outbox, 2, "A")
        await outbox.flush()
        self.assertEqual(await outbox.write_out(tmp, clock[0] + 10), 0)  # within the hold: kept
        self.assertFalse((tmp / w.UNRETURNED_NAME).exists())
        with self.assertLogs("worker", "WARNING") as logs:
            self.assertEqual(await outbox.write_out(tmp, 1_000_000.0 + w.HOLD_SECONDS + 1), 1)
        self.assertEqual(len(logs.output), 1)
        self.assertIn(str(tmp / w.UNRETURNED_NAME), logs.output[0])
        self.assertEqual(file_mode(tmp / w.UNRETURNED_NAME), "0o600")
        [line] = [json.loads(line) for line in (tmp / w.UNRETURNED_NAME).read_text().splitlines()]
        self.assertEqual(line, {"master": "A", "run": None, "made": "1970-01-12T13:46:40Z",
                                "result": json.loads(result_text(1))})
        self.assertEqual((len(outbox), outbox.owes("A")), (1, 1))
        self.assertEqual([json.loads(t)["jobID"] for _, t in await outbox.take("A", 10)], [2])  # not 1
        with self.assertNoLogs("worker", "WARNING"):
            self.assertEqual(await outbox.write_out(tmp, clock[0] + 10), 0)  # a delivery under way
        self.assertEqual(len((tmp / w.UNRETURNED_NAME).read_text().splitlines()), 1)

    async def test_a_write_out_cut_short_at_any_point_writes_each_result_once(self):
        class Killed(BaseException):
            pass

        real_pwrite = os.pwrite

        def half_written(fd, data, offset):
            real_pwrite(fd, data[:len(data) // 2], offset)
            raise Killed

        def killed_before_the_rows_go():
            raise Killed
        for point in ("intent", "half the file", "the file, not the rows"):
            with tempfile.TemporaryDirectory() as tmp, self.subTest(point):
                tmp = Path(tmp)
                (tmp / w.UNRETURNED_NAME).write_text('{"earlier": 1}\n')
                journal = open_journal(tmp)
                outbox = w.Outbox(journal, lambda address: True)
                for i in range(5):
                    add_owned(outbox, i, "A")
                await outbox.flush()
                rows = journal.submit(journal.expired, 1e12, 100).result()
                if point == "intent":
                    journal.submit(journal.set_meta, "unreturned", json.dumps(
                        {"offset": 15, "seqs": [r[0] for r in rows]})).result()
                else:
                    patch = (mock.patch.object(w.os, "pwrite", lambda *a: half_written(*a) if a[0] > 2 else
                                               real_pwrite(*a)) if point == "half the file" else
                             mock.patch.object(journal, "_transaction", killed_before_the_rows_go))
                    with patch, self.assertRaises(Killed), self.assertLogs("worker", "ERROR"):
                        journal.submit(journal.write_out, tmp / w.UNRETURNED_NAME, rows).result()
                journal.close()
                again = w.Outbox(open_journal(tmp), lambda address: True)
                self.assertEqual(await again.load(), 5)
                with self.assertLogs("worker", "WARNING"):
                    self.assertEqual(await again.write_out(tmp, 0.0), 5)  # the cut one, finished
                lines = (tmp / w.UNRETURNED_NAME).read_text().splitlines()
                self.assertEqual([json.loads(line).get("result", {}).get("jobID") for line in lines],
                                 [None, 0, 1, 2, 3, 4])
                self.assertEqual(len(again), 0)
                again.journal.close()

    async def test_results_of_an_older_journal_have_no_known_master_and_are_written_out(self):
        tmp = self.tmp()
        journal = w.Journal.of(tmp, "journal-swarm", w.Crypt(KEY))
        with contextlib.closing(sqlite3.connect(journal.path)) as db:  # as version 1 made it
            db.executescript("""
                CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE results (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, mac TEXT NOT NULL);
                CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, mac TEXT NOT NULL);
                PRAGMA application_id=%d; PRAGMA user_version=1;""" % w.JOURNAL_APPLICATION_ID)
            db.execute("INSERT INTO meta VALUES ('fingerprint', ?)", (journal.fingerprint,))
            db.execute("INSERT INTO results (body, mac) VALUES (?, ?)", (result_text(398), journal.mac(result_text(398))))
            db.execute("INSERT INTO jobs (body, mac) VALUES (?, ?)", ('{"id": 9}', journal.mac('{"id": 9}')))
            db.commit()
        journal.submit(journal.open).result()
        self.will_close(journal)
        outbox = w.Outbox(journal, lambda address: True)
        self.assertEqual(await outbox.load(), 1)
        self.assertEqual(journal.submit(journal.read, "jobs", 0, 10).result(), [(1, '{"id": 9}')])  # kept
        self.assertEqual(await outbox.take("A", 10), [])  # given to no master
        outbox.add(1, result_text(9))  # the old job's result: its master is not known either
        await outbox.flush()
        with self.assertLogs("worker", "WARNING") as logs:
            self.assertEqual(await outbox.write_out(tmp, 0.0), 2)  # at once, whatever the time
        self.assertEqual(len(logs.output), 1)
        lines = [json.loads(line) for line in (tmp / w.UNRETURNED_NAME).read_text().splitlines()]
        self.assertEqual([(x["master"], x["result"]["jobID"]) for x in lines], [(None, 398), (None, 9)])

    async def test_the_journal_and_its_logs_are_0600_whatever_the_umask(self):
        # issue 23: with umask 022 the -wal and -shm files were 0644, the WAL holding jobs in clear
        self.addCleanup(os.umask, os.umask(0o022))
        tmp = self.tmp()
        journal = self.will_close(open_journal(tmp))
        outbox = w.Outbox(journal, lambda address: True)
        outbox.add(None, result_text(1))
        await outbox.flush()
        names = [w.JOURNAL_NAME + suffix for suffix in ("", "-wal", "-shm")]
        self.assertEqual({name: file_mode(tmp / name) for name in names}, dict.fromkeys(names, "0o600"))
        await asyncio.to_thread(journal.close)
        os.chmod(tmp / w.JOURNAL_NAME, 0o644)  # as an older worker left it
        self.will_close(open_journal(tmp))
        self.assertEqual(file_mode(tmp / w.JOURNAL_NAME), "0o600")

    async def test_more_results_than_memory_keep_their_order(self):
        outbox = w.Outbox(self.will_close(open_journal(self.tmp())), lambda address: True)
        with mock.patch.object(w, "OUTBOX_MEMORY", 5):
            for i in range(23):
                add_owned(outbox, i, "m")
                if i % 7 == 6:
                    await outbox.flush()
            await outbox.flush()
            delivered = []
            while batch := await outbox.take("m", 4):
                delivered += [json.loads(t)["jobID"] for _, t in batch]
                outbox.settle(batch, True)
        self.assertEqual(delivered, list(range(23)))
        self.assertEqual(len(outbox), 0)

    async def test_a_row_this_worker_did_not_write_is_never_delivered(self):
        tmp = self.tmp()
        outbox = w.Outbox(self.will_close(open_journal(tmp)), lambda address: True)
        add_owned(outbox, 1, "m")
        await outbox.flush()
        await asyncio.to_thread(outbox.journal.close)
        with contextlib.closing(sqlite3.connect(tmp / w.JOURNAL_NAME)) as db:
            db.execute("INSERT INTO results (body, mac, master) VALUES (?, ?, 'm')", (result_text(666), "0" * 64))
            body, mac = db.execute("SELECT body, mac FROM results").fetchone()
            db.execute("INSERT INTO results (body, mac, master) VALUES (?, ?, 'rogue')", (body, mac))  # re-pointed
            db.commit()
        reopened = w.Outbox(self.will_close(open_journal(tmp)), lambda address: True)
        with self.assertLogs("worker", "ERROR") as logs:
            self.assertEqual(await reopened.load(), 1)
        self.assertEqual(len(logs.output), 1)
        self.assertEqual([json.loads(t)["jobID"] for _, t in await reopened.take("m", 10)], [1])

    def test_a_second_worker_in_the_folder_is_refused_and_the_journal_left_alone(self):
        tmp = self.tmp()
        first = open_journal(tmp)
        self.addCleanup(first.close)
        first.submit(first.set_meta, "proven", "[]").result()
        with self.assertRaisesRegex(w.JournalError, "in use by another worker"):
            open_journal(tmp)
        self.assertEqual(list(tmp.glob(w.JOURNAL_NAME + ".bad-*")), [])
        self.assertEqual(first.submit(first.get_meta, "proven").result(), "[]")
        first.close()
        open_journal(tmp).close()  # free again once the first has closed

    def test_a_write_that_fails_is_logged_once_a_minute(self):
        journal = open_journal(self.tmp())
        self.addCleanup(journal.close)

        def full_disk():
            raise OSError(28, "No space left on device")
        with self.assertLogs("worker", "ERROR") as logs:
            for _ in range(5):
                with self.assertRaises(OSError):
                    journal.submit(full_disk).result()
            journal.submit(lambda: None).result()  # the callbacks before it have run
        self.assertEqual(len(logs.output), 1)
        self.assertIn("No space left on device", logs.output[0])

    def test_foreign_or_damaged_journals_are_moved_aside(self):
        def other_swarm(path):
            open_journal(path.parent, token="another-swarm").close()

        def garbage(path):
            path.write_bytes(os.urandom(5000))

        def other_program(path):
            with contextlib.closing(sqlite3.connect(path)) as db:
                db.execute("CREATE TABLE notes (x)")
                db.commit()

        def damaged(path):
            open_journal(path.parent).close()
            data = bytearray(path.read_bytes())
            data[4096:8192] = os.urandom(4096)  # a page of the tables
            path.write_bytes(bytes(data))
        for make in (other_swarm, garbage, other_program, damaged):
            with tempfile.TemporaryDirectory() as tmp, self.subTest(make.__name__):
                path = Path(tmp) / w.JOURNAL_NAME
                make(path)
                with self.assertLogs("worker", "ERROR") as logs:
                    journal = open_journal(tmp)
                self.assertEqual(len(logs.output), 1)
                self.assertIn(str(path), logs.output[0])
                self.assertEqual(len(list(Path(tmp).glob(w.JOURNAL_NAME + ".bad-*"))), 1)
                self.assertEqual(journal.submit(journal.verify, "results").result(), 0)  # clean, usable
                journal.close()

    def test_git_ignores_the_journal(self):
        # issue 25: a worker run in the clone left its journal for git status to show
        patterns = [line for line in (HERE / ".gitignore").read_text().splitlines() if line and line[0] != "#"]
        for name in ("", "-wal", "-shm", ".lock", ".bad-20260101-000000-42", ".bad-20260101-000000-42-wal"):
            self.assertTrue(any(fnmatch.fnmatch(w.JOURNAL_NAME + name, p) for p in patterns), name)

    def test_a_directory_where_the_journal_or_its_lock_belongs_is_moved_aside(self):
        # issue 25: each ended the start (exit 2), at every start: a restart loop under systemd
        for name in (w.JOURNAL_NAME, w.JOURNAL_NAME + "-wal", w.JOURNAL_NAME + ".lock"):
            with tempfile.TemporaryDirectory() as tmp, self.subTest(name):
                (Path(tmp) / name).mkdir()
                (Path(tmp) / name / "kept").write_text("what was in it")
                with self.assertLogs("worker", "ERROR") as logs:
                    journal = open_journal(tmp)
                self.assertEqual(len(logs.output), 1)
                self.assertIn(name, logs.output[0])
                aside = [p for p in Path(tmp).glob(w.JOURNAL_NAME + "*.bad-*") if p.is_dir()]
                self.assertEqual(len(aside), 1)
                self.assertEqual((aside[0] / "kept").read_text(), "what was in it")
                self.assertEqual(journal.submit(journal.verify, "results").result(), 0)  # clean, usable
                journal.close()

    async def test_odd_values_in_the_journals_meta_are_not_trusted_and_crash_nothing(self):
        for value in ("5", '"abc"', '{"x": 1}', "[5, null]", "not json"):
            with tempfile.TemporaryDirectory() as tmp, self.subTest(value):
                journal = open_journal(tmp, token="t")
                for key in ("proven", "manifest"):
                    journal.submit(journal.set_meta, key, value).result()
                journal.close()
                worker = w.Worker("t", "w", "warn", KEY, env={}, folder=tmp, lsd=False, dht=False, trackers=[])
                self.addCleanup(worker.journal.close)
                with self.assertLogs("worker", "ERROR"):
                    await worker._load_state()
                self.assertEqual(list(worker.trust.proven), [])
                self.assertEqual(worker.keeper.manifest, [])
                worker.journal.close()

    async def test_old_json_files_are_taken_over_once_or_moved_aside(self):
        good = [{"jobID": 7, "worker": {"id": "bOld", "name": "w"}, "data": 1}]
        deep = "[" * 100_000 + "]" * 100_000  # issue 25: a RecursionError at every start
        for text in ("5", "null", '"abc"', '{"jobID": 1}', "[1,2,3]", '[{"jobID": 1}]', "{not json", deep):
            with tempfile.TemporaryDirectory() as tmp, self.subTest(text[:20]):
                (Path(tmp) / ".results.json").write_text(text)
                (Path(tmp) / ".assets.json").write_text(text)
                worker = w.Worker("t", "w", "warn", KEY, env={}, folder=tmp, lsd=False, dht=False, trackers=[])
                self.addCleanup(worker.journal.close)
                with self.assertLogs("worker", "ERROR") as logs:
                    await worker._load_state()
                self.assertEqual(len(logs.output), 2, logs.output)  # one line for each file, naming it
                self.assertIn(".results.json", logs.output[0])
                self.assertIn(".assets.json", logs.output[1])
                self.assertEqual(len(worker.outbox), 0)
                self.assertEqual(worker.keeper.manifest, [])
                worker.journal.close()
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / ".results.json").write_text(json.dumps(good))
            (Path(tmp) / ".assets.json").write_text('[{"name": "task.py", "workerPath": "/task.py"}]')
            worker = w.Worker("t", "w", "warn", KEY, env={}, folder=tmp, lsd=False, dht=False, trackers=[])
            self.addCleanup(worker.journal.close)
            await worker._load_state()
            self.assertEqual(len(worker.outbox), 1)
            self.assertEqual(worker.keeper.manifest, [{"name": "task.py", "workerPath": "/task.py"}])
            self.assertFalse((Path(tmp) / ".results.json").exists())
            worker.journal.close()


class TestCrashSafety(AsyncTest):
    """kill -9 of real ``python worker.py`` processes."""

    async def worker_process(self, folder, port, **keys):
        write_loopback_env(folder, self.token, peers="127.0.0.1:%d" % port, LOG_LEVEL="info", **keys)
        return self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, WORKER_PY, cwd=folder, env=clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT))

    @time_limit(120)
    async def test_held_results_and_jobs_survive_kill_9(self):
        tmp = self.tmp()
        self.token, port, seed = "held-%d" % random.randrange(1 << 30), free_port(), w.make_seed()
        folder = tmp / "wp"
        folder.mkdir()
        db = tmp / "master.db"  # the second master continues the first's run: its results are for it
        first = await self.started(QuietMaster(tmp, self.token, port, seed, "m1", db=db))
        first.push(range(301), sleep=0.005)  # JS rule: a batch while more than its size wait
        proc = await self.worker_process(folder, port, getBatch="true", batchSize=300)
        await until(lambda: first.handed and first.handed[-1][1], 30)
        await first.master.close()  # away while the worker runs the batch: nobody takes the results
        # the worker holds the results the first master could not take before it went
        await until(lambda: journal_count(folder) + len(first.results) == 300, 30)
        self.assertGreater(journal_count(folder), 200)
        proc.kill()  # kill -9 while it holds them
        await proc.wait()
        proc = await self.worker_process(folder, port, getBatch="true", batchSize=20)
        second = await self.started(QuietMaster(tmp, self.token, port, seed, "m2", db=db))
        # the run's results, as its database keeps them (a result the first master committed as it
        # closed reaches no on_results, but is in the run: the worker's repeat is a duplicate)
        recorded = lambda: sorted(int(key) for (key,) in second.master.store.db.execute("SELECT job_key FROM results"))
        await until(lambda: len(recorded()) >= 300, 30)
        self.assertEqual(recorded(), list(range(300)))
        second.push(range(301, 322), sleep=0.2)  # job 300 (sleep 0.005) waits in the run already
        await until(lambda: second.handed and len(second.handed[-1][1]) >= 2, 30)  # takes the next batch
        await until(lambda: journal_count(folder, "jobs") >= 18, 30)
        proc.kill()  # kill -9 while it holds 20 jobs, not yet run
        await proc.wait()
        proc = await self.worker_process(folder, port)
        await until(lambda: len(recorded()) >= 322, 30)  # run after the restart
        self.assertEqual(recorded(), list(range(322)))
        self.assertEqual([r for r in second.results if r.get("error")], [])
        proc.terminate()
        output, _ = await proc.communicate()
        self.assertIn(b"received before the last stop will run first", output)

    @time_limit(300)
    async def test_kill_9_at_random_moments_of_a_10000_job_run(self):
        tmp = self.tmp()
        self.token, port, seed = "random-kill-%d" % random.randrange(1 << 30), free_port(), w.make_seed()
        folder = tmp / "wp"
        folder.mkdir()
        master = await self.started(QuietMaster(tmp, self.token, port, seed, "m"))
        master.push(range(10_000), sleep=0.0003)  # a run of some seconds, to kill at any point of it
        rng, kills = random.Random(), []
        keys = {"getBatch": "true", "batchSize": 100, "seed": w.make_seed()}  # the same worker each time
        for _ in range(8):
            proc = await self.worker_process(folder, port, **keys)
            await until(lambda: master.handed, 30)
            await asyncio.sleep(rng.uniform(0.1, 0.8))
            kills.append(time.monotonic())
            proc.kill()
            await proc.wait()
        proc = await self.worker_process(folder, port, **keys)
        answered = lambda: {r["jobID"] for r in master.results}
        deadline = time.monotonic() + 120
        count, progress = len(master.results), time.monotonic()
        while master.master.waiting or master.master.leases.keys() - answered():
            await asyncio.sleep(0.1)  # looked at often: the run is over as soon as all are answered
            if len(master.results) != count:
                count, progress = len(master.results), time.monotonic()
            elif not master.master.waiting and time.monotonic() - progress >= 3.0 or time.monotonic() > deadline:
                break  # all done that can be: what is left was lost on its way in
        # A job can only be lost on its way in: sent by the master, not yet in the journal at the kill.
        missing = master.master.leases.keys() - answered()
        in_flight = {i for t, ids in master.handed for k in kills if k - 0.1 <= t <= k for i in ids}
        self.assertLessEqual(missing, in_flight)
        self.assertEqual(len(answered()) + len(missing), 10_000)
        self.assertEqual([r for r in master.results if r.get("error")], [])
        print("\n  10,000 jobs, 8 kill -9: %d results, %d duplicates, %d jobs lost on their way in"
              % (len(answered()), master.master.stats["duplicate results"], len(missing)), file=sys.stderr)
        proc.terminate()
        await proc.wait()


# Worker: tasks in child processes (issue 12) ################################

class TestTaskProcesses(AsyncTest):
    """Issue 12: task.py and task.js in child processes, through real ``python worker.py``."""

    TIME_LIMIT = 120.0

    async def cluster(self, files=None):
        """A temporary folder, and a Cluster in it serving TRICKY_TASK_PY (or ``files``)."""
        tmp = self.tmp()
        return tmp, await self.started(Cluster(tmp, files=files or {"/workplace/task.py": TRICKY_TASK_PY}))

    def by_id(self, cluster):
        results = {r["jobID"]: r for r in cluster.results}
        self.assertEqual(len(results), len(cluster.results), "a job was answered twice")
        return results

    async def test_deaths_mid_batch_fail_only_their_job_and_a_new_child_takes_the_next(self):
        tmp, cluster = await self.cluster()
        ids = push_jobs(cluster, [{"x": 0}, {"do": "exit"}, {"x": 2}, {"do": "segfault"}, {"x": 4},
                                  {"do": "oom-kill"}, {"x": 6}, {"do": "thread"}, {"x": 8}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=len(ids) - 1))
        await cluster.until_results(len(ids), 60)
        by_id = self.by_id(cluster)
        for i, death in ((1, "exited (code 3)"), (3, "was killed by SIGSEGV"), (5, "was killed by SIGKILL")):
            self.assertIsNone(by_id[i]["data"])
            self.assertEqual(by_id[i]["error"]["type"], "TaskProcessError")
            self.assertIn("the task.py process %s" % death, by_id[i]["error"]["message"])
        self.assertIn("Fatal Python error: Segmentation fault", by_id[3]["error"]["traceback"])
        self.assertIn("task.py\", line", by_id[3]["error"]["traceback"])  # the task's own stack
        pids = [by_id[i]["data"]["pid"] for i in (0, 2, 4, 6)]
        self.assertEqual(len(set(pids)), 4, "each death, a new child")
        self.assertEqual(by_id[7]["data"], "thread started")
        self.assertEqual(by_id[8]["data"]["pid"], pids[-1])  # a live child serves job after job
        self.assertIsNone(worker.proc.returncode)
        started = time.monotonic()
        self.assertEqual(await worker.sigterm(20), 0, worker.output())  # a non-daemon thread holds nothing
        self.assertLess(time.monotonic() - started, 10)
        self.assertFalse([pid for pid in pids if alive(pid)])

    async def test_what_a_child_leaves_running_ends_with_it(self):
        tmp, cluster = await self.cluster()
        dying, living = tmp / "dying.pids", tmp / "living.pids"
        push_jobs(cluster, [{"do": "orphans", "pidfile": str(dying), "exit": True}, {"x": 1},
                            {"do": "orphans", "pidfile": str(living)}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=3))
        await cluster.until_results(3, 60)  # the forked orphan holds the channel: no answer, no EOF
        by_id = self.by_id(cluster)
        self.assertIn("the task.py process exited (code 3)", by_id[0]["error"]["message"])
        self.assertEqual(by_id[1]["data"]["x"], 1)
        orphans = [int(pid) for pid in dying.read_text().split()]
        await until(lambda: not [pid for pid in orphans if alive(pid)], 10)
        left = by_id[2]["data"]["orphans"]
        self.assertTrue(all(alive(pid) for pid in left))  # its child runs on, so do they
        self.assertEqual(await worker.sigterm(20), 0)
        await until(lambda: not [pid for pid in left if alive(pid)], 10)

    async def test_a_huge_error_message_is_whole_in_the_result_and_short_in_the_log(self):
        tmp, cluster = await self.cluster()
        push_jobs(cluster, [{"do": "raise", "size": 5_000_000}, {"x": 1}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=1))
        await cluster.until_results(2, 60)
        by_id = self.by_id(cluster)
        self.assertTrue(by_id[0]["error"]["message"] == "z" * 5_000_000, "the result holds it whole")
        self.assertEqual(await worker.sigterm(20), 0)
        output = worker.output()
        self.assertTrue("(5000000 characters)" in output, "the log line says how long it was")
        self.assertLess(max(map(len, output.splitlines())), 2000)

    async def test_a_task_that_prints_without_end_costs_a_bounded_log(self):
        tmp, cluster = await self.cluster()
        push_jobs(cluster, [{"do": "print", "lines": 100_000}, {"x": 1}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=2))
        started = time.monotonic()
        await cluster.until_results(2, 60)
        took = time.monotonic() - started
        self.assertEqual(self.by_id(cluster)[0]["data"], 100_000)
        self.assertEqual(await worker.sigterm(20), 0)
        lines = worker.output().splitlines()
        printed = sum("line " in line for line in lines)
        self.assertLessEqual(printed, w.TASK_LINES_BURST + w.TASK_LINES_PER_SECOND * (took + 5))
        self.assertEqual(sum("lines left out of the log" in line for line in lines), 1)

    async def test_lone_surrogates_reach_the_master_as_json_has_them(self):
        """A string JSON holds and UTF-8 does not, from task.py and from task.js."""
        for name, source, text in (("task.py", TRICKY_TASK_PY, b"caf\xe9".decode(errors="surrogateescape")),
                                   ("task.js", TRICKY_TASK_JS, "\ud83d")):
            with self.subTest(name):
                need(name == "task.py" or NODE, "node is not installed")
                tmp, cluster = await self.cluster(files={"/workplace/" + name: source})
                push_jobs(cluster, [{"do": "surrogate"}, {"do": "surrogate", "raise": True}, {"x": 2}])
                worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=3))
                await cluster.until_results(3, 60)
                by_id = self.by_id(cluster)
                self.assertEqual(by_id[0]["data"], text)
                self.assertEqual(by_id[1]["error"]["message"], text)
                self.assertEqual(by_id[2]["data"]["x"], 2)
                self.assertEqual(await worker.sigterm(20), 0)

    async def test_jobs_with_a_lone_surrogate_are_journaled_and_run(self):
        tmp, cluster = await self.cluster()
        pidfile = tmp / "spinner.pid"
        push_jobs(cluster, [{"do": "spin", "pidfile": str(pidfile)}])
        cluster.master.push_new_job({"id": 1, "data": json.dumps({"x": "\ud83d"}, ensure_ascii=False)})
        push_jobs(cluster, [{"x": 2}], start=2)
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=2, jobTimeout=3))
        await until(lambda: pidfile.exists() and pidfile.read_text(), 60)
        await until(lambda: journal_count(worker.folder, "jobs") == 2, 10)  # a kill -9 now loses neither
        await cluster.until_results(3, 60)
        by_id = self.by_id(cluster)
        self.assertEqual(by_id[1]["data"]["x"], "\ud83d")
        self.assertEqual(by_id[2]["data"]["x"], 2)
        self.assertEqual(await worker.sigterm(20), 0)

    async def test_results_are_standard_json_or_an_error_saying_why(self):
        tmp, cluster = await self.cluster()
        ids = push_jobs(cluster, [{"do": "nan"}, {"do": "infinity"}, {"do": "set"}, {"do": "patch-json"},
                                  {"x": 4}, {"x": 5}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=len(ids) - 1))
        await cluster.until_results(len(ids), 60)
        by_id = self.by_id(cluster)
        for i in (0, 1):
            self.assertIsNone(by_id[i]["data"])
            self.assertEqual(by_id[i]["error"]["type"], "ValueError")
            self.assertIn("NaN, Infinity and -Infinity have no JSON form", by_id[i]["error"]["message"])
        self.assertIn("Object of type set is not JSON serializable", by_id[2]["error"]["message"])
        # json patched inside the child: the worker and the child's answers do not care
        self.assertEqual(by_id[3]["data"], "patched")
        self.assertEqual([by_id[i]["data"]["x"] for i in (4, 5)], [4, 5])
        for result in cluster.results:  # what a JS master's JSON.parse reads
            json.dumps(result, allow_nan=False)
        self.assertEqual(await worker.sigterm(20), 0)

    async def test_thread_mode_is_a_choice_and_checks_json_too(self):
        _, cluster = await self.cluster()
        push_jobs(cluster, [{"do": "nan"}, {"x": 1}])
        worker = await self.started(cluster.worker(get_batch=True, batch_size=2, task_runner="thread"))
        await cluster.until_results(2)
        by_id = self.by_id(cluster)
        self.assertIn("no JSON form", by_id[0]["error"]["message"])
        self.assertEqual(by_id[1]["data"], {"pid": os.getpid(), "x": 1})  # in the worker's own process
        self.assertIsInstance(worker.keeper.runner, w.ThreadRunner)
        await worker.stop()
        with self.assertRaises(w.WorkerError):
            cluster.worker(task_runner="fork")

    async def test_timeout_ends_the_child_and_its_cpu(self):
        tmp, cluster = await self.cluster()
        pidfile = tmp / "spinner.pid"
        push_jobs(cluster, [{"x": 0}, {"do": "spin", "pidfile": str(pidfile)}, {"x": 2}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=2, jobTimeout=1))
        await cluster.until_results(3, 60)
        by_id = self.by_id(cluster)
        self.assertEqual(by_id[1]["error"]["type"], "TimeoutError")
        self.assertIn("longer than 1s", by_id[1]["error"]["message"])
        spinner = int(pidfile.read_text())
        self.assertEqual(by_id[0]["data"]["pid"], spinner)
        self.assertNotEqual(by_id[2]["data"]["pid"], spinner)  # a new child took the next job
        await until(lambda: not alive(spinner), 10)  # SIGTERM, SIGKILL after 2 s: no CPU left spinning
        self.assertEqual(await worker.sigterm(20), 0)

    async def test_sigterm_without_job_timeout_exits_in_time_and_reports_held_jobs(self):
        tmp, cluster = await self.cluster()
        pidfile = tmp / "spinner.pid"
        push_jobs(cluster, [{"do": "thread"}, {"do": "spin", "pidfile": str(pidfile)}, {"x": 2}, {"x": 3},
                            {"x": 4}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=4, stopTimeout=4))
        await until(lambda: pidfile.exists() and pidfile.read_text(), 60)
        started = time.monotonic()
        self.assertEqual(await worker.sigterm(15), 0, worker.output())
        self.assertLess(time.monotonic() - started, 8)  # stopTimeout=4, plus the child's end
        await cluster.until_results(4)
        by_id = self.by_id(cluster)
        self.assertEqual(by_id[0]["data"], "thread started")
        self.assertEqual(by_id[1]["error"]["type"], "TaskProcessError")
        self.assertIn("stopped before this job finished", by_id[1]["error"]["message"])
        for i in (2, 3):
            self.assertIn("stopped before this job started", by_id[i]["error"]["message"])
        self.assertNotIn(4, by_id)  # not handed out
        self.assertFalse(alive(int(pidfile.read_text())))
        self.assertFalse((worker.folder / ".results.json").exists())  # all delivered

    async def test_kill_9_of_the_worker_ends_its_children(self):
        tmp, cluster = await self.cluster()
        pidfile = tmp / "spinner.pid"
        push_jobs(cluster, [{"do": "spin", "pidfile": str(pidfile)}])
        worker = await self.started(WorkerPy(tmp, cluster))
        await until(lambda: pidfile.exists() and pidfile.read_text(), 60)
        spinner = int(pidfile.read_text())
        self.assertTrue(alive(spinner))
        worker.proc.kill()
        await worker.proc.wait()
        await until(lambda: not alive(spinner), 10)  # PR_SET_PDEATHSIG: no orphan spinning on

    async def test_job_memory_cap_is_an_error_result_not_a_big_worker(self):
        tmp, cluster = await self.cluster()
        push_jobs(cluster, [{"do": "allocate", "mb": 2000}, {"do": "allocate", "mb": 20}, {"x": 2}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=2, jobMemoryMB=100))
        await cluster.until_results(3, 60)
        by_id = self.by_id(cluster)
        self.assertEqual(by_id[0]["error"]["type"], "MemoryError")
        self.assertIn("jobMemoryMB=100", by_id[0]["error"]["message"])
        self.assertEqual(by_id[1]["data"], 20 << 20)  # under the cap: fine
        self.assertEqual(by_id[2]["data"]["x"], 2)
        self.assertLess(peak_rss_mb(worker.proc.pid), 100)  # the worker never held the 2 GB
        self.assertEqual(await worker.sigterm(20), 0)

    async def test_concurrency_runs_jobs_of_a_batch_at_once(self):
        tmp, cluster = await self.cluster()
        meets = [{"do": "meet", "folder": str(tmp / "meet" / str(i // 2))} for i in range(4)]
        push_jobs(cluster, meets + [{"do": "exit"}, {"x": 5}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=5, concurrency=2))
        await cluster.until_results(6, 60)
        by_id = self.by_id(cluster)
        for pair in ((0, 1), (2, 3)):
            self.assertEqual([by_id[i]["data"]["met"] for i in pair], [True, True])
            self.assertNotEqual(by_id[pair[0]]["data"]["pid"], by_id[pair[1]]["data"]["pid"])
        self.assertIn("exited (code 3)", by_id[4]["error"]["message"])
        self.assertEqual(by_id[5]["data"]["x"], 5)
        self.assertEqual(await worker.sigterm(20), 0)

    async def test_concurrency_without_batches_asks_one_job_per_free_child(self):
        tmp, cluster = await self.cluster()
        push_jobs(cluster, [{"do": "meet", "folder": str(tmp / "meet")}] * 2)
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="false", concurrency=2))
        await cluster.until_results(2, 60)
        self.assertEqual([r["data"]["met"] for r in cluster.results], [True, True])
        self.assertEqual(await worker.sigterm(20), 0)

    async def test_import_error_is_reported_and_new_assets_bring_new_children(self):
        tmp, cluster = await self.cluster(files={"/workplace/task.py": "import qx_missing\n"})
        push_jobs(cluster, [{"x": 0}, {"x": 1}])
        worker = cluster.worker(concurrency=2)
        with self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            await until_logged(logs, "cannot load")
        text = "\n".join(logs.output)
        self.assertIn("task.py does not load: ModuleNotFoundError: No module named 'qx_missing'", text)
        self.assertIn('task.py", line 1', text)  # the child's traceback
        self.assertIsNone(worker.keeper.runner)
        self.assertEqual(cluster.master.stats["jobs handed out"], 0)
        self.assertEqual(await worker.node.rpc(cluster.master.address, "ping", {}), {"pong": True})
        write_assets(tmp / "master", {"/workplace/task.py": TRICKY_TASK_PY})
        self.assertTrue(await worker.sync_assets())
        await cluster.until_results(2)
        first = worker.keeper.runner
        old = first.pids
        write_assets(tmp / "master", {"/workplace/task.py": TRICKY_TASK_PY + "\n# v2\n"})
        self.assertTrue(await worker.sync_assets())
        self.assertIsNot(worker.keeper.runner, first)
        await until(lambda: not first.children and not [p for p in old if alive(p)], 10)
        push_jobs(cluster, [{"x": 2}], start=2)
        await cluster.until_results(3)
        self.assertNotIn(self.by_id(cluster)[2]["data"]["pid"], old)
        now = worker.keeper.runner.pids
        await worker.stop()
        self.assertFalse([p for p in now if alive(p)])

    async def test_task_js_concurrency_deaths_timeout_and_memory(self):
        need(NODE, "node is not installed")
        tmp, cluster = await self.cluster(files={"/workplace/task.js": TRICKY_TASK_JS})
        pidfile = tmp / "spinner.pid"
        meets = [{"do": "meet", "folder": str(tmp / "meet")}] * 2
        push_jobs(cluster, meets + [{"do": "exit"}, {"x": 3}, {"do": "spin", "pidfile": str(pidfile)},
                                    {"do": "heap"}, {"do": "buffer"}, {"x": 7}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=7, concurrency=2,
                                             jobTimeout=5, jobMemoryMB=200))
        await cluster.until_results(8, 90)
        by_id = self.by_id(cluster)
        self.assertEqual([by_id[i]["data"]["met"] for i in (0, 1)], [True, True])
        self.assertNotEqual(by_id[0]["data"]["pid"], by_id[1]["data"]["pid"])
        self.assertIn("the task.js process exited (code 3)", by_id[2]["error"]["message"])
        self.assertEqual(by_id[3]["data"]["x"], 3)
        self.assertEqual(by_id[4]["error"]["type"], "TimeoutError")
        self.assertIn("was killed by SIGABRT", by_id[5]["error"]["message"])
        self.assertIn("jobMemoryMB=200", by_id[5]["error"]["message"])
        self.assertEqual(by_id[6]["error"]["type"], "RangeError")  # the cap, seen by the task itself
        self.assertEqual(by_id[7]["data"]["x"], 7)
        await until(lambda: not alive(int(pidfile.read_text())), 10)
        self.assertLess(peak_rss_mb(worker.proc.pid), 100)
        self.assertEqual(await worker.sigterm(20), 0)

    async def test_task_js_memory_cap_is_job_memory_mb_whatever_node_reserves(self):
        # Node 24 maps V8's 512 MB code range writable at start: under RLIMIT_DATA=jobMemoryMB
        # it did not start at all below ~600 MB; with 1 GiB more for good it would not be a cap
        need(NODE, "node is not installed")
        tmp, cluster = await self.cluster(files={"/workplace/task.js": TRICKY_TASK_JS})
        push_jobs(cluster, [{"do": "buffer", "mb": 64}, {"do": "buffer", "mb": 300}, {"x": 2}])
        worker = await self.started(WorkerPy(tmp, cluster, getBatch="true", batchSize=3, jobMemoryMB=200))
        await cluster.until_results(3, 60)
        by_id = self.by_id(cluster)
        self.assertEqual(by_id[0]["data"], 64 << 20, by_id[0].get("error"))
        self.assertEqual(by_id[1]["error"]["type"], "RangeError")  # 300 MB: over the cap, whatever node
        self.assertEqual(by_id[2]["data"]["x"], 2)
        self.assertEqual(await worker.sigterm(20), 0)

    def test_settings(self):
        self.assertEqual(w.parse_concurrency("auto"), len(os.sched_getaffinity(0)))
        self.assertEqual(w.parse_concurrency(" 3 "), 3)
        self.assertIsNone(w.parse_memory_mb(None))
        self.assertIsNone(w.parse_memory_mb("0"))
        self.assertEqual(w.parse_memory_mb("256"), 256)
        for bad in ("0", "-1", "two", "1.5", ""):
            with self.assertRaises(w.WorkerError, msg=bad):
                w.parse_concurrency(bad)
        with self.assertRaises(w.WorkerError):
            w.parse_memory_mb("lots")
        for key, bad in (("jobTimeout", "-1"), ("jobTimeout", "nan"), ("jobTimeout", "abc"),
                         ("stopTimeout", "-5"), ("batchSize", "x"), ("batchSize", "0")):
            with self.assertRaisesRegex(w.WorkerError, "^%s='%s': " % (key, bad)):  # not a traceback
                w.Settings.load({key: bad})
        self.assertIsNone(w.Settings.load({"jobTimeout": "0"}).job_timeout)
        self.assertEqual(w.Settings.load({"jobTimeout": "2.5", "stopTimeout": "0"}).job_timeout, 2.5)
        for key in ("concurrency", "jobMemoryMB", "stopTimeout", "taskRunner"):
            self.assertIn(key, w.SETTINGS)
            self.assertTrue("| `%s` |" % key in (HERE / "README.md").read_text(), key)
            self.assertTrue("\n%s=" % key in (HERE / ".env.example").read_text(), key)


# Worker: task.js through Node (issue 6) #####################################

class TestTaskJs(AsyncTest):
    """task.js from unchanged JS masters: a node child, npm dependencies."""

    def setUp(self):
        need(NODE, "node is not installed")

    @time_limit(150)
    async def test_js_master_basic_example_with_npm_dependency(self):
        js_ready()
        count = 100
        root = self.tmp()
        self.enterContext(patched_environ(offline_npm()))
        (root / "master").mkdir()
        (root / "master/task.js").write_text(BASIC_TASK_JS)
        (root / "assets.json").write_text(json.dumps({"dependencies": ["qx-demo-dep"], "files": [
            {"masterPath": str(root / "master/task.js"), "name": "task.js", "workerPath": "/workplace/task.js"}]}))
        token = "jstask-%d" % random.randrange(1 << 30)
        master = await self.started(JsProcess("master.js", {"QX_TOKEN": token, "QX_KEY": KEY,
                                                            "QX_ASSETS": str(root / "assets.json")}))
        for i in range(count):  # as examples/basic/index.js pushes them
            master.send(cmd="push", job={"id": i, "data": json.dumps({"x": 1, "y": 2})})
        await master.wait_for(lambda e: e["event"] == "pushed" and e["size"] == count)
        worker = await self.started(loopback_worker(token, root / "w", "py-js", get_batch=True, batch_size=10,
                                                    peers=["127.0.0.1:%d" % master.ready["port"]]))
        await until(lambda: sum(e["event"] == "result" for e in master.events) >= count, 90)
        results = [e["result"] for e in master.events if e["event"] == "result"]
        self.assertEqual(sorted(r["jobID"] for r in results), list(range(count)))
        for r in results:
            self.assertEqual(r["data"], {"sum": 3, "dep": "1.0.0"})
            self.assertEqual(r["worker"], {"id": worker.address, "name": "py-js"})
        self.assertIsInstance(worker.keeper.runner, w.NodeRunner)
        self.assertEqual(worker.keeper.runner.starts, 1)
        pids = worker.keeper.runner.pids
        self.assertTrue((root / "w/node_modules/qx-demo-dep/package.json").is_file())
        self.assertTrue((root / "w" / w.NODE_RUNNER_NAME).is_file())
        await self._check_resolution(root / "w", root / "bin")
        await worker.stop()
        self.assertEqual(worker.keeper.runner.children, [])
        self.assertFalse([pid for pid in pids if alive(pid)])

    async def _check_resolution(self, folder, bin_dir):
        """What resolves is not installed again: no npm needed for it."""
        missing = await w.missing_npm_packages(
            folder, ["qx-demo-dep", "qx-demo-dep@1.0.0", "fs", "qx-demo-dep@2.0.0", "qx-absent"])
        self.assertEqual(missing, ["qx-demo-dep@2.0.0", "qx-absent"])
        bin_dir.mkdir()
        (bin_dir / "node").symlink_to(NODE)
        with patched_environ({"PATH": str(bin_dir)}):
            self.assertTrue(await w.install_npm_packages(folder, ["qx-demo-dep@1.0.0", "fs"]))
            with self.assertLogs("worker", "ERROR") as logs:
                self.assertFalse(await w.install_npm_packages(folder, ["qx-absent"]))
        self.assertIn("'npm' is not on PATH", "\n".join(logs.output))

    async def test_throw_reject_and_console_log(self):
        cluster = await self.started(Cluster(self.tmp(), files={"/workplace/task.js": EDGE_TASK_JS}))
        cluster.push(1, 0, throw=True)
        cluster.push(1, 1, reject=True)
        cluster.push(1, 2, log=True)
        cluster.push(2, 3)
        worker = cluster.worker(get_batch=True, batch_size=2)
        with self.assertLogs("worker", "INFO") as logs:
            await self.started(worker)
            await cluster.until_results(5)
            await until_logged(logs, "console.log from job 2")
        by_id = {r["jobID"]: r for r in cluster.results}
        for i, kind, text in ((0, "TypeError", "thrown by job 0"), (1, "RangeError", "rejected by job 1")):
            self.assertIsNone(by_id[i]["data"])
            self.assertEqual(by_id[i]["error"]["type"], kind)
            self.assertEqual(by_id[i]["error"]["message"], text)
            self.assertTrue(by_id[i]["error"]["traceback"].startswith(f"{kind}: {text}\n    at "))
            self.assertIn("workplace/task.js:", by_id[i]["error"]["traceback"])
        pids = {by_id[i]["data"].pop("pid") for i in range(2, 5)}
        self.assertEqual(len(pids), 1)
        for i in range(2, 5):
            self.assertEqual(by_id[i], {"jobID": i, "worker": {"id": worker.address, "name": "w1"},
                                        "data": {"sum": i + 1}})
        self.assertIn("task.js: console.log from job 2", "\n".join(logs.output))
        self.assertEqual((worker.stats["jobs done"], worker.stats["jobs failed"]), (3, 2))

    async def test_child_dies_mid_job_next_job_works(self):
        cluster = await self.started(Cluster(self.tmp(), files={"/workplace/task.js": EDGE_TASK_JS}))
        cluster.push(1, 0)
        cluster.push(1, 1, exit=True)
        cluster.push(2, 2)
        worker = await self.started(cluster.worker(get_batch=True, batch_size=2))
        await cluster.until_results(4)
        by_id = {r["jobID"]: r for r in cluster.results}
        error = by_id[1]["error"]
        self.assertIsNone(by_id[1]["data"])
        self.assertEqual(error["type"], "TaskProcessError")
        self.assertIn("exited (code 3)", error["message"])
        self.assertIn("job 1 exits", error["traceback"])
        for i in (0, 2, 3):
            self.assertEqual(by_id[i]["data"]["sum"], i + 1)
        self.assertNotEqual(by_id[0]["data"]["pid"], by_id[2]["data"]["pid"])
        self.assertEqual(by_id[2]["data"]["pid"], by_id[3]["data"]["pid"])
        self.assertEqual(worker.keeper.runner.starts, 2)

    async def test_asset_change_restarts_child(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp, files={"/workplace/task.js": VERSION_TASK_JS % 1}))
        cluster.push(2)
        worker = await self.started(cluster.worker())
        await cluster.until_results(2)
        first = worker.keeper.runner
        write_assets(tmp / "master", {"/workplace/task.js": VERSION_TASK_JS % 2})
        self.assertTrue(await worker.sync_assets())
        self.assertEqual(cluster.statuses, ["changed", "changed"])
        self.assertIsNot(worker.keeper.runner, first)
        await until(lambda: not first.children, 10)
        cluster.push(2, start=2)
        await cluster.until_results(4)
        data = [r["data"] for r in sorted(cluster.results, key=lambda r: r["jobID"])]
        self.assertEqual([d["version"] for d in data], [1, 1, 2, 2])
        self.assertNotEqual(data[0]["pid"], data[2]["pid"])

    async def test_node_missing_is_a_clear_error_worker_stays_up(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp, files={"/workplace/task.js": EDGE_TASK_JS}))
        cluster.push(2)
        empty = tmp / "empty-bin"
        empty.mkdir()
        worker = cluster.worker()
        with patched_environ({"PATH": str(empty)}), self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            await until_logged(logs, "not on PATH", 20)
            self.assertEqual(await worker.node.rpc(cluster.master.address, "ping", {}), {"pong": True})
        text = "\n".join(logs.output)
        self.assertIn("needs Node.js, but 'node' is not on PATH", text)
        self.assertIsNone(worker.keeper.runner)
        self.assertEqual(cluster.results, [])
        self.assertEqual(cluster.master.stats["jobs handed out"], 0)
        # node is back: the next asset check (every 30 s when idle) loads task.js
        self.assertTrue(await worker.sync_assets())
        await cluster.until_results(2)
        self.assertEqual(sorted(r["data"]["sum"] for r in cluster.results), [1, 2])

    async def test_runner_load_errors_results_timeout_close(self):
        async def runner(folder, source, timeout=None):
            folder.mkdir()
            (folder / "task.js").write_text(source)
            return await self.started(w.NodeRunner(folder / "task.js", folder, timeout))

        root = self.tmp()
        for name, source, expected in (
                ("ctor", "module.exports = class { constructor() { throw new Error('no config'); } };",
                 "Error: no config"),
                ("object", "module.exports = { run() {} };", "must export its Task class"),
                ("exit", "process.exit(0);", "exited (code 0)")):
            with self.assertRaises(w.TaskProcessError, msg=name) as caught:
                await runner(root / name, source)
            self.assertIn("does not load", str(caught.exception))
            self.assertIn(expected, str(caught.exception))
        odd = await runner(root / "odd", "module.exports = class { async run(job) { switch (job) {\n"
                           "  case 1: return undefined; case 2: return 10n; case 3: throw 'text';\n"
                           "  case 4: for (;;); default: return job; } } };", timeout=3.0)
        self.assertIsNone(await odd.run(1))
        with self.assertRaises(w.JsTaskError) as caught:
            await odd.run(2)
        self.assertEqual(caught.exception.error["type"], "TypeError")
        self.assertIn("BigInt", caught.exception.error["message"])
        with self.assertRaises(w.JsTaskError) as caught:
            await odd.run(3)
        self.assertEqual(w.error_result(caught.exception), {"type": "string", "message": "text",
                                                            "traceback": ""})
        with self.assertRaises(TimeoutError):
            await odd.run(4)
        self.assertEqual(await odd.run({"é": [1, None]}), {"é": [1, None]})
        self.assertEqual(odd.starts, 2)
        odd.close()
        odd.close()
        await odd.wait_closed()
        self.assertEqual(odd.children, [])
        with self.assertRaises(w.InvalidState):
            await odd.run(5)


# The Worker #################################################################

class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class FakeNode:
    """What the Worker's parts ask of Bugout, in memory: ``answer(address, name, args)`` answers
    each RPC (an exception it returns is raised); ``wires``: the addresses with a signed wire."""

    port = 4464

    def __init__(self, answer, address="bWorkerSelf"):
        self.answer = answer
        self.address = address
        self.calls = []
        self.wires = set()
        self.peers = {}
        self.prioritized = []
        self.room = True  # our payloads to a JS master leave at once (not waiting for echoes)

    async def rpc(self, address, name, args, timeout=30.0):
        self.calls.append((address, name, args))
        await asyncio.sleep(0)
        answer = self.answer(address, name, args)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def rpc_nowait(self, address, name, args):
        self.calls.append((address, name, args))

    async def room_for(self, address, size):
        """Bugout.room_for: whether ours would leave at once (``room``), after a while."""
        await asyncio.sleep(0.01)
        return self.room

    def has_wire(self, address):
        return address in self.wires

    has_signed_wire = has_wire

    def prioritize(self, address):
        self.prioritized.append(address)

    def renew_silent_wires(self, address, quiet):
        return 0  # every wire here answers or is gone

    def called(self, name):
        return [(address, args) for address, called, args in self.calls if called == name]


class FakeJournal:
    """The journal calls MasterFinder makes: meta values, in memory."""

    path = Path("fake-journal.db")

    def __init__(self):
        self.meta = {}

    def submit(self, fn, *args):
        fn(*args)

    async def call(self, fn, *args):
        return fn(*args)

    def set_meta(self, key, value):
        self.meta[key] = value

    def get_json(self, key, default):
        return json.loads(self.meta[key]) if key in self.meta else default


def part_settings(**kw):
    """Settings for one part alone (nothing is read from .env or the environment)."""
    for key, value in {"trackers": [], "lsd": False, "dht": False}.items():
        kw.setdefault(key, value)
    return w.Settings.load({}, token="parts-swarm", transfer_encrypt_token=KEY, name="w", **kw)


def honest_master(node, key=KEY, caps=None):
    """isMaster answers of master.py holding ``key``: yes, and the proof of each challenge."""
    proof_key = w.Crypt(key).derive(w.PROOF_LABEL)

    def answer(address, name, args):
        if name != "isMaster":
            return w.RpcTimeout(name)
        said = {"isMaster": "yes", "keyProof": 1, "resultBatches": True, **(caps or {})}
        if "challenge" in args:
            said["proof"] = w.master_proof(proof_key, bytes.fromhex(args["challenge"]), address, node.address)
            said["workerChallenge"] = "ab" * 32  # master.py's: the worker proves the key too
        return said
    return answer


class TestMasterFinder(AsyncTest):
    """MasterFinder alone: a fake node, a fake journal, a clock; no socket."""

    def finder(self, answers=None, **settings):
        node = FakeNode(lambda address, name, args: answers[address](address, name, args))
        found = []

        async def on_master(verified):
            found.append(finder.master)
        tasks = set()
        finder = w.MasterFinder(node, w.Crypt(KEY), part_settings(**settings), FakeJournal(),
                                spawn=lambda coro: w.spawn(coro, tasks, "test"), on_master=on_master,
                                stats=collections.Counter(), now=Clock(), logger=logging.getLogger("worker.finder"))
        self.addAsyncCleanup(self.cancel, tasks)
        return finder, node, found

    @staticmethod
    async def cancel(tasks):
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def test_a_candidate_that_proves_the_key_becomes_the_master(self):
        answers = {}
        finder, node, found = self.finder(answers)
        answers["bMaster"] = honest_master(node)
        answers["bOther"] = honest_master(node, key="x" * 32)  # another key: says yes, cannot prove
        self.assertIsNone(finder.master)
        with self.assertLogs("worker", "ERROR") as logs:
            self.assertFalse(await finder.check_master("bOther"))
        self.assertIn("bOther holds a different transferEncryptToken", logs.output[0])
        self.assertFalse(finder.trust.may_ask("bOther", finder.now()))  # until it comes back
        self.assertIsNone(finder.master)
        with self.assertLogs("worker", "INFO") as logs:
            self.assertTrue(await finder.check_master("bMaster"))
        self.assertIn("master found: bMaster (key challenge)", logs.output[-1])
        self.assertEqual((finder.master, found, node.prioritized), ("bMaster", ["bMaster"], ["bMaster"]))
        self.assertTrue(finder.caps.batches and finder.caps.key_proof)
        self.assertEqual(json.loads(finder.journal.meta["proven"]), ["bMaster"])
        await until(lambda: len(node.called("proveKey")) == 2, 5)  # our proof, to each challenger

    async def test_failover_when_the_proven_wire_leaves(self):
        answers = {}
        finder, node, found = self.finder(answers)
        answers["bFirst"] = answers["bSecond"] = honest_master(node)
        self.assertTrue(await finder.check_master("bFirst"))
        self.assertFalse(await finder.check_master("bSecond"))  # a candidate only, while the first serves
        self.assertEqual((finder.master, list(finder.trust.candidates)), ("bFirst", ["bSecond"]))
        node.peers = {"bSecond": None}
        answers["bFirst"] = lambda address, name, args: w.RpcUnreachable(name)  # gone
        with self.assertLogs("worker", "INFO") as logs:
            finder.on_left("bFirst")
            await until(lambda: finder.master == "bSecond", 5)
        self.assertEqual(found, ["bFirst", "bSecond"])
        self.assertIn("master bFirst left; its results are kept until it is back", logs.output[0])
        self.assertIn("master found: bSecond", logs.output[-1])

    async def test_a_master_that_fails_requests_is_lost_after_two_or_at_once_if_unreachable(self):
        answers = {}
        finder, node, _ = self.finder(answers)
        answers["bMaster"] = honest_master(node)
        self.assertTrue(await finder.check_master("bMaster"))
        finder.failed("bMaster", w.RpcTimeout("requestWork"))
        finder.answered()  # an answer in between: the count starts again
        finder.failed("bMaster", w.RpcTimeout("requestWork"))
        self.assertEqual(finder.master, "bMaster")
        with self.assertLogs("worker", "WARNING"):
            finder.failed("bMaster", w.RpcTimeout("requestWork"))
        self.assertIsNone(finder.master)
        self.assertTrue(await finder.check_master("bMaster"))  # back: it proved it before
        with self.assertLogs("worker", "WARNING"):
            finder.failed("bMaster", w.RpcUnreachable("shareResults"))
        self.assertIsNone(finder.master)

    async def test_waiting_is_said_once_with_the_ways_it_looks(self):
        cases = [({"lsd": True, "dht": True, "trackers": ["ws://127.0.0.1:8000"], "peers": ["127.0.0.1:4464"]},
                  "INFO", ("waiting for a master: looking by LSD on the local network, the DHT, 1 tracker(s), "
                           "peers= 127.0.0.1:4464")),
                 ({"peers": ["127.0.0.1:4464"], "master": [w.Identity().address]}, "INFO", "only master= b"),
                 ({}, "WARNING", ("waiting for a master to dial this worker (port 4464): LSD, the DHT and "
                                  "trackers are off and peers= is empty"))]
        for settings, level, text in cases:
            finder, _, _ = self.finder({}, **settings)
            with self.assertLogs("worker.finder", "DEBUG") as logs:  # the logger it was given
                finder.start()
                await asyncio.sleep(0)
            self.assertEqual(len(logs.records), 1, logs.output)
            self.assertEqual(logs.records[0].levelname, level)
            self.assertIn(text, logs.output[0])


class FakeRunner:
    """A runner whose jobs end when the test says (``gate``), doubling ``x``."""

    def __init__(self, concurrency=1):
        self.concurrency = concurrency
        self.gate = asyncio.Event()
        self.gate.set()
        self.ran = []
        self.aborted = None

    async def run(self, job):
        await self.gate.wait()
        self.ran.append(job["id"])
        return {"double": job["x"] * 2}

    def abort(self, reason):
        self.aborted = reason


class FakeFinder:
    def __init__(self, master="bMaster", caps=None):
        self.master = master
        self.caps = caps or w.MasterCaps()
        self.failures = []
        self.asked = 0

    def failed(self, master, exc):
        self.failures.append((master, type(exc).__name__))

    def answered(self):
        pass

    def ask_known(self):
        self.asked += 1


class FakeKeeper:
    def __init__(self, runner):
        self.runner = runner
        self.ready = True
        self.syncs = 0

    async def sync_assets(self):
        self.syncs += 1
        return True

    def abort(self, reason):
        self.runner.abort(reason)


class TestJobLoop(AsyncTest):
    """JobLoop alone, with its batch-request policy: a fake node, finder and runner, a real
    journal and outbox in a temporary folder."""

    def job_loop(self, answers, runner=None, finder=None, **settings):
        """A loop whose requestWork answers come from ``answers`` (a list of job lists; then none)."""
        crypt = w.Crypt(KEY)

        def answer(address, name, args):
            if name != "requestWork":
                return {}
            jobs = answers.pop(0) if answers else []
            return {"batchTasks": [crypt.encrypt_json(job) for job in jobs]}
        node = FakeNode(answer)
        node.wires.add("bMaster")
        journal = self.will_close(open_journal(self.tmp()))
        finder = finder or FakeFinder()
        outbox = w.Outbox(journal, lambda address: address == finder.master)
        tasks = set()
        loop = w.JobLoop(part_settings(**settings), node, crypt, journal, outbox, finder,
                         FakeKeeper(runner or FakeRunner()), stats=collections.Counter(),
                         spawn=lambda coro: w.spawn(coro, tasks, "test"), now=Clock())
        loop.idle_seconds = 3600.0  # no idle round unless a test wants one
        self.addAsyncCleanup(TestMasterFinder.cancel, tasks)
        tasks.add(asyncio.ensure_future(loop.run()))
        return loop, node

    async def test_asks_for_a_batch_backs_off_when_none_comes_and_asks_on_a_nudge(self):
        jobs = [{"id": i, "x": i} for i in range(3)]
        loop, node = self.job_loop([jobs], get_batch=True, batch_size=3)
        await until(lambda: len(node.called("requestWork")) == 2, 5)  # the batch, then an empty answer
        self.assertEqual([args for _, args in node.called("requestWork")],
                         [{"getBatch": True, "batchSize": 3}] * 2)
        await until(lambda: len(node.called("shareResults")) == 3, 5)  # each result, to the master
        sent = [w.Crypt(KEY).decrypt_json(json.loads(args)) for _, args in node.called("shareResults")]
        self.assertEqual([(r["jobID"], r["data"]) for r in sent], [(0, {"double": 0}), (1, {"double": 2}),
                                                                   (2, {"double": 4})])
        self.assertEqual(loop.stats["results delivered"], 3)
        await asyncio.sleep(0.1)
        self.assertEqual(len(node.called("requestWork")), 2)  # backed off: no request per job, no spin
        loop.on_message("bSomeoneElse", w.JOBS_WAITING)  # only the master's nudge counts
        await asyncio.sleep(0.1)
        self.assertEqual(len(node.called("requestWork")), 2)
        loop.on_message("bMaster", w.JOBS_WAITING)
        await until(lambda: len(node.called("requestWork")) == 3, 5)
        loop.idle_seconds = 0.01  # the idle timer: the assets are checked, then it asks again
        loop.nudge()
        await until(lambda: len(node.called("requestWork")) >= 5, 5)
        self.assertGreaterEqual(loop.keeper.syncs, 1)

    async def test_without_batches_one_job_per_free_child(self):
        runner = FakeRunner(concurrency=3)
        runner.gate.clear()  # no job ends until the test says
        answers = [[{"id": i, "x": i}] for i in range(5)]
        loop, node = self.job_loop(answers, runner=runner, get_batch=False)
        await until(lambda: len(loop.running) == 3, 5)
        await asyncio.sleep(0.1)
        self.assertEqual(len(node.called("requestWork")), 3)  # one per free child, none while all are busy
        self.assertEqual({args["getBatch"] for _, args in node.called("requestWork")}, {False})
        runner.gate.set()
        await until(lambda: len(runner.ran) == 5, 5)

    async def test_takes_at_most_max_batch_tasks_from_one_answer(self):
        with mock.patch.object(w, "MAX_BATCH_TASKS", 2), self.assertLogs("worker", "ERROR") as logs:
            loop, node = self.job_loop([[{"id": i, "x": i} for i in range(3)]], get_batch=True, batch_size=2)
            await until(lambda: len(node.called("shareResults")) == 2, 5)
        self.assertIn("the master sent 3 jobs at once; only the first 2 are taken", logs.output[0])
        self.assertEqual(loop.keeper.runner.ran, [0, 1])

    async def test_a_result_for_a_js_master_stays_held_until_it_would_leave_at_once(self):
        # a JS master gives no ack: a result counts as delivered when written to its wire, so it
        # stays in the journal while it would only wait for echoes in memory (kill -9 safety)
        loop, node = self.job_loop([[{"id": 1, "x": 1}]], get_batch=True, batch_size=1)
        node.room = False  # the master's echoes lag: room_for runs out of time, again and again
        await until(lambda: loop.outbox.held == 1 and loop._delivery_lock.locked(), 5)
        await asyncio.sleep(0.1)
        self.assertEqual(node.called("shareResults"), [])
        self.assertEqual((loop.outbox.held, loop.stats["results delivered"]), (1, 0))
        loop.finder.master = "bOtherMaster"  # and the master changed meanwhile: not for the old one
        node.room = True
        await asyncio.sleep(0.1)
        self.assertEqual((node.called("shareResults"), loop.outbox.held), ([], 1))
        loop.finder.master = "bMaster"
        loop.kick_delivery()
        await until(lambda: len(node.called("shareResults")) == 1, 5)
        self.assertEqual((loop.outbox.held, loop.stats["results delivered"]), (0, 1))

    async def test_an_unanswered_request_is_told_to_the_finder_and_no_job_is_held(self):
        finder = FakeFinder()
        loop, node = self.job_loop([], finder=finder)
        node.answer = lambda address, name, args: w.RpcTimeout("requestWork")
        with self.assertLogs("worker", "WARNING") as logs:
            self.assertFalse(await loop.request_work())
        self.assertIn("could not ask master bMaster for jobs: it did not answer in time", logs.output[0])
        self.assertEqual(finder.failures[-1], ("bMaster", "RpcTimeout"))
        self.assertFalse(loop.jobs)


class TestAssetKeeper(AsyncTest):
    """AssetKeeper alone: a fake node serving the master's files, a real journal and task child."""

    async def test_a_changed_hash_brings_the_files_again(self):
        tmp = self.tmp()
        served = {"/workplace/task.py": MASTER_TASK.encode(), "/workplace/data/x.json": b'{"x": 1}'}

        def answer(address, name, args):
            files = asset_answer(served)
            same = args["currentHash"] == "".join(f["sha256"] for f in files["files"])
            return {"status": "same"} if same else files
        node = FakeNode(answer)
        finder = FakeFinder(master=None, caps=w.MasterCaps(key_proof=True))
        ready = []
        tasks = set()
        keeper = w.AssetKeeper(part_settings(folder=str(tmp / "w")), node, w.Crypt(KEY),
                               self.will_close(open_journal(tmp)), finder,
                               spawn=lambda coro: w.spawn(coro, tasks, "test"), on_ready=lambda: ready.append(1))

        async def close_runner():
            if keeper.runner:
                await keeper.runner.wait_closed()
        self.addAsyncCleanup(close_runner)
        self.assertFalse(await keeper.sync_assets())  # no master: nothing asked
        self.assertEqual(node.calls, [])
        finder.master = "bMaster"
        self.assertTrue(await keeper.sync_assets())
        first = keeper.runner
        self.assertEqual((keeper.ready, len(ready)), (True, 1))
        data = tmp / "w" / w.ASSET_FOLDER / "workplace/data/x.json"
        self.assertEqual(data.read_bytes(), b'{"x": 1}')
        self.assertTrue(await keeper.sync_assets())  # same hash: nothing written, the same runner
        self.assertIs(keeper.runner, first)
        served["/workplace/data/x.json"] = b'{"x": 2}'  # the master's files change
        self.assertTrue(await keeper.sync_assets())
        self.assertEqual(data.read_bytes(), b'{"x": 2}')
        self.assertIsNot(keeper.runner, first)  # the task loaded again
        data.write_bytes(b"changed here")  # and ours: our hash differs, the master sends all again
        self.assertTrue(await keeper.sync_assets())
        self.assertEqual(data.read_bytes(), b'{"x": 2}')
        self.assertEqual([args["currentHash"] == "" for _, args in node.called("requestExecAssets")],
                         [True, False, False, False])
        await first.wait_closed()


class TestWorkerFlow(AsyncTest):
    async def run_jobs(self, get_batch, count=500):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        cluster.push(count)
        worker = await self.started(cluster.worker(get_batch=get_batch, batch_size=10))
        await cluster.until_results(count)
        await worker.sync_assets()
        self.assertEqual(cluster.statuses, ["changed", "same"])
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), list(range(count)))
        for r in cluster.results:
            self.assertEqual(r["data"], {"sum": (r["jobID"] + 1) * 2})
            self.assertEqual(r["worker"], {"id": worker.address, "name": "w1"})
        self.assertTrue((tmp / "w1" / w.ASSET_FOLDER / "workplace/data/conf/factor.json").is_file())
        return cluster

    @time_limit(120)
    async def test_500_jobs_unbatched(self):
        await self.run_jobs(False)

    @time_limit(120)
    async def test_500_jobs_batched(self):
        cluster = await self.run_jobs(True)
        self.assertGreaterEqual(cluster.master.stats["jobs handed out"], 500)

    async def test_results_master_py_refuses_as_another_runs_are_kept_and_offered_no_more(self):
        # issue 25: should a master.py start another run unseen (a wire that stayed up), the
        # results of the last run's jobs are not taken there, and the worker keeps them
        cluster = await self.started(Cluster(self.tmp()))
        worker = await self.started(cluster.worker())
        master = cluster.master
        await until(lambda: worker.master == master.address and worker.finder.caps.run == master.store.run_id, 20)
        worker.finder.caps = dataclasses.replace(worker.finder.caps, run="an-earlier-run")  # as it knew it before
        worker.outbox.given([(10**6, "{}")], (master.address, "an-earlier-run"))
        with self.assertNoLogs("worker", "WARNING"):  # not a failure: they are not that run's to take
            worker.job_loop.result_ready({"jobID": 1, "worker": {"id": worker.address, "name": "w1"}, "data": 2}, 10**6)
            await worker.outbox.flush()
            self.assertFalse(await worker.job_loop._deliver_some(master.address))  # shareResultsBatch
            self.assertEqual(worker.finder.caps.run, master.store.run_id)
            worker.finder.caps = dataclasses.replace(worker.finder.caps, run="an-earlier-run")
            cluster.push(3)  # requestWork carries them; the work of the new run goes on
            await cluster.until_results(3, 20)
        self.assertEqual(worker.finder.caps.run, master.store.run_id)
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), [0, 1, 2])
        self.assertEqual(worker.outbox.owes(master.address, "an-earlier-run"), 1)  # kept
        self.assertEqual(master.stats["results of another run refused"], 2)  # offered once each way

    async def test_waiting_for_a_master_is_said_once_then_its_finding(self):
        # issue 25: with no master, the log said nothing of what the worker waits for, or how it looks
        tmp = self.tmp()
        token = "waiting-%d" % random.randrange(1 << 40)
        worker = loopback_worker(token, tmp / "w", peers=["127.0.0.1:%d" % port_below(30000)])  # nobody there
        worker.job_loop.idle_seconds = 0.05  # idle rounds: each asks the known peers again
        rounds = []
        ask_known = worker.finder.ask_known
        worker.finder.ask_known = lambda: (rounds.append(1), ask_known())
        with self.assertLogs("worker", "INFO") as logs:
            await self.started(worker)
            await until(lambda: len(rounds) >= 3, 10)
            master = await self.started(loopback_master(token, tmp / "m", peers=["127.0.0.1:%d" % worker.node.port]))
            await until(lambda: worker.master == master.address, 20)
            await until(lambda: worker.keeper.runner is not None, 20)  # not stopped while its task loads
        waiting = [line for line in logs.output if "waiting for a master" in line]
        self.assertEqual(len(waiting), 1, logs.output)
        self.assertIn("INFO:worker:waiting for a master: looking by peers= 127.0.0.1:", waiting[0])
        self.assertTrue(any("master found: %s" % master.address in line for line in logs.output))

    async def test_a_failed_call_to_the_master_is_said_in_plain_words(self):
        # issue 25: "requestWork: requestWork on b...: no wire is open"
        cluster = await self.started(Cluster(self.tmp()))
        worker = await self.started(cluster.worker())
        await until(lambda: worker.master is not None, 15)
        master = worker.master
        with self.assertLogs("worker", "WARNING") as logs:
            with mock.patch.object(worker.node, "rpc", side_effect=w.RpcTimeout(
                    "requestExecAssets on %s: no answer in 120.0s" % master)):
                await worker.sync_assets()
            with mock.patch.object(worker.node, "rpc", side_effect=w.RpcUnreachable(
                    "requestWork on %s: no wire is open" % master)):
                await worker.request_work()
        said = [line.split(":", 2)[2] for line in logs.output]
        self.assertIn("could not get the task files from master %s: it did not answer in time" % master, said)
        self.assertIn("could not ask master %s for jobs: no connection to it is open" % master, said)
        self.assertFalse([line for line in said if re.search("request|wire", line)], said)

    async def test_failing_task_gives_error_results_and_goes_on(self):
        cluster = await self.started(Cluster(self.tmp()))
        cluster.push(3, fail=True)
        cluster.push(3, start=3)
        await self.started(cluster.worker(get_batch=True, batch_size=2))
        await cluster.until_results(6)
        by_id = {r["jobID"]: r for r in cluster.results}
        for i in range(3):
            self.assertIsNone(by_id[i]["data"])
            self.assertEqual(by_id[i]["error"]["type"], "ValueError")
            self.assertEqual(by_id[i]["error"]["message"], "boom %d" % i)
            self.assertIn("Traceback", by_id[i]["error"]["traceback"])
        for i in range(3, 6):
            self.assertEqual(by_id[i]["data"], {"sum": (i + 1) * 2})

    async def test_timeout_exit_and_an_async_task_keeping_its_loop(self):
        cluster = await self.started(Cluster(self.tmp(), files={"/workplace/task.py": LOOP_TASK_PY}))
        cluster.push(2)
        cluster.push(1, 2, exit=3)
        cluster.push(1, 3, hang=30)
        cluster.push(1, 4)
        await self.started(cluster.worker(job_timeout=1.0))
        await cluster.until_results(5, 30)
        by_id = {r["jobID"]: r for r in cluster.results}
        first = by_id[0]["data"]["pid"]
        self.assertEqual([by_id[i]["data"] for i in (0, 1)], [{"same_loop": True, "pid": first}] * 2)
        self.assertEqual(by_id[2]["error"]["type"], "SystemExit")
        self.assertEqual(by_id[2]["error"]["message"], "3")
        self.assertEqual(by_id[3]["error"]["type"], "TimeoutError")
        self.assertTrue(by_id[4]["data"]["same_loop"])  # ran, in a new child with a loop of its own
        self.assertNotEqual(by_id[4]["data"]["pid"], first)

    async def test_assets_that_cannot_be_written_are_an_error_not_a_stop(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        (tmp / "master/x").write_text("a file, and a folder below")
        cluster.master.exec_assets["files"] += [  # the second cannot be written
            {"masterPath": "/x", "name": "x", "workerPath": "/workplace/x"},
            {"masterPath": "/x", "name": "y", "workerPath": "/workplace/x/y"}]
        worker = cluster.worker()
        with self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            await until_logged(logs, "cannot write the assets")
        self.assertFalse((tmp / "w1" / w.ASSET_FOLDER / "workplace/task.py").exists())
        self.assertEqual(await worker.node.rpc(cluster.master.address, "ping", {}), {"pong": True})

    async def test_unsafe_assets_write_nothing(self):
        cases = [{"/../evil.py": "x", "/workplace/task.py": TASK_PY},
                 {"/node_modules/x/index.js": "x", "/workplace/task.py": TASK_PY},
                 {"/workplace/task.py": TASK_PY, "/workplace/__pycache__/task.cpython-311.pyc": "x"},
                 {"/workplace/task.py": TASK_PY, "/workplace/../../x.py": "x"}]
        for files in cases:
            tmp = self.tmp()
            cluster = Cluster(tmp, files={"/workplace/task.py": TASK_PY})
            listed = [{"masterPath": "/workplace/task.py", "name": Path(p).name, "workerPath": p}
                      for p in files]
            cluster.master.exec_assets["files"] = listed
            await self.started(cluster)
            worker = cluster.worker()
            with self.assertLogs("worker", "ERROR") as logs:
                await self.started(worker)
                await until_logged(logs, "refused")
            self.assertEqual(sorted(p.name for p in (tmp / "w1").iterdir()
                                    if not p.name.startswith(w.JOURNAL_NAME)), [])
            self.assertFalse((tmp / "evil.py").exists())
            await worker.stop()  # before the next case
            await cluster.close()

    async def test_bad_dependency_refused(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp, deps=["--index-url=http://evil/ x"]))
        worker = cluster.worker()
        with self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            await until_logged(logs, "refused")
        self.assertFalse((tmp / "w1/workplace").exists())

    @time_limit(180)
    async def test_dependency_from_local_wheel(self):
        tmp = self.tmp()
        wheels = tmp / "wheels"
        self.enterContext(patched_environ({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}))
        make_wheel(wheels, "qxdemo_dep", "1.2.0", "VALUE = 41\n")
        files = dict(DEFAULT_FILES)
        files["/workplace/task.py"] = ("import qxdemo_dep\n\nclass Task:\n    def run(self, job):\n"
                                       "        return qxdemo_dep.VALUE + 1\n")
        cluster = await self.started(Cluster(tmp, files=files, deps=["qxdemo-dep==1.2.0"]))
        cluster.push(2)
        await self.started(cluster.worker())
        await cluster.until_results(2, timeout=120)
        self.assertEqual([r["data"] for r in cluster.results], [42, 42])
        self.assertTrue(any((tmp / "w1/.deps").glob("qxdemo_dep*")))

    @time_limit(180)
    async def test_dependency_that_cannot_install_is_a_clear_error_and_retried(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp, deps=["qx-no-such-package==9.9"]))
        cluster.push(1)
        worker = cluster.worker()
        with patched_environ({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp / "nowhere")}), \
                self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            await until_logged(logs, "pip could not install", 120)
        self.assertIn("qx-no-such-package==9.9", "\n".join(logs.output))
        self.assertEqual(cluster.results, [])
        self.assertEqual(await worker.node.rpc(cluster.master.address, "ping", {}), {"pong": True})
        # the package appears (the network is back): the next sync installs it, and jobs run
        make_wheel(tmp / "wheels", "qx_no_such_package", "9.9", "VALUE = 1\n")
        with patched_environ({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp / "wheels")}):
            self.assertTrue(await worker.sync_assets())
        self.assertTrue(any((tmp / "w1/.deps").glob("qx_no_such_package*")))
        await cluster.until_results(1)

    async def test_wrong_key_is_reported_no_crash(self):
        cluster = await self.started(Cluster(self.tmp()))
        cluster.push(2)
        worker = cluster.worker(key="z" * 32)
        with self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            await until_logged(logs, "%s holds a different transferEncryptToken, or is no master"
                               % cluster.master.address)
            await until_logged(logs, "%s holds a different transferEncryptToken:" % worker.address)  # master.py
        self.assertEqual(cluster.results, [])
        self.assertEqual(await worker.node.rpc(cluster.master.address, "ping", {}), {"pong": True})

    @time_limit(90)
    async def test_master_restarts_worker_goes_on(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        cluster.push(20)
        await self.started(cluster.worker())
        await cluster.until_results(20)
        port = cluster.master.port
        await cluster.master.close()
        second = []
        master2 = await self.started(loopback_master(cluster.token, tmp / "master", second.append, port=port))
        for i in range(100, 110):
            master2.push_new_job({"id": i, "data": json.dumps({"x": i})})
        await until(lambda: len(second) >= 10, 60)
        self.assertEqual(sorted(r["jobID"] for r in second), list(range(100, 110)))

    async def test_restart_with_same_assets_downloads_nothing(self):
        cluster = await self.started(Cluster(self.tmp()))
        first = await self.started(cluster.worker())
        await until(lambda: first.keeper.runner is not None)
        await first.stop()
        second = await self.started(cluster.worker())
        await until(lambda: second.keeper.runner is not None)
        self.assertEqual(cluster.statuses, ["changed", "same"])


class TestAgainstJsMaster(AsyncTest):
    """The Python worker for the JS master harness (npm bugout) over TCP."""

    def setUp(self):
        js_ready()

    async def test_a_task_that_does_not_load_brings_the_js_master_no_call_it_does_not_know(self):
        # issue 25: master.py hears why (workerError); a JS master must never get that call
        tmp = self.tmp()
        token = "jsm-broken-%d" % random.randrange(1 << 30)
        assets = js_master_assets(tmp, {**DEFAULT_FILES, "/workplace/task.py": "class Task:\n    def run(self)\n"})
        master = await self.started(JsProcess("master.js", {"QX_TOKEN": token, "QX_KEY": KEY,
                                                            "QX_ASSETS": str(assets)}))
        worker = loopback_worker(token, tmp / "w", "py", peers=["127.0.0.1:%d" % master.ready["port"]])
        with self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            await until_logged(logs, "does not load", 20)
            self.assertFalse(await worker.sync_assets())
        await asyncio.sleep(0.5)
        self.assertEqual({e["call"] for e in master.events if e["event"] == "rpc"}, {"isMaster", "requestExecAssets"})
        self.assertFalse(worker.finder.caps.errors)

    async def run_jobs(self, get_batch, count=500):
        tmp = self.tmp()
        token = "jsmaster-%d" % random.randrange(1 << 30)
        assets = js_master_assets(tmp)
        master = await self.started(JsProcess("master.js", {"QX_TOKEN": token, "QX_KEY": KEY,
                                                            "QX_JOBS": str(count), "QX_ASSETS": str(assets)}))
        port = master.ready["port"]
        worker = await self.started(loopback_worker(token, tmp / "w", "py", get_batch=get_batch,
                                                    batch_size=10, peers=["127.0.0.1:%d" % port]))
        started = time.perf_counter()
        await until(lambda: sum(e["event"] == "result" for e in master.events) >= count, 120)
        rate = count / (time.perf_counter() - started)
        results = [e["result"] for e in master.events if e["event"] == "result"]
        self.assertEqual(sorted(r["jobID"] for r in results), list(range(count)))
        for r in results:
            self.assertEqual(r["data"], {"sum": r["jobID"] * 2})
            self.assertEqual(r["worker"]["name"], "py")
        calls = [e for e in master.events if e["event"] == "rpc"]
        self.assertEqual([c["call"] for c in calls][:2], ["isMaster", "requestExecAssets"])
        # the JS master listed its own default task.js too: we ran task.py
        self.assertTrue((tmp / "w" / w.ASSET_FOLDER / "workplace/task.js").is_file())
        await worker.sync_assets()
        self.assertEqual(worker.stats["jobs done"], count)
        print("\n  %s: %.0f jobs/s against the JS master" % ("batched (10)" if get_batch else "unbatched", rate),
              file=sys.stderr)

    @time_limit(180)
    async def test_500_jobs_unbatched(self):
        await self.run_jobs(False)

    @time_limit(180)
    async def test_500_jobs_batched(self):
        await self.run_jobs(True)

    @time_limit(120)
    async def test_a_result_held_for_a_master_that_left_goes_back_to_it_never_to_the_js_master(self):
        # issue 25: a result held from a killed master.py (job 398) was a JS master's first result,
        # taken as the answer to its own job 398: JS masters number jobs from 0 at each start
        tmp = self.tmp()
        token, port, seed = "held-js-%d" % random.randrange(1 << 30), free_port(), w.make_seed()
        db = tmp / "master.db"
        first = await self.started(QuietMaster(tmp, token, port, seed, "py", db=db))
        for i in range(6):  # JS rule: a batch of 5 while more than 5 wait
            first.master.push_new_job({"id": i, "data": json.dumps({"x": 1000 + i, "sleep": 0.3})})
        worker = await self.started(loopback_worker(token, tmp / "w", "py", get_batch=True, batch_size=5,
                                                    peers=["127.0.0.1:%d" % port]))
        await until(lambda: len(worker.jobs) >= 3, 30)
        await first.close()  # gone while the worker runs its batch
        await until(lambda: worker.stats["jobs done"] >= 5, 30)
        held = len(worker.outbox)
        self.assertGreaterEqual(held, 3)
        js = await self.started(JsProcess("master.js", {"QX_TOKEN": token, "QX_KEY": KEY, "QX_JOBS": "5",
                                                        "QX_ASSETS": str(js_master_assets(tmp / "js"))}))
        js.send(cmd="addPeer", addr="127.0.0.1:%d" % worker.node.port)
        await until(lambda: sum(e["event"] == "result" for e in js.events) >= 5, 30)
        await asyncio.sleep(0.5)  # a held result would follow at once
        results = [e["result"] for e in js.events if e["event"] == "result"]
        self.assertEqual(sorted((r["jobID"], r["data"]["sum"]) for r in results), [(i, 2 * i) for i in range(5)])
        self.assertEqual(len(worker.outbox), held)  # still held for the master that gave their jobs
        await js.close()
        again = await self.started(QuietMaster(tmp, token, port, seed, "py", db=db))  # the same run, back
        await until(lambda: not worker.outbox.held, 30)
        recorded = {int(key): json.loads(text)["data"]["sum"] for key, text in again.master.store.db.execute(
            "SELECT job_key, result FROM results")}
        self.assertEqual(recorded, {i: 2 * (1000 + i) for i in range(5)})

    @time_limit(120)
    async def test_a_slow_reading_js_master_never_gets_more_in_one_turn_than_it_can_echo(self):
        # issue 20: the original JS master stops writing to a wire that takes more than ~16 KiB
        # in one loop turn (QX_TURN_LIMIT emulates it). It echoes all it reads (bugout relays
        # every new packet by every wire), so a master too busy to read echoes in one turn
        # all that came meanwhile: results of 3 KB come paced by their echoes.
        tmp = self.tmp()
        token = "jsm-turns-%d" % random.randrange(1 << 30)
        task = 'class Task:\n    def run(self, job):\n        return {"pad": "x" * 3000}\n'
        assets = js_master_assets(tmp, {**DEFAULT_FILES, "/workplace/task.py": task})
        count = 100
        master = await self.started(JsProcess("master.js", {
            "QX_TOKEN": token, "QX_KEY": KEY, "QX_JOBS": str(count), "QX_ASSETS": str(assets),
            "QX_TURN_LIMIT": "16384", "QX_READ_PAUSE_MS": "100"}))
        worker = await self.started(loopback_worker(token, tmp / "w", "py", get_batch=True, batch_size=10,
                                                    peers=["127.0.0.1:%d" % master.ready["port"]]))

        def seen(kind):
            return [e for e in master.events if e["event"] == kind]
        await until(lambda: seen("stalled") or len(seen("result")) >= count, 90)
        self.assertEqual(seen("stalled"), [])
        self.assertEqual(sorted(e["result"]["jobID"] for e in seen("result")), list(range(count)))
        self.assertGreater(worker.node.stats["waits for echo room"], 0)  # results waited in the journal

    @time_limit(150)
    async def test_a_js_master_that_stopped_writing_to_its_wire_is_found_again_on_a_new_one(self):
        # issue 20: a batch answer over QX_TURN_LIMIT stalls the wire for good (the original JS
        # master's own stall, which no pacing of ours prevents): that batch is lost with it (a
        # JS master has no leases), but once requestWork times out the wire, silent since, is
        # closed and dialed again, and the jobs after it come.
        tmp = self.tmp()
        token = "jsm-renew-%d" % random.randrange(1 << 30)
        master = await self.started(JsProcess("master.js", {
            "QX_TOKEN": token, "QX_KEY": KEY, "QX_ASSETS": str(js_master_assets(tmp)), "QX_TURN_LIMIT": "16384"}))
        for i in range(30):  # the first batch of 10 is ~27 KB, the rest small
            master.send(cmd="push", job={"id": i, "data": json.dumps({"x": i, "pad": "x" * (2000 if i < 10 else 0)})})
        worker = await self.started(loopback_worker(token, tmp / "w", "py", get_batch=True, batch_size=10,
                                                    peers=["127.0.0.1:%d" % master.ready["port"]]))

        def seen(kind):
            return [e for e in master.events if e["event"] == kind]
        await master.wait_for(lambda e: e["event"] == "stalled", 30)
        await until(lambda: len(seen("result")) >= 20, 90)
        self.assertEqual(sorted(e["result"]["jobID"] for e in seen("result")), list(range(10, 30)))
        self.assertEqual(worker.node.stats["silent wires renewed"], 1)

    async def test_js_master_answers_ping_and_same(self):
        tmp = self.tmp()
        master = await self.started(JsProcess("master.js", {"QX_TOKEN": "jsm-same", "QX_KEY": KEY,
                                                            "QX_ASSETS": str(js_master_assets(tmp))}))
        worker = await self.started(loopback_worker("jsm-same", tmp / "w", "py",
                                                    peers=["127.0.0.1:%d" % master.ready["port"]]))
        await until(lambda: worker.keeper.runner is not None)
        self.assertTrue(await worker.sync_assets())

        def asked():
            return [e for e in master.events if e["event"] == "rpc" and e["call"] == "requestExecAssets"]
        await until(lambda: len(asked()) >= 2, 10)  # the harness prints its line as it answers
        statuses = asked()
        self.assertEqual(len(statuses), 2)
        self.assertEqual(statuses[1]["args"]["currentHash"], worker.current_hash())


# The command line, as users run it ##########################################

class TestCommandLine(AsyncTest):
    def test_setup_through_stdin(self):
        with tempfile.TemporaryDirectory() as tmp:
            env = Path(tmp) / ".env"
            env.write_text("name=pi-1\n")
            key = "A" * 32
            done = subprocess.run([sys.executable, WORKER_PY, "--setup", "--env", str(env)],
                                  input="%s\n%s\n\ny\n\n" % ("B" * 31, key), capture_output=True, text=True,
                                  timeout=30, check=True)
            self.assertIn("that is 31 characters: transferEncryptToken is exactly 32", done.stdout)
            self.assertNotIn("B" * 31, done.stdout)  # a key typed wrong is not shown either
            values = w.read_env_file(env)
            self.assertEqual(values["transferEncryptToken"], key)
            self.assertGreaterEqual(len(values["token"]), 20)
            self.assertEqual(values["name"], "pi-1")
            self.assertNotIn("master", values)
            self.assertEqual(env.stat().st_mode & 0o777, 0o600)
            pin = w.Identity().address  # again, pinning a master's address this time
            done = subprocess.run([sys.executable, WORKER_PY, "--setup", "--env", str(env)],
                                  input="\n\nnot an address\n%s\n" % pin, capture_output=True, text=True,
                                  timeout=30, check=True)
            self.assertIn("that is not a bugout address", done.stdout)
            self.assertNotIn("new swarm", done.stdout)  # the current values are kept
            self.assertEqual(w.read_env_file(env)["master"], pin)
            self.assertEqual(w.read_env_file(env)["transferEncryptToken"], key)

    def test_setup_asks_before_it_makes_a_new_swarm(self):
        # issue 25: an empty answer (or Ctrl-D) made a random key without a word, and a worker with a
        # random key never joins an existing swarm
        with tempfile.TemporaryDirectory() as tmp:
            env = Path(tmp) / ".env"
            done = subprocess.run([sys.executable, WORKER_PY, "--setup", "--env", str(env)], input="\nn\n\nyes\n\n\n",
                                  capture_output=True, text=True, timeout=30, check=True)
            self.assertEqual(done.stdout.count("does this start a new swarm"), 2, done.stdout)  # no, then yes
            self.assertIn("for a new swarm: give its master the same token and transferEncryptToken", done.stdout)
            values = w.read_env_file(env)
            self.assertEqual(len(values["transferEncryptToken"]), 32)
            self.assertGreaterEqual(len(values["token"]), 20)
            env.write_text("name=pi-1\n")
            for answers in ("", "\n", "\nno\n"):  # end of input at the key, at the question, at the key again
                done = subprocess.run([sys.executable, WORKER_PY, "--setup", "--env", str(env)], input=answers,
                                      capture_output=True, text=True, timeout=30, check=False)
                self.assertEqual((done.returncode, done.stderr), (
                    1, "worker.py --setup: no answer (end of input); %s is unchanged\n" % env), answers)
                self.assertEqual(env.read_text(), "name=pi-1\n")

    def test_setup_on_a_terminal_hides_the_key_and_a_ctrl_c_or_ctrl_d_writes_nothing(self):
        # issue 25: the key was echoed as typed, Ctrl-C printed a KeyboardInterrupt traceback
        with tempfile.TemporaryDirectory() as tmp:
            env = Path(tmp) / ".env"
            term = self.enterContext(Terminal(WORKER_PY, "--setup", "--env", str(env)))
            term.answer("transferEncryptToken (exactly 32 characters; not shown): ", "C" * 31)
            term.answer("transferEncryptToken (exactly 32 characters; not shown): ", KEY)
            term.answer("token (at least 20 characters): ", "t" * 24)
            term.answer("empty: any master that proves the key): ", "")
            self.assertEqual(term.wait(), 0, term.text())
            self.assertIn("that is 31 characters: transferEncryptToken is exactly 32", term.text())
            self.assertNotIn("C" * 31, term.text())
            self.assertNotIn(KEY, term.text())
            self.assertIn("t" * 24, term.text())  # the token is public: it is shown as typed
            self.assertEqual(w.read_env_file(env)["transferEncryptToken"], KEY)
            before = env.read_text()
            for key, words, status in (("\x03", "interrupted", 130), ("\x04", "no answer (end of input)", 1)):
                term = self.enterContext(Terminal(WORKER_PY, "--setup", "--env", str(env)))
                term.answer("not shown): ", key, end="")
                self.assertEqual(term.wait(), status, term.text())
                self.assertNotIn("Traceback", term.text())
                self.assertEqual(term.text().strip().splitlines()[-1],
                                 "worker.py --setup: %s; %s is unchanged" % (words, env))
                self.assertEqual(env.read_text(), before)

    def test_a_bad_setting_is_one_line_and_exit_2(self):
        # issue 25: tracebacks at start (statusPort, logFile), a dial that never came (peers), another
        # port (port), values taken as they were (getBatch)
        for key, value, words in (("statusPort", "99999", "statusPort='99999': give a TCP port, 1 to 65535"),
                                  ("logFile", "/nonexistent/worker.log",
                                   "logFile='/nonexistent/worker.log': cannot write it (No such file or directory)"),
                                  ("peers", "127.0.0.1:99999", "peers='127.0.0.1:99999': give host:port"),
                                  ("port", "70000", "port='70000': give a TCP port, 0 (any free one) to 65535"),
                                  ("getBatch", "maybe", "getBatch='maybe': give true or false")):
            with tempfile.TemporaryDirectory() as tmp, self.subTest(key):
                write_loopback_env(tmp, "bad-settings-swarm", **{key: value})
                done = subprocess.run([sys.executable, WORKER_PY], check=False, cwd=tmp, capture_output=True,
                                      text=True, timeout=30, env=clean_env())
                self.assertEqual(done.returncode, 2)
                self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)  # one line, no traceback
                self.assertTrue(done.stderr.startswith("worker.py: " + words), done.stderr)

    async def test_damaged_state_is_moved_aside_and_the_worker_starts(self):
        # issue 25: each of these stopped every start (a RecursionError traceback, or exit 2)
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        cluster.push(3)
        folder = tmp / "wp"
        folder.mkdir()
        deep = "[" * 100_000 + "]" * 100_000
        (folder / ".results.json").write_text(deep)
        (folder / ".assets.json").write_text(deep)
        (folder / w.JOURNAL_NAME).mkdir()
        (folder / (w.JOURNAL_NAME + ".lock")).mkdir()
        write_loopback_env(folder, cluster.token, peers="127.0.0.1:%d" % cluster.master.port)
        proc = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, WORKER_PY, cwd=folder, env=clean_env(), stderr=subprocess.PIPE))
        await cluster.until_results(3, 30)
        proc.send_signal(15)
        _, errors = await asyncio.wait_for(proc.communicate(), 30)
        self.assertEqual(proc.returncode, 0, errors.decode())
        moved = [line for line in errors.decode().splitlines() if "moved aside" in line]
        self.assertEqual(len(moved), 4, errors.decode())  # one line each
        self.assertEqual(len(list(folder.glob("*.bad-*"))), 4)

    def test_missing_token_or_bad_key_exit_2(self):
        with tempfile.TemporaryDirectory() as tmp:
            for text, message in (("transferEncryptToken=%s\n" % ("k" * 32), "no token"),
                                  ("token=%s\ntransferEncryptToken=short\n" % ("t" * 20), "exactly 32")):
                (Path(tmp) / ".env").write_text(text)
                done = subprocess.run([sys.executable, WORKER_PY], check=False, cwd=tmp, capture_output=True,
                                      text=True, timeout=30, env=clean_env())
                self.assertEqual(done.returncode, 2)
                self.assertIn(message, done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1)

    def test_help_and_version(self):
        done = subprocess.run([sys.executable, WORKER_PY, "--version"], capture_output=True, text=True,
                              check=True, timeout=30)
        self.assertIn(w.__version__, done.stdout)
        done = subprocess.run([sys.executable, WORKER_PY, "--help"], capture_output=True, text=True,
                              check=True, timeout=30)
        self.assertIn("--setup", done.stdout)

    def test_demo_exits_0_and_its_last_line_is_json(self):
        # -X importtime: worker.py never imports master.py (issue 24: master.py imports worker.py; the
        # demo runs it as a process). The environment's settings reach neither side (a master.py
        # that read this token would never meet the demo's worker).
        done = subprocess.run([sys.executable, "-X", "importtime", WORKER_PY, "--demo"], check=False,
                              capture_output=True, text=True, timeout=120, cwd=HERE,
                              env={**clean_env(), "token": "a-token-from-the-environment"})
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                    if line.startswith("import time:")]
        self.assertIn("asyncio", imported)
        self.assertNotIn("master", imported)
        self.assertNotIn("\r", done.stdout)  # not a terminal: no progress redrawn in place (issue 23)
        started, summary, next_step, last = done.stdout.splitlines()  # issue 25: JSON, and what to try next
        self.assertRegex(started, r"^demo: master.py on 127\.0\.0\.1:\d+, 200 jobs, worker b\w+$")
        self.assertRegex(summary, r"^demo: 200/200 jobs in [0-9.]+ s \(\d+ jobs/s\), all results right$")
        self.assertEqual(next_step, w.DEMO_NEXT)
        self.assertEqual(json.loads(last)["result"]["data"], {"bound": 29900, "primes": 3238})
        self.assertEqual(json.loads(last)["result"]["jobID"], 199)
        # what the README shows the demo print, but for addresses, ports and times (issue 25)
        shown = (HERE / "README.md").read_text().split("result as master.py prints it, in JSON:\n\n", 1)[1]
        shown = [line[4:] for line in itertools.takewhile(lambda line: line.startswith("    "), shown.splitlines())]
        varying = functools.partial(re.sub, r"\bb[1-9A-HJ-NP-Za-km-z]{25,40}\b|\d+(\.\d+)?", "#")
        self.assertEqual([varying(line) for line in shown], [varying(line) for line in done.stdout.splitlines()])

    def test_the_demo_without_master_py_is_one_line(self):
        """What a user who copied only worker.py to a Pi sees."""
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(WORKER_PY, tmp)
            done = subprocess.run([sys.executable, str(Path(tmp) / "worker.py"), "--demo"], check=False,
                                  capture_output=True, text=True, timeout=60, cwd=tmp, env=clean_env())
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stderr, "worker.py --demo runs master.py, which is not in %s: run the demo in a "
                         "clone of the project\n" % Path(tmp).resolve())

    @time_limit(90)
    async def test_master_py_in_its_folder_and_a_worker_with_a_copy_of_its_env_beside_it_meet(self):
        # issue 25: master.py wrote seed= into the .env, the worker read it too, and the two took
        # one address and never met (0 results, nothing said on either side)
        tmp = self.tmp()
        clone, beside = tmp / "clone", tmp / "worker"
        for folder in (clone, beside):
            folder.mkdir()
        write_loopback_env(clone, "readme-pair-%d" % random.randrange(1 << 30))
        (clone / "task.py").write_text(readme_task())
        (clone / "jobs.jsonl").write_text("".join(json.dumps({"id": i, "data": json.dumps({"x": i, "y": 1})}) + "\n"
                                                  for i in range(20)))
        master = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, MASTER_PY, "--task", "task.py", "--jobs", "jobs.jsonl", cwd=clone, env=clean_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        ready = json.loads(await master.stdout.readline())
        shutil.copy(clone / ".env", beside / ".env")  # as the README says: a copy of .env
        with (beside / ".env").open("a") as env:
            env.write("peers=127.0.0.1:%d\n" % ready["port"])  # LSD does it on a LAN
        self.will_kill(await asyncio.create_subprocess_exec(sys.executable, WORKER_PY, cwd=beside, env=clean_env(),
                                                            stderr=subprocess.DEVNULL))
        out, err = await asyncio.wait_for(master.communicate(), 60)
        self.assertEqual(master.returncode, 0, err.decode())
        events = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(sorted(e["result"]["data"]["sum"] for e in events if e["event"] == "result"),
                         list(range(1, 21)))
        self.assertEqual(events[-1]["workers"][0]["results"], 20)
        self.assertNotEqual(events[-1]["workers"][0]["id"], ready["address"])

    @time_limit(90)
    async def test_a_worker_in_master_py_s_folder_or_master_py_in_a_worker_s_is_refused_in_one_line(self):
        # issue 25: a worker writes the master's files into its folder: in master.py's own folder it
        # writes over the files master.py serves, and deletes them when the task fails to load
        tmp = self.tmp()
        token, clone, other = "one-folder-%d" % random.randrange(1 << 30), tmp / "clone", tmp / "other"
        for folder in (clone, other):
            folder.mkdir()
            write_loopback_env(folder, token)
            (folder / "task.py").write_text(readme_task())
        master = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, MASTER_PY, "--task", "task.py", cwd=clone, env=clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL))
        self.assertEqual(json.loads(await master.stdout.readline())["event"], "ready")
        done = await asyncio.to_thread(subprocess.run, [sys.executable, WORKER_PY], cwd=clone, env=clean_env(),
                                       capture_output=True, text=True, timeout=30, check=False)
        self.assertEqual((done.returncode, len(done.stderr.splitlines())), (2, 1), done.stderr)
        self.assertTrue(done.stderr.startswith("worker.py: %s holds master.db, master.py's queue: " % clone.resolve()),
                        done.stderr)
        self.assertIn("run the worker in a folder of its own with a copy of .env", done.stderr)
        self.assertFalse((clone / w.JOURNAL_NAME).exists())  # it touched nothing
        # the other way round: master.py where a worker runs
        self.will_kill(await asyncio.create_subprocess_exec(sys.executable, WORKER_PY, cwd=other, env=clean_env(),
                                                            stderr=subprocess.DEVNULL))
        await until(lambda: (other / w.JOURNAL_NAME).exists(), 20)
        before = (other / ".env").read_text()
        done = await asyncio.to_thread(subprocess.run, [sys.executable, MASTER_PY, "--task", "task.py"], cwd=other,
                                       env=clean_env(), capture_output=True, text=True, timeout=30, check=False)
        self.assertEqual((done.returncode, len(done.stderr.splitlines()), done.stdout), (2, 1, ""), done.stderr)
        self.assertIn("a worker.py keeps its journal (%s) in %s, where the --task files are" % (
            w.JOURNAL_NAME, other.resolve()), done.stderr)
        self.assertEqual((other / ".env").read_text(), before)  # nothing written: no masterSeed either
        self.assertFalse((other / "master.db").exists())

    async def sigterm_with_held_jobs(self, start, files=None):
        """A worker that ``start(folder)`` runs gets 10 jobs of 0.3 s, then SIGTERM: its folder,
        results and output, once it exited 0 with every result delivered."""
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        cluster.push(10, sleep=0.3)
        folder = tmp / "wp"
        folder.mkdir()
        for name, text in (files or {}).items():
            (folder / name).write_text(text)
        write_loopback_env(folder, cluster.token, peers="127.0.0.1:%d" % cluster.master.port,
                           getBatch="true", batchSize=10, LOG_LEVEL="info")
        proc = self.will_kill(await start(folder))
        await until(lambda: cluster.master.stats["jobs handed out"] == 10 and len(cluster.results) >= 1
                    or proc.returncode is not None, 30)
        if proc.returncode is not None:
            self.fail("the worker ended at start:\n%s" % (await proc.stdout.read()).decode()[-3000:])
        proc.send_signal(15)
        output, _ = await asyncio.wait_for(proc.communicate(), 30)
        self.assertEqual(proc.returncode, 0, output.decode())
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), list(range(10)))
        return folder, cluster.results, output

    async def test_sigterm_finishes_and_delivers_held_jobs(self):
        _, _, output = await self.sigterm_with_held_jobs(lambda folder: asyncio.create_subprocess_exec(
            sys.executable, WORKER_PY, cwd=folder, env=clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT))
        self.assertIn(b"stopping", output)

    async def test_the_readme_unit_imports_nothing_from_the_folder_and_finishes_held_jobs(self):
        # issue 23: "python -m worker" put the worker folder first on the import path: a master's
        # file named queue.py crashed start-up, and the unit's Restart= made a loop of it. The
        # SIGTERM is the worker's alone, as KillMode=mixed sends it: its task children finish.
        folder, results, _ = await self.sigterm_with_held_jobs(
            lambda folder: unit_process(folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
            files={"queue.py": "# a master's file, not the standard library's queue\n"})
        self.assertTrue(all("error" not in r for r in results), results)
        self.assertEqual(file_mode(folder / w.JOURNAL_NAME), "0o600")  # UMask=0077, and 0600 anyway

    def test_the_readme_unit_and_pi_steps(self):
        """What interop/compat.sh runs and checks with systemd-analyze, read here for what users rely on."""
        unit = readme_unit()
        one = {key: values[-1] for key, values in unit.items()}
        user = one["User"]
        self.assertNotIn(user, ("pi", "root"))  # the Imager's first user has passwordless sudo
        self.assertEqual(one["Group"], user)
        self.assertEqual(one["WorkingDirectory"], "/var/lib/" + one["StateDirectory"])
        self.assertEqual(one["StateDirectoryMode"], "0700")
        self.assertRegex(one["ExecStart"], r"^/\S+/python -P -m worker$")  # never imports from the folder
        environment = " ".join(unit["Environment"]).split()
        self.assertIn("PYTHONSAFEPATH=1", environment)  # the task children too
        installed = Path(one["ExecStart"].split()[0]).parents[2]
        self.assertIn("PYTHONPATH=%s" % installed, environment)
        expected = {"KillMode": "mixed", "Restart": "always", "Type": "notify", "NotifyAccess": "main",
                    "UMask": "0077", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                    "PrivateTmp": "yes", "CapabilityBoundingSet": ""}
        self.assertEqual({key: one.get(key) for key in expected}, expected)
        self.assertGreater(int(one["TimeoutStopSec"]), w.Settings.load({}).stop_timeout)
        self.assertNotIn("MemoryDenyWriteExecute", unit)  # node's JIT writes the code it runs
        self.assertNotIn("ReadOnlyPaths", unit)  # the folder must stay writable: pip, npm, the journal
        for block in ("pi-64", "pi-32"):
            steps = readme_block(block)
            self.assertIn("useradd --system --home-dir %s --shell /usr/sbin/nologin %s\n"
                          % (one["WorkingDirectory"], user), steps)
            self.assertNotRegex(steps, r"usermod|adduser|sudoers|-G sudo")  # not a sudoer
            self.assertIn("install -d -o %s -g %s -m 0700 %s\n" % (user, user, one["WorkingDirectory"]), steps)
            self.assertIn("%s/venv/bin/python -m compileall -q %s/worker.py\n" % (installed, installed), steps)
        self.assertIn("pip install", readme_block("pi-64"))
        self.assertNotIn("pip", readme_block("pi-32"))  # no compiler on 32-bit Pi OS: Debian's packages
        self.assertIn("venv --system-site-packages", readme_block("pi-32"))

    async def test_a_timed_out_job_does_not_hold_the_process_at_exit(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp, files={"/workplace/task.py": LOOP_TASK_PY}))
        cluster.push(1, hang=60)
        folder = tmp / "wp"
        folder.mkdir()
        write_loopback_env(folder, cluster.token, peers="127.0.0.1:%d" % cluster.master.port,
                           jobTimeout=1)
        proc = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, WORKER_PY, cwd=folder, env=clean_env(), stderr=subprocess.DEVNULL))
        await cluster.until_results(1, 30)
        self.assertEqual(cluster.results[0]["error"]["type"], "TimeoutError")
        proc.send_signal(15)
        self.assertEqual(await asyncio.wait_for(proc.wait(), 15), 0)  # not after the 60 s job

    async def test_second_sigterm_exits_at_once(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        cluster.push(10, sleep=2.0)
        folder = tmp / "wp"
        folder.mkdir()
        write_loopback_env(folder, cluster.token, peers="127.0.0.1:%d" % cluster.master.port,
                           getBatch="true", batchSize=5)
        proc = self.will_kill(await asyncio.create_subprocess_exec(
            sys.executable, WORKER_PY, cwd=folder, env=clean_env(), stderr=subprocess.DEVNULL))
        await until(lambda: cluster.master.stats["jobs handed out"] >= 5, 30)
        proc.send_signal(15)
        await asyncio.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(15)
        code = await asyncio.wait_for(proc.wait(), 5)
        self.assertEqual(code, 130)
        self.assertLess(time.monotonic() - started, 2.0)  # not the 10 s the batch needs


# Faults: kill -9, floods ####################################################

class TestFaults(AsyncTest):
    TIME_LIMIT = 120.0

    async def test_worker_killed_mid_batch_jobs_requeued_each_answered_once(self):
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp))
        cluster.master.lease_seconds = 5.0
        cluster.push(30, sleep=0.05)
        folder = tmp / "victim"
        folder.mkdir()
        write_loopback_env(folder, cluster.token, peers="127.0.0.1:%d" % cluster.master.port,
                           getBatch="true", batchSize=10, LOG_LEVEL="warn")
        victim = self.will_kill(await asyncio.create_subprocess_exec(sys.executable, WORKER_PY, cwd=folder,
                                                                     env=clean_env()))
        await until(lambda: len(cluster.results) >= 3, 30)
        victim.kill()  # SIGKILL, mid-batch
        await victim.wait()
        await until(lambda: cluster.master.stats["jobs requeued"] > 0, 15)
        await self.started(cluster.worker("rescuer", get_batch=True, batch_size=10))
        await cluster.until_results(30, 60)
        ids = [r["jobID"] for r in cluster.results]
        self.assertEqual(sorted(ids), list(range(30)))  # each job answered once
        self.assertEqual(cluster.master.leases, {})

    async def test_master_killed_worker_keeps_results_for_the_next_master(self):
        tmp = self.tmp()
        token, port, seed = "kill-master-%d" % random.randrange(1 << 30), free_port(), w.make_seed()
        first = await self.started(MasterProcess(tmp / "m1", token, port, seed))
        first.push(range(6), sleep=0.4)  # JS rule: a batch of 5 while more than 5 wait
        await asyncio.sleep(3.0)  # the master has read them all before the worker asks
        worker = await self.started(loopback_worker(token, tmp / "w", "survivor", get_batch=True,
                                                    batch_size=5, peers=["127.0.0.1:%d" % port]))
        await until(lambda: len(worker.jobs) >= 3, 30)
        await first.kill()  # SIGKILL while the worker holds the batch
        await until(lambda: worker.stats["jobs done"] + worker.stats["jobs failed"] >= 5, 30)
        self.assertGreaterEqual(len(worker.outbox), 1)  # kept, nobody to give them to
        # the same command again: its master.db continues the run, whose jobs these results answer
        second = await self.started(MasterProcess(tmp / "m1", token, port, seed))
        await until(lambda: len(first.results) + len(second.results) >= 5, 60)
        self.assertEqual(sorted(r["jobID"] for r in first.results + second.results), list(range(5)))
        self.assertTrue(second.results)
        # the master prints a result before its acknowledgement reaches the worker
        await until(lambda: not worker.outbox.held, 10)

    async def test_master_py_killed_and_started_at_once_is_adopted_again_at_once(self):
        # issue 25: after kill -9 and a restart at once the first new result came after 30 s: the
        # worker's isMaster went boxed for the dead process's key, unanswered, until the idle timer.
        # Now it goes again for the new key as soon as a packet the new process signed shows it.
        tmp = self.tmp()
        token, port, seed = "restart-%d" % random.randrange(1 << 30), free_port(), w.make_seed()
        first = await self.started(MasterProcess(tmp / "m", token, port, seed))
        worker = await self.started(loopback_worker(token, tmp / "w", "w", peers=["127.0.0.1:%d" % port]))
        first.push(range(3))
        await until(lambda: len(first.results) >= 3, 30)
        await first.kill()
        await until(lambda: worker.master is None, 10)
        second = await self.started(MasterProcess(tmp / "m", token, port, seed))  # the same run goes on
        ready = time.monotonic()
        second.push(range(3, 6))
        # well within CHECK_TIMEOUT, the only other way back (with the 30 s idle timer after it)
        await until(lambda: len(second.results) >= 3, w.CHECK_TIMEOUT - 2)
        print("\n  master.py killed and started again: results again %.1f s after its ready line"
              % (time.monotonic() - ready), file=sys.stderr)

    async def test_held_results_are_not_given_to_another_run_of_master_py_at_the_same_address(self):
        # issue 25: the same address, a new master.db (or a new jobs file): job 0 is another job there
        tmp = self.tmp()
        token, port, seed = "other-run-%d" % random.randrange(1 << 30), free_port(), w.make_seed()
        first = await self.started(QuietMaster(tmp, token, port, seed, "m", db=tmp / "run1.db"))
        first.push(range(6), y=1000, sleep=0.3)  # JS rule: a batch of 5 while more than 5 wait
        worker = await self.started(loopback_worker(token, tmp / "w", "w", get_batch=True, batch_size=5,
                                                    peers=["127.0.0.1:%d" % port]))
        await until(lambda: len(worker.jobs) >= 3, 30)
        await first.close()
        await until(lambda: worker.stats["jobs done"] >= 5 and not worker.jobs and not worker.job_loop.running, 30)
        held = len(worker.outbox)
        self.assertGreaterEqual(held, 3)
        second = await self.started(QuietMaster(tmp, token, port, seed, "m", db=tmp / "run2.db"))
        second.push(range(6))  # the same ids, other jobs
        await until(lambda: len(second.results) >= 6, 30)
        self.assertEqual(sorted((r["jobID"], r["data"]["sum"]) for r in second.results), [(i, 2 * i) for i in range(6)])
        self.assertEqual(len(worker.outbox), held)
        self.assertEqual(second.master.stats["results of another run refused"], 0)  # never even offered

    async def test_flood_of_garbage_and_replays_others_go_on(self):
        cluster = await self.started(Cluster(self.tmp()))
        master = cluster.master
        master.node.core._seen.limit = 2000
        worker = await self.started(cluster.worker())
        await until(lambda: worker.keeper.runner is not None)
        infohash = master.node.infohash
        replay_core = w.BugoutCore(master.node.identifier, w.Identity())
        now = w._now()
        replay_core.send_ping(now)
        [(valid, _)] = replay_core.data_to_send()
        rng = random.Random(5)
        stop = time.monotonic() + 4.0
        flooders = []

        async def flood(kind):
            sent = 0
            while time.monotonic() < stop:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", master.port)
                    hello = w.handshake_bytes(infohash, b"-FL0000-" + os.urandom(6).hex().encode())
                    writer.write(hello + w.frame(20, b"\0" + w.bencode({"m": {"bo_channel": 4}})))
                    while time.monotonic() < stop and not writer.is_closing():
                        if kind == "replay":
                            payload = valid
                        else:
                            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
                        writer.write(w.frame(20, b"\4" + payload))
                        sent += 1
                        if sent % 50 == 0:
                            await writer.drain()
                    writer.close()
                except (ConnectionError, OSError):
                    await asyncio.sleep(0.01)
            return sent
        flooders = [asyncio.ensure_future(flood(k)) for k in ("replay", "garbage", "garbage")]
        cluster.push(200)
        await cluster.until_results(200, 60)
        sent = sum(await asyncio.gather(*flooders))
        self.assertGreater(sent, 1000)
        self.assertLessEqual(len(master.node.core._seen), 2000)
        self.assertGreater(master.node.core.stats["duplicate"] + master.node.core.stats["dropped"], 1000)
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), list(range(200)))


# master.py: who gets work (issue 22) ########################################

class TestLeasePolicy(unittest.TestCase):
    """master.py's LeasePolicy in memory, with a clock of our own."""

    def policy(self):
        from master import LeasePolicy
        return LeasePolicy()

    def test_a_proven_worker_gets_what_it_asks_up_to_the_js_cap(self):
        policy = self.policy()
        self.assertTrue(policy.prove("py"))
        self.assertFalse(policy.prove("py"))  # known already
        self.assertEqual(policy.grant("py", 5000, 10_000), 1000)
        policy.leased("py", 1000, 0, 60.0, 0.0)
        self.assertEqual(policy.grant("py", 1000, 10_000), 1000)  # its holdings do not count
        self.assertEqual(policy.held, 0)
        self.assertEqual(policy.accepted("py", [("1", "js", True), (None, None, False), ("2", None, False)]),
                         [True, True, True])

    def test_without_proof_one_batch_first_more_for_each_result_halved_for_lost_leases(self):
        policy = self.policy()
        self.assertEqual(policy.grant("js", 1000, 10_000), 10)
        policy.leased("js", 10, 0, 60.0, 0.0)
        self.assertEqual(policy.grant("js", 1000, 10_000), 0)  # it holds its allowance
        policy.taken("js", ["js"] * 10, [True] * 10)  # ten results for its own jobs
        self.assertEqual((policy.standing("js").allowance, policy.standing("js").held), (20, 0))
        self.assertEqual(policy.grant("js", 1000, 10_000), 20)
        policy.leased("js", 20, 0, 62.0, 2.0)
        policy.ended("js", 20)  # it left, or its leases ran out
        self.assertEqual((policy.standing("js").allowance, policy.standing("js").held), (10, 0))
        for _ in range(10):
            policy.leased("js", 1, 0, 70.0, 10.0)
            policy.ended("js", 1)
        self.assertEqual(policy.standing("js").allowance, 1)  # never below one job
        policy.taken("js", [None, "js"], [True, True])  # a job that waited again: no merit
        self.assertEqual(policy.standing("js").allowance, 2)
        policy.leased("js", 1, 0, 70.0, 10.0)
        self.assertTrue(policy.prove("js"))  # proven at last: what it holds no longer counts
        self.assertEqual((policy.held, policy.standing("js")), (0, None))

    def test_new_identities_buy_nothing_and_a_peer_that_delivers_keeps_its_place(self):
        from master import FIRST_ALLOWANCE, MAX_STANDINGS, NEWCOMER_SHARE, UNPROVEN_SHARE
        policy = self.policy()
        outstanding = 2000
        policy.leased("js", policy.grant("js", 10, outstanding), 0, 60.0, 0.0)
        policy.taken("js", ["js"] * 10, [True] * 10)  # it delivered its first batch
        got = {}
        for i in range(5000):  # a flood of fresh identities, each asking the JS cap
            address = "attacker-%d" % i
            got[address] = policy.grant(address, 1000, outstanding)
            policy.leased(address, got[address], 0, 60.0 + i, float(i))
        self.assertEqual(sum(got.values()), int(NEWCOMER_SHARE * outstanding))  # 40 of 2,000
        self.assertEqual(policy.held_new, 40)
        self.assertEqual(policy.grant("js", 10, outstanding), 10)  # the JS worker: its batch
        for left in (100, 20, 1):  # to the last jobs of a run
            self.assertEqual(policy.grant("js", 10, left), 10)
            self.assertEqual(policy.grant("attacker-new", 10, left), 0)
        grows = self.policy()  # those that deliver, together: UNPROVEN_SHARE at most
        for i in range(100):
            grows.leased("js%d" % i, 1, 0, 60.0, 0.0)
            grows.taken("js%d" % i, ["js%d" % i], [True])
        for i in range(100):
            grows.leased("js%d" % i, grows.grant("js%d" % i, 1000, outstanding), 0, 61.0, 1.0)
        self.assertEqual(grows.held_known, int(UNPROVEN_SHARE * outstanding))
        small = self.policy()  # a small queue: one batch still, never more
        self.assertEqual(small.grant("a", 1000, 3), FIRST_ALLOWANCE)
        small.leased("js", 1, 0, 60.0, 0.0)
        small.taken("js", ["js"], [True])
        for i in range(3 * MAX_STANDINGS):  # identities that take a job each and lose it: bounded
            address = "loser-%d" % i
            self.assertEqual(small.grant(address, 1, outstanding), 1)
            small.leased(address, 1, 0, 100.0, 1.0 + i)
            small.ended(address, 1)
        self.assertEqual(len(small._standings), MAX_STANDINGS)
        self.assertEqual(small.standing("js").answered, 1)  # it delivered: kept before those

    def test_results_are_taken_only_for_the_peers_own_jobs_and_in_the_workers_shape(self):
        policy = self.policy()
        policy.leased("js", 2, 1, 60.0, 0.0)  # two jobs with an id, one without
        results = [("1", "js", True), ("2", "py", True), ("3", None, True), ("1", "js", False),
                   (None, None, True), (None, None, True)]
        self.assertEqual(policy.accepted("js", results), [True, False, False, False, True, False])
        self.assertEqual(policy.accepted("stranger", results), [False] * 6)
        policy.leased("other", 1, 0, 60.0, 0.0)
        policy.prove("py")
        policy.taken("py", ["other"], [True])  # a proven worker's result ends another's lease
        self.assertEqual((policy.standing("other").held, policy.standing("other").allowance), (0, 10))
        policy.taken("js", ["js", None], [True, False])
        self.assertEqual((policy.standing("js").held, len(policy.standing("js").loose)), (1, 0))
        self.assertEqual(policy.standing("js").answered, 2)

    def test_jobs_without_id_count_until_their_time_and_quiet_peers_are_forgotten(self):
        from master import STANDING_SECONDS
        policy = self.policy()
        policy.leased("js", 0, 10, 60.0, 0.0)  # no lease ends them: they count 60 s
        self.assertEqual((policy.held, policy.grant("js", 10, 1000)), (10, 0))
        policy.expire(59.0)
        self.assertEqual(policy.held, 10)
        policy.expire(60.0)  # as leases that ended without a result
        self.assertEqual((policy.held, policy.standing("js").allowance), (0, 5))
        policy.expire(60.0 + STANDING_SECONDS)
        self.assertIsNone(policy.standing("js"))

    def test_the_counts_follow_the_database(self):
        policy = self.policy()
        policy.prove("py")
        policy.leased("js", 5, 0, 60.0, 0.0)
        policy.restore({"js": 3, "py": 100, "old": 7})  # a restart, or a rollback
        self.assertEqual((policy.standing("js").held, policy.standing("old").held), (3, 7))
        self.assertIsNone(policy.standing("py"))
        self.assertEqual(policy.held, 10)

    def test_worker_reports_are_news_once_per_change_within_a_budget(self):
        from master import MAX_PROVEN_WORKERS, WORKER_ERROR_BURST, WORKER_ERROR_GAP, WorkerReports
        reports, now = WorkerReports(), 1000.0
        self.assertEqual(reports.news("w1", "files", "SyntaxError", now), 0)
        self.assertIsNone(reports.news("w1", "files", "SyntaxError", now + 60))  # told before
        self.assertEqual(reports.news("w2", "files", "SyntaxError", now), 0)  # another worker
        self.assertEqual(reports.news("w1", "files 2", "SyntaxError", now), 0)  # other files
        self.assertEqual(reports.news("w1", "files 2", "ImportError", now), 0)  # another reason
        shown = sum(reports.news("w%d" % i, "f", "e", now) is not None for i in range(100))
        self.assertEqual(shown, WORKER_ERROR_BURST - 4)
        self.assertEqual(reports.news("w100", "f", "e", now + WORKER_ERROR_GAP), 100 - shown)  # says how many
        self.assertIsNone(reports.news("w101", "f", "e", now + WORKER_ERROR_GAP))
        for i in range(2 * MAX_PROVEN_WORKERS):
            reports.news("x%d" % i, "f", "e", now)
        self.assertEqual(len(reports._told), MAX_PROVEN_WORKERS)


# master.py: announces, requeues, late results, the --jobs feeder ############

class TestMasterPy(AsyncTest):
    async def idle_worker(self, cluster, times, **kw):
        """A worker that has asked for work, and got none: it waits for a nudge or 30 s."""
        worker = await self.started(cluster.worker(**kw))
        await until(lambda: any(a == worker.address for _, a in times))
        return worker

    async def test_job_pushed_within_the_announce_gap_reaches_an_idle_worker(self):
        cluster = await self.started(Cluster(self.tmp()))
        times = watch_requests(cluster.master)
        await self.idle_worker(cluster, times)
        asked = len(times)
        cluster.push(1)  # announced: the worker asks, runs it, asks again and gets none
        await until(lambda: len(times) >= asked + 2 and cluster.results, 10)
        cluster.master._last_announce = time.monotonic()  # an announce just went out
        cluster.push(1, start=1)  # too soon for one more now: it must follow, not be dropped
        await cluster.until_results(2, 5)  # not the worker's 30 s idle poll

    async def test_jobs_of_a_worker_that_leaves_are_announced(self):
        cluster = await self.started(Cluster(self.tmp()))
        times = watch_requests(cluster.master)
        cluster.push(1)
        thief = self.will_close(await thief_of(cluster))
        answer = await thief.rpc(cluster.master.address, "requestWork", {})
        self.assertTrue(answer["task"])
        worker = await self.idle_worker(cluster, times)  # asked while the job was out: none
        self.assertEqual(cluster.results, [])
        await thief.close()  # leaves: its job is queued again, idle workers are told
        await cluster.until_results(1, 5)
        self.assertEqual(cluster.master.stats["jobs requeued"], 1)
        self.assertEqual(cluster.results[0]["worker"]["id"], worker.address)

    async def test_jobs_whose_lease_ends_are_announced(self):
        cluster = Cluster(self.tmp())
        cluster.master.lease_seconds = 1.0  # leases are checked every 0.25 s
        await self.started(cluster)
        times = watch_requests(cluster.master)
        cluster.push(1)
        thief = self.will_close(await thief_of(cluster))
        self.assertTrue((await thief.rpc(cluster.master.address, "requestWork", {}))["task"])
        end_lease(cluster.master, 0, time.time() + 3600)  # held until the worker idles
        await self.idle_worker(cluster, times)
        self.assertEqual(cluster.master.stats["jobs requeued"], 0)
        end_lease(cluster.master, 0, time.time())  # the thief's time is up
        await cluster.until_results(1, 5)
        self.assertEqual(cluster.master.stats["jobs requeued"], 1)

    async def test_late_result_of_a_requeued_job_means_it_is_not_run_again(self):
        cluster = Cluster(self.tmp())
        cluster.master.lease_seconds = 1.0
        await self.started(cluster)
        times = watch_requests(cluster.master)
        cluster.push(1)
        thief = self.will_close(await proven_thief(cluster))  # its result is taken after its lease
        self.assertTrue((await thief.rpc(cluster.master.address, "requestWork", {}))["task"])
        await until(lambda: cluster.master.stats["jobs requeued"] == 1, 10)
        late = w.Crypt(KEY).encrypt(json.dumps({"jobID": 0, "data": {"sum": 2}}))
        self.assertEqual(await thief.rpc(cluster.master.address, "shareResults", late),
                         {"received": True})
        self.assertEqual([r["jobID"] for r in cluster.results], [0])
        worker = await self.idle_worker(cluster, times)
        await asyncio.sleep(0.5)  # a job run again would be answered by now
        self.assertEqual(cluster.master.stats["jobs handed out"], 1)  # the thief's lease only
        self.assertEqual(cluster.master.stats["duplicate results"], 0)
        self.assertEqual(worker.stats["jobs done"], 0)
        self.assertEqual(cluster.master.waiting, 0)

    async def test_a_python_worker_proves_the_key_and_gets_the_batches_it_asks_for(self):
        cluster = await self.started(Cluster(self.tmp()))
        handed, lease = [], cluster.master._lease
        cluster.master._lease = lambda address, count: handed.append(len(jobs := lease(address, count))) or jobs
        cluster.push(1000)
        worker = await self.started(cluster.worker(get_batch=True, batch_size=200))
        await cluster.until_results(1000, 60)
        self.assertIn(worker.address, cluster.master.policy.proven)
        self.assertIn(worker.address, cluster.master.node.protected)  # served before any flood
        self.assertEqual(handed[:4], [200] * 4)  # not the 10 of a peer without proof
        self.assertIsNone(cluster.master.policy.standing(worker.address))

    async def test_a_token_only_peer_asking_the_js_cap_gets_one_batch_and_new_identities_buy_nothing(self):
        cluster = await self.started(Cluster(self.tmp()))
        cluster.push(2000)
        thieves = [self.will_close(await thief_of(cluster)) for _ in range(6)]
        taken = 0
        for _ in range(5):  # again and again, as the attack of issue 22 did every 50 ms
            for thief in thieves:
                answer = await thief.rpc(cluster.master.address, "requestWork",
                                         {"getBatch": True, "batchSize": 1000})
                taken += len(answer.get("batchTasks") or ([answer["task"]] if answer.get("task") else []))
        self.assertEqual(taken, 40)  # 2 % of the queue for peers that never answered a job, not 6 x 1,000
        worker = await self.started(cluster.worker(get_batch=True, batch_size=100))
        await cluster.until_results(2000 - 40, 60)
        self.assertEqual(cluster.master.store.leased, 40)
        for thief in thieves:  # they leave: their jobs are queued again, and done
            await thief.close()
        await cluster.until_results(2000, 60)
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), list(range(2000)))
        self.assertEqual(worker.stats["jobs done"], 2000)

    async def test_a_proven_worker_takes_over_what_peers_without_proof_hold_at_the_end_of_a_run(self):
        import master as m
        self.addCleanup(setattr, m, "TAKE_OVER_SECONDS", m.TAKE_OVER_SECONDS)
        m.TAKE_OVER_SECONDS = 2.0
        cluster = await self.started(Cluster(self.tmp()))  # leases of 60 s
        cluster.push(100)
        thieves = [self.will_close(await thief_of(cluster)) for _ in range(3)]
        held = []
        for thief in thieves:
            answer = await thief.rpc(cluster.master.address, "requestWork", {"getBatch": True, "batchSize": 5})
            held += [json.loads(w.Crypt(KEY).decrypt(job))["id"] for job in answer.get("batchTasks") or []]
        self.assertEqual(len(held), 10)  # the share of peers that never answered a job: the third gets none
        started = time.monotonic()
        worker = await self.started(cluster.worker(get_batch=True, batch_size=10))
        await cluster.until_results(90, 20)
        await cluster.until_results(100, 20)  # the worker idles; the expiry round nudges it
        self.assertLess(time.monotonic() - started, 15)  # not the 60 s of their leases
        self.assertEqual(cluster.master.stats["jobs taken over"], 10)
        self.assertEqual(worker.stats["jobs done"], 100)
        late = w.Crypt(KEY).encrypt_json([{"jobID": held[0], "worker": {"name": "t"}, "data": 1}])
        await thieves[0].rpc(cluster.master.address, "shareResultsBatch", late)
        self.assertEqual(cluster.master.stats["results refused"], 1)  # their leases ended
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), list(range(100)))
        self.assertEqual(cluster.master.policy.held, 0)
        self.assertEqual(cluster.master.policy.standing(thieves[0].address).allowance, 10)  # no blame

    async def test_absurd_arguments_get_an_answer_never_an_exception_and_little_log(self):
        cluster = await self.started(Cluster(self.tmp()))
        cluster.push(50)
        thief = self.will_close(await thief_of(cluster))
        real = thief.core.send_call

        def as_js_sends(*args):  # JSON with \u escapes, as JS writes it: a lone surrogate travels
            with mock.patch.object(w, "json_dumps", functools.partial(json.dumps, separators=(",", ":"))):
                return real(*args)
        thief.core.send_call = as_js_sends
        sizes = [float("inf"), float("-inf"), float("nan"), -1, 0, 10.5, "ten", "1e400", "", [], {}, None,
                 True, {"n": 10}]
        junk = [5, "x", [1, 2], None, {}, {"iv": "zz", "encryptedData": 5}, {"iv": 7}, "\ud800"]
        calls = [("requestWork", {"getBatch": True, "batchSize": size}) for size in sizes]
        calls += [("requestWork", {"getBatch": True, "batchSize": size}) for size in (10 ** 400, 1e300, " 3 ")]
        calls += [("requestWork", args) for args in junk]
        calls += [("requestWork", {"getBatch": True, "batchSize": 2, "results": args}) for args in junk]
        calls += [(name, args) for name in ("shareResults", "shareResultsBatch", "proveKey") for args in junk]
        calls += [("requestExecAssets", {"currentHash": h}) for h in (5, [], None, "0" * 64, "\u00e9")]
        calls += [(name, {"challenge": c}) for name in ("isMaster", "ping") for c in (5, "é" * 64, "\ud800")]
        calls += [("proveKey", {"proof": p}) for p in (5, "é" * 64, "0" * 64)]
        lines = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = lines.append
        w.log.addHandler(handler)
        self.addCleanup(w.log.removeHandler, handler)
        answers = []
        for _ in range(20):  # 2,000 calls in faults.py; here a few hundred
            for name, args in calls:
                answers.append((name, args, await thief.rpc(cluster.master.address, name, args, timeout=5)))
        refused = [a for name, args, a in answers if name == "requestWork" and "error" in a]
        self.assertEqual(len(refused), 20 * 14)  # each bad batchSize: an error answer
        self.assertTrue(all("batchSize" in a["error"] for a in refused))
        huge = [a for name, args, a in answers[len(sizes):len(sizes) + 3]]
        self.assertTrue(all("error" not in a for a in huge))  # a huge whole number is capped, not refused
        self.assertFalse([a for _, _, a in answers if a is w.NO_ANSWER])
        self.assertLessEqual(len([r for r in lines if r.levelno >= logging.INFO]), 2)  # undecryptable, once
        self.assertLessEqual(cluster.master.policy.held, 10)  # the thief's one batch, whatever it asked

    async def test_results_are_taken_only_from_the_peer_whose_lease_they_answer(self):
        cluster = await self.started(Cluster(self.tmp()))
        cluster.push(30)
        master, crypt = cluster.master.address, w.Crypt(KEY)
        holder = self.will_close(await thief_of(cluster))
        stranger = self.will_close(await thief_of(cluster))
        answer = await holder.rpc(master, "requestWork", {"getBatch": True, "batchSize": 5})
        ids = sorted(json.loads(crypt.decrypt(job))["id"] for job in answer["batchTasks"])

        def result(i, by):
            return {"jobID": i, "worker": {"name": by}, "data": {"sum": 2 * i}}
        forged = [result(i, "stranger") for i in ids + [29]]
        for name, args in [("shareResults", crypt.encrypt(json.dumps(forged[0]))),
                           ("shareResultsBatch", crypt.encrypt_json(forged)),
                           ("requestWork", {"results": crypt.encrypt_json(forged)})]:
            self.assertEqual((await stranger.rpc(master, name, args)).get("received", True), True)
        shapeless = [{"jobID": i} for i in ids]  # all a peer can make from one known plaintext block
        await holder.rpc(master, "shareResultsBatch", crypt.encrypt_json(shapeless))
        self.assertEqual(cluster.results, [])
        self.assertEqual(cluster.master.stats["results refused"], 1 + 6 + 6 + 5)
        await holder.rpc(master, "shareResultsBatch", crypt.encrypt_json([result(i, "holder") for i in ids]))
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), ids)
        self.assertEqual(cluster.master.policy.standing(holder.address).allowance, 15)  # earned
        proven = self.will_close(await proven_thief(cluster))  # holds the key: any job without a result
        await proven.rpc(master, "shareResultsBatch", crypt.encrypt_json([result(29, "p"), result(ids[0], "p")]))
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), [*ids, 29])
        self.assertEqual(cluster.master.stats["duplicate results"], 1)  # exactly once, as before

    @time_limit(60)
    async def test_cli_names_a_worker_with_another_key_in_one_worker_error_line(self):
        tmp = self.tmp()
        token, port = "wrongkey-%d" % random.randrange(1 << 30), free_port()
        master = await self.started(EventsMasterProcess(tmp / "m", token, port, w.make_seed()))
        workers = [w.Worker(token, name, "error", key, env={}, folder=tmp / name, host="127.0.0.1", lsd=False,
                            dht=False, trackers=[], peers=["127.0.0.1:%d" % port])
                   for name, key in (("w1", "o" * 32), ("w2", "p" * 32))]
        with self.assertLogs("worker", "ERROR") as logs:
            for worker in workers:
                await self.started(worker)
            await until(lambda: sum("holds a different transferEncryptToken" in line
                                    for line in logs.output) >= 2, 20)
            await until(lambda: any(e["event"] == "worker-error" for e in master.events), 10)
            await asyncio.sleep(1.0)  # the second worker's proof has failed too by now
        errors = [e for e in master.events if e["event"] == "worker-error"]
        self.assertEqual(len(errors), 1, errors)  # one line a minute
        self.assertIn(errors[0]["worker"], {worker.address for worker in workers})
        self.assertIn("%s holds a different transferEncryptToken" % errors[0]["worker"], errors[0]["message"])
        for worker in workers:
            self.assertTrue(any(master.ready["address"] in line and "different transferEncryptToken" in line
                                for line in logs.output))
            self.assertIsNone(worker.master)

    @time_limit(90)
    async def test_cli_names_a_worker_that_cannot_run_the_task_once_per_change(self):
        # issue 25: with a SyntaxError in task.py the worker logged it, and master.py showed
        # "0/50 jobs ... 0 worker(s)" for ever
        tmp = self.tmp()
        token, port = "cannot-run-%d" % random.randrange(1 << 30), free_port()
        task = tmp / "m" / "workplace" / "task.py"
        master = await self.started(EventsMasterProcess(tmp / "m", token, port, w.make_seed(), task_text=(
            "class Task:\n    def run(self, job)\n        return 1\n")))
        master.push(range(5))
        worker = loopback_worker(token, tmp / "w", "pi-3", peers=["127.0.0.1:%d" % port])

        def told():
            return [e for e in master.events if e["event"] == "worker-error"]
        with self.assertLogs("worker", "ERROR"):
            await self.started(worker)
            await until(told, 20)
            for _ in range(3):  # its checks every 30 s when idle: nothing new, nothing told
                self.assertFalse(await worker.sync_assets())
            task.write_text("import qx_no_such_module\n")  # another reason
            self.assertFalse(await worker.sync_assets())
            await until(lambda: len(told()) >= 2, 10)
            task.write_text("import qx_no_such_module\n\n")  # other files, the same reason
            self.assertFalse(await worker.sync_assets())
            await until(lambda: len(told()) >= 3, 10)
        task.write_text(TASK_PY)  # fixed: the jobs run, nothing more is told
        self.assertTrue(await worker.sync_assets())
        await until(lambda: len(master.results) >= 5, 20)
        await asyncio.sleep(0.5)
        first, second, third, *more = told()
        self.assertEqual({k: first[k] for k in ("worker", "name", "kind")},
                         {"worker": worker.address, "name": "pi-3", "kind": "task"})
        self.assertEqual(first["message"], "worker %s (pi-3) cannot run the task: workplace/task.py does not load: "
                         "SyntaxError: expected ':' (task.py, line 2)" % worker.address)
        self.assertIn("ModuleNotFoundError: No module named 'qx_no_such_module'", second["message"])
        self.assertEqual(third["message"], second["message"])
        self.assertEqual(more, [])  # nothing more once it runs

    async def test_worker_errors_are_taken_from_proven_workers_once_per_change_and_bounded(self):
        import master as m
        cluster = await self.started(Cluster(self.tmp()))
        address, crypt = cluster.master.address, w.Crypt(KEY)
        thief = self.will_close(await thief_of(cluster))  # knows the token only
        proven = self.will_close(await proven_thief(cluster))

        async def tell(node, error, name="pi"):
            answer = await node.rpc(address, "workerError", crypt.encrypt_json({"name": name, "error": error}))
            self.assertEqual(answer, {"received": True})  # whatever came
        with self.assertLogs("worker", "ERROR") as logs:
            told = lambda: [record for record in logs.records if hasattr(record, "qx_event")]
            for i in range(30):
                await tell(thief, "flood %d" % i)
            for junk in (5, "x", {}, None, "é" * 64, crypt.encrypt_json([1]), crypt.encrypt_json({"error": 5}),
                         crypt.encrypt_json({"error": "x" * (m.MAX_WORKER_ERROR + 1)})):
                self.assertEqual(await proven.rpc(address, "workerError", junk), {"received": True})
            self.assertEqual(told(), [])
            self.assertEqual(cluster.master.stats["worker errors refused"], 30 + 8)
            for _ in range(5):  # once per change
                await tell(proven, "line one\nline two\x1b[31m" + "y" * 5000, name="n" * 500)
            self.assertEqual(len(told()), 1)
            event, text = told()[0].qx_event, told()[0].getMessage()
            self.assertEqual((event["worker"], event["name"], event["kind"]), (proven.address, "n" * 63 + "…", "task"))
            self.assertLess(len(text), 1200)
            self.assertNotRegex(text, r"[\x00-\x1f]")
            self.assertIn("line one line two [31m", text)
            for i in range(200):  # a key holder gone wrong: a burst, then one per WORKER_ERROR_GAP seconds
                await tell(proven, "reason %d" % i)
            self.assertGreaterEqual(len(told()), m.WORKER_ERROR_BURST)
            self.assertLessEqual(len(told()), m.WORKER_ERROR_BURST + 3)
        self.assertEqual(cluster.master.reports.told, 201)

    async def js_worker_run(self, count, **env):
        """The JS worker harness (interop/worker.js) alone against master.py: results/s."""
        js_ready()
        tmp = self.tmp()
        cluster = await self.started(Cluster(tmp, files={"/workplace/task.js": SUM_TASK_JS}))
        cluster.push(count)
        (tmp / "js").mkdir()
        worker = await self.started(JsProcess("worker.js", {  # its 15 ms rule makes it wait for its poll
            "QX_TOKEN": cluster.token, "QX_KEY": KEY, "QX_FOLDER": str(tmp / "js"), "QX_POLL_SECONDS": "1", **env}))
        worker.send(cmd="addPeer", addr="127.0.0.1:%d" % cluster.master.port)
        await cluster.until_results(1, 20)
        first = time.monotonic()
        await cluster.until_results(count, 30)
        rate = (count - 1) / (time.monotonic() - first)
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), list(range(count)))
        self.assertTrue(all(r["data"] == {"sum": 2 * r["jobID"]} for r in cluster.results))
        self.assertNotIn(worker.ready["address"], cluster.master.policy.proven)
        self.assertNotIn(worker.ready["address"], cluster.master.node.protected)
        self.assertEqual(cluster.master.policy.standing(worker.ready["address"]).answered, count)
        said = next(e for e in worker.events if e["event"] == "master")
        self.assertEqual(said["keys"], ["isMaster", "resultAcks", "resultBatches", "keyProof"])  # as before
        asked = [e["answer"] for e in worker.events if e["event"] == "request"]
        self.assertLessEqual(sum(not a["task"] and not a["batchTasks"] for a in asked), 1)  # only at the end
        print("\n  JS worker harness, %s: %.0f jobs/s" % (env or "unbatched", rate), file=sys.stderr)
        return asked

    @time_limit(60)
    async def test_the_js_worker_gets_work_without_proof_and_finishes_a_run_alone(self):
        asked = await self.js_worker_run(300, QX_GET_BATCH="true", QX_BATCH_SIZE="10")
        self.assertEqual(max(a["batchTasks"] or 0 for a in asked), 10)
        await self.js_worker_run(60)

    async def test_a_raising_on_results_loses_no_other_result_of_the_batch(self):
        cluster = await self.started(Cluster(self.tmp()))
        seen = []

        def on_results(result):
            seen.append(result["jobID"])
            if result["jobID"] == 3:
                raise RuntimeError("a bug in on_results")
        cluster.master.on_results = on_results
        cluster.push(10)
        worker = cluster.worker(get_batch=True, batch_size=5)  # sets the log level: first
        with self.assertLogs("worker", "ERROR") as logs:
            await self.started(worker)
            await until(lambda: len(seen) >= 10, 10)
        self.assertEqual(sorted(seen), list(range(10)))
        self.assertTrue(any("on_results failed" in line for line in logs.output), logs.output)
        self.assertEqual(cluster.master.leases, {})

    def test_assets_hashed_and_encrypted_once_by_concurrent_threads(self):
        import threading
        with tempfile.TemporaryDirectory() as tmp:
            cluster = Cluster(tmp)
            master = cluster.master
            real_sha, real_encrypt = w.Helper.get_sha256, master.crypt.encrypt
            hashed, encrypted = collections.Counter(), collections.Counter()

            def slow_sha(path):
                hashed.update([str(path)])
                time.sleep(0.05)  # a big file: the other threads arrive meanwhile
                return real_sha(path)

            def counting_encrypt(data):
                encrypted.update([len(data)])
                time.sleep(0.05)
                return real_encrypt(data)
            barrier, answers, errors = threading.Barrier(8), [], []

            def ask():
                barrier.wait()
                try:
                    answers.append(master._assets())
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
            with mock.patch.object(w.Helper, "get_sha256", side_effect=slow_sha), \
                    mock.patch.object(master.crypt, "encrypt", side_effect=counting_encrypt):
                threads = [threading.Thread(target=ask) for _ in range(8)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(30)
            self.assertEqual(errors, [])
            self.assertEqual(len(answers), 8)
            self.assertTrue(all(a == answers[0] for a in answers))
            self.assertEqual(sorted(hashed.values()), [1, 1])  # two files, each read once
            self.assertEqual(sum(encrypted.values()), 2)

    async def test_cli_stdin_sigterm_exits_promptly_while_stdin_stays_open(self):
        token = "cli-sigterm-%d" % random.randrange(1 << 30)
        master = await self.started(MasterProcess(self.tmp() / "m", token, free_port(), w.make_seed()))
        master.push([0])
        await asyncio.sleep(0.5)  # read; the feeder waits for the next line
        master.proc.send_signal(15)
        code = await asyncio.wait_for(master.proc.wait(), 5)
        self.assertEqual(code, 3)  # in 5 s: stdin still open; 3, not 0: job 0 had no result (issue 25)

    def test_cli_refuses_a_task_it_cannot_serve_at_once_in_one_line(self):
        # issue 25: --task nosuch.py printed ready, then a FileNotFoundError traceback when a worker
        # asked; without --task, workers said "files must be a list of 1 to 256 files", master.py nothing
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_loopback_env(folder, "cli-task-%d" % random.randrange(1 << 30))
            (folder / "task.py").write_text(TASK_PY)
            (folder / "data.csv").write_text("1,2\n")
            (folder / "a").mkdir()
            (folder / "a" / "task.py").write_text(TASK_PY)
            (folder / "b").mkdir()
            (folder / "b" / "data.csv").write_text("3,4\n")
            os.mkfifo(folder / "pipe.py")
            cases = {(): "no --task given: name the task workers run, --task task.py (or task.js)",
                     ("nosuch.py",): "--task nosuch.py: no such file",
                     ("task.py", "a"): "--task a: not a regular file",
                     ("pipe.py",): "--task pipe.py: not a regular file",
                     ("data.csv",): "no --task file is named task.py or task.js",
                     ("task.py", "a/task.py"): "2 --task files are named task.py",
                     ("task.py", str(folder / "data.csv"), str(folder / "b" / "data.csv")):  # by absolute paths
                     "--task %s and --task %s would both be /workplace/data.csv on workers" % (
                         folder / "data.csv", folder / "b" / "data.csv")}
            if os.geteuid() != 0:  # root reads any file
                (folder / "secret.py").write_text("")
                (folder / "secret.py").chmod(0)
                cases[("task.py", "secret.py")] = "--task secret.py: cannot read it (Permission denied)"
            for tasks, words in cases.items():
                with self.subTest(tasks):
                    argv = [arg for task in tasks for arg in ("--task", task)]
                    done = subprocess.run([sys.executable, MASTER_PY, *argv, "--jobs", "-"], cwd=folder,
                                          env=clean_env(), input="", capture_output=True, text=True, timeout=20,
                                          check=False)
                    self.assertEqual((done.returncode, done.stdout), (2, ""), done.stdout + done.stderr)  # no ready
                    self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
                    self.assertTrue(done.stderr.startswith("master.py: " + words), done.stderr)
            self.assertNotIn("masterSeed", (folder / ".env").read_text())  # nothing written
            self.assertFalse((folder / "master.db").exists())

    async def test_cli_bad_jobs_line_is_reported_and_later_lines_run(self):
        tmp = self.tmp()
        token, port = "cli-bad-line-%d" % random.randrange(1 << 30), free_port()
        master = await self.started(EventsMasterProcess(tmp / "m", token, port, w.make_seed()))
        master.push([0])
        master.write("{not json\n\n")
        master.push([1])
        await self.started(loopback_worker(token, tmp / "w", peers=["127.0.0.1:%d" % port]))
        await until(lambda: len(master.results) >= 2, 15)
        self.assertEqual(sorted(r["jobID"] for r in master.results), [0, 1])
        errors = [e for e in master.events if e["event"] == "error"]
        self.assertEqual(len(errors), 1, master.events)
        self.assertEqual(errors[0]["line"], 2)
        self.assertIn("line 2", errors[0]["message"])

    def test_cli_missing_jobs_file_exits_2_with_a_message(self):
        with tempfile.TemporaryDirectory() as tmp:
            write_loopback_env(tmp, "cli-missing-jobs-%d" % random.randrange(1 << 30))
            done = subprocess.run([sys.executable, MASTER_PY, "--jobs", "no-such-jobs.jsonl"], cwd=tmp,
                                  env=clean_env(), capture_output=True, text=True, timeout=20,
                                  check=False)
            self.assertEqual(done.returncode, 2)
            self.assertIn("no-such-jobs.jsonl", done.stderr)
            self.assertEqual(done.stdout, "")  # it never started


# master.py: durable queue and command line (issue 13) #######################

class TestMasterDurable(AsyncTest):
    TIME_LIMIT = 120.0

    async def workers(self, cli, count=1, batch=20):
        """``count`` real ``python worker.py`` processes that dial ``cli``'s port."""
        for i in range(count):
            folder = cli.folder.parent / ("w%d-%d" % (i, random.randrange(1 << 30)))
            folder.mkdir()
            write_loopback_env(folder, cli.token, peers="127.0.0.1:%d" % cli.port, getBatch="true",
                               batchSize=batch, LOG_LEVEL="error")
            self.will_kill(await asyncio.create_subprocess_exec(sys.executable, WORKER_PY, cwd=folder,
                                                                env=clean_env(), stderr=subprocess.DEVNULL))

    def assert_each_once(self, results, count):
        ids = [r["jobID"] for r in results]
        self.assertEqual(sorted(ids), list(range(count)))
        self.assertTrue(all(r["data"] == {"sum": 2 * r["jobID"]} for r in results))

    # the run, as workers know it (issue 25: a held result is only ever the answer to its own job)
    def test_the_run_has_a_name_kept_across_restarts_and_new_for_a_new_run(self):
        from master import Store
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.db"
            store = Store(path)
            run = store.run_id
            store.commit()
            store.close()
            again = Store(path)
            self.assertEqual(again.run_id, run)  # master.py started again: the same run goes on
            again.new_run()  # another jobs file: its job ids may repeat the last run's
            self.assertNotEqual(again.run_id, run)
            new = again.run_id
            again.commit()
            again.close()
            last = Store(path)
            self.assertEqual(last.run_id, new)
            last.close()
        self.assertNotEqual(Store().run_id, Store().run_id)  # in memory: each process is a run

    async def test_results_of_another_run_are_not_taken_and_the_worker_keeps_them(self):
        results = []
        master = loopback_master("t", self.tmp() / "m", results.append)
        self.addCleanup(master.store.close)
        master.policy.prove("bWorker")
        master.push_new_job({"id": 0, "data": "{}"})
        self.assertNotIn("run", master._is_master("bWorker", {}))  # JS peers see nothing new
        self.assertNotIn("run", master._request_work("bJsWorker", {}))
        run = master._is_master("bWorker", {"challenge": "00" * 32})["run"]  # a Python worker
        self.assertEqual(run, master._request_work("bWorker", {})["run"])
        sent = w.json_dumps(w.Crypt(KEY).encrypt(json.dumps([{"jobID": 0, "worker": {"id": "bWorker"}, "data": 1}])))
        self.assertEqual(master._share_results_batch("bWorker", {"results": sent, "run": "another"}),
                         {"received": False, "run": run})
        answer = master._request_work("bWorker", {"results": sent, "resultsRun": "another"})
        self.assertEqual((answer["resultsTaken"], answer["run"]), (False, run))
        self.assertEqual((results, master.stats["results of another run refused"]), ([], 2))
        self.assertEqual(master._share_results_batch("bWorker", {"results": sent, "run": run}), {"received": True})
        self.assertEqual(master._share_results_batch("bWorker", sent), {"received": True})  # a worker before runs
        self.assertEqual([r["jobID"] for r in results], [0])

    # the database
    def test_store_keeps_what_was_committed_and_nothing_else(self):
        from master import Store
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.db"
            store = Store(path)
            for i in range(5):
                self.assertTrue(store.push(str(i), '{"id":%d}' % i))
            self.assertFalse(store.push("1", "{}"))  # waiting already
            self.assertEqual(store.lease("w1", 2, time.time() + 60), [("0", '{"id":0}'), ("1", '{"id":1}')])
            late = ("0", "w2", "two", False, '{"jobID":0}')
            self.assertEqual(store.record([("0", "w1", "one", False, '{"jobID":0}'), late]), [1, None])
            self.assertEqual(store.record([late]), [None])  # one result per job
            self.assertFalse(store.push("0", "{}"))  # answered in this run
            with self.assertRaises(KeyError), store.undoable():
                store.push("5", "{}")
                raise KeyError("a bug half-way through a call")
            self.assertEqual((store.waiting, store.leased), (3, 1))  # undone, and only that
            store.commit()
            store.lease("w2", 1, time.time() + 60)  # never committed:
            store.db.close()  # the process dies, and its lock with it
            os.close(store._lock)
            store = Store(path)
            self.assertEqual((store.waiting, store.leased, store.answered), (3, 1, 1))
            self.assertEqual(store.held(), {"w1": 1})
            self.assertEqual(store.requeue(worker="w1"), {"w1": 1})  # job 1 goes back, in front
            self.assertEqual(store.lease("w3", 9, time.time() + 60),
                             [(str(i), '{"id":%d}' % i) for i in (1, 2, 3, 4)])
            self.assertEqual(store.holders(["1", "4", "9"]), {"1": "w3", "4": "w3"})
            self.assertEqual(store.requeue(before=time.time()), {})
            self.assertEqual(store.requeue(before=time.time() + 120), {"w3": 4})  # their leases ended
            self.assertEqual(store.per_worker(), [{"id": "w1", "name": "one", "results": 1, "errors": 0}])
            store.new_run()
            self.assertEqual(store.record([("0", "w1", "one", False, "{}")]), [2])  # a new run: ids again
            store.close()

    def test_cli_refuses_a_foreign_corrupt_or_busy_database_in_one_line(self):
        import sqlite3

        from master import Store
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_loopback_env(folder, "refuse-%d" % random.randrange(1 << 30), port=free_port())
            (folder / "task.py").write_text(TASK_PY)
            (folder / "garbage.db").write_bytes(os.urandom(5000))
            (folder / "text.db").write_text("id,name\n1,results of last year\n" * 200)
            with contextlib.closing(sqlite3.connect(folder / "foreign.db")) as db:
                db.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
                db.commit()
            store = Store(folder / "torn.db")
            for i in range(3000):
                store.push(str(i), json.dumps({"id": i, "data": "x" * 100}))
            store.close()
            torn = (folder / "torn.db").read_bytes()
            (folder / "torn.db").write_bytes(torn[:len(torn) // 2])  # a disk that lost its end
            busy = subprocess.Popen([sys.executable, MASTER_PY, "--task", "task.py", "--db", "busy.db"], cwd=folder,
                                    env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.addCleanup(busy.wait, 30)
            self.addCleanup(busy.kill)
            self.assertIn(b"ready", busy.stdout.readline())  # another master has it open
            cases = {"garbage.db": "not a master.py database", "text.db": "not a master.py database",
                     "foreign.db": "not a master.py database", "torn.db": "corrupt",
                     "busy.db": "in use by another master.py"}
            for name, message in cases.items():
                before = (folder / name).read_bytes()
                done = subprocess.run([sys.executable, MASTER_PY, "--task", "task.py", "--db", name, "--no-follow"],
                                      cwd=folder, env=clean_env(), capture_output=True, text=True, timeout=30,
                                      check=False)
                self.assertEqual(done.returncode, 2, (name, done.stderr))
                self.assertEqual(len(done.stderr.strip().splitlines()), 1, (name, done.stderr))
                self.assertIn(name, done.stderr)
                self.assertIn(message, done.stderr)
                self.assertEqual(done.stdout, "")  # it never started
                self.assertEqual((folder / name).read_bytes(), before, name)  # left as it was
            busy.stdout.close()

    async def test_cli_a_database_of_jobs_for_another_key_says_what_to_do(self):
        # issue 25: after the key was fixed, master.db was refused with no hint to move it or use --db
        cli = MasterCli(self.tmp() / "m")
        env = cli.folder / ".env"
        env.write_text(env.read_text().replace(KEY, "w" * 32))  # a wrong key
        write_jobs(cli.folder / "jobs.jsonl", 10)
        await self.started(cli, "--jobs", "jobs.jsonl")  # the jobs wait, encrypted with it
        await until(lambda: cli.of("ready"), 20)
        await asyncio.sleep(0.5)
        await cli.kill()
        env.write_text(env.read_text().replace("w" * 32, KEY))  # the key, fixed
        db = cli.folder / "master.db"

        def jobs():
            with contextlib.closing(sqlite3.connect(db)) as connection:
                return connection.execute("SELECT job_key, payload FROM jobs ORDER BY seq").fetchall()
        before = jobs()
        self.assertEqual(len(before), 10)
        await self.started(cli, "--jobs", "jobs.jsonl")
        self.assertEqual(await cli.exit(), 2)
        self.assertEqual(len(cli.stderr.splitlines()), 1, cli.stderr)
        self.assertIn("holds jobs encrypted with another transferEncryptToken (the key changed since they were "
                      "queued); it was left as it is: to start over with this key, move it away (mv %s %s.old) "
                      "or pass --db ANOTHER_FILE; to finish those jobs, set the old key back" % (db, db), cli.stderr)
        self.assertEqual(jobs(), before)
        db.rename(cli.folder / "master.db.old")  # as it says
        await self.started(cli, "--jobs", "jobs.jsonl")
        await self.workers(cli, 1, batch=5)
        self.assertEqual(await cli.exit(), 0, cli.stderr)
        self.assert_each_once(cli.results, 10)

    @time_limit(180)
    async def test_memory_stays_flat_however_many_jobs_are_answered(self):
        tmp = self.tmp()
        import master as m
        self.addCleanup(setattr, m, "WAL_LIMIT", m.WAL_LIMIT)
        m.WAL_LIMIT = 256 << 10  # the log is moved into the database more often
        cluster = await self.started(Cluster(tmp, db=tmp / "master.db"))
        master = cluster.master
        await self.started(cluster.worker(get_batch=True, batch_size=50))
        cluster.push(500)
        await cluster.until_results(500, 60)
        held = held_in_memory(master)
        cluster.push(4000, start=500)
        await cluster.until_results(4500, 120)
        self.assertLess(held_in_memory(master) - held, 50)  # nothing per answered job (4,000 more)
        self.assertEqual((master.store.answered, master.waiting, master.leases), (4500, 0, {}))
        self.assertLess((tmp / "master.db-wal").stat().st_size, 1 << 20)  # checkpointed
        self.assertEqual(sorted(r["jobID"] for r in cluster.results), list(range(4500)))

    # the command line
    async def test_cli_jobs_file_ends_with_a_summary_exit_0_and_no_progress_in_a_pipe(self):
        cli = MasterCli(self.tmp() / "m")
        write_jobs(cli.folder / "jobs.jsonl", 300)
        await self.started(cli, "--jobs", "jobs.jsonl")
        await self.workers(cli, 2, batch=10)
        self.assertEqual(await cli.exit(), 0, cli.stderr)
        self.assert_each_once(cli.results, 300)
        summary = cli.events[-1]
        self.assertEqual(summary["event"], "summary", cli.events[-3:])
        self.assertEqual((summary["jobs"], summary["errors"], summary["pending"]), (300, 0, 0))
        self.assertEqual(sum(worker["results"] for worker in summary["workers"]), 300)
        self.assertGreater(summary["seconds"], 0)
        self.assertGreater(summary["jobs_per_s"], 0)
        self.assertNotIn("\r", cli.stderr)  # no progress line in a pipe
        self.assertNotIn("jobs/s", cli.stderr)

    async def test_cli_error_results_exit_1_and_errors_ok_exit_0(self):
        cli = MasterCli(self.tmp() / "m")
        write_jobs(cli.folder / "jobs.jsonl", 40, fail={3, 17})
        await self.started(cli, "--jobs", "jobs.jsonl")
        await self.workers(cli, 1, batch=5)
        self.assertEqual(await cli.exit(), 1, cli.stderr)
        self.assertEqual(cli.events[-1]["errors"], 2)
        self.assertEqual(sorted(r["jobID"] for r in cli.results if r.get("error")), [3, 17])
        del cli.events[:]
        await self.started(cli, "--jobs", "jobs.jsonl", "--errors-ok")  # a finished run: a new one
        self.assertEqual(await cli.exit(), 0, cli.stderr)
        self.assertEqual(len(cli.results), 40)  # run again, all of it
        self.assertEqual((cli.events[-1]["jobs"], cli.events[-1]["errors"]), (40, 2))

    async def assert_serving(self, cli):
        """A new peer gets an answer from the master of ``cli``."""
        node = await self.started(py_node(cli.token, peers=["127.0.0.1:%d" % cli.port]))
        address = cli.of("ready")[-1]["address"]
        await until(lambda: address in node.peers, 30)
        self.assertEqual((await node.rpc(address, "ping", {"n": 1})), {"n": 1, "pong": True})

    async def test_cli_follow_keeps_serving_after_the_last_result(self):
        tmp = self.tmp()
        piped = await self.started(MasterCli(tmp / "s"), "--jobs", "-", stdin=subprocess.PIPE)
        filed = MasterCli(tmp / "f")
        write_jobs(filed.folder / "jobs.jsonl", 10)
        await self.started(filed, "--jobs", "jobs.jsonl", "--follow")
        await self.workers(piped, 1, batch=5)
        await self.workers(filed, 1, batch=5)
        for end in (10, 20):  # --follow is the default for stdin; the queue runs dry in between
            for i in range(end - 10, end):
                piped.proc.stdin.write(b'{"id": %d, "data": "{\\"x\\": %d}"}\n' % (i, i))
            await until(lambda end=end: len(piped.results) >= end, 60)
        piped.proc.stdin.close()
        await until(lambda: len(filed.results) >= 10, 60)
        for cli in (piped, filed):  # every job answered and read to the end: it stays
            with self.assertRaises(TimeoutError):
                await asyncio.wait_for(cli.proc.wait(), 1.5)  # it would end in 0.1 s
            await self.assert_serving(cli)
            cli.proc.send_signal(15)
            self.assertEqual(await cli.exit(), 0, cli.stderr)
            self.assertEqual(cli.events[-1]["event"], "summary")
        self.assert_each_once(piped.results, 20)
        self.assert_each_once(filed.results, 10)

    async def test_cli_progress_line_on_a_terminal(self):
        import pty
        import threading
        cli = MasterCli(self.tmp() / "m")
        write_jobs(cli.folder / "jobs.jsonl", 200, sleep=0.005)
        leader, follower = pty.openpty()
        self.addCleanup(os.close, leader)
        seen = bytearray()

        def read():
            with contextlib.suppress(OSError):  # EIO once the master has exited
                while chunk := os.read(leader, 4096):
                    seen.extend(chunk)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            await self.started(cli, "--jobs", "jobs.jsonl", stderr=follower)
        finally:
            os.close(follower)
        await self.workers(cli, 1, batch=10)
        self.assertEqual(await cli.exit(), 0)
        await asyncio.to_thread(reader.join, 10)
        text = seen.decode(errors="replace")
        self.assertIn("\r", text)  # redrawn in place
        self.assertIn("200/200 jobs", text)  # the last figures stay
        self.assertRegex(text, r"\d+/200\+? jobs, \d+ jobs/s, ETA [\d:-]+, 1 worker\(s\)")
        self.assertEqual(len(cli.results), 200)  # stdout is a pipe: results only there

    async def test_what_holds_jobs_or_results_is_for_its_user_alone(self):
        # issue 23: with the usual umask 022, master.db's logs and --out were 0644, and so were
        # the worker journal's logs, all holding job data or results in clear
        self.addCleanup(os.umask, os.umask(0o022))  # the processes below inherit it
        cli = MasterCli(self.tmp() / "m")
        write_jobs(cli.folder / "jobs.jsonl", 50)
        await self.started(cli, "--jobs", "jobs.jsonl", "--out", "results.jsonl", "--follow")
        home = cli.folder.parent / "w"
        home.mkdir()
        write_loopback_env(home, cli.token, peers="127.0.0.1:%d" % cli.port, getBatch="true", batchSize=10,
                           LOG_LEVEL="info", logFile="worker.log")
        env = home / ".env"
        env.write_text(env.read_text() + "folder=%s\n" % (home / "work"))  # a folder it makes itself
        self.will_kill(await asyncio.create_subprocess_exec(sys.executable, WORKER_PY, cwd=home,
                                                            env=clean_env(), stderr=subprocess.DEVNULL))
        await until(lambda: len(cli.results) >= 50, 60)
        files = [cli.folder / name for name in ("master.db", "master.db-wal", "master.db-shm", "results.jsonl")]
        files += [home / "work" / (w.JOURNAL_NAME + suffix) for suffix in ("", "-wal", "-shm")]
        files.append(home / "worker.log")
        self.assertEqual({str(f): file_mode(f) for f in files}, dict.fromkeys(map(str, files), "0o600"))
        self.assertEqual(file_mode(home / "work"), "0o700")  # the folder it made: its own alone
        await cli.kill()

    async def test_cli_out_has_each_result_once_across_a_kill(self):
        cli = MasterCli(self.tmp() / "m")
        write_jobs(cli.folder / "jobs.jsonl", 400, sleep=0.003)
        out = cli.folder / "results.jsonl"
        await self.started(cli, "--jobs", "jobs.jsonl", "--out", "results.jsonl")
        await self.workers(cli, 2, batch=10)
        await until(lambda: len(cli.results) >= 100, 60)
        await cli.kill()
        torn = out.read_bytes() + b'{"jobID":7,"worker":{"id":"b'
        out.write_bytes(torn)  # as if a write got this far before the kill: no commit
        await self.started(cli, "--jobs", "jobs.jsonl", "--out", "results.jsonl")
        self.assertEqual(await cli.exit(), 0, cli.stderr)
        self.assertIn("cut off", cli.stderr)
        lines = out.read_bytes().split(b"\n")
        self.assertEqual(lines[-1], b"")  # ends with a whole line
        self.assert_each_once([json.loads(line) for line in lines[:-1]], 400)
        printed = [r["jobID"] for r in cli.results]
        self.assertEqual(len(printed), len(set(printed)))  # stdout: none twice

    @time_limit(240)
    async def test_cli_kill_9_at_random_moments_loses_no_result_and_repeats_none(self):
        async def scenario(rng):
            count, kills = 1500, 5
            cli = MasterCli(self.tmp() / "m")
            write_jobs(cli.folder / "jobs.jsonl", count, sleep=0.002)
            args = ("--jobs", "jobs.jsonl", "--out", "results.jsonl")
            await self.started(cli, *args)
            await self.workers(cli, 2, batch=25)
            for _ in range(kills):
                before = len(cli.results)
                await until(lambda before=before: len(cli.results) > before, 60)  # results flow
                await asyncio.sleep(rng.uniform(0, 0.4))  # then a random moment
                await cli.kill()
                await self.started(cli, *args)  # on the same master.db and results.jsonl
            self.assertEqual(await cli.exit(), 0, cli.stderr)
            summary = cli.events[-1]
            self.assertEqual((summary["event"], summary["jobs"], summary["errors"]), ("summary", count, 0))
            out = (cli.folder / "results.jsonl").read_text().splitlines()
            self.assert_each_once([json.loads(line) for line in out], count)  # none lost, none twice
            printed = [r["jobID"] for r in cli.results]
            self.assertEqual(len(printed), len(set(printed)), "a result printed twice")
            # stdout is written right after each commit, before its sync: only a kill in the
            # microseconds between the two loses lines there (never from --out or the database)
            self.assertLessEqual(set(printed), set(range(count)))
            return count - len(printed), cli.torn
        seed = random.randrange(1 << 30)
        try:
            lost, torn = await scenario(random.Random(seed))
        except AssertionError as exc:
            raise AssertionError("seed %d: %s" % (seed, exc)) from exc
        print("\n  kill -9 x5: %d stdout line(s) lost, %d torn (seed %d)" % (lost, torn, seed),
              file=sys.stderr)

    @time_limit(180)
    async def test_cli_restart_reads_the_jobs_file_on_from_the_last_commit(self):
        from master import Store
        count = 30000
        cli = MasterCli(self.tmp() / "m")
        jobs = cli.folder / "jobs.jsonl"
        write_jobs(jobs, count, bad_every=3000)
        await self.started(cli, "--jobs", "jobs.jsonl")  # no worker yet
        bad = random.randrange(1, 9)
        await until(lambda: len(cli.of("error")) >= bad, 60)  # line 3000 * bad has just been read
        await cli.kill()
        store = Store(cli.folder / "master.db")
        self.addCleanup(store.close)
        offset, line = store.get("offset", 0), store.get("line", 0)
        read = jobs.read_bytes()[:offset]
        self.assertTrue(offset == 0 or read.endswith(b"\n"))
        self.assertEqual(read.count(b"\n"), line)
        self.assertEqual(store.waiting, line - read.count(b"{not json"))  # jobs and offset: one commit
        store.close()
        await self.started(cli, "--jobs", "jobs.jsonl")
        await self.workers(cli, 2, batch=100)
        self.assertEqual(await cli.exit(), 0, cli.stderr)
        xs = sorted(r["data"]["sum"] // 2 for r in cli.results)
        self.assertEqual(xs, list(range(count)))  # each line's job once: none skipped, none twice
        self.assertEqual((cli.events[-1]["jobs"], cli.events[-1]["skipped_lines"]), (count, 9))

    async def test_cli_interrupted_with_jobs_pending_exits_3_and_the_same_command_continues(self):
        # issue 25: it exited 0, which a script takes for success
        cli = MasterCli(self.tmp() / "m")
        write_jobs(cli.folder / "jobs.jsonl", 30)
        for sig in (2, 15):  # SIGINT (Ctrl-C), SIGTERM
            await self.started(cli, "--jobs", "jobs.jsonl")  # no worker: every job pending
            await until(lambda: cli.of("ready"), 20)
            await asyncio.sleep(0.3)
            cli.proc.send_signal(sig)
            self.assertEqual(await cli.exit(), 3, cli.stderr)
            self.assertEqual((cli.events[-1]["event"], cli.events[-1]["pending"]), ("summary", 30))
            del cli.events[:]
        await self.started(cli, "--jobs", "jobs.jsonl")  # the same command continues the run
        await self.workers(cli, 1, batch=10)
        self.assertEqual(await cli.exit(), 0, cli.stderr)
        self.assert_each_once(cli.results, 30)

    async def test_cli_data_that_is_not_text_is_sent_as_its_json_and_duplicates_are_reported(self):
        # issue 25: "data": {...} passed through and the README's own task (json.loads(job["data"]))
        # failed; a duplicate id was dropped without a word and not counted
        cli = MasterCli(self.tmp() / "m")
        (cli.folder / "workplace" / "task.py").write_text(readme_task())
        lines = [{"id": 1, "data": {"x": 1, "y": 2}}, {"id": 2, "data": json.dumps({"x": 2, "y": 2})},
                 {"id": 1, "data": {"x": 9, "y": 9}}, {"id": "é", "data": {"y": 0.5, "x": 3}},
                 "{not json", {"id": 2, "data": "{}"}, {"id": 4, "data": [5, 6]}]
        text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
        (cli.folder / "jobs.jsonl").write_text(text + "".join('{"id": 1}\n' for _ in range(300)))
        await self.started(cli, "--jobs", "jobs.jsonl")
        await self.workers(cli, 1, batch=10)
        self.assertEqual(await cli.exit(), 1, cli.stderr)  # job 4: a list has no "x"
        sums = {r["jobID"]: r["data"]["sum"] for r in cli.results if not r.get("error")}
        self.assertEqual(sums, {1: 3, 2: 4, "é": 3.5})
        self.assertIn("TypeError", next(r for r in cli.results if r["jobID"] == 4)["error"]["type"])
        errors = cli.of("error")
        self.assertEqual([e["line"] for e in errors[:3]], [3, 5, 6])
        self.assertEqual(errors[0]["message"], "jobs line 3 skipped: id 1 is queued, out or answered already in "
                         "this run (a duplicate)")
        self.assertLessEqual(len(errors), 3 + 100)  # 303 skipped lines: a burst of them, then one a second
        summary = cli.events[-1]
        self.assertEqual((summary["jobs"], summary["skipped_lines"], summary["duplicate_lines"]), (4, 303, 302))

    async def test_cli_skips_a_job_without_id_with_an_error_event(self):
        # its result could not be matched: it would leave the queue when handed out, and the
        # run could end while that job was still running
        cli = MasterCli(self.tmp() / "m")
        job = lambda i: json.dumps({"id": i, "data": json.dumps({"x": i, "sleep": 0, "fail": False})})
        lines = [job(1), '{"data": "{}"}', "[1, 2]", '{"id": null}', job(2)]
        (cli.folder / "jobs.jsonl").write_text("\n".join(lines) + "\n")
        await self.started(cli, "--jobs", "jobs.jsonl")
        await self.workers(cli, 1, batch=10)
        self.assertEqual(await cli.exit(), 0, cli.stderr)
        self.assertEqual([e["line"] for e in cli.of("error")], [2, 3, 4])
        self.assertIn('"id"', cli.of("error")[0]["message"])
        self.assertEqual(sorted(r["jobID"] for r in cli.results), [1, 2])
        self.assertEqual((cli.events[-1]["jobs"], cli.events[-1]["skipped_lines"]), (2, 3))


# The test data: the generators give the committed bytes #####################

class TestTestData(unittest.TestCase):
    def test_generators_give_the_committed_bytes(self):
        """testdata/ is what interop/make-testdata.sh makes from the real JS code, byte for byte."""
        js_ready()
        for package in ("@roamhq/wrtc", "bittorrent-tracker"):
            need((INTEROP / "node_modules" / package).is_dir(), "run npm ci in interop/ (%s)" % package)
        need(shutil.which("unshare") and shutil.which("ip") and os.geteuid() == 0, "unshare -n needs root")
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(["sh", str(INTEROP / "make-testdata.sh"), tmp], capture_output=True,
                                  text=True, timeout=300, check=False)
            self.assertEqual(done.returncode, 0, done.stdout[-2000:] + done.stderr[-3000:])
            for name in ("bugout-vectors.json", "tracker-samples.json"):
                made, committed = (Path(tmp) / name).read_bytes(), (HERE / "testdata" / name).read_bytes()
                if made != committed:
                    new, old = json.loads(made), json.loads(committed)
                    keys = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
                    self.fail(f"testdata/{name} differs from a new run in {keys}")


# Running the tests ##########################################################
#
# Two tiers. ``python test_worker.py`` runs every test (the README's command
# and CI's). ``python test_worker.py --quick`` runs the classes named in QUICK:
# the in-memory tests of the codecs, the sans-I/O cores, the policies, trust,
# the outbox and the settings, in seconds, while you change code. There a test
# that binds or connects a socket, sends a datagram or starts a process fails
# (in_memory_only): such a class belongs to the full suite only, and so does
# such a test of a QUICK class (@full_tier). A class not in QUICK runs in the
# full suite alone; TestTiers checks the names below.

#: The quick tier: test classes that run in memory (a temporary folder at most), in section order.
QUICK = ("TestEnvFile", "TestLogger", "TestCrypt", "TestCodecs", "TestVectors", "TestBugoutCore",
         "TestCoreBounds", "TestPeerWire", "TestBadInput", "TestKrpc", "TestKrpcBadInput",
         "TestTrackerClient", "TestNodePolicy", "TestWirePolicy", "TestSafety",
         "TestTaskJsSafety", "TestMasterProof", "TestOutbox", "TestMasterFinder", "TestJobLoop",
         "TestLeasePolicy", "TestTiers")


def _refuse_io(*args, **kwargs):
    raise AssertionError("the quick tier runs in memory: no socket, no process (take this class out of QUICK)")


def in_memory_only() -> contextlib.ExitStack:
    """While it is entered, binding or connecting a socket, sending a datagram and starting a
    process raise (an event loop's own socketpair is still made)."""
    stack = contextlib.ExitStack()
    for owner, name in ((socket.socket, "bind"), (socket.socket, "connect"), (socket.socket, "connect_ex"),
                        (socket.socket, "sendto"), (subprocess.Popen, "__init__"), (os, "fork")):
        stack.enter_context(mock.patch.object(owner, name, _refuse_io))
    return stack


def quick_suite() -> unittest.TestSuite:
    """The QUICK classes' tests, less those marked @full_tier."""
    loader = unittest.defaultTestLoader
    return unittest.TestSuite(
        test for c in test_classes() if c.__name__ in QUICK for test in loader.loadTestsFromTestCase(c)
        if not getattr(getattr(test, test._testMethodName), "full_tier", False))


def test_classes() -> list[type]:
    """Every test class of this module, in its order."""
    module = sys.modules[__name__]
    return [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, unittest.TestCase)
            and c.__module__ == module.__name__ and c.__name__.startswith("Test")]


class TestTiers(unittest.TestCase):
    def test_the_quick_tier_names_test_classes_of_this_module_in_order(self):
        names = [c.__name__ for c in test_classes()]
        self.assertEqual([n for n in QUICK if n not in names], [])  # a class renamed, or gone
        self.assertEqual(len(set(QUICK)), len(QUICK))
        self.assertEqual(list(QUICK), [n for n in names if n in QUICK])  # section order, as the file
        quick = {test.id() for test in quick_suite()}
        self.assertIn(f"{__name__}.TestCrypt.test_roundtrip_fresh_iv", quick)
        self.assertNotIn(f"{__name__}.TestCrypt.test_matches_openssl_cbc", quick)  # @full_tier: node

    def test_in_memory_only_refuses_sockets_and_processes(self):
        before = socket.socket.bind, subprocess.Popen.__init__
        with in_memory_only():
            with socket.socket() as sock, self.assertRaises(AssertionError):
                sock.bind(("127.0.0.1", 0))
            with self.assertRaises(AssertionError):
                subprocess.run([sys.executable, "-c", "pass"], check=False)
        self.assertEqual((socket.socket.bind, subprocess.Popen.__init__), before)  # as before, after it


def main():
    """Run every test (``--quick``: the QUICK tier, in memory); end with the plain
    'N passed, N failed, N skipped' line."""
    quick = "--quick" in sys.argv[1:]
    suite = quick_suite() if quick else unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    with in_memory_only() if quick else contextlib.nullcontext():
        result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 0 if failed == 0 and not (IN_CI and skipped) else 1


if __name__ == "__main__":
    sys.exit(main())
