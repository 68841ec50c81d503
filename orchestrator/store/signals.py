"""Durable signals: one signal, one consumer, first in, first out per channel.

``send_signal`` stores the signal and, in the same transaction, gives it to the
execution that has waited longest on its channel and makes that execution
runnable. A signal sent before anyone waits is kept until an execution takes
it: the park of a waiter takes a free signal at once, and so does a run that
reaches its ``wait_for`` with one waiting. Taking a signal (``reserve_signal``) is
fenced by the taker's claim; it is consumed when the taker's wait state
commits (checkpoints.py), so a worker killed in between loses neither.
Sending and parking on one channel serialise on it (dialect.lock_channel):
a signal never slips between a waiter's look and its park.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..clock import utcnow
from .db import Database
from .fenced import hold
from .models import executions, signals
from .records import SignalRecord

_UNCONSUMED = signals.c.consumed_at.is_(None)


def deliver(conn: sa.Connection, channel: str, now: datetime) -> list[str]:
    """Give each free signal of ``channel`` to one of its waiters, longest
    waiting first, and make them runnable. The caller holds the channel's lock."""
    free = conn.scalars(
        sa.select(signals.c.id)
        .where(signals.c.channel == channel, _UNCONSUMED, signals.c.assigned_to.is_(None))
        .order_by(signals.c.id)
    ).all()
    if not free:
        return []
    waiters = conn.scalars(
        sa.select(executions.c.id)
        .where(executions.c.status == "waiting", executions.c.waiting_channel == channel)
        .order_by(executions.c.updated_at, executions.c.id)
        .limit(len(free))
        # waits for a row another transaction holds, never passes it over: a
        # waiter skipped here would keep waiting on a signal that stays free
        .with_for_update()
    ).all()
    for signal_id, ex_id in zip(free, waiters, strict=False):
        conn.execute(sa.update(signals).where(signals.c.id == signal_id).values(assigned_to=ex_id))
        conn.execute(
            sa.update(executions)
            .where(executions.c.id == ex_id, executions.c.status == "waiting")
            .values(status="queued", updated_at=now)
        )
    return list(waiters)


