"""A store outage never fails a workflow.

The store's errors (connection refused, reset, shutting down, locked past its
retries, read-only) are not the machine's: they cost no attempt, fail nothing,
and the execution resumes from its last committed checkpoint once the store
answers. Faults are injected at the DBAPI connection (tests/faults.py), so the
real engine, retry loop, runner and worker meet them as they would a real
outage; the real outages below cut a TCP forwarder in front of PostgreSQL and
hold a SQLite file's lock from another process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from flatmachines import HooksRegistry, MachineHooks
from sqlalchemy import exc as sa_exc

from orchestrator.client import Client
from orchestrator.errors import StoreUnavailable
from orchestrator.settings import Settings
from orchestrator.store import Store
from orchestrator.store.engine import masked, run_transaction
from orchestrator.store.outage import classify, outages
from orchestrator.worker import Worker, WorkerOptions

from .conftest import chain_machine, run_async, wait_until, write_machine
from .faults import StatementFaults, TcpCut

# ------------------------------------------------------------ classification


@pytest.mark.parametrize(
    "error, kind",
    [
        (
            psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
            "unavailable",
        ),
        (psycopg.errors.CannotConnectNow("the database system is starting up"), "unavailable"),
        (
            psycopg.OperationalError(
                "connection failed: FATAL: the database system is shutting down"
            ),
            "unavailable",
        ),
        (psycopg.OperationalError("connection failed: Connection refused"), "unavailable"),
        (psycopg.InterfaceError("the connection is closed"), "unavailable"),
        (
            psycopg.errors.ReadOnlySqlTransaction(
                "cannot execute INSERT in a read-only transaction"
            ),
            "unavailable",
        ),
        (psycopg.errors.TooManyConnections("sorry, too many clients already"), "unavailable"),
        (psycopg.errors.SerializationFailure("could not serialize access"), "contention"),
        (psycopg.errors.DeadlockDetected("deadlock detected"), "contention"),
        (
            psycopg.OperationalError('FATAL: password authentication failed for user "x"'),
            None,
        ),
        (psycopg.OperationalError('FATAL: database "nope" does not exist'), None),
        (psycopg.errors.UndefinedTable('relation "nowhere" does not exist'), None),
        (psycopg.errors.UniqueViolation("duplicate key"), None),
        (sqlite3.OperationalError("database is locked"), "contention"),
        (sqlite3.OperationalError("disk I/O error"), "unavailable"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "unavailable"),
        (sqlite3.OperationalError("no such table: nowhere"), None),
        (sqlite3.IntegrityError("UNIQUE constraint failed"), None),
        (sa_exc.TimeoutError("QueuePool limit of size 8 overflow 0 reached"), "unavailable"),
        (RuntimeError("the workflow failed on purpose"), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_one_classification_of_store_errors_for_both_dialects(error, kind):
    assert classify(error) == kind
    if isinstance(error, psycopg.Error | sqlite3.Error):
        # as SQLAlchemy hands a driver's error on, wrapped
        assert classify(sa_exc.OperationalError("SELECT 1", {}, error)) == kind


# ------------------------------------------------------- the transaction loop


def _open(settings: Settings, **kw) -> Store:
    return run_async(Store.open(settings.model_copy(update=kw)))


def _bump(store: Store):
    def tx(cur):
        cur.execute(store.driver.sql("UPDATE queues SET per_worker = per_worker + 1"))

    return tx


def _per_worker(store: Store) -> int:
    return run_async(store.queue_stats())[0]["per_worker"]


@pytest.fixture
def faults(monkeypatch) -> StatementFaults:
    return StatementFaults().install(monkeypatch)


def test_a_statement_that_fails_before_commit_runs_again_from_the_start(settings, faults):
    store = _open(settings, store_patience=5)
    try:
        run_async(store.set_queue_policy("q", min_workers=0, max_workers=1, per_worker=1))
        for path in ("driver", "core"):
            faults.arm([1], match="UPDATE queues")  # inside the transaction
            if path == "driver":
                run_async(store.db.call(lambda: store.driver.run(_bump(store), write=True)))
            else:

                def core(conn):
                    conn.execute(sa.text("UPDATE queues SET per_worker = per_worker + 1"))

                run_async(store.db.write(core))
            faults.disarm()
            assert len(faults.failed) == 1
        # each bump counted once: the failed attempts rolled back
        assert _per_worker(store) == 3
    finally:
        run_async(store.close())


@pytest.mark.parametrize("lost_reply", [False, True], ids=["not-committed", "committed"])
def test_a_commit_that_fails_is_not_run_again_and_says_it_is_uncertain(
    settings, faults, lost_reply
):
    store = _open(settings, store_patience=5)
    try:
        run_async(store.set_queue_policy("q", min_workers=0, max_workers=1, per_worker=1))
        faults.arm([1], match="^COMMIT$", lost_reply=lost_reply)
        with pytest.raises(StoreUnavailable) as caught:
            run_async(store.db.call(lambda: store.driver.run(_bump(store), write=True)))
        faults.disarm()
        assert caught.value.uncertain
        assert "cannot reach database" in str(caught.value)
        # exactly once or not at all: never twice
        assert _per_worker(store) == (2 if lost_reply else 1)
    finally:
        run_async(store.close())


def test_a_transaction_begun_before_the_outage_does_not_say_the_store_is_back(store, caplog):
    """One thread's connection is reset and it says the store is away; another
    thread's transaction, begun before, commits a moment later (its answer
    came before the cut). That proves nothing: one line when the store went,
    and one when a transaction begun since has answered."""
    engine = store.db.engine
    where = masked(engine.url)
    inside, finish = threading.Event(), threading.Event()

    def slow(conn):
        conn.execute(sa.text("SELECT 1"))
        inside.set()
        finish.wait(30)

    caplog.set_level(logging.WARNING, logger="orchestrator.store")
    before = threading.Thread(
        target=run_transaction, args=(engine, slow), kwargs=dict(write=False, patience=5)
    )
    before.start()
    try:
        assert inside.wait(30)
        outages.down(where, OSError("connection reset by peer"))  # another thread's
    finally:
        finish.set()
        before.join(30)
    assert outages.is_down(where), "a transaction begun before the outage said it was over"
    run_transaction(engine, lambda conn: conn.execute(sa.text("SELECT 1")), write=False, patience=5)
    assert not outages.is_down(where)
    lines = [r.getMessage() for r in caplog.records if where in r.getMessage()]
    assert [line.split(where)[1].split(" (")[0].split(" after")[0] for line in lines] == [
        " is not answering",
        " is answering again",
    ], lines


def test_patience_bounds_the_wait_and_other_errors_pass_at_once(settings, faults):
    store = _open(settings, store_patience=0)
    try:
        faults.arm([1])
        with pytest.raises(StoreUnavailable) as caught:
            run_async(store.queue_stats())
        faults.disarm()
        assert not caught.value.uncertain
        assert "cannot reach database" in str(caught.value)
        assert "check --db" in str(caught.value)

        calls = []

        def broken(conn):
            calls.append(1)
            conn.execute(sa.text("SELECT * FROM nowhere"))

        with pytest.raises(sa_exc.DBAPIError):
            run_async(store.db.read(broken))
        assert calls == [1]
    finally:
        run_async(store.close())


# ------------------------------------------------- faults across a whole run

CHILD = {
    "spec": "flatmachine",
    "spec_version": "4.2.1",
    "data": {
        "name": "inline-child",
        "context": {"acc": "input.acc"},
        "states": {
            "start": {"type": "initial", "transitions": [{"to": "work"}]},
            "work": {"hooks": "guarded", "action": "add", "transitions": [{"to": "done"}]},
            "done": {"type": "final", "output": {"acc": "context.acc"}},
        },
    },
}


def fault_machine(path: Path) -> Path:
    """s1 add → s2 slow add → s3 an inline child (on_error: oops) → s4 add → done.

    acc counts committed actions (4); `oops` marks a store error taken for the
    workflow's own."""
    step = {"hooks": "guarded", "on_error": "oops"}
    return write_machine(
        path,
        {
            "spec": "flatmachine",
            "spec_version": "4.2.1",
            "data": {
                "name": "faulted",
                "machines": {"child": CHILD},
                "context": {"acc": 0},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "s1"}]},
                    "s1": {**step, "action": "add", "transitions": [{"to": "s2"}]},
                    "s2": {**step, "action": "slow_add", "transitions": [{"to": "s3"}]},
                    "s3": {
                        **step,
                        "machine": "child",
                        "input": {"acc": "context.acc"},
                        "output_to_context": {"acc": "output.acc"},
                        "transitions": [{"to": "s4"}],
                    },
                    "s4": {**step, "action": "add", "transitions": [{"to": "done"}]},
                    "oops": {"hooks": "guarded", "action": "oops", "transitions": [{"to": "done"}]},
                    "done": {"type": "final", "output": {"acc": "context.acc"}},
                },
            },
        },
    )


