"""Stable keys for side effects in hooks."""

from collections.abc import Mapping
from typing import Any


def idempotency_key(context: Mapping[str, Any]) -> str:
    """``<execution id>:<step>`` of the state now running.

    The same across every run of that state (a crash makes the in-flight state
    run again, at least once), and different for every other state, so an
    external system can drop a repeated side effect.
    """
    machine = context["machine"]
    return f"{machine['execution_id']}:{machine['step']}"
