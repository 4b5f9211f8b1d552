"""Reading the inputs, no server involved: every row becomes a record exactly as the service
will read it, or an invalid row named by its line or rowid; problems with the input as a whole
(unknown table or column, bad CSV header) stop everything; SQLite is only ever read."""

from __future__ import annotations

import hashlib
import io
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from callout import migrate
from callout.records import parse_record
from tests.support.nats import new_user


def pubs(n: int) -> list[str]:
    return [new_user()[1] for _ in range(n)]


def jsonl(*docs: Any) -> io.BytesIO:
    lines = [d if isinstance(d, str) else orjson.dumps(d).decode() for d in docs]
    return io.BytesIO(("\n".join(lines) + "\n").encode())


def problems(collected: migrate.Collected) -> dict[tuple[str, int], str]:
    return {row.at: row.error for row in collected.invalid}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------
def test_jsonl_rows_become_complete_records_under_upper_case_keys() -> None:
    a, b = pubs(2)
    got = migrate.collect(
        migrate.read_jsonl(
            jsonl(
                {"key": a.lower(), "name": "alice", "meta": {"owner": "cp"}},
                "",  # blank lines are skipped but still counted as lines
                {"key": f"  {b} ", "admin": True, "permissions": {"sub": {"allow": ["x.>"]}}},
            )
        )
    )
    assert got.invalid == [] and got.rows == 2
    assert list(got.items) == [a, b]
    assert got.items[a].at == ("line", 1) and got.items[b].at == ("line", 3)
    alice = orjson.loads(got.items[a].value)
    # Every record field explicit, meta kept after them, no "key" inside.
    assert alice == {
        "name": "alice",
        "admin": False,
        "revoked": False,
        "account": None,
        "permissions": {"pub": {"allow": [], "deny": []}, "sub": {"allow": [], "deny": []}},
        "meta": {"owner": "cp"},
    }
    assert list(alice)[-1] == "meta"
    assert parse_record(got.items[b].value).permissions.sub.allow == ("x.>",)
    assert parse_record(got.items[b].value).admin is True


def test_jsonl_invalid_rows_are_reported_by_line_and_duplicates_too() -> None:
    a, b, c, d, e = pubs(5)
    got = migrate.collect(
        migrate.read_jsonl(
            jsonl(
                {"key": a},
                "{not json",
                "[1, 2]",
                {"name": "no key"},
                {"key": "UNOTAKEY"},
                {"key": b, "permissions": {"pub": {"allow": ["a..b"]}}},
                {"key": c, "admin": "yes"},
                {"key": a.lower(), "name": "again"},
                {"key": d, "account": "has space"},
                {"key": b},  # b's first row was invalid: still a duplicate
                # `users list` output for a broken record: it must stay broken, not become a
                # record with every default (an unrestricted user).
                {"key": e, "invalid_record": "garbage"},
                {"key": new_user()[0]},  # a seed pasted where the key goes
                # Read exactly as the service reads a record: a misspelt restriction would
                # import as an unrestricted user, and a repeated key hides one of its values.
                {"key": new_user()[1], "permissions": {"publish": {"allow": ["a.>"]}}},
                {"key": new_user()[1], "Revoked": True},
                f'{{"key": "{new_user()[1]}", "revoked": true, "revoked": false}}',
            )
        )
    )
    assert list(got.items) == [a]
    found = problems(got)
    assert set(found) == {("line", n) for n in range(2, 16)}
    assert found[("line", 2)] == "the line is not JSON"
    assert "unknown field 'permissions.publish'" in found[("line", 13)]
    assert "unknown field 'Revoked'" in found[("line", 14)]
    assert "the key 'revoked' twice" in found[("line", 15)]
    assert found[("line", 3)] == "not a JSON object"
    assert found[("line", 4)] == "key is missing"
    assert "invalid user public key 'UNOTAKEY'" in found[("line", 5)]
    assert "permissions.pub.allow[0]" in found[("line", 6)]
    assert found[("line", 7)] == "admin must be bool"
    assert found[("line", 8)] == "duplicate key (first at line 1)"
    assert found[("line", 9)].startswith("account ")
    assert found[("line", 10)] == "duplicate key (first at line 6)"
    assert "not importable" in found[("line", 11)]
    # A seed is never echoed into the report.
    assert found[("line", 12)] == "that looks like a seed, not a public key (treat it as exposed)"
    # The key is named wherever it could be read.
    keyed = {row.at: row.key for row in got.invalid}
    assert keyed[("line", 6)] == b and keyed[("line", 8)] == a and keyed[("line", 5)] is None


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------
def test_csv_columns_in_any_order_with_space_separated_subjects() -> None:
    a, b, c = pubs(3)
    text = (
        "Name,KEY,admin,revoked,account,pub_allow,sub_allow\n"
        f'alice,{a.lower()},yes,0,APP,"orders.> billing.*",_INBOX.>\n'
        "\n"
        f'"bob, with a\nnewline in his name",{b},,true,,,\n'
        f"carol,{c},FALSE,no,,,\n"
    )
    got = migrate.collect(migrate.read_csv(io.StringIO(text)))
    # Bob's quoted name spans two lines; his row is named by the line it starts on.
    assert problems(got) == {("line", 4): "name must be printable and at most 256 characters"}
    alice = parse_record(got.items[a].value)
    assert (alice.name, alice.admin, alice.revoked, alice.account) == ("alice", True, False, "APP")
    assert alice.permissions.pub.allow == ("orders.>", "billing.*")
    assert alice.permissions.sub.allow == ("_INBOX.>",)
    carol = parse_record(got.items[c].value)
    assert (carol.admin, carol.revoked, carol.account) == (False, False, None)
    assert got.items[c].at == ("line", 6)


