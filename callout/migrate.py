"""Bulk import and export of user records: the old control plane's SQLite allowlist, CSV or
JSON lines in; JSON lines out.

Three steps, so that nothing is written unless the whole input is valid, and nothing written
can clobber an edit someone makes meanwhile:

1. read: a source yields one `Item` (a valid row: key and the record bytes to store) or one
   `Invalid` (with its line or row id) per input row, streaming; `collect` keeps the items by
   key, and turns a repeated key into an invalid row.
2. `plan`: the bucket's current value of each key (one pass over the bucket, or one lookup
   per key when the bucket is much larger than the input) classifies it as added /
   unchanged / overwritten / conflicting, and the revision seen is remembered.
3. `apply`: a create for each new key, a compare-and-set update at the planned revision for
   each overwrite. A key that changed since it was planned is a conflict and is left alone.

Records are stored complete (every field explicit); a row is read exactly as the service
reads a record, so an unknown or repeated key is an invalid row (a control plane's own data
goes in `meta`). A stored record is unchanged when every record field and every field the
input names are equal; fields the input does not name are not compared, and are kept when
the record is overwritten. So a second run, and an export imported back, are all
unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import sqlite3
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

from callout.keys import KeyError_, KeyKind, decode_public
from callout.records import MAX_RECORD_BYTES, RecordError, UserRecord, loads, parse_record
from callout.store.base import StoreError
from callout.store.kv import (
    KVStore,
    NoStreamError,
    bucket_info,
    create_key,
    ensure_bucket,
    is_delete,
    stream_name,
    update_key,
)

# Lookups and writes in flight at once: enough to hide the round trip, few enough not to
# swamp a JetStream leader that is also serving the callout's own lookups.
IN_FLIGHT = 64
# Planning reads the whole bucket in one pass when it holds at most this many messages per
# row imported; otherwise it looks each key up.
SCAN_RATIO = 4
# Problems listed one by one (on stderr and in the summary); the counts are always complete.
REPORT_LIMIT = 1000

ADDED = "added"
OVERWRITTEN = "overwritten"
UNCHANGED = "unchanged"
CONFLICTING = "conflicting"
INVALID = "invalid"
FAILED = "failed"
COUNTS = (ADDED, OVERWRITTEN, UNCHANGED, CONFLICTING, INVALID, FAILED)

FIELDS = ("name", "admin", "revoked", "account", "permissions")
LIST_COLUMNS = ("pub_allow", "pub_deny", "sub_allow", "sub_deny")
CSV_COLUMNS = ("key", *FIELDS, *LIST_COLUMNS)

# KV deletes and purges, and (nats-server 2.11+) per-message TTL expiries.

# Where a row came from: ("line", 3) in a file, ("rowid", 42) in SQLite, ("row", 7) in a
# table without rowids or a view (numbered in the order read).
Where = tuple[str, int]


class SourceError(Exception):
    """The input as a whole cannot be read (missing file, bad header, unknown table or
    column): nothing is imported. The message is one line for the user."""


_ABSENT = object()


def where(at: Where) -> str:
    return f"{at[0]} {at[1]}"


@dataclass(frozen=True, slots=True)
class Invalid:
    at: Where
    error: str
    key: str | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {self.at[0]: self.at[1]}
        if self.key is not None:
            doc["key"] = self.key
        doc["error"] = self.error
        return doc


@dataclass(slots=True)
class Item:
    """One valid row, and what planning and applying made of it."""

    key: str
    value: bytes
    at: Where
    action: str = ""
    revision: int = 0
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, self.at[0]: self.at[1], "reason": self.reason}


# ---------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------
def user_key(value: object) -> str:
    """Like `callout users add`: case-insensitive on input, stored upper-case."""
    if value is None or value == "":
        raise RecordError("key is missing")
    if not isinstance(value, str):
        raise RecordError(f"key must be text, not {_kind(value)}")
    key = value.strip().upper()
    try:
        decode_public(key, KeyKind.USER)
    except KeyError_ as exc:
        if key.startswith("S"):
            # Never echo what may be a seed (the report goes to terminals and CI logs).
            raise RecordError(
                "that looks like a seed, not a public key (treat it as exposed)"
            ) from None
        raise RecordError(f"invalid user public key {value[:60]!r}: {exc}") from None
    return key


def record_value(doc: dict[str, Any]) -> bytes:
    """The bytes to store for a record document (without its key): validated exactly as the
    service will read it, every field explicit, `meta` kept."""
    value = orjson.dumps(_complete(parse_record(orjson.dumps(doc)), doc))
    if len(value) > MAX_RECORD_BYTES:
        raise RecordError(f"record larger than {MAX_RECORD_BYTES} bytes")
    return _compact(value)


def _compact(data: bytes) -> bytes:
    # orjson's output keeps its ~4 KiB working buffer; a copy is exact-size. Kept for every row,
    # that is the difference between ~60 MiB and ~450 MiB for 100,000 rows.
    return bytes(memoryview(data))


def canonical(value: bytes) -> dict[str, Any] | None:
    """A stored record as `record_value` would write it; None when it is not a valid record
    (so it differs from anything an import writes)."""
    try:
        record = parse_record(value)
    except RecordError:
        return None
    doc = orjson.loads(value)
    # The bucket key is the key: a "key" field in a record means nothing, and export drops it.
    doc.pop("key", None)
    return _complete(record, doc)


def _complete(record: UserRecord, doc: dict[str, Any]) -> dict[str, Any]:
    """The record's fields, all explicit, then the document's others (`meta`, a false
    `keep_sessions`) in their order."""
    complete = record.as_json()
    complete.update((name, value) for name, value in doc.items() if name not in complete)
    return complete


_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"", "0", "false", "no"})


def _flag(value: object, name: str) -> bool:
    if value is None:
        return False
    # bool is an int subclass: only SQLite's 0 and 1 are flags, not 2 or 1.0.
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise RecordError(f"{name} must be 0, 1, true, false, yes or no, not {value!r:.60}")


def _kind(value: object) -> str:
    return "text that is not UTF-8" if isinstance(value, NotUtf8) else type(value).__name__


def _text(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise RecordError(f"{name} must be text, not {_kind(value)}")


def _subject_list(value: object, name: str) -> list[str]:
    text = _text(value, name) or ""
    # Subjects cannot contain whitespace, so it separates them unambiguously; a comma can be
    # part of a subject, and here it is far more likely a mistaken separator.
    if "," in text:
        raise RecordError(f"{name}: separate subjects with spaces, not commas")
    return text.split()


def columns_record(values: dict[str, Any]) -> bytes:
    """Record bytes from column values (CSV or SQLite): the fields present among `FIELDS` and
    `LIST_COLUMNS`; NULL or empty means the field's default."""
    doc: dict[str, Any] = {}
    if "name" in values:
        doc["name"] = _text(values["name"], "name") or ""
    for flag in ("admin", "revoked"):
        if flag in values:
            doc[flag] = _flag(values[flag], flag)
    if "account" in values:
        doc["account"] = (_text(values["account"], "account") or "").strip() or None
    permissions = _text(values.get("permissions"), "permissions")
    if permissions and permissions.strip():
        doc["permissions"] = loads(permissions.encode(), "permissions")
    elif any(column in values for column in LIST_COLUMNS):
        doc["permissions"] = {
            direction: {
                kind: _subject_list(values.get(f"{direction}_{kind}"), f"{direction}_{kind}")
                for kind in ("allow", "deny")
            }
            for direction in ("pub", "sub")
        }
    return record_value(doc)


