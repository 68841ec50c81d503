"""Checkpoints store what changed (store/snapshots.py), and read back whole.

Every test here runs on SQLite and on PostgreSQL (the ``store`` fixture).
"""

from __future__ import annotations

import json
import random

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.client import Client
from orchestrator.clock import utcnow
from orchestrator.persistence import FencedPersistence
from orchestrator.store import snapshots
from orchestrator.store.models import blobs, checkpoint_blobs, checkpoints

from .conftest import chain_machine, run_async

# a context this big is stored as what changed (a short one whole)
_PAD = {"pad": "".join(f"{i:04d}" for i in range(600))}


def _same(a, b) -> bool:
    """JSON's equality: 1, 1.0 and true differ, and so do 0.0 and -0.0."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _doc(ex_id: str, step: int, event: str, context: dict) -> dict:
    return {
        "execution_id": ex_id,
        "machine_name": "m",
        "spec_version": "4.2.1",
        "current_state": "s1",
        "context": context,
        "step": step,
        "created_at": f"2026-01-01T00:00:{step % 60:02d}+00:00",
        "event": event,
        "output": None,
        "total_api_calls": 0,
        "total_cost": 0.0,
        "parent_execution_id": None,
        "pending_launches": None,
        "waiting_channel": None,
        "tool_loop_state": None,
        "config_hash": "h",
    }


def _claimed(store, tmp_path, name="m.yml"):
    ex_id = run_async(
        Client(store).submit(chain_machine(tmp_path / name, ["add"]), {})
    ).execution.id
    claim = run_async(store.claim("w", ["default"]))
    assert claim.execution.id == ex_id
    return ex_id, claim


async def _save(
    p: FencedPersistence, ex_id: str, step: int, event: str, context: dict, *, timed=True
) -> str:
    """A save as the runner's machine makes it: the time it was taken in hand
    (the row's column then holds the snapshot's step, event and time), or,
    with ``timed`` false, as the library's path makes it (the commit's time)."""
    from datetime import datetime

    key = f"{ex_id}/step_{step:06d}_{event}.json"
    await p.save_doc(
        execution_id=ex_id,
        key=key,
        step=step,
        event=event,
        state="s1",
        at=datetime(2026, 1, 1, 0, 0, step % 60) if timed else None,
        doc=_doc(ex_id, step, event, context),
    )
    return key


# ------------------------------------------------------------------ property

_BIG = st.builds(
    lambda s, n: (s * n)[: snapshots.BIG + n],
    st.text(min_size=1, max_size=3),
    st.integers(400, 1200),
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from([0, 1, 1.0, True, False, 0.0, -0.0])
)
_VALUES = st.recursive(
    _SCALARS | _BIG,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=10,
)
_CHANGES = st.lists(
    st.tuples(
        st.sampled_from(["set", "delete", "append", "nested", "cut", "replace", "same"]),
        st.sampled_from(["a", "b", "history", "deep"]),
        _VALUES,
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=25,
)


def _change(context: dict, kind: str, key: str, value, k: int) -> None:
    if kind == "set":
        context[key] = value
    elif kind == "delete":
        context.pop(key, None)
    elif kind == "append":
        if not isinstance(context.get(key), list):
            context[key] = []
        context[key].append(value)
    elif kind == "nested":
        node = context.setdefault(key, {})
        if isinstance(node, dict):
            node.setdefault("x", {})
            if isinstance(node["x"], dict):
                node["x"][str(k)] = value
            else:
                node["x"] = value
        elif isinstance(node, list) and node:
            node[k % len(node)] = value
        else:
            context[key] = {"x": value}
    elif kind == "cut":
        if isinstance(context.get(key), list):
            del context[key][:k]
            context[key].append(value)
    elif kind == "replace":
        context.clear()
        context[key] = value


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(changes=_CHANGES, durable_every=st.integers(1, 4), padded=st.booleans())
def test_the_context_read_back_at_every_step_is_the_one_written(
    store, tmp_path_factory, changes, durable_every, padded
):
    tmp = tmp_path_factory.mktemp("prop")
    ex_id, claim = _claimed(store, tmp)

    async def go():
        p = FencedPersistence(store, claim, linger=3600)
        # a short snapshot is stored whole; a padded one as what changed
        context: dict = {"history": [], **({"pad": "p" * 800 + "q" * 800} if padded else {})}
        written: list[tuple[str, str]] = []  # (key, the context's JSON)
        for step, change in enumerate(changes, start=1):
            _change(context, *change)
            event = "state_exit" if step % durable_every == 0 else "state_enter"
            key = await _save(p, ex_id, step, event, context, timed=step % 3 != 0)
            want = json.loads(json.dumps(context))
            written.append((key, json.dumps(want, sort_keys=True)))
            # read back at once, written yet or not (pending markers are read from memory)
            got = json.loads(await p.load(key))
            assert _same(got["context"], want)
        await p.flush()
        # and every row from the store, as a fresh reader reads it
        history = await store.history(ex_id)
        assert len(history) == len(written)
        for record, (_key, want) in zip(history, written, strict=True):
            at = await store.checkpoint_at(ex_id, seq=record.seq)
            assert json.dumps(json.loads(at.snapshot)["context"], sort_keys=True) == want
        await p.close()

    run_async(go())


# ------------------------------------------------------------------ bytes


def _stored_bytes(store, ex_id: str) -> tuple[int, int]:
    """(bytes of the execution's rows, bytes of the blobs it links)."""
    engine = sa.create_engine(store.url)
    try:
        with engine.connect() as conn:
            rows = conn.scalar(
                sa.select(sa.func.sum(sa.func.length(checkpoints.c.snapshot))).where(
                    checkpoints.c.execution_id == ex_id
                )
            )
            data = conn.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(blobs.c.data)), 0))
                .select_from(blobs.join(checkpoint_blobs, checkpoint_blobs.c.hash == blobs.c.hash))
                .where(checkpoint_blobs.c.execution_id == ex_id)
            )
    finally:
        engine.dispose()
    return int(rows or 0), int(data or 0)


