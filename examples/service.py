"""An HTTP service that runs jobs with the embedded orchestrator (standard library only).

    python examples/service.py --port 8080 [--db URL]
    curl -XPOST localhost:8080/jobs -d '{"id": "j1", "input": {"rows": 20, "target": "out.sqlite"}}'
    curl localhost:8080/jobs/j1              # the execution, as `orch show --json`
    curl 'localhost:8080/jobs/j1/result?wait=30'

A job is an execution of examples/etl.yml, run by the worker inside this
process. Kill the service in the middle of a job and start it again: it
finishes the job from its last checkpoint, with no code of its own for that,
and without waiting out the dead process's leases.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere

from examples.app import hooks_registry  # noqa: E402
from orchestrator import ExecutionFailed, Orchestrator, UserError, WaitTimeout  # noqa: E402

PIPELINE = HERE / "etl.yml"


def make_handler(orch):
    class Jobs(BaseHTTPRequestHandler):
        def _send(self, code: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path != "/jobs":
                return self._send(404, {"error": "POST /jobs"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                ex = orch.submit(PIPELINE, body.get("input") or {}, id=body.get("id"))
            except (ValueError, UserError) as exc:
                return self._send(400, {"error": str(exc)})
            self._send(202, ex.as_json())

        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) < 2 or parts[0] != "jobs":
                return self._send(404, {"error": "GET /jobs/ID[/result]"})
            try:
                if len(parts) == 3 and parts[2] == "result":
                    wait = float(parse_qs(url.query).get("wait", ["0"])[0])
                    return self._send(200, {"output": orch.result(parts[1], timeout=wait)})
                self._send(200, orch.get(parts[1]).as_json())
            except WaitTimeout:
                self._send(202, {"status": "running"})
            except ExecutionFailed as exc:
                self._send(500, {"error": str(exc)})
            except UserError as exc:
                self._send(404, {"error": str(exc)})

        def log_message(self, *args) -> None:
            pass

    return Jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", help="database URL (default ORCH_DATABASE_URL or ./orch.sqlite)")
    args = parser.parse_args()
    with Orchestrator.sync(args.db) as orch, orch.worker(hooks_registry, concurrency=4):
        server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(orch))
        stop = threading.Event()

        def on_sigterm(*_: object) -> None:
            stop.set()
            # a second SIGTERM while the worker stops ends it at once, as a second Ctrl-C does
            signal.signal(signal.SIGTERM, signal.default_int_handler)

        signal.signal(signal.SIGTERM, on_sigterm)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(f"serving on http://127.0.0.1:{server.server_port}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        server.shutdown()
    # leaving the `with` drained the worker: running jobs finished or were released


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # stopped twice: what still ran resumes after a restart
        sys.exit(130)
