"""Local worker processes for the autoscaler: start, track, stop."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .supervise import die_with_parent

log = logging.getLogger(__name__)


def owner_only(path: str, flags: int) -> int:
    """An ``open`` opener: a file it creates is readable by its owner alone (a
    worker's log holds its inputs' names, its errors and tracebacks)."""
    return os.open(path, flags, 0o600)


@dataclass
class Spawned:
    proc: subprocess.Popen
    queue: str
    log_path: Path
    started: float


class LocalPool:
    """Starts `orch worker` subprocesses, one log file each under ``log_dir``."""

    def __init__(
        self,
        *,
        database_url: str,
        app: str | None,
        log_dir: Path,
        concurrency: int = 1,
        lease_ttl: float | None = None,
    ):
        self.database_url = database_url
        self.app = app
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.lease_ttl = lease_ttl
        self.children: dict[int, Spawned] = {}
        self._n = 0

    def spawn(self, queue: str) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._n += 1
        log_path = self.log_dir / f"worker-{os.getpid()}-{self._n}.log"
        cmd = [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "worker",
            "--queue",
            queue,
            "--concurrency",
            str(self.concurrency),
        ]
        if self.app:
            cmd += ["--app", self.app]
        env = dict(os.environ, ORCH_DATABASE_URL=self.database_url)
        if self.lease_ttl is not None:
            env["ORCH_LEASE_TTL"] = str(self.lease_ttl)
        with open(log_path, "ab", opener=owner_only) as out:
            # own session: a Ctrl-C at the terminal reaches the pool through
            # `orch up`, which drains its workers in order
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,  # a pool never outlives its scheduler
            )
        self.children[proc.pid] = Spawned(proc, queue, log_path, time.monotonic())
        log.info("started worker pid %d for queue '%s' (log %s)", proc.pid, queue, log_path)
        return proc.pid

    def reap(self) -> list[tuple[int, int]]:
        """Forget children that exited; returns (pid, exit code) of each."""
        gone = [
            (pid, c.proc.returncode)
            for pid, c in self.children.items()
            if c.proc.poll() is not None
        ]
        for pid, code in gone:
            self.children.pop(pid)
            log.log(
                logging.INFO if code == 0 else logging.WARNING,
                "worker pid %d exited with %s",
                pid,
                code,
            )
        return gone

    def pending(self, queue: str, registered_pids: set[int], grace: float = 30.0) -> int:
        """Children started for ``queue`` that have not registered yet."""
        now = time.monotonic()
        return sum(
            1
            for pid, c in self.children.items()
            if c.queue == queue
            and pid not in registered_pids
            and c.proc.poll() is None
            and now - c.started < grace
        )

    def stop_all(self, timeout: float = 60.0) -> None:
        """SIGTERM every child (each drains), wait, SIGKILL what outlives ``timeout``."""
        for c in self.children.values():
            if c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for c in self.children.values():
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not drain in time; killing it", c.proc.pid)
                c.proc.kill()
                c.proc.wait()
        self.children.clear()
