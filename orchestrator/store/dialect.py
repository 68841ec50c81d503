"""Everything that differs between SQLite and PostgreSQL, in one small object.

The verbs (executions.py, checkpoints.py, …) never ask which database they
run on; they ask the dialect for the piece that differs: how to connect, how
to begin a write, an upsert, a placeholder, a JSON parameter, how a progress
marker skips the disk flush, how two transactions serialise on one channel.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import URL

POOL_SIZE = 8  # also the number of store threads per process
_MIGRATION_LOCK = 0x0F1A7_0C4  # PostgreSQL advisory lock key serialising upgrades


# one lock per SQLite file, shared by every engine of this process (see writer)
_WRITERS: dict[str, threading.RLock] = {}
_WRITERS_LOCK = threading.Lock()


def _pool(pooled: bool) -> dict[str, Any]:
    # No rollback as a connection goes back to the pool: every transaction here
    # ends in its own commit or rollback (engine.py), so the pool's would only
    # cost a call per transaction.
    reset = {"pool_reset_on_return": None}
    if pooled:
        return {"pool_size": POOL_SIZE, "max_overflow": 0, **reset}
    return {"poolclass": sa.NullPool, **reset}


class Dialect:
    name: str
    # a JSON value handed to the driver as text, in a raw statement
    json_param: str = "?"

    def create_engine(self, url: URL, *, synchronous: str, busy_ms: int, pooled: bool) -> sa.Engine:
        raise NotImplementedError

    def progress_engine(
        self, url: URL, engine: sa.Engine, *, busy_ms: int, create: Callable[..., sa.Engine]
    ) -> sa.Engine:
        """The engine progress markers commit on, without waiting for the disk
        (``create`` makes another engine, should the database need one)."""
        return engine

    def progress_commit_sql(self) -> str | None:
        """Run first in a progress-marker transaction, if the database needs telling."""
        return None

    def begin_sql(self, write: bool) -> str | None:
        """What opens a transaction on a raw cursor (None: the driver opens it)."""
        return None

    def writer(self, url: URL) -> contextlib.AbstractContextManager:
        """Held around a write transaction of this process (see SQLite)."""
        return contextlib.nullcontext()

    def insert(self, table: sa.Table) -> Any:
        """An INSERT that takes ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
        raise NotImplementedError

    def greatest(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def sql(self, text: str) -> str:
        """A raw statement written with ``?`` placeholders, as the driver wants it."""
        return text

    def time(self, value: datetime) -> object:
        """A naive-UTC time as a raw statement passes it."""
        return value

    def lock_channel(self, conn: sa.Connection, channel: str) -> None:
        """Serialise the transactions that send to and park on ``channel``."""

    def lock_migrations(self, conn: sa.Connection) -> None:
        """Serialise concurrent schema upgrades (SQLite's write lock already does)."""


def _create_owner_only(url: URL) -> None:
    """Create a new store file readable by its owner alone, before SQLite makes
    it with the umask's mode; SQLite gives its -wal and -shm files the mode of
    the database file. An existing file is left as it is, and any error is for
    SQLite's own open to report."""
    path = url.database
    if not path or path == ":memory:" or url.query.get("uri"):
        return
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SQLite(Dialect):
    name = "sqlite"

    def create_engine(self, url: URL, *, synchronous: str, busy_ms: int, pooled: bool) -> sa.Engine:
        engine = sa.create_engine(
            url.set(drivername="sqlite"),
            connect_args={"check_same_thread": False},
            **_pool(pooled),
        )

        @sa.event.listens_for(engine, "do_connect")
        def _before_connect(_dialect, _record, _cargs, _cparams):
            _create_owner_only(url)

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # pragma: no cover - trivial
            # Hand transaction control to SQLAlchemy so BEGIN is ours to choose.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):  # pragma: no cover - trivial
            # writers queue on the lock instead of failing to upgrade a read lock
            conn.exec_driver_sql(
                self.begin_sql(bool(conn.get_execution_options().get("orch_write")))
            )

        return engine

    def progress_engine(
        self, url: URL, engine: sa.Engine, *, busy_ms: int, create: Callable[..., sa.Engine]
    ) -> sa.Engine:
        return create(url, synchronous="OFF", busy_ms=busy_ms)

    def begin_sql(self, write: bool) -> str:
        return "BEGIN IMMEDIATE" if write else "BEGIN"

    def writer(self, url: URL) -> contextlib.AbstractContextManager:
        """SQLite takes one writer at a time. The threads of one process queue
        for it on a lock of their own, woken the moment it is free; left to
        SQLite, each would poll the file lock in sleeps of up to 100 ms. Other
        processes still meet at the file lock (the busy timeout)."""
        key = os.path.realpath(url.database or "")
        with _WRITERS_LOCK:
            lock = _WRITERS.get(key)
            if lock is None:
                lock = _WRITERS[key] = threading.RLock()
        return lock

    def insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)

    def greatest(self, a: Any, b: Any) -> Any:
        return sa.func.max(a, b)

    def time(self, value: datetime) -> object:
        # SQLAlchemy's SQLite DATETIME text, so raw and Core rows compare alike
        # ("%Y-%m-%d %H:%M:%S.%f", for a third of strftime's cost)
        return value.isoformat(" ", "microseconds")


class PostgreSQL(Dialect):
    name = "postgresql"
    json_param = "CAST(? AS json)"

    def create_engine(self, url: URL, *, synchronous: str, busy_ms: int, pooled: bool) -> sa.Engine:
        # a server that vanished without closing its sockets (a partition, a dead
        # host) is noticed by TCP keepalives instead of hanging a worker for good
        connect_args = {
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        # No pre-ping: it costs a round trip per transaction, a third of a
        # checkpoint commit's. A connection that went stale (the server
        # restarted) fails its first statement, which is never a commit's, and
        # the store's retry drops the whole pool and reconnects (engine.py).
        return sa.create_engine(
            url.set(drivername="postgresql+psycopg"),
            pool_recycle=1800,
            connect_args=connect_args,
            **_pool(pooled),
        )

    def progress_commit_sql(self) -> str:
        return "SET LOCAL synchronous_commit TO OFF"

    def insert(self, table: sa.Table) -> Any:
        from sqlalchemy.dialects import postgresql  # only where PostgreSQL is used

        return postgresql.insert(table)

    def greatest(self, a: Any, b: Any) -> Any:
        return sa.func.greatest(a, b)

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def lock_channel(self, conn: sa.Connection, channel: str) -> None:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:c))"), {"c": channel})

    def lock_migrations(self, conn: sa.Connection) -> None:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})


def dialect_of(url: URL) -> Dialect:
    return SQLite() if url.get_backend_name() == "sqlite" else PostgreSQL()
