"""W9 agent loop: one state that runs again and again, its context growing.

``machines/agent_loop.yml``: the state ``turn`` appends one 2 KB answer
(bench/apps/agentloop.py: seeded English-like text, different every turn) to
``context.history``, N times (N = 100, then 200). 4 executions on one
``orch worker --concurrency 4``, on SQLite and on PostgreSQL; DBOS beside it
(bench/dbos_agent_peer.py: one step per turn returning the answer, the workflow
keeping the history in memory), at its best and at its defaults.

Per execution:
- bytes: the store's growth on disk while the 4 ran, divided by 4. SQLite: the
  database file plus its WAL, each time after ``PRAGMA wal_checkpoint(TRUNCATE)``,
  before the worker starts (tables created) and after it stopped. PostgreSQL: the
  sum of ``pg_total_relation_size`` (heap, TOAST, indexes) over every table in the
  run's fresh schema, before and after; no VACUUM (autovacuum may run meanwhile).
  The same for DBOS's system database (its schema, or its SQLite file).
- worker CPU per turn: user + system CPU of the worker process
  (``/proc/<pid>/stat``), from when it is registered and idle to when the last
  execution finished, divided by 4 x N. DBOS: ``time.process_time()`` of its
  process over the same span (it starts the workflows itself).
- resume at the last turn: a worker runs with the hold on (the last turn's action
  writes a marker file and waits); once all 4 are in their last turn (every
  earlier turn committed) it is SIGKILLed. Once the dead worker's leases have run
  out (it ran with ``--lease-ttl 2``), a fresh ``orch worker`` starts; the figure
  is from just before its start to the last of the 4 finishing (the store's
  ``finished_at``), so it includes the interpreter's start, the claim, loading the
  checkpoint and running the last turn again. The lease wait is not in it. DBOS:
  the same kill, then a fresh process whose ``DBOS.launch()`` recovers the 4
  pending workflows (N - 1 recorded steps each), to their ``updated_at``.

Nothing here reads the checkpoint table's columns: only sizes on disk and the
executions' status, output and times.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import (
    MACHINES,
    PY,
    ROOT,
    ChildFailed,
    Config,
    WorkloadResult,
    await_until,
    backend_problem,
    bench_env,
    describe_exception,
    epoch,
    log_tail,
    median,
    pg_schema,
    ratio_of,
    run_child,
    start_orch_worker,
    stop,
    temp_dir,
    wait_until,
)

TITLE = "W9 agent loop (one state repeated, 2 KB appended to the context each turn)"
AGENT_LOOP = MACHINES / "agent_loop.yml"
ANSWER_BYTES = 2048
TAGS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


# ------------------------------------------------------------ bytes on disk


def store_bytes(measure: dict[str, Any]) -> int:
    """The store's size on disk. ``{"sqlite": PATH}``: file + WAL after a
    TRUNCATE checkpoint; ``{"pg": DSN, "schema": NAME}``: pg_total_relation_size
    summed over the schema's tables."""
    if "sqlite" in measure:
        path = Path(measure["sqlite"])
        conn = sqlite3.connect(path, timeout=30)
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            conn.close()
        if busy:
            raise RuntimeError(f"wal_checkpoint(TRUNCATE) on {path} was blocked")
        wal = path.with_name(path.name + "-wal")
        return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)
    import psycopg

    with psycopg.connect(measure["pg"], autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'm')",
            (measure["schema"],),
        ).fetchone()
    return int(row[0])


