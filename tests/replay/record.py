"""Record real authorization requests from nats-server for the replay tests.

Run by hand (it is not a test): ``.venv/bin/python -m tests.replay.record``.

It starts the real nats-server twice, in config mode (docs/protocol.md §5): once plain,
once with ``auth_callout.xkey`` (encrypted requests, §2). A recorder connects as the service
identity (an ``auth_users`` nkey), subscribes to ``$SYS.REQ.USER.AUTH`` and, for every
request, saves the payload bytes and headers exactly as nats-py hands them to the service,
then answers with an empty body (an immediate deny, §3 check 1) so each client finishes at
once. A fixed script of clients connects meanwhile, one at a time; each request is matched
to its client by the claimed nkey / user name in the request, never by arrival order alone.

Output (committed; all keys are throw-away test keys):

- ``tests/replay/cases/<mode>_<client>.jsonl``: a recording, in the format ``callout serve
  --record-dir`` writes (``callout.recording``), of the one request: ``received_at`` (the
  recorder's wall clock when the request arrived: the replay's fixed clock), ``headers``,
  ``token_b64`` (the request as the server signed it; for an encrypted one the box opened,
  with ``opened_with`` the xkey that opened it), the decoded ``request`` and, as its
  ``decision``, the one the admission rules demand. Unlike the service's recordings it has no
  policy line (the policy is keys.json's, given as flags) and it keeps the token of a
  user/password or token client (throw-away credentials), which the service would redact;
- ``tests/replay/cases.json``: for each case, what the script did (``client``) and the store
  the replay answers from (``users``: public key -> record, or null for "no record");
- ``tests/replay/keys.json``: issuer, service and xkey seeds, the internal keys and the
  account configuration the expectations assume.

The expectations are written here from the admission rules, not computed by ``callout``: the
replay test then checks the sans-I/O core against them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.public
import nats
from nats.aio.client import Client as NATSClient
from nats.aio.msg import Msg

from tests.support.nats import (
    AUTH_SUBJECT,
    Keys,
    NatsServer,
    decode_curve_public,
    decode_curve_seed,
    make_keys,
    nats_connect,
    new_user,
    raw_connect,
)

HERE = Path(__file__).resolve().parent
CASES = HERE / "cases"
CASES_FILE = HERE / "cases.json"
KEYS_FILE = HERE / "keys.json"
# The recording format the cases are written in (`callout.recording.FORMAT_VERSION`).
FORMAT_VERSION = 2
# connect_opts fields that are credentials: replaced in the decoded `request`, as the
# service's recorder does.
SECRET_FIELDS = ("pass", "auth_token", "jwt")

ACCOUNT = "APP"
CALLOUT_ACCOUNT = "AUTH"
USER_TTL = 3600.0
AUTH_TIMEOUT = 2.0


def record_json(
    name: str,
    *,
    revoked: bool = False,
    account: str | None = None,
    pub_allow: list[str] | None = None,
    sub_allow: list[str] | None = None,
    pub_deny: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "admin": False,
        "revoked": revoked,
        "account": account,
        "permissions": {
            "pub": {"allow": pub_allow or [], "deny": pub_deny or []},
            "sub": {"allow": sub_allow or [], "deny": []},
        },
    }


def expect(reason: str, account: str | None = None) -> dict[str, Any]:
    admit = reason in {"admit", "internal", "would_deny"}
    return {"reason": reason, "admit": admit, "account": account if admit else None}


@dataclass
class Client:
    """One scripted connection attempt and what the service must decide for it."""

    name: str
    description: str
    connect: Callable[[str], Awaitable[Any]]
    # How to find this client's request: connect_opts.nkey, or connect_opts.user/auth_token.
    match: Callable[[dict[str, Any]], bool]
    users: dict[str, dict[str, Any] | None]
    expect: dict[str, Any]


@dataclass
class Recorder:
    nc: NATSClient
    requests: list[tuple[Msg, float]] = field(default_factory=list)

    async def on_msg(self, msg: Msg) -> None:
        # Saved before answering: by the time the client sees its deny, it is in the list.
        self.requests.append((msg, time.time()))
        if msg.reply:
            await self.nc.publish(msg.reply, b"")


def request_token(payload: bytes, headers: dict[str, str] | None, xkey_seed: str) -> bytes:
    """The request as the server signed it: the payload, or the box opened with our xkey."""
    if not payload.startswith(b"xkv1"):
        return payload
    assert headers is not None
    server = nacl.public.PublicKey(decode_curve_public(headers["Nats-Server-Xkey"]))
    ours = nacl.public.PrivateKey(decode_curve_seed(xkey_seed))
    return nacl.public.Box(ours, server).decrypt(payload[28:], payload[4:28])


def token_claims(token: bytes) -> Any:
    body = token.split(b".")[1]
    return json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))


def request_claims(payload: bytes, headers: dict[str, str] | None, xkey_seed: str) -> Any:
    """Decode (decrypt when needed) a request without verifying it: to match it to a client."""
    return token_claims(request_token(payload, headers, xkey_seed))


def recording_line(
    payload: bytes,
    headers: dict[str, str] | None,
    received_at: float,
    expected: dict[str, Any],
    keys: dict[str, Any],
) -> dict[str, Any]:
    """One request as a recording line (format `FORMAT_VERSION`), its decision `expected`.
    `keys` holds the xkey seed and public key (keys.json's `xkey_seed`, `xkey_pub`)."""
    token = request_token(payload, headers, keys["xkey_seed"])
    claims = token_claims(token)
    options = claims["nats"].get("connect_opts") or {}
    nkey = options.get("nkey")
    if any(name in options for name in SECRET_FIELDS):
        options = {**options, **{n: "[REDACTED]" for n in SECRET_FIELDS if n in options}}
        claims = {**claims, "nats": {**claims["nats"], "connect_opts": options}}
    encrypted = payload.startswith(b"xkv1")
    line: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "received_at": received_at,
        "client": nkey if isinstance(nkey, str) else "",
        "encrypted": encrypted,
        "headers": headers,
        "raw": "kept",
        "token_b64": base64.b64encode(token).decode(),
    }
    if encrypted:
        line["opened_with"] = keys["xkey_pub"]
    line["request"] = claims
    admit = expected["admit"]
    line["decision"] = {
        "outcome": "admit" if admit else "deny",
        "reason": expected["reason"],
        "admit": admit,
        "account": expected["account"],
        "detail": "",
    }
    return line


