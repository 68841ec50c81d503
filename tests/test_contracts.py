"""flatmachines' ABCs on the store, held to what the library promises.

Each promise is read from the library (flatmachines' persistence.py,
locking.py, signals.py, backends.py and assets/flatagents-runtime.d.ts) and
checked against our backends, on SQLite and PostgreSQL, where possible side
by side with the library's own in-memory backend doing the same. Where our
design differs, the difference is an error that names it (README,
"flatmachines' contracts on the store").
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from flatmachines import FlatMachine, MemoryBackend, MemoryConfigStore
from flatmachines.backends import ResultBackend
from flatmachines.dispatcher import SignalDispatcher
from flatmachines.locking import ExecutionLock
from flatmachines.persistence import config_hash
from flatmachines.signals import MemorySignalBackend, SignalBackend
from freezegun import freeze_time

from orchestrator.children import StoreResults
from orchestrator.client import Client
from orchestrator.errors import LeaseLost, UserError
from orchestrator.persistence import (
    FencedLock,
    FencedPersistence,
    StoreConfigStore,
    StoreSignals,
    runner_wait,
    split_key,
)
from orchestrator.store.models import locks, results

from .conftest import ROOT, orch_env, run_async, wait_until, write_machine

SPEC = {"spec": "flatmachine", "spec_version": "4.2.1"}


def host_claim(store, tmp_path, ex_id: str = "host"):
    """A claimed execution of the store: the owner under whose fence plain
    FlatMachines write their checkpoints (as a run's inline machines do)."""
    machine = write_machine(
        tmp_path / "host.yml",
        {
            **SPEC,
            "data": {
                "name": "host",
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "done"}]},
                    "done": {"type": "final"},
                },
            },
        },
    )
    run_async(Client(store).submit(machine, {}, id=ex_id))
    claim = run_async(store.claim("w", ["default"]))
    assert claim.execution.id == ex_id
    return claim


def rows(store, table) -> list:
    def tx(conn):
        return list(conn.execute(sa.select(table)).mappings())

    return run_async(store.db.read(tx))


# ------------------------------------------------------------------ signals


def test_consume_removes_each_signal_first_in_first_out(store):
    backend = StoreSignals(store)
    assert isinstance(backend, SignalBackend)

    async def go():
        ids = [await backend.send("orders", {"n": n}) for n in (1, 2, 3)]
        await backend.send("other", None)
        first = await backend.consume("orders")
        left = [s.data for s in await backend.peek("orders")]
        rest = [await backend.consume("orders"), await backend.consume("orders")]
        return ids, first, left, rest, await backend.consume("orders"), await backend.channels()

    ids, first, left, rest, empty, channels = run_async(go())
    assert (first.id, first.channel, first.data) == (ids[0], "orders", {"n": 1})
    assert left == [{"n": 2}, {"n": 3}]  # removed once consumed
    assert [s.data for s in rest] == [{"n": 2}, {"n": 3}]
    assert empty is None
    assert channels == ["other"]
    assert [s.channel for s in run_async(store.pending_signals())] == ["other"]


def test_a_signal_given_to_a_waiting_execution_is_not_taken_by_another_consume(store, tmp_path):
    claim = host_claim(store, tmp_path, "waiter")
    assert run_async(store.park(claim, channel="approval", wake_at=None)) == "waiting"
    backend = StoreSignals(store)
    run_async(backend.send("approval", {"ok": True}))  # given to the waiter at once
    assert run_async(backend.consume("approval")) is None
    [kept] = run_async(store.pending_signals("approval"))
    assert kept.assigned_to == "waiter"


