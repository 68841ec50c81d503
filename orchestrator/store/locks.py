"""Locks on any key: flatmachines' ExecutionLock beyond a claim's own.

A lock is one row: its key, its holder and when it expires. ``acquire_lock``
takes a key that is free, expired, or already the holder's own (acquiring
again renews it), in one statement against the row, so two acquirers of one
key never both succeed. The holder renews it while it holds it; a holder that
crashed stops renewing, and the key is free again once its time is up.
Release deletes the row (only the holder's); retention removes expired rows.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa

from ..clock import utcnow
from .db import Database
from .models import locks


class Locks:
    def __init__(self, db: Database):
        self.db = db

    async def acquire_lock(self, key: str, holder: str, ttl: float) -> bool:
        """Hold ``key`` for ``ttl`` seconds from now, if nobody else holds it."""

        def tx(conn: sa.Connection) -> bool:
            now = utcnow()
            until = now + timedelta(seconds=ttl)
            inserted = conn.execute(
                self.db.insert(locks)
                .values(key=key, holder=holder, acquired_at=now, expires_at=until)
                .on_conflict_do_nothing(index_elements=["key"])
                .returning(locks.c.key)
            ).first()
            if inserted is not None:
                return True
            taken = conn.execute(
                sa.update(locks)
                .where(
                    locks.c.key == key,
                    sa.or_(locks.c.holder == holder, locks.c.expires_at <= now),
                )
                .values(
                    holder=holder,
                    acquired_at=sa.case((locks.c.holder == holder, locks.c.acquired_at), else_=now),
                    expires_at=until,
                )
            )
            return taken.rowcount == 1

        return await self.db.write(tx)

    async def renew_lock(self, key: str, holder: str, ttl: float) -> bool:
        """Extend the holder's lock; False if it is not the holder's any more."""

        def tx(conn: sa.Connection) -> bool:
            until = utcnow() + timedelta(seconds=ttl)
            renewed = conn.execute(
                sa.update(locks)
                .where(locks.c.key == key, locks.c.holder == holder)
                .values(expires_at=until)
            )
            return renewed.rowcount == 1

        return await self.db.write(tx)

    async def release_lock(self, key: str, holder: str) -> None:
        """Give the lock up; a lock that is not the holder's is left as it is."""

        def tx(conn: sa.Connection) -> None:
            conn.execute(sa.delete(locks).where(locks.c.key == key, locks.c.holder == holder))

        await self.db.write(tx)

    async def lock_holder(self, key: str) -> tuple[str, datetime] | None:
        """Who holds ``key`` and until when (an expired row is nobody's)."""

        def tx(conn: sa.Connection) -> tuple[str, datetime] | None:
            row = conn.execute(
                sa.select(locks.c.holder, locks.c.expires_at).where(
                    locks.c.key == key, locks.c.expires_at > utcnow()
                )
            ).first()
            return (row.holder, row.expires_at) if row is not None else None

        return await self.db.read(tx)
