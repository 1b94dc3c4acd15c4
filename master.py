#!/usr/bin/env python3
"""queue-xec Master in Python: the JS Master's API on worker.py's wire.

It answers the four RPCs (``isMaster``, ``requestExecAssets``, ``requestWork``,
``shareResults``) exactly as the JS Master does, so JS and Python workers both
work for it, and adds leases: a job handed to a worker that leaves, or that
does not answer in time, is queued again, and each job's result is passed to
``on_results`` once.

    master = Master(token, exec_assets={"files": [...], "dependencies": [...]},
                    on_results=print, transfer_encrypt_token=key)
    await master.start()
    master.push_new_job({"id": 1, "data": "{}"})

From the command line (settings from ``.env`` as for the worker; jobs as JSON
lines, ``-`` for stdin; results printed as JSON lines, and a line that is not
JSON as an ``error`` event before the next line is read)::

    python master.py --task task.py --jobs jobs.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from worker import (
    JOBS_WAITING,
    PROOF_LABEL,
    Crypt,
    Helper,
    Logger,
    WorkerError,
    _config,
    as_dict,
    bugout_from_env,
    json_dumps,
    load_env,
    make_seed,
    master_proof,
    write_env_file,
)

log = logging.getLogger("worker")

#: Seconds between two "jobs waiting" broadcasts; one within it is sent when it ends.
ANNOUNCE_GAP = 0.05


@dataclasses.dataclass
class Lease:
    """A job out with a worker until its result comes or the lease ends."""
    job: str
    worker: str
    deadline: float


class Master:
    """The JS queue-xec Master's API in Python, plus leases.

    Transport keys as the Worker's (``port``, ``host``, ``lsd``, ``seed``,
    ``dht``, ``dhtBootstrap``, ``dhtPort``, ``trackers``, ``iceServers``,
    ``maxPeers``); unset ``trackers`` means bugout's public wss:// trackers,
    an empty one none.
    """

    def __init__(self, token: str | None = None, exec_assets: dict | None = None,
                 on_results: Callable[[Any], Any] | None = None,
                 loglevel: str | None = None, transfer_encrypt_token: str | None = None,
                 *, folder: str | Path | None = None, env: dict | None = None,
                 host: str | None = None, port: int | None = None,
                 peers: Iterable[str] = (), lsd: bool | None = None,
                 seed: str | None = None, lease_seconds: float = 60.0,
                 dht: bool | None = None, dht_bootstrap: Iterable[str] | None = None,
                 dht_port: int | None = None,
                 trackers: str | Iterable[str] | None = None,
                 ice_servers: str | Iterable[str] | None = None,
                 max_peers: int | None = None) -> None:
        env = load_env(".env") if env is None else env
        self.token = _config(env, "token", token)
        if not self.token:
            raise WorkerError("no token")
        self.crypt = Crypt(_config(env, "transferEncryptToken", transfer_encrypt_token) or "")
        self._proof_key = self.crypt.derive(PROOF_LABEL)
        if loglevel is not None or env.get("LOG_LEVEL"):
            Logger(_config(env, "LOG_LEVEL", loglevel, "info"))
        self.folder = Path(folder or Path.cwd())
        self.exec_assets = exec_assets or {"files": [], "dependencies": []}
        self.on_results = on_results or (lambda result: None)
        self.lease_seconds = lease_seconds
        self.node = bugout_from_env(
            self.token, env, seed=seed, host=host, port=port, peers=peers or None, lsd=lsd, dht=dht,
            dht_bootstrap=dht_bootstrap, dht_port=dht_port, trackers=trackers,
            ice_servers=ice_servers, max_peers=max_peers)
        #: encrypted jobs waiting, jobs out on lease, ids already answered
        self.queue: collections.deque[tuple[Any, str]] = collections.deque()
        self.leases: dict[Any, Lease] = {}
        self.done: set = set()
        self.stats: collections.Counter = collections.Counter()
        #: ((listing, unified hash), encrypted files); replaced whole, never changed in place
        self._encrypted_files: tuple[tuple[str, str], list] | None = None
        self._last_announce = float("-inf")
        self._announce_timer: asyncio.TimerHandle | None = None
        #: SHA-256 by (path, inode, size, times); replaced whole under the lock, read without it
        self._hashes: dict[tuple, str] = {}
        self._hash_lock = threading.Lock()  # assets are hashed and encrypted in threads:
        self._assets_lock = threading.Lock()  # one does the work, the others find it done
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def port(self) -> int:
        return self.node.port

    async def start(self) -> Master:
        node = self.node
        node.register("isMaster", self._is_master)
        node.register("ping", lambda a, args: {**as_dict(args), "pong": True})
        node.register("requestExecAssets", self._serve_exec_assets)
        node.register("requestWork", self._request_work)
        node.register("shareResults", self._share_results)
        node.register("shareResultsBatch", self._share_results_batch)
        node.on("left", self._requeue_worker)
        node.on("wireleft", self._requeue_worker)
        await node.start()
        task = asyncio.ensure_future(self._expire_leases())
        self._tasks.add(task)
        log.info("master %s listening on %d", self.address, self.port)
        return self

    async def close(self) -> None:
        if self._announce_timer is not None:
            self._announce_timer.cancel()
            self._announce_timer = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.node.close()

    def push_new_job(self, payload: Any) -> None:
        """Queue a job (a dict is JSON-encoded first, as the JS master does)."""
        text = payload if isinstance(payload, str) else json_dumps(payload)
        job_id = payload.get("id") if isinstance(payload, dict) else None
        was_empty = not self.queue
        self.queue.append((job_id, json_dumps(self.crypt.encrypt(text))))
        if was_empty:
            self._announce_jobs()

    def _announce_jobs(self) -> None:
        """Tell idle workers that jobs wait (JS workers ignore it and poll).

        At most one broadcast per ANNOUNCE_GAP: one asked for sooner is sent when
        the gap ends (one pending at a time), so no job waits for the idle poll.
        """
        if not self.node.connections():
            return
        wait = self._last_announce + ANNOUNCE_GAP - time.monotonic()
        if wait <= 0:
            self._last_announce = time.monotonic()
            self.node.send(JOBS_WAITING)
        elif self._announce_timer is None:
            self._announce_timer = asyncio.get_running_loop().call_later(wait, self._trailing_announce)

    def _trailing_announce(self) -> None:
        self._announce_timer = None
        if self.queue:
            self._announce_jobs()

    def set_exec_assets(self, exec_assets: dict) -> None:
        """Replace the task files; workers pick them up on their next check."""
        self.exec_assets = exec_assets
        self._encrypted_files = None

    # the four RPCs
    def _is_master(self, address: str, args: Any) -> dict:
        """``isMaster``: yes, what we add to the JS protocol, and the proof a worker asks for.

        A Python worker sends ``{"challenge": 64 hex digits}`` after a first
        ``isMaster {}``; the ``proof`` binds its nonce to both addresses under
        the key (worker.py, "Worker: trusting a master").
        """
        args = as_dict(args)
        answer = {**args, "isMaster": "yes", "resultAcks": True, "resultBatches": True, "keyProof": 1}
        challenge = args.get("challenge")
        if isinstance(challenge, str) and re.fullmatch(r"[0-9a-f]{64}", challenge):
            answer["proof"] = master_proof(self._proof_key, bytes.fromhex(challenge), self.address, address)
        return answer

    async def _serve_exec_assets(self, address: str, args: Any) -> dict:
        """``requestExecAssets``: hashing and encrypting happen in a thread, off the loop."""
        await asyncio.to_thread(self._assets)
        return self._request_exec_assets(address, args)  # the files' state is cached now

    def _request_exec_assets(self, address: str, args: Any) -> dict:
        unified, files = self._assets()
        if as_dict(args).get("currentHash") == unified:
            return {"status": "same", "files": []}
        return {"status": "changed", "dependencies": self.exec_assets.get("dependencies", []),
                "files": files}

    def _assets(self) -> tuple[str, list]:
        """(unified hash, encrypted file list), cached until the files change; thread-safe."""
        listed = list(self.exec_assets.get("files", []))
        hashes = [self._sha256(self._path(f)) for f in listed]
        key = (json_dumps(listed), "".join(hashes))
        cached = self._encrypted_files
        if cached is None or cached[0] != key:
            with self._assets_lock:
                cached = self._encrypted_files
                if cached is None or cached[0] != key:
                    files = []
                    for asset, sha in zip(listed, hashes):
                        content = self.crypt.encrypt(self._path(asset).read_bytes())
                        files.append({**asset, "sha256": sha, "content": content})
                    cached = self._encrypted_files = (key, files)
        return key[1], cached[1]

    def _sha256(self, path: Path) -> str:
        """A file's SHA-256, read again only when the file changed (inode, size, times)."""
        info = path.stat()
        key = (str(path), info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        found = self._hashes.get(key)
        if found is None:
            with self._hash_lock:
                found = self._hashes.get(key)
                if found is None:
                    found = Helper.get_sha256(path)
                    hashes = {k: v for k, v in self._hashes.items() if k[0] != key[0]}
                    hashes[key] = found
                    self._hashes = hashes
        return found

    def _path(self, asset: dict) -> Path:
        return self.folder / asset["masterPath"].lstrip("/")

    def _request_work(self, address: str, args: Any) -> dict:
        """JS rule: a batch while more than one job waits and getBatch is truthy."""
        args = as_dict(args)
        if "results" in args:  # Python workers send held results along
            self._share_results_batch(address, args["results"])
        answer = {k: v for k, v in args.items() if k != "results"}
        size = len(self.queue)
        if size > 1 and args.get("getBatch"):
            try:
                batch = int(args.get("batchSize"))
            except (TypeError, ValueError):
                batch = 0
            count = batch if size > batch else 1
            tasks = [self._lease(address) for _ in range(max(count, 0))]
            tasks = [task for task in tasks if task is not None]
            if tasks or count <= 0:
                answer["batchTasks"] = tasks
            else:
                answer["task"] = None
        else:
            answer["task"] = self._lease(address)
        return answer

    def _lease(self, address: str) -> str | None:
        """The next job not answered yet, on lease to ``address``; None when there is none."""
        while self.queue:
            job_id, job = self.queue.popleft()
            if job_id is not None and job_id in self.done:
                # queued again when its lease ended, then its result came after all
                self.stats["answered jobs skipped"] += 1
                continue
            if job_id is not None:
                self.leases[job_id] = Lease(job, address, time.monotonic() + self.lease_seconds)
            self.stats["jobs handed out"] += 1
            return job
        return None

    def _share_results(self, address: str, args: Any) -> dict:
        """One result, as JS workers send it (JS masters never answer; we ack)."""
        try:
            result = self.crypt.decrypt_json(args)
        except WorkerError as exc:
            log.error("result from %s: %s", address, exc)
            self._deliver(None)
            return {"received": False}
        self._accept(result)
        return {"received": True}

    def _share_results_batch(self, address: str, args: Any) -> dict:
        """Many results in one call, from Python workers (fewer signatures)."""
        try:
            results = self.crypt.decrypt_json(args)
        except WorkerError as exc:
            log.error("results from %s: %s", address, exc)
            return {"received": False}
        for result in results if isinstance(results, list) else []:
            self._accept(result)
        return {"received": True}

    def _accept(self, result: Any) -> None:
        """Hand a result to on_results once per jobID; end its lease."""
        job_id = result.get("jobID") if isinstance(result, dict) else None
        self.leases.pop(job_id, None)
        if job_id is not None and job_id in self.done:
            self.stats["duplicate results"] += 1
            return
        if job_id is not None:
            self.done.add(job_id)
        self.stats["results"] += 1
        self._deliver(result)

    def _deliver(self, result: Any) -> None:
        """on_results; its failure is logged and does not lose the other results of a batch."""
        try:
            self.on_results(result)
        except Exception:
            self.stats["on_results failures"] += 1
            log.exception("on_results failed")

    # leases
    def _requeue_worker(self, address: str) -> None:
        """A worker left: its jobs go back to the front of the queue."""
        gone = [job_id for job_id, lease in self.leases.items() if lease.worker == address]
        self._requeue(gone)
        if gone:
            log.info("%d job(s) of %s queued again", len(gone), address)

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.lease_seconds / 4))
            now = time.monotonic()
            self._requeue([job_id for job_id, lease in self.leases.items() if lease.deadline < now])

    def _requeue(self, job_ids: list) -> None:
        """Put jobs whose lease ended back at the front of the queue; tell idle workers."""
        for job_id in job_ids:
            self.queue.appendleft((job_id, self.leases.pop(job_id).job))
        if job_ids:
            self.stats["jobs requeued"] += len(job_ids)
            self._announce_jobs()


