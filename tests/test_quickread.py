"""`orch list` and `orch show` read a SQLite store with sqlite3 alone
(quickread.py), and print exactly what the engine's path prints; anything that
is not the plain case goes to the engine's path. On PostgreSQL the engine's
path always answers."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from orchestrator import quickread
from orchestrator.api import Orchestrator
from orchestrator.settings import Settings
from orchestrator.store.records import NewExecution

from .conftest import ROOT, orch, orch_env, run_async

EXAMPLES = ROOT / "examples"
# an env setting the engine checks: with it, the command takes the engine's path
ENGINE = {"ORCH_LEASE_TTL": "30"}


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def orch_traced(*args: str, db_url: str, **env: str) -> tuple[str, bool]:
    """Run `orch ARGS`; (its stdout, whether it loaded SQLAlchemy)."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('sqlalchemy' in sys.modules, file=sys.stderr))\n"
        "from orchestrator.cli import main\n"
        f"sys.argv = ['orch', *{list(args)!r}]\n"
        "main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=orch_env(db_url, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout, r.stderr.strip().splitlines()[-1] == "True"


def build(db_url: str, store) -> dict[str, str]:
    """A store with a completed execution and its queued child, a waiting one,
    a cancelled one and one that waits for hooks no worker has."""

    def submit(machine: str, *extra: str) -> str:
        out = ok(orch("submit", str(EXAMPLES / machine), "--json", *extra, db_url=db_url))
        return json.loads(out)["id"]

    ids = {
        "done": submit("counter.yml", "--input", '{"n": 2}'),
        "waiting": submit("approval.yml", "--input", '{"request": "deploy"}', "--id", "req-1"),
    }
    ok(orch("worker", "--app", "examples.app", "--burst", db_url=db_url, cwd=ROOT))
    ids["cancelled"] = submit("counter.yml", "--input", '{"n": 1}', "--queue", "later")
    ok(orch("cancel", ids["cancelled"], "--reason", "not needed", db_url=db_url))
    done = run_async(store.get(ids["done"]))
    [(child, _)] = run_async(
        store.submit(
            [
                NewExecution(
                    id="child-1",
                    machine="counter",
                    config_hash=done.config_hash,
                    input={"n": 3, "note": "é ✓"},
                    queue="elsewhere",
                    parent_id=done.id,
                    root_id=done.id,
                    needs="counter,extra",
                )
            ]
        )
    )
    ids["child"] = child.id
    return ids


LISTINGS = [
    {},
    {"status": "completed"},
    {"queue": "elsewhere"},
    {"limit": 2},
]


def test_quick_reads_equal_the_engines_reads(db_url, store):
    ids = build(db_url, store)
    sqlite = db_url.startswith("sqlite")

    async def engine():
        async with Orchestrator(settings=Settings(database_url=db_url)) as o:
            lists = [[ex.as_json() for ex in await o.list(**kw)] for kw in LISTINGS]
            lists.append([ex.as_json() for ex in await o.list(parent=ids["done"])])
            shows = {k: (await o.get(i, detail=True)).as_json() for k, i in ids.items()}
            return lists, shows

    lists, shows = run_async(engine())
    # what the store holds is what the test means to compare
    assert {d["status"] for d in lists[0]} == {"completed", "waiting", "cancelled", "queued"}
    assert shows["waiting"]["waiting_channel"] == "approval/req-1" and shows["waiting"]["wake_at"]
    assert shows["cancelled"]["cancel_reason"] == "not needed"
    assert shows["child"]["missing_hooks"] == ["counter", "extra"]
    assert [c["id"] for c in shows["done"]["children"]] == ["child-1"]
    assert len(shows["done"]["history"]) > 5
    if not sqlite:
        with pytest.raises(quickread.NotHere):
            quickread.list_executions(db_url)
        with pytest.raises(quickread.NotHere):
            quickread.show(db_url, ids["done"])
        return
    quick = [quickread.list_executions(db_url, **kw) for kw in LISTINGS]
    quick.append(quickread.list_executions(db_url, parent=ids["done"]))
    assert quick == lists
    for key, ex_id in ids.items():
        assert quickread.show(db_url, ex_id) == shows[key], key


def test_the_commands_print_alike_on_either_path(db_url, store):
    ids = build(db_url, store)
    sqlite = db_url.startswith("sqlite")
    commands = [
        ["list"],
        ["list", "--json"],
        ["list", "--parent", ids["done"], "--json"],
        ["list", "--status", "queued"],
        ["show", ids["done"]],
        ["show", ids["child"]],
        ["show", ids["waiting"], "--json"],
    ]
    for args in commands:
        quick_out, quick_engine = orch_traced(*args, db_url=db_url)
        engine_out, engine_loaded = orch_traced(*args, db_url=db_url, **ENGINE)
        assert engine_loaded
        assert quick_engine is not sqlite, args  # SQLite: answered without the engine
        assert quick_out == engine_out, args
    # unknown ids are the engine's to report, as before
    for args in (["show", "nope"], ["list", "--parent", "nope"]):
        r = orch(*args, db_url=db_url)
        assert r.returncode == 2 and "nope" in r.stderr and r.stdout == "", (args, r)


def test_anything_but_the_plain_case_goes_to_the_engine(tmp_path, monkeypatch):
    missing = tmp_path / "none.sqlite"
    with pytest.raises(quickread.NotHere):
        quickread.list_executions(f"sqlite:///{missing}")
    assert not missing.exists()  # a quick read never creates a store

    url = f"sqlite:///{tmp_path / 'orch.sqlite'}"
    ok(orch("submit", str(EXAMPLES / "counter.yml"), db_url=url))
    assert len(quickread.list_executions(url)) == 1
    for odd in (url + "?timeout=5", "sqlite://", "sqlite:///:memory:", "postgresql://x/y"):
        with pytest.raises(quickread.NotHere):
            quickread.list_executions(odd)

    monkeypatch.setenv("ORCH_STORE_PATIENCE", "soon")  # the engine checks it
    with pytest.raises(quickread.NotHere):
        quickread.list_executions(url)
    r = orch("list", db_url=url, ORCH_STORE_PATIENCE="soon")
    assert r.returncode == 2 and "ORCH_STORE_PATIENCE" in r.stderr
    monkeypatch.delenv("ORCH_STORE_PATIENCE")

    with sqlite3.connect(tmp_path / "orch.sqlite") as conn:  # a schema older than this code
        conn.execute("UPDATE alembic_version SET version_num = '0006'")
    with pytest.raises(quickread.NotHere):
        quickread.list_executions(url)


def test_checked_settings_are_the_settings_that_can_be_invalid():
    assert quickread.CHECKED_SETTINGS == set(Settings.model_fields) - {"database_url", "app"}


def test_execution_keys_are_the_apis():
    from orchestrator.schemas import Execution

    extras = ("children", "history", "missing_hooks")
    assert list(quickread.EXECUTION_KEYS) == [k for k in Execution.model_fields if k not in extras]
