"""initial schema: configs, executions, checkpoints, workers, queues

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "configs",
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("machine_name", sa.String(200), nullable=False),
        sa.Column("raw", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("hash", name="pk_configs"),
    )
    op.create_table(
        "executions",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("machine", sa.String(200), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("output", sa.JSON),
        sa.Column("error", sa.Text),
        sa.Column("attempt", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("recoveries", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("not_before", sa.DateTime),
        sa.Column("parent_id", sa.String(200)),
        sa.Column("worker_id", sa.String(200)),
        sa.Column("lease_until", sa.DateTime),
        sa.Column("fence", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("current_state", sa.String(200)),
        sa.Column("step", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.PrimaryKeyConstraint("id", name="pk_executions"),
        sa.ForeignKeyConstraint(
            ["config_hash"], ["configs.hash"], name="fk_executions_config_hash_configs"
        ),
    )
    op.create_index(
        "ix_executions_claim",
        "executions",
        ["queue", "status", sa.text("priority DESC"), "created_at"],
    )
    op.create_index("ix_executions_lease", "executions", ["status", "lease_until"])
    op.create_index("ix_executions_created", "executions", ["created_at"])
    op.create_index("ix_executions_worker", "executions", ["worker_id"])
    op.create_table(
        "checkpoints",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("execution_id", sa.String(200), nullable=False),
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("state", sa.String(200)),
        sa.Column("snapshot", sa.LargeBinary, nullable=False),
        sa.Column("fence", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_checkpoints"),
    )
    op.create_index("ix_checkpoints_execution", "checkpoints", ["execution_id", "id"])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", sa.JSON, nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("last_heartbeat", sa.DateTime, nullable=False),
        sa.Column("stopped_at", sa.DateTime),
        sa.Column("running", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("completed", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("failed", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
    )
    op.create_index("ix_workers_status", "workers", ["status"])
    op.create_table(
        "queues",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("min_workers", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("max_workers", sa.Integer, nullable=False, server_default=sa.text("4")),
        sa.Column("concurrency_limit", sa.Integer),
        sa.Column("paused", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_queues"),
    )


def downgrade() -> None:
    for table in ("queues", "workers", "checkpoints", "executions", "configs"):
        op.drop_table(table)