def test_csv_permissions_as_json_and_row_problems() -> None:
    a, b, c, d = pubs(4)
    text = (
        "key,permissions,admin\n"
        f'{a},"{{""pub"": {{""deny"": [""secret.>""]}}}}",1\n'
        f"{b},not json,0\n"
        f"{c},,maybe\n"
        f"{d},,1,extra\n"
    )
    got = migrate.collect(migrate.read_csv(io.StringIO(text)))
    assert parse_record(got.items[a].value).permissions.pub.deny == ("secret.>",)
    assert problems(got) == {
        ("line", 3): "permissions is not JSON",
        ("line", 4): "admin must be 0, 1, true, false, yes or no, not 'maybe'",
        ("line", 5): "4 fields, the header has 3",
    }


def test_csv_comma_separated_subjects_are_refused_not_taken_as_one_subject() -> None:
    (a,) = pubs(1)
    got = migrate.collect(migrate.read_csv(io.StringIO(f'key,pub_allow\n{a},"a.>,b.>"\n')))
    assert problems(got) == {("line", 2): "pub_allow: separate subjects with spaces, not commas"}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("", "empty"),
        ("key,name,admn\n", "unknown CSV column(s) 'admn'"),
        ("name,admin\n", "no 'key' column"),
        ("key,name,Name\n", "given twice: name"),
        ("key,permissions,pub_allow\n", "not both"),
    ],
)
def test_csv_header_problems_stop_the_whole_import(header: str, message: str) -> None:
    with pytest.raises(migrate.SourceError) as info:
        migrate.collect(migrate.read_csv(io.StringIO(header)))
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------------------------
def make_db(path: Path, schema: str, rows: list[tuple[Any, ...]], table: str = "users") -> Path:
    db = sqlite3.connect(path)
    db.execute(schema)
    if rows:
        marks = ", ".join("?" * len(rows[0]))
        db.executemany(f'INSERT INTO "{table}" VALUES ({marks})', rows)
    db.commit()
    db.close()
    return path


def test_sqlite_default_columns_types_and_rowids(tmp_path: Path) -> None:
    a, b, c, d, e = pubs(5)
    path = make_db(
        tmp_path / "u.db",
        # key has no type, so SQLite keeps the integer in rowid 15 an integer.
        "CREATE TABLE users (id INTEGER PRIMARY KEY, key, name TEXT, admin, revoked,"
        " account TEXT, permissions TEXT, created TEXT)",
        [
            (10, a.lower(), "alice", 1, 0, "APP", '{"pub": {"allow": ["a.>"]}}', "2020"),
            (11, b, None, None, "true", None, None, "2021"),
            (12, c, "carol", 2, 0, None, None, ""),
            (13, d, "dave", 1.0, 0, None, None, ""),
            (14, e, b"bytes", 0, 0, None, None, ""),
            (15, 12345, "number", 0, 0, None, None, ""),
            (16, a, "dup", 0, 0, None, None, ""),
        ],
    )
    source = migrate.SqliteSource(str(path), "USERS", {})
    # Columns named like the fields are read; others (id, created) are not.
    assert source.table == "users"
    assert source.mapping == {
        "key": "key",
        "name": "name",
        "admin": "admin",
        "revoked": "revoked",
        "account": "account",
        "permissions": "permissions",
    }
    got = migrate.collect(source)
    alice, bob = parse_record(got.items[a].value), parse_record(got.items[b].value)
    assert (alice.name, alice.admin, alice.account) == ("alice", True, "APP")
    assert alice.permissions.pub.allow == ("a.>",)
    assert (bob.name, bob.admin, bob.revoked, bob.account) == ("", False, True, None)
    assert problems(got) == {
        ("rowid", 12): "admin must be 0, 1, true, false, yes or no, not 2",
        ("rowid", 13): "admin must be 0, 1, true, false, yes or no, not 1.0",
        ("rowid", 14): "name must be text, not bytes",
        ("rowid", 15): "key must be text, not int",
        ("rowid", 16): "duplicate key (first at rowid 10)",
    }


