"""The orchestrator's own control loops, as FlatMachine YAML."""

from pathlib import Path

MACHINES_DIR = Path(__file__).parent


def path(name: str) -> Path:
    """Path of a shipped machine, e.g. path('worker') -> .../machines/worker.yml."""
    return MACHINES_DIR / f"{name}.yml"