def _row(
    at: Where, raw_key: object, build: Callable[[dict[str, Any]], bytes], doc: dict[str, Any]
) -> Item | Invalid:
    try:
        key = user_key(raw_key)
    except RecordError as exc:
        return Invalid(at, str(exc))
    try:
        return Item(key, build(doc), at)
    except RecordError as exc:
        return Invalid(at, str(exc), key)


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
def read_jsonl(stream: Iterable[bytes]) -> Iterator[Item | Invalid]:
    """One record per line, as `export` writes them: {"key": "U...", "name": ..., ...}.
    Blank lines are skipped."""
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        at = ("line", number)
        try:
            doc = loads(line, "the line")
        except RecordError as exc:
            yield Invalid(at, str(exc))
            continue
        if not isinstance(doc, dict):
            yield Invalid(at, "not a JSON object")
            continue
        raw_key = doc.pop("key", None)
        if "invalid_record" in doc:
            # `users list` shows a stored value that does not parse this way. Imported, it would
            # be a record with every default, i.e. an unrestricted user instead of a denied one.
            yield Invalid(at, "an unreadable record as `users list` shows it; not importable")
            continue
        yield _row(at, raw_key, record_value, doc)


def read_csv(stream: IO[str]) -> Iterator[Item | Invalid]:
    """A header line naming the columns (`CSV_COLUMNS`, any order, `key` required), then one
    user per line. Subject lists are space-separated; `permissions` is JSON instead."""
    reader = csv.reader(stream)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise SourceError(f"line 1: not a CSV header: {exc}") from None
    if header is None:
        raise SourceError("the CSV file is empty (it needs a header line)")
    names = [name.strip().lower() for name in header]
    unknown = [name for name in names if name not in CSV_COLUMNS]
    if unknown:
        raise SourceError(
            f"unknown CSV column(s) {', '.join(map(repr, unknown))};"
            f" known: {', '.join(CSV_COLUMNS)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceError(f"CSV column(s) given twice: {', '.join(repeated)}")
    if "key" not in names:
        raise SourceError("the CSV header has no 'key' column")
    if "permissions" in names and any(column in names for column in LIST_COLUMNS):
        raise SourceError("give either a 'permissions' column or pub_/sub_ columns, not both")
    return _csv_rows(reader, names)


def _csv_rows(reader: Any, names: list[str]) -> Iterator[Item | Invalid]:
    while True:
        # A quoted field may span lines: a row is named by the line it starts on.
        number = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise SourceError(f"line {number}: not valid CSV: {exc}") from None
        except UnicodeDecodeError:
            raise SourceError(f"line {number}: the file is not UTF-8") from None
        if not any(cell.strip() for cell in row):
            continue
        at = ("line", number)
        if len(row) != len(names):
            yield Invalid(at, f"{len(row)} fields, the header has {len(names)}")
            continue
        values: dict[str, Any] = dict(zip(names, row, strict=True))
        yield _row(at, values.pop("key"), columns_record, values)


def _quote(identifier: str) -> str:
    """An SQL identifier, quoted. Only ever applied to names read back from the database's own
    schema, so a flag cannot smuggle SQL in: an unknown name is an error before any query."""
    return '"' + identifier.replace('"', '""') + '"'


class NotUtf8(bytes):
    """An SQLite TEXT value that is not UTF-8: its row is invalid, the read goes on."""


def _text_factory(data: bytes) -> str | NotUtf8:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return NotUtf8(data)


class SqliteSource:
    """Rows of one table (or view) of an SQLite database, opened read-only and streamed.

    `columns` maps a record field ("key", or one of `FIELDS`) to a column name; a field not
    given uses the column of the same name when the table has one."""

    def __init__(self, path: str, table: str, columns: dict[str, str | None]) -> None:
        file = Path(path)
        if not file.is_file():
            raise SourceError(f"{path}: no such file")
        # mode=ro: never written, and a wrong path is not silently created as an empty database.
        uri = file.resolve().as_uri() + "?mode=ro"
        try:
            self._db = sqlite3.connect(uri, uri=True)
            self._db.text_factory = _text_factory
            self._prepare(path, table, columns)
        except sqlite3.Error as exc:
            self.close()
            raise SourceError(f"{path}: {exc}") from None
        except SourceError:
            self.close()
            raise

    def _prepare(self, path: str, table: str, columns: dict[str, str | None]) -> None:
        found = self._db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"
            " AND name = ? COLLATE NOCASE",
            (table,),
        ).fetchone()
        if found is None:
            raise SourceError(f"{path}: no table {table!r}")
        self.table: str = found[0]
        have = {
            row[0].lower(): row[0]
            for row in self._db.execute("SELECT name FROM pragma_table_info(?)", (self.table,))
        }
        self.mapping: dict[str, str] = {}
        for name in ("key", *FIELDS):
            wanted = columns.get(name)
            column = have.get((wanted or name).lower())
            if column is not None:
                self.mapping[name] = column
            elif wanted is not None or name == "key":
                flag = f"--{name}-column"
                raise SourceError(
                    f"table {self.table!r} has no column {wanted or name!r} ({flag}); it has"
                    f" {', '.join(sorted(have.values()))}"
                )
        selected = ", ".join(_quote(self.mapping[name]) for name in self.mapping)
        source = f"SELECT {{}}{selected} FROM {_quote(self.table)}"  # noqa: S608 - see _quote
        # Report rows by rowid, which the user can look up; WITHOUT ROWID tables have none, so
        # their rows are numbered in order.
        try:
            self._db.execute(source.format("rowid, ") + " LIMIT 0")
            self._query = source.format("rowid, ")
        except sqlite3.OperationalError:
            self._query = source.format("NULL, ")

    def __iter__(self) -> Iterator[Item | Invalid]:
        try:
            cursor = self._db.execute(self._query)
            fields = list(self.mapping)
            for number, row in enumerate(cursor, 1):
                # A view may answer NULL for rowid: then the row's position names it.
                at = ("rowid", row[0]) if isinstance(row[0], int) else ("row", number)
                values: dict[str, Any] = dict(zip(fields, row[1:], strict=True))
                yield _row(at, values.pop("key"), columns_record, values)
        except sqlite3.Error as exc:
            raise SourceError(f"reading table {self.table!r}: {exc}") from None
        finally:
            self.close()

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()


