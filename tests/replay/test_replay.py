"""Requests recorded from the real nats-server 2.15.1 (plain and xkey-encrypted), replayed
through the sans-I/O core with the recorded arrival time as a fixed clock.

The data comes from ``tests/replay/record.py`` (run by hand; see its docstring). Each case
is a recording of one request (the format ``callout serve --record-dir`` writes): the
request as the server signed it and the headers the service received, with the decision
the admission rules demand; ``cases.json`` beside it holds the store contents to answer with.
The cases are read and fed to the core by ``callout.recording.replay``, the mechanism behind
``callout replay`` (so these tests are also its tests, and the CLI is run over the committed
cases at the end). The responses are decoded
here with an independent JWT/nkey decoder (PyNaCl + base32, not ``callout.jwt``), so a bug
shared by the encoder and the decoder in ``callout`` cannot hide.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.public
import nacl.signing
import orjson
import pytest

from callout.decision import Authorizer, Decision, Pending, StoreAnswer
from callout.recording import replay
from tests.support.nats import new_curve
from tests.support.replay import (
    CASE_FILES,
    KEYS,
    XKEY_HEADER,
    Case,
    b64url,
    case_named,
    decode_jwt,
    load,
    policy,
    replay_cli,
    server_box,
)
from tests.support.service import write_seed


def store_answer(case: Case, client_key: str) -> StoreAnswer:
    assert client_key in case.users, f"{case.name}: the core looked up an unexpected key"
    return replay.answer(case.store, client_key)


def run(authorizer: Authorizer, case: Case, now: float) -> Decision:
    return replay.feed(
        authorizer, case.payload, case.headers, now, lambda key: store_answer(case, key)
    ).decision


def response_claims(case: Case, body: bytes) -> dict[str, Any]:
    """Decrypt (when the request was encrypted) and verify a response from the issuer."""
    if case.encrypted:
        assert case.headers is not None
        assert body.startswith(b"xkv1"), "an encrypted request gets an encrypted response"
        body = server_box(case.headers).decrypt(body[28:], body[4:28])
    else:
        assert body.startswith(b"eyJ"), "a plaintext request gets a plaintext JWT"
    claims = decode_jwt(body, "A")
    request = case.request
    assert claims["iss"] == KEYS["issuer_pub"]
    assert claims["sub"] == request["nats"]["user_nkey"]
    assert claims["aud"] == request["nats"]["server_id"]["id"]
    assert claims["nats"]["type"] == "authorization_response"
    assert claims["nats"]["version"] == 2
    assert "issuer_account" not in claims["nats"]  # config mode denies it (docs/protocol.md §3)
    assert ("jwt" in claims["nats"]) != ("error" in claims["nats"]), "exactly one of jwt/error"
    return claims


def rules(doc: dict[str, Any], direction: str) -> tuple[list[str], list[str]]:
    side = doc.get(direction) or {}
    return list(side.get("allow") or []), list(side.get("deny") or [])


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_recording_covers_both_modes_and_both_sig_encodings() -> None:
    names = {p.stem for p in CASE_FILES}
    for client in ("known_natspy", "known_rawurl", "unknown", "revoked", "no_sig", "internal"):
        assert {f"plain_{client}", f"encrypted_{client}"} <= names
    for mode in ("plain", "encrypted"):
        natspy = case_named(f"{mode}_known_natspy").request["nats"]["connect_opts"]["sig"]
        rawurl = case_named(f"{mode}_known_rawurl").request["nats"]["connect_opts"]["sig"]
        assert len(natspy) == 88 and natspy.endswith("="), "nats-py sends padded std base64"
        assert len(rawurl) == 86 and "=" not in rawurl, "Go clients send RawURL base64"


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda p: p.stem)
def test_recorded_request_is_authentic(path: Path) -> None:
    case = load(path)
    request = case.request
    # The recording's decoded request is the token's claims, credentials redacted.
    recorded = json.loads(path.read_text())["request"]
    options = request["nats"].get("connect_opts") or {}
    secrets = {name for name in ("pass", "auth_token", "jwt") if name in options}
    assert recorded["nats"]["connect_opts"] == {
        **options,
        **dict.fromkeys(secrets, "[REDACTED]"),
    }
    assert {**recorded, "nats": None} == {**request, "nats": None}
    assert request["iss"] == request["nats"]["server_id"]["id"]
    assert request["aud"] == "nats-authorization-request"
    assert request["iat"] <= case.received_at <= request["exp"]
    if case.encrypted:
        assert case.payload.startswith(b"xkv1")
        assert case.headers is not None
        assert request["nats"]["server_id"]["xkey"] == case.headers[XKEY_HEADER]
    else:
        assert case.headers is None and case.payload.startswith(b"eyJ")


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda p: p.stem)
def test_decision_and_response(path: Path) -> None:
    case = load(path)
    replayer = replay.Replayer(policy(encrypted=case.encrypted), case.store)
    outcome = replayer.run(case.entry)
    assert outcome.decision is not None and outcome.new is not None, outcome.skipped
    decision = outcome.decision
    now = case.received_at

    assert decision.reason == case.expect["reason"], decision.detail
    assert decision.admit is case.expect["admit"]
    assert (decision.account or None) == case.expect["account"]
    assert not decision.drop
    assert not outcome.changed  # what `callout replay` reports for this case
    # Every recorded request is authentic, so every one gets a signed answer (admit or error).
    body = replayer.authorizer.respond(decision, now=now, jitter=0)
    claims = response_claims(case, body)
    assert claims["iat"] == int(now)
    request = case.request["nats"]

    if not case.expect["admit"]:
        assert claims["nats"]["error"] == case.expect["reason"]
        return
    user = decode_jwt(claims["nats"]["jwt"].encode(), "A")
    assert user["iss"] == KEYS["issuer_pub"]
    assert user["sub"] == request["user_nkey"]
    assert user["sub"] != request["connect_opts"]["nkey"]  # never the client's own key (§3)
    assert user["aud"] == case.expect["account"]
    assert user["exp"] == int(now + KEYS["user_ttl"])  # jitter 0
    assert "nbf" not in user
    assert user["nats"]["type"] == "user"
    assert user["nats"]["version"] == 2
    assert (user["nats"]["subs"], user["nats"]["data"], user["nats"]["payload"]) == (-1, -1, -1)
    assert "issuer_account" not in user["nats"]
    record = case.users.get(request["connect_opts"]["nkey"])
    if record is None:  # internal key: no record, unrestricted in the account
        assert case.expect["reason"] == "internal"
        assert rules(user["nats"], "pub") == ([], [])
        assert rules(user["nats"], "sub") == ([], [])
    else:
        assert user["name"] == record["name"]
        for direction in ("pub", "sub"):
            want = record["permissions"][direction]
            assert rules(user["nats"], direction) == (want["allow"], want["deny"])


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda p: p.stem)
def test_same_request_twice_is_a_replay(path: Path) -> None:
    case = load(path)
    authorizer = Authorizer(policy(encrypted=case.encrypted))
    first = run(authorizer, case, case.received_at)
    assert first.reason == case.expect["reason"]
    again = run(authorizer, case, case.received_at + 0.1)
    # Dropped: an answer could be a second reply to the inbox the first one went to.
    assert again.reason == "replay"
    assert not again.admit and again.drop


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda p: p.stem)
def test_expired_request_is_dropped(path: Path) -> None:
    case = load(path)
    authorizer = Authorizer(policy(encrypted=case.encrypted))
    decision = run(authorizer, case, case.received_at + 60)
    assert decision.reason == "request_expired"
    assert decision.drop and not decision.admit
    assert authorizer.respond(decision, now=case.received_at + 60, jitter=0) == b""
    # Dropped without work: it did not even take a place in the replay memory.
    assert len(authorizer.seen) == 0


def test_plaintext_request_when_xkey_configured_is_refused() -> None:
    case = case_named("plain_known_natspy")
    authorizer = Authorizer(policy(encrypted=True))
    decision = run(authorizer, case, case.received_at)
    assert decision.reason == "xkey_required"
    assert not decision.admit
    claims = response_claims(case, authorizer.respond(decision, now=case.received_at, jitter=0))
    assert claims["nats"]["error"] == "xkey_required"


def test_encrypted_request_without_xkey_configured_is_refused() -> None:
    case = case_named("encrypted_known_natspy")
    authorizer = Authorizer(policy(encrypted=False))
    decision = run(authorizer, case, case.received_at)
    assert decision.reason == "xkey_unexpected"
    assert not decision.admit
    # Unopenable: nobody to address a signed error to, so the empty body (immediate deny).
    assert authorizer.respond(decision, now=case.received_at, jitter=0) == b""


def test_encrypted_request_with_another_xkey_fails_to_open() -> None:
    case = case_named("encrypted_known_natspy")
    other_seed, _ = new_curve()
    authorizer = Authorizer(policy(encrypted=True, xkey_seed=other_seed))
    decision = run(authorizer, case, case.received_at)
    assert decision.reason == "xkey_failed"
    assert authorizer.respond(decision, now=case.received_at, jitter=0) == b""


def test_tampered_ciphertext_fails_to_open() -> None:
    case = case_named("encrypted_known_natspy")
    middle = len(case.payload) // 2
    tampered = bytearray(case.payload)
    tampered[middle] ^= 0x01
    authorizer = Authorizer(policy(encrypted=True))
    decision = authorizer.open(bytes(tampered), case.headers, case.received_at)
    assert isinstance(decision, Decision)
    assert decision.reason == "xkey_failed"
    with pytest.raises(nacl.exceptions.CryptoError):  # the oracle agrees it does not open
        assert case.headers is not None
        server_box(case.headers).decrypt(bytes(tampered[28:]), bytes(tampered[4:28]))


def test_edited_request_claims_fail_the_server_signature() -> None:
    case = case_named("plain_known_natspy")
    header, payload, sig = case.payload.split(b".")
    claims = json.loads(b64url(payload))
    claims["nats"]["client_info"]["host"] = "10.9.9.9"
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    authorizer = Authorizer(policy(encrypted=False))
    decision = authorizer.open(header + b"." + edited + b"." + sig, None, case.received_at)
    assert isinstance(decision, Decision)
    assert decision.reason == "request_forged"
    assert not decision.admit
    # The untouched request still opens: the edit, not the fixture, made the difference.
    assert not isinstance(authorizer.open(case.payload, None, case.received_at), Decision)


# ---------------------------------------------------------------------------------------------
# `callout replay` over the committed cases: the CLI reads the same files, feeds them the same
# way, and agrees with the hand-written expectations; a policy change shows as exactly the
# decisions it changes.
# ---------------------------------------------------------------------------------------------
def cases_of(mode: str) -> list[str]:
    return [str(p) for p in CASE_FILES if p.stem.startswith(f"{mode}_")]


def policy_flags(tmp_path: Path, mode: str) -> list[str]:
    flags = ["--account", KEYS["account"], "--internal-key", KEYS["internal_keys"][0]]
    if mode == "encrypted":
        flags += ["--xkey-seed-file", str(write_seed(tmp_path / "xkey.nk", KEYS["xkey_seed"]))]
    return flags


def users_of(mode: str) -> dict[str, Any]:
    """The records of a mode's cases (a key with none is not listed: it has no record)."""
    users: dict[str, Any] = {}
    for path in CASE_FILES:
        if path.stem.startswith(f"{mode}_"):
            users.update({k: v for k, v in load(path).users.items() if v is not None})
    return users


