"""`orch` control commands: retry, cancel, scale, schedule; bad input is one line, exit 2."""

from __future__ import annotations

import json

from .conftest import chain_machine, orch
from .test_cli import assert_usage_error, ok, orch_json


def submitted(db_url, tmp_path, actions=("add",), *extra) -> str:
    machine = chain_machine(tmp_path / "m.yml", list(actions))
    return orch_json("submit", str(machine), *extra, db_url=db_url)["id"]


def snapshot(db_url) -> tuple:
    """What the store holds, through the CLI: executions, queues, schedules."""
    return (
        orch_json("list", db_url=db_url),
        orch_json("queues", db_url=db_url),
        orch_json("schedule", "list", db_url=db_url),
    )


def test_schedule_add_list_remove(db_url, tmp_path):
    machine = chain_machine(tmp_path / "m.yml", ["add"])
    out = ok(
        orch(
            "schedule",
            "add",
            "nightly",
            str(machine),
            "--cron",
            "0 2 * * *",
            "--input",
            '{"day": "yesterday"}',
            db_url=db_url,
        )
    )
    assert "first run" in out.stdout
    [sched] = orch_json("schedule", "list", db_url=db_url)
    assert sched["name"] == "nightly" and sched["cron"] == "0 2 * * *"
    assert sched["input"] == {"day": "yesterday"} and sched["next_fire_at"].endswith(
        "T02:00:00.000Z"
    )
    ok(orch("schedule", "remove", "nightly", db_url=db_url))
    assert orch_json("schedule", "list", db_url=db_url) == []


def test_bad_control_input_is_one_line_and_writes_nothing(db_url, tmp_path):
    ex_id = submitted(db_url, tmp_path)
    machine = str(tmp_path / "m.yml")
    before = snapshot(db_url)
    cases = [
        (["schedule", "add", "n", machine, "--cron", "61 * * * *"], "invalid cron"),
        (["schedule", "add", "n", machine, "--cron", "* * *"], "invalid cron"),
        (["schedule", "add", "n", machine, "--cron", "* * * * *", "--input", "[1]"], "JSON object"),
        (["schedule", "remove", "nope"], "no schedule named 'nope'"),
        (["scale", "default", "--min", "3", "--max", "2"], "more than --max"),
        (["scale", "default", "--min", "-1", "--max", "2"], "negative"),
        (["scale", "elsewhere", "--min", "1", "--max", "2"], "--create"),
        (["retry", ex_id], "only failed or cancelled"),
        (["retry", "no-such-id"], "no execution"),
        (["cancel", "no-such-id"], "no execution"),
        (["submit", machine, "--max-attempts", "0"], "--max-attempts"),
    ]
    for args, needle in cases:
        assert_usage_error(orch(*args, db_url=db_url), needle)
    assert snapshot(db_url) == before


def test_scale_sets_the_policy_and_can_create_a_queue(db_url, tmp_path):
    ok(orch("scale", "reports", "--min", "2", "--max", "6", "--create", db_url=db_url))
    [q] = [q for q in orch_json("queues", db_url=db_url) if q["queue"] == "reports"]
    assert (q["min_workers"], q["max_workers"]) == (2, 6)
    ok(orch("scale", "reports", "--min", "0", "--max", "1", db_url=db_url))
    [q] = [q for q in orch_json("queues", db_url=db_url) if q["queue"] == "reports"]
    assert (q["min_workers"], q["max_workers"]) == (0, 1)


def test_cancel_then_retry_runs_it_to_completion(db_url, tmp_path, workers):
    ex_id = submitted(db_url, tmp_path, ("add", "add"))
    assert orch_json("cancel", ex_id, db_url=db_url)["status"] == "cancelled"
    w = workers(db_url, "--app", "testapp", "--burst")
    assert w.wait() == 0
    assert orch_json("show", ex_id, db_url=db_url)["status"] == "cancelled"  # never claimed
    retried = orch_json("retry", ex_id, db_url=db_url)
    assert retried["status"] == "queued" and retried["attempt"] == 2
    w = workers(db_url, "--app", "testapp", "--burst")
    assert w.wait() == 0
    shown = orch_json("show", ex_id, db_url=db_url)
    assert shown["status"] == "completed" and shown["output"]["acc"] == 2


def test_max_attempts_retries_then_fails_with_the_traceback(db_url, tmp_path, workers):
    ex_id = submitted(db_url, tmp_path, ("add", "fail"), "--max-attempts", "2", "--backoff", "0.1")
    w = workers(db_url, "--app", "testapp", "--burst")
    assert w.wait() == 0
    # the burst worker may exit while the retry waits for its not_before
    w = workers(db_url, "--app", "testapp", "--burst")
    assert w.wait() == 0
    shown = orch_json("show", ex_id, db_url=db_url)
    assert shown["status"] == "failed" and shown["attempt"] == 2
    assert "RuntimeError: the workflow failed on purpose" in shown["error"]
    assert "Traceback" in shown["error"]
    r = orch("result", ex_id, db_url=db_url)
    assert r.returncode == 1 and json.dumps(None) not in r.stdout
