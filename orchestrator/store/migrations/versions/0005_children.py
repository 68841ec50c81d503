"""children: an execution's root, and the group of siblings its parent waits on

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as t:
        t.add_column(sa.Column("root_id", sa.String(200)))
        t.add_column(sa.Column("parent_group", sa.String(400)))
        t.add_column(sa.Column("group_mode", sa.String(16)))
    op.create_index("ix_executions_parent", "executions", ["parent_id"])
    op.create_index("ix_executions_parent_group", "executions", ["parent_group"])


def downgrade() -> None:
    op.drop_index("ix_executions_parent_group", "executions")
    op.drop_index("ix_executions_parent", "executions")
    with op.batch_alter_table("executions") as t:
        t.drop_column("group_mode")
        t.drop_column("parent_group")
        t.drop_column("root_id")
