"""Modal prompts. Bad input is said in the prompt, and nothing is written."""

from __future__ import annotations

import json
from typing import Any

from rich.syntax import Syntax
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from orchestrator.display import shown, text

from ..feed import STATUSES, Filters


class Prompt(ModalScreen):
    """A dialog with inputs, an error line and OK / Cancel."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]
    TITLE = ""

    def fields(self) -> ComposeResult:
        yield from ()

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.TITLE, classes="dialog-title")
            yield from self.fields()
            yield Label("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("OK", variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
        else:
            self.submit()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.submit()

    def refuse(self, message: str) -> None:
        self.query_one("#error", Label).update(text(message))

    def value(self, id_: str) -> str:
        return self.query_one(f"#{id_}", Input).value.strip()

    def submit(self) -> None:
        raise NotImplementedError


def parse_json(text: str, what: str, *, object_only: bool = False) -> Any:
    """JSON from a prompt; ValueError naming the fix."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{what} is nested too deep") from None
    if object_only and not isinstance(value, dict):
        raise ValueError(f'{what} must be a JSON object such as {{"key": 1}}')
    return value


class Confirm(ModalScreen[bool]):
    """Yes or no, for a destructive action."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(text(self.question), classes="dialog-title")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class SignalPrompt(Prompt):
    TITLE = "Send a signal"

    def __init__(self, channel: str = ""):
        super().__init__()
        self.channel = channel

    def fields(self) -> ComposeResult:
        # the waiting channel as it shows; left as it is, the signal goes to it
        yield Input(shown(self.channel), placeholder="channel, e.g. approval/job-1", id="channel")
        yield Input("", placeholder='data as JSON, e.g. {"ok": true} (empty: null)', id="data")

    def submit(self) -> None:
        channel = self.value("channel")
        if not channel:
            return self.refuse("a signal needs a channel")
        if self.channel and channel == shown(self.channel).strip():
            channel = self.channel
        text = self.value("data")
        try:
            data = parse_json(text, "the data") if text else None
        except ValueError as exc:
            return self.refuse(str(exc))
        self.dismiss((channel, data))


class ScalePrompt(Prompt):
    TITLE = "Scale a queue"

    def __init__(self, queue: str, low: int, high: int):
        super().__init__()
        self.queue, self.low, self.high = queue, low, high

    def fields(self) -> ComposeResult:
        yield Label(text(f"queue {self.queue}: workers from min to max"))
        yield Input(str(self.low), placeholder="min", id="min")
        yield Input(str(self.high), placeholder="max", id="max")

    def submit(self) -> None:
        try:
            low, high = int(self.value("min")), int(self.value("max"))
        except ValueError:
            return self.refuse("min and max must be whole numbers")
        if low < 0 or high < 0:
            return self.refuse("min and max must not be negative")
        if low > high:
            return self.refuse(f"min {low} is more than max {high}")
        self.dismiss((low, high))


class ForkPrompt(Prompt):
    TITLE = "Fork from a checkpoint"

    def __init__(self, execution_id: str, step: int):
        super().__init__()
        self.execution_id, self.step = execution_id, step

    def fields(self) -> ComposeResult:
        yield Label(text(f"a new execution from {self.execution_id} at step {self.step}"))
        yield Input("", placeholder="new id (empty: one is made up)", id="new")
        yield Input("", placeholder="context patch as a JSON object (optional)", id="patch")

    def submit(self) -> None:
        text = self.value("patch")
        try:
            patch = parse_json(text, "the context patch", object_only=True) if text else None
        except ValueError as exc:
            return self.refuse(str(exc))
        self.dismiss((self.value("new") or None, patch))


class FilterPrompt(Prompt):
    TITLE = "Filter executions"

    def __init__(self, current: Filters):
        super().__init__()
        self.current = current

    def fields(self) -> ComposeResult:
        yield Select(
            [(s, s) for s in STATUSES],
            value=self.current.status or Select.NULL,
            id="status",
            prompt="any status",
        )
        yield Input(self.current.queue or "", placeholder="queue", id="queue")
        yield Input(self.current.parent or "", placeholder="parent execution id", id="parent")
        yield Input(self.current.text or "", placeholder="id or machine contains", id="text")

    def submit(self) -> None:
        status = self.query_one("#status", Select).value
        self.dismiss(
            Filters(
                status=None if status is Select.NULL else str(status),
                queue=self.value("queue") or None,
                parent=self.value("parent") or None,
                text=self.value("text") or None,
            )
        )


class JsonView(ModalScreen):
    """A value as pretty JSON, scrollable."""

    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, title: str, value: Any):
        super().__init__()
        self.heading = title
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(text(self.heading), classes="dialog-title")
            with VerticalScroll(classes="json"):
                pretty = json.dumps(self.value, indent=2, default=str)
                yield Static(Syntax(pretty, "json", word_wrap=True), id="json")


class Help(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    TEXT = """\
[b]Overview[/] (1) workers and queues · [b]Executions[/] (2)
enter   open the selected execution (its timeline, children, context)
c       cancel the selected execution         R  retry it
s       send a signal                         F  fork (in the execution screen)
f       filter executions    x clear filters   n / p  next / previous page
S       scale the selected queue              P  pause / resume it
r       refresh now    t  light / dark theme   q  quit
The screens follow the store by themselves, about once a second."""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("Keys", classes="dialog-title")
            yield Static(self.TEXT)
