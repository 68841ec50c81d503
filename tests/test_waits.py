"""Workflows that wait and stop: signals, durable timers, cancellation.

Real `orch worker` processes and the real `orch` CLI against the real store,
on SQLite and PostgreSQL. Side effects are counted from the effects file the
test hooks append to; what committed is read from the store.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time

from orchestrator import timers
from orchestrator.client import Client
from orchestrator.clock import utcnow
from orchestrator.settings import Settings
from orchestrator.store import Store

from .conftest import orch, run_async, wait_until, write_machine

TTL = "2"


def effects_env(tmp_path: Path, ttl: str = TTL) -> dict[str, str]:
    return {"ORCH_TEST_EFFECTS": str(tmp_path / "effects.log"), "ORCH_LEASE_TTL": ttl}


def runs(tmp_path: Path, ex_id: str) -> Counter:
    path = tmp_path / "effects.log"
    if not path.exists():
        return Counter()
    return Counter(
        line.split()[1] for line in path.read_text().splitlines() if line.split()[0] == ex_id
    )


def wait_machine(
    path: Path,
    channel: str,
    *,
    timeout: float | None = None,
    final_wait: bool = False,
    after: tuple[str, ...] = ("add",),
) -> Path:
    """start → s1 add → wait (wait_for CHANNEL [, timeout]) → a1… → done.

    The wait maps the signal's data: approved ← output.ok, expired ← output.timed_out.
    With ``final_wait`` the wait is the final state: the signal's data is the output."""
    wait: dict = {
        "hooks": "effects",
        "wait_for": channel,
        "output_to_context": {
            "approved": "output.ok",
            "expired": "output.timed_out",
            "woke_at": "output.woke_at",
        },
    }
    if timeout is not None:
        wait["timeout"] = timeout
    done_output = {
        "acc": "context.acc",
        "approved": "context.approved",
        "expired": "context.expired",
    }
    states: dict = {
        "start": {"type": "initial", "transitions": [{"to": "s1"}]},
        "s1": {"hooks": "effects", "action": "add", "transitions": [{"to": "wait"}]},
    }
    if final_wait:
        states["wait"] = {**wait, "type": "final", "output": done_output}
    else:
        names = [f"a{i}" for i in range(1, len(after) + 1)]
        wait["transitions"] = [
            {"condition": "context.expired", "to": "expired"},
            {"to": names[0] if names else "done"},
        ]
        states["wait"] = wait
        for i, (name, action) in enumerate(zip(names, after, strict=True)):
            nxt = names[i + 1] if i + 1 < len(names) else "done"
            states[name] = {"hooks": "effects", "action": action, "transitions": [{"to": nxt}]}
        states["expired"] = {"type": "final", "output": {"expired": True, "acc": "context.acc"}}
        states["done"] = {"type": "final", "output": done_output}
    data = {
        "name": "waits",
        "context": {
            "acc": 0,
            "approved": None,
            "expired": None,
            "sleep": "input.sleep",
            "crash_after": "input.crash_after",
        },
        "states": states,
    }
    return write_machine(path, {"spec": "flatmachine", "spec_version": "4.2.1", "data": data})


def submit(db_url: str, machine: Path, ex_id: str, input: dict | None = None) -> str:
    async def go():
        async with await Client.open(Settings(database_url=db_url)) as client:
            return (await client.submit(machine, input or {}, id=ex_id)).execution.id

    return run_async(go())


def get(store: Store, ex_id: str):
    return run_async(store.get(ex_id))


def ok(r):
    assert r.returncode == 0, r.stderr
    return r


