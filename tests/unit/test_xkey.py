"""callout.xkey against a PyNaCl reference of the server side (tests.support.forge): the server
seals with its curve key to ours, we open; we seal back, the server opens (docs/protocol.md §2)."""

from __future__ import annotations

import nacl.public
import pytest

from callout import xkey
from callout.keys import CurveKey
from tests.support import forge
from tests.support.forge import ServerIdentity


def _server_public(server: ServerIdentity) -> nacl.public.PublicKey:
    return xkey.server_key(server.xkey_public)


def test_constants_match_the_wire_format() -> None:
    assert xkey.MAGIC == forge.XKEY_MAGIC == b"xkv1"
    assert xkey.HEADER == forge.XKEY_HEADER == "Nats-Server-Xkey"


def test_open_what_the_server_sealed() -> None:
    server = ServerIdentity.generate()
    ours = CurveKey.generate()
    payload = forge.seal(b"eyJ.request", server.curve_private, ours.public)
    assert xkey.is_sealed(payload) and not xkey.is_sealed(b"eyJ.request")
    plaintext, used = xkey.open_box(payload, _server_public(server), (ours,))
    assert plaintext == b"eyJ.request"
    assert used is ours


def test_open_with_rotated_keys_returns_the_key_that_opened() -> None:
    server = ServerIdentity.generate()
    old, new = CurveKey.generate(), CurveKey.generate()
    for target in (old, new):
        payload = forge.seal(b"token", server.curve_private, target.public)
        plaintext, used = xkey.open_box(payload, _server_public(server), (new, old))
        assert plaintext == b"token" and used is target


def test_seal_opens_on_the_server_side() -> None:
    server = ServerIdentity.generate()
    ours = CurveKey.generate()
    body = xkey.seal(b"eyJ.response", ours, _server_public(server))
    assert body.startswith(b"xkv1") and len(body) == 4 + 24 + 16 + len(b"eyJ.response")
    assert forge.open_response(body, server, ours.public) == b"eyJ.response"
    # Each seal draws a fresh nonce.
    assert xkey.seal(b"eyJ.response", ours, _server_public(server))[4:28] != body[4:28]
    # The server opens with the configured service key: another one fails.
    assert not forge.try_open_response(body, server, CurveKey.generate().public)


def test_wrong_key_tampered_or_truncated_box() -> None:
    server = ServerIdentity.generate()
    ours, other = CurveKey.generate(), CurveKey.generate()
    sender = _server_public(server)
    payload = forge.seal(b"token", server.curve_private, other.public)
    with pytest.raises(xkey.XkeyError, match="does not open"):
        xkey.open_box(payload, sender, (ours,))
    with pytest.raises(xkey.XkeyError, match="does not open"):
        xkey.open_box(payload, _server_public(ServerIdentity.generate()), (other,))
    with pytest.raises(xkey.XkeyError, match="does not open"):
        xkey.open_box(payload, sender, ())
    good = forge.seal(b"token", server.curve_private, ours.public)
    tampered = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(xkey.XkeyError, match="does not open"):
        xkey.open_box(tampered, sender, (ours,))
    with pytest.raises(xkey.XkeyError, match="does not open"):
        xkey.open_box(good[:-1], sender, (ours,))
    for cut in (4 + 24 + 15, 28, 10, 4, 0):
        with pytest.raises(xkey.XkeyError, match="not an xkv1 box"):
            xkey.open_box(good[:cut], sender, (ours,))
    with pytest.raises(xkey.XkeyError, match="not an xkv1 box"):
        xkey.open_box(b"xkv2" + good[4:], sender, (ours,))


def test_server_key_header_must_be_a_curve_key() -> None:
    server = ServerIdentity.generate()
    assert bytes(xkey.server_key(server.xkey_public)) == bytes(server.curve_private.public_key)
    for bad in (server.public, server.xkey_public.lower(), server.xkey_public[:-1], "", "X"):
        with pytest.raises(xkey.XkeyError, match="Nats-Server-Xkey header"):
            xkey.server_key(bad)