def test_a_claimed_consume_outside_the_runners_wait_is_fenced_and_at_once(store, tmp_path):
    claim = host_claim(store, tmp_path)
    backend = StoreSignals(store, claim, FencedPersistence(store, claim))

    async def go():
        await backend.send("c", 1)
        await backend.send("c", 2)
        taken = await backend.consume("c")  # a hook's consume: removed now
        with runner_wait():  # the runner's wait: reserved until its commit
            reserved = await backend.consume("c")
        return taken, reserved

    taken, reserved = run_async(go())
    assert (taken.data, reserved.data) == (1, 2)
    [held] = run_async(store.pending_signals("c"))
    assert held.data == 2 and held.assigned_to == "host" and held.consumed_at is None

    stale = replace(claim, fence=claim.fence - 1)  # a worker that lost the lease
    zombie = StoreSignals(store, stale, FencedPersistence(store, stale))
    run_async(backend.send("c", 3))
    with pytest.raises(LeaseLost):
        run_async(zombie.consume("c"))
    assert [s.data for s in run_async(store.pending_signals("c"))] == [2, 3]


def test_a_timer_channel_outside_the_runners_wait_is_refused(store):
    with pytest.raises(ValueError, match="timer channel"):
        run_async(StoreSignals(store).consume("sleep:5m"))


WAITER = {
    **SPEC,
    "data": {
        "name": "waiter",
        "states": {
            "start": {"type": "initial", "transitions": [{"to": "wait"}]},
            "wait": {
                "wait_for": "go",
                "output_to_context": {"v": "output.v"},
                "transitions": [{"to": "done"}],
            },
            "done": {"type": "final", "output": {"v": "context.v"}},
        },
    },
}


async def dispatch_story(persistence, signals, lock) -> dict:
    """One waiter resumed by the library's SignalDispatcher, then a second
    waiter that must not get the first one's signal again."""

    def machine(eid: str) -> FlatMachine:
        return FlatMachine(
            config_dict=WAITER,
            persistence=persistence,
            signal_backend=signals,
            lock=lock,
            _execution_id=eid,
        )

    outputs: dict[str, object] = {}

    async def resume(eid: str, _data) -> None:
        outputs[eid] = await machine(eid).execute(resume_from=eid)

    dispatcher = SignalDispatcher(signals, persistence, resume_fn=resume)
    seen: dict[str, object] = {}
    seen["m1 parks"] = await machine("m-1").execute(input={})
    await signals.send("go", {"v": 1})
    seen["first dispatch"] = await dispatcher.dispatch_all()
    seen["m2 parks"] = await machine("m-2").execute(input={})
    seen["nothing left"] = await dispatcher.dispatch_all()
    seen["left on channel"] = [s.data for s in await signals.peek("go")]
    await signals.send("go", {"v": 2})
    seen["second dispatch"] = await dispatcher.dispatch_all()
    seen["outputs"] = outputs
    seen["channels"] = await signals.channels()
    return seen


def test_the_librarys_signal_dispatcher_delivers_each_signal_once(store, tmp_path):
    expected = run_async(dispatch_story(MemoryBackend(), MemorySignalBackend(), None))
    claim = host_claim(store, tmp_path)
    ours = run_async(
        dispatch_story(FencedPersistence(store, claim), StoreSignals(store), FencedLock(store))
    )
    assert ours == expected
    assert ours["outputs"] == {"m-1": {"v": 1}, "m-2": {"v": 2}}
    assert ours["nothing left"] == {} and ours["left on channel"] == []
    assert run_async(store.pending_signals()) == []
    assert rows(store, locks) == []  # each machine's lock released


# -------------------------------------------------------------- persistence


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "/etc/passwd",
        "job/../../x/latest",
        "a//latest",
        "./latest",
        "latest",
        "job/",
        "job/..",
        "job/step 1",
        "x" * 201 + "/latest",
    ],
)
def test_a_key_that_is_not_an_execution_id_and_a_name_is_refused(store, tmp_path, key):
    claim = host_claim(store, tmp_path)
    backend = FencedPersistence(store, claim, linger=0.0)
    for call in (
        lambda: backend.save(key, b"{}"),
        lambda: backend.load(key),
        lambda: backend.delete(key),
    ):
        with pytest.raises(ValueError, match=r"a checkpoint key is '<execution id>/<name>'"):
            run_async(call())
    assert run_async(store.latest_snapshot_ids()) == []


