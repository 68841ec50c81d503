"""routing by hooks: what an execution needs, what a worker has

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
import yaml
from alembic import op

from orchestrator.routing import needs_of

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

CLAIM_INDEX = (
    "CREATE INDEX ix_executions_claim_needs ON executions"
    " (queue, needs, status, priority DESC, created_at)"
)


def upgrade() -> None:
    with op.batch_alter_table("configs") as t:
        t.add_column(sa.Column("needs", sa.String(400), nullable=False, server_default=""))
    with op.batch_alter_table("executions") as t:
        t.add_column(sa.Column("needs", sa.String(400), nullable=False, server_default=""))
    with op.batch_alter_table("workers") as t:
        t.add_column(sa.Column("hooks", sa.JSON))
    # what the configs already stored need, and their executions with them
    bind = op.get_bind()
    for config_hash, raw in bind.execute(sa.text("SELECT hash, raw FROM configs")).all():
        try:
            needs = needs_of(yaml.safe_load(raw) or {})
        except yaml.YAMLError:
            continue
        if needs:
            params = {"n": needs, "h": config_hash}
            bind.execute(sa.text("UPDATE configs SET needs = :n WHERE hash = :h"), params)
            bind.execute(sa.text("UPDATE executions SET needs = :n WHERE config_hash = :h"), params)
    op.execute(CLAIM_INDEX)


def downgrade() -> None:
    op.drop_index("ix_executions_claim_needs", "executions")
    with op.batch_alter_table("workers") as t:
        t.drop_column("hooks")
    with op.batch_alter_table("executions") as t:
        t.drop_column("needs")
    with op.batch_alter_table("configs") as t:
        t.drop_column("needs")
