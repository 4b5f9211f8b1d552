"""Record a session of real connects through nats-server 2.15.1 (`callout serve --record-dir`,
xkey on), then replay it (`callout replay`) against the same users, a changed users file and
the changed bucket: the issue's "record a session of real connects, then replay it against a
changed users file and see exactly the expected changed decisions". The replay is given the
users and nothing else: the recording carries its policy, and no secret is needed.

The recording is checked from the outside: files 0600 in a 0700 directory, rotated by size,
each opening with the service's policy (public keys only: no seed in any file), every kept
request byte-identical to one a bystander subscriber saw on `$SYS.REQ.USER.AUTH`, opened, and
the user/password client's password nowhere in any file, in plain text or in any base64
alignment, the kept tokens included.
"""

from __future__ import annotations

import asyncio
import base64
import stat
from pathlib import Path
from typing import Any

import nacl.public
import orjson
from nats.aio.msg import Msg

from tests.support.nats import (
    AUTH_SUBJECT,
    Keys,
    ServerFactory,
    decode_curve_public,
    decode_curve_seed,
    nats_connect,
    new_curve,
    new_user,
    raw_connect,
)
from tests.support.replay import assert_absent, base64_forms
from tests.support.service import (
    record,
    run_cli,
    seed_files,
    serve_args,
    spawn,
    users_bucket,
    write_seed,
)

PASSWORD = "pw-Zq8vT3xLr9-never-recorded"
MAX_BYTES = 8000


def changes(stdout: str) -> dict[str, int]:
    found = {}
    for line in stdout.splitlines():
        if line.startswith("  changed  "):
            change, _, count = line[len("  changed  ") :].rpartition(": ")
            found[change] = int(count)
    return found


def changed_clients(stdout: str) -> set[str]:
    return {line.split()[1] for line in stdout.splitlines() if line.endswith("  CHANGED")}


