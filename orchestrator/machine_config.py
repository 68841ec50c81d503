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
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from flatmachines import FlatMachine, HooksRegistry, MachineHooks, MemoryBackend, __version__
from flatmachines.persistence import config_hash
from flatmachines.utils import check_spec_version
from flatmachines.validation import validate_flatmachine_config

from . import safeyaml, timers
from .app import LazyAgentRegistry
from .errors import UserError
from .routing import hook_names
from .sandbox import check_config


@dataclass(frozen=True, slots=True)
class MachineConfig:
    name: str
    raw: str  # normalised YAML, agent refs embedded
    hash: str
    hook_names: frozenset[str]


# libyaml's parser and emitter, where PyYAML was built with it: a 10,000-state
# machine parses in about a second instead of ten. The pure-Python classes
# give the same data and the same text, only slower.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _load_yaml(text: str) -> Any:
    """Parse YAML text as ``yaml.safe_load`` does."""
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a safe loader


def _dump_yaml(config: Any) -> str:
    """A config's pinned text: what the library's ``_capture_config_raw``
    writes (``yaml.dump(..., default_flow_style=False, sort_keys=False)``)."""
    return yaml.dump(config, Dumper=_SafeDumper, default_flow_style=False, sort_keys=False)


class _AnyHooks(HooksRegistry):
    """Resolves every hooks name to no-op hooks: a submit checks shape, not hooks."""

    def resolve(self, ref: Any) -> MachineHooks:
        return MachineHooks()


def check_envelope(machine: FlatMachine) -> None:
    """The library's ``_validate_spec`` without its schema pass: a config's
    schema is checked once, at submit, not each time a machine is built."""
    if machine.config.get("spec") != "flatmachine":
        raise ValueError(
            f"Invalid spec: expected 'flatmachine', got '{machine.config.get('spec')}'"
        )
    if "data" not in machine.config:
        raise ValueError("Config missing 'data' section")
    machine.spec_version = check_spec_version(machine.config.get("spec_version"), __version__)


class _CheckedMachine(FlatMachine):
    """The library's machine, built once at submit to check a config that
    ``_check_structure`` has just validated: no second schema pass, and its
    normalised text written by ``_dump_yaml``."""

    def _capture_config_raw(self) -> str | None:
        return _dump_yaml(self.config) if self.config else None

    def _validate_spec(self) -> None:
        check_envelope(self)  # our own check did the schema pass


# The checkpoints resume stands on: a state's state_exit is its durability
# point (runner.py continues after it), and machine_end records the output
# with the outcome. Without them an execution could not resume or would run
# committed states again.
DURABLE_CHECKPOINTS = ("state_exit", "machine_end")


def _check_checkpoint_on(events: Any, where: str) -> None:
    named = events if isinstance(events, list) else []
    missing = [e for e in DURABLE_CHECKPOINTS if e not in named]
    if not isinstance(events, list) or missing:
        listed = ", ".join(missing or DURABLE_CHECKPOINTS)
        raise UserError(
            f"{where}: 'persistence: checkpoint_on' must be a list that includes "
            f"{', '.join(DURABLE_CHECKPOINTS)} (the orchestrator resumes from them); add "
            f"{listed}, or remove checkpoint_on for the default"
        )


def history_window(config: Any) -> int | None:
    """``data.settings.history``: how many durable checkpoints a running
    execution keeps (None: all of them)."""
    data = config.get("data") if isinstance(config, dict) else None
    settings = data.get("settings") if isinstance(data, dict) else None
    value = settings.get("history") if isinstance(settings, dict) else None
    return value if type(value) is int and value > 0 else None


def _check_history(data: dict[str, Any], where: str) -> None:
    settings = data.get("settings")
    if not isinstance(settings, dict) or "history" not in settings:
        return
    value = settings["history"]
    if type(value) is not int or not 1 <= value <= 2**31 - 1:
        raise UserError(
            f"{where}: 'settings: history' must be a positive whole number (how many durable "
            "checkpoints a running execution keeps); remove it to keep them all"
        )


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
    _check_history(data, where)
    # before the schema check, which would only say 'backend' is missing
    persistence = data.get("persistence") or {}
    if isinstance(persistence, dict) and persistence.get("enabled", True) is False:
        raise UserError(
            f"{where}: 'persistence: {{enabled: false}}' turns off checkpoints, so the "
            "execution could not resume after a crash; remove it to run under the orchestrator"
        )
    if isinstance(persistence, dict) and "checkpoint_on" in persistence:
        _check_checkpoint_on(persistence["checkpoint_on"], where)
    check_config(config, where)
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


