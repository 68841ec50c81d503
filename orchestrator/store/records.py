"""The store's records: what a verb takes in and hands back (immutable)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from .models import FINAL_STATUSES


@dataclass(frozen=True, slots=True)
class Execution:
    id: str
    machine: str
    config_hash: str
    queue: str
    priority: int
    status: str
    input: dict[str, Any]
    output: Any
    error: str | None
    attempt: int
    max_attempts: int
    retry_backoff: float
    retry_backoff_max: float
    recoveries: int
    not_before: datetime | None
    parent_id: str | None
    worker_id: str | None
    lease_until: datetime | None
    fence: int
    current_state: str | None
    step: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    waiting_channel: str | None = None
    wake_at: datetime | None = None
    cancel_reason: str | None = None
    root_id: str | None = None
    parent_group: str | None = None
    group_mode: str | None = None
    needs: str = ""

    @classmethod
    def from_row(cls, row: Any) -> Execution:
        return cls(**{f.name: row[f.name] for f in fields(cls)})

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    def defect(self) -> str | None:
        """What makes this row impossible to run (it was written around the
        API, by hand say), or None: the worker fails it instead of crashing."""
        if not isinstance(self.input, dict):
            return "its input is not a JSON object"
        for name in _WHOLE_NUMBERS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                return f"its {name} is not a whole number"
        for name in ("retry_backoff", "retry_backoff_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"its {name} is not a number"
            if not math.isfinite(value) or value <= 0:
                return f"its {name} is not a positive number of seconds"
        if not isinstance(self.config_hash, str) or not self.config_hash:
            return "it names no config"
        if not isinstance(self.created_at, datetime):
            return "its created_at is not a time"
        return None


_WHOLE_NUMBERS = ("priority", "attempt", "max_attempts", "recoveries", "step", "fence")


@dataclass(frozen=True, slots=True)
class NewExecution:
    """What a submit puts in: the caller's side of an executions row."""

    id: str
    machine: str
    config_hash: str
    input: dict[str, Any]
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 1
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    not_before: datetime | None = None
    parent_id: str | None = None
    root_id: str | None = None
    parent_group: str | None = None  # the channel the parent waits on for its group
    group_mode: str | None = None  # settled | any
    needs: str | None = None  # its hook names (routing.py); None: its config's


@dataclass(frozen=True, slots=True)
class Claim:
    """A lease on one execution: valid while the row's fence equals ``fence``."""

    execution: Execution
    worker_id: str
    fence: int
    recovered: bool  # taken over from an expired lease
    # when this process took it (time.monotonic), to know a lease is still young
    taken_at: float = field(default_factory=time.monotonic, compare=False)


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    """One snapshot to write: the library's key and its parsed header fields."""

    execution_id: str
    key: str
    step: int
    event: str
    state: str | None
    snapshot: bytes  # as stored (store/snapshots.py): a full row or a delta
    # when the machine took it (naive UTC); None: when it commits
    at: datetime | None = None
    delta: int = 0  # 1: ``snapshot`` is what changed since the row before it
    blobs: tuple = ()  # snapshots.Blob: big strings it names, new to its execution


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    step: int
    event: str
    state: str | None
    at: datetime
    snapshot: bytes | None = None  # when asked for
    seq: int | None = None  # the checkpoint's number, to ask for it again


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    status: str
    started_at: datetime
    last_heartbeat: datetime
    stopped_at: datetime | None
    running: int
    completed: int
    failed: int
    # flatmachines' RegistrationBackend fields (a distributed-pattern worker)
    capabilities: list[str] | None = None
    metadata: dict[str, Any] | None = None
    current_task_id: str | None = None
    hooks: list[str] | None = None  # the hooks names it registered (an `orch worker`)

    @classmethod
    def from_row(cls, row: Any) -> WorkerRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class SignalRecord:
    """A durable signal; ``assigned_to`` the execution it was given to, until
    that execution's wait commits and it is consumed."""

    id: int
    channel: str
    data: Any
    created_at: datetime
    assigned_to: str | None = None
    consumed_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Any) -> SignalRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class WaitEnd:
    """A wait that ended in this run (a signal taken, a timer or deadline met):
    committed with the next durable write of its progress."""

    consumed: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ScheduleTick:
    """A cron schedule's due tick and what it did (overlap.py): ``fired`` its
    ``execution``; ``buffered`` or ``skipped`` while ``running`` (the id of
    the schedule's last run) was unfinished; ``cancelling``: held, for
    ``running`` to be cancelled (cancel_other)."""

    schedule: str
    tick: datetime
    action: str  # fired | buffered | skipped | cancelling
    execution: Execution | None = None
    running: str | None = None
