"""The job store: jobs that outlive their request and the server, in one SQLite database (WAL) under
TXT2IMG_HOME, with each job's images as files beside it.

Every worker of a server opens the same database. A job is claimed with one ``UPDATE ... WHERE
status = 'queued' RETURNING``, so two workers never run the same job. A job's seeds are fixed when it
is submitted and stored with it, so a job that runs again after a crash gives the same images.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.paths import txt2img_home

# A running job's worker writes its heartbeat several times a second; after this long without one the
# worker is taken for gone even where its process id is alive (a new process that got the same id
# after a container restart), and the job runs again.
SILENT_AFTER_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    seeds TEXT NOT NULL,
    webhook TEXT,
    idempotency_key TEXT UNIQUE,
    body_hash TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    steps_done INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    claimed_by INTEGER,
    heartbeat REAL,
    image_count INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'generate'
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created);
"""


def jobs_folder() -> Path:
    """Where the database and the images live: TXT2IMG_HOME/jobs."""
    return txt2img_home() / "jobs"


@dataclass
class StoredJob:
    """One row of the store."""

    id: str
    status: str
    request: dict[str, Any]
    seeds: list[int]
    webhook: str | None
    idempotency_key: str | None
    body_hash: str | None
    created: float
    started: float | None
    finished: float | None
    steps_done: int
    total_steps: int
    error: str | None
    cancel_requested: bool
    claimed_by: int | None
    heartbeat: float | None
    image_count: int
    bytes: int
    kind: str = "generate"  # or "train": a fine-tune (serving/train_runner.py)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StoredJob:
        fields = dict(row)
        fields["request"] = json.loads(fields["request"])
        fields["seeds"] = json.loads(fields["seeds"])
        fields["cancel_requested"] = bool(fields["cancel_requested"])
        return cls(**fields)

    @property
    def image_format(self) -> str:
        return self.request.get("format", "png")