def take_next(
    conn: sa.Connection, execution_id: str, channel: str, sent_by: datetime | None = None
) -> SignalRecord | None:
    """The signal of ``channel`` that ``execution_id`` takes next, now given to it:
    one given to it already, else the oldest free one (sent no later than
    ``sent_by``, when given). None if there is none."""
    mine = signals.c.assigned_to == execution_id
    stmt = (
        sa.select(signals)
        .where(
            signals.c.channel == channel, _UNCONSUMED, sa.or_(mine, signals.c.assigned_to.is_(None))
        )
        .order_by(sa.case((mine, 0), else_=1), signals.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if sent_by is not None:
        stmt = stmt.where(signals.c.created_at <= sent_by)
    row = conn.execute(stmt).mappings().first()
    if row is None:
        return None
    if row["assigned_to"] != execution_id:
        conn.execute(
            sa.update(signals).where(signals.c.id == row["id"]).values(assigned_to=execution_id)
        )
    return SignalRecord.from_row({**row, "assigned_to": execution_id})


def give_back(conn: sa.Connection, lock: Any, execution_id: str, now: datetime) -> list[str]:
    """Signals given to ``execution_id`` and not consumed (it failed or was
    cancelled) go to the next waiters of their channels. Returns who woke."""
    channels = {
        r.channel
        for r in conn.execute(
            sa.update(signals)
            .where(signals.c.assigned_to == execution_id, _UNCONSUMED)
            .values(assigned_to=None)
            .returning(signals.c.channel)
        )
    }
    woken: list[str] = []
    for channel in sorted(channels):
        lock(conn, channel)
        woken += deliver(conn, channel, now)
    return woken


def end_wait(
    cur: Any, drv: Any, owner_id: str, fence: int, consumed: Sequence[int], now: Any
) -> None:
    """On the driver's cursor, inside a fenced commit of the waiting state's
    progress: its signals are consumed and the execution waits no more."""
    if consumed:
        marks = ", ".join("?" * len(consumed))
        cur.execute(
            drv.sql(
                "UPDATE signals SET consumed_at = ? WHERE assigned_to = ? AND consumed_at IS NULL"
                f" AND id IN ({marks})"
            ),
            (now, owner_id, *consumed),
        )
    cur.execute(
        drv.sql(
            "UPDATE executions SET waiting_channel = NULL, wake_at = NULL"
            " WHERE id = ? AND fence = ?"
        ),
        (owner_id, fence),
    )


class Signals:
    def __init__(self, db: Database):
        self.db = db

    async def send_signal(self, channel: str, data: Any) -> tuple[int, list[str]]:
        """Store a signal; returns its id and the execution it woke (if any)."""

        def tx(conn: sa.Connection) -> tuple[int, list[str]]:
            now = utcnow()
            self.db.dialect.lock_channel(conn, channel)
            signal_id = conn.scalar(
                sa.insert(signals)
                .values(channel=channel, data=data, created_at=now)
                .returning(signals.c.id)
            )
            return signal_id, deliver(conn, channel, now)

        out = await self.db.write(tx)
        await self.db.wake()
        return out

    async def reserve_signal(
        self,
        execution_id: str,
        fence: int,
        channel: str,
        *,
        sent_by: datetime | None = None,
    ) -> SignalRecord | None:
        """Take the next signal of ``channel`` for ``execution_id`` under its claim:
        one given to it already first, else the oldest free one (sent no later
        than ``sent_by``, when a deadline passed). LeaseLost if the claim moved."""

        def tx(conn: sa.Connection) -> SignalRecord | None:
            hold(conn, execution_id, fence)
            return take_next(conn, execution_id, channel, sent_by)

        return await self.db.write(tx)

    async def consume_signal(
        self, channel: str, *, execution_id: str | None = None, fence: int | None = None
    ) -> SignalRecord | None:
        """Take and remove the oldest free signal of ``channel`` now, in one
        transaction: flatmachines' ``consume`` for a caller that is not a
        waiting run of the runner (which reserves, see ``reserve_signal``). A
        signal given to a waiter is that waiter's and is not taken. With
        ``execution_id`` and ``fence`` the caller is a claimed run: LeaseLost if
        the claim moved, and a signal given to that run is taken first."""

        def tx(conn: sa.Connection) -> SignalRecord | None:
            if execution_id is not None:
                hold(conn, execution_id, fence or 0)
            # serialised with send and park: a signal being given to a waiter
            # is never taken from under it
            self.db.dialect.lock_channel(conn, channel)
            free = signals.c.assigned_to.is_(None)
            order: list[Any] = [signals.c.id]
            if execution_id is not None:
                mine = signals.c.assigned_to == execution_id
                free = sa.or_(free, mine)
                order = [sa.case((mine, 0), else_=1), signals.c.id]
            row = (
                conn.execute(
                    sa.select(signals)
                    .where(signals.c.channel == channel, _UNCONSUMED, free)
                    .order_by(*order)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            # removed, as the library's consume removes it: nothing is left for
            # retention, and no later consume or peek sees it
            conn.execute(sa.delete(signals).where(signals.c.id == row["id"]))
            return SignalRecord.from_row(row)

        return await self.db.write(tx)

    async def pending_signals(self, channel: str | None = None) -> list[SignalRecord]:
        """Signals not yet consumed, oldest first."""
        stmt = sa.select(signals).where(_UNCONSUMED).order_by(signals.c.id)
        if channel is not None:
            stmt = stmt.where(signals.c.channel == channel)

        def tx(conn: sa.Connection) -> list[SignalRecord]:
            return [SignalRecord.from_row(r) for r in conn.execute(stmt).mappings()]

        return await self.db.read(tx)

    async def signal_channels(self) -> list[str]:
        """Channels with signals not yet consumed."""

        def tx(conn: sa.Connection) -> list[str]:
            stmt = sa.select(signals.c.channel).where(_UNCONSUMED).distinct()
            return sorted(conn.scalars(stmt).all())

        return await self.db.read(tx)
