"""Real `orch worker` processes against the real store: claims, crashes, fences, drains.

Side effects are counted from the effects file the test hooks append to
(tests/apps/testapp.py), and ownership is read from the store, never from logs.
At the end, a worker in this process, for an interleaving no timing would make sure of.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from flatmachines import HooksRegistry, MachineHooks

from orchestrator.client import Client
from orchestrator.clock import utcnow
from orchestrator.runner import Outcome
from orchestrator.settings import Settings
from orchestrator.store import Store
from orchestrator.worker import Worker, WorkerOptions

from .conftest import chain_machine, run_async, wait_until, write_machine

TTL = "2"  # seconds: short leases so a crash is recovered quickly


@pytest.fixture
def effects(tmp_path) -> Path:
    return tmp_path / "effects.log"


def submit(db_url: str, machine: Path, inputs: list[dict], **kw) -> list[str]:
    async def go():
        async with await Client.open(Settings(database_url=db_url)) as client:
            return [s.execution.id for s in await client.submit_many(machine, inputs, **kw)]

    return run_async(go())


def effect_lines(effects: Path) -> list[tuple[str, str, str, int]]:
    if not effects.exists():
        return []
    out = []
    for line in effects.read_text().splitlines():
        ex_id, state, key, pid = line.split()
        out.append((ex_id, state, key, int(pid)))
    return out


def runs_per_state(effects: Path, ex_id: str) -> Counter:
    return Counter(state for e, state, _, _ in effect_lines(effects) if e == ex_id)


def get(store: Store, ex_id: str):
    return run_async(store.get(ex_id))


def lease_expired(store: Store, ex_id: str) -> bool:
    ex = get(store, ex_id)
    return ex.lease_until is not None and ex.lease_until < utcnow()


def worker_env(effects: Path, ttl: str = TTL) -> dict[str, str]:
    return {"ORCH_TEST_EFFECTS": str(effects), "ORCH_LEASE_TTL": ttl}


def test_claim_is_exclusive_across_four_worker_processes(db_url, store, tmp_path, effects, workers):
    machine = chain_machine(
        tmp_path / "one.yml", ["add"], checkpoint_on=["state_exit", "machine_end"]
    )
    ids = submit(db_url, machine, [{"i": i} for i in range(400)])
    # The default 30 s lease: this is about claims, not recovery. (With a 2 s lease,
    # 16 writers on one SQLite file can starve a renewal past its lease; the
    # execution then moves, correctly, to another worker with fence 2.)
    env = worker_env(effects, ttl="30")
    procs = [
        workers(db_url, "--app", "testapp", "--burst", "--concurrency", "4", **env)
        for _ in range(4)
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0, 0, 0]

    rows = {ex.id: ex for ex in run_async(store.list_executions(limit=1000))}
    assert set(rows) == set(ids)
    assert {ex.status for ex in rows.values()} == {"completed"}
    # fence 1: each execution was claimed exactly once, by one worker
    assert {ex.fence for ex in rows.values()} == {1}
    assert {ex.recoveries for ex in rows.values()} == {0}
    assert {ex.output["acc"] for ex in rows.values()} == {1}
    # the one action ran once per execution, and each ran to machine_end once
    assert Counter(e for e, _, _, _ in effect_lines(effects)) == Counter({i: 1 for i in ids})
    for ex_id in ids[:20]:
        events = [h.event for h in run_async(store.history(ex_id))]
        assert events.count("machine_end") == 1
    done = sum(w.completed for w in run_async(store.list_workers()))
    assert done == 400


def test_sigkill_in_slow_state_resumes_on_another_worker(db_url, store, tmp_path, effects, workers):
    machine = chain_machine(tmp_path / "slow.yml", ["add", "slow_add", "add"])
    [ex_id] = submit(db_url, machine, [{"sleep": 2}])
    first = workers(db_url, "--app", "testapp", **worker_env(effects))
    wait_until(
        lambda: get(store, ex_id).current_state == "s2" and runs_per_state(effects, ex_id)["s2"],
        what="first worker inside the slow state",
    )
    first.signal(signal.SIGKILL)
    first.wait()
    wait_until(lambda: lease_expired(store, ex_id), what="lease expiry")
    second = workers(db_url, "--app", "testapp", "--burst", **worker_env(effects))
    assert second.wait() == 0

    ex = get(store, ex_id)
    assert ex.status == "completed"
    assert ex.output == {"acc": 3, "by": second.pid}
    # one recovery: the second worker found the first one's process gone and
    # requeued its execution (fence 2) before it claimed it (fence 3)
    assert ex.recoveries == 1 and ex.fence == 3
    # s1 committed its state_exit before the crash: never again. s2 was in flight: twice.
    assert runs_per_state(effects, ex_id) == Counter({"s1": 1, "s2": 2, "s3": 1})
    s2_keys = {key for e, state, key, _ in effect_lines(effects) if state == "s2"}
    assert len(s2_keys) == 1, "both runs of the in-flight state see one idempotency key"


def test_state_whose_exit_committed_is_not_run_again_on_resume(
    db_url, store, tmp_path, effects, workers
):
    """flatmachines alone would run s2 again here (output acc 4): we must not."""
    machine = chain_machine(tmp_path / "m.yml", ["add", "add", "add"])
    [ex_id] = submit(db_url, machine, [{"crash_after": "s2"}])
    first = workers(db_url, "--app", "testapp", **worker_env(effects))
    assert first.wait() == -signal.SIGKILL  # killed itself right after s2's state_exit
    history = run_async(store.history(ex_id))
    assert (history[-1].event, history[-1].state) == ("state_exit", "s2")

    wait_until(lambda: lease_expired(store, ex_id), what="lease expiry")
    second = workers(db_url, "--app", "testapp", "--burst", **worker_env(effects))
    assert second.wait() == 0
    ex = get(store, ex_id)
    assert ex.status == "completed" and ex.output["acc"] == 3
    assert runs_per_state(effects, ex_id) == Counter({"s1": 1, "s2": 1, "s3": 1})
    events = [(h.event, h.state) for h in run_async(store.history(ex_id))]
    after_crash = events[len(history) :]
    assert after_crash[0] == ("state_enter", "s3")


def test_paused_worker_loses_its_lease_and_the_new_owner_wins(
    db_url, store, tmp_path, effects, workers
):
    machine = chain_machine(tmp_path / "slow.yml", ["add", "slow_add", "add"])
    [ex_id] = submit(db_url, machine, [{"sleep": 3}])
    zombie = workers(db_url, "--app", "testapp", **worker_env(effects))
    wait_until(lambda: runs_per_state(effects, ex_id)["s2"], what="zombie inside the slow state")
    zombie.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: lease_expired(store, ex_id), what="lease expiry")
        owner = workers(db_url, "--app", "testapp", "--burst", **worker_env(effects))
        wait_until(lambda: get(store, ex_id).fence == 2, what="new owner's claim")
    finally:
        zombie.signal(signal.SIGCONT)  # wakes with its sleep over and a stale fence
    assert owner.wait() == 0
    wait_until(lambda: "lease lost" in zombie.log(), what="zombie noticing the lost lease")

    ex = get(store, ex_id)
    assert ex.status == "completed" and ex.output == {"acc": 3, "by": owner.pid}
    history = run_async(store.history(ex_id))
    # nothing the zombie wrote landed after the new owner took over
    events = [(h.event, h.state) for h in history]
    assert events.count(("state_exit", "s2")) == 1
    s3_by = {pid for e, state, _, pid in effect_lines(effects) if state == "s3"}
    assert s3_by == {owner.pid}
    zombie.signal(signal.SIGTERM)
    assert zombie.wait() == 0


def test_sigterm_drains_running_executions_and_claims_nothing_more(
    db_url, store, tmp_path, effects, workers
):
    machine = chain_machine(tmp_path / "slow.yml", ["slow_add"])
    ids = submit(db_url, machine, [{"sleep": 2}] * 3)
    w = workers(db_url, "--app", "testapp", "--concurrency", "2", **worker_env(effects))
    wait_until(lambda: len(effect_lines(effects)) == 2, what="two executions running")
    w.signal(signal.SIGTERM)
    assert w.wait() == 0

    statuses = Counter(get(store, i).status for i in ids)
    assert statuses == Counter({"completed": 2, "queued": 1})
    [left] = [i for i in ids if get(store, i).status == "queued"]
    assert get(store, left).fence == 0  # never claimed
    [record] = run_async(store.list_workers())
    assert record.status == "stopped" and record.completed == 2


def test_drain_timeout_releases_work_which_resumes_from_its_checkpoint(
    db_url, store, tmp_path, effects, workers
):
    machine = chain_machine(tmp_path / "slow.yml", ["add", "slow_add", "add"])
    [ex_id] = submit(db_url, machine, [{"sleep": 4}])
    w = workers(db_url, "--app", "testapp", "--drain-timeout", "0", **worker_env(effects))
    wait_until(lambda: runs_per_state(effects, ex_id)["s2"], what="worker inside the slow state")
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    ex = get(store, ex_id)
    assert ex.status == "queued" and ex.worker_id is None and ex.lease_until is None

    finisher = workers(db_url, "--app", "testapp", "--burst", **worker_env(effects))
    assert finisher.wait(timeout=120) == 0
    ex = get(store, ex_id)
    assert ex.status == "completed" and ex.output["acc"] == 3
    assert runs_per_state(effects, ex_id) == Counter({"s1": 1, "s2": 2, "s3": 1})


def test_a_worker_the_scaler_drains_finishes_its_run_and_releases_nothing(
    db_url, store, tmp_path, effects, workers
):
    """Scale-down is not shutdown: a worker marked draining in the store claims
    nothing more and lets what runs finish, past --drain-timeout, then exits."""
    go = tmp_path / "go"
    machine = chain_machine(tmp_path / "held.yml", ["held_add"])
    ids = submit(db_url, machine, [{}, {}])
    env = dict(ORCH_TEST_GO=str(go), **worker_env(effects))
    w = workers(db_url, "--app", "testapp", "--drain-timeout", "0", **env)
    [(ran, *_)] = wait_until(lambda: effect_lines(effects), what="the worker in the held state")
    [row] = run_async(store.list_workers())
    run_async(store.set_worker_status(row.id, "draining", heartbeat=False))
    wait_until(lambda: "draining: 1 running" in w.log(), what="the worker draining")
    go.touch()
    assert w.wait() == 0
    ex = get(store, ran)
    assert ex.status == "completed" and ex.fence == 1 and ex.recoveries == 0
    assert runs_per_state(effects, ran) == Counter({"s1": 1})
    [left] = [i for i in ids if i != ran]
    assert get(store, left).status == "queued" and get(store, left).fence == 0
    assert "released" not in w.log()


def held_write_machine(path: Path) -> Path:
    """One state whose sync hook blocks its thread until the test lets it go."""
    states = {
        "start": {"type": "initial", "transitions": [{"to": "s1"}]},
        "s1": {"hooks": "sync", "action": "held_write", "transitions": [{"to": "done"}]},
        "done": {"type": "final", "output": {"acc": "context.acc"}},
    }
    data = {"name": "held", "context": {"acc": 0}, "states": states}
    return write_machine(path, {"spec": "flatmachine", "spec_version": "4.2.1", "data": data})


def test_a_stop_releases_a_run_only_after_its_blocked_sync_hook_returned(
    db_url, store, tmp_path, effects, workers
):
    """SIGTERM past --drain-timeout while a sync hook blocks its thread: the claim
    is kept until the hook returns, so its side effect comes before the release
    and nothing of the old run comes after; then the process exits 0, and the
    execution resumes elsewhere."""
    go = tmp_path / "go"
    [ex_id] = submit(db_url, held_write_machine(tmp_path / "m.yml"), [{}])
    env = dict(ORCH_TEST_GO=str(go), **worker_env(effects))
    w = workers(db_url, "--app", "testapp", "--drain-timeout", "0", **env)
    wait_until(lambda: runs_per_state(effects, ex_id)["s1:entered"], what="the hook blocking")
    w.signal(signal.SIGTERM)
    wait_until(
        lambda: f"keeping {ex_id}" in w.log() or f"released {ex_id}" in w.log(),
        what="the drain timeout passed",
    )
    go.touch()
    assert w.wait() == 0
    log = w.log()
    assert log.index(f"effect {ex_id} s1") < log.index(f"released {ex_id}")
    ex = get(store, ex_id)
    assert ex.status == "queued" and ex.worker_id is None and ex.recoveries == 0

    finisher = workers(db_url, "--app", "testapp", "--burst", **env)
    assert finisher.wait() == 0
    ex = get(store, ex_id)
    assert ex.status == "completed" and ex.output["acc"] == 1
    # in flight at the stop, the state ran twice: once in each process
    assert [p for e, st, _, p in effect_lines(effects) if st == "s1"] == [w.pid, finisher.pid]


def test_a_second_sigterm_ends_a_worker_whose_sync_hook_blocks_at_once(
    db_url, store, tmp_path, effects, workers
):
    """The second signal does not wait for the hook: the process ends, and the
    hook's thread with it, so its side effect never happens. The execution was
    not released under the running hook (exit 1: it was left to its lease); the
    next worker of this host takes it over at once, its holder being gone."""
    go = tmp_path / "go"
    [ex_id] = submit(db_url, held_write_machine(tmp_path / "m.yml"), [{}])
    env = dict(ORCH_TEST_GO=str(go), **worker_env(effects, ttl="30"))
    w = workers(db_url, "--app", "testapp", **env)
    wait_until(lambda: runs_per_state(effects, ex_id)["s1:entered"], what="the hook blocking")
    w.signal(signal.SIGTERM)
    wait_until(lambda: "draining: 1 running" in w.log(), what="the worker draining")
    w.signal(signal.SIGTERM)
    assert w.wait() == 1
    assert "left 1 execution(s) to their leases" in w.log()
    go.touch()  # were its thread still alive, it would make its side effect now
    ex = get(store, ex_id)
    assert ex.status == "running" and ex.fence == 1
    [row] = run_async(store.list_workers())
    assert row.status == "draining"

    finisher = workers(db_url, "--app", "testapp", "--burst", **env)
    assert finisher.wait() == 0
    ex = get(store, ex_id)
    assert ex.status == "completed" and ex.output["acc"] == 1 and ex.recoveries == 1
    assert [p for e, st, _, p in effect_lines(effects) if st == "s1"] == [finisher.pid]
    assert f"effect {ex_id}" not in w.log()


def test_execution_runs_the_config_it_was_submitted_with(db_url, store, tmp_path, effects, workers):
    path = tmp_path / "pinned.yml"
    chain_machine(path, ["add"])
    [ex_id] = submit(db_url, path, [{}])
    chain_machine(path, ["add", "add", "add", "add"])  # edited on disk after submit
    w = workers(db_url, "--app", "testapp", "--burst", **worker_env(effects))
    assert w.wait() == 0
    assert get(store, ex_id).output["acc"] == 1


def test_routing_a_worker_never_claims_what_it_cannot_run(
    db_url, store, tmp_path, effects, workers
):
    """A hookless worker beside a capable one: everything completes on the capable
    one. With the capable one gone, a new execution stays queued, and `orch show`
    and `orch queues` name the hooks it waits for."""
    import json

    from .conftest import orch

    machine = chain_machine(tmp_path / "m.yml", ["add", "add"])
    ids = submit(db_url, machine, [{}] * 12)
    hookless = workers(db_url, "--concurrency", "4", **worker_env(effects))  # no --app
    wait_until(lambda: run_async(store.list_workers()), what="the hookless worker polling")
    capable = workers(db_url, "--app", "testapp", "--burst", **worker_env(effects))
    assert capable.wait() == 0
    rows = [get(store, i) for i in ids]
    assert {ex.status for ex in rows} == {"completed"}
    assert {ex.output["by"] for ex in rows} == {capable.pid}
    assert {ex.attempt for ex in rows} == {1}

    [late] = submit(db_url, machine, [{}])
    hookless.signal(signal.SIGTERM)  # it never claimed it, and leaves it be
    assert hookless.wait() == 0
    assert not [i for i in [*ids, late] if i in hookless.log()]  # it ran none of them
    again = workers(db_url, "--burst")  # still no hooks: it claims nothing, and exits
    assert again.wait() == 0
    ex = get(store, late)
    assert ex.status == "queued" and ex.attempt == 1 and ex.needs == "effects"
    shown = json.loads(orch("show", late, "--json", db_url=db_url).stdout)
    assert shown["missing_hooks"] == ["effects"]
    assert "--app" in orch("show", late, db_url=db_url).stdout
    [queue] = json.loads(orch("queues", "--json", db_url=db_url).stdout)
    assert queue["waiting_for_hooks"] == ["effects"]


@pytest.mark.parametrize(
    "command",
    [["worker"], ["worker", "--processes", "2"], ["scheduler"], ["up", "--min", "1"]],
    ids=["worker", "processes", "scheduler", "up"],
)
def test_sigterm_while_starting_stops_cleanly_and_claims_nothing(
    db_url, store, tmp_path, effects, command
):
    """A stop signal that comes before the command's loop is up (here: while its
    --app is still importing) is not a kill: the command exits 0, starts no
    worker, and claims nothing."""
    import subprocess
    import sys

    from .conftest import orch_env

    machine = chain_machine(tmp_path / "m.yml", ["add"])
    [ex_id] = submit(db_url, machine, [{}])
    starting, go = tmp_path / "starting", tmp_path / "go"
    env = orch_env(
        db_url, ORCH_TEST_STARTING=str(starting), ORCH_TEST_GO=str(go), **worker_env(effects)
    )
    args = [*command, "--app", "slowstart", "--log-dir", str(tmp_path / "logs")]
    if command[0] == "worker":
        args = args[:-2]
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env)
    try:
        wait_until(starting.exists, what="the command importing its app")
        proc.send_signal(signal.SIGTERM)
        go.touch()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert int(starting.read_text()) == proc.pid  # it was held in its own start-up
    ex = get(store, ex_id)
    assert ex.status == "queued" and ex.fence == 0 and ex.attempt == 1
    assert all(w.status == "stopped" for w in run_async(store.list_workers()))


def test_blocking_hook_longer_than_ttl_keeps_its_lease(db_url, store, tmp_path, effects, workers):
    machine = chain_machine(tmp_path / "m.yml", ["sync_sleep"])
    [ex_id] = submit(db_url, machine, [{"sleep": 5}])
    runner = workers(db_url, "--app", "testapp", "--burst", **worker_env(effects))
    wait_until(lambda: effect_lines(effects), what="blocking state started")
    rival = workers(db_url, "--app", "testapp", **worker_env(effects))
    assert runner.wait() == 0
    rival.signal(signal.SIGTERM)
    assert rival.wait() == 0
    ex = get(store, ex_id)
    assert ex.status == "completed" and ex.fence == 1 and ex.recoveries == 0
    assert len(effect_lines(effects)) == 1


def test_blocking_sync_hooks_of_one_worker_run_side_by_side(
    db_url, store, tmp_path, effects, workers
):
    """Four executions whose sync hook blocks until all four are inside it: with
    the hooks on the event loop the first would block the rest, and the
    rendezvous would break (its own timeout is the failure, not a measure)."""
    machine = write_machine(
        tmp_path / "meet.yml",
        {
            "spec": "flatmachine",
            "spec_version": "4.2.1",
            "data": {
                "name": "meet",
                "context": {"acc": 0},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "meet"}]},
                    "meet": {
                        "hooks": "sync",
                        "action": "rendezvous",
                        "transitions": [{"to": "done"}],
                    },
                    "done": {"type": "final", "output": {"acc": "context.acc"}},
                },
            },
        },
    )
    ids = submit(db_url, machine, [{}] * 4)
    env = {**worker_env(effects), "ORCH_TEST_PARTIES": "4"}
    w = workers(db_url, "--app", "testapp", "--burst", "--concurrency", "4", **env)
    assert w.wait() == 0, w.log()
    assert [get(store, i).status for i in ids] == ["completed"] * 4, [
        get(store, i).error for i in ids
    ]
    assert {get(store, i).attempt for i in ids} == {1}


def test_an_idle_worker_is_woken_by_a_submit_not_by_its_poll(
    db_url, store, tmp_path, effects, workers
):
    """With a 60 s poll, work submitted to an idle worker still starts: the submit
    wakes it (PostgreSQL NOTIFY; a datagram on SQLite's host)."""
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    env = {**worker_env(effects), "ORCH_POLL_INTERVAL": "60"}
    w = workers(db_url, "--app", "testapp", **env)
    wait_until(lambda: run_async(store.list_workers()), what="the worker registered")
    time.sleep(1.0)  # past its first claim: from here on only a wake-up or the poll
    [ex_id] = submit(db_url, machine, [{}])
    wait_until(
        lambda: get(store, ex_id).status == "completed", 30, "the execution, before the poll"
    )
    w.signal(signal.SIGTERM)
    assert w.wait() == 0


def test_a_worker_process_settles_its_garbage_collector_and_switch_interval():
    """worker.settle_process freezes what start-up made out of every collection,
    collects less often and shortens the GIL switch interval; all come back after."""
    import gc
    import sys

    from orchestrator.worker import GC_THRESHOLDS, SWITCH_INTERVAL, settle_process

    before, interval = gc.get_threshold(), sys.getswitchinterval()
    gc.unfreeze()
    try:
        settle_process()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 0  # the objects alive now are out of every collection
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL)
        assert SWITCH_INTERVAL < interval
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        sys.setswitchinterval(interval)


