"""The hot path of a checkpoint commit, on the driver's own cursor: the
owner's fence check (which moves its step and state) and the snapshot rows.

Alone, a commit is a couple of fixed statements (one on PostgreSQL). A batch
of them from group commit (group.py) is one statement on PostgreSQL; on SQLite
one fenced update for all of them and a few multi-row inserts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ..clock import utcnow
from ..errors import LeaseLost
from . import engine as eng
from .models import executions
from .outage import classify
from .records import CheckpointRow

# The hot path on the driver's cursor (engine.Driver): a checkpoint commit, and
# (executions.py) the outcome. Every write is fenced by the owner's claim.
RAW_HELD = "WHERE id = ? AND fence = ? AND status = 'running'"
_RAW_SAVE_STEP_AND_STATE = (
    f"UPDATE executions SET updated_at = ?, step = ?, current_state = ? {RAW_HELD}"
)
_RAW_SAVE_STEP = f"UPDATE executions SET updated_at = ?, step = ? {RAW_HELD}"
_RAW_SAVE_TOUCH = f"UPDATE executions SET updated_at = ? {RAW_HELD}"
_RAW_INSERT_CHECKPOINTS = (
    "INSERT INTO checkpoints"
    " (execution_id, key, step, event, state, snapshot, fence, created_at, delta) VALUES "
)
_RAW_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
# the big strings a row names: stored once (a writer that names one again
# moves its used_at, which keeps retention off it), linked to the execution
_RAW_UPSERT_BLOB = (
    "INSERT INTO blobs (hash, data, codec, size, used_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (hash) DO UPDATE SET used_at = excluded.used_at"
)
_RAW_LINK_BLOB = (
    "INSERT INTO checkpoint_blobs (execution_id, hash) VALUES (?, ?) ON CONFLICT DO NOTHING"
)


def hold(conn: sa.Connection, execution_id: str, fence: int) -> None:
    """Prove a claim still holds its execution, in the caller's transaction
    (the row is locked to its end on PostgreSQL): LeaseLost if not."""
    held = conn.execute(
        sa.update(executions)
        .where(
            executions.c.id == execution_id,
            executions.c.fence == fence,
            executions.c.status == "running",
        )
        .values(updated_at=utcnow())
    )
    if held.rowcount != 1:
        raise LeaseLost(execution_id, fence)


def moved_to(owner_id: str, rows: Sequence[CheckpointRow]) -> tuple[int, str | None] | None:
    """The owner's step and current state after ``rows`` (state None: unchanged);
    None when no row is the owner's (an inline child's rows)."""
    own = [r for r in rows if r.execution_id == owner_id]
    if not own:
        return None
    # machine_start/machine_end name pseudo-states ('start', 'end'): keep the last real one
    real = [r for r in own if r.event not in ("machine_start", "machine_end")]
    return (real[-1].step, real[-1].state) if real else (own[-1].step, None)


def _touch(owner_id: str, fence: int, rows: Sequence[CheckpointRow], now: Any) -> tuple:
    moved = moved_to(owner_id, rows)
    if moved is None:  # an inline child's rows only prove the fence on the owner's row
        return _RAW_SAVE_TOUCH, (now, owner_id, fence)
    step, state = moved
    if state is None:
        return _RAW_SAVE_STEP, (now, step, owner_id, fence)
    return _RAW_SAVE_STEP_AND_STATE, (now, step, state, owner_id, fence)


def _row_params(drv: eng.Driver, rows: Sequence[CheckpointRow], fence: int, now: Any) -> list:
    # a marker that waited for this commit keeps the time it was taken, for the timeline
    params: list[Any] = []
    for r in rows:
        at = now if r.at is None else drv.time(r.at)
        params += (r.execution_id, r.key, r.step, r.event, r.state, r.snapshot, fence, at, r.delta)
    return params


def write_blobs(cur: Any, drv: eng.Driver, rows: Sequence[CheckpointRow], now: Any) -> None:
    """The blobs ``rows`` name for the first time in their executions, in the
    rows' transaction (a row is never committed without them)."""
    blobs = [(r.execution_id, b) for r in rows for b in r.blobs]
    if not blobs:
        return
    unique = {b.hash: b for _, b in blobs}.values()
    cur.executemany(
        drv.sql(_RAW_UPSERT_BLOB), [(b.hash, b.data, b.codec, b.size, now) for b in unique]
    )
    cur.executemany(drv.sql(_RAW_LINK_BLOB), list({(e, b.hash) for e, b in blobs}))


