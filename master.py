#!/usr/bin/env python3
"""queue-xec Master in Python: the JS Master's API on worker.py's wire.

It answers the four RPCs (``isMaster``, ``requestExecAssets``, ``requestWork``,
``shareResults``) exactly as the JS Master does, so JS and Python workers both
work for it, and adds leases: a job handed to a worker that leaves, or that
does not answer in time, is queued again, and each job's result is passed to
``on_results`` once. It gives work by proof: a Python worker proves the key
to it (``proveKey``), a peer that cannot gets a small allowance and has its
results taken only for its own jobs ("Who gets work").

    master = Master(token, exec_assets={"files": [...], "dependencies": [...]},
                    on_results=print, transfer_encrypt_token=key)
    await master.start()
    master.push_new_job({"id": 1, "data": "{}"})

Its state lives in SQLite (``db=``; in memory unless told): jobs waiting and
on lease, every result, and how far a jobs file was read. A result's way:

1. It is recorded in the transaction of the call that brought it, with the
   leases that call hands out; a job id has one result per run, later ones
   are counted as duplicates and dropped.
2. The commit writes it to the log: from now on a kill cannot undo it. The
   command line prints it now, and ``out`` gets it.
3. The log is synced (in a thread; one fsync serves every commit made before
   it began): from now on a power cut cannot undo it either.
4. ``on_results`` gets it, and the worker gets the answer after which it
   forgets the result.

Anything failing before 2 undoes the call's writes and sends no answer: the
worker keeps its results and sends them again. So a ``kill -9`` loses no
result, and no result is printed or given to ``on_results`` twice, across
restarts too.

From the command line (settings from ``.env`` as for the worker; jobs as JSON
lines, ``-`` for stdin; results printed as JSON lines, and a line that is not
JSON as an ``error`` event before the next line is read)::

    python master.py --task task.py --jobs jobs.jsonl [--out results.jsonl]

It keeps its state in ``master.db`` beside ``.env`` (``--db``), and its address
there as ``masterSeed``; it continues an unfinished run when started again, ends
with a ``summary`` event once every job of the file has a result (exit 1 if some
are error results; 3 if a signal ends it first, the run kept), and keeps serving
with ``--follow`` (the default for ``--jobs -``). A ``--task`` it cannot serve,
or none named task.py or task.js, is exit 2 at once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import re
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from worker import (
    JOBS_WAITING,
    JOURNAL_NAME,
    MAX_ASSET_FILES,
    NO_ANSWER,
    PROOF_LABEL,
    WORKER_PROOF_LABEL,
    Bugout,
    Crypt,
    CryptError,
    Exposition,
    Helper,
    Logger,
    Settings,
    StatusServer,
    WorkerError,
    as_dict,
    json_dumps,
    limit_loop_errors,
    load_env,
    make_seed,
    master_proof,
    node_options,
    private_files,
    process_rss_bytes,
    read_env_file,
    storable_json,
    worker_proof,
    write_env_file,
)
from worker import _LogLimit as LogLimit
from worker import _RateLimit as RateLimit

log = logging.getLogger("worker")

#: Seconds between two "jobs waiting" broadcasts; one within it is sent when it ends.
ANNOUNCE_GAP = 0.05
#: Most jobs handed out in one batch, whatever batchSize a peer asks for.
MAX_BATCH = 1000
#: Seconds between two syncs of an ``out`` file (a crash rewrites what came after from the database).
CHECKPOINT_EVERY = 1.0
#: Bytes of write-ahead log after which it is checkpointed into the database file.
WAL_LIMIT = 16 << 20
#: PRAGMA application_id of a master.py database ("qxm1") and its schema version.
DB_APPLICATION_ID = 0x71786D31
DB_VERSION = 1
DB_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY,
    pos INTEGER NOT NULL,   -- queue order: jobs queued again get a place in front
    job_key TEXT UNIQUE,    -- the job's id as JSON (NULL: no id, so no lease, no check)
    payload TEXT NOT NULL,  -- the job as pushed, encrypted as handed out
    worker TEXT,            -- the lease holder's address, NULL while the job waits
    deadline REAL           -- end of the lease (time.time())
);
CREATE INDEX jobs_waiting ON jobs(pos) WHERE worker IS NULL;
CREATE INDEX jobs_leased ON jobs(worker) WHERE worker IS NOT NULL;
CREATE TABLE results (
    seq INTEGER PRIMARY KEY,
    run INTEGER NOT NULL,
    job_key TEXT,
    worker TEXT NOT NULL,   -- the address it came from
    name TEXT,              -- the name the worker gave
    error INTEGER NOT NULL,
    result TEXT,            -- the result as JSON (NULL in memory: nothing could read it later)
    UNIQUE (run, job_key)
);
"""


class DatabaseError(WorkerError):
    """master.py's database cannot be used: foreign, corrupt, newer, in use or unwritable."""


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode  # json_dumps, made once


def _job_key(job_id: Any) -> str | None:
    """A job id as the database keeps it: its JSON (an int's is its digits)."""
    if job_id is None:
        return None
    return str(job_id) if type(job_id) is int else storable_json(job_id)


# The queue on disk ##########################################################

