"""The ``orch`` command.

Exit codes: 0 ok · 1 the execution ended failed/cancelled (with --wait) ·
2 bad usage or bad input (one line on stderr, nothing written) · 124 --wait timeout.
Listing commands take --json and then print JSON only on stdout.
"""

from __future__ import annotations

import os

# flatmachines logs every machine it builds at INFO on stdout; a worker builds
# one per execution. Keep the library at WARNING unless the user asks otherwise.
os.environ.setdefault("FLATAGENTS_LOG_LEVEL", "WARNING")

import asyncio
import itertools
import json
import logging
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .clock import iso
from .display import shown
from .errors import StoreUnavailable, UserError, WaitTimeout
from .overlap import POLICIES as OVERLAP_POLICIES

# the engine (SQLAlchemy, flatmachines) loads in the commands that use it, so
# `orch --help` answers at once
if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from .api import Orchestrator
    from .schemas import Execution
    from .settings import Settings


def _orch(settings: Settings) -> Orchestrator:
    from .api import Orchestrator

    return Orchestrator(settings=settings)


def load_machine_file(path: str, *, allow_outside_refs: bool = False) -> Any:
    from .machine_config import load_machine_file as load

    return load(path, allow_outside_refs=allow_outside_refs)


T = TypeVar("T")
EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 1, 2, 124
STATUSES = ("queued", "running", "waiting", "completed", "failed", "cancelled")


