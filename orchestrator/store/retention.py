"""Retention: finished executions go, with everything of theirs.

An execution is removed whole or not at all: its row and every row it owns
(``delete_owned``: its checkpoints, the signals it was given) go in one
transaction, so a prune stopped halfway (killed, the database gone) leaves no
execution without its history or history without its execution. Batches are
small (``BATCH`` executions a transaction), so no transaction holds the write
lock long beside running workers.

Never removed: an unfinished execution, and a finished child whose root is
unfinished (its parent may still read its result). The delete names its own
condition again, so an execution retried (queued again) after it was chosen
stays. An id submitted again after its prune is a new execution: nothing of
the old one is left to be returned or resumed. Configs are kept by hash for
whoever submits them again and are not removed here; neither are signals
nobody was given (a signal sent before anyone waits is kept until consumed).

Who calls it: the leader scheduler's retention job (machines/retention.yml,
``ORCH_RETENTION``), a batch a state, a bounded number of batches a run;
``orch prune`` on demand; and flatmachines' ``PersistenceBackend.prune``
(``prune_checkpoint_sets``).

Space: SQLite puts the pages a batch frees on its freelist and the next
inserts reuse them (auto_vacuum is NONE, as in every store this project ever
created; INCREMENTAL or FULL, set by an operator, reuse or return them too),
so a file whose retention removes as much as comes in stops growing with no
VACUUM. On PostgreSQL a deleted row's space is reused only once a vacuum has
passed; autovacuum may be off, or far behind on a table this busy, so after a
run that removed something the leader vacuums the tables it removed from
(``reclaim``): a plain VACUUM takes no lock that blocks reads or writes, and
TRUNCATE false keeps it from the exclusive lock that would hand the file's
tail back (the space is for the next rows anyway). Its cost follows what
changed since the last one. bench/w10_retention.py measures both stores.
"""

from __future__ import annotations

import contextlib
import logging
import math
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

log = logging.getLogger(__name__)

BATCH = 200  # executions a transaction removes
# the tables a prune removes rows from, vacuumed after it on PostgreSQL; a table
# delete_owned() deletes from goes here too
RECLAIMED = (executions, checkpoints, signals, checkpoint_blobs, blobs)


@dataclass(frozen=True, slots=True)
class Pruned:
    executions: int = 0
    checkpoints: int = 0
    signals: int = 0
    results: int = 0
    locks: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(
            self.executions + other.executions,
            self.checkpoints + other.checkpoints,
            self.signals + other.signals,
            self.results + other.results,
            self.locks + other.locks,
        )


def delete_owned(conn: sa.Connection, ids: Sequence[str]) -> tuple[int, int]:
    """Delete every row these executions own, in the caller's transaction (the
    one that deletes their ``executions`` rows): (checkpoints, signals).

    The one place that says what an execution owns. A table that keeps rows of
    an execution (checkpoint content stored apart, links to shared values by
    hash, ...) adds its delete here, and a shared value goes here once no link
    is left to it."""
    cps = conn.execute(sa.delete(checkpoints).where(checkpoints.c.execution_id.in_(ids)))
    sig = conn.execute(sa.delete(signals).where(signals.c.assigned_to.in_(ids)))
    unlink_blobs(conn, ids)
    return cps.rowcount or 0, sig.rowcount or 0


def _count_owned(conn: sa.Connection, ids: sa.Select) -> tuple[int, int]:
    """What ``delete_owned`` would delete: (checkpoints, signals)."""
    cps = conn.scalar(sa.select(sa.func.count()).where(checkpoints.c.execution_id.in_(ids)))
    sig = conn.scalar(sa.select(sa.func.count()).where(signals.c.assigned_to.in_(ids)))
    return cps or 0, sig or 0


def _prunable(
    before: datetime | None, statuses: Sequence[str], keep_newest: int | None
) -> sa.ColumnElement[bool]:
    """Finished (of ``statuses``), its root finished too, and chosen: finished
    before ``before``, or not among the ``keep_newest`` most recently finished
    executions. Neither given: every finished one."""
    root = executions.alias("root")
    root_unfinished = (
        sa.select(root.c.id)
        .where(root.c.id == executions.c.root_id, root.c.status.not_in(FINAL_STATUSES))
        .exists()
    )
    chosen: list[sa.ColumnElement[bool]] = []
    if before is not None:
        chosen.append(executions.c.finished_at < before)
    if keep_newest is not None:
        newest = executions.alias("newest")
        kept = (
            sa.select(newest.c.id)
            .where(newest.c.status.in_(FINAL_STATUSES), newest.c.finished_at.is_not(None))
            .order_by(newest.c.finished_at.desc(), newest.c.id.desc())
            .limit(keep_newest)
        )
        chosen.append(executions.c.id.not_in(kept))
    return sa.and_(
        executions.c.status.in_(statuses),
        executions.c.finished_at.is_not(None),
        sa.or_(*chosen) if chosen else sa.true(),
        ~root_unfinished,
    )


