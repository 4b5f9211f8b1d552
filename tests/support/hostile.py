"""The hostile-input corpus: malformed, forged and mistyped authorization requests and user
records, kept as data files in ``corpus/`` (written by ``make_corpus.py``, run by hand).

This module loads a case and runs it through the sans-I/O core exactly as the service does
(``Authorizer.start``, reading the store from the case's ``users`` map as the users cache
does, from memory), and checks an answer the way nats-server reads it: with the independent
decoder of ``tests.support.forge`` (nkeys + PyNaCl), not with ``callout``'s own codec.

A case file holds everything a run needs: the payload (base64), the headers, the fixed
clock ``now``, the throw-away test keys, whether the service has an xkey, the users map
(key -> exact record bytes as text, or null for "no record") and the expected outcome:

- ``reason``: the one deny reason the core must give;
- ``answer``: ``empty`` (the request cannot be addressed: an empty body, the server's
  immediate deny), ``error`` (a signed error response, sealed back when the request was
  sealed) or ``drop`` (expired: no answer at all);
- ``sub`` / ``aud``: whom a signed error must be addressed to.

A case whose ``known_issue`` is set is one the core gets wrong today (it is admitted, or
denied for another reason); the tests mark it as a strict expected failure, so fixing the
core turns it into a failure that asks for the mark to be removed.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any, Literal

import nkeys
import pytest

from callout import decision as core_api
from callout.decision import Authorizer, Decision
from tests.support import forge
from tests.support.forge import ServerIdentity
from tests.support.nats import AUTH_SUBJECT, Keys
from tests.support.service import policy_for

# Gate 1 of the core (callout/decision.py): no request to address a signed error to, so the
# answer is the empty body (or nothing, for an expired request).
UNADDRESSABLE = frozenset(
    {
        core_api.OVERSIZE,
        core_api.XKEY_UNEXPECTED,
        core_api.XKEY_FAILED,
        core_api.MALFORMED,
        core_api.FORGED,
        core_api.NOT_FOR_US,
        core_api.WRONG_SERVER,
        core_api.EXPIRED,
        core_api.NOT_YET_VALID,
    }
)

HERE = Path(__file__).resolve().parents[1] / "hostile"
CORPUS = HERE / "corpus"
Answer = Literal["empty", "error", "drop"]


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    input: str  # one line: what is hostile about it (the docs table shows it)
    payload: bytes
    headers: dict[str, str] | None
    now: float
    xkey: bool  # the service is configured with an xkey
    keys: dict[str, str]
    users: dict[str, str | None]
    reason: str
    answer: Answer
    sub: str | None
    aud: str | None
    known_issue: str | None

    @property
    def deployment_keys(self) -> Keys:
        return Keys(**{f.name: self.keys[f.name] for f in fields(Keys)})

    @property
    def server(self) -> ServerIdentity:
        """The sending server as far as reading a sealed response goes (its curve key)."""
        k = self.keys
        return ServerIdentity(
            seed="",
            public=k["server_pub"],
            xkey_seed=k["server_xkey_seed"],
            xkey_public=k["server_xkey_pub"],
        )

    def param(self) -> Any:
        """A pytest parameter: known bugs are strict expected failures."""
        marks = (
            [pytest.mark.xfail(strict=True, reason=self.known_issue)] if self.known_issue else []
        )
        return pytest.param(self, id=self.name, marks=marks)


def to_doc(case: Case) -> dict[str, Any]:
    return {
        "name": case.name,
        "group": case.group,
        "input": case.input,
        "payload_b64": base64.b64encode(case.payload).decode(),
        "headers": case.headers,
        "now": case.now,
        "policy": {"xkey": case.xkey},
        "keys": case.keys,
        "users": case.users,
        "expect": {"reason": case.reason, "answer": case.answer, "sub": case.sub, "aud": case.aud},
        "known_issue": case.known_issue,
    }


def from_doc(doc: dict[str, Any]) -> Case:
    expect = doc["expect"]
    return Case(
        name=doc["name"],
        group=doc["group"],
        input=doc["input"],
        payload=base64.b64decode(doc["payload_b64"]),
        headers=doc["headers"],
        now=doc["now"],
        xkey=doc["policy"]["xkey"],
        keys=doc["keys"],
        users=doc["users"],
        reason=expect["reason"],
        answer=expect["answer"],
        sub=expect["sub"],
        aud=expect["aud"],
        known_issue=doc["known_issue"],
    )


def dump(case: Case) -> str:
    return json.dumps(to_doc(case), indent=1, sort_keys=True) + "\n"


@cache
def load_all() -> tuple[Case, ...]:
    return tuple(from_doc(json.loads(p.read_text())) for p in sorted(CORPUS.glob("*.json")))


def authorizer(case: Case) -> Authorizer:
    """The service's core as `callout serve` builds it for this deployment (account APP;
    SYS, $SYS and the callout account AUTH never allowed)."""
    return Authorizer(policy_for(case.deployment_keys, xkey=case.xkey))


def lookup(case: Case, client_key: str) -> bytes | None:
    """The case's store, read from memory: the record's bytes, None for no record."""
    value = case.users.get(client_key)
    return None if value is None else value.encode()


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    body: bytes | None  # None: dropped, nothing sent


def run_core(case: Case, core: Authorizer | None = None) -> Outcome:
    """One request through the core with the case's clock, as `CalloutService` does."""
    core = core or authorizer(case)
    answer = core.start(case.payload, case.headers, case.now, lambda key: lookup(case, key))
    assert isinstance(answer, core_api.Answer), "a store read from memory never waits"
    return Outcome(answer.decision, answer.body)


