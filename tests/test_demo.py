"""`orch demo`: the one-minute tour runs end to end and leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment names ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in blob and state != "Z":
            found.append(int(entry.name))
    return found


def test_orch_demo_runs_end_to_end_and_leaves_no_process(tmp_path):
    where = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "160"
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "--dir", str(where)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "SIGKILLed worker pid" in out and "in the middle of etl-1" in out
    assert "etl-1 resumed on worker pid" in out and "state load" in out
    assert "sent the approval signal: taken by approval" in out
    assert "what ran where" in out and "Traceback" not in out
    assert out.count("completed") >= 9
    assert processes_mentioning(str(where)) == []

    again = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "--dir", str(where)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 2 and "fresh store" in again.stderr
