"""Forge authorization requests the way nats-server 2.15.1 builds them, and check responses the
way it checks them, without using the `callout` package (docs/protocol.md §1, §2, §4).

Everything here is built on the `nkeys` package, PyNaCl and the key helpers of
`tests.support.nats` (themselves nkeys/PyNaCl based), so the unit tests compare `callout` against
an independent implementation rather than against itself.

- `ServerIdentity`: a test nats-server's signing key (`N...`, kind 'N') and curve key (`X...`).
- `ClientKey`: a client's user nkey that signs nonces, RawURL (Go) or padded std (nats-py).
- `forge_request`: the request JWT, every claim overridable (`DELETE` removes one), optionally
  sealed with the server's curve key to the service's xkey, with the `Nats-Server-Xkey` header.
- `decode_jwt` / `open_response`: the server side of the response (decrypt, verify, decode).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import nacl.exceptions
import nacl.public
import nacl.signing
import nacl.utils
import nkeys

from tests.support.nats import decode_curve_public, decode_curve_seed, new_curve, new_user

XKEY_HEADER = "Nats-Server-Xkey"
XKEY_MAGIC = b"xkv1"
REQUEST_AUDIENCE = "nats-authorization-request"
HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}

SigEncoding = Literal["rawurl", "std"]


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


#: Use as an override value to remove a claim: `{"nats": {"connect_opts": {"sig": DELETE}}}`.
DELETE: Any = _Delete()


# ---------------------------------------------------------------------------------------------
# encodings
# ---------------------------------------------------------------------------------------------
def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def b64url_decode(segment: bytes) -> bytes:
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def compact(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def public_raw(text: str, prefix: int) -> bytes:
    """The 32 raw bytes of an nkey public key of kind `prefix`, checked like nats-io/nkeys
    (`nkeys` 0.2.1 has no public-key decoder; its CRC is the oracle here)."""
    body = base64.b32decode(text + "=" * (-len(text) % 8))
    data, crc = body[:-2], body[-2:]
    if len(data) != 33 or bytes(nkeys.crc16_checksum(data)) != crc or data[0] != prefix:
        raise ValueError(f"{text!r} is not a public key with prefix {prefix}")
    return data[1:]


def encode_jwt(
    claims: Mapping[str, Any], signer: nkeys.KeyPair, header: Mapping[str, Any] | None = None
) -> bytes:
    """nats-io/jwt `doEncode`: b64url(header).b64url(claims).b64url(ed25519(first two))."""
    signing_input = b64url(compact(dict(header or HEADER))) + b"." + b64url(compact(dict(claims)))
    return signing_input + b"." + b64url(signer.sign(signing_input))


def decode_jwt(token: bytes | str, issuer_prefix: int) -> dict[str, Any]:
    """Decode and verify `token` as nats-server does: 3 unpadded base64url segments, header
    typ/alg, Ed25519 over `header.payload` by `iss`, `iss` of kind `issuer_prefix`."""
    raw = token.encode() if isinstance(token, str) else token
    parts = raw.split(b".")
    assert len(parts) == 3, f"expected 3 segments, got {len(parts)}"
    for part in parts:
        assert b"=" not in part, "padded base64 segment"
    header = json.loads(b64url_decode(parts[0]))
    assert header == HEADER, header
    claims: dict[str, Any] = json.loads(b64url_decode(parts[1]))
    verify_key = nacl.signing.VerifyKey(public_raw(claims["iss"], issuer_prefix))
    verify_key.verify(parts[0] + b"." + parts[1], b64url_decode(parts[2]))  # raises if forged
    return claims


def jti(claims: Mapping[str, Any]) -> str:
    """nats-io/jwt `hash()`: base32-nopad(SHA-512/256(ClaimsData JSON with jti empty)),
    fields in Go struct order, zero values omitted (docs/protocol.md §4, "jti")."""
    data = {
        k: claims[k] for k in ("aud", "exp", "iat", "iss", "name", "nbf", "sub") if claims.get(k)
    }
    digest = hashlib.new("sha512_256", compact(data)).digest()
    return base64.b32encode(digest).decode().rstrip("=")


def merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`; a `DELETE` value removes the key, and a
    non-dict value replaces whatever was there (so a test can put any JSON in any field)."""
    out = dict(base)
    for key, value in overrides.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# identities
