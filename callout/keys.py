"""NATS nkeys: the text encoding of public keys and seeds, and loading seeds from files.

We carry our own codec rather than lean on the `nkeys` package because it has no
curve (xkey) support (docs/protocol.md §2, "Python library gap") and no types;
the encoding is 30 lines: base32(prefix byte(s) + 32 raw bytes + CRC16-XMODEM,
little-endian), without padding. The `nkeys` package stays in the test suite as an
independent oracle for this module.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing


class KeyKind(Enum):
    """Key roles, by the prefix byte of their encoding (nats-io/nkeys `nkeys.go`)."""

    OPERATOR = 14 << 3  # 'O'
    SERVER = 13 << 3  # 'N'
    CLUSTER = 2 << 3  # 'C'
    ACCOUNT = 0  # 'A'
    USER = 20 << 3  # 'U'
    CURVE = 23 << 3  # 'X'

    @property
    def letter(self) -> str:
        return _LETTERS[self]


_SEED_PREFIX = 18 << 3  # 'S'
_LETTERS = {
    KeyKind.OPERATOR: "O",
    KeyKind.SERVER: "N",
    KeyKind.CLUSTER: "C",
    KeyKind.ACCOUNT: "A",
    KeyKind.USER: "U",
    KeyKind.CURVE: "X",
}
_BY_PREFIX = {k.value: k for k in KeyKind}
# A public key is 1 + 32 + 2 = 35 bytes = 56 base32 chars; a seed 2 + 32 + 2 = 36 bytes = 58.
PUBLIC_KEY_LENGTH = 56
SEED_LENGTH = 58
# Seed files are tiny; anything bigger is not a seed file and is not read whole.
_MAX_SEED_FILE = 4096


class KeyError_(ValueError):
    """A key or seed that does not decode, or is of the wrong kind. The message is safe to show."""


def _crc16(data: bytes) -> int:
    # CRC-16/XMODEM, as in nats-io/nkeys crc16.go: binascii's CRC-CCITT started from 0.
    return binascii.crc_hqx(data, 0)


def _b32decode(text: str) -> bytes:
    if not text.isascii():
        raise KeyError_("not a base32 nkey")
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError) as exc:
        raise KeyError_("not a base32 nkey") from exc


def _checked(raw: bytes) -> bytes:
    body, crc = raw[:-2], int.from_bytes(raw[-2:], "little")
    if _crc16(body) != crc:
        raise KeyError_("nkey checksum mismatch")
    return body


def encode_public(kind: KeyKind, raw: bytes) -> str:
    if len(raw) != 32:
        raise KeyError_("public key must be 32 bytes")
    body = bytes([kind.value]) + raw
    return base64.b32encode(body + _crc16(body).to_bytes(2, "little")).decode().rstrip("=")


def _int_digits() -> bytes:
    table = bytearray(b"z" * 256)  # 'z' is no base-32 digit for int(): everything else fails
    for letter, digit in zip(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789abcdefghijklmnopqrstuv", strict=True
    ):
        table[letter] = digit
    return bytes(table)


# Public keys are decoded three or four times per request (the server's, the client's, the
# per-request user_nkey): 56 base32 characters are exactly 280 bits, so they decode as one
# base-32 integer. The translation maps every byte outside the alphabet to a digit int()
# refuses (it would otherwise take lower case, '_', whitespace and signs).
_TO_INT_DIGITS = _int_digits()


def decode_public(text: str, kind: KeyKind) -> bytes:
    """The 32 raw bytes of a public key of `kind`; KeyError_ for anything else."""
    if len(text) != PUBLIC_KEY_LENGTH:
        raise KeyError_(f"not a {kind.name.lower()} public key")
    try:
        raw = int(text.encode("ascii").translate(_TO_INT_DIGITS), 32).to_bytes(35, "big")
    except (UnicodeEncodeError, ValueError):
        raise KeyError_("not a base32 nkey") from None
    if binascii.crc_hqx(raw[:33], 0) != int.from_bytes(raw[33:], "little"):
        raise KeyError_("nkey checksum mismatch")
    if raw[0] != kind._value_:  # the plain attribute: Enum's `value` is a slower descriptor
        raise KeyError_(f"not a {kind.name.lower()} public key (starts with {text[:1]!r})")
    return raw[1:33]


def is_public(text: str, kind: KeyKind) -> bool:
    try:
        decode_public(text, kind)
    except KeyError_:
        return False
    return True


def encode_seed(kind: KeyKind, raw: bytes) -> str:
    if len(raw) != 32:
        raise KeyError_("seed must be 32 bytes")
    body = bytes([_SEED_PREFIX | kind.value >> 5, (kind.value & 31) << 3]) + raw
    return base64.b32encode(body + _crc16(body).to_bytes(2, "little")).decode().rstrip("=")


def decode_seed(text: str) -> tuple[KeyKind, bytes]:
    if len(text) != SEED_LENGTH:
        raise KeyError_("not an nkey seed")
    body = _checked(_b32decode(text))
    if body[0] & 0xF8 != _SEED_PREFIX:
        raise KeyError_("not an nkey seed")
    prefix = ((body[0] & 7) << 5) | ((body[1] & 0xF8) >> 3)
    kind = _BY_PREFIX.get(prefix)
    if kind is None:
        raise KeyError_("nkey seed of unknown kind")
    return kind, body[2:]


def keys_equal(a: str, b: str) -> bool:
    """Constant-time comparison for key strings (no early exit on the first differing byte)."""
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An ed25519 nkey (account, user, server...) with its seed. repr never shows the seed."""

    kind: KeyKind
    public: str
    _signer: nacl.signing.SigningKey

    @classmethod
    def from_seed(cls, seed: str) -> SigningKey:
        kind, raw = decode_seed(seed.strip())
        if kind is KeyKind.CURVE:
            raise KeyError_("a curve (xkey) seed cannot sign")
        signer = nacl.signing.SigningKey(raw)
        return cls(kind, encode_public(kind, bytes(signer.verify_key)), signer)

    @classmethod
    def generate(cls, kind: KeyKind) -> SigningKey:
        return cls.from_seed(encode_seed(kind, secrets.token_bytes(32)))

    @property
    def seed(self) -> str:
        return encode_seed(self.kind, bytes(self._signer))

    def sign(self, data: bytes) -> bytes:
        # libsodium directly: PyNaCl's SigningKey.sign wraps the same call in a SignedMessage.
        return nacl.bindings.crypto_sign(data, self._signer._signing_key)[:64]

    def __repr__(self) -> str:
        return f"SigningKey({self.kind.name}, {self.public})"


