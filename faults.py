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
``QX_FAULTS_PROFILE=FILE`` runs the worker under cProfile.
The ``dependencies`` attack (a list of 10,000) belongs to the Worker's checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from pathlib import Path

import support as t
import worker as w

HERE = Path(__file__).resolve().parent
TASK = "class Task:\n    def run(self, job):\n        return job['id']\n"
MIB = 1 << 20


class Swarm:
    """master.py and one worker.py, the master kept supplied with jobs; results timed."""

    def __init__(self, root: Path, worker_fds: int | None = None, master_dials: bool = False) -> None:
        self.root = root
        self.master_dials = master_dials  # the master has the worker in peers=, rather than the reverse
        self.token = "faults-%d" % random.randrange(1 << 40)
        self.master_port, self.port = t.free_port(), t.free_port()
        self.worker_fds = worker_fds
        self.stamps: list[float] = []
        self.pushed = 0
        self.log = open(root / "worker.log", "wb")  # noqa: SIM115 - the worker's stderr, all run long

    async def start(self) -> Swarm:
        m, wk = self.root / "m", self.root / "w"
        m.mkdir()
        wk.mkdir()
        (m / "task.py").write_text(TASK)
        dials = {"peers": "127.0.0.1:%d" % (self.port if self.master_dials else self.master_port)}
        t.write_loopback_env(m, self.token, port=self.master_port, LOG_LEVEL="warn",
                             **(dials if self.master_dials else {}))
        t.write_loopback_env(wk, self.token, port=self.port, LOG_LEVEL="info",
                             **({} if self.master_dials else dials))
        self.master = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "master.py"), "--task", "task.py", "--jobs", "-", cwd=m,
            env=t.clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        await self.master.stdout.readline()  # ready
        limit = self.worker_fds
        profile = ["-m", "cProfile", "-o", os.environ["QX_FAULTS_PROFILE"]] if os.environ.get(
            "QX_FAULTS_PROFILE") else []
        self.worker = await asyncio.create_subprocess_exec(
            sys.executable, *profile, str(HERE / "worker.py"), cwd=wk, env=t.clean_env(), stderr=self.log,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))) if limit else None)
        self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._feed())]
        await t.until(lambda: len(self.stamps) > 100, 60)
        return self

    async def _read(self) -> None:
        async for line in self.master.stdout:
            if json.loads(line).get("event") == "result":
                self.stamps.append(time.monotonic())

    async def _feed(self) -> None:
        while True:
            if self.pushed - len(self.stamps) < 2000:
                lines = "".join('{"id": %d, "data": ""}\n' % i for i in range(self.pushed, self.pushed + 500))
                self.master.stdin.write(lines.encode())
                self.pushed += 500
            await asyncio.sleep(0.05)

    def rate(self, start: float, end: float) -> float:
        return sum(1 for s in self.stamps if start <= s < end) / (end - start)

    def longest_gap(self, start: float, end: float) -> float:
        inside = [start] + [s for s in self.stamps if start <= s <= end] + [end]
        return max(b - a for a, b in itertools.pairwise(inside))

    def log_lines(self) -> int:
        self.log.flush()
        return (self.root / "worker.log").read_bytes().count(b"\n")

    def cpu_seconds(self, proc: asyncio.subprocess.Process | None = None) -> float:
        """User and system CPU the worker (or ``proc``) used so far."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = (proc or self.worker).pid
            fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return float("nan")

    def peak_rss_mb(self) -> float:
        with contextlib.suppress(OSError):
            for line in Path("/proc/%d/status" % self.worker.pid).read_text().splitlines():
                if line.startswith("VmHWM:"):
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


# The attacker's wires ########################################################

class Target:
    """What the attacker process knows of the worker: its port and the target's token."""

    def __init__(self, port: int, token: str, master_port: int | None = None) -> None:
        self.port, self.token, self.master_port = port, token, master_port
        #: what the attack made before it began
        self.prepared: object = None


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


async def master_pings(target: Target) -> tuple:
    """Pings the master signed (a hello boxed for us, its broadcasts), kept until they are old:
    (its peer id, its handshake, the signed pings). The worker saw none of the boxed ones."""
    ident = w.Identity()
    core = w.BugoutCore(target.token, ident)
    peer_id, fields, reader, writer, wire = await peer_facts(target.master_port, target.token, ident)
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
    await asyncio.sleep(w.FRESH_MS / 1000 + 1)  # a replay: they are old now
    return peer_id, fields, pings


async def replayed_ping(target: Target, until: float) -> dict:
    """A wire claiming the master (its peer id and keys) replays the master's pings, made 11 s before."""
    peer_id, fields, pings = target.prepared
    wires = await hold_claims(target.port, target.token, peer_id, fields, until, pings)
    return {"wires": wires, "pings replayed": len(pings)}


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
    "copied master, worker dials": (copied_master, None, None),
    "copied master, master dials": (copied_master, None, None),
    "copied worker, at master.py": (copied_worker, None, None),
    "replayed ping, claims master": (replayed_ping, None, master_pings),
}
#: attacks whose master dials the worker (its peers= names the worker), not the reverse
MASTER_DIALS = {"copied master, master dials"}