def test_keys_the_library_and_the_runner_write_are_accepted():
    assert split_key("job-7/step_000003_state_exit.json") == (
        "job-7",
        "step_000003_state_exit.json",
    )
    assert split_key("parent@3/0/latest") == ("parent@3/0", "latest")  # a child's id
    assert split_key("tenant:42 run/latest") == ("tenant:42 run", "latest")
    # an id is any text (shown literally where it is shown), but path-like
    assert split_key("esc\x1b[31m\\x/latest") == ("esc\x1b[31m\\x", "latest")


def test_an_id_that_cannot_name_checkpoints_is_refused_at_submit(store, tmp_path):
    machine = write_machine(tmp_path / "m.yml", {**SPEC, "data": WAITER["data"]})
    for bad in ("../x", "a//b", "a/.", "/x", "x/"):
        with pytest.raises(UserError, match="no part between '/' that is empty, '.' or '..'"):
            run_async(Client(store).submit(machine, {}, id=bad))
    assert run_async(store.list_executions()) == []


def snapshot(eid: str, step: int, event: str = "state_exit") -> tuple[str, bytes]:
    body = (
        f'{{"execution_id": "{eid}", "machine_name": "m", "spec_version": "4.2.1", '
        f'"current_state": "s{step}", "context": {{}}, "step": {step}, "event": "{event}"}}'
    )
    return f"{eid}/step_{step:06d}_{event}.json", body.encode()


async def latest_story(backend) -> dict:
    """What the library's MemoryBackend does with pointers and deletes."""
    seen: dict[str, object] = {}
    k1, v1 = snapshot("x", 1)
    k2, v2 = snapshot("x", 2)
    seen["no latest yet"] = await backend.load("x/latest")
    await backend.delete("x/latest")  # safe to call when missing
    await backend.save(k1, v1)
    await backend.save("x/latest", k1.encode())
    await backend.save(k2, v2)
    await backend.save("x/latest", k2.encode())
    seen["latest"] = await backend.load("x/latest")
    await backend.save("x/latest", k1.encode())  # back to an older snapshot
    seen["moved back"] = await backend.load("x/latest")
    seen["its bytes"] = await backend.load((await backend.load("x/latest")).decode())
    await backend.delete("x/step_000009_state_exit.json")  # missing: no error
    seen["ids"] = await backend.list_execution_ids()
    await backend.delete_execution("x")
    seen["after delete_execution"] = (await backend.load("x/latest"), await backend.load(k1))
    return seen


def test_the_latest_pointer_behaves_as_the_librarys(store, tmp_path):
    expected = run_async(latest_story(MemoryBackend()))
    claim = host_claim(store, tmp_path)
    ours = run_async(latest_story(FencedPersistence(store, claim, linger=0.0)))
    assert ours == expected
    assert ours["moved back"] == b"x/step_000001_state_exit.json"


def test_where_the_latest_pointer_cannot_be_the_librarys_the_error_names_why(store, tmp_path):
    claim = host_claim(store, tmp_path)
    backend = FencedPersistence(store, claim, linger=0.0)
    k1, v1 = snapshot("x", 1)
    k2, v2 = snapshot("x", 2)

    async def go():
        await backend.save(k1, v1)
        with pytest.raises(ValueError, match="not a pointer of its own.*save it first"):
            await backend.save("x/latest", b"x/step_000005_state_exit.json")
        with pytest.raises(ValueError, match="another execution"):
            await backend.save("x/latest", b"y/step_000001_state_exit.json")
        with pytest.raises(ValueError, match=r"delete_execution\('x'\)"):
            await backend.delete("x/latest")
        await backend.save(k2, v2)
        with pytest.raises(ValueError, match="the one before it would become the latest"):
            await backend.delete(k2)
        return await backend.load("x/latest")

    assert run_async(go()) == k2.encode()  # nothing changed
    assert [h.step for h in run_async(store.history("x"))] == [1, 2]


# ------------------------------------------------------------- config store


