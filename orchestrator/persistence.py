"""flatmachines' persistence ABCs implemented on the store, fenced by a claim.

One ``FencedPersistence`` serves one claimed execution (and the inline children
that share its machine): every write carries the claim's fence and commits only
while the execution row still holds it, so a worker that lost its lease can
never overwrite the new owner's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flatmachines import ConfigStore, ExecutionLock, PersistenceBackend
from flatmachines.persistence import MachineSnapshot, config_hash
from flatmachines.signals import Signal

from . import checks, timers
from .checks import context_within_limit, json_size
from .clock import utcnow
from .errors import LeaseLost, StoreUnavailable
from .store import CheckpointRow, Claim, Store, snapshots
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

# the snapshot fields a save compares when its context is known unchanged
_HEADER_ONLY = tuple(f.name for f in dataclasses.fields(MachineSnapshot) if f.name != "context")


# the last part of a key: 'latest', 'step_000003_state_exit.json'
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
KEY_RULE = (
    "a checkpoint key is '<execution id>/<name>': the name of letters, digits, '_', '.' "
    "and '-' (such as 'step_000003_state_exit.json' or 'latest'), the execution id of at "
    f"most {checks.ID_LENGTH} characters, with {checks.ID_RULE}"
)


def split_key(key: str) -> tuple[str, str]:
    """'<execution id>/<name>' -> (execution id, name); ValueError naming the
    rule for any other key (a path such as '../etc/passwd' is none)."""
    if not isinstance(key, str):
        raise ValueError(f"invalid checkpoint key {key!r}: {KEY_RULE}")
    execution_id, _, name = key.rpartition("/")
    if (
        not execution_id
        or len(execution_id) > checks.ID_LENGTH
        or not _NAME.fullmatch(name)
        or checks.unsafe_id(execution_id)
    ):
        raise ValueError(f"invalid checkpoint key {key!r}: {KEY_RULE}")
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
        # each execution's last stored row, to store the next as what changed
        self._chains: dict[str, snapshots.Chain] = {}
        self._sizes: dict[str, int] = {}  # a running estimate of each context's size
        # the workflow's history window: durable checkpoints a running execution keeps
        self.history: int | None = None
        self._durable_since_trim = 2**31  # the run's first durable commit trims
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
            if split_key(target)[0] != execution_id:
                raise ValueError(
                    f"{key} names {target!r}, a snapshot of another execution: "
                    "a latest pointer names one of its own execution's snapshots"
                )
            snapshot = await self.load(target)
            if snapshot is None:
                raise ValueError(
                    f"{key} names {target}, which is not saved: in this store the latest "
                    "snapshot is the one saved last, not a pointer of its own, so the "
                    "pointer can only name a saved snapshot (save it first)"
                )
            value, key = snapshot, target  # saved again: it is the newest now
        doc = json.loads(value)
        if not isinstance(doc, dict):
            raise ValueError(f"a snapshot is a JSON object, not {type(doc).__name__}: {key}")
        await self.save_doc(
            execution_id=execution_id,
            key=key,
            step=int(doc.get("step") or 0),
            event=str(doc.get("event") or "unknown"),
            state=doc.get("current_state"),
            at=_taken_at(doc.get("created_at")),
            doc=doc,
        )

    async def save_doc(
        self,
        *,
        execution_id: str,
        key: str,
        step: int,
        event: str,
        state: str | None,
        at: datetime | None,
        doc: dict[str, Any],
        same_context: bool = False,
    ) -> None:
        """``save`` of a snapshot as the document it is (the runner's machine
        hands over its fields, the live context among them, without encoding
        them): stored as what changed since this execution's last row
        (store/snapshots.py). ``same_context``: the caller knows the context
        is the one of the last save, unchanged. The library's ``latest``
        pointer that follows it is then a no-op."""
        if self.broken is not None:
            raise self.broken
        chain = self._chains.pop(execution_id, None)  # spent if anything below fails
        stored = snapshots.encode_plain(doc) if chain is None else None
        if stored is not None and stored.raw > self.store.settings.max_context_bytes:
            context_within_limit(doc.get("context"), self.store.settings.max_context_bytes)
        if stored is None:  # not short (or never was): what changed since the last row
            only = _HEADER_ONLY if same_context and chain is not None else None
            row_fields = snapshots.row_fields(step, event, at)
            stored, chain = snapshots.encode(chain, doc, only=only, row=row_fields)
            self._within_limit(execution_id, chain, stored, doc)
            self._chains[execution_id] = chain
        row = CheckpointRow(
            execution_id=execution_id,
            key=key,
            step=step,
            event=event,
            state=state,
            snapshot=stored.body,
            at=at,
            delta=stored.delta,
            blobs=stored.blobs,
        )
        await self._save(row)

    def _within_limit(
        self, execution_id: str, chain: snapshots.Chain, stored: snapshots.Stored, doc: dict
    ) -> None:
        """ORCH_MAX_CONTEXT_BYTES, measured only once a running estimate (what
        the rows added) passes it."""
        limit = self.store.settings.max_context_bytes
        added = stored.raw + sum(b.size for b in stored.blobs)
        est = added if stored.delta == snapshots.FULL else self._sizes.get(execution_id, 0) + added
        if stored.delta == snapshots.FULL:
            est += sum(len(t) for t in chain.hashes)
        if est > limit:
            context_within_limit(doc.get("context"), limit)
            est = json_size(doc.get("context"))
        self._sizes[execution_id] = est

    def adopt(self, execution_id: str, decoded: snapshots.Decoded) -> None:
        """The execution's last stored row, read back (a resume): the next
        row stores what changed since it."""
        if decoded.full_bytes + decoded.delta_bytes > snapshots.PLAIN_MAX:
            self._chains[execution_id] = snapshots.chain_of(decoded)
        # else a short one: the next row is stored whole again, if it is short

    async def _save(self, row: CheckpointRow) -> None:
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

    async def _trim(self, rows: list[CheckpointRow]) -> None:
        """A workflow's history window (``settings.history``): once in a while
        (and at a run's first durable commit), the owner's checkpoints before
        its last ``history`` durable ones go."""
        assert self.history is not None
        self._durable_since_trim += sum(
            1 for r in rows if r.execution_id == self.owner_id and r.event not in PROGRESS_EVENTS
        )
        if self._durable_since_trim < max(1, self.history // 4):
            return
        self._durable_since_trim = 0
        await self.store.trim_history(self.owner_id, self.claim.fence, self.owner_id, self.history)

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
                if durable and self.history is not None:
                    await self._trim(rows)
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
                else:
                    self._chains.clear()  # not written: the next rows start new chains
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
        mine = [i for i, r in enumerate(self._pending) if r.execution_id == execution_id]
        for i in reversed(mine):  # written to the store, as far as a reader knows
            row = self._pending[i]
            if name == LATEST:
                return row.key.encode("utf-8")
            if row.key == key:
                return await self._pending_snapshot(execution_id, mine[: mine.index(i) + 1])
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

    async def _pending_snapshot(self, execution_id: str, upto: list[int]) -> bytes:
        """The snapshot of a row not written yet (``upto``: the execution's
        pending rows through it): the kept copy when it is the last one saved,
        otherwise its chain read back, from the store as far as it is there."""
        chain = self._chains.get(execution_id)
        last = [i for i, r in enumerate(self._pending) if r.execution_id == execution_id][-1]
        if chain is not None and upto[-1] == last:
            return json.dumps(snapshots.plain(chain.doc)).encode("utf-8")
        rows = [self._pending[i] for i in upto]
        fulls = [k for k, r in enumerate(rows) if r.delta == snapshots.FULL]
        pending = [
            (r.snapshot, snapshots.row_fields(r.step, r.event, r.at))
            for r in rows[(fulls[-1] if fulls else 0) :]
        ]
        chain_rows = pending if fulls else await self.store.chain_rows(execution_id) + pending
        stored = [b for b, _ in chain_rows]
        columns = [c for _, c in chain_rows]
        texts = {b.hash: snapshots.blob_text(b.data, b.codec) for r in rows for b in r.blobs}
        wanted = snapshots.hashes_of(snapshots.parse(b) for b in stored) - set(texts)
        if wanted:
            texts.update(await self.store.blob_texts(wanted))
        return json.dumps(snapshots.decode(stored, texts, columns).doc).encode("utf-8")

    async def delete(self, key: str) -> None:
        """Delete a snapshot; safe when it does not exist. Here the latest is the
        newest snapshot, not a pointer that can go while the snapshots stay, so
        ``<id>/latest``, and the latest snapshot while older ones exist (which
        would silently become the latest), are refused with ValueError while
        the execution has snapshots."""
        execution_id, name = split_key(key)
        await self.flush()
        self._chains.pop(execution_id, None)  # the next row is stored whole
        latest = await self.load(f"{execution_id}/{LATEST}")
        if name == LATEST:
            if latest is not None:
                raise ValueError(
                    f"cannot delete {key}: in this store the latest snapshot is the one "
                    "saved last, not a pointer of its own; delete the whole execution "
                    f"(delete_execution('{execution_id}'))"
                )
            return
        if latest is not None and latest.decode("utf-8") == key:
            if len(await self.store.history(execution_id)) > 1:
                raise ValueError(
                    f"cannot delete {key}: it is the latest snapshot, and in this store the "
                    "latest is the one saved last, so the one before it would become the "
                    "latest (the library's backends are left with none); delete the whole "
                    f"execution (delete_execution('{execution_id}'))"
                )
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
        split_key(f"{execution_id}/{LATEST}")  # an id that names checkpoints
        await self.flush()
        self._chains.pop(execution_id, None)
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


# Set by the runner (runner.PinnedMachine) around the one consume of a wait
# state or a child group: only that consume reserves; every other consume
# removes the signal at once (StoreSignals).
_RUNNER_WAIT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "orch_runner_wait", default=False
)


@contextlib.contextmanager
def runner_wait() -> Iterator[None]:
    """The consumes inside are the runner's wait (see StoreSignals)."""
    token = _RUNNER_WAIT.set(True)
    try:
        yield
    finally:
        _RUNNER_WAIT.reset(token)


class StoreSignals:
    """flatmachines' ``SignalBackend`` on the store.

    ``consume`` takes the oldest free signal of the channel (first in, first
    out) and removes it in one transaction, as the library's backends do: the
    next consume, ``peek`` or ``channels`` no longer sees it. So it is for the
    library's ``SignalDispatcher``, a plain FlatMachine's ``wait_for`` and a
    hook. A signal that the store has given to an execution waiting on its
    channel is that execution's, and no other consume takes it.

    With a claim (``StoreSignals(store, claim, persistence)``), every consume
    is fenced by the claim (LeaseLost if it moved). The one consume that is the
    runner's own wait (a ``wait_for`` state or a child group, marked with
    ``runner_wait()``) keeps the exactly-once protocol instead: the signal is
    taken under the claim and consumed when the wait state's progress commits,
    so a crash in between loses neither. Inside such a wait, a timer channel
    (``sleep:`` / ``until:``, see timers.py) yields its wake-up once its time
    has come; a signal wait whose deadline (the state's ``timeout``) has passed
    yields ``{"timed_out": true}``, unless a signal was sent before the
    deadline. Timers are the runner's: a timer channel outside its wait is
    refused (ValueError).
    """

    def __init__(
        self,
        store: Store,
        claim: Claim | None = None,
        persistence: FencedPersistence | None = None,
    ):
        if claim is not None and persistence is None:
            raise ValueError("a StoreSignals with a claim needs that claim's FencedPersistence")
        self.store = store
        self.claim = claim
        self.persistence = persistence

    async def consume(self, channel: str) -> Signal | None:
        checks.channel(channel)  # a rendered channel the store cannot hold is the state's error
        if self.claim is not None and _RUNNER_WAIT.get():
            return await self._take_for_wait(channel)
        if timers.is_timer(channel):
            raise ValueError(
                f"{channel!r} is a timer channel: timers (sleep:/until:) are kept by the "
                "orchestrator's runner for the wait_for states it runs, not consumed as signals"
            )
        ex = self.claim.execution if self.claim is not None else None
        try:
            record = await self.store.consume_signal(
                channel,
                execution_id=ex.id if ex is not None else None,
                fence=self.claim.fence if self.claim is not None else None,
            )
        except (LeaseLost, StoreUnavailable) as exc:
            if self.persistence is not None:
                self.persistence.broken = exc
            raise
        if record is None:
            return None
        return Signal(str(record.id), channel, record.data, _iso(record.created_at))

    async def _take_for_wait(self, channel: str) -> Signal | None:
        assert self.claim is not None and self.persistence is not None
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
    """flatmachines' ``ExecutionLock`` on the store.

    The claim's own key (its execution id) is locked by the claim itself:
    acquiring it succeeds while the claim's fence holds, and the lease is
    given up by the worker when it records the outcome, not by ``release``.
    Every other key (and every key of a lock made without a claim) is a row
    of the ``locks`` table (store/locks.py): ``acquire`` is non-blocking and
    succeeds if the key is free, expired or this lock's own (acquiring it again
    renews it); while held, the lock renews it every ``ttl / 3`` seconds; a
    holder that crashed stops renewing, and after ``ttl`` seconds (the lease
    TTL unless given) the key is free again. ``release`` deletes it, and is
    safe for a key this lock does not hold. Each ``FencedLock`` is one holder.
    """

    def __init__(self, store: Store, claim: Claim | None = None, *, ttl: float | None = None):
        self.store = store
        self.claim = claim
        self.ttl = float(ttl if ttl is not None else store.settings.lease_ttl)
        if not self.ttl > 0:
            raise ValueError(f"a lock's ttl must be more than 0 seconds, not {ttl!r}")
        self.holder = f"{socket.gethostname()[:100]}:{os.getpid()}:{uuid.uuid4().hex}"
        self._renewing: dict[str, asyncio.Task] = {}

    def _claims(self, key: str) -> bool:
        return self.claim is not None and key == self.claim.execution.id

    async def acquire(self, key: str) -> bool:
        if self._claims(key):
            assert self.claim is not None
            if time.monotonic() - self.claim.taken_at < self.store.settings.lease_ttl / 3:
                # taken moments ago and no renewal due yet: the fence holds, and
                # every write checks it again anyway
                return True
            return await self.store.holds_fence(key, self.claim.fence)
        _lock_key(key)
        if not await self.store.acquire_lock(key, self.holder, self.ttl):
            return False
        if key not in self._renewing:
            self._renewing[key] = asyncio.get_running_loop().create_task(self._renew(key))
        return True

    async def release(self, key: str) -> None:
        if self._claims(key):
            return None  # the lease is given up by the worker when it records the outcome
        _lock_key(key)
        task = self._renewing.pop(key, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.release_lock(key, self.holder)

    async def _renew(self, key: str) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if not await self.store.renew_lock(key, self.holder, self.ttl):
                    log.warning("lock %r was lost: it expired and was taken by another", key)
                    self._renewing.pop(key, None)
                    return
            except StoreUnavailable as exc:  # tried again at the next renewal
                log.warning("lock %r not renewed: %s", key, exc)


MAX_LOCK_KEY = 400  # locks.key


def _lock_key(key: str) -> None:
    if not isinstance(key, str) or not key or len(key) > MAX_LOCK_KEY or "\x00" in key:
        raise ValueError(
            f"invalid lock key {str(key)[:100]!r}: a non-empty string of at most "
            f"{MAX_LOCK_KEY} characters, without NUL"
        )


class StoreConfigStore(ConfigStore):
    """Machine configs by content hash, in the shared store.

    Like flatmachines' config stores, ``put`` keeps any text (a YAML mapping
    or not) under its sha256, and ``put`` of the same text is a no-op. ``delete``
    of a config an execution still runs is a no-op: the execution must be able
    to resume with it (the library's stores delete it).
    """

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

    from .safeyaml import YAMLTooBig, load

    try:
        parsed = load(raw)
    except (yaml.YAMLError, YAMLTooBig):
        return "unnamed-machine"
    data = parsed.get("data") if isinstance(parsed, dict) else None
    name = data.get("name") if isinstance(data, dict) else None
    return str(name)[:200] if name else "unnamed-machine"


__all__ = [
    "FencedLock",
    "FencedPersistence",
    "StoreConfigStore",
    "StoreSignals",
    "runner_wait",
    "split_key",
]
