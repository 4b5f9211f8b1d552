"""Operator (decentralized) mode against a real nats-server 2.15.1: accounts as JWTs in the
memory resolver, the callout configured in the AUTH account's JWT, the service running as
`callout serve --operator --creds ...` (a subprocess, so the flags and the .creds path are
what is tested), users placed in the account whose key signed their JWT (docs/protocol.md §3
checks 8, 14, 15; §5 "Minimal working operator mode").

Clients have no credentials of their own: they present their nkey, and the server's
`default_sentinel` (a bearer user of AUTH that may do nothing) sends them to the callout.

A bystander in AUTH watches `$SYS.REQ.USER.AUTH` and the server's reply inboxes, to check
what went over the wire (who signed what, `issuer_account`, encryption).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from tests.support.admission import (
    AUTH_VIOLATION,
    SERVICE_ERROR,
    granted,
    info_as,
    jwt_claims,
    perms,
)
from tests.support.nats import (
    NatsServer,
    auth_errors,
    free_port,
    nats_connect,
    new_user,
    next_event,
    raw_connect,
)
from tests.support.service import Subprocess, Wire, record, run_cli, spawn, users_bucket, watch
from tests.support.trust import Trust, creds_text, render_operator_config, write_secret

USER_INFO = "$SYS.REQ.USER.INFO"
XKEY_HEADER = "Nats-Server-Xkey"
# Enough to read one's own USER.INFO: what every admitted user below is given.
INFO_PUB, INFO_SUB = [USER_INFO], ["_INBOX.>"]


@dataclass
class Deployment:
    """One operator-mode server, the service's files, and an AUTH connection (the service's
    own creds) that reads the users bucket, the AUTH.ERR events and the wire."""

    trust: Trust
    server: NatsServer
    files: dict[str, Path]
    admin: Client
    events: asyncio.Queue[dict[str, Any]]
    wire: Wire
    services: list[Subprocess] = field(default_factory=list)

    def serve_args(
        self,
        *extra: str,
        issuer: str = "auth",
        signer: str = "app_signing",
        xkey: bool = False,
    ) -> list[str]:
        """`callout serve --operator`: `issuer` and `signer` name seed files (`auth`,
        `auth_signing`; `app`, `app_signing`)."""
        args = [
            "serve", "--operator",
            "--nats-url", self.server.url,
            "--creds", str(self.files["creds"]),
            "--issuer-seed-file", str(self.files[issuer]),
            "--account", "APP",
            "--account-signer", f"APP:{self.trust.app.pub}:{self.files[signer]}",
            "--system-account", self.trust.sys.pub,
        ]  # fmt: skip
        if xkey:
            args += ["--xkey-seed-file", str(self.files["xkey"])]
        return [*args, *extra]

    async def serve(self, *extra: str, **kw: Any) -> Subprocess:
        service = spawn(self.serve_args(*extra, **kw))
        self.services.append(service)
        await service.await_event("ready")
        return service

    async def put(self, pub: str, value: bytes) -> None:
        kv = await users_bucket(self.admin)
        await kv.put(pub, value)

    async def reason(self, user: str) -> str:
        event = await next_event(self.events, lambda e: e.get("client", {}).get("user") == user)
        reason: str = event["reason"]
        return reason

    async def expect_denied(self, seed: str, reason: str, **raw: Any) -> dict[str, Any]:
        """Denied with exactly the service's reason; returns the CONNECT that was sent."""
        result = await raw_connect(self.server.url, seed, **raw)
        assert not result.admitted
        assert result.error == AUTH_VIOLATION
        assert await self.reason(result.connect["nkey"]) == SERVICE_ERROR + reason
        return result.connect


Start = Callable[..., Awaitable[Deployment]]


@pytest.fixture
async def operator(tmp_path: Path) -> AsyncIterator[Start]:
    """Factory: `await operator(xkey=False, allowed_accounts=None)` -> a started deployment.
    Everything it started is stopped at teardown, even if the test failed."""
    deployments: list[Deployment] = []

    async def start(*, xkey: bool = False, allowed_accounts: list[str] | None = None) -> Deployment:
        trust = Trust()
        workdir = tmp_path / f"op{len(deployments)}"
        port = free_port()
        config = render_operator_config(
            trust,
            port=port,
            store_dir=workdir / "js",
            xkey=xkey,
            allowed_accounts=allowed_accounts,
        )
        server = NatsServer(config, port=port, workdir=workdir)
        await server.astart()
        keys = workdir / "keys"
        files = {
            "creds": write_secret(
                keys / "service.creds", creds_text(trust.service_jwt(), trust.service.seed)
            ),
            **{
                name: write_secret(keys / f"{name}.nk", getattr(trust, name).seed)
                for name in ("auth", "auth_signing", "app", "app_signing", "other", "xkey")
            },
        }
        try:
            admin = await nats_connect(server.url, user_credentials=str(files["creds"]))
        except BaseException:
            server.stop()
            raise
        wire = await watch(admin)
        dep = Deployment(trust, server, files, admin, await auth_errors(admin), wire)
        deployments.append(dep)
        return dep

    try:
        yield start
    finally:
        for dep in reversed(deployments):
            for service in dep.services:
                with contextlib.suppress(Exception):
                    service.kill()
            with contextlib.suppress(Exception):
                await dep.admin.close()
            await dep.server.astop()


