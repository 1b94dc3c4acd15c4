#!/usr/bin/env python3
"""Replay attacks on the wire against a real worker, in a network namespace; print a table.

    python faults.py [--seconds 10] [ATTACK ...]       (root: it runs itself under unshare -n)

For each attack: a fresh ``python master.py`` and ``python worker.py`` (LOG_LEVEL
info, default settings but loopback discovery) on 127.0.0.1, jobs kept coming
(unbatched), then the attack from a process of its own (``--attacker``, which
makes its payloads first), from other loopback addresses (127.0.x.y), at the
worker's port. Printed per attack: the worker's peak RSS, legitimate jobs/s
in the 5 s before and during the attack, the log lines the worker wrote from
the attack's start until 2 s after it, the longest gap between two results
from the start of the "before" window to the end, and the worker's CPU. The
attacker runs on the same cores as master and worker: the "during" rate pays
for its CPU too. ``QX_FAULTS_LOG=1`` prints the end of each worker's log,
``QX_FAULTS_PROFILE=FILE`` runs the worker under cProfile. Each attack's JSON line adds
the first result after its start (``next_result_s``), and, where master.py restarts
during the attack, the first result after that (``next_result_after_restart_s``).
The attacks from a tracker, WebRTC and the DHT are the attacker's own ``ws://``
tracker or DHT node, named in the worker's .env (no ICE server), which the
attacker starts before the worker and which behave until the attack begins.
The copied-identity attacks first dial the master (or the worker) as a bugout
peer of their own, to read its peer id and handshake keys, then claim them on
wires of their own, dialed again whenever drained; for one of them the master
dials the worker (its ``peers=``), not the reverse.
The ``dependencies`` attack (a list of 10,000) belongs to the Worker's checks.

    python faults.py --master [--seconds 10] [ATTACK ...]

attacks master.py instead ("Attacks on master.py" below): its worker asks for
batches of 10, master.py logs at info, and the log lines counted are
master.py's (stderr, and its stdout events other than results). After each
attack the jobs stop and every job pushed must have its result: printed too
are results lost, taken twice and not from the worker, master.py's peak RSS
and the attacker's CPU, and the worker's rate during the attack of the mean
of its rates in the 5 s before and the 5 s from 2 s after it (its rate
drifts a little as the queue's files grow, and the before window alone
varies by 15 % from run to run with no attack at all).

    python faults.py --master-restart kill|term [--runs 5]

no attack: master.py is stopped (``kill -9``, or SIGTERM) while it serves its
worker, and started again at once with the same command; printed per run,
the seconds from that start to its first new result (issue 25: 30 s after
``kill -9`` before the worker sent its calls again for the new process's key).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import inspect
import itertools
import json
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import support as t
import worker as w

HERE = Path(__file__).resolve().parent
TASK = "class Task:\n    def run(self, job):\n        return job['id']\n"
MIB = 1 << 20


class Swarm:
    """master.py and one worker.py, the master kept supplied with jobs; results timed.

    ``batch``: the worker asks for batches of this size (else one job at a time), and
    master.py logs at info, its stderr in master.log (the attacks on master.py).
    ``master_dials``: the master has the worker in peers=, rather than the reverse."""

    def __init__(self, root: Path, worker_fds: int | None = None, batch: int | None = None,
                 master_dials: bool = False) -> None:
        self.root = root
        self.master_dials = master_dials  # the master has the worker in peers=, rather than the reverse
        self.token = "faults-%d" % random.randrange(1 << 40)
        self.master_port, self.port = t.free_port(), t.free_port()
        self.worker_fds = worker_fds
        #: more .env keys for the worker (an attack's trackers or DHT bootstrap node)
        self.worker_env: dict[str, str] = {}
        self.batch = batch
        self.stamps: list[float] = []
        #: results by job id, by the worker id they name; master.py's other events
        self.ids: collections.Counter = collections.Counter()
        self.by: collections.Counter = collections.Counter()
        self.events: list[dict] = []
        self.pushed = 0
        self.log = open(root / "worker.log", "wb")  # noqa: SIM115 - the worker's stderr, all run long
        self.master_log = open(root / "master.log", "wb")  # noqa: SIM115 - master.py's stderr

    async def start(self) -> Swarm:
        m, wk = self.root / "m", self.root / "w"
        m.mkdir()
        wk.mkdir()
        (m / "task.py").write_text(TASK)
        batched = {"getBatch": "true", "batchSize": self.batch} if self.batch else {}
        dials = {"peers": "127.0.0.1:%d" % (self.port if self.master_dials else self.master_port)}
        t.write_loopback_env(m, self.token, port=self.master_port, LOG_LEVEL="info" if self.batch else "warn",
                             **(dials if self.master_dials else {}))
        t.write_loopback_env(wk, self.token, port=self.port, LOG_LEVEL="info",
                             **({} if self.master_dials else dials), **self.worker_env, **batched)
        await self._start_master()
        limit = self.worker_fds
        profile = ["-m", "cProfile", "-o", os.environ["QX_FAULTS_PROFILE"]] if os.environ.get(
            "QX_FAULTS_PROFILE") else []
        self.worker = await asyncio.create_subprocess_exec(
            sys.executable, *profile, str(HERE / "worker.py"), cwd=wk, env=t.clean_env(), stderr=self.log,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))) if limit else None)
        self._tasks = [asyncio.ensure_future(self._read(self.master)), asyncio.ensure_future(self._feed())]
        await t.until(lambda: len(self.stamps) > 100, 60)
        return self

    async def _start_master(self) -> None:
        self.master = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "master.py"), "--task", "task.py", "--jobs", "-", cwd=self.root / "m",
            env=t.clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.master_log)
        await self.master.stdout.readline()  # ready

    async def restart_master(self) -> float:
        """Stop master.py and start it again (its address, port and queue kept): it dials in anew.
        Returns when it was started again."""
        self.master.terminate()
        await self.master.wait()
        started = time.monotonic()
        await self._start_master()
        self._tasks.append(asyncio.ensure_future(self._read(self.master)))
        return started

    async def _read(self, master: asyncio.subprocess.Process) -> None:
        async for line in master.stdout:
            event = json.loads(line)
            if event.get("event") == "result":
                self.stamps.append(time.monotonic())
                self.ids[event["result"].get("jobID")] += 1
                self.by[str(event["result"].get("worker", {}).get("id"))] += 1
            else:
                self.events.append(event)

    async def _feed(self) -> None:
        while True:
            if self.pushed - len(self.stamps) < 2000:
                lines = "".join('{"id": %d, "data": ""}\n' % i for i in range(self.pushed, self.pushed + 500))
                self.master.stdin.write(lines.encode())
                self.pushed += 500
            await asyncio.sleep(0.05)

    async def settle(self, timeout: float = 90.0) -> dict:
        """Stop the jobs; once each pushed job has its result (or ``timeout``): none lost or twice,
        all from the worker? And master.py's memory."""
        self._tasks[1].cancel()
        self.master.stdin.close()  # --jobs - read to its end: the run can finish
        await asyncio.sleep(0)
        with contextlib.suppress(AssertionError):
            await t.until(lambda: len(self.ids) >= self.pushed, timeout)
        honest = self.by.most_common(1)[0][1] if self.by else 0
        return {"master_peak_rss_mb": self.peak_rss_mb(self.master),
                "master_rss_mb": self.peak_rss_mb(self.master, "VmRSS:"),
                "lost": self.pushed - len(self.ids), "twice": sum(c - 1 for c in self.ids.values()),
                "not from the worker": self.by.total() - honest}

    def rate(self, start: float, end: float) -> float:
        return sum(1 for s in self.stamps if start <= s < end) / (end - start)

    def longest_gap(self, start: float, end: float) -> float:
        inside = [start] + [s for s in self.stamps if start <= s <= end] + [end]
        return max(b - a for a, b in itertools.pairwise(inside))

    def log_lines(self, master: bool = False) -> int:
        """Lines the worker logged so far (``master``: master.py, with its events other than results)."""
        if master:
            return (self.root / "master.log").read_bytes().count(b"\n") + len(self.events)
        self.log.flush()
        return (self.root / "worker.log").read_bytes().count(b"\n")

    def cpu_seconds(self, proc: asyncio.subprocess.Process | None = None) -> float:
        """User and system CPU the worker (or ``proc``) used so far."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = (proc or self.worker).pid
            fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return float("nan")

    def peak_rss_mb(self, proc: asyncio.subprocess.Process | None = None, field: str = "VmHWM:") -> float:
        """The worker's (or ``proc``'s) peak RSS (``field="VmRSS:"``: its RSS now)."""
        with contextlib.suppress(OSError):
            for line in Path("/proc/%d/status" % (proc or self.worker).pid).read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
        return float("nan")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for proc in (self.worker, self.master):
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        self.log.close()
        self.master_log.close()


# The attacker's wires ########################################################

class Target:
    """What the attacker process knows of the worker: its port and the target's token."""

    def __init__(self, port: int, token: str, aux_port: int = 0, master_port: int = 0) -> None:
        self.port, self.token, self.master_port = port, token, master_port
        #: where the attacker's own tracker or DHT node listens (the worker is told in its .env)
        self.aux_port = aux_port
        #: what the attack made before it began
        self.prepared: object = None
        #: the number the measure sends with "go" (the results so far)
        self.hint = 0


