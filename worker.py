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
    python worker.py --demo      # a local master, demo jobs, loopback only

Layout (read it top to bottom): errors, the seed classes (Helper, Logger,
Crypt, .env file), codecs (bencode, base58, RIPEMD-160), bugout identity and
packets, the sans-I/O bugout core, the sans-I/O peer wire, transports (TCP,
LSD), the asyncio Bugout node, trackers and WebRTC (a sans-I/O tracker core,
aiortc data channels; for peers behind NAT), the Worker, the command line.

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
     +-- UnsafeAsset (also ValueError): a path or dependency refused
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import enum
import hashlib
import importlib.util
import inspect
import itertools
import json
import logging
import os
import re
import secrets
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import padding as _padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from nacl import bindings as _nacl
from nacl.exceptions import BadSignatureError, CryptoError

__version__ = "0.1.0"

#: The bugout extension name on the BitTorrent wire (BEP 10).
EXT = "bo_channel"
#: bugout's seed and address prefixes (PROTOCOL.md section 3).
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
IDLE_REQUEST_SECONDS = 30.0
DEFAULT_BATCH_SIZE = 5

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


class UnsafeAsset(WorkerError, ValueError):
    """An asset path or dependency name that the worker refuses."""


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


class _Formatter(logging.Formatter):
    """``[DD-MM HH:mm:ss] LEVEL message``, coloured only on a terminal."""

    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        text = "[%s] %-5s %s" % (Helper.local_time(record.created),
                                 record.levelname.lower()[:5],
                                 record.getMessage())
        if record.exc_info and log.isEnabledFor(logging.DEBUG):
            text += "\n" + self.formatException(record.exc_info)
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
            file_handler = logging.FileHandler(file, encoding="utf-8")
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


def json_dumps(value: Any) -> str:
    """``JSON.stringify`` output: no spaces, non-ASCII kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# .env file ##################################################################

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


def load_env(path: str | Path = ".env") -> dict[str, str]:
    """File values overlaid by variables already in the environment (dotenv rule)."""
    values = read_env_file(path)
    for key in values:
        if key in os.environ:
            values[key] = os.environ[key]
    return values


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
    except ValueError:  # OpenSSL 3.0.7+ moves it to the legacy provider
        return _ripemd160_py(data)


_RMD_R = [int(c, 16) for c in (
    "0123456789abcdef" "74d1a6f3c0952eb8" "3ae49f812706db5c" "19ba08c4d37fe562" "40597c2ae138b6fd")]
_RMD_RR = [int(c, 16) for c in (
    "5e7092b4d6f81a3c" "6b370d5aef8c4912" "f5137e69b8c2a04d" "86413bf05c2d97ae" "cfa4158762de039b")]
_RMD_S = [int(n) for n in ["11", "14", "15", "12", "5", "8", "7", "9", "11", "13", "14", "15", "6", "7", "9", "8", "7", "6", "8", "13", "11", "9", "7", "15", "7", "12", "15", "9", "11", "7", "13", "12", "11", "13", "6", "7", "14", "9", "13", "15", "14", "8", "13", "6", "5", "12", "7", "5", "11", "12", "14", "15", "14", "15", "9", "8", "9", "14", "5", "6", "8", "6", "5", "12", "9", "15", "5", "11", "6", "8", "13", "12", "5", "12", "13", "14", "11", "8", "5", "6"]]
_RMD_SS = [int(n) for n in ["8", "9", "9", "11", "13", "15", "15", "5", "7", "7", "8", "11", "14", "14", "12", "6", "9", "13", "15", "7", "12", "8", "9", "11", "7", "7", "12", "7", "6", "15", "13", "11", "9", "7", "15", "11", "8", "6", "6", "14", "12", "13", "5", "14", "13", "13", "7", "5", "15", "5", "8", "11", "14", "14", "6", "14", "6", "9", "12", "9", "12", "5", "15", "8", "8", "5", "12", "9", "12", "5", "14", "6", "8", "13", "6", "5", "15", "13", "11", "11"]]
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


_address_cache: dict[bytes, str] = {}


def address_of(public_key: bytes) -> str:
    """bugout address: bs58check(0x55 || ripemd160(sha512(public key)))."""
    found = _address_cache.get(public_key)
    if found is None:
        if len(_address_cache) > 4096:
            _address_cache.clear()
        digest = ripemd160(hashlib.sha512(public_key).digest())
        found = _address_cache[public_key] = b58check_encode(ADDRESS_PREFIX + digest)
    return found


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


def _text(value: Any) -> str:
    """A bencoded string field as text (JS ``Buffer.toString()``)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, int):
        return str(value)
    raise DecodeError("expected a string field")