def response_claims(msg: Msg) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The response's claims, and those of the user JWT in it (None for a deny)."""
    response = jwt_claims(msg.data)
    user = response["nats"].get("jwt")
    return response, (jwt_claims(user) if user else None)


# ---------------------------------------------------------------------------------------------
# placement by the signing account
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signer", ["app", "app_signing"], ids=["account-key", "signing-key"])
async def test_known_user_is_placed_in_the_account_that_signed_it(
    operator: Start, signer: str
) -> None:
    dep = await operator()
    seed, pub = new_user()
    # `callout users` reaches the bucket with the same .creds file as the service.
    added = await asyncio.to_thread(
        run_cli,
        "users", "--nats-url", dep.server.url, "--creds", str(dep.files["creds"]),
        "add", pub, "--name", "alice",
        "--pub-allow", USER_INFO, "--pub-deny", "orders.secret", "--sub-allow", "_INBOX.>",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    await dep.serve(signer=signer)

    info = await info_as(dep.server.url, seed)
    assert info["account"] == dep.trust.app.pub
    assert info["account_name"] == "APP"
    assert info["user"] == "alice"
    assert granted(info) == perms([USER_INFO], ["orders.secret"], ["_INBOX.>"], [])

    request = jwt_claims((await dep.wire.request()).data)
    response, user = response_claims(await dep.wire.reply())
    assert user is not None
    # The response is the callout account's; the user JWT is APP's, which is what places it.
    assert response["iss"] == dep.trust.auth.pub
    assert "issuer_account" not in response["nats"]
    assert user["sub"] == response["sub"] == request["nats"]["user_nkey"]
    if signer == "app":
        assert user["iss"] == dep.trust.app.pub
        assert "issuer_account" not in user["nats"]
    else:
        assert user["iss"] == dep.trust.app_signing.pub
        assert user["nats"]["issuer_account"] == dep.trust.app.pub


async def test_issuer_may_be_a_signing_key_of_the_callout_account(operator: Start) -> None:
    dep = await operator()
    seed, pub = new_user()
    await dep.put(pub, record("bob", pub_allow=INFO_PUB, sub_allow=INFO_SUB))

    service = await dep.serve("--issuer-account", dep.trust.auth.pub, issuer="auth_signing")
    assert (await info_as(dep.server.url, seed))["account"] == dep.trust.app.pub
    response, _ = response_claims(await dep.wire.reply())
    assert response["iss"] == dep.trust.auth_signing.pub
    assert response["nats"]["issuer_account"] == dep.trust.auth.pub
    service.kill()  # not a shutdown test: the next service must be the only one answering

    # The server checks the signer: a key that is neither AUTH's nor one of its signing keys
    # is refused, whatever `issuer_account` claims (§3 check 8).
    await dep.serve("--issuer-account", dep.trust.auth.pub, issuer="other")
    result = await raw_connect(dep.server.url, seed)
    assert not result.admitted and result.error == AUTH_VIOLATION
    assert await dep.reason(pub) == "Auth callout signing key is unknown"


# ---------------------------------------------------------------------------------------------
# denied
# ---------------------------------------------------------------------------------------------
async def test_nkey_clients_reach_the_callout_through_the_sentinel_and_must_prove_their_key(
    operator: Start,
) -> None:
    dep = await operator()
    seed, pub = new_user()
    stranger, _ = new_user()
    await dep.put(pub, record("carol", pub_allow=INFO_PUB, sub_allow=INFO_SUB))
    await dep.serve()

    legit = await raw_connect(dep.server.url, seed)
    assert legit.admitted, legit.error
    nats = jwt_claims((await dep.wire.request()).data)["nats"]
    # The client's own nkey and nonce signature reach the callout beside the sentinel JWT.
    assert nats["connect_opts"]["nkey"] == pub
    assert nats["connect_opts"]["sig"] == legit.connect["sig"]
    assert nats["client_info"]["nonce"] == legit.info["nonce"]
    assert "jwt" in nats["connect_opts"]

    await dep.expect_denied(stranger, "unknown_user")
    # The known key, signed by someone else: the server does not check it; the service does.
    await dep.expect_denied(stranger, "bad_signature", nkey=pub)
    await dep.expect_denied(seed, "no_signature", sig="omit")


async def test_record_naming_an_account_without_a_signer_is_denied(operator: Start) -> None:
    # AUTH lets the callout place users anywhere (`*`), and OTHER exists on the server: only
    # the service stands between the record and the placement.
    dep = await operator(allowed_accounts=["*"])
    seed, pub = new_user()
    await dep.put(pub, record("olga", admin=True, account="OTHER"))
    await dep.serve()
    await dep.expect_denied(seed, "account_not_allowed")


async def test_xkey_encrypts_both_ways_in_operator_mode(operator: Start) -> None:
    dep = await operator(xkey=True)
    seed, pub = new_user()
    stranger, _ = new_user()
    await dep.put(pub, record("dave", pub_allow=INFO_PUB, sub_allow=INFO_SUB))
    await dep.serve(xkey=True)

    assert (await info_as(dep.server.url, seed))["account"] == dep.trust.app.pub
    await dep.expect_denied(stranger, "unknown_user")
    for _ in range(2):
        request, reply = await dep.wire.request(), await dep.wire.reply()
        assert (request.headers or {}).get(XKEY_HEADER, "").startswith("X")
        assert request.data.startswith(b"xkv1")
        assert reply.data.startswith(b"xkv1")


# ---------------------------------------------------------------------------------------------
# configuration mistakes: one line, before connecting
# ---------------------------------------------------------------------------------------------
def one_line(args: list[str]) -> str:
    done = run_cli(*args, timeout=30)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_serve_refuses_an_allowed_account_without_a_signer(tmp_path: Path) -> None:
    trust = Trust()
    creds = write_secret(tmp_path / "s.creds", creds_text(trust.service_jwt(), trust.service.seed))
    auth = write_secret(tmp_path / "auth.nk", trust.auth.seed)
    app = write_secret(tmp_path / "app.nk", trust.app.seed)
    base = [
        "serve", "--nats-url", "nats://127.0.0.1:1", "--creds", str(creds),
        "--issuer-seed-file", str(auth), "--account", "APP", "--system-account", trust.sys.pub,
    ]  # fmt: skip
    signer = ["--account-signer", f"APP:{trust.app.pub}:{app}"]
    line = one_line([*base, "--operator", *signer, "--allowed-account", "APP",
                     "--allowed-account", "OTHER"])  # fmt: skip
    assert "OTHER" in line and "--account-signer" in line
    assert "--operator" in one_line([*base, *signer])
    assert "APP" in one_line([*base, "--operator", "--account-signer", f"APP:{trust.app.pub}"])


def test_serve_refuses_a_signer_for_the_system_account_by_key(tmp_path: Path) -> None:
    """Forbidden accounts were checked by name only: `--account-signer APP:<the system
    account's key>` would place users in the system account under the name APP."""
    trust = Trust()
    creds = write_secret(tmp_path / "s.creds", creds_text(trust.service_jwt(), trust.service.seed))
    auth = write_secret(tmp_path / "auth.nk", trust.auth.seed)
    sys_seed = write_secret(tmp_path / "sys.nk", trust.sys.seed)
    app = write_secret(tmp_path / "app.nk", trust.app.seed)
    base = [
        "serve", "--operator", "--nats-url", "nats://127.0.0.1:1", "--creds", str(creds),
        "--issuer-seed-file", str(auth), "--account", "APP",
    ]  # fmt: skip
    line = one_line(
        [*base, "--system-account", trust.sys.pub,
         "--account-signer", f"APP:{trust.sys.pub}:{sys_seed}"]
    )  # fmt: skip
    assert "--account-signer APP" in line and "system account" in line
    # Known by its key, or not at all: a name cannot be checked against a signer's key.
    line = one_line([*base, "--account-signer", f"APP:{trust.app.pub}:{app}"])
    assert "--system-account" in line and "public key" in line


def test_creds_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    trust = Trust()
    creds = write_secret(tmp_path / "s.creds", creds_text(trust.service_jwt(), trust.service.seed))
    creds.chmod(0o644)
    line = one_line(["users", "--nats-url", "nats://127.0.0.1:1", "--creds", str(creds), "list"])
    assert "chmod 600" in line


@pytest.mark.parametrize("issuer", ["account-key", "signing-key"])
def test_serve_refuses_to_place_users_in_the_callout_account(tmp_path: Path, issuer: str) -> None:
    """Placement is by the key that signs the user JWT (§3 check 15), so the refusal of the
    callout account by *name* does not apply: a signer that is AUTH's own key would put users
    in AUTH, next to the users bucket and the callout subject. Refused before connecting."""
    trust = Trust()
    creds = write_secret(tmp_path / "s.creds", creds_text(trust.service_jwt(), trust.service.seed))
    auth = write_secret(tmp_path / "auth.nk", trust.auth.seed)
    auth_signing = write_secret(tmp_path / "auth-signing.nk", trust.auth_signing.seed)
    if issuer == "account-key":
        flags = [
            "--issuer-seed-file",
            str(auth),
            "--account-signer",
            f"APP:{trust.auth.pub}:{auth}",
        ]
    else:
        flags = [
            "--issuer-seed-file", str(auth_signing), "--issuer-account", trust.auth.pub,
            "--account-signer", f"APP:{trust.auth.pub}:{auth_signing}",
        ]  # fmt: skip
    line = one_line(
        ["serve", "--operator", "--nats-url", "nats://127.0.0.1:1", "--creds", str(creds),
         "--account", "APP", *flags]
    )  # fmt: skip
    assert "--account-signer APP" in line and "callout account" in line
