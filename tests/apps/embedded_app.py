"""An application that embeds the orchestrator: `python embedded_app.py URL MACHINE N`.

It submits N pipelines (ids pipe-0 … pipe-N-1; the same ids again when it is
started again) and runs them on an in-process worker until all are done. It
writes no recovery code of its own: started again after a crash, it finishes
what its predecessor left. The default 30 s lease TTL applies.
"""

import asyncio
import sys

from testapp import hooks_registry

from orchestrator import Orchestrator


async def main(url: str, machine: str, n: int) -> None:
    async with Orchestrator(url) as orch:
        async with orch.worker(hooks_registry, concurrency=4):
            ids = [f"pipe-{i}" for i in range(n)]
            for ex_id in ids:
                await orch.submit(machine, {"sleep": 1.0}, id=ex_id)
            print("submitted", flush=True)
            for ex_id in ids:
                await orch.result(ex_id, timeout=300)
            print("all done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
