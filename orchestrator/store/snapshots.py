"""How a checkpoint is stored: what changed since the one before, not the whole
snapshot again, and every big string once, by its content hash.

A machine's snapshot (the library's ``MachineSnapshot`` fields, the context
among them) is a JSON document. An execution's checkpoints form chains: a
chain starts with a *full* row (the whole document) and goes on with *delta*
rows, each the operations that turn the row before it into its own document:

    ["s", path, value]   set the value at path (a key of an object, an index of
                         an array; the empty path: the whole document)
    ["d", path]          delete the key at path
    ["a", path, values]  append values to the array at path
    ["c", path, k]       cut the first k items of the array at path

A progress marker that changed nothing but its header is a delta of a few
fields (its event, its time). An agent's history that grows by one answer per
turn is an ``a`` of that answer.

A string of ``BIG`` characters or more (a retrieved document, a long model
answer) is stored once in the ``blobs`` table, keyed by a hash of its text,
compressed when that saves; a row names it by path (``b``: [[path, hash]...])
and holds null in its place. Executions that hold the same text share its blob;
``checkpoint_blobs`` links each execution to the blobs it names, which is what
retention follows when it removes an execution.

A chain ends, and the next row is full, when its deltas together outweigh its
full row (and a floor, ``MIN_FULL``), or after ``MAX_CHAIN`` rows: reading a
checkpoint back reads at most its chain's full row and that many bytes of
deltas again (plus the big strings it names), so a resume reads a small
multiple of its document, and the bytes written stay linear in the data
the workflow writes (the full rows of a growing document grow geometrically).

Rows keep a number (``n``) that counts up along the chain; a delta whose number
does not follow the row before it is refused on read (``BrokenChain``), never
applied to the wrong document. Rows written before this format (a JSON text
starting with ``{``) are full rows.

Equality is JSON's: ``1``, ``1.0`` and ``true`` are told apart (the copy kept to
compare with wraps numbers, ``Num``), and so are ``0.0`` and ``-0.0``. Key order
is kept where a value changes; an object whose members are unchanged keeps the
order it was first written in.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

FULL, DELTA = 0, 1
# strings this long (characters) are stored once, by hash. Measured on W9's
# agent (2 KB answers of English-like text, zlib to about 1 KB): 100 turns store
# 158 KiB of rows and blobs with 256 or 1,024, and 264 KiB with 4,096 (the
# answers inline, every full row holding them again); 200 turns 321 vs 602 KiB.
# Below 1,024 a string's hash and link cost about what inlining it saves.
BIG = 1024
# a chain ends once its deltas outweigh its full row (at least this many bytes)
MIN_FULL = 512
MAX_CHAIN = 256
# a stored body this long is compressed, when that saves a tenth or more
COMPRESS_AT = 512
# a snapshot this short (bytes of its JSON text) is stored whole, as the
# library's text: encoding it whole costs less than finding what changed,
# and a chain would save little
PLAIN_MAX = 2048

_TAG_PLAIN, _TAG_ZLIB = b"j", b"z"


class BrokenChain(Exception):
    """A delta row that does not follow the row before it."""


class Num:
    """A number or a boolean in the kept copy: equal only to the same JSON
    value (``1``, ``1.0`` and ``true`` are three values; Python finds them
    equal)."""

    __slots__ = ("v",)

    def __init__(self, v: Any):
        self.v = v

    def __eq__(self, other: object) -> bool:
        v = self.v
        if type(other) is not type(v):
            return type(other) is Num and other == v  # type: ignore[comparison-overlap]
        if other != v:
            return False
        # 0.0 and -0.0 are two JSON texts
        return (
            type(v) is not float or v != 0.0 or math.copysign(1.0, v) == math.copysign(1.0, other)
        )

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Num({self.v!r})"


_NUMS = (int, float, bool)


class _Whole(Exception):
    """This value is set whole (its keys are not all strings, ...)."""


@dataclass(slots=True)
class Blob:
    hash: str
    data: bytes  # stored form (compressed or not, as ``codec`` says)
    codec: str  # "plain" | "zlib"
    size: int  # bytes of the text (UTF-8)


def blob_of(text: str) -> Blob:
    raw = text.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
    packed = zlib.compress(raw, 6)
    if len(packed) <= len(raw) * 0.9:
        return Blob(digest, packed, "zlib", len(raw))
    return Blob(digest, raw, "plain", len(raw))


def blob_text(data: bytes, codec: str) -> str:
    raw = zlib.decompress(data) if codec == "zlib" else bytes(data)
    return raw.decode("utf-8", "surrogatepass")


@dataclass(slots=True)
class Chain:
    """What a persistence keeps of an execution's last stored row: its number,
    a copy of its document to compare with, and the chain's weight so far."""

    n: int
    doc: dict[str, Any]  # the kept copy (numbers as Num)
    full_bytes: int  # the chain's full row
    delta_bytes: int = 0  # its deltas since
    rows: int = 1
    # big strings of the document -> their hashes (blobs this execution names)
    hashes: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Stored:
    """A row to store: its body, whether it is a delta, the new blobs it
    names (to upsert and link) and the known ones (linked already)."""

    body: bytes
    delta: int
    blobs: tuple[Blob, ...] = ()
    raw: int = 0  # bytes of the body before compression