class GuardedHooks(MachineHooks):
    """Every action first asks the store (on a connection of its own) whether
    its state's state_exit already committed: if so, a committed state is
    running again, which is recorded as a violation."""

    runs: Counter = Counter()
    violations: list[str] = []
    engine: sa.Engine | None = None

    async def on_action(self, state_name, action_name, context):
        ex_id = context["machine"]["execution_id"]
        with self.engine.connect() as conn:
            committed = conn.scalar(
                sa.text(
                    "SELECT count(*) FROM checkpoints WHERE execution_id = :e AND state = :s"
                    " AND event = 'state_exit'"
                ),
                {"e": ex_id, "s": state_name},
            )
        if committed:
            self.violations.append(f"{ex_id} {state_name} ran after its state_exit committed")
        if action_name == "oops":
            self.violations.append(f"{ex_id} took its on_error path: {context.get('last_error')}")
        self.runs[(ex_id, state_name)] += 1
        if action_name == "slow_add":
            await asyncio.sleep(0.25)
        context["acc"] = int(context.get("acc") or 0) + 1
        return context


def _guard_engine(db_url: str) -> sa.Engine:
    url = sa.make_url(db_url)
    if url.get_backend_name() == "postgresql":
        return sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.NullPool)
    return sa.create_engine(url, poolclass=sa.NullPool)


