"""callout.jwt: round trips, interop with an nkeys-signed reference encoder (tests.support.forge),
and every malformed-input branch of `decode`."""

from __future__ import annotations

import base64
import json
from typing import Any

import nkeys
import pytest

from callout import jwt
from callout.keys import KeyKind, SigningKey
from tests.support import forge
from tests.support.forge import b64url, compact
from tests.support.nats import new_account, new_user

CLAIMS: dict[str, Any] = {
    "sub": "UXYZ",
    "aud": "APP",
    "iat": 1_800_000_000,
    "nats": {"type": "user", "version": 2, "pub": {"allow": ["a.>"]}, "subs": -1},
}


def _account() -> tuple[SigningKey, nkeys.KeyPair]:
    seed, _ = new_account()
    return SigningKey.from_seed(seed), nkeys.from_seed(seed.encode())


def _token(claims: dict[str, Any], header: dict[str, Any] | None = None) -> bytes:
    _, kp = _account()
    return forge.encode_jwt({**claims, "iss": kp.public_key.decode()}, kp, header)


def _segments(header: bytes, payload: bytes, sig: bytes = b"c2ln") -> bytes:
    return header + b"." + payload + b"." + sig


def _decode_error(token: bytes, kind: KeyKind = KeyKind.ACCOUNT) -> jwt.TokenError:
    with pytest.raises(jwt.TokenError) as info:
        jwt.decode(token, kind)
    assert info.value.detail == str(info.value)
    return info.value


GOOD_HEADER = b64url(compact(forge.HEADER))


# ---------------------------------------------------------------------------------------------
# round trips and interop
# ---------------------------------------------------------------------------------------------
def test_encode_decode_round_trip() -> None:
    key, _ = _account()
    claims = {**CLAIMS, "iss": key.public, "name": "ünïcode ✓"}
    token = jwt.encode(claims, key)
    decoded = jwt.decode(token, KeyKind.ACCOUNT)
    assert decoded.claims == claims
    assert decoded.issuer == key.public


def test_encoded_token_verifies_with_the_reference_decoder() -> None:
    key, _ = _account()
    token = jwt.encode({**CLAIMS, "iss": key.public}, key)
    assert token.count(b".") == 2 and b"=" not in token
    assert token.startswith(b"eyJ")  # the server's plaintext test (docs/protocol.md §2)
    claims = forge.decode_jwt(token, nkeys.PREFIX_BYTE_ACCOUNT)  # header, nkeys CRC, Ed25519
    assert claims == {**CLAIMS, "iss": key.public}


def test_decode_accepts_reference_signed_tokens() -> None:
    _, kp = _account()
    public = kp.public_key.decode()
    token = forge.encode_jwt({**CLAIMS, "iss": public}, kp)
    assert jwt.decode(token, KeyKind.ACCOUNT).issuer == public
    # nats-io/jwt also accepts the legacy alg "ed25519".
    legacy = forge.encode_jwt({**CLAIMS, "iss": public}, kp, {"typ": "JWT", "alg": "ed25519"})
    assert jwt.decode(legacy, KeyKind.ACCOUNT).claims["iss"] == public
    # Header key order and extra header fields do not matter.
    other = forge.encode_jwt(
        {**CLAIMS, "iss": public}, kp, {"alg": "ed25519-nkey", "kid": "x", "typ": "JWT"}
    )
    assert jwt.decode(other, KeyKind.ACCOUNT).claims["sub"] == "UXYZ"


def test_b64url_helpers() -> None:
    for n in range(0, 10):
        data = bytes(range(250, 250 - n, -1))
        assert jwt.b64url(data) == base64.urlsafe_b64encode(data).rstrip(b"=")
        assert jwt.b64url_decode(jwt.b64url(data)) == data
    for bad in (b"ab=", b"a+b/", b"abcde", b"ab cd", b"ab\n"):
        with pytest.raises(jwt.TokenError, match="unpadded base64url"):
            jwt.b64url_decode(bad)


# ---------------------------------------------------------------------------------------------
# every malformed branch of decode
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [1, 2, 4, 5])
def test_segment_count(count: int) -> None:
    token = _token(CLAIMS)
    parts = token.split(b".")
    shaped = b".".join((parts * 2)[:count])
    error = _decode_error(shaped)
    assert error.detail == f"expected 3 segments, got {count}"
    assert not error.signature


def test_empty_token() -> None:
    assert _decode_error(b"").detail == "expected 3 segments, got 1"
    error = _decode_error(b"..")
    assert not error.signature  # an empty header is not JSON


def test_padded_base64_segment() -> None:
    token = _token({**CLAIMS, "pad": "x"})
    header, payload, sig = token.split(b".")
    padded = payload + b"=" * (-len(payload) % 4 or 4)
    assert (
        _decode_error(_segments(header, padded, sig)).detail == "segment is not unpadded base64url"
    )
    padded_header = header + b"=" * (-len(header) % 4 or 4)
    assert not _decode_error(_segments(padded_header, payload, sig)).signature
    padded_sig = base64.urlsafe_b64encode(base64.urlsafe_b64decode(sig + b"=="))
    assert padded_sig.endswith(b"=")
    error = _decode_error(_segments(header, payload, padded_sig))
    assert error.detail == "segment is not unpadded base64url" and not error.signature


@pytest.mark.parametrize("stray", [b"+", b"/", b"!", b" ", b"\n", b"\xc3\xa9"])
def test_stray_characters(stray: bytes) -> None:
    header, payload, sig = _token(CLAIMS).split(b".")
    error = _decode_error(_segments(header, payload[:10] + stray + payload[10:], sig))
    assert error.detail == "segment is not unpadded base64url"


