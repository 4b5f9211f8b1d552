"""`callout connect`: connect as a user and show where the callout placed it."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import nats
import orjson

from callout.commands.common import split_urls, tls_context
from callout.config import add
from callout.keys import KeyKind, load_signing_key


async def try_connect(args: argparse.Namespace) -> int:
    seed = load_signing_key(args.nkey_seed_file, KeyKind.USER, "--nkey-seed-file")
    try:
        nc = await nats.connect(
            servers=split_urls(args.nats_url),
            nkeys_seed_str=seed.seed,
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            error_cb=_ignore,
            tls=tls_context(args.tls_ca, args.tls_cert, args.tls_key),
        )
    except Exception as exc:
        print(
            f"callout: {seed.public} was not admitted: {str(exc) or type(exc).__name__}",
            file=sys.stderr,
        )
        return 1
    try:
        print(f"connected as {seed.public}")
        with contextlib.suppress(Exception):
            reply = await nc.request("$SYS.REQ.USER.INFO", b"", timeout=2)
            data = orjson.loads(reply.data).get("data", {})
            print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
    finally:
        await nc.close()
    return 0


async def _ignore(_exc: Exception) -> None:
    return None


def register(sub: Any) -> None:
    p = sub.add_parser("connect", help="connect as a user and show its account and permissions")
    add(p, "--nats-url", default="nats://127.0.0.1:4222")
    add(p, "--nkey-seed-file", required=True, help="the user's seed")
    add(p, "--tls-ca", help="CA bundle to verify the server's certificate")
    add(p, "--tls-cert", help="client certificate (mutual TLS)")
    add(p, "--tls-key", help="client certificate's private key (mutual TLS)")
    p.set_defaults(run=try_connect, logs=False)