# ---------------------------------------------------------------------------------------------
def new_server_seed() -> str:
    seed: bytes = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_SERVER)
    return seed.decode()


@dataclass(frozen=True)
class ServerIdentity:
    """One nats-server: its signing nkey (`SN...`/`N...`) and its per-boot curve key."""

    seed: str
    public: str
    xkey_seed: str
    xkey_public: str
    name: str = "S1"

    @classmethod
    def generate(cls, name: str = "S1") -> ServerIdentity:
        seed = new_server_seed()
        xkey_seed, xkey_public = new_curve()
        return cls(
            seed, nkeys.from_seed(seed.encode()).public_key.decode(), xkey_seed, xkey_public, name
        )

    @property
    def keypair(self) -> nkeys.KeyPair:
        return nkeys.from_seed(self.seed.encode())

    @property
    def curve_private(self) -> nacl.public.PrivateKey:
        return nacl.public.PrivateKey(decode_curve_seed(self.xkey_seed))


def new_nonce() -> str:
    """As nats-server: 11 random bytes, base64url without padding = 15 characters."""
    return b64url(secrets.token_bytes(11)).decode()


def encode_sig(signature: bytes, encoding: SigEncoding) -> str:
    if encoding == "rawurl":
        return b64url(signature).decode()
    return base64.b64encode(signature).decode()


@dataclass(frozen=True)
class ClientKey:
    """A connecting client's user nkey."""

    seed: str
    public: str

    @classmethod
    def generate(cls) -> ClientKey:
        seed, public = new_user()
        return cls(seed, public)

    def signature(self, nonce: str) -> bytes:
        sig: bytes = nkeys.from_seed(self.seed.encode()).sign(nonce.encode())
        return sig

    def sign(self, nonce: str, encoding: SigEncoding = "rawurl") -> str:
        return encode_sig(self.signature(nonce), encoding)


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------
@dataclass
class Forged:
    """A request as the service receives it, with what the test needs to check the answer."""

    payload: bytes
    headers: dict[str, str] | None
    claims: dict[str, Any]
    token: bytes
    user_nkey: str
    client: ClientKey | None
    nonce: str
    server: ServerIdentity
    sealed_to: str | None = None  # the service xkey public key the request was sealed to
    extra: dict[str, Any] = field(default_factory=dict)


def request_claims(
    server: ServerIdentity,
    issuer: str,
    *,
    now: float,
    client: ClientKey | None,
    user_nkey: str | None = None,
    nonce: str | None = None,
    sig_encoding: SigEncoding = "rawurl",
    timeout: float = 2.0,
    xkey: bool = False,
) -> dict[str, Any]:
    """The claims of `authorization_request` as server/auth_callout.go fills them (config mode,
    nkey client, docs/protocol.md §1 observed request)."""
    nonce = nonce if nonce is not None else new_nonce()
    server_id: dict[str, Any] = {
        "name": server.name,
        "host": "127.0.0.1",
        "id": server.public,
        "version": "2.15.1",
    }
    if xkey:
        server_id["xkey"] = server.xkey_public
    client_info: dict[str, Any] = {"host": "127.0.0.1", "id": 9, "kind": "Client", "type": "nats"}
    connect_opts: dict[str, Any] = {"lang": "python3", "version": "2.16.0", "protocol": 1}
    if client is not None:
        client_info["user"] = client.public
        client_info["nonce"] = nonce
        connect_opts["nkey"] = client.public
        connect_opts["sig"] = client.sign(nonce, sig_encoding)
    claims: dict[str, Any] = {
        "aud": REQUEST_AUDIENCE,
        "exp": int(now + timeout),
        "iat": int(now),
        "iss": server.public,
        "sub": issuer,
    }
    claims["jti"] = jti(claims)
    claims["nats"] = {
        "server_id": server_id,
        "user_nkey": user_nkey if user_nkey is not None else new_user()[1],
        "client_info": client_info,
        "connect_opts": connect_opts,
        "type": "authorization_request",
        "version": 2,
    }
    return claims


