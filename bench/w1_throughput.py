"""W1 throughput: N executions of the 3-step workflow, submitted up front to a
fresh store; wall time from the first submit to the last completion.

Peers (each run in fresh processes, against a fresh database):
  (a) flatmachines alone, in-process, ``persistence: {backend: sqlite}``;
  (b) DBOS Transact: a queue with worker_concurrency 8, three @DBOS.step steps,
      its default SQLite system database (and again on PostgreSQL);
  (c) this project: ``orch worker`` processes (W x concurrency C) on a fresh store
      (SQLite, then PostgreSQL);
  (d) the seed's pattern: DistributedWorkerHooks + SQLiteWorkBackend, P worker
      processes each looping claim -> run the machine -> complete.

Worker processes (c, d) and DBOS (b) are started and ready before the clock
starts: the figure is the work, not interpreter start-up. "Last completion" is
the completion time the store recorded (c: executions.finished_at; b: DBOS's
workflow_status.updated_at; d: the worker's clock right after complete_job;
a: when the last execute() returned).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    COUNTER3,
    EXPECTED_OUTPUT,
    PY,
    READY_MARK,
    ROOT,
    SEED_WORKER,
    Config,
    WorkloadResult,
    await_until,
    backend_problem,
    bench_env,
    describe_exception,
    epoch,
    fresh_db,
    parse_result,
    pg_schema,
    ratio_of,
    run_child,
    start_orch_worker,
    stop,
    temp_dir,
)

TITLE = "W1 throughput (3-step workflow, N submitted up front)"


# ------------------------------------------------------------ the machine


def counter3_config(sqlite_path: Path | None = None) -> dict[str, Any]:
    config = yaml.safe_load(COUNTER3.read_text())
    if sqlite_path is not None:
        config["data"]["persistence"] = {
            "enabled": True,
            "backend": "sqlite",
            "db_path": str(sqlite_path),
        }
    return config


# ------------------------------------------------ (a) flatmachines in-process


async def flat_inprocess(n: int, concurrency: int, workdir: str) -> dict[str, Any]:
    """Child: N FlatMachine executions on one event loop, each configured with
    ``persistence: {backend: sqlite}`` (the library's own wiring per machine)."""
    from flatmachines import FlatMachine
    from flatmachines.agents import AgentAdapterRegistry

    from bench.apps.benchapp import make_registry

    config = counter3_config(Path(workdir) / "flatmachines.sqlite")
    registry = make_registry()
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Any:
        async with gate:
            machine = FlatMachine(
                config_dict=config, hooks_registry=registry, agent_registry=AgentAdapterRegistry()
            )
            return await machine.execute(input={})

    t0 = time.time()
    outputs = await asyncio.gather(*(one() for _ in range(n)))
    seconds = time.time() - t0
    return {
        "seconds": seconds,
        "completed": len(outputs),
        "bad": sum(1 for o in outputs if o != EXPECTED_OUTPUT),
    }


def run_flat(cfg: Config) -> dict[str, Any]:
    with temp_dir(cfg, "w1a") as tmp:
        return run_child(
            "bench.w1_throughput:flat_inprocess",
            {"n": cfg.w1_n, "concurrency": cfg.w1_flat_concurrency, "workdir": str(tmp)},
            timeout=cfg.child_timeout,
            cwd=tmp,
        )


async def flat_memory(n: int, concurrency: int) -> dict[str, Any]:
    """Child: N FlatMachine executions with the MemoryBackend (no durability)."""
    from flatmachines import FlatMachine, MemoryBackend
    from flatmachines.agents import AgentAdapterRegistry

    from bench.apps.benchapp import make_registry

    config = counter3_config()
    registry = make_registry()
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Any:
        async with gate:
            machine = FlatMachine(
                config_dict=config,
                hooks_registry=registry,
                persistence=MemoryBackend(),
                agent_registry=AgentAdapterRegistry(),  # no agent: no adapter imports
            )
            return await machine.execute(input={})

    t0 = time.time()
    outputs = await asyncio.gather(*(one() for _ in range(n)))
    return {
        "seconds": time.time() - t0,
        "started": t0,
        "completed": len(outputs),
        "bad": sum(1 for o in outputs if o != EXPECTED_OUTPUT),
    }


def run_ceiling(cfg: Config) -> dict[str, Any]:
    """flatmachines alone, MemoryBackend, in two processes (the machine's cores):
    what the same workflow costs with no durability at all."""
    import concurrent.futures

    half = cfg.w1_n // 2
    with temp_dir(cfg, "w1ceil") as tmp, concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(
                run_child,
                "bench.w1_throughput:flat_memory",
                {"n": size, "concurrency": 4},
                timeout=cfg.child_timeout,
                cwd=tmp,
            )
            for size in (half, cfg.w1_n - half)
        ]
        outs = [j.result() for j in jobs]
    first = min(o["started"] for o in outs)
    last = max(o["started"] + o["seconds"] for o in outs)
    return {
        "seconds": last - first,
        "completed": sum(o["completed"] for o in outs),
        "bad": sum(o["bad"] for o in outs),
    }


