"""What a caller may pass: each public verb's arguments, checked before any SQL.

The ``Orchestrator`` API and the ``orch`` command both come through these
checks, so the two stores see the same arguments and a bad one is one
``UserError`` (the CLI's one line and exit 2) with nothing written. Lengths are
the columns' (store/models.py), integers what both engines' INTEGER holds,
JSON values finite, no deeper than ``MAX_DEPTH`` and no bigger than their
setting. A message names the argument and the fix, never its value.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

from .errors import UserError
from .timers import MAX_SECONDS

# The columns' lengths (store/models.py; a test holds them equal), written out
# so that the reads that answer without SQLAlchemy can check too.
ID_LENGTH = 200  # executions.id and every column that names one
QUEUE_LENGTH = 100
CHANNEL_LENGTH = 400  # signals.channel, executions.waiting_channel
SCHEDULE_NAME_LENGTH = 200
NAME_LENGTH = 200  # executions.machine
NEEDS_LENGTH = 400
CRON_LENGTH = 200
INT_MAX = 2**31 - 1  # PostgreSQL's INTEGER; SQLite holds more
# Nesting past this is refused: copying, rendering and encoding a value
# recurse once or more per level, and Python's own limit is 1,000 frames.
MAX_DEPTH = 100


def bounded_text(value: Any, what: str, length: int, *, empty: str | None = None) -> str:
    """A non-empty string that its column holds."""
    if not isinstance(value, str):
        raise UserError(f"{what} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise UserError(empty or f"{what} must not be empty")
    if len(value) > length:
        raise UserError(f"{what} is {len(value)} characters; the most is {length}")
    if "\x00" in value:
        raise UserError(f"{what} must not contain a NUL character")
    return value


def execution_id(value: Any, what: str = "an execution id") -> str:
    return bounded_text(value, what, ID_LENGTH)


# An execution id names its checkpoints ('<execution id>/<name>'), so it must
# read as one, whatever a store behind the keys does with paths. Any other
# character is allowed: an id is shown literally wherever it is shown.
ID_RULE = "no part between '/' that is empty, '.' or '..'"


def unsafe_id(value: str) -> bool:
    """An id that cannot name checkpoints (path-like: '../etc', 'a//b', '/x')."""
    return any(part in ("", ".", "..") for part in value.split("/"))


def new_execution_id(value: Any, what: str = "--id") -> str:
    """An id for a new execution: ``execution_id``, and one that names checkpoints."""
    execution_id(value, what)
    if unsafe_id(value):
        raise UserError(f"{what} must have {ID_RULE}")
    return value


def queue_name(value: Any, what: str = "--queue") -> str:
    return bounded_text(value, what, QUEUE_LENGTH)


def channel(value: Any) -> str:
    return bounded_text(
        value,
        "a signal channel",
        CHANNEL_LENGTH,
        empty="a signal needs a channel name, such as 'approval/job-1'",
    )


def optional_text(value: Any, what: str) -> str | None:
    """Free text kept in a TEXT column (a cancel reason): a string or None."""
    if value is not None and not isinstance(value, str):
        raise UserError(f"{what} must be a string, not {type(value).__name__}")
    if value is not None and "\x00" in value:
        raise UserError(f"{what} must not contain a NUL character")
    return value


def integer(value: Any, what: str, *, low: int = -INT_MAX - 1, high: int = INT_MAX) -> int:
    """A whole number the INTEGER columns of both stores hold, within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{what} must be a whole number, not {type(value).__name__}")
    if value < low:
        raise UserError(f"{what} must be at least {low}")
    if value > high:
        raise UserError(f"{what} must be at most {high}")
    return value


def seconds(value: Any, what: str, *, positive: bool = False) -> float:
    """A finite number of seconds, not negative (above 0 if ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value):
        raise UserError(f"{what} must be a finite number of seconds")
    if value < 0 or (positive and value == 0):
        raise UserError(f"{what} must be {'more than' if positive else 'at least'} 0 seconds")
    if value > MAX_SECONDS:
        raise UserError(f"{what} must be at most {MAX_SECONDS} seconds (100 years)")
    return float(value)


def _walk(value: Any) -> Iterator[tuple[Any, int]]:
    """Every value inside ``value`` with its depth, without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        yield item, depth
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)


