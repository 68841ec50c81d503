"""Connections: the only module that knows the drivers.

SQLite: WAL, a busy timeout, ``BEGIN IMMEDIATE`` for write transactions (so two
writers queue on the lock instead of failing to upgrade a read lock), and
"database is locked" retried here, never shown to a caller.
PostgreSQL: psycopg 3, pooled connections with pre-ping.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from ..display import masked_url
from ..errors import StoreUnavailable, UserError
from ..revision import HEAD
from . import outage
from .dialect import dialect_of

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"


def parse_url(raw: str) -> URL:
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise UserError(
            f"cannot parse database URL '{masked_url(raw)}': expected sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB (--db or ORCH_DATABASE_URL)"
        ) from None
    if url.host and "@" in url.host:
        # an unescaped "@" in the password: SQLAlchemy ends the password at the
        # first "@", and the rest would be taken for the host (and said in every
        # "cannot reach" message); the credentials end at the last one, as in
        # urllib
        spill, _, host = url.host.rpartition("@")
        url = url.set(password=f"{url.password or ''}@{spill}", host=host)
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise UserError(
            f"unsupported database '{backend}' in {masked(url)}: use sqlite:///PATH or "
            "postgresql+psycopg://…"
        )
    return url


@functools.lru_cache(maxsize=64)  # named in every transaction's retry loop
def masked(url: URL) -> str:
    # rendered whole, then masked: an unescaped "@" in the password leaves
    # its tail in SQLAlchemy's host, and a password can be a query parameter
    return masked_url(url.render_as_string(hide_password=False))


def sqlite_path(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite":
        return None
    db = url.database
    if not db or db == ":memory:":
        raise UserError("an in-memory SQLite database cannot be shared; give a file path")
    return Path(db)


def create_engine(
    url: URL, *, synchronous: str = "FULL", busy_ms: int = 10_000, pooled: bool = True
) -> sa.Engine:
    """A pooled engine. The store runs each transaction whole on a thread of its
    own: one thread hop per transaction, where an async driver costs several."""
    return dialect_of(url).create_engine(
        url, synchronous=synchronous, busy_ms=busy_ms, pooled=pooled
    )


class _Attempt:
    """How far one attempt got: an error while committing leaves a write's fate unknown."""

    __slots__ = ("committing",)

    def __init__(self) -> None:
        self.committing = False


def _unavailable(where: str, exc: BaseException, *, uncertain: bool = False) -> StoreUnavailable:
    if outage.is_read_only(exc):
        message = (
            f"the database {where} is read-only ({outage.reason(exc)}); "
            "pass a writable one with --db"
        )
    else:
        message = (
            f"cannot reach database {where}: {outage.reason(exc)} (check --db / ORCH_DATABASE_URL)"
        )
    return StoreUnavailable(message, uncertain=uncertain)


def _retrying(once: Callable[[_Attempt], T], *, where: str, write: bool, patience: float) -> T:
    """``once()`` until it returns, while the store is busy or away.

    Lock contention runs it again after a jittered pause that doubles from 5 ms
    to 0.5 s; a store that does not answer, after a capped, jittered backoff.
    Either way for at most ``patience`` seconds, then ``StoreUnavailable``. A
    write whose connection failed while committing is not run again (it may
    have committed): ``StoreUnavailable(uncertain=True)`` at once, and the
    caller reads before it assumes. Any other error propagates as it is.
    """
    started = time.monotonic()
    slept = 0.0  # the waits alone, should the clock be frozen (a test's freezegun)
    contention_delay = 0.005
    backoff = outage.Backoff(first=0.05, cap=1.0)
    while True:
        attempt = _Attempt()
        begun = time.monotonic()
        try:
            result = once(attempt)
        except Exception as exc:
            kind = outage.classify(exc)
            if kind is None:
                raise
            if kind == "unavailable" and write and attempt.committing:
                outage.outages.down(where, exc)
                raise _unavailable(where, exc, uncertain=True) from exc
            if kind == "contention":
                delay = contention_delay * (0.5 + random.random())
                contention_delay = min(contention_delay * 2, 0.5)
            else:
                delay = backoff.next()
            if max(time.monotonic() - started, slept) + delay > patience:
                if slept:  # it waited, and gave up: the caller moves on without it
                    outage.outages.down(where, exc)
                raise _unavailable(where, exc) from exc
            if kind == "unavailable":
                outage.outages.down(where, exc)  # one line per outage, however long
            log.debug("store %s: %s; again in %.3fs", kind, outage.reason(exc), delay)
            time.sleep(delay)
            slept += delay
            continue
        outage.outages.up(where, begun)
        return result


def run_transaction(
    engine: sa.Engine,
    fn: Callable[[sa.Connection], T],
    *,
    write: bool,
    patience: float,
) -> T:
    """Run ``fn`` in one transaction, waiting out lock contention and a store
    that does not answer for up to ``patience`` seconds (see ``_retrying``).

    ``fn`` must be safe to run again from the start: it sees a fresh transaction.
    """

    writer = dialect_of(engine.url).writer(engine.url) if write else contextlib.nullcontext()

    def once(attempt: _Attempt) -> T:
        with writer, engine.connect() as conn:
            if write:
                conn = conn.execution_options(orch_write=True)
            trans = conn.begin()
            try:
                result = fn(conn)
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    trans.rollback()
                if outage.classify(exc) == "unavailable":
                    engine.dispose(close=False)  # every pooled connection is stale alike
                raise
            attempt.committing = True
            try:
                trans.commit()
            except BaseException:
                # SQLAlchemy counts a failed commit as ended and would pool the
                # connection with its transaction still open: discard it
                with contextlib.suppress(Exception):
                    conn.invalidate()
                raise
            return result

    return _retrying(once, where=masked(engine.url), write=write, patience=patience)


