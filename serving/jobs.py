"""The job store: jobs that outlive their request and the server, with their images, in one database
that every worker of a server (and, on PostgreSQL, every server) shares.

Unset, TXT2IMG_JOBS_DB means a SQLite database (WAL) under TXT2IMG_HOME; a ``postgresql://`` URL lets
several servers, on several machines, share one store. The SQL is written once; what differs between
the two databases (placeholders, column types, row locks, how a transaction begins) is data, a
``Dialect``. A job's images are rows of ``job_images`` on both, so that any server can answer for any
job, and a job's images and its ``succeeded`` status are written in one transaction.

A job is claimed with one ``UPDATE ... WHERE status = 'queued' RETURNING``, whose subquery takes the
oldest queued row (on PostgreSQL ``FOR UPDATE SKIP LOCKED``, so that claimers at once take different
rows), so two workers never run the same job. A job's seeds are fixed when it is submitted and
stored with it, so a job that runs again after a crash gives the same images.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.paths import txt2img_home
from txt2img.errors import Txt2ImgError

# A running job's worker writes its heartbeat several times a second; after this long without one the
# worker is taken for gone even where its process id is alive (a new process that got the same id
# after a container restart, or a server on another machine that died), and the job runs again. The
# servers sharing a PostgreSQL store must keep their clocks in step (NTP) to well within this.
SILENT_AFTER_S = 60.0

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
POSTGRES_CONNECTIONS = 8  # per worker: the runner, the sweeper and request threads take turns
SCHEMA_LOCK = 2424  # PostgreSQL advisory lock: servers starting at once create the tables one at a time

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    seeds TEXT NOT NULL,
    webhook TEXT,
    idempotency_key TEXT UNIQUE,
    body_hash TEXT,
    created {real} NOT NULL,
    started {real},
    finished {real},
    steps_done INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    claimed_by INTEGER,
    claimed_host TEXT,
    heartbeat {real},
    image_count INTEGER NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'generate',
    origin_host TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created);
CREATE TABLE IF NOT EXISTS job_images (
    job_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (job_id, position)
);
"""


# Columns added to ``jobs`` since its first release, each with its definition: a store an older txt2img
# wrote gains them when opened (CREATE TABLE IF NOT EXISTS leaves an existing table as it is).
ADDED_COLUMNS = {
    "claimed_host": "TEXT",
    "kind": "TEXT NOT NULL DEFAULT 'generate'",
    "origin_host": "TEXT",
}


def add_missing_columns(session: Session) -> None:
    """Give a ``jobs`` table written by an older txt2img the columns it lacks (ADDED_COLUMNS)."""
    present = {column[0] for column in session.execute("SELECT * FROM jobs LIMIT 0").description}
    for name, definition in ADDED_COLUMNS.items():
        if name not in present:
            session.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")


class JobStoreUnavailable(Txt2ImgError):
    """TXT2IMG_JOBS_DB names a database this server cannot use."""

    http_status = 503


@dataclass(frozen=True)
class Dialect:
    """What differs between SQLite and PostgreSQL for the store's SQL, which is written once with ``?``."""

    placeholder: str
    real: str  # PostgreSQL's REAL is 4 bytes: a timestamp would lose minutes
    blob: str
    skip_locked: str  # the claim's row lock; SQLite writes one transaction at a time and needs none
    begin: str  # SQLite: take the write lock at once, so that a transaction never fails half-way
    request_name: str  # the ``name`` field of a job's request (its JSON text)

    def sql(self, text: str) -> str:
        return text.replace("?", self.placeholder)


SQLITE = Dialect(
    placeholder="?",
    real="REAL",
    blob="BLOB",
    skip_locked="",
    begin="BEGIN IMMEDIATE",
    request_name="json_extract(request, '$.name')",
)
POSTGRES = Dialect(
    placeholder="%s",
    real="DOUBLE PRECISION",
    blob="BYTEA",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    begin="BEGIN",
    request_name="(request::json ->> 'name')",
)


def jobs_folder() -> Path:
    """Where the SQLite store lives: TXT2IMG_HOME/jobs."""
    return txt2img_home() / "jobs"


