"""The scheduler: APScheduler jobs run by whichever scheduler holds the leader lease.

Several schedulers may run on several hosts; a lease row in the store (with
its own fence) makes one of them leader, and a standby takes over within one
lease TTL after the leader dies. Every job renews and checks leadership before
it acts. Jobs: the reaper (machines/reaper.yml), the autoscaler
(machines/scaler.yml), cron schedules and retention (machines/retention.yml:
finished executions removed after ``ORCH_RETENTION``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from flatmachines import FlatMachine, HooksRegistry, MachineHooks
from flatmachines.agents import AgentAdapterRegistry

import machines

from . import stopsignal
from .clock import utcnow
from .cron import next_fire
from .errors import StoreUnavailable, UserError
from .pool import LocalPool
from .scaling import Decision, decide
from .settings import Settings
from .store import Store, retention

log = logging.getLogger(__name__)

LEADER = "scheduler"


@dataclass
class SchedulerOptions:
    reap_interval: float | None = None  # default ttl/2
    scale_interval: float = 1.0
    schedule_interval: float = 1.0
    # retention: a run every tick while the last one left executions to remove,
    # else one every interval
    retention_tick: float = 1.0
    retention_interval: float = 60.0


class Scheduler:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        pool: LocalPool | None = None,
        options: SchedulerOptions | None = None,
    ):
        self.store = store
        self.settings = settings
        self.pool = pool
        self.options = options or SchedulerOptions()
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.fence: int | None = None
        self._stopping = asyncio.Event()
        # pids of pool workers seen dead whose executions are not requeued yet
        self._exited: list[int] = []
        self._retention_due: datetime | None = None  # None: at the next tick

    # ------------------------------------------------------------ leadership

    async def check_leadership(self) -> bool:
        """Take or renew the leader lease; True while this scheduler leads."""
        try:
            fence = await self.store.hold_leadership(LEADER, self.id, self.settings.lease_ttl)
        except StoreUnavailable:
            fence = None  # the store logs the outage once; lead again once it answers
        except Exception:
            log.exception("leader lease renewal failed")
            fence = None
        if fence != self.fence:
            if fence is None:
                log.warning("scheduler %s is no longer leader", self.id)
            else:
                log.info("scheduler %s is leader (fence %d)", self.id, fence)
        self.fence = fence
        return fence is not None

    # ------------------------------------------------------------------ jobs

    async def reap(self) -> dict[str, Any] | None:
        if not await self.check_leadership():
            return None
        try:
            return await self._run_machine("reaper", "orch-reaper", ReaperHooks(self))
        except StoreUnavailable:
            return None  # the next run reaps what this one could not

    async def retain(self) -> dict[str, Any] | None:
        """A run of the retention machine when one is due: at once while the
        last run left executions to remove, else every retention interval."""
        if self._retention_due is not None and utcnow() < self._retention_due:
            return None
        if not await self.check_leadership():
            return None
        try:
            out = await self._run_machine("retention", "orch-retention", RetentionHooks(self))
        except StoreUnavailable:
            return None  # the next tick goes on where this one stopped
        if out.get("executions"):
            log.info(
                "retention removed %d finished execution(s) (%d checkpoints, %d signals)",
                out["executions"],
                out["checkpoints"],
                out["signals"],
            )
        pause = 0.0 if out.get("more") else self.options.retention_interval
        self._retention_due = utcnow() + timedelta(seconds=pause)
        return out

    async def scale(self) -> dict[str, Any] | None:
        if self.pool is not None:
            self._exited += [pid for pid, code in self.pool.reap() if code != 0]
            if self._exited:
                # our own children: we know they are dead, no need to wait for leases
                try:
                    dead = await self.store.workers_exited(socket.gethostname(), self._exited)
                except StoreUnavailable:
                    dead = None  # kept for the next run
                if dead is not None:
                    self._exited = []
                    for worker_id in dead:
                        log.warning("worker %s died; its executions are requeued now", worker_id)
        if not await self.check_leadership():
            return None
        try:
            return await self._run_machine("scaler", "orch-scaler", ScalerHooks(self))
        except StoreUnavailable:
            return None

    async def fire_schedules(self) -> list[tuple[str, Any, Any]]:
        if not await self.check_leadership():
            return []
        try:
            # a tick's execution id names the tick: a tick fired by a transaction
            # whose reply was lost is found, not fired again, by the next run
            ticks = await self.store.fire_due_schedules(next_fire)
            if await self._cancel_for_ticks(ticks):
                ticks += await self.store.fire_due_schedules(next_fire)  # the held ticks now
        except StoreUnavailable:
            return []
        fired = []
        for t in ticks:
            if t.execution is not None:
                log.info(
                    "schedule %s fired for %s: execution %s",
                    t.schedule,
                    t.tick.isoformat(),
                    t.execution.id,
                )
                fired.append((t.schedule, t.tick, t.execution))
            elif t.action != "cancelling":  # skipped or buffered
                log.info(
                    "schedule %s %s its tick %s: its last run %s is unfinished",
                    t.schedule,
                    t.action,
                    t.tick.isoformat(),
                    t.running,
                )
        return fired

    async def _cancel_for_ticks(self, ticks: list[Any]) -> bool:
        """Cancel the runs that held ticks of cancel_other schedules wait for."""
        cancelled = False
        for t in ticks:
            if t.action != "cancelling":
                continue
            reason = f"schedule {t.schedule} cancelled it for its tick {t.tick.isoformat()}"
            try:
                await self.store.cancel(t.running, reason=reason)
            except UserError:
                pass  # it finished meanwhile (or is gone): the held tick goes all the same
            log.info("schedule %s cancelled its last run %s", t.schedule, t.running)
            cancelled = True
        return cancelled

    async def _run_machine(self, name: str, hooks_name: str, hooks: MachineHooks) -> dict[str, Any]:
        """One run of a control machine; its states share one hooks object."""
        registry = HooksRegistry()
        registry.register(hooks_name, lambda: hooks)
        machine = FlatMachine(
            config_file=str(machines.path(name)),
            hooks_registry=registry,
            agent_registry=AgentAdapterRegistry(),  # a control loop calls no agent
        )
        return await machine.execute()

    # ------------------------------------------------------------------- run

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT; then stop the jobs, drain the pool, resign."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        if stopsignal.received():  # a stop that came while the command started
            self._stopping.set()
        ttl = self.settings.lease_ttl
        jobs = AsyncIOScheduler(timezone="UTC")
        common = dict(max_instances=1, coalesce=True, misfire_grace_time=None)
        jobs.add_job(self.check_leadership, "interval", seconds=ttl / 3, **common)
        jobs.add_job(self.reap, "interval", seconds=self.options.reap_interval or ttl / 2, **common)
        jobs.add_job(self.scale, "interval", seconds=self.options.scale_interval, **common)
        jobs.add_job(
            self.fire_schedules, "interval", seconds=self.options.schedule_interval, **common
        )
        jobs.add_job(self.retain, "interval", seconds=self.options.retention_tick, **common)
        # act at once on start: a schedule missed while no scheduler ran fires now
        await self.check_leadership()
        await self.fire_schedules()
        await self.reap()
        await self.scale()
        jobs.start()
        log.info("scheduler %s running (lease ttl %.1fs)", self.id, ttl)
        try:
            await self._stopping.wait()
        finally:
            jobs.shutdown(wait=False)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self.pool is not None:
                log.info("draining %d pool workers", len(self.pool.children))
                await asyncio.to_thread(self.pool.stop_all)
            if self.fence is not None:
                try:
                    await self.store.resign_leadership(LEADER, self.id)
                except StoreUnavailable:
                    pass  # the lease expires by itself
            log.info("scheduler %s stopped", self.id)

    def stop(self) -> None:
        self._stopping.set()


class ReaperHooks(MachineHooks):
    def __init__(self, scheduler: Scheduler):
        self.s = scheduler

    async def on_action(self, state_name: str, action_name: str, context: dict[str, Any]):
        store = self.s.store
        if action_name == "mark_lost_workers":
            lost = await store.mark_lost_workers(silent_for=self.s.settings.lease_ttl)
            for worker_id in lost:
                log.warning("worker %s is lost (no heartbeat for a lease TTL)", worker_id)
            context["lost_workers"] = lost
        elif action_name == "requeue_expired":
            requeued, failed = await store.requeue_expired()
            for ex_id in requeued:
                log.info("requeued %s: its lease expired", ex_id)
            for ex_id in failed:
                log.warning("failed %s: it crashed its worker too often", ex_id)
            context["requeued"], context["failed"] = requeued, failed
        else:
            raise ValueError(f"reaper machine names unknown action '{action_name}'")
        return context


class RetentionHooks(MachineHooks):
    def __init__(self, scheduler: Scheduler):
        self.s = scheduler
        self._before: datetime | None = None

    async def on_action(self, state_name: str, action_name: str, context: dict[str, Any]):
        if action_name == "cutoff":
            keep = self.s.settings.retention
            context["keep_forever"] = keep == 0
            if keep:
                self._before = utcnow() - timedelta(seconds=keep)
        elif action_name == "prune_batch":
            assert self._before is not None, "retention machine prunes before its cutoff"
            batch = retention.BATCH
            done = await self.s.store.prune(before=self._before, limit=batch)
            context["batches"] += 1
            context["executions"] += done.executions
            context["checkpoints"] += done.checkpoints
            context["signals"] += done.signals
            context["more"] = done.executions == batch
        elif action_name == "sweep_blobs":
            context["blobs"] = await self.s.store.sweep_blobs()
        elif action_name == "reclaim":
            context["reclaimed"] = await self.s.store.reclaim()
        else:
            raise ValueError(f"retention machine names unknown action '{action_name}'")
        return context


class ScalerHooks(MachineHooks):
    def __init__(self, scheduler: Scheduler):
        self.s = scheduler
        self._snapshot: list[dict[str, Any]] = []
        self._pending: dict[str, int] = {}
        self._decisions: list[Decision] = []

    async def on_action(self, state_name: str, action_name: str, context: dict[str, Any]):
        pool = self.s.pool
        if action_name == "observe":
            self._snapshot = await self.s.store.scaling_snapshot()
            host = socket.gethostname()
            for q in self._snapshot:
                pids = {w["pid"] for w in q["workers"] if w["host"] == host}
                self._pending[q["queue"]] = pool.pending(q["queue"], pids) if pool else 0
        elif action_name == "decide":
            now = utcnow()
            cooldown = float(context.get("cooldown_seconds") or 0)
            self._decisions = [
                decide(q, pending=self._pending.get(q["queue"], 0), now=now, cooldown=cooldown)
                for q in self._snapshot
            ]
            context["decisions"] = [asdict(d) for d in self._decisions]
        elif action_name == "apply":
            for d in self._decisions:
                await self._apply(d)
        else:
            raise ValueError(f"scaler machine names unknown action '{action_name}'")
        return context

    async def _apply(self, d: Decision) -> None:
        pool = self.s.pool
        if d.spawn and pool is None:
            return  # a scheduler without a pool only drains
        if not d.changes:
            return
        for _ in range(d.spawn):
            pool.spawn(d.queue)  # type: ignore[union-attr]
        drained = [w for w in d.drain if await self.s.store.drain_idle_worker(w)]
        to = d.current + d.spawn - len(drained)
        if to != d.current:
            log.info("queue '%s': %d -> %d workers (%s)", d.queue, d.current, to, d.reason)
            await self.s.store.record_scaling(
                d.queue, from_workers=d.current, to_workers=to, reason=d.reason
            )
