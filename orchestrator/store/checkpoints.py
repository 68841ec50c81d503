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
from .db import Database
from .fenced import FencedWrite, fenced_insert
from .models import checkpoints
from .records import CheckpointRecord, CheckpointRow, WaitEnd
from .signals import end_wait


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
        if wait is None and rows:  # data, so that a batch of them can be one statement
            await self.db.on_cursor(FencedWrite(drv, owner_id, fence, rows, first), durable=durable)
            return

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
