"""`callout users import / import-sqlite / export` against a real nats-server.

What an operator relies on when moving the old allowlist over: every row is checked before
anything is written (bad rows reported by line or rowid, nothing written); a dry run writes
nothing, not even the bucket; a second run changes nothing; an existing different record is
kept unless --overwrite; a record edited between planning and writing is never clobbered; and
an export imports back as all unchanged."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client as NATSClient

from callout import migrate
from callout.records import parse_record
from callout.store import kv as kvstore
from tests.support.nats import Keys, NatsServer, ServerFactory, nats_connect, new_user
from tests.support.service import live_keys, record, run_cli, seed_files, users_bucket

CLI_TIMEOUT = 60.0
COMPLETE = {"name", "admin", "revoked", "account", "permissions"}


@dataclass
class Env:
    server: NatsServer
    files: dict[str, Path]
    nc: NATSClient
    tmp: Path

    def cmd(self, *args: str) -> list[str]:
        return [
            "users", "--nats-url", self.server.url, "--nkey-seed-file", str(self.files["service"]),
            *args,
        ]  # fmt: skip

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = await asyncio.to_thread(run_cli, *self.cmd(*args), timeout=CLI_TIMEOUT)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    async def state(self, bucket: str = "users") -> tuple[int, int] | None:
        """(messages, last sequence) of the bucket's stream; None when it does not exist."""
        try:
            info = await self.nc.jetstream().stream_info(f"KV_{bucket}")
        except nats.js.errors.NotFoundError:
            return None
        return info.state.messages, info.state.last_seq

    async def docs(self, bucket: str = "users") -> dict[str, dict[str, Any]]:
        """Every live record, read with plain nats-py (independent of callout's code)."""
        kv = await self.nc.jetstream().key_value(bucket)
        keys = await live_keys(self.nc, bucket)
        return {key: orjson.loads((await kv.get(key)).value or b"") for key in keys}


@pytest.fixture
async def env(nats_server: ServerFactory, keys: Keys, tmp_path: Path) -> AsyncIterator[Env]:
    server = nats_server()
    nc = await nats_connect(server.url, keys.service_seed)
    try:
        yield Env(server, seed_files(keys, tmp_path / "keys"), nc, tmp_path)
    finally:
        await nc.close()


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    doc: dict[str, Any] = json.loads(lines[0])
    return doc


def counts(doc: dict[str, Any]) -> dict[str, int]:
    return {name: doc[name] for name in migrate.COUNTS if doc[name]}


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in docs))
    return path


def perms(pub: list[str] | None = None, sub: list[str] | None = None) -> dict[str, Any]:
    return {"pub": {"allow": pub or [], "deny": []}, "sub": {"allow": sub or [], "deny": []}}


def sqlite_db(path: Path, rows: list[tuple[Any, ...]]) -> Path:
    """The old control plane's table, with its own column names."""
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE allowlist (id INTEGER PRIMARY KEY, nkey TEXT, display_name TEXT,"
        " is_admin INTEGER, disabled INTEGER, perms TEXT, created_at TEXT)"
    )
    db.executemany("INSERT INTO allowlist VALUES (?, ?, ?, ?, ?, ?, '2020-01-01')", rows)
    db.commit()
    db.close()
    return path


SQLITE_FLAGS = (
    "--table", "allowlist", "--key-column", "nkey", "--name-column", "display_name",
    "--admin-column", "is_admin", "--revoked-column", "disabled", "--permissions-column", "perms",
)  # fmt: skip


def sqlite_rows(pubs: list[str]) -> list[tuple[Any, ...]]:
    return [
        (
            i,
            pub.lower() if i % 2 else pub,
            f"user-{i}",
            int(i % 50 == 0),
            int(i % 7 == 0),
            orjson.dumps({"sub": {"allow": [f"svc{i}.>", "_INBOX.>"]}}).decode() if i % 3 else None,
        )
        for i, pub in enumerate(pubs, 1)
    ]


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
async def test_import_jsonl_writes_complete_records_and_a_second_run_is_all_unchanged(
    env: Env,
) -> None:
    a, b, c = (new_user()[1] for _ in range(3))
    path = write_jsonl(
        env.tmp / "users.jsonl",
        [
            {"key": a.lower(), "name": "alice", "permissions": {"pub": {"allow": ["orders.>"]}}},
            {"key": b, "admin": True, "account": "APP", "meta": {"owner": "crm"}},
            {"key": c, "revoked": True},
        ],
    )
    first = await env.cli("import", str(path))
    assert first.returncode == 0, first.stderr
    doc = summary(first)
    assert counts(doc) == {"added": 3} and doc["written"] == 3 and doc["rows"] == 3
    assert "3 rows: 3 added, 0 overwritten, 0 unchanged" in first.stderr
    stored = await env.docs()
    assert set(stored) == {a, b, c}  # upper-case keys
    assert stored[a] == {
        "name": "alice", "admin": False, "revoked": False, "account": None,
        "permissions": perms(pub=["orders.>"]),
    }  # fmt: skip
    assert stored[b]["admin"] is True and stored[b]["meta"] == {"owner": "crm"}
    assert stored[c]["revoked"] is True and COMPLETE <= set(stored[c])

    before = await env.state()
    second = await env.cli("import", str(path))
    assert second.returncode == 0, second.stderr
    assert counts(summary(second)) == {"unchanged": 3} and summary(second)["written"] == 0
    assert await env.state() == before


