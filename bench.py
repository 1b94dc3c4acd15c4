#!/usr/bin/env python3
"""Benchmark the Python worker on loopback; print one table, write JSON.

    python bench.py [--quick] [--json bench-results.json]
    python bench.py --soak 100000
    python bench.py --js-worker DIR      (root: the unchanged JS worker, in unshare -n)
    python bench.py --swarm 1 4 16 32 64   (root: in a network namespace of its own; --one-host)

Everything runs on 127.0.0.1 with LSD, DHT and trackers off: master.py (in this
process) or the JS master harness (interop/master.js) and real ``python worker.py``
processes, whose settings come from their .env only (support.py's loopback .env
and an environment without our keys, which would override it).
Compare ratios within one run; absolute figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import json
import os
import platform
import py_compile
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import worker as w
from master import Master
from support import (
    KEY,
    JsProcess,
    clean_env,
    free_port,
    in_own_namespace,
    js_peer,
    until,
    write_assets,
    write_loopback_env,
)

HERE = Path(__file__).resolve().parent
TRIVIAL_TASK = "class Task:\n    def run(self, job):\n        return job['id']\n"
TRIVIAL_TASK_JS = "module.exports = class Task { run(job) { return job.id; } };\n"


def memory_mb(pid: int, field: str = "VmHWM") -> float:
    """A /proc/PID/status memory field of a live process (VmHWM: peak RSS, VmRSS: now), in MB."""
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def assets(root: Path, files: dict[str, str]) -> dict:
    return {"files": write_assets(root, files), "dependencies": []}


def watch_asks(master: Master) -> dict[str, float]:
    """Worker address -> when it first called requestWork (it does once its task is loaded)."""
    asked: dict[str, float] = {}
    master.node.on("rpc", lambda address, name, args: name == "requestWork"
                   and asked.setdefault(address, time.perf_counter()))
    return asked


class WorkerProcess:
    """``python worker.py`` in a folder of its own, settings in its .env."""

    def __init__(self, root: Path, token: str, port: int, batch: int, name: str,
                 module: bool = False) -> None:
        self.module = module  # python -m worker: bytecode from __pycache__, no compile
        self.folder = root / name
        self.folder.mkdir(parents=True)
        write_loopback_env(self.folder, token, peers="127.0.0.1:%d" % port,  # key: KEY
                           getBatch="true" if batch > 1 else "false", batchSize=max(batch, 1),
                           LOG_LEVEL="warn", name=name)

    async def start(self) -> WorkerProcess:
        command = ["-m", "worker"] if self.module else [str(HERE / "worker.py")]
        if self.module:  # clean_env() puts HERE on PYTHONPATH
            py_compile.compile(str(HERE / "worker.py"), cfile=importlib.util.cache_from_source(
                str(HERE / "worker.py")))
        self.proc = await asyncio.create_subprocess_exec(sys.executable, *command, cwd=self.folder,
                                                         env=clean_env())
        return self

    async def stop(self) -> float:
        rss = memory_mb(self.proc.pid)
        self.proc.terminate()
        await self.proc.wait()
        return rss


async def against_master_py(jobs: int, batch: int, workers: int = 1, module: bool = False,
                            db_file: bool = False) -> dict:
    """jobs/s of ``workers`` worker processes on one master.py (its queue in memory, or a file)."""
    with tempfile.TemporaryDirectory(prefix="qx-bench-") as tmp:
        root = Path(tmp)
        results: list = []
        stamps: list = []

        def on_results(result):
            results.append(result["data"])  # keep little: a big list slows the GC
            stamps.append(time.perf_counter())
        token = "bench-%d" % random.randrange(1 << 40)
        master = Master(token, assets(root / "m", {"/task.py": TRIVIAL_TASK}), on_results, None, KEY,
                        folder=root / "m", env={}, host="127.0.0.1", lsd=False, dht=False, trackers=[],
                        db=root / "master.db" if db_file else ":memory:")
        asked = watch_asks(master)
        await master.start()
        procs = [await WorkerProcess(root, token, master.port, batch, "w%d" % i, module).start()
                 for i in range(workers)]
        try:
            # every worker has started, synced and asked (no job yet): start-up is not timed
            await until(lambda: len(asked) >= workers, 120)
            for i in range(jobs):
                master.push_new_job({"id": i, "data": ""})
            # The clock starts once all are queued: no worker gets one before the loop is free.
            started = time.perf_counter()
            await until(lambda: len(results) >= jobs, 600)
            elapsed = stamps[-1] - started
        finally:
            rss = [await p.stop() for p in procs]
            await master.close()
        ok = sorted(results) == list(range(jobs))
        return {"jobs": jobs, "seconds": elapsed, "jobs_per_s": jobs / elapsed, "right": ok,
                "peak_rss_mb": max(rss)}


def family_rss_mb(pid: int) -> tuple[float, float]:
    """(peak RSS of ``pid``, sum of the peak RSS of its live children), in MB."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return memory_mb(pid), sum(memory_mb(child) for child in children if Path("/proc/%d" % child).exists())


