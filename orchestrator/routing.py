"""Routing by hooks: a worker claims only what it can run (pure functions).

An execution *needs* the hooks its machine names (``lifecycle_hooks`` and
each state's ``hooks``): a canonical string, kept with its config and on the
execution row, so a claim can ask for the executions a worker can run through
an index. A worker *can run* a need if it registered every name in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def hook_names(config: Any) -> frozenset[str]:
    """Every hooks name a config refers to (lifecycle and per state); none in
    a value that is not a machine's mapping (a config store holds any text)."""
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        return frozenset()
    refs: list[Any] = [data.get("lifecycle_hooks")]
    states = data.get("states")
    for state in (states if isinstance(states, dict) else {}).values():
        if isinstance(state, dict):
            refs.append(state.get("hooks"))
    names: set[str] = set()

    def collect(ref: Any) -> None:
        if isinstance(ref, str):
            names.add(ref)
        elif isinstance(ref, dict) and isinstance(ref.get("name"), str):
            names.add(ref["name"])
        elif isinstance(ref, list):
            for r in ref:
                collect(r)

    for ref in refs:
        collect(ref)
    return frozenset(names)


def needs_of(config: Any) -> str:
    """The canonical need of a config: its hook names, sorted, comma-joined."""
    return ",".join(sorted(hook_names(config)))


def names_in(needs: str) -> frozenset[str]:
    return frozenset(n for n in needs.split(",") if n)


def can_run(needs: str, hooks: Iterable[str]) -> bool:
    return names_in(needs) <= set(hooks)


def runnable(needs_values: Iterable[str], hooks: Iterable[str]) -> list[str]:
    """Which of these needs a worker with ``hooks`` can run."""
    have = set(hooks)
    return sorted(v for v in set(needs_values) if names_in(v) <= have)


def missing_hooks(
    queue: str,
    needs: Iterable[str],
    workers: Iterable[tuple[str, list[str] | None, list[str] | None]],
) -> list[str]:
    """The hook names of each of ``needs`` that no live worker of ``queue`` can
    run. ``workers``: each one's (status, queues, hooks)."""
    live = [
        set(hooks)
        for status, queues, hooks in workers
        if status in ("active", "draining") and queue in (queues or []) and hooks is not None
    ]
    missing: set[str] = set()
    for need in needs:
        wanted = names_in(need)
        if not any(wanted <= have for have in live):
            missing |= wanted  # no one worker of the queue has them all
    return sorted(missing)
