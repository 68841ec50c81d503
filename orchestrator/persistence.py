"""flatmachines' persistence ABCs implemented on the store, fenced by a claim.

One ``FencedPersistence`` serves one claimed execution (and the inline children
that share its machine): every write carries the claim's fence and commits only
while the execution row still holds it, so a worker that lost its lease can
never overwrite the new owner's state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from flatmachines import ConfigStore, ExecutionLock, PersistenceBackend
from flatmachines.persistence import config_hash
from flatmachines.signals import Signal

from . import checks, timers
from .checks import context_within_limit
from .clock import utcnow
from .errors import LeaseLost, StoreUnavailable
from .store import CheckpointRow, Claim, Store
from .store.records import WaitEnd

log = logging.getLogger(__name__)

LATEST = "latest"

# Checkpoints taken before a state runs: progress markers for the timeline. If
# one is lost (a crash before the next durable commit), resume starts from the
# state_exit before it and runs the same state again, exactly as it would from
# the marker.
PROGRESS_EVENTS = frozenset({"machine_start", "state_enter", "execute"})

# How long a progress marker may wait for the next durable commit to carry it.
# A state that takes longer has its markers written on their own (without
# waiting for the disk), so the timeline shows what is running now.
DEFAULT_LINGER = 0.2


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

    Durability points (``state_exit``, ``waiting``, ``tool_call``, ...) commit
    before ``save`` returns. Progress markers wait, at most ``linger`` seconds,
    to ride in the next durable commit's transaction. The owner's last
    records, its final state's ``state_exit`` and ``machine_end``, wait for the
    runner, which commits them with the outcome (``take_pending``): nothing
    runs after a final state but that commit, so this is the final state's
    durability point. A crash before it runs the final state again. So a
    fast state costs one commit, not three.

    ``resume_snapshot`` lets the runner hand ``FlatMachine.execute(resume_from=)``
    a corrected latest snapshot without writing it (see runner.py).
    """

    def __init__(self, store: Store, claim: Claim, *, linger: float = DEFAULT_LINGER):
        self.store = store
        self.claim = claim
        self.linger = linger
        self._last_saved: dict[str, str] = {}
        self._pending: list[CheckpointRow] = []
        self._write_lock = asyncio.Lock()  # keeps row ids in save order
        self._timer: asyncio.TimerHandle | None = None
        self._flusher: asyncio.Task | None = None
        # the store's refusal (LeaseLost) or absence (StoreUnavailable) met by this
        # run: every later save raises it, so nothing more is written under the claim
        self.broken: LeaseLost | StoreUnavailable | None = None
        self.resume_snapshot: tuple[str, bytes] | None = None
        # the owner's final states: their state_exit commits with the outcome
        self.final_states: frozenset[str] = frozenset()
        # a wait that ended in this run: its signal is consumed (and the row
        # waits no more) with the next durable commit of its progress
        self._wait_end: WaitEnd | None = None

    @property
    def owner_id(self) -> str:
        return self.claim.execution.id

    async def save(self, key: str, value: bytes) -> None:
        if self.broken is not None:
            raise self.broken
        execution_id, name = split_key(key)
        if name == LATEST:
            target = bytes(value).decode("utf-8").strip()
            if self._last_saved.get(execution_id) == target:
                return  # already the newest row: the pointer is written with it
            snapshot = await self.load(target)
            if snapshot is None:
                raise ValueError(f"latest pointer names a missing snapshot: {target}")
            value, key = snapshot, target
        meta = json.loads(value)
        row = CheckpointRow(
            execution_id=execution_id,
            key=key,
            step=int(meta.get("step") or 0),
            event=str(meta.get("event") or "unknown"),
            state=meta.get("current_state"),
            snapshot=bytes(value),
            at=_taken_at(meta.get("created_at")),
        )
        await self.save_row(row)

    async def save_row(self, row: CheckpointRow) -> None:
        """``save`` of a snapshot whose metadata the caller has in hand (the
        runner's machine), without parsing it back out of the JSON. The
        library's ``latest`` pointer that follows it is then a no-op."""
        if self.broken is not None:
            raise self.broken
        limit = self.store.settings.max_context_bytes
        if len(row.snapshot) > limit:  # the context is inside it: only then measure it
            context_within_limit(json.loads(row.snapshot).get("context"), limit)
        execution_id, event = row.execution_id, row.event
        self._last_saved[execution_id] = row.key
        if execution_id == self.owner_id:
            self.resume_snapshot = None
        if event in PROGRESS_EVENTS or (
            execution_id == self.owner_id
            and (
                event in ("machine_end", "waiting")
                or (event == "state_exit" and row.state in self.final_states)
            )
        ):
            self._pending.append(row)
            if self._timer is None and self._flusher is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.linger, self._start_background_flush)
            return
        await self._write(durable=True, extra=row)

    async def take_pending(self) -> list[CheckpointRow]:
        """The rows not yet written, for the caller to commit with the outcome
        (after any write in flight, so row ids keep the save order)."""
        async with self._write_lock:
            return self._take()

    def wait_ended(self, signal_id: int | None) -> None:
        """The run's wait is over (a signal taken, or its time come)."""
        consumed = self._wait_end.consumed if self._wait_end else ()
        self._wait_end = WaitEnd(consumed + ((signal_id,) if signal_id is not None else ()))

    def take_wait_end(self) -> WaitEnd | None:
        """The ended wait, for the caller that commits the outcome or the park."""
        wait, self._wait_end = self._wait_end, None
        return wait

    def _take(self) -> list[CheckpointRow]:
        self._cancel_timer()
        rows, self._pending = self._pending, []
        return rows

    async def flush(self) -> None:
        """Write what is pending now (not durable: only progress markers wait)."""
        await self._write(durable=False)

    async def close(self) -> None:
        """Stop the background flush; anything still pending is dropped."""
        self._cancel_timer()
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except (asyncio.CancelledError, LeaseLost):
                pass
        self._pending.clear()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_background_flush(self) -> None:
        self._timer = None
        self._flusher = asyncio.get_running_loop().create_task(self._background_flush())

    async def _background_flush(self) -> None:
        try:
            await self._write(durable=False)
        except (LeaseLost, StoreUnavailable):
            pass  # broken, or the rows stay pending for the next commit (see _write)
        except Exception as exc:  # the rows stay pending: the next commit carries them
            log.warning("progress markers of %s not written yet: %s", self.owner_id, exc)
        finally:
            self._flusher = None
            if self._pending and self._timer is None:
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.linger, self._start_background_flush)

    async def _write(self, *, durable: bool, extra: CheckpointRow | None = None) -> None:
        async with self._write_lock:
            rows = self._take()
            if extra is not None:
                rows.append(extra)
            if not rows:
                return
            wait = self.take_wait_end() if durable else None
            try:
                await self.store.save_checkpoints(
                    owner_id=self.owner_id,
                    fence=self.claim.fence,
                    rows=rows,
                    durable=durable,
                    wait=wait,
                )
            except StoreUnavailable as exc:
                if durable or exc.uncertain:
                    # a state's progress is unknown to the store, or may be half
                    # known: this run stops here and resumes from what committed
                    self.broken = exc
                else:
                    self._pending[:0] = rows  # markers only: the next commit carries them
                raise
            except LeaseLost as exc:
                self.broken = exc  # the lease keeper cancels the run as well
                raise
            except BaseException:
                if not durable:
                    self._pending[:0] = rows  # not written: keep them for the next commit
                raise

    async def load(self, key: str) -> bytes | None:
        if self.broken is not None:
            raise self.broken
        async with self._write_lock:  # not between a write's take and its commit
            try:
                return await self._load(key)
            except StoreUnavailable as exc:
                self.broken = exc  # the machine cannot go on without what it asked for
                raise

    async def _load(self, key: str) -> bytes | None:
        execution_id, name = split_key(key)
        for row in reversed(self._pending):  # written to the store, as far as a reader knows
            if row.execution_id == execution_id and (name == LATEST or row.key == key):
                return row.key.encode("utf-8") if name == LATEST else row.snapshot
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
        await self.flush()
        if name != LATEST:
            await self.store.delete_checkpoints(execution_id, key)

    async def list_execution_ids(
        self, *, event: str | None = None, waiting_channel: str | None = None
    ) -> list[str]:
        await self.flush()
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
        await self.flush()
        await self.store.delete_checkpoints(execution_id)

    async def prune(
        self, *, max_age_seconds: float | None = None, max_count: int | None = None
    ) -> int:
        # finished executions only, each whole: what that means here is in retention.py
        return await self.store.prune_checkpoint_sets(
            max_age_seconds=max_age_seconds, max_count=max_count
        )


