"""`callout connect`: connect as a user and show where the callout placed it; with `--stay`,
stay connected until the server closes the connection (a revocation kicks it) and show what
became of the client's reconnect."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import nats
import orjson

from callout.connection import split_urls, tls_context
from callout.keys import KeyKind, load_signing_key
from callout.settings import ConnectSettings, add_flags, from_args


def duration(seconds: float) -> str:
    """`21h50m47s`, `3m05s`, `42s`: what is left, to the second."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def expiry(nanoseconds: object, now: float) -> object:
    """USER.INFO's `expires` (the time left on the user JWT, in nanoseconds) as a time and a
    duration; anything else as it came."""
    if type(nanoseconds) is not int or nanoseconds <= 0:
        return nanoseconds
    left = nanoseconds / 1e9
    at = datetime.fromtimestamp(now + left, UTC).isoformat(timespec="seconds")
    return f"{at.removesuffix('+00:00')}Z (in {duration(left)})"


def run(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    return try_connect(from_args(ConnectSettings, args))


async def try_connect(args: ConnectSettings) -> int:
    seed = load_signing_key(args.nkey_seed_file, KeyKind.USER, "--nkey-seed-file")
    closed = asyncio.Event()
    refused: list[str] = []
    disconnected: list[bool] = []
    leaving = False

    async def on_error(exc: Exception) -> None:
        text = str(exc).removeprefix("nats: ").strip("'") or type(exc).__name__
        # nats-py reports one refusal more than once: say it once.
        if "authorization violation" in text.lower() and args.stay and not refused:
            refused.append(text)
            print(f"reconnect refused: {text}", flush=True)

    async def on_disconnect() -> None:
        # Only the server's doing is news: not our own close, and not without --stay.
        if args.stay and not leaving and not disconnected:
            disconnected.append(True)
            print("disconnected: the server closed the connection; reconnecting", flush=True)

    async def on_closed() -> None:
        closed.set()

    try:
        nc = await nats.connect(
            servers=split_urls(args.nats_url),
            nkeys_seed_str=seed.seed,
            connect_timeout=5,
            # --stay: one reconnect, as a client would try, then give up if it is refused.
            allow_reconnect=args.stay,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            closed_cb=on_closed,
            tls=tls_context(args.tls),
        )
    except Exception as exc:
        print(
            f"callout: {seed.public} was not admitted: {str(exc) or type(exc).__name__}",
            file=sys.stderr,
        )
        return 1
    try:
        print(f"connected as {seed.public}", flush=True)
        with contextlib.suppress(Exception):
            reply = await nc.request("$SYS.REQ.USER.INFO", b"", timeout=2)
            data: Any = orjson.loads(reply.data).get("data", {})
            if isinstance(data, dict) and "expires" in data:
                data["expires"] = expiry(data["expires"], time.time())
            print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode(), flush=True)
        if args.stay:
            print("staying connected (Ctrl-C to leave)", flush=True)
            await closed.wait()
            print("connection closed" + (": the callout refused the reconnect" if refused else ""))
            return 1
    finally:
        leaving = True
        with contextlib.suppress(Exception):
            await nc.close()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("connect", help="connect as a user and show its account and permissions")
    add_flags(p, ConnectSettings)
    p.set_defaults(run=run)