@pytest.mark.parametrize(
    "raw",
    [
        "- a\n- b\n",  # a list
        "just some text",
        "42",
        "",
        "data: [1, 2",  # not YAML
        "data: [states]\n",  # a mapping whose data is no mapping
        "data: {states: [a, b], lifecycle_hooks: 3}\n",
        "&a [*a, *a]",  # an alias that recurses
    ],
)
def test_the_config_store_keeps_any_text_as_the_librarys_does(store, raw):
    ours, theirs = StoreConfigStore(store), MemoryConfigStore()

    async def go(cs):
        h = await cs.put(raw)
        again = await cs.put(raw)
        return h, again, await cs.get(h)

    assert run_async(go(ours)) == run_async(go(theirs)) == (config_hash(raw),) * 2 + (raw,)
    run_async(ours.delete(config_hash(raw)))
    assert run_async(ours.get(config_hash(raw))) is None


# ------------------------------------------------------------------ results


def test_results_are_written_read_and_deleted_as_the_library_promises(store):
    backend = StoreResults(store)
    assert isinstance(backend, ResultBackend)
    uri = "flatagents://child-1/result"

    async def go():
        seen = {"before": (await backend.exists(uri), await backend.read(uri, block=False))}
        with pytest.raises(TimeoutError):
            await backend.read(uri, timeout=0)
        await backend.write(uri, {"a": 1})
        await backend.write(uri, {"a": 2})  # the last write wins
        seen["after"] = (await backend.exists(uri), await backend.read(uri))
        await backend.write("flatagents://child-1/notes", [1, "two", None])
        seen["other path"] = await backend.read("flatagents://child-1/notes", block=False)
        await backend.delete(uri)
        await backend.delete(uri)  # safe when missing
        seen["deleted"] = (await backend.exists(uri), await backend.read(uri, block=False))
        return seen

    assert run_async(go()) == {
        "before": (False, None),
        "after": (True, {"a": 2}),
        "other path": [1, "two", None],
        "deleted": (False, None),
    }


def test_a_write_wakes_a_reader_blocked_on_its_uri(store):
    # a poll longer than the test's run: the reader returns only if woken
    backend = StoreResults(store, poll=3600)
    elsewhere = StoreResults(store, poll=0.05)  # another process's reader polls
    uri = "flatagents://child-2/result"

    async def go():
        reader = asyncio.create_task(backend.read(uri, timeout=600))
        remote = asyncio.create_task(elsewhere.read(uri, timeout=600))
        while uri not in backend._waiting:
            await asyncio.sleep(0)
        await backend.write(uri, {"done": True})
        return await reader, await remote

    assert run_async(go()) == ({"done": True}, {"done": True})


def test_an_executions_result_is_its_outcome_and_cannot_be_written(store, tmp_path):
    claim = host_claim(store, tmp_path, "job-1")
    backend = StoreResults(store)
    uri = "flatagents://job-1/result"
    assert run_async(backend.read(uri, block=False)) is None
    with pytest.raises(ValueError, match="is an execution of this store, whose result is its"):
        run_async(backend.write(uri, {"forged": True}))
    run_async(store.finish(claim, status="completed", output={"real": 1}))
    assert run_async(backend.read(uri, timeout=30)) == {"real": 1}
    run_async(backend.delete(uri))
    assert run_async(backend.exists(uri))  # the execution's record is kept
    assert rows(store, results) == []


def test_a_bad_result_uri_is_refused(store):
    for uri in ("http://x/result", "flatagents:///result", "flatagents://" + "x" * 600):
        with pytest.raises(ValueError):
            run_async(StoreResults(store).write(uri, 1))


PARENT = {
    **SPEC,
    "data": {
        "name": "parent",
        "context": {"n": "input.n"},
        "machines": {
            "doubler": {
                **SPEC,
                "data": {
                    "name": "doubler",
                    "context": {"n": "input.n"},
                    "states": {
                        "start": {"type": "initial", "transitions": [{"to": "done"}]},
                        "done": {"type": "final", "output": {"twice": "{{ context.n * 2 }}"}},
                    },
                },
            }
        },
        "states": {
            "start": {"type": "initial", "transitions": [{"to": "call"}]},
            "call": {
                "machine": "doubler",
                "input": {"n": "context.n"},
                "output_to_context": {"twice": "output.twice"},
                "transitions": [{"to": "done"}],
            },
            "done": {"type": "final", "output": {"twice": "context.twice"}},
        },
    },
}


def test_a_plain_flatmachine_runs_its_machine_state_on_our_backends(store, tmp_path):
    claim = host_claim(store, tmp_path)
    persistence = FencedPersistence(store, claim)
    machine = FlatMachine(
        config_dict=PARENT,
        persistence=persistence,
        lock=FencedLock(store, claim),
        signal_backend=StoreSignals(store, claim, persistence),
        result_backend=StoreResults(store),
        config_store=StoreConfigStore(store),
        _execution_id=claim.execution.id,
    )
    assert run_async(machine.execute(input={"n": 21})) == {"twice": "42"}
    [written] = rows(store, results)  # the child's result, read back through the store
    assert written["data"] == {"twice": "42"}
    assert run_async(StoreResults(store).read(written["uri"], block=False)) == {"twice": "42"}
    child = written["uri"].removeprefix("flatagents://").removesuffix("/result")
    assert child in run_async(persistence.list_execution_ids(event="machine_end"))
    assert rows(store, locks) == []  # the child's lock was a real one, and released


# -------------------------------------------------------------------- locks


def test_a_lock_on_any_other_key_is_held_by_one_holder_at_a_time(store, tmp_path):
    claim = host_claim(store, tmp_path)
    a, b = FencedLock(store, claim), FencedLock(store)
    assert isinstance(a, ExecutionLock)

    async def go():
        seen = [await a.acquire("report/7"), await b.acquire("report/7")]
        seen.append(await a.acquire("report/7"))  # its own again: renewed
        await b.release("report/7")  # not b's: left as it is
        seen.append(await b.acquire("report/7"))
        await a.release("report/7")
        seen.append(await b.acquire("report/7"))
        seen.append(await a.acquire("report/7"))
        await b.release("report/7")
        await b.release("never-held")  # safe
        return seen

    assert run_async(go()) == [True, False, True, False, True, False]
    assert rows(store, locks) == []
    # the claim's own key is the claim: no row
    assert run_async(a.acquire(claim.execution.id)) is True
    assert rows(store, locks) == []


def test_a_lock_whose_holder_stopped_renewing_is_free_after_its_ttl(store):
    with freeze_time("2026-03-02 12:00:00", real_asyncio=True) as clock:
        run_async(store.acquire_lock("k", "a holder that crashed", 30))
        other = FencedLock(store, ttl=30)
        clock.tick(timedelta(seconds=29))
        assert run_async(other.acquire("k")) is False
        clock.tick(timedelta(seconds=2))
        assert run_async(other.acquire("k")) is True
        [row] = rows(store, locks)
        assert row["holder"] == other.holder
        assert row["expires_at"] == datetime(2026, 3, 2, 12, 1, 1)
        run_async(other.release("k"))


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from orchestrator.persistence import FencedLock
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    async def main():
        store = await Store.open(Settings())
        lock = FencedLock(store, ttl=float(sys.argv[1]))
        assert await lock.acquire("shared-key")
        print("held", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def test_a_lock_held_by_a_killed_process_frees_after_its_ttl(db_url, store):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, "1"],
        env=orch_env(db_url),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        mine = FencedLock(store, ttl=30)
        assert run_async(mine.acquire("shared-key")) is False  # alive and renewing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_until(lambda: run_async(mine.acquire("shared-key")), 60, what="the lock freed")
        run_async(mine.release("shared-key"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


# ---------------------------------------------------------------- retention


def test_retention_removes_old_results_and_expired_locks(store):
    async def go():
        with freeze_time("2026-01-01 00:00:00", real_asyncio=True):
            await StoreResults(store).write("flatagents://old/result", 1)
            await store.acquire_lock("stale", "gone", 30)
        await StoreResults(store).write("flatagents://new/result", 2)
        await store.acquire_lock("live", "here", 3600)
        counted = await store.prune(before=datetime(2026, 1, 2), dry_run=True)
        done = await store.prune(before=datetime(2026, 1, 2))
        return counted, done

    counted, done = run_async(go())
    assert (counted.results, counted.locks) == (done.results, done.locks) == (1, 1)
    assert [r["uri"] for r in rows(store, results)] == ["flatagents://new/result"]
    assert [r["key"] for r in rows(store, locks)] == ["live"]
