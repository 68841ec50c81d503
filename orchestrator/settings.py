"""Runtime settings, read from the environment (ORCH_*) and overridable by CLI flags."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from . import timers

DEFAULT_DATABASE_URL = "sqlite:///./orch.sqlite"
DEFAULT_RETENTION = 30 * 86400.0  # seconds a finished execution is kept


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORCH_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    lease_ttl: float = Field(30.0, gt=0, description="seconds a claim stays valid unrenewed")
    app: str | None = Field(None, description="MODULE[:ATTR] holding a flatmachines HooksRegistry")
    poll_interval: float = Field(
        0.5, gt=0, description="seconds an idle worker waits between claims"
    )
    max_recoveries: int = Field(5, ge=0, description="crash recoveries before an execution fails")
    max_steps: int = Field(
        1_000_000, ge=1, description="states an execution may run before it fails as a runaway loop"
    )
    # SQLite durability: FULL syncs the WAL on every commit, so a committed
    # checkpoint survives power loss, not only a process crash.
    sqlite_synchronous: str = Field("FULL", pattern="^(FULL|NORMAL|EXTRA)$")
    sqlite_busy_timeout_ms: int = 10_000
    # How long one store call waits out a database that does not answer (down,
    # restarting, failing over, locked) before its caller gives up on that call.
    # A worker then abandons the run, writing nothing more, and resumes it from
    # its last committed checkpoint once the store answers.
    store_patience: float = Field(30.0, ge=0)
    # Sizes as compact JSON. Past them a submit, a signal or a fork is refused
    # (exit 2), and a run whose context grows past its limit fails, naming it.
    max_input_bytes: int = Field(8 * 2**20, gt=0, description="bytes of one execution's input")
    max_signal_bytes: int = Field(8 * 2**20, gt=0, description="bytes of one signal's data")
    max_context_bytes: int = Field(
        64 * 2**20, gt=0, description="bytes of an execution's context at a checkpoint"
    )
    # Seconds a finished execution (completed, failed, cancelled) is kept before
    # the leader's retention job removes it with everything of its own; 0 keeps
    # every execution forever. The environment takes the durations of
    # `orch prune --older-than` (30d, 12h, 30s).
    retention: float = Field(DEFAULT_RETENTION, ge=0, le=timers.MAX_SECONDS)

    @field_validator("retention", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return timers.parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"{exc}; 0 keeps executions forever") from None
