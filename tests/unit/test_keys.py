"""callout.keys against the `nkeys` package (and the harness's nkeys-based curve helpers) as the
reference: every kind, both directions, and every way a key string or a seed file can be bad."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Any

import nacl.signing
import nkeys
import pytest

from callout.keys import (
    PUBLIC_KEY_LENGTH,
    SEED_LENGTH,
    CurveKey,
    KeyError_,
    KeyKind,
    SeedFileError,
    SigningKey,
    decode_public,
    decode_seed,
    encode_public,
    encode_seed,
    is_public,
    keys_equal,
    load_curve_key,
    load_signing_key,
    read_seed_file,
    verify,
    write_secret,
)
from tests.support.nats import (
    VECTOR_PUB,
    VECTOR_SEED,
    curve_public_from_seed,
    decode_curve_seed,
    encode_curve_public,
    encode_curve_seed,
    new_account,
    new_curve,
    new_user,
)

SIGNING_KINDS = {
    KeyKind.OPERATOR: nkeys.PREFIX_BYTE_OPERATOR,
    KeyKind.SERVER: nkeys.PREFIX_BYTE_SERVER,
    KeyKind.CLUSTER: nkeys.PREFIX_BYTE_CLUSTER,
    KeyKind.ACCOUNT: nkeys.PREFIX_BYTE_ACCOUNT,
    KeyKind.USER: nkeys.PREFIX_BYTE_USER,
}


def _reencode(body: bytes) -> str:
    return base64.b32encode(body).decode().rstrip("=")


def _raw(text: str) -> bytes:
    return base64.b32decode(text + "=" * (-len(text) % 8))


# ---------------------------------------------------------------------------------------------
# codec vs nkeys
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(SIGNING_KINDS), ids=lambda k: k.name)
def test_signing_kinds_match_nkeys(kind: KeyKind) -> None:
    raw = secrets.token_bytes(32)
    reference_seed: str = nkeys.encode_seed(raw, SIGNING_KINDS[kind]).decode()
    reference = nkeys.from_seed(reference_seed.encode())
    reference_public: str = reference.public_key.decode()
    verify_raw = bytes(nacl.signing.SigningKey(raw).verify_key)

    assert kind.letter == reference_public[0]
    assert encode_seed(kind, raw) == reference_seed
    assert decode_seed(reference_seed) == (kind, raw)
    assert encode_public(kind, verify_raw) == reference_public
    assert decode_public(reference_public, kind) == verify_raw
    assert len(reference_public) == PUBLIC_KEY_LENGTH and len(reference_seed) == SEED_LENGTH
    assert is_public(reference_public, kind)

    key = SigningKey.from_seed(reference_seed)
    assert key.kind is kind
    assert key.public == reference_public
    assert key.seed == reference_seed
    message = b"nonce-" + secrets.token_bytes(8)
    assert reference.verify(message, key.sign(message))  # nkeys raises on a bad signature
    assert verify(verify_raw, message, reference.sign(message))


@pytest.mark.parametrize("kind", list(SIGNING_KINDS), ids=lambda k: k.name)
def test_generated_keys_decode_with_nkeys(kind: KeyKind) -> None:
    key = SigningKey.generate(kind)
    prefix, raw = nkeys.decode_seed(key.seed.encode())
    assert prefix == SIGNING_KINDS[kind]
    assert nkeys.from_seed(key.seed.encode()).public_key.decode() == key.public
    assert decode_seed(key.seed) == (kind, raw)


def test_public_key_of_one_kind_is_not_another() -> None:
    _, account = new_account()
    _, user = new_user()
    assert decode_public(user, KeyKind.USER)
    for kind in KeyKind:
        if kind is not KeyKind.USER:
            with pytest.raises(KeyError_, match="public key"):
                decode_public(user, kind)
    with pytest.raises(KeyError_, match=r"not a user public key \(starts with 'A'\)"):
        decode_public(account, KeyKind.USER)
    assert not is_public(account, KeyKind.USER)


def test_curve_vector_and_random_curve_keys() -> None:
    key = CurveKey.from_seed(VECTOR_SEED)
    assert key.public == VECTOR_PUB
    assert key.seed == VECTOR_SEED
    raw = decode_curve_seed(VECTOR_SEED)
    assert encode_seed(KeyKind.CURVE, raw) == VECTOR_SEED
    assert decode_seed(VECTOR_SEED) == (KeyKind.CURVE, raw)
    assert decode_public(VECTOR_PUB, KeyKind.CURVE) == bytes(key.private.public_key)

    seed, public = new_curve()
    mine = CurveKey.from_seed(seed)
    assert mine.public == public == curve_public_from_seed(seed)
    assert encode_public(KeyKind.CURVE, bytes(mine.private.public_key)) == public
    generated = CurveKey.generate()
    assert encode_curve_seed(decode_curve_seed(generated.seed)) == generated.seed
    assert curve_public_from_seed(generated.seed) == generated.public
    assert encode_curve_public(decode_public(generated.public, KeyKind.CURVE)) == generated.public


def test_curve_and_signing_seeds_are_not_interchangeable() -> None:
    user_seed, _ = new_user()
    with pytest.raises(KeyError_, match=r"expected a curve \(SX\.\.\.\) seed, got a user seed"):
        CurveKey.from_seed(user_seed)
    with pytest.raises(KeyError_, match="cannot sign"):
        SigningKey.from_seed(VECTOR_SEED)


def test_seed_whitespace_is_stripped_and_repr_hides_seed() -> None:
    seed, public = new_user()
    key = SigningKey.from_seed(f"  {seed}\n")
    assert key.public == public
    assert seed not in repr(key) and public in repr(key)
    curve = CurveKey.from_seed(VECTOR_SEED + "\n")
    assert VECTOR_SEED not in repr(curve) and VECTOR_PUB in repr(curve)


# ---------------------------------------------------------------------------------------------
# bad key strings
# ---------------------------------------------------------------------------------------------
def test_bad_checksum() -> None:
    seed, public = new_user()
    body = _raw(public)
    bad_crc = body[:-2] + bytes([body[-2] ^ 0x01, body[-1]])
    with pytest.raises(KeyError_, match="checksum"):
        decode_public(_reencode(bad_crc), KeyKind.USER)
    flipped_key = body[:5] + bytes([body[5] ^ 0x80]) + body[6:]
    with pytest.raises(KeyError_, match="checksum"):
        decode_public(_reencode(flipped_key), KeyKind.USER)

    seed_body = _raw(seed)
    bad_seed = seed_body[:-1] + bytes([seed_body[-1] ^ 0xFF])
    with pytest.raises(KeyError_, match="checksum"):
        decode_seed(_reencode(bad_seed))
    with pytest.raises(KeyError_):
        SigningKey.from_seed(_reencode(bad_seed))


def test_wrong_kind_of_text() -> None:
    seed, public = new_user()
    with pytest.raises(KeyError_, match="not a user public key"):
        decode_public(seed, KeyKind.USER)  # a seed is not a public key
    with pytest.raises(KeyError_, match="not an nkey seed"):
        decode_seed(public)  # nor a public key a seed
    # A 58-character string with a valid checksum whose first byte is not the seed prefix.
    body = bytes([nkeys.PREFIX_BYTE_USER, 0]) + secrets.token_bytes(32)
    fake_seed = _reencode(body + bytes(nkeys.crc16_checksum(body)))
    assert len(fake_seed) == SEED_LENGTH
    with pytest.raises(KeyError_, match="not an nkey seed"):
        decode_seed(fake_seed)
    # A seed whose role is not a known kind ('P', the private-key prefix).
    role = nkeys.PREFIX_BYTE_PRIVATE
    body = bytes([nkeys.PREFIX_BYTE_SEED | role >> 5, (role & 31) << 3]) + secrets.token_bytes(32)
    with pytest.raises(KeyError_, match="unknown kind"):
        decode_seed(_reencode(body + bytes(nkeys.crc16_checksum(body))))


def test_lowercase_and_non_ascii_are_refused() -> None:
    seed, public = new_user()
    with pytest.raises(KeyError_, match="base32"):
        decode_public(public.lower(), KeyKind.USER)
    with pytest.raises(KeyError_, match="base32"):
        decode_seed(seed.lower())
    # Lower-case one letter (the last character may be a digit, which has no lower case).
    i = max(j for j, ch in enumerate(public) if ch.isalpha())
    assert not is_public(public[:i] + public[i].lower() + public[i + 1 :], KeyKind.USER)
    with pytest.raises(KeyError_, match="base32"):
        decode_public(public[:-1] + "é", KeyKind.USER)
    with pytest.raises(KeyError_, match="base32"):
        decode_public(public[:-1] + "1", KeyKind.USER)  # '1' is not in the base32 alphabet


@pytest.mark.parametrize(
    "edit",
    [
        lambda k: "+" + k[1:],  # a sign
        lambda k: "-" + k[1:],
        lambda k: k[:20] + "_" + k[21:],  # a digit separator
        lambda k: " " + k[1:],  # whitespace
        lambda k: k[:-1] + "\n",
        lambda k: k[:20] + "0" + k[21:],  # '0', '1', '8', '9' are not base32 digits
        lambda k: k[:20] + "8" + k[21:],
    ],
)
def test_public_keys_are_read_strictly(edit: Any) -> None:
    # Public keys decode as one base-32 integer; int() itself would accept all of these.
    _, public = new_user()
    bad = edit(public)
    assert len(bad) == PUBLIC_KEY_LENGTH and bad != public
    with pytest.raises(KeyError_, match="base32"):
        decode_public(bad, KeyKind.USER)


@pytest.mark.parametrize("cut", [-1, -8, 1])
def test_wrong_length(cut: int) -> None:
    seed, public = new_user()
    short_or_long = public[:cut] if cut < 0 else public + "A" * cut
    with pytest.raises(KeyError_):
        decode_public(short_or_long, KeyKind.USER)
    with pytest.raises(KeyError_, match="not an nkey seed"):
        decode_seed(seed[:cut] if cut < 0 else seed + "A" * cut)
    with pytest.raises(KeyError_):
        decode_public("", KeyKind.USER)


def test_encoders_refuse_wrong_raw_length() -> None:
    with pytest.raises(KeyError_, match="32 bytes"):
        encode_public(KeyKind.USER, b"\0" * 31)
    with pytest.raises(KeyError_, match="32 bytes"):
        encode_seed(KeyKind.ACCOUNT, b"\0" * 33)


def test_verify_never_raises() -> None:
    key = SigningKey.generate(KeyKind.USER)
    raw = decode_public(key.public, KeyKind.USER)
    sig = key.sign(b"data")
    assert verify(raw, b"data", sig)
    assert not verify(raw, b"other", sig)
    assert not verify(raw, b"data", sig[:-1])  # wrong length
    assert not verify(raw, b"data", b"")
    assert not verify(
        decode_public(SigningKey.generate(KeyKind.USER).public, KeyKind.USER), b"data", sig
    )


def test_keys_equal() -> None:
    _, a = new_user()
    _, b = new_user()
    assert keys_equal(a, a)
    assert keys_equal(a, str(a))
    assert not keys_equal(a, b)
    assert not keys_equal(a, a[:-1])
    assert not keys_equal(a, a.lower())
    assert not keys_equal(a, "")
    assert keys_equal("", "")


# ---------------------------------------------------------------------------------------------
# seed files
# ---------------------------------------------------------------------------------------------
def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_read_seed_file_bare_seed(tmp_path: Path) -> None:
    seed, _ = new_user()
    assert read_seed_file(_write(tmp_path / "u.nk", seed + "\n")) == seed
    assert read_seed_file(_write(tmp_path / "v.nk", f"\n   {seed}   \n")) == seed


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644, 0o660, 0o601])
def test_read_seed_file_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    seed, _ = new_user()
    path = _write(tmp_path / "u.nk", seed, mode)
    with pytest.raises(SeedFileError) as info:
        read_seed_file(path)
    message = str(info.value)
    assert f"chmod 600 {path}" in message
    assert f"{mode:04o}" in message
    assert seed not in message


def test_read_seed_file_accepts_owner_only_modes(tmp_path: Path) -> None:
    seed, _ = new_user()
    assert read_seed_file(_write(tmp_path / "ro.nk", seed, 0o400)) == seed


def test_read_seed_file_missing_and_not_regular(tmp_path: Path) -> None:
    with pytest.raises(SeedFileError, match="does not exist"):
        read_seed_file(tmp_path / "nope.nk")
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(SeedFileError, match="not a regular file"):
        read_seed_file(directory)


def test_read_seed_file_without_a_seed(tmp_path: Path) -> None:
    _, public = new_user()
    for i, text in enumerate(["", "hello\n", public + "\n", "S" * 10 + "\n"]):
        with pytest.raises(SeedFileError, match="holds no nkey seed"):
            read_seed_file(_write(tmp_path / f"f{i}.nk", text))
    binary = tmp_path / "bin.nk"
    binary.write_bytes(b"\xff\xfe" + os.urandom(30))
    binary.chmod(0o600)
    with pytest.raises(SeedFileError, match="not an ASCII nkey seed"):
        read_seed_file(binary)
    big = _write(tmp_path / "big.nk", "x" * 5000)
    with pytest.raises(SeedFileError, match="too large"):
        read_seed_file(big)


def test_read_seed_file_creds_style(tmp_path: Path) -> None:
    seed, _ = new_user()
    creds = (
        "-----BEGIN NATS USER JWT-----\n"
        "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJVIn0.c2ln\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n"
    )
    assert read_seed_file(_write(tmp_path / "u.creds", creds)) == seed


def test_load_signing_key_checks_the_kind(tmp_path: Path) -> None:
    user_seed, user_public = new_user()
    account_seed, account_public = new_account()
    user_file = _write(tmp_path / "user.nk", user_seed)
    account_file = _write(tmp_path / "account.nk", account_seed)
    assert load_signing_key(user_file, KeyKind.USER, "service").public == user_public
    assert load_signing_key(account_file, KeyKind.ACCOUNT, "issuer").public == account_public
    with pytest.raises(SeedFileError) as info:
        load_signing_key(user_file, KeyKind.ACCOUNT, "issuer (--issuer-seed-file)")
    message = str(info.value)
    assert "issuer (--issuer-seed-file)" in message
    assert "holds a user seed" in message and "(SA...)" in message
    assert user_seed not in message

    corrupt = _raw(user_seed)
    corrupt = corrupt[:-1] + bytes([corrupt[-1] ^ 0xFF])
    bad_file = _write(tmp_path / "bad.nk", _reencode(corrupt))
    with pytest.raises(SeedFileError, match="checksum"):
        load_signing_key(bad_file, KeyKind.USER, "service")

    curve_file = _write(tmp_path / "x.nk", VECTOR_SEED)
    assert load_curve_key(curve_file).public == VECTOR_PUB
    with pytest.raises(SeedFileError, match=r"xkey seed file .*expected a curve"):
        load_curve_key(user_file)


def test_write_secret_is_owner_only_and_exclusive(tmp_path: Path) -> None:
    seed, _ = new_user()
    path = tmp_path / "new.nk"
    write_secret(path, seed)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_seed_file(path) == seed
    with pytest.raises(FileExistsError):
        write_secret(path, seed)
