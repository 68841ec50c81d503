"""`orch tui` against a seeded store, driven with Textual's Pilot; and in tmux."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from freezegun import freeze_time

from orchestrator import Orchestrator
from orchestrator.settings import Settings
from tui import OrchApp
from tui.feed import Feed
from tui.screens.execution import ExecutionScreen, Timeline
from tui.screens.main import MainScreen
from tui.screens.prompts import Confirm, JsonView, Prompt
from tui.screenshot import PIPELINE, SEEDED_AT, seed
from tui.widgets import ExecutionsTable, QueuesTable, WorkersTable

from .conftest import ROOT, orch, orch_env, run_async, write_machine


@pytest.fixture
def seeded(db_url) -> Settings:
    settings = Settings(database_url=db_url)

    async def go():
        with freeze_time(SEEDED_AT, real_asyncio=True):
            async with Orchestrator(settings=settings) as o:
                await seed(o)

    run_async(go())
    return settings


async def until(pilot, check, what: str, timeout: float = 20.0):
    """Let the app run until ``check()`` holds (it refreshes by itself)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"the console never showed {what}")
        await pilot.pause(0.05)


def keys(table) -> list[str]:
    return [k.value for k in table.rows]


def cell(table, row: str, column: int):
    return table.get_row(row)[column]


async def store_status(settings: Settings, ex_id: str) -> str:
    async with Orchestrator(settings=settings) as o:
        return (await o.get(ex_id)).status


async def type_into(pilot, selector: str, text: str) -> None:
    widget = pilot.app.screen.query_one(selector)
    widget.value = text
    widget.focus()


async def submit(pilot) -> None:
    """Enter in the focused input submits the prompt."""
    await pilot.press("enter")
    await pilot.pause(0.05)


def test_the_console_shows_and_acts_on_the_store(seeded, tmp_path):
    app = OrchApp(seeded, refresh_every=0.2)

    async def go():
        async with app.run_test(size=(140, 40)) as pilot:
            workers = app.screen.query_one(WorkersTable)
            queues = app.screen.query_one(QueuesTable)
            table = app.screen.query_one(ExecutionsTable)
            await until(pilot, lambda: len(keys(table)) == 5, "the seeded executions")
            assert keys(workers) == ["w-beta", "w-alpha"] or set(keys(workers)) == {
                "w-alpha",
                "w-beta",
            }
            assert set(keys(queues)) == {"default", "llm"}
            assert str(cell(queues, "default", 1)) == "1"  # doc-2 queued
            statuses = {k: str(cell(table, k, 2)) for k in keys(table)}
            assert statuses == {
                "doc-0": "running",
                "doc-1": "failed",
                "doc-2": "queued",
                "ask-1": "waiting",
                "llm-1": "cancelled",
            }
            assert str(cell(table, "ask-1", 5)) == "approval/ask-1"  # what it waits on

            # filtering narrows the table
            await pilot.press("2", "f")
            assert isinstance(app.screen, Prompt)
            await type_into(pilot, "#text", "doc-")
            await submit(pilot)
            await until(
                pilot, lambda: set(keys(table)) == {"doc-0", "doc-1", "doc-2"}, "the filter"
            )
            await pilot.press("x")
            await until(pilot, lambda: len(keys(table)) == 5, "the filter cleared")

            # Enter opens the timeline, and a checkpoint's context
            table.focus()
            table.move_cursor(row=table.get_row_index("ask-1"))
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, ExecutionScreen), "the execution")
            timeline = app.screen.query_one(Timeline)
            await until(pilot, lambda: timeline.row_count > 0, "the timeline")
            events = [str(timeline.get_row(k)[2]) for k in keys(timeline)]
            assert events[-1] == "waiting"
            timeline.focus()
            await pilot.press("end", "o")
            await until(pilot, lambda: isinstance(app.screen, JsonView), "the context")
            assert app.screen.value["request"] == "ship"
            await pilot.press("escape", "escape")

            # signal: bad JSON is refused in the prompt, and nothing is written
            table.focus()
            table.move_cursor(row=table.get_row_index("ask-1"))
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, Prompt), "the signal prompt")
            assert app.screen.query_one("#channel").value == "approval/ask-1"
            await type_into(pilot, "#data", "{not json")
            await submit(pilot)
            assert "not valid JSON" in str(app.screen.query_one("#error").render())
            assert await app.orch.signals() == []
            await type_into(pilot, "#data", '{"ok": true}')
            await submit(pilot)
            await until(pilot, lambda: not isinstance(app.screen, Prompt), "the prompt closed")
            await until(pilot, lambda: str(cell(table, "ask-1", 2)) == "queued", "ask-1 woken")

            # cancel, with a confirmation; refused on a finished execution
            table.move_cursor(row=table.get_row_index("doc-2"))
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, Confirm), "the confirmation")
            await pilot.press("y")
            await until(
                pilot, lambda: str(cell(table, "doc-2", 2)) == "cancelled", "doc-2 cancelled"
            )
            before = (await app.orch.get("llm-1")).as_json()
            table.move_cursor(row=table.get_row_index("llm-1"))
            await pilot.press("c", "y")
            await pilot.pause(0.3)
            assert (await app.orch.get("llm-1")).as_json() == before

            # retry the failed one
            table.move_cursor(row=table.get_row_index("doc-1"))
            await pilot.press("R", "y")
            await until(pilot, lambda: str(cell(table, "doc-1", 2)) == "queued", "doc-1 retried")

            # scale: min > max is refused in the prompt; then a policy is set
            await pilot.press("1")
            queues.focus()
            queues.move_cursor(row=queues.get_row_index("llm"))
            await pilot.press("S")
            await until(pilot, lambda: isinstance(app.screen, Prompt), "the scale prompt")
            await type_into(pilot, "#min", "5")
            await type_into(pilot, "#max", "2")
            await submit(pilot)
            assert "min 5 is more than max 2" in str(app.screen.query_one("#error").render())
            await type_into(pilot, "#min", "2")
            await type_into(pilot, "#max", "6")
            await submit(pilot)
            await until(pilot, lambda: str(cell(queues, "llm", 7)) == "2-6", "the new policy")

            # pause, with a confirmation
            queues.move_cursor(row=queues.get_row_index("llm"))
            await pilot.press("P")
            await until(pilot, lambda: isinstance(app.screen, Confirm), "the confirmation")
            await pilot.press("y")
            await until(pilot, lambda: str(cell(queues, "llm", 8)) == "paused", "llm paused")

    run_async(go())
    assert run_async(store_status(seeded, "doc-2")) == "cancelled"
    assert run_async(store_status(seeded, "doc-1")) == "queued"


