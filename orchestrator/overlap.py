"""What a cron schedule's tick does while the schedule's previous run is
unfinished (after Temporal's ScheduleOverlapPolicy): a pure decision, which
the store applies in the transaction that fires the schedule's ticks.

- ``skip`` (the default): the tick submits nothing, so runs longer than the
  period never pile up; the schedule records the tick it skipped.
- ``allow``: every tick submits a run, however many are unfinished.
- ``buffer_one``: the first tick that finds a run unfinished is held and
  submitted as soon as that run finishes; later ticks meanwhile are skipped.
- ``cancel_other``: the tick is held as with buffer_one and the unfinished
  run is cancelled; the held tick is submitted once the cancel committed.
"""

from __future__ import annotations

from typing import Literal

SKIP, ALLOW, BUFFER_ONE, CANCEL_OTHER = "skip", "allow", "buffer_one", "cancel_other"
POLICIES = (SKIP, ALLOW, BUFFER_ONE, CANCEL_OTHER)
DEFAULT = SKIP

TickAction = Literal["fire", "buffer", "skip"]


def on_tick(policy: str, *, running: bool, buffered: bool) -> TickAction:
    """What a due tick does: ``running`` if the schedule's last run is
    unfinished, ``buffered`` if a tick is held already."""
    if not running or policy == ALLOW:
        return "fire"
    if policy in (BUFFER_ONE, CANCEL_OTHER) and not buffered:
        return "buffer"
    return "skip"


def cancels(policy: str, *, running: bool, buffered: bool) -> bool:
    """Whether the unfinished run is to be cancelled for the held tick."""
    return policy == CANCEL_OTHER and running and buffered