@dataclass(frozen=True, slots=True)
class CurveKey:
    """An X25519 key (xkey) with its seed; the seed's raw bytes are the private scalar."""

    public: str
    private: nacl.public.PrivateKey

    @classmethod
    def from_seed(cls, seed: str) -> CurveKey:
        kind, raw = decode_seed(seed.strip())
        if kind is not KeyKind.CURVE:
            raise KeyError_(f"expected a curve (SX...) seed, got a {kind.name.lower()} seed")
        private = nacl.public.PrivateKey(raw)
        return cls(encode_public(KeyKind.CURVE, bytes(private.public_key)), private)

    @classmethod
    def generate(cls) -> CurveKey:
        return cls.from_seed(encode_seed(KeyKind.CURVE, secrets.token_bytes(32)))

    @property
    def seed(self) -> str:
        return encode_seed(KeyKind.CURVE, bytes(self.private))

    def __repr__(self) -> str:
        return f"CurveKey({self.public})"


def verify(public_raw: bytes, data: bytes, signature: bytes) -> bool:
    if len(public_raw) != 32 or len(signature) != 64:
        return False
    try:
        # libsodium directly (what PyNaCl's VerifyKey.verify calls, without the key object).
        nacl.bindings.crypto_sign_open(signature + data, public_raw)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
        return False
    return True


class SeedFileError(ValueError):
    """A seed file that cannot be used; the message names the file, never its content."""


def read_seed_file(path: str | os.PathLike[str]) -> str:
    """Read a seed file, refusing ones that group or others can read (they leak the key)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SeedFileError(f"seed file {p} does not exist") from None
    except OSError as exc:
        raise SeedFileError(f"seed file {p} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SeedFileError(f"seed file {p} is not a regular file")
    if st.st_mode & 0o077:
        raise SeedFileError(
            f"seed file {p} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o});"
            f" run: chmod 600 {p}"
        )
    if st.st_size > _MAX_SEED_FILE:
        raise SeedFileError(f"seed file {p} is too large to be a seed file")
    try:
        text = p.read_text("ascii")
    except (OSError, UnicodeDecodeError):
        raise SeedFileError(f"seed file {p} is not an ASCII nkey seed") from None
    # Accept a bare seed or a .creds-style file: the first line that looks like a seed.
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("S") and len(line) == SEED_LENGTH:
            return line
    raise SeedFileError(f"seed file {p} holds no nkey seed")


def load_signing_key(path: str | os.PathLike[str], kind: KeyKind, what: str) -> SigningKey:
    """Load a seed of a given kind, with a message naming the role when it is the wrong kind."""
    seed = read_seed_file(path)
    try:
        decoded_kind, _ = decode_seed(seed)
    except KeyError_ as exc:
        raise SeedFileError(f"{what} seed file {path}: {exc}") from None
    if decoded_kind is not kind:
        raise SeedFileError(
            f"{what} seed file {path} holds a {decoded_kind.name.lower()} seed;"
            f" expected a {kind.name.lower()} seed (S{kind.letter}...)"
        )
    return SigningKey.from_seed(seed)


def load_curve_key(path: str | os.PathLike[str]) -> CurveKey:
    seed = read_seed_file(path)
    try:
        return CurveKey.from_seed(seed)
    except KeyError_ as exc:
        raise SeedFileError(f"xkey seed file {path}: {exc}") from None


def write_secret(path: Path, text: str) -> None:
    """Create a 0600 file: key material is never world-readable, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
