"""Where a workflow's templates and conditions run: Jinja's sandbox, never plain Jinja.

A workflow is written by whoever can submit, so its templates are untrusted
code. flatmachines renders them with a plain ``jinja2.Environment``, in which
``{{ cycler.__init__.__globals__.os.popen('id').read() }}`` runs a command on
the worker; flatagents renders an agent's prompts the same way. A pinned
machine renders through ``TEMPLATES`` instead: Jinja's
``ImmutableSandboxedEnvironment`` (no attribute that starts with ``_``, no
internals of functions or frames, no method that changes a list, dict or
set), with the library's ``fromjson`` filter and its JSON finalize, so a
workflow that renders today renders the same. Operators a template could use
to exhaust a worker (``'x' * 10**10``, ``9 ** 9 ** 9``) are bounded.

What is refused fails the execution with one ``WorkflowRefused`` error: the
workflow's ``on_error`` does not see it and it is not retried, since it would
be refused again. ``check_config`` refuses at submit what can be seen without
running (a template that does not parse, a ``__`` name), so most mistakes
and most attacks end there, with exit 2; the sandbox holds for what is
computed at run time and for a config that reached the store some other way.
"""

from __future__ import annotations

import ast
import json
from collections import OrderedDict
from collections.abc import Iterator
from threading import Lock
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UserError

# bounds on what one operator may build: a string or list of a million items,
# an integer of a hundred thousand bits (far beyond any workflow's arithmetic)
MAX_BUILT_ITEMS = 1_000_000
MAX_POWER_BITS = 100_000
# compiled templates kept per process (the library compiles one per render)
TEMPLATE_CACHE = 4096


class WorkflowRefused(Exception):
    """A workflow asked for something the orchestrator does not allow (a
    template outside the sandbox, a file read at run time). Not the workflow's
    error to handle, and not retried."""


def _json_finalize(value: Any) -> Any:
    # the library's: lists and dicts render as JSON, not as Python's repr
    if isinstance(value, list | dict):
        return json.dumps(value)
    return value


class WorkflowTemplates(ImmutableSandboxedEnvironment):
    """The sandbox, with the library's filter and finalize, and a bounded
    cache of compiled templates: ``from_string`` compiles each distinct text
    once per process, not once per render (a ``foreach`` over 100,000 items
    rendered its key template 100,000 times)."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, *, workflow: bool = True) -> None:
        if workflow:  # as flatmachines renders; an agent's prompts as flatagents does
            super().__init__(finalize=_json_finalize)
            self.filters["fromjson"] = json.loads
        else:
            super().__init__()
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = Lock()

    def from_string(self, source: Any, globals: Any = None, template_class: Any = None) -> Any:
        if globals is not None or template_class is not None or not isinstance(source, str):
            return super().from_string(source, globals, template_class)
        with self._lock:
            template = self._compiled.get(source)
            if template is not None:
                self._compiled.move_to_end(source)
                return template
        template = super().from_string(source)
        with self._lock:
            self._compiled[source] = template
            if len(self._compiled) > TEMPLATE_CACHE:
                self._compiled.popitem(last=False)
        return template

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja hands back an Undefined that fails only when used, and then
        # as a confusing UndefinedError; refuse where the access is made
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is refused"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple | bytes) and isinstance(times, int):
                    if len(seq) * max(times, 0) > MAX_BUILT_ITEMS:
                        raise SecurityError(
                            f"a template built a sequence of over {MAX_BUILT_ITEMS:,} items"
                        )
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(abs(left).bit_length(), 1) * right > MAX_POWER_BITS:
                raise SecurityError(f"a template computed a power of over {MAX_POWER_BITS:,} bits")
        return super().call_binop(context, operator, left, right)


TEMPLATES = WorkflowTemplates()
PROMPTS = WorkflowTemplates(workflow=False)

# a FlatAgent's compiled prompts and the texts they come from
_PROMPT_PARTS = (
    ("_compiled_system", "_system_prompt_template"),
    ("_compiled_user", "_user_prompt_template"),
    ("_compiled_instruction_suffix", "_instruction_suffix"),
    ("_compiled_post_history_instructions", "_post_history_instructions"),
)


def sandbox_agent(agent: Any) -> None:
    """A FlatAgent's prompts, compiled again in the sandbox (compiling runs
    nothing; rendering does). Its later compiles use the sandbox too."""
    agent._jinja_env = PROMPTS
    for compiled, text in _PROMPT_PARTS:
        if getattr(agent, compiled, None) is not None:
            setattr(agent, compiled, PROMPTS.from_string(getattr(agent, text)))


def sandboxed_flatagent_adapter() -> Any:
    """flatmachines' FlatAgent adapter, whose agents render in the sandbox and
    never read a file named by the config at run time (files were embedded at
    submit). None when flatagents is not installed."""
    try:
        from flatmachines.adapters.flatagent import FlatAgentAdapter
    except ImportError:
        return None

    class SandboxedFlatAgentAdapter(FlatAgentAdapter):
        def create_executor(self, *, agent_name: str, agent_ref: Any, context: Any) -> Any:
            data = (agent_ref.config or {}).get("data") if agent_ref.config else None
            if agent_ref.ref or (isinstance(data, dict) and isinstance(data.get("prompt"), str)):
                raise WorkflowRefused(
                    f"agent '{agent_name}' names a file; files are read at submit, never "
                    "from a worker's disk: submit the workflow again"
                )
            executor = super().create_executor(
                agent_name=agent_name, agent_ref=agent_ref, context=context
            )
            agent = getattr(executor, "_agent", None)
            if agent is not None:
                sandbox_agent(agent)
            return executor

    return SandboxedFlatAgentAdapter()


def refused(exc: SecurityError) -> WorkflowRefused:
    return WorkflowRefused(f"template refused by the sandbox: {exc}")


class GuardedExpressions:
    """A transition condition's engine, refusing Python's own names (``__x``).

    flatmachines' simple engine reads attributes with ``getattr`` on anything
    that is not a mapping, so ``context.name.__class__`` walks into Python's
    internals. Its expressions have no calls, but nothing of that kind is a
    workflow's business. Checked once per distinct expression."""

    def __init__(self, inner: Any):
        self._inner = inner
        self._checked: set[str] = set()

    def evaluate(self, expression: str, variables: dict[str, Any]) -> Any:
        if expression not in self._checked:
            bad = unsafe_name_in_condition(expression)
            if bad is not None:
                raise WorkflowRefused(f"condition {expression!r} reaches {bad!r}, which is refused")
            self._checked.add(expression)
        return self._inner.evaluate(expression, variables)


