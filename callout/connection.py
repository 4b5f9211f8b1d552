"""How a command reaches NATS: its identity (an nkey seed or a .creds file, optionally over
TLS) and the connection, which fails with one line instead of retrying forever."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client

from callout.errors import fail
from callout.keys import (
    KeyError_,
    KeyKind,
    SeedFileError,
    SigningKey,
    load_signing_key,
    read_seed_file,
)
from callout.settings import IdentitySettings, TlsSettings


def split_urls(text: str) -> list[str]:
    return [u.strip() for u in text.split(",") if u.strip()]


@dataclass(frozen=True)
class Identity:
    """How a command authenticates to NATS: an nkey seed, or a .creds file (operator mode);
    optionally over TLS, with a client certificate for mutual TLS."""

    key: SigningKey
    creds: str | None = None
    tls: ssl.SSLContext | None = None


def tls_context(settings: TlsSettings) -> ssl.SSLContext | None:
    ca, cert, key = settings.tls_ca, settings.tls_cert, settings.tls_key
    if not (ca or cert or key):
        return None
    for flag, path in (("--tls-ca", ca), ("--tls-cert", cert), ("--tls-key", key)):
        # ssl reports a missing file without its name (FileNotFoundError.filename is None).
        if path and not Path(path).is_file():
            fail(f"{flag} {path}: no such file")
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert and key:
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        fail(f"TLS files cannot be used: {exc}")
    return context


def load_identity(settings: IdentitySettings, what: str) -> Identity:
    """The identity the settings name, its files read and checked (`what` says whose it is)."""
    tls = tls_context(settings.tls)
    if settings.creds:
        # Same rules as a seed file: it holds one (group/other-readable files are refused).
        try:
            seed = read_seed_file(settings.creds)
            key = SigningKey.from_seed(seed)
        except (SeedFileError, KeyError_) as exc:
            fail(f"--creds: {exc}")
        if key.kind is not KeyKind.USER:
            fail(f"--creds {settings.creds} holds a {key.kind.name.lower()} seed, not a user seed")
        return Identity(key, creds=str(settings.creds), tls=tls)
    if not settings.nkey_seed_file:
        fail(f"{what}: --nkey-seed-file (or --creds) is required")
    return Identity(
        load_signing_key(settings.nkey_seed_file, KeyKind.USER, "--nkey-seed-file"), tls=tls
    )


async def connect(
    urls: str,
    identity: Identity | None,
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
            if isinstance(exc, ssl.SSLError):
                # A failed TLS handshake leaves nats-py's first connect waiting forever to
                # close the socket when it may reconnect (nats-io/nats.py#718). Raising here
                # ends that connect with this error; a TLS mistake is not transient anyway.
                raise exc
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
    if identity is not None:
        if identity.creds is not None:
            options["user_credentials"] = identity.creds
        else:
            options["nkeys_seed_str"] = identity.key.seed
        if identity.tls is not None:
            options["tls"] = identity.tls
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