def test_a_new_execution_appears_without_a_key_press(seeded, tmp_path):
    app = OrchApp(seeded, refresh_every=0.2)
    machine = write_machine(tmp_path / "p.yml", PIPELINE)

    async def go():
        async with app.run_test(size=(120, 30)) as pilot:
            table = app.screen.query_one(ExecutionsTable)
            await until(pilot, lambda: len(keys(table)) == 5, "the seeded executions")
            r = orch("submit", str(machine), "--id", "from-elsewhere", db_url=seeded.database_url)
            assert r.returncode == 0, r.stderr
            await until(pilot, lambda: "from-elsewhere" in keys(table), "the new execution")

    run_async(go())


def test_a_late_heartbeat_turns_red(seeded):
    app = OrchApp(seeded.model_copy(update={"lease_ttl": 30}), refresh_every=0.2)

    async def go():
        with freeze_time(SEEDED_AT + timedelta(seconds=5), real_asyncio=True) as clock:
            async with app.run_test(size=(120, 30)) as pilot:
                workers = app.screen.query_one(WorkersTable)
                await until(pilot, lambda: workers.row_count == 2, "the workers")
                fresh = cell(workers, "w-alpha", 4)
                assert str(fresh) == "5s" and "red" not in str(fresh.style)
                clock.tick(60)
                await until(pilot, lambda: str(cell(workers, "w-alpha", 4)) == "1m05s", "the age")
                assert "red" in str(cell(workers, "w-alpha", 4).style)

    run_async(go())


def test_the_main_screen_snapshot(seeded, snap_compare, monkeypatch):
    """The main screen, as a picture: any change to its layout shows here. (Its
    clock is pinned, so the heartbeat ages are the same in every run.)"""
    import tui.format

    monkeypatch.setattr(tui.format, "now", lambda: SEEDED_AT + timedelta(seconds=5))
    app = OrchApp(seeded, refresh_every=0.2)

    async def loaded(pilot):
        table = app.screen.query_one(QueuesTable)
        await until(pilot, lambda: table.row_count == 2, "the queues")
        await pilot.pause(0.3)

    assert snap_compare(app, terminal_size=(120, 30), run_before=loaded)


# ------------------------------------------------------------------ in tmux


