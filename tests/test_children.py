"""Children over the pool, fork from any step, and moving a run onto a fixed workflow.

Real `orch worker` processes and the real `orch` CLI, on SQLite and PostgreSQL.
Which process ran what is read from the effects file the test hooks append to.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

from orchestrator.client import Client
from orchestrator.clock import utcnow
from orchestrator.settings import Settings
from orchestrator.store import Store

from .conftest import chain_machine, orch, run_async, wait_until, write_machine

SPEC = {"spec": "flatmachine", "spec_version": "4.2.1"}


def env(tmp_path: Path, ttl: str = "2") -> dict[str, str]:
    return {"ORCH_TEST_EFFECTS": str(tmp_path / "effects.log"), "ORCH_LEASE_TTL": ttl}


def effects(tmp_path: Path) -> list[tuple[str, str, int]]:
    path = tmp_path / "effects.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        ex_id, state, _key, pid = line.split()
        out.append((ex_id, state, int(pid)))
    return out


CHILD = {
    **SPEC,
    "data": {
        "name": "child",
        "context": {"n": "input.n", "acc": 0, "sleep": "input.sleep", "fail_two": "input.fail_two"},
        "states": {
            "start": {
                "type": "initial",
                "transitions": [
                    {"condition": "context.n == '2' and context.fail_two == 'True'", "to": "boom"},
                    {"to": "work"},
                ],
            },
            "work": {"hooks": "effects", "action": "slow_add", "transitions": [{"to": "done"}]},
            "boom": {"hooks": "effects", "action": "fail", "transitions": [{"to": "done"}]},
            "done": {"type": "final", "output": {"n": "context.n", "acc": "context.acc"}},
        },
    },
}


def child_with(**context) -> dict:
    child = json.loads(json.dumps(CHILD))
    child["data"]["context"].update(context)
    return child


def fan_machine(path: Path, *, mode: str = "settled", child: dict | None = None) -> Path:
    """start → fan (foreach input.items over `child`, mode) → done {results}."""
    return write_machine(
        path,
        {
            **SPEC,
            "data": {
                "name": "fan",
                "machines": {"child": child or CHILD},
                "context": {"todo": "input.items", "results": None},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "fan"}]},
                    "fan": {
                        "foreach": "context.todo",
                        "as": "item",
                        "machine": "child",
                        "mode": mode,
                        "input": {
                            # (the library renders a foreach item's input as text)
                            "n": "{{ item.n }}",
                            "sleep": "{{ item.sleep }}",
                            "fail_two": "{{ item.fail_two }}",
                        },
                        "output_to_context": {"results": "output"},
                        "transitions": [{"to": "done"}],
                    },
                    "done": {"type": "final", "output": {"results": "context.results"}},
                },
            },
        },
    )


def submit(db_url: str, machine: Path, ex_id: str, input: dict | None = None) -> str:
    async def go():
        async with await Client.open(Settings(database_url=db_url)) as client:
            return (await client.submit(machine, input or {}, id=ex_id)).execution.id

    return run_async(go())


def get(store: Store, ex_id: str):
    return run_async(store.get(ex_id))


def children(store: Store, parent: str):
    return run_async(store.children(parent))


def ok(r):
    assert r.returncode == 0, r.stderr
    return r


def usage_error(r, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("orch: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------ foreach


def test_foreach_spreads_over_the_pool_and_survives_both_workers_killed(
    db_url, store, tmp_path, workers
):
    machine = fan_machine(tmp_path / "fan.yml")
    items = [{"n": i, "sleep": 1} for i in range(12)]
    submit(db_url, machine, "fan-1", {"items": items})
    first = [
        workers(db_url, "--app", "testapp", "--concurrency", "3", **env(tmp_path)) for _ in range(2)
    ]
    wait_until(
        lambda: (
            {pid for ex, _, pid in effects(tmp_path) if ex != "fan-1"} >= {w.pid for w in first}
        ),
        60,
        "both workers running children",
    )
    assert get(store, "fan-1").status == "waiting"  # the parent holds no slot meanwhile
    for w in first:
        w.signal(signal.SIGKILL)
        w.wait()
    replacements = [
        workers(db_url, "--app", "testapp", "--concurrency", "3", **env(tmp_path)) for _ in range(2)
    ]
    wait_until(lambda: get(store, "fan-1").status == "completed", 120, "the parent completed")
    for w in replacements:
        w.signal(signal.SIGTERM)
        assert w.wait() == 0

    results = get(store, "fan-1").output["results"]
    assert [r["n"] for r in results] == [str(i) for i in range(12)]
    assert all(r["acc"] == 1 for r in results)
    kids = children(store, "fan-1")
    assert len(kids) == 12  # each item launched once, however often the parent ran
    assert {k.status for k in kids} == {"completed"}
    assert {k.parent_id for k in kids} == {"fan-1"} and {k.root_id for k in kids} == {"fan-1"}
    ran = {pid for ex, _, pid in effects(tmp_path) if ex != "fan-1"}
    assert {w.pid for w in first} <= ran  # the fan-out used both workers
    shown = json.loads(ok(orch("show", "fan-1", "--json", db_url=db_url)).stdout)
    assert sorted(c["id"] for c in shown["children"]) == sorted(k.id for k in kids)
    listed = json.loads(ok(orch("list", "--parent", "fan-1", "--json", db_url=db_url)).stdout)
    assert len(listed) == 12


def test_settled_keeps_a_failed_child_as_a_failed_item(db_url, store, tmp_path, workers):
    machine = fan_machine(tmp_path / "fan.yml")
    items = [{"n": i, "sleep": 0, "fail_two": True} for i in (1, 2, 3)]
    submit(db_url, machine, "settled", {"items": items})
    w = workers(db_url, "--app", "testapp", "--burst", "--concurrency", "2", **env(tmp_path))
    assert w.wait() == 0
    ex = get(store, "settled")
    assert ex.status == "completed"
    one, two, three = ex.output["results"]
    assert (one["n"], three["n"]) == ("1", "3")
    assert two["_error_type"] == "RuntimeError" and "on purpose" in two["_error"]
    assert Counter(k.status for k in children(store, "settled")) == Counter(
        {"completed": 2, "failed": 1}
    )


def test_any_takes_the_first_result_and_cancels_the_others(db_url, store, tmp_path, workers):
    machine = fan_machine(tmp_path / "any.yml", mode="any")
    items = [{"n": 0, "sleep": 30}, {"n": 1, "sleep": 0}, {"n": 2, "sleep": 30}]
    submit(db_url, machine, "race", {"items": items})
    w = workers(db_url, "--app", "testapp", "--concurrency", "4", **env(tmp_path))
    wait_until(lambda: get(store, "race").status == "completed", 60, "the parent completed")
    assert get(store, "race").output["results"] == [{"n": "1", "acc": 1}]
    wait_until(
        lambda: (
            Counter(k.status for k in children(store, "race"))
            == Counter({"completed": 1, "cancelled": 2})
        ),
        30,
        "the slow ones cancelled",
    )
    w.signal(signal.SIGTERM)
    assert w.wait() == 0


# ------------------------------------------------------------------- launch


def test_a_launch_survives_a_parent_killed_before_its_checkpoint(db_url, store, tmp_path, workers):
    """A final state's state_exit commits with the outcome, so a launching final
    state is not committed when the parent dies right after it; the resumed
    parent runs it again. One child."""
    machine = write_machine(
        tmp_path / "launcher.yml",
        {
            **SPEC,
            "data": {
                "name": "launcher",
                "machines": {"child": CHILD},
                "context": {"acc": 0, "crash_after": "input.crash_after"},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "go"}]},
                    "go": {
                        "type": "final",
                        "hooks": "effects",
                        "launch": "child",
                        "launch_input": {"n": 7, "sleep": 0},
                        "output": {"acc": "context.acc"},
                    },
                },
            },
        },
    )
    submit(db_url, machine, "launcher", {"crash_after": "go"})
    first = workers(db_url, "--app", "testapp", **env(tmp_path))
    assert first.wait() == -signal.SIGKILL  # launched, then died before any checkpoint of it
    wait_until(lambda: get(store, "launcher").lease_until < utcnow(), what="its lease expired")
    second = workers(db_url, "--app", "testapp", "--burst", **env(tmp_path))
    assert second.wait() == 0
    assert get(store, "launcher").status == "completed"
    [kid] = children(store, "launcher")
    assert kid.status == "completed" and kid.output == {"n": 7, "acc": 1}


# ------------------------------------------------------------------- cancel


def test_cancelling_a_parent_cancels_its_running_and_queued_children(
    db_url, store, tmp_path, workers
):
    machine = fan_machine(tmp_path / "fan.yml")
    submit(db_url, machine, "doomed", {"items": [{"n": i, "sleep": 60} for i in range(4)]})
    w = workers(db_url, "--app", "testapp", "--concurrency", "2", **env(tmp_path))
    wait_until(
        lambda: (
            Counter(k.status for k in children(store, "doomed"))
            == Counter({"running": 2, "queued": 2})
        ),
        60,
        "two children running, two queued",
    )
    ok(orch("cancel", "doomed", "--reason", "changed my mind", db_url=db_url))
    kids = children(store, "doomed")
    assert {k.status for k in kids} == {"cancelled"}
    assert all("doomed" in (k.cancel_reason or "") for k in kids)
    wait_until(lambda: w.log().count("cancelled doomed@") == 2, 30, "the running ones stopped")
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    assert {k.status for k in children(store, "doomed")} == {"cancelled"}


# --------------------------------------------------------------------- fork


def test_a_fork_runs_only_the_states_after_its_step(db_url, store, tmp_path, workers):
    machine = chain_machine(tmp_path / "chain.yml", ["add", "add", "add", "add"])
    submit(db_url, machine, "orig")
    assert workers(db_url, "--app", "testapp", "--burst", **env(tmp_path)).wait() == 0
    original = get(store, "orig")
    history = [(h.step, h.event, h.state) for h in run_async(store.history("orig"))]
    [s2_step] = [step for step, event, state in history if (event, state) == ("state_exit", "s2")]

    forked = json.loads(
        ok(
            orch(
                "fork",
                "orig",
                "--from-step",
                str(s2_step),
                "--id",
                "again",
                "--json",
                db_url=db_url,
            )
        ).stdout
    )
    assert forked["id"] == "again" and forked["status"] == "queued"
    assert workers(db_url, "--app", "testapp", "--burst", **env(tmp_path)).wait() == 0
    fork = get(store, "again")
    assert fork.status == "completed"
    assert fork.output["acc"] == original.output["acc"] == 4
    assert Counter(state for ex, state, _ in effects(tmp_path) if ex == "again") == Counter(
        {"s3": 1, "s4": 1}
    )
    assert get(store, "orig") == original  # untouched
    assert [(h.step, h.event, h.state) for h in run_async(store.history("orig"))] == history

    # a patched context: the later states see it
    ok(
        orch(
            "fork",
            "orig",
            "--from-step",
            str(s2_step),
            "--id",
            "patched",
            "--context-patch",
            '{"acc": 100}',
            db_url=db_url,
        )
    )
    assert workers(db_url, "--app", "testapp", "--burst", **env(tmp_path)).wait() == 0
    assert get(store, "patched").output["acc"] == 102

    at_step = json.loads(
        ok(orch("show", "orig", "--context", "--step", str(s2_step), db_url=db_url)).stdout
    )
    assert at_step["acc"] == 2
    assert json.loads(ok(orch("show", "orig", "--context", db_url=db_url)).stdout)["acc"] == 4


# --------------------------------------------------- a run moved to a fix


def test_a_failed_run_resumes_on_a_fixed_workflow(db_url, store, tmp_path, workers):
    def two_step(path: Path, condition: str) -> Path:
        return write_machine(
            path,
            {
                **SPEC,
                "data": {
                    "name": "fixable",
                    "context": {"acc": 0},
                    "states": {
                        "start": {"type": "initial", "transitions": [{"to": "s1"}]},
                        "s1": {
                            "hooks": "effects",
                            "action": "add",
                            "transitions": [{"condition": condition, "to": "s2"}, {"to": "s2"}],
                        },
                        "s2": {
                            "hooks": "effects",
                            "action": "add",
                            "transitions": [{"to": "done"}],
                        },
                        "done": {"type": "final", "output": {"acc": "context.acc"}},
                    },
                },
            },
        )

    broken = two_step(tmp_path / "broken.yml", "context.acc >")  # does not parse at run time
    submit(db_url, broken, "fixme")
    assert workers(db_url, "--app", "testapp", "--burst", **env(tmp_path)).wait() == 0
    failed = get(store, "fixme")
    assert failed.status == "failed" and "Invalid expression" in failed.error
    before = [(h.step, h.event, h.state) for h in run_async(store.history("fixme"))]

    lacking = write_machine(
        tmp_path / "lacking.yml",
        {
            **SPEC,
            "data": {
                "name": "fixable",
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "done"}]},
                    "done": {"type": "final"},
                },
            },
        },
    )
    usage_error(orch("retry", "fixme", "--machine", str(lacking), db_url=db_url), "no state 's1'")
    assert get(store, "fixme") == failed

    fixed = two_step(tmp_path / "fixed.yml", "context.acc > 0")
    ok(orch("retry", "fixme", "--machine", str(fixed), db_url=db_url))
    assert workers(db_url, "--app", "testapp", "--burst", **env(tmp_path)).wait() == 0
    done = get(store, "fixme")
    assert done.status == "completed" and done.output == {"acc": 2}
    assert done.config_hash != failed.config_hash
    after = [(h.step, h.event, h.state) for h in run_async(store.history("fixme"))]
    assert after[: len(before)] == before  # its history kept
    assert Counter(state for ex, state, _ in effects(tmp_path) if ex == "fixme") == Counter(
        {"s1": 1, "s2": 1}
    )


# ---------------------------------------------------------------- bad input


def test_bad_lineage_input_is_one_line_exit_2_and_writes_nothing(db_url, store, tmp_path, workers):
    usage_error(
        orch("fork", "nope", "--from-step", "1", db_url=db_url), "no execution with id 'nope'"
    )
    usage_error(orch("retry", "nope", db_url=db_url), "no execution with id 'nope'")
    usage_error(orch("list", "--parent", "nope", db_url=db_url), "no execution with id 'nope'")

    machine = chain_machine(tmp_path / "chain.yml", ["add"])
    submit(db_url, machine, "one")
    assert workers(db_url, "--app", "testapp", "--burst", **env(tmp_path)).wait() == 0
    usage_error(
        orch("fork", "one", "--from-step", "99", db_url=db_url), "no committed state at step 99"
    )
    usage_error(
        orch("fork", "one", "--from-step", "1", "--context-patch", "[1]", db_url=db_url),
        "--context-patch must be a JSON object",
    )
    lacking = chain_machine(tmp_path / "other.yml", [])
    usage_error(
        orch("fork", "one", "--from-step", "2", "--machine", str(lacking), db_url=db_url),
        "no state 's1'",
    )
    assert {ex.id for ex in run_async(store.list_executions())} == {"one"}

    # a child machine that does not exist is refused at submit: a worker never
    # reads a workflow's files from its own disk
    missing = write_machine(
        tmp_path / "missing.yml",
        {
            **SPEC,
            "data": {
                "name": "orphaned",
                "machines": {"child": "./not-there.yml"},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "call"}]},
                    "call": {"machine": "child", "transitions": [{"to": "done"}]},
                    "done": {"type": "final"},
                },
            },
        },
    )
    usage_error(
        orch("submit", str(missing), "--id", "orphaned", db_url=db_url),
        "machine 'child' file './not-there.yml' not found",
    )
    assert {ex.id for ex in run_async(store.list_executions())} == {"one"}
