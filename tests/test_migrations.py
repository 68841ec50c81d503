"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from flatmachines import HooksRegistry

from orchestrator.store import engine as eng
from orchestrator.store.models import metadata


def test_migrated_schema_matches_the_models(store):
    engine = eng.create_engine(store.url, pooled=False)
    try:
        with engine.connect() as conn:
            assert eng.current_revision(conn) == eng.head_revision()
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diffs = [
                d
                for d in compare_metadata(context, metadata)
                # the claim index orders priority DESC: an expression alembic cannot compare
                if not (isinstance(d, tuple) and "ix_executions_claim" in repr(d))
            ]
    finally:
        engine.dispose()
    assert diffs == []


def test_upgrade_is_idempotent(store):
    eng.upgrade(store.url)
    engine = eng.create_engine(store.url, pooled=False)
    try:
        with engine.connect() as conn:
            assert eng.current_revision(conn) == eng.head_revision()
            tables = set(sa.inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert set(metadata.tables) <= tables


def test_the_claim_reads_the_queue_in_index_order(store):
    """No sort of the backlog per claim: the index orders priority DESC, created_at."""
    from sqlalchemy.dialects import sqlite

    from orchestrator.clock import utcnow
    from orchestrator.store import executions as st

    engine = eng.create_engine(store.url, pooled=False)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                ddl = conn.exec_driver_sql(
                    "SELECT sql FROM sqlite_master WHERE name = 'ix_executions_claim'"
                ).scalar()
                claim = st._RUNNABLE_QUEUED.params(b_queues=["default"], b_now=utcnow())
                sql = str(
                    claim.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True})
                ).replace(" FOR UPDATE", "")
                plan = " ".join(r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
                assert "ix_executions_claim" in plan and "TEMP B-TREE" not in plan, plan
            else:
                ddl = conn.exec_driver_sql(
                    "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_executions_claim'"
                    " AND schemaname = current_schema()"
                ).scalar()  # (PostgreSQL's plan depends on the table's size: check the DDL)
    finally:
        engine.dispose()
    assert "priority DESC" in ddl, ddl


def test_the_head_the_code_needs_is_the_scripts_head():
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(eng._alembic_config())
    assert scripts.get_current_head() == eng.HEAD


def test_a_schedule_made_before_overlap_policies_skips_overlapping_ticks(db_url):
    """0008 gives the schedules already stored the default policy, skip."""
    from alembic import command

    engine = eng.create_engine(eng.parse_url(db_url), pooled=False)
    try:
        with engine.begin() as conn:
            cfg = eng._alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0007")
            conn.exec_driver_sql(
                "INSERT INTO configs (hash, machine_name, raw, created_at)"
                " VALUES ('h', 'm', 'spec: flatmachine', '2026-03-02 00:00:00')"
            )
            conn.exec_driver_sql(
                "INSERT INTO schedules (name, machine, config_hash, cron, input, queue,"
                " next_fire_at, created_at) VALUES ('old', 'm', 'h', '* * * * *', '{}',"
                " 'default', '2026-03-02 02:00:00', '2026-03-02 00:00:00')"
            )
            command.upgrade(cfg, "head")
            row = conn.exec_driver_sql(
                "SELECT overlap, buffered_at, last_skipped_at FROM schedules"
            ).one()
    finally:
        engine.dispose()
    assert tuple(row) == ("skip", None, None)


def test_a_store_of_the_previous_schema_upgrades_and_its_unfinished_executions_complete(
    db_url, tmp_path
):
    """A store as the version before delta checkpoints left it: rows holding
    the library's whole snapshots, a queued execution and one waiting on a
    signal. `orch db upgrade` migrates it and both complete."""
    import asyncio
    import json

    from alembic import command
    from flatmachines import FlatMachine, MemoryBackend

    from orchestrator.client import Client
    from orchestrator.runner import Runner
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    from .conftest import orch, run_async, write_machine

    machine = write_machine(
        tmp_path / "approve.yml",
        {
            "spec": "flatmachine",
            "spec_version": "4.2.1",
            "data": {
                "name": "approve",
                "context": {"doc": "input.doc", "approved": None},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "ask"}]},
                    "ask": {
                        "wait_for": "approve/{{ context.doc[:8] }}",
                        "output_to_context": {"approved": "output.ok"},
                        "transitions": [{"to": "done"}],
                    },
                    "done": {
                        "type": "final",
                        "output": {"approved": "context.approved", "doc": "context.doc"},
                    },
                },
            },
        },
    )
    doc = "contract " * 400  # a big value, held inline by the old rows
    settings = Settings(database_url=db_url)
    # submitted at head, then the schema taken back to the previous revision
    store = run_async(Store.open(settings))
    client = Client(store)
    waiting = run_async(client.submit(machine, {"doc": doc}, id="old-waiting")).execution
    queued = run_async(client.submit(machine, {"doc": "x" + doc}, id="old-queued")).execution
    run_async(store.close())
    url = eng.parse_url(db_url)
    engine = eng.create_engine(url, pooled=False)
    try:
        with engine.connect() as conn:
            with conn.begin():
                cfg = eng._alembic_config()
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "0008")
            assert eng.current_revision(conn) == "0008"
            assert "delta" not in {c["name"] for c in sa.inspect(conn).get_columns("checkpoints")}
    finally:
        engine.dispose()

    # the waiting one's checkpoints, as the previous version wrote them: the
    # library's own snapshot text (a plain FlatMachine on its memory backend)
    backend = MemoryBackend()
    plain = FlatMachine(config_file=str(machine), persistence=backend)
    plain.execution_id = waiting.id
    result = asyncio.run(plain.execute(input={"doc": doc}))
    assert result.get("_waiting")
    channel = result["_channel"]
    keys = [k for k in backend._store if not k.endswith("/latest")]  # in the order saved
    engine = eng.create_engine(url, pooled=False)
    try:
        with engine.begin() as conn:
            step = 0
            for key in keys:
                snap = json.loads(backend._store[key])
                step = snap["step"]
                conn.execute(
                    sa.text(
                        "INSERT INTO checkpoints (execution_id, key, step, event, state, snapshot,"
                        " fence, created_at) VALUES (:e, :k, :s, :ev, :st, :sn, 1, :at)"
                    ),
                    dict(
                        e=waiting.id,
                        k=key,
                        s=snap["step"],
                        ev=snap["event"],
                        st=snap["current_state"],
                        sn=backend._store[key],
                        at=waiting.created_at,
                    ),
                )
            conn.execute(
                sa.text(
                    "UPDATE executions SET status = 'waiting', waiting_channel = :c, fence = 1,"
                    " step = :s, current_state = 'ask', started_at = created_at WHERE id = :e"
                ),
                dict(c=channel, s=step, e=waiting.id),
            )
    finally:
        engine.dispose()

    upgraded = orch("db", "upgrade", db_url=db_url)
    assert upgraded.returncode == 0, upgraded.stderr
    store = run_async(Store.open(settings, migrate=False))
    try:
        assert run_async(store.get(waiting.id)).status == "waiting"
        run_async(store.send_signal(channel, {"ok": True}))
        runner = Runner(store, HooksRegistry())
        while (claim := run_async(store.claim("w", ["default"]))) is not None:
            run_async(runner.run(claim))
        done = run_async(store.get(waiting.id))
        assert done.status == "completed"
        assert done.output == {"approved": True, "doc": doc}
        assert run_async(store.get(queued.id)).status == "waiting"  # it waits on its own channel
        # its old rows stay readable beside the new ones
        history = run_async(store.history(waiting.id))
        assert [h.event for h in history][: len(keys)] == [
            json.loads(backend._store[k])["event"] for k in keys
        ]
    finally:
        run_async(store.close())
