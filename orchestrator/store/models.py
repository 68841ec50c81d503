"""The schema: one SQLAlchemy metadata for SQLite and PostgreSQL.

Times are naive UTC, computed by the caller (one clock per decision, easy to
freeze in tests).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# BIGINT autoincrement on PostgreSQL, INTEGER PRIMARY KEY (rowid) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")

configs = Table(
    "configs",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("machine_name", String(200), nullable=False),
    Column("raw", Text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    # the hooks its machine names (routing.py): only a worker with them claims it
    Column("needs", String(400), nullable=False, server_default=text("''")),
)

executions = Table(
    "executions",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("machine", String(200), nullable=False),
    Column("config_hash", String(64), ForeignKey("configs.hash"), nullable=False),
    Column("queue", String(100), nullable=False),
    Column("priority", Integer, nullable=False, server_default=text("0")),
    # queued | running | waiting | completed | failed | cancelled
    Column("status", String(16), nullable=False),
    Column("input", JSON, nullable=False),
    Column("output", JSON),
    Column("error", Text),
    Column("attempt", Integer, nullable=False, server_default=text("1")),
    Column("max_attempts", Integer, nullable=False, server_default=text("1")),
    # retry delay before attempt n+1: min(backoff * 2**(n-1), backoff_max), jittered
    Column("retry_backoff", Float, nullable=False, server_default=text("1.0")),
    Column("retry_backoff_max", Float, nullable=False, server_default=text("300.0")),
    Column("recoveries", Integer, nullable=False, server_default=text("0")),
    Column("not_before", DateTime),
    Column("parent_id", String(200)),
    Column("worker_id", String(200)),
    Column("lease_until", DateTime),
    Column("fence", BigInteger, nullable=False, server_default=text("0")),
    Column("current_state", String(200)),
    Column("step", Integer, nullable=False, server_default=text("0")),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
    # a waiting execution: the channel it waits on and when it wakes by itself
    # (a timer, or a signal's deadline); kept until the wait's state commits
    Column("waiting_channel", String(400)),
    Column("wake_at", DateTime),
    Column("cancel_reason", Text),
    # a child execution: the top of its tree, and the channel its parent waits
    # on for the group it belongs to (settled: all of them; any: the first)
    Column("root_id", String(200)),
    Column("parent_group", String(400)),
    Column("group_mode", String(16)),
    Column("needs", String(400), nullable=False, server_default=text("''")),
    # lease expiry scans
    Index("ix_executions_lease", "status", "lease_until"),
    Index("ix_executions_waiting", "status", "waiting_channel"),
    Index("ix_executions_wake", "status", "wake_at"),
    Index("ix_executions_parent", "parent_id"),
    Index("ix_executions_finished", "status", "finished_at"),
    Index("ix_executions_parent_group", "parent_group"),
    Index("ix_executions_created", "created_at"),
    Index("ix_executions_worker", "worker_id"),
)

# the claim: best runnable row of a queue, by priority (high first) then age
Index(
    "ix_executions_claim",
    executions.c.queue,
    executions.c.status,
    executions.c.priority.desc(),
    executions.c.created_at,
)

# the claim by need: the best runnable row of a queue that a worker can run
Index(
    "ix_executions_claim_needs",
    executions.c.queue,
    executions.c.needs,
    executions.c.status,
    executions.c.priority.desc(),
    executions.c.created_at,
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    # the machine's own execution id: the root execution or an inline child
    Column("execution_id", String(200), nullable=False),
    Column("key", String(400), nullable=False),
    Column("step", Integer, nullable=False),
    Column("event", String(40), nullable=False),
    Column("state", String(200)),
    # the stored row (store/snapshots.py): a full snapshot, or (delta = 1) what
    # changed since the row before it of the same execution
    Column("snapshot", LargeBinary, nullable=False),
    Column("fence", BigInteger, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("delta", Integer, nullable=False, server_default=text("0")),
    # latest checkpoint of an execution = max id: one index look-up
    Index("ix_checkpoints_execution", "execution_id", "id"),
)

# big strings of checkpoints, stored once by a hash of their text and shared by
# every execution that holds them (store/snapshots.py). Retention removes a
# blob once no execution links it (and it was not used for a while: a writer
# that names it again moves used_at, so it is never removed under that writer)
blobs = Table(
    "blobs",
    metadata,
    Column("hash", String(32), primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("codec", String(8), nullable=False),  # plain | zlib
    Column("size", Integer, nullable=False),  # bytes of the text
    Column("used_at", DateTime, nullable=False),
    Index("ix_blobs_used_at", "used_at"),
)

# which executions name which blobs: removed with the execution (retention)
checkpoint_blobs = Table(
    "checkpoint_blobs",
    metadata,
    Column("execution_id", String(200), primary_key=True),
    Column("hash", String(32), primary_key=True),
    Index("ix_checkpoint_blobs_hash", "hash"),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", JSON, nullable=False),
    Column("concurrency", Integer, nullable=False),
    # active | draining | stopped | lost
    Column("status", String(16), nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("last_heartbeat", DateTime, nullable=False),
    Column("stopped_at", DateTime),
    Column("running", Integer, nullable=False, server_default=text("0")),
    Column("completed", Integer, nullable=False, server_default=text("0")),
    Column("failed", Integer, nullable=False, server_default=text("0")),
    # flatmachines RegistrationBackend fields
    Column("capabilities", JSON),
    Column("metadata", JSON),
    Column("current_task_id", String(200)),
    # the hooks names this worker registered: it claims only what needs no more
    Column("hooks", JSON),
    Index("ix_workers_status", "status"),
)

queues = Table(
    "queues",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("min_workers", Integer, nullable=False, server_default=text("0")),
    Column("max_workers", Integer, nullable=False, server_default=text("4")),
    Column("concurrency_limit", Integer),
    Column("paused", Integer, nullable=False, server_default=text("0")),
    Column("created_at", DateTime, nullable=False),
    # autoscaler: one worker per this many runnable queued executions
    Column("per_worker", Integer, nullable=False, server_default=text("10")),
    Column("last_scaled_at", DateTime),
)

# one row per leader-elected role ("scheduler"): whoever holds an unexpired
# lease is leader; fence += 1 on every change of holder
leader_leases = Table(
    "leader_leases",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("fence", BigInteger, nullable=False),
    Column("lease_until", DateTime, nullable=False),
)

schedules = Table(
    "schedules",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("machine", String(200), nullable=False),
    Column("config_hash", String(64), ForeignKey("configs.hash"), nullable=False),
    Column("cron", String(200), nullable=False),
    Column("input", JSON, nullable=False),
    Column("queue", String(100), nullable=False),
    Column("next_fire_at", DateTime, nullable=False),
    Column("last_fired_at", DateTime),
    Column("created_at", DateTime, nullable=False),
    # what a tick does while the last run is unfinished (overlap.py)
    Column("overlap", String(20), nullable=False, server_default=text("'skip'")),
    Column("buffered_at", DateTime),  # the tick held for after the last run (buffer_one)
    Column("last_skipped_at", DateTime),
)

scaling_events = Table(
    "scaling_events",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("queue", String(100), nullable=False),
    Column("at", DateTime, nullable=False),
    Column("from_workers", Integer, nullable=False),
    Column("to_workers", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Index("ix_scaling_events_queue", "queue", "id"),
)

# flatmachines WorkBackend pools (the DistributedWorkerHooks pattern)
work_items = Table(
    "work_items",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("pool", String(200), nullable=False),
    Column("data", JSON, nullable=False),
    # pending | claimed | completed | poisoned
    Column("status", String(16), nullable=False),
    Column("claimed_by", String(200)),
    Column("claimed_at", DateTime),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("max_retries", Integer, nullable=False, server_default=text("3")),
    Column("result", JSON),
    Column("error", Text),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Index("ix_work_items_claim", "pool", "status", "created_at"),
    Index("ix_work_items_claimed_by", "claimed_by"),
)

# durable signals: one signal, one consumer, first in first out per channel. A
# signal is assigned to the waiter it wakes (or that takes it) and consumed when
# that waiter's wait state commits.
signals = Table(
    "signals",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("channel", String(400), nullable=False),
    Column("data", JSON),
    Column("created_at", DateTime, nullable=False),
    Column("assigned_to", String(200)),
    Column("consumed_at", DateTime),
    Index("ix_signals_channel", "channel", "consumed_at", "id"),
    Index("ix_signals_assigned_to", "assigned_to"),
)

# flatmachines ExecutionLock on any key but a claim's own (persistence.FencedLock):
# a row is a lock held until ``expires_at``; its holder renews it while it runs
# and deletes it on release. An expired row holds nothing: the next acquire
# takes it over, and retention removes it.
locks = Table(
    "locks",
    metadata,
    Column("key", String(400), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("acquired_at", DateTime, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Index("ix_locks_expires_at", "expires_at"),
)

# flatmachines ResultBackend writes (children.StoreResults) for ids that are
# not executions of the store (an execution's result is its outcome): one row
# per URI, kept until deleted or until retention removes it, as old as a
# finished execution it would remove.
results = Table(
    "results",
    metadata,
    Column("uri", String(600), primary_key=True),
    Column("data", JSON),
    Column("created_at", DateTime, nullable=False),
    Index("ix_results_created_at", "created_at"),
)

FINAL_STATUSES = ("completed", "failed", "cancelled")
