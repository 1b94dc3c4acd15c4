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
lines, ``-`` for stdin; results printed as JSON lines)::

    python master.py --task task.py --jobs jobs.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from worker import (
    JOBS_WAITING,
    Crypt,
    Helper,
    Logger,
    WorkerError,
    _config,
    bugout_from_env,
    json_dumps,
    load_env,
)

log = logging.getLogger("worker")


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
        self._encrypted_files: tuple[str, list] | None = None
        self._last_announce = 0.0
        self._hashes: dict[tuple, str] = {}
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def port(self) -> int:
        return self.node.port

    async def start(self) -> Master:
        node = self.node
        node.register("isMaster", lambda a, args: {**_obj(args), "isMaster": "yes",
                                                   "resultAcks": True, "resultBatches": True})
        node.register("ping", lambda a, args: {**_obj(args), "pong": True})
        node.register("requestExecAssets", self._request_exec_assets)
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
        """Tell idle workers that jobs wait (JS workers ignore it and poll)."""
        now = time.monotonic()
        if now - self._last_announce > 0.05 and self.node.connections():
            self._last_announce = now
            self.node.send(JOBS_WAITING)

    def set_exec_assets(self, exec_assets: dict) -> None:
        """Replace the task files; workers pick them up on their next check."""
        self.exec_assets = exec_assets
        self._encrypted_files = None

    # the four RPCs
    def _request_exec_assets(self, address: str, args: Any) -> dict:
        unified, files = self._assets()
        if _obj(args).get("currentHash") == unified:
            return {"status": "same", "files": []}
        return {"status": "changed", "dependencies": self.exec_assets.get("dependencies", []),
                "files": files}

    def _assets(self) -> tuple[str, list]:
        """(unified hash, encrypted file list), cached until the files change."""
        listed = self.exec_assets.get("files", [])
        hashes = [self._sha256(self._path(f)) for f in listed]
        unified = "".join(hashes)
        if self._encrypted_files is None or self._encrypted_files[0] != unified:
            files = []
            for asset, sha in zip(listed, hashes):
                content = self.crypt.encrypt(self._path(asset).read_bytes())
                files.append({**asset, "sha256": sha, "content": content})
            self._encrypted_files = (unified, files)
        return self._encrypted_files

    def _sha256(self, path: Path) -> str:
        """A file's SHA-256, read again only when the file changed (inode, size, times)."""
        stat = path.stat()
        key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if key not in self._hashes:
            self._hashes = {k: v for k, v in self._hashes.items() if k[0] != key[0]}
            self._hashes[key] = Helper.get_sha256(path)
        return self._hashes[key]

    def _path(self, asset: dict) -> Path:
        return self.folder / asset["masterPath"].lstrip("/")

    def _request_work(self, address: str, args: Any) -> dict:
        """JS rule: a batch while more than one job waits and getBatch is truthy."""
        args = _obj(args)
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
            answer["batchTasks"] = [self._lease(address) for _ in range(max(count, 0))]
        elif size:
            answer["task"] = self._lease(address)
        else:
            answer["task"] = None
        return answer

    def _lease(self, address: str) -> str:
        job_id, job = self.queue.popleft()
        if job_id is not None:
            self.leases[job_id] = Lease(job, address, time.monotonic() + self.lease_seconds)
        self.stats["jobs handed out"] += 1
        return job

    def _share_results(self, address: str, args: Any) -> dict:
        """One result, as JS workers send it (JS masters never answer; we ack)."""
        try:
            result = self.crypt.decrypt_json(args)
        except WorkerError as exc:
            log.error("result from %s: %s", address, exc)
            self.on_results(None)
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
        self.on_results(result)

    # leases
    def _requeue_worker(self, address: str) -> None:
        """A worker left: its jobs go back to the front of the queue."""
        gone = [job_id for job_id, lease in self.leases.items() if lease.worker == address]
        for job_id in gone:
            self.queue.appendleft((job_id, self.leases.pop(job_id).job))
        if gone:
            self.stats["jobs requeued"] += len(gone)
            log.info("%d job(s) of %s queued again", len(gone), address)

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.lease_seconds / 4))
            now = time.monotonic()
            late = [job_id for job_id, lease in self.leases.items() if lease.deadline < now]
            for job_id in late:
                self.queue.appendleft((job_id, self.leases.pop(job_id).job))
            self.stats["jobs requeued"] += len(late)


def _obj(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


# Command line ###############################################################

def _print_event(**event: Any) -> None:
    print(json_dumps(event), flush=True)


async def _feed_jobs(master: Master, source: str) -> None:
    """Push each JSON line of a file (or stdin) as a job."""
    loop = asyncio.get_running_loop()
    handle = sys.stdin if source == "-" else open(source, encoding="utf-8")  # noqa: SIM115, ASYNC230
    with handle:
        while line := await loop.run_in_executor(None, handle.readline):
            if line.strip():
                master.push_new_job(json.loads(line))


def _worker_path(path: str) -> str:
    """Where a served file lands on workers: its relative path, else workplace/NAME."""
    relative = Path(path)
    if relative.is_absolute() or ".." in relative.parts:
        return "/workplace/" + relative.name
    return "/" + relative.as_posix()


async def run_master(args: argparse.Namespace) -> int:
    env = load_env(args.env)
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
    feeder = asyncio.ensure_future(_feed_jobs(master, args.jobs)) if args.jobs else None
    await stop.wait()
    if feeder:
        feeder.cancel()
    await master.close()
    return 0


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
        return asyncio.run(run_master(args))
    except WorkerError as exc:
        print(f"master.py: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
