"""W10 retention: a store whose retention removes as much as comes in stops
growing, with no VACUUM.

20,000 executions of the 3-step workflow go through one `orch worker`
(``--concurrency 4``) while a leader scheduler runs beside it with
``ORCH_RETENTION=30s`` and its retention job due every ``w10_interval``
seconds (``SchedulerOptions.retention_interval``; the job's tick is 1 s). The
harness submits at a steady ``w10_rate`` executions a second, so the store
reaches its steady state (about rate × (30 s + interval) executions kept)
before the first mark. The store's size on disk is read when 5,000 and when
20,000 executions have finished: SQLite, the file plus its WAL after a
passive checkpoint (and the page and freelist counts); PostgreSQL, the total
relation size (heap, indexes, TOAST) of every table in the run's schema,
autovacuum at the server's settings. Target: size after 20,000 at most 1.2 ×
size after 5,000, on each store.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    COUNTER3,
    PY,
    ROOT,
    Config,
    WorkloadResult,
    backend_problem,
    bench_env,
    describe_exception,
    fresh_db,
    log_tail,
    pg_dsn,
    ratio_of,
    start_orch_worker,
    stop,
)

TITLE = "W10 retention (store size on disk, 5,000 vs 20,000 executions, ORCH_RETENTION=30s)"
RETENTION = "30s"
POLL = 0.25


# ------------------------------------------------------------------ leader


def leader(db_url: str, interval: float) -> dict[str, Any]:
    """The leader scheduler (reaper, scaler without a pool, retention) until
    SIGTERM; run in a process of its own (bench.child)."""
    from orchestrator.scheduler import Scheduler, SchedulerOptions
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    async def main() -> dict[str, Any]:
        store = await Store.open(Settings(database_url=db_url))
        try:
            options = SchedulerOptions(retention_interval=interval)
            await Scheduler(store, store.settings, options=options).run()
        finally:
            await store.close()
        return {"retention": store.settings.retention}

    return asyncio.run(main())


# ------------------------------------------------------------------ sizes


def size_of(backend: str, db_url: str, schema: str | None) -> dict[str, Any]:
    if backend == "sqlite":
        path = Path(db_url.removeprefix("sqlite:///"))
        conn = sqlite3.connect(path, timeout=30)
        try:
            busy, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            auto_vacuum = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
        finally:
            conn.close()
        wal = path.with_name(path.name + "-wal")
        main_bytes = path.stat().st_size
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        return {
            "bytes": main_bytes + wal_bytes,
            "file_bytes": main_bytes,
            "wal_bytes": wal_bytes,
            "pages": pages,
            "freelist_pages": free,
            "auto_vacuum": auto_vacuum,
            "checkpoint": {"busy": busy, "wal_frames": log, "checkpointed": done},
        }
    import psycopg

    with psycopg.connect(pg_dsn(db_url.split("?")[0]), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'r'",
            (schema,),
        ).fetchall()
        vacuums, autovacuums = conn.execute(
            "SELECT coalesce(sum(vacuum_count), 0), coalesce(sum(autovacuum_count), 0) "
            "FROM pg_stat_all_tables WHERE schemaname = %s AND relname = 'checkpoints'",
            (schema,),
        ).fetchone()
        autovacuum = conn.execute("SHOW autovacuum").fetchone()[0]
    tables = {name: size for name, size in rows}
    return {
        "bytes": sum(tables.values()),
        "tables": tables,
        "vacuums": int(vacuums),
        "autovacuums": int(autovacuums),
        "autovacuum": autovacuum,
    }


# ------------------------------------------------------------------ one run


async def _drive(
    db_url: str, backend: str, schema: str | None, cfg: Config, marks: tuple[int, ...]
) -> dict[str, Any]:
    """Submit at a steady rate; read the size when each mark has finished."""
    from orchestrator.client import Client
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    total = marks[-1]
    client = await Client.open(Settings(database_url=db_url))
    store = await Store.open(Settings(database_url=db_url), migrate=False)
    out: dict[str, Any] = {"marks": {}}
    try:
        submitted = 0
        t0 = time.monotonic()
        deadline = t0 + cfg.child_timeout
        pending = list(marks)
        while pending:
            due = min(total, int((time.monotonic() - t0) * cfg.w10_rate))
            if due > submitted:
                await client.submit_many(COUNTER3, [{} for _ in range(due - submitted)])
                submitted = due
            counts = await store.count_by_status()
            if counts.get("failed") or counts.get("cancelled"):
                raise RuntimeError(f"an execution did not complete: {counts}")
            unfinished = sum(counts.get(s, 0) for s in ("queued", "running", "waiting"))
            finished = submitted - unfinished
            if finished >= pending[0]:
                mark = pending.pop(0)
                size = await asyncio.to_thread(size_of, backend, db_url, schema)
                size["seconds"] = time.monotonic() - t0
                size["kept"] = counts.get("completed", 0)
                out["marks"][mark] = size
                print(
                    f"    {mark:,} finished at {size['seconds']:.1f} s: "
                    f"{size['bytes'] / 2**20:.2f} MiB, {size['kept']:,} executions kept",
                    flush=True,
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{finished:,} of {total:,} finished after the timeout")
            await asyncio.sleep(POLL)
        out["seconds"] = time.monotonic() - t0
    finally:
        await store.close()
        await client.close()
    return out


def one_run(backend: str, cfg: Config, marks: tuple[int, ...]) -> dict[str, Any]:
    import subprocess

    with fresh_db(backend, cfg, "w10") as (db_url, tmp):
        schema = None
        if backend == "postgresql":
            schema = db_url.rsplit("search_path%3D", 1)[1]
        asyncio.run(_open(db_url))  # before two processes race to create the schema
        env = {"ORCH_DATABASE_URL": db_url, "ORCH_RETENTION": RETENTION}
        log = open(tmp / "leader.log", "w")  # noqa: SIM115 - closed below
        lead = subprocess.Popen(
            [
                PY,
                "-m",
                "bench.child",
                "bench.w10_retention:leader",
                json.dumps({"db_url": db_url, "interval": cfg.w10_interval}),
            ],
            cwd=ROOT,
            env=bench_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        lead.log_file = log  # type: ignore[attr-defined]
        lead.log_path = tmp / "leader.log"  # type: ignore[attr-defined]
        worker = start_orch_worker(
            db_url,
            tmp / "worker.log",
            "--concurrency",
            str(cfg.w10_concurrency),
            ORCH_RETENTION=RETENTION,
        )
        try:
            out = asyncio.run(_drive(db_url, backend, schema, cfg, marks))
        except Exception as exc:
            raise RuntimeError(
                f"{exc}\nworker:\n{log_tail(worker)}\nleader:\n{log_tail(lead)}"
            ) from exc
        finally:
            stop(worker)
            stop(lead)
        return out


async def _open(db_url: str) -> None:
    """The schema, and a pool policy of one worker: the leader's autoscaler, which
    has no pool here, would otherwise drain the worker whenever the backlog is 0."""
    from orchestrator.api import Orchestrator

    async with Orchestrator(db_url) as orch:
        await orch.scale("default", min_workers=1, max_workers=1, create=True)


def run(cfg: Config) -> WorkloadResult:
    started = time.monotonic()
    small, large = cfg.w10_marks
    result = WorkloadResult(
        "W10",
        TITLE,
        params={
            "executions": f"{large:,} (sizes read at {small:,} and {large:,} finished)",
            "workflow": "counter3 (3 action states)",
            "worker": f"one orch worker --concurrency {cfg.w10_concurrency}",
            "submitted": f"{cfg.w10_rate:g} executions/s, steadily",
            "retention": f"ORCH_RETENTION={RETENTION}, job due every {cfg.w10_interval:g} s "
            "(tick 1 s, 10 batches of 200 a run)",
            "repeats": 1,
        },
    )
    for backend in cfg.backends:
        problem = backend_problem(backend, cfg)
        if problem:
            result.skip(backend, problem)
            continue
        print(f"  W10 {backend} ...", flush=True)
        try:
            out = one_run(backend, cfg, (small, large))
        except Exception as exc:  # noqa: BLE001
            result.fail(backend, describe_exception(exc))
            continue
        a, b = out["marks"][small], out["marks"][large]
        for n, m in ((small, a), (large, b)):
            extra = (
                f"file {m['file_bytes']:,} + WAL {m['wal_bytes']:,} B; {m['pages']:,} pages, "
                f"{m['freelist_pages']:,} free; auto_vacuum {m['auto_vacuum']}"
                if backend == "sqlite"
                else "; ".join(f"{k} {v:,}" for k, v in sorted(m["tables"].items()) if v > 50_000)
                + f"; checkpoints vacuumed {m.get('vacuums', 0)} times by retention, "
                f"{m['autovacuums']} by autovacuum (autovacuum {m.get('autovacuum', '?')})"
            )
            result.row(
                f"{backend}-bytes-{n}",
                f"{backend}: store size after {n:,} executions",
                "bytes",
                [m["bytes"]],
                note=f"at {m['seconds']:.1f} s, {m['kept']:,} executions kept; {extra}",
            )
        result.row(
            f"{backend}-seconds",
            f"{backend}: {large:,} executions, first submit to last finished",
            "s",
            [out["seconds"]],
            throughput=large / out["seconds"],
        )
        result.ratio(
            f"{backend}: size after {large:,} / size after {small:,}",
            ratio_of(b["bytes"], a["bytes"]),
            1.2,
            op="<=",
        )
    result.notes.append(
        "SQLite reuses the pages a prune frees (its freelist) for the next inserts: "
        "auto_vacuum 0 is NONE, what every flatorch store has had; no VACUUM runs. "
        "PostgreSQL reuses a deleted row's space once a vacuum has passed: each retention "
        "run that removed something ends with VACUUM (TRUNCATE false) of executions, "
        "checkpoints and signals, whatever autovacuum does (off on the test server)."
    )
    result.notes.append(
        "The rate is fixed so that the store is at its steady state by the first mark "
        "(what the target compares); seconds therefore follow the rate, not the "
        "worker's speed (see W1 for that)."
    )
    return result.finish(started)


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(json.dumps(run(Config.smoke()).as_dict(), indent=2, default=str))
