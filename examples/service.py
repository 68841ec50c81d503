"""An HTTP service that runs jobs with the embedded orchestrator (standard library only).

    python examples/service.py --port 8080 [--db URL] [--out etl-out.sqlite]
    curl -XPOST localhost:8080/jobs -d '{"id": "j1", "input": {"rows": 20}}'
    curl localhost:8080/jobs/j1              # the execution, as `orch show --json`
    curl 'localhost:8080/jobs/j1/result?wait=30'

A job is an execution of examples/etl.yml, run by the worker inside this
process. It loads its rows into the service's own file (--out): a caller
chooses only how many rows (1-1000) and a pace (0-1 s a row), never a path.
Kill the service in the middle of a job and start it again: it finishes the
job from its last checkpoint, with no code of its own for that, and without
waiting out the dead process's leases. SIGTERM or Ctrl-C stops taking
requests and drains the worker: a running job finishes, or after
--drain-timeout is given back, to resume at the next start. A second
signal ends it at once (exit 130); a job it ran resumes at the next start.

A request is checked before anything is written: a POST body is at most
4 KiB of {"id": "...", "input": {"rows": ..., "pace": ...}} (each optional)
and nothing else, or it is answered 400 (413 when larger) with
{"error": "..."}. A connection that sends nothing is closed after --timeout
seconds; a burst of connections waits in the listen backlog, not reset.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere

from examples.app import hooks_registry  # noqa: E402
from orchestrator import ExecutionFailed, Orchestrator, UserError, WaitTimeout  # noqa: E402
from orchestrator.errors import OrchError  # noqa: E402

PIPELINE = HERE / "etl.yml"
MAX_BODY = 4096  # bytes; a job request is a few dozen
MAX_DISCARD = 1 << 20  # a larger body is read and dropped up to this, so its sender hears the 413
MAX_ROWS = 1000
MAX_PACE = 1.0  # seconds between loaded rows
MAX_WAIT = 120.0  # seconds a GET .../result?wait= may hold its connection
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class BadRequest(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def job_request(raw: bytes) -> tuple[str | None, dict[str, Any]]:
    """The id and input of a POST /jobs body, checked (BadRequest says what is wrong)."""
    try:
        body = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError too
        raise BadRequest(400, f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(400, "the body is not a job request: it is nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(400, 'the body must be a JSON object: {"id": ..., "input": {...}}')
    if unknown := sorted(set(body) - {"id", "input"}):
        raise BadRequest(400, f"unknown field(s) {unknown}: a job request has 'id' and 'input'")
    job_id = body.get("id")
    if job_id is not None and not (isinstance(job_id, str) and JOB_ID.fullmatch(job_id)):
        raise BadRequest(
            400,
            "'id' must be 1-100 letters, digits, '.', '_' or '-', and start with a letter or digit",
        )
    given = body.get("input", {})
    if not isinstance(given, dict):
        raise BadRequest(400, "'input' must be a JSON object")
    if unknown := sorted(set(given) - {"rows", "pace"}):
        raise BadRequest(
            400,
            f"unknown input field(s) {unknown}: a job takes 'rows' and 'pace'"
            " (where it loads is the service's --out)",
        )
    rows = given.get("rows", 10)
    if type(rows) is not int or not 1 <= rows <= MAX_ROWS:
        raise BadRequest(400, f"'rows' must be a whole number from 1 to {MAX_ROWS}")
    pace = given.get("pace", 0)
    if type(pace) not in (int, float) or not 0 <= pace <= MAX_PACE:  # NaN fails the comparison
        raise BadRequest(400, f"'pace' must be a number of seconds from 0 to {MAX_PACE:g}")
    return job_id, {"rows": rows, "pace": pace}


def wait_seconds(query: str) -> float:
    values = parse_qs(query).get("wait", ["0"])
    try:
        wait = float(values[-1])
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT:
        raise BadRequest(400, f"'wait' must be a number of seconds from 0 to {MAX_WAIT:g}")
    return wait


class JobServer(ThreadingHTTPServer):
    """The HTTP server and what its handlers need: the orchestrator and the
    service's own settings (never the caller's)."""

    request_queue_size = 1024  # the stdlib's 5 resets connections under a burst
    daemon_threads = True

    def __init__(self, address: tuple[str, int], *, out: Path, idle_timeout: float):
        super().__init__(address, Jobs)
        self.orch: Any = None
        self.out = out
        self.idle_timeout = idle_timeout
        self.stopping = threading.Event()
        self._busy = 0
        self._idle = threading.Condition()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._idle:
            self._busy += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def stop(self, grace: float) -> None:
        """Take no more requests; give those in flight up to ``grace`` seconds."""
        self.stopping.set()
        self.shutdown()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, grace)
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the caller went away or stalled: nothing to answer, nothing broke
        super().handle_error(request, client_address)


class Jobs(BaseHTTPRequestHandler):
    server: JobServer

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # each read on the socket, not the whole request
        super().setup()

    def _send(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # the stdlib's own answers (a bad request line, an unknown method) in JSON too
        self.close_connection = True
        self._send(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise BadRequest(411, "send the body with a Content-Length")
        length = self.headers.get("Content-Length", "0").strip()
        if not (length.isascii() and length.isdigit()):
            self.close_connection = True
            raise BadRequest(400, "Content-Length must be a number of bytes")
        size = int(length)
        if size > MAX_BODY:
            if size <= MAX_DISCARD:
                self._discard(size)
            self.close_connection = True
            raise BadRequest(
                413, f"the body is {length} bytes; a job request is at most {MAX_BODY}"
            )
        raw = self.rfile.read(size)
        if len(raw) < size:
            self.close_connection = True
            raise BadRequest(400, "the body is shorter than its Content-Length")
        return raw

    def _discard(self, size: int) -> None:
        while size > 0:
            chunk = self.rfile.read(min(size, 65536))
            if not chunk:
                return
            size -= len(chunk)

    def _refuse_when_stopping(self) -> None:
        if self.server.stopping.is_set():
            self.close_connection = True
            raise BadRequest(503, "the service is stopping")

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        try:
            raw = self._body()
            if self.path != "/jobs":
                raise BadRequest(404, "POST /jobs")
            job_id, job_input = job_request(raw)
            self._refuse_when_stopping()
            ex = self.server.orch.submit(
                PIPELINE, {**job_input, "target": str(self.server.out)}, id=job_id
            )
        except BadRequest as exc:
            return self._send(exc.code, {"error": str(exc)})
        except TimeoutError:
            self.close_connection = True
            return self._send(408, {"error": "the body did not arrive in time"})
        except UserError as exc:
            return self._send(400, {"error": str(exc)})
        except OrchError as exc:  # the store did not answer
            return self._send(503, {"error": str(exc)})
        self._send(202, ex.as_json())

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        match url.path.split("/"):
            case ["", "jobs", job_id] if job_id:
                wanted = "execution"
            case ["", "jobs", job_id, "result"] if job_id:
                wanted = "result"
            case _:
                return self._send(404, {"error": "GET /jobs/ID[/result[?wait=SECONDS]]"})
        orch = self.server.orch
        try:
            self._refuse_when_stopping()
            if wanted == "execution":
                return self._send(200, orch.get(job_id).as_json())
            deadline = time.monotonic() + wait_seconds(url.query)
            while True:  # in slices, so that a stopping service does not wait out a long poll
                try:
                    left = max(0.0, deadline - time.monotonic())
                    return self._send(200, {"output": orch.result(job_id, timeout=min(left, 1.0))})
                except WaitTimeout:
                    if left <= 1.0 or self.server.stopping.is_set():
                        raise
        except BadRequest as exc:
            self._send(exc.code, {"error": str(exc)})
        except WaitTimeout:
            self._send(202, {"status": "running"})
        except ExecutionFailed as exc:
            self._send(500, {"error": str(exc)})
        except UserError as exc:
            self._send(404, {"error": str(exc)})
        except OrchError as exc:
            self._send(503, {"error": str(exc)})

    def log_message(self, *args: Any) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", help="database URL (default ORCH_DATABASE_URL or ./orch.sqlite)")
    parser.add_argument(
        "--out", default="etl-out.sqlite", help="the SQLite file jobs load into (etl-out.sqlite)"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds a connection may stay silent (10)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds a stop waits for running jobs before giving them back (30)",
    )
    args = parser.parse_args()
    if args.timeout <= 0 or args.drain_timeout < 0:
        parser.error("--timeout must be more than 0 and --drain-timeout not less than 0")
    out = Path(args.out).resolve()
    if not out.parent.is_dir():
        parser.error(f"--out {args.out}: no folder {out.parent} to write it in")
    stop = threading.Event()

    def on_stop(*_: object) -> None:
        stop.set()
        # a second signal while the worker stops ends it at once, as a second Ctrl-C does
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    try:
        server = JobServer(("127.0.0.1", args.port), out=out, idle_timeout=args.timeout)
    except OSError as exc:
        print(f"service: cannot listen on 127.0.0.1:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        with (
            Orchestrator.sync(args.db) as orch,
            orch.worker(hooks_registry, concurrency=4, drain_timeout=args.drain_timeout),
        ):
            server.orch = orch
            threading.Thread(target=server.serve_forever, daemon=True).start()
            print(f"serving on http://127.0.0.1:{server.server_port}", flush=True)
            stop.wait()
            print("stopping: no more requests; draining the worker", flush=True)
            server.stop(grace=args.timeout)
        # leaving the worker's `with` drained it: running jobs finished or were given back
    except OrchError as exc:
        print(f"service: {exc}", file=sys.stderr)
        return 2
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # stopped twice: what still ran resumes after a restart
        sys.exit(130)
