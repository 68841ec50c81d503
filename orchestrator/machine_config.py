"""Machine configs: load and check a workflow file at submit, pin it by hash.

At submit the config is loaded by flatmachines itself (so agent file refs are
resolved into the config), checked, and its normalised text stored by content
hash. A worker rebuilds the machine from that text, never from the file on
disk, so an execution resumes with exactly the config it started with.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from flatmachines import FlatMachine, HooksRegistry, MachineHooks, MemoryBackend
from flatmachines.persistence import config_hash
from flatmachines.validation import validate_flatmachine_config

from . import safeyaml, timers
from .app import LazyAgentRegistry
from .errors import UserError
from .routing import hook_names


@dataclass(frozen=True, slots=True)
class MachineConfig:
    name: str
    raw: str  # normalised YAML, agent refs embedded
    hash: str
    hook_names: frozenset[str]


class _AnyHooks(HooksRegistry):
    """Resolves every hooks name to no-op hooks: a submit checks shape, not hooks."""

    def resolve(self, ref: Any) -> MachineHooks:
        return MachineHooks()


def _check_structure(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        raise UserError(f"{where}: not a flatmachine config (expected a YAML mapping at the top)")
    if config.get("spec") != "flatmachine":
        raise UserError(f"{where}: field 'spec' must be 'flatmachine' (got {config.get('spec')!r})")
    data = config.get("data")
    if not isinstance(data, dict):
        raise UserError(f"{where}: field 'data' is missing or not a mapping")
    states = data.get("states")
    if not isinstance(states, dict) or not states:
        raise UserError(f"{where}: field 'data.states' must map state names to states")
    # before the schema check, which would only say 'backend' is missing
    persistence = data.get("persistence") or {}
    if isinstance(persistence, dict) and persistence.get("enabled", True) is False:
        raise UserError(
            f"{where}: 'persistence: {{enabled: false}}' turns off checkpoints, so the "
            "execution could not resume after a crash; remove it to run under the orchestrator"
        )
    errors = validate_flatmachine_config(config, warn=False, strict=False)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UserError(f"{where}: invalid flatmachine: {errors[0]}{more}")
    for name, state in states.items():
        if not isinstance(state, dict):
            raise UserError(f"{where}: field 'data.states.{name}' must be a mapping")
        for i, tr in enumerate(state.get("transitions") or []):
            target = tr.get("to") if isinstance(tr, dict) else None
            if target not in states:
                raise UserError(
                    f"{where}: field 'data.states.{name}.transitions[{i}].to' names "
                    f"unknown state {target!r}"
                )
        wait_for = state.get("wait_for")
        if isinstance(wait_for, str):
            try:
                timers.check_literal(wait_for)
            except ValueError as exc:
                raise UserError(f"{where}: field 'data.states.{name}.wait_for': {exc}") from None
            timeout = state.get("timeout")
            if timeout is not None and not (
                isinstance(timeout, int | float)
                and not isinstance(timeout, bool)
                and 0 < timeout <= timers.MAX_SECONDS  # finite: a deadline a datetime holds
            ):
                raise UserError(
                    f"{where}: field 'data.states.{name}.timeout' must be a number of seconds "
                    f"above 0 and at most 100 years (the wait's deadline), not {timeout!r}"
                )
        on_error = state.get("on_error")
        targets = on_error.values() if isinstance(on_error, dict) else [on_error]
        for target in targets:
            if target is not None and target not in states:
                raise UserError(
                    f"{where}: field 'data.states.{name}.on_error' names unknown state {target!r}"
                )


def _embed_children(raw: str, base: Path, seen: frozenset[Path]) -> str:
    """Child machines named by file (``machines: {child: ./child.yml}``) are
    pinned with their parent: their checked, normalised configs go inline, so
    a worker on another host, in another directory, runs exactly them. A file
    that is not there is left as it is: the parent's run reports it."""
    config = yaml.safe_load(raw)
    refs = (config.get("data") or {}).get("machines") or {}
    embedded = False
    for name, ref in list(refs.items()):
        if not isinstance(ref, str):
            continue
        child = (base / Path(ref).expanduser()).resolve()
        if not child.is_file() or child in seen:
            continue
        refs[name] = yaml.safe_load(load_machine_file(child, _seen=seen).raw)
        embedded = True
    return yaml.safe_dump(config, sort_keys=False) if embedded else raw


def load_machine_file(path: str | Path, *, _seen: frozenset[Path] = frozenset()) -> MachineConfig:
    """Read, check and normalise a workflow file; UserError names what is wrong."""
    seen = _seen
    p = Path(path)
    if not p.is_file():
        raise UserError(f"machine file not found: {p} (give the path to a flatmachine .yml)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read machine file {p}: {exc}") from None
    try:
        config = safeyaml.load(text)
    except safeyaml.YAMLTooBig as exc:
        raise UserError(f"{p}: refused: the YAML {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{p}: YAML does not parse{at}: {problem}") from None
    _check_structure(config, str(p))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("flatmachines").disabled = True
            try:
                machine = FlatMachine(
                    config_file=str(p),
                    hooks_registry=_AnyHooks(),
                    persistence=MemoryBackend(),
                    agent_registry=LazyAgentRegistry(),  # no agent is called to check
                )
            finally:
                logging.getLogger("flatmachines").disabled = False
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        raise UserError(f"{p}: invalid flatmachine: {exc}") from None
    raw = machine._config_raw or yaml.safe_dump(config, sort_keys=False)
    raw = _embed_children(raw, p.parent, seen | {p.resolve()})
    return MachineConfig(
        name=machine.machine_name,
        raw=raw,
        hash=config_hash(raw),
        hook_names=hook_names(machine.config),
    )


class ConfigCache:
    """Parsed configs by hash: a worker parses each pinned config once.

    Each machine gets a copy of its own (the library may change what it is
    given). A config that JSON holds exactly, as most do, is copied by
    decoding its JSON text (about five times cheaper than ``copy.deepcopy``,
    which was 5 % of a busy worker's samples); any other by ``deepcopy``.
    """

    def __init__(self) -> None:
        self._parsed: dict[str, dict[str, Any]] = {}
        self._json: dict[str, str] = {}
        self._raw: dict[str, str] = {}

    def get(self, hash_key: str) -> dict[str, Any] | None:
        text = self._json.get(hash_key)
        if text is not None:
            return json.loads(text)
        cached = self._parsed.get(hash_key)
        return copy.deepcopy(cached) if cached is not None else None

    def raw(self, hash_key: str) -> str:
        """The pinned text of a config already ``put``."""
        return self._raw[hash_key]

    def put(self, hash_key: str, raw: str) -> dict[str, Any]:
        parsed = yaml.safe_load(raw)
        self._parsed[hash_key] = parsed
        self._raw[hash_key] = raw
        text = _exact_json(parsed)
        if text is not None:
            self._json[hash_key] = text
        return copy.deepcopy(parsed)


def _exact_json(value: Any) -> str | None:
    """``value`` as JSON text, if decoding it gives back the same types and
    values (YAML can hold what JSON cannot: dates, non-string keys, ...)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return None
    return text if _same(json.loads(text), value) else None


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN
