"""When the store does not answer: one classification, one backoff, one log line.

Every caller that talks to the database (the transaction retry loop, the
runner, the lease keeper, the claim loop, the scheduler's jobs, the CLI) asks
the same question of an error: is this the store being unavailable, or a bug?
``classify`` answers it for both dialects. The store turns an unavailability
it could not wait out into ``StoreUnavailable``, which is never the workflow's
error: it costs no attempt and fails nothing.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import sys
import threading
import time
from typing import Literal

from sqlalchemy import exc as sa_exc

from ..errors import StoreUnavailable

log = logging.getLogger("orchestrator.store")

Kind = Literal["contention", "unavailable"]

# PostgreSQL SQLSTATEs: contention is safe to run again at once; the classes
# below are the server refusing, restarting, failing over or out of resources.
_PG_CONTENTION = {"40001", "40P01", "55P03"}  # serialization, deadlock, lock not available
_PG_UNAVAILABLE_CLASSES = {"08", "53", "57", "58"}  # connection, resources, operator, system
_PG_READ_ONLY = "25006"  # read_only_sql_transaction: a standby after failover

# A connection that failed before the server said who it is has no SQLSTATE;
# these phrases mean the URL is wrong, not that the server is away.
_PERMANENT = (
    "password authentication failed",
    "no password supplied",
    "does not exist",  # role / database
    "no pg_hba.conf entry",
    "invalid dsn",
    "invalid connection option",
)

_SQLITE_CONTENTION = ("database is locked", "database table is locked")
_SQLITE_UNAVAILABLE = (
    "disk i/o error",
    "unable to open database file",
    "readonly database",
    "database or disk is full",
)


def _psycopg():
    """psycopg, if this process uses it already (a SQLite store never imports it)."""
    return sys.modules.get("psycopg")


def _driver_error(exc: BaseException) -> BaseException:
    return exc.orig if isinstance(exc, sa_exc.DBAPIError) and exc.orig is not None else exc


def classify(exc: BaseException) -> Kind | None:
    """'contention' (lock or serialization conflict: the transaction rolled back,
    run it again), 'unavailable' (the store is down, restarting, unreachable,
    read-only or out of resources) or None (any other error: not the store's
    availability, so it propagates as it is)."""
    if isinstance(exc, StoreUnavailable):
        return "unavailable"
    if isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return "unavailable"  # pool exhausted while connections hang, or a dead one
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return "unavailable"
    orig = _driver_error(exc)
    msg = str(orig).lower()
    psycopg = _psycopg()
    if psycopg is not None and isinstance(orig, psycopg.Error):
        state = getattr(orig, "sqlstate", None)
        if state:
            if state in _PG_CONTENTION:
                return "contention"
            if state[:2] in _PG_UNAVAILABLE_CLASSES or state == _PG_READ_ONLY:
                return "unavailable"
            return None
        if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
            return None if any(p in msg for p in _PERMANENT) else "unavailable"
        return None
    if isinstance(orig, sqlite3.OperationalError):
        if any(p in msg for p in _SQLITE_CONTENTION):
            return "contention"
        if any(p in msg for p in _SQLITE_UNAVAILABLE):
            return "unavailable"
    return None


def is_unavailable(exc: BaseException) -> bool:
    """Anything the store could not do because the database was not there for it."""
    return classify(exc) is not None


def is_read_only(exc: BaseException) -> bool:
    orig = _driver_error(exc)
    if getattr(orig, "sqlstate", None) == _PG_READ_ONLY:
        return True
    return "readonly database" in str(orig).lower()


def reason(exc: BaseException) -> str:
    """The first line of what the driver said, for one clear message."""
    text = str(_driver_error(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Backoff:
    """Capped exponential backoff with full jitter: first, 2×first, … up to cap."""

    def __init__(self, first: float = 0.05, cap: float = 5.0):
        self.first = first
        self.cap = cap
        self._ceiling = first

    def next(self) -> float:
        delay = self._ceiling * (0.5 + random.random() / 2)
        self._ceiling = min(self._ceiling * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._ceiling = self.first


class OutageLog:
    """One warning when a database stops answering and one line when it is back,
    per process, however many threads, stores and retries see the outage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down_since: dict[str, float] = {}

    def down(self, where: str, exc: BaseException) -> None:
        with self._lock:
            if where in self._down_since:
                return
            self._down_since[where] = time.monotonic()
        log.warning("database %s is not answering (%s); waiting for it", where, reason(exc))

    def up(self, where: str, begun: float) -> None:
        """A transaction begun at ``begun`` (time.monotonic()) has committed.

        One begun before the outage was seen proves nothing: its last answer
        may have come just before the connections went (another thread's,
        say). The store is back when a transaction begun since answers."""
        if where not in self._down_since:  # the common case, without the lock
            return
        with self._lock:
            since = self._down_since.get(where)
            if since is None or begun < since:
                return
            del self._down_since[where]
        log.warning("database %s is answering again after %.1fs", where, time.monotonic() - since)

    def is_down(self, where: str) -> bool:
        return where in self._down_since


outages = OutageLog()