# ~20 ms of CPU per job, whatever the machine's speed.
CPU_TASK = ("import time\n\n\nclass Task:\n    def run(self, job):\n"
            "        end = time.process_time() + 0.020\n        while time.process_time() < end:\n"
            "            pass\n        return job['id']\n")


def add_env_keys(folder: Path, keys: dict) -> None:
    env = folder / ".env"
    env.write_text(env.read_text() + "".join("%s=%s\n" % kv for kv in keys.items()))


async def with_settings(jobs: int, batch: int, keys: dict, task: str = TRIVIAL_TASK,
                        name: str = "task.py") -> dict:
    """jobs/s of one worker process with more .env ``keys``; RSS of the worker and its task children.

    ``name``: the task's file name (``task.js`` for a node child).
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results: list = []
        stamps: list = []

        def on_results(result):
            results.append(result["data"])
            stamps.append(time.perf_counter())
        token = "bench-%d" % random.randrange(1 << 40)
        master = Master(token, assets(root / "m", {"/" + name: task}), on_results, None, KEY,
                        folder=root / "m", env={}, host="127.0.0.1", lsd=False, dht=False, trackers=[])
        asked = watch_asks(master)
        await master.start()
        proc = WorkerProcess(root, token, master.port, batch, "w")
        add_env_keys(proc.folder, keys)
        await proc.start()
        try:
            await until(lambda: asked, 120)
            for i in range(jobs):
                master.push_new_job({"id": i, "data": ""})
            started = time.perf_counter()
            await until(lambda: len(results) >= jobs, 600)
            elapsed = stamps[-1] - started
            worker_rss, children_rss = family_rss_mb(proc.proc.pid)
        finally:
            await proc.stop()
            await master.close()
        return {"jobs": jobs, "seconds": elapsed, "jobs_per_s": jobs / elapsed,
                "right": sorted(results) == list(range(jobs)), "peak_rss_mb": worker_rss + children_rss,
                "worker_rss_mb": worker_rss, "children_rss_mb": children_rss}


def counters_cost(rounds: int = 200_000) -> dict:
    """Microseconds the per-job figures of /metrics cost: a job's duration and its result's latency."""
    hist, latency, stats = w.Histogram(), w.Histogram(), collections.Counter()
    started = time.perf_counter()
    for i in range(rounds):
        hist.observe(0.0004 * (i % 50))
        latency.observe(0.002)
        stats["jobs done"] += 1
    return {"calls_per_s": rounds / (time.perf_counter() - started),
            "median_ms": (time.perf_counter() - started) / rounds * 1000}


async def cpu_bound(jobs: int) -> dict[str, dict]:
    """A task of ~20 ms CPU per job, concurrency=2 against 1, batches of 10."""
    rows = {"CPU 20 ms/job, concurrency=%d, RSS w+c" % c:
            await with_settings(jobs, 10, {"concurrency": c}, CPU_TASK) for c in (1, 2)}
    one, two = (row["jobs_per_s"] for row in rows.values())
    print("CPU-bound task, %d jobs: concurrency=2 runs %.2fx as many jobs/s as concurrency=1 (%d cores)"
          % (jobs, two / one, os.cpu_count() or 0))
    return rows


async def against_js_master(jobs: int, batch: int) -> dict:
    """jobs/s of one worker process for the JS master harness."""
    with tempfile.TemporaryDirectory(prefix="qx-bench-") as tmp:
        root = Path(tmp)
        spec = assets(root / "m", {"/task.py": TRIVIAL_TASK})
        for f in spec["files"]:
            f["masterPath"] = str(root / "m" / f["masterPath"].lstrip("/"))
        (root / "assets.json").write_text(json.dumps(spec))
        token = "bench-js-%d" % random.randrange(1 << 40)
        # JsProcess passes our environment on: no tracker or DHT from it
        js = await JsProcess("master.js", {"QX_TOKEN": token, "QX_KEY": KEY, "QX_TRACKER": "",
                                           "QX_DHT_BOOTSTRAP": "",
                                           "QX_ASSETS": str(root / "assets.json")}).start()
        proc = await WorkerProcess(root, token, js.ready["port"], batch, "w").start()
        results = lambda: [e for e in js.events if e["event"] == "result"]
        try:
            js.send(cmd="push", job={"id": -1, "data": "{}"})
            await until(lambda: len(results()) >= 1, 60)
            for i in range(jobs):
                js.send(cmd="push", job={"id": i, "data": "{}"})
            # The JS master never tells idle workers about new jobs: they poll every 30 s.
            await until(lambda: len(results()) >= jobs + 1, 600)
            got = results()
            elapsed = got[-1]["_t"] - got[1]["_t"]  # first to last result
        finally:
            await proc.stop()
            await js.close()
        return {"jobs": jobs, "seconds": elapsed, "jobs_per_s": jobs / elapsed}


async def rpc_latency(calls: int, js: bool) -> dict:
    """Sequential echo round trips from a Python node to a Python or JS peer."""
    ident = "bench-rpc-%d" % random.randrange(1 << 40)
    if js:
        peer = await js_peer(ident)
        address, port = peer.ready["address"], peer.ready["port"]
    else:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ECHO_PEER, ident, stdout=subprocess.PIPE, cwd=HERE, env=clean_env())
        address, port = json.loads(await proc.stdout.readline()).values()
    node = await w.Bugout(ident, host="127.0.0.1", lsd=False, dht=False, trackers=[], peers=["127.0.0.1:%d" % port]).start()
    await until(lambda: address in node.peers, 30)
    await asyncio.sleep(0.3)
    laps = []
    for i in range(calls):
        t0 = time.perf_counter()
        await node.rpc(address, "echo", {"i": i})
        laps.append((time.perf_counter() - t0) * 1000)
    await node.close()
    if js:
        await peer.close()
    else:
        proc.terminate()
        await proc.wait()
    laps.sort()
    return {"calls_per_s": 1000 * calls / sum(laps), "median_ms": statistics.median(laps),
            "p99_ms": laps[int(len(laps) * 0.99) - 1]}


ECHO_PEER = """
import asyncio, json, sys, worker as w
async def main():
    node = await w.Bugout(sys.argv[1], host="127.0.0.1", lsd=False, dht=False, trackers=[]).start()
    node.register("echo", lambda a, args: args)
    print(json.dumps({"address": node.address, "port": node.port}), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def asset_sync(megabytes: int) -> dict:
    """Seconds for a worker to fetch, decrypt and write a large asset."""
    with tempfile.TemporaryDirectory(prefix="qx-bench-") as tmp:
        root = Path(tmp)
        big = "".join(random.choices("abcdefghij\n", k=megabytes * 1024 * 1024))
        files = {"/task.py": TRIVIAL_TASK, "/data/big.txt": big}
        token = "bench-sync-%d" % random.randrange(1 << 40)
        master = Master(token, assets(root / "m", files), None, None, KEY, folder=root / "m",
                        env={}, host="127.0.0.1", lsd=False, dht=False, trackers=[])
        asked = watch_asks(master)
        await master.start()
        master._assets()  # the master hashes and encrypts once, before the clock starts
        worker = w.Worker(token, "sync", "warn", KEY, env={}, folder=root / "w", host="127.0.0.1",
                          lsd=False, dht=False, trackers=[], peers=["127.0.0.1:%d" % master.port])
        started = time.perf_counter()
        await worker.start()
        await until(lambda: asked, 120)  # the worker asks for work once its task is loaded
        elapsed = asked[worker.address] - started
        size = (root / "w/data/big.txt").stat().st_size
        await worker.stop()
        await master.close()
        return {"megabytes": size / 1e6, "seconds": elapsed, "mb_per_s": size / 1e6 / elapsed}


async def proof_cost(rounds: int, js: bool) -> dict:
    """Milliseconds a worker spends having a new master prove the key (the proof alone)."""
    with tempfile.TemporaryDirectory(prefix="qx-bench-") as tmp:
        root = Path(tmp)
        token = "bench-proof-%d" % random.randrange(1 << 40)
        spec = assets(root / "m", {"/task.py": TRIVIAL_TASK, "/data/x.json": '{"x": 1}'})
        if js:
            for f in spec["files"]:
                f["masterPath"] = str(root / "m" / f["masterPath"].lstrip("/"))
            (root / "assets.json").write_text(json.dumps(spec))
            peer = await JsProcess("master.js", {"QX_TOKEN": token, "QX_KEY": KEY,
                                                   "QX_ASSETS": str(root / "assets.json")}).start()
            address, port = peer.ready["address"], peer.ready["port"]
        else:
            peer = Master(token, spec, None, None, KEY, folder=root / "m", env={}, host="127.0.0.1",
                          lsd=False, dht=False, trackers=[])
            await peer.start()
            address, port = peer.address, peer.port
        worker = w.Worker(token, "proof", "error", KEY, env={}, folder=root / "w", host="127.0.0.1",
                          lsd=False, dht=False, trackers=[], peers=["127.0.0.1:%d" % port])
        await worker.node.start()  # the node only: the bench drives the proofs
        await until(lambda: address in worker.node.peers, 30)
        laps = []
        for _ in range(rounds):
            started = time.perf_counter()
            await (worker.finder._asset_proof(address) if js else worker.finder._challenge(address))
            laps.append((time.perf_counter() - started) * 1000)
        await worker.node.close()
        await peer.close()
    laps.sort()
    return {"calls_per_s": 1000 * rounds / sum(laps), "median_ms": statistics.median(laps),
            "p99_ms": laps[int(len(laps) * 0.99) - 1]}


async def soak(jobs: int) -> int:
    """``jobs`` jobs through master.py (its queue in a file) and one worker: nothing lost, RSS flat."""
    with tempfile.TemporaryDirectory(prefix="qx-soak-") as tmp:
        root = Path(tmp)
        seen = bytearray(jobs)  # flat: this process's RSS is the master's
        count = [0]

        def on_results(result):
            count[0] += not seen[result["data"]]
            seen[result["data"]] = 1
        samples: list[tuple[int, float, float]] = []
        token = "soak-%d" % random.randrange(1 << 40)
        master = Master(token, assets(root / "m", {"/task.py": TRIVIAL_TASK}), on_results, None, KEY,
                        folder=root / "m", env={}, host="127.0.0.1", lsd=False, dht=False, trackers=[],
                        db=root / "master.db")
        await master.start()
        proc = await WorkerProcess(root, token, master.port, 100, "w").start()
        started = time.perf_counter()
        try:
            pushed = 0
            step = max(jobs // 20, 1)
            while count[0] < jobs:
                while pushed < jobs and pushed - count[0] < 5000:  # keep the queue fed
                    master.push_new_job({"id": pushed, "data": ""})
                    pushed += 1
                await asyncio.sleep(0.01)
                if count[0] >= step * (len(samples) + 1):
                    samples.append((count[0], memory_mb(proc.proc.pid, "VmRSS"), memory_mb(os.getpid(), "VmRSS")))
                    print("  soak: %7d results, worker RSS %.1f MB, master RSS %.1f MB" % samples[-1], flush=True)
                if time.perf_counter() - started > 1800:
                    break
        finally:
            elapsed = time.perf_counter() - started
            peak = await proc.stop()
            await master.close()
    lost = jobs - count[0]
    warm = samples[len(samples) // 10] if samples else (0, 0.0, 0.0)
    end = samples[-1] if samples else (0, 0.0, 0.0)
    growth = end[1] - warm[1]
    print("soak: %d jobs in %.0f s (%.0f jobs/s), %d lost, %d duplicates to master, worker RSS "
          "%.1f MB after warm-up, %.1f MB at the end (growth %.1f MB), peak %.1f MB; master RSS "
          "%.1f MB after warm-up, %.1f MB at the end" % (
              jobs, elapsed, jobs / elapsed, lost, master.stats["duplicate results"], warm[1], end[1],
              growth, peak, warm[2], end[2]))
    return 0 if lost == 0 and growth < 1 else 1


SUM_TASK_JS = "module.exports = class Task { async run(job) { return { sum: JSON.parse(job.data).x * 2 }; } };\n"


async def original_js_worker(source: Path, jobs: int, batch: int) -> dict:
    """The unchanged JS worker (``source``: a checkout of queue-xec/worker with its npm packages)
    against ``python master.py``, which it finds over LSD. It runs with bugout's defaults (public
    trackers, the DHT): only inside a network namespace, which main() makes."""
    with tempfile.TemporaryDirectory(prefix="qx-bench-") as tmp:
        root = Path(tmp)
        token = "bench-jsw-%d" % random.randrange(1 << 40)
        (root / "m/workplace").mkdir(parents=True)
        (root / "w").mkdir()
        (root / "m/workplace/task.js").write_text(SUM_TASK_JS)
        (root / "m/jobs.jsonl").write_text("".join(json.dumps({"id": i, "data": json.dumps({"x": i})}) + "\n"
                                                   for i in range(jobs)))
        write_loopback_env(root / "m", token, lsd="true", LOG_LEVEL="warn")
        keys = {"getBatch": "true", "batchSize": batch} if batch > 1 else {}
        (root / "w/.env").write_text("".join("%s=%s\n" % kv for kv in {
            "token": token, "transferEncryptToken": KEY, "LOG_LEVEL": "off", **keys}.items()))
        master = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "master.py"), "--task", "workplace/task.js", "--jobs", "jobs.jsonl",
            "--no-follow", cwd=root / "m", env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        await master.stdout.readline()  # ready
        worker = await asyncio.create_subprocess_exec(
            "node", str(source / "worker.js"), cwd=root / "w", env=clean_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stamps = []
        try:
            async for line in master.stdout:
                if json.loads(line).get("event") == "result":
                    stamps.append(time.perf_counter())
        finally:
            worker.kill()
            await worker.wait()
            await master.wait()
    return {"jobs_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "results": len(stamps),
            "right": len(stamps) == jobs}


async def js_worker_rows(source: Path) -> int:
    """``--js-worker``: the unchanged JS worker against master.py, batched and not, three runs each."""
    if os.environ.get("QX_BENCH_NAMESPACE") != "1":  # bugout's defaults: only inside a namespace
        command = " ".join(shlex.quote(str(a)) for a in (sys.executable, __file__, "--js-worker", source))
        script = ("ip link set lo up && ip route add 224.0.0.0/4 dev lo src 127.0.0.1 && "
                  "QX_BENCH_NAMESPACE=1 exec " + command)
        return await (await asyncio.create_subprocess_exec("unshare", "-n", "sh", "-c", script, cwd=HERE)).wait()
    for batch, jobs in ((10, 500), (1, 150)) * 3:
        row = await original_js_worker(source.resolve(), jobs, batch)
        print("JS worker %s against master.py, %d jobs: %.1f jobs/s" % (
            "in batches of %d" % batch if batch > 1 else "unbatched", jobs, row["jobs_per_s"]), flush=True)
# The swarm: master.py and N worker.py processes, an LSD mesh against a star ####

#: Seconds the swarm gets once every worker is healthy: LSD announces go at 0, 1 and 4 s from each
#: start, so by then every wire of the mesh is up (and resolved, when both ends dialed).
SWARM_SETTLE = 8.0


def tree_cpu_seconds(pid: int) -> float:
    """User and system CPU of ``pid`` and every live descendant, with the children they reaped."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        child = int(stat.parent.name)
        parents[child] = int(fields[1])
        times[child] = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    family, grew = {pid}, True
    while grew:
        more = {c for c, p in parents.items() if p in family} - family
        family |= more
        grew = bool(more)
    return sum(times.get(p, 0.0) for p in family)


def lo_rx_bytes() -> int:
    """Bytes received on lo (in a namespace of our own: every byte any peer received)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    return 0


async def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET ``path`` on 127.0.0.1:``port``; (0, "") when it does not answer."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return 0, ""
    try:
        writer.write(b"GET %s HTTP/1.0\r\n\r\n" % path.encode())
        raw = await asyncio.wait_for(reader.read(), 10)
    except (OSError, TimeoutError):
        return 0, ""
    finally:
        writer.close()
    head, _, body = raw.decode("utf-8", "replace").partition("\r\n\r\n")
    parts = head.split()
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


async def worker_counters(ports: list[int]) -> collections.Counter:
    """The workers' /metrics counters (labels summed), added up over all of them."""
    total: collections.Counter = collections.Counter()
    for port in ports:
        _, body = await http_get(port, "/metrics")
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                total[name.split("{")[0]] += float(value)
    return total


def worker_host(index: int, one_host: bool) -> str:
    """The loopback address worker ``index`` listens, dials and announces on: one of its own, as on
    a LAN (127.0.1.1, 127.0.1.2, ...), so that per-address budgets (LSD announces, new identities,
    inbound wires) count it alone; or, with ``one_host``, 127.0.0.1 for all (every worker on one host)."""
    return "127.0.0.1" if one_host else "127.0.%d.%d" % (1 + index // 250, 1 + index % 250)


async def swarm_run(count: int, jobs: int, batch: int, mesh: bool, one_host: bool = False) -> dict:
    """master.py and ``count`` worker.py processes in this namespace: LSD on (mesh) or peers= (star)."""
    with tempfile.TemporaryDirectory(prefix="qx-swarm-") as tmp:
        root = Path(tmp)
        token = "swarm-%d" % random.randrange(1 << 40)
        m = root / "m"
        m.mkdir()
        (m / "task.py").write_text(TRIVIAL_TASK)
        port = free_port()
        discovery = {"lsd": "true"} if mesh else {}
        write_loopback_env(m, token, port=port, LOG_LEVEL="warn", **discovery)
        master = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "master.py"), "--task", "task.py", "--jobs", "-", cwd=m,
            env=clean_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=(root / "master.log").open("wb"))
        procs, status = [master], []
        results, reader = [0], None

        async def read() -> None:
            async for line in master.stdout:
                results[0] += b'"result"' in line
        try:
            await master.stdout.readline()  # ready
            reader = asyncio.ensure_future(read())
            for i in range(count):
                folder = root / ("w%d" % i)
                folder.mkdir()
                status.append(free_port())
                write_loopback_env(folder, token, getBatch="true", batchSize=batch, LOG_LEVEL="warn",
                                   statusPort=status[-1], name="w%d" % i, host=worker_host(i, one_host),
                                   **(discovery or {"peers": "127.0.0.1:%d" % port}))
                procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, str(HERE / "worker.py"), cwd=folder, env=clean_env(),
                    stderr=(folder / "worker.log").open("wb")))
            started = time.monotonic()
            healthy, grew = 0, started
            while healthy < count and time.monotonic() - grew < 30:  # until all, or none more for 30 s
                health = [(await http_get(p, "/healthz"))[0] for p in status]
                if health.count(200) > healthy:
                    healthy, grew = health.count(200), time.monotonic()
                await asyncio.sleep(0.5)
            ready = grew - started
            await asyncio.sleep(SWARM_SETTLE)
            before = (await worker_counters(status), lo_rx_bytes(), tree_cpu_seconds(master.pid),
                      sum(tree_cpu_seconds(p.pid) for p in procs[1:]))
            began = time.perf_counter()
            master.stdin.write("".join('{"id": %d, "data": ""}\n' % i for i in range(jobs)).encode())
            while results[0] < jobs:
                if time.perf_counter() - began > 600:
                    raise RuntimeError("%d of %d results in 600 s" % (results[0], jobs))
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - began
            after = (await worker_counters(status), lo_rx_bytes(), tree_cpu_seconds(master.pid),
                     sum(tree_cpu_seconds(p.pid) for p in procs[1:]))
        finally:
            for proc in reversed(procs):
                if proc.returncode is None:
                    proc.terminate()
            for proc in procs:
                await proc.wait()
            if reader is not None:
                reader.cancel()
        counters = after[0] - before[0]
        return {"workers": count, "mesh": mesh, "one_host": one_host, "jobs": jobs, "seconds": elapsed, "jobs_per_s": jobs / elapsed,
                "healthy": healthy, "healthy_after_s": ready,
                "worker_cpu_s_per_1000": 1000 * (after[3] - before[3]) / jobs,
                "master_cpu_s_per_1000": 1000 * (after[2] - before[2]) / jobs,
                "wire_bytes_per_job": counters["qx_bytes_received_total"] / jobs,
                "lo_bytes_per_job": (after[1] - before[1]) / jobs,
                "duplicates_per_job": counters["qx_packets_duplicate_total"] / jobs,
                "relayed_per_job": counters["qx_packets_relayed_total"] / jobs}


