"""flatmachines' persistence ABCs on the store, and resume without the library's quirks."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
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
    key = f"{ex_id}/step_000001_state_exit.json"
    snapshot = json.dumps({"step": 1, "event": "state_exit", "current_state": "s1"}).encode()
    run_async(backend.save(key, snapshot))
    run_async(backend.save(f"{ex_id}/latest", key.encode()))  # the library's second save
    assert len(run_async(store.history(ex_id))) == 1
    assert run_async(backend.load(f"{ex_id}/latest")) == key.encode()
    assert run_async(backend.load(key)) == snapshot
    assert run_async(backend.list_execution_ids(event="state_exit")) == [ex_id]
    assert run_async(backend.list_execution_ids(event="machine_end")) == []
    ex = run_async(store.get(ex_id))
    assert (ex.current_state, ex.step) == ("s1", 1)


def _snap(ex_id: str, step: int, event: str, state: str, at: str | None = None):
    key = f"{ex_id}/step_{step:06d}_{event}.json"
    body = {"step": step, "event": event, "current_state": state}
    if at is not None:
        body["created_at"] = at
    return key, json.dumps(body).encode()


def test_progress_markers_ride_in_the_next_durable_commit(store, tmp_path):
    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
    claim = run_async(store.claim("w", ["default"]))
    backend = FencedPersistence(store, claim, linger=3600)
    enter = _snap(ex_id, 1, "state_enter", "s1", at="2026-01-01T00:00:00.250000+00:00")
    execute, exit_ = (_snap(ex_id, 1, e, "s1") for e in ("execute", "state_exit"))
    run_async(backend.save(*enter))
    run_async(backend.save(*execute))
    assert run_async(store.history(ex_id)) == []  # not written yet...
    assert run_async(backend.load(f"{ex_id}/latest")) == execute[0].encode()  # ...but seen
    assert run_async(backend.load(enter[0])) == enter[1]
    run_async(backend.save(*exit_))
    history = run_async(store.history(ex_id))
    assert [h.event for h in history] == ["state_enter", "execute", "state_exit"]
    # a marker keeps the time the machine took it; the others, their commit's
    assert history[0].at == datetime(2026, 1, 1, 0, 0, 0, 250000)
    assert history[1].at == history[2].at > history[0].at
    assert run_async(store.latest_checkpoint(ex_id)) == exit_
    run_async(backend.close())


def test_a_marker_left_alone_is_written_after_the_linger(store, tmp_path):
    """A slow state shows in the timeline: its markers do not wait for its exit."""
    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
    claim = run_async(store.claim("w", ["default"]))

    async def go():
        backend = FencedPersistence(store, claim, linger=0.0)
        await backend.save(*_snap(ex_id, 1, "state_enter", "s1"))
        while not await store.history(ex_id):  # the background flush, whenever it runs
            await asyncio.sleep(0.01)
        await backend.close()

    run_async(asyncio.wait_for(go(), 60))
    assert [h.event for h in run_async(store.history(ex_id))] == ["state_enter"]
    assert run_async(store.get(ex_id)).current_state == "s1"


def test_a_marker_flushed_after_its_lease_was_lost_fails_the_next_save(store, tmp_path):
    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
    stale = run_async(store.claim("w", ["default"]))
    run_async(store.cancel(ex_id))  # the fence moves on, as a takeover moves it

    async def go():
        backend = FencedPersistence(store, stale, linger=0.0)
        await backend.save(*_snap(ex_id, 1, "state_enter", "s1"))
        while backend.broken is None:
            await asyncio.sleep(0.01)
        with pytest.raises(LeaseLost):
            await backend.save(*_snap(ex_id, 1, "state_exit", "s1"))
        await backend.close()

    run_async(asyncio.wait_for(go(), 60))
    assert run_async(store.history(ex_id)) == []


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


def crash_and_resume(store: Store, crashing: Runner, runs: dict, *, between=None):
    """``crashing`` runs the execution until its hook kills the 'process'; once
    the lease expires another worker takes it over. Returns that run's outcome."""
    with freeze_time("2026-01-01", real_asyncio=True) as clock:
        claim = run_async(store.claim("w1", ["default"]))
        with pytest.raises(Crash):
            run_async(crashing.run(claim))
        if between is not None:
            between()
        clock.tick(store.settings.lease_ttl + 1)
        second = run_async(store.claim("w2", ["default"]))
        return run_async(Runner(store, registry_for(CountingHooks(runs))).run(second))


