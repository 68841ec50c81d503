"""Results written through flatmachines' ResultBackend for ids that are not
executions (children.StoreResults): one row per URI, the last write wins, as
in the library's backends. An execution's own result is its outcome (its row),
never a row here."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..clock import utcnow
from .db import Database
from .models import executions, results


class Results:
    def __init__(self, db: Database):
        self.db = db

    async def write_result(self, uri: str, data: Any, *, outcome_of: str | None = None) -> bool:
        """Keep ``data`` at ``uri``; False (nothing written) if ``outcome_of``
        is an execution of the store, whose result is its outcome."""
        stmt = self.db.insert(results).values(uri=uri, data=data, created_at=utcnow())
        stmt = stmt.on_conflict_do_update(
            index_elements=["uri"],
            set_={"data": stmt.excluded.data, "created_at": stmt.excluded.created_at},
        )

        def tx(conn: sa.Connection) -> bool:
            if outcome_of is not None and conn.scalar(
                sa.select(executions.c.id).where(executions.c.id == outcome_of)
            ):
                return False
            conn.execute(stmt)
            return True

        return await self.db.write(tx)

    async def read_result(self, uri: str) -> tuple[bool, Any]:
        """(True, data) if a result was written at ``uri``, else (False, None)."""

        def tx(conn: sa.Connection) -> tuple[bool, Any]:
            row = conn.execute(sa.select(results.c.data).where(results.c.uri == uri)).first()
            return (True, row.data) if row is not None else (False, None)

        return await self.db.read(tx)

    async def delete_result(self, uri: str) -> None:
        def tx(conn: sa.Connection) -> None:
            conn.execute(sa.delete(results).where(results.c.uri == uri))

        await self.db.write(tx)