async def test_import_csv(env: Env) -> None:
    a, b = (new_user()[1] for _ in range(2))
    path = env.tmp / "old.csv"
    path.write_text(
        "key,name,admin,revoked,pub_allow,sub_allow\n"
        f"{a.lower()},alice,no,no,orders.> billing.*,_INBOX.>\n"
        f'{b},"Bob, the admin",yes,,,\n'
    )
    result = await env.cli("import", str(path))  # CSV from the extension
    assert result.returncode == 0, result.stderr
    assert counts(summary(result)) == {"added": 2}
    stored = await env.docs()
    assert stored[a]["permissions"] == perms(pub=["orders.>", "billing.*"], sub=["_INBOX.>"])
    assert stored[b]["name"] == "Bob, the admin" and stored[b]["admin"] is True
    # The same rows as JSON lines are the same records.
    same = write_jsonl(
        env.tmp / "same.txt",
        [
            {"key": a, "name": "alice", "permissions": stored[a]["permissions"]},
            {"key": b, "name": "Bob, the admin", "admin": True},
        ],
    )
    again = await env.cli("import", "--format", "jsonl", str(same))
    assert counts(summary(again)) == {"unchanged": 2}, again.stderr


# ---------------------------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------------------------
async def test_import_sqlite_2000_rows_then_again_unchanged(env: Env) -> None:
    pubs = [new_user()[1] for _ in range(2000)]
    path = sqlite_db(env.tmp / "old.db", sqlite_rows(pubs))
    result = await env.cli("import-sqlite", str(path), *SQLITE_FLAGS)
    assert result.returncode == 0, result.stderr
    assert counts(summary(result)) == {"added": 2000}
    # The column mapping is shown, so a surprising one is noticed.
    assert "key <- 'nkey', name <- 'display_name'" in result.stderr
    assert "not read: account" in result.stderr
    state = await env.state()
    assert state == (2000, 2000)
    kv = await users_bucket(env.nc)
    for i in (1, 7, 50, 1999, 2000):
        got = parse_record((await kv.get(pubs[i - 1])).value or b"")
        assert got.name == f"user-{i}"
        assert got.admin is (i % 50 == 0) and got.revoked is (i % 7 == 0)
        want = (f"svc{i}.>", "_INBOX.>") if i % 3 else ()
        assert got.permissions.sub.allow == want

    again = await env.cli("import-sqlite", str(path), *SQLITE_FLAGS)
    assert again.returncode == 0, again.stderr
    assert counts(summary(again)) == {"unchanged": 2000}
    assert await env.state() == state


async def test_import_sqlite_with_bad_rows_writes_nothing_and_names_each_row(env: Env) -> None:
    pubs = [new_user()[1] for _ in range(2000)]
    rows = sqlite_rows(pubs)
    rows[99] = (100, "UNOTAKEY", "bad key", 0, 0, None)
    rows[499] = (500, pubs[499], "bad subject", 0, 0, '{"pub": {"allow": ["orders..x"]}}')
    rows[999] = (1000, pubs[999], "bad admin", 7, 0, None)
    rows[1999] = (2000, pubs[0].lower(), "duplicate of rowid 1", 0, 0, None)
    path = sqlite_db(env.tmp / "bad.db", rows)
    kv = await users_bucket(env.nc)
    await kv.put(pubs[5], record("already here"))
    before = await env.state()

    result = await env.cli("import-sqlite", str(path), *SQLITE_FLAGS)
    assert result.returncode == 1
    doc = summary(result)
    assert counts(doc) == {"invalid": 4} and doc["written"] == 0 and doc["rows"] == 2000
    reported = {row["rowid"]: row["error"] for row in doc["invalid_rows"]}
    assert set(reported) == {100, 500, 1000, 2000}
    assert "invalid user public key 'UNOTAKEY'" in reported[100]
    assert "permissions.pub.allow[0]" in reported[500]
    assert "admin must be" in reported[1000]
    assert reported[2000] == "duplicate key (first at rowid 1)"
    for rowid in reported:
        assert f"callout: rowid {rowid}: " in result.stderr
    assert "nothing written" in result.stderr
    assert await env.state() == before