def insert_checkpoints(
    cur: Any, drv: eng.Driver, rows: Sequence[CheckpointRow], fence: int, now: Any
) -> None:
    if not rows:
        return
    # in order: ids follow the save order (latest = max id; one statement
    # numbers its rows in the order of its VALUES on both databases).
    # One statement, not executemany: psycopg pipelines an executemany, which
    # costs more than it saves for the few rows of one commit.
    params = _row_params(drv, rows, fence, now)
    cur.execute(drv.sql(_RAW_INSERT_CHECKPOINTS + ", ".join([_RAW_ROW] * len(rows))), params)
    write_blobs(cur, drv, rows, now)


# PostgreSQL: the fence check (and the step it moves to) and the rows in one
# statement, one round trip. A data-modifying WITH runs once whatever reads
# it; the rows go in only if it matched, in the order of their VALUES.
_PG_FENCED_INSERT = (
    "WITH held AS ({touch} RETURNING 1) "
    "INSERT INTO checkpoints"
    " (execution_id, key, step, event, state, snapshot, fence, created_at, delta)"
    " SELECT v.e, v.k, v.s, v.ev, v.st, v.sn, %s, v.at, v.d FROM unnest(%b::text[], %b::text[],"
    " %b::integer[], %b::text[], %b::text[], %b::bytea[], %b::timestamp[], %b::integer[])"
    " WITH ORDINALITY AS v(e, k, s, ev, st, sn, at, d, o)"
    " WHERE EXISTS (SELECT 1 FROM held) ORDER BY v.o"
)


def _row_arrays(drv: eng.Driver, rows: Sequence[CheckpointRow], now: Any) -> list[list[Any]]:
    """The rows' columns as arrays (PostgreSQL): a statement of one fixed text
    whatever the number of rows, so the driver neither parses nor plans it anew.
    The arrays go in binary (``%b``): the driver's text form of an array escapes
    each element in Python (about 17 ms for a thousand snapshots, against 1)."""
    return [
        [r.execution_id for r in rows],
        [r.key for r in rows],
        [r.step for r in rows],
        [r.event for r in rows],
        [r.state for r in rows],
        [r.snapshot for r in rows],
        [now if r.at is None else drv.time(r.at) for r in rows],
        [r.delta for r in rows],
    ]


def fenced_insert(
    cur: Any,
    drv: eng.Driver,
    owner_id: str,
    fence: int,
    rows: Sequence[CheckpointRow],
    now: Any,
) -> None:
    """The fence check of a checkpoint write, which also moves the execution's
    step and current state to the newest of ``rows``, then the rows: one
    statement on PostgreSQL. LeaseLost (nothing written) if not held."""
    touch, params = _touch(owner_id, fence, rows, now)
    if rows and drv.dialect.name == "postgresql":
        sql = _PG_FENCED_INSERT.format(touch=drv.sql(touch))
        cur.execute(sql, (*params, fence, *_row_arrays(drv, rows, now)))
        if cur.rowcount != len(rows):
            raise LeaseLost(owner_id, fence)
        write_blobs(cur, drv, rows, now)
        return
    cur.execute(drv.sql(touch), params)
    if cur.rowcount != 1:
        raise LeaseLost(owner_id, fence)
    insert_checkpoints(cur, drv, rows, fence, now)


# an execution's outcome, fenced, and its worker's count of them
RAW_FINISH = (
    "UPDATE executions SET status = ?, output = {json}, error = ?, lease_until = NULL,"
    f" updated_at = ?, finished_at = ? {RAW_HELD}"
)
RAW_COUNT = "UPDATE workers SET {col} = {col} + 1 WHERE id = ?"
_RAW_COUNT_N = "UPDATE workers SET completed = completed + ? WHERE id = ?"


