"""Every command's settings: frozen dataclasses, each field declared once with its flag.

A field made by `setting(...)` is a command-line flag that also reads
`CALLOUT_<FLAG_IN_UPPER_SNAKE>` from the environment; its dataclass default is the flag's
default, the only place that default is written. `add_flags` declares a settings class's
flags on a parser, `from_args` builds the settings from what it parsed; a field made by
`group(...)` nests another settings class, whose flags the command takes too.

The flag wins over the environment. Repeatable flags take a comma-separated list from the
environment. A flag that is required on the command line is satisfied by its variable.

Both are parsed as strictly as each other: a variable's value goes through the flag's parser
and `choices` (argparse checks neither for defaults), a boolean variable must be a boolean
word, and a value with leading or trailing whitespace, or an empty item in a list, is an
error. Any mistake is one line naming the flag or the variable, at start: a value that is
silently read as something else ("soft " as enforce, "bogus" as off) is a configuration
nobody chose. What one value cannot show (two flags that go together, an account name, a
permissions document) is checked when the settings are constructed, and raises
`SettingsError` naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Final, Literal, NoReturn, TypeVar

from callout.decision import (
    CLIENT_KINDS,
    AccountSigner,
    Policy,
    PolicyError,
    forbidden_accounts,
)
from callout.errors import UserError
from callout.health import parse_address
from callout.keys import (
    KeyError_,
    KeyKind,
    SigningKey,
    decode_public,
    is_public,
    load_curve_key,
    load_signing_key,
)
from callout.recording.writer import DEFAULT_MAX_BYTES
from callout.records import Permissions, RecordError, account_problem, loads, parse_permissions
from callout.service import LOG_DECISIONS, LogDecisions


class SettingsError(UserError):
    """A setting that cannot be used; the message names the flag (or variable) to fix."""


def _fail(message: str) -> NoReturn:
    raise SettingsError(message)


# ---------------------------------------------------------------------------------------------
# value parsers: one flag value (or one item of a repeatable flag) in, the setting out
# ---------------------------------------------------------------------------------------------
def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def bounded_seconds(low: float, high: float, *, zero: bool = False) -> Callable[[str], float]:
    """A number of seconds in (low, high], or 0 when `zero` allows it (0 = "none")."""

    def parse(text: str) -> float:
        value = _finite(text)
        if zero and value == 0:
            return value
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"must be > {low:g} and <= {high:g}, got {text}")
        return value

    return parse


def replicas(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 5:
        raise argparse.ArgumentTypeError(f"must be 1..5, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*([kmgt]i?b?|b)?")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `12h`, `30d` (or `500ms`); must be > 0."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h, 90s; got {text!r}")
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def byte_size(text: str) -> int:
    """Bytes from `1073741824`, `512MiB`, `1GB`, `100M` (K/M/G/T, powers of 1024); > 0."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size like 1GiB, 512MiB; got {text!r}")
    unit = (match.group(2) or "b")[0]
    value: int = int(match.group(1)) * 1024 ** "bkmgt".index(unit)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def stream_name(text: str) -> str:
    if not _STREAM_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid stream name {text!r}: letters, digits, '-' and '_' only (at most 64)"
        )
    return text


def user_key(text: str) -> str:
    """A user public key as given: case-insensitive on input, stored upper-case."""
    key = text.strip().upper()
    try:
        decode_public(key, KeyKind.USER)
    except KeyError_ as exc:
        if key.startswith("S"):
            # Never echo what may be a seed; and say why it matters.
            _fail("that looks like a seed, not a public key: pass the U... public key (and"
                  " treat the seed you passed as exposed)")  # fmt: skip
        _fail(f"invalid user public key {text[:60]!r}: {exc}")
    return key


def permissions_json(text: str | None, flag: str) -> Permissions:
    """A permissions document given as a flag's JSON value; none given: no permissions."""
    if not text:
        return Permissions()
    try:
        return parse_permissions(loads(text.encode(), flag), flag)
    except RecordError as exc:
        _fail(str(exc))