async def test_dry_run_writes_nothing_not_even_the_bucket(env: Env) -> None:
    a, b = (new_user()[1] for _ in range(2))
    path = write_jsonl(env.tmp / "u.jsonl", [{"key": a, "name": "a"}, {"key": b, "name": "b"}])
    result = await env.cli("import", "--dry-run", str(path))
    assert result.returncode == 0, result.stderr
    doc = summary(result)
    assert counts(doc) == {"added": 2} and doc["dry_run"] is True and doc["written"] == 0
    assert await env.state() is None  # no bucket created

    kv = await users_bucket(env.nc)
    await kv.put(a, record("someone else"))
    before = await env.state()
    conflict = await env.cli("import", "--dry-run", str(path))
    assert conflict.returncode == 1  # it would conflict
    assert counts(summary(conflict)) == {"added": 1, "conflicting": 1}
    overwrite = await env.cli("import", "--dry-run", "--overwrite", str(path))
    assert overwrite.returncode == 0, overwrite.stderr
    assert counts(summary(overwrite)) == {"added": 1, "overwritten": 1}
    assert await env.state() == before
    assert (await env.docs())[a]["name"] == "someone else"


async def test_a_different_record_is_kept_unless_overwrite(env: Env) -> None:
    a, b, c = (new_user()[1] for _ in range(3))
    kv = await users_bucket(env.nc)
    # a differs (and carries data of the control plane's own); b is the same record.
    await kv.put(a, orjson.dumps({"name": "old", "meta": {"owner": "crm"}}))
    await kv.put(b, record("bob"))
    path = write_jsonl(
        env.tmp / "u.jsonl",
        [{"key": a, "name": "new"}, {"key": b, "name": "bob"}, {"key": c, "name": "carol"}],
    )
    result = await env.cli("import", str(path))
    assert result.returncode == 1
    doc = summary(result)
    assert counts(doc) == {"added": 1, "unchanged": 1, "conflicting": 1}
    assert doc["conflicts"] == [{"key": a, "line": 1, "reason": "a different record exists"}]
    assert f"line 1: {a}: conflicting" in result.stderr and "--overwrite" in result.stderr
    assert (await kv.get(a)).value == orjson.dumps({"name": "old", "meta": {"owner": "crm"}})
    assert set(await env.docs()) == {a, b, c}

    replaced = await env.cli("import", "--overwrite", str(path))
    assert replaced.returncode == 0, replaced.stderr
    assert counts(summary(replaced)) == {"overwritten": 1, "unchanged": 2}
    stored = (await env.docs())[a]
    # The input's record, with the field the input does not mention kept.
    assert stored["name"] == "new" and stored["meta"] == {"owner": "crm"}
    assert COMPLETE <= set(stored)

    again = await env.cli("import", str(path))
    assert again.returncode == 0, again.stderr
    assert counts(summary(again)) == {"unchanged": 3}


# Planning reads the bucket in one pass (scan) or key by key (a small import into a large
# bucket); both must see revisions and deletes alike.
@pytest.mark.parametrize("scan_ratio", [1000.0, 0.0], ids=["scan", "lookups"])
async def test_an_edit_between_plan_and_write_is_a_conflict_and_is_kept(
    env: Env, scan_ratio: float
) -> None:
    a, b, c, d, e = (new_user()[1] for _ in range(5))
    kv = await users_bucket(env.nc)
    await kv.put(b, record("b-old"))
    await kv.put(d, record("d-old"))
    await kv.put(e, record("e-deleted"))
    await kv.delete(e)
    collected = migrate.collect(
        migrate.read_jsonl(
            iter([orjson.dumps({"key": k, "name": f"{k[:4]}-import"}) for k in (a, b, c, d, e)])
        )
    )
    bucket = await kvstore.open_bucket(env.nc, "users", create=True, replicas=None)
    assert bucket is not None
    items = collected.items
    await migrate.plan(bucket, items, overwrite=True, scan_ratio=scan_ratio)
    planned = {k: items[k].action for k in items}
    assert planned == {a: "added", b: "overwritten", c: "added", d: "overwritten", e: "added"}

    # Someone else writes b and creates c after the plan and before the writes.
    theirs = record("concurrent edit")
    await kv.put(b, theirs)
    await kv.create(c, theirs)
    await migrate.apply(bucket, items.values())

    assert {k: items[k].action for k in items} == {
        a: "added", b: "conflicting", c: "conflicting", d: "overwritten", e: "added",
    }  # fmt: skip
    assert items[b].reason == items[c].reason == "changed while importing; left as it is"
    assert (await kv.get(b)).value == theirs and (await kv.get(c)).value == theirs
    for key in (a, d, e):
        assert parse_record((await kv.get(key)).value or b"").name == f"{key[:4]}-import"
    report = migrate.Report.of(collected, dry_run=False, planned=True)
    assert not report.ok and report.written == 3
    assert report.counts == {
        "added": 2, "overwritten": 1, "unchanged": 0, "conflicting": 2, "invalid": 0, "failed": 0,
    }  # fmt: skip


