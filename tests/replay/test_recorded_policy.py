"""A recording carries the policy it was decided under (`callout.recording.policy`), so a replay
needs no flag and no secret: the policy's public part, strictly read back; stand-in keys where
the recording has public ones; an encrypted request fed as the server signed it, sealed again
to a stand-in, so the xkey rules see it as it arrived. Recordings without a policy (format 1)
still replay, with the policy given by flags.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest

from callout import cli
from callout.decision import AccountSigner, Policy
from callout.keys import SigningKey
from callout.recording import policy as recorded_policy
from callout.recording import reader, replay
from callout.recording.writer import header_line, record_document
from callout.records import Permissions, Rules
from tests.support.nats import new_account
from tests.support.replay import KEYS, XKEYS, assert_absent, case_named, policy
from tests.support.replay import replay_cli as run_replay
from tests.support.service import write_seed

PLAIN = ("plain_known_natspy", "plain_unknown", "plain_revoked", "plain_internal")
ENCRYPTED = tuple(name.replace("plain_", "encrypted_") for name in PLAIN)


def full_policy() -> Policy:
    """A policy with every field away from its default, so a field lost on the way shows."""
    signer_seed, signer_account = new_account()
    ops_seed, ops_account = new_account()
    return dataclasses.replace(
        policy(encrypted=True),
        allowed_accounts=frozenset({"APP", "OPS"}),
        internal_permissions=Permissions(pub=Rules(allow=("ops.>",))),
        default_permissions=Permissions(sub=Rules(deny=("secret.>",))),
        mode="soft",
        user_ttl=600.0,
        backend_timeout=0.5,
        forbidden_accounts=frozenset({"SYS", "$SYS", "AUTH", "MYSYS"}),
        signers={
            "APP": AccountSigner(SigningKey.from_seed(signer_seed), signer_account),
            "OPS": AccountSigner(SigningKey.from_seed(ops_seed), ops_account),
        },
        issuer_account=new_account()[1],
        fail_limit_key=3,
        fail_limit_host=7,
        fail_window=2.5,
        forbidden_account_keys=frozenset({new_account()[1]}),
    )


def test_every_policy_field_is_recorded() -> None:
    """Policy grows: a field missing from FIELDS would replay as its default, silently."""
    names = [field.name for field in recorded_policy.FIELDS]
    assert sorted(names) == sorted(field.name for field in dataclasses.fields(Policy))
    assert len(set(names)) == len(names)


def test_the_document_round_trips_with_stand_ins_for_every_key() -> None:
    original = full_policy()
    doc = orjson.loads(orjson.dumps(recorded_policy.document(original)))
    read = recorded_policy.load(doc)
    for field in dataclasses.fields(Policy):
        if field.name not in ("issuer", "xkeys", "signers"):
            assert getattr(read.policy, field.name) == getattr(original, field.name), field.name
    # The keys: stand-ins, never the originals, in the same places.
    assert doc["issuer"] == original.issuer.public != read.policy.issuer.public
    assert doc["xkeys"] == [key.public for key in original.xkeys]
    assert list(read.xkeys) == doc["xkeys"] and read.policy.xkeys == tuple(read.xkeys.values())
    assert read.policy.xkeys[0].public != original.xkeys[0].public
    assert sorted(read.policy.signers) == ["APP", "OPS"]
    for name, signer in read.policy.signers.items():
        assert signer.account == original.signers[name].account
        assert signer.key.public != original.signers[name].key.public
        assert doc["signers"][name]["key"] == original.signers[name].key.public
    # No secret at all in what is written.
    text = orjson.dumps(doc)
    secrets = [original.issuer.seed, original.xkeys[0].seed]
    for secret in secrets + [signer.key.seed for signer in original.signers.values()]:
        assert_absent(secret, text)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"allow_kinds": ["client"]}, "policy.allow_kinds: unknown field"),
        ({"mode": "lenient"}, "policy.mode: must be 'enforce' or 'soft'"),
        ({"fail_limit_key": True}, "policy.fail_limit_key: must be a non-negative integer"),
        ({"user_ttl": "600"}, "policy.user_ttl: must be a non-negative number"),
        ({"xkeys": [KEYS["xkey_seed"]]}, "policy.xkeys: "),
        ({"internal_keys": ["UNOPE"]}, "policy.internal_keys: "),
        ({"account": ""}, "policy.account: must be a non-empty string"),
        (
            {"default_permissions": {"pub": {"alow": []}}},
            "unknown field 'policy.default_permissions.pub.alow'",
        ),
        (
            {"internal_permissions": {"pubs": {}}},
            "unknown field 'policy.internal_permissions.pubs'",
        ),
        ({"signers": {"APP": {"account": "A"}}}, "policy.signers.APP: must be"),
    ],
)
def test_a_recorded_policy_is_read_strictly(edit: dict[str, Any], message: str) -> None:
    doc = {**recorded_policy.document(full_policy()), **edit}
    with pytest.raises(recorded_policy.PolicyDocumentError) as raised:
        recorded_policy.load(doc)
    assert str(raised.value).startswith(message), raised.value


def test_a_missing_field_is_named() -> None:
    doc = recorded_policy.document(full_policy())
    del doc["forbidden_accounts"]
    with pytest.raises(recorded_policy.PolicyDocumentError, match="forbidden_accounts: missing"):
        recorded_policy.load(doc)


# ---------------------------------------------------------------------------------------------
# recordings that carry their policy, replayed with no flag and no secret
# ---------------------------------------------------------------------------------------------
def write_recording(path: Path, names: tuple[str, ...], *, with_policy: bool = True) -> Path:
    """A recording file as `serve --record-dir` writes it, the cases decided as recorded."""
    encrypted = names[0].startswith("encrypted_")
    service_policy = policy(encrypted=encrypted)
    lines = [header_line(service_policy)] if with_policy else []
    for name in names:
        case = case_named(name)
        outcome = replay.Replayer(service_policy, case.store).run(case.entry)
        assert outcome.decision is not None
        xkeys = XKEYS if encrypted else ()
        doc = record_document(case.payload, case.headers, case.received_at, outcome.decision, xkeys)
        if not with_policy:  # format 1: no policy, the payload as received
            doc = {k: v for k, v in doc.items() if k not in ("token_b64", "opened_with")}
            doc.update(v=1, payload_b64=base64.b64encode(case.payload).decode())
        lines.append(orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


def users_of(tmp_path: Path, names: tuple[str, ...], **changes: dict[str, Any]) -> Path:
    users: dict[str, Any] = {}
    for name in names:
        users.update({k: v for k, v in case_named(name).users.items() if v is not None})
    for key, change in changes.items():
        users[key] = {**users.get(key, {}), **change}
    path = tmp_path / "users.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps({"key": k, **v}) for k, v in users.items()))
    return path


@pytest.mark.parametrize("names", [PLAIN, ENCRYPTED], ids=["plain", "encrypted"])
def test_a_recording_replays_with_its_own_policy_and_no_secret(
    names: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "rec"
    write_recording(directory / "requests-1.jsonl", names)
    text = (directory / "requests-1.jsonl").read_bytes()
    for secret in (KEYS["xkey_seed"], KEYS["issuer_seed"]):
        assert_absent(secret, text)
    users = users_of(tmp_path, names)
    code, lines = run_replay(capsys, str(directory), "--users", str(users))
    assert code == 0, lines
    assert lines[-2:] == [
        "policy: as recorded",
        f"replayed {len(names)} of {len(names)} requests (clock: recorded):"
        f" {len(names)} unchanged, 0 changed, 0 skipped",
    ]
    # The internal key and the revoked user came out as recorded: the recorded policy's
    # internal keys were used, and the records were consulted.
    assert {line.split()[2] for line in lines[:-2]} == {
        "admit:admit@APP", "deny:unknown_user", "deny:revoked", "admit:internal@APP",
    }  # fmt: skip
    # A changed users file: exactly the changed key is named.
    alice = next(iter(case_named(names[0]).users))
    code, lines = run_replay(
        capsys,
        str(directory),
        "--users",
        str(users_of(tmp_path, names, **{alice: {"revoked": True}})),
    )
    assert code == 1
    assert [line.split()[1] for line in lines if line.endswith("CHANGED")] == [alice]


def test_an_encrypted_request_is_still_judged_as_encrypted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stand-in xkey opens what the recorded one opened; nothing else does."""
    path = write_recording(tmp_path / "rec" / "requests-1.jsonl", ENCRYPTED)
    entries = reader.read([path])
    users = reader.read_users(users_of(tmp_path, ENCRYPTED).read_bytes().splitlines())
    assert all(e.opened_with == XKEYS[0].public for e in entries)
    outcomes = list(replay.Replayer(users=users).run_all(entries))
    assert [o.changed for o in outcomes] == [False] * len(ENCRYPTED)
    # Recorded as opened by a key the policy does not hold (a file edited, or a rotation
    # half-recorded): the box does not open, as it would not have.
    elsewhere = [dataclasses.replace(e, opened_with="XSOMEWHEREELSE") for e in entries]
    reasons = {o.new.reason for o in replay.Replayer(users=users).run_all(elsewhere) if o.new}
    assert reasons == {"xkey_failed"}
    # A plaintext request to a service that had an xkey: still xkey_required.
    service = policy(encrypted=True)
    plain = case_named("plain_known_natspy")
    decision = replay.Replayer(service, plain.store).run(plain.entry).decision
    assert decision is not None and decision.reason == "xkey_required"
    header = header_line(service)
    doc = record_document(plain.payload, None, plain.received_at, decision, XKEYS)
    mixed = tmp_path / "mixed" / "requests-1.jsonl"
    mixed.parent.mkdir()
    mixed.write_bytes(header + orjson.dumps(doc) + b"\n")
    code, lines = run_replay(capsys, str(mixed), "--users", str(users_of(tmp_path, PLAIN)))
    assert code == 0 and lines[0].endswith("deny:xkey_required -> deny:xkey_required  same")


