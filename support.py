"""What test_worker.py, bench.py and fuzz.py share: the vectors made by the JS
code (testdata/), a loopback-only .env, a master's asset files, the runner of
the JS peers in interop/, and small waiting and skipping helpers.

Neither a test nor part of the worker: importing it starts nothing, changes
nothing and reads nothing (the vectors are read on first use).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import time
import unittest
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import worker as w

HERE = Path(__file__).resolve().parent
TESTDATA = HERE / "testdata"  # made by interop/make-testdata.sh
IN_CI = os.environ.get("CI") == "true"
KEY = "k" * 16 + "0123456789abcdef"
NODE = shutil.which("node")
INTEROP = HERE / "interop"


@functools.cache
def vectors() -> dict[str, Any]:
    """testdata/bugout-vectors.json, read on first use."""
    return json.loads((TESTDATA / "bugout-vectors.json").read_text())


def vector_swarm() -> str:
    """The bugout identifier (swarm) of the vectors."""
    return vectors()["identifier"]


def __getattr__(name: str) -> Any:
    """``VECTORS`` and ``IDENT`` as names too (fuzz.py), read on first use."""
    if name == "VECTORS":
        return vectors()
    if name == "IDENT":
        return vector_swarm()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prng(labels: Iterable[str]) -> Callable[[int], bytes]:
    """The vectors' PRNG: draw k of n bytes = sha512("anchor-prng-<k>")[:n]."""
    it = iter(labels)
    return lambda n: hashlib.sha512(next(it).encode()).digest()[:n]


def identity(role: str) -> w.Identity:
    keys = vectors()["keys"][role]
    return w.Identity(keys["seed_bs58check"], bytes.fromhex(keys["ek_secret_key_hex"]))


def need(condition: object, why: str) -> None:
    """Skip outside CI; in CI a missing prerequisite is a failure, not a skip."""
    if condition:
        return
    if IN_CI:
        raise AssertionError("prerequisite missing in CI: " + why)
    raise unittest.SkipTest(why)