def _internal(name: Any) -> bool:
    """Python's own names (``__class__``, ``__globals__``, ...): never data. A
    key like ``_error`` is data (a failed child's item has one), and the
    sandbox still refuses it at run time where it is an object's attribute."""
    return isinstance(name, str) and name.startswith("__")


def unsafe_name_in_condition(expression: str) -> str | None:
    """The first of Python's own names read in a condition."""
    try:
        tree = ast.parse(expression.strip() or "True", mode="eval")
    except SyntaxError:
        return None  # the engine reports it, as it always did
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _internal(node.attr):
            return node.attr
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Constant)
            and _internal(node.slice.value)
        ):
            return node.slice.value
    return None


def _unsafe_name_in_template(tree: nodes.Template) -> str | None:
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr) and _internal(node.attr):
            return node.attr
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            if _internal(node.arg.value):
                return node.arg.value
        if isinstance(node, nodes.Filter) and node.name == "attr":
            for arg in node.args:
                if isinstance(arg, nodes.Const) and _internal(arg.value):
                    return arg.value
    return None


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def check_config(config: dict[str, Any], where: str) -> None:
    """Refuse at submit a template that does not parse or that reaches for a
    name the sandbox refuses, and such a transition condition; UserError names
    the field. Every string of the config is looked at: the library renders
    strings in many places (context, input, output, wait_for, foreach, an
    agent's prompts, ...), and a string that is not a template costs nothing."""
    data = config.get("data")
    for path, text in _strings(data, "data"):
        if not _is_template(text):
            continue
        try:
            tree = TEMPLATES.parse(text)
        except TemplateSyntaxError as exc:
            raise UserError(
                f"{where}: field '{path}': template does not parse "
                f"(line {exc.lineno}: {exc.message})"
            ) from None
        bad = _unsafe_name_in_template(tree)
        if bad is not None:
            raise UserError(
                f"{where}: field '{path}': template reaches {bad!r}; Python's own names "
                "('__...') are refused (templates run in a sandbox: see README, Security model)"
            )
    states = data.get("states") if isinstance(data, dict) else None
    for name, state in (states or {}).items():
        for i, tr in enumerate((state or {}).get("transitions") or []):
            condition = tr.get("condition") if isinstance(tr, dict) else None
            if isinstance(condition, str):
                bad = unsafe_name_in_condition(condition)
                if bad is not None:
                    raise UserError(
                        f"{where}: field 'data.states.{name}.transitions[{i}].condition' "
                        f"reaches {bad!r}; Python's own names ('__...') are refused"
                    )
