"""One clock for every lease decision: naive UTC, patched by freezegun in tests."""

import sys
from datetime import UTC, datetime, timedelta

if sys.version_info < (3, 12):

    def utcnow() -> datetime:
        # the same naive UTC, without an aware time and its replace() (a
        # fifth of the cost; a checkpoint takes one)
        return datetime.utcnow()

else:  # pragma: no cover - utcnow() is deprecated from 3.12

    def utcnow() -> datetime:
        return datetime.now(UTC).replace(tzinfo=None)


def lease_deadline(now: datetime, ttl_seconds: float) -> datetime:
    return now + timedelta(seconds=ttl_seconds)


def renew_interval(ttl_seconds: float) -> float:
    """Renew three times per TTL: one missed renewal never costs the lease."""
    return ttl_seconds / 3


def iso(value: datetime | None) -> str | None:
    """A naive-UTC time as the API and `orch` print it: ISO 8601, milliseconds, Z."""
    return value.isoformat(timespec="milliseconds") + "Z" if value else None