async def until(predicate: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s")
        await asyncio.sleep(0.02)


# Generated and mutated input ################################################

def mutations(seed_inputs: list[bytes], count: int, rng: random.Random) -> Iterator[bytes]:
    """Mutated copies of valid inputs: flips, cuts, splices, random bytes."""
    for i in range(count):
        data = bytearray(rng.choice(seed_inputs))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(5)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[pos % len(data)] ^= 1 << rng.randrange(8)
            elif op == 1:
                del data[pos:pos + rng.randint(1, 16)]
            elif op == 2:
                data[pos:pos] = rng.choice(seed_inputs)[:rng.randint(0, 32)]
            elif op == 3:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                data[pos:pos] = rng.choice([b"i", b"e", b"l", b"d", b"0:", b"99999999:", b"-"])
        yield bytes(data)


def valid_payloads() -> list[bytes]:
    core = w.BugoutCore(vector_swarm(), identity("worker"))
    peer = identity("master")
    now = w._now()
    core.peers[peer.address] = w.PeerKeys(peer.pk, peer.ek, now)
    core.send_ping(now)
    core.send_message({"a": [1, "b"]}, now)
    core.send_call(peer.address, "isMaster", {}, now)
    out = [p for p, _ in core.data_to_send()]
    return out + [bytes.fromhex(e["payload_hex"]) for e in vectors()["exchange_log"]]


def fuzz_inputs(count: int, seed: int = 1234) -> Iterator[bytes]:
    """``count`` generated and mutated inputs, deterministic for a seed."""
    rng = random.Random(seed)
    seeds = valid_payloads() + [b"d1:ai1e1:bl1:xi-2eee", b"le", b"0:"]
    return mutations(seeds, count, rng)


# The JS peers of interop/ ###################################################

def js_ready() -> None:
    need(NODE, "node is not installed")
    need((INTEROP / "node_modules" / "bugout").is_dir(), "run npm ci in interop/")


class JsProcess:
    """A node process from interop/ speaking JSON lines on stdin/stdout."""

    def __init__(self, script: str, env: dict[str, str]) -> None:
        self.script, self.env = script, env
        self.events = []
        self._changed = asyncio.Event()

    async def start(self, prefix: Iterable[str] = ()) -> JsProcess:
        env = dict(os.environ, **self.env)
        self.proc = await asyncio.create_subprocess_exec(
            *prefix, NODE, str(INTEROP / self.script), env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._reader = asyncio.ensure_future(self._read())
        self.ready = await self.wait_for(lambda e: e["event"] == "ready")
        return self

    async def _read(self):
        async for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            event["_t"] = time.perf_counter()
            self.events.append(event)
            self._changed.set()

    async def wait_for(self, predicate: Callable[[dict], object], timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.script}: no such event; got {self.events[-10:]}")
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass

    def send(self, **command: Any) -> None:
        self.proc.stdin.write((json.dumps(command) + "\n").encode())

    async def close(self) -> None:
        if self.proc.returncode is None:
            with_suppress = self.proc.stdin.close
            with_suppress()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()


async def js_peer(ident: str, **env: str) -> JsProcess:
    return await JsProcess("peer.js", {"BO_ID": ident, "BO_MODE": "loopback", **env}).start()


# Masters' files and workers' settings #######################################

def write_assets(root: str | Path, files: dict[str, str]) -> list[dict[str, str]]:
    """Master-side files; returns the exec_assets dict."""
    listed = []
    for worker_path, text in files.items():
        path = Path(root) / worker_path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        listed.append({"masterPath": worker_path, "name": Path(worker_path).name,
                       "workerPath": worker_path})
    return listed


def write_loopback_env(folder: str | Path, token: str, **keys: object) -> None:
    """A .env for a worker.py or master.py subprocess: loopback only, no LSD, DHT or trackers."""
    settings = {"token": token, "transferEncryptToken": KEY, "lsd": "false", "dht": "false",
                "trackers": "", "host": "127.0.0.1", **{k: str(v) for k, v in keys.items()}}
    (Path(folder) / ".env").write_text("".join("%s=%s\n" % kv for kv in settings.items()))


def clean_env() -> dict[str, str]:
    """The environment without our own keys, so a test's .env decides."""
    env = {k: v for k, v in os.environ.items() if k not in w.SETTINGS}
    env["PYTHONPATH"] = str(HERE)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_own_namespace(flag: str, what: str) -> int | None:
    """Run this command again in a network namespace of its own, unless it runs in one already.

    None when it does (``flag`` is "1" in the environment): go on. Else the
    exit status of the run under ``unshare -n`` (lo up, multicast on lo for
    LSD), or 2 without root or unshare. ``what`` names the program for that error.
    """
    if os.environ.get(flag) == "1":
        return None
    if os.geteuid() != 0 or not shutil.which("unshare"):
        print("%s needs root and unshare (it runs in a network namespace)" % what, file=sys.stderr)
        return 2
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    # 127.0.0.2: aioice gathers every IPv4 address but 127.0.0.1 (faults.py's WebRTC attacks)
    script = ("ip link set lo up && ip route add 224.0.0.0/4 dev lo src 127.0.0.1 && "
              "ip addr add 127.0.0.2/32 dev lo && %s=1 exec %s" % (flag, command))
    return subprocess.call(["unshare", "-n", "sh", "-c", script], cwd=HERE)


# A hostile tracker ##########################################################

async def sdp_pair() -> dict[str, str]:
    """An offer and its answer, as aiortc makes them (no ICE server), whose peer connections
    are already closed: well-formed, and dead."""
    import aiortc
    config = aiortc.RTCConfiguration(iceServers=[])
    offerer, answerer = aiortc.RTCPeerConnection(config), aiortc.RTCPeerConnection(config)
    offerer.createDataChannel("bugout")
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    sdp = {"offer": offerer.localDescription.sdp, "answer": answerer.localDescription.sdp}
    await offerer.close()
    await answerer.close()
    return sdp


class HostileTracker:
    """A WebSocket tracker on 127.0.0.1 that answers announces as bittorrent-tracker does and relays
    nothing: what else it sends is the test's (faults.py's attacks, the tests of trackers' bounds)."""

    def __init__(self, token: str, port: int = 0) -> None:
        self.port = port
        self.info_hash = w.infohash_of(token)[0].decode("latin-1")
        self.sockets: set = set()
        #: the frames the worker sent us (announces, answers), newest last
        self.received: list[dict] = []
        self.connections = 0
        self.sdp: dict[str, str] = {}  # an offer and an answer aiortc made, for the floods

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def start(self) -> HostileTracker:
        from websockets.asyncio.server import serve
        self.server = await serve(self._serve, "127.0.0.1", self.port, compression=None, max_size=None)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = "ws://127.0.0.1:%d" % self.port
        self.sdp = await sdp_pair()
        return self

    async def _serve(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed
        self.sockets.add(ws)
        self.connections += 1
        try:
            async for text in ws:
                frame = json.loads(text)
                self.received.append(frame)
                if frame.get("action") == "announce" and "answer" not in frame:
                    await ws.send(json.dumps({"action": "announce", "interval": 120, "complete": 1,
                                              "incomplete": 0, "info_hash": self.info_hash}))
        except (ConnectionClosed, ValueError):
            pass
        finally:
            self.sockets.discard(ws)

    def relay(self, kind: str, sdp: str, peer_id: str | None = None, offer_id: str | None = None) -> str:
        """A relayed offer or answer as bittorrent-tracker writes it."""
        return json.dumps({"action": "announce", "info_hash": self.info_hash,
                           "peer_id": peer_id or os.urandom(20).decode("latin-1"),
                           "offer_id": offer_id or os.urandom(20).decode("latin-1"),
                           kind: {"type": kind, "sdp": sdp}})

    async def flood(self, until: float, frames: Callable[[], str]) -> dict:
        """Send ``frames()`` to every connected worker as fast as the sockets take them."""
        from websockets.exceptions import ConnectionClosed
        sent = 0
        while time.monotonic() < until:
            if not self.sockets:
                await asyncio.sleep(0.05)
            for ws in list(self.sockets):
                with contextlib.suppress(ConnectionClosed, TimeoutError):  # a worker that reads no more
                    async with asyncio.timeout(max(0.01, until - time.monotonic())):
                        await ws.send(frames())
                        sent += 1
            if sent % 100 == 0:
                await asyncio.sleep(0)  # a worker in this process gets its turns
        return {"frames sent": sent, "tracker connections": self.connections}


def huge_sdp(sdp: str, candidates: int = 20_000) -> str:
    """``sdp`` with this many host candidates more (each a different address): about 1 MB,
    short of the 1 MiB frames the worker took before the bounds."""
    lines = ["a=candidate:1 1 udp 1 10.%d.%d.%d %d typ host" % (i >> 16 & 255, i >> 8 & 255,
                                                               i & 255 or 1, 1024 + i % 60000)
             for i in range(candidates)]
    head, sep, tail = sdp.partition("a=ice-pwd:")
    pwd, _, rest = tail.partition("\r\n")
    return head + sep + pwd + "\r\n" + "\r\n".join(lines) + "\r\n" + rest


# A hostile DHT node #########################################################

async def hanging_peers(count: int, host: str = "127.0.9.%d") -> tuple[list[tuple[str, int]], list[socket.socket]]:
    """Addresses whose SYNs go unanswered (a dial hangs until its timeout), and the sockets that
    make them so (keep them open): listeners with a full backlog that never accept."""
    addrs, sockets = [], []
    for i in range(count):
        sock = socket.socket()
        sock.bind((host % (i + 1), 0))
        sock.listen(0)
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(sock.getsockname())
        sockets += [sock, filler]
        addrs.append(sock.getsockname())
    await asyncio.sleep(0.05)  # the fillers' handshakes fill the backlogs
    return addrs, sockets


class HostileDht:
    """A DHT node on many UDP ports of one address (a Sybil). Every answer names 8 of its own
    ports as nodes, with ids as close to the target as ids can be (``sybil``; else none), and
    a get_peers answer gives ``peers`` (say, 50 that hang)."""

    def __init__(self, host: str, ports: list[int], peers: list[tuple[str, int]], sybil: bool) -> None:
        self.host, self.ports, self.peers, self.sybil = host, ports, peers, sybil
        self.transports: dict[int, Any] = {}
        self.queries: collections.Counter = collections.Counter()
        self.sockets: list[socket.socket] = []

    @classmethod
    async def start(cls, host: str, ports: list[int], peers: int = 50, sybil: bool = True) -> HostileDht:
        """On ``ports`` of ``host`` (0: any), with ``peers`` hanging peers."""
        addrs, sockets = await hanging_peers(peers)
        node = cls(host, [], addrs, sybil)
        node.sockets = sockets
        loop = asyncio.get_running_loop()
        for port in ports:
            transport, _ = await loop.create_datagram_endpoint(lambda: _SybilPort(node), local_addr=(host, port))
            node.transports[transport.get_extra_info("sockname")[1]] = transport
        node.ports = list(node.transports)
        return node

    def close(self) -> None:
        for transport in self.transports.values():
            transport.close()
        for sock in self.sockets:
            sock.close()

    def node_id(self, port: int, near: bytes | None = None) -> bytes:
        if near is None:
            return hashlib.sha1(b"sybil %d" % port).digest()
        return near[:18] + port.to_bytes(2, "big")  # as close to the target as anyone can be

    def answer(self, port: int, data: bytes, addr: tuple) -> None:
        """Answer a query that came to ``port``."""
        with contextlib.suppress(w.DecodeError):
            query = w.parse_krpc(data)
            if not isinstance(query, w.KrpcQuery):
                return
            self.queries[query.method] += 1
            near = query.args.get("target") or query.args.get("info_hash")
            near = near if isinstance(near, bytes) and len(near) == 20 else None
            values: dict = {"token": b"tok"}
            if self.sybil:
                others = random.sample(self.ports, min(8, len(self.ports)))
                values["nodes"] = b"".join(self.node_id(p, near) + w.compact_addr((self.host, p)) for p in others)
            if query.method == "get_peers" and self.peers:
                values["values"] = [w.compact_addr(a) for a in self.peers]
            reply = w.KrpcResponse(query.t, {"id": self.node_id(port, near if self.sybil else None), **values})
            self.transports[port].sendto(bytes(reply), addr)


class _SybilPort(asyncio.DatagramProtocol):
    def __init__(self, node: HostileDht) -> None:
        self.node, self.port = node, 0

    def connection_made(self, transport: Any) -> None:
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.node.answer(self.port, data, addr)
