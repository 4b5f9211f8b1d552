"""An operator-mode (decentralized) trust chain for tests: operator, SYS / AUTH / APP accounts
and their user JWTs, `.creds` files, and the nats-server config that trusts them through the
memory resolver (docs/protocol.md §5, "Minimal working operator mode").

Independent of the `callout` package, like `tests.support.nats`: keys come from the `nkeys`
package and the JWTs are encoded here, so a bug in `callout.jwt` cannot hide behind a test
fixture built with the same code. The JSON field names are nats-io/jwt v2's
(`v2/operator_claims.go`, `account_claims.go`, `user_claims.go`, `authorization_claims.go`).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import nkeys

from tests.support.nats import new_account, new_curve, new_user

#: Account limits that mean "no limit": zeros would mean *no* connections (§5).
UNLIMITED: dict[str, Any] = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
#: JetStream on for an account (`IsJSEnabled`: any storage limit non-zero), without limits.
JETSTREAM: dict[str, Any] = {
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
    "max_ack_pending": -1,
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def encode_jwt(claims: Mapping[str, Any], seed: str) -> str:
    """A NATS JWT signed by `seed` (`iss` is set from it): header.payload.sig, base64url
    without padding, Ed25519 over `header.payload` (docs/protocol.md §4)."""
    kp = nkeys.from_seed(seed.encode("ascii"))
    body = {
        "jti": secrets.token_hex(16),
        "iat": int(time.time()),
        **claims,
        "iss": kp.public_key.decode("ascii"),
    }
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}"
    return f"{signing_input}.{_b64(kp.sign(signing_input.encode()))}"


def new_operator() -> tuple[str, str]:
    """A fresh operator nkey: ``(SO... seed, O... public)``."""
    raw = bytes(nacl.signing.SigningKey.generate())
    seed: bytes = nkeys.encode_seed(raw, nkeys.PREFIX_BYTE_OPERATOR)
    return seed.decode("ascii"), nkeys.from_seed(seed).public_key.decode("ascii")


@dataclass(frozen=True)
class KeyPair:
    seed: str
    pub: str


def _account() -> KeyPair:
    return KeyPair(*new_account())


def _user() -> KeyPair:
    return KeyPair(*new_user())


@dataclass(frozen=True)
class Trust:
    """Every key of one operator-mode deployment.

    - `auth`: the callout account; `auth_signing` is one of its signing keys (for
      `--issuer-seed-file` + `--issuer-account`).
    - `app`: where users are placed; `app_signing` is one of its signing keys.
    - `other`: an account the server knows and AUTH allows, that the service is given no
      signer for.
    - `service`: the service's user (an `auth_users` member); `sentinel`: the bearer user of
      `default_sentinel`; `xkey`: the callout account's curve key.
    """

    operator: KeyPair = field(default_factory=lambda: KeyPair(*new_operator()))
    sys: KeyPair = field(default_factory=_account)
    auth: KeyPair = field(default_factory=_account)
    auth_signing: KeyPair = field(default_factory=_account)
    app: KeyPair = field(default_factory=_account)
    app_signing: KeyPair = field(default_factory=_account)
    other: KeyPair = field(default_factory=_account)
    service: KeyPair = field(default_factory=_user)
    sentinel: KeyPair = field(default_factory=_user)
    xkey: KeyPair = field(default_factory=lambda: KeyPair(*new_curve()))

    # -- JWTs -----------------------------------------------------------------------------------
    def operator_jwt(self) -> str:
        claims = {
            "sub": self.operator.pub,
            "name": "OP",
            "nats": {"system_account": self.sys.pub, "type": "operator", "version": 2},
        }
        return encode_jwt(claims, self.operator.seed)

    def account_jwt(
        self,
        account: KeyPair,
        name: str,
        *,
        jetstream: bool = False,
        signing_keys: Sequence[str] = (),
        authorization: Mapping[str, Any] | None = None,
    ) -> str:
        nats: dict[str, Any] = {
            "limits": {**UNLIMITED, **(JETSTREAM if jetstream else {})},
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account",
            "version": 2,
        }
        if signing_keys:
            nats["signing_keys"] = list(signing_keys)
        if authorization is not None:
            nats["authorization"] = dict(authorization)
        return encode_jwt({"sub": account.pub, "name": name, "nats": nats}, self.operator.seed)

    def authorization(self, *, xkey: bool, allowed_accounts: Sequence[str]) -> dict[str, Any]:
        """AUTH's `nats.authorization`: the callout configuration in operator mode (§2, §5)."""
        block: dict[str, Any] = {
            "auth_users": [self.service.pub],
            "allowed_accounts": list(allowed_accounts),
        }
        if xkey:
            block["xkey"] = self.xkey.pub
        return block

    def user_jwt(
        self,
        user_pub: str,
        name: str,
        *,
        issuer_seed: str,
        issuer_account: str | None = None,
        bearer: bool = False,
        deny_all: bool = False,
    ) -> str:
        nats: dict[str, Any] = {
            "pub": {"deny": [">"]} if deny_all else {},
            "sub": {"deny": [">"]} if deny_all else {},
            "subs": -1,
            "data": -1,
            "payload": -1,
            "type": "user",
            "version": 2,
        }
        if bearer:
            nats["bearer_token"] = True
        if issuer_account is not None:
            nats["issuer_account"] = issuer_account
        return encode_jwt({"sub": user_pub, "name": name, "nats": nats}, issuer_seed)

    def service_jwt(self) -> str:
        return self.user_jwt(self.service.pub, "callout", issuer_seed=self.auth.seed)

    def sentinel_jwt(self) -> str:
        """A bearer user of AUTH that may do nothing: what credential-less clients present,
        through `default_sentinel`, to reach the callout. Bearer, or the server wants a
        signature from a key nobody holds (nats-io/nats-server#7073)."""
        return self.user_jwt(
            self.sentinel.pub, "sentinel", issuer_seed=self.auth.seed, bearer=True, deny_all=True
        )