def test_a_crash_before_the_outcome_commits_runs_only_the_final_state_again(store, tmp_path):
    """The final state's exit commits with the outcome: until then it may run again."""
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    ex_id = submit(store, machine)
    runs: dict = {}

    def first_run_left():
        events = [(h.event, h.state) for h in run_async(store.history(ex_id))]
        assert ("state_exit", "s1") in events and ("state_exit", "done") not in events

    crashing = Runner(store, registry_for(CountingHooks(runs, "done")))
    outcome = crash_and_resume(store, crashing, runs, between=first_run_left)
    assert outcome.output == {"acc": 1, "by": None} and runs == {"s1": 1}
    history = run_async(store.history(ex_id))
    assert [h.event for h in history][-2:] == ["state_exit", "machine_end"]
    assert sum(h.event == "state_exit" and h.state == "done" for h in history) == 1
    assert run_async(store.get(ex_id)).status == "completed"


class CrashOnceFinalExitIsWritten(CountingHooks):
    """Crashes in the final state's on_state_exit once its state_exit is in the
    store (written by the linger flush, as for a slow final state)."""

    def __init__(self, runs: dict, store: Store, ex_id: str):
        super().__init__(runs)
        self.store, self.ex_id = store, ex_id

    async def on_state_exit(self, state_name, context, output):
        if state_name == "done":
            while not any(
                h.event == "state_exit" and h.state == "done"
                for h in await self.store.history(self.ex_id)
            ):
                await asyncio.sleep(0.01)
            raise Crash()
        return output


def test_runner_finishes_a_machine_whose_final_state_exit_was_written(store, tmp_path):
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    ex_id = submit(store, machine)
    runs: dict = {}
    hooks = CrashOnceFinalExitIsWritten(runs, store, ex_id)
    outcome = crash_and_resume(store, Runner(store, registry_for(hooks), linger=0), runs)
    assert outcome.output == {"acc": 1, "by": None} and runs == {"s1": 1}
    history = run_async(store.history(ex_id))
    assert [h.event for h in history][-2:] == ["state_exit", "machine_end"]
    # the final state did not run again: one entry, one exit
    assert sum(h.event == "state_enter" and h.state == "done" for h in history) == 1
    assert sum(h.event == "state_exit" and h.state == "done" for h in history) == 1


class GatedStore:
    """The real store, with the background (non-durable) writes held at a gate."""

    def __init__(self, store: Store):
        self.store = store
        self.gate = asyncio.Event()
        self.held = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self.store, name)

    async def save_checkpoints(self, **kw):
        if not kw["durable"]:
            self.held.set()
            await self.gate.wait()
        return await self.store.save_checkpoints(**kw)


def test_the_outcome_waits_for_a_marker_flush_in_flight(store, tmp_path):
    """Row ids follow the save order (latest = max id) even when the outcome's
    records are taken while a background flush is still writing."""
    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
    claim = run_async(store.claim("w", ["default"]))

    async def go():
        gated = GatedStore(store)
        backend = FencedPersistence(gated, claim, linger=0.0)
        backend.final_states = frozenset({"done"})
        await backend.save(*_snap(ex_id, 1, "state_enter", "done"))
        await gated.held.wait()  # the flush took the marker and is writing it
        await backend.save(*_snap(ex_id, 1, "state_exit", "done"))
        await backend.save(*_snap(ex_id, 1, "machine_end", "end"))
        taking = asyncio.ensure_future(backend.take_pending())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not taking.done()  # blocked behind the write in flight
        gated.gate.set()
        rows = await taking
        assert [r.event for r in rows] == ["state_exit", "machine_end"]
        await store.finish(claim, status="completed", output={}, checkpoints=rows)
        await backend.close()

    run_async(asyncio.wait_for(go(), 60))
    history = run_async(store.history(ex_id))
    assert [h.event for h in history] == ["state_enter", "state_exit", "machine_end"]
    assert run_async(store.latest_checkpoint(ex_id))[0].endswith("machine_end.json")
    ex = run_async(store.get(ex_id))
    assert (ex.status, ex.current_state) == ("completed", "done")


