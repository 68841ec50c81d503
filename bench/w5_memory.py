"""W5 memory: peak RSS of one `orch worker --burst` process after 10,000
executions vs after 100.

The executions (the 3-step workflow) are submitted to a fresh SQLite store
first; then one worker process (``--concurrency w5_concurrency``) runs them all
and exits (``--burst``). Its peak RSS is the highest VmHWM read from
/proc/<pid>/status while it runs (every 0.25 s). VmHWM belongs to the process's
own address space since its exec. The kernel's ``ru_maxrss`` (os.wait4) is kept
for reference only: Linux carries the spawning process's high-water mark across
fork and exec into it, so it reports this harness's size (which grows with the
executions it submits and checks) as much as the worker's. Target: peak after
10,000 at most 20 % above peak after 100.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from bench.common import (
    COUNTER3,
    ROOT,
    Config,
    WorkloadResult,
    describe_exception,
    fresh_db,
    log_tail,
    proc_status,
    ratio_of,
    start_orch_worker,
)

TITLE = "W5 memory (peak RSS of one worker, 10k vs 100 executions)"
SAMPLE = 0.25


async def _submit(db_url: str, n: int) -> None:
    from orchestrator.client import Client
    from orchestrator.settings import Settings

    async with await Client.open(Settings(database_url=db_url)) as client:
        await client.submit_many(COUNTER3, [{} for _ in range(n)])


async def _completed(db_url: str) -> dict[str, int]:
    from orchestrator.settings import Settings
    from orchestrator.store import Store

    store = await Store.open(Settings(database_url=db_url), migrate=False)
    try:
        return await store.count_by_status()
    finally:
        await store.close()


def burst(cfg: Config, n: int) -> dict[str, Any]:
    with fresh_db("sqlite", cfg, "w5") as (db_url, tmp):
        asyncio.run(_submit(db_url, n))
        proc = start_orch_worker(
            db_url, tmp / "worker.log", "--burst", "--concurrency", str(cfg.w5_concurrency)
        )
        samples: list[int] = []
        hwm = 0
        deadline = time.monotonic() + cfg.child_timeout
        t0 = time.monotonic()
        status = rusage = None
        try:
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                status_now = proc_status(proc.pid)
                if status_now.get("VmRSS"):
                    samples.append(status_now["VmRSS"])
                hwm = max(hwm, status_now.get("VmHWM", 0))
                if time.monotonic() > deadline:
                    proc.kill()
                    raise TimeoutError(f"worker still running after {cfg.child_timeout:.0f}s")
                time.sleep(SAMPLE)
            seconds = time.monotonic() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if proc.returncode is None:
                proc.kill()
                os.waitpid(proc.pid, 0)
                proc.returncode = -9
            proc.log_file.close()
        if proc.returncode != 0:
            raise RuntimeError(f"worker exited {proc.returncode}:\n{log_tail(proc)}")
        counts = asyncio.run(_completed(db_url))
        if counts.get("completed", 0) != n:
            raise RuntimeError(f"expected {n} completed, store says {counts}")
        if not hwm:
            raise RuntimeError("the worker exited before its memory could be read")
        return {
            "peak_kib": hwm,
            "ru_maxrss_kib": rusage.ru_maxrss,  # Linux: kilobytes; see the module doc
            "last_rss_kib": samples[-1] if samples else None,
            "first_rss_kib": samples[0] if samples else None,
            "seconds": seconds,
        }


def run(cfg: Config) -> WorkloadResult:
    started = time.monotonic()
    small, large = cfg.w5_sizes
    result = WorkloadResult(
        "W5",
        TITLE,
        params={
            "executions": f"{small:,} vs {large:,}",
            "worker": f"orch worker --burst --concurrency {cfg.w5_concurrency}",
            "store": "SQLite",
            "repeats": cfg.repeats,
        },
    )
    runs: dict[int, list[dict]] = {small: [], large: []}
    broken: set[int] = set()
    for repeat in range(cfg.repeats):
        for n in (small, large):
            if n in broken:
                continue
            print(f"  W5 {n:,} executions, run {repeat + 1}/{cfg.repeats} ...", flush=True)
            try:
                out = burst(cfg, n)
            except Exception as exc:  # noqa: BLE001
                result.fail(f"{n:,} executions", describe_exception(exc))
                broken.add(n)
                continue
            runs[n].append(out)
            print(
                f"    peak {out['peak_kib'] / 1024:.1f} MiB (ru_maxrss "
                f"{out['ru_maxrss_kib'] / 1024:.1f}) in {out['seconds']:.1f} s",
                flush=True,
            )
    for n in (small, large):
        if runs[n]:
            row = result.row(
                f"peak-{n}",
                f"peak RSS after {n:,} executions",
                "MiB",
                [o["peak_kib"] / 1024 for o in runs[n]],
            )
            row["last_sampled_rss_mib"] = [
                (o["last_rss_kib"] or 0) / 1024 for o in runs[n] if o["last_rss_kib"]
            ]
            row["executions_per_s"] = [n / o["seconds"] for o in runs[n]]
            row["note"] = "ru_maxrss (inflated by the harness, see notes) " + ", ".join(
                f"{o['ru_maxrss_kib'] / 1024:.1f}" for o in runs[n]
            )
    growth = ratio_of(
        (result.get(f"peak-{large}") or {}).get("median"),
        (result.get(f"peak-{small}") or {}).get("median"),
    )
    result.ratio(
        f"peak RSS growth, {large:,} vs {small:,} executions",
        None if growth is None else (growth - 1) * 100,
        20.0,
        op="<=",
        unit="%",
    )
    result.notes.append(
        "Peak = the highest VmHWM of the worker's own address space, sampled every "
        f"{SAMPLE} s. ru_maxrss is not used: Linux carries the spawning process's "
        "high-water mark across fork and exec, so it reports the harness's size too."
    )
    result.notes.append(
        "executions/s here includes the worker's start-up (imports, migration check), "
        "so it is not a throughput figure; see W1."
    )
    return result.finish(started)


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run(Config.smoke()).as_dict(), indent=2))
