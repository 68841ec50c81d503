"""Shared helpers: configuration, the machine description, child processes,
PostgreSQL schemas, and the result records every workload returns."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# flatmachines logs every machine it builds at INFO; keep the harness quiet
os.environ.setdefault("FLATAGENTS_LOG_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MACHINES = BENCH / "machines"
COUNTER3 = MACHINES / "counter3.yml"
SLOW = MACHINES / "slow.yml"
SEED_WORKER = MACHINES / "seed_worker.yml"
APP = "bench.apps.benchapp"
PY = sys.executable
RESULT_MARK = "BENCH_RESULT "
READY_MARK = "BENCH_READY"
DEFAULT_PG_URL = os.environ.get(
    "ORCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
EXPECTED_OUTPUT = {"counter": 3}


# ------------------------------------------------------------------ config


@dataclass
class Config:
    """Every size and arrangement the workloads use. ``quick()`` gives smoke sizes."""

    quick: bool = False
    repeats: int = 3
    pg_url: str = DEFAULT_PG_URL
    backends: tuple[str, ...] = ("sqlite", "postgresql")
    keep_temp: bool = False
    child_timeout: float = 900.0
    # W1 throughput
    w1_n: int = 500
    w1_orch: tuple[int, int] = (2, 4)  # (worker processes, --concurrency each)
    w1_seed_workers: int = 2  # (d): worker processes, one job at a time each
    w1_flat_concurrency: int = 8  # (a): executions in flight on the one event loop
    w1_dbos_concurrency: int = 8  # (b): Queue worker_concurrency
    w1_dbos_fast_polling: float = 0.01  # (b'): DBOS's queue at its best polling; 0: off
    w1_sweep: bool = False  # also run (c) and (d) in several arrangements
    # W2 checkpoint cost
    w2_n: int = 200
    w2_warmup: int = 10
    w2_sync_levels: tuple[str, ...] = ("FULL", "NORMAL")
    # W3 recovery
    w3_trials: int = 20
    w3_ttl: float = 2.0
    w3_sleep: float = 4.0
    # W4 deep backlog
    w4_sizes: tuple[int, int] = (1_000, 100_000)
    w4_cycles: int = 500
    # W5 memory
    w5_sizes: tuple[int, int] = (100, 10_000)
    w5_concurrency: int = 4
    # W9 agent loop
    w9_turns: tuple[int, int] = (100, 200)
    w9_executions: int = 4
    w9_concurrency: int = 4
    w9_repeats: int = 1  # W9's own repeats: one W9 run stays near 5 minutes
    w9_kill_ttl: float = 2.0  # --lease-ttl of the worker that is killed at the last turn
    # W10 retention
    w10_marks: tuple[int, int] = (5_000, 20_000)
    w10_rate: float = 60.0  # executions submitted a second (one worker keeps up under load)
    w10_interval: float = 5.0  # seconds between retention runs that found nothing more
    w10_concurrency: int = 4

    @classmethod
    def smoke(cls) -> Config:
        """Tiny sizes: checks that every workload runs end to end. Not results."""
        return cls(
            quick=True,
            repeats=1,
            child_timeout=240.0,
            w1_n=20,
            w2_n=20,
            w2_warmup=2,
            w3_trials=2,
            w3_sleep=2.0,
            w4_sizes=(200, 2_000),
            w4_cycles=50,
            w5_sizes=(20, 200),
            w9_turns=(10, 20),
            w10_marks=(200, 800),
            w10_rate=50.0,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------ result records


@dataclass
class WorkloadResult:
    """What one workload hands the report: rows (figures), ratios, skips, failures."""

    id: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    load_before: list[float] = field(default_factory=lambda: list(os.getloadavg()))
    load_after: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def row(
        self, key: str, label: str, unit: str, runs: list[float], note: str = "", **extra: Any
    ) -> dict[str, Any]:
        """One figure: the median of ``runs`` (one value per repeat)."""
        entry = {
            "key": key,
            "label": label,
            "unit": unit,
            "runs": [round(r, 6) for r in runs],
            "median": median(runs),
            "note": note,
            **extra,
        }
        self.rows.append(entry)
        return entry

    def get(self, key: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["key"] == key), None)

    def ratio(
        self,
        label: str,
        value: float | None,
        target: float | None = None,
        note: str = "",
        *,
        op: str = ">=",
        unit: str = "x",
    ) -> None:
        """A derived figure checked against its target (``value op target``)."""
        ok = None
        if value is not None and target is not None:
            ok = value >= target if op == ">=" else value <= target
        self.ratios.append(
            {
                "label": label,
                "value": value,
                "target": target,
                "op": op,
                "unit": unit,
                "ok": ok,
                "note": note,
            }
        )

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append({"what": what, "reason": reason})

    def fail(self, what: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.failed.append({"what": what, "error": text.strip()[-2000:]})

    def finish(self, started: float) -> WorkloadResult:
        self.load_after = list(os.getloadavg())
        self.seconds = round(time.monotonic() - started, 1)
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio_of(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "ram_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(pg_url: str) -> dict[str, str | None]:
    out = {
        name: package_version(name)
        for name in ("flatorch", "flatmachines", "dbos", "sqlalchemy", "psycopg", "alembic")
    }
    out["sqlite (library)"] = sqlite3.sqlite_version
    out["postgresql (server)"] = pg_server_version(pg_url)
    return out


# ------------------------------------------------------------- PostgreSQL


def pg_dsn(url: str) -> str:
    """A libpq URL from a SQLAlchemy one (drops the +driver)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme.split('+')[0]}://{rest}"


