"""Durable timers, in plain flatmachine YAML (pure functions, no store).

A ``wait_for`` channel that starts with ``sleep:`` or ``until:`` is a timer:

    nap:
      wait_for: "sleep:{{ context.delay }}"     # 90, 90s, 15m, 2h, 1d, 1h30m
    wake:
      wait_for: "until:2026-12-24T09:00:00Z"    # ISO 8601; no offset means UTC

A signal wait with a ``timeout:`` (seconds) has a deadline: the state ends
with whichever comes first, the signal (its data is the state's output) or the
deadline (the output is ``{"timed_out": true}``). The execution waits as
``waiting`` with no worker; the first claim after the due time resumes it.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

SLEEP, UNTIL = "sleep:", "until:"
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
# No wait is longer: past it a wake-up time no longer fits a datetime.
MAX_SECONDS = 100 * 366 * 86400


def is_timer(channel: str) -> bool:
    return channel.startswith((SLEEP, UNTIL))


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '15m', '2h', '1d', '1h30m' or '1.5h'."""
    raw = text.strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        parts = _PART.findall(raw)
        if not raw or "".join(n + u for n, u in parts) != raw:
            raise ValueError(
                f"'{text}' is not a duration: give seconds (90) or units such as 90s, 15m, "
                "2h, 1d, 1h30m"
            ) from None
        seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    return check_seconds(seconds, f"'{text}'")


def check_seconds(seconds: float, what: str) -> float:
    """A wait's length: finite, not negative, at most ``MAX_SECONDS`` (100 years)."""
    if not math.isfinite(seconds):
        raise ValueError(f"{what} is not a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"{what} is a negative duration")
    if seconds > MAX_SECONDS:
        raise ValueError(f"{what} is longer than 100 years ({MAX_SECONDS} seconds)")
    return seconds


def parse_time(text: str) -> datetime:
    """An ISO 8601 time as naive UTC (no offset means UTC)."""
    raw = text.strip()
    try:
        at = datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise ValueError(
            f"'{text}' is not a time: give ISO 8601 such as 2026-12-24T09:00:00Z"
        ) from None
    return at.astimezone(UTC).replace(tzinfo=None) if at.tzinfo else at


def wake_time(channel: str, now: datetime) -> datetime:
    """When a timer channel fires. ValueError (naming the fix) if it does not parse."""
    if channel.startswith(SLEEP):
        return now + timedelta(seconds=parse_duration(channel[len(SLEEP) :]))
    if channel.startswith(UNTIL):
        return parse_time(channel[len(UNTIL) :])
    raise ValueError(f"'{channel}' is not a timer channel")


def wake_at(channel: str, timeout: Any, now: datetime) -> datetime | None:
    """When a parked wait wakes by itself: a timer's time, a signal wait's
    deadline (``timeout`` seconds from now), or never (None)."""
    if is_timer(channel):
        return wake_time(channel, now)
    if timeout is None:
        return None
    return now + timedelta(seconds=check_seconds(float(timeout), "the wait's timeout"))


def due(at: datetime | None, now: datetime) -> bool:
    return at is not None and at <= now


def check_literal(channel: str) -> None:
    """At submit: a timer written out in full must parse (a templated one is
    checked when it runs)."""
    if is_timer(channel) and "{{" not in channel and "{%" not in channel:
        wake_time(channel, datetime(2000, 1, 1))