def usage_error(r, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("orch: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def exits_of(store: Store, ex_id: str, state: str) -> int:
    return sum(
        1 for h in run_async(store.history(ex_id)) if h.event == "state_exit" and h.state == state
    )


# ------------------------------------------------------------------ signals


def test_a_signal_sent_after_the_wait_wakes_the_waiting_execution(db_url, store, tmp_path, workers):
    machine = wait_machine(tmp_path / "approve.yml", "approval/{{ context.machine.execution_id }}")
    submit(db_url, machine, "job-1")
    w = workers(db_url, "--app", "testapp", **effects_env(tmp_path))
    wait_until(lambda: get(store, "job-1").status == "waiting", what="the execution parked")
    ex = get(store, "job-1")
    assert ex.waiting_channel == "approval/job-1"
    assert ex.worker_id is None and ex.lease_until is None  # no lease held while it waits
    shown = json.loads(ok(orch("show", "job-1", "--json", db_url=db_url)).stdout)
    assert shown["status"] == "waiting" and shown["waiting_channel"] == "approval/job-1"
    assert "waiting on" in ok(orch("show", "job-1", db_url=db_url)).stdout

    sent = json.loads(
        ok(
            orch("signal", "approval/job-1", "--data", '{"ok": true}', "--json", db_url=db_url)
        ).stdout
    )
    assert sent["woken"] == ["job-1"]
    wait_until(lambda: get(store, "job-1").status == "completed", what="completion")
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    ex = get(store, "job-1")
    assert ex.output == {"acc": 2, "approved": True, "expired": None}
    assert ex.waiting_channel is None and ex.wake_at is None
    assert runs(tmp_path, "job-1") == Counter({"s1": 1, "a1": 1})
    assert exits_of(store, "job-1", "wait") == 1
    assert json.loads(ok(orch("signals", "--json", db_url=db_url)).stdout) == []


def test_a_signal_sent_before_the_wait_is_kept_until_taken(db_url, store, tmp_path, workers):
    machine = wait_machine(tmp_path / "approve.yml", "approval/{{ context.machine.execution_id }}")
    r = ok(orch("signal", "approval/early", "--data", '{"ok": false}', db_url=db_url))
    assert "kept until an execution waits" in r.stdout
    [kept] = json.loads(ok(orch("signals", "--json", db_url=db_url)).stdout)
    assert (kept["channel"], kept["data"], kept["taken_by"]) == (
        "approval/early",
        {"ok": False},
        None,
    )

    submit(db_url, machine, "early")
    w = workers(db_url, "--app", "testapp", "--burst", **effects_env(tmp_path))
    assert w.wait() == 0
    ex = get(store, "early")
    assert ex.status == "completed" and ex.output["approved"] is False
    events = [h.event for h in run_async(store.history("early"))]
    assert "waiting" not in events  # it never had to wait
    assert json.loads(ok(orch("signals", "--json", db_url=db_url)).stdout) == []


def test_one_signal_one_consumer_longest_waiting_first(db_url, store, tmp_path, workers):
    """Delivery: each signal goes to exactly one waiter, the one waiting longest;
    signals on a channel are taken in the order they were sent."""
    machine = wait_machine(tmp_path / "shared.yml", "orders", final_wait=True)
    w = workers(db_url, "--app", "testapp", **effects_env(tmp_path))
    submit(db_url, machine, "first")
    wait_until(lambda: get(store, "first").status == "waiting", what="first waiting")
    submit(db_url, machine, "second")
    wait_until(lambda: get(store, "second").status == "waiting", what="second waiting")

    sent = json.loads(
        ok(orch("signal", "orders", "--data", '{"ok": 1}', "--json", db_url=db_url)).stdout
    )
    assert sent["woken"] == ["first"]
    wait_until(lambda: get(store, "first").status == "completed", what="first done")
    time.sleep(1)
    assert get(store, "second").status == "waiting"  # one signal, one consumer
    ok(orch("signal", "orders", "--data", '{"ok": 2}', db_url=db_url))
    wait_until(lambda: get(store, "second").status == "completed", what="second done")
    # a final wait state's output is the signal's data
    assert (get(store, "first").output, get(store, "second").output) == ({"ok": 1}, {"ok": 2})

    # sent before anyone waits: kept, and taken in the order sent
    ok(orch("signal", "orders", "--data", '{"ok": 3}', db_url=db_url))
    ok(orch("signal", "orders", "--data", '{"ok": 4}', db_url=db_url))
    submit(db_url, machine, "third")
    wait_until(lambda: get(store, "third").status == "completed", what="third done")
    assert get(store, "third").output == {"ok": 3}
    [left] = json.loads(ok(orch("signals", "--json", db_url=db_url)).stdout)
    assert left["data"] == {"ok": 4}
    w.signal(signal.SIGTERM)
    assert w.wait() == 0


def test_a_waiting_execution_frees_its_slot(db_url, store, tmp_path, workers):
    waiting = wait_machine(tmp_path / "wait.yml", "never/comes")
    straight = wait_machine(tmp_path / "straight.yml", "go")
    submit(db_url, waiting, "parked")
    w = workers(db_url, "--app", "testapp", "--concurrency", "1", **effects_env(tmp_path))
    wait_until(lambda: get(store, "parked").status == "waiting", what="parked")
    ok(orch("signal", "go", db_url=db_url))
    submit(db_url, straight, "other")
    wait_until(lambda: get(store, "other").status == "completed", what="the other one done")
    assert get(store, "parked").status == "waiting"
    w.signal(signal.SIGTERM)
    assert w.wait() == 0


def test_sigkill_between_taking_a_signal_and_its_commit_loses_neither(
    db_url, store, tmp_path, workers
):
    """The wait is the final state: between taking the signal and the commit of
    its state_exit runs on_state_exit, where the worker kills itself."""
    machine = wait_machine(
        tmp_path / "final.yml", "approval/{{ context.machine.execution_id }}", final_wait=True
    )
    submit(db_url, machine, "k1", {"crash_after": "wait"})
    first = workers(db_url, "--app", "testapp", **effects_env(tmp_path))
    wait_until(lambda: get(store, "k1").status == "waiting", what="parked")
    ok(orch("signal", "approval/k1", "--data", '{"ok": "yes"}', db_url=db_url))
    assert first.wait() == -signal.SIGKILL  # took the signal, died before committing it
    assert exits_of(store, "k1", "wait") == 0
    [held] = json.loads(ok(orch("signals", "--json", db_url=db_url)).stdout)
    assert held["taken_by"] == "k1"  # taken, not consumed: still there

    wait_until(lambda: get(store, "k1").lease_until < utcnow(), what="its lease expired")
    second = workers(db_url, "--app", "testapp", "--burst", **effects_env(tmp_path))
    assert second.wait() == 0
    ex = get(store, "k1")
    assert ex.status == "completed" and ex.output == {"ok": "yes"}
    assert ex.recoveries == 1
    assert exits_of(store, "k1", "wait") == 1  # exactly one committed state_exit carries it
    latest = run_async(store.latest_checkpoint("k1"))
    assert latest is not None
    assert json.loads(ok(orch("signals", "--json", db_url=db_url)).stdout) == []


# ------------------------------------------------------------------- timers


def test_timer_due_time_logic():
    now = datetime(2026, 3, 2, 12, 0, 0)
    assert timers.parse_duration("90") == 90
    assert timers.parse_duration("1h30m") == 5400
    assert timers.parse_duration("1.5h") == 5400
    assert timers.parse_duration("2d") == 172800
    for bad in ("", "soon", "5 minutes", "1x", "-5"):
        with pytest.raises(ValueError):
            timers.parse_duration(bad)
    assert timers.wake_time("sleep:15m", now) == now + timedelta(minutes=15)
    assert timers.wake_time("until:2026-03-03T09:00:00Z", now) == datetime(2026, 3, 3, 9)
    assert timers.wake_time("until:2026-03-03T10:00:00+01:00", now) == datetime(2026, 3, 3, 9)
    with pytest.raises(ValueError, match="ISO 8601"):
        timers.wake_time("until:tomorrow", now)
    assert timers.wake_at("approval/x", 86400, now) == now + timedelta(days=1)
    assert timers.wake_at("approval/x", None, now) is None
    assert not timers.due(None, now) and not timers.due(now + timedelta(seconds=1), now)
    assert timers.due(now, now)


def test_a_parked_timer_is_claimable_only_once_due(store, tmp_path):
    """The first claim after the due time takes it; none before (frozen clock)."""
    machine = wait_machine(tmp_path / "nap.yml", "sleep:1h")
    ex_id = run_async(Client(store).submit(machine, {})).execution.id
    with freeze_time("2026-03-02 12:00:00", real_asyncio=True) as clock:
        claim = run_async(store.claim("w", ["default"]))
        assert claim.execution.id == ex_id
        left = run_async(
            store.park(claim, channel="sleep:1h", wake_at=datetime(2026, 3, 2, 13, 0, 0))
        )
        assert left == "waiting"
        clock.tick(3599)
        assert run_async(store.claim("w", ["default"])) is None
        clock.tick(1)
        again = run_async(store.claim("w", ["default"]))
        assert again is not None and again.execution.id == ex_id
        assert again.execution.wake_at == datetime(2026, 3, 2, 13, 0, 0)
        assert again.execution.waiting_channel == "sleep:1h"


def test_a_timer_survives_every_process_killed(db_url, store, tmp_path, workers):
    machine = wait_machine(tmp_path / "nap.yml", "sleep:{{ context.sleep }}")
    submit(db_url, machine, "nap", {"sleep": 3})
    first = workers(db_url, "--app", "testapp", **effects_env(tmp_path))
    wait_until(lambda: get(store, "nap").status == "waiting", what="parked on its timer")
    shown = json.loads(ok(orch("show", "nap", "--json", db_url=db_url)).stdout)
    assert shown["waiting_channel"] == "sleep:3" and shown["wake_at"]
    first.signal(signal.SIGKILL)
    first.wait()
    # every worker is gone; what remains is in the database (read afresh)
    reopened = run_async(Store.open(Settings(database_url=db_url)))
    try:
        ex = get(reopened, "nap")
        wake = ex.wake_at
        assert ex.status == "waiting" and wake is not None
        wait_until(lambda: utcnow() >= wake + timedelta(seconds=0.2), what="the due time")
        second = workers(db_url, "--app", "testapp", "--burst", **effects_env(tmp_path))
        assert second.wait() == 0
        ex = get(reopened, "nap")
        assert ex.status == "completed" and ex.output["acc"] == 2
        assert runs(tmp_path, "nap") == Counter({"s1": 1, "a1": 1})
    finally:
        run_async(reopened.close())


@pytest.mark.parametrize("signal_first", [True, False], ids=["signal-wins", "deadline-wins"])
def test_a_signal_wait_with_a_deadline_takes_each_way(
    db_url, store, tmp_path, workers, signal_first
):
    machine = wait_machine(
        tmp_path / "deadline.yml", "approval/{{ context.machine.execution_id }}", timeout=2
    )
    ex_id = "signal-first" if signal_first else "deadline-first"
    submit(db_url, machine, ex_id)
    w = workers(db_url, "--app", "testapp", **effects_env(tmp_path))
    wait_until(lambda: get(store, ex_id).status == "waiting", what="parked")
    assert get(store, ex_id).wake_at is not None
    if signal_first:
        ok(orch("signal", f"approval/{ex_id}", "--data", '{"ok": true}', db_url=db_url))
    wait_until(lambda: get(store, ex_id).status == "completed", 60, what="one way or the other")
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    ex = get(store, ex_id)
    if signal_first:
        assert ex.output == {"acc": 2, "approved": True, "expired": None}
    else:
        assert ex.output == {"expired": True, "acc": 1}  # the expired transition
        # a signal that comes after the deadline is not taken by it
        ok(orch("signal", f"approval/{ex_id}", "--data", '{"ok": true}', db_url=db_url))
        [late] = json.loads(ok(orch("signals", "--json", db_url=db_url)).stdout)
        assert late["taken_by"] is None


# ------------------------------------------------------------------- cancel


def test_cancel_in_each_status(db_url, store, tmp_path, workers):
    slow = write_machine(
        tmp_path / "slow.yml",
        {
            "spec": "flatmachine",
            "spec_version": "4.2.1",
            "data": {
                "name": "slow",
                "context": {"acc": 0, "sleep": "input.sleep"},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "s1"}]},
                    "s1": {"hooks": "effects", "action": "slow_add", "transitions": [{"to": "s2"}]},
                    "s2": {"hooks": "effects", "action": "add", "transitions": [{"to": "done"}]},
                    "done": {"type": "final", "output": {"acc": "context.acc"}},
                },
            },
        },
    )
    waiting = wait_machine(tmp_path / "wait.yml", "approval/{{ context.machine.execution_id }}")
    submit(db_url, slow, "queued-one", {"sleep": 0})
    ok(orch("cancel", "queued-one", "--reason", "not needed", db_url=db_url))
    ex = get(store, "queued-one")
    assert (ex.status, ex.cancel_reason) == ("cancelled", "not needed")

    submit(db_url, waiting, "waiting-one")
    submit(db_url, slow, "running-one", {"sleep": 30})
    w = workers(db_url, "--app", "testapp", "--concurrency", "2", **effects_env(tmp_path))
    wait_until(lambda: get(store, "waiting-one").status == "waiting", what="one waiting")
    wait_until(lambda: runs(tmp_path, "running-one")["s1"] == 1, what="one running its slow state")

    doc = json.loads(ok(orch("cancel", "waiting-one", "--json", db_url=db_url)).stdout)
    assert doc["status"] == "cancelled"
    ok(orch("signal", "approval/waiting-one", db_url=db_url))  # too late: nobody takes it

    started = time.monotonic()
    ok(orch("cancel", "running-one", "--reason", "operator said so", db_url=db_url))
    wait_until(lambda: "cancelled running-one" in w.log(), 30, "the worker stopping it")
    # the worker learns through its next lease renewal: a third of the TTL
    assert time.monotonic() - started < 30  # (a bound for a hang, not a timing test)
    ex = get(store, "running-one")
    assert (ex.status, ex.cancel_reason) == ("cancelled", "operator said so")

    # and none of them runs again
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    again = workers(db_url, "--app", "testapp", "--burst", **effects_env(tmp_path))
    assert again.wait() == 0
    assert runs(tmp_path, "queued-one") == Counter()
    assert runs(tmp_path, "waiting-one") == Counter({"s1": 1})
    assert runs(tmp_path, "running-one") == Counter({"s1": 1})
    assert {get(store, i).status for i in ("queued-one", "waiting-one", "running-one")} == {
        "cancelled"
    }
    [kept] = json.loads(ok(orch("signals", "--json", db_url=db_url)).stdout)
    assert kept["taken_by"] is None

    # a finished execution is left as it is: one line, exit 2
    before = get(store, "running-one")
    usage_error(orch("cancel", "running-one", db_url=db_url), "cancelled already")
    assert get(store, "running-one") == before


