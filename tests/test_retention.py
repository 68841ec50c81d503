"""orch prune: finished executions go whole, with their checkpoints and signals;
unfinished ones, and finished children of an unfinished root, stay."""

from __future__ import annotations

import json
from datetime import timedelta

import sqlalchemy as sa
from freezegun import freeze_time

from orchestrator.api import Orchestrator
from orchestrator.clock import utcnow
from orchestrator.store import NewExecution

from .conftest import chain_machine, orch, run_async
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
