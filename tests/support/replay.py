"""The recorded cases of `tests/replay/cases` (real nats-server requests with the keys of
`tests/replay/keys.json`), read and checked independently of callout: nkeys base32 + CRC16 and
Ed25519 via PyNaCl; the policy the recording assumed; the base64 forms a secret must not show in
under any encoding; `replay_cli`, the `callout replay` command run in-process."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.public
import nacl.signing
import nkeys
import orjson
import pytest

from callout import cli
from callout.decision import Policy
from callout.keys import CurveKey, SigningKey
from callout.recording import reader
from tests.support.nats import decode_curve_public, decode_curve_seed

HERE = Path(__file__).resolve().parents[1] / "replay"


CASES = HERE / "cases"


KEYS: dict[str, Any] = json.loads((HERE / "keys.json").read_text())


XKEY_HEADER = "Nats-Server-Xkey"


# What each case's client did, and the store it is answered from.
BESIDE: dict[str, Any] = json.loads((HERE / "cases.json").read_text())


CASE_FILES = sorted(CASES.glob("*.jsonl"))


# ---------------------------------------------------------------------------------------------
# an independent decoder (nkeys base32 + CRC16, Ed25519 via PyNaCl)
# ---------------------------------------------------------------------------------------------
_PREFIX = {"A": 0, "N": 13 << 3, "U": 20 << 3}


def public_raw(key: str, letter: str) -> bytes:
    raw = base64.b32decode(key + "=" * (-len(key) % 8))
    body, crc = raw[:-2], raw[-2:]
    assert bytes(nkeys.crc16_checksum(body)) == crc, f"bad checksum in {key}"
    assert body[0] == _PREFIX[letter], f"{key} is not a {letter} key"
    assert len(body) == 33
    return body[1:]


def b64url(segment: bytes) -> bytes:
    assert b"=" not in segment, "JWT segments are unpadded"
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def decode_jwt(token: bytes, issuer_letter: str) -> dict[str, Any]:
    """Claims of a NATS JWT after checking its header and its signature by `iss`."""
    parts = token.split(b".")
    assert len(parts) == 3
    assert json.loads(b64url(parts[0])) == {"typ": "JWT", "alg": "ed25519-nkey"}
    claims: dict[str, Any] = json.loads(b64url(parts[1]))
    verify_key = nacl.signing.VerifyKey(public_raw(claims["iss"], issuer_letter))
    verify_key.verify(parts[0] + b"." + parts[1], b64url(parts[2]))  # raises if forged
    return claims


def server_box(headers: dict[str, str]) -> nacl.public.Box:
    """Our xkey with the server's: opens what the server sealed to us and what we sealed to it
    (a NaCl box key is the X25519 shared secret, the same from both sides)."""
    ours = nacl.public.PrivateKey(decode_curve_seed(KEYS["xkey_seed"]))
    return nacl.public.Box(ours, nacl.public.PublicKey(decode_curve_public(headers[XKEY_HEADER])))


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    client: str
    entry: reader.Entry  # the case as `callout replay` reads it
    encrypted: bool
    users: dict[str, dict[str, Any] | None]
    expect: dict[str, Any]
    # What the service received: the token, sealed to our xkey when the request was encrypted.
    payload: bytes

    @property
    def token(self) -> bytes:
        assert self.entry.payload is not None
        return self.entry.payload

    @property
    def store(self) -> dict[str, bytes | None]:
        """The users as the replay answers lookups from them."""
        return {k: None if v is None else orjson.dumps(v) for k, v in self.users.items()}

    @property
    def headers(self) -> dict[str, str] | None:
        return self.entry.headers

    @property
    def received_at(self) -> float:
        return self.entry.received_at

    @property
    def request(self) -> dict[str, Any]:
        """The request's claims, decrypted and verified independently of callout."""
        token = self.payload
        if self.encrypted:
            assert self.headers is not None
            token = server_box(self.headers).decrypt(self.payload[28:], self.payload[4:28])
        return decode_jwt(token, "N")


@cache
def load(path: Path) -> Case:
    doc = json.loads(path.read_text())
    [entry] = reader.read_recording(path)
    # The reader's view of the file must be the file (checked against a plain json.loads).
    assert entry.payload == base64.b64decode(doc["token_b64"])
    assert (entry.headers, entry.received_at) == (doc["headers"], doc["received_at"])
    assert entry.skip is None and entry.policy is None
    payload = entry.payload
    if doc["encrypted"]:
        # Sealed again as the server did, from its xkey (the header) to ours.
        assert entry.headers is not None and entry.opened_with == KEYS["xkey_pub"]
        payload = b"xkv1" + server_box(entry.headers).encrypt(payload)
    decision = doc["decision"]
    return Case(
        name=path.stem,
        client=BESIDE[path.stem]["client"],
        entry=entry,
        encrypted=doc["encrypted"],
        users=BESIDE[path.stem]["users"],
        expect={k: decision[k] for k in ("reason", "admit", "account")},
        payload=payload,
    )


def case_named(name: str) -> Case:
    return load(CASES / f"{name}.jsonl")


def policy(*, encrypted: bool, xkey_seed: str | None = None) -> Policy:
    """The configuration the recording assumed (keys.json), as `callout serve` builds it."""
    xkeys = (CurveKey.from_seed(xkey_seed or KEYS["xkey_seed"]),) if encrypted else ()
    return Policy(
        issuer=SigningKey.from_seed(KEYS["issuer_seed"]),
        account=KEYS["account"],
        allowed_accounts=frozenset(KEYS["allowed_accounts"]),
        xkeys=xkeys,
        internal_keys=tuple(KEYS["internal_keys"]),
        mode=KEYS["mode"],
        user_ttl=KEYS["user_ttl"],
        forbidden_accounts=frozenset({"SYS", "$SYS", KEYS["callout_account"]}),
    )


def replay_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(["replay", *args])
    return code, capsys.readouterr().out.splitlines()


XKEYS = (CurveKey.from_seed(KEYS["xkey_seed"]),)


def base64_forms(secret: bytes) -> list[bytes]:
    """Runs of base64 text (standard and URL-safe) that any base64 encoding of a stream holding
    `secret`, at any offset, must contain: for each of the three alignments, the characters
    that encode only bytes of the secret."""
    forms = []
    for k in range(3):
        encoded = base64.b64encode(b"\0" * k + secret)
        inner = encoded[4 if k else 0 : (k + len(secret)) // 3 * 4]
        forms += [inner, inner.replace(b"+", b"-").replace(b"/", b"_")]
    return forms


def assert_absent(secret: str, data: bytes) -> None:
    assert secret.encode() not in data
    for form in base64_forms(secret.encode()):
        assert form not in data
