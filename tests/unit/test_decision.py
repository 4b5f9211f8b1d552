"""callout.decision, the sans-I/O core, with requests forged like nats-server's
(tests.support.forge) and responses checked like nats-server checks them (nkeys/PyNaCl, not
callout's own codec).

Every reason constant of `callout.decision` is reached in `test_every_reason` (and the table is
checked against the module, so a new reason without a test fails), and then each rule gets its
own focused tests below. The clock is fixed (`NOW`); nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nkeys
import pytest

from callout import decision as d
from callout.decision import (
    Authorizer,
    Decision,
    Found,
    Missing,
    Request,
    SeenRequests,
    StoreAnswer,
    TimedOut,
    Unavailable,
)
from callout.keys import CurveKey, SigningKey
from callout.records import Permissions, Rules
from tests.support import forge
from tests.support.forge import DELETE, ClientKey, Forged, ServerIdentity
from tests.support.hostile import UNADDRESSABLE
from tests.support.nats import Keys, make_keys, new_account, new_curve, new_user
from tests.support.service import APP, policy_for, record

NOW = 1_800_000_000.0
ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT
RESPONSE_TYPE = {"type": "authorization_response", "version": 2}
ALICE = record(
    "alice", pub_allow=["orders.>", "_INBOX.>"], pub_deny=["orders.secret"], sub_allow=["updates.*"]
)


# ---------------------------------------------------------------------------------------------
# rig
# ---------------------------------------------------------------------------------------------
@dataclass
class Rig:
    keys: Keys
    server: ServerIdentity
    client: ClientKey
    authorizer: Authorizer

    @property
    def policy(self) -> d.Policy:
        return self.authorizer.policy

    def forge(self, **kwargs: Any) -> Forged:
        kwargs.setdefault("client", self.client)
        kwargs.setdefault("now", NOW)
        if "seal_to" not in kwargs and self.policy.xkeys:
            kwargs["seal_to"] = self.keys.xkey_pub
        server = kwargs.pop("server", self.server)
        return forge.forge_request(server, self.keys.issuer_pub, **kwargs)

    def open(self, forged: Forged, now: float = NOW) -> Request | Decision:
        return self.authorizer.open(forged.payload, forged.headers, now)

    def request(self, forged: Forged, now: float = NOW) -> Request:
        opened = self.open(forged, now)
        assert isinstance(opened, Request), opened
        return opened

    def run(self, forged: Forged, answer: StoreAnswer | None, now: float = NOW) -> Decision:
        opened = self.open(forged, now)
        if isinstance(opened, Decision):
            return opened
        return self.authorizer.decide(opened, answer)

    def gate1(self, payload: bytes, headers: dict[str, str] | None = None) -> Decision:
        opened = self.authorizer.open(payload, headers, NOW)
        assert isinstance(opened, Decision), opened
        return opened


def make_rig(*, xkey: bool = False, client: ClientKey | None = None, **policy: Any) -> Rig:
    """A fresh deployment (`tests.support.service.policy_for`: account APP, callout account
    AUTH)."""
    keys = make_keys()
    return Rig(
        keys,
        ServerIdentity.generate(),
        client or ClientKey.generate(),
        Authorizer(policy_for(keys, xkey=xkey, **policy)),
    )


def rig_past_validation(*, client: ClientKey | None = None, **fields: Any) -> Rig:
    """A rig whose Policy gets `fields` after it was built, past its own checks: for the rules'
    second line of defence, which must hold even for a Policy no caller can construct."""
    keys = make_keys()
    policy = policy_for(keys)
    for name, value in fields.items():
        object.__setattr__(policy, name, value)
    return Rig(keys, ServerIdentity.generate(), client or ClientKey.generate(), Authorizer(policy))


def internal_rig(**policy: Any) -> Rig:
    client = ClientKey.generate()
    return make_rig(client=client, internal_keys=(client.public,), **policy)


def response_claims(rig: Rig, body: bytes, forged: Forged) -> dict[str, Any]:
    """Open and verify a response as the server does; check its addressing (docs/protocol.md §3)."""
    assert body, "empty body"
    plaintext = forge.open_response(body, forged.server, forged.sealed_to)
    claims = forge.decode_jwt(plaintext, ACCOUNT)
    assert claims["iss"] == rig.keys.issuer_pub
    assert claims["sub"] == forged.user_nkey
    assert claims["aud"] == forged.server.public
    assert "nbf" not in claims
    assert {"jwt", "error"} & set(claims["nats"]), claims
    return claims


def assert_error_response(
    rig: Rig, decision: Decision, forged: Forged, now: float = NOW
) -> dict[str, Any]:
    assert not decision.admit
    claims = response_claims(rig, rig.authorizer.respond(decision, now), forged)
    # Exactly the error, typed v2; no jwt, no issuer_account (config mode denies it, §6).
    assert claims["nats"] == {"error": decision.reason, **RESPONSE_TYPE}
    return claims


def admitted_user(
    rig: Rig, decision: Decision, forged: Forged, now: float = NOW, jitter: float | None = 0.0
) -> dict[str, Any]:
    """The user JWT of an admit response, verified (signed by the issuer account key)."""
    assert decision.admit, decision
    claims = response_claims(rig, rig.authorizer.respond(decision, now, jitter), forged)
    assert set(claims["nats"]) == {"jwt", "type", "version"}, claims["nats"]
    assert {k: claims["nats"][k] for k in ("type", "version")} == RESPONSE_TYPE
    user = forge.decode_jwt(claims["nats"]["jwt"], ACCOUNT)
    assert user["iss"] == rig.keys.issuer_pub
    assert user["sub"] == forged.user_nkey
    assert user["iat"] == int(now)
    assert "nbf" not in user and "issuer_account" not in user["nats"]
    assert user["nats"]["type"] == "user" and user["nats"]["version"] == 2
    assert (user["nats"]["subs"], user["nats"]["data"], user["nats"]["payload"]) == (-1, -1, -1)
    return user


def user_permissions(user: dict[str, Any]) -> dict[str, Any]:
    fixed = {"subs", "data", "payload", "type", "version"}
    return {k: v for k, v in user["nats"].items() if k not in fixed}


# ---------------------------------------------------------------------------------------------
# every reason, at least once
# ---------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    rig: Rig
    decision: Decision
    forged: Forged | None


MISSING = Missing()


def _plain(answer: StoreAnswer | None = MISSING, **rig: Any) -> Callable[..., Outcome]:
    def scenario(**forge_kwargs: Any) -> Outcome:
        r = make_rig(**rig)
        f = r.forge(**forge_kwargs)
        return Outcome(r, r.run(f, answer), f)

    return scenario


def _oversize() -> Outcome:
    r = make_rig()
    return Outcome(r, r.gate1(b"eyJ" + b"A" * d.MAX_REQUEST_BYTES), None)


def _xkey_unexpected() -> Outcome:
    r = make_rig()
    f = r.forge(seal_to=new_curve()[1])
    return Outcome(r, r.run(f, Missing()), None)


def _xkey_failed() -> Outcome:
    r = make_rig(xkey=True)
    f = r.forge(seal_to=new_curve()[1])  # the server is configured with someone else's xkey
    return Outcome(r, r.run(f, Missing()), None)


def _forged() -> Outcome:
    r = make_rig()
    impostor = ServerIdentity.generate()
    f = r.forge(signer=impostor.keypair)  # iss and server_id name our server; signed by another
    return Outcome(r, r.run(f, Missing()), None)


def _wrong_server() -> Outcome:
    r = make_rig()
    other = ServerIdentity.generate()
    # Validly signed by `other`, which claims to be speaking for `r.server`.
    f = r.forge(signer=other.keypair, overrides={"iss": other.public})
    return Outcome(r, r.run(f, Missing()), None)


def _replay() -> Outcome:
    r = make_rig()
    f = r.forge()
    r.request(f)
    return Outcome(r, r.run(f, Missing()), f)


def _throttled() -> Outcome:
    r = make_rig(fail_limit_key=2)
    for _ in range(2):  # two unknown-key failures use up the key's budget
        assert r.run(r.forge(), Missing()).reason == d.UNKNOWN_USER
    f = r.forge()
    return Outcome(r, r.run(f, Missing()), f)


def _record_answer(data: bytes, **rig: Any) -> Callable[[], Outcome]:
    return lambda: _plain(Found(data), **rig)()


def _internal() -> Outcome:
    r = internal_rig()
    f = r.forge()
    return Outcome(r, r.run(f, None), f)


def _internal_error() -> Outcome:
    return _plain(None)()  # a non-internal key with no store answer: a shell bug, denied


SCENARIOS: dict[str, Callable[[], Outcome]] = {
    d.ADMIT: _record_answer(ALICE),
    d.ADMIT_INTERNAL: _internal,
    d.WOULD_DENY: lambda: _plain(Missing(), mode="soft")(),
    d.OVERSIZE: _oversize,
    d.XKEY_REQUIRED: lambda: _plain(xkey=True)(seal_to=None),
    d.XKEY_UNEXPECTED: _xkey_unexpected,
    d.XKEY_FAILED: _xkey_failed,
    d.MALFORMED: lambda: _plain()(overrides={"nats": {"type": "authorization_response"}}),
    d.FORGED: _forged,
    d.NOT_FOR_US: lambda: _plain()(overrides={"aud": "nats-authorization-response"}),
    d.WRONG_SERVER: _wrong_server,
    d.EXPIRED: lambda: _plain()(now=NOW - 60),
    d.NOT_YET_VALID: lambda: _plain()(overrides={"nbf": int(NOW) + 60}),
    d.REPLAY: _replay,
    d.KIND_NOT_ALLOWED: lambda: _plain()(overrides={"nats": {"client_info": {"kind": "Leafnode"}}}),
    d.THROTTLED: _throttled,
    d.NO_NKEY: lambda: _plain()(client=None),
    d.BAD_NKEY: lambda: _plain()(overrides={"nats": {"connect_opts": {"nkey": new_account()[1]}}}),
    d.NO_SIGNATURE: lambda: _plain()(overrides={"nats": {"connect_opts": {"sig": DELETE}}}),
    d.BAD_SIGNATURE: lambda: _plain()(overrides={"nats": {"client_info": {"nonce": "fresh"}}}),
    d.UNKNOWN_USER: _plain(Missing()),
    d.REVOKED: _record_answer(record("bob", revoked=True)),
    d.RECORD_INVALID: _record_answer(b'{"admin": "yes"}'),
    d.ACCOUNT_NOT_ALLOWED: _record_answer(record("eve", account="SYS")),
    d.STORE_UNAVAILABLE: _plain(Unavailable("bucket 'users' does not exist")),
    d.STORE_TIMEOUT: _plain(TimedOut()),
    d.INTERNAL_ERROR: _internal_error,
}


def all_reasons() -> set[str]:
    return {
        value
        for name, value in vars(d).items()
        if name.isupper() and not name.startswith("_") and isinstance(value, str)
    }


def test_scenarios_cover_every_reason() -> None:
    # OVERLOADED is the shell's own (load shedding), tested in test_service_shell.py.
    reasons = all_reasons() - {d.OVERLOADED}
    assert len(reasons) == 27  # sanity: the introspection finds the table of reasons
    assert set(SCENARIOS) == reasons
    assert d.ADMIT_REASONS == {d.ADMIT, d.ADMIT_INTERNAL, d.WOULD_DENY}
    assert UNADDRESSABLE <= reasons


@pytest.mark.parametrize("reason", sorted(SCENARIOS))
def test_every_reason(reason: str) -> None:
    outcome = SCENARIOS[reason]()
    decision, rig, forged = outcome.decision, outcome.rig, outcome.forged
    assert decision.reason == reason, decision
    assert decision.admit == (reason in d.ADMIT_REASONS)
    assert (decision.request is None) == (reason in UNADDRESSABLE)
    assert decision.drop == (reason in {d.EXPIRED, d.REPLAY})
    if decision.drop:
        return
    if decision.request is None:
        assert rig.authorizer.respond(decision, NOW) == b""
        return
    assert forged is not None
    assert decision.request.user_nkey == forged.user_nkey
    assert decision.request.server_id == rig.server.public
    if decision.admit:
        user = admitted_user(rig, decision, forged)
        assert user["aud"] == APP
    else:
        assert_error_response(rig, decision, forged)


# ---------------------------------------------------------------------------------------------
# admit
# ---------------------------------------------------------------------------------------------
def test_admit_carries_the_record_exactly() -> None:
    rig = make_rig()
    forged = rig.forge()
    request = rig.request(forged)
    assert request.client_key == rig.client.public and not request.internal
    assert request.exp == float(forged.claims["exp"])
    assert request.client_host == "127.0.0.1" and request.client_id == 9
    decision = rig.authorizer.decide(request, Found(ALICE))
    assert (decision.reason, decision.account, decision.name) == (d.ADMIT, APP, "alice")
    assert decision.client_key == rig.client.public
    user = admitted_user(rig, decision, forged)
    assert user["aud"] == APP
    assert user["name"] == "alice"
    assert user_permissions(user) == {
        "pub": {"allow": ["orders.>", "_INBOX.>"], "deny": ["orders.secret"]},
        "sub": {"allow": ["updates.*"]},
    }
    assert user["exp"] == int(NOW + rig.policy.user_ttl)


def test_admit_omits_empty_permission_lists() -> None:
    rig = make_rig()
    forged = rig.forge()
    decision = rig.run(forged, Found(record("carol", sub_deny=["private.>"])))
    user = admitted_user(rig, decision, forged)
    assert user_permissions(user) == {"sub": {"deny": ["private.>"]}}
    unrestricted = rig.forge()
    user = admitted_user(rig, rig.run(unrestricted, Found(b"{}")), unrestricted)
    assert user_permissions(user) == {}
    assert "name" not in user  # the record has no name


def test_admin_record_is_unrestricted_in_its_account() -> None:
    rig = make_rig()
    forged = rig.forge()
    decision = rig.run(forged, Found(record("root", admin=True, pub_allow=["only.this"])))
    assert decision.reason == d.ADMIT
    assert user_permissions(admitted_user(rig, decision, forged)) == {}


@pytest.mark.parametrize(("jitter", "factor"), [(-1.0, 0.9), (0.0, 1.0), (1.0, 1.1), (0.5, 1.05)])
def test_user_exp_jitter(jitter: float, factor: float) -> None:
    rig = make_rig(user_ttl=1000.0)
    forged = rig.forge()
    user = admitted_user(rig, rig.run(forged, Found(ALICE)), forged, jitter=jitter)
    assert user["exp"] == int(NOW + 1000.0 * factor)


def test_random_jitter_stays_within_ten_percent() -> None:
    rig = make_rig(user_ttl=86400.0)
    forged = rig.forge()
    decision = rig.run(forged, Found(ALICE))
    low, high = int(NOW + 86400 * 0.9), int(NOW + 86400 * 1.1)
    seen = set()
    for _ in range(40):
        exp = admitted_user(rig, decision, forged, jitter=None)["exp"]
        assert low <= exp <= high
        seen.add(exp)
    assert len(seen) > 1  # it is random (40 equal draws out of 17,280 values: never)


def test_no_exp_when_user_ttl_is_zero() -> None:
    rig = make_rig(user_ttl=0.0)
    forged = rig.forge()
    user = admitted_user(rig, rig.run(forged, Found(ALICE)), forged, jitter=1.0)
    assert "exp" not in user


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (b'{"permissions": {"publish": {"allow": ["a.>"]}}}', "permissions.publish"),
        (b'{"permissions": {"pub": {"Allow": ["a.>"]}}}', "permissions.pub.Allow"),
        (b'{"Revoked": true}', "Revoked"),
        (b'{"revoked": true, "revoked": false}', "'revoked' twice"),
    ],
)
def test_unknown_or_repeated_record_keys_are_record_invalid_naming_the_field(
    value: bytes, named: str
) -> None:
    for mode in ("enforce", "soft"):
        rig = make_rig(mode=mode)
        decision = rig.run(rig.forge(), Found(value))
        assert decision.reason == d.RECORD_INVALID and named in decision.detail


def test_record_account_placement() -> None:
    rig = make_rig(allowed_accounts=frozenset({APP, "OTHER"}))
    forged = rig.forge()
    decision = rig.run(forged, Found(record("o", account="OTHER")))
    assert decision.reason == d.ADMIT and decision.account == "OTHER"
    assert admitted_user(rig, decision, forged)["aud"] == "OTHER"
    default = rig.forge()
    assert admitted_user(rig, rig.run(default, Found(record("n"))), default)["aud"] == APP


def test_record_account_not_allowed() -> None:
    rig = make_rig(allowed_accounts=frozenset({APP, "OTHER"}))
    for account in ("ELSEWHERE", "app", "$G"):
        forged = rig.forge()
        decision = rig.run(forged, Found(record("x", account=account)))
        assert decision.reason == d.ACCOUNT_NOT_ALLOWED, account
        assert account in decision.detail
        assert_error_response(rig, decision, forged)


@pytest.mark.parametrize("account", ["SYS", "$SYS", "AUTH"])
def test_system_and_callout_accounts_denied_even_if_allowed(account: str) -> None:
    # As `callout serve` builds it: forbidden = SYS, $SYS, system and callout account (AUTH).
    # Such a Policy cannot be built...
    with pytest.raises(d.PolicyError, match=f"refusing to place users in .*{re.escape(account)}"):
        policy_for(make_keys(), allowed_accounts=frozenset({APP, account}))
    # ... and the rules deny them anyway.
    rig = rig_past_validation(allowed_accounts=frozenset({APP, "SYS", "$SYS", "AUTH"}))
    forged = rig.forge()
    decision = rig.run(forged, Found(record("mallory", account=account)))
    assert decision.reason == d.ACCOUNT_NOT_ALLOWED
    assert_error_response(rig, decision, forged)
    # Admin does not help either.
    forged = rig.forge()
    assert rig.run(forged, Found(record("m", admin=True, account=account))).reason == (
        d.ACCOUNT_NOT_ALLOWED
    )


def test_policy_default_forbids_the_system_account() -> None:
    keys = make_keys()
    issuer = SigningKey.from_seed(keys.issuer_seed)
    bare = d.Policy(issuer=issuer, account=APP, allowed_accounts=frozenset({APP}))
    assert {"SYS", "$SYS"} <= bare.forbidden_accounts
    with pytest.raises(d.PolicyError, match="refusing to place users in"):
        d.Policy(issuer=issuer, account=APP, allowed_accounts=frozenset({APP, "SYS", "$SYS"}))
    object.__setattr__(bare, "allowed_accounts", frozenset({APP, "SYS", "$SYS"}))
    rig = Rig(keys, ServerIdentity.generate(), ClientKey.generate(), Authorizer(bare))
    for account in ("SYS", "$SYS"):
        assert rig.run(rig.forge(), Found(record("s", account=account))).reason == (
            d.ACCOUNT_NOT_ALLOWED
        )


# ---------------------------------------------------------------------------------------------
# internal keys
# ---------------------------------------------------------------------------------------------
def test_internal_key_admitted_without_store() -> None:
    client = ClientKey.generate()
    perms = Permissions(pub=Rules(allow=("ops.>",)), sub=Rules(deny=("secret.>",)))
    _, other = new_user()
    rig = make_rig(client=client, internal_keys=(other, client.public), internal_permissions=perms)
    forged = rig.forge()
    request = rig.request(forged)
    assert request.internal
    decision = rig.authorizer.decide(request, None)
    assert decision.reason == d.ADMIT_INTERNAL
    assert (decision.account, decision.name, decision.permissions) == (APP, "internal", perms)
    user = admitted_user(rig, decision, forged)
    assert user["aud"] == APP and user["name"] == "internal"
    assert user_permissions(user) == {"pub": {"allow": ["ops.>"]}, "sub": {"deny": ["secret.>"]}}
    # Whatever the store would have said (the shell does not ask it for internal keys).
    for answer in (Unavailable("down"), TimedOut(), Missing(), Found(record(revoked=True))):
        assert rig.authorizer.decide(request, answer).reason == d.ADMIT_INTERNAL


def test_internal_key_default_permissions_are_unrestricted() -> None:
    rig = internal_rig()
    forged = rig.forge()
    user = admitted_user(rig, rig.run(forged, None), forged)
    assert user_permissions(user) == {}


def test_internal_key_still_needs_its_signature() -> None:
    rig = internal_rig()
    impostor = ClientKey.generate()
    nonce = forge.new_nonce()
    forged = rig.forge(
        nonce=nonce, overrides={"nats": {"connect_opts": {"sig": impostor.sign(nonce)}}}
    )
    decision = rig.run(forged, None)
    assert decision.reason == d.BAD_SIGNATURE
    assert_error_response(rig, decision, forged)
    unsigned = rig.forge(overrides={"nats": {"connect_opts": {"sig": DELETE}}})
    assert rig.run(unsigned, None).reason == d.NO_SIGNATURE


def test_non_internal_key_without_store_answer_is_an_internal_error() -> None:
    rig = make_rig(internal_keys=(new_user()[1],))
    forged = rig.forge()
    request = rig.request(forged)
    assert not request.internal
    decision = rig.authorizer.decide(request, None)
    assert decision.reason == d.INTERNAL_ERROR and not decision.admit
    assert_error_response(rig, decision, forged)


def test_fail_is_a_deny() -> None:
    rig = make_rig()
    forged = rig.forge()
    request = rig.request(forged)
    decision = rig.authorizer.fail(request, "RuntimeError in handler")
    assert decision.reason == d.INTERNAL_ERROR and decision.client_key == rig.client.public
    assert_error_response(rig, decision, forged)
    anonymous = rig.authorizer.fail(None, "boom")
    assert anonymous.reason == d.INTERNAL_ERROR and anonymous.request is None
    assert rig.authorizer.respond(anonymous, NOW) == b""


# ---------------------------------------------------------------------------------------------
# store answers, enforce and soft mode
# ---------------------------------------------------------------------------------------------
STILL_DENIED: list[tuple[StoreAnswer, str]] = [
    (d.Deleted(), d.UNKNOWN_USER),  # soft mode admitted it, with the (unrestricted) defaults
    (Found(record("r", revoked=True)), d.REVOKED),
    (Found(record("r", revoked=True, admin=True)), d.REVOKED),
    (Found(b"not json"), d.RECORD_INVALID),
    (Found(b'{"permissions": {"pub": {"allow": ["a b"]}}}'), d.RECORD_INVALID),
    (Found(record("x", account="NOPE")), d.ACCOUNT_NOT_ALLOWED),
    (Unavailable("JetStream is not available"), d.STORE_UNAVAILABLE),
    (TimedOut(), d.STORE_TIMEOUT),
]


@pytest.mark.parametrize("mode", ["enforce", "soft"])
@pytest.mark.parametrize(("answer", "reason"), STILL_DENIED)
def test_denied_in_both_modes(mode: str, answer: StoreAnswer, reason: str) -> None:
    rig = make_rig(mode=mode)
    forged = rig.forge()
    decision = rig.run(forged, answer)
    assert decision.reason == reason
    assert decision.client_key == rig.client.public
    assert_error_response(rig, decision, forged)


def test_unavailable_detail_is_kept_for_the_log() -> None:
    rig = make_rig()
    decision = rig.run(rig.forge(), Unavailable("bucket 'users' does not exist"))
    assert decision.detail == "bucket 'users' does not exist"
    invalid = rig.run(rig.forge(), Found(b'{"admin": 1}'))
    assert invalid.reason == d.RECORD_INVALID and "admin" in invalid.detail


def test_store_values_map_to_answers_with_deletes_apart() -> None:
    from callout.store import TOMBSTONE

    assert d.store_answer(None) == Missing()
    assert d.store_answer(TOMBSTONE) == d.Deleted()
    assert d.store_answer(b"") == Found(b"")  # an empty value is a record (invalid), not a delete
    assert d.store_answer(ALICE) == Found(ALICE)
    decision = make_rig(mode="soft").run(make_rig().forge(), d.Deleted())
    assert decision.reason != d.WOULD_DENY


def test_unknown_user_in_enforce_mode() -> None:
    rig = make_rig()
    forged = rig.forge()
    decision = rig.run(forged, Missing())
    assert decision.reason == d.UNKNOWN_USER
    assert_error_response(rig, decision, forged)


def test_soft_mode_admits_missing_with_default_permissions() -> None:
    defaults = Permissions(pub=Rules(allow=("public.>",)), sub=Rules(allow=("public.>",)))
    rig = make_rig(mode="soft", default_permissions=defaults)
    forged = rig.forge()
    decision = rig.run(forged, Missing())
    assert decision.reason == d.WOULD_DENY and decision.admit
    assert decision.permissions == defaults and decision.account == APP
    user = admitted_user(rig, decision, forged)
    assert user["aud"] == APP and "name" not in user
    assert user_permissions(user) == {
        "pub": {"allow": ["public.>"]},
        "sub": {"allow": ["public.>"]},
    }
    # A known user in soft mode is a plain admit with its own permissions.
    known = rig.forge()
    admitted = rig.run(known, Found(ALICE))
    assert admitted.reason == d.ADMIT
    assert user_permissions(admitted_user(rig, admitted, known))["sub"] == {"allow": ["updates.*"]}


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"nats": {"connect_opts": {"sig": DELETE}}}, d.NO_SIGNATURE),
        ({"nats": {"client_info": {"nonce": "another-nonce"}}}, d.BAD_SIGNATURE),
        ({"nats": {"connect_opts": {"nkey": DELETE}}}, d.NO_NKEY),
    ],
)
def test_soft_mode_still_checks_the_client(overrides: dict[str, Any], reason: str) -> None:
    rig = make_rig(mode="soft")
    forged = rig.forge(overrides=overrides)
    decision = rig.run(forged, Missing())
    assert decision.reason == reason
    assert_error_response(rig, decision, forged)


# ---------------------------------------------------------------------------------------------
# the client's signature over the nonce
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["rawurl", "std"])
def test_both_signature_encodings_accepted(encoding: forge.SigEncoding) -> None:
    rig = make_rig()
    forged = rig.forge(sig_encoding=encoding)
    sig = forged.claims["nats"]["connect_opts"]["sig"]
    assert len(sig) == (86 if encoding == "rawurl" else 88)
    assert rig.run(forged, Found(ALICE)).reason == d.ADMIT


def test_std_signature_with_plus_and_slash() -> None:
    # nats-py's padded std base64 with '+' or '/' (not RawURL) is accepted; without its
    # padding it is neither RawURL nor Std (Go's StdEncoding wants the padding too).
    rig = make_rig()
    for _ in range(200):
        nonce = forge.new_nonce()
        sig = rig.client.sign(nonce, "std")
        if "+" in sig or "/" in sig:
            break
    else:
        pytest.fail("no signature with + or / in 200 tries")
    forged = rig.forge(nonce=nonce, sig_encoding="std")
    assert rig.run(forged, Found(ALICE)).reason == d.ADMIT
    unpadded = rig.forge(nonce=nonce, overrides=_sig_override(sig.rstrip("=")))
    # A fresh service: the same nonce twice would (rightly) be a replay.
    fresh = Rig(rig.keys, rig.server, rig.client, Authorizer(rig.policy))
    assert fresh.run(unpadded, Found(ALICE)).reason == d.BAD_SIGNATURE


def _sig_override(sig: Any) -> dict[str, Any]:
    return {"nats": {"connect_opts": {"sig": sig}}}


def _bad_signatures(client: ClientKey, nonce: str) -> dict[str, Any]:
    good = client.signature(nonce)
    other = ClientKey.generate()
    rawurl = forge.encode_sig(good, "rawurl")
    std = forge.encode_sig(good, "std")
    return {
        "wrong nonce": forge.encode_sig(client.signature(nonce + "x"), "rawurl"),
        "other key": other.sign(nonce),
        "other key std": other.sign(nonce, "std"),
        "garbage": "!!!!not-base64!!!!",
        "short": "abc",
        "63 bytes": forge.encode_sig(good[:63], "rawurl"),
        "65 bytes": forge.encode_sig(good + b"\0", "std"),
        "rawurl len%4==1": rawurl + "A" * 3,
        "std wrong padding": std + "==",
        "mixed alphabets": rawurl[:40] + "+" + rawurl[41:] + "-",
        "whitespace": std[:10] + " " + std[10:],
        "too long": rawurl + "A" * 200,
        "sig over nothing": forge.encode_sig(client.signature(""), "rawurl"),
    }


@pytest.mark.parametrize("case", list(_bad_signatures(ClientKey.generate(), "n")))
def test_bad_signatures(case: str) -> None:
    rig = make_rig()
    nonce = forge.new_nonce()
    sig = _bad_signatures(rig.client, nonce)[case]
    forged = rig.forge(nonce=nonce, overrides=_sig_override(sig))
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == d.BAD_SIGNATURE, (case, decision)
    assert_error_response(rig, decision, forged)


@pytest.mark.parametrize(
    "overrides",
    [
        {"nats": {"connect_opts": {"sig": DELETE}}},
        {"nats": {"connect_opts": {"sig": ""}}},
        {"nats": {"connect_opts": {"sig": 12345}}},
        {"nats": {"connect_opts": {"sig": None}}},
        {"nats": {"client_info": {"nonce": DELETE}}},
        {"nats": {"client_info": {"nonce": ""}}},
        {"nats": {"client_info": {"nonce": ["n"]}}},
        {"nats": {"client_info": DELETE}},
    ],
    ids=lambda o: repr(o),
)
def test_no_signature_or_no_nonce(overrides: dict[str, Any]) -> None:
    rig = make_rig()
    forged = rig.forge(overrides=overrides)
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == d.NO_SIGNATURE
    assert_error_response(rig, decision, forged)


def test_nonce_too_long() -> None:
    rig = make_rig()
    nonce = "n" * 129
    forged = rig.forge(nonce=nonce)  # validly signed, but no server sends such a nonce
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == d.BAD_SIGNATURE


def test_bad_nkey() -> None:
    rig = make_rig()
    seed, public = new_user()
    for nkey in (new_account()[1], public.lower(), public[:-1], seed, "UNOTAKEY", "U" * 56):
        forged = rig.forge(overrides={"nats": {"connect_opts": {"nkey": nkey}}})
        decision = rig.run(forged, Found(ALICE))
        assert decision.reason == d.BAD_NKEY, nkey
        assert_error_response(rig, decision, forged)


@pytest.mark.parametrize("nkey", [DELETE, "", None, 7, ["U"]])
def test_no_nkey(nkey: Any) -> None:
    rig = make_rig()
    forged = rig.forge(overrides={"nats": {"connect_opts": {"nkey": nkey}}})
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == d.NO_NKEY
    assert_error_response(rig, decision, forged)


def test_user_password_client_has_no_nkey() -> None:
    rig = make_rig()
    forged = rig.forge(
        client=None,
        overrides={
            "nats": {
                "connect_opts": {"user": "bob", "pass": "secret"},
                "client_info": {"user": "bob"},
            }
        },
    )
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == d.NO_NKEY and decision.client_key == ""
    assert_error_response(rig, decision, forged)


def test_claimed_key_is_the_one_looked_up_and_logged() -> None:
    rig = make_rig()
    forged = rig.forge()
    assert rig.request(forged).client_key == rig.client.public
    denied = rig.run(rig.forge(overrides={"nats": {"connect_opts": {"sig": DELETE}}}), Missing())
    assert denied.client_key == rig.client.public


# ---------------------------------------------------------------------------------------------
# gate 1: the request itself
# ---------------------------------------------------------------------------------------------
def test_oversize_boundary() -> None:
    rig = make_rig()
    assert rig.gate1(b"A" * (d.MAX_REQUEST_BYTES + 1)).reason == d.OVERSIZE
    assert rig.gate1(b"A" * d.MAX_REQUEST_BYTES).reason == d.MALFORMED
    sealed = b"xkv1" + b"\0" * d.MAX_REQUEST_BYTES
    assert rig.gate1(sealed, {forge.XKEY_HEADER: rig.server.xkey_public}).reason == d.OVERSIZE


@pytest.mark.parametrize(
    "payload",
    [b"", b"hello", b"eyJ", b"a.b", b"a.b.c.d", b"eyJhbGciOiJub25lIn0.e30.", b"\xff\xfe\x00"],
)
def test_garbage_requests_are_malformed(payload: bytes) -> None:
    rig = make_rig()
    decision = rig.gate1(payload)
    assert decision.reason == d.MALFORMED
    assert rig.authorizer.respond(decision, NOW) == b""


def test_request_signed_by_a_non_server_key_is_malformed() -> None:
    rig = make_rig()
    seed, public = new_account()
    forged = rig.forge(signer=nkeys.from_seed(seed.encode()), overrides={"iss": public})
    assert rig.run(forged, Missing()).reason == d.MALFORMED


def test_request_header_alg_of_the_wrong_type_is_malformed() -> None:
    # A list is unhashable: the decoder must still say "malformed", not raise.
    rig = make_rig()
    forged = rig.forge(jwt_header={"typ": "JWT", "alg": ["ed25519-nkey"]})
    assert rig.run(forged, Missing()).reason == d.MALFORMED


@pytest.mark.parametrize(
    "overrides",
    [
        {"nats": DELETE},
        {"nats": "request"},
        {"nats": {"type": "authorization_response"}},
        {"nats": {"type": DELETE}},
        {"nats": {"version": 1}},
        {"nats": {"version": "2"}},
        {"nats": {"version": DELETE}},
        {"nats": {"server_id": DELETE}},
        {"nats": {"server_id": "NABC"}},
        {"nats": {"server_id": {"id": DELETE}}},
        {"nats": {"server_id": {"id": 5}}},
        {"nats": {"user_nkey": DELETE}},
        {"nats": {"user_nkey": 1}},
        {"nats": {"user_nkey": new_account()[1]}},
        {"nats": {"user_nkey": "UNOTAKEY"}},
        {"exp": DELETE},
        {"exp": float(int(NOW) + 2)},
        {"exp": str(int(NOW) + 2)},
        {"exp": True},
        {"nats": {"client_info": ["x"]}},
        {"nats": {"connect_opts": "nkey"}},
        {"iss": DELETE},
        {"type": "authorization_request", "nats": {"type": DELETE, "version": DELETE}},
    ],
    ids=lambda o: repr(o),
)
def test_malformed_claims(overrides: dict[str, Any]) -> None:
    rig = make_rig()
    forged = rig.forge(overrides=overrides)
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == d.MALFORMED, decision
    assert decision.request is None and rig.authorizer.respond(decision, NOW) == b""


def test_tampered_request_is_forged() -> None:
    rig = make_rig()
    forged = rig.forge()
    header, _, sig = forged.token.split(b".")
    claims = {**forged.claims, "exp": forged.claims["exp"] + 3600}
    tampered = header + b"." + forge.b64url(forge.compact(claims)) + b"." + sig
    decision = rig.gate1(tampered)
    assert decision.reason == d.FORGED
    assert rig.authorizer.respond(decision, NOW) == b""


@pytest.mark.parametrize(
    "aud", ["nats-authorization-response", DELETE, "", ["nats-authorization-request"], "APP"]
)
def test_wrong_audience(aud: Any) -> None:
    rig = make_rig()
    decision = rig.run(rig.forge(overrides={"aud": aud}), Found(ALICE))
    assert decision.reason == d.NOT_FOR_US


def test_server_id_must_be_the_signer() -> None:
    rig = make_rig()
    other = ServerIdentity.generate()
    # Signed by us, but server_id names another server.
    forged = rig.forge(overrides={"nats": {"server_id": {"id": other.public}}})
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == d.WRONG_SERVER
    assert decision.client_key == rig.client.public
    assert rig.authorizer.respond(decision, NOW) == b""


# ---------------------------------------------------------------------------------------------
# xkey
# ---------------------------------------------------------------------------------------------
def test_encrypted_request_admitted_and_response_sealed_back() -> None:
    rig = make_rig(xkey=True)
    forged = rig.forge()
    assert forged.payload.startswith(b"xkv1") and forged.headers == {
        forge.XKEY_HEADER: rig.server.xkey_public
    }
    request = rig.request(forged)
    assert request.xkeys is not None and request.xkeys[1].public == rig.keys.xkey_pub
    decision = rig.authorizer.decide(request, Found(ALICE))
    body = rig.authorizer.respond(decision, NOW, 0.0)
    assert body.startswith(b"xkv1")  # not eyJ: the server opens it with its xkey (§2)
    user = admitted_user(rig, decision, forged)
    assert user["name"] == "alice"
    # The server opens it with the configured service xkey; sealed to it and nothing else.
    assert not forge.try_open_response(body, rig.server, new_curve()[1])


def test_deny_to_an_encrypted_request_is_sealed_too() -> None:
    rig = make_rig(xkey=True)
    forged = rig.forge()
    decision = rig.run(forged, Missing())
    assert decision.reason == d.UNKNOWN_USER
    assert rig.authorizer.respond(decision, NOW).startswith(b"xkv1")
    assert_error_response(rig, decision, forged)


@pytest.mark.parametrize("which", ["old", "new"])
def test_rotation_seals_with_the_key_that_opened(which: str) -> None:
    old, new = CurveKey.generate(), CurveKey.generate()
    rig = make_rig(xkeys=(new, old))
    target = old if which == "old" else new
    forged = rig.forge(seal_to=target.public)
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == d.ADMIT
    assert decision.request is not None and decision.request.xkeys is not None
    assert decision.request.xkeys[1] is target
    body = rig.authorizer.respond(decision, NOW, 0.0)
    admitted_user(rig, decision, forged)  # opens with target.public
    other = new if target is old else old
    assert not forge.try_open_response(body, rig.server, other.public)


def test_plaintext_request_when_xkey_is_configured() -> None:
    rig = make_rig(xkey=True)
    forged = rig.forge(seal_to=None)
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == d.XKEY_REQUIRED
    body = rig.authorizer.respond(decision, NOW)
    assert body.startswith(b"eyJ")  # nothing to seal to: a plaintext signed error
    assert_error_response(rig, decision, forged)


def test_encrypted_request_without_xkey_configured() -> None:
    rig = make_rig()
    sealed = rig.forge(seal_to=new_curve()[1])
    assert rig.open(sealed).reason == d.XKEY_UNEXPECTED  # type: ignore[union-attr]
    plain = rig.forge()
    # The header alone, or the xkv1 payload alone, also say "encrypted".
    header_only = rig.gate1(plain.payload, {forge.XKEY_HEADER: rig.server.xkey_public})
    assert header_only.reason == d.XKEY_UNEXPECTED
    payload_only = rig.gate1(sealed.payload, None)
    assert payload_only.reason == d.XKEY_UNEXPECTED
    for decision in (header_only, payload_only):
        assert rig.authorizer.respond(decision, NOW) == b""


def test_xkey_failures() -> None:
    rig = make_rig(xkey=True)
    good = rig.forge()
    cases = {
        "wrong service key": rig.forge(seal_to=new_curve()[1]),
        "header names another server": rig.forge(header_xkey=ServerIdentity.generate().xkey_public),
    }
    for name, forged in cases.items():
        decision = rig.open(forged)
        assert isinstance(decision, Decision) and decision.reason == d.XKEY_FAILED, name
    header = good.headers
    assert header is not None
    for name, payload, headers in [
        ("truncated box", good.payload[:-1], header),
        ("cut to the nonce", good.payload[:28], header),
        ("magic only", b"xkv1", header),
        (
            "flipped byte",
            good.payload[:40] + bytes([good.payload[40] ^ 1]) + good.payload[41:],
            header,
        ),
        ("header without xkv1 payload", good.token, header),
        ("xkv1 payload without header", good.payload, None),
        ("header is not a curve key", good.payload, {forge.XKEY_HEADER: rig.server.public}),
        ("header is garbage", good.payload, {forge.XKEY_HEADER: "X"}),
    ]:
        decision = rig.gate1(payload, headers)
        assert decision.reason == d.XKEY_FAILED, name
        assert rig.authorizer.respond(decision, NOW) == b""
    assert isinstance(rig.open(good), Request)  # and the good one opens


def test_header_xkey_must_match_server_id_xkey() -> None:
    rig = make_rig(xkey=True)
    _, stranger = new_curve()
    for server_xkey in (stranger, DELETE, ""):
        forged = rig.forge(overrides={"nats": {"server_id": {"xkey": server_xkey}}})
        decision = rig.open(forged)
        assert isinstance(decision, Decision) and decision.reason == d.WRONG_SERVER
        assert "xkey" in decision.detail
        assert rig.authorizer.respond(decision, NOW) == b""


# ---------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------
def test_replay_of_the_same_request() -> None:
    rig = make_rig()
    forged = rig.forge()
    first = rig.run(forged, Found(ALICE))
    assert first.reason == d.ADMIT
    second = rig.run(forged, Found(ALICE), now=NOW + 2)  # still inside exp + leeway
    # Dropped: a signed error to the same inbox could disconnect the client the first admitted.
    assert second.reason == d.REPLAY and second.drop
    assert second.request is not None and second.client_key == rig.client.public
    # A new request (new user_nkey) from the same client is fine.
    assert rig.run(rig.forge(), Found(ALICE)).reason == d.ADMIT


def test_replay_is_keyed_on_server_and_user_nkey_not_jti() -> None:
    rig = make_rig()
    other = ServerIdentity.generate("S2")
    _, user_nkey = new_user()
    mine = rig.forge(user_nkey=user_nkey)
    theirs = rig.forge(server=other, user_nkey=user_nkey)
    assert rig.run(mine, Found(ALICE)).reason == d.ADMIT
    decision = rig.run(theirs, Found(ALICE))
    assert decision.reason == d.ADMIT
    admitted_user(rig, decision, theirs)  # addressed to S2
    # Same jti (same second, same server, same issuer), different user_nkey: not a replay.
    a, b = rig.forge(), rig.forge()
    assert a.claims["jti"] == b.claims["jti"] and a.user_nkey != b.user_nkey
    assert rig.run(a, Found(ALICE)).reason == d.ADMIT
    assert rig.run(b, Found(ALICE)).reason == d.ADMIT


def test_replay_after_a_denied_first_sight() -> None:
    rig = make_rig()
    forged = rig.forge()
    assert rig.run(forged, Missing()).reason == d.UNKNOWN_USER
    assert rig.run(forged, Found(ALICE)).reason == d.REPLAY


def test_seen_requests_expiry() -> None:
    seen = SeenRequests()
    assert seen.first_sight("N1", "U1", until=10.0, now=0.0)
    assert not seen.first_sight("N1", "U1", until=10.0, now=5.0)
    assert seen.first_sight("N2", "U1", until=10.0, now=5.0)
    assert not seen.first_sight("N1", "U1", until=10.0, now=10.0)  # until is inclusive
    assert len(seen) == 2
    assert seen.first_sight("N3", "U3", until=30.0, now=10.5)  # the expired ones go
    assert len(seen) == 1
    assert seen.first_sight("N1", "U1", until=40.0, now=10.5)


def test_seen_requests_capacity() -> None:
    seen = SeenRequests(capacity=3)
    for i in range(10):
        assert seen.first_sight("N", f"U{i}", until=1000.0, now=0.0)
        assert len(seen) <= 3
    assert len(seen) == 3
    # The newest are remembered (newest first: a lookup at capacity makes room first).
    assert not seen.first_sight("N", "U9", until=1000.0, now=0.0)
    assert not seen.first_sight("N", "U8", until=1000.0, now=0.0)
    assert seen.first_sight("N", "U0", until=1000.0, now=0.0)  # the oldest were forgotten
    assert len(seen) == 3


def test_authorizer_replay_memory_is_bounded() -> None:
    rig = make_rig()
    rig.authorizer.seen = SeenRequests(capacity=2)
    forged = [rig.forge() for _ in range(3)]
    for f in forged:
        assert isinstance(rig.open(f), Request)
    assert len(rig.authorizer.seen) == 2
    assert rig.run(forged[2], Missing()).reason == d.REPLAY


# ---------------------------------------------------------------------------------------------
# time
# ---------------------------------------------------------------------------------------------
def test_expiry_boundary_and_drop() -> None:
    rig = make_rig()
    forged = rig.forge(timeout=2.0)
    exp = forged.claims["exp"]
    assert isinstance(rig.open(forged, now=exp + d.EXP_LEEWAY), Request)
    late = rig.forge(timeout=2.0)
    decision = rig.open(late, now=late.claims["exp"] + d.EXP_LEEWAY + 0.01)
    assert isinstance(decision, Decision)
    assert decision.reason == d.EXPIRED and decision.drop and not decision.admit
    assert decision.client_key == rig.client.public
    assert rig.authorizer.respond(decision, NOW) == b""


def test_not_yet_valid() -> None:
    rig = make_rig()
    edge = int(NOW) + int(d.EXP_LEEWAY)
    assert isinstance(rig.open(rig.forge(overrides={"nbf": edge})), Request)
    decision = rig.open(rig.forge(overrides={"nbf": edge + 1}))
    assert isinstance(decision, Decision) and decision.reason == d.NOT_YET_VALID
    mistyped = rig.open(rig.forge(overrides={"nbf": "later"}))  # not an int: refused
    assert isinstance(mistyped, Decision) and mistyped.reason == d.MALFORMED


def test_deadline_is_the_receive_time_plus_the_server_s_wait() -> None:
    rig = make_rig()
    request = rig.request(rig.forge(timeout=2.0))
    assert request.server_timeout == 2.0
    assert request.deadline(NOW, 1.0) == NOW + 1.0
    assert request.deadline(NOW, 5.0) == NOW + 2.0 - d.REPLY_MARGIN
    # Whatever our clock says of the server's exp: far ahead, or far behind.
    assert request.deadline(NOW + 3, 1.0) == NOW + 4.0
    assert request.deadline(NOW - 3, 5.0) == NOW - 1.0 - d.REPLY_MARGIN


@pytest.mark.parametrize("skew", [-3.0, -1.5, 1.5, 3.0])
@pytest.mark.parametrize("timeout", [1.0, 2.0])
def test_a_skewed_clock_neither_drops_nor_times_out_a_fresh_request(
    skew: float, timeout: float
) -> None:
    """A host ahead of its server still answers: no request is seen as expired (dropped: the
    client would wait out the server's timeout) nor its deadline as already passed
    (store_timeout)."""
    rig = make_rig()
    for fraction in (0.0, 0.5, 0.99):  # where in its second the server published
        sent = NOW + fraction
        forged = rig.forge(now=sent, timeout=timeout)
        received = sent + skew + 0.001
        request = rig.request(forged, now=received)
        budget = request.deadline(received, 1.0) - received
        assert 0.9 <= budget <= 1.0


@pytest.mark.parametrize("iat", [forge.DELETE, "soon", 1.5, 0, -5, 10**12, None], ids=repr)
def test_an_implausible_iat_falls_back_to_exp(iat: Any) -> None:
    rig = make_rig()
    request = rig.request(rig.forge(timeout=2.0, overrides={"iat": iat}))
    assert request.server_timeout == 0.0
    assert request.deadline(NOW, 1.0) == NOW + 1.0
    assert request.deadline(NOW, 5.0) == request.exp


def test_response_iat_is_the_response_time() -> None:
    rig = make_rig()
    forged = rig.forge()
    decision = rig.run(forged, Missing())
    claims = response_claims(rig, rig.authorizer.respond(decision, NOW + 0.7), forged)
    assert claims["iat"] == int(NOW)


# ---------------------------------------------------------------------------------------------
# the oracle itself
# ---------------------------------------------------------------------------------------------
def test_forged_request_is_shaped_like_the_server_s() -> None:
    server = ServerIdentity.generate()
    client = ClientKey.generate()
    _, issuer = new_account()
    forged = forge.forge_request(server, issuer, now=NOW, client=client, timeout=1.5)
    claims = forge.decode_jwt(forged.token, nkeys.PREFIX_BYTE_SERVER)
    assert claims["iss"] == claims["nats"]["server_id"]["id"] == server.public
    assert claims["sub"] == issuer and claims["aud"] == "nats-authorization-request"
    assert claims["exp"] - claims["iat"] == 1  # 1.5 s, truncated
    assert len(claims["jti"]) == 52
    assert len(forged.nonce) == 15 and claims["nats"]["client_info"]["nonce"] == forged.nonce
    assert (
        claims["nats"]["user_nkey"].startswith("U") and claims["nats"]["user_nkey"] != client.public
    )
    assert claims["nats"]["connect_opts"]["nkey"] == client.public


# --- replay by nonce, the shared replay record, and the failure limiter --------------------------
def test_same_nonce_from_the_same_server_is_a_replay() -> None:
    r = make_rig()
    first = r.forge(nonce="abcdefghijklmno")
    again = r.forge(nonce="abcdefghijklmno")  # a fresh user_nkey, the same client nonce
    assert isinstance(r.open(first), Request)
    decision = r.open(again)
    # A new request (its own inbox): answered with a signed error, not dropped.
    assert isinstance(decision, Decision) and decision.reason == d.REPLAY and not decision.drop
    assert "nonce" in decision.detail
    assert_error_response(r, decision, again)
    other_server = r.forge(nonce="abcdefghijklmno", server=ServerIdentity.generate())
    assert isinstance(r.open(other_server), Request)


@pytest.mark.parametrize(
    ("replay", "reason"),
    [
        (d.SeenBefore(), d.REPLAY),
        (d.Unavailable("down"), d.STORE_UNAVAILABLE),
        (d.TimedOut(), d.STORE_TIMEOUT),
        (d.FirstSight(), d.ADMIT),
        (None, d.ADMIT),
    ],
)
def test_shared_replay_record_fails_closed(replay: Any, reason: str) -> None:
    r = make_rig()
    request = r.request(r.forge())
    decision = r.authorizer.decide(request, Found(record("alice")), replay)
    assert decision.reason == reason
    assert decision.drop == (reason == d.REPLAY)


def test_internal_key_never_depends_on_the_replay_record() -> None:
    r = internal_rig()
    request = r.request(r.forge())
    assert r.authorizer.decide(request, None, d.Unavailable("down")).reason == d.ADMIT_INTERNAL


def test_throttled_key_recovers_when_it_slows_down() -> None:
    r = make_rig(fail_limit_key=2, fail_window=10.0)
    for _ in range(2):
        assert r.run(r.forge(), Missing()).reason == d.UNKNOWN_USER
    assert r.run(r.forge(), Missing()).reason == d.THROTTLED
    # 5 s later one token is back (2 per 10 s): one more try reaches the store.
    later = NOW + 5.0
    assert r.run(r.forge(now=later), Found(record("alice")), now=later).reason == d.ADMIT


def test_bad_signatures_throttle_the_host_not_the_key() -> None:
    victim = ClientKey.generate()
    r = make_rig(client=victim, fail_limit_key=1, fail_limit_host=2)
    attacker = ClientKey.generate()
    forged_sig = {"nats": {"connect_opts": {"sig": attacker.sign("wrong")}}}
    for _ in range(2):
        assert r.run(r.forge(overrides=forged_sig), Missing()).reason == d.BAD_SIGNATURE
    # The host is throttled now for requests that fail ...
    assert r.run(r.forge(overrides=forged_sig), Missing()).reason == d.THROTTLED
    # ... but a valid signature from it is never refused for its host ...
    assert r.run(r.forge(), Found(record("v"))).reason == d.ADMIT
    # ... and the victim's key is not throttled either: from another host it is admitted.
    elsewhere = {"nats": {"client_info": {"host": "10.9.9.9"}}}
    assert r.run(r.forge(overrides=elsewhere), Found(record("v"))).reason == d.ADMIT


def test_requests_without_a_key_lock_no_host_out() -> None:
    """A bare `CONNECT {}` does not count against its host, and the host check comes after the
    signature: otherwise ~10 a second would lock out every valid client behind the address."""
    r = make_rig(fail_limit_host=3, fail_window=3600.0)
    for _ in range(50):
        assert r.run(r.forge(client=None), Missing()).reason == d.NO_NKEY
    assert len(r.authorizer.failures_by_host) == 0
    assert r.run(r.forge(), Found(ALICE)).reason == d.ADMIT
    # Failing requests that carry a key do count, and then are refused as throttled; a valid
    # one still gets in.
    bad = {"nats": {"connect_opts": {"sig": "A" * 86}}}
    reasons = [r.run(r.forge(overrides=bad), Missing()).reason for _ in range(5)]
    assert reasons == [d.BAD_SIGNATURE] * 3 + [d.THROTTLED] * 2
    assert r.run(r.forge(client=None), Missing()).reason == d.NO_NKEY
    assert r.run(r.forge(), Found(ALICE)).reason == d.ADMIT


def test_unknown_keys_with_valid_signatures_are_throttled_by_key_only() -> None:
    r = make_rig(fail_limit_key=2, fail_limit_host=2, fail_window=3600.0)
    for _ in range(4):  # fresh keys: each fails once, the host four times
        assert r.run(r.forge(client=ClientKey.generate()), Missing()).reason == d.UNKNOWN_USER
    assert r.run(r.forge(client=ClientKey.generate()), Missing()).reason == d.UNKNOWN_USER
    assert r.run(r.forge(), Found(ALICE)).reason == d.ADMIT  # a known key behind the host


def test_internal_keys_are_never_throttled() -> None:
    r = internal_rig(fail_limit_host=1)
    bad = {"nats": {"connect_opts": {"sig": "A" * 86}}}
    assert r.run(r.forge(overrides=bad), None).reason == d.BAD_SIGNATURE
    assert r.run(r.forge(overrides=bad), None).reason == d.THROTTLED  # its host, failing
    assert r.run(r.forge(), None).reason == d.ADMIT_INTERNAL


def test_limiter_is_bounded_and_can_be_off() -> None:
    from callout.limits import FailureLimiter

    off = FailureLimiter(limit=0)
    for _ in range(100):
        off.failed("k", NOW)
    assert not off.throttled("k", NOW) and len(off) == 0
    small = FailureLimiter(limit=1, window=1.0, capacity=3)
    for i in range(10):
        small.failed(f"k{i}", NOW)
    assert len(small) == 3
    assert small.throttled("k9", NOW) and not small.throttled("k0", NOW)


def test_default_account_is_never_sys_or_the_callout_account() -> None:
    # Internal keys and soft-mode admits are placed in --account, which obeys the same rule as
    # a record's account: no Policy can name them, and even one that got past that is denied.
    for account in ("SYS", "AUTH"):
        with pytest.raises(d.PolicyError, match=f"refusing to place users in {account}"):
            policy_for(make_keys(), account=account, allowed_accounts=frozenset({"APP"}))
        client = ClientKey.generate()
        internal = rig_past_validation(
            client=client, account=account, internal_keys=(client.public,)
        )
        assert internal.run(internal.forge(), None).reason == d.ACCOUNT_NOT_ALLOWED
        soft = rig_past_validation(account=account, mode="soft")
        assert soft.run(soft.forge(), Missing()).reason == d.ACCOUNT_NOT_ALLOWED


def test_throttled_refusals_do_not_keep_a_host_throttled() -> None:
    r = make_rig(fail_limit_host=2, fail_window=10.0)
    bad = {"nats": {"connect_opts": {"sig": "A" * 86}}}
    for _ in range(2):
        assert r.run(r.forge(overrides=bad), Missing()).reason == d.BAD_SIGNATURE
    # Failing clients behind the host keep retrying while it is throttled; valid ones are
    # admitted throughout ...
    for i in range(20):
        at = NOW + i * 0.2
        assert r.run(r.forge(now=at, overrides=bad), Missing(), now=at).reason in {
            d.THROTTLED,
            d.BAD_SIGNATURE,
        }
        assert r.run(r.forge(now=at), Found(ALICE), now=at).reason == d.ADMIT
    # ... and the host recovers once the window has passed since the last counted failure.
    later = NOW + 10.0
    assert r.run(r.forge(now=later, overrides=bad), Missing(), now=later).reason == (
        d.BAD_SIGNATURE
    )


# ---------------------------------------------------------------------------------------------
# live sessions: does a change to the record still stand for what a connection was given?
# ---------------------------------------------------------------------------------------------
ORDERS = record("o", pub_allow=["orders.>"], pub_deny=["orders.secret"], sub_allow=["_INBOX.>"])


def _grant_of(value: bytes, **policy: Any) -> d.Grant:
    rig = make_rig(**policy)
    decision = rig.run(rig.forge(), Found(value))
    assert decision.grant is not None, decision
    return decision.grant


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # permissions reduced
        (
            ORDERS,
            record(
                "o", pub_allow=["orders.new"], pub_deny=["orders.secret"], sub_allow=["_INBOX.>"]
            ),
        ),
        (
            ORDERS,
            record(
                "o",
                pub_allow=["orders.>"],
                pub_deny=["orders.secret", "orders.x"],
                sub_allow=["_INBOX.>"],
            ),
        ),
        (record("u"), ORDERS),  # unrestricted -> restricted
        # admin removed
        (record("a", admin=True, pub_allow=["x"]), record("a", pub_allow=["x"])),
        # the account changed: to one not allowed, or to another allowed one
        (ORDERS, record("o", account="SYS")),
        (ORDERS, record("o", account="OTHER")),
        # revoked, revoked set to an invalid value, and other invalid records
        (ORDERS, record("o", revoked=True)),
        (ORDERS, b'{"name": "o", "revoked": "yes"}'),
        (ORDERS, b'{"name": "o", "revoked": 1}'),
        (ORDERS, b'{"name": "o", "Revoked": true}'),
        (ORDERS, b"not json"),
    ],
)
def test_a_narrower_or_unusable_record_ends_live_sessions(before: bytes, after: bytes) -> None:
    policy = policy_for(make_keys(), allowed_accounts=frozenset({APP, "OTHER"}))
    grant = _grant_of(before, allowed_accounts=policy.allowed_accounts)
    assert not d.still_admits(policy, grant, Found(after))


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (ORDERS, ORDERS),
        (
            ORDERS,
            record(
                "renamed",
                pub_allow=["orders.>"],
                pub_deny=["orders.secret"],
                sub_allow=["_INBOX.>"],
            ),
        ),
        # wider: more allowed, less denied, a wildcard over a literal, no list at all, admin
        (
            ORDERS,
            record(
                "o",
                pub_allow=["orders.>", "billing.>"],
                pub_deny=["orders.secret"],
                sub_allow=["_INBOX.>"],
            ),
        ),
        (ORDERS, record("o", pub_allow=["orders.>"], sub_allow=["_INBOX.>"])),
        (ORDERS, record("o", pub_allow=["orders.>"], pub_deny=["orders.secret"])),  # sub: all
        (record("l", pub_allow=["orders.new"]), record("l", pub_allow=["orders.*"])),
        (record("l", pub_allow=["orders.a.b"]), record("l", pub_allow=["orders.>"])),
        (ORDERS, record("u")),
        (ORDERS, record("a", admin=True)),
        (record("d", pub_deny=["orders.>"]), record("d", pub_deny=["orders.secret"])),
        # the record names the default account explicitly
        (
            ORDERS,
            record(
                "o",
                account=APP,
                pub_allow=["orders.>"],
                pub_deny=["orders.secret"],
                sub_allow=["_INBOX.>"],
            ),
        ),
    ],
)
def test_an_equal_or_wider_record_keeps_live_sessions(before: bytes, after: bytes) -> None:
    policy = policy_for(make_keys())
    assert d.still_admits(policy, _grant_of(before), Found(after))


def test_keep_sessions_keeps_them_whatever_the_record_says() -> None:
    policy = policy_for(make_keys())
    kept = b'{"revoked": true, "keep_sessions": true}'
    assert d.still_admits(policy, _grant_of(ORDERS), Found(kept))
    # ... but an invalid record cannot say so.
    assert not d.still_admits(
        policy, _grant_of(ORDERS), Found(b'{"revoked": true, "keep_sessions": "yes"}')
    )


def test_deleted_missing_and_soft_mode_sessions() -> None:
    enforce = policy_for(make_keys())
    grant = _grant_of(ORDERS)
    assert not d.still_admits(enforce, grant, d.Deleted())
    assert not d.still_admits(enforce, grant, Missing())
    assert not d.still_admits(enforce, grant, Unavailable("x"))
    defaults = Permissions(pub=Rules(allow=("public.>",)))
    soft = policy_for(make_keys(), mode="soft", default_permissions=defaults)
    # A soft-mode admit (no record, the defaults) stands while the key still has no record,
    # ends when it is deleted, and when a record narrower than the defaults appears.
    rig = make_rig(mode="soft", default_permissions=defaults)
    soft_grant = rig.run(rig.forge(), Missing()).grant
    assert soft_grant == d.Grant(APP, defaults)
    assert d.still_admits(soft, soft_grant, Missing())
    assert not d.still_admits(soft, soft_grant, d.Deleted())
    assert not d.still_admits(soft, soft_grant, Found(record("n", pub_allow=["public.a"])))
    assert d.still_admits(soft, soft_grant, Found(record("w", pub_allow=["public.>", "x"])))


# ---------------------------------------------------------------------------------------------
# connection kinds
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "allowed", "reason"),
    [
        ("Client", {"client"}, d.ADMIT),
        ("Leafnode", {"client"}, d.KIND_NOT_ALLOWED),  # never admitted on a user's record alone
        ("Leafnode", {"client", "leafnode"}, d.ADMIT),
        ("Client", {"leafnode"}, d.KIND_NOT_ALLOWED),
        ("Router", {"client", "leafnode"}, d.KIND_NOT_ALLOWED),
        ("client", {"client"}, d.KIND_NOT_ALLOWED),  # not the server's spelling
        (DELETE, {"client", "leafnode"}, d.KIND_NOT_ALLOWED),
        (7, {"client"}, d.KIND_NOT_ALLOWED),
    ],
)
def test_connection_kinds(kind: Any, allowed: set[str], reason: str) -> None:
    rig = make_rig(allowed_kinds=frozenset(allowed))
    forged = rig.forge(overrides={"nats": {"client_info": {"kind": kind}}})
    decision = rig.run(forged, Found(ALICE))
    assert decision.reason == reason
    if reason == d.KIND_NOT_ALLOWED:
        assert_error_response(rig, decision, forged)
        assert "--allow-kind" in decision.detail


def test_internal_keys_obey_the_allowed_kinds_too() -> None:
    rig = internal_rig()
    leaf = rig.forge(overrides={"nats": {"client_info": {"kind": "Leafnode"}}})
    assert rig.run(leaf, None).reason == d.KIND_NOT_ALLOWED


@pytest.mark.parametrize(
    "fields",
    [
        {"allowed_kinds": frozenset()},
        {"allowed_kinds": frozenset({"router"})},
        {"fail_window": float("inf")},
        {"fail_window": float("nan")},
        {"user_ttl": float("nan")},
        {"user_ttl": float("inf")},
    ],
)
def test_policy_refuses_what_it_cannot_mean(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        policy_for(make_keys(), **fields)


def test_operator_mode_never_places_into_a_forbidden_account_key() -> None:
    """The name a signer is given is ours; the key is what places (docs/protocol.md §3 check 15)."""
    seed, system_key = new_account()
    signer = d.AccountSigner(SigningKey.from_seed(seed), system_key)
    fields: dict[str, Any] = {
        "signers": {APP: signer},
        "forbidden_account_keys": frozenset({system_key}),
    }
    with pytest.raises(d.PolicyError, match="that is the system account's key"):
        policy_for(make_keys(), **fields)
    rig = rig_past_validation(**fields)
    decision = rig.run(rig.forge(), Found(ALICE))
    assert decision.reason == d.ACCOUNT_NOT_ALLOWED
