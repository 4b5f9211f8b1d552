"""Seeds, signatures and JWTs never reach the logs.

Scanning every log of the whole suite would tie this test to every other one; instead one
representative session runs here, with xkey on, and ALL of its output is scanned:

- the service in-process: every record of the `callout` logger and of the root logger (the
  libraries'), message, fields and any traceback text, and the process's stdout/stderr;
- `callout serve` as a subprocess (`--log-level debug`): its whole stderr;
- the CLI: `keys generate`, `users add/get/list/revoke` (successes and user errors),
  `connect`: stdout and stderr.

Through it go admits (a record, an internal key, both sig encodings), denies of every gate
(unknown, revoked, invalid record, forbidden account, bad and missing signatures, no nkey,
user/password and token clients) and the whole hostile corpus (tests/hostile/) injected on
`$SYS.REQ.USER.AUTH`. A bystander in the callout account collects every `sig` the clients
sent, and every seed in play is known, so the scan looks for those exact strings as well as
for their shapes: a seed (`S` + key-type letter + 56 base32 characters), a JWT (`eyJ`), a
base64 run of 80 characters or more (a signature is 86 or 88), and a sealed payload (`xkv1`).

`test_scanner_catches_planted_secrets` shows the scanner can fail.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nacl.public
import orjson
import pytest
from nats.aio.msg import Msg

from callout.decision import Decision
from tests.support.hostile import HOSTILE, Case, auth_account_body, hostile_account_body, load_all
from tests.support.hygiene import KNOWN_LEAKS, scan
from tests.support.nats import (
    AUTH_SUBJECT,
    Keys,
    NatsServer,
    ServerFactory,
    decode_curve_public,
    decode_curve_seed,
    nats_connect,
    new_user,
    raw_connect,
)
from tests.support.operate import captured_logs
from tests.support.service import (
    InProcess,
    Subprocess,
    record,
    run_cli,
    seed_files,
    serve_args,
    spawn,
    start_in_process,
    users_bucket,
    wait_logged,
)


# ---------------------------------------------------------------------------------------------
# the scanner can fail
# ---------------------------------------------------------------------------------------------
def test_scanner_catches_planted_secrets() -> None:
    seed, _ = new_user()
    signature = bytes(range(64))
    clean = json.dumps(
        {
            "event": "decision",
            "client": new_user()[1],
            "reason": "bad_signature",
            "detail": "seed file /tmp/pytest-of-root/pytest-1/test_session_x0/keys/service.nk "
            "is readable by group or others",
            "latency_ms": 0.4,
        }
    )
    assert scan(clean) == []
    planted = {
        "seed": seed,
        "account seed": "SAAI6C6AF5T4JJBM3LCQ2I4GFAH2WPG2J7OGJP6KHDLGHTIXBLM3Y6PDEQ",
        "jwt": "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln",
        "rawurl sig": base64.urlsafe_b64encode(signature).decode().rstrip("="),
        "std sig": base64.b64encode(signature).decode(),
        "sealed": "xkv1\x00\x01",
    }
    for what, secret in planted.items():
        assert scan(f'{clean[:-1]}, "x": "{secret}"}}'), f"missed a planted {what}"
    assert scan(clean + " short", {"short"}) == ["known secret short..."]


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------
class Capture(logging.Handler):
    """Everything a formatter could print from a record: the message, every field, and the
    full traceback text (stricter than the JSON formatter, which prints only its type)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        line = f"{record.name} {record.getMessage()} {json.dumps(fields, default=str)}"
        if record.exc_info:
            line += " " + "".join(traceback.format_exception(*record.exc_info))
        self.lines.append(line)


@pytest.fixture
def captured() -> Iterator[Capture]:
    with captured_logs(Capture(), root=True) as handler:
        yield handler


# ---------------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------------
@dataclass
class Clients:
    """Seeds of the session's clients, by role, and every secret in play."""

    keys: Keys
    seeds: dict[str, str] = field(default_factory=dict)
    sigs: set[str] = field(default_factory=set)

    def add(self, role: str) -> tuple[str, str]:
        seed, pub = new_user()
        self.seeds[role] = seed
        return seed, pub

    def secrets(self) -> set[str]:
        k = self.keys
        return {
            *self.seeds.values(),
            *self.sigs,
            k.issuer_seed,
            k.service_seed,
            k.xkey_seed,
            PASSWORD,
            TOKEN,
        }


