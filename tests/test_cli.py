"""The `orch` command line, run as real subprocesses on SQLite and PostgreSQL.

Bad input: exit 2, one line on stderr starting "orch: error:", and nothing written.
Good input: submit (idempotent by --id, .jsonl batches), run, show, result, listings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
import yaml
from sqlalchemy.engine import make_url

from .conftest import ROOT, chain_machine, orch, wait_until, write_machine

UNREACHABLE = "postgresql+psycopg://user:s3cret@127.0.0.1:1/x"


# ------------------------------------------------------------------ helpers


def assert_usage_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 with exactly one clear line on stderr (no traceback) and nothing on stdout."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("orch: error:"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert r.stdout == "", r.stdout
    return line


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def orch_json(*args: str, db_url: str, **kw):
    """Run a command with --json; stdout must be JSON and nothing else."""
    return json.loads(ok(orch(*args, "--json", db_url=db_url, **kw)).stdout)


def listed(db_url: str) -> list[dict]:
    return orch_json("list", "--limit", "1000", db_url=db_url)


def store_untouched(db_url: str) -> bool:
    """Nothing was written at all: no SQLite file, or no table in the PostgreSQL schema."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        return not Path(url.database).exists()
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        (count,) = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchone()
    return count == 0


def assert_nothing_written(db_url: str) -> None:
    assert store_untouched(db_url), "the failed command wrote to the store"
    assert listed(db_url) == []


def counter_yml() -> dict:
    return yaml.safe_load((ROOT / "examples" / "counter.yml").read_text())


@pytest.fixture
def counter(tmp_path) -> Path:
    """A valid machine file (examples/counter.yml) in tmp_path."""
    return write_machine(tmp_path / "counter.yml", counter_yml())


# ------------------------------------------------- bad input: exit 2, nothing written


def _unknown_target(tmp: Path) -> None:
    cfg = counter_yml()
    cfg["data"]["states"]["add_two"]["transitions"][0]["to"] = "nowhere"
    write_machine(tmp / "m.yml", cfg)


def _wrong_spec(tmp: Path) -> None:
    cfg = counter_yml()
    cfg["spec"] = "wrong"
    write_machine(tmp / "m.yml", cfg)


def _persistence_off(tmp: Path) -> None:
    cfg = counter_yml()
    cfg["data"]["persistence"] = {"enabled": False}
    write_machine(tmp / "m.yml", cfg)


def _persistence_off_with_backend(tmp: Path) -> None:
    cfg = counter_yml()
    cfg["data"]["persistence"] = {"enabled": False, "backend": "memory"}
    write_machine(tmp / "m.yml", cfg)


def _jsonl(text: str):
    def setup(tmp: Path) -> None:
        write_machine(tmp / "m.yml", counter_yml())
        (tmp / "in.jsonl").write_text(text)

    return setup


def _valid(tmp: Path) -> None:
    write_machine(tmp / "m.yml", counter_yml())