def fail(message: str) -> None:
    click.echo(f"orch: error: {shown(message)}", err=True)
    sys.exit(EXIT_USAGE)


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    from pydantic import ValidationError

    from .settings import Settings

    values = {k: v for k, v in {"database_url": ctx.obj.get("db"), **overrides}.items() if v}
    try:
        return Settings(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "ORCH_" + "_".join(map(str, err["loc"])).upper()
        msg = err["msg"].removeprefix("Value error, ")
        fail(f"bad setting {name}: {msg} (check ORCH_* variables)")
        raise AssertionError from None


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async command body; user mistakes become one line and exit 2."""
    try:
        return asyncio.run(coro_fn())
    except (UserError, StoreUnavailable) as exc:
        fail(str(exc))
        raise AssertionError from None


def read_settings(ctx: click.Context) -> Settings:
    """The settings of a command that only reads. Where there is no store yet
    (a SQLite file that is not there, a command typed in the wrong directory or
    before the first submit; a server database without orch's tables, perhaps
    another application's) it reads an empty store in a directory of its own,
    removed at exit, rather than create one: the answer is the same (nothing
    there), and nothing is written. A missing directory, a read-only file, a
    server that does not answer and every other case go on to the store's own
    checks."""
    settings = settings_from(ctx)
    from .store.engine import parse_url, sqlite_path

    try:
        url = parse_url(settings.database_url)
        path = sqlite_path(url)
    except UserError as exc:
        fail(str(exc))
    if path is None:
        if not _no_schema_yet(url):
            return settings
    elif path.exists() or not path.parent.is_dir():
        return settings
    import atexit
    import shutil
    import tempfile

    empty = tempfile.mkdtemp(prefix="orch-empty-")
    atexit.register(shutil.rmtree, empty, True)
    return settings.model_copy(update={"database_url": f"sqlite:///{empty}/orch.sqlite"})


def _no_schema_yet(url: URL) -> bool:
    """Whether a server database answers and has no orch schema in it yet. False
    when that cannot be told (it does not answer, say): the store's own open
    then says what is wrong."""
    from .store.engine import create_engine, current_revision

    try:
        engine = create_engine(url, pooled=False)
        try:
            with engine.connect() as conn:
                return current_revision(conn) is None
        finally:
            engine.dispose()
    except Exception:
        return False


async def open_waiting(settings: Settings) -> Orchestrator:
    """Open the store, waiting (with one message) for a database that is not up
    yet: a service started before its database runs once the database does.
    SIGTERM/SIGINT while waiting exits 0."""
    orch = _orch(settings)
    waited: list[str] = []

    def say(why: str) -> None:
        waited.append(why)
        click.echo(f"orch: waiting for the database: {shown(why)}", err=True)

    from . import stopsignal

    def stop() -> None:
        stopsignal.note()
        opening.cancel()

    loop = asyncio.get_running_loop()
    opening = asyncio.ensure_future(orch.open(wait=True, on_wait=say))
    for sig in stopsignal.STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    if stopsignal.received():  # a stop that came while the command started
        opening.cancel()
    try:
        await opening
    except asyncio.CancelledError:
        why = "waiting for the database" if waited else "starting"
        click.echo(f"orch: stopped while {why}", err=True)
        sys.exit(0)
    finally:
        for sig in stopsignal.STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        stopsignal.rehold()  # until the worker or scheduler installs its own
    if waited:
        click.echo("orch: the database is answering; starting", err=True)
    return orch


def execution_json(ex: Execution) -> dict[str, Any]:
    return ex.as_json()


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def parse_input_object(text: str, where: str) -> dict[str, Any]:
    from . import checks

    value = checks.parse_json(text, where, '{"n": 5}')
    if not isinstance(value, dict):
        raise UserError(
            f"{where} must be a JSON object such as '{{\"n\": 5}}', not a {type(value).__name__}"
        )
    return value


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def jsonl_inputs(path: Path, check: Callable[[Any, str], dict]) -> Iterator[dict[str, Any]]:
    """The inputs of a .jsonl file, one line at a time, each checked by
    ``check(value, where)``: a file of any length is never all in memory."""
    try:
        with path.open(encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if line.strip():
                    where = f"{path} line {n}"
                    yield check(parse_input_object(line, where), where)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def read_inputs(
    input_json: str | None, input_file: str | None, check: Callable[[Any, str], dict]
) -> tuple[dict, None] | tuple[Path, int]:
    """(the one input, None), or (a .jsonl file, its number of inputs) once
    every line of it is checked, read as a stream: a bad line writes nothing."""
    if input_json is not None and input_file is not None:
        raise UserError("give --input or --input-file, not both")
    if input_file is None:
        if input_json is None:
            return {}, None
        return check(parse_input_object(input_json, "--input"), "--input"), None
    path = Path(input_file)
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    if path.suffix == ".jsonl":
        count = sum(1 for _ in jsonl_inputs(path, check))
        if not count:
            raise UserError(f"{path} holds no input lines")
        return path, count
    return check(parse_input_object(read_text_file(path), str(path)), str(path)), None


# ---------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="ORCH_DATABASE_URL",
    default=None,
    help="Database URL (default sqlite:///./orch.sqlite). Env: ORCH_DATABASE_URL.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail on stderr.")
@click.version_option(package_name="flatorch", prog_name="orch")
@click.pass_context
def cli(ctx: click.Context, db: str | None, verbose: bool) -> None:
    """flatorch: durable FlatMachine workflows on SQLite or PostgreSQL."""
    ctx.ensure_object(dict)
    ctx.obj["db"] = db
    from .display import LogFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # flatmachines puts a handler of its own (stdout, names raw) on its logger
    # unless it has one: ours, so that its lines are shown as orch's are
    library = logging.getLogger("flatmachines")
    library.handlers[:] = [handler]
    library.propagate = False
    if not verbose:
        for noisy in ("flatmachines", "flatagents", "alembic", "httpx", "apscheduler"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@cli.command()
@click.argument("machine")
@click.option("--input", "input_json", help="Input as a JSON object.")
@click.option("--input-file", help="JSON object file; .jsonl submits one execution per line.")
@click.option("--queue", default="default", show_default=True)
@click.option(
    "--id",
    "execution_id",
    help="Caller-chosen id; submitting it again returns the existing execution.",
)
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--delay", type=click.FloatRange(min=0), help="Seconds before it may run.")
@click.option(
    "--max-attempts",
    type=int,
    default=1,
    show_default=True,
    help="Runs allowed for an unhandled error; retries resume from the last checkpoint.",
)
@click.option(
    "--backoff",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds before the first retry; doubles each attempt (jittered, max 300).",
)
@click.option("--wait", is_flag=True, help="Wait for the outcome (exit 1 if failed/cancelled).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    help="With --wait: give up after S seconds (exit 124).",
)
@click.option(
    "--allow-outside-refs",
    is_flag=True,
    help="Let the machine name agent, prompt and machine files outside its folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@click.pass_context
def submit(
    ctx,
    machine,
    input_json,
    input_file,
    queue,
    execution_id,
    priority,
    delay,
    max_attempts,
    backoff,
    wait,
    timeout,
    allow_outside_refs,
    as_json,
):
    """Enqueue MACHINE.yml; prints the execution id."""
    from . import checks

    options = dict(
        queue=queue, priority=priority, delay=delay, max_attempts=max_attempts, backoff=backoff
    )
    settings = settings_from(ctx)

    def check(value: Any, where: str) -> dict[str, Any]:
        return checks.execution_input(value, where, settings.max_input_bytes)

    async def body() -> int:
        checks.submit_options(**options)
        if execution_id is not None:
            checks.new_execution_id(execution_id, "--id")
        given, count = read_inputs(input_json, input_file, check)
        if count is not None and execution_id is not None:
            checks.new_execution_id(f"{execution_id}-{count}", "--id with the line numbers it gets")
        # check the machine before opening the store: bad input writes nothing,
        # not even a new SQLite file or a schema
        config = load_machine_file(machine, allow_outside_refs=allow_outside_refs)
        async with _orch(settings) as orch:
            if count is None:
                ids = [execution_id] if execution_id is not None else None
                [(ex, created)] = await orch.submit_many(config, [given], ids=ids, **options)
                if wait:
                    ex = await _wait_for(orch, ex.id, timeout)
                    if ex is None:
                        return EXIT_TIMEOUT
                if as_json:
                    emit_json({**execution_json(ex), "created": created})
                else:
                    _print_submitted(ex, wait)
                return EXIT_FAILED if wait and ex.status in ("failed", "cancelled") else 0
            return await _submit_file(
                orch, config, given, count, execution_id, options, wait, timeout, as_json, check
            )

    sys.exit(run(body))


async def _wait_for(orch: Orchestrator, execution_id: str, timeout: float | None):
    """The finished execution, or None (said on stderr) after ``timeout``."""
    try:
        return await orch.wait(execution_id, timeout)
    except WaitTimeout as exc:
        click.echo(
            f"orch: timed out waiting for {shown(exc.execution.id)} (still {exc.execution.status})",
            err=True,
        )
        return None


def _print_submitted(ex: Execution, waited: bool) -> None:
    click.echo(shown(ex.id))
    if waited:
        why = shown(ex.error or ex.cancel_reason, multiline=True)
        click.echo(json.dumps(ex.output) if ex.status == "completed" else f"{ex.status}: {why}")


class _JsonList:
    """A JSON list printed an item at a time, as ``emit_json`` prints one whole."""

    def __init__(self) -> None:
        self.items = 0

    def add(self, doc: Any) -> None:
        text = textwrap.indent(json.dumps(doc, indent=2, default=str), "  ")
        click.echo(("[\n" if not self.items else ",\n") + text, nl=False)
        self.items += 1

    def close(self) -> None:
        click.echo("\n]" if self.items else "[]")


async def _submit_file(
    orch, config, path, count, execution_id, options, wait, timeout, as_json, check
) -> int:
    """A .jsonl file, streamed: read, submitted and printed a batch at a time
    (with --wait, printed once every one of them is done)."""
    from rich.console import Console
    from rich.progress import Progress

    ids = (f"{execution_id}-{n}" for n in itertools.count(1)) if execution_id else None
    listing = _JsonList() if as_json else None
    submitted: list[tuple[str, bool]] = []
    with Progress(
        console=Console(stderr=True), transient=as_json, disable=not sys.stderr.isatty()
    ) as bar:
        task = bar.add_task("submitting", total=count)
        batches = orch.submit_batches(config, jsonl_inputs(path, check), ids=ids, **options)
        async for batch in batches:
            bar.advance(task, len(batch))
            for ex, created in batch:
                if wait:
                    submitted.append((ex.id, created))
                elif listing is not None:
                    listing.add({**execution_json(ex), "created": created})
                else:
                    click.echo(shown(ex.id))
    done = []
    for ex_id, created in submitted:  # all of them before anything is printed
        ex = await _wait_for(orch, ex_id, timeout)
        if ex is None:
            return EXIT_TIMEOUT
        done.append((ex, created))
    for ex, created in done:
        if listing is not None:
            listing.add({**execution_json(ex), "created": created})
        else:
            _print_submitted(ex, True)
    if listing is not None:
        listing.close()
    return EXIT_FAILED if any(ex.status in ("failed", "cancelled") for ex, _ in done) else 0


@cli.command()
@click.option(
    "--app", envvar="ORCH_APP", help="MODULE[:ATTR] whose hooks_registry names your hooks."
)
@click.option(
    "--queue", "queues", multiple=True, help="Queue to serve (repeatable; default 'default')."
)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--burst", is_flag=True, help="Exit 0 when nothing is left to claim.")
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=0.1),
    envvar="ORCH_LEASE_TTL",
    help="Lease seconds (default 30). Env: ORCH_LEASE_TTL.",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="On SIGTERM, seconds to let running executions finish before releasing them.",
)
@click.option(
    "--processes",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes under this one (restarted when they die; SIGTERM drains all).",
)
@click.pass_context
def worker(ctx, app, queues, concurrency, burst, lease_ttl, drain_timeout, processes):
    """Claim and run executions; SIGTERM/SIGINT drains."""
    from .app import load_agent_adapters, load_hooks_registry

    if processes < 1:
        fail(f"--processes {processes}: give 1 or more worker processes")
    settings = settings_from(ctx, lease_ttl=lease_ttl, app=app)
    if processes > 1:
        from .prefork import supervise

        run(lambda: _check_app(settings.app))  # a bad --app: one line, before any child
        args = [f"--queue={q}" for q in queues] + [f"--concurrency={concurrency}"]
        args += [f"--drain-timeout={drain_timeout}", f"--lease-ttl={settings.lease_ttl}"]
        args += [f"--app={settings.app}"] if settings.app else []
        args += ["--burst"] if burst else []
        sys.exit(supervise(args, processes, burst=burst, database_url=settings.database_url))

    async def body() -> dict[str, Any]:
        registry = load_hooks_registry(settings.app)
        adapters = load_agent_adapters(settings.app)
        # a --burst worker is a batch job: no database, nothing to do (exit 2)
        orch = await (_orch(settings).open() if burst else open_waiting(settings))
        from .worker import settle_process

        settle_process()  # this process is a worker and nothing else
        try:
            return await orch.serve_worker(
                registry,
                queues=list(queues) or ["default"],
                concurrency=concurrency,
                burst=burst,
                drain_timeout=drain_timeout,
                agent_adapters=adapters,
            )
        finally:
            await orch.close()

    # a second stop that left executions to their leases is not a clean stop
    if run(body).get("left_to_lease"):
        sys.exit(1)


async def _check_app(app: str | None) -> None:
    from .app import load_hooks_registry

    load_hooks_registry(app)


@cli.command(name="list")
@click.option("--status", type=click.Choice(STATUSES))
@click.option("--queue")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--parent", help="Only the children of this execution.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_(ctx, status, queue, limit, parent, as_json):
    """Executions, newest first."""
    from . import checks, quickread

    try:
        checks.listing(status=status, queue=queue, parent=parent, limit=limit)
    except UserError as exc:
        fail(str(exc))
    try:
        docs = quickread.list_executions(
            ctx.obj.get("db"), status=status, queue=queue, parent=parent, limit=limit
        )
    except quickread.NotHere:
        settings = read_settings(ctx)

        async def body() -> list[dict[str, Any]]:
            async with _orch(settings) as orch:
                rows = await orch.list(status=status, queue=queue, limit=limit, parent=parent)
            return [execution_json(ex) for ex in rows]

        docs = run(body)
    if as_json:
        emit_json(docs)
        return
    _table(
        ["id", "machine", "status", "queue", "state", "attempt", "recoveries", "updated"],
        [
            [
                d["id"],
                d["machine"],
                d["status"],
                d["queue"],
                d["current_state"] or "",
                str(d["attempt"]),
                str(d["recoveries"]),
                d["updated_at"],
            ]
            for d in docs
        ],
    )


@cli.command()
@click.argument("execution_id")
@click.option("--context", "context_only", is_flag=True, help="Print the context only (JSON).")
@click.option("--step", type=int, help="With --context: at this step, not the latest.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show(ctx, execution_id, context_only, step, as_json):
    """One execution with its children and checkpoint history."""
    from . import quickread

    if step is not None and not context_only:
        fail("--step goes with --context (the context at that step)")
    from . import checks

    try:
        checks.execution_id(execution_id)
    except UserError as exc:
        fail(str(exc))
    try:
        if context_only:
            raise quickread.NotHere
        doc = quickread.show(ctx.obj.get("db"), execution_id)
    except quickread.NotHere:
        settings = read_settings(ctx)

        async def body() -> dict[str, Any] | None:
            async with _orch(settings) as orch:
                if context_only:
                    emit_json(await orch.context(execution_id, step))
                    return None
                return execution_json(await orch.get(execution_id, detail=True))

        doc = run(body)
        if doc is None:
            return
    if as_json:
        emit_json(doc)
        return
    for key in (
        "id",
        "machine",
        "status",
        "queue",
        "attempt",
        "recoveries",
        "worker_id",
        "current_state",
        "created_at",
        "updated_at",
    ):
        click.echo(f"{key:>14}: {shown(doc[key])}")
    if doc["status"] == "waiting" or doc["waiting_channel"]:
        click.echo(f"{'waiting on':>14}: {shown(doc['waiting_channel'])}")
    if doc["wake_at"]:
        click.echo(f"{'wakes at':>14}: {doc['wake_at']}")
    if doc["cancel_reason"]:
        click.echo(f"{'cancelled for':>14}: {shown(doc['cancel_reason'])}")
    if doc["needs"]:
        click.echo(f"{'needs hooks':>14}: {shown(doc['needs'])}")
    if doc.get("missing_hooks"):
        click.echo(
            f"{'waiting for':>14}: a worker with hooks {shown(', '.join(doc['missing_hooks']))} "
            "(start one with --app MODULE whose hooks_registry has them)"
        )
    click.echo(f"{'input':>14}: {json.dumps(doc['input'])}")
    click.echo(f"{'output':>14}: {json.dumps(doc['output'])}")
    if doc["error"]:
        click.echo(f"{'error':>14}: {shown(doc['error'], multiline=True)}")
    if doc["children"]:
        click.echo("children:")
        _table(
            ["id", "machine", "status"],
            [[c["id"], c["machine"], c["status"]] for c in doc["children"]],
        )
    _table(
        ["step", "event", "state", "at"],
        [[str(h["step"]), h["event"], h["state"] or "", h["at"]] for h in doc["history"]],
    )


@cli.command()
@click.argument("execution_id")
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after S seconds (exit 124).")
@click.pass_context
def result(ctx, execution_id, timeout):
    """Wait for an execution and print its output JSON."""
    settings = read_settings(ctx)

    async def body() -> int:
        async with _orch(settings) as orch:
            try:
                ex = await orch.wait(execution_id, timeout)
            except WaitTimeout as exc:
                click.echo(
                    f"orch: timed out waiting for {shown(execution_id)} "
                    f"(still {exc.execution.status})",
                    err=True,
                )
                return EXIT_TIMEOUT
        if ex.status == "completed":
            click.echo(json.dumps(ex.output))
            return 0
        from .api import ExecutionFailed

        click.echo(f"orch: {shown(ExecutionFailed(ex), multiline=True)}", err=True)
        return EXIT_FAILED

    sys.exit(run(body))


@cli.command()
@click.option("--all", "include_stopped", is_flag=True, help="Include stopped workers.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def workers(ctx, include_stopped, as_json):
    """Workers and what they run."""
    settings = read_settings(ctx)

    async def body() -> None:
        async with _orch(settings) as orch:
            rows = await orch.workers(include_stopped=include_stopped or as_json)
        if as_json:
            emit_json([w.as_json() for w in rows])
            return
        _table(
            ["id", "status", "queues", "running", "completed", "failed", "heartbeat"],
            [
                [
                    w.id,
                    w.status,
                    ",".join(w.queues),
                    f"{w.running}/{w.concurrency}",
                    str(w.completed),
                    str(w.failed),
                    iso(w.last_heartbeat),
                ]
                for w in rows
            ],
        )

    run(body)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def queues(ctx, as_json):
    """Queues: executions per status and workers serving each."""
    settings = read_settings(ctx)

    async def body() -> None:
        async with _orch(settings) as orch:
            rows = [q.as_json() for q in await orch.queues()]
        if as_json:
            emit_json(rows)
            return
        cols = [
            "queue",
            "queued",
            "running",
            "waiting",
            "completed",
            "failed",
            "cancelled",
            "workers",
            "min_workers",
            "max_workers",
        ]
        _table(cols, [[str(r[c]) for c in cols] for r in rows])
        for r in rows:
            if r["waiting_for_hooks"]:
                click.echo(
                    f"queue '{shown(r['queue'])}' has executions waiting for a worker with hooks "
                    f"{shown(', '.join(r['waiting_for_hooks']))} (--app MODULE)"
                )
        recent = [(r["queue"], e) for r in rows for e in r["scaling_events"]]
        if recent:
            click.echo("\nrecent scaling:")
            _table(
                ["queue", "at", "workers", "reason"],
                [
                    [q, e["at"], f"{e['from_workers']} -> {e['to_workers']}", e["reason"]]
                    for q, e in recent
                ],
            )

    run(body)


def _change_execution(ctx, execution_id: str, as_json: bool, change, describe) -> None:
    """One control verb on one execution: ``change(orch, id)``, then print it."""
    settings = settings_from(ctx)

    async def body() -> None:
        async with _orch(settings) as orch:
            ex = await change(orch, execution_id)
        if as_json:
            emit_json(execution_json(ex))
        else:
            click.echo(shown(describe(ex)))

    run(body)


@cli.command()
@click.argument("execution_id")
@click.option("--reason", help="Why; kept with the execution.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cancel(ctx, execution_id, reason, as_json):
    """Cancel an unfinished execution: queued or waiting, it never runs; running,
    its worker stops it within a third of the lease TTL."""
    _change_execution(
        ctx,
        execution_id,
        as_json,
        lambda orch, ex_id: orch.cancel(ex_id, reason),
        lambda ex: f"{ex.id} {ex.status}",
    )


@cli.command()
@click.argument("execution_id")
@click.option(
    "--machine", help="A fixed MACHINE.yml to resume on (it must keep the checkpoint's state)."
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def retry(ctx, execution_id, machine, as_json):
    """Resume a failed or cancelled execution from its last checkpoint."""

    async def change(orch: Orchestrator, ex_id: str) -> Execution:
        return await orch.retry(ex_id, machine=load_machine_file(machine) if machine else None)

    _change_execution(
        ctx,
        execution_id,
        as_json,
        change,
        lambda ex: f"{ex.id} {ex.status} (attempt {ex.attempt})",
    )


@cli.command()
@click.argument("execution_id")
@click.option(
    "--from-step", "from_step", type=int, required=True, help="A step whose state committed."
)
@click.option("--id", "new_id", help="The new execution's id (default ID-fork-XXXX).")
@click.option("--context-patch", help="A JSON object merged into the context at that step.")
@click.option("--queue", help="Queue for the fork (default the original's).")
@click.option("--machine", help="Run the fork on this MACHINE.yml instead of the pinned config.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def fork(ctx, execution_id, from_step, new_id, context_patch, queue, machine, as_json):
    """A new execution from ID's checkpoint at a step; the original is untouched."""
    settings = settings_from(ctx)

    async def body() -> None:
        patch = parse_input_object(context_patch, "--context-patch") if context_patch else None
        config = load_machine_file(machine) if machine else None
        async with _orch(settings) as orch:
            ex = await orch.fork(
                execution_id,
                from_step=from_step,
                id=new_id,
                context_patch=patch,
                queue=queue,
                machine=config,
            )
        if as_json:
            emit_json(execution_json(ex))
        else:
            click.echo(shown(ex.id))

    run(body)


def read_signal_data(data_json: str | None, data_file: str | None) -> Any:
    """Any JSON value (null without either option); checked before anything is written."""
    if data_json is not None and data_file is not None:
        raise UserError("give --data or --data-file, not both")
    if data_file is not None:
        path = Path(data_file)
        if not path.is_file():
            raise UserError(f"data file not found: {path}")
        text, where = read_text_file(path), str(path)
    elif data_json is not None:
        text, where = data_json, "--data"
    else:
        return None
    from . import checks

    return checks.parse_json(text, where, '{"ok": true}')


@cli.command(name="signal")
@click.argument("channel")
@click.option("--data", "data_json", help="The signal's data, as JSON.")
@click.option("--data-file", help="A file holding the data as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON only.")
@click.pass_context
def signal_(ctx, channel, data_json, data_file, as_json):
    """Send a durable signal on CHANNEL: the execution waiting longest on it takes
    it and runs again; with nobody waiting it is kept until someone waits."""
    settings = settings_from(ctx)

    async def body() -> None:
        from . import checks

        data = read_signal_data(data_json, data_file)
        checks.channel(channel)  # before the store opens: a bad signal creates nothing
        checks.signal_data(data, settings.max_signal_bytes)
        async with _orch(settings) as orch:
            sent = await orch.signal(channel, data)
        if as_json:
            emit_json({"id": sent.id, "channel": sent.channel, "woken": sent.woken})
        elif sent.woken:
            taken = shown(", ".join(sent.woken))
            click.echo(f"signal {sent.id} on '{shown(channel)}' taken by {taken}")
        else:
            click.echo(
                f"signal {sent.id} on '{shown(channel)}' kept until an execution waits for it"
            )

    run(body)


@cli.command()
@click.option("--channel", help="Only this channel.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def signals(ctx, channel, as_json):
    """Signals not yet consumed, oldest first."""
    settings = read_settings(ctx)

    async def body() -> None:
        async with _orch(settings) as orch:
            docs = [r.as_json() for r in await orch.signals(channel)]
        if as_json:
            emit_json(docs)
            return
        _table(
            ["id", "channel", "data", "sent", "taken by"],
            [
                [str(d["id"]), d["channel"], json.dumps(d["data"]), d["created_at"], d["taken_by"]]
                for d in docs
            ],
        )

    run(body)


@cli.command()
@click.option(
    "--older-than",
    default="30d",
    show_default=True,
    help="Only executions that finished this long ago (90s, 15m, 2h, 30d).",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(["completed", "failed", "cancelled"]),
    help="Only these finished statuses (repeatable; default all three).",
)
@click.option("--dry-run", is_flag=True, help="Count what would go; remove nothing.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def prune(ctx, older_than, statuses, dry_run, as_json):
    """Remove finished executions with their checkpoints and signals (retention).

    Unfinished executions, and finished children of an unfinished root, stay."""
    from . import timers

    try:
        seconds = timers.parse_duration(older_than)
    except ValueError as exc:
        raise click.UsageError(f"--older-than: {exc}") from None
    settings = settings_from(ctx)

    async def body() -> None:
        async with _orch(settings) as orch:
            done = await orch.prune(older_than=seconds, statuses=statuses, dry_run=dry_run)
        if as_json:
            emit_json(done)
            return
        verb = "would remove" if dry_run else "removed"
        click.echo(
            f"{verb} {done['executions']} execution(s) finished before {done['finished_before']} "
            f"({done['checkpoints']} checkpoints, {done['signals']} signals)"
        )

    run(body)


@cli.command()
@click.argument("queue")
@click.option("--min", "min_workers", type=int, required=True)
@click.option("--max", "max_workers", type=int, required=True)
@click.option("--per-worker", type=int, help="Backlog one worker is expected to carry.")
@click.option("--create", is_flag=True, help="Create the queue if it does not exist.")
@click.pass_context
def scale(ctx, queue, min_workers, max_workers, per_worker, create):
    """Set a queue's pool policy; the leader scheduler follows it."""
    settings = settings_from(ctx)

    async def body() -> None:
        async with _orch(settings) as orch:
            await orch.scale(
                queue,
                min_workers=min_workers,
                max_workers=max_workers,
                per_worker=per_worker,
                create=create,
            )
        click.echo(f"queue '{shown(queue)}': min {min_workers}, max {max_workers}")

    run(body)


@cli.group()
def schedule() -> None:
    """Cron schedules (UTC), kept in the store."""


@schedule.command(name="add")
@click.argument("name")
@click.argument("machine")
@click.option("--cron", required=True, help="Five fields, UTC, e.g. '0 2 * * *'.")
@click.option("--input", "input_json", help="Input for every run, as a JSON object.")
@click.option("--queue", default="default", show_default=True)
@click.option(
    "--overlap",
    type=click.Choice(OVERLAP_POLICIES),
    default="skip",
    show_default=True,
    help="While the last run is unfinished, a tick submits nothing (skip), another run "
    "(allow), one run held until the last one finishes (buffer_one), or cancels the "
    "last run and then submits one (cancel_other).",
)
@click.pass_context
def schedule_add(ctx, name, machine, cron, input_json, queue, overlap):
    """Run MACHINE on a cron schedule."""
    from .cron import trigger

    settings = settings_from(ctx)

    async def body() -> None:
        trigger(cron)
        data = parse_input_object(input_json, "--input") if input_json is not None else {}
        config = load_machine_file(machine)
        async with _orch(settings) as orch:
            first = await orch.add_schedule(
                name, config, cron=cron, input=data, queue=queue, overlap=overlap
            )
        click.echo(f"schedule '{shown(name)}' added; first run {iso(first)}")

    run(body)


@schedule.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def schedule_list(ctx, as_json):
    """Schedules with their next fire time."""
    settings = read_settings(ctx)

    async def body() -> None:
        async with _orch(settings) as orch:
            docs = [r.as_json() for r in await orch.schedules()]
        if as_json:
            emit_json(docs)
            return
        cols = ["name", "machine", "cron", "queue", "overlap", "next_fire_at", "last_fired_at"]
        _table(cols, [[d[c] for c in cols] for d in docs])

    run(body)


@schedule.command(name="remove")
@click.argument("name")
@click.pass_context
def schedule_remove(ctx, name):
    """Remove a schedule."""
    settings = settings_from(ctx)

    async def body() -> None:
        async with _orch(settings) as orch:
            await orch.remove_schedule(name)
        click.echo(f"schedule '{shown(name)}' removed")

    run(body)


def _run_scheduler(
    settings: Settings,
    *,
    app: str | None,
    concurrency: int,
    log_dir: str,
    policy: tuple[str, int, int] | None = None,
) -> None:
    async def body() -> None:
        if app:
            from .app import load_hooks_registry

            load_hooks_registry(app)  # a bad --app is one clear line, before any waiting
        orch = await open_waiting(settings)
        try:
            await orch.serve_scheduler(
                app=app, concurrency=concurrency, log_dir=log_dir, policy=policy
            )
        finally:
            await orch.close()

    run(body)


@cli.command()
@click.option("--app", envvar="ORCH_APP", help="MODULE[:ATTR] for the workers it starts.")
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Concurrency of each worker it starts.",
)
@click.option(
    "--log-dir", default="orch-logs", show_default=True, help="One log file per started worker."
)
@click.option("--lease-ttl", type=click.FloatRange(min=0.1), envvar="ORCH_LEASE_TTL")
@click.pass_context
def scheduler(ctx, app, concurrency, log_dir, lease_ttl):
    """Reaper, autoscaler and cron schedules; leader-elected across hosts."""
    settings = settings_from(ctx, lease_ttl=lease_ttl, app=app)
    _run_scheduler(settings, app=settings.app, concurrency=concurrency, log_dir=log_dir)


@cli.command()
@click.option("--app", envvar="ORCH_APP", help="MODULE[:ATTR] for the workers it starts.")
@click.option("--queue", default="default", show_default=True)
@click.option("--min", "min_workers", type=int, default=1, show_default=True)
@click.option("--max", "max_workers", type=int, default=4, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--log-dir", default="orch-logs", show_default=True)
@click.option("--lease-ttl", type=click.FloatRange(min=0.1), envvar="ORCH_LEASE_TTL")
@click.pass_context
def up(ctx, app, queue, min_workers, max_workers, concurrency, log_dir, lease_ttl):
    """Leader scheduler plus a managed worker pool; Ctrl-C drains and exits."""
    settings = settings_from(ctx, lease_ttl=lease_ttl, app=app)
    if min_workers < 0 or max_workers < 0 or min_workers > max_workers:
        fail(f"--min {min_workers} / --max {max_workers}: need 0 <= min <= max")
    _run_scheduler(
        settings,
        app=settings.app,
        concurrency=concurrency,
        log_dir=log_dir,
        policy=(queue, min_workers, max_workers),
    )


@cli.command()
@click.option(
    "--refresh",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=0.1),
    envvar="ORCH_LEASE_TTL",
    help="Heartbeats older than this turn red (default 30).",
)
@click.pass_context
def tui(ctx, refresh, lease_ttl):
    """The live console: workers, queues and executions, with actions."""
    from tui import OrchApp

    settings = settings_from(ctx, lease_ttl=lease_ttl)
    from .store.engine import parse_url

    try:
        parse_url(settings.database_url)  # a URL that cannot work: one line, not a crash
    except UserError as exc:
        fail(str(exc))
    OrchApp(settings, refresh_every=refresh).run()


@cli.command()
@click.option(
    "--dir", "directory", help="Where to keep its store and logs (default: a new temp dir)."
)
def demo(directory):
    """A one-minute tour on a fresh SQLite file: a pool runs the examples, a worker
    is killed mid-execution and the execution resumes elsewhere."""
    from .demo import run_demo

    path = Path(directory) if directory else None
    if path is not None and (path / "orch.sqlite").exists():
        fail(f"{path / 'orch.sqlite'} exists: the demo wants a fresh store; give another --dir")
    sys.exit(run_demo(path))


@cli.group()
def db() -> None:
    """Database schema."""


@db.command()
@click.pass_context
def upgrade(ctx):
    """Apply migrations (a new SQLite file is upgraded automatically)."""
    from .store.engine import head_revision

    settings = settings_from(ctx)

    async def body() -> None:
        async with _orch(settings):  # opening brings the schema to head
            pass
        click.echo(f"database at revision {head_revision()}")

    run(body)


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .display import text

    table = Table(*headers, box=None, pad_edge=False, header_style="bold")
    for row in rows:
        # each cell is shown as it is: a name is never markup
        table.add_row(*[text(c) for c in row])
    # a pipe gets full ids, not a table squeezed to 80 columns
    Console(width=None if sys.stdout.isatty() else 240).print(table)


# the commands that serve until stopped: SIGTERM/SIGINT drains them
_SERVING = frozenset({"worker", "scheduler", "up"})


def _command(argv: list[str]) -> str | None:
    """The command named in ``argv`` (past the group's own options)."""
    args = iter(argv)
    for arg in args:
        if arg == "--db":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    if _command(sys.argv[1:]) in _SERVING:
        from . import stopsignal

        stopsignal.hold()  # before click parses: a stop while it starts is not a kill
    try:
        code = cli.main(prog_name="orch", obj={}, standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()  # `orch` alone: the help, as click gives it
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        # click's own report is four lines (usage, hint, blank, error); ours is one
        if exc.ctx is not None:
            where = exc.ctx.command_path
        else:  # the option parser's errors carry no context: name the command
            where = " ".join(["orch", *filter(None, [_command(sys.argv[1:])])])
        fail(f"{exc.format_message().rstrip('.')} (see `{where} --help`)")
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    # a command that ends normally returns None; --help and ctx.exit() give their code
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