async def _run_burst_worker(
    settings: Settings, registry: HooksRegistry, concurrency: int, arm=lambda: None
) -> None:
    store = await Store.open(settings)
    arm()  # faults from the worker's first statement on
    try:
        options = WorkerOptions(concurrency=concurrency, burst=True)
        await asyncio.wait_for(Worker(store, registry, options, settings).run(), 120)
    finally:
        await store.close()


def test_a_fault_at_any_statement_of_a_run_fails_nothing(db_url, tmp_path, faults):
    """Sweep N over every statement of a run (the claim, markers, state_exits,
    the inline child's writes, the outcome, lease renewals, the worker's own
    rows), then every COMMIT again with the commit carried out and only its
    reply lost: each execution completes with the right output, attempt 1, one
    state_exit per state, no on_error path taken, and no state runs again after
    its state_exit committed."""
    # a lease renewal every 0.15 s: the slow state sees one or two
    settings = Settings(database_url=db_url, lease_ttl=0.45, poll_interval=0.05, store_patience=0)
    machine = fault_machine(tmp_path / "faulted.yml")
    registry = HooksRegistry()
    registry.register("guarded", GuardedHooks)
    GuardedHooks.engine = _guard_engine(db_url)
    GuardedHooks.runs = Counter()
    GuardedHooks.violations = []

    async def submit(ex_id):
        async with await Client.open(settings) as client:
            await client.submit(machine, {}, id=ex_id)

    # a clean run first, to list the statements of one run
    run_async(submit("clean"))
    run_async(_run_burst_worker(settings, registry, 1, faults.arm))
    faults.disarm()
    statements = list(faults.seen)
    for write_point in (
        r"UPDATE executions SET status=\S+, not_before=",  # the claim
        # markers and state_exits (PostgreSQL: with their fence check, one statement)
        r"INSERT INTO checkpoints|WITH held AS \(UPDATE executions",
        r"UPDATE executions SET lease_until",  # a lease renewal
        r"UPDATE executions SET status = \S+, output",  # the outcome
        r"COMMIT",
    ):
        assert any(re.match(write_point, s) for s in statements), write_point

    plan = [(n, False) for n in range(1, len(statements) + 1)]
    plan += [(n, True) for n, s in enumerate(statements, 1) if s == "COMMIT"]
    ids = []
    for n, lost_reply in plan:
        ex_id = f"fault-{n}-{'lost-reply' if lost_reply else 'refused'}"
        ids.append(ex_id)
        run_async(submit(ex_id))
        arm = lambda n=n, lost=lost_reply: faults.arm([n], lost_reply=lost)  # noqa: E731
        run_async(_run_burst_worker(settings, registry, 1, arm))
        faults.disarm()
        # timing moves renewals about, so a run may be a statement short
        assert faults.failed or n >= faults.count, (n, faults.count)

    store = _open(settings)
    try:
        rows = {ex.id: ex for ex in run_async(store.list_executions(limit=10_000))}
        for ex_id in ids:
            ex = rows[ex_id]
            assert ex.status == "completed", (ex_id, ex.status, ex.error)
            assert ex.attempt == 1 and ex.error is None, (ex_id, ex.error)
            assert ex.output == {"acc": 4}, (ex_id, ex.output)
            exits = Counter(
                h.state for h in run_async(store.history(ex_id)) if h.event == "state_exit"
            )
            assert exits == Counter({s: 1 for s in ("start", "s1", "s2", "s3", "s4", "done")}), (
                ex_id,
                exits,
            )
    finally:
        run_async(store.close())
        GuardedHooks.engine.dispose()
    assert GuardedHooks.violations == []
    # the faults met the runs mid-way: runs were given back and claimed again,
    # and states in flight ran again
    reclaimed = sum(rows[ex_id].fence > 1 for ex_id in ids)
    reruns = sum(n - 1 for n in GuardedHooks.runs.values())
    assert reclaimed > len(plan) // 3 and reruns > 5, (reclaimed, reruns, len(plan))


