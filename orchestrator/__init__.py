"""flatorch: durable FlatMachine executions on a shared SQL store."""

import os

# flatmachines logs every machine it builds at INFO on stdout, and a worker
# builds one per execution: the library stays at WARNING unless asked otherwise
os.environ.setdefault("FLATAGENTS_LOG_LEVEL", "WARNING")
# litellm (the `llm` extra) fetches its model price list from the network when
# imported, retrying for seconds where there is none; a worker uses its copy
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

_LAZY = {
    "Orchestrator": ".api",
    "SyncOrchestrator": ".api",
    "ExecutionFailed": ".api",
    "WaitTimeout": ".errors",
    "OrchError": ".errors",
    "StoreUnavailable": ".errors",
    "UserError": ".errors",
    "idempotency_key": ".idempotency",
    "load_machine_file": ".machine_config",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    """Imported on first use: `orch --help` need not load the engine."""
    if name not in _LAZY:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
