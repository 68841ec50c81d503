"""W8 CLI start-up: how long an `orch` command takes, as a user types it.

`orch --help`, `orch list` and `orch show ID` on a SQLite store that holds
one completed execution (made untimed first), each run 5 times in a fresh
process; the best of the 5, wall clock, as `time` would show it. Targets
(issue: "a CLI that answers at once"): `--help` <= 0.25 s, `list` and `show`
<= 0.45 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.common import (
    ROOT,
    Config,
    WorkloadResult,
    bench_env,
    describe_exception,
    temp_dir,
)

TITLE = "W8 CLI start-up (best of 5, SQLite)"
ORCH = [sys.executable, "-m", "orchestrator.cli"]
RUNS = 5


def _timed(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(ORCH + args, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def run(cfg: Config) -> WorkloadResult:
    started = time.monotonic()
    result = WorkloadResult("W8", TITLE, params={"runs per command (best reported)": RUNS})
    with temp_dir(cfg, "w8") as tmp:
        env = bench_env(ORCH_DATABASE_URL=f"sqlite:///{tmp / 'orch.sqlite'}")
        # an installed orch runs from compiled bytecode (pip compiles it; a checkout
        # writes it on its first run): a shell that forbids writing it would time
        # the compiler on every run, not the command
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        try:
            out = subprocess.run(
                ORCH + ["submit", "examples/counter.yml", "--input", '{"n": 2}', "--json"],
                cwd=ROOT,
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            ex_id = json.loads(out.stdout)["id"]
            subprocess.run(
                ORCH + ["worker", "--app", "examples.app", "--burst"],
                cwd=ROOT,
                env=env,
                check=True,
                capture_output=True,
            )
            for key, args, target in (
                ("help", ["--help"], 0.25),
                ("list", ["list"], 0.45),
                ("show", ["show", ex_id], 0.45),
            ):
                times = [_timed(args, env) for _ in range(RUNS)]
                label = f"orch {' '.join(args).replace(ex_id, 'ID')}"
                result.row(
                    key,
                    label,
                    "s",
                    [min(times)],
                    note="runs: " + ", ".join(f"{t:.3f}" for t in times),
                )
                result.ratio(f"{label}: best of {RUNS}", min(times), target, op="<=", unit=" s")
                print(f"  {label}: best {min(times):.3f} s", flush=True)
        except Exception as exc:  # noqa: BLE001
            result.fail("orch CLI", describe_exception(exc))
    return result.finish(started)