# ------------------------------------------------------------ real outages


@pytest.fixture
def pg_cut(pg_url) -> Iterator[tuple[TcpCut, str]]:
    """A forwarder in front of the test's PostgreSQL, and the URL through it.
    (A cut connection is a server's fault; SQLite's is a held lock, below.)"""
    url = sa.make_url(pg_url)
    cut = TcpCut((url.host or "127.0.0.1", url.port or 5432))
    try:
        yield cut, url.set(port=cut.port).render_as_string(hide_password=False)
    finally:
        cut.close()


@pytest.fixture
def pg_store(pg_url) -> Iterator[Store]:
    s = run_async(Store.open(Settings(database_url=pg_url)))
    yield s
    run_async(s.close())


def _outage_lines(log: str) -> str:
    """A worker log's lines about the store going and coming, and what it gave back."""
    keep = ("answering", "gave back", "WARNING", "ERROR")
    return "\n".join(line for line in log.splitlines() if any(k in line for k in keep))


def _lines_about(ex_id: str, procs) -> str:
    """What each worker's log says about one execution, and about the outages."""
    return "\n\n".join(
        "\n".join(
            line
            for line in p.log().splitlines()
            if ex_id in line or "answering" in line or "gave back" in line
        )
        for p in procs
    )


def _statuses(store: Store) -> Counter:
    return Counter(ex.status for ex in run_async(store.list_executions(limit=10_000)))


