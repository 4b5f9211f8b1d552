"""The harness itself, against the real nats-server binary and no callout service."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import nats.errors
import nkeys
import pytest
from nats.aio.msg import Msg

from tests.support.nats import (
    AUTH_SUBJECT,
    VECTOR_PUB,
    VECTOR_SEED,
    Keys,
    NatsServer,
    NatsServerError,
    ServerFactory,
    auth_errors,
    curve_public_from_seed,
    decode_curve_public,
    decode_curve_seed,
    encode_curve_seed,
    free_port,
    make_keys,
    nats_connect,
    nats_server_bin,
    new_user,
    next_event,
    raw_connect,
    render_config,
)

# ---------------------------------------------------------------------------
# keys (no server)
# ---------------------------------------------------------------------------


def test_curve_vector() -> None:
    assert curve_public_from_seed(VECTOR_SEED) == VECTOR_PUB
    raw = decode_curve_seed(VECTOR_SEED)
    assert len(raw) == 32
    assert encode_curve_seed(raw) == VECTOR_SEED
    assert len(decode_curve_public(VECTOR_PUB)) == 32


def test_curve_decode_rejects_corruption() -> None:
    bad = VECTOR_SEED[:-3] + ("A" if VECTOR_SEED[-3] != "A" else "B") + VECTOR_SEED[-2:]
    with pytest.raises(ValueError):
        decode_curve_seed(bad)
    with pytest.raises(ValueError):
        decode_curve_seed(make_keys().service_seed)  # an SU seed is not a curve seed


def test_make_keys_prefixes_and_pairs() -> None:
    k = make_keys()
    assert k.issuer_seed.startswith("SA") and k.issuer_pub.startswith("A")
    assert k.service_seed.startswith("SU") and k.service_pub.startswith("U")
    assert k.xkey_seed.startswith("SX") and k.xkey_pub.startswith("X")
    assert nkeys.from_seed(k.issuer_seed.encode()).public_key.decode() == k.issuer_pub
    assert nkeys.from_seed(k.service_seed.encode()).public_key.decode() == k.service_pub
    assert curve_public_from_seed(k.xkey_seed) == k.xkey_pub
    seed, pub = new_user()
    assert seed.startswith("SU") and pub.startswith("U") and pub != k.service_pub
    assert make_keys() != k


def test_render_config_shape(keys: Keys) -> None:
    text = render_config(
        port=1234,
        keys=keys,
        store_dir="/tmp/js",
        auth_timeout=0.5,
        xkey=True,
        sys_user=("sys", "pw"),
        extra_accounts=["EXTRA"],
    )
    assert 'listen: "127.0.0.1:1234"' in text
    assert f'issuer: "{keys.issuer_pub}"' in text
    assert f'xkey: "{keys.xkey_pub}"' in text
    assert f'auth_users: [ "{keys.service_pub}", "sys" ]' in text
    assert "timeout: 0.5" in text and '"EXTRA" {}' in text
    with pytest.raises(ValueError):
        render_config(port=1, keys=keys, jetstream=True)
    assert "jetstream" not in render_config(port=1, keys=keys, jetstream=False)


# ---------------------------------------------------------------------------
# server lifecycle + nats-py as the service identity
# ---------------------------------------------------------------------------


def test_binary_found() -> None:
    assert nats_server_bin().endswith("nats-server")


async def test_service_identity_connects_and_uses_jetstream(
    nats_server: ServerFactory, keys: Keys
) -> None:
    srv = nats_server(http=True)
    assert srv.is_running() and "Server is ready" in srv.log_text()
    nc = await nats_connect(srv.url, keys.service_seed)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket="users")
        await kv.put("alice", b'{"enabled":true}')
        entry = await kv.get("alice")
        assert entry.value == b'{"enabled":true}'
        info = nc._server_info  # server INFO as seen by nats-py
        assert "nonce" in info  # nkey users configured => nonce (docs/protocol.md §1)
    finally:
        await nc.close()


async def test_restart_keeps_port_and_jetstream_store(
    nats_server: ServerFactory, keys: Keys
) -> None:
    srv = nats_server()
    url, first_pid = srv.url, srv.pid
    nc = await nats_connect(srv.url, keys.service_seed)
    kv = await nc.jetstream().create_key_value(bucket="users")
    await kv.put("bob", b"1")
    await nc.close()

    await srv.arestart()
    assert srv.url == url and srv.pid != first_pid
    assert srv.log_text().count("Server is ready") == 2

    nc = await nats_connect(srv.url, keys.service_seed)
    try:
        kv = await nc.jetstream().key_value("users")
        assert (await kv.get("bob")).value == b"1"
    finally:
        await nc.close()


def test_stop_and_kill_and_context_manager(tmp_path: Path, keys: Keys) -> None:
    base = tmp_path
    with NatsServer.from_keys(base / "a", keys, jetstream=False) as srv:
        assert srv.is_running()
    assert not srv.is_running()
    assert srv.proc is not None and srv.proc.returncode is not None

    srv2 = NatsServer.from_keys(base / "b", keys, jetstream=False).start()
    assert srv2.kill() == -9
    assert not srv2.is_running()


def test_start_failure_reports_log(tmp_path: Path) -> None:
    port = free_port()
    srv = NatsServer(f"listen: 127.0.0.1:{port}\nbogus_block {{{{{{\n", port=port, workdir=tmp_path)
    with pytest.raises(NatsServerError, match=r"(?s)exited with code 1.*Parse error"):
        srv.start()
    assert not srv.is_running()


def test_reload(nats_server: ServerFactory) -> None:
    srv = nats_server(jetstream=False)
    good = srv.config
    assert "timeout: 2.0" in good
    srv.reload(good.replace("timeout: 2.0", "timeout: 1.5"))
    assert "Reloaded server configuration" in srv.log_since_start()
    with pytest.raises(NatsServerError, match="unknown field"):
        srv.reload(good + "no_such_option: 1\n")
    assert srv.is_running()
    assert "no_such_option" not in srv.conf_path.read_text()


# ---------------------------------------------------------------------------
# raw client protocol
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["rawurl", "std"])
async def test_raw_connect_known_nkey_admitted(
    nats_server: ServerFactory, keys: Keys, encoding: str
) -> None:
    # The service nkey is a configured auth_user: the server verifies the sig itself
    # (RawURL first, then std base64; docs/protocol.md §1) and does not call out.
    srv = nats_server(jetstream=False, auth_timeout=0.5)
    res = await raw_connect(srv.url, keys.service_seed, sig_encoding=encoding)  # type: ignore[arg-type]
    assert res.admitted, res.error
    assert res.error is None
    assert isinstance(res.info.get("nonce"), str) and len(res.info["nonce"]) > 0
    assert len(res.connect["sig"]) == (86 if encoding == "rawurl" else 88)
    assert res.elapsed < 0.5


async def test_raw_connect_forged_known_nkey_denied_without_callout(
    nats_server: ServerFactory, keys: Keys
) -> None:
    # Sign with another key but claim the service nkey: local nkey auth fails and
    # an auth_users member is not called out (§5), so the deny is immediate.
    srv = nats_server(jetstream=False, auth_timeout=0.5)
    other_seed, _ = new_user()
    res = await raw_connect(srv.url, other_seed, nkey=keys.service_pub)
    assert not res.admitted
    assert res.error == "Authorization Violation"
    assert res.elapsed < 0.4
    assert res.connect["nkey"] == keys.service_pub

    res = await raw_connect(srv.url, keys.service_seed, sign_nonce_override=b"not-the-nonce")
    assert not res.admitted and res.error == "Authorization Violation"

    res = await raw_connect(srv.url, keys.service_seed, sig="omit")
    assert not res.admitted and "sig" not in res.connect


async def test_raw_conn_publish_reports_permission_violation(
    nats_server: ServerFactory, keys: Keys
) -> None:
    # auth_users get a pub deny on $SYS.REQ.USER.AUTH (docs/protocol.md §3 check 16).
    srv = nats_server(jetstream=False)
    res = await raw_connect(srv.url, keys.service_seed, keep_open=True)
    assert res.admitted and res.conn is not None
    async with res.conn as conn:
        assert await conn.publish("ok.subject", b"hi") is None
        err = await conn.publish(AUTH_SUBJECT, b"hi")
        assert err is not None and err.startswith("Permissions Violation for Publish")
        _sid, sub_err = await conn.subscribe("echo")
        assert sub_err is None
        assert await conn.publish("echo", b"back") is None
        assert [(m.subject, m.payload) for m in conn.messages] == [("echo", b"back")]


async def test_unknown_nkey_without_service_times_out(
    nats_server: ServerFactory, keys: Keys
) -> None:
    timeout = 0.5
    srv = nats_server(jetstream=False, auth_timeout=timeout)
    seed, _ = new_user()
    res = await raw_connect(srv.url, seed)
    assert not res.admitted
    assert res.error == "Authorization Violation"
    # No fast-fail on no interest: the full authorization.timeout (docs/protocol.md §3).
    assert timeout * 0.8 <= res.elapsed < timeout + 1.0


async def test_empty_reply_denies_fast_with_reason(nats_server: ServerFactory, keys: Keys) -> None:
    srv = nats_server(jetstream=False, auth_timeout=2)
    svc = await nats_connect(srv.url, keys.service_seed)
    try:
        events = await auth_errors(svc)
        requests: asyncio.Queue[Msg] = asyncio.Queue()

        async def deny_all(msg: Msg) -> None:
            requests.put_nowait(msg)
            await msg.respond(b"")  # empty body = immediate deny (docs/protocol.md §3 check 1)

        await svc.subscribe(AUTH_SUBJECT, queue="harness", cb=deny_all)
        await svc.flush()

        seed, pub = new_user()
        res = await raw_connect(srv.url, seed)
        assert not res.admitted
        assert res.error == "Authorization Violation"
        assert res.elapsed < 1.0  # well under the 2 s timeout

        req = await asyncio.wait_for(requests.get(), 1)
        assert req.data.startswith(b"eyJ")  # plaintext request JWT (§1)
        claims = req.data.split(b".")[1]
        decoded = base64.urlsafe_b64decode(claims + b"=" * (-len(claims) % 4))
        assert pub.encode() in decoded  # connect_opts.nkey is the client's key

        event = await next_event(events, lambda e: "no reason supplied" in e.get("reason", ""))
        assert "Auth callout violation" in event["reason"]
        assert event["reason"].endswith('on account "AUTH"')
    finally:
        await svc.close()


async def test_nats_py_client_denied_by_empty_reply(nats_server: ServerFactory, keys: Keys) -> None:
    srv = nats_server(jetstream=False, auth_timeout=2)
    svc = await nats_connect(srv.url, keys.service_seed)
    try:

        async def deny_all(msg: Msg) -> None:
            await msg.respond(b"")

        await svc.subscribe(AUTH_SUBJECT, cb=deny_all)
        await svc.flush()
        seed, _ = new_user()
        with pytest.raises(nats.errors.Error, match=r"(?i)authorization violation"):
            await nats_connect(srv.url, seed)
    finally:
        await svc.close()
