"""Retention: finished executions go whole, with their checkpoints and signals;
unfinished ones, and finished children of an unfinished root, stay. On demand
(`orch prune`), as the leader's job (ORCH_RETENTION), and as flatmachines'
PersistenceBackend.prune."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from freezegun import freeze_time

from orchestrator.api import Orchestrator
from orchestrator.clock import utcnow
from orchestrator.persistence import FencedPersistence
from orchestrator.scheduler import Scheduler
from orchestrator.settings import Settings
from orchestrator.store import NewExecution, Store
from orchestrator.store import retention as store_retention
from orchestrator.store.models import checkpoints, executions, signals

from .conftest import ROOT, chain_machine, orch, orch_env, run_async
from .test_cli import assert_usage_error, ok


def counts(store) -> dict[str, int]:
    def tx(conn):
        return {
            t: conn.scalar(sa.text(f"SELECT count(*) FROM {t}"))
            for t in ("executions", "checkpoints", "signals")
        }

    return run_async(store.db.read(tx))


def ran(db_url: str, tmp_path, n: int) -> list[str]:
    """n executions of a one-action chain, run to completion by a real worker."""
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    ids = [f"done-{i}" for i in range(n)]
    for ex_id in ids:
        ok(orch("submit", str(machine), "--id", ex_id, db_url=db_url))
    r = orch("worker", "--app", "testapp", "--burst", db_url=db_url)
    assert r.returncode == 0, r.stderr
    return ids


def test_prune_removes_finished_executions_whole_and_keeps_the_rest(db_url, store, tmp_path):
    done = ran(db_url, tmp_path, 3)
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    ok(orch("submit", str(machine), "--id", "still-queued", db_url=db_url))
    ok(orch("signal", "left/over", "--data", "{}", db_url=db_url))  # nobody's: kept
    before = counts(store)
    assert before["checkpoints"] > 0

    async def prune(**kw):
        async with Orchestrator(db_url) as o:
            return await o.prune(**kw)

    later = utcnow() + timedelta(days=2)
    with freeze_time(later):
        # finished two days ago, kept for three: nothing goes
        assert run_async(prune(older_than=3 * 86400))["executions"] == 0
        dry = run_async(prune(older_than=86400, dry_run=True))
        assert (dry["executions"], dry["dry_run"]) == (3, True)
        assert dry["checkpoints"] == before["checkpoints"]  # the queued one has none yet
        assert counts(store) == before
        pruned = run_async(prune(older_than=86400))
    assert (pruned["executions"], pruned["checkpoints"]) == (3, before["checkpoints"])
    after = counts(store)
    assert after == {"executions": 1, "checkpoints": 0, "signals": before["signals"]}
    assert [ex.id for ex in run_async(store.list_executions())] == ["still-queued"]

    # an id submitted again after its prune is a new execution, not the old result
    ok(orch("submit", str(machine), "--id", done[0], db_url=db_url))
    again = run_async(store.get(done[0]))
    assert again.status == "queued" and again.output is None


def test_a_finished_child_of_an_unfinished_root_stays(db_url, store, tmp_path):
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    ok(orch("submit", str(machine), "--id", "root", db_url=db_url))
    root = run_async(store.get("root"))
    child = NewExecution(
        id="root@1/a",
        machine=root.machine,
        config_hash=root.config_hash,
        input={},
        parent_id="root",
        root_id="root",
    )
    orphan = NewExecution(
        id="gone@1/a",
        machine=root.machine,
        config_hash=root.config_hash,
        input={},
        parent_id="gone",
        root_id="gone",
    )
    run_async(store.submit([child, orphan]))
    old = utcnow() - timedelta(days=60)

    def finish(conn):
        conn.execute(
            sa.text(
                "UPDATE executions SET status = 'completed', finished_at = :at WHERE id IN "
                "('root@1/a', 'gone@1/a')"
            ),
            {"at": old},
        )

    run_async(store.db.write(finish))
    r = ok(orch("prune", "--json", db_url=db_url))
    assert json.loads(r.stdout)["executions"] == 1  # the child whose root is gone
    assert {ex.id for ex in run_async(store.list_executions())} == {"root", "root@1/a"}


def test_prune_by_status(db_url, store, tmp_path):
    ran(db_url, tmp_path, 2)
    r = ok(orch("prune", "--older-than", "0s", "--status", "failed", "--json", db_url=db_url))
    assert json.loads(r.stdout)["executions"] == 0
    r = ok(orch("prune", "--older-than", "0", "--status", "completed", db_url=db_url))
    assert r.stdout.startswith("removed 2 execution(s)")
    assert counts(store)["executions"] == 0


def test_bad_prune_input_is_one_line_and_removes_nothing(db_url, store, tmp_path):
    ran(db_url, tmp_path, 1)
    before = counts(store)
    assert_usage_error(orch("prune", "--older-than", "soon", db_url=db_url), "--older-than")
    assert_usage_error(orch("prune", "--older-than", "-5m", db_url=db_url), "--older-than")
    assert_usage_error(orch("prune", "--status", "queued", db_url=db_url), "--status")
    assert counts(store) == before


# ------------------------------------------------------- rows made directly

CONFIG = "0" * 64


def planted(
    store: Store,
    ids: list[str],
    *,
    status: str = "completed",
    finished_at: datetime | None = None,
    root_id: str | None = None,
    checkpoints_each: int = 2,
    snapshot_bytes: int = 64,
) -> None:
    """Execution rows put straight in the store, each with its checkpoints and
    one signal given to it: what a run leaves, made fast."""
    now = utcnow()
    done = status in ("completed", "failed", "cancelled")

    def tx(conn):
        if not conn.scalar(sa.text(f"SELECT count(*) FROM configs WHERE hash = '{CONFIG}'")):
            conn.execute(
                sa.text(
                    "INSERT INTO configs (hash, machine_name, raw, created_at, needs) "
                    "VALUES (:h, 'planted', 'spec: flatmachine', :now, '')"
                ),
                {"h": CONFIG, "now": now},
            )
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            conn.execute(
                sa.insert(executions),
                [
                    dict(
                        id=ex_id,
                        machine="planted",
                        config_hash=CONFIG,
                        queue="default",
                        status=status,
                        input={},
                        root_id=root_id,
                        parent_id=root_id,
                        created_at=now,
                        updated_at=now,
                        finished_at=(finished_at or now) if done else None,
                    )
                    for ex_id in part
                ],
            )
            conn.execute(
                sa.insert(checkpoints),
                [
                    dict(
                        execution_id=ex_id,
                        key=f"{ex_id}/step_{k:06d}",
                        step=k,
                        event="state_exit",
                        state="s",
                        snapshot=b"x" * snapshot_bytes,
                        fence=1,
                        created_at=now,
                    )
                    for ex_id in part
                    for k in range(checkpoints_each)
                ],
            )
            conn.execute(
                sa.insert(signals),
                [
                    dict(channel=f"c/{ex_id}", data={}, created_at=now, assigned_to=ex_id)
                    for ex_id in part
                ],
            )

    run_async(store.db.write(tx))


def ids_left(store: Store) -> set[str]:
    def tx(conn):
        return {r[0] for r in conn.execute(sa.select(executions.c.id))}

    return run_async(store.db.read(tx))


def owned(store: Store) -> tuple[dict[str, int], dict[str, int]]:
    """Checkpoints and signals per execution id they belong to."""

    def tx(conn):
        cps = dict(
            conn.execute(
                sa.select(checkpoints.c.execution_id, sa.func.count()).group_by(
                    checkpoints.c.execution_id
                )
            ).all()
        )
        sig = dict(
            conn.execute(
                sa.select(signals.c.assigned_to, sa.func.count())
                .where(signals.c.assigned_to.is_not(None))
                .group_by(signals.c.assigned_to)
            ).all()
        )
        return cps, sig

    return run_async(store.db.read(tx))


def open_store(db_url: str, **settings) -> Store:
    return run_async(Store.open(Settings(database_url=db_url, **settings)))


# ------------------------------------------------------- the leader's job


def test_the_leader_job_removes_what_is_old_enough_and_nothing_else(db_url, tmp_path):
    store = open_store(db_url, retention=30 * 86400)
    try:
        t0 = utcnow()
        planted(store, ["old-1", "old-2"], finished_at=t0)
        planted(store, ["old-failed"], status="failed", finished_at=t0)
        planted(store, ["old-cancelled"], status="cancelled", finished_at=t0)
        planted(store, ["queued"], status="queued")
        planted(store, ["waiting"], status="waiting")
        planted(store, ["running-root"], status="running")
        planted(store, ["running-root/child"], finished_at=t0, root_id="running-root")
        planted(store, ["done-root"], finished_at=t0)
        planted(store, ["done-root/child"], finished_at=t0, root_id="done-root")
        unfinished = {"queued", "waiting", "running-root", "running-root/child"}
        s = Scheduler(store, store.settings)
        with freeze_time(t0 + timedelta(days=29), real_asyncio=True) as clock:
            first = run_async(s.retain())
            assert first["executions"] == 0 and first["more"] is False
            young = t0 + timedelta(days=29)
            planted(store, ["young"], finished_at=young)
            clock.tick(timedelta(seconds=30))
            assert run_async(s.retain()) is None  # not due: the interval has not passed
            clock.tick(timedelta(days=2))  # 31 days after the first ones finished
            out = run_async(s.retain())
        assert out["executions"] == 6 and out["more"] is False
        assert out["checkpoints"] == 12 and out["signals"] == 6
        # PostgreSQL vacuums what a run removed (its space is reused only then);
        # SQLite reuses freed pages by itself
        assert out["reclaimed"] is db_url.startswith("postgresql")
        assert first["reclaimed"] is False  # nothing removed, nothing to vacuum
        assert ids_left(store) == unfinished | {"young"}
        cps, sig = owned(store)
        assert set(cps) == set(sig) == unfinished | {"young"}
    finally:
        run_async(store.close())


def test_a_run_does_a_bounded_number_of_batches_and_the_next_tick_goes_on(db_url, monkeypatch):
    monkeypatch.setattr(store_retention, "BATCH", 2)
    store = open_store(db_url, retention=60)
    try:
        t0 = utcnow()
        planted(store, [f"e{i:02d}" for i in range(25)], finished_at=t0)
        s = Scheduler(store, store.settings)
        with freeze_time(t0 + timedelta(minutes=5), real_asyncio=True):
            first = run_async(s.retain())  # machines/retention.yml: 10 batches a run
            assert (first["executions"], first["batches"], first["more"]) == (20, 10, True)
            assert len(ids_left(store)) == 5
            second = run_async(s.retain())  # due at once: the last run left some
            assert (second["executions"], second["more"]) == (5, False)
            assert run_async(s.retain()) is None  # nothing left: the next is an interval away
        assert ids_left(store) == set()
        assert owned(store) == ({}, {})
    finally:
        run_async(store.close())


def test_retention_zero_keeps_everything(db_url, tmp_path):
    store = open_store(db_url, retention="0")
    try:
        assert store.settings.retention == 0
        planted(store, ["ancient"], finished_at=datetime(2000, 1, 1))
        s = Scheduler(store, store.settings)
        out = run_async(s.retain())
        assert out == {
            "executions": 0,
            "checkpoints": 0,
            "signals": 0,
            "batches": 0,
            "more": False,
            "reclaimed": False,
            "blobs": 0,
        }
        assert ids_left(store) == {"ancient"}
        assert owned(store) == ({"ancient": 2}, {"ancient": 1})
    finally:
        run_async(store.close())


@pytest.mark.parametrize("value", ["soon", "-5m", "12x", "1e400"])
def test_a_bad_orch_retention_is_one_line_and_exit_2(db_url, tmp_path, value):
    for command in (["scheduler"], ["up", "--min", "0", "--max", "0"]):
        r = orch(*command, db_url=db_url, cwd=tmp_path, ORCH_RETENTION=value, timeout=60)
        assert_usage_error(r, "ORCH_RETENTION", "0 keeps executions forever")
    assert not (tmp_path / "orch-logs").exists()


def test_orch_retention_takes_the_durations_of_prune():
    assert [Settings(retention=v).retention for v in ("30d", "12h", "30s", "0", "90")] == [
        30 * 86400,
        12 * 3600,
        30,
        0,
        90,
    ]
    assert Settings().retention == 30 * 86400


# ------------------------------------------------------- killed halfway


def test_a_prune_killed_halfway_leaves_every_execution_whole_or_gone(db_url, store):
    n, each = 6000, 4
    ids = [f"big-{i:05d}" for i in range(n)]
    planted(store, ids, finished_at=utcnow() - timedelta(days=1), checkpoints_each=each)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "prune", "--older-than", "1h"],
        env=orch_env(db_url),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with engine.connect() as conn:
                left = conn.scalar(sa.select(sa.func.count()).select_from(executions))
            if left < n:  # some batches committed: kill it in the middle of the rest
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
    finally:
        engine.dispose()
    assert proc.returncode == -signal.SIGKILL, "the prune ended before it could be killed"
    left_ids = ids_left(store)
    assert 0 < len(left_ids) < n, len(left_ids)
    cps, sig = owned(store)
    # whole: every execution left has all its checkpoints and its signal; gone:
    # nothing of an execution removed is left behind
    assert cps == {ex_id: each for ex_id in left_ids}
    assert sig == {ex_id: 1 for ex_id in left_ids}
    # and the next prune finishes the job
    r = ok(orch("prune", "--older-than", "1h", "--json", db_url=db_url))
    assert json.loads(r.stdout)["executions"] == len(left_ids)
    assert ids_left(store) == set() and owned(store) == ({}, {})


# ------------------------------------------------------- an id used again


def test_an_id_submitted_again_after_its_prune_runs_again(db_url, store, tmp_path):
    effects = tmp_path / "effects.txt"
    machine = chain_machine(tmp_path / "m.yml", ["add", "add"])
    ok(orch("submit", str(machine), "--id", "order-7", db_url=db_url))
    r = orch("worker", "--app", "testapp", "--burst", db_url=db_url, ORCH_TEST_EFFECTS=str(effects))
    assert r.returncode == 0, r.stderr
    first = run_async(store.get("order-7"))
    assert first.status == "completed" and first.output["acc"] == 2
    history = len(run_async(store.history("order-7")))

    with freeze_time(utcnow() + timedelta(days=31)):
        assert run_async(store.prune(before=utcnow() - timedelta(days=30))).executions == 1
    assert run_async(store.get("order-7")) is None

    # the same id: a new execution, queued, with nothing of the old one
    ok(orch("submit", str(machine), "--id", "order-7", "--input", '{"n": 2}', db_url=db_url))
    again = run_async(store.get("order-7"))
    assert again.status == "queued" and again.output is None and again.input == {"n": 2}
    assert run_async(store.history("order-7")) == []
    assert run_async(store.latest_checkpoint("order-7")) is None
    r = orch("worker", "--app", "testapp", "--burst", db_url=db_url, ORCH_TEST_EFFECTS=str(effects))
    assert r.returncode == 0, r.stderr
    done = run_async(store.get("order-7"))
    assert done.status == "completed" and done.output["acc"] == 2
    assert len(run_async(store.history("order-7"))) == history  # its own run only
    ran = [line.split()[1] for line in effects.read_text().splitlines()]
    assert ran == ["s1", "s2", "s1", "s2"]  # both states ran again, not replayed


# ------------------------------------------------------- the library's contract


def test_persistence_prune_keeps_the_librarys_meaning_within_the_safety_rules(db_url, store):
    t0 = utcnow()
    planted(store, ["a-old", "b-old"], finished_at=t0 - timedelta(hours=3))
    planted(store, ["c-mid"], finished_at=t0 - timedelta(hours=2))
    planted(store, ["d-new", "e-new"], finished_at=t0 - timedelta(minutes=1))
    planted(store, ["parked"], status="waiting")  # waits for days: never touched
    planted(store, ["running"], status="running")
    planted(store, ["running/child"], finished_at=t0 - timedelta(days=9), root_id="running")
    p = FencedPersistence(store, claim=None)  # prune needs no claim of its own
    with freeze_time(t0, real_asyncio=True):
        assert run_async(p.prune()) == 0  # no limit given: nothing goes, as in the library
        with pytest.raises(ValueError, match="max_age_seconds"):
            run_async(p.prune(max_age_seconds=-1))
        with pytest.raises(ValueError, match="max_count"):
            run_async(p.prune(max_count=-1))
        assert run_async(p.prune(max_age_seconds=1e30)) == 0  # older than time itself
        # by age: the ones that finished over 2.5 hours ago
        assert run_async(p.prune(max_age_seconds=2.5 * 3600)) == 2
        assert "a-old" not in ids_left(store) and "c-mid" in ids_left(store)
        # by count: the 2 most recently finished stay (the child of a running
        # root counts among the finished but stays whatever its age)
        assert run_async(p.prune(max_count=2)) == 1
        assert ids_left(store) == {"d-new", "e-new", "parked", "running", "running/child"}
        # age and count together: old ones go, then at most the count stay
        assert run_async(p.prune(max_age_seconds=30, max_count=1)) == 2
        assert run_async(p.prune(max_count=0)) == 0  # what is left is not prunable
    assert ids_left(store) == {"parked", "running", "running/child"}
    cps, sig = owned(store)
    assert set(cps) == set(sig) == {"parked", "running", "running/child"}
