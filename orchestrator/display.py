"""How text that a user or a workflow wrote is shown: literally, and nothing else.

An execution id, queue, channel, schedule, machine or state name, an error, a
worker id is data, never markup and never a terminal command. Rich and Textual
read ``[...]`` in a string as style markup (``[/]x`` raises, ``job[red]-7``
shows as ``job-7``), and a terminal obeys the control characters it is sent
(ESC turns it red, CR overwrites the line, U+202E reverses what follows). So
every such value is shown through ``shown`` (a plain string) or ``text`` (a
Rich ``Text``, which is never parsed as markup) before it is printed, put in a
table or logged; ``--json`` prints the exact data, which JSON escapes itself.
A control character shows as its Python escape: ``\\x1b``, ``\\n``, ``\\u202e``.

``masked_url`` is the other half of showing what is not ours to show: a
database URL with its password hidden, whichever way it was written.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text

# C0, DEL and C1 controls; the line and paragraph separators; and Unicode's
# format characters (category Cf): the invisible ones ("job-7" and "job-7"
# with a zero-width space in it would look alike) and the bidirectional
# controls that reorder the text around them
_CONTROLS = [
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    0x00AD,
    *range(0x0600, 0x0606),
    0x061C,
    0x06DD,
    0x070F,
    0x0890,
    0x0891,
    0x08E2,
    0x180E,
    *range(0x200B, 0x2010),
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2060, 0x2065),
    *range(0x2066, 0x2070),
    0xFEFF,
    *range(0xFFF9, 0xFFFC),
    0x110BD,
    0x110CD,
    *range(0x13430, 0x13440),
    *range(0x1BCA0, 0x1BCA4),
    *range(0x1D173, 0x1D17B),
    0xE0001,
    *range(0xE0020, 0xE0080),
]
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def _escape(code: int) -> str:
    if code in _NAMED:
        return _NAMED[code]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


_ONE_LINE = {code: _escape(code) for code in _CONTROLS}
# an error's traceback keeps its lines and indentation
_LINES = {code: out for code, out in _ONE_LINE.items() if code not in (0x09, 0x0A)}


def shown(value: object, *, multiline: bool = False) -> str:
    """``value`` as text safe to print: every control character made visible.
    With ``multiline``, newlines and tabs stay (an error with its traceback)."""
    return str(value).translate(_LINES if multiline else _ONE_LINE)


def text(value: object, *, style: str = "", multiline: bool = False) -> Text:
    """``value`` for a Rich or Textual widget: shown literally, never as markup
    (None as nothing)."""
    from rich.text import Text

    return Text("" if value is None else shown(value, multiline=multiline), style=style)


class LogFormatter(logging.Formatter):
    """Log lines whose names cannot forge a line or command the terminal: the
    message is one line, a traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return shown(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return shown(super().formatException(ei), multiline=True)

    def formatStack(self, stack_info: str) -> str:
        return shown(super().formatStack(stack_info), multiline=True)


# ------------------------------------------------------------------ secrets

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# password=… in a query string or a libpq keyword string, quoted or not
_PASSWORD_PARAM = re.compile(
    r"(?i)(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^&\s]*)",
)
MASK = "***"


def masked_url(raw: str) -> str:
    """A database URL with its password replaced by ``***``: in the user part
    (even with an unescaped ``@`` in the password, whose part before the last
    ``@`` SQLAlchemy would take for the host), in a ``password=`` parameter, and
    in a text that is not a URL at all."""
    out = _PASSWORD_PARAM.sub(lambda m: m.group(1) + MASK, raw)
    scheme = _SCHEME.match(out)
    # a text that does not parse may still hold "user:password@host"
    start = scheme.end() if scheme else (out.find("//") + 2 if "//" in out else 0)
    head, rest = out[:start], out[start:]
    query = rest.find("?")
    # the credentials end at the last "@" before the query; a password with
    # "?" in it has no "@" before that "?", and then the last "@" of all ends them
    before = rest[:query] if query >= 0 else rest
    at = before.rfind("@")
    if at < 0:
        at = rest.rfind("@")
    if at < 0:
        return out
    credentials = rest[:at]
    user, colon, _password = credentials.partition(":")
    if not colon:
        return out
    return f"{head}{user}:{MASK}{rest[at:]}"