# ------------------------------------------------------------- (b) DBOS


def run_dbos(
    cfg: Config, backend: str, polling: float | None, direct: bool = False
) -> dict[str, Any]:
    with temp_dir(cfg, "w1b") as tmp:
        kwargs: dict[str, Any] = {
            "n": cfg.w1_n,
            "worker_concurrency": cfg.w1_dbos_concurrency,
            "polling_interval": polling,
            "direct": direct,
        }
        if backend == "sqlite":
            kwargs.update(system_database_url=f"sqlite:///{tmp / 'dbos.sqlite'}", schema=None)
            return run_child("bench.dbos_peer:run", kwargs, timeout=cfg.child_timeout, cwd=tmp)
        with pg_schema(cfg.pg_url, "w1b") as schema:
            kwargs.update(system_database_url=schema.dsn, schema=schema.name)
            return run_child("bench.dbos_peer:run", kwargs, timeout=cfg.child_timeout, cwd=tmp)


# ------------------------------------------------------- (c) this project


async def _orch_measure(db_url: str, n: int, workers: int, timeout: float) -> dict[str, Any]:
    from orchestrator.client import Client
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    store = await Store.open(Settings(database_url=db_url), migrate=False)
    try:

        async def registered() -> bool:
            live = await store.list_workers(include_stopped=False)
            return sum(1 for w in live if w.status == "active") >= workers

        await await_until(registered, 120, f"{workers} orch workers to register")
        client = Client(store)
        t0 = time.time()
        await client.submit_many(COUNTER3, [{} for _ in range(n)])

        async def all_final() -> bool:
            counts = await store.count_by_status()
            return counts.get("completed", 0) + counts.get("failed", 0) >= n

        # the figure is the store's last finished_at: this poll only notices the
        # end, and a tighter one is load on the two cores under test
        await await_until(all_final, timeout, f"{n} executions to finish", interval=0.1)
        observed = time.time() - t0
        done = await store.list_executions(status="completed", limit=n + 1)
        last = max(epoch(ex.finished_at) for ex in done) if done else time.time()
        return {
            "seconds": last - t0,
            "observed_seconds": observed,
            "completed": len(done),
            "bad": sum(1 for ex in done if ex.output != EXPECTED_OUTPUT) + n - len(done),
        }
    finally:
        await store.close()


async def _migrate(db_url: str) -> None:
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    store = await Store.open(Settings(database_url=db_url))
    await store.close()


def run_orch(cfg: Config, backend: str, workers: int, concurrency: int) -> dict[str, Any]:
    with fresh_db(backend, cfg, "w1c") as (db_url, tmp):
        asyncio.run(_migrate(db_url))
        procs = [
            start_orch_worker(db_url, tmp / f"worker-{i}.log", "--concurrency", str(concurrency))
            for i in range(workers)
        ]
        try:
            result = asyncio.run(_orch_measure(db_url, cfg.w1_n, workers, cfg.child_timeout))
        finally:
            codes = [stop(p) for p in procs]
        result["worker_exit_codes"] = codes
        return result


# ----------------------------------------------- (d) the seed's own pattern


