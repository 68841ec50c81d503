"""cron schedules: an overlap policy, the tick it holds, the last tick it skipped

Revision ID: 0008
Revises: 0007

Schedules made before this revision get 'skip', the default: a tick that
finds the schedule's last run unfinished submits nothing (they used to pile
up). The columns live on the schedule's row and go with it (`orch schedule
remove`); retention removes finished executions, never a schedule, so it has
nothing of these to remove.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("schedules") as t:
        t.add_column(sa.Column("overlap", sa.String(20), nullable=False, server_default="skip"))
        t.add_column(sa.Column("buffered_at", sa.DateTime))
        t.add_column(sa.Column("last_skipped_at", sa.DateTime))


def downgrade() -> None:
    with op.batch_alter_table("schedules") as t:
        t.drop_column("last_skipped_at")
        t.drop_column("buffered_at")
        t.drop_column("overlap")