# ---------------------------------------------------------------------------------------------
# the flag table: declared on the fields, mapped onto argparse and the environment here
# ---------------------------------------------------------------------------------------------
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

Action = Literal["store", "append", "store_true"]


@dataclass(frozen=True)
class Flag:
    """How one settings field is given: its flag, and how a value of it is read."""

    flag: str
    help: str = ""
    parse: Callable[[str], Any] | None = None  # None: the text as given
    choices: tuple[str, ...] | None = None
    action: Action = "store"  # append: repeatable (a tuple); store_true: a switch
    required: bool = False  # on the command line (or its variable), for the full command
    metavar: str | None = None
    env: bool = True  # also read CALLOUT_<FLAG> from the environment


def setting(flag: str, default: Any = None, **spec: Any) -> Any:
    """A settings field given by `flag` (see `Flag`), defaulting to `default`."""
    return field(default=default, metadata={"flag": Flag(flag, **spec)})


def group(cls: type[Any], what: str = "") -> Any:
    """A field holding another settings class, whose flags the command takes too; `what`
    fills `{what}` in their help."""
    return field(default_factory=cls, metadata={"group": cls, "what": what})


def env_name(flag: str) -> str:
    return "CALLOUT_" + flag.lstrip("-").replace("-", "_").upper()


class Parser(argparse.ArgumentParser):
    """argparse, with every usage mistake reported in one line (the flag it names, and where
    to look), not a usage block that pushes the reason off the screen."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _add(
    parser: argparse.ArgumentParser, dest: str, spec: Flag, default: Any, what: str, given: bool
) -> None:
    """One flag on `parser`, with its environment variable (if any) as its default."""
    kwargs: dict[str, Any] = {"dest": dest, "default": default}
    if spec.action != "store":
        kwargs["action"] = spec.action
    if spec.parse is not None:
        kwargs["type"] = spec.parse
    if spec.choices is not None:
        kwargs["choices"] = list(spec.choices)
    if spec.metavar is not None:
        kwargs["metavar"] = spec.metavar
    # Overrides (`given`) are never required: a flag not given leaves its part alone.
    required = spec.required and not given
    help_text = spec.help.format(what=what)
    name = env_name(spec.flag)
    value = os.environ.get(name) if spec.env else None
    if value is not None and value != "":

        def bad(why: str) -> NoReturn:
            parser.error(f"{name}={value[:80]!r}: {why}")

        def convert(text: str) -> Any:
            try:
                out = spec.parse(text) if spec.parse is not None else text
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                bad(str(exc) or "invalid value")
            if spec.choices is not None and out not in spec.choices:
                bad(f"must be one of {', '.join(str(c) for c in spec.choices)}")
            return out

        if value != value.strip():
            bad("leading or trailing whitespace")
        if spec.action == "append":
            items = [item.strip() for item in value.split(",")]
            if not all(items):
                bad("an empty item in the comma-separated list")
            kwargs["default"] = [convert(item) for item in items]
        elif spec.action == "store_true":
            word = value.lower()
            if word not in _TRUE | _FALSE:
                bad(f"must be one of {', '.join(sorted(_TRUE | _FALSE))}")
            kwargs["default"] = word in _TRUE
        else:
            kwargs["default"] = convert(value)
        required = False
    if spec.env:
        help_text = f"{help_text} [env {name}]".strip()
    parser.add_argument(spec.flag, required=required, help=help_text, **kwargs)


def add_flags(
    parser: argparse.ArgumentParser, cls: type[Any], *, given: bool = False, what: str = ""
) -> None:
    """Declare the flags of settings class `cls` (and of the groups it holds) on `parser`.
    `given=True` declares them as overrides: none required and none with a default, so a
    flag not given reads as None ("leave this part alone")."""
    for f in fields(cls):
        if (nested := f.metadata.get("group")) is not None:
            add_flags(parser, nested, given=given, what=f.metadata["what"] or what)
        elif (spec := f.metadata.get("flag")) is not None:
            default = None if given or f.default is MISSING else f.default
            _add(parser, f.name, spec, default, what, given)


T = TypeVar("T")


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The settings `cls` from what `add_flags`' flags parsed (validated as it is built)."""
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if (nested := f.metadata.get("group")) is not None:
            values[f.name] = from_args(nested, args)
        elif "flag" in f.metadata:
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _default(cls: type[Any], name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)


