"""`orch worker --processes N`: N worker processes under one supervisor.

Prefork, as Celery and gunicorn do: the command starts N `orch worker`
processes and watches them. A child that dies is started again after a
backoff that doubles (0.5 s up to 30 s, back to 0.5 s once a child has lived a
minute). SIGTERM or SIGINT is passed to every child, each drains as on its own
SIGTERM, and the supervisor exits 0 when they have. A child never outlives the
supervisor: it gets SIGTERM the moment the supervisor dies, SIGKILL included
(supervise.py), and drains.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import stopsignal
from .supervise import die_with_parent

log = logging.getLogger("orchestrator.prefork")

FIRST_BACKOFF, MAX_BACKOFF, HEALTHY_AFTER = 0.5, 30.0, 60.0


@dataclass
class Slot:
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float = 0.0
    done: bool = False  # a --burst child that finished its work
    history: list[int] = field(default_factory=list)  # pids it has had


class Supervisor:
    def __init__(self, worker_args: list[str], processes: int, *, burst: bool, env: dict):
        self.cmd = [sys.executable, "-m", "orchestrator.cli", "worker", *worker_args]
        self.slots = [Slot() for _ in range(processes)]
        self.burst = burst
        self.env = env
        self.stopping = False

    def start(self, slot: Slot) -> None:
        slot.proc = subprocess.Popen(self.cmd, env=self.env, preexec_fn=die_with_parent)
        slot.started = time.monotonic()
        slot.history.append(slot.proc.pid)
        log.info("started worker process pid %d", slot.proc.pid)

    def stop(self, *_: object) -> None:
        if self.stopping:  # a second signal: the children release at once
            self._signal_all(signal.SIGTERM)
            return
        self.stopping = True
        log.info("draining %d worker processes", sum(1 for s in self.slots if s.proc))
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(sig)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        if stopsignal.received():  # a stop that came while the command started
            return 0
        for slot in self.slots:
            self.start(slot)
        while True:
            now = time.monotonic()
            for slot in self.slots:
                proc = slot.proc
                if proc is not None and proc.poll() is not None:
                    code = proc.returncode
                    slot.proc = None
                    if self.stopping or (self.burst and code == 0):
                        slot.done = True
                        continue
                    lived = now - slot.started
                    slot.backoff = FIRST_BACKOFF if lived > HEALTHY_AFTER else slot.backoff
                    slot.restart_at = now + slot.backoff
                    log.warning(
                        "worker process pid %d exited with %s; a new one in %.1fs",
                        proc.pid,
                        code,
                        slot.backoff,
                    )
                    slot.backoff = min(slot.backoff * 2, MAX_BACKOFF)
                if (
                    slot.proc is None
                    and not slot.done
                    and not self.stopping
                    and now >= slot.restart_at
                ):
                    self.start(slot)
            if all(s.proc is None for s in self.slots) and (
                self.stopping or all(s.done for s in self.slots)
            ):
                log.info("all worker processes have exited")
                return 0
            time.sleep(0.2)


def supervise(worker_args: list[str], processes: int, *, burst: bool, database_url: str) -> int:
    env = dict(os.environ, ORCH_DATABASE_URL=database_url)
    return Supervisor(worker_args, processes, burst=burst, env=env).run()
