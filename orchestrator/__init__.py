"""flatorch: durable FlatMachine executions on a shared SQL store."""

from .idempotency import idempotency_key

__all__ = ["idempotency_key"]
