"""waits and signals: a waiting execution's channel and wake-up time, the reason
a cancel gave, and durable signals

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("executions") as t:
        t.add_column(sa.Column("waiting_channel", sa.String(400)))
        t.add_column(sa.Column("wake_at", sa.DateTime))
        t.add_column(sa.Column("cancel_reason", sa.Text))
    op.create_index("ix_executions_waiting", "executions", ["status", "waiting_channel"])
    op.create_index("ix_executions_wake", "executions", ["status", "wake_at"])
    op.create_table(
        "signals",
        sa.Column("id", BigId, nullable=False, autoincrement=True),
        sa.Column("channel", sa.String(400), nullable=False),
        sa.Column("data", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("assigned_to", sa.String(200)),
        sa.Column("consumed_at", sa.DateTime),
        sa.PrimaryKeyConstraint("id", name="pk_signals"),
    )
    op.create_index("ix_signals_channel", "signals", ["channel", "consumed_at", "id"])
    op.create_index("ix_signals_assigned_to", "signals", ["assigned_to"])


def downgrade() -> None:
    op.drop_table("signals")
    op.drop_index("ix_executions_wake", "executions")
    op.drop_index("ix_executions_waiting", "executions")
    with op.batch_alter_table("executions") as t:
        t.drop_column("cancel_reason")
        t.drop_column("wake_at")
        t.drop_column("waiting_channel")
