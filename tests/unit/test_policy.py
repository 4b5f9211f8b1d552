"""The placement rules every `Policy` obeys, whoever builds it (serve, replay, tests, bench):
a Policy that breaks one cannot be constructed."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from callout.decision import AccountSigner, Policy, PolicyError
from callout.keys import KeyKind, SigningKey


def account_key() -> SigningKey:
    return SigningKey.generate(KeyKind.ACCOUNT)


def operator_policy(**changes: Any) -> dict[str, Any]:
    """The fields of a valid operator-mode policy (APP and OPS allowed, each with a signer),
    with `changes`."""
    app, ops, system = account_key(), account_key(), account_key()
    fields: dict[str, Any] = {
        "issuer": account_key(),
        "account": "APP",
        "allowed_accounts": frozenset({"APP", "OPS"}),
        "forbidden_accounts": frozenset({"SYS", "$SYS", "AUTH"}),
        "signers": {"APP": AccountSigner(app, app.public), "OPS": AccountSigner(ops, ops.public)},
        "forbidden_account_keys": frozenset({system.public}),
    }
    fields.update(changes)
    return fields


def test_a_valid_operator_mode_policy_is_built() -> None:
    policy = Policy(**operator_policy())
    assert set(policy.signers) == {"APP", "OPS"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"account": "SYS"}, "refusing to place users in SYS"),
        ({"allowed_accounts": frozenset({"APP", "AUTH"})}, "refusing to place users in AUTH"),
        ({"forbidden_accounts": frozenset({"AUTH"})}, "forbidden accounts must include"),
        ({"backend_timeout": 0.0}, "--backend-timeout"),
        ({"allowed_accounts": frozenset({"APP", "OPS", "MORE"})}, "no --account-signer for"),
        ({"issuer_account": "ANOTAKEY"}, "--issuer-account:"),
        ({"forbidden_account_keys": frozenset()}, "--system-account must be the system"),
        ({"forbidden_account_keys": frozenset({"SYS"})}, "--system-account must be the system"),
    ],
)
def test_an_operator_mode_policy_that_breaks_a_rule_cannot_be_built(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy(**operator_policy(**changes))


def test_no_signer_places_users_in_the_callout_or_the_system_account() -> None:
    fields = operator_policy()
    issuer: SigningKey = fields["issuer"]
    by_issuer = {**fields["signers"], "APP": AccountSigner(issuer, issuer.public)}
    with pytest.raises(PolicyError, match="--account-signer APP: that is the callout account"):
        Policy(**{**fields, "signers": by_issuer})
    # The issuer a signing key of the callout account: that account's own key is refused too.
    callout = account_key()
    by_account = {**fields["signers"], "OPS": AccountSigner(callout, callout.public)}
    with pytest.raises(PolicyError, match="--account-signer OPS: that is the callout account"):
        Policy(**{**fields, "signers": by_account, "issuer_account": callout.public})
    (system,) = fields["forbidden_account_keys"]
    by_system = {**fields["signers"], "APP": AccountSigner(account_key(), system)}
    with pytest.raises(PolicyError, match="--account-signer APP: that is the system account"):
        Policy(**{**fields, "signers": by_system})


def test_issuer_account_is_for_operator_mode_only() -> None:
    fields = operator_policy(signers={}, allowed_accounts=frozenset({"APP"}))
    assert Policy(**fields).signers == {}
    with pytest.raises(PolicyError, match="are for operator mode"):
        Policy(**{**fields, "issuer_account": account_key().public})


def test_dataclasses_replace_cannot_get_past_the_rules() -> None:
    policy = Policy(**operator_policy())
    with pytest.raises(PolicyError, match="refusing to place users in SYS"):
        dataclasses.replace(policy, allowed_accounts=frozenset({"APP", "SYS"}))
