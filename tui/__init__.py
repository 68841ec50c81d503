"""`orch tui`: a live Textual console for workers, queues and executions."""

from .app import OrchApp

__all__ = ["OrchApp"]
