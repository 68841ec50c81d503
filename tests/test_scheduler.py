"""Scheduler logic under a frozen clock: reaper, retries, cron, leadership, scaling."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest
from freezegun import freeze_time

from orchestrator.client import Client
from orchestrator.clock import utcnow
from orchestrator.errors import UserError
from orchestrator.overlap import POLICIES
from orchestrator.retry import backoff_delay
from orchestrator.scaling import decide, desired_workers
from orchestrator.scheduler import Scheduler
from orchestrator.settings import Settings
from orchestrator.store import Store

from .conftest import chain_machine, run_async

T0 = "2026-03-02 01:58:30"


def scheduler(store: Store, **kw) -> Scheduler:
    return Scheduler(store, store.settings, **kw)


def submit(store: Store, machine, **kw) -> str:
    return run_async(Client(store).submit(machine, {}, **kw)).execution.id


# ------------------------------------------------------------------ reaper


def test_reaper_requeues_expired_leases_and_marks_silent_workers_lost(store, tmp_path):
    ttl = store.settings.lease_ttl
    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
    with freeze_time(T0, real_asyncio=True) as clock:
        run_async(
            store.register_worker("w1", host="h", pid=1, queue_names=["default"], concurrency=1)
        )
        claim = run_async(store.claim("w1", ["default"]))
        s = scheduler(store)
        assert run_async(s.reap()) == {"lost_workers": [], "requeued": [], "failed": []}
        clock.tick(ttl + 1)  # no renewal, no heartbeat: the worker died
        out = run_async(s.reap())
    assert out == {"lost_workers": ["w1"], "requeued": [ex_id], "failed": []}
    ex = run_async(store.get(ex_id))
    assert ex.status == "queued" and ex.recoveries == 1 and ex.fence == claim.fence + 1
    assert ex.worker_id is None and ex.lease_until is None
    [w] = run_async(store.list_workers())
    assert w.status == "lost"


def test_reaper_fails_an_execution_past_the_recovery_cap(db_url, tmp_path):
    store = run_async(Store.open(Settings(database_url=db_url, lease_ttl=10, max_recoveries=1)))
    try:
        ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
        s = scheduler(store)
        with freeze_time(T0, real_asyncio=True) as clock:
            for expected in ("queued", "failed"):
                run_async(store.claim("w", ["default"]))
                clock.tick(11)
                run_async(s.reap())
                assert run_async(store.get(ex_id)).status == expected
        assert "crashed its worker 2 times" in run_async(store.get(ex_id)).error
    finally:
        run_async(store.close())


def test_a_lost_worker_that_comes_back_is_active_again(store):
    with freeze_time(T0, real_asyncio=True) as clock:
        run_async(store.register_worker("w1", host="h", pid=1, queue_names=["q"], concurrency=1))
        clock.tick(store.settings.lease_ttl + 1)
        assert run_async(store.mark_lost_workers(store.settings.lease_ttl)) == ["w1"]
        _, status = run_async(store.renew_leases("w1", {}))
    assert status == "active"


# ----------------------------------------------------------------- retries


def test_backoff_grows_per_attempt_with_jitter_and_a_cap():
    rand = random.Random(7)
    delays = [backoff_delay(n, 2.0, 60.0, rand) for n in range(1, 9)]
    ceilings = [min(60.0, 2.0 * 2 ** (n - 1)) for n in range(1, 9)]
    for d, c in zip(delays, ceilings, strict=True):
        assert c / 2 <= d <= c
    assert max(delays) <= 60.0
    # the jitter never lets a later attempt wait less than half the earlier ceiling
    assert all(delays[i + 2] > delays[i] for i in range(4))


def test_failed_attempt_waits_in_queued_until_not_before(store, tmp_path):
    from orchestrator.runner import Runner
    from tests.apps.testapp import hooks_registry

    ex_id = submit(
        store, chain_machine(tmp_path / "m.yml", ["add", "fail"]), max_attempts=3, backoff=10.0
    )
    runner = Runner(store, hooks_registry)
    with freeze_time(T0, real_asyncio=True) as clock:
        waits = []
        for attempt in (1, 2):
            claim = run_async(store.claim("w", ["default"]))
            assert claim.execution.attempt == attempt
            assert run_async(runner.run(claim)).status == "retrying"
            ex = run_async(store.get(ex_id))
            assert ex.status == "queued" and "failed on purpose" in ex.error
            waits.append((ex.not_before - utcnow()).total_seconds())
            assert run_async(store.claim("w", ["default"])) is None  # not before not_before
            clock.move_to(ex.not_before)
        claim = run_async(store.claim("w", ["default"]))
        assert run_async(runner.run(claim)).status == "failed"
    assert 5 <= waits[0] <= 10 and 10 <= waits[1] <= 20
    ex = run_async(store.get(ex_id))
    assert ex.status == "failed" and ex.attempt == 3
    assert "Traceback" in ex.error and "RuntimeError: the workflow failed on purpose" in ex.error
    # each retry resumed after s1's committed state_exit: s1 ran once
    events = [(h.event, h.state) for h in run_async(store.history(ex_id))]
    assert events.count(("state_exit", "s1")) == 1
    assert events.count(("execute", "s2")) == 3


def test_retry_resumes_a_failed_execution_and_refuses_others(store, tmp_path):
    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
    with pytest.raises(UserError, match="only failed or cancelled"):
        run_async(store.retry(ex_id))
    claim = run_async(store.claim("w", ["default"]))
    run_async(store.finish(claim, status="failed", error="boom"))
    ex = run_async(store.retry(ex_id))
    assert ex.status == "queued" and ex.attempt == 2 and ex.max_attempts >= 2


def test_cancel_fences_out_the_running_worker(store, tmp_path):
    from orchestrator.errors import LeaseLost

    ex_id = submit(store, chain_machine(tmp_path / "m.yml", ["add"]))
    claim = run_async(store.claim("w", ["default"]))
    assert run_async(store.cancel(ex_id)).status == "cancelled"
    with pytest.raises(LeaseLost):
        run_async(store.finish(claim, status="completed", output={}))
    assert run_async(store.get(ex_id)).status == "cancelled"
    before = run_async(store.get(ex_id))
    with pytest.raises(UserError, match="cancelled already"):  # a finished one is left as it is
        run_async(store.cancel(ex_id))
    assert run_async(store.get(ex_id)) == before


# -------------------------------------------------------------------- cron


def test_cron_fires_on_the_right_minute_once_per_tick(store, tmp_path):
    client = Client(store)
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    with freeze_time("2026-03-02 01:58:30", real_asyncio=True) as clock:
        first = run_async(
            client.add_schedule("nightly", machine, cron="0 2 * * *", input={"day": "yesterday"})
        )
        assert first == datetime(2026, 3, 2, 2, 0)
        s = scheduler(store)
        clock.move_to("2026-03-02 01:59:59")
        assert run_async(s.fire_schedules()) == []
        clock.move_to("2026-03-02 02:00:00")
        [(name, tick, ex)] = run_async(s.fire_schedules())
        assert (name, tick) == ("nightly", datetime(2026, 3, 2, 2, 0))
        assert ex.input == {"day": "yesterday"} and ex.status == "queued"
        assert run_async(s.fire_schedules()) == []  # the same tick never fires twice
    [sched] = run_async(store.list_schedules())
    assert sched["next_fire_at"] == datetime(2026, 3, 3, 2, 0)
    assert sched["last_fired_at"] == datetime(2026, 3, 2, 2, 0)


def test_ticks_missed_during_downtime_fire_once_on_start(store, tmp_path):
    client = Client(store)
    with freeze_time("2026-03-02 09:00:10", real_asyncio=True) as clock:
        run_async(
            client.add_schedule(
                "every5", chain_machine(tmp_path / "m.yml", ["add"]), cron="*/5 * * * *"
            )
        )
        clock.move_to("2026-03-02 09:27:00")  # no scheduler ran for 5 ticks
        fired = run_async(scheduler(store).fire_schedules())
    assert [(n, t) for n, t, _ in fired] == [("every5", datetime(2026, 3, 2, 9, 25))]
    assert len(run_async(store.list_executions())) == 1
    [sched] = run_async(store.list_schedules())
    assert sched["next_fire_at"] == datetime(2026, 3, 2, 9, 30)


def test_invalid_cron_is_refused_before_anything_is_written(store, tmp_path):
    with pytest.raises(UserError, match="invalid cron"):
        run_async(
            Client(store).add_schedule(
                "bad", chain_machine(tmp_path / "m.yml", ["add"]), cron="61 * * * *"
            )
        )
    assert run_async(store.list_schedules()) == []


# -------------------------------------------------------------- leadership


def test_one_leader_and_handover_after_the_lease_expires(store):
    ttl = store.settings.lease_ttl
    a, b = scheduler(store), scheduler(store)
    with freeze_time(T0, real_asyncio=True) as clock:
        assert run_async(a.check_leadership()) and not run_async(b.check_leadership())
        fence = a.fence
        clock.tick(ttl / 3)
        assert run_async(a.check_leadership()) and not run_async(b.check_leadership())
        clock.tick(ttl + 1)  # a stops renewing: it died
        assert run_async(b.check_leadership())
        assert b.fence == fence + 1
        assert not run_async(a.check_leadership())  # a comes back as standby
        assert run_async(store.leader("scheduler")) == (b.id, fence + 1)


def test_two_schedulers_never_double_fire_or_double_requeue(store, tmp_path):
    ttl = store.settings.lease_ttl
    client = Client(store)
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    a, b = scheduler(store), scheduler(store)
    with freeze_time("2026-03-02 01:59:00", real_asyncio=True) as clock:
        run_async(client.add_schedule("tick", machine, cron="* * * * *"))
        ex_id = submit(store, machine)
        run_async(store.claim("dead-worker", ["default"]))
        clock.move_to("2026-03-02 02:00:00")
        clock.tick(ttl + 1)

        async def both():
            import asyncio

            return await asyncio.gather(a.fire_schedules(), b.fire_schedules(), a.reap(), b.reap())

        fired_a, fired_b, reaped_a, reaped_b = run_async(both())
    assert len(fired_a) + len(fired_b) == 1
    assert [r for r in (reaped_a, reaped_b) if r is not None] != []
    requeued = [x for r in (reaped_a, reaped_b) if r for x in r["requeued"]]
    assert requeued == [ex_id]
    assert run_async(store.get(ex_id)).recoveries == 1
    # even a scheduler that skipped the leader check cannot fire a tick twice
    from orchestrator.cron import next_fire

    with freeze_time("2026-03-02 02:00:30", real_asyncio=True):
        assert run_async(store.fire_due_schedules(next_fire)) == []
    ticks = [e.id for e in run_async(store.list_executions()) if e.id.startswith("tick@")]
    assert len(ticks) == 1


# ----------------------------------------------------------------- scaling


def queue(**kw):
    base = {
        "queue": "q",
        "min_workers": 1,
        "max_workers": 4,
        "per_worker": 10,
        "last_scaled_at": None,
        "paused": False,
        "backlog": 0,
        "running": 0,
        "workers": [],
    }
    return base | kw


def workers_(*running: int):
    return [{"id": f"w{i}", "host": "h", "pid": i, "running": r} for i, r in enumerate(running)]


NOW = datetime(2026, 3, 2, 12, 0)


@pytest.mark.parametrize(
    "backlog, expected",
    [(0, 1), (1, 1), (10, 1), (11, 2), (35, 4), (1000, 4)],
)
def test_desired_workers_is_clamped_ceil_of_backlog(backlog, expected):
    assert desired_workers(backlog, 10, 1, 4) == expected


def test_scale_up_counts_workers_still_starting():
    d = decide(queue(backlog=40, workers=workers_(1)), pending=1, now=NOW, cooldown=5)
    assert (d.current, d.desired, d.spawn, d.drain) == (2, 4, 2, [])
    assert "backlog 40" in d.reason


def test_scale_down_drains_only_idle_workers():
    d = decide(queue(backlog=0, workers=workers_(1, 0, 1, 0)), pending=0, now=NOW, cooldown=5)
    assert d.drain == ["w1", "w3"] and d.spawn == 0 and d.desired == 2
    busy = decide(queue(backlog=0, workers=workers_(1, 1)), pending=0, now=NOW, cooldown=5)
    assert not busy.changes and "no idle worker" in busy.reason


def test_running_executions_count_toward_desired():
    """A long state keeps its worker wanted: with min 0 and no backlog, the busy
    worker is not surplus; and an idle worker beside busy ones is kept for the
    backlog they cannot take."""
    busy = decide(
        queue(min_workers=0, running=1, workers=workers_(1)), pending=0, now=NOW, cooldown=0
    )
    assert busy.desired == 1 and not busy.changes
    one_each = queue(min_workers=0, per_worker=1, backlog=1, running=2, workers=workers_(1, 1, 0))
    kept = decide(one_each, pending=0, now=NOW, cooldown=0)
    assert kept.desired == 3 and not kept.changes
    assert "running 2" in kept.reason


def test_the_snapshot_reads_running_from_claims_and_drains_only_idle_workers(store, tmp_path):
    """Claims are the truth, not the worker row's running count (which the next
    heartbeat would bring up to date): a worker that has just claimed is busy in
    the snapshot and refuses a drain; an idle one takes it."""
    for worker_id in ("busy", "idle"):
        run_async(
            store.register_worker(
                worker_id, host="h", pid=1, queue_names=["default"], concurrency=1
            )
        )
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    ids = [submit(store, machine) for _ in range(2)]
    [claim] = run_async(store.claim_many("busy", ["default"], ["effects"], limit=1))
    [snap] = run_async(store.scaling_snapshot())
    assert (snap["backlog"], snap["running"]) == (1, 1)
    assert {w["id"]: w["running"] for w in snap["workers"]} == {"busy": 1, "idle": 0}
    assert not run_async(store.drain_idle_worker("busy"))
    assert run_async(store.get_worker("busy")).status == "active"
    assert run_async(store.drain_idle_worker("idle"))
    assert run_async(store.get_worker("idle")).status == "draining"
    # a draining worker is no longer live: neither it nor what it runs is counted
    run_async(store.claim_many("idle", ["default"], ["effects"], limit=1))
    [snap] = run_async(store.scaling_snapshot())
    assert (snap["backlog"], snap["running"]) == (0, 1)
    assert [w["id"] for w in snap["workers"]] == ["busy"]
    assert claim.execution.id in ids


def test_cooldown_holds_decisions_then_lets_them_through():
    recent = queue(backlog=40, last_scaled_at=NOW - timedelta(seconds=3), workers=workers_(1))
    assert not decide(recent, pending=0, now=NOW, cooldown=5).changes
    later = decide(recent, pending=0, now=NOW + timedelta(seconds=3), cooldown=5)
    assert later.spawn == 3


def test_workers_lost_below_min_are_replaced_during_the_cooldown():
    recent = NOW - timedelta(seconds=1)
    lost_two = queue(min_workers=3, max_workers=3, last_scaled_at=recent, workers=workers_(1))
    assert decide(lost_two, pending=0, now=NOW, cooldown=5).spawn == 2
    at_min = queue(min_workers=1, backlog=40, last_scaled_at=recent, workers=workers_(1))
    assert not decide(at_min, pending=0, now=NOW, cooldown=5).changes


def test_paused_queue_and_policy_in_bounds_change_nothing():
    assert not decide(queue(backlog=99, paused=True), pending=0, now=NOW, cooldown=0).changes
    steady = decide(queue(backlog=15, workers=workers_(0, 0)), pending=0, now=NOW, cooldown=0)
    assert not steady.changes


def test_scale_policy_is_validated(store):
    client = Client(store)
    with pytest.raises(UserError, match="more than --max"):
        run_async(client.scale("default", min_workers=3, max_workers=2, create=True))
    with pytest.raises(UserError, match="negative"):
        run_async(client.scale("default", min_workers=-1, max_workers=2, create=True))
    with pytest.raises(UserError, match="--create"):
        run_async(client.scale("nope", min_workers=1, max_workers=2))
    assert not run_async(store.queue_exists("nope"))
    run_async(client.scale("nope", min_workers=1, max_workers=2, create=True))
    [snap] = run_async(store.scaling_snapshot())
    assert (snap["queue"], snap["min_workers"], snap["max_workers"]) == ("nope", 1, 2)


# ------------------------------------------------------------ cron overlap


def test_overlap_policy_decides_a_tick_by_the_last_run():
    from orchestrator.overlap import cancels, on_tick

    assert POLICIES == ("skip", "allow", "buffer_one", "cancel_other")
    assert [on_tick(p, running=False, buffered=False) for p in POLICIES] == ["fire"] * 4
    assert [on_tick(p, running=True, buffered=False) for p in POLICIES] == [
        "skip",
        "fire",
        "buffer",
        "buffer",
    ]
    assert [on_tick(p, running=True, buffered=True) for p in POLICIES] == [
        "skip",
        "fire",
        "skip",
        "skip",
    ]
    assert [cancels(p, running=True, buffered=True) for p in POLICIES] == [
        False,
        False,
        False,
        True,
    ]
    assert not cancels("cancel_other", running=False, buffered=True)


def finish_next(store: Store, status: str = "completed") -> str:
    claim = run_async(store.claim("w", ["default"]))
    run_async(store.finish(claim, status=status))
    return claim.execution.id


def every_minute(store: Store, tmp_path, **kw) -> None:
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    run_async(Client(store).add_schedule("often", machine, cron="* * * * *", **kw))


def ticks_of(store: Store) -> list[tuple[str, str]]:
    return sorted((e.id, e.status) for e in run_async(store.list_executions()))


def test_a_tick_while_the_last_run_is_unfinished_is_skipped_by_default(store, tmp_path, caplog):
    with freeze_time("2026-03-02 01:59:30", real_asyncio=True) as clock:
        every_minute(store, tmp_path)
        s = scheduler(store)
        clock.move_to("2026-03-02 02:00:00")
        assert [t for _, t, _ in run_async(s.fire_schedules())] == [datetime(2026, 3, 2, 2, 0)]
        clock.move_to("2026-03-02 02:01:00")  # the 02:00 run has not even started
        with caplog.at_level("INFO", logger="orchestrator.scheduler"):
            assert run_async(s.fire_schedules()) == []
        assert "schedule often skipped its tick 2026-03-02T02:01:00" in caplog.text
        assert "often@2026-03-02T02:00 is unfinished" in caplog.text
        [sched] = run_async(store.list_schedules())
        assert sched["overlap"] == "skip"
        assert sched["last_skipped_at"] == datetime(2026, 3, 2, 2, 1)
        assert sched["last_fired_at"] == datetime(2026, 3, 2, 2, 0)
        assert sched["next_fire_at"] == datetime(2026, 3, 2, 2, 2)
        clock.move_to("2026-03-02 02:05:00")  # still unfinished: the missed ticks too
        assert run_async(s.fire_schedules()) == []
        assert ticks_of(store) == [("often@2026-03-02T02:00", "queued")]
        finish_next(store, "failed")  # a failed run is finished too
        clock.move_to("2026-03-02 02:06:00")
        [(_, tick, ex)] = run_async(s.fire_schedules())
    assert tick == datetime(2026, 3, 2, 2, 6) and ex.id == "often@2026-03-02T02:06"
    assert ticks_of(store) == [
        ("often@2026-03-02T02:00", "failed"),
        ("often@2026-03-02T02:06", "queued"),
    ]


def test_overlap_allow_fires_every_tick(store, tmp_path):
    with freeze_time("2026-03-02 01:59:30", real_asyncio=True) as clock:
        every_minute(store, tmp_path, overlap="allow")
        s = scheduler(store)
        for minute in (0, 1, 2):
            clock.move_to(f"2026-03-02 02:0{minute}:00")
            assert len(run_async(s.fire_schedules())) == 1
    assert ticks_of(store) == [(f"often@2026-03-02T02:0{m}", "queued") for m in (0, 1, 2)]


def test_overlap_buffer_one_holds_one_tick_until_the_last_run_finishes(store, tmp_path):
    with freeze_time("2026-03-02 01:59:30", real_asyncio=True) as clock:
        every_minute(store, tmp_path, overlap="buffer_one")
        s = scheduler(store)
        clock.move_to("2026-03-02 02:00:00")
        assert len(run_async(s.fire_schedules())) == 1
        clock.move_to("2026-03-02 02:01:00")
        assert run_async(s.fire_schedules()) == []  # held
        clock.move_to("2026-03-02 02:02:00")
        assert run_async(s.fire_schedules()) == []  # one is held already: skipped
        [sched] = run_async(store.list_schedules())
        assert sched["buffered_at"] == datetime(2026, 3, 2, 2, 1)
        assert sched["last_skipped_at"] == datetime(2026, 3, 2, 2, 2)
        clock.move_to("2026-03-02 02:02:20")
        assert finish_next(store) == "often@2026-03-02T02:00"
        clock.move_to("2026-03-02 02:02:30")  # no tick due: the held one goes now
        [(_, tick, ex)] = run_async(s.fire_schedules())
        assert tick == datetime(2026, 3, 2, 2, 1) and ex.id == "often@2026-03-02T02:01"
        clock.move_to("2026-03-02 02:03:00")  # the 02:01 run is the last run now
        assert run_async(s.fire_schedules()) == []
        [sched] = run_async(store.list_schedules())
    assert sched["buffered_at"] == datetime(2026, 3, 2, 2, 3)
    assert sched["last_fired_at"] == datetime(2026, 3, 2, 2, 1)
    assert ticks_of(store) == [
        ("often@2026-03-02T02:00", "completed"),
        ("often@2026-03-02T02:01", "queued"),
    ]


def test_overlap_cancel_other_cancels_the_last_run_then_fires_the_tick(store, tmp_path, caplog):
    with freeze_time("2026-03-02 01:59:30", real_asyncio=True) as clock:
        every_minute(store, tmp_path, overlap="cancel_other")
        s = scheduler(store)
        clock.move_to("2026-03-02 02:00:00")
        assert len(run_async(s.fire_schedules())) == 1
        claim = run_async(store.claim("w", ["default"]))  # the 02:00 run is running
        clock.move_to("2026-03-02 02:01:00")
        with caplog.at_level("INFO", logger="orchestrator.scheduler"):
            [(_, tick, ex)] = run_async(s.fire_schedules())
        assert tick == datetime(2026, 3, 2, 2, 1) and ex.id == "often@2026-03-02T02:01"
        assert "schedule often cancelled its last run often@2026-03-02T02:00" in caplog.text
        [sched] = run_async(store.list_schedules())
    old = run_async(store.get("often@2026-03-02T02:00"))
    assert old.status == "cancelled" and "schedule often" in old.cancel_reason
    assert old.fence == claim.fence + 1  # its worker's next write is refused
    assert sched["buffered_at"] is None
    assert sched["last_fired_at"] == datetime(2026, 3, 2, 2, 1)
    assert ticks_of(store) == [
        ("often@2026-03-02T02:00", "cancelled"),
        ("often@2026-03-02T02:01", "queued"),
    ]


def test_an_unknown_overlap_policy_is_refused_before_anything_is_written(store, tmp_path):
    with pytest.raises(UserError, match="--overlap must be one of skip, allow, buffer_one"):
        every_minute(store, tmp_path, overlap="pile_up")
    assert run_async(store.list_schedules()) == []