# ---------------------------------------------------------------- encoding


class _Refs:
    """Big strings met while packing a value: [path, hash] in the row, and the
    blobs to write for those this execution has not named yet (``known``:
    text -> hash of those it has)."""

    __slots__ = ("refs", "new", "known", "met")

    def __init__(self, known: dict[str, str]):
        self.refs: list[list[Any]] = []
        self.new: dict[str, Blob] = {}
        self.known = known
        self.met: dict[str, str] = {}

    def take(self, text: str, path: list[Any]) -> None:
        digest = self.known.get(text)
        if digest is None:
            blob = blob_of(text)
            digest = blob.hash
            self.known[text] = digest
            self.new[digest] = blob
        self.met[text] = digest
        self.refs.append([path, digest])


def _take(value: Any, path: list[Any], refs: _Refs) -> tuple[Any, Any]:
    """(copy to keep, value to store) of a JSON value: containers copied,
    numbers wrapped in the copy, big strings replaced by null in the stored
    value (and named in ``refs``). TypeError for what JSON cannot hold."""
    kind = type(value)
    if kind is str:
        if len(value) >= BIG:
            refs.take(value, path)
            return value, None
        return value, value
    if value is None:
        return None, None
    if kind in _NUMS:
        return Num(value), value
    if kind is dict:
        keep: dict[str, Any] = {}
        out: dict[str, Any] = {}
        for k, v in value.items():
            if type(k) is not str:
                return _take_via_json(value, path, refs)
            keep[k], out[k] = _take(v, [*path, k], refs)
        return keep, out
    if kind is list or kind is tuple:
        keep_l: list[Any] = []
        out_l: list[Any] = []
        for i, v in enumerate(value):
            a, b = _take(v, [*path, i], refs)
            keep_l.append(a)
            out_l.append(b)
        return keep_l, out_l
    if isinstance(value, str):  # a str subclass (Markup, ...): JSON writes the text
        return _take(str(value), path, refs)
    if isinstance(value, dict):
        return _take(dict(value), path, refs)
    if isinstance(value, int | float):
        return _take(float(value) if isinstance(value, float) else int(value), path, refs)
    raise TypeError(f"Object of type {kind.__name__} is not JSON serializable")


def _take_via_json(value: Any, path: list[Any], refs: _Refs) -> tuple[Any, Any]:
    # keys that are not strings: what JSON makes of them (as the full text would)
    return _take(json.loads(json.dumps(value)), path, refs)


def plain(value: Any) -> Any:
    """The kept copy as plain JSON values."""
    kind = type(value)
    if kind is Num:
        return value.v
    if kind is dict:
        return {k: plain(v) for k, v in value.items()}
    if kind is list:
        return [plain(v) for v in value]
    return value


def _diff(base: Any, new: Any, path: list[Any], ops: list, refs: _Refs) -> Any:
    """Operations that turn ``base`` (a kept copy) into ``new``; returns the
    kept copy of ``new`` (``base`` updated in place where it could be)."""
    if type(base) is dict and type(new) is dict:
        try:
            return _diff_dict(base, new, path, ops, refs)
        except _Whole:
            pass
    elif type(base) is list and type(new) is list:
        done = _diff_list(base, new, path, ops, refs)
        if done is not None:
            return done
    keep, out = _take(new, path, refs)
    ops.append(["s", path, out])
    return keep


