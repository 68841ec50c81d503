"""The worker: claims executions, keeps their leases alive, runs them.

Its loop is ``machines/worker.yml`` run as a FlatMachine; the actions below
are that machine's hooks. Executions run as asyncio tasks, up to
``concurrency`` at once, so a slow execution never blocks the next claim.

Leases are renewed from a thread with its own event loop and connection pool,
so a hook that blocks the main loop (synchronous I/O) does not cost the lease;
a stopped process (SIGSTOP, a crash) does, and its executions move on.

Two ways to stop. A drain (the scaler's scale-down, status ``draining`` in the
store) claims nothing more and lets what runs finish, however long it takes:
nothing is released. A stop (SIGTERM/SIGINT, leaving an embedded worker) drains
too, and after ``drain_timeout`` releases what still runs, to resume elsewhere
from its last checkpoint. A run whose sync hook is still on a thread keeps its
claim (its lease renewed) until the hook returns, and is released then, since a
thread cannot be stopped. A second stop releases at once what can be released
and leaves such a run to its lease: the hook's thread ends with the process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flatmachines import FlatMachine, HooksRegistry, MachineHooks
from flatmachines.agents import AgentAdapterRegistry

import machines

from . import stopsignal
from .app import registered_names
from .clock import renew_interval
from .errors import LeaseLost, StoreUnavailable
from .offloop import HookCalls, track_hook_calls
from .runner import Outcome, Runner
from .settings import Settings
from .store import Claim, Store
from .store.outage import Backoff
from .store.wake import WakeListener

# CPython collects its oldest generation by the count of objects allocated, so a
# worker with 1,000 executions in flight (and a few hundred thousand objects
# from its start-up: the engine, the library, the app) ran a full collection
# every second or so, each a pause of the event loop of about 90 ms: 1.9 s of
# a 12.7 s W6 run at 5,000 / 1,000. Fewer, later collections, and none over
# what start-up made, cost no memory there (peak RSS 110 MiB either way).
GC_THRESHOLDS = (20_000, 20, 50)


# The store's threads let go of the GIL for every statement they run and must
# take it back from the event loop, which, busy with hundreds of executions,
# keeps it for up to the switch interval (5 ms by default) each time; a batch
# of commits waits that long for every statement, while the store's one write
# lock (SQLite) is held. A tenth of it: W6 5,000 @ 1,000 on SQLite, three
# paired runs, 6-9 % faster, for 2-3 % more CPU.
SWITCH_INTERVAL = 0.0005


def settle_gc() -> None:
    """Tune the garbage collector for a process that is a worker and nothing
    else (`orch worker`; an application that embeds a worker keeps its own):
    what start-up made is frozen out of every collection, and collections come
    less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def settle_process() -> None:
    """``settle_gc``, and a shorter GIL switch interval, so that the store's
    threads get the GIL back soon from a busy event loop: for a process that
    is a worker and nothing else."""
    settle_gc()
    sys.setswitchinterval(SWITCH_INTERVAL)


log = logging.getLogger(__name__)
# the most executions one claim transaction takes
CLAIM_BATCH = 64
# seconds before a lease renewal that the store did not answer is tried again
RETRY_RENEWAL = 0.5


