"""The `orch tui` application: follows the store live, about once a second.

Everything it shows or does goes through ``orchestrator.Orchestrator`` (the
public API), never SQL. Reads run as Textual workers and the store runs each
transaction on its own threads, so the UI never waits on the database. When
the database goes away, a banner says so and the app keeps trying.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from textual import work
from textual.app import App
from textual.binding import Binding

from orchestrator import Orchestrator
from orchestrator.display import shown
from orchestrator.errors import StoreUnavailable, UserError
from orchestrator.settings import Settings

from .feed import Feed
from .screens.main import MainScreen
from .screens.prompts import Confirm, SignalPrompt
from .widgets import Banner

T = TypeVar("T")


def where(url: str) -> str:
    """The store, briefly: a SQLite file's name, or PostgreSQL's host and database
    (never a password, however the URL holds one)."""
    from orchestrator.store.engine import parse_url

    try:
        parsed = parse_url(url)
    except Exception:
        return "?"
    if parsed.get_backend_name() == "sqlite":
        name = parsed.database.rsplit("/", 1)[-1] if parsed.database else ""
        return shown(f"sqlite {name}")
    return shown(f"postgresql {parsed.host or ''}/{parsed.database or ''}")


class OrchApp(App):
    CSS_PATH = "orch.tcss"
    TITLE = "flatorch"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("t", "toggle_theme", "Theme"),
    ]

    def __init__(self, settings: Settings, *, refresh_every: float = 1.0):
        super().__init__()
        # a console waits on nobody: a store call gives up quickly, and the
        # next refresh tries again
        self.settings = settings.model_copy(
            update={"store_patience": min(settings.store_patience, 2.0)}
        )
        self.refresh_every = refresh_every
        self.lease_ttl = settings.lease_ttl
        self.orch = Orchestrator(settings=self.settings)
        self.feed: Feed | None = None
        self.sub_title = where(self.orch.settings.database_url)

    def on_mount(self) -> None:
        self.theme = "textual-dark"
        self.push_screen(MainScreen())
        self.connect()

    @work(exclusive=True, group="connect")
    async def connect(self) -> None:
        """Open the store, waiting for it (the banner says why) if it is away."""
        await self.orch.open(wait=True, on_wait=self.database_down)
        self.database_down(None)
        self.feed = Feed(self.orch)

    async def on_unmount(self) -> None:
        await self.orch.close()

    # --------------------------------------------------------------- state

    def database_down(self, message: str | None) -> None:
        for banner in self.screen.query(Banner):
            banner.say(message)

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    # ------------------------------------------------------------- actions

    async def act(self, call: Awaitable[T], done: str) -> T | None:
        """Run one action through the API; a refusal is said, and nothing changes."""
        try:
            result = await call
        except (UserError, StoreUnavailable) as exc:
            self.notify(shown(exc), severity="error", timeout=8, markup=False)
            return None
        self.notify(shown(done), markup=False)
        return result

    def cancel_execution(self, execution_id: str, then: Callable[[], Any]) -> None:
        self._confirmed(
            f"cancel {execution_id}?",
            self.orch.cancel,
            execution_id,
            f"{execution_id} cancelled",
            then,
        )

    def retry_execution(self, execution_id: str, then: Callable[[], Any]) -> None:
        self._confirmed(
            f"retry {execution_id} from its last checkpoint?",
            self.orch.retry,
            execution_id,
            f"{execution_id} queued again",
            then,
        )

    @work(group="actions")
    async def _confirmed(self, question: str, verb, execution_id: str, done: str, then) -> None:
        if await self.push_screen_wait(Confirm(question)):
            await self.act(verb(execution_id), done)
            then()

    @work(group="actions")
    async def send_signal(self, execution_id: str | None, then: Callable[[], Any]) -> None:
        channel = ""
        if execution_id:
            try:
                channel = (await self.orch.get(execution_id)).waiting_channel or ""
            except (UserError, StoreUnavailable):
                pass
        answer = await self.push_screen_wait(SignalPrompt(channel))
        if answer is not None:
            channel, data = answer
            sent = await self.act(self.orch.signal(channel, data), f"signal sent on {channel}")
            if sent is not None and sent.woken:
                self.notify(shown(f"taken by {', '.join(sent.woken)}"), markup=False)
            then()
