"""Work pools: flatmachines' distributed pattern (WorkBackend / WorkPool) on the store.

The SQL behind ``orchestrator.distributed``. Work items live in ``work_items``;
a claim is one write transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL,
``BEGIN IMMEDIATE`` on SQLite). Claims, completions and failures keep the
claiming worker's row current (current_task_id, running, completed, failed);
the worker registry itself is workers.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..clock import utcnow
from .db import Database
from .models import work_items, workers


@dataclass(frozen=True, slots=True)
class WorkItemRow:
    id: str
    pool: str
    data: Any
    status: str  # pending | claimed | completed | poisoned
    claimed_by: str | None
    claimed_at: datetime | None
    attempts: int
    max_retries: int
    result: Any
    error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> WorkItemRow:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


def _json(value: Any) -> Any:
    """None as SQL NULL (sa.JSON would store the JSON text 'null')."""
    return sa.null() if value is None else value


def _sync_worker(conn: sa.Connection, worker_ids: Sequence[str], **values: Any) -> None:
    """Refresh the running count (items each worker holds claimed) plus ``values``."""
    for worker_id in worker_ids:
        holding = (
            sa.select(sa.func.count())
            .select_from(work_items)
            .where(work_items.c.claimed_by == worker_id, work_items.c.status == "claimed")
            .scalar_subquery()
        )
        conn.execute(
            sa.update(workers).where(workers.c.id == worker_id).values(running=holding, **values)
        )


def _done_with(item_ids: Sequence[str]) -> dict[str, Any]:
    """Clear the worker's current task if it is one of these items."""
    return {
        "current_task_id": sa.case(
            (workers.c.current_task_id.in_(list(item_ids)), None),
            else_=workers.c.current_task_id,
        )
    }


def release_claims(conn: sa.Connection, worker_ids: Sequence[str], pool: str | None = None) -> int:
    """Inside a caller's transaction: every item these workers hold claimed goes
    back to pending (attempts are kept). Returns how many were released."""
    if not worker_ids:
        return 0
    stmt = (
        sa.update(work_items)
        .where(work_items.c.claimed_by.in_(list(worker_ids)), work_items.c.status == "claimed")
        .values(status="pending", claimed_by=None, claimed_at=None, updated_at=utcnow())
    )
    if pool is not None:
        stmt = stmt.where(work_items.c.pool == pool)
    released = [r.id for r in conn.execute(stmt.returning(work_items.c.id))]
    _sync_worker(conn, worker_ids, **_done_with(released))
    return len(released)


class WorkPools:
    def __init__(self, db: Database):
        self.db = db

    async def push_item(
        self, pool: str, data: Any, *, max_retries: int = 3, item_id: str | None = None
    ) -> str:
        def tx(conn: sa.Connection) -> str:
            now = utcnow()
            new_id = item_id or str(uuid.uuid4())
            conn.execute(
                sa.insert(work_items).values(
                    id=new_id,
                    pool=pool,
                    data=data,
                    status="pending",
                    attempts=0,
                    max_retries=max_retries,
                    created_at=now,
                    updated_at=now,
                )
            )
            return new_id

        return await self.db.write(tx)

    async def claim_item(self, pool: str, worker_id: str) -> WorkItemRow | None:
        """Atomically take the oldest pending item of ``pool``: attempts += 1."""

        def tx(conn: sa.Connection) -> WorkItemRow | None:
            now = utcnow()
            while True:
                item_id = conn.scalar(
                    sa.select(work_items.c.id)
                    .where(work_items.c.pool == pool, work_items.c.status == "pending")
                    .order_by(work_items.c.created_at, work_items.c.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if item_id is None:
                    return None
                row = (
                    conn.execute(
                        sa.update(work_items)
                        .where(work_items.c.id == item_id, work_items.c.status == "pending")
                        .values(
                            status="claimed",
                            claimed_by=worker_id,
                            claimed_at=now,
                            attempts=work_items.c.attempts + 1,
                            updated_at=now,
                        )
                        .returning(*work_items.c)
                    )
                    .mappings()
                    .first()
                )
                if row is None:  # taken between the look-up and the update: next one
                    continue
                _sync_worker(conn, [worker_id], current_task_id=item_id)
                return WorkItemRow.from_row(row)

        return await self.db.write(tx)

    async def complete_item(self, pool: str, item_id: str, result: Any = None) -> bool:
        """Mark the item completed with its result (the row stays, for the record).
        False if there is no such item or it was completed already."""

        def tx(conn: sa.Connection) -> bool:
            now = utcnow()
            row = conn.execute(
                sa.update(work_items)
                .where(
                    work_items.c.id == item_id,
                    work_items.c.pool == pool,
                    work_items.c.status != "completed",
                )
                .values(status="completed", result=_json(result), updated_at=now)
                .returning(work_items.c.claimed_by)
            ).first()
            if row is None:
                return False
            if row.claimed_by:
                _sync_worker(
                    conn,
                    [row.claimed_by],
                    completed=workers.c.completed + 1,
                    **_done_with([item_id]),
                )
            return True

        return await self.db.write(tx)

    async def fail_item(self, pool: str, item_id: str, error: str | None = None) -> str | None:
        """Give a failed attempt back to the pool, or poison the item once its
        attempts reach max_retries. Returns the new status; None if there is no
        such item or it was completed already."""

        def tx(conn: sa.Connection) -> str | None:
            now = utcnow()
            row = conn.execute(
                sa.select(work_items.c.attempts, work_items.c.max_retries, work_items.c.claimed_by)
                .where(
                    work_items.c.id == item_id,
                    work_items.c.pool == pool,
                    work_items.c.status != "completed",
                )
                .with_for_update()
            ).first()
            if row is None:
                return None
            if row.attempts >= row.max_retries:
                values: dict[str, Any] = {"status": "poisoned"}
            else:
                values = {"status": "pending", "claimed_by": None, "claimed_at": None}
            conn.execute(
                sa.update(work_items)
                .where(work_items.c.id == item_id)
                .values(error=error, updated_at=now, **values)
            )
            if row.claimed_by:
                _sync_worker(
                    conn,
                    [row.claimed_by],
                    failed=workers.c.failed + 1,
                    **_done_with([item_id]),
                )
            return values["status"]

        return await self.db.write(tx)

    async def count_pending(self, pool: str) -> int:
        def tx(conn: sa.Connection) -> int:
            return conn.scalar(
                sa.select(sa.func.count())
                .select_from(work_items)
                .where(work_items.c.pool == pool, work_items.c.status == "pending")
            )

        return await self.db.read(tx)

    async def release_worker_items(self, pool: str, worker_id: str) -> int:
        def tx(conn: sa.Connection) -> int:
            return release_claims(conn, [worker_id], pool)

        return await self.db.write(tx)

    async def list_items(self, pool: str, *, status: str | None = None) -> list[WorkItemRow]:
        def tx(conn: sa.Connection) -> list[WorkItemRow]:
            stmt = (
                sa.select(work_items)
                .where(work_items.c.pool == pool)
                .order_by(work_items.c.created_at, work_items.c.id)
            )
            if status is not None:
                stmt = stmt.where(work_items.c.status == status)
            return [WorkItemRow.from_row(r) for r in conn.execute(stmt).mappings()]

        return await self.db.read(tx)