def test_files_recorded_under_different_policies_each_keep_their_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_recording(tmp_path / "rec" / "requests-1.jsonl", PLAIN)
    soft = dataclasses.replace(policy(encrypted=False), mode="soft")
    unknown = case_named("plain_unknown")
    decision = replay.Replayer(soft, unknown.store).run(unknown.entry).decision
    assert decision is not None and decision.reason == "would_deny"
    # The same request, recorded by a soft-mode replica (a second server id is not needed:
    # each policy gets its own core, so it is not a replay of the first file's request).
    doc = record_document(unknown.payload, None, unknown.received_at, decision, ())
    (tmp_path / "rec" / "requests-2.jsonl").write_bytes(header_line(soft) + orjson.dumps(doc))
    code, lines = run_replay(
        capsys, str(tmp_path / "rec"), "--users", str(users_of(tmp_path, PLAIN))
    )
    assert code == 0, lines
    assert lines[-2] == "policy: as recorded (2 policies)"
    assert "5 unchanged, 0 changed" in lines[-1]
    # --mode enforce overrides both: the soft one's admit changes.
    code, lines = run_replay(
        capsys,
        str(tmp_path / "rec"),
        "--users",
        str(users_of(tmp_path, PLAIN)),
        "--mode",
        "enforce",
    )
    assert code == 1
    assert lines[-3:-1] == [
        "policy: as recorded (2 policies), overridden: mode (--mode)",
        "replayed 5 of 5 requests (clock: recorded): 4 unchanged, 1 changed, 0 skipped",
    ]


