"""Checkpoints: every snapshot an execution's machine takes, fenced by its claim.

A snapshot row is also the latest pointer (latest = highest id), so a snapshot
and its pointer are one insert. The hot path (a checkpoint commit) runs on the
driver's own cursor: a handful of fixed statements, written once.

A row stores what changed since the row before it (snapshots.py); every read
here gives back whole snapshots, read through the row's chain.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ..clock import utcnow
from .db import Database
from .fenced import FencedWrite, fenced_insert, hold
from .models import blobs, checkpoint_blobs, checkpoints
from .records import CheckpointRecord, CheckpointRow, WaitEnd
from .signals import end_wait
from .snapshots import FULL, Decoded, blob_text, decode, hashes_of, parse, row_fields, whole

# checkpoints taken before a state runs (persistence.py): not durable points
PROGRESS_EVENTS = ("machine_start", "state_enter", "execute")


def read_snapshot(conn: sa.Connection, execution_id: str, row_id: int) -> Decoded:
    """The document of checkpoint ``row_id``: its chain, from the full row at
    or before it, applied in order, with the big strings it names."""
    full = (
        sa.select(sa.func.max(checkpoints.c.id))
        .where(
            checkpoints.c.execution_id == execution_id,
            checkpoints.c.id <= row_id,
            checkpoints.c.delta == FULL,
        )
        .scalar_subquery()
    )
    rows = conn.execute(
        sa.select(*_CHAIN_COLUMNS)
        .where(
            checkpoints.c.execution_id == execution_id,
            checkpoints.c.id >= sa.func.coalesce(full, 0),
            checkpoints.c.id <= row_id,
        )
        .order_by(checkpoints.c.id)
    ).all()
    return decode(
        [bytes(r.snapshot) for r in rows],
        lambda hashes: blob_texts(conn, hashes),
        [row_fields(r.step, r.event, r.created_at) for r in rows],
    )


# what a chain's rows are read with: the stored body, and the columns a delta
# may leave its step, event and time to
_CHAIN_COLUMNS = (
    checkpoints.c.snapshot,
    checkpoints.c.step,
    checkpoints.c.event,
    checkpoints.c.created_at,
)


def blob_texts(conn: sa.Connection, hashes: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    todo = sorted(hashes)
    for i in range(0, len(todo), 500):
        for r in conn.execute(
            sa.select(blobs.c.hash, blobs.c.data, blobs.c.codec).where(
                blobs.c.hash.in_(todo[i : i + 500])
            )
        ):
            out[r.hash] = blob_text(bytes(r.data), r.codec)
    return out


def snapshot_bytes(decoded: Decoded) -> bytes:
    """A document as the library writes it (json.dumps' default form)."""
    return json.dumps(decoded.doc).encode("utf-8")


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
            sa.select(checkpoints.c.id)
            .where(checkpoints.c.execution_id == execution_id, checkpoints.c.key == key)
            .order_by(checkpoints.c.id.desc())
            .limit(1)
        )

        def tx(conn: sa.Connection) -> bytes | None:
            row_id = conn.scalar(stmt)
            if row_id is None:
                return None
            return snapshot_bytes(read_snapshot(conn, execution_id, row_id))

        return await self.db.read(tx)

    async def latest_checkpoint(self, execution_id: str) -> tuple[str, bytes] | None:
        latest = await self.latest_decoded(execution_id)
        return (latest[0], snapshot_bytes(latest[1])) if latest else None

    async def latest_decoded(self, execution_id: str) -> tuple[str, Decoded] | None:
        """The latest checkpoint's key and document (and its chain's figures,
        for a writer that goes on from it)."""
        stmt = (
            sa.select(checkpoints.c.key, checkpoints.c.id)
            .where(checkpoints.c.execution_id == execution_id)
            .order_by(checkpoints.c.id.desc())
            .limit(1)
        )

        def tx(conn: sa.Connection) -> tuple[str, Decoded] | None:
            row = (conn.execute(stmt)).first()
            if row is None:
                return None
            return row.key, read_snapshot(conn, execution_id, row.id)

        return await self.db.read(tx)

    async def chain_rows(self, execution_id: str) -> list[tuple[bytes, tuple[int, str, str]]]:
        """The stored rows of the execution's latest chain (full row first),
        each with its step, event and time (``row_fields``)."""
        full = (
            sa.select(sa.func.max(checkpoints.c.id))
            .where(checkpoints.c.execution_id == execution_id, checkpoints.c.delta == FULL)
            .scalar_subquery()
        )
        stmt = (
            sa.select(*_CHAIN_COLUMNS)
            .where(
                checkpoints.c.execution_id == execution_id,
                checkpoints.c.id >= sa.func.coalesce(full, 0),
            )
            .order_by(checkpoints.c.id)
        )

        def tx(conn: sa.Connection) -> list[tuple[bytes, tuple[int, str, str]]]:
            return [
                (bytes(r.snapshot), row_fields(r.step, r.event, r.created_at))
                for r in conn.execute(stmt)
            ]

        return await self.db.read(tx)

    async def trim_history(self, owner_id: str, fence: int, execution_id: str, keep: int) -> int:
        """Let go of an execution's checkpoints before its last ``keep`` durable
        ones (a workflow's history window), under the owner's fence; the rows
        a kept one is read through (its chain) stay. The blobs only the
        removed rows named are unlinked, and removed once nothing links them.
        Returns the rows removed."""
        from .retention import unlink_blobs  # retention reads this module: not above

        durable = checkpoints.c.event.notin_(PROGRESS_EVENTS)
        mine = checkpoints.c.execution_id == execution_id

        def tx(conn: sa.Connection) -> int:
            hold(conn, owner_id, fence)
            cutoff = conn.scalar(
                sa.select(checkpoints.c.id)
                .where(mine, durable)
                .order_by(checkpoints.c.id.desc())
                .offset(keep - 1)
                .limit(1)
            )
            if cutoff is None:
                return 0
            base = conn.scalar(
                sa.select(sa.func.max(checkpoints.c.id)).where(
                    mine, checkpoints.c.id <= cutoff, checkpoints.c.delta == FULL
                )
            )
            if base is None:
                return 0
            gone = conn.execute(sa.delete(checkpoints).where(mine, checkpoints.c.id < base))
            if gone.rowcount and conn.scalar(
                sa.select(sa.literal(1)).where(
                    sa.exists().where(checkpoint_blobs.c.execution_id == execution_id)
                )
            ):
                named = hashes_of(
                    parse(bytes(r.snapshot))
                    for r in conn.execute(sa.select(checkpoints.c.snapshot).where(mine))
                )
                unlink_blobs(conn, execution_id, keep=named)
            return gone.rowcount or 0

        return await self.db.write(tx)

    async def blob_texts(self, hashes: set[str]) -> dict[str, str]:
        return await self.db.read(lambda conn: blob_texts(conn, hashes))

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
            snapshot = snapshot_bytes(read_snapshot(conn, execution_id, r.id))
            return CheckpointRecord(r.step, r.event, r.state, r.created_at, snapshot, seq=r.id)

        return await self.db.read(tx)

    async def latest_snapshot_ids(self) -> list[tuple[str, bytes]]:
        """(execution id, latest snapshot) for every execution with checkpoints."""
        stmt = (
            sa.select(checkpoints.c.execution_id, sa.func.max(checkpoints.c.id).label("id"))
            .group_by(checkpoints.c.execution_id)
            .order_by(checkpoints.c.execution_id)
        )

        def tx(conn: sa.Connection) -> list[tuple[str, bytes]]:
            return [
                (r.execution_id, snapshot_bytes(read_snapshot(conn, r.execution_id, r.id)))
                for r in conn.execute(stmt).all()
            ]

        return await self.db.read(tx)

    async def delete_checkpoints(self, execution_id: str, key: str | None = None) -> None:
        """Delete an execution's checkpoints, or those saved under ``key``. A
        delta row after a deleted one is stored whole first (it was written as
        what changed since the deleted row), so every row left reads back."""
        mine = checkpoints.c.execution_id == execution_id
        stmt = sa.delete(checkpoints).where(mine)
        if key is not None:
            stmt = stmt.where(checkpoints.c.key == key)

        def tx(conn: sa.Connection) -> None:
            if key is not None:
                ids = conn.scalars(
                    sa.select(checkpoints.c.id).where(mine, checkpoints.c.key == key)
                ).all()
                for row_id in ids:
                    after = conn.execute(
                        sa.select(checkpoints.c.id, checkpoints.c.delta)
                        .where(mine, checkpoints.c.id > row_id)
                        .order_by(checkpoints.c.id)
                        .limit(1)
                    ).first()
                    if after is not None and after.delta != FULL and after.id not in ids:
                        doc = read_snapshot(conn, execution_id, after.id)
                        conn.execute(
                            sa.update(checkpoints)
                            .where(checkpoints.c.id == after.id)
                            .values(snapshot=whole(doc.doc, doc.n), delta=FULL)
                        )
            conn.execute(stmt)

        await self.db.write(tx)

    # ------------------------------------------------------------- outcome