_WORDS = "the of model answer tool result user query context document retrieve plan step".split()


def _answer(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(330))[:2048]


def _agent(store, tmp_path, name: str, turns: int) -> tuple[int, int]:
    ex_id, claim = _claimed(store, tmp_path, name)

    async def go():
        p = FencedPersistence(store, claim, linger=3600)
        rng = random.Random(turns)
        context: dict = {"history": [], "turn": 0}
        step = 0
        for _ in range(turns):
            step += 1
            context["machine"] = {"step": step, "current_state": "turn"}
            await _save(p, ex_id, step, "state_enter", context)
            await _save(p, ex_id, step, "execute", context)
            context["history"].append({"role": "assistant", "content": _answer(rng)})
            context["turn"] += 1
            await _save(p, ex_id, step, "state_exit", context)
        got = json.loads(
            await store.load_checkpoint(ex_id, f"{ex_id}/step_{step:06d}_state_exit.json")
        )
        assert got["context"] == json.loads(json.dumps(context))
        await p.close()

    run_async(go())
    return _stored_bytes(store, ex_id)


def test_bytes_grow_with_the_data_not_with_its_square(store, tmp_path):
    rows100, data100 = _agent(store, tmp_path, "a.yml", 100)
    rows200, data200 = _agent(store, tmp_path, "b.yml", 200)
    # the whole context again at every checkpoint would be about 4x
    assert (rows200 + data200) / (rows100 + data100) <= 2.2
    # 200 answers of 2 KB: what the rows and blobs hold is of the order of the data itself
    assert rows200 + data200 < 200 * 2048 * 1.5


