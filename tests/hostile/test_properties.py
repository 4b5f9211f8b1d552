"""Property-based tests over the sans-I/O core: random mutations of a valid request.

The mutations: bit flips, truncation and insertions in the payload; claims deleted or
replaced with random JSON (or with a near miss: another valid key, a nearby time, another
nonce...), with the request re-signed by the server or left with its old signature; segments
re-encoded (padding, standard alphabet, whitespace, re-serialised JSON); JWT header changes;
the client's `sig` re-encoded; and, for a service with an xkey, changes to the box and to the
`Nats-Server-Xkey` header.

The properties, for every mutation:
- no exception escapes `open` / `decide` / `respond`;
- admit => the mutated request is valid by an independent reading of docs/protocol.md §10
  (`valid` below: nacl + nkeys CRC, not callout's code): the server's signature verifies, the
  claims are well-typed and current, the client's signature verifies over the nonce; and when
  the mutation was not re-signed by the server, its meaning is the original's (`meaning`);
- every decision that is not a drop gets a `respond()` that is b"" (only when the request
  could not be addressed) or a response nats-server would accept as addressed to this request:
  signed by the issuer, `sub` = user_nkey, `aud` = server id, sealed back when the request was
  sealed, carrying the error reason for a deny and a user JWT for an admit.

Hypothesis runs derandomized (the same examples in every run, CI included) with a modest
number of examples; the counters prove both admits and denies were exercised.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import nacl.exceptions
import nacl.public
import nacl.signing
import nkeys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from callout.decision import INTERNAL_ERROR, Authorizer, Decision, Found, Pending
from tests.support import forge
from tests.support import make_corpus as mc
from tests.support.hostile import load_all
from tests.support.nats import Keys, decode_curve_seed
from tests.support.service import policy_for

SETTINGS = settings(
    max_examples=400,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NOW = mc.NOW
SKEW = 30
BASE = mc.request("property base")
BASE_XKEY = mc.request("property base xkey", xkey=True)
RECORD = json.dumps(mc.GOOD_RECORD).encode()
DEPLOYMENT = Keys(
    *(
        mc.KEYS[k]
        for k in (
            "issuer_seed",
            "issuer_pub",
            "service_seed",
            "service_pub",
            "xkey_seed",
            "xkey_pub",
        )
    )
)
SERVICE_XKEY = nacl.public.PrivateKey(decode_curve_seed(mc.KEYS["xkey_seed"]))

# Near misses: values of the right type that are wrong (or, for some, still right).
OTHER_CLIENT = mc.client_key("property other client")
NEAR_MISSES: dict[tuple[str, ...], list[Any]] = {
    ("iss",): [mc.OTHER_SERVER.public, mc.KEYS["issuer_pub"], mc.SERVER.public],
    ("aud",): ["nats-authorization-response", "nats-authorization-request", ""],
    ("exp",): [int(NOW) + k for k in (-60, -31, -30, -3, -1, 0, 1, 60)]
    + [float(int(NOW) + 2), "1"],
    ("nbf",): [int(NOW) + k for k in (-60, 0, 1, 2, 30, 31, 60)] + [str(int(NOW) + 60)],
    ("nats", "type"): ["authorization_response", "user", "authorization_request"],
    ("nats", "version"): [1, 2, 2.0, 3, "2", True],
    ("nats", "server_id", "id"): [mc.OTHER_SERVER.public, mc.SERVER.public],
    ("nats", "server_id", "xkey"): [mc.SERVER.xkey_public, mc.OTHER_SERVER.xkey_public],
    ("nats", "user_nkey"): [OTHER_CLIENT.public, mc.SERVER.public, mc.user_public("p")],
    ("nats", "client_info", "nonce"): [mc.nonce_for("p"), "", BASE.nonce + "x"],
    ("nats", "client_info", "kind"): ["Leafnode", "client", "Client", "Router"],
    ("nats", "connect_opts", "nkey"): [OTHER_CLIENT.public, mc.KEYS["issuer_pub"], ""],
    ("nats", "connect_opts", "sig"): [
        OTHER_CLIENT.sign(BASE.nonce),
        BASE.client.sign(BASE.nonce, "std"),
        BASE.client.sign(mc.nonce_for("p")),
        "",
    ],
}


# ---------------------------------------------------------------------------------------------
# the independent oracle
# ---------------------------------------------------------------------------------------------
_RAW_URL = re.compile(r"[A-Za-z0-9_-]*")


def _segment(seg: bytes) -> bytes | None:
    """Go's base64.RawURLEncoding (non-strict): no padding, no stray bytes."""
    try:
        text = seg.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not _RAW_URL.fullmatch(text) or len(text) % 4 == 1:
        return None
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(raw: bytes) -> Any:
    def no_constants(name: str) -> None:
        raise ValueError(name)

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _key(text: object, prefix: int) -> bytes | None:
    if not isinstance(text, str):
        return None
    try:
        return forge.public_raw(text, prefix)
    except (ValueError, binascii.Error):
        return None


