"""Every query the orchestrator runs, as the domain's verbs.

The whole concurrency story lives here: ``claim`` (one runnable row, fence += 1),
``renew_leases``, ``save_checkpoint`` (refused unless the row still holds the
caller's fence) and ``finish`` / ``release`` (likewise fenced).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ..clock import lease_deadline, utcnow
from ..errors import ExecutionNotFound, LeaseLost, UserError
from ..settings import Settings
from . import engine as eng
from . import work
from .models import (
    FINAL_STATUSES,
    checkpoints,
    configs,
    executions,
    leader_leases,
    queues,
    scaling_events,
    schedules,
    workers,
)


@dataclass(frozen=True, slots=True)
class Execution:
    id: str
    machine: str
    config_hash: str
    queue: str
    priority: int
    status: str
    input: dict[str, Any]
    output: Any
    error: str | None
    attempt: int
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float
    recoveries: int
    not_before: datetime | None
    parent_id: str | None
    worker_id: str | None
    lease_until: datetime | None
    fence: int
    current_state: str | None
    step: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Execution:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass(frozen=True, slots=True)
class NewExecution:
    """What a submit puts in: the caller's side of an executions row."""

    id: str
    machine: str
    config_hash: str
    input: dict[str, Any]
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 1
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    not_before: datetime | None = None
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """A lease on one execution: valid while the row's fence equals ``fence``."""

    execution: Execution
    worker_id: str
    fence: int
    recovered: bool  # taken over from an expired lease
    # when this process took it (time.monotonic), to know a lease is still young
    taken_at: float = field(default_factory=time.monotonic, compare=False)


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    """One snapshot to write: the library's key and its parsed header fields."""

    execution_id: str
    key: str
    step: int
    event: str
    state: str | None
    snapshot: bytes
    # when the machine took it (naive UTC); None: when it commits
    at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    step: int
    event: str
    state: str | None
    at: datetime


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    status: str
    started_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None
    running: int
    completed: int
    failed: int

    @classmethod
    def from_row(cls, row: Any) -> WorkerRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


T = TypeVar("T")


def _held(execution_id: Any, fence: Any) -> sa.ColumnElement[bool]:
    """The row is still running under this claim: the condition of every fenced write."""
    return sa.and_(
        executions.c.id == execution_id,
        executions.c.fence == fence,
        executions.c.status == "running",
    )


# The claim's statements, built once: SQLAlchemy then reuses their compiled
# form instead of building and keying new statements per claim.
_QUEUES = sa.bindparam("b_queues", expanding=True)
_RUNNABLE_EXPIRED = (
    sa.select(executions.c.id, executions.c.recoveries)
    .where(
        executions.c.queue.in_(_QUEUES),
        executions.c.status == "running",
        executions.c.lease_until < sa.bindparam("b_now"),
    )
    .order_by(executions.c.lease_until)
    .limit(1)
    .with_for_update(skip_locked=True)
)
_RUNNABLE_QUEUED = (
    sa.select(executions.c.id, executions.c.recoveries)
    .where(
        executions.c.queue.in_(_QUEUES),
        executions.c.status == "queued",
        sa.or_(executions.c.not_before.is_(None), executions.c.not_before <= sa.bindparam("b_now")),
    )
    # ties in created_at (a batch submit) are left to the index order: sorting
    # them by id would make every claim sort the whole batch
    .order_by(executions.c.priority.desc(), executions.c.created_at)
    .limit(1)
    .with_for_update(skip_locked=True)
)
_TAKE = (
    sa.update(executions)
    .where(executions.c.id == sa.bindparam("b_id"))
    .values(
        status="running",
        worker_id=sa.bindparam("b_worker"),
        lease_until=sa.bindparam("b_lease_until"),
        fence=executions.c.fence + 1,
        recoveries=executions.c.recoveries + sa.bindparam("b_recovered"),
        not_before=None,
        started_at=sa.func.coalesce(executions.c.started_at, sa.bindparam("b_now")),
        updated_at=sa.bindparam("b_now"),
    )
    .returning(*executions.c)
)


