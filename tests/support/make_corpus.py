"""(Re)write the hostile-input corpus, ``tests/hostile/corpus/*.json``. Run by hand:

    .venv/bin/python -m tests.support.make_corpus          # rewrite the corpus
    .venv/bin/python -m tests.support.make_corpus --check  # exit 1 if the files are stale
    .venv/bin/python -m tests.support.make_corpus --docs   # also refresh docs/reliability.md

Requests are built with ``tests.support.forge`` (server-like claims, nats-io/jwt encoding) from a
valid request that the core admits (``test_corpus_core`` checks it), with one thing made
hostile per case. Every key, nonce and xkey box nonce is derived from the case name
(SHA-256), so a rerun writes byte-identical files and ``test_corpus_core`` can check that the
files on disk are exactly what this script writes.

The client of each request has a valid record in the case's ``users`` map: a hostile input
that slipped past a check would therefore show up as an admit, not as ``unknown_user``.

``--docs`` runs every case through the core and rewrites the hostile-input section of
``docs/reliability.md`` (between its ``hostile:begin`` / ``hostile:end`` markers) with the
table and the totals; the rest of the file is left alone.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import nacl.public
import nkeys

from callout import decision as d
from tests.support import forge
from tests.support.forge import DELETE, ClientKey, ServerIdentity
from tests.support.hostile import CORPUS, UNADDRESSABLE, Answer, Case, dump, load_all, run_core
from tests.support.nats import curve_public_from_seed, decode_curve_public, encode_curve_seed

# 2023-11-14: in the past, as a recorded request is, so a service whose clock is pinned to it
# for a case and then set back to real time sees time move forward, never back. The fraction
# makes the whole-second truncation of exp matter (docs/protocol.md §1).
NOW = 1_700_000_000.25
DOCS = CORPUS.parent.parent.parent / "docs" / "reliability.md"
BEGIN, END = "<!-- hostile:begin -->", "<!-- hostile:end -->"


# ---------------------------------------------------------------------------------------------
# deterministic keys
# ---------------------------------------------------------------------------------------------
def raw32(label: str) -> bytes:
    return hashlib.sha256(b"callout hostile corpus/" + label.encode()).digest()


def signing_seed(label: str, prefix: int) -> str:
    seed: bytes = nkeys.encode_seed(raw32(label), prefix)
    return seed.decode()


def public_of(seed: str) -> str:
    public: bytes = nkeys.from_seed(seed.encode()).public_key
    return public.decode()


def curve_seed(label: str) -> str:
    return encode_curve_seed(raw32(label))


def server_identity(label: str) -> ServerIdentity:
    seed = signing_seed(label, nkeys.PREFIX_BYTE_SERVER)
    xseed = curve_seed(label + "/xkey")
    return ServerIdentity(seed, public_of(seed), xseed, curve_public_from_seed(xseed))


def client_key(label: str) -> ClientKey:
    seed = signing_seed(label, nkeys.PREFIX_BYTE_USER)
    return ClientKey(seed, public_of(seed))


def user_public(label: str) -> str:
    return public_of(signing_seed(label, nkeys.PREFIX_BYTE_USER))


def nonce_for(label: str) -> str:
    return forge.b64url(raw32(label)[:11]).decode()


ISSUER_SEED = signing_seed("issuer", nkeys.PREFIX_BYTE_ACCOUNT)
SERVICE_SEED = signing_seed("service", nkeys.PREFIX_BYTE_USER)
XKEY_SEED = curve_seed("service xkey")
SERVER = server_identity("server")
OTHER_SERVER = server_identity("other server")
KEYS = {
    "issuer_seed": ISSUER_SEED,
    "issuer_pub": public_of(ISSUER_SEED),
    "service_seed": SERVICE_SEED,
    "service_pub": public_of(SERVICE_SEED),
    "xkey_seed": XKEY_SEED,
    "xkey_pub": curve_public_from_seed(XKEY_SEED),
    "server_pub": SERVER.public,
    "server_xkey_seed": SERVER.xkey_seed,
    "server_xkey_pub": SERVER.xkey_public,
}
GOOD_RECORD = {
    "name": "hostile-corpus",
    "admin": False,
    "revoked": False,
    "account": None,
    "permissions": {"pub": {"allow": ["orders.>"], "deny": []}, "sub": {"allow": ["_INBOX.>"]}},
}

# What a deny of each reason looks like on the wire (decision.py: gate 1 cannot address a
# signed error; an expired request is dropped; everything after gate 1 is a signed error).
EMPTY_REASONS = UNADDRESSABLE - {d.EXPIRED}


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def b64(data: bytes) -> bytes:
    return forge.b64url(data)


def sign_segments(header: bytes, claims: bytes, signer: nkeys.KeyPair | None = None) -> bytes:
    """A JWT over exact header and claims bytes (for JSON Python cannot or should not write)."""
    signing_input = b64(header) + b"." + b64(claims)
    return signing_input + b"." + b64((signer or SERVER.keypair).sign(signing_input))


def seal(token: bytes, label: str, *, sender: ServerIdentity = SERVER, to: str = "") -> bytes:
    """`xkv1` + nonce + crypto_box(sender -> service xkey), the nonce derived from `label`."""
    recipient = nacl.public.PublicKey(decode_curve_public(to or KEYS["xkey_pub"]))
    box = nacl.public.Box(sender.curve_private, recipient)
    return forge.XKEY_MAGIC + bytes(box.encrypt(token, raw32(label + "/box")[:24]))


@dataclass
class Req:
    """A request being built: claims (forge-shaped), then encoded and optionally sealed."""

    name: str
    client: ClientKey
    claims: dict[str, Any]
    nonce: str

    @property
    def user_nkey(self) -> str:
        value: str = self.claims["nats"]["user_nkey"]
        return value

    def token(self, **kwargs: Any) -> bytes:
        return forge.encode_jwt(
            self.claims, kwargs.get("signer") or SERVER.keypair, kwargs.get("header")
        )


def request(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    xkey: bool = False,
    sig_encoding: forge.SigEncoding = "rawurl",
    sign_nonce: str | None = None,
    signer_client: ClientKey | None = None,
) -> Req:
    """The claims nats-server 2.15.1 sends for an nkey client, then `overrides` deep-merged
    (`DELETE` removes a claim). `sign_nonce`: what the client signed, when not the nonce;
    `signer_client`: who signed it, when not the claimed key."""
    client = client_key(name + "/client")
    nonce = nonce_for(name + "/nonce")
    claims = forge.request_claims(
        SERVER,
        KEYS["issuer_pub"],
        now=NOW,
        client=client,
        nonce=nonce,
        user_nkey=user_public(name + "/user_nkey"),
        sig_encoding=sig_encoding,
        xkey=xkey,
    )
    if sign_nonce is not None or signer_client is not None:
        signer = signer_client or client
        signed = sign_nonce if sign_nonce is not None else nonce
        sig = forge.encode_sig(signer.signature(signed), sig_encoding)
        claims["nats"]["connect_opts"]["sig"] = sig
    if overrides:
        claims = forge.merge(claims, overrides)
    return Req(name, client, claims, nonce)


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------
@dataclass
class Spec:
    name: str
    group: str
    input: str
    reason: str
    payload: bytes
    headers: dict[str, str] | None = None
    xkey: bool = False
    users: dict[str, str | None] = field(default_factory=dict)
    sub: str | None = None
    known_issue: str | None = None


def _answer(reason: str) -> Answer:
    if reason == d.EXPIRED:
        return "drop"
    return "empty" if reason in EMPTY_REASONS else "error"


def addressee(claims: Mapping[str, Any]) -> str | None:
    """The user_nkey a signed error goes to (None when the claims do not name one)."""
    nats = claims.get("nats")
    sub = nats.get("user_nkey") if isinstance(nats, dict) else None
    return sub if isinstance(sub, str) else None


def good_users(req: Req, record: Any = None) -> dict[str, str | None]:
    text = record if isinstance(record, str) else json.dumps(record or GOOD_RECORD)
    return {req.client.public: text}


def plain(
    name: str,
    group: str,
    text: str,
    reason: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    known_issue: str | None = None,
    record: Any = None,
    **kwargs: Any,
) -> Spec:
    """A request with `overrides`, signed by the server, plaintext, to a service without xkey."""
    req = request(name, overrides, **kwargs)
    return Spec(
        name,
        group,
        text,
        reason,
        req.token(),
        users=good_users(req, record),
        sub=addressee(req.claims),
        known_issue=known_issue,
    )


def sealed(
    name: str,
    group: str,
    text: str,
    reason: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    record: Any = None,
    **kwargs: Any,
) -> Spec:
    """The same, sealed to the service's xkey with the server's header, as the server does."""
    req = request(name, overrides, xkey=True, **kwargs)
    payload = seal(req.token(), name)
    return Spec(
        name,
        group,
        text,
        reason,
        payload,
        {forge.XKEY_HEADER: SERVER.xkey_public},
        xkey=True,
        users=good_users(req, record),
        sub=req.user_nkey,
    )


def raw(name: str, group: str, text: str, reason: str, payload: bytes, **kwargs: Any) -> Spec:
    """Exact payload bytes; the client that would have sent it still has a record."""
    req = request(name)
    kwargs.setdefault("users", good_users(req))
    return Spec(name, group, text, reason, payload, **kwargs)


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


def with_raw_claim(req: Req, path: tuple[str, ...], json_text: str) -> bytes:
    """Claims JSON with `json_text` spliced in at `path` (JSON Python's encoder would refuse,
    e.g. 100k nested arrays), signed by the server."""
    marker = "__HOSTILE__"
    claims = forge.merge(req.claims, {})
    node = claims
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = marker
    body = forge.compact(claims).replace(b'"' + marker.encode() + b'"', json_text.encode())
    return sign_segments(forge.compact(forge.HEADER), body)


def pad_to_misalign(req: Req) -> Req:
    """A request whose claims segment needs base64 padding (length not a multiple of 4)."""
    filler = ""
    while len(b64(forge.compact({**req.claims, "x": filler}))) % 4 == 0:
        filler += "x"
    req.claims["x"] = filler
    return req


def size_cases() -> Iterator[Spec]:
    g = "size"
    yield plain(
        "oversize_signed_request",
        g,
        "valid, signed request with a 99 kB connect_opts.name",
        d.OVERSIZE,
        {"nats": {"connect_opts": {"name": "n" * 99_000}}},
    )
    yield raw(
        "oversize_limit_plus_one",
        g,
        f"{d.MAX_REQUEST_BYTES + 1} bytes of base64url after eyJ",
        d.OVERSIZE,
        b"eyJ" + b"A" * (d.MAX_REQUEST_BYTES - 2),
    )
    req = request("deep_nesting_100k_arrays")
    yield Spec(
        req.name,
        g,
        "100,000 nested arrays in client_info.tags (orjson's depth limit is 1024)",
        d.OVERSIZE,
        with_raw_claim(req, ("nats", "client_info", "tags"), nested(100_000)),
        users=good_users(req),
    )
    req = request("deep_nesting_40k_arrays")
    yield Spec(
        req.name,
        g,
        "40,000 nested arrays in client_info.tags, under the size limit",
        d.MALFORMED,
        with_raw_claim(req, ("nats", "client_info", "tags"), nested(40_000)),
        users=good_users(req),
    )
    req = request("deep_nesting_2000_objects_in_exp")
    yield Spec(
        req.name,
        g,
        "exp is 2,000 nested objects",
        d.MALFORMED,
        with_raw_claim(req, ("exp",), '{"a":' * 2000 + "1" + "}" * 2000),
        users=good_users(req),
    )
    req = request("deep_nesting_500_arrays_in_sig")
    yield Spec(
        req.name,
        g,
        "connect_opts.sig is 500 nested arrays (parses; wrong type)",
        d.NO_SIGNATURE,
        with_raw_claim(req, ("nats", "connect_opts", "sig"), nested(500)),
        users=good_users(req),
        sub=req.user_nkey,
    )
    req = request("deep_nesting_500_arrays_in_exp")
    yield Spec(
        req.name,
        g,
        "exp is 500 nested arrays (parses; wrong type)",
        d.MALFORMED,
        with_raw_claim(req, ("exp",), nested(500)),
        users=good_users(req),
    )
    req = request("deep_nesting_in_jwt_header")
    header = b'{"typ":"JWT","alg":"ed25519-nkey","x":' + nested(2000).encode() + b"}"
    yield Spec(
        req.name,
        g,
        "JWT header carries 2,000 nested arrays",
        d.MALFORMED,
        sign_segments(header, forge.compact(req.claims)),
        users=good_users(req),
    )


def encoding_cases() -> Iterator[Spec]:
    g = "encoding"
    yield raw("empty_payload", g, "zero bytes", d.MALFORMED, b"")
    yield raw(
        "non_utf8_garbage", g, "bytes 0xff 0xfe 0xfd repeated", d.MALFORMED, b"\xff\xfe\xfd" * 100
    )
    req = request("non_utf8_in_claims")
    body = forge.compact(req.claims).replace(b'"python3"', b'"py\xff\xfe"')
    yield Spec(
        req.name,
        g,
        "claims JSON holds invalid UTF-8 (0xff 0xfe in a string), signed",
        d.MALFORMED,
        sign_segments(forge.compact(forge.HEADER), body),
        users=good_users(req),
    )
    req = request("non_utf8_in_header")
    yield Spec(
        req.name,
        g,
        "JWT header JSON holds invalid UTF-8, signed",
        d.MALFORMED,
        sign_segments(
            b'{"typ":"JWT","alg":"ed25519-nkey","x":"\xc3\x28"}', forge.compact(req.claims)
        ),
        users=good_users(req),
    )
    h, p, s = request("non_ascii_in_segment").token().split(b".")
    yield raw(
        "non_ascii_in_segment",
        g,
        "a UTF-8 'é' inside the claims segment",
        d.MALFORMED,
        h + b"." + p[:40] + "é".encode() + p[40:] + b"." + s,
    )
    yield raw(
        "nul_byte_appended",
        g,
        "a valid token followed by a NUL byte",
        d.MALFORMED,
        request("nul_byte_appended").token() + b"\x00",
    )
    yield raw(
        "crlf_appended",
        g,
        "a valid token followed by CRLF",
        d.MALFORMED,
        request("crlf_appended").token() + b"\r\n",
    )
    yield raw(
        "leading_space",
        g,
        "a space before a valid token",
        d.MALFORMED,
        b" " + request("leading_space").token(),
    )
    yield raw(
        "utf8_bom",
        g,
        "a UTF-8 byte-order mark before a valid token",
        d.MALFORMED,
        b"\xef\xbb\xbf" + request("utf8_bom").token(),
    )
    yield raw(
        "json_not_jwt",
        g,
        "the claims as bare JSON, no JWT",
        d.MALFORMED,
        forge.compact(request("json_not_jwt").claims),
    )


def structure_cases() -> Iterator[Spec]:
    g = "jwt"
    for count, name in ((1, "one_segment"), (2, "two_segments")):
        parts = request(name).token().split(b".")[:count]
        yield raw(
            name, g, f"only the first {count} of the 3 JWT segments", d.MALFORMED, b".".join(parts)
        )
    for extra, name in ((1, "four_segments"), (2, "five_segments")):
        tok = request(name).token()
        yield raw(
            name,
            g,
            f"a valid token with {extra} extra segment(s)",
            d.MALFORMED,
            tok + b".e30" * extra,
        )
    yield raw("empty_segments", g, "'..': three empty segments", d.MALFORMED, b"..")
    for part, label in ((0, "header"), (1, "claims"), (2, "signature")):
        req = pad_to_misalign(request(f"padded_{label}_segment"))
        segs = req.token(header={"typ": "JWT", "alg": "ed25519-nkey", "p": "x"}).split(b".")
        if len(segs[part]) % 4 == 0:  # pad the header by one more character if it is aligned
            segs = req.token(header={"typ": "JWT", "alg": "ed25519-nkey", "p": "xx"}).split(b".")
        segs[part] += b"=" * (-len(segs[part]) % 4)
        assert segs[part].endswith(b"=")
        yield raw(
            f"padded_{label}_segment",
            g,
            f"the {label} segment carries base64 '=' padding",
            d.MALFORMED,
            b".".join(segs),
        )
    name = "std_alphabet_claims"
    filler = 0
    while True:
        req = request(name, {"x": "?" * filler})
        h, p, s = req.token().split(b".")
        if b"-" in p or b"_" in p:
            break
        filler += 1
    p = p.replace(b"-", b"+").replace(b"_", b"/")
    yield raw(
        name,
        g,
        "claims segment in standard base64 ('+', '/') instead of base64url",
        d.MALFORMED,
        h + b"." + p + b"." + s,
    )

    headers: list[tuple[str, str, Any]] = [
        ("alg_hs256", "alg HS256", {"typ": "JWT", "alg": "HS256"}),
        ("alg_none", "alg none", {"typ": "JWT", "alg": "none"}),
        ("alg_missing", "no alg", {"typ": "JWT"}),
        ("alg_int", "alg is a number", {"typ": "JWT", "alg": 123}),
        ("alg_list", "alg is a list", {"typ": "JWT", "alg": ["ed25519-nkey"]}),
        ("alg_null", "alg is null", {"typ": "JWT", "alg": None}),
        ("alg_case", "alg ED25519-NKEY", {"typ": "JWT", "alg": "ED25519-NKEY"}),
        ("typ_lowercase", "typ jwt", {"typ": "jwt", "alg": "ed25519-nkey"}),
        ("typ_missing", "no typ", {"alg": "ed25519-nkey"}),
        ("typ_int", "typ is a number", {"typ": 1, "alg": "ed25519-nkey"}),
        ("header_list", "header is a JSON list", ["JWT", "ed25519-nkey"]),
        ("header_string", "header is a JSON string", "JWT"),
        ("header_null", "header is JSON null", None),
    ]
    for name, text, header in headers:
        req = request(name)
        yield Spec(
            name,
            g,
            f"JWT header: {text}, validly signed",
            d.MALFORMED,
            sign_segments(forge.compact(header), forge.compact(req.claims)),
            users=good_users(req),
        )
    req = request("header_not_json")
    yield Spec(
        "header_not_json",
        g,
        "JWT header is not JSON",
        d.MALFORMED,
        sign_segments(b"typ=JWT", forge.compact(req.claims)),
        users=good_users(req),
    )
    for name, text, body in (
        ("claims_list", "claims are a JSON list", b"[]"),
        ("claims_string", "claims are a JSON string", b'"claims"'),
        ("claims_null", "claims are JSON null", b"null"),
        ("claims_number", "claims are a JSON number", b"1800000002"),
        ("claims_not_json", "claims are not JSON", b"iss=NABC"),
    ):
        yield raw(
            name,
            g,
            text + ", signed",
            d.MALFORMED,
            sign_segments(forge.compact(forge.HEADER), body),
        )

    # Signatures.
    req = request("signed_by_other_server")
    yield Spec(
        req.name,
        g,
        "iss and server_id name our server; another server signed",
        d.FORGED,
        req.token(signer=OTHER_SERVER.keypair),
        users=good_users(req),
    )
    h, p, s = request("signature_truncated").token().split(b".")
    sig = forge.b64url_decode(s)
    yield raw(
        "signature_truncated",
        g,
        "signature cut to 63 bytes",
        d.FORGED,
        h + b"." + p + b"." + b64(sig[:63]),
    )
    yield raw(
        "signature_extended",
        g,
        "signature with a 65th byte",
        d.FORGED,
        h + b"." + p + b"." + b64(sig + b"\x00"),
    )
    yield raw("signature_empty", g, "empty signature segment", d.FORGED, h + b"." + p + b".")
    yield raw(
        "signature_not_base64", g, "signature segment '!!!!'", d.MALFORMED, h + b"." + p + b".!!!!"
    )
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    yield raw(
        "signature_bit_flipped",
        g,
        "one bit of the signature flipped",
        d.FORGED,
        h + b"." + p + b"." + b64(flipped),
    )
    req = request("claims_changed_after_signing")
    h, p, s = req.token().split(b".")
    changed = forge.merge(req.claims, {"nats": {"connect_opts": {"nkey": client_key("x").public}}})
    yield raw(
        req.name,
        g,
        "connect_opts.nkey swapped after the server signed",
        d.FORGED,
        h + b"." + b64(forge.compact(changed)) + b"." + s,
    )
    req = request("header_changed_after_signing")
    h, p, s = req.token().split(b".")
    yield raw(
        req.name,
        g,
        "header alg switched to legacy 'ed25519' after signing",
        d.FORGED,
        b64(forge.compact({"typ": "JWT", "alg": "ed25519"})) + b"." + p + b"." + s,
    )
    req = request("signature_from_other_request")
    other = request("signature_from_other_request/other").token().split(b".")[2]
    h, p, _ = req.token().split(b".")
    yield raw(
        req.name,
        g,
        "signature copied from another request of the same server",
        d.FORGED,
        h + b"." + p + b"." + other,
    )


def issuer_cases() -> Iterator[Spec]:
    g = "iss/aud"
    req = request("iss_other_server", {"iss": OTHER_SERVER.public})
    yield Spec(
        req.name,
        g,
        "iss is another server, which signed; server_id.id is ours",
        d.WRONG_SERVER,
        req.token(signer=OTHER_SERVER.keypair),
        users=good_users(req),
    )
    yield plain(
        "server_id_other_server",
        g,
        "signed by iss; server_id.id names another server",
        d.WRONG_SERVER,
        {"nats": {"server_id": {"id": OTHER_SERVER.public}}},
    )
    account_seed = signing_seed("iss_account_key", nkeys.PREFIX_BYTE_ACCOUNT)
    account = nkeys.from_seed(account_seed.encode())
    req = request(
        "iss_account_key",
        {"iss": public_of(account_seed), "nats": {"server_id": {"id": public_of(account_seed)}}},
    )
    yield Spec(
        req.name,
        g,
        "iss = server_id.id = an account key (A...), which signed",
        d.MALFORMED,
        req.token(signer=account),
        users=good_users(req),
    )
    user = client_key("iss_user_key/iss")
    req = request("iss_user_key", {"iss": user.public, "nats": {"server_id": {"id": user.public}}})
    yield Spec(
        req.name,
        g,
        "iss = server_id.id = a user key (U...), which signed",
        d.MALFORMED,
        req.token(signer=nkeys.from_seed(user.seed.encode())),
        users=good_users(req),
    )
    yield plain("iss_missing", g, "no iss", d.MALFORMED, {"iss": DELETE})
    yield plain("iss_int", g, "iss is a number", d.MALFORMED, {"iss": 13})
    yield plain(
        "iss_lowercase",
        g,
        "iss is our server key in lower case",
        d.MALFORMED,
        {"iss": SERVER.public.lower()},
    )
    bad = SERVER.public[:-1] + ("A" if SERVER.public[-1] != "A" else "B")
    yield plain(
        "iss_bad_checksum", g, "iss with its last character changed", d.MALFORMED, {"iss": bad}
    )
    for name, text, aud in (
        ("aud_response", "aud nats-authorization-response", "nats-authorization-response"),
        ("aud_missing", "no aud", DELETE),
        ("aud_list", "aud is a list holding the right value", ["nats-authorization-request"]),
        ("aud_server_id", "aud is the server id", SERVER.public),
        ("aud_empty", "aud is empty", ""),
        ("aud_upper_case", "aud in upper case", "NATS-AUTHORIZATION-REQUEST"),
        ("aud_issuer", "aud is the issuer account", KEYS["issuer_pub"]),
    ):
        yield plain(name, g, text, d.NOT_FOR_US, {"aud": aud})
    for name, text, nats in (
        ("type_response", "nats.type authorization_response", {"type": "authorization_response"}),
        ("type_user", "nats.type user", {"type": "user"}),
        ("type_missing", "no nats.type", {"type": DELETE}),
        ("type_int", "nats.type is a number", {"type": 1}),
        ("version_1", "nats.version 1", {"version": 1}),
        ("version_string", 'nats.version "2"', {"version": "2"}),
        ("version_missing", "no nats.version", {"version": DELETE}),
        ("version_true", "nats.version true", {"version": True}),
    ):
        yield plain(name, g, text, d.MALFORMED, {"nats": nats})
    yield plain(
        "v1_top_level_type",
        g,
        "v1 shape: type at top level, none inside nats",
        d.MALFORMED,
        {"type": "authorization_request", "nats": {"type": DELETE}},
    )
    yield plain(
        "version_float",
        g,
        "nats.version 2.0 (a float)",
        d.MALFORMED,
        {"nats": {"version": 2.0}},
    )


def time_cases() -> Iterator[Spec]:
    g = "time"
    now = int(NOW)
    for name, text, exp in (
        ("expired_60s", "exp 60 s before now", now - 60),
        ("expired_past_leeway", "exp 31.25 s before now (leeway for clock skew is 30 s)", now - 31),
        ("expired_epoch", "exp 0", 0),
        ("expired_negative", "exp -1", -1),
    ):
        yield plain(name, g, text, d.EXPIRED, {"exp": exp})
    yield plain("not_yet_valid_60s", g, "nbf 60 s after now", d.NOT_YET_VALID, {"nbf": now + 60})
    yield plain("not_yet_valid_far", g, "nbf in 2100", d.NOT_YET_VALID, {"nbf": 4_102_444_800})
    yield plain(
        "nbf_string",
        g,
        "nbf is a string (a future time)",
        d.MALFORMED,
        {"nbf": str(now + 60)},
    )
    yield plain(
        "nbf_float_future",
        g,
        "nbf is a float 60 s in the future",
        d.MALFORMED,
        {"nbf": now + 60.5},
    )


def type_cases() -> Iterator[Spec]:
    """Wrong JSON types in every claim the core reads."""
    g = "types"
    wrong: list[tuple[str, str, dict[str, Any], str]] = [
        ("exp_string", "exp as a string", {"exp": str(int(NOW) + 2)}, d.MALFORMED),
        ("exp_float", "exp as a float", {"exp": int(NOW) + 2.0}, d.MALFORMED),
        ("exp_bool", "exp true", {"exp": True}, d.MALFORMED),
        ("exp_null", "exp null", {"exp": None}, d.MALFORMED),
        ("exp_missing", "no exp", {"exp": DELETE}, d.MALFORMED),
        ("exp_list", "exp as a list", {"exp": [int(NOW) + 2]}, d.MALFORMED),
        ("exp_object", "exp as an object", {"exp": {"v": int(NOW) + 2}}, d.MALFORMED),
        ("exp_beyond_int64", "exp 2^64 (a float once parsed)", {"exp": 2**64}, d.MALFORMED),
        ("nats_list", "nats as a list", {}, d.MALFORMED),
        (
            "server_id_string",
            "server_id as a string",
            {"nats": {"server_id": SERVER.public}},
            d.MALFORMED,
        ),
        (
            "server_id_list",
            "server_id as a list",
            {"nats": {"server_id": [SERVER.public]}},
            d.MALFORMED,
        ),
        ("server_id_null", "server_id null", {"nats": {"server_id": None}}, d.MALFORMED),
        (
            "server_id_id_int",
            "server_id.id as a number",
            {"nats": {"server_id": {"id": 1}}},
            d.MALFORMED,
        ),
        (
            "server_id_id_missing",
            "no server_id.id",
            {"nats": {"server_id": {"id": DELETE}}},
            d.MALFORMED,
        ),
        ("user_nkey_int", "user_nkey as a number", {"nats": {"user_nkey": 1}}, d.MALFORMED),
        ("user_nkey_list", "user_nkey as a list", {"nats": {"user_nkey": ["U"]}}, d.MALFORMED),
        ("user_nkey_null", "user_nkey null", {"nats": {"user_nkey": None}}, d.MALFORMED),
        ("user_nkey_missing", "no user_nkey", {"nats": {"user_nkey": DELETE}}, d.MALFORMED),
        (
            "client_info_list",
            "client_info as a list",
            {"nats": {"client_info": ["nonce"]}},
            d.MALFORMED,
        ),
        (
            "client_info_string",
            "client_info as a string",
            {"nats": {"client_info": "x"}},
            d.MALFORMED,
        ),
        ("client_info_int", "client_info as a number", {"nats": {"client_info": 5}}, d.MALFORMED),
        (
            "client_info_null",
            "client_info null (so no nonce)",
            {"nats": {"client_info": None}},
            d.NO_SIGNATURE,
        ),
        (
            "nonce_list",
            "client_info.nonce as a list",
            {"nats": {"client_info": {"nonce": ["abc"]}}},
            d.NO_SIGNATURE,
        ),
        (
            "nonce_int",
            "client_info.nonce as a number",
            {"nats": {"client_info": {"nonce": 7}}},
            d.NO_SIGNATURE,
        ),
        (
            "nonce_object",
            "client_info.nonce as an object",
            {"nats": {"client_info": {"nonce": {"n": "abc"}}}},
            d.NO_SIGNATURE,
        ),
        (
            "connect_opts_list",
            "connect_opts as a list",
            {"nats": {"connect_opts": ["nkey"]}},
            d.MALFORMED,
        ),
        (
            "connect_opts_string",
            "connect_opts as a string",
            {"nats": {"connect_opts": "nkey"}},
            d.MALFORMED,
        ),
        (
            "connect_opts_null",
            "connect_opts null (so no nkey)",
            {"nats": {"connect_opts": None}},
            d.NO_NKEY,
        ),
        (
            "nkey_int",
            "connect_opts.nkey as a number",
            {"nats": {"connect_opts": {"nkey": 1}}},
            d.NO_NKEY,
        ),
        (
            "nkey_list",
            "connect_opts.nkey as a list",
            {"nats": {"connect_opts": {"nkey": ["U"]}}},
            d.NO_NKEY,
        ),
        (
            "nkey_object",
            "connect_opts.nkey as an object",
            {"nats": {"connect_opts": {"nkey": {"k": "U"}}}},
            d.NO_NKEY,
        ),
        (
            "sig_object",
            "connect_opts.sig as an object",
            {"nats": {"connect_opts": {"sig": {"sig": "x"}}}},
            d.NO_SIGNATURE,
        ),
        (
            "sig_list",
            "connect_opts.sig as a list",
            {"nats": {"connect_opts": {"sig": ["x"]}}},
            d.NO_SIGNATURE,
        ),
        (
            "sig_int",
            "connect_opts.sig as a number",
            {"nats": {"connect_opts": {"sig": 64}}},
            d.NO_SIGNATURE,
        ),
        (
            "sig_bool",
            "connect_opts.sig true",
            {"nats": {"connect_opts": {"sig": True}}},
            d.NO_SIGNATURE,
        ),
    ]
    for name, text, overrides, reason in wrong:
        if name == "nats_list":
            req = request(name)
            body = forge.compact({**req.claims, "nats": [req.claims["nats"]]})
            yield Spec(
                name,
                g,
                text,
                reason,
                sign_segments(forge.compact(forge.HEADER), body),
                users=good_users(req),
            )
            continue
        yield plain(name, g, text, reason, overrides)
    # Read only to be logged; a wrong type is coerced away today.
    for name, text, overrides in (
        (
            "client_host_int",
            "client_info.host as a number",
            {"nats": {"client_info": {"host": 127}}},
        ),
        ("client_id_string", "client_info.id as a string", {"nats": {"client_info": {"id": "9"}}}),
        (
            "client_name_list",
            "connect_opts.name as a list",
            {"nats": {"connect_opts": {"name": ["x"]}}},
        ),
    ):
        yield plain(
            name,
            g,
            text,
            d.MALFORMED,
            overrides,
        )


def user_nkey_cases() -> Iterator[Spec]:
    g = "user_nkey"
    account_pub = public_of(signing_seed("user_nkey_account", nkeys.PREFIX_BYTE_ACCOUNT))
    good = user_public("user_nkey_good")
    for name, text, value in (
        ("user_nkey_empty", "user_nkey empty", ""),
        ("user_nkey_server_key", "user_nkey is a server key (N...)", SERVER.public),
        ("user_nkey_account_key", "user_nkey is an account key (A...)", account_pub),
        (
            "user_nkey_bad_checksum",
            "user_nkey with its last character changed",
            good[:-1] + ("A" if good[-1] != "A" else "B"),
        ),
        ("user_nkey_lowercase", "user_nkey in lower case", good.lower()),
        ("user_nkey_too_long", "user_nkey with 8 extra characters", good + "AAAAAAAA"),
        ("user_nkey_non_ascii", "user_nkey with a non-ASCII letter", good[:-1] + "É"),
        (
            "user_nkey_seed",
            "user_nkey is a user seed (SU...)",
            signing_seed("user_nkey_seed", nkeys.PREFIX_BYTE_USER),
        ),
    ):
        yield plain(name, g, text, d.MALFORMED, {"nats": {"user_nkey": value}})


def client_cases() -> Iterator[Spec]:
    g = "client"
    for name, text, kind in (
        ("kind_leafnode", "client_info.kind Leafnode (a leafnode on a user's key)", "Leafnode"),
        ("kind_router", "client_info.kind Router", "Router"),
        ("kind_lowercase", "client_info.kind 'client' (not the server's spelling)", "client"),
        ("kind_missing", "no client_info.kind", DELETE),
        ("kind_int", "client_info.kind is a number", 1),
    ):
        yield plain(name, g, text, d.KIND_NOT_ALLOWED, {"nats": {"client_info": {"kind": kind}}})
    yield plain(
        "no_nkey_user_password",
        g,
        "user/password client, no nkey",
        d.NO_NKEY,
        {
            "nats": {
                "connect_opts": {"nkey": DELETE, "sig": DELETE, "user": "bob", "pass": "secret"}
            }
        },
    )
    yield plain(
        "no_nkey_token",
        g,
        "token client, no nkey",
        d.NO_NKEY,
        {"nats": {"connect_opts": {"nkey": DELETE, "sig": DELETE, "auth_token": "t"}}},
    )
    yield plain(
        "nkey_empty",
        g,
        "connect_opts.nkey empty",
        d.NO_NKEY,
        {"nats": {"connect_opts": {"nkey": ""}}},
    )
    account_pub = public_of(signing_seed("bad_nkey_account", nkeys.PREFIX_BYTE_ACCOUNT))
    other = client_key("bad_nkey_variants").public
    for name, text, value in (
        ("bad_nkey_account_key", "connect_opts.nkey is an account key", account_pub),
        (
            "bad_nkey_checksum",
            "connect_opts.nkey with its last character changed",
            other[:-1] + ("A" if other[-1] != "A" else "B"),
        ),
        ("bad_nkey_lowercase", "connect_opts.nkey in lower case", other.lower()),
        ("bad_nkey_too_long", "connect_opts.nkey of 100 characters", other + "A" * 44),
        ("bad_nkey_jwt", "connect_opts.nkey is a JWT-looking string", "eyJhbGciOiJub25lIn0"),
    ):
        yield plain(name, g, text, d.BAD_NKEY, {"nats": {"connect_opts": {"nkey": value}}})
    for name, text, overrides in (
        ("no_sig", "nkey without sig", {"nats": {"connect_opts": {"sig": DELETE}}}),
        ("sig_empty", "sig empty", {"nats": {"connect_opts": {"sig": ""}}}),
        ("sig_null", "sig null", {"nats": {"connect_opts": {"sig": None}}}),
        ("no_nonce", "sig but no nonce", {"nats": {"client_info": {"nonce": DELETE}}}),
        ("nonce_empty", "nonce empty", {"nats": {"client_info": {"nonce": ""}}}),
        ("nonce_null", "nonce null", {"nats": {"client_info": {"nonce": None}}}),
    ):
        yield plain(name, g, text, d.NO_SIGNATURE, overrides)
    yield plain(
        "sig_over_wrong_nonce",
        g,
        "the client signed another connection's nonce",
        d.BAD_SIGNATURE,
        sign_nonce=nonce_for("sig_over_wrong_nonce/old"),
    )
    yield plain(
        "sig_over_empty_string",
        g,
        "the client signed '' instead of the nonce",
        d.BAD_SIGNATURE,
        sign_nonce="",
    )
    yield plain(
        "sig_over_wrong_nonce_std",
        g,
        "padded standard base64 sig over another nonce",
        d.BAD_SIGNATURE,
        sig_encoding="std",
        sign_nonce=nonce_for("sig_over_wrong_nonce_std/old"),
    )
    yield plain(
        "sig_by_other_key",
        g,
        "the nonce signed by a key other than the claimed one",
        d.BAD_SIGNATURE,
        signer_client=client_key("sig_by_other_key/other"),
    )
    req = request("sig_truncated")
    sig = forge.b64url_decode(req.claims["nats"]["connect_opts"]["sig"].encode())
    for name, text, value in (
        ("sig_truncated", "sig of 63 bytes", b64(sig[:63]).decode()),
        ("sig_65_bytes", "sig of 65 bytes", b64(sig + b"\x00").decode()),
        ("sig_text_too_long", "sig of 200 characters", "A" * 200),
        ("sig_not_base64", "sig '!!!!'", "!!!!"),
        (
            "sig_rawurl_bad_length",
            "RawURL sig one character short (length % 4 == 1)",
            b64(sig).decode()[:-1],
        ),
        ("sig_mixed_alphabets", "sig mixing '-' and '+'", "-+" + b64(sig).decode()[2:]),
        (
            "sig_with_newline",
            "RawURL sig with a newline in the middle",
            b64(sig).decode()[:40] + "\n" + b64(sig).decode()[40:],
        ),
    ):
        yield plain(name, g, text, d.BAD_SIGNATURE, {"nats": {"connect_opts": {"sig": value}}})
    # Standard base64 without its padding: only a decode that demands the padding refuses it.
    label = "sig_std_unpadded"
    i = 0
    while True:
        client = client_key(f"{label}/client")
        nonce = nonce_for(f"{label}/nonce/{i}")
        std = base64.b64encode(client.signature(nonce)).decode()
        if "+" in std or "/" in std:
            break
        i += 1
    req = request(label)
    claims = forge.merge(
        req.claims,
        {
            "nats": {
                "client_info": {"nonce": nonce, "user": client.public},
                "connect_opts": {"nkey": client.public, "sig": std.rstrip("=")},
            }
        },
    )
    yield Spec(
        label,
        g,
        "standard base64 sig ('+' or '/') with its '=' padding removed",
        d.BAD_SIGNATURE,
        forge.encode_jwt(claims, SERVER.keypair),
        users={client.public: json.dumps(GOOD_RECORD)},
        sub=req.user_nkey,
    )
    long_nonce = "n" * 200
    client = client_key("nonce_too_long/client")
    yield plain(
        "nonce_too_long",
        g,
        "a 200-character nonce, correctly signed",
        d.BAD_SIGNATURE,
        {
            "nats": {
                "client_info": {"nonce": long_nonce},
                "connect_opts": {"sig": client.sign(long_nonce)},
            }
        },
    )


def xkey_cases() -> Iterator[Spec]:
    g = "xkey"
    header = {forge.XKEY_HEADER: SERVER.xkey_public}
    req = request("plaintext_when_xkey_configured")
    yield Spec(
        req.name,
        g,
        "a valid plaintext request to a service with an xkey",
        d.XKEY_REQUIRED,
        req.token(),
        xkey=True,
        users=good_users(req),
        sub=req.user_nkey,
    )
    req = request("sealed_when_no_xkey_configured", xkey=True)
    yield Spec(
        req.name,
        g,
        "a valid sealed request to a service without an xkey",
        d.XKEY_UNEXPECTED,
        seal(req.token(), req.name),
        dict(header),
        users=good_users(req),
    )
    req = request("header_only_when_no_xkey_configured")
    yield Spec(
        req.name,
        g,
        "plaintext request with a Nats-Server-Xkey header, service without xkey",
        d.XKEY_UNEXPECTED,
        req.token(),
        dict(header),
        users=good_users(req),
    )
    req = request("wrong_sender_key", xkey=True)
    yield Spec(
        req.name,
        g,
        "sealed by one server curve key, header names another",
        d.XKEY_FAILED,
        seal(req.token(), req.name, sender=OTHER_SERVER),
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    req = request("sealed_to_other_service_key", xkey=True)
    other = curve_public_from_seed(curve_seed("sealed_to_other_service_key/x"))
    yield Spec(
        req.name,
        g,
        "sealed to an xkey that is not ours",
        d.XKEY_FAILED,
        seal(req.token(), req.name, to=other),
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    req = request("truncated_box", xkey=True)
    box = seal(req.token(), req.name)
    yield Spec(
        req.name,
        g,
        "sealed request cut in half",
        d.XKEY_FAILED,
        box[: len(box) // 2],
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    yield Spec(
        "truncated_box_last_byte",
        g,
        "sealed request missing its last byte",
        d.XKEY_FAILED,
        box[:-1],
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    yield Spec(
        "box_shorter_than_mac",
        g,
        "xkv1 + nonce + 15 bytes (less than a MAC)",
        d.XKEY_FAILED,
        box[: 4 + 24 + 15],
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    yield Spec(
        "magic_only",
        g,
        "just 'xkv1'",
        d.XKEY_FAILED,
        b"xkv1",
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    flipped = box[:40] + bytes([box[40] ^ 0x80]) + box[41:]
    yield Spec(
        "box_bit_flipped",
        g,
        "one bit of the ciphertext flipped",
        d.XKEY_FAILED,
        flipped,
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    req = request("header_without_box", xkey=True)
    yield Spec(
        req.name,
        g,
        "Nats-Server-Xkey header on a plaintext request",
        d.XKEY_FAILED,
        req.token(),
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    req = request("box_without_header", xkey=True)
    yield Spec(
        req.name,
        g,
        "sealed request without its Nats-Server-Xkey header",
        d.XKEY_FAILED,
        seal(req.token(), req.name),
        None,
        xkey=True,
        users=good_users(req),
    )
    req = request("box_with_lowercase_header", xkey=True)
    yield Spec(
        req.name,
        g,
        "sealed request, header name in lower case",
        d.XKEY_FAILED,
        seal(req.token(), req.name),
        {forge.XKEY_HEADER.lower(): SERVER.xkey_public},
        xkey=True,
        users=good_users(req),
    )
    for name, text, value in (
        ("header_user_key", "header is a user key (U...)", client_key("hx").public),
        ("header_empty", "header is empty", ""),
        ("header_garbage", "header is not a key", "not-a-key"),
    ):
        req = request(name, xkey=True)
        yield Spec(
            name,
            g,
            f"sealed request; {text}",
            d.XKEY_FAILED,
            seal(req.token(), name),
            {forge.XKEY_HEADER: value},
            xkey=True,
            users=good_users(req),
        )
    yield sealed(
        "server_id_xkey_mismatch",
        g,
        "server_id.xkey names another curve key than the header",
        d.WRONG_SERVER,
        {"nats": {"server_id": {"xkey": OTHER_SERVER.xkey_public}}},
    )
    yield sealed(
        "server_id_xkey_missing",
        g,
        "sealed, but no server_id.xkey",
        d.WRONG_SERVER,
        {"nats": {"server_id": {"xkey": DELETE}}},
    )
    yield sealed(
        "server_id_xkey_int",
        g,
        "sealed, server_id.xkey is a number",
        d.WRONG_SERVER,
        {"nats": {"server_id": {"xkey": 1}}},
    )
    req = request("sealed_garbage", xkey=True)
    yield Spec(
        req.name,
        g,
        "a correct box holding 'garbage'",
        d.MALFORMED,
        seal(b"garbage", req.name),
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    yield Spec(
        "sealed_non_utf8",
        g,
        "a correct box holding invalid UTF-8",
        d.MALFORMED,
        seal(b"\xff\xfe" * 50, "sealed_non_utf8"),
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    req = request("sealed_forged", xkey=True)
    yield Spec(
        req.name,
        g,
        "a correct box holding a request signed by another server",
        d.FORGED,
        seal(req.token(signer=OTHER_SERVER.keypair), req.name),
        dict(header),
        xkey=True,
        users=good_users(req),
    )
    # Past the box, the same gates, answered sealed.
    yield sealed(
        "sealed_sig_over_wrong_nonce",
        g,
        "sealed; the client signed another nonce",
        d.BAD_SIGNATURE,
        sign_nonce=nonce_for("sealed_sig_over_wrong_nonce/old"),
    )
    yield sealed(
        "sealed_sig_object",
        g,
        "sealed; connect_opts.sig is an object",
        d.NO_SIGNATURE,
        {"nats": {"connect_opts": {"sig": {"a": 1}}}},
    )
    yield sealed(
        "sealed_exp_string", g, "sealed; exp is a string", d.MALFORMED, {"exp": str(int(NOW) + 2)}
    )
    yield sealed("sealed_expired", g, "sealed; exp 60 s ago", d.EXPIRED, {"exp": int(NOW) - 60})
    yield sealed(
        "sealed_record_account_sys",
        g,
        "sealed; the record names SYS",
        d.ACCOUNT_NOT_ALLOWED,
        record={**GOOD_RECORD, "account": "SYS"},
    )


def record_cases() -> Iterator[Spec]:
    g = "record"

    def perms(pub: list[Any] | None = None, sub: list[Any] | None = None) -> dict[str, Any]:
        return {
            **GOOD_RECORD,
            "permissions": {
                "pub": {"allow": pub or ["orders.>"]},
                "sub": {"allow": sub or ["_INBOX.>"]},
            },
        }

    subjects: list[tuple[str, str, dict[str, Any]]] = [
        (
            "record_pub_subject_with_space",
            "pub allow 'orders.new extra'",
            perms(pub=["orders.new extra"]),
        ),
        (
            "record_sub_queue_group",
            "sub allow 'orders.* workers' (a queue group)",
            perms(sub=["orders.* workers"]),
        ),
        (
            "record_pub_queue_group_deny",
            "pub deny 'orders.> q1'",
            {**GOOD_RECORD, "permissions": {"pub": {"deny": ["orders.> q1"]}}},
        ),
        ("record_subject_tab", "sub allow with a tab", perms(sub=["orders.\tnew"])),
        ("record_subject_newline", "pub allow with a newline", perms(pub=["orders.new\n"])),
        ("record_subject_empty_token", "pub allow 'orders..new'", perms(pub=["orders..new"])),
        ("record_subject_leading_dot", "pub allow '.orders'", perms(pub=[".orders"])),
        ("record_subject_gt_not_last", "sub allow 'orders.>.x'", perms(sub=["orders.>.x"])),
        ("record_subject_star_in_token", "pub allow 'ord*rs'", perms(pub=["ord*rs"])),
        ("record_subject_empty", "pub allow ''", perms(pub=[""])),
        ("record_subject_not_string", "pub allow [42]", perms(pub=[42])),
        ("record_subject_nul", "sub allow with a NUL", perms(sub=["orders.\x00"])),
    ]
    for name, text, record in subjects:
        yield plain(name, g, f"valid request; record {text}", d.RECORD_INVALID, record=record)
    for name, text, account in (
        ("record_account_sys", "account SYS", "SYS"),
        ("record_account_dollar_sys", "account $SYS", "$SYS"),
        ("record_account_callout", "account AUTH (the callout account)", "AUTH"),
        ("record_account_not_allowed", "account OTHER (not --allowed-account)", "OTHER"),
        ("record_account_sys_lowercase", "account sys", "sys"),
    ):
        yield plain(
            name,
            g,
            f"valid request; record names {text}",
            d.ACCOUNT_NOT_ALLOWED,
            record={**GOOD_RECORD, "account": account},
        )
    deep = '{"name":"x","permissions":' + '{"pub":' * 2000 + "null" + "}" * 2000 + "}"
    invalid: tuple[tuple[str, str, Any], ...] = (
        ("record_account_empty", "account ''", {**GOOD_RECORD, "account": ""}),
        ("record_account_with_space", "account 'APP '", {**GOOD_RECORD, "account": "APP "}),
        ("record_account_int", "account 5", {**GOOD_RECORD, "account": 5}),
        (
            "record_revoked_string_false",
            'revoked "false" (a string)',
            {**GOOD_RECORD, "revoked": "false"},
        ),
        ("record_revoked_int", "revoked 0", {**GOOD_RECORD, "revoked": 0}),
        ("record_admin_string_true", 'admin "true"', {**GOOD_RECORD, "admin": "true"}),
        ("record_name_list", "name ['x']", {**GOOD_RECORD, "name": ["x"]}),
        (
            "record_name_control",
            "name with an escape character",
            {**GOOD_RECORD, "name": "x\x1b[2J"},
        ),
        ("record_permissions_list", "permissions []", {**GOOD_RECORD, "permissions": []}),
        (
            "record_allow_string",
            "pub allow is a string, not a list",
            {**GOOD_RECORD, "permissions": {"pub": {"allow": "orders.>"}}},
        ),
        ("record_not_json", "not JSON", "name=alice"),
        ("record_json_list", "a JSON list", "[]"),
        ("record_deep_nesting", "permissions nested 2,000 objects deep", deep),
        (
            "record_oversize",
            "70 kB",
            json.dumps({**GOOD_RECORD, "name": "x", "meta": {"pad": "p" * 70_000}}),
        ),
        # An ignored key reads as "no restriction": the schema is closed.
        (
            "record_unknown_key_publish",
            "permissions.publish (nats-server's spelling) instead of pub",
            {**GOOD_RECORD, "permissions": {"publish": {"allow": ["orders.>"]}}},
        ),
        (
            "record_unknown_key_allow_case",
            "permissions.pub.Allow",
            {**GOOD_RECORD, "permissions": {"pub": {"Allow": ["orders.>"]}}},
        ),
        ("record_unknown_key_revoked_case", "Revoked: true", {**GOOD_RECORD, "Revoked": True}),
        ("record_unknown_top_level_key", "an unknown key 'email'", {**GOOD_RECORD, "email": "x"}),
        (
            "record_duplicate_revoked",
            "revoked given twice (true, then false)",
            '{"name": "x", "revoked": true, "revoked": false}',
        ),
        (
            "record_duplicate_allow",
            "pub.allow given twice",
            '{"permissions": {"pub": {"allow": ["orders.new"], "allow": []}}}',
        ),
    )
    for name, text, bad in invalid:
        yield plain(name, g, f"valid request; record {text}", d.RECORD_INVALID, record=bad)


CASES: tuple[Callable[[], Iterator[Spec]], ...] = (
    size_cases,
    encoding_cases,
    structure_cases,
    issuer_cases,
    time_cases,
    type_cases,
    user_nkey_cases,
    client_cases,
    xkey_cases,
    record_cases,
)


def build() -> list[Case]:
    cases: list[Case] = []
    for family in CASES:
        for spec in family():
            answer = _answer(spec.reason)
            cases.append(
                Case(
                    name=spec.name,
                    group=spec.group,
                    input=spec.input,
                    payload=spec.payload,
                    headers=spec.headers,
                    now=NOW,
                    xkey=spec.xkey,
                    keys=dict(KEYS),
                    users=spec.users,
                    reason=spec.reason,
                    answer=answer,
                    sub=spec.sub if answer == "error" else None,
                    aud=SERVER.public if answer == "error" else None,
                    known_issue=spec.known_issue,
                )
            )
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, duplicates
    return cases


def files(cases: list[Case]) -> dict[str, str]:
    return {f"{c.name}.json": dump(c) for c in cases}


# ---------------------------------------------------------------------------------------------
# docs
# ---------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def docs_section(cases: tuple[Case, ...]) -> str:
    """The hostile-input table with each case's outcome through the core, and the totals."""
    rows, wrong_admits, exceptions, mismatches, dropped = [], 0, 0, 0, 0
    for case in cases:
        try:
            outcome = run_core(case)
        except Exception as exc:  # recorded, never hidden: the table says so
            exceptions += 1
            result = f"**exception {type(exc).__name__}**"
        else:
            dec = outcome.decision
            if dec.admit:
                wrong_admits += 1
                result = f"**admitted ({dec.reason})**"
            else:
                dropped += outcome.body is None
                answer = (
                    "dropped"
                    if outcome.body is None
                    else ("empty body" if outcome.body == b"" else "signed error")
                )
                result = f"`{dec.reason}`, {answer}"
                if dec.reason != case.reason:
                    mismatches += 1
                    result = f"**{result}**"
        issue = f" (known issue: {case.known_issue})" if case.known_issue else ""
        rows.append(
            f"| {case.group} | `{case.name}` | {_cell(case.input)}{_cell(issue)} "
            f"| `{case.reason}`, {case.answer} | {result} |"
        )
    lines = [
        BEGIN,
        "<!-- generated by `python -m tests.support.make_corpus --docs`; do not edit by hand -->",
        "",
        f"Cases tried: **{len(cases)}** (each through the sans-I/O core in "
        "`tests/hostile/test_corpus_core.py` and over a real nats-server in "
        "`tests/hostile/test_corpus_wire.py`). "
        f"Wrong admits: **{wrong_admits}**. Exceptions out of the core: **{exceptions}**. "
        f"Denied for another reason than expected: **{mismatches}**. "
        f"Unanswered: **{dropped}**, all of them expired requests (dropped by design); every "
        "other case is answered at once.",
        "",
        "| group | case | input | expected (reason, answer) | result (core) |",
        "|---|---|---|---|---|",
        *rows,
        END,
    ]
    return "\n".join(lines)


def write_docs(cases: tuple[Case, ...]) -> None:
    text = DOCS.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    DOCS.write_text(text[:start] + docs_section(cases) + text[end:])


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the corpus is stale")
    parser.add_argument("--docs", action="store_true", help="also refresh docs/reliability.md")
    args = parser.parse_args(argv)
    wanted = files(build())
    present = {p.name: p.read_text() for p in CORPUS.glob("*.json")}
    if args.check:
        stale = sorted(n for n in wanted.keys() | present.keys() if wanted.get(n) != present.get(n))
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    CORPUS.mkdir(exist_ok=True)
    for name in present.keys() - wanted.keys():
        (CORPUS / name).unlink()
    for name, text in wanted.items():
        if present.get(name) != text:
            (CORPUS / name).write_text(text)
    print(f"{len(wanted)} cases in {CORPUS}", file=sys.stderr)
    if args.docs:
        load_all.cache_clear()
        order = {name.removesuffix(".json"): i for i, name in enumerate(wanted)}
        write_docs(tuple(sorted(load_all(), key=lambda c: order[c.name])))
        print(f"refreshed {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
