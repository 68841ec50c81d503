"""Limits a workflow cannot get around: the checkpoints resume needs, the step limit.

Real `orch` commands and `orch worker --burst` processes, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import chain_machine, orch, write_machine
from .test_cli import assert_nothing_written, assert_usage_error, ok, orch_json

SPEC = {"spec": "flatmachine", "spec_version": "4.2.1"}


def effects_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"ORCH_TEST_EFFECTS": str(tmp_path / "effects.log"), **extra}


def ran(tmp_path: Path) -> list[str]:
    """The states whose action ran, in order (from the effects file)."""
    path = tmp_path / "effects.log"
    return [line.split()[1] for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------ checkpoint_on at submit


@pytest.mark.parametrize(
    "checkpoint_on, missing",
    [
        ([], "add state_exit, machine_end"),
        (["state_enter", "execute"], "add state_exit, machine_end"),
        (["machine_start", "state_exit"], "add machine_end,"),
        (["machine_end", "waiting"], "add state_exit,"),
        ("state_exit", "add state_exit, machine_end"),  # a string, not a list
        (None, "add state_exit, machine_end"),
    ],
)
def test_checkpoint_on_without_the_durable_events_is_refused(
    checkpoint_on, missing, db_url, tmp_path
):
    machine = yaml.safe_load(chain_machine(tmp_path / "m.yml", ["add"]).read_text())
    machine["data"]["persistence"] = {"checkpoint_on": checkpoint_on}
    write_machine(tmp_path / "m.yml", machine)
    r = orch("submit", "m.yml", db_url=db_url, cwd=tmp_path)
    assert_usage_error(r, "m.yml", "checkpoint_on", missing, "remove checkpoint_on")
    assert_nothing_written(db_url)


def test_checkpoint_on_with_the_durable_events_is_taken(db_url, tmp_path):
    chain_machine(tmp_path / "m.yml", ["add"], checkpoint_on=["state_exit", "machine_end"])
    ex_id = ok(orch("submit", "m.yml", db_url=db_url, cwd=tmp_path)).stdout.strip()
    assert [e["id"] for e in orch_json("list", db_url=db_url)] == [ex_id]


# ------------------------------------------------------------------ step limit


def run_burst(db_url: str, tmp_path: Path, max_steps: int) -> None:
    env = effects_env(tmp_path, ORCH_MAX_STEPS=str(max_steps))
    ok(orch("worker", "--app", "testapp", "--burst", db_url=db_url, cwd=tmp_path, **env))


def test_a_runaway_loop_fails_at_the_step_limit_naming_it(db_url, tmp_path):
    write_machine(
        tmp_path / "loop.yml",
        {
            **SPEC,
            "data": {
                "name": "loop",
                "context": {"acc": 0},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "again"}]},
                    "again": {
                        "hooks": "effects",
                        "action": "add",
                        "transitions": [{"to": "again"}],
                    },
                    "done": {"type": "final", "output": {"acc": "context.acc"}},
                },
            },
        },
    )
    ex_id = ok(orch("submit", "loop.yml", db_url=db_url, cwd=tmp_path)).stdout.strip()
    run_burst(db_url, tmp_path, 5)
    shown = orch_json("show", ex_id, db_url=db_url)
    assert shown["status"] == "failed"
    assert shown["output"] is None
    assert "step limit" in shown["error"] and "ORCH_MAX_STEPS=5" in shown["error"]
    assert ran(tmp_path) == ["again"] * 4  # steps 2..5; step 1 is start
    # the run did not end: no machine_end, so a retry goes on from the last state_exit
    events = [h["event"] for h in shown["history"]]
    assert "machine_end" not in events and events[-1] == "state_exit"


def test_a_final_state_at_the_step_limit_completes_and_a_retry_goes_on_past_it(db_url, tmp_path):
    """start, s1, s2, done: four steps. At a limit of 4 the machine completes;
    at 3 it fails, and a retry under 4 runs done only (s1 and s2 committed)."""
    chain_machine(tmp_path / "m.yml", ["add", "add"])
    exact = ok(orch("submit", "m.yml", "--id", "exact", db_url=db_url, cwd=tmp_path)).stdout
    run_burst(db_url, tmp_path, 4)
    shown = orch_json("show", exact.strip(), db_url=db_url)
    assert (shown["status"], shown["output"]["acc"]) == ("completed", 2)

    ok(orch("submit", "m.yml", "--id", "short", db_url=db_url, cwd=tmp_path))
    run_burst(db_url, tmp_path, 3)
    shown = orch_json("show", "short", db_url=db_url)
    assert shown["status"] == "failed" and "ORCH_MAX_STEPS=3" in shown["error"]
    assert "'done' still to run" in shown["error"]

    ok(orch("retry", "short", db_url=db_url))
    run_burst(db_url, tmp_path, 4)
    shown = orch_json("show", "short", db_url=db_url)
    assert (shown["status"], shown["output"]["acc"]) == ("completed", 2)
    assert ran(tmp_path) == ["s1", "s2", "s1", "s2"]  # exact's, then short's, none again


# ------------------------------------------------------------ cron overlap


def test_schedule_overlap_is_stored_and_listed(db_url, tmp_path):
    machine = str(chain_machine(tmp_path / "m.yml", ["add"]))
    ok(orch("schedule", "add", "plain", machine, "--cron", "* * * * *", db_url=db_url))
    ok(
        orch(
            "schedule",
            "add",
            "held",
            machine,
            "--cron",
            "* * * * *",
            "--overlap",
            "buffer_one",
            db_url=db_url,
        )
    )
    listed = orch_json("schedule", "list", db_url=db_url)
    assert [(s["name"], s["overlap"]) for s in listed] == [
        ("held", "buffer_one"),
        ("plain", "skip"),
    ]
    assert all(s["buffered_at"] is None and s["last_skipped_at"] is None for s in listed)
    table = ok(orch("schedule", "list", db_url=db_url)).stdout.splitlines()
    assert "overlap" in table[0].split()
    assert "buffer_one" in next(line for line in table if line.startswith("held")).split()


def test_an_unknown_overlap_is_one_line_and_writes_nothing(db_url, tmp_path):
    machine = str(chain_machine(tmp_path / "m.yml", ["add"]))
    r = orch(
        "schedule", "add", "n", machine, "--cron", "* * * * *", "--overlap", "pile", db_url=db_url
    )
    assert_usage_error(r, "--overlap", "skip", "allow", "buffer_one")
    assert_nothing_written(db_url)
