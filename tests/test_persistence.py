"""flatmachines' persistence ABCs on the store, and resume without the library's quirks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flatmachines import FlatMachine, HooksRegistry, MachineHooks, MemoryBackend
from freezegun import freeze_time

from orchestrator.client import Client
from orchestrator.errors import LeaseLost
from orchestrator.persistence import FencedPersistence
from orchestrator.runner import Runner
from orchestrator.store import Store

from .conftest import chain_machine, run_async


class Crash(BaseException):
    """Stands in for the process dying: nothing in the worker catches it."""


class CountingHooks(MachineHooks):
    """`add` adds 1 to acc and counts runs per state; on_state_exit can crash once."""

    def __init__(self, runs: dict, crash_after: str | None = None):
        self.runs = runs
        self.crash_after = crash_after

    def on_action(self, state_name, action_name, context):
        self.runs[state_name] = self.runs.get(state_name, 0) + 1
        context["acc"] = int(context.get("acc") or 0) + 1
        return context

    def on_state_exit(self, state_name, context, output):
        if state_name == self.crash_after:
            self.crash_after = None
            raise Crash()
        return output


def registry_for(hooks: MachineHooks) -> HooksRegistry:
    reg = HooksRegistry()
    reg.register("effects", lambda: hooks)
    return reg


def submit(store: Store, machine: Path, input: dict | None = None) -> str:
    return run_async(Client(store).submit(machine, input or {})).execution.id


def test_snapshot_and_pointer_are_one_row_in_one_transaction(store, tmp_path):
    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
    claim = run_async(store.claim("w", ["default"]))
    backend = FencedPersistence(store, claim)
    key = f"{ex_id}/step_000001_state_enter.json"
    snapshot = json.dumps({"step": 1, "event": "state_enter", "current_state": "s1"}).encode()
    run_async(backend.save(key, snapshot))
    run_async(backend.save(f"{ex_id}/latest", key.encode()))  # the library's second save
    assert len(run_async(store.history(ex_id))) == 1
    assert run_async(backend.load(f"{ex_id}/latest")) == key.encode()
    assert run_async(backend.load(key)) == snapshot
    assert run_async(backend.list_execution_ids(event="state_enter")) == [ex_id]
    assert run_async(backend.list_execution_ids(event="machine_end")) == []
    ex = run_async(store.get(ex_id))
    assert (ex.current_state, ex.step) == ("s1", 1)


def test_backend_of_a_lost_claim_refuses_writes(store, tmp_path):
    from orchestrator.settings import Settings

    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
    with freeze_time("2026-01-01", real_asyncio=True) as clock:
        old = run_async(store.claim("w1", ["default"]))
        clock.tick(Settings().lease_ttl + 1)
        run_async(store.claim("w2", ["default"]))
    backend = FencedPersistence(store, old)
    with pytest.raises(LeaseLost):
        run_async(backend.save(f"{ex_id}/step_000001_state_enter.json", b'{"step": 1}'))
    assert run_async(store.history(ex_id)) == []


def test_checkpoint_on_is_honoured(store, tmp_path):
    machine = chain_machine(
        tmp_path / "m.yml", ["add", "add"], checkpoint_on=["state_exit", "machine_end"]
    )
    ex_id = submit(store, machine)
    runs: dict = {}
    claim = run_async(store.claim("w", ["default"]))
    outcome = run_async(Runner(store, registry_for(CountingHooks(runs))).run(claim))
    assert outcome.status == "completed" and outcome.output["acc"] == 2
    events = {h.event for h in run_async(store.history(ex_id))}
    assert events == {"state_exit", "machine_end"}
    assert run_async(store.get(ex_id)).status == "completed"


def test_library_alone_runs_a_committed_state_again_on_resume(tmp_path):
    """Why runner.py corrects resume: flatmachines 4.2.1 applies s2 twice (acc 4)."""
    machine = chain_machine(tmp_path / "m.yml", ["add", "add", "add"])
    backend, runs = MemoryBackend(), {}
    first = FlatMachine(
        config_file=str(machine),
        persistence=backend,
        hooks_registry=registry_for(CountingHooks(runs, crash_after="s2")),
    )
    with pytest.raises(Crash):
        run_async(first.execute(input={}))
    again = FlatMachine(
        config_file=str(machine),
        persistence=backend,
        hooks_registry=registry_for(CountingHooks(runs)),
    )
    output = run_async(again.execute(resume_from=first.execution_id))
    assert output["acc"] == 4 and runs["s2"] == 2


def test_runner_resumes_after_a_committed_state_with_its_transition(store, tmp_path):
    machine = chain_machine(tmp_path / "m.yml", ["add", "add", "add"])
    ex_id = submit(store, machine)
    runs: dict = {}
    with freeze_time("2026-01-01", real_asyncio=True) as clock:
        claim = run_async(store.claim("w1", ["default"]))
        crashing = Runner(store, registry_for(CountingHooks(runs, crash_after="s2")))
        with pytest.raises(Crash):
            run_async(crashing.run(claim))
        assert run_async(store.get(ex_id)).status == "running"  # as a dead worker leaves it
        clock.tick(store.settings.lease_ttl + 1)
        second = run_async(store.claim("w2", ["default"]))
        outcome = run_async(Runner(store, registry_for(CountingHooks(runs))).run(second))
    assert outcome.status == "completed" and outcome.output["acc"] == 3
    assert runs == {"s1": 1, "s2": 1, "s3": 1}
    ex = run_async(store.get(ex_id))
    assert ex.status == "completed" and ex.recoveries == 1


def test_runner_finishes_a_machine_whose_final_state_exit_committed(store, tmp_path):
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    ex_id = submit(store, machine)
    runs: dict = {}
    with freeze_time("2026-01-01", real_asyncio=True) as clock:
        claim = run_async(store.claim("w1", ["default"]))
        with pytest.raises(Crash):
            run_async(Runner(store, registry_for(CountingHooks(runs, "done"))).run(claim))
        clock.tick(store.settings.lease_ttl + 1)
        second = run_async(store.claim("w2", ["default"]))
        outcome = run_async(Runner(store, registry_for(CountingHooks(runs))).run(second))
    assert outcome.output == {"acc": 1, "by": None} and runs == {"s1": 1}
    events = [h.event for h in run_async(store.history(ex_id))]
    assert events[-2:] == ["state_exit", "machine_end"]