class OddContextHooks(CountingHooks):
    """Puts values into the context that plain JSON cannot encode, at s2."""

    def on_action(self, state_name, action_name, context):
        context = super().on_action(state_name, action_name, context)
        if state_name == "s2":
            context["tags"] = {"only"}  # a set: the library stores its str()
            context["nested"] = {"list": [1, 2.5, None, True], "text": 'é "quoted"'}
        return context


class EnteringHooks(OddContextHooks):
    """Also an on_state_enter that changes the context, between a state's
    state_enter snapshot and its execute snapshot."""

    def on_state_enter(self, state_name, context):
        context["entered"] = state_name
        return context


@pytest.mark.parametrize("hooks_class", [OddContextHooks, EnteringHooks])
def test_snapshots_are_the_bytes_the_library_would_write(store, tmp_path, hooks_class):
    # The runner's machine encodes snapshots itself (no asdict deep copy, the
    # fixed fields once, a pass-through state's execute snapshot from its
    # state_enter text): every stored snapshot must decode to a MachineSnapshot
    # whose library encoding is exactly the stored bytes, and one with a
    # context that plain JSON refuses goes through the library's own lenient path.
    from dataclasses import asdict

    from flatmachines.persistence import CheckpointManager, MachineSnapshot

    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add", "add", "add"]))
    claim = run_async(store.claim("w", ["default"]))
    runs: dict = {}
    outcome = run_async(Runner(store, registry_for(hooks_class(runs))).run(claim))
    assert outcome.status == "completed" and outcome.output["acc"] == 3
    history = run_async(store.history(ex_id))
    assert len(history) == 17  # machine_start, 3 per state of 5, machine_end
    library = CheckpointManager(MemoryBackend(), ex_id)
    for entry in history:
        stored = run_async(store.checkpoint_at(ex_id, seq=entry.seq)).snapshot
        snapshot = MachineSnapshot(**json.loads(stored))
        assert (snapshot.event, snapshot.step, snapshot.current_state) == (
            entry.event,
            entry.step,
            entry.state,
        )
        assert library._safe_serialize(asdict(snapshot)).encode() == stored
        if (
            hooks_class is EnteringHooks
            and entry.event in ("execute", "state_exit")
            and (
                entry.state != "start"  # the one state without the hooks
            )
        ):
            assert snapshot.context["entered"] == entry.state  # its own hook's change
        if entry.step > 3 or (entry.step, entry.event) == (3, "state_exit"):  # s2 acted
            assert snapshot.context["tags"] == "{'only'}"
            assert snapshot.context["nested"]["text"] == 'é "quoted"'


def test_config_cache_hands_each_machine_its_own_exact_copy():
    # Copies come from the config's JSON text when JSON holds it exactly, else
    # from a deep copy: either way equal to the parse, never shared.
    from orchestrator.machine_config import ConfigCache

    cache = ConfigCache()
    plain = "spec: flatmachine\ndata:\n  context: {a: 1, b: [1, 2.5, null, true, 'x']}\n"
    yaml_only = "spec: flatmachine\ndata:\n  when: 2026-01-01\n  1: one\n  ratio: .nan\n"
    for key, raw in (("plain", plain), ("yaml-only", yaml_only)):
        first = cache.put(key, raw)
        one, two = cache.get(key), cache.get(key)
        assert repr(one) == repr(first) == repr(two)  # same types, same values
        one["data"]["mutated"] = True
        assert "mutated" not in cache.get(key)["data"] and "mutated" not in two["data"]
    assert type(cache.get("yaml-only")["data"]["when"]).__name__ == "date"
    assert 1 in cache.get("yaml-only")["data"]
