"""`callout.recording.writer` (what `serve --record-dir` writes) and the replay reading it back,
without a server: the requests are the ones recorded from nats-server 2.15.1 in
tests/replay/cases (decoded here by test_replay's independent decoder) or forged like the
server's (tests/support/forge.py), and the service is the shell driven by a fake connection
(tests/unit/test_service_shell.py). The session against a real server is in
test_record_replay.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import stat
import threading
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from callout.commands.replay import format_outcome
from callout.decision import Decision
from callout.keys import CurveKey
from callout.recording import reader, replay
from callout.recording import writer as recording
from callout.recording.writer import RecordDirError, Recorder, record_document
from callout.store import StoreError
from callout.store.memory import MemoryStore
from tests.support.forge import ClientKey
from tests.support.nats import Keys, new_user
from tests.support.replay import (
    XKEYS,
    Case,
    assert_absent,
    base64_forms,
    case_named,
    policy,
    server_box,
)
from tests.support.service import record, run_cli, seed_files
from tests.support.shell import NOW, GatedStore, make_env

NAME = re.compile(r"requests-\d{8}T\d{6}\.\d{6}Z-p\d+-\d{6}\.jsonl")


def recorded(case: Case, *, xkeys: tuple[CurveKey, ...] | None = None) -> dict[str, Any]:
    """The line `serve --record-dir` writes for this case, decided as the service would."""
    replayer = replay.Replayer(policy(encrypted=case.encrypted), case.store)
    outcome = replayer.run(case.entry)
    assert outcome.decision is not None
    keys = (XKEYS if case.encrypted else ()) if xkeys is None else xkeys
    line = orjson.dumps(
        record_document(case.payload, case.headers, case.received_at, outcome.decision, keys)
    )
    doc: dict[str, Any] = orjson.loads(line)
    doc["_line"] = line
    return doc


def lines_in(directory: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted(directory.iterdir())
        for line in path.read_bytes().splitlines()
    ]


# ---------------------------------------------------------------------------------------------
# what a line holds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain_known_natspy", "encrypted_known_rawurl"])
def test_a_line_holds_the_bytes_as_received_the_decoded_request_and_the_decision(
    name: str,
) -> None:
    case = case_named(name)
    doc = recorded(case)
    assert doc["raw"] == "kept"
    # The request as the server signed it (the box opened), byte for byte.
    token = case.payload
    if case.encrypted:
        assert case.headers is not None
        token = server_box(case.headers).decrypt(token[28:], token[4:28])
        assert doc["opened_with"] == XKEYS[0].public
    else:
        assert "opened_with" not in doc
    assert base64.b64decode(doc["token_b64"]) == token
    assert doc["headers"] == case.headers
    assert doc["encrypted"] is case.encrypted
    assert doc["received_at"] == case.received_at
    assert doc["request"] == case.request  # decrypted, as the independent decoder reads it
    client = case.request["nats"]["connect_opts"]["nkey"]
    assert doc["client"] == client
    record = case.users[client]
    assert record is not None
    assert doc["decision"] == {
        "outcome": "admit",
        "reason": "admit",
        "admit": True,
        "account": "APP",
        "detail": "",
        "name": record["name"],
        # As in the user JWT: empty lists are left out (no restriction from us).
        "permissions": {
            direction: {kind: subjects for kind, subjects in rules.items() if subjects}
            for direction, rules in record["permissions"].items()
            if any(rules.values())
        },
    }


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("plain_user_password", "pass"),
        ("encrypted_user_password", "pass"),
        ("plain_token", "auth_token"),
        ("encrypted_token", "auth_token"),
    ],
)
def test_credentials_never_reach_the_recording(name: str, field: str) -> None:
    case = case_named(name)
    options = case.request["nats"]["connect_opts"]
    secret = options[field]
    assert isinstance(secret, str) and len(secret) >= 6  # the case does carry one
    doc = recorded(case)
    assert doc["raw"] == "redacted" and doc["redaction"] == "credential"
    assert "token_b64" not in doc  # the payload holds the secret, sealed or not
    assert doc["request"]["nats"]["connect_opts"][field] == "[REDACTED]"
    # Everything else of the request is there to read.
    assert {k: v for k, v in doc["request"]["nats"]["connect_opts"].items() if k != field} == {
        k: v for k, v in options.items() if k != field
    }
    assert doc["decision"]["reason"] == "no_nkey"
    assert_absent(secret, doc["_line"])
    # The check can fail: the request's own JWT holds the secret in base64 form.
    token = case.payload
    if case.encrypted:
        assert case.headers is not None
        token = server_box(case.headers).decrypt(token[28:], token[4:28])
    assert any(form in token for form in base64_forms(secret.encode()))


def test_a_request_that_cannot_be_opened_is_not_written() -> None:
    # Recorded by a service without the xkey: nothing shows the box holds no secret.
    doc = recorded(case_named("encrypted_user_password"), xkeys=())
    assert (doc["raw"], doc["redaction"], doc["request"]) == ("redacted", "undecodable", None)
    assert "token_b64" not in doc
    garbage = record_document(b"not a request", None, NOW, Decision("request_malformed"), ())
    assert garbage["raw"] == "redacted" and "token_b64" not in garbage


def test_a_seed_sent_as_the_nkey_is_redacted() -> None:
    env = make_env()
    seed, _ = new_user()
    forged = env.forge(overrides={"nats": {"connect_opts": {"nkey": seed}}})
    opened = env.service.authorizer.open(forged.payload, forged.headers, NOW)
    assert isinstance(opened, Decision) and opened.reason == "bad_nkey"
    line = orjson.dumps(record_document(forged.payload, forged.headers, NOW, opened, ()))
    assert_absent(seed, line)
    doc = orjson.loads(line)
    assert doc["raw"] == "redacted" and doc["redaction"] == "credential"
    assert doc["request"]["nats"]["connect_opts"]["nkey"] == "[REDACTED]"


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
async def test_files_are_private_and_rotate_by_size(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    cases = [case_named(n) for n in ("plain_known_natspy", "plain_unknown", "plain_revoked")] * 5
    docs = [recorded(case) for case in cases]
    max_bytes = 2 * max(len(doc["_line"]) for doc in docs) + 10
    recorder = Recorder(directory, max_bytes=max_bytes)
    for case in cases:
        outcome = replay.Replayer(policy(encrypted=False), case.store).run(case.entry)
        assert outcome.decision is not None
        recorder.record(case.payload, case.headers, case.received_at, outcome.decision)
        await asyncio.sleep(0)
    await recorder.close()

    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(directory.iterdir())
    assert len(files) == recorder.files >= len(cases) // 2
    for path in files:
        assert NAME.fullmatch(path.name), path.name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert 0 < path.stat().st_size <= max_bytes
    # Names sort by time: reading them in name order gives the requests in recorded order.
    assert [doc["decision"]["reason"] for doc in lines_in(directory)] == [
        doc["decision"]["reason"] for doc in docs
    ]
    assert recorder.stats.recorded == len(cases) and recorder.stats.dropped_total == 0


async def test_a_line_larger_than_the_limit_gets_a_file_of_its_own(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec", max_bytes=100)
    case = case_named("plain_unknown")
    for _ in range(3):
        recorder.record(case.payload, case.headers, case.received_at, Decision("unknown_user"))
    await recorder.close()
    files = sorted((tmp_path / "rec").iterdir())
    assert len(files) == 3
    assert all(len(path.read_bytes().splitlines()) == 1 for path in files)


def test_a_directory_open_to_others_is_refused(tmp_path: Path, keys: Keys) -> None:
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    with pytest.raises(RecordDirError, match="chmod 700"):
        Recorder(directory)
    # `serve` says so in one line, before it even tries to connect (nothing listens there).
    files = seed_files(keys, tmp_path / "keys")
    result = run_cli(
        "serve", "--nats-url", "nats://127.0.0.1:1", "--nkey-seed-file", str(files["service"]),
        "--issuer-seed-file", str(files["issuer"]), "--account", "APP",
        "--record-dir", str(directory),
    )  # fmt: skip
    assert result.returncode == 2
    assert "chmod 700" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    directory.chmod(0o700)
    Recorder(directory)  # the same directory, once it is private


async def test_a_full_disk_drops_and_counts_and_recording_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder(tmp_path / "rec")
    real_open = recording._Files._open

    def open_dev_full(self: recording._Files) -> None:
        self.fd = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
        self.size = 0

    monkeypatch.setattr(recording._Files, "_open", open_dev_full)
    case = case_named("plain_unknown")
    for _ in range(5):
        recorder.record(case.payload, case.headers, case.received_at, Decision("unknown_user"))
    await recorder.flush()
    assert recorder.stats.dropped == {"write_error": 5}
    assert recorder.stats.recorded == 0

    monkeypatch.setattr(recording._Files, "_open", real_open)  # space again
    for _ in range(3):
        recorder.record(case.payload, case.headers, case.received_at, Decision("unknown_user"))
    await recorder.close()
    assert recorder.stats.recorded == 3 and recorder.stats.dropped == {"write_error": 5}
    assert len(lines_in(tmp_path / "rec")) == 3


async def test_a_stalled_disk_never_holds_the_loop_and_memory_stays_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = case_named("plain_unknown")
    line = orjson.dumps(
        record_document(case.payload, None, case.received_at, Decision("unknown_user"), ()),
        option=orjson.OPT_APPEND_NEWLINE,
    )
    recorder = Recorder(tmp_path / "rec", max_pending=10 * len(line) + 5)
    stalled, entered = threading.Event(), threading.Event()
    real_write = recording._Files.write

    def stalled_write(self: recording._Files, lines: list[bytes]) -> tuple[int, OSError | None]:
        entered.set()
        stalled.wait(30)
        return real_write(self, lines)

    monkeypatch.setattr(recording._Files, "write", stalled_write)
    recorder.record(case.payload, None, case.received_at, Decision("unknown_user"))
    await asyncio.wait_for(asyncio.to_thread(entered.wait, 10), 15)  # the writer is now stuck
    for _ in range(50):  # each returns at once; the loop keeps running between them
        recorder.record(case.payload, None, case.received_at, Decision("unknown_user"))
        await asyncio.sleep(0)
    assert recorder.stats.recorded == 0
    assert recorder.stats.dropped == {"backlog": 40}  # 10 lines fit in max_pending
    stalled.set()
    await recorder.close()
    assert recorder.stats.recorded == 11
    assert len(lines_in(tmp_path / "rec")) == 11


# ---------------------------------------------------------------------------------------------
# the service's hook, and replaying what it recorded
# ---------------------------------------------------------------------------------------------
class FailingStore(MemoryStore):
    def __init__(self, records: dict[str, bytes], broken: str) -> None:
        super().__init__(records=records)
        self.broken = broken

    def get_nowait(self, key: str) -> bytes | None:
        if key == self.broken:
            raise StoreError("JetStream said no")
        return super().get_nowait(key)


async def test_the_service_records_every_handled_request_after_its_reply(tmp_path: Path) -> None:
    env = make_env()
    alice = env.client
    stranger, broken = ClientKey.generate(), ClientKey.generate()
    users = {alice.public: record("alice", pub_allow=["a.>"])}
    env.service.store = FailingStore(users, broken.public)
    recorder = Recorder(tmp_path / "rec")
    calls: list[str] = []
    real_record = recorder.record

    def spy(*args: Any) -> None:
        calls.append("record")
        env.events.append("record")
        real_record(*args)

    recorder.record = spy  # type: ignore[method-assign]
    env.service.recorder = recorder
    admit = env.msg(env.forge())
    await env.handle(admit)
    assert env.events == ["publish", "record"]  # the reply goes first
    await env.handle(env.msg(env.forge(client=stranger)))  # unknown_user
    await env.handle(env.msg(env.forge(client=broken)))  # store_unavailable
    await env.handle(env.msg(env.forge(now=NOW - 60)))  # expired: dropped, still recorded
    await env.handle(env.msg(admit.data))  # the same request twice: replay, dropped too
    await recorder.close()

    docs = lines_in(tmp_path / "rec")
    assert [(d["decision"]["outcome"], d["decision"]["reason"]) for d in docs] == [
        ("admit", "admit"),
        ("deny", "unknown_user"),
        ("deny", "store_unavailable"),
        ("drop", "request_expired"),
        ("drop", "replay"),
    ]
    assert len(calls) == 5  # once per request

    # Replayed with the same users: the same decisions, the replay and the store failure too.
    entries = reader.read([tmp_path / "rec"])
    replayer = replay.Replayer(env.service.authorizer.policy, {alice.public: users[alice.public]})
    outcomes = list(replayer.run_all(entries))
    assert [o.changed for o in outcomes] == [False] * 5, [o.new for o in outcomes]
    # Without alice's record, exactly her admit changes (the replay of it stays a replay).
    replayer = replay.Replayer(env.service.authorizer.policy, {})
    summary = replay.Summary()
    for outcome in replayer.run_all(entries):
        summary.add(outcome)
    assert summary.changes == {"admit:admit@APP -> deny:unknown_user": 1}
    assert (summary.replayed, summary.unchanged) == (5, 4)
    # Users read for some keys only (a bucket): a lookup of another key is an error.
    policy_ = env.service.authorizer.policy
    partial = replay.Replayer(policy_, {stranger.public: None}, complete=False)
    with pytest.raises(reader.ReplayError, match=alice.public):
        list(partial.run_all(entries))
    # Admitted still, with other permissions: a change too, and said so.
    wider = {alice.public: record("alice", pub_allow=["a.>", "b.>"])}
    outcomes = list(replay.Replayer(env.service.authorizer.policy, wider).run_all(entries))
    assert [format_outcome(o).rsplit("  ", 1)[1] for o in outcomes] == [
        "CHANGED (permissions)", "same", "same", "same", "same",
    ]  # fmt: skip


async def test_a_shed_request_is_recorded_and_skipped_on_replay(tmp_path: Path) -> None:
    store = GatedStore([])
    env = make_env(store, max_inflight=1)
    env.service.max_backlog = 1
    store.records[env.client.public] = record("alice")
    env.service.recorder = Recorder(tmp_path / "rec")
    msgs = [env.msg(env.forge()) for _ in range(3)]
    await env.hold_then_drain(store, msgs, active=1)
    await env.service.recorder.close()
    docs = lines_in(tmp_path / "rec")
    assert sorted(d["decision"]["reason"] for d in docs) == ["admit", "admit", "overloaded"]
    outcomes = list(
        replay.Replayer(env.service.authorizer.policy, {env.client.public: record("alice")})
        .run_all(reader.read([tmp_path / "rec"]))
    )  # fmt: skip
    skipped = [o.skipped for o in outcomes if o.skipped]
    assert skipped == ["shed under overload (never reached the decision core)"]
    assert not any(o.changed for o in outcomes)


async def test_a_broken_recorder_never_touches_the_decision() -> None:
    env = make_env()

    class Broken:
        def record(self, *args: Any) -> None:
            raise RuntimeError("bug")

    env.service.recorder = cast(Recorder, Broken())
    msg = env.msg(env.forge())
    await env.handle(msg)
    assert env.nc.published[0][0] == msg.reply
    assert env.service.stats.admitted == 1 and env.service.stats.errors == 0


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
async def test_unreadable_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec")
    case = case_named("plain_unknown")
    outcome = replay.Replayer(policy(encrypted=False), case.store).run(case.entry)
    assert outcome.decision is not None
    recorder.record(case.payload, None, case.received_at, outcome.decision)
    await recorder.close()
    (path,) = (tmp_path / "rec").iterdir()
    text = path.read_bytes()
    future = json.dumps({"v": 99, "received_at": case.received_at + 1}).encode()
    path.write_bytes(text + future + b"\n" + text[: len(text) // 2])  # a crash mid-line
    entries = reader.read([tmp_path / "rec"])
    assert [e.skip for e in entries] == [
        None,
        "format version 99 unknown",
        "unreadable line (JSONDecodeError)",
    ]
    outcomes = list(replay.Replayer(policy(encrypted=False), {}).run_all(entries))
    assert [o.skipped is None and not o.changed for o in outcomes] == [True, False, False]


def test_users_file_is_the_users_list_format() -> None:
    key, other, bad = new_user()[1], new_user()[1], new_user()[1]
    lines = [
        orjson.dumps({"key": key, "name": "alice", "revoked": False}),
        b"",
        orjson.dumps({"key": bad, "invalid_record": "{not json"}),
        orjson.dumps({"key": other, "name": "bob", "revoked": True}),
    ]
    users = reader.read_users(lines)
    assert set(users) == {key, other, bad}
    assert users[bad] == b"{not json"
    assert orjson.loads(cast(bytes, users[key])) == {"name": "alice", "revoked": False}
    with pytest.raises(reader.ReplayError, match=r"users:2: .* appears twice"):
        reader.read_users([lines[0], lines[0]])
    with pytest.raises(reader.ReplayError, match="users:1: not JSON"):
        reader.read_users([b"{"])


def test_every_request_in_a_case_directory_is_read_in_arrival_order() -> None:
    entries = reader.read([Path(__file__).parent / "cases"])
    assert len(entries) == 24
    times = [e.received_at for e in entries]
    assert times == sorted(times)
    # Recordings of one request each, without a policy line (keys.json's is given as flags).
    assert all(e.policy is None and e.skip is None and e.payload for e in entries)
