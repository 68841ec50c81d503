"""Child machines as executions of their own, spread over the pool.

flatmachines 4.2.1 runs ``machine:`` and ``foreach:`` children inline, in the
parent's process and event loop (``_launch_and_write``), whatever invoker is
configured; only ``launch:`` goes through the ``MachineInvoker``, and with a
random child id per run, so a parent that crashes before its checkpoint and
runs the state again launches a second child. ``ChildrenOnTheStore`` (mixed
into the runner's ``PinnedMachine``) replaces those paths:

- every child is an execution in the store, enqueued through ``StoreInvoker``
  under the parent's claim, with an id derived from the parent's id, state
  step and item key: a state run again enqueues the same children, never new
  ones;
- a ``machine:`` / ``foreach:`` state enqueues its group and parks the parent
  as ``waiting`` on the group's channel (its slot free); the child that ends
  the group (settled: the last; any: the first) signals the channel, and the
  parent runs the state again, now reading its children's results instead of
  enqueuing them. Under ``any`` the other children are cancelled;
- results are the children's outcomes, read through ``StoreResults``, a
  ``ResultBackend`` on the store (``flatagents://{id}/result``).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import yaml
from flatmachines.actions import QueueInvoker
from flatmachines.backends import parse_uri
from flatmachines.flatmachine import WaitingForSignal
from flatmachines.persistence import config_hash

from .routing import needs_of
from .store import Claim, Execution, NewExecution, Store

MAX_ID = 200  # executions.id


class ChildFailed(Exception):
    """A ``machine:`` child ended failed or cancelled: the parent state's error."""


def outcome(ex: Execution) -> Any:
    """A finished child's result, as the library's invokers give it."""
    if ex.status == "completed":
        return ex.output
    if ex.status == "cancelled":
        why = f": {ex.cancel_reason}" if ex.cancel_reason else ""
        return {"_error": f"cancelled{why}", "_error_type": "Cancelled"}
    kind, _, message = (ex.error or "failed").partition("\n")[0].partition(": ")
    return {"_error": message or kind, "_error_type": kind if message else "Error"}


def child_id(parent_id: str, group: str, key: Any) -> str:
    full = f"{group}/{key}"
    if len(full) <= MAX_ID:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:24]
    return f"{parent_id[: MAX_ID - 26]}~{digest}"


class StoreResults:
    """flatmachines' ``ResultBackend`` on the store: a result is an execution's
    outcome (its output, or ``{"_error", "_error_type"}``), there once it ends."""

    def __init__(self, store: Store, poll: float = 0.2):
        self.store = store
        self.poll = poll

    async def write(self, uri: str, data: Any) -> None:
        raise ValueError(f"{uri}: an execution's result is its outcome, recorded when it finishes")

    async def read(self, uri: str, block: bool = True, timeout: float | None = None) -> Any:
        execution_id, _ = parse_uri(uri)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            ex = await self.store.get(execution_id)
            if ex is not None and ex.is_final:
                return outcome(ex)
            if not block:
                return None
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"Timeout waiting for result at {uri}")
            await asyncio.sleep(self.poll)

    async def exists(self, uri: str) -> bool:
        ex = await self.store.get(parse_uri(uri)[0])
        return ex is not None and ex.is_final

    async def delete(self, uri: str) -> None:
        return None  # an execution's record is kept


class StoreInvoker(QueueInvoker):
    """flatmachines' ``MachineInvoker`` on the store: a launch enqueues the child
    as an execution of its own, under the parent's claim."""

    def __init__(self, store: Store, claim: Claim):
        self.store = store
        self.claim = claim

    async def pin(self, config: dict[str, Any]) -> tuple[str, str]:
        raw = yaml.safe_dump(config, sort_keys=False)
        name = str((config.get("data") or {}).get("name") or "unnamed-machine")
        digest = config_hash(raw)
        await self.store.put_config(digest, name, raw, needs_of(config))
        return digest, name

    async def child(
        self,
        execution_id: str,
        config: dict[str, Any],
        input_data: dict[str, Any],
        *,
        group: str | None = None,
        mode: str | None = None,
        pinned: tuple[str, str] | None = None,
    ) -> NewExecution:
        """The child's row; ``pinned``: its config's (hash, name), when the
        caller pinned it already for a group of children of one machine."""
        parent = self.claim.execution
        digest, name = pinned or await self.pin(config)
        return NewExecution(
            id=execution_id,
            machine=name,
            config_hash=digest,
            input=dict(input_data),
            queue=parent.queue,
            priority=parent.priority,
            max_attempts=parent.max_attempts,
            retry_backoff=parent.retry_backoff,
            retry_backoff_max=parent.retry_backoff_max,
            parent_id=parent.id,
            root_id=parent.root_id or parent.id,
            parent_group=group,
            group_mode=mode,
        )

    async def launch(self, caller_machine, target_config, input_data, execution_id) -> None:
        new = await self.child(execution_id, target_config, input_data)
        await self.store.enqueue_children(self.claim, [new])

    async def _enqueue(self, execution_id, config, input_data) -> None:
        new = await self.child(execution_id, config, input_data)
        await self.store.enqueue_children(self.claim, [new])


