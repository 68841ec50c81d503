"""The README's screenshot of `orch tui`, made from a seeded store so it stays true.

    python -m tui.screenshot docs/tui.svg

``seed`` is also the tests' store: a few workers, queues and executions in
every status, written at a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from orchestrator import Orchestrator
from orchestrator.settings import Settings
from orchestrator.store import CheckpointRow

SEEDED_AT = datetime(2026, 3, 2, 9, 30, 0)

APPROVAL = {
    "spec": "flatmachine",
    "spec_version": "4.2.1",
    "data": {
        "name": "approval",
        "context": {"request": "input.request"},
        "states": {
            "start": {"type": "initial", "transitions": [{"to": "ask"}]},
            "ask": {
                "wait_for": "approval/{{ context.machine.execution_id }}",
                "transitions": [{"to": "done"}],
            },
            "done": {"type": "final", "output": {"request": "context.request"}},
        },
    },
}

PIPELINE = {
    "spec": "flatmachine",
    "spec_version": "4.2.1",
    "data": {
        "name": "pipeline",
        "context": {"doc": "input.doc"},
        "states": {
            "start": {"type": "initial", "transitions": [{"to": "done"}]},
            "done": {"type": "final", "output": {"doc": "context.doc"}},
        },
    },
}


def timeline(ex_id: str, context: dict, state: str, more: list[str]) -> list[CheckpointRow]:
    """Checkpoints as a run writes them: machine_start, then ``state``'s markers."""
    rows = []
    events = [("machine_start", "start", 0)] + [
        (event, state, 1) for event in ("state_enter", "execute", *more)
    ]
    for event, at_state, step in events:
        snapshot = {
            "execution_id": ex_id,
            "machine_name": "seeded",
            "spec_version": "4.2.1",
            "current_state": at_state,
            "context": context,
            "step": step,
            "event": event,
        }
        rows.append(
            CheckpointRow(
                ex_id,
                f"{ex_id}/step_{step:06d}_{event}.json",
                step,
                event,
                at_state,
                json.dumps(snapshot).encode(),
            )
        )
    return rows


async def seed(orch: Orchestrator) -> None:
    """Two queues with a pool policy, two workers, and executions in every status."""
    store = orch.store
    await orch.scale("default", min_workers=1, max_workers=4, create=True)
    await orch.scale("llm", min_workers=0, max_workers=8, create=True)
    await store.register_worker(
        "w-alpha", host="host-a", pid=101, queue_names=["default"], concurrency=4
    )
    await store.register_worker(
        "w-beta", host="host-b", pid=202, queue_names=["llm"], concurrency=8
    )
    # claimed in priority order: doc-0 runs on w-alpha, doc-1 fails, ask-1 waits,
    # doc-2 stays queued, llm-1 is cancelled
    for i, priority in ((0, 9), (1, 8), (2, 0)):
        await orch.submit(PIPELINE, {"doc": i}, id=f"doc-{i}", queue="default", priority=priority)
    await orch.submit(APPROVAL, {"request": "ship"}, id="ask-1", queue="default", priority=7)
    await orch.submit(PIPELINE, {"doc": 9}, id="llm-1", queue="llm")
    running = await store.claim("w-alpha", ["default"])
    failing = await store.claim("w-alpha", ["default"])
    waiting = await store.claim("w-alpha", ["default"])
    assert [c.execution.id for c in (running, failing, waiting)] == ["doc-0", "doc-1", "ask-1"]
    await store.save_checkpoints(
        owner_id="doc-0", fence=running.fence, rows=timeline("doc-0", {"doc": 0}, "done", [])
    )
    await store.finish(
        failing,
        status="failed",
        error="RuntimeError: the model said no",
        checkpoints=timeline("doc-1", {"doc": 1}, "done", []),
    )
    await store.park(
        waiting,
        channel="approval/ask-1",
        wake_at=None,
        checkpoints=timeline("ask-1", {"request": "ship"}, "ask", ["waiting"]),
    )
    await orch.cancel("llm-1", reason="not needed")


async def shoot(path: Path) -> None:
    from freezegun import freeze_time

    from .app import OrchApp

    with tempfile.TemporaryDirectory() as tmp, freeze_time(SEEDED_AT, real_asyncio=True):
        settings = Settings(database_url=f"sqlite:///{tmp}/orch.sqlite")
        async with Orchestrator(settings=settings) as orch:
            await seed(orch)
        app = OrchApp(settings)
        async with app.run_test(size=(120, 32)) as pilot:
            await pilot.pause(1.5)
            app.save_screenshot(filename=path.name, path=str(path.parent))


def main() -> None:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/tui.svg")
    target.parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(shoot(target))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