class FencedWrite:
    """A checkpoint commit (rows under the owner's fence), and perhaps the
    owner's completion, as data: alone, it is a few statements; a batch of
    them on PostgreSQL is one statement (``run_merged``)."""

    __slots__ = ("drv", "owner_id", "fence", "rows", "first", "completes", "output", "worker_id")

    def __init__(
        self,
        drv: eng.Driver,
        owner_id: str,
        fence: int,
        rows: Sequence[CheckpointRow],
        first: str | None = None,
        *,
        completes: bool = False,
        output: str | None = None,
        worker_id: str | None = None,
    ):
        self.drv = drv
        self.owner_id = owner_id
        self.fence = fence
        self.rows = rows
        self.first = first  # run first in the transaction (a progress commit's setting)
        # the owner completes with ``output`` (JSON text), counted for its worker
        self.completes = completes
        self.output = output
        self.worker_id = worker_id

    def __call__(self, cur: Any) -> None:
        drv = self.drv
        if self.first:
            cur.execute(self.first)
        now = drv.time(utcnow())
        if self.rows or not self.completes:
            fenced_insert(cur, drv, self.owner_id, self.fence, self.rows, now)
        if self.completes:
            finish = drv.sql(RAW_FINISH.format(json=drv.dialect.json_param))
            held = (self.owner_id, self.fence)
            cur.execute(finish, ("completed", self.output, None, now, now, *held))
            if cur.rowcount != 1:
                raise LeaseLost(self.owner_id, self.fence)
            cur.execute(drv.sql(RAW_COUNT.format(col="completed")), (self.worker_id,))


# PostgreSQL: a batch of checkpoint commits (and completions) of different
# executions in one statement. ``w`` holds each owner's fence, where it moves
# to and whether it completes; ``held`` the owners whose fence holds (moved);
# only their rows go in, in order, and their workers count their completions.
# Its status check is written so that no index on status can serve it: from no
# statistics (a new table) or statistics taken while every row was queued,
# `status = 'running'` looks like one row, and the planner walked the running
# rows (and their dead index entries) through a status index for each batch:
# 114 ms a batch at 1,000 in flight, 17-23 s of server CPU in W6. Now it
# probes the primary key, or scans a table small enough to scan.
_PG_MERGED = (
    "WITH w AS (SELECT * FROM unnest(%b::text[], %b::bigint[], %b::integer[], %b::text[],"
    " %b::boolean[], %b::boolean[], %b::boolean[], %b::text[], %b::text[])"
    " AS w(id, fence, step, state, set_step, set_state, done, output, worker)),"
    " held AS (UPDATE executions e SET updated_at = %s,"
    " step = CASE WHEN w.set_step THEN w.step ELSE e.step END,"
    " current_state = CASE WHEN w.set_state THEN w.state ELSE e.current_state END,"
    " status = CASE WHEN w.done THEN 'completed' ELSE e.status END,"
    " output = CASE WHEN w.done THEN CAST(w.output AS json) ELSE e.output END,"
    " error = CASE WHEN w.done THEN NULL ELSE e.error END,"
    " lease_until = CASE WHEN w.done THEN NULL ELSE e.lease_until END,"
    " finished_at = CASE WHEN w.done THEN %s ELSE e.finished_at END"
    " FROM w WHERE e.id = w.id AND e.fence = w.fence AND (e.status = 'running') IS TRUE"
    " RETURNING e.id),"
    " ins AS (INSERT INTO checkpoints"
    " (execution_id, key, step, event, state, snapshot, fence, created_at, delta)"
    " SELECT v.e, v.k, v.s, v.ev, v.st, v.sn, v.f, v.at, v.d FROM unnest(%b::text[], %b::text[],"
    " %b::text[], %b::integer[], %b::text[], %b::text[], %b::bytea[], %b::bigint[],"
    " %b::timestamp[], %b::integer[]) WITH ORDINALITY AS v(owner, e, k, s, ev, st, sn, f, at, d, o)"
    " WHERE v.owner IN (SELECT id FROM held) ORDER BY v.o),"
    " counted AS (UPDATE workers k SET completed = k.completed + c.n FROM"
    " (SELECT w.worker, count(*) AS n FROM w JOIN held ON held.id = w.id WHERE w.done"
    " GROUP BY w.worker) c WHERE k.id = c.worker)"
    " SELECT id FROM held"
)


