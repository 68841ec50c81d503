"""flatorch: durable FlatMachine executions on a shared SQL store."""

import os

# flatmachines logs every machine it builds at INFO on stdout, and a worker
# builds one per execution: the library stays at WARNING unless asked otherwise
os.environ.setdefault("FLATAGENTS_LOG_LEVEL", "WARNING")
# litellm (the `llm` extra) fetches its model price list from the network when
# imported, retrying for seconds where there is none; a worker uses its copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

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