@pytest.mark.slow
@pytest.mark.parametrize("patience", ["1", "30"], ids=["abandon-and-resume", "wait-in-place"])
def test_database_cut_twice_under_two_workers_fails_nothing(
    pg_url, pg_store, tmp_path, workers, pg_cut, patience
):
    """120 four-state executions on 2 worker processes; the database is cut twice
    (every connection reset, new ones refused, about 3 s). With a short patience
    the runs are abandoned and resume from their last checkpoints; with the
    default one the writes wait the outage out. Either way: all complete with
    attempt 1, each state's exit committed once, and both workers live on."""
    cut, via = pg_cut
    effects = tmp_path / "effects.log"
    machine = chain_machine(tmp_path / "four.yml", ["add", "slow_add", "add", "add"])
    ids = submit_direct(pg_url, machine, [{"sleep": 0.8}] * 120)
    env = {
        "ORCH_TEST_EFFECTS": str(effects),
        "ORCH_LEASE_TTL": "9",
        "ORCH_STORE_PATIENCE": patience,
    }
    procs = [workers(via, "--app", "testapp", "--concurrency", "4", **env) for _ in range(2)]
    for done_before_cut in (30, 70):
        wait_until(lambda n=done_before_cut: _statuses(pg_store)["completed"] >= n, 120, "progress")
        cut.cut()
        time.sleep(3)
        assert all(p.proc.poll() is None for p in procs)
        cut.restore()
    wait_until(lambda: _statuses(pg_store)["completed"] == 120, 180, "all 120 completed")

    assert all(p.proc.poll() is None for p in procs), "both workers alive at the end"
    for ex in run_async(pg_store.list_executions(limit=1000)):
        assert ex.id in ids
        assert (ex.status, ex.attempt, ex.output["acc"]) == ("completed", 1, 4), ex
        # no lease ran out: the lease keepers lived through both outages
        assert ex.recoveries == 0 and ex.error is None, (ex, _lines_about(ex.id, procs))
        exits = Counter(
            h.state for h in run_async(pg_store.history(ex.id)) if h.event == "state_exit"
        )
        assert set(exits.values()) == {1}, (ex.id, exits)
    for p in procs:
        p.signal(signal.SIGTERM)
        assert p.wait() == 0
        log = p.log()
        # one line when the database went away and one when it came back, per outage
        assert log.count("is not answering") == cut.cuts, _outage_lines(log)
        assert log.count("is answering again") == cut.cuts, _outage_lines(log)
        assert "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_a_worker_started_while_the_database_is_down_waits_for_it(
    pg_url, pg_store, tmp_path, workers, pg_cut
):
    cut, via = pg_cut
    machine = chain_machine(tmp_path / "one.yml", ["add", "add"])
    [ex_id] = submit_direct(pg_url, machine, [{}])
    cut.cut()

    burst = workers(via, "--app", "testapp", "--burst")
    assert burst.wait() == 2  # a batch run with no database is a usage error, not a hang
    assert "cannot reach database" in burst.log() and "Traceback" not in burst.log()

    quitter = workers(via, "--app", "testapp")
    wait_until(lambda: "waiting for the database" in quitter.log(), 60, "the waiting message")
    quitter.signal(signal.SIGTERM)  # a service stopped before its database came up
    assert quitter.wait() == 0

    w = workers(via, "--app", "testapp")
    wait_until(lambda: "waiting for the database" in w.log(), 60, "the waiting message")
    time.sleep(1)
    assert w.proc.poll() is None
    assert w.log().count("waiting for the database") == 1  # one message, not one per try
    cut.restore()
    wait_until(lambda: run_async(pg_store.get(ex_id)).status == "completed", 60, "its work done")
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    ex = run_async(pg_store.get(ex_id))
    assert ex.output["acc"] == 2 and ex.attempt == 1


