"""Retention: finished executions go, with everything of theirs.

An execution is removed whole or not at all: its row, its checkpoints and the
signals it was given go in one transaction, so a prune stopped halfway (killed,
the database gone) leaves no execution without its history or history without
its execution. Batches are small, so no transaction holds the write lock long
beside running workers.

Never removed: an unfinished execution, and a finished child whose root is
unfinished (its parent may still read its result). The delete names its own
condition again, so an execution retried (queued again) after it was chosen
stays. An id submitted again after its prune is a new execution: nothing of
the old one is left to be returned. Configs are kept by hash for whoever
submits them again and are not removed here.

Beside executions, a prune removes the rows of flatmachines' contracts that
belong to no execution: results written before the same cut-off (a result is
finished when it is written) and locks whose time ran out (they hold nothing).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import sqlalchemy as sa

from ..clock import utcnow
from .db import Database
from .models import (
    FINAL_STATUSES,
    blobs,
    checkpoint_blobs,
    checkpoints,
    executions,
    locks,
    results,
    signals,
)

# A blob no execution links is removed once it was not named for this long. A
# writer that names a blob its execution does not link yet moves its used_at
# in the transaction that links it; on PostgreSQL a delete that meets that
# write re-reads used_at but not the link, so the grace must outlast any
# writer's transaction (and the clocks' skew).
BLOB_GRACE = timedelta(hours=1)

BATCH = 200  # executions a transaction removes


@dataclass(frozen=True, slots=True)
class Pruned:
    executions: int = 0
    checkpoints: int = 0
    signals: int = 0
    results: int = 0
    locks: int = 0


def _prunable(before: datetime, statuses: Sequence[str]) -> sa.ColumnElement[bool]:
    root = executions.alias("root")
    root_unfinished = (
        sa.select(root.c.id)
        .where(root.c.id == executions.c.root_id, root.c.status.not_in(FINAL_STATUSES))
        .exists()
    )
    return sa.and_(
        executions.c.status.in_(statuses),
        executions.c.finished_at.is_not(None),
        executions.c.finished_at < before,
        ~root_unfinished,
    )


class Retention:
    def __init__(self, db: Database):
        self.db = db

    async def prune(
        self,
        *,
        before: datetime,
        statuses: Sequence[str] = tuple(FINAL_STATUSES),
        dry_run: bool = False,
        limit: int | None = None,
    ) -> Pruned:
        """Remove finished executions (of ``statuses``) that finished before
        ``before``, at most ``limit`` of them; ``dry_run`` counts them only."""
        bad = set(statuses) - set(FINAL_STATUSES)
        if bad:
            raise ValueError(f"not a finished status: {sorted(bad)}")
        condition = _prunable(before, statuses)
        if dry_run:
            counted = await self.db.read(lambda conn: self._count(conn, condition, limit))
            return replace(counted, **await self.db.read(lambda conn: _leftovers(conn, before)))
        total = Pruned()
        while limit is None or total.executions < limit:
            size = BATCH if limit is None else min(BATCH, limit - total.executions)
            done = await self.db.write(lambda conn, n=size: self._batch(conn, condition, n))
            total = Pruned(*(a + b for a, b in zip(_fields(total), _fields(done), strict=True)))
            if done.executions < size:
                break
        swept = await self.db.write(lambda conn: _leftovers(conn, before, delete=True))
        return replace(total, **swept)

    @staticmethod
    def _count(conn: sa.Connection, condition: sa.ColumnElement[bool], limit: int | None) -> Pruned:
        chosen = sa.select(executions.c.id).where(condition).limit(limit).subquery()
        ids = sa.select(chosen.c.id)
        return Pruned(
            executions=conn.scalar(sa.select(sa.func.count()).select_from(chosen)) or 0,
            checkpoints=conn.scalar(
                sa.select(sa.func.count()).where(checkpoints.c.execution_id.in_(ids))
            )
            or 0,
            signals=conn.scalar(sa.select(sa.func.count()).where(signals.c.assigned_to.in_(ids)))
            or 0,
        )

    @staticmethod
    def _batch(conn: sa.Connection, condition: sa.ColumnElement[bool], size: int) -> Pruned:
        chosen = [
            r[0] for r in conn.execute(sa.select(executions.c.id).where(condition).limit(size))
        ]
        if not chosen:
            return Pruned()
        # the condition again: a row retried since it was read is not removed
        gone = [
            r[0]
            for r in conn.execute(
                sa.delete(executions)
                .where(executions.c.id.in_(chosen), condition)
                .returning(executions.c.id)
            )
        ]
        if not gone:
            return Pruned()
        cps = conn.execute(sa.delete(checkpoints).where(checkpoints.c.execution_id.in_(gone)))
        sig = conn.execute(sa.delete(signals).where(signals.c.assigned_to.in_(gone)))
        unlink_blobs(conn, gone)
        return Pruned(len(gone), cps.rowcount or 0, sig.rowcount or 0)

    async def sweep_blobs(self, *, limit: int = BATCH) -> int:
        """Remove blobs nothing links that were not named for ``BLOB_GRACE``
        (those a removal left for their grace), at most ``limit``."""

        def tx(conn: sa.Connection) -> int:
            unlinked = ~sa.exists().where(checkpoint_blobs.c.hash == blobs.c.hash)
            old = blobs.c.used_at < utcnow() - BLOB_GRACE
            chosen = conn.scalars(sa.select(blobs.c.hash).where(old, unlinked).limit(limit)).all()
            if not chosen:
                return 0
            return (
                conn.execute(
                    sa.delete(blobs).where(blobs.c.hash.in_(chosen), old, unlinked)
                ).rowcount
                or 0
            )

        return await self.db.write(tx)


def _fields(p: Pruned) -> tuple[int, int, int]:
    return (p.executions, p.checkpoints, p.signals)


def unlink_blobs(
    conn: sa.Connection, execution_ids: str | Sequence[str], *, keep: Collection[str] = ()
) -> int:
    """Remove the executions' links to blobs (but those in ``keep``), and the
    blobs of those links that nothing links any more, unless named within
    ``BLOB_GRACE`` (``sweep_blobs`` takes them later). Returns blobs removed."""
    ids = [execution_ids] if isinstance(execution_ids, str) else list(execution_ids)
    mine = checkpoint_blobs.c.execution_id.in_(ids)
    linked = conn.scalars(sa.select(checkpoint_blobs.c.hash).where(mine)).all()
    hashes = [h for h in linked if h not in keep]
    if not hashes:
        return 0
    removed = 0
    for i in range(0, len(hashes), 500):
        part = hashes[i : i + 500]
        conn.execute(sa.delete(checkpoint_blobs).where(mine, checkpoint_blobs.c.hash.in_(part)))
        removed += (
            conn.execute(
                sa.delete(blobs).where(
                    blobs.c.hash.in_(part),
                    blobs.c.used_at < utcnow() - BLOB_GRACE,
                    ~sa.exists().where(checkpoint_blobs.c.hash == blobs.c.hash),
                )
            ).rowcount
            or 0
        )
    return removed


def _leftovers(conn: sa.Connection, before: datetime, *, delete: bool = False) -> dict[str, int]:
    """Results written before ``before`` and expired locks: counted, or removed."""
    old_results = results.c.created_at < before
    expired = locks.c.expires_at <= utcnow()
    if not delete:
        return {
            "results": conn.scalar(sa.select(sa.func.count()).where(old_results)) or 0,
            "locks": conn.scalar(sa.select(sa.func.count()).where(expired)) or 0,
        }
    return {
        "results": conn.execute(sa.delete(results).where(old_results)).rowcount or 0,
        "locks": conn.execute(sa.delete(locks).where(expired)).rowcount or 0,
    }