def _diff_dict(base: dict, new: dict, path: list[Any], ops: list, refs: _Refs) -> dict:
    for k in new:
        if type(k) is not str:
            raise _Whole()
    gone = [k for k in base if k not in new]
    for k in gone:
        del base[k]
        ops.append(["d", [*path, k]])
    for k, v in new.items():
        if k in base:
            old = base[k]
            if old == v:
                continue
            base[k] = _diff(old, v, [*path, k], ops, refs)
        else:
            p = [*path, k]
            keep, out = _take(v, p, refs)
            base[k] = keep
            ops.append(["s", p, out])
    return base


def _diff_list(base: list, new: list, path: list[Any], ops: list, refs: _Refs) -> list | None:
    n, m = len(base), len(new)
    cut = 0
    if m >= n and new[:n] == base:
        pass  # appended to (or the same)
    elif n and m:
        # the oldest items dropped (a window over a conversation), perhaps more appended
        try:
            cut = base.index(new[0])
        except ValueError:
            cut = 0
        if not cut or base[cut:] != new[: n - cut]:
            if m == n:
                return _diff_items(base, new, path, ops, refs)
            return None
        del base[:cut]
        ops.append(["c", path, cut])
        n -= cut
    else:
        return None
    if m > n:
        keeps, outs = [], []
        for i in range(n, m):
            a, b = _take(new[i], [*path, i], refs)
            keeps.append(a)
            outs.append(b)
        base.extend(keeps)
        ops.append(["a", path, outs])
    return base


def _diff_items(base: list, new: list, path: list[Any], ops: list, refs: _Refs) -> list | None:
    """Same length: the items that changed, if they are a few of them."""
    changed = [i for i in range(len(new)) if base[i] != new[i]]
    if len(changed) * 2 > len(new):
        return None
    for i in changed:
        base[i] = _diff(base[i], new[i], [*path, i], ops, refs)
    return base


class NotJSON(TypeError):
    """A snapshot with a value JSON cannot hold (the library's own path may
    convert it)."""


