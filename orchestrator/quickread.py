"""`orch list` and `orch show` on a SQLite store, read with the standard
library's sqlite3 alone.

A person types these and waits; the engine (SQLAlchemy, pydantic, the store's
threads) costs most of half a second to load, and a read of a few rows needs
none of it. This path serves only the plain case: a ``sqlite:///PATH`` URL to a
file that exists and is writable, its schema at this code's revision, no
ORCH_* setting in the environment that could be invalid, and rows that are there.
Anything else (PostgreSQL, an unknown id, a locked or missing file, an old
schema, any sqlite3 error) returns None, and the command takes the engine's
path, which says what is wrong as it always has. It only reads: nothing here
writes to the store.

What it prints is what the engine's path prints, key for key (a test holds the
two equal on the same store).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from . import clock
from .revision import HEAD
from .routing import missing_hooks

# schemas.Execution's fields, in its order (its JSON keys)
EXECUTION_KEYS = (
    "id",
    "machine",
    "status",
    "queue",
    "priority",
    "attempt",
    "recoveries",
    "worker_id",
    "input",
    "output",
    "error",
    "current_state",
    "step",
    "fence",
    "config_hash",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "parent_id",
    "root_id",
    "waiting_channel",
    "wake_at",
    "cancel_reason",
    "needs",
)
_TIMES = frozenset({"created_at", "updated_at", "started_at", "finished_at", "wake_at"})
_JSON = frozenset({"input", "output"})
_COLUMNS = ", ".join(EXECUTION_KEYS)
# the settings.Settings fields whose value from the environment can be invalid
# (the two others, database_url and app, are any string): with one of them set,
# the engine's path reads the command, so that it checks it as every command does
CHECKED_SETTINGS = frozenset(
    {
        "lease_ttl",
        "poll_interval",
        "max_recoveries",
        "max_steps",
        "sqlite_synchronous",
        "sqlite_busy_timeout_ms",
        "store_patience",
        "max_input_bytes",
        "max_signal_bytes",
        "max_context_bytes",
        "retention",
    }
)
_CHECKED_ENV = frozenset(f"ORCH_{name.upper()}" for name in CHECKED_SETTINGS)
# a reader waits this long for a lock (a WAL checkpoint, a recovery) before it
# leaves the read to the engine's path and its patience
_BUSY_SECONDS = 1.0


class NotHere(Exception):
    """The read is not this module's to answer; the engine's path answers it."""


def iso(text: str | None) -> str | None:
    """A SQLite DATETIME text as the API prints it."""
    return clock.iso(datetime.fromisoformat(text)) if text is not None else None


def sqlite_file(url: str | None) -> Path | None:
    """The file of a plain ``sqlite:///PATH`` URL; None for anything else."""
    url = url or "sqlite:///./orch.sqlite"
    for prefix in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(prefix):
            path = url[len(prefix) :]
            break
    else:
        return None
    if not path or "?" in path or path == ":memory:":
        return None
    return Path(path)


@contextmanager
def reading(url: str | None) -> Iterator[sqlite3.Connection]:
    """A read transaction on the store at ``url``, or NotHere."""
    if any(k.upper() in _CHECKED_ENV for k in os.environ):
        raise NotHere
    path = sqlite_file(url)
    if path is None or not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
        raise NotHere
    try:
        with closing(sqlite3.connect(path, timeout=_BUSY_SECONDS, isolation_level=None)) as conn:
            conn.execute("BEGIN")
            (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            if revision != HEAD:
                raise NotHere
            yield conn
            conn.execute("COMMIT")
    except (sqlite3.Error, TypeError, ValueError):
        # a lock, a missing table, an unexpected value: the engine's path knows
        raise NotHere from None


def _doc(row: tuple[Any, ...]) -> dict[str, Any]:
    doc = dict(zip(EXECUTION_KEYS, row, strict=True))
    for key in _TIMES:
        doc[key] = iso(doc[key])
    for key in _JSON:
        if doc[key] is not None:
            doc[key] = json.loads(doc[key])
    return doc


def list_executions(
    url: str | None,
    *,
    status: str | None = None,
    queue: str | None = None,
    parent: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """As `Orchestrator.list(...)` in JSON, newest first; NotHere if not ours."""
    where, args = [], []
    for column, value in (("status", status), ("queue", queue), ("parent_id", parent)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    sql = (
        f"SELECT {_COLUMNS} FROM executions"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY created_at DESC, id DESC LIMIT ?"
    )
    with reading(url) as conn:
        if parent and not _exists(conn, parent):
            raise NotHere  # the engine's path says it is unknown
        return [_doc(r) for r in conn.execute(sql, (*args, limit))]


def show(url: str | None, execution_id: str) -> dict[str, Any]:
    """As `Orchestrator.get(id, detail=True)` in JSON; NotHere if not ours."""
    with reading(url) as conn:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM executions WHERE id = ?", (execution_id,)
        ).fetchone()
        if row is None:
            raise NotHere  # the engine's path says it is unknown
        doc = _doc(row)
        children = conn.execute(
            "SELECT id, machine, status FROM executions WHERE parent_id = ? "
            "ORDER BY created_at, id",
            (execution_id,),
        )
        doc["children"] = [dict(zip(("id", "machine", "status"), c, strict=True)) for c in children]
        history = conn.execute(
            "SELECT step, event, state, created_at, id FROM checkpoints "
            "WHERE execution_id = ? ORDER BY id",
            (execution_id,),
        )
        doc["history"] = [
            {"step": step, "event": event, "state": state, "at": iso(at), "seq": seq}
            for step, event, state, at, seq in history
        ]
        if doc["status"] == "queued" and doc["needs"]:
            workers = [
                (status, json.loads(queues or "null"), json.loads(hooks or "null"))
                for status, queues, hooks in conn.execute(
                    "SELECT status, queues, hooks FROM workers WHERE status != 'stopped'"
                )
            ]
            missing = missing_hooks(doc["queue"], [doc["needs"]], workers)
            if missing:
                doc["missing_hooks"] = missing
        return doc


def _exists(conn: sqlite3.Connection, execution_id: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM executions WHERE id = ?", (execution_id,)).fetchone()
        is not None
    )
