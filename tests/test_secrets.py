"""Secrets and files: a database password is never shown, however the URL
holds it; the store and the pool's logs are their owner's alone."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from orchestrator import Orchestrator
from orchestrator.display import masked_url
from orchestrator.pool import LocalPool
from orchestrator.settings import Settings
from tui import OrchApp
from tui.widgets import Banner

from .conftest import orch, run_async, wait_until
from .faults import TcpCut
from .test_tui import until

SECRET = "Hunter2Secret"

# every way a URL can hold the password; ``{port}`` is a port nobody listens on
SERVER_FORMS = {
    "user-part": f"postgresql+psycopg://orch:{SECRET}@127.0.0.1:{{port}}/db",
    "query": f"postgresql+psycopg://orch@127.0.0.1:{{port}}/db?password={SECRET}",
    "query-later": (
        f"postgresql+psycopg://orch@127.0.0.1:{{port}}/db?sslmode=disable&password={SECRET}"
    ),
    "unescaped-at": "postgresql+psycopg://orch:Hunter2@Secret@127.0.0.1:{port}/db",
}
UNPARSED_FORMS = {
    "no-colon": f"postgresql+psycopg//orch:{SECRET}@127.0.0.1:1/db",
    "bad-port": f"postgresql+psycopg://orch:{SECRET}@127.0.0.1:notaport/db",
}


def leaks(text: str) -> bool:
    """Whether any part of the password shows (the unescaped-at form's halves too)."""
    return "Hunter2" in text or "Secret" in text


@pytest.mark.parametrize(
    "raw",
    [*SERVER_FORMS.values(), *UNPARSED_FORMS.values(), f"host=h password={SECRET} dbname=d"],
)
def test_masked_url_hides_the_password_in_every_form(raw):
    shown = masked_url(raw.replace("{port}", "5432"))
    assert not leaks(shown) and "***" in shown
    assert "127.0.0.1" in shown or "host=h" in shown


def test_masked_url_leaves_what_is_not_a_password():
    for url in (
        "sqlite:///./orch.sqlite",
        "postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3Dt_1",
        "postgresql+psycopg://u@h/db?application_name=a@b",
    ):
        assert masked_url(url) == url


@pytest.mark.parametrize(
    "raw", [*SERVER_FORMS.values(), *UNPARSED_FORMS.values()], ids=[*SERVER_FORMS, *UNPARSED_FORMS]
)
def test_a_cli_error_masks_the_password(raw, tmp_path):
    # the console runs (its banner says why) while a URL that parses does not answer
    commands = [["list"], ["signal", "approval/1"]] + [["tui"]] * (raw in UNPARSED_FORMS.values())
    for args in commands:
        r = orch(*args, db_url=raw.format(port=1), cwd=tmp_path, input="")
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("orch: error: "), r.stderr
        assert "***" in lines[0] and not leaks(r.stdout + r.stderr), r.stderr


@pytest.mark.parametrize("form", list(SERVER_FORMS))
def test_a_worker_waiting_for_its_database_masks_the_password(form, workers):
    w = workers(SERVER_FORMS[form].format(port=1))
    wait_until(lambda: "waiting for the database" in w.log(), what="the waiting line")
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    assert "***" in w.log() and not leaks(w.log()), w.log()


@pytest.fixture
def cut(pg_url) -> Iterator[TcpCut]:
    url = sa.make_url(pg_url)
    forwarder = TcpCut((url.host or "127.0.0.1", url.port or 5432))
    yield forwarder
    forwarder.close()


@pytest.mark.parametrize("form", ["unescaped-at", "query"])
def test_a_workers_outage_line_masks_the_password(form, pg_url, cut, workers):
    """A worker whose database goes away logs it: without the password. (The
    test server trusts every password, so both forms connect.)"""
    url = sa.make_url(pg_url)
    options = url.query["options"]
    through = f"127.0.0.1:{cut.port}/{url.database}"
    raw = {
        "unescaped-at": f"postgresql+psycopg://{url.username}:Hunter2@Secret@{through}"
        f"?options={options}",
        "query": f"postgresql+psycopg://{url.username}@{through}"
        f"?options={options}&password={SECRET}",
    }[form]
    w = workers(raw)
    wait_until(lambda: "serving default" in w.log(), what="the worker to start")
    cut.cut()
    wait_until(lambda: "is not answering" in w.log(), what="the outage line")
    cut.restore()
    wait_until(lambda: "is answering again" in w.log(), what="the store back")
    w.signal(signal.SIGTERM)
    assert w.wait() == 0
    line = next(line for line in w.log().splitlines() if "is not answering" in line)
    assert f"{url.username}:***@127.0.0.1:{cut.port}" in line or "password=***" in line, line
    assert not leaks(w.log()), w.log()


@pytest.mark.parametrize("form", list(SERVER_FORMS))
def test_the_console_header_and_banner_mask_the_password(form):
    app = OrchApp(Settings(database_url=SERVER_FORMS[form].format(port=1)), refresh_every=0.2)

    async def go():
        async with app.run_test(size=(120, 30)) as pilot:
            banner = app.screen.query_one(Banner)
            await until(pilot, lambda: not banner.has_class("hidden"), "the banner")
            assert app.sub_title == "postgresql 127.0.0.1/db"
            said = str(banner.render())
            assert "***" in said and not leaks(said + app.sub_title), said

    run_async(go())


# ------------------------------------------------------------------ file modes


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common umask, under which a file is made readable by everyone."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_sqlite_store_is_its_owners_alone(tmp_path, umask_022):
    path = tmp_path / "orch.sqlite"
    settings = Settings(database_url=f"sqlite:///{path}")

    async def go():
        async with Orchestrator(settings=settings) as o:
            await o.signal("any", None)  # a write: the WAL and its index are there now
            return {p.name: mode(p) for p in tmp_path.iterdir()}

    modes = run_async(go())
    assert modes == {"orch.sqlite": 0o600, "orch.sqlite-wal": 0o600, "orch.sqlite-shm": 0o600}


def test_an_existing_sqlite_store_keeps_its_mode(tmp_path, umask_022):
    path = tmp_path / "orch.sqlite"
    path.touch(mode=0o640)
    os.chmod(path, 0o640)

    async def go():
        async with Orchestrator(f"sqlite:///{path}"):
            pass

    run_async(go())
    assert mode(path) == 0o640


def test_the_pools_worker_logs_are_their_owners_alone(db_url, tmp_path, umask_022):
    pool = LocalPool(database_url=db_url, app=None, log_dir=tmp_path / "logs")
    try:
        pid = pool.spawn("default")
        log = pool.children[pid].log_path
        assert mode(log) == 0o600
    finally:
        pool.stop_all(timeout=30)