async def seed_worker(
    work_db: str, checkpoint_db: str, pool_id: str, worker_id: str
) -> dict[str, Any]:
    """Child: one flatmachines distributed worker (DistributedWorkerHooks with
    SQLiteRegistrationBackend + SQLiteWorkBackend) running bench/machines/
    seed_worker.yml; process_job runs counter3 in-process with the library's
    own SQLite persistence. Prints BENCH_READY, then waits for a line on stdin."""
    from flatmachines import DistributedWorkerHooks, FlatMachine, HooksRegistry
    from flatmachines.distributed import SQLiteRegistrationBackend
    from flatmachines.work import SQLiteWorkBackend

    from bench.apps.benchapp import make_registry

    job_config = counter3_config(Path(checkpoint_db))
    job_registry = make_registry()
    tally: dict[str, Any] = {
        "completed": 0,
        "runs": 0,
        "bad": 0,
        "last_complete": None,
        "complete_conflicts": 0,
        "claim_errors": 0,
    }

    class SeedHooks(DistributedWorkerHooks):
        """The job plus two guards without which a worker of this pattern dies under
        two processes (counted, and reported): SQLiteWorkPool.claim is a SELECT then
        an unguarded UPDATE, so two processes can claim one item; the second
        complete_job then raises KeyError. A claim can also meet 'database is
        locked' (rollback journal, 5 s default busy timeout)."""

        async def on_action(self, state_name, action, context):
            if action == "process_job":
                tally["runs"] += 1
                machine = FlatMachine(config_dict=job_config, hooks_registry=job_registry)
                output = await machine.execute(input=dict(context.get("job") or {}))
                if output != EXPECTED_OUTPUT:
                    tally["bad"] += 1
                context["result"] = output
                return context
            if action == "claim_job":
                for _ in range(100):
                    try:
                        return await super().on_action(state_name, action, context)
                    except sqlite3.OperationalError:
                        tally["claim_errors"] += 1
                        await asyncio.sleep(0.01)
            if action == "complete_job":
                try:
                    context = await super().on_action(state_name, action, context)
                except KeyError:  # another process claimed, ran and completed it too
                    tally["complete_conflicts"] += 1
                    return context
                tally["completed"] += 1
                tally["last_complete"] = time.time()
                return context
            return await super().on_action(state_name, action, context)

    hooks = SeedHooks(
        registration=SQLiteRegistrationBackend(db_path=work_db),
        work=SQLiteWorkBackend(db_path=work_db),
    )
    registry = HooksRegistry()
    registry.register("seed", lambda: hooks)
    loop_machine = FlatMachine(config_file=str(SEED_WORKER), hooks_registry=registry)
    print(READY_MARK, flush=True)
    sys.stdin.readline()
    await loop_machine.execute(input={"pool_id": pool_id, "worker_id": worker_id}, max_steps=2**62)
    return tally


async def _seed_push(work_db: Path, n: int) -> None:
    from flatmachines.work import SQLiteWorkBackend

    pool = SQLiteWorkBackend(db_path=str(work_db)).pool("bench")
    for i in range(n):
        await pool.push({"i": i})


def run_seed(cfg: Config, procs: int) -> dict[str, Any]:
    with temp_dir(cfg, "w1d") as tmp:
        work_db, checkpoint_db = tmp / "workers.sqlite", tmp / "flatmachines.sqlite"
        from flatmachines.work import SQLiteWorkBackend

        SQLiteWorkBackend(db_path=str(work_db))  # schema before the workers open it
        children: list[subprocess.Popen] = []
        logs = []
        try:
            for i in range(procs):
                log = open(tmp / f"seed-{i}.log", "w")  # noqa: SIM115
                logs.append(log)
                kwargs = {
                    "work_db": str(work_db),
                    "checkpoint_db": str(checkpoint_db),
                    "pool_id": "bench",
                    "worker_id": f"seed-{i}",
                }
                children.append(
                    subprocess.Popen(
                        [PY, "-m", "bench.child", "bench.w1_throughput:seed_worker"]
                        + [json.dumps(kwargs)],
                        cwd=tmp,
                        env=bench_env(),
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=log,
                        text=True,
                    )
                )
            for child in children:
                line = child.stdout.readline()
                if READY_MARK not in line:
                    raise RuntimeError(f"seed worker did not start: {line!r}")
            t0 = time.time()
            asyncio.run(_seed_push(work_db, cfg.w1_n))
            for child in children:
                child.stdin.write("go\n")
                child.stdin.flush()
            outs = []
            for child in children:
                out, _ = child.communicate(timeout=cfg.child_timeout)
                outs.append((child.returncode, parse_result(out)))
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            for log in logs:
                log.close()
        crashed = [rc for rc, res in outs if rc != 0 or res is None]
        tallies = [res for _, res in outs if res]
        if crashed:
            errors = "\n".join(p.read_text()[-1500:] for p in sorted(tmp.glob("seed-*.log")))
            raise RuntimeError(f"{len(crashed)} of {procs} seed workers crashed:\n{errors}")
        completed = sum(t["completed"] for t in tallies)
        runs = sum(t["runs"] for t in tallies)
        last = max(t["last_complete"] or t0 for t in tallies)
        return {
            "seconds": last - t0,
            "completed": completed,
            "bad": sum(t["bad"] for t in tallies) + abs(cfg.w1_n - completed),
            "duplicate_runs": runs - cfg.w1_n,
            "complete_conflicts": sum(t["complete_conflicts"] for t in tallies),
            "claim_errors": sum(t["claim_errors"] for t in tallies),
        }