def _verify(raw_key: bytes, data: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(raw_key).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, ValueError):
        return False
    return True


def _client_sig(text: str) -> bytes | None:
    """RawURL first, then padded standard base64, as nats-server (docs/protocol.md §1)."""
    if re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return _segment(text.encode())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _int(value: object) -> TypeGuard[int]:
    """A Go int64 (jwt.ClaimsData's times)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def open_token(payload: bytes, headers: dict[str, str] | None, xkey: bool) -> bytes | None:
    """The JWT inside the payload, if the service (with or without an xkey) may read it."""
    header = (headers or {}).get(forge.XKEY_HEADER)
    if not xkey:
        ok = header is None and not payload.startswith(forge.XKEY_MAGIC)
        return payload if ok else None
    sender = _key(header, 23 << 3)
    if sender is None or not payload.startswith(forge.XKEY_MAGIC):
        return None
    try:
        box = nacl.public.Box(SERVICE_XKEY, nacl.public.PublicKey(sender))
        token: bytes = box.decrypt(payload[28:], payload[4:28])
    except (nacl.exceptions.CryptoError, ValueError):
        return None
    return token


def claims_of(token: bytes) -> dict[str, Any] | None:
    """The claims of a NATS JWT that verifies against its own `iss` (a server key)."""
    parts = token.split(b".")
    if len(parts) != 3:
        return None
    header_raw, claims_raw, sig = (_segment(p) for p in parts)
    if header_raw is None or claims_raw is None or sig is None or len(sig) != 64:
        return None
    header, claims = _json(header_raw), _json(claims_raw)
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    if header.get("typ") != "JWT" or header.get("alg") not in ("ed25519-nkey", "ed25519"):
        return None
    issuer = _key(claims.get("iss"), nkeys.PREFIX_BYTE_SERVER)
    if issuer is None or not _verify(issuer, parts[0] + b"." + parts[1], sig):
        return None
    return claims


def valid(payload: bytes, headers: dict[str, str] | None, xkey: bool) -> bool:
    """docs/protocol.md §10 "Request JWT" and "Client proof", read independently of callout."""
    if len(payload) > 128 * 1024:
        return False
    token = open_token(payload, headers, xkey)
    claims = claims_of(token) if token is not None else None
    if claims is None:
        return False
    nats = claims.get("nats")
    if not isinstance(nats, dict):
        return False
    server = nats.get("server_id")
    client_info, connect_opts = nats.get("client_info"), nats.get("connect_opts")
    if not (
        isinstance(server, dict)
        and isinstance(client_info, dict)
        and isinstance(connect_opts, dict)
    ):
        return False
    exp, nbf = claims.get("exp"), claims.get("nbf")
    checks = [
        claims.get("aud") == "nats-authorization-request",
        nats.get("type") == "authorization_request",
        _int(nats.get("version")) and nats.get("version") == 2,
        isinstance(server.get("id"), str) and server.get("id") == claims.get("iss"),
        # Clock skew between the server and us is tolerated up to 30 s either way.
        _int(exp) and NOW <= exp + SKEW,
        nbf is None or (_int(nbf) and nbf <= NOW + SKEW),
        # Typed as nats-io/jwt decodes them (the service reads them for its log).
        isinstance(client_info.get("host", ""), str),
        _int(client_info.get("id", 0)),
        isinstance(connect_opts.get("name", ""), str),
        _key(nats.get("user_nkey"), nkeys.PREFIX_BYTE_USER) is not None,
        # Only clients, as the server spells the kind (leafnodes need --allow-kind).
        client_info.get("kind") == "Client",
    ]
    if xkey:
        checks.append(server.get("xkey") == (headers or {}).get(forge.XKEY_HEADER))
    if not all(checks):
        return False
    client = _key(connect_opts.get("nkey"), nkeys.PREFIX_BYTE_USER)
    sig_text, nonce = connect_opts.get("sig"), client_info.get("nonce")
    if client is None or not isinstance(sig_text, str) or not isinstance(nonce, str):
        return False
    if not nonce or len(nonce) > 128 or len(sig_text) > 128:
        return False
    sig = _client_sig(sig_text)
    return sig is not None and len(sig) == 64 and _verify(client, nonce.encode(), sig)


def meaning(claims: dict[str, Any]) -> str:
    """What a request says, as far as any check reads it: equal meanings, equal decisions."""
    nats: dict[str, Any] = claims["nats"] if isinstance(claims.get("nats"), dict) else {}
    sections: dict[str, dict[str, Any]] = {
        k: nats[k] if isinstance(nats.get(k), dict) else {}
        for k in ("server_id", "client_info", "connect_opts")
    }
    sig = sections["connect_opts"].get("sig")
    decoded = _client_sig(sig) if isinstance(sig, str) else None
    fields = {
        "iss": claims.get("iss"),
        "aud": claims.get("aud"),
        "exp": claims.get("exp"),
        "nbf": claims.get("nbf"),
        "type": nats.get("type"),
        "version": nats.get("version"),
        "server": sections["server_id"].get("id"),
        "xkey": sections["server_id"].get("xkey"),
        "user_nkey": nats.get("user_nkey"),
        "kind": sections["client_info"].get("kind"),
        "nkey": sections["connect_opts"].get("nkey"),
        "sig": decoded.hex() if decoded is not None else sig,
        "nonce": sections["client_info"].get("nonce"),
    }
    return json.dumps(fields, sort_keys=True)  # type-exact: 2 and 2.0 and true differ


# ---------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------
@dataclass
class Mutant:
    token: bytes  # the JWT (sealed afterwards for a service with an xkey)
    resigned: bool  # signed again by the server: authentic, whatever it says
    what: str
    payload: bytes | None = None  # set when the sealed bytes themselves were changed
    headers: dict[str, str] | None = None
    headers_changed: bool = False


def _sign(
    claims: Any, header: Any = None, *, dumps: Callable[[Any], bytes] = forge.compact
) -> bytes:
    h = dumps(forge.HEADER if header is None else header)
    return mc.sign_segments(h, dumps(claims))


def _paths(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for key, value in doc.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any, delete: bool) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(doc))
    node = out
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return out


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64)
    | st.text(max_size=12)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def claim_edits(draw: st.DrawFn, base: mc.Req) -> Mutant:
    claims = base.claims
    paths = sorted(set(_paths(claims)) | set(NEAR_MISSES) | {("nats", "server_id", "xkey")})
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["delete", "random", "near"]))
        if kind == "near" and path not in NEAR_MISSES:
            kind = "random"
        value = None
        if kind == "random":
            value = draw(JSON)
        elif kind == "near":
            value = draw(st.sampled_from(NEAR_MISSES[path]))
        claims = _set(claims, path, value, kind == "delete")
        edits.append(f"{kind} {'.'.join(path)}")
    # Mostly re-signed: an authentic request saying something wrong is the harder case.
    if draw(st.sampled_from([True, True, True, False])):
        return Mutant(_sign(claims), True, "re-signed: " + ", ".join(edits))
    h, _, s = base.token().split(b".")
    return Mutant(
        h + b"." + forge.b64url(forge.compact(claims)) + b"." + s,
        False,
        "old signature: " + ", ".join(edits),
    )


@st.composite
def byte_edits(draw: st.DrawFn, base: mc.Req) -> Mutant:
    token = base.token()
    kind = draw(st.sampled_from(["flip", "truncate", "insert"]))
    if kind == "truncate":
        cut = draw(st.integers(0, len(token) - 1))
        return Mutant(token[:cut], False, f"truncated to {cut}")
    at = draw(st.integers(0, len(token) - 1))
    if kind == "flip":
        mask = draw(st.integers(1, 255))
        return Mutant(
            token[:at] + bytes([token[at] ^ mask]) + token[at + 1 :], False, f"byte {at} ^= {mask}"
        )
    extra = draw(st.binary(min_size=1, max_size=4))
    return Mutant(token[:at] + extra + token[at:], False, f"inserted {extra!r} at {at}")


@st.composite
def encodings(draw: st.DrawFn, base: mc.Req) -> Mutant:
    parts = base.token().split(b".")
    kind = draw(st.sampled_from(["pad", "std", "space", "respace", "sig_trailing_bits"]))
    if kind == "respace":
        dumps: Callable[[Any], bytes] = lambda doc: json.dumps(doc, indent=1).encode()  # noqa: E731
        resigned = draw(st.booleans())
        if resigned:
            return Mutant(_sign(base.claims, dumps=dumps), True, "JSON re-serialised, re-signed")
        parts[1] = forge.b64url(dumps(base.claims))
        return Mutant(b".".join(parts), False, "JSON re-serialised, old signature")
    if kind == "sig_trailing_bits":
        # The last character of an 86-character signature carries 2 unused bits.
        last = parts[2][-1:]
        alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        index = alphabet.index(last)
        parts[2] = parts[2][:-1] + alphabet[index ^ draw(st.integers(0, 15)) :][:1]
        return Mutant(b".".join(parts), False, "signature's unused bits changed")
    i = draw(st.integers(0, 2))
    if kind == "pad":
        parts[i] += b"=" * draw(st.integers(1, 2))
    elif kind == "std":
        parts[i] = parts[i].replace(b"-", b"+").replace(b"_", b"/")
    else:
        at = draw(st.integers(0, len(parts[i])))
        parts[i] = parts[i][:at] + draw(st.sampled_from([b" ", b"\n", b"\t"])) + parts[i][at:]
    return Mutant(b".".join(parts), False, f"segment {i}: {kind}")


@st.composite
def header_edits(draw: st.DrawFn, base: mc.Req) -> Mutant:
    header: dict[str, Any] = {}
    for field, choices in (
        ("typ", ["JWT", "jwt", "JWS", 1, None]),
        ("alg", ["ed25519-nkey", "ed25519", "HS256", "none", "ED25519", 7]),
    ):
        if draw(st.booleans()) or field == "alg":
            header[field] = draw(st.sampled_from(choices))
    if draw(st.booleans()):
        header[draw(st.text(min_size=1, max_size=4))] = draw(JSON)
    return Mutant(_sign(base.claims, header), True, f"JWT header {header!r}, re-signed")


@st.composite
def sig_encodings(draw: st.DrawFn, base: mc.Req) -> Mutant:
    raw = base.client.signature(base.nonce)
    std = base64.b64encode(raw).decode()
    choices = {
        "rawurl": forge.b64url(raw).decode(),
        "std": std,
        "std unpadded": std.rstrip("="),
        "rawurl padded": base64.urlsafe_b64encode(raw).decode(),
        "std lowercase": std.lower(),
    }
    name = draw(st.sampled_from(sorted(choices)))
    claims = _set(base.claims, ("nats", "connect_opts", "sig"), choices[name], False)
    return Mutant(_sign(claims), True, f"client sig as {name}, re-signed")


def token_mutations(base: mc.Req) -> st.SearchStrategy[Mutant]:
    # Claim edits twice over: they are the mutations with the most ways to stay valid.
    return st.one_of(
        claim_edits(base),
        claim_edits(base),
        byte_edits(base),
        encodings(base),
        header_edits(base),
        sig_encodings(base),
    )


@st.composite
def sealed_mutations(draw: st.DrawFn) -> Mutant:
    """Token mutations sealed properly, or the sealed bytes and the header mutated."""
    header = {forge.XKEY_HEADER: mc.SERVER.xkey_public}
    kind = draw(st.sampled_from(["token", "token", "box", "header"]))
    if kind == "token":
        mutant = draw(token_mutations(BASE_XKEY))
        mutant.payload = mc.seal(mutant.token, "property")
        mutant.headers = header
        return mutant
    token = BASE_XKEY.token()
    payload = mc.seal(token, "property")
    if kind == "box":
        at = draw(st.integers(0, len(payload) - 1))
        if draw(st.booleans()):
            changed = payload[:at]
            what = f"box truncated to {at}"
        else:
            mask = draw(st.integers(1, 255))
            changed = payload[:at] + bytes([payload[at] ^ mask]) + payload[at + 1 :]
            what = f"box byte {at} ^= {mask}"
        return Mutant(token, False, what, changed, header)
    value = draw(
        st.sampled_from(
            [
                None,
                "",
                mc.OTHER_SERVER.xkey_public,
                mc.KEYS["xkey_pub"],
                mc.SERVER.xkey_public,
                mc.SERVER.public,
            ]
        )
    )
    name = draw(st.sampled_from([forge.XKEY_HEADER, forge.XKEY_HEADER.lower()]))
    headers = {} if value is None else {name: value}
    return Mutant(token, False, f"header {headers!r}", payload, headers, headers_changed=True)


# ---------------------------------------------------------------------------------------------
# the properties
# ---------------------------------------------------------------------------------------------
def run(
    payload: bytes, headers: dict[str, str] | None, xkey: bool
) -> tuple[Decision, bytes | None]:
    core = Authorizer(policy_for(DEPLOYMENT, xkey=xkey))
    started = core.start(payload, headers, NOW)
    if isinstance(started, Pending):
        started = core.resume(started, _store(started.request.client_key), None, NOW)
    # The driver turns an exception in the core into a deny: one here is a bug in the core.
    assert started.decision.reason != INTERNAL_ERROR, started.decision.detail
    return started.decision, started.body


def _store(client_key: str) -> Found:
    # Every client has the good record: only the request decides.
    del client_key
    return Found(RECORD)


def check_response(decision: Decision, body: bytes | None) -> None:
    if decision.drop:
        assert body is None
        return
    assert body is not None
    request = decision.request
    if request is None:
        assert body == b"", "an unaddressable request gets the empty body"
        assert not decision.admit
        return
    if request.xkeys is not None:
        server_xkey = bytes(request.xkeys[0])
        assert body.startswith(forge.XKEY_MAGIC), "a sealed request gets a sealed answer"
        box = nacl.public.Box(SERVICE_XKEY, nacl.public.PublicKey(server_xkey))
        body = box.decrypt(body[28:], body[4:28])
    claims = forge.decode_jwt(body, nkeys.PREFIX_BYTE_ACCOUNT)
    assert claims["iss"] == mc.KEYS["issuer_pub"]
    assert claims["sub"] == request.user_nkey
    assert claims["aud"] == request.server_id
    nats = claims["nats"]
    assert (nats["type"], nats["version"]) == ("authorization_response", 2)
    if decision.admit:
        user = forge.decode_jwt(nats["jwt"], nkeys.PREFIX_BYTE_ACCOUNT)
        assert "error" not in nats and user["sub"] == request.user_nkey
    else:
        assert nats == {"error": decision.reason, "type": "authorization_response", "version": 2}


def check(
    mutant: Mutant, payload: bytes, headers: dict[str, str] | None, xkey: bool, seen: Counter[str]
) -> None:
    decision, body = run(payload, headers, xkey)
    seen["admit" if decision.admit else "drop" if decision.drop else "deny"] += 1
    if decision.admit:
        assert valid(payload, headers, xkey), f"admitted an invalid request: {mutant.what}"
        if not mutant.resigned:
            token = open_token(payload, headers, xkey)
            assert token is not None
            claims = claims_of(token)
            assert claims is not None
            base = BASE_XKEY if xkey else BASE
            assert meaning(claims) == meaning(base.claims), f"meaning changed: {mutant.what}"
    check_response(decision, body)


def test_baseline_requests_are_admitted() -> None:
    """The requests the mutations start from are valid, for the oracle and for the core."""
    for base, xkey in ((BASE, False), (BASE_XKEY, True)):
        token = base.token()
        payload = mc.seal(token, "property") if xkey else token
        headers = {forge.XKEY_HEADER: mc.SERVER.xkey_public} if xkey else None
        assert valid(payload, headers, xkey)
        decision, body = run(payload, headers, xkey)
        assert decision.admit, decision.detail
        check_response(decision, body)


def test_oracle_refuses_what_the_corpus_denies() -> None:
    """The oracle is not a yes-machine: every corpus request that the core must deny at gate
    1 or 2 (records are not its business) is invalid for it too."""
    for case in load_all():
        if case.group == "record" or case.name.startswith("sealed_record") or case.known_issue:
            continue
        assert not valid(case.payload, case.headers, case.xkey), case.name


def test_random_mutations_of_a_plain_request() -> None:
    seen: Counter[str] = Counter()

    @SETTINGS
    @given(mutant=token_mutations(BASE))
    def prop(mutant: Mutant) -> None:
        check(mutant, mutant.token, None, False, seen)

    prop()
    assert seen["admit"] and seen["deny"], seen


def test_random_mutations_of_a_sealed_request() -> None:
    seen: Counter[str] = Counter()

    @settings(SETTINGS, max_examples=200)
    @given(mutant=sealed_mutations())
    def prop(mutant: Mutant) -> None:
        assert mutant.payload is not None
        check(mutant, mutant.payload, mutant.headers, True, seen)

    prop()
    assert seen["admit"] and seen["deny"], seen


def test_random_headers_on_a_plain_request() -> None:
    """A service without an xkey: any Nats-Server-Xkey header is refused, however it looks."""
    seen: Counter[str] = Counter()

    @settings(SETTINGS, max_examples=60)
    @given(
        name=st.sampled_from([forge.XKEY_HEADER, forge.XKEY_HEADER.lower(), "Other"]),
        value=st.text(max_size=60) | st.sampled_from([mc.SERVER.xkey_public, ""]),
    )
    def prop(name: str, value: str) -> None:
        headers = {name: value}
        check(
            Mutant(BASE.token(), False, f"header {headers!r}"), BASE.token(), headers, False, seen
        )

    prop()
    assert seen["admit"] and seen["deny"], seen
