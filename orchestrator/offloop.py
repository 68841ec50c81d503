"""Plain (sync) hook methods run off the event loop, on the worker's threads.

A worker runs many executions on one event loop. flatmachines calls a hook
method that is not a coroutine function right on that loop, so one blocking
call (a sync LLM or HTTP client, ``time.sleep``) would stop every execution of
the process, their lease-keeping markers included. ``OffLoopHooks`` wraps a
state's hooks so each such method runs on a thread of a pool sized to the
worker's concurrency; async hook methods stay on the loop.

What a hook author keeps: a hooks object is made per execution (and state), and
an execution runs one hook at a time, so the hooks instance and the context it
is handed are never touched by two threads at once. State shared between
executions (module globals, a client object you build once) is shared between
threads: make it thread-safe, as a sync web framework's handlers must be.

A thread cannot be stopped. A run's calls on threads are counted (``HookCalls``)
so that a run stopped by a shutdown keeps its claim until they return, and is
released only then: nothing of it goes on after the release. The threads are
daemons, so a hook that never returns ends with its process (a second signal)
instead of holding it open.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import queue
import threading
from concurrent.futures import Executor, Future
from typing import Any

from flatmachines.hooks import CompositeHooks, MachineHooks

# the hook methods flatmachines awaits when they return a coroutine
HOOK_METHODS = frozenset(
    {
        "on_machine_start",
        "on_machine_end",
        "on_state_enter",
        "on_state_exit",
        "on_transition",
        "on_error",
        "on_action",
        "on_tool_calls",
        "on_tool_result",
    }
)


class HookThreads(Executor):
    """Up to ``size`` daemon threads, started as calls need them.

    ThreadPoolExecutor's threads are joined when the interpreter exits, so one
    hook blocked in ``time.sleep`` or a hung socket would keep a stopped worker's
    process alive, and the hook's side effects going, while its execution runs
    again elsewhere."""

    def __init__(self, size: int, name: str = "hooks"):
        self.size = max(1, size)
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put((future, fn, args, kwargs))
            # a thread that finished its last call takes this one; else a new one
            if not self._idle.acquire(blocking=False) and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._serve, name=f"{self.name}_{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        return future

    def _serve(self) -> None:
        take = self._queue.get
        while True:
            item = take()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - the caller's to handle
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            del item, future, fn, args, kwargs
            self._idle.release()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()


class HookCalls:
    """The sync hook calls of one run that were handed to a thread."""

    __slots__ = ("_calls",)

    def __init__(self) -> None:
        self._calls: set[Future] = set()

    def add(self, future: Future) -> None:
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)  # from the thread: set ops are atomic

    @property
    def busy(self) -> bool:
        """A call of this run is still on a thread (or waiting for one)."""
        return any(not f.done() for f in list(self._calls))

    async def settled(self) -> None:
        """Until every call of this run has returned."""
        pending = [f for f in list(self._calls) if not f.done()]
        if pending:
            await asyncio.wait([asyncio.wrap_future(f) for f in pending])


_HOOK_CALLS: contextvars.ContextVar[HookCalls | None] = contextvars.ContextVar(
    "orch_hook_calls", default=None
)


def track_hook_calls() -> HookCalls:
    """Count the sync hook calls made from here on in this task (one run)."""
    calls = HookCalls()
    _HOOK_CALLS.set(calls)
    return calls


class OffLoopHooks:
    """``hooks`` with each plain hook method run on ``executor``."""

    def __init__(self, hooks: Any, executor: Executor):
        self._hooks = hooks
        self._executor = executor

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._hooks, name)
        if name not in HOOK_METHODS or not callable(attr):
            return attr
        kind, signature = _kind(attr, name)
        if kind == "sync":
            executor = self._executor

            @functools.wraps(attr)
            async def off_loop(*args: Any, **kwargs: Any) -> Any:
                run = functools.partial(contextvars.copy_context().run, attr, *args, **kwargs)
                future = executor.submit(run)
                calls = _HOOK_CALLS.get()
                if calls is not None:
                    calls.add(future)
                return await asyncio.wrap_future(future)

            # the library reads on_action's signature: known, not computed per call
            off_loop.__signature__ = signature  # type: ignore[attr-defined]
            return off_loop
        if signature is not None:
            return _Signed(attr, signature)
        return attr  # async, or the library's pass-through default: stays on the loop


class _Signed:
    """A bound hook method with its signature at hand: the library reads
    ``on_action``'s signature on every action, and ``inspect`` computes a
    bound method's anew each time."""

    __slots__ = ("_method", "__signature__")

    def __init__(self, method: Any, signature: inspect.Signature):
        self._method = method
        self.__signature__ = signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._method(*args, **kwargs)


# (function, name) -> ("sync" | "loop", the bound method's signature when the
# library reads it: on_action's, and any sync method's, whose wrapper shows it)
_KINDS: dict[tuple[Any, str], tuple[str, inspect.Signature | None]] = {}


def _kind(method: Any, name: str) -> tuple[str, inspect.Signature | None]:
    func = getattr(method, "__func__", None)
    key = (func if func is not None else method, name)
    known = _KINDS.get(key) if func is not None else None
    if known is not None:
        return known
    if inspect.iscoroutinefunction(method) or func is getattr(MachineHooks, name, None):
        kind = "loop"  # async, or the library's pass-through default
    else:
        kind = "sync"
    signature = None
    if kind == "sync" or name == "on_action":
        try:
            signature = inspect.signature(method)
        except (TypeError, ValueError):
            signature = None
    known = (kind, signature)
    if func is not None and len(_KINDS) < 4096:  # methods of classes: few, and kept
        _KINDS[key] = known
    return known


def off_loop(hooks: Any, executor: Executor | None) -> Any:
    """Wrap ``hooks`` unless there is no pool, or it composes hooks (whose
    members may be async, and must be awaited on the loop)."""
    if executor is None or hooks is None or isinstance(hooks, CompositeHooks):
        return hooks
    return OffLoopHooks(hooks, executor)


# The library's default hook methods hand back one of their arguments unchanged
# (MachineHooks): which one, by method.
_GIVEN_BACK = {
    "on_machine_start": 0,
    "on_machine_end": 1,
    "on_state_enter": 1,
    "on_state_exit": 2,
    "on_transition": 1,
}
_DEFAULTS: dict[type, frozenset[str]] = {}


def passes_through(hooks: Any, name: str) -> int | None:
    """The index of the argument ``hooks.<name>`` would hand back unchanged,
    when it is the library's default (not overridden): the caller can skip
    the call. None otherwise."""
    given = _GIVEN_BACK.get(name)
    if given is None:
        return None
    inner = hooks._hooks if type(hooks) is OffLoopHooks else hooks
    cls = type(inner)
    defaults = _DEFAULTS.get(cls)
    if defaults is None:
        defaults = frozenset(
            n
            for n in _GIVEN_BACK
            if isinstance(inner, MachineHooks) and getattr(cls, n, None) is getattr(MachineHooks, n)
        )
        if len(_DEFAULTS) < 4096:
            _DEFAULTS[cls] = defaults
    if name not in defaults or name in getattr(inner, "__dict__", ()):
        return None
    return given