def _sync_dir(path: str) -> None:
    """Make a new file's name in its folder survive a power cut."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """The master's state in SQLite: jobs waiting or on lease, results, facts of the run.

    Writes gather in one open transaction: the master commits once per RPC and
    once per loop iteration of pushes, never per job. ``commit()`` writes the
    transaction to the write-ahead log, where a crash of the process cannot
    undo it; ``await synced()`` then makes it survive a power cut too (an fsync
    of the log in a thread: what synchronous=FULL does within the commit, done
    in a second step so that the master prints in between, and serves others
    while it runs). A second connection moves the log into the database file,
    in a thread too. The counts mirror the tables, so nothing per job is held in
    memory. One process at a time: the file stays locked (flock) while it is
    open. In memory (``:memory:``) results are recorded without their data,
    which no later process could read.
    """

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        #: jobs waiting, jobs on lease, results and error results of this run
        self.waiting = self.leased = self.answered = self.errors = 0
        self.run = 1
        #: the run's name on the wire (``run`` in isMaster and requestWork answers), random: a worker
        #: gives a result it holds only to the run whose job it answers (worker.py, class Outbox)
        self.run_id = ""
        self.closed = False
        #: whether results are kept with their data (not in memory: nothing could read it later)
        self.keeps_data = self.path not in (":memory:", "")
        self._wal: int | None = None  # our descriptor of the write-ahead log, to sync it
        self._lock: int | None = None  # our descriptor of the database file, locked (flock)
        self._checkpointer: sqlite3.Connection | None = None  # a second connection, for a thread
        self._checkpointing: asyncio.Future | None = None
        self._wal_is_new = False
        #: commits that wrote something, and how many of them are synced; the fsync running
        self._commits = self._synced = self._changes = 0
        self._syncing: asyncio.Future | None = None
        try:
            if self.keeps_data and not os.path.exists(self.path):  # results in clear: 0600, and
                private_files(self.path)  # so its -wal and -shm files, as SQLite copies the mode
            self.db = sqlite3.connect(self.path, timeout=2.0, isolation_level=None,
                                      check_same_thread=False)
        except OSError as exc:
            raise DatabaseError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open {self.path}: {exc}") from None
        try:
            self._open()
        except (sqlite3.Error, OSError, DatabaseError) as exc:
            self.close()
            if isinstance(exc, DatabaseError):
                raise
            if isinstance(exc, sqlite3.Error):
                raise self._refusal(exc) from None
            raise DatabaseError(f"cannot use {self.path}: {exc}") from None
        if self.keeps_data:  # ours, checked: one an older master.py made 0644 becomes 0600 too
            private_files(self.path, self.path + "-wal", self.path + "-shm")

    def _refusal(self, exc: sqlite3.Error) -> DatabaseError:
        if "locked" in str(exc) or "busy" in str(exc):
            return DatabaseError(f"{self.path} is in use by another process")
        if isinstance(exc, sqlite3.OperationalError):
            return DatabaseError(f"cannot use {self.path}: {exc}")
        return DatabaseError(f"{self.path} is not a master.py database, or is corrupt ({exc}); "
                             "it was left as it is")

    def _open(self) -> None:
        """Lock the file, check what it is, then set it up: the schema, WAL, our syncs."""
        if self.keeps_data:
            self._lock = os.open(self.path, os.O_RDONLY)
            try:  # flock, not SQLite's POSIX locks: closing another descriptor does not drop it
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DatabaseError(f"{self.path} is in use by another master.py") from None
        app = self.db.execute("PRAGMA application_id").fetchone()[0]
        tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app == 0 and not tables:
            self._create()
        elif app != DB_APPLICATION_ID:
            raise DatabaseError(f"{self.path} is not a master.py database; it was left as it is")
        elif self.db.execute("PRAGMA user_version").fetchone()[0] != DB_VERSION:
            raise DatabaseError(f"{self.path} was written by another version of master.py")
        elif (check := self.db.execute("PRAGMA quick_check(1)").fetchone()[0]) != "ok":
            raise DatabaseError(f"{self.path} is corrupt ({check}); it was left as it is")
        elif not {"meta", "jobs", "results"} <= tables:
            raise DatabaseError(f"{self.path} is corrupt (tables missing); it was left as it is")
        wal = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        # with a log, synced(): see the class docstring (without one, as on some network disks, FULL)
        self.db.execute("PRAGMA synchronous=%s" % ("NORMAL" if wal else "FULL"))
        self.db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoint() in a thread, never in a commit
        self.db.execute("PRAGMA journal_size_limit=%d" % WAL_LIMIT)
        self.db.execute("BEGIN IMMEDIATE")  # the log exists from now on
        self.db.execute("COMMIT")
        if wal:
            self._wal = os.open(self.path + "-wal", os.O_RDONLY)
            self._wal_is_new = True
            self._commits = 1  # the file is new: sync it once
        self._count()

    def _create(self) -> None:
        self.db.executescript("BEGIN IMMEDIATE; %s; PRAGMA application_id=%d; PRAGMA user_version=%d; "
                              "COMMIT;" % (DB_SCHEMA, DB_APPLICATION_ID, DB_VERSION))

    def _count(self) -> None:
        """The counts, queue ends and run number, from the tables."""
        one = lambda sql, *args: self.db.execute(sql, args).fetchone()[0]
        self.run = int(self.get("run", 1))
        self.run_id = self.get("runId") or self._new_run_id()
        self.waiting = one("SELECT count(*) FROM jobs WHERE worker IS NULL")
        self.leased = one("SELECT count(*) FROM jobs WHERE worker IS NOT NULL")
        self.answered = one("SELECT count(*) FROM results WHERE run = ?", self.run)
        self.errors = one("SELECT coalesce(sum(error), 0) FROM results WHERE run = ?", self.run)
        self._last = one("SELECT coalesce(max(seq), 0) FROM results")
        self._front = min(0, one("SELECT coalesce(min(pos), 0) FROM jobs"))
        self._back = max(0, one("SELECT coalesce(max(pos), 0) FROM jobs"))

    # transactions
    def _write(self) -> sqlite3.Connection:
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
        return self.db

    @contextlib.contextmanager
    def undoable(self) -> Iterator[None]:
        """Writes that are undone, alone, if the block raises (others pending are kept)."""
        if not self.db.in_transaction:
            try:
                yield
            except BaseException:
                self.rollback()
                raise
            return
        self.db.execute("SAVEPOINT undoable")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK TO undoable")
            self.db.execute("RELEASE undoable")
            self._count()
            raise
        self.db.execute("RELEASE undoable")

    def commit(self) -> None:
        """Write the open transaction to the log: from now on only a power cut can undo it."""
        if self.db.in_transaction:
            self.db.execute("COMMIT")
            if self.db.total_changes != self._changes:  # something was written
                self._changes = self.db.total_changes
                self._commits += 1

    @property
    def durable(self) -> bool:
        """Whether commits need ``synced()`` to survive a power cut (a file, not memory)."""
        return self._wal is not None

    async def synced(self) -> None:
        """Wait until every commit so far survives a power cut.

        The fsync of the log runs in a thread, so the loop serves others meanwhile,
        and one fsync covers every commit made before it began (group commit)."""
        target = self._commits
        while self._wal is not None and self._synced < target:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._sync())
            await asyncio.shield(self._syncing)

    async def _sync(self) -> None:
        upto = self._commits
        try:
            await asyncio.to_thread(os.fsync, self._wal)
            if self._wal_is_new:  # its name in the folder, too
                await asyncio.to_thread(_sync_dir, self.path)
                self._wal_is_new = False
            self._synced = upto
        finally:
            self._syncing = None

    def wal_size(self) -> int:
        return os.fstat(self._wal).st_size if self._wal is not None and not self.closed else 0

    def checkpoint_soon(self) -> None:
        """Move the log into the database file (and sync it) in a thread, with a second
        connection: commits go on meanwhile. One at a time."""
        if self._wal is not None and not self.closed and self._checkpointing is None:
            loop = asyncio.get_running_loop()
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                                     check_same_thread=False)
            self._checkpointing = loop.create_task(self._checkpoint(self._checkpointer))

    async def _checkpoint(self, connection: sqlite3.Connection) -> None:
        try:
            await asyncio.to_thread(connection.execute, "PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the next one may do better
            log.error("cannot checkpoint %s: %s", self.path, exc)
        finally:
            self._checkpointing = None

    async def aclose(self) -> None:
        """Wait for the syncs and the checkpoint under way, then close. Idempotent."""
        with contextlib.suppress(OSError):
            await self.synced()
        if self._checkpointing is not None:
            await self._checkpointing
        self.close()

    def rollback(self) -> None:
        """Forget what was not committed; the counts follow the tables again."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self._count()

    def close(self) -> None:
        """Commit what is pending and close (see aclose()). Idempotent."""
        if not self.closed:
            self.closed = True
            self.commit()
            if self._checkpointer is not None:
                self._checkpointer.close()
            self.db.close()  # checkpoints and syncs
            for fd in (self._wal, self._lock):  # the lock last
                if fd is not None:
                    os.close(fd)

    # facts of the run
    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set(self, **values: Any) -> None:
        self._write().executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    def new_run(self) -> None:
        """Results from now on belong to a new run (its job ids may repeat the last one's)."""
        self.run += 1
        self.set(run=self.run)
        self._new_run_id()
        self.answered = self.errors = 0

    def _new_run_id(self) -> str:
        """A new random run name, kept with the next commit (before any job of it is handed out)."""
        self.run_id = os.urandom(12).hex()
        self.set(runId=self.run_id)
        return self.run_id

    # jobs and leases
    def push(self, key: str | None, payload: str) -> bool:
        """Queue a job; False if its id waits, is on lease or was answered in this run."""
        self._back += 1
        if key is None:
            cursor = self._write().execute("INSERT INTO jobs (pos, payload) VALUES (?, ?)",
                                           (self._back, payload))
        else:
            cursor = self._write().execute(
                "INSERT OR IGNORE INTO jobs (pos, job_key, payload) SELECT ?, ?, ? WHERE NOT EXISTS "
                "(SELECT 1 FROM results WHERE run = ? AND job_key = ?)",
                (self._back, key, payload, self.run, key))
        self.waiting += cursor.rowcount
        return cursor.rowcount > 0

    def lease(self, worker: str, count: int, deadline: float) -> list[tuple[str | None, str]]:
        """The next ``count`` waiting jobs, on lease to ``worker``: (job key, payload) each (a job
        without id, key None, leaves the queue)."""
        if count <= 0:
            return []
        db = self._write()
        first = "FROM jobs WHERE worker IS NULL ORDER BY pos LIMIT %d" % count
        rows = db.execute("SELECT job_key, payload " + first).fetchall()
        db.execute("UPDATE jobs SET worker = ?, deadline = ? WHERE seq IN (SELECT seq %s)" % first,
                   (worker, deadline))
        loose = sum(key is None for key, _ in rows)
        if loose:
            db.execute("DELETE FROM jobs WHERE worker = ? AND job_key IS NULL", (worker,))
        self.waiting -= len(rows)
        self.leased += len(rows) - loose
        return rows

    def requeue(self, worker: str | None = None, before: float | None = None) -> collections.Counter:
        """Jobs on lease to ``worker`` (or whose lease ends before ``before``) wait again, in front;
        how many, by the worker that held them."""
        where, args = ("worker = ?", worker) if worker is not None else ("worker IS NOT NULL AND deadline < ?", before)
        db = self._write()
        ended = collections.Counter(dict(db.execute(
            "SELECT worker, count(*) FROM jobs WHERE %s GROUP BY worker" % where, (args,))))
        if ended:
            self._front -= 1
            db.execute("UPDATE jobs SET worker = NULL, deadline = NULL, pos = ? WHERE " + where,
                       (self._front, args))
            self.waiting += ended.total()
            self.leased -= ended.total()
        return ended

    def overdue(self, holders: list[str], before: float, count: int) -> list[tuple]:
        """Up to ``count`` jobs on lease to ``holders`` whose lease ends before ``before``, oldest
        first: (seq, job key, payload, holder, deadline) each."""
        found = []
        for i in range(0, len(holders) if count > 0 else 0, 500):
            part = holders[i:i + 500]
            found += self.db.execute(
                "SELECT seq, job_key, payload, worker, deadline FROM jobs WHERE deadline < ? AND worker IN "
                "(%s) ORDER BY deadline LIMIT ?" % ",".join("?" * len(part)), (before, *part, count)).fetchall()
        return sorted(found, key=lambda row: row[4])[:count]

    def take_over(self, worker: str, holders: list[str], before: float, count: int,
                  deadline: float) -> list[tuple[str, str, str]]:
        """The ``overdue`` jobs, on lease to ``worker`` now: (job key, payload, who held it) each."""
        found = self.overdue(holders, before, count)
        if found:
            self._write().executemany("UPDATE jobs SET worker = ?, deadline = ? WHERE seq = ?",
                                      [(worker, deadline, row[0]) for row in found])
        return [(key, payload, holder) for _, key, payload, holder, _ in found]

    def holders(self, keys: list[str]) -> dict[str, str]:
        """Who holds each of these jobs on lease (a job not on lease is not named)."""
        return {key: worker for cursor in self._in(
            "SELECT job_key, worker FROM jobs WHERE worker IS NOT NULL AND job_key IN (%s)", keys)
            for key, worker in cursor}

    def held(self) -> dict[str, int]:
        """Jobs on lease, by the worker that holds them."""
        return dict(self.db.execute("SELECT worker, count(*) FROM jobs WHERE worker IS NOT NULL "
                                    "GROUP BY worker"))

    def any_job(self) -> str | None:
        """The payload of some job waiting or on lease (None: there is none)."""
        row = self.db.execute("SELECT payload FROM jobs LIMIT 1").fetchone()
        return None if row is None else row[0]

    def leases(self) -> list[tuple[str, str, str, float]]:
        """(job key, payload, worker, deadline) of every job on lease."""
        return self.db.execute("SELECT job_key, payload, worker, deadline FROM jobs "
                               "WHERE worker IS NOT NULL").fetchall()

    # results
    def record(self, results: list[tuple[str | None, str, str | None, bool, str | None]]) -> list[int | None]:
        """Keep results, (job key, worker, name, error, JSON or None), and end their jobs.

        Each one's place in the results; None for one whose key has a result in this
        run already (or earlier in ``results``)."""
        db = self._write()
        first = self._last + 1
        rows = [(first + i, self.run, key, worker, name, int(error), text)
                for i, (key, worker, name, error, text) in enumerate(results)]
        kept = db.executemany("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?)", rows).rowcount
        self._last += len(rows)
        if kept < len(rows):  # some had a result already: which were kept?
            found = {row[0] for cursor in self._in("SELECT seq FROM results WHERE seq IN (%s)",
                                                   [row[0] for row in rows]) for row in cursor}
            rows = [row for row in rows if row[0] in found]
        self.answered += len(rows)
        self.errors += sum(row[5] for row in rows)
        ended = [row[2] for row in rows if row[2] is not None]
        gone = sum(cursor.rowcount for cursor in self._in(
            "DELETE FROM jobs WHERE worker IS NOT NULL AND job_key IN (%s)", ended))
        self.leased -= gone
        if gone < len(ended):  # jobs queued again, answered late after all: not run again
            self.waiting -= sum(cursor.rowcount for cursor in self._in(
                "DELETE FROM jobs WHERE job_key IN (%s)", ended))
        kept_places = {row[0] for row in rows}
        return [place if place in kept_places else None for place in range(first, first + len(results))]

    def _in(self, sql: str, keys: list) -> Iterator[sqlite3.Cursor]:
        """``sql`` run with ``keys`` for its ``IN (%s)``, 500 at a time (SQLite takes 999 at least)."""
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            yield self.db.execute(sql % ",".join("?" * len(part)), part)

    def last_result(self) -> int:
        """The place of the last result kept (0: none)."""
        return self._last

    def results_after(self, seq: int, size: int = 1000) -> Iterator[list[tuple[int, str]]]:
        """(place, JSON) of the results kept after ``seq``, in order, ``size`` at a time."""
        while rows := self.db.execute("SELECT seq, result FROM results WHERE seq > ? AND result NOT NULL "
                                      "ORDER BY seq LIMIT ?", (seq, size)).fetchall():
            yield rows
            seq = rows[-1][0]

    def per_worker(self) -> list[dict]:
        """Results and error results of this run by the worker that sent them, most first."""
        rows = self.db.execute("SELECT worker, max(name), count(*), sum(error) FROM results WHERE run = ? "
                               "GROUP BY worker ORDER BY count(*) DESC", (self.run,))
        return [{"id": worker, "name": name, "results": count, "errors": errors}
                for worker, name, count, errors in rows]


