"""Workers and leadership: the registry of worker processes, and the leader lease.

One registry for both kinds of worker: an `orch worker` (queues, concurrency)
and a flatmachines distributed-pattern worker (capabilities, metadata, current
task; orchestrator/distributed.py adapts its vocabulary). The leader lease
makes one scheduler of many the leader, fenced like a claim.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from ..clock import lease_deadline, utcnow
from . import work
from .db import Database
from .executions import requeue_held_by
from .models import executions, leader_leases, queues, workers
from .records import WorkerRecord

WORKER_STATUSES = ("active", "draining", "stopped", "lost")


def _json(value: Any) -> Any:
    """None as SQL NULL (sa.JSON would store the JSON text 'null')."""
    return sa.null() if value is None else value


def _get_worker(conn: sa.Connection, worker_id: str) -> WorkerRecord | None:
    row = conn.execute(sa.select(workers).where(workers.c.id == worker_id)).mappings().first()
    return WorkerRecord.from_row(row) if row else None


class Workers:
    def __init__(self, db: Database):
        self.db = db

    # ------------------------------------------------------------ registry

    async def register_worker(
        self,
        worker_id: str,
        *,
        host: str,
        pid: int,
        queue_names: Iterable[str] = (),
        concurrency: int = 1,
        capabilities: list[str] | None = None,
        started_at: datetime | None = None,
        hooks: Iterable[str] | None = None,
    ) -> WorkerRecord:
        """A fresh, active registration: a row with this id is replaced (status,
        times, counters, metadata and current task reset). So a registration
        whose reply was lost with the connection may simply be made again."""
        names = sorted(set(queue_names))

        def tx(conn: sa.Connection) -> WorkerRecord:
            now = utcnow()
            for q in names:
                conn.execute(
                    self.db.insert(queues)
                    .values(name=q, created_at=now)
                    .on_conflict_do_nothing(index_elements=["name"])
                )
            values = dict(
                host=host,
                pid=pid,
                queues=names,
                concurrency=concurrency,
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
                hooks=_json(sorted(hooks) if hooks is not None else None),
            )
            stmt = self.db.insert(workers).values(id=worker_id, **values)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["id"], set_={c: stmt.excluded[c] for c in values}
                )
            )
            row = _get_worker(conn, worker_id)
            assert row is not None
            return row

        return await self.db.write(tx)

    async def heartbeat_worker(
        self, worker_id: str, metadata: dict[str, Any] | None = None
    ) -> bool:
        """Stamp the heartbeat and merge ``metadata`` into the stored metadata.
        False if no such worker."""

        def tx(conn: sa.Connection) -> bool:
            values: dict[str, Any] = {"last_heartbeat": utcnow()}
            if metadata:
                current = conn.execute(
                    sa.select(workers.c["metadata"])
                    .where(workers.c.id == worker_id)
                    .with_for_update()
                ).first()
                if current is None:
                    return False
                values["metadata"] = {**(current[0] or {}), **metadata}
            result = conn.execute(
                sa.update(workers).where(workers.c.id == worker_id).values(values)
            )
            return result.rowcount == 1

        return await self.db.write(tx)

    async def set_worker_status(
        self, worker_id: str, status: str, *, heartbeat: bool = True
    ) -> bool:
        """``stopped`` also stamps stopped_at and clears the running count and
        current task. ``heartbeat``: the worker itself says so (stamp it).
        False if no such worker."""
        if status not in WORKER_STATUSES:
            raise ValueError(f"unknown worker status {status!r}")

        def tx(conn: sa.Connection) -> bool:
            now = utcnow()
            values: dict[str, Any] = {"status": status}
            if heartbeat:
                values["last_heartbeat"] = now
            if status == "stopped":
                values.update(stopped_at=now, running=0, current_task_id=None)
            result = conn.execute(
                sa.update(workers).where(workers.c.id == worker_id).values(**values)
            )
            return result.rowcount == 1

        return await self.db.write(tx)

    async def get_worker(self, worker_id: str) -> WorkerRecord | None:
        return await self.db.read(lambda conn: _get_worker(conn, worker_id))

    async def list_workers(
        self,
        *,
        include_stopped: bool = True,
        status: str | None = None,
        capability: str | None = None,
        silent_for: float | None = None,
        oldest_first: bool = False,
    ) -> list[WorkerRecord]:
        """Workers, newest first (or oldest first). ``silent_for``: only those
        whose last heartbeat is more than that many seconds old."""

        def tx(conn: sa.Connection) -> list[WorkerRecord]:
            if oldest_first:
                stmt = sa.select(workers).order_by(workers.c.started_at, workers.c.id)
            else:
                stmt = sa.select(workers).order_by(workers.c.started_at.desc())
            if not include_stopped:
                stmt = stmt.where(workers.c.status != "stopped")
            if status is not None:
                stmt = stmt.where(workers.c.status == status)
            if silent_for is not None:
                stmt = stmt.where(
                    workers.c.last_heartbeat < utcnow() - timedelta(seconds=silent_for)
                )
            rows = [WorkerRecord.from_row(r) for r in conn.execute(stmt).mappings()]
            if capability is not None:
                rows = [r for r in rows if capability in (r.capabilities or [])]
            return rows

        return await self.db.read(tx)

    async def drain_idle_worker(self, worker_id: str) -> bool:
        """Ask an idle worker to drain (scale down): it sees this with its next
        heartbeat, claims nothing more and exits. False if it is not active or
        holds a running execution now: the scaler's snapshot was older than its
        claim. One that claims after this still finishes what it runs."""

        def tx(conn: sa.Connection) -> bool:
            busy = (
                sa.select(executions.c.id)
                .where(executions.c.worker_id == worker_id, executions.c.status == "running")
                .exists()
            )
            result = conn.execute(
                sa.update(workers)
                .where(workers.c.id == worker_id, workers.c.status == "active", ~busy)
                .values(status="draining")
            )
            return result.rowcount == 1

        return await self.db.write(tx)

    # ---------------------------------------------------------- the reaper

    async def mark_lost_workers(self, silent_for: float) -> list[str]:
        """Workers with no heartbeat for ``silent_for`` seconds become lost."""

        def tx(conn: sa.Connection) -> list[str]:
            now = utcnow()
            result = conn.execute(
                sa.update(workers)
                .where(
                    workers.c.status.in_(("active", "draining")),
                    workers.c.last_heartbeat < now - timedelta(seconds=silent_for),
                )
                .values(status="lost", running=0)
                .returning(workers.c.id)
            )
            lost = [r.id for r in result]
            # work-pool items a lost flatmachines worker held go back to pending
            work.release_claims(conn, lost)
            return lost

        return await self.db.write(tx)

    async def workers_exited(self, host: str, pids: Sequence[int]) -> list[str]:
        """Worker processes known to be dead (their parent reaped them): mark them
        lost and requeue what they held now, without waiting for the leases."""

        def tx(conn: sa.Connection) -> list[str]:
            dead = [
                r.id
                for r in conn.execute(
                    sa.update(workers)
                    .where(
                        workers.c.host == host,
                        workers.c.pid.in_(list(pids)),
                        workers.c.status.in_(("active", "draining")),
                    )
                    .values(status="lost", running=0)
                    .returning(workers.c.id)
                )
            ]
            if dead:
                requeue_held_by(conn, dead, utcnow())
                work.release_claims(conn, dead)
            return dead

        out = await self.db.write(tx)
        await self.db.wake()
        return out

    # ---------------------------------------------------------- leadership

    async def hold_leadership(self, name: str, holder: str, ttl: float) -> int | None:
        """Take or renew the leader lease ``name``. Returns its fence while
        ``holder`` leads, None while someone else holds an unexpired lease."""

        def tx(conn: sa.Connection) -> int | None:
            now = utcnow()
            until = lease_deadline(now, ttl)
            row = conn.execute(
                sa.select(leader_leases).where(leader_leases.c.name == name).with_for_update()
            ).first()
            if row is None:
                fence = conn.scalar(
                    self.db.insert(leader_leases)
                    .values(name=name, holder=holder, fence=1, lease_until=until)
                    .on_conflict_do_nothing(index_elements=["name"])
                    .returning(leader_leases.c.fence)
                )
                if fence is not None:
                    return fence
                # a concurrent first claim won the insert: it may have been ours
                row = conn.execute(
                    sa.select(leader_leases).where(leader_leases.c.name == name)
                ).first()
                return row.fence if row.holder == holder else None
            if row.holder == holder and row.lease_until >= now:
                conn.execute(
                    sa.update(leader_leases)
                    .where(leader_leases.c.name == name, leader_leases.c.fence == row.fence)
                    .values(lease_until=until)
                )
                return row.fence
            if row.lease_until < now:
                taken = conn.execute(
                    sa.update(leader_leases)
                    .where(leader_leases.c.name == name, leader_leases.c.fence == row.fence)
                    .values(holder=holder, fence=row.fence + 1, lease_until=until)
                )
                return row.fence + 1 if taken.rowcount == 1 else None
            return None

        return await self.db.write(tx)

    async def resign_leadership(self, name: str, holder: str) -> None:
        def tx(conn: sa.Connection) -> None:
            conn.execute(
                sa.update(leader_leases)
                .where(leader_leases.c.name == name, leader_leases.c.holder == holder)
                .values(lease_until=utcnow() - timedelta(seconds=1))
            )

        await self.db.write(tx)

    async def leader(self, name: str) -> tuple[str, int] | None:
        def tx(conn: sa.Connection) -> tuple[str, int] | None:
            row = conn.execute(
                sa.select(leader_leases).where(
                    leader_leases.c.name == name, leader_leases.c.lease_until >= utcnow()
                )
            ).first()
            return (row.holder, row.fence) if row else None

        return await self.db.read(tx)
