"""W9's peer: the agent loop on DBOS Transact (PyPI ``dbos``, 3.x).

One ``@DBOS.step`` per turn returns that turn's 2 KB answer
(bench/apps/agentloop.py, the same text flatorch's hook appends); the workflow
keeps the history in a local list and returns ``{"turns": N, "chars": N * 2048}``.
Each workflow has a fixed id (``w9-<i>``), so a second process can recover it.

- ``run``: start the executions, wait for them, and report the system
  database's growth and the process's CPU time while they ran.
- ``start_and_hold``: start them with the hold on (the last turn's step writes a
  marker file and sleeps): the harness SIGKILLs this process.
- ``recover``: a fresh process whose ``DBOS.launch()`` recovers the pending
  workflows (DBOS re-enqueues them on its internal queue, whose thread runs
  them: the completed steps' outputs come from the database, the last step runs).

Two arrangements (``variant``): ``best`` starts each workflow with
``DBOS.start_workflow`` (no queue, as W1's b'') and stores values with DBOS's
portable JSON serializer (``DBOSPortableJSONSerializer``: smaller than the
default's base64 pickle); ``default`` enqueues on a queue at its defaults
(``worker_concurrency`` = executions, 1 s polling) with the default serializer.
Imported only in a child process (bench.child).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from dbos import DBOS, DBOSConfig, DBOSPortableJSONSerializer, SetWorkflowID

from bench.apps.agentloop import HOLD_ENV, answer
from bench.w9_agent_loop import store_bytes

QUEUE = "agents"


@DBOS.step()
def turn_step(key: str, turn: int, turns: int) -> str:
    hold = os.environ.get(HOLD_ENV)
    if hold and turn == turns:
        (Path(hold) / key).write_text(str(turn))
        time.sleep(3600)
    return answer(key, turn)


@DBOS.workflow()
def agent_loop(key: str, turns: int) -> dict[str, int]:
    history: list[str] = []
    for turn in range(1, turns + 1):
        history.append(turn_step(key, turn, turns))
    return {"turns": len(history), "chars": sum(len(a) for a in history)}


def _launch(system_database_url: str, schema: str | None, variant: str, executions: int):
    config: DBOSConfig = {
        "name": "flatorch-bench-w9",
        "system_database_url": system_database_url,
        "log_level": "WARNING",
    }
    if schema:
        config["dbos_system_schema"] = schema
    if variant == "best":
        config["serializer"] = DBOSPortableJSONSerializer()
    DBOS(config=config)
    DBOS.launch()
    if variant == "default":
        return DBOS.register_queue(QUEUE, worker_concurrency=executions)
    return None


def _start(queue, executions: int, turns: int) -> list:
    handles = []
    for i in range(executions):
        with SetWorkflowID(f"w9-{i}"):
            if queue is None:
                handles.append(DBOS.start_workflow(agent_loop, f"w9-{i}", turns))
            else:
                handles.append(queue.enqueue(agent_loop, f"w9-{i}", turns))
    return handles


def _finished(executions: int, turns: int) -> dict[str, Any]:
    ids = [f"w9-{i}" for i in range(executions)]
    statuses = [s for s in DBOS.list_workflows(workflow_ids=ids) if s.status == "SUCCESS"]
    good = {"turns": turns, "chars": turns * 2048}
    return {
        "completed": len(statuses),
        "bad": executions - sum(1 for s in statuses if s.output == good),
        "last_finished": max((s.updated_at or 0) for s in statuses) / 1000 if statuses else None,
    }


def run(
    executions: int,
    turns: int,
    variant: str,
    system_database_url: str,
    schema: str | None,
    measure: dict[str, Any],
) -> dict[str, Any]:
    queue = _launch(system_database_url, schema, variant, executions)
    try:
        before = store_bytes(measure)
        cpu0 = time.process_time()
        handles = _start(queue, executions, turns)
        for handle in handles:
            handle.get_result()
        cpu = time.process_time() - cpu0
        out = _finished(executions, turns)
    finally:
        DBOS.destroy()
    return {**out, "cpu_seconds": cpu, "bytes_before": before, "bytes_after": store_bytes(measure)}


def start_and_hold(
    executions: int, turns: int, variant: str, system_database_url: str, schema: str | None
) -> None:
    queue = _launch(system_database_url, schema, variant, executions)
    _start(queue, executions, turns)
    time.sleep(3600)  # the harness kills this process while every workflow holds


def recover(
    executions: int, turns: int, variant: str, system_database_url: str, schema: str | None
) -> dict[str, Any]:
    _launch(system_database_url, schema, variant, executions)
    try:
        launched = time.time()
        for i in range(executions):
            DBOS.retrieve_workflow(f"w9-{i}").get_result()
        out = _finished(executions, turns)
    finally:
        DBOS.destroy()
    return {**out, "launched_at": launched}
