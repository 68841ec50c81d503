"""Cron expressions (5 fields, UTC), parsed and stepped by APScheduler's CronTrigger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache

from apscheduler.triggers.cron import CronTrigger

from .errors import UserError


@lru_cache(maxsize=256)
def trigger(expr: str) -> CronTrigger:
    try:
        return CronTrigger.from_crontab(expr, timezone=UTC)
    except (ValueError, TypeError) as exc:
        raise UserError(
            f"invalid cron expression {expr!r}: {exc} "
            "(five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *')"
        ) from None


def next_fire(expr: str, after: datetime) -> datetime:
    """The first tick strictly after ``after`` (naive UTC in, naive UTC out)."""
    start = (after + timedelta(microseconds=1)).replace(tzinfo=UTC)
    fire = trigger(expr).get_next_fire_time(None, start)
    if fire is None:  # pragma: no cover - a 5-field crontab always has a next tick
        raise UserError(f"cron expression {expr!r} never fires again")
    return fire.astimezone(UTC).replace(tzinfo=None)