# ---------------------------------------------------------------- bad input


def test_bad_wait_input_is_one_line_exit_2_and_writes_nothing(db_url, store, tmp_path):
    usage_error(
        orch("signal", "ch", "--data", "{not json", db_url=db_url), "--data is not valid JSON"
    )
    usage_error(orch("signal", "", "--data", "1", db_url=db_url), "channel")
    usage_error(orch("signal", "sleep:5", db_url=db_url), "timer channel")
    usage_error(
        orch("signal", "ch", "--data-file", str(tmp_path / "nope.json"), db_url=db_url), "not found"
    )
    assert run_async(store.pending_signals()) == []

    usage_error(orch("cancel", "no-such-id", db_url=db_url), "no execution with id 'no-such-id'")

    bad_timer = wait_machine(tmp_path / "bad.yml", "until:next tuesday")
    usage_error(orch("submit", str(bad_timer), db_url=db_url), "wait_for", "ISO 8601")
    bad_deadline = wait_machine(tmp_path / "bad2.yml", "approval/x", timeout=-1)
    usage_error(orch("submit", str(bad_deadline), db_url=db_url), "timeout")
    assert run_async(store.list_executions()) == []


def test_the_store_is_a_flatmachines_signal_backend(store, tmp_path):
    from flatmachines.signals import SignalBackend

    from orchestrator.persistence import FencedPersistence, StoreSignals, runner_wait

    machine = wait_machine(tmp_path / "m.yml", "orders")
    ex_id = run_async(Client(store).submit(machine, {})).execution.id
    claim = run_async(store.claim("w", ["default"]))
    backend = StoreSignals(store, claim, FencedPersistence(store, claim))
    assert isinstance(backend, SignalBackend)

    async def go():
        first = await backend.send("orders", {"n": 1})
        await backend.send("orders", {"n": 2})
        await backend.send("other", None)
        peeked = [s.data for s in await backend.peek("orders")]
        channels = await backend.channels()
        with runner_wait():  # the runner's own wait reserves
            taken = await backend.consume("orders")
        return first, peeked, channels, taken

    first, peeked, channels, taken = run_async(go())
    assert peeked == [{"n": 1}, {"n": 2}]
    assert channels == ["orders", "other"]
    assert (taken.id, taken.data) == (first, {"n": 1})
    # taken under the claim, consumed only when the wait's progress commits
    [held] = [s for s in run_async(store.pending_signals("orders")) if s.assigned_to]
    assert held.assigned_to == ex_id and held.consumed_at is None