def pg_problem(url: str) -> str | None:
    """None when a PostgreSQL server answers at ``url``, else why not."""
    try:
        import psycopg

        with psycopg.connect(pg_dsn(url), connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means: skip PostgreSQL
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def pg_server_version(url: str) -> str | None:
    try:
        import psycopg

        with psycopg.connect(pg_dsn(url), connect_timeout=3) as conn:
            return conn.execute("SHOW server_version").fetchone()[0]
    except Exception:  # noqa: BLE001
        return None


@dataclass(frozen=True)
class PgSchema:
    name: str
    url: str  # SQLAlchemy URL whose search_path is the schema (for the orchestrator)
    dsn: str  # plain libpq URL of the database (for DBOS, with dbos_system_schema=name)


@contextlib.contextmanager
def pg_schema(base_url: str, tag: str) -> Iterator[PgSchema]:
    """A fresh schema for one run, dropped afterwards (as tests/conftest.py does)."""
    import psycopg

    name = f"bench_{tag}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_dsn(base_url), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
    sep = "&" if "?" in base_url else "?"
    try:
        yield PgSchema(name, f"{base_url}{sep}options=-csearch_path%3D{name}", pg_dsn(base_url))
    finally:
        with psycopg.connect(pg_dsn(base_url), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@contextlib.contextmanager
def fresh_db(backend: str, cfg: Config, tag: str) -> Iterator[tuple[str, Path]]:
    """(database URL, temp dir) for one run: a new SQLite file or PostgreSQL schema."""
    with temp_dir(cfg, tag) as tmp:
        if backend == "sqlite":
            yield f"sqlite:///{tmp / 'orch.sqlite'}", tmp
        else:
            with pg_schema(cfg.pg_url, tag) as schema:
                yield schema.url, tmp


@contextlib.contextmanager
def temp_dir(cfg: Config, tag: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"flatorch-bench-{tag}-"))
    try:
        yield path
    finally:
        if not cfg.keep_temp:
            import shutil

            shutil.rmtree(path, ignore_errors=True)


def backend_problem(backend: str, cfg: Config) -> str | None:
    if backend == "sqlite":
        return None
    if backend == "postgresql":
        problem = pg_problem(cfg.pg_url)
        return f"PostgreSQL not reachable at {cfg.pg_url}: {problem}" if problem else None
    return f"unknown backend {backend!r}"


# -------------------------------------------------------------- processes


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    env.setdefault("FLATAGENTS_LOG_LEVEL", "WARNING")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class ChildFailed(RuntimeError):
    pass


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def parse_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    return None


def run_child(
    target: str, kwargs: dict[str, Any], *, timeout: float, cwd: Path | None = None, **env: str
) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh interpreter (bench/child.py) and
    return what it returned. Each peer gets its own process: no shared state."""
    cmd = [PY, "-m", "bench.child", target, json.dumps(kwargs)]
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd or ROOT,
            env=bench_env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise ChildFailed(f"{target} timed out after {timeout:.0f}s") from exc
    result = parse_result(proc.stdout)
    if proc.returncode != 0 or result is None:
        raise ChildFailed(
            f"{target} exited {proc.returncode}:\n{_tail(proc.stderr or proc.stdout)}"
        )
    return result


def start_orch_worker(db_url: str, log_path: Path, *args: str, **env: str) -> subprocess.Popen:
    """A real `orch worker --app bench.apps.benchapp ...` process."""
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process by stop()
    proc = subprocess.Popen(
        [PY, "-m", "orchestrator.cli", "worker", "--app", APP, *args],
        cwd=ROOT,
        env=bench_env(ORCH_DATABASE_URL=db_url, **env),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log_file = log  # type: ignore[attr-defined]
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
    """Signal a process we started and reap it (SIGKILL if it does not exit)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    log = getattr(proc, "log_file", None)
    if log is not None:
        log.close()
    return proc.returncode


def log_tail(proc: subprocess.Popen, lines: int = 15) -> str:
    path = getattr(proc, "log_path", None)
    try:
        return _tail(Path(path).read_text(), lines) if path else ""
    except OSError:
        return ""


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a live process, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


# ---------------------------------------------------------------- waiting


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


async def await_until(
    predicate: Callable[[], Awaitable[Any]], timeout: float, what: str, interval=0.05
):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def epoch(dt: datetime) -> float:
    """The store's naive-UTC timestamps as epoch seconds."""
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def describe_exception(exc: BaseException) -> str:
    if isinstance(exc, ChildFailed | TimeoutError):
        return str(exc)
    return "".join(traceback.format_exception_only(exc)).strip()
