"""xkey encryption of callout requests and responses (docs/protocol.md §2).

Wire format: b"xkv1" + 24-byte nonce + NaCl crypto_box (authenticated box between two
curve keypairs, not a sealed box). The server's curve key changes on every server
restart, so it is read from each request's `Nats-Server-Xkey` header, never cached.
"""

from __future__ import annotations

import nacl.exceptions
import nacl.public
import nacl.utils

from callout.keys import CurveKey, KeyError_, KeyKind, decode_public

MAGIC = b"xkv1"
_NONCE = 24
# MAC (16) is the least a box can hold; shorter input cannot be a box.
_MIN_SEALED = len(MAGIC) + _NONCE + 16
HEADER = "Nats-Server-Xkey"


class XkeyError(ValueError):
    """The payload cannot be opened. The message is safe to log."""


def is_sealed(payload: bytes) -> bool:
    return payload.startswith(MAGIC)


def server_key(header_value: str) -> nacl.public.PublicKey:
    try:
        return nacl.public.PublicKey(decode_public(header_value, KeyKind.CURVE))
    except KeyError_ as exc:
        raise XkeyError(f"{HEADER} header: {exc}") from None


# A Box precomputes the X25519 shared key: the costly part. The server's key only changes
# when a server restarts, so boxes are kept per (our key, server key), a few per cluster.
_BOXES: dict[tuple[str, bytes], nacl.public.Box] = {}
_MAX_BOXES = 256


def _box(key: CurveKey, peer: nacl.public.PublicKey) -> nacl.public.Box:
    index = (key.public, bytes(peer))
    box = _BOXES.get(index)
    if box is None:
        if len(_BOXES) >= _MAX_BOXES:
            _BOXES.clear()
        box = _BOXES[index] = nacl.public.Box(key.private, peer)
    return box


def open_box(
    payload: bytes, sender: nacl.public.PublicKey, keys: tuple[CurveKey, ...]
) -> tuple[bytes, CurveKey]:
    """Open with whichever configured key the server used (several during a key rotation);
    returns the plaintext and that key, which must seal the response."""
    if len(payload) < _MIN_SEALED or not is_sealed(payload):
        raise XkeyError("payload is not an xkv1 box")
    nonce, box = payload[len(MAGIC) : len(MAGIC) + _NONCE], payload[len(MAGIC) + _NONCE :]
    for key in keys:
        try:
            return _box(key, sender).decrypt(box, nonce), key
        except nacl.exceptions.CryptoError:
            continue
    raise XkeyError("box does not open with any configured xkey (wrong key, or tampered)")


def seal(plaintext: bytes, key: CurveKey, recipient: nacl.public.PublicKey) -> bytes:
    # PyNaCl's EncryptedMessage is already nonce || ciphertext, the layout after the magic.
    return MAGIC + bytes(_box(key, recipient).encrypt(plaintext, nacl.utils.random(_NONCE)))