def _merges(f: Any) -> bool:
    # a write with blobs runs its own statements (in the batch's transaction)
    return (
        isinstance(f, FencedWrite)
        and bool(f.rows or f.completes)
        and not any(r.blobs for r in f.rows)
    )


def mergeable(drv: eng.Driver, fns: Sequence[Any]) -> bool:
    """Whether ``run_merged`` should carry this batch: two or more checkpoint
    commits of different executions."""
    owners = [f.owner_id for f in fns if _merges(f)]
    return len(owners) >= 2 and len(set(owners)) == len(owners)


def _owner(f: FencedWrite) -> tuple:
    """A merged write's owner: id, fence, the step and state it moves to and
    whether each is set, whether it completes, its output and its worker."""
    moved = moved_to(f.owner_id, f.rows)
    step, state = moved if moved is not None else (0, None)
    set_state = moved is not None and state is not None
    return (f.owner_id, f.fence, step, state, moved is not None, set_state) + (
        f.completes,
        f.output,
        f.worker_id,
    )


# SQLite: the fenced updates of a batch in one statement, its owners' columns
# as one JSON parameter (a statement of one text whatever the batch's size, so
# it is compiled once). Each statement a store thread runs lets go of the GIL
# and must take it back from a busy event loop, a wait of up to the switch
# interval: a batch of 130 writes, two statements each, took 50-650 ms beside a
# busy loop against 7 ms alone. Its status check keeps the status indexes out,
# so each owner is found by primary key, the JSON the outer loop.
# An owner ([id, fence, ...], as w) that still holds its execution:
_SQLITE_HOLDS = (
    "executions.id = w.value->>0 AND executions.fence = w.value->>1"
    " AND +executions.status = 'running'"
)
_SQLITE_MERGED = (
    "UPDATE executions SET updated_at = ?1,"
    " step = CASE WHEN w.value->>4 THEN w.value->>2 ELSE executions.step END,"
    " current_state = CASE WHEN w.value->>5 THEN w.value->>3 ELSE executions.current_state END,"
    " status = CASE WHEN w.value->>6 THEN 'completed' ELSE executions.status END,"
    " output = CASE WHEN w.value->>6 THEN w.value->>7 ELSE executions.output END,"
    " error = CASE WHEN w.value->>6 THEN NULL ELSE executions.error END,"
    " lease_until = CASE WHEN w.value->>6 THEN NULL ELSE executions.lease_until END,"
    " finished_at = CASE WHEN w.value->>6 THEN ?1 ELSE executions.finished_at END"
    " FROM json_each(?2) AS w WHERE " + _SQLITE_HOLDS
)
# ... and its rows in a few multi-row inserts of power-of-two sizes, in order
_SQLITE_CHUNK = 256
# the positions (in the owners' JSON) of the owners that still hold their
# executions: each found by primary key, the JSON the outer loop
_SQLITE_HELD = (
    "SELECT json_group_array(w.key) FROM json_each(?1) AS w CROSS JOIN executions"
    " WHERE " + _SQLITE_HOLDS
)


class StaleOwner(Exception):
    """SQLite: an owner of a merged batch no longer holds its execution (it was
    cancelled or recovered); the batch rolls back, to run again with
    ``run_merged(..., sort=True)``."""