def sig_of(msg: Msg, xkey_seed: str) -> str | None:
    """The client's `sig` in a request a bystander saw (opened with the service's xkey)."""
    data = msg.data
    header = (msg.headers or {}).get("Nats-Server-Xkey")
    if data.startswith(b"xkv1"):
        try:
            box = nacl.public.Box(
                nacl.public.PrivateKey(decode_curve_seed(xkey_seed)),
                nacl.public.PublicKey(decode_curve_public(header or "")),
            )
            data = box.decrypt(data[28:], data[4:28])
        except Exception:
            return None
    try:
        payload = data.split(b".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
        sig = claims["nats"]["connect_opts"]["sig"]
    except Exception:
        return None
    return sig if isinstance(sig, str) else None


async def inject(svc: InProcess, injector_seed: str, url: str, cases: list[Case]) -> None:
    """Each case's payload on `$SYS.REQ.USER.AUTH`, with the service's clock pinned to the
    case's (its signatures pin exp); one at a time, each awaited on the service's decision."""
    decisions: asyncio.Queue[Decision] = asyncio.Queue()
    svc.service.observers.append(lambda decision, _latency: decisions.put_nowait(decision))
    nc = await nats_connect(url, injector_seed)
    try:
        for case in cases:
            svc.service.clock = lambda case=case: case.now  # type: ignore[misc]
            await nc.publish(AUTH_SUBJECT, case.payload, reply=nc.new_inbox(), headers=case.headers)
            await nc.flush()
            await asyncio.wait_for(decisions.get(), 5)
    finally:
        svc.service.clock = time.time
        svc.service.observers.pop()
        await nc.close()


# A user/password and a token client: their credentials reach the service in the request and
# must not reach its log either.
PASSWORD, TOKEN = "hunter2-password", "t0ken-secret"


async def real_clients(url: str, clients: Clients) -> None:
    """Admits and denies of every gate from real clients (nats-py and hand-rolled CONNECTs)."""
    s = clients.seeds
    for seed in (s["alice"], s["internal"]):
        nc = await nats_connect(url, seed)
        await nc.close()
    admitted = await raw_connect(url, s["alice"], sig_encoding="std")
    assert admitted.admitted, admitted.error
    results = [
        await raw_connect(url, s["stranger"]),  # unknown_user
        await raw_connect(url, s["revoked"]),  # revoked
        await raw_connect(url, s["broken"]),  # record_invalid
        await raw_connect(url, s["sys"]),  # account_not_allowed
        await raw_connect(url, s["alice"], sign_nonce_override=b"another nonce"),  # bad_signature
        await raw_connect(url, s["alice"], sig="omit"),  # no_signature
        await raw_connect(url, s["stranger"], nkey=new_user()[1]),  # bad_signature: other key
        await raw_connect(url, None, connect_extra={"user": "bob", "pass": PASSWORD}),  # no_nkey
        await raw_connect(url, None, connect_extra={"auth_token": TOKEN}),  # no_nkey
    ]
    assert not any(r.admitted for r in results)
    clients.sigs |= {r.connect["sig"] for r in [admitted, *results] if "sig" in r.connect}


def cli(*args: str) -> str:
    done = run_cli(*args)
    return f"$ callout {' '.join(args[:1])} rc={done.returncode}\n{done.stdout}\n{done.stderr}"


async def clis(*commands: tuple[str, ...]) -> list[str]:
    return list(await asyncio.gather(*(asyncio.to_thread(cli, *c) for c in commands)))


async def test_a_whole_session_logs_no_secret(
    nats_server: ServerFactory,
    keys: Keys,
    tmp_path: Path,
    captured: Capture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    clients = Clients(keys)
    injector_seed, injector_pub = clients.add("injector")
    server = nats_server(
        xkey=True,
        extra_auth_users=[injector_pub],
        extra_accounts={
            "AUTH": auth_account_body(keys),
            HOSTILE: hostile_account_body(injector_pub),
        },
    )
    files = seed_files(keys, tmp_path / "keys")
    url, service_file = server.url, str(files["service"])
    users = ("users", "--nats-url", url, "--nkey-seed-file", service_file)
    outputs: list[str] = []

    # The CLI: records in, and the mistakes a user makes. Independent commands run together
    # (each is a Python start-up); the first `users` command creates the bucket.
    _, alice = clients.add("alice")
    _, revoked = clients.add("revoked")
    outputs = await clis(
        ("keys", "generate", "--out", str(tmp_path / "generated")),
        (*users, "add", alice, "--name", "alice", "--pub-allow", "orders.>"),
    )
    generated = {p.read_text().strip() for p in (tmp_path / "generated").iterdir()}
    outputs += await clis(
        (*users, "add", alice, "--name", "again"),  # duplicate: exit 2
        (*users, "add", revoked, "--name", "soon-revoked"),
        (*users, "get", new_user()[1]),  # absent: exit 1
        (*users, "add", "UNOTAKEY"),  # invalid key: exit 2
        (*users, "add", new_user()[1], "--pub-allow", "orders new"),  # invalid subject: exit 2
    )
    outputs += await clis((*users, "revoke", revoked), (*users, "get", alice), (*users, "list"))
    admin = await nats_connect(url, keys.service_seed)
    kv = await users_bucket(admin)
    _, broken = clients.add("broken")
    _, sys_user = clients.add("sys")
    _, internal = clients.add("internal")
    clients.add("stranger")
    await kv.put(broken, record("broken", pub_allow=["orders new"]))
    await kv.put(sys_user, record("sys", account="SYS"))
    seen: list[Msg] = []

    async def bystander(msg: Msg) -> None:
        seen.append(msg)

    await admin.subscribe(AUTH_SUBJECT, cb=bystander)
    await admin.flush()
    # bad_nkey_jwt claims an nkey that looks like a JWT, and the service logs claimed nkeys
    # verbatim: that leak has its own (expected-failure) test below.
    corpus = [c for c in load_all() if c.name not in KNOWN_LEAKS]
    try:
        # In-process, xkey on: real clients, then the corpus's sealed cases ...
        svc = await start_in_process(server, keys, xkey=True, internal_keys=(internal,))
        try:
            await real_clients(url, clients)
            await inject(svc, injector_seed, url, [c for c in corpus if c.xkey])
        finally:
            await svc.stop()
        # ... and, for a service without an xkey, the plaintext ones (every gate's denies).
        svc = await start_in_process(server, keys)
        try:
            await inject(svc, injector_seed, url, [c for c in corpus if not c.xkey])
        finally:
            await svc.stop()

        # `callout serve`, xkey on, debug logs.
        served: Subprocess = spawn(
            serve_args(server, files, "--log-level", "debug", "--internal-key", internal, xkey=True)
        )
        try:
            await served.await_event("ready")
            await real_clients(url, clients)
            alice_file = str(seed_file(tmp_path, "alice", clients.seeds["alice"]))
            outputs += await clis(("connect", "--nats-url", url, "--nkey-seed-file", alice_file))
        finally:
            assert served.terminate() == 0
        await asyncio.to_thread(wait_logged, served, "stopped")
    finally:
        await admin.close()

    clients.sigs |= {s for s in (sig_of(m, keys.xkey_seed) for m in seen) if s}
    assert len(clients.sigs) >= 10, "the bystander saw the clients' signatures"
    out, err = capfd.readouterr()
    logs = {
        "in-process logger": "\n".join(captured.lines),
        "in-process stdout/stderr": out + err,
        "callout serve stderr": "\n".join(served.raw),
        "CLI output": "\n".join(outputs),
    }
    # The logs are not empty of decisions: every gate's denies were logged.
    reasons = set(re.findall(r'"reason": "([a-z_]+)"', logs["in-process logger"]))
    reasons |= {d.get("reason") for d in served.events("decision")}
    assert {
        "admit",
        "internal",
        "unknown_user",
        "revoked",
        "record_invalid",
        "account_not_allowed",
        "bad_signature",
        "no_signature",
        "no_nkey",
        "request_malformed",
        "request_forged",
        "xkey_failed",
        "request_expired",
        "bad_nkey",
    } <= reasons, reasons
    secrets = clients.secrets() | generated
    findings = {where: scan(text, secrets) for where, text in logs.items()}
    assert not any(findings.values()), {k: v[:10] for k, v in findings.items() if v}


def seed_file(directory: Path, name: str, seed: str) -> Path:
    path = directory / f"{name}.nk"
    path.write_text(seed + "\n")
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------------------------------
# known leaks (strict expected failures: fixing them fails these, so the mark comes off)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("claimed", ["seed", "jwt"])
async def test_a_claimed_nkey_that_is_not_a_key_is_not_logged(
    server: NatsServer, keys: Keys, captured: Capture, claimed: str
) -> None:
    svc = await start_in_process(server, keys)
    seed, _ = new_user()
    # A client misconfigured with its seed in `nkey`, or one sending something JWT-shaped.
    nkey = seed if claimed == "seed" else "eyJhbGciOiJub25lIn0"
    try:
        result = await raw_connect(server.url, seed, nkey=nkey)
        assert not result.admitted
    finally:
        await svc.stop()
    assert any('"bad_nkey"' in line for line in captured.lines)
    assert scan("\n".join(captured.lines), {seed}) == []


def test_a_seed_given_as_a_key_is_not_echoed(
    server: NatsServer, keys: Keys, tmp_path: Path
) -> None:
    files = seed_files(keys, tmp_path)
    seed, _ = new_user()
    done = run_cli(
        "users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]), "get", seed
    )
    assert done.returncode == 2
    assert scan(done.stdout + done.stderr, {seed}) == []
