"""Find the user's hooks: ``--app MODULE[:ATTR]`` names a flatmachines HooksRegistry."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from flatmachines import HooksRegistry
from flatmachines.agents import AgentAdapterRegistry

from .errors import UserError

DEFAULT_ATTR = "hooks_registry"
# optional: agent adapters of the app, over flatmachines' own (an offline one, say)
ADAPTERS_ATTR = "agent_adapters"


def _module(spec: str) -> Any:
    module_name = spec.partition(":")[0]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"--app {spec}: cannot import module '{module_name}' ({exc}); "
            "run from the directory that holds it or put it on PYTHONPATH"
        ) from None


def load_agent_adapters(spec: str | None) -> list[Any]:
    """The app's ``agent_adapters`` (a list of flatmachines AgentAdapters), if any."""
    if not spec:
        return []
    return list(getattr(_module(spec), ADAPTERS_ATTR, None) or [])


def load_hooks_registry(spec: str | None) -> HooksRegistry:
    if not spec:
        return HooksRegistry()
    module_name, _, attr = spec.partition(":")
    attr = attr or DEFAULT_ATTR
    module = _module(spec)
    registry = getattr(module, attr, None)
    if registry is None:
        raise UserError(f"--app {spec}: module '{module_name}' has no attribute '{attr}'")
    if not isinstance(registry, HooksRegistry):
        raise UserError(
            f"--app {spec}: '{module_name}.{attr}' is a {type(registry).__name__}, "
            "not a flatmachines HooksRegistry"
        )
    return registry


def registered_names(registry: HooksRegistry) -> set[str]:
    return set(getattr(registry, "_factories", {}))


class LazyAgentRegistry(AgentAdapterRegistry):
    """flatmachines' agent adapters, imported on the first agent call only:
    importing them (litellm, when installed) costs seconds, and most workflows
    a worker runs have no agent state. ``adapters`` (the app's) win."""

    def __init__(self, adapters: list[Any] | None = None):
        super().__init__()
        self._extra = list(adapters or [])
        self._loaded = False
        for adapter in self._extra:
            self.register(adapter)

    def _load(self) -> None:
        if not self._loaded:
            from flatmachines.adapters import register_builtin_adapters

            from .sandbox import sandboxed_flatagent_adapter

            register_builtin_adapters(self)
            sandboxed = sandboxed_flatagent_adapter()
            if sandboxed is not None:  # over the library's own
                self.register(sandboxed)
            for adapter in self._extra:
                self.register(adapter)
            self._loaded = True

    def get(self, type_name: str) -> Any:
        self._load()
        return super().get(type_name)

    def create_executor(self, **kwargs: Any) -> Any:
        self._load()
        return super().create_executor(**kwargs)