def _sqlite_merged(
    cur: Any, drv: eng.Driver, fns: Sequence[Any], merged: list[int], sort: bool
) -> set[str] | None:
    """The merged writes of a batch on SQLite. Without ``sort``: all held
    (None), or ``StaleOwner``. With it: the owners that still hold their
    executions are found first, their writes commit, and their ids come back;
    the others write nothing (each gets its ``LeaseLost``)."""
    owners = [_owner(fns[i]) for i in merged]
    held: set[str] | None = None
    if sort:
        text = cur.execute(_SQLITE_HELD, (json.dumps([o[:2] for o in owners]),)).fetchone()[0]
        keep = set(json.loads(text))
        merged = [i for k, i in enumerate(merged) if k in keep]
        owners = [o for k, o in enumerate(owners) if k in keep]
        held = {fns[i].owner_id for i in merged}
        if not merged:
            return held
    now = drv.time(utcnow())
    params: list[Any] = []
    counts: dict[str, int] = {}
    for i in merged:
        f = fns[i]
        if f.completes:
            counts[f.worker_id] = counts.get(f.worker_id, 0) + 1
        params += _row_params(drv, f.rows, f.fence, now)
    cur.execute(_SQLITE_MERGED, (now, json.dumps(owners)))
    if cur.rowcount != len(merged):
        if not sort:
            raise StaleOwner()
        # not seen: the write lock is held from the read on (BEGIN IMMEDIATE)
        first = merged[0]
        raise eng.BatchItemFailed(first, LeaseLost(fns[first].owner_id, fns[first].fence))
    width = len(_RAW_ROW.split(","))
    left = len(params) // width
    start = 0
    while left:
        size = min(_SQLITE_CHUNK, 1 << (left.bit_length() - 1))
        end = start + size * width
        cur.execute(_RAW_INSERT_CHECKPOINTS + ", ".join([_RAW_ROW] * size), params[start:end])
        start, left = end, left - size
    for worker, n in counts.items():
        cur.execute(_RAW_COUNT_N, (n, worker))
    return held


def run_merged(
    cur: Any, drv: eng.Driver, fns: Sequence[Any], *, sort: bool = False
) -> list[tuple[bool, Any]]:
    """A batch (``mergeable``) in one transaction: its checkpoint commits in one
    statement, then the other writes in order. A checkpoint commit whose fence
    moved on writes nothing and gets its ``LeaseLost``; the rest commit. Any
    other write's own error raises ``BatchItemFailed`` (the batch rolls back).
    On SQLite a fence that moved on raises ``StaleOwner`` unless ``sort``: the
    statement that tells who holds what runs only when someone does not."""
    merged = {i for i, f in enumerate(fns) if _merges(f)}
    for first in sorted({fns[i].first for i in merged} - {None}):
        cur.execute(first)
    if drv.dialect.name == "sqlite":
        held = _sqlite_merged(cur, drv, fns, sorted(merged), sort)
        return _the_rest(cur, fns, merged, held=held)
    now = drv.time(utcnow())
    owners: list[list[Any]] = [[] for _ in range(9)]
    rows: list[list[Any]] = [[] for _ in range(10)]
    for i in sorted(merged):
        f = fns[i]
        for column, value in zip(owners, _owner(f), strict=True):
            column.append(value)
        for r in f.rows:
            at = now if r.at is None else drv.time(r.at)
            for column, value in zip(
                rows,
                (f.owner_id, r.execution_id, r.key, r.step, r.event, r.state, r.snapshot)
                + (f.fence, at, r.delta),
                strict=True,
            ):
                column.append(value)
    cur.execute(_PG_MERGED, (*owners, now, now, *rows))
    return _the_rest(cur, fns, merged, held={r[0] for r in cur.fetchall()})


def _the_rest(
    cur: Any, fns: Sequence[Any], merged: set[int], *, held: set[str] | None
) -> list[tuple[bool, Any]]:
    """Each write's outcome: a merged one's from ``held`` (None: all held), the
    others run now, in order."""
    out: list[tuple[bool, Any]] = []
    for i, f in enumerate(fns):
        if i in merged:
            ok = held is None or f.owner_id in held
            out.append((True, None) if ok else (False, LeaseLost(f.owner_id, f.fence)))
            continue
        try:
            out.append((True, f(cur)))
        except Exception as exc:
            if classify(exc) is not None:
                raise
            raise eng.BatchItemFailed(i, exc) from exc
    return out
