"""Hooks for the example workflows: `orch worker --app examples.app`."""

from flatmachines import HooksRegistry, MachineHooks


class CounterHooks(MachineHooks):
    """`action: add` adds context.n to context.acc."""

    def on_action(self, state_name, action_name, context):
        if action_name == "add":
            context["acc"] = int(context.get("acc") or 0) + int(context.get("n") or 1)
        return context


hooks_registry = HooksRegistry()
hooks_registry.register("counter", CounterHooks)
