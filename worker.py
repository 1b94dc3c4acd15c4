#!/usr/bin/env python3
"""queue-xec Worker in Python: one file, the same wire as the JS peers.

A Worker joins the peer-to-peer swarm named by a shared ``token``, finds the
Master, fetches the task files, installs their dependencies, asks for jobs,
runs them and sends back results. Everything on the wire is what JS bugout
0.0.13 on WebTorrent 1.9 speaks (BitTorrent wire + BEP 10 extension
``bo_channel`` carrying signed, box-encrypted bugout packets), so a Python
worker sits in the very same swarm as the JS Master and JS Workers.

Usage::

    python worker.py --setup     # write .env (tokens) by prompting
    python worker.py             # wait for jobs
    python worker.py --demo      # master.py and demo jobs on loopback only (needs master.py)

Exceptions::

    WorkerError
     +-- ProtocolError
     |    +-- LocalProtocolError
     |    +-- RemoteProtocolError
     |    +-- DecodeError (also ValueError)
     +-- CryptError (also ValueError): wrong key or corrupt data
     +-- TransportError (also ConnectionError)
     +-- InvalidState (also RuntimeError)
     +-- RpcTimeout (also TimeoutError)
     |    +-- RpcUnreachable: no wire open to carry the answer
     +-- UnsafeAsset (also ValueError): a path or dependency refused
     +-- ProofFailed: a peer said it is the master and did not prove the key
     +-- AssetError (also ValueError): a master's asset answer of the wrong shape or hashes
     +-- JournalError: the journal file is not ours, or is damaged
     +-- TaskError: a job failed in its child (``error`` is its error field)
          +-- JsTaskError: task.js's run threw or rejected
          +-- TaskProcessError: no node or npm, the task does not load, its process died

Sections, top to bottom: the code of each uses what the sections above it
define, and its own names; only the templates at the end come after their
users (and, in type hints, the transports name the Bugout node they serve;
``batchSize``'s default and bound, read when Settings loads, are the job loop's,
kept with the rest of its batch-request policy)::

    Errors                                   every exception class of the tree above
    Helpers used everywhere                  background tasks, rate and log limits, time, JSON
    Settings                                 .env and the environment, read once into Settings
    Helper                                   the JS Helper's utilities
    Logger                                   the JS Logger on stdlib logging
    Crypt                                    AES-256-CBC, as the JS Crypt
    Bencode                                  with the JS rules
    Base58                                   base58 and base58check
    RIPEMD-160                               hashlib's, or pure Python
    bugout identity                          seeds, keys, addresses, the swarm's infohash
    bugout packets                           BugoutCore: payloads in, events out (sans-I/O)
    Peer wire (BEP 3, 6, 10)                 PeerWire: handshakes, framing (sans-I/O)
    Connections: what TCP and WebRTC ...     Connection: a wire's states and bounds
    TCP transport                            WireConnection, the acceptor
    LSD (BEP 14)                             local service discovery
    DHT (BEP 5): KRPC messages               queries, answers, errors, compact addresses
    DHT (BEP 5): routing table               k-buckets
    DHT (BEP 5): lookups, peer store, ...    iterative lookups, announced peers
    DHT (BEP 5): the node, sans-I/O          DhtCore
    DHT (BEP 5): asyncio adapter             Dht, on UDP
    Trackers and WebRTC                      TrackerClient (sans-I/O)
    Trackers and WebRTC: asyncio             TrackerSession, RtcConnection, WebRtcTransport
    The bugout node                          InboundSlots, DialQueue, WirePolicy (sans-I/O), Discovery, Bugout
    Status: metrics and health over HTTP     /metrics, /healthz, systemd notify
    Worker: assets and dependencies          safe paths (master-files/), pip and npm requirements
    Worker: trusting a master                MasterTrust; its theory of operation
    Worker: the journal and the outbox       Journal, Outbox; their theory of operation
    Worker: running tasks                    task.py in child processes (or a thread)
    Worker: running task.js with Node        npm, node children
    Worker                                   MasterFinder (which peer is the master), AssetKeeper
                                             (files, dependencies, runner), JobLoop (asking, running,
                                             delivering; the batch-request policy), and Worker
    Command line                             --setup, running, --demo, main()
    Templates                                the task child, the Node runner, the npm check, the demo task
"""

from __future__ import annotations

import sys

# Run as ``python worker.py`` or ``python -m worker``, Python puts the script's
# folder or the working directory (often the worker folder) first on the import
# path, before the standard library: a file there named like a module would be
# imported in its place. That entry goes last, before any other import (``-P``
# leaves it out from the start; the demo still finds master.py beside us).
if __name__ == "__main__" and not sys.flags.safe_path and sys.path:
    sys.path.append(sys.path.pop(0))

import argparse
import asyncio
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import difflib
import enum
import errno
import functools
import getpass
import hashlib
import heapq
import hmac
import importlib.util
import inspect
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import struct
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Container, Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: one worker per folder is then up to you
    fcntl = None  # type: ignore[assignment]

from cryptography.hazmat.primitives import padding as _padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from nacl import bindings as _nacl
from nacl.exceptions import BadSignatureError, CryptoError

__version__ = "0.1.0"

#: The bugout extension name on the BitTorrent wire (BEP 10).
EXT = "bo_channel"
#: bugout's seed and address prefixes (PROTOCOL.md section 2).
SEED_PREFIX = b"\x49\x0a"
ADDRESS_PREFIX = b"\x55"
#: A packet older than this is dropped; a peer silent this long is forgotten.
PEER_TIMEOUT_MS = 5 * 60 * 1000
#: Our BEP 10 message ids, as WebTorrent advertises them.
OUR_EXT_IDS = {"bo_channel": 4, "lt_donthave": 3, "ut_metadata": 1, "ut_pex": 2}
#: Peer id prefix: this client is "QP" (queue-xec Python) version 0.1.
PEER_ID_PREFIX = b"-QP0100-"
KEEPALIVE_SECONDS = 55.0
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
LSD_HOST = "239.192.152.143"
LSD_PORT = 6771
LSD_INTERVAL = 5 * 60.0

log = logging.getLogger("worker")


# Errors #####################################################################

class WorkerError(Exception):
    """Root of every error this module raises on purpose."""


class ProtocolError(WorkerError):
    """The wire was not spoken as agreed."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol forbids."""


class DecodeError(ProtocolError, ValueError):
    """Bytes that do not decode (bencode, base58, packets)."""


class CryptError(WorkerError, ValueError):
    """AES key of the wrong size, or data that does not decrypt with it."""


class TransportError(WorkerError, ConnectionError):
    """A socket could not be opened or was lost."""


class InvalidState(WorkerError, RuntimeError):
    """An operation that the current state does not allow."""


class RpcTimeout(WorkerError, TimeoutError):
    """An RPC call got no answer in time."""


class RpcUnreachable(RpcTimeout):
    """An RPC call can get no answer: every wire closed while it waited."""


class UnsafeAsset(WorkerError, ValueError):
    """An asset path or dependency name that the worker refuses."""


class ProofFailed(WorkerError):
    """A peer that claimed to be the master did not prove that it holds the key."""


class AssetError(WorkerError, ValueError):
    """A master's asset answer that does not have the agreed shape or hashes."""


class JournalError(WorkerError):
    """The journal file is not ours, or is damaged."""


class TaskError(WorkerError):
    """A job failed in its child (or by SystemExit); ``error`` is the result's error field."""

    def __init__(self, kind: str, message: str, traceback: str = "") -> None:
        super().__init__(message if kind == type(self).__name__ else f"{kind}: {message}")
        #: ``{"type", "message", "traceback"}`` as in every error result
        self.error = {"type": kind, "message": message, "traceback": traceback}

    @classmethod
    def from_answer(cls, error: Any) -> TaskError:
        """From a child's ``error`` field: the task's own error name, message and traceback."""
        error = error if isinstance(error, dict) else {}
        return cls(str(error.get("type") or "Error"), str(error.get("message", "")),
                   str(error.get("traceback") or ""))


class JsTaskError(TaskError):
    """task.js's ``run`` threw or rejected: the JS error's name, message and stack."""


class TaskProcessError(TaskError):
    """A task cannot run: no node or npm, it does not load, its process died or was ended."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__("TaskProcessError", message, detail)


# Helpers used everywhere ####################################################

def spawn(coro: Awaitable, tasks: set[asyncio.Task], what: str) -> asyncio.Task:
    """Run ``coro`` in the background, held in ``tasks`` until done; log a failure."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(functools.partial(_task_done, tasks, what))
    return task


def _task_done(tasks: set[asyncio.Task], what: str, task: asyncio.Task) -> None:
    tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("%s task failed: %r", what, task.exception(), exc_info=task.exception())


class _RateLimit:
    """Token buckets by key (the least recently used key is forgotten first)."""

    def __init__(self, rate: float, burst: float, keys: int = 1024) -> None:
        self.rate, self.burst, self.keys = rate, burst, keys
        self._buckets: collections.OrderedDict[Any, tuple[float, float]] = (
            collections.OrderedDict())

    def allow(self, key: Any, now: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(now - last, 0.0) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.keys:
            self._buckets.popitem(last=False)
        return allowed

    def tokens(self, key: Any, now: float) -> float:
        """What ``key`` has left now (a full burst if unknown)."""
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(now - last, 0.0) * self.rate)


#: Seconds between two log lines of one kind that peers can provoke.
LOG_INTERVAL = 60.0


class _LogLimit:
    """At most one log line per key and interval: a peer cannot fill the log.

    The lines held back are counted in the next line of that key.
    """

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._held: collections.Counter = collections.Counter()

    def __call__(self, level: int, key: str, message: str, *args: Any, **kw: Any) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._held[key] += 1
            return
        self._next[key] = now + self.interval
        held = self._held.pop(key, 0)
        suffix = " (and %d more like it in %.0f s)" % (held, self.interval) if held else ""
        log.log(level, message + suffix, *args, **kw)


_loop_errors = _LogLimit()


def limit_loop_errors() -> None:
    """asyncio's own error reports (a failed ``accept()`` while descriptors run out,
    a task's lost exception) go to our log, one line per kind a minute."""
    def report(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        message = str(context.get("message") or "asyncio error")
        exc = context.get("exception")
        kind = " ".join(message.split()[:3])  # "Exception in callback <handle>": one kind, whatever handle
        _loop_errors(logging.ERROR, kind, "%s", message + (": %r" % exc if exc else ""),
                     exc_info=exc if isinstance(exc, BaseException) else None)
    asyncio.get_running_loop().set_exception_handler(report)


#: A handler returns this to send no answer (as the JS master for shareResults).
NO_ANSWER = object()


def _now() -> int:
    return int(time.time() * 1000)


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise WorkerError(f"peer {text!r} is not host:port")
    return host.strip("[]"), int(port)


def json_dumps(value: Any) -> str:
    """``JSON.stringify`` output: no spaces, non-ASCII kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def storable_json(value: Any) -> str:
    """``json_dumps``, or with ``\\u`` escapes if a string holds a lone surrogate: JSON
    and JS allow one (half an emoji, a file name that is not UTF-8), UTF-8 does not."""
    text = json_dumps(value)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"))
    return text


_STRICT_JSON = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":"))


def strict_json(value: Any) -> str:
    """``value`` as JSON any parser reads (no NaN, no Infinity), or ValueError saying why not."""
    try:
        return _STRICT_JSON.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        text = f"the result cannot be sent as JSON: {exc}"
        if "Out of range float" in str(exc):
            text += " (NaN, Infinity and -Infinity have no JSON form)"
        raise ValueError(text) from None


def as_dict(value: Any) -> dict:
    """``value`` if it is a dict, else an empty one (RPC arguments from peers)."""
    return value if isinstance(value, dict) else {}


def private_files(path: str | Path, *more: str | Path) -> None:
    """Make files that hold job data or results mode 0600, whatever the umask.

    ``path`` is created (empty) when missing; ``more`` are changed where they
    exist. SQLite gives a database's -wal and -shm files the database file's
    mode when it makes them, so a database made 0600 first keeps them private.
    """
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    for name in (path, *more):
        with contextlib.suppress(OSError):  # gone, or another user's: SQLite says what is wrong
            os.chmod(name, 0o600)


# Settings ###################################################################
#
# Every setting is read here, once, into one frozen Settings: the explicit
# argument when it is not None, else the key of .env or of the environment
# (load_env: the environment wins) when it is set and not empty, else the
# default; then it is read as its type, within its range. ``trackers`` and
# ``iceServers`` differ in one point: set and empty means none (WebRTC off;
# host candidates only). A value out of range, or not one of a key's words, is
# a WorkerError naming the key and what to give (one line and exit 2 at the
# command line, never a fallback); a key that is no setting is named in a
# warning, with the key it most likely meant, and the start goes on: the file
# may be shared with other programs, and a mistyped key leaves a working default.
# The Worker takes a Settings, master.py too, and so does the node (Bugout),
# which hands it on to the DHT, the trackers and WebRTC. All three take its
# fields as keyword arguments too; they are listed once, below.

#: bugout's trackers (bugout index.js), used when none are configured.
DEFAULT_TRACKERS = ("wss://hub.bugout.link", "wss://tracker.openwebtorrent.com",
                    "wss://tracker.btorrent.xyz")
#: simple-peer's ICE servers, as the JS peers use (aiortc takes the first STUN one).
DEFAULT_ICE_SERVERS = ("stun:stun.l.google.com:19302", "stun:global.stun.twilio.com:3478")
#: WebTorrent's cap on connections per torrent (maxConns).
DEFAULT_MAX_PEERS = 55
#: Inbound TCP connections at most (env ``maxInbound``).
DEFAULT_MAX_INBOUND = 200
#: ``maxMessage``'s range: a job, a result and a bugout packet's envelope must fit in the
#: smallest; the largest is memory a Pi has (each wire may hold this much, unfinished).
MIN_MESSAGE = 64 * 1024
MAX_MESSAGE = 1024 * 1024 * 1024
#: Public routers a node starts from when nothing else is configured.
DHT_BOOTSTRAP = ("router.bittorrent.com:6881", "router.utorrent.com:6881",
                 "dht.transmissionbt.com:6881")

_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*?)\s*$")


def parse_env(text: str) -> dict[str, str]:
    """Parse ``.env`` text: comments, quotes, ``export``, blank lines."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if match:
            values[match.group(1)] = _env_value(match.group(2))
    return values


def _env_value(raw: str) -> str:
    """One value: quoted (escapes in double quotes) or bare (``#`` comment)."""
    if raw[:1] in ("'", '"') and raw.rfind(raw[0]) > 0:
        inner = raw[1:raw.rfind(raw[0])]
        if raw[0] == '"':
            inner = inner.replace("\\n", "\n").replace('\\"', '"')
        return inner
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip()


def read_env_file(path: str | Path) -> dict[str, str]:
    """The file's values, or ``{}`` when it does not exist."""
    try:
        return parse_env(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def write_env_file(path: str | Path, updates: dict[str, str]) -> None:
    """Set keys in a ``.env`` file, keeping its other lines; mode 0600."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    pending = dict(updates)
    for i, line in enumerate(lines):
        match = _ENV_LINE.match(line)
        if match and match.group(1) in pending and not line.lstrip().startswith("#"):
            key = match.group(1)
            lines[i] = f"{key}={_env_quote(pending.pop(key))}"
    lines += [f"{k}={_env_quote(v)}" for k, v in pending.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)


def _env_quote(value: str) -> str:
    """Quote a value when a bare one would not read back the same."""
    if value and re.fullmatch(r"[A-Za-z0-9_.,:/@+=-]+", value):
        return value
    return '"{}"'.format(value.replace('"', '\\"').replace("\n", "\\n"))


def _word(value: Any) -> bool:
    """An env word as a bool: ``true``, ``yes``, ``on``, ``1`` or ``false``, ``no``, ``off``, ``0``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        raise ValueError("give true or false")
    return text in ("true", "yes", "on", "1")


def _whole(low: int, high: int, what: str) -> Callable[[Any], int]:
    """A reader of whole numbers from ``low`` to ``high``; ``what`` says what to give instead."""
    def read(value: Any) -> int:
        text = str(value).strip()
        if not re.fullmatch(r"[+-]?[0-9]{1,12}", text) or not low <= int(text) <= high:
            raise ValueError(f"give {what}")
        return int(text)
    return read


def _one_of(*words: str) -> Callable[[Any], str]:
    """A reader of one of ``words`` (any case)."""
    def read(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in words:
            raise ValueError("give " + " or ".join(words))
        return text
    return read


def _split_setting(value: str | Iterable[str]) -> list[str]:
    """A comma-separated setting (or a list) as a list of non-empty items."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item and item.strip()]


def _items(value: str | Iterable[str]) -> tuple[str, ...]:
    return tuple(_split_setting(value))


#: The most jobs at once (``concurrency``): each is a child process, so more is a typo.
MAX_CONCURRENCY = 1024


def parse_concurrency(value: Any) -> int:
    """``concurrency``: how many jobs run at once, each in a child; ``auto``: one per core."""
    text = str(value).strip().lower()
    if text == "auto":
        try:
            return len(os.sched_getaffinity(0))  # the cores this process may use
        except AttributeError:
            return os.cpu_count() or 1
    if text.isdigit() and 1 <= int(text) <= MAX_CONCURRENCY:
        return int(text)
    raise WorkerError(f"concurrency={value!r}: give a whole number of jobs at once, 1 to "
                      f"{MAX_CONCURRENCY}, or auto")


def parse_seconds(value: Any) -> float:
    """``jobTimeout``, ``stopTimeout``: seconds, 0 or more."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 <= seconds < math.inf:  # NaN too
        raise ValueError("give a number of seconds, 0 or more")
    return seconds


def parse_count(value: Any) -> int:
    """``batchSize``: 1 to MAX_BATCH_TASKS, the most jobs a worker takes from one answer
    (a JS master keeps no lease: jobs asked for and not taken would be lost)."""
    return _whole(1, MAX_BATCH_TASKS, f"a whole number of jobs, 1 to {MAX_BATCH_TASKS}")(value)


def parse_memory_mb(value: Any) -> int | None:
    """``jobMemoryMB``: the memory cap of each child in MB, or None (unset or 0: no cap)."""
    text = "" if value is None else str(value).strip()
    if text in ("", "0"):
        return None
    if text.isdigit():
        return int(text)
    raise WorkerError(f"jobMemoryMB={value!r}: give a whole number of megabytes, or 0 for no cap")


def parse_host_ports(value: str | Iterable[str]) -> tuple[str, ...]:
    """``peers``, ``dhtBootstrap``: ``host:port`` items, comma-separated, each port 1 to 65535."""
    items = _items(value)
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"give host:port items, comma-separated, each port 1 to 65535 (not {item})")
    return items


def parse_status_port(value: Any) -> int | None:
    """``statusPort``: a TCP port, or ``off`` (None)."""
    if str(value).strip().lower() in ("", "off"):
        return None
    return _whole(1, 65535, "a TCP port, 1 to 65535, or off")(value)


def parse_log_level(value: Any) -> str:
    """``LOG_LEVEL``: a word the Logger knows."""
    if str(value).strip().lower() not in _LEVELS:
        raise ValueError("give off, error, warn, info or debug")
    return str(value)


def parse_trackers(value: str | Iterable[str] | None) -> list[str]:
    """Tracker URLs: None is bugout's defaults, empty is none; only ws:// and wss://."""
    urls = list(DEFAULT_TRACKERS) if value is None else _split_setting(value)
    for url in urls:
        if not re.fullmatch(r"wss?://[^\s/?#]+(/[^\s]*)?", url):
            raise WorkerError(f"tracker {url!r}: only ws:// and wss:// URLs are WebSocket trackers")
    return urls


@dataclasses.dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server: ``url`` (``stun:host:port``), TURN user and password."""
    url: str
    username: str | None = None
    credential: str | None = None

    @classmethod
    def parse(cls, text: str) -> IceServer:
        """``stun:host[:port]`` or ``turn[s]:user:pass@host[:port][?transport=udp|tcp]``.

        User and password are percent-decoded, so ``%40``, ``%3A`` and ``%2C``
        stand for ``@``, ``:`` and ``,`` in them.
        """
        from urllib.parse import unquote
        scheme, sep, rest = text.strip().partition(":")
        scheme = scheme.lower()
        if not sep or scheme not in ("stun", "stuns", "turn", "turns"):
            raise WorkerError(f"ICE server {text!r}: use stun:HOST:PORT or turn:USER:PASS@HOST:PORT")
        username = credential = None
        if "@" in rest:
            login, _, rest = rest.rpartition("@")
            username, sep, credential = login.partition(":")
            if not sep or not username:
                raise WorkerError(f"ICE server {text!r}: credentials are USER:PASS@")
            username, credential = unquote(username), unquote(credential)
        if scheme.startswith("turn") and username is None:
            raise WorkerError(f"ICE server {text!r}: a TURN server needs USER:PASS@")
        if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(\?transport=(udp|tcp))?", rest):
            raise WorkerError(f"ICE server {text!r}: bad host, port or transport")
        return cls(f"{scheme}:{rest}", username, credential)


def parse_ice_servers(value: str | Iterable[str] | None) -> list[IceServer]:
    """ICE servers: None is the JS peers' STUN servers, empty is host candidates only."""
    return [IceServer.parse(s) for s in (DEFAULT_ICE_SERVERS if value is None else _split_setting(value))]


def _setting(key: str, default: Any = None, read: Callable[[Any], Any] | None = None, *,
             node: bool = False, keep_empty: bool = False, secret: bool = False) -> Any:
    """A field of :class:`Settings`: its .env key, its default (a callable one is called
    when needed) and how a value not None is read; ``node``: the node takes it too."""
    return dataclasses.field(repr=not secret, metadata={
        "key": key, "default": default, "read": read, "node": node, "keep_empty": keep_empty})


def _read_setting(meta: Any, value: Any, env: dict[str, str]) -> Any:
    """One setting: ``value`` if not None, else its env key if set and not empty, else its default."""
    if value is None:
        value = env.get(meta["key"])
        if value == "" and not meta["keep_empty"]:
            value = None
    if value is None:
        value = meta["default"]() if callable(meta["default"]) else meta["default"]
    if value is None or meta["read"] is None:
        return value
    try:
        return meta["read"](value)
    except WorkerError:
        raise
    except (TypeError, ValueError) as exc:  # say which setting, not a traceback
        raise WorkerError(f"{meta['key']}={value!r}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the Worker, master.py and the node, as read by :meth:`load`.

    The field names are the keyword arguments of ``Worker``, ``Master`` and
    ``Bugout``; each field's ``key`` (its metadata) is its .env key, the JS name
    (README, "Settings"). The Worker reads every field but ``master_seed``,
    master.py the swarm's, ``loglevel``, ``master_seed`` and the node's
    (``NODE_SETTINGS``), Bugout the node's.
    """
    # the swarm
    token: str | None = _setting("token")
    transfer_encrypt_token: str | None = _setting("transferEncryptToken", secret=True)
    # the worker
    name: str = _setting("name", socket.gethostname)
    loglevel: str | None = _setting("LOG_LEVEL", None, parse_log_level)
    log_file: str | None = _setting("logFile", None, lambda v: v or None)
    get_batch: bool = _setting("getBatch", False, _word)
    batch_size: int = _setting("batchSize", lambda: DEFAULT_BATCH_SIZE, parse_count)
    folder: Path = _setting("folder", os.getcwd, lambda v: Path(v).resolve())  # noqa: RUF009 - a field()
    job_timeout: float | None = _setting("jobTimeout", 0, lambda v: parse_seconds(v) or None)
    concurrency: int = _setting("concurrency", 1, parse_concurrency)
    job_memory_mb: int | None = _setting("jobMemoryMB", None, parse_memory_mb)
    stop_timeout: float = _setting("stopTimeout", 30, parse_seconds)
    task_runner: str = _setting("taskRunner", "process", _one_of("process", "thread"))
    master: tuple[str, ...] = _setting("master", "", _items)
    status_port: int | None = _setting("statusPort", None, parse_status_port)
    status_host: str = _setting("statusHost", "127.0.0.1", str)
    # master.py: its own seed (its address), apart from the worker's ``seed`` in a .env both read
    master_seed: str | None = _setting("masterSeed")
    # the node: TCP, LSD, the DHT, trackers and WebRTC
    seed: str | None = _setting("seed", node=True)
    host: str = _setting("host", "0.0.0.0", node=True)
    port: int = _setting("port", 0, _whole(0, 65535, "a TCP port, 0 (any free one) to 65535"), node=True)
    peers: tuple[str, ...] = _setting("peers", "", parse_host_ports, node=True)
    lsd: bool = _setting("lsd", True, _word, node=True)
    max_message: int = _setting("maxMessage", DEFAULT_MAX_MESSAGE, _whole(
        MIN_MESSAGE, MAX_MESSAGE, f"a number of bytes, {MIN_MESSAGE} to {MAX_MESSAGE}"), node=True)
    max_inbound: int = _setting("maxInbound", DEFAULT_MAX_INBOUND,
                                _whole(1, 65535, "a number of connections, 1 to 65535"), node=True)
    dht: bool = _setting("dht", True, _word, node=True)
    dht_bootstrap: tuple[str, ...] = _setting("dhtBootstrap", DHT_BOOTSTRAP, parse_host_ports, node=True)
    dht_port: int | None = _setting("dhtPort", None, _whole(0, 65535, "a UDP port, 0 (any free one) to 65535"),
                                    node=True)
    trackers: tuple[str, ...] = _setting("trackers", lambda: DEFAULT_TRACKERS,
                                         lambda v: tuple(parse_trackers(v)), node=True, keep_empty=True)
    ice_servers: tuple[IceServer, ...] = _setting("iceServers", lambda: DEFAULT_ICE_SERVERS,
                                                  lambda v: tuple(parse_ice_servers(v)), node=True,
                                                  keep_empty=True)
    max_peers: int = _setting("maxPeers", DEFAULT_MAX_PEERS, _whole(1, 1000, "a number of wires, 1 to 1000"),
                              node=True)

    @classmethod
    def load(cls, env: dict[str, str] | None = None, **explicit: Any) -> Settings:
        """Read every setting: ``explicit`` ones, else ``env`` (None: :func:`load_env`), else defaults."""
        env = load_env() if env is None else env
        fields = dataclasses.fields(cls)
        unknown = explicit.keys() - {field.name for field in fields}
        if unknown:
            raise TypeError("no such setting: " + ", ".join(sorted(unknown)))
        settings = cls(**{f.name: _read_setting(f.metadata, explicit.get(f.name), env) for f in fields})
        for key in [key for key in env if key not in SETTINGS]:
            log.warning("unknown key %r%s: it is ignored (README, \"Settings\", lists every key)",
                        key, "".join(f" (did you mean {near}?)" for near in _near_keys(key)))
        return settings

    @classmethod
    def of(cls, settings: Settings | None, env: dict[str, str] | None, explicit: dict[str, Any]) -> Settings:
        """``settings`` as given, or else :meth:`load` ``env`` and ``explicit``; not both."""
        if settings is None:
            return cls.load(env, **explicit)
        if env or any(value is not None for value in explicit.values()):
            raise TypeError("give settings, or env and keyword arguments, not both")
        return settings


#: The settings the node takes (Bugout's and master.py's keyword arguments besides their own).
NODE_SETTINGS = frozenset(f.name for f in dataclasses.fields(Settings) if f.metadata["node"])
#: Every key the worker and master.py read (README, "Settings").
SETTINGS = tuple(f.metadata["key"] for f in dataclasses.fields(Settings))


def _near_keys(key: str) -> list[str]:
    """The setting a mistyped key most likely meant: same letters in another case or without
    ``_``, else a close spelling; or none."""
    def bare(name: str) -> str:
        return name.lower().replace("_", "").replace("-", "")
    same = [known for known in SETTINGS if bare(known) == bare(key)]
    lower = {known.lower(): known for known in SETTINGS}
    return same or [lower[near] for near in difflib.get_close_matches(key.lower(), lower, 1, 0.75)]


def node_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` if each one names a setting of the node (NODE_SETTINGS); else TypeError."""
    extra = sorted(options.keys() - NODE_SETTINGS)
    if extra:
        raise TypeError("not a setting of the node: " + ", ".join(extra))
    return options


def load_env(path: str | Path = ".env") -> dict[str, str]:
    """File values overlaid by variables already in the environment (dotenv rule).

    As with JS dotenv and ``process.env``, a setting may come from the
    environment alone, without a file.
    """
    values = read_env_file(path)
    for key in (*values, *SETTINGS):
        if key in os.environ:
            values[key] = os.environ[key]
    return values


# Helper #####################################################################

class Helper:
    """Small utilities of the JS Helper class, same behaviour."""

    @staticmethod
    def local_time(when: float | None = None) -> str:
        """Local time as ``DD-MM HH:mm:ss``, the JS logger's format."""
        return time.strftime("%d-%m %H:%M:%S", time.localtime(when))

    @staticmethod
    async def sleep(ms: float) -> None:
        """Sleep ``ms`` milliseconds without blocking the loop."""
        await asyncio.sleep(ms / 1000.0)

    @staticmethod
    def get_timestamp() -> int:
        """Milliseconds since the epoch, as JS ``Date.now()``."""
        return int(time.time() * 1000)

    @staticmethod
    def measure_perf(start: float, end: float | None = None) -> float:
        """Milliseconds between two ``time.perf_counter()`` readings."""
        return ((time.perf_counter() if end is None else end) - start) * 1000.0

    @staticmethod
    def get_sha256(path: str | Path) -> str:
        """Hex SHA-256 of a file's bytes, read in chunks."""
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    @staticmethod
    def populate_sha256_on_assets(assets: list[dict]) -> list[dict]:
        """Set ``sha256`` on each ``{masterPath, ...}`` asset from its file."""
        for asset in assets:
            asset["sha256"] = Helper.get_sha256(asset["masterPath"])
        return assets


# Logger #####################################################################

_LEVELS = {"off": logging.CRITICAL + 10, "fatal": logging.CRITICAL,
           "error": logging.ERROR, "warn": logging.WARNING,
           "warning": logging.WARNING, "info": logging.INFO,
           "debug": logging.DEBUG}
_COLOURS = {logging.DEBUG: "\x1b[36m", logging.INFO: "\x1b[32m",
            logging.WARNING: "\x1b[33m", logging.ERROR: "\x1b[31m",
            logging.CRITICAL: "\x1b[35m"}


#: The names a log line shows, whole (the JS logger's words).
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
                logging.ERROR: "error", logging.CRITICAL: "fatal"}


class _Formatter(logging.Formatter):
    """``[DD-MM HH:mm:ss] LEVEL message``, coloured only on a terminal."""

    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = "[%s] %-5s %s" % (Helper.local_time(record.created),
                                 _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
                                 record.getMessage())
        if record.exc_info and log.isEnabledFor(logging.DEBUG):
            text += "\n" + self.formatException(record.exc_info)
        # a task's text may hold lone surrogates (file names that are not UTF-8), which no
        # UTF-8 stream takes: escaped here, every handler writes them (\udce9)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        if self.colour:
            return _COLOURS.get(record.levelno, "") + text + "\x1b[0m"
        return text


class Logger:
    """The JS Logger on stdlib logging: off, info, warn, error, debug."""

    def __init__(self, level: str = "info", file: str | None = None,
                 stream: Any = None) -> None:
        self.logger = logging.getLogger("worker")
        self.set_level(level)
        stream = stream or sys.stderr
        self.logger.handlers.clear()
        self.logger.propagate = False
        handler = logging.StreamHandler(stream)
        handler.setFormatter(_Formatter(hasattr(stream, "isatty") and stream.isatty()))
        self.logger.addHandler(handler)
        if file:
            with contextlib.suppress(OSError):  # task output lands there: FileHandler says what fails
                private_files(file)
            try:
                file_handler = logging.FileHandler(file, encoding="utf-8", errors="backslashreplace")
            except OSError as exc:
                raise WorkerError(f"logFile={file!r}: cannot write it ({exc.strerror or exc}): "
                                  "give a file in a folder this user may write") from None
            file_handler.setFormatter(_Formatter(False))
            self.logger.addHandler(file_handler)

    def set_level(self, level: str) -> None:
        """Change the level; an unknown word is an error."""
        key = str(level or "info").strip().lower()
        if key not in _LEVELS:
            raise WorkerError(f"unknown LOG_LEVEL {level!r} (use off, error, warn, info, debug)")
        self.logger.setLevel(_LEVELS[key])

    def info(self, *args: Any) -> None:
        self.logger.info(" ".join(map(str, args)))

    def warn(self, *args: Any) -> None:
        self.logger.warning(" ".join(map(str, args)))

    def error(self, *args: Any) -> None:
        self.logger.error(" ".join(map(str, args)))

    def debug(self, *args: Any) -> None:
        self.logger.debug(" ".join(map(str, args)))

    def fatal(self, *args: Any, code: int = 1) -> None:
        """Log at the highest level and exit the process non-zero."""
        self.logger.critical(" ".join(map(str, args)))
        raise SystemExit(code)


# Crypt ######################################################################

class Crypt:
    """AES-256-CBC as the JS Crypt: ``{iv, encryptedData}`` in hex."""

    def __init__(self, key: str | bytes) -> None:
        raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        if len(raw) != 32:
            raise CryptError("transferEncryptToken must be exactly 32 bytes, got %d" % len(raw))
        self._algorithm = algorithms.AES(raw)
        self._key = raw

    def derive(self, label: bytes) -> bytes:
        """A 32-byte key for another use (HMAC-SHA256 of ``label`` under this key)."""
        return hmac.new(self._key, label, hashlib.sha256).digest()

    def encrypt(self, text: str | bytes) -> dict:
        """Encrypt with a fresh IV; returns ``{"iv", "encryptedData"}``."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        iv = os.urandom(16)
        padder = _padding.PKCS7(128).padder()
        padded = padder.update(data) + padder.finalize()
        enc = Cipher(self._algorithm, modes.CBC(iv)).encryptor()
        body = enc.update(padded) + enc.finalize()
        return {"iv": iv.hex(), "encryptedData": body.hex()}

    def decrypt(self, obj: dict | str) -> str:
        """Decrypt ``{"iv", "encryptedData"}`` (or its JSON text) to text."""
        try:
            return self._decrypt(obj).decode("utf-8")
        except UnicodeDecodeError:
            raise CryptError("decrypted data is not UTF-8 text: the transferEncryptToken "
                             "probably differs from the master's") from None

    def _decrypt(self, obj: dict | str) -> bytes:
        try:
            if isinstance(obj, str):
                obj = json.loads(obj)
            iv = bytes.fromhex(obj["iv"])
            body = bytes.fromhex(obj["encryptedData"])
            dec = Cipher(self._algorithm, modes.CBC(iv)).decryptor()
            padded = dec.update(body) + dec.finalize()
            unpadder = _padding.PKCS7(128).unpadder()
            return unpadder.update(padded) + unpadder.finalize()
        except (ValueError, KeyError, TypeError) as exc:
            raise CryptError(
                f"cannot decrypt ({exc.__class__.__name__}): the transferEncryptToken probably differs "
                "from the master's") from None

    def decrypt_bytes(self, obj: dict | str) -> bytes:
        """Decrypt to raw bytes (assets may be binary)."""
        return self._decrypt(obj)

    def encrypt_json(self, value: Any) -> str:
        """JSON text of the encrypted JSON text of ``value`` (the job format)."""
        return json_dumps(self.encrypt(json_dumps(value)))

    def decrypt_json(self, text: dict | str) -> Any:
        """Inverse of :meth:`encrypt_json`."""
        plain = self.decrypt(text)
        try:
            return json.loads(plain)
        except ValueError:
            raise CryptError("decrypted data is not JSON") from None


# Bencode ####################################################################

def bencode(value: Any) -> bytes:
    """Encode as JS ``bencode`` does: sorted keys, bools as ints, None dropped."""
    out: list[bytes] = []
    _bencode_into(value, out)
    return b"".join(out)


def _bencode_into(value: Any, out: list[bytes]) -> None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        out += (b"%d:" % len(value), bytes(value))
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out += (b"%d:" % len(raw), raw)
    elif isinstance(value, (bool, int, float)):
        out.append(b"i%de" % int(value))
    elif isinstance(value, dict):
        out.append(b"d")
        items = [(k.encode("utf-8") if isinstance(k, str) else bytes(k), v)
                 for k, v in value.items() if v is not None]
        for key, item in sorted(items, key=lambda kv: kv[0]):
            out += (b"%d:" % len(key), key)
            _bencode_into(item, out)
        out.append(b"e")
    elif isinstance(value, (list, tuple)):
        out.append(b"l")
        for item in value:
            if item is not None:
                _bencode_into(item, out)
        out.append(b"e")
    else:
        raise LocalProtocolError(f"cannot bencode {type(value).__name__}")


_BDECODE_DEPTH = 64


def bdecode(data: bytes) -> Any:
    """Decode bencode strictly; strings stay bytes, dict keys become str.

    Anything malformed raises :class:`DecodeError` and nothing else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("bencode input must be bytes")
    data = bytes(data)
    try:
        value, end = _bdecode_at(data, 0, 0)
    except (IndexError, ValueError, RecursionError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"malformed bencode: {exc.__class__.__name__}") from None
    if end != len(data):
        raise DecodeError("trailing bytes after bencode value")
    return value


def _bdecode_at(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if depth > _BDECODE_DEPTH:
        raise DecodeError("bencode nested too deeply")
    lead = data[pos]
    if lead == 0x69:  # i<digits>e
        end = data.index(b"e", pos + 1)
        digits = data[pos + 1:end]
        if not re.fullmatch(rb"-?\d{1,20}", digits):
            raise DecodeError("bad bencode integer")
        return int(digits), end + 1
    if 0x30 <= lead <= 0x39:  # <len>:<bytes>
        colon = data.index(b":", pos)
        if colon - pos > 10:
            raise DecodeError("bencode string length too long")
        if not data[pos:colon].isdigit():  # int() would take "1_0" and "3 ", which JS bencode refuses
            raise DecodeError("bad bencode string length")
        size = int(data[pos:colon])
        start = colon + 1
        if start + size > len(data):
            raise DecodeError("bencode string past end of data")
        return data[start:start + size], start + size
    if lead == 0x6C:  # l ... e
        items, pos = [], pos + 1
        while data[pos] != 0x65:
            item, pos = _bdecode_at(data, pos, depth + 1)
            items.append(item)
        return items, pos + 1
    if lead == 0x64:  # d ... e
        result, pos = {}, pos + 1
        while data[pos] != 0x65:
            key, pos = _bdecode_at(data, pos, depth + 1)
            if not isinstance(key, bytes):
                raise DecodeError("bencode dict key is not a string")
            result[key.decode("latin-1")], pos = _bdecode_at(data, pos, depth + 1)
        return result, pos + 1
    raise DecodeError(f"bad bencode lead byte 0x{lead:02x}")


# Base58 #####################################################################

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58encode(data: bytes) -> str:
    """Base58 (Bitcoin alphabet), leading zero bytes as ``1``."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    number = int.from_bytes(data, "big")
    chars = []
    while number:
        number, rem = divmod(number, 58)
        chars.append(_B58[rem])
    return "1" * zeros + "".join(reversed(chars))


def b58decode(text: str | bytes) -> bytes:
    """Inverse of :func:`b58encode`; a bad character is a :class:`DecodeError`."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("latin-1")
    if len(text) > 200:
        raise DecodeError("base58 text too long")
    number = 0
    for char in text:
        if char not in _B58_INDEX:
            raise DecodeError(f"bad base58 character {char!r}")
        number = number * 58 + _B58_INDEX[char]
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


def b58check_encode(payload: bytes) -> str:
    """Base58 of payload plus the first 4 bytes of its double SHA-256."""
    check = hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    return b58encode(payload + check)


def b58check_decode(text: str) -> bytes:
    """Inverse of :func:`b58check_encode`; checks the checksum."""
    raw = b58decode(text)
    payload, check = raw[:-4], raw[-4:]
    if len(raw) < 5 or hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4] != check:
        raise DecodeError("bad base58check checksum")
    return payload


# RIPEMD-160 #################################################################

def ripemd160(data: bytes) -> bytes:
    """RIPEMD-160 from hashlib, or the pure-Python version where it is missing."""
    try:
        return hashlib.new("ripemd160", data).digest()
    except ValueError:  # OpenSSL 3.0.0-3.0.6 keep it in the legacy provider only (3.0.7 put it back)
        return _ripemd160_py(data)


_RMD_R = [int(c, 16) for c in (
    "0123456789abcdef" "74d1a6f3c0952eb8" "3ae49f812706db5c" "19ba08c4d37fe562" "40597c2ae138b6fd")]
_RMD_RR = [int(c, 16) for c in (
    "5e7092b4d6f81a3c" "6b370d5aef8c4912" "f5137e69b8c2a04d" "86413bf05c2d97ae" "cfa4158762de039b")]
_RMD_S = [
    11, 14, 15, 12, 5, 8, 7, 9, 11, 13, 14, 15, 6, 7, 9, 8, 7, 6, 8, 13, 11, 9, 7, 15, 7, 12, 15, 9,
    11, 7, 13, 12, 11, 13, 6, 7, 14, 9, 13, 15, 14, 8, 13, 6, 5, 12, 7, 5, 11, 12, 14, 15, 14, 15,
    9, 8, 9, 14, 5, 6, 8, 6, 5, 12, 9, 15, 5, 11, 6, 8, 13, 12, 5, 12, 13, 14, 11, 8, 5, 6]
_RMD_SS = [
    8, 9, 9, 11, 13, 15, 15, 5, 7, 7, 8, 11, 14, 14, 12, 6, 9, 13, 15, 7, 12, 8, 9, 11, 7, 7, 12, 7,
    6, 15, 13, 11, 9, 7, 15, 11, 8, 6, 6, 14, 12, 13, 5, 14, 13, 13, 7, 5, 15, 5, 8, 11, 14, 14, 6,
    14, 6, 9, 12, 9, 12, 5, 15, 8, 8, 5, 12, 9, 12, 5, 14, 6, 8, 13, 6, 5, 15, 13, 11, 11]
_RMD_K = (0x00000000, 0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xA953FD4E)
_RMD_KK = (0x50A28BE6, 0x5C4DD124, 0x6D703EF3, 0x7A6D76E9, 0x00000000)
_M32 = 0xFFFFFFFF


def _rmd_f(j: int, x: int, y: int, z: int) -> int:
    if j < 16:
        return x ^ y ^ z
    if j < 32:
        return (x & y) | (~x & z)
    if j < 48:
        return (x | ~y) ^ z
    if j < 64:
        return (x & z) | (y & ~z)
    return x ^ (y | ~z)


def _rol(x: int, n: int) -> int:
    x &= _M32
    return ((x << n) | (x >> (32 - n))) & _M32


def _ripemd160_py(data: bytes) -> bytes:
    """RIPEMD-160 in pure Python (Dobbertin, Bosselaers, Preneel 1996)."""
    h = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0]
    msg = data + b"\x80" + b"\0" * ((55 - len(data)) % 64) + struct.pack("<Q", 8 * len(data))
    for block in range(0, len(msg), 64):
        x = struct.unpack("<16I", msg[block:block + 64])
        a, b, c, d, e = h
        aa, bb, cc, dd, ee = h
        for j in range(80):
            t = _rol(a + _rmd_f(j, b, c, d) + x[_RMD_R[j]] + _RMD_K[j // 16], _RMD_S[j]) + e
            a, e, d, c, b = e, d, _rol(c, 10), b, t & _M32
            t = _rol(aa + _rmd_f(79 - j, bb, cc, dd) + x[_RMD_RR[j]] + _RMD_KK[j // 16],
                     _RMD_SS[j]) + ee
            aa, ee, dd, cc, bb = ee, dd, _rol(cc, 10), bb, t & _M32
        h = [(h[1] + c + dd) & _M32, (h[2] + d + ee) & _M32, (h[3] + e + aa) & _M32,
             (h[4] + a + bb) & _M32, (h[0] + b + cc) & _M32]
    return struct.pack("<5I", *h)


# bugout identity ############################################################

@dataclasses.dataclass(frozen=True)
class PeerKeys:
    """What the swarm knows of a peer: its keys and when it last spoke."""
    pk: str
    ek: str
    last: int
    #: True once a packet signed with ``pk`` carried these keys (a handshake's claim proves nothing)
    verified: bool = False
    #: the signer's time (ms) of the newest signed packet that carried these keys (0: none)
    made: int = 0


@functools.lru_cache(4096)  # every packet names its sender's key
def address_of(public_key: bytes) -> str:
    """bugout address: bs58check(0x55 || ripemd160(sha512(public key)))."""
    return b58check_encode(ADDRESS_PREFIX + ripemd160(hashlib.sha512(public_key).digest()))


#: A base58 public key as bytes (cached: every packet carries one).
key_bytes = functools.lru_cache(4096)(b58decode)


def make_seed(material: bytes | None = None) -> str:
    """A new bugout seed: bs58check(0x49 0x0a || 32 random bytes)."""
    material = os.urandom(32) if material is None else material
    if len(material) != 32:
        raise WorkerError("seed material must be 32 bytes")
    return b58check_encode(SEED_PREFIX + material)


class Identity:
    """Ed25519 keys from the seed, plus a box key pair for this process."""

    def __init__(self, seed: str | None = None, box_secret: bytes | None = None) -> None:
        self.seed = seed or make_seed()
        try:
            raw = b58check_decode(self.seed)
        except DecodeError:
            raise WorkerError("seed is not a bugout seed (bad base58check)") from None
        if len(raw) != 34 or raw[:2] != SEED_PREFIX:
            raise WorkerError("seed is not a bugout seed (wrong prefix or length)")
        self.sign_public, self.sign_secret = _nacl.crypto_sign_seed_keypair(raw[2:])
        if box_secret is None:
            self.box_public, self.box_secret = _nacl.crypto_box_keypair()
        else:
            self.box_secret = bytes(box_secret)
            self.box_public = _nacl.crypto_scalarmult_base(self.box_secret)
        #: base58 keys as they travel in packets and handshakes
        self.pk = b58encode(self.sign_public)
        self.ek = b58encode(self.box_public)
        self.address = address_of(self.sign_public)

    def sign(self, message: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes)."""
        return _nacl.crypto_sign(message, self.sign_secret)[:64]


def infohash_of(identifier: str) -> tuple[bytes, bytes]:
    """The swarm's torrent: (infohash, bencoded info) for an identifier."""
    raw = identifier.encode("utf-8")
    info = bencode({"length": len(raw), "name": raw, "piece length": 16384,
                    "pieces": hashlib.sha1(raw).digest()})
    return hashlib.sha1(info).digest(), info


# bugout packets #############################################################

@dataclasses.dataclass(frozen=True)
class Seen:
    """A peer was seen for the first time (or again after a timeout)."""
    address: str


@dataclasses.dataclass(frozen=True)
class Left:
    """A peer said goodbye (``x``) or was silent too long."""
    address: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Rekeyed:
    """A packet the peer signed brought another box key than the one we had: a new process
    of it (killed and started again, with no goodbye), which cannot open what we boxed for
    the old key."""
    address: str


@dataclasses.dataclass(frozen=True)
class Message:
    """A ``m`` packet: a JSON message, broadcast or addressed to us."""
    address: str
    value: Any
    encrypted: bool


@dataclasses.dataclass(frozen=True)
class Call:
    """An RPC call (``r``) addressed to us."""
    address: str
    name: str
    args: Any
    nonce: bytes


@dataclasses.dataclass(frozen=True)
class Response:
    """An RPC response (``rr``) to one of our calls."""
    address: str
    nonce: bytes
    result: Any


@dataclasses.dataclass(frozen=True)
class Ping:
    """A ``p`` packet."""
    address: str


@dataclasses.dataclass(frozen=True, slots=True)
class Verified:
    """A packet that passed (signature, swarm, age), as the node's wire policy weighs it.

    ``t``: when its signer says it made it (ms, the signer's clock); ``kind``:
    its type (``p``, ``m``, ``r``, ``rr``, ``x``); ``boxed``: it came in an
    envelope boxed for us.
    """
    address: str
    t: int
    kind: str
    boxed: bool


@dataclasses.dataclass(slots=True)  # made for every payload sent: not frozen, cheaper to make
class Outgoing:
    """A payload for every wire but ``origin`` (None: all wires).

    ``relay``: another peer's payload passed on (``origin`` is the wire it
    came by); ``to``: one of ours, boxed for that address alone. It unpacks as
    the ``(payload, origin)`` pair it once was.
    """
    payload: bytes
    origin: Any = None
    to: str | None = None
    relay: bool = False

    def __iter__(self) -> Iterator[Any]:
        return iter((self.payload, self.origin))

    def __getitem__(self, index: int) -> Any:
        return (self.payload, self.origin)[index]


def _text(value: Any) -> str:
    """A bencoded string field as text (JS ``Buffer.toString()``)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, int):
        return str(value)
    raise DecodeError("expected a string field")


class SeenCache:
    """Payload hashes seen lately: bounded in count and age, small per entry.

    Two generations of 64-bit keys; the older one is dropped when the newer
    fills half the limit or grows older than ``max_age_ms``. Packets older than
    that are refused by their timestamp anyway.
    """

    def __init__(self, limit: int = 32768, max_age_ms: int = PEER_TIMEOUT_MS) -> None:
        self.limit = limit
        self.max_age_ms = max_age_ms
        self._current: set[int] = set()
        self._previous: set[int] = set()
        self._started = 0

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def __contains__(self, digest: bytes) -> bool:
        key = int.from_bytes(digest[:8], "big")
        return key in self._current or key in self._previous

    def add(self, digest: bytes, now: int) -> None:
        """Remember a hash (``now`` in ms)."""
        if len(self._current) >= max(self.limit // 2, 1) or now - self._started > self.max_age_ms:
            self._previous, self._current, self._started = self._current, set(), now
        self._current.add(int.from_bytes(digest[:8], "big"))


#: Peers seen for the first time within this many ms share one ping ("so they know about us too").
HELLO_GAP_MS = 1000
#: Keys of the latest hellos kept, so that the peer they greet gets no ping to all wires as well.
GREETED_KEPT = 64
#: JSON from peers nested deeper than this (arrays and objects) is dropped.
MAX_JSON_DEPTH = 512
#: The peer table holds at most this many peers.
MAX_KNOWN_PEERS = 1000
#: A packet proves something only when its signer made it within this many ms of our clock:
#: a replayed one proves nothing. It proves the wire it came by (the node's wire policy; an
#: answer boxed to us for a call of ours proves that at any age), and a new box key of its
#: signer (a peer started again, BugoutCore.saw_peer).
FRESH_MS = 10_000
#: Packets that passed lately whose copies are told apart (the node's wire policy): copies come
#: within moments of the first, by other wires.
RECENT_PACKETS = 1024
#: New identities one remote address may introduce through relayed packets: a burst, then a rate.
NEW_PEERS_BURST = 32
NEW_PEERS_PER_SECOND = 1.0


class BugoutCore:
    """bugout's packet logic without I/O: payloads in, events and payloads out.

    ``receive_payload`` takes one ``bo_channel`` payload and returns events;
    everything to send goes to :meth:`data_to_send` as :class:`Outgoing` items
    ("send to every wire except ``origin``"). Time comes in as ``now`` (ms);
    randomness from ``random`` (``os.urandom``).

    Stricter than JS bugout 0.0.13, which passes on every payload it sees for
    the first time (even one whose signature fails; one that is not bencode
    throws before the relay): only verified packets (signature, swarm
    identifier, age) and well-formed envelopes boxed for another peer are
    relayed. JSON fields are bounded in size and depth, answers are taken only
    for calls in ``awaiting``, the peer table is bounded, and the new identities a
    ``source`` (the remote address of a wire) may introduce are rate-limited.
    ``protected`` addresses (the master) are never evicted from the table.
    """

    def __init__(self, identifier: str, identity: Identity, *,
                 timeout_ms: int = PEER_TIMEOUT_MS, seen_limit: int = 32768,
                 random: Callable[[int], bytes] = os.urandom,
                 max_json: int = DEFAULT_MAX_MESSAGE, max_peers: int = MAX_KNOWN_PEERS) -> None:
        self.identifier = identifier
        self.identity = identity
        self.timeout_ms = timeout_ms
        #: longest JSON text taken from a peer (bytes), most peers in the table
        self.max_json, self.max_peers = max_json, max_peers
        #: address -> PeerKeys of every peer seen recently
        self.peers: dict[str, PeerKeys] = {}
        #: addresses that matter (the master): never evicted, never rate-limited
        self.protected: set[str] = set()
        #: nonces of our calls still awaiting an answer (None: every answer is taken)
        self.awaiting: Container[bytes] | None = None
        #: a ping for peers seen lately waits for :meth:`tick` (HELLO_GAP_MS after the last)
        self.hello_due = False
        #: counters: dropped packets by reason, duplicates, relayed
        self.stats: collections.Counter = collections.Counter()
        #: the packet the last :meth:`receive_payload` took from another peer (None: none); or,
        #: when it was a copy of one taken lately, that one (``copied``)
        self.verified: Verified | None = None
        self.copied: Verified | None = None
        # private
        self._random = random
        self._seen = SeenCache(seen_limit, timeout_ms)
        self._recent: dict[bytes, Verified] = {}  # digest prefix -> a packet that passed lately
        self._outgoing: list[Outgoing] = []
        self._new_peers = _RateLimit(NEW_PEERS_PER_SECOND, NEW_PEERS_BURST)
        self._last_hello = -HELLO_GAP_MS
        self._greeted: dict[str, bool] = {}  # the keys our latest hellos were boxed for
        self._shared_key = functools.lru_cache(4096)(self._box_key)  # by the peer's ek
        self._identifier_bytes = identifier.encode("utf-8")

    # outgoing
    def data_to_send(self) -> list[Outgoing]:
        """Payloads queued since the last call, with the wire they skip."""
        out, self._outgoing = self._outgoing, []
        return out

    def make_packet(self, fields: dict, now: int) -> bytes:
        """Signed packet: bencode({s: sig(p), p}) with p = bencode(header + fields)."""
        packet = {"t": now, "i": self.identifier, "pk": self.identity.pk,
                  "ek": self.identity.ek, "n": self._random(8)}
        packet.update(fields)
        p = bencode(packet)
        return bencode({"s": self.identity.sign(p), "p": p})

    def seal(self, address: str, signed: bytes) -> bytes:
        """Box a signed packet for one seen peer (the bugout envelope)."""
        peer = self.peers.get(address)
        if peer is None:
            raise InvalidState(f"{address} not seen - no encryption key")
        nonce = self._random(24)
        key = self._shared_key(peer.ek)
        boxed = _nacl.crypto_box_afternm(signed, nonce, key)
        return bencode({"n": nonce, "ek": self.identity.ek, "e": boxed})

    def _box_key(self, ek: str) -> bytes:
        """The NaCl box key shared with the holder of ``ek``."""
        return _nacl.crypto_box_beforenm(b58decode(ek), self.identity.box_secret)

    def _emit(self, payload: bytes, now: int, to: str | None = None) -> None:
        self._seen.add(hashlib.sha512(payload).digest()[16:], now)
        self._outgoing.append(Outgoing(payload, None, to))

    def send_ping(self, now: int) -> None:
        """Broadcast a ``p`` packet."""
        self._emit(self.make_packet({"y": "p"}, now), now)

    def tick(self, now: int) -> None:
        """Send what waited for time to pass: the ping for peers seen lately."""
        if self.hello_due and now - self._last_hello >= HELLO_GAP_MS:
            self._hello(now)

    def _hello(self, now: int) -> None:
        """Ping so a peer seen for the first time learns our keys; one per HELLO_GAP_MS at most."""
        if now - self._last_hello < HELLO_GAP_MS:
            self.hello_due = True
            return
        self._last_hello, self.hello_due = now, False
        self.send_ping(now)

    def hello_for(self, ek: str, now: int) -> bytes:
        """A ping boxed for the holder of ``ek`` alone (not queued: the caller sends it on one wire).

        Raises DecodeError when ``ek`` is not a key.
        """
        if len(key_bytes(ek)) != 32:
            raise DecodeError("not a key")
        nonce = self._random(24)
        boxed = _nacl.crypto_box_afternm(self.make_packet({"y": "p"}, now), nonce, self._shared_key(ek))
        payload = bencode({"n": nonce, "ek": self.identity.ek, "e": boxed})
        self._seen.add(hashlib.sha512(payload).digest()[16:], now)
        self._greeted[ek] = True
        if len(self._greeted) > GREETED_KEPT:
            del self._greeted[next(iter(self._greeted))]
        return payload

    def send_leave(self, now: int) -> None:
        """Broadcast an ``x`` packet (we are leaving)."""
        self._emit(self.make_packet({"y": "x"}, now), now)

    def send_message(self, value: Any, now: int, address: str | None = None) -> None:
        """A JSON message, to everyone or (encrypted) to one address."""
        signed = self.make_packet({"y": "m", "v": json_dumps(value)}, now)
        if address:
            self._emit(self.seal(address, signed), now, address)
        else:
            self._emit(signed, now)

    def send_call(self, address: str, name: str, args: Any, now: int, nonce: bytes | None = None) -> bytes:
        """An encrypted RPC call; returns its 8-byte nonce (``nonce``: a call sent again)."""
        if address not in self.peers:
            raise InvalidState(f"{address} not seen - no public key")
        nonce = nonce or self._random(8)
        fields = {"y": "r", "c": name, "a": json_dumps({} if args is None else args),
                  "rn": nonce}
        self._emit(self.seal(address, self.make_packet(fields, now)), now, address)
        return nonce

    def send_response(self, address: str, nonce: bytes, result: Any, now: int) -> None:
        """The encrypted answer to a call (which may echo a lone surrogate the caller sent)."""
        fields = {"y": "rr", "rn": nonce, "rr": storable_json(result)}
        self._emit(self.seal(address, self.make_packet(fields, now)), now, address)

    # incoming
    def saw_peer(self, pk: str, ek: str, now: int, verified: bool = False, made: int = 0) -> list:
        """Record a peer's keys; on first sight emit Seen and broadcast a ping.

        JS bugout pings once per new peer; peers seen within HELLO_GAP_MS of
        each other share one ping here (a flood of identities is not answered
        by a flood of pings): :meth:`tick` sends the one that waited.
        A peer that got our hello (:meth:`hello_for`, a ping boxed for it on a
        wire of its own) learns our keys so: no broadcast for it, which in a
        mesh of N peers every peer passes on to every wire (N² copies).

        ``verified``: the keys came in a packet signed with ``pk``. Keys from a
        handshake never replace verified ones; when the table is full they take
        the place of the peer silent longest (never a protected one). A signed
        packet (its signer's time ``made``) replaces a known box key only when
        it is fresh (made within FRESH_MS) or newer than the packet that gave
        that key (a peer whose clock is off), so an old process's packet
        replayed cannot turn our calls to a key no one holds.
        """
        try:
            address = self._address(pk)
        except DecodeError:
            self.stats["bad_pk"] += 1
            return []
        if address == self.identity.address:
            return []
        known = self.peers.get(address)
        fresh = known is not None and known.last + self.timeout_ms >= now
        if fresh and known.verified and not verified:  # type: ignore[union-attr]
            return []
        events: list = []
        if known is None and len(self.peers) >= self.max_peers:
            events = self._evict()
            if not events:
                self.stats["dropped: peer table full"] += 1
                return []
        if verified and known is not None and known.ek != ek:
            if abs(now - made) > FRESH_MS and made <= known.made:  # an older process's, replayed
                self.stats["stale key"] += 1
                return events
            events.append(Rekeyed(address))
        if known is not None and known.ek == ek:
            made = max(made, known.made)
        self.peers[address] = PeerKeys(pk, ek, now, verified, made)
        if fresh:
            return events
        if not self._greeted.pop(ek, False):
            self._hello(now)
        return events + [Seen(address)]

    def _evict(self) -> list:
        """Forget the peer silent longest that is not protected; its Left event."""
        candidates = [(p.last, a) for a, p in self.peers.items() if a not in self.protected]
        if not candidates:
            return []
        _, address = min(candidates)
        del self.peers[address]
        self.stats["peers evicted"] += 1
        return [Left(address, "evicted")]

    def receive_payload(self, payload: bytes, now: int, origin: Any = None,
                        source: Any = None) -> list:
        """Handle one payload from the wire ``origin``; returns events.

        ``source`` (the wire's remote address) is what new identities are
        counted against. Only a payload that passed is remembered as seen:
        junk cannot push good packets out of the cache.
        """
        self.verified = self.copied = None
        digest = hashlib.sha512(payload).digest()[16:]
        if digest in self._seen:
            self.stats["duplicate"] += 1
            self.copied = self._recent.get(digest[:8])
            return []
        try:
            outer = bdecode(payload)
            if not isinstance(outer, dict):
                raise DecodeError("payload is not a dict")
            boxed = "e" in outer and "n" in outer and "ek" in outer
            inner = self._unbox(outer) if boxed else outer
            events = [] if inner is None else self._verify(*self._signed(inner), boxed, now, source)
        except DecodeError as exc:
            self._dropped(exc)
            return getattr(exc, "events", [])
        self._seen.add(digest, now)
        if self.verified is not None:
            if len(self._recent) >= RECENT_PACKETS:
                del self._recent[next(iter(self._recent))]
            self._recent[digest[:8]] = self.verified
        if inner is None or not boxed:  # an envelope we opened was for us alone: no relay
            self.stats["relayed"] += 1
            self._outgoing.append(Outgoing(payload, origin, relay=True))
        return events

    def _dropped(self, exc: DecodeError) -> None:
        self.stats["dropped"] += 1
        reason = f"dropped: {exc}"  # the counter's keys stay few, whatever peers send
        self.stats[reason if reason in self.stats or len(self.stats) < 64 else "dropped: other"] += 1

    @staticmethod
    def _signed(outer: dict) -> tuple[dict, dict]:
        """(packet fields, outer dict) of a signed packet ``{s, p}``."""
        p, s = outer.get("p"), outer.get("s")
        if not isinstance(p, bytes) or not isinstance(s, bytes) or len(s) != 64:
            raise DecodeError("no signed packet")
        packet = bdecode(p)
        if not isinstance(packet, dict):
            raise DecodeError("packet is not a dict")
        return packet, outer

    def _unbox(self, outer: dict) -> dict | None:
        """The signed packet inside an envelope; None when it is boxed for another peer."""
        e, n, ek = outer["e"], outer["n"], outer["ek"]
        if not (isinstance(e, bytes) and isinstance(n, bytes) and isinstance(ek, bytes)):
            raise DecodeError("bad envelope")
        if len(outer) != 3 or len(n) != 24 or len(e) < 96 or len(key_bytes(ek)) != 32:
            raise DecodeError("bad envelope")
        try:
            key = self._shared_key(ek.decode("latin-1"))
            plain = _nacl.crypto_box_open_afternm(e, n, key)
        except (CryptoError, ValueError, TypeError):
            return None
        inner = bdecode(plain)
        if not isinstance(inner, dict):
            raise DecodeError("envelope holds no dict")
        return inner

    def _address(self, pk: str) -> str:
        return address_of(key_bytes(pk))

    def _admit(self, address: str, source: Any, now: int) -> None:
        """A peer not in the table may join it: within the table's size and its source's rate."""
        if address in self.peers or address in self.protected or address == self.identity.address:
            return
        if len(self.peers) >= self.max_peers:
            raise DecodeError("peer table full")
        if not self._new_peers.allow(source, now / 1000):
            raise DecodeError("new identities over the rate")

    def _verify(self, packet: dict, outer: dict, boxed: bool, now: int, source: Any = None) -> list:
        """Check identifier, age, a new sender's admission and the signature; then make events."""
        pk, ek = _text(packet.get("pk", b"")), _text(packet.get("ek", b""))
        t = packet.get("t")
        if packet.get("i") != self._identifier_bytes:
            raise DecodeError("other identifier")
        if not isinstance(t, int) or t + self.timeout_ms <= now:
            raise DecodeError("too old")
        address = self._address(pk)
        self._admit(address, source, now)
        try:
            _nacl.crypto_sign_open(outer["s"] + outer["p"], key_bytes(pk))
        except (BadSignatureError, ValueError, TypeError):
            raise DecodeError("bad signature") from None
        if pk == self.identity.pk:
            self.stats["own packet"] += 1
            return []
        events = self.saw_peer(pk, ek, now, verified=True, made=t)
        kind = _text(packet.get("y", b""))
        try:
            events += self._dispatch(kind, packet, address, boxed)
        except DecodeError as exc:
            exc.events = events  # type: ignore[attr-defined] - its sender was seen all the same
            raise
        self.verified = Verified(address, t, kind, boxed)
        return events

    def _dispatch(self, kind: str, packet: dict, address: str, boxed: bool) -> list:
        if kind == "m":
            value = self._json(packet, "v")
            return [] if value is None else [Message(address, value, boxed)]
        if kind == "r":
            return [Call(address, _text(packet.get("c", b"")), self._json(packet, "a"),
                         _nonce(packet))]
        if kind == "rr":
            nonce = _nonce(packet)
            if self.awaiting is not None and nonce not in self.awaiting:
                raise DecodeError("answer to no call of ours")  # its JSON is not even read
            return [Response(address, nonce, self._json(packet, "rr"))]
        if kind == "p":
            return [Ping(address)]
        if kind == "x":
            self.peers.pop(address, None)
            return [Left(address, "left")]
        self.stats["unknown type"] += 1
        return []

    def _json(self, packet: dict, key: str) -> Any:
        """A JSON text field: None when malformed (as bugout treats it); over the bounds, dropped."""
        raw = packet.get(key, b"")
        if isinstance(raw, bytes) and len(raw) > self.max_json:
            raise DecodeError("JSON over the size limit")
        return _json_field(packet, key)

    def expire(self, now: int) -> list:
        """Forget peers silent longer than the timeout; returns Left events."""
        gone = [a for a, p in self.peers.items() if p.last + self.timeout_ms < now]
        for address in gone:
            del self.peers[address]
        return [Left(address, "timeout") for address in gone]


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_JSON_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_JSON_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deeply a JSON text nests arrays and objects (brackets inside strings skipped)."""
    brackets = _JSON_NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_JSON_STEP.__getitem__, brackets)), default=0)


def _json_field(packet: dict, key: str) -> Any:
    """A JSON text field; malformed JSON is None, as bugout treats it.

    Nesting deeper than MAX_JSON_DEPTH raises DecodeError. The exact depth is
    measured only when the text has that many brackets, after a parse that
    fails fast on the deepest (Python's own recursion limit).
    """
    text = _text(packet.get(key, b""))
    try:
        value = json.loads(text)
    except RecursionError:
        raise DecodeError("JSON nested too deeply") from None
    except ValueError:
        return None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and json_depth(text) > MAX_JSON_DEPTH:
        raise DecodeError("JSON nested too deeply")
    return value


def _nonce(packet: dict) -> bytes:
    value = packet.get("rn")
    if not isinstance(value, bytes):
        raise DecodeError("rpc packet without nonce")
    return value


# Peer wire (BEP 3, 6, 10) ###################################################

PROTOCOL_NAME = b"\x13BitTorrent protocol"
MSG_PORT, MSG_REQUEST, MSG_HAVE_ALL, MSG_REJECT, MSG_EXTENDED = 9, 6, 14, 16, 20


def make_peer_id() -> bytes:
    """20-byte peer id: our client prefix and 12 base64 characters."""
    return PEER_ID_PREFIX + base64.b64encode(os.urandom(9), b"-_")


def handshake_bytes(infohash: bytes, peer_id: bytes, dht: bool = False) -> bytes:
    """The 68-byte handshake: extensions (BEP 10), fast (BEP 6), DHT bit if on."""
    reserved = b"\0\0\0\0\0\x10\0" + (b"\x05" if dht else b"\x04")
    return PROTOCOL_NAME + reserved + infohash + peer_id


def frame(message_id: int, body: bytes = b"") -> bytes:
    """One length-prefixed wire message, header and body in one buffer."""
    return struct.pack(">IB", len(body) + 1, message_id) + body


@dataclasses.dataclass(frozen=True)
class Handshake:
    """The remote handshake arrived."""
    peer_id: bytes
    reserved: bytes


@dataclasses.dataclass(frozen=True)
class ExtendedHandshake:
    """The remote BEP 10 handshake (the dict as decoded)."""
    fields: dict


@dataclasses.dataclass(frozen=True)
class ExtensionPayload:
    """A ``bo_channel`` message body."""
    payload: bytes


@dataclasses.dataclass(frozen=True)
class DhtPort:
    """The peer's DHT node listens on this UDP port (BEP 5 ``port`` message)."""
    port: int


class WireState(enum.Enum):
    """The parser's states; the moves allowed are in ``_WIRE_MOVES``."""
    HANDSHAKE = 1  # waiting for the 68-byte BitTorrent handshake
    OPEN = 2  # length-prefixed messages (BEP 10 extended handshake, bo_channel payloads, ...)
    CLOSED = 3  # the remote closed the connection (EOF): nothing more is parsed
    ERROR = 4  # the remote broke the protocol (``error`` says how): nothing more is parsed


_WIRE_MOVES = {
    WireState.HANDSHAKE: {WireState.OPEN, WireState.CLOSED, WireState.ERROR},
    WireState.OPEN: {WireState.CLOSED, WireState.ERROR},
    WireState.CLOSED: set(),
    WireState.ERROR: set(),
}


class PeerWire:
    """One BitTorrent connection without I/O: bytes in, events and bytes out."""

    def __init__(self, infohash: bytes, peer_id: bytes, extended: dict, *,
                 initiator: bool, metadata: bytes = b"",
                 max_message: int = DEFAULT_MAX_MESSAGE, dht_port: int | None = None) -> None:
        self.infohash = infohash
        self.peer_id = peer_id
        self.initiator = initiator
        self.max_message = max_message
        self.state = WireState.HANDSHAKE
        #: the remote peer id, reserved bytes and BEP 10 handshake, once known
        self.remote_peer_id: bytes | None = None
        self.remote_reserved = b""
        self.remote_extended: dict | None = None
        #: reason of the protocol error that closed this wire
        self.error: str | None = None
        # private
        self._extended = extended
        self._metadata = metadata
        self._dht_port = dht_port
        self._buffer = bytearray()
        self._events: list = []
        self._out: list[bytes] = []
        self._remote_ids: dict[str, int] = {}
        self._units = 0  # handshakes and messages parsed whole
        if initiator:
            self._out.append(handshake_bytes(infohash, peer_id, dht_port is not None))

    def _set_state(self, state: WireState) -> None:
        if state not in _WIRE_MOVES[self.state]:
            raise InvalidState(f"wire cannot go from {self.state.name} to {state.name}")
        log.debug("- wire %s -> %s", self.state.name, state.name)
        self.state = state

    # sans-I/O interface
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the socket; protocol errors close the wire (ERROR)."""
        if self.state in (WireState.CLOSED, WireState.ERROR):
            return
        self._buffer += data
        try:
            while self._step():
                pass
        except RemoteProtocolError as exc:
            self.error = str(exc)
            self._buffer.clear()
            self._set_state(WireState.ERROR)

    def receive_eof(self) -> None:
        """The remote closed the connection."""
        if self.state in (WireState.HANDSHAKE, WireState.OPEN):
            self._set_state(WireState.CLOSED)

    @property
    def partial(self) -> int:
        """Bytes held of a message (or handshake) not complete yet."""
        return len(self._buffer)

    @property
    def pending(self) -> tuple[int, int] | None:
        """(which unit, bytes it still lacks) of a message or handshake partly received, else None.

        The first number names the unit (units parsed whole before it): equal in two
        calls, it is the same message. Lengths count from the length prefix once it is in.
        """
        buf = self._buffer
        if not buf or self.state not in (WireState.HANDSHAKE, WireState.OPEN):
            return None
        if self.state is WireState.HANDSHAKE:
            return self._units, 68 - len(buf)
        if len(buf) < 4:
            return self._units, 4 - len(buf)
        return self._units, 4 + struct.unpack_from(">I", buf)[0] - len(buf)

    @property
    def has_output(self) -> bool:
        """True when :meth:`data_to_send` has bytes."""
        return bool(self._out)

    def events_received(self) -> list:
        """Events parsed since the last call."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket, all at once."""
        out, self._out = self._out, []
        return b"".join(out)

    @property
    def ready(self) -> bool:
        """True once the peer advertised ``bo_channel``: payloads can be sent."""
        return self.state is WireState.OPEN and EXT in self._remote_ids

    def send_extension(self, payload: bytes) -> None:
        """Queue a ``bo_channel`` payload under the id the peer advertised."""
        if not self.ready:
            raise LocalProtocolError(f"peer has not advertised {EXT}")
        self._out.append(struct.pack(">IBB", len(payload) + 2, MSG_EXTENDED,
                                     self._remote_ids[EXT]) + payload)

    def send_keepalive(self) -> None:
        """Queue a keep-alive (a zero length prefix)."""
        if self.state is WireState.OPEN:
            self._out.append(b"\0\0\0\0")

    # parsing
    def _step(self) -> bool:
        """Parse one unit from the buffer; False when more bytes are needed."""
        buf = self._buffer
        if self.state is WireState.HANDSHAKE:
            return self._parse_handshake(buf)
        if len(buf) < 4:
            return False
        (length,) = struct.unpack_from(">I", buf)
        if length > self.max_message:
            raise RemoteProtocolError("message of %d bytes over the limit" % length)
        if len(buf) < 4 + length:
            return False
        with memoryview(buf) as view:  # one copy of a large payload, not three
            if length > 1 and buf[4] == MSG_EXTENDED:
                self._on_extended(buf[5], bytes(view[6:4 + length]))
            elif length:
                self._on_message(buf[4], bytes(view[5:4 + length]))
        del buf[:4 + length]
        self._units += 1
        return True

    def _parse_handshake(self, buf: bytearray) -> bool:
        if len(buf) < 68:
            if buf[:len(PROTOCOL_NAME)] != PROTOCOL_NAME[:len(buf)]:
                raise RemoteProtocolError("not a BitTorrent handshake")
            return False
        if buf[:20] != PROTOCOL_NAME:
            raise RemoteProtocolError("not a BitTorrent handshake")
        if bytes(buf[28:48]) != self.infohash:
            raise RemoteProtocolError("handshake for another infohash")
        self.remote_reserved = bytes(buf[20:28])
        self.remote_peer_id = bytes(buf[48:68])
        del buf[:68]
        self._units += 1
        if not self.initiator:
            self._out.append(handshake_bytes(self.infohash, self.peer_id,
                                             self._dht_port is not None))
        self._set_state(WireState.OPEN)
        self._events.append(Handshake(self.remote_peer_id, self.remote_reserved))
        self._send_greeting()
        return True

    def _send_greeting(self) -> None:
        """After handshakes: our BEP 10 handshake, have_all, DHT port."""
        if self.remote_reserved[5] & 0x10:
            self._out.append(frame(MSG_EXTENDED, b"\0" + bencode(self._extended)))
        if self.remote_reserved[7] & 0x04:
            self._out.append(frame(MSG_HAVE_ALL))
        if self._dht_port is not None and self.remote_reserved[7] & 0x01:
            self._out.append(frame(MSG_PORT, struct.pack(">H", self._dht_port)))

    def _on_message(self, message_id: int, body: bytes) -> None:
        if message_id == MSG_REQUEST and len(body) == 12 and self.remote_reserved[7] & 0x04:
            # We never unchoke: a request is refused (BEP 6) rather than served.
            self._out.append(frame(MSG_REJECT, body))
        elif message_id == MSG_PORT and len(body) == 2 and self.remote_reserved[7] & 0x01:
            self._events.append(DhtPort(struct.unpack(">H", body)[0]))
        # Everything else (have_all, bitfield, choke, ...) needs nothing.

    def _on_extended(self, ext_id: int, body: bytes) -> None:
        if ext_id == 0:
            self._on_extended_handshake(body)
        elif ext_id == OUR_EXT_IDS[EXT]:
            self._events.append(ExtensionPayload(body))
        elif ext_id == OUR_EXT_IDS["ut_metadata"]:
            self._on_metadata(body)

    def _on_extended_handshake(self, body: bytes) -> None:
        try:
            fields = bdecode(body)
        except DecodeError as exc:
            raise RemoteProtocolError(f"bad extended handshake: {exc}") from None
        if not isinstance(fields, dict) or not isinstance(fields.get("m", {}), dict):
            raise RemoteProtocolError("extended handshake is not a dict")
        self._remote_ids = {k: v for k, v in fields.get("m", {}).items()
                            if isinstance(v, int) and 0 < v < 256}
        self.remote_extended = fields
        self._events.append(ExtendedHandshake(fields))

    def _on_metadata(self, body: bytes) -> None:
        """BEP 9: serve the info dict (piece 0), reject anything else."""
        remote_id = self._remote_ids.get("ut_metadata")
        try:
            request, _end = _bdecode_at(body, 0, 0)
        except (IndexError, ValueError):
            return
        if not remote_id or not isinstance(request, dict) or request.get("msg_type") != 0:
            return
        piece = request.get("piece")
        if piece == 0 and self._metadata:
            head = bencode({"msg_type": 1, "piece": 0, "total_size": len(self._metadata)})
            data = head + self._metadata
        else:
            data = bencode({"msg_type": 2, "piece": piece if isinstance(piece, int) else 0})
        self._out.append(frame(MSG_EXTENDED, bytes([remote_id]) + data))


# Connections: what TCP and WebRTC wires share ###############################

#: A new wire must speak bugout (a BEP 10 handshake naming bo_channel) within this
#: (WebTorrent allows 25 s for the BitTorrent handshake alone).
HANDSHAKE_TIMEOUT = 10.0
#: Payloads (and their bytes) one wire may have handled per loop turn; the rest wait, unread.
WIRE_BUDGET = 16
WIRE_BUDGET_BYTES = 256 * 1024
#: A losing duplicate is closed this long after it began to drain, whatever the peer does.
DRAIN_GRACE = 5.0
#: A message partly received must come this many bytes closer to whole per interval (or be
#: whole), or its wire is closed; a protected peer's wire never is (its RPC timeouts decide).
PROGRESS_BYTES = 16 * 1024
PROGRESS_SECONDS = 5.0
#: Our own payloads on a wire whose peer echoes them (JS bugout sends every new packet back
#: by every wire, the one it came by too) that are not echoed yet: at most this many bytes.
#: The original JS master (queue-xec/master 2.1.0, streamx 2.16.0 under WebTorrent's
#: speed-limiter) stops writing to a wire for good when one loop turn of its pushes more than
#: about 16 KiB into it; what it echoes in one turn is what it read in one.
ECHO_WINDOW = 8 * 1024
#: An echo not back within this many seconds is not waited for: forgotten if echoes of what went
#: after it came (bugout never echoes what it saw first by another wire), else the peer stopped echoing.
ECHO_WAIT = 5.0
#: Own payloads sent on one wire whose echoes are looked for (the oldest is forgotten past it).
ECHO_TRACKED = 256
#: Own payloads held for one wire's echoes: past this many bytes they all go (memory stays bounded).
ECHO_HELD_MAX = 1024 * 1024
#: How often Bugout.room_for looks again whether echoes made room.
ECHO_POLL = 0.005


class ConnState(enum.Enum):
    """A connection's life as the node sees it; the moves allowed are in ``_CONN_MOVES``."""
    HANDSHAKE = 1
    OPEN = 2
    DRAINING = 3
    CLOSED = 4


_CONN_MOVES = {
    ConnState.HANDSHAKE: {ConnState.OPEN, ConnState.CLOSED},
    ConnState.OPEN: {ConnState.DRAINING, ConnState.CLOSED},
    ConnState.DRAINING: {ConnState.CLOSED},
    ConnState.CLOSED: set(),
}


class Connection:
    """One peer's byte stream (a TCP socket, a data channel) around its :class:`PeerWire`.

    The moves between states (:class:`ConnState`)::

        HANDSHAKE -> OPEN      the peer's BEP 10 handshake named bo_channel, before the deadline
        HANDSHAKE -> CLOSED    deadline passed, bad bytes, a cap, ourselves, or the peer left
        OPEN      -> DRAINING  another wire of the same peer stays, or this one did not prove its
                               claim in time (WirePolicy)
        OPEN      -> CLOSED    the peer left, sent bad bytes, or stopped reading or progressing
        DRAINING  -> CLOSED    the peer's EOF came (it sent all it will), or DRAIN_GRACE passed

    - Bytes are read and handled in every state but CLOSED, so what was in flight
      on a losing duplicate is still delivered.
    - Only OPEN connections take new payloads. A DRAINING one writes what it
      holds, then half-closes (TCP EOF); the peer reads up to that EOF.
    - Both ends pick the same loser, so each end's EOF tells the other that it
      has everything. The peer's EOF on an OPEN connection, while another
      connection to that peer is up, means the peer drains this one: we go on
      sending here until our end drains it too, or DRAIN_GRACE passes.
    - A connection hands the node at most WIRE_BUDGET payloads per loop turn and
      reads nothing meanwhile, unless it carries a protected peer
      (:meth:`Bugout.prioritize`): one flooding peer cannot hold the loop.
    - Our own payloads to a peer that sends them back (JS bugout echoes every
      new packet) go as their echoes make room: at most ECHO_WINDOW bytes not
      echoed yet, so a JS master never echoes more than that in one turn (the
      original one stops writing to a wire for good past about 16 KiB). What
      waits goes when the wire drains or closes, or once an echo is ECHO_WAIT late.

    Subclasses move the bytes: ``_write``, ``_write_eof``, ``_close_transport``,
    ``write_buffer``, ``writable``, ``_pause``/``_resume``, ``peer_name``.
    """

    #: the node's counter for a handshake deadline that passed
    DEADLINE_STAT = "handshake timeouts"

    def __init__(self, node: Bugout, initiator: bool, dialed: tuple | None = None,
                 wire: PeerWire | None = None) -> None:
        self.node = node
        #: True when we dialed (or made the WebRTC offer): we count as the dialer
        self.initiator = initiator
        #: (host, port) we dialed, for outgoing TCP connections
        self.dialed = dialed
        self.wire = wire if wire is not None else node.new_wire(initiator)
        self.state = ConnState.HANDSHAKE
        #: the peer's bugout address, as its extended handshake claims it (a claim: see WirePolicy)
        self.address: str | None = None
        #: when (monotonic seconds) a verified packet, anyone's, last came by this wire (None: never)
        self.last_verified: float | None = None
        #: the peer's IP address (None over WebRTC)
        self.remote_host: str | None = None
        #: bytes received in all; when it was made; when a keep-alive last went; when bytes last came
        self.bytes_in = 0
        self.started = time.monotonic()
        self.last_in = self.started
        self.last_keepalive = self.started
        #: when a verified packet (signed, fresh, new to us) last came by this wire (monotonic)
        self.last_verified: float | None = None
        # private
        self._backlog: collections.deque = collections.deque()
        self._handling = False  # a _handle call is scheduled
        self._paused = False
        self._held_back = False  # we left some of its payloads for a later loop turn since the last look
        self._eof = False  # the peer sends no more
        self._eof_sent = False  # we send no more
        self._timer: asyncio.TimerHandle | None = None  # handshake deadline or drain grace
        self._queued = 0  # bytes in the wire's out buffer, not given to the transport yet
        self._flush_pending = False
        self._progress: tuple[float, tuple[int, int] | None] = (self.started, None)  # checked at, pending
        #: True while the peer sends our own payloads back (JS bugout): ours are then paced
        self.echoes = False
        self._unechoed: dict[int, tuple[int, float]] = {}  # hash of ours sent -> (size, when)
        self._unechoed_bytes = 0
        self._last_echo = self.started  # when an echo of ours last came
        self._paced: collections.deque[bytes] = collections.deque()  # ours waiting for echoes
        self._paced_bytes = 0
        self._echo_timer: asyncio.TimerHandle | None = None

    # what subclasses provide
    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _write_eof(self) -> None:
        """Half-close where the stream can (TCP); nothing otherwise."""

    def _close_transport(self, abort: bool) -> None:
        raise NotImplementedError

    def write_buffer(self) -> int:
        """Bytes the transport holds, not sent yet."""
        return 0

    @property
    def writable(self) -> bool:
        return False

    def _pause(self) -> None:
        """Stop reading from the peer (flow control), where the stream can."""

    def _resume(self) -> None:
        """Read again."""

    @property
    def peer_name(self) -> str:
        return "?"

    # shared behaviour
    @property
    def source(self) -> str:
        """What per-address limits count against: the peer's IP, or its WebRTC name."""
        return self.remote_host or self.peer_name

    @property
    def closing(self) -> bool:
        return self.state is ConnState.CLOSED or not self.writable

    @property
    def peer_eof(self) -> bool:
        """True once the peer has said it sends no more (TCP EOF)."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes waiting to go to the peer: queued here, and held by the transport."""
        return self._queued + self.write_buffer()

    @property
    def paced_bytes(self) -> int:
        """Bytes of ours held for the peer's echoes (not in ``buffered``: not given to the wire yet)."""
        return self._paced_bytes

    @property
    def dialer_port(self) -> int | None:
        """The TCP port of the end that dialed (both ends see it); None over WebRTC."""
        return None

    def set_state(self, state: ConnState) -> None:
        if state not in _CONN_MOVES[self.state]:
            raise InvalidState(f"{self.peer_name}: cannot go from {self.state.name} to {state.name}")
        log.debug("- %s %s -> %s", self.peer_name, self.state.name, state.name)
        self.state = state

    def start_deadline(self, seconds: float) -> None:
        """Close unless the wire speaks bugout within ``seconds``."""
        self._set_timer(seconds, self._on_deadline)

    def _set_timer(self, seconds: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_deadline(self) -> None:
        self._timer = None
        if self.state is ConnState.HANDSHAKE:
            self.node.stats[self.DEADLINE_STAT] += 1
            log.debug("%s: no bugout handshake in time", self.peer_name)
            self.close()

    def set_open(self) -> None:
        """The wire speaks bugout: payloads may flow."""
        self._cancel_timer()
        self.set_state(ConnState.OPEN)

    # bytes in
    def feed(self, data: bytes) -> None:
        """Bytes from the peer: parse them, then hand the node what came (within the budget)."""
        if self.state is ConnState.CLOSED:
            return
        try:
            self.bytes_in += len(data)
            self.last_in = time.monotonic()
            self.node.stats["bytes in"] += len(data)
            self.wire.receive_data(data)
            events = self.wire.events_received()
            if self._unechoed:
                self._echoed(events)
            self._backlog.extend(events)
            if self.wire.has_output:  # handshake answers, metadata, rejects
                self.flush()
            if self.node.is_protected(self):
                self.node.lane.heard(self.last_in)
                self._handle()
            elif self._slow():
                self._wait_in_lane()
            else:
                self._handle()
        except Exception:  # noqa: BLE001 - a bug of ours: this peer goes, the node stays, the log small
            self.node.wire_failed(self)

    def _slow(self) -> bool:
        """True when a protected peer talks and this open wire is none's route (SlowLane); a
        handshake is handled at once (the inbound caps weigh open wires and handshakes apart)."""
        return (bool(self._backlog) and self.state is not ConnState.HANDSHAKE
                and self.node.lane.active(time.monotonic()) and not self.node.is_protected(self))

    def _wait_in_lane(self) -> None:
        self._pause()
        self._held_back = True
        self.node.lane.add(self)
        self.node.holding(self, self.wire.partial + self._backlog_bytes())

    def _backlog_bytes(self) -> int:
        return sum(len(getattr(e, "payload", b"")) for e in self._backlog)

    def _handle(self, budget: int = WIRE_BUDGET) -> None:
        self._handling = False
        if self.state is ConnState.CLOSED:
            return
        backlog = self._backlog
        if len(backlog) <= budget or self.node.is_protected(self):
            events, size = list(backlog), 0
            backlog.clear()
        else:
            events, size = [], 0
            while backlog and len(events) < budget and size < WIRE_BUDGET_BYTES:
                events.append(backlog.popleft())
                size += len(getattr(events[-1], "payload", b""))
        if events:
            self.node.wire_events(self, events)
        if self.state is ConnState.CLOSED:
            return
        waiting = 0
        if backlog:  # the rest waits for the next loop turn, and the socket with it
            self._pause()
            self._held_back = True
            if self._slow():
                self.node.lane.add(self)
            elif not self._handling:
                self._handling = True
                asyncio.get_running_loop().call_soon(self._handle_later)
            waiting = self._backlog_bytes()
        else:
            self._resume()
            if self.wire.state is WireState.ERROR:
                self.node.bad_input(self)
                return
        self.node.holding(self, self.wire.partial + waiting)

    def _handle_later(self, budget: int = WIRE_BUDGET) -> None:
        try:
            self._handle(budget)
        except Exception:  # noqa: BLE001 - as in feed
            self.node.wire_failed(self)

    def handle_waiting(self) -> None:
        """Its turn in the node's SlowLane came: LANE_VISIT payloads, then the next wire's turn."""
        self._handle_later(LANE_VISIT)

    def receive_eof(self) -> bool:
        """The peer sends no more. True while we go on writing (it drains us as a duplicate)."""
        self._eof = True
        self.node.wire_eof(self)
        if self.state is ConnState.OPEN and self.node.has_twin(self):
            self._set_timer(DRAIN_GRACE, self.close)
            return True
        self.wire.receive_eof()
        self.close()
        return False

    def stalled(self, now: float) -> bool:
        """True when one message, partly received at the last check, is still partly received
        and came less than PROGRESS_BYTES closer to whole since (a slow stream of messages
        that each end is no stall). Checks closer than PROGRESS_SECONDS say False, and so
        does one after a window in which we held its payloads back (WIRE_BUDGET): the socket
        was not read, so the rest of the message was ours to read, not the peer's to send
        (a mesh's relays, thousands of pings on one wire, take seconds of loop turns)."""
        checked, before = self._progress
        if now - checked < PROGRESS_SECONDS:
            return False
        pending = self.wire.pending if self.state in (ConnState.OPEN, ConnState.DRAINING) else None
        self._progress = (now, pending)
        held_back, self._held_back = self._held_back, bool(self._backlog)
        return (not held_back and pending is not None and before is not None and pending[0] == before[0]
                and before[1] - pending[1] < PROGRESS_BYTES)

    # bytes out
    def send_payload(self, payload: bytes, own: bool = False) -> None:
        """Queue one ``bo_channel`` payload if the connection is OPEN.

        Payloads queued in one loop turn leave in one write: fewer syscalls and
        segments when a result and a request go out together. ``own``: one of
        ours, paced by its echoes while the peer sends them back (:meth:`_echoed`).
        """
        if self.state is not ConnState.OPEN:
            return
        if own:
            if self._paced or not self._echo_room(len(payload), time.monotonic()):
                self._paced.append(payload)
                self._paced_bytes += len(payload)
                self.node.stats["payloads paced by echoes"] += 1
                if self._paced_bytes > ECHO_HELD_MAX:
                    self.echoes = False
                self._send_paced()
                return
            self._expect_echo(payload, time.monotonic())
        self._queue_payload(payload)

    def _queue_payload(self, payload: bytes) -> None:
        self.wire.send_extension(payload)
        self._queued += len(payload) + 6
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_pending = False
        self.flush()

    # pacing by echoes: a JS master's pushes per loop turn stay small
    def _expect_echo(self, payload: bytes, now: float) -> None:
        if len(self._unechoed) >= ECHO_TRACKED:
            self._unechoed_bytes -= self._unechoed.pop(next(iter(self._unechoed)))[0]
        key = hash(payload)
        self._unechoed_bytes -= self._unechoed.pop(key, (0, 0.0))[0]
        self._unechoed[key] = (len(payload), now)
        self._unechoed_bytes += len(payload)

    def _echo_room(self, size: int, now: float) -> bool:
        """True when ``size`` more bytes of ours may go now.

        An echo ECHO_WAIT overdue is not waited for: forgotten if echoes of what went after it
        came (bugout echoes only what is new to it: a copy that reached it first by another
        wire, say ours by another peer while ours here waited, is never echoed here); with no
        echo since it went, the peer stopped echoing (or is that slow), and the pacing stops.
        """
        if not self.echoes:
            return True
        while self._unechoed:
            key = next(iter(self._unechoed))
            size_sent, sent = self._unechoed[key]
            if now - sent < ECHO_WAIT:
                break
            if self._last_echo < sent:
                self.echoes = False  # send as before
                self._unechoed.clear()
                self._unechoed_bytes = 0
                return True
            del self._unechoed[key]
            self._unechoed_bytes -= size_sent
        return not self._unechoed_bytes or self._unechoed_bytes + size <= ECHO_WINDOW

    def _echoed(self, events: list) -> None:
        """Our own payloads the peer sent back: room for those we hold."""
        for event in events:
            if type(event) is ExtensionPayload:
                found = self._unechoed.pop(hash(event.payload), None)
                if found is not None:
                    self._unechoed_bytes -= found[0]
                    self.echoes = True
                    self._last_echo = time.monotonic()
        if self._paced:
            self._send_paced()

    def sends_at_once(self, size: int) -> bool:
        """True when ``size`` more bytes of ours would leave now, not wait for echoes."""
        return not self._paced and self._echo_room(size, time.monotonic())

    def _send_paced(self, everything: bool = False) -> None:
        if self.state is not ConnState.OPEN:  # nothing more goes: forget what waits
            self._paced.clear()
            self._paced_bytes = 0
        now = time.monotonic()
        while self._paced and (everything or self._echo_room(len(self._paced[0]), now)):
            payload = self._paced.popleft()
            self._paced_bytes -= len(payload)
            self._expect_echo(payload, now)
            self._queue_payload(payload)
        self._echo_timer_for_oldest()

    def _echo_timer_for_oldest(self) -> None:
        """Wake up when the oldest echo is overdue, while payloads wait for it."""
        if self._echo_timer is not None:
            self._echo_timer.cancel()
            self._echo_timer = None
        oldest = next(iter(self._unechoed.values()), None)
        if self._paced and oldest is not None:
            due = max(oldest[1] + ECHO_WAIT - time.monotonic(), 0.0)
            self._echo_timer = asyncio.get_running_loop().call_later(due, self._send_paced)

    def flush(self) -> None:
        """Give the transport what the wire has to send (it waits while not writable).

        After our EOF (draining) nothing more is written: what the wire makes
        then (a reject, say) is dropped.
        """
        if self._eof_sent or not self.writable:
            return
        data = self.wire.data_to_send()
        self._queued = 0
        if data:
            self.node.stats["bytes out"] += len(data)
            self._write(data)

    def send_keepalive(self) -> None:
        self.last_keepalive = time.monotonic()
        self.wire.send_keepalive()
        self.flush()

    # endings
    def drain(self) -> None:
        """A duplicate lost: take nothing new, write what is held, then EOF; close on the peer's."""
        if self.state is not ConnState.OPEN:
            return
        self._send_paced(everything=True)
        self.set_state(ConnState.DRAINING)
        if self._eof:
            self.close()
            return
        self.flush()
        self._write_eof()
        self._eof_sent = True
        self._set_timer(DRAIN_GRACE, self.close)

    def close(self, abort: bool = False) -> None:
        """Close, idempotent; ``abort`` drops what is unsent (a peer that does not read)."""
        if self.state is ConnState.CLOSED:
            return
        if not abort:
            if self.state is ConnState.OPEN:
                self._send_paced(everything=True)
            self.flush()
        self.set_state(ConnState.CLOSED)
        self._cancel_timer()
        self._send_paced()  # forgets what waits, stops the timer
        self._backlog.clear()
        self._close_transport(abort)

    def lost(self) -> None:
        """The transport is gone: the node forgets this connection."""
        if self.state is not ConnState.CLOSED:
            self.set_state(ConnState.CLOSED)
            self._cancel_timer()
            self._send_paced()  # forgets what waits, stops the timer
        self.node.detach(self)


# TCP transport ##############################################################

#: Accepting pauses this long after the process ran out of descriptors, doubling up to the max
#: (up to ACCEPT_REFUSED_MAX while the node refuses connections: a newcomer waits little).
ACCEPT_BACKOFF = 0.1
ACCEPT_BACKOFF_MAX = 5.0
ACCEPT_REFUSED_MAX = 1.0
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _tune_socket(transport: asyncio.BaseTransport) -> None:
    """No Nagle on our side; quick ACKs so the JS side's Nagle does not stall."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _quickack(sock)


def _quickack(sock: Any) -> None:
    # Linux clears TCP_QUICKACK after a while, so it is set again on each read.
    if hasattr(socket, "TCP_QUICKACK"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class WireConnection(Connection, asyncio.Protocol):
    """Moves bytes between one TCP socket and its :class:`PeerWire`."""

    def __init__(self, node: Bugout, initiator: bool, dialed: tuple | None = None) -> None:
        super().__init__(node, initiator, dialed)
        self.transport: asyncio.Transport | None = None
        self._sock: Any = None
        self._peer: tuple | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        self._peer = tuple(peer[:2]) if peer else None
        self.remote_host = self._peer[0] if self._peer else None
        _tune_socket(transport)
        self.node.attach(self)
        self.start_deadline(self.node.handshake_timeout)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self._sock is not None:
            _quickack(self._sock)
        self.feed(data)

    def eof_received(self) -> bool:
        return self.receive_eof()  # True: the socket stays open for our writes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    @property
    def peer_name(self) -> str:
        return "{}:{}".format(*self._peer) if self._peer else "?"

    @property
    def writable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    @property
    def dialer_port(self) -> int | None:
        if self.initiator:
            local = self._sock.getsockname() if self._sock is not None else None
            return local[1] if local else None
        return self._peer[1] if self._peer else None

    def write_buffer(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def _write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]
        if self._sock is not None:  # sending turns delayed ACKs back on
            _quickack(self._sock)

    def _write_eof(self) -> None:
        if self.writable and self.transport.can_write_eof():  # type: ignore[union-attr]
            self.transport.write_eof()  # type: ignore[union-attr]

    def _close_transport(self, abort: bool) -> None:
        if self.transport is None:
            return
        if abort:
            self.transport.abort()
            return
        self.transport.close()
        if self.transport.get_write_buffer_size():  # what it does not read in DRAIN_GRACE is dropped
            asyncio.get_running_loop().call_later(DRAIN_GRACE, self.transport.abort)

    def _pause(self) -> None:
        if not self._paused and self.writable:
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _resume(self) -> None:
        if self._paused and self.writable:
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]


def _listen_sockets(infos: list, port: int, backlog: int = 128) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets, one per address (as asyncio's server makes them)."""
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _name, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if not port and len(socks) > 1:  # one free port for every address
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            try:
                sock.bind(addr)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {addr[0]}:{addr[1]}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class _Acceptor:
    """Accepts TCP connections for a node; pauses with back-off when it cannot take more.

    asyncio's server logs every accept that fails for want of descriptors, and
    on Linux tries again at once: hundreds of thousands of lines when a peer
    holds many connections. Here accepting pauses (ACCEPT_BACKOFF, doubling
    up to ACCEPT_BACKOFF_MAX) and the node logs it once per interval. It pauses
    the same way while the node refuses connections (its inbound cap): the
    kernel's backlog holds the callers meanwhile, at no cost to us.
    """

    def __init__(self, node: Bugout, socks: list[socket.socket]) -> None:
        self.node = node
        self.socks = socks
        # private
        self._delay = ACCEPT_BACKOFF
        self._resume: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.socks:
            loop.add_reader(sock.fileno(), self._ready, sock)

    def _ready(self, sock: socket.socket) -> None:
        for _ in range(64):  # a burst, then the other callbacks of this loop turn
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self.node.cannot_accept(exc, self._delay)
                self._back_off(ACCEPT_BACKOFF_MAX)
                return
            if not self.node.accepted(conn, addr):
                self._back_off(ACCEPT_REFUSED_MAX)
                return
            self._delay = ACCEPT_BACKOFF

    def _back_off(self, most: float) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.socks:
            loop.remove_reader(sock.fileno())
        self._delay = min(self._delay, most)
        self._resume = loop.call_later(self._delay, self.start)
        self._delay = min(self._delay * 2, most)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._resume is not None:
            self._resume.cancel()
        for sock in self.socks:
            loop.remove_reader(sock.fileno())
            sock.close()


# LSD (BEP 14) ###############################################################

def lsd_announcement(infohash: bytes, port: int, cookie: str) -> bytes:
    """A BT-SEARCH datagram as bittorrent-lsd sends it."""
    return ("BT-SEARCH * HTTP/1.1\r\nHost: %s:%d\r\nPort: %d\r\nInfohash: %s\r\n"
            "cookie: %s\r\n\r\n\r\n" % (LSD_HOST, LSD_PORT, port, infohash.hex(), cookie)
            ).encode("ascii")


def lsd_peer_id(cookie: str | None) -> bytes | None:
    """The announcer's peer id in a bittorrent-lsd cookie (``bittorrent-lsd-<hex>``), if any."""
    prefix = "bittorrent-lsd-"
    if cookie and cookie.startswith(prefix) and re.fullmatch(r"[0-9a-fA-F]{40}", cookie[len(prefix):]):
        return bytes.fromhex(cookie[len(prefix):])
    return None


def parse_lsd(data: bytes) -> tuple[int, list[bytes], str | None] | None:
    """(port, infohashes, cookie) of a BT-SEARCH datagram, or None."""
    try:
        lines = data.decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        return None
    if not lines or lines[0] != "BT-SEARCH * HTTP/1.1":
        return None
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), []).append(value.strip())
    port = (headers.get("port") or [""])[0]
    hashes = [bytes.fromhex(h) for h in headers.get("infohash", [])
              if re.fullmatch(r"[0-9a-fA-F]{40}", h)]
    if not port.isdigit() or not 0 < int(port) < 65536 or not hashes:
        return None
    return int(port), hashes, (headers.get("cookie") or [None])[-1]


class _LsdProtocol(asyncio.DatagramProtocol):
    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.discovery.lsd_datagram(data, addr[0])


def sending_address(host: str, target: str | None = None) -> str | None:
    """The address our packets to ``target`` leave from: ``host`` (the address we listen on)
    when it is one IPv4 address of ``target``'s scope (both loopback or neither; None: any
    multicast group), else None (the kernel picks). Peers dial back the sender of an LSD
    announce, and count wires and announces per address: the one we listen on is ours."""
    try:
        ours = ipaddress.ip_address(host)
        theirs = None if target is None else ipaddress.ip_address(target)
    except ValueError:
        return None
    if ours.version != 4 or ours.is_unspecified:
        return None
    if theirs is not None and (theirs.version != 4 or theirs.is_loopback != ours.is_loopback):
        return None
    return host


def _lsd_socket(host: str = "") -> socket.socket:
    """UDP socket on 6771, in the LSD multicast group, shareable with others; announcing from
    ``host`` when it is one IPv4 address (sending_address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", LSD_PORT))
    group = socket.inet_aton(LSD_HOST) + socket.inet_aton("0.0.0.0")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    if source := sending_address(host):
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(source))
    sock.setblocking(False)
    return sock


# DHT (BEP 5): KRPC messages #################################################

#: BEP 5: k contacts per bucket; Kademlia's alpha: queries in flight per lookup.
DHT_K = 8
DHT_ALPHA = 3
DHT_QUERY_TIMEOUT = 3.0
#: BEP 5: tokens stay valid for 10 minutes (two secrets of 5); nodes unheard of
#: for 15 minutes are questionable and their bucket is refreshed.
DHT_TOKEN_ROTATE = 5 * 60.0
DHT_STALE = 15 * 60.0
DHT_PEER_TTL = 30 * 60.0
#: Bounds on memory and on the query rate (a good citizen floods no one).
DHT_MAX_DATAGRAM = 4096
DHT_MAX_PENDING = 128
DHT_MAX_LOOKUPS = 16
DHT_LOOKUP_QUERIES = 120
DHT_LOOKUP_SECONDS = 60.0
DHT_QUERIES_PER_SECOND = 50.0
DHT_ANSWERS_PER_SECOND = 250.0
DHT_ANSWERS_PER_IP = 20.0
DHT_STORE_HASHES = 512
DHT_STORE_PEERS = 100
DHT_MAX_VALUES = 50
#: Against one host posing as many nodes (ids cost nothing in BEP 5): at most this
#: many contacts of one IP address in the routing table and among a lookup's
#: candidates (the bootstrap nodes always are), and at most DHT_PEERS_PER_IP peers
#: a lookup takes from the answers of one address's nodes: half of MAX_DIALING, so
#: one address never fills the dials (libtorrent keeps one node per IP).
DHT_PER_IP = 2
DHT_PEERS_PER_IP = 16
#: Datagrams read a second, from one address and in all (a burst of as many), before
#: any is decoded: what is over it is dropped, counted; over the second, the socket
#: is not read until the budget is back (the kernel drops the rest). We answer
#: DHT_ANSWERS_PER_SECOND and ask DHT_QUERIES_PER_SECOND: far below.
DHT_DATAGRAMS_PER_IP = 50.0
DHT_DATAGRAMS_PER_SECOND = 1000.0
#: When Bugout looks its swarm up: seconds after start (WebTorrent 1.9 may drop
#: the first DHT peer it meets, PROTOCOL.md section 7), then every so often.
DHT_LOOKUP_AT = (0.0, 5.0, 15.0, 30.0)
DHT_LOOKUP_ALONE = 60.0
DHT_LOOKUP_INTERVAL = 5 * 60.0
#: BEP 5 error codes.
KRPC_GENERIC, KRPC_PROTOCOL, KRPC_METHOD = 201, 203, 204

Addr = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class KrpcQuery:
    """``{t, y: q, q: method, a: args}``."""
    t: bytes
    method: str
    args: dict

    def __bytes__(self) -> bytes:
        return bencode({"t": self.t, "y": "q", "q": self.method, "a": self.args})

    @classmethod
    def from_dict(cls, message: dict) -> KrpcQuery:
        method, args = message.get("q"), message.get("a")
        if not isinstance(method, bytes) or not isinstance(args, dict):
            raise DecodeError("KRPC query without q or a")
        return cls(message["t"], method.decode("latin-1"), args)


@dataclasses.dataclass(frozen=True)
class KrpcResponse:
    """``{t, y: r, r: values}``."""
    t: bytes
    values: dict

    def __bytes__(self) -> bytes:
        return bencode({"t": self.t, "y": "r", "r": self.values})

    @classmethod
    def from_dict(cls, message: dict) -> KrpcResponse:
        if not isinstance(message.get("r"), dict):
            raise DecodeError("KRPC response without r")
        return cls(message["t"], message["r"])


@dataclasses.dataclass(frozen=True)
class KrpcError:
    """``{t, y: e, e: [code, text]}``."""
    t: bytes
    code: int
    text: str

    def __bytes__(self) -> bytes:
        return bencode({"t": self.t, "y": "e", "e": [self.code, self.text]})

    @classmethod
    def from_dict(cls, message: dict) -> KrpcError:
        e = message.get("e")
        if not isinstance(e, list):
            raise DecodeError("KRPC error without e")
        code = e[0] if e and isinstance(e[0], int) else KRPC_GENERIC
        text = e[1] if len(e) > 1 and isinstance(e[1], bytes) else b""
        return cls(message["t"], code, text.decode("utf-8", "replace"))


KRPC_TYPES: dict[bytes, Any] = {b"q": KrpcQuery, b"r": KrpcResponse, b"e": KrpcError}
Krpc = KrpcQuery | KrpcResponse | KrpcError


def parse_krpc(data: bytes) -> Krpc:
    """One KRPC datagram as a message; anything malformed raises DecodeError."""
    message = bdecode(data)
    if not isinstance(message, dict):
        raise DecodeError("KRPC message is not a dict")
    t = message.get("t")
    if not isinstance(t, bytes) or not 0 < len(t) <= 32:
        raise DecodeError("KRPC message without a transaction id")
    y = message.get("y")
    cls = KRPC_TYPES.get(y) if isinstance(y, bytes) else None
    if cls is None:
        raise DecodeError("KRPC message of unknown type")
    return cls.from_dict(message)


def compact_addr(addr: Addr) -> bytes:
    """BEP 5 compact peer info: 4 bytes of IPv4 address, 2 of port."""
    return socket.inet_aton(addr[0]) + struct.pack(">H", addr[1])


def _parse_addr(data: bytes) -> Addr | None:
    """A compact address, or None for port 0, 0.0.0.0/8 or multicast and above."""
    port = int.from_bytes(data[4:6], "big")
    if port == 0 or data[0] == 0 or data[0] >= 224:
        return None
    return socket.inet_ntoa(data[:4]), port


def parse_nodes(data: Any, limit: int = 32) -> list[tuple[bytes, Addr]]:
    """BEP 5 compact node info (20-byte id + address); bad entries are skipped."""
    if not isinstance(data, bytes):
        return []
    found = []
    for start in range(0, min(len(data) - 25, 26 * limit), 26):
        addr = _parse_addr(data[start + 20:start + 26])
        if addr is not None:
            found.append((data[start:start + 20], addr))
    return found


def parse_peers(values: Any, limit: int = 200) -> list[Addr]:
    """The ``values`` of a get_peers answer: compact peer addresses."""
    if not isinstance(values, list):
        return []
    found = [_parse_addr(v) for v in values[:limit] if isinstance(v, bytes) and len(v) == 6]
    return [addr for addr in found if addr is not None]


def _is_id(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == 20


def dht_node_id(seed: str) -> bytes:
    """Our node id: SHA-1 of the seed's key material, so a fixed ``seed`` keeps it."""
    raw = b58check_decode(seed)
    # A label first: the id must not double as a hash of the bare signing seed.
    return hashlib.sha1(b"queue-xec dht node id\0" + raw[2:]).digest()


# DHT (BEP 5): routing table #################################################

@dataclasses.dataclass
class DhtContact:
    """A node that answered one of our queries."""
    id: bytes
    addr: Addr
    last_seen: float
    failures: int = 0


class RoutingTable:
    """BEP 5 k-buckets: bucket ``i`` holds ids sharing exactly ``i`` leading bits with ours."""

    def __init__(self, own_id: bytes, k: int = DHT_K) -> None:
        self.own_id = own_id
        self.k = k
        self.buckets: list[list[DhtContact]] = [[] for _ in range(160)]
        #: when each bucket last changed; one untouched for 15 minutes is refreshed
        self.changed: list[float] = [0.0] * 160
        # private
        self._own = int.from_bytes(own_id, "big")
        self._by_addr: dict[Addr, DhtContact] = {}
        self._spares: dict[int, collections.deque] = {}
        self._per_ip: collections.Counter = collections.Counter()  # contacts of each IP address

    def __len__(self) -> int:
        return len(self._by_addr)

    def index(self, node_id: bytes) -> int:
        """The bucket of an id (160 is our own id: no bucket)."""
        return 160 - (int.from_bytes(node_id, "big") ^ self._own).bit_length()

    def heard(self, node_id: bytes, addr: Addr, now: float) -> DhtContact | None:
        """A node answered us: add or refresh it. Returns a stale contact to ping, if any."""
        index = self.index(node_id)
        known = self._by_addr.get(addr)
        if index >= 160:
            return None
        if known is not None and known.id != node_id:
            self._remove(known)  # a node restarted under a new id
        elif known is not None:
            known.last_seen, known.failures, self.changed[index] = now, 0, now
            return None
        bucket = self.buckets[index]
        if any(c.id == node_id for c in bucket):
            return None  # keep the address first seen for an id
        return self._insert(DhtContact(node_id, addr, now), index, now)

    def _insert(self, contact: DhtContact, index: int, now: float) -> DhtContact | None:
        if contact.addr in self._by_addr:
            return None  # a spare whose address came back under another id
        if self._per_ip[contact.addr[0]] >= DHT_PER_IP:
            return None  # one host posing as many nodes
        bucket = self.buckets[index]
        bad = next((c for c in bucket if c.failures >= 2), None)
        if bad is not None:
            self._remove(bad)
        if len(bucket) < self.k:
            bucket.append(contact)
            self._by_addr[contact.addr] = contact
            self._per_ip[contact.addr[0]] += 1
            self.changed[index] = now
            return None
        spares = self._spares.setdefault(index, collections.deque(maxlen=self.k))
        if all(s.id != contact.id for s in spares):
            spares.append(contact)
        oldest = min(bucket, key=lambda c: c.last_seen)
        return oldest if now - oldest.last_seen > DHT_STALE else None

    def _remove(self, contact: DhtContact) -> None:
        self.buckets[self.index(contact.id)].remove(contact)
        del self._by_addr[contact.addr]
        self._per_ip[contact.addr[0]] -= 1
        if not self._per_ip[contact.addr[0]]:
            del self._per_ip[contact.addr[0]]

    def touch(self, node_id: bytes, addr: Addr, now: float) -> bool:
        """A known node queried us: it is still there. False when unknown."""
        known = self._by_addr.get(addr)
        if known is None or known.id != node_id:
            return False
        known.last_seen = now
        return True

    def has_room(self, node_id: bytes, addr: Addr) -> bool:
        """True when a new node with this id and address would be kept."""
        index = self.index(node_id)
        return index < 160 and self._per_ip[addr[0]] < DHT_PER_IP and (
            len(self.buckets[index]) < self.k or any(c.failures >= 2 for c in self.buckets[index]))

    def failed(self, addr: Addr, now: float) -> None:
        """A node did not answer; after two misses in a row a spare takes its place."""
        contact = self._by_addr.get(addr)
        if contact is None:
            return
        contact.failures += 1
        spares = self._spares.get(self.index(contact.id))
        if contact.failures >= 2 and spares:
            self._remove(contact)
            self._insert(spares.pop(), self.index(contact.id), now)

    def closest(self, target: bytes, count: int = DHT_K) -> list[DhtContact]:
        """The ``count`` good contacts nearest to ``target`` (XOR metric)."""
        key = int.from_bytes(target, "big")
        good = (c for c in self._by_addr.values() if c.failures < 2)
        return heapq.nsmallest(count, good, key=lambda c: int.from_bytes(c.id, "big") ^ key)

    def stale_bucket(self, now: float) -> int | None:
        """A non-empty bucket unchanged for 15 minutes, if any."""
        return next((i for i, bucket in enumerate(self.buckets)
                     if bucket and now - self.changed[i] > DHT_STALE), None)

    def random_id(self, index: int, noise: bytes) -> bytes:
        """A random id that falls in bucket ``index``."""
        bit = 1 << (159 - index)
        value = ((self._own ^ bit) & ~(bit - 1)) | (int.from_bytes(noise, "big") & (bit - 1))
        return value.to_bytes(20, "big")


# DHT (BEP 5): lookups, peer store, rate limits ##############################

class _Probe(enum.Enum):
    NEW = 1
    ASKED = 2
    ANSWERED = 3
    FAILED = 4


@dataclasses.dataclass
class _Candidate:
    distance: int
    node_id: bytes | None
    probe: _Probe = _Probe.NEW
    token: bytes | None = None
    #: a bootstrap node: asked by every lookup, and told of our announce, however far its id
    pinned: bool = False


class _Lookup:
    """One iterative lookup (``find_node`` or ``get_peers``) towards a target."""

    def __init__(self, target: bytes, method: str, port: int | None, now: float) -> None:
        self.target, self.method, self.port, self.started = target, method, port, now
        self.queries = 0
        self.nodes: dict[Addr, _Candidate] = {}
        self.peers: set[Addr] = set()
        #: peers taken from each IP address's answers (DHT_PEERS_PER_IP at most)
        self.peers_from: collections.Counter = collections.Counter()
        self._key = int.from_bytes(target, "big")
        self._per_ip: collections.Counter = collections.Counter()

    def add(self, node_id: bytes | None, addr: Addr, pinned: bool = False) -> None:
        """A candidate (DHT_PER_IP of an address at most); unknown ids rank last."""
        if addr in self.nodes:
            self.nodes[addr].pinned |= pinned
            return
        if not pinned and self._per_ip[addr[0]] >= DHT_PER_IP:
            return
        distance = (int.from_bytes(node_id, "big") ^ self._key) if node_id else 1 << 160
        self.nodes[addr] = _Candidate(distance, node_id, pinned=pinned)
        self._per_ip[addr[0]] += not pinned
        if len(self.nodes) > 8 * DHT_K:  # forget the farthest candidate not yet asked
            fresh = [a for a, c in self.nodes.items() if c.probe is _Probe.NEW and not c.pinned]
            if fresh:
                gone = max(fresh, key=lambda a: self.nodes[a].distance)
                del self.nodes[gone]
                self._per_ip[gone[0]] -= 1

    def take_peers(self, source: Addr, found: list[Addr]) -> list[Addr]:
        """The peers of an answer not seen in this lookup, DHT_PEERS_PER_IP per source address."""
        room = min(DHT_PEERS_PER_IP - self.peers_from[source[0]], 1000 - len(self.peers))
        fresh = list(dict.fromkeys(p for p in found if p not in self.peers))[:max(room, 0)]
        self.peers.update(fresh)
        self.peers_from[source[0]] += len(fresh)
        return fresh

    def set(self, addr: Addr, probe: _Probe) -> None:
        candidate = self.nodes.get(addr)
        if candidate is not None:
            candidate.probe = probe

    def answered(self, addr: Addr, node_id: bytes, token: Any) -> None:
        """A candidate answered: keep its id (routers had none) and its token."""
        candidate = self.nodes.get(addr)
        if candidate is not None:
            candidate.probe, candidate.node_id = _Probe.ANSWERED, node_id
            candidate.distance = int.from_bytes(node_id, "big") ^ self._key
            candidate.token = token if isinstance(token, bytes) and len(token) <= 64 else None

    def count(self, probe: _Probe) -> int:
        return sum(1 for c in self.nodes.values() if c.probe is probe)

    def next_queries(self) -> list[tuple[Addr, bytes | None]]:
        """The bootstrap nodes not asked yet, then the candidates not asked yet among the
        k closest, as many as alpha allows."""
        live = [(c.distance, a) for a, c in self.nodes.items() if c.probe is not _Probe.FAILED]
        free = min(DHT_ALPHA - self.count(_Probe.ASKED), DHT_LOOKUP_QUERIES - self.queries)
        pinned = [a for a, c in self.nodes.items() if c.pinned and c.probe is _Probe.NEW]
        closest = [a for _, a in sorted(live)[:DHT_K] if self.nodes[a].probe is _Probe.NEW]
        fresh = [(a, self.nodes[a].node_id) for a in dict.fromkeys(pinned + closest)]
        return fresh[:max(free, 0)]

    def finished(self, now: float) -> bool:
        if now - self.started > DHT_LOOKUP_SECONDS:
            return True
        return not self.count(_Probe.ASKED) and not self.next_queries()

    def closest_with_tokens(self) -> list[tuple[Addr, bytes, bytes]]:
        """(addr, id, token) of the k closest nodes that answered with a token, and of the
        bootstrap nodes that did (where a lookup surely passes)."""
        ready = sorted((c.distance, a) for a, c in self.nodes.items()
                       if c.probe is _Probe.ANSWERED and c.token and c.node_id)
        chosen = [a for _, a in ready[:DHT_K]]
        chosen += [a for _, a in ready[DHT_K:] if self.nodes[a].pinned]
        return [(a, self.nodes[a].node_id, self.nodes[a].token)  # type: ignore[misc]
                for a in chosen]


class _PeerStore:
    """Peers announced to us: bounded per infohash and in infohashes, expiring."""

    def __init__(self) -> None:
        self._hashes: collections.OrderedDict[bytes, collections.OrderedDict] = (
            collections.OrderedDict())

    def add(self, info_hash: bytes, addr: Addr, now: float) -> None:
        peers = self._hashes.pop(info_hash, None) or collections.OrderedDict()
        peers.pop(addr, None)
        peers[addr] = now + DHT_PEER_TTL
        while len(peers) > DHT_STORE_PEERS:
            peers.popitem(last=False)
        self._hashes[info_hash] = peers
        while len(self._hashes) > DHT_STORE_HASHES:
            self._hashes.popitem(last=False)

    def get(self, info_hash: bytes, now: float, count: int = DHT_MAX_VALUES) -> list[Addr]:
        """The most recent live peers of an infohash."""
        peers = self._hashes.get(info_hash) or {}
        return [addr for addr, until in reversed(peers.items()) if until > now][:count]

    def expire(self, now: float) -> None:
        for info_hash in list(self._hashes):
            peers = self._hashes[info_hash]
            for addr in [a for a, until in peers.items() if until <= now]:
                del peers[addr]
            if not peers:
                del self._hashes[info_hash]

    def __len__(self) -> int:
        return sum(len(peers) for peers in self._hashes.values())


# DHT (BEP 5): the node, sans-I/O ############################################

@dataclasses.dataclass(frozen=True)
class DhtPeers:
    """A get_peers lookup found peers of an infohash (new ones only), in ``source``'s answer."""
    info_hash: bytes
    peers: tuple[Addr, ...]
    source: Addr | None = None


@dataclasses.dataclass(frozen=True)
class DhtLookupDone:
    """A lookup ended: how many peers it found, nodes answered, queries sent."""
    target: bytes
    method: str
    peers: int
    answered: int
    queries: int


@dataclasses.dataclass
class _Pending:
    addr: Addr
    method: str
    sent: float
    node_id: bytes | None
    lookup: _Lookup | None


class DhtCore:
    """A BEP 5 node without I/O: datagrams and ``now`` in; datagrams and events out.

    Answers ``ping``, ``find_node``, ``get_peers`` and ``announce_peer``; runs
    iterative lookups, announces after a ``get_peers`` lookup when given a port.
    ``stats`` counts what was dropped (malformed, rate limited, unexpected).
    """

    def __init__(self, node_id: bytes, *, random: Callable[[int], bytes] = os.urandom) -> None:
        self.node_id = node_id
        self.table = RoutingTable(node_id)
        #: counters: dht malformed, dht queries answered, dht rate limited, ...
        self.stats: collections.Counter = collections.Counter()
        # private
        self._random = random
        #: None until bootstrap() (lookups started before then wait for it)
        self._bootstrap: list[Addr] | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._lookups: dict[tuple[str, bytes], _Lookup] = {}
        self._store = _PeerStore()
        self._secrets = [random(16), random(16)]
        self._rotated: float | None = None
        self._housekept = float("-inf")
        self._tid = int.from_bytes(random(2), "big")
        self._limit_out = _RateLimit(DHT_QUERIES_PER_SECOND, DHT_QUERIES_PER_SECOND, 1)
        self._limit_in = _RateLimit(DHT_ANSWERS_PER_SECOND, DHT_ANSWERS_PER_SECOND, 1)
        self._limit_ip = _RateLimit(DHT_ANSWERS_PER_IP, 2 * DHT_ANSWERS_PER_IP)
        self._datagrams = _RateLimit(DHT_DATAGRAMS_PER_SECOND, DHT_DATAGRAMS_PER_SECOND, 1)
        self._datagrams_ip = _RateLimit(DHT_DATAGRAMS_PER_IP, 2 * DHT_DATAGRAMS_PER_IP)
        self._handlers = {"ping": self._on_ping, "find_node": self._on_find_node,
                          "get_peers": self._on_get_peers, "announce_peer": self._on_announce}
        self._out: list[tuple[bytes, Addr]] = []
        self._events: list = []

    # sans-I/O interface
    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Handle one datagram from ``addr``; malformed ones, and those over the budgets
        (DHT_DATAGRAMS_PER_IP, DHT_DATAGRAMS_PER_SECOND), are counted and dropped."""
        if not (self._datagrams_ip.allow(addr[0], now) and self._datagrams.allow(None, now)):
            self.stats["dht rate limited"] += 1
            return
        try:
            if len(data) > DHT_MAX_DATAGRAM:
                raise DecodeError("KRPC datagram too large")
            message = parse_krpc(data)
        except DecodeError:
            self.stats["dht malformed"] += 1
            return
        log.debug("< dht %s %s:%d", type(message).__name__, *addr)
        if isinstance(message, KrpcQuery):
            self._on_query(message, addr, now)
        else:
            self._on_answer(message, addr, now)

    def data_to_send(self) -> list[tuple[bytes, Addr]]:
        """Datagrams to send, each with its destination."""
        out, self._out = self._out, []
        return out

    def read_delay(self, now: float) -> float:
        """Seconds the adapter should not read the socket (0: read): DHT_DATAGRAMS_PER_SECOND
        are spent."""
        missing = 1.0 - self._datagrams.tokens(None, now)
        return missing / DHT_DATAGRAMS_PER_SECOND + 1e-6 if missing > 0 else 0.0  # 1e-6: float rounding

    def events_received(self) -> list:
        """DhtPeers and DhtLookupDone events since the last call."""
        events, self._events = self._events, []
        return events

    def bootstrap(self, addrs: Iterable[Addr], now: float) -> None:
        """Remember where to start (a few addresses) and look our own id up."""
        self._bootstrap = list(dict.fromkeys(addrs))[:16]
        for lookup in list(self._lookups.values()):
            self._seed_lookup(lookup)
            self._advance(lookup, now)
        self.find_node(self.node_id, now)

    def find_node(self, target: bytes, now: float) -> None:
        """Start an iterative find_node lookup (it fills the routing table)."""
        self._start_lookup(target, "find_node", None, now)

    def get_peers(self, info_hash: bytes, now: float, announce_port: int | None = None) -> None:
        """Look peers of ``info_hash`` up; then announce ``announce_port`` if given."""
        self._start_lookup(info_hash, "get_peers", announce_port, now)

    def ping(self, addr: Addr, now: float) -> None:
        """Ping a node (as after a BEP 5 ``port`` message); it joins the table if it answers."""
        if all(p.addr != addr for p in self._pending.values()):
            self._query(addr, "ping", {}, now)

    def tick(self, now: float) -> None:
        """Timeouts, lookups waiting for budget, secrets, refreshes, expiry."""
        late = [t for t, p in self._pending.items() if now - p.sent >= DHT_QUERY_TIMEOUT]
        for t in late:
            self.stats["dht timeouts"] += 1
            self._failed(self._pending.pop(t), now)
        for lookup in list(self._lookups.values()):
            self._advance(lookup, now)
        self._rotate(now)
        if now - self._housekept >= 60.0:
            self._housekeeping(now)

    @property
    def lookups(self) -> int:
        """Lookups running."""
        return len(self._lookups)

    # answering queries
    def _on_query(self, query: KrpcQuery, addr: Addr, now: float) -> None:
        if not (self._limit_ip.allow(addr[0], now) and self._limit_in.allow(None, now)):
            self.stats["dht rate limited"] += 1
            return
        answer = self._answer(query, addr, now)
        if isinstance(answer, tuple):
            self.stats["dht errors sent"] += 1
            self._send(KrpcError(query.t, *answer), addr)
            return
        self.stats["dht queries answered"] += 1
        self._send(KrpcResponse(query.t, {"id": self.node_id, **answer}), addr)
        self._noticed(query.args["id"], addr, query.args.get("ro"), now)

    def _answer(self, query: KrpcQuery, addr: Addr, now: float) -> dict | tuple:
        """The answer's values, or (code, text) for a KRPC error."""
        node_id = query.args.get("id")
        handler = self._handlers.get(query.method)
        if not _is_id(node_id) or node_id == self.node_id:
            return (KRPC_PROTOCOL, "bad id")
        if handler is None:
            return (KRPC_METHOD, "Method Unknown")
        return handler(query.args, addr, now)

    def _noticed(self, node_id: bytes, addr: Addr, read_only: Any, now: float) -> None:
        """A node queried us: ping it if the table would keep it (BEP 43: not if ``ro``)."""
        if not self.table.touch(node_id, addr, now) and read_only != 1 \
                and self.table.has_room(node_id, addr):
            self.ping(addr, now)

    def _on_ping(self, args: dict, addr: Addr, now: float) -> dict | tuple:
        return {}

    def _on_find_node(self, args: dict, addr: Addr, now: float) -> dict | tuple:
        if not _is_id(args.get("target")):
            return (KRPC_PROTOCOL, "bad target")
        return {"nodes": self._nodes_near(args["target"])}

    def _on_get_peers(self, args: dict, addr: Addr, now: float) -> dict | tuple:
        info_hash = args.get("info_hash")
        if not _is_id(info_hash):
            return (KRPC_PROTOCOL, "bad info_hash")
        answer: dict = {"token": self._token(addr[0]), "nodes": self._nodes_near(info_hash)}
        peers = self._store.get(info_hash, now)
        if peers:
            answer["values"] = [compact_addr(p) for p in peers]
        return answer

    def _on_announce(self, args: dict, addr: Addr, now: float) -> dict | tuple:
        info_hash, token, port = args.get("info_hash"), args.get("token"), args.get("port")
        if args.get("implied_port") not in (None, 0):
            port = addr[1]
        if not _is_id(info_hash) or not isinstance(port, int) or not 0 < port < 65536:
            return (KRPC_PROTOCOL, "bad info_hash or port")
        if token not in (self._token(addr[0], s) for s in self._secrets):
            self.stats["dht bad tokens"] += 1
            return (KRPC_PROTOCOL, "bad token")
        self._store.add(info_hash, (addr[0], port), now)
        self.stats["dht announces stored"] += 1
        return {}

    def _nodes_near(self, target: bytes) -> bytes:
        return b"".join(c.id + compact_addr(c.addr) for c in self.table.closest(target))

    def _token(self, ip: str, secret: bytes | None = None) -> bytes:
        """BEP 5 token: a hash of the asker's IP and a secret that rotates."""
        return hashlib.sha1((secret or self._secrets[0]) + ip.encode()).digest()[:8]

    # our queries and their answers
    def _query(self, addr: Addr, method: str, args: dict, now: float,
               node_id: bytes | None = None, lookup: _Lookup | None = None) -> bool:
        """Send a query if the in-flight and rate bounds allow it."""
        if len(self._pending) >= DHT_MAX_PENDING or not self._limit_out.allow(None, now):
            self.stats["dht queries deferred"] += 1
            return False
        t = self._next_tid()
        self._pending[t] = _Pending(addr, method, now, node_id, lookup)
        self._send(KrpcQuery(t, method, {"id": self.node_id, **args}), addr)
        self.stats["dht queries sent"] += 1
        return True

    def _next_tid(self) -> bytes:
        while True:
            self._tid = (self._tid + 1) & 0xFFFF
            t = struct.pack(">H", self._tid)
            if self._tid and t not in self._pending:
                return t

    def _on_answer(self, message: KrpcResponse | KrpcError, addr: Addr, now: float) -> None:
        pending = self._pending.get(message.t)
        if pending is None or pending.addr != addr:
            self.stats["dht unexpected answers"] += 1
            return
        del self._pending[message.t]
        if isinstance(message, KrpcError):
            self.stats["dht errors received"] += 1
            if pending.lookup is not None:  # alive, but no help for this lookup
                pending.lookup.set(addr, _Probe.FAILED)
                self._advance(pending.lookup, now)
            return
        node_id = message.values.get("id")
        if not _is_id(node_id) or node_id == self.node_id or pending.node_id not in (None, node_id):
            self._failed(pending, now)
            return
        stale = self.table.heard(node_id, addr, now)
        if stale is not None:
            self._query(stale.addr, "ping", {}, now, stale.id)
        if pending.lookup is not None:
            self._lookup_answer(pending.lookup, node_id, addr, message.values, now)

    def _failed(self, pending: _Pending, now: float) -> None:
        self.table.failed(pending.addr, now)
        if pending.lookup is not None:
            pending.lookup.set(pending.addr, _Probe.FAILED)
            self._advance(pending.lookup, now)

    # lookups
    def _start_lookup(self, target: bytes, method: str, port: int | None, now: float) -> None:
        running = self._lookups.get((method, target))
        if running is not None:
            running.port = port or running.port
            return
        if len(self._lookups) >= DHT_MAX_LOOKUPS:
            self.stats["dht lookups refused"] += 1
            return
        lookup = self._lookups[(method, target)] = _Lookup(target, method, port, now)
        self._seed_lookup(lookup)
        self._advance(lookup, now)

    def _seed_lookup(self, lookup: _Lookup) -> None:
        """First candidates: the bootstrap nodes (always: a table that hostile nodes filled
        must not cut us off from them), and the closest contacts."""
        for addr in self._bootstrap or ():
            lookup.add(None, addr, pinned=True)
        for contact in self.table.closest(lookup.target):
            lookup.add(contact.id, contact.addr)

    def _advance(self, lookup: _Lookup, now: float) -> None:
        """Send the lookup's next queries; finish it when nothing is left to ask."""
        if self._lookups.get((lookup.method, lookup.target)) is not lookup:
            return  # it ended; a newer lookup for the same target may run
        key = "target" if lookup.method == "find_node" else "info_hash"
        for addr, node_id in lookup.next_queries():
            if not self._query(addr, lookup.method, {key: lookup.target}, now, node_id, lookup):
                break
            lookup.set(addr, _Probe.ASKED)
            lookup.queries += 1
        waiting = self._bootstrap is None and not lookup.nodes  # for bootstrap()
        if lookup.finished(now) and not (waiting and now - lookup.started < DHT_LOOKUP_SECONDS):
            self._finish(lookup, now)

    def _lookup_answer(self, lookup: _Lookup, node_id: bytes, addr: Addr,
                       values: dict, now: float) -> None:
        lookup.answered(addr, node_id, values.get("token"))
        for found_id, found_addr in parse_nodes(values.get("nodes")):
            if found_id != self.node_id:
                lookup.add(found_id, found_addr)
        if lookup.method == "get_peers":
            fresh = lookup.take_peers(addr, parse_peers(values.get("values")))
            if fresh:
                self._events.append(DhtPeers(lookup.target, tuple(fresh), addr))
        self._advance(lookup, now)

    def _finish(self, lookup: _Lookup, now: float) -> None:
        del self._lookups[(lookup.method, lookup.target)]
        closest = lookup.closest_with_tokens()
        if lookup.method == "get_peers" and lookup.port:
            for addr, node_id, token in closest:
                self._query(addr, "announce_peer", {"info_hash": lookup.target, "port": lookup.port,
                                                    "token": token, "implied_port": 0}, now, node_id)
        self._events.append(DhtLookupDone(lookup.target, lookup.method, len(lookup.peers),
                                          lookup.count(_Probe.ANSWERED), lookup.queries))

    # upkeep
    def _rotate(self, now: float) -> None:
        if self._rotated is None:
            self._rotated = now
        elif now - self._rotated >= DHT_TOKEN_ROTATE:
            self._secrets = [self._random(16), self._secrets[0]]
            self._rotated = now

    def _housekeeping(self, now: float) -> None:
        """Once a minute: expire announced peers, refresh a stale bucket.

        An empty table is the adapter's to mend: it resolves the bootstrap names again.
        """
        self._housekept = now
        self._store.expire(now)
        stale = self.table.stale_bucket(now)
        if stale is not None:
            self.table.changed[stale] = now
            self.find_node(self.table.random_id(stale, self._random(20)), now)

    def _send(self, message: Krpc, addr: Addr) -> None:
        log.debug("> dht %s %s:%d", type(message).__name__, *addr)
        self._out.append((bytes(message), addr))


# DHT (BEP 5): asyncio adapter ###############################################

class _DhtProtocol(asyncio.DatagramProtocol):
    def __init__(self, node: Dht) -> None:
        self.node = node

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.node._received(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dht socket: %s", exc)  # ICMP unreachable from a gone node


class Dht:
    """A BEP 5 node on a UDP socket: :class:`DhtCore` plus a timer task.

    ``on_peers(info_hash, peers, source)`` is called with the peers lookups find (``source``:
    the node whose answer named them).
    """

    def __init__(self, node_id: bytes, *, host: str = "0.0.0.0", port: int = 0,
                 bootstrap: Iterable[str] = DHT_BOOTSTRAP,
                 on_peers: Callable[[bytes, list[Addr], Addr | None], Any] | None = None) -> None:
        self.core = DhtCore(node_id)
        self.host, self.port = host, port
        self.bootstrap = [_split_hostport(b) for b in bootstrap]
        self.on_peers = on_peers
        # private
        self._transport: asyncio.DatagramTransport | None = None
        self._task: asyncio.Task | None = None
        self._resolved = float("-inf")
        #: the last failure to look each bootstrap name up: said again only when it changes
        self._bootstrap_errors: dict[tuple[str, int], str] = {}

    @property
    def stats(self) -> collections.Counter:
        return self.core.stats

    async def start(self) -> Dht:
        """Bind the UDP socket, then bootstrap in the background."""
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _DhtProtocol(self), local_addr=(self.host, self.port), family=socket.AF_INET)
        self.port = self._transport.get_extra_info("sockname")[1]
        log.info("dht node %s on udp %s:%d", self.core.node_id.hex()[:8], self.host, self.port)
        self._task = asyncio.ensure_future(self._run())
        return self

    async def close(self) -> None:
        """Stop the timer and close the socket. Idempotent."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def get_peers(self, info_hash: bytes, announce_port: int | None = None) -> None:
        """Look ``info_hash`` up (and announce ``announce_port`` to the closest nodes)."""
        self.core.get_peers(info_hash, time.monotonic(), announce_port)
        self._flush()

    def add_node(self, addr: Addr) -> None:
        """Ping a node a peer told us of (BEP 5 ``port`` message); IPv4 only."""
        with contextlib.suppress(OSError):
            socket.inet_pton(socket.AF_INET, addr[0])
            self.core.ping(addr, time.monotonic())
            self._flush()

    async def _run(self) -> None:
        while True:
            if not len(self.core.table) and time.monotonic() - self._resolved > 60.0:
                await self._bootstrap()
            await asyncio.sleep(0.25)
            self.core.tick(time.monotonic())
            self._flush()

    async def _bootstrap(self) -> None:
        """Resolve the bootstrap names (off the core: DNS is I/O) and start there."""
        self._resolved = time.monotonic()
        found = await asyncio.gather(*(self._resolve(host, port) for host, port in self.bootstrap))
        self.core.bootstrap([addr for addrs in found for addr in addrs], time.monotonic())
        self._flush()

    async def _resolve(self, host: str, port: int) -> list[Addr]:
        """A bootstrap name's addresses; a failure is logged when it differs from the last one
        (offline, the lookup is tried again every minute: the log says so once)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM), 10.0)
        except (OSError, UnicodeError, TimeoutError) as exc:  # UnicodeError: a name like "a..b"
            error = str(exc) or type(exc).__name__
            if self._bootstrap_errors.get((host, port)) != error:
                self._bootstrap_errors[(host, port)] = error
                log.warning("dht bootstrap %s:%d: %s (tried again each minute; said again if it changes)",
                            host, port, error)
            return []
        if self._bootstrap_errors.pop((host, port), None) is not None:
            log.info("dht bootstrap %s:%d found again", host, port)
        return [info[4][:2] for info in infos[:2]]

    def _received(self, data: bytes, addr: tuple) -> None:
        now = time.monotonic()
        self.core.receive_datagram(data, (addr[0], addr[1]), now)
        self._flush()
        delay = self.core.read_delay(now)
        if delay > 0 and self._transport is not None and self._transport.is_reading():
            self._transport.pause_reading()  # a flood: the kernel drops what comes meanwhile
            asyncio.get_running_loop().call_later(delay, self._resume)

    def _resume(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def _flush(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            for data, addr in self.core.data_to_send():
                self._transport.sendto(data, addr)
        for event in self.core.events_received():
            if isinstance(event, DhtPeers) and self.on_peers is not None:
                log.debug("dht: %d peer(s) of %s", len(event.peers), event.info_hash.hex()[:8])
                self.on_peers(event.info_hash, list(event.peers), event.source)
            elif isinstance(event, DhtLookupDone):
                log.debug("dht %s %s done: %d peers, %d of %d answered", event.method,
                          event.target.hex()[:8], event.peers, event.answered, event.queries)


# Trackers and WebRTC ########################################################
#
# Peers that no one can dial (browsers, workers behind NAT) meet the way
# WebTorrent's do (PROTOCOL.md section 7): each announces the infohash to
# WebSocket trackers with a few SDP offers, the tracker relays every offer to
# another peer of the swarm and relays its answer back, and the BitTorrent
# wire then runs over the RTCDataChannel as a byte stream.
#
# TrackerClient is the sans-I/O core of one tracker (frames and time in, frames
# and events out); TrackerSession moves its frames over a WebSocket;
# WebRtcTransport makes the peer connections with aiortc; RtcConnection plugs
# each data channel into Bugout's connection set, as WireConnection does a
# TCP socket. aiortc and websockets are imported only when trackers are used.

#: bittorrent-tracker's client sends at most 5 offers per announce.
TRACKER_NUMWANT = 5
#: seconds between announces until the tracker says (bittorrent-tracker: 120),
#: and the least we accept from a tracker
TRACKER_INTERVAL = 120.0
TRACKER_MIN_INTERVAL = 5.0
#: an offer nobody answered is closed after this (bittorrent-tracker OFFER_TIMEOUT)
OFFER_TIMEOUT = 50.0
#: reconnect back-off: doubles from the first to the last, plus up to 50 % jitter
RECONNECT_FIRST, RECONNECT_LAST = 5.0, 600.0
#: WebTorrent's CONNECT_TIMEOUT_WEBRTC: answer to open data channel, then
#: open channel to BEP 10 handshake (its HANDSHAKE_TIMEOUT)
RTC_CONNECT_TIMEOUT = 25.0
#: the largest data-channel message we send: far below the 256 KiB
#: max-message-size that aiortc and libwebrtc put in their SDP, and the size
#: that every WebRTC stack, old browsers included, takes
RTC_CHUNK = 16 * 1024
#: Bounds on a tracker (anyone may run one; bugout's defaults are public). Frames
#: read a second, after a burst: over it the socket is read later (TCP then slows
#: the tracker down), and one that keeps the budget spent for TRACKER_FLOOD_SECONDS
#: is left, with back-off. A real tracker sends a frame or two a minute per peer.
TRACKER_FRAMES_PER_SECOND = 20.0
TRACKER_FRAME_BURST = 40.0
TRACKER_FLOOD_SECONDS = 30.0
#: Relayed offers taken a second, per tracker, after a burst: each costs a peer
#: connection, a certificate and ICE; the rest are refused unread.
TRACKER_OFFERS_PER_SECOND = 0.5
TRACKER_OFFER_BURST = 10.0
#: A tracker's messages (failure reason, warning) are logged once a minute per kind,
#: cut to this many characters.
TRACKER_MESSAGE_CHARS = 200
#: A remote SDP larger than this, or with more candidates, is refused before aiortc
#: reads it: aioice compares each candidate with every one before it, so 20,000 of them
#: held the loop for a minute (answering an offer) or more than three (an answer to ours).
#: Ours is about 1 KB with a few host candidates.
RTC_MAX_SDP = 64 * 1024
RTC_MAX_CANDIDATES = 50
#: The largest frame read from a tracker: an offer of RTC_MAX_SDP, escaped as JSON.
TRACKER_MAX_FRAME = 2 * RTC_MAX_SDP
#: What aiortc may hold of one peer connection's data-channel messages not yet
#: whole, each chunk counted as at least RTC_CHUNK_WEIGHT bytes: twice the 1 MiB
#: receive window aiortc advertises, which a peer keeping to it never fills. More,
#: more than RTC_MAX_STREAMS channels (bugout opens one), or one message over
#: maxMessage or over the max-message-size of our SDP (aiortc's: 64 or 256 KiB,
#: which every WebRTC stack keeps to) closes the connection before aiortc holds it
#: whole. aiortc itself has no bound, and its reassembly costs time in the chunks
#: it holds, for each chunk.
RTC_MAX_BUFFERED = 2 * 1024 * 1024
RTC_CHUNK_WEIGHT = 1024
RTC_MAX_STREAMS = 16


@dataclasses.dataclass(frozen=True)
class MakeOffers:
    """Time to announce: make an offer for some of these ids, then :meth:`TrackerClient.send_announce`."""
    offer_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class RelayedOffer:
    """Another peer's offer, relayed by the tracker: answer with :meth:`TrackerClient.send_answer`."""
    peer_id: str
    offer_id: str
    sdp: str


@dataclasses.dataclass(frozen=True)
class RelayedAnswer:
    """The answer to one of our pending offers."""
    peer_id: str
    offer_id: str
    sdp: str


@dataclasses.dataclass(frozen=True)
class DropOffer:
    """An offer that will not be answered: close its peer connection."""
    offer_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class TrackerUpdate:
    """An announce response: the swarm's size and the interval in force."""
    complete: int | None
    incomplete: int | None
    interval: float


@dataclasses.dataclass(frozen=True)
class TrackerWarning:
    """A ``failure reason`` or ``warning message`` from the tracker, or its ``flood``:
    printable, cut short, one a minute per kind (``held``: how many were not said)."""
    message: str
    kind: str = "failure reason"
    held: int = 0


class TrackerState(enum.Enum):
    WAITING = 1      # no socket: connect when the back-off has passed
    CONNECTING = 2
    OPEN = 3
    CLOSED = 4


_TRACKER_MOVES = {
    TrackerState.WAITING: {TrackerState.CONNECTING, TrackerState.CLOSED},
    TrackerState.CONNECTING: {TrackerState.OPEN, TrackerState.WAITING, TrackerState.CLOSED},
    TrackerState.OPEN: {TrackerState.WAITING, TrackerState.CLOSED},
    TrackerState.CLOSED: set(),
}


def _is_binary_id(value: Any) -> bool:
    """A 20-character latin-1 string: how JSON frames carry 20-byte ids."""
    return isinstance(value, str) and len(value) == 20 and all(ord(c) < 256 for c in value)


def _sdp_of(value: Any, kind: str) -> str | None:
    """The SDP text of ``{type: kind, sdp}``, or None."""
    if isinstance(value, dict) and value.get("type") == kind and isinstance(value.get("sdp"), str):
        return value["sdp"]
    return None


def _sdp_too_big(sdp: str) -> bool:
    """Over RTC_MAX_SDP characters or RTC_MAX_CANDIDATES candidates."""
    return len(sdp) > RTC_MAX_SDP or sdp.count("a=candidate") > RTC_MAX_CANDIDATES


def printable(text: str, limit: int) -> str:
    """``text`` on one line, unprintable characters as ``?``, cut to ``limit`` characters."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "... (%d characters)" % len(text)
    return "".join(c if c.isprintable() else "?" for c in text)


class TrackerClient:
    """One WebSocket tracker without I/O: JSON frames and ``now`` in; frames and events out.

    The adapter opens the socket when :meth:`start_connecting` says so, reports
    :meth:`connection_made` / :meth:`connection_lost`, feeds every frame to
    :meth:`receive_frame` (reading none before :meth:`read_delay` has passed;
    it closes the socket when the client leaves OPEN), calls :meth:`tick` by
    :meth:`next_deadline`, and acts on :meth:`events_received`;
    :meth:`data_to_send` gives JSON texts. Ids (``info_hash``, ``peer_id``,
    ``offer_id``) are 20-char latin-1 strings.

    Bounds: TRACKER_FRAMES_PER_SECOND (frames over it are dropped, counted; a
    tracker that keeps the budget spent for TRACKER_FLOOD_SECONDS is left, and
    each such flood doubles its back-off for good), TRACKER_OFFERS_PER_SECOND
    relayed offers, SDP of RTC_MAX_SDP and RTC_MAX_CANDIDATES, and one
    TrackerWarning a minute per kind.
    """

    def __init__(self, url: str, infohash: bytes, peer_id: bytes, *,
                 numwant: int = TRACKER_NUMWANT, interval: float | None = None,
                 offer_timeout: float = OFFER_TIMEOUT,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        if len(infohash) != 20 or len(peer_id) != 20:
            raise LocalProtocolError("infohash and peer id must be 20 bytes")
        self.url = url
        self.numwant = numwant
        self.offer_timeout = offer_timeout
        self.state = TrackerState.WAITING
        #: seconds between announces: the fixed one if given, else the tracker's
        self.interval = interval or TRACKER_INTERVAL
        #: failed connections since the last good announce response
        self.retries = 0
        #: counters: frames ignored by reason, offers relayed, answers, ...
        self.stats: collections.Counter = collections.Counter()
        # private
        self._fixed_interval = interval is not None
        self._info_hash = infohash.decode("latin-1")
        self._peer_id = peer_id.decode("latin-1")
        self._random = random
        self._pending: dict[str, float] = {}  # offer id -> deadline, oldest first
        self._reconnect_at = 0.0
        self._last_announce: float | None = None
        self._next_announce: float | None = None
        self._offering = False
        self._started = False
        self._frames: list[str] = []
        self._events: list = []
        self._frame_budget = _RateLimit(TRACKER_FRAMES_PER_SECOND, TRACKER_FRAME_BURST, 1)
        self._offer_budget = _RateLimit(TRACKER_OFFERS_PER_SECOND, TRACKER_OFFER_BURST, 1)
        self._flooding_since: float | None = None
        #: floods seen: each doubles the back-off, for as long as we run
        self.floods = 0
        self._said: dict[str, float] = {}  # kind of message -> when it may be said again
        self._held: collections.Counter = collections.Counter()

    def _set_state(self, state: TrackerState) -> None:
        if state not in _TRACKER_MOVES[self.state]:
            raise InvalidState(f"tracker {self.url}: {self.state.name} -> {state.name}")
        log.debug("- tracker %s %s -> %s", self.url, self.state.name, state.name)
        self.state = state

    # sans-I/O interface
    def events_received(self) -> list:
        """Events since the last call."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[str]:
        """JSON texts to send, in order."""
        frames, self._frames = self._frames, []
        return frames

    @property
    def pending_offers(self) -> int:
        """Offers announced and not yet answered or dropped."""
        return len(self._pending)

    # the connection
    def start_connecting(self, now: float) -> bool:
        """True (and CONNECTING) when the adapter should open the socket now."""
        if self.state is not TrackerState.WAITING or now < self._reconnect_at:
            return False
        self._set_state(TrackerState.CONNECTING)
        return True

    def connection_made(self, now: float) -> None:
        """The socket is open: announce at once."""
        self._set_state(TrackerState.OPEN)
        self._started = False
        self._next_announce = now

    def connection_lost(self, now: float, misbehaved: str | None = None) -> None:
        """The socket failed or closed: drop the offers, back off, reconnect.

        ``misbehaved`` says why we leave a tracker that broke a bound (a frame
        too large): that counts as a flood."""
        if self.state not in (TrackerState.CONNECTING, TrackerState.OPEN):
            return
        self._drop_all("tracker connection lost")
        if misbehaved:
            self.floods += 1
            self.stats["floods"] += 1
        factor = 1.0 + self._random(1)[0] / 510.0
        doublings = min(self.retries + self.floods, 16)
        self._reconnect_at = now + min(RECONNECT_LAST, RECONNECT_FIRST * 2 ** doublings) * factor
        if misbehaved:
            self._warn("flood", "%s; reconnecting in %.0f s" % (misbehaved, self._reconnect_at - now), now)
        self.retries += 1
        self._offering = False
        self._next_announce = None
        self._set_state(TrackerState.WAITING)

    def close(self, now: float) -> None:
        """Leave: a ``stopped`` announce when open, every offer dropped. Idempotent."""
        if self.state is TrackerState.CLOSED:
            return
        if self.state is TrackerState.OPEN and self._started:
            self._frames.append(json_dumps(self._announce_frame("stopped", [])))
        self._drop_all("closing")
        self._set_state(TrackerState.CLOSED)

    def _drop_all(self, reason: str) -> None:
        self._events += [DropOffer(offer_id, reason) for offer_id in self._pending]
        self._pending.clear()

    # time
    def tick(self, now: float) -> None:
        """Expire unanswered offers; ask for offers when an announce is due."""
        for offer_id, deadline in list(self._pending.items()):
            if deadline > now:
                break
            del self._pending[offer_id]
            self.stats["offers unanswered"] += 1
            self._events.append(DropOffer(offer_id, "unanswered"))
        due = self._next_announce is not None and now >= self._next_announce
        if self.state is TrackerState.OPEN and due and not self._offering:
            self._offering = True
            self._events.append(MakeOffers(tuple(self._random(20).decode("latin-1")
                                                 for _ in range(self.numwant))))

    def next_deadline(self) -> float | None:
        """When :meth:`tick` (or :meth:`start_connecting`) has work next."""
        times = list(self._pending.values())[:1]
        if self.state is TrackerState.WAITING:
            times.append(self._reconnect_at)
        if self.state is TrackerState.OPEN and not self._offering and self._next_announce is not None:
            times.append(self._next_announce)
        return min(times, default=None)

    # outgoing
    def send_announce(self, offers: Iterable[tuple[str, str]], now: float) -> None:
        """Announce with ``(offer_id, sdp)`` offers (maybe none), after a MakeOffers."""
        offers = list(offers)
        self._offering = False
        if self.state is not TrackerState.OPEN:
            self._events += [DropOffer(offer_id, "tracker not connected") for offer_id, _ in offers]
            return
        frame = self._announce_frame(None if self._started else "started", offers)
        self._started = True
        self._frames.append(json_dumps(frame))
        for offer_id, _ in offers:
            self._pending[offer_id] = now + self.offer_timeout
        while len(self._pending) > 2 * self.numwant:  # a short interval must not pile them up
            self._events.append(DropOffer(next(iter(self._pending)), "superseded"))
            del self._pending[next(iter(self._pending))]
        self._last_announce = now
        self._next_announce = now + self.interval
        self.stats["announces"] += 1

    def _announce_frame(self, event: str | None, offers: list[tuple[str, str]]) -> dict:
        """The announce as bittorrent-tracker's client writes it (same key order)."""
        frame: dict[str, Any] = {"numwant": len(offers), "uploaded": 0, "downloaded": 0, "left": 0}
        if event:
            frame["event"] = event
        frame.update(action="announce", info_hash=self._info_hash, peer_id=self._peer_id)
        if event != "stopped":
            frame["offers"] = [{"offer": {"type": "offer", "sdp": sdp}, "offer_id": offer_id}
                               for offer_id, sdp in offers]
        return frame

    def send_answer(self, to_peer_id: str, offer_id: str, sdp: str) -> bool:
        """Answer a relayed offer; False when the socket is gone."""
        if self.state is not TrackerState.OPEN:
            return False
        self._frames.append(json_dumps({
            "action": "announce", "info_hash": self._info_hash, "peer_id": self._peer_id,
            "to_peer_id": to_peer_id, "answer": {"type": "answer", "sdp": sdp},
            "offer_id": offer_id}))
        self.stats["answers sent"] += 1
        return True

    # incoming
    def read_delay(self, now: float) -> float:
        """Seconds to wait before reading the next frame (0: read now)."""
        missing = 1.0 - self._frame_budget.tokens(None, now)
        return missing / TRACKER_FRAMES_PER_SECOND + 1e-6 if missing > 0 else 0.0  # 1e-6: float rounding

    def receive_frame(self, frame: Any, now: float) -> None:
        """One frame from the tracker: JSON text or its parsed value."""
        if self.state is not TrackerState.OPEN:
            return
        if not self._within_budget(now):
            return
        if isinstance(frame, (str, bytes)):
            try:
                frame = json.loads(frame)
            except (ValueError, RecursionError):  # RecursionError: "[[[[..." a megabyte deep
                frame = None
        if not isinstance(frame, dict) or frame.get("action") != "announce":
            self.stats["frames ignored"] += 1
        elif frame.get("info_hash") != self._info_hash:
            self.stats["frames for other torrents"] += 1  # a shared socket (JS socket pool)
        elif frame.get("peer_id") != self._peer_id:
            self._on_announce(frame, now)

    def _within_budget(self, now: float) -> bool:
        """Spend a frame of the budget; leave a tracker that keeps it spent (a flood)."""
        allowed = self._frame_budget.allow(None, now)
        if self._frame_budget.tokens(None, now) >= TRACKER_FRAME_BURST / 2:
            self._flooding_since = None
        elif self._flooding_since is None:
            self._flooding_since = now
        elif now - self._flooding_since >= TRACKER_FLOOD_SECONDS:
            self._flooding_since = None
            self.connection_lost(now, "sent more than %.0f frames a second for %.0f s"
                                 % (TRACKER_FRAMES_PER_SECOND, TRACKER_FLOOD_SECONDS))
            return False
        if not allowed:
            self.stats["frames over budget"] += 1
        return allowed

    def _warn(self, kind: str, message: Any, now: float) -> None:
        """A TrackerWarning, unless one of this kind was given less than a minute ago."""
        if now < self._said.get(kind, float("-inf")):
            self._held[kind] += 1
            return
        self._said[kind] = now + LOG_INTERVAL
        self._events.append(TrackerWarning(printable(str(message), TRACKER_MESSAGE_CHARS), kind,
                                           self._held.pop(kind, 0)))

    def _on_announce(self, frame: dict, now: float) -> None:
        failure = frame.get("failure reason")
        if failure is not None:
            self.stats["failures"] += 1
            self._warn("failure reason", failure, now)
            return
        if frame.get("warning message") is not None:
            self._warn("warning message", frame["warning message"], now)
        self._on_interval(frame)
        peer_id, offer_id = frame.get("peer_id"), frame.get("offer_id")
        if "offer" in frame or "answer" in frame:
            if not (_is_binary_id(peer_id) and _is_binary_id(offer_id)):
                self.stats["bad offers or answers"] += 1
            elif "offer" in frame:
                self._on_offer(peer_id, offer_id, _sdp_of(frame["offer"], "offer"), now)
            else:
                self._on_answer(peer_id, offer_id, _sdp_of(frame["answer"], "answer"))

    def _on_interval(self, frame: dict) -> None:
        interval = frame.get("interval", frame.get("min interval"))
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval > 0:
            self.retries = 0  # a real announce response: the tracker works
            if not self._fixed_interval:
                self.interval = max(TRACKER_MIN_INTERVAL, float(interval))
                if self._last_announce is not None and not self._offering:
                    self._next_announce = self._last_announce + self.interval
            self._events.append(TrackerUpdate(_int_or_none(frame.get("complete")),
                                              _int_or_none(frame.get("incomplete")), self.interval))

    def _on_offer(self, peer_id: str, offer_id: str, sdp: str | None, now: float) -> None:
        if sdp is None:
            self.stats["bad offers or answers"] += 1
        elif _sdp_too_big(sdp):
            self.stats["offers refused: SDP too large"] += 1
        elif not self._offer_budget.allow(None, now):
            self.stats["offers refused: too many"] += 1
        else:
            self.stats["offers relayed"] += 1
            self._events.append(RelayedOffer(peer_id, offer_id, sdp))

    def _on_answer(self, peer_id: str, offer_id: str, sdp: str | None) -> None:
        if sdp is None or offer_id not in self._pending:
            self.stats["answers unexpected"] += 1
            return
        del self._pending[offer_id]
        if _sdp_too_big(sdp):
            self.stats["answers refused: SDP too large"] += 1
            self._events.append(DropOffer(offer_id, "answer too large"))
            return
        self.stats["answers"] += 1
        self._events.append(RelayedAnswer(peer_id, offer_id, sdp))


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# Trackers and WebRTC: asyncio ###############################################

class TrackerSession:
    """Moves one tracker's frames between its WebSocket and its :class:`TrackerClient`."""

    def __init__(self, rtc: WebRtcTransport, client: TrackerClient) -> None:
        self.rtc = rtc
        self.client = client
        # private
        self._ws: Any = None

    async def run(self) -> None:
        """Connect, read, reconnect with back-off; until the client is CLOSED."""
        client = self.client
        while client.state is not TrackerState.CLOSED:
            if client.start_connecting(time.monotonic()):
                await self._connect()
            else:
                self._handle_events()
                deadline = client.next_deadline()
                await asyncio.sleep(1.0 if deadline is None else max(0.0, deadline - time.monotonic()))

    async def _connect(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException
        try:
            ws = await connect(self.client.url, open_timeout=15, close_timeout=2,
                               compression=None, max_size=TRACKER_MAX_FRAME)
        except (OSError, UnicodeError, TimeoutError, WebSocketException) as exc:
            log.debug("tracker %s: cannot connect: %s", self.client.url, exc)
            self.client.connection_lost(time.monotonic())
            return
        self._ws = ws
        self.client.connection_made(time.monotonic())
        misbehaved = None
        try:
            await self._read(ws)
        except (OSError, WebSocketException) as exc:
            log.debug("tracker %s: connection lost: %s", self.client.url, exc)
            if getattr(getattr(exc, "sent", None), "code", None) == 1009:  # we refused a frame: too big
                misbehaved = "sent a frame over %d KiB" % (TRACKER_MAX_FRAME // 1024)
        finally:
            self._ws = None
            self.client.connection_lost(time.monotonic(), misbehaved)
            self._handle_events()
            with contextlib.suppress(OSError, WebSocketException):
                await ws.close()

    async def _read(self, ws: Any) -> None:
        """Frames to the client while it stays OPEN; none before its read delay (TCP then
        holds the tracker back)."""
        client = self.client
        while client.state is TrackerState.OPEN:
            await self.flush()
            delay = client.read_delay(time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            deadline = client.next_deadline()
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                async with asyncio.timeout(wait):
                    text = await ws.recv()
            except TimeoutError:
                continue
            log.debug("< tracker %s %.200s", client.url, text)
            client.receive_frame(text, time.monotonic())

    def _handle_events(self) -> None:
        self.client.tick(time.monotonic())
        for event in self.client.events_received():
            self.rtc.on_tracker_event(self, event)

    async def flush(self) -> None:
        """Act on the client's events, then send its frames."""
        from websockets.exceptions import WebSocketException
        self._handle_events()
        frames = self.client.data_to_send()
        ws = self._ws
        for frame in frames if ws is not None else ():
            log.debug("> tracker %s %.200s", self.client.url, frame)
            with contextlib.suppress(OSError, WebSocketException):
                await ws.send(frame)

    async def close(self) -> None:
        """Say ``stopped`` to the tracker and close the socket."""
        self.client.close(time.monotonic())
        await self.flush()
        if self._ws is not None:
            from websockets.exceptions import WebSocketException
            with contextlib.suppress(OSError, WebSocketException):
                await self._ws.close()


class SctpGuard:
    """Bounds aiortc's reassembly of one peer connection's data-channel messages.

    aiortc holds every chunk of a message until the last one comes, with no
    limit: one message of 65 MiB is 55,000 chunks, each handled in time that
    grows with those held. The guard takes the place of aiortc's
    ``_get_inbound_stream`` on this one SCTP transport (aiortc's files are
    untouched) and gives it streams that refuse a chunk beyond the bounds of
    RTC_MAX_BUFFERED; then it drops what is held and calls ``on_over(why)``
    once, soon (never inside aiortc's own call). It uses aiortc's
    ``InboundStream`` and its ``reassembly`` list, as aiortc 1.9 to 1.16 have
    them; where they differ it bounds nothing and says so once.
    """

    def __init__(self, sctp: Any, message_cap: int, on_over: Callable[[str], Any]) -> None:
        from aiortc import rtcsctptransport
        self.sctp, self.message_cap, self.on_over = sctp, message_cap, on_over
        self.tripped = False
        self._first = rtcsctptransport.SCTP_DATA_FIRST_FRAG
        self._last = rtcsctptransport.SCTP_DATA_LAST_FRAG
        self._stream_class = _bounded_stream_class(rtcsctptransport.InboundStream)
        self._dropping = self._stream_class(self)  # for streams over RTC_MAX_STREAMS: kept nowhere

    @classmethod
    def install(cls, sctp: Any, message_cap: int, on_over: Callable[[str], Any]) -> SctpGuard | None:
        """Guard ``sctp``; None (and one warning a process) when aiortc's inside differs."""
        try:
            guard = cls(sctp, message_cap, on_over)
            usable = isinstance(sctp._inbound_streams, dict) and callable(sctp._get_inbound_stream)
        except (ImportError, AttributeError):
            usable = False
        if not usable:
            _rtc_unbounded(logging.WARNING, "unbounded", "this aiortc's data-channel messages are not "
                           "bounded (its inside differs): pip install 'aiortc>=1.9,<2'")
            return None
        sctp._get_inbound_stream = guard.stream
        return guard

    def stream(self, stream_id: int) -> Any:
        """aiortc's ``_get_inbound_stream``, bounded in number."""
        streams = self.sctp._inbound_streams
        if stream_id not in streams:
            if len(streams) >= RTC_MAX_STREAMS:
                self.trip("streams: more than %d data channels" % RTC_MAX_STREAMS)
                return self._dropping
            streams[stream_id] = self._stream_class(self)
        return streams[stream_id]

    def held(self) -> int:
        """What the streams hold, by weight."""
        return sum(getattr(s, "weight", 0) for s in self.sctp._inbound_streams.values())

    def message_size(self, reassembly: list, chunk: Any) -> int:
        """The bytes held of ``chunk``'s message: its run of consecutive chunks, up to the cap."""
        at = len(reassembly) - 1 if reassembly and reassembly[-1] is chunk else next(
            i for i, c in enumerate(reassembly) if c is chunk)
        size, i = len(chunk.user_data), at
        while size <= self.message_cap and not reassembly[i].flags & self._first and i > 0 \
                and reassembly[i - 1].tsn == (reassembly[i].tsn - 1) & 0xFFFFFFFF:
            i -= 1
            size += len(reassembly[i].user_data)
        i = at
        while size <= self.message_cap and not reassembly[i].flags & self._last \
                and i + 1 < len(reassembly) and reassembly[i + 1].tsn == (reassembly[i].tsn + 1) & 0xFFFFFFFF:
            i += 1
            size += len(reassembly[i].user_data)
        return size

    def trip(self, why: str) -> None:
        """Drop all that is held; ``on_over(why)`` once, from the loop."""
        if self.tripped:
            return
        self.tripped = True
        for stream in self.sctp._inbound_streams.values():
            stream.reassembly = []
        asyncio.get_running_loop().call_soon(self.on_over, why)


_rtc_unbounded = _LogLimit(interval=float("inf"))


@functools.cache
def _bounded_stream_class(inbound_stream: type) -> type:
    """aiortc's InboundStream, refusing chunks beyond its guard's bounds."""
    class BoundedInboundStream(inbound_stream):  # type: ignore[misc, valid-type]
        def __init__(self, guard: SctpGuard) -> None:
            super().__init__()
            self.guard = guard
            self.weight = 0  # of the chunks held

        def add_chunk(self, chunk: Any) -> None:
            guard = self.guard
            weight = max(len(chunk.user_data), RTC_CHUNK_WEIGHT)
            if guard.tripped or self is guard._dropping:
                return
            if guard.held() + weight > RTC_MAX_BUFFERED:
                guard.trip("held: more than %d bytes of unfinished data-channel messages" % RTC_MAX_BUFFERED)
                return
            super().add_chunk(chunk)
            self.weight += weight
            if guard.message_size(self.reassembly, chunk) > guard.message_cap:
                guard.trip("message: a data-channel message over %d bytes" % guard.message_cap)

        def pop_messages(self) -> Iterator[tuple[int, int, bytes]]:
            yield from super().pop_messages()
            self._weigh()

        def prune_chunks(self, tsn: int) -> int:
            size = super().prune_chunks(tsn)
            self._weigh()
            return size

        def _weigh(self) -> None:
            self.weight = sum(max(len(c.user_data), RTC_CHUNK_WEIGHT) for c in self.reassembly)

    return BoundedInboundStream


class RtcConnection(Connection):
    """Moves bytes between one RTCDataChannel and its :class:`PeerWire`.

    It stands in Bugout's connection set like a :class:`WireConnection`, so
    relay, duplicate wires, peers and RPC work the same over WebRTC. The wire
    is a byte stream, written in messages of at most :data:`RTC_CHUNK` bytes.
    A data channel cannot half-close: a losing duplicate is closed when the
    peer closes it, or DRAIN_GRACE after it began to drain.
    """

    DEADLINE_STAT = "webrtc timeouts"

    def __init__(self, rtc: WebRtcTransport, pc: Any, offerer: bool,
                 remote_id: str | None = None) -> None:
        # Both ends of a WebRTC wire send the handshake at once (WebTorrent peer.js).
        super().__init__(rtc.node, offerer, wire=rtc.node.new_wire(True))
        self.rtc = rtc
        self.pc = pc
        #: no socket, so no address for the DHT code that asks for one
        self.transport: Any = None
        #: the other side's tracker peer id (20 latin-1 chars), once known
        self.remote_id = remote_id
        self.channel: Any = None
        self.opened = False
        #: what bounds aiortc's reassembly of this connection's messages, once there is SCTP
        self.guard: SctpGuard | None = None
        pc.on("datachannel", self.attach)
        pc.on("connectionstatechange", self._on_state)

    @property
    def peer_name(self) -> str:
        return "webrtc:" + (self.remote_id or "?").encode("latin-1").decode("ascii", "replace")

    @property
    def writable(self) -> bool:
        return (self.state is not ConnState.CLOSED and self.channel is not None
                and self.channel.readyState == "open")

    def write_buffer(self) -> int:
        return self.channel.bufferedAmount if self.channel is not None else 0

    def start_timer(self, seconds: float) -> None:
        """Close unless the wire speaks bugout within ``seconds``."""
        self.start_deadline(seconds)

    def attach(self, channel: Any) -> None:
        """Use this data channel (ours, or the one the offerer made)."""
        if self.channel is not None or self.state is ConnState.CLOSED:
            channel.close()
            return
        self.channel = channel
        channel.on("open", self._on_open)
        channel.on("message", self._on_message)
        channel.on("close", self.close)
        if channel.readyState == "open":
            self._on_open()

    def _on_open(self) -> None:
        if self.opened or self.state is ConnState.CLOSED:
            return
        self.opened = True
        log.debug("- webrtc %s open", self.peer_name)
        self.start_deadline(self.rtc.connect_timeout)
        self.node.attach(self)
        self.node.stats["webrtc wires"] += 1
        self.flush()

    def _on_message(self, data: bytes | str) -> None:
        self.feed(data.encode("utf-8") if isinstance(data, str) else data)

    def bound_messages(self) -> None:
        """Bound what aiortc reassembles for us (RTC_MAX_BUFFERED), once its SCTP exists."""
        sctp = getattr(self.pc, "sctp", None)
        if self.guard is None and sctp is not None:
            cap = min(self.node.max_message, sctp.getCapabilities().maxMessageSize)
            self.guard = SctpGuard.install(sctp, cap, self._too_much)

    def _too_much(self, why: str) -> None:
        self.node.stats["webrtc closed: " + why.split(":")[0]] += 1
        self.node._log(logging.INFO, "rtc too much", "closing %s: %s", self.peer_name, why)
        self.close(abort=True)

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.close()

    def _write(self, data: bytes) -> None:
        for start in range(0, len(data), RTC_CHUNK):
            self.channel.send(data[start:start + RTC_CHUNK])

    def _close_transport(self, abort: bool) -> None:
        self.rtc._forget(self)
        self.rtc._spawn(self._shutdown(), closer=True)

    async def _shutdown(self) -> None:
        try:
            async with asyncio.timeout(5.0):
                await self.pc.close()
        except TimeoutError:
            log.debug("webrtc %s: peer connection did not close in 5 s", self.peer_name)
        finally:
            self.rtc.connections.discard(self)
            self.lost()


class WebRtcTransport:
    """WebRTC for one :class:`Bugout`: its trackers, peer connections and data channels.

    Off when there are no trackers or aiortc cannot be imported. It makes and
    answers no more offers once ``max_peers`` wires (TCP ones count) are open
    or being set up; on top of those each tracker keeps at most
    ``2 * numwant`` offers waiting, so live peer connections stay bounded.
    """

    def __init__(self, node: Bugout, settings: Settings, *, numwant: int = TRACKER_NUMWANT,
                 announce_interval: float | None = None) -> None:
        self.node = node
        #: the settings' ``trackers``, ``ice_servers`` and ``max_peers``
        self.trackers = list(settings.trackers)
        self.ice_servers = list(settings.ice_servers)
        self.max_peers = settings.max_peers
        self.numwant = numwant
        #: a fixed announce interval (tests); None follows each tracker's
        self.announce_interval = announce_interval
        self.connect_timeout = RTC_CONNECT_TIMEOUT
        self.offer_timeout = OFFER_TIMEOUT
        #: one session per tracker, once started
        self.sessions: list[TrackerSession] = []
        #: every RtcConnection whose RTCPeerConnection is not closed yet
        self.connections: set[RtcConnection] = set()
        # private
        self._offers: dict[str, RtcConnection] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closers: set[asyncio.Task] = set()
        self._aiortc: Any = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self._aiortc is not None and not self._closed

    # lifecycle
    async def start(self) -> bool:
        """Connect to the trackers; False (and one info line) when WebRTC is off."""
        if not self.trackers:
            return False
        try:
            import aiortc
            import websockets.asyncio.client  # noqa: F401 - the trackers' sockets (websockets 13+)
        except ImportError as exc:
            log.info("WebRTC is off: %s (pip install aiortc 'websockets>=13'); TCP and LSD go on", exc)
            return False
        self._aiortc = aiortc
        for url in self.trackers:
            client = TrackerClient(url, self.node.infohash, self.node.peer_id, numwant=self.numwant,
                                   interval=self.announce_interval, offer_timeout=self.offer_timeout)
            session = TrackerSession(self, client)
            self.sessions.append(session)
            self._spawn(session.run())
        log.info("WebRTC on: trackers %s; ICE servers %s", ", ".join(self.trackers),
                 ", ".join(s.url for s in self.ice_servers) or "none (host candidates only)")
        return True

    async def drain(self, timeout: float = 1.0) -> None:
        """Wait (a little) until the data channels have sent what they hold."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(not c.closing and c.channel.bufferedAmount for c in self.connections):
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.05)  # SCTP sends what left the channels

    async def close(self) -> None:
        """Say ``stopped`` to the trackers, close every peer connection. Idempotent."""
        if self._closed or self._aiortc is None:
            self._closed = True
            return
        await self.drain()
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*(s.close() for s in self.sessions))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self.connections):
            conn.close()
        await asyncio.gather(*self._closers, return_exceptions=True)

    def _spawn(self, coro: Awaitable, closer: bool = False) -> None:
        spawn(coro, self._closers if closer else self._tasks, "webrtc")

    # the tracker's events
    def on_tracker_event(self, session: TrackerSession, event: Any) -> None:
        """Act on one event of a tracker client."""
        if isinstance(event, MakeOffers):
            self._spawn(self._offer(session, event.offer_ids))
        elif isinstance(event, RelayedOffer):
            self._on_offer(session, event)
        elif isinstance(event, RelayedAnswer):
            self._spawn(self._accept(event))
        elif isinstance(event, DropOffer):
            conn = self._offers.pop(event.offer_id, None)
            if conn is not None:
                conn.close()
        elif isinstance(event, TrackerWarning):
            log.info("tracker %s: %s: %s%s", session.client.url, event.kind, event.message,
                     " (and %d more in %.0f s)" % (event.held, LOG_INTERVAL) if event.held else "")
        elif isinstance(event, TrackerUpdate):
            log.debug("tracker %s: %s seeders, %s leechers, every %.0f s", session.client.url,
                      event.complete, event.incomplete, event.interval)

    def free_slots(self) -> int:
        """How many more wires may be set up under ``max_peers``."""
        offers = set(self._offers.values())
        setting_up = {c for c in self.connections if c.state is not ConnState.CLOSED and c not in offers}
        return self.max_peers - len(set(self.node.links()) | setting_up)

    def has_peer(self, peer_id: str, wired_only: bool = False) -> bool:
        """True when a wire to this peer is open (or, unless ``wired_only``, being set up)."""
        if self.node.has_peer_id(peer_id.encode("latin-1")):
            return True
        return not wired_only and any(c.remote_id == peer_id and c.state is not ConnState.CLOSED
                                      for c in self.connections)

    def _new_connection(self, offerer: bool, remote_id: str | None = None) -> RtcConnection:
        aiortc = self._aiortc
        servers = [aiortc.RTCIceServer(urls=s.url, username=s.username, credential=s.credential)
                   for s in self.ice_servers]
        # iceServers=[] must be given: None makes aiortc ask Google's STUN server.
        pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=servers))
        conn = RtcConnection(self, pc, offerer, remote_id)
        self.connections.add(conn)
        return conn

    def _forget(self, conn: RtcConnection) -> None:
        for offer_id in [k for k, v in self._offers.items() if v is conn]:
            del self._offers[offer_id]

    async def _offer(self, session: TrackerSession, offer_ids: tuple[str, ...]) -> None:
        """Make offers for the free slots, then announce (with none, when full)."""
        made: list[tuple[str, str]] = []
        try:
            count = max(0, min(len(offer_ids), self.free_slots()))
            results = await asyncio.gather(*(self._make_offer(i) for i in offer_ids[:count]))
            made = [r for r in results if r is not None]
        finally:
            session.client.send_announce(made, time.monotonic())
            self.node.stats["webrtc offers"] += len(made)
        await session.flush()

    async def _make_offer(self, offer_id: str) -> tuple[str, str] | None:
        conn = self._new_connection(True)
        self._offers[offer_id] = conn
        try:
            conn.attach(conn.pc.createDataChannel("bugout"))
            conn.bound_messages()
            await conn.pc.setLocalDescription(await conn.pc.createOffer())
        except Exception as exc:  # noqa: BLE001 - aiortc's own errors, whatever they are
            log.debug("webrtc: cannot make an offer: %r", exc)
            conn.close()
        if conn.state is ConnState.CLOSED or self._closed:
            conn.close()
            return None
        return offer_id, conn.pc.localDescription.sdp

    def _on_offer(self, session: TrackerSession, offer: RelayedOffer) -> None:
        """Answer a relayed offer unless full, already wired to that peer, or the SDP is not
        one data channel that aiortc reads: those cost no connection and no task."""
        if self._closed or self.free_slots() <= 0 or self.has_peer(offer.peer_id):
            self.node.stats["webrtc offers declined"] += 1
            return
        problem = self._sdp_problem(offer.sdp, "offer")
        if problem is not None:
            self.node.stats["webrtc offers refused: bad SDP"] += 1
            log.debug("webrtc: offer of %r refused: %s", offer.peer_id, problem)
            return
        conn = self._new_connection(False, offer.peer_id)
        conn.start_deadline(self.connect_timeout)
        self._spawn(self._answer(session, conn, offer))

    def _sdp_problem(self, sdp: str, kind: str) -> str | None:
        """Why aiortc would refuse this SDP, or None; read without a peer connection.

        Only one data channel is taken: an audio or video section would make aiortc set up
        RTP for it."""
        try:
            description = self._aiortc.sdp.SessionDescription.parse(sdp)
        except Exception as exc:  # noqa: BLE001 - aiortc's parser raises what it meets
            return "unreadable: %r" % exc
        if len(description.media) != 1 or description.media[0].kind != "application":
            return "not one data channel"
        media = description.media[0]
        if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
            return "no ICE credentials"
        if media.dtls is None or not media.dtls.fingerprints:
            return "no DTLS fingerprint"
        if kind == "answer" and media.dtls.role not in ("client", "server"):
            return "no DTLS role"
        return None

    async def _answer(self, session: TrackerSession, conn: RtcConnection, offer: RelayedOffer) -> None:
        sdp = await self._describe(conn, offer.sdp, "offer")
        if sdp is None or not session.client.send_answer(offer.peer_id, offer.offer_id, sdp):
            conn.close()
            return
        self.node.stats["webrtc answers"] += 1
        await session.flush()

    async def _accept(self, answer: RelayedAnswer) -> None:
        """Apply the answer to our offer, unless a wire to that peer is already open."""
        conn = self._offers.pop(answer.offer_id, None)
        if conn is None or conn.state is ConnState.CLOSED:
            return
        if self.free_slots() < 0 or self.has_peer(answer.peer_id, wired_only=True):
            self.node.stats["webrtc answers declined"] += 1
            conn.close()
            return
        problem = self._sdp_problem(answer.sdp, "answer")
        if problem is not None:
            self.node.stats["webrtc answers refused: bad SDP"] += 1
            log.debug("webrtc: answer of %r refused: %s", answer.peer_id, problem)
            conn.close()
            return
        conn.remote_id = answer.peer_id
        conn.start_deadline(self.connect_timeout)
        await self._describe(conn, answer.sdp, "answer")

    async def _describe(self, conn: RtcConnection, sdp: str, kind: str) -> str | None:
        """Set the remote SDP (and answer an offer); None and closed on failure."""
        aiortc = self._aiortc
        try:
            await conn.pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=sdp, type=kind))
            conn.bound_messages()
            if kind == "offer":
                await conn.pc.setLocalDescription(await conn.pc.createAnswer())
                return conn.pc.localDescription.sdp
        except Exception as exc:  # noqa: BLE001 - a remote SDP aiortc will not take
            log.debug("webrtc %s: bad %s: %r", conn.peer_name, kind, exc)
            conn.close()
        return None


# The bugout node ############################################################
#
# Theory of operation. Bugout is the asyncio shell around BugoutCore: it keeps
# the wires (a Connection each: TCP or a WebRTC data channel), gives the core
# every payload they parse, and sends what the core queues.
#
# Wires. A connection joins the node when its stream is up (attach) and is
# OPEN once its BEP 10 handshake names bo_channel.
#
# Slots. Inbound TCP is capped: maxInbound in all; per remote host,
# PENDING_PER_HOST unfinished handshakes and INBOUND_PER_HOST finished wires
# not in_use (``last_verified`` within IDLE_SECONDS: a NAT's busy workers are
# not capped). At a cap one goes to make room (EVICTIONS_PER_SECOND at most):
# the oldest unfinished handshake, else the wire inbound_victim names (idle
# longest, then silent longest; at maxInbound then the least used of a host
# over its share; never a protected peer's, one with a call in flight, or a
# newcomer), else the newcomer is refused. A token holder's wires give way
# to a master that dials in. InboundSlots decides (sans-I/O); Bugout closes.
#
# Dials. An LSD announce or a DHT answer is anyone's claim: the peers they
# name wait in a DialQueue (bounded, per source; a protected peer's known
# endpoint first) and are dialed at DISCOVERY_DIALS_PER_SECOND, while fewer
# than MAX_DIALING dials run and MAX_DIALED wires we dialed are up. LSD
# datagrams themselves are read within a budget, per sender and in all.
# ``peers`` are dialed again and again, with backoff. Discovery does all
# this for the node, around the DialQueue (sans-I/O).
#
# Whose a wire is (WirePolicy, sans-I/O: the node asks it and keeps the
# sockets). The peer id and the keys (``pk``, ``ek``) of a handshake are
# anyone's to copy: they are claims, hints for routes, and never make another
# wire drain. A wire stands for the peer it claims once a packet that peer
# signed came by it first, made within FRESH_MS of our clock (a replay proves
# nothing), or an answer boxed to us for a call of ours (its nonce is ours);
# calls and answers that came unboxed prove nothing (someone opened them).
# It stops standing when the peer's fresh packets come first by other wires
# for STANDING_LAPSE and none by it, not even as copies; when the wire a peer was reached by
# closes, its other wires stand no more until they prove it again. A Python
# peer (peer id ``-QP``) gets a hello at once on a new wire, a ping boxed for
# the ``ek`` its handshake claims, unless a wire stands for it already (so no
# one can collect our hellos to pass them off as ours); a JS peer gets what JS
# bugout sends: a ping to all wires when a peer is new, nothing else. A peer
# that got a hello needs no such ping (it has our keys from our handshake and
# a fresh packet of ours from the hello): none goes for it, since in a mesh of
# N peers each passes a ping on to every wire (N² copies of each).
#
# Duplicates. Of wires claiming one peer, a claimant that does not stand, while
# another wire stands for that peer, gets PROVE_SECONDS to prove it, then
# drains. Two that stand: the one the peer half-closed loses (the peer
# drains it); else the one that stood DUP_WINDOW before the other stays (a
# newcomer never cuts a wire that stood first); else (both came up together,
# both ends dialed) the one dialed by the lower peer id, then from the lower
# dialer port, at both ends alike. A drained wire takes nothing new, is
# read up to the peer's EOF, so no answer in flight is lost. A wire to
# ourselves is closed; a peer that LSD announces again is not dialed while
# we have a wire to it.
#
# Routes. Our payload boxed for one peer goes by the wire that stands for it,
# alone; while none stands, by the wire its newest fresh packet came by and
# any wire claiming it; only while there is neither, to every other wire as
# spare traffic. A relayed copy that comes first never replaces a peer's own
# wire.
#
# Relays (WirePolicy.spare). Others' payloads are passed on, as bugout does,
# only where they delay nothing: a wire takes one when its send queue is empty or stays under
# RELAY_QUEUE with it (a protected wire's: RELAY_PROTECTED), while all queues
# hold less than RELAY_TOTAL, RELAY_WRITES_PER_SECOND at most; the rest are
# dropped and counted.
#
# Protection and bounds. prioritize() names the peers that matter (the
# master). Their route (the wire that stands for them, else the one their
# newest fresh packet came by) is handled whole each loop turn (others:
# WIRE_BUDGET payloads), and is never the one closed when partly received
# messages pass max_partial or send queues max_send_total (the unprotected
# wire holding most goes: WirePolicy.hold, WirePolicy.largest); the core
# never evicts those peers. While one of them talks, what other wires bring
# waits for the SlowLane, after the protected wires' bytes of each loop turn,
# in slices of LANE_SLICE and, if the node sets ``lane.share`` (master.py),
# within that share of the time; those wires wait unread, nothing is
# dropped. Any wire that leaves max_send_queue of our
# payloads unread is closed, and so is one whose message (the same one)
# stops coming closer to whole (check_wires) while we read it
# (Connection.stalled), unless it is protected: a slow master is waited for,
# and its RPC timeouts decide.
#
# Events, ``on(name, fn)`` (a coroutine function is spawned; an exception is
# logged, rate-limited, and never reaches the wire):
#   seen(address)             a peer is in the table: its first verified
#                             packet or handshake keys (again after it left)
#   left(address)             it is out: its ``x``, its timeout, or evicted
#   message(address, value)   a JSON message, broadcast or boxed for us
#   ping(address)             its heartbeat
#   rpc(address, name, args)  a call came, before its handler runs
#   wireseen(address)         an open wire's handshake claims this address
#   wireleft(address)         the last connection claiming it closed
#   connections(count)        open bugout wires, after a wire came or went

Handler = Callable[[str, Any], Any]

#: Seconds of each loop turn spent at most on the wires of peers not protected, while a
#: protected peer talks (SlowLane): what a protected peer sends waits about this long for them.
LANE_SLICE = 0.0002
#: Seconds of work the SlowLane may do at once after a rest, when its time is bounded (``share``).
LANE_BURST = 0.05
#: Seconds after a protected peer's route last brought bytes during which the SlowLane holds.
LANE_ACTIVE = 1.0
#: Payloads a wire hands over per turn in the SlowLane: in a flood from many wires, a newcomer's
#: call (a worker's isMaster, say) waits for one short visit of each, not for their backlogs.
LANE_VISIT = 2
#: Unfinished inbound handshakes per remote host, at most.
PENDING_PER_HOST = 8
#: Finished inbound wires per remote host not in use (in_use), at most: a token holder's
#: silent wires from one address take this many slots, not maxInbound; and at maxInbound a
#: host holding more gives way first (many workers behind one NAT may hold more meanwhile).
INBOUND_PER_HOST = 16
#: Inbound wires closed per second at most, to make room at the inbound caps (churn costs CPU).
EVICTIONS_PER_SECOND = 20.0
#: At a cap, a wire that carried no verified packet for this long (since it opened, if never) goes
#: first; then one that never carried any. Younger wires never go: they have this long to speak
#: (a bugout peer pings one it sees within a second; we ask a newcomer isMaster at once).
IDLE_SECONDS = 30.0
NEWCOMER_SECONDS = 5.0
#: Dials in progress at most (LSD and DHT answers are anyone's to forge).
MAX_DIALING = 32
#: TCP wires we dialed (up or being dialed) at most, before peers found (LSD, DHT) wait in the
#: queue; ``peers`` are always dialed.
MAX_DIALED = 200
#: Peers found (LSD, DHT) are dialed at this rate at most, in all (a burst of as many), and wait
#: in a queue of DIAL_QUEUE (DIAL_QUEUE_PER_SOURCE of one source) for DIAL_QUEUE_SECONDS at most.
DISCOVERY_DIALS_PER_SECOND = 10.0
DIAL_QUEUE = 256
DIAL_QUEUE_PER_SOURCE = 64
DIAL_QUEUE_SECONDS = 120.0
#: LSD: a peer that dials us anyway (a JS peer, or a Python one with a lower id) gets this long first.
LSD_YIELD = 1.0
#: LSD datagrams read per second at most, from all senders (past it the socket is not read for
#: LSD_PAUSE: the kernel drops the rest), and announces taken from one sender: one every
#: LSD_SOURCE_SECONDS, after a burst of LSD_SOURCE_BURST (the peers of one host starting at once).
LSD_DATAGRAMS_PER_SECOND = 100.0
LSD_PAUSE = 1.0
LSD_SOURCE_SECONDS = 2.0
LSD_SOURCE_BURST = 32
#: Ports LSD announced, by the announcer's peer id and host, kept to dial again a wire renewed
#: (Discovery.renew): a JS peer that dialed us dials again over uTP first, ~30 s.
LSD_ENDPOINTS_KEPT = 64
#: A wire takes relayed payloads while its send queue holds less than this (a protected wire's:
#: RELAY_PROTECTED) and all send queues together hold less than RELAY_TOTAL; the rest are dropped.
RELAY_QUEUE = 1024 * 1024
RELAY_PROTECTED = 64 * 1024
RELAY_TOTAL = 16 * 1024 * 1024
#: Our payloads kept per busy peer that had no wire, to send on the first wire claiming it.
WIRELESS_KEPT = 8
#: Relayed payloads written per second, to all wires together, at most (a second's worth in a burst).
RELAY_WRITES_PER_SECOND = 10_000.0


def in_use(conn: Connection, now: float, keep: Callable[[Connection], bool]) -> bool:
    """True for a wire that carried a verified packet in the last IDLE_SECONDS, or that
    ``keep`` names (a protected peer's, one with work in flight)."""
    last = conn.last_verified
    return (last is not None and now - last < IDLE_SECONDS) or keep(conn)


def inbound_victim(wires: Iterable[Connection], now: float, keep: Callable[[Connection], bool],
                   *, in_use_too: bool = False) -> Connection | None:
    """The finished inbound wire to close for room at a cap, or None (then refuse the newcomer).

    First the one longest without a verified packet, when that is IDLE_SECONDS or more
    (counted from its start if it never carried one); else the oldest that never carried
    one; with ``in_use_too``, else the one whose last verified packet is oldest. Never a
    wire ``keep`` names (a protected peer's, one with work in flight), nor one younger
    than NEWCOMER_SECONDS: a peer that dialed in has that long to say who it is.
    """
    best: tuple[tuple[int, float], Connection] | None = None
    for conn in wires:
        if now - conn.started < NEWCOMER_SECONDS or keep(conn):
            continue
        last = conn.last_verified
        idle = now - (conn.started if last is None else last)
        if idle >= IDLE_SECONDS:
            rank = (0, -idle)
        elif last is None:
            rank = (1, conn.started)
        elif in_use_too:
            rank = (2, last)
        else:
            continue
        if best is None or rank < best[0]:
            best = (rank, conn)
    return best[1] if best is not None else None


class InboundSlots:
    """Room for inbound TCP wires, without I/O: who is let in, which wire makes room.

    The node passes the inbound connections not closed, each a handle with
    ``state``, ``started``, ``last_verified`` and ``remote_host``, and ``now``
    in monotonic seconds. ``keep`` names the wires never closed to make room
    (WirePolicy.keeps: a protected peer's, one with a call in flight). Each
    answer is ``(ok, victim)``: let the newcomer in (``ok``) once ``victim``,
    if any, is closed; the node closes it. Counts go to ``stats``.
    """

    def __init__(self, keep: Callable[[Any], bool], stats: collections.Counter | None = None) -> None:
        self.keep = keep
        #: counts of callers refused and wires closed for room (the node's own counters, if given)
        self.stats: collections.Counter = collections.Counter() if stats is None else stats
        # private
        self._evictions = _RateLimit(EVICTIONS_PER_SECOND, EVICTIONS_PER_SECOND)

    def crowded(self, from_host: list, now: float) -> bool:
        """True when a host (``from_host``: its inbound connections) has PENDING_PER_HOST
        handshakes unfinished, or INBOUND_PER_HOST finished wires not in use of which none may
        make room."""
        pending = sum(1 for c in from_host if c.state is ConnState.HANDSHAKE)
        if pending >= PENDING_PER_HOST:
            self.stats["inbound refused: handshakes from one host"] += 1
            return True
        finished = [c for c in from_host if c.state is not ConnState.HANDSHAKE]
        if self.unused(finished, now) >= INBOUND_PER_HOST and inbound_victim(
                finished, now, self.keep) is None:
            self.stats["inbound refused: wires from one host"] += 1
            return True
        return False

    def unused(self, wires: list, now: float) -> int:
        """How many of ``wires`` are not in use (see in_use): a host's workers that all
        work (many behind one NAT, say) count nothing against INBOUND_PER_HOST."""
        return sum(1 for c in wires if not in_use(c, now, self.keep))

    def host_room(self, from_host: list, now: float) -> tuple[bool, Any]:
        """A wire from a host finished its handshake (``from_host``: that host's inbound
        connections, it among them): past INBOUND_PER_HOST wires not in use, one of the host's
        others makes room (inbound_victim), else (False) the newcomer goes."""
        finished = [c for c in from_host if c.state is not ConnState.HANDSHAKE]
        if self.unused(finished, now) <= INBOUND_PER_HOST:
            return True, None
        victim = inbound_victim(finished, now, self.keep)
        if victim is None:
            self.stats["inbound refused: wires from one host"] += 1
            return False, None
        self.stats["wires closed: room for a host's newcomer"] += 1
        return True, victim

    def make_room(self, inbound: list, accepting: int, cap: int, now: float) -> tuple[bool, Any]:
        """Room for one more inbound connection (``accepting``: those being made; ``cap``:
        maxInbound)? At the cap, the oldest unfinished handshake goes, else the wire
        inbound_victim names, else the least recently used of the host holding most wires, when
        that is over INBOUND_PER_HOST (a few a second at most: churn costs CPU). A newcomer (a
        master dialing in) is not locked out by wires that say nothing, nor by one host's wires
        that keep talking."""
        pending = [c for c in inbound if c.state is ConnState.HANDSHAKE]
        if len(inbound) + accepting < cap:
            return True, None
        victim = (min(pending, key=lambda c: c.started) if pending else
                  inbound_victim(inbound, now, self.keep) or self.crowded_hosts_victim(inbound, now))
        if victim is None or not self._evictions.allow(None, now):
            return False, None
        self.stats["handshakes cut: inbound cap" if pending else "wires closed: inbound cap"] += 1
        return True, victim

    def crowded_hosts_victim(self, inbound: list, now: float) -> Any:
        """The wire used least lately of the host with most inbound wires, if over its share."""
        hosts = collections.Counter(c.remote_host for c in inbound)
        host, count = hosts.most_common(1)[0] if hosts else (None, 0)
        if count <= INBOUND_PER_HOST:
            return None
        return inbound_victim([c for c in inbound if c.remote_host == host], now, self.keep,
                              in_use_too=True)


def _call_later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
    return asyncio.get_running_loop().call_later(delay, callback)


class SlowLane:
    """The wires of peers not protected, handled after the protected ones' in each loop turn.

    While a protected peer (a worker's master, master.py's proven workers)
    talks (``heard`` within LANE_ACTIVE), a wire that is not such a peer's
    route does not handle what it brings when its bytes come: it waits here,
    unread, and the lane's turn (``schedule(delay, turn)``: after the loop's
    I/O, ``delay`` seconds from now) handles the waiting wires in order,
    ``handle(wire)`` each (a few payloads: LANE_VISIT), until
    ``slice_seconds`` of ``clock`` are spent; the rest wait for the next turn.
    So what a protected peer sends is handled within about a slice of its
    coming, whatever others send. ``share``: the fraction of the time the lane
    may take at most (None: no bound), so a flood costs its senders time and
    the loop no more than that; its wires wait unread meanwhile (their
    senders wait for TCP), and nothing of theirs is dropped.
    """

    def __init__(self, handle: Callable[[Any], None], schedule: Callable[[float, Callable[[], None]], Any],
                 clock: Callable[[], float] = time.monotonic, slice_seconds: float = LANE_SLICE,
                 share: float | None = None) -> None:
        self.handle, self.schedule, self.clock = handle, schedule, clock
        self.slice_seconds, self.share = slice_seconds, share
        # private: the wires waiting, oldest first (a dict: each once); whether a turn is scheduled;
        # the seconds the lane may still spend (``share``), and when that was worked out
        self._waiting: dict[Any, None] = {}
        self._scheduled = False
        self._credit, self._at = LANE_BURST, clock()
        self._heard = float("-inf")  # when a protected peer's route last brought bytes

    def heard(self, now: float) -> None:
        """A protected peer's route brought bytes at ``now``."""
        self._heard = now

    def active(self, now: float) -> bool:
        """True while a protected peer's route brought bytes within LANE_ACTIVE: only then do
        others' wires wait here (an idle master, or proven workers gone, cost them nothing)."""
        return now - self._heard < LANE_ACTIVE

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, wire: Any) -> None:
        """``wire`` has something to handle: in the lane's next turn, or a later one."""
        self._waiting[wire] = None
        if not self._scheduled:
            self._scheduled = True
            self.schedule(self._wait(), self.turn)

    def turn(self) -> None:
        """Handle waiting wires until the slice is spent (one at least); schedule the rest."""
        self._scheduled = False
        start = self.clock()
        self._refill(start)
        while self._waiting:
            wire = next(iter(self._waiting))
            del self._waiting[wire]
            self.handle(wire)
            if self.clock() - start >= self.slice_seconds:
                break
        now = self.clock()
        self._refill(now)
        self._credit -= now - start
        if self._waiting and not self._scheduled:
            self._scheduled = True
            self.schedule(self._wait(), self.turn)

    def _refill(self, now: float) -> None:
        if self.share is not None:
            self._credit = min(LANE_BURST, self._credit + (now - self._at) * self.share)
        self._at = now

    def _wait(self) -> float:
        """Seconds until the lane may work again (0: at the next loop turn)."""
        self._refill(self.clock())
        return 0.0 if self.share is None or self._credit > 0 else -self._credit / self.share


@dataclasses.dataclass
class QueuedDial:
    """A peer found (LSD, DHT) that waits in the :class:`DialQueue`."""
    endpoint: Addr
    source: str  # who named it: an LSD sender's address, "dht", ...
    ready: float  # not dialed before (LSD_YIELD)
    expires: float
    peer_id: bytes | None = None  # the id LSD's cookie claims: no dial once a wire has it


class DialQueue:
    """Peers that discovery names, waiting to be dialed: no I/O, ``now`` passed in.

    An LSD announce or a DHT answer is a claim anyone can make, not an order. The
    queue holds DIAL_QUEUE peers at most, DIAL_QUEUE_PER_SOURCE of one source, each
    for DIAL_QUEUE_SECONDS; :meth:`take` gives out DISCOVERY_DIALS_PER_SECOND in
    all, the sources in turn (a source flooding names gets its turn, not the
    queue), within the room the caller has. A preferred endpoint (a known
    master's, :meth:`prefer`) is given out first and at once, room or not; one on
    a preferred host before the others.
    """

    def __init__(self, rate: float = DISCOVERY_DIALS_PER_SECOND, size: int = DIAL_QUEUE,
                 per_source: int = DIAL_QUEUE_PER_SOURCE, ttl: float = DIAL_QUEUE_SECONDS,
                 stats: collections.Counter | None = None) -> None:
        self.size, self.per_source, self.ttl = size, per_source, ttl
        #: counts of peers dropped, dialed, expired (the node's own counters, if given)
        self.stats: collections.Counter = collections.Counter() if stats is None else stats
        # private
        self._rate = _RateLimit(rate, max(rate, 1.0), keys=1)
        self._entries: dict[Addr, QueuedDial] = {}
        self._sources: dict[str, collections.deque[Addr]] = {}  # FIFO each; the turn is the dict's order
        self._preferred: frozenset[Addr] = frozenset()
        self._preferred_hosts: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, endpoint: object) -> bool:
        return endpoint in self._entries

    def prefer(self, endpoints: Iterable[Addr], hosts: Iterable[str] = ()) -> None:
        """These endpoints go first (replacing the earlier ones), then those on these hosts."""
        self._preferred = frozenset(endpoints)
        self._preferred_hosts = frozenset(hosts) | {host for host, _ in self._preferred}

    def offer(self, endpoint: Addr, source: str, now: float, *, delay: float = 0.0,
              peer_id: bytes | None = None) -> bool:
        """Queue a peer found; False when it was dropped (its source's share or the queue full)."""
        if endpoint in self._entries:
            return True
        line = self._sources.get(source)
        if line is not None and len(line) >= self.per_source:
            self.stats["found peers dropped: the source's share is full"] += 1
            return False
        if len(self._entries) >= self.size and not self._make_room(endpoint, now):
            self.stats["found peers dropped: the queue is full"] += 1
            return False
        self._entries[endpoint] = QueuedDial(endpoint, source, now + delay, now + self.ttl, peer_id)
        self._sources.setdefault(source, collections.deque()).append(endpoint)
        return True

    def _make_room(self, endpoint: Addr, now: float) -> bool:
        """Drop what expired; for a preferred endpoint, the newest of the longest line too."""
        for queued in [q for q in self._entries.values() if q.expires <= now]:
            self._remove(queued)
            self.stats["found peers expired"] += 1
        if len(self._entries) < self.size:
            return True
        if endpoint not in self._preferred and endpoint[0] not in self._preferred_hosts:
            return False
        longest = max(self._sources.values(), key=len)
        self._remove(self._entries[longest[-1]])
        return True

    def _remove(self, queued: QueuedDial) -> None:
        del self._entries[queued.endpoint]
        line = self._sources[queued.source]
        line.remove(queued.endpoint)
        if not line:
            del self._sources[queued.source]

    def take(self, now: float, room: int, skip: Callable[[QueuedDial], bool] = lambda q: False
             ) -> list[QueuedDial]:
        """The dials to start now, ``room`` at most (preferred endpoints besides); ``skip``
        drops those no longer needed (a wire to them came meanwhile) at no cost in rate."""
        out = []
        for queued in self._ready(now, self._preferred):  # at once, room or not
            self._remove(queued)
            if not skip(queued):
                out.append(queued)
        given = 0
        for queued in itertools.chain(self._on_preferred_hosts(now), self._in_turn(now)):
            if given >= room:
                break
            self._remove(queued)
            if queued.expires <= now:
                self.stats["found peers expired"] += 1
            elif not skip(queued):
                if not self._rate.allow(None, now):
                    self._entries[queued.endpoint] = queued  # back at the head of its line
                    self._sources.setdefault(queued.source, collections.deque()).appendleft(queued.endpoint)
                    break
                out.append(queued)
                given += 1
        self.stats["found peers dialed"] += len(out)
        return out

    def _ready(self, now: float, endpoints: Iterable[Addr]) -> list[QueuedDial]:
        return [self._entries[e] for e in endpoints if e in self._entries and self._entries[e].ready <= now]

    def _on_preferred_hosts(self, now: float) -> Iterator[QueuedDial]:
        for queued in [q for q in self._entries.values() if q.endpoint[0] in self._preferred_hosts]:
            if queued.ready <= now and queued.endpoint in self._entries:
                yield queued

    def _in_turn(self, now: float) -> Iterator[QueuedDial]:
        """The ready heads of the sources' lines, one source after the other, round and round."""
        while True:
            heads = [(source, line[0]) for source, line in self._sources.items()
                     if self._entries[line[0]].ready <= now]
            if not heads:
                return
            for source, endpoint in heads:
                if self._sources.get(source, (None,))[0] == endpoint:
                    self._sources[source] = self._sources.pop(source)  # its turn: to the back
                    yield self._entries[endpoint]


#: A wire that claims a peer another wire has proven gets this long to prove it too, or it drains.
PROVE_SECONDS = 5.0
#: A wire stops standing for its peer once the peer's fresh packets came first by other wires for
#: this long, and none by it, not even copies (its own wire went quiet while a relay brings them).
STANDING_LAPSE = 10.0
#: Two wires of one peer that came to stand within this many seconds of each other opened together
#: (both ends dialed): the dialer's peer id picks the one kept, alike at both ends. Further apart,
#: the one that stood first stays.
DUP_WINDOW = 3.0
#: Peer ids of Python peers (worker.py, master.py) begin so: they get a hello on a new wire.
PYTHON_PEER_PREFIX = PEER_ID_PREFIX[:3]


@dataclasses.dataclass(slots=True)
class _WireFacts:
    """What the wire policy knows of one open wire."""
    address: str | None  # the peer its handshake claims: a hint until a packet proves it
    dialer: bytes  # the peer id of the end that dialed it, and that end's port: ties broken alike
    port: int | None
    opened: float
    last: float | None = None  # when a packet its peer signed last proved it
    since: float | None = None  # it stands for its peer since then (None: it does not)
    deadline: float | None = None  # it drains then, unless it proves its peer first
    eof: bool = False  # the peer half-closed it: the peer drains it
    out: bool = False  # we drain it


def _stays(a: _WireFacts, b: _WireFacts) -> bool:
    """True when ``a`` stays rather than ``b``, two wires standing for one peer."""
    since_a, since_b = a.since or 0.0, b.since or 0.0
    if abs(since_a - since_b) >= DUP_WINDOW:
        return since_a < since_b  # the older stays: a newcomer never cuts a wire that stood before it
    if a.dialer != b.dialer:
        return a.dialer < b.dialer
    if a.port is not None and b.port is not None and a.port != b.port:
        return a.port < b.port
    return a.opened <= b.opened


class WirePolicy:
    """Which wire is whose, without I/O: duplicates, routes, relays and protection.

    Wires are plain handles. The node tells the policy when a wire opens
    (:meth:`opened`, with the peer its handshake claims), what each packet
    verified on it was (:meth:`packet`), when the peer half-closes it
    (:meth:`peer_eof`) and when it is gone (:meth:`closed`). Time comes in:
    ``now`` in monotonic seconds, ``now_ms`` the wall clock (a packet's time
    is its signer's). The policy answers which wire is a peer's own
    (:meth:`direct`), where our payloads go (:meth:`targets`), which wire is
    protected (:meth:`is_protected`), which wire takes a relay
    (:meth:`spare`, from queue sizes), and which wires to drain (:meth:`due`,
    :meth:`next_due`).

    A wire stands for the peer its handshake claims once a packet that peer
    signed came by it first (not a copy of one that came by another wire),
    made within FRESH_MS (or an answer boxed to us for a call of ours). It
    stops standing when that peer's fresh packets came first by other wires
    for STANDING_LAPSE and none by it, not even as copies; and all wires
    claiming a peer stop when the wire it was reached by closes, until they
    prove it again.
    """

    def __init__(self) -> None:
        #: addresses whose wire is protected (the master)
        self.protected: frozenset[str] = frozenset()
        # private
        self._wires: dict[Any, _WireFacts] = {}
        self._by_address: dict[str, list[Any]] = {}
        self._direct: dict[str, Any] = {}  # address -> the wire kept of those standing for it
        self._relayed: dict[str, Any] = {}  # address -> the wire its newest fresh packet came by
        self._elsewhere: dict[str, float] = {}  # address -> since when its packets come by others
        self._changed: set[str] = set()  # addresses whose wires must be weighed again
        #: (the protected set, its peers' routes) as last worked out; None: to work out again
        self._protected_routes: tuple[frozenset[str], set[Any]] | None = None
        self._drains: list[tuple[Any, str]] = []
        self._deadlines: dict[Any, float] = {}
        self._now = 0.0  # the latest time the node passed in
        self._relays = _RateLimit(RELAY_WRITES_PER_SECOND, RELAY_WRITES_PER_SECOND)
        #: bytes of messages partly received (or not handled yet) on all wires
        self.held_total = 0
        self._held: dict[Any, int] = {}  # those bytes, by wire

    # what the node tells it
    def opened(self, wire: Any, address: str | None, dialer: bytes, port: int | None, now: float,
               python: bool = False) -> bool:
        """A wire speaks bugout, its handshake claiming ``address``; True: send it a hello.

        ``dialer`` is the peer id of the end that dialed it and ``port`` that
        end's TCP port. A Python peer (``python``) gets a hello (a ping boxed
        for it) when no wire stands for it yet: one that claims a peer
        already wired gets none, so no one can collect our hellos to show
        another peer as ours.
        """
        self._now = now
        self._wires[wire] = _WireFacts(address, dialer, port, now)
        if address is None:
            return False
        self._by_address.setdefault(address, []).append(wire)
        self._touch(address)
        return python and self.direct(address) is None

    def packet(self, wire: Any, verified: Verified, now: float, now_ms: int, copy: bool = False) -> None:
        """A packet came by ``wire`` and passed: a fresh one, first, proves whose the wire is.

        ``copy``: it came after the same packet came by another wire. It proves
        nothing, but a wire that stands for its signer still brings the
        signer's packets: the wire is alive, only slower this time.
        """
        if not (abs(now_ms - verified.t) <= FRESH_MS and (verified.boxed or verified.kind in ("p", "m"))
                or verified.kind == "rr" and verified.boxed):
            return  # replayed (or unboxed by someone: calls and answers are always boxed)
        facts = self._wires.get(wire)
        if facts is None or facts.out:
            return
        self._now = now
        address = verified.address
        if copy:
            if facts.address == address and facts.since is not None:
                self._elsewhere.pop(address, None)
            return
        if self._relayed.get(address) is not wire and address in self.protected:
            self._protected_routes = None
        self._relayed[address] = wire
        if facts.address == address:
            facts.last = now
            self._elsewhere.pop(address, None)
            if facts.since is None:
                facts.since = now
                self._touch(address)
        elif address in self._direct and now - self._elsewhere.setdefault(address, now) >= STANDING_LAPSE:
            self._touch(address)  # relayed copies say nothing of whose a wire is, but its own is quiet

    def peer_eof(self, wire: Any) -> None:
        """The peer half-closed ``wire``: it drains it; another of its wires is its own now."""
        facts = self._wires.get(wire)
        if facts is not None and not facts.eof:
            facts.eof = True
            if facts.address is not None:
                self._touch(facts.address)

    def closed(self, wire: Any) -> None:
        """``wire`` is gone (or never opened); if a peer was reached by it, its other wires
        stand no more until they prove it again."""
        facts = self._wires.get(wire)
        if facts is None:
            return
        address = facts.address
        reached = address is not None and self.direct(address) is wire
        del self._wires[wire]
        self._moved(wire)
        self._deadlines.pop(wire, None)
        self._relayed = {a: c for a, c in self._relayed.items() if c is not wire}
        if address is None:
            return
        others = self._by_address[address]
        others.remove(wire)
        if reached:
            del self._direct[address]
            for other in others:
                self._wires[other].since = self._wires[other].last = None
        if not others:
            del self._by_address[address]
        self._touch(address)

    def forget(self, keep: Container[str]) -> None:
        """Routes by relay to peers not in ``keep`` (the peer table) are forgotten."""
        self._relayed = {a: c for a, c in self._relayed.items() if a in keep}
        self._protected_routes = None

    # what it decides
    def direct(self, address: str) -> Any:
        """The wire kept of those standing for ``address`` (None: none stands)."""
        if address in self._changed:
            self._settle(address)
        return self._direct.get(address)

    def route(self, address: str) -> Any:
        """The wire our payloads for ``address`` take: its own, else the one its newest fresh
        packet came by (a relayed copy never replaces its own wire)."""
        wire = self.direct(address)
        if wire is None:
            wire = self._relayed.get(address)
            facts = self._wires.get(wire)
            if facts is None or facts.out:
                return None
        return wire

    def targets(self, address: str) -> tuple[list[Any], bool]:
        """(wires that carry our payload for ``address``, whether the others get it as spare).

        Its own wire alone, when one stands for it; else the wire its newest
        packet came by and any wire claiming it; only when there is neither,
        every other wire too (as JS bugout floods everything).
        """
        wire = self.direct(address)
        if wire is not None:
            return [wire], False
        wires = [w for w in self._by_address.get(address, ()) if not self._wires[w].out]
        relayed = self.route(address)
        if relayed is not None and relayed not in wires:
            wires.append(relayed)
        return wires, not wires

    def is_protected(self, wire: Any) -> bool:
        """True when ``wire`` is the route of a protected peer."""
        return wire is not None and wire in self._routes()

    def _routes(self) -> set[Any]:
        """The protected peers' routes (None for one without), worked out again only after one
        may have changed: master.py protects thousands of workers, and a flood asks each time."""
        cached = self._protected_routes
        while cached is None or cached[0] is not self.protected:
            cached = self._protected_routes = (self.protected, set())
            routes = {self.route(address) for address in self.protected}  # may settle (and drain)
            if self._protected_routes is cached:  # nothing moved meanwhile: else once more
                cached = self._protected_routes = (self.protected, routes)
            else:
                cached = None
        return cached[1]

    def stands(self, wire: Any) -> bool:
        """True when ``wire`` stands for the peer it claims."""
        facts = self._wires.get(wire)
        if facts is None or facts.address is None:
            return False
        self.direct(facts.address)
        return facts.since is not None and not facts.out

    def spare(self, wire: Any, size: int, waiting: int, total: Callable[[], int], relay: bool,
              now: float) -> str | None:
        """Whether ``wire`` takes a payload that delays nothing: another peer's (``relay``), or
        ours passing it for want of a route. None: it does; else why it is dropped.

        ``waiting``: bytes its send queue holds; ``total()``: bytes all send
        queues hold (asked only when needed). It takes one when its queue is
        empty or stays under RELAY_QUEUE with it (a protected wire's:
        RELAY_PROTECTED: a flood never waits in front of the master's
        packets), while all queues hold less than RELAY_TOTAL; relays
        RELAY_WRITES_PER_SECOND at most (a flood fanned out to every wire).
        """
        room = RELAY_PROTECTED if self.is_protected(wire) else RELAY_QUEUE
        if (waiting and waiting + size > room) or total() > RELAY_TOTAL:
            return "queues full"
        if relay and not self._relays.allow(None, now):
            return "over the rate"
        return None

    def due(self, now: float) -> list[tuple[Any, str]]:
        """(wire, why) to drain now: a ``duplicate`` of one that stays, and claimants whose
        deadline passed (``unproven``)."""
        self._now = now
        for address in list(self._changed):
            self._settle(address)
        if self._deadlines and min(self._deadlines.values()) <= now:
            for wire, when in list(self._deadlines.items()):
                if when <= now:
                    self._drain(wire, "unproven")
        drains, self._drains = self._drains, []
        return drains

    def keeps(self, wire: Any, busy: Iterable[str]) -> bool:
        """True for a wire never closed to make room: a protected peer's, or one whose peer has
        a call in flight (``busy``: ours to it, or its own being answered) and whose packets
        came by it."""
        return self.is_protected(wire) or any(self.route(a) is wire for a in busy)

    def largest(self, sizes: dict[Any, int]) -> Any:
        """The wire with the largest size (bytes it holds, say) that is not protected, or None."""
        candidates = [(size, id(w), w) for w, size in sizes.items() if not self.is_protected(w)]
        return max(candidates)[2] if candidates else None

    def hold(self, wire: Any, size: int, bound: int) -> list[tuple[Any, int]]:
        """``wire`` holds ``size`` bytes of messages not whole (or not handled) yet. Past ``bound``
        on all wires together: the (wire, bytes) to close, the unprotected wire holding most
        first, until the rest fits (the node closes them; they hold nothing from now on)."""
        if not size and wire not in self._held:
            return []
        self.held_total += size - self._held.pop(wire, 0)
        if size:
            self._held[wire] = size
        victims = []
        while self.held_total > bound and (victim := self.largest(self._held)) is not None:
            victims.append((victim, self._held.pop(victim)))
            self.held_total -= victims[-1][1]
        return victims

    def next_due(self) -> float | None:
        """When :meth:`due` has a claimant to drain next (None: none waits)."""
        return min(self._deadlines.values(), default=None)

    def _touch(self, address: str) -> None:
        """The wires claiming ``address`` must be weighed again (when next asked)."""
        self._changed.add(address)
        if address in self.protected:
            self._protected_routes = None

    def _moved(self, wire: Any) -> None:
        """``wire`` stops being a route: the protected routes are worked out again if it was one
        (others' wires come and go in a flood; that costs no look at thousands of routes)."""
        if self._protected_routes is not None and wire in self._protected_routes[1]:
            self._protected_routes = None

    def _settle(self, address: str) -> None:
        """Weigh the wires claiming ``address`` again: the one kept, the duplicates, the deadlines."""
        self._changed.discard(address)
        facts = {w: self._wires[w] for w in self._by_address.get(address, ()) if not self._wires[w].out}
        elsewhere = self._elsewhere.pop(address, None)
        if elsewhere is not None and self._now - elsewhere < STANDING_LAPSE:
            self._elsewhere[address] = elsewhere  # not long enough yet
        elif elsewhere is not None:
            for f in facts.values():
                f.since = None
        standing = [w for w, f in facts.items() if f.since is not None and not f.eof]
        kept = None
        for wire in standing:
            if kept is None or not _stays(facts[kept], facts[wire]):
                kept = wire
        if kept is None:
            self._direct.pop(address, None)
            self._elsewhere.pop(address, None)
        else:
            self._direct[address] = kept
        for wire, f in facts.items():
            if wire in standing and wire is not kept:
                self._drain(wire, "duplicate")
            elif wire not in standing and not f.eof and kept is not None:
                if f.deadline is None:
                    f.deadline = self._deadlines[wire] = self._now + PROVE_SECONDS
            elif f.deadline is not None:
                f.deadline = None
                self._deadlines.pop(wire, None)

    def _drain(self, wire: Any, why: str) -> None:
        facts = self._wires[wire]
        facts.out, facts.since, facts.deadline = True, None, None
        self._moved(wire)
        self._deadlines.pop(wire, None)
        self._drains.append((wire, why))


class Discovery:
    """Finding peers and dialing them, for a :class:`Bugout` node: ``peers``, LSD and the DHT.

    The asyncio shell around the :class:`DialQueue` (the theory of operation
    above, "Dials"): the peers LSD announces and DHT lookups name wait there and
    are dialed within MAX_DIALING and MAX_DIALED; ``peers`` are dialed again and
    again, with backoff. It reads the node's settings, and its tasks are the node's.
    """

    def __init__(self, node: Bugout) -> None:
        self.node = node
        #: our DHT node (None: off, or no UDP port was free)
        self.dht: Dht | None = None
        # private
        self._dialing: set[tuple] = set()
        self._dials = DialQueue(stats=node.stats)  # peers found (LSD, DHT), waiting their turn
        self._dial_timer: asyncio.TimerHandle | None = None
        self._lsd_budget = _RateLimit(LSD_DATAGRAMS_PER_SECOND, LSD_DATAGRAMS_PER_SECOND, keys=1)
        self._lsd_sources = _RateLimit(1.0 / LSD_SOURCE_SECONDS, LSD_SOURCE_BURST)
        self._whereabouts: collections.OrderedDict[str, tuple[str | None, tuple | None]] = (
            collections.OrderedDict())  # address -> (host, endpoint we dialed) of a wire it signed on
        self._lsd_transport: asyncio.DatagramTransport | None = None
        self._lsd_cookie = "bittorrent-lsd-" + node.peer_id.hex()
        #: (announcer's peer id, the host it came from) -> the port it announced: claims both, so a
        #: renewed wire is dialed again only where its own host announced (Discovery.renew)
        self._lsd_endpoints: dict[tuple[bytes, str], int] = {}

    async def start(self) -> None:
        """The DHT node, the configured peers, LSD: each as the node's settings say."""
        if self.node.dht:
            await self._start_dht()
        for host, port in self.node.static_peers:
            self.node._spawn(self._keep_peer(host, port))
        if self.node.lsd:
            await self._start_lsd()

    def stop(self) -> None:
        """No more dials from the queue; LSD closed (the DHT node closes in :meth:`close`)."""
        if self._dial_timer is not None:
            self._dial_timer.cancel()
        if self._lsd_transport is not None:
            self._lsd_transport.close()

    async def close(self) -> None:
        """Close the DHT node (after the node's tasks, its lookups among them, are gone)."""
        if self.dht is not None:
            await self.dht.close()

    def add_peer(self, host: str, port: int, source: str | None = None, *, delay: float = 0.0,
                 peer_id: bytes | None = None) -> None:
        """Dial ``host:port`` once, in the background, when the DialQueue gives its turn.

        ``source`` names who told us of it (LSD's sender, "dht"; else ``host``): one
        source gets its share of the queue and of the dials. ``delay``: not before;
        ``peer_id``: not once a wire to that peer id is up.
        """
        if self.node.closed or self.needless((host, port)):
            return
        self._dials.offer((host, port), source or host, time.monotonic(), delay=delay, peer_id=peer_id)
        self.pump_dials()

    def needless(self, endpoint: tuple, peer_id: bytes | None = None) -> bool:
        """True for ourselves, a peer being dialed or wired by this endpoint or peer id."""
        host, port = endpoint
        if port == self.node.port and host in ("127.0.0.1", "localhost", self.node.host):
            return True
        if endpoint in self._dialing or (peer_id is not None and self.node.has_peer_id(peer_id)):
            return True
        return any(c.dialed == endpoint for c in self.node.links())

    def pump_dials(self) -> None:
        """Start the dials the queue gives now (within MAX_DIALING and MAX_DIALED); come back
        while some wait."""
        if self.node.closed:
            return
        dialed = sum(1 for c in self.node.links() if c.dialed)
        room = min(MAX_DIALING, MAX_DIALED - dialed) - len(self._dialing)
        for queued in self._dials.take(time.monotonic(), room,
                                       lambda q: self.needless(q.endpoint, q.peer_id)):
            self._dialing.add(queued.endpoint)
            self.node._spawn(self._dial(*queued.endpoint))
        if self._dials and self._dial_timer is None:
            self._dial_timer = asyncio.get_running_loop().call_later(
                1.0 / DISCOVERY_DIALS_PER_SECOND, self._dial_timer_due)

    def _dial_timer_due(self) -> None:
        self._dial_timer = None
        self.pump_dials()

    def prefer_dials(self) -> None:
        """A protected peer's endpoint (we dialed it and it signed there) is dialed first when
        found again; an address found on its host before the others."""
        known = [self._whereabouts[a] for a in self.node.protected if a in self._whereabouts]
        self._dials.prefer([e for _, e in known if e], [h for h, _ in known if h])

    def remember(self, conn: Connection) -> None:
        """``conn``'s peer signed on it: keep where it is (the last 256 peers)."""
        where, address = (conn.remote_host, conn.dialed), conn.address
        if self._whereabouts.get(address) == where:  # type: ignore[arg-type]
            self._whereabouts.move_to_end(address)  # type: ignore[arg-type]
            return
        self._whereabouts[address] = where  # type: ignore[index]
        self._whereabouts.move_to_end(address)  # type: ignore[arg-type]
        if len(self._whereabouts) > 256:
            self._whereabouts.popitem(last=False)
        if address in self.node.protected:
            self.prefer_dials()

    async def _dial(self, host: str, port: int) -> WireConnection | None:
        self._dialing.add((host, port))
        loop = asyncio.get_running_loop()
        try:
            source = sending_address(self.node.host, host)
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: WireConnection(self.node, True, (host, port)), host, port,
                local_addr=(source, 0) if source else None), 5.0)
            return conn  # type: ignore[return-value]
        except (TimeoutError, OSError, UnicodeError) as exc:  # UnicodeError: a name like "a..b"
            log.debug("dial %s:%s failed: %s", host, port, exc)
            return None
        finally:
            self._dialing.discard((host, port))
            if self._dials:
                self.pump_dials()

    async def _keep_peer(self, host: str, port: int) -> None:
        """Stay connected to a configured peer; back off while it is away."""
        delay = 0.5
        while not self.node.closed:
            if not any(c.dialed == (host, port) for c in self.node.links()):
                conn = await self._dial(host, port)
                delay = 0.5 if conn else min(delay * 2, 30.0)
            await asyncio.sleep(delay)

    def lsd_datagram(self, data: bytes, host: str) -> None:
        """A datagram on the LSD port: within the budgets, a BT-SEARCH for our swarm is taken.

        LSD_DATAGRAMS_PER_SECOND are read in all (past that the socket rests for
        LSD_PAUSE, and the kernel drops the rest: a flood costs bounded CPU), and a
        sender's announces are taken once per LSD_SOURCE_SECONDS after a burst.
        """
        now = time.monotonic()
        if not self._lsd_budget.allow(None, now):
            self.node.stats["lsd: over the rate, not read"] += 1
            if self._lsd_transport is not None and self._lsd_transport.is_reading():
                self._lsd_transport.pause_reading()
                asyncio.get_running_loop().call_later(LSD_PAUSE, self._lsd_resume)
            return
        if not self._lsd_sources.allow(host, now):
            self.node.stats["lsd: sender over its rate"] += 1
            return
        parsed = parse_lsd(data)
        if parsed is None:
            self.node.stats["lsd ignored"] += 1
            return
        port, hashes, cookie = parsed
        if self.node.infohash in hashes:
            self.lsd_peer(host, port, cookie)

    def _lsd_resume(self) -> None:
        if self._lsd_transport is not None and not self.node.closed:
            self._lsd_transport.resume_reading()

    def lsd_peer(self, host: str, port: int, cookie: str | None) -> None:
        """A BT-SEARCH for our swarm came from ``host``: queue a dial, unless wired to it already.

        bittorrent-lsd's cookie is ``bittorrent-lsd-`` and the announcer's peer
        id in hex: a peer we have a wire to (LSD re-announces) is not dialed
        again. Of two peers that hear each other, the wire kept is the one
        dialed by the lower peer id; so the higher one, and we for a JS peer
        (it dials every peer it hears), wait LSD_YIELD for the other's wire
        before dialing.
        """
        if cookie == self._lsd_cookie:
            return  # our own announcement, looped back
        peer_id = lsd_peer_id(cookie)
        if peer_id is not None:
            self._lsd_endpoints.pop((peer_id, host), None)
            if len(self._lsd_endpoints) >= LSD_ENDPOINTS_KEPT:
                del self._lsd_endpoints[next(iter(self._lsd_endpoints))]
            self._lsd_endpoints[(peer_id, host)] = port
        if peer_id is not None and self.node.has_peer_id(peer_id):
            self.node.stats["lsd: already wired"] += 1
            return
        ours = peer_id is not None and peer_id[:3] == PEER_ID_PREFIX[:3]
        first = peer_id is None or (ours and peer_id > self.node.peer_id)
        self.add_peer(host, port, host, delay=0.0 if first else LSD_YIELD, peer_id=peer_id)

    def renew(self, address: str, quiet: float) -> int:
        """Close the wires claiming ``address`` that carried nothing for ``quiet`` seconds, and
        dial again those we dialed; the number closed.

        For a call to ``address`` that got no answer in time: a JS peer echoes every packet
        it reads, so its wire silent all the while no longer carries what it writes (the
        original JS master's stall: see ECHO_WINDOW), and a new wire does. A Python peer
        echoes nothing (pings every 30 s): its silence says nothing, and a slow master.py is
        never cut for it. WebTorrent dials again those it dialed (over uTP first: ~30 s); we
        dial again those we dialed, and the port the peer id of the others last announced by
        LSD from the host the wire came from (an announce is a claim: one from another host
        never reroutes the new wire).
        """
        now = time.monotonic()
        node = self.node
        silent = [c for c in node._connections
                  if c.address == address and c.state is ConnState.OPEN and now - c.last_in >= quiet
                  and not (c.wire.remote_peer_id or b"").startswith(PYTHON_PEER_PREFIX)]
        for conn in silent:
            node.stats["silent wires renewed"] += 1
            node._log(logging.INFO, "silent wire", "closing %s: %s did not answer, and nothing came by it "
                      "for %.0f s; a new wire takes its place", conn.peer_name, address, now - conn.last_in)
            conn.close()
            endpoint = conn.dialed
            if endpoint is None and conn.remote_host:  # not where anyone else's LSD announce says
                host = conn.remote_host.removeprefix("::ffff:")  # a dual-stack socket's IPv4 peer
                endpoint = self.lsd_endpoint(conn.wire.remote_peer_id, host)
            if endpoint:
                self.add_peer(*endpoint)
        return len(silent)

    def lsd_endpoint(self, peer_id: bytes | None, host: str) -> Addr | None:
        """Where ``peer_id`` last announced itself by LSD from ``host`` (a claim: whoever answers
        there still has to prove itself; an announce from another host is not used), or None."""
        port = self._lsd_endpoints.get((peer_id or b"", host))
        return (host, port) if port else None

    async def _start_lsd(self) -> None:
        try:
            sock = _lsd_socket(self.node.host)
        except OSError as exc:
            log.warning("LSD is off: %s", exc)
            return
        loop = asyncio.get_running_loop()
        self._lsd_transport, _ = await loop.create_datagram_endpoint(
            lambda: _LsdProtocol(self), sock=sock)
        self.node._spawn(self._lsd_announce())

    async def _lsd_announce(self) -> None:
        datagram = lsd_announcement(self.node.infohash, self.node.port, self._lsd_cookie)
        # Twice more early on: a peer that started at the same instant may not
        # have joined the group yet (bittorrent-lsd announces once, then every 5 min).
        for delay in itertools.chain((1.0, 4.0), itertools.repeat(LSD_INTERVAL)):
            if self._lsd_transport is None or self.node.closed:
                return
            with contextlib.suppress(OSError):
                self._lsd_transport.sendto(datagram, (LSD_HOST, LSD_PORT))
            await asyncio.sleep(delay)

    # DHT (BEP 5)
    async def _start_dht(self) -> None:
        """A DHT node on the TCP port's number if free (one port to forward), else any."""
        ports = [self.node.dht_port] if self.node.dht_port is not None else [self.node.port, 0]
        for port in ports:
            dht = Dht(dht_node_id(self.node.seed), host=self.node.host, port=port,
                      bootstrap=self.node.dht_bootstrap, on_peers=self._on_dht_peers)
            try:
                self.dht = await dht.start()
                break
            except OSError as exc:
                log.warning("DHT: udp port %s: %s", port, exc)
        if self.dht is not None:
            self.node._spawn(self._dht_lookups())

    async def _dht_lookups(self) -> None:
        """Look our swarm up (announcing our TCP port) at start, again soon, then periodically."""
        assert self.dht is not None
        port = self.node.port if self.node.listen else None
        waited = 0.0
        for at in DHT_LOOKUP_AT:
            await asyncio.sleep(at - waited)
            waited = at
            self.dht.get_peers(self.node.infohash, port)
        while not self.node.closed:
            await asyncio.sleep(DHT_LOOKUP_INTERVAL if self.node.connections() else DHT_LOOKUP_ALONE)
            self.dht.get_peers(self.node.infohash, port)

    def _on_dht_peers(self, info_hash: bytes, peers: list[Addr], source: Addr | None = None) -> None:
        """Queue dials to what a lookup found, but not to an address that already dialed us.

        Its listening port is unknown, so the same peer would be dialed again at
        every lookup and one of the two wires closed as a duplicate. The node that
        named them is their source in the DialQueue: one node answering first with
        peers that hang gets its turn, not every dial."""
        if info_hash != self.node.infohash:
            return
        callers = {c.remote_host for c in self.node._connections if not c.initiator and c.remote_host}
        for host, port in peers[:DHT_MAX_VALUES]:
            if host not in callers:
                self.add_peer(host, port, "dht %s" % (source[0] if source else "?"))

    def on_dht_port(self, conn: Connection, port: int) -> None:
        """A peer's BEP 5 port message: its DHT node goes into our routing table."""
        if self.dht is not None and conn.remote_host and 0 < port < 65536:
            # A dual-stack socket names IPv4 peers ::ffff:a.b.c.d; our DHT speaks IPv4.
            self.dht.add_node((conn.remote_host.removeprefix("::ffff:"), port))


class Bugout:
    """A bugout peer on asyncio: the JS Bugout's API over TCP, LSD, the DHT and WebRTC.

    ``Bugout(identifier, settings)``, or ``Bugout(identifier, **options)``
    with the node's fields of :class:`Settings` (``NODE_SETTINGS``: ``host``,
    ``port``, ``peers``, ``lsd``, ``dht``, ...; .env is not read).
    ``announce_interval`` goes to :class:`WebRtcTransport`;
    ``handshake_timeout`` is the time a new wire has to speak bugout. Events:
    ``seen``, ``left``, ``message``, ``ping``, ``rpc``, ``wireseen``,
    ``wireleft``, ``connections`` (the theory of operation above says when
    each comes).
    """

    def __init__(self, identifier: str, settings: Settings | None = None, *,
                 heartbeat: float = 30.0, timeout_ms: int = PEER_TIMEOUT_MS, listen: bool = True,
                 announce_interval: float | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, **options: Any) -> None:
        settings = Settings.of(settings, {}, node_options(options))
        max_message = settings.max_message
        #: the settings it was made with (the node's fields are the ones it reads)
        self.settings = settings
        self.identifier = identifier
        self.identity = Identity(settings.seed)
        self.core = BugoutCore(identifier, self.identity, timeout_ms=timeout_ms, max_json=max_message)
        self.infohash, self.metadata = infohash_of(identifier)
        self.peer_id = make_peer_id()
        self.host, self.port, self.listen = settings.host, settings.port, listen
        self.lsd, self.heartbeat, self.max_message = settings.lsd, heartbeat, max_message
        self.max_inbound, self.handshake_timeout = settings.max_inbound, handshake_timeout
        #: bytes of our own payloads one wire may leave unread; bytes waiting in all send
        #: queues; bytes of messages partly received on all wires
        self.max_send_queue = max_message + (1 << 20)
        self.max_send_total = max_message + (16 << 20)
        self.max_partial = max_message + (1 << 20)
        self.static_peers = [_split_hostport(p) for p in settings.peers]
        #: DHT discovery: on/off, bootstrap host:port list, UDP port (None: the TCP port's number)
        self.dht, self.dht_port = settings.dht, settings.dht_port
        self.dht_bootstrap = list(settings.dht_bootstrap)
        for entry in self.dht_bootstrap:
            _split_hostport(entry)
        #: counters: connections refused, peers dropped, ... (with core.stats)
        self.stats: collections.Counter = collections.Counter()
        # private
        self._api: dict[str, Handler] = {}
        self._listeners: dict[str, list[Callable]] = collections.defaultdict(list)
        self._pending: dict[bytes, asyncio.Future] = {}
        self.core.awaiting = self._pending  # answers to nothing we asked are dropped unread
        self._calls: dict[bytes, str] = {}  # nonce -> the address an RPC of ours waits on
        self._unsent: dict[bytes, tuple[str, Any]] = {}  # nonce -> (call, args), until sent again once
        self._connections: set[Connection] = set()
        self._busy: collections.Counter = collections.Counter()  # addresses with calls in flight
        #: our payloads for a busy address that left while no wire led to it: sent again on the
        #: first wire that comes claiming it (a master dialing in after a failover call went out)
        self._wireless: dict[str, collections.deque] = {}
        self._accepting = 0  # accepted sockets whose connection is being made
        self._tasks: set[asyncio.Task] = set()
        self._acceptor: _Acceptor | None = None
        self._extended = {"ek": self.identity.ek, "id": identifier, "m": OUR_EXT_IDS,
                          "metadata_size": len(self.metadata), "pk": self.identity.pk}
        #: which wire is whose: duplicates, routes, protection (the node asks it, it keeps no socket)
        self.policy = WirePolicy()
        #: who is let in at the inbound caps, which wire makes room (it closes nothing)
        self.slots = InboundSlots(lambda conn: self.policy.keeps(conn, self._busy), self.stats)
        self.lane = SlowLane(Connection.handle_waiting, _call_later)
        self._policy_timer: asyncio.TimerHandle | None = None
        self._policy_at = 0.0  # when the policy timer fires
        self._out_estimate = 0  # bytes in all send queues, at most (recounted once per loop turn)
        self._recounted = False
        self._log = _LogLimit()
        self._hello_timer: asyncio.TimerHandle | None = None
        self._closed = False
        #: finding peers and dialing them: ``peers``, LSD, the DHT
        self.discovery = Discovery(self)
        #: WebRTC through WebSocket trackers (off without trackers)
        self.webrtc = WebRtcTransport(self, settings, announce_interval=announce_interval)

    @property
    def address(self) -> str:
        """Our bugout address."""
        return self.identity.address

    @property
    def seed(self) -> str:
        return self.identity.seed

    @property
    def peers(self) -> dict[str, PeerKeys]:
        return self.core.peers

    @property
    def closed(self) -> bool:
        """True once :meth:`close` began."""
        return self._closed

    def connections(self) -> int:
        """Number of open wires that speak bugout."""
        return sum(1 for c in self._connections if c.state is ConnState.OPEN and not c.closing)

    def links(self) -> list[Connection]:
        """Every connection not closed yet (in any state)."""
        return [c for c in self._connections if c.state is not ConnState.CLOSED]

    def has_wire(self, address: str) -> bool:
        """True when an open wire claims to lead to ``address``."""
        return any(c.address == address and c.state is ConnState.OPEN and not c.closing
                   for c in self._connections)

    def has_signed_wire(self, address: str) -> bool:
        """True when an open wire stands for ``address``: a fresh packet that peer signed came by
        it first (or its answer to a call of ours), and has not moved to another wire since.
        Not a wire that only says so in its handshake (as has_wire), nor one that replays."""
        conn = self.policy.direct(address)
        return conn is not None and conn.state is ConnState.OPEN and not conn.closing

    def renew_silent_wires(self, address: str, quiet: float) -> int:
        """Close and dial again the wires claiming ``address`` silent for ``quiet`` s (Discovery.renew)."""
        return self.discovery.renew(address, quiet)

    def has_peer_id(self, peer_id: bytes) -> bool:
        """True when a connection not closed has this BitTorrent peer id."""
        return any(c.wire.remote_peer_id == peer_id and c.state is not ConnState.CLOSED
                   for c in self._connections)

    # priorities
    @property
    def protected(self) -> frozenset[str]:
        """The addresses given to :meth:`prioritize`."""
        return self.policy.protected

    def prioritize(self, *addresses: str) -> None:
        """Protect these peers' traffic (say, the current master's); replaces the earlier set.

        The wire a protected peer's packets come by is handled whole each loop
        turn (no budget), is never closed to make room, and takes relays only
        while its queue is nearly empty: a flood is dropped before it delays
        or closes it. Its peers are never evicted from the table.
        """
        self.policy.protected = frozenset(addresses)
        self.core.protected = set(addresses)
        self.discovery.prefer_dials()

    def is_protected(self, conn: Connection) -> bool:
        """True when ``conn`` is a protected peer's route: the wire that stands for it, else the
        one its newest fresh packet came by (WirePolicy.route)."""
        return self.policy.is_protected(conn)

    # lifecycle
    async def start(self) -> Bugout:
        """Listen, start discovery and the timers."""
        loop = asyncio.get_running_loop()
        if self.listen:
            infos = await loop.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            socks = _listen_sockets(infos, self.port)
            self.port = socks[0].getsockname()[1]
            self._acceptor = _Acceptor(self, socks)
            self._acceptor.start()
            log.info("listening on %s:%d", self.host, self.port)
        await self.discovery.start()
        await self.webrtc.start()
        self._spawn(self._timers())
        return self

    async def close(self) -> None:
        """Say goodbye (``x``), close wires and tasks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for timer in (self._hello_timer, self._policy_timer):
            if timer is not None:
                timer.cancel()
        self.core.send_leave(_now())
        self._flush_core()
        if self._acceptor is not None:
            self._acceptor.close()
        self.discovery.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.discovery.close()
        await asyncio.sleep(0)  # let transports write the goodbye
        await self.webrtc.close()
        for conn in list(self._connections):
            conn.close()
        for future in self._pending.values():
            future.cancel()

    def _spawn(self, coro: Awaitable) -> asyncio.Task:
        return spawn(coro, self._tasks, "internal")

    # API as in JS bugout
    def on(self, event: str, callback: Callable) -> None:
        """Subscribe to an event (the theory of operation above lists them)."""
        self._listeners[event].append(callback)

    def emit(self, event: str, *args: Any) -> None:
        for callback in list(self._listeners.get(event, ())):
            try:
                result = callback(*args)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:  # noqa: BLE001 - a listener's bug must not break the wire
                self._log(logging.ERROR, "listener " + event, "listener for %s failed", event,
                          exc_info=True)

    def register(self, name: str, handler: Handler) -> None:
        """Serve RPC ``name``: ``handler(address, args)`` returns (or awaits) the answer."""
        self._api[name] = handler

    async def rpc(self, address: str, call: str, args: Any = None,
                  timeout: float | None = 30.0) -> Any:
        """Call ``call`` on ``address`` and await its JSON answer.

        Raises RpcTimeout when no answer comes in ``timeout`` seconds, and its
        subclass RpcUnreachable at once when no wire is open (or all close).
        """
        if not self._connections:
            raise RpcUnreachable(f"{call} on {address}: no wire is open")
        nonce = self.core.send_call(address, call, {} if args is None else args, _now())
        future = asyncio.get_running_loop().create_future()
        self._pending[nonce] = future
        self._calls[nonce] = address
        self._unsent[nonce] = (call, args)
        self._busy[address] += 1
        self._flush_core()
        try:
            async with asyncio.timeout(timeout):
                return await future
        except RpcUnreachable as exc:
            raise RpcUnreachable(f"{call} on {address}: {exc}") from None
        except TimeoutError:
            raise RpcTimeout(f"{call} on {address}: no answer in {timeout}s") from None
        finally:
            self._pending.pop(nonce, None)
            self._calls.pop(nonce, None)
            self._unsent.pop(nonce, None)
            self._not_busy(address)

    async def room_for(self, address: str, size: int) -> bool:
        """Wait (ECHO_WAIT at most) until ``size`` bytes of ours for ``address`` would leave at
        once rather than wait for echoes on its wires; True if they would now, False if the time
        ran out first. What waits for room stays with the caller (a result in the journal), not
        in a send queue that a crash would lose: on False, the caller keeps it and asks again."""
        deadline = time.monotonic() + ECHO_WAIT
        waited = False
        while not (room := all(c.sends_at_once(size) for c in self.policy.targets(address)[0]
                               if c.state is ConnState.OPEN)) and time.monotonic() < deadline:
            waited = True
            await asyncio.sleep(ECHO_POLL)
        if waited:
            self.stats["waits for echo room"] += 1
        return room

    def rpc_nowait(self, address: str, call: str, args: Any = None) -> None:
        """Call ``call`` on ``address`` without waiting for an answer."""
        self.core.send_call(address, call, {} if args is None else args, _now())
        self._flush_core()

    def send(self, message: Any, address: str | None = None) -> None:
        """Broadcast a JSON message, or send it encrypted to one address."""
        self.core.send_message(message, _now(), address)
        self._flush_core()

    def ping(self) -> None:
        """Broadcast a ping."""
        self.core.send_ping(_now())
        self._flush_core()

    # connections: what transports call
    def new_wire(self, initiator: bool) -> PeerWire:
        """A PeerWire for a new connection, with our handshakes in it."""
        return PeerWire(self.infohash, self.peer_id, self._extended, initiator=initiator,
                        metadata=self.metadata, max_message=self.max_message,
                        dht_port=self.discovery.dht.port if self.discovery.dht is not None else None)

    _new_wire = new_wire

    def attach(self, conn: Connection) -> None:
        """A connection's stream is up: it takes part from now on."""
        self._connections.add(conn)

    def detach(self, conn: Connection) -> None:
        """A connection's stream is gone: forget it, and tell who cares."""
        self.holding(conn, 0)
        self.policy.closed(conn)
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        self.emit("connections", self.connections())
        if conn.address and not any(c.address == conn.address for c in self._connections):
            self.emit("wireleft", conn.address)
        if not self._connections:
            self._fail_pending("every wire closed")
        self._weigh_wires()

    def wire_events(self, conn: Connection, events: list) -> None:
        """Act on what a connection's PeerWire parsed, then send what that made."""
        for event in events:
            if conn.state is ConnState.CLOSED:
                break
            if isinstance(event, ExtensionPayload):
                now_ms = _now()
                found = self.core.receive_payload(event.payload, now_ms, conn, conn.source)
                if self.core.verified is not None:
                    conn.last_verified = now = time.monotonic()
                    self.policy.packet(conn, self.core.verified, now, now_ms)
                    if self.core.verified.address == conn.address and self.policy.stands(conn):
                        self.discovery.remember(conn)
                elif self.core.copied is not None:
                    self.policy.packet(conn, self.core.copied, time.monotonic(), now_ms, copy=True)
                if found:
                    self._dispatch(found)
            elif isinstance(event, Handshake):
                if event.peer_id == self.peer_id:
                    conn.close()  # we dialed ourselves
            elif isinstance(event, ExtendedHandshake):
                self._on_extended(conn, event.fields)
            elif isinstance(event, DhtPort):
                self.discovery.on_dht_port(conn, event.port)
        self._weigh_wires()
        self._flush_core()

    def wire_eof(self, conn: Connection) -> None:
        """The peer half-closed ``conn``: it drains it (a duplicate, as it sees it)."""
        self.policy.peer_eof(conn)
        self._weigh_wires()

    def _weigh_wires(self) -> None:
        """Drain what the wire policy says to; wake up again when its next deadline passes."""
        now = time.monotonic()
        for conn, why in self.policy.due(now):
            self.stats["duplicate wires" if why == "duplicate" else "wires drained: claim not proven"] += 1
            log.debug("%s drains: %s", conn.peer_name, why)
            conn.drain()
        when = self.policy.next_due()
        if when is None or self._closed or (self._policy_timer is not None and self._policy_at <= when):
            return
        if self._policy_timer is not None:
            self._policy_timer.cancel()
        self._policy_at = when
        self._policy_timer = asyncio.get_running_loop().call_later(max(when - now, 0.0), self._policy_due)

    def _policy_due(self) -> None:
        self._policy_timer = None
        self._weigh_wires()
        self._flush_core()

    def has_twin(self, conn: Connection) -> bool:
        """True when another connection not closed leads to the same peer id."""
        peer_id = conn.wire.remote_peer_id
        return peer_id is not None and any(
            c is not conn and c.wire.remote_peer_id == peer_id and c.state is not ConnState.CLOSED
            for c in self._connections)

    def holding(self, conn: Connection, size: int) -> None:
        """``conn`` holds ``size`` bytes of messages not complete (or not handled) yet.

        Past ``max_partial`` on all wires together, the unprotected wire that
        holds most is closed, until the rest fits (WirePolicy.hold).
        """
        for victim, held in self.policy.hold(conn, size, self.max_partial):
            self.stats["peers dropped: partial messages over the bound"] += 1
            self._log(logging.INFO, "held", "closing %s: %d bytes of unfinished messages, more "
                      "than all wires may hold", victim.peer_name, held)
            victim.close(abort=True)

    def bad_input(self, conn: Connection) -> None:
        """The peer broke the wire protocol: drop it."""
        self.stats["peers dropped for bad input"] += 1
        self._log(logging.INFO, "bad input", "dropping peer %s: %s", conn.peer_name, conn.wire.error)
        conn.close()

    def wire_failed(self, conn: Connection) -> None:
        """A bug of ours while handling a peer's bytes: that peer goes, the node stays."""
        self.stats["peers dropped for an internal error"] += 1
        self._log(logging.ERROR, "wire failed", "peer %s closed after an internal error",
                  conn.peer_name, exc_info=True)
        conn.close(abort=True)

    # connections: inbound slots (InboundSlots decides, these close)
    def accepted(self, sock: socket.socket, addr: Any) -> bool:
        """A TCP connection came in: within the caps (InboundSlots) it becomes a WireConnection.

        Else it is closed, and False asks the acceptor to pause a while; not
        for a host over its own limit: the callers behind it are let in.
        """
        host = str(addr[0]) if addr else "?"
        crowded = self.slots.crowded(self._inbound(host), time.monotonic())
        if self._closed or crowded or not self._make_room():
            self.stats["inbound refused"] += 1
            sock.close()
            return crowded and not self._closed
        sock.setblocking(False)
        self._accepting += 1
        self._spawn(self._accept(sock))
        return True

    async def _accept(self, sock: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: WireConnection(self, False), sock)
        except OSError as exc:
            log.debug("accepted connection lost: %s", exc)
            sock.close()
        finally:
            self._accepting -= 1

    def _inbound(self, host: str | None = None) -> list[Connection]:
        """Inbound TCP connections not closed (from ``host`` only, if given)."""
        return [c for c in self._connections if not c.initiator and c.remote_host is not None
                and c.state is not ConnState.CLOSED and (host is None or c.remote_host == host)]

    def _host_has_room(self, conn: Connection) -> bool:
        """A wire from ``conn``'s host finished its handshake: one of the host's others may make
        room for it (InboundSlots.host_room), else it goes. False if it went."""
        if conn.initiator or conn.remote_host is None:
            return True
        ok, victim = self.slots.host_room(self._inbound(conn.remote_host), time.monotonic())
        if not ok or victim is not None:
            (victim or conn).close(abort=True)
        return ok

    def _make_room(self) -> bool:
        """Room for one more inbound connection (InboundSlots.make_room)? At the cap, one goes."""
        inbound = self._inbound()
        ok, victim = self.slots.make_room(inbound, self._accepting, self.max_inbound, time.monotonic())
        if victim is not None:
            victim.close(abort=True)
        elif not ok:
            self._log(logging.WARNING, "inbound cap", "refusing connections for now: %d inbound, "
                      "%d of them without a handshake yet (maxInbound %d)", len(inbound),
                      sum(1 for c in inbound if c.state is ConnState.HANDSHAKE), self.max_inbound)
        return ok

    def cannot_accept(self, exc: OSError, pause: float) -> None:
        """Accepting failed (out of descriptors, say): one log line per interval."""
        self.stats["accept failures"] += 1
        self._log(logging.WARNING, "accept", "cannot accept connections: %s; pausing %.1f s", exc, pause)
        pending = [c for c in self._connections if c.state is ConnState.HANDSHAKE
                   and not c.initiator and c.remote_host is not None]
        if exc.errno in _OUT_OF_RESOURCES and pending:  # a descriptor back for a peer that speaks
            min(pending, key=lambda c: c.started).close(abort=True)

    def add_peer(self, host: str, port: int, source: str | None = None, *, delay: float = 0.0,
                 peer_id: bytes | None = None) -> None:
        """Dial ``host:port`` once, in the background, when its turn comes (Discovery.add_peer)."""
        self.discovery.add_peer(host, port, source, delay=delay, peer_id=peer_id)

    def _fail_pending(self, why: str, address: str | None = None) -> None:
        """No wire is left to bring an answer (or, with ``address``, that peer said goodbye):
        waiting RPCs (to it) fail now, not at their timeout."""
        for nonce, future in self._pending.items():
            if not future.done() and address in (None, self._calls.get(nonce)):
                future.set_exception(RpcUnreachable(why))

    # handshakes
    def _on_extended(self, conn: Connection, fields: dict) -> None:
        pk, ek = fields.get("pk"), fields.get("ek")
        bugout = (isinstance(pk, bytes) and isinstance(ek, bytes)
                  and fields.get("id") in (None, self.identifier.encode("utf-8")))
        if bugout and conn.address is None:  # the first claim is the one the policy weighs
            with contextlib.suppress(DecodeError):
                conn.address = address_of(b58decode(pk))
        if conn.wire.ready and conn.state is ConnState.HANDSHAKE:
            conn.set_open()
            if not self._host_has_room(conn):
                return
            self._opened(conn, ek if bugout else None)
        if not bugout:
            return  # not a bugout peer of our swarm: nothing to learn
        events = self.core.saw_peer(pk.decode("latin-1"), ek.decode("latin-1"), _now())
        self.emit("connections", self.connections())
        self._dispatch(events)
        if conn.address and conn.address != self.address and conn.state is ConnState.OPEN:
            for payload in self._wireless.pop(conn.address, ()):
                self._send_own(conn, payload)
            self.emit("wireseen", conn.address)

    def _opened(self, conn: Connection, ek: bytes | None) -> None:
        """Tell the wire policy; a Python peer not wired yet gets a hello (a ping boxed for it).

        A JS peer gets what JS bugout sends on a new wire: its ping to all wires
        when the peer is new to it (saw_peer), nothing otherwise.
        """
        remote = conn.wire.remote_peer_id or b""
        address = conn.address if conn.address != self.address else None
        python = remote.startswith(PYTHON_PEER_PREFIX) and ek is not None
        if self.policy.opened(conn, address, self.peer_id if conn.initiator else remote, conn.dialer_port,
                              time.monotonic(), python) and ek is not None:
            with contextlib.suppress(DecodeError):
                conn.send_payload(self.core.hello_for(ek.decode("latin-1"), _now()))
                self.stats["hellos sent"] += 1

    # sending
    def _flush_core(self) -> None:
        """Send what the core queued: our own payloads go, relays only where they delay nothing.

        One of ours boxed for a peer goes by its route (WirePolicy.targets):
        its own wire alone when one stands for it; else the wire its newest
        packet came by and any wire claiming it; only while there is none, to
        every other wire as spare traffic (as JS bugout floods everything).
        """
        if self.core.hello_due and self._hello_timer is None:
            self._hello_timer = asyncio.get_running_loop().call_later(HELLO_GAP_MS / 1000, self._hello)
        for out in self.core.data_to_send():
            if out.to is not None and not out.relay:
                self._send_to(out.to, out.payload, out.origin)
                continue
            for conn in self._connections:
                if conn is out.origin or conn.state is not ConnState.OPEN:
                    continue
                if out.relay:
                    self._send_spare(conn, out.payload, relay=True)
                else:
                    self._send_own(conn, out.payload)

    def _send_to(self, address: str, payload: bytes, origin: Any) -> None:
        """Our payload boxed for ``address``: by its route, or (no route known) to every wire."""
        wires, flood = self.policy.targets(address)
        for conn in wires:
            if conn.state is ConnState.OPEN:
                self._send_own(conn, payload)
        if flood:
            if address in self._busy and not self.has_wire(address):  # for the wire it dials in by
                self._wireless.setdefault(address, collections.deque(maxlen=WIRELESS_KEPT)).append(payload)
            for conn in self._connections:
                if conn is not origin and conn.state is ConnState.OPEN:
                    self._send_spare(conn, payload)

    def _hello(self) -> None:
        self._hello_timer = None
        if not self._closed:
            self.core.tick(_now())
            self._flush_core()

    def _send_own(self, conn: Connection, payload: bytes) -> None:
        """Our payload for this wire's peer (or for all): a wire that stopped reading is closed."""
        if conn.buffered > self.max_send_queue:
            self.stats["peers dropped: not reading"] += 1
            self._log(logging.INFO, "not reading", "closing %s: %d bytes it does not read",
                      conn.peer_name, conn.buffered)
            conn.close(abort=True)
            return
        conn.send_payload(payload, own=True)
        self._out_estimate += len(payload)
        if self._out_estimate > self.max_send_total:
            self._trim_send_queues()

    def _send_spare(self, conn: Connection, payload: bytes, relay: bool = False) -> None:
        """A relay, or ours passing this wire for another peer: dropped where it would wait,
        and relays beyond RELAY_WRITES_PER_SECOND (a flood fanned out to every wire)."""
        why = self.policy.spare(conn, len(payload), conn.buffered, self._sends_waiting, relay, time.monotonic())
        if why is not None:
            self.stats["relays dropped: " + why] += 1
            return
        conn.send_payload(payload)
        self._out_estimate += len(payload)

    def _sends_waiting(self) -> int:
        """Bytes in all send queues, at most (counted again at most once per loop turn)."""
        if self._out_estimate > RELAY_TOTAL and not self._recounted:
            self._recount()
        return self._out_estimate

    def _recount(self) -> None:
        self._out_estimate = sum(c.buffered + c.paced_bytes for c in self._connections)
        self._recounted = True
        asyncio.get_running_loop().call_soon(setattr, self, "_recounted", False)

    def _trim_send_queues(self) -> None:
        """All send queues together past ``max_send_total`` (what waits for echoes counts): the
        unprotected wire with most goes."""
        self._recount()
        while self._out_estimate > self.max_send_total:
            sizes = {c: c.buffered + c.paced_bytes for c in self._connections if c.state is not ConnState.CLOSED}
            victim = self.policy.largest(sizes)
            if victim is None:
                return
            self.stats["peers dropped: send queues full"] += 1
            self._log(logging.INFO, "send queues", "closing %s: %d bytes waiting for it, more than "
                      "all wires may hold", victim.peer_name, sizes[victim])
            self._out_estimate -= sizes[victim]
            victim.close(abort=True)

    def _dispatch(self, events: list) -> None:
        for event in events:
            if isinstance(event, Response):
                future = self._pending.get(event.nonce)
                if future is not None and not future.done():
                    future.set_result(event.result)
            elif isinstance(event, Call):
                self._serve(event)
            elif isinstance(event, Seen):
                self.emit("seen", event.address)
            elif isinstance(event, Message):
                self.emit("message", event.address, event.value)
            elif isinstance(event, Ping):
                self.emit("ping", event.address)
            elif isinstance(event, Left):
                if event.reason == "left":  # its goodbye: a restart of it answers none of them
                    self._fail_pending("it said goodbye", event.address)
                self.emit("left", event.address)
            elif isinstance(event, Rekeyed):
                self._send_again(event.address)

    def _send_again(self, address: str) -> None:
        """``address`` started again (kill -9: no goodbye; its new wire is up): our calls to it
        waiting for an answer were boxed for its old key, which the new process cannot open, so
        they go again now, boxed for the new one, under their nonces. Once each: a replayed
        packet of the old process (old key) then costs nothing more."""
        for nonce, peer in list(self._calls.items()):
            if peer == address and (unsent := self._unsent.pop(nonce, None)) is not None:
                self.core.send_call(address, *unsent, _now(), nonce=nonce)
                self.stats["calls sent again: the peer started again"] += 1

    def _serve(self, call: Call) -> None:
        """Answer a call: its handler's result, or bugout's error for unknown names."""
        if self._closed:  # we said goodbye: an answer now would make us "seen" again
            return
        self.emit("rpc", call.address, call.name, call.args)
        handler = self._api.get(call.name)
        if handler is None:
            self._answer(call, {"error": "No such API call."})
            return
        try:
            result = handler(call.address, call.args)
        except Exception as exc:  # noqa: BLE001 - a handler's error is its answer (logged, limited)
            self._log(logging.ERROR, "rpc failed", "rpc %s failed", call.name, exc_info=True)
            result = {"error": f"{exc.__class__.__name__}: {exc}"}
        if inspect.isawaitable(result):
            self._spawn(self._answer_later(call, result))
        elif result is not NO_ANSWER:
            self._answer(call, result)

    async def _answer_later(self, call: Call, pending: Awaitable) -> None:
        self._busy[call.address] += 1
        try:
            result = await pending
        except Exception as exc:  # noqa: BLE001 - as in _serve
            self._log(logging.ERROR, "rpc failed", "rpc %s failed", call.name, exc_info=True)
            result = {"error": f"{exc.__class__.__name__}: {exc}"}
        finally:
            self._not_busy(call.address)
        if result is not NO_ANSWER:
            self._answer(call, result)
            self._flush_core()

    def _answer(self, call: Call, result: Any) -> None:
        if call.address in self.core.peers:
            self.core.send_response(call.address, call.nonce, result, _now())

    def _not_busy(self, address: str) -> None:
        self._busy[address] -= 1
        if self._busy[address] <= 0:
            del self._busy[address]
            self._wireless.pop(address, None)

    # timers
    async def _timers(self) -> None:
        """Heartbeat pings, peer expiry, keep-alives, and messages that stopped coming."""
        next_ping = time.monotonic() + self.heartbeat
        while not self._closed:
            await asyncio.sleep(min(self.heartbeat, KEEPALIVE_SECONDS, 5.0))
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + self.heartbeat
                self.core.send_ping(_now())
                self._dispatch(self.core.expire(_now()))
                self._flush_core()
                self.policy.forget(self.core.peers)
            self.check_wires(now)

    def check_wires(self, now: float) -> None:
        """Close the wires whose message stopped coming (never a protected peer's: slow is not
        hostile, its RPC timeouts decide); keep-alives where due."""
        for conn in list(self._connections):
            if conn.stalled(now) and not self.is_protected(conn):
                self.stats["peers dropped: stalled message"] += 1
                self._log(logging.INFO, "stalled", "closing %s: its message stopped coming",
                          conn.peer_name)
                conn.close(abort=True)
            elif conn.state is ConnState.OPEN and now - conn.last_keepalive >= KEEPALIVE_SECONDS:
                conn.send_keepalive()

# Earlier ways to the same: kept for callers of version 0.1.

def bugout_from_env(token: str, env: dict[str, str], **options: Any) -> Bugout:
    """``Bugout(token, Settings.load(env, **options))``."""
    return Bugout(token, Settings.load(env, **node_options(options)))


def dht_options(env: dict[str, str], dht: bool | None = None, bootstrap: Iterable[str] | None = None,
                port: int | None = None) -> dict:
    """Bugout's DHT keyword arguments, as :meth:`Settings.load` reads them."""
    found = Settings.load(env, dht=dht, dht_bootstrap=bootstrap, dht_port=port)
    return {"dht": found.dht, "dht_bootstrap": list(found.dht_bootstrap), "dht_port": found.dht_port}


# Status: metrics and health over HTTP #######################################
#
# ``statusPort`` serves two pages on the worker's own event loop, stdlib only:
# ``GET /metrics`` in the Prometheus text format (version 0.0.4) and ``GET
# /healthz`` (200 with a small JSON body while the loop runs and a proven
# master is connected, 503 with the reason otherwise); anything else is 404.
# A client gets STATUS_READ_TIMEOUT seconds and STATUS_MAX_REQUEST bytes to
# send its request, and at most STATUS_MAX_CLIENTS are served at once (at the
# cap, the oldest client still sending its request makes room), so a slow or
# hostile one costs nothing but its own connection, and cannot keep a scraper out.

STATUS_READ_TIMEOUT = 5.0
STATUS_MAX_REQUEST = 8192
STATUS_MAX_CLIENTS = 8
#: Seconds between two status lines (at info, and only when something happened).
STATUS_LINE_SECONDS = 60.0
#: Error types counted apart in /metrics; the rest count as "other".
MAX_ERROR_TYPES = 32
#: Upper bounds (seconds) of the job-duration and delivery-latency histograms.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)


class Histogram:
    """A Prometheus histogram: counts per upper bound, their sum and count."""

    def __init__(self, buckets: Iterable[float] = DURATION_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Exposition:
    """Builds the Prometheus text format: HELP, TYPE, then samples."""

    def __init__(self, prefix: str = "qx_") -> None:
        self.prefix = prefix
        self._lines: list[str] = []

    def add(self, name: str, kind: str, help_text: str, samples: Any) -> None:
        """``samples``: a number, or ``{labels dict as tuple pairs: value}``."""
        name = self.prefix + name
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        items = samples.items() if isinstance(samples, dict) else [((), samples)]
        for labels, value in items:
            self._lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, hist: Histogram) -> None:
        name = self.prefix + name
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        running = 0
        for bound, count in zip((*hist.buckets, float("inf")), hist.counts):
            running += count
            self._lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        self._lines += [f"{name}_sum {_number(hist.sum)}", f"{name}_count {hist.count}"]

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _labels(labels: Iterable[tuple[str, Any]]) -> str:
    pairs = [f'{key}="{_label_value(value)}"' for key, value in labels]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


def process_rss_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class StatusServer:
    """``GET /metrics`` and ``GET /healthz`` on the loop; bounded in time, size and clients."""

    def __init__(self, host: str, port: int, metrics: Callable[[], str],
                 health: Callable[[], tuple[bool, dict]]) -> None:
        self.host, self.port = host, port
        self.metrics, self.health = metrics, health
        #: requests served, refused (too many clients), and dropped (slow, too big, not HTTP)
        self.stats: collections.Counter = collections.Counter()
        # private
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()
        self._reading: dict[asyncio.Task, tuple[float, asyncio.StreamWriter]] = {}  # request not read yet

    async def start(self) -> StatusServer:
        self._server = await asyncio.start_server(self._accept, self.host, self.port,
                                                  limit=STATUS_MAX_REQUEST, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("status on http://%s:%d/metrics and /healthz", self.host, self.port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= STATUS_MAX_CLIENTS:
            if not self._reading:
                self.stats["refused"] += 1
                writer.close()
                return
            oldest = min(self._reading, key=lambda task: self._reading[task][0])
            _, slow = self._reading.pop(oldest)
            self.stats["dropped"] += 1
            oldest.cancel()
            slow.transport.abort()
        task = spawn(self._serve(reader, writer), self._clients, "status")
        self._reading[task] = (time.monotonic(), writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(STATUS_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                self._reading.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
                status, kind, body = self._answer(head)
                writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n" % (status, _REASONS[status], kind, len(body)) + body)
                await writer.drain()
            self.stats["served"] += 1
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            self.stats["dropped"] += 1
        finally:
            self._reading.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            writer.close()

    def _answer(self, head: bytes) -> tuple[int, bytes, bytes]:
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method == b"GET" and path == b"/metrics":
            return 200, b"text/plain; version=0.0.4; charset=utf-8", self.metrics().encode()
        if method == b"GET" and path == b"/healthz":
            ok, body = self.health()
            return (200 if ok else 503), b"application/json", json_dumps(body).encode()
        return 404, b"text/plain", b"not found\n"


_REASONS = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}


def sd_notify(message: str) -> None:
    """Tell systemd (``Type=notify``, ``WatchdogSec=``) how we are; nothing without it."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return
    address = "\0" + where[1:] if where.startswith("@") else where
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


# Worker: assets and dependencies ############################################

_REQUIREMENT = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"            # name
    r"(?:\[\s*[A-Za-z0-9._-]+(?:\s*,\s*[A-Za-z0-9._-]+)*\s*\])?"  # extras
    r"(?:\s*(?:===|==|~=|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"  # version
    r"(?:\s*,\s*(?:===|==|~=|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?")
#: The worker's own files (and any ``.qx-*`` name); earlier versions kept assets beside them.
_PROTECTED_NAMES = {".env", ".deps", ".assets.json", ".results.json"}
#: The master's files land in this subfolder of the worker folder, at their ``workerPath``: no
#: import of the worker's, of ``python -m worker`` or of a task child looks there (its name is
#: no Python identifier, so not even as a package); a task child finds task.py's folder after
#: the standard library (``_TASK_PATH_AT``).
ASSET_FOLDER = "master-files"
#: Names that steer imports wherever they are (node's packages, Python's bytecode, pip's
#: target): never an asset's, at any depth (compared case-folded).
_IMPORT_MACHINERY = {"node_modules", "__pycache__", ".deps"}


def check_requirement(text: Any) -> str:
    """A plain PEP 508 requirement (name, extras, version) or UnsafeAsset."""
    if not isinstance(text, str) or not _REQUIREMENT.fullmatch(text.strip()):
        raise UnsafeAsset(f"dependency {text!r} refused: only a plain requirement "
                          "(name, extras, version) is allowed")
    return text.strip()


def safe_asset_path(folder: Path, worker_path: Any) -> Path:
    """Where an asset is written: inside ``folder``'s ASSET_FOLDER, or UnsafeAsset.

    ``workerPath`` is relative to that folder and starts with ``/`` as the JS
    master sends it (``/workplace/task.js``: ``master-files/workplace/task.js``).
    ``..``, other absolute forms, links that lead out, and the names of
    ``_IMPORT_MACHINERY`` are refused. The name is the master's claim, sent in
    clear: a replayer may rename the master's files, and here no name it picks
    reaches an import of the worker's, its start, or a task child's stdlib.
    """
    if not isinstance(worker_path, str) or not worker_path.strip("/"):
        raise UnsafeAsset(f"asset path {worker_path!r} refused: empty or not text")
    relative = worker_path.removeprefix("/")
    parts = relative.split("/")
    if ("\0" in relative or "\\" in relative or relative.startswith("/")
            or re.match(r"^[A-Za-z]:", relative) or any(p in ("..", "") for p in parts)):
        raise UnsafeAsset(f"asset path {worker_path!r} refused: it leaves the worker folder")
    if any(p.casefold() in _IMPORT_MACHINERY for p in parts):
        raise UnsafeAsset(f"asset path {worker_path!r} refused: node_modules, __pycache__ and .deps "
                          "steer imports")
    root = (folder / ASSET_FOLDER).resolve()
    target = (root / relative).resolve()
    if target == root or root not in target.parents:
        raise UnsafeAsset(f"asset path {worker_path!r} refused: it leads out of the worker folder")
    return target


def move_earlier_assets(folder: Path, manifest: list[dict]) -> int:
    """Files an earlier version wrote beside the worker's own, as received, go to ASSET_FOLDER.

    Earlier versions wrote ``/workplace/task.js`` to ``folder/workplace/task.js``,
    where a name like ``argparse.py`` came before the standard library. Each file
    of the manifest that is there, and still hashes as received, moves (nothing
    of the worker's own); the folders it leaves empty go. Returns how many moved.
    """
    moved = 0
    for asset in manifest:
        relative = str(asset.get("workerPath", "")).removeprefix("/")
        old = folder / relative
        first = Path(relative).parts[0] if relative else ""
        if (first in _PROTECTED_NAMES or first.startswith(".qx-") or first == ASSET_FOLDER
                or old.resolve() == Path(__file__).resolve() or not old.is_file() or old.is_symlink()):
            continue
        try:
            new = safe_asset_path(folder, asset.get("workerPath"))
            if new.exists() or Helper.get_sha256(old) != asset.get("received"):
                continue
            new.parent.mkdir(parents=True, exist_ok=True)
            os.replace(old, new)
        except (UnsafeAsset, OSError):
            continue
        moved += 1
        _remove_empty_parents(old, folder)
    return moved


def _remove_empty_parents(path: Path, folder: Path) -> None:
    """Remove the folders above ``path`` that are empty, up to ``folder`` (kept)."""
    for parent in path.parents:
        if parent == folder or not parent.is_relative_to(folder):
            break
        with contextlib.suppress(OSError):
            parent.rmdir()


def _write_assets(files: list[tuple[Path, dict, bytes]]) -> None:
    """Write verified assets: (target, manifest entry, content) each."""
    for target, _, content in files:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


async def _install_finished(proc: asyncio.subprocess.Process, tool: str, missing: list[str]) -> bool:
    """Log pip's or npm's output (debug); on failure say so with its last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=5)
    assert proc.stdout is not None
    async for raw in proc.stdout:
        tail.append(raw.decode(errors="replace").rstrip())
        log.debug("%s: %s", tool, tail[-1])
    if await proc.wait() != 0:
        log.error("%s could not install %s (no network, no such package?):\n%s",
                  tool, ", ".join(missing), "\n".join(tail))
        return False
    log.info("installed %s", ", ".join(missing))
    return True


def requirement_satisfied(requirement: str, paths: list[str]) -> bool:
    """True when a distribution meeting ``requirement`` is importable from ``paths``."""
    from importlib import metadata
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)  # type: ignore[union-attr]
    wanted = re.sub(r"[-_.]+", "-", name).lower()
    for dist in metadata.distributions(path=paths):
        if re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() == wanted:
            return _version_ok(dist.version, requirement[len(name):])
    return False


def _version_ok(version: str, spec: str) -> bool:
    """True when ``version`` meets ``spec`` (``>=1.26,<2``, extras ignored) by PEP 440's rules.

    pip's own ``packaging`` decides (zero padding, ``~=``, pre-releases); where
    it cannot be had, or either side does not parse, False: pip is asked.
    """
    try:
        from packaging.specifiers import Specifier, SpecifierSet
        from packaging.version import Version
    except ImportError:
        try:
            from pip._vendor.packaging.specifiers import Specifier, SpecifierSet
            from pip._vendor.packaging.version import Version
        except ImportError:
            return False
    try:
        wanted = SpecifierSet(re.sub(r"\[.*?\]", "", spec).strip())
        if not all(type(clause) is Specifier for clause in wanted):  # packaging < 22: LegacySpecifier
            return False
        return wanted.contains(Version(version), prereleases=True)
    except ValueError:  # InvalidSpecifier, InvalidVersion
        return False


# npm package name (validate-npm-package-name: URL-safe, no leading . or _,
# legacy capitals allowed), optional @scope/, optional @version, range or tag.
# No ``:``, ``/`` or ``#`` after the name: no URLs, paths, git or aliases; no
# `` -x`` inside a range: nothing that reads like an option.
_NPM_PACKAGE = re.compile(
    r"(?!.*\s-\S)"
    r"(?:@[A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*"  # [@scope/]name
    r"(?:@[A-Za-z0-9.^~<>=*|+ -]*[A-Za-z0-9*])?")                    # @version, range or tag


def check_npm_package(text: Any) -> str:
    """An npm package name with an optional ``@version`` (or range, tag), or UnsafeAsset."""
    spec = text.strip() if isinstance(text, str) else ""
    if len(spec) > 256 or not _NPM_PACKAGE.fullmatch(spec):
        raise UnsafeAsset(f"dependency {text!r} refused: only an npm package name with an "
                          "optional @version is allowed (no URL, path, git or option)")
    return spec


# Worker: trusting a master ##################################################
#
# Theory of operation. The swarm's ``token`` is public, so "isMaster: yes" is
# only a claim. A peer becomes this worker's master once it has *proved* that
# it holds ``transferEncryptToken``, and until then nothing it sends changes
# any state: no file, no manifest, no job run, no result handed to it.
#
# Two proofs, and the peer chooses which by what it answers to ``isMaster {}``:
#
# - master.py answers ``keyProof: 1``. The worker then calls ``isMaster``
#   again with ``{"challenge": 32 fresh random bytes in hex}``; the answer's
#   ``proof`` must be HMAC-SHA256(K, label || 0 || nonce || master address ||
#   0 || worker address), K derived from the key (:func:`master_proof`). It binds
#   our nonce to both bugout addresses, so it cannot be replayed or relayed.
#   The failed check decrypts nothing of the peer's, so it is no oracle.
#   master.py's answer carries a ``workerChallenge`` of its own, and the
#   worker proves the key back with ``proveKey {"proof"}`` (:func:`worker_proof`:
#   another key, its nonce, our address, then its), before it adopts the
#   master: master.py gives work by proof. This one call goes out even when
#   the master's proof failed, so master.py can tell its user which worker
#   holds another key; bound to that peer's address and nonce, under a key
#   of its own, it is of no use to anyone else.
# - An unchanged JS master cannot answer that, so its proof is its asset
#   answer: ``requestExecAssets {"currentHash": ""}`` brings every file
#   encrypted, each with the SHA-256 of its plaintext. Without the key (and
#   without an oracle) nobody can make a ciphertext that decrypts to a text
#   with a hash of their choosing (:func:`verify_assets` has the exact rule).
#   A peer that fetched the real master's files can replay them: it then gets
#   the real master's task to run, never its own code (README, "What the
#   tokens protect").
#
# Every failed proof looks the same from outside: the worker stops talking to
# that peer. A failed asset proof decrypted what the peer sent, so it is what
# a padding oracle would be made of: that peer is not asked again for
# PROOF_BAN_SECONDS, and such failures over all peers have a budget
# (PROOF_BUDGET), past which unproven peers are ignored until the budget
# frees, with one error line. A failed challenge decrypted nothing: it costs
# no budget, and its peer is asked again once it comes back (its wires gone,
# then a new one), as a master.py restarted with the key fixed does; its
# line comes once a minute at most. A proof that is not answered in time is
# no failure: that peer is asked again later.
#
# Checks are bounded: CHECK_CONCURRENCY ``isMaster`` checks of new peers at
# once, CHECK_QUEUE waiting; failover asks and peers with a wire of their own
# skip that line (URGENT_CHECKS at once), and masters known to have proved
# the key and pinned ones wait in none, so a flood of silent identities,
# sharing an attacker's wire or on wires of their own, never keeps the real
# master waiting. Proofs are bounded too: PROOF_CONCURRENCY at once (a
# stalled one makes room, up to PROOF_MAX).
#
# An address that proved the key once (this run or an earlier one: the
# journal keeps the last MAX_PROVEN) is adopted on its "yes" without a new
# proof: only the holder of its signing key can answer from it. A master.py
# is challenged again all the same (a fraction of a millisecond), as a new
# master.py process knows no worker: without it, no proof of ours; and
# proven addresses are exempt from the failure budget.
#
# A proven master keeps the worker until it leaves (its ``x``, its timeout,
# or its last wire gone) or fails (an RPC to it finds no wire, or twice gets
# no answer; an answered requestWork resets that count). Another peer's
# "yes" meanwhile only makes it a candidate, and a proof that ends after
# another master was adopted only marks its peer as proven. When the master
# is lost, the worker asks the proven addresses it knows, then the
# candidates and known peers, and adopts the first that proves the key.
# ``master=`` pins addresses: no other peer is asked or accepted.

#: How long a peer that failed a proof is not asked again (seconds).
PROOF_BAN_SECONDS = 3600.0
#: A peer that did not answer a proof in time may be asked again after this.
PROOF_RETRY_SECONDS = 60.0
#: Failed proofs allowed over all peers: (window in seconds, count) pairs.
PROOF_BUDGET = ((3600.0, 10), (86400.0, 40))
#: isMaster checks in flight at once, and peers waiting for one.
CHECK_CONCURRENCY = 4
CHECK_QUEUE = 256
#: Seconds an isMaster check (or challenge) may wait for its answer (JS masters: ~20 ms).
CHECK_TIMEOUT = 10.0
#: Urgent checks (failover, peers with a wire of their own) running at once; proven and pinned
#: masters are asked at once, outside any line.
URGENT_CHECKS = 16
#: Proofs running at once; one running longer than PROOF_STALLED seconds
#: makes room for another, up to PROOF_MAX.
PROOF_CONCURRENCY = 4
PROOF_STALLED = 10.0
PROOF_MAX = 16
#: A peer that said it is no master is asked again after this (or when the master is lost).
NOT_MASTER_RECHECK = 300.0
#: Bounds of the trust tables.
MAX_CANDIDATES = 64
MAX_PROVEN = 16
MAX_REMEMBERED = 4096
#: Caps on what a master may list.
MAX_ASSET_FILES = 256
MAX_DEPENDENCIES = 256
PROOF_LABEL = b"queue-xec master proof v1"
#: The label of the other way: a worker's proof to master.py (another key, another message).
WORKER_PROOF_LABEL = b"queue-xec worker proof v1"


def _key_proof(proof_key: bytes, label: bytes, nonce: bytes, prover: str, asker: str) -> str:
    message = label + b"\0" + nonce + prover.encode() + b"\0" + asker.encode()
    return hmac.new(proof_key, message, hashlib.sha256).hexdigest()


def master_proof(proof_key: bytes, nonce: bytes, master: str, worker: str) -> str:
    """The hex HMAC a master returns for a worker's challenge ``nonce``."""
    return _key_proof(proof_key, PROOF_LABEL, nonce, master, worker)


def worker_proof(proof_key: bytes, nonce: bytes, worker: str, master: str) -> str:
    """The hex HMAC a worker returns for master.py's ``workerChallenge`` nonce (``proof_key``:
    the key derived with WORKER_PROOF_LABEL, so that no master proof can pass for one)."""
    return _key_proof(proof_key, WORKER_PROOF_LABEL, nonce, worker, master)


def is_address(text: Any) -> bool:
    """True for a bugout address (base58check, prefix 0x55, 20-byte hash)."""
    if not isinstance(text, str) or not 25 <= len(text) <= 40:
        return False
    try:
        raw = b58check_decode(text)
    except (DecodeError, ValueError):
        return False
    return len(raw) == 21 and raw[:1] == ADDRESS_PREFIX


@dataclasses.dataclass(frozen=True)
class MasterCaps:
    """What a master said it can do in its ``isMaster`` answer."""
    acks: bool = False
    batches: bool = False
    key_proof: bool = False
    #: it takes ``workerError``: why its task cannot run here (master.py)
    errors: bool = False
    #: the run it is in (master.py; None: a JS master, whose address is new at each start): its
    #: job ids mean these jobs only in this run, so held results go only to the run of their jobs
    run: str | None = None

    @classmethod
    def of(cls, answer: dict) -> MasterCaps:
        return cls(bool(answer.get("resultAcks")), bool(answer.get("resultBatches")),
                   answer.get("keyProof") == 1, answer.get("workerErrors") is True, cls.run_of(answer))

    @staticmethod
    def run_of(answer: Any) -> str | None:
        """The ``run`` an answer names, if it is a short string."""
        run = answer.get("run") if isinstance(answer, dict) else None
        return run if isinstance(run, str) and 0 < len(run) <= 64 else None


@dataclasses.dataclass
class VerifiedAssets:
    """A whole asset answer, decrypted and checked in memory, ready to write."""
    files: list[tuple[Path, dict, bytes]]  # (target, manifest entry, plaintext)
    dependencies: list[str]
    python: bool  # task.py (pip dependencies) rather than task.js (npm)
    unified: str  # the master's hash: its sha256 fields joined


def verify_assets(answer: Any, crypt: Crypt, folder: Path, *, text_reads: bool) -> VerifiedAssets:
    """Check and decrypt a ``changed`` asset answer whole; raise if anything is off.

    The rule (the README's "What the tokens protect"): every file decrypts
    (PKCS#7), the task file (task.py if listed, else task.js) hashes to its
    ``sha256``, and so does every other file, except, when ``text_reads``
    (a JS master, which reads files as UTF-8 text), a file whose plaintext
    holds U+FFFD: the master's lossy read of a binary file, whose ``sha256``
    is of the bytes on its disk. Nothing is written here.
    """
    files, deps = _asset_lists(answer)
    plan = [(safe_asset_path(folder, f.get("workerPath")), f) for f in files]
    contents, undecryptable = [], None
    for _, f in plan:  # every file, so a bad one does not end the work early
        try:
            contents.append(crypt.decrypt_bytes(f["content"]))
        except CryptError as exc:
            contents.append(b"")
            undecryptable = undecryptable or exc
    if undecryptable is not None:
        raise undecryptable
    names = [f["name"] for f in files]
    task = "task.py" if "task.py" in names else "task.js" if "task.js" in names else None
    if task is None:
        raise AssetError("the master's assets hold no task.py or task.js")
    entries = []
    for (target, f), content in zip(plan, contents):
        received = hashlib.sha256(content).hexdigest()
        if received != f["sha256"] and (f["name"] == task or not text_reads
                                        or "\ufffd".encode() not in content):
            raise AssetError(f"{f['workerPath']}: content differs from the master's sha256")
        if received != f["sha256"]:
            log.warning("%s: binary file read as UTF-8 text by the JS master; written as received",
                        f["workerPath"])
        entries.append((target, {"name": f["name"], "workerPath": f["workerPath"],
                                 "sha256": f["sha256"], "received": received}, content))
    python = task == "task.py"
    checked = [(check_requirement if python else check_npm_package)(d) for d in deps]
    return VerifiedAssets(entries, checked, python, "".join(f["sha256"] for f in files))


def _asset_lists(answer: Any) -> tuple[list[dict], list]:
    """The ``files`` and ``dependencies`` of an answer, their shapes checked."""
    if not isinstance(answer, dict) or answer.get("status") != "changed":
        raise AssetError("the answer is not a changed asset list")
    files, deps = answer.get("files"), answer.get("dependencies") or []
    if not isinstance(files, list) or not 0 < len(files) <= MAX_ASSET_FILES:
        raise AssetError(f"files must be a list of 1 to {MAX_ASSET_FILES} files")
    if not isinstance(deps, list) or len(deps) > MAX_DEPENDENCIES:
        raise AssetError(f"dependencies must be a list of at most {MAX_DEPENDENCIES} names")
    for f in files:
        content = f.get("content") if isinstance(f, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and len(f["name"]) <= 255
                and isinstance(f.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", f["sha256"])
                and isinstance(content, dict) and isinstance(content.get("iv"), str)
                and isinstance(content.get("encryptedData"), str)):
            raise AssetError("a file of the asset list has not the agreed shape")
    return files, deps


class MasterTrust:
    """Who may command this worker: the proven master, candidates, bans, budget.

    Without I/O: times (monotonic seconds) come in as ``now``. The theory of
    operation is at the top of this section.
    """

    def __init__(self, pinned: Iterable[str] = (), proven: Iterable[str] = ()) -> None:
        #: addresses from ``master=``: when set, no other peer is asked or accepted
        self.pinned = frozenset(pinned)
        #: the proven master, or None
        self.master: str | None = None
        #: addresses that proved the key (this run or an earlier one), newest last
        self.proven: collections.OrderedDict[str, None] = collections.OrderedDict.fromkeys(proven)
        #: peers that said "yes" and were not proven yet: address -> caps
        self.candidates: collections.OrderedDict[str, MasterCaps] = collections.OrderedDict()
        #: failed proofs (monotonic times) inside the longest budget window
        self.failures: collections.deque[float] = collections.deque()
        # private
        self._banned: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._said_no: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._failed_challenge: collections.OrderedDict[str, float] = collections.OrderedDict()  # when
        self._locked_logged = False

    def allowed(self, address: str) -> bool:
        """False for addresses outside ``master=`` when it is set."""
        return not self.pinned or address in self.pinned

    def may_ask(self, address: str, now: float, again: bool = False) -> bool:
        """Whether to ask this peer ``isMaster`` now (``again``: even if it said no lately)."""
        if not self.allowed(address) or address == self.master:
            return False
        if self._banned.get(address, 0.0) > now:
            return False
        if address not in self.proven and self.locked_until(now) > now:
            return False  # nothing to gain: it could not prove the key now
        return again or self._said_no.get(address, float("-inf")) + NOT_MASTER_RECHECK <= now

    def may_prove(self, address: str, now: float) -> bool:
        """Whether a proof may start: not banned, and the failure budget not spent."""
        return (self.allowed(address) and self._banned.get(address, 0.0) <= now
                and (address in self.proven or self.locked_until(now) <= now))

    def locked_until(self, now: float) -> float:
        """When the failure budget frees again (``<= now``: it is free)."""
        until = now
        for window, count in PROOF_BUDGET:
            recent = [t for t in self.failures if t > now - window]
            if len(recent) >= count:
                until = max(until, recent[-count] + window)
        return until

    def said_no(self, address: str, now: float) -> None:
        self.candidates.pop(address, None)
        _remember(self._said_no, address, now)

    def said_yes(self, address: str, caps: MasterCaps) -> None:
        self._said_no.pop(address, None)
        self.candidates[address] = caps
        self.candidates.move_to_end(address)
        while len(self.candidates) > MAX_CANDIDATES:
            self.candidates.popitem(last=False)

    def proof_failed(self, address: str, now: float, oracle: bool = True) -> bool:
        """Ban the address; True when this failure locks proofs.

        ``oracle``: the proof decrypted what the peer sent (a JS master's
        assets): the ban lasts PROOF_BAN_SECONDS and spends budget. A failed
        challenge (master.py's, which decrypts nothing) spends none, and its
        ban ends when the peer leaves (:meth:`left`).
        """
        self.candidates.pop(address, None)
        _remember(self._banned, address, now + PROOF_BAN_SECONDS)
        if not oracle:
            _remember(self._failed_challenge, address, now)
            return False
        self._failed_challenge.pop(address, None)
        was_free = self.locked_until(now) <= now
        self.failures.append(now)
        longest = max(window for window, _ in PROOF_BUDGET)
        while self.failures and self.failures[0] <= now - longest:
            self.failures.popleft()
        return was_free and self.locked_until(now) > now

    def proof_timed_out(self, address: str, now: float) -> None:
        _remember(self._banned, address, now + PROOF_RETRY_SECONDS)

    def left(self, address: str) -> None:
        """Every wire of ``address`` is gone. If it failed only our challenge, it may be asked
        again when it comes back: a master.py started again, with the key fixed."""
        if self._failed_challenge.pop(address, None) is not None:
            self._banned.pop(address, None)

    def adopt(self, address: str) -> None:
        """``address`` proved the key (or had before): it is the master now."""
        self.master = address
        self.candidates.pop(address, None)
        self.proven[address] = None
        self.proven.move_to_end(address)
        while len(self.proven) > MAX_PROVEN:
            self.proven.popitem(last=False)

    def lose(self, address: str) -> bool:
        """The master left or failed; True if ``address`` was the master."""
        if address != self.master:
            return False
        self.master = None
        return True

    def next_to_ask(self, known: Iterable[str], now: float) -> list[str]:
        """Whom to ask when no master is left: proven, then candidates, then known peers."""
        order = [*reversed(self.proven), *reversed(self.candidates), *known]
        seen: set[str] = set()
        picked = []
        for address in order:
            if address in seen or not self.allowed(address) or self._banned.get(address, 0.0) > now:
                continue
            seen.add(address)
            picked.append(address)
        return picked


def _remember(table: collections.OrderedDict[str, float], address: str, value: float) -> None:
    table[address] = value
    table.move_to_end(address)
    while len(table) > MAX_REMEMBERED:
        table.popitem(last=False)


# Worker: the journal and the outbox #########################################
#
# The worker's state lives in one SQLite file in its folder, JOURNAL_NAME, in
# WAL mode with synchronous=FULL: a commit is on disk before it returns, and a
# crash (kill -9, power loss) at any instant leaves the last commit whole.
# It holds the results not yet delivered, the jobs received and not yet done
# (a JS master keeps no lease: a job lost here would be lost for good), each
# with the master that gave the job (its address, and the run master.py
# names: the only one its result may go to), the asset manifest and the
# addresses of masters that proved the key. Results no master took within
# HOLD_SECONDS are written out to UNRETURNED_NAME beside it (class Outbox).
#
# The file is ours only if its application_id, schema and integrity check
# say so, and if it was made with this swarm's token and key (a fingerprint
# in ``meta``). Each result row carries an HMAC keyed from the key, so a row
# that this worker did not write is never delivered. Anything else is moved
# aside with one error line naming it, and the worker starts clean.
#
# All SQLite work runs on one thread of its own, so a slow disk (an SD card's
# fsync) never stalls the event loop; the loop awaits what it must.

JOURNAL_NAME = ".qx-journal.db"
JOURNAL_APPLICATION_ID = 0x71786A31  # "qxj1"
#: 2: each job and result names the master that gave the job (``master``, its ``run``), and
#: each result when it was made (``made``, time.time()); a version 1 file gains the columns,
#: empty: its results have no known master (see class Outbox).
JOURNAL_VERSION = 2
_JOURNAL_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE results (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, mac TEXT NOT NULL,
                      master TEXT, run TEXT, made REAL);
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, mac TEXT NOT NULL,
                   master TEXT, run TEXT);
"""
_JOURNAL_V1_TO_V2 = """
ALTER TABLE results ADD COLUMN master TEXT; ALTER TABLE results ADD COLUMN run TEXT;
ALTER TABLE results ADD COLUMN made REAL;
ALTER TABLE jobs ADD COLUMN master TEXT; ALTER TABLE jobs ADD COLUMN run TEXT;
"""
#: Who gave a job, and so who alone may take its result: (master's address, its run or None).
#: None for a result whose master is not known (made by an older worker).
Owner = tuple[str, str | None] | None


def _unreturned_line(body: str, master: str | None, run: str | None, made: float | None) -> str:
    """A result's line in UNRETURNED_NAME: the master that gave its job, when it was made, the result."""
    when = None if made is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(made))
    return '{"master":%s,"run":%s,"made":%s,"result":%s}' % (json_dumps(master), json_dumps(run),
                                                              json_dumps(when), body)


def _sync_folder(path: Path) -> None:
    """Make a new file's name in its folder survive a power cut."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def aside_path(path: Path) -> Path:
    """Where damaged or foreign state found at ``path`` is moved: beside it, named for when
    and by which process, so it is never moved onto an earlier one."""
    return path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")


class Journal:
    """Crash-safe state in one SQLite file; every method runs on the journal's thread.

    Use it through :meth:`call` from the event loop. Result and job bodies are
    JSON text with an HMAC (``mac``) keyed from the transferEncryptToken.
    """

    def __init__(self, path: Path, fingerprint: str, mac_key: bytes) -> None:
        self.path = path
        self.fingerprint = fingerprint
        # private
        self._mac_key = mac_key
        self._db: Any = None
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
        self._log = _LogLimit()
        self._lock_fd: int | None = None

    @classmethod
    def of(cls, folder: Path, token: str, crypt: Crypt) -> Journal:
        """The journal of a worker folder, for the swarm of ``token`` and ``crypt``'s key."""
        return cls(folder / JOURNAL_NAME, crypt.derive(b"journal fingerprint:" + token.encode()).hex(),
                   crypt.derive(b"journal mac"))

    async def call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` on the journal's thread and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def submit(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        """Queue ``fn(*args)`` on the journal's thread (in order) without waiting; a failure
        (a full disk, say) is logged, one line a minute."""
        future = self._executor.submit(fn, *args)
        future.add_done_callback(self._report)
        return future

    def _report(self, future: concurrent.futures.Future) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            self._log(logging.ERROR, "write", "cannot write the journal %s: %s", self.path, exc)

    def close(self) -> None:
        """Finish queued work, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._executor.submit(self._close).result()
        self._executor.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # and with it the lock
            self._lock_fd = None

    # opening (journal thread)
    def open(self) -> None:
        """Open or create the file; a foreign or damaged one is moved aside (logged).

        One worker per journal: while another holds it, JournalError, and the
        file is left alone; so it is when SQLite cannot read it now (busy, I/O).
        """
        self._lock()
        try:
            self._files_only()
            self._db = self._connect()
            self._check()
        except (sqlite3.DatabaseError, JournalError) as exc:
            self._close()
            if isinstance(exc, sqlite3.OperationalError):  # locked, busy, I/O: not the file's fault
                raise JournalError(f"cannot open the journal {self.path}: {exc}") from None
            try:
                aside = self._move_aside()
                log.error("%s is not a usable journal (%s): moved aside to %s; starting clean",
                          self.path, exc, aside.name)
                self._db = self._connect()
                self._check()
            except (OSError, sqlite3.Error, JournalError) as again:
                self._close()
                raise JournalError(f"cannot keep a journal at {self.path}: {again}") from None

    def _lock(self) -> None:
        if self._lock_fd is not None or fcntl is None:
            return
        lock = self.path.with_name(self.path.name + ".lock")
        if os.path.lexists(lock) and not os.path.isfile(lock):  # no worker locks a directory
            aside = aside_path(lock)
            try:
                os.replace(lock, aside)
                log.error("%s is not a lock file: moved aside to %s", lock, aside.name)
            except FileNotFoundError:  # another worker starting here moved it first
                pass
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalError(f"{self.path} is in use by another worker: "
                               "give each worker a folder of its own") from None
        self._lock_fd = fd

    def _files_only(self) -> None:
        """A directory (or a link to nothing) where the file or its logs belong is foreign."""
        for name in (self.path, f"{self.path}-wal", f"{self.path}-shm"):
            if os.path.lexists(name) and not os.path.isfile(name):
                raise JournalError(f"{Path(name).name} is not a file")

    def _connect(self) -> sqlite3.Connection:
        private_files(self.path, f"{self.path}-wal", f"{self.path}-shm")  # the log holds jobs in clear
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def _check(self) -> None:
        db = self._db
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app_id == 0 and not tables:
            assert re.fullmatch(r"[0-9a-f]+", self.fingerprint)
            db.executescript("BEGIN;%s PRAGMA application_id=%d; PRAGMA user_version=%d; INSERT INTO "
                             "meta VALUES ('fingerprint', '%s'); COMMIT;" % (
                                 _JOURNAL_SCHEMA, JOURNAL_APPLICATION_ID, JOURNAL_VERSION, self.fingerprint))
            return
        if app_id != JOURNAL_APPLICATION_ID:
            raise JournalError("not a worker journal")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (1, JOURNAL_VERSION):
            raise JournalError("unknown journal version")
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise JournalError("damaged")
        if not {"meta", "results", "jobs"} <= tables:
            raise JournalError("tables missing")
        if self.get_meta("fingerprint") != self.fingerprint:
            raise JournalError("made with another token or transferEncryptToken")
        if version == 1:
            db.executescript("BEGIN;%s PRAGMA user_version=%d; COMMIT;" % (_JOURNAL_V1_TO_V2, JOURNAL_VERSION))

    def _move_aside(self) -> Path:
        aside = aside_path(self.path)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        return aside

    def _close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    # meta (journal thread)
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_json(self, key: str, default: list | None) -> list | None:
        """A JSON list of ``meta``; ``default`` when absent, or when unreadable (logged)."""
        try:
            value = json.loads(self.get_meta(key) or "null")
        except (ValueError, RecursionError):
            value = key  # not JSON: not a list either
        if value is None:
            return default
        if not isinstance(value, list):
            log.error("%s: %s is not a list; it is not used", self.path, key)
            return default
        return value

    # results and jobs (journal thread)
    def mac(self, body: str, owner: Owner = None) -> str:
        """A row's HMAC: its body and the master it belongs to (a version 1 row: the body)."""
        if owner is not None:
            body = "%s\0%s\0%s" % (body, owner[0], owner[1] or "")
        return hmac.new(self._mac_key, body.encode(), hashlib.sha256).hexdigest()

    def add_jobs(self, rows: list[tuple[int, str]], owner: Owner = None) -> None:
        """Commit received jobs: (sequence number, JSON text) each, all given by ``owner``."""
        master, run = owner or (None, None)
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?)",
                           [(seq, body, self.mac(body, owner), master, run) for seq, body in rows])

    def add_results(self, done: list[tuple[int | None, str, Owner]], made: float | None = None) -> list[int]:
        """Commit results, (job seq or None, JSON text, owner) each, made at ``made``
        (time.time()), and drop the jobs they answer, in one transaction."""
        with self._transaction() as db:
            seqs = [db.execute("INSERT INTO results (body, mac, master, run, made) VALUES (?, ?, ?, ?, ?)",
                               (body, self.mac(body, owner), *(owner or (None, None)), made)).lastrowid
                    for _, body, owner in done]
            db.executemany("DELETE FROM jobs WHERE seq=?", [(j,) for j, _, _ in done if j is not None])
        return seqs

    def remove_results(self, seqs: list[int]) -> None:
        with self._transaction() as db:
            db.executemany("DELETE FROM results WHERE seq=?", [(s,) for s in seqs])

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def read(self, table: str, after: int, limit: int, owner: Owner | bool = False) -> list[tuple[int, str]]:
        """Rows of ``results`` or ``jobs`` after ``after``, oldest first; forged rows dropped.
        Only those of ``owner`` when given (None: those of no known master)."""
        assert table in ("results", "jobs")
        where = ""
        if owner is not False:
            where = " AND master IS ? AND run IS ?"
        args = () if owner is False else tuple(owner or (None, None))
        rows = self._db.execute(f"SELECT seq, body, mac, master, run FROM {table} WHERE seq>?{where} "
                                "ORDER BY seq LIMIT ?", (after, *args, limit)).fetchall()
        return [(seq, body) for seq, body, *_ in self._genuine(table, rows)]

    def _genuine(self, table: str, rows: list[tuple]) -> list[tuple]:
        """``rows`` (seq, body, mac, master, run, ...) whose HMAC is right; the others are deleted (logged)."""
        good = [row for row in rows if hmac.compare_digest(
            row[2], self.mac(row[1], None if row[3] is None else (row[3], row[4])))]
        if len(good) < len(rows):
            kept = {row[0] for row in good}
            with self._transaction() as db:
                db.executemany(f"DELETE FROM {table} WHERE seq=?", [(r[0],) for r in rows if r[0] not in kept])
            log.error("%s: %d %s row(s) this worker did not write were dropped",
                      self.path, len(rows) - len(good), table)
        return good

    def job_owners(self) -> dict[int, Owner]:
        """Who gave each job held: {seq: owner}."""
        return {seq: None if master is None else (master, run)
                for seq, master, run in self._db.execute("SELECT seq, master, run FROM jobs")}

    def result_owners(self) -> collections.Counter:
        """How many results each owner has."""
        return collections.Counter({None if master is None else (master, run): count for master, run, count in
                                    self._db.execute("SELECT master, run, count(*) FROM results GROUP BY 1, 2")})

    # results written out (journal thread): exactly once, whatever instant a kill comes
    def expired(self, before: float, limit: int) -> list[tuple[int, str, Owner]]:
        """Up to ``limit`` results made before ``before``, or of no known master, oldest first:
        (seq, their line of UNRETURNED_NAME, owner) each."""
        rows = self._db.execute("SELECT seq, body, mac, master, run, made FROM results WHERE master IS NULL "
                                "OR made < ? ORDER BY seq LIMIT ?", (before, limit)).fetchall()
        return self._unreturned(rows)

    def _unreturned(self, rows: list[tuple]) -> list[tuple[int, str, Owner]]:
        return [(seq, _unreturned_line(body, master, run, made), None if master is None else (master, run))
                for seq, body, _, master, run, made in self._genuine("results", rows)]

    def write_out(self, path: Path, rows: list[tuple[int, str, Owner]]) -> None:
        """Append ``rows`` (from :meth:`expired`) to ``path`` and forget their results.

        The intent (the file's length before, the seqs) is committed first; a
        run that finds it (:meth:`finish_write_out`) cuts the file back to that
        length and writes them again, so a kill at any instant neither loses
        nor doubles a line.
        """
        try:
            offset = os.stat(path).st_size
        except FileNotFoundError:
            offset = 0
        self.set_meta("unreturned", json_dumps({"offset": offset, "seqs": [row[0] for row in rows]}))
        self._write_out(path, offset, rows)

    def finish_write_out(self, path: Path) -> list[tuple[int, str, Owner]]:
        """Complete a write-out a kill cut short; the rows it wrote."""
        try:
            intent = json.loads(self.get_meta("unreturned") or "null")
            offset, seqs = int(intent["offset"]), [int(seq) for seq in intent["seqs"]]
        except (ValueError, TypeError, KeyError):
            self._db.execute("DELETE FROM meta WHERE key='unreturned'")
            return []
        rows = []
        for i in range(0, len(seqs), 500):
            part = seqs[i:i + 500]
            found = self._db.execute("SELECT seq, body, mac, master, run, made FROM results WHERE seq IN (%s) "
                                     "ORDER BY seq" % ",".join("?" * len(part)), part).fetchall()
            rows += self._unreturned(found)
        self._write_out(path, offset, rows)
        return rows

    def _write_out(self, path: Path, offset: int, rows: list[tuple[int, str, Owner]]) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # results in clear: the worker's user alone
            end = os.fstat(fd).st_size
            if end > offset:  # a write-out cut short: its lines again, not twice
                os.ftruncate(fd, offset)
                end = offset
            data = "".join(line + "\n" for _, line, _ in rows).encode()
            while data:
                data = data[os.pwrite(fd, data, end):]
                end = os.fstat(fd).st_size
            os.fsync(fd)
        finally:
            os.close(fd)
        if offset == 0:
            _sync_folder(path)
        with self._transaction() as db:
            db.executemany("DELETE FROM results WHERE seq=?", [(row[0],) for row in rows])
            db.execute("DELETE FROM meta WHERE key='unreturned'")

    def verify(self, table: str) -> int:
        """Drop every row whose HMAC is wrong; returns how many rows are left."""
        after = 0
        while rows := self.read(table, after, 5000):
            after = rows[-1][0]
        return self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def last_seq(self, table: str) -> int:
        assert table in ("results", "jobs")
        return self._db.execute(f"SELECT coalesce(max(seq), 0) FROM {table}").fetchone()[0]


#: Held results kept in memory for delivery; more stay in the journal until their turn.
OUTBOX_MEMORY = 10_000
#: Seconds a result waits for the master that gave its job before it is written out to
#: UNRETURNED_NAME: a day covers a master stopped overnight or for a weekend's first day,
#: and a Raspberry Pi's worker keeps at most a day of results in its journal.
HOLD_SECONDS = 24 * 3600.0
#: Seconds between two looks for results held longer than HOLD_SECONDS.
EXPIRY_EVERY = 600.0
#: Where results no master came back for are written, in the worker folder (JSON lines, 0600).
UNRETURNED_NAME = "unreturned-results.jsonl"


class Outbox:
    """The results this worker holds, and the rules for handing them over.

    1. A result is committed to the journal before any master may take it,
       with the master that gave its job (its owner: address, and run when
       the master names one, as master.py does).
    2. Only the current proven master may take held results (``may_take``
       says who that is), and only its own: those of the jobs it gave in the
       run it is in now, oldest first, one delivery at a time.
    3. A result leaves the outbox when delivered: acknowledged by master.py,
       or written to a wire for a JS master, which gives no acknowledgement.
    4. A failed delivery keeps everything it carried, in order, for the next.
    5. The journal forgets a delivered result after the fact, on its thread:
       a crash in between delivers it again (master.py keeps one result per
       job id and drops the repeat).
    6. A result whose owner has not taken it HOLD_SECONDS after it was made,
       or that has no known owner (an older worker's), is written out to
       UNRETURNED_NAME, exactly once (:meth:`Journal.write_out`), with one
       log line: a JS master numbers its jobs from 0 at each start, under a
       new address, so no other master can take it as the answer to its job.

    Results wait in memory while their commit runs (``pending``); committed
    ones of one owner (the last asked for) are kept in memory for delivery up
    to OUTBOX_MEMORY and paged in from the journal beyond that. ``clock``
    (time.time) dates results and ends their hold.
    """

    def __init__(self, journal: Journal, may_take: Callable[[str], bool],
                 clock: Callable[[], float] = time.time) -> None:
        self.journal = journal
        #: whether an address may take held results now (the proven master)
        self.may_take = may_take
        self.clock = clock
        #: committed, deliverable results of ``owner`` in memory: (seq, JSON text), oldest first
        self.ready: collections.deque[tuple[int, str]] = collections.deque()
        #: whose results ``ready`` holds
        self.owner: Owner = None
        #: results made and not yet committed: (job seq or None, JSON text, owner)
        self.pending: list[tuple[int | None, str, Owner]] = []
        #: results held in all: pending, in memory and in the journal only
        self.held = 0
        #: True while commits fail (a full disk): no new work is taken then
        self.failing = False
        #: seconds from a result made to delivered (for /metrics)
        self.latency = Histogram()
        # private
        self._paged_to = 0  # highest seq of ``owner`` read from the journal; more may wait there
        self._more_in_journal = False
        self._taken: set[int] = set()
        self._flushing: asyncio.Task | None = None
        self._made: list[float] = []  # when each pending result was made
        self._made_at: dict[int, float] = {}  # and each committed one of this run
        self._jobs: dict[int, Owner] = {}  # who gave each job held
        self._owed: collections.Counter = collections.Counter()  # results held by owner
        self._writing = False  # results are being written out

    def __len__(self) -> int:
        return self.held

    async def load(self) -> int:
        """Read what an earlier run left; returns how many results are held."""
        self.held = await self.journal.call(self.journal.verify, "results")
        self._owed = await self.journal.call(self.journal.result_owners)
        self._jobs = await self.journal.call(self.journal.job_owners)
        self._more_in_journal = True
        return self.held

    def given(self, rows: list[tuple[int, str]], owner: Owner) -> None:
        """Jobs (journal seq, JSON text) came from ``owner``: journal them (in the background)."""
        self._jobs.update(dict.fromkeys((seq for seq, _ in rows), owner))
        self.journal.submit(self.journal.add_jobs, rows, owner)

    def owes(self, taker: str | None, run: str | None = None) -> int:
        """How many held results are ``taker``'s, in its ``run``."""
        return self._owed[(taker, run)] if taker is not None else 0

    def add(self, job_seq: int | None, text: str) -> None:
        """A new result (JSON text) of the job ``job_seq``; committed by the next :meth:`flush`."""
        owner = self._jobs.pop(job_seq, None) if job_seq is not None else None
        self.pending.append((job_seq, text, owner))
        self._made.append(time.monotonic())
        self.held += 1
        self._owed[owner] += 1

    async def flush(self) -> None:
        """Commit the pending results (one transaction); wait for a commit under way."""
        while self.pending or self._flushing is not None:
            if self._flushing is None:
                self._flushing = asyncio.ensure_future(self._commit())
            flushing = self._flushing
            try:
                await asyncio.shield(flushing)
            finally:
                if flushing.done() and self._flushing is flushing:
                    self._flushing = None

    async def _commit(self) -> None:
        batch, self.pending = self.pending, []
        made, self._made = self._made, []
        try:
            seqs = await self.journal.call(self.journal.add_results, batch, self.clock())
        except BaseException:
            self.pending[:0] = batch  # kept for the next try
            self._made[:0] = made
            raise
        self._made_at.update(zip(seqs, made))
        if self._more_in_journal:  # older ones wait in the journal: these are read after them
            return
        self.ready.extend((seq, text) for seq, (_, text, owner) in zip(seqs, batch) if owner == self.owner)
        self._paged_to = seqs[-1] if seqs else self._paged_to
        if len(self.ready) > OUTBOX_MEMORY:
            for _ in range(len(self.ready) - OUTBOX_MEMORY):
                self.ready.pop()
            self._paged_to = self.ready[-1][0]
            self._more_in_journal = True

    async def take(self, taker: str, limit: int, run: str | None = None) -> list[tuple[int, str]]:
        """The oldest committed results of ``taker`` in its ``run``, at most ``limit``; none if it
        may not take results now."""
        if not self.may_take(taker) or self._taken or self._writing or not self._owed[(taker, run)]:
            return []
        if self.owner != (taker, run):
            self.owner, self._paged_to, self._more_in_journal = (taker, run), 0, True
            self.ready.clear()
        if not self.ready and self._more_in_journal:
            await self._page_in()
        batch = list(itertools.islice(self.ready, limit))
        self._taken.update(seq for seq, _ in batch)
        return batch

    def settle(self, batch: list[tuple[int, str]], delivered: bool) -> None:
        """A delivery ended: forget the results it carried, or keep them for the next."""
        seqs = {seq for seq, _ in batch}
        self._taken -= seqs
        if not delivered:
            return
        now = time.monotonic()
        for seq in seqs:
            if (made := self._made_at.pop(seq, None)) is not None:
                self.latency.observe(now - made)
        self._forget(seqs, self.owner)
        self.journal.submit(self.journal.remove_results, sorted(seqs))

    def _forget(self, seqs: set[int], owner: Owner) -> None:
        while self.ready and self.ready[0][0] in seqs:  # delivery takes the oldest: a prefix
            self.ready.popleft()
        if any(seq in seqs for seq, _ in itertools.islice(self.ready, len(seqs))):
            self.ready = collections.deque(item for item in self.ready if item[0] not in seqs)
        self.held -= len(seqs)
        self._owed[owner] -= len(seqs)
        if self._owed[owner] <= 0:
            del self._owed[owner]

    async def _page_in(self) -> None:
        rows = await self.journal.call(self.journal.read, "results", self._paged_to, OUTBOX_MEMORY, self.owner)
        self.ready.extend(rows)
        if rows:
            self._paged_to = rows[-1][0]
        self._more_in_journal = len(rows) == OUTBOX_MEMORY

    async def write_out(self, folder: Path, now: float) -> int:
        """Write out the results held longer than HOLD_SECONDS (by ``now``, time.time()) or of no
        known master (rule 6), with one log line; how many. A write-out a kill cut short is
        finished first. None while a delivery runs: they wait for the next look."""
        if self._taken or self._writing:
            return 0
        self._writing = True  # no delivery meanwhile: a result goes to a master or to the file
        path, written = folder / UNRETURNED_NAME, []
        try:
            written += await self.journal.call(self.journal.finish_write_out, path)
            while rows := await self.journal.call(self.journal.expired, now - HOLD_SECONDS, 1000):
                await self.journal.call(self.journal.write_out, path, rows)
                written += rows
        finally:
            self._writing = False
            self._written(written)
        if written:
            log.warning("%d result(s) that no master took within %s (the master that gave their job did "
                        "not come back, or it is not known) were written to %s", len(written),
                        _duration(HOLD_SECONDS), path)
        return len(written)


    def _written(self, rows: list[tuple[int, str, Owner]]) -> None:
        gone = {seq for seq, _, _ in rows}
        if any(seq in gone for seq, _ in self.ready):
            self.ready = collections.deque(item for item in self.ready if item[0] not in gone)
        self.held -= len(rows)
        self._owed.subtract(owner for _, _, owner in rows)
        self._owed = +self._owed  # no owner left at zero


def _duration(seconds: float) -> str:
    """``24 h``, ``90 min``, ``30 s``: a hold's length for a log line."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return "%d h" % (seconds // 3600)
    if seconds >= 60 and seconds % 60 == 0:
        return "%d min" % (seconds // 60)
    return "%g s" % seconds


# Worker: running tasks ######################################################
#
# Task code is the master's and may misbehave, so it runs in child processes,
# never in the worker's. A Runner keeps up to ``concurrency`` children; each
# serves one job at a time and many jobs in its life. How:
#
# - A child is ``python -P -`` reading TASK_CHILD_PY on its stdin: a few stdlib
#   modules, ~11 MB RSS, where a multiprocessing child (spawn, forkserver)
#   re-imports worker.py with cryptography and nacl (~38 MB) and fork copies an
#   asyncio process with threads. It asks to die with the worker
#   (PR_SET_PDEATHSIG), offers itself first to the OOM killer, caps its data
#   size at ``jobMemoryMB`` (RLIMIT_DATA), then imports task.py once, or
#   becomes ``node`` for a task.js (exec keeps all three).
# - Jobs and answers are JSON lines on a socketpair (fd QX_RUNNER_FD); the
#   child's stdout and stderr go to the worker's log. Its first line is a
#   hello: ``{"ready": true}``, or ``{"ready": false, "error": ...}`` when the
#   task does not load.
# - A child that dies (exit, signal, OOM killer) fails its own job with a
#   TaskProcessError. Whatever is left in its process group then is killed
#   (it may hold the channel open). One that runs past ``jobTimeout`` gets
#   SIGTERM, SIGKILL after CHILD_EXIT_TIMEOUT, and its job a TimeoutError at
#   once. The next job that needs a child starts a new one.
# - Results leave as standard JSON only: the child encodes with
#   ``allow_nan=False``, and the worker checks again (``strict_json``).

#: Characters of a failed job's error message that its log line shows.
LOGGED_MESSAGE = 500
#: Seconds a child may take to load its task and say hello.
CHILD_START_TIMEOUT = 60.0
#: Seconds a child may take to exit (its channel closed, or after SIGTERM) before SIGKILL.
CHILD_EXIT_TIMEOUT = 2.0
#: Lines of a child's stderr kept to explain its death.
STDERR_TAIL = 20
#: Lines of task output (all children) logged per second after a burst; the rest are counted.
TASK_LINES_PER_SECOND = 50
TASK_LINES_BURST = 1000
_task_lines = _RateLimit(TASK_LINES_PER_SECOND, TASK_LINES_BURST, keys=1)
_task_lines_dropped = _LogLimit()
#: Seconds of the stop timeout kept for delivering the results of jobs the stop cut short.
STOP_DELIVERY_SECONDS = 5.0
_SIGNAL_HINTS = {signal.SIGKILL: " (the kernel's OOM killer, or kill -9)",
                 signal.SIGSEGV: " (a crash in native code)", signal.SIGABRT: " (it aborted)"}


def _exit_text(code: int | None) -> str:
    """How a child ended, for an error message: ``exited (code 3)``, ``was killed by SIGSEGV``."""
    if code is None:
        return "ended"
    if code >= 0:
        return f"exited (code {code})"
    try:
        sig = signal.Signals(-code)
    except ValueError:
        return f"was killed by signal {-code}"
    return f"was killed by {sig.name}{_SIGNAL_HINTS.get(sig, '')}"


def _memory_hint(code: int | None, memory_mb: int | None) -> str:
    """A death that running out of memory may explain, when a cap is set."""
    if memory_mb and code is not None and -code in _SIGNAL_HINTS:
        return f"; jobMemoryMB={memory_mb} caps its memory: it may have run out"
    return ""


def error_result(exc: BaseException) -> dict:
    """The ``error`` field of a failed job's result."""
    if isinstance(exc, TaskError):  # the task's own error name, message and traceback
        return dict(exc.error)
    return {"type": exc.__class__.__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


class Runner:
    """What the job loop drives, in whatever way the task runs.

    ``await start()`` loads the task (TaskProcessError when it does not load).
    ``await run(job)`` is the task's return value, or raises its error
    (TaskError, TimeoutError, TaskProcessError); up to ``concurrency`` jobs
    run at once. ``close()`` lets the jobs in flight finish; ``abort(reason)``
    ends them now, each failing with ``reason``; ``wait_closed()`` closes and
    waits until nothing the runner started is left. All three are idempotent.
    """

    #: the task's file
    task_path: Path
    #: jobs that may run at once
    concurrency: int = 1
    #: children (or threads) started so far
    starts: int = 0

    @property
    def pids(self) -> list[int]:
        """The processes that run the task now."""
        raise NotImplementedError

    async def start(self) -> Runner:
        raise NotImplementedError

    async def run(self, job: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self, reason: str) -> None:
        raise NotImplementedError

    async def wait_closed(self) -> None:
        raise NotImplementedError


class ChildRunner(Runner):
    """A task in up to ``concurrency`` child processes (PythonRunner, NodeRunner).

    ``start()`` starts the first child and waits for its hello; more start as
    jobs need them, then stay for later jobs. A child that dies or runs past
    ``timeout`` fails its own job only, and is replaced when a job needs it.
    """

    #: the task's file name, in messages and log lines
    kind = "task"
    #: what a task's error answer is raised as
    error_class: type[TaskError] = TaskError

    def __init__(self, task_path: Path, folder: Path, timeout: float | None = None, *,
                 concurrency: int = 1, memory_mb: int | None = None) -> None:
        self.task_path = task_path
        self.folder = folder
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.memory_mb = memory_mb
        self.starts = 0
        #: the live children, busy or idle
        self.children: list[TaskChild] = []
        # private
        self._idle: list[TaskChild] = []
        self._slots = asyncio.Semaphore(self.concurrency)
        self._enders: set[asyncio.Task] = set()
        self._closing: asyncio.Task | None = None
        self._aborted: str | None = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the live children."""
        return [c.pid for c in self.children if c.pid is not None]

    async def start(self) -> ChildRunner:
        """Start the first child; TaskProcessError when the task does not load."""
        self._idle.append(await self._new_child())
        return self

    async def run(self, job: Any) -> Any:
        self._check_open()
        async with self._slots:
            self._check_open()  # closed while this job waited for a child
            child = self._take_idle() or await self._new_child()
            try:
                answer = await child.ask(job, self.timeout)
            except TimeoutError:
                self._retire(child, f"it ran longer than jobTimeout ({self.timeout:g}s)")
                raise TimeoutError(f"task ran longer than {self.timeout:g}s") from None
            finally:
                self._release(child)
        if "error" in answer:
            raise self.error_class.from_answer(answer["error"])
        return answer.get("data")

    def close(self) -> None:
        if self._closing is not None:
            return
        try:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        except RuntimeError:  # no loop left: all we can do is kill
            for child in self.children:
                child.kill()

    def abort(self, reason: str) -> None:
        self._aborted = self._aborted or reason
        for child in list(self.children):
            self._retire(child, reason)
        self.close()

    async def wait_closed(self) -> None:
        self.close()
        if self._closing is not None:
            await asyncio.shield(self._closing)  # a cancelled waiter leaves the close running

    # private
    def _argv(self) -> list[str]:
        """TASK_CHILD_PY's arguments: ``TASK DEPS``, or ``--exec PROGRAM ARGS...``."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._aborted:
            raise TaskProcessError(self._aborted)
        if self._closing is not None:
            raise InvalidState(f"this {self.kind} runner is closed")

    async def _new_child(self) -> TaskChild:
        child = TaskChild(self.kind, self.memory_mb)
        self.children.append(child)  # from now on, abort() ends it too
        try:
            await child.start(self._argv(), self.folder, self.task_path)
        except BaseException:
            self._retire(child, None)
            raise
        self.starts += 1
        if self.starts > 1:
            log.info("- %s process %s started (%d live)", self.kind, child.pid, len(self.children))
        return child

    def _take_idle(self) -> TaskChild | None:
        while self._idle:
            child = self._idle.pop()
            if child.alive:
                return child
            log.warning("- %s process %s %s between jobs%s", self.kind, child.pid,
                        _exit_text(child.returncode), _memory_hint(child.returncode, self.memory_mb))
            self._retire(child, None)
        return None

    def _release(self, child: TaskChild) -> None:
        if child not in self.children:
            return
        if child.alive and self._closing is None:
            self._idle.append(child)
        else:
            self._retire(child, None)

    def _retire(self, child: TaskChild, reason: str | None) -> None:
        """Forget ``child`` and end it (SIGTERM first when there is a reason)."""
        if child in self.children:
            self.children.remove(child)
        if child in self._idle:
            self._idle.remove(child)
        spawn(child.end(reason), self._enders, f"{self.kind} process")

    async def _close(self) -> None:
        for _ in range(self.concurrency):  # the jobs in flight finish first
            await self._slots.acquire()
        for child in list(self.children):
            self._retire(child, None)
        while self._enders:
            await asyncio.gather(*list(self._enders), return_exceptions=True)


class PythonRunner(ChildRunner):
    """Runs ``task.py`` in ``python`` children: ``Task()`` once per child, ``run(job)`` per job.

    ``deps`` (the worker's ``.deps``, where pip installs the dependencies) and
    the task's folder come first on the child's import path.
    """

    kind = "task.py"

    def __init__(self, task_path: Path, folder: Path, timeout: float | None = None, *,
                 deps: Path | None = None, concurrency: int = 1, memory_mb: int | None = None) -> None:
        super().__init__(task_path, folder, timeout, concurrency=concurrency, memory_mb=memory_mb)
        self.deps = deps or folder / ".deps"

    def _argv(self) -> list[str]:
        return [str(self.task_path), str(self.deps)]


class TaskChild:
    """One child process serving jobs: started, greeted, asked, ended."""

    def __init__(self, kind: str, memory_mb: int | None = None) -> None:
        self.kind = kind
        self.memory_mb = memory_mb
        #: the process, once started
        self.process: asyncio.subprocess.Process | None = None
        # private
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pumps: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._sequence = itertools.count(1)
        self._ending: asyncio.Future | None = None
        self._reason: str | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process else None

    @property
    def alive(self) -> bool:
        """Started, running, and not being ended."""
        return self.process is not None and self.process.returncode is None and self._ending is None

    async def start(self, argv: list[str], cwd: Path, task_path: Path) -> None:
        """Run TASK_CHILD_PY with ``argv`` and wait for its hello; TaskProcessError if it fails."""
        ours, theirs = socket.socketpair()
        try:
            self.process = await self._launch(argv, cwd, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours, limit=DEFAULT_MAX_MESSAGE)
        self._pump(self.process.stdout, logging.INFO)
        self._pump(self.process.stderr, logging.WARNING)
        self._watcher = asyncio.ensure_future(self._watch())
        log.debug("- %s process %d started", self.kind, self.process.pid)
        await self._hello(task_path)

    async def ask(self, job: Any, timeout: float | None = None) -> dict:
        """Send one job, return the child's answer; TimeoutError past ``timeout`` (then end it)."""
        assert self._writer is not None
        ident = next(self._sequence)
        self._writer.write(storable_json({"id": ident, "job": job}).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()
        answer = await (self._receive() if timeout is None else asyncio.wait_for(self._receive(), timeout))
        if answer.get("id") != ident:
            await self.end("it answered another job")
            raise TaskProcessError(f"the {self.kind} process answered {answer.get('id')!r} to job {ident}")
        return answer

    async def end(self, reason: str | None = None) -> int | None:
        """End the child once: its channel closed and, given a reason, SIGTERM. Its exit code.

        SIGKILL follows when it is still there after CHILD_EXIT_TIMEOUT. A job in
        flight fails at once with ``reason``.
        """
        if self._ending is None:
            self._reason = reason
            self._ending = asyncio.ensure_future(self._end(terminate=reason is not None))
        return await asyncio.shield(self._ending)

    def kill(self) -> None:
        """SIGKILL, for when no event loop is left to end it properly."""
        self._signal(signal.SIGKILL)

    # private
    async def _launch(self, argv: list[str], cwd: Path, channel: socket.socket) -> asyncio.subprocess.Process:
        fd = channel.fileno()
        env = {**os.environ, "QX_RUNNER_FD": str(fd), "QX_PARENT": str(os.getpid()),
               "QX_MEMORY_MB": str(self.memory_mb or "")}
        try:  # a session of its own: no terminal's SIGINT, and a group to end with it
            proc = await asyncio.create_subprocess_exec(  # -P: not the worker folder (cwd) first on its path
                sys.executable, "-P", "-", *argv, cwd=cwd, pass_fds=(fd,), env=env, start_new_session=True,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise TaskProcessError(f"cannot start {sys.executable} for the {self.kind}: {exc}") from exc
        assert proc.stdin is not None
        proc.stdin.write(TASK_CHILD_PY.encode())
        proc.stdin.close()  # python runs the program once it has read all of it
        return proc

    async def _hello(self, task_path: Path) -> None:
        """Wait for the child's ``ready`` line; its load error becomes TaskProcessError."""
        try:
            hello = await asyncio.wait_for(self._receive(), CHILD_START_TIMEOUT)
        except TimeoutError:
            await self.end("it did not load in time")
            raise TaskProcessError(f"{task_path} did not load in {CHILD_START_TIMEOUT:.0f}s") from None
        except TaskProcessError as exc:
            raise TaskProcessError(f"{task_path} does not load: {exc}", exc.error["traceback"]) from None
        if not hello.get("ready"):
            await self.end()
            error = TaskError.from_answer(hello.get("error"))
            raise TaskProcessError(f"{task_path} does not load: {error}", error.error["traceback"])
        self._fit_memory_cap(hello.get("reserved"))

    def _fit_memory_cap(self, reserved: Any) -> None:
        """The cap of a child that said what it reserved at start (node): ``jobMemoryMB`` plus that.

        TASK_CHILD_PY gave it EXEC_START_MB more to start with: Node 24 maps V8's
        512 MB code range writable at once, and RLIMIT_DATA counts it whole.
        """
        if not self.memory_mb or type(reserved) is not int or reserved < 0 or self.pid is None:
            return
        import resource  # POSIX: Linux has prlimit
        cap = (self.memory_mb << 20) + reserved
        with contextlib.suppress(OSError, ValueError, AttributeError):
            resource.prlimit(self.pid, resource.RLIMIT_DATA, (cap, cap))

    async def _receive(self) -> dict:
        """The child's next line; TaskProcessError (with its stderr) when it died."""
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except (ValueError, ConnectionError) as exc:  # ValueError: a line over the limit
            await self.end("it sent a bad answer")
            raise TaskProcessError(f"the {self.kind} process sent a bad answer: {exc}") from None
        if not line:
            if self._reason is not None:  # we ended it
                raise TaskProcessError(self._reason)
            code = await self.end()
            raise TaskProcessError(f"the {self.kind} process {_exit_text(code)} before answering"
                                   + _memory_hint(code, self.memory_mb),
                                   f"stderr of the {self.kind} process:\n" + "\n".join(self._stderr))
        with contextlib.suppress(ValueError):
            answer = json.loads(line)
            if isinstance(answer, dict):
                return answer
        await self.end("it sent a bad answer")
        raise TaskProcessError(f"the {self.kind} process sent a bad answer: {line[:200]!r}")

    async def _end(self, terminate: bool) -> int | None:
        proc = self.process
        if terminate:
            self._signal(signal.SIGTERM)
        if self._writer is not None:
            self._writer.close()  # EOF: the child exits; a job in flight sees the end
        if proc is None:
            return None
        try:
            await asyncio.wait_for(proc.wait(), CHILD_EXIT_TIMEOUT)
        except TimeoutError:
            self._signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled: leave no child behind
                self._signal(signal.SIGKILL)
        self._kill_group()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self._end_pumps()
        log.debug("- %s process %d %s", self.kind, proc.pid, _exit_text(proc.returncode))
        return proc.returncode

    async def _watch(self) -> None:
        """When the child exits, end what it left running in its group (grandchildren).

        Those may hold the child's end of the channel (a fork() does) or its
        stdout, which would keep its job waiting for an answer that never
        comes. Should one that left the group hold the channel, it is closed
        after CHILD_EXIT_TIMEOUT (what the child sent before dying is read by
        then).
        """
        assert self.process is not None
        await _exited(self.process)
        self._kill_group()
        await asyncio.sleep(CHILD_EXIT_TIMEOUT)
        if self._writer is not None:
            self._writer.close()

    def _kill_group(self) -> None:
        """SIGKILL what is left in the process group of the child, which has exited."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        """``sig`` to the child's process group (its own children too), until it is reaped."""
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):  # it left its group
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def _pump(self, stream: asyncio.StreamReader | None, level: int) -> None:
        spawn(self._log_lines(stream, level), self._pumps, f"{self.kind} output")

    async def _log_lines(self, stream: asyncio.StreamReader | None, level: int) -> None:
        """The task's output, line by line, into the worker's log."""
        while stream is not None:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the limit: dropped
                continue
            if not raw:
                return
            text = raw.decode(errors="replace").rstrip()
            if level >= logging.WARNING:
                self._stderr.append(text)
            if _task_lines.allow(None, time.monotonic()):
                log.log(level, "%s: %s", self.kind, text)
            else:
                _task_lines_dropped(logging.WARNING, "task output", "task output over %d lines a second: "
                                    "lines left out of the log", TASK_LINES_PER_SECOND)

    async def _end_pumps(self) -> None:
        """Let the pumps read the last lines, unless a grandchild holds the pipes."""
        pumps = list(self._pumps)
        if pumps:
            await asyncio.wait(pumps, timeout=1.0)
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _exited(proc: asyncio.subprocess.Process) -> None:
    """Return once ``proc`` has exited, reaped or not: ``proc.wait()`` also waits
    for its pipes, which a grandchild may hold open. A pidfd says so at once (the
    zombie keeps its process group alive); without one, poll."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or reaped already
        while proc.returncode is None:
            await asyncio.sleep(0.25)
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    try:
        loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def stdlib_end(paths: list[str]) -> int:
    """Where the standard library's entries of ``paths`` (a sys.path) end: a folder put there
    comes after them and before site-packages (TASK_CHILD_PY finds it the same way)."""
    bases = (sys.base_prefix, sys.base_exec_prefix)
    return max((i + 1 for i, p in enumerate(paths) if p.startswith(bases) and "-packages" not in p),
               default=0)


def use_path(folder: Path) -> None:
    """Put ``folder`` on this process's sys.path after the standard library (thread mode)."""
    if str(folder) not in sys.path:
        at = stdlib_end(sys.path)
        sys.path[at:at] = [str(folder)]


def load_task(path: Path) -> Any:
    """Import ``task.py`` afresh in this process and return a new ``Task()`` (thread mode)."""
    name = "qx_task_%d" % time.monotonic_ns()
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise WorkerError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    use_path(path.parent)
    spec.loader.exec_module(module)
    if not hasattr(module, "Task"):
        raise WorkerError(f"{path} defines no class Task")
    return module.Task()


class ThreadRunner(Runner):
    """task.py in a thread of the worker's own process: ``taskRunner=thread``.

    Faster for trivial jobs (no process hop), and no isolation at all: the
    task shares the worker's memory, and can crash, wedge or rewire it. One
    job at a time; an ``async def run`` runs on the thread's own event loop,
    kept from job to job. A job that outlives ``timeout`` is left to its
    thread (a daemon: it cannot hold the process open) and the next job gets
    a new thread.
    """

    kind = "task.py"

    def __init__(self, task_path: Path, timeout: float | None = None) -> None:
        self.task_path = task_path
        self.timeout = timeout
        #: the task's object, once loaded
        self.task: Any = None
        # private
        self._thread: _TaskThread | None = None
        self._pending: set[asyncio.Future] = set()
        self._closed = False
        self._aborted: str | None = None

    @property
    def pids(self) -> list[int]:
        return [os.getpid()]

    async def start(self) -> ThreadRunner:
        try:
            self.task = load_task(self.task_path)
        except Exception as exc:  # noqa: BLE001 - the task's own import-time errors
            raise TaskProcessError(f"{self.task_path} does not load: {exc.__class__.__name__}: {exc}",
                                   error_result(exc)["traceback"]) from None
        return self

    async def run(self, job: Any) -> Any:
        if self._aborted:
            raise TaskProcessError(self._aborted)
        if self._closed:
            raise InvalidState("this task.py runner is closed")
        if self._thread is None:
            self._thread = _TaskThread(self.task)
            self.starts += 1
        future = asyncio.get_running_loop().create_future()
        self._pending.add(future)
        self._thread.submit(job, future)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            self._drop_thread()  # the thread cannot be killed: leave it behind
            raise TimeoutError(f"task ran longer than {self.timeout:g}s") from None
        finally:
            self._pending.discard(future)

    def close(self) -> None:
        self._closed = True
        self._drop_thread()

    def abort(self, reason: str) -> None:
        self._aborted = self._aborted or reason
        for future in self._pending:
            if not future.done():
                future.set_exception(TaskProcessError(reason))
        self.close()

    async def wait_closed(self) -> None:
        self.close()  # its daemon thread ends after the job it runs

    def _drop_thread(self) -> None:
        if self._thread is not None:
            self._thread.close()
            self._thread = None


class _TaskThread:
    """A daemon thread with an event loop of its own, running jobs in order."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._main, name="task", daemon=True).start()

    def submit(self, job: Any, future: asyncio.Future) -> None:
        self._jobs.put((job, future))

    def close(self) -> None:
        self._jobs.put(None)  # ends the thread after its current job

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            while (item := self._jobs.get()) is not None:
                job, future = item
                try:
                    result = self.task.run(job)
                    if inspect.isawaitable(result):
                        result = loop.run_until_complete(_await(result))
                    outcome: tuple = (result, None)
                except Exception as exc:  # noqa: BLE001 - the task's error, for its result
                    outcome = (None, exc)
                except BaseException as exc:  # noqa: BLE001 - sys.exit() ends the job, not the worker
                    outcome = (None, TaskError(exc.__class__.__name__, str(exc), "".join(
                        traceback.format_exception(type(exc), exc, exc.__traceback__))))
                with contextlib.suppress(RuntimeError):  # the worker's loop has closed
                    future.get_loop().call_soon_threadsafe(_settle, future, *outcome)
        finally:
            loop.close()


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # timed out or aborted meanwhile
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


async def _await(awaitable: Awaitable) -> Any:
    return await awaitable


# Worker: running task.js with Node ##########################################
#
# The JS master always sends a task.js. When no task.py comes with it, ``node``
# children run it the way the JS worker does: ``new (require(path))()`` once
# per child, then ``await task.run(job)`` per job, through the runner that
# worker.py writes into the worker folder. Each child starts as TASK_CHILD_PY,
# which sets its limits and becomes ``node``; jobs, answers, deaths and
# timeouts are as for task.py. npm installs the dependencies into the worker
# folder.

#: The runner that worker.py writes into the worker folder (assets may not overwrite it).
NODE_RUNNER_NAME = ".qx-runner.js"


def find_program(name: str) -> str:
    """``node`` or ``npm`` on PATH, or TaskProcessError saying what to install."""
    found = shutil.which(name)
    if found is None:
        raise TaskProcessError(
            f"the master sent a task.js (and no task.py), which needs Node.js, but {name!r} "
            "is not on PATH: install Node.js 18+ with npm, or have the master send a task.py")
    return found


async def missing_npm_packages(folder: Path, specs: list[str]) -> list[str]:
    """The specs that node's ``require.resolve`` cannot satisfy from ``folder``."""
    if not specs:
        return []
    proc = await asyncio.create_subprocess_exec(
        find_program("node"), "-e", _NPM_MISSING_JS, "--", str(folder), *specs,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    try:
        missing = json.loads(out)
    except ValueError:
        raise TaskProcessError("node could not check the dependencies: "
                               + err.decode(errors="replace").strip()[-500:]) from None
    return [spec for spec in specs if spec in missing]


async def install_npm_packages(folder: Path, specs: list[str]) -> bool:
    """``npm install --prefix folder`` what does not resolve yet; off the loop."""
    try:
        missing = await missing_npm_packages(folder, specs)
        npm = find_program("npm") if missing else ""
    except (TaskProcessError, OSError) as exc:
        log.error("dependencies of task.js: %s", exc)
        return False
    if not missing:
        return True
    log.info("installing %s into %s with npm", ", ".join(missing), folder)
    command = [npm, "install", "--prefix", str(folder), "--no-audit", "--no-fund",
               "--no-update-notifier", *missing]
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, cwd=folder, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    except OSError as exc:
        log.error("cannot run npm: %s", exc)
        return False
    return await _install_finished(proc, "npm", missing)


class NodeRunner(ChildRunner):
    """Runs ``task.js`` in ``node`` children, as the JS worker runs it.

    With ``memory_mb``, V8's old space gets half of it (``--max-old-space-size``):
    V8 sizes its heap from the machine's memory, not from the child's cap, and
    collects garbage sooner when told.
    """

    kind = "task.js"
    error_class = JsTaskError

    def _argv(self) -> list[str]:
        node, runner = find_program("node"), self.folder / NODE_RUNNER_NAME
        try:
            if not runner.is_file() or runner.read_text() != NODE_RUNNER_JS:
                runner.write_text(NODE_RUNNER_JS)
        except OSError as exc:
            raise TaskProcessError(f"cannot write {runner}: {exc}") from exc
        heap = [f"--max-old-space-size={max(16, self.memory_mb // 2)}"] if self.memory_mb else []
        return ["--exec", node, *heap, str(runner), str(self.task_path)]


# Worker #####################################################################

def _pong(address: str, args: Any) -> dict:
    """``ping``: the arguments echoed with ``pong``, as the JS master does; small ones only."""
    args = as_dict(args)
    return {**args, "pong": True} if len(json_dumps(args)) <= MAX_PING_ECHO else {"pong": True}


#: Largest ping arguments echoed back (a peer may not make us send megabytes).
MAX_PING_ECHO = 4096


def _results_ok(value: Any, folder: Path) -> bool:
    """A list of results as this worker makes them (old .results.json files)."""
    return isinstance(value, list) and all(
        isinstance(r, dict) and "jobID" in r and "data" in r and isinstance(r.get("worker"), dict)
        and isinstance(r["worker"].get("id"), str) for r in value)


def _manifest_ok(value: Any, folder: Path) -> bool:
    """A list of assets with a name and a safe workerPath."""
    if not isinstance(value, list):
        return False
    for asset in value:
        if not isinstance(asset, dict) or not isinstance(asset.get("name"), str):
            return False
        try:
            safe_asset_path(folder, asset.get("workerPath"))
        except UnsafeAsset:
            return False
    return True


#: The most characters of a reason told to master.py (``workerError``).
MAX_TOLD_ERROR = 1000


def _asset_key(answer: Any) -> str:
    """What tells one asset answer from another (its files' hashes), whatever its shape."""
    files = answer.get("files") if isinstance(answer, dict) else None
    listed = [f.get("sha256") for f in files if isinstance(f, dict)] if isinstance(files, list) else []
    return hashlib.sha256(repr(listed).encode()).hexdigest()


def _call_failed(exc: Exception) -> str:
    """Why a call to the master failed, in plain words (the exception's text names RPCs and wires)."""
    if isinstance(exc, RpcUnreachable):
        return "no connection to it is open"
    if isinstance(exc, RpcTimeout):
        return "it did not answer in time"
    return str(exc)


async def _wait_any(*events: asyncio.Event, timeout: float | None = None) -> bool:
    """Wait until one of ``events`` is set; False when ``timeout`` passed first."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return bool(done)


class MasterFinder:
    """Which peer is the master: ``isMaster`` checks, proofs and failover, around :class:`MasterTrust`.

    The theory of operation is in "Worker: trusting a master". Built with the
    node (RPCs, wires, peers), the key, the settings (``master=``, the folder
    a JS master's proof is checked against, how peers are found), the journal
    (it keeps the proven masters), ``spawn`` for background tasks, the
    worker's counters, ``now`` (monotonic seconds) and a logger. ``on_master(verified)``
    is awaited once a master is adopted (``verified``: the files its proof
    brought, or None): the worker then fetches its assets.
    """

    def __init__(self, node: Bugout, crypt: Crypt, settings: Settings, journal: Journal, *,
                 spawn: Callable[[Awaitable], Any],
                 on_master: Callable[[VerifiedAssets | None], Awaitable[Any]],
                 stats: collections.Counter, now: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.node = node
        self.crypt = crypt
        self.settings = settings
        self.journal = journal
        self.spawn = spawn
        self.on_master = on_master
        self.stats = stats
        self.now = now
        self.log = logger
        #: who may command this worker: the proven master, candidates, bans
        self.trust = MasterTrust(settings.master)
        #: what the master said it can do in its ``isMaster`` answer
        self.caps = MasterCaps()
        #: set when the worker stops: a master that leaves then starts no failover
        self.stopping = False
        # private
        self._proof_key = crypt.derive(PROOF_LABEL)
        self._worker_proof_key = crypt.derive(WORKER_PROOF_LABEL)  # for master.py's challenge
        self._timeouts = 0  # requests to the master unanswered in a row
        self._checking: set[str] = set()
        self._urgent: collections.deque[str] = collections.deque()  # isMaster checks to make
        self._others: collections.deque[str] = collections.deque()
        self._check_ready = asyncio.Event()
        self._urgent_running = 0
        self._proofs: dict[str, float] = {}  # address -> when its proof started
        self._wire_checks: set[str] = set()  # masters whose remaining wires are being checked
        #: one line a minute per kind of what peers cause here (failed challenges)
        self._log = _LogLimit()

    @property
    def master(self) -> str | None:
        """The proven master's address, or None."""
        return self.trust.master

    def start(self) -> None:
        """Start the checkers of queued peers; say how a master is looked for."""
        for _ in range(CHECK_CONCURRENCY):
            self.spawn(self._checker())
        if self.master is None:
            self.say_waiting()

    def say_waiting(self) -> None:
        """One line: no master yet, and the ways this worker looks for one (from the settings)."""
        s = self.settings
        ways = (["LSD on the local network"] if s.lsd else []) + (["the DHT"] if s.dht else []) + (
            ["%d tracker(s)" % len(s.trackers)] if s.trackers else []) + (  # the WebRTC line names them
            ["peers= %s" % ", ".join(s.peers)] if s.peers else [])
        pinned = "; only master= %s is accepted" % ", ".join(s.master) if s.master else ""
        if ways:
            self.log.info("waiting for a master: looking by %s%s", ", ".join(ways), pinned)
        else:
            self.log.warning("waiting for a master to dial this worker (port %d): LSD, the DHT and trackers are "
                        "off and peers= is empty%s", self.node.port, pinned)

    async def load(self) -> None:
        """The masters that proved the key in earlier runs (the journal keeps them)."""
        proven = await self.journal.call(self.journal.get_json, "proven", [])
        if not all(is_address(a) for a in proven):
            self.log.error("%s: the list of proven masters holds what is not an address; not used", self.journal.path)
            proven = []
        self.trust.proven.update(dict.fromkeys(proven))

    def on_peer(self, address: str) -> None:
        """A peer was seen (``seen``, ``wireseen``): ask it, unless it is a candidate while a master serves."""
        if self.master is None or address not in self.trust.candidates:
            self.ask(address)

    def ask(self, address: str, again: bool = False) -> None:
        """Queue an ``isMaster`` check of ``address`` (bounded; extra ones are dropped).

        Masters known to have proved the key and pinned ones are asked at once;
        failover asks and peers with a wire of their own go before the others:
        a flood of identities, on an attacker's wire or on wires of their own
        (and never answering), cannot keep the master waiting behind it.
        """
        if address in self._checking or address == self.node.address:
            return
        if not self.trust.may_ask(address, self.now(), again):
            return
        if address in self.trust.proven or address in self.trust.pinned:
            self._checking.add(address)  # a known master waits in no line (they are few)
            self.spawn(self._check(address))
            return
        urgent = again or self.node.has_wire(address)
        queue = self._urgent if urgent else self._others
        if len(queue) >= CHECK_QUEUE:
            self.stats["isMaster checks dropped"] += 1
            return
        queue.append(address)
        self._checking.add(address)
        if urgent:
            self._start_urgent()
        else:
            self._check_ready.set()

    def ask_known(self) -> None:
        """No master: ask the proven ones, the candidates and the known peers (the idle round)."""
        for address in self.trust.next_to_ask(self.node.peers, self.now()):
            self.ask(address)

    def _start_urgent(self) -> None:
        """Urgent checks run at once, up to URGENT_CHECKS at a time."""
        while self._urgent and self._urgent_running < URGENT_CHECKS:
            self._urgent_running += 1
            self.spawn(self._check(self._urgent.popleft(), urgent=True))

    async def _check(self, address: str, urgent: bool = False) -> None:
        try:
            await self.check_master(address)
        finally:
            self._checking.discard(address)
            if urgent:
                self._urgent_running -= 1
                self._start_urgent()

    async def _checker(self) -> None:
        """Take the other queued checks in turn (CHECK_CONCURRENCY of these run)."""
        while True:
            while not self._others:
                self._check_ready.clear()
                await self._check_ready.wait()
            await self._check(self._others.popleft())

    def on_left(self, address: str) -> None:
        """Every wire of ``address`` is gone (``left``, ``wireleft``); if it was the master, fail over."""
        self.trust.candidates.pop(address, None)
        self.trust.left(address)
        if self.trust.lose(address) and not self.stopping:
            self.log.warning("master %s left; its results are kept until it is back", address)
            self._failover()

    def on_connections(self, _count: int) -> None:
        """A wire closed: if the master's own wires are gone while one that only claims its
        address stays, ask the master by it; no answer within CHECK_TIMEOUT means it left."""
        master = self.master
        if master and master not in self._wire_checks and not self.node.has_signed_wire(master):
            self._wire_checks.add(master)
            self.spawn(self._check_master_wire(master))

    async def _check_master_wire(self, master: str) -> None:
        try:
            if self.node.has_wire(master):  # else wireleft has done it
                with contextlib.suppress(RpcTimeout, InvalidState):
                    await self.node.rpc(master, "isMaster", {}, timeout=CHECK_TIMEOUT)
                if self.master == master and not self.node.has_signed_wire(master):
                    self.on_left(master)
        finally:
            self._wire_checks.discard(master)

    def _failover(self) -> None:
        """The master is gone: ask the proven ones, the candidates and the known peers now."""
        for address in self.trust.next_to_ask(self.node.peers, self.now()):
            self.ask(address, again=True)

    def failed(self, master: str, exc: Exception) -> None:
        """An RPC to the master failed: unreachable at once, or unanswered twice, ends it.

        Unanswered with nothing at all coming by its wire meanwhile, that wire is renewed.
        """
        if not isinstance(exc, RpcUnreachable) and self.node.renew_silent_wires(master, CHECK_TIMEOUT):
            return  # it comes back on a new wire: found again (proven before) as it does
        self._timeouts = 0 if isinstance(exc, RpcUnreachable) else self._timeouts + 1
        if (isinstance(exc, RpcUnreachable) or self._timeouts >= 2) and self.trust.lose(master):
            self.log.warning("master %s does not answer; its results are kept until it is back", master)
            self._failover()

    def answered(self) -> None:
        """The master answered a request for work: its count of unanswered ones starts again."""
        self._timeouts = 0

    async def check_master(self, address: str) -> bool:
        """Ask a peer ``isMaster``; a yes makes it a candidate, adopted once it proves the key."""
        if not self.trust.allowed(address):
            return False
        try:
            answer = await self.node.rpc(address, "isMaster", {}, timeout=CHECK_TIMEOUT)
        except (RpcTimeout, InvalidState):
            return False
        if not isinstance(answer, dict) or answer.get("isMaster") != "yes":
            self.trust.said_no(address, self.now())
            return False
        caps = MasterCaps.of(answer)
        self.trust.said_yes(address, caps)
        if self.master is not None:
            return address == self.master  # a candidate only, while the master serves
        if address in self.trust.proven and not caps.key_proof:  # master.py: see _challenge
            self._adopt(address, caps, "proved it before")
            await self.on_master(None)
            return True
        return await self._prove(address, caps)

    async def _prove(self, address: str, caps: MasterCaps) -> bool:
        """Have ``address`` prove the key; adopt it if no other master came meanwhile."""
        if not await self._proof_slot(address):
            return False
        try:
            if caps.key_proof:  # its caps as its answer to the challenge says them (workerErrors)
                caps, verified = await self._challenge(address), None
            else:
                verified = await self._asset_proof(address)
        except (RpcTimeout, InvalidState):  # no answer, or it left before we could ask
            self.trust.proof_timed_out(address, self.now())
            self.log.debug("%s did not answer its proof in time", address)
            return False
        except ProofFailed:
            self._proof_failed(address, oracle=not caps.key_proof)
            return False
        finally:
            self._proofs.pop(address, None)
        if self.master is not None:
            self.trust.proven[address] = None  # proven, but the other came first
            return False
        self._adopt(address, caps, "key challenge" if caps.key_proof else "asset hashes")
        await self.on_master(verified)
        return True

    async def _proof_slot(self, address: str) -> bool:
        """Wait for room to run a proof (a stalled one makes room); False if none is allowed."""
        while True:
            now = self.now()
            if self.master is not None or not self.trust.may_prove(address, now):
                return False
            running = [t for t in self._proofs.values() if now - t < PROOF_STALLED]
            if len(running) < PROOF_CONCURRENCY and len(self._proofs) < PROOF_MAX:
                self._proofs[address] = now
                return True
            await asyncio.sleep(0.25)

    async def _challenge(self, address: str) -> MasterCaps:
        """master.py's proof: our fresh nonce, HMAC'd with both addresses under the key;
        then ours, for the nonce of its answer (awaited: it knows us before we ask for work).
        The caps its answer says (only this answer says ``workerErrors``: JS peers never see it)."""
        nonce = os.urandom(32)
        answer = await self.node.rpc(address, "isMaster", {"challenge": nonce.hex()}, timeout=CHECK_TIMEOUT)
        answer = as_dict(answer)
        proof = answer.get("proof")
        expected = master_proof(self._proof_key, nonce, address, self.node.address)
        proven = isinstance(proof, str) and proof.isascii() and hmac.compare_digest(proof, expected)
        theirs = answer.get("workerChallenge")
        if isinstance(theirs, str) and re.fullmatch(r"[0-9a-f]{64}", theirs):
            ours = worker_proof(self._worker_proof_key, bytes.fromhex(theirs), self.node.address, address)
            call = self.call_quietly(address, "proveKey", {"proof": ours})  # its answer says nothing
            if proven:
                await call
            else:  # for its user's sake (see the top of section "Worker: trusting a master")
                self.spawn(call)
        if not proven:
            raise ProofFailed(address)
        return MasterCaps.of(answer)

    async def call_quietly(self, address: str, name: str, args: Any) -> None:
        """A call to master.py whose answer says nothing, and whose failure changes nothing."""
        with contextlib.suppress(RpcTimeout, InvalidState):
            await self.node.rpc(address, name, args, timeout=CHECK_TIMEOUT)

    async def _asset_proof(self, address: str) -> VerifiedAssets:
        """A JS master's proof: every file, decrypted, hashes to what it says."""
        answer = await self.node.rpc(address, "requestExecAssets", {"currentHash": ""}, timeout=120.0)
        try:
            return await asyncio.to_thread(verify_assets, answer, self.crypt, self.settings.folder,
                                           text_reads=True)
        except (WorkerError, ValueError, TypeError, KeyError) as exc:
            self.log.debug("proof of %s: %s", address, exc)
            raise ProofFailed(address) from None

    def _proof_failed(self, address: str, oracle: bool) -> None:
        """The peer is told nothing; it is not asked again for a long while, or, when the proof
        decrypted nothing (``oracle`` False: master.py's challenge), until it comes back."""
        now = self.now()
        if self.trust.proof_failed(address, now, oracle):
            self.log.error("%d peers failed to prove the key lately: no unproven peer is asked until %s "
                      "(pin your master with master= in .env)", len(self.trust.failures),
                      time.strftime("%H:%M", time.localtime(time.time() + self.trust.locked_until(now) - now)))
        if oracle:  # the budget bounds these lines
            self.log.error("%s holds a different transferEncryptToken, or is no master: it says it is the master "
                      "but did not prove that it holds ours; not asked again for %d min",
                      address, PROOF_BAN_SECONDS // 60)
        else:  # a peer may fail again each time it comes back: one line a minute
            self._log(logging.ERROR, "challenge failed", "%s holds a different transferEncryptToken, or is no "
                      "master: it says it is the master but did not prove that it holds ours; asked again when "
                      "it comes back (fix the key in its .env or in ours, then start it again)", address)

    def _adopt(self, address: str, caps: MasterCaps, how: str) -> None:
        self.trust.adopt(address)
        self.node.prioritize(address)  # its wire: never closed for room, never behind a flood
        self.caps = caps
        self._timeouts = 0
        self.log.info("master found: %s (%s)", address, how)
        self.journal.submit(self.journal.set_meta, "proven", json_dumps(list(self.trust.proven)))


class AssetKeeper:
    """The master's task files in the worker folder, their dependencies, and the runner of the task.

    ``sync_assets`` asks the master (``finder.master``) whether our files are
    its (``currentHash``); a ``changed`` answer is checked whole in memory,
    then written (all or nothing), its dependencies installed (pip into
    ``.deps``, npm), and the task loaded in a new runner; the old runner
    finishes its jobs in flight. ``ready`` says work may be taken; ``on_ready``
    is called when it becomes so. Built with the settings, the node, the key,
    the journal (the manifest and the dependencies installed are kept there),
    the master finder, ``spawn``, ``wall`` (``time.time``: when the assets came) and a logger.
    """

    def __init__(self, settings: Settings, node: Bugout, crypt: Crypt, journal: Journal,
                 finder: MasterFinder, *, spawn: Callable[[Awaitable], Any], on_ready: Callable[[], Any],
                 wall: Callable[[], float] = time.time, logger: logging.Logger = log) -> None:
        self.settings = settings
        self.node = node
        self.crypt = crypt
        self.journal = journal
        self.finder = finder
        self.spawn = spawn
        self.on_ready = on_ready
        self.wall = wall
        self.log = logger
        #: the master's files written here: name, workerPath, sha256, received (their hash as written)
        self.manifest: list[dict] = []
        #: the task's runner, or None; runners swapped out, finishing their jobs
        self.runner: Runner | None = None
        self.retired: set[Runner] = set()
        #: the current master's assets are ours and its task is loaded: work may be taken
        self.ready = False
        #: when the assets in use came (wall clock), or None
        self.since: float | None = None
        #: dependencies installed from a trusted list (None: no master yet, the first is trusted)
        self.accepted_deps: set[str] | None = None
        #: why the master's task cannot run here (None: it can, or nothing is known), and the last
        #: (master, its files, why) told to master.py (``workerError``: once per change)
        self.problem: str | None = None
        self.told: tuple | None = None
        # private
        self._refused_deps: set[tuple[str, tuple[str, ...]]] = set()
        self._sync_lock = asyncio.Lock()

    @property
    def deps_folder(self) -> Path:
        return self.settings.folder / ".deps"

    def new_master(self) -> None:
        """A master was adopted: no work from it before its assets are known to be ours."""
        self.ready = False
        self.told = None  # a master.py started again has heard nothing of us

    async def load(self) -> None:
        """The manifest and the dependencies installed, from the journal; files of an older
        layout moved where no import looks."""
        journal, folder = self.journal, self.settings.folder
        self.manifest = await journal.call(self._read_manifest)
        if moved := await asyncio.to_thread(move_earlier_assets, folder, self.manifest):
            self.log.info("%d file(s) of the master moved into %s, where no import looks", moved, folder / ASSET_FOLDER)
        deps = await journal.call(journal.get_json, "dependencies", None)
        if deps is not None and not all(isinstance(d, str) for d in deps):
            self.log.error("%s: the list of installed dependencies is unusable; not used", journal.path)
            deps = []
        self.accepted_deps = None if deps is None else set(deps)

    def _read_manifest(self) -> list[dict]:
        """The asset manifest from the journal (journal thread); unusable entries drop it all."""
        manifest = self.journal.get_json("manifest", [])
        if _manifest_ok(manifest, self.settings.folder):
            return manifest
        self.log.error("%s: the asset list is unusable; the assets will be fetched again", self.journal.path)
        return []

    async def _save_manifest(self) -> None:
        try:
            await self.journal.call(self.journal.set_meta, "manifest", json_dumps(self.manifest))
        except (OSError, sqlite3.Error) as exc:
            self.log.error("cannot save the asset list in %s: %s", self.journal.path, exc)

    def current_hash(self) -> str:
        """Concatenated SHA-256 of the assets, in the master's order, as the master knows them."""
        try:
            return "".join(self._asset_hash(a) for a in self.manifest)
        except OSError:
            return ""

    def _asset_hash(self, asset: dict) -> str:
        """A file's hash; the master's own when the file is as we received it."""
        digest = Helper.get_sha256(safe_asset_path(self.settings.folder, asset["workerPath"]))
        return asset["sha256"] if asset.get("received") == digest and asset.get("sha256") else digest

    async def sync_assets(self) -> bool:
        """``requestExecAssets`` from the proven master; on ``changed`` replace files, deps, task."""
        async with self._sync_lock:
            master = self.finder.master
            if master is None:
                return False
            try:
                current = await asyncio.to_thread(self.current_hash)  # reads every file
                answer = await self.node.rpc(master, "requestExecAssets",
                                             {"currentHash": current}, timeout=120.0)
            except (RpcTimeout, InvalidState) as exc:
                self.log.warning("could not get the task files from master %s: %s", master, _call_failed(exc))
                return False
            self.problem = None
            same = isinstance(answer, dict) and answer.get("status") == "same"
            if same:
                self.ready = self.runner is not None or await self._load_task()
            else:
                self.ready = await self._take_assets(answer)
            if self.ready:
                self.on_ready()  # ready: the job loop asks for work now
            self._tell_master(master, current if same else _asset_key(answer))
            return self.ready

    def _cannot_run(self, why: str, logged: str | None = None) -> None:
        """Log why the master's task cannot run here (``logged``: a fuller line), and keep it for
        master.py (its files' paths as it names them, others relative to the worker folder)."""
        self.log.error("%s", logged or why)
        folder = self.settings.folder
        for prefix in (folder / ASSET_FOLDER, (folder / ASSET_FOLDER).resolve(), folder):
            why = why.replace(str(prefix) + os.sep, "")
        self.problem = why

    def _tell_master(self, master: str, offered: str) -> None:
        """Tell master.py why its task cannot run here, once per change of its files (``offered``)
        or of the reason. Only a master that says ``workerErrors`` (master.py) gets the call."""
        if self.ready:
            self.problem = self.told = None
            return
        told = (master, offered, self.problem)
        if self.problem is None or not self.finder.caps.errors or told == self.told:
            return
        self.told = told
        report = {"name": self.settings.name, "error": self.problem[:MAX_TOLD_ERROR]}
        self.spawn(self.finder.call_quietly(master, "workerError", self.crypt.encrypt_json(report)))

    async def use_proof_assets(self, verified: VerifiedAssets) -> None:
        """A JS master's proof brought every file: write them unless they are ours already."""
        async with self._sync_lock:
            if verified.unified != await asyncio.to_thread(self.current_hash):
                self.ready = await self._take_assets(None, verified)
            else:
                self.ready = self.runner is not None or await self._load_task()
            if self.ready:
                self.on_ready()

    async def _take_assets(self, answer: Any, verified: VerifiedAssets | None = None) -> bool:
        """Check a whole answer in memory, then write it: all or nothing."""
        folder = self.settings.folder
        try:
            if verified is None:
                verified = await asyncio.to_thread(verify_assets, answer, self.crypt, folder,
                                                   text_reads=not self.finder.caps.key_proof)
        except (UnsafeAsset, CryptError, AssetError) as exc:
            self._cannot_run(f"{exc}; nothing was written")
            return False
        if not self._dependencies_trusted(verified.dependencies):
            return False
        self.log.info("assets changed: %d file(s), %d dependency(ies)", len(verified.files),
                 len(verified.dependencies))
        self._remove_assets()
        self.manifest = [entry for _, entry, _ in verified.files]
        try:
            await asyncio.to_thread(_write_assets, verified.files)
        except OSError as exc:
            self._cannot_run(f"cannot write the assets in {folder}: {exc}")
            ready = False
        else:
            await self._save_manifest()
            deps = verified.dependencies
            ready = await (self.install_dependencies(deps) if verified.python else
                           install_npm_packages(folder, deps))
            if not ready:  # the log has the installer's lines
                self.problem = "cannot install %s (the worker's log says why)" % ", ".join(deps)
            ready = ready and await self._load_task()
        if not ready:  # gone: the next sync differs, and the master sends all again (deps too)
            self._remove_assets()
            await self._save_manifest()
        return ready

    def _dependencies_trusted(self, deps: list[str]) -> bool:
        """May this master's dependency list be installed? (see "What the tokens protect")

        The asset-hash proof covers file contents, not the plain ``dependencies``:
        a token-only peer could replay a JS master's files with a list of its own.
        So a master proven only that way, and not pinned, may install only what
        was installed before from a trusted list: master.py's (proved by the key
        challenge), a pinned master's, or the first master this worker ever had.
        """
        master = self.finder.master or ""
        first = self.accepted_deps is None
        accepted = self.accepted_deps or set()
        new = tuple(sorted(set(deps) - accepted))
        if new and not (first or self.finder.caps.key_proof or master in self.finder.trust.pinned):
            if (master, new) not in self._refused_deps and len(self._refused_deps) < 64:
                self._refused_deps.add((master, new))
                self.log.error("master %s, proven by its files only (a JS master), asks for dependencies not "
                          "installed before: %s. A peer that knows only the token could replay a JS master's "
                          "files with a list of its own, so they are not installed and no job is taken. If it "
                          "is your master, pin it: master=%s in .env", master, ", ".join(new), master)
            return False
        if first or new:
            self.accepted_deps = accepted | set(deps)
            self.journal.submit(self.journal.set_meta, "dependencies",
                                json_dumps(sorted(self.accepted_deps)))
        return True

    def _remove_assets(self) -> None:
        """Delete the files we wrote before, and folders they leave empty."""
        folder = self.settings.folder
        for asset in self.manifest:
            try:
                path = safe_asset_path(folder, asset["workerPath"])
            except UnsafeAsset:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
            _remove_empty_parents(path, folder)
        self.manifest = []

    async def install_dependencies(self, deps: list[str]) -> bool:
        """``pip install --target .deps`` what does not import yet; off the loop."""
        paths = [str(self.deps_folder)] + sys.path  # .deps is on no sys.path of ours but thread mode's
        missing = await asyncio.to_thread(lambda: [d for d in deps if not requirement_satisfied(d, paths)])
        if not missing:
            return True
        self.log.info("installing %s into %s", ", ".join(missing), self.deps_folder)
        command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                   "--no-input", "--upgrade", "--target", str(self.deps_folder), *missing]
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            self.log.error("cannot run pip: %s", exc)
            return False
        if not await _install_finished(proc, "pip", missing):
            return False
        importlib.invalidate_caches()
        return True

    async def _load_task(self) -> bool:
        s = self.settings
        names = {a.get("name"): a for a in self.manifest}
        if "task.py" not in names and "task.js" in names:  # task.js alone: a node child runs it
            return await self._start_runner(NodeRunner(
                safe_asset_path(s.folder, names["task.js"]["workerPath"]), s.folder, s.job_timeout,
                concurrency=s.concurrency, memory_mb=s.job_memory_mb))
        if "task.py" not in names:
            self._cannot_run("the master's assets hold no task.py or task.js")
            return False
        path = safe_asset_path(s.folder, names["task.py"]["workerPath"])
        if s.task_runner == "thread":  # the task imports in our process: .deps must be on our path
            use_path(self.deps_folder)
            return await self._start_runner(ThreadRunner(path, s.job_timeout))
        return await self._start_runner(PythonRunner(
            path, s.folder, s.job_timeout, deps=self.deps_folder,
            concurrency=s.concurrency, memory_mb=s.job_memory_mb))

    async def _start_runner(self, runner: Runner) -> bool:
        """Start the runner's first child (the task loads there); use it, or say why not."""
        try:
            await runner.start()
        except TaskProcessError as exc:
            self._cannot_run(str(exc), "cannot load %s: %s%s" % (runner.task_path, exc, "\n" + exc.error[
                "traceback"] if exc.error["traceback"] else ""))
            return False
        old, self.runner = self.runner, runner  # the old one finishes its jobs in flight, then closes
        if old:
            self.retired.add(old)
            self.spawn(self._retire(old))
        self.since = self.wall()
        how = ("in a thread (taskRunner=thread)" if isinstance(runner, ThreadRunner) else
               "%s process %s, up to %d at once" % ("node" if isinstance(runner, NodeRunner) else "python",
                                                    runner.pids[0], runner.concurrency))
        self.log.info("task loaded from %s (%s)", runner.task_path, how)
        return True

    async def _retire(self, runner: Runner) -> None:
        try:
            await runner.wait_closed()
        finally:
            self.retired.discard(runner)

    def abort(self, reason: str) -> None:
        """End every runner's jobs now, each with an error result saying ``reason``."""
        for runner in (*self.retired, self.runner):
            if runner:
                runner.abort(reason)


# The batch-request policy, all of it in JobLoop:
#
# - The loop asks (``requestWork``) when a master is proven, its assets are
#   ours, the task is loaded, the journal takes writes, no held job waits and
#   a child is free. It asks for ``{"getBatch": getBatch, "batchSize":
#   batchSize}``: a batch, or without batches one job, as the JS worker does;
#   then it asks again at once while children are free (one job per free
#   child without batches).
# - It takes at most MAX_BATCH_TASKS jobs from one answer (a master cannot
#   make it hold more), and holds them in the journal until they are done.
# - After an answer with no job it backs off: it asks again only on a nudge
#   (master.py's JOBS_WAITING broadcast, a master adopted, the task loaded)
#   or after IDLE_REQUEST_SECONDS (``idle_seconds``), not each time a job
#   ends. An idle round also checks the assets, or, without a master, asks
#   the known peers whether they are one.

#: Jobs asked for at once with ``getBatch`` (the ``batchSize`` default).
DEFAULT_BATCH_SIZE = 5
#: The most jobs taken from one answer (and read back from the journal at start, twice that).
MAX_BATCH_TASKS = 10_000
#: Seconds an idle worker waits before it asks again (or checks its assets, or looks for a master).
IDLE_REQUEST_SECONDS = 30.0
#: Broadcast by master.py when jobs arrive, so idle workers ask at once.
JOBS_WAITING = {"queue-xec": "jobs waiting"}
#: Results per ``shareResultsBatch`` call (master.py only; JS masters get one each).
RESULT_BATCH = 500


class JobLoop:
    """Asking for jobs, running them, delivering their results: the worker's loop.

    One request in flight at most (the batch-request policy above). Up to the
    runner's ``concurrency`` jobs run at once, each in a task of its own
    (``running``). Results go to the :class:`Outbox` (journaled first) and are
    delivered in the background, one delivery at a time. Built with the
    settings, the node, the key, the journal and outbox, the master finder
    (who the master is, what it can do, whether it failed), the asset keeper
    (ready, the runner), the worker's counters, ``spawn``, ``now``
    (monotonic seconds) and a logger.
    """

    def __init__(self, settings: Settings, node: Bugout, crypt: Crypt, journal: Journal, outbox: Outbox,
                 finder: MasterFinder, keeper: AssetKeeper, *, stats: collections.Counter,
                 spawn: Callable[[Awaitable], Any], now: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.settings = settings
        self.node = node
        self.crypt = crypt
        self.journal = journal
        self.outbox = outbox
        self.finder = finder
        self.keeper = keeper
        self.stats = stats
        self.spawn = spawn
        self.now = now
        self.log = logger
        #: jobs held locally (a batch): (journal seq, job)
        self.jobs: collections.deque[tuple[int, Any]] = collections.deque()
        #: the jobs running, a task each
        self.running: set[asyncio.Task] = set()
        #: seconds idle before asking again (IDLE_REQUEST_SECONDS)
        self.idle_seconds = IDLE_REQUEST_SECONDS
        #: set by :meth:`finish`: no more asking; the loop ends once no held job is left
        self.stopping = False
        #: what /metrics shows: job durations, failures by error type (bounded)
        self.job_seconds = Histogram()
        self.failures: collections.Counter = collections.Counter()
        # private
        self._wake = asyncio.Event()  # a nudge: ask now
        self._finished = asyncio.Event()  # a job ended
        self._may_ask = True
        self._kick_timer: asyncio.TimerHandle | None = None
        self._last_kick = float("-inf")
        self._delivery_lock = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self._job_seq = 0
        self._journal_error_at = float("-inf")

    # asking
    def nudge(self) -> None:
        """Ask for work at the next chance, even after an empty answer."""
        self._wake.set()

    def on_message(self, address: str, message: Any) -> None:
        """A broadcast: master.py's JOBS_WAITING, from the master, is a nudge."""
        if address == self.finder.master and message == JOBS_WAITING:
            self.nudge()

    async def run(self) -> None:
        """The job loop: ask, run, deliver, until stopped with no held job left.

        Jobs held since the last run wait until the task is loaded.
        """
        while not (self.stopping and not self.jobs):
            try:
                await self._step()
            except Exception:  # a bug of ours must not end the loop: say so and go on
                self.log.exception("job loop: unexpected error")
                await asyncio.sleep(1.0)

    async def _step(self) -> None:
        """Start held jobs on free children; ask for work when there is room; else wait."""
        self._finished.clear()  # before looking: a job that ends from now on is noticed
        if self._wake.is_set():  # jobs wait, a master came, the task is ready: ask
            self._wake.clear()  # before asking: a nudge during the ask is kept
            self._may_ask = True
        self._start_jobs()
        room = not self.jobs and len(self.running) < self._capacity()
        if room and self._may_ask and not self.stopping and self._ready_for_work():
            self._may_ask = await self.request_work()
            if self._may_ask:
                return
        if not self.running:
            self.kick_delivery()  # results made since the last request
            await self._idle()
            self._may_ask = True
        elif not room:
            await self._finished.wait()
        elif not await _wait_any(self._wake, self._finished, timeout=self.idle_seconds):
            self._may_ask = True  # the idle timer, while jobs run

    def _capacity(self) -> int:
        return self.keeper.runner.concurrency if self.keeper.runner else 1

    def _ready_for_work(self) -> bool:
        return (self.finder.master is not None and self.keeper.ready and self.keeper.runner is not None
                and not self.outbox.failing)

    async def _idle(self) -> None:
        """Wait for a nudge or the idle timer; then re-check assets, or look for a master."""
        try:
            await asyncio.wait_for(self._wake.wait(), self.idle_seconds)
        except TimeoutError:
            if self.stopping:
                return
            if self.finder.master is not None:
                await self.keeper.sync_assets()
            else:
                self.finder.ask_known()

    async def request_work(self) -> bool:
        """``requestWork``; queue the job or batch. False when none came."""
        master = self.finder.master
        if master is None:
            return False
        args: dict[str, Any] = {"getBatch": self.settings.get_batch, "batchSize": self.settings.batch_size}
        carried: list[tuple[int, str]] = []
        async with contextlib.AsyncExitStack() as stack:
            if self.finder.caps.batches and self._owed() and not self._delivery_lock.locked():
                # master.py takes held results along with the request: one RPC, not two.
                await stack.enter_async_context(self._delivery_lock)
                carried = await self._take_held(master, RESULT_BATCH)
                if carried:
                    args["results"] = self._encrypt_held(carried)
                    if self.finder.caps.run is not None:  # theirs only if its run is still the same
                        args["resultsRun"] = self.finder.caps.run
            try:
                answer = await self.node.rpc(master, "requestWork", args, timeout=30.0)
            except (RpcTimeout, InvalidState) as exc:
                self.outbox.settle(carried, False)
                self.log.warning("could not ask master %s for jobs: %s", master, _call_failed(exc))
                self.finder.failed(master, exc)
                return False
            self.finder.answered()
            self._delivered(carried, answer)
        self._queue_jobs(answer, master)
        return bool(self.jobs)

    def _queue_jobs(self, answer: Any, master: str) -> None:
        """Decrypt the jobs of a requestWork answer, journal them and hold them."""
        if not isinstance(answer, dict):
            return
        items = answer.get("batchTasks") if not answer.get("task") else [answer["task"]]
        if not isinstance(items, list):
            return
        if len(items) > MAX_BATCH_TASKS:
            self.log.error("the master sent %d jobs at once; only the first %d are taken",
                      len(items), MAX_BATCH_TASKS)
            items = items[:MAX_BATCH_TASKS]
        jobs, failures = [], []
        for item in items:
            try:
                if not isinstance(item, str):
                    raise CryptError("a job is not an encrypted string")
                jobs.append(self.crypt.decrypt_json(item))
            except CryptError as exc:
                failures.append(exc)
        if failures:
            self.stats["jobs undecryptable"] += len(failures)
            self.log.error("%d job(s) dropped: %s", len(failures), failures[0])
        if jobs:
            bodies = [storable_json(job) for job in jobs]
            seqs = range(self._job_seq + 1, self._job_seq + 1 + len(jobs))
            self._job_seq += len(jobs)
            self.outbox.given(list(zip(seqs, bodies)), (master, self._master_run(answer)))
            self.jobs.extend(zip(seqs, jobs))

    async def load(self) -> None:
        """Jobs received before the last stop: held again, to run first."""
        journal = self.journal
        for seq, body in await journal.call(journal.read, "jobs", 0, 2 * MAX_BATCH_TASKS):
            self.jobs.append((seq, json.loads(body)))
            self._job_seq = max(self._job_seq, seq)
        self._job_seq = max(self._job_seq, await journal.call(journal.last_seq, "jobs"))
        if self.jobs:
            self.log.info("%d job(s) received before the last stop will run first", len(self.jobs))

    # running
    def _start_jobs(self) -> None:
        """Hand held jobs to free children, up to the runner's concurrency."""
        while self.jobs and self.keeper.runner is not None and len(self.running) < self._capacity():
            spawn(self._run_job(*self.jobs.popleft()), self.running, "job")

    async def _run_job(self, seq: int, job: Any) -> None:
        try:
            self.result_ready(await self.do_job(job), seq)
        finally:
            self.running.discard(asyncio.current_task())  # before the loop wakes up
            self._finished.set()
        # JS masters get each result at once. master.py takes them in bulk: with the
        # next requestWork, or at most a second later while jobs run.
        wait = self._last_kick + 1.0 - self.now() if self.finder.caps.batches else 0.0
        if wait <= 0:
            self.kick_delivery()
        elif self._kick_timer is None:
            self._kick_timer = asyncio.get_running_loop().call_later(wait, self._timed_kick)

    def _timed_kick(self) -> None:
        self._kick_timer = None
        if not self.stopping:
            self.kick_delivery()

    async def do_job(self, job: Any) -> dict:
        """Run one job; a failing task becomes an error result."""
        started = self.now()
        try:
            if self.keeper.runner is None:
                raise InvalidState("no task is loaded")
            data = await self.keeper.runner.run(job)
            strict_json(data)  # no NaN or Infinity leaves the worker, whatever ran the task
        except Exception as exc:  # noqa: BLE001 - a failing task is an error result
            return self._failed(job, exc)
        finally:
            self.job_seconds.observe(self.now() - started)
        self.stats["jobs done"] += 1
        return {**self._result_for(job), "data": data}

    def _failed(self, job: Any, exc: BaseException) -> dict:
        """The error result of ``job``."""
        result = self._result_for(job)
        self.stats["jobs failed"] += 1
        error = error_result(exc)
        kind = str(error["type"])[:64]  # the label set stays small, whatever tasks raise
        self.failures[kind if kind in self.failures or len(self.failures) < MAX_ERROR_TYPES else "other"] += 1
        message = str(error["message"])  # the result keeps it whole; the log line stays short
        if len(message) > LOGGED_MESSAGE:
            message = "%s... (%d characters)" % (message[:LOGGED_MESSAGE], len(message))
        self.log.warning("job %s failed: %s: %s", str(result["jobID"])[:64], kind, message)
        return {**result, "data": None, "error": error}

    def _result_for(self, job: Any) -> dict:
        return {"jobID": job.get("id") if isinstance(job, dict) else None,
                "worker": {"id": self.node.address, "name": self.settings.name}}

    # stopping
    async def finish(self, timeout: float) -> None:
        """Stop asking; finish the jobs held and deliver their results, within ``timeout``.

        Jobs still held when only STOP_DELIVERY_SECONDS (at most a quarter) of
        ``timeout`` are left become error results, their children ended, and
        that time goes to delivering them.
        """
        self.stopping = True
        self.log.info("stopping: finishing %d held job(s)", len(self.jobs) + len(self.running))
        self.nudge()
        grace = min(STOP_DELIVERY_SECONDS, timeout / 4)
        if not await self._drained_within(timeout - grace):
            self._cut_short()
            await self._drained_within(grace)

    async def _drained_within(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._drained(), timeout)
        except TimeoutError:
            return False
        return True

    async def _drained(self) -> None:
        while self.jobs or self.running or self._owed():
            self.kick_delivery()
            await asyncio.sleep(0.05)

    def _cut_short(self) -> None:
        """The stop ran out of time: held jobs become error results, running ones are ended."""
        if not (self.jobs or self.running):
            return
        self.log.warning("stopping: %d job(s) could not finish in time; they are reported as errors",
                    len(self.jobs) + len(self.running))
        while self.jobs:
            seq, job = self.jobs.popleft()
            self.result_ready(self._failed(job, TaskProcessError(
                "the worker was stopped before this job started")), seq)
        self.keeper.abort("the worker was stopped before this job finished")

    # results: made, journaled, delivered (rules: class Outbox)
    def result_ready(self, result: dict, job_seq: int | None = None) -> None:
        """Every result the worker makes comes here: held (and journaled) until delivered."""
        self.outbox.add(job_seq, storable_json(result))
        if self._flusher is None or self._flusher.done():  # one commit in flight takes them all
            self._flusher = self.spawn(self._flush_outbox())

    async def _flush_outbox(self) -> None:
        try:
            await self.outbox.flush()
        except (OSError, sqlite3.Error) as exc:
            self.outbox.failing = True
            if self.now() - self._journal_error_at > 60.0:
                self._journal_error_at = self.now()
                self.log.error("cannot write the journal %s: %s; no new work until it works again",
                          self.journal.path, exc)
            raise
        else:
            self.outbox.failing = False

    async def _take_held(self, master: str, limit: int) -> list[tuple[int, str]]:
        """The oldest held results, committed first (rule 1 of the outbox)."""
        with contextlib.suppress(OSError, sqlite3.Error):
            await self._flush_outbox()
        return await self.outbox.take(master, limit, self.finder.caps.run)

    def _encrypt_held(self, batch: list[tuple[int, str]]) -> str:
        """Held results as master.py takes them: one encrypted JSON list."""
        return json_dumps(self.crypt.encrypt("[" + ",".join(text for _, text in batch) + "]"))

    def kick_delivery(self) -> None:
        """Deliver held results in the background, next to the job loop."""
        if self._owed() and not self._delivery_lock.locked():
            self._last_kick = self.now()
            self.spawn(self._deliver_results())

    async def _deliver_results(self) -> None:
        """Send held results while a proven master is there; one delivery at a time."""
        if self._delivery_lock.locked():
            return  # the running delivery takes the new results along
        async with self._delivery_lock:
            while self._owed():
                if not await self._deliver_some(self.finder.master):
                    return

    async def _deliver_some(self, master: str) -> bool:
        """One ``shareResults`` (or, for master.py, a batch of them); False if kept."""
        batch = await self._take_held(master, RESULT_BATCH if self.finder.caps.batches else 1)
        if not batch:
            return False
        if self.finder.caps.batches:
            call, payload = "shareResultsBatch", self._encrypt_held(batch)
            if self.finder.caps.run is not None:  # theirs only if its run is still the same
                payload = {"results": payload, "run": self.finder.caps.run}
        else:
            call, payload = "shareResults", json_dumps(self.crypt.encrypt(batch[0][1]))
        try:
            if self.finder.caps.acks:
                answer = await self.node.rpc(master, call, payload, timeout=15.0)
                if isinstance(answer, dict) and answer.get("received") is False:
                    known = self.finder.caps.run
                    if self._master_run(answer) not in (None, known):  # it began another run: not its own
                        self.outbox.settle(batch, False)
                        return False
                    raise InvalidState("the master could not read them")
            elif self.node.has_signed_wire(master):  # not has_wire(): a handshake may claim any address
                # sent at once when sent: held in the journal until then (never counted delivered
                # while it waits for echoes in memory), and only to the master still proven
                room = False
                while not room and self.finder.master == master and self.node.has_signed_wire(master):
                    room = await self.node.room_for(master, len(payload) + 1024)  # the packet around: < 1 KiB
                if not (room and self.finder.master == master and self.node.has_signed_wire(master)):
                    self.outbox.settle(batch, False)
                    return False
                self.node.rpc_nowait(master, call, payload)
            else:
                self.outbox.settle(batch, False)
                return False
        except (RpcTimeout, InvalidState) as exc:
            self.outbox.settle(batch, False)
            self.log.warning("%d result(s) kept for later: master %s: %s", len(batch), master, _call_failed(exc))
            if isinstance(exc, RpcTimeout):
                self.finder.failed(master, exc)
            return False
        self._delivered(batch)
        return True

    def _delivered(self, batch: list[tuple[int, str]], answer: Any = None) -> None:
        """These held results reached the master: forget them (unless its ``answer`` to the
        request that carried them says they were not taken: another run of it)."""
        if batch and isinstance(answer, dict) and answer.get("resultsTaken") is False:
            self._master_run(answer)
            self.outbox.settle(batch, False)
        elif batch:
            self.outbox.settle(batch, True)
            self.stats["results delivered"] += len(batch)

    def _owed(self) -> int:
        """Held results the proven master may take: those of the jobs it gave in its run."""
        return self.outbox.owes(self.finder.master, self.finder.caps.run)

    def _master_run(self, answer: dict) -> str | None:
        """The run named in the proven master's ``answer`` (master.py's; None: it names none). A
        new one (it started another run) is the run its held results must match from now on."""
        run = MasterCaps.run_of(answer)
        if run is not None and run != self.finder.caps.run:
            self.finder.caps = dataclasses.replace(self.finder.caps, run=run)
        return run


class Worker:
    """The JS queue-xec Worker's API in Python.

    ``Worker(token, name, loglevel, transfer_encrypt_token, **options)``:
    ``options`` are the other fields of :class:`Settings` (``get_batch``,
    ``batch_size``, ``folder``, ``port``, ``peers``, ``concurrency``, ...),
    and each setting not given comes from ``env`` (default: .env and the
    environment, :func:`load_env`) under its JS key (``getBatch``, ...), else
    its default. Or ``Worker(settings=Settings.load(...))``.

    Tasks run in child processes (``concurrency`` at once, ``auto``: one per
    core), each capped at ``jobMemoryMB``, ended after ``jobTimeout`` seconds;
    ``taskRunner=thread`` runs task.py in a thread of the worker instead.
    SIGTERM waits ``stopTimeout`` seconds for held jobs and their results.

    ``trackers``: comma-separated ws:// or wss:// WebSocket trackers, through
    which workers behind NAT meet the master over WebRTC (unset: bugout's three
    public trackers; empty: off). ``iceServers``: comma-separated
    ``stun:HOST:PORT`` and ``turn:USER:PASS@HOST:PORT[?transport=tcp]`` (unset:
    Google's and Twilio's public STUN; empty: host candidates only).
    ``master`` (key ``master``): bugout addresses to accept as master, and no
    other peer (unset: any peer that proves the key).

    The work is done by three parts: ``finder`` (:class:`MasterFinder`: which
    peer is the master), ``keeper`` (:class:`AssetKeeper`: its task files,
    dependencies and runner) and ``job_loop`` (:class:`JobLoop`: asking,
    running, delivering). The Worker starts and stops them, and says what
    they are doing (status line, /metrics, /healthz, systemd).
    """

    def __init__(self, token: str | None = None, name: str | None = None,
                 loglevel: str | None = None, transfer_encrypt_token: str | None = None,
                 *, env: dict[str, str] | None = None, settings: Settings | None = None,
                 **options: Any) -> None:
        settings = Settings.of(settings, env, {"token": token, "name": name, "loglevel": loglevel,
                                               "transfer_encrypt_token": transfer_encrypt_token, **options})
        #: every setting, as read from the arguments, .env and the environment (read there, not copied)
        self.settings = settings
        if not settings.token:
            raise WorkerError("no token: set token in .env (python worker.py --setup)")
        if not settings.transfer_encrypt_token:
            raise WorkerError("no transferEncryptToken: set it in .env (python worker.py --setup)")
        self.crypt = Crypt(settings.transfer_encrypt_token)
        for address in settings.master:
            if not is_address(address):
                raise WorkerError(f"master= holds {address!r}, which is not a bugout address")
        Logger(settings.loglevel or "info", settings.log_file)
        self.node = Bugout(settings.token, settings)
        #: the crash-safe state in the worker folder, and the results it holds
        self.journal = Journal.of(settings.folder, settings.token, self.crypt)
        #: jobs done, failed, results delivered, checks dropped, ...
        self.stats: collections.Counter = collections.Counter()
        self.finder = MasterFinder(self.node, self.crypt, settings, self.journal, spawn=self._spawn,
                                   on_master=self._master_found, stats=self.stats)
        self.outbox = Outbox(self.journal, lambda address: address == self.finder.master)
        self.keeper = AssetKeeper(settings, self.node, self.crypt, self.journal, self.finder,
                                  spawn=self._spawn, on_ready=lambda: self.job_loop.nudge())
        self.job_loop = JobLoop(settings, self.node, self.crypt, self.journal, self.outbox, self.finder,
                                self.keeper, stats=self.stats, spawn=self._spawn)
        # private
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._done = asyncio.Event()
        self._status: StatusServer | None = None
        self._started = time.monotonic()
        self._reported: tuple = ()

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def master(self) -> str | None:
        """The proven master's address, or None."""
        return self.finder.master

    @property
    def trust(self) -> MasterTrust:
        """Who may command this worker: the proven master, candidates, bans."""
        return self.finder.trust

    @property
    def jobs(self) -> collections.deque[tuple[int, Any]]:
        """Jobs held locally (a batch): (journal seq, job)."""
        return self.job_loop.jobs

    @property
    def deps_folder(self) -> Path:
        return self.keeper.deps_folder

    # the JS Worker's methods (README, "JS API to Python API")
    async def check_master(self, address: str) -> bool:
        """Ask a peer ``isMaster``; a yes makes it a candidate, adopted once it proves the key."""
        return await self.finder.check_master(address)

    async def sync_assets(self) -> bool:
        """``requestExecAssets`` from the proven master; on ``changed`` replace files, deps, task."""
        return await self.keeper.sync_assets()

    def current_hash(self) -> str:
        """Concatenated SHA-256 of the assets, in the master's order, as the master knows them."""
        return self.keeper.current_hash()

    async def install_dependencies(self, deps: list[str]) -> bool:
        """``pip install --target .deps`` what does not import yet; off the loop."""
        return await self.keeper.install_dependencies(deps)

    async def request_work(self) -> bool:
        """``requestWork``; queue the job or batch. False when none came."""
        return await self.job_loop.request_work()

    async def do_job(self, job: Any) -> dict:
        """Run one job; a failing task becomes an error result."""
        return await self.job_loop.do_job(job)

    # lifecycle
    async def start(self) -> Worker:
        """Open the journal, join the swarm and start the job loop."""
        self.settings.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # made here: ours alone
        await self._load_state()
        self.node.register("ping", _pong)
        self.node.on("seen", self.finder.on_peer)
        self.node.on("wireseen", self.finder.on_peer)
        self.node.on("left", self.finder.on_left)
        self.node.on("wireleft", self.finder.on_left)
        self.node.on("connections", self.finder.on_connections)
        self.node.on("message", self.job_loop.on_message)
        await self.node.start()
        log.info("worker %s (%s) in swarm, address %s", self.settings.name, self.settings.folder, self.address)
        self.finder.start()
        self._spawn(self.job_loop.run())
        if self.settings.status_port is not None:
            self._status = await StatusServer(self.settings.status_host, self.settings.status_port,
                                              self.metrics_text, self.health).start()
        self._spawn(self._report())
        self._spawn(self._write_out_unreturned())
        sd_notify("READY=1")
        return self

    async def run_until_stopped(self) -> None:
        """Wait until :meth:`stop` has finished its work."""
        await self._done.wait()

    async def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs held and deliver their results, then leave; within ``timeout``
        (default ``stopTimeout``; :meth:`JobLoop.finish` says how it is shared)."""
        if self._stopping:
            return
        self._stopping = self.finder.stopping = True
        sd_notify("STOPPING=1")
        try:
            await self.job_loop.finish(self.settings.stop_timeout if timeout is None else timeout)
            for task in [*self._tasks, *self.job_loop.running]:
                task.cancel()
            await asyncio.gather(*self._tasks, *self.job_loop.running, return_exceptions=True)
            if self.keeper.runner:
                await self.keeper.runner.wait_closed()
            await self._close_journal()
            if self._status is not None:
                await self._status.close()
            await self.node.close()
        finally:
            self._done.set()  # whatever failed above, the process may exit

    def _spawn(self, coro: Awaitable) -> asyncio.Task:
        return spawn(coro, self._tasks, "worker")

    async def _master_found(self, verified: VerifiedAssets | None) -> None:
        """A master was adopted: deliver what is held, ask it for work once its assets are known
        to be ours (``verified``: the files its proof brought, or None: ask it for them)."""
        self.keeper.new_master()
        self.job_loop.kick_delivery()
        self.job_loop.nudge()
        await (self.keeper.sync_assets() if verified is None else self.keeper.use_proof_assets(verified))

    # what it is doing: a status line, /metrics, /healthz, systemd
    def health(self) -> tuple[bool, dict]:
        """(healthy, body) for /healthz: the loop answers, and a proven master has a wire."""
        uptime = round(time.monotonic() - self._started, 1)
        if self.master is None:
            return False, {"status": "unavailable", "reason": "no proven master", "uptime": uptime}
        if not self.node.has_signed_wire(self.master):  # not has_wire(): a handshake may claim any address
            return False, {"status": "unavailable", "reason": "no wire to the master", "uptime": uptime}
        return True, {"status": "ok", "master": self.master, "held": self.outbox.held, "uptime": uptime}

    def status_line(self) -> str:
        """``status: 1,234 done (20.5/s), 2 failed, 0 held, master bXYZ… (proven), peers 3 (tcp 2, webrtc 1)``."""
        peers = self._peers_by_transport()
        done = self.stats["jobs done"]
        rate = done / max(time.monotonic() - self._started, 1e-9)
        master = "master %s… (proven)" % self.master[:8] if self.master else "no master"
        return "status: {:,} done ({:.1f}/s), {:,} failed, {:,} held, {}, peers {} ({})".format(
            done, rate, self.stats["jobs failed"], self.outbox.held, master, sum(peers.values()),
            ", ".join("%s %d" % kv for kv in sorted(peers.items())) or "none")

    async def _report(self) -> None:
        """The status line at most once a minute while anything happened; systemd's watchdog."""
        watchdog = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 2e6
        step = min(watchdog, STATUS_LINE_SECONDS) if watchdog > 0 else STATUS_LINE_SECONDS
        last = time.monotonic()
        while True:
            await asyncio.sleep(step)
            if watchdog > 0:
                sd_notify("WATCHDOG=1")  # the loop runs: a wedged one is restarted by systemd
            now = time.monotonic()
            seen = (self.stats["jobs done"], self.stats["jobs failed"], self.outbox.held, self.master)
            if now - last >= STATUS_LINE_SECONDS and seen != self._reported:
                self._reported, last = seen, now
                log.info("%s", self.status_line())

    def _peers_by_transport(self) -> collections.Counter:
        return collections.Counter("webrtc" if isinstance(c, RtcConnection) else "tcp"
                                   for c in self.node.links() if c.state is ConnState.OPEN and not c.closing)

    def metrics_text(self) -> str:
        """This worker's figures in the Prometheus text format."""
        out = Exposition()
        loop = self.job_loop
        out.add("jobs_done_total", "counter", "Jobs that gave a result.", self.stats["jobs done"])
        out.add("jobs_failed_total", "counter", "Jobs that gave an error result, by error type.",
                {(("error", kind),): count for kind, count in sorted(loop.failures.items())} or 0)
        out.add("results_held", "gauge", "Results made and not delivered yet.", self.outbox.held)
        out.add("results_delivered_total", "counter", "Results delivered to a master.",
                self.stats["results delivered"])
        out.histogram("job_duration_seconds", "Time a job took in its task.", loop.job_seconds)
        out.histogram("delivery_latency_seconds", "Time from a result made to delivered.",
                      self.outbox.latency)
        peers = self._peers_by_transport()
        out.add("peers", "gauge", "Wires that speak bugout, by transport.",
                {(("transport", kind),): peers[kind] for kind in ("tcp", "webrtc")})
        out.add("master_connected", "gauge", "1 while a proven master has a wire to this worker.",
                int(self.health()[0]))
        if self.keeper.since is not None:
            out.add("assets_age_seconds", "gauge", "Seconds since the task files in use came.",
                    round(time.time() - self.keeper.since, 3))
        out.add("resident_memory_bytes", "gauge", "This process's resident memory.", process_rss_bytes())
        out.add("uptime_seconds", "gauge", "Seconds since the worker started.",
                round(time.monotonic() - self._started, 3))
        for name, help_text, values in self._node_metrics():
            out.add(name, "counter", help_text, values)
        return out.text()

    def _node_metrics(self) -> list[tuple[str, str, Any]]:
        """Bytes and dropped packets, from the node's counters."""
        stats = collections.Counter(self.node.stats) + collections.Counter(self.node.core.stats)
        dropped = {((("reason", key.removeprefix("dropped: ")),)): value for key, value in sorted(stats.items())
                   if key.startswith("dropped: ")}
        return [("bytes_received_total", "Bytes read from peers' wires.", stats["bytes in"]),
                ("bytes_sent_total", "Bytes written to peers' wires.", stats["bytes out"]),
                ("packets_duplicate_total", "bugout payloads that came again: dropped unread.",
                 stats["duplicate"]),
                ("packets_relayed_total", "Others' bugout payloads passed on.", stats["relayed"]),
                ("packets_dropped_total", "bugout packets dropped, by reason.", dropped or 0)]

    # state kept on disk (the journal)
    async def _load_state(self) -> None:
        """Open the journal (taking over an older run's JSON files once) and read it."""
        journal = self.journal
        await journal.call(journal.open)
        await journal.call(self._take_over_json_files)
        await self.keeper.load()
        await self.finder.load()
        if held := await self.outbox.load():
            log.info("%d result(s) from the last run are held for the masters that gave their jobs", held)
        await self.job_loop.load()

    def _take_over_json_files(self) -> None:
        """An older worker's .results.json and .assets.json, taken over once (journal thread)."""
        folder = self.settings.folder
        for name, valid in ((".results.json", _results_ok), (".assets.json", _manifest_ok)):
            path = folder / name
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, RecursionError) as exc:  # a directory, not JSON, too deep
                value, valid = exc, (lambda v, f: False)
            if not valid(value, folder):
                aside = aside_path(path)
                with contextlib.suppress(OSError):
                    os.replace(path, aside)
                log.error("%s is not a list of %s: moved aside to %s", path,
                          "results" if name == ".results.json" else "assets", aside.name)
                continue
            if name == ".results.json":
                self.journal.add_results([(None, json_dumps(r), None) for r in value])  # no master known
            else:
                self.journal.set_meta("manifest", json_dumps(value))
            path.unlink()
            log.info("%s taken over into %s", path, self.journal.path.name)

    async def _write_out_unreturned(self) -> None:
        """Now and every EXPIRY_EVERY: results no master came back for go to UNRETURNED_NAME."""
        while True:
            try:
                await self.outbox.write_out(self.settings.folder, time.time())
            except (OSError, sqlite3.Error) as exc:  # one line a round, at most one each EXPIRY_EVERY
                log.error("cannot write held results to %s: %s; tried again in %s",
                          self.settings.folder / UNRETURNED_NAME, exc, _duration(EXPIRY_EVERY))
            await asyncio.sleep(EXPIRY_EVERY)

    async def _close_journal(self) -> None:
        """Commit what is pending, say what is kept, and close the file."""
        with contextlib.suppress(OSError, sqlite3.Error):
            await self.outbox.flush()
        if self.outbox.held:
            log.warning("%d result(s) could not be delivered; kept for the next run", self.outbox.held)
        await asyncio.to_thread(self.journal.close)


# Command line ###############################################################

def setup(env_path: Path, ask: Callable[[str], str] = input,
          ask_secret: Callable[[str], str] | None = None) -> None:
    """Prompt for the two tokens and write them into ``.env`` (mode 0600).

    The key is not shown as it is typed (``getpass`` on a terminal). An empty
    answer keeps the current value; where there is none, it asks whether this
    starts a new swarm, and only then makes a random token and key. End of
    input (Ctrl-D) raises EOFError and Ctrl-C KeyboardInterrupt, with nothing
    written.
    """
    if ask_secret is None:
        ask_secret = getpass.getpass if ask is input and sys.stdin.isatty() else ask
    current = read_env_file(env_path)
    print(f"Setting up {env_path}: the master's transferEncryptToken and token (empty: keep the current one)")
    new_swarm = False
    key = token = None
    while key is None:
        key = _prompt(ask_secret, "transferEncryptToken (exactly 32 characters; not shown)",
                      current.get("transferEncryptToken"), _key_problem, shown=False)
        if key is None and _starts_new_swarm(ask, "token and key"):
            new_swarm, key = True, secrets.token_hex(16)
    while token is None:
        token = _prompt(ask, "token (at least 20 characters)", current.get("token"), _token_problem)
        if token is None and (new_swarm or _starts_new_swarm(ask, "token")):
            new_swarm, token = True, secrets.token_urlsafe(24)
    pinned = current.get("master", "")
    master = _prompt(ask, "pin one master's address (optional; master.py prints it; empty: %s)" % (
                     "keep " + pinned if pinned else "any master that proves the key"), None,
                     lambda v: None if is_address(v) else "that is not a bugout address")
    write_env_file(env_path, {"transferEncryptToken": key, "token": token,
                              **({"master": master} if master else {})})
    if new_swarm:
        print(f"Wrote {env_path} for a new swarm: give its master the same token and "
              f"transferEncryptToken (copy them from {env_path}).")
    else:
        print(f"Wrote {env_path}. The master must have the same two values.")


def _prompt(ask: Callable[[str], str], label: str, current: str | None,
            problem: Callable[[str], str | None], shown: bool = True) -> str | None:
    """An answer ``problem`` finds nothing wrong with (asked again, saying what is wrong,
    until then); for an empty answer the current value if it will do, else None."""
    while True:
        answer = ask(f"{label}: ").strip()
        why = problem(answer or current or "")
        if answer and why:
            print(f"  {why}")
            continue
        if answer:
            return answer
        if current and not why:
            print(f"  keeping {current if shown else 'the current one'}")
            return current
        if current:
            print(f"  the current one will not do: {why}")
        return None


def _starts_new_swarm(ask: Callable[[str], str], what: str) -> bool:
    """Whether an empty answer means a new swarm: a random value joins no existing one."""
    answer = ask(f"  nothing given: does this start a new swarm, with a random {what}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _key_problem(key: str) -> str | None:
    """What is wrong with a transferEncryptToken (AES-256: 32 bytes), without showing it."""
    size = len(key.encode())
    if size == 32:
        return None
    unit = "characters" if size == len(key) else "bytes in UTF-8"
    return (f"that is {size} {unit}: transferEncryptToken is exactly 32 characters; "
            "copy it from the master's .env")


def _token_problem(token: str) -> str | None:
    if len(token) >= 20:
        return None
    return f"that is {len(token)} characters: the token is at least 20; copy it from the master's .env"


async def run_worker(worker: Worker) -> int:
    """Run until SIGINT/SIGTERM; the first finishes held jobs, a second exits at once."""
    limit_loop_errors()
    signals = 0
    stopping: set[asyncio.Task] = set()

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now")
            os._exit(130)
        spawn(worker.stop(), stopping, "stop")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    try:
        await worker.start()
    except (WorkerError, OSError) as exc:
        log.error("cannot start: %s", exc)
        await worker.node.close()
        return 2
    await worker.run_until_stopped()
    log.info("stopped: %d job(s) done, %d failed, %d result(s) delivered",
             worker.stats["jobs done"], worker.stats["jobs failed"],
             worker.stats["results delivered"])
    return 0


#: What the demo suggests once it is done.
DEMO_NEXT = "next: python worker.py --setup, then python worker.py, to join a master's swarm (README, \"Use it\")"


async def run_demo(jobs: int = 200) -> int:
    """master.py in a process of its own and a worker here, on 127.0.0.1 (no LSD, DHT or trackers).

    The master is a process, not an import: master.py imports worker.py, never the other way.
    """
    import tempfile
    master_py = Path(__file__).resolve().with_name("master.py")
    if not master_py.is_file():
        print(f"worker.py --demo runs master.py, which is not in {master_py.parent}: "
              "run the demo in a clone of the project", file=sys.stderr)
        return 2
    limit_loop_errors()
    Logger("warn")
    with tempfile.TemporaryDirectory(prefix="qx-demo-") as tmp:
        master = _DemoMaster(Path(tmp), master_py)
        try:
            await master.start(jobs)
            return await _demo_worker(master, jobs)
        finally:
            await master.close()


class _DemoMaster:
    """``python master.py`` serving the demo's task and jobs from a folder, loopback only."""

    def __init__(self, root: Path, master_py: Path) -> None:
        self.root, self.master_py = root, master_py
        self.token, self.key = secrets.token_urlsafe(24), secrets.token_hex(16)
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, jobs: int) -> None:
        root = self.root
        (root / "task.py").write_text(DEMO_TASK)
        (root / "jobs.jsonl").write_text("".join(json_dumps({"id": i, "data": str(10_000 + 100 * i)}) + "\n"
                                                 for i in range(jobs)))
        write_env_file(root / ".env", {"token": self.token, "transferEncryptToken": self.key, "host": "127.0.0.1",
                                       "lsd": "false", "dht": "false", "trackers": "", "LOG_LEVEL": "error"})
        # the .env above decides, whatever the environment says; master.py finds worker.py
        # beside it even where PYTHONSAFEPATH is set
        env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(self.master_py.parent), env.get("PYTHONPATH"))))
        errors = os.open(root / "master.log", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, str(self.master_py), "--env", str(root / ".env"), "--task", str(root / "task.py"),
                "--jobs", str(root / "jobs.jsonl"), "--follow", cwd=root, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=errors)
        finally:
            os.close(errors)
        ready = await self.event(30)
        if ready.get("event") != "ready":
            raise WorkerError("master.py did not start: " + self.last_error())
        self.port = int(ready["port"])

    async def event(self, timeout: float) -> dict:
        """master.py's next JSON event on stdout; ``{}`` when it ended or ``timeout`` passed."""
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), max(timeout, 0.0))
            except TimeoutError:
                return {}
            if not line:
                return {}
            with contextlib.suppress(ValueError):
                return as_dict(json.loads(line))

    def last_error(self) -> str:
        """The last line master.py wrote on stderr (its errors only)."""
        lines = (self.root / "master.log").read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no error from master.py"

    async def close(self) -> None:
        """End master.py (its SIGINT: a summary, then exit) and reap it."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _demo_worker(master: _DemoMaster, jobs: int) -> int:
    """A worker here takes the demo master's jobs; a summary, what to try next, the last result."""
    worker = Worker(master.token, "demo-worker", "warn", master.key, env={}, folder=master.root / "worker",
                    host="127.0.0.1", lsd=False, dht=False, peers=["127.0.0.1:%d" % master.port],
                    get_batch=True, batch_size=10, trackers=[])
    started = time.perf_counter()
    await worker.start()
    print("demo: master.py on 127.0.0.1:%d, %d jobs, worker %s" % (master.port, jobs, worker.address))
    terminal = sys.stdout.isatty()  # a log or a pipe gets no line redrawn in place
    results: dict[Any, dict] = {}
    try:
        while len(results) < jobs:
            event = await master.event(started + 60 - time.perf_counter())
            if not event:
                break
            if event.get("event") == "result" and isinstance(event.get("result"), dict):
                results[event["result"].get("jobID")] = event
                if terminal:
                    print("\rdemo: %d/%d results" % (len(results), jobs), end="", flush=True)
        elapsed = time.perf_counter() - started
    finally:
        await worker.stop()
    ok = sorted(results) == list(range(jobs)) and all(
        "error" not in r["result"] and r["result"].get("data") for r in results.values())
    print(("\n" if terminal else "") + "demo: %d/%d jobs in %.2f s (%.0f jobs/s), %s" % (
        len(results), jobs, elapsed, len(results) / elapsed, "all results right" if ok else "FAILED"))
    if not ok:
        print("demo: " + master.last_error(), file=sys.stderr)
        return 1
    print(DEMO_NEXT)
    print(json_dumps(results[jobs - 1]))  # the last job's result, as master.py prints it
    return 0


#: What ``python master.py`` keeps beside its .env: a worker there would share its folder.
MASTER_DB = "master.db"


def refuse_master_folder(folder: Path) -> None:
    """WorkerError when ``folder`` is master.py's: the worker writes the master's files into its
    folder, so it would write over the very files master.py serves from there, and delete them
    when they fail to load (master.py refuses the other way round)."""
    if (folder / MASTER_DB).exists():
        raise WorkerError(f"{folder} holds {MASTER_DB}, master.py's queue: a worker in master.py's folder would "
                          "write over the files master.py serves, and delete them when the task fails to load; "
                          "run the worker in a folder of its own with a copy of .env (README, \"Use it\"), or "
                          f"remove {MASTER_DB} if no master.py uses {folder} any more")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="worker.py", description="queue-xec worker: joins the swarm named by token, "
        "runs the master's jobs and sends back results.")
    parser.add_argument("--setup", action="store_true", help="prompt for the tokens, write .env")
    parser.add_argument("--demo", action="store_true",
                        help="run a local demo master and jobs on loopback only (needs master.py)")
    parser.add_argument("--env", default=".env", metavar="FILE", help="settings file (default .env)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    args = parser.parse_args(argv)
    if args.setup:
        try:
            setup(Path(args.env))
        except (KeyboardInterrupt, EOFError) as exc:
            print()  # the prompt's line ends here
            print("worker.py --setup: %s; %s is unchanged" % (
                "interrupted" if isinstance(exc, KeyboardInterrupt) else "no answer (end of input)",
                args.env), file=sys.stderr)
            return 130 if isinstance(exc, KeyboardInterrupt) else 1
        except OSError as exc:
            print(f"worker.py --setup: cannot write {args.env}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        return 0
    if args.demo:
        try:
            return asyncio.run(run_demo())
        except KeyboardInterrupt:
            print("\nworker.py --demo: interrupted", file=sys.stderr)
            return 130
        except (WorkerError, OSError) as exc:
            print(f"worker.py --demo: {exc}", file=sys.stderr)
            return 2
    try:
        worker = Worker(env=load_env(args.env))
        refuse_master_folder(worker.settings.folder)
    except WorkerError as exc:
        print(f"worker.py: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run_worker(worker))


# Templates ##################################################################
#
# The source the worker hands to other processes, kept last as bottle keeps
# its templates: the program of every task child, the runner of task.js, the
# npm check, and the demo's task.py.

#: Every task child's program, piped into ``python -P -`` (see "Worker: running tasks").
TASK_CHILD_PY = r'''# A task's child process, started by worker.py (queue-xec Python worker) as
# "python -P -" with this program on stdin. It limits itself, then runs task.py
# (argv: TASK DEPS) or becomes another program (argv: --exec PROGRAM ARGS...).
# Jobs come in and answers go out as JSON lines on the socket whose fd is
# QX_RUNNER_FD; stdout and stderr are the task's own (the worker logs them).
import json
import os
import sys

MEMORY_MB = int(os.environ.pop("QX_MEMORY_MB", "") or 0)
# MB more for a program run with --exec (node) until its hello, which says what
# it reserved writable at start (V8's code range: 512 MB in Node 24); the worker
# then sets the cap to MEMORY_MB plus that.
EXEC_START_MB = 1024


def limit(extra_mb):
    """Die with the worker, be the OOM killer's first choice, cap the data size."""
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL (Linux)
    except (ImportError, OSError, AttributeError):
        pass
    if os.getppid() != int(os.environ.pop("QX_PARENT")):
        os._exit(1)  # the worker died before prctl
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if MEMORY_MB:
        import resource
        cap = (MEMORY_MB + extra_mb) << 20
        hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
        cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))  # private writable memory


def describe(exc):
    """An answer's error field: the exception's type, message and traceback."""
    import traceback
    try:
        message = str(exc)
    except Exception:
        message = "(unprintable %s)" % type(exc).__name__
    if isinstance(exc, MemoryError) and MEMORY_MB:
        message = (message + " " if message else "") + "(out of memory: jobMemoryMB=%d)" % MEMORY_MB
    frames = exc.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename == "<stdin>":
        frames = frames.tb_next  # this program's frames: the task's come after
    try:
        trace = "".join(traceback.format_exception(type(exc), exc, frames))
    except Exception:
        trace = ""
    return {"type": type(exc).__name__, "message": message, "traceback": trace}


def not_json(exc):
    text = "the result cannot be sent as JSON: %s" % exc
    if "Out of range float" in str(exc):
        text += " (NaN, Infinity and -Infinity have no JSON form)"
    return {"type": "ValueError", "message": text, "traceback": ""}


def load(path, deps):
    """Task() of task.py, its folder and .deps on the import path after the standard library
    (no file of the master's stands in for a module of it) and before site-packages."""
    import importlib.util
    bases = (sys.base_prefix, sys.base_exec_prefix)
    at = max([i + 1 for i, p in enumerate(sys.path) if p.startswith(bases) and "-packages" not in p] or [0])
    sys.path[at:at] = [os.path.dirname(path), deps]
    spec = importlib.util.spec_from_file_location("task", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["task"] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "Task"):
        raise TypeError("%s defines no class Task" % path)
    task = module.Task()
    if not callable(getattr(task, "run", None)):
        raise TypeError("%s: its Task has no run(job) method" % path)
    return task


async def wait(awaitable):
    return await awaitable


class Jobs:
    """Runs jobs on the task; an async run gets one event loop, kept from job to job."""

    def __init__(self, task):
        self.task = task
        self.loop = None

    def run(self, job):
        result = self.task.run(job)
        if hasattr(result, "__await__"):
            if self.loop is None:
                import asyncio
                self.loop = asyncio.new_event_loop()
                asyncio.set_event_loop(self.loop)
            result = self.loop.run_until_complete(wait(result))
        return result


def serve(channel, jobs):
    encode = json.JSONEncoder(allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode
    for line in channel.makefile("rb"):
        message = json.loads(line)
        try:
            answer = {"id": message["id"], "data": jobs.run(message["job"])}
        except BaseException as exc:  # SystemExit too: it ends the job, not the child
            answer = {"id": message["id"], "error": describe(exc)}
        try:
            text = encode(answer)
        except (TypeError, ValueError, RecursionError) as exc:
            text = encode({"id": message["id"], "error": not_json(exc)})
        channel.sendall(text.encode(errors="surrogatepass") + b"\n")  # json.loads takes it back


def main():
    limit(EXEC_START_MB if sys.argv[1] == "--exec" else 0)
    if sys.argv[1] == "--exec":
        os.execv(sys.argv[2], sys.argv[2:])
    import faulthandler
    import socket
    try:  # a crash in native code prints the task's Python stack; 3.14+ adds the C
        faulthandler.enable(c_stack=False)  # stack, ~25 lines that would push it out of STDERR_TAIL
    except TypeError:  # before 3.14
        faulthandler.enable()
    fd = int(os.environ.pop("QX_RUNNER_FD"))
    os.set_inheritable(fd, False)
    channel = socket.socket(fileno=fd)
    sys.stdout.reconfigure(line_buffering=True)
    try:
        jobs = Jobs(load(sys.argv[1], sys.argv[2]))
    except BaseException as exc:
        channel.sendall(json.dumps({"ready": False, "error": describe(exc)}).encode() + b"\n")
        return 1
    channel.sendall(json.dumps({"ready": True, "python": sys.version.split()[0]}).encode() + b"\n")
    serve(channel, jobs)
    return 0


def exit_now(code):
    """Exit without waiting for threads the task left running."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


try:
    code = main()
except BaseException:
    import traceback
    traceback.print_exc()
    exit_now(1)
exit_now(code)
'''

#: Written into the worker folder as NODE_RUNNER_NAME; each node child runs task.js with it.
NODE_RUNNER_JS = r"""// Written by worker.py (queue-xec Python worker): runs task.js as the JS worker
// does. Jobs come in and answers go out as JSON lines on the socket whose fd is
// QX_RUNNER_FD; stdout and stderr are the task's own (the worker logs them).
'use strict';
const net = require('net');
const path = require('path');
const readline = require('readline');
const util = require('util');

const channel = new net.Socket({ fd: Number(process.env.QX_RUNNER_FD), readable: true, writable: true });
const line = (message) => `${JSON.stringify(message)}\n`;

function describe(error) {
  if (error instanceof Error || util.types.isNativeError(error)) {
    return { type: String(error.name || 'Error'), message: String(error.message), traceback: String(error.stack || '') };
  }
  // `throw 'text'`, `reject(42)`, `reject()`: not an Error, so no name and no stack
  return { type: error === null ? 'null' : typeof error,
           message: typeof error === 'string' ? error : util.inspect(error), traceback: '' };
}

function answer(id, data) {
  try {
    return line({ id, data: data === undefined ? null : data });
  } catch (error) { // a BigInt or a cycle: JSON cannot hold it
    return line({ id, error: describe(error) });
  }
}

async function runJob(task, text) {
  const { id, job } = JSON.parse(text);
  try {
    channel.write(answer(id, await task.run(job)));
  } catch (error) {
    channel.write(line({ id, error: describe(error) }));
  }
}

function load(file) {
  const Task = require(path.resolve(file));
  if (typeof Task !== 'function') {
    throw new TypeError(`${file} must export its Task class (module.exports = Task), not ${typeof Task}`);
  }
  const task = new Task();
  if (typeof task.run !== 'function') throw new TypeError(`${file}: its Task has no run(job) method`);
  return task;
}

// Bytes of private memory mapped writable and executable, not from a file: V8's
// code range, reserved whole at start (512 MB in Node 24, on x64) and counted by
// RLIMIT_DATA though barely used. The worker adds them to jobMemoryMB.
function reserved() {
  let bytes = 0;
  try {
    for (const entry of require('fs').readFileSync('/proc/self/maps', 'utf8').split('\n')) {
      const [range, perms, , , inode] = entry.split(/\s+/);
      if (perms !== 'rwxp' || inode !== '0') continue;
      const [start, end] = range.split('-').map((hex) => parseInt(hex, 16));
      bytes += end - start;
    }
  } catch (error) { // not Linux: no RLIMIT_DATA to fit either
    return 0;
  }
  return bytes;
}

function main() {
  const mapped = reserved(); // before the task's code runs
  let task;
  try {
    task = load(process.argv[2]);
  } catch (error) {
    channel.end(line({ ready: false, error: describe(error) }), () => process.exit(1));
    return;
  }
  channel.write(line({ ready: true, node: process.version, reserved: mapped }));
  readline.createInterface({ input: channel, crlfDelay: Infinity }).on('line', (text) => runJob(task, text));
  channel.on('end', () => process.exit(0));
  channel.on('error', () => process.exit(1));
}

main();
"""

# node -e: print the JSON list of the specs (argv[2:]) that do not resolve from
# the folder (argv[1]) as task.js would require them. An exact version must
# match; a range or tag is left to npm.
_NPM_MISSING_JS = r"""
const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');
const [folder, ...specs] = process.argv.slice(1);
const requireFrom = createRequire(path.join(folder, 'noop.js'));

function installedVersion(name) {
  try {
    return JSON.parse(fs.readFileSync(requireFrom.resolve(`${name}/package.json`), 'utf8')).version || '';
  } catch (e) { /* not there, or its "exports" hide package.json */ }
  let entry;
  try { entry = requireFrom.resolve(name); } catch (e) { return null; }
  if (!path.isAbsolute(entry)) return process.versions.node; // a built-in module
  for (let dir = path.dirname(entry); dir !== path.dirname(dir); dir = path.dirname(dir)) {
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
      if (pkg.name === name) return pkg.version || '';
    } catch (e) { /* no package.json here */ }
  }
  return '';
}

process.stdout.write(JSON.stringify(specs.filter((spec) => {
  const at = spec.indexOf('@', 1);
  const wanted = at < 0 ? '' : spec.slice(at + 1).trim().replace(/^[v=]+/, '');
  const version = installedVersion(at < 0 ? spec : spec.slice(0, at));
  if (version === null) return true;
  if (!wanted || wanted === '*' || wanted === 'x') return false;
  return !/^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?$/.test(wanted) || version !== wanted;
})));
"""

#: The task.py of ``python worker.py --demo``.
DEMO_TASK = '''\
"""Demo task: count the primes below a bound."""


class Task:
    def run(self, job):
        bound = int(job["data"])
        sieve = bytearray([1]) * bound
        sieve[:2] = b"\\0\\0"
        for i in range(2, int(bound ** 0.5) + 1):
            if sieve[i]:
                sieve[i * i::i] = bytes(len(range(i * i, bound, i)))
        return {"bound": bound, "primes": sum(sieve)}
'''

if __name__ == "__main__":
    sys.exit(main())