def creds_text(user_jwt: str, seed: str) -> str:
    """The `.creds` layout `nsc` writes and the clients parse."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def write_secret(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    path.chmod(0o600)
    return path


def _q(value: str) -> str:
    return json.dumps(value)


def render_operator_config(
    trust: Trust,
    *,
    port: int,
    store_dir: Path,
    xkey: bool = False,
    allowed_accounts: Sequence[str] | None = None,
    auth_timeout: float = 2.0,
    sentinel: bool = True,
) -> str:
    """nats-server config in operator mode: every account JWT preloaded into the memory
    resolver, JetStream for the users bucket in AUTH, and the callout configured in AUTH's JWT
    (`auth_callout` in the config is refused in operator mode, §5)."""
    allowed = list(allowed_accounts) if allowed_accounts is not None else [trust.app.pub]
    accounts = {
        trust.sys.pub: trust.account_jwt(trust.sys, "SYS"),
        trust.auth.pub: trust.account_jwt(
            trust.auth,
            "AUTH",
            jetstream=True,
            signing_keys=[trust.auth_signing.pub],
            authorization=trust.authorization(xkey=xkey, allowed_accounts=allowed),
        ),
        trust.app.pub: trust.account_jwt(trust.app, "APP", signing_keys=[trust.app_signing.pub]),
        trust.other.pub: trust.account_jwt(trust.other, "OTHER"),
    }
    lines = [
        f"listen: {_q(f'127.0.0.1:{port}')}",
        'server_name: "OP1"',
        f"operator: {_q(trust.operator_jwt())}",
        f"system_account: {_q(trust.sys.pub)}",
        "resolver: MEM",
        "resolver_preload: {",
        *(f"  {_q(pub)}: {_q(token)}" for pub, token in accounts.items()),
        "}",
        f"jetstream {{ store_dir: {_q(str(store_dir))} }}",
        f"authorization {{ timeout: {auth_timeout!r} }}",
    ]
    if sentinel:
        lines.append(f"default_sentinel: {_q(trust.sentinel_jwt())}")
    return "\n".join(lines) + "\n"
