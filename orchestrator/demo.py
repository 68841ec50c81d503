"""`orch demo`: what the orchestrator is for, in about a minute, on a fresh SQLite file.

It starts `orch up` (the leader scheduler and a pool of worker processes),
submits a batch across the examples, kills a worker in the middle of an ETL
load and shows the execution resuming on another worker from its last
committed state, sends the approval signal the approval example waits for,
and ends with a table of what ran where. Everything it started is stopped
before it exits (Ctrl-C included).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from .api import Orchestrator
from .pool import owner_only
from .schemas import Execution
from .supervise import die_with_parent

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TTL = 4.0  # a short lease, so the demo's story fits in a minute


@dataclass
class Seen:
    """What the demo saw of one execution while it ran."""

    workflow: str
    workers: list[str] = field(default_factory=list)
    resumed_at: str | None = None


def batch(target: Path) -> list[tuple[str, str, dict]]:
    """(id, workflow file, input) of the demo's executions."""
    return [
        ("etl-1", "etl.yml", {"rows": 12, "target": str(target), "pace": 0.4}),
        ("etl-2", "etl.yml", {"rows": 6, "target": str(target), "pace": 0.1}),
        ("coordinator", "coordinator.yml", {"items": ["a", "b", "bad", "c", "d", "e"], "batch": 3}),
        ("approval", "approval.yml", {"request": "ship the demo"}),
        ("triage-1", "agent/triage.yml", {"ticket": "The site is down!"}),
        ("triage-2", "agent/triage.yml", {"ticket": "Why was I charged twice on my invoice?"}),
        ("counter-1", "counter.yml", {"n": 1}),
        ("counter-2", "counter.yml", {"n": 2}),
        ("counter-3", "counter.yml", {"n": 3}),
    ]


class Demo:
    def __init__(self, directory: Path, console: Console):
        self.dir = directory
        self.console = console
        self.url = f"sqlite:///{directory / 'orch.sqlite'}"
        self.up: subprocess.Popen | None = None
        self.seen: dict[str, Seen] = {}
        self.killed: tuple[int, str] | None = None  # (pid, execution id)

    def say(self, text: str) -> None:
        self.console.print(text, highlight=False)

    # -------------------------------------------------------------- the pool

    def start_pool(self) -> None:
        env = dict(
            os.environ,
            ORCH_DATABASE_URL=self.url,
            ORCH_LEASE_TTL=str(TTL),
            ORCH_POLL_INTERVAL="0.2",
            PYTHONPATH=os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]),
        )
        cmd = [sys.executable, "-m", "orchestrator.cli", "up", "--app", "examples.app"]
        cmd += [
            "--min",
            "2",
            "--max",
            "3",
            "--concurrency",
            "2",
            "--log-dir",
            str(self.dir / "logs"),
        ]
        log = open(self.dir / "up.log", "ab", opener=owner_only)
        self.up = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            preexec_fn=die_with_parent,
        )
        log.close()

    def stop_pool(self) -> None:
        if self.up is None or self.up.poll() is not None:
            return
        self.up.send_signal(signal.SIGTERM)  # it drains its workers, then exits
        try:
            self.up.wait(90)
        except subprocess.TimeoutExpired:
            self.up.kill()
            self.up.wait()

    # ------------------------------------------------------------------ run

    async def run(self) -> int:
        self.say(f"[bold]flatorch demo[/] in {self.dir} (a fresh SQLite store)")
        self.start_pool()
        async with Orchestrator(self.url, lease_ttl=TTL) as orch:
            self.say("started [bold]orch up[/]: the leader scheduler and a pool of 2-3 workers")
            await self.wait_for_workers(orch, 2)
            for ex_id, workflow, data in batch(self.dir / "etl-out.sqlite"):
                await orch.submit(EXAMPLES / workflow, data, id=ex_id)
                self.seen[ex_id] = Seen(workflow)
            self.say(f"submitted {len(self.seen)} executions across the examples")
            await self.follow(orch)
            self.summary(await asyncio.gather(*(orch.get(i) for i in self.seen)))
        self.say("stopping the pool (each worker drains) ...")
        self.stop_pool()
        self.say("[green]done[/]: every process the demo started has exited")
        return 0

    async def wait_for_workers(self, orch: Orchestrator, n: int) -> None:
        while len([w for w in await orch.workers() if w.status == "active"]) < n:
            if self.up is not None and self.up.poll() is not None:
                raise RuntimeError(
                    f"orch up exited ({self.up.returncode}); see {self.dir / 'up.log'}"
                )
            await asyncio.sleep(0.2)

    async def follow(self, orch: Orchestrator) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task("running", total=len(self.seen))
            signalled = False
            while True:
                rows = {i: await orch.get(i) for i in self.seen}
                pids = {w.id: w.pid for w in await orch.workers()}
                for ex_id, ex in rows.items():
                    await self.observe(orch, ex_id, ex, pids)
                if not signalled and rows["approval"].status == "waiting":
                    sent = await orch.signal("approval/approval", {"ok": True, "by": "the demo"})
                    self.say(f"✉  sent the approval signal: taken by {', '.join(sent.woken)}")
                    signalled = True
                done = sum(1 for ex in rows.values() if ex.is_final)
                bar.update(task, completed=done)
                if done == len(rows):
                    return
                await asyncio.sleep(0.2)

    async def observe(self, orch: Orchestrator, ex_id: str, ex: Execution, pids: dict) -> None:
        seen = self.seen[ex_id]
        if ex.worker_id and (not seen.workers or seen.workers[-1] != ex.worker_id):
            seen.workers.append(ex.worker_id)
            if self.killed and self.killed[1] == ex_id and len(seen.workers) > 1:
                seen.resumed_at = f"step {ex.step}, state {ex.current_state}"
                self.say(
                    f"↻  [bold]{ex_id}[/] resumed on worker pid {pids.get(ex.worker_id, '?')} "
                    f"at {seen.resumed_at}: the steps that committed do not run again"
                )
        if (
            self.killed is None
            and ex_id == "etl-1"
            and ex.status == "running"
            and ex.current_state == "load"
            and ex.worker_id in pids
        ):
            pid = pids[ex.worker_id]
            history = (await orch.get(ex_id, detail=True)).history or []
            committed = [h for h in history if h.event == "state_exit"]
            last = committed[-1] if committed else None
            os.kill(pid, signal.SIGKILL)
            self.killed = (pid, ex_id)
            self.say(
                f"💥 SIGKILLed worker pid {pid} in the middle of [bold]{ex_id}[/]'s load "
                f"(its last committed state: {last.state if last else 'none'} at step "
                f"{last.step if last else 0})"
            )

    def summary(self, rows: list[Execution]) -> None:
        table = Table(title="what ran where")
        for col in ("execution", "workflow", "status", "workers", "recoveries", "output"):
            table.add_column(col)
        for ex in rows:
            seen = self.seen[ex.id]
            output = json.dumps(ex.output) if ex.output is not None else ""
            table.add_row(
                ex.id,
                seen.workflow,
                ex.status,
                " → ".join(w.rsplit("-", 2)[-2] for w in seen.workers),  # by pid
                str(ex.recoveries),
                output if len(output) <= 60 else output[:57] + "...",
            )
        self.console.print(table)


def run_demo(directory: Path | None) -> int:
    import tempfile

    console = Console()
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="orch-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    demo = Demo(directory.resolve(), console)
    try:
        return asyncio.run(demo.run())
    except KeyboardInterrupt:
        console.print("interrupted: stopping the pool ...")
        return 130
    finally:
        demo.stop_pool()
