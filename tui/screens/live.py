"""A screen that follows the store: it reads on a timer, off the UI thread."""

from __future__ import annotations

from textual import work
from textual.css.query import NoMatches
from textual.screen import Screen


class LiveScreen(Screen):
    """Reads the store (``_read``) every ``app.refresh_every`` seconds and on
    demand, one read at a time: a slow read (the store away) is not cut short
    by the next tick, so it can say why it failed."""

    def __init__(self) -> None:
        super().__init__()
        self._refreshing = False

    def refresh_data(self) -> None:
        if not self._refreshing:
            self._refreshing = True
            self._refresh()

    @work(group="refresh")
    async def _refresh(self) -> None:
        try:
            await self._read()
        except NoMatches:
            if self.app.is_running and self in self.app.screen_stack:
                raise
            # closed while it read (escape, or the console quitting): its widgets
            # are gone, and nothing is left to show the answer on; the app must
            # not fall over for it
        finally:
            self._refreshing = False

    async def _read(self) -> None:
        raise NotImplementedError
