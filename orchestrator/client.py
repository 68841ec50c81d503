"""The public API: submit work and look at it. The CLI is a thin layer on this."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import checks, timers
from .clock import utcnow
from .errors import ExecutionNotFound, StoreUnavailable, UserError, WaitTimeout
from .settings import Settings
from .store import CheckpointRecord, Execution, NewExecution, Store
from .store.records import SignalRecord

if TYPE_CHECKING:
    from .machine_config import MachineConfig

__all__ = ["Client", "Submitted", "SignalSent", "WaitTimeout"]

SUBMIT_BATCH = 500


@dataclass(frozen=True, slots=True)
class Submitted:
    execution: Execution
    created: bool  # False: the id existed, this is the existing execution


@dataclass(frozen=True, slots=True)
class SignalSent:
    id: int
    channel: str
    woken: list[str]  # the execution it was given to, if one was waiting


class Client:
    def __init__(self, store: Store):
        self.store = store

    @classmethod
    async def open(cls, settings: Settings | None = None) -> Client:
        return cls(await Store.open(settings))

    async def close(self) -> None:
        await self.store.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------- submit

    async def pin(self, machine: str | Path | MachineConfig) -> MachineConfig:
        """Load, check and store a machine config by its content hash."""
        from .machine_config import MachineConfig, load_machine_file

        config = machine if isinstance(machine, MachineConfig) else load_machine_file(machine)
        needs = ",".join(sorted(config.hook_names))
        checks.bounded_text(config.name, "the machine's name (data.name)", checks.NAME_LENGTH)
        if len(needs) > checks.NEEDS_LENGTH:
            raise UserError(
                f"the machine names hooks of {len(needs)} characters in all; the most is "
                f"{checks.NEEDS_LENGTH}: use shorter hooks names"
            )
        await self.store.put_config(config.hash, config.name, config.raw, needs)
        return config

    async def submit(
        self,
        machine: str | Path | MachineConfig,
        input: dict[str, Any] | None = None,
        *,
        id: str | None = None,
        queue: str = "default",
        priority: int = 0,
        delay: float | None = None,
        max_attempts: int = 1,
        backoff: float = 1.0,
    ) -> Submitted:
        """Enqueue one execution. The same ``id`` again returns the existing one."""
        if id is not None:
            checks.new_execution_id(id, "--id")
        [submitted] = await self.submit_many(
            machine,
            [{} if input is None else input],
            ids=[id] if id is not None else None,
            queue=queue,
            priority=priority,
            delay=delay,
            max_attempts=max_attempts,
            backoff=backoff,
        )
        return submitted

    def check_input(self, item: Any, what: str) -> dict[str, Any]:
        """One input, as a submit takes it (the CLI checks a file's lines with it)."""
        return checks.execution_input(item, what, self.store.settings.max_input_bytes)

    async def submit_many(
        self,
        machine: str | Path | MachineConfig,
        inputs: Sequence[dict[str, Any]],
        *,
        ids: Sequence[str] | None = None,
        progress=None,
        **options: Any,
    ) -> list[Submitted]:
        """Enqueue one execution per input. All of them are checked before
        anything is written."""
        inputs = list(inputs)
        if ids is not None:
            ids = list(ids)
            if len(ids) != len(inputs):
                raise UserError("ids and inputs differ in length")
        for i, item in enumerate(inputs):
            self.check_input(item, f"input #{i + 1}")
            if ids is not None:
                checks.new_execution_id(ids[i], f"id #{i + 1}")
        out: list[Submitted] = []
        async for batch in self.submit_batches(machine, inputs, ids=ids, **options):
            out.extend(batch)
            if progress is not None:
                progress(len(batch))
        return out

    async def submit_batches(
        self,
        machine: str | Path | MachineConfig,
        inputs: Iterable[dict[str, Any]],
        *,
        ids: Iterable[str] | None = None,
        queue: str = "default",
        priority: int = 0,
        delay: float | None = None,
        max_attempts: int = 1,
        backoff: float = 1.0,
    ) -> AsyncIterator[list[Submitted]]:
        """Enqueue one execution per input, ``SUBMIT_BATCH`` at a time, taking
        ``inputs`` (and ``ids``) lazily: a stream of any length costs one
        batch of memory. Each batch is checked before it is written; a caller
        that wants nothing written for a bad item checks them all first."""
        checks.submit_options(queue, priority, delay, max_attempts, backoff)
        config = await self.pin(machine)
        not_before = utcnow() + timedelta(seconds=delay) if delay else None
        id_of = iter(ids) if ids is not None else None
        items = iter(inputs)
        n = 0
        while True:
            rows = []
            for item in itertools.islice(items, SUBMIT_BATCH):
                n += 1
                self.check_input(item, f"input #{n}")
                if id_of is None:
                    new_id = uuid.uuid4().hex
                else:
                    new_id = next(id_of, None)
                    if new_id is None:
                        raise UserError("ids and inputs differ in length")
                    checks.new_execution_id(new_id, f"id #{n}")
                rows.append(
                    NewExecution(
                        id=new_id,
                        machine=config.name,
                        config_hash=config.hash,
                        input=item,
                        queue=queue,
                        priority=priority,
                        not_before=not_before,
                        max_attempts=max_attempts,
                        retry_backoff=backoff,
                    )
                )
            if not rows:
                return
            yield [Submitted(ex, created) for ex, created in await self.store.submit(rows)]

    # ------------------------------------------------------------- read

    async def get(self, execution_id: str) -> Execution:
        checks.execution_id(execution_id)
        ex = await self.store.get(execution_id)
        if ex is None:
            raise ExecutionNotFound(execution_id)
        return ex

    async def history(self, execution_id: str) -> list[CheckpointRecord]:
        checks.execution_id(execution_id)
        return await self.store.history(execution_id)

    async def list(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        limit: int = 50,
        parent: str | None = None,
    ) -> list[Execution]:
        checks.listing(status=status, queue=queue, parent=parent, limit=limit)
        return await self.store.list_executions(
            status=status, queue=queue, limit=limit, parent=parent
        )

    async def wait(self, execution_id: str, timeout: float | None = None) -> Execution:
        """Until the execution is final (completed, failed or cancelled): through
        waits on signals and timers, as a Temporal or DBOS result does.
        WaitTimeout after ``timeout``."""
        checks.execution_id(execution_id)
        if timeout is not None:
            checks.seconds(timeout, "--timeout")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else None
        pause = 0.05
        last: Execution | None = None
        while True:
            try:
                ex = last = await self.get(execution_id)
            except StoreUnavailable:
                # the store's outage is not the execution's: wait on, within the timeout
                if last is None or (deadline is not None and loop.time() >= deadline):
                    raise
                ex = last
            else:
                if ex.is_final:
                    return ex
            if deadline is not None and loop.time() >= deadline:
                raise WaitTimeout(ex)
            await asyncio.sleep(
                pause if deadline is None else max(0.0, min(pause, deadline - loop.time()))
            )
            pause = min(pause * 1.5, 1.0)

    async def result(self, execution_id: str, timeout: float | None = None) -> Any:
        """The output of a completed execution (waits for it)."""
        ex = await self.wait(execution_id, timeout)
        return ex.output

    # ---------------------------------------------------------- control

    async def cancel(self, execution_id: str, reason: str | None = None) -> Execution:
        """Cancel an unfinished execution (UserError if it finished already)."""
        checks.execution_id(execution_id)
        checks.optional_text(reason, "--reason")
        return await self.store.cancel(execution_id, reason)

    # ---------------------------------------------------------- signals

    async def signal(self, channel: str, data: Any = None) -> SignalSent:
        """Send a durable signal: the execution waiting longest on ``channel``
        takes it and becomes runnable in the same transaction; with nobody
        waiting it is kept until someone does. One signal, one consumer."""
        checks.channel(channel)
        checks.signal_data(data, self.store.settings.max_signal_bytes)
        if timers.is_timer(channel):
            raise UserError(
                f"'{channel}' is a timer channel (sleep:/until:): it fires by itself; "
                "send signals to any other name"
            )
        signal_id, woken = await self.store.send_signal(channel, data)
        return SignalSent(signal_id, channel, woken)

    async def signals(self, channel: str | None = None) -> list[SignalRecord]:
        """Signals not yet consumed, oldest first."""
        if channel is not None:
            checks.channel(channel)
        return await self.store.pending_signals(channel)

    async def retry(
        self, execution_id: str, *, machine: str | Path | MachineConfig | None = None
    ) -> Execution:
        """Resume a failed or cancelled execution from its last checkpoint; with
        ``machine``, on that (fixed) config, pinned for it from now on. The
        checkpoint's state must exist in it."""
        ex = await self.get(execution_id)
        checks.machine(machine, optional=True)
        config = None
        if machine is not None:
            if ex.status not in ("failed", "cancelled"):
                raise UserError(
                    f"execution {execution_id} is {ex.status}: only failed or cancelled "
                    "executions can be retried"
                )
            at = await self.store.checkpoint_at(execution_id)
            config = await self._repin(machine, execution_id, at.state if at else None, at)
        return await self.store.retry(execution_id, config)

    async def fork(
        self,
        execution_id: str,
        *,
        from_step: int,
        id: str | None = None,
        context_patch: dict[str, Any] | None = None,
        queue: str | None = None,
        machine: str | Path | MachineConfig | None = None,
    ) -> Execution:
        """A new execution from ``execution_id``'s committed state at ``from_step``
        (context patched), on the same pinned config or ``machine``. With the
        context unchanged it runs only the states after that step."""
        checks.integer(from_step, "--from-step", low=0)
        if id is not None:
            checks.new_execution_id(id, "--id")
        if queue is not None:
            checks.queue_name(queue)
        if context_patch is not None:
            checks.json_object(context_patch, "--context-patch")
        checks.machine(machine, optional=True)
        await self.get(execution_id)
        config = None
        if machine is not None:
            at = await self.store.checkpoint_at(execution_id, from_step)
            if at is not None and at.event == "state_exit":
                config = await self._repin(machine, execution_id, at.state, at)
            else:  # the store names the steps there are
                config = await self._repin(machine, execution_id, None, None)
        new_id = id or f"{execution_id}-fork-{uuid.uuid4().hex[:8]}"
        checks.new_execution_id(new_id, "the fork's id (ID-fork-XXXXXXXX: pass a shorter --id)")
        return await self.store.fork(
            execution_id,
            step=from_step,
            new_id=new_id,
            queue=queue,
            config=config,
            context_patch=context_patch,
        )

    async def _repin(
        self, machine: str | Path | MachineConfig, execution_id: str, state: str | None, at: Any
    ) -> tuple[str, str]:
        from .machine_config import MachineConfig, load_machine_file

        config = machine if isinstance(machine, MachineConfig) else load_machine_file(machine)
        states = ((yaml.safe_load(config.raw) or {}).get("data") or {}).get("states") or {}
        pseudo = at is not None and at.event in ("machine_start", "machine_end")
        if state is not None and not pseudo and state not in states:
            raise UserError(
                f"{machine}: has no state '{state}', where execution {execution_id} stands "
                f"(its states: {', '.join(states)}); a fixed workflow must keep that state"
            )
        await self.pin(config)
        return config.hash, config.name

    async def children(self, execution_id: str) -> list[Execution]:
        return await self.store.children(execution_id)

    async def context(self, execution_id: str, step: int | None = None) -> tuple[Any, Any]:
        """(checkpoint, its context) at the latest checkpoint, or at ``step``."""
        if step is not None:
            checks.integer(step, "--step")
        await self.get(execution_id)
        at = await self.store.checkpoint_at(execution_id, step)
        if at is None:
            where = f" at step {step}" if step is not None else ""
            steps = sorted({h.step for h in await self.store.history(execution_id)})
            if step is not None and steps and step < steps[0]:
                where += (
                    f" (its workflow's history window let go of it; it keeps steps "
                    f"{steps[0]}-{steps[-1]})"
                )
            raise UserError(
                f"execution {execution_id} has no checkpoint{where} "
                f"(see `orch show {execution_id}`)"
            )
        return at, (json.loads(at.snapshot or b"{}")).get("context")

    async def scale(
        self,
        queue: str,
        *,
        min_workers: int,
        max_workers: int,
        per_worker: int | None = None,
        create: bool = False,
    ) -> None:
        checks.queue_name(queue, "the queue")
        checks.integer(min_workers, "--min")
        checks.integer(max_workers, "--max")
        if per_worker is not None:
            checks.integer(per_worker, "--per-worker")
        if min_workers < 0 or max_workers < 0:
            raise UserError("--min and --max must not be negative")
        if min_workers > max_workers:
            raise UserError(f"--min {min_workers} is more than --max {max_workers}")
        if per_worker is not None and per_worker < 1:
            raise UserError("--per-worker must be at least 1")
        if not create and not await self.store.queue_exists(queue):
            raise UserError(
                f"no queue named '{queue}' (see `orch queues`); pass --create to make it"
            )
        await self.store.set_queue_policy(
            queue, min_workers=min_workers, max_workers=max_workers, per_worker=per_worker
        )

    async def add_schedule(
        self,
        name: str,
        machine: str | Path | MachineConfig,
        *,
        cron: str,
        input: dict[str, Any] | None = None,
        queue: str = "default",
        overlap: str = "skip",
    ) -> datetime:
        """Add a cron schedule; returns its first fire time (UTC). ``overlap``:
        what a tick does while the last run is unfinished (overlap.py)."""
        from .cron import next_fire, trigger
        from .overlap import POLICIES

        checks.bounded_text(cron, "--cron", checks.CRON_LENGTH)
        trigger(cron)  # validate before anything is written
        checks.bounded_text(name, "a schedule name", checks.SCHEDULE_NAME_LENGTH)
        if "@" in name:
            raise UserError("a schedule name must be non-empty and must not contain '@'")
        if overlap not in POLICIES:
            raise UserError(f"--overlap must be one of {', '.join(POLICIES)} (got {overlap!r})")
        checks.queue_name(queue)
        checks.machine(machine)
        data = self.check_input({} if input is None else input, "--input")
        from .machine_config import MachineConfig, load_machine_file

        config = machine if isinstance(machine, MachineConfig) else load_machine_file(machine)
        await self.pin(config)
        first = next_fire(cron, utcnow())
        added = await self.store.add_schedule(
            name=name,
            machine=config.name,
            config_hash=config.hash,
            cron=cron,
            input=data,
            queue=queue,
            next_fire_at=first,
            overlap=overlap,
        )
        if not added:
            raise UserError(
                f"a schedule named '{name}' exists; `orch schedule remove {name}` first"
            )
        return first
