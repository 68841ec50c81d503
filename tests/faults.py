"""Test doubles for a store that stops answering.

``StatementFaults``: every engine the store makes while it is installed hands
out DBAPI connections wrapped so that the Nth statement (COMMIT included)
across the whole process fails the way a dropped connection does: on
PostgreSQL the real connection is closed under the driver and psycopg's own
``OperationalError`` is raised; on SQLite, sqlite3's ``disk I/O error``. With
``lost_reply`` a COMMIT is carried out first and only its reply is lost, the
case where the caller cannot know whether its write committed.

``TcpCut``: a TCP forwarder in front of PostgreSQL that a test closes (every
connection reset, new ones refused) and opens again.
"""

from __future__ import annotations

import contextlib
import re
import socket
import sqlite3
import struct
import threading
from collections.abc import Iterable

import psycopg
import sqlalchemy as sa

import orchestrator.store.engine as eng


class StatementFaults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.armed = False
        self.count = 0  # statements seen since arm()
        self.fail_at: set[int] = set()
        self.match: re.Pattern[str] | None = None  # count only statements matching this
        self.lost_reply = False
        self.failed: list[tuple[int, str]] = []  # (n, statement) of each fault raised
        self.seen: list[str] = []  # every statement counted since arm()

    def arm(
        self,
        fail_at: Iterable[int] = (),
        *,
        match: str | None = None,
        lost_reply: bool = False,
    ) -> None:
        with self._lock:
            self.count = 0
            self.fail_at = set(fail_at)
            self.match = re.compile(match, re.I | re.S) if match else None
            self.lost_reply = lost_reply
            self.failed = []
            self.seen = []
            self.armed = True

    def disarm(self) -> None:
        with self._lock:
            self.armed = False

    def install(self, monkeypatch) -> StatementFaults:
        real_create = eng.create_engine
        _PgConnection.faults = _SqliteConnection.faults = self

        def create_engine(url, **kw):
            engine = real_create(url, **kw)

            @sa.event.listens_for(engine, "do_connect")
            def _connect(dialect, _record, cargs, cparams):
                if dialect.name == "sqlite":
                    return sqlite3.connect(*cargs, **cparams, factory=_SqliteConnection)
                return _PgConnection.connect(*cargs, **cparams)

            return engine

        monkeypatch.setattr(eng, "create_engine", create_engine)
        return self

    def _hit(self, statement: str) -> bool:
        """Count one statement; True if it is to fail."""
        if statement.strip().upper().startswith("SELECT 1") or statement.strip() == ";":
            return False  # pool pre-ping: not a statement of the run
        with self._lock:
            if not self.armed:
                return False
            if self.match is not None and not self.match.search(statement):
                return False
            self.count += 1
            self.seen.append(statement.strip()[:80])
            if self.count in self.fail_at:
                self.failed.append((self.count, statement.strip()[:80]))
                return True
            return False


class _PgConnection(psycopg.Connection):
    """psycopg's own connection (the dialect insists on the type), counting."""

    faults: StatementFaults

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cursor_factory = _PgCursor

    def commit(self) -> None:
        if self.faults._hit("COMMIT"):
            if self.faults.lost_reply:
                super().commit()  # it committed; the caller never hears so
            self._drop()
        super().commit()

    def _drop(self):
        # the connection dies under the driver, as when the server goes away
        with contextlib.suppress(Exception):
            self.close()
        raise psycopg.OperationalError(
            "consuming input failed: server closed the connection unexpectedly"
        )


class _PgCursor(psycopg.Cursor):
    def execute(self, query, *args, **kwargs):
        if self.connection.faults._hit(str(query)):
            self.connection._drop()
        return super().execute(query, *args, **kwargs)

    def executemany(self, query, *args, **kwargs):
        if self.connection.faults._hit(str(query)):
            self.connection._drop()
        return super().executemany(query, *args, **kwargs)


class _SqliteConnection(sqlite3.Connection):
    faults: StatementFaults

    def cursor(self, factory=None):
        return super().cursor(factory or _SqliteCursor)

    def commit(self) -> None:
        if self.faults._hit("COMMIT"):
            if self.faults.lost_reply:
                super().commit()
            raise sqlite3.OperationalError("disk I/O error")
        super().commit()


class _SqliteCursor(sqlite3.Cursor):
    def execute(self, sql, *args):
        if self.connection.faults._hit(str(sql)):
            raise sqlite3.OperationalError("disk I/O error")
        return super().execute(sql, *args)

    def executemany(self, sql, *args):
        if self.connection.faults._hit(str(sql)):
            raise sqlite3.OperationalError("disk I/O error")
        return super().executemany(sql, *args)


class TcpCut:
    """A forwarder on 127.0.0.1:<port> to ``target``; ``cut()`` resets every
    connection and refuses new ones until ``restore()``."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = self._listen(0)
        self.cuts = 0

    def _listen(self, port: int) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()
        return sock.getsockname()[1]

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut while this one was connecting
                    client.close()
                    upstream.close()
                    continue
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Every connection through the forwarder is reset; new ones are refused."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # stops listening, wakes accept()
            listener.close()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RD)  # wakes the pipe thread blocked on it
            with contextlib.suppress(OSError):
                # RST, as a server process killed under its clients would leave them
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
        self.cuts += 1

    def restore(self) -> None:
        if self._listener is None:
            self._listen(self.port)

    def close(self) -> None:
        self.cut()
