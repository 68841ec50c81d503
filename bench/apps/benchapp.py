"""Hooks for the benchmark machines: ``orch worker --app bench.apps.benchapp``.

``add`` adds 1 to ``context.counter`` (the 3-step workflow, W1/W2/W4/W5);
``slow`` sleeps ``context.sleep`` seconds without blocking the event loop, then
adds 1 (W3 kills a worker in the middle of it). ``agent``: W9's agent loop
(bench/apps/agentloop.py).
"""

from __future__ import annotations

import asyncio

from flatmachines import HooksRegistry, MachineHooks

from bench.apps.agentloop import AgentLoopHooks


class BenchHooks(MachineHooks):
    async def on_action(self, state_name, action_name, context):
        if action_name == "slow":
            await asyncio.sleep(float(context.get("sleep") or 1))
        elif action_name != "add":
            raise ValueError(f"bench hooks have no action '{action_name}'")
        context["counter"] = int(context.get("counter") or 0) + 1
        return context


def make_registry() -> HooksRegistry:
    registry = HooksRegistry()
    registry.register("bench", BenchHooks)
    registry.register("agent", AgentLoopHooks)
    return registry


hooks_registry = make_registry()
