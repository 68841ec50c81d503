"""flatmachines' persistence ABCs implemented on the store, fenced by a claim.

One ``FencedPersistence`` serves one claimed execution (and the inline children
that share its machine): every write carries the claim's fence and commits only
while the execution row still holds it, so a worker that lost its lease can
never overwrite the new owner's state.
"""

from __future__ import annotations

import json

from flatmachines import ConfigStore, ExecutionLock, PersistenceBackend
from flatmachines.persistence import config_hash

from .store import Claim, Store

LATEST = "latest"

# Checkpoints taken before a state runs: progress markers for the timeline. If
# one is lost in a power cut, resume starts from the state_exit before it and
# runs the same state again, exactly as it would from the marker.
PROGRESS_EVENTS = frozenset({"machine_start", "state_enter", "execute"})


def split_key(key: str) -> tuple[str, str]:
    """'<execution id>/<name>' -> (execution id, name)."""
    execution_id, _, name = key.rpartition("/")
    if not execution_id or not name:
        raise ValueError(f"invalid checkpoint key: {key!r}")
    return execution_id, name


class FencedPersistence(PersistenceBackend):
    """Checkpoints in the shared store, written under a claim's fence.

    The library saves a snapshot and then its ``<id>/latest`` pointer. Here the
    snapshot row *is* the pointer (latest = newest row of the execution), so
    the pair commits in one transaction and the pointer save costs nothing.

    ``resume_snapshot`` lets the runner hand ``FlatMachine.execute(resume_from=)``
    a corrected latest snapshot without writing it (see runner.py).
    """

    def __init__(self, store: Store, claim: Claim):
        self.store = store
        self.claim = claim
        self._last_saved: dict[str, str] = {}
        self.resume_snapshot: tuple[str, bytes] | None = None

    @property
    def owner_id(self) -> str:
        return self.claim.execution.id

    async def save(self, key: str, value: bytes) -> None:
        execution_id, name = split_key(key)
        if name == LATEST:
            target = bytes(value).decode("utf-8").strip()
            if self._last_saved.get(execution_id) == target:
                return  # already the newest row: the pointer committed with it
            snapshot = await self.store.load_checkpoint(split_key(target)[0], target)
            if snapshot is None:
                raise ValueError(f"latest pointer names a missing snapshot: {target}")
            value, key = snapshot, target
        meta = json.loads(value)
        event = str(meta.get("event") or "unknown")
        await self.store.save_checkpoint(
            owner_id=self.owner_id,
            fence=self.claim.fence,
            execution_id=execution_id,
            key=key,
            step=int(meta.get("step") or 0),
            event=event,
            state=meta.get("current_state"),
            snapshot=bytes(value),
            durable=event not in PROGRESS_EVENTS,
        )
        self._last_saved[execution_id] = key
        if execution_id == self.owner_id:
            self.resume_snapshot = None

    async def load(self, key: str) -> bytes | None:
        execution_id, name = split_key(key)
        if self.resume_snapshot is not None and execution_id == self.owner_id:
            resume_key, resume_bytes = self.resume_snapshot
            if name == LATEST:
                return resume_key.encode("utf-8")
            if key == resume_key:
                return resume_bytes
        if name == LATEST:
            latest = await self.store.latest_checkpoint(execution_id)
            return latest[0].encode("utf-8") if latest else None
        return await self.store.load_checkpoint(execution_id, key)

    async def delete(self, key: str) -> None:
        execution_id, name = split_key(key)
        if name != LATEST:
            await self.store.delete_checkpoints(execution_id, key)

    async def list_execution_ids(
        self, *, event: str | None = None, waiting_channel: str | None = None
    ) -> list[str]:
        out = []
        for execution_id, raw in await self.store.latest_snapshot_ids():
            if event is None and waiting_channel is None:
                out.append(execution_id)
                continue
            snap = json.loads(raw)
            if event is not None and snap.get("event") != event:
                continue
            if waiting_channel is not None and snap.get("waiting_channel") != waiting_channel:
                continue
            out.append(execution_id)
        return out

    async def delete_execution(self, execution_id: str) -> None:
        await self.store.delete_checkpoints(execution_id)


class FencedLock(ExecutionLock):
    """The claim is the lock: acquiring succeeds while the claim's fence holds.

    Inline children (other execution ids) run under their parent's claim.
    """

    def __init__(self, store: Store, claim: Claim):
        self.store = store
        self.claim = claim

    async def acquire(self, key: str) -> bool:
        if key != self.claim.execution.id:
            return True
        return await self.store.holds_fence(key, self.claim.fence)

    async def release(self, key: str) -> None:
        # The lease is given up by the worker when it records the outcome.
        return None


class StoreConfigStore(ConfigStore):
    """Machine configs by content hash, in the shared store."""

    def __init__(self, store: Store):
        self.store = store

    async def put(self, raw: str) -> str:
        return await self.store.put_config(config_hash(raw), _machine_name(raw), raw)

    async def get(self, hash_key: str) -> str | None:
        return await self.store.get_config(hash_key)

    async def delete(self, hash_key: str) -> None:
        await self.store.delete_config(hash_key)


def _machine_name(raw: str) -> str:
    import yaml

    try:
        data = (yaml.safe_load(raw) or {}).get("data") or {}
        return str(data.get("name") or "unnamed-machine")
    except Exception:
        return "unnamed-machine"


__all__ = ["FencedPersistence", "FencedLock", "StoreConfigStore", "split_key"]