# ----------------------------------------------------------------- driver


def _peers(cfg: Config, result: WorkloadResult) -> list[tuple[str, str, Callable[[], dict]]]:
    """(key, label, run once) for every peer that can run here; the rest are skipped."""
    peers: list[tuple[str, str, Callable[[], dict]]] = []
    w, c = cfg.w1_orch
    have_dbos = importlib.util.find_spec("dbos") is not None
    dbos_missing = "dbos is not installed (pip install -e '.[bench]')"
    fast = cfg.w1_dbos_fast_polling
    for backend in cfg.backends:
        problem = backend_problem(backend, cfg)
        if backend == "sqlite":
            peers.append(
                (
                    "a",
                    "(a) flatmachines alone, in-process, persistence: sqlite "
                    f"({cfg.w1_flat_concurrency} in flight)",
                    lambda: run_flat(cfg),
                )
            )
        tag = "SQLite" if backend == "sqlite" else "PostgreSQL"
        b_label = f"(b) DBOS, {tag} system DB, worker_concurrency {cfg.w1_dbos_concurrency}"
        if problem:
            result.skip(f"{b_label}; (c) on {tag}", problem)
        elif not have_dbos:
            result.skip(b_label, dbos_missing)
        else:
            peers.append(
                (
                    f"b-{backend}",
                    f"{b_label}, default polling (1 s) (defaults, informational)",
                    lambda b=backend: run_dbos(cfg, b, None),
                )
            )
            if fast:
                peers.append(
                    (
                        f"b-fast-{backend}",
                        f"(b') DBOS, {tag}, queue with worker_concurrency "
                        f"{cfg.w1_dbos_concurrency}, polling_interval_sec {fast} (tuned)",
                        lambda b=backend: run_dbos(cfg, b, fast),
                    )
                )
            peers.append(
                (
                    f"b-direct-{backend}",
                    f"(b'') DBOS, {tag}, DBOS.start_workflow, no queue (tuned)",
                    lambda b=backend: run_dbos(cfg, b, None, direct=True),
                )
            )
        if not problem:
            peers.append(
                (
                    f"c-{backend}",
                    f"(c) flatorch: {w} `orch worker` x concurrency {c}, {tag} store",
                    lambda b=backend: run_orch(cfg, b, w, c),
                )
            )
        if backend == "sqlite":
            peers.append(
                (
                    "ceiling",
                    "ceiling: flatmachines alone, MemoryBackend (no durability), 2 processes "
                    "x 4 in flight",
                    lambda: run_ceiling(cfg),
                )
            )
            peers.append(
                (
                    "d",
                    f"(d) seed pattern: DistributedWorkerHooks + SQLiteWorkBackend, "
                    f"{cfg.w1_seed_workers} worker processes",
                    lambda: run_seed(cfg, cfg.w1_seed_workers),
                )
            )
    if cfg.w1_sweep and "sqlite" in cfg.backends:
        for sw, sc in [(1, 4), (1, 8), (2, 2), (2, 4), (2, 8), (3, 4), (4, 2)]:
            if (sw, sc) != (w, c):
                peers.append(
                    (
                        f"sweep-c-{sw}x{sc}",
                        f"sweep: (c) {sw} workers x concurrency {sc}, SQLite",
                        lambda sw=sw, sc=sc: run_orch(cfg, "sqlite", sw, sc),
                    )
                )
        for sp in (1, 2, 4):
            if sp != cfg.w1_seed_workers:
                peers.append(
                    (
                        f"sweep-d-{sp}",
                        f"sweep: (d) {sp} seed worker processes",
                        lambda sp=sp: run_seed(cfg, sp),
                    )
                )
    return peers


