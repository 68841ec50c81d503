"""Sibling groups: the children a parent waits on together, and what ends them.

A ``machine:`` or ``foreach:`` state enqueues its children as one group, named
by the channel the parent waits on. When a child ends (completed, failed,
cancelled), the transaction that ends it checks its group: under ``settled``
the last one to end, under ``any`` the first, sends a signal on the group's
channel, which wakes the parent (signals.py). The check holds the channel's
lock, so two siblings ending at once cannot both miss it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from .dialect import Dialect
from .models import FINAL_STATUSES, executions, signals
from .signals import deliver


def settle_group(
    conn: sa.Connection, dialect: Dialect, group: str, mode: str | None, now: datetime
) -> bool:
    """A member of ``group`` just ended: wake the parent if the group is done
    (settled) or this was its first to end (any). True if it woke."""
    dialect.lock_channel(conn, group)
    ended = sa.func.sum(sa.case((executions.c.status.in_(FINAL_STATUSES), 1), else_=0))
    total, done = conn.execute(
        sa.select(sa.func.count(), ended).where(executions.c.parent_group == group)
    ).one()
    done = int(done or 0)
    if not (done == 1 if mode == "any" else done == total):
        return False
    conn.execute(sa.insert(signals).values(channel=group, data=None, created_at=now))
    deliver(conn, group, now)
    return True


def ended(conn: sa.Connection, dialect: Dialect, row: dict, now: datetime) -> None:
    """``row`` (an executions row: parent_group, group_mode) ended: settle its group."""
    if row.get("parent_group"):
        settle_group(conn, dialect, row["parent_group"], row.get("group_mode"), now)


def cancel_unfinished(conn: sa.Connection, where: Any, reason: str, now: datetime) -> list[str]:
    """Cancel the unfinished executions ``where`` selects (fence += 1, so a
    worker running one is refused at its next write); their ids."""
    return [
        r.id
        for r in conn.execute(
            sa.update(executions)
            .where(where, executions.c.status.not_in(FINAL_STATUSES))
            .values(
                status="cancelled",
                cancel_reason=reason,
                fence=executions.c.fence + 1,
                worker_id=None,
                lease_until=None,
                finished_at=now,
                updated_at=now,
            )
            .returning(executions.c.id)
        )
    ]


def cancel_descendants(
    conn: sa.Connection, parent_ids: list[str], reason: str, now: datetime
) -> list[str]:
    """Cancel every unfinished execution below these parents (their whole
    subtrees). Their parents are ending too, so no group is settled."""
    cancelled: list[str] = []
    frontier = list(parent_ids)
    while frontier:
        frontier = cancel_unfinished(conn, executions.c.parent_id.in_(frontier), reason, now)
        cancelled += frontier
    return cancelled
