"""Processes we start never outlive the process that started them.

Linux's parent-death signal: a child started with ``preexec_fn=die_with_parent``
gets SIGTERM (it drains, as on any SIGTERM) the moment its parent dies, even
by SIGKILL, when no parent is left to stop it in order.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the lease still bounds what an orphan can hold
    if os.getppid() == 1:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