def test_a_big_value_is_stored_once_across_checkpoints_and_executions(store, tmp_path):
    text = "retrieved document " * 200
    ids = []
    for name in ("a.yml", "b.yml"):
        ex_id, claim = _claimed(store, tmp_path, name)
        ids.append(ex_id)

        async def go(ex_id=ex_id, claim=claim):
            p = FencedPersistence(store, claim, linger=3600)
            for step in (1, 2, 3):
                await _save(p, ex_id, step, "state_exit", {"doc": text, "n": step})
            await p.close()

        run_async(go())
    engine = sa.create_engine(store.url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(blobs)) == 1
            links = conn.execute(sa.select(checkpoint_blobs.c.execution_id)).scalars().all()
    finally:
        engine.dispose()
    assert sorted(links) == sorted(ids)
    for ex_id in ids:
        at = run_async(store.checkpoint_at(ex_id, 3))
        assert json.loads(at.snapshot)["context"] == {"doc": text, "n": 3}


def test_a_store_row_of_the_previous_form_is_read_and_gone_on_from(store, tmp_path):
    """Rows written before deltas are the library's JSON text: a resume reads
    one and the rows after it store what changed since."""
    ex_id, claim = _claimed(store, tmp_path)
    old = _doc(ex_id, 1, "state_exit", {"history": ["x" * 3000], "n": 1})
    run_async(
        store.save_checkpoint(
            owner_id=ex_id,
            fence=claim.fence,
            execution_id=ex_id,
            key=f"{ex_id}/step_000001_state_exit.json",
            step=1,
            event="state_exit",
            state="s1",
            snapshot=json.dumps(old).encode(),
        )
    )

    async def go():
        key, decoded = await store.latest_decoded(ex_id)
        p = FencedPersistence(store, claim, linger=3600)
        p.adopt(ex_id, decoded)
        context = decoded.doc["context"]
        context["n"] = 2
        context["history"].append("y")
        await _save(p, ex_id, 2, "state_exit", context)
        await p.close()

    run_async(go())
    history = run_async(store.history(ex_id))
    assert [h.step for h in history] == [1, 2]
    at = run_async(store.checkpoint_at(ex_id, 2))
    assert json.loads(at.snapshot)["context"] == {"history": ["x" * 3000, "y"], "n": 2}
    engine = sa.create_engine(store.url)
    try:
        with engine.connect() as conn:
            deltas = (
                conn.execute(
                    sa.select(checkpoints.c.delta)
                    .where(checkpoints.c.execution_id == ex_id)
                    .order_by(checkpoints.c.id)
                )
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    assert deltas == [0, 1]


def test_a_delta_that_does_not_follow_its_row_is_refused_on_read(store, tmp_path):
    ex_id, claim = _claimed(store, tmp_path)

    async def go():
        p = FencedPersistence(store, claim, linger=3600)
        for step in (1, 2, 3):
            await _save(p, ex_id, step, "state_exit", {"n": step, **_PAD})
        await p.close()

    run_async(go())
    engine = sa.create_engine(store.url)
    try:
        with engine.begin() as conn:
            middle = conn.scalars(
                sa.select(checkpoints.c.id)
                .where(checkpoints.c.execution_id == ex_id)
                .order_by(checkpoints.c.id)
            ).all()[1]
            conn.execute(sa.delete(checkpoints).where(checkpoints.c.id == middle))
    finally:
        engine.dispose()
    with pytest.raises(snapshots.BrokenChain, match="does not follow"):
        run_async(store.checkpoint_at(ex_id, 3))


# ------------------------------------------------------------------ history window


def _loop_machine(path, turns: int, history) -> object:
    from .conftest import write_machine

    settings = {} if history is None else {"settings": {"history": history}}
    return write_machine(
        path,
        {
            "spec": "flatmachine",
            "spec_version": "4.2.1",
            "data": {
                "name": "loop",
                **settings,
                "context": {"acc": 0, "log": []},
                "states": {
                    "start": {"type": "initial", "transitions": [{"to": "tick"}]},
                    "tick": {
                        "hooks": "effects",
                        "action": "add",
                        "transitions": [
                            {"condition": f"context.acc < {turns}", "to": "tick"},
                            {"to": "done"},
                        ],
                    },
                    "done": {"type": "final", "output": {"acc": "context.acc"}},
                },
            },
        },
    )


class _Adding:
    def on_action(self, state_name, action_name, context):
        context["acc"] = int(context.get("acc") or 0) + 1
        context["log"] = [*context.get("log", []), f"turn {context['acc']} " + "x" * 1500]
        return context


def _registry():
    from flatmachines import HooksRegistry, MachineHooks

    class Hooks(_Adding, MachineHooks):
        pass

    reg = HooksRegistry()
    reg.register("effects", Hooks)
    return reg


def test_a_history_window_keeps_the_last_durable_checkpoints_of_a_running_loop(store, tmp_path):
    from orchestrator.errors import UserError
    from orchestrator.runner import Runner

    ex_id = run_async(
        Client(store).submit(_loop_machine(tmp_path / "m.yml", 40, 4), {})
    ).execution.id
    claim = run_async(store.claim("w", ["default"]))
    outcome = run_async(Runner(store, _registry()).run(claim))
    assert outcome.status == "completed" and outcome.output == {"acc": 40}
    history = run_async(store.history(ex_id))
    durable = [h for h in history if h.event not in ("state_enter", "execute", "machine_start")]
    assert len(durable) >= 4
    # the rows before the chain the 4th-last durable one (at the last trim) is
    # read through are gone: the oldest row kept is a full one, and it stands at
    # or after the 4th-last durable checkpoint's chain (a chain of this
    # context is a few rows long, far fewer than the 123 written)
    engine = sa.create_engine(store.url)
    try:
        with engine.connect() as conn:
            kept = conn.execute(
                sa.select(checkpoints.c.id, checkpoints.c.delta, checkpoints.c.event)
                .where(checkpoints.c.execution_id == ex_id)
                .order_by(checkpoints.c.id)
            ).all()
    finally:
        engine.dispose()
    assert kept[0].delta == 0
    exits = [r.id for r in kept if r.event == "state_exit"]
    assert sum(1 for r in kept if r.delta == 0 and r.id > exits[-6]) >= 1
    assert len(history) < 40
    assert min(h.step for h in history) > 20
    # what is kept reads back whole
    at = run_async(store.checkpoint_at(ex_id, 41))  # step 1 is start: the 40th tick
    assert len(json.loads(at.snapshot)["context"]["log"]) == 40
    # the blobs of the answers let go of are unlinked
    engine = sa.create_engine(store.url)
    try:
        with engine.connect() as conn:
            links = conn.scalar(
                sa.select(sa.func.count()).where(checkpoint_blobs.c.execution_id == ex_id)
            )
    finally:
        engine.dispose()
    assert links == 40  # every answer is still in the context: all still named
    with pytest.raises(UserError, match="history window let go of it"):
        run_async(Client(store).fork(ex_id, from_step=2))
    with pytest.raises(UserError, match="history window let go of it"):
        run_async(Client(store).context(ex_id, step=2))
    fork = run_async(Client(store).fork(ex_id, from_step=38))
    assert fork.step == 38


def test_without_a_window_every_durable_checkpoint_stays(store, tmp_path):
    from orchestrator.runner import Runner

    ex_id = run_async(
        Client(store).submit(_loop_machine(tmp_path / "m.yml", 12, None), {})
    ).execution.id
    claim = run_async(store.claim("w", ["default"]))
    assert run_async(Runner(store, _registry()).run(claim)).status == "completed"
    steps = {h.step for h in run_async(store.history(ex_id)) if h.event == "state_exit"}
    assert steps == set(range(1, 15))  # start, 12 ticks, done


@pytest.mark.parametrize("bad", [0, -3, "5", 2.5, True])
def test_a_history_window_that_is_not_a_positive_integer_is_refused_at_submit(store, tmp_path, bad):
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match="'settings: history' must be a positive whole number"):
        run_async(Client(store).submit(_loop_machine(tmp_path / "m.yml", 3, bad), {}))
    assert run_async(store.list_executions()) == []