BAD_SUBMITS = {
    "missing-machine-file": (
        lambda tmp: None,
        ["submit", "missing.yml"],
        ["machine file not found", "missing.yml"],
    ),
    "yaml-does-not-parse": (
        lambda tmp: (tmp / "m.yml").write_text("spec: flatmachine\ndata: [\n"),
        ["submit", "m.yml"],
        ["m.yml", "YAML does not parse", "line 3"],
    ),
    "transition-to-unknown-state": (
        _unknown_target,
        ["submit", "m.yml"],
        ["data.states.add_two.transitions[0].to", "nowhere"],
    ),
    "spec-wrong": (_wrong_spec, ["submit", "m.yml"], ["'spec'", "wrong"]),
    "persistence-disabled": (
        _persistence_off,
        ["submit", "m.yml"],
        ["persistence", "enabled: false", "checkpoints", "resume"],
    ),
    "persistence-disabled-with-backend": (
        _persistence_off_with_backend,
        ["submit", "m.yml"],
        ["persistence", "enabled: false", "checkpoints", "resume"],
    ),
    "input-json-list": (
        _valid,
        ["submit", "m.yml", "--input", "[1, 2]"],
        ["--input", "JSON object", "list"],
    ),
    "input-invalid-json": (
        _valid,
        ["submit", "m.yml", "--input", "{n: 5"],
        ["--input", "not valid JSON"],
    ),
    "input-and-input-file": (
        _jsonl('{"n": 1}\n'),
        ["submit", "m.yml", "--input", "{}", "--input-file", "in.jsonl"],
        ["--input", "--input-file"],
    ),
    "input-file-missing": (
        _valid,
        ["submit", "m.yml", "--input-file", "absent.jsonl"],
        ["input file not found", "absent.jsonl"],
    ),
    "jsonl-line-not-an-object": (
        _jsonl('{"n": 1}\n{"n": 2}\n[3]\n{"n": 4}\n'),
        ["submit", "m.yml", "--input-file", "in.jsonl"],
        ["in.jsonl line 3", "JSON object"],
    ),
    "jsonl-line-invalid-json": (
        _jsonl('{"n": 1}\n{"n": \n{"n": 3}\n'),
        ["submit", "m.yml", "--input-file", "in.jsonl", "--id", "batch"],
        ["in.jsonl line 2", "not valid JSON"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_SUBMITS))
def test_bad_submit_is_one_line_exit_2_and_writes_nothing(case, db_url, tmp_path):
    setup, args, needles = BAD_SUBMITS[case]
    setup(tmp_path)
    r = orch(*args, db_url=db_url, cwd=tmp_path)
    assert_usage_error(r, *needles)
    assert_nothing_written(db_url)


@pytest.mark.parametrize("command", ["show", "result"])
def test_unknown_execution_id(command, db_url, tmp_path):
    r = orch(command, "no-such-id", db_url=db_url, cwd=tmp_path)
    assert_usage_error(r, "no execution with id 'no-such-id'")
    assert listed(db_url) == []


@pytest.mark.parametrize(
    "args", [["list", "--json"], ["show", "x"], ["queues"], ["submit", "counter.yml"]]
)
@pytest.mark.parametrize("how", ["env", "flag"])
def test_unreachable_database_masks_the_password(args, how, tmp_path, counter):
    if how == "flag":
        # the flag wins over the environment
        r = orch("--db", UNREACHABLE, *args, db_url="sqlite:///unused.sqlite", cwd=tmp_path)
    else:
        r = orch(*args, db_url=UNREACHABLE, cwd=tmp_path)
    line = assert_usage_error(r, "cannot reach database", "***", "127.0.0.1:1")
    assert "s3cret" not in line
    assert "s3cret" not in r.stdout + r.stderr
    assert not (tmp_path / "unused.sqlite").exists()


def test_read_only_sqlite_file_is_refused(tmp_path, counter):
    path = tmp_path / "ro.sqlite"
    url = f"sqlite:///{path}"
    first = ok(orch("submit", "counter.yml", db_url=url, cwd=tmp_path)).stdout.strip()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    os.chmod(path, 0o444)
    try:
        r = orch("submit", "counter.yml", "--input", '{"n": 2}', db_url=url, cwd=tmp_path)
        assert_usage_error(r, "read-only", str(path))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    finally:
        os.chmod(path, 0o644)
    assert [ex["id"] for ex in listed(url)] == [first]


def test_missing_sqlite_directory_is_refused(tmp_path, counter):
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'o.sqlite'}"
    r = orch("submit", "counter.yml", db_url=url, cwd=tmp_path)
    assert_usage_error(r, "does not exist")
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------------ submit


def test_submit_same_id_twice_is_one_execution(db_url, tmp_path, counter):
    first = orch_json(
        "submit", "counter.yml", "--id", "X", "--input", '{"n": 1}', db_url=db_url, cwd=tmp_path
    )
    assert first["id"] == "X"
    assert first["created"] is True
    assert first["status"] == "queued"
    assert first["input"] == {"n": 1}

    # different input, same id: the existing execution comes back unchanged
    again = orch_json(
        "submit", "counter.yml", "--id", "X", "--input", '{"n": 2}', db_url=db_url, cwd=tmp_path
    )
    assert again["id"] == "X"
    assert again["created"] is False
    assert again["input"] == {"n": 1}

    plain = ok(orch("submit", "counter.yml", "--id", "X", db_url=db_url, cwd=tmp_path))
    assert plain.stdout == "X\n"

    rows = listed(db_url)
    assert [(r["id"], r["input"], r["status"]) for r in rows] == [("X", {"n": 1}, "queued")]


