"""W7 submit-to-start latency with idle workers.

Two idle `orch worker` processes (--concurrency 4) wait; 20 single submits, a
quarter second apart; the latency of each is its ``started_at - created_at``
(the first claim after the submit's commit). p50 and p95. Target on both
stores: p50 <= 25 ms and p95 <= 100 ms, without an idle worker costing more
than 2 % of a core (its CPU time over 10 idle seconds). DBOS beside it: a queue
polled every 0.01 s, and start_workflow (no queue).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from bench.common import (
    BENCH,
    ROOT,
    Config,
    WorkloadResult,
    await_until,
    backend_problem,
    describe_exception,
    fresh_db,
    pg_schema,
    run_child,
    start_orch_worker,
    stop,
    temp_dir,
)

TITLE = "W7 submit-to-start latency (idle workers)"
COUNTER3 = BENCH / "machines" / "counter3.yml"
SAMPLES, GAP, IDLE = 20, 0.25, 10.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(db_url: str, procs: list) -> dict[str, Any]:
    from orchestrator.client import Client
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    store = await Store.open(Settings(database_url=db_url))
    try:

        async def registered() -> bool:
            live = await store.list_workers(include_stopped=False)
            return sum(1 for w in live if w.status == "active") >= len(procs)

        await await_until(registered, 120, "the workers to register")
        await asyncio.sleep(1.0)
        before = [cpu_seconds(p.pid) for p in procs]
        await asyncio.sleep(IDLE)
        idle = max((cpu_seconds(p.pid) - b) / IDLE for p, b in zip(procs, before, strict=True))
        client = Client(store)
        ids = []
        for _ in range(SAMPLES):
            ids.append((await client.submit(COUNTER3, {})).execution.id)
            await asyncio.sleep(GAP)

        async def done() -> bool:
            return (await store.count_by_status()).get("completed", 0) >= SAMPLES

        await await_until(done, 120, "the executions")
        latencies = []
        for ex_id in ids:
            ex = await store.get(ex_id)
            latencies.append((ex.started_at - ex.created_at).total_seconds() * 1000)
        return {"latencies_ms": latencies, "idle_cpu_share": idle}
    finally:
        await store.close()


def run_orch(cfg: Config, backend: str) -> dict[str, Any]:
    with fresh_db(backend, cfg, "w7") as (db_url, tmp):
        from bench.w1_throughput import _migrate

        asyncio.run(_migrate(db_url))
        procs = [
            start_orch_worker(db_url, tmp / f"worker-{i}.log", "--concurrency", "4")
            for i in range(2)
        ]
        try:
            return asyncio.run(_measure(db_url, procs))
        finally:
            for p in procs:
                stop(p)


def run_dbos(cfg: Config, backend: str) -> dict[str, Any]:
    with temp_dir(cfg, "w7dbos") as tmp:
        kwargs: dict[str, Any] = {"samples": SAMPLES, "gap": GAP, "polling": 0.01}
        if backend == "sqlite":
            kwargs.update(system_database_url=f"sqlite:///{tmp / 'dbos.sqlite'}", schema=None)
            return run_child(
                "bench.dbos_latency_peer:run", kwargs, timeout=cfg.child_timeout, cwd=tmp
            )
        with pg_schema(cfg.pg_url, "w7dbos") as schema:
            kwargs.update(system_database_url=schema.dsn, schema=schema.name)
            return run_child(
                "bench.dbos_latency_peer:run", kwargs, timeout=cfg.child_timeout, cwd=tmp
            )


def run(cfg: Config) -> WorkloadResult:
    started = time.monotonic()
    result = WorkloadResult(
        "W7",
        TITLE,
        params={"samples": SAMPLES, "gap between submits (s)": GAP, "idle window (s)": IDLE},
    )
    for backend in cfg.backends:
        tag = "SQLite" if backend == "sqlite" else "PostgreSQL"
        problem = backend_problem(backend, cfg)
        if problem:
            result.skip(f"W7 on {tag}", problem)
            continue
        try:
            print(f"  W7 {tag} ...", flush=True)
            out = run_orch(cfg, backend)
            lat = out["latencies_ms"]
            p50, p95 = percentile(lat, 50), percentile(lat, 95)
            result.row(f"orch-{backend}-p50", f"flatorch {tag}: p50", "ms", [p50])
            result.row(f"orch-{backend}-p95", f"flatorch {tag}: p95", "ms", [p95])
            result.row(
                f"orch-{backend}-idle",
                f"flatorch {tag}: an idle worker's CPU",
                "% of a core",
                [out["idle_cpu_share"] * 100],
            )
            result.ratio(f"{tag}: p50", p50, 25, op="<=", unit=" ms")
            result.ratio(f"{tag}: p95", p95, 100, op="<=", unit=" ms")
            result.ratio(f"{tag}: idle CPU", out["idle_cpu_share"] * 100, 2, op="<=", unit=" %")
            print(
                f"    p50 {p50:.1f} ms, p95 {p95:.1f} ms, idle {out['idle_cpu_share']:.2%}",
                flush=True,
            )
        except Exception as exc:  # noqa: BLE001
            result.fail(f"flatorch {tag}", describe_exception(exc))
        try:
            out = run_dbos(cfg, backend)
            for kind, label in (
                ("queued", "queue polled every 0.01 s"),
                ("start_workflow", "start_workflow"),
            ):
                ms = [v * 1000 for v in out[kind]]
                result.row(
                    f"dbos-{backend}-{kind}",
                    f"DBOS {tag}, {label}: p50 / p95",
                    "ms",
                    [percentile(ms, 50)],
                    note=f"p95 {percentile(ms, 95):.1f} ms",
                )
        except Exception as exc:  # noqa: BLE001
            result.fail(f"DBOS {tag}", describe_exception(exc))
    return result.finish(started)


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run(Config.smoke()).as_dict(), indent=2))