def test_orch_worker_runs_settled(db_url, store, tmp_path, effects, workers):
    """What a hook sees inside `orch worker`: the settled process."""
    import json

    from orchestrator.worker import GC_THRESHOLDS, SWITCH_INTERVAL

    [ex_id] = submit(db_url, chain_machine(tmp_path / "m.yml", ["probe"]), [{}])
    w = workers(db_url, "--app", "testapp", "--burst", **worker_env(effects))
    assert w.wait() == 0
    assert get(store, ex_id).status == "completed"
    last = run_async(store.history(ex_id))[-1]
    context = json.loads(run_async(store.checkpoint_at(ex_id, seq=last.seq)).snapshot)["context"]
    assert context["switch_interval"] == pytest.approx(SWITCH_INTERVAL)
    assert context["gc_threshold"] == list(GC_THRESHOLDS)


# ----------------------------------------------- a worker's own bookkeeping


def _executions(settings: Settings, tmp_path: Path, n: int) -> tuple[list[str], HooksRegistry]:
    """``n`` executions submitted, and a registry with the hooks they need (a
    test stands in for their runs, to make the interleaving it is about)."""
    ids = submit(settings.database_url, chain_machine(tmp_path / "one.yml", ["add"]), [{}] * n)
    registry = HooksRegistry()
    registry.register("effects", MachineHooks)
    return ids, registry


