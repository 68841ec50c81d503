"""W2 checkpoint cost: the 3-step workflow run embedded, in-process, one
execution after another, with durable checkpoints.

  flatorch: ``orchestrator.runner.Runner`` on claims from ``orchestrator.store.Store``
    (SQLite file), as tests/test_persistence.py does: claim -> run (every
    checkpoint fenced, in the store) -> finish. The executions are submitted
    before the clock starts; a second row also times the submit of each one.
  flatmachines: ``FlatMachine.execute`` with the library's own
    ``SQLiteCheckpointBackend`` (+ ``SQLiteLeaseLock``, as ``backend: sqlite``
    wires them): once with one backend and lock shared by all executions (the
    cheapest way to use them), once wired per machine from the config (the
    library's default).

Equal durability: both sides run at the same SQLite ``synchronous`` level, once
per level in ``w2_sync_levels`` (FULL is flatorch's default, NORMAL flatmachines').
At every level each state's state_exit commits at that level before the next
state starts. flatorch's progress markers (machine_start/state_enter/execute) are
not resume points (see orchestrator/persistence.py): they ride in the next
state_exit's transaction, or commit alone with synchronous=OFF after 0.2 s. The
final state's state_exit and machine_end commit with the outcome.
Each side runs in a fresh interpreter; a few warm-up executions are not timed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
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
    temp_dir,
)

TITLE = "W2 checkpoint cost (embedded, sequential, durable checkpoints)"


async def _ms_per_run(one: Callable[[], Awaitable[None]], n: int, warmup: int) -> float:
    """``one()`` warmup times untimed, then n times: milliseconds per run."""
    for _ in range(warmup):
        await one()
    t0 = time.perf_counter()
    for _ in range(n):
        await one()
    return (time.perf_counter() - t0) / n * 1000


async def orch_sequential(
    db_url: str, n: int, warmup: int, synchronous: str, with_submit: bool
) -> dict[str, Any]:
    """Child: claim -> Runner.run, n times, on the store at ``db_url``."""
    from bench.apps.benchapp import make_registry
    from orchestrator.client import Client
    from orchestrator.runner import Runner
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    store = await Store.open(Settings(database_url=db_url, sqlite_synchronous=synchronous))
    try:
        client = Client(store)
        config = await client.pin(COUNTER3)
        if not with_submit:
            await client.submit_many(config, [{} for _ in range(n + warmup)])
        runner = Runner(store, make_registry())
        bad = 0

        async def one() -> None:
            nonlocal bad
            if with_submit:
                await client.submit(config, {})
            claim = await store.claim("bench-w2", ["default"])
            outcome = await runner.run(claim)
            if outcome.status != "completed" or outcome.output != EXPECTED_OUTPUT:
                bad += 1

        ms = await _ms_per_run(one, n, warmup)
        checkpoints = len(await store.history((await store.list_executions(limit=1))[0].id))
    finally:
        await store.close()
    return {"ms": ms, "bad": bad, "checkpoints_per_execution": checkpoints}


async def flat_sequential(
    db_path: str, n: int, warmup: int, synchronous: str, shared: bool
) -> dict[str, Any]:
    """Child: FlatMachine.execute n times with SQLiteCheckpointBackend at ``synchronous``."""
    from flatmachines import FlatMachine
    from flatmachines.locking import SQLiteLeaseLock
    from flatmachines.persistence import SQLiteCheckpointBackend

    from bench.apps.benchapp import make_registry
    from bench.w1_throughput import counter3_config

    config = counter3_config(Path(db_path))
    registry = make_registry()
    pragma = f"PRAGMA synchronous = {synchronous}"
    backend = lock = None
    if shared:
        backend = SQLiteCheckpointBackend(db_path=db_path)
        lock = SQLiteLeaseLock(db_path=db_path, owner_id="bench-w2", phase="machine")
        backend._conn.execute(pragma)
        lock._conn.execute(pragma)
    bad = 0

    async def one() -> None:
        nonlocal bad
        if shared:
            machine = FlatMachine(
                config_dict=config, hooks_registry=registry, persistence=backend, lock=lock
            )
        else:  # the library wires a new backend and lock from `backend: sqlite`
            machine = FlatMachine(config_dict=config, hooks_registry=registry)
            machine.persistence._conn.execute(pragma)
            machine.lock._conn.execute(pragma)
        if await machine.execute(input={}) != EXPECTED_OUTPUT:
            bad += 1

    ms = await _ms_per_run(one, n, warmup)
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("SELECT count(*) FROM machine_checkpoints").fetchone()[0]
    return {
        "ms": ms,
        "bad": bad,
        "checkpoints_per_execution": rows / (n + warmup),
    }


def _variants(cfg: Config, result: WorkloadResult) -> list[tuple[str, str, Any]]:
    out: list[tuple[str, str, Any]] = []
    for level in cfg.w2_sync_levels:
        common = {"n": cfg.w2_n, "warmup": cfg.w2_warmup, "synchronous": level}

        def orch(with_submit: bool, common=common) -> dict:
            with fresh_db("sqlite", cfg, "w2o") as (db_url, _):
                return run_child(
                    "bench.w2_checkpoint:orch_sequential",
                    {**common, "db_url": db_url, "with_submit": with_submit},
                    timeout=cfg.child_timeout,
                )

        def flat(shared: bool, common=common) -> dict:
            with temp_dir(cfg, "w2f") as tmp:
                return run_child(
                    "bench.w2_checkpoint:flat_sequential",
                    {**common, "db_path": str(tmp / "flatmachines.sqlite"), "shared": shared},
                    timeout=cfg.child_timeout,
                    cwd=tmp,
                )

        out += [
            (
                f"orch-{level}",
                f"flatorch Store + Runner, claim + run, synchronous={level}",
                lambda orch=orch: orch(False),
            ),
            (
                f"orch-submit-{level}",
                f"flatorch Store + Runner, submit + claim + run, synchronous={level}",
                lambda orch=orch: orch(True),
            ),
            (
                f"flat-shared-{level}",
                f"flatmachines SQLiteCheckpointBackend (shared instance), synchronous={level}",
                lambda flat=flat: flat(True),
            ),
            (
                f"flat-default-{level}",
                "flatmachines `persistence: {backend: sqlite}` (wired per machine), "
                f"synchronous={level}",
                lambda flat=flat: flat(False),
            ),
        ]
    if "postgresql" in cfg.backends:
        problem = backend_problem("postgresql", cfg)
        if problem:
            result.skip("flatorch Store + Runner on PostgreSQL (informational)", problem)
        else:

            def orch_pg() -> dict:
                with fresh_db("postgresql", cfg, "w2p") as (db_url, _):
                    return run_child(
                        "bench.w2_checkpoint:orch_sequential",
                        {
                            "db_url": db_url,
                            "n": cfg.w2_n,
                            "warmup": cfg.w2_warmup,
                            "synchronous": "FULL",
                            "with_submit": False,
                        },
                        timeout=cfg.child_timeout,
                    )

            out.append(
                (
                    "orch-pg",
                    "flatorch Store + Runner, claim + run, PostgreSQL (informational)",
                    orch_pg,
                )
            )
    return out


def run(cfg: Config) -> WorkloadResult:
    started = time.monotonic()
    result = WorkloadResult(
        "W2",
        TITLE,
        params={
            "executions timed": cfg.w2_n,
            "warm-up executions": cfg.w2_warmup,
            "sqlite synchronous levels": ", ".join(cfg.w2_sync_levels),
            "repeats": cfg.repeats,
        },
    )
    variants = _variants(cfg, result)
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in variants}
    broken: set[str] = set()
    for repeat in range(cfg.repeats):
        for key, label, once in variants:
            if key in broken:
                continue
            print(f"  W2 {key} run {repeat + 1}/{cfg.repeats} ...", flush=True)
            try:
                out = once()
            except Exception as exc:  # noqa: BLE001
                result.fail(label, describe_exception(exc))
                broken.add(key)
                continue
            if out["bad"]:
                result.fail(label, f"{out['bad']} executions gave a wrong output")
                broken.add(key)
                continue
            runs[key].append(out)
            print(f"    {out['ms']:.2f} ms/execution", flush=True)
    for key, label, _ in variants:
        if runs[key]:
            row = result.row(key, label, "ms/execution", [o["ms"] for o in runs[key]])
            row["checkpoints_per_execution"] = runs[key][-1]["checkpoints_per_execution"]

    def ms(key: str) -> float | None:
        row = result.get(key)
        return row["median"] if row else None

    for level in cfg.w2_sync_levels:
        result.ratio(
            f"flatmachines shared backend / flatorch, synchronous={level} (time ratio)",
            ratio_of(ms(f"flat-shared-{level}"), ms(f"orch-{level}")),
            1.5,
        )
        result.ratio(
            f"flatmachines default wiring / flatorch, synchronous={level} (informational)",
            ratio_of(ms(f"flat-default-{level}"), ms(f"orch-{level}")),
        )
    result.notes += [
        "A ratio above 1 means flatorch spends less time per execution; the target "
        "applies to the cheaper flatmachines arrangement (one shared backend).",
        "flatorch rows use the orchestrator's public pieces in one process: "
        "Store.claim, Runner.run (fenced checkpoints, finish). No worker process, no "
        "lease-keeper thread.",
    ]
    return result.finish(started)


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run(Config.smoke()).as_dict(), indent=2))
