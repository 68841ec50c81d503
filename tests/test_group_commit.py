"""Group commit (store/group.py): the hot writes of one process's executions
share a transaction, and durability is unchanged.

Each execution's next state starts only once the transaction holding its own
``state_exit`` has committed; a commit that fails fails every write it carried,
and none of their executions advances. Faults are injected at the DBAPI
connection (tests/faults.py), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
import sqlalchemy as sa
from flatmachines import HooksRegistry, MachineHooks

from orchestrator.client import Client
from orchestrator.clock import utcnow
from orchestrator.errors import LeaseLost, StoreUnavailable
from orchestrator.settings import Settings
from orchestrator.store import CheckpointRow, Claim, Store
from orchestrator.worker import Worker, WorkerOptions

from .conftest import run_async, write_machine
from .faults import StatementFaults

N = 4
MERGED_SQLITE = "UPDATE executions SET updated_at = ?1,"
HELD_SQLITE = "SELECT json_group_array(w.key) FROM json_each(?1)"


@pytest.fixture
def faults(monkeypatch) -> StatementFaults:
    return StatementFaults().install(monkeypatch)


def _machine(path):
    step = {"hooks": "gc"}
    return write_machine(
        path,
        {
            "spec": "flatmachine",
            "spec_version": "4.2.1",
            "data": {
                "name": "grouped",
                "context": {"acc": 0},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "s1"}]},
                    "s1": {**step, "action": "together", "transitions": [{"to": "s2"}]},
                    "s2": {**step, "action": "after", "transitions": [{"to": "done"}]},
                    "done": {"type": "final", "output": {"acc": "context.acc"}},
                },
            },
        },
    )


class GroupHooks(MachineHooks):
    """s1: the executions wait for each other, so that their state_exits reach
    the store together (and the first time, arm the fault: the next commit
    fails). s2: asks the store, on a connection of its own, whether s1's
    state_exit is durable; if not, its next state started too soon."""

    runs: Counter = Counter()
    violations: list[str] = []
    engine: sa.Engine | None = None
    faults: StatementFaults | None = None
    arrived = 0
    together: asyncio.Event | None = None
    armed = False

    async def on_action(self, state_name, action_name, context):
        cls = type(self)
        ex_id = context["machine"]["execution_id"]
        cls.runs[(ex_id, state_name)] += 1
        if action_name == "together":
            if cls.together is None:
                cls.together = asyncio.Event()
            cls.arrived += 1
            if cls.arrived == N:
                if not cls.armed:  # the commit of these state_exits fails
                    cls.armed = True
                    cls.faults.arm([1], match="^COMMIT$")
                cls.together.set()
            await asyncio.wait_for(cls.together.wait(), 60)
        else:
            with cls.engine.connect() as conn:
                durable = conn.scalar(
                    sa.text(
                        "SELECT count(*) FROM checkpoints WHERE execution_id = :e"
                        " AND state = 's1' AND event = 'state_exit'"
                    ),
                    {"e": ex_id},
                )
            if not durable:
                cls.violations.append(f"{ex_id} started s2 before s1's state_exit was durable")
        context["acc"] = int(context.get("acc") or 0) + 1
        return context


def _engine(db_url: str) -> sa.Engine:
    return sa.create_engine(sa.make_url(db_url), poolclass=sa.NullPool)


def test_a_failed_group_commit_advances_none_of_its_executions(db_url, tmp_path, faults):
    settings = Settings(database_url=db_url, lease_ttl=30, poll_interval=0.05, store_patience=0)
    machine = _machine(tmp_path / "grouped.yml")
    registry = HooksRegistry()
    registry.register("gc", GroupHooks)
    GroupHooks.runs, GroupHooks.violations = Counter(), []
    GroupHooks.engine, GroupHooks.faults = _engine(db_url), faults
    GroupHooks.arrived, GroupHooks.together, GroupHooks.armed = 0, None, False

    async def run() -> tuple[int, int]:
        async with await Client.open(settings) as client:
            await client.submit_many(machine, [{} for _ in range(N)])
        store = await Store.open(settings)
        try:
            options = WorkerOptions(concurrency=N, burst=True)
            await asyncio.wait_for(Worker(store, registry, options, settings).run(), 120)
            return store.db.group.commits, store.db.group.writes
        finally:
            await store.close()

    try:
        commits, writes = run_async(run())
        faults.disarm()
        assert [s for _, s in faults.failed] == ["COMMIT"]

        store = run_async(Store.open(settings))
        try:
            rows = run_async(store.list_executions(limit=100))
            histories = {ex.id: run_async(store.history(ex.id)) for ex in rows}
        finally:
            run_async(store.close())
    finally:
        GroupHooks.engine.dispose()

    # every execution completed, once, with s1 and s2 committed once each
    assert len(rows) == N
    for ex in rows:
        assert (ex.status, ex.attempt, ex.output) == ("completed", 1, {"acc": 2}), ex
        exits = Counter(h.state for h in histories[ex.id] if h.event == "state_exit")
        assert exits == Counter({"start": 1, "s1": 1, "s2": 1, "done": 1}), (ex.id, exits)
    # no s2 ever began before its own s1 state_exit was durable ...
    assert GroupHooks.violations == []
    assert all(GroupHooks.runs[(ex.id, "s2")] == 1 for ex in rows)
    # ... and the executions whose state_exit was in the failed commit did not
    # advance: they ran s1 again after resuming from their last checkpoint
    again = [ex.id for ex in rows if GroupHooks.runs[(ex.id, "s1")] > 1]
    assert again, GroupHooks.runs
    assert all(GroupHooks.runs[(ex.id, "s1")] <= 2 for ex in rows)
    # the writes of several executions shared commits
    assert writes > commits > 0, (writes, commits)


def _claimed(store: Store, settings: Settings, path, n: int):
    async def go():
        async with await Client.open(settings) as client:
            await client.submit_many(path, [{} for _ in range(n)])
        claims = await store.claim_many("w-1", ["default"], limit=n)
        assert len(claims) == n
        return claims

    return run_async(go())


def _exit_row(claim) -> CheckpointRow:
    ex_id = claim.execution.id
    return CheckpointRow(ex_id, f"{ex_id}/step_1", 1, "state_exit", "s1", b'{"step": 1}')


def _exits(store: Store, ex_id: str) -> int:
    return sum(h.event == "state_exit" for h in run_async(store.history(ex_id)))


@pytest.mark.parametrize("lost_reply", [False, True], ids=["not-committed", "committed"])
def test_writes_that_share_a_commit_share_its_fate(db_url, tmp_path, faults, lost_reply):
    """Concurrent saves: the first commits at once, on its own; the others,
    which came while it was in flight, go together in the next transaction.
    When that commit fails, every save in it raises (uncertain: the caller reads
    before it assumes) and none returns as if it were durable."""
    settings = Settings(database_url=db_url, store_patience=0)
    store = run_async(Store.open(settings))
    try:
        claims = _claimed(store, settings, _machine(tmp_path / "m.yml"), N)

        async def save_all():
            return await asyncio.gather(
                *(
                    store.save_checkpoints(
                        owner_id=c.execution.id, fence=c.fence, rows=[_exit_row(c)]
                    )
                    for c in claims
                ),
                return_exceptions=True,
            )

        faults.arm([2], match="^COMMIT$", lost_reply=lost_reply)  # the shared commit
        results = run_async(save_all())
        faults.disarm()
        assert faults.seen.count("COMMIT") == 2 and len(faults.failed) == 1
        assert results[0] is None
        assert all(isinstance(r, StoreUnavailable) and r.uncertain for r in results[1:]), results
        # all of them or none of them: one transaction
        assert _exits(store, claims[0].execution.id) == 1
        assert {_exits(store, c.execution.id) for c in claims[1:]} == {1 if lost_reply else 0}
    finally:
        run_async(store.close())


def test_a_write_refused_by_its_fence_fails_alone(db_url, tmp_path):
    """A save whose claim moved on raises LeaseLost; the others in its batch
    commit as if it had not been there."""
    settings = Settings(database_url=db_url, store_patience=0)
    store = run_async(Store.open(settings))
    try:
        claims = _claimed(store, settings, _machine(tmp_path / "m.yml"), N)
        stale = claims[1]

        async def save_all():
            return await asyncio.gather(
                *(
                    store.save_checkpoints(
                        owner_id=c.execution.id,
                        fence=c.fence - 1 if c is stale else c.fence,
                        rows=[_exit_row(c)],
                    )
                    for c in claims
                ),
                return_exceptions=True,
            )

        results = run_async(save_all())
        assert isinstance(results[1], LeaseLost)
        assert [r for i, r in enumerate(results) if i != 1] == [None] * (N - 1)
        assert [_exits(store, c.execution.id) for c in claims] == [1, 0, 1, 1]
    finally:
        run_async(store.close())


def test_a_held_batch_is_one_fenced_update(db_url, tmp_path, faults):
    """Many checkpoint commits and completions whose fences hold: one update
    statement for all of them (PostgreSQL: with their rows), and on SQLite
    their rows in a few inserts, not two statements per write. Each lands."""
    settings = Settings(database_url=db_url, store_patience=0)
    store = run_async(Store.open(settings))
    try:
        run_async(store.register_worker("w-1", host="h", pid=1, queue_names=["default"]))
        claims = _claimed(store, settings, _machine(tmp_path / "m.yml"), 40)
        first, *rest = claims

        async def all_at_once():
            def save(c):
                rows = [_exit_row(c)] * (1 + len(c.execution.id) % 3)  # 1-3 rows each
                return store.save_checkpoints(owner_id=c.execution.id, fence=c.fence, rows=rows)

            def complete(c):
                return store.finish(
                    c, status="completed", output={"by": c.execution.id}, checkpoints=[]
                )

            return await asyncio.gather(
                save(first),  # commits at once; the rest wait for it, then go together
                *(save(c) if i % 4 else complete(c) for i, c in enumerate(rest)),
            )

        faults.arm()
        assert run_async(all_at_once()) == [None] * len(claims)
        faults.disarm()
        seen = faults.seen
        if store.db.dialect.name == "postgresql":
            assert sum(s.startswith("WITH w AS") for s in seen) == 1, seen
        else:
            assert sum(s.startswith(MERGED_SQLITE) for s in seen) == 1, seen
            updates = [s for s in seen if s.startswith("UPDATE executions")]
            inserts = [s for s in seen if s.startswith("INSERT INTO checkpoints")]
            assert len(updates) == 2 and len(inserts) <= 2 + 7, seen  # first's own, then one
        done = [c for i, c in enumerate(rest) if not i % 4]
        for c in claims:
            ex = run_async(store.get(c.execution.id))
            if c in done:
                assert ex.status == "completed" and ex.output == {"by": c.execution.id}
                assert ex.lease_until is None and ex.finished_at is not None
                assert run_async(store.history(c.execution.id)) == []
            else:
                assert ex.status == "running" and (ex.step, ex.current_state) == (1, "s1")
                assert _exits(store, c.execution.id) == 1 + len(c.execution.id) % 3
        (worker,) = [w for w in run_async(store.list_workers()) if w.id == "w-1"]
        assert worker.completed == len(done)
    finally:
        run_async(store.close())


def test_completions_and_checkpoints_in_one_batch(db_url, tmp_path, faults):
    """A batch that mixes completions (with their last checkpoints) and
    checkpoint commits, one of them stale: on PostgreSQL it is one statement.
    Each held write lands whole (rows, step and state, the outcome, the
    worker's count); the stale one writes nothing and raises LeaseLost."""
    settings = Settings(database_url=db_url, store_patience=0)
    store = run_async(Store.open(settings))
    try:
        run_async(store.register_worker("w-1", host="h", pid=1, queue_names=["default"]))
        claims = _claimed(store, settings, _machine(tmp_path / "m.yml"), 5)
        first, done, stale_done, saving, done_bare = claims

        def end_rows(c):
            ex_id = c.execution.id
            return [
                CheckpointRow(ex_id, f"{ex_id}/step_2_exit", 2, "state_exit", "s2", b'{"s": 2}'),
                CheckpointRow(ex_id, f"{ex_id}/step_2_end", 2, "machine_end", "end", b"{}"),
            ]

        async def all_at_once():
            def save(c):
                return store.save_checkpoints(
                    owner_id=c.execution.id, fence=c.fence, rows=[_exit_row(c)]
                )

            def complete(c, fence, rows):
                claim = Claim(c.execution, c.worker_id, fence, False)
                return store.finish(
                    claim, status="completed", output={"by": c.execution.id}, checkpoints=rows
                )

            return await asyncio.gather(
                save(first),  # commits at once; the rest wait for it, then go together
                complete(done, done.fence, end_rows(done)),
                complete(stale_done, stale_done.fence - 1, end_rows(stale_done)),
                save(saving),
                complete(done_bare, done_bare.fence, []),
                return_exceptions=True,
            )

        faults.arm()
        results = run_async(all_at_once())
        faults.disarm()
        assert results[:2] == [None, None] and results[3:] == [None, None], results
        assert isinstance(results[2], LeaseLost)
        seen = faults.seen
        if store.db.dialect.name == "postgresql":
            assert sum(s.startswith("WITH w AS") for s in seen) == 1, seen
        else:
            # tried as one statement; a fence moved on, so again, telling first
            # who holds what: the four still share one commit (not four)
            assert sum(s.startswith(MERGED_SQLITE) for s in seen) == 2, seen
            assert sum(s.startswith(HELD_SQLITE) for s in seen) == 1, seen
            assert seen.count("COMMIT") == 2, seen  # first's own, then the batch's

        def row(c):
            return run_async(store.get(c.execution.id))

        for c in (done, done_bare):
            ex = row(c)
            assert ex.status == "completed" and ex.output == {"by": c.execution.id}
            assert ex.lease_until is None and ex.finished_at is not None and ex.error is None
        assert (row(done).step, row(done).current_state) == (2, "s2")
        assert [h.event for h in run_async(store.history(done.execution.id))] == [
            "state_exit",
            "machine_end",
        ]
        ex = row(stale_done)
        assert ex.status == "running" and ex.output is None and ex.finished_at is None
        assert run_async(store.history(stale_done.execution.id)) == []
        ex = row(saving)
        assert ex.status == "running" and (ex.step, ex.current_state) == (1, "s1")
        assert _exits(store, saving.execution.id) == 1
        (worker,) = [w for w in run_async(store.list_workers()) if w.id == "w-1"]
        assert worker.completed == 2
    finally:
        run_async(store.close())


def test_fenced_writes_reach_their_rows_by_primary_key_on_a_new_table(db_url, tmp_path):
    """A new table has no planner statistics (and statistics taken while every
    row was queued make `status = 'running'` look rare): a batch's fenced write
    and the lease renewal must still reach their rows through the primary key,
    not walk the running rows through a status index per row or per batch."""
    from orchestrator.store import fenced
    from orchestrator.store.executions import lease_renewal

    settings = Settings(database_url=db_url)
    store = run_async(Store.open(settings))
    try:
        run_async(store.register_worker("w-1", host="h", pid=1, queue_names=["default"]))
        claims = _claimed(store, settings, _machine(tmp_path / "m.yml"), 300)
        batch = [
            fenced.FencedWrite(store.db.driver, c.execution.id, c.fence, [_exit_row(c)])
            for c in claims[:50]
        ]
        renewal = lease_renewal("w-1", [c.execution.id for c in claims[:50]], utcnow())

        def plans(conn):
            cur = store.db.cursor(conn)
            out = {}
            if store.db.dialect.name == "postgresql":
                # never analyzed: what a fresh install plans its first burst with
                assert (
                    conn.exec_driver_sql(
                        "SELECT reltuples FROM pg_class WHERE oid = 'executions'::regclass"
                    ).scalar()
                    == -1
                )

                class Explain:  # the batch's own statement and parameters, explained
                    def execute(self, sql, params=None):
                        cur.execute("EXPLAIN " + sql, params)
                        out["batch"] = "\n".join(r[0] for r in cur.fetchall())
                        cur.execute("SELECT 1 WHERE false")

                    def __getattr__(self, name):
                        return getattr(cur, name)

                assert fenced.mergeable(store.db.driver, batch)
                fenced.run_merged(Explain(), store.db.driver, batch)
                explain = "EXPLAIN "
            else:
                held = fenced.RAW_HELD.replace("?", "'x'", 1).replace("?", "1")
                cur.execute(f"EXPLAIN QUERY PLAN UPDATE executions SET step = 1 {held}")
                out["single"] = "\n".join(str(r[-1]) for r in cur.fetchall())
                owners = json.dumps([[w.owner_id, w.fence, 1, "s1", 1, 1, 0, None] for w in batch])
                now = store.db.driver.time(utcnow())
                cur.execute("EXPLAIN QUERY PLAN " + fenced._SQLITE_MERGED, (now, owners))
                out["batch"] = "\n".join(str(r[-1]) for r in cur.fetchall())
                cur.execute("EXPLAIN QUERY PLAN " + fenced._SQLITE_HELD, (owners,))
                out["held"] = "\n".join(str(r[-1]) for r in cur.fetchall())
                explain = "EXPLAIN QUERY PLAN "
            text = renewal.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
            out["renewal"] = "\n".join(
                str(r[-1]) for r in conn.exec_driver_sql(explain + str(text))
            )
            return out  # explained, nothing run

        found = run_async(store.db.read(plans))
    finally:
        run_async(store.close())
    if db_url.startswith("postgresql"):
        update = found["batch"].split("CTE ins")[0]  # the fenced update of the rows
        assert "Update on executions e" in update, found["batch"]
        assert "ix_executions" not in update, found["batch"]  # no status index walk
        # the locking subquery runs once, then each row it locked by primary key
        assert found["renewal"].count("LockRows") == 1, found["renewal"]
        assert "SubPlan" not in found["renewal"], found["renewal"]
        assert "Index Scan using pk_executions on executions " in found["renewal"]
    else:
        assert "USING INDEX sqlite_autoindex_executions_1 (id=?)" in found["single"], found
        # the batch's owners (the JSON) outside, each found by primary key
        outer, inner = found["batch"].splitlines()
        assert outer.startswith("SCAN w VIRTUAL TABLE"), found
        assert inner == "SEARCH executions USING INDEX sqlite_autoindex_executions_1 (id=?)"
        # and so the read that tells, in a batch with a stale fence, who holds what
        outer, inner = found["held"].splitlines()
        assert outer.startswith("SCAN w VIRTUAL TABLE"), found
        assert inner == "SEARCH executions USING INDEX sqlite_autoindex_executions_1 (id=?)"
        outer, *rest = found["renewal"].splitlines()
        assert "sqlite_autoindex_executions_1 (id=?)" in outer, found
        assert "LIST SUBQUERY" in found["renewal"] and "CORRELATED" not in found["renewal"]
