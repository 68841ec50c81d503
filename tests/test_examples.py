"""Every example in examples/ runs, as its header says, with real workers."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa

from orchestrator.clock import utcnow
from orchestrator.store.models import executions

from .conftest import ROOT, orch, orch_env, run_async, wait_until

EXAMPLES = ROOT / "examples"


def ok(r):
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def get(store, ex_id):
    return run_async(store.get(ex_id))


def rows_in(path: Path) -> list[tuple]:
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT load_key, id FROM items ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return []  # no table yet
    finally:
        db.close()


def test_counter_the_readme_main_job(db_url, tmp_path):
    ok(
        orch(
            "submit",
            str(EXAMPLES / "counter.yml"),
            "--input",
            '{"n": 5}',
            "--id",
            "c",
            db_url=db_url,
        )
    )
    ok(orch("worker", "--app", "examples.app", "--burst", db_url=db_url))
    assert json.loads(ok(orch("result", "c", db_url=db_url)).stdout) == {"acc": 15, "n": 5}


def test_etl_killed_mid_load_adds_no_duplicate_row(db_url, store, tmp_path, workers):
    target = tmp_path / "out.sqlite"
    data = json.dumps({"rows": 20, "target": str(target), "pace": 0.1})
    ok(orch("submit", str(EXAMPLES / "etl.yml"), "--input", data, "--id", "etl", db_url=db_url))
    first = workers(db_url, "--app", "examples.app")
    wait_until(lambda: len(rows_in(target)) >= 5, 60, "the load half done")
    first.signal(signal.SIGKILL)
    first.wait()
    assert len(rows_in(target)) < 20
    second = workers(db_url, "--app", "examples.app", "--burst")
    assert second.wait() == 0
    ex = get(store, "etl")
    assert ex.status == "completed" and ex.output["loaded"] == 20
    loaded = rows_in(target)
    assert [i for _, i in loaded] == list(range(20))  # each row once
    assert len({key for key, _ in loaded}) == 1  # both runs of the load wrote under one key


def test_coordinator_fans_out_in_batches_until_done(db_url, store, workers):
    data = json.dumps({"items": ["a", "b", "bad", "c", "d"], "batch": 2})
    ok(
        orch(
            "submit",
            str(EXAMPLES / "coordinator.yml"),
            "--input",
            data,
            "--id",
            "co",
            db_url=db_url,
        )
    )
    procs = [
        workers(db_url, "--app", "examples.app", "--burst", "--concurrency", "2") for _ in range(2)
    ]
    assert [p.wait() for p in procs] == [0, 0]
    ex = get(store, "co")
    assert ex.status == "completed"
    assert ex.output == {"done": ["A", "B", "C", "D"], "failed": ["refused: 'bad' is not work"]}
    assert len(run_async(store.children("co"))) == 5


@pytest.mark.parametrize("answer", ["signal", "deadline"])
def test_approval_by_signal_or_by_its_deadline(db_url, store, workers, answer):
    ok(
        orch(
            "submit",
            str(EXAMPLES / "approval.yml"),
            "--input",
            '{"request": "deploy v2"}',
            "--id",
            "req-1",
            db_url=db_url,
        )
    )
    w = workers(db_url, "--app", "examples.app")
    wait_until(lambda: get(store, "req-1").status == "waiting", 60, "the approval waiting")
    if answer == "signal":
        ok(orch("signal", "approval/req-1", "--data", '{"ok": true, "by": "alice"}', db_url=db_url))
        expected = {"request": "deploy v2", "decision": "approved", "by": "alice"}
    else:
        # a day passes: the deadline is now behind us
        run_async(
            store.db.write(
                lambda conn: conn.execute(
                    sa.update(executions)
                    .where(executions.c.id == "req-1")
                    .values(wake_at=utcnow() - timedelta(seconds=1))
                )
            )
        )
        expected = {"request": "deploy v2", "decision": "expired"}
    wait_until(lambda: get(store, "req-1").status == "completed", 60, "a decision")
    assert get(store, "req-1").output == expected
    w.signal(signal.SIGTERM)
    assert w.wait() == 0


def test_the_embedded_service_finishes_its_jobs_after_a_restart(db_url, store, tmp_path):
    target = tmp_path / "out.sqlite"
    env = orch_env(db_url)

    def start() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "service.py"), "--port", "0", "--db", db_url]
            + ["--out", str(target)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen = []
        watchdog = threading.Timer(60, proc.kill)  # a service that never starts ends the read
        watchdog.start()
        try:
            for line in proc.stdout:
                seen.append(line)
                if "serving on" in line:
                    return proc, line.split()[-1]
        finally:
            watchdog.cancel()
        raise AssertionError("the service did not start: " + "".join(seen))

    def call(base: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(
            base + path, data=json.dumps(body).encode() if body is not None else None
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    service, base = start()
    try:
        for i in range(3):
            code, doc = call(
                base,
                "/jobs",
                {"id": f"job-{i}", "input": {"rows": 10, "pace": 0.2}},
            )
            assert code == 202 and doc["id"] == f"job-{i}"
        assert call(base, "/jobs/nope")[0] == 404
        wait_until(lambda: len(rows_in(target)) >= 6, 60, "jobs half loaded")
        service.send_signal(signal.SIGKILL)
        service.wait(30)
    finally:
        if service.poll() is None:
            service.kill()
    assert len(rows_in(target)) < 30

    service, base = start()
    try:
        for i in range(3):
            code, doc = call(base, f"/jobs/job-{i}/result?wait=120")
            assert code == 200 and doc["output"]["loaded"] == 10, doc
        assert call(base, "/jobs/job-0")[1]["status"] == "completed"
        service.send_signal(signal.SIGTERM)
        assert service.wait(60) == 0
    finally:
        if service.poll() is None:
            service.kill()
    assert len(rows_in(target)) == 30  # every row of every job, once


# -------------------------------------------------------------------- agent


class FakeOpenAI(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint on 127.0.0.1 that classifies every ticket
    as billing, and counts the calls it gets."""

    calls: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.calls.append(body)
        answer = {
            "id": f"chatcmpl-{len(FakeOpenAI.calls)}",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "gpt-4o-mini"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {
                        "role": "assistant",
                        "content": json.dumps({"category": "billing", "urgent": False}),
                    },
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_openai():
    FakeOpenAI.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


@pytest.mark.parametrize("llm", ["offline", "local-endpoint"])
def test_agent_triage_and_a_committed_llm_call_is_never_made_again(
    db_url, store, tmp_path, workers, fake_openai, llm
):
    """The worker dies right after the classify state committed; the worker that
    resumes the triage does not call the model again."""
    shutil.copytree(EXAMPLES / "agent", tmp_path / "agent")
    calls = tmp_path / "agent-calls.log"
    extra = {"ORCH_TEST_DIE_ONCE": str(tmp_path / "died"), "ORCH_EXAMPLE_AGENT_CALLS": str(calls)}
    if llm == "local-endpoint":
        extra.update(OPENAI_BASE_URL=fake_openai, OPENAI_API_KEY="sk-test")
    ok(
        orch(
            "submit",
            str(tmp_path / "agent" / "triage.yml"),
            "--input",
            '{"ticket": "The site is down, nobody can log in"}',
            "--id",
            "t1",
            db_url=db_url,
        )
    )
    first = workers(db_url, "--app", "agentapp", **extra)
    assert first.wait() == -signal.SIGKILL
    assert [h.state for h in run_async(store.history("t1")) if h.event == "state_exit"][
        -1
    ] == "classify"
    second = workers(db_url, "--app", "agentapp", "--burst", **extra)
    assert second.wait() == 0, second.log()
    ex = get(store, "t1")
    assert ex.status == "completed"
    if llm == "offline":
        assert ex.output == {"category": "outage", "urgent": True, "team": "on-call"}
        assert calls.read_text().splitlines() == ["t1"]  # one call, by the first worker
    else:
        assert ex.output == {"category": "billing", "urgent": False, "team": "finance"}
        assert len(FakeOpenAI.calls) == 1  # through litellm to the endpoint, once
        assert "nobody can log in" in json.dumps(FakeOpenAI.calls[0]["messages"])
        assert not calls.exists()
