"""Run the flatorch benchmarks and write bench/RESULTS.md.

    python bench/run.py                      # every workload, full sizes, 3 repeats
    python bench/run.py --quick              # smoke sizes (writes RESULTS.quick.md)
    python bench/run.py --only W1,W3 --repeats 5

Each workload's raw figures go to bench/results/<full|quick>/W*.json; the
report is rendered from every JSON there, so re-running one workload with
--only updates its section and keeps the others (each section says when it ran).
See bench/README.md for what each workload measures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402 - the repository root goes on sys.path first
    BENCH,
    Config,
    WorkloadResult,
    machine_info,
    versions,
)

WORKLOADS = {
    "W1": "bench.w1_throughput",
    "W2": "bench.w2_checkpoint",
    "W3": "bench.w3_recovery",
    "W4": "bench.w4_backlog",
    "W5": "bench.w5_memory",
    "W6": "bench.w6_io",
    "W7": "bench.w7_latency",
    "W8": "bench.w8_cli",
    "W9": "bench.w9_agent_loop",
    "W10": "bench.w10_retention",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes: checks, not results")
    p.add_argument("--only", help="comma-separated workloads, e.g. W1,W3 (default: all)")
    p.add_argument("--repeats", type=int, help="runs per figure, median reported (default 3)")
    p.add_argument(
        "--backends",
        help="comma-separated: sqlite,postgresql (default both; PostgreSQL "
        "is skipped, and said so, when no server answers)",
    )
    p.add_argument("--pg-url", help="PostgreSQL (SQLAlchemy URL); default ORCH_TEST_POSTGRES_URL")
    p.add_argument("--out", type=Path, help="report path (default bench/RESULTS.md)")
    p.add_argument("--keep-temp", action="store_true", help="keep each run's temp dir")
    p.add_argument(
        "--label",
        help="what this run measured, shown with its sections, e.g. 'before the storage change'",
    )
    g = p.add_argument_group("W1")
    g.add_argument("--w1-n", type=int, help="executions (default 500)")
    g.add_argument("--w1-orch", help="(c) arrangement WORKERSxCONCURRENCY (default 2x4)")
    g.add_argument("--w1-seed-workers", type=int, help="(d) worker processes (default 2)")
    g.add_argument(
        "--w1-dbos-fast-polling",
        type=float,
        help="(b') DBOS polling_interval_sec for the extra tuned row; 0 turns it off "
        "(default 0.05)",
    )
    g.add_argument("--w1-sweep", action="store_true", help="also try other (c)/(d) arrangements")
    g = p.add_argument_group("W2-W5")
    g.add_argument("--w2-n", type=int, help="W2 executions timed per run (default 200)")
    g.add_argument("--w3-trials", type=int, help="W3 kills per backend (default 20)")
    g.add_argument("--w4-sizes", help="W4 backlog sizes SMALL,LARGE (default 1000,100000)")
    g.add_argument("--w4-cycles", type=int, help="W4 claim+finish cycles timed (default 500)")
    g.add_argument("--w5-sizes", help="W5 execution counts SMALL,LARGE (default 100,10000)")
    g = p.add_argument_group("W9")
    g.add_argument("--w9-turns", help="W9 turns per execution SMALL,LARGE (default 100,200)")
    g.add_argument(
        "--w9-repeats", type=int, help="W9 runs per figure (default 1: one W9 run is ~5 min)"
    )
    g = p.add_argument_group("W10")
    g.add_argument("--w10-marks", help="W10 sizes read at SMALL,LARGE executions (5000,20000)")
    g.add_argument("--w10-rate", type=float, help="W10 executions submitted a second (60)")
    g.add_argument("--w10-interval", type=float, help="W10 seconds between retention runs (5)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    cfg = Config.smoke() if args.quick else Config()
    if args.repeats:
        cfg.repeats = args.repeats
    if args.backends:
        cfg.backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if args.pg_url:
        cfg.pg_url = args.pg_url
    cfg.keep_temp = args.keep_temp
    if args.w1_n:
        cfg.w1_n = args.w1_n
    if args.w1_orch:
        workers, _, concurrency = args.w1_orch.lower().partition("x")
        cfg.w1_orch = (int(workers), int(concurrency))
    if args.w1_seed_workers:
        cfg.w1_seed_workers = args.w1_seed_workers
    if args.w1_dbos_fast_polling is not None:
        cfg.w1_dbos_fast_polling = args.w1_dbos_fast_polling
    cfg.w1_sweep = args.w1_sweep
    if args.w2_n:
        cfg.w2_n = args.w2_n
    if args.w3_trials:
        cfg.w3_trials = args.w3_trials
    if args.w4_sizes:
        a, b = (int(x) for x in args.w4_sizes.split(","))
        cfg.w4_sizes = (a, b)
    if args.w4_cycles:
        cfg.w4_cycles = args.w4_cycles
    if args.w5_sizes:
        a, b = (int(x) for x in args.w5_sizes.split(","))
        cfg.w5_sizes = (a, b)
    if args.w9_turns:
        a, b = (int(x) for x in args.w9_turns.split(","))
        cfg.w9_turns = (a, b)
    if args.w9_repeats:
        cfg.w9_repeats = args.w9_repeats
    if args.w10_marks:
        a, b = (int(x) for x in args.w10_marks.split(","))
        cfg.w10_marks = (a, b)
    if args.w10_rate:
        cfg.w10_rate = args.w10_rate
    if args.w10_interval:
        cfg.w10_interval = args.w10_interval
    return cfg


# ------------------------------------------------------------------ report


def fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_target(r: dict) -> str:
    if r.get("target") is None:
        return "(informational)"
    op = "≥" if r.get("op", ">=") == ">=" else "≤"
    unit = r.get("unit", "x")
    return f"{op} {fmt(r['target'])}{'' if unit == 'x' else ' '}{unit}"


def fmt_value(r: dict) -> str:
    if r.get("value") is None:
        return "n/a"
    unit = r.get("unit", "x")
    return f"{fmt(r['value'])}{'' if unit == 'x' else ' '}{unit}"


def verdict(r: dict) -> str:
    if r.get("ok") is None:
        return "n/a" if r.get("target") is not None else ""
    return "**met**" if r["ok"] else "**not met**"


def render(results: list[dict], quick: bool) -> str:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    latest = max(results, key=lambda r: r["started_at"])
    machine, vers = latest["machine"], latest["versions"]
    out: list[str] = ["# flatorch benchmark results", ""]
    if quick:
        out += [
            "> **SMOKE SIZES (`--quick`).** These runs only check that every workload "
            "works end to end. The figures are not results; do not compare them.",
            "",
        ]
    out += [
        f"Generated by `python bench/run.py` on {now}. Every figure is wall-clock, the "
        "median of the runs listed beside it. See bench/README.md for the method.",
        "",
        "## Machine",
        "",
        f"- CPUs: {machine['nproc']} × {machine['cpu_model']}",
        f"- RAM: {machine['ram_gib']} GiB",
        f"- OS: {machine['os']}, kernel {machine['kernel']}; Python {machine['python']}",
        f"- Load average when the latest workload started: "
        f"{', '.join(fmt(x) for x in machine['loadavg'])} (1/5/15 min). Other work on "
        "the machine inflates every figure; see each workload's load below.",
        "",
        "## Versions",
        "",
        "| package | version |",
        "|---|---|",
    ]
    out += [f"| {k} | {v or 'not installed'} |" for k, v in vers.items()]
    out += ["", "## Targets", "", "| workload | figure | value | target | |"]
    out.append("|---|---|---|---|---|")
    for res in results:
        wid = f"{res['id']} ({res['label']})" if res.get("label") else res["id"]
        for r in res["ratios"]:
            out.append(
                f"| {wid} | {r['label']} | {fmt_value(r)} | {fmt_target(r)} | {verdict(r)} |"
            )
    history = BENCH / "OPTIMISATIONS.md"
    if history.exists() and not quick:
        # hand-kept: what each optimisation bought, measured as it landed
        out += ["", history.read_text().strip()]
    skipped = [(res["id"], s) for res in results for s in res["skipped"]]
    failed = [(res["id"], f) for res in results for f in res["failed"]]
    out += ["", "## Skipped peers", ""]
    out += [f"- {wid}: {s['what']} — {s['reason']}" for wid, s in skipped] or ["None."]
    out += ["", "## Failures", ""]
    out += [f"- {wid}: {f['what']} — see below" for wid, f in failed] or ["None."]
    for res in results:
        label = f", {res['label']}" if res.get("label") else ""
        out += ["", f"## {res['title']}{label}", ""]
        out.append(
            f"Ran {res['started_at']} for {res['seconds']} s ({res['mode']} sizes); load "
            f"average before {', '.join(fmt(x) for x in res['load_before'])}, after "
            f"{', '.join(fmt(x) for x in res['load_after'])}."
        )
        out += ["", "Parameters: " + "; ".join(f"{k}: {v}" for k, v in res["params"].items())]
        if res["rows"]:
            out += ["", "| | median | unit | runs | more |", "|---|---|---|---|---|"]
            for row in res["rows"]:
                more = _row_extra(row)
                runs = ", ".join(fmt(x) for x in row["runs"])
                out.append(
                    f"| {row['label']} | **{fmt(row['median'])}** | {row['unit']} | {runs} | "
                    f"{more} |"
                )
        if res["ratios"]:
            out += ["", "| derived | value | target | |", "|---|---|---|---|"]
            for r in res["ratios"]:
                out.append(f"| {r['label']} | {fmt_value(r)} | {fmt_target(r)} | {verdict(r)} |")
        for s in res["skipped"]:
            out += ["", f"Skipped: {s['what']} — {s['reason']}"]
        for f in res["failed"]:
            out += ["", f"Failed: {f['what']}:", "", "```", f["error"], "```"]
        if res["notes"]:
            out += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(out) + "\n"


def _row_extra(row: dict) -> str:
    parts = []
    if row.get("throughput") is not None:
        parts.append(f"{fmt(row['throughput'])} executions/s")
    for key, label in (
        ("max", "max"),
        ("p95", "p95"),
        ("checkpoints_per_execution", "checkpoints/execution"),
        ("insert_rows_per_s", "inserted rows/s"),
    ):
        if row.get(key) is not None:
            parts.append(f"{label} {fmt(row[key])}")
    for key, label in (
        ("duplicate_runs", "jobs run twice"),
        ("complete_conflicts", "complete_job KeyErrors"),
        ("claim_errors", "claim 'database is locked' errors"),
    ):
        if row.get(key):
            parts.append(f"{label} per run: {', '.join(str(x) for x in row[key])}")
    if row.get("last_sampled_rss_mib"):
        parts.append("last VmRSS " + ", ".join(fmt(x) for x in row["last_sampled_rss_mib"]))
    if row.get("note"):
        parts.append(row["note"])
    return "; ".join(parts)


# ------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    mode = "quick" if cfg.quick else "full"
    chosen = [w.strip().upper() for w in args.only.split(",")] if args.only else list(WORKLOADS)
    unknown = [w for w in chosen if w not in WORKLOADS]
    if unknown:
        print(f"unknown workload(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    store_dir = BENCH / "results" / mode
    store_dir.mkdir(parents=True, exist_ok=True)
    out_path = args.out or BENCH / ("RESULTS.quick.md" if cfg.quick else "RESULTS.md")
    print(f"flatorch bench ({mode} sizes, {cfg.repeats} repeat(s)): {', '.join(chosen)}")
    if os.getloadavg()[0] > 0.5 * len(os.sched_getaffinity(0)):
        print(f"note: load average {os.getloadavg()[0]:.2f}: other work will skew figures")
    vers = versions(cfg.pg_url)
    for wid in chosen:
        print(f"{wid} ...", flush=True)
        started = time.monotonic()
        module = importlib.import_module(WORKLOADS[wid])
        try:
            result: WorkloadResult = module.run(cfg)
        except Exception as exc:  # noqa: BLE001 - one broken workload must not stop the rest
            result = WorkloadResult(wid, getattr(module, "TITLE", wid))
            result.fail(wid, "".join(traceback.format_exception(exc)))
            result.finish(started)
        data = result.as_dict()
        data.update(mode=mode, machine=machine_info(), versions=vers, config=cfg.as_dict())
        if args.label:
            data["label"] = args.label
        (store_dir / f"{wid}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        for r in data["ratios"]:
            print(f"  {r['label']}: {fmt_value(r)} (target {fmt_target(r)}) {verdict(r)}")
        for s in data["skipped"]:
            print(f"  skipped: {s['what']}: {s['reason']}")
        for f in data["failed"]:
            print(f"  FAILED: {f['what']}: {f['error'].splitlines()[-1] if f['error'] else ''}")
    in_order = sorted(store_dir.glob("W*.json"), key=lambda p: (len(p.stem), p.stem))  # W10 last
    results = [json.loads(p.read_text()) for p in in_order if p.stem in WORKLOADS]
    out_path.write_text(render(results, cfg.quick))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
