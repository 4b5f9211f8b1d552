"""The settings: one table of flags mapped onto argparse and the environment, frozen dataclasses
validated when constructed (the Policy's own rules: tests/unit/test_policy.py)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from callout import settings as s
from callout.decision import Policy
from callout.keys import KeyKind, SigningKey


def account_key() -> SigningKey:
    return SigningKey.generate(KeyKind.ACCOUNT)


def parse(cls: type[Any], argv: list[str], **kwargs: Any) -> Any:
    parser = s.Parser(prog="callout")
    s.add_flags(parser, cls, **kwargs)
    return s.from_args(cls, parser.parse_args(argv))


# ---------------------------------------------------------------------------------------------
# the flag table
# ---------------------------------------------------------------------------------------------
def test_policy_flags_default_to_the_policy_defaults() -> None:
    """One place for each default: the flags take a Policy field's default, not a copy."""
    flags = {f.name: f.default for f in dataclasses.fields(s.PolicySettings)}
    policy = {f.name: f.default for f in dataclasses.fields(Policy)}
    for name in ("mode", "backend_timeout", "user_ttl", "fail_limit_key", "fail_limit_host"):
        assert flags[name] == policy[name], name
    assert flags["fail_window"] == policy["fail_window"]


def test_every_flag_has_its_field_name_as_its_destination() -> None:
    """`from_args` reads each field from the argparse destination named like it."""
    classes = [s.ServeSettings, s.UsersSettings, s.ReplaySettings, s.DevSettings]
    classes += [s.ConnectSettings, s.KeysSettings, s.PolicySettings, s.ObservabilitySettings]
    for cls in classes:
        for f in dataclasses.fields(cls):
            spec = f.metadata.get("flag")
            if spec is not None:
                assert spec.flag == "--" + f.name.replace("_", "-"), (cls.__name__, f.name)
            else:
                assert "group" in f.metadata, (cls.__name__, f.name)


def test_flags_and_the_environment_build_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLOUT_MODE", "soft")
    monkeypatch.setenv("CALLOUT_ALLOWED_ACCOUNT", "APP,OPS")
    monkeypatch.setenv("CALLOUT_AUDIT_MAX_AGE", "12h")
    monkeypatch.setenv("CALLOUT_OPERATOR", "off")
    argv = ["--nats-url", "nats://h:4222", "--issuer-seed-file", "i.nk", "--account", "APP"]
    served = parse(s.ServeSettings, [*argv, "--metrics-addr", ":9090", "--fail-limit-key", "3"])
    assert served.nats_url == "nats://h:4222" and served.users_bucket == "users"
    assert served.policy.mode == "soft" and served.policy.allowed_account == ("APP", "OPS")
    assert served.policy.fail_limit_key == 3 and served.policy.operator is False
    assert served.observability.metrics_addr == ("0.0.0.0", 9090)
    assert served.observability.audit_max_age == 12 * 3600
    with pytest.raises(dataclasses.FrozenInstanceError):
        served.nats_url = "elsewhere"  # type: ignore[misc]


def test_overrides_are_none_until_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """`callout replay` takes the policy flags with no default: each given one overrides."""
    untouched = parse(s.PolicySettings, [], given=True)
    assert all(getattr(untouched, f.name) is None for f in dataclasses.fields(s.PolicySettings))
    assert untouched.policy_values(seeds=False) == {}
    monkeypatch.setenv("CALLOUT_FAIL_WINDOW", "2.5")
    given = parse(s.PolicySettings, ["--mode", "soft", "--callout-account", "CALL"], given=True)
    values = given.policy_values(seeds=False)
    assert values["mode"] == ("--mode", "soft") and values["fail_window"][1] == 2.5
    # The system account not given takes serve's default.
    assert values["forbidden_accounts"][1] == frozenset({"SYS", "$SYS", "CALL"})
    assert set(values) == {"mode", "fail_window", "forbidden_accounts"}


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: s.PolicySettings(account="has space"), "--account"),
        (lambda: s.PolicySettings(system_account=""), "--system-account"),
        (lambda: s.PolicySettings(allowed_account=("A", "")), "--allowed-account"),
        (lambda: s.PolicySettings(allow_kind=("client,router",)), "--allow-kind"),
        (lambda: s.PolicySettings(mode="lenient"), "--mode"),
        (lambda: s.PolicySettings(default_permissions="[]"), "--default-permissions"),
        (lambda: s.PolicySettings(internal_key=("UNOPE",)), "user public key"),
        (lambda: s.PolicySettings(account_signer=("APP",)), "--account-signer"),
        (lambda: s.TlsSettings(tls_cert="c.pem"), "--tls-cert and --tls-key"),
        (lambda: s.IdentitySettings(nkey_seed_file="a", creds="b"), "--creds"),
        (lambda: s.ReplaySettings(users="u", users_bucket="b"), "--users-bucket"),
        (lambda: s.ServeSettings(log_decisions="some"), "--log-decisions"),  # type: ignore[arg-type]
        (lambda: s.ServeSettings(system_nkey_seed_file="a", system_creds="b"), "--system-creds"),
    ],
)
def test_settings_are_validated_when_constructed(build: Any, named: str) -> None:
    with pytest.raises(s.SettingsError, match=named):
        build()


def test_operator_switch_and_signers_go_together() -> None:
    with pytest.raises(s.SettingsError, match=r"no --account-signer for account.*APP"):
        s.PolicySettings(account="APP", operator=True).policy(issuer=account_key())
    signer = f"APP:{account_key().public}"
    with pytest.raises(s.SettingsError, match="for operator mode \\(--operator\\)"):
        s.PolicySettings(account="APP", account_signer=(signer,)).policy(
            issuer=account_key(), seeds=False
        )


def test_a_policy_from_settings_obeys_the_policy_rules() -> None:
    """The Policy's own error, with its message (which names the flag), as a SettingsError."""
    app = account_key()
    system = account_key().public
    policy = s.PolicySettings(
        account="APP",
        operator=True,
        system_account=system,
        account_signer=(f"APP:{app.public}",),
    ).policy(issuer=account_key(), seeds=False)
    assert set(policy.signers) == {"APP"} and policy.forbidden_account_keys == {system}
    with pytest.raises(s.SettingsError, match="no --account-signer for account"):
        s.policy_with({"allowed_accounts": ("--allowed-account", frozenset({"NEW"}))}, policy)


def test_a_mistyped_environment_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CALLOUT_MAX_INFLIGHT", "0")
    with pytest.raises(SystemExit):
        parse(s.ServeSettings, ["--nats-url", "x", "--issuer-seed-file", "i", "--account", "A"])
    assert "CALLOUT_MAX_INFLIGHT='0': must be >= 1" in capsys.readouterr().err


def test_an_argparse_parser_not_ours_still_gets_the_flags() -> None:
    parser = argparse.ArgumentParser()
    s.add_flags(parser, s.ObservabilitySettings)
    assert parser.parse_args(["--audit-stream", "AUDIT"]).audit_stream == "AUDIT"
