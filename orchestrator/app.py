"""Find the user's hooks: ``--app MODULE[:ATTR]`` names a flatmachines HooksRegistry."""

from __future__ import annotations

import importlib
import os
import sys

from flatmachines import HooksRegistry

from .errors import UserError

DEFAULT_ATTR = "hooks_registry"


def load_hooks_registry(spec: str | None) -> HooksRegistry:
    if not spec:
        return HooksRegistry()
    module_name, _, attr = spec.partition(":")
    attr = attr or DEFAULT_ATTR
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"--app {spec}: cannot import module '{module_name}' ({exc}); "
            "run from the directory that holds it or put it on PYTHONPATH"
        ) from None
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