async def connect(target: Target, src: str, rcvbuf: int | None = None) -> tuple:
    """A TCP connection from ``src`` (a 127.0.0.x address) to the worker; (reader, writer)."""
    sock = socket.socket()
    if rcvbuf:  # a peer that never reads: a small receive window
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((src, 0))
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", target.port))
    except OSError:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=1 << 16)


def hello(target: Target, ident: w.Identity | None = None) -> bytes:
    """Our BitTorrent and BEP 10 handshakes, as a bugout peer (keys of ``ident``)."""
    ident = ident or w.Identity()
    infohash, _ = w.infohash_of(target.token)
    ext = {"m": {"bo_channel": 4}, "id": target.token, "pk": ident.pk, "ek": ident.ek}
    peer_id = b"-FA0000-" + os.urandom(6).hex().encode()
    return w.handshake_bytes(infohash, peer_id) + w.frame(20, b"\0" + w.bencode(ext))


def payload_frame(payload: bytes) -> bytes:
    return w.frame(20, b"\x04" + payload)  # 4: the worker's bo_channel id


def src(i: int) -> str:
    return "127.0.%d.%d" % (1 + i // 250, 2 + i % 250)


async def hold(writers: list, until: float) -> None:
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    for writer in writers:
        writer.close()


# The attacks #################################################################

async def sinks(target: Target, count: int = 8) -> list:
    """Bugout peers that never read: whatever is sent to them piles up."""
    writers = []
    for i in range(count):
        _, writer = await connect(target, src(100 + i), rcvbuf=4096)
        writer.write(hello(target))
        writers.append(writer)
    return writers


async def garbage_relayed(target: Target, until: float) -> dict:
    """10 payloads of 4 MiB of garbage, with 8 wires that never read."""
    writers = await sinks(target)
    _, sender = await connect(target, src(1))
    sender.write(hello(target))
    for _ in range(10):
        sender.write(payload_frame(os.urandom(4 * MIB)))
        await sender.drain()
    await hold(writers + [sender], until)
    return {}


async def envelopes_relayed(target: Target, until: float) -> dict:
    """As above with well-formed envelopes boxed for nobody (they are relayed, within bounds)."""
    writers = await sinks(target)
    _, sender = await connect(target, src(1))
    sender.write(hello(target))
    for _ in range(10):
        envelope = w.bencode({"e": os.urandom(4 * MIB), "ek": w.b58encode(os.urandom(32)),
                              "n": os.urandom(24)})
        sender.write(payload_frame(envelope))
        await sender.drain()
    await hold(writers + [sender], until)
    return {}


async def unfinished(target: Target, until: float) -> dict:
    """8 wires each send 59 MiB of a 60 MiB message, then wait."""
    chunk = bytes(MIB)
    writers = []
    for i in range(8):
        _, writer = await connect(target, src(1 + i))
        writer.write(hello(target) + struct.pack(">IBB", 60 * MIB + 2, 20, 4))
        writers.append(writer)
    for _ in range(59):
        for writer in writers:
            if not writer.is_closing():
                writer.write(chunk)
        for writer in writers:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
    await hold(writers, until)
    return {}


async def half_open(target: Target, until: float, count: int = 1100) -> dict:
    """1,100 connections that never finish their handshake, opened again as they are closed."""
    opened = 0

    async def one(i: int) -> None:
        nonlocal opened
        while time.monotonic() < until:
            try:
                reader, writer = await connect(target, src(i))
            except OSError:
                await asyncio.sleep(0.2)
                continue
            opened += 1
            writer.write(hello(target)[:30])  # a third of a handshake
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(reader.read(), max(0.0, until - time.monotonic()))
            writer.close()
    await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    return {"connections": opened}


def signed(token: str, ident: w.Identity, fields: dict) -> bytes:
    return w.BugoutCore(token, ident).make_packet(fields, w._now())


def identity_pings(target: Target, count: int = 30000) -> list[bytes]:
    """30,000 pings, each signed by a new identity (made before the attack)."""
    return [payload_frame(signed(target.token, w.Identity(), {"y": "p"})) for _ in range(count)]


async def identity_flood(target: Target, until: float, wires: int = 4) -> dict:
    """30,000 new bugout identities (a signed ping each) over 4 wires."""
    pings, count = target.prepared, len(target.prepared)
    writers = []
    for i in range(wires):
        with contextlib.suppress(OSError):
            _, writer = await connect(target, src(1 + i))
            writer.write(hello(target))
            writers.append(writer)
    sent = 0
    for i in range(0, count, 100):
        writer = writers[i // 100 % len(writers)]
        if writer.is_closing():
            continue
        writer.write(b"".join(pings[i:i + 100]))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            sent += 100
    await hold(writers, until)
    return {"wires": len(writers), "pings sent": sent}


async def identity_flood_spread(target: Target, until: float) -> dict:
    """The same from 250 addresses (the per-address limit then counts little; the table's holds)."""
    return await identity_flood(target, until, 250)


async def deep_json(target: Target, until: float) -> dict:
    """Messages holding ~200 KB of nested JSON, ten a second, on one wire (again if it is dropped)."""
    ident = w.Identity()
    deep = "[" * 100_000 + "]" * 100_000
    sent, wires = 0, 0
    while time.monotonic() < until:
        _, writer = await connect(target, src(1))
        wires += 1
        writer.write(hello(target, ident))
        with contextlib.suppress(ConnectionError):
            while time.monotonic() < until:
                writer.write(payload_frame(signed(target.token, ident, {"y": "m", "v": deep})))
                sent += 1
                await writer.drain()
                await asyncio.sleep(0.1)
        writer.close()
    return {"messages": sent, "wires": wires}


# Attacks from a tracker, from WebRTC peers and from the DHT ##################
#
# The worker is told of the attacker's own tracker (``trackers=ws://...``, no
# ICE server) or DHT node (``dhtBootstrap``) in its .env; the attacker process
# starts them before the worker (``prepare``), and they behave until "go".

def via_tracker(attack: Callable) -> Callable:
    """The worker uses the attacker's WebSocket tracker, host candidates only."""
    attack.worker_env = lambda aux: {"trackers": "ws://127.0.0.1:%d" % aux, "iceServers": ""}
    return attack


#: the hostile DHT node's address (the master's and the worker's are 127.0.0.1)
DHT_HOST = "127.0.5.1"


def via_dht(attack: Callable) -> Callable:
    """The worker's DHT starts from the attacker's node."""
    attack.worker_env = lambda aux: {"dht": "true", "dhtBootstrap": "%s:%d" % (DHT_HOST, aux)}
    return attack


async def hostile_tracker(target: Target) -> t.HostileTracker:
    return await t.HostileTracker(target.token, target.aux_port).start()


@via_tracker
async def tracker_log_flood(target: Target, until: float) -> dict:
    """A tracker sending a 1,000-character ``failure reason`` in a loop."""
    tracker: t.HostileTracker = target.prepared
    frame = json.dumps({"action": "announce", "info_hash": tracker.info_hash, "failure reason": "x" * 1000})
    return await tracker.flood(until, lambda: frame)


@via_tracker
async def offer_flood(target: Target, until: float) -> dict:
    """Valid offers (aiortc's), each from a new peer id, relayed as fast as the socket takes them."""
    tracker: t.HostileTracker = target.prepared
    return await tracker.flood(until, lambda: tracker.relay("offer", tracker.sdp["offer"]))


@via_tracker
async def answer_flood(target: Target, until: float) -> dict:
    """Valid answers to offers the worker never made."""
    tracker: t.HostileTracker = target.prepared
    return await tracker.flood(until, lambda: tracker.relay("answer", tracker.sdp["answer"]))


#: SDP that aiortc must refuse: cut short, lines of junk, a missing fingerprint, numbers out of range
MALFORMED_SDP = ("v=0\r\n", "garbage", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=application",
                 ("v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=ice-ufrag:x\r\n"
                  "a=candidate:1 1 udp 99999999999 999.1.1.1 -5 typ host\r\n"), "\r\n" * 1000)


@via_tracker
async def malformed_sdp(target: Target, until: float) -> dict:
    """Offers whose SDP aiortc cannot take, and offers with a valid SDP cut at random places."""
    tracker: t.HostileTracker = target.prepared
    good = tracker.sdp["offer"]
    return await tracker.flood(until, lambda: tracker.relay(
        "offer", random.choice(MALFORMED_SDP + (good[:random.randrange(len(good))],))))


@via_tracker
async def huge_sdp_offers(target: Target, until: float) -> dict:
    """Offers of 20,000 host candidates (about 1 MB of SDP), one a second."""
    tracker: t.HostileTracker = target.prepared
    offer = t.huge_sdp(tracker.sdp["offer"])
    sent = 0
    while time.monotonic() < until:
        for ws in list(tracker.sockets):
            with contextlib.suppress(Exception):
                await ws.send(tracker.relay("offer", offer))
                sent += 1
        await asyncio.sleep(1.0)
    return {"offers sent": sent, "sdp bytes": len(offer), "tracker connections": tracker.connections}


@via_tracker
async def channel_message_flood(target: Target, until: float, size: int = 65 * MIB) -> dict:
    """A peer that the worker answers (through the tracker), then one data-channel message of
    65 MiB: more than the worker's maxMessage (64 MiB); again on a new connection when closed."""
    import aiortc
    tracker: t.HostileTracker = target.prepared
    config = aiortc.RTCConfiguration(iceServers=[])
    notes = {"connections": 0, "messages sent": 0, "answers": 0}
    while time.monotonic() < until:
        pc = aiortc.RTCPeerConnection(config)
        channel = pc.createDataChannel("bugout")
        opened, closed = asyncio.Event(), asyncio.Event()
        channel.on("open", opened.set)
        channel.on("close", closed.set)
        await pc.setLocalDescription(await pc.createOffer())
        peer_id, offer_id = os.urandom(20).decode("latin-1"), os.urandom(20).decode("latin-1")
        seen = len(tracker.received)
        for ws in list(tracker.sockets):
            with contextlib.suppress(Exception):
                await ws.send(tracker.relay("offer", pc.localDescription.sdp, peer_id, offer_id))
        try:
            async with asyncio.timeout(max(0.1, until - time.monotonic())):
                while not any(f.get("offer_id") == offer_id and "answer" in f for f in tracker.received[seen:]):
                    await asyncio.sleep(0.02)
                answer = next(f for f in tracker.received[seen:] if f.get("offer_id") == offer_id)
                notes["answers"] += 1
                await pc.setRemoteDescription(aiortc.RTCSessionDescription(**answer["answer"]))
                await opened.wait()
                notes["connections"] += 1
                pc.sctp._remote_max_message_size = 0  # a hostile sender ignores the max-message-size it was told
                channel.send(bytes(size))
                notes["messages sent"] += 1
                await closed.wait()
        except TimeoutError:
            pass
        finally:
            await pc.close()
    return notes


async def hostile_dht(target: Target) -> t.HostileDht:
    """The Sybil node on ``aux_port`` and 63 more ports of DHT_HOST."""
    return await t.HostileDht.start(DHT_HOST, [target.aux_port] + [0] * 63)


@via_dht
async def dht_flood(target: Target, until: float) -> dict:
    """The worker's bootstrap node is a Sybil of 64 ports that answers with fake nodes and hanging
    peers; from go, it sends the worker's DHT port queries from every port (each asks to be pinged
    back), junk, 64 KB datagrams and answers nobody asked for, as fast as it can."""
    node: t.HostileDht = target.prepared
    worker = ("127.0.0.1", target.port)  # the worker's DHT port: its TCP port's number
    junk = [b"", b"d1:t2:aa1:y1:qe", b"l" * 5000, os.urandom(1400), b"d" * 65000,
            bytes(w.KrpcResponse(b"zz", {"id": os.urandom(20), "nodes": os.urandom(26 * 100)}))]
    sent = 0
    while time.monotonic() < until:
        for port, transport in node.transports.items():
            ping = w.KrpcQuery(os.urandom(2), "ping", {"id": node.node_id(port)})
            transport.sendto(bytes(ping), worker)
            transport.sendto(random.choice(junk), worker)
            sent += 2
        await asyncio.sleep(0.001)
    return {"datagrams sent": sent, **{"queries " + k: v for k, v in node.queries.items()}}


# Copied identities: a peer id and handshake keys are claims (PROTOCOL.md section 3)

async def peer_facts(port: int, token: str, ident: w.Identity | None = None) -> tuple:
    """Dial a peer as a bugout peer of our own (a Python one: ``-QP``); (its peer id, its BEP 10
    handshake, reader, writer, our PeerWire), the wire still open."""
    ident = ident or w.Identity()
    infohash, _ = w.infohash_of(token)
    wire = w.PeerWire(infohash, w.make_peer_id(), {"m": {"bo_channel": 4}, "id": token, "pk": ident.pk,
                                                   "ek": ident.ek}, initiator=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(wire.data_to_send())
    while wire.remote_extended is None:
        data = await asyncio.wait_for(reader.read(1 << 16), 10)
        if not data:
            raise ConnectionError("the peer closed the wire")
        wire.receive_data(data)
        writer.write(wire.data_to_send())
    return wire.remote_peer_id, wire.remote_extended, reader, writer, wire


async def claim(port: int, token: str, peer_id: bytes, fields: dict) -> tuple:
    """A wire to ``port`` claiming ``peer_id`` and the keys in ``fields``, dialed from a low port
    (a dialer port that sorts first); (reader, writer)."""
    infohash, _ = w.infohash_of(token)
    ext = {"m": {"bo_channel": 4}, "id": token, "pk": fields["pk"], "ek": fields["ek"]}
    for _ in range(100):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", random.randrange(10000, 20000)))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            break
        except OSError:
            sock.close()
    else:
        raise OSError("no low port to dial from")
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(w.handshake_bytes(infohash, peer_id) + w.frame(20, b"\0" + w.bencode(ext)))
    return reader, writer


async def hold_claims(port: int, token: str, peer_id: bytes, fields: dict, until: float,
                      payloads: list[bytes] = ()) -> int:
    """Keep a claiming wire up until ``until`` (dialed again whenever it is closed), ``payloads``
    written on each; how many wires it took."""
    wires = 0
    while time.monotonic() < until:
        try:
            reader, writer = await claim(port, token, peer_id, fields)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        wires += 1
        writer.write(b"".join(payload_frame(p) for p in payloads))
        with contextlib.suppress(ConnectionError, TimeoutError):
            while await asyncio.wait_for(reader.read(1 << 16), max(0.01, until - time.monotonic())):
                pass
        writer.close()
    return wires


async def copied_master(target: Target, until: float) -> dict:
    """The master's peer id and keys, read from its handshake, claimed on wires to the worker."""
    peer_id, fields, _, writer, _ = await peer_facts(target.master_port, target.token)
    writer.close()
    return {"wires": await hold_claims(target.port, target.token, peer_id, fields, until)}


async def copied_worker(target: Target, until: float) -> dict:
    """The same against master.py: the worker's peer id and keys, claimed on wires to the master."""
    peer_id, fields, _, writer, _ = await peer_facts(target.port, target.token)
    writer.close()
    return {"wires": await hold_claims(target.master_port, target.token, peer_id, fields, until)}


def master_pings(target: Target) -> dict:
    """Collect, in the background once the master is up, pings the master signed: a hello boxed
    for us (the worker saw none of these) and its broadcasts."""
    return {"pings": asyncio.ensure_future(_collect_pings(target))}  # not awaitable: the master starts later


async def _collect_pings(target: Target) -> tuple:
    """(the master's peer id, its handshake, the pings it signed, when they came)."""
    ident = w.Identity()
    core = w.BugoutCore(target.token, ident)
    while True:
        try:
            peer_id, fields, reader, writer, wire = await peer_facts(target.master_port, target.token, ident)
            break
        except OSError:
            await asyncio.sleep(0.2)
    master, pings = w.address_of(w.b58decode(fields["pk"])), []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2.0):
            while data := await reader.read(1 << 16):
                wire.receive_data(data)
                for event in wire.events_received():
                    if isinstance(event, w.ExtensionPayload):
                        core.receive_payload(event.payload, w._now())
                        outer = w.bdecode(event.payload)
                        signed = core._unbox(outer) if "e" in outer else outer
                        if core.verified is not None and core.verified.address == master and signed:
                            pings.append(w.bencode(signed))
    writer.close()
    return peer_id, fields, pings, time.monotonic()


async def replayed_ping(target: Target, until: float) -> dict:
    """A wire claiming the master (its peer id and keys) replays pings the master signed 11 s before."""
    peer_id, fields, pings, got = await target.prepared["pings"]
    await asyncio.sleep(max(0.0, got + w.FRESH_MS / 1000 + 1 - time.monotonic()))  # old now: replays
    wires = await hold_claims(target.port, target.token, peer_id, fields, until, pings)
    return {"wires": wires, "pings replayed": len(pings)}


async def silent_wires(target: Target, until: float, hosts: int = 1, count: int = 200) -> dict:
    """200 finished bugout wires that say nothing more, from one host (opened again if closed);
    the master dials the worker (MASTER_DIALS): its wire is one of the inbound ones."""
    opened = 0

    async def one(i: int) -> None:
        nonlocal opened
        while time.monotonic() < until:
            try:
                reader, writer = await connect(target, src(i % hosts))
            except OSError:
                await asyncio.sleep(0.2)
                continue
            opened += 1
            writer.write(hello(target))
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(reader.read(), max(0.0, until - time.monotonic()))
            writer.close()
            await asyncio.sleep(1.0)  # holding its wires, not a connect flood (half-open is one)
    await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    return {"connections": opened}


async def silent_wires_spread(target: Target, until: float) -> dict:
    """The same from 200 hosts: maxInbound (200) is the cap that bites."""
    return await silent_wires(target, until, hosts=200)


async def silent_wires_restart(target: Target, until: float) -> dict:
    """From 200 hosts, and master.py restarts 2 s in: it dials in while the cap is full."""
    return await silent_wires(target, until, hosts=200)


silent_wires_restart.restart_master = 2.0  # type: ignore[attr-defined]


def _count_syns(host: str, counts: dict, stop: list) -> None:
    """Count TCP SYNs to ``host`` on lo, per second (a thread: AF_PACKET, root in the namespace)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    sock.bind(("lo", 0))
    sock.settimeout(0.2)
    target = socket.inet_aton(host)
    while not stop:
        try:
            frame = sock.recv(256)
        except TimeoutError:
            continue
        ip = frame[14:]
        if len(ip) < 40 or ip[9] != 6 or ip[16:20] != target:
            continue
        flags = ip[(ip[0] & 15) * 4 + 13]
        if flags & 0x12 == 0x02:  # SYN, not SYN-ACK
            second = int(time.monotonic())
            counts[second] = counts.get(second, 0) + 1
    sock.close()


async def lsd_flood(target: Target, until: float) -> dict:
    """BT-SEARCH announces for the swarm as fast as one process sends them, each naming another
    port, from one host; counted: the dials the worker makes to that host (SYNs seen on lo)."""
    infohash, _ = w.infohash_of(target.token)
    sender = src(7)
    counts: dict[int, int] = {}
    stop: list = []
    loop = asyncio.get_running_loop()
    counter = loop.run_in_executor(None, _count_syns, sender, counts, stop)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((sender, 0))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sender))
    sock.setblocking(False)
    sent, port = 0, 1024
    datagrams = [w.lsd_announcement(infohash, p, "bittorrent-lsd-" + os.urandom(20).hex())
                 for p in range(1024, 1024 + 4096)]
    while time.monotonic() < until:
        for _ in range(500):
            with contextlib.suppress(BlockingIOError):
                sock.sendto(datagrams[port % 4096], (w.LSD_HOST, w.LSD_PORT))
                sent += 1
            port += 1
        await asyncio.sleep(0)
    sock.close()
    await asyncio.sleep(1.0)
    stop.append(True)
    await counter
    return {"datagrams sent": sent, "dials": sum(counts.values()),
            "most dials in a second": max(counts.values(), default=0)}


lsd_flood.worker_env = lambda aux: {"lsd": "true"}  # type: ignore[attr-defined]


#: name -> (attack, the worker's descriptor limit, what prepares its payloads)
ATTACKS = {
    "garbage relayed": (garbage_relayed, None, None),
    "envelopes relayed": (envelopes_relayed, None, None),
    "unfinished messages": (unfinished, None, None),
    "half-open, fd limit 1024": (half_open, 1024, None),
    "half-open, fd limit 64": (half_open, 64, None),
    "identity flood": (identity_flood, None, identity_pings),
    "identity flood, 250 addresses": (identity_flood_spread, None, identity_pings),
    "deep JSON": (deep_json, None, None),
    "tracker: failure reasons in a loop": (tracker_log_flood, None, hostile_tracker),
    "tracker: offer flood": (offer_flood, None, hostile_tracker),
    "tracker: answers to no offer": (answer_flood, None, hostile_tracker),
    "tracker: malformed SDP": (malformed_sdp, None, hostile_tracker),
    "tracker: 20,000-candidate SDP": (huge_sdp_offers, None, hostile_tracker),
    "webrtc: 65 MiB channel message": (channel_message_flood, None, hostile_tracker),
    "dht: hostile bootstrap node": (dht_flood, None, hostile_dht),
    "copied master, worker dials": (copied_master, None, None),
    "copied master, master dials": (copied_master, None, None),
    "copied worker, at master.py": (copied_worker, None, None),
    "replayed ping, claims master": (replayed_ping, None, master_pings),
    "200 silent wires, one host": (silent_wires, None, None),
    "200 silent wires, 200 hosts": (silent_wires_spread, None, None),
    "200 silent wires, the master dials in": (silent_wires_restart, None, None),
    "LSD flood": (lsd_flood, None, None),
}
#: attacks whose master dials the worker (its peers= names the worker), not the reverse
MASTER_DIALS = {"copied master, master dials", "200 silent wires, one host", "200 silent wires, 200 hosts",
                "200 silent wires, the master dials in"}


# Attacks on master.py ########################################################
#
# ``python faults.py --master``: the target is master.py, its worker asks for
# batches of 10, and the attacker is a peer that knows only the token. Each of
# its identities calls on a raw wire of its own, from an address of its own
# (master.py takes new identities from one address 32 at once, then one a
# second). After the attack the feed stops and every job pushed must have
# exactly one result, from the honest worker.

#: Seconds between two requestWork of one identity in the lease floods (the attack of issue 22).
FLOOD_EVERY = 0.05
#: Jobs per batch the honest worker asks master.py for.
MASTER_BATCH = 10


class Caller:
    """A raw bugout wire to master.py carrying the calls of one token-only identity."""

    def __init__(self, target: Target, src: str, keep: bool = False) -> None:
        self.target, self.src = target, src
        self.core = w.BugoutCore(target.token, w.Identity())
        #: ``keep``: answers are opened and kept (else the wire is read and dropped)
        self.keep = keep
        self.answers: list = []
        self.master = ""

    async def start(self) -> Caller:
        ident, token = self.core.identity, self.target.token
        self.wire = w.PeerWire(w.infohash_of(token)[0], w.make_peer_id(),
                               {"ek": ident.ek, "id": token, "m": {"bo_channel": 4}, "pk": ident.pk},
                               initiator=True)
        self.reader, self.writer = await connect(self.target, self.src)
        self.writer.write(self.wire.data_to_send())
        self._reading = asyncio.ensure_future(self._read())
        await t.until(lambda: self.master, 10)
        return self

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await self.reader.read(1 << 16):
                if self.master and not self.keep:
                    continue  # read, so that the wire stays; not parsed
                self.wire.receive_data(data)
                for event in self.wire.events_received():
                    if isinstance(event, w.ExtendedHandshake):
                        seen = self.core.saw_peer(event.fields["pk"].decode(), event.fields["ek"].decode(),
                                                  w._now(), verified=True)
                        self.master = next(e.address for e in seen if isinstance(e, w.Seen))
                    elif isinstance(event, w.ExtensionPayload):
                        self.answers += [e.result for e in self.core.receive_payload(event.payload, w._now())
                                         if isinstance(e, w.Response)]
                self._send()

    def call(self, name: str, args: object) -> None:
        self.core.send_call(self.master, name, args, w._now())
        self._send()

    def _send(self) -> None:
        for payload, _ in self.core.data_to_send():
            self.wire.send_extension(payload)
        if data := self.wire.data_to_send():
            self.writer.write(data)

    def close(self) -> None:
        self._reading.cancel()
        self.writer.close()


async def callers(target: Target, count: int, keep: bool = False) -> list[Caller]:
    return [await Caller(target, src(1 + i), keep).start() for i in range(count)]


async def lease_flood(target: Target, until: float, identities: int = 1) -> dict:
    """requestWork {getBatch, batchSize: 1000} every 50 ms, from one token-only identity."""
    wires = await callers(target, identities)
    calls = 0
    while time.monotonic() < until:
        for caller in wires:
            caller.call("requestWork", {"getBatch": True, "batchSize": 1000})
            calls += 1
        await asyncio.sleep(FLOOD_EVERY)
    await hold([caller.writer for caller in wires], until)
    return {"identities": identities, "calls": calls}


async def lease_flood_50(target: Target, until: float) -> dict:
    """The same from 50 identities, each every 50 ms."""
    return await lease_flood(target, until, 50)


#: What a peer can send as numbers and results: JSON that decodes to infinity, NaN, huge and
#: negative numbers, wrong types; ciphertexts of garbage.
ABSURD = [{"getBatch": True, "batchSize": size} for size in
          (1e400, -1e400, float("nan"), 10 ** 400, -1, 0, 0.5, "1e400", "ten", [], {}, True, None)] + [
    5, "x", [1, 2], None, {"getBatch": [], "batchSize": {"n": 1}},
    {"getBatch": True, "batchSize": 10, "results": {"iv": "zz", "encryptedData": 7}}]


async def absurd_numbers(target: Target, until: float, count: int = 2000) -> dict:
    """2,000 calls with absurd arguments (requestWork, shareResults, requestExecAssets, proveKey)."""
    caller = (await callers(target, 1, keep=True))[0]
    calls = [("requestWork", args) for args in ABSURD]
    calls += [(name, args) for name in ("shareResults", "shareResultsBatch", "proveKey") for args in ABSURD[-6:]]
    calls += [("requestExecAssets", {"currentHash": 1e400}), ("isMaster", {"challenge": 10 ** 400})]
    for i in range(count):
        caller.call(*calls[i % len(calls)])
        if i % 20 == 19:
            await caller.writer.drain()
            await asyncio.sleep(0.005)
    await t.until(lambda: len(caller.answers) >= count or time.monotonic() > until, until - time.monotonic() + 5)
    await hold([caller.writer], until)
    errors = sum(isinstance(a, dict) and "error" in a for a in caller.answers)
    return {"calls": count, "answered": len(caller.answers), "error answers": errors}


def forged(known: dict, plain: bytes, text: bytes) -> dict:
    """A one-block ciphertext that decrypts to ``text`` (at most 15 bytes), made from a known
    one, ``known`` (iv, encryptedData), whose first 16 plaintext bytes are ``plain``: AES-CBC
    has no MAC. The most a peer without the key makes of one known plaintext block."""
    padded = text + bytes([16 - len(text)]) * (16 - len(text))
    iv = bytes(a ^ b ^ c for a, b, c in zip(bytes.fromhex(known["iv"]), plain[:16], padded))
    return {"iv": iv.hex(), "encryptedData": known["encryptedData"][:32]}


async def bogus_results(target: Target, until: float) -> dict:
    """Results for jobs on lease to others: forged from task.py's known plaintext (``{"jobID": N}``
    for the ids being worked on), and garbage, on shareResults, shareResultsBatch and requestWork."""
    caller = (await callers(target, 1, keep=True))[0]
    caller.call("requestExecAssets", {"currentHash": ""})
    await t.until(lambda: caller.answers, 10)
    known = next(f["content"] for f in caller.answers[0]["files"] if f["name"] == "task.py")
    sent = 0
    while time.monotonic() < until:  # 300 calls a second (the node's bounds are faults.py's other part)
        for _ in range(5):
            job = target.hint + sent // 3 % 2500  # the ids waiting or on lease when the attack began
            result = forged(known, TASK.encode(), b'{"jobID":%d}' % (job % 100_000))
            caller.call("shareResults", json.dumps(result))
            garbage = {"iv": os.urandom(16).hex(), "encryptedData": os.urandom(48).hex()}
            caller.call(("shareResultsBatch", "shareResults")[job % 2], garbage)
            caller.call("requestWork", {"results": json.dumps(forged(known, TASK.encode(), b"[%d]" % job))})
            sent += 3
        await caller.writer.drain()
        await asyncio.sleep(0.05)
    await hold([caller.writer], until)
    return {"calls": sent}


#: name -> (attack, the worker's descriptor limit, what prepares its payloads): on master.py
MASTER_ATTACKS = {
    "lease flood, 1 identity": (lease_flood, None, None),
    "lease flood, 50 identities": (lease_flood_50, None, None),
    "2,000 absurd numbers": (absurd_numbers, None, None),
    "bogus results": (bogus_results, None, None),
}


async def attacker(name: str, port: int, token: str, seconds: float, aux_port: int = 0,
                   master_port: int = 0) -> int:
    """The attacker process: prepare, say ready, wait for go, attack, print notes."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))  # it holds many sockets
    attack, _, prepare = {**ATTACKS, **MASTER_ATTACKS}[name]
    target = Target(port, token, aux_port, master_port)
    if prepare is not None:
        target.prepared = prepare(target)
        if inspect.isawaitable(target.prepared):  # a server of its own, up before the worker
            target.prepared = await target.prepared
    print("ready", flush=True)
    go = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    target.hint = int(go.split()[1]) if len(go.split()) > 1 else 0
    try:
        notes = await asyncio.wait_for(attack(target, time.monotonic() + seconds), seconds + 120)
    except (OSError, TimeoutError) as exc:  # the worker may drop the attacker's wires
        notes = {"attack ended": repr(exc)}
    print(json.dumps(notes), flush=True)
    return 0


async def _restart_later(swarm: Swarm, delay: float) -> float:
    await asyncio.sleep(delay)
    return await swarm.restart_master()


def _after_restart(swarm: Swarm, restarted: float, start: float) -> dict:
    """When the master was started again (from the attack's start), and its first result since."""
    return {"master_restarted_s": restarted - start, "next_result_after_restart_s": next(
        (s - restarted for s in swarm.stamps if s >= restarted), float("nan"))}


async def measure(name: str, seconds: float) -> dict:
    """One attack on a fresh master and worker; the attacker is a process of its own."""
    on_master = name in MASTER_ATTACKS
    with tempfile.TemporaryDirectory(prefix="qx-faults-") as tmp:
        attack, fds, _ = {**ATTACKS, **MASTER_ATTACKS}[name]
        swarm = Swarm(Path(tmp), fds, MASTER_BATCH if on_master else None, name in MASTER_DIALS)
        aux_port = t.free_port()
        swarm.worker_env = getattr(attack, "worker_env", lambda aux: {})(aux_port)
        proc = None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "faults.py"), "--attacker", name, "--port",
                str(swarm.master_port if on_master else swarm.port), "--token", swarm.token, "--seconds",
                str(seconds), "--aux-port", str(aux_port), "--master-port", str(swarm.master_port), cwd=HERE,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            await asyncio.wait_for(proc.stdout.readline(), 300)  # ready: its payloads (and servers) are made
            await swarm.start()
            await asyncio.sleep(2.0)  # warm
            before = time.monotonic()
            await asyncio.sleep(5.0)
            start, lines, cpu = time.monotonic(), swarm.log_lines(on_master), swarm.cpu_seconds()
            master_cpu, attacker_cpu = swarm.cpu_seconds(swarm.master), swarm.cpu_seconds(proc)
            proc.stdin.write(b"go %d\n" % len(swarm.stamps))
            restart = getattr(attack, "restart_master", None)  # it dials in during the attack
            restarting = asyncio.ensure_future(_restart_later(swarm, restart)) if restart else None
            notes = json.loads(await asyncio.wait_for(proc.stdout.readline(), seconds + 180) or "{}")
            await asyncio.sleep(start + seconds - time.monotonic())  # an attack may end early
            end = time.monotonic()
            cpu = swarm.cpu_seconds() - cpu
            master_cpu = swarm.cpu_seconds(swarm.master) - master_cpu
            attacker_cpu = swarm.cpu_seconds(proc) - attacker_cpu
            await asyncio.sleep(2.0)
            lines = swarm.log_lines(on_master) - lines
            after = time.monotonic()
            if on_master:  # the rate drifts as the queue's files grow: the mean of before and after
                await asyncio.sleep(5.0)
            if os.environ.get("QX_FAULTS_LOG"):
                print((swarm.root / ("master.log" if on_master else "worker.log")).read_text()[-3000:],
                      file=sys.stderr)
            if on_master:
                notes.update(await swarm.settle())
            return {"attack": name, "peak_rss_mb": swarm.peak_rss_mb(),
                    "jobs_per_s_before": swarm.rate(before, start),
                    "jobs_per_s_during": swarm.rate(start, end), "log_lines": lines,
                    **({"jobs_per_s_after": swarm.rate(after, after + 5.0)} if on_master else {}),
                    "longest_gap_s": swarm.longest_gap(before, end + 2.0),
                    "next_result_s": next((s - start for s in swarm.stamps if s >= start), float("nan")),
                    **(_after_restart(swarm, await restarting, start) if restarting else {}),
                    "attack_seconds": end - start, "worker_cpu": cpu / (end - start),
                    "master_cpu": master_cpu / (end - start), "attacker_cpu": attacker_cpu / (end - start),
                    **notes}
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            await swarm.stop()