def _body(obj: dict[str, Any]) -> tuple[bytes, int]:
    """(stored body, bytes before compression) of a row."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )  # read back with the same error handler (parse): a lone surrogate survives
    if len(text) >= COMPRESS_AT:
        packed = zlib.compress(text, 6)
        if len(packed) <= len(text) * 0.9:
            return _TAG_ZLIB + packed, len(text)
    return _TAG_PLAIN + text, len(text)


def encode_plain(doc: dict[str, Any]) -> Stored | None:
    """A short snapshot stored whole as the library's JSON text (a full row a
    chain may go on from), or None if it is not short."""
    try:
        text = json.dumps(doc)
    except (TypeError, ValueError, RecursionError, OverflowError) as exc:
        raise NotJSON(str(exc)) from exc
    if len(text) > PLAIN_MAX:
        return None
    data = text.encode("utf-8", "surrogatepass")
    return Stored(data, FULL, (), len(data))


def encode_full(
    doc: dict[str, Any], n: int = 0, hashes: dict[str, str] | None = None
) -> tuple[Stored, Chain]:
    """A full row of ``doc`` and the chain it starts."""
    refs = _Refs(dict(hashes or {}))
    keep, out = _take(doc, [], refs)
    body = {"n": n, "s": out}
    if refs.refs:
        body["b"] = refs.refs
    data, raw = _body(body)
    chain = Chain(n=n, doc=keep, full_bytes=len(data), hashes=refs.met)
    return Stored(data, FULL, tuple(refs.new.values()), raw), chain


# the snapshot fields a row's own columns hold as well: a delta whose values of
# them are its row's (``r``) leaves them to the columns
ROW_FIELDS = ("step", "event", "created_at")


def row_fields(step: int, event: str, at: datetime | None) -> tuple[int, str, str] | None:
    """A row's step, event and time as its snapshot writes them (the runner's
    ``created_at``: naive UTC, ISO, ``+00:00``)."""
    return None if at is None else (step, event, f"{at.isoformat()}+00:00")


def encode(
    chain: Chain | None,
    doc: dict[str, Any],
    *,
    only: Iterable[str] | None = None,
    row: tuple[int, str, str] | None = None,
) -> tuple[Stored, Chain]:
    """See ``_encode``; NotJSON for a value JSON cannot hold."""
    try:
        return _encode(chain, doc, only=only, row=row)
    except NotJSON:
        raise
    except (TypeError, ValueError, RecursionError, OverflowError) as exc:
        raise NotJSON(str(exc)) from exc


def _encode(
    chain: Chain | None,
    doc: dict[str, Any],
    *,
    only: Iterable[str] | None = None,
    row: tuple[int, str, str] | None = None,
) -> tuple[Stored, Chain]:
    """The row that stores ``doc`` after ``chain``'s last one: a delta, or a
    full row when there is no chain or it is long enough. ``only``: the
    fields that can have changed (the others are known to be the same);
    ``row``: the row's own step, event and time (``row_fields``), which a
    delta leaves to the row's columns when the snapshot's are the same.
    On an error the chain is spent (its copy may be half updated)."""
    if chain is None or chain.rows >= MAX_CHAIN:
        return encode_full(doc, 0, chain.hashes if chain else None)
    ops: list[Any] = []
    refs = _Refs(chain.hashes)
    base = chain.doc
    keys = only if only is not None else doc
    from_row = (
        row is not None
        and all(k in base for k in ROW_FIELDS)
        and type(doc.get("step")) is int
        and (doc.get("step"), doc.get("event"), doc.get("created_at")) == row
    )
    if from_row:
        base["step"], base["event"], base["created_at"] = Num(row[0]), row[1], row[2]
        keys = [k for k in keys if k not in ROW_FIELDS]
    for k in keys:
        v = doc[k]
        if k in base:
            old = base[k]
            if old == v:
                continue
            base[k] = _diff(old, v, [k], ops, refs)
        else:
            keep, out = _take(v, [k], refs)
            base[k] = keep
            ops.append(["s", [k], out])
    if only is None:
        for k in [k for k in base if k not in doc]:
            del base[k]
            ops.append(["d", [k]])
    body: dict[str, Any] = {"n": chain.n + 1, "o": ops}
    if from_row:
        body["r"] = 1
    if refs.refs:
        body["b"] = refs.refs
    data, raw = _body(body)
    if chain.delta_bytes + len(data) > max(chain.full_bytes, MIN_FULL):
        # the deltas outweigh the full row: a new chain, from the kept copy
        # (with the blobs this delta would have written)
        return encode_full_from_copy(chain, refs.new)
    chain.n += 1
    chain.delta_bytes += len(data)
    chain.rows += 1
    return Stored(data, DELTA, tuple(refs.new.values()), raw), chain


def encode_full_from_copy(chain: Chain, new: dict[str, Blob] | None = None) -> tuple[Stored, Chain]:
    """A full row of the chain's (updated) copy, starting a new chain; ``new``:
    blobs not written yet that it names."""
    refs = _Refs(chain.hashes)
    if new:
        refs.new.update(new)
    out = _pack_copy(chain.doc, [], refs)
    body = {"n": 0, "s": out}
    if refs.refs:
        body["b"] = refs.refs
    data, raw = _body(body)
    # the new chain knows the big strings its document holds (the others are
    # let go of: one named again is written again, which is safe)
    named = set(refs.met.values())
    blobs = tuple(b for h, b in refs.new.items() if h in named)
    return Stored(data, FULL, blobs, raw), Chain(
        n=0, doc=chain.doc, full_bytes=len(data), hashes=refs.met
    )


def _pack_copy(value: Any, path: list[Any], refs: _Refs) -> Any:
    kind = type(value)
    if kind is Num:
        return value.v
    if kind is str:
        if len(value) >= BIG:
            refs.take(value, path)
            return None
        return value
    if kind is dict:
        return {k: _pack_copy(v, [*path, k], refs) for k, v in value.items()}
    if kind is list:
        return [_pack_copy(v, [*path, i], refs) for i, v in enumerate(value)]
    return value


def whole(doc: dict[str, Any], n: int) -> bytes:
    """A full row of a read-back document that keeps its place (``n``) in its
    chain; its big strings held inline."""
    return _body({"n": n, "s": doc})[0]


# ---------------------------------------------------------------- decoding


def parse(data: bytes) -> dict[str, Any]:
    """A stored row's body (a pre-format row as a full one at number 0)."""
    data = bytes(data)
    tag = data[:1]
    if tag == b"{":
        return {"n": 0, "s": json.loads(data.decode("utf-8", "surrogatepass"))}
    if tag == _TAG_PLAIN:
        return json.loads(data[1:].decode("utf-8", "surrogatepass"))
    if tag == _TAG_ZLIB:
        return json.loads(zlib.decompress(data[1:]).decode("utf-8", "surrogatepass"))
    raise BrokenChain(f"a checkpoint row of an unknown form ({tag!r})")


