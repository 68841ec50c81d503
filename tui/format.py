"""How values read in a table cell."""

from __future__ import annotations

from datetime import datetime

from rich.text import Text

from orchestrator.clock import utcnow
from orchestrator.display import text
from orchestrator.schemas import Execution


def now() -> datetime:
    """The console's clock (a picture of the screen pins it)."""
    return utcnow()


STATUS_STYLE = {
    "queued": "cyan",
    "running": "bold yellow",
    "waiting": "magenta",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "dim",
    "active": "green",
    "draining": "yellow",
    "lost": "bold red",
    "stopped": "dim",
}


def status(value: str) -> Text:
    return text(value, style=STATUS_STYLE.get(value, ""))


def age(at: datetime | None) -> str:
    if at is None:
        return ""
    seconds = max(0, int((now() - at).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def heartbeat(at: datetime | None, ttl: float) -> Text:
    """The heartbeat's age, red once it is older than a lease TTL."""
    late = at is not None and (now() - at).total_seconds() > ttl
    return Text(age(at), style="bold red" if late else "")


def clock(at: datetime | None) -> str:
    return at.strftime("%H:%M:%S") if at else ""


def waits_for(ex: Execution) -> str:
    """What a waiting execution waits on: its channel, and its wake-up time."""
    if ex.status != "waiting" and not ex.waiting_channel:
        return ""
    parts = [ex.waiting_channel or ""]
    if ex.wake_at is not None:
        parts.append(f"until {ex.wake_at:%m-%d %H:%M:%S}")
    return " ".join(p for p in parts if p)
