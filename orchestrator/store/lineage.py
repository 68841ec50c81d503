"""Lineage: an execution's children, the groups its parent waits on, and forks.

Children are executions of their own (any worker of the queue runs them),
linked to their parent (``parent_id``) and their tree's root (``root_id``).
A child's id is derived from its parent's, so a parent that runs a state
again enqueues the very same children: the insert finds them and adds none.
A fork is a new execution whose first checkpoint is a copy, optionally
patched, of another's committed state; the original is not touched.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ..clock import utcnow
from ..errors import LeaseLost, UserError
from .checkpoints import read_snapshot
from .db import Database
from .executions import ensure_queues, get_in, insert_new
from .groups import cancel_descendants, cancel_unfinished
from .models import checkpoints, executions
from .records import Claim, Execution, NewExecution
from .signals import give_back


class Lineage:
    def __init__(self, db: Database):
        self.db = db

    async def enqueue_children(self, parent: Claim, children: Sequence[NewExecution]) -> int:
        """Enqueue children under the parent's claim (LeaseLost if it moved on).
        Ids already there are kept as they are. Returns how many were new."""

        def tx(conn: sa.Connection) -> int:
            now = utcnow()
            held = conn.execute(
                sa.update(executions)
                .where(
                    executions.c.id == parent.execution.id,
                    executions.c.fence == parent.fence,
                    executions.c.status == "running",
                )
                .values(updated_at=now)
            )
            if held.rowcount != 1:
                raise LeaseLost(parent.execution.id, parent.fence)
            ensure_queues(conn, self.db, {c.queue for c in children}, now)
            return sum(insert_new(conn, self.db, c, now)[1] for c in children)

        out = await self.db.write(tx)
        await self.db.wake()
        return out

    async def group_members(self, group: str) -> list[Execution]:
        return await self._below(executions.c.parent_group == group)

    async def cancel_members(self, group: str, *, keep: str, reason: str) -> list[str]:
        """Cancel the unfinished members of ``group`` but ``keep`` (an ``any``
        group's winner), with their subtrees."""

        def tx(conn: sa.Connection) -> list[str]:
            now = utcnow()
            stopped = cancel_unfinished(
                conn,
                sa.and_(executions.c.parent_group == group, executions.c.id != keep),
                reason,
                now,
            )
            stopped += cancel_descendants(conn, stopped, reason, now)
            for ex_id in stopped:
                give_back(conn, self.db.dialect.lock_channel, ex_id, now)
            return stopped

        return await self.db.write(tx)

    async def children(self, parent_id: str) -> list[Execution]:
        return await self._below(executions.c.parent_id == parent_id)

    async def _below(self, where: Any) -> list[Execution]:
        """The executions ``where`` selects, oldest first."""
        stmt = sa.select(executions).where(where).order_by(executions.c.created_at, executions.c.id)

        def tx(conn: sa.Connection) -> list[Execution]:
            return [Execution.from_row(r) for r in conn.execute(stmt).mappings()]

        return await self.db.read(tx)

    async def fork(
        self,
        source_id: str,
        *,
        step: int,
        new_id: str,
        queue: str | None = None,
        config: tuple[str, str] | None = None,
        context_patch: dict[str, Any] | None = None,
    ) -> Execution:
        """A new execution that starts from ``source_id``'s committed state at
        ``step`` (its ``state_exit``), its context patched, on the same pinned
        config or ``config`` = (hash, machine name). UserError if there is no
        such step or the new id is taken."""

        def tx(conn: sa.Connection) -> Execution:
            now = utcnow()
            src = get_in(conn, source_id)
            row = conn.execute(
                sa.select(checkpoints.c.state, checkpoints.c.id)
                .where(
                    checkpoints.c.execution_id == source_id,
                    checkpoints.c.step == step,
                    checkpoints.c.event == "state_exit",
                )
                .order_by(checkpoints.c.id.desc())
                .limit(1)
            ).first()
            if row is None:
                steps = conn.scalars(
                    sa.select(checkpoints.c.step)
                    .where(
                        checkpoints.c.execution_id == source_id,
                        checkpoints.c.event == "state_exit",
                    )
                    .distinct()
                    .order_by(checkpoints.c.step)
                ).all()
                gone = ""
                if steps and 1 <= step < steps[0]:  # states are numbered from 1
                    gone = " (its workflow's history window let go of it)"
                raise UserError(
                    f"execution {source_id} has no committed state at step {step}{gone}; steps "
                    f"to fork from: {_ranges(steps) or 'none yet'} (see `orch show {source_id}`)"
                )
            config_hash, machine = config or (src.config_hash, src.machine)
            snapshot = read_snapshot(conn, source_id, row.id).doc
            snapshot.update(
                execution_id=new_id,
                config_hash=config_hash,
                pending_launches=None,
                parent_execution_id=None,
            )
            snapshot["context"] = {**(snapshot.get("context") or {}), **(context_patch or {})}
            if context_patch:
                from ..checks import context_within_limit  # checks reads the schema: not above

                context_within_limit(snapshot["context"], self.db.settings.max_context_bytes)
            fork, created = insert_new(
                conn,
                self.db,
                NewExecution(
                    id=new_id,
                    machine=machine,
                    config_hash=config_hash,
                    input=src.input,
                    queue=queue or src.queue,
                    priority=src.priority,
                    max_attempts=src.max_attempts,
                    retry_backoff=src.retry_backoff,
                    retry_backoff_max=src.retry_backoff_max,
                ),
                now,
            )
            if not created:
                raise UserError(
                    f"an execution with id '{new_id}' exists already; pass another --id"
                )
            ensure_queues(conn, self.db, [fork.queue], now)
            conn.execute(
                sa.update(executions)
                .where(executions.c.id == new_id)
                .values(step=step, current_state=row.state)
            )
            conn.execute(
                sa.insert(checkpoints).values(
                    execution_id=new_id,
                    key=f"{new_id}/step_{step:06d}_state_exit.json",
                    step=step,
                    event="state_exit",
                    state=row.state,
                    snapshot=json.dumps(snapshot).encode("utf-8"),
                    fence=0,
                    created_at=now,
                )
            )
            return get_in(conn, new_id)

        return await self.db.write(tx)


def _ranges(steps: Sequence[int]) -> str:
    """1, 2, 3, 7, 8 -> '1-3, 7-8'."""
    out: list[str] = []
    start = prev = None
    for n in steps:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = n
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ", ".join(out)