def test_sqlite_permissions_are_read_as_strictly_as_the_service_reads_them(
    tmp_path: Path,
) -> None:
    a, b, c = pubs(3)
    path = make_db(
        tmp_path / "u.db",
        "CREATE TABLE users (key TEXT, permissions TEXT)",
        [
            (a, '{"publish": {"allow": ["orders.>"]}}'),  # nats-server's spelling
            (b, '{"pub": {"Allow": ["orders.>"]}}'),
            (c, '{"pub": {"allow": ["orders.>"]}, "pub": {}}'),
        ],
    )
    got = migrate.collect(migrate.SqliteSource(str(path), "users", {}))
    # Each was stored before as an unrestricted user, with no warning.
    assert got.items == {}
    assert "unknown field 'permissions.publish'" in problems(got)[("rowid", 1)]
    assert "unknown field 'permissions.pub.Allow'" in problems(got)[("rowid", 2)]
    assert "the key 'pub' twice" in problems(got)[("rowid", 3)]


def test_sqlite_flags_name_the_columns_and_identifiers_are_quoted(tmp_path: Path) -> None:
    a, b = pubs(2)
    path = make_db(
        tmp_path / "odd.db",
        'CREATE TABLE "allow list" ("the ""key""" TEXT, "select" TEXT, "is admin" INTEGER)',
        [(a, "alice", 1), (b, "bob", 0)],
        table="allow list",
    )
    columns: dict[str, str | None] = {"key": 'the "key"', "name": "select", "admin": "is admin"}
    got = migrate.collect(migrate.SqliteSource(str(path), "allow list", columns))
    assert got.invalid == []
    assert parse_record(got.items[a].value).admin is True
    assert parse_record(got.items[b].value).name == "bob"


@pytest.mark.parametrize(
    ("table", "columns", "message"),
    [
        ('users"; DROP TABLE users; --', {}, "no table"),
        ("users", {"key": 'key" FROM users; DROP TABLE users; --'}, "has no column"),
        ("users", {"admin": "is_admin"}, "has no column 'is_admin' (--admin-column)"),
        ("sqlite_master", {}, "no table 'sqlite_master'"),
    ],
)
def test_sqlite_unknown_names_are_errors_before_any_query_and_the_file_is_untouched(
    tmp_path: Path, table: str, columns: dict[str, str | None], message: str
) -> None:
    (a,) = pubs(1)
    path = make_db(tmp_path / "u.db", "CREATE TABLE users (key TEXT)", [(a,)])
    before = digest(path)
    with pytest.raises(migrate.SourceError) as info:
        migrate.collect(migrate.SqliteSource(str(path), table, columns))
    assert message in str(info.value)
    assert digest(path) == before
    assert sqlite3.connect(path).execute("SELECT count(*) FROM users").fetchone() == (1,)


def test_sqlite_is_opened_read_only(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(migrate.SourceError, match="no such file"):
        migrate.SqliteSource(str(missing), "users", {})
    assert not missing.exists()
    (a,) = pubs(1)
    path = make_db(tmp_path / "u.db", "CREATE TABLE users (key TEXT)", [(a,)])
    source = migrate.SqliteSource(str(path), "users", {})
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        source._db.execute("DELETE FROM users")
    source.close()
    garbage = tmp_path / "not.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(migrate.SourceError, match="not a database"):
        migrate.SqliteSource(str(garbage), "users", {})


def test_sqlite_views_and_without_rowid_tables_number_their_rows(tmp_path: Path) -> None:
    a, b = pubs(2)
    path = make_db(
        tmp_path / "u.db",
        "CREATE TABLE people (key TEXT PRIMARY KEY, name TEXT) WITHOUT ROWID",
        [(a, "alice"), (b, "b\x00ob")],
        table="people",
    )
    got = migrate.collect(migrate.SqliteSource(str(path), "people", {}))
    assert got.rows == 2
    labels = [item.at[0] for item in got.items.values()] + [row.at[0] for row in got.invalid]
    assert labels == ["row", "row"]
    db = sqlite3.connect(path)
    db.execute("CREATE VIEW users AS SELECT key, upper(name) AS name FROM people")
    db.commit()
    db.close()
    view = migrate.collect(migrate.SqliteSource(str(path), "users", {}))
    assert sorted(parse_record(i.value).name for i in view.items.values()) == ["ALICE"]
    # A view answers NULL for rowid: its rows are numbered too.
    rows: list[migrate.Item | migrate.Invalid] = [*view.items.values(), *view.invalid]
    assert sorted(row.at for row in rows) == [
        ("row", 1),
        ("row", 2),
    ]


def test_sqlite_text_that_is_not_utf8_is_an_invalid_row_not_a_crash(tmp_path: Path) -> None:
    a, b = pubs(2)
    path = make_db(tmp_path / "u.db", "CREATE TABLE users (key TEXT, name TEXT)", [(a, "ok")])
    db = sqlite3.connect(path)
    db.execute("INSERT INTO users VALUES (?, CAST(? AS TEXT))", (b, b"caf\xe9"))
    db.commit()
    db.close()
    got = migrate.collect(migrate.SqliteSource(str(path), "users", {}))
    assert list(got.items) == [a]
    assert problems(got) == {("rowid", 2): "name must be text, not text that is not UTF-8"}