def test_a_recording_without_its_policy_needs_the_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_recording(tmp_path / "v1" / "requests-1.jsonl", ENCRYPTED, with_policy=False)
    users = str(users_of(tmp_path, ENCRYPTED))
    code = cli.main(["replay", str(path), "--users", users])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "recorded without its policy" in err and "--account" in err
    xkey = write_seed(tmp_path / "xkey.nk", KEYS["xkey_seed"])
    code, lines = run_replay(
        capsys, str(path), "--users", users, "--account", "APP",
        "--internal-key", KEYS["internal_keys"][0], "--xkey-seed-file", str(xkey),
    )  # fmt: skip
    assert code == 0, lines
    assert lines[-2] == "policy: from the flags, for the requests recorded without one"


def test_a_policy_line_with_an_unknown_field_stops_the_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_recording(tmp_path / "rec" / "requests-1.jsonl", PLAIN)
    first, rest = path.read_bytes().split(b"\n", 1)
    doc = orjson.loads(first)
    doc["policy"]["allow_kinds"] = ["client"]
    path.write_bytes(orjson.dumps(doc) + b"\n" + rest)
    code = cli.main(["replay", str(path), "--users", str(users_of(tmp_path, PLAIN))])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}:1: policy.allow_kinds: unknown field" in err


def test_an_override_that_places_users_in_the_system_account_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_recording(tmp_path / "rec" / "requests-1.jsonl", PLAIN)
    users = str(users_of(tmp_path, PLAIN))
    code = cli.main(["replay", str(path), "--users", users, "--allowed-account", "SYS"])
    assert code == 2 and "refusing to place users in SYS" in capsys.readouterr().err
