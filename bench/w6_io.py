"""W6 I/O-bound scale: many executions whose states wait on the network.

2,000 executions of a 3-state workflow whose async action awaits 0.5 s (a
stand-in for an LLM call), on one worker process with ``--concurrency 500``;
and 5,000 with ``--concurrency 1000``. The ideal is n / concurrency x 3 x 0.5 s
(6 s and 7.5 s). The time is from the first execution's start to the last one's
finish (from the store: start-up excluded). Target: <= 1.5 x the ideal, on
SQLite and PostgreSQL. Also: the worker's RSS per execution in flight, and DBOS
with ``worker_concurrency`` 500 (three steps that each sleep 0.5 s).
"""

from __future__ import annotations

import asyncio
import json
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
    epoch,
    fresh_db,
    pg_schema,
    proc_status,
    run_child,
    start_orch_worker,
    stop,
    temp_dir,
)

TITLE = "W6 I/O-bound scale (async states that wait 0.5 s, one worker)"
IO3 = BENCH / "machines" / "io3.yml"
SLEEP = 0.5


async def _measure(db_url: str, n: int, proc, timeout: float) -> dict[str, Any]:
    from orchestrator.client import Client
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    store = await Store.open(Settings(database_url=db_url))
    try:
        await Client(store).submit_many(IO3, [{"sleep": SLEEP} for _ in range(n)])
        idle = proc_status(proc.pid).get("VmRSS", 0)

        async def registered() -> bool:
            live = await store.list_workers(include_stopped=False)
            return any(w.status == "active" for w in live)

        peak = 0

        async def all_done() -> bool:
            nonlocal peak
            peak = max(peak, proc_status(proc.pid).get("VmRSS", 0))
            counts = await store.count_by_status()
            return counts.get("completed", 0) + counts.get("failed", 0) >= n

        await await_until(registered, 120, "the worker to register")
        await await_until(all_done, timeout, f"{n} executions", interval=0.1)
        done = await store.list_executions(status="completed", limit=n + 1)
        first = min(epoch(ex.started_at) for ex in done)
        last = max(epoch(ex.finished_at) for ex in done)
        return {
            "seconds": last - first,
            "completed": len(done),
            "bad": sum(1 for ex in done if ex.output != {"counter": 3}) + n - len(done),
            "rss_idle_kib": idle,
            "rss_peak_kib": peak,
        }
    finally:
        await store.close()


