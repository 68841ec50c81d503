"""W7's peer: DBOS Transact, the time from an enqueue (or start_workflow) to the
workflow's first line, with idle workers. Imported only in a child."""

from __future__ import annotations

import time
from typing import Any

from dbos import DBOS, DBOSConfig


@DBOS.workflow()
def started() -> float:
    return time.time()


def run(
    samples: int, gap: float, system_database_url: str, schema: str | None, polling: float
) -> dict[str, Any]:
    config: DBOSConfig = {
        "name": "flatorch-bench-latency",
        "system_database_url": system_database_url,
        "log_level": "WARNING",
    }
    if schema:
        config["dbos_system_schema"] = schema
    DBOS(config=config)
    queue = None
    if not hasattr(DBOS, "register_queue"):
        from dbos import Queue

        queue = Queue("lat", polling_interval_sec=polling)
    DBOS.launch()
    try:
        if queue is None:
            queue = DBOS.register_queue("lat", polling_interval_sec=polling)
        time.sleep(1.0)
        queued, direct = [], []
        for _ in range(samples):
            t0 = time.time()
            queued.append(queue.enqueue(started).get_result() - t0)
            time.sleep(gap)
        for _ in range(samples):
            t0 = time.time()
            direct.append(DBOS.start_workflow(started).get_result() - t0)
            time.sleep(gap)
        return {"queued": queued, "start_workflow": direct}
    finally:
        DBOS.destroy()
