"""`callout replay PATH...`: feed recorded requests (`callout serve --record-dir`, or recorded
test cases) through the decision core again, with a users file or bucket, and print the
recorded and the new decision of each. A recording carries the policy it was decided under;
each of `serve`'s policy flags given here overrides its part of it. Requests recorded without a
policy (test cases, recordings of format 1) take the whole policy from the flags.

Exit status: 0 when no decision changed, 1 when any did (usable in CI), 2 when the input or
the flags cannot be used. Requests recorded without their payload are listed as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from callout import replay
from callout.commands.common import (
    add_identity_flags,
    connect,
    fail,
    identity_from_args,
    permissions_json,
    user_key,
)
from callout.commands.serve import (
    POLICY_DEFAULTS,
    add_policy_flags,
    forbidden_accounts,
    kinds_from_flag,
    placement_problem,
    policy_from_args,
    signers_from_args,
)
from callout.config import add
from callout.decision import Policy, PolicyError
from callout.keys import KeyKind, SigningKey, is_public, load_curve_key, load_signing_key
from callout.records import account_problem
from callout.store import StoreError
from callout.store import kv as kvstore

BUCKET_READS = 64  # lookups in flight at once with --users-bucket


def _stamp(at: float) -> str:
    try:
        return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    except (OverflowError, OSError, ValueError):
        return "-"


def format_outcome(outcome: replay.Outcome) -> str:
    entry = outcome.entry
    client = entry.client or (outcome.decision.client_key if outcome.decision else "") or "-"
    recorded = entry.recorded.label() if entry.recorded is not None else "-"
    if outcome.new is None:
        return f"{_stamp(entry.received_at)}  {client}  {recorded}  SKIPPED {outcome.skipped}"
    status = "CHANGED" if outcome.changed else "same"
    if (
        outcome.changed
        and entry.recorded is not None
        and entry.recorded.label() == outcome.new.label()
    ):
        status = "CHANGED (permissions)"
    return f"{_stamp(entry.received_at)}  {client}  {recorded} -> {outcome.new.label()}  {status}"


def format_summary(summary: replay.Summary, at: str, policy: str = "") -> list[str]:
    skipped = sum(summary.skipped.values())
    lines = [f"policy: {policy}"] if policy else []
    lines += [
        f"replayed {summary.replayed} of {summary.replayed + skipped} requests"
        f" (clock: {at}): {summary.unchanged} unchanged, {summary.changed} changed,"
        f" {skipped} skipped"
    ]
    lines += [f"  changed  {change}: {n}" for change, n in sorted(summary.changes.items())]
    lines += [f"  skipped  {why}: {n}" for why, n in sorted(summary.skipped.items())]
    return lines


def _users_file(path: str) -> dict[str, bytes | None]:
    try:
        if path == "-":
            return replay.read_users(sys.stdin.buffer, "stdin")
        with open(path, "rb") as stream:
            return replay.read_users(stream, path)
    except OSError as exc:
        fail(f"--users {path}: {exc.strerror or exc}")
    except replay.ReplayError as exc:
        fail(f"--users {exc}")


async def _bucket_users(args: argparse.Namespace, keys: set[str]) -> dict[str, bytes | None]:
    """The records of `keys` (the clients the recording names: the only keys the core looks
    up), read concurrently, so a large bucket costs what the recording needs."""
    if not args.nats_url:
        fail("--users-bucket needs --nats-url (and --nkey-seed-file or --creds)")
    identity = identity_from_args(args, "--users-bucket")
    nc = await connect(args.nats_url, identity, name="callout-replay", reconnect=False)
    store = kvstore.KVStore(nc, args.users_bucket)
    limit = asyncio.Semaphore(BUCKET_READS)

    async def read(key: str) -> tuple[str, bytes | None]:
        async with limit:
            return key, await store.get(key)

    try:
        # A key that fails to read must not pass for "no record": any error ends the replay.
        return dict(await asyncio.gather(*(read(key) for key in sorted(keys))))
    except StoreError as exc:
        # Not exit 1: that says "decisions changed".
        fail(f"--users-bucket {args.users_bucket}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


Override = tuple[str, Any]  # (the flag, the Policy field's value)


def _account_flag(flag: str, name: str) -> str:
    if (problem := account_problem(name)) is not None:
        fail(f"{flag} {problem}")
    return name


def policy_overrides(args: argparse.Namespace) -> dict[str, Override]:
    """Policy field -> (flag, value) for each policy flag given (or set in the environment):
    what replaces that part of a recorded policy. Parsed and checked as `serve` does."""
    out: dict[str, Override] = {}
    if args.issuer_seed_file is not None:
        issuer = load_signing_key(args.issuer_seed_file, KeyKind.ACCOUNT, "--issuer-seed-file")
        out["issuer"] = ("--issuer-seed-file", issuer)
    if args.account is not None:
        out["account"] = ("--account", _account_flag("--account", args.account))
    if args.allowed_account is not None:
        allowed = frozenset(_account_flag("--allowed-account", a) for a in args.allowed_account)
        out["allowed_accounts"] = ("--allowed-account", allowed)
    if args.xkey_seed_file is not None:
        xkeys = tuple(load_curve_key(path) for path in args.xkey_seed_file)
        out["xkeys"] = ("--xkey-seed-file", xkeys)
    if args.internal_key is not None:
        out["internal_keys"] = ("--internal-key", tuple(user_key(k) for k in args.internal_key))
    for field, flag, text in (
        ("internal_permissions", "--internal-permissions", args.internal_permissions),
        ("default_permissions", "--default-permissions", args.default_permissions),
    ):
        if text is not None:
            out[field] = (flag, permissions_json(text, flag))
    for field, flag in (
        ("mode", "--mode"),
        ("user_ttl", "--user-ttl"),
        ("backend_timeout", "--backend-timeout"),
        ("fail_limit_key", "--fail-limit-key"),
        ("fail_limit_host", "--fail-limit-host"),
        ("fail_window", "--fail-window"),
        ("issuer_account", "--issuer-account"),
    ):
        if (value := getattr(args, field)) is not None:
            out[field] = (flag, value)
    if args.callout_account is not None or args.system_account is not None:
        # As `serve` computes it: the one not given takes serve's default.
        system = _account_flag(
            "--system-account", args.system_account or POLICY_DEFAULTS["system_account"]
        )
        callout = _account_flag(
            "--callout-account", args.callout_account or POLICY_DEFAULTS["callout_account"]
        )
        out["forbidden_accounts"] = (
            "--callout-account/--system-account",
            forbidden_accounts(system, callout),
        )
        if is_public(system, KeyKind.ACCOUNT):  # operator mode names it by key
            out["forbidden_account_keys"] = ("--system-account", frozenset({system}))
    if args.account_signer is not None:
        out["signers"] = ("--account-signer", signers_from_args(args, seeds=False))
    if args.allow_kind is not None:
        out["allowed_kinds"] = ("--allow-kind", kinds_from_flag(args.allow_kind))
    return out


def _merged(recorded: Policy, overrides: dict[str, Override], operator: bool) -> Policy:
    try:
        policy = dataclasses.replace(recorded, **{k: v for k, (_, v) in overrides.items()})
    except PolicyError as exc:
        fail(str(exc))
    if problem := placement_problem(
        policy.account, policy.allowed_accounts, policy.forbidden_accounts
    ):
        fail(problem)
    if operator and not policy.signers:
        fail("--operator: the recorded policy is config mode; give --account-signer too")
    if policy.issuer_account is not None and not policy.signers:
        fail("--issuer-account is for operator mode")
    return policy


def _flags_policy(args: argparse.Namespace, needed_by: str) -> Policy:
    """The whole policy from the flags, serve's defaults for the others: for requests that
    were recorded without one."""
    if args.account is None:
        fail(
            f"{needed_by} was recorded without its policy (a test case, or a recording of"
            " format 1): give the policy flags, at least --account (and --xkey-seed-file for"
            " encrypted requests)"
        )
    filled = argparse.Namespace(**vars(args))
    for name, value in POLICY_DEFAULTS.items():
        if getattr(filled, name) is None:
            setattr(filled, name, value)
    # The replay sends no response, so it needs no issuer seed unless one is given: decisions
    # do not depend on it (operator-mode signers come from --account-signer).
    issuer = None if args.issuer_seed_file else SigningKey.generate(KeyKind.ACCOUNT)
    return policy_from_args(filled, issuer)


def describe_policy(recorded: int, flags_policy: bool, overrides: dict[str, Override]) -> str:
    """What the summary says about the policy the requests were decided under."""
    parts = []
    if recorded:
        text = "as recorded" if recorded == 1 else f"as recorded ({recorded} policies)"
        if overrides:
            given = ", ".join(f"{field} ({flag})" for field, (flag, _) in overrides.items())
            text += f", overridden: {given}"
        parts.append(text)
    if flags_policy:
        parts.append("from the flags, for the requests recorded without one")
    return "; ".join(parts)


async def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    paths = [Path(p) for p in args.paths]
    try:
        entries = replay.read(paths)
    except replay.ReplayError as exc:
        fail(str(exc))
    if not entries:
        fail(f"no recorded requests in {', '.join(args.paths)}")
    if args.users and args.users_bucket:
        fail("give --users FILE or --users-bucket NAME, not both")
    fed = [entry for entry in entries if entry.skip is None and entry.payload is not None]
    without = next((entry for entry in fed if entry.policy is None), None)
    policy = _flags_policy(args, without.source) if without is not None else None
    recorded = {entry.policy.key: entry.policy for entry in fed if entry.policy is not None}
    overrides = policy_overrides(args) if recorded else {}
    for each in recorded.values():
        _merged(each.policy, overrides, bool(args.operator))
    users: dict[str, bytes | None] | None = None
    if args.users:
        users = _users_file(args.users)
    elif args.users_bucket:
        users = await _bucket_users(args, {entry.client for entry in entries if entry.client})
    elif any(entry.kind == "recording" for entry in entries):
        fail("recordings need --users FILE or --users-bucket NAME to answer lookups")
    replayer = replay.Replayer(
        policy,
        users,
        at=args.at,
        complete=not args.users_bucket,
        overrides={field: value for field, (_, value) in overrides.items()},
    )
    summary = replay.Summary()
    described = describe_policy(len(recorded), policy is not None, overrides)
    try:
        for outcome in replayer.run_all(entries):
            summary.add(outcome)
            print(format_outcome(outcome), file=out)
        for line in format_summary(summary, args.at, described):
            print(line, file=out)
        out.flush()
    except BrokenPipeError:  # `| head`: the exit status still tells
        pass
    except replay.ReplayError as exc:
        fail(str(exc))
    return 1 if summary.changed else 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay",
        help="feed recorded requests through the decision core; exit 1 if a decision changed",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="--record-dir directories, recording files (*.jsonl) or recorded cases (*.json)",
    )
    p.add_argument(
        "--users",
        metavar="FILE",
        help="users as JSON lines, as `callout users list` prints them; - is stdin",
    )
    p.add_argument("--users-bucket", metavar="NAME", help="read the users from this KV bucket")
    add(p, "--nats-url", help="with --users-bucket: NATS server URL(s)")
    add_identity_flags(p, "with --users-bucket: an identity that may read the bucket")
    p.add_argument(
        "--at",
        choices=["recorded", "now"],
        default="recorded",
        help="the policy's clock: each request's recorded arrival (default), or from now on"
        " with the recorded spacing; a request's own validity is always judged as recorded",
    )
    add_policy_flags(p, replay=True)
    p.set_defaults(run=run, logs=False)