class JobStore:
    """The jobs of every worker of a server; each method opens its own short connection, so any thread may call it."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or jobs_folder()
        self.images = self.folder / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "jobs.sqlite"
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")  # readers never wait for the one writer
            connection.executescript(SCHEMA)
            columns = {row["name"] for row in connection.execute("PRAGMA table_info(jobs)")}
            if "kind" not in columns:  # a store written before training jobs
                connection.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'generate'")

    def _open(self) -> sqlite3.Connection:
        """A connection in autocommit mode: each statement is its own transaction unless one is begun."""
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        connection.row_factory = sqlite3.Row
        # With WAL, NORMAL syncs at checkpoints only: a killed process loses nothing, a power cut at
        # most the last commits (a job then runs again), and a commit costs no fsync.
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = self._open()
        try:
            yield connection
        finally:
            connection.close()

    def _one(self, sql: str, parameters: tuple = ()) -> StoredJob | None:
        with self._connect() as connection:
            row = connection.execute(sql, parameters).fetchone()
        return None if row is None else StoredJob.from_row(row)

    def add(
        self,
        request: dict[str, Any],
        seeds: list[int],
        total_steps: int,
        webhook: str | None = None,
        idempotency_key: str | None = None,
        body_hash: str | None = None,
        kind: str = "generate",
        job_id: str | None = None,
    ) -> tuple[StoredJob, bool]:
        """Store a queued job (under ``job_id``, or a new one); with an idempotency key already stored, that
        job instead. True when added."""
        connection = self._open()
        try:
            connection.execute("BEGIN IMMEDIATE")
            if idempotency_key is not None:
                row = connection.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    connection.execute("COMMIT")
                    return StoredJob.from_row(row), False
            row = connection.execute(
                "INSERT INTO jobs (id, status, request, seeds, webhook, idempotency_key, body_hash, created,"
                " total_steps, kind) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (
                    job_id or str(uuid.uuid4()),
                    json.dumps(request),
                    json.dumps(seeds),
                    webhook,
                    idempotency_key,
                    body_hash,
                    time.time(),
                    total_steps,
                    kind,
                ),
            ).fetchone()
            connection.execute("COMMIT")
            return StoredJob.from_row(row), True
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        finally:
            connection.close()

    def get(self, job_id: str) -> StoredJob | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def page(self, limit: int, offset: int) -> list[StoredJob]:
        """Jobs newest first."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT * FROM jobs ORDER BY created DESC, id LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [StoredJob.from_row(row) for row in rows]

    def count(self) -> int:
        with self._connect() as connection:
            return connection.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    def queue_position(self, job: StoredJob) -> int:
        """Queued jobs of its kind ahead of ``job`` (0: it runs next)."""
        with self._connect() as connection:
            return connection.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND kind = ? AND created < ?",
                (job.kind, job.created),
            ).fetchone()[0]

    def claim(self, worker_pid: int, kind: str = "generate", at_most_running: int | None = None) -> StoredJob | None:
        """The oldest queued job of ``kind``, now running for ``worker_pid``; None when none is queued, or
        when ``at_most_running`` jobs of that kind run already (on any worker)."""
        limit = (
            ""
            if at_most_running is None
            else " AND (SELECT COUNT(*) FROM jobs WHERE status = 'running' AND kind = ?) < ?"
        )
        return self._one(
            "UPDATE jobs SET status = 'running', started = ?, heartbeat = ?, claimed_by = ?, steps_done = 0"
            " WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND kind = ? ORDER BY created LIMIT 1)"
            f" AND status = 'queued'{limit} RETURNING *",
            (time.time(), time.time(), worker_pid, kind, *(() if at_most_running is None else (kind, at_most_running))),
        )

    def requeue_canceled(self, job_id: str) -> StoredJob | None:
        """Queue a canceled training job again, to continue from its checkpoint; None unless it is one."""
        return self._one(
            "UPDATE jobs SET status = 'queued', cancel_requested = 0, finished = NULL, error = NULL"
            " WHERE id = ? AND kind = 'train' AND status = 'canceled' RETURNING *",
            (job_id,),
        )

    def unfinished_training_named(self, name: str) -> StoredJob | None:
        """The queued, running or canceled (resumable) training job that will create model ``name``, if any."""
        return self._one(
            "SELECT * FROM jobs WHERE kind = 'train' AND status IN ('queued', 'running', 'canceled')"
            " AND json_extract(request, '$.name') = ?",
            (name,),
        )

    def release(self, job_id: str) -> None:
        """Put a running job back in the queue (the worker could not take it now)."""
        with self._connect() as connection:
            connection.execute(
                "UPDATE jobs SET status = 'queued', claimed_by = NULL, started = NULL"
                " WHERE id = ? AND status = 'running'",
                (job_id,),
            )

    def requeue_orphans(self, silent_after_s: float = SILENT_AFTER_S) -> list[str]:
        """Queue again every running job whose worker is gone (its process killed or crashed, or silent
        for ``silent_after_s``), so that it runs again."""
        with self._connect() as connection:
            rows = connection.execute("SELECT id, claimed_by, heartbeat FROM jobs WHERE status = 'running'").fetchall()
        silent_since = time.time() - silent_after_s
        orphans = [
            row["id"] for row in rows if not _process_alive(row["claimed_by"]) or (row["heartbeat"] or 0) < silent_since
        ]
        for job_id in orphans:
            self.release(job_id)
        return orphans

    def progress(self, steps_done: dict[str, int]) -> set[str]:
        """Record the steps done of running jobs (their heartbeat) in one transaction; the ids among them
        whose cancel was asked for."""
        now = time.time()
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(
                "UPDATE jobs SET steps_done = ?, heartbeat = ? WHERE id = ?",
                [(steps, now, job_id) for job_id, steps in steps_done.items()],
            )
            connection.execute("COMMIT")
            placeholders = ",".join("?" * len(steps_done))
            rows = connection.execute(
                f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({placeholders})", tuple(steps_done)
            ).fetchall()
        return {row["id"] for row in rows}

    def image_path(self, job: StoredJob, index: int) -> Path:
        return self.images / job.id / f"{index}.{job.image_format}"

    def succeed(self, job: StoredJob, encoded_images: list[bytes]) -> StoredJob | None:
        """Write the images, then mark the job succeeded (files first: a crash between leaves it to run again)."""
        folder = self.images / job.id
        folder.mkdir(parents=True, exist_ok=True)
        for index, data in enumerate(encoded_images):
            partial = folder / f".{index}.partial"
            partial.write_bytes(data)
            partial.replace(self.image_path(job, index))
        total = sum(len(data) for data in encoded_images)
        return self._finish(job.id, "succeeded", None, len(encoded_images), total)

    def fail(self, job_id: str, error: str) -> StoredJob | None:
        return self._finish(job_id, "failed", error, 0, 0)

    def mark_canceled(self, job_id: str) -> StoredJob | None:
        return self._finish(job_id, "canceled", None, 0, 0)

    def _finish(self, job_id: str, status: str, error: str | None, images: int, size: int) -> StoredJob | None:
        return self._one(
            "UPDATE jobs SET status = ?, error = ?, image_count = ?, bytes = ?, finished = ?"
            " WHERE id = ? AND status = 'running' RETURNING *",
            (status, error, images, size, time.time(), job_id),
        )

    def cancel(self, job_id: str) -> tuple[StoredJob | None, bool]:
        """Cancel a queued job at once (True: canceled now), or ask a running one to stop at its next step;
        (None, False): no such job."""
        job = self._one(
            "UPDATE jobs SET status = 'canceled', finished = ? WHERE id = ? AND status = 'queued' RETURNING *",
            (time.time(), job_id),
        )
        if job is not None:
            return job, True
        self._one("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running' RETURNING *", (job_id,))
        return self.get(job_id), False

    def sweep(self, max_age_s: float, max_bytes: int) -> list[str]:
        """Delete finished jobs older than ``max_age_s``, then the oldest finished ones until their images
        take at most ``max_bytes``; the deleted ids."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT id, finished, bytes FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled')"
                " ORDER BY finished DESC"
            ).fetchall()
        cutoff = time.time() - max_age_s
        kept_bytes = 0
        doomed = []
        for row in rows:
            if (row["finished"] or 0) < cutoff or kept_bytes + row["bytes"] > max_bytes:
                doomed.append(row["id"])
            else:
                kept_bytes += row["bytes"]
        for job_id in doomed:
            with self._connect() as connection:
                connection.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            shutil.rmtree(self.images / job_id, ignore_errors=True)
        return doomed

    def database_bytes(self) -> int:
        """The database's size on disk, its WAL included."""
        return sum(path.stat().st_size for path in self.folder.glob("jobs.sqlite*"))


def _process_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
