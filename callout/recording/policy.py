"""The non-secret part of a `Policy`: what a recording carries, so that `callout replay`
decides its requests under the policy they were decided under, with no flag and no secret.

`FIELDS` lists every `Policy` field a recording keeps, each with how it is written and read
back; it is the one place to extend when `Policy` grows. Reading is strict: a field missing
from a recording (unless the table gives a value for recordings that predate it), a field
the table does not know, or a value of the wrong shape is an error that names the field.

Secrets are never written. Three fields hold keys, and only their public halves are kept:

- `issuer` (the account key that signs responses) and the operator-mode `signers`: replay
  compares decisions, it signs nothing, and no decision depends on which key would sign; they
  are read back as freshly generated stand-in keys;
- `xkeys`: the recording keeps each request as the server signed it, after opening the box,
  with the public xkey that opened it (`callout.recording.writer`). On replay each recorded public
  xkey gets a stand-in curve key and the request is sealed again, from the server's recorded
  xkey to that stand-in, so it reaches the decision core encrypted, as it arrived: the
  `xkey_required` / `xkey_unexpected` / `xkey_failed` rules see what they saw.

A test checks that every `Policy` field is in `FIELDS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from callout.decision import CLIENT_KINDS, AccountSigner, Policy, PolicyError
from callout.keys import CurveKey, KeyError_, KeyKind, SigningKey, decode_public
from callout.records import Permissions, RecordError, account_problem, parse_permissions

Json = Any


class PolicyDocumentError(ValueError):
    """A recorded policy that cannot be read; the message names the field."""


def _fail(name: str, problem: str) -> PolicyDocumentError:
    return PolicyDocumentError(f"policy.{name}: {problem}")


# -- readers: JSON in, the Policy value out (raise PolicyDocumentError naming the field) ---------
def _string(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise _fail(name, "must be a string")
    return value


def _account(name: str, value: object) -> str:
    if (problem := account_problem(value)) is not None:
        raise _fail(name, problem)
    assert isinstance(value, str)
    return value


def _accounts(name: str, value: object) -> frozenset[str]:
    if not isinstance(value, list):
        raise _fail(name, "must be a list of account names")
    return frozenset(_account(name, item) for item in value)


def _public(name: str, value: object, kind: KeyKind) -> str:
    try:
        decode_public(_string(name, value), kind)
    except KeyError_ as exc:
        raise _fail(name, str(exc)) from None
    assert isinstance(value, str)
    return value


def _number(name: str, value: object, *, integer: bool = False) -> Any:
    problem = _fail(name, f"must be a non-negative {'integer' if integer else 'number'}")
    # bool is an int: refused, like any other wrong type.
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        raise problem
    if not math.isfinite(value) or value < 0:
        raise problem
    return value if integer else float(value)


def _permissions(name: str, value: object) -> Permissions:
    try:
        return parse_permissions(value, f"policy.{name}")
    except RecordError as exc:
        raise PolicyDocumentError(str(exc)) from None


def _kinds(name: str, value: object) -> frozenset[str]:
    known = set(CLIENT_KINDS.values())
    if not isinstance(value, list) or not value or not set(value) <= known:
        raise _fail(name, f"must be a non-empty list of {sorted(known)}")
    return frozenset(value)


def _account_keys(name: str, value: object) -> frozenset[str]:
    if not isinstance(value, list):
        raise _fail(name, "must be a list of account public keys")
    return frozenset(_public(name, item, KeyKind.ACCOUNT) for item in value)


def _mode(name: str, value: object) -> str:
    if value not in ("enforce", "soft"):
        raise _fail(name, "must be 'enforce' or 'soft'")
    assert isinstance(value, str)
    return value


def _internal_keys(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(name, "must be a list of user public keys")
    return tuple(_public(name, item, KeyKind.USER) for item in value)


def _xkeys(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(name, "must be a list of curve public keys")
    return tuple(_public(name, item, KeyKind.CURVE) for item in value)


def _signers(name: str, value: object) -> dict[str, tuple[str, str]]:
    if not isinstance(value, dict):
        raise _fail(name, "must be an object of account name -> {account, key}")
    signers: dict[str, tuple[str, str]] = {}
    for account_name, signer in value.items():
        where = f"{name}.{account_name}"
        _account(name, account_name)
        if not isinstance(signer, dict) or set(signer) != {"account", "key"}:
            raise _fail(where, 'must be {"account": A..., "key": A...}')
        signers[account_name] = (
            _public(where, signer["account"], KeyKind.ACCOUNT),
            _public(where, signer["key"], KeyKind.ACCOUNT),
        )
    return signers


@dataclass(frozen=True)
class Field:
    """One Policy field: `write` its JSON from the Policy, `read` the JSON back into a checked
    value (public keys stay strings here; `load` turns them into stand-ins)."""

    name: str
    write: Callable[[Policy], Json]
    read: Callable[[str, object], Any]


_MISSING: Final = object()

FIELDS: Final[tuple[Field, ...]] = (
    Field("issuer", lambda p: p.issuer.public, lambda n, v: _public(n, v, KeyKind.ACCOUNT)),
    Field("account", lambda p: p.account, _account),
    Field("allowed_accounts", lambda p: sorted(p.allowed_accounts), _accounts),
    Field("xkeys", lambda p: [k.public for k in p.xkeys], _xkeys),
    Field("internal_keys", lambda p: list(p.internal_keys), _internal_keys),
    Field("internal_permissions", lambda p: p.internal_permissions.as_json(), _permissions),
    Field("default_permissions", lambda p: p.default_permissions.as_json(), _permissions),
    Field("mode", lambda p: p.mode, _mode),
    Field("user_ttl", lambda p: p.user_ttl, _number),
    Field("backend_timeout", lambda p: p.backend_timeout, _number),
    Field("forbidden_accounts", lambda p: sorted(p.forbidden_accounts), _accounts),
    Field(
        "signers",
        lambda p: {
            name: {"account": s.account, "key": s.key.public} for name, s in p.signers.items()
        },
        _signers,
    ),
    Field(
        "issuer_account",
        lambda p: p.issuer_account,
        lambda n, v: None if v is None else _public(n, v, KeyKind.ACCOUNT),
    ),
    Field("fail_limit_key", lambda p: p.fail_limit_key, lambda n, v: _number(n, v, integer=True)),
    Field("fail_limit_host", lambda p: p.fail_limit_host, lambda n, v: _number(n, v, integer=True)),
    Field("fail_window", lambda p: p.fail_window, _number),
    Field("forbidden_account_keys", lambda p: sorted(p.forbidden_account_keys), _account_keys),
    Field("allowed_kinds", lambda p: sorted(p.allowed_kinds), _kinds),
)
# For fields added after recordings were made: the value an older recording stands for
# (the behaviour of the version that wrote it). Empty: every field above is in every v2 file.
DEFAULTS: Final[Mapping[str, Json]] = {}


def document(policy: Policy) -> dict[str, Json]:
    """The policy's non-secret fields, as JSON."""
    return {field.name: field.write(policy) for field in FIELDS}


