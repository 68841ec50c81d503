"""claim index: priority DESC on SQLite too

Revision 0001 asked for ``priority DESC`` through a text expression, which
PostgreSQL kept and SQLite's DDL dropped. An ascending priority cannot serve
``ORDER BY priority DESC, created_at``, so every SQLite claim sorted the whole
queued backlog (8.8 claims/s at 100,000 queued). Rebuilt here with the order
spelled out; PostgreSQL already has it.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

CLAIM_INDEX = (
    "CREATE INDEX ix_executions_claim ON executions (queue, status, priority DESC, created_at)"
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute("DROP INDEX IF EXISTS ix_executions_claim")
    op.execute(CLAIM_INDEX)


def downgrade() -> None:
    pass  # the DESC index serves 0002's queries as well
