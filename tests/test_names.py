"""Names are text, not markup: what a user or a workflow named (ids, queues,
channels, schedules, machines, states, errors, worker ids) is shown literally
by the CLI, the console and the logs, its control characters made visible as
their Python escapes (``\\x1b``); ``--json`` prints the exact data."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
from freezegun import freeze_time

from orchestrator import Orchestrator
from orchestrator.display import LogFormatter, shown
from orchestrator.settings import Settings
from tui import OrchApp
from tui.screens.execution import ExecutionScreen, Timeline
from tui.screens.prompts import Confirm, Prompt
from tui.screenshot import SEEDED_AT, seed, timeline
from tui.widgets import ExecutionsTable, QueuesTable, WorkersTable

from .conftest import orch, run_async, write_machine
from .test_tui import cell, keys, type_into, until

# (as stored, as shown)
SLASH = ("[/]x", "[/]x")  # Rich raised MarkupError on it
RED = ("job[red]-7", "job[red]-7")  # Rich showed it as "job-7"
ESC = ("esc\x1b[31mred", "esc\\x1b[31mred")  # turned the terminal red
RTL = ("rtl\u202eabc", "rtl\\u202eabc")  # shown reversed
ZWSP = ("job-\u200b7", "job-\\u200b7")  # looked like "job-7"
QUEUE = ("q[/]\x1b[2J", "q[/]\\x1b[2J")
MACHINE = ("m[bold]\x07", "m[bold]\\x07")
STATE = ("st[/]ate\x1b", "st[/]ate\\x1b")
CHANNEL = ("ch[/]\x1b[31m", "ch[/]\\x1b[31m")
SIGNAL = ("sig[red]\x1b[2K", "sig[red]\\x1b[2K")
SCHEDULE = ("nightly[/]\x1b[31m", "nightly[/]\\x1b[31m")
WORKER = ("w[/]\x1b[31m", "w[/]\\x1b[31m")  # a flatmachines worker names itself
FAILED = ("failed[/]", "failed[/]")
WAITING = ("waiting[red]", "waiting[red]")
ERROR = ("boom [/] [red]\x1b[31m\n  File x, line 1", "boom [/] [red]\\x1b[31m\n  File x, line 1")

# a control character printed raw (a newline ends a line, and is allowed)
RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e]")


def machine(name: str) -> dict:
    return {
        "spec": "flatmachine",
        "spec_version": "4.2.1",
        "data": {
            "name": name,
            "states": {
                "start": {"type": "initial", "transitions": [{"to": "done"}]},
                "done": {"type": "final", "output": {}},
            },
        },
    }


async def seed_names(o: Orchestrator) -> None:
    """Executions, a queue, a worker, a signal and a schedule with hostile names."""
    nasty = machine(MACHINE[0])
    await o.scale(QUEUE[0], min_workers=0, max_workers=2, create=True)
    await o.store.register_worker(
        WORKER[0], host="h[red]", pid=303, queue_names=[QUEUE[0]], concurrency=2
    )
    await o.submit(nasty, id=FAILED[0], queue=QUEUE[0], priority=9)
    await o.submit(nasty, id=WAITING[0], queue=QUEUE[0], priority=8)
    failing = await o.store.claim(WORKER[0], [QUEUE[0]])
    waiting = await o.store.claim(WORKER[0], [QUEUE[0]])
    await o.store.finish(
        failing,
        status="failed",
        error=ERROR[0],
        checkpoints=timeline(FAILED[0], {}, STATE[0], []),
    )
    await o.store.park(
        waiting,
        channel=CHANNEL[0],
        wake_at=None,
        checkpoints=timeline(WAITING[0], {}, STATE[0], ["waiting"]),
    )
    for ex_id, _ in (SLASH, RED, ESC, RTL, ZWSP):
        await o.submit(nasty, id=ex_id, queue=QUEUE[0])
    await o.signal(SIGNAL[0], {"ok": True})
    await o.add_schedule(SCHEDULE[0], nasty, cron="0 2 * * *", queue=QUEUE[0])


@pytest.fixture
def named(db_url) -> str:
    async def go():
        async with Orchestrator(db_url) as o:
            await seed_names(o)

    run_async(go())
    return db_url


def shows(r, *names: tuple[str, str]) -> str:
    """The command answered (exit 0, no traceback) and printed each name as shown."""
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not RAW_CONTROL.search(r.stdout + r.stderr), repr(r.stdout + r.stderr)
    for _stored, seen in names:
        assert seen in r.stdout, (seen, r.stdout)
    return r.stdout


def test_the_cli_shows_names_literally(named, tmp_path):
    run = lambda *args: orch(*args, db_url=named, cwd=tmp_path)  # noqa: E731
    shows(run("list"), SLASH, RED, ESC, RTL, ZWSP, FAILED, WAITING, QUEUE, MACHINE, STATE)
    shows(run("list", "--queue", QUEUE[0]), SLASH, RED, ESC)
    for name in (SLASH, RED, ESC, RTL, ZWSP):
        out = shows(run("show", name[0]), name, MACHINE, QUEUE)
        assert f"id: {name[1]}\n" in out
    shows(run("show", WAITING[0]), WAITING, CHANNEL, STATE)
    out = shows(run("show", FAILED[0]), FAILED, STATE)
    # the error keeps its lines, each made safe
    assert f"error: {ERROR[1]}\n" in out
    shows(run("queues"), QUEUE)
    shows(run("signals"), SIGNAL)
    shows(run("schedule", "list"), SCHEDULE, MACHINE, QUEUE)
    shows(run("workers"), WORKER)
    shows(run("workers", "--all"), WORKER)
    # an unknown id is said as it was typed
    r = run("show", "no[/]pe\x1b")
    assert r.returncode == 2 and "no[/]pe\\x1b" in r.stderr and "\x1b" not in r.stderr
    assert "Traceback" not in r.stderr
    # a verb answers with the name as it is
    assert shows(run("cancel", RED[0]), RED) == "job[red]-7 cancelled\n"


def test_json_output_is_the_exact_data(named, tmp_path):
    def data(*args: str):
        r = orch(*args, "--json", db_url=named, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    ids = {ex["id"] for ex in data("list")}
    assert ids == {SLASH[0], RED[0], ESC[0], RTL[0], ZWSP[0], FAILED[0], WAITING[0]}
    failed = data("show", FAILED[0])
    assert failed["error"] == ERROR[0] and failed["machine"] == MACHINE[0]
    assert {h["state"] for h in failed["history"]} == {"start", STATE[0]}
    assert data("show", WAITING[0])["waiting_channel"] == CHANNEL[0]
    assert [q["queue"] for q in data("queues") if q["queue"] != "default"] == [QUEUE[0]]
    assert [s["channel"] for s in data("signals")] == [SIGNAL[0]]
    assert [s["name"] for s in data("schedule", "list")] == [SCHEDULE[0]]
    assert [w["id"] for w in data("workers")] == [WORKER[0]]


def test_a_workers_log_shows_names_literally(db_url, tmp_path):
    """A worker logs the executions it ran: an id cannot colour its log, nor
    forge a line in it."""
    forged = "two\n2026-01-01 00:00:00 INFO orchestrator: all is well"
    ids = (ESC[0], forged)

    async def go():
        async with Orchestrator(db_url) as o:
            for ex_id in ids:
                await o.submit(machine(MACHINE[0]), id=ex_id)

    run_async(go())
    r = orch("worker", "--burst", db_url=db_url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = r.stderr
    assert "completed esc\\x1b[31mred" in log
    assert "completed two\\n2026-01-01 00:00:00 INFO orchestrator: all is well" in log
    assert "\x1b" not in log
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())


def test_the_log_format_keeps_a_traceback_and_escapes_its_names():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "ran %s", ("a\x1b\nb",), None)
    try:
        raise RuntimeError("bad \x1b[31m name")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    lines = LogFormatter("%(levelname)s %(message)s").format(record).splitlines()
    assert lines[0] == "ERROR ran a\\x1b\\nb"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: bad \\x1b[31m name"


def test_control_characters_show_as_their_escapes():
    assert shown("a\x00b\x1b\x7f\x9b\t\r\n\u2028\u202e\u2066") == (
        "a\\x00b\\x1b\\x7f\\x9b\\t\\r\\n\\u2028\\u202e\\u2066"
    )
    assert shown("line 1\n\tline 2\x1b", multiline=True) == "line 1\n\tline 2\\x1b"
    # invisible ones too: "job-7" with a zero-width space is not "job-7"
    assert shown("job-\u200b7\ufeff\U000e0041") == "job-\\u200b7\\ufeff\\U000e0041"
    # what is not a control character is left as it is
    assert shown("[/]x [red] é 日本 💻 \\x1b") == "[/]x [red] é 日本 💻 \\x1b"


def test_every_control_and_format_character_is_made_visible():
    import unicodedata

    def invisible(ch: str) -> bool:
        return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")

    every = "".join(ch for ch in map(chr, range(sys.maxunicode + 1)) if invisible(ch))
    assert len(every) > 190
    assert not any(invisible(ch) for ch in shown(every))


# ------------------------------------------------------------------ the console


@pytest.fixture
def seeded_names(db_url) -> Settings:
    settings = Settings(database_url=db_url)

    async def go():
        with freeze_time(SEEDED_AT, real_asyncio=True):
            async with Orchestrator(settings=settings) as o:
                await seed(o)
                await seed_names(o)

    run_async(go())
    return settings


def rendered(widget) -> str:
    return str(widget.render())


def test_the_console_shows_names_literally(seeded_names, tmp_path):
    app = OrchApp(seeded_names, refresh_every=0.2)

    async def go():
        async with app.run_test(size=(160, 40)) as pilot:
            workers = app.screen.query_one(WorkersTable)
            queues = app.screen.query_one(QueuesTable)
            await until(pilot, lambda: QUEUE[0] in keys(queues), "the queues")
            assert str(cell(queues, QUEUE[0], 0)) == QUEUE[1]
            await until(pilot, lambda: WORKER[0] in keys(workers), "the workers")
            assert str(cell(workers, WORKER[0], 0)) == WORKER[1]
            assert str(cell(workers, WORKER[0], 1)) == "h[red]"
            assert str(cell(workers, WORKER[0], 5)) == QUEUE[1]

            # the executions view (it used to fail as it drew "[/]x")
            await pilot.press("2")
            table = app.screen.query_one(ExecutionsTable)
            await until(pilot, lambda: SLASH[0] in keys(table), "the executions")
            for stored, seen in (SLASH, RED, ESC, RTL, ZWSP):
                assert str(cell(table, stored, 0)) == seen
                assert str(cell(table, stored, 1)) == MACHINE[1]
                assert str(cell(table, stored, 3)) == QUEUE[1]
            assert str(cell(table, WAITING[0], 4)) == STATE[1]
            assert str(cell(table, WAITING[0], 5)) == CHANNEL[1]

            # a filter typed as markup is a filter, and is shown as typed
            await pilot.press("f")
            assert isinstance(app.screen, Prompt)
            await type_into(pilot, "#text", "[/]")
            await pilot.press("enter")
            await until(pilot, lambda: set(keys(table)) == {SLASH[0], FAILED[0]}, "the filter")
            filters = rendered(app.screen.query_one("#filters"))
            assert filters.startswith("Filters: text=[/] (f to change")

            # the execution screen: its summary, its error, its timeline
            table.focus()
            table.move_cursor(row=table.get_row_index(FAILED[0]))
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, ExecutionScreen), "the execution")
            summary = app.screen.query_one("#summary")
            await until(pilot, lambda: FAILED[0] in rendered(summary), "the summary")
            assert rendered(summary).startswith(f"{FAILED[1]}  {MACHINE[1]}  failed")
            assert f"queue {QUEUE[1]} · worker {WORKER[1]} · state {STATE[1]}" in rendered(summary)
            assert rendered(app.screen.query_one("#error")) == ERROR[1]
            timeline_ = app.screen.query_one(Timeline)
            assert STATE[1] in {str(timeline_.get_row(k)[3]) for k in keys(timeline_)}
            await pilot.press("escape", "x")
            await until(pilot, lambda: ESC[0] in keys(table), "the filter cleared")

            # cancel asks about the id as it is, and says it as it is
            table.focus()
            table.move_cursor(row=table.get_row_index(ESC[0]))
            await pilot.press("c")
            await until(pilot, lambda: isinstance(app.screen, Confirm), "the confirmation")
            assert rendered(app.screen.query_one(".dialog-title")) == f"cancel {ESC[1]}?"
            await pilot.press("y")
            await until(
                pilot, lambda: str(cell(table, ESC[0], 2)) == "cancelled", "the cancellation"
            )
            toasts = [n.message for n in app._notifications]
            assert f"{ESC[1]} cancelled" in toasts

            # the signal prompt shows the channel as it shows, and signals it as it is
            table.move_cursor(row=table.get_row_index(WAITING[0]))
            await pilot.press("s")
            await until(pilot, lambda: isinstance(app.screen, Prompt), "the signal prompt")
            assert app.screen.query_one("#channel").value == CHANNEL[1]
            await type_into(pilot, "#data", '{"ok": true}')
            await pilot.press("enter")
            await until(pilot, lambda: str(cell(table, WAITING[0], 2)) == "queued", "woken")

            # the scale prompt and the pause confirmation name the queue as it is
            await pilot.press("1")
            queues.focus()
            queues.move_cursor(row=queues.get_row_index(QUEUE[0]))
            await pilot.press("S")
            await until(pilot, lambda: isinstance(app.screen, Prompt), "the scale prompt")
            labels = [rendered(label) for label in app.screen.query("Label")]
            assert f"queue {QUEUE[1]}: workers from min to max" in labels
            await pilot.press("escape")
            await pilot.press("P")
            await until(pilot, lambda: isinstance(app.screen, Confirm), "the confirmation")
            assert rendered(app.screen.query_one(".dialog-title")) == f"pause queue {QUEUE[1]}?"
            await pilot.press("y")
            await until(pilot, lambda: str(cell(queues, QUEUE[0], 8)) == "paused", "paused")

    run_async(go())


def test_a_machine_file_with_a_hostile_name_is_listed_literally(db_url, tmp_path):
    """The name of a machine submitted from a file, through `orch submit`."""
    path = write_machine(tmp_path / "m.yml", machine("[/]mach\x1b[31mine"))
    r = orch("submit", str(path), "--id", "[red]x", db_url=db_url, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == "[red]x\n", r.stderr
    out = shows(orch("list", db_url=db_url, cwd=tmp_path), ("[red]x", "[red]x"))
    assert "[/]mach\\x1b[31mine" in out


def test_the_librarys_log_lines_show_names_literally(db_url, tmp_path):
    """flatmachines logs a state's handled error with the state's name, on a
    handler of its own unless it finds one: orch's, which shows names as they are."""
    path = write_machine(
        tmp_path / "recovering.yml",
        {
            "spec": "flatmachine",
            "spec_version": "4.2.1",
            "data": {
                "name": "recovering",
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": STATE[0]}]},
                    STATE[0]: {
                        "hooks": "effects",
                        "action": "fail",
                        "on_error": "recover",
                        "transitions": [{"to": "recover"}],
                    },
                    "recover": {"type": "final", "output": {}},
                },
            },
        },
    )
    assert orch("submit", str(path), db_url=db_url, cwd=tmp_path).returncode == 0
    r = orch("worker", "--burst", "--app", "testapp", db_url=db_url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = r.stdout + r.stderr
    assert f"Error in {STATE[1]}, transitioning to recover" in log, log
    assert "\x1b" not in log
