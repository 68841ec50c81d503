"""Work pools and the worker registry as flatmachines' distributed pattern sees them.

The SQL behind ``orchestrator.distributed`` (flatmachines' RegistrationBackend and
WorkBackend / WorkPool on the store). Everything here speaks our own vocabulary:
worker statuses active | draining | stopped | lost, naive-UTC datetimes; the
flatmachines side (their status names, ISO strings) lives in orchestrator/distributed.py.

A registered flatmachines worker is an ordinary ``workers`` row (so `orch workers`
and the TUI show it): no queues, concurrency 1, its capabilities and metadata in
their JSON columns. Work items live in ``work_items``; a claim is one write
transaction: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite.
Claims, completions and failures keep the claiming worker's row current
(current_task_id, running, completed, failed).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..clock import utcnow
from .models import work_items, workers

if TYPE_CHECKING:
    from .store import Store

WORKER_STATUSES = ("active", "draining", "stopped", "lost")


@dataclass(frozen=True, slots=True)
class WorkerRow:
    id: str
    host: str
    pid: int
    status: str
    capabilities: list[str] | None
    metadata: dict[str, Any] | None
    current_task_id: str | None
    started_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> WorkerRow:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


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


# ----------------------------------------------------------------- registry


async def register_worker(
    store: Store,
    worker_id: str,
    *,
    host: str,
    pid: int,
    capabilities: list[str] | None,
    started_at: datetime | None,
) -> WorkerRow:
    """Insert the worker, or replace a row with the same id: a fresh, active
    registration (status, times, counters, metadata and current task reset)."""

    def tx(conn: sa.Connection) -> WorkerRow:
        now = utcnow()
        stmt = store._insert(workers).values(
            id=worker_id,
            host=host,
            pid=pid,
            queues=[],
            concurrency=1,
            status="active",
            started_at=started_at or now,
            last_heartbeat=now,
            stopped_at=None,
            running=0,
            completed=0,
            failed=0,
            capabilities=_json(capabilities),
            metadata=sa.null(),
            current_task_id=None,
        )
        replaced = (
            "host",
            "pid",
            "queues",
            "concurrency",
            "status",
            "started_at",
            "last_heartbeat",
            "stopped_at",
            "running",
            "completed",
            "failed",
            "capabilities",
            "metadata",
            "current_task_id",
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"], set_={c: stmt.excluded[c] for c in replaced}
        )
        conn.execute(stmt)
        row = _get_worker(conn, worker_id)
        assert row is not None
        return row

    return await store._write(tx)


def _get_worker(conn: sa.Connection, worker_id: str) -> WorkerRow | None:
    row = conn.execute(sa.select(workers).where(workers.c.id == worker_id)).mappings().first()
    return WorkerRow.from_row(row) if row else None


async def heartbeat_worker(
    store: Store, worker_id: str, metadata: dict[str, Any] | None = None
) -> bool:
    """Stamp the heartbeat and merge ``metadata`` into the stored metadata.
    False if no such worker."""

    def tx(conn: sa.Connection) -> bool:
        now = utcnow()
        values: dict[str, Any] = {"last_heartbeat": now}
        if metadata:
            current = conn.execute(
                sa.select(workers.c["metadata"]).where(workers.c.id == worker_id).with_for_update()
            ).first()
            if current is None:
                return False
            values["metadata"] = {**(current[0] or {}), **metadata}
        result = conn.execute(sa.update(workers).where(workers.c.id == worker_id).values(values))
        return result.rowcount == 1

    return await store._write(tx)


async def set_worker_status(store: Store, worker_id: str, status: str) -> bool:
    """Set one of our statuses; ``stopped`` also stamps stopped_at and clears the
    running count. False if no such worker."""
    if status not in WORKER_STATUSES:
        raise ValueError(f"unknown worker status {status!r}")

    def tx(conn: sa.Connection) -> bool:
        values: dict[str, Any] = {"status": status}
        if status == "stopped":
            values.update(stopped_at=utcnow(), running=0, current_task_id=None)
        result = conn.execute(sa.update(workers).where(workers.c.id == worker_id).values(values))
        return result.rowcount == 1

    return await store._write(tx)


async def get_worker(store: Store, worker_id: str) -> WorkerRow | None:
    def tx(conn: sa.Connection) -> WorkerRow | None:
        return _get_worker(conn, worker_id)

    return await store._read(tx)


async def list_workers(
    store: Store,
    *,
    status: str | None = None,
    capability: str | None = None,
    silent_for: float | None = None,
) -> list[WorkerRow]:
    """Every worker in the registry (ours and flatmachines'), oldest first.

    ``silent_for``: only workers whose last heartbeat is more than that many
    seconds old (by the store's clock).
    """

    def tx(conn: sa.Connection) -> list[WorkerRow]:
        stmt = sa.select(workers).order_by(workers.c.started_at, workers.c.id)
        if status is not None:
            stmt = stmt.where(workers.c.status == status)
        if silent_for is not None:
            stmt = stmt.where(workers.c.last_heartbeat < utcnow() - timedelta(seconds=silent_for))
        rows = [WorkerRow.from_row(r) for r in conn.execute(stmt).mappings()]
        if capability is not None:
            rows = [r for r in rows if capability in (r.capabilities or [])]
        return rows

    return await store._read(tx)


# -------------------------------------------------------------------- pools


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


async def push_item(
    store: Store, pool: str, data: Any, *, max_retries: int = 3, item_id: str | None = None
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

    return await store._write(tx)


async def claim_item(store: Store, pool: str, worker_id: str) -> WorkItemRow | None:
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

    return await store._write(tx)


def _done_with(item_ids: Sequence[str]) -> dict[str, Any]:
    """Clear the worker's current task if it is one of these items."""
    return {
        "current_task_id": sa.case(
            (workers.c.current_task_id.in_(list(item_ids)), None),
            else_=workers.c.current_task_id,
        )
    }


async def complete_item(store: Store, pool: str, item_id: str, result: Any = None) -> bool:
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

    return await store._write(tx)


async def fail_item(store: Store, pool: str, item_id: str, error: str | None = None) -> str | None:
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

    return await store._write(tx)


async def count_pending(store: Store, pool: str) -> int:
    def tx(conn: sa.Connection) -> int:
        return conn.scalar(
            sa.select(sa.func.count())
            .select_from(work_items)
            .where(work_items.c.pool == pool, work_items.c.status == "pending")
        )

    return await store._read(tx)


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


async def release_worker_items(store: Store, pool: str, worker_id: str) -> int:
    def tx(conn: sa.Connection) -> int:
        return release_claims(conn, [worker_id], pool)

    return await store._write(tx)


async def list_items(store: Store, pool: str, *, status: str | None = None) -> list[WorkItemRow]:
    def tx(conn: sa.Connection) -> list[WorkItemRow]:
        stmt = (
            sa.select(work_items)
            .where(work_items.c.pool == pool)
            .order_by(work_items.c.created_at, work_items.c.id)
        )
        if status is not None:
            stmt = stmt.where(work_items.c.status == status)
        return [WorkItemRow.from_row(r) for r in conn.execute(stmt).mappings()]

    return await store._read(tx)
