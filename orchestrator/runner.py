"""Run one claimed execution to its outcome, resuming from its latest checkpoint.

flatmachines 4.2.1 resumes a ``state_exit`` snapshot by running that state
again, applying its effects twice. The runner does not inherit that: when the
latest checkpoint is a state's ``state_exit`` it takes the transition itself
and hands the machine a snapshot that starts at the next state (or finishes
the machine), so a state whose exit committed never runs again. It also
treats a lone ``machine_start`` as "not started" (the library would try to run
a state called 'start'), and keeps the step number of a state that runs again
(the library would count it one higher, changing its idempotency key).

The store's own trouble is never the workflow's error. The library routes any
exception raised while a state runs (a checkpoint of a tool loop, a signal
consumed, an inline child's write) to the state's ``on_error``; a
``StoreUnavailable`` or ``LeaseLost`` there would send the workflow down its
error path. ``PinnedMachine`` passes both straight through instead, and once a
run has met one, its persistence refuses every later write, so nothing more is
written under that claim. The worker then gives the execution back to its
queue and it resumes from its last committed checkpoint.

At ``max_steps`` the library leaves its loop and ends the machine as if it
had finished, with an empty output. ``PinnedMachine`` keeps the state its run
would take next; a machine_end with one still due is the step limit, and the
run fails with it before that machine_end is written, so it can go on from its
last checkpoint (``orch retry``) under a higher limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import traceback
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from flatmachines import FlatMachine, HooksRegistry
from flatmachines.persistence import MachineSnapshot
from flatmachines.persistence import config_hash as hash_of_config
from jinja2.exceptions import SecurityError

from . import timers
from .app import LazyAgentRegistry, registered_names
from .children import ChildrenOnTheStore, StoreInvoker, StoreResults
from .clock import utcnow
from .errors import LeaseLost, StoreUnavailable
from .machine_config import ConfigCache, check_envelope, history_window, hook_names
from .offloop import HookThreads, off_loop, passes_through
from .persistence import (
    DEFAULT_LINGER,
    FencedLock,
    FencedPersistence,
    StoreConfigStore,
    StoreSignals,
    runner_wait,
)
from .retry import backoff_delay
from .sandbox import TEMPLATES, GuardedExpressions, WorkflowRefused, refused
from .store import Claim, Store
from .store.snapshots import NotJSON

log = logging.getLogger(__name__)


class StepLimitReached(Exception):
    """The run took ``max_steps`` states without reaching a final one."""


# PinnedMachine._save_checkpoint writes the library's snapshot fields itself,
# in the library's order; were they ever to differ, it takes the library's path
_SNAPSHOT_FIELDS = tuple(f.name for f in dataclasses.fields(MachineSnapshot))
_OWN_ENCODING = _SNAPSHOT_FIELDS == (
    "execution_id",
    "machine_name",
    "spec_version",
    "current_state",
    "context",
    "step",
    "created_at",
    "event",
    "output",
    "total_api_calls",
    "total_cost",
    "parent_execution_id",
    "pending_launches",
    "waiting_channel",
    "tool_loop_state",
    "config_hash",
)


@dataclass(frozen=True, slots=True)
class Outcome:
    # completed | failed | retrying | waiting | lost (another worker owns it now)
    # | interrupted (the store stopped answering: the worker gives it back)
    status: str
    output: Any = None
    error: str | None = None
    # waiting: on what, and when it wakes by itself (a timer, a signal's deadline)
    channel: str | None = None
    wake_at: datetime | None = None


class PinnedMachine(ChildrenOnTheStore, FlatMachine):
    """A FlatMachine built from a config pinned by hash at submit.

    The library re-serialises its config to YAML (to hash it) and validates it
    against the JSON schema every time a machine is built: about 4 ms of the
    5 ms build, paid per execution. A pinned config was validated when it was
    submitted and its text and hash are in the store, so this takes both as
    given. Everything else is the library's own construction.
    """

    def __init__(
        self, *, pinned: str, config_hash: str, hook_threads: Executor | None = None, **kwargs: Any
    ):
        self._pinned_raw = pinned
        self._hook_threads = hook_threads
        # the last state_enter's step, state, context and count of hooks called
        self._entered: tuple | None = None
        self._hooks_called = 0
        # the state this run would take next (None: none, its machine is done)
        self.due_state: str | None = None
        self.max_steps: int | None = None
        super().__init__(**kwargs)
        # no re-hash and no re-put of the config per execution
        self._config_hash = config_hash
        self._lifecycle_hooks = off_loop(self._lifecycle_hooks, hook_threads)
        # the workflow's templates and conditions are untrusted (sandbox.py)
        self._jinja_env = TEMPLATES
        self._expression_engine = GuardedExpressions(self._expression_engine)

    def _render_template(self, template_str: str, variables: dict[str, Any]) -> Any:
        try:
            return super()._render_template(template_str, variables)
        except SecurityError as exc:
            raise refused(exc) from None

    # Files named by a config were read and embedded at submit; a pinned config
    # that still names one reached the store some other way, and a worker never
    # reads a workflow's files from its own disk.
    def _resolve_agent_file_refs(self) -> None:
        for name, ref in ((self.config.get("data") or {}).get("agents") or {}).items():
            if isinstance(ref, str) or (
                isinstance(ref, dict)
                and isinstance(ref.get("ref"), str)
                and self._looks_like_file_ref(ref["ref"])
            ):
                raise _names_a_file("agent", name)

    def _resolve_machine_config(self, name: str) -> tuple[dict[str, Any], str]:
        if isinstance(self.machine_refs.get(name), str):
            raise _names_a_file("machine", name)
        return super()._resolve_machine_config(name)

    def _resolve_config(self, name: str) -> dict[str, Any]:
        if isinstance(self.agent_refs.get(name), str):
            raise _names_a_file("agent", name)
        return super()._resolve_config(name)

    def _get_agent_config(self, agent_name: str) -> dict[str, Any] | None:
        if isinstance((self.data.get("agents") or {}).get(agent_name), str):
            raise _names_a_file("agent", agent_name)
        return super()._get_agent_config(agent_name)

    def _get_state_hooks(self, state_name: str) -> Any:
        # sync hook methods run on the worker's threads (offloop.py)
        cached = self._state_hooks_cache.get(state_name)
        if cached is None:
            hooks = super()._get_state_hooks(state_name)
            if hooks is not self._noop_state_hooks:
                hooks = off_loop(hooks, self._hook_threads)
            self._state_hooks_cache[state_name] = cached = hooks
        return cached

    def _capture_config_raw(self) -> str:
        return self._pinned_raw

    def _validate_spec(self) -> None:
        check_envelope(self)  # the schema pass was done at submit

    async def _save_checkpoint(
        self,
        event: str,
        state_name: str,
        step: int,
        context: dict[str, Any],
        output: dict[str, Any] | None = None,
        waiting_channel: str | None = None,
        tool_loop_state: dict[str, Any] | None = None,
    ) -> None:
        """The library's checkpoint, built and encoded without its deep copy.

        The library turns the snapshot into a dict with ``dataclasses.asdict``
        (a deep copy of the context), encodes it whole, and the persistence
        parses the bytes back for their metadata. Here the snapshot's fields
        are handed over as they are, in the library's order, and the
        persistence stores what changed since the last checkpoint
        (store/snapshots.py). A context that plain JSON cannot hold (a
        dataclass, a set, ...) takes the library's own path, with its
        conversions.
        """
        if event == "machine_start":
            self.due_state = self._initial_state
        elif event == "state_enter":
            self.due_state = state_name
        elif event == "state_exit":
            self.due_state = None  # a final state ends; any other's transition sets it
        elif event == "machine_end" and self.due_state is not None:
            # the library's loop stopped at max_steps with a state still to run
            raise StepLimitReached(self.due_state)
        persistence = self.persistence
        if (
            event not in self.checkpoint_events
            or self._config_hash is None
            or not _OWN_ENCODING
            or not isinstance(persistence, FencedPersistence)
        ):
            return await super()._save_checkpoint(
                event, state_name, step, context, output, waiting_channel, tool_loop_state
            )
        taken = utcnow()
        # a state's `execute` snapshot follows its state_enter with nothing run
        # in between when its on_state_enter is the library's pass-through: the
        # same context object, unchanged, which is not compared again
        entered = self._entered
        same = (
            event == "execute"
            and entered is not None
            and entered == (step, state_name, id(context), self._hooks_called)
            and not self._pending_launches
        )
        self._entered = (
            (step, state_name, id(context), self._hooks_called)
            if event == "state_enter" and not self._pending_launches
            else None
        )
        checkpoint_context = dict(context)
        machine = checkpoint_context.get("machine")
        if isinstance(machine, MappingProxyType):
            checkpoint_context["machine"] = dict(machine)
        doc = {
            "execution_id": self.execution_id,
            "machine_name": self.machine_name,
            "spec_version": self.spec_version,
            "current_state": state_name,
            "context": checkpoint_context,
            "step": step,
            "created_at": f"{taken.isoformat()}+00:00",
            "event": event,
            "output": output,
            "total_api_calls": self.total_api_calls,
            "total_cost": self.total_cost,
            "parent_execution_id": self.parent_execution_id,
            "pending_launches": self._get_pending_intents() if self._pending_launches else None,
            "waiting_channel": waiting_channel,
            "tool_loop_state": tool_loop_state,
            "config_hash": self._config_hash,
        }
        try:
            await persistence.save_doc(
                execution_id=self.execution_id,
                key=f"{self.execution_id}/step_{step:06d}_{event}.json",
                step=step,
                event=event,
                state=state_name,
                at=taken,
                doc=doc,
                same_context=same,
            )
        except NotJSON:
            # a value plain JSON cannot hold: the library's path, with its conversions
            self._entered = None
            return await super()._save_checkpoint(
                event, state_name, step, context, output, waiting_channel, tool_loop_state
            )

    async def _execute_state(self, state_name: str, context: dict[str, Any]) -> Any:
        self.running_state = state_name  # a wait's deadline is its state's `timeout`
        if (self.states.get(state_name) or {}).get("wait_for"):
            # the state's one consume is this run's wait: reserved, consumed with
            # its commit (a hook's consume elsewhere removes a signal at once)
            with runner_wait():
                return await super()._execute_state(state_name, context)
        return await super()._execute_state(state_name, context)

    def _not_the_workflows(self, error: BaseException) -> bool:
        # the store's trouble, or something the orchestrator refuses to run
        if isinstance(error, StoreUnavailable | LeaseLost | WorkflowRefused | SecurityError):
            return True
        return getattr(self.persistence, "broken", None) is not None

    def _get_error_recovery_state(self, state_config: dict[str, Any], error: Exception):
        if self._not_the_workflows(error):
            return None  # not the workflow's error: no on_error transition
        recovery = super()._get_error_recovery_state(state_config, error)
        if recovery:
            self.due_state = recovery
        return recovery

    async def _run_hook(self, hooks: Any, method_name: str, *args: Any) -> Any:
        if method_name == "on_error" and self._not_the_workflows(args[1]):
            return None  # nor the hooks' to handle: the run is abandoned or refused
        given = passes_through(hooks, method_name)
        if given is not None:
            result = args[given]  # the library's default: it hands back what it was given
        else:
            self._hooks_called += 1  # it may change the context: no snapshot text is reused
            result = await super()._run_hook(hooks, method_name, *args)
        if method_name in ("on_transition", "on_error") and isinstance(result, str | None):
            self.due_state = result or None  # where the loop goes next, if it goes on
        return result


def _names_a_file(kind: str, name: str) -> WorkflowRefused:
    return WorkflowRefused(
        f"the pinned config names a file for {kind} '{name}'; files are read at submit, "
        "never from a worker's disk: submit the workflow again"
    )


class Runner:
    """Builds FlatMachines for claims; one per worker (it caches parsed configs)."""

    def __init__(
        self,
        store: Store,
        hooks_registry: HooksRegistry,
        *,
        linger: float = DEFAULT_LINGER,
        agent_adapters: list[Any] | None = None,
        hook_threads: int = 4,
        max_steps: int | None = None,
    ):
        self.store = store
        self.linger = linger
        # a workflow is bounded by its own logic; this only stops a runaway loop
        self.max_steps = max_steps if max_steps is not None else store.settings.max_steps
        self.hooks_registry = hooks_registry
        self.configs = ConfigCache()
        self._loading: dict[str, asyncio.Future] = {}
        # the library builds a registry (trying every optional adapter's import)
        # per machine unless given one; this one imports them on first use
        self.agent_registry = LazyAgentRegistry(agent_adapters)
        # sync hook methods run here, off the event loop: as many as run at once
        self.hook_threads = HookThreads(hook_threads)
        self.config_store = StoreConfigStore(store)

    async def _config(self, config_hash: str) -> dict[str, Any]:
        config = self.configs.get(config_hash)
        if config is not None:
            return config
        # the executions of a new config claimed together read and parse it once
        loading = self._loading.get(config_hash)
        if loading is None:
            loading = self._loading[config_hash] = asyncio.ensure_future(
                self._load_config(config_hash)
            )
            loading.add_done_callback(lambda _: self._loading.pop(config_hash, None))
        await asyncio.shield(loading)
        config = self.configs.get(config_hash)
        assert config is not None
        return config

    async def _load_config(self, config_hash: str) -> None:
        raw = await self.store.get_config(config_hash)
        if raw is None:
            raise WorkflowRefused(f"config {config_hash} is missing from the store")
        if hash_of_config(raw) != config_hash:
            # changed in the store after submit: whoever changed it chose the code
            raise WorkflowRefused(
                f"config does not match its hash ({config_hash[:12]}…): the store's copy was "
                "changed after submit; nothing of it ran. Submit the workflow again"
            )
        self.configs.put(config_hash, raw)

    def _missing_hooks(self, config: dict[str, Any]) -> set[str]:
        return set(hook_names(config)) - registered_names(self.hooks_registry)

    async def run(self, claim: Claim) -> Outcome:
        """Run and record the outcome. LeaseLost anywhere means: write nothing more."""
        persistence = FencedPersistence(self.store, claim, linger=self.linger)
        try:
            return await self._run_and_record(claim, persistence)
        finally:
            await persistence.close()

    async def _run_and_record(self, claim: Claim, persistence: FencedPersistence) -> Outcome:
        try:
            try:
                outcome = await self._run(claim, persistence)
            except (LeaseLost, StoreUnavailable):
                raise
            except (WorkflowRefused, SecurityError) as exc:
                if persistence.broken is not None:
                    raise persistence.broken from exc
                # refused again on every attempt: failed now, not retried
                error = str(refused(exc) if isinstance(exc, SecurityError) else exc)
                log.warning("execution %s refused: %s", claim.execution.id, error)
                return await self._record(claim, persistence, Outcome("failed", error=error))
            except Exception as exc:
                if persistence.broken is not None:  # the store's trouble, wrapped by the library
                    raise persistence.broken from exc
                # the machine's own unhandled error: the retry policy
                return await self._record_error(claim, persistence, exc)
            return await self._record(claim, persistence, outcome)
        except LeaseLost:
            log.warning("lease lost on %s; abandoning it to its new owner", claim.execution.id)
            return Outcome("lost")
        except StoreUnavailable as exc:
            # not the workflow's error: no attempt spent, nothing more written
            log.debug("store unavailable while running %s: %s", claim.execution.id, exc)
            return Outcome("interrupted")

    async def _record_error(
        self, claim: Claim, persistence: FencedPersistence, exc: Exception
    ) -> Outcome:
        detail = "".join(traceback.format_exception(exc)).strip()
        error = f"{type(exc).__name__}: {exc}\n\n{detail}"
        ex = claim.execution
        await persistence.flush()  # the timeline shows where it failed
        if ex.attempt < ex.max_attempts:
            delay = backoff_delay(ex.attempt, ex.retry_backoff, ex.retry_backoff_max)
            if not await self.store.retry_later(claim, error=error, delay=delay):
                return Outcome("lost")
            log.info("attempt %d of %s failed; retry in %.1fs", ex.attempt, ex.id, delay)
            return Outcome("retrying", error=error)
        return await self._record(claim, persistence, Outcome("failed", error=error))

    async def _record(
        self, claim: Claim, persistence: FencedPersistence, outcome: Outcome
    ) -> Outcome:
        # the run's last markers, and its machine_end or waiting checkpoint,
        # commit with the outcome or the park
        rows = await persistence.take_pending()
        wait = persistence.take_wait_end()
        if outcome.status == "waiting":
            assert outcome.channel is not None
            left = await self.store.park(
                claim, channel=outcome.channel, wake_at=outcome.wake_at, checkpoints=rows, wait=wait
            )
            return outcome if left == "waiting" else Outcome("requeued", channel=outcome.channel)
        await self.store.finish(
            claim,
            status=outcome.status,
            output=_jsonable(outcome.output),
            error=outcome.error,
            checkpoints=rows,
            wait=wait,
        )
        return outcome

    async def _run(self, claim: Claim, persistence: FencedPersistence) -> Outcome:
        ex = claim.execution
        config = await self._config(ex.config_hash)
        missing = self._missing_hooks(config)
        if missing:
            names = ", ".join(sorted(missing))
            return Outcome(
                "failed",
                error=f"machine '{ex.machine}' needs hooks this worker lacks: {names}; start the "
                "worker with --app MODULE (or ORCH_APP) whose hooks_registry registers them, "
                f"then `orch retry {ex.id}`",
            )
        machine = PinnedMachine(
            pinned=self.configs.raw(ex.config_hash),
            config_hash=ex.config_hash,
            config_dict=config,
            hooks_registry=self.hooks_registry,
            persistence=persistence,
            lock=FencedLock(self.store, claim),
            signal_backend=StoreSignals(self.store, claim, persistence),
            invoker=StoreInvoker(self.store, claim),
            result_backend=StoreResults(self.store),
            config_store=self.config_store,
            agent_registry=self.agent_registry,
            hook_threads=self.hook_threads,
            _execution_id=ex.id,
        )
        persistence.final_states = frozenset(machine._final_states)
        persistence.history = history_window(config)
        machine.max_steps = self.max_steps
        try:
            result = await self._execute(claim, machine, persistence)
        except StepLimitReached as stopped:
            return Outcome(
                "failed",
                error=f"stopped at the step limit: {self.max_steps} states run and '{stopped}' "
                f"still to run (ORCH_MAX_STEPS={self.max_steps}); if the workflow is not a "
                "runaway loop, raise ORCH_MAX_STEPS for the workers and `orch retry "
                f"{ex.id}` to go on from its last checkpoint",
            )

        if isinstance(result, dict) and result.get("_waiting"):
            channel = str(result.get("_channel"))
            state = config["data"]["states"].get(getattr(machine, "running_state", None)) or {}
            # a wait_for's `timeout` is its deadline (a machine state's is the library's)
            deadline = state.get("timeout") if state.get("wait_for") else None
            wake_at = timers.wake_at(channel, deadline, utcnow())
            return Outcome("waiting", channel=channel, wake_at=wake_at)
        return Outcome("completed", output=result)

    async def _execute(
        self, claim: Claim, machine: PinnedMachine, persistence: FencedPersistence
    ) -> Any:
        """The machine's run from where its checkpoints leave it."""
        ex = claim.execution

        # the first claim ever of an execution at step 0 (not a fork): nobody can
        # have written a checkpoint
        first = claim.fence == 1 and ex.step == 0
        latest = None if first else await self.store.latest_decoded(ex.id)
        snapshot = None
        if latest is not None:
            persistence.adopt(ex.id, latest[1])  # the next row stores what changed since
            snapshot = MachineSnapshot(**latest[1].doc)
        if snapshot is None or snapshot.event == "machine_start":
            return await machine.execute(input=ex.input, max_steps=self.max_steps)
        if snapshot.event == "machine_end":
            return await _end(machine, snapshot, already_saved=True)
        if snapshot.event == "state_exit":
            return await _continue_after_exit(machine, persistence, snapshot)
        # The state in flight when the last owner stopped runs again (at least
        # once). The library would number that run step + 1; keep its step so
        # both runs share one idempotency key.
        rerun = dataclasses.replace(snapshot, step=snapshot.step - 1)
        return await _resume(machine, persistence, rerun)