def nesting(value: Any, what: str) -> Any:
    """A value at most ``MAX_DEPTH`` deep (a config mapping, of any YAML types)."""
    if any(depth > MAX_DEPTH for _, depth in _walk(value)):
        raise UserError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    return value


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON: what every size limit counts."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def json_value(value: Any, what: str, *, limit: int | None = None, setting: str = "") -> Any:
    """A value JSON holds exactly: finite numbers, string keys, at most
    ``MAX_DEPTH`` deep and, with ``limit``, at most that many bytes."""
    for item, depth in _walk(value):
        if depth > MAX_DEPTH:
            raise UserError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(item, float) and not math.isfinite(item):
            raise UserError(f"{what} holds NaN or infinity, which JSON cannot; give finite numbers")
        if isinstance(item, dict) and not all(isinstance(k, str) for k in item):
            raise UserError(f"{what} has a key that is not a string; JSON keys are strings")
        if not isinstance(item, dict | list | tuple | str | int | float | bool | type(None)):
            raise UserError(f"{what} holds a {type(item).__name__}, which JSON cannot")
    if limit is not None:
        size = json_size(value)
        if size > limit:
            raise UserError(
                f"{what} is {size} bytes as JSON; the most is {limit} ({setting}): "
                "keep large data elsewhere and pass a reference to it"
            )
    return value


def json_object(value: Any, what: str, *, limit: int | None = None, setting: str = "") -> dict:
    if not isinstance(value, dict):
        raise UserError(
            f'{what} must be a JSON object such as {{"n": 5}}, not a {type(value).__name__}'
        )
    return json_value(value, what, limit=limit, setting=setting)


def parse_json(text_: str, where: str, example: str) -> Any:
    """JSON text a user gave: one line naming what is wrong if it does not parse."""
    try:
        return json.loads(text_)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); "
            f"give a value such as '{example}'"
        ) from None
    except RecursionError:
        raise UserError(f"{where} is nested more than {MAX_DEPTH} levels deep") from None


def execution_input(value: Any, what: str, limit: int) -> dict:
    """One execution's input: a JSON object of at most ORCH_MAX_INPUT_BYTES."""
    return json_object(value, what, limit=limit, setting="ORCH_MAX_INPUT_BYTES")


def signal_data(value: Any, limit: int) -> Any:
    """A signal's data: any JSON value of at most ORCH_MAX_SIGNAL_BYTES."""
    return json_value(value, "the signal's data", limit=limit, setting="ORCH_MAX_SIGNAL_BYTES")


def submit_options(queue: Any, priority: Any, delay: Any, max_attempts: Any, backoff: Any) -> None:
    """The options of a submit, the same for one execution or a batch."""
    queue_name(queue)
    integer(priority, "--priority")
    if delay is not None:
        seconds(delay, "--delay")
    integer(max_attempts, "--max-attempts", low=1)
    seconds(backoff, "--backoff", positive=True)


EXECUTION_STATUSES = ("queued", "running", "waiting", "completed", "failed", "cancelled")
SEARCH_LENGTH = 400


def listing(
    *,
    status: Any = None,
    queue: Any = None,
    parent: Any = None,
    text: Any = None,
    limit: Any = 50,
    offset: Any = 0,
) -> None:
    """The filters and page of a list of executions."""
    if status is not None and status not in EXECUTION_STATUSES:
        raise UserError(f"--status must be one of {', '.join(EXECUTION_STATUSES)}")
    if queue is not None:
        queue_name(queue)
    if parent is not None:
        execution_id(parent, "--parent")
    if text is not None and text != "":
        bounded_text(text, "the search text", SEARCH_LENGTH)
    integer(limit, "--limit", low=1)
    integer(offset, "the offset", low=0)


def machine(value: Any, *, optional: bool = False) -> None:
    """A machine file's path, a config mapping or a loaded MachineConfig."""
    from .machine_config import MachineConfig

    if value is None and optional:
        return
    if not isinstance(value, str | os.PathLike | dict | MachineConfig):
        raise UserError(
            "the machine must be a file path, a config dict or a MachineConfig, "
            f"not {type(value).__name__}"
        )


class ContextTooLarge(UserError):
    """A context past ORCH_MAX_CONTEXT_BYTES: a fork's is refused, a run's fails."""


def context_within_limit(context: Any, limit: int) -> None:
    size = json_size(context)
    if size > limit:
        raise ContextTooLarge(
            f"the context is {size} bytes as JSON; the most is {limit} "
            "(ORCH_MAX_CONTEXT_BYTES): keep large data elsewhere and put a reference to it "
            "in the context"
        )
