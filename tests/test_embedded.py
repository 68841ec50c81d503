"""The embedded API, end to end: `from orchestrator import Orchestrator`.

Async and sync, on SQLite and PostgreSQL; and an embedding application killed
mid-pipeline and started again.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
from collections import Counter

import pytest

from orchestrator import ExecutionFailed, Orchestrator, UserError, WaitTimeout
from orchestrator.schemas import Execution, QueueStats, Worker

from .apps.testapp import hooks_registry
from .conftest import TESTS, chain_machine, orch, orch_env, run_async, wait_until
from .test_waits import wait_machine


def test_the_async_api_end_to_end(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_TEST_EFFECTS", str(tmp_path / "effects.log"))
    chain = chain_machine(tmp_path / "chain.yml", ["add", "add", "add"])
    approval = wait_machine(tmp_path / "approve.yml", "approval/{{ context.machine.execution_id }}")
    failing = chain_machine(tmp_path / "fail.yml", ["add", "fail"])

    async def go():
        async with Orchestrator(db_url) as o:
            async with o.worker(hooks_registry, concurrency=4) as w:
                first = await o.submit(chain, {"n": 1}, id="job-1")
                again = await o.submit(chain, {"n": 2}, id="job-1")  # same id: same execution
                assert isinstance(first, Execution) and again.input == {"n": 1}
                out = await o.result("job-1", timeout=60)
                assert out["acc"] == 3
                assert await o.run(chain, {}, id="job-2", timeout=60) == {"acc": 3, "by": out["by"]}

                await o.submit(approval, id="job-3")
                while (await o.get("job-3")).status != "waiting":
                    await asyncio.sleep(0.05)
                sent = await o.signal("approval/job-3", {"ok": True})
                assert sent.woken == ["job-3"]
                assert (await o.result("job-3", timeout=60))["approved"] is True

                await o.submit(failing, id="job-4")
                with pytest.raises(ExecutionFailed) as failed:
                    await o.result("job-4", timeout=60)
                assert "failed on purpose" in str(failed.value)
                assert failed.value.execution.status == "failed"

                slow = await o.submit(approval, id="job-5")
                cancelled = await o.cancel(slow.id, reason="no longer needed")
                assert cancelled.status == "cancelled"
                retried = await o.retry("job-4", machine=chain)
                assert retried.status == "queued"
                assert (await o.result("job-4", timeout=60))["acc"] == 3

                history = (await o.get("job-1", detail=True)).history
                [step] = [h.step for h in history if (h.event, h.state) == ("state_exit", "s2")]
                fork = await o.fork("job-1", step, id="job-1b", context_patch={"acc": 10})
                assert (await o.result(fork.id, timeout=60))["acc"] == 11
                assert (await o.context("job-1"))["acc"] == 3

                await o.submit(approval, id="job-6")  # waits for a signal that never comes
                with pytest.raises(WaitTimeout):
                    await o.result("job-6", timeout=0.5)
                listed = await o.list(status="completed")
                assert {"job-1", "job-2", "job-3", "job-4", "job-1b"} <= {e.id for e in listed}
                assert all(isinstance(q, QueueStats) for q in await o.queues())
                assert any(isinstance(x, Worker) and x.id == w.id for x in await o.workers())
            # leaving the block drained the worker
            assert {x.id: x.status for x in await o.workers(include_stopped=True)}[
                w.id
            ] == "stopped"
            return (await o.get("job-1", detail=True)).as_json()

    doc = run_async(go())
    shown = json.loads(orch("show", "job-1", "--json", db_url=db_url).stdout)
    assert doc == shown  # the API's models are `orch show --json`


def test_the_sync_api_from_a_thread_with_no_event_loop(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_TEST_EFFECTS", str(tmp_path / "effects.log"))
    chain = chain_machine(tmp_path / "chain.yml", ["add", "add"])
    out: dict = {}

    def script() -> None:
        try:
            asyncio.get_running_loop()
            out["loop"] = True
        except RuntimeError:
            out["loop"] = False
        with Orchestrator.sync(db_url) as o:
            with o.worker(hooks_registry, concurrency=2):
                o.submit(chain, {}, id="sync-1")
                out["result"] = o.result("sync-1", timeout=60)
                out["get"] = o.get("sync-1")
                with pytest.raises(UserError):
                    o.get("nope")

    thread = threading.Thread(target=script)
    thread.start()
    thread.join(120)
    assert out["loop"] is False
    assert out["result"]["acc"] == 2
    assert out["get"].status == "completed" and out["get"].id == "sync-1"


def test_leaving_a_worker_keeps_the_claim_of_a_blocked_sync_hook_until_it_returns(
    db_url, tmp_path, caplog
):
    """Leaving the `async with` past drain_timeout while a sync hook blocks its
    thread: the execution stays claimed until the hook returns, and is released
    only then. Cancelled while it leaves (a second Ctrl-C), the worker stops at
    once and releases nothing whose hook still runs."""
    import contextlib
    import logging

    from flatmachines import HooksRegistry, MachineHooks

    from .conftest import write_machine

    caplog.set_level(logging.INFO, logger="orchestrator.worker")
    entered, go, effects = threading.Event(), threading.Event(), []

    class Blocking(MachineHooks):
        def on_action(self, state_name, action_name, context):
            entered.set()
            go.wait(60)
            effects.append(context["machine"]["execution_id"])
            return context

    registry = HooksRegistry()
    registry.register("blocking", Blocking)
    states = {
        "start": {"type": "initial", "transitions": [{"to": "s1"}]},
        "s1": {"hooks": "blocking", "action": "block", "transitions": [{"to": "done"}]},
        "done": {"type": "final", "output": {}},
    }
    machine = write_machine(
        tmp_path / "m.yml",
        {"spec": "flatmachine", "spec_version": "4.2.1", "data": {"name": "b", "states": states}},
    )

    async def until(condition) -> None:
        await asyncio.to_thread(wait_until, condition, what="the worker stopping")

    async def main():
        async with Orchestrator(db_url) as o:
            stack = contextlib.AsyncExitStack()
            await stack.enter_async_context(o.worker(registry, concurrency=1, drain_timeout=0))
            ex = await o.submit(machine)
            await asyncio.to_thread(entered.wait, 60)
            leaving = asyncio.create_task(stack.aclose())
            await until(lambda: f"keeping {ex.id}" in caplog.text or leaving.done())
            assert (await o.get(ex.id)).status == "running" and not leaving.done()
            go.set()
            await leaving
            assert effects == [ex.id]
            released = await o.get(ex.id)
            assert released.status == "queued" and released.recoveries == 0

            entered.clear()
            go.clear()
            w = await stack.enter_async_context(o.worker(registry, concurrency=1))
            await asyncio.to_thread(entered.wait, 60)
            leaving = asyncio.create_task(stack.aclose())
            await until(lambda: f"worker {w.id} draining: 1 running" in caplog.text)
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
            assert f"left {ex.id} to its lease" in caplog.text
            held = await o.get(ex.id)
            assert held.status == "running" and held.worker_id == w.id
            go.set()  # its thread goes on in this process; the run it belonged to does not
            await until(lambda: len(effects) == 2)
            assert (await o.get(ex.id)).updated_at == held.updated_at

    run_async(main())


def test_bad_input_to_the_api_is_a_user_error(db_url, tmp_path):
    (tmp_path / "broken.yml").write_text("spec: flatmachine\ndata: [1, 2]\n")

    async def go():
        async with Orchestrator(db_url) as o:
            with pytest.raises(UserError, match="no execution with id 'nope'"):
                await o.get("nope")
            with pytest.raises(UserError, match="not found"):
                await o.submit(tmp_path / "missing.yml")
            with pytest.raises(UserError, match="data"):
                await o.submit(tmp_path / "broken.yml")
            with pytest.raises(UserError, match="HooksRegistry"):
                async with o.worker():
                    pass
            with pytest.raises(UserError, match="cannot import"):
                async with o.worker("no_such_module_here"):
                    pass
            assert await o.list() == []

    run_async(go())


def test_an_application_killed_mid_pipeline_finishes_them_when_started_again(
    db_url, store, tmp_path
):
    """The default 30 s lease TTL: the restarted application does not wait it
    out; every execution is done before its dead predecessor's leases expire."""
    effects = tmp_path / "effects.log"
    machine = chain_machine(tmp_path / "pipe.yml", ["add", "slow_add", "add", "slow_add", "add"])
    cmd = [sys.executable, str(TESTS / "apps" / "embedded_app.py"), db_url, str(machine), "6"]
    env = orch_env(db_url, ORCH_TEST_EFFECTS=str(effects))
    env.pop("ORCH_LEASE_TTL", None)

    first = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_until(
            lambda: (
                sum(1 for line in effects.read_text().splitlines() if " s2 " in line) >= 4
                if effects.exists()
                else False
            ),
            90,
            "pipelines in their slow state",
        )
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    held = {
        ex.id: ex.lease_until for ex in run_async(store.list_executions()) if ex.status == "running"
    }
    assert held, "the application died holding leases"
    exits_before = {
        ex_id: {h.state for h in run_async(store.history(ex_id)) if h.event == "state_exit"}
        for ex_id in held
    }

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "all done" in again.stdout
    for ex in run_async(store.list_executions()):
        assert ex.status == "completed" and ex.output["acc"] == 5
        if ex.id in held:
            # resumed before its old lease would have let anyone take it
            assert ex.finished_at < held[ex.id], (ex.id, ex.finished_at, held[ex.id])
    runs = Counter(
        (ex_id, state)
        for ex_id, state, *_ in (line.split() for line in effects.read_text().splitlines())
    )
    for ex_id, committed in exits_before.items():
        for state in committed:
            if state[1:].isdigit():  # the action states
                assert runs[(ex_id, state)] == 1, (ex_id, state)  # a committed state never reran


