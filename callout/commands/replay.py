"""`callout replay PATH...`: feed recorded requests (`callout serve --record-dir`) through the
decision core again, with a users file or bucket, and print the
recorded and the new decision of each. A recording carries the policy it was decided under;
each of `serve`'s policy flags given here overrides its part of it. Requests recorded without a
policy (a file without a policy line, recordings of format 1) take the whole policy from the
flags.

Exit status: 0 when no decision changed, 1 when any did (usable in CI), 2 when the input or
the flags cannot be used. Requests recorded without their payload are listed as skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from callout.connection import connect, load_identity
from callout.decision import Policy
from callout.errors import fail
from callout.keys import KeyKind, SigningKey
from callout.recording import reader, replay
from callout.settings import (
    Override,
    PolicySettings,
    ReplaySettings,
    add_flags,
    from_args,
    policy_with,
)
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
            return reader.read_users(sys.stdin.buffer, "stdin")
        with open(path, "rb") as stream:
            return reader.read_users(stream, path)
    except OSError as exc:
        fail(f"--users {path}: {exc.strerror or exc}")
    except reader.ReplayError as exc:
        fail(f"--users {exc}")


async def _bucket_users(
    settings: ReplaySettings, bucket: str, keys: set[str]
) -> dict[str, bytes | None]:
    """The records of `keys` (the clients the recording names: the only keys the core looks
    up), read concurrently, so a large bucket costs what the recording needs."""
    if not settings.nats_url:
        fail("--users-bucket needs --nats-url (and --nkey-seed-file or --creds)")
    identity = load_identity(settings.identity, "--users-bucket")
    nc = await connect(settings.nats_url, identity, name="callout-replay", reconnect=False)
    store = kvstore.KVStore(nc, bucket)
    limit = asyncio.Semaphore(BUCKET_READS)

    async def read(key: str) -> tuple[str, bytes | None]:
        async with limit:
            return key, await store.get(key)

    try:
        # A key that fails to read must not pass for "no record": any error ends the replay.
        return dict(await asyncio.gather(*(read(key) for key in sorted(keys))))
    except StoreError as exc:
        # Not exit 1: that says "decisions changed".
        fail(f"--users-bucket {bucket}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _merged(recorded: Policy, overrides: dict[str, Override], operator: bool) -> Policy:
    policy = policy_with(overrides, recorded)
    if operator and not policy.signers:
        fail("--operator: the recorded policy is config mode; give --account-signer too")
    return policy


def _flags_policy(flags: PolicySettings, needed_by: str) -> Policy:
    """The whole policy from the flags, serve's defaults for the others: for requests that
    were recorded without one."""
    if flags.account is None:
        fail(
            f"{needed_by} was recorded without its policy (a file without a policy line, or a"
            " recording of format 1): give the policy flags, at least --account (and"
            " --xkey-seed-file for encrypted requests)"
        )
    # The replay sends no response, so it needs no issuer seed unless one is given: decisions
    # do not depend on it (operator-mode signers come from --account-signer).
    issuer = None if flags.issuer_seed_file else SigningKey.generate(KeyKind.ACCOUNT)
    return flags.policy(issuer=issuer, seeds=False)


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
    settings = from_args(ReplaySettings, args)
    flags = from_args(PolicySettings, args)
    paths = [Path(p) for p in args.paths]
    try:
        entries = reader.read(paths)
    except reader.ReplayError as exc:
        fail(str(exc))
    if not entries:
        fail(f"no recorded requests in {', '.join(args.paths)}")
    fed = [entry for entry in entries if entry.skip is None and entry.payload is not None]
    without = next((entry for entry in fed if entry.policy is None), None)
    policy = _flags_policy(flags, without.source) if without is not None else None
    recorded = {entry.policy.key: entry.policy for entry in fed if entry.policy is not None}
    overrides = flags.policy_values(seeds=False) if recorded else {}
    for each in recorded.values():
        _merged(each.policy, overrides, bool(flags.operator))
    users: dict[str, bytes | None] = {}
    if settings.users:
        users = _users_file(settings.users)
    elif settings.users_bucket:
        clients = {entry.client for entry in entries if entry.client}
        users = await _bucket_users(settings, settings.users_bucket, clients)
    else:
        fail("recordings need --users FILE or --users-bucket NAME to answer lookups")
    replayer = replay.Replayer(
        policy,
        users,
        at=settings.at,
        complete=not settings.users_bucket,
        overrides={field: value for field, (_, value) in overrides.items()},
    )
    summary = replay.Summary()
    described = describe_policy(len(recorded), policy is not None, overrides)
    try:
        for outcome in replayer.run_all(entries):
            summary.add(outcome)
            print(format_outcome(outcome), file=out)
        for line in format_summary(summary, settings.at, described):
            print(line, file=out)
        out.flush()
    except BrokenPipeError:  # `| head`: the exit status still tells
        pass
    except reader.ReplayError as exc:
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
        help="--record-dir directories or recording files (*.jsonl)",
    )
    add_flags(p, ReplaySettings)
    add_flags(p, PolicySettings, given=True)
    p.set_defaults(run=run)