def _jsonable(value: Any) -> Any:
    """Outputs are stored as JSON: anything else becomes its string form."""
    return json.loads(json.dumps(value, default=str))


async def _end(machine: FlatMachine, snapshot: MachineSnapshot, *, already_saved: bool) -> Any:
    """The tail of FlatMachine.execute: machine_end checkpoint, then on_machine_end."""
    context = machine._inject_machine_metadata(dict(snapshot.context), "end")
    output = snapshot.output or {}
    if not already_saved:
        await machine._save_checkpoint("machine_end", "end", snapshot.step, context, output=output)
    return await machine._run_hook(machine._lifecycle_hooks, "on_machine_end", context, output)


async def _continue_after_exit(
    machine: PinnedMachine, persistence: FencedPersistence, snapshot: MachineSnapshot
) -> Any:
    """Resume after a committed state_exit with the transition, not the state."""
    state = snapshot.current_state
    context = dict(snapshot.context)
    if state in machine._final_states:
        return await _end(machine, snapshot, already_saved=False)
    machine._current_step = snapshot.step
    context = machine._inject_machine_metadata(context, state)
    if "_tool_loop_next_state" in context:
        next_state = context.pop("_tool_loop_next_state")
        context.pop("_tool_loop_stop", None)
    else:
        next_state = machine._find_next_state(state, context)
    if next_state:
        next_state = await machine._run_hook(
            machine._get_state_hooks(state), "on_transition", state, next_state, context
        )
    context.pop("machine", None)
    if not next_state:
        # no transition out of a non-final state: the machine ends with no output
        return await _end(
            machine, dataclasses.replace(snapshot, context=context, output={}), already_saved=False
        )
    advanced = dataclasses.replace(snapshot, current_state=next_state, context=context)
    return await _resume(machine, persistence, advanced)


async def _resume(
    machine: PinnedMachine, persistence: FencedPersistence, snapshot: MachineSnapshot
) -> Any:
    """execute(resume_from=) from ``snapshot``, handed over in memory, never written:
    the machine's next checkpoint is the first new record."""
    key = f"{snapshot.execution_id}/step_{snapshot.step:06d}_resume.json"
    persistence.resume_snapshot = (key, json.dumps(dataclasses.asdict(snapshot)).encode("utf-8"))
    machine.due_state = snapshot.current_state
    return await machine.execute(resume_from=snapshot.execution_id, max_steps=machine.max_steps)