def error_claims(case: Case, body: bytes, *, sealed: bool) -> dict[str, Any]:
    """Open (when the request was sealed) and verify a response as nats-server does
    (docs/protocol.md §2, §3): signed by the issuer account, addressed to this request."""
    if sealed:
        assert body.startswith(forge.XKEY_MAGIC), "a sealed request gets a sealed answer"
        body = forge.open_response(body, case.server, case.keys["xkey_pub"])
    else:
        assert body.startswith(b"eyJ"), body[:16]
    claims = forge.decode_jwt(body, nkeys.PREFIX_BYTE_ACCOUNT)
    assert claims["iss"] == case.keys["issuer_pub"]
    assert claims["sub"] == case.sub
    assert claims["aud"] == case.aud
    return claims


def check_answer(case: Case, decision: Decision | None, body: bytes | None) -> None:
    """The case's expected outcome, whichever path produced it. `decision` is None when only
    the bytes on the wire are known."""
    if decision is not None:
        assert not decision.admit, f"ADMITTED: {decision.reason} {decision.detail}"
        assert decision.reason == case.reason, decision.detail
        assert decision.drop is (case.answer == "drop")
    if case.answer == "drop":
        assert body is None, "an expired request is dropped, not answered"
        return
    assert body is not None
    if case.answer == "empty":
        assert body == b"", body[:64]
        return
    sealed = case.xkey and case.headers is not None and case.payload.startswith(forge.XKEY_MAGIC)
    claims = error_claims(case, body, sealed=sealed)
    assert claims["nats"] == {
        "error": case.reason,
        "type": "authorization_response",
        "version": 2,
    }, claims["nats"]


__all__ = [
    "CORPUS",
    "UNADDRESSABLE",
    "Case",
    "Outcome",
    "authorizer",
    "check_answer",
    "dump",
    "error_claims",
    "from_doc",
    "load_all",
    "lookup",
    "run_core",
    "to_doc",
]


HOSTILE = "HOSTILE"


def auth_account_body(keys: Keys) -> str:
    """The AUTH account of `render_config` (service user, JetStream) plus the export."""
    return (
        f'users: [ {{ nkey: "{keys.service_pub}" }} ]\n'
        "    jetstream: enabled\n"
        f'    exports: [ {{ service: "{AUTH_SUBJECT}" }} ]'
    )


def hostile_account_body(injector_pub: str) -> str:
    return (
        f'users: [ {{ nkey: "{injector_pub}" }} ]\n'
        f'    imports: [ {{ service: {{ account: AUTH, subject: "{AUTH_SUBJECT}" }} }} ]'
    )