def run(cfg: Config) -> WorkloadResult:
    started = time.monotonic()
    result = WorkloadResult(
        "W1",
        TITLE,
        params={
            "executions": cfg.w1_n,
            "orch arrangement (workers x concurrency)": "{}x{}".format(*cfg.w1_orch),
            "seed worker processes": cfg.w1_seed_workers,
            "dbos worker_concurrency": cfg.w1_dbos_concurrency,
            "repeats": cfg.repeats,
        },
    )
    peers = _peers(cfg, result)
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in peers}
    broken: set[str] = set()
    for repeat in range(cfg.repeats):
        for key, label, once in peers:  # interleaved, so drifting load hits every peer
            if key in broken:
                continue
            print(f"  W1 {key} run {repeat + 1}/{cfg.repeats} ...", flush=True)
            try:
                out = once()
            except Exception as exc:  # noqa: BLE001 - report, do not fake
                result.fail(label, describe_exception(exc))
                broken.add(key)
                continue
            if out.get("bad"):
                result.fail(label, f"run {repeat + 1}: {out['bad']} executions wrong or missing")
                broken.add(key)
                continue
            runs[key].append(out)
            print(f"    {out['seconds']:.3f} s", flush=True)
    for key, label, _ in peers:
        if key in broken or not runs[key]:
            continue
        seconds = [o["seconds"] for o in runs[key]]
        extra: dict[str, Any] = {}
        for field in ("duplicate_runs", "complete_conflicts", "claim_errors"):
            if any(o.get(field) for o in runs[key]):
                extra[field] = [o.get(field, 0) for o in runs[key]]
        row = result.row(key, label, "s", seconds, **extra)
        row["throughput"] = cfg.w1_n / row["median"] if row["median"] else None

    def seconds(key: str) -> float | None:
        row = result.get(key)
        return row["median"] if row else None

    for backend, tag in (("sqlite", "SQLite"), ("postgresql", "PostgreSQL")):
        if backend not in cfg.backends:
            continue
        best = [s for s in (seconds(f"b-fast-{backend}"), seconds(f"b-direct-{backend}")) if s]
        result.ratio(
            f"(c)/DBOS at its best (the faster of b' and b''), {tag}",
            ratio_of(min(best) if best else None, seconds(f"c-{backend}")),
            2.0,
        )
        result.ratio(
            f"(c)/(b) throughput, {tag}, DBOS at its defaults (informational)",
            ratio_of(seconds(f"b-{backend}"), seconds(f"c-{backend}")),
        )
        result.ratio(
            f"(c) {tag} / the no-durability ceiling",
            ratio_of(seconds("ceiling"), seconds(f"c-{backend}")),
            0.5,
        )
    if "sqlite" in cfg.backends:
        result.ratio("(c)/(d) throughput, SQLite", ratio_of(seconds("d"), seconds("c-sqlite")), 1.0)
        result.ratio(
            "(c)/(a) throughput, SQLite (informational)",
            ratio_of(seconds("a"), seconds("c-sqlite")),
        )
    result.notes += [
        "Figures are wall-clock seconds from the first submit to the last completion "
        "(median of the repeats); throughput = executions / median seconds.",
        "Durability differs by default and is left at each peer's default: flatorch "
        "commits every state_exit with SQLite synchronous=FULL before the next state "
        "starts (progress markers ride in that commit); flatmachines' SQLite backends "
        "use synchronous=NORMAL; DBOS "
        "uses its own defaults. W2 compares checkpoint cost at equal durability.",
        "DBOS at its best is the faster of (b') a queue polled every "
        f"{cfg.w1_dbos_fast_polling} s and (b'') DBOS.start_workflow without a queue: the "
        "settings a DBOS user tunes to. Its default (a queue polled every 1 s, which starts "
        "at most worker_concurrency workflows per poll) is the informational row (b).",
        "(d) as shipped does not survive two worker processes: SQLiteWorkPool.claim "
        "selects then updates without a guard, so two processes can claim one item and "
        "the second complete_job raises KeyError, ending that worker. The harness's "
        "hooks catch that (and retry a 'database is locked' claim) so (d) can finish; "
        "the row counts jobs that ran twice.",
    ]
    return result.finish(started)


if __name__ == "__main__":  # pragma: no cover - python -m bench.w1_throughput
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run(Config.smoke()).as_dict(), indent=2))
