"""Hooks for the example workflows: `orch worker --app examples.app`.

One registry serves every example: counter.yml, etl.yml, coordinator.yml
(and its child), approval.yml (no hooks: it waits for a signal) and
agent/triage.yml. ``agent_adapters`` answers the triage agent offline when no
LLM backend or endpoint is configured (see agent/triage.yml).
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from flatmachines import HooksRegistry, MachineHooks
from flatmachines.agents import AgentResult

from orchestrator import idempotency_key


class CounterHooks(MachineHooks):
    """`action: add` adds context.n to context.acc."""

    def on_action(self, state_name, action_name, context):
        if action_name == "add":
            context["acc"] = int(context.get("acc") or 0) + int(context.get("n") or 1)
        return context


class EtlHooks(MachineHooks):
    def on_action(self, state_name, action_name, context):
        if action_name == "extract":
            count = int(context.get("rows") or 10)
            context["records"] = [
                {"id": i, "name": f"  item {i} ", "price_cents": 100 * i + 99} for i in range(count)
            ]
        elif action_name == "transform":
            context["records"] = [
                {"id": r["id"], "name": r["name"].strip().title(), "price": r["price_cents"] / 100}
                for r in context["records"]
            ]
        elif action_name == "load":
            context["loaded"] = load(context)
        return context


def load(context: dict[str, Any]) -> int:
    """Write the records under the state's idempotency key: a second run of this
    state (after a crash before its checkpoint) writes each row once."""
    key = idempotency_key(context)
    pace = float(context.get("pace") or 0)
    db = sqlite3.connect(Path(context.get("target") or "etl-out.sqlite"), timeout=30)
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS items (load_key TEXT, id INTEGER, name TEXT,"
            " price REAL, PRIMARY KEY (load_key, id))"
        )
        for r in context["records"]:
            db.execute(
                "INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?)",
                (key, r["id"], r["name"], r["price"]),
            )
            db.commit()
            if pace:
                time.sleep(pace)
        return db.execute("SELECT count(*) FROM items WHERE load_key = ?", (key,)).fetchone()[0]
    finally:
        db.close()


class CoordinatorHooks(MachineHooks):
    def on_action(self, state_name, action_name, context):
        if action_name == "fetch":
            size = int(context.get("batch_size") or 3)
            pending = list(context.get("pending") or [])
            context["batch"], context["pending"] = pending[:size], pending[size:]
        elif action_name == "record":
            for result in context.get("results") or []:
                if isinstance(result, dict) and "_error" in result:
                    context["failed"] = [*context["failed"], result["_error"]]
                else:
                    context["done"] = [*context["done"], result["text"]]
        elif action_name == "shout":
            if context["text"] == "bad":
                raise ValueError("refused: 'bad' is not work")
            context["text"] = context["text"].upper()
        return context


class TriageHooks(MachineHooks):
    TEAMS = {"outage": "on-call", "billing": "finance", "question": "support"}

    def on_action(self, state_name, action_name, context):
        if action_name == "route":
            context["team"] = self.TEAMS.get(str(context.get("category")), "support")
        return context


hooks_registry = HooksRegistry()
hooks_registry.register("counter", CounterHooks)
hooks_registry.register("etl", EtlHooks)
hooks_registry.register("coordinator", CoordinatorHooks)
hooks_registry.register("triage", TriageHooks)


# ------------------------------------------------------------- the LLM, offline


class OfflineClassifier:
    """Stands in for the LLM: classifies by keywords, the same way every time."""

    async def execute(self, input_data, context=None, session_id=None) -> AgentResult:
        text = str(input_data.get("ticket", "")).lower()
        if any(w in text for w in ("down", "outage", "error", "cannot")):
            output = {"category": "outage", "urgent": True}
        elif any(w in text for w in ("invoice", "charge", "refund", "bill")):
            output = {"category": "billing", "urgent": False}
        else:
            output = {"category": "question", "urgent": False}
        calls = os.environ.get("ORCH_EXAMPLE_AGENT_CALLS")  # tests count the calls
        if calls:
            with open(calls, "a") as f:
                f.write(f"{(context or {}).get('machine', {}).get('execution_id')}\n")
        return AgentResult(output=output, content=None, finish_reason="stop")

    async def execute_with_tools(self, *args, **kwargs) -> AgentResult:
        raise NotImplementedError("the offline classifier has no tools")

    @property
    def metadata(self) -> dict[str, Any]:
        return {"offline": True}


class OfflineAgents:
    """An agent adapter (flatmachines' "flatagent" type) for running offline."""

    type_name = "flatagent"

    def create_executor(self, *, agent_name, agent_ref, context):
        return OfflineClassifier()


def llm_configured() -> bool:
    has_backend = importlib.util.find_spec("litellm") is not None
    has_endpoint = bool(os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_KEY"))
    return has_backend and has_endpoint


agent_adapters = [] if llm_configured() else [OfflineAgents()]
