"""Machine configs by content hash: an execution runs the config it was submitted with."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
import yaml

from ..clock import utcnow
from ..routing import needs_of
from ..safeyaml import YAMLTooBig, load
from .db import Database
from .models import configs, executions


class Configs:
    def __init__(self, db: Database):
        self.db = db

    async def put_config(
        self, config_hash: str, machine_name: str, raw: str, needs: str | None = None
    ) -> str:
        """Keep a config by its hash, with what it needs (its hook names; parsed
        from ``raw`` unless given). Any text is kept, as flatmachines' config
        stores keep it: text that is not a machine's YAML mapping needs nothing
        (and no execution can run it)."""
        if needs is None:
            needs = needs_of(_parsed(raw))
        stmt = (
            self.db.insert(configs)
            .values(
                hash=config_hash,
                machine_name=machine_name,
                raw=raw,
                needs=needs,
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["hash"])
        )

        def tx(conn: sa.Connection) -> None:
            conn.execute(stmt)

        await self.db.write(tx)
        return config_hash

    async def get_config(self, config_hash: str) -> str | None:
        def tx(conn: sa.Connection) -> str | None:
            return conn.scalar(sa.select(configs.c.raw).where(configs.c.hash == config_hash))

        return await self.db.read(tx)

    async def delete_config(self, config_hash: str) -> None:
        def tx(conn: sa.Connection) -> None:
            in_use = sa.select(executions.c.id).where(executions.c.config_hash == config_hash)
            conn.execute(
                sa.delete(configs).where(configs.c.hash == config_hash, ~sa.exists(in_use))
            )

        await self.db.write(tx)


def _parsed(raw: str) -> Any:
    """The YAML of ``raw``, or None for text that is not YAML (or too big to be)."""
    try:
        return load(raw)
    except (yaml.YAMLError, YAMLTooBig):
        return None
