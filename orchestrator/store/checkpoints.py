"""Checkpoints: every snapshot an execution's machine takes, fenced by its claim.

A snapshot row is also the latest pointer (latest = highest id), so a snapshot
and its pointer are one insert. The hot path (a checkpoint commit) runs on the
driver's own cursor: a handful of fixed statements, written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ..clock import utcnow
from ..errors import LeaseLost
from . import engine as eng
from .db import Database
from .models import checkpoints
from .records import CheckpointRecord, CheckpointRow, WaitEnd
from .signals import end_wait

# The hot path on the driver's cursor (engine.Driver): a checkpoint commit, and
# (executions.py) the outcome. Every write is fenced by the owner's claim.
RAW_HELD = "WHERE id = ? AND fence = ? AND status = 'running'"
_RAW_SAVE_STEP_AND_STATE = (
    f"UPDATE executions SET updated_at = ?, step = ?, current_state = ? {RAW_HELD}"
)
_RAW_SAVE_STEP = f"UPDATE executions SET updated_at = ?, step = ? {RAW_HELD}"
_RAW_SAVE_TOUCH = f"UPDATE executions SET updated_at = ? {RAW_HELD}"
_RAW_INSERT_CHECKPOINTS = (
    "INSERT INTO checkpoints (execution_id, key, step, event, state, snapshot, fence, created_at)"
    " VALUES "
)
_RAW_ROW = "(?, ?, ?, ?, ?, ?, ?, ?)"


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


def fenced_touch(
    cur: Any,
    drv: eng.Driver,
    owner_id: str,
    fence: int,
    rows: Sequence[CheckpointRow],
    now: Any,
) -> None:
    """The fence check of a checkpoint write, which also moves the execution's
    step and current state to the newest of ``rows``. LeaseLost if not held."""
    sql, params = _touch(owner_id, fence, rows, now)
    cur.execute(drv.sql(sql), params)
    if cur.rowcount != 1:
        raise LeaseLost(owner_id, fence)


def _row_params(drv: eng.Driver, rows: Sequence[CheckpointRow], fence: int, now: Any) -> list:
    # a marker that waited for this commit keeps the time it was taken, for the timeline
    params: list[Any] = []
    for r in rows:
        at = now if r.at is None else drv.time(r.at)
        params += (r.execution_id, r.key, r.step, r.event, r.state, r.snapshot, fence, at)
    return params


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


# PostgreSQL: the fence check (and the step it moves to) and the rows in one
# statement, one round trip. A data-modifying WITH runs once whatever reads
# it; the rows go in only if it matched, in the order of their VALUES.
_PG_FENCED_INSERT = (
    "WITH held AS ({touch} RETURNING 1) "
    "INSERT INTO checkpoints (execution_id, key, step, event, state, snapshot, fence, created_at)"
    " SELECT v.e, v.k, v.s, v.ev, v.st, v.sn, v.f, v.at FROM (VALUES {rows})"
    " AS v(e, k, s, ev, st, sn, f, at, o) WHERE EXISTS (SELECT 1 FROM held) ORDER BY v.o"
)
_PG_ROW = "(%s, %s, %s::integer, %s, %s::text, %s::bytea, %s::bigint, %s::timestamp, {o})"


def fenced_insert(
    cur: Any,
    drv: eng.Driver,
    owner_id: str,
    fence: int,
    rows: Sequence[CheckpointRow],
    now: Any,
) -> None:
    """``fenced_touch`` then ``insert_checkpoints``: one statement on PostgreSQL."""
    if not rows or drv.dialect.name != "postgresql":
        fenced_touch(cur, drv, owner_id, fence, rows, now)
        insert_checkpoints(cur, drv, rows, fence, now)
        return
    touch, params = _touch(owner_id, fence, rows, now)
    values = ", ".join(_PG_ROW.format(o=i) for i in range(len(rows)))
    sql = _PG_FENCED_INSERT.format(touch=drv.sql(touch), rows=values)
    cur.execute(sql, (*params, *_row_params(drv, rows, fence, now)))
    if cur.rowcount != len(rows):
        raise LeaseLost(owner_id, fence)


class Checkpoints:
    def __init__(self, db: Database):
        self.db = db

    async def history(self, execution_id: str) -> list[CheckpointRecord]:
        stmt = (
            sa.select(
                checkpoints.c.step,
                checkpoints.c.event,
                checkpoints.c.state,
                checkpoints.c.created_at,
                checkpoints.c.id,
            )
            .where(checkpoints.c.execution_id == execution_id)
            .order_by(checkpoints.c.id)
        )

        def tx(conn: sa.Connection) -> list[CheckpointRecord]:
            return [
                CheckpointRecord(r.step, r.event, r.state, r.created_at, seq=r.id)
                for r in conn.execute(stmt)
            ]

        return await self.db.read(tx)

    async def save_checkpoint(
        self,
        *,
        owner_id: str,
        fence: int,
        execution_id: str,
        key: str,
        step: int,
        event: str,
        state: str | None,
        snapshot: bytes,
        durable: bool = True,
    ) -> None:
        """Commit one snapshot, fenced by the owning execution's claim (see
        ``save_checkpoints``)."""
        row = CheckpointRow(execution_id, key, step, event, state, snapshot)
        await self.save_checkpoints(owner_id=owner_id, fence=fence, rows=[row], durable=durable)

    async def save_checkpoints(
        self,
        *,
        owner_id: str,
        fence: int,
        rows: Sequence[CheckpointRow],
        durable: bool = True,
        wait: WaitEnd | None = None,
    ) -> None:
        """Commit snapshots in order, in one transaction fenced by the owner's claim.

        A snapshot row is also the latest pointer (latest = highest id), so a
        snapshot and its pointer are one insert. A durable save is on disk when
        this returns; a non-durable one (progress markers) may trail it until
        the next durable commit, which flushes the log through it.
        """
        if not rows and wait is None:
            return
        drv = self.db.driver if durable else self.db.progress_driver
        first = None if durable else self.db.dialect.progress_commit_sql()

        def tx(cur: Any) -> None:
            if first:
                cur.execute(first)
            now = drv.time(utcnow())
            fenced_insert(cur, drv, owner_id, fence, rows, now)
            if wait is not None:  # a wait's state commits: its signal is consumed
                end_wait(cur, drv, owner_id, fence, wait.consumed, now)

        await self.db.on_cursor(tx, durable=durable)

    async def load_checkpoint(self, execution_id: str, key: str) -> bytes | None:
        stmt = (
            sa.select(checkpoints.c.snapshot)
            .where(checkpoints.c.execution_id == execution_id, checkpoints.c.key == key)
            .order_by(checkpoints.c.id.desc())
            .limit(1)
        )

        def tx(conn: sa.Connection) -> bytes | None:
            return conn.scalar(stmt)

        return await self.db.read(tx)

    async def latest_checkpoint(self, execution_id: str) -> tuple[str, bytes] | None:
        stmt = (
            sa.select(checkpoints.c.key, checkpoints.c.snapshot)
            .where(checkpoints.c.execution_id == execution_id)
            .order_by(checkpoints.c.id.desc())
            .limit(1)
        )

        def tx(conn: sa.Connection) -> tuple[str, bytes] | None:
            row = (conn.execute(stmt)).first()
            return (row.key, bytes(row.snapshot)) if row else None

        return await self.db.read(tx)

    async def checkpoint_at(
        self, execution_id: str, step: int | None = None, *, seq: int | None = None
    ) -> CheckpointRecord | None:
        """The last checkpoint of ``step`` (its state_exit, once committed), the
        one numbered ``seq`` (a history entry's), or the latest; with its snapshot."""
        stmt = sa.select(
            checkpoints.c.step,
            checkpoints.c.event,
            checkpoints.c.state,
            checkpoints.c.created_at,
            checkpoints.c.snapshot,
            checkpoints.c.id,
        ).where(checkpoints.c.execution_id == execution_id)
        if step is not None:
            stmt = stmt.where(checkpoints.c.step == step)
        if seq is not None:
            stmt = stmt.where(checkpoints.c.id == seq)
        stmt = stmt.order_by(checkpoints.c.id.desc()).limit(1)

        def tx(conn: sa.Connection) -> CheckpointRecord | None:
            r = conn.execute(stmt).first()
            if r is None:
                return None
            return CheckpointRecord(
                r.step, r.event, r.state, r.created_at, bytes(r.snapshot), seq=r.id
            )

        return await self.db.read(tx)

    async def latest_snapshot_ids(self) -> list[tuple[str, bytes]]:
        """(execution id, latest snapshot) for every execution with checkpoints."""
        latest = (
            sa.select(sa.func.max(checkpoints.c.id).label("id"))
            .group_by(checkpoints.c.execution_id)
            .subquery()
        )
        stmt = (
            sa.select(checkpoints.c.execution_id, checkpoints.c.snapshot)
            .join(latest, latest.c.id == checkpoints.c.id)
            .order_by(checkpoints.c.execution_id)
        )

        def tx(conn: sa.Connection) -> list[tuple[str, bytes]]:
            return [(r.execution_id, bytes(r.snapshot)) for r in conn.execute(stmt)]

        return await self.db.read(tx)

    async def delete_checkpoints(self, execution_id: str, key: str | None = None) -> None:
        stmt = sa.delete(checkpoints).where(checkpoints.c.execution_id == execution_id)
        if key is not None:
            stmt = stmt.where(checkpoints.c.key == key)

        def tx(conn: sa.Connection) -> None:
            conn.execute(stmt)

        await self.db.write(tx)

    # ------------------------------------------------------------- outcome
