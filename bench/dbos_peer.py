"""W1 (b): the 3-step workflow on DBOS Transact (PyPI ``dbos``, 3.x).

Imported only in a child process (bench.child), so a missing ``dbos`` never
breaks the other workloads. Three ``@DBOS.step`` steps each add 1; the workflow
returns 3. Executions go through a queue with ``worker_concurrency``.
"""

from __future__ import annotations

import time
from typing import Any

from dbos import DBOS, DBOSConfig


@DBOS.step()
def add(counter: int) -> int:
    return counter + 1


@DBOS.workflow()
def counter3() -> int:
    counter = 0
    counter = add(counter)
    counter = add(counter)
    counter = add(counter)
    return counter


def run(
    n: int,
    system_database_url: str,
    schema: str | None,
    worker_concurrency: int,
    polling_interval: float | None,
    direct: bool = False,
) -> dict[str, Any]:
    """``direct``: DBOS.start_workflow, no queue (each workflow on a thread at once)."""
    config: DBOSConfig = {
        "name": "flatorch-bench",
        "system_database_url": system_database_url,
        "log_level": "WARNING",
    }
    if schema:
        config["dbos_system_schema"] = schema
    queue_options: dict[str, Any] = {"worker_concurrency": worker_concurrency}
    if polling_interval:
        queue_options["polling_interval_sec"] = polling_interval
    DBOS(config=config)
    queue = None
    if not hasattr(DBOS, "register_queue"):  # older 3.x: Queue(...) before launch
        from dbos import Queue

        queue = Queue("q", **queue_options)
    DBOS.launch()
    try:
        if queue is None:
            queue = DBOS.register_queue("q", **queue_options)
        t0 = time.time()
        if direct:
            handles = [DBOS.start_workflow(counter3) for _ in range(n)]
        else:
            handles = [queue.enqueue(counter3) for _ in range(n)]
        results = [h.get_result() for h in handles]
        observed = time.time() - t0
        if direct:
            statuses = DBOS.list_workflows(load_input=False, load_output=False)
        else:
            statuses = DBOS.list_workflows(queue_name="q", load_input=False, load_output=False)
        done = [s for s in statuses if s.status == "SUCCESS"]
        last = max((s.updated_at or 0) for s in done) / 1000 if done else time.time()
        return {
            "seconds": last - t0,
            "observed_seconds": observed,
            "completed": len(done),
            "bad": sum(1 for r in results if r != 3),
            "dbos_version": _version(),
        }
    finally:
        DBOS.destroy()


def _version() -> str | None:
    from importlib.metadata import version

    return version("dbos")