def training_folder(job_id: str) -> Path:
    """A training job's own folder, on the host that accepted it: its photos, its trainer's log and run."""
    return jobs_folder() / "train" / job_id


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
    claimed_host: str | None
    heartbeat: float | None
    image_count: int
    bytes: int
    kind: str = "generate"  # or "train": a fine-tune (serving/train_runner.py)
    origin_host: str | None = None  # the host that accepted it: a training job's photos are on its disk

    @classmethod
    def from_row(cls, row: Any) -> StoredJob:
        fields = dict(row)
        fields["request"] = json.loads(fields["request"])
        fields["seeds"] = json.loads(fields["seeds"])
        fields["cancel_requested"] = bool(fields["cancel_requested"])
        return cls(**fields)

    @property
    def image_format(self) -> str:
        return self.request.get("format", "png")


class Session:
    """One connection's cursor, taking the store's ``?`` SQL in the database's own dialect."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self.cursor = cursor
        self.dialect = dialect

    def execute(self, sql: str, parameters: tuple = ()) -> Any:
        # Without parameters psycopg sends the text as it is, so that the schema's statements go at once.
        if parameters:
            self.cursor.execute(self.dialect.sql(sql), parameters)
        else:
            self.cursor.execute(sql)
        return self.cursor

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        self.cursor.executemany(self.dialect.sql(sql), rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        self.cursor.execute(self.dialect.begin)
        try:
            yield self
        except BaseException:
            self.cursor.execute("ROLLBACK")
            raise
        self.cursor.execute("COMMIT")


class SqliteDatabase:
    """A SQLite file; each session opens its own short connection, so any thread may open one."""

    dialect = SQLITE

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        # Autocommit: each statement is its own transaction unless one is begun.
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        connection.row_factory = sqlite3.Row
        try:
            # With WAL, NORMAL syncs at checkpoints only: a killed process loses nothing, a power cut at
            # most the last commits (a job then runs again), and a commit costs no fsync.
            connection.execute("PRAGMA synchronous=NORMAL")
            yield Session(connection.cursor(), self.dialect)
        finally:
            connection.close()

    def create_schema(self) -> None:
        with self.session() as session:
            session.execute("PRAGMA journal_mode=WAL")  # readers never wait for the one writer
            session.cursor.executescript(SCHEMA.format(real=self.dialect.real, blob=self.dialect.blob))
            add_missing_columns(session)

    def size(self) -> int:
        """Bytes on disk, the WAL included."""
        return sum(path.stat().st_size for path in self.path.parent.glob(self.path.name + "*"))


class PostgresDatabase:
    """A PostgreSQL database, through a few autocommit connections kept open and taken in turn."""

    dialect = POSTGRES

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as error:
            raise JobStoreUnavailable(
                f"TXT2IMG_JOBS_DB is a PostgreSQL URL but its driver is missing ({error.name}): "
                "pip install 'txt2img[postgres]'"
            ) from None
        self.psycopg = psycopg
        self.url = url
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.Semaphore(POSTGRES_CONNECTIONS)

    def __str__(self) -> str:
        return self.url.split("@")[-1]  # host and database, never the password

    def _connect(self) -> Any:
        from psycopg.rows import dict_row

        try:
            return self.psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=30)
        except self.psycopg.OperationalError as error:
            reason = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
            raise JobStoreUnavailable(f"cannot reach the jobs database {self}: {reason}") from None

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        with self._slots:
            try:
                connection = self._idle.get_nowait()
            except queue.Empty:
                connection = self._connect()
            try:
                with connection.cursor() as cursor:
                    yield Session(cursor, self.dialect)
            finally:
                if connection.broken or connection.closed or connection.info.transaction_status:
                    connection.close()  # a lost or half-used connection is not handed on
                else:
                    self._idle.put(connection)

    def create_schema(self) -> None:
        with self.session() as session, session.transaction():
            session.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
            session.execute(SCHEMA.format(real=self.dialect.real, blob=self.dialect.blob))
            add_missing_columns(session)

    def size(self) -> int:
        with self.session() as session:
            return session.execute(
                "SELECT pg_total_relation_size('jobs') + pg_total_relation_size('job_images') AS size"
            ).fetchone()["size"]


def open_database(location: Path | str | None) -> SqliteDatabase | PostgresDatabase:
    """The store's database, its tables created: a ``postgresql://`` URL (TXT2IMG_JOBS_DB), a folder
    for a SQLite file, or None for the SQLite file under TXT2IMG_HOME."""
    if isinstance(location, str):
        opened: SqliteDatabase | PostgresDatabase = PostgresDatabase(location)
    else:
        folder = location or jobs_folder()
        folder.mkdir(parents=True, exist_ok=True)
        opened = SqliteDatabase(folder / "jobs.sqlite")
    opened.create_schema()
    return opened


class JobStore:
    """The jobs of every worker sharing one database; any thread may call any method."""

    def __init__(self, location: Path | str | None = None) -> None:
        """``location``: a folder for a SQLite store, a ``postgresql://`` URL, or None for TXT2IMG_HOME's store."""
        self.database = open_database(location)
        self.host = socket.gethostname()  # a worker is its host and process id: pids repeat across machines

    def _one(self, sql: str, parameters: tuple = ()) -> StoredJob | None:
        with self.database.session() as session:
            row = session.execute(sql, parameters).fetchone()
        return None if row is None else StoredJob.from_row(row)

    def _all(self, sql: str, parameters: tuple = ()) -> list[Any]:
        with self.database.session() as session:
            return session.execute(sql, parameters).fetchall()

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
        added = self._one(
            "INSERT INTO jobs (id, status, request, seeds, webhook, idempotency_key, body_hash, created,"
            " total_steps, kind, origin_host) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (idempotency_key) DO NOTHING RETURNING *",
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
                self.host,
            ),
        )
        if added is not None:
            return added, True
        # The key was taken, by a transaction committed by now (an insert that conflicts waits for it).
        return self._one("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)), False

    def get(self, job_id: str) -> StoredJob | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def page(self, limit: int, offset: int) -> list[StoredJob]:
        """Jobs newest first."""
        rows = self._all("SELECT * FROM jobs ORDER BY created DESC, id LIMIT ? OFFSET ?", (limit, offset))
        return [StoredJob.from_row(row) for row in rows]

    def count(self) -> int:
        return self._all("SELECT COUNT(*) AS jobs FROM jobs")[0]["jobs"]

    def queue_position(self, job: StoredJob) -> int:
        """Queued jobs of its kind ahead of ``job`` (0: it runs next)."""
        rows = self._all(
            "SELECT COUNT(*) AS ahead FROM jobs WHERE status = 'queued' AND kind = ? AND created < ?",
            (job.kind, job.created),
        )
        return rows[0]["ahead"]

    def claim(self, worker_pid: int, kind: str = "generate", at_most_running: int | None = None) -> StoredJob | None:
        """The oldest queued job of ``kind``, now running for ``worker_pid`` of this host; None when none is
        queued, or when ``at_most_running`` jobs of that kind run already (on any worker of this host).

        A training job is claimed only on the host that accepted it, where its photos are."""
        now = time.time()
        local = " AND origin_host = ?" if kind == "train" else ""
        limit = (
            ""
            if at_most_running is None
            else " AND (SELECT COUNT(*) FROM jobs WHERE status = 'running' AND kind = ? AND claimed_host = ?) < ?"
        )
        return self._one(
            "UPDATE jobs SET status = 'running', started = ?, heartbeat = ?, claimed_by = ?, claimed_host = ?,"
            " steps_done = 0"
            f" WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND kind = ?{local} ORDER BY created LIMIT 1"
            f"{self.database.dialect.skip_locked}) AND status = 'queued'{limit} RETURNING *",
            (
                now,
                now,
                worker_pid,
                self.host,
                kind,
                *((self.host,) if local else ()),
                *(() if at_most_running is None else (kind, self.host, at_most_running)),
            ),
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
            f" AND {self.database.dialect.request_name} = ?",
            (name,),
        )

    def release(self, job_id: str) -> None:
        """Put a running job back in the queue (the worker could not take it now)."""
        with self.database.session() as session:
            session.execute(f"{REQUEUE} WHERE id = ? AND status = 'running'", (job_id,))

    def requeue_orphans(self, silent_after_s: float = SILENT_AFTER_S) -> list[str]:
        """Queue again every running job whose worker is gone, so that it runs again: a worker of this host
        whose process is dead, or any worker silent for ``silent_after_s``. Each is queued by one UPDATE
        that checks again that it is still the orphan seen, so that two servers sweeping at once never
        queue a job that a third has claimed meanwhile."""
        with self.database.session() as session:
            silent = session.execute(
                f"{REQUEUE} WHERE status = 'running' AND heartbeat < ? RETURNING id", (time.time() - silent_after_s,)
            ).fetchall()
            mine = session.execute(
                "SELECT id, claimed_by FROM jobs WHERE status = 'running' AND claimed_host = ?", (self.host,)
            ).fetchall()
            dead = []
            for row in mine:
                if _process_alive(row["claimed_by"]):
                    continue
                dead += session.execute(
                    f"{REQUEUE} WHERE id = ? AND status = 'running' AND claimed_host = ? AND claimed_by = ?"
                    " RETURNING id",
                    (row["id"], self.host, row["claimed_by"]),
                ).fetchall()
        return [row["id"] for row in [*silent, *dead]]

    def progress(self, steps_done: dict[str, int]) -> set[str]:
        """Record the steps done of running jobs (their heartbeat) in one transaction; the ids among them
        whose cancel was asked for."""
        now = time.time()
        placeholders = ",".join("?" * len(steps_done))
        with self.database.session() as session:
            with session.transaction():
                session.executemany(
                    "UPDATE jobs SET steps_done = ?, heartbeat = ? WHERE id = ?",
                    [(steps, now, job_id) for job_id, steps in steps_done.items()],
                )
            rows = session.execute(
                f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({placeholders})", tuple(steps_done)
            ).fetchall()
        return {row["id"] for row in rows}

    def image(self, job_id: str, index: int) -> bytes | None:
        """The encoded bytes of a job's ``index``-th image; None when it has none such."""
        rows = self._all("SELECT data FROM job_images WHERE job_id = ? AND position = ?", (job_id, index))
        return bytes(rows[0]["data"]) if rows else None

    def succeed(self, job: StoredJob, encoded_images: list[bytes]) -> StoredJob | None:
        """Mark a running job succeeded with its images, in one transaction: both or neither. None when
        the job was no longer running (canceled, or queued again after its worker fell silent)."""
        total = sum(len(data) for data in encoded_images)
        with self.database.session() as session, session.transaction():
            row = session.execute(
                FINISH, ("succeeded", None, len(encoded_images), total, time.time(), job.id)
            ).fetchone()
            if row is None:
                return None
            session.executemany(
                "INSERT INTO job_images (job_id, position, data) VALUES (?, ?, ?)",
                [(job.id, index, data) for index, data in enumerate(encoded_images)],
            )
        return StoredJob.from_row(row)

    def fail(self, job_id: str, error: str) -> StoredJob | None:
        return self._one(FINISH, ("failed", error, 0, 0, time.time(), job_id))

    def mark_canceled(self, job_id: str) -> StoredJob | None:
        return self._one(FINISH, ("canceled", None, 0, 0, time.time(), job_id))

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
        rows = self._all(
            "SELECT id, finished, bytes FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled')"
            " ORDER BY finished DESC"
        )
        cutoff = time.time() - max_age_s
        kept_bytes = 0
        doomed = []
        for row in rows:
            if (row["finished"] or 0) < cutoff or kept_bytes + row["bytes"] > max_bytes:
                doomed.append(row["id"])
            else:
                kept_bytes += row["bytes"]
        for job_id in doomed:
            with self.database.session() as session, session.transaction():
                session.execute("DELETE FROM job_images WHERE job_id = ?", (job_id,))
                session.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return doomed

    def database_bytes(self) -> int:
        """The database's size on disk, the images in it included."""
        return self.database.size()


REQUEUE = "UPDATE jobs SET status = 'queued', claimed_by = NULL, claimed_host = NULL, started = NULL"
FINISH = (
    "UPDATE jobs SET status = ?, error = ?, image_count = ?, bytes = ?, finished = ?"
    " WHERE id = ? AND status = 'running' RETURNING *"
)


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
