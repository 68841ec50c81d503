"""Group commit: the hot writes of one process's executions share a commit.

A worker running many executions at once makes, for each of them, a small
write at every durability point (a ``state_exit``, an outcome). Each used to
be a transaction of its own: one commit, one disk flush (SQLite's write lock
taken once per write, PostgreSQL's WAL flushed once per write). Here the writes
that arrive while a commit is in flight wait for it to end, then go together in
the next transaction: one commit for all of them.

Durability is unchanged. A caller's ``run`` returns only once the transaction
that holds its write has committed, so an execution never starts its next state
before its own ``state_exit`` is durable, and a commit that fails fails every
write in it (none advances). Each write is its own fenced statements, run in
order in the shared transaction; one that raises (``LeaseLost``: its claim
moved on) rolls the batch back, and the batch is then run again one write per
transaction, so that only the write at fault sees its error. Checkpoint
commits whose claim moved on (an execution cancelled or recovered) are told
apart inside the batch instead (fenced.py): they write nothing and get their
``LeaseLost``, and the others still share one commit.

One batch is in flight per event loop and driver (a store thread runs it); a
write that finds nothing in flight and nothing waiting commits at once. A
batch's checkpoint commits are one fenced update (fenced.py). On PostgreSQL a
second batch goes in flight, on another connection, once many writes wait: the
server runs one batch while this process builds the next. Writes of one
execution never share or cross batches: each waits for its own commit.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import engine as eng
from .fenced import StaleOwner, mergeable, run_merged

T = TypeVar("T")

# the most writes one transaction carries (the rest go in the next one)
MAX_BATCH = 256
# PostgreSQL: a second batch goes in flight (on another connection) once this
# many writes wait; the server works on one while this process builds the other
SECOND_BATCH_AT = 16


class GroupCommit:
    def __init__(
        self,
        driver: eng.Driver,
        call: Callable[[Callable[[], Any]], Awaitable[Any]],
        *,
        max_batch: int = MAX_BATCH,
    ):
        self.driver = driver
        self._call = call  # runs a function on one of the store's threads
        self.max_batch = max_batch
        # SQLite has one writer: a second batch in flight would only queue on it
        self.max_in_flight = 1 if driver.dialect.name == "sqlite" else 2
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = (
            weakref.WeakKeyDictionary()
        )
        # the last loop's queue, looked up without the weak mapping (one loop, mostly)
        self._last: tuple[weakref.ref, _Queue] | None = None
        # figures for bench/: transactions made and writes carried
        self.commits = 0
        self.writes = 0

    async def run(self, fn: Callable[[Any], T]) -> T:
        """``fn(cursor)`` committed, in a transaction it may share with others."""
        loop = asyncio.get_running_loop()
        queue = self._queue(loop)
        if not queue.pending and not queue.in_flight:
            # nothing waits: this write commits at once, from this task (no
            # hop through a flush task); the writes that come meanwhile queue
            # behind it and go together in the next commit
            queue.in_flight += 1
            try:
                ((ok, value),) = await self._call(lambda: self._commit([fn]))
            finally:
                queue.in_flight -= 1
                self._maybe_flush(loop, queue)
            if ok:
                return value
            raise value
        future: asyncio.Future = loop.create_future()
        queue.pending.append((fn, future))
        self._maybe_flush(loop, queue)
        return await future

    def _queue(self, loop: asyncio.AbstractEventLoop) -> _Queue:
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        self._last = (weakref.ref(loop), queue)
        return queue

    def _maybe_flush(self, loop: asyncio.AbstractEventLoop, queue: _Queue) -> None:
        """A flush task for what waits: when nothing is in flight, or (on
        PostgreSQL) a second one when many writes wait."""
        if not queue.pending or queue.in_flight >= self.max_in_flight:
            return
        if queue.in_flight and len(queue.pending) < SECOND_BATCH_AT:
            return
        self._start_flush(loop, queue)

    def _start_flush(self, loop: asyncio.AbstractEventLoop, queue: _Queue) -> None:
        queue.in_flight += 1
        task = loop.create_task(self._flush(queue))
        queue.tasks.add(task)
        task.add_done_callback(queue.tasks.discard)

    async def _flush(self, queue: _Queue) -> None:
        batch: list[tuple[Callable[[Any], Any], asyncio.Future]] = []
        try:
            while queue.pending:
                batch = queue.pending[: self.max_batch]
                del queue.pending[: self.max_batch]
                fns = [fn for fn, _ in batch]
                try:
                    outcomes = await self._call(lambda fns=fns: self._commit(fns))
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # noqa: BLE001 - the store's error is each write's
                    outcomes = [(False, exc)] * len(batch)
                for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller was cancelled; the write stands or not alike
                        continue
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
                batch = []
        except asyncio.CancelledError:
            # the loop is going away: no caller is left to hear of these
            for _, future in batch + queue.pending:
                future.cancel()
            queue.pending.clear()
            raise
        finally:
            queue.in_flight -= 1
            self._maybe_flush(asyncio.get_running_loop(), queue)

    def _commit(self, fns: list[Callable[[Any], Any]]) -> list[tuple[bool, Any]]:
        """On a store thread: every write in one transaction, or, when one of
        them refuses, each in its own."""
        try:
            if mergeable(self.driver, fns):
                # the batch's checkpoint commits in one statement (SQLite: and
                # its rows in a few inserts)
                try:
                    outcomes = self.driver.run(
                        lambda cur: run_merged(cur, self.driver, fns), write=True
                    )
                except StaleOwner:
                    # one of them was cancelled or recovered: again, telling
                    # first who still holds what, and still one transaction
                    outcomes = self.driver.run(
                        lambda cur: run_merged(cur, self.driver, fns, sort=True), write=True
                    )
            else:
                outcomes = [(True, r) for r in self.driver.run_batch(fns)]
        except eng.BatchItemFailed as failed:
            if len(fns) == 1:
                return [(False, failed.error)]
            return [self._alone(fn) for fn in fns]
        self.commits += 1
        self.writes += len(fns)
        return outcomes

    def _alone(self, fn: Callable[[Any], Any]) -> tuple[bool, Any]:
        try:
            result = self.driver.run(fn, write=True)
        except Exception as exc:  # noqa: BLE001 - handed to its caller
            return (False, exc)
        self.commits += 1
        self.writes += 1
        return (True, result)


class _Queue:
    __slots__ = ("pending", "in_flight", "tasks")

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[Any], Any], asyncio.Future]] = []
        self.in_flight = 0  # commits in flight: writes that come now wait for the next
        self.tasks: set[asyncio.Task] = set()
