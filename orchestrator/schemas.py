"""What the public API returns: pydantic models, the same fields (and, as JSON,
the same keys and time format) as the ``orch … --json`` commands print."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer

from .clock import iso
from .store import records

Timestamp = Annotated[datetime | None, PlainSerializer(iso, return_type=str | None)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict: times as ISO strings, unset extras left out."""
        return self.model_dump(mode="json", exclude_none=False, exclude=self._unset_extras())

    def _unset_extras(self) -> set[str]:
        return set()


class Checkpoint(_Model):
    step: int
    event: str
    state: str | None
    at: Timestamp
    seq: int | None = None  # its number: `Orchestrator.checkpoint_context(id, seq)`


class Child(_Model):
    id: str
    machine: str
    status: str


class Execution(_Model):
    id: str
    machine: str
    status: str
    queue: str
    priority: int
    attempt: int
    recoveries: int
    worker_id: str | None
    input: dict[str, Any]
    output: Any
    error: str | None
    current_state: str | None
    step: int
    fence: int
    config_hash: str
    created_at: Timestamp
    updated_at: Timestamp
    started_at: Timestamp
    finished_at: Timestamp
    parent_id: str | None
    root_id: str | None
    waiting_channel: str | None
    wake_at: Timestamp
    cancel_reason: str | None
    needs: str = ""  # the hooks it needs, comma-separated (a worker claims it only with them)
    # with `get(id, detail=True)` / `orch show`
    children: list[Child] | None = None
    history: list[Checkpoint] | None = None
    missing_hooks: list[str] | None = None  # queued, and no live worker of its queue has these

    @property
    def is_final(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    def _unset_extras(self) -> set[str]:
        extras = ("children", "history", "missing_hooks")
        return {name for name in extras if getattr(self, name) is None}

    @classmethod
    def of(
        cls,
        ex: records.Execution,
        *,
        history: list[records.CheckpointRecord] | None = None,
        children: list[records.Execution] | None = None,
        missing_hooks: list[str] | None = None,
    ) -> Execution:
        fields = {name: getattr(ex, name) for name in cls.model_fields if hasattr(ex, name)}
        fields["missing_hooks"] = missing_hooks
        if history is not None:
            fields["history"] = [
                Checkpoint(step=h.step, event=h.event, state=h.state, at=h.at, seq=h.seq)
                for h in history
            ]
        if children is not None:
            fields["children"] = [
                Child(id=c.id, machine=c.machine, status=c.status) for c in children
            ]
        return cls(**fields)


class Worker(_Model):
    id: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    status: str
    running: int
    completed: int
    failed: int
    started_at: Timestamp
    last_heartbeat: Timestamp
    stopped_at: Timestamp

    @classmethod
    def of(cls, w: records.WorkerRecord) -> Worker:
        return cls(**{name: getattr(w, name) for name in cls.model_fields})


class ScalingEvent(_Model):
    at: Timestamp
    from_workers: int
    to_workers: int
    reason: str


class QueueStats(_Model):
    queue: str
    queued: int = 0
    running: int = 0
    waiting: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    workers: int = 0
    min_workers: int = 0
    max_workers: int = 0
    per_worker: int = 0
    paused: bool = False
    # hooks that queued executions need and no live worker of the queue has
    waiting_for_hooks: list[str] = []
    scaling_events: list[ScalingEvent] = []


class Schedule(_Model):
    name: str
    machine: str
    cron: str
    queue: str
    input: dict[str, Any]
    next_fire_at: Timestamp
    last_fired_at: Timestamp
    overlap: str  # skip | allow | buffer_one | cancel_other (overlap.py)
    buffered_at: Timestamp  # the tick held for after the last run (buffer_one)
    last_skipped_at: Timestamp


class Signal(_Model):
    id: int
    channel: str
    data: Any
    created_at: Timestamp
    taken_by: str | None


class SignalSent(_Model):
    id: int
    channel: str
    woken: list[str]  # the execution it was given to, if one was waiting
