"""A workflow's templates run in Jinja's sandbox; what it names is read at submit.

Every payload here ran code on a worker before (the plain Jinja environment of
flatmachines). Each must now be refused: at submit with exit 2 where it can be
seen, else at run time, failing its execution at once (no retry, no
``on_error``) while the worker lives on and runs the next one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from flatmachines import FlatMachine, HooksRegistry, MemoryBackend
from flatmachines.persistence import config_hash
from jinja2.exceptions import SecurityError

from orchestrator.errors import UserError
from orchestrator.machine_config import load_machine_file
from orchestrator.sandbox import TEMPLATES, GuardedExpressions, sandboxed_flatagent_adapter
from orchestrator.store import NewExecution

from .conftest import orch, run_async, write_machine
from .test_cli import assert_nothing_written, assert_usage_error, ok, orch_json

# each writes a file (the test's marker) if it gets out of the sandbox
PLAIN_ESCAPES = [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ self.__init__.__globals__.__builtins__.open('MARKER', 'w') }}",
    "{{ (cycler|attr('__init__')) }}",
    "{{ range.__globals__ }}",
]
# the same reach, computed at run time: nothing to see at submit
COMPUTED_ESCAPES = [
    "{{ (cycler|attr('__in' ~ 'it__')|attr('__glo' ~ 'bals__')).os.popen('touch MARKER') }}",
    "{{ lipsum[('__glo' ~ 'bals__')]['os'].popen('touch MARKER').read() }}",
    "{{ (''|attr('__cla' ~ 'ss__')|attr('__mr' ~ 'o__'))[1] }}",
    "{{ ('a'|attr('__cla' ~ 'ss__'))|attr('__ba' ~ 'se__') }}",
]


def machine(name: str, *, context=None, states=None, **data) -> dict:
    states = states or {
        "start": {"type": "initial", "transitions": [{"to": "done"}]},
        "done": {"type": "final", "output": {"x": "context.x"}},
    }
    return {
        "spec": "flatmachine",
        "spec_version": "4.2.1",
        "data": {
            "name": name,
            "context": {"name": "input.name", **(context or {})},
            **data,
            "states": states,
        },
    }


def where(payload: str, marker: Path) -> str:
    return payload.replace("MARKER", str(marker))


def in_context(payload: str) -> dict:
    return machine("in-context", context={"x": payload})


def in_output(payload: str) -> dict:
    return machine(
        "in-output",
        states={
            "start": {"type": "initial", "transitions": [{"to": "done"}]},
            "done": {"type": "final", "output": {"x": payload}},
        },
    )


def in_wait_for(payload: str) -> dict:
    return machine(
        "in-wait-for",
        states={
            "start": {"type": "initial", "transitions": [{"to": "wait"}]},
            # on_error must not see a refusal: it is not the workflow's error
            "wait": {"wait_for": payload, "on_error": "done", "transitions": [{"to": "done"}]},
            "done": {"type": "final", "output": {"x": "context.name"}},
        },
    )


# ------------------------------------------------------------------ the environment


def test_the_sandbox_renders_what_the_library_renders():
    """The filters, globals and finalize workflows use today give the same text."""
    library = FlatMachine(
        config_dict=machine("m"), persistence=MemoryBackend(), hooks_registry=HooksRegistry()
    )._jinja_env
    assert set(library.filters) <= set(TEMPLATES.filters)
    assert set(library.globals) <= set(TEMPLATES.globals)
    variables = {"context": {"n": 3, "xs": ["a", "b"], "m": {"k": 1}, "s": '["x"]'}}
    for text in [
        "{{ context.n * 2 }}",
        "{{ context.xs }}",
        "{{ context.m }}",
        "{{ context.s | fromjson }}",
        "{% for i in context.xs %}{{ loop.index }}{{ i | upper }}{% endfor %}",
        "{{ context.xs | join(',') }} {{ context.m.k }} {{ range(3) | list }}",
        "{{ '%s-%d' % ('a', 1) }} {{ context.xs | length }} {{ 'x' * 3 }}",
        "{% set ns = namespace(t=0) %}{% for i in range(4) %}{% set ns.t = ns.t + i %}"
        "{% endfor %}{{ ns.t }}",
        "{{ context.missing is defined }} {{ context.n | string }}",
    ]:
        expected = library.from_string(text).render(**variables)
        assert TEMPLATES.from_string(text).render(**variables) == expected, text


@pytest.mark.parametrize("payload", PLAIN_ESCAPES + COMPUTED_ESCAPES)
def test_every_escape_is_refused_by_the_sandbox(payload, tmp_path):
    marker = tmp_path / "MARKER"
    with pytest.raises(SecurityError):
        TEMPLATES.from_string(where(payload, marker)).render(context={"name": "n"})
    assert not marker.exists()


def test_operators_that_would_exhaust_a_worker_are_bounded():
    for text in ["{{ 'x' * 10**9 }}", "{{ [1] * 10**8 }}", "{{ 9 ** 999999 }}"]:
        with pytest.raises(SecurityError):
            TEMPLATES.from_string(text).render()
    assert TEMPLATES.from_string("{{ 2 ** 64 }} {{ 'ab' * 3 }}").render() == (
        "18446744073709551616 ababab"
    )


def test_a_condition_that_reaches_python_internals_is_refused():
    from flatmachines.expressions.simple import SimpleExpressionEngine

    from orchestrator.sandbox import WorkflowRefused

    engine = GuardedExpressions(SimpleExpressionEngine())
    assert engine.evaluate("context.n >= 2 and context._error == None", {"context": {"n": 3}})
    with pytest.raises(WorkflowRefused):
        engine.evaluate("context.name.__class__ == 1", {"context": {"name": "x"}})


def test_an_agents_prompts_render_in_the_sandbox(tmp_path):
    adapter = sandboxed_flatagent_adapter()
    if adapter is None:
        pytest.skip("flatagents is not installed")  # the dev extra installs it
    from flatmachines.agents import AgentAdapterContext, normalize_agent_ref

    marker = tmp_path / "MARKER"
    agent = {
        "spec": "flatagent",
        "spec_version": "4.2.1",
        "data": {
            "name": "a",
            "model": {"provider": "openai", "name": "gpt-4o-mini"},
            "system": "You help.",
            "user": where(COMPUTED_ESCAPES[0], marker),
        },
    }
    executor = adapter.create_executor(
        agent_name="a",
        agent_ref=normalize_agent_ref(agent),
        context=AgentAdapterContext(config_dir=str(tmp_path), settings={}, machine_name="m"),
    )
    with pytest.raises(SecurityError):
        executor._agent._compiled_user.render(input={})
    assert not marker.exists()


# ------------------------------------------------------------------ at submit


@pytest.mark.parametrize("payload", PLAIN_ESCAPES)
@pytest.mark.parametrize("shape", [in_context, in_output, in_wait_for])
def test_a_visible_escape_is_refused_at_submit(payload, shape, tmp_path):
    marker = tmp_path / "MARKER"
    path = write_machine(tmp_path / "m.yml", shape(where(payload, marker)))
    with pytest.raises(UserError, match="refused"):
        load_machine_file(path)
    assert not marker.exists()


def test_a_template_that_does_not_parse_is_refused_at_submit(db_url, tmp_path):
    path = write_machine(tmp_path / "m.yml", in_output("{{ context.name ]}"))
    line = assert_usage_error(orch("submit", str(path), db_url=db_url), "data.states.done.output.x")
    assert "does not parse" in line
    assert_nothing_written(db_url)
    cond = machine(
        "cond",
        states={
            "start": {
                "type": "initial",
                "transitions": [{"condition": "context.name.__class__", "to": "done"}],
            },
            "done": {"type": "final"},
        },
    )
    path = write_machine(tmp_path / "c.yml", cond)
    assert_usage_error(orch("submit", str(path), db_url=db_url), "__class__", "condition")
    assert_nothing_written(db_url)


def test_an_escape_is_refused_by_orch_submit_and_nothing_is_written(db_url, tmp_path):
    marker = tmp_path / "MARKER"
    path = write_machine(tmp_path / "m.yml", in_context(where(PLAIN_ESCAPES[0], marker)))
    assert_usage_error(orch("submit", str(path), db_url=db_url), "data.context.x", "__")
    assert_nothing_written(db_url)
    assert not marker.exists()


# ------------------------------------------------------------------ at run time


def plant(store, config: dict, ex_id: str, *, max_attempts: int = 3, raw: str | None = None):
    """Put a config and an execution of it in the store as a writer of the store
    could, past every check of submit."""
    raw = raw if raw is not None else yaml.safe_dump(config, sort_keys=False)
    digest = config_hash(raw)

    async def go():
        await store.put_config(digest, config["data"]["name"], raw)
        await store.submit(
            [
                NewExecution(
                    id=ex_id,
                    machine=config["data"]["name"],
                    config_hash=digest,
                    input={"name": "n"},
                    max_attempts=max_attempts,
                )
            ]
        )

    run_async(go())
    return digest


def shown(db_url: str, ex_id: str) -> dict:
    return orch_json("show", ex_id, db_url=db_url)


def test_escapes_computed_at_run_time_fail_their_execution_and_the_worker_goes_on(
    db_url, tmp_path, store
):
    marker = tmp_path / "MARKER"
    cases = {}
    for i, payload in enumerate(COMPUTED_ESCAPES):
        for shape in (in_context, in_output, in_wait_for):
            config = shape(where(payload, marker))
            path = write_machine(tmp_path / f"m{i}-{shape.__name__}.yml", config)
            ex_id = f"x{i}-{shape.__name__}"
            # submit sees nothing: the name is computed
            ok(
                orch(
                    "submit",
                    str(path),
                    "--id",
                    ex_id,
                    "--max-attempts",
                    "3",
                    "--input",
                    '{"name": "n"}',
                    db_url=db_url,
                )
            )
            cases[ex_id] = shape.__name__
    # the plain ones too, when they reach the store past submit
    plant(store, in_context(where(PLAIN_ESCAPES[0], marker)), "planted")
    good = write_machine(tmp_path / "good.yml", in_output("{{ context.name }}-ok"))
    ok(orch("submit", str(good), "--id", "good", "--input", '{"name": "n"}', db_url=db_url))

    r = orch("worker", "--burst", "--concurrency", "4", db_url=db_url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for ex_id in [*cases, "planted"]:
        ex = shown(db_url, ex_id)
        assert ex["status"] == "failed", (ex_id, ex["status"], ex["error"])
        assert ex["attempt"] == 1, ex_id  # refused again on any retry: not retried
        assert ex["error"].startswith("template refused by the sandbox: access to attribute")
        assert "Traceback" not in ex["error"]
    assert shown(db_url, "good")["output"] == {"x": "n-ok"}
    assert not marker.exists()
    assert not (tmp_path / "MARKER").exists()


def test_a_config_changed_in_the_store_after_submit_is_not_run(db_url, tmp_path, store):
    marker = tmp_path / "MARKER"
    path = write_machine(tmp_path / "m.yml", in_output("{{ context.name }}"))
    ok(orch("submit", str(path), "--id", "t", "--input", '{"name": "n"}', db_url=db_url))
    digest = load_machine_file(path).hash
    tampered = yaml.safe_dump(in_output(where(PLAIN_ESCAPES[0], marker)), sort_keys=False)

    async def tamper():
        def tx(conn):
            conn.execute(
                sa.text("UPDATE configs SET raw = :raw WHERE hash = :h"),
                {"raw": tampered, "h": digest},
            )

        await store.db.write(tx)

    run_async(tamper())
    r = orch("worker", "--burst", db_url=db_url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ex = shown(db_url, "t")
    assert ex["status"] == "failed"
    assert ex["error"].startswith("config does not match its hash")
    assert ex["history"] == []  # nothing of it ran
    assert not marker.exists()


def test_a_pinned_config_that_names_a_file_is_not_read_from_the_workers_disk(
    db_url, tmp_path, store
):
    child = write_machine(tmp_path / "child.yml", in_output("{{ context.name }}"))
    parent = machine(
        "parent",
        machines={"child": str(child)},
        states={
            "start": {"type": "initial", "transitions": [{"to": "call"}]},
            "call": {
                "machine": "child",
                "input": {"name": "context.name"},
                "output_to_context": {"x": "output.x"},
                "transitions": [{"to": "done"}],
            },
            "done": {"type": "final", "output": {"x": "context.x"}},
        },
    )
    plant(store, parent, "p", max_attempts=1)
    r = orch("worker", "--burst", db_url=db_url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ex = shown(db_url, "p")
    assert ex["status"] == "failed"
    assert "names a file for machine 'child'" in ex["error"]
    assert ex["children"] == []


# ------------------------------------------------------------------ files named by a workflow


def agent_machine(ref: str) -> dict:
    return machine(
        "agented",
        agents={"a": ref},
        states={
            "start": {"type": "initial", "transitions": [{"to": "ask"}]},
            "ask": {"agent": "a", "input": {"q": "context.name"}, "transitions": [{"to": "done"}]},
            "done": {"type": "final"},
        },
    )


def an_agent(user: str = "Answer {{ input.q }}") -> dict:
    return {
        "spec": "flatagent",
        "spec_version": "4.2.1",
        "data": {
            "name": "a",
            "model": {"provider": "openai", "name": "m"},
            "system": "s",
            "user": user,
        },
    }


def test_files_outside_the_machines_folder_need_an_opt_in(db_url, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    write_machine(outside / "agent.yml", an_agent())
    home = tmp_path / "wf"
    home.mkdir()
    refs = ["../elsewhere/agent.yml", str(outside / "agent.yml")]
    paths = [write_machine(home / f"m{i}.yml", agent_machine(ref)) for i, ref in enumerate(refs)]
    for path in paths:
        assert_usage_error(
            orch("submit", str(path), db_url=db_url),
            "outside the machine's folder",
            "--allow-outside-refs",
        )
        assert_nothing_written(db_url)
    for path in paths:
        ok(orch("submit", str(path), "--allow-outside-refs", db_url=db_url))
    assert [e["machine"] for e in orch_json("list", db_url=db_url)] == ["agented"] * 2


def test_a_file_that_is_not_there_or_not_yaml_is_refused_without_its_content(db_url, tmp_path):
    secret = "hunter2-do-not-show"
    (tmp_path / "agent.yml").write_text(f"key: [{secret}\n")  # not YAML
    path = write_machine(tmp_path / "m.yml", agent_machine("./agent.yml"))
    line = assert_usage_error(orch("submit", str(path), db_url=db_url), "cannot be read")
    assert secret not in line
    child_missing = machine(
        "p",
        machines={"child": "./nope.yml"},
        states={
            "start": {"type": "initial", "transitions": [{"to": "done"}]},
            "done": {"type": "final"},
        },
    )
    path = write_machine(tmp_path / "p.yml", child_missing)
    assert_usage_error(
        orch("submit", str(path), db_url=db_url), "machine 'child' file", "not found"
    )
    assert_nothing_written(db_url)


def test_an_agents_prompt_file_is_embedded_and_checked_at_submit(tmp_path):
    agents = tmp_path / "agents"
    agents.mkdir()
    agent = an_agent()
    del agent["data"]["user"], agent["data"]["system"]
    agent["data"]["prompt"] = "./prompt.yml"
    agent["data"]["profile"] = {
        "spec": "flatprofile",
        "spec_version": "4.2.1",
        "data": {"model_profiles": {"p": {"provider": "openai", "name": "m"}}, "default": "p"},
    }
    del agent["data"]["model"]
    write_machine(agents / "agent.yml", agent)
    write_machine(agents / "prompt.yml", {"spec": "prompt", "data": {"user": "Q: {{ input.q }}"}})
    config = load_machine_file(
        write_machine(tmp_path / "m.yml", agent_machine("./agents/agent.yml"))
    )
    embedded = yaml.safe_load(config.raw)["data"]["agents"]["a"]
    assert embedded["data"]["prompt"]["data"]["user"] == "Q: {{ input.q }}"
    write_machine(agents / "prompt.yml", {"data": {"user": "{{ lipsum.__globals__ }}"}})
    with pytest.raises(UserError, match="__globals__"):
        load_machine_file(tmp_path / "m.yml")


def test_data_is_never_rendered_as_a_template(db_url, tmp_path):
    path = write_machine(tmp_path / "m.yml", in_output("{{ context.name }}"))
    sneaky = "{{ cycler.__init__.__globals__ }}{{ 7 * 7 }}"
    ok(
        orch(
            "submit", str(path), "--id", "d", "--input", json.dumps({"name": sneaky}), db_url=db_url
        )
    )
    assert orch("worker", "--burst", db_url=db_url, cwd=tmp_path).returncode == 0
    assert shown(db_url, "d")["output"] == {"x": sneaky}
