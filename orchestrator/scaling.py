"""Autoscaling decisions: a pure function of a queue's state and its policy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


@dataclass(frozen=True, slots=True)
class Decision:
    queue: str
    current: int
    desired: int
    reason: str
    spawn: int = 0  # workers to start
    drain: list[str] = field(default_factory=list)  # idle workers to drain

    @property
    def changes(self) -> bool:
        return bool(self.spawn or self.drain)


def desired_workers(demand: int, per_worker: int, min_workers: int, max_workers: int) -> int:
    """clamp(ceil(demand / per_worker), min, max)."""
    wanted = math.ceil(demand / max(1, per_worker))
    return max(min_workers, min(max_workers, wanted))


def decide(queue: dict[str, Any], *, pending: int, now: datetime, cooldown: float) -> Decision:
    """What to do for one queue.

    ``queue`` is one entry of Store.scaling_snapshot(); ``pending`` counts
    workers started but not yet registered. The demand is the runnable backlog
    plus what the live workers run: a worker busy with a long state is still
    needed. Scale down drains idle workers only (idle by the store's claims),
    so no running execution is interrupted.
    """
    name = queue["queue"]
    live = queue["workers"]
    current = len(live) + pending
    demand = queue["backlog"] + queue["running"]
    desired = desired_workers(
        demand, queue["per_worker"], queue["min_workers"], queue["max_workers"]
    )
    why = (
        f"backlog {queue['backlog']} + running {queue['running']} at "
        f"{queue['per_worker']} per worker wants "
        f"{desired} (min {queue['min_workers']}, max {queue['max_workers']})"
    )
    if queue.get("paused") or desired == current:
        return Decision(name, current, current, why)
    last = queue.get("last_scaled_at")
    below_min = current < queue["min_workers"]
    # the cool-down damps elastic moves; lost capacity below min is replaced at once
    if last is not None and now - last < timedelta(seconds=cooldown) and not below_min:
        return Decision(name, current, current, f"{why}; cooling down")
    if desired > current:
        return Decision(
            name, current, desired, f"{why}: start {desired - current}", spawn=desired - current
        )
    idle = [w["id"] for w in live if not w["running"]]
    drain = idle[: current - desired]
    if not drain:
        return Decision(name, current, current, f"{why}; no idle worker to drain")
    return Decision(
        name, current, current - len(drain), f"{why}: drain {len(drain)} idle", drain=drain
    )
