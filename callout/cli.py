"""`callout` command line: serve, users, keys, dev, connect.

Every mistake a user can make (a missing seed file, a key of the wrong kind, NATS not
reachable, a bucket with the wrong config, an invalid key or subject) ends in one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
from collections.abc import Sequence

import nats.errors
import nats.js.errors

from callout import __version__
from callout.commands import connect, dev, keys, replay, serve, users
from callout.errors import UserError
from callout.keys import KeyError_, SeedFileError
from callout.records import RecordError
from callout.settings import Parser
from callout.store import StoreError
from callout.store import kv as kvstore


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="callout", description=__doc__.splitlines()[0] if __doc__ else "")
    p.add_argument("--version", action="version", version=f"callout {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in (serve, users, keys, dev, connect, replay):
        command.register(sub)
    return p


def _nats_error(exc: nats.errors.Error) -> str:
    if isinstance(exc, nats.js.errors.APIError):
        # nats-py prints every field of an API error, "None" for the missing ones.
        return exc.description or type(exc).__name__
    return str(exc).removeprefix("nats: ") or type(exc).__name__


def _error(text: str) -> None:
    # One write: a thread still logging (the users watch) must not land inside the line.
    sys.stderr.write(f"callout: error: {text}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        # A command builds its settings from `args` (a mistake there is a UserError too) and
        # returns its exit status, or a coroutine to run for it.
        result = args.run(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return int(result)
    except (UserError, SeedFileError, KeyError_, RecordError, StoreError) as exc:
        _error(str(exc))
        usage = UserError | SeedFileError | KeyError_ | RecordError | kvstore.BucketConfigError
        return 2 if isinstance(exc, usage) else 1
    except nats.errors.Error as exc:
        # What a command did not map to a StoreError of its own (a NATS failure mid-command)
        # is still one line, never a traceback.
        _error(f"NATS: {_nats_error(exc)}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
