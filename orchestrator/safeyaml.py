"""YAML that cannot blow up: aliases and nesting bounded before anything is built.

``yaml.safe_load`` runs no code, but 640 bytes of anchors and aliases (the
"billion laughs") stand for 10**9 nodes: loading them is cheap, because the
aliases share their objects, but the first deep copy, render or dump of the
config (a worker's, per execution) runs out of memory. So the document is
composed into its node graph first, and refused if its aliases, expanded,
add more than ``MAX_ALIASED`` nodes to those written out, if an alias
recurses, or if it nests deeper than ``MAX_DEPTH``. A document without
aliases is as large as its text (a 10,000-state machine has some 250,000
nodes), which the input's own size bounds. libyaml's C loader is used where it is
installed (it also refuses nesting past 1,000 levels on its own).
"""

from __future__ import annotations

from typing import Any

import yaml

from .checks import MAX_DEPTH

MAX_ALIASED = 200_000  # nodes that aliases may add: anchors used to share a block

_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YAMLTooBig(ValueError):
    """A document whose aliases expand past the bound, recurse, or nest too deep."""


def _expanded_size(root: yaml.Node) -> int:
    """Nodes in ``root`` with every alias expanded (shared nodes counted once
    per use), without recursion; YAMLTooBig past the bounds."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] - len(size) > MAX_ALIASED:  # sizes add up: stop as early as it shows
                raise _multiplies()
            continue
        if key in size:
            continue
        if key in on_path:
            raise YAMLTooBig("has a recursive alias (an anchor used inside itself)")
        if depth > MAX_DEPTH:
            raise YAMLTooBig(f"is nested more than {MAX_DEPTH} levels deep")
        on_path.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in _children(node) if id(c) not in size)
    if size[id(root)] - len(size) > MAX_ALIASED:
        raise _multiplies()
    return size[id(root)]


def _multiplies() -> YAMLTooBig:
    return YAMLTooBig(
        f"aliases expand to more than {MAX_ALIASED:,} nodes beyond those written out "
        "(anchors and aliases that multiply); write the repeated part out or shorten it"
    )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def load(text: str) -> Any:
    """One YAML document, as ``yaml.safe_load`` gives it. yaml.YAMLError if it
    does not parse; YAMLTooBig if it expands or nests past the bounds."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
