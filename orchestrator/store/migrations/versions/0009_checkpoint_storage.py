"""checkpoints store what changed: a delta flag on each row, big strings once

Revision ID: 0009
Revises: 0008

Rows written before this revision hold whole snapshots (the library's JSON
text); they get delta = 0 and are read as they are, so unfinished executions
resume from them. ``blobs`` holds big strings of checkpoints once, by a hash of
their text; ``checkpoint_blobs`` links each execution to the blobs it names.
Retention removes an execution's links with it, and a blob once nothing links
it (store/retention.py).
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints") as t:
        t.add_column(sa.Column("delta", sa.Integer, nullable=False, server_default="0"))
    op.create_table(
        "blobs",
        sa.Column("hash", sa.String(32), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("codec", sa.String(8), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("used_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("hash", name="pk_blobs"),
    )
    op.create_index("ix_blobs_used_at", "blobs", ["used_at"])
    op.create_table(
        "checkpoint_blobs",
        sa.Column("execution_id", sa.String(200), nullable=False),
        sa.Column("hash", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("execution_id", "hash", name="pk_checkpoint_blobs"),
    )
    op.create_index("ix_checkpoint_blobs_hash", "checkpoint_blobs", ["hash"])


def downgrade() -> None:
    op.drop_index("ix_checkpoint_blobs_hash", "checkpoint_blobs")
    op.drop_table("checkpoint_blobs")
    op.drop_index("ix_blobs_used_at", "blobs")
    op.drop_table("blobs")
    with op.batch_alter_table("checkpoints") as t:
        t.drop_column("delta")
