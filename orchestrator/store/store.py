"""The shared store: one database, cut by aggregate.

Each aggregate is a module of its own with the domain's verbs on it, and all
of them share one ``Database`` (db.py: the engine, the dialect, the one way to
run a transaction):

    configs.py      machine configs by hash
    executions.py   submit, claim, lease, outcome, retry, cancel, the reaper's requeue
    checkpoints.py  snapshots, history, the fenced hot path
    workers.py      the worker registry and the leader lease
    queues.py       queue policy and statistics, scaling events, cron schedules
    signals.py      durable signals: send, take, consume
    lineage.py      children, the groups their parents wait on, forks (groups.py)
    work.py         flatmachines work pools
    locks.py        flatmachines ExecutionLock on any key (expiring rows)
    results.py      flatmachines ResultBackend writes for ids that are not executions
    retention.py    finished executions removed, with everything of theirs

The imports form a tree: store → aggregates → (checkpoints ←) executions → db →
engine / dialect → models. ``Store`` keeps the callers' flat API: each verb is
the aggregate's own method, named once in the table below.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ..errors import UserError
from ..settings import Settings
from . import engine as eng
from .checkpoints import Checkpoints
from .configs import Configs
from .db import Database
from .executions import Executions
from .lineage import Lineage
from .locks import Locks
from .queues import Queues
from .results import Results
from .retention import Retention
from .signals import Signals
from .work import WorkPools
from .workers import Workers


class _Verb:
    """``Store.claim`` is ``store.executions.claim``: the aggregate's bound method."""

    def __init__(self, aggregate: str):
        self.aggregate = aggregate

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, store: Any, owner: type | None = None) -> Any:
        if store is None:
            return self
        return getattr(getattr(store, self.aggregate), self.name)


class Store:
    """The shared store. The API is async; each transaction runs whole,
    synchronously, on one of the store's threads."""

    def __init__(self, url: sa.URL, settings: Settings, *, patience: float | None = None):
        self.db = Database(url, settings, patience=patience)
        self.configs = Configs(self.db)
        self.executions = Executions(self.db)
        self.checkpoints = Checkpoints(self.db)
        self.workers = Workers(self.db)
        self.queues = Queues(self.db)
        self.signals = Signals(self.db)
        self.lineage = Lineage(self.db)
        self.work = WorkPools(self.db)
        self.retention = Retention(self.db)
        self.locks = Locks(self.db)
        self.results = Results(self.db)

    @property
    def url(self) -> sa.URL:
        return self.db.url

    @property
    def settings(self) -> Settings:
        return self.db.settings

    @property
    def engine(self) -> sa.Engine:
        return self.db.engine

    @property
    def driver(self) -> eng.Driver:
        return self.db.driver

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, settings: Settings | None = None, *, migrate: bool = True) -> Store:
        """Connect, check the database is usable, and bring the schema to head."""
        settings = settings or Settings()
        url = eng.parse_url(settings.database_url)
        path = eng.sqlite_path(url)
        if path is not None:
            eng.check_sqlite_writable(path)
        store = cls(url, settings)
        try:
            with eng.translate_connect_errors(url):
                # first contact fails fast: a caller that wants to wait for the
                # database (a worker) retries the open itself
                revision = await store.db.run(eng.current_revision, write=False, patience=0)
                if revision != eng.head_revision():
                    if not migrate:
                        raise UserError(
                            f"{eng.masked(url)} has no current schema: run `orch db upgrade`"
                        )
                    await store.db.upgrade()
        except BaseException:
            await store.close()
            raise
        return store

    @classmethod
    def lazy(cls, settings: Settings, *, patience: float | None = None) -> Store:
        """A store that connects on first use, for a process that already opened
        (and migrated) one: a database away at that moment is met per call."""
        return cls(eng.parse_url(settings.database_url), settings, patience=patience)

    async def close(self) -> None:
        await self.db.close()

    async def upgrade(self) -> None:
        await self.db.upgrade()

    # ---------------------------------------------------------------- verbs

    put_config = _Verb("configs")
    get_config = _Verb("configs")
    delete_config = _Verb("configs")

    submit = _Verb("executions")
    get = _Verb("executions")
    list_executions = _Verb("executions")
    count_by_status = _Verb("executions")
    finished_per_bucket = _Verb("executions")
    queued_needs = _Verb("executions")
    claim = _Verb("executions")
    claim_many = _Verb("executions")
    renew_leases = _Verb("executions")
    holds_fence = _Verb("executions")
    finish = _Verb("executions")
    park = _Verb("executions")
    release = _Verb("executions")
    release_orphans = _Verb("executions")
    retry_later = _Verb("executions")
    cancel = _Verb("executions")
    retry = _Verb("executions")
    requeue_expired = _Verb("executions")

    prune = _Verb("retention")
    prune_checkpoint_sets = _Verb("retention")
    reclaim = _Verb("retention")
    sweep_blobs = _Verb("retention")

    save_checkpoint = _Verb("checkpoints")
    save_checkpoints = _Verb("checkpoints")
    load_checkpoint = _Verb("checkpoints")
    latest_checkpoint = _Verb("checkpoints")
    latest_decoded = _Verb("checkpoints")
    chain_rows = _Verb("checkpoints")
    blob_texts = _Verb("checkpoints")
    trim_history = _Verb("checkpoints")
    latest_snapshot_ids = _Verb("checkpoints")
    delete_checkpoints = _Verb("checkpoints")
    history = _Verb("checkpoints")
    checkpoint_at = _Verb("checkpoints")

    enqueue_children = _Verb("lineage")
    group_members = _Verb("lineage")
    cancel_members = _Verb("lineage")
    children = _Verb("lineage")
    fork = _Verb("lineage")

    register_worker = _Verb("workers")
    heartbeat_worker = _Verb("workers")
    set_worker_status = _Verb("workers")
    get_worker = _Verb("workers")
    list_workers = _Verb("workers")
    drain_idle_worker = _Verb("workers")
    mark_lost_workers = _Verb("workers")
    workers_exited = _Verb("workers")
    hold_leadership = _Verb("workers")
    resign_leadership = _Verb("workers")
    leader = _Verb("workers")

    send_signal = _Verb("signals")
    reserve_signal = _Verb("signals")
    consume_signal = _Verb("signals")
    pending_signals = _Verb("signals")
    signal_channels = _Verb("signals")

    acquire_lock = _Verb("locks")
    renew_lock = _Verb("locks")
    release_lock = _Verb("locks")
    lock_holder = _Verb("locks")

    write_result = _Verb("results")
    read_result = _Verb("results")
    delete_result = _Verb("results")

    add_schedule = _Verb("queues")
    list_schedules = _Verb("queues")
    remove_schedule = _Verb("queues")
    fire_due_schedules = _Verb("queues")
    set_queue_policy = _Verb("queues")
    queue_exists = _Verb("queues")
    set_queue_paused = _Verb("queues")
    paused_queues = _Verb("queues")
    scaling_snapshot = _Verb("queues")
    record_scaling = _Verb("queues")
    scaling_history = _Verb("queues")
    queue_stats = _Verb("queues")