async def test_record_a_session_then_replay_it(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path
) -> None:
    server = nats_server(xkey=True)
    files = seed_files(keys, tmp_path / "keys")
    record_dir = tmp_path / "recording"
    alice_seed, alice = new_user()
    bob_seed, bob = new_user()
    carol_seed, carol = new_user()
    dave_seed, dave = new_user()
    eve_seed, eve = new_user()
    admin = await nats_connect(server.url, keys.service_seed)
    requests: asyncio.Queue[bytes] = asyncio.Queue()

    async def bystander(msg: Msg) -> None:
        requests.put_nowait(msg.data)

    try:
        kv = await users_bucket(admin)
        await kv.put(alice, record("alice", pub_allow=["orders.>"]))
        await kv.put(bob, record("bob"))
        await kv.put(carol, record("carol", revoked=True))
        # A bystander in the callout account sees every request as the service does.
        await admin.subscribe(AUTH_SUBJECT, cb=bystander)
        await admin.flush()
        args = serve_args(server, files, xkey=True)
        args += ["--record-dir", str(record_dir), "--record-max-bytes", str(MAX_BYTES)]
        svc = spawn(args)
        try:
            await svc.await_event("ready")
            session = [
                (alice_seed, {}, True),
                (bob_seed, {}, True),
                (carol_seed, {}, False),  # revoked
                (dave_seed, {}, False),  # unknown
                (eve_seed, {"sign_nonce_override": b"not-the-nonce"}, False),  # bad signature
                (None, {"connect_extra": {"user": "joe", "pass": PASSWORD}}, False),
            ]
            for seed, extra, admitted in session:
                result = await raw_connect(server.url, seed, **extra)
                assert result.admitted is admitted, (seed, result.error)
            seen = [await asyncio.wait_for(requests.get(), 5) for _ in session]
            # SIGTERM: the service answers what is in flight, then the recorder writes it all.
            assert svc.terminate() == 0
            stopped = svc.wait_for("recording_stopped")
        finally:
            svc.kill()
    finally:
        await admin.close()
    assert stopped["recorded"] == len(session) and stopped["dropped"] == 0

    # -- the files --------------------------------------------------------------------------
    assert stat.S_IMODE(record_dir.stat().st_mode) == 0o700
    paths = sorted(record_dir.iterdir())
    assert len(paths) >= 2, "rotation by --record-max-bytes"
    docs: list[dict[str, Any]] = []
    headers = []
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        data = path.read_bytes()
        lines = data.splitlines()
        assert path.stat().st_size <= MAX_BYTES or len(lines) == 2  # the policy, one request
        headers.append(orjson.loads(lines[0]))
        docs += [orjson.loads(line) for line in lines[1:]]
        for seed in (keys.issuer_seed, keys.xkey_seed, keys.service_seed):
            assert_absent(seed, data)
    assert len(docs) == len(session) == len(seen)
    # Every file opens with the same policy: the service's, as its flags made it.
    assert all(header == headers[0] for header in headers)
    policy = headers[0]["policy"]
    assert headers[0]["v"] == 2
    assert policy["issuer"] == keys.issuer_pub and policy["xkeys"] == [keys.xkey_pub]
    assert (policy["account"], policy["allowed_accounts"], policy["mode"]) == (
        "APP", ["APP"], "enforce",
    )  # fmt: skip
    assert policy["forbidden_accounts"] == ["$SYS", "AUTH", "SYS"]
    by_client = {doc["client"]: doc for doc in docs}
    reasons = {key: by_client[key]["decision"]["reason"] for key in (alice, bob, carol, dave, eve)}
    assert reasons == {
        alice: "admit",
        bob: "admit",
        carol: "revoked",
        dave: "unknown_user",
        eve: "bad_signature",
    }
    assert by_client[alice]["decision"]["permissions"] == {"pub": {"allow": ["orders.>"]}}
    box = nacl.public.Box(
        nacl.public.PrivateKey(decode_curve_seed(keys.xkey_seed)),
        nacl.public.PublicKey(decode_curve_public(docs[0]["headers"]["Nats-Server-Xkey"])),
    )
    # What the server sent, opened: each kept token is one of them, byte for byte.
    opened = [box.decrypt(data[28:], data[4:28]) for data in seen]
    for doc in docs:
        if doc["raw"] == "kept":
            assert base64.b64decode(doc["token_b64"]) in opened
            assert doc["headers"]["Nats-Server-Xkey"] == doc["request"]["nats"]["server_id"]["xkey"]
            assert doc["encrypted"] is True and doc["opened_with"] == keys.xkey_pub
    (joe,) = [doc for doc in docs if doc["decision"]["reason"] == "no_nkey"]
    assert (joe["raw"], joe["redaction"]) == ("redacted", "credential")
    assert "token_b64" not in joe
    assert joe["request"]["nats"]["connect_opts"]["user"] == "joe"
    assert joe["request"]["nats"]["connect_opts"]["pass"] == "[REDACTED]"
    # The password: not in any file, nor in any kept payload once decrypted.
    for path in paths:
        assert_absent(PASSWORD, path.read_bytes())
    for doc in docs:
        if doc["raw"] == "kept":
            assert_absent(PASSWORD, base64.b64decode(doc["token_b64"]))
    # ... while one request the server sent did carry it (the check can fail).
    forms = base64_forms(PASSWORD.encode())
    assert sum(any(form in plaintext for form in forms) for plaintext in opened) == 1

    # -- replay -----------------------------------------------------------------------------
    listed = run_cli(
        "users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]), "list"
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    users_file = tmp_path / "users.jsonl"
    users_file.write_text(listed.stdout)
    # No policy flag and no secret: the recording's own policy, its xkey as a stand-in.
    same = run_cli("replay", str(record_dir), "--users", str(users_file))
    assert same.returncode == 0, same.stdout + same.stderr
    assert same.stdout.splitlines()[-3:] == [
        "policy: as recorded",
        "replayed 5 of 6 requests (clock: recorded): 5 unchanged, 0 changed, 1 skipped",
        "  skipped  payload not recorded (credential): 1",
    ]
    assert sum(line.endswith("  same") for line in same.stdout.splitlines()) == 5
    # The request's validity stays as recorded when the policy's clock is now.
    now = run_cli("replay", str(record_dir), "--users", str(users_file), "--at", "now")
    assert now.returncode == 0, now.stdout + now.stderr
    assert "5 unchanged, 0 changed" in now.stdout and "(clock: now)" in now.stdout
    # With the xkey seed given, the payloads as received are opened with it: the same.
    sealed = run_cli(
        "replay", str(record_dir), "--users", str(users_file),
        "--xkey-seed-file", str(files["xkey"]),
    )  # fmt: skip
    assert sealed.returncode == 0, sealed.stdout + sealed.stderr
    assert "policy: as recorded, overridden: xkeys (--xkey-seed-file)" in sealed.stdout
    # ... and with another xkey, none of them opens: the xkey rule still bites on replay.
    other = write_seed(tmp_path / "keys" / "other-xkey.nk", new_curve()[0])
    rotated = run_cli(
        "replay", str(record_dir), "--users", str(users_file), "--xkey-seed-file", str(other)
    )
    assert rotated.returncode == 1
    assert set(changes(rotated.stdout)) == {
        f"{old} -> deny:xkey_failed"
        for old in ("admit:admit@APP", "deny:revoked", "deny:unknown_user", "deny:bad_signature")
    }
    # A policy flag overrides its part, and the summary says so.
    soft = run_cli("replay", str(record_dir), "--users", str(users_file), "--mode", "soft")
    assert soft.returncode == 1
    assert changes(soft.stdout) == {"deny:unknown_user -> admit:would_deny@APP": 1}
    assert changed_clients(soft.stdout) == {dave}
    assert "policy: as recorded, overridden: mode (--mode)" in soft.stdout

    # One user revoked, one added: exactly those two decisions change.
    users = [orjson.loads(line) for line in listed.stdout.splitlines()]
    for doc in users:
        if doc["key"] == bob:
            doc["revoked"] = True
    users.append({"key": dave, "name": "dave"})
    users_file.write_bytes(b"\n".join(orjson.dumps(doc) for doc in users))
    changed = run_cli("replay", str(record_dir), "--users", str(users_file))
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert changes(changed.stdout) == {
        "admit:admit@APP -> deny:revoked": 1,
        "deny:unknown_user -> admit:admit@APP": 1,
    }
    assert changed_clients(changed.stdout) == {bob, dave}

    # The same change made in the bucket, replayed from the bucket.
    cli = ["--nats-url", server.url, "--nkey-seed-file", str(files["service"])]
    assert run_cli("users", *cli, "revoke", bob).returncode == 0
    assert run_cli("users", *cli, "add", dave, "--name", "dave").returncode == 0
    from_bucket = run_cli("replay", str(record_dir), "--users-bucket", "users", *cli)
    assert from_bucket.returncode == 1, from_bucket.stdout + from_bucket.stderr
    assert changes(from_bucket.stdout) == changes(changed.stdout)
    assert changed_clients(from_bucket.stdout) == {bob, dave}
    # A bucket that is not there is an error (exit 2), not "every user unknown" (exit 1).
    missing = run_cli("replay", str(record_dir), "--users-bucket", "nope", *cli)
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr
