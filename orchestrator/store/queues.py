"""Queues: their pool policy and statistics, scaling events, and cron schedules."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..clock import utcnow
from ..overlap import DEFAULT as DEFAULT_OVERLAP
from ..overlap import cancels, on_tick
from .db import Database
from .executions import config_needs, get_in
from .models import FINAL_STATUSES, executions, queues, scaling_events, schedules, workers
from .records import ScheduleTick


class Queues:
    def __init__(self, db: Database):
        self.db = db

    async def add_schedule(
        self,
        *,
        name: str,
        machine: str,
        config_hash: str,
        cron: str,
        input: dict[str, Any],
        queue: str,
        next_fire_at: datetime,
        overlap: str = DEFAULT_OVERLAP,
    ) -> bool:
        """False if a schedule of that name exists (nothing changes)."""

        def tx(conn: sa.Connection) -> bool:
            now = utcnow()
            conn.execute(
                self.db.insert(queues)
                .values(name=queue, created_at=now)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            added = conn.scalar(
                self.db.insert(schedules)
                .values(
                    name=name,
                    machine=machine,
                    config_hash=config_hash,
                    cron=cron,
                    input=input,
                    queue=queue,
                    next_fire_at=next_fire_at,
                    created_at=now,
                    overlap=overlap,
                )
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(schedules.c.name)
            )
            return added is not None

        return await self.db.write(tx)

    async def list_schedules(self) -> list[dict[str, Any]]:
        def tx(conn: sa.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(sa.select(schedules).order_by(schedules.c.name)).mappings()
            return [dict(r) for r in rows]

        return await self.db.read(tx)

    async def remove_schedule(self, name: str) -> bool:
        def tx(conn: sa.Connection) -> bool:
            return conn.execute(sa.delete(schedules).where(schedules.c.name == name)).rowcount == 1

        return await self.db.write(tx)

    async def fire_due_schedules(
        self, next_fire: Callable[[str, datetime], datetime]
    ) -> list[ScheduleTick]:
        """Submit one execution per due schedule and move it to its next fire time.

        A schedule that missed several ticks fires once, for the latest missed
        tick. The execution id names the schedule and the tick, so two
        schedulers (or a retried transaction) can never fire a tick twice.
        While the schedule's last run (the execution of its last fired tick)
        is unfinished, its overlap policy decides (overlap.py); a tick held by
        ``buffer_one`` or ``cancel_other`` fires on the first pass that finds
        that run finished; ``cancelling`` asks the caller to cancel it.
        """

        def tx(conn: sa.Connection) -> list[ScheduleTick]:
            now = utcnow()
            due = (
                conn.execute(
                    sa.select(schedules)
                    .where(
                        sa.or_(
                            schedules.c.next_fire_at <= now, schedules.c.buffered_at.is_not(None)
                        )
                    )
                    .with_for_update(skip_locked=True)
                )
                .mappings()
                .all()
            )
            ticks = []
            for sch in due:
                changes: dict[str, Any] = {}
                last = sch["last_fired_at"]
                running = _unfinished(conn, _tick_id(sch["name"], last)) if last else None
                held = sch["buffered_at"]
                if held is not None and running is None:
                    ex_id = _fire(self.db, conn, sch, held, now)
                    changes.update(last_fired_at=held, buffered_at=None)
                    ticks.append(ScheduleTick(sch["name"], held, "fired", get_in(conn, ex_id)))
                    running, held = ex_id, None
                if sch["next_fire_at"] <= now:
                    tick = sch["next_fire_at"]
                    while (following := next_fire(sch["cron"], tick)) <= now:
                        tick = following  # missed ticks collapse into the latest one
                    changes["next_fire_at"] = following
                    action = on_tick(
                        sch["overlap"], running=running is not None, buffered=held is not None
                    )
                    if action == "fire":
                        ex_id = _fire(self.db, conn, sch, tick, now)
                        changes["last_fired_at"] = tick
                        ticks.append(ScheduleTick(sch["name"], tick, "fired", get_in(conn, ex_id)))
                    elif action == "buffer":
                        changes["buffered_at"] = held = tick
                        ticks.append(ScheduleTick(sch["name"], tick, "buffered", running=running))
                    else:
                        changes["last_skipped_at"] = tick
                        ticks.append(ScheduleTick(sch["name"], tick, "skipped", running=running))
                if held is not None and cancels(
                    sch["overlap"], running=running is not None, buffered=True
                ):
                    # asked again on every pass until the cancel commits
                    ticks.append(ScheduleTick(sch["name"], held, "cancelling", running=running))
                if changes:
                    conn.execute(
                        sa.update(schedules)
                        .where(schedules.c.name == sch["name"])
                        .values(**changes)
                    )
            return ticks

        out = await self.db.write(tx)
        if any(t.action == "fired" for t in out):
            await self.db.wake()
        return out

    # ------------------------------------------------------------- scaling

    async def set_queue_policy(
        self, queue: str, *, min_workers: int, max_workers: int, per_worker: int | None = None
    ) -> bool:
        """Set a queue's pool policy, creating the queue. True if it existed."""

        def tx(conn: sa.Connection) -> bool:
            now = utcnow()
            existed = conn.scalar(sa.select(queues.c.name).where(queues.c.name == queue))
            values: dict[str, Any] = dict(min_workers=min_workers, max_workers=max_workers)
            if per_worker is not None:
                values["per_worker"] = per_worker
            if existed is None:
                conn.execute(sa.insert(queues).values(name=queue, created_at=now, **values))
            else:
                conn.execute(sa.update(queues).where(queues.c.name == queue).values(**values))
            return existed is not None

        return await self.db.write(tx)

    async def set_queue_paused(self, queue: str, paused: bool) -> bool:
        """Pause (no claim takes its executions) or resume a queue. False if no such queue."""

        def tx(conn: sa.Connection) -> bool:
            result = conn.execute(
                sa.update(queues).where(queues.c.name == queue).values(paused=1 if paused else 0)
            )
            return result.rowcount == 1

        return await self.db.write(tx)

    async def paused_queues(self, names: list[str]) -> set[str]:
        """Which of these queues are paused."""

        def tx(conn: sa.Connection) -> set[str]:
            stmt = sa.select(queues.c.name).where(queues.c.name.in_(names), queues.c.paused != 0)
            return set(conn.scalars(stmt))

        return await self.db.read(tx)

    async def queue_exists(self, queue: str) -> bool:
        def tx(conn: sa.Connection) -> bool:
            return conn.scalar(sa.select(queues.c.name).where(queues.c.name == queue)) is not None

        return await self.db.read(tx)

    async def scaling_snapshot(self) -> list[dict[str, Any]]:
        """Per queue: policy, runnable backlog, what its live workers (active,
        not draining) run, and each of those workers with its running count.

        Running is read from the claims (executions held by a worker), not from
        the worker row's count, which only its next heartbeat brings up to date.
        The workers are read first and the executions in one statement after,
        so a worker that claimed in between is seen busy, not idle."""

        def tx(conn: sa.Connection) -> list[dict[str, Any]]:
            now = utcnow()
            out: dict[str, dict[str, Any]] = {}
            for q in conn.execute(sa.select(queues)).mappings():
                out[q["name"]] = {
                    "queue": q["name"],
                    "min_workers": q["min_workers"],
                    "max_workers": q["max_workers"],
                    "per_worker": q["per_worker"],
                    "last_scaled_at": q["last_scaled_at"],
                    "paused": bool(q["paused"]),
                    "backlog": 0,
                    "running": 0,
                    "workers": [],
                }
            live: dict[str, dict[str, Any]] = {}
            serves: dict[str, list[str]] = {}
            for w in conn.execute(
                sa.select(workers).where(workers.c.status == "active")
            ).mappings():
                names = w["queues"]
                if isinstance(names, str):
                    names = json.loads(names)
                live[w["id"]] = {"id": w["id"], "host": w["host"], "pid": w["pid"], "running": 0}
                serves[w["id"]] = [n for n in names if n in out]
            counts = (
                sa.select(
                    executions.c.queue,
                    executions.c.status,
                    executions.c.worker_id,
                    sa.func.count(),
                )
                .where(
                    sa.or_(
                        executions.c.status == "running",
                        sa.and_(
                            executions.c.status == "queued",
                            sa.or_(
                                executions.c.not_before.is_(None), executions.c.not_before <= now
                            ),
                        ),
                    )
                )
                .group_by(executions.c.queue, executions.c.status, executions.c.worker_id)
            )
            for name, status, worker_id, n in conn.execute(counts):
                if status == "queued":
                    if name in out:
                        out[name]["backlog"] += n
                elif worker_id in live:
                    live[worker_id]["running"] += n
                    if name in out:
                        out[name]["running"] += n
            for worker_id, names in serves.items():
                for name in names:
                    out[name]["workers"].append(dict(live[worker_id]))
            return [out[k] for k in sorted(out)]

        return await self.db.read(tx)

    async def record_scaling(
        self, queue: str, *, from_workers: int, to_workers: int, reason: str
    ) -> None:
        def tx(conn: sa.Connection) -> None:
            now = utcnow()
            conn.execute(
                sa.insert(scaling_events).values(
                    queue=queue,
                    at=now,
                    from_workers=from_workers,
                    to_workers=to_workers,
                    reason=reason,
                )
            )
            conn.execute(sa.update(queues).where(queues.c.name == queue).values(last_scaled_at=now))

        await self.db.write(tx)

    async def scaling_history(self, limit: int = 20) -> list[dict[str, Any]]:
        def tx(conn: sa.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                sa.select(scaling_events).order_by(scaling_events.c.id.desc()).limit(limit)
            ).mappings()
            return [dict(r) for r in rows]

        return await self.db.read(tx)

    async def queue_stats(self) -> list[dict[str, Any]]:
        """Per queue: policy, executions per status, live workers serving it."""

        def tx(conn: sa.Connection) -> list[dict[str, Any]]:
            stats: dict[str, dict[str, Any]] = {}

            def entry(name: str) -> dict[str, Any]:
                return stats.setdefault(
                    name,
                    {
                        "queue": name,
                        "queued": 0,
                        "running": 0,
                        "waiting": 0,
                        "completed": 0,
                        "failed": 0,
                        "cancelled": 0,
                        "workers": 0,
                        "min_workers": 0,
                        "max_workers": 0,
                        "per_worker": 0,
                        "paused": False,
                    },
                )

            for q in (conn.execute(sa.select(queues))).mappings():
                e = entry(q["name"])
                e.update(
                    min_workers=q["min_workers"],
                    max_workers=q["max_workers"],
                    per_worker=q["per_worker"],
                    paused=bool(q["paused"]),
                )
            counts = sa.select(executions.c.queue, executions.c.status, sa.func.count()).group_by(
                executions.c.queue, executions.c.status
            )
            for name, status, n in conn.execute(counts):
                entry(name)[status] = n
            live = sa.select(workers.c.queues).where(workers.c.status.in_(("active", "draining")))
            for (names,) in conn.execute(live):
                if isinstance(names, str):  # JSON stored as text by some drivers
                    names = json.loads(names)
                for name in names:
                    entry(name)["workers"] += 1
            return [stats[k] for k in sorted(stats)]

        return await self.db.read(tx)


def _tick_id(schedule: str, tick: datetime) -> str:
    """The execution id of a schedule's tick."""
    return f"{schedule}@{tick.isoformat(timespec='minutes')}"


def _unfinished(conn: sa.Connection, execution_id: str) -> str | None:
    """``execution_id`` if that execution exists and has not finished."""
    return conn.scalar(
        sa.select(executions.c.id).where(
            executions.c.id == execution_id, executions.c.status.not_in(FINAL_STATUSES)
        )
    )


def _fire(db: Database, conn: sa.Connection, sch: Any, tick: datetime, now: datetime) -> str:
    """Submit a schedule's run for ``tick`` (once: the id names the tick)."""
    ex_id = _tick_id(sch["name"], tick)
    conn.execute(
        db.insert(executions)
        .values(
            id=ex_id,
            machine=sch["machine"],
            config_hash=sch["config_hash"],
            queue=sch["queue"],
            priority=0,
            status="queued",
            input=sch["input"],
            attempt=1,
            max_attempts=1,
            recoveries=0,
            needs=config_needs(sch["config_hash"]),
            fence=0,
            step=0,
            created_at=now,
            updated_at=now,
        )
        .on_conflict_do_nothing(index_elements=["id"])
    )
    return ex_id