class BugoutCore:
    """bugout's packet logic without I/O: payloads in, events and payloads out.

    ``receive_payload`` takes one ``bo_channel`` payload and returns events;
    everything to send goes to :meth:`data_to_send` as ``(payload, origin)``
    pairs, meaning "send to every wire except ``origin``" (``None``: all).
    Time comes in as ``now`` (ms); randomness from ``random`` (``os.urandom``).
    """

    def __init__(self, identifier: str, identity: Identity, *,
                 timeout_ms: int = PEER_TIMEOUT_MS, seen_limit: int = 100_000,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        self.identifier = identifier
        self.identity = identity
        self.timeout_ms = timeout_ms
        #: address -> PeerKeys of every peer seen recently
        self.peers: dict[str, PeerKeys] = {}
        #: counters: dropped packets by reason, duplicates, relayed
        self.stats: collections.Counter = collections.Counter()
        # private
        self._random = random
        self._seen: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._seen_limit = seen_limit
        self._outgoing: list[tuple[bytes, Any]] = []
        self._shared_keys: dict[str, bytes] = {}
        self._identifier_bytes = identifier.encode("utf-8")

    # outgoing
    def data_to_send(self) -> list[tuple[bytes, Any]]:
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

    def _shared_key(self, ek: str) -> bytes:
        key = self._shared_keys.get(ek)
        if key is None:
            if len(self._shared_keys) > 4096:
                self._shared_keys.clear()
            key = _nacl.crypto_box_beforenm(b58decode(ek), self.identity.box_secret)
            self._shared_keys[ek] = key
        return key

    def _emit(self, payload: bytes, origin: Any = None) -> None:
        self._remember(hashlib.sha512(payload).digest()[16:], 0)
        self._outgoing.append((payload, origin))

    def send_ping(self, now: int) -> None:
        """Broadcast a ``p`` packet."""
        self._emit(self.make_packet({"y": "p"}, now))

    def send_leave(self, now: int) -> None:
        """Broadcast an ``x`` packet (we are leaving)."""
        self._emit(self.make_packet({"y": "x"}, now))

    def send_message(self, value: Any, now: int, address: str | None = None) -> None:
        """A JSON message, to everyone or (encrypted) to one address."""
        signed = self.make_packet({"y": "m", "v": json_dumps(value)}, now)
        self._emit(self.seal(address, signed) if address else signed)

    def send_call(self, address: str, name: str, args: Any, now: int) -> bytes:
        """An encrypted RPC call; returns its 8-byte nonce."""
        if address not in self.peers:
            raise InvalidState(f"{address} not seen - no public key")
        nonce = self._random(8)
        fields = {"y": "r", "c": name, "a": json_dumps({} if args is None else args),
                  "rn": nonce}
        self._emit(self.seal(address, self.make_packet(fields, now)))
        return nonce

    def send_response(self, address: str, nonce: bytes, result: Any, now: int) -> None:
        """The encrypted answer to a call."""
        fields = {"y": "rr", "rn": nonce, "rr": json_dumps(result)}
        self._emit(self.seal(address, self.make_packet(fields, now)))

    # incoming
    def saw_peer(self, pk: str, ek: str, now: int) -> list:
        """Record a peer's keys; on first sight emit Seen and broadcast a ping."""
        try:
            address = address_of(b58decode(pk))
        except DecodeError:
            self.stats["bad_pk"] += 1
            return []
        if address == self.identity.address:
            return []
        known = self.peers.get(address)
        self.peers[address] = PeerKeys(pk, ek, now)
        if known is not None and known.last + self.timeout_ms >= now:
            return []
        self.send_ping(now)
        return [Seen(address)]

    def receive_payload(self, payload: bytes, now: int, origin: Any = None) -> list:
        """Handle one payload from the wire ``origin``; returns events."""
        digest = hashlib.sha512(payload).digest()[16:]
        if digest in self._seen:
            self.stats["duplicate"] += 1
            return []
        self._remember(digest, now)
        try:
            packet, signed, for_us = self._open(payload)
            events = self._verify(packet, signed, for_us, now)
        except DecodeError as exc:
            self.stats["dropped"] += 1
            self.stats[f"dropped: {exc}"] += 1
            events, for_us = [], False
        if not for_us:  # an envelope we opened was for us alone: no relay
            self.stats["relayed"] += 1
            self._outgoing.append((payload, origin))
        return events

    def _remember(self, digest: bytes, now: int) -> None:
        seen = self._seen
        seen[digest] = now
        while len(seen) > self._seen_limit:
            seen.popitem(last=False)

    def _open(self, payload: bytes) -> tuple[dict, dict, bool]:
        """Decode (and unbox) a payload into (packet fields, outer dict, was boxed)."""
        outer = bdecode(payload)
        if not isinstance(outer, dict):
            raise DecodeError("payload is not a dict")
        boxed = "e" in outer and "n" in outer and "ek" in outer
        if boxed:
            outer = self._unbox(outer)
        p, s = outer.get("p"), outer.get("s")
        if not isinstance(p, bytes) or not isinstance(s, bytes):
            raise DecodeError("no signed packet")
        packet = bdecode(p)
        if not isinstance(packet, dict):
            raise DecodeError("packet is not a dict")
        return packet, outer, boxed

    def _unbox(self, outer: dict) -> dict:
        e, n, ek = outer["e"], outer["n"], outer["ek"]
        if not (isinstance(e, bytes) and isinstance(n, bytes) and isinstance(ek, bytes)):
            raise DecodeError("bad envelope")
        if len(n) != 24 or len(e) < 16:
            raise DecodeError("bad envelope")
        try:
            key = self._shared_key(ek.decode("latin-1"))
            plain = _nacl.crypto_box_open_afternm(e, n, key)
        except (CryptoError, ValueError, TypeError):
            raise DecodeError("not for us") from None
        inner = bdecode(plain)
        if not isinstance(inner, dict):
            raise DecodeError("envelope holds no dict")
        return inner

    def _verify(self, packet: dict, outer: dict, boxed: bool, now: int) -> list:
        """Check signature, identifier and age; then turn the packet into events."""
        pk, ek = _text(packet.get("pk", b"")), _text(packet.get("ek", b""))
        t = packet.get("t")
        try:
            _nacl.crypto_sign_open(outer["s"] + outer["p"], b58decode(pk))
        except (BadSignatureError, ValueError, TypeError):
            raise DecodeError("bad signature") from None
        if packet.get("i") != self._identifier_bytes:
            raise DecodeError("other identifier")
        if not isinstance(t, int) or t + self.timeout_ms <= now:
            raise DecodeError("too old")
        if pk == self.identity.pk:
            self.stats["own packet"] += 1
            return []
        events = self.saw_peer(pk, ek, now)
        address = address_of(b58decode(pk))
        return events + self._dispatch(_text(packet.get("y", b"")), packet, address, boxed)

    def _dispatch(self, kind: str, packet: dict, address: str, boxed: bool) -> list:
        if kind == "m":
            value = _json_field(packet, "v")
            return [] if value is None else [Message(address, value, boxed)]
        if kind == "r":
            return [Call(address, _text(packet.get("c", b"")), _json_field(packet, "a"),
                         _nonce(packet))]
        if kind == "rr":
            return [Response(address, _nonce(packet), _json_field(packet, "rr"))]
        if kind == "p":
            return [Ping(address)]
        if kind == "x":
            self.peers.pop(address, None)
            return [Left(address, "left")]
        self.stats["unknown type"] += 1
        return []

    def expire(self, now: int) -> list:
        """Forget peers silent longer than the timeout; returns Left events."""
        gone = [a for a, p in self.peers.items() if p.last + self.timeout_ms < now]
        for address in gone:
            del self.peers[address]
        return [Left(address, "timeout") for address in gone]


def _json_field(packet: dict, key: str) -> Any:
    """A JSON text field; malformed JSON is None, as bugout treats it."""
    try:
        return json.loads(_text(packet.get(key, b"")))
    except ValueError:
        return None


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


class WireState(enum.Enum):
    HANDSHAKE = 1
    OPEN = 2
    CLOSED = 3
    ERROR = 4


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
        if initiator:
            self._out.append(handshake_bytes(infohash, peer_id, dht_port is not None))

    def _set_state(self, state: WireState) -> None:
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
        if self.state is not WireState.ERROR:
            self._set_state(WireState.CLOSED)

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
        body = bytes(buf[4:4 + length])
        del buf[:4 + length]
        if length:
            self._on_message(body[0], body[1:])
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
        if message_id == MSG_EXTENDED and body:
            self._on_extended(body[0], body[1:])
        elif message_id == MSG_REQUEST and len(body) == 12 and self.remote_reserved[7] & 0x04:
            # We never unchoke: a request is refused (BEP 6) rather than served.
            self._out.append(frame(MSG_REJECT, body))
        # Everything else (have_all, bitfield, port, choke, ...) needs nothing.

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


# TCP transport ##############################################################

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


class WireConnection(asyncio.Protocol):
    """Moves bytes between one TCP socket and its :class:`PeerWire`."""

    def __init__(self, node: Bugout, initiator: bool, dialed: tuple | None = None) -> None:
        self.node = node
        self.initiator = initiator
        #: (host, port) we dialed, for outgoing connections
        self.dialed = dialed
        self.wire = node._new_wire(initiator)
        #: the bugout address of the peer, once its extended handshake came
        self.address: str | None = None
        self.transport: asyncio.Transport | None = None
        self.last_keepalive = time.monotonic()
        self._sock: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._sock = transport.get_extra_info("socket")
        _tune_socket(transport)
        self.node._connections.add(self)
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._sock is not None:
            _quickack(self._sock)
        wire = self.wire
        wire.receive_data(data)
        events = wire.events_received()
        self._flush()
        if events:
            self.node._on_wire_events(self, events)
        if wire.state is WireState.ERROR:
            self.node.stats["peers dropped for bad input"] += 1
            log.info("dropping peer %s: %s", self.peer_name, wire.error)
            self.close()

    def eof_received(self) -> None:
        self.wire.receive_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.node._connection_lost(self)

    @property
    def peer_name(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return "{}:{}".format(*tuple(peer[:2])) if peer else "?"

    @property
    def closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def send_payload(self, payload: bytes) -> None:
        """Send one ``bo_channel`` payload if the peer can take it."""
        if self.wire.ready and not self.closing:
            self.wire.send_extension(payload)
            self._flush()

    def _flush(self) -> None:
        data = self.wire.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            if self._sock is not None:  # sending turns delayed ACKs back on
                _quickack(self._sock)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# LSD (BEP 14) ###############################################################

def lsd_announcement(infohash: bytes, port: int, cookie: str) -> bytes:
    """A BT-SEARCH datagram as bittorrent-lsd sends it."""
    return ("BT-SEARCH * HTTP/1.1\r\nHost: %s:%d\r\nPort: %d\r\nInfohash: %s\r\n"
            "cookie: %s\r\n\r\n\r\n" % (LSD_HOST, LSD_PORT, port, infohash.hex(), cookie)
            ).encode("ascii")


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
    def __init__(self, node: Bugout) -> None:
        self.node = node

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        parsed = parse_lsd(data)
        if parsed is None:
            self.node.stats["lsd ignored"] += 1
            return
        port, hashes, cookie = parsed
        if cookie != self.node._lsd_cookie and self.node.infohash in hashes:
            self.node.add_peer(addr[0], port)


def _lsd_socket() -> socket.socket:
    """UDP socket on 6771, in the LSD multicast group, shareable with others."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", LSD_PORT))
    group = socket.inet_aton(LSD_HOST) + socket.inet_aton("0.0.0.0")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    sock.setblocking(False)
    return sock


# The bugout node ############################################################

Handler = Callable[[str, Any], Any]


class Bugout:
    """A bugout peer on asyncio: the JS Bugout's API over TCP, LSD and WebRTC.

    ``trackers`` (None: bugout's three wss:// trackers; empty: WebRTC off),
    ``ice_servers`` (None: public STUN; empty: host candidates only),
    ``max_peers`` and ``announce_interval`` go to :class:`WebRtcTransport`.

    Events (``on(name, fn)``): ``seen(address)``, ``left(address)``,
    ``message(address, value)``, ``ping(address)``, ``wireseen(address)``,
    ``connections(count)``, ``rpc(address, name, args)``.
    """

    def __init__(self, identifier: str, *, seed: str | None = None,
                 host: str = "0.0.0.0", port: int = 0, peers: Iterable[str] = (),
                 lsd: bool = True, heartbeat: float = 30.0,
                 max_message: int = DEFAULT_MAX_MESSAGE,
                 timeout_ms: int = PEER_TIMEOUT_MS, listen: bool = True,
                 trackers: str | Iterable[str] | None = None,
                 ice_servers: str | Iterable[str] | None = None,
                 max_peers: int | None = None, announce_interval: float | None = None) -> None:
        self.identifier = identifier
        self.identity = Identity(seed)
        self.core = BugoutCore(identifier, self.identity, timeout_ms=timeout_ms)
        self.infohash, self.metadata = infohash_of(identifier)
        self.peer_id = make_peer_id()
        self.host, self.port, self.listen = host, port, listen
        self.lsd, self.heartbeat, self.max_message = lsd, heartbeat, max_message
        self.static_peers = [_split_hostport(p) for p in peers]
        #: counters: connections refused, peers dropped, ... (with core.stats)
        self.stats: collections.Counter = collections.Counter()
        # private
        self._api: dict[str, Handler] = {}
        self._listeners: dict[str, list[Callable]] = collections.defaultdict(list)
        self._pending: dict[bytes, asyncio.Future] = {}
        self._connections: set[WireConnection] = set()
        self._dialing: set[tuple] = set()
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.AbstractServer | None = None
        self._lsd_transport: asyncio.DatagramTransport | None = None
        self._lsd_cookie = "bittorrent-lsd-" + self.peer_id.hex()
        self._extended = {"ek": self.identity.ek, "id": identifier, "m": OUR_EXT_IDS,
                          "metadata_size": len(self.metadata), "pk": self.identity.pk}
        self._closed = False
        #: WebRTC through WebSocket trackers (off without trackers)
        self.webrtc = WebRtcTransport(self, trackers, ice_servers, max_peers=max_peers,
                                      announce_interval=announce_interval)

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

    def connections(self) -> int:
        """Number of open wires that speak bugout."""
        return sum(1 for c in self._connections if c.wire.ready and not c.closing)

    # lifecycle
    async def start(self) -> Bugout:
        """Listen, start discovery and the timers."""
        loop = asyncio.get_running_loop()
        if self.listen:
            self._server = await loop.create_server(
                lambda: WireConnection(self, False), self.host, self.port,
                reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]
            log.info("listening on %s:%d", self.host, self.port)
        for host, port in self.static_peers:
            self._spawn(self._keep_peer(host, port))
        if self.lsd:
            await self._start_lsd()
        await self.webrtc.start()
        self._spawn(self._timers())
        return self

    async def close(self) -> None:
        """Say goodbye (``x``), close wires and tasks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.core.send_leave(_now())
        self._flush_core()
        if self._server is not None:
            self._server.close()
        if self._lsd_transport is not None:
            self._lsd_transport.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let transports write the goodbye
        await self.webrtc.close()
        for conn in list(self._connections):
            conn.close()
        for future in self._pending.values():
            future.cancel()

    def _spawn(self, coro: Awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed: %r", task.exception(),
                      exc_info=task.exception())

    # API as in JS bugout
    def on(self, event: str, callback: Callable) -> None:
        """Subscribe to an event (see the class docstring)."""
        self._listeners[event].append(callback)

    def emit(self, event: str, *args: Any) -> None:
        for callback in list(self._listeners.get(event, ())):
            try:
                result = callback(*args)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:  # a listener's bug must not break the wire
                log.exception("listener for %s failed", event)

    def register(self, name: str, handler: Handler) -> None:
        """Serve RPC ``name``: ``handler(address, args)`` returns (or awaits) the answer."""
        self._api[name] = handler

    async def rpc(self, address: str, call: str, args: Any = None,
                  timeout: float | None = 30.0) -> Any:
        """Call ``call`` on ``address`` and await its JSON answer."""
        nonce = self.core.send_call(address, call, {} if args is None else args, _now())
        future = asyncio.get_running_loop().create_future()
        self._pending[nonce] = future
        self._flush_core()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RpcTimeout(f"{call} on {address}: no answer in {timeout}s") from None
        finally:
            self._pending.pop(nonce, None)

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

    # connections
    def add_peer(self, host: str, port: int) -> None:
        """Dial ``host:port`` once, in the background."""
        if (host, port) in self._dialing or self._closed:
            return
        if port == self.port and host in ("127.0.0.1", "localhost", self.host):
            return  # ourselves
        if any(c.dialed == (host, port) for c in self._connections):
            return
        self._spawn(self._dial(host, port))

    async def _dial(self, host: str, port: int) -> WireConnection | None:
        self._dialing.add((host, port))
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: WireConnection(self, True, (host, port)), host, port), 5.0)
            return conn  # type: ignore[return-value]
        except (TimeoutError, OSError) as exc:
            log.debug("dial %s:%s failed: %s", host, port, exc)
            return None
        finally:
            self._dialing.discard((host, port))

    async def _keep_peer(self, host: str, port: int) -> None:
        """Stay connected to a configured peer; back off while it is away."""
        delay = 0.5
        while not self._closed:
            if not any(c.dialed == (host, port) for c in self._connections):
                conn = await self._dial(host, port)
                delay = 0.5 if conn else min(delay * 2, 30.0)
            await asyncio.sleep(delay)

    def _new_wire(self, initiator: bool) -> PeerWire:
        return PeerWire(self.infohash, self.peer_id, self._extended, initiator=initiator,
                        metadata=self.metadata, max_message=self.max_message)

    def _connection_lost(self, conn: WireConnection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            self.emit("connections", self.connections())
            if conn.address and not any(c.address == conn.address for c in self._connections):
                self.emit("wireleft", conn.address)

    def _on_wire_events(self, conn: WireConnection, events: list) -> None:
        for event in events:
            if isinstance(event, ExtensionPayload):
                self._dispatch(self.core.receive_payload(event.payload, _now(), conn))
            elif isinstance(event, Handshake):
                self._check_duplicate(conn, event.peer_id)
            elif isinstance(event, ExtendedHandshake):
                self._on_extended(conn, event.fields)
        self._flush_core()

    def _check_duplicate(self, conn: WireConnection, peer_id: bytes) -> None:
        """One wire per peer: keep the one dialed by the lower peer id."""
        if peer_id == self.peer_id:
            conn.close()
            return
        for other in list(self._connections):
            if other is conn or other.wire.remote_peer_id != peer_id:
                continue
            dialer = self.peer_id if conn.initiator else peer_id
            other_dialer = self.peer_id if other.initiator else peer_id
            loser = conn if dialer == other_dialer or other_dialer < dialer else other
            log.debug("duplicate wire to %s, closing one", peer_id)
            self.stats["duplicate wires"] += 1
            loser.close()
            if loser is conn:
                return

    def _on_extended(self, conn: WireConnection, fields: dict) -> None:
        pk, ek = fields.get("pk"), fields.get("ek")
        if not isinstance(pk, bytes) or not isinstance(ek, bytes):
            return  # not a bugout peer: nothing to learn
        if fields.get("id") not in (None, self.identifier.encode("utf-8")):
            return
        now = _now()
        events = self.core.saw_peer(pk.decode("latin-1"), ek.decode("latin-1"), now)
        with contextlib.suppress(DecodeError):
            conn.address = address_of(b58decode(pk))
        self.emit("connections", self.connections())
        self._dispatch(events)
        if conn.address and conn.address != self.address:
            self.emit("wireseen", conn.address)

    def _flush_core(self) -> None:
        for payload, origin in self.core.data_to_send():
            for conn in self._connections:
                if conn is not origin:
                    conn.send_payload(payload)

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
                self.emit("left", event.address)

    def _serve(self, call: Call) -> None:
        """Answer a call: its handler's result, or bugout's error for unknown names."""
        self.emit("rpc", call.address, call.name, call.args)
        handler = self._api.get(call.name)
        if handler is None:
            self._answer(call, {"error": "No such API call."})
            return
        try:
            result = handler(call.address, call.args)
        except Exception as exc:
            log.exception("rpc %s failed", call.name)
            result = {"error": f"{exc.__class__.__name__}: {exc}"}
        if inspect.isawaitable(result):
            self._spawn(self._answer_later(call, result))
        elif result is not NO_ANSWER:
            self._answer(call, result)

    async def _answer_later(self, call: Call, pending: Awaitable) -> None:
        try:
            result = await pending
        except Exception as exc:
            log.exception("rpc %s failed", call.name)
            result = {"error": f"{exc.__class__.__name__}: {exc}"}
        if result is not NO_ANSWER:
            self._answer(call, result)
            self._flush_core()

    def _answer(self, call: Call, result: Any) -> None:
        if call.address in self.core.peers:
            self.core.send_response(call.address, call.nonce, result, _now())

    # discovery and timers
    async def _start_lsd(self) -> None:
        try:
            sock = _lsd_socket()
        except OSError as exc:
            log.warning("LSD is off: %s", exc)
            return
        loop = asyncio.get_running_loop()
        self._lsd_transport, _ = await loop.create_datagram_endpoint(
            lambda: _LsdProtocol(self), sock=sock)
        self._spawn(self._lsd_announce())

    async def _lsd_announce(self) -> None:
        datagram = lsd_announcement(self.infohash, self.port, self._lsd_cookie)
        # Twice more early on: a peer that started at the same instant may not
        # have joined the group yet (bittorrent-lsd announces once, then every 5 min).
        for delay in itertools.chain((1.0, 4.0), itertools.repeat(LSD_INTERVAL)):
            if self._lsd_transport is None or self._closed:
                return
            with contextlib.suppress(OSError):
                self._lsd_transport.sendto(datagram, (LSD_HOST, LSD_PORT))
            await asyncio.sleep(delay)

    async def _timers(self) -> None:
        """Heartbeat pings, peer expiry and keep-alives."""
        next_ping = time.monotonic() + self.heartbeat
        while not self._closed:
            await asyncio.sleep(min(self.heartbeat, KEEPALIVE_SECONDS, 5.0))
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + self.heartbeat
                self.core.send_ping(_now())
                self._dispatch(self.core.expire(_now()))
                self._flush_core()
            for conn in list(self._connections):
                if conn.wire.state is WireState.OPEN and now - conn.last_keepalive >= KEEPALIVE_SECONDS:
                    conn.last_keepalive = now
                    conn.wire.send_keepalive()
                    conn._flush()


#: A handler returns this to send no answer (as the JS master for shareResults).
NO_ANSWER = object()


def _now() -> int:
    return int(time.time() * 1000)


def _split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise WorkerError(f"peer {text!r} is not host:port")
    return host.strip("[]"), int(port)


# Trackers and WebRTC ########################################################
#
# Peers that no one can dial (browsers, workers behind NAT) meet the way
# WebTorrent's do (PROTOCOL.md section 6): each announces the infohash to
# WebSocket trackers with a few SDP offers, the tracker relays every offer to
# another peer of the swarm and relays its answer back, and the BitTorrent
# wire then runs over the RTCDataChannel as a byte stream.
#
# TrackerClient is the sans-I/O core of one tracker (frames and time in, frames
# and events out); TrackerSession moves its frames over a WebSocket;
# WebRtcTransport makes the peer connections with aiortc; RtcConnection plugs
# each data channel into Bugout's connection set, as WireConnection does a
# TCP socket. aiortc and websockets are imported only when trackers are used.

#: bugout's trackers (bugout index.js), used when none are configured.
DEFAULT_TRACKERS = ("wss://hub.bugout.link", "wss://tracker.openwebtorrent.com",
                    "wss://tracker.btorrent.xyz")
#: simple-peer's ICE servers, as the JS peers use (aiortc takes the first STUN one).
DEFAULT_ICE_SERVERS = ("stun:stun.l.google.com:19302", "stun:global.stun.twilio.com:3478")
#: WebTorrent's cap on connections per torrent (maxConns).
DEFAULT_MAX_PEERS = 55
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
    """A ``failure reason`` or ``warning message`` from the tracker."""
    message: str


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


class TrackerClient:
    """One WebSocket tracker without I/O: JSON frames and ``now`` in; frames and events out.

    The adapter opens the socket when :meth:`start_connecting` says so, reports
    :meth:`connection_made` / :meth:`connection_lost`, feeds every frame to
    :meth:`receive_frame`, calls :meth:`tick` by :meth:`next_deadline`, and
    acts on :meth:`events_received`; :meth:`data_to_send` gives JSON texts.
    Ids (``info_hash``, ``peer_id``, ``offer_id``) are 20-char latin-1 strings.
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

    def connection_lost(self, now: float) -> None:
        """The socket failed or closed: drop the offers, back off, reconnect."""
        if self.state not in (TrackerState.CONNECTING, TrackerState.OPEN):
            return
        self._drop_all("tracker connection lost")
        factor = 1.0 + self._random(1)[0] / 510.0
        self._reconnect_at = now + min(RECONNECT_LAST, RECONNECT_FIRST * 2 ** min(self.retries, 16)) * factor
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
    def receive_frame(self, frame: Any, now: float) -> None:
        """One frame from the tracker: JSON text or its parsed value."""
        if self.state is not TrackerState.OPEN:
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

    def _on_announce(self, frame: dict, now: float) -> None:
        failure = frame.get("failure reason")
        if failure is not None:
            self.stats["failures"] += 1
            self._events.append(TrackerWarning(str(failure)))
            return
        if frame.get("warning message") is not None:
            self._events.append(TrackerWarning(str(frame["warning message"])))
        self._on_interval(frame)
        peer_id, offer_id = frame.get("peer_id"), frame.get("offer_id")
        if "offer" in frame or "answer" in frame:
            if not (_is_binary_id(peer_id) and _is_binary_id(offer_id)):
                self.stats["bad offers or answers"] += 1
            elif "offer" in frame:
                self._on_offer(peer_id, offer_id, _sdp_of(frame["offer"], "offer"))
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

    def _on_offer(self, peer_id: str, offer_id: str, sdp: str | None) -> None:
        if sdp is None:
            self.stats["bad offers or answers"] += 1
            return
        self.stats["offers relayed"] += 1
        self._events.append(RelayedOffer(peer_id, offer_id, sdp))

    def _on_answer(self, peer_id: str, offer_id: str, sdp: str | None) -> None:
        if sdp is None or offer_id not in self._pending:
            self.stats["answers unexpected"] += 1
            return
        del self._pending[offer_id]
        self.stats["answers"] += 1
        self._events.append(RelayedAnswer(peer_id, offer_id, sdp))


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# Trackers and WebRTC: configuration #########################################

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


def _split_setting(value: str | Iterable[str]) -> list[str]:
    """A comma-separated setting (or a list) as a list of non-empty items."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item and item.strip()]


def parse_trackers(value: str | Iterable[str] | None) -> list[str]:
    """Tracker URLs: None is bugout's defaults, empty is none; only ws:// and wss://."""
    urls = list(DEFAULT_TRACKERS) if value is None else _split_setting(value)
    for url in urls:
        if not re.fullmatch(r"wss?://[^\s/?#]+(/[^\s]*)?", url):
            raise WorkerError(f"tracker {url!r}: only ws:// and wss:// URLs are WebSocket trackers")
    return urls


def parse_ice_servers(value: str | Iterable[str] | None) -> list[IceServer]:
    """ICE servers: None is the JS peers' STUN servers, empty is host candidates only."""
    return [IceServer.parse(s) for s in (DEFAULT_ICE_SERVERS if value is None else _split_setting(value))]


def _config_list(env: dict, key: str, value: Any) -> Any:
    """An explicit value, else the env key (where empty means none), else None (the default)."""
    return value if value is not None else env.get(key)


# Trackers and WebRTC: asyncio ###############################################

def _mono() -> float:
    return time.monotonic()


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
            if client.start_connecting(_mono()):
                await self._connect()
            else:
                self._handle_events()
                deadline = client.next_deadline()
                await asyncio.sleep(1.0 if deadline is None else max(0.0, deadline - _mono()))

    async def _connect(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException
        try:
            ws = await connect(self.client.url, open_timeout=15, close_timeout=2,
                               compression=None, max_size=1 << 20)
        except (OSError, TimeoutError, WebSocketException) as exc:
            log.debug("tracker %s: cannot connect: %s", self.client.url, exc)
            self.client.connection_lost(_mono())
            return
        self._ws = ws
        self.client.connection_made(_mono())
        try:
            await self._read(ws)
        except (OSError, WebSocketException) as exc:
            log.debug("tracker %s: connection lost: %s", self.client.url, exc)
        finally:
            self._ws = None
            self.client.connection_lost(_mono())
            self._handle_events()
            with contextlib.suppress(OSError, WebSocketException):
                await ws.close()

    async def _read(self, ws: Any) -> None:
        client = self.client
        while True:
            await self.flush()
            deadline = client.next_deadline()
            try:
                async with asyncio.timeout(None if deadline is None else max(0.0, deadline - _mono())):
                    text = await ws.recv()
            except TimeoutError:
                continue
            log.debug("< tracker %s %.200s", client.url, text)
            client.receive_frame(text, _mono())

    def _handle_events(self) -> None:
        self.client.tick(_mono())
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
        self.client.close(_mono())
        await self.flush()
        if self._ws is not None:
            from websockets.exceptions import WebSocketException
            with contextlib.suppress(OSError, WebSocketException):
                await self._ws.close()


class RtcConnection:
    """Moves bytes between one RTCDataChannel and its :class:`PeerWire`.

    It stands in Bugout's connection set like a :class:`WireConnection`, so
    relay, duplicate wires, peers and RPC work the same over WebRTC. The wire
    is a byte stream, written in messages of at most :data:`RTC_CHUNK` bytes.
    """

    def __init__(self, rtc: WebRtcTransport, pc: Any, offerer: bool,
                 remote_id: str | None = None) -> None:
        self.rtc = rtc
        self.node = rtc.node
        self.pc = pc
        #: True when we made the offer: we count as the dialer (Bugout._check_duplicate)
        self.initiator = offerer
        self.dialed: tuple | None = None
        #: the other side's tracker peer id (20 latin-1 chars), once known
        self.remote_id = remote_id
        # Both ends of a WebRTC wire send the handshake at once (WebTorrent peer.js).
        self.wire = self.node._new_wire(True)
        self.address: str | None = None
        self.channel: Any = None
        self.opened = False
        self.last_keepalive = time.monotonic()
        # private
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        pc.on("datachannel", self.attach)
        pc.on("connectionstatechange", self._on_state)

    @property
    def peer_name(self) -> str:
        return "webrtc:" + (self.remote_id or "?").encode("latin-1").decode("ascii", "replace")

    @property
    def closing(self) -> bool:
        return self._closing or self.channel is None or self.channel.readyState != "open"

    def start_timer(self, seconds: float) -> None:
        """Close unless the wire speaks bugout within ``seconds``."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._on_timeout)

    def attach(self, channel: Any) -> None:
        """Use this data channel (ours, or the one the offerer made)."""
        if self.channel is not None or self._closing:
            channel.close()
            return
        self.channel = channel
        channel.on("open", self._on_open)
        channel.on("message", self._on_message)
        channel.on("close", self.close)
        if channel.readyState == "open":
            self._on_open()

    def _on_open(self) -> None:
        if self.opened or self._closing:
            return
        self.opened = True
        log.debug("- webrtc %s open", self.peer_name)
        self.start_timer(self.rtc.connect_timeout)
        self.node._connections.add(self)
        self.node.stats["webrtc wires"] += 1
        self._flush()

    def _on_message(self, data: bytes | str) -> None:
        if self._closing:
            return
        wire = self.wire
        wire.receive_data(data.encode("utf-8") if isinstance(data, str) else data)
        events = wire.events_received()
        self._flush()
        if events:
            self.node._on_wire_events(self, events)
        if wire.ready and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wire.state is WireState.ERROR:
            self.node.stats["peers dropped for bad input"] += 1
            log.info("dropping peer %s: %s", self.peer_name, wire.error)
            self.close()

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.close()

    def _on_timeout(self) -> None:
        self._timer = None
        if not self.wire.ready:
            self.node.stats["webrtc timeouts"] += 1
            log.debug("webrtc %s: no wire in time", self.peer_name)
            self.close()

    def send_payload(self, payload: bytes) -> None:
        """Send one ``bo_channel`` payload if the peer can take it."""
        if self.wire.ready and not self.closing:
            self.wire.send_extension(payload)
            self._flush()

    def _flush(self) -> None:
        if self.closing:
            return  # the bytes wait in the wire until the channel opens
        data = self.wire.data_to_send()
        for start in range(0, len(data), RTC_CHUNK):
            self.channel.send(data[start:start + RTC_CHUNK])

    def close(self) -> None:
        """Close the channel and the peer connection. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.rtc._forget(self)
        self.rtc._spawn(self._shutdown(), closer=True)

    async def _shutdown(self) -> None:
        try:
            async with asyncio.timeout(5.0):
                await self.pc.close()
        except TimeoutError:
            log.warning("webrtc %s: peer connection did not close in 5 s", self.peer_name)
        finally:
            self.rtc.connections.discard(self)
            self.node._connection_lost(self)


class WebRtcTransport:
    """WebRTC for one :class:`Bugout`: its trackers, peer connections and data channels.

    Off when there are no trackers or aiortc cannot be imported. It makes and
    answers no more offers once ``max_peers`` wires (TCP ones count) are open
    or being set up; on top of those each tracker keeps at most
    ``2 * numwant`` offers waiting, so live peer connections stay bounded.
    """

    def __init__(self, node: Bugout, trackers: str | Iterable[str] | None = None,
                 ice_servers: str | Iterable[str] | None = None, *,
                 max_peers: int | None = None, numwant: int = TRACKER_NUMWANT,
                 announce_interval: float | None = None) -> None:
        self.node = node
        self.trackers = parse_trackers(trackers)
        self.ice_servers = parse_ice_servers(ice_servers)
        self.max_peers = DEFAULT_MAX_PEERS if max_peers is None else int(max_peers)
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
        if not hasattr(asyncio, "timeout"):
            log.info("WebRTC is off: it needs Python 3.11+; TCP and LSD go on")
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
        tasks = self._closers if closer else self._tasks
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._closers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webrtc task failed: %r", task.exception(), exc_info=task.exception())

    # the tracker's events
    def on_tracker_event(self, session: TrackerSession, event: Any) -> None:
        """Act on one event of a tracker client."""
        if isinstance(event, MakeOffers):
            self._spawn(self._offer(session, event.offer_ids))
        elif isinstance(event, RelayedOffer):
            self._spawn(self._answer(session, event))
        elif isinstance(event, RelayedAnswer):
            self._spawn(self._accept(event))
        elif isinstance(event, DropOffer):
            conn = self._offers.pop(event.offer_id, None)
            if conn is not None:
                conn.close()
        elif isinstance(event, TrackerWarning):
            log.info("tracker %s: %s", session.client.url, event.message)
        elif isinstance(event, TrackerUpdate):
            log.debug("tracker %s: %s seeders, %s leechers, every %.0f s", session.client.url,
                      event.complete, event.incomplete, event.interval)

    def free_slots(self) -> int:
        """How many more wires may be set up under ``max_peers``."""
        offers = set(self._offers.values())
        setting_up = {c for c in self.connections if not c._closing and c not in offers}
        return self.max_peers - len(set(self.node._connections) | setting_up)

    def has_peer(self, peer_id: str, wired_only: bool = False) -> bool:
        """True when a wire to this peer is open (or, unless ``wired_only``, being set up)."""
        raw = peer_id.encode("latin-1")
        if any(c.wire.remote_peer_id == raw and not c.closing for c in self.node._connections):
            return True
        return not wired_only and any(c.remote_id == peer_id and not c._closing for c in self.connections)

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
            session.client.send_announce(made, _mono())
            self.node.stats["webrtc offers"] += len(made)
        await session.flush()

    async def _make_offer(self, offer_id: str) -> tuple[str, str] | None:
        conn = self._new_connection(True)
        self._offers[offer_id] = conn
        try:
            conn.attach(conn.pc.createDataChannel("bugout"))
            await conn.pc.setLocalDescription(await conn.pc.createOffer())
        except Exception as exc:  # noqa: BLE001 - aiortc's own errors, whatever they are
            log.debug("webrtc: cannot make an offer: %r", exc)
            conn.close()
        if conn._closing or self._closed:
            conn.close()
            return None
        return offer_id, conn.pc.localDescription.sdp

    async def _answer(self, session: TrackerSession, offer: RelayedOffer) -> None:
        """Answer a relayed offer unless full or already wired to that peer."""
        if self._closed or self.free_slots() <= 0 or self.has_peer(offer.peer_id):
            self.node.stats["webrtc offers declined"] += 1
            return
        conn = self._new_connection(False, offer.peer_id)
        conn.start_timer(self.connect_timeout)
        sdp = await self._describe(conn, offer.sdp, "offer")
        if sdp is None or not session.client.send_answer(offer.peer_id, offer.offer_id, sdp):
            conn.close()
            return
        self.node.stats["webrtc answers"] += 1
        await session.flush()

    async def _accept(self, answer: RelayedAnswer) -> None:
        """Apply the answer to our offer, unless a wire to that peer is already open."""
        conn = self._offers.pop(answer.offer_id, None)
        if conn is None or conn._closing:
            return
        if self.free_slots() < 0 or self.has_peer(answer.peer_id, wired_only=True):
            self.node.stats["webrtc answers declined"] += 1
            conn.close()
            return
        conn.remote_id = answer.peer_id
        conn.start_timer(self.connect_timeout)
        await self._describe(conn, answer.sdp, "answer")

    async def _describe(self, conn: RtcConnection, sdp: str, kind: str) -> str | None:
        """Set the remote SDP (and answer an offer); None and closed on failure."""
        aiortc = self._aiortc
        try:
            await conn.pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=sdp, type=kind))
            if kind == "offer":
                await conn.pc.setLocalDescription(await conn.pc.createAnswer())
                return conn.pc.localDescription.sdp
        except Exception as exc:  # noqa: BLE001 - a remote SDP aiortc will not take
            log.debug("webrtc %s: bad %s: %r", conn.peer_name, kind, exc)
            conn.close()
        return None


# Worker: assets and dependencies ############################################

_REQUIREMENT = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"            # name
    r"(?:\[\s*[A-Za-z0-9._-]+(?:\s*,\s*[A-Za-z0-9._-]+)*\s*\])?"  # extras
    r"(?:\s*(?:===|==|~=|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"  # version
    r"(?:\s*,\s*(?:===|==|~=|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?")