def test_the_service_stopped_twice_ends_at_once_leaving_its_job_unreleased(db_url, store, tmp_path):
    """examples/service.py, a job's sync load hook asleep between rows: SIGTERM
    starts a drain that would wait for the hook, a second SIGTERM ends the
    service at once (130). The job was not released under the hook, and its
    thread ended with the process, so no row is loaded after the end."""
    import sqlite3
    import time
    import urllib.request

    target = tmp_path / "out.sqlite"
    cmd = [sys.executable, str(TESTS.parent / "examples" / "service.py"), "--port", "0"]
    service = subprocess.Popen(
        [*cmd, "--db", db_url, "--out", str(target)],
        env=orch_env(db_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def loaded() -> int:
        if not target.exists():
            return 0
        with sqlite3.connect(target) as db:
            try:
                return db.execute("SELECT count(*) FROM items").fetchone()[0]
            except sqlite3.OperationalError:  # the table is not there yet
                return 0

    try:
        base = next(line.split()[-1] for line in service.stdout if "serving on" in line)
        # the load sleeps a second between rows: a thousand seconds in all
        body = {"id": "job", "input": {"rows": 1000, "pace": 1}}
        urllib.request.urlopen(base + "/jobs", data=json.dumps(body).encode(), timeout=60)
        wait_until(loaded, what="the load asleep after its first row")
        service.send_signal(signal.SIGTERM)
        wait_until(
            lambda: [w.status for w in run_async(store.list_workers())] == ["draining"],
            what="the worker draining",
        )
        service.send_signal(signal.SIGTERM)
        assert service.wait(60) == 130
    finally:
        if service.poll() is None:
            service.kill()
    job = run_async(store.get("job"))
    assert job.status == "running" and job.attempt == 1
    rows = loaded()
    time.sleep(2.5)  # more than the pace: a load still going would have added a row
    assert 1 <= loaded() == rows < 1000
