"""NATS JWTs (`alg: ed25519-nkey`): encode, and decode with signature verification.

Hand-rolled, not PyJWT: PyJWT needs a custom Algorithm subclass for ed25519-nkey, and its
claim validation wants the key before decoding (a two-pass "peek at iss, then verify")
and applies its own `aud` rules, which are not NATS's (docs/protocol.md §4, "PyJWT").
The format itself is three base64url segments (no padding) and one Ed25519 signature
over the first two, as in nats-io/jwt `v2/claims.go` `doEncode` and `v2/decoder.go`.

This module is mechanics only: which claims a request must carry is decided in
`callout.decision`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import orjson

from callout.keys import KeyError_, KeyKind, SigningKey, decode_public, verify

# nats-io/jwt writes this header; the server also accepts the legacy alg "ed25519".
_HEADER = base64.urlsafe_b64encode(orjson.dumps({"typ": "JWT", "alg": "ed25519-nkey"})).rstrip(b"=")
_ALGS = frozenset({"ed25519-nkey", "ed25519"})
# Headers are ~40 bytes; anything much bigger is not a NATS JWT header.
_MAX_HEADER = 256
# base64url to standard base64 for binascii's strict decoder; '+', '/' and '=' (not unpadded
# base64url) become '*', which it refuses.
_URL_TO_STD = bytes.maketrans(b"-_+/=", b"+/***")
_STD_TO_URL = bytes.maketrans(b"+/", b"-_")


class TokenError(ValueError):
    """The token is not a well-formed, correctly signed NATS JWT. `detail` is safe to log."""

    def __init__(self, detail: str, *, signature: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        # True when the token parsed but its signature did not verify: a forgery, not garbage.
        self.signature = signature


def b64url(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False).translate(_STD_TO_URL).rstrip(b"=")


def b64url_decode(segment: bytes) -> bytes:
    """Strict unpadded base64url, as Go's RawURLEncoding: no padding, no stray characters."""
    if len(segment) % 4 == 1:
        raise TokenError("segment is not unpadded base64url")
    try:
        # Strict mode refuses anything outside the alphabet; the only padding is added here.
        std = segment.translate(_URL_TO_STD) + b"=" * (-len(segment) % 4)
        return binascii.a2b_base64(std, strict_mode=True)
    except (binascii.Error, ValueError):
        raise TokenError("segment is not unpadded base64url") from None


def encode(claims: dict[str, Any], signer: SigningKey) -> bytes:
    payload = b64url(orjson.dumps(claims))
    signing_input = _HEADER + b"." + payload
    return signing_input + b"." + b64url(signer.sign(signing_input))


_STANDARD_HEADER = orjson.loads(b64url_decode(_HEADER))


@dataclass(frozen=True, slots=True)
class Token:
    claims: dict[str, Any]
    issuer: str  # the verified `iss`


def decode(token: bytes, issuer_kind: KeyKind) -> Token:
    """Decode `token`; verify its signature against its own `iss`, which must be `issuer_kind`.

    Raises TokenError for anything else. Callers decide whether the issuer is the expected one.
    """
    parts = token.split(b".")
    if len(parts) != 3:
        raise TokenError(f"expected 3 segments, got {len(parts)}")
    header_b64, payload_b64, sig_b64 = parts
    if len(header_b64) > _MAX_HEADER:
        raise TokenError("header too large")
    try:
        # nats-server's header is always the same bytes: parsed once, here, at import.
        header = (
            _STANDARD_HEADER if header_b64 == _HEADER else orjson.loads(b64url_decode(header_b64))
        )
        claims = orjson.loads(b64url_decode(payload_b64))
    except orjson.JSONDecodeError:
        raise TokenError("segment is not JSON") from None
    if not isinstance(header, dict) or header.get("typ") != "JWT":
        raise TokenError("header typ is not JWT")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in _ALGS:
        raise TokenError("header alg is not ed25519-nkey")
    if not isinstance(claims, dict):
        raise TokenError("claims are not a JSON object")
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise TokenError("iss missing")
    try:
        issuer_raw = decode_public(issuer, issuer_kind)
    except KeyError_ as exc:
        raise TokenError(f"iss: {exc}") from None
    signature = b64url_decode(sig_b64)
    if len(signature) != 64 or not verify(issuer_raw, header_b64 + b"." + payload_b64, signature):
        raise TokenError("signature does not verify against iss", signature=True)
    return Token(claims, issuer)