_PROTECTED_NAMES = {".env", ".deps", ".assets.json", ".results.json"}


def check_requirement(text: Any) -> str:
    """A plain PEP 508 requirement (name, extras, version) or UnsafeAsset."""
    if not isinstance(text, str) or not _REQUIREMENT.fullmatch(text.strip()):
        raise UnsafeAsset(f"dependency {text!r} refused: only a plain requirement "
                          "(name, extras, version) is allowed")
    return text.strip()


def safe_asset_path(folder: Path, worker_path: Any) -> Path:
    """Where an asset may be written: inside ``folder``, or UnsafeAsset.

    ``workerPath`` is relative to the worker folder and starts with ``/`` as the
    JS master sends it. ``..``, other absolute forms, links that lead out, and
    the worker's own files (``.env``, ``worker.py``) are refused.
    """
    if not isinstance(worker_path, str) or not worker_path.strip("/"):
        raise UnsafeAsset(f"asset path {worker_path!r} refused: empty or not text")
    relative = worker_path.removeprefix("/")
    parts = relative.split("/")
    if ("\0" in relative or "\\" in relative or relative.startswith("/")
            or re.match(r"^[A-Za-z]:", relative) or any(p in ("..", "") for p in parts)):
        raise UnsafeAsset(f"asset path {worker_path!r} refused: it leaves the worker folder")
    root = folder.resolve()
    target = (root / relative).resolve()
    if target == root or root not in target.parents:
        raise UnsafeAsset(f"asset path {worker_path!r} refused: it leads out of the worker folder")
    if target == Path(__file__).resolve() or target.relative_to(root).parts[0] in _PROTECTED_NAMES:
        raise UnsafeAsset(f"asset path {worker_path!r} refused: it would overwrite the worker's own files")
    return target


