"""Hook methods as the library calls them through OffLoopHooks: plain ones on the
pool's threads, async ones and the library's defaults on the loop, and every
on_action called with the arguments its signature asks for."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from flatmachines import MachineHooks
from flatmachines.actions import HookAction

from orchestrator.offloop import off_loop


class SyncHooks(MachineHooks):
    def on_action(self, state_name, action_name, context):
        return {**context, "seen": [state_name, action_name, threading.current_thread().name]}


class LegacySyncHooks(MachineHooks):
    def on_action(self, action_name, context):  # the library's two-argument form
        return {**context, "seen": [action_name, threading.current_thread().name]}


class LegacyAsyncHooks(MachineHooks):
    async def on_action(self, action_name, context):
        return {**context, "seen": [action_name, threading.current_thread().name]}


class AsyncHooks(MachineHooks):
    async def on_action(self, state_name, action_name, context):
        return {**context, "seen": [state_name, action_name, threading.current_thread().name]}


def _act(hooks_class: type) -> list[dict]:
    """The library's HookAction on wrapped hooks, twice (the second from what the
    first learned about the class)."""

    async def main() -> list[dict]:
        with ThreadPoolExecutor(2, thread_name_prefix="hooks") as pool:
            out = []
            for _ in range(2):
                action = HookAction(off_loop(hooks_class(), pool), "s")
                out.append(await action.execute("act", {"n": 1}, {}))
            return out

    return asyncio.run(main())


def test_a_plain_on_action_runs_on_a_pool_thread_with_its_three_arguments():
    for result in _act(SyncHooks):
        assert result["n"] == 1
        assert result["seen"][:2] == ["s", "act"]
        assert result["seen"][2].startswith("hooks")


def test_a_two_argument_on_action_gets_two_arguments_sync_or_async():
    for result in _act(LegacySyncHooks):
        assert result["seen"][0] == "act" and result["seen"][1].startswith("hooks")
    for result in _act(LegacyAsyncHooks):
        assert result["seen"] == ["act", "MainThread"]


def test_an_async_on_action_stays_on_the_loop():
    for result in _act(AsyncHooks):
        assert result["seen"] == ["s", "act", "MainThread"]


def test_the_library_default_hooks_pass_the_context_through():
    for result in _act(MachineHooks):
        assert result == {"n": 1}


def test_a_plain_hook_that_raises_raises_in_the_caller():
    class Boom(MachineHooks):
        def on_state_enter(self, state_name, context):
            raise RuntimeError(f"boom in {state_name}")

    async def main() -> str:
        with ThreadPoolExecutor(1, thread_name_prefix="hooks") as pool:
            hooks = off_loop(Boom(), pool)
            try:
                await hooks.on_state_enter("s", {})
            except RuntimeError as exc:
                return str(exc)
            return "no error"

    assert asyncio.run(main()) == "boom in s"


def test_only_the_library_defaults_are_skipped_as_pass_through():
    from orchestrator.offloop import passes_through

    class Enter(MachineHooks):
        def on_state_enter(self, state_name, context):
            return {"replaced": True}

        async def on_transition(self, from_state, to_state, context):
            return "elsewhere"

    with ThreadPoolExecutor(1) as pool:
        for hooks in (Enter(), off_loop(Enter(), pool)):
            assert passes_through(hooks, "on_state_enter") is None
            assert passes_through(hooks, "on_transition") is None
            assert passes_through(hooks, "on_state_exit") == 2  # (state, context, output)
            assert passes_through(hooks, "on_action") is None  # never skipped
            assert passes_through(hooks, "on_error") is None
        patched = MachineHooks()
        patched.on_state_exit = lambda state, context, output: {"patched": True}
        assert passes_through(patched, "on_state_exit") is None
        assert passes_through(off_loop(patched, pool), "on_state_exit") is None
        assert passes_through(off_loop(MachineHooks(), pool), "on_machine_end") == 1
        assert passes_through(object(), "on_state_enter") is None  # not the library's class
