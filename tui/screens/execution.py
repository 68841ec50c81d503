"""One execution: its status, error, children, and checkpoint timeline."""

from __future__ import annotations

import json

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Label, Static

from orchestrator.display import shown, text
from orchestrator.errors import StoreUnavailable, UserError
from orchestrator.schemas import Execution

from .. import format as fmt
from ..widgets import Banner, Refillable
from .live import LiveScreen
from .prompts import ForkPrompt, JsonView


class Timeline(Refillable):
    COLUMNS = ("#", "step", "event", "state", "at")


class Children(Refillable):
    COLUMNS = ("child", "machine", "status")


class ExecutionScreen(LiveScreen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "cancel", "Cancel"),
        Binding("R", "retry", "Retry"),
        Binding("s", "signal", "Signal"),
        Binding("F", "fork", "Fork here"),
        Binding("o", "open_context", "Context"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self, execution_id: str):
        super().__init__()
        self.execution_id = execution_id
        self.execution: Execution | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Banner(classes="banner hidden", id="banner")
        with Vertical():
            yield Static("", id="summary", classes="summary")
            with Horizontal(classes="detail"):
                with VerticalScroll(id="error-box", classes="error-box"):
                    yield Static("", id="error")
                with Vertical(classes="children"):
                    yield Label("Children (enter opens one)", classes="section")
                    yield Children(id="children")
            yield Label("Timeline (enter or o: the context at that checkpoint)", classes="section")
            yield Timeline(id="timeline")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(self.app.refresh_every, self.refresh_data)
        self.refresh_data()

    async def _read(self) -> None:
        try:
            ex = await self.app.orch.get(self.execution_id, detail=True)
        except StoreUnavailable as exc:
            self.app.database_down(str(exc))
            return
        except UserError as exc:
            self.query_one("#summary", Static).update(text(exc))
            return
        self.app.database_down(None)
        self.execution = ex
        self.query_one("#summary", Static).update(self.summary(ex))
        problem = ex.error or (f"cancelled: {ex.cancel_reason}" if ex.cancel_reason else "")
        self.query_one("#error", Static).update(
            text(problem or "no error", style="red" if problem else "dim", multiline=True)
        )
        self.query_one(Children).refill(
            (c.id, (text(c.id), text(c.machine), fmt.status(c.status))) for c in ex.children or []
        )
        self.query_one(Timeline).refill(
            (
                str(h.seq),
                (str(h.seq), str(h.step), text(h.event), text(h.state), fmt.clock(h.at)),
            )
            for h in ex.history or []
        )

    @staticmethod
    def summary(ex: Execution) -> Text:
        summary = Text()
        summary.append(shown(ex.id), style="bold")
        summary.append(f"  {shown(ex.machine)}  ")
        summary.append_text(fmt.status(ex.status))
        lines = [
            f"attempt {ex.attempt} · recoveries {ex.recoveries} · fence {ex.fence} · "
            f"queue {ex.queue} · worker {ex.worker_id or '-'} · state {ex.current_state or '-'}",
        ]
        waits = fmt.waits_for(ex)
        if waits:
            lines.append(f"waiting on {waits}")
        if ex.parent_id:
            lines.append(f"parent {ex.parent_id} · root {ex.root_id}")
        lines.append(f"input  {json.dumps(ex.input)}"[:400])
        lines.append(f"output {json.dumps(ex.output)}"[:400])
        summary.append("\n" + "\n".join(shown(line) for line in lines))
        return summary

    # ------------------------------------------------------------- actions

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if isinstance(event.data_table, Children):
            self.app.push_screen(ExecutionScreen(event.row_key.value))
        elif isinstance(event.data_table, Timeline):
            self.show_context(int(event.row_key.value))

    def action_open_context(self) -> None:
        seq = self.query_one(Timeline).selected_key()
        if seq is not None:
            self.show_context(int(seq))

    @work(group="actions")
    async def show_context(self, seq: int) -> None:
        try:
            context = await self.app.orch.checkpoint_context(self.execution_id, seq)
        except (StoreUnavailable, UserError) as exc:
            self.app.notify(shown(exc), severity="error", markup=False)
            return
        self.app.push_screen(JsonView(f"{self.execution_id}: context at checkpoint {seq}", context))

    def action_refresh(self) -> None:
        self.refresh_data()

    def action_cancel(self) -> None:
        self.app.cancel_execution(self.execution_id, self.refresh_data)

    def action_retry(self) -> None:
        self.app.retry_execution(self.execution_id, self.refresh_data)

    def action_signal(self) -> None:
        self.app.send_signal(self.execution_id, self.refresh_data)

    def action_fork(self) -> None:
        seq = self.query_one(Timeline).selected_key()
        history = {
            str(h.seq): h for h in (self.execution.history if self.execution else None) or []
        }
        if seq not in history:
            return self.app.notify("select a checkpoint in the timeline first", severity="warning")
        self.fork_at(history[seq].step)

    @work(group="actions")
    async def fork_at(self, step: int) -> None:
        answer = await self.app.push_screen_wait(ForkPrompt(self.execution_id, step))
        if answer is None:
            return
        new_id, patch = answer
        fork = await self.app.act(
            self.app.orch.fork(self.execution_id, step, id=new_id, context_patch=patch),
            "forked",
        )
        if fork is not None:
            self.app.push_screen(ExecutionScreen(fork.id))
