"""flatmachines' distributed-worker backends on the orchestrator's store.

Machines written for flatmachines' ``DistributedWorkerHooks`` (a worker looping
claim → process → complete, a parallelization checker, a stale-worker reaper) run
unchanged on SQLite or PostgreSQL when their hooks get these backends::

    hooks = MyHooks(  # a DistributedWorkerHooks subclass
        registration=StoreRegistrationBackend(store),
        work=StoreWorkBackend(store),
    )

Their workers are rows of the ``workers`` table, so `orch workers` and the TUI
show them (status terminating/terminated is stored as draining/stopped); their
work items are rows of ``work_items``. The SQL is in ``orchestrator.store.workers``
(the registry) and ``orchestrator.store.work`` (the pools).

Differences from flatmachines' SQLite reference backends, none visible through
the protocols: a completed item is kept (status ``completed``, with its result)
instead of deleted; ``complete``/``fail`` of an item that is already completed
raises KeyError, as the reference does once it has deleted the row; claims,
completions and failures also keep the worker row's current task and
running/completed/failed counters up to date.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flatmachines.distributed import WorkerFilter, WorkerRecord, WorkerRegistration
from flatmachines.work import WorkItem

from .clock import utcnow
from .store import Store
from .store import WorkerRecord as StoreWorker
from .store.work import WorkItemRow

__all__ = ["StoreRegistrationBackend", "StoreWorkBackend", "StoreWorkPool"]

# flatmachines' worker statuses → ours, and back
_OURS = {"active": "active", "terminating": "draining", "terminated": "stopped", "lost": "lost"}
_THEIRS = {ours: theirs for theirs, ours in _OURS.items()}


def _our_status(status: str) -> str:
    if status in _OURS:
        return _OURS[status]
    if status in _THEIRS:  # our own name for it is understood too
        return status
    raise ValueError(
        f"unknown worker status {status!r}: expected one of {', '.join(_OURS)}"
        f" (or {', '.join(_THEIRS)})"
    )


def _iso(at: datetime | None) -> str | None:
    """Naive UTC from the store → an aware ISO string, as flatmachines writes them."""
    return at.replace(tzinfo=UTC).isoformat() if at is not None else None


def _naive_utc(iso: str | None) -> datetime | None:
    if not iso:
        return None
    try:
        at = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return at.astimezone(UTC).replace(tzinfo=None) if at.tzinfo else at


def _record(row: StoreWorker) -> WorkerRecord:
    return WorkerRecord(
        worker_id=row.id,
        status=_THEIRS.get(row.status, row.status),
        last_heartbeat=_iso(row.last_heartbeat) or "",
        host=row.host or None,
        pid=row.pid or None,
        capabilities=row.capabilities,
        started_at=_iso(row.started_at),
        current_task_id=row.current_task_id,
        metadata=row.metadata,
    )


def _item(row: WorkItemRow) -> WorkItem:
    return WorkItem(
        id=row.id,
        data=row.data,
        claimed_by=row.claimed_by,
        attempts=row.attempts,
        max_retries=row.max_retries,
        status=row.status,
        created_at=_iso(row.created_at) or "",
        claimed_at=_iso(row.claimed_at),
    )


class StoreRegistrationBackend:
    """flatmachines ``RegistrationBackend`` on the ``workers`` table."""

    def __init__(self, store: Store):
        self._store = store

    async def register(self, worker: WorkerRegistration) -> WorkerRecord:
        row = await self._store.register_worker(
            worker.worker_id,
            host=worker.host or "",
            pid=worker.pid or 0,
            capabilities=worker.capabilities,
            started_at=_naive_utc(worker.started_at) or utcnow(),
        )
        return _record(row)

    async def heartbeat(self, worker_id: str, metadata: dict[str, Any] | None = None) -> None:
        if not await self._store.heartbeat_worker(worker_id, metadata):
            raise KeyError(f"Worker {worker_id} not found")

    async def update_status(self, worker_id: str, status: str) -> None:
        if not await self._store.set_worker_status(worker_id, _our_status(status), heartbeat=False):
            raise KeyError(f"Worker {worker_id} not found")

    async def get(self, worker_id: str) -> WorkerRecord | None:
        row = await self._store.get_worker(worker_id)
        return _record(row) if row else None

    async def list(self, filter: WorkerFilter | None = None) -> list[WorkerRecord]:
        f = filter or WorkerFilter()
        rows = await self._store.list_workers(
            oldest_first=True,
            status=_our_status(f.status) if f.status else None,
            capability=f.capability or None,
            # like the reference backends: a threshold of 0/None means no filter
            silent_for=f.stale_threshold_seconds or None,
        )
        return [_record(r) for r in rows]


class StoreWorkPool:
    """flatmachines ``WorkPool``: one named pool of ``work_items``."""

    def __init__(self, store: Store, name: str):
        self._store = store
        self.name = name

    async def push(self, item: Any, options: dict[str, Any] | None = None) -> str:
        max_retries = int((options or {}).get("max_retries", 3))
        return await self._store.work.push_item(self.name, item, max_retries=max_retries)

    async def claim(self, worker_id: str) -> WorkItem | None:
        row = await self._store.work.claim_item(self.name, worker_id)
        return _item(row) if row else None

    async def complete(self, item_id: str, result: Any | None = None) -> None:
        if not await self._store.work.complete_item(self.name, item_id, result):
            raise KeyError(f"Work item {item_id} not found")

    async def fail(self, item_id: str, error: str | None = None) -> None:
        if await self._store.work.fail_item(self.name, item_id, error) is None:
            raise KeyError(f"Work item {item_id} not found")

    async def size(self) -> int:
        return await self._store.work.count_pending(self.name)

    async def release_by_worker(self, worker_id: str) -> int:
        return await self._store.work.release_worker_items(self.name, worker_id)

    # beyond the protocol: what the pool holds, completed and poisoned items too
    async def items(self, status: str | None = None) -> list[WorkItemRow]:
        return await self._store.work.list_items(self.name, status=status)


class StoreWorkBackend:
    """flatmachines ``WorkBackend``: named pools on the store."""

    def __init__(self, store: Store):
        self._store = store
        self._pools: dict[str, StoreWorkPool] = {}

    def pool(self, name: str) -> StoreWorkPool:
        if name not in self._pools:
            self._pools[name] = StoreWorkPool(self._store, name)
        return self._pools[name]