async def _ended(worker: Worker, ex_id: str) -> None:
    """Until the worker's run of ``ex_id`` has ended."""
    while ex_id in worker._running:
        await asyncio.sleep(0)


def test_a_renewal_that_read_an_older_claim_does_not_stop_the_newer_one(
    store, settings, tmp_path, monkeypatch
):
    """The lease keeper reads the worker's leases, then renews them. If in
    between the execution was given back and claimed again by this same worker
    (a timer or a signal made it runnable at once), the store reports the
    claim it read as lost; the run under the newer claim goes on, its lease
    kept."""
    [ex_id], registry = _executions(settings, tmp_path, 1)

    async def go():
        worker = Worker(store, registry, WorkerOptions(concurrency=1), settings)
        worker._loop = asyncio.get_running_loop()
        hold = asyncio.Event()

        async def run(claim):  # the first run parks and is woken at once; the second runs on
            if claim.fence == 1:
                await store.release(claim)
                return Outcome("requeued", channel="go")
            await hold.wait()
            return Outcome("interrupted")

        monkeypatch.setattr(worker.runner, "run", run)
        assert await worker.claim() == 1
        read = worker.held_leases()  # the keeper reads the leases ...
        await _ended(worker, ex_id)
        assert await worker.claim() == 1  # ... the same worker claims it again ...
        task, claim = worker._running[ex_id]
        lost, status = await store.renew_leases(worker.id, read)  # ... then renews
        assert (read, lost, claim.fence) == ({ex_id: 1}, {ex_id}, 2)
        worker.on_renewed(read, lost, status)
        for _ in range(10):
            await asyncio.sleep(0)
        out = (task.done(), worker.held_leases())
        await worker._release_all()
        return out

    done, held = run_async(go())
    assert (done, held) == (False, {ex_id: 2}), "the newer claim's run was stopped"
    ex = run_async(store.get(ex_id))
    assert (ex.fence, ex.recoveries) == (2, 0)