@dataclass(frozen=True)
class RecordedPolicy:
    """A recorded policy read back: the Policy to decide with (stand-in keys where the
    recording has public ones) and the recorded public xkeys' stand-ins."""

    document: dict[str, Json]  # as read, every field present
    policy: Policy
    xkeys: Mapping[str, CurveKey]  # recorded public xkey -> its stand-in in policy.xkeys

    @property
    def key(self) -> bytes:
        """Equal for equal recorded policies: requests decided under one share a core."""
        return orjson.dumps(self.document, option=orjson.OPT_SORT_KEYS)


def load(doc: object) -> RecordedPolicy:
    if not isinstance(doc, dict):
        raise PolicyDocumentError("policy: must be an object")
    names = {field.name for field in FIELDS}
    if unknown := sorted(set(doc) - names):
        raise _fail(unknown[0], "unknown field (written by a newer version?)")
    values: dict[str, Any] = {}
    complete: dict[str, Json] = {}
    for field in FIELDS:
        raw = doc.get(field.name, DEFAULTS.get(field.name, _MISSING))
        if raw is _MISSING:
            raise _fail(field.name, "missing")
        complete[field.name] = raw
        values[field.name] = field.read(field.name, raw)
    stand_ins = {public: CurveKey.generate() for public in values["xkeys"]}
    values["xkeys"] = tuple(stand_ins[public] for public in values["xkeys"])
    values["issuer"] = SigningKey.generate(KeyKind.ACCOUNT)
    values["signers"] = {
        name: AccountSigner(SigningKey.generate(KeyKind.ACCOUNT), account)
        for name, (account, _key) in values["signers"].items()
    }
    try:
        policy = Policy(**values)
    except PolicyError as exc:  # fields that read well one by one, but break a rule together
        raise PolicyDocumentError(f"policy: {exc}") from None
    return RecordedPolicy(complete, policy, stand_ins)


__all__ = ["DEFAULTS", "FIELDS", "PolicyDocumentError", "RecordedPolicy", "document", "load"]
