"""flatmachines' contracts on the store: locks for any key, results of any URI

Revision ID: 0010
Revises: 0009

``locks``: an ExecutionLock held on a key that is not a claim's own
(persistence.FencedLock); a row goes when its holder releases it, is taken
over by the next acquire once it has expired, and retention removes expired
rows. ``results``: ResultBackend writes for ids that are not executions
(children.StoreResults); a row goes with ``delete(uri)``, or with retention
once it is as old as the finished executions retention removes.
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "locks",
        sa.Column("key", sa.String(400), nullable=False),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("acquired_at", sa.DateTime, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_locks"),
    )
    op.create_index("ix_locks_expires_at", "locks", ["expires_at"])
    op.create_table(
        "results",
        sa.Column("uri", sa.String(600), nullable=False),
        sa.Column("data", sa.JSON),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("uri", name="pk_results"),
    )
    op.create_index("ix_results_created_at", "results", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_results_created_at", "results")
    op.drop_table("results")
    op.drop_index("ix_locks_expires_at", "locks")
    op.drop_table("locks")
