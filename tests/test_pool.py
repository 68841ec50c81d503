"""`orch up` / `orch scheduler` as real process trees: elastic pool, chaos, leader failover."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.client import Client
from orchestrator.settings import Settings

from .conftest import chain_machine, orch_env, run_async, wait_until

pytestmark = pytest.mark.slow


def submit(db_url: str, machine: Path, inputs: list[dict]) -> list[str]:
    async def go():
        async with await Client.open(Settings(database_url=db_url)) as client:
            return [s.execution.id for s in await client.submit_many(machine, inputs)]

    return run_async(go())


class Proc:
    """An `orch` process tree started in its own session, killed whole at the end."""

    def __init__(self, db_url: str, log: Path, *args: str, **env: str):
        self.db_url = db_url
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            env=orch_env(db_url, **env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text()


@pytest.fixture
def procs(tmp_path, store):
    started: list[Proc] = []

    def start(db_url: str, *args: str, **env: str) -> Proc:
        p = Proc(db_url, tmp_path / f"{args[0]}-{len(started)}.log", *args, **env)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
        p._log.close()
    # workers orphaned by a killed scheduler: every process still pointed at this
    # test's database is ours
    urls = {f"ORCH_DATABASE_URL={p_url}".encode() for p_url in _urls(started)}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        try:
            if pid != os.getpid() and set(environ.read_bytes().split(b"\0")) & urls:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _urls(started: list[Proc]) -> set[str]:
    return {p.db_url for p in started}


def _is_our_worker(pid: int) -> bool:
    try:
        return b"orchestrator.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def live_workers(store) -> list:
    return [w for w in run_async(store.list_workers()) if w.status == "active"]


def effect_counts(effects: Path) -> Counter:
    if not effects.exists():
        return Counter()
    return Counter(tuple(line.split()[:2]) for line in effects.read_text().splitlines())


def test_up_grows_the_pool_with_the_backlog_and_shrinks_it_after(db_url, store, tmp_path, procs):
    effects = tmp_path / "effects.log"
    machine = chain_machine(tmp_path / "slow.yml", ["slow_add"])
    ids = submit(db_url, machine, [{"sleep": 0.2}] * 200)
    up = procs(
        db_url,
        "up",
        "--app",
        "testapp",
        "--min",
        "1",
        "--max",
        "4",
        ORCH_TEST_EFFECTS=str(effects),
        ORCH_LEASE_TTL="3",
    )
    wait_until(lambda: len(live_workers(store)) == 4, timeout=120, what="pool grown to 4")
    wait_until(
        lambda: run_async(store.count_by_status()).get("completed") == 200,
        timeout=300,
        what="all 200 completed",
    )
    wait_until(lambda: len(live_workers(store)) == 1, timeout=120, what="pool back to 1")

    def history():
        return run_async(store.scaling_history(limit=50))

    # the scaler drains its workers, then records the change: a moment apart
    wait_until(
        lambda: any(e["to_workers"] < e["from_workers"] for e in history()),
        timeout=60,
        what="the scale-down recorded",
    )
    events = history()
    assert any(e["to_workers"] == 4 and e["from_workers"] < 4 for e in events)
    assert all(e["reason"] for e in events)
    # no execution was interrupted by a drain: each was claimed once and its state ran once
    rows = run_async(store.list_executions(limit=500))
    assert {r.fence for r in rows} == {1} and {r.recoveries for r in rows} == {0}
    assert set(effect_counts(effects).values()) == {1} and len(effect_counts(effects)) == 200
    assert {r.id for r in rows} == set(ids)

    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=120) == 0
    assert {w.status for w in run_async(store.list_workers())} == {"stopped"}


def scale_downs(store) -> list[dict]:
    return [
        e for e in run_async(store.scaling_history(limit=50)) if e["to_workers"] < e["from_workers"]
    ]


def test_up_with_min_0_lets_a_long_state_finish_and_drains_its_worker_after(
    db_url, store, tmp_path, procs
):
    """A 20 s state, many times the scaler's cadence (1 s) and cool-down (5 s), on a
    pool that may shrink to nothing: what runs counts toward desired, so its worker
    is not drained while busy, and the execution completes on its first claim with
    no release. Then the idle worker is drained, and exits."""
    effects = tmp_path / "effects.log"
    machine = chain_machine(tmp_path / "long.yml", ["slow_add"])
    [ex_id] = submit(db_url, machine, [{"sleep": 20}])
    up = procs(
        db_url, "up", "--app", "testapp", "--min", "0", "--max", "2", ORCH_TEST_EFFECTS=str(effects)
    )
    wait_until(lambda: run_async(store.get(ex_id)).status == "completed", timeout=120, what="done")
    ex = run_async(store.get(ex_id))
    assert (ex.attempt, ex.fence, ex.recoveries) == (1, 1, 0)
    assert effect_counts(effects) == Counter({(ex_id, "s1"): 1})
    wait_until(lambda: scale_downs(store), timeout=60, what="the idle worker drained")
    assert all(e["at"] >= ex.finished_at for e in scale_downs(store))
    wait_until(
        lambda: {w.status for w in run_async(store.list_workers())} == {"stopped"},
        timeout=60,
        what="the drained worker gone",
    )
    assert "released" not in "".join(p.read_text() for p in (tmp_path / "orch-logs").glob("*.log"))
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=120) == 0


def test_the_scaler_leaves_a_busy_hand_started_worker_alone(db_url, store, tmp_path, procs):
    """A worker started by hand that has just claimed a long state (its row's
    running count not yet heartbeated) is busy to the scaler: `orch scheduler`
    (min 0) starts no second worker and drains none while it runs; once it is
    idle it is surplus, is drained, and exits 0."""
    effects = tmp_path / "effects.log"
    machine = chain_machine(tmp_path / "long.yml", ["slow_add"])
    [ex_id] = submit(db_url, machine, [{"sleep": 10}])
    hand = procs(db_url, "worker", "--app", "testapp", ORCH_TEST_EFFECTS=str(effects))
    wait_until(lambda: effect_counts(effects), timeout=60, what="the hand-started worker busy")
    procs(db_url, "scheduler", "--app", "testapp", ORCH_TEST_EFFECTS=str(effects))
    wait_until(lambda: run_async(store.get(ex_id)).status == "completed", timeout=120, what="done")
    ex = run_async(store.get(ex_id))
    assert (ex.attempt, ex.fence, ex.recoveries) == (1, 1, 0)
    assert ex.output["by"] == hand.proc.pid
    assert hand.proc.wait(timeout=120) == 0  # drained once idle
    assert "released" not in hand.log()
    events = run_async(store.scaling_history(limit=50))
    assert events and all(e["to_workers"] < e["from_workers"] for e in events)
    assert all(e["at"] >= ex.finished_at for e in events)


def test_chaos_workers_killed_every_second_and_a_scheduler_restart(db_url, store, tmp_path, procs):
    effects = tmp_path / "effects.log"
    # the crash cap (ORCH_MAX_RECOVERIES, default 5) has tests of its own; here one
    # execution can be in the killed worker more than 5 times, and must still finish
    env = {"ORCH_TEST_EFFECTS": str(effects), "ORCH_LEASE_TTL": "2", "ORCH_MAX_RECOVERIES": "50"}
    machine = chain_machine(tmp_path / "five.yml", ["add", "add", "slow_add", "add", "add"])
    ids = submit(db_url, machine, [{"sleep": 0.3}] * 150)
    args = ("up", "--app", "testapp", "--min", "3", "--max", "3")
    up = procs(db_url, *args, **env)
    wait_until(lambda: len(live_workers(store)) == 3, timeout=120, what="3 workers")

    rng = random.Random(1)
    killed = 0
    for second in range(10):
        alive = [w for w in live_workers(store) if _is_our_worker(w.pid)]
        if alive:
            os.kill(rng.choice(alive).pid, signal.SIGKILL)
            killed += 1
        if second == 5:  # the scheduler dies too, and a new one takes over
            up.proc.kill()
            up.proc.wait()
            up = procs(db_url, *args, **env)
        time.sleep(1)
    # a second with every worker dead and its replacement still starting kills none
    assert killed >= 5

    wait_until(
        lambda: run_async(store.count_by_status()).get("completed") == 150,
        timeout=600,
        what="all 150 completed",
    )
    rows = {r.id: r for r in run_async(store.list_executions(limit=500))}
    assert set(rows) == set(ids)
    assert {r.output["acc"] for r in rows.values()} == {5}
    # a state whose state_exit committed never ran again: one state_exit per state.
    # A state runs at most once per claim of its execution (fence = claims so far):
    # a worker can die after the action and before the state's exit commits
    runs = effect_counts(effects)
    for ex_id in ids:
        history = run_async(store.history(ex_id))
        exits = Counter(h.state for h in history if h.event == "state_exit")
        assert all(exits[f"s{i}"] == 1 for i in range(1, 6)), (ex_id, exits)
        for i in range(1, 6):
            assert 1 <= runs[(ex_id, f"s{i}")] <= rows[ex_id].fence, (ex_id, i)
    assert sum(r.recoveries for r in rows.values()) >= 1

    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=120) == 0


def test_standby_scheduler_takes_over_when_the_leader_dies(db_url, store, tmp_path, procs):
    env = {"ORCH_LEASE_TTL": "2"}
    first = procs(db_url, "scheduler", **env)
    wait_until(lambda: run_async(store.leader("scheduler")), what="a leader")
    second = procs(db_url, "scheduler", **env)
    wait_until(lambda: "running" in second.log(), what="standby running")
    holder, fence = run_async(store.leader("scheduler"))
    assert f"{first.proc.pid}" in holder  # the first stays leader; the standby waits
    time.sleep(4)  # two lease TTLs of standby renewals: the held lease stays held
    assert run_async(store.leader("scheduler")) == (holder, fence)

    first.proc.kill()
    first.proc.wait()
    new = wait_until(
        lambda: (lead := run_async(store.leader("scheduler"))) and lead[0] != holder and lead,
        timeout=30,
        what="the standby taking over",
    )
    assert f"{second.proc.pid}" in new[0] and new[1] == fence + 1
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(timeout=60) == 0
