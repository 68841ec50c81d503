"""flatmachines' distributed-worker protocols on the store, on SQLite and PostgreSQL.

RegistrationBackend and WorkBackend / WorkPool (orchestrator.distributed) at the
protocol level, then the DistributedWorkerHooks pattern end to end: a stale-worker
reaper, a parallelization checker that starts workers, and the workers looping
claim → process → complete, as real FlatMachine executions on these backends.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from flatmachines import DistributedWorkerHooks, FlatMachine, HooksRegistry
from flatmachines.distributed import RegistrationBackend, WorkerFilter, WorkerRegistration
from flatmachines.work import WorkBackend, WorkPool
from freezegun import freeze_time

from orchestrator.clock import utcnow
from orchestrator.distributed import StoreRegistrationBackend, StoreWorkBackend
from orchestrator.store import Store

from .conftest import run_async

MACHINES = Path(__file__).parent / "distributed"


def reg(worker_id: str, **kw) -> WorkerRegistration:
    return WorkerRegistration(worker_id=worker_id, **kw)


def by_id(rows) -> dict:
    return {r.id: r for r in rows}


# ------------------------------------------------------------- registration


def test_backends_implement_the_flatmachines_protocols(store):
    work = StoreWorkBackend(store)
    assert isinstance(StoreRegistrationBackend(store), RegistrationBackend)
    assert isinstance(work, WorkBackend)
    assert isinstance(work.pool("p"), WorkPool)
    assert work.pool("p") is work.pool("p")


def test_registration_lifecycle_maps_onto_the_workers_table(store):
    backend = StoreRegistrationBackend(store)
    o = SimpleNamespace()

    async def ours(worker_id: str):
        return by_id(await store.list_workers())[worker_id]

    async def go():
        with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
            o.record = await backend.register(
                reg("w1", host="h1", pid=42, capabilities=["gpu", "pdf"])
            )
            clock.tick(5)
            await backend.heartbeat("w1", {"a": 1})
            await backend.heartbeat("w1", {"b": 2})
            await backend.heartbeat("w1")
            o.beat = await backend.get("w1")
            o.ours_active = await ours("w1")
            await backend.update_status("w1", "terminating")
            o.terminating = await backend.get("w1")
            o.ours_draining = await ours("w1")
            await backend.update_status("w1", "terminated")
            o.terminated = await backend.get("w1")
            o.ours_stopped = await ours("w1")
            await backend.register(reg("w2"))  # no host, no pid
            o.bare = await backend.get("w2")
            o.ours_bare = await ours("w2")
            o.again = await backend.register(reg("w1", host="h1", pid=43))

    run_async(go())
    record, beat, again, bare = o.record, o.beat, o.again, o.bare
    ours_active, ours_stopped, ours_bare = o.ours_active, o.ours_stopped, o.ours_bare
    terminating, terminated, ours_draining = o.terminating, o.terminated, o.ours_draining

    # what flatmachines sees: its own vocabulary, ISO times
    assert record.worker_id == "w1" and record.status == "active"
    assert (record.host, record.pid, record.capabilities) == ("h1", 42, ["gpu", "pdf"])
    assert datetime.fromisoformat(record.started_at) == datetime.fromisoformat(
        "2026-01-01T00:00:00+00:00"
    )
    assert datetime.fromisoformat(beat.last_heartbeat) == datetime.fromisoformat(
        "2026-01-01T00:00:05+00:00"
    )
    assert beat.metadata == {"a": 1, "b": 2}  # merged, kept by a bare heartbeat
    assert terminating.status == "terminating" and terminated.status == "terminated"
    # what `orch workers` sees: our vocabulary
    assert ours_active.status == "active" and ours_active.queues == []
    assert (ours_active.host, ours_active.pid, ours_active.concurrency) == ("h1", 42, 1)
    assert ours_active.last_heartbeat == datetime(2026, 1, 1, 0, 0, 5)
    assert ours_draining.status == "draining"
    assert ours_stopped.status == "stopped" and ours_stopped.stopped_at is not None
    # required columns get neutral values; flatmachines gets its None back
    assert (ours_bare.host, ours_bare.pid) == ("", 0)
    assert (bare.host, bare.pid, bare.capabilities) == (None, None, None)
    # registering an id again is a fresh registration (as the reference's REPLACE)
    assert again.status == "active" and again.pid == 43 and again.metadata is None


def test_registration_errors(store):
    backend = StoreRegistrationBackend(store)

    async def go():
        assert await backend.get("nobody") is None
        with pytest.raises(KeyError):
            await backend.heartbeat("nobody")
        with pytest.raises(KeyError):
            await backend.heartbeat("nobody", {"a": 1})
        with pytest.raises(KeyError):
            await backend.update_status("nobody", "lost")
        await backend.register(reg("w"))
        with pytest.raises(ValueError, match="unknown worker status"):
            await backend.update_status("w", "zombie")
        await backend.update_status("w", "draining")  # our own name is understood too
        return await backend.get("w")

    assert run_async(go()).status == "terminating"


def test_list_filters_by_staleness_status_and_capability(store):
    backend = StoreRegistrationBackend(store)

    async def ids(f: WorkerFilter | None = None) -> list[str]:
        return sorted(w.worker_id for w in await backend.list(f))

    async def go():
        out = {}
        with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
            await backend.register(reg("old", capabilities=["gpu"]))
            # an `orch worker` of our own shares the registry
            await store.register_worker(
                "orch-w", host="h", pid=7, queue_names=["default"], concurrency=2
            )
            clock.tick(200)
            await backend.register(reg("new", capabilities=["cpu"]))
            clock.tick(100)  # old and orch-w silent for exactly 300 s: not yet stale
            out["at_threshold"] = await ids(WorkerFilter(stale_threshold_seconds=300))
            clock.tick(1)
            out["past_threshold"] = await ids(WorkerFilter(stale_threshold_seconds=300))
            clock.tick(300)
            out["all_silent"] = await ids(WorkerFilter(stale_threshold_seconds=300))
            await backend.heartbeat("new")
            out["after_heartbeat"] = await ids(WorkerFilter(stale_threshold_seconds=300))
            out["zero_means_no_filter"] = await ids(WorkerFilter(stale_threshold_seconds=0))
            await backend.update_status("new", "terminating")
            out["terminating"] = await ids(WorkerFilter(status="terminating"))
            out["active"] = await ids(WorkerFilter(status="active"))
            out["gpu"] = await ids(WorkerFilter(capability="gpu"))
            out["active_stale_gpu"] = await ids(
                WorkerFilter(status="active", capability="gpu", stale_threshold_seconds=60)
            )
            out["everyone"] = await backend.list()
        return out

    out = run_async(go())
    assert out["at_threshold"] == []
    assert out["past_threshold"] == ["old", "orch-w"]
    assert out["all_silent"] == ["new", "old", "orch-w"]
    assert out["after_heartbeat"] == ["old", "orch-w"]
    assert out["zero_means_no_filter"] == ["new", "old", "orch-w"]
    assert out["terminating"] == ["new"]
    assert out["active"] == ["old", "orch-w"]
    assert out["gpu"] == ["old"]
    assert out["active_stale_gpu"] == ["old"]
    orch_w = {w.worker_id: w for w in out["everyone"]}["orch-w"]
    assert (orch_w.status, orch_w.host, orch_w.pid, orch_w.capabilities) == (
        "active",
        "h",
        7,
        None,
    )


# -------------------------------------------------------------------- pools


def test_push_claim_complete(store):
    work = StoreWorkBackend(store)
    pool, other = work.pool("p"), work.pool("q")
    registration = StoreRegistrationBackend(store)

    async def go():
        out = {}
        await registration.register(reg("w"))
        with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
            ids = []
            for n in range(3):
                ids.append(await pool.push({"n": n}))
                clock.tick(1)
            q_id = await other.push("elsewhere", {"max_retries": 5})
            out["sizes"] = (await pool.size(), await other.size())
            first = await pool.claim("w")
            out["holding"] = (await registration.get("w"), by_id(await store.list_workers())["w"])
            await pool.complete(first.id, {"double": 0})
            out["after"] = (await registration.get("w"), by_id(await store.list_workers())["w"])
            with pytest.raises(KeyError):
                await pool.complete(first.id)  # completed already
            with pytest.raises(KeyError):
                await pool.complete("no-such-item")
            with pytest.raises(KeyError):
                await other.complete(ids[1])  # another pool's item
            out["q"] = await other.claim("w2")
            out["rest"] = [await pool.claim("w"), await pool.claim("w"), await pool.claim("w")]
            out["items"] = {i.id: i for i in await pool.items()}
        return ids, q_id, first, out

    ids, q_id, first, out = run_async(go())
    assert out["sizes"] == (3, 1)
    assert first.id == ids[0] and first.data == {"n": 0}  # oldest first
    assert (first.status, first.claimed_by, first.attempts, first.max_retries) == (
        "claimed",
        "w",
        1,
        3,
    )
    assert datetime.fromisoformat(first.claimed_at) == datetime.fromisoformat(
        "2026-01-01T00:00:03+00:00"
    )
    theirs, ours = out["holding"]
    assert theirs.current_task_id == first.id and ours.running == 1
    theirs, ours = out["after"]
    assert theirs.current_task_id is None and (ours.running, ours.completed) == (0, 1)
    assert out["q"].id == q_id and out["q"].data == "elsewhere" and out["q"].max_retries == 5
    assert [i.id for i in out["rest"][:2]] == ids[1:] and out["rest"][2] is None
    done = out["items"][first.id]
    assert done.status == "completed" and done.result == {"double": 0}


def test_fail_returns_to_the_pool_then_poisons(store):
    pool = StoreWorkBackend(store).pool("p")

    async def go():
        out = {}
        item_id = await pool.push({"n": 1}, {"max_retries": 2})
        a = await pool.claim("w1")
        await pool.fail(a.id, "boom 1")
        out["after_first"] = ((await pool.items())[0], await pool.size())
        b = await pool.claim("w2")
        await pool.fail(b.id, "boom 2")
        out["after_second"] = ((await pool.items())[0], await pool.size())
        out["claim_poisoned"] = await pool.claim("w3")
        with pytest.raises(KeyError):
            await pool.fail("no-such-item")
        # the default: three attempts, then poisoned
        default_id = await pool.push({"n": 2})
        statuses = []
        for _ in range(3):
            item = await pool.claim("w1")
            await pool.fail(item.id, "again")
            statuses.append({i.id: i.status for i in await pool.items()}[default_id])
        out["default"] = statuses
        return item_id, a, b, out

    item_id, a, b, out = run_async(go())
    assert a.id == b.id == item_id and (a.attempts, b.attempts) == (1, 2)
    first, size = out["after_first"]
    assert (first.status, first.claimed_by, first.attempts, first.error, size) == (
        "pending",
        None,
        1,
        "boom 1",
        1,
    )
    second, size = out["after_second"]
    assert (second.status, second.attempts, second.error, size) == ("poisoned", 2, "boom 2", 0)
    assert out["claim_poisoned"] is None
    assert out["default"] == ["pending", "pending", "poisoned"]


def test_concurrent_claims_never_return_the_same_item(store, settings):
    """Ten claimers on two stores (two engines, as two processes would have)
    drain 50 items: every item is claimed exactly once."""

    async def go():
        second = await Store.open(settings)
        try:
            pools = [StoreWorkBackend(s).pool("p") for s in (store, second)]
            pushed = [await pools[0].push({"n": n}) for n in range(50)]

            async def claimer(i: int) -> list[str]:
                got = []
                while item := await pools[i % 2].claim(f"w{i}"):
                    got.append(item.id)
                    await asyncio.sleep(0)
                return got

            claimed = await asyncio.gather(*(claimer(i) for i in range(10)))
            return pushed, claimed, await pools[1].items()
        finally:
            await second.close()

    pushed, claimed, items = run_async(go())
    flat = [item_id for got in claimed for item_id in got]
    assert len(flat) == 50 and sorted(flat) == sorted(pushed)
    assert all(i.status == "claimed" and i.attempts == 1 for i in items)
    owner = {item_id: f"w{i}" for i, got in enumerate(claimed) for item_id in got}
    assert all(i.claimed_by == owner[i.id] for i in items)


def test_release_by_worker(store):
    work = StoreWorkBackend(store)
    p, q = work.pool("p"), work.pool("q")
    registration = StoreRegistrationBackend(store)

    async def go():
        await registration.register(reg("a"))
        for n in range(3):
            await p.push({"n": n})
        await q.push({"n": "q"})
        p1, p2 = await p.claim("a"), await p.claim("a")
        p3 = await p.claim("b")
        q1 = await q.claim("a")
        await p.complete(p1.id)
        running_before = by_id(await store.list_workers())["a"].running
        released = await p.release_by_worker("a")
        released_again = await p.release_by_worker("a")
        state = {i.id: i for i in await p.items()} | {i.id: i for i in await q.items()}
        running_after = by_id(await store.list_workers())["a"].running
        reclaimed = await p.claim("c")
        released_q = await q.release_by_worker("a")
        return SimpleNamespace(**locals())

    r = run_async(go())
    assert (r.released, r.released_again, r.released_q) == (1, 0, 1)
    state = r.state
    assert state[r.p1.id].status == "completed"
    assert (state[r.p2.id].status, state[r.p2.id].claimed_by) == ("pending", None)
    assert (state[r.p3.id].status, state[r.p3.id].claimed_by) == ("claimed", "b")
    assert (state[r.q1.id].status, state[r.q1.id].claimed_by) == ("claimed", "a")
    assert (r.running_before, r.running_after) == (2, 1)  # q1 is still held
    # a released item goes back with its attempts counted
    assert r.reclaimed.id == r.p2.id and r.reclaimed.attempts == 2


# --------------------------------------------------------------- end to end


class PoolHooks(DistributedWorkerHooks):
    """DistributedWorkerHooks plus the job itself (`process_job`: double a number,
    failing job `fail_once` on its first try) and one line of glue for the reaper."""

    def __init__(self, registration, work, *, fail_once: int):
        super().__init__(registration=registration, work=work)
        self.fail_once = fail_once
        self.failures: Counter[int] = Counter()
        self.completions: Counter[str] = Counter()

    async def on_action(self, state_name, action, context):
        if action == "process_job":
            n = context["job"]["n"]
            if n == self.fail_once and not self.failures[n]:
                self.failures[n] += 1
                raise RuntimeError(f"job {n} failed on purpose")
            context["result"] = {"n": n, "double": 2 * n, "by": context["worker_id"]}
            return context
        if action == "select_stale_workers":
            context["stale_workers"] = context["workers"]
            return context
        if action == "fail_job":
            # the machine puts an unhandled error in context.last_error;
            # fail_job records context.error
            context["error"] = context.get("last_error")
        context = await super().on_action(state_name, action, context)
        if action == "complete_job":
            self.completions[context["job_id"]] += 1
        return context


def test_distributed_worker_pattern_end_to_end(store):
    """20 jobs; a worker that died an hour ago holding two of them. The reaper
    marks it lost and frees its jobs, the checker starts three workers (in-process
    peer machines, see tests/distributed/checker.yml), and they drain the pool."""
    registration, work = StoreRegistrationBackend(store), StoreWorkBackend(store)
    pool = work.pool("jobs")
    hooks = PoolHooks(registration, work, fail_once=7)
    registry = HooksRegistry()
    registry.register("distributed", lambda: hooks)

    def machine(name: str) -> FlatMachine:
        return FlatMachine(config_file=str(MACHINES / name), hooks_registry=registry)

    async def go():
        numbers = {await pool.push({"n": n}): n for n in range(20)}
        with freeze_time(utcnow() - timedelta(hours=1), real_asyncio=True):
            await registration.register(reg("worker-dead", host="gone", pid=1))
            held = [(await pool.claim("worker-dead")).id for _ in range(2)]
        reaped = await machine("reaper.yml").execute(
            input={"pool_id": "jobs", "stale_threshold_seconds": 600}
        )
        checked = await machine("checker.yml").execute(input={"pool_id": "jobs", "max_workers": 3})
        return (
            numbers,
            held,
            reaped,
            checked,
            await pool.items(),
            await pool.size(),
            await store.list_workers(),
            await registration.list(),
        )

    numbers, held, reaped, checked, items, size, ours, theirs = run_async(go())

    assert reaped == {
        "stale_count": 1,
        "reaped_workers": ["worker-dead"],
        "total_jobs_released": 2,
    }
    assert (checked["queue_depth"], checked["active_workers"]) == (20, 0)
    assert checked["workers_to_spawn"] == 3
    assert sorted(r["worker_id"] for r in checked["workers_run"]) == [
        "worker-0",
        "worker-1",
        "worker-2",
    ]

    # every job completed exactly once, with its own result
    assert size == 0 and len(items) == 20
    assert all(i.status == "completed" for i in items)
    assert {i.id: i.result["double"] for i in items} == {k: 2 * n for k, n in numbers.items()}
    assert hooks.completions == Counter({item_id: 1 for item_id in numbers})
    failed_once = next(k for k, n in numbers.items() if n == 7)
    attempts = {i.id: i.attempts for i in items}
    assert attempts == {k: 2 if k in held or k == failed_once else 1 for k in numbers}
    assert {i.id: i.error for i in items if i.error} == {failed_once: "job 7 failed on purpose"}
    workers_seen = {i.result["by"] for i in items}
    assert workers_seen <= {"worker-0", "worker-1", "worker-2"}

    # the workers, as `orch workers` shows them ...
    rows = by_id(ours)
    assert set(rows) == {"worker-dead", "worker-0", "worker-1", "worker-2"}
    assert rows["worker-dead"].status == "lost" and rows["worker-dead"].running == 0
    for name in ("worker-0", "worker-1", "worker-2"):
        row = rows[name]
        assert row.status == "stopped" and row.stopped_at is not None
        assert (row.running, row.concurrency, row.queues) == (0, 1, [])
    assert sum(r.completed for r in ours) == 20
    assert sum(r.failed for r in ours) == 1
    # ... and as flatmachines sees them
    assert {w.worker_id: w.status for w in theirs} == {
        "worker-dead": "lost",
        "worker-0": "terminated",
        "worker-1": "terminated",
        "worker-2": "terminated",
    }
    assert all(w.capabilities == ["double"] for w in theirs if w.worker_id != "worker-dead")