def test_submit_jsonl_submits_one_execution_per_line(db_url, tmp_path, counter):
    lines = [{"n": 1}, {"n": 2}, {"n": 3, "tag": "x"}]
    text = "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n"
    (tmp_path / "in.jsonl").write_text(text)
    out = orch_json(
        "submit", "counter.yml", "--input-file", "in.jsonl", db_url=db_url, cwd=tmp_path
    )
    assert isinstance(out, list) and len(out) == 3
    assert [d["input"] for d in out] == lines
    assert all(d["created"] for d in out)
    assert len({d["id"] for d in out}) == 3

    rows = listed(db_url)
    assert len(rows) == 3
    assert sorted(json.dumps(r["input"], sort_keys=True) for r in rows) == sorted(
        json.dumps(x, sort_keys=True) for x in lines
    )
    assert {r["id"] for r in rows} == {d["id"] for d in out}
    assert {r["machine"] for r in rows} == {"counter"}


def test_submit_jsonl_with_id_is_numbered_and_idempotent(db_url, tmp_path, counter):
    lines = [{"n": 10}, {"n": 20}, {"n": 30}, {"n": 40}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ("submit", "counter.yml", "--input-file", "in.jsonl", "--id", "B")

    out = orch_json(*args, db_url=db_url, cwd=tmp_path)
    assert [d["id"] for d in out] == ["B-1", "B-2", "B-3", "B-4"]
    assert [d["created"] for d in out] == [True] * 4

    again = orch_json(*args, db_url=db_url, cwd=tmp_path)
    assert [d["id"] for d in again] == ["B-1", "B-2", "B-3", "B-4"]
    assert [d["created"] for d in again] == [False] * 4

    plain = ok(orch(*args, db_url=db_url, cwd=tmp_path))
    assert plain.stdout.split() == ["B-1", "B-2", "B-3", "B-4"]

    rows = {r["id"]: r["input"] for r in listed(db_url)}
    assert rows == {f"B-{i}": x for i, x in enumerate(lines, 1)}


# ---------------------------------------------------------------- end to end


def test_counter_end_to_end(db_url, tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    r = ok(
        orch("submit", "examples/counter.yml", "--input", '{"n": 5}', db_url=db_url, cwd=tmp_path)
    )
    ex_id = r.stdout.strip()
    assert ex_id and len(r.stdout.splitlines()) == 1

    ok(orch("worker", "--app", "examples.app", "--burst", db_url=db_url, cwd=tmp_path))

    shown = orch_json("show", ex_id, db_url=db_url, cwd=tmp_path)
    assert shown["id"] == ex_id
    assert shown["machine"] == "counter"
    assert shown["status"] == "completed"
    assert shown["queue"] == "default"
    assert shown["input"] == {"n": 5}
    assert shown["output"] == {"acc": 15, "n": 5}
    assert shown["error"] is None
    assert shown["created_at"] and shown["updated_at"]
    history = shown["history"]
    assert isinstance(history, list) and history
    # the state of the last checkpoint (flatmachines records machine_end as state "end")
    assert shown["current_state"]
    # the last real state, not the library's 'end' pseudo-state of machine_end
    assert shown["current_state"] == "done"
    for entry in history:
        assert set(entry) >= {"step", "event", "state", "at"}
        assert entry["at"]
    events = [h["event"] for h in history]
    assert {"machine_start", "state_exit", "machine_end"} <= set(events)
    assert events[0] == "machine_start"
    assert events[-1] == "machine_end"
    exited = {h["state"] for h in history if h["event"] == "state_exit"}
    assert {"add_one", "add_two", "add_three"} <= exited
    steps = [h["step"] for h in history]
    assert steps == sorted(steps)

    res = ok(orch("result", ex_id, db_url=db_url, cwd=tmp_path))
    assert json.loads(res.stdout) == {"acc": 15, "n": 5}

    queues = orch_json("queues", db_url=db_url, cwd=tmp_path)
    [default] = [q for q in queues if q["queue"] == "default"]
    assert default["completed"] == 1
    assert default["queued"] == default["running"] == default["failed"] == 0

    workers = orch_json("workers", db_url=db_url, cwd=tmp_path)
    assert len(workers) == 1
    [w] = workers
    assert w["status"] == "stopped"
    assert w["completed"] == 1
    assert w["failed"] == 0
    assert w["queues"] == ["default"]

    # the plain (non-JSON) views work too and name the execution
    assert ex_id in ok(orch("list", db_url=db_url, cwd=tmp_path)).stdout
    assert "completed" in ok(orch("show", ex_id, db_url=db_url, cwd=tmp_path)).stdout


# --------------------------------------------------------------------- wait


def test_submit_wait_times_out_with_124(db_url, tmp_path, counter):
    r = orch(
        "submit",
        "counter.yml",
        "--id",
        "slow",
        "--wait",
        "--timeout",
        "1",
        db_url=db_url,
        cwd=tmp_path,
    )
    assert r.returncode == 124, (r.returncode, r.stdout, r.stderr)
    assert "timed out waiting for slow" in r.stderr
    assert "Traceback" not in r.stderr
    [row] = listed(db_url)
    assert (row["id"], row["status"]) == ("slow", "queued")

    r = orch("result", "slow", "--timeout", "0.5", db_url=db_url, cwd=tmp_path)
    assert r.returncode == 124, (r.returncode, r.stdout, r.stderr)


def test_submit_wait_exits_1_when_the_execution_fails(db_url, tmp_path, workers):
    chain_machine(tmp_path / "m.yml", ["fail"])
    ok(orch("db", "upgrade", db_url=db_url))  # the schema exists before two processes race
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            orch, "submit", "m.yml", "--id", "doomed", "--wait", db_url=db_url, cwd=tmp_path
        )
        wait_until(lambda: listed(db_url), what="the execution to be submitted")
        assert not waiting.done()  # --wait is waiting: no worker has run it yet
        w = workers(db_url, "--app", "testapp", "--burst")
        assert w.wait() == 0, w.log()
        r = waiting.result(timeout=120)

    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr, w.log())
    out = r.stdout.splitlines()
    assert out[0] == "doomed"
    assert out[1].startswith("failed:")
    assert "the workflow failed on purpose" in r.stdout

    [row] = listed(db_url)
    assert row["status"] == "failed"
    assert "the workflow failed on purpose" in row["error"]

    res = orch("result", "doomed", db_url=db_url, cwd=tmp_path)
    assert res.returncode == 1
    assert "doomed is failed" in res.stderr