def _check_choices(settings: Any) -> None:
    """What argparse checks for a flag, checked for settings built any other way too."""
    for f in fields(settings):
        spec: Flag | None = f.metadata.get("flag")
        value = getattr(settings, f.name)
        if spec is not None and spec.choices is not None and value is not None:
            if value not in spec.choices:
                _fail(f"{spec.flag} {value!r}: must be one of {', '.join(spec.choices)}")


# ---------------------------------------------------------------------------------------------
# connection and identity
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsSettings:
    tls_ca: str | None = setting("--tls-ca", help="CA bundle to verify the servers' certificates")
    tls_cert: str | None = setting("--tls-cert", help="client certificate (mutual TLS)")
    tls_key: str | None = setting("--tls-key", help="client certificate's private key (mutual TLS)")

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            _fail("--tls-cert and --tls-key go together")


@dataclass(frozen=True)
class IdentitySettings:
    """Who a command is on NATS: an nkey seed file, or a .creds file (operator mode)."""

    nkey_seed_file: str | None = setting("--nkey-seed-file", help="{what}: a user seed (SU...)")
    creds: str | None = setting(
        "--creds", help="{what}: a .creds file (user JWT + seed), for operator mode"
    )
    tls: TlsSettings = group(TlsSettings)

    def __post_init__(self) -> None:
        if self.creds and self.nkey_seed_file:
            _fail("give --nkey-seed-file or --creds, not both")


# ---------------------------------------------------------------------------------------------
# the decision policy (serve; replay takes the same flags as overrides)
# ---------------------------------------------------------------------------------------------
# A JWT living longer than this is a mistake (and past int64 seconds, one every admit fails on).
MAX_USER_TTL: Final = 10 * 366 * 86400.0
# A window longer than a day makes a throttled key or host wait a day to recover.
MAX_FAIL_WINDOW: Final = 86400.0

Override = tuple[str, Any]  # (the flag that sets a Policy field, the field's value)

# The policy flags default to what a Policy does: its fields' defaults are the one place.
_POLICY: Final[Mapping[str, Any]] = {f.name: f.default for f in fields(Policy)}