async def master_restart(how: str) -> float:
    """Stop master.py (``kill``: SIGKILL, ``term``: SIGTERM) 2 s into serving its worker, start
    it again at once; seconds from that start to its first new result."""
    with tempfile.TemporaryDirectory(prefix="qx-restart-") as tmp:
        swarm = await Swarm(Path(tmp)).start()
        try:
            await asyncio.sleep(2.0)
            if how == "kill":
                swarm.master.kill()
            else:
                swarm.master.terminate()
            await swarm.master.wait()
            started = time.monotonic()
            await swarm._start_master()
            swarm._tasks.append(asyncio.ensure_future(swarm._read(swarm.master)))
            await t.until(lambda: swarm.stamps[-1] >= started, 120)
            return next(s for s in swarm.stamps if s >= started) - started
        finally:
            await swarm.stop()


async def master_restarts(how: str, runs: int) -> int:
    w.Logger("error")
    for i in range(runs):
        print("  master.py %s and started again, run %d: first new result after %.2f s"
              % ("killed (kill -9)" if how == "kill" else "stopped (SIGTERM)", i + 1, await master_restart(how)),
              flush=True)
    return 0


async def run(names: list[str], seconds: float) -> int:
    w.Logger("error")
    rows = []
    for name in names:
        rows.append(await measure(name, seconds))
        print("  %s: %s" % (name, json.dumps(rows[-1])), flush=True)
    print("\n%-34s %8s %10s %10s %7s %9s %11s" % ("attack", "RSS MB", "before/s", "during/s",
                                                     "lines", "max gap s", "worker CPU"))
    for row in rows:
        print("%-34s %8.1f %10.0f %10.0f %7d %9.2f %10.0f%%" % (
            row["attack"], row["peak_rss_mb"], row["jobs_per_s_before"], row["jobs_per_s_during"],
            row["log_lines"], row["longest_gap_s"], 100 * row["worker_cpu"]))
    if any(row["attack"] in MASTER_ATTACKS for row in rows):
        print("\nmaster.py: %-26s %8s %9s %14s %5s %6s %9s %11s %13s" % (
            "attack", "RSS MB", "during", "before+after", "lost", "twice", "not hers", "master CPU",
            "attacker CPU"))
        for row in rows:
            if row["attack"] in MASTER_ATTACKS:
                around = (row["jobs_per_s_before"] + row["jobs_per_s_after"]) / 2
                print("           %-26s %8.1f %8.0f%% %13.0f%% %5d %6d %9d %10.0f%% %12.0f%%" % (
                    row["attack"], row["master_peak_rss_mb"],
                    100 * row["jobs_per_s_during"] / max(row["jobs_per_s_before"], 1e-9),
                    100 * row["jobs_per_s_during"] / max(around, 1e-9), row["lost"],
                    row["twice"], row["not from the worker"], 100 * row["master_cpu"], 100 * row["attacker_cpu"]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attacks", nargs="*", metavar="ATTACK",
                        help="attacks to run (default: all): " + "; ".join(ATTACKS) + "; with --master: "
                        + "; ".join(MASTER_ATTACKS))
    parser.add_argument("--master", action="store_true", help="attack master.py (its worker is honest)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each attack lasts")
    parser.add_argument("--master-restart", choices=("kill", "term"),
                        help="no attack: time master.py's first result after a restart at once")
    parser.add_argument("--runs", type=int, default=5, help="restarts measured (--master-restart)")
    parser.add_argument("--attacker", help=argparse.SUPPRESS)  # the attacker process: its attack,
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)  # the worker's port
    parser.add_argument("--token", help=argparse.SUPPRESS)  # and the swarm's token
    parser.add_argument("--aux-port", type=int, default=0, help=argparse.SUPPRESS)  # its tracker's or DHT's
    parser.add_argument("--master-port", type=int, default=0, help=argparse.SUPPRESS)  # the master's port
    args = parser.parse_args()
    if args.attacker:
        return asyncio.run(attacker(args.attacker, args.port, args.token, args.seconds, args.aux_port,
                                    args.master_port))
    attacks = MASTER_ATTACKS if args.master else ATTACKS
    unknown = [a for a in args.attacks if a not in attacks]
    if unknown:
        parser.error("unknown attack(s): %s" % ", ".join(unknown))
    status = t.in_own_namespace("QX_FAULTS_NAMESPACE", "faults.py")  # the network rule
    if status is not None:
        return status
    if args.master_restart:
        return asyncio.run(master_restarts(args.master_restart, args.runs))
    return asyncio.run(run(args.attacks or list(attacks), args.seconds))


if __name__ == "__main__":
    sys.exit(main())