def run_orch(
    cfg: Config, backend: str, n: int, concurrency: int, processes: int = 1
) -> dict[str, Any]:
    """One run; with ``processes`` > 1, `orch worker --processes` shares
    ``concurrency`` among its processes (its RSS is then the supervisor's alone)."""
    with fresh_db(backend, cfg, "w6") as (db_url, tmp):
        from bench.w1_throughput import _migrate

        asyncio.run(_migrate(db_url))
        args = ["--concurrency", str(concurrency // processes)]
        if processes > 1:
            args += ["--processes", str(processes)]
        proc = start_orch_worker(db_url, tmp / "worker.log", *args)
        try:
            # the worker is up (and idle) before anything is submitted
            time.sleep(2.0)
            return asyncio.run(_measure(db_url, n, proc, cfg.child_timeout))
        finally:
            stop(proc)


def run_dbos(cfg: Config, backend: str, n: int, concurrency: int) -> dict[str, Any]:
    with temp_dir(cfg, "w6dbos") as tmp:
        kwargs: dict[str, Any] = {
            "n": n,
            "sleep": SLEEP,
            "worker_concurrency": concurrency,
            "polling_interval": 0.05,
        }
        if backend == "sqlite":
            kwargs.update(system_database_url=f"sqlite:///{tmp / 'dbos.sqlite'}", schema=None)
            return run_child("bench.dbos_io_peer:run", kwargs, timeout=cfg.child_timeout, cwd=tmp)
        with pg_schema(cfg.pg_url, "w6dbos") as schema:
            kwargs.update(system_database_url=schema.dsn, schema=schema.name)
            return run_child("bench.dbos_io_peer:run", kwargs, timeout=cfg.child_timeout, cwd=tmp)


def run(cfg: Config) -> WorkloadResult:
    started = time.monotonic()
    sizes = [(200, 50)] if cfg.quick else [(2000, 500), (5000, 1000)]
    result = WorkloadResult(
        "W6",
        TITLE,
        params={
            "workflow": "3 states, each an async action awaiting 0.5 s",
            "arrangements": ", ".join(f"{n:,} executions at --concurrency {c}" for n, c in sizes),
            "repeats": cfg.repeats,
        },
    )
    for backend in cfg.backends:
        tag = "SQLite" if backend == "sqlite" else "PostgreSQL"
        problem = backend_problem(backend, cfg)
        if problem:
            result.skip(f"W6 on {tag}", problem)
            continue
        for n, c in sizes:
            ideal = n / c * 3 * SLEEP
            runs, per_inflight = [], []
            try:
                for _ in range(cfg.repeats):
                    print(f"  W6 {tag}, {n:,} at concurrency {c} ...", flush=True)
                    out = run_orch(cfg, backend, n, c)
                    if out["bad"]:
                        raise RuntimeError(f"{out['bad']} executions did not complete right")
                    runs.append(out["seconds"])
                    per_inflight.append((out["rss_peak_kib"] - out["rss_idle_kib"]) / c)
                    print(f"    {out['seconds']:.2f} s (ideal {ideal:.1f} s)", flush=True)
            except Exception as exc:  # noqa: BLE001
                result.fail(f"{tag}, {n:,} at {c}", describe_exception(exc))
                continue
            row = result.row(
                f"orch-{backend}-{n}",
                f"flatorch {tag}: {n:,} at --concurrency {c}",
                "s",
                runs,
                rss_kib_per_in_flight=(rss := sorted(per_inflight)[len(per_inflight) // 2]),
                note=f"RSS {rss:.0f} KiB per execution in flight",
            )
            result.ratio(
                f"{tag}, {n:,} at {c}: time / ideal ({ideal:.1f} s)",
                row["median"] / ideal if row["median"] else None,
                1.5,
                op="<=",
            )
        # the same largest arrangement over the host's cores: one command,
        # `orch worker --processes 2`, each process half the concurrency
        n, c = sizes[-1]
        runs = []
        try:
            for _ in range(cfg.repeats):
                print(f"  W6 {tag}, {n:,} at 2 processes x {c // 2} ...", flush=True)
                out = run_orch(cfg, backend, n, c, processes=2)
                if out["bad"]:
                    raise RuntimeError(f"{out['bad']} executions did not complete right")
                runs.append(out["seconds"])
                print(f"    {out['seconds']:.2f} s", flush=True)
            ideal = n / c * 3 * SLEEP
            row = result.row(
                f"orch-{backend}-{n}-processes",
                f"flatorch {tag}: {n:,} at --processes 2 --concurrency {c // 2}",
                "s",
                runs,
            )
            result.ratio(
                f"{tag}, {n:,} at 2 processes x {c // 2}: time / ideal ({ideal:.1f} s) "
                "(informational)",
                row["median"] / ideal if row["median"] else None,
            )
        except Exception as exc:  # noqa: BLE001
            result.fail(f"{tag}, {n:,} at 2 processes", describe_exception(exc))
        n, c = sizes[0]
        try:
            print(f"  W6 DBOS {tag}, {n:,} at worker_concurrency {c} ...", flush=True)
            out = run_dbos(cfg, backend, n, c)
            result.row(
                f"dbos-{backend}-{n}",
                f"DBOS {tag}: {n:,} at worker_concurrency {c} (polling 0.05 s)",
                "s",
                [out["seconds"]],
                note=f"completed {out['completed']}, wrong {out['bad']}",
            )
        except Exception as exc:  # noqa: BLE001
            result.fail(f"DBOS {tag}", describe_exception(exc))
    result.notes.append(
        "Time from the first execution's start to the last one's finish, read from the "
        "store (the worker is up before the submit). RSS per in-flight execution: "
        "(peak RSS - idle RSS) / concurrency."
    )
    return result.finish(started)


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run(Config.smoke()).as_dict(), indent=2))