@pytest.mark.parametrize("size", [(140, 40), (80, 24)], ids=["140x40", "80x24"])
def test_orch_tui_in_a_real_terminal(seeded, tmp_path, size):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for this test (apt-get install tmux)")
    session = f"orch-tui-{os.getpid()}-{size[0]}"
    env = orch_env(seeded.database_url)
    script = tmp_path / "run.sh"
    script.write_text(
        f"cd {ROOT}\n"
        + "".join(
            f"export {k}={_quote(v)}\n"
            for k, v in env.items()
            if k.startswith(("ORCH_", "PYTHON", "PATH"))
        )
        + f"{sys.executable} -m orchestrator.cli tui\necho ORCH-TUI-EXITED\nsleep 60\n"
    )
    subprocess.run(
        [
            "tmux",
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            str(size[0]),
            "-y",
            str(size[1]),
            f"sh {script}",
        ],
        check=True,
    )
    try:
        screen = _wait_for_screen(
            session, lambda s: "w-alpha" in s and "default" in s and "llm" in s
        )
        assert "Workers" in screen and "Queues" in screen and "active" in screen
        subprocess.run(["tmux", "send-keys", "-t", session, "2"], check=True)
        screen = _wait_for_screen(session, lambda s: "ask-1" in s and "doc-1" in s)
        for status in ("waiting", "failed", "cancelled", "running", "queued"):
            assert status in screen, (status, screen)
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        screen = _wait_for_screen(session, lambda s: "ORCH-TUI-EXITED" in s)
        # the terminal is clean: nothing of the console is left on it
        assert "Workers" not in screen and "w-alpha" not in screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _wait_for_screen(session: str, check, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = subprocess.run(
            ["tmux", "capture-pane", "-t", session, "-p"], capture_output=True, text=True
        ).stdout
        if check(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError(f"the terminal never showed it:\n{screen}")


def test_a_database_that_goes_away_shows_a_banner_and_comes_back(pg_url):
    """PostgreSQL behind a forwarder that is cut and restored: the banner says so
    while it is away, the console does not crash, and it follows the store again."""
    import sqlalchemy as sa

    from tui.widgets import Banner

    from .faults import TcpCut

    url = sa.make_url(pg_url)
    cut = TcpCut((url.host or "127.0.0.1", url.port or 5432))
    via = url.set(port=cut.port).render_as_string(hide_password=False)
    settings = Settings(database_url=via)

    async def go():
        async with Orchestrator(settings=settings) as o:
            await seed(o)
        app = OrchApp(settings, refresh_every=0.2)
        async with app.run_test(size=(120, 30)) as pilot:
            banner = app.screen.query_one(Banner)
            queues = app.screen.query_one(QueuesTable)
            await until(pilot, lambda: queues.row_count == 2, "the queues")
            assert banner.has_class("hidden")
            cut.cut()
            await until(pilot, lambda: not banner.has_class("hidden"), "the banner", 30)
            assert "database not answering" in str(banner.render())
            cut.restore()
            await until(pilot, lambda: banner.has_class("hidden"), "the banner gone", 30)
            async with Orchestrator(pg_url) as direct:
                await direct.submit(PIPELINE, {"doc": 5}, id="after-the-outage")
            table = app.screen.query_one(ExecutionsTable)
            await until(pilot, lambda: "after-the-outage" in keys(table), "a new execution", 30)

    try:
        run_async(go())
    finally:
        cut.close()


def test_a_read_that_ends_as_the_console_closes_does_not_crash_it(seeded, monkeypatch):
    """The console quits while a refresh reads the store; the read comes back
    once the screen's tables are gone, before the screen itself is unmounted.
    Nothing is left to show it on, and the console closes cleanly (it used to
    fail with 'No nodes match WorkersTable')."""
    app = OrchApp(seeded, refresh_every=0.2)
    gate, entered = asyncio.Event(), asyncio.Event()
    armed = False
    read = Feed.overview

    async def overview(self):
        out = await read(self)
        if armed:  # held until the console is closing
            entered.set()
            await gate.wait()
        return out

    async def tables_gone(screen) -> None:
        # the screen's own Unmount, its children already removed: the read
        # answers now, and the screen waits for it before it stops its workers
        assert not screen.query(WorkersTable)
        gate.set()
        deadline = time.monotonic() + 20
        while screen._refreshing and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    monkeypatch.setattr(Feed, "overview", overview)
    monkeypatch.setattr(MainScreen, "on_unmount", tables_gone, raising=False)

    async def go():
        nonlocal armed
        async with app.run_test(size=(120, 30)) as pilot:
            workers = app.screen.query_one(WorkersTable)
            await until(pilot, lambda: workers.row_count == 2, "the workers")
            armed = True
            await asyncio.wait_for(entered.wait(), 20)

    run_async(go())
    assert gate.is_set(), "the read was held until the tables were gone"