def _version_tuple(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.+-]", text))


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
    """Compare numeric versions for ==, !=, >=, <=, >, <; anything else: ask pip."""
    checks = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, ">=": lambda a, b: a >= b,
              "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
    spec = re.sub(r"\[.*?\]", "", spec)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = re.match(r"(===|==|~=|!=|<=|>=|<|>)", clause)
        if not op or op.group(1) not in checks or "*" in clause:
            return False
        try:
            if not checks[op.group(1)](_version_tuple(version), _version_tuple(clause[len(op.group(1)):].strip())):
                return False
        except TypeError:
            return False
    return True


# Worker: running tasks ######################################################

class TaskRunner:
    """Runs ``Task.run(job)`` off the event loop, one job at a time.

    Plain ``run`` goes to a worker thread; ``async def run`` to a private event
    loop in that thread, so a slow or blocking task never stalls the wire.
    """

    def __init__(self, task: Any, timeout: float | None = None) -> None:
        self.task = task
        self.timeout = timeout
        self._executor = self._new_executor()

    @staticmethod
    def _new_executor() -> Any:
        import concurrent.futures
        return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="task")

    async def run(self, job: Any) -> Any:
        """The task's return value; its exception propagates."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._call, job)
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            # The thread cannot be killed: leave it behind and start afresh.
            self._executor.shutdown(wait=False)
            self._executor = self._new_executor()
            raise TimeoutError(f"task ran longer than {self.timeout}s") from None

    def _call(self, job: Any) -> Any:
        result = self.task.run(job)
        if inspect.isawaitable(result):
            return asyncio.run(_await(result))
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=False)


async def _await(awaitable: Awaitable) -> Any:
    return await awaitable


def load_task(path: Path) -> Any:
    """Import ``task.py`` afresh and return a new ``Task()``."""
    name = "qx_task_%d" % time.monotonic_ns()
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise WorkerError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)
    if not hasattr(module, "Task"):
        raise WorkerError(f"{path} defines no class Task")
    return module.Task()


def error_result(exc: BaseException) -> dict:
    """The ``error`` field of a failed job's result."""
    return {"type": exc.__class__.__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


# Worker #####################################################################

def _word(value: Any, default: bool) -> bool:
    """An env word as a bool: ``false``, ``0``, ``no``, ``off``, empty are false."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in ("false", "0", "no", "off", "")


def _config(env: dict, key: str, value: Any, default: Any = None) -> Any:
    """An explicit argument, else the env key, else the default."""
    if value is not None:
        return value
    found = env.get(key)
    return default if found in (None, "") else found


class Worker:
    """The JS queue-xec Worker's API in Python.

    ``Worker(token, name, loglevel, transfer_encrypt_token)``; each option falls
    back to the JS env keys (``token``, ``name``, ``LOG_LEVEL``,
    ``transferEncryptToken``, ``getBatch``, ``batchSize``) and the transport
    keys (``port``, ``host``, ``peers``, ``lsd``, ``seed``, ``maxMessage``,
    ``trackers``, ``iceServers``, ``maxPeers``).

    ``trackers``: comma-separated ws:// or wss:// WebSocket trackers, through
    which workers behind NAT meet the master over WebRTC (unset: bugout's three
    public trackers; empty: off). ``iceServers``: comma-separated
    ``stun:HOST:PORT`` and ``turn:USER:PASS@HOST:PORT[?transport=tcp]`` (unset:
    Google's and Twilio's public STUN; empty: host candidates only).
    """

    def __init__(self, token: str | None = None, name: str | None = None,
                 loglevel: str | None = None, transfer_encrypt_token: str | None = None,
                 *, get_batch: bool | None = None, batch_size: int | None = None,
                 folder: str | Path | None = None, env: dict | None = None,
                 port: int | None = None, host: str | None = None,
                 peers: Iterable[str] | None = None, lsd: bool | None = None,
                 seed: str | None = None, job_timeout: float | None = None,
                 trackers: str | Iterable[str] | None = None,
                 ice_servers: str | Iterable[str] | None = None,
                 max_peers: int | None = None) -> None:
        env = load_env(".env") if env is None else env
        self.token = _config(env, "token", token)
        if not self.token:
            raise WorkerError("no token: set token in .env (python worker.py --setup)")
        key = _config(env, "transferEncryptToken", transfer_encrypt_token)
        if not key:
            raise WorkerError("no transferEncryptToken: set it in .env (python worker.py --setup)")
        self.crypt = Crypt(key)
        self.name = _config(env, "name", name, socket.gethostname())
        Logger(_config(env, "LOG_LEVEL", loglevel, "info"), env.get("logFile") or None)
        self.get_batch = _word(_config(env, "getBatch", get_batch), False)
        self.batch_size = int(_config(env, "batchSize", batch_size, DEFAULT_BATCH_SIZE))
        self.folder = Path(_config(env, "folder", folder, os.getcwd())).resolve()
        self.job_timeout = float(_config(env, "jobTimeout", job_timeout, 0)) or None
        peer_list = _config(env, "peers", peers, "")
        if isinstance(peer_list, str):
            peer_list = [p for p in peer_list.split(",") if p.strip()]
        self.node = Bugout(
            self.token, seed=_config(env, "seed", seed), host=_config(env, "host", host, "0.0.0.0"),
            port=int(_config(env, "port", port, 0)), peers=peer_list,
            lsd=_word(_config(env, "lsd", lsd), True),
            max_message=int(_config(env, "maxMessage", None, DEFAULT_MAX_MESSAGE)),
            trackers=_config_list(env, "trackers", trackers),
            ice_servers=_config_list(env, "iceServers", ice_servers),
            max_peers=_config(env, "maxPeers", max_peers))
        #: the master's address once one answered isMaster
        self.master: str | None = None
        #: jobs held locally (a batch), results not yet delivered
        self.jobs: collections.deque = collections.deque()
        self.undelivered: collections.deque = collections.deque()
        #: jobs done, failed, results delivered, ...
        self.stats: collections.Counter = collections.Counter()
        # private
        self._manifest: list[dict] = []
        self._runner: TaskRunner | None = None
        self._master_acks = False
        self._assets_ok = False
        self._busy = False
        self._checking: set[str] = set()
        self._sync_lock = asyncio.Lock()
        self._deliver_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._done = asyncio.Event()

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def deps_folder(self) -> Path:
        return self.folder / ".deps"

    # lifecycle
    async def start(self) -> Worker:
        """Join the swarm and start the job loop."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._load_state()
        self.node.register("ping", lambda address, args: {**_as_dict(args), "pong": True})
        self.node.on("seen", self._on_peer)
        self.node.on("wireseen", self._on_peer)
        self.node.on("left", self._on_left)
        await self.node.start()
        log.info("worker %s (%s) in swarm, address %s", self.name, self.folder, self.address)
        self._spawn(self._drive())
        return self

    async def run_until_stopped(self) -> None:
        """Wait until :meth:`stop` has finished its work."""
        await self._done.wait()

    async def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs held, deliver their results, then leave."""
        if self._stopping:
            return
        self._stopping = True
        log.info("stopping: finishing %d held job(s)", len(self.jobs))
        self._wake.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained(), timeout)
        self._save_state()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner:
            self._runner.close()
        await self.node.close()
        self._done.set()

    async def _drained(self) -> None:
        while self.jobs or self._busy or self.undelivered:
            if self.undelivered and not self._busy:
                await self._deliver_results()
                if self.undelivered:
                    await asyncio.sleep(0.5)
            else:
                await asyncio.sleep(0.05)

    def _spawn(self, coro: Awaitable) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # finding the master
    def _on_peer(self, address: str) -> None:
        if address not in self._checking:
            self._checking.add(address)
            self._spawn(self.check_master(address))

    def _on_left(self, address: str) -> None:
        if address == self.master:
            log.warning("master %s left; results are kept until a master is back", address)
            self.master = None

    async def check_master(self, address: str) -> bool:
        """Ask a peer ``isMaster``; on yes, sync the assets and ask for work."""
        try:
            answer = await self.node.rpc(address, "isMaster", {}, timeout=15.0)
        except (RpcTimeout, InvalidState):
            return False
        finally:
            self._checking.discard(address)
        if not isinstance(answer, dict) or answer.get("isMaster") != "yes":
            return False
        known = address == self.master and self._assets_ok
        if not known:
            log.info("master found: %s", address)
        self.master = address
        self._master_acks = bool(answer.get("resultAcks"))
        if not known:
            await self.sync_assets()
        await self._deliver_results()
        self._wake.set()
        return True

    # assets
    def current_hash(self) -> str:
        """Concatenated SHA-256 of the assets on disk, in the master's order."""
        try:
            return "".join(Helper.get_sha256(self.folder / a["workerPath"].lstrip("/"))
                           for a in self._manifest)
        except OSError:
            return ""

    async def sync_assets(self) -> bool:
        """``requestExecAssets``; on ``changed`` replace files, deps and task."""
        async with self._sync_lock:
            master = self.master
            if master is None:
                return False
            try:
                answer = await self.node.rpc(master, "requestExecAssets",
                                             {"currentHash": self.current_hash()}, timeout=120.0)
            except (RpcTimeout, InvalidState) as exc:
                log.warning("requestExecAssets: %s", exc)
                return False
            if not isinstance(answer, dict):
                return False
            if answer.get("status") == "changed":
                self._assets_ok = await self._install_assets(answer)
            elif answer.get("status") == "same" and self._runner is None:
                self._assets_ok = await self._load_task()
            return self._assets_ok

    async def _install_assets(self, answer: dict) -> bool:
        files, deps = answer.get("files") or [], answer.get("dependencies") or []
        log.info("assets changed: %d file(s), %d dependency(ies)", len(files), len(deps))
        try:
            plan = [(safe_asset_path(self.folder, f.get("workerPath")), f) for f in files]
            deps = [check_requirement(d) for d in deps] if self._has_py_task(files) else []
            contents = [self.crypt.decrypt_bytes(f["content"]) for _, f in plan]
        except (UnsafeAsset, CryptError) as exc:
            log.error("%s; nothing was written", exc)
            return False
        except (KeyError, TypeError, AttributeError):
            log.error("master sent malformed assets; nothing was written")
            return False
        self._remove_assets()
        for (target, asset), content in zip(plan, contents):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            if asset.get("sha256") and hashlib.sha256(content).hexdigest() != asset["sha256"]:
                log.warning("%s: content differs from the master's sha256", asset.get("workerPath"))
        self._manifest = [{"name": f.get("name"), "workerPath": f["workerPath"]} for _, f in plan]
        self._save_state()
        if not await self.install_dependencies(deps):
            return False
        return await self._load_task()

    @staticmethod
    def _has_py_task(files: list) -> bool:
        return any(isinstance(f, dict) and f.get("name") == "task.py" for f in files)

    def _remove_assets(self) -> None:
        """Delete the files we wrote before, and folders they leave empty."""
        for asset in self._manifest:
            try:
                path = safe_asset_path(self.folder, asset["workerPath"])
            except UnsafeAsset:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
            for parent in path.parents:
                if parent == self.folder or not parent.is_relative_to(self.folder):
                    break
                with contextlib.suppress(OSError):
                    parent.rmdir()
        self._manifest = []

    async def install_dependencies(self, deps: list[str]) -> bool:
        """``pip install --target .deps`` what does not import yet; off the loop."""
        paths = [str(self.deps_folder)] + sys.path
        missing = [d for d in deps if not requirement_satisfied(d, paths)]
        if str(self.deps_folder) not in sys.path:
            sys.path.insert(0, str(self.deps_folder))
        if not missing:
            return True
        log.info("installing %s into %s", ", ".join(missing), self.deps_folder)
        command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                   "--no-input", "--upgrade", "--target", str(self.deps_folder), *missing]
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            log.error("cannot run pip: %s", exc)
            return False
        assert proc.stdout is not None
        async for line in proc.stdout:
            log.debug("pip: %s", line.decode(errors="replace").rstrip())
        if await proc.wait() != 0:
            log.error("pip could not install %s (no pip, no network or no such "
                      "package?); run with LOG_LEVEL=debug to see pip's output",
                      ", ".join(missing))
            return False
        importlib.invalidate_caches()
        log.info("installed %s", ", ".join(missing))
        return True

    async def _load_task(self) -> bool:
        names = {a.get("name"): a for a in self._manifest}
        if "task.py" not in names:
            if "task.js" in names:
                log.error("the master sent only task.js; this worker runs task.py "
                          "(running task.js through Node is not supported yet)")
            else:
                log.error("the master's assets hold no task.py")
            return False
        path = safe_asset_path(self.folder, names["task.py"]["workerPath"])
        try:
            task = load_task(path)
        except Exception as exc:  # noqa: BLE001 - the task's own import-time errors
            log.error("cannot load %s: %s: %s", path, exc.__class__.__name__, exc)
            return False
        if self._runner:
            self._runner.close()
        self._runner = TaskRunner(task, self.job_timeout)
        log.info("task loaded from %s", path)
        return True

    # jobs
    async def _drive(self) -> None:
        """The job loop: ask, run, deliver; one request in flight at most."""
        while True:
            if self._stopping and not self.jobs:
                return
            if not self.jobs and (self._stopping or not self._ready_for_work()):
                await self._idle()
                continue
            if not self.jobs and not await self.request_work():
                await self._idle()
                continue
            self._busy = True
            try:
                result = await self.do_job(self.jobs.popleft())
                self.undelivered.append(result)
            finally:
                self._busy = False
            await self._deliver_results()

    def _ready_for_work(self) -> bool:
        return self.master is not None and self._assets_ok and self._runner is not None

    async def _idle(self) -> None:
        """Wait for a wake-up or the 30 s idle timer; then re-check assets."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), IDLE_REQUEST_SECONDS)
        except TimeoutError:
            if self.master and not self._stopping:
                await self.sync_assets()

    async def request_work(self) -> bool:
        """``requestWork``; queue the job or batch. False when none came."""
        master = self.master
        if master is None:
            return False
        args = {"getBatch": self.get_batch, "batchSize": self.batch_size}
        try:
            answer = await self.node.rpc(master, "requestWork", args, timeout=30.0)
        except (RpcTimeout, InvalidState) as exc:
            log.warning("requestWork: %s", exc)
            return False
        encrypted = []
        if isinstance(answer, dict):
            if answer.get("task"):
                encrypted = [answer["task"]]
            elif isinstance(answer.get("batchTasks"), list):
                encrypted = answer["batchTasks"]
        for item in encrypted:
            try:
                self.jobs.append(self.crypt.decrypt_json(item))
            except CryptError as exc:
                self.stats["jobs undecryptable"] += 1
                log.error("job dropped: %s", exc)
        return bool(self.jobs)

    async def do_job(self, job: Any) -> dict:
        """Run one job; a failing task becomes an error result."""
        job_id = job.get("id") if isinstance(job, dict) else None
        result = {"jobID": job_id, "worker": {"id": self.address, "name": self.name}}
        try:
            result["data"] = await self._runner.run(job)  # type: ignore[union-attr]
            json_dumps(result["data"])
            self.stats["jobs done"] += 1
        except Exception as exc:  # noqa: BLE001 - a failing task is an error result
            self.stats["jobs failed"] += 1
            log.warning("job %s failed: %s: %s", job_id, exc.__class__.__name__, exc)
            result["data"] = None
            result["error"] = error_result(exc)
        return result

    async def _deliver_results(self) -> None:
        """``shareResults`` for each held result while a master is reachable."""
        # One delivery at a time: the job loop and stop() both call this, and two at
        # once sent a result twice and popped an empty deque (stop() then hung).
        async with self._deliver_lock:
            await self._deliver_held()

    async def _deliver_held(self) -> None:
        while self.undelivered and self.master is not None:
            master, result = self.master, self.undelivered[0]
            payload = self.crypt.encrypt_json(result)
            try:
                if self._master_acks:
                    await self.node.rpc(master, "shareResults", payload, timeout=15.0)
                elif self._has_wire(master):
                    self.node.rpc_nowait(master, "shareResults", payload)
                else:
                    return
            except (RpcTimeout, InvalidState) as exc:
                log.warning("result of job %s kept: %s", result.get("jobID"), exc)
                return
            self.undelivered.popleft()
            self.stats["results delivered"] += 1

    def _has_wire(self, address: str) -> bool:
        return any(c.address == address and c.wire.ready for c in self.node._connections)

    # state kept on disk
    def _load_state(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._manifest = json.loads((self.folder / ".assets.json").read_text())
        with contextlib.suppress(OSError, ValueError):
            held = json.loads((self.folder / ".results.json").read_text())
            self.undelivered.extend(held)
            log.info("%d result(s) from the last run will be delivered", len(held))
            (self.folder / ".results.json").unlink()

    def _save_state(self) -> None:
        (self.folder / ".assets.json").write_text(json_dumps(self._manifest))
        if self.undelivered:
            (self.folder / ".results.json").write_text(json_dumps(list(self.undelivered)))
            log.warning("%d result(s) could not be delivered; kept for the next run",
                        len(self.undelivered))


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


# Command line ###############################################################

def setup(env_path: Path, ask: Callable[[str], str] = input) -> None:
    """Prompt for the two tokens and write them into ``.env`` (mode 0600)."""
    current = read_env_file(env_path)
    print(f"Setting up {env_path} (empty answer: keep the current value or generate one)")
    key = _prompt(ask, "transferEncryptToken (exactly 32 characters)",
                  current.get("transferEncryptToken"), lambda v: len(v.encode()) == 32,
                  lambda: secrets.token_hex(16))
    token = _prompt(ask, "token (at least 20 characters)", current.get("token"),
                    lambda v: len(v) >= 20, lambda: secrets.token_urlsafe(24))
    write_env_file(env_path, {"transferEncryptToken": key, "token": token})
    print(f"Wrote {env_path}. Give the master the same two values.")


def _prompt(ask: Callable[[str], str], label: str, current: str | None,
            valid: Callable[[str], bool], generate: Callable[[], str]) -> str:
    while True:
        try:
            answer = ask(f"{label}: ").strip()
        except EOFError:
            answer = ""
        if not answer:
            answer = current if current and valid(current) else generate()
            print(f"  using {answer}")
        if valid(answer):
            return answer
        print(f"  {answer} is not valid: {label}")


async def run_worker(worker: Worker) -> int:
    """Run until SIGINT/SIGTERM; the first finishes held jobs, a second exits at once."""
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now")
            os._exit(130)
        loop.create_task(worker.stop())

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    await worker.start()
    await worker.run_until_stopped()
    log.info("stopped: %d job(s) done, %d failed, %d result(s) delivered",
             worker.stats["jobs done"], worker.stats["jobs failed"],
             worker.stats["results delivered"])
    return 0


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
        setup(Path(args.env))
        return 0
    if args.demo:
        return asyncio.run(run_demo())
    try:
        worker = Worker(env=load_env(args.env))
    except WorkerError as exc:
        print(f"worker.py: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run_worker(worker))


# Demo #######################################################################

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


async def run_demo(jobs: int = 200) -> int:
    """A master.py and a worker on 127.0.0.1 (no LSD, DHT or trackers)."""
    import tempfile
    try:
        from master import Master
    except ImportError:
        print("worker.py --demo needs master.py beside worker.py", file=sys.stderr)
        return 2
    Logger("warn")
    with tempfile.TemporaryDirectory(prefix="qx-demo-") as tmp:
        root = Path(tmp)
        (root / "master").mkdir()
        (root / "master" / "task.py").write_text(DEMO_TASK)
        token, key = secrets.token_urlsafe(24), secrets.token_hex(16)
        results: list = []
        master = Master(token, {"files": [{"masterPath": "/task.py", "name": "task.py",
                                           "workerPath": "/workplace/task.py"}],
                                "dependencies": []},
                        results.append, None, key, folder=root / "master", env={},
                        host="127.0.0.1", lsd=False, trackers=[])
        await master.start()
        for i in range(jobs):
            master.push_new_job({"id": i, "data": str(10_000 + 100 * i)})
        worker = Worker(token, "demo-worker", "warn", key, env={}, folder=root / "worker",
                        host="127.0.0.1", lsd=False, peers=["127.0.0.1:%d" % master.port],
                        get_batch=True, batch_size=10, trackers=[])
        started = time.perf_counter()
        await worker.start()
        print("demo: master on 127.0.0.1:%d, %d jobs, worker %s" % (master.port, jobs, worker.address))
        while len(results) < jobs and time.perf_counter() - started < 60:
            await asyncio.sleep(0.2)
            print("\rdemo: %d/%d results" % (len(results), jobs), end="", flush=True)
        elapsed = time.perf_counter() - started
        await worker.stop()
        await master.close()
    ok = len(results) == jobs and all(r and r.get("data") for r in results)
    print("\ndemo: %d/%d jobs in %.2f s (%.0f jobs/s), %s" % (
        len(results), jobs, elapsed, len(results) / elapsed, "all results right" if ok else "FAILED"))
    if ok:
        last = max(results, key=lambda r: r["jobID"])
        print("demo: job {} -> {}".format(last["jobID"], last["data"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
