"""Limits a workflow cannot get around: the checkpoints resume needs.

Real `orch` commands and `orch worker --burst` processes, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import pytest
import yaml

from .conftest import chain_machine, orch, write_machine
from .test_cli import assert_nothing_written, assert_usage_error, ok, orch_json

SPEC = {"spec": "flatmachine", "spec_version": "4.2.1"}


# ------------------------------------------------------ checkpoint_on at submit


@pytest.mark.parametrize(
    "checkpoint_on, missing",
    [
        ([], "add state_exit, machine_end"),
        (["state_enter", "execute"], "add state_exit, machine_end"),
        (["machine_start", "state_exit"], "add machine_end,"),
        (["machine_end", "waiting"], "add state_exit,"),
        ("state_exit", "add state_exit, machine_end"),  # a string, not a list
        (None, "add state_exit, machine_end"),
    ],
)
def test_checkpoint_on_without_the_durable_events_is_refused(
    checkpoint_on, missing, db_url, tmp_path
):
    machine = yaml.safe_load(chain_machine(tmp_path / "m.yml", ["add"]).read_text())
    machine["data"]["persistence"] = {"checkpoint_on": checkpoint_on}
    write_machine(tmp_path / "m.yml", machine)
    r = orch("submit", "m.yml", db_url=db_url, cwd=tmp_path)
    assert_usage_error(r, "m.yml", "checkpoint_on", missing, "remove checkpoint_on")
    assert_nothing_written(db_url)


def test_checkpoint_on_with_the_durable_events_is_taken(db_url, tmp_path):
    chain_machine(tmp_path / "m.yml", ["add"], checkpoint_on=["state_exit", "machine_end"])
    ex_id = ok(orch("submit", "m.yml", db_url=db_url, cwd=tmp_path)).stdout.strip()
    assert [e["id"] for e in orch_json("list", db_url=db_url)] == [ex_id]
