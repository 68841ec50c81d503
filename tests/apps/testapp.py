"""Hooks the tests run inside real `orch worker` processes (--app testapp).

Side effects go to the file named by ORCH_TEST_EFFECTS, one line per action run:
"<execution id> <state> <idempotency key> <pid>", appended atomically, so a test
counts from outside how often each state really ran.
"""

import asyncio
import os
import signal
import threading

from flatmachines import HooksRegistry, MachineHooks

from orchestrator import idempotency_key


def record(context, state_name):
    path = os.environ.get("ORCH_TEST_EFFECTS")
    if not path:
        return
    ex_id = context["machine"]["execution_id"]
    line = f"{ex_id} {state_name} {idempotency_key(context)} {os.getpid()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


RENDEZVOUS = threading.Barrier(int(os.environ.get("ORCH_TEST_PARTIES") or 1))


def held(context) -> bool:
    """Whether the test still holds the state: until the file ORCH_TEST_GO names exists."""
    return not os.path.exists(os.environ["ORCH_TEST_GO"])


class EffectsHooks(MachineHooks):
    """`add` adds 1 to context.acc; `slow_add` sleeps context.sleep seconds first.

    If context.crash_after names a state, the process SIGKILLs itself right after
    that state's state_exit checkpoint, once (a marker file beside the effects
    file remembers it happened).
    """

    async def on_action(self, state_name, action_name, context):
        record(context, state_name)
        if action_name == "slow_add":
            await asyncio.sleep(float(context.get("sleep") or 1))
        elif action_name == "sync_sleep":
            import time

            time.sleep(float(context.get("sleep") or 1))
        elif action_name == "held_add":  # runs until the test lets it go
            while held(context):
                await asyncio.sleep(0.02)
        elif action_name == "fail":
            raise RuntimeError("the workflow failed on purpose")
        elif action_name == "answer":  # an agent's turn: one more long answer in its history
            turn = len(context.get("history") or [])
            context["history"] = [*(context.get("history") or []), f"answer {turn} " + "z" * 1500]
        elif action_name == "grow":  # a context of about input.grow bytes
            context["blob"] = "x" * int(context.get("grow") or 0)
        elif action_name == "probe":  # the worker process's settings, for a test
            import gc
            import sys

            context["switch_interval"] = sys.getswitchinterval()
            context["gc_threshold"] = list(gc.get_threshold())
        context["acc"] = int(context.get("acc") or 0) + 1
        context["by"] = os.getpid()
        return context

    def on_state_exit(self, state_name, context, output):
        if context.get("crash_after") == state_name:
            marker = os.environ["ORCH_TEST_EFFECTS"] + f".crashed-{state_name}"
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
        return output


class SyncHooks(MachineHooks):
    """Plain (not async) hooks, as a sync LLM or HTTP client would be written.

    `rendezvous` blocks (the thread) until ORCH_TEST_PARTIES executions of this
    process are inside it at once: it can only pass if they run side by side.

    `held_write` records "<state>:entered", blocks (the thread) until the test
    lets it go, and only then makes its side effect: the state's effect line, and
    "effect <execution id> <state>" on stderr, which the worker's log shares."""

    def on_action(self, state_name, action_name, context):
        if action_name == "held_write":
            import sys
            import time

            record(context, f"{state_name}:entered")
            while held(context):
                time.sleep(0.02)
            print(f"effect {context['machine']['execution_id']} {state_name}", file=sys.stderr)
        record(context, state_name)
        if action_name == "rendezvous":
            RENDEZVOUS.wait(timeout=30)
        context["acc"] = int(context.get("acc") or 0) + 1
        return context


hooks_registry = HooksRegistry()
hooks_registry.register("effects", EffectsHooks)
hooks_registry.register("sync", SyncHooks)
