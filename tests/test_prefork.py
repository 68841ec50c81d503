"""`orch worker --processes N`, and no process outliving the one that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from orchestrator.client import Client
from orchestrator.settings import Settings

from .conftest import chain_machine, orch, orch_env, run_async, wait_until


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def active_pids(store) -> set[int]:
    return {w.pid for w in run_async(store.list_workers()) if w.status == "active"}


def start(db_url: str, tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    log = open(tmp_path / f"proc-{len(list(tmp_path.glob('proc-*')))}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=orch_env(db_url, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def test_three_processes_restarted_when_killed_and_drained_together(db_url, store, tmp_path):
    sup = start(db_url, tmp_path, "worker", "--app", "testapp", "--processes", "3")
    try:
        first = wait_until(
            lambda: active_pids(store) if len(active_pids(store)) == 3 else None, 60, "3 workers"
        )
        assert sup.pid not in first
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: (
                len(active_pids(store) - {victim}) == 3 and victim not in active_pids(store) or None
            ),
            60,
            "a new worker in the killed one's place",
        )
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(60) == 0
        now = {w.pid: w.status for w in run_async(store.list_workers())}
        assert all(now[p] == "stopped" for p in active_pids(store) | (first - {victim}))
        assert not any(alive(p) for p in now)
    finally:
        if sup.poll() is None:
            sup.kill()


def test_bad_processes_is_one_line_and_exit_2(db_url):
    for value in ("0", "-2"):
        r = orch("worker", "--processes", value, db_url=db_url)
        assert r.returncode == 2
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "--processes" in lines[0], r.stderr


def test_a_killed_supervisor_leaves_no_worker_and_its_work_resumes(db_url, store, tmp_path):
    machine = chain_machine(tmp_path / "slow.yml", ["add", "slow_add", "add"])

    async def submit():
        async with await Client.open(Settings(database_url=db_url)) as client:
            return (await client.submit(machine, {"sleep": 3})).execution.id

    ex_id = run_async(submit())
    effects = tmp_path / "effects.log"
    sup = start(
        db_url,
        tmp_path,
        "worker",
        "--app",
        "testapp",
        "--processes",
        "2",
        "--drain-timeout",
        "0",  # a drained child gives its execution back at once
        ORCH_TEST_EFFECTS=str(effects),
        ORCH_LEASE_TTL="30",
    )
    wait_until(
        lambda: run_async(store.get(ex_id)).current_state == "s2", 60, "the slow state running"
    )
    children = wait_until(
        lambda: active_pids(store) if len(active_pids(store)) == 2 else None, 60, "both children"
    )
    sup.send_signal(signal.SIGKILL)
    sup.wait(30)
    # each child learns its supervisor died, drains (gives its execution back) and exits
    wait_until(lambda: not any(alive(p) for p in children), 30, "the children gone")
    ex = run_async(store.get(ex_id))
    assert ex.status == "queued" and ex.worker_id is None  # released, not left to a lease
    finisher = start(
        db_url, tmp_path, "worker", "--app", "testapp", "--burst", ORCH_TEST_EFFECTS=str(effects)
    )
    assert finisher.wait(120) == 0
    assert run_async(store.get(ex_id)).status == "completed"


def test_a_killed_orch_up_leaves_no_pool_worker(db_url, store, tmp_path):
    up = start(
        db_url,
        tmp_path,
        "up",
        "--app",
        "testapp",
        "--min",
        "2",
        "--max",
        "2",
        "--log-dir",
        str(tmp_path / "logs"),
        ORCH_LEASE_TTL="30",
    )
    try:
        pool = wait_until(
            lambda: active_pids(store) if len(active_pids(store)) == 2 else None, 60, "the pool"
        )
    finally:
        up.send_signal(signal.SIGKILL)
        up.wait(30)
    wait_until(lambda: not any(alive(p) for p in pool), 30, "the pool workers gone")
