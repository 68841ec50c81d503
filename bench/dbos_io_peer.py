"""W6's peer: DBOS Transact with ``worker_concurrency`` C, a workflow of three
steps that each sleep (asyncio) like a network call. Imported only in a child."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from dbos import DBOS, DBOSConfig


@DBOS.step()
async def call(counter: int, sleep: float) -> int:
    await asyncio.sleep(sleep)
    return counter + 1


@DBOS.workflow()
async def io3(sleep: float) -> int:
    counter = 0
    for _ in range(3):
        counter = await call(counter, sleep)
    return counter


def run(
    n: int,
    sleep: float,
    system_database_url: str,
    schema: str | None,
    worker_concurrency: int,
    polling_interval: float | None,
) -> dict[str, Any]:
    config: DBOSConfig = {
        "name": "flatorch-bench-io",
        "system_database_url": system_database_url,
        "log_level": "WARNING",
    }
    if schema:
        config["dbos_system_schema"] = schema
    options: dict[str, Any] = {"worker_concurrency": worker_concurrency}
    if polling_interval:
        options["polling_interval_sec"] = polling_interval
    DBOS(config=config)
    queue = None
    if not hasattr(DBOS, "register_queue"):
        from dbos import Queue

        queue = Queue("io", **options)
    DBOS.launch()
    try:
        if queue is None:
            queue = DBOS.register_queue("io", **options)
        handles = [queue.enqueue(io3, sleep) for _ in range(n)]
        results = [h.get_result() for h in handles]
        statuses = DBOS.list_workflows(queue_name="io", load_input=False, load_output=False)
        done = [s for s in statuses if s.status == "SUCCESS"]
        first = min((s.created_at or 0) for s in done) / 1000 if done else time.time()
        last = max((s.updated_at or 0) for s in done) / 1000 if done else time.time()
        return {
            "seconds": last - first,
            "completed": len(done),
            "bad": sum(1 for r in results if r != 3),
        }
    finally:
        DBOS.destroy()
