"""The shared store: SQLAlchemy schema, migrations and every query, cut by aggregate."""

from .records import (
    CheckpointRecord,
    CheckpointRow,
    Claim,
    Execution,
    NewExecution,
    WorkerRecord,
)
from .store import Store

__all__ = [
    "Store",
    "Execution",
    "NewExecution",
    "Claim",
    "CheckpointRecord",
    "CheckpointRow",
    "WorkerRecord",
]