def write_cases(cases: dict[str, dict[str, Any]], keys: dict[str, Any]) -> None:
    """Each case as a recording of its one request, and what the tests need beside it."""
    if CASES.exists():
        for old in CASES.glob("*.jsonl"):
            old.unlink()
    CASES.mkdir(exist_ok=True)
    beside: dict[str, Any] = {}
    for name, case in sorted(cases.items()):
        line = recording_line(
            base64.b64decode(case["payload_b64"]),
            case["headers"],
            case["received_at"],
            case["expect"],
            keys,
        )
        (CASES / f"{name}.jsonl").write_text(json.dumps(line, sort_keys=True) + "\n")
        beside[name] = {"client": case["client"], "users": case["users"]}
    CASES_FILE.write_text(json.dumps(beside, indent=2, sort_keys=True) + "\n")


def script(keys: Keys, internal: tuple[str, str]) -> list[Client]:
    known_seed, known_pub = new_user()
    raw_seed, raw_pub = new_user()
    unknown_seed, unknown_pub = new_user()
    revoked_seed, revoked_pub = new_user()
    nosig_seed, nosig_pub = new_user()
    nonce_seed, nonce_pub = new_user()
    other_seed, _ = new_user()
    sys_seed, sys_pub = new_user()
    internal_seed, internal_pub = internal

    known_record = record_json(
        "alice", pub_allow=["orders.>", "$SYS.REQ.USER.INFO"], sub_allow=["_INBOX.>"]
    )
    raw_record = record_json("bob", pub_allow=["bob.*"], pub_deny=["bob.secret"])

    def by_nkey(pub: str) -> Callable[[dict[str, Any]], bool]:
        return lambda claims: claims["nats"].get("connect_opts", {}).get("nkey") == pub

    async def quiet(_exc: Exception) -> None:
        return None

    async def natspy(url: str) -> None:
        try:
            nc = await nats_connect(url, known_seed, connect_timeout=5, error_cb=quiet)
        except Exception:  # the recorder denies everyone: this is the expected path
            return
        await nc.close()
        raise RuntimeError("the recorder denies everyone; nats-py was admitted")

    def raw(seed: str | None, **kwargs: Any) -> Callable[[str], Awaitable[Any]]:
        return lambda url: raw_connect(url, seed, **kwargs)

    return [
        Client(
            "known_natspy",
            "known user, nats-py 2.x (sig: padded standard base64)",
            natspy,
            by_nkey(known_pub),
            {known_pub: known_record},
            expect("admit", ACCOUNT),
        ),
        Client(
            "known_rawurl",
            "known user, raw CONNECT with a RawURL sig (as Go clients send)",
            raw(raw_seed, sig_encoding="rawurl"),
            by_nkey(raw_pub),
            {raw_pub: raw_record},
            expect("admit", ACCOUNT),
        ),
        Client(
            "unknown",
            "valid signature, no record",
            raw(unknown_seed),
            by_nkey(unknown_pub),
            {unknown_pub: None},
            expect("unknown_user"),
        ),
        Client(
            "revoked",
            "valid signature, record revoked",
            raw(revoked_seed),
            by_nkey(revoked_pub),
            {revoked_pub: record_json("carol", revoked=True)},
            expect("revoked"),
        ),
        Client(
            "sys_account",
            "valid signature, record places the user in SYS",
            raw(sys_seed),
            by_nkey(sys_pub),
            {sys_pub: record_json("mallory", account="SYS")},
            expect("account_not_allowed"),
        ),
        Client(
            "no_sig",
            "nkey presented without sig (the server calls out anyway, docs/protocol.md §1)",
            raw(nosig_seed, sig="omit"),
            by_nkey(nosig_pub),
            {nosig_pub: record_json("dave")},
            expect("no_signature"),
        ),
        Client(
            "wrong_nonce",
            "sig by the right key over bytes other than this connection's nonce",
            raw(nonce_seed, sign_nonce_override=b"AAAAAAAAAAAAAAA"),
            by_nkey(nonce_pub),
            {nonce_pub: record_json("erin")},
            expect("bad_signature"),
        ),
        Client(
            "known_other_sig",
            "claims the known user's key, signed with another key",
            raw(other_seed, nkey=known_pub),
            by_nkey(known_pub),
            {known_pub: known_record},
            expect("bad_signature"),
        ),
        Client(
            "internal_other_sig",
            "claims the internal key, signed with another key",
            raw(other_seed, nkey=internal_pub),
            by_nkey(internal_pub),
            {},
            expect("bad_signature"),
        ),
        Client(
            "user_password",
            "user/password client (no nkey)",
            raw(None, connect_extra={"user": "bob", "pass": "secret"}),
            lambda c: c["nats"].get("connect_opts", {}).get("user") == "bob",
            {},
            expect("no_nkey"),
        ),
        Client(
            "token",
            "token client (no nkey)",
            raw(None, connect_extra={"auth_token": "s3cr3t-token"}),
            lambda c: c["nats"].get("connect_opts", {}).get("auth_token") == "s3cr3t-token",
            {},
            expect("no_nkey"),
        ),
        Client(
            "internal",
            "internal key (--internal-key), valid RawURL sig: admitted with no store lookup",
            raw(internal_seed),
            by_nkey(internal_pub),
            {},
            expect("internal", ACCOUNT),
        ),
    ]


