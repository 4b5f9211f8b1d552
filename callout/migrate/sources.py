"""Where import rows come from: JSON lines (as `export` writes them), CSV with a header, or a
table of an SQLite database; and `collect`, which keeps one valid row per key."""

from __future__ import annotations

import csv
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from callout.migrate.rows import (
    FIELDS,
    LIST_COLUMNS,
    Invalid,
    Item,
    NotUtf8,
    Where,
    columns_record,
    read_row,
    record_value,
    where,
)
from callout.records import RecordError, loads

CSV_COLUMNS = ("key", *FIELDS, *LIST_COLUMNS)


class SourceError(Exception):
    """The input as a whole cannot be read (missing file, bad header, unknown table or
    column): nothing is imported. The message is one line for the user."""


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
        yield read_row(at, raw_key, record_value, doc)


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
        yield read_row(at, values.pop("key"), columns_record, values)


def _quote(identifier: str) -> str:
    """An SQL identifier, quoted. Only ever applied to names read back from the database's own
    schema, so a flag cannot smuggle SQL in: an unknown name is an error before any query."""
    return '"' + identifier.replace('"', '""') + '"'


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
                yield read_row(at, values.pop("key"), columns_record, values)
        except sqlite3.Error as exc:
            raise SourceError(f"reading table {self.table!r}: {exc}") from None
        finally:
            self.close()

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()


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