def test_a_run_that_ends_after_its_execution_was_claimed_again_leaves_the_new_claim_alone(
    store, settings, tmp_path, monkeypatch
):
    """A run gives its execution back (a signal was ready as it parked, or a
    retry is due at once), and before its task has ended, the worker's claim
    loop has claimed the execution again. The old task's end must not drop
    the new claim's lease, nor its place among the running."""
    [ex_id], registry = _executions(settings, tmp_path, 1)

    async def go():
        worker = Worker(store, registry, WorkerOptions(concurrency=2), settings)
        hold = asyncio.Event()

        async def run(claim):
            if claim.fence == 1:
                await store.release(claim)  # runnable again at once ...
                assert await worker.claim() == 1  # ... and the claim loop took it
                return Outcome("requeued", channel="go")
            await hold.wait()
            return Outcome("interrupted")

        monkeypatch.setattr(worker.runner, "run", run)
        assert await worker.claim() == 1
        first = worker._running[ex_id][0]
        await asyncio.wait_for(asyncio.shield(first), 30)
        out = (worker.held_leases(), {i: c.fence for i, (_, c) in worker._running.items()})
        await worker._release_all()
        return out

    held, running = run_async(go())
    assert (held, running) == ({ex_id: 2}, {ex_id: 2})


def test_a_run_interrupted_while_the_worker_gives_back_others_is_given_back_too(
    store, settings, tmp_path, monkeypatch
):
    """The store answers again and the worker gives back the runs the outage
    interrupted. A run interrupted in that very moment (its write gave up as
    the give-back waited on the store) keeps its lease and is given back at
    the next round; it is not left to expire as a crashed worker's would."""
    (first, second), registry = _executions(settings, tmp_path, 2)

    async def go() -> tuple[dict[str, int], dict[str, int]]:
        worker = Worker(store, registry, WorkerOptions(concurrency=2), settings)
        gates = {first: asyncio.Event(), second: asyncio.Event()}
        never = asyncio.Event()

        async def run(claim):  # the runner's outcome when its write gave up on the store
            await (gates[claim.execution.id] if claim.fence == 1 else never).wait()
            return Outcome(status="interrupted")

        monkeypatch.setattr(worker.runner, "run", run)
        assert await worker.claim() == 2
        gates[first].set()  # interrupted during the outage
        await _ended(worker, first)
        give_back = store.release_orphans

        async def give_back_as_second_is_interrupted(worker_id, running):
            released = await give_back(worker_id, running)
            gates[second].set()
            await _ended(worker, second)
            return released

        monkeypatch.setattr(store, "release_orphans", give_back_as_second_is_interrupted)
        await worker.claim()  # the store answers: first is given back and claimed again
        monkeypatch.setattr(store, "release_orphans", give_back)
        held_between = worker.held_leases()
        await worker.claim()  # the next round gives back second, and claims it again
        held = worker.held_leases()
        await worker._release_all()
        return held_between, held

    held_between, held = run_async(go())
    # between the rounds the keeper still renews second's lease (fence 1)
    assert held_between == {first: 2, second: 1}
    rows = {ex.id: ex for ex in run_async(store.list_executions(limit=10))}
    assert held == {first: 2, second: 2}
    # each was given back and claimed afresh; neither was taken as a crash's
    for ex in rows.values():
        assert (ex.fence, ex.recoveries, ex.attempt) == (2, 0, 1), ex