def process_alive(pid: int, since: datetime) -> bool:
    """Whether ``pid`` still runs the process that registered at ``since``
    (naive UTC): not gone, not a zombie, not a newer process given its pid."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, StopIteration, ValueError, IndexError):
        return True  # no /proc: the lease decides
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return False  # dead, not yet reaped by its parent
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    registered = since.replace(tzinfo=UTC).timestamp()
    return started <= registered + 1.0  # a process born after the row is another one


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass
class WorkerOptions:
    queues: list[str] = field(default_factory=lambda: ["default"])
    concurrency: int = 1
    burst: bool = False
    drain_timeout: float = 30.0  # seconds a stop waits for running executions
    # SIGTERM/SIGINT drain it: `orch worker`; an embedding application keeps its own
    handle_signals: bool = True
    # the app's agent adapters, over flatmachines' own
    agent_adapters: list[Any] = field(default_factory=list)


class LeaseKeeper(threading.Thread):
    """Renews this worker's leases every ttl/3 and heartbeats the worker row."""

    def __init__(self, worker: Worker):
        super().__init__(name="lease-keeper", daemon=True)
        self.worker = worker
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        w = self.worker
        interval = renew_interval(w.settings.lease_ttl)
        # its own engine and pool; a renewal that cannot be made in one interval
        # gives way to the next tick's (the lease has two more)
        store = Store.lazy(w.settings, patience=min(w.settings.store_patience, interval / 2))
        retry = min(interval, RETRY_RENEWAL)
        wait = interval
        away = False
        try:
            while not self._stop_event.wait(wait):
                wait = interval
                held = w.held_leases()
                try:
                    lost, status = await store.renew_leases(w.id, held)
                    paused = await store.paused_queues(w.options.queues)
                except StoreUnavailable:
                    # the store logs the outage once; try again soon, not a tick
                    # later, so the leases are renewed as soon as it answers
                    wait = retry
                    away = True
                    continue
                except Exception:
                    log.exception("lease renewal failed")
                    continue
                if away:  # it answers again: the worker need not wait out its backoff
                    away = False
                    w.on_store_back()
                w.on_renewed(held, lost, status)
                w.paused = frozenset(paused)
        finally:
            await store.close()