@dataclass(frozen=True)
class PolicySettings:
    """The flags a `Policy` is built from. Under `callout replay` each is an override (None:
    not given); `complete()` fills what was not given as `serve` does."""

    issuer_seed_file: str | None = setting(
        "--issuer-seed-file", required=True, help="auth_callout.issuer account seed (SA...)"
    )
    xkey_seed_file: tuple[str, ...] | None = setting(
        "--xkey-seed-file", action="append", help="auth_callout xkey seed (SX...); repeatable"
    )
    account: str | None = setting(
        "--account", required=True, help="account users are placed in by default"
    )
    internal_key: tuple[str, ...] | None = setting(
        "--internal-key", action="append", help="user key admitted without the store"
    )
    internal_permissions: str | None = setting(
        "--internal-permissions", help="JSON permissions for internal keys (default: none)"
    )
    mode: str | None = setting(
        "--mode", _POLICY["mode"], choices=("enforce", "soft"), help="soft admits unknown"
    )
    default_permissions: str | None = setting(
        "--default-permissions", help="JSON permissions for soft-mode admits (default: none)"
    )
    backend_timeout: float | None = setting(
        "--backend-timeout",
        _POLICY["backend_timeout"],
        parse=positive_float,
        help="store deadline, seconds",
    )
    user_ttl: float | None = setting(
        "--user-ttl",
        _POLICY["user_ttl"],
        parse=bounded_seconds(0, MAX_USER_TTL, zero=True),
        help="user JWT life, seconds (0: none; at most 10 years)",
    )
    allowed_account: tuple[str, ...] | None = setting(
        "--allowed-account",
        action="append",
        help="accounts records may name (default --account)",
    )
    operator: bool | None = setting(
        "--operator", False, action="store_true", help="operator (decentralized) mode"
    )
    issuer_account: str | None = setting(
        "--issuer-account",
        help="operator mode: callout account key, if the issuer is a signing key",
    )
    account_signer: tuple[str, ...] | None = setting(
        "--account-signer",
        action="append",
        metavar="NAME:ACCOUNT_PUBKEY:SEEDFILE",
        help="operator mode: the key that signs users of account NAME; repeatable",
    )
    callout_account: str | None = setting(
        "--callout-account", "AUTH", help="auth_callout.account; never placed into"
    )
    system_account: str | None = setting(
        "--system-account",
        "SYS",
        help="the system account (operator mode: its public key); never placed into",
    )
    fail_limit_key: int | None = setting(
        "--fail-limit-key",
        _POLICY["fail_limit_key"],
        parse=non_negative_int,
        help="failures per key per window",
    )
    fail_limit_host: int | None = setting(
        "--fail-limit-host",
        _POLICY["fail_limit_host"],
        parse=non_negative_int,
        help="failures per host",
    )
    fail_window: float | None = setting(
        "--fail-window",
        _POLICY["fail_window"],
        parse=bounded_seconds(0, MAX_FAIL_WINDOW),
        help="failure window, seconds (at most a day)",
    )
    allow_kind: tuple[str, ...] | None = setting(
        "--allow-kind",
        action="append",
        metavar="KIND[,KIND]",
        help="connection kinds admitted: client, leafnode (default: client); repeatable",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        for flag, name in (
            ("--account", self.account),
            ("--callout-account", self.callout_account),
            ("--system-account", self.system_account),
        ):
            if name is not None and (problem := account_problem(name)) is not None:
                _fail(f"{flag} {problem}")
        for name in self.allowed_account or ():
            if (problem := account_problem(name)) is not None:
                _fail(f"--allowed-account {problem}")
        if self.backend_timeout is not None and not self.backend_timeout > 0:
            _fail("--backend-timeout must be > 0")
        for key in self.internal_key or ():
            user_key(key)
        permissions_json(self.internal_permissions, "--internal-permissions")
        permissions_json(self.default_permissions, "--default-permissions")
        self.kinds()
        for spec in self.account_signer or ():
            _signer_spec(spec)

    def kinds(self) -> frozenset[str] | None:
        """--allow-kind client,leafnode (repeatable, commas allowed); None: not given."""
        if self.allow_kind is None:
            return None
        known = frozenset(CLIENT_KINDS.values())
        chosen = [item.strip() for value in self.allow_kind for item in value.split(",")]
        for item in chosen:
            if item not in known:
                _fail(f"--allow-kind {item!r}: must be one of {', '.join(sorted(known))}")
        return frozenset(chosen)

    def complete(self) -> PolicySettings:
        """Every flag not given as `serve` takes it: its default, and --allowed-account
        --account. (Without --allow-kind, the Policy's own default.)"""
        filled = {
            f.name: f.default
            for f in fields(self)
            if getattr(self, f.name) is None and f.default is not MISSING
        }
        if self.allowed_account is None and self.account is not None:
            filled["allowed_account"] = (self.account,)
        return dataclasses.replace(self, **filled)

    def policy_values(
        self, *, issuer: SigningKey | None = None, seeds: bool = True
    ) -> dict[str, Override]:
        """Policy field -> (flag, value) for each policy flag given, the key files read.
        `issuer` stands in for --issuer-seed-file; `seeds=False` (replay, which signs
        nothing) lets --account-signer leave its SEEDFILE out for a stand-in key."""
        out: dict[str, Override] = {}
        if issuer is not None:
            out["issuer"] = ("--issuer-seed-file", issuer)
        elif self.issuer_seed_file is not None:
            out["issuer"] = (
                "--issuer-seed-file",
                load_signing_key(
                    self.issuer_seed_file, KeyKind.ACCOUNT, "issuer (--issuer-seed-file)"
                ),
            )
        if self.xkey_seed_file is not None:
            xkeys = tuple(load_curve_key(path) for path in self.xkey_seed_file)
            out["xkeys"] = ("--xkey-seed-file", xkeys)
        if self.account is not None:
            out["account"] = ("--account", self.account)
        if self.allowed_account is not None:
            out["allowed_accounts"] = ("--allowed-account", frozenset(self.allowed_account))
        if self.internal_key is not None:
            keys = tuple(user_key(k) for k in self.internal_key)
            out["internal_keys"] = ("--internal-key", keys)
        for name, flag, text in (
            ("internal_permissions", "--internal-permissions", self.internal_permissions),
            ("default_permissions", "--default-permissions", self.default_permissions),
        ):
            if text is not None:
                out[name] = (flag, permissions_json(text, flag))
        for name, flag, value in (
            ("mode", "--mode", self.mode),
            ("user_ttl", "--user-ttl", self.user_ttl),
            ("backend_timeout", "--backend-timeout", self.backend_timeout),
            ("fail_limit_key", "--fail-limit-key", self.fail_limit_key),
            ("fail_limit_host", "--fail-limit-host", self.fail_limit_host),
            ("fail_window", "--fail-window", self.fail_window),
            ("issuer_account", "--issuer-account", self.issuer_account or None),
        ):
            if value is not None:
                out[name] = (flag, value)
        if self.callout_account is not None or self.system_account is not None:
            # One not given (replay) takes serve's default.
            system = self.system_account or _default(PolicySettings, "system_account")
            callout = self.callout_account or _default(PolicySettings, "callout_account")
            out["forbidden_accounts"] = (
                "--callout-account/--system-account",
                forbidden_accounts(system, callout),
            )
            # Operator mode places by key: there the system account is known by its key.
            if self.operator or (self.operator is None and is_public(system, KeyKind.ACCOUNT)):
                out["forbidden_account_keys"] = ("--system-account", frozenset({system}))
        if self.account_signer is not None:
            signers = dict(_signer(spec, seeds) for spec in self.account_signer)
            out["signers"] = ("--account-signer", signers)
        if (kinds := self.kinds()) is not None:
            out["allowed_kinds"] = ("--allow-kind", kinds)
        return out

    def policy(self, *, issuer: SigningKey | None = None, seeds: bool = True) -> Policy:
        """The whole policy: the flags given, `serve`'s defaults for the others."""
        settings = self.complete()
        if settings.account is None:
            _fail("--account is required")
        # Operator mode is the --operator switch here; a Policy knows it by its signers.
        if settings.operator and not settings.account_signer:
            needed = sorted({settings.account, *(settings.allowed_account or ())})
            _fail(f"operator mode: no --account-signer for account(s) {', '.join(needed)}")
        if not settings.operator and (settings.account_signer or settings.issuer_account):
            _fail("--account-signer and --issuer-account are for operator mode (--operator)")
        values = settings.policy_values(issuer=issuer, seeds=seeds)
        if "issuer" not in values:
            _fail("--issuer-seed-file is required")
        return policy_with(values)


def policy_with(values: Mapping[str, Override], base: Policy | None = None) -> Policy:
    """A Policy of `values` (over `base`'s, when given); its rules broken are a SettingsError
    with the Policy's own message, which names the flag."""
    changes = {name: value for name, (_flag, value) in values.items()}
    try:
        return dataclasses.replace(base, **changes) if base is not None else Policy(**changes)
    except PolicyError as exc:
        _fail(str(exc))


def _signer_spec(spec: str) -> tuple[str, str, str]:
    """NAME:ACCOUNT_PUBKEY[:SEEDFILE], the account key checked."""
    name, _, rest = spec.partition(":")
    account, _, path = rest.partition(":")
    if not (name and account):
        _fail(f"--account-signer {spec!r}: expected NAME:ACCOUNT_PUBKEY:SEEDFILE")
    try:
        decode_public(account, KeyKind.ACCOUNT)
    except KeyError_ as exc:
        _fail(f"--account-signer {name}: {exc}")
    return name, account, path


def _signer(spec: str, seeds: bool) -> tuple[str, AccountSigner]:
    name, account, path = _signer_spec(spec)
    if not path and seeds:
        _fail(f"--account-signer {spec!r}: expected NAME:ACCOUNT_PUBKEY:SEEDFILE")
    key = (
        load_signing_key(path, KeyKind.ACCOUNT, f"--account-signer {name}")
        if path
        else SigningKey.generate(KeyKind.ACCOUNT)
    )
    return name, AccountSigner(key, account)


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObservabilitySettings:
    """What an operator watches a running service through (`callout.observability`)."""

    metrics_addr: tuple[str, int] | None = setting(
        "--metrics-addr",
        parse=address,
        metavar="HOST:PORT",
        help="serve /metrics, /healthz and /readyz here (default: off)",
    )
    audit_stream: str | None = setting(
        "--audit-stream",
        parse=stream_name,
        metavar="NAME",
        help="publish one audit message per decision to this JetStream stream (default: off)",
    )
    audit_max_age: float = setting(
        "--audit-max-age",
        30 * 86400.0,
        parse=duration,
        metavar="DURATION",
        help="audit stream retention by age when creating it, e.g. 30d (default 30d)",
    )
    audit_max_bytes: int = setting(
        "--audit-max-bytes",
        1 << 30,
        parse=byte_size,
        metavar="SIZE",
        help="audit stream retention by size when creating it, e.g. 1GiB (default 1GiB)",
    )


@dataclass(frozen=True)
class ServeSettings:
    """`callout serve`."""

    nats_url: str = setting(
        "--nats-url", "", required=True, help="NATS server URL(s), comma-separated"
    )
    identity: IdentitySettings = group(
        IdentitySettings, "the service's identity (an auth_users member)"
    )
    policy: PolicySettings = group(PolicySettings)
    users_bucket: str = setting(
        "--users-bucket", "users", help="JetStream KV bucket of user records"
    )
    users_cache: str = setting(
        "--users-cache",
        "watch",
        choices=("watch", "off"),
        help="watch: answer from a watched copy of the bucket while it is provably current",
    )
    system_nkey_seed_file: str | None = setting(
        "--system-nkey-seed-file", help="a system-account user seed: kicks revoked sessions"
    )
    system_creds: str | None = setting(
        "--system-creds", help="a system-account .creds file: kicks revoked sessions"
    )
    queue_group: str = setting("--queue-group", "callout", help="queue group shared by replicas")
    max_inflight: int = setting(
        "--max-inflight", 256, parse=positive_int, help="requests handled at once"
    )
    max_backlog: int = setting(
        "--max-backlog", 20_000, parse=positive_int, help="requests allowed to wait"
    )
    replay_bucket: str | None = setting(
        "--replay-bucket", help="KV bucket shared by replicas to recognise replayed requests"
    )
    replicas: int | None = setting(
        "--replicas", parse=replicas, help="replicas for a replay bucket we create"
    )
    record_dir: str | None = setting(
        "--record-dir", help="write every request and its decision here, for callout replay"
    )
    record_max_bytes: int = setting(
        "--record-max-bytes",
        DEFAULT_MAX_BYTES,
        parse=byte_size,
        help="start a new recording file past this size (e.g. 64MiB)",
    )
    event_loop: str = setting(
        "--event-loop",
        "uvloop",
        choices=("asyncio", "uvloop"),
        help="uvloop (the default: less CPU per authorization, bench/README.md) or asyncio",
    )
    log_level: str = setting("--log-level", "info", choices=("debug", "info", "warning", "error"))
    log_decisions: LogDecisions = setting(
        "--log-decisions",
        "all",
        choices=LOG_DECISIONS,
        help="which decisions get an info line: all, deny (denies and drops), none",
    )
    log_format: str = setting("--log-format", "json", choices=("json", "console"))
    observability: ObservabilitySettings = group(ObservabilitySettings)

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.system_nkey_seed_file and self.system_creds:
            _fail("give --system-nkey-seed-file or --system-creds, not both")

    @property
    def system_identity(self) -> IdentitySettings | None:
        """The system-account identity that kicks revoked users' sessions, if one is given."""
        if not (self.system_nkey_seed_file or self.system_creds):
            return None
        return IdentitySettings(self.system_nkey_seed_file, self.system_creds, self.identity.tls)


@dataclass(frozen=True)
class UsersSettings:
    """`callout users` (the bucket and the identity; each action's arguments are its own)."""

    nats_url: str = setting("--nats-url", "nats://127.0.0.1:4222", help="NATS server URL(s)")
    identity: IdentitySettings = group(IdentitySettings, "a user of the callout account")
    users_bucket: str = setting(
        "--users-bucket", "users", help="JetStream KV bucket of user records"
    )
    replicas: int | None = setting(
        "--replicas", parse=replicas, help="replicas if the bucket is created (1..5)"
    )


@dataclass(frozen=True)
class ReplaySettings:
    """`callout replay` (besides the recordings it reads): where the users come from, the
    clock, and the policy flags as overrides of the recorded policy."""

    users: str | None = setting(
        "--users",
        env=False,
        metavar="FILE",
        help="users as JSON lines, as `callout users list` prints them; - is stdin",
    )
    users_bucket: str | None = setting(
        "--users-bucket", env=False, metavar="NAME", help="read the users from this KV bucket"
    )
    nats_url: str | None = setting("--nats-url", help="with --users-bucket: NATS server URL(s)")
    identity: IdentitySettings = group(
        IdentitySettings, "with --users-bucket: an identity that may read the bucket"
    )
    at: Literal["recorded", "now"] = setting(
        "--at",
        "recorded",
        env=False,
        choices=("recorded", "now"),
        help="the policy's clock: each request's recorded arrival (default), or from now on"
        " with the recorded spacing; a request's own validity is always judged as recorded",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.users and self.users_bucket:
            _fail("give --users FILE or --users-bucket NAME, not both")


@dataclass(frozen=True)
class DevSettings:
    """`callout dev`."""

    data_dir: str = setting("--data-dir", ".callout-dev", help="keys, config and JetStream data")
    port: int = setting("--port", 4222, parse=int, help="client port of the bundled nats-server")
    log_format: str = setting("--log-format", "console", choices=("json", "console"))

    def __post_init__(self) -> None:
        _check_choices(self)


@dataclass(frozen=True)
class ConnectSettings:
    """`callout connect`."""

    nats_url: str = setting("--nats-url", "nats://127.0.0.1:4222")
    nkey_seed_file: str = setting("--nkey-seed-file", "", required=True, help="the user's seed")
    tls: TlsSettings = group(TlsSettings)
    stay: bool = setting(
        "--stay",
        False,
        action="store_true",
        env=False,
        help="stay connected until the server closes the connection (exit 1 then)",
    )


@dataclass(frozen=True)
class KeysSettings:
    """`callout keys generate`."""

    out: str = setting("--out", "", required=True, help="directory to write into")
