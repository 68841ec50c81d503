"""The console's tables: each refills itself from a snapshot, keeping the cursor."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.text import Text
from textual.widgets import DataTable, Static

from orchestrator.display import text
from orchestrator.schemas import Execution, QueueStats, Worker

from . import format as fmt


class Refillable(DataTable):
    """A DataTable whose rows are replaced on each refresh; the cursor stays on
    the row (by key) it was on."""

    COLUMNS: Sequence[str] = ()

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        self.add_columns(*self.COLUMNS)

    def refill(self, rows: Iterable[tuple[str, Sequence[Any]]]) -> None:
        selected = self.selected_key()
        self.clear()
        for key, cells in rows:
            self.add_row(*cells, key=key)
        if selected is not None and selected in self.rows:
            self.move_cursor(row=self.get_row_index(selected), animate=False)

    def selected_key(self) -> str | None:
        if not self.row_count:
            return None
        try:
            key = self.coordinate_to_cell_key(self.cursor_coordinate).row_key
        except Exception:  # no row under the cursor
            return None
        return key.value


class WorkersTable(Refillable):
    COLUMNS = (
        "worker",
        "host",
        "pid",
        "status",
        "heartbeat",
        "queues",
        "running",
        "done",
        "failed",
    )

    def show(self, workers: list[Worker], ttl: float) -> None:
        self.refill(
            (
                w.id,
                (
                    text(w.id),
                    text(w.host),
                    str(w.pid),
                    fmt.status(w.status),
                    fmt.heartbeat(w.last_heartbeat, ttl),
                    text(",".join(w.queues)),
                    f"{w.running}/{w.concurrency}",
                    str(w.completed),
                    str(w.failed),
                ),
            )
            for w in workers
        )


class QueuesTable(Refillable):
    COLUMNS = (
        "queue",
        "queued",
        "running",
        "waiting",
        "completed",
        "failed",
        "workers",
        "pool",
        "paused",
    )

    def show(self, queues: list[QueueStats]) -> None:
        self.refill(
            (
                q.queue,
                (
                    text(q.queue),
                    str(q.queued),
                    str(q.running),
                    str(q.waiting),
                    str(q.completed),
                    Text(str(q.failed), style="bold red" if q.failed else ""),
                    str(q.workers),
                    f"{q.min_workers}-{q.max_workers}",
                    Text("paused", style="bold yellow") if q.paused else "",
                ),
            )
            for q in queues
        )


class ExecutionsTable(Refillable):
    COLUMNS = ("id", "machine", "status", "queue", "state", "waits for", "attempt", "updated")

    def show(self, executions: list[Execution]) -> None:
        self.refill(
            (
                ex.id,
                (
                    text(ex.id),
                    text(ex.machine),
                    fmt.status(ex.status),
                    text(ex.queue),
                    text(ex.current_state),
                    text(fmt.waits_for(ex)),
                    str(ex.attempt),
                    fmt.clock(ex.updated_at),
                ),
            )
            for ex in executions
        )


class Banner(Static):
    """Says the database is not answering, while it is not."""

    def say(self, message: str | None) -> None:
        if message is None:
            self.add_class("hidden")
            return
        self.update(text(f"database not answering: {message} — retrying"))
        self.remove_class("hidden")
