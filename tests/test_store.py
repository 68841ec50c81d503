"""The store's concurrency protocol: claim, lease, fence, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from freezegun import freeze_time

from orchestrator.clock import lease_deadline, renew_interval, utcnow
from orchestrator.errors import LeaseLost
from orchestrator.store import NewExecution, Store

from .conftest import run_async

HASH = "c" * 64


def seed(store: Store, *items: NewExecution) -> None:
    async def go():
        await store.put_config(HASH, "m", "spec: flatmachine")
        return await store.submit(list(items))

    return run_async(go())


def new(id: str, **kw) -> NewExecution:
    return NewExecution(id=id, machine="m", config_hash=HASH, input={"id": id}, **kw)


def save(store: Store, claim, key_suffix: str = "step_000001_state_enter.json", fence=None):
    ex_id = claim.execution.id
    return run_async(
        store.save_checkpoint(
            owner_id=ex_id,
            fence=claim.fence if fence is None else fence,
            execution_id=ex_id,
            key=f"{ex_id}/{key_suffix}",
            step=1,
            event="state_enter",
            state="s1",
            snapshot=b'{"step": 1}',
        )
    )


def test_lease_arithmetic_renews_three_times_per_ttl():
    now = utcnow()
    assert lease_deadline(now, 30) - now == timedelta(seconds=30)
    assert renew_interval(30) == 10
    assert renew_interval(2) * 3 == pytest.approx(2)


def test_submit_same_id_returns_existing_execution(store):
    [(first, created1)] = seed(store, new("job-1", priority=1))
    [(second, created2)] = run_async(
        store.submit([NewExecution(id="job-1", machine="m", config_hash=HASH, input={"other": 1})])
    )
    assert created1 and not created2
    assert second.input == {"id": "job-1"} and second.created_at == first.created_at
    assert len(run_async(store.list_executions())) == 1


def test_claim_takes_highest_priority_then_oldest(store):
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        for id, prio in [("low", 0), ("high-old", 5), ("mid", 2)]:
            seed(store, new(id, priority=prio))
            clock.tick(1)
        seed(store, new("high-new", priority=5))
        order = []
        while claim := run_async(store.claim("w", ["default"])):
            order.append(claim.execution.id)
    assert order == ["high-old", "high-new", "mid", "low"]


def test_claim_skips_other_queues_and_not_yet_due(store):
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        seed(
            store,
            new("other", queue="other"),
            new("later", not_before=utcnow() + timedelta(seconds=60)),
        )
        assert run_async(store.claim("w", ["default"])) is None
        clock.tick(61)
        claim = run_async(store.claim("w", ["default"]))
    assert claim.execution.id == "later"
    assert run_async(store.claim("w", ["other"])).execution.id == "other"


def test_claim_bumps_fence_and_sets_lease(store):
    seed(store, new("a"))
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True):
        claim = run_async(store.claim("w1", ["default"]))
        assert claim.fence == 1 and not claim.recovered
        ex = run_async(store.get("a"))
        assert ex.status == "running" and ex.worker_id == "w1"
        assert ex.lease_until == utcnow() + timedelta(seconds=store.settings.lease_ttl)


def test_expired_lease_is_claimed_again_with_new_fence(store):
    ttl = store.settings.lease_ttl
    seed(store, new("a"))
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        first = run_async(store.claim("w1", ["default"]))
        clock.tick(ttl - 1)
        assert run_async(store.claim("w2", ["default"])) is None  # still leased
        clock.tick(2)
        second = run_async(store.claim("w2", ["default"]))
    assert second.execution.id == "a" and second.recovered
    assert second.fence == first.fence + 1
    assert second.execution.recoveries == 1 and second.execution.worker_id == "w2"


def test_renewal_keeps_the_lease_alive(store):
    ttl = store.settings.lease_ttl
    seed(store, new("a"))
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        claim = run_async(store.claim("w1", ["default"]))
        run_async(
            store.register_worker("w1", host="h", pid=1, queue_names=["default"], concurrency=1)
        )
        for _ in range(6):  # two TTLs, renewing every ttl/3
            clock.tick(renew_interval(ttl))
            lost, status = run_async(store.renew_leases("w1", {"a": claim.fence}))
            assert lost == set() and status == "active"
        assert run_async(store.claim("w2", ["default"])) is None


def test_stale_fence_write_is_refused_and_changes_nothing(store):
    ttl = store.settings.lease_ttl
    seed(store, new("a"))
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        old = run_async(store.claim("w1", ["default"]))
        save(store, old)
        clock.tick(ttl + 1)
        new_owner = run_async(store.claim("w2", ["default"]))
        save(store, new_owner, "step_000002_state_enter.json")
        before = (run_async(store.get("a")), run_async(store.history("a")))
        with pytest.raises(LeaseLost):
            save(store, old, "step_000003_state_exit.json")
        with pytest.raises(LeaseLost):
            run_async(store.finish(old, status="completed", output={"zombie": True}))
        assert run_async(store.release(old)) is False
        lost, _ = run_async(store.renew_leases("w1", {"a": old.fence}))
        assert lost == {"a"}
        after = (run_async(store.get("a")), run_async(store.history("a")))
    assert after == before
    run_async(store.finish(new_owner, status="completed", output={"owner": "w2"}))
    assert run_async(store.get("a")).output == {"owner": "w2"}


def test_poison_execution_fails_after_recovery_cap(db_url):
    from orchestrator.settings import Settings

    store = run_async(Store.open(Settings(database_url=db_url, lease_ttl=10, max_recoveries=2)))
    try:
        seed(store, new("poison"))
        with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
            fences = []
            for _ in range(3):
                claim = run_async(store.claim("w", ["default"]))
                fences.append(claim.fence) if claim else None
                clock.tick(11)
            assert len(fences) == 3  # the first claim and two recoveries
            assert run_async(store.claim("w", ["default"])) is None
        ex = run_async(store.get("poison"))
        assert ex.status == "failed" and "crashed its worker 3 times" in ex.error
    finally:
        run_async(store.close())


def test_concurrent_claims_in_one_process_never_share_a_row(store):
    seed(store, *[new(f"e{i}") for i in range(40)])

    async def claimer(name):
        got = []
        while claim := await store.claim(name, ["default"]):
            got.append(claim.execution.id)
        return got

    async def race():
        return await asyncio.gather(*(claimer(f"w{i}") for i in range(4)))

    results = run_async(race())
    flat = [x for r in results for x in r]
    assert sorted(flat) == sorted(f"e{i}" for i in range(40))
    assert len(set(flat)) == 40


def test_a_claim_of_several_by_hooks_takes_the_best_it_can_run(store):
    # A worker with hooks claims through the needs it can run: with one need,
    # the best rows are chosen and taken in one statement; with several, each
    # need's best are merged. Either way: best first (priority, then age), no
    # more than asked, and nothing that needs a hook the worker lacks.
    async def configs():
        await store.put_config("h-a", "a", "spec: flatmachine", needs="alpha")
        await store.put_config("h-ab", "ab", "spec: flatmachine", needs="alpha,beta")
        await store.put_config("h-c", "c", "spec: flatmachine", needs="gamma")

    run_async(configs())

    def job(id, config_hash, needs, priority=0):
        return NewExecution(
            id=id, machine=id, config_hash=config_hash, input={}, priority=priority, needs=needs
        )

    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        for item in [
            job("a-old", "h-a", "alpha"),
            job("c-top", "h-c", "gamma", priority=9),
            job("ab-mid", "h-ab", "alpha,beta", priority=2),
            job("a-new", "h-a", "alpha"),
            job("a-top", "h-a", "alpha", priority=5),
            job("ab-old", "h-ab", "alpha,beta"),
        ]:
            run_async(store.submit([item]))
            clock.tick(1)

        def claim(hooks, limit):
            claims = run_async(store.claim_many("w", ["default"], hooks, limit=limit))
            for c in claims:
                assert c.fence == 1 and not c.recovered and c.execution.status == "running"
            return [c.execution.id for c in claims]

        assert claim(["alpha"], 2) == ["a-top", "a-old"]  # one need
        assert claim(["alpha", "beta"], 3) == ["ab-mid", "a-new", "ab-old"]  # two, merged
        assert claim(["alpha", "beta"], 3) == []
    assert run_async(store.get("c-top")).status == "queued"  # nobody here runs gamma


@pytest.mark.parametrize("hooks", [None, ["alpha"], ["alpha", "beta"]], ids=["any", "one", "two"])
def test_a_claim_of_several_hands_back_the_rows_as_stored(store, hooks):
    # A claim of several reads its rows back its own way on SQLite (one JSON
    # value, see executions.py): each claimed execution must equal the row as
    # the store reads it (every column, with its type), best first.
    run_async(store.put_config("h-a", "a", "spec: flatmachine", needs="alpha"))
    odd_input = {"text": 'é "quoted" \u2028', "n": [1, 2.5, None, True], "deep": {"x": {}}}
    with freeze_time("2026-01-01 00:00:00.250000", real_asyncio=True) as clock:
        for i in range(6):
            item = NewExecution(
                id=f"ex-{i}",
                machine="a",
                config_hash="h-a",
                input={**odd_input, "i": i},
                priority=i % 3,
                max_attempts=3,
                retry_backoff=1.5,
                retry_backoff_max=60.0,
                needs="alpha",
                parent_id="parent" if i % 2 else None,
                not_before=utcnow() - timedelta(seconds=5) if i == 4 else None,
            )
            run_async(store.submit([item]))
            clock.tick(0.5)
    claims = run_async(store.claim_many("w", ["default"], hooks, limit=4))
    assert [c.execution.id for c in claims] == ["ex-2", "ex-5", "ex-1", "ex-4"]
    for c in claims:
        stored = run_async(store.get(c.execution.id))
        assert c.execution == stored and c.fence == stored.fence == 1
        assert type(c.execution.started_at) is type(stored.started_at)
        assert c.execution.input["text"] == odd_input["text"]