class ChildrenOnTheStore:
    """Overrides of FlatMachine's child paths (see the module docstring)."""

    invoker: StoreInvoker
    execution_id: str
    _current_step: int

    def _group(self) -> str:
        # one group per run of a state: the step is kept when a state runs again
        return f"{self.execution_id}@{self._current_step}"

    async def _fan_out(self, specs: list[tuple[Any, str, dict[str, Any]]], mode: str) -> dict:
        """Run ``specs`` (key, machine name, input) as a group of children;
        their results by key, once the group is done (settled) or has a first
        result (any). Until then the parent parks on the group's channel."""
        group = self._group()
        ids = {key: child_id(self.execution_id, group, key) for key, _, _ in specs}
        # the group's signal, if sent: taken now, consumed with this state's progress
        await self.signal_backend.consume(group)
        members = {m.id: m for m in await self.invoker.store.group_members(group)}
        if len(members) < len(specs):
            # each machine is pinned once, not once per item (a foreach over
            # 100,000 items serialised and wrote its config 100,000 times)
            pinned: dict[str, tuple[dict[str, Any], tuple[str, str]]] = {}
            for name in dict.fromkeys(name for _, name, _ in specs):
                config = self._resolve_machine_config(name)[0]
                pinned[name] = (config, await self.invoker.pin(config))
            new = [
                await self.invoker.child(
                    ids[key], pinned[name][0], data, group=group, mode=mode, pinned=pinned[name][1]
                )
                for key, name, data in specs
            ]
            await self.invoker.store.enqueue_children(self.invoker.claim, new)
            raise WaitingForSignal(channel=group)
        if mode == "any":
            ended = sorted(
                (m for m in members.values() if m.is_final),
                key=lambda m: (m.finished_at, m.id),
            )
            if not ended:
                raise WaitingForSignal(channel=group)
            winner = ended[0]
            await self.invoker.store.cancel_members(
                group, keep=winner.id, reason=f"{winner.id} finished first (mode: any)"
            )
            [key] = [k for k, i in ids.items() if i == winner.id]
            return {key: outcome(winner)}
        if not all(m.is_final for m in members.values()):
            raise WaitingForSignal(channel=group)
        return {key: outcome(members[ids[key]]) for key, _, _ in specs}

    async def _invoke_machine_single(self, machine_name, input_data, timeout=None):
        [(key, result)] = (
            await self._fan_out([(machine_name, machine_name, input_data)], "settled")
        ).items()
        if isinstance(result, dict) and "_error" in result:
            child = child_id(self.execution_id, self._group(), key)
            raise ChildFailed(f"child {child} ({machine_name}) ended: {result['_error']}")
        return result

    async def _invoke_machines_parallel(
        self, machines, input_data, mode="settled", timeout=None, per_machine_inputs=None
    ):
        specs = [
            (name, name, dict((per_machine_inputs or {}).get(name, input_data)))
            for name in machines
        ]
        return await self._fan_out(specs, mode)

    async def _invoke_foreach(
        self, items, as_var, key_expr, machine_name, input_template, mode="settled", timeout=None
    ):
        specs = []
        for i, item in enumerate(items):
            variables = {as_var: item, "context": {}, "input": {}}
            key = self._render_template(key_expr, variables) if key_expr else i
            specs.append((key, machine_name, self._render_dict(input_template, variables)))
        results = await self._fan_out(specs, mode)
        if key_expr:
            return results
        return [results[i] for i in sorted(k for k in results if isinstance(k, int))]

    async def _launch_fire_and_forget(self, machines, input_data) -> None:
        group = self._group()
        for i, machine_name in enumerate(machines):
            launched = child_id(self.execution_id, group, f"launch-{i}-{machine_name}")
            target_config, _ = self._resolve_machine_config(machine_name)
            self._add_pending_launch(launched, machine_name, input_data)  # the outbox
            await self.invoker.launch(self, target_config, input_data, launched)
            self._mark_launched(launched)

    async def _launch_and_write(self, machine_name, child_id, input_data):
        # a launch the outbox holds as not yet made (the parent stopped before
        # it checkpointed the launch): the same id, so at most one child
        await self.invoker.launch(
            self, self._resolve_machine_config(machine_name)[0], input_data, child_id
        )
        return None
