"""The command-line contract, black-box: `python -m callout ...` as a subprocess against a
real nats-server.

- `keys generate`: three 0600 seed files of the right kinds, never overwritten.
- `users add/get/list/revoke`: records as the contract spells them, keys upper-cased,
  invalid input refused before anything is written, the bucket created when missing.
- every flag also read from `CALLOUT_<FLAG>` (comma lists for repeatable flags).
- every mistake a user can make: non-zero exit, ONE line on stderr, no traceback.
- `serve`: JSON log lines, one `ready`, clean stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any

import nats.js.errors
import nkeys
import orjson
import pytest
from nats.aio.client import Client as NATSClient
from nats.js.api import StreamConfig

from tests.support.nats import (
    Keys,
    NatsServer,
    ServerFactory,
    auth_errors,
    curve_public_from_seed,
    free_port,
    nats_connect,
    new_user,
    next_event,
    raw_connect,
)
from tests.support.service import (
    APP,
    kill_quietly,
    live_keys,
    record,
    run_cli,
    seed_files,
    serve_args,
    spawn,
    users_bucket,
    wait_logged,
)

# A correct CLI answers every one of these in well under a second of work; the bound only
# turns a hang (a bug) into a failure instead of a stuck suite.
CLI_TIMEOUT = 15.0


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return run_cli(*args, env=env, timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`callout {' '.join(args)}` did not exit within {CLI_TIMEOUT}s")


async def acli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`cli` off the event loop, so our own NATS connections keep running meanwhile."""
    return await asyncio.to_thread(cli, *args, env=env)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The contract for a user's mistake: non-zero exit, one line on stderr, no traceback."""
    assert result.returncode != 0, f"exit 0; stdout={result.stdout!r}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    return lines[0]


