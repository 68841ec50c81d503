"""Executions and their claims: submit, claim, lease, outcome, retry, cancel.

The whole concurrency story of an execution lives here: ``claim`` (one
runnable row, fence += 1), ``renew_leases``, and ``finish`` / ``release`` /
``retry_later``, each refused unless the row still holds the caller's fence.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from ..clock import lease_deadline, utcnow
from ..errors import ExecutionNotFound, LeaseLost, UserError
from ..routing import runnable
from .db import Database
from .fenced import RAW_COUNT, RAW_FINISH, FencedWrite, fenced_insert
from .groups import cancel_descendants, ended, settle_group
from .models import FINAL_STATUSES, configs, executions, queues, workers
from .records import CheckpointRow, Claim, Execution, NewExecution, WaitEnd
from .signals import end_wait, give_back, take_next


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
    sa.select(
        executions.c.id,
        executions.c.recoveries,
        executions.c.parent_group,
        executions.c.group_mode,
    )
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
# the best ``b_limit`` of them, for a claim of several
_RUNNABLE_QUEUED_MANY = _RUNNABLE_QUEUED.limit(sa.bindparam("b_limit"))
# the same, for a worker that runs only some needs (routing.py)
_NEEDS = sa.bindparam("b_needs", expanding=True)
_RUNNABLE_EXPIRED_NEEDS = _RUNNABLE_EXPIRED.where(executions.c.needs.in_(_NEEDS))
_RUNNABLE_QUEUED_NEEDS = (
    sa.select(
        executions.c.id,
        executions.c.recoveries,
        executions.c.priority,
        executions.c.created_at,
    )
    .where(
        executions.c.queue.in_(_QUEUES),
        executions.c.needs == sa.bindparam("b_need"),
        executions.c.status == "queued",
        sa.or_(executions.c.not_before.is_(None), executions.c.not_before <= sa.bindparam("b_now")),
    )
    .order_by(executions.c.priority.desc(), executions.c.created_at)
    .limit(sa.bindparam("b_limit"))
    .with_for_update(skip_locked=True)
)

# timers and deadlines that came due: runnable again, for this very claim
_WAKE_DUE = (
    sa.update(executions)
    .where(
        executions.c.queue.in_(_QUEUES),
        executions.c.status == "waiting",
        executions.c.wake_at <= sa.bindparam("b_now"),
    )
    .values(status="queued", updated_at=sa.bindparam("b_now"))
)
# what a claim sets on the rows it takes
_TAKE_VALUES = dict(
    status="running",
    worker_id=sa.bindparam("b_worker"),
    lease_until=sa.bindparam("b_lease_until"),
    fence=executions.c.fence + 1,
    not_before=None,
    started_at=sa.func.coalesce(executions.c.started_at, sa.bindparam("b_now")),
    updated_at=sa.bindparam("b_now"),
)
# one row (a recovery counts against its cap)
_TAKE = (
    sa.update(executions)
    .where(executions.c.id == sa.bindparam("b_id"))
    .values(**_TAKE_VALUES, recoveries=executions.c.recoveries + sa.bindparam("b_recovered"))
    .returning(*executions.c)
)
# the queued rows a claim of several chose (locked by its select): one statement
_TAKE_QUEUED = (
    sa.update(executions)
    .where(executions.c.id.in_(sa.bindparam("b_ids", expanding=True)))
    .values(**_TAKE_VALUES)
    .returning(*executions.c)
)
# a claim of several from one need (the common case): the best rows chosen and
# taken in one statement (FOR UPDATE SKIP LOCKED inside, on PostgreSQL)
_TAKE_BEST_OF_NEED = (
    sa.update(executions)
    .where(executions.c.id.in_(_RUNNABLE_QUEUED_NEEDS.with_only_columns(executions.c.id)))
    .values(**_TAKE_VALUES)
    .returning(*executions.c)
)


# SQLite: a claim of several in statements of one row each. The sqlite3 driver
# lets go of the GIL for every row it steps through, and takes it back from a
# busy event loop (a wait of up to the switch interval) while the claim holds
# the store's one write lock: a claim that returned its 64 rows one by one held
# it for tens of ms, and every checkpoint commit of the process waited behind
# it. Here the ids chosen, the rows taken and the rows read back are each one
# JSON value (json_group_array), however many rows.
_IDS = sa.select(sa.literal_column("value")).select_from(
    sa.func.json_each(sa.bindparam("b_ids_json"))
)
_TAKE_IDS = sa.update(executions).where(executions.c.id.in_(_IDS)).values(**_TAKE_VALUES)
_ROWS_AS_JSON = sa.select(
    sa.func.json_group_array(
        sa.func.json_object(*(part for c in executions.c for part in (sa.literal(c.name), c)))
    )
).where(executions.c.id.in_(_IDS))
_LITE_CONVERT = {
    c.name: (
        (lambda v: datetime.fromisoformat(v) if isinstance(v, str) else v)
        if isinstance(c.type, sa.DateTime)
        else (lambda v: json.loads(v) if isinstance(v, str) else v)
        if isinstance(c.type, sa.JSON)
        else None
    )
    for c in executions.c
}


def _ids_json(chosen: sa.Select) -> sa.Select:
    """The ids ``chosen`` selects, as one JSON array (one row)."""
    sub = chosen.subquery()
    return sa.select(sa.func.json_group_array(sub.c.id))


def _lite_rows(text: str) -> list[Execution]:
    """Executions from ``_ROWS_AS_JSON``: each column as SQLAlchemy's types
    would read it (times from their text, JSON columns parsed)."""
    out = []
    for raw in json.loads(text):
        for name, convert in _LITE_CONVERT.items():
            if convert is not None and raw[name] is not None:
                try:
                    raw[name] = convert(raw[name])
                except ValueError:
                    pass  # a row written by hand: Execution.defect says so, the run fails
        out.append(Execution.from_row(raw))
    return out


def _best_first(row: Any) -> tuple:
    """The claim's order: highest priority, then oldest (a row of the wrong
    types, written by hand, last: it is failed, not compared)."""
    usable = isinstance(row.priority, int) and isinstance(row.created_at, datetime)
    if not usable:
        return (1, 0, datetime.max)
    return (0, -row.priority, row.created_at)


def ensure_queues(conn: sa.Connection, db: Database, names: Iterable[str], now: Any) -> None:
    for q in sorted(set(names)):
        conn.execute(
            db.insert(queues)
            .values(name=q, created_at=now)
            .on_conflict_do_nothing(index_elements=["name"])
        )


def _new_row(n: NewExecution, needs: Any, now: Any) -> dict[str, Any]:
    return dict(
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
        root_id=n.root_id,
        parent_group=n.parent_group,
        group_mode=n.group_mode,
        needs=needs,
        fence=0,
        step=0,
        created_at=now,
        updated_at=now,
    )


def insert_new(
    conn: sa.Connection, db: Database, n: NewExecution, now: Any
) -> tuple[Execution, bool]:
    """Insert one execution, or find the one that has its id: (row, created)."""
    needs = config_needs(n.config_hash) if n.needs is None else n.needs
    row = (
        conn.execute(
            db.insert(executions)
            .values(**_new_row(n, needs, now))
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(*executions.c)
        )
        .mappings()
        .first()
    )
    if row is not None:
        return Execution.from_row(row), True
    return get_in(conn, n.id), False


def insert_many(
    conn: sa.Connection, db: Database, new: Sequence[NewExecution], now: Any
) -> list[tuple[Execution, bool]]:
    """``insert_new`` for many, in a few statements: each config's needs read
    once, the rows inserted in batches (an id that exists is left as it is)."""
    hashes = {n.config_hash for n in new if n.needs is None}
    needs: dict[str, Any] = {}
    if hashes:
        needs = dict(
            conn.execute(
                sa.select(configs.c.hash, configs.c.needs).where(configs.c.hash.in_(hashes))
            ).all()
        )
    stmt = (
        db.insert(executions).on_conflict_do_nothing(index_elements=["id"]).returning(*executions.c)
    )
    rows, seen = [], set()
    for n in new:
        if n.id not in seen:  # the same id twice: the second finds the first
            seen.add(n.id)
            rows.append(_new_row(n, needs.get(n.config_hash) if n.needs is None else n.needs, now))
    created: dict[str, Execution] = {}
    for i in range(0, len(rows), 500):
        for row in conn.execute(stmt, rows[i : i + 500]).mappings():
            created[row["id"]] = Execution.from_row(row)
    out: list[tuple[Execution, bool]] = []
    for n in new:
        ex = created.pop(n.id, None)
        out.append((ex, True) if ex is not None else (get_in(conn, n.id), False))
    return out


def config_needs(config_hash: str) -> Any:
    """What the execution of this config needs, read from the config, in the insert."""
    return sa.select(configs.c.needs).where(configs.c.hash == config_hash).scalar_subquery()


def get_in(conn: sa.Connection, execution_id: str) -> Execution:
    """The execution, inside a caller's transaction; ExecutionNotFound if none."""
    row = (
        conn.execute(sa.select(executions).where(executions.c.id == execution_id))
        .mappings()
        .first()
    )
    if row is None:
        raise ExecutionNotFound(execution_id)
    return Execution.from_row(row)


