"""flatorch: durable FlatMachine executions on a shared SQL store."""

from .api import ExecutionFailed, Orchestrator, SyncOrchestrator
from .client import WaitTimeout
from .errors import OrchError, StoreUnavailable, UserError
from .idempotency import idempotency_key

__all__ = [
    "Orchestrator",
    "SyncOrchestrator",
    "ExecutionFailed",
    "WaitTimeout",
    "OrchError",
    "StoreUnavailable",
    "UserError",
    "idempotency_key",
]
