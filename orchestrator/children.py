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
import json
from typing import Any

import yaml
from flatmachines.actions import QueueInvoker
from flatmachines.backends import parse_uri
from flatmachines.flatmachine import WaitingForSignal
from flatmachines.persistence import config_hash

from . import checks
from .checks import unsafe_id
from .persistence import runner_wait
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
    if len(full) <= MAX_ID and not unsafe_id(full):  # a key such as '..' or '' is hashed
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:24]
    return f"{parent_id[: MAX_ID - 26]}~{digest}"


class StoreResults:
    """flatmachines' ``ResultBackend`` on the store.

    ``flatagents://{id}/result`` of an execution of the store is that
    execution's outcome (its output, or ``{"_error", "_error_type"}``), there
    once it ends. Writing it is refused (ValueError): the outcome is recorded
    when the execution finishes, by its worker, and no one else may set it.
    Every other URI (the results of a plain FlatMachine's inline children,
    whose ids are not executions) is kept in the ``results`` table, the last
    write winning, as in the library's backends, until ``delete`` or retention
    removes it. A write wakes readers blocked on its URI in this process at
    once; a reader in another process sees it at its next look (``poll``
    seconds). Data is stored as JSON: a value JSON cannot hold becomes its
    string form, as an execution's output does.
    """

    def __init__(self, store: Store, poll: float = 0.2):
        self.store = store
        self.poll = poll
        self._waiting: dict[str, set[asyncio.Future]] = {}

    async def write(self, uri: str, data: Any) -> None:
        execution_id, path = _parts(uri)
        value = json.loads(json.dumps(data, default=str))
        checks.json_value(
            value,
            f"the result at {uri}",
            limit=self.store.settings.max_context_bytes,
            setting="ORCH_MAX_CONTEXT_BYTES",
        )
        outcome_of = execution_id if path == "result" else None
        if not await self.store.write_result(uri, value, outcome_of=outcome_of):
            raise ValueError(
                f"{uri}: {execution_id} is an execution of this store, whose result is its "
                "outcome, recorded when it finishes; write results of other ids only"
            )
        for waiter in self._waiting.pop(uri, ()):
            waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    async def read(self, uri: str, block: bool = True, timeout: float | None = None) -> Any:
        _parts(uri)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            found, data = await self._look(uri)
            if found:
                return data
            if not block:
                return None
            wait = self.poll
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    raise TimeoutError(f"Timeout waiting for result at {uri}")
            waiter = loop.create_future()
            self._waiting.setdefault(uri, set()).add(waiter)
            try:
                await asyncio.wait_for(waiter, wait)
            except TimeoutError:
                pass
            finally:
                waiters = self._waiting.get(uri)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiting[uri]

    async def _look(self, uri: str) -> tuple[bool, Any]:
        execution_id, path = _parts(uri)
        if path == "result":
            ex = await self.store.get(execution_id)
            if ex is not None:
                return (True, outcome(ex)) if ex.is_final else (False, None)
        return await self.store.read_result(uri)

    async def exists(self, uri: str) -> bool:
        return (await self._look(uri))[0]

    async def delete(self, uri: str) -> None:
        """Remove a written result; an execution's outcome is kept with its record."""
        _parts(uri)
        await self.store.delete_result(uri)


MAX_URI = 600  # results.uri


def _parts(uri: str) -> tuple[str, str]:
    """(execution id, path) of a ``flatagents://{id}/{path}`` URI the store holds."""
    if not isinstance(uri, str):
        raise ValueError(f"a result URI is a string, not {type(uri).__name__}")
    execution_id, path = parse_uri(uri)
    if not execution_id or not path or len(uri) > MAX_URI or "\x00" in uri:
        raise ValueError(
            f"invalid result URI {uri[:100]!r}: flatagents://<execution id>/<path>, "
            f"at most {MAX_URI} characters"
        )
    return execution_id, path


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
        with runner_wait():
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