class FlakyBucket:
    """The real bucket, except that writes of the keys in `broken` time out."""

    def __init__(self, inner: kvstore.KVBucket, broken: set[str]) -> None:
        self.inner = inner
        self.broken = broken
        self.creates = 0

    async def get_entry(self, key: str) -> tuple[bytes, int] | None:
        return await self.inner.get_entry(key)

    async def size(self) -> int:
        return await self.inner.size()

    async def scan(self, keep: Any) -> dict[str, tuple[bytes, int]]:
        return await self.inner.scan(keep)

    async def create(self, key: str, value: bytes) -> bool:
        self.creates += 1
        if key in self.broken:
            raise nats.errors.TimeoutError
        return await self.inner.create(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> bool:
        return await self.inner.update(key, value, revision)


async def test_a_failed_write_fails_only_its_row_and_a_rerun_finishes(env: Env) -> None:
    pubs = [new_user()[1] for _ in range(200)]
    rows = [orjson.dumps({"key": k, "name": f"n{i}"}) for i, k in enumerate(pubs)]
    real = await kvstore.open_bucket(env.nc, "users", create=True, replicas=None)
    assert real is not None
    flaky = FlakyBucket(real, {pubs[3], pubs[150]})
    collected = migrate.collect(migrate.read_jsonl(iter(rows)))
    await migrate.plan(flaky, collected.items, overwrite=False)
    await migrate.apply(flaky, collected.items.values())
    report = migrate.Report.of(collected, dry_run=False, planned=True)
    assert (report.counts["added"], report.counts["failed"], report.ok) == (198, 2, False)
    assert {item.key for item in report.failures} == {pubs[3], pubs[150]}
    assert any("run it again" in line for line in report.lines())
    assert set(await env.docs()) == set(pubs) - {pubs[3], pubs[150]}

    rerun = migrate.collect(migrate.read_jsonl(iter(rows)))
    await migrate.plan(real, rerun.items, overwrite=False)
    await migrate.apply(real, rerun.items.values())
    again = migrate.Report.of(rerun, dry_run=False, planned=True)
    assert (again.counts["added"], again.counts["unchanged"], again.ok) == (2, 198, True)
    assert set(await env.docs()) == set(pubs)


async def test_once_jetstream_is_gone_the_rest_fail_without_waiting_each(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each write waits out "no responders" for 10 s; tried one after another, 200 rows would
    # take 200 / 4 x 10 s to fail. Only the writes already in flight wait.
    monkeypatch.setattr(kvstore, "_NO_RESPONDERS_WAIT", 0)
    pubs = [new_user()[1] for _ in range(200)]
    rows = [orjson.dumps({"key": k, "name": f"n{i}"}) for i, k in enumerate(pubs)]
    real = await kvstore.open_bucket(env.nc, "users", create=True, replicas=None)
    assert real is not None
    counting = FlakyBucket(real, set())
    collected = migrate.collect(migrate.read_jsonl(iter(rows)))
    await migrate.plan(counting, collected.items, overwrite=False)
    await env.nc.jetstream().delete_stream("KV_users")  # JetStream loses the bucket
    await migrate.apply(counting, collected.items.values(), limit=4)
    report = migrate.Report.of(collected, dry_run=False, planned=True)
    assert (report.counts["added"], report.counts["failed"]) == (0, 200)
    assert counting.creates == 4
    reasons = [item.reason for item in report.failures]
    assert (
        reasons.count("no stream answered the write (JetStream is down or electing a leader)") == 4
    )
    assert (
        reasons.count(
            "not tried: no stream answered the write (JetStream is down or electing a leader)"
        )
        == 196
    )


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
async def test_export_round_trips_through_import(env: Env) -> None:
    a, b, c, gone = (new_user()[1] for _ in range(4))
    assert (await env.cli("add", a, "--name", "alice", "--sub-allow", "_INBOX.>")).returncode == 0
    assert (await env.cli("add", b, "--name", "bob")).returncode == 0
    assert (await env.cli("revoke", b)).returncode == 0
    kv = await users_bucket(env.nc)
    await kv.put(c, orjson.dumps({"name": "carol", "meta": {"owner": "crm"}}))  # defaults left out
    await kv.put(gone, record("deleted"))
    await kv.delete(gone)

    exported = await env.cli("export")
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["key"] for line in lines] == sorted([a, b, c])
    by_key = {line.pop("key"): line for line in lines}
    assert by_key[c] == {"name": "carol", "meta": {"owner": "crm"}}  # as stored
    assert by_key[b]["revoked"] is True
    dump = env.tmp / "export.jsonl"
    dump.write_text(exported.stdout)

    before = await env.state()
    back = await env.cli("import", str(dump))
    assert back.returncode == 0, back.stderr
    assert counts(summary(back)) == {"unchanged": 3}
    assert await env.state() == before

    copy = await env.cli("--users-bucket", "copy", "import", str(dump))
    assert counts(summary(copy)) == {"added": 3}, copy.stderr
    copied = await env.cli("--users-bucket", "copy", "export")
    assert copied.returncode == 0, copied.stderr
    # The copy holds the same records (stored complete), and imports back unchanged.
    copied_lines = [json.loads(line) for line in copied.stdout.splitlines()]
    assert [line["key"] for line in copied_lines] == sorted([a, b, c])
    for line in copied_lines:
        key = line.pop("key")
        assert parse_record(orjson.dumps(line)) == parse_record(orjson.dumps(by_key[key]))
    (env.tmp / "copy.jsonl").write_text(copied.stdout)
    assert counts(summary(await env.cli("import", str(env.tmp / "copy.jsonl")))) == {"unchanged": 3}


async def test_export_says_which_records_will_not_import(env: Env) -> None:
    a, b, c = sorted(new_user()[1] for _ in range(3))
    kv = await users_bucket(env.nc)
    await kv.put(a, b"not json")
    await kv.put(b, orjson.dumps({"name": "bad", "admin": "yes"}))
    await kv.put(c, record("good"))
    result = await env.cli("export")
    assert result.returncode == 1
    assert [json.loads(line)["key"] for line in result.stdout.splitlines()] == [b, c]
    assert f"{a}: the stored value is not JSON; not exported" in result.stderr
    assert f"{b}: exported, but import will refuse it: admin must be bool" in result.stderr


async def test_export_of_a_missing_bucket_fails_and_creates_nothing(env: Env) -> None:
    result = await env.cli("--users-bucket", "nosuch", "export")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == "callout: error: bucket 'nosuch' does not exist"
    assert await env.state("nosuch") is None


# ---------------------------------------------------------------------------------------------
# mistakes found before connecting
# ---------------------------------------------------------------------------------------------
def offline(keys: Keys, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """NATS is unreachable: these must be decided from the input alone."""
    files = seed_files(keys, tmp_path / "keys")
    base = ["users", "--nats-url", "nats://127.0.0.1:1", "--nkey-seed-file", str(files["service"])]
    result = run_cli(*base, *args, timeout=CLI_TIMEOUT)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_invalid_rows_are_reported_without_connecting(keys: Keys, tmp_path: Path) -> None:
    a = new_user()[1]
    path = tmp_path / "excel.csv"
    # A byte-order mark, as spreadsheets write: the header is still read as "key".
    path.write_bytes("\ufeffkey,name\n".encode() + f"{a},ok\nUNOTAKEY,bad\n".encode())
    result = offline(keys, tmp_path, "import", str(path))
    assert result.returncode == 1
    doc = summary(result)
    assert counts(doc) == {"invalid": 1}
    assert doc["invalid_rows"] == [
        {"line": 3, "error": "invalid user public key 'UNOTAKEY': not a user public key"}
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("import", "/nonexistent/users.jsonl"), "cannot read /nonexistent/users.jsonl"),
        (("import-sqlite", "/nonexistent/old.db"), "no such file"),
        (("import-sqlite", "{db}", "--table", "people"), "no table 'people'"),
        (("import-sqlite", "{db}", "--key-column", "nkey"), "has no column 'nkey'"),
    ],
)
def test_input_mistakes_are_one_line_errors(
    keys: Keys, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    db = sqlite3.connect(tmp_path / "u.db")
    db.execute("CREATE TABLE users (key TEXT)")
    db.close()
    result = offline(keys, tmp_path, *(arg.format(db=tmp_path / "u.db") for arg in args))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
