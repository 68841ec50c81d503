"""examples/service.py is safe to copy: the real service process, a real HTTP
client, the real store. A bad request is answered and writes nothing; a silent
connection is closed; a burst is served; a stop signal drains and exits 0."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import orch_env, run_async, wait_until
from .test_examples import EXAMPLES, rows_in


class Service:
    """examples/service.py on a free port, its output in a file."""

    def __init__(self, db_url: str, tmp_path: Path, *args: str):
        self.out = tmp_path / "out.sqlite"
        self.log_path = tmp_path / f"service-{len(list(tmp_path.glob('service-*.log')))}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "service.py"), "--port", "0", "--db", db_url]
            + ["--out", str(self.out), *args],
            env=orch_env(db_url),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        line = wait_until(self._serving_line, 60, "the service listening")
        self.port = int(line.rsplit(":", 1)[1])

    def _serving_line(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError("the service ended: " + self.log())
        return next((ln for ln in self.log().splitlines() if ln.startswith("serving on")), None)

    def log(self) -> str:
        return self.log_path.read_text()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def post_job(self, doc: object) -> tuple[int, dict]:
        return self.request("POST", "/jobs", json.dumps(doc).encode())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(120)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


@pytest.fixture
def service(tmp_path) -> Iterator:
    started: list[Service] = []

    def start(db_url: str, *args: str) -> Service:
        started.append(Service(db_url, tmp_path, *args))
        return started[-1]

    yield start
    for s in started:
        s.kill()


class AMessage:
    """Equal to any non-empty text: an error's wording is the service's to choose."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other.strip())


def executions_in(store) -> list[str]:
    return [ex.id for ex in run_async(store.list_executions(limit=1000))]


def test_a_bad_request_is_answered_in_json_and_writes_nothing(db_url, store, tmp_path, service):
    svc = service(db_url)
    caller_path = tmp_path / "chosen-by-the-caller.sqlite"

    def job(**input) -> bytes:
        return json.dumps({"id": "j", "input": input}).encode()

    bad_posts = [
        (413, b'{"input": {"rows": 1}, "pad": "' + b"x" * 8000 + b'"}'),  # over the 4 KiB limit
        (400, b'[{"id": "j", "input": {"rows": 1}}]'),  # a JSON list
        (400, b"rows=5"),  # not JSON
        (400, b"\xff\xfe{}"),  # not UTF-8
        (400, b"[" * 3000),  # nested past the parser's depth
        (400, b'"a string"'),
        (400, b""),
        (400, job(rows=1, target=str(caller_path))),  # a path from the caller
        (400, json.dumps({"id": "j", "target": str(caller_path)}).encode()),
        (400, job(rows=1, out="x.sqlite")),  # any other field
        (400, job(rows=0)),
        (400, job(rows=1001)),
        (400, job(rows=-5)),
        (400, job(rows=10**12)),
        (400, job(rows="20")),
        (400, job(rows=2.5)),
        (400, job(rows=True)),
        (400, job(rows=None)),
        (400, job(pace=-0.1)),
        (400, job(pace=2)),
        (400, job(pace="0.1")),
        (400, job(pace=False)),
        (400, b'{"input": {"pace": NaN}}'),
        (400, b'{"input": {"pace": 1e400}}'),
        (400, json.dumps({"id": "j", "input": [1]}).encode()),
        (400, json.dumps({"id": "j", "input": "rows=5"}).encode()),
        (400, json.dumps({"id": 5, "input": {}}).encode()),
        (400, json.dumps({"id": "", "input": {}}).encode()),
        (400, json.dumps({"id": "../etc/passwd", "input": {}}).encode()),
        (400, json.dumps({"id": "x" * 300, "input": {}}).encode()),
    ]
    for code, body in bad_posts:
        assert svc.request("POST", "/jobs", body) == (code, {"error": AMessage()}), body
    assert svc.request("POST", "/jobs", b"{}", {"Content-Length": "2x"})[0] == 400
    assert svc.request("POST", "/other", job(rows=1))[0] == 404
    assert svc.request("PUT", "/jobs", job(rows=1))[0] == 501  # the stdlib's answer, in JSON
    for wait in ("abc", "-1", "121", "nan", "inf"):
        code, doc = svc.request("GET", f"/jobs/j/result?wait={wait}")
        assert code == 400 and "wait" in doc["error"], (wait, doc)

    assert executions_in(store) == []
    assert not caller_path.exists() and not svc.out.exists()

    # and it serves on: a good job runs, and loads into the service's own file
    assert svc.post_job({"id": "good", "input": {"rows": 3}})[0] == 202
    code, doc = svc.request("GET", "/jobs/good/result?wait=60")
    assert (code, doc["output"]) == (200, {"loaded": 3, "target": str(svc.out)})
    assert len(rows_in(svc.out)) == 3 and executions_in(store) == ["good"]
    assert "Traceback" not in svc.log()
    assert svc.stop() == 0


def test_a_silent_connection_is_closed_and_blocks_no_one(db_url, store, service):
    svc = service(db_url, "--timeout", "1")
    idle = socket.create_connection(("127.0.0.1", svc.port), timeout=60)
    stalled = socket.create_connection(("127.0.0.1", svc.port), timeout=60)
    try:
        stalled.sendall(b"POST /jobs HTTP/1.0\r\nContent-Length: 40\r\n\r\n" + b'{"input":')
        assert svc.post_job({"id": "meanwhile", "input": {"rows": 1}})[0] == 202
        assert idle.recv(1) == b""  # closed by the service (a timeout here means it was not)
        answer = b"".join(iter(lambda: stalled.recv(4096), b""))
    finally:
        idle.close()
        stalled.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"408" and "error" in json.loads(body)
    assert executions_in(store) == ["meanwhile"]
    assert svc.stop() == 0


def test_a_burst_of_300_concurrent_requests_is_all_answered(db_url, store, service):
    svc = service(db_url)

    def submit(i: int) -> int:
        return svc.post_job({"id": f"burst-{i}", "input": {"rows": 1}})[0]

    with ThreadPoolExecutor(300) as pool:
        codes = list(pool.map(submit, range(300)))  # a reset connection raises here
    assert codes == [202] * 300
    assert len(executions_in(store)) == 300
    assert svc.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_drains_the_running_job_and_exits_0(db_url, store, service, sig):
    svc = service(db_url)
    assert svc.post_job({"id": "j", "input": {"rows": 10, "pace": 0.2}})[0] == 202
    wait_until(lambda: rows_in(svc.out), 60, "the job loading")
    assert svc.stop(sig) == 0, svc.log()
    ex = run_async(store.get("j"))
    assert ex.status == "completed" and ex.output["loaded"] == 10
    assert len(rows_in(svc.out)) == 10


def test_a_job_given_back_at_the_drain_timeout_resumes_after_a_restart(db_url, store, service):
    svc = service(db_url, "--drain-timeout", "0")
    assert svc.post_job({"id": "j", "input": {"rows": 20, "pace": 0.2}})[0] == 202
    wait_until(lambda: rows_in(svc.out), 60, "the job loading")
    assert svc.stop() == 0, svc.log()
    assert run_async(store.get("j")).status == "queued"  # given back, not lost

    again = service(db_url)
    code, doc = again.request("GET", "/jobs/j/result?wait=60")
    assert (code, doc["output"]["loaded"]) == (200, 20)
    loaded = rows_in(svc.out)
    assert [i for _, i in loaded] == list(range(20)) and len({k for k, _ in loaded}) == 1
    assert again.stop() == 0