# ---------------------------------------------------------------------------------------------
# collect, plan, apply
# ---------------------------------------------------------------------------------------------
@dataclass
class Collected:
    items: dict[str, Item] = field(default_factory=dict)
    invalid: list[Invalid] = field(default_factory=list)
    rows: int = 0


def collect(rows: Iterable[Item | Invalid]) -> Collected:
    """Every row of a source; a key seen before (in any case, valid row or not) is invalid."""
    out = Collected()
    invalid_keys: dict[str, Where] = {}
    for row in rows:
        out.rows += 1
        first = out.items.get(row.key) if row.key is not None else None
        first_at = first.at if first is not None else invalid_keys.get(row.key or "")
        if first_at is not None:
            out.invalid.append(
                Invalid(row.at, f"duplicate key (first at {where(first_at)})", row.key)
            )
        elif isinstance(row, Invalid):
            out.invalid.append(row)
            if row.key is not None:
                invalid_keys[row.key] = row.at
        else:
            out.items[row.key] = row
    return out


async def scan(
    nc: Client, bucket: str, keep: Callable[[str], bool] | None = None, stall: float = 5.0
) -> dict[str, tuple[bytes, int]]:
    """(value, revision) of every live key of the bucket (those `keep` accepts), in one pass of
    an ordered consumer rather than a request per key. Empty when the bucket does not exist; a
    StoreError when nothing arrives for `stall` seconds before the end."""
    prefix = f"$KV.{bucket}."
    found: dict[str, tuple[bytes, int]] = {}
    loaded = asyncio.Event()
    progress = asyncio.Event()
    highest = 0

    async def on_message(msg: Msg) -> None:
        nonlocal highest
        key = msg.subject[len(prefix) :]
        headers = msg.headers or {}
        meta = msg.metadata
        if is_delete(headers):
            found.pop(key, None)
        elif keep is None or keep(key):
            found[key] = (msg.data, meta.sequence.stream)
        highest = max(highest, meta.sequence.stream)
        progress.set()
        if meta.num_pending == 0:
            loaded.set()

    try:
        # What the scan must reach: a fresh consumer can report nothing pending before it has
        # caught up (seen on R3 clusters), and the stream's last message always comes.
        state = (await nc.jetstream().stream_info(stream_name(bucket))).state
    except nats.js.errors.NotFoundError:
        return {}
    try:
        sub = await nc.jetstream().subscribe(
            prefix + ">",
            stream=stream_name(bucket),
            cb=on_message,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
    except nats.js.errors.NotFoundError:
        return {}
    try:
        info = await sub.consumer_info()
        if info.num_pending == 0 and sub.delivered == 0:
            loaded.set()  # an empty bucket sends nothing that marks the end
        while not loaded.is_set() or (state.messages and highest < state.last_seq):
            progress.clear()
            try:
                async with asyncio.timeout(stall):
                    await progress.wait()
            except TimeoutError:
                raise StoreError(f"reading bucket {bucket!r} stalled") from None
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found


class Bucket(Protocol):
    """What planning and applying need from the users bucket."""

    async def get_entry(self, key: str) -> tuple[bytes, int] | None: ...

    async def size(self) -> int:
        """Messages in the bucket: at least its number of keys, the cost of a `scan`."""
        ...

    async def scan(self, keep: Callable[[str], bool]) -> dict[str, tuple[bytes, int]]:
        """(value, revision) of every live key that `keep` accepts."""
        ...

    async def create(self, key: str, value: bytes) -> bool:
        """False when the key has a live value."""
        ...

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        """False when the key's last revision is not `revision`."""
        ...


class KVBucket:
    """`Bucket` over JetStream KV: lookups from the stream leader (`KVStore`), writes with the
    expected-last-revision header."""

    def __init__(self, nc: Client, bucket: str, kv: KeyValue) -> None:
        self._nc = nc
        self._bucket = bucket
        self._store = KVStore(nc, bucket)
        self._kv = kv

    @classmethod
    async def open(cls, nc: Client, bucket: str) -> KVBucket:
        return cls(nc, bucket, await nc.jetstream().key_value(bucket))

    async def get_entry(self, key: str) -> tuple[bytes, int] | None:
        return await self._store.get_entry(key)

    async def size(self) -> int:
        info = await self._nc.jetstream().stream_info(stream_name(self._bucket))
        return info.state.messages

    async def scan(self, keep: Callable[[str], bool]) -> dict[str, tuple[bytes, int]]:
        return await scan(self._nc, self._bucket, keep)

    async def create(self, key: str, value: bytes) -> bool:
        return await create_key(self._kv, key, value)

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        return await update_key(self._kv, key, value, revision)


async def _each(items: Iterable[Item], work: Callable[[Item], Awaitable[None]], limit: int) -> None:
    """`work` on every item, at most `limit` at once; the first exception cancels the rest."""
    shared = iter(items)

    async def worker() -> None:
        for item in shared:
            await work(item)

    tasks = [asyncio.create_task(worker()) for _ in range(limit)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def plan(
    bucket: Bucket | None,
    items: dict[str, Item],
    *,
    overwrite: bool,
    limit: int = IN_FLIGHT,
    scan_ratio: float = SCAN_RATIO,
) -> None:
    """Set each item's action from the bucket's current value (`bucket` None: it does not
    exist, everything is new). A lookup error aborts: nothing has been written yet."""
    current: dict[str, tuple[bytes, int]] | None = None
    # One pass over the bucket when that reads fewer messages than the lookups would cost
    # (a lookup costs several times a delivered message); a lookup per key otherwise, so a
    # few rows imported into a large bucket do not read all of it.
    if bucket is not None and await bucket.size() <= scan_ratio * len(items):
        current = await bucket.scan(items.__contains__)

    async def classify(item: Item) -> None:
        if current is not None:
            entry = current.get(item.key)
        else:
            entry = None if bucket is None else await bucket.get_entry(item.key)
        if entry is None:
            item.action, item.revision = ADDED, 0
            return
        value, item.revision = entry
        if value == item.value:
            item.action = UNCHANGED
            return
        stored, new = canonical(value), orjson.loads(item.value)
        # Every record field is compared; an unknown field only when the input names it (one
        # the input does not mention belongs to whoever wrote it, and is kept).
        if stored is not None and all(stored.get(k, _ABSENT) == v for k, v in new.items()):
            item.action = UNCHANGED
        elif not overwrite:
            item.action, item.reason = CONFLICTING, "a different record exists"
        else:
            item.action = OVERWRITTEN
            kept = {k: v for k, v in (stored or {}).items() if k not in new}
            merged = _compact(orjson.dumps({**new, **kept})) if kept else item.value
            # Too large with the kept fields: the input's record alone is what was asked for.
            if len(merged) <= MAX_RECORD_BYTES:
                item.value = merged

    await _each(items.values(), classify, limit)


async def apply(bucket: Bucket, items: Collection[Item], *, limit: int = IN_FLIGHT) -> None:
    """Write what `plan` decided. Each write is conditional on the key being as planned; one
    that is not becomes a conflict. A write error fails that item only: the rest go on, and
    running the import again finishes the job (what was written is then unchanged). Once a
    write has found no stream for the whole time a write waits, JetStream is down, not one
    key: the rest are not tried (each would wait as long), and fail with that reason."""
    down: str | None = None

    async def write(item: Item) -> None:
        nonlocal down
        if item.action not in (ADDED, OVERWRITTEN):
            return
        if down is not None:
            item.action, item.reason = FAILED, f"not tried: {down}"
            return
        try:
            if item.action == ADDED:
                ok = await bucket.create(item.key, item.value)
            else:
                ok = await bucket.update(item.key, item.value, item.revision)
        except Exception as exc:  # any error: this write's outcome is unknown, the others are not
            item.action, item.reason = FAILED, _describe(exc)
            if isinstance(exc, NoStreamError):
                down = item.reason
            return
        if not ok:
            item.action, item.reason = CONFLICTING, "changed while importing; left as it is"

    await _each(items, write, limit)


def _describe(exc: BaseException) -> str:
    return str(exc).strip()[:200] or type(exc).__name__


async def open_bucket(
    nc: Client, bucket: str, *, create: bool, replicas: int | None
) -> KVBucket | None:
    """The users bucket, created when missing if `create`; None when it is missing and not
    created (a dry run writes nothing, not even the bucket)."""
    if create:
        await ensure_bucket(nc, bucket, replicas)
    elif await bucket_info(nc, bucket) is None:
        return None
    return await KVBucket.open(nc, bucket)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    rows: int
    dry_run: bool
    counts: dict[str, int]
    invalid: list[Invalid]
    conflicts: list[Item]
    failures: list[Item]

    @classmethod
    def of(cls, collected: Collected, *, dry_run: bool, planned: bool) -> Report:
        counts = dict.fromkeys(COUNTS, 0)
        counts[INVALID] = len(collected.invalid)
        conflicts: list[Item] = []
        failures: list[Item] = []
        if planned:
            for item in collected.items.values():
                counts[item.action] += 1
                if item.action == CONFLICTING:
                    conflicts.append(item)
                elif item.action == FAILED:
                    failures.append(item)
        return cls(collected.rows, dry_run, counts, collected.invalid, conflicts, failures)

    @property
    def ok(self) -> bool:
        return not (self.counts[INVALID] or self.counts[CONFLICTING] or self.counts[FAILED])

    @property
    def written(self) -> int:
        return 0 if self.dry_run else self.counts[ADDED] + self.counts[OVERWRITTEN]

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            **self.counts,
            "written": self.written,
            "dry_run": self.dry_run,
            "invalid_rows": [row.as_json() for row in self.invalid[:REPORT_LIMIT]],
            "conflicts": [item.as_json() for item in self.conflicts[:REPORT_LIMIT]],
            "failures": [item.as_json() for item in self.failures[:REPORT_LIMIT]],
        }

    def lines(self) -> list[str]:
        out = [f"{where(row.at)}: {row.error}" for row in self.invalid[:REPORT_LIMIT]]
        out += _more(self.invalid)
        for items, what in ((self.conflicts, "conflicting"), (self.failures, "write failed")):
            out += [f"{where(i.at)}: {i.key}: {what}: {i.reason}" for i in items[:REPORT_LIMIT]]
            out += _more(items)
        counts = ", ".join(f"{self.counts[name]} {name}" for name in COUNTS)
        out.append(f"{self.rows} row{'' if self.rows == 1 else 's'}: {counts}")
        if self.counts[INVALID]:
            out.append("nothing written: fix the invalid rows and run it again")
        elif self.dry_run:
            out.append("dry run: nothing written")
        elif self.counts[CONFLICTING] and not self.counts[OVERWRITTEN]:
            out.append("conflicting records were kept (--overwrite replaces them)")
        if self.counts[FAILED]:
            out.append("some writes failed: run it again (what was written is now unchanged)")
        return out


def _more(problems: Collection[object]) -> list[str]:
    extra = len(problems) - REPORT_LIMIT
    return [f"... and {extra} more"] if extra > 0 else []


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
async def bucket_entries(nc: Client, bucket: str) -> list[tuple[str, bytes]]:
    """Every live (key, value) of the bucket, sorted by key. Empty when it does not exist."""
    found = await scan(nc, bucket)
    return sorted((key, value) for key, (value, _) in found.items())


def export_line(key: str, value: bytes) -> tuple[bytes | None, str | None]:
    """The JSON line for a record, and why it will not import as it is (None: it will). A value
    that is not a JSON object has no line."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None, "the stored value is not JSON; not exported"
    if not isinstance(doc, dict):
        return None, "the stored value is not a JSON object; not exported"
    doc.pop("key", None)
    line = orjson.dumps({"key": key, **doc}) + b"\n"
    try:
        parse_record(value)
    except RecordError as exc:
        return line, f"exported, but import will refuse it: {exc}"
    return line, None