def test_sigkill_after_every_step_of_a_delta_chain_resumes_exactly(
    db_url, store, tmp_path, effects, workers
):
    """Each execution's worker dies right after a different state's exit, in
    the middle of a chain of rows that store what changed: every one resumes
    from the row it died after, runs no committed state again, and ends with
    the history it built."""
    import sqlalchemy as sa

    from orchestrator.store.models import checkpoints

    n = 5
    machine = chain_machine(tmp_path / "agent.yml", ["answer"] * n, context={"history": []})
    ids = submit(db_url, machine, [{"crash_after": f"s{k}"} for k in range(1, n + 1)])
    for _ in range(n):  # each worker dies on the first crash it meets
        w = workers(
            db_url, "--app", "testapp", "--burst", "--concurrency", "1", **worker_env(effects)
        )
        assert w.wait() == -signal.SIGKILL
    wait_until(
        lambda: all(get(store, i).status != "running" or lease_expired(store, i) for i in ids),
        what="the dead workers' leases expired",
    )
    last = workers(db_url, "--app", "testapp", "--burst", **worker_env(effects))
    assert last.wait() == 0
    for ex_id in ids:
        ex = get(store, ex_id)
        assert ex.status == "completed" and ex.output["acc"] == n
        assert runs_per_state(effects, ex_id) == Counter({f"s{k}": 1 for k in range(1, n + 1)})
        at = run_async(store.checkpoint_at(ex_id))
        import json

        history = json.loads(at.snapshot)["context"]["history"]
        assert history == [f"answer {k} " + "z" * 1500 for k in range(n)]
    engine = sa.create_engine(store.url)
    try:
        with engine.connect() as conn:
            deltas = conn.scalar(sa.select(sa.func.count()).where(checkpoints.c.delta == 1))
    finally:
        engine.dispose()
    assert deltas > 0  # the rows resumed from were deltas
