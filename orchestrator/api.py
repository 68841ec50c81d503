"""The embedded API: resumable pipelines inside an application.

    from orchestrator import Orchestrator

    async with Orchestrator() as orch:                 # ORCH_DATABASE_URL or ./orch.sqlite
        async with orch.worker(hooks_registry, concurrency=4):
            await orch.submit("pipeline.yml", input={"doc": 1}, id="job-1")
            output = await orch.result("job-1", timeout=60)

Everything the ``orch`` command does goes through this class. A killed
application started again resumes its unfinished executions from their last
checkpoints by itself: its worker finds its dead predecessor's claims (same
host, process gone) and takes them at once, without waiting out their leases.
``Orchestrator.sync(url)`` is the same API for scripts and sync frameworks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from . import checks, schemas, timers
from .client import Client
from .clock import iso
from .errors import OrchError, StoreUnavailable, UserError, WaitTimeout
from .routing import missing_hooks
from .settings import DEFAULT_RETENTION, Settings
from .store import Store
from .store.outage import Backoff

# flatmachines and the worker load when a worker or a machine file is used,
# not for `orch list`
if TYPE_CHECKING:
    from flatmachines import HooksRegistry

    from .machine_config import MachineConfig
    from .worker import Worker


T = TypeVar("T")
Machine = "str | Path | dict[str, Any] | MachineConfig"


class ExecutionFailed(OrchError):
    """``result()`` of an execution that ended failed or cancelled."""

    def __init__(self, execution: schemas.Execution):
        detail = execution.error or execution.cancel_reason or ""
        first = detail.strip().splitlines()[0] if detail.strip() else ""
        super().__init__(
            f"execution {execution.id} is {execution.status}" + (f": {first}" if first else "")
        )
        self.execution = execution


__all__ = ["Orchestrator", "SyncOrchestrator", "ExecutionFailed", "WaitTimeout"]


def _config(machine: Machine) -> MachineConfig:
    """A machine file, a parsed config dict, or a loaded config, checked."""
    from .machine_config import MachineConfig, load_machine_file

    checks.machine(machine)
    if isinstance(machine, MachineConfig):
        return machine
    if isinstance(machine, dict):
        import tempfile

        checks.nesting(machine, "the machine config")  # what YAML can write out
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "machine.yml"
            path.write_text(yaml.safe_dump(machine, sort_keys=False))
            return load_machine_file(path)
    return load_machine_file(machine)


class Orchestrator:
    """One application's handle on the store. Use ``async with``; every method
    is a coroutine unless ``sync()`` made it a ``SyncOrchestrator``."""

    def __init__(
        self, url: str | None = None, *, settings: Settings | None = None, **overrides: Any
    ):
        values = dict(overrides)
        if url is not None:
            values["database_url"] = url
        self.settings = settings.model_copy(update=values) if settings else Settings(**values)
        self._client: Client | None = None

    # ------------------------------------------------------------ lifecycle

    async def open(
        self, *, wait: bool = False, on_wait: Callable[[str], None] | None = None
    ) -> Orchestrator:
        """Connect (migrating a new database). With ``wait``, a database that is
        not up yet is waited for (``on_wait`` hears once why) instead of
        raising ``StoreUnavailable``."""
        backoff = Backoff(first=0.5, cap=5.0)
        told = False
        while self._client is None:
            try:
                self._client = Client(await Store.open(self.settings))
            except StoreUnavailable as exc:
                if not wait:
                    raise
                if on_wait is not None and not told:
                    on_wait(str(exc))
                    told = True
                await asyncio.sleep(backoff.next())
        return self

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def __aenter__(self) -> Orchestrator:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> Client:
        if self._client is None:
            raise UserError("the Orchestrator is not open: use `async with Orchestrator(...)`")
        return self._client

    @property
    def store(self) -> Store:
        return self.client.store

    # --------------------------------------------------------------- work

    async def submit(
        self,
        machine: Machine,
        input: dict[str, Any] | None = None,
        *,
        id: str | None = None,
        queue: str = "default",
        priority: int = 0,
        delay: float | None = None,
        max_attempts: int = 1,
        backoff: float = 1.0,
    ) -> schemas.Execution:
        """Enqueue one execution of ``machine`` (a file, a config dict or a loaded
        config). The same ``id`` again returns the existing execution."""
        submitted = await self.client.submit(
            _config(machine),
            {} if input is None else input,
            id=id,
            queue=queue,
            priority=priority,
            delay=delay,
            max_attempts=max_attempts,
            backoff=backoff,
        )
        return schemas.Execution.of(submitted.execution)

    async def submit_many(
        self,
        machine: Machine,
        inputs: list[dict[str, Any]],
        *,
        ids: list[str] | None = None,
        progress: Callable[[int], None] | None = None,
        **kw: Any,
    ) -> list[tuple[schemas.Execution, bool]]:
        """Enqueue one execution per input, in batches: (execution, created)."""
        done = await self.client.submit_many(
            _config(machine), inputs, ids=ids, progress=progress, **kw
        )
        return [(schemas.Execution.of(s.execution), s.created) for s in done]

    async def submit_batches(
        self,
        machine: Machine,
        inputs: Iterable[dict[str, Any]],
        *,
        ids: Iterable[str] | None = None,
        **kw: Any,
    ) -> AsyncIterator[list[tuple[schemas.Execution, bool]]]:
        """Enqueue one execution per input of a stream (a generator over a big
        file, say), taken a batch at a time: (execution, created) per batch.
        Each batch is checked before it is written; check the whole stream
        first (``check_input``) if a bad item must leave nothing written."""
        async for batch in self.client.submit_batches(_config(machine), inputs, ids=ids, **kw):
            yield [(schemas.Execution.of(s.execution), s.created) for s in batch]

    def check_input(self, item: Any, what: str = "the input") -> dict[str, Any]:
        """UserError unless ``item`` is an input a submit takes (a JSON object
        within ORCH_MAX_INPUT_BYTES, finite, not too deep)."""
        return checks.execution_input(item, what, self.settings.max_input_bytes)

    async def result(self, execution_id: str, timeout: float | None = None) -> Any:
        """Wait for the execution to finish and return its output. ExecutionFailed
        if it failed or was cancelled; WaitTimeout after ``timeout`` seconds."""
        ex = await self.wait(execution_id, timeout)
        if ex.status != "completed":
            raise ExecutionFailed(ex)
        return ex.output

    async def wait(self, execution_id: str, timeout: float | None = None) -> schemas.Execution:
        """Wait until the execution is completed, failed or cancelled."""
        return schemas.Execution.of(await self.client.wait(execution_id, timeout))

    async def run(self, machine: Machine, input: dict[str, Any] | None = None, **kw: Any) -> Any:
        """Submit and wait for the output, in one call (a worker must be running)."""
        timeout = kw.pop("timeout", None)
        ex = await self.submit(machine, input, **kw)
        return await self.result(ex.id, timeout=timeout)

    async def signal(self, channel: str, data: Any = None) -> schemas.SignalSent:
        sent = await self.client.signal(channel, data)
        return schemas.SignalSent(id=sent.id, channel=sent.channel, woken=sent.woken)

    async def signals(self, channel: str | None = None) -> list[schemas.Signal]:
        return [
            schemas.Signal(
                id=r.id,
                channel=r.channel,
                data=r.data,
                created_at=r.created_at,
                taken_by=r.assigned_to,
            )
            for r in await self.client.signals(channel)
        ]

    async def cancel(self, execution_id: str, reason: str | None = None) -> schemas.Execution:
        return schemas.Execution.of(await self.client.cancel(execution_id, reason))

    async def retry(
        self, execution_id: str, *, machine: Machine | None = None
    ) -> schemas.Execution:
        config = _config(machine) if machine is not None else None
        return schemas.Execution.of(await self.client.retry(execution_id, machine=config))

    async def fork(
        self,
        execution_id: str,
        from_step: int,
        *,
        id: str | None = None,
        context_patch: dict[str, Any] | None = None,
        queue: str | None = None,
        machine: Machine | None = None,
    ) -> schemas.Execution:
        config = _config(machine) if machine is not None else None
        return schemas.Execution.of(
            await self.client.fork(
                execution_id,
                from_step=from_step,
                id=id,
                context_patch=context_patch,
                queue=queue,
                machine=config,
            )
        )

    # --------------------------------------------------------------- read

    async def get(self, execution_id: str, *, detail: bool = False) -> schemas.Execution:
        """One execution; with ``detail`` its checkpoint history and children too."""
        ex = await self.client.get(execution_id)
        if not detail:
            return schemas.Execution.of(ex)
        missing = None
        if ex.status == "queued" and ex.needs:
            missing = await self._missing_hooks(ex.queue, [ex.needs]) or None
        return schemas.Execution.of(
            ex,
            history=await self.client.history(execution_id),
            children=await self.client.children(execution_id),
            missing_hooks=missing,
        )

    async def _missing_hooks(
        self, queue: str, needs: list[str], workers: list[Any] | None = None
    ) -> list[str]:
        """The hook names of each of ``needs`` that no live worker of ``queue`` can run."""
        if workers is None:
            workers = await self.store.list_workers(include_stopped=False)
        return missing_hooks(queue, needs, [(w.status, w.queues, w.hooks) for w in workers])

    async def list(
        self,
        *,
        status: str | None = None,
        queue: str | None = None,
        parent: str | None = None,
        text: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[schemas.Execution]:
        """Executions, newest first; ``text`` matches part of an id or machine name."""
        checks.listing(
            status=status, queue=queue, parent=parent, text=text, limit=limit, offset=offset
        )
        if parent:
            await self.client.get(parent)  # an unknown parent is a mistake, not an empty list
        rows = await self.store.list_executions(
            status=status, queue=queue, parent=parent, text=text, limit=limit, offset=offset
        )
        return [schemas.Execution.of(ex) for ex in rows]

    async def checkpoint_context(self, execution_id: str, seq: int) -> Any:
        """The context of one checkpoint of the history (its ``seq``)."""
        checks.execution_id(execution_id)
        checks.integer(seq, "the checkpoint's seq")
        at = await self.store.checkpoint_at(execution_id, seq=seq)
        if at is None:
            raise UserError(f"execution {execution_id} has no checkpoint {seq}")
        return json.loads(at.snapshot or b"{}").get("context")

    async def throughput(self, *, buckets: int = 60, seconds: float = 10.0) -> list[int]:
        """Completions in each of the last ``buckets`` windows of ``seconds``."""
        checks.integer(buckets, "buckets", low=1, high=10_000)
        checks.seconds(seconds, "seconds", positive=True)
        return await self.store.finished_per_bucket(buckets=buckets, seconds=seconds)

    async def count_by_status(self) -> dict[str, int]:
        return await self.store.count_by_status()

    async def context(self, execution_id: str, step: int | None = None) -> Any:
        """The context at the latest checkpoint, or at ``step``."""
        _, context = await self.client.context(execution_id, step)
        return context

    async def workers(self, *, include_stopped: bool = False) -> list[schemas.Worker]:
        rows = await self.store.list_workers(include_stopped=include_stopped)
        return [schemas.Worker.of(w) for w in rows]

    async def prune(
        self,
        *,
        older_than: float = DEFAULT_RETENTION,
        statuses: Sequence[str] | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Remove finished executions (completed, failed, cancelled, or those of
        ``statuses``) that finished over ``older_than`` seconds ago, with their
        checkpoints and signals; ``dry_run`` counts them only. Unfinished
        executions, and finished children of an unfinished root, stay."""
        from .clock import utcnow
        from .store.models import FINAL_STATUSES

        older_than = timers.check_seconds(float(older_than), "older_than")
        chosen = tuple(statuses) if statuses else tuple(FINAL_STATUSES)
        bad = sorted(set(chosen) - set(FINAL_STATUSES))
        if bad:
            raise UserError(
                f"--status {bad[0]!r} is not a finished status; prune takes "
                f"{', '.join(sorted(FINAL_STATUSES))}"
            )
        before = utcnow() - timedelta(seconds=older_than)
        done = await self.store.prune(before=before, statuses=chosen, dry_run=dry_run)
        return {
            "dry_run": dry_run,
            "finished_before": iso(before),
            "statuses": sorted(chosen),
            "executions": done.executions,
            "checkpoints": done.checkpoints,
            "signals": done.signals,
            "results": done.results,
            "locks": done.locks,
        }

    async def queues(self) -> list[schemas.QueueStats]:
        """Per queue: executions per status, workers, pool policy, latest scaling."""
        events = await self.store.scaling_history(limit=200)
        needs = await self.store.queued_needs()
        workers = await self.store.list_workers(include_stopped=False)
        out = []
        for row in await self.store.queue_stats():
            mine = [e for e in events if e["queue"] == row["queue"]][:5]
            wanted = [n for n in needs.get(row["queue"], []) if n]
            out.append(
                schemas.QueueStats(
                    **row,
                    waiting_for_hooks=await self._missing_hooks(row["queue"], wanted, workers)
                    if wanted
                    else [],
                    scaling_events=[
                        schemas.ScalingEvent(
                            at=e["at"],
                            from_workers=e["from_workers"],
                            to_workers=e["to_workers"],
                            reason=e["reason"],
                        )
                        for e in mine
                    ],
                )
            )
        return out

    # --------------------------------------------------------- the pool

    async def scale(
        self,
        queue: str,
        *,
        min_workers: int,
        max_workers: int,
        per_worker: int | None = None,
        create: bool = False,
    ) -> None:
        await self.client.scale(
            queue,
            min_workers=min_workers,
            max_workers=max_workers,
            per_worker=per_worker,
            create=create,
        )

    async def pause_queue(self, queue: str) -> None:
        """No worker claims the queue's executions until ``resume_queue``."""
        checks.queue_name(queue, "the queue")
        if not await self.store.set_queue_paused(queue, True):
            raise UserError(f"no queue named '{queue}' (see `orch queues`)")

    async def resume_queue(self, queue: str) -> None:
        checks.queue_name(queue, "the queue")
        if not await self.store.set_queue_paused(queue, False):
            raise UserError(f"no queue named '{queue}' (see `orch queues`)")

    async def add_schedule(
        self,
        name: str,
        machine: Machine,
        *,
        cron: str,
        input: dict[str, Any] | None = None,
        queue: str = "default",
        overlap: str = "skip",
    ) -> Any:
        from .cron import trigger

        checks.bounded_text(cron, "--cron", checks.CRON_LENGTH)
        trigger(cron)  # a bad expression before the machine is even read
        return await self.client.add_schedule(
            name, _config(machine), cron=cron, input=input, queue=queue, overlap=overlap
        )

    async def schedules(self) -> list[schemas.Schedule]:
        return [
            schemas.Schedule(**{k: r[k] for k in schemas.Schedule.model_fields})
            for r in await self.store.list_schedules()
        ]

    async def remove_schedule(self, name: str) -> None:
        checks.bounded_text(name, "a schedule name", checks.SCHEDULE_NAME_LENGTH)
        if not await self.store.remove_schedule(name):
            raise UserError(f"no schedule named '{name}' (see `orch schedule list`)")

    # ------------------------------------------------------------ workers

    def _adapters(self, hooks: HooksRegistry | str | None, adapters: list[Any] | None) -> list[Any]:
        from .app import load_agent_adapters

        if adapters is not None:
            return list(adapters)
        return load_agent_adapters(hooks) if isinstance(hooks, str) and hooks else []

    def _registry(self, hooks: HooksRegistry | str | None) -> HooksRegistry:
        from flatmachines import HooksRegistry

        from .app import load_hooks_registry

        if isinstance(hooks, HooksRegistry):
            return hooks
        if isinstance(hooks, str) and hooks:
            return load_hooks_registry(hooks)
        raise UserError(
            "worker() needs your hooks: a flatmachines HooksRegistry, or the name of a "
            "module whose `hooks_registry` is one (e.g. worker('myapp.hooks'))"
        )

    @contextlib.asynccontextmanager
    async def worker(
        self,
        hooks: HooksRegistry | str | None = None,
        *,
        concurrency: int = 4,
        queues: list[str] | tuple[str, ...] = ("default",),
        drain_timeout: float = 30.0,
        agent_adapters: list[Any] | None = None,
    ) -> AsyncIterator[Worker]:
        """A worker in this process, for the length of the ``async with``: it
        claims and runs executions of ``queues`` with the given hooks, and on
        leaving stops as `orch worker` does on SIGTERM (running executions
        finish, or are released after ``drain_timeout`` to resume elsewhere; one
        whose sync hook is still on a thread is released when the hook returns).
        Cancelled while it stops (a second Ctrl-C), it releases at once what it
        can and leaves the rest to their leases, as a second SIGTERM does; their
        hooks' threads end with the process, or go on in it until they return."""
        from .worker import Worker, WorkerOptions

        registry = self._registry(hooks)
        checks.integer(concurrency, "concurrency", low=1)
        checks.seconds(drain_timeout, "drain_timeout")
        for name in queues:
            checks.queue_name(name, "a queue")
        options = WorkerOptions(
            queues=list(queues),
            concurrency=concurrency,
            drain_timeout=drain_timeout,
            handle_signals=False,
            agent_adapters=self._adapters(hooks, agent_adapters),
        )
        worker = Worker(self.store, registry, options, self.settings)
        task = asyncio.create_task(worker.run(), name=f"orch-worker:{worker.id}")
        started = asyncio.create_task(worker.registered.wait())
        await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            started.cancel()
            task.result()  # it failed to start: say why
        try:
            yield worker
        finally:
            worker.request_stop()
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                worker.request_stop()  # a second stop: release at once
                await task
                raise

    async def serve_worker(
        self,
        hooks: HooksRegistry | str | None,
        *,
        concurrency: int = 1,
        queues: list[str] | tuple[str, ...] = ("default",),
        burst: bool = False,
        drain_timeout: float = 30.0,
        agent_adapters: list[Any] | None = None,
    ) -> dict[str, Any]:
        """Run a worker in the foreground until SIGTERM/SIGINT drains it (or,
        with ``burst``, until nothing is left to claim): `orch worker`."""
        from .worker import Worker, WorkerOptions

        checks.integer(concurrency, "--concurrency", low=1)
        checks.seconds(drain_timeout, "--drain-timeout")
        for name in queues:
            checks.queue_name(name, "--queue")
        options = WorkerOptions(
            queues=list(queues),
            concurrency=concurrency,
            burst=burst,
            drain_timeout=drain_timeout,
            agent_adapters=self._adapters(hooks, agent_adapters),
        )
        return await Worker(self.store, self._registry(hooks), options, self.settings).run()

    async def serve_scheduler(
        self,
        *,
        app: str | None = None,
        concurrency: int = 1,
        log_dir: str | Path = "orch-logs",
        policy: tuple[str, int, int] | None = None,
    ) -> None:
        """Run the leader-elected scheduler and its local pool until SIGTERM/SIGINT:
        `orch scheduler`, and `orch up` with a queue ``policy`` (name, min, max)."""
        from .app import load_hooks_registry
        from .pool import LocalPool
        from .scheduler import Scheduler

        if app:
            load_hooks_registry(app)  # a bad app is one clear line here, not in every worker
        else:
            logging.getLogger("orchestrator.scheduler").warning(
                "no --app: the workers this scheduler starts have no hooks, and run only "
                "workflows that name none (the rest wait for a worker that has them)"
            )
        if policy is not None:
            queue, lo, hi = policy
            await self.scale(queue, min_workers=lo, max_workers=hi, create=True)
        pool = LocalPool(
            database_url=self.settings.database_url,
            app=app,
            log_dir=Path(log_dir),
            concurrency=concurrency,
            lease_ttl=self.settings.lease_ttl,
        )
        await Scheduler(self.store, self.settings, pool=pool).run()

    # ----------------------------------------------------------------- sync

    @classmethod
    def sync(cls, url: str | None = None, **kw: Any) -> SyncOrchestrator:
        """The same API for code that is not async (a script, a sync web
        framework): each call runs on a private event loop thread."""
        return SyncOrchestrator(cls(url, **kw))


class SyncOrchestrator:
    """``Orchestrator`` with plain methods. Works from any thread, event loop or
    not; use it as a context manager (or call ``close()``)."""

    def __init__(self, orch: Orchestrator):
        self._orch = orch
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="orch-sync", daemon=True
        )
        self._thread.start()
        try:
            self._call(orch.open())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._orch, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(method(*args, **kwargs))

        call.__name__ = name
        call.__doc__ = method.__doc__
        return call

    @contextlib.contextmanager
    def worker(self, hooks: HooksRegistry | str | None = None, **kw: Any) -> Iterator[Worker]:
        context = self._orch.worker(hooks, **kw)
        worker = self._call(context.__aenter__())
        try:
            yield worker
        finally:
            leaving = asyncio.run_coroutine_threadsafe(
                context.__aexit__(None, None, None), self._loop
            )
            try:
                leaving.result()
            except KeyboardInterrupt:  # a second Ctrl-C while it stops: release at once
                self._loop.call_soon_threadsafe(worker.request_stop)
                leaving.result()
                raise

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._orch.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncOrchestrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