def test_deleting_a_checkpoint_leaves_every_other_one_readable(store, tmp_path):
    ex_id, claim = _claimed(store, tmp_path)

    async def go():
        p = FencedPersistence(store, claim, linger=3600)
        keys = [
            await _save(p, ex_id, step, "state_exit", {"n": step, "k": [1] * step, **_PAD})
            for step in (1, 2, 3, 4)
        ]
        await p.delete(keys[1])
        keys.append(await _save(p, ex_id, 5, "state_exit", {"n": 5, "k": [1] * 5, **_PAD}))
        await p.close()
        return keys

    run_async(go())
    assert [h.step for h in run_async(store.history(ex_id))] == [1, 3, 4, 5]
    for step in (1, 3, 4, 5):
        at = run_async(store.checkpoint_at(ex_id, step))
        assert json.loads(at.snapshot)["context"] == {"n": step, "k": [1] * step, **_PAD}


# ------------------------------------------------------------------ retention of blobs


def _blob_hashes(store) -> set[str]:
    engine = sa.create_engine(store.url)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(sa.select(blobs.c.hash)).all())
    finally:
        engine.dispose()


def test_a_prune_removes_the_blobs_only_its_executions_named(store, tmp_path):
    from datetime import datetime, timedelta

    from freezegun import freeze_time

    only_a, shared = "only in a " * 200, "in both " * 200
    t0 = datetime(2026, 1, 1)
    with freeze_time(t0) as clock:
        ids = []
        contexts = (("a.yml", {"x": only_a, "y": shared}), ("b.yml", {"y": shared, **_PAD}))
        for name, context in contexts:
            ex_id, claim = _claimed(store, tmp_path, name)
            ids.append(ex_id)

            async def go(ex_id=ex_id, claim=claim, context=context):
                p = FencedPersistence(store, claim, linger=3600)
                await _save(p, ex_id, 1, "state_exit", context)
                await p.close()
                await store.finish(claim, status="completed", output={}, error=None)

            run_async(go())
            clock.tick(timedelta(days=20))
        assert len(_blob_hashes(store)) == 3
        clock.move_to(t0 + timedelta(days=31))
        done = run_async(store.prune(before=utcnow() - timedelta(days=30)))
        assert done.executions == 1
        # the string only a named is gone; the one b names too stays, and reads back
        assert _blob_hashes(store) == {
            snapshots.blob_of(shared).hash,
            snapshots.blob_of(_PAD["pad"]).hash,
        }
        at = run_async(store.checkpoint_at(ids[1], 1))
        assert json.loads(at.snapshot)["context"] == {"y": shared, **_PAD}