def _taken_at(raw: object) -> datetime | None:
    """The snapshot's own ISO timestamp as naive UTC (the store's convention)."""
    if not isinstance(raw, str):
        return None
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return at.astimezone(UTC).replace(tzinfo=None) if at.tzinfo else at


class StoreSignals:
    """flatmachines' ``SignalBackend`` for one claimed run, on the store.

    ``consume`` takes a signal under the run's claim; it is consumed when the
    wait state's progress commits (so a crash in between loses neither). A
    timer channel (``sleep:`` / ``until:``, see timers.py) yields its wake-up
    once its time has come; a signal wait whose deadline (the state's
    ``timeout``) has passed yields ``{"timed_out": true}``, unless a signal was
    sent before the deadline.
    """

    def __init__(self, store: Store, claim: Claim, persistence: FencedPersistence):
        self.store = store
        self.claim = claim
        self.persistence = persistence

    async def consume(self, channel: str) -> Signal | None:
        checks.channel(channel)  # a rendered channel the store cannot hold is the state's error
        ex = self.claim.execution
        now = utcnow()
        # the wake-up time of the wait this run resumes, if it parked on this channel
        wake = ex.wake_at if ex.waiting_channel == channel else None
        if timers.is_timer(channel):
            timers.wake_time(channel, now)  # a bad timer is the state's error
            if not timers.due(wake, now):
                return None
            self.persistence.wait_ended(None)
            return Signal(f"timer:{ex.id}", channel, {"woke_at": _iso(wake)}, _iso(now))
        late = timers.due(wake, now)
        try:
            record = await self.store.reserve_signal(
                ex.id, self.claim.fence, channel, sent_by=wake if late else None
            )
        except (LeaseLost, StoreUnavailable) as exc:
            self.persistence.broken = exc
            raise
        if record is not None:
            self.persistence.wait_ended(record.id)
            return Signal(str(record.id), channel, record.data, _iso(record.created_at))
        if late:
            self.persistence.wait_ended(None)
            return Signal(f"deadline:{ex.id}", channel, {"timed_out": True}, _iso(now))
        return None

    async def send(self, channel: str, data: Any) -> str:
        checks.channel(channel)
        checks.signal_data(data, self.store.settings.max_signal_bytes)
        signal_id, _ = await self.store.send_signal(channel, data)
        return str(signal_id)

    async def peek(self, channel: str) -> list[Signal]:
        return [
            Signal(str(r.id), r.channel, r.data, _iso(r.created_at))
            for r in await self.store.pending_signals(channel)
        ]

    async def channels(self) -> list[str]:
        return await self.store.signal_channels()


def _iso(at: datetime | None) -> str:
    return at.replace(tzinfo=UTC).isoformat() if at is not None else ""


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
        if time.monotonic() - self.claim.taken_at < self.store.settings.lease_ttl / 3:
            # taken moments ago and no renewal due yet: the fence holds, and
            # every write checks it again anyway
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


__all__ = ["FencedPersistence", "FencedLock", "StoreConfigStore", "StoreSignals", "split_key"]
