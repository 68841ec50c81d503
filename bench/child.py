"""Run one benchmark function in a fresh interpreter.

    python -m bench.child MODULE:FUNCTION '{"kwarg": ...}'

The function may be async. Its return value is printed as one JSON line after
``BENCH_RESULT `` (bench.common.parse_result reads it back).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import sys

from bench.common import RESULT_MARK


def main() -> None:
    target, raw = sys.argv[1], sys.argv[2]
    module_name, _, func_name = target.partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(**json.loads(raw))
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