@contextlib.contextmanager
def fresh_store(cfg: Config, backend: str, tag: str) -> Iterator[tuple[str, Path, dict]]:
    """(flatorch database URL, temp dir, how to measure it) for one run."""
    with temp_dir(cfg, tag) as tmp:
        if backend == "sqlite":
            path = tmp / "orch.sqlite"
            yield f"sqlite:///{path}", tmp, {"sqlite": str(path)}
        else:
            with pg_schema(cfg.pg_url, tag) as schema:
                yield schema.url, tmp, {"pg": schema.dsn, "schema": schema.name}


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (/proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- flatorch


def _inputs(cfg: Config, turns: int) -> list[dict[str, Any]]:
    return [{"key": f"w9-{i}", "turns": turns} for i in range(cfg.w9_executions)]


async def _open(db_url: str):
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    return await Store.open(Settings(database_url=db_url))


async def _worker_registered(db_url: str, pid: int, timeout: float):
    store = await _open(db_url)
    try:

        async def mine():
            for w in await store.list_workers(include_stopped=False):
                if w.pid == pid and w.status == "active":
                    return w
            return None

        return await await_until(mine, timeout, "the worker to register")
    finally:
        await store.close()


async def _submit(db_url: str, inputs: list[dict[str, Any]]) -> list[str]:
    from orchestrator.client import Client

    store = await _open(db_url)
    try:
        return [s.execution.id for s in await Client(store).submit_many(AGENT_LOOP, inputs)]
    finally:
        await store.close()


async def _wait_done(db_url: str, ids: list[str], turns: int, timeout: float, proc) -> dict:
    store = await _open(db_url)
    try:

        async def done():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the worker exited {proc.returncode}:\n{log_tail(proc)}")
            rows = [await store.get(i) for i in ids]
            return rows if all(r.status in ("completed", "failed") for r in rows) else None

        rows = await await_until(done, timeout, f"{len(ids)} executions", interval=0.05)
        good = {"turns": turns, "chars": turns * ANSWER_BYTES}
        bad = [r for r in rows if r.status != "completed" or r.output != good]
        if bad:
            r = bad[0]
            raise RuntimeError(
                f"{len(bad)} executions ended wrong, e.g. {r.status}: "
                f"{r.output if r.error is None else r.error[-300:]}"
            )
        return {
            "last_finished": max(epoch(r.finished_at) for r in rows),
            "recoveries": [r.recoveries for r in rows],
        }
    finally:
        await store.close()


async def _leases_expired(db_url: str, ids: list[str], timeout: float) -> None:
    store = await _open(db_url)
    try:

        async def expired():
            rows = [await store.get(i) for i in ids]
            now = time.time()
            return all(r.lease_until is not None and epoch(r.lease_until) < now for r in rows)

        await await_until(expired, timeout, "the killed worker's leases to run out")
    finally:
        await store.close()


def orch_run(cfg: Config, backend: str, turns: int) -> dict[str, Any]:
    """One clean run: bytes and worker CPU."""
    with fresh_store(cfg, backend, "w9") as (db_url, tmp, measure):
        from bench.w1_throughput import _migrate

        asyncio.run(_migrate(db_url))
        before = store_bytes(measure)
        proc = start_orch_worker(
            db_url, tmp / "worker.log", "--concurrency", str(cfg.w9_concurrency)
        )
        try:
            asyncio.run(_worker_registered(db_url, proc.pid, 120))
            time.sleep(0.5)  # past its start-up work: idle
            cpu0 = proc_cpu(proc.pid)
            ids = asyncio.run(_submit(db_url, _inputs(cfg, turns)))
            asyncio.run(_wait_done(db_url, ids, turns, cfg.child_timeout, proc))
            cpu = proc_cpu(proc.pid) - cpu0
        finally:
            stop(proc)
        after = store_bytes(measure)
    n = cfg.w9_executions
    return {
        "bytes_per_execution": (after - before) / n,
        "cpu_ms_per_turn": cpu / (n * turns) * 1000,
        "bytes_before": before,
        "bytes_after": after,
    }


def orch_resume(cfg: Config, backend: str, turns: int) -> dict[str, Any]:
    """Kill the worker while every execution is in its last turn; time a fresh one."""
    with fresh_store(cfg, backend, "w9r") as (db_url, tmp, _):
        from bench.w1_throughput import _migrate

        asyncio.run(_migrate(db_url))
        hold = tmp / "hold"
        hold.mkdir()
        conc = str(cfg.w9_concurrency)
        first = start_orch_worker(
            db_url,
            tmp / "worker-killed.log",
            "--concurrency",
            conc,
            "--lease-ttl",
            str(cfg.w9_kill_ttl),
            BENCH_W9_HOLD_DIR=str(hold),
        )
        try:
            ids = asyncio.run(_submit(db_url, _inputs(cfg, turns)))
            _wait_markers(hold, cfg.w9_executions, cfg.child_timeout, first)
        finally:
            stop(first, signal.SIGKILL)
        asyncio.run(_leases_expired(db_url, ids, 60))
        t0 = time.time()
        fresh = start_orch_worker(db_url, tmp / "worker-fresh.log", "--concurrency", conc)
        try:
            out = asyncio.run(_wait_done(db_url, ids, turns, cfg.child_timeout, fresh))
            worker = asyncio.run(_worker_registered(db_url, fresh.pid, 10))
        finally:
            stop(fresh)
    if any(r != 1 for r in out["recoveries"]):
        raise RuntimeError(f"expected one crash recovery each, the store has {out['recoveries']}")
    return {
        "resume_seconds": out["last_finished"] - t0,
        "startup_seconds": epoch(worker.started_at) - t0,
    }


def _wait_markers(hold: Path, n: int, timeout: float, proc) -> None:
    def all_holding() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the holding process exited {proc.returncode}:\n{log_tail(proc)}")
        return len(list(hold.iterdir())) >= n

    wait_until(all_holding, timeout, f"{n} executions to reach their last turn")


# -------------------------------------------------------------------- DBOS


@contextlib.contextmanager
def dbos_store(cfg: Config, backend: str, tag: str) -> Iterator[tuple[dict, dict, Path]]:
    """(peer kwargs for the system database, how to measure it, temp dir)."""
    with temp_dir(cfg, tag) as tmp:
        if backend == "sqlite":
            path = tmp / "dbos.sqlite"
            yield (
                {"system_database_url": f"sqlite:///{path}", "schema": None},
                {"sqlite": str(path)},
                tmp,
            )
        else:
            with pg_schema(cfg.pg_url, tag) as schema:
                yield (
                    {"system_database_url": schema.dsn, "schema": schema.name},
                    {"pg": schema.dsn, "schema": schema.name},
                    tmp,
                )


def dbos_run(cfg: Config, backend: str, turns: int, variant: str) -> dict[str, Any]:
    with dbos_store(cfg, backend, "w9dbos") as (db, measure, tmp):
        kwargs = {
            "executions": cfg.w9_executions,
            "turns": turns,
            "variant": variant,
            "measure": measure,
            **db,
        }
        out = run_child("bench.dbos_agent_peer:run", kwargs, timeout=cfg.child_timeout, cwd=tmp)
    _check_dbos(out, cfg)
    n = cfg.w9_executions
    return {
        "bytes_per_execution": (out["bytes_after"] - out["bytes_before"]) / n,
        "cpu_ms_per_turn": out["cpu_seconds"] / (n * turns) * 1000,
        "bytes_before": out["bytes_before"],
        "bytes_after": out["bytes_after"],
    }


def dbos_resume(cfg: Config, backend: str, turns: int, variant: str) -> dict[str, Any]:
    with dbos_store(cfg, backend, "w9dbosr") as (db, _, tmp):
        hold = tmp / "hold"
        hold.mkdir()
        kwargs = {"executions": cfg.w9_executions, "turns": turns, "variant": variant, **db}
        log = open(tmp / "dbos-killed.log", "w")  # noqa: SIM115 - closed by stop()
        first = subprocess.Popen(
            [PY, "-m", "bench.child", "bench.dbos_agent_peer:start_and_hold", json.dumps(kwargs)],
            cwd=tmp,
            env=bench_env(PYTHONPATH=str(ROOT), BENCH_W9_HOLD_DIR=str(hold)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        first.log_file = log  # type: ignore[attr-defined]
        first.log_path = tmp / "dbos-killed.log"  # type: ignore[attr-defined]
        try:
            _wait_markers(hold, cfg.w9_executions, cfg.child_timeout, first)
        finally:
            stop(first, signal.SIGKILL)
        t0 = time.time()
        out = run_child("bench.dbos_agent_peer:recover", kwargs, timeout=cfg.child_timeout, cwd=tmp)
    _check_dbos(out, cfg)
    return {
        "resume_seconds": out["last_finished"] - t0,
        "startup_seconds": out["launched_at"] - t0,
    }


def _check_dbos(out: dict[str, Any], cfg: Config) -> None:
    if out["completed"] != cfg.w9_executions or out["bad"]:
        raise ChildFailed(
            f"DBOS: {out['completed']} of {cfg.w9_executions} completed, {out['bad']} wrong"
        )


# ------------------------------------------------------------------ report


PEERS = ("orch", "dbos-best", "dbos-default")


def _label(peer: str, tag: str, turns: int) -> str:
    if peer == "orch":
        return f"flatorch {tag}, {turns} turns: one `orch worker --concurrency 4`"
    if peer == "dbos-best":
        return (
            f"DBOS {tag}, {turns} turns, at its best: `DBOS.start_workflow`, "
            "portable JSON serializer"
        )
    return f"DBOS {tag}, {turns} turns, at its defaults: a queue polled every 1 s, pickle"


def run(cfg: Config) -> WorkloadResult:
    started = time.monotonic()
    small, large = cfg.w9_turns
    result = WorkloadResult(
        "W9",
        TITLE,
        params={
            "workflow": "one state `turn` repeated; each turn appends a 2,048-byte answer "
            "to context.history",
            "turns": f"{small} and {large}",
            "executions": f"{cfg.w9_executions} on one `orch worker --concurrency "
            f"{cfg.w9_concurrency}`",
            "repeats": cfg.w9_repeats,
        },
    )
    have_dbos = importlib.util.find_spec("dbos") is not None
    figures: dict[tuple[str, str, int], dict[str, float]] = {}
    for backend in cfg.backends:
        tag = TAGS.get(backend, backend)
        problem = backend_problem(backend, cfg)
        if problem:
            result.skip(f"W9 on {tag}", problem)
            continue
        for peer in PEERS:
            if peer != "orch" and not have_dbos:
                result.skip(f"{peer} on {tag}", "dbos is not installed (pip install -e '.[bench]')")
                continue
            for turns in cfg.w9_turns:
                label = _label(peer, tag, turns)
                runs: list[dict[str, float]] = []
                try:
                    for repeat in range(cfg.w9_repeats):
                        print(
                            f"  W9 {peer} {tag} {turns} turns, run {repeat + 1}/{cfg.w9_repeats}",
                            flush=True,
                        )
                        if peer == "orch":
                            one = orch_run(cfg, backend, turns)
                            one.update(orch_resume(cfg, backend, turns))
                        else:
                            variant = peer.removeprefix("dbos-")
                            one = dbos_run(cfg, backend, turns, variant)
                            one.update(dbos_resume(cfg, backend, turns, variant))
                        print(
                            f"    {one['bytes_per_execution'] / 1024:,.0f} KiB/execution, "
                            f"{one['cpu_ms_per_turn']:.2f} ms CPU/turn, resume "
                            f"{one['resume_seconds']:.2f} s",
                            flush=True,
                        )
                        runs.append(one)
                except Exception as exc:  # noqa: BLE001
                    result.fail(label, describe_exception(exc))
                    continue
                key = f"{peer}-{backend}-{turns}"
                fig = {k: median([r[k] for r in runs]) for k in runs[0]}
                figures[(peer, backend, turns)] = fig
                result.row(
                    f"{key}-bytes",
                    f"{label}: bytes per execution",
                    "KiB",
                    [r["bytes_per_execution"] / 1024 for r in runs],
                    note=f"store {fig['bytes_before'] / 1024:,.0f} KiB before the run",
                )
                result.row(
                    f"{key}-cpu",
                    f"{label}: worker CPU per turn",
                    "ms",
                    [r["cpu_ms_per_turn"] for r in runs],
                )
                result.row(
                    f"{key}-resume",
                    f"{label}: resume at the last turn",
                    "s",
                    [r["resume_seconds"] for r in runs],
                    note=f"of which process start-up {fig['startup_seconds']:.2f} s",
                )
        _ratios(result, figures, backend, tag, small, large)
    result.notes += [
        "Bytes: the store's growth on disk over the run, divided by the executions. SQLite: "
        "database file + WAL after `PRAGMA wal_checkpoint(TRUNCATE)`, measured with the "
        "tables already created and again after the worker stopped. PostgreSQL: the sum of "
        "`pg_total_relation_size` (heap + TOAST + indexes) over the tables of the run's "
        "fresh schema, before and after, without VACUUM. The same for DBOS's system "
        "database (its SQLite file, or its schema). Each peer's own defaults otherwise "
        "(flatorch SQLite synchronous=FULL).",
        "Worker CPU per turn: user + system CPU of the `orch worker` process "
        "(/proc/PID/stat) from idle after its registration to the last finish, over "
        "executions x turns; the submit runs in the harness. DBOS: time.process_time() of "
        "its process from after DBOS.launch() to the last result (it also starts the "
        "workflows).",
        "Resume at the last turn: the worker (lease TTL 2 s) is SIGKILLed while all 4 "
        "executions are in their last turn, every earlier turn committed; once the leases "
        "ran out, a fresh `orch worker` is started and the figure is from just before its "
        "start to the last `finished_at`: interpreter start, claim, checkpoint load and the "
        "last turn run again (the lease wait is not included). DBOS: the same kill, then a "
        "fresh process whose DBOS.launch() recovers the 4 pending workflows (DBOS puts them "
        "on its internal queue, polled every 1 s with no public setting; the N - 1 recorded "
        "steps are read back, the last step runs) to their `updated_at`. 'Of which process "
        "start-up': to the worker's registration (flatorch) or to DBOS.launch() returning.",
        "DBOS at its best: `DBOS.start_workflow` (no queue, as W1's b'') and "
        "`DBOSPortableJSONSerializer` (compact JSON; the default base64-encodes a pickle, "
        "a third larger). The targets compare with it; the defaults row is informational.",
    ]
    _print_table(result)
    return result.finish(started)


def _print_table(result: WorkloadResult) -> None:
    """The issue's figures, one line each, with PASS / FAIL against their targets."""
    width = max((len(r["label"]) for r in result.ratios), default=10)
    print(f"  {'W9 figure':<{width}} {'value':>9}  target", flush=True)
    for r in result.ratios:
        value = "n/a" if r["value"] is None else f"{r['value']:.2f}x"
        if r["target"] is None:
            target, verdict = "", ""
        else:
            target = f"<= {r['target']:.1f}x"
            verdict = "n/a" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL")
        print(f"  {r['label']:<{width}} {value:>9}  {target:<8} {verdict}", flush=True)


def _ratios(result: WorkloadResult, figures, backend: str, tag: str, small: int, large: int):
    """The issue's figures: bytes vs DBOS at its best, and growth from N to 2N turns.
    CPU growth is of the whole execution's CPU (per turn x turns): a cost linear in
    the turns doubles, one that rewrites the whole context each turn quadruples."""

    def fig(peer: str, turns: int, key: str) -> float | None:
        got = figures.get((peer, backend, turns))
        return got[key] if got else None

    def cpu(peer: str, turns: int) -> float | None:
        per_turn = fig(peer, turns, "cpu_ms_per_turn")
        return None if per_turn is None else per_turn * turns

    for turns in (small, large):
        result.ratio(
            f"{tag}, {turns} turns: flatorch bytes / DBOS at its best bytes",
            ratio_of(
                fig("orch", turns, "bytes_per_execution"),
                fig("dbos-best", turns, "bytes_per_execution"),
            ),
            1.5,
            op="<=",
        )
    compared = (("orch", "flatorch", True), ("dbos-best", "DBOS at its best", False))
    for peer, name, target in compared:
        suffix = "" if target else " (informational)"
        result.ratio(
            f"{tag}, {name}: bytes per execution at {large} turns / at {small}{suffix}",
            ratio_of(
                fig(peer, large, "bytes_per_execution"), fig(peer, small, "bytes_per_execution")
            ),
            2.2 if target else None,
            op="<=",
        )
        result.ratio(
            f"{tag}, {name}: worker CPU per execution at {large} turns / at {small}{suffix}",
            ratio_of(cpu(peer, large), cpu(peer, small)),
            2.4 if target else None,
            op="<=",
        )


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run(Config.smoke()).as_dict(), indent=2))
