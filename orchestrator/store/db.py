"""One database: its engines, its dialect, and the one way to run a transaction.

Every aggregate of the store (executions, checkpoints, workers, …) holds the
same ``Database`` and runs its verbs through ``read`` / ``write`` (SQLAlchemy
Core) or ``on_cursor`` (the driver's own cursor, for the few hot statements).
Each transaction runs whole on one of the store's threads: one thread hop per
transaction, where an async driver costs several. Lock contention and a
database that does not answer are waited out for up to ``patience`` seconds
(engine.py), then ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

from ..settings import Settings
from . import engine as eng
from . import wake
from .dialect import POOL_SIZE, Dialect, dialect_of
from .group import GroupCommit
from .threads import StoreThreads

T = TypeVar("T")


class Database:
    def __init__(self, url: sa.URL, settings: Settings, *, patience: float | None = None):
        self.url = url
        self.settings = settings
        self.dialect: Dialect = dialect_of(url)
        # seconds a transaction waits out a store that does not answer
        self.patience = settings.store_patience if patience is None else patience
        busy = settings.sqlite_busy_timeout_ms
        self.engine = eng.create_engine(url, synchronous=settings.sqlite_synchronous, busy_ms=busy)
        # Progress markers (a checkpoint that is not a durability point) commit
        # without waiting for the disk. The next durable commit flushes the log
        # up to and including them, so nothing durable ever depends on them.
        self.progress_engine = self.dialect.progress_engine(
            url, self.engine, busy_ms=busy, create=eng.create_engine
        )
        self.driver = eng.Driver(self.engine, patience=self.patience)
        self.progress_driver = eng.Driver(self.progress_engine, patience=self.patience)
        self._threads = StoreThreads(POOL_SIZE, "store")
        # the hot writes of this process's executions share commits (group.py)
        self.group = GroupCommit(self.driver, self.call)
        if self.dialect.name == "sqlite":
            # One writer at a time: a group of its own for the markers would only
            # take turns with this one for the write lock, each turn a commit and a
            # hand-over between threads. They share this group's commits instead
            # (which wait for the disk; on this store that is well under a ms).
            self.progress_group = self.group
        else:
            self.progress_group = GroupCommit(self.progress_driver, self.call)

    async def run(
        self,
        fn: Callable[[sa.Connection], T],
        *,
        write: bool,
        durable: bool = True,
        patience: float | None = None,
    ) -> T:
        """``fn(connection)`` in one transaction; ``fn`` must be safe to run again."""
        engine = self.engine if durable else self.progress_engine
        wait = self.patience if patience is None else patience
        return await self.call(lambda: eng.run_transaction(engine, fn, write=write, patience=wait))

    async def write(self, fn: Callable[[sa.Connection], T]) -> T:
        return await self.run(fn, write=True)

    async def read(self, fn: Callable[[sa.Connection], T]) -> T:
        return await self.run(fn, write=False)

    async def on_cursor(self, fn: Callable[[Any], T], *, durable: bool = True) -> T:
        """``fn(cursor)`` committed on the driver's own cursor, in a transaction
        it may share with the other hot writes of this process (group.py).
        ``fn`` must be safe to run again, and raise (not half-write) when it
        refuses: the batch is then rolled back and run a write at a time."""
        return await (self.group if durable else self.progress_group).run(fn)

    async def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on one of the store's threads."""
        return await self._threads.submit(asyncio.get_running_loop(), fn)

    async def wake(self) -> None:
        """Work may be runnable now: wake idle workers (wake.py). Never fails a
        caller whose own transaction committed."""
        try:
            if self.dialect.name == "sqlite":
                wake.poke_sqlite(self.url)
            else:
                await self.run(wake.notify_postgres, write=True, patience=0)
        except Exception:  # noqa: BLE001 - the workers' poll is the fallback
            pass

    @staticmethod
    def cursor(conn: sa.Connection) -> Any:
        """The driver's own cursor inside a Core transaction, for a raw statement
        of the hot path (checkpoints.py) on a path that is not hot."""
        return conn.connection.cursor()

    def insert(self, table: sa.Table) -> Any:
        return self.dialect.insert(table)

    async def upgrade(self) -> None:
        await self.call(
            lambda: eng.upgrade(
                self.url,
                synchronous=self.settings.sqlite_synchronous,
                busy_ms=self.settings.sqlite_busy_timeout_ms,
            )
        )

    async def close(self) -> None:
        def dispose() -> None:
            self.engine.dispose()
            self.progress_engine.dispose()

        await self.call(dispose)
        self._threads.shutdown()