def hashes_of(bodies: Iterable[dict[str, Any]]) -> set[str]:
    return {h for body in bodies for _, h in body.get("b", ())}


def _at(doc: Any, path: list[Any]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _apply(doc: Any, body: dict[str, Any]) -> Any:
    for op in body.get("o", ()):
        kind, path = op[0], op[1]
        if kind == "s":
            if not path:
                doc = op[2]
            else:
                _at(doc, path[:-1])[path[-1]] = op[2]
        elif kind == "d":
            del _at(doc, path[:-1])[path[-1]]
        elif kind == "a":
            _at(doc, path).extend(op[2])
        elif kind == "c":
            del _at(doc, path)[: op[2]]
        else:
            raise BrokenChain(f"unknown checkpoint operation {kind!r}")
    return doc


def _fill(doc: Any, body: dict[str, Any], texts: dict[str, str], found: dict[str, str]) -> Any:
    for path, digest in body.get("b", ()):
        text = texts.get(digest)
        if text is None:
            raise BrokenChain(f"a checkpoint names a stored value that is gone ({digest})")
        found[text] = digest
        if not path:
            doc = text
        else:
            _at(doc, path[:-1])[path[-1]] = text
    return doc


@dataclass(slots=True)
class Decoded:
    doc: dict[str, Any]
    n: int
    full_bytes: int
    delta_bytes: int
    rows: int
    hashes: dict[str, str]  # big strings met -> their hashes


def decode(
    rows: list[bytes], texts: Any, columns: list[tuple[int, str, str]] | None = None
) -> Decoded:
    """The document of a chain's last row: ``rows`` its stored bodies, full one
    first; ``texts`` the big strings they name, by hash (a mapping, or a
    function of the set of hashes that returns one); ``columns`` each row's
    step, event and time (``row_fields``), for the deltas that leave them to
    their row."""
    if not rows:
        raise BrokenChain("no checkpoint rows to read")
    bodies = [parse(r) for r in rows]
    if callable(texts):
        wanted = hashes_of(bodies)
        texts = texts(wanted) if wanted else {}
    return decode_bodies(bodies, [len(r) for r in rows], texts, columns)


def decode_bodies(
    bodies: list[dict[str, Any]],
    sizes: list[int],
    texts: dict[str, str],
    columns: list[tuple[int, str, str]] | None = None,
) -> Decoded:
    first = bodies[0]
    if "s" not in first:
        raise BrokenChain("a checkpoint chain that does not start with a full row")
    found: dict[str, str] = {}
    doc = _fill(first["s"], first, texts, found)
    n = first.get("n", 0)
    for i, body in enumerate(bodies[1:], start=1):
        if "s" in body:  # a full row inside (a reader that asked from too far back)
            doc, n = _fill(body["s"], body, texts, found), body.get("n", 0)
            continue
        if body.get("n") != n + 1:
            raise BrokenChain(
                f"checkpoint {body.get('n')} does not follow checkpoint {n} of its chain"
            )
        n += 1
        doc = _fill(_apply(doc, body), body, texts, found)
        if body.get("r"):
            if columns is None:
                raise BrokenChain("a checkpoint row read without its columns")
            doc["step"], doc["event"], doc["created_at"] = columns[i]
    return Decoded(doc, n, sizes[0], sum(sizes[1:]), len(bodies), found)


def keep_copy(value: Any) -> Any:
    """The copy kept to compare with, of a plain JSON value (as read back)."""
    kind = type(value)
    if kind is dict:
        return {k: keep_copy(v) for k, v in value.items()}
    if kind is list:
        return [keep_copy(v) for v in value]
    if kind in _NUMS:
        return Num(value)
    return value


def chain_of(decoded: Decoded) -> Chain:
    """The chain a persistence goes on from, after reading its last row back."""
    return Chain(
        n=decoded.n,
        doc=keep_copy(decoded.doc),
        full_bytes=decoded.full_bytes,
        delta_bytes=decoded.delta_bytes,
        rows=decoded.rows,
        hashes=dict(decoded.hashes),
    )
