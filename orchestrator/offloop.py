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
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from concurrent.futures import Executor
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


class OffLoopHooks:
    """``hooks`` with each plain hook method run on ``executor``."""

    def __init__(self, hooks: Any, executor: Executor):
        self._hooks = hooks
        self._executor = executor

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._hooks, name)
        if (
            name not in HOOK_METHODS
            or not callable(attr)
            or inspect.iscoroutinefunction(attr)
            or getattr(attr, "__func__", None) is getattr(MachineHooks, name, None)
        ):
            return attr  # async, or the library's pass-through default: stays on the loop
        executor = self._executor

        @functools.wraps(attr)  # the library reads on_action's signature
        async def off_loop(*args: Any, **kwargs: Any) -> Any:
            run = functools.partial(contextvars.copy_context().run, attr, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(executor, run)

        return off_loop


def off_loop(hooks: Any, executor: Executor | None) -> Any:
    """Wrap ``hooks`` unless there is no pool, or it composes hooks (whose
    members may be async, and must be awaited on the loop)."""
    if executor is None or hooks is None or isinstance(hooks, CompositeHooks):
        return hooks
    return OffLoopHooks(hooks, executor)
