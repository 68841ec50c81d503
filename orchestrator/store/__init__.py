"""The shared store: SQLAlchemy schema, migrations and every query."""

from .store import (
    CheckpointRecord,
    CheckpointRow,
    Claim,
    Execution,
    NewExecution,
    Store,
    WorkerRecord,
)

__all__ = [
    "Store",
    "Execution",
    "NewExecution",
    "Claim",
    "CheckpointRecord",
    "CheckpointRow",
    "WorkerRecord",
]
