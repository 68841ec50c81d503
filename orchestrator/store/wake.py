"""Waking idle workers the moment there is work, instead of at their next poll.

Whoever makes an execution runnable (a submit, a signal, a release) says so
after its commit: on PostgreSQL with ``NOTIFY orch_runnable``; on SQLite (one
host) with a datagram to every worker's socket in a directory named after the
database file. A worker listens (``WakeListener``) and claims at once. The poll
stays as the fallback: a lost wake-up costs one poll interval, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

CHANNEL = "orch_runnable"


def socket_dir(url: URL) -> Path:
    """Where a SQLite store's workers listen: a short path (sockets allow ~100
    bytes) that every process of this host derives from the database file."""
    path = Path(url.database or "").resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"orch-wake-{digest}"


def poke_sqlite(url: URL) -> None:
    """One datagram to each listening worker; a socket nobody holds is removed."""
    directory = socket_dir(url)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        for name in names:
            target = directory / name
            try:
                sock.sendto(b"!", str(target))
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    target.unlink()  # its worker is gone
            except OSError:
                pass  # a full buffer: that worker is awake already


def notify_postgres(conn: sa.Connection) -> None:
    conn.execute(sa.text(f"NOTIFY {CHANNEL}"))


class WakeListener:
    """Calls ``on_wake`` (on the event loop) when work may have become runnable."""

    def __init__(self, url: URL, name: str, on_wake: Callable[[], None]):
        self.url = url
        self.name = name
        self.on_wake = on_wake
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._path: Path | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.url.get_backend_name() == "sqlite":
            self._start_socket()
        else:
            self._thread = threading.Thread(target=self._listen_pg, name="wake", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            with contextlib.suppress(OSError):
                self._path.unlink()  # type: ignore[union-attr]
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------- SQLite

    def _start_socket(self) -> None:
        directory = socket_dir(self.url)
        directory.mkdir(mode=0o700, exist_ok=True)
        self._path = directory / f"{hashlib.sha256(self.name.encode()).hexdigest()[:16]}.sock"
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self._path))
        sock.setblocking(False)
        self._sock = sock
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._sock is not None
        with contextlib.suppress(BlockingIOError):
            while self._sock.recv(64):
                pass
        self.on_wake()

    # --------------------------------------------------------- PostgreSQL

    def _listen_pg(self) -> None:
        import psycopg

        dsn = self.url.set(drivername="postgresql").render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    while not self._stop.is_set():
                        if any(True for _ in conn.notifies(timeout=0.5, stop_after=1)):
                            self._wake_soon()
            except psycopg.Error:
                # the store is away: the poll carries on, and so does this, later
                self._stop.wait(1.0)

    def _wake_soon(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.on_wake)