# The hot path on the driver's cursor (engine.Driver): a checkpoint commit and
# the outcome. Same statements as the Core ones above, without the Core.
_RAW_HELD = "WHERE id = ? AND fence = ? AND status = 'running'"
_RAW_SAVE_STEP_AND_STATE = (
    f"UPDATE executions SET updated_at = ?, step = ?, current_state = ? {_RAW_HELD}"
)
_RAW_SAVE_STEP = f"UPDATE executions SET updated_at = ?, step = ? {_RAW_HELD}"
_RAW_SAVE_TOUCH = f"UPDATE executions SET updated_at = ? {_RAW_HELD}"
_RAW_INSERT_CHECKPOINT = (
    "INSERT INTO checkpoints (execution_id, key, step, event, state, snapshot, fence, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_RAW_FINISH = (
    "UPDATE executions SET status = ?, output = {json}, error = ?, lease_until = NULL,"
    f" updated_at = ?, finished_at = ? {_RAW_HELD}"
)
_RAW_COUNT = "UPDATE workers SET {col} = {col} + 1 WHERE id = ?"


def _fenced_touch(
    cur: Any,
    drv: eng.Driver,
    owner_id: str,
    fence: int,
    rows: Sequence[CheckpointRow],
    now: Any,
) -> None:
    """The fence check of a checkpoint write, which also moves the execution's
    step and current state to the newest of ``rows``. LeaseLost if not held."""
    own = [r for r in rows if r.execution_id == owner_id]
    # an inline child's rows only prove the fence on the owner's row
    sql, params = _RAW_SAVE_TOUCH, (now, owner_id, fence)
    if own:
        # machine_start/machine_end name pseudo-states ('start', 'end'): keep the last real one
        real = [r for r in own if r.event not in ("machine_start", "machine_end")]
        if real:
            sql, params = (
                _RAW_SAVE_STEP_AND_STATE,
                (now, real[-1].step, real[-1].state) + params[1:],
            )
        else:
            sql, params = _RAW_SAVE_STEP, (now, own[-1].step) + params[1:]
    cur.execute(drv.sql(sql), params)
    if cur.rowcount != 1:
        raise LeaseLost(owner_id, fence)


def _insert_checkpoints(
    cur: Any, drv: eng.Driver, rows: Sequence[CheckpointRow], fence: int, now: Any
) -> None:
    # in order: ids follow the save order (latest = max id). A marker that
    # waited for this commit keeps the time it was taken, for the timeline.
    cur.executemany(
        drv.sql(_RAW_INSERT_CHECKPOINT),
        [
            (r.execution_id, r.key, r.step, r.event, r.state, r.snapshot, fence)
            + (now if r.at is None else drv.time(r.at),)
            for r in rows
        ],
    )


