"""The decision core's driver, `Authorizer.start` / `resume`: what finishes without I/O, what
waits for it and says so, and that every path ends in an answer (a deny on any exception).

Requests are forged like nats-server's and answers read like it reads them (tests.support.forge).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import nkeys
import pytest

from callout import decision as d
from callout.decision import Answer, Authorizer, Pending
from callout.store import StoreError, WouldBlock
from tests.support import forge
from tests.support.forge import DELETE, ClientKey, Forged, ServerIdentity
from tests.support.nats import make_keys
from tests.support.service import APP, policy_for, record
from tests.support.shell import AdmitRespondRaises, DecideRaises, OpenRaises, RespondRaises

NOW = 1_800_000_000.0
ALICE = record("alice", pub_allow=["a.>"])


class Env:
    def __init__(self, *, xkey: bool = False, authorizer: type[Authorizer] = Authorizer,
                 **policy: Any) -> None:  # fmt: skip
        self.keys = make_keys()
        self.server = ServerIdentity.generate()
        self.client = ClientKey.generate()
        self.xkey = xkey
        self.authorizer = authorizer(policy_for(self.keys, xkey=xkey, **policy))
        self.lookups: list[str] = []

    def forge(self, **kwargs: Any) -> Forged:
        kwargs.setdefault("client", self.client)
        kwargs.setdefault("now", NOW)
        if self.xkey:
            kwargs.setdefault("seal_to", self.keys.xkey_pub)
        return forge.forge_request(self.server, self.keys.issuer_pub, **kwargs)

    def lookup(self, answer: bytes | type[Exception] | Exception | None) -> Callable[[str], Any]:
        """A synchronous store read that records its keys and answers `answer` (or raises it)."""

        def read(key: str) -> bytes | None:
            self.lookups.append(key)
            if isinstance(answer, Exception) or (
                isinstance(answer, type) and issubclass(answer, Exception)
            ):
                raise answer
            return answer

        return read

    def start(self, forged: Forged, lookup: Any = None, **kw: Any) -> Answer | Pending:
        return self.authorizer.start(forged.payload, forged.headers, NOW, lookup, **kw)

    def claims(self, body: bytes | None, forged: Forged) -> dict[str, Any]:
        assert body, "no body"
        plaintext = forge.open_response(body, forged.server, forged.sealed_to)
        claims = forge.decode_jwt(plaintext, nkeys.PREFIX_BYTE_ACCOUNT)
        assert claims["sub"] == forged.user_nkey and claims["aud"] == self.server.public
        return claims

    def error(self, answer: Answer | Pending, forged: Forged) -> str:
        assert isinstance(answer, Answer), answer
        nats = self.claims(answer.body, forged)["nats"]
        assert "jwt" not in nats
        error: str = nats["error"]
        assert error == answer.decision.reason
        return error

    def admitted(self, answer: Answer | Pending, forged: Forged) -> dict[str, Any]:
        assert isinstance(answer, Answer), answer
        assert answer.decision.admit
        user: dict[str, Any] = forge.decode_jwt(
            self.claims(answer.body, forged)["nats"]["jwt"], nkeys.PREFIX_BYTE_ACCOUNT
        )
        assert user["sub"] == forged.user_nkey and user["aud"] == APP
        return user


# ---------------------------------------------------------------------------------------------
# what finishes inside start
# ---------------------------------------------------------------------------------------------
def test_a_record_answered_from_memory_finishes_in_start() -> None:
    env = Env()
    forged = env.forge()
    answer = env.start(forged, env.lookup(ALICE))
    user = env.admitted(answer, forged)
    assert user["name"] == "alice" and user["nats"]["pub"] == {"allow": ["a.>"]}
    assert env.lookups == [env.client.public]


@pytest.mark.parametrize(
    ("stored", "reason"),
    [
        (None, d.UNKNOWN_USER),
        (record("old", revoked=True), d.REVOKED),
        (b"{not json", d.RECORD_INVALID),
        (StoreError("bucket 'users' does not exist"), d.STORE_UNAVAILABLE),
    ],
)
def test_a_deny_answered_from_memory_finishes_in_start(stored: Any, reason: str) -> None:
    env = Env()
    forged = env.forge()
    assert env.error(env.start(forged, env.lookup(stored)), forged) == reason


def test_soft_mode_admits_a_missing_record_in_start() -> None:
    env = Env(mode="soft")
    forged = env.forge()
    answer = env.start(forged, env.lookup(None))
    assert isinstance(answer, Answer) and answer.decision.reason == d.WOULD_DENY
    env.admitted(answer, forged)


def test_an_internal_key_finishes_in_start_without_a_lookup() -> None:
    env = Env()
    env.authorizer = Authorizer(policy_for(env.keys, internal_keys=(env.client.public,)))
    forged = env.forge()
    answer = env.start(forged, env.lookup(AssertionError("never asked")), replay=True)
    assert env.admitted(answer, forged)["name"] == "internal"
    assert env.lookups == []


def test_gate_denies_finish_in_start_without_a_lookup() -> None:
    env = Env()
    lookup = env.lookup(ALICE)
    unsigned = env.forge(overrides={"nats": {"connect_opts": {"sig": DELETE}}})
    assert env.error(env.start(unsigned, lookup), unsigned) == d.NO_SIGNATURE
    garbage = env.authorizer.start(b"garbage", None, NOW, lookup)
    assert isinstance(garbage, Answer) and garbage.decision.reason == d.MALFORMED
    assert garbage.body == b""  # nobody to address: the server's immediate deny
    expired = env.forge(now=NOW - d.EXP_LEEWAY - 10)
    dropped = env.start(expired, lookup)
    assert isinstance(dropped, Answer) and dropped.decision.reason == d.EXPIRED
    assert dropped.body is None  # the server gave up: nothing is sent
    assert env.lookups == []


# ---------------------------------------------------------------------------------------------
# what waits for I/O
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lookup", ["none", "would_block"])
def test_a_lookup_that_needs_io_is_pending(lookup: str) -> None:
    env = Env()
    forged = env.forge()
    pending = env.start(forged, None if lookup == "none" else env.lookup(WouldBlock))
    assert isinstance(pending, Pending)
    assert pending.wants_store and not pending.replay and pending.store is None
    assert pending.request.client_key == env.client.public
    admitted = env.authorizer.resume(pending, d.Found(ALICE), None, NOW)
    assert env.admitted(admitted, forged)["name"] == "alice"


@pytest.mark.parametrize(
    ("store", "reason"),
    [(d.TimedOut(), d.STORE_TIMEOUT), (d.Unavailable("down"), d.STORE_UNAVAILABLE),
     (d.Missing(), d.UNKNOWN_USER), (None, d.INTERNAL_ERROR)],
)  # fmt: skip
def test_resume_answers_what_the_store_said(store: Any, reason: str) -> None:
    env = Env()
    forged = env.forge()
    pending = env.start(forged)
    assert isinstance(pending, Pending)
    assert env.error(env.authorizer.resume(pending, store, None, NOW), forged) == reason


def test_the_replay_record_keeps_a_memory_answer_pending() -> None:
    env = Env()
    forged = env.forge()
    pending = env.start(forged, env.lookup(ALICE), replay=True)
    assert isinstance(pending, Pending)
    assert pending.replay and not pending.wants_store and pending.store == d.Found(ALICE)
    # The store's answer from memory counts; the replay record's decides the rest.
    assert env.authorizer.resume(pending, None, d.FirstSight(), NOW).decision.admit
    again = env.authorizer.resume(pending, d.Missing(), d.SeenBefore(), NOW)
    assert again.decision.reason == d.REPLAY and again.body is None  # dropped, not answered
    unavailable = env.authorizer.resume(pending, None, d.Unavailable("down"), NOW)
    assert env.error(unavailable, forged) == d.STORE_UNAVAILABLE


def test_failures_decided_in_start_count_against_the_key() -> None:
    env = Env(fail_limit_key=2)
    for _ in range(2):
        forged = env.forge()
        assert env.error(env.start(forged, env.lookup(None)), forged) == d.UNKNOWN_USER
    forged = env.forge()
    assert env.error(env.start(forged, env.lookup(ALICE)), forged) == d.THROTTLED


# ---------------------------------------------------------------------------------------------
# failing closed
# ---------------------------------------------------------------------------------------------
def test_a_lookup_that_raises_is_an_internal_error() -> None:
    env = Env()
    forged = env.forge()
    answer = env.start(forged, env.lookup(RuntimeError("driver bug")))
    assert env.error(answer, forged) == d.INTERNAL_ERROR
    assert isinstance(answer, Answer) and "RuntimeError" in answer.decision.detail


@pytest.mark.parametrize(
    ("authorizer", "body"),
    [(OpenRaises, "empty"), (AdmitRespondRaises, "signed"), (RespondRaises, "empty"),
     (DecideRaises, "signed")],
)  # fmt: skip
def test_an_exception_in_the_core_is_a_deny(authorizer: type[Authorizer], body: str) -> None:
    env = Env(authorizer=authorizer)
    answers = [env.start(env.forge(), env.lookup(ALICE))]
    if authorizer is not OpenRaises:
        pending = env.start(env.forge())
        assert isinstance(pending, Pending)
        answers.append(env.authorizer.resume(pending, d.Found(ALICE), None, NOW))
    for answer in answers:
        assert isinstance(answer, Answer)
        assert answer.decision.reason == d.INTERNAL_ERROR and not answer.decision.admit
        if body == "empty":
            assert answer.body == b""  # nobody to address, or no signing: the immediate deny
        else:
            nats = forge.decode_jwt(answer.body or b"", nkeys.PREFIX_BYTE_ACCOUNT)["nats"]
            assert nats == {"error": d.INTERNAL_ERROR, "type": "authorization_response",
                            "version": 2}  # fmt: skip


def test_abort_is_a_signed_deny() -> None:
    env = Env()
    forged = env.forge()
    pending = env.start(forged)
    assert isinstance(pending, Pending)
    answer = env.authorizer.abort(pending, "KeyError in a lookup", NOW)
    assert env.error(answer, forged) == d.INTERNAL_ERROR
    assert answer.decision.detail == "KeyError in a lookup"


# ---------------------------------------------------------------------------------------------
# randomness and caches: injected, per instance
# ---------------------------------------------------------------------------------------------
def counting_random() -> Callable[[int], bytes]:
    """0, 1, 2, ... as bytes, wrapping at 256: deterministic, and recognisable in a jti."""
    counter = itertools.count()
    return lambda n: bytes(next(counter) % 256 for _ in range(n))


@pytest.mark.parametrize("xkey", [False, True], ids=["plain", "xkey"])
def test_randomness_is_injected(xkey: bool) -> None:
    env = Env(xkey=xkey)
    forged = env.forge()
    bodies = []
    for _ in range(2):
        core = Authorizer(env.authorizer.policy, random=counting_random())
        answer = core.start(forged.payload, forged.headers, NOW, env.lookup(ALICE))
        assert isinstance(answer, Answer) and answer.decision.admit
        bodies.append(answer.body)
    # Same request, same clock, same random source: the same bytes (jti, exp, xkey nonce).
    assert bodies[0] == bodies[1]
    user = env.admitted(Answer(answer.decision, bodies[0]), forged)
    jti = bytes.fromhex(user["jti"])
    assert len(jti) == 12 and list(jti) == list(range(jti[0], jti[0] + 12))
    # The user JWT's exp is spread by ±10 % of --user-ttl; the random bytes pick where.
    ttl = env.authorizer.policy.user_ttl
    assert abs(user["exp"] - (NOW + ttl)) <= 0.1 * ttl


def test_jitter_covers_both_sides() -> None:
    low = d._uniform(bytes(8))
    high = d._uniform(b"\xff" * 8)
    assert low == -1.0 and 0.999 < high < 1.0


def test_caches_are_per_instance() -> None:
    env = Env(xkey=True)
    other = Authorizer(env.authorizer.policy)
    forged = env.forge()
    assert isinstance(env.start(forged, env.lookup(ALICE)), Answer)
    assert len(env.authorizer._boxes) == 1 and len(env.authorizer._records) == 1
    assert len(other._boxes) == 0 and len(other._records) == 0


def test_the_record_cache_is_bounded() -> None:
    env = Env()
    core = env.authorizer
    for i in range(d._RECORD_CACHE + 10):
        core._record(record(f"user{i}"))
    assert len(core._records) == d._RECORD_CACHE
    assert record("user0") not in core._records  # the oldest went first
