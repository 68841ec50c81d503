"""The Alembic migrations build exactly the schema the models describe."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

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
