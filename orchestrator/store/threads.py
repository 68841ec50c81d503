"""The store's threads: where each transaction runs, whole and synchronous.

A transaction goes to a thread with one queue put, and its result comes back
with one wake-up of the caller's loop. ``loop.run_in_executor`` does the same
through a ``concurrent.futures.Future`` chained to an asyncio one: a lock and a
condition per call, and callbacks on both sides. A worker makes a hop for every
commit, so the plain hand-over is worth its few lines.

Semantics kept from ``run_in_executor``: a call whose caller was cancelled
before a thread took it does not run; one already running finishes (its result
is dropped); after ``shutdown`` no call is taken.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class StoreThreads:
    def __init__(self, size: int, name: str = "store"):
        self.size = size
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, loop: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> asyncio.Future:
        """``fn()`` on one of the threads; its result (or error) in the future."""
        if self._closed:
            raise RuntimeError("cannot schedule new calls after shutdown")
        if len(self._threads) < self.size:
            self._start()
        future = loop.create_future()
        self._queue.put((fn, future, loop))
        return future

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self.size and not self._closed:
                thread = threading.Thread(
                    target=self._serve, name=f"{self.name}_{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _serve(self) -> None:
        take = self._queue.get
        while True:
            item = take()
            if item is None:
                return
            fn, future, loop = item
            if future.cancelled():  # its caller gave up before it started
                continue
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - the caller's to handle
                _hand_back(loop, _fail, future, exc)
            else:
                _hand_back(loop, _succeed, future, result)
            del item, fn, future, loop

    def shutdown(self) -> None:
        """Take no more calls; let the threads finish what they were given, and end."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()


def _hand_back(loop: asyncio.AbstractEventLoop, how: Callable, future: Any, value: Any) -> None:
    try:
        loop.call_soon_threadsafe(how, future, value)
    except RuntimeError:
        pass  # the caller's loop is closed: nobody is left to hear of it


def _succeed(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