def test_the_sweep_removes_blobs_nothing_names_once_their_grace_is_over(store):
    from datetime import datetime, timedelta

    from freezegun import freeze_time

    from orchestrator.store.retention import BLOB_GRACE

    old, young = snapshots.blob_of("o" * 2000), snapshots.blob_of("y" * 2000)
    t0 = datetime(2026, 1, 1)
    engine = sa.create_engine(store.url)
    try:
        with engine.begin() as conn:
            for blob, at in ((old, t0), (young, t0 + BLOB_GRACE)):
                conn.execute(
                    sa.insert(blobs).values(
                        hash=blob.hash, data=blob.data, codec=blob.codec, size=blob.size, used_at=at
                    )
                )
    finally:
        engine.dispose()
    with freeze_time(t0 + BLOB_GRACE + timedelta(minutes=1)):
        assert run_async(store.sweep_blobs()) == 1
    assert _blob_hashes(store) == {young.hash}


def test_a_step_that_never_committed_is_not_blamed_on_a_history_window(store, tmp_path):
    from orchestrator.errors import UserError
    from orchestrator.runner import Runner

    ex_id = run_async(
        Client(store).submit(_loop_machine(tmp_path / "m.yml", 2, None), {})
    ).execution.id
    claim = run_async(store.claim("w", ["default"]))
    assert run_async(Runner(store, _registry()).run(claim)).status == "completed"
    with pytest.raises(UserError) as refused:
        run_async(Client(store).fork(ex_id, from_step=0))
    assert "history window" not in str(refused.value)
    assert "steps to fork from: 1-4" in str(refused.value)
