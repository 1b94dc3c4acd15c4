"""What test_worker.py, bench.py and fuzz.py share: the vectors made by the JS
code (testdata/), a loopback-only .env, a master's asset files, the runner of
the JS peers in interop/, and small waiting and skipping helpers.

Neither a test nor part of the worker: importing it starts nothing, changes
nothing and reads nothing (the vectors are read on first use).
"""

from __future__ import annotations

import asyncio
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
    script = ("ip link set lo up && ip route add 224.0.0.0/4 dev lo src 127.0.0.1 && "
              "%s=1 exec %s" % (flag, command))
    return subprocess.call(["unshare", "-n", "sh", "-c", script], cwd=HERE)
