"""Every store test runs twice: on a fresh SQLite file and on a fresh PostgreSQL schema.

PostgreSQL comes from ORCH_TEST_POSTGRES_URL (default: the local test server);
a test skips only when no server answers there. Each test gets its own schema
(search_path in the URL), so worker subprocesses see exactly the test's data.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from orchestrator.settings import Settings
from orchestrator.store import Store

TESTS = Path(__file__).parent
ROOT = TESTS.parent
PG_URL = os.environ.get(
    "ORCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pg_dsn() -> str:
    return PG_URL.replace("postgresql+psycopg://", "postgresql://")


def _pg_reachable() -> str | None:
    try:
        with psycopg.connect(_pg_dsn(), connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001
        return str(exc).splitlines()[0]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'orch.sqlite'}"
        return
    yield from _pg_schema_url()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """PostgreSQL only, for faults only a server has (a cut connection)."""
    yield from _pg_schema_url()


def _pg_schema_url() -> Iterator[str]:
    problem = _pg_reachable()
    if problem:
        if os.environ.get("ORCH_TEST_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL required but not reachable at {PG_URL}: {problem}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {problem}")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_pg_dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_pg_dsn(), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def settings(db_url) -> Settings:
    return Settings(database_url=db_url, lease_ttl=30)


_runner: asyncio.Runner | None = None


@pytest.fixture(autouse=True)
def _event_loop() -> Iterator[None]:
    """One event loop per test: pooled async connections must not cross loops."""
    global _runner
    _runner = asyncio.Runner()
    try:
        yield
    finally:
        _runner.close()
        _runner = None


def run_async(coro):
    assert _runner is not None
    return _runner.run(coro)


@pytest.fixture
def store(settings) -> Iterator[Store]:
    s = run_async(Store.open(settings))
    yield s
    run_async(s.close())


# ------------------------------------------------------------------ processes


def orch_env(db_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ORCH_DATABASE_URL=db_url,
        PYTHONPATH=os.pathsep.join([str(TESTS / "apps"), str(ROOT), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def orch(
    *args: str,
    db_url: str,
    cwd: Path | None = None,
    input: str | None = None,
    timeout: float = 120,
    **env: str,
) -> subprocess.CompletedProcess:
    """Run the real `orch` command line."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=orch_env(db_url, **env),
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class WorkerProcess:
    def __init__(self, db_url: str, log_path: Path, *args: str, **env: str):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "worker", *args],
            env=orch_env(db_url, **env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def workers(tmp_path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `orch worker` processes; any still alive at the end are killed."""
    started: list[WorkerProcess] = []

    def start(db_url: str, *args: str, **env: str) -> WorkerProcess:
        w = WorkerProcess(db_url, tmp_path / f"worker-{len(started)}.log", *args, **env)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def wait_until(predicate: Callable[[], object], timeout: float = 60, what: str = "condition"):
    """Poll until predicate() is truthy; fail the test (not time it) if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_machine(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def chain_machine(
    path: Path,
    actions: list[str],
    *,
    name: str = "chain",
    checkpoint_on: list[str] | None = None,
    context: dict | None = None,
) -> Path:
    """start → s1 … sN → done, state i running `action: actions[i]` with the effects hooks.

    Output: acc (one per action that committed), by (pid of the last action's worker).
    """
    states: dict = {
        "start": {"type": "initial", "transitions": [{"to": "s1" if actions else "done"}]}
    }
    for i, action in enumerate(actions, 1):
        nxt = f"s{i + 1}" if i < len(actions) else "done"
        states[f"s{i}"] = {"hooks": "effects", "action": action, "transitions": [{"to": nxt}]}
    states["done"] = {
        "type": "final",
        "hooks": "effects",
        "output": {"acc": "context.acc", "by": "context.by"},
    }
    data: dict = {
        "name": name,
        "context": {
            "acc": 0,
            "sleep": "input.sleep",
            "crash_after": "input.crash_after",
            **(context or {}),
        },
        "states": states,
    }
    if checkpoint_on is not None:
        data["persistence"] = {"enabled": True, "backend": "memory", "checkpoint_on": checkpoint_on}
    return write_machine(path, {"spec": "flatmachine", "spec_version": "4.2.1", "data": data})