class Store:
    """The shared store: one engine, every query.

    The API is async; each transaction runs whole, synchronously, on one of the
    store's threads (one hop per transaction instead of one per statement).
    """

    def __init__(self, url: sa.URL, settings: Settings, *, patience: float | None = None):
        self.url = url
        # seconds a transaction waits out a store that does not answer
        self.patience = settings.store_patience if patience is None else patience
        busy = settings.sqlite_busy_timeout_ms
        self.engine = eng.create_engine(url, synchronous=settings.sqlite_synchronous, busy_ms=busy)
        # Progress markers (a checkpoint that is not a durability point) commit
        # without waiting for the disk. The next durable commit flushes the log
        # up to and including them, so nothing durable ever depends on them.
        self.progress_engine = (
            eng.create_engine(url, synchronous="OFF", busy_ms=busy)
            if url.get_backend_name() == "sqlite"
            else self.engine
        )
        self.settings = settings
        self.dialect = url.get_backend_name()
        self.driver = eng.Driver(self.engine, patience=self.patience)
        self.progress_driver = eng.Driver(self.progress_engine, patience=self.patience)
        # a JSON value goes in as text; PostgreSQL's json column wants it cast
        self._json_param = "?" if self.dialect == "sqlite" else "CAST(? AS json)"
        self._threads = ThreadPoolExecutor(eng.POOL_SIZE, thread_name_prefix="store")

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, settings: Settings | None = None, *, migrate: bool = True) -> Store:
        """Connect, check the database is usable, and bring the schema to head."""
        settings = settings or Settings()
        url = eng.parse_url(settings.database_url)
        path = eng.sqlite_path(url)
        if path is not None:
            eng.check_sqlite_writable(path)
        store = cls(url, settings)
        try:
            with eng.translate_connect_errors(url):
                # first contact fails fast: a caller that wants to wait for the
                # database (a worker) retries the open itself
                revision = await store._run(eng.current_revision, write=False, patience=0)
                if revision != eng.head_revision():
                    if not migrate:
                        raise UserError(
                            f"{eng.masked(url)} has no current schema: run `orch db upgrade`"
                        )
                    await store.upgrade()
        except BaseException:
            await store.close()
            raise
        return store

    @classmethod
    def lazy(cls, settings: Settings, *, patience: float | None = None) -> Store:
        """A store that connects on first use, for a process that already opened
        (and migrated) one: a database away at that moment is met per call."""
        return cls(eng.parse_url(settings.database_url), settings, patience=patience)

    async def close(self) -> None:
        def dispose() -> None:
            self.engine.dispose()
            self.progress_engine.dispose()

        await asyncio.get_running_loop().run_in_executor(self._threads, dispose)
        self._threads.shutdown(wait=True)

    async def upgrade(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._threads,
            lambda: eng.upgrade(
                self.url,
                synchronous=self.settings.sqlite_synchronous,
                busy_ms=self.settings.sqlite_busy_timeout_ms,
            ),
        )

    async def _run(
        self,
        fn: Callable[[sa.Connection], T],
        *,
        write: bool,
        durable: bool = True,
        patience: float | None = None,
    ) -> T:
        engine = self.engine if durable else self.progress_engine
        wait = self.patience if patience is None else patience
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, lambda: eng.run_transaction(engine, fn, write=write, patience=wait)
        )

    async def _loop_run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn)

    async def _write(self, fn: Callable[[sa.Connection], T]) -> T:
        return await self._run(fn, write=True)

    async def _read(self, fn: Callable[[sa.Connection], T]) -> T:
        return await self._run(fn, write=False)

    def _insert(self, table: sa.Table):
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    # -------------------------------------------------------------- configs

    async def put_config(self, config_hash: str, machine_name: str, raw: str) -> str:
        stmt = (
            self._insert(configs)
            .values(hash=config_hash, machine_name=machine_name, raw=raw, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["hash"])
        )

        def tx(conn: sa.Connection) -> None:
            conn.execute(stmt)

        await self._write(tx)
        return config_hash

    async def get_config(self, config_hash: str) -> str | None:
        def tx(conn: sa.Connection) -> str | None:
            return conn.scalar(sa.select(configs.c.raw).where(configs.c.hash == config_hash))

        return await self._read(tx)

    async def delete_config(self, config_hash: str) -> None:
        def tx(conn: sa.Connection) -> None:
            in_use = sa.select(executions.c.id).where(executions.c.config_hash == config_hash)
            conn.execute(
                sa.delete(configs).where(configs.c.hash == config_hash, ~sa.exists(in_use))
            )

        await self._write(tx)

    # ----------------------------------------------------------- submission

    async def submit(self, new: Sequence[NewExecution]) -> list[tuple[Execution, bool]]:
        """Insert executions; an id that exists already returns the existing row.

        Returns (execution, created) per item, in order, all in one transaction.
        """
        now = utcnow()

        def tx(conn: sa.Connection) -> list[tuple[Execution, bool]]:
            for q in {n.queue for n in new}:
                conn.execute(
                    self._insert(queues)
                    .values(name=q, created_at=now)
                    .on_conflict_do_nothing(index_elements=["name"])
                )
            out = []
            for n in new:
                inserted = conn.execute(
                    self._insert(executions)
                    .values(
                        id=n.id,
                        machine=n.machine,
                        config_hash=n.config_hash,
                        queue=n.queue,
                        priority=n.priority,
                        status="queued",
                        input=n.input,
                        attempt=1,
                        max_attempts=n.max_attempts,
                        retry_backoff=n.retry_backoff,
                        retry_backoff_max=n.retry_backoff_max,
                        recoveries=0,
                        not_before=n.not_before,
                        parent_id=n.parent_id,
                        fence=0,
                        step=0,
                        created_at=now,
                        updated_at=now,
                    )
                    .on_conflict_do_nothing(index_elements=["id"])
                    .returning(*executions.c)
                )
                row = inserted.mappings().first()
                created = row is not None
                if row is None:
                    row = (
                        (conn.execute(sa.select(executions).where(executions.c.id == n.id)))
                        .mappings()
                        .one()
                    )
                out.append((Execution.from_row(row), created))
            return out

        return await self._write(tx)

    # ------------------------------------------------------------- reading

    async def get(self, execution_id: str) -> Execution | None:
        def tx(conn: sa.Connection) -> Execution | None:
            row = (
                (conn.execute(sa.select(executions).where(executions.c.id == execution_id)))
                .mappings()
                .first()
            )
            return Execution.from_row(row) if row else None

        return await self._read(tx)

    async def list_executions(
        self, *, status: str | None = None, queue: str | None = None, limit: int = 50
    ) -> list[Execution]:
        stmt = sa.select(executions).order_by(
            executions.c.created_at.desc(), executions.c.id.desc()
        )
        if status:
            stmt = stmt.where(executions.c.status == status)
        if queue:
            stmt = stmt.where(executions.c.queue == queue)
        stmt = stmt.limit(limit)

        def tx(conn: sa.Connection) -> list[Execution]:
            return [Execution.from_row(r) for r in (conn.execute(stmt)).mappings()]

        return await self._read(tx)

    async def history(self, execution_id: str) -> list[CheckpointRecord]:
        stmt = (
            sa.select(
                checkpoints.c.step,
                checkpoints.c.event,
                checkpoints.c.state,
                checkpoints.c.created_at,
            )
            .where(checkpoints.c.execution_id == execution_id)
            .order_by(checkpoints.c.id)
        )

        def tx(conn: sa.Connection) -> list[CheckpointRecord]:
            return [
                CheckpointRecord(r.step, r.event, r.state, r.created_at) for r in conn.execute(stmt)
            ]

        return await self._read(tx)

    async def count_by_status(self) -> dict[str, int]:
        stmt = sa.select(executions.c.status, sa.func.count()).group_by(executions.c.status)

        def tx(conn: sa.Connection) -> dict[str, int]:
            return {s: n for s, n in conn.execute(stmt)}

        return await self._read(tx)

    # --------------------------------------------------------------- claim

    async def claim(self, worker_id: str, queue_names: Sequence[str]) -> Claim | None:
        """Take the best runnable execution: an expired lease first, else the
        highest-priority, oldest due queued row. One transaction; fence += 1."""
        ttl = self.settings.lease_ttl
        cap = self.settings.max_recoveries

        names = list(queue_names)

        def tx(conn: sa.Connection) -> Claim | None:
            now = utcnow()
            params = {"b_queues": names, "b_now": now}
            while True:
                recovered = True
                row = conn.execute(_RUNNABLE_EXPIRED, params).first()
                if row is None:
                    recovered = False
                    row = conn.execute(_RUNNABLE_QUEUED, params).first()
                if row is None:
                    return None
                if recovered and row.recoveries + 1 > cap:
                    # a poison execution: it has killed its worker too often
                    conn.execute(
                        sa.update(executions)
                        .where(executions.c.id == row.id)
                        .values(
                            status="failed",
                            error=f"crashed its worker {row.recoveries + 1} times "
                            f"(cap ORCH_MAX_RECOVERIES={cap})",
                            lease_until=None,
                            fence=executions.c.fence + 1,
                            finished_at=now,
                            updated_at=now,
                        )
                    )
                    continue
                claimed = (
                    conn.execute(
                        _TAKE,
                        {
                            "b_id": row.id,
                            "b_worker": worker_id,
                            "b_lease_until": lease_deadline(now, ttl),
                            "b_recovered": 1 if recovered else 0,
                            "b_now": now,
                        },
                    )
                    .mappings()
                    .one()
                )
                ex = Execution.from_row(claimed)
                return Claim(ex, worker_id, ex.fence, recovered)

        return await self._write(tx)

    async def renew_leases(
        self, worker_id: str, held: dict[str, int]
    ) -> tuple[set[str], str | None]:
        """Extend every lease this worker still holds and heartbeat the worker.

        Returns (ids whose fence moved on, the worker's status in the store).
        """
        ttl = self.settings.lease_ttl

        def tx(conn: sa.Connection) -> tuple[set[str], str | None]:
            now = utcnow()
            kept: set[str] = set()
            if held:
                result = conn.execute(
                    sa.update(executions)
                    .where(
                        executions.c.worker_id == worker_id,
                        executions.c.status == "running",
                        executions.c.id.in_(list(held)),
                    )
                    .values(lease_until=lease_deadline(now, ttl))
                    .returning(executions.c.id, executions.c.fence)
                )
                kept = {r.id for r in result if held.get(r.id) == r.fence}
            status = conn.scalar(
                sa.update(workers)
                .where(workers.c.id == worker_id)
                .values(
                    last_heartbeat=now,
                    running=len(held),
                    # a worker the reaper gave up on is back (it was paused, say)
                    status=sa.case((workers.c.status == "lost", "active"), else_=workers.c.status),
                )
                .returning(workers.c.status)
            )
            return set(held) - kept, status

        return await self._write(tx)

    async def holds_fence(self, execution_id: str, fence: int) -> bool:
        def tx(conn: sa.Connection) -> bool:
            current = conn.scalar(
                sa.select(executions.c.fence).where(
                    executions.c.id == execution_id, executions.c.status == "running"
                )
            )
            return current == fence

        return await self._read(tx)

    # ---------------------------------------------------------- checkpoints

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
        self, *, owner_id: str, fence: int, rows: Sequence[CheckpointRow], durable: bool = True
    ) -> None:
        """Commit snapshots in order, in one transaction fenced by the owner's claim.

        A snapshot row is also the latest pointer (latest = highest id), so a
        snapshot and its pointer are one insert. A durable save is on disk when
        this returns; a non-durable one (progress markers) may trail it until
        the next durable commit, which flushes the log through it.
        """
        if not rows:
            return
        async_commit = not durable and self.dialect == "postgresql"

        drv = self.driver if durable else self.progress_driver

        def tx(cur: Any) -> None:
            if async_commit:
                cur.execute("SET LOCAL synchronous_commit TO OFF")
            now = drv.time(utcnow())
            _fenced_touch(cur, drv, owner_id, fence, rows, now)
            _insert_checkpoints(cur, drv, rows, fence, now)

        await self._loop_run(lambda: drv.run(tx, write=True))

    async def load_checkpoint(self, execution_id: str, key: str) -> bytes | None:
        stmt = (
            sa.select(checkpoints.c.snapshot)
            .where(checkpoints.c.execution_id == execution_id, checkpoints.c.key == key)
            .order_by(checkpoints.c.id.desc())
            .limit(1)
        )

        def tx(conn: sa.Connection) -> bytes | None:
            return conn.scalar(stmt)

        return await self._read(tx)

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

        return await self._read(tx)

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

        return await self._read(tx)

    async def delete_checkpoints(self, execution_id: str, key: str | None = None) -> None:
        stmt = sa.delete(checkpoints).where(checkpoints.c.execution_id == execution_id)
        if key is not None:
            stmt = stmt.where(checkpoints.c.key == key)

        def tx(conn: sa.Connection) -> None:
            conn.execute(stmt)

        await self._write(tx)

    # ------------------------------------------------------------- outcome

    async def finish(
        self,
        claim: Claim,
        *,
        status: str,
        output: Any = None,
        error: str | None = None,
        checkpoints: Sequence[CheckpointRow] = (),
    ) -> None:
        """Record a final outcome (completed | failed) or park (waiting), fenced.

        ``checkpoints`` not yet written (the run's last progress markers and its
        ``machine_end``) commit in the same transaction, ahead of the outcome."""
        assert status in ("completed", "failed", "waiting")
        counter = {"completed": "completed", "failed": "failed"}.get(status)
        drv = self.driver
        finish = drv.sql(_RAW_FINISH.format(json=self._json_param))
        count = drv.sql(_RAW_COUNT.format(col=counter)) if counter else None
        output_json = None if output is None else json.dumps(output)
        ex_id, fence = claim.execution.id, claim.fence

        def tx(cur: Any) -> None:
            now = drv.time(utcnow())
            finished = None if status == "waiting" else now
            if checkpoints:  # while the row is still running: the fence, step and state
                _fenced_touch(cur, drv, ex_id, fence, checkpoints, now)
                _insert_checkpoints(cur, drv, checkpoints, fence, now)
            cur.execute(finish, (status, output_json, error, now, finished, ex_id, fence))
            if cur.rowcount != 1:
                raise LeaseLost(ex_id, fence)
            if count:
                cur.execute(count, (claim.worker_id,))

        await self._loop_run(lambda: drv.run(tx, write=True))

    async def release(self, claim: Claim) -> bool:
        """Give a running execution back to its queue (drain); it resumes from
        its last checkpoint on the next claim. False if the lease was lost."""

        def tx(conn: sa.Connection) -> bool:
            now = utcnow()
            result = conn.execute(
                sa.update(executions)
                .where(_held(claim.execution.id, claim.fence))
                .values(status="queued", worker_id=None, lease_until=None, updated_at=now)
            )
            return result.rowcount == 1

        return await self._write(tx)

    async def release_orphans(self, worker_id: str, running: Iterable[str]) -> list[str]:
        """Executions the store says this worker holds but it no longer runs go
        back to their queue: a run abandoned because the store stopped answering,
        or a claim whose reply was lost with the connection. They resume from
        their last checkpoint on the next claim (this worker's or another's)."""
        keep = list(running)

        def tx(conn: sa.Connection) -> list[str]:
            stmt = (
                sa.update(executions)
                .where(executions.c.worker_id == worker_id, executions.c.status == "running")
                .values(status="queued", worker_id=None, lease_until=None, updated_at=utcnow())
                .returning(executions.c.id)
            )
            if keep:
                stmt = stmt.where(executions.c.id.not_in(keep))
            return [r.id for r in conn.execute(stmt)]

        return await self._write(tx)

    async def retry_later(self, claim: Claim, *, error: str, delay: float) -> bool:
        """Back to the queue for the next attempt after ``delay`` seconds (fenced).
        It resumes from its last checkpoint. False if the lease was lost."""

        def tx(conn: sa.Connection) -> bool:
            now = utcnow()
            result = conn.execute(
                sa.update(executions)
                .where(_held(claim.execution.id, claim.fence))
                .values(
                    status="queued",
                    attempt=executions.c.attempt + 1,
                    error=error,
                    not_before=now + timedelta(seconds=delay),
                    worker_id=None,
                    lease_until=None,
                    updated_at=now,
                )
            )
            return result.rowcount == 1

        return await self._write(tx)

    async def cancel(self, execution_id: str) -> Execution:
        """Cancel any non-final execution. fence += 1, so a worker running it
        has its next write refused and abandons it."""

        def tx(conn: sa.Connection) -> Execution:
            now = utcnow()
            conn.execute(
                sa.update(executions)
                .where(executions.c.id == execution_id, executions.c.status.not_in(FINAL_STATUSES))
                .values(
                    status="cancelled",
                    fence=executions.c.fence + 1,
                    lease_until=None,
                    finished_at=now,
                    updated_at=now,
                )
            )
            return self._get(conn, execution_id)

        return await self._write(tx)

    async def retry(self, execution_id: str) -> Execution:
        """Queue a failed or cancelled execution again; it resumes from its last
        checkpoint with a fresh attempt."""

        def tx(conn: sa.Connection) -> Execution:
            ex = self._get(conn, execution_id)
            if ex.status not in ("failed", "cancelled"):
                raise UserError(
                    f"execution {execution_id} is {ex.status}: only failed or cancelled "
                    "executions can be retried"
                )
            now = utcnow()
            conn.execute(
                sa.update(executions)
                .where(executions.c.id == execution_id)
                .values(
                    status="queued",
                    attempt=executions.c.attempt + 1,
                    max_attempts=sa.func.max(executions.c.max_attempts, executions.c.attempt + 1)
                    if self.dialect == "sqlite"
                    else sa.func.greatest(executions.c.max_attempts, executions.c.attempt + 1),
                    recoveries=0,
                    not_before=None,
                    worker_id=None,
                    lease_until=None,
                    finished_at=None,
                    updated_at=now,
                )
            )
            return self._get(conn, execution_id)

        return await self._write(tx)

    def _get(self, conn: sa.Connection, execution_id: str) -> Execution:
        row = (
            conn.execute(sa.select(executions).where(executions.c.id == execution_id))
            .mappings()
            .first()
        )
        if row is None:
            raise ExecutionNotFound(execution_id)
        return Execution.from_row(row)

    # -------------------------------------------------------------- reaper

    async def requeue_expired(self) -> tuple[list[str], list[str]]:
        """Running executions whose lease expired go back to their queue
        (recoveries += 1, fence += 1); past the recovery cap they fail.
        Returns (requeued ids, failed ids)."""
        cap = self.settings.max_recoveries

        def tx(conn: sa.Connection) -> tuple[list[str], list[str]]:
            now = utcnow()
            expired = conn.execute(
                sa.select(executions.c.id, executions.c.recoveries)
                .where(executions.c.status == "running", executions.c.lease_until < now)
                .with_for_update(skip_locked=True)
            ).all()
            requeued, failed = [], []
            for row in expired:
                common = dict(
                    fence=executions.c.fence + 1,
                    recoveries=executions.c.recoveries + 1,
                    worker_id=None,
                    lease_until=None,
                    updated_at=now,
                )
                if row.recoveries + 1 > cap:
                    values = dict(
                        common,
                        status="failed",
                        finished_at=now,
                        error=f"crashed its worker {row.recoveries + 1} times "
                        f"(cap ORCH_MAX_RECOVERIES={cap})",
                    )
                    failed.append(row.id)
                else:
                    values = dict(common, status="queued")
                    requeued.append(row.id)
                conn.execute(sa.update(executions).where(executions.c.id == row.id).values(values))
            return requeued, failed

        return await self._write(tx)

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

        return await self._write(tx)

    async def workers_exited(self, host: str, pids: Sequence[int]) -> list[str]:
        """Worker processes known to be dead (their parent reaped them): mark them
        lost and requeue what they held now, without waiting for the leases."""

        def tx(conn: sa.Connection) -> list[str]:
            now = utcnow()
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
                conn.execute(
                    sa.update(executions)
                    .where(executions.c.worker_id.in_(dead), executions.c.status == "running")
                    .values(
                        status="queued",
                        fence=executions.c.fence + 1,
                        recoveries=executions.c.recoveries + 1,
                        worker_id=None,
                        lease_until=None,
                        updated_at=now,
                    )
                )
                work.release_claims(conn, dead)
            return dead

        return await self._write(tx)

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
                    self._insert(leader_leases)
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

        return await self._write(tx)

    async def resign_leadership(self, name: str, holder: str) -> None:
        def tx(conn: sa.Connection) -> None:
            conn.execute(
                sa.update(leader_leases)
                .where(leader_leases.c.name == name, leader_leases.c.holder == holder)
                .values(lease_until=utcnow() - timedelta(seconds=1))
            )

        await self._write(tx)

    async def leader(self, name: str) -> tuple[str, int] | None:
        def tx(conn: sa.Connection) -> tuple[str, int] | None:
            row = conn.execute(
                sa.select(leader_leases).where(
                    leader_leases.c.name == name, leader_leases.c.lease_until >= utcnow()
                )
            ).first()
            return (row.holder, row.fence) if row else None

        return await self._read(tx)

    # ----------------------------------------------------------- schedules

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
    ) -> bool:
        """False if a schedule of that name exists (nothing changes)."""

        def tx(conn: sa.Connection) -> bool:
            now = utcnow()
            conn.execute(
                self._insert(queues)
                .values(name=queue, created_at=now)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            added = conn.scalar(
                self._insert(schedules)
                .values(
                    name=name,
                    machine=machine,
                    config_hash=config_hash,
                    cron=cron,
                    input=input,
                    queue=queue,
                    next_fire_at=next_fire_at,
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(schedules.c.name)
            )
            return added is not None

        return await self._write(tx)

    async def list_schedules(self) -> list[dict[str, Any]]:
        def tx(conn: sa.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(sa.select(schedules).order_by(schedules.c.name)).mappings()
            return [dict(r) for r in rows]

        return await self._read(tx)

    async def remove_schedule(self, name: str) -> bool:
        def tx(conn: sa.Connection) -> bool:
            return conn.execute(sa.delete(schedules).where(schedules.c.name == name)).rowcount == 1

        return await self._write(tx)

    async def fire_due_schedules(
        self, next_fire: Callable[[str, datetime], datetime]
    ) -> list[tuple[str, datetime, Execution]]:
        """Submit one execution per due schedule and move it to its next fire time.

        A schedule that missed several ticks fires once, for the latest missed
        tick. The execution id names the schedule and the tick, so two
        schedulers (or a retried transaction) can never fire a tick twice.
        """

        def tx(conn: sa.Connection) -> list[tuple[str, datetime, Execution]]:
            now = utcnow()
            due = (
                conn.execute(
                    sa.select(schedules)
                    .where(schedules.c.next_fire_at <= now)
                    .with_for_update(skip_locked=True)
                )
                .mappings()
                .all()
            )
            fired = []
            for sch in due:
                tick = sch["next_fire_at"]
                while (following := next_fire(sch["cron"], tick)) <= now:
                    tick = following  # missed ticks collapse into the latest one
                ex_id = f"{sch['name']}@{tick.isoformat(timespec='minutes')}"
                conn.execute(
                    self._insert(executions)
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
                        fence=0,
                        step=0,
                        created_at=now,
                        updated_at=now,
                    )
                    .on_conflict_do_nothing(index_elements=["id"])
                )
                conn.execute(
                    sa.update(schedules)
                    .where(schedules.c.name == sch["name"])
                    .values(last_fired_at=tick, next_fire_at=following)
                )
                fired.append((sch["name"], tick, self._get(conn, ex_id)))
            return fired

        return await self._write(tx)

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

        return await self._write(tx)

    async def queue_exists(self, queue: str) -> bool:
        def tx(conn: sa.Connection) -> bool:
            return conn.scalar(sa.select(queues.c.name).where(queues.c.name == queue)) is not None

        return await self._read(tx)

    async def scaling_snapshot(self) -> list[dict[str, Any]]:
        """Per queue: policy, runnable backlog, running, and live workers
        (active, not draining) with how many of them are idle."""

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
            backlog = (
                sa.select(executions.c.queue, sa.func.count())
                .where(
                    executions.c.status == "queued",
                    sa.or_(executions.c.not_before.is_(None), executions.c.not_before <= now),
                )
                .group_by(executions.c.queue)
            )
            for name, n in conn.execute(backlog):
                if name in out:
                    out[name]["backlog"] = n
            running = (
                sa.select(executions.c.queue, sa.func.count())
                .where(executions.c.status == "running")
                .group_by(executions.c.queue)
            )
            for name, n in conn.execute(running):
                if name in out:
                    out[name]["running"] = n
            live = conn.execute(sa.select(workers).where(workers.c.status == "active")).mappings()
            for w in live:
                names = w["queues"]
                if isinstance(names, str):
                    names = json.loads(names)
                for name in names:
                    if name in out:
                        out[name]["workers"].append(
                            {
                                "id": w["id"],
                                "host": w["host"],
                                "pid": w["pid"],
                                "running": w["running"],
                            }
                        )
            return [out[k] for k in sorted(out)]

        return await self._read(tx)

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

        await self._write(tx)

    async def scaling_history(self, limit: int = 20) -> list[dict[str, Any]]:
        def tx(conn: sa.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                sa.select(scaling_events).order_by(scaling_events.c.id.desc()).limit(limit)
            ).mappings()
            return [dict(r) for r in rows]

        return await self._read(tx)

    async def drain_worker(self, worker_id: str) -> bool:
        """Ask a worker to drain: it sees this with its next heartbeat."""

        def tx(conn: sa.Connection) -> bool:
            result = conn.execute(
                sa.update(workers)
                .where(workers.c.id == worker_id, workers.c.status == "active")
                .values(status="draining")
            )
            return result.rowcount == 1

        return await self._write(tx)

    # ------------------------------------------------------------- workers

    async def register_worker(
        self, worker_id: str, *, host: str, pid: int, queue_names: Iterable[str], concurrency: int
    ) -> None:
        now = utcnow()
        names = sorted(set(queue_names))

        def tx(conn: sa.Connection) -> None:
            for q in names:
                conn.execute(
                    self._insert(queues)
                    .values(name=q, created_at=now)
                    .on_conflict_do_nothing(index_elements=["name"])
                )
            # an upsert: a registration whose reply was lost may be run again
            conn.execute(
                self._insert(workers)
                .values(
                    id=worker_id,
                    host=host,
                    pid=pid,
                    queues=names,
                    concurrency=concurrency,
                    status="active",
                    started_at=now,
                    last_heartbeat=now,
                    running=0,
                    completed=0,
                    failed=0,
                )
                .on_conflict_do_nothing(index_elements=["id"])
            )

        await self._write(tx)

    async def set_worker_status(self, worker_id: str, status: str) -> None:
        assert status in ("active", "draining", "stopped", "lost")

        def tx(conn: sa.Connection) -> None:
            now = utcnow()
            values: dict[str, Any] = {"status": status, "last_heartbeat": now}
            if status == "stopped":
                values.update(stopped_at=now, running=0)
            conn.execute(sa.update(workers).where(workers.c.id == worker_id).values(**values))

        await self._write(tx)

    async def list_workers(self, *, include_stopped: bool = True) -> list[WorkerRecord]:
        stmt = sa.select(workers).order_by(workers.c.started_at.desc())
        if not include_stopped:
            stmt = stmt.where(workers.c.status != "stopped")

        def tx(conn: sa.Connection) -> list[WorkerRecord]:
            return [WorkerRecord.from_row(r) for r in (conn.execute(stmt)).mappings()]

        return await self._read(tx)

    # -------------------------------------------------------------- queues

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

        return await self._read(tx)
