"""The main screen: the overview (workers, queues, throughput) and the executions."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import (
    DataTable,
    Footer,
    Header,
    Label,
    Sparkline,
    Static,
    TabbedContent,
    TabPane,
)

from orchestrator.display import text
from orchestrator.errors import StoreUnavailable

from ..feed import Filters
from ..widgets import Banner, ExecutionsTable, QueuesTable, WorkersTable
from .live import LiveScreen
from .prompts import Confirm, FilterPrompt, Help, ScalePrompt, SignalPrompt


class MainScreen(LiveScreen):
    BINDINGS = [
        Binding("1", "tab('overview')", "Overview"),
        Binding("2", "tab('executions')", "Executions"),
        Binding("c", "cancel", "Cancel"),
        Binding("R", "retry", "Retry"),
        Binding("s", "signal", "Signal"),
        Binding("f", "filter", "Filter"),
        Binding("x", "clear_filter", "Clear filter", show=False),
        Binding("n", "page(1)", "Next page", show=False),
        Binding("p", "page(-1)", "Previous page", show=False),
        Binding("S", "scale", "Scale"),
        Binding("P", "pause", "Pause/resume"),
        Binding("r", "refresh", "Refresh"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.filters = Filters()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Banner(classes="banner hidden", id="banner")
        with TabbedContent(initial="overview", id="tabs"):
            with TabPane("Overview (1)", id="overview"):
                with Vertical():
                    yield Label("Workers", classes="section")
                    yield WorkersTable(id="workers")
                    yield Label("Queues", classes="section")
                    yield QueuesTable(id="queues")
                    with Horizontal(classes="throughput"):
                        yield Label("completed / 10 s, last 10 min ", classes="section")
                        yield Sparkline([0], id="throughput")
                    yield Static("", id="scaling", classes="scaling")
            with TabPane("Executions (2)", id="executions"):
                with Vertical():
                    yield Static("", id="filters", classes="filters")
                    yield ExecutionsTable(id="executions-table")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(self.app.refresh_every, self.refresh_data)
        self.query_one(QueuesTable).focus()
        self.refresh_data()

    # ---------------------------------------------------------------- data

    async def _read(self) -> None:
        if self.app.feed is None:
            return
        try:
            overview = await self.app.feed.overview()
            executions = await self.app.feed.executions(self.filters)
        except StoreUnavailable as exc:
            self.app.database_down(str(exc))
            return
        self.app.database_down(None)
        self.query_one(WorkersTable).show(overview.workers, self.app.lease_ttl)
        self.query_one(QueuesTable).show(overview.queues)
        self.query_one("#throughput", Sparkline).data = overview.throughput or [0]
        events = [
            f"{e.at:%H:%M:%S} {q.queue}: {e.from_workers} -> {e.to_workers} ({e.reason})"
            for q in overview.queues
            for e in q.scaling_events[:2]
        ]
        self.query_one("#scaling", Static).update(
            text("Scaling: " + (" · ".join(events[:3]) if events else "no scaling events yet"))
        )
        self.query_one(ExecutionsTable).show(executions)
        page = f"page {self.filters.page + 1} ({len(executions)} shown; n/p to turn)"
        self.query_one("#filters", Static).update(
            text(f"Filters: {self.filters.describe()} (f to change, x to clear) · {page}")
        )

    # ------------------------------------------------------------- helpers

    def selected_execution(self) -> str | None:
        return self.query_one(ExecutionsTable).selected_key()

    def selected_queue(self) -> str | None:
        return self.query_one(QueuesTable).selected_key()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if isinstance(event.data_table, ExecutionsTable):
            from .execution import ExecutionScreen

            self.app.push_screen(ExecutionScreen(event.row_key.value))

    # ------------------------------------------------------------- actions

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        table = ExecutionsTable if tab == "executions" else QueuesTable
        self.query_one(table).focus()

    def action_refresh(self) -> None:
        self.refresh_data()

    def action_help(self) -> None:
        self.app.push_screen(Help())

    def action_page(self, pages: int) -> None:
        self.filters = self.filters.turn(pages)
        self.refresh_data()

    def action_filter(self) -> None:
        def chosen(filters: Filters | None) -> None:
            if filters is not None:
                self.filters = filters
                self.action_tab("executions")
                self.refresh_data()

        self.app.push_screen(FilterPrompt(self.filters), chosen)

    def action_clear_filter(self) -> None:
        self.filters = Filters()
        self.refresh_data()

    def action_cancel(self) -> None:
        ex_id = self.selected_execution()
        if ex_id:
            self.app.cancel_execution(ex_id, self.refresh_data)

    def action_retry(self) -> None:
        ex_id = self.selected_execution()
        if ex_id:
            self.app.retry_execution(ex_id, self.refresh_data)

    def action_signal(self) -> None:
        self.app.send_signal(self.selected_execution(), self.refresh_data)

    def action_scale(self) -> None:
        name = self.selected_queue()
        if name is None or self.app.feed is None:
            return self.app.notify("select a queue in the overview first", severity="warning")
        self.scale_queue(name)

    @work(group="actions")
    async def scale_queue(self, name: str) -> None:
        queues = {q.queue: q for q in await self.app.orch.queues()}
        current = queues.get(name)
        if current is None:
            return
        answer = await self.app.push_screen_wait(
            ScalePrompt(name, current.min_workers, current.max_workers)
        )
        if answer is not None:
            low, high = answer
            await self.app.act(
                self.app.orch.scale(name, min_workers=low, max_workers=high),
                f"queue {name}: {low}-{high} workers",
            )
            self.refresh_data()

    def action_pause(self) -> None:
        name = self.selected_queue()
        if name is None:
            return self.app.notify("select a queue in the overview first", severity="warning")
        self.pause_queue(name)

    @work(group="actions")
    async def pause_queue(self, name: str) -> None:
        queues = {q.queue: q for q in await self.app.orch.queues()}
        if name not in queues:
            return
        paused = queues[name].paused
        verb = "resume" if paused else "pause"
        if not await self.app.push_screen_wait(Confirm(f"{verb} queue {name}?")):
            return
        call = self.app.orch.resume_queue(name) if paused else self.app.orch.pause_queue(name)
        await self.app.act(call, f"queue {name} {verb}d")
        self.refresh_data()


__all__ = ["MainScreen", "SignalPrompt"]
