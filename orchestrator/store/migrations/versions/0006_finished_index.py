"""finished index: recent completions by time (throughput in `orch tui`)

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_executions_finished", "executions", ["status", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_executions_finished", "executions")