@pytest.mark.slow
def test_sqlite_locked_by_another_process_past_the_busy_timeout_fails_nothing(tmp_path, workers):
    """Another process holds the file's write lock for 3 s, far past a 0.2 s busy
    timeout and a 0.5 s patience: writes give up, runs are abandoned and resume."""
    db_url = f"sqlite:///{tmp_path / 'locked.sqlite'}"
    settings = Settings(database_url=db_url)
    store = run_async(Store.open(settings))
    try:
        machine = chain_machine(tmp_path / "m.yml", ["add", "slow_add", "add"])
        ids = submit_direct(db_url, machine, [{"sleep": 0.5}] * 12)
        env = {
            "ORCH_SQLITE_BUSY_TIMEOUT_MS": "200",
            "ORCH_STORE_PATIENCE": "0.5",
            "ORCH_LEASE_TTL": "6",
        }
        w = workers(db_url, "--app", "testapp", "--concurrency", "4", **env)
        wait_until(lambda: _statuses(store)["completed"] >= 2, 60, "progress")
        holder = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys, time\n"
                "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(3)\n"
                "c.execute('COMMIT')",
                str(tmp_path / "locked.sqlite"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert holder.returncode == 0 and "locked" in holder.stdout
        wait_until(lambda: _statuses(store)["completed"] == 12, 120, "all completed")
        for ex_id in ids:
            ex = run_async(store.get(ex_id))
            assert (ex.status, ex.attempt, ex.output["acc"]) == ("completed", 1, 3)
        w.signal(signal.SIGTERM)
        assert w.wait() == 0
        assert "is not answering" in w.log()  # it did meet the lock
    finally:
        run_async(store.close())


def submit_direct(db_url: str, machine: Path, inputs: list[dict]) -> list[str]:
    async def go():
        async with await Client.open(Settings(database_url=db_url)) as client:
            return [s.execution.id for s in await client.submit_many(machine, inputs)]

    return run_async(go())


# ------------------------------------------------------------- the scheduler


class Outage:
    """The store stops answering its clients, and starts again: PostgreSQL behind
    a cut forwarder; SQLite with its write lock held by another connection."""

    def __init__(self, db_url: str, tmp_path: Path):
        self.url = sa.make_url(db_url)
        self._cut: TcpCut | None = None
        self._holder: sqlite3.Connection | None = None
        if self.url.get_backend_name() == "postgresql":
            self._cut = TcpCut((self.url.host or "127.0.0.1", self.url.port or 5432))
            self.client_url = self.url.set(port=self._cut.port).render_as_string(
                hide_password=False
            )
        else:
            self.client_url = db_url

    def begin(self) -> None:
        if self._cut is not None:
            self._cut.cut()
        else:
            self._holder = sqlite3.connect(
                self.url.database, isolation_level=None, check_same_thread=False
            )
            self._holder.execute("BEGIN EXCLUSIVE")

    def end(self) -> None:
        if self._cut is not None:
            self._cut.restore()
        elif self._holder is not None:
            self._holder.execute("COMMIT")
            self._holder.close()
            self._holder = None

    def close(self) -> None:
        self.end()
        if self._cut is not None:
            self._cut.close()


@pytest.fixture
def outage(db_url, tmp_path, store) -> Iterator[Outage]:
    o = Outage(db_url, tmp_path)
    yield o
    o.close()


def test_the_leader_rides_out_an_outage_and_never_double_fires(store, outage, tmp_path, faults):
    """While the store is away the leader's jobs raise nothing and it stops
    leading; once the store answers it takes the lease back (a new fence) and
    fires each cron tick exactly once, even when a firing's commit reply was
    lost with the connection."""
    from freezegun import freeze_time

    from orchestrator.scheduler import Scheduler

    settings = Settings(
        database_url=outage.client_url,
        lease_ttl=10,
        store_patience=0,
        sqlite_busy_timeout_ms=50,
    )
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    with freeze_time("2026-03-02 00:00:30", real_asyncio=True) as clock:
        # every tick fires (no run ever finishes here: the default, skip, would skip them)
        run_async(Client(store).add_schedule("tick", machine, cron="* * * * *", overlap="allow"))
        leader_store = run_async(Store.open(settings))
        try:
            leader = Scheduler(leader_store, settings)
            assert run_async(leader.check_leadership())
            first_fence = leader.fence
            clock.move_to("2026-03-02 00:01:05")
            assert [name for name, _, _ in run_async(leader.fire_schedules())] == ["tick"]

            outage.begin()
            clock.tick(4)
            assert run_async(leader.check_leadership()) is False
            assert run_async(leader.fire_schedules()) == []
            assert run_async(leader.reap()) is None
            assert run_async(leader.scale()) is None
            clock.move_to("2026-03-02 00:02:10")  # its lease ran out meanwhile
            assert run_async(leader.fire_schedules()) == []
            outage.end()

            # back: it takes the lease back under a new fence, and the 00:02 tick
            # fires once although the reply to the firing's commit is lost
            assert run_async(leader.check_leadership())
            assert leader.fence > first_fence
            faults.arm([2], match="^COMMIT$", lost_reply=True)  # 1: the lease, 2: the firing
            assert run_async(leader.fire_schedules()) == []  # fired, but it cannot know
            faults.disarm()
            assert faults.failed
            assert run_async(leader.fire_schedules()) == []
            clock.move_to("2026-03-02 00:03:01")
            assert [name for name, _, _ in run_async(leader.fire_schedules())] == ["tick"]
        finally:
            run_async(leader_store.close())
    ticks = sorted(e.id for e in run_async(store.list_executions()) if e.id.startswith("tick@"))
    assert ticks == [
        "tick@2026-03-02T00:01",
        "tick@2026-03-02T00:02",
        "tick@2026-03-02T00:03",
    ]
