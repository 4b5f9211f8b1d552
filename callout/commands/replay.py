"""`callout replay PATH...`: feed recorded requests (`callout serve --record-dir`, or recorded
test cases) through the decision core again, with a users file or bucket and the policy flags
`serve` takes, and print the recorded and the new decision of each.

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

from callout import replay
from callout.commands.common import add_identity_flags, connect, fail, identity_from_args
from callout.commands.serve import add_policy_flags, policy_from_args
from callout.config import add
from callout.keys import KeyKind, SigningKey
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


def format_summary(summary: replay.Summary, at: str) -> list[str]:
    skipped = sum(summary.skipped.values())
    lines = [
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


async def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    # The replay sends no response, so it needs no issuer seed unless one is given: decisions
    # do not depend on it (operator-mode signers come from --account-signer).
    issuer = None if args.issuer_seed_file else SigningKey.generate(KeyKind.ACCOUNT)
    policy = policy_from_args(args, issuer)
    paths = [Path(p) for p in args.paths]
    try:
        entries = replay.read(paths)
    except replay.ReplayError as exc:
        fail(str(exc))
    if not entries:
        fail(f"no recorded requests in {', '.join(args.paths)}")
    if args.users and args.users_bucket:
        fail("give --users FILE or --users-bucket NAME, not both")
    users: dict[str, bytes | None] | None = None
    if args.users:
        users = _users_file(args.users)
    elif args.users_bucket:
        users = await _bucket_users(args, {entry.client for entry in entries if entry.client})
    elif any(entry.kind == "recording" for entry in entries):
        fail("recordings need --users FILE or --users-bucket NAME to answer lookups")
    replayer = replay.Replayer(policy, users, at=args.at, complete=not args.users_bucket)
    summary = replay.Summary()
    try:
        for outcome in replayer.run_all(entries):
            summary.add(outcome)
            print(format_outcome(outcome), file=out)
        for line in format_summary(summary, args.at):
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
        help="the clock: each request's recorded arrival (default), or the current time",
    )
    add_policy_flags(p, issuer_required=False)
    p.set_defaults(run=run, logs=False)