def users_cmd(server: NatsServer, files: dict[str, Path], *args: str) -> list[str]:
    return ["users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]), *args]


def json_out(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def stream_state(nc: NATSClient, bucket: str = "users") -> tuple[int, int] | None:
    """(messages, last sequence) of the bucket's stream; None when it does not exist."""
    try:
        info = await nc.jetstream().stream_info(f"KV_{bucket}")
    except nats.js.errors.NotFoundError:
        return None
    return info.state.messages, info.state.last_seq


# ---------------------------------------------------------------------------------------------
# keys generate
# ---------------------------------------------------------------------------------------------
def test_keys_generate_writes_three_private_seeds_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    result = cli("keys", "generate", "--out", str(out))
    publics = json_out(result)

    files = sorted(p.name for p in out.iterdir())
    assert files == ["issuer.nk", "service.nk", "xkey.nk"]
    for name in files:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    issuer = (out / "issuer.nk").read_text().strip()
    service = (out / "service.nk").read_text().strip()
    xkey = (out / "xkey.nk").read_text().strip()
    assert issuer.startswith("SA") and service.startswith("SU") and xkey.startswith("SX")
    # Seeds and the printed public keys belong together (checked with independent decoders).
    assert nkeys.from_seed(issuer.encode()).public_key.decode() == publics["issuer"]
    assert nkeys.from_seed(service.encode()).public_key.decode() == publics["service"]
    assert curve_public_from_seed(xkey) == publics["xkey"]
    assert publics["issuer"].startswith("A") and publics["service"].startswith("U")
    # Nothing secret on stdout.
    for seed in (issuer, service, xkey):
        assert seed not in result.stdout and seed not in result.stderr

    before = {name: (out / name).read_text() for name in files}
    line = one_line_error(cli("keys", "generate", "--out", str(out)))
    assert "overwrite" in line
    assert {name: (out / name).read_text() for name in files} == before


# ---------------------------------------------------------------------------------------------
# users
# ---------------------------------------------------------------------------------------------
async def test_users_add_then_get_stores_the_record_under_the_upper_case_key(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    _, pub = new_user()
    perms = ["--pub-allow", "orders.>", "--pub-allow", "$SYS.REQ.USER.INFO"]
    perms += ["--pub-deny", "orders.secret", "--sub-allow", "_INBOX.>", "--sub-deny", "x.*"]
    add = users_cmd(server, files, "add", pub.lower(), "--name", "alice", "--account", APP)
    added = json_out(await acli(*add, *perms))
    want = {
        "key": pub,
        "name": "alice",
        "admin": False,
        "revoked": False,
        "account": APP,
        "permissions": {
            "pub": {"allow": ["orders.>", "$SYS.REQ.USER.INFO"], "deny": ["orders.secret"]},
            "sub": {"allow": ["_INBOX.>"], "deny": ["x.*"]},
        },
    }
    assert added == want
    assert json_out(await acli(*users_cmd(server, files, "get", pub.lower()))) == want
    assert json_out(await acli(*users_cmd(server, files, "get", pub))) == want

    # What is in the bucket, read with plain nats-py: the upper-case key only, contract fields.
    nc = await nats_connect(server.url, keys.service_seed)
    try:
        kv = await users_bucket(nc)
        assert await live_keys(nc) == [pub]
        stored = orjson.loads((await kv.get(pub)).value)
        assert {k: v for k, v in want.items() if k != "key"} == {
            k: stored[k] for k in ("name", "admin", "revoked", "account", "permissions")
        }
    finally:
        await nc.close()


async def test_users_add_admin_flag(server: NatsServer, keys: Keys, files: dict[str, Path]) -> None:
    _, pub = new_user()
    assert json_out(await acli(*users_cmd(server, files, "add", pub, "--admin")))["admin"] is True
    got = json_out(await acli(*users_cmd(server, files, "get", pub)))
    assert got["admin"] is True and got["account"] is None and got["revoked"] is False


async def test_users_duplicate_add_fails_and_keeps_the_first_record(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    _, pub = new_user()
    json_out(await acli(*users_cmd(server, files, "add", pub, "--name", "first")))
    line = one_line_error(
        await acli(*users_cmd(server, files, "add", pub.lower(), "--name", "second"))
    )
    assert pub in line and "exists" in line
    assert json_out(await acli(*users_cmd(server, files, "get", pub)))["name"] == "first"


async def test_users_invalid_key_or_subject_is_refused_before_anything_is_written(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    nc = await nats_connect(server.url, keys.service_seed)
    try:
        bad_key = one_line_error(await acli(*users_cmd(server, files, "add", "UNOTAKEY")))
        assert "UNOTAKEY" in bad_key
        # An account key is a valid nkey, but not a user key.
        assert keys.issuer_pub in one_line_error(
            await acli(*users_cmd(server, files, "add", keys.issuer_pub))
        )
        # Refused before connecting: not even the bucket was created.
        assert await stream_state(nc) is None

        _, existing = new_user()
        json_out(await acli(*users_cmd(server, files, "add", existing, "--name", "x")))
        before = await stream_state(nc)
        assert before is not None
        for flag, subject in (("--pub-allow", "a b"), ("--sub-allow", "foo..bar")):
            _, pub = new_user()
            line = one_line_error(await acli(*users_cmd(server, files, "add", pub, flag, subject)))
            assert flag in line and subject in line
            assert await stream_state(nc) == before, f"{flag} {subject!r} wrote to the bucket"
            assert (await acli(*users_cmd(server, files, "get", pub))).returncode == 1
    finally:
        await nc.close()


async def test_users_get_of_an_absent_key_exits_1(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    _, pub = new_user()
    result = await acli(*users_cmd(server, files, "get", pub))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "Traceback" not in result.stderr and pub in result.stderr


async def test_users_list_prints_one_json_object_per_line(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    assert (await acli(*users_cmd(server, files, "list"))).stdout == ""  # empty bucket
    added = {new_user()[1]: name for name in ("ann", "ben", "cat")}
    for pub, name in added.items():
        json_out(await acli(*users_cmd(server, files, "add", pub, "--name", name)))
    result = await acli(*users_cmd(server, files, "list"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    docs = [json.loads(line) for line in lines]
    assert all(isinstance(d, dict) for d in docs)
    assert {d["key"]: d["name"] for d in docs} == added


async def test_revoke_keeps_the_record_and_a_running_service_then_denies(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    seed, pub = new_user()
    json_out(await acli(*users_cmd(server, files, "add", pub, "--name", "rita")))
    handle = spawn(serve_args(server, files))
    admin = await nats_connect(server.url, keys.service_seed)
    try:
        await handle.await_event("ready")
        events = await auth_errors(admin)
        before = await raw_connect(server.url, seed)
        assert before.admitted, before.error

        revoked = json_out(await acli(*users_cmd(server, files, "revoke", pub.lower())))
        assert revoked["key"] == pub and revoked["revoked"] is True
        got = json_out(await acli(*users_cmd(server, files, "get", pub)))
        assert got["revoked"] is True and got["name"] == "rita"  # kept for audit
        listed = [
            json.loads(x)
            for x in (await acli(*users_cmd(server, files, "list"))).stdout.splitlines()
        ]
        assert [d["key"] for d in listed] == [pub]

        after = await raw_connect(server.url, seed)
        assert not after.admitted
        assert after.error == "Authorization Violation"
        event = await next_event(events, lambda e: "revoked" in e.get("reason", ""))
        assert "revoked" in event["reason"]
        decision = await handle.await_event("decision", client=pub, reason="revoked")
        assert decision["decision"] == "deny"
    finally:
        await admin.close()
        kill_quietly(handle)


async def test_revoke_of_an_absent_key_exits_1(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    _, pub = new_user()
    result = await acli(*users_cmd(server, files, "revoke", pub))
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr


async def test_users_creates_a_missing_bucket_with_the_requested_replicas(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    nc = await nats_connect(server.url, keys.service_seed)
    try:
        assert await stream_state(nc) is None
        result = await acli(*users_cmd(server, files, "--replicas", "1", "list"))
        assert result.returncode == 0, result.stderr
        info = await nc.jetstream().stream_info("KV_users")
        assert info.config.num_replicas == 1
        assert info.config.subjects == ["$KV.users.>"]
        # It is a KV bucket nats-py itself recognises, and `users` works on it.
        kv = await nc.jetstream().key_value("users")
        _, pub = new_user()
        await kv.put(pub, record("made-by-nats-py"))
        got = json_out(await acli(*users_cmd(server, files, "get", pub)))
        assert got["name"] == "made-by-nats-py"
    finally:
        await nc.close()


async def test_users_replicas_3_on_a_single_server_fails_with_one_line(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    line = one_line_error(await acli(*users_cmd(server, files, "--replicas", "3", "list")))
    assert "replica" in line.lower()
    nc = await nats_connect(server.url, keys.service_seed)
    try:
        assert await stream_state(nc) is None
    finally:
        await nc.close()


@pytest.mark.parametrize("replicas", ["0", "6"])
def test_users_replicas_out_of_range_is_refused(replicas: str, tmp_path: Path) -> None:
    result = cli(
        "users", "--nats-url", "nats://127.0.0.1:1", "--nkey-seed-file", str(tmp_path / "x"),
        "--replicas", replicas, "list",
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "--replicas" in result.stderr


async def test_a_stream_named_like_the_bucket_that_is_not_a_kv_bucket_is_a_clear_error(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    nc = await nats_connect(server.url, keys.service_seed)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="KV_users", subjects=["not.kv.>"]))
        _, pub = new_user()
        for args in (("list",), ("add", pub, "--name", "x"), ("get", pub)):
            line = one_line_error(await acli(*users_cmd(server, files, *args)))
            assert "KV_users" in line and "not a KV bucket" in line
        info = await js.stream_info("KV_users")
        assert info.config.subjects == ["not.kv.>"] and info.state.messages == 0
    finally:
        await nc.close()


# ---------------------------------------------------------------------------------------------
# flags from the environment
# ---------------------------------------------------------------------------------------------
async def test_users_reads_its_flags_from_the_environment(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    env = {
        "CALLOUT_NATS_URL": server.url,
        "CALLOUT_NKEY_SEED_FILE": str(files["service"]),
        "CALLOUT_USERS_BUCKET": "people",
        "CALLOUT_REPLICAS": "1",
    }
    _, pub = new_user()
    assert json_out(await acli("users", "add", pub, "--name", "eve", env=env))["name"] == "eve"
    assert json_out(await acli("users", "get", pub, env=env))["key"] == pub
    nc = await nats_connect(server.url, keys.service_seed)
    try:
        assert await stream_state(nc, "users") is None
        kv = await nc.jetstream().key_value("people")
        assert orjson.loads((await kv.get(pub)).value)["name"] == "eve"
    finally:
        await nc.close()


async def test_serve_runs_from_environment_variables_alone(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path
) -> None:
    """Every flag from CALLOUT_*, including a comma list for the repeatable --internal-key;
    no users bucket exists, so only the two internal keys get in."""
    server = nats_server(xkey=True)
    files = seed_files(keys, tmp_path / "seeds")
    (seed1, pub1), (seed2, pub2), (stranger, _) = new_user(), new_user(), new_user()
    env = {
        "CALLOUT_NATS_URL": server.url,
        "CALLOUT_NKEY_SEED_FILE": str(files["service"]),
        "CALLOUT_ISSUER_SEED_FILE": str(files["issuer"]),
        "CALLOUT_XKEY_SEED_FILE": str(files["xkey"]),
        "CALLOUT_ACCOUNT": APP,
        "CALLOUT_INTERNAL_KEY": f"{pub1}, {pub2.lower()}",
        "CALLOUT_LOG_FORMAT": "json",
    }
    handle = spawn(["serve"], env=env)
    try:
        ready = await handle.await_event("ready")
        assert ready["internal_keys"] == 2
        assert ready["xkey"] is True
        assert ready["account"] == APP
        for seed in (seed1, seed2):
            result = await raw_connect(server.url, seed)
            assert result.admitted, result.error
        denied = await raw_connect(server.url, stranger)
        assert not denied.admitted
        await handle.await_event("decision", reason="store_unavailable")
    finally:
        kill_quietly(handle)


# ---------------------------------------------------------------------------------------------
# mistakes a user can make: one line, no traceback
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing_seed_file", "does not exist"),
        ("seed_file_0644", "chmod"),
        ("user_seed_as_issuer", "--issuer-seed-file"),
        ("account_seed_as_service", "--nkey-seed-file"),
        ("xkey_seed_is_a_user_seed", "xkey"),
        ("internal_key_not_a_user_key", "user public key"),
        ("allowed_account_sys", "SYS"),
        ("account_is_callout_account", "AUTH"),
        ("account_sys_beside_allowed_app", "SYS"),
    ],
)
def test_serve_refuses_a_user_mistake_with_one_line(
    case: str, expect: str, keys: Keys, tmp_path: Path, files: dict[str, Path]
) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # never reached: each mistake is caught first
    lax = files["service"].parent / "lax.nk"
    lax.write_text(keys.service_seed + "\n")
    lax.chmod(0o644)
    args = {
        "missing_seed_file": serve_args(url, files, nkey_seed_file=str(tmp_path / "nope.nk")),
        "seed_file_0644": serve_args(url, files, nkey_seed_file=str(lax)),
        "user_seed_as_issuer": serve_args(url, files, issuer_seed_file=str(files["service"])),
        "account_seed_as_service": serve_args(url, files, nkey_seed_file=str(files["issuer"])),
        "xkey_seed_is_a_user_seed": serve_args(url, files, xkey_seed_file=[str(files["service"])]),
        "internal_key_not_a_user_key": serve_args(url, files, internal_key=[keys.issuer_pub]),
        "allowed_account_sys": serve_args(url, files, allowed_account=[APP, "SYS"]),
        "account_is_callout_account": serve_args(url, files, account="AUTH"),
        # --account places internal keys and soft-mode admits even when records may not name it.
        "account_sys_beside_allowed_app": serve_args(
            url, files, account="SYS", allowed_account=[APP], mode="soft"
        ),
    }[case]
    line = one_line_error(cli(*args))
    assert expect in line
    # Never the secret itself, even when complaining about the file that holds it.
    for seed in (keys.service_seed, keys.issuer_seed, keys.xkey_seed):
        assert seed not in line


@pytest.mark.parametrize(
    ("flags", "env", "named"),
    [
        # nan issued JWTs with no exp; inf made every admit fail; a window of inf never lets a
        # throttled client recover.
        ({"user_ttl": "nan"}, {}, "--user-ttl"),
        ({"user_ttl": "inf"}, {}, "--user-ttl"),
        ({"user_ttl": "1e300"}, {}, "--user-ttl"),
        ({"fail_window": "inf"}, {}, "--fail-window"),
        ({"fail_window": "nan"}, {}, "--fail-window"),
        ({"backend_timeout": "nan"}, {}, "--backend-timeout"),
        # Environment values skipped argparse's checks: "soft " ran as enforce, "bogus" turned
        # the cache off, any word but a true one was false, a bad number was a traceback.
        ({}, {"CALLOUT_MODE": "soft "}, "CALLOUT_MODE"),
        ({}, {"CALLOUT_MODE": "Soft"}, "CALLOUT_MODE"),
        ({}, {"CALLOUT_USERS_CACHE": "bogus"}, "CALLOUT_USERS_CACHE"),
        ({}, {"CALLOUT_LOG_LEVEL": "verbose"}, "CALLOUT_LOG_LEVEL"),
        ({}, {"CALLOUT_OPERATOR": "ture"}, "CALLOUT_OPERATOR"),
        ({}, {"CALLOUT_USER_TTL": "-1"}, "CALLOUT_USER_TTL"),
        ({}, {"CALLOUT_USER_TTL": "inf"}, "CALLOUT_USER_TTL"),
        ({}, {"CALLOUT_FAIL_WINDOW": " 10"}, "CALLOUT_FAIL_WINDOW"),
        ({}, {"CALLOUT_INTERNAL_KEY": "UABC,,UDEF"}, "CALLOUT_INTERNAL_KEY"),
        ({}, {"CALLOUT_ALLOW_KIND": "client,router"}, "--allow-kind"),
        ({"allow_kind": "client,gateway"}, {}, "--allow-kind"),
        ({"default_permissions": '{"publish": {"allow": ["a.>"]}}'}, {}, "--default-permissions"),
    ],
)
def test_flags_and_environment_are_refused_at_start_with_one_line(
    flags: dict[str, str], env: dict[str, str], named: str, keys: Keys, files: dict[str, Path]
) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # never reached
    line = one_line_error(cli(*serve_args(url, files, **flags), env=env))
    assert named in line


def test_serve_with_unreachable_nats_exits_with_one_line(
    keys: Keys, files: dict[str, Path]
) -> None:
    port = free_port()  # nobody listens here
    line = one_line_error(cli(*serve_args(f"nats://127.0.0.1:{port}", files)))
    assert str(port) in line


def test_users_with_unreachable_nats_exits_with_one_line(
    keys: Keys, files: dict[str, Path]
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    line = one_line_error(
        cli("users", "--nats-url", url, "--nkey-seed-file", str(files["service"]), "list")
    )
    assert str(port) in line


@pytest.mark.parametrize("problem", ["missing", "0644", "account_seed"])
def test_users_refuses_a_bad_seed_file_with_one_line(
    problem: str, keys: Keys, tmp_path: Path, files: dict[str, Path]
) -> None:
    path = {"missing": tmp_path / "nope.nk", "0644": tmp_path / "lax.nk"}.get(
        problem, files["issuer"]
    )
    if problem == "0644":
        path.write_text(keys.service_seed + "\n")
        path.chmod(0o644)
    url = f"nats://127.0.0.1:{free_port()}"
    line = one_line_error(cli("users", "--nats-url", url, "--nkey-seed-file", str(path), "list"))
    assert str(path) in line
    if problem == "0644":
        assert "chmod" in line


# ---------------------------------------------------------------------------------------------
# serve: logs and shutdown
# ---------------------------------------------------------------------------------------------
async def test_serve_logs_json_lines_and_stops_cleanly_on_sigterm(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    handle = spawn(serve_args(server, files))
    try:
        await handle.await_event("ready")
        seed, client = new_user()
        result = await raw_connect(server.url, seed)
        assert not result.admitted  # one decision line
        # No bucket yet: the service is up and denies everyone but internal keys.
        decision = await handle.await_event("decision", reason="store_unavailable")
        # One line per decision: the client's public key, the decision, the reason, latency,
        # and the connection (server id and client id, as in the server's INFO).
        assert decision["client"] == client and decision["decision"] == "deny"
        assert isinstance(decision["latency_ms"], int | float)
        assert (decision["server"], decision["cid"]) == (
            result.info["server_id"],
            result.info["client_id"],
        )
        handle.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_logged, handle, "stopped")
        assert await asyncio.to_thread(handle.proc.wait, 10) == 0
    finally:
        kill_quietly(handle)

    events = [d["event"] for d in handle.lines]
    assert events.count("ready") == 1
    assert events.index("ready") < events.index("stopping") < events.index("stopped")
    assert all(line.strip() for line in handle.raw)
    # Every line is a JSON object with an event (the pump keeps only those in `lines`).
    assert len(handle.lines) == len(handle.raw), "\n".join(handle.raw)
    assert all(isinstance(d.get("event"), str) for d in handle.lines)
    assert not any("Traceback" in line for line in handle.raw)
    for secret in (keys.service_seed, keys.issuer_seed, seed):
        assert not any(secret in line for line in handle.raw)


async def test_serve_sigterm_as_soon_as_ready_is_a_clean_stop(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path
) -> None:
    """The "ready" line is what orchestration waits for; a SIGTERM right after it must still
    go through the service's own shutdown (stopping / stopped, exit 0)."""
    server = nats_server()
    files = seed_files(keys, tmp_path / "seeds")
    handle = spawn(serve_args(server, files))
    try:
        await handle.await_event("ready")
        handle.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(handle.proc.wait, 10)
    finally:
        kill_quietly(handle)
    assert code == 0, "\n".join(handle.raw[-10:])
    await asyncio.to_thread(wait_logged, handle, "stopped")
    assert [d["event"] for d in handle.lines].count("stopping") == 1