class ResultsFile:
    """A JSON-lines file that gets each result of the database exactly once, across crashes too.

    Results are appended once committed. At most every CHECKPOINT_EVERY seconds
    (and at close) the file is synced and its length and last result noted in
    the next commit. Opened again, the file is cut back to the noted length
    and the results committed after it are appended again from the database.
    """

    def __init__(self, path: str | Path, store: Store) -> None:
        self.path = Path(path)
        self.store = store
        try:
            private_files(self.path)  # results: for this user alone
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise DatabaseError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        #: the file's length, the last result in it (results.seq), when it was last synced
        self.length = os.fstat(self.fd).st_size
        self.seq = store.last_result()
        self._synced = float("-inf")
        if store.get("out") == str(self.path.resolve()):
            self._resume(int(store.get("out_length", 0)), int(store.get("out_seq", 0)))
        self.checkpoint()

    def _resume(self, length: int, seq: int) -> None:
        """Cut what came after the last checkpoint; append the results committed since."""
        if self.length > length:
            os.ftruncate(self.fd, length)
            log.warning("%s: %d byte(s) after the last checkpoint cut off, to be written again",
                        self.path, self.length - length)
        elif self.length < length:
            log.warning("%s is shorter than master.py left it: appending after its end", self.path)
            length = self.length
        self.length, self.seq = length, seq
        for rows in self.store.results_after(seq):
            self.append(rows)

    def append(self, rows: list[tuple[int, str]]) -> None:
        """Write committed results, (results.seq, JSON) in order."""
        if not rows:
            return
        data = memoryview("".join(text + "\n" for _, text in rows).encode())
        self.length += len(data)
        self.seq = rows[-1][0]
        while data:
            data = data[os.write(self.fd, data):]

    def checkpoint(self, every: float = 0.0) -> None:
        """Sync the file and note how far it goes, in the open transaction (if ``every`` s passed)."""
        if time.monotonic() - self._synced >= every:
            getattr(os, "fdatasync", os.fsync)(self.fd)
            self._synced = time.monotonic()
            self.store.set(out=str(self.path.resolve()), out_length=self.length, out_seq=self.seq)

    def close(self) -> None:
        os.close(self.fd)


# Who gets work ##############################################################
#
# Theory of operation. The swarm's ``token`` is public: any peer may call
# requestWork, and until issue 22 master.py handed its queue to whoever asked.
# Now it gives work by proof:
#
# - A Python worker proves that it holds ``transferEncryptToken``, as master.py
#   proves it to the worker: the answer to the worker's ``isMaster
#   {"challenge"}`` carries a ``workerChallenge`` (32 fresh random bytes) and
#   the worker calls ``proveKey {"proof"}`` (worker.py's worker_proof: an HMAC
#   under a key of its own, bound to that nonce and both addresses). Nothing
#   of the peer's is decrypted. WorkerProofs keeps the open challenges; a
#   proof that fails is for the operator to fix: one ``worker-error`` line a
#   minute. A JS peer never sees any of it: only a Python worker challenges.
# - A proven worker that cannot run the task (it does not load, a dependency
#   does not install) tells why with ``workerError``; each worker's reason is
#   printed once per change, within a budget of lines. Nothing is taken from
#   a peer without proof: the token is public.
# - A proven worker gets what it asks for, up to MAX_BATCH (the JS cap), and
#   its results are taken for any job that has none yet.
# - A peer that cannot prove (a JS worker, an older worker.py, an attacker)
#   holds at most its allowance: FIRST_ALLOWANCE jobs at first, one more for
#   each result that answers a job on lease to it, halved each time leases of
#   its end without a result. Those that have answered jobs hold at most
#   UNPROVEN_SHARE of the jobs not answered yet together, and those that have
#   not, NEWCOMER_SHARE more (each share at least FIRST_ALLOWANCE): new
#   identities buy nothing, and a JS worker that delivers keeps its place in
#   a flood of them, to the end of a run.
# - Its results are taken only for jobs on lease to it (a job without id,
#   which has no lease: while it holds one), and only in the shape the JS and
#   Python workers send (an object with a "worker" object). A result that
#   decrypts proves little: AES-CBC has no MAC, and a peer that knows one
#   plaintext block (of a job, of a task file) can make a short one.
# - A proven worker that finds nothing waiting takes over the jobs that peers
#   without proof have held longest, once held TAKE_OVER_SECONDS: a flood
#   cannot hold the last jobs of a run for a whole lease, again and again.
#   The holder keeps its allowance, and its late result is not taken (its
#   lease ended); exactly once holds, as for any late result. While such jobs
#   wait to be taken over, master.py nudges idle workers.
# - Answers never depend on whether results decrypted or were taken.
# - Proven workers are served first (worker.py's Bugout.prioritize and
#   SlowLane): while one talks, what peers without proof send waits until
#   the proven workers' calls of that loop turn are served, and takes at most
#   UNPROVEN_LOOP_SHARE of the time; their wires wait unread meanwhile, and
#   nothing of theirs is dropped. A flood from any number of identities costs
#   a proven worker a bounded share of the machine, not its round trips.
#
# LeasePolicy counts what each peer without proof holds; the database holds
# the leases. The counts follow the master's events (leased, answered and by
# whom, ended: the peer left or its leases ran out) and are read again from
# the database at the start and after a rollback. Times are monotonic
# seconds, passed in as ``now``.

#: Jobs on lease at once to a peer that has not proved the key, at first: one batch of 10.
FIRST_ALLOWANCE = 10
#: Part of the jobs not answered yet that peers without proof that answered some may hold together,
#: and that those without a result yet may hold together (12 % in all, at least two batches).
UNPROVEN_SHARE = 0.10
NEWCOMER_SHARE = 0.02
#: Peers without proof whose standing is kept (the least recently heard that holds nothing goes
#: first; those holding jobs stay: the shares bound them), and seconds after which one that holds
#: nothing is forgotten.
MAX_STANDINGS = 4096
STANDING_SECONDS = 3600.0
#: Workers known to have proved the key (the least recently proven goes first).
MAX_PROVEN_WORKERS = 4096
#: Part of the loop's time what peers without proof send may take while a proven worker talks
#: (worker.py's LANE_ACTIVE); with none talking, all of it.
UNPROVEN_LOOP_SHARE = 0.05
#: Seconds a peer without proof holds a job before a proven worker with nothing to do takes it over.
TAKE_OVER_SECONDS = 10.0
#: Seconds a worker has to answer our challenge with proveKey, and challenges open at most.
CHALLENGE_SECONDS = 30.0
MAX_CHALLENGES = 4096
#: A worker's workerError: its most bytes, and the worker-error events of the task printed at
#: once, then one per this many seconds (each worker tells each change once).
MAX_WORKER_ERROR = 16384
WORKER_ERROR_BURST = 20
WORKER_ERROR_GAP = 3.0


def _one_line(text: str, most: int) -> str:
    """A peer's text for one log line: control characters as spaces, at most ``most`` characters."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
    return text if len(text) <= most else text[:most - 1] + "…"


def _js_truthy(value: Any) -> bool:
    """JavaScript's truth (the JS master's ``if (args.getBatch)``): the string "false" is true."""
    if isinstance(value, (dict, list)):
        return True
    return bool(value) and not (isinstance(value, float) and math.isnan(value))  # NaN: Python's JSON reads it


def _whole(value: Any) -> int | None:
    """A count as a peer may send it: a number, or the text of one (the JS worker sends its
    .env's); None if it is no whole number (10.5, Infinity, NaN, "ten", a list, ...)."""
    if isinstance(value, str) and len(value) <= 32:
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value)


def work_asked(args: dict) -> int | None | str:
    """What a requestWork asks: a batch of ``batchSize`` jobs (an int, maybe over MAX_BATCH),
    one job (None: getBatch is false), or why it is refused (a string)."""
    if not _js_truthy(args.get("getBatch")):
        return None
    size = _whole(args.get("batchSize"))
    if size is None or size < 1:
        return "batchSize must be a whole number, at least 1"
    return size


def _result_fields(result: Any) -> tuple[str | None, str | None, bool, bool]:
    """(job key, worker name, error, in the workers' shape) of a result as a peer sent it."""
    if not isinstance(result, dict):
        return None, None, False, False
    worker = result.get("worker")
    name = worker.get("name") if isinstance(worker, dict) else None
    name = name[:256].encode(errors="replace").decode() if isinstance(name, str) else None
    return _job_key(result.get("jobID")), name, bool(result.get("error")), isinstance(worker, dict)


def take_over(store: Store, policy: LeasePolicy, worker: str, count: int, deadline: float) -> list:
    """Jobs that peers without proof held TAKE_OVER_SECONDS, oldest first, on lease to the proven
    ``worker`` now (until ``deadline``): (job key, payload) each."""
    taken = store.take_over(worker, policy.holders(), deadline - TAKE_OVER_SECONDS, count, deadline)
    for holder, jobs in collections.Counter(holder for _, _, holder in taken).items():
        policy.released(holder, jobs)
    return [(key, payload) for key, payload, _ in taken]


class WorkerProofs:
    """master.py's challenges to workers, and their checks (sans-I/O)."""

    def __init__(self, proof_key: bytes, address: str) -> None:
        self.address = address
        self._key = proof_key
        self._open: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()

    def challenge(self, worker: str, nonce: bytes, now: float) -> str:
        """Challenge ``worker`` with ``nonce`` (replacing one it had); the nonce in hex."""
        self._open.pop(worker, None)
        self._open[worker] = (nonce, now + CHALLENGE_SECONDS)
        while len(self._open) > MAX_CHALLENGES:
            self._open.popitem(last=False)
        return nonce.hex()

    def check(self, worker: str, proof: Any, now: float) -> bool | None:
        """Whether ``proof`` answers our open challenge of ``worker``; None when none is open
        (never made, run out, or answered: each counts once)."""
        nonce, until = self._open.pop(worker, (b"", 0.0))
        if until < now:
            return None
        expected = worker_proof(self._key, nonce, worker, self.address)
        return isinstance(proof, str) and proof.isascii() and hmac.compare_digest(proof, expected)


class WorkerReports:
    """Which reasons workers told (workerError) are news to print (sans-I/O): each worker's once
    per change of the files served or of the reason, WORKER_ERROR_BURST at once, then one per
    WORKER_ERROR_GAP seconds. Memory: a digest per worker, MAX_PROVEN_WORKERS of them."""

    def __init__(self) -> None:
        #: worker address -> digest of what it told last, least recently told first
        self._told: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._limit = RateLimit(1 / WORKER_ERROR_GAP, WORKER_ERROR_BURST)
        #: news held back over the budget since the last one printed; every news so far
        self.held = self.told = 0

    def news(self, worker: str, files: str, error: str, now: float) -> int | None:
        """None when there is nothing to print (told before, or over the budget: then counted);
        else how many news were held back before this one."""
        digest = hashlib.sha256(("%s\0%s" % (files, error)).encode(errors="replace")).digest()
        if self._told.get(worker) == digest:
            return None
        self._told[worker] = digest
        self._told.move_to_end(worker)
        while len(self._told) > MAX_PROVEN_WORKERS:
            self._told.popitem(last=False)
        self.told += 1
        if not self._limit.allow("task", now):
            self.held += 1
            return None
        held, self.held = self.held, 0
        return held


@dataclasses.dataclass
class Standing:
    """What a peer without proof has earned, and what it holds."""
    allowance: int = FIRST_ALLOWANCE
    #: jobs with an id on lease to it
    held: int = 0
    #: when each job without id it was given stops counting (it has no lease to end)
    loose: collections.deque = dataclasses.field(default_factory=collections.deque)
    #: results that answered jobs it held
    answered: int = 0
    heard: float = 0.0

    @property
    def holding(self) -> int:
        return self.held + len(self.loose)


class LeasePolicy:
    """How many jobs a peer gets, and whose results are taken (sans-I/O; see the top of this
    section)."""

    def __init__(self, first: int = FIRST_ALLOWANCE, most: int = MAX_BATCH, share: float = UNPROVEN_SHARE,
                 newcomers: float = NEWCOMER_SHARE) -> None:
        self.first, self.most, self.share, self.newcomers = first, most, share, newcomers
        #: workers that proved the key, least recently proven first
        self.proven: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: jobs held by peers without proof that answered some, and by those that answered none yet
        self.held_known = self.held_new = 0
        self._standings: collections.OrderedDict[str, Standing] = collections.OrderedDict()

    def prove(self, address: str) -> bool:
        """``address`` proved the key; False if it had before."""
        standing = self._standings.pop(address, None)
        if standing is not None:
            self._count(standing, -1)
        known = address in self.proven
        self.proven[address] = None
        self.proven.move_to_end(address)
        while len(self.proven) > MAX_PROVEN_WORKERS:
            self.proven.popitem(last=False)
        return not known

    def standing(self, address: str) -> Standing | None:
        """What a peer without proof has earned and holds (None: nothing known, or proven)."""
        return self._standings.get(address)

    def grant(self, address: str, asked: int, outstanding: int) -> int:
        """How many of the ``asked`` jobs ``address`` gets (``outstanding``: jobs not answered yet)."""
        asked = max(0, min(asked, self.most))
        if address in self.proven:
            return asked
        standing = self._standings.get(address) or Standing(allowance=self.first)  # kept once it gets jobs
        if standing.answered:
            pool = max(self.first, int(self.share * outstanding)) - self.held_known
        else:
            pool = max(self.first, int(self.newcomers * outstanding)) - self.held_new
        return max(0, min(asked, standing.allowance - standing.holding, pool))

    @property
    def held(self) -> int:
        """Jobs held by peers without proof."""
        return self.held_known + self.held_new

    def leased(self, address: str, count: int, loose: int, until: float, now: float) -> None:
        """``address`` got ``count`` jobs with an id and ``loose`` without, which count as held
        until ``until``."""
        if address not in self.proven and count + loose:
            self._change(self._touch(address, now), held=count, loose=[until] * loose)

    def accepted(self, address: str, results: list[tuple[str | None, str | None, bool]]) -> list[bool]:
        """Which results ``address`` may give: (job key, who holds that job, in the workers'
        shape) each. A proven worker: all. Another peer: those for jobs it holds."""
        if address in self.proven:
            return [True] * len(results)
        standing = self._standings.get(address)
        loose = len(standing.loose) if standing is not None else 0
        taken = []
        for key, holder, shaped in results:
            ok = shaped and (holder == address if key is not None else loose > 0)
            loose -= ok and key is None
            taken.append(ok)
        return taken

    def taken(self, address: str, holders: list[str | None], keyed: list[bool]) -> None:
        """Results from ``address`` were kept: each ends the lease of its job's holder (None: no
        lease). Those that answer its own jobs earn it one job more of allowance each."""
        own = sum(holder == address for holder in holders)
        own_loose = sum(holder is None and not has_key for holder, has_key in zip(holders, keyed))
        others = collections.Counter(h for h in holders if h is not None and h != address)
        standing = self._standings.get(address)
        if standing is not None and own + own_loose:
            self._change(standing, held=-own, loose=-own_loose, answered=own + own_loose)
        for holder, count in others.items():
            self.released(holder, count)

    def holders(self) -> list[str]:
        """Peers without proof that hold jobs with an id (few: the shares bound them)."""
        return [address for address, standing in self._standings.items() if standing.held]

    def released(self, holder: str, count: int) -> None:
        """Leases of ``holder`` ended, answered by another: no merit, no blame."""
        standing = self._standings.get(holder)
        if standing is not None:
            self._change(standing, held=-count)

    def ended(self, holder: str, count: int) -> None:
        """Leases of ``holder`` ended without a result (it left, or they ran out): its allowance halves."""
        standing = self._standings.get(holder)
        if standing is not None and count:
            self._change(standing, held=-count, allowance=max(1, standing.allowance // 2) - standing.allowance)

    def expire(self, now: float) -> None:
        """Jobs without id given long enough ago stop counting, as leases that ended without a
        result; peers that hold nothing and were not heard for STANDING_SECONDS are forgotten."""
        for standing in list(self._standings.values()):
            gone = sum(1 for until in standing.loose if until <= now)
            if gone:
                self._change(standing, loose=-gone, allowance=max(1, standing.allowance // 2) - standing.allowance)
        while self._standings:
            address, oldest = next(iter(self._standings.items()))
            if oldest.holding or oldest.heard > now - STANDING_SECONDS:
                break
            del self._standings[address]

    def restore(self, held: dict[str, int]) -> None:
        """Take the counts of jobs on lease from the database (at the start, after a rollback)."""
        for address, standing in self._standings.items():
            self._change(standing, held=held.get(address, 0) - standing.held)
        for address, count in held.items():
            if address not in self.proven and address not in self._standings:
                self._change(self._touch(address, 0.0), held=count)

    # private
    def _touch(self, address: str, now: float) -> Standing:
        standing = self._standings.pop(address, None)
        if standing is None:
            standing = Standing(allowance=self.first)
            excess = len(self._standings) + 1 - MAX_STANDINGS
            if excess > 0:  # the least recently heard that hold nothing, those that never answered first
                oldest = [(peer, known) for peer, known in itertools.islice(self._standings.items(), 64)
                          if not known.holding]
                oldest.sort(key=lambda item: item[1].answered > 0)
                for quiet, _ in oldest[:excess]:
                    del self._standings[quiet]
        standing.heard = max(standing.heard, now)
        self._standings[address] = standing
        return standing

    def _change(self, standing: Standing, held: int = 0, loose: int | list = 0, answered: int = 0,
                allowance: int = 0) -> None:
        """Change a standing, and the sums with it."""
        self._count(standing, -1)
        standing.held = max(0, standing.held + held)
        if isinstance(loose, list):
            standing.loose.extend(loose)
        else:
            for _ in range(min(-loose, len(standing.loose))):
                standing.loose.popleft()
        standing.answered += answered
        standing.allowance = min(self.most, standing.allowance + answered + allowance)
        self._count(standing, 1)

    def _count(self, standing: Standing, sign: int) -> None:
        if standing.answered:
            self.held_known += sign * standing.holding
        else:
            self.held_new += sign * standing.holding


# The master #################################################################

#: A result recorded in the open transaction: (its place in the results, its JSON, itself).
#: The JSON is None when nothing needs it (Master._texts).
Taken = tuple[int, Any, Any]


@dataclasses.dataclass
class Lease:
    """A job out with a worker until its result comes or the lease ends (``time.time()``)."""
    job: str
    worker: str
    deadline: float


class Master:
    """The JS queue-xec Master's API in Python, plus leases and a durable queue.

    ``options``: the node's settings, as the Worker's (worker.py's
    ``NODE_SETTINGS``: ``port``, ``host``, ``peers``, ``lsd``, ``seed``,
    ``dht``, ``trackers``, ...), each from ``env`` (default: .env and the
    environment) when not given; or ``settings=Settings.load(...)``. Unset
    ``trackers`` means bugout's public wss:// trackers, an empty one none.
    ``db``: the SQLite file of the queue (in memory unless
    told; a file continues where the last master on it stopped). ``out``: a
    JSON-lines file that gets each result exactly once.

    A result is committed before anything else happens to it: then ``out``
    gets it; once the commit is synced, ``on_results`` gets it (at most once:
    a crash just before the call loses the call, not the result) and its
    worker the answer that lets it forget the result.
    """

    _prints = False  # a subclass prints the results' JSON right after each commit

    def __init__(self, token: str | None = None, exec_assets: dict | None = None,
                 on_results: Callable[[Any], Any] | None = None,
                 loglevel: str | None = None, transfer_encrypt_token: str | None = None,
                 *, folder: str | Path | None = None, env: dict[str, str] | None = None,
                 settings: Settings | None = None, lease_seconds: float = 60.0,
                 db: str | Path = ":memory:", out: str | Path | None = None,
                 status_port: int | None = None, status_host: str = "127.0.0.1",
                 **options: Any) -> None:
        settings = Settings.of(settings, env, {"token": token, "loglevel": loglevel,
                                               "transfer_encrypt_token": transfer_encrypt_token,
                                               **node_options(options)})
        if settings.master_seed:  # its own address, apart from a worker's seed in the same .env
            settings = dataclasses.replace(settings, seed=settings.master_seed)
        #: the settings; master.py uses the swarm's keys, loglevel, masterSeed and the node's
        self.settings = settings
        self.token = settings.token
        if not self.token:
            raise WorkerError("no token")
        self.crypt = Crypt(settings.transfer_encrypt_token or "")
        self._proof_key = self.crypt.derive(PROOF_LABEL)
        #: one line a minute per kind of what peers can cause
        self._log = LogLimit()
        if settings.loglevel is not None:
            Logger(settings.loglevel)
        self.folder = Path(folder or Path.cwd())
        self.exec_assets = exec_assets or {"files": [], "dependencies": []}
        self.on_results = on_results or (lambda result: None)
        self.lease_seconds = lease_seconds
        self.node = Bugout(self.token, settings)
        self.node.lane.share = UNPROVEN_LOOP_SHARE  # see "Who gets work"
        #: jobs waiting and on lease, results (see Store); the ``out`` file, if any
        self.store = Store(db)
        try:
            self._check_key()
            self.out = ResultsFile(out, self.store) if out is not None else None
        except DatabaseError:
            self.store.close()
            raise
        #: who gets work, and whose results are taken; our challenges to workers
        self.policy = LeasePolicy()
        self.policy.restore(self.store.held())
        self.proofs = WorkerProofs(self.crypt.derive(WORKER_PROOF_LABEL), self.node.address)
        #: the first disk error that stopped a commit, a sync or a write (the command line stops)
        self.failure: Exception | None = None
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
        self._commit_handle: asyncio.Handle | None = None
        #: whether results are needed as JSON text: kept with their data, written or printed
        self._texts = self.store.keeps_data or self.out is not None or self._prints
        #: the status page (/metrics, /healthz) on this port of ``status_host``; None: off
        self.status_port, self.status_host = status_port, status_host
        self._status: StatusServer | None = None
        self._started = time.monotonic()
        #: worker address -> when it last asked for work or delivered; bounded, oldest first
        self._workers: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: why workers cannot run the task (workerError), as far as it is news
        self.reports = WorkerReports()
        self._answered_at: collections.deque[tuple[float, int]] = collections.deque(maxlen=61)

    def _check_key(self) -> None:
        """Jobs are kept encrypted: a database of jobs for another key is refused."""
        job = self.store.any_job()
        if job is not None:
            try:
                self.crypt.decrypt(job)
            except CryptError:
                raise DatabaseError(
                    f"{self.store.path} holds jobs encrypted with another transferEncryptToken (the key changed "
                    "since they were queued); it was left as it is: to start over with this key, move it away "
                    f"(mv {self.store.path} {self.store.path}.old) or pass --db ANOTHER_FILE; to finish those "
                    "jobs, set the old key back") from None

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def waiting(self) -> int:
        """Jobs waiting for a worker."""
        return self.store.waiting

    @property
    def leases(self) -> dict[Any, Lease]:
        """Jobs out on lease, by job id (read from the database: a snapshot)."""
        return {json.loads(key): Lease(job, worker, deadline)
                for key, job, worker, deadline in self.store.leases()}

    async def start(self) -> Master:
        node = self.node
        node.register("isMaster", self._is_master)
        node.register("ping", lambda a, args: {**as_dict(args), "pong": True})
        node.register("requestExecAssets", self._serve_exec_assets)
        node.register("requestWork", self._request_work)
        node.register("proveKey", self._prove_key)
        node.register("workerError", self._worker_error)
        node.register("shareResults", self._share_results)
        node.register("shareResultsBatch", self._share_results_batch)
        node.on("left", self._requeue_worker)
        node.on("wireleft", self._requeue_worker)
        node.on("rpc", self._heard)
        node.on("left", lambda address: self._workers.pop(address, None))
        self._commit()  # jobs pushed before the start
        await node.start()
        for coro in (self._expire_leases(), self._sample_rate()):
            self._tasks.add(asyncio.ensure_future(coro))
        if self.status_port is not None:
            self._status = await StatusServer(self.status_host, self.status_port, self.metrics_text,
                                              self.health).start()
        log.info("master %s listening on %d", self.address, self.port)
        return self

    async def close(self) -> None:
        """Stop serving; commit what is pending and close the database. Idempotent."""
        if self._announce_timer is not None:
            self._announce_timer.cancel()
            self._announce_timer = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._status is not None:
            await self._status.close()
        await self.node.close()
        if not self.store.closed:
            if self.out is not None:
                with contextlib.suppress(OSError):
                    self.out.checkpoint()
            self._commit()
            await self.store.aclose()
            if self.out is not None:
                self.out.close()

    # what it is doing: workers heard, results/s, /metrics, /healthz
    def _heard(self, address: str, name: str, args: Any) -> None:
        if name in ("requestWork", "shareResults", "shareResultsBatch"):
            self._workers[address] = time.monotonic()
            self._workers.move_to_end(address)
            if len(self._workers) > 1024:  # bounded, whoever calls
                self._workers.popitem(last=False)

    def workers_seen(self, within: float = 60.0) -> int:
        """Workers heard from in the last ``within`` seconds (idle ones ask every 30 s)."""
        horizon = time.monotonic() - within
        while self._workers and next(iter(self._workers.values())) < horizon:
            self._workers.popitem(last=False)
        return len(self._workers)

    async def _sample_rate(self) -> None:
        while True:
            self._answered_at.append((time.monotonic(), self.store.answered))
            await asyncio.sleep(1.0)

    def results_per_second(self) -> float:
        """Results over the last minute (or since the start), per second."""
        if len(self._answered_at) < 2:
            return 0.0
        (since, then), (now, answered) = self._answered_at[0], self._answered_at[-1]
        return (answered - then) / (now - since)

    def health(self) -> tuple[bool, dict]:
        """(healthy, body) for /healthz: the loop answers and the database takes writes."""
        body = {"waiting": self.store.waiting, "leased": self.store.leased,
                "workers": self.workers_seen(), "uptime": round(time.monotonic() - self._started, 1)}
        if self.failure is not None:
            return False, {"status": "unavailable", "reason": "cannot write: %s" % self.failure, **body}
        return True, {"status": "ok", **body}

    def metrics_text(self) -> str:
        """This master's figures in the Prometheus text format."""
        out, store = Exposition("qx_master_"), self.store
        out.add("jobs_waiting", "gauge", "Jobs queued for a worker.", store.waiting)
        out.add("jobs_leased", "gauge", "Jobs out with a worker.", store.leased)
        out.add("results_total", "counter", "Results kept (one per job).", store.answered)
        out.add("error_results_total", "counter", "Results that are a task's error.", store.errors)
        out.add("results_per_second", "gauge", "Results per second over the last minute.",
                round(self.results_per_second(), 3))
        out.add("workers", "gauge", "Workers heard from in the last minute.", self.workers_seen())
        out.add("workers_proven", "gauge", "Workers that proved the key.", len(self.policy.proven))
        out.add("jobs_held_unproven", "gauge", "Jobs on lease to peers without proof.", self.policy.held)
        for key, name in (("jobs handed out", "jobs_handed_out_total"), ("jobs requeued", "jobs_requeued_total"),
                          ("jobs taken over", "jobs_taken_over_total"), ("results refused", "results_refused_total"),
                          ("requests refused", "requests_refused_total"),
                          ("failed worker proofs", "failed_worker_proofs_total"),
                          ("duplicate results", "duplicate_results_total"),
                          ("undecryptable results", "undecryptable_results_total"),
                          ("on_results failures", "on_results_failures_total")):
            out.add(name, "counter", key.capitalize() + ".", self.stats[key])
        out.add("peers", "gauge", "Wires that speak bugout.", self.node.connections())
        out.add("resident_memory_bytes", "gauge", "This process's resident memory.", process_rss_bytes())
        out.add("uptime_seconds", "gauge", "Seconds since the master started.",
                round(time.monotonic() - self._started, 3))
        return out.text()

    def push_new_job(self, payload: Any) -> bool:
        """Queue a job (a dict is JSON-encoded first, as the JS master does); False if skipped.

        It is committed with the others pushed in the same loop iteration. A job
        whose id waits, is on lease or has its result already is not queued again.
        """
        text = payload if isinstance(payload, str) else storable_json(payload)
        job_id = payload.get("id") if isinstance(payload, dict) else None
        was_empty = not self.store.waiting
        if not self.store.push(_job_key(job_id), _JSON(self.crypt.encrypt(text))):
            self.stats["jobs skipped"] += 1
            log.debug("job %s is queued, out or answered already: skipped", job_id)
            return False
        self._commit_soon()
        if was_empty:
            self._announce_jobs()
        return True

    def set_meta(self, **values: Any) -> None:
        """Note facts of the run (numbers, strings) in the next commit, with the jobs pushed so far."""
        self.store.set(**values)
        self._commit_soon()

    # committing
    def _commit_soon(self) -> None:
        """Commit at the next loop iteration: all pushes of this one in one transaction."""
        if self._commit_handle is None:
            with contextlib.suppress(RuntimeError):  # no loop yet: start() commits
                self._commit_handle = asyncio.get_running_loop().call_soon(self._commit)

    def _commit(self, new: list[Taken] | None = None) -> bool:
        """Commit the open transaction (a crash cannot undo it now; ``store.synced()`` makes it
        survive a power cut); the ``new`` results go to ``out``. False, rolled back, if the
        disk refused: no answer may go out for them then."""
        if self._commit_handle is not None:
            self._commit_handle.cancel()
            self._commit_handle = None
        new = new or []
        try:
            self._before_commit(new)
            self.store.commit()
        except (OSError, sqlite3.Error) as exc:
            self._disk_failed("commit to", exc)
            with contextlib.suppress(sqlite3.Error):
                self.store.rollback()
            self._recount()
            return False
        self._committed(new)
        if self.store.wal_size() > WAL_LIMIT:
            with contextlib.suppress(RuntimeError):  # no loop: at close
                self.store.checkpoint_soon()
        return True

    def _disk_failed(self, what: str, exc: Exception) -> None:
        log.error("cannot %s %s: %s", what, self.store.path, exc)
        self.failure = self.failure or exc
        self.stats["commits failed"] += 1

    def _before_commit(self, new: list[Taken]) -> None:
        if self.out is not None:
            self.out.checkpoint(CHECKPOINT_EVERY)

    def _committed(self, new: list[Taken]) -> None:
        """Right after the commit: ``out`` gets the new results (the command line prints here)."""
        self.stats["results"] += len(new)
        if self.out is not None and new:
            try:
                self.out.append([(seq, text) for seq, text, _ in new])
            except OSError as exc:  # the results are kept: a restart writes them
                log.error("cannot write %s: %s", self.out.path, exc)
                self.failure = self.failure or exc
                self.out.close()
                self.out = None

    def _hand_on(self, new: list[Taken]) -> None:
        """Each new result to on_results, once it survives a power cut: at most once."""
        for _, _, result in new:
            self._deliver(result)

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
        if self.store.waiting:
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
        the key (worker.py, "Worker: trusting a master"), ``workerChallenge``
        is ours, which it answers with ``proveKey`` ("Who gets work"), and
        ``workerErrors`` says it may tell us why it cannot run the task, and
        ``run`` names the run its jobs belong to (PROTOCOL.md, "run").
        """
        args = as_dict(args)
        answer = {**args, "isMaster": "yes", "resultAcks": True, "resultBatches": True, "keyProof": 1}
        challenge = args.get("challenge")
        if isinstance(challenge, str) and re.fullmatch(r"[0-9a-f]{64}", challenge):
            answer["proof"] = master_proof(self._proof_key, bytes.fromhex(challenge), self.address, address)
            answer["workerChallenge"] = self.proofs.challenge(address, os.urandom(32), time.monotonic())
            answer["workerErrors"] = True  # only a Python worker challenges: no JS peer sees it
            answer["run"] = self.store.run_id  # the run its jobs belong to (worker.py, class Outbox)
        return answer

    def _prove_key(self, address: str, args: Any) -> dict:
        """``proveKey {"proof"}``: a worker's answer to our challenge. The same answer whatever it is."""
        verdict = self.proofs.check(address, as_dict(args).get("proof"), time.monotonic())
        if verdict and self.policy.prove(address):
            log.info("worker %s proved the key", address)
            self.node.prioritize(*self.policy.proven)  # handled before any flood (SlowLane)
        elif verdict is False:
            self.stats["failed worker proofs"] += 1
            self._log(logging.ERROR, "worker-error", "%s holds a different transferEncryptToken: it cannot "
                      "prove the key; fix its .env (or it is not one of your workers)", address,
                      extra={"qx_event": {"event": "worker-error", "worker": address, "kind": "key"}})
        return {"received": True}

    def _worker_error(self, address: str, args: Any) -> dict:
        """``workerError``: why a worker cannot run the task (a SyntaxError, a dependency pip cannot
        install, ...), as one ``worker-error`` event per worker and change (of the files served or
        of the reason). Taken only from a worker that proved the key, at most MAX_WORKER_ERROR
        bytes, and printed WORKER_ERROR_BURST at once, then one per WORKER_ERROR_GAP seconds.
        The same answer whatever came."""
        report = None
        if address in self.policy.proven and isinstance(args, str) and len(args) <= MAX_WORKER_ERROR:
            with contextlib.suppress(WorkerError):
                report = as_dict(self.crypt.decrypt_json(args))
        error, name = (report or {}).get("error"), (report or {}).get("name")
        if not isinstance(error, str) or not error:
            self.stats["worker errors refused"] += 1
            return {"received": True}
        error, name = _one_line(error, 1000), _one_line(name, 64) if isinstance(name, str) else None
        files = self._encrypted_files[0][1] if self._encrypted_files else ""
        held = self.reports.news(address, files, error, time.monotonic())
        if held is not None:
            event = {"event": "worker-error", "worker": address, "name": name, "kind": "task",
                     **({"more": held} if held else {})}
            log.error("worker %s (%s) cannot run the task: %s%s", address, name, error,
                      " (and %d more such reports, not shown)" % held if held else "", extra={"qx_event": event})
        return {"received": True}

    async def _serve_exec_assets(self, address: str, args: Any) -> Any:
        """``requestExecAssets``: hashing and encrypting happen in a thread, off the loop. A file
        that cannot be read (gone since the start) gets no answer: workers keep what they have."""
        try:
            await asyncio.to_thread(self._assets)
            return self._request_exec_assets(address, args)  # the files' state is cached now
        except OSError as exc:
            self._log(logging.ERROR, "task files", "cannot read the task file %s: %s; workers get no task "
                      "files until it is back", exc.filename, exc.strerror or exc)
            return NO_ANSWER

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

    def _request_work(self, address: str, args: Any) -> Any:
        """JS rule: a batch while more than one job waits and getBatch is truthy; as many
        jobs as LeasePolicy grants, up to that.

        Results riding along are taken first; they and the new leases are committed
        together before the answer."""
        args = as_dict(args)
        asked = work_asked(args)
        other_run = self._other_run(address, args.get("resultsRun"))
        results = self._open_results(address, args["results"]) if "results" in args and not other_run else []

        def work() -> tuple[dict, list[Taken]]:
            new = self._take(address, results or [])
            if isinstance(asked, str):  # a bad batchSize: no job, whatever came with it
                self.stats["requests refused"] += 1
                answer = {"error": asked}
            else:
                answer = self._work(address, args, asked)
            if other_run:  # the worker keeps them
                answer.update(resultsTaken=False, run=self.store.run_id)
            return answer, new
        return self._answer_once_kept(address, work)

    def _work(self, address: str, args: dict, batch: int | None) -> dict:
        answer = {k: v for k, v in args.items() if k not in ("results", "resultsRun")}
        if address in self.policy.proven:  # a Python worker: JS peers see nothing new
            answer["run"] = self.store.run_id  # the run these jobs belong to
        size = self.store.waiting
        if size > 1 and batch is not None:
            tasks = self._lease(address, min(batch, MAX_BATCH) if size > batch else 1)
            answer["batchTasks" if tasks else "task"] = tasks or None  # none: JS workers poll again later
        else:
            answer["task"] = next(iter(self._lease(address, 1)), None)
        return answer

    def _lease(self, address: str, count: int) -> list[str]:
        """Up to ``count`` waiting jobs (encrypted), on lease to ``address``, as LeasePolicy allows."""
        now, store = time.monotonic(), self.store
        count = self.policy.grant(address, count, store.waiting + store.leased)
        deadline = time.time() + self.lease_seconds
        rows = store.lease(address, count, deadline)
        if len(rows) < count and address in self.policy.proven:  # nothing waits: see "Who gets work"
            taken = take_over(store, self.policy, address, count - len(rows), deadline)
            self.stats["jobs taken over"] += len(taken)
            rows += taken
        loose = sum(key is None for key, _ in rows)
        self.policy.leased(address, len(rows) - loose, loose, now + self.lease_seconds, now)
        self.stats["jobs handed out"] += len(rows)
        return [payload for _, payload in rows]

    def _share_results(self, address: str, args: Any) -> Any:
        """One result, as JS workers send it (JS masters never answer; we ack once it is committed)."""
        try:
            result = self.crypt.decrypt_json(args)
        except WorkerError as exc:
            return self._undecryptable(address, exc)
        return self._answer_once_kept(address, lambda: ({"received": True}, self._take(address, [result])))

    def _share_results_batch(self, address: str, args: Any) -> Any:
        """Many results in one call, from Python workers (fewer signatures): the encrypted list,
        or ``{"results": it, "run": the run of their jobs}``."""
        if isinstance(args, dict):
            if self._other_run(address, args.get("run")):
                return {"received": False, "run": self.store.run_id}  # the worker keeps them
            args = args.get("results")
        results = self._open_results(address, args)
        if results is None:
            return {"received": True}  # the same answer: no padding oracle (see _undecryptable)
        return self._answer_once_kept(address, lambda: ({"received": True}, self._take(address, results)))

    def _open_results(self, address: str, args: Any) -> list | None:
        """A list of results, decrypted; None if it does not decrypt."""
        try:
            results = self.crypt.decrypt_json(args)
        except WorkerError as exc:
            self._undecryptable(address, exc)
            return None
        return results if isinstance(results, list) else []

    def _other_run(self, address: str, run: Any) -> bool:
        """Results a worker sends for the jobs of ``run``: True if that is not this run (its job ids
        may name other jobs here), and they are refused. Before anything is decrypted."""
        if run is None or run == self.store.run_id:
            return False
        self.stats["results of another run refused"] += 1
        self._log(logging.INFO, "other run", "%s offered results of jobs of another run: not taken here "
                  "(it keeps them)", address)
        return True

    def _undecryptable(self, address: str, exc: Exception) -> dict:
        """Results that do not decrypt are dropped, and answered as any others.

        AES-CBC has no MAC: an answer that told whether a ciphertext decrypted
        would be a padding oracle for any peer that knows the token. A worker
        that holds the key never sends such results (it delivers only to a
        master that proved the same key), so nothing of a worker's is lost.
        One log line a minute at most, whatever a peer sends.
        """
        self.stats["undecryptable results"] += 1
        self._log(logging.ERROR, "undecryptable", "results from %s do not decrypt (%s): dropped (%d so far); "
                  "a peer without the key, or a worker with another transferEncryptToken", address, exc,
                  self.stats["undecryptable results"])
        return {"received": True}

    def _answer_once_kept(self, address: str, work: Callable[[], tuple[Any, list[Taken]]]) -> Any:
        """An RPC's answer, once its writes (``work``: the answer and the new results) are
        committed, and synced if the database is a file. If anything fails they are undone
        and no answer goes out: the worker keeps the results it sent and sends them again."""
        try:
            with self.store.undoable():
                answer, new = work()
        except Exception:  # noqa: BLE001 - a bug or the disk: never an answer that makes a worker forget
            self._log(logging.ERROR, "undone", "call from %s undone, not answered", address, exc_info=True)
            self._recount()
            return NO_ANSWER
        if not self._commit(new):
            return NO_ANSWER
        if self.store.durable:
            return self._answer_synced(answer, new)  # the sync runs in a thread meanwhile
        self._hand_on(new)
        return answer

    async def _answer_synced(self, answer: Any, new: list[Taken]) -> Any:
        try:
            await self.store.synced()
        except OSError as exc:  # kept, maybe not on disk: no answer, the worker sends them again
            self._disk_failed("sync", exc)
            answer = NO_ANSWER
        self._hand_on(new)  # kept either way: sent again, they would be duplicates
        return answer

    def _take(self, address: str, results: list) -> list[Taken]:
        """Record each result that ``address`` may give (LeasePolicy) and whose job has none
        yet in this run; the new ones."""
        fields = [_result_fields(result) for result in results]
        holders = self.store.holders([key for key, *_ in fields if key is not None])
        accepted = self.policy.accepted(address, [(key, holders.get(key), shaped)
                                                  for key, _, _, shaped in fields])
        mine = [(result, key, name, error) for result, (key, name, error, _), ok
                in zip(results, fields, accepted) if ok]
        self.stats["results refused"] += len(results) - len(mine)
        if not mine:  # no write, so no commit to wait for
            return []
        texts = [storable_json(result) if self._texts else None for result, *_ in mine]
        places = self.store.record([(key, address, name, error, text)
                                    for (_, key, name, error), text in zip(mine, texts)])
        self.stats["duplicate results"] += places.count(None)
        kept = [(seq, text, item) for seq, text, item in zip(places, texts, mine) if seq is not None]
        self.policy.taken(address, [holders.get(key) for _, _, (_, key, _, _) in kept],
                          [key is not None for _, _, (_, key, _, _) in kept])
        return [(seq, text, result) for seq, text, (result, *_) in kept]

    def _deliver(self, result: Any) -> None:
        """on_results; its failure is logged and does not lose the other results of a batch."""
        try:
            self.on_results(result)
        except Exception:  # noqa: BLE001 - a peer's result may do it each time: one line a minute
            self.stats["on_results failures"] += 1
            self._log(logging.ERROR, "on_results", "on_results failed", exc_info=True)

    # leases
    def _requeue_worker(self, address: str) -> None:
        """A worker left: its jobs go back to the front of the queue."""
        if self.store.closed:  # wires closing after close()
            return
        gone = self._requeued(self.store.requeue(worker=address))
        if gone:
            self._log(logging.INFO, "requeued", "%d job(s) of %s queued again", gone, address)

    async def _expire_leases(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.lease_seconds / 4))
            self.policy.expire(time.monotonic())
            try:
                self._requeued(self.store.requeue(before=time.time()))
                before = time.time() + self.lease_seconds - TAKE_OVER_SECONDS
                if not self.store.waiting and self.store.overdue(self.policy.holders(), before, 1):
                    self._announce_jobs()  # jobs to take over: idle workers ask
            except sqlite3.Error as exc:  # the disk: try again at the next round
                log.error("cannot end leases in %s: %s", self.store.path, exc)

    def _requeued(self, ended: collections.Counter) -> int:
        """Jobs whose lease ended wait again at the front of the queue: tell idle workers."""
        self._commit_soon()  # even none: the transaction is open
        for holder, count in ended.items():
            self.policy.ended(holder, count)
        count = ended.total()
        if count:
            self.stats["jobs requeued"] += count
            self._announce_jobs()
        return count

    def _recount(self) -> None:
        """After a rollback: the policy's counts of leases follow the database again."""
        with contextlib.suppress(sqlite3.Error):
            self.policy.restore(self.store.held())


# Command line ###############################################################

#: Seconds between two redraws of the progress line.
PROGRESS_EVERY = 0.5
#: Exit status when a signal ended master.py before every job had its result (README, "When it ends").
INTERRUPTED = 3
#: Skipped jobs lines reported one by one at first; then one a second (the summary counts them all).
LINE_REPORTS = 100


def _emit(data: bytes) -> None:
    """Write to stdout at once, unbuffered: a result line is out before anything else happens."""
    view = memoryview(data)
    while view:
        view = view[os.write(sys.stdout.fileno(), view):]


def _print_event(**event: Any) -> None:
    _emit((storable_json(event) + "\n").encode())


class _ConsoleMaster(Master):
    """Results as ``result`` events on stdout, one write per batch, right after the commit
    (before its sync): a kill cannot print a result twice, and loses a line only if it comes
    in the microseconds between the commit and the write (``--out`` has them all)."""

    _echo = b""
    _prints = True

    async def start(self) -> Master:
        log.addFilter(self._as_event)
        return await super().start()

    async def close(self) -> None:
        await super().close()
        log.removeFilter(self._as_event)

    @staticmethod
    def _as_event(record: logging.LogRecord) -> bool:
        """A log line that is an event for the user (``worker-error``) goes to stdout as that
        event, not to stderr."""
        event = getattr(record, "qx_event", None)
        if event is None:
            return True
        with contextlib.suppress(OSError):
            _print_event(**event, message=record.getMessage())
        return False

    def _before_commit(self, new: list[Taken]) -> None:
        super()._before_commit(new)
        self._echo = "".join('{"event":"result","result":%s}\n' % text for _, text, _ in new).encode()

    def _hand_on(self, new: list[Taken]) -> None:
        """Printed already (on_results is for a result that could not be opened)."""

    def _committed(self, new: list[Taken]) -> None:
        echo, self._echo = self._echo, b""
        if echo:
            try:
                _emit(echo)
            except OSError as exc:  # the reader went away: the results are in the database
                self.stats["results not printed"] += len(new)
                log.error("cannot print %d result(s): %s", len(new), exc)
        super()._committed(new)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return "%d:%02d:%02d" % (minutes // 60, minutes % 60, seconds)


class Progress:
    """One line on a terminal's stderr, redrawn in place: done/total, rate, ETA, workers."""

    def __init__(self, master: Master, stream: Any) -> None:
        self.master = master
        self.stream = stream
        #: True while the jobs file is read: the total may still grow
        self.reading = False
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=20)
        self._drawn = float("-inf")
        self._shown = False
        log.addFilter(self._before_log)

    def workers(self) -> int:
        """Workers heard from in the last minute (idle ones ask every 30 s)."""
        return self.master.workers_seen()

    def line(self) -> str:
        store = self.master.store
        done, total = store.answered, store.answered + store.waiting + store.leased
        now = time.monotonic()
        self._samples.append((now, done))
        since, then = self._samples[0]
        rate = (done - then) / (now - since) if now > since else 0.0
        eta = _clock((total - done) / rate) if rate > 0 else "-:--:--"
        errors = ", %d error(s)" % store.errors if store.errors else ""
        return "%d/%d%s jobs%s, %.0f jobs/s, ETA %s, %d worker(s)" % (
            done, total, "+" if self.reading else "", errors, rate, eta, self.workers())

    def draw(self, force: bool = False) -> None:
        """Redraw the line (at most every PROGRESS_EVERY seconds unless forced)."""
        if not force and time.monotonic() - self._drawn < PROGRESS_EVERY:
            return
        self._drawn = time.monotonic()
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns or 80  # 0: size unknown
        except (OSError, ValueError):
            width = 80
        self.stream.write("\r" + self.line()[:max(width - 1, 10)] + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """The last figures stay on screen."""
        self.draw(force=True)
        self.stream.write("\n")
        self.stream.flush()
        log.removeFilter(self._before_log)

    def _before_log(self, record: logging.LogRecord) -> bool:
        """A log line clears the progress line first (it is drawn again at the next tick)."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self._shown = False
        return True


class _LineReports:
    """``error`` events (and log lines) for skipped jobs lines: LINE_REPORTS at once, then one
    a second; the others are counted in the next one shown, and all in the summary."""

    def __init__(self) -> None:
        self._limit = RateLimit(1.0, LINE_REPORTS)
        self._held = 0

    def __call__(self, line: int, why: str) -> None:
        if not self._limit.allow("lines", time.monotonic()):
            self._held += 1
            return
        message = "jobs line %d skipped: %s" % (line, why)
        if self._held:
            message += " (and %d more skipped lines not shown: the summary counts them)" % self._held
            self._held = 0
        log.error("%s", message)
        _print_event(event="error", line=line, message=message)


def job_of_line(text: bytes) -> dict:
    """A jobs line as the job pushed, or ValueError saying why it is none.

    A job is a JSON object with an ``id``. Its ``data`` goes to the task as text: anything
    else (an object, a list, a number) becomes its JSON text, as JS masters' users write it
    (``JSON.stringify``), so ``json.loads(job["data"])`` reads it back."""
    job = json.loads(text)
    if not isinstance(job, dict) or job.get("id") is None:
        raise ValueError('a job is a JSON object with an "id", which its result names')
    if "data" in job and not isinstance(job["data"], str):
        job["data"] = storable_json(job["data"])
    return job


async def _feed_jobs(master: Master, handle: Any, line: int) -> None:
    """Push each JSON line of a file (or stdin) as a job; report a bad line or a job whose id
    is queued or answered already (a duplicate), and go on.

    How far the file was read goes into the same commit as the jobs of the chunk."""
    bad = int(master.store.get("bad_lines", 0))
    duplicates = int(master.store.get("duplicate_lines", 0))
    report = _LineReports()
    async for lines, offset in _chunks(handle):
        for text in lines:
            line += 1
            if not text.strip():
                continue
            try:
                job = job_of_line(text)
            except ValueError as exc:  # not JSON, not UTF-8, or no id: say so, read on
                bad += 1
                report(line, str(exc))
                continue
            if not master.push_new_job(job):
                duplicates += 1
                report(line, "id %s is queued, out or answered already in this run (a duplicate)"
                       % _one_line(storable_json(job["id"]), 64))
        master.set_meta(offset=offset, line=line, bad_lines=bad, duplicate_lines=duplicates)
        await asyncio.sleep(0)  # commit, and serve workers, between chunks


async def _chunks(handle: Any) -> AsyncIterator[tuple[list[bytes], int]]:
    """A file's lines, a chunk at a time, each with the offset after its last line.

    A daemon thread reads the descriptor: a signal ends the process even while
    the writer of a pipe keeps it open (a buffered read would hold the file's
    lock at exit). At most four chunks wait in memory."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[tuple[list[bytes], int] | None] = asyncio.Queue(4)
    fd = handle.fileno()
    try:
        start = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:  # a pipe
        start = 0

    def put(item: tuple[list[bytes], int] | None) -> None:
        asyncio.run_coroutine_threadsafe(chunks.put(item), loop).result()

    def read() -> None:
        position, pending = start, []
        # the loop or the file closed first
        with contextlib.suppress(RuntimeError, OSError, concurrent.futures.CancelledError):
            while chunk := os.read(fd, 1 << 15):
                position += len(chunk)
                head, newline, tail = chunk.rpartition(b"\n")
                if not newline:
                    pending.append(chunk)
                    continue
                lines = (b"".join(pending) + head).split(b"\n")
                pending = [tail] if tail else []
                put((lines, position - len(tail)))
            put(([b"".join(pending)] if pending else [], position))
            put(None)

    threading.Thread(target=read, name="jobs", daemon=True).start()
    while (item := await chunks.get()) is not None:
        yield item


def _worker_path(path: str) -> str:
    """Where a served file lands on workers: its relative path, else workplace/NAME."""
    relative = Path(path)
    if relative.is_absolute() or ".." in relative.parts:
        return "/workplace/" + relative.name
    return "/" + relative.as_posix()


def _open_run(store: Store, source: str | None, handle: Any) -> int:
    """Continue the database's unfinished run of ``source``, or begin a new one.

    Positions ``handle`` where the last committed read ended; the number of
    lines read so far. A run of another source still unfinished is refused.
    """
    if source is None:
        return 0
    old, pending = store.get("source"), store.waiting + store.leased
    if old is not None and not store.get("finished"):
        if old != source:
            raise WorkerError(
                f"{store.path} holds an unfinished run of {old} ({store.answered} answered, {pending} "
                f"to go): finish it with --jobs {old}, or pass another --db")
        offset = int(store.get("offset", 0))
        if source != "-":
            if os.fstat(handle.fileno()).st_size < offset:
                raise WorkerError(f"{source} is shorter than the {offset} bytes of it already read: "
                                  "it changed since its run began; pass another --db to start over")
            os.lseek(handle.fileno(), offset, os.SEEK_SET)
        log.info("run of %s continued: %d answered, %d to go, read from byte %d",
                 source, store.answered, pending, offset)
        return int(store.get("line", 0))
    if pending:
        raise WorkerError(f"{store.path} holds {pending} job(s) not read from a --jobs file: "
                          "serve them without --jobs, or pass another --db")
    if store.answered:
        store.new_run()
    store.set(source=source, offset=0, line=0, bad_lines=0, duplicate_lines=0, finished=0, started=time.time())
    return 0


def _summary(master: Master, began: float) -> dict:
    store = master.store
    seconds = max(time.time() - float(store.get("started") or began), 1e-9)
    duplicates = int(store.get("duplicate_lines", 0))
    return {"event": "summary", "jobs": store.answered, "errors": store.errors,
            "pending": store.waiting + store.leased,
            "skipped_lines": int(store.get("bad_lines", 0)) + duplicates, "duplicate_lines": duplicates,
            "seconds": round(seconds, 3), "jobs_per_s": round(store.answered / seconds, 1),
            "workers": store.per_worker()}


async def _serve(master: Master, stop: asyncio.Event, feeder: asyncio.Task | None, follow: bool,
                 progress: Progress | None) -> bool:
    """Serve until a signal or a failure, or (unless ``follow``) until every job has its
    result; True in that last case."""
    while not stop.is_set() and master.failure is None:
        read = feeder is None or feeder.done()
        if read and feeder is not None and (feeder.cancelled() or feeder.exception()):
            return False
        if progress is not None:
            progress.reading = not read
            progress.draw()
        if not follow and read and not master.store.waiting and not master.store.leased:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)
    return False


def task_files(paths: list[str]) -> list[dict]:
    """The ``--task`` files as master.py serves them; WorkerError, saying what to do, for files
    no worker could run: none given, none named task.py or task.js (what workers run), one
    that is missing, no regular file or unreadable, two that land on the same path."""
    if not paths:
        raise WorkerError("no --task given: name the task workers run, --task task.py (or task.js), and "
                          "each file it reads (README, \"Writing a task\")")
    files: dict[str, dict] = {}
    for path in paths:
        if not os.path.isfile(path):  # stat follows links: a folder, a pipe, a device, nothing
            why = "not a regular file" if os.path.exists(path) else "no such file"
            raise WorkerError(f"--task {path}: {why}")
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise WorkerError(f"--task {path}: cannot read it ({exc.strerror or exc})") from None
        where = _worker_path(path)
        if where in files:
            raise WorkerError(f"--task {files[where]['given']} and --task {path} would both be {where} on "
                              "workers: give one of them another name or folder")
        files[where] = {"masterPath": str(Path(path).resolve()), "name": Path(path).name, "workerPath": where,
                        "given": path}
    names = [f["name"] for f in files.values()]
    if len(files) > MAX_ASSET_FILES:
        raise WorkerError(f"{len(files)} --task files: workers take at most {MAX_ASSET_FILES}")
    if "task.py" not in names and "task.js" not in names:
        raise WorkerError("no --task file is named task.py or task.js, the file workers run: "
                          "name the task so (README, \"Writing a task\")")
    for name in ("task.py", "task.js"):
        if names.count(name) > 1:
            raise WorkerError(f"{names.count(name)} --task files are named {name}: workers run one; "
                              "serve only one")
    return [{k: v for k, v in f.items() if k != "given"} for f in files.values()]


def refuse_worker_folder(files: list[dict]) -> None:
    """WorkerError when a worker.py uses a folder the ``files`` are served from: it writes a
    master's files into its folder, so it would write over them, and delete them when they fail
    to load (worker.py refuses the other way round)."""
    for f in files:
        served, relative = Path(f["masterPath"]), f["workerPath"].lstrip("/")
        depth = len(Path(relative).parts)
        below = served.parents[depth - 1] if depth <= len(served.parents) else Path.cwd()
        for folder in (Path.cwd(), below):  # where a worker would write it there
            if (folder / relative).resolve() == served and (folder / JOURNAL_NAME).exists():
                raise WorkerError(
                    f"a worker.py keeps its journal ({JOURNAL_NAME}) in {folder}, where the --task files are: it "
                    "would write over them, and delete them when the task fails to load; run master.py from "
                    "another folder, or the worker in a folder of its own with a copy of .env (README, \"Use "
                    f"it\"), or remove {JOURNAL_NAME}* if no worker uses {folder} any more")


def master_seed(env_path: str, env: dict[str, str]) -> str:
    """master.py's seed (its address: workers may pin it, master= in their .env): ``masterSeed``.

    An older master.py wrote it as ``seed``, which a worker reading the same .env takes too
    (the two never meet): such a line is renamed ``masterSeed``, with the same value, so the
    address stays. Without either, a new one is written."""
    if env.get("masterSeed"):
        return env["masterSeed"]
    if "seed" in read_env_file(env_path) and env.get("seed"):
        _rename_seed(env_path)
        log.warning("master.py: seed= in %s is master.py's own: renamed masterSeed= (the same address), so that "
                    "a worker reading this .env takes an address of its own", env_path)
        return env["seed"]
    if env.get("seed"):  # from the environment alone
        return env["seed"]
    seed = make_seed()
    write_env_file(env_path, {"masterSeed": seed})
    log.warning("master.py: a new masterSeed was written into %s: this master keeps its address", env_path)
    return seed


def _rename_seed(env_path: str) -> None:
    """``seed=`` becomes ``masterSeed=``; the other lines stay; mode 0600, as write_env_file's."""
    text = Path(env_path).read_text(encoding="utf-8")
    text = re.sub(r"^(\s*(?:export\s+)?)seed(\s*=)", r"\1masterSeed\2", text, count=1, flags=re.MULTILINE)
    fd = os.open(env_path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(env_path, 0o600)


async def run_master(args: argparse.Namespace, jobs: Any = None) -> int:
    """Serve ``args.task`` files and the jobs read from ``jobs`` (a binary file); the exit status."""
    began = time.time()
    limit_loop_errors()
    files = task_files(args.task)
    refuse_worker_folder(files)
    env = load_env(args.env)
    env["masterSeed"] = master_seed(args.env, env)
    deps = [d for d in args.deps.split(",") if d.strip()]
    master = _ConsoleMaster(env=env, exec_assets={"files": files, "dependencies": deps},
                            on_results=lambda result: _print_event(event="result", result=result),
                            folder="/", lease_seconds=args.lease, out=args.out,
                            db=args.db or Path(args.env).resolve().parent / "master.db",
                            status_port=args.status_port, status_host=args.status_host)
    follow = args.follow if args.follow is not None else jobs is None or args.jobs == "-"
    feeder = progress = None
    try:
        source = None if jobs is None else "-" if args.jobs == "-" else str(Path(args.jobs).resolve())
        line = _open_run(master.store, source, jobs)
        await master.start()
        _print_event(event="ready", address=master.address, port=master.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if jobs is not None:
            feeder = asyncio.ensure_future(_feed_jobs(master, jobs, line))
            feeder.add_done_callback(_feeder_done)
        progress = Progress(master, sys.stderr) if sys.stderr.isatty() else None
        finished = await _serve(master, stop, feeder, follow, progress)
        unread = feeder is not None and not feeder.done() and source != "-"  # lines of the file left
        if feeder is not None:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        if finished and source is not None:
            master.set_meta(finished=1)
        master._commit()
        if progress is not None:
            progress.close()
        if master.failure is not None:
            raise WorkerError(f"stopped: cannot write to {master.store.path} or --out: {master.failure}")
        _print_event(**_summary(master, began))
        if feeder is not None and not feeder.cancelled() and feeder.exception() is not None:
            return 2
        if stop.is_set() and (unread or master.store.waiting or master.store.leased):
            return INTERRUPTED  # the run is kept: the same command continues it
        return 1 if master.store.errors and not args.errors_ok else 0
    finally:
        await master.close()


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
    parser.add_argument("--db", metavar="FILE", help="the queue's SQLite file, kept across restarts "
                        "(default: master.db beside the --env file)")
    parser.add_argument("--out", metavar="FILE", help="append each result to this JSON-lines file, "
                        "exactly once across crashes and restarts")
    parser.add_argument("--follow", action=argparse.BooleanOptionalAction,
                        help="keep serving once every job has its result (default for --jobs - "
                        "and without --jobs); --no-follow ends with a summary")
    parser.add_argument("--status-port", type=int, metavar="PORT",
                        help="serve /metrics and /healthz on this port (default: off)")
    parser.add_argument("--status-host", default="127.0.0.1", metavar="HOST",
                        help="address of the status page (default 127.0.0.1)")
    parser.add_argument("--errors-ok", action="store_true",
                        help="exit 0 even when some jobs came back as error results")
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