# Command line ###############################################################

def _print_event(**event: Any) -> None:
    print(json_dumps(event), flush=True)


async def _feed_jobs(master: Master, handle: Any) -> None:
    """Push each JSON line of a file (or stdin) as a job; report a bad line and go on."""
    number = 0
    async for line in _lines(handle):
        number += 1
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as exc:  # not JSON, or not UTF-8: say so, read on
            message = "jobs line %d skipped: %s" % (number, exc)
            log.error("%s", message)
            _print_event(event="error", line=number, message=message)
            continue
        master.push_new_job(job)


async def _lines(handle: Any) -> AsyncIterator[bytes]:
    """A file's lines, read from its descriptor by a daemon thread: a signal ends the
    process even while the writer of a pipe keeps it open (a buffered read would
    hold the file's lock at exit)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    def read() -> None:
        rest = b""
        with contextlib.suppress(RuntimeError, OSError):  # the loop or the file closed first
            while chunk := os.read(handle.fileno(), 1 << 16):
                *complete, rest = (rest + chunk).split(b"\n")
                for line in complete:
                    loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, rest)
            loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, name="jobs", daemon=True).start()
    while (line := await lines.get()) is not None:
        yield line


def _worker_path(path: str) -> str:
    """Where a served file lands on workers: its relative path, else workplace/NAME."""
    relative = Path(path)
    if relative.is_absolute() or ".." in relative.parts:
        return "/workplace/" + relative.name
    return "/" + relative.as_posix()


async def run_master(args: argparse.Namespace, jobs: Any = None) -> int:
    """Serve ``args.task`` files and the jobs read from ``jobs`` (a binary file) until a signal."""
    env = load_env(args.env)
    if not env.get("seed"):  # a stable address, which workers may pin (master= in their .env)
        env["seed"] = make_seed()
        write_env_file(args.env, {"seed": env["seed"]})
        log.warning("master.py: a new seed was written into %s: this master keeps its address", args.env)
    files = [{"masterPath": str(Path(path).resolve()), "name": Path(path).name,
              "workerPath": _worker_path(path)} for path in args.task]
    deps = [d for d in args.deps.split(",") if d.strip()]
    master = Master(env=env, exec_assets={"files": files, "dependencies": deps},
                    on_results=lambda result: _print_event(event="result", result=result),
                    folder="/", lease_seconds=args.lease)
    await master.start()
    _print_event(event="ready", address=master.address, port=master.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    feeder = asyncio.ensure_future(_feed_jobs(master, jobs)) if jobs is not None else None
    if feeder:
        feeder.add_done_callback(_feeder_done)
    await stop.wait()
    if feeder:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
    await master.close()
    return 0


def _feeder_done(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("reading jobs failed: %r", exc, exc_info=exc)
        _print_event(event="error", message="reading jobs failed: %s" % exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="master.py", description="A queue-xec master in Python.")
    parser.add_argument("--env", default=".env", metavar="FILE", help="settings file (default .env)")
    parser.add_argument("--task", action="append", default=[], metavar="FILE",
                        help="a file to serve (task.py, task.js, data); a relative path keeps its "
                        "place on workers; repeat for more")
    parser.add_argument("--deps", default="", help="comma-separated dependencies")
    parser.add_argument("--jobs", metavar="FILE", help="JSON lines of jobs; - for stdin")
    parser.add_argument("--lease", type=float, default=60.0, help="seconds a worker may hold a job")
    args = parser.parse_args(argv)
    try:
        jobs = None if not args.jobs else sys.stdin.buffer if args.jobs == "-" else open(args.jobs, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"master.py: cannot read --jobs {args.jobs}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_master(args, jobs))
    except WorkerError as exc:
        print(f"master.py: {exc}", file=sys.stderr)
        return 2
    finally:
        if jobs is not None and jobs is not sys.stdin.buffer:
            jobs.close()


if __name__ == "__main__":
    sys.exit(main())
