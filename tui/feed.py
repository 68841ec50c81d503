"""What the console shows, read through the public API (no SQL here).

Every read is a coroutine of ``orchestrator.Orchestrator``: its transaction
runs on a store thread, so the event loop (the UI) never waits on the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from orchestrator import Orchestrator
from orchestrator.schemas import Execution, QueueStats, Worker

STATUSES = ("queued", "running", "waiting", "completed", "failed", "cancelled")


@dataclass(frozen=True)
class Filters:
    status: str | None = None
    queue: str | None = None
    parent: str | None = None
    text: str | None = None
    page: int = 0

    def describe(self) -> str:
        parts = [
            f"{name}={value}"
            for name, value in (
                ("status", self.status),
                ("queue", self.queue),
                ("parent", self.parent),
                ("text", self.text),
            )
            if value
        ]
        return ", ".join(parts) or "none"

    def turn(self, pages: int) -> Filters:
        return replace(self, page=max(0, self.page + pages))


@dataclass
class Overview:
    workers: list[Worker] = field(default_factory=list)
    queues: list[QueueStats] = field(default_factory=list)
    throughput: list[int] = field(default_factory=list)


class Feed:
    PAGE = 50

    def __init__(self, orch: Orchestrator):
        self.orch = orch

    async def overview(self) -> Overview:
        return Overview(
            workers=await self.orch.workers(),
            queues=await self.orch.queues(),
            throughput=await self.orch.throughput(buckets=60, seconds=10),
        )

    async def executions(self, f: Filters) -> list[Execution]:
        return await self.orch.list(
            status=f.status,
            queue=f.queue,
            parent=f.parent,
            text=f.text,
            limit=self.PAGE,
            offset=f.page * self.PAGE,
        )