class Worker:
    def __init__(
        self,
        store: Store,
        hooks_registry: HooksRegistry,
        options: WorkerOptions,
        settings: Settings | None = None,
    ):
        self.store = store
        self.settings = settings or store.settings
        self.options = options
        self.id = new_worker_id()
        # the hooks names it can run (routing: it claims nothing that needs others)
        self.hooks = frozenset(registered_names(hooks_registry))
        self.runner = Runner(
            store,
            hooks_registry,
            agent_adapters=options.agent_adapters,
            hook_threads=options.concurrency,
            max_steps=self.settings.max_steps,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: dict[str, tuple[asyncio.Task, Claim]] = {}
        self._held_lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._lost: set[tuple[str, int]] = set()  # (id, fence) of runs stopped as lost
        self._wake = asyncio.Event()
        self._drain_requested = False
        # a stop: release what still runs at this loop time (drain_timeout on)
        self._release_at: float | None = None
        self._hard_stop = False
        # runs a second stop left to their leases: a hook of theirs still ran
        self._left: list[str] = []
        self._keeper: LeaseKeeper | None = None
        self._chores: set[asyncio.Task] = set()
        self._listener: WakeListener | None = None
        # the store stopped answering: claims back off, and runs it interrupted
        # (or a claim whose reply was lost) are given back once it answers again
        self._backoff = Backoff(first=min(self.settings.poll_interval, 0.5), cap=5.0)
        self._store_down = False
        self._orphans = False
        self.completed = 0
        self.failed = 0
        self.registered = asyncio.Event()
        # queues paused in the store (refreshed with each lease renewal): not claimed
        self.paused: frozenset[str] = frozenset()

    # ------------------------------------------------------------ public

    async def run(self) -> dict[str, Any]:
        """Run the worker loop machine until it shuts down; returns its output."""
        self._loop = asyncio.get_running_loop()
        self._install_signal_handlers()
        registry = HooksRegistry()
        registry.register("orch-worker", lambda: WorkerHooks(self))
        loop_machine = FlatMachine(
            config_file=str(machines.path("worker")),
            hooks_registry=registry,
            agent_registry=AgentAdapterRegistry(),  # a control loop calls no agent
        )
        try:
            return await loop_machine.execute(max_steps=2**62)
        finally:
            self._remove_signal_handlers()
            await self._stop_everything()

    def request_drain(self) -> None:
        """Claim nothing more; finish what runs, then exit. Nothing is released."""
        self._drain_requested = True
        self._wake.set()

    def request_stop(self) -> None:
        """Drain, and release what still runs after ``drain_timeout``. A second
        request releases at once (on the event loop's thread)."""
        assert self._loop is not None
        if self._release_at is not None:
            self._hard_stop = True
            for task, _ in list(self._running.values()):
                task.cancel()  # runs waiting for their hooks wait no more
        else:
            self._release_at = self._loop.time() + self.options.drain_timeout
        self.request_drain()

    def _on_stop_signal(self) -> None:
        self.request_stop()

    # ---------------------------------------------- shared with the keeper

    def held_leases(self) -> dict[str, int]:
        with self._held_lock:
            return dict(self._held)

    def on_store_back(self) -> None:
        """Called from the keeper thread when the store answers again: give back
        what an outage interrupted, and claim, now."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._wake.set)

    def on_renewed(self, held: dict[str, int], lost: set[str], status: str | None) -> None:
        """Called from the keeper thread after each renewal of ``held`` (the
        leases it read, with their fences); ``lost``: those whose fence moved on."""
        assert self._loop is not None
        if lost:
            self._loop.call_soon_threadsafe(self._abandon, {i: held[i] for i in lost})
        if status == "draining":
            self._loop.call_soon_threadsafe(self.request_drain)

    # ----------------------------------------------------------- actions

    async def register(self) -> None:
        while True:
            try:
                await self.store.register_worker(
                    self.id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    queue_names=self.options.queues,
                    concurrency=self.options.concurrency,
                    hooks=self.hooks,
                )
                break
            except StoreUnavailable:
                if self._drain_requested:
                    raise
                await self._pause()
        self._backoff.reset()
        try:
            self.paused = frozenset(await self.store.paused_queues(self.options.queues))
        except StoreUnavailable:
            pass
        self._keeper = LeaseKeeper(self)
        self._keeper.start()
        await self._take_over_dead_neighbours()
        # woken the moment work is runnable (a submit, a signal), not at the next poll
        self._listener = WakeListener(self.store.url, self.id, self._wake.set)
        self._listener.start()
        self.registered.set()
        log.info(
            "worker %s serving %s with concurrency %d",
            self.id,
            ",".join(self.options.queues),
            self.options.concurrency,
        )

    async def _take_over_dead_neighbours(self) -> None:
        """Workers of this host whose process is gone (a restarted application's
        dead predecessor, say) hold nothing: their executions are requeued now,
        not after their leases run out. Fencing still holds."""
        host = socket.gethostname()
        try:
            rows = await self.store.list_workers(include_stopped=False)
            dead = [
                w.pid
                for w in rows
                if w.host == host
                and w.status in ("active", "draining")
                and w.id != self.id
                and not process_alive(w.pid, w.started_at)
            ]
            if not dead:
                return
            for worker_id in await self.store.workers_exited(host, dead):
                log.info("worker %s of this host is gone: its executions resume now", worker_id)
        except StoreUnavailable:
            pass  # their leases run out instead

    async def claim(self) -> int:
        claimed = 0
        try:
            if self._orphans and not self._drain_requested:
                await self._release_orphans()
            queues = [q for q in self.options.queues if q not in self.paused]
            while queues and not self._drain_requested:
                free = self.options.concurrency - len(self._running)
                if free <= 0:
                    break
                # as many as there are free slots, in one transaction
                claims = await self.store.claim_many(
                    self.id, queues, hooks=self.hooks, limit=min(free, CLAIM_BATCH)
                )
                for claim in claims:
                    claimed += 1
                    self._start(claim)
                if len(claims) < min(free, CLAIM_BATCH):
                    break
        except StoreUnavailable as exc:
            # keep what runs and back off; a claim whose reply was lost is ours
            # in the store but not here, so it is given back once the store answers
            self._store_down = True
            if exc.uncertain:
                self._orphans = True
            return claimed
        if self._store_down:
            self._store_down = False
            self._backoff.reset()
        return claimed

    async def _release_orphans(self) -> None:
        # what runs now is kept; a run the outage interrupts while this waits on
        # the store is in that set, so it keeps its lease, sets _orphans again,
        # and is given back next time (not left to expire as a crashed worker's)
        running = set(self._running)
        self._orphans = False
        try:
            released = await self.store.release_orphans(self.id, list(running))
        except StoreUnavailable:
            self._orphans = True
            raise
        with self._held_lock:  # given back, or no longer ours: no lease to keep
            for ex_id in [i for i in self._held if i not in running]:
                del self._held[ex_id]
        if released:
            log.info(
                "gave back %d execution(s) interrupted while the store was away; they "
                "resume from their last checkpoints",
                len(released),
            )

    async def _pause(self) -> None:
        """A backoff step while the store does not answer (a drain cuts it short)."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self._backoff.next())
        except TimeoutError:
            pass

    async def wait_and_check(self, claimed: int) -> bool:
        """Wait for something to do. True when a --burst worker is finished."""
        if self._drain_requested:
            return False
        if self._store_down:
            await self._pause()
            return False
        free = len(self._running) < self.options.concurrency
        if free and claimed:
            return False  # the claim loop stopped only because slots filled or it drained
        if self.options.burst and free and not claimed and not self._running and not self._orphans:
            return True
        self._wake.clear()
        timeout = None if not free else self.settings.poll_interval
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass
        return False

    async def drain(self) -> None:
        log.info("worker %s draining: %d running", self.id, len(self._running))
        try:
            await self.store.set_worker_status(self.id, "draining")
        except StoreUnavailable:
            pass  # it drains all the same; the row says so once it can
        assert self._loop is not None
        # a drain waits for what runs; a stop, that comes now or later, until its deadline
        while self._running and not self._hard_stop:
            self._wake.clear()
            remaining = None if self._release_at is None else self._release_at - self._loop.time()
            if remaining is not None and remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
        await self._release_all()
        if self._orphans:
            try:
                await self._release_orphans()
            except StoreUnavailable:
                pass  # their leases expire and any worker takes them over

    async def shutdown(self) -> None:
        await self._stop_everything()
        log.info("worker %s stopped: %d completed, %d failed", self.id, self.completed, self.failed)
        if self._left:
            log.warning(
                "worker %s left %d execution(s) to their leases: they resume elsewhere",
                self.id,
                len(self._left),
            )

    # --------------------------------------------------------- internals

    def _start(self, claim: Claim) -> None:
        ex = claim.execution
        with self._held_lock:
            self._held[ex.id] = claim.fence
        task = asyncio.create_task(self._execute(claim), name=f"execution:{ex.id}")
        self._running[ex.id] = (task, claim)
        # one line per execution at INFO (its outcome); a recovery is news
        log.log(
            logging.INFO if claim.recovered else logging.DEBUG,
            "claimed %s (%s, fence %d%s)",
            ex.id,
            ex.machine,
            claim.fence,
            ", recovered" if claim.recovered else "",
        )

    async def _execute(self, claim: Claim) -> None:
        ex_id = claim.execution.id
        interrupted = False
        hook_calls = track_hook_calls()
        try:
            if (defect := claim.execution.defect()) is not None:
                await self._fail_unusable(claim, defect)
                return
            outcome: Outcome = await self.runner.run(claim)
            if outcome.status == "completed":
                self.completed += 1
            elif outcome.status == "failed":
                self.failed += 1
            elif outcome.status == "interrupted":
                # given back once the store answers; its lease is kept alive until
                # then, so that nobody takes it as a crashed worker's (a recovery)
                self._orphans = interrupted = True
            if outcome.status == "waiting":
                until = f" until {outcome.wake_at.isoformat()}Z" if outcome.wake_at else ""
                log.info("waiting %s on '%s'%s", ex_id, outcome.channel, until)
            elif outcome.status == "requeued":
                log.info("requeued %s: '%s' was ready as it parked", ex_id, outcome.channel)
            elif outcome.status != "interrupted":
                log.info("%s %s", outcome.status, ex_id)
        except asyncio.CancelledError:
            if (ex_id, claim.fence) not in self._lost:
                await self._give_back(claim, hook_calls)
        except Exception:
            log.exception("worker error while running %s", ex_id)
        finally:
            # this claim's entries only: the execution may be claimed again
            # (requeued, or retried at once) before this task has ended
            with self._held_lock:
                if not interrupted and self._held.get(ex_id) == claim.fence:
                    del self._held[ex_id]
            if (entry := self._running.get(ex_id)) is not None and entry[1] is claim:
                del self._running[ex_id]
            self._lost.discard((ex_id, claim.fence))
            self._wake.set()

    async def _give_back(self, claim: Claim, hook_calls: HookCalls) -> None:
        """A run stopped by a stop: give it back; it resumes from its last
        checkpoint. Not while a hook of it is still on a thread: the claim is
        kept (the keeper renews its lease) until the hook returns, so that nothing
        of the run goes on after the release. A second stop waits no more, and
        leaves such a run to its lease."""
        ex_id = claim.execution.id
        if hook_calls.busy and not self._hard_stop:
            log.info("keeping %s until its hook returns: a thread cannot be stopped", ex_id)
            try:
                await hook_calls.settled()
            except asyncio.CancelledError:
                pass  # a second stop, or its lease was lost meanwhile
        if (ex_id, claim.fence) in self._lost:
            return
        if hook_calls.busy:
            self._left.append(ex_id)
            log.warning("left %s to its lease: its hook still runs, until this process ends", ex_id)
            return
        try:
            await asyncio.shield(self.store.release(claim))
            log.info("released %s back to queue '%s'", ex_id, claim.execution.queue)
        except StoreUnavailable:
            log.info("could not release %s: the store is away; its lease expires", ex_id)

    async def _fail_unusable(self, claim: Claim, defect: str) -> None:
        """A row this worker cannot run (written around the API): it ends failed,
        saying why, and the worker goes on with the next."""
        ex_id = claim.execution.id
        error = f"execution {ex_id} cannot run: {defect}; correct the row, then `orch retry`"
        log.warning("failed %s: %s", ex_id, defect)
        try:
            await self.store.finish(claim, status="failed", error=error)
        except LeaseLost:
            return
        self.failed += 1

    def _abandon(self, lost: dict[str, int]) -> None:
        """Stop runs whose claim (id: fence) moved on: taken over, or cancelled.
        A run under a newer claim, this worker's own since the keeper read its
        leases (given back and claimed again at once), is not the one lost."""
        stopped = []
        for ex_id, fence in lost.items():
            entry = self._running.get(ex_id)
            if entry is None or entry[1].fence != fence:
                continue
            self._lost.add((ex_id, fence))
            entry[0].cancel()
            stopped.append(ex_id)
        if stopped:
            task = asyncio.create_task(self._say_why(stopped))
            self._chores.add(task)
            task.add_done_callback(self._chores.discard)

    async def _say_why(self, stopped: list[str]) -> None:
        for ex_id in stopped:
            try:
                ex = await self.store.get(ex_id)
            except StoreUnavailable:
                ex = None
            if ex is not None and ex.status == "cancelled":
                reason = f" ({ex.cancel_reason})" if ex.cancel_reason else ""
                log.info("cancelled %s%s: stopped it", ex_id, reason)
            else:
                log.warning("lease lost on %s: abandoning it", ex_id)

    async def _release_all(self) -> None:
        tasks = [t for t, _ in self._running.values()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stop_everything(self) -> None:
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        await self._release_all()
        if self._keeper is not None:
            self._keeper.stop()
            await asyncio.to_thread(self._keeper.join)
            self._keeper = None
            if self._left:
                # not stopped: still draining, with claims, its process soon gone; so
                # a supervisor that sees it exit, or this host's next worker, requeues
                # them at once (the reaper, a lease TTL on)
                return
            try:
                await self.store.set_worker_status(self.id, "stopped")
            except StoreUnavailable:
                log.warning("worker %s could not mark itself stopped: the store is away", self.id)

    def _install_signal_handlers(self) -> None:
        assert self._loop is not None
        if not self.options.handle_signals:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._on_stop_signal)
        if stopsignal.received():  # a stop that came while `orch worker` started
            self._on_stop_signal()

    def _remove_signal_handlers(self) -> None:
        assert self._loop is not None
        if not self.options.handle_signals:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.remove_signal_handler(sig)


class WorkerHooks(MachineHooks):
    """The worker machine's actions, bound to one Worker."""

    def __init__(self, worker: Worker):
        self.worker = worker

    async def on_action(self, state_name: str, action_name: str, context: dict[str, Any]):
        w = self.worker
        if action_name == "register":
            await w.register()
        elif action_name == "claim":
            context["claimed"] = await w.claim()
        elif action_name == "wait_and_check":
            context["finished"] = await w.wait_and_check(context.get("claimed", 0))
        elif action_name == "drain":
            await w.drain()
        elif action_name == "shutdown":
            await w.shutdown()
            context["completed"] = w.completed
            context["failed"] = w.failed
            context["left_to_lease"] = len(w._left)
        else:
            raise ValueError(f"worker machine names unknown action '{action_name}'")
        context["draining"] = w._drain_requested
        return context