def seal(plaintext: bytes, sender: nacl.public.PrivateKey, recipient_public: str) -> bytes:
    """`xkv1` + 24-byte nonce + crypto_box(sender -> recipient) (docs/protocol.md §2)."""
    box = nacl.public.Box(sender, nacl.public.PublicKey(decode_curve_public(recipient_public)))
    return XKEY_MAGIC + bytes(box.encrypt(plaintext, nacl.utils.random(24)))


def forge_request(
    server: ServerIdentity,
    issuer: str,
    *,
    now: float,
    client: ClientKey | None = None,
    user_nkey: str | None = None,
    nonce: str | None = None,
    sig_encoding: SigEncoding = "rawurl",
    timeout: float = 2.0,
    seal_to: str | None = None,
    header_xkey: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    signer: nkeys.KeyPair | None = None,
    jwt_header: Mapping[str, Any] | None = None,
) -> Forged:
    """A request from `server` for `client` (None: a client that presented no nkey).

    `seal_to`: the service's `X...` key; the payload is then `xkv1...` and the header names
    the server's curve key (or `header_xkey` when given). `signer` replaces the server's own
    key (forgeries); `overrides` is deep-merged into the claims before signing."""
    claims = request_claims(
        server,
        issuer,
        now=now,
        client=client,
        user_nkey=user_nkey,
        nonce=nonce,
        sig_encoding=sig_encoding,
        timeout=timeout,
        xkey=seal_to is not None,
    )
    used_nonce = claims["nats"]["client_info"].get("nonce", "")
    if overrides:
        claims = merge(claims, overrides)
    token = encode_jwt(claims, signer or server.keypair, jwt_header)
    payload, headers = token, None
    if seal_to is not None:
        payload = seal(token, server.curve_private, seal_to)
        headers = {XKEY_HEADER: header_xkey or server.xkey_public}
    nats = claims.get("nats")
    user = nats.get("user_nkey", "") if isinstance(nats, dict) else ""
    return Forged(
        payload=payload,
        headers=headers,
        claims=claims,
        token=token,
        user_nkey=user if isinstance(user, str) else "",
        client=client,
        nonce=used_nonce,
        server=server,
        sealed_to=seal_to,
    )


# ---------------------------------------------------------------------------------------------
# responses, as the server reads them
# ---------------------------------------------------------------------------------------------
def open_response(body: bytes, server: ServerIdentity, service_xkey_public: str | None) -> bytes:
    """What the server does with a response body: a body that is not `eyJ...` after an
    encrypted request is opened with `xkp.Open(msg, <service xkey>)` (docs/protocol.md §2)."""
    if service_xkey_public is None or body.startswith(b"eyJ"):
        return body
    assert body.startswith(XKEY_MAGIC), body[:8]
    sender = nacl.public.PublicKey(decode_curve_public(service_xkey_public))
    opened: bytes = nacl.public.Box(server.curve_private, sender).decrypt(body[28:], body[4:28])
    return opened


def try_open_response(body: bytes, server: ServerIdentity, service_xkey_public: str) -> bool:
    try:
        open_response(body, server, service_xkey_public)
    except nacl.exceptions.CryptoError:
        return False
    return True


__all__ = [
    "DELETE",
    "XKEY_HEADER",
    "ClientKey",
    "Forged",
    "ServerIdentity",
    "b64url",
    "b64url_decode",
    "compact",
    "decode_jwt",
    "encode_jwt",
    "encode_sig",
    "forge_request",
    "jti",
    "merge",
    "new_nonce",
    "open_response",
    "public_raw",
    "request_claims",
    "seal",
    "try_open_response",
]
