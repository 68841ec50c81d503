"""The API checks before it writes, on SQLite and PostgreSQL.

A bad argument to any public verb is one UserError and not one row written;
the same through the `orch` command is exit 2, one line, no traceback and the
bad value not echoed. Sizes have limits (settings), checked at their edge. A
worker fails a row it cannot use and goes on. A .jsonl file is streamed.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import yaml

from orchestrator import Orchestrator, checks, safeyaml, timers
from orchestrator.client import Client
from orchestrator.errors import UserError

from .apps.testapp import hooks_registry
from .conftest import chain_machine, orch, run_async, write_machine
from .test_cli import assert_usage_error, ok

TABLES = ("executions", "checkpoints", "signals", "schedules", "queues", "configs")


def row_counts(db_url: str) -> dict[str, int]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return {t: conn.scalar(sa.text(f"SELECT count(*) FROM {t}")) for t in TABLES}
    finally:
        engine.dispose()


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.fixture
def machine(tmp_path) -> Path:
    return chain_machine(tmp_path / "m.yml", ["add", "add"])


@pytest.fixture
def seeded(db_url, machine) -> str:
    """A store holding one completed execution 'seed' (steps to fork from)."""

    async def seed() -> None:
        async with Orchestrator(db_url) as o, o.worker(hooks_registry):
            await o.submit(machine, {}, id="seed")
            await o.result("seed", timeout=60)

    run_async(seed())
    return "seed"


# ------------------------------------------------------ the API: UserError, nothing written

LONG_ID = "i" * (checks.ID_LENGTH + 1)
LONG_QUEUE = "q" * (checks.QUEUE_LENGTH + 1)
LONG_CHANNEL = "c" * (checks.CHANNEL_LENGTH + 1)
NAN, INF = float("nan"), float("inf")

BAD_CALLS: dict[str, tuple[str, tuple, dict]] = {
    # name: (method, args, kwargs); "M" in args stands for the machine file
    "submit-priority-text": ("submit", ("M",), {"priority": "high"}),
    "submit-priority-over-int": ("submit", ("M",), {"priority": 2**31}),
    "submit-priority-bool": ("submit", ("M",), {"priority": True}),
    "submit-id-dict": ("submit", ("M",), {"id": {"a": 1}}),
    "submit-id-too-long": ("submit", ("M",), {"id": LONG_ID}),
    "submit-id-empty": ("submit", ("M",), {"id": ""}),
    "submit-queue-list": ("submit", ("M",), {"queue": ["x"]}),
    "submit-queue-too-long": ("submit", ("M",), {"queue": LONG_QUEUE}),
    "submit-input-nan": ("submit", ("M", {"x": NAN}), {}),
    "submit-input-inf-deep-inside": ("submit", ("M", {"x": [1, {"y": -INF}]}), {}),
    "submit-input-list": ("submit", ("M", [1, 2]), {}),
    "submit-input-key-not-text": ("submit", ("M", {1: 2}), {}),
    "submit-input-set": ("submit", ("M", {"x": {1, 2}}), {}),
    "submit-input-nested": ("submit", ("M", nested(checks.MAX_DEPTH + 1)), {}),
    "submit-delay-inf": ("submit", ("M",), {"delay": INF}),
    "submit-delay-nan": ("submit", ("M",), {"delay": NAN}),
    "submit-delay-1e400": ("submit", ("M",), {"delay": float("1e400")}),
    "submit-delay-negative": ("submit", ("M",), {"delay": -1}),
    "submit-delay-past-a-datetime": ("submit", ("M",), {"delay": 1e12}),
    "submit-max-attempts-text": ("submit", ("M",), {"max_attempts": "3"}),
    "submit-max-attempts-zero": ("submit", ("M",), {"max_attempts": 0}),
    "submit-backoff-inf": ("submit", ("M",), {"backoff": INF}),
    "submit-backoff-zero": ("submit", ("M",), {"backoff": 0}),
    "submit-machine-int": ("submit", (5,), {}),
    "submit-machine-nested-dict": ("submit", (nested(checks.MAX_DEPTH + 1),), {}),
    "submit-machine-name-too-long": (
        "submit",
        (
            {
                "spec": "flatmachine",
                "spec_version": "4.2.1",
                "data": {"name": "n" * 201, "states": {"done": {"type": "final"}}},
            },
        ),
        {},
    ),
    "submit-many-one-bad-of-three": ("submit_many", ("M", [{}, {"x": NAN}, {}]), {}),
    "submit-many-bad-id": ("submit_many", ("M", [{}, {}]), {"ids": ["a", LONG_ID]}),
    "signal-channel-int": ("signal", (123,), {}),
    "signal-channel-too-long": ("signal", (LONG_CHANNEL,), {}),
    "signal-channel-blank": ("signal", ("  ",), {}),
    "signal-data-nan": ("signal", ("ch", {"x": NAN}), {}),
    "signal-data-nested": ("signal", ("ch", nested(checks.MAX_DEPTH + 1)), {}),
    "signals-channel-too-long": ("signals", (LONG_CHANNEL,), {}),
    "fork-step-text": ("fork", ("seed", "1"), {}),
    "fork-step-over-int": ("fork", ("seed", 2**40), {}),
    "fork-id-too-long": ("fork", ("seed", 1), {"id": LONG_ID}),
    "fork-queue-empty": ("fork", ("seed", 1), {"queue": ""}),
    "fork-queue-too-long": ("fork", ("seed", 1), {"queue": LONG_QUEUE}),
    "fork-patch-nan": ("fork", ("seed", 1), {"context_patch": {"x": NAN}}),
    "fork-patch-list": ("fork", ("seed", 1), {"context_patch": [1]}),
    "fork-source-dict": ("fork", ({"a": 1}, 1), {}),
    "retry-id-int": ("retry", (123,), {}),
    "retry-id-too-long": ("retry", (LONG_ID,), {}),
    "retry-machine-int": ("retry", ("seed",), {"machine": 7}),
    "cancel-id-none": ("cancel", (None,), {}),
    "cancel-id-too-long": ("cancel", (LONG_ID,), {}),
    "cancel-reason-int": ("cancel", ("seed", 5), {}),
    "get-id-list": ("get", (["seed"],), {}),
    "get-id-too-long": ("get", (LONG_ID,), {}),
    "wait-timeout-nan": ("wait", ("seed", NAN), {}),
    "context-step-text": ("context", ("seed", "1"), {}),
    "list-limit-huge": ("list", (), {"limit": 10**20}),
    "list-limit-zero": ("list", (), {"limit": 0}),
    "list-offset-negative": ("list", (), {"offset": -1}),
    "list-status-unknown": ("list", (), {"status": "bogus"}),
    "list-queue-int": ("list", (), {"queue": 5}),
    "list-parent-too-long": ("list", (), {"parent": LONG_ID}),
    "scale-min-text": ("scale", ("default",), {"min_workers": "1", "max_workers": 2}),
    "scale-max-huge": ("scale", ("default",), {"min_workers": 0, "max_workers": 10**20}),
    "scale-per-worker-over-int": (
        "scale",
        ("default",),
        {"min_workers": 0, "max_workers": 1, "per_worker": 2**31},
    ),
    "scale-queue-too-long": (
        "scale",
        (LONG_QUEUE,),
        {"min_workers": 0, "max_workers": 1, "create": True},
    ),
    "pause-queue-int": ("pause_queue", (5,), {}),
    "throughput-buckets-zero": ("throughput", (), {"buckets": 0}),
    "schedule-name-too-long": ("add_schedule", ("n" * 201, "M"), {"cron": "* * * * *"}),
    "schedule-cron-int": ("add_schedule", ("nightly", "M"), {"cron": 5}),
    "schedule-queue-list": ("add_schedule", ("nightly", "M"), {"cron": "* * * * *", "queue": []}),
    "schedule-input-nan": (
        "add_schedule",
        ("nightly", "M"),
        {"cron": "* * * * *", "input": {"x": NAN}},
    ),
    "schedule-remove-int": ("remove_schedule", (5,), {}),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_a_bad_api_call_is_one_user_error_and_writes_nothing(case, db_url, machine, seeded):
    method, args, kwargs = BAD_CALLS[case]
    args = tuple(machine if a == "M" else a for a in args)
    before = row_counts(db_url)

    async def call() -> None:
        async with Orchestrator(db_url) as o:
            await getattr(o, method)(*args, **kwargs)

    with pytest.raises(UserError) as raised:
        run_async(call())
    message = str(raised.value)
    assert len(message.splitlines()) == 1 and len(message) < 300, message
    assert LONG_ID not in message and LONG_QUEUE not in message and LONG_CHANNEL not in message
    assert row_counts(db_url) == before


def test_the_checks_let_good_calls_through(db_url, machine, seeded):
    """The edges that are allowed: the longest id and queue, the extreme
    priorities, the deepest input; each is written and read back as given."""
    top = checks.INT_MAX
    deep = nested(checks.MAX_DEPTH)

    async def calls() -> list:
        async with Orchestrator(db_url) as o:
            a = await o.submit(machine, deep, id="i" * checks.ID_LENGTH, priority=top)
            b = await o.submit(machine, {}, queue="q" * checks.QUEUE_LENGTH, priority=-top - 1)
            await o.signal("c" * checks.CHANNEL_LENGTH, deep)
            return [await o.get(a.id), await o.get(b.id)]

    a, b = run_async(calls())
    assert (a.input, a.priority) == (deep, top)
    assert (b.queue, b.priority) == ("q" * checks.QUEUE_LENGTH, -top - 1)


# -------------------------------------------------- the CLI: exit 2, one line, nothing written

BOMB = "\n".join(
    ["spec: flatmachine", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{b}: &{b} [{','.join([f'*{a}'] * 9)}]" for a, b in itertools.pairwise("abcdefghi")]
)


def _timer_machine(tmp: Path, channel: str) -> None:
    data = yaml.safe_load((tmp / "m.yml").read_text())
    data["data"]["states"]["s1"] = {"wait_for": channel, "transitions": [{"to": "s2"}]}
    write_machine(tmp / "m.yml", data)


BAD_COMMANDS: dict[str, tuple[Any, list[str], list[str]]] = {
    # name: (setup(tmp) or None, argv, needles in the one line)
    "priority-past-any-integer": (
        None,
        ["submit", "m.yml", "--priority", "99999999999999999999"],
        ["--priority", "at most"],
    ),
    "id-past-its-column": (None, ["submit", "m.yml", "--id", LONG_ID], ["--id", "200"]),
    "queue-past-its-column": (None, ["submit", "m.yml", "--queue", LONG_QUEUE], ["--queue"]),
    "input-nan": (None, ["submit", "m.yml", "--input", '{"x": NaN}'], ["NaN"]),
    "input-infinity": (None, ["submit", "m.yml", "--input", '{"x": -Infinity}'], ["finite"]),
    "delay-inf": (None, ["submit", "m.yml", "--delay", "inf"], ["--delay", "finite"]),
    "delay-1e400": (None, ["submit", "m.yml", "--delay", "1e400"], ["--delay", "finite"]),
    "input-nested-past-recursion": (
        None,
        ["submit", "m.yml", "--input", '{"a":' + "[" * 5000 + "]" * 5000 + "}"],
        ["--input", "nested"],
    ),
    "input-file-nested-past-recursion": (
        lambda tmp: (tmp / "deep.json").write_text("[" * 100_000 + "]" * 100_000),
        ["submit", "m.yml", "--input-file", "deep.json"],
        ["deep.json", "nested"],
    ),
    "jsonl-line-nested-too-deep": (
        lambda tmp: (tmp / "in.jsonl").write_text('{"n": 1}\n' + json.dumps(nested(101)) + "\n"),
        ["submit", "m.yml", "--input-file", "in.jsonl"],
        ["in.jsonl line 2", "nested"],
    ),
    "sleep-inf": (
        lambda tmp: _timer_machine(tmp, "sleep:inf"),
        ["submit", "m.yml"],
        ["wait_for", "finite"],
    ),
    "sleep-1e400": (
        lambda tmp: _timer_machine(tmp, "sleep:1e400"),
        ["submit", "m.yml"],
        ["wait_for", "finite"],
    ),
    "sleep-past-a-datetime": (
        lambda tmp: _timer_machine(tmp, "sleep:99999999999"),
        ["submit", "m.yml"],
        ["wait_for", "100 years"],
    ),
    "yaml-alias-bomb": (
        lambda tmp: (tmp / "m.yml").write_text(BOMB),
        ["submit", "m.yml"],
        ["m.yml", "aliases"],
    ),
    "yaml-recursive-alias": (
        lambda tmp: (tmp / "m.yml").write_text("spec: flatmachine\nx: &x [*x]\n"),
        ["submit", "m.yml"],
        ["recursive alias"],
    ),
    "yaml-nested-too-deep": (
        lambda tmp: (tmp / "m.yml").write_text("x: " + "[" * 150 + "]" * 150 + "\n"),
        ["submit", "m.yml"],
        ["nested"],
    ),
    "yaml-nested-past-recursion": (
        lambda tmp: (tmp / "m.yml").write_text("x: " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ["submit", "m.yml"],
        ["m.yml", "nesting depth"],
    ),
    "list-limit-past-any-integer": (
        None,
        ["list", "--limit", "99999999999999999999"],
        ["--limit", "at most"],
    ),
    "show-id-past-its-column": (None, ["show", LONG_ID], ["200"]),
    "cancel-id-past-its-column": (None, ["cancel", LONG_ID], ["200"]),
    "signal-channel-past-its-column": (None, ["signal", LONG_CHANNEL], ["channel", "400"]),
    "signal-data-nan": (None, ["signal", "ch", "--data", "[NaN]"], ["NaN"]),
    "signal-data-nested-past-recursion": (
        None,
        ["signal", "ch", "--data", "[" * 5000 + "]" * 5000],
        ["--data", "nested"],
    ),
    "fork-step-past-any-integer": (
        None,
        ["fork", "seed", "--from-step", "99999999999999999999"],
        ["--from-step", "at most"],
    ),
    "fork-patch-nan": (
        None,
        ["fork", "seed", "--from-step", "1", "--context-patch", '{"x": NaN}'],
        ["--context-patch", "NaN"],
    ),
    "scale-max-past-any-integer": (
        None,
        ["scale", "default", "--min", "0", "--max", "99999999999999999999"],
        ["--max", "at most"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_a_bad_command_is_exit_2_one_line_and_writes_nothing(case, db_url, tmp_path, seeded):
    setup, argv, needles = BAD_COMMANDS[case]
    if setup is not None:
        setup(tmp_path)
    before = row_counts(db_url)
    r = orch(*argv, db_url=db_url, cwd=tmp_path)
    line = assert_usage_error(r, *needles)
    for long in (LONG_ID, LONG_QUEUE, LONG_CHANNEL, "[[[[[[[[", "99999999999999999999"):
        assert long not in line, line
    assert row_counts(db_url) == before


# ----------------------------------------------------------- limits, at their edge


def sized(nbytes: int, **extra: Any) -> dict:
    """A JSON object of exactly ``nbytes`` as checks.json_size counts them."""
    base = {**extra, "pad": ""}
    value = {**extra, "pad": "x" * (nbytes - checks.json_size(base))}
    assert checks.json_size(value) == nbytes
    return value


def test_input_size_limit_at_its_edge(db_url, machine):
    limit = 2000

    async def submit(nbytes: int) -> Any:
        async with Orchestrator(db_url, max_input_bytes=limit) as o:
            return await o.submit(machine, sized(nbytes))

    assert run_async(submit(limit)).input == sized(limit)
    before = row_counts(db_url)
    with pytest.raises(UserError, match="ORCH_MAX_INPUT_BYTES"):
        run_async(submit(limit + 1))
    assert row_counts(db_url) == before


def test_input_size_limit_through_the_cli(db_url, tmp_path, machine):
    env = {"ORCH_MAX_INPUT_BYTES": "2000"}
    at, over = json.dumps(sized(2000)), json.dumps(sized(2001))
    ok(orch("submit", "m.yml", "--input", at, db_url=db_url, cwd=tmp_path, **env))
    before = row_counts(db_url)
    r = orch("submit", "m.yml", "--input", over, db_url=db_url, cwd=tmp_path, **env)
    assert_usage_error(r, "2001 bytes", "ORCH_MAX_INPUT_BYTES")
    (tmp_path / "in.jsonl").write_text(f"{at}\n{over}\n")
    r = orch("submit", "m.yml", "--input-file", "in.jsonl", db_url=db_url, cwd=tmp_path, **env)
    assert_usage_error(r, "in.jsonl line 2", "ORCH_MAX_INPUT_BYTES")
    assert row_counts(db_url) == before


def test_signal_data_limit_at_its_edge(db_url, tmp_path, machine):
    limit = 1000
    ok(orch("submit", "m.yml", db_url=db_url, cwd=tmp_path))  # a store to count rows in

    async def send(nbytes: int) -> Any:
        async with Orchestrator(db_url, max_signal_bytes=limit) as o:
            return await o.signal("ch", sized(nbytes))

    run_async(send(limit))
    before = row_counts(db_url)
    with pytest.raises(UserError, match="ORCH_MAX_SIGNAL_BYTES"):
        run_async(send(limit + 1))
    env = {"ORCH_MAX_SIGNAL_BYTES": str(limit)}
    r = orch("signal", "ch", "--data", json.dumps(sized(limit + 1)), db_url=db_url, **env)
    assert_usage_error(r, "ORCH_MAX_SIGNAL_BYTES")
    assert row_counts(db_url) == before


def test_context_limit_at_fork_at_its_edge(db_url, seeded):
    async def context() -> dict:
        async with Orchestrator(db_url) as o:
            return await o.context("seed", 2)

    ctx = run_async(context())
    limit = checks.json_size(ctx) + 500
    # the patch that makes the context exactly `limit` bytes, and one byte more
    at = {"pad": sized(limit, **ctx)["pad"]}
    over = {"pad": at["pad"] + "x"}

    async def fork(patch: dict, new_id: str) -> Any:
        async with Orchestrator(db_url, max_context_bytes=limit) as o:
            return await o.fork("seed", 2, id=new_id, context_patch=patch)

    run_async(fork(at, "at-limit"))
    before = row_counts(db_url)
    with pytest.raises(UserError, match="ORCH_MAX_CONTEXT_BYTES"):
        run_async(fork(over, "over-limit"))
    assert row_counts(db_url) == before
    r = orch(
        "fork",
        "seed",
        "--from-step",
        "2",
        "--context-patch",
        json.dumps(over),
        db_url=db_url,
        ORCH_MAX_CONTEXT_BYTES=str(limit),
    )
    assert_usage_error(r, "ORCH_MAX_CONTEXT_BYTES")
    assert row_counts(db_url) == before


def test_a_context_that_grows_past_the_limit_fails_its_run(db_url, tmp_path, workers):
    chain_machine(tmp_path / "grow.yml", ["grow", "add"], context={"grow": "input.grow"})
    for ex_id, grow in (("small", 100), ("big", 5000)):
        args = ("--id", ex_id, "--input", json.dumps({"grow": grow}))
        ok(orch("submit", "grow.yml", *args, db_url=db_url, cwd=tmp_path))
    w = workers(db_url, "--app", "testapp", "--burst", ORCH_MAX_CONTEXT_BYTES="2000")
    assert w.wait() == 0, w.log()

    async def outcome() -> dict:
        async with Orchestrator(db_url) as o:
            return {i: await o.get(i) for i in ("small", "big")}

    done = run_async(outcome())
    assert done["small"].status == "completed"
    assert done["big"].status == "failed"
    assert "ORCH_MAX_CONTEXT_BYTES" in done["big"].error.splitlines()[0]


# ------------------------------------------------ a worker survives a row it cannot use


def _write_by_hand(db_url: str, statements: list[str]) -> None:
    """Rows changed around the API, foreign keys off, as someone at a SQL prompt might."""
    url = sa.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        import sqlite3

        conn = sqlite3.connect(url.database)  # foreign keys are off by default
        conn.executescript(";".join(statements))
        conn.close()
        return
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET session_replication_role = replica")  # no foreign key checks
        for statement in statements:
            conn.execute(statement)


def test_a_worker_fails_a_row_it_cannot_use_and_goes_on(db_url, tmp_path, machine, workers):
    sqlite = db_url.startswith("sqlite")
    bad = {  # id: (SET clause, what the error says)
        "input-a-list": ("input = '[1, 2]'", "input is not a JSON object"),
        "input-a-string": ("input = '\"text\"'", "input is not a JSON object"),
        "config-missing": ("config_hash = 'no-such-config'", "missing from the store"),
    }
    if sqlite:  # PostgreSQL's types refuse these themselves
        bad["priority-text"] = ("priority = 'high'", "priority is not a whole number")
        bad["input-not-json"] = ("input = 'not json'", "input is not a JSON object")
        bad["created-at-garbage"] = ("created_at = 'yesterday'", "created_at is not a time")
    for ex_id in [*bad, "good"]:
        ok(orch("submit", "m.yml", "--id", ex_id, db_url=db_url, cwd=tmp_path))
    _write_by_hand(
        db_url, [f"UPDATE executions SET {s} WHERE id = '{i}'" for i, (s, _) in bad.items()]
    )

    w = workers(db_url, "--app", "testapp", "--burst")
    assert w.wait() == 0, w.log()
    assert "Traceback" not in w.log()

    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = dict(conn.execute(sa.text("SELECT id, status FROM executions")).all())
        errors = dict(conn.execute(sa.text("SELECT id, error FROM executions")).all())
    engine.dispose()
    assert rows == {**{i: "failed" for i in bad}, "good": "completed"}
    for ex_id, (_, says) in bad.items():
        assert says in errors[ex_id].splitlines()[0], errors[ex_id]


def test_a_rendered_channel_too_long_for_the_store_fails_its_run(db_url, tmp_path, workers):
    from .test_waits import wait_machine

    wait_machine(tmp_path / "w.yml", "approval/{{ context.ticket }}")
    data = yaml.safe_load((tmp_path / "w.yml").read_text())
    data["data"]["context"]["ticket"] = "input.ticket"
    write_machine(tmp_path / "w.yml", data)
    fits = "t" * (checks.CHANNEL_LENGTH - len("approval/"))
    for ex_id, ticket in (("too-long", fits + "t"), ("fits", fits)):
        args = ("--id", ex_id, "--input", json.dumps({"ticket": ticket}))
        ok(orch("submit", "w.yml", *args, db_url=db_url, cwd=tmp_path))
    w = workers(db_url, "--app", "testapp", "--burst")
    assert w.wait() == 0, w.log()

    async def outcome() -> dict:
        async with Orchestrator(db_url) as o:
            return {i: await o.get(i) for i in ("too-long", "fits")}

    done = run_async(outcome())
    assert done["fits"].status == "waiting"
    assert done["fits"].waiting_channel == "approval/" + fits
    assert done["too-long"].status == "failed"
    assert "a signal channel is 401 characters" in done["too-long"].error.splitlines()[0]


# ------------------------------------------------------------------ a .jsonl file streams


def test_submit_batches_reads_its_inputs_a_batch_at_a_time(db_url, machine, monkeypatch):
    monkeypatch.setattr("orchestrator.client.SUBMIT_BATCH", 10)
    pulled = 0

    def inputs():
        nonlocal pulled
        for n in range(35):
            pulled += 1
            yield {"n": n}

    seen: list[tuple[int, int]] = []  # (rows in the batch, inputs pulled when it was written)

    async def run() -> list[int]:
        async with Orchestrator(db_url) as o:
            real = o.store.submit

            async def submit(rows):
                seen.append((len(rows), pulled))
                return await real(rows)

            monkeypatch.setattr(o.store, "submit", submit)
            sizes = []
            async for batch in o.submit_batches(machine, inputs()):
                sizes.append(len(batch))
            return sizes

    assert run_async(run()) == [10, 10, 10, 5]
    assert seen == [(10, 10), (10, 20), (10, 30), (5, 35)]


def test_a_jsonl_file_is_read_a_line_at_a_time(tmp_path):
    from orchestrator.cli import jsonl_inputs

    (tmp_path / "in.jsonl").write_text("".join(f'{{"n": {n}}}\n' for n in range(1000)))
    checked: list[str] = []

    def check(value: Any, where: str) -> dict:
        checked.append(where)
        return value

    lines = jsonl_inputs(tmp_path / "in.jsonl", check)
    assert list(itertools.islice(lines, 3)) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert checked == [f"{tmp_path / 'in.jsonl'} line {n}" for n in (1, 2, 3)]


def test_a_jsonl_file_past_one_batch_submits_every_line(db_url, tmp_path, machine):
    count = 1234  # two batches and part of a third
    (tmp_path / "in.jsonl").write_text("".join(f'{{"n": {n}}}\n' for n in range(count)))
    r = ok(
        orch(
            "submit", "m.yml", "--input-file", "in.jsonl", "--id", "B", db_url=db_url, cwd=tmp_path
        )
    )
    assert r.stdout.split() == [f"B-{n}" for n in range(1, count + 1)]
    out = json.loads(
        ok(
            orch(
                "submit",
                "m.yml",
                "--input-file",
                "in.jsonl",
                "--id",
                "B",
                "--json",
                db_url=db_url,
                cwd=tmp_path,
            )
        ).stdout
    )
    assert [(d["id"], d["input"], d["created"]) for d in out] == [
        (f"B-{n + 1}", {"n": n}, False) for n in range(count)
    ]
    assert row_counts(db_url)["executions"] == count


# ------------------------------------------------------------------ the pure checks


@pytest.mark.parametrize("text", ["inf", "1e400", "nan", "-1", "99999999999", "1e12s"])
def test_a_duration_that_no_time_holds_is_refused(text):
    with pytest.raises(ValueError):
        timers.parse_duration(text)


def test_the_longest_wait_is_accepted():
    assert timers.parse_duration(str(timers.MAX_SECONDS)) == timers.MAX_SECONDS


def test_yaml_anchors_that_do_not_multiply_still_load():
    text = "base: &b {x: 1, y: [1, 2]}\none: *b\ntwo: {<<: *b, z: 3}\n"
    assert safeyaml.load(text) == yaml.safe_load(text)


def test_yaml_expanded_to_exactly_the_bound_loads_and_one_more_is_refused():
    # a list of N scalars is N + 1 nodes; used again through an alias, it adds N + 1
    def shared(n: int) -> str:
        return "a: &a [" + ",".join(["1"] * n) + "]\nb: *a\n"

    assert len(safeyaml.load(shared(safeyaml.MAX_ALIASED - 1))["b"]) == safeyaml.MAX_ALIASED - 1
    with pytest.raises(safeyaml.YAMLTooBig):
        safeyaml.load(shared(safeyaml.MAX_ALIASED))
    # written out, as large a document loads: its text is its size
    big = "[" + ",".join(["1"] * (2 * safeyaml.MAX_ALIASED)) + "]"
    assert len(safeyaml.load(big)) == 2 * safeyaml.MAX_ALIASED


def test_the_lengths_checked_are_the_columns():
    from orchestrator.store import models

    ex, sig, sched = models.executions.c, models.signals.c, models.schedules.c
    for column in (
        ex.id,
        ex.parent_id,
        ex.root_id,
        ex.worker_id,
        models.checkpoints.c.execution_id,
    ):
        assert column.type.length == checks.ID_LENGTH, column
    assert ex.queue.type.length == models.queues.c.name.type.length == checks.QUEUE_LENGTH
    assert sig.channel.type.length == ex.waiting_channel.type.length == checks.CHANNEL_LENGTH
    assert ex.machine.type.length == models.configs.c.machine_name.type.length == checks.NAME_LENGTH
    assert ex.needs.type.length == models.configs.c.needs.type.length == checks.NEEDS_LENGTH
    assert sched.name.type.length == checks.SCHEDULE_NAME_LENGTH
    assert sched.cron.type.length == checks.CRON_LENGTH
    assert sched.queue.type.length == checks.QUEUE_LENGTH


def test_json_size_is_what_the_limits_count():
    assert checks.json_size({"a": "é", "b": [1, 2]}) == len('{"a":"é","b":[1,2]}'.encode())


def test_client_checks_the_same_as_the_api(db_url, machine):
    async def call() -> None:
        client = await Client.open(Orchestrator(db_url).settings)
        try:
            await client.submit(machine, {}, priority="high")
        finally:
            await client.close()

    with pytest.raises(UserError, match="--priority"):
        run_async(call())


def test_the_console_refuses_json_nested_past_recursion():
    from tui.screens.prompts import parse_json

    with pytest.raises(ValueError, match="nested too deep"):
        parse_json("[" * 100_000 + "]" * 100_000, "data")
