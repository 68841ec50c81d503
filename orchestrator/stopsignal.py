"""A stop signal that arrives while a long-running command is still starting.

`orch worker`, `orch scheduler` and `orch up` drain on SIGTERM/SIGINT, but their
loops install the handlers that drain only once the app is imported and the store
is open. Before that, the default action would kill the process (exit -15) with
its start-up half done. :func:`hold` is called first thing instead: from then on a
stop signal is remembered, and whoever installs the real handlers asks
:func:`received` and stops at once, cleanly, having claimed nothing.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_held = False
_received = False


def _note(signum: int, frame: object) -> None:
    global _received
    _received = True


def hold() -> None:
    """Remember SIGTERM/SIGINT instead of dying of them, until a loop takes them."""
    global _held
    _held = True
    for sig in STOP_SIGNALS:
        signal.signal(sig, _note)


def rehold() -> None:
    """After a loop gave its handlers back (to the default action): hold again, if
    this process held before."""
    if _held:
        hold()


def note() -> None:
    """A handler of our own saw a stop signal: remember it, as :func:`hold` does."""
    global _received
    _received = True


def received() -> bool:
    return _received
