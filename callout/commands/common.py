"""What every command shares: one-line user errors, key arguments, and the NATS connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import nats
import nats.errors
import orjson
from nats.aio.client import Client

from callout.keys import KeyError_, KeyKind, SigningKey, decode_public
from callout.records import Permissions, RecordError, parse_permissions


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def split_urls(text: str) -> list[str]:
    return [u.strip() for u in text.split(",") if u.strip()]


def user_key(text: str) -> str:
    """Keys are case-insensitive on input and stored upper-case."""
    key = text.strip().upper()
    try:
        decode_public(key, KeyKind.USER)
    except KeyError_ as exc:
        fail(f"invalid user public key {text[:60]!r}: {exc}")
    return key


async def connect(
    urls: str,
    seed: SigningKey | None,
    *,
    name: str,
    reconnect: bool,
    callbacks: dict[str, Callable[..., Awaitable[None]]] | None = None,
) -> Client:
    """Connect, or fail with one line. The first connect tries each server twice and gives up
    (nats-py would otherwise retry forever); after it succeeds, a reconnecting client
    (`reconnect=True`) keeps trying for as long as the process runs."""
    callbacks = dict(callbacks or {})
    connected = False
    report = callbacks.pop("error_cb", None)
    attempts: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        # Connection attempts before the first success are summed up by the one-line error.
        if not connected:
            attempts.append(exc)
        elif report is not None:
            await report(exc)

    options: dict[str, Any] = {
        "servers": split_urls(urls),
        "name": name,
        "connect_timeout": 3,
        "allow_reconnect": reconnect,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        **callbacks,
    }
    if seed is not None:
        options["nkeys_seed_str"] = seed.seed
    try:
        nc = await nats.connect(**options)
    except nats.errors.NoServersError:
        last = f": {_describe(attempts[-1])}" if attempts else ""
        fail(f"cannot connect to NATS at {urls}{last}")
    except nats.errors.Error as exc:
        fail(f"cannot connect to NATS at {urls}: {_describe(exc)}")
    except OSError as exc:
        fail(f"cannot connect to NATS at {urls}: {_describe(exc)}")
    connected = True
    if reconnect:
        nc.options["max_reconnect_attempts"] = -1
    return nc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip() or type(exc).__name__


def permissions_json(text: str | None, flag: str) -> Permissions:
    if not text:
        return Permissions()
    try:
        return parse_permissions(orjson.loads(text), flag)
    except orjson.JSONDecodeError:
        fail(f"{flag} is not JSON")
    except RecordError as exc:
        fail(str(exc))