def _referenced(base: Path, ref: str, what: str, *, allow_outside: bool) -> Path:
    """The file a config names, relative to the folder of the file that names
    it. An absolute path, or one that leads out of that folder, is refused
    unless allowed: a workflow handed in by someone else must not make the
    submitting host read its other files. Errors name the path, never what
    the file holds."""
    expanded = Path(ref).expanduser()
    path = (base / expanded).resolve()
    if not allow_outside and (expanded.is_absolute() or not path.is_relative_to(base.resolve())):
        raise UserError(
            f"{what} {ref!r} is outside the machine's folder {base}; move it beside the "
            "machine, or pass --allow-outside-refs (allow_outside_refs=True) to trust it"
        )
    if not path.is_file():
        raise UserError(f"{what} {ref!r} not found (looked for {path})")
    return path


def _load_referenced(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else safeyaml.load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):
        raise UserError(f"{what} {path} cannot be read as YAML or JSON") from None


def _file_refs(config: dict[str, Any], base: Path, *, allow_outside: bool) -> dict[str, Path]:
    """Check every agent file a config names, before the library reads them:
    name -> the agent's file."""
    agents = (config.get("data") or {}).get("agents") or {}
    found: dict[str, Path] = {}
    for name, ref in agents.items() if isinstance(agents, dict) else ():
        if isinstance(ref, dict) and isinstance(ref.get("ref"), str):
            if not FlatMachine._looks_like_file_ref(ref["ref"]):
                continue  # an adapter's own name (claude-code, ...), not a file
            ref = ref["ref"]
        if isinstance(ref, str):
            what = f"agent '{name}' file"
            found[name] = _referenced(base, ref, what, allow_outside=allow_outside)
            _load_referenced(found[name], what)  # the library's own errors would quote it
    return found


def _prompt_files(agents: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(agent name, its ``data``) for each embedded agent whose prompt is a file."""
    for name, agent in agents.items() if isinstance(agents, dict) else ():
        body = agent.get("config") if isinstance(agent, dict) and "config" in agent else agent
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, dict) and isinstance(data.get("prompt"), str):
            yield name, data


def _embed_refs(
    raw: str,
    config: dict[str, Any],
    base: Path,
    seen: frozenset[Path],
    agent_files: dict[str, Path],
    allow_outside: bool,
) -> str:
    """Child machines named by file (``machines: {child: ./child.yml}``) are
    pinned with their parent: their checked, normalised configs go inline, so
    a worker on another host, in another directory, runs exactly them, and
    never reads a file of its own disk. So do agents' prompt files
    (flatagents would read them at run time), relative to the agent's file."""
    data = config.get("data") or {}
    children = {n: r for n, r in (data.get("machines") or {}).items() if isinstance(r, str)}
    if not children and not any(_prompt_files(data.get("agents"))):
        return raw  # the usual case: the text is not parsed again
    pinned = _load_yaml(raw)
    for name, agent_data in _prompt_files(pinned["data"].get("agents")):
        folder = agent_files[name].parent if name in agent_files else base
        what = f"agent '{name}' prompt file"
        path = _referenced(folder, agent_data["prompt"], what, allow_outside=allow_outside)
        agent_data["prompt"] = _load_referenced(path, what)
        check_config({"data": agent_data["prompt"]}, str(path))
    refs = pinned["data"].get("machines") or {}
    for name, ref in children.items():
        child = _referenced(base, ref, f"machine '{name}' file", allow_outside=allow_outside)
        if child in seen:
            raise UserError(f"machine '{name}' file {ref!r} names a machine that contains it")
        loaded = load_machine_file(child, allow_outside_refs=allow_outside, _seen=seen)
        refs[name] = _load_yaml(loaded.raw)
    return _dump_yaml(pinned)


def load_machine_file(
    path: str | Path, *, allow_outside_refs: bool = False, _seen: frozenset[Path] = frozenset()
) -> MachineConfig:
    """Read, check and normalise a workflow file; UserError names what is wrong.

    Files it names (agents, their prompts, child machines) must lie in its
    folder unless ``allow_outside_refs``; all of them are embedded."""
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
    agent_files = _file_refs(config, p.parent, allow_outside=allow_outside_refs)
    # the library loads a .json file with json, so the pinned config does too
    given = json.loads(text) if p.suffix == ".json" else config
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("flatmachines").disabled = True
            try:
                machine = _CheckedMachine(
                    config_dict=given,
                    _config_dir=os.path.dirname(os.path.abspath(os.path.expanduser(p))),
                    hooks_registry=_AnyHooks(),
                    persistence=MemoryBackend(),
                    agent_registry=LazyAgentRegistry(),  # no agent is called to check
                )
            finally:
                logging.getLogger("flatmachines").disabled = False
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        raise UserError(f"{p}: invalid flatmachine: {exc}") from None
    # the agents' prompts, now embedded, are templates of the workflow too
    check_config({"data": {"agents": machine.config["data"].get("agents")}}, str(p))
    raw = machine._config_raw or yaml.safe_dump(config, sort_keys=False)
    seen = seen | {p.resolve()}
    raw = _embed_refs(raw, machine.config, p.parent, seen, agent_files, allow_outside_refs)
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
        parsed = _load_yaml(raw)
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
