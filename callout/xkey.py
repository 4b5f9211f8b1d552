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


class Boxes:
    """Boxes kept per (our key, server key). A Box precomputes the X25519 shared key, the
    costly part; the server's key only changes when a server restarts, so a deployment needs
    a few per cluster. Bounded: past `capacity` keys (servers restarted many times) it starts
    over. Each decision core keeps its own: nothing is shared module-wide."""

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._boxes: dict[tuple[str, bytes], nacl.public.Box] = {}

    def box(self, key: CurveKey, peer: nacl.public.PublicKey) -> nacl.public.Box:
        index = (key.public, bytes(peer))
        box = self._boxes.get(index)
        if box is None:
            if len(self._boxes) >= self._capacity:
                self._boxes.clear()
            box = self._boxes[index] = nacl.public.Box(key.private, peer)
        return box

    def __len__(self) -> int:
        return len(self._boxes)


def _box(key: CurveKey, peer: nacl.public.PublicKey, boxes: Boxes | None) -> nacl.public.Box:
    return nacl.public.Box(key.private, peer) if boxes is None else boxes.box(key, peer)


def open_box(
    payload: bytes,
    sender: nacl.public.PublicKey,
    keys: tuple[CurveKey, ...],
    boxes: Boxes | None = None,
) -> tuple[bytes, CurveKey]:
    """Open with whichever configured key the server used (several during a key rotation);
    returns the plaintext and that key, which must seal the response. `boxes` keeps the
    shared keys from one request to the next (without it each call computes its own)."""
    if len(payload) < _MIN_SEALED or not is_sealed(payload):
        raise XkeyError("payload is not an xkv1 box")
    nonce, box = payload[len(MAGIC) : len(MAGIC) + _NONCE], payload[len(MAGIC) + _NONCE :]
    for key in keys:
        try:
            return _box(key, sender, boxes).decrypt(box, nonce), key
        except nacl.exceptions.CryptoError:
            continue
    raise XkeyError("box does not open with any configured xkey (wrong key, or tampered)")


def seal(
    plaintext: bytes,
    key: CurveKey,
    recipient: nacl.public.PublicKey,
    boxes: Boxes | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """`nonce`: 24 random bytes (drawn here when None)."""
    nonce = nacl.utils.random(_NONCE) if nonce is None else nonce
    # PyNaCl's EncryptedMessage is already nonce || ciphertext, the layout after the magic.
    return MAGIC + bytes(_box(key, recipient, boxes).encrypt(plaintext, nonce))
