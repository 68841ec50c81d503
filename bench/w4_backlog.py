"""W4 deep backlog: the store's claim-and-complete rate with 1,000 vs 100,000
queued executions.

Store level, one process: a fresh store gets ``size`` executions through
``Store.submit`` in batches of 500 (the client's batch size), then one worker
runs ``w4_cycles`` cycles of ``Store.claim`` + ``Store.finish(completed)``,
timed. That window is repeated ``--repeats`` times on the same store; before
each window the backlog is topped up (untimed) to ``size`` queued executions.
Target: rate at 100k >= 0.8 x rate at 1k.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from typing import Any

from bench.common import (
    COUNTER3,
    EXPECTED_OUTPUT,
    ROOT,
    Config,
    WorkloadResult,
    backend_problem,
    describe_exception,
    fresh_db,
    ratio_of,
    run_child,
)

TITLE = "W4 deep backlog (claim + finish rate, 1k vs 100k queued)"
BATCH = 500
WARMUP = 10


async def backlog(db_url: str, size: int, cycles: int, windows: int) -> dict[str, Any]:
    """Child: fill a fresh store with ``size`` queued executions, time claim+finish."""
    from orchestrator.client import Client
    from orchestrator.settings import Settings
    from orchestrator.store import NewExecution, Store

    store = await Store.open(Settings(database_url=db_url))
    try:
        config = await Client(store).pin(COUNTER3)

        async def add(count: int) -> None:
            for start in range(0, count, BATCH):
                await store.submit(
                    [
                        NewExecution(
                            id=uuid.uuid4().hex,
                            machine=config.name,
                            config_hash=config.hash,
                            input={},
                        )
                        for _ in range(min(BATCH, count - start))
                    ]
                )

        t0 = time.perf_counter()
        await add(size + WARMUP)
        insert_seconds = time.perf_counter() - t0
        worker = "bench-w4"
        await store.register_worker(
            worker,
            host=socket.gethostname(),
            pid=os.getpid(),
            queue_names=["default"],
            concurrency=1,
        )

        async def cycle() -> None:
            claim = await store.claim(worker, ["default"])
            if claim is None:
                raise RuntimeError("the backlog ran dry")
            await store.finish(claim, status="completed", output=EXPECTED_OUTPUT)

        for _ in range(WARMUP):
            await cycle()
        rates = []
        for window in range(windows):
            if window:
                await add(cycles)  # back to `size` queued, untimed
            t0 = time.perf_counter()
            for _ in range(cycles):
                await cycle()
            rates.append(cycles / (time.perf_counter() - t0))
        counts = await store.count_by_status()
    finally:
        await store.close()
    return {"rates": rates, "insert_seconds": insert_seconds, "counts": counts}


def run(cfg: Config) -> WorkloadResult:
    started = time.monotonic()
    small, large = cfg.w4_sizes
    result = WorkloadResult(
        "W4",
        TITLE,
        params={
            "backlog sizes": f"{small:,} and {large:,} queued",
            "timed cycles per window": cfg.w4_cycles,
            "windows (repeats)": cfg.repeats,
            "insert batch": BATCH,
        },
    )
    for backend in cfg.backends:
        tag = "SQLite" if backend == "sqlite" else "PostgreSQL"
        problem = backend_problem(backend, cfg)
        if problem:
            result.skip(f"backlog on {tag}", problem)
            continue
        medians = {}
        for size in (small, large):
            print(f"  W4 {tag}, {size:,} queued ...", flush=True)
            try:
                with fresh_db(backend, cfg, "w4") as (db_url, _):
                    out = run_child(
                        "bench.w4_backlog:backlog",
                        {
                            "db_url": db_url,
                            "size": size,
                            "cycles": cfg.w4_cycles,
                            "windows": cfg.repeats,
                        },
                        timeout=cfg.child_timeout * 2,
                    )
            except Exception as exc:  # noqa: BLE001
                result.fail(f"{tag}, {size:,} queued", describe_exception(exc))
                continue
            row = result.row(
                f"{backend}-{size}",
                f"{tag}: claim + finish with {size:,} queued",
                "cycles/s",
                out["rates"],
            )
            row["insert_rows_per_s"] = (size + WARMUP) / out["insert_seconds"]
            medians[size] = row["median"]
            print(f"    {row['median']:.1f} cycles/s", flush=True)
        result.ratio(
            f"{tag}: rate at {large:,} / rate at {small:,}",
            ratio_of(medians.get(large), medians.get(small)),
            0.8,
        )
    result.notes.append(
        "Each cycle is two transactions (claim: select + update with fence += 1; "
        "finish: fenced update + worker counter). Figures are the median of the windows."
    )
    return result.finish(started)


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run(Config.smoke()).as_dict(), indent=2))