def test_impossible_segment_length() -> None:
    header, payload, sig = _token(CLAIMS).split(b".")
    trimmed = payload[: len(payload) - (len(payload) % 4) - 3]  # length % 4 == 1
    assert len(trimmed) % 4 == 1
    assert (
        _decode_error(_segments(header, trimmed, sig)).detail == "segment is not unpadded base64url"
    )


@pytest.mark.parametrize("which", ["header", "payload"])
def test_segment_not_json(which: str) -> None:
    garbage = b64url(b"{not json")
    token = (
        _segments(garbage, b64url(compact(CLAIMS)))
        if which == "header"
        else _segments(GOOD_HEADER, garbage)
    )
    error = _decode_error(token)
    assert error.detail == "segment is not JSON" and not error.signature
    assert (
        _decode_error(_segments(GOOD_HEADER, b64url(b"\xff\xfe"))).detail == "segment is not JSON"
    )


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        ([], "header typ is not JWT"),
        ("JWT", "header typ is not JWT"),
        ({"alg": "ed25519-nkey"}, "header typ is not JWT"),
        ({"typ": "jwt", "alg": "ed25519-nkey"}, "header typ is not JWT"),
        ({"typ": "JWT"}, "header alg is not ed25519-nkey"),
        ({"typ": "JWT", "alg": "HS256"}, "header alg is not ed25519-nkey"),
        ({"typ": "JWT", "alg": "none"}, "header alg is not ed25519-nkey"),
        ({"typ": "JWT", "alg": ["ed25519-nkey"]}, "header alg is not ed25519-nkey"),
    ],
)
def test_wrong_header(header: Any, detail: str) -> None:
    _, kp = _account()
    claims = {**CLAIMS, "iss": kp.public_key.decode()}
    # Correctly signed: the header is refused for what it says, not for the signature.
    signing_input = b64url(compact(header)) + b"." + b64url(compact(claims))
    token = signing_input + b"." + b64url(kp.sign(signing_input))
    error = _decode_error(token)
    assert error.detail == detail and not error.signature


@pytest.mark.parametrize("claims", [[], "claims", 42, None])
def test_claims_not_an_object(claims: Any) -> None:
    error = _decode_error(_segments(GOOD_HEADER, b64url(compact(claims))))
    assert error.detail == "claims are not a JSON object"


@pytest.mark.parametrize("iss", ["missing", None, 7, ["A"]])
def test_missing_iss(iss: Any) -> None:
    claims = dict(CLAIMS)
    if iss != "missing":
        claims["iss"] = iss
    error = _decode_error(_segments(GOOD_HEADER, b64url(compact(claims))))
    assert error.detail == "iss missing" and not error.signature


def test_iss_of_the_wrong_kind() -> None:
    user_seed, user_public = new_user()
    kp = nkeys.from_seed(user_seed.encode())
    token = forge.encode_jwt({**CLAIMS, "iss": user_public}, kp)  # validly signed by a user key
    error = _decode_error(token, KeyKind.ACCOUNT)
    assert error.detail.startswith("iss: not a account public key")
    assert not error.signature
    assert jwt.decode(token, KeyKind.USER).issuer == user_public
    error = _decode_error(_segments(GOOD_HEADER, b64url(compact({**CLAIMS, "iss": "Anope"}))))
    assert error.detail.startswith("iss: ")


def test_bad_signature_is_flagged() -> None:
    key, kp = _account()
    other, _ = _account()
    claims = {**CLAIMS, "iss": key.public}
    header, payload, sig = jwt.encode(claims, key).split(b".")

    # Signed by another account key, claiming ours.
    forged = jwt.encode(claims, other)
    assert _decode_error(forged).signature

    # Payload changed after signing.
    tampered = b64url(compact({**claims, "aud": "SYS"}))
    error = _decode_error(_segments(header, tampered, sig))
    assert error.signature and error.detail == "signature does not verify against iss"

    # Signature over the payload only (nats-io/jwt v1 style), or truncated, or empty.
    v1 = b64url(kp.sign(payload))
    assert _decode_error(_segments(header, payload, v1)).signature
    assert _decode_error(_segments(header, payload, sig[:43])).signature  # 32 bytes
    assert _decode_error(_segments(header, payload, b"")).signature
    flipped = bytearray(forge.b64url_decode(sig))
    flipped[0] ^= 1
    assert _decode_error(_segments(header, payload, b64url(bytes(flipped)))).signature


def test_header_too_large() -> None:
    _, kp = _account()
    claims = {**CLAIMS, "iss": kp.public_key.decode()}
    big = {**forge.HEADER, "x": "y" * 200}
    token = forge.encode_jwt(claims, kp, big)
    assert len(token.split(b".")[0]) > 256
    error = _decode_error(token)
    assert error.detail == "header too large" and not error.signature
    small = {**forge.HEADER, "x": "y" * 100}  # still a header, and under the bound
    assert jwt.decode(forge.encode_jwt(claims, kp, small), KeyKind.ACCOUNT).claims == claims


def test_token_error_is_a_value_error() -> None:
    error = jwt.TokenError("x", signature=True)
    assert isinstance(error, ValueError)
    assert error.signature and error.detail == "x"
    assert not jwt.TokenError("y").signature


def test_json_of_the_reference_encoder_is_compact() -> None:
    # Sanity for the oracle itself: it encodes what nats-io/jwt encodes.
    _, kp = _account()
    token = forge.encode_jwt({"iss": kp.public_key.decode()}, kp)
    header = forge.b64url_decode(token.split(b".")[0])
    assert header == b'{"typ":"JWT","alg":"ed25519-nkey"}'
    assert json.loads(forge.b64url_decode(token.split(b".")[1])) == {"iss": kp.public_key.decode()}