class Retention:
    def __init__(self, db: Database):
        self.db = db

    async def prune(
        self,
        *,
        before: datetime | None,
        statuses: Sequence[str] = tuple(FINAL_STATUSES),
        dry_run: bool = False,
        limit: int | None = None,
        keep_newest: int | None = None,
    ) -> Pruned:
        """Remove finished executions (of ``statuses``) that finished before
        ``before`` (None: any time) or, with ``keep_newest``, are not among the
        that many most recently finished; at most ``limit`` of them, ``BATCH`` a
        transaction (a ``limit`` of ``BATCH`` or less is one transaction).
        ``dry_run`` counts them only."""
        bad = set(statuses) - set(FINAL_STATUSES)
        if bad:
            raise ValueError(f"not a finished status: {sorted(bad)}")
        condition = _prunable(before, statuses, keep_newest)
        if dry_run:
            counted = await self.db.read(lambda conn: self._count(conn, condition, limit))
            return replace(counted, **await self.db.read(lambda conn: _leftovers(conn, before)))
        total = Pruned()
        while limit is None or total.executions < limit:
            size = BATCH if limit is None else min(BATCH, limit - total.executions)
            done = await self.db.write(lambda conn, n=size: self._batch(conn, condition, n))
            total += done
            if done.executions < size:
                break
        swept = await self.db.write(lambda conn: _leftovers(conn, before, delete=True))
        return replace(total, **swept)

    async def prune_checkpoint_sets(
        self, *, max_age_seconds: float | None = None, max_count: int | None = None
    ) -> int:
        """flatmachines' ``PersistenceBackend.prune`` on this store: the number
        of executions removed.

        The library removes any execution's checkpoints by the age of its latest
        one; on a shared store of live executions that would take the history
        from under a long wait (a run parked for a signal or a timer) and leave
        rows without their checkpoints. Here a checkpoint set is an execution,
        removed whole under this module's rules: finished ones only (a finished
        child of an unfinished root stays), their age counted from when they
        finished (their last checkpoint). ``max_count`` keeps the N most recently
        finished; unfinished executions are neither removed nor counted. Neither
        limit given: nothing is removed, as in the library."""
        for name, value in (("max_age_seconds", max_age_seconds), ("max_count", max_count)):
            if value is not None and (value < 0 or math.isnan(value)):
                raise ValueError(f"{name} must be non-negative")
        if max_age_seconds is None and max_count is None:
            return 0
        before = None
        if max_age_seconds is not None:
            try:
                before = utcnow() - timedelta(seconds=float(max_age_seconds))
            except OverflowError:  # longer ago than datetime goes: nothing is that old
                before = datetime.min
        done = await self.prune(before=before, keep_newest=max_count)
        return done.executions

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

    async def reclaim(self) -> bool:
        """PostgreSQL: VACUUM the tables a prune removed rows from, so that their
        space is reused (see the module's opening); False when it did not run
        (SQLite, which needs none, or a vacuum that could not start at once)."""
        if self.db.dialect.name != "postgresql":
            return False
        return await self.db.call(self._vacuum)

    def _vacuum(self) -> bool:
        names = ", ".join(t.name for t in RECLAIMED)
        try:
            with self.db.engine.connect() as conn:
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                # another vacuum of these tables (autovacuum, an operator) is at it
                conn.exec_driver_sql("SET lock_timeout = '1s'")
                try:
                    conn.exec_driver_sql(f"VACUUM (TRUNCATE false) {names}")
                finally:  # the pooled connection goes back as it came
                    with contextlib.suppress(sa.exc.DBAPIError):
                        conn.exec_driver_sql("RESET lock_timeout")
        except sa.exc.DBAPIError as exc:  # the next run vacuums what this one could not
            log.info("retention: no vacuum this run (%s)", str(exc).splitlines()[0])
            return False
        return True

    @staticmethod
    def _count(conn: sa.Connection, condition: sa.ColumnElement[bool], limit: int | None) -> Pruned:
        chosen = sa.select(executions.c.id).where(condition).limit(limit).subquery()
        found = conn.scalar(sa.select(sa.func.count()).select_from(chosen)) or 0
        return Pruned(found, *_count_owned(conn, sa.select(chosen.c.id)))

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
        return Pruned(len(gone), *delete_owned(conn, gone))


def _leftovers(
    conn: sa.Connection, before: datetime | None, *, delete: bool = False
) -> dict[str, int]:
    """Results written before ``before`` and expired locks: counted, or removed."""
    old_results = results.c.created_at < before if before is not None else sa.false()
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