def requeue_held_by(conn: sa.Connection, worker_ids: Sequence[str], now: Any) -> None:
    """Inside a caller's transaction: what these (dead) workers ran goes back to
    its queue at once, as a recovery (fence += 1, recoveries += 1)."""
    conn.execute(
        sa.update(executions)
        .where(executions.c.worker_id.in_(list(worker_ids)), executions.c.status == "running")
        .values(
            status="queued",
            fence=executions.c.fence + 1,
            recoveries=executions.c.recoveries + 1,
            worker_id=None,
            lease_until=None,
            updated_at=now,
        )
    )


def lease_renewal(worker_id: str, ids: Sequence[str], until: Any) -> sa.Update:
    """Extend to ``until`` the leases of ``ids`` that ``worker_id`` runs, skipping
    a row another transaction holds; returns (id, fence) of each renewed."""
    # only rows this worker runs: a row locked here is one a signal's
    # delivery would pass over (signals.deliver)
    free = (
        sa.select(executions.c.id)
        .where(
            executions.c.id.in_(ids),
            executions.c.worker_id == worker_id,
            executions.c.status == "running",
        )
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    # the rows the subquery locked, by primary key alone: an outer filter on
    # status or worker let a planner without statistics (a new table) scan
    # them and run the locking subquery once per row (3 s at 1,000 in flight)
    return (
        sa.update(executions)
        .where(executions.c.id.in_(free))
        .values(lease_until=until)
        .returning(executions.c.id, executions.c.fence)
    )


class Executions:
    def __init__(self, db: Database):
        self.db = db
        # the needs (routing.py) of the configs in the store, as last read
        self._needs: list[str] = []
        self._needs_seen = 0.0

    def _capable(self, conn: sa.Connection, have: frozenset[str]) -> list[str]:
        """The needs in the store that a worker with ``have`` can run (the list
        of needs is read again once a second, or when a claim found nothing)."""
        if time.monotonic() - self._needs_seen > 1.0:
            self._needs = list(conn.scalars(sa.select(configs.c.needs).distinct()))
            self._needs_seen = time.monotonic()
        return runnable(self._needs, have)

    @staticmethod
    def _best_queued(conn: sa.Connection, params: dict[str, Any], limit: int) -> list[Any]:
        """The best ``limit`` due queued rows among the needs in ``params``, best
        first: one index probe per need (each locks at most ``limit`` rows)."""
        found: list[Any] = []
        for needs in params["b_needs"]:
            found += conn.execute(
                _RUNNABLE_QUEUED_NEEDS, {**params, "b_need": needs, "b_limit": limit}
            ).all()
        if len(params["b_needs"]) > 1:
            found.sort(key=_best_first)
        return found[:limit]

    async def submit(self, new: Sequence[NewExecution]) -> list[tuple[Execution, bool]]:
        """Insert executions; an id that exists already returns the existing row.

        Returns (execution, created) per item, in order, all in one transaction.
        """

        def tx(conn: sa.Connection) -> list[tuple[Execution, bool]]:
            now = utcnow()
            ensure_queues(conn, self.db, {n.queue for n in new}, now)
            if len(new) == 1:
                return [insert_new(conn, self.db, new[0], now)]
            return insert_many(conn, self.db, new, now)

        out = await self.db.write(tx)
        await self.db.wake()
        return out

    # ------------------------------------------------------------- reading

    async def get(self, execution_id: str) -> Execution | None:
        def tx(conn: sa.Connection) -> Execution | None:
            row = (
                (conn.execute(sa.select(executions).where(executions.c.id == execution_id)))
                .mappings()
                .first()
            )
            return Execution.from_row(row) if row else None

        return await self.db.read(tx)

    async def list_executions(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        limit: int = 50,
        parent: str | None = None,
        text: str | None = None,
        offset: int = 0,
    ) -> list[Execution]:
        """Newest first; ``text`` matches a part of the id or the machine name."""
        stmt = sa.select(executions).order_by(
            executions.c.created_at.desc(), executions.c.id.desc()
        )
        if status:
            stmt = stmt.where(executions.c.status == status)
        if queue:
            stmt = stmt.where(executions.c.queue == queue)
        if parent:
            stmt = stmt.where(executions.c.parent_id == parent)
        if text:
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            stmt = stmt.where(
                sa.or_(
                    executions.c.id.like(pattern, escape="\\"),
                    executions.c.machine.like(pattern, escape="\\"),
                )
            )
        stmt = stmt.limit(limit).offset(offset)

        def tx(conn: sa.Connection) -> list[Execution]:
            return [Execution.from_row(r) for r in (conn.execute(stmt)).mappings()]

        return await self.db.read(tx)

    async def finished_per_bucket(
        self, *, buckets: int, seconds: float, status: str = "completed"
    ) -> list[int]:
        """How many executions ended ``status`` in each of the last ``buckets``
        windows of ``seconds``, oldest first (a throughput sparkline)."""

        def tx(conn: sa.Connection) -> list[int]:
            now = utcnow()
            since = now - timedelta(seconds=buckets * seconds)
            counts = [0] * buckets
            stmt = sa.select(executions.c.finished_at).where(
                executions.c.finished_at >= since, executions.c.status == status
            )
            for (at,) in conn.execute(stmt):
                i = int((at - since).total_seconds() // seconds)
                counts[min(max(i, 0), buckets - 1)] += 1
            return counts

        return await self.db.read(tx)

    async def queued_needs(self) -> dict[str, list[str]]:
        """Per queue, the needs (routing.py) of its queued executions."""

        def tx(conn: sa.Connection) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {}
            stmt = (
                sa.select(executions.c.queue, executions.c.needs)
                .where(executions.c.status == "queued")
                .distinct()
            )
            for queue, needs in conn.execute(stmt):
                out.setdefault(queue, []).append(needs)
            return out

        return await self.db.read(tx)

    async def count_by_status(self) -> dict[str, int]:
        stmt = sa.select(executions.c.status, sa.func.count()).group_by(executions.c.status)

        def tx(conn: sa.Connection) -> dict[str, int]:
            return {s: n for s, n in conn.execute(stmt)}

        return await self.db.read(tx)

    # --------------------------------------------------------------- claim

    async def claim(
        self,
        worker_id: str,
        queue_names: Sequence[str],
        hooks: Iterable[str] | None = None,
    ) -> Claim | None:
        """Take the best runnable execution: an expired lease first, else the
        highest-priority, oldest due queued row. One transaction; fence += 1.

        With ``hooks`` (the names a worker registered), only an execution that
        needs no other hooks (routing.py): one index probe per need it can run."""
        claims = await self.claim_many(worker_id, queue_names, hooks, limit=1)
        return claims[0] if claims else None

    async def claim_many(
        self,
        worker_id: str,
        queue_names: Sequence[str],
        hooks: Iterable[str] | None = None,
        *,
        limit: int,
    ) -> list[Claim]:
        """Up to ``limit`` claims (a worker's free slots), best first, as
        ``claim`` takes them one at a time, in one transaction: one commit."""
        ttl = self.db.settings.lease_ttl
        cap = self.db.settings.max_recoveries

        names = list(queue_names)
        have = None if hooks is None else frozenset(hooks)
        sqlite = self.db.dialect.name == "sqlite"

        def take_expired(conn: sa.Connection, params: dict[str, Any], now: Any) -> Claim | None:
            """An execution whose owner's lease ran out (a recovery), if any."""
            expired = _RUNNABLE_EXPIRED if have is None else _RUNNABLE_EXPIRED_NEEDS
            while (row := conn.execute(expired, params).first()) is not None:
                if row.recoveries + 1 > cap:
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
                    ended(conn, self.db.dialect, row._asdict(), now)
                    continue
                claimed = (
                    conn.execute(
                        _TAKE,
                        {
                            "b_id": row.id,
                            "b_worker": worker_id,
                            "b_lease_until": lease_deadline(now, ttl),
                            "b_recovered": 1,
                            "b_now": now,
                        },
                    )
                    .mappings()
                    .one()
                )
                ex = Execution.from_row(claimed)
                return Claim(ex, worker_id, ex.fence, True)
            return None

        def take_queued(
            conn: sa.Connection, params: dict[str, Any], now: Any, left: int
        ) -> list[Claim]:
            """The best ``left`` queued executions, taken in one statement."""
            if sqlite:
                return take_queued_lite(conn, params, now, left)
            if have is not None and len(params["b_needs"]) == 1:
                taken = conn.execute(
                    _TAKE_BEST_OF_NEED,
                    {
                        **params,
                        "b_need": params["b_needs"][0],
                        "b_limit": left,
                        "b_worker": worker_id,
                        "b_lease_until": lease_deadline(now, ttl),
                    },
                ).mappings()
                best_first = sorted((Execution.from_row(r) for r in taken), key=_best_first)
                return [Claim(ex, worker_id, ex.fence, False) for ex in best_first]
            if have is None:
                rows = conn.execute(_RUNNABLE_QUEUED_MANY, {**params, "b_limit": left}).all()
            else:
                rows = self._best_queued(conn, params, left)
            if not rows:
                return []
            taken = {
                r["id"]: r
                for r in conn.execute(
                    _TAKE_QUEUED,
                    {
                        "b_ids": [r.id for r in rows],
                        "b_worker": worker_id,
                        "b_lease_until": lease_deadline(now, ttl),
                        "b_now": now,
                    },
                ).mappings()
            }
            out = []
            for r in rows:  # best first
                ex = Execution.from_row(taken[r.id])
                out.append(Claim(ex, worker_id, ex.fence, False))
            return out

        def take_queued_lite(
            conn: sa.Connection, params: dict[str, Any], now: Any, left: int
        ) -> list[Claim]:
            """``take_queued`` on SQLite: one row per statement (see _ROWS_AS_JSON)."""
            if have is not None and len(params["b_needs"]) == 1:
                chosen = _RUNNABLE_QUEUED_NEEDS.with_only_columns(executions.c.id)
                params = {**params, "b_need": params["b_needs"][0], "b_limit": left}
                ids_json = conn.scalar(_ids_json(chosen), params)
            elif have is None:
                chosen = _RUNNABLE_QUEUED_MANY.with_only_columns(executions.c.id)
                ids_json = conn.scalar(_ids_json(chosen), {**params, "b_limit": left})
            else:
                ids_json = json.dumps([r.id for r in self._best_queued(conn, params, left)])
            if ids_json == "[]":
                return []
            conn.execute(
                _TAKE_IDS,
                {
                    "b_ids_json": ids_json,
                    "b_worker": worker_id,
                    "b_lease_until": lease_deadline(now, ttl),
                    "b_now": now,
                },
            )
            taken = _lite_rows(conn.scalar(_ROWS_AS_JSON, {"b_ids_json": ids_json}))
            return [Claim(ex, worker_id, ex.fence, False) for ex in sorted(taken, key=_best_first)]

        def tx(conn: sa.Connection) -> list[Claim]:
            now = utcnow()
            params: dict[str, Any] = {"b_queues": names, "b_now": now}
            conn.execute(_WAKE_DUE, params)
            if have is not None:
                params["b_needs"] = self._capable(conn, have)
                if not params["b_needs"]:
                    self._needs_seen = 0.0  # a config submitted next is seen at once
                    return []
            out: list[Claim] = []
            # recoveries first, one at a time (each is counted against its cap);
            # within one transaction, none expire anew
            while len(out) < limit and (claim := take_expired(conn, params, now)) is not None:
                out.append(claim)
            if len(out) < limit:
                out += take_queued(conn, params, now, limit - len(out))
            if len(out) < limit:
                self._needs_seen = 0.0  # nothing more to run: look for new needs next time
            return out

        if limit < 1:
            return []
        return await self.db.write(tx)

    async def renew_leases(
        self, worker_id: str, held: dict[str, int]
    ) -> tuple[set[str], str | None]:
        """Extend every lease this worker still holds and heartbeat the worker.

        Returns (ids whose fence moved on, the worker's status in the store).

        Deadlock-free beside the worker's own commits (group.py), which lock
        their executions' rows and then the worker's row: the heartbeat goes
        first, holding nothing else, and a lease row locked by a commit in
        flight is skipped, not waited for. It is still held (its fence says so),
        and is renewed a moment later, or at the next tick: its lease has two
        ticks left."""
        ttl = self.db.settings.lease_ttl

        def tx(conn: sa.Connection, ids: list[str], beat: bool) -> tuple[set[str], set[str], Any]:
            now = utcnow()
            status = None
            if beat:
                status = conn.scalar(
                    sa.update(workers)
                    .where(workers.c.id == worker_id)
                    .values(
                        last_heartbeat=now,
                        running=len(held),
                        # a worker the reaper gave up on is back (it was paused, say)
                        status=sa.case(
                            (workers.c.status == "lost", "active"), else_=workers.c.status
                        ),
                    )
                    .returning(workers.c.status)
                )
            if not ids:
                return set(), set(), status
            result = conn.execute(lease_renewal(worker_id, ids, lease_deadline(now, ttl)))
            kept = {r.id for r in result if held.get(r.id) == r.fence}
            busy: set[str] = set()
            missing = [i for i in ids if i not in kept]
            if missing:  # skipped while a commit held them, or gone: the fence tells
                for r in conn.execute(
                    sa.select(executions.c.id, executions.c.fence, executions.c.worker_id).where(
                        executions.c.id.in_(missing), executions.c.status == "running"
                    )
                ):
                    if r.worker_id == worker_id and held.get(r.id) == r.fence:
                        busy.add(r.id)
            return set(ids) - kept - busy, busy, status

        ids = list(held)
        lost, busy, status = await self.db.write(lambda conn: tx(conn, ids, True))
        for _ in range(3):  # the commits that held them are over in a moment
            if not busy:
                break
            await self.db.call(lambda: time.sleep(0.02))  # a real pause, clock frozen or not
            ids = sorted(busy)
            more_lost, busy, _ = await self.db.write(lambda conn, ids=ids: tx(conn, ids, False))
            lost |= more_lost
        return lost, status

    async def holds_fence(self, execution_id: str, fence: int) -> bool:
        def tx(conn: sa.Connection) -> bool:
            current = conn.scalar(
                sa.select(executions.c.fence).where(
                    executions.c.id == execution_id, executions.c.status == "running"
                )
            )
            return current == fence

        return await self.db.read(tx)

    async def finish(
        self,
        claim: Claim,
        *,
        status: str,
        output: Any = None,
        error: str | None = None,
        checkpoints: Sequence[CheckpointRow] = (),
        wait: WaitEnd | None = None,
    ) -> None:
        """Record a final outcome (completed | failed), fenced.

        ``checkpoints`` not yet written (the run's last progress markers and its
        ``machine_end``) commit in the same transaction, ahead of the outcome;
        so does the end of a wait (``wait``). A failed execution gives back any
        signal it took and did not consume, to the next waiter."""
        assert status in ("completed", "failed")
        drv = self.db.driver
        finish = drv.sql(RAW_FINISH.format(json=self.db.dialect.json_param))
        count = drv.sql(RAW_COUNT.format(col=status))
        output_json = None if output is None else json.dumps(output)
        ex_id, fence = claim.execution.id, claim.fence

        def statements(cur: Any, now: Any) -> None:
            if checkpoints:  # while the row is still running: the fence, step and state
                fenced_insert(cur, drv, ex_id, fence, checkpoints, now)
            if wait is not None:
                end_wait(cur, drv, ex_id, fence, wait.consumed, now)
            cur.execute(finish, (status, output_json, error, now, now, ex_id, fence))
            if cur.rowcount != 1:
                raise LeaseLost(ex_id, fence)
            cur.execute(count, (claim.worker_id,))

        group = claim.execution.parent_group
        if status == "completed" and group is None and wait is None:
            # the hot path: data for group commit, which may merge it with others
            write = FencedWrite(
                drv,
                ex_id,
                fence,
                checkpoints,
                completes=True,
                output=output_json,
                worker_id=claim.worker_id,
            )
            await self.db.on_cursor(write)
            return
        if status == "completed" and group is None:  # on the driver's cursor
            await self.db.on_cursor(lambda cur: statements(cur, drv.time(utcnow())))
            return

        def tx(conn: sa.Connection) -> None:
            now = utcnow()
            statements(self.db.cursor(conn), drv.time(now))
            if status == "failed":
                give_back(conn, self.db.dialect.lock_channel, ex_id, now)
            if group is not None:  # a child: its parent may be waiting for this
                settle_group(conn, self.db.dialect, group, claim.execution.group_mode, now)

        await self.db.write(tx)
        if group is not None:
            await self.db.wake()

    async def park(
        self,
        claim: Claim,
        *,
        channel: str,
        wake_at: datetime | None,
        checkpoints: Sequence[CheckpointRow] = (),
        wait: WaitEnd | None = None,
    ) -> str:
        """The run waits on ``channel`` (and, with ``wake_at``, wakes by itself
        then). Its last checkpoints (the ``waiting`` one among them) and the park
        commit together, fenced; the lease is released and the worker's slot is
        free. A signal already there, or a time already past, leaves it runnable
        at once. A wait parked again on its channel keeps its first deadline.
        Returns the status it is left in: 'waiting' or 'queued'."""
        drv = self.db.driver
        ex_id, fence = claim.execution.id, claim.fence

        def tx(conn: sa.Connection) -> str:
            now = utcnow()
            raw_now = drv.time(now)
            self.db.dialect.lock_channel(conn, channel)
            cur = self.db.cursor(conn)
            fenced_insert(cur, drv, ex_id, fence, checkpoints, raw_now)
            if wait is not None:
                end_wait(cur, drv, ex_id, fence, wait.consumed, raw_now)
            before = conn.execute(
                sa.select(executions.c.waiting_channel, executions.c.wake_at).where(
                    executions.c.id == ex_id
                )
            ).one()
            wakes = (
                before.wake_at if before.waiting_channel == channel and before.wake_at else wake_at
            )
            signal = take_next(conn, ex_id, channel)
            runnable = signal is not None or (wakes is not None and wakes <= now)
            parked = conn.execute(
                sa.update(executions)
                .where(_held(ex_id, fence))
                .values(
                    status="queued" if runnable else "waiting",
                    waiting_channel=channel,
                    wake_at=wakes,
                    worker_id=None,
                    lease_until=None,
                    updated_at=now,
                )
            )
            if parked.rowcount != 1:
                raise LeaseLost(ex_id, fence)
            return "queued" if runnable else "waiting"

        return await self.db.write(tx)

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

        out = await self.db.write(tx)
        await self.db.wake()
        return out

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

        out = await self.db.write(tx)
        await self.db.wake()
        return out

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

        return await self.db.write(tx)

    async def cancel(self, execution_id: str, reason: str | None = None) -> Execution:
        """Cancel an unfinished execution: queued or waiting, it never runs again;
        running, fence += 1, so its worker's next write (or lease renewal) is
        refused and it stops. A signal it took and did not consume goes to the
        next waiter. UserError if it had finished already."""

        def tx(conn: sa.Connection) -> Execution:
            now = utcnow()
            cancelled = conn.execute(
                sa.update(executions)
                .where(executions.c.id == execution_id, executions.c.status.not_in(FINAL_STATUSES))
                .values(
                    status="cancelled",
                    cancel_reason=reason,
                    fence=executions.c.fence + 1,
                    lease_until=None,
                    finished_at=now,
                    updated_at=now,
                )
            )
            ex = get_in(conn, execution_id)
            if cancelled.rowcount != 1:
                raise UserError(
                    f"execution {execution_id} is {ex.status} already: only an unfinished "
                    "execution can be cancelled"
                )
            lock = self.db.dialect.lock_channel
            below = cancel_descendants(
                conn, [execution_id], f"its parent {execution_id} was cancelled", now
            )
            for cancelled_id in [execution_id, *below]:
                give_back(conn, lock, cancelled_id, now)
            if ex.parent_group is not None:  # its parent may be waiting on it
                settle_group(conn, self.db.dialect, ex.parent_group, ex.group_mode, now)
            return ex

        out = await self.db.write(tx)
        await self.db.wake()
        return out

    async def retry(self, execution_id: str, config: tuple[str, str] | None = None) -> Execution:
        """Queue a failed or cancelled execution again; it resumes from its last
        checkpoint with a fresh attempt, on the config it has pinned, or on
        ``config`` = (hash, machine name), pinned for it from now on."""

        def tx(conn: sa.Connection) -> Execution:
            ex = get_in(conn, execution_id)
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
                    max_attempts=self.db.dialect.greatest(
                        executions.c.max_attempts, executions.c.attempt + 1
                    ),
                    recoveries=0,
                    not_before=None,
                    worker_id=None,
                    lease_until=None,
                    finished_at=None,
                    updated_at=now,
                    **(
                        {
                            "config_hash": config[0],
                            "machine": config[1],
                            "needs": config_needs(config[0]),
                        }
                        if config
                        else {}
                    ),
                )
            )
            return get_in(conn, execution_id)

        out = await self.db.write(tx)
        await self.db.wake()
        return out

    async def requeue_expired(self) -> tuple[list[str], list[str]]:
        """Running executions whose lease expired go back to their queue
        (recoveries += 1, fence += 1); past the recovery cap they fail.
        Returns (requeued ids, failed ids)."""
        cap = self.db.settings.max_recoveries

        def tx(conn: sa.Connection) -> tuple[list[str], list[str]]:
            now = utcnow()
            expired = conn.execute(
                sa.select(
                    executions.c.id,
                    executions.c.recoveries,
                    executions.c.parent_group,
                    executions.c.group_mode,
                )
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
                if row.id in failed:
                    ended(conn, self.db.dialect, row._asdict(), now)
            return requeued, failed

        out = await self.db.write(tx)
        await self.db.wake()
        return out