# mistakes click finds while it parses: the same one line as ours, naming the help to read
PARSE_ERRORS = {
    "out-of-range": (["list", "--limit", "0"], ["--limit", "`orch list --help`"]),
    "unknown-option": (["show", "x", "--bogus"], ["--bogus", "`orch show --help`"]),
    "missing-value": (["submit", "m.yml", "--queue"], ["--queue", "`orch submit --help`"]),
    "missing-argument": (["schedule", "add"], ["NAME", "`orch schedule add --help`"]),
    "unknown-command": (["lsit"], ["lsit", "`orch --help`"]),
    "bad-choice": (["list", "--status", "done"], ["--status", "'done'"]),
}


@pytest.mark.parametrize("case", list(PARSE_ERRORS))
def test_a_mistake_click_finds_is_one_line_exit_2_and_writes_nothing(case, db_url, tmp_path):
    args, needles = PARSE_ERRORS[case]
    r = orch(*args, db_url=db_url, cwd=tmp_path)
    assert_usage_error(r, *needles)
    assert "Usage:" not in r.stderr
    assert_nothing_written(db_url)


# the commands that only read, and what each says of a store with nothing in it
READS = {
    "list": (["list"], 0, "id  machine  status"),
    "list-json": (["list", "--json"], 0, "[]"),
    "show": (["show", "nope"], 2, None),
    "show-context": (["show", "nope", "--context"], 2, None),
    "result": (["result", "nope", "--timeout", "1"], 2, None),
    "workers": (["workers", "--json"], 0, "[]"),
    "queues": (["queues", "--json"], 0, "[]"),
    "signals": (["signals", "--json"], 0, "[]"),
    "schedules": (["schedule", "list", "--json"], 0, "[]"),
}