async def swarm(counts: list[int], jobs: int | None, batch: int, one_host: bool = False) -> int:
    """The mesh against the star for each N: one table (rows also in bench-swarm.json).

    "healthy": workers whose /healthz said 200 (a proven master's own wire) before the clock
    started; the swarm starts once all are, or none more became so for 30 s.
    """
    rows = []
    for count in counts:
        for mesh in (False, True):
            rows.append(await swarm_run(count, jobs or max(5000, 1000 * count), batch, mesh, one_host))
            print("  %s" % json.dumps(rows[-1]), flush=True)
            Path("bench-swarm.json").write_text(json.dumps(rows, indent=2))
    print("\nmaster.py and N worker.py, batches of %d: a star (peers=) and an LSD mesh, one namespace, %s\n" % (
        batch, "every worker on 127.0.0.1" if one_host else "each worker on a loopback address of its own"))
    print("%4s %5s %8s %8s %13s %13s %11s %10s %9s %9s" % (
        "N", "", "healthy", "jobs/s", "worker CPU s", "master CPU s", "wire B/job", "lo B/job", "dups/job",
        "relays/job"))
    print("%4s %5s %8s %8s %13s %13s" % ("", "", "", "", "/1,000 jobs", "/1,000 jobs"))
    for row in rows:
        print("%4d %5s %8d %8.0f %13.2f %13.2f %11.0f %10.0f %9.2f %9.2f" % (
            row["workers"], "mesh" if row["mesh"] else "star", row["healthy"], row["jobs_per_s"],
            row["worker_cpu_s_per_1000"], row["master_cpu_s_per_1000"], row["wire_bytes_per_job"],
            row["lo_bytes_per_job"], row["duplicates_per_job"], row["relayed_per_job"]))
    for star, mesh in zip(rows[::2], rows[1::2], strict=True):
        print("N=%d: mesh/star bytes per job %.2fx (lo %.2fx), worker CPU per job %.2fx" % (
            star["workers"], mesh["wire_bytes_per_job"] / max(star["wire_bytes_per_job"], 1e-9),
            mesh["lo_bytes_per_job"] / max(star["lo_bytes_per_job"], 1e-9),
            mesh["worker_cpu_s_per_1000"] / max(star["worker_cpu_s_per_1000"], 1e-9)))
    return 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs (a smoke run)")
    parser.add_argument("--json", default="bench-results.json", help="where to write the figures")
    parser.add_argument("--soak", type=int, metavar="JOBS", help="run only the soak test with JOBS jobs")
    parser.add_argument("--js-worker", type=Path, metavar="DIR", help="run only the unchanged JS worker "
                        "(a queue-xec/worker checkout with its npm packages) against master.py, in unshare -n")
    parser.add_argument("--swarm", type=int, nargs="+", metavar="N",
                        help="run only the swarm comparison (master.py and N workers, mesh and star; "
                             "root: it runs in a network namespace)")
    parser.add_argument("--swarm-jobs", type=int, metavar="JOBS", help="jobs per swarm run (1,000 N, 5,000 at least)")
    parser.add_argument("--batch", type=int, default=10, help="batch size of the swarm's workers")
    parser.add_argument("--one-host", action="store_true", help="swarm: every worker on 127.0.0.1 (one host), "
                        "not each on a loopback address of its own (a LAN)")
    args = parser.parse_args()
    if args.js_worker:
        return await js_worker_rows(args.js_worker)
    if args.swarm:
        status = in_own_namespace("QX_BENCH_NAMESPACE", "bench.py --swarm")  # LSD: never on the LAN
        if status is not None:
            return status
        w.Logger("error")
        return await swarm(args.swarm, args.swarm_jobs, args.batch, args.one_host)
    if args.soak:
        w.Logger("error")
        return await soak(args.soak)
    scale = 0.1 if args.quick else 1.0
    n = lambda count: max(20, int(count * scale))
    w.Logger("error")
    rows: dict[str, dict] = {}
    rows["master.py, unbatched"] = await against_master_py(n(5000), 1)
    rows["master.py, batches of 10"] = await against_master_py(n(20000), 10)
    rows["master.py, batches of 100"] = await against_master_py(n(50000), 100)
    rows["master.py, batches of 100, database file"] = await against_master_py(n(50000), 100, db_file=True)
    rows["master.py, batches of 100, python -m worker"] = await against_master_py(n(50000), 100, module=True)
    for count in (1, 4, 16):
        rows["master.py, %d worker(s), batches of 100" % count] = await against_master_py(n(40000), 100, count)
    # "RSS w+c": the worker's peak RSS plus its task children's
    rows["batches of 100, task.py child, RSS w+c"] = await with_settings(n(50000), 100, {})
    rows["batches of 100, taskRunner=thread"] = await with_settings(n(50000), 100, {"taskRunner": "thread"})
    rows["batches of 100, task.py child, statusPort on"] = await with_settings(
        n(50000), 100, {"statusPort": free_port(), "LOG_LEVEL": "warn"})
    rows["per-job /metrics figures (us per job)"] = counters_cost()
    rows.update(await cpu_bound(max(100, n(300))))
    if shutil.which("node"):
        rows["batches of 10, task.js child, RSS w+c"] = await with_settings(
            n(2000), 10, {}, TRIVIAL_TASK_JS, "task.js")
    has_js = shutil.which("node") and (HERE / "interop/node_modules/bugout").is_dir()
    if has_js:
        rows["JS master, unbatched"] = await against_js_master(n(300), 1)
        rows["JS master, batches of 10"] = await against_js_master(n(1000), 10)
    rows["RPC Python-Python"] = await rpc_latency(n(3000), js=False)
    if has_js:
        rows["RPC Python-JS"] = await rpc_latency(n(300), js=True)
    rows["10 MB asset sync"] = await asset_sync(10)
    rows["master proof, master.py (key challenge)"] = await proof_cost(n(2000), js=False)
    if has_js:
        rows["master proof, JS master (asset hashes)"] = await proof_cost(n(200), js=True)
    machine = "%s, %s, %d cores, Python %s" % (platform.node(), platform.machine(), os.cpu_count() or 0,
                                               platform.python_version())
    print("\nqueue-xec Python worker benchmark (%s)\n" % machine)
    print("%-42s %12s %10s %10s %10s" % ("case", "jobs/s", "median ms", "p99 ms", "RSS MB"))
    for name, row in rows.items():
        rate = row.get("jobs_per_s", row.get("calls_per_s", row.get("mb_per_s")))
        unit = " MB/s" if "mb_per_s" in row else ""
        print("%-42s %12s %10s %10s %10s" % (
            name, "%.0f%s" % (rate, unit), _fmt(row.get("median_ms")), _fmt(row.get("p99_ms")),
            _fmt(row.get("peak_rss_mb"))))
    Path(args.json).write_text(json.dumps({"machine": machine, "results": rows}, indent=2))
    print("\nwritten to %s" % args.json)
    return 0 if all(r.get("right", True) for r in rows.values()) else 1


def _fmt(value) -> str:
    return "-" if value is None else "%.2f" % value if value < 100 else "%.0f" % value


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