async def record_mode(
    keys: Keys, internal: tuple[str, str], encrypted: bool, workdir: Path
) -> dict[str, dict[str, Any]]:
    mode = "encrypted" if encrypted else "plain"
    server = NatsServer.from_keys(
        workdir / mode,
        keys,
        jetstream=False,
        auth_timeout=AUTH_TIMEOUT,
        xkey=encrypted,
        callout_account=CALLOUT_ACCOUNT,
        app_account=ACCOUNT,
    ).start()
    cases: dict[str, dict[str, Any]] = {}
    try:
        nc = await nats.connect(server.url, nkeys_seed_str=keys.service_seed)
        recorder = Recorder(nc)
        await nc.subscribe(AUTH_SUBJECT, cb=recorder.on_msg)
        await nc.flush()
        for client in script(keys, internal):
            recorder.requests.clear()
            result = await client.connect(server.url)
            if getattr(result, "admitted", False):
                raise RuntimeError(f"{client.name}: admitted, but the recorder denies everyone")
            mine = [
                (msg, at)
                for msg, at in recorder.requests
                if client.match(request_claims(msg.data, msg.headers, keys.xkey_seed))
            ]
            if len(mine) != 1:
                raise RuntimeError(f"{client.name}: expected 1 request, got {len(mine)}")
            msg, received_at = mine[0]
            if (msg.headers is not None) != encrypted:
                raise RuntimeError(f"{client.name}: headers {msg.headers!r} in {mode} mode")
            cases[f"{mode}_{client.name}"] = {
                "client": client.description,
                "payload_b64": base64.b64encode(msg.data).decode(),
                "headers": dict(msg.headers) if msg.headers is not None else None,
                "received_at": received_at,
                "encrypted": encrypted,
                "users": client.users,
                "expect": client.expect,
            }
        await nc.close()
    finally:
        server.stop()
    return cases


async def main() -> None:
    keys = make_keys()
    internal = new_user()
    workdir = Path(tempfile.mkdtemp(prefix="callout-record-"))
    try:
        cases = await record_mode(keys, internal, False, workdir)
        cases |= await record_mode(keys, internal, True, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    config = {
        "note": "throw-away test keys for tests/replay; never used outside the test suite",
        "issuer_seed": keys.issuer_seed,
        "issuer_pub": keys.issuer_pub,
        "service_seed": keys.service_seed,
        "service_pub": keys.service_pub,
        "xkey_seed": keys.xkey_seed,
        "xkey_pub": keys.xkey_pub,
        "internal_keys": [internal[1]],
        "internal_seeds": [internal[0]],
        "account": ACCOUNT,
        "allowed_accounts": [ACCOUNT],
        "callout_account": CALLOUT_ACCOUNT,
        "mode": "enforce",
        "user_ttl": USER_TTL,
        "server_auth_timeout": AUTH_TIMEOUT,
        "nats_server": "2.15.1",
    }
    KEYS_FILE.write_text(json.dumps(config, indent=2) + "\n")
    write_cases(cases, config)
    print(f"wrote {len(cases)} cases to {CASES} and keys to {KEYS_FILE}", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
