"""Retry policy for errors a machine does not handle itself (no ``on_error``)."""

from __future__ import annotations

import random


def backoff_delay(
    attempt: int, base: float, cap: float, rand: random.Random | None = None
) -> float:
    """Seconds to wait before the attempt after ``attempt`` (1-based).

    Exponential (base, 2·base, 4·base, … up to cap) with equal jitter: the delay
    is drawn from [d/2, d], so retries of many executions that failed together
    spread out, while each delay still grows with the attempt.
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    r = (rand or random).random()
    return ceiling / 2 + ceiling / 2 * r