async def attacker(name: str, port: int, token: str, seconds: float, master_port: int | None = None) -> int:
    """The attacker process: prepare, say ready, wait for go, attack, print notes."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))  # it holds many sockets
    attack, _, prepare = ATTACKS[name]
    target = Target(port, token, master_port)
    if prepare is not None:
        target.prepared = prepare(target)
        if asyncio.iscoroutine(target.prepared):
            target.prepared = await target.prepared
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    try:
        notes = await asyncio.wait_for(attack(target, time.monotonic() + seconds), seconds + 120)
    except (OSError, TimeoutError) as exc:  # the worker may drop the attacker's wires
        notes = {"attack ended": repr(exc)}
    print(json.dumps(notes), flush=True)
    return 0


async def measure(name: str, seconds: float) -> dict:
    """One attack on a fresh master and worker; the attacker is a process of its own."""
    with tempfile.TemporaryDirectory(prefix="qx-faults-") as tmp:
        swarm = Swarm(Path(tmp), ATTACKS[name][1], name in MASTER_DIALS)
        proc = None
        try:
            await swarm.start()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "faults.py"), "--attacker", name, "--port", str(swarm.port),
                "--token", swarm.token, "--seconds", str(seconds), "--master-port", str(swarm.master_port),
                cwd=HERE, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE)
            await asyncio.wait_for(proc.stdout.readline(), 300)  # ready: its payloads are made
            await asyncio.sleep(2.0)  # warm
            before = time.monotonic()
            await asyncio.sleep(5.0)
            start, lines, cpu = time.monotonic(), swarm.log_lines(), swarm.cpu_seconds()
            master_cpu = swarm.cpu_seconds(swarm.master)
            proc.stdin.write(b"go\n")
            notes = json.loads(await asyncio.wait_for(proc.stdout.readline(), seconds + 180) or "{}")
            await asyncio.sleep(start + seconds - time.monotonic())  # an attack may end early
            end = time.monotonic()
            cpu = swarm.cpu_seconds() - cpu
            master_cpu = swarm.cpu_seconds(swarm.master) - master_cpu
            await asyncio.sleep(2.0)
            lines = swarm.log_lines() - lines
            if os.environ.get("QX_FAULTS_LOG"):
                print((swarm.root / "worker.log").read_text()[-3000:], file=sys.stderr)
            return {"attack": name, "peak_rss_mb": swarm.peak_rss_mb(),
                    "jobs_per_s_before": swarm.rate(before, start),
                    "jobs_per_s_during": swarm.rate(start, end), "log_lines": lines,
                    "longest_gap_s": swarm.longest_gap(before, end + 2.0),
                    "attack_seconds": end - start, "worker_cpu": cpu / (end - start),
                    "master_cpu": master_cpu / (end - start), **notes}
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            await swarm.stop()


async def run(names: list[str], seconds: float) -> int:
    w.Logger("error")
    rows = []
    for name in names:
        rows.append(await measure(name, seconds))
        print("  %s: %s" % (name, json.dumps(rows[-1])), flush=True)
    print("\n%-26s %8s %10s %10s %7s %9s %11s" % ("attack", "RSS MB", "before/s", "during/s",
                                                     "lines", "max gap s", "worker CPU"))
    for row in rows:
        print("%-26s %8.1f %10.0f %10.0f %7d %9.2f %10.0f%%" % (
            row["attack"], row["peak_rss_mb"], row["jobs_per_s_before"], row["jobs_per_s_during"],
            row["log_lines"], row["longest_gap_s"], 100 * row["worker_cpu"]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("attacks", nargs="*", metavar="ATTACK",
                        help="attacks to run (default: all): " + "; ".join(ATTACKS))
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each attack lasts")
    parser.add_argument("--attacker", help=argparse.SUPPRESS)  # the attacker process: its attack,
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)  # the worker's port
    parser.add_argument("--token", help=argparse.SUPPRESS)  # and the swarm's token
    parser.add_argument("--master-port", type=int, help=argparse.SUPPRESS)  # the master's port
    args = parser.parse_args()
    if args.attacker:
        return asyncio.run(attacker(args.attacker, args.port, args.token, args.seconds, args.master_port))
    unknown = [a for a in args.attacks if a not in ATTACKS]
    if unknown:
        parser.error("unknown attack(s): %s" % ", ".join(unknown))
    status = t.in_own_namespace("QX_FAULTS_NAMESPACE", "faults.py")  # the network rule
    if status is not None:
        return status
    return asyncio.run(run(args.attacks or list(ATTACKS), args.seconds))


if __name__ == "__main__":
    sys.exit(main())