def _answers_as_empty(r, code: int, out: str | None) -> None:
    if code == 2:
        assert_usage_error(r, "no execution with id 'nope'")
    else:
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(out), r.stdout


@pytest.mark.parametrize("case", list(READS))
def test_a_read_where_there_is_no_sqlite_file_creates_none(case, tmp_path):
    """A read typed where there is no store yet answers for an empty store and
    leaves no orch.sqlite behind (SQLite: the store is a file here)."""
    args, code, out = READS[case]
    path = tmp_path / "orch.sqlite"
    (tmp_path / "tmp").mkdir()
    r = orch(*args, db_url=f"sqlite:///{path}", cwd=tmp_path, TMPDIR=str(tmp_path / "tmp"))
    _answers_as_empty(r, code, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # no store made
    assert list((tmp_path / "tmp").iterdir()) == []  # and the empty one it read is gone
    if case == "show":  # once there is a store, the same command reads it
        counter = str(ROOT / "examples" / "counter.yml")
        ok(orch("submit", counter, "--id", "nope", db_url=f"sqlite:///{path}", cwd=tmp_path))
        assert "nope" in ok(orch(*args, db_url=f"sqlite:///{path}", cwd=tmp_path)).stdout


@pytest.mark.parametrize("case", list(READS))
def test_a_read_of_a_server_database_without_orch_tables_creates_none(case, pg_url, tmp_path):
    """PostgreSQL: a read pointed at a database (here a schema) where orch has
    made nothing, another application's say, answers for an empty store and
    creates no table there."""
    args, code, out = READS[case]
    engine = sa.create_engine(pg_url, poolclass=sa.NullPool)

    def tables() -> list[str]:
        with engine.connect() as conn:
            return sorted(
                conn.scalars(
                    sa.text(
                        "SELECT table_name FROM information_schema.tables"
                        " WHERE table_schema = current_schema()"
                    )
                )
            )

    (tmp_path / "tmp").mkdir()
    try:
        r = orch(*args, db_url=pg_url, cwd=tmp_path, TMPDIR=str(tmp_path / "tmp"))
        _answers_as_empty(r, code, out)
        assert tables() == []  # no schema made
        assert list((tmp_path / "tmp").iterdir()) == []  # and the empty one it read is gone
        if case == "show":  # once there is a store, the same command reads it
            counter = str(ROOT / "examples" / "counter.yml")
            ok(orch("submit", counter, "--id", "nope", db_url=pg_url, cwd=tmp_path))
            assert "executions" in tables()
            assert "nope" in ok(orch(*args, db_url=pg_url, cwd=tmp_path)).stdout
    finally:
        engine.dispose()


def test_help_and_the_bare_group_still_print_the_help(tmp_path):
    r = ok(orch("--help", db_url=f"sqlite:///{tmp_path / 'h.db'}", cwd=tmp_path))
    assert r.stdout.startswith("Usage: orch [OPTIONS] COMMAND") and "submit" in r.stdout
    bare = orch(db_url=f"sqlite:///{tmp_path / 'h.db'}", cwd=tmp_path)
    assert bare.returncode == 2 and "Usage: orch [OPTIONS] COMMAND" in bare.stderr
    assert not (tmp_path / "h.db").exists()


def test_the_serving_commands_are_found_past_the_group_options():
    # `orch worker|scheduler|up` hold a stop signal from main(), before click
    # parses; the command is the first word past the group's own options
    from orchestrator.cli import _SERVING, _command

    assert _command(["--db", "sqlite:///x", "-v", "worker", "--app", "a"]) == "worker"
    assert _command(["--db=sqlite:///x", "up", "--min", "1"]) == "up"
    assert _command(["list", "--queue", "worker"]) == "list"  # a value, not the command
    assert _command(["--db", "worker"]) is None  # the database's name, not the command
    assert _command([]) is None
    assert _SERVING == {"worker", "scheduler", "up"}