def users_file(tmp_path: Path, users: dict[str, Any]) -> str:
    path = tmp_path / "users.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps({"key": k, **v}) for k, v in users.items()))
    return str(path)


def changes(lines: list[str]) -> dict[str, int]:
    found = {}
    for line in lines:
        if line.startswith("  changed  "):
            change, _, count = line[len("  changed  ") :].rpartition(": ")
            found[change] = int(count)
    return found


@pytest.mark.parametrize("mode", ["plain", "encrypted"])
def test_cli_replays_the_committed_cases_unchanged(
    mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = cases_of(mode)
    users = users_file(tmp_path, users_of(mode))
    code, lines = replay_cli(capsys, *files, *policy_flags(tmp_path, mode), "--users", users)
    assert code == 0, lines
    assert lines[-1] == (
        f"replayed {len(files)} of {len(files)} requests (clock: recorded):"
        f" {len(files)} unchanged, 0 changed, 0 skipped"
    )
    assert lines[-2] == "policy: from the flags, for the requests recorded without one"
    per_request = lines[:-2]
    assert len(per_request) == len(files) and all(line.endswith("  same") for line in per_request)
    expected = {load(Path(f)).expect["reason"] for f in files}
    assert {line.split()[2].split(":")[1].split("@")[0] for line in per_request} == expected


def test_cli_shows_exactly_what_a_policy_change_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Soft mode, and the internal key no longer configured.
    users = users_file(tmp_path, users_of("plain"))
    code, lines = replay_cli(
        capsys, *cases_of("plain"), "--account", "APP", "--mode", "soft", "--users", users
    )
    assert code == 1
    assert changes(lines) == {
        "admit:internal@APP -> admit:would_deny@APP": 1,
        "deny:unknown_user -> admit:would_deny@APP": 1,
    }
    changed = [line for line in lines if line.endswith("  CHANGED")]
    internal_key = KEYS["internal_keys"][0]
    unknown_key = next(iter(case_named("plain_unknown").users))
    assert sorted(line.split()[1] for line in changed) == sorted([internal_key, unknown_key])


def test_cli_users_file_answers_the_lookups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = users_of("plain")
    alice = next(iter(case_named("plain_known_natspy").users))
    users[alice] = {**users[alice], "revoked": True}
    code, lines = replay_cli(
        capsys,
        *cases_of("plain"),
        *policy_flags(tmp_path, "plain"),
        "--users",
        users_file(tmp_path, users),
    )
    assert code == 1
    assert changes(lines) == {"admit:admit@APP -> deny:revoked": 1}


def test_cli_at_now_judges_each_request_valid_as_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The policy's clock is now; a request's own (exp, nbf, the replay window) stays the
    recorded arrival: a recorded request is not "expired" for having been recorded."""
    files = cases_of("encrypted")
    users = users_file(tmp_path, users_of("encrypted"))
    code, lines = replay_cli(
        capsys, *files, *policy_flags(tmp_path, "encrypted"), "--at", "now", "--users", users
    )
    assert code == 0, lines
    assert lines[-1].endswith(f"(clock: now): {len(files)} unchanged, 0 changed, 0 skipped")


def test_the_request_clock_and_the_policy_clock_are_apart() -> None:
    """`valid_at` judges the request; `now` runs the failure limits and stamps the request."""
    case = case_named("plain_unknown")
    later = case.received_at + 86400
    authorizer = Authorizer(policy(encrypted=False))
    started = authorizer.start(case.payload, None, later, valid_at=case.received_at)
    assert isinstance(started, Pending), started
    opened = started.request
    assert opened.opened_at == later
    decision = authorizer.resume(
        started, replay.answer({}, opened.client_key), None, later
    ).decision
    assert decision.reason == "unknown_user"
    # The failure was counted at the policy's clock, not at the request's.
    assert authorizer.failures_by_key._buckets[opened.client_key][1] == later
    # Judged at the policy's clock alone, the same request is long expired.
    again = Authorizer(policy(encrypted=False)).open(case.payload, None, later)
    assert isinstance(again, Decision) and again.reason == "request_expired"
