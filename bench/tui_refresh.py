"""What one refresh of `orch tui` costs with 100,000 executions in the store.

    python bench/tui_refresh.py [--n 100000] [--backends sqlite,postgresql]

A fresh store gets N executions (a tenth completed over the last ten minutes,
so the throughput sparkline has something to count, a few failed and waiting),
two queues and workers. Then each view's refresh (exactly the reads the
console makes, through the public API) is timed 20 times: the overview
(workers, queues, throughput), the executions table (first page, a status
filter, a text filter, page 100) and one execution's screen. Target: every
view under 200 ms. Writes bench/TUI.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from orchestrator import Orchestrator  # noqa: E402
from orchestrator.clock import utcnow  # noqa: E402
from orchestrator.store import NewExecution  # noqa: E402
from orchestrator.store.models import executions  # noqa: E402
from tui.feed import Feed, Filters  # noqa: E402
from tui.screenshot import PIPELINE  # noqa: E402

PG = os.environ.get("ORCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REPEATS = 20


async def fill(orch: Orchestrator, n: int) -> None:
    import sqlalchemy as sa

    config = await orch.client.pin(_config())
    store = orch.store
    for start in range(0, n, 1000):
        await store.submit(
            [
                NewExecution(
                    id=f"x{start + i:07d}-{uuid.uuid4().hex[:6]}",
                    machine=config.name,
                    config_hash=config.hash,
                    input={"i": start + i},
                    queue="default" if (start + i) % 3 else "llm",
                )
                for i in range(min(1000, n - start))
            ]
        )
    now = utcnow()

    def mark(conn: sa.Connection) -> None:
        ids = [r.id for r in conn.execute(sa.select(executions.c.id).limit(n // 10))]
        for k, ex_id in enumerate(ids):
            conn.execute(
                sa.update(executions)
                .where(executions.c.id == ex_id)
                .values(
                    status="completed" if k % 50 else "failed",
                    finished_at=now - timedelta(seconds=k % 600),
                )
            )

    await store.db.write(mark)
    for w in range(4):
        await store.register_worker(
            f"bench-{w}", host="bench", pid=w + 1, queue_names=["default"], concurrency=8
        )


def _config():
    from orchestrator.api import _config as load

    return load(PIPELINE)


async def time_views(orch: Orchestrator) -> dict[str, list[float]]:
    feed = Feed(orch)
    some = (await orch.list(limit=1))[0].id
    views = {
        "overview (workers, queues, throughput)": feed.overview,
        "executions, first page": lambda: feed.executions(Filters()),
        "executions, status=failed": lambda: feed.executions(Filters(status="failed")),
        "executions, text filter": lambda: feed.executions(Filters(text="x00421")),
        "executions, page 100": lambda: feed.executions(Filters(page=99)),
        "one execution's screen": lambda: orch.get(some, detail=True),
    }
    out: dict[str, list[float]] = {}
    for name, view in views.items():
        await view()  # warm
        samples = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            await view()
            samples.append((time.perf_counter() - t0) * 1000)
        out[name] = samples
    return out


async def one(url: str, n: int) -> dict[str, list[float]]:
    async with Orchestrator(url) as orch:
        t0 = time.perf_counter()
        await fill(orch, n)
        print(f"  filled {n} in {time.perf_counter() - t0:.0f} s", flush=True)
        return await time_views(orch)


def pg_schema() -> tuple[str, str]:
    schema = f"bench_tui_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(
        PG.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    return f"{PG}?options=-csearch_path%3D{schema}", schema


def drop(schema: str) -> None:
    with psycopg.connect(
        PG.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as c:
        c.execute(f"DROP SCHEMA {schema} CASCADE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    results = {}
    for backend in args.backends.split(","):
        print(f"{backend} ...", flush=True)
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                results[backend] = asyncio.run(one(f"sqlite:///{tmp}/orch.sqlite", args.n))
        else:
            url, schema = pg_schema()
            try:
                results[backend] = asyncio.run(one(url, args.n))
            finally:
                drop(schema)
    lines = [
        "# `orch tui`: the cost of a refresh",
        "",
        f"{args.n:,} executions in the store; each view timed {REPEATS} times through the",
        "public API, exactly as the console reads it (`python bench/tui_refresh.py`).",
        "Target: every view under 200 ms.",
        "",
        "| view | " + " | ".join(f"{b} median / max (ms)" for b in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    worst = 0.0
    names = next(iter(results.values())).keys()
    for name in names:
        cells = []
        for b in results:
            s = results[b][name]
            worst = max(worst, max(s))
            cells.append(f"{statistics.median(s):.1f} / {max(s):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Slowest refresh of any view: {worst:.1f} ms ({'met' if worst < 200 else 'NOT met'}).",
    ]
    (ROOT / "bench" / "TUI.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