class BatchItemFailed(Exception):
    """One write of a batch raised an error of its own (not the store's): the
    batch was rolled back."""

    def __init__(self, index: int, error: Exception):
        super().__init__(f"write {index} of a batch: {error!r}")
        self.index = index
        self.error = error


class Driver:
    """The few hot statements, on the driver's own cursor.

    A checkpoint commit is a handful of fixed statements; through SQLAlchemy's
    Core each costs more in Python than SQLite spends executing it. Statements
    here are written once with ``?`` placeholders and handed to the driver
    as they are (sqlite3) or with ``%s`` (psycopg); times go in as the column
    type would store them.
    """

    def __init__(self, engine: sa.Engine, *, patience: float):
        self.engine = engine
        self.patience = patience
        self.dialect = dialect_of(engine.url)
        self._where = masked(engine.url)
        self._writer = self.dialect.writer(engine.url)

    def sql(self, text: str) -> str:
        return self.dialect.sql(text)

    def time(self, value: datetime) -> object:
        return self.dialect.time(value)

    def run(self, fn: Callable[[Any], T], *, write: bool) -> T:
        """``fn(cursor)`` in one transaction, with run_transaction's retries."""
        writer = self._writer if write else contextlib.nullcontext()

        def once(attempt: _Attempt) -> T:
            with writer:
                return self._once(fn, write, attempt)

        return _retrying(once, where=self._where, write=write, patience=self.patience)

    def _once(self, fn: Callable[[Any], T], write: bool, attempt: _Attempt) -> T:
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            try:
                begin = self.dialect.begin_sql(write)
                if begin:
                    cur.execute(begin)
                result = fn(cur)
                attempt.committing = True
                raw.commit()
                return result
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    raw.rollback()
                if outage.classify(exc) == "unavailable":
                    raw.invalidate()  # the pool must not hand it out again
                    # nor any other connection made before the outage: they
                    # are stale alike (a new pool; the old one's drop on return)
                    self.engine.dispose(close=False)
                raise
            finally:
                with contextlib.suppress(Exception):
                    cur.close()
        finally:
            raw.close()

    def run_batch(self, fns: Sequence[Callable[[Any], Any]]) -> list[Any]:
        """Each ``fn(cursor)`` in order, in one write transaction: one commit
        for all (group.py). An error of the store retries the batch whole, as
        ``run`` does; an error of one write rolls it back and raises
        ``BatchItemFailed``."""

        def batch(cur: Any) -> list[Any]:
            out = []
            for i, fn in enumerate(fns):
                try:
                    out.append(fn(cur))
                except Exception as exc:
                    if outage.classify(exc) is not None:
                        raise
                    raise BatchItemFailed(i, exc) from exc
            return out

        return self.run(batch, write=True)


# ---------------------------------------------------------------- migrations


# The schema revision this code needs (revision.py). Alembic (and its migration
# scripts) is loaded only to migrate, not on every open.


def _alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    return HEAD


def current_revision(conn: sa.Connection) -> str | None:
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.scalar(sa.text("SELECT version_num FROM alembic_version"))


def upgrade(url: URL, *, synchronous: str = "FULL", busy_ms: int = 10_000) -> None:
    """Apply migrations up to head; safe to run from several processes at once."""
    engine = create_engine(url, synchronous=synchronous, busy_ms=busy_ms, pooled=False)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(orch_write=True)
            with conn.begin():
                # SQLite's write lock serialises upgrades by itself
                dialect_of(url).lock_migrations(conn)
                # under the lock: another process may have just finished the upgrade
                if current_revision(conn) == head_revision():
                    return
                from alembic import command

                cfg = _alembic_config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    finally:
        engine.dispose()


def check_sqlite_writable(path: Path) -> None:
    if path.exists():
        # os.access alone says yes to root for any file; a file with no write
        # bit at all was made read-only on purpose, so honour that for root too
        if not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222:
            raise UserError(
                f"SQLite file {path} is read-only; make it writable or pass another --db"
            )
        directory = path.parent
    else:
        directory = path.parent if str(path.parent) else Path(".")
        if not directory.exists():
            raise UserError(f"directory {directory} for SQLite file {path} does not exist")
    if not os.access(directory, os.W_OK):
        raise UserError(
            f"directory {directory} is read-only: SQLite writes its journal beside {path.name}"
        )


@contextlib.contextmanager
def translate_connect_errors(url: URL):
    """First contact: a server that is away is ``StoreUnavailable`` (a worker
    waits for it, the CLI says so and exits 2); a URL that can never work (a
    wrong password, a missing database) is a ``UserError``. Password masked."""
    try:
        yield
    except StoreUnavailable:
        raise
    except (OperationalError, DBAPIError) as exc:
        if outage.is_unavailable(exc):
            raise _unavailable(masked(url), exc) from None
        raise UserError(
            f"cannot reach database {masked(url)}: {outage.reason(exc)} "
            "(check --db / ORCH_DATABASE_URL)"
        ) from None
    except OSError as exc:
        raise UserError(
            f"cannot reach database {masked(url)}: {exc} (check --db / ORCH_DATABASE_URL)"
        ) from None
