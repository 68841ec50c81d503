"""scheduler: retry backoff, leader leases, schedules, scaling events, work pools

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("executions") as t:
        t.add_column(
            sa.Column("retry_backoff", sa.Float, nullable=False, server_default=sa.text("1.0"))
        )
        t.add_column(
            sa.Column(
                "retry_backoff_max", sa.Float, nullable=False, server_default=sa.text("300.0")
            )
        )
    with op.batch_alter_table("workers") as t:
        t.add_column(sa.Column("capabilities", sa.JSON))
        t.add_column(sa.Column("metadata", sa.JSON))
        t.add_column(sa.Column("current_task_id", sa.String(200)))
    with op.batch_alter_table("queues") as t:
        t.add_column(
            sa.Column("per_worker", sa.Integer, nullable=False, server_default=sa.text("10"))
        )
        t.add_column(sa.Column("last_scaled_at", sa.DateTime))
    op.create_table(
        "leader_leases",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("fence", sa.BigInteger, nullable=False),
        sa.Column("lease_until", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_leader_leases"),
    )
    op.create_table(
        "schedules",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("machine", sa.String(200), nullable=False),
        sa.Column("config_hash", sa.String(64), nullable=False),
        sa.Column("cron", sa.String(200), nullable=False),
        sa.Column("input", sa.JSON, nullable=False),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("next_fire_at", sa.DateTime, nullable=False),
        sa.Column("last_fired_at", sa.DateTime),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_schedules"),
        sa.ForeignKeyConstraint(
            ["config_hash"], ["configs.hash"], name="fk_schedules_config_hash_configs"
        ),
    )
    op.create_table(
        "scaling_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("from_workers", sa.Integer, nullable=False),
        sa.Column("to_workers", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_scaling_events"),
    )
    op.create_index("ix_scaling_events_queue", "scaling_events", ["queue", "id"])
    op.create_table(
        "work_items",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("pool", sa.String(200), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("claimed_by", sa.String(200)),
        sa.Column("claimed_at", sa.DateTime),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("max_retries", sa.Integer, nullable=False, server_default=sa.text("3")),
        sa.Column("result", sa.JSON),
        sa.Column("error", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_work_items"),
    )
    op.create_index("ix_work_items_claim", "work_items", ["pool", "status", "created_at"])
    op.create_index("ix_work_items_claimed_by", "work_items", ["claimed_by"])


def downgrade() -> None:
    for table in ("work_items", "scaling_events", "schedules", "leader_leases"):
        op.drop_table(table)
    with op.batch_alter_table("queues") as t:
        t.drop_column("last_scaled_at")
        t.drop_column("per_worker")
    with op.batch_alter_table("workers") as t:
        t.drop_column("current_task_id")
        t.drop_column("metadata")
        t.drop_column("capabilities")
    with op.batch_alter_table("executions") as t:
        t.drop_column("retry_backoff_max")
        t.drop_column("retry_backoff")
