"""Running the callout service in tests: in-process (fast, lets a test swap the store) and as
a subprocess (`python -m callout serve`, for kill/restart and CLI-contract tests).

Both wait for the service's own "ready" signal (the subscription is live on the server),
never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nats
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from callout.decision import Authorizer, Policy
from callout.keys import CurveKey, KeyKind, SigningKey
from callout.records import Permissions
from callout.service import CalloutService
from callout.store import Store
from callout.store.kv import KVStore
from tests.support.nats import (
    AUTH_SUBJECT,
    Keys,
    NatsServer,
    nats_connect,
    new_user,
)

APP = "APP"


def policy_for(keys: Keys, **overrides: Any) -> Policy:
    xkey = overrides.pop("xkey", False)
    base: dict[str, Any] = {
        "issuer": SigningKey.from_seed(keys.issuer_seed),
        "account": APP,
        "allowed_accounts": frozenset({APP}),
        "xkeys": (CurveKey.from_seed(keys.xkey_seed),) if xkey else (),
        "forbidden_accounts": frozenset({"SYS", "$SYS", "AUTH"}),
    }
    base.update(overrides)
    return Policy(**base)


@dataclass
class InProcess:
    service: CalloutService
    nc: Client

    async def stop(self) -> None:
        await self.service.stop()
        with contextlib.suppress(Exception):
            await self.nc.close()


async def start_in_process(
    server: NatsServer,
    keys: Keys,
    *,
    store: Store | None = None,
    bucket: str = "users",
    max_inflight: int = 64,
    **policy: Any,
) -> InProcess:
    nc = await nats.connect(
        server.url,
        nkeys_seed_str=keys.service_seed,
        name="callout-test",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )
    service = CalloutService(
        nc,
        Authorizer(policy_for(keys, **policy)),
        store if store is not None else KVStore(nc, bucket),
        max_inflight=max_inflight,
    )
    await service.start()
    return InProcess(service, nc)


def write_seed(path: Path, seed: str) -> Path:
    path.write_text(seed + "\n")
    path.chmod(0o600)
    return path


def seed_files(keys: Keys, directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "service": write_seed(directory / "service.nk", keys.service_seed),
        "issuer": write_seed(directory / "issuer.nk", keys.issuer_seed),
        "xkey": write_seed(directory / "xkey.nk", keys.xkey_seed),
    }


@dataclass
class Subprocess:
    """`python -m callout serve` with its JSON log lines collected as they arrive."""

    proc: subprocess.Popen[bytes]
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, b""):
            text = line.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.raw.append(text)
                with contextlib.suppress(orjson.JSONDecodeError):
                    doc = orjson.loads(text)
                    if isinstance(doc, dict):
                        self.lines.append(doc)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, event: str, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
        """Block until a log line with this event (and fields) appears; the process's own signal."""

        def found() -> dict[str, Any] | None:
            for doc in self.lines:
                if doc.get("event") == event and all(doc.get(k) == v for k, v in match.items()):
                    return doc
            return None

        with self._cond:
            ok = self._cond.wait_for(
                lambda: found() is not None or self.proc.poll() is not None, timeout
            )
            doc = found()
        if doc is None:
            state = "exited" if self.proc.poll() is not None else "timed out"
            tail = "\n".join(self.raw[-20:])
            raise AssertionError(f"no {event!r} log line ({state}, ok={ok}); stderr tail:\n{tail}")
        return doc

    async def await_event(
        self,
        event: str,
        timeout: float = 15.0,
        **match: Any,
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self.wait_for, event, timeout, **match)

    def events(self, event: str) -> list[dict[str, Any]]:
        with self._cond:
            return [d for d in self.lines if d.get("event") == event]

    def terminate(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(10)


def callout_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "callout", *args]


def spawn(
    args: Sequence[str],
    env: dict[str, str] | None = None,
    stdin: Literal["devnull"] = "devnull",
    cwd: Path | None = None,
) -> Subprocess:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen(
        callout_cmd(*args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=cwd,
    )
    handle = Subprocess(proc)
    threading.Thread(target=handle._pump, daemon=True).start()
    return handle


def serve_args(
    target: NatsServer | str,
    files: dict[str, Path],
    *extra: str,
    xkey: bool = False,
    xkeys: Sequence[Path] = (),
    **override: str | Sequence[str],
) -> list[str]:
    """`callout serve` arguments: the service and issuer seeds of `files`, account APP, and the
    URL of `target` (a server, or any URL list: a proxy's, a cluster's). `xkey` adds
    `files["xkey"]`; `xkeys` adds each of those seed files in order. `override` replaces or
    adds a flag by its name (`nkey_seed_file="..."` is `--nkey-seed-file ...`; a list repeats
    the flag), for tests of what `serve` refuses."""
    flags: dict[str, str | Sequence[str]] = {
        "--nats-url": target if isinstance(target, str) else target.url,
        "--nkey-seed-file": str(files["service"]),
        "--issuer-seed-file": str(files["issuer"]),
        "--account": APP,
    }
    flags.update({"--" + name.replace("_", "-"): value for name, value in override.items()})
    args = ["serve"]
    for flag, value in flags.items():
        for item in [value] if isinstance(value, str) else value:
            args += [flag, item]
    for path in [files["xkey"]] * xkey + list(xkeys):
        args += ["--xkey-seed-file", str(path)]
    return [*args, *extra]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        callout_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def record(
    name: str = "user",
    *,
    admin: bool = False,
    revoked: bool = False,
    account: str | None = None,
    pub_allow: Sequence[str] = (),
    pub_deny: Sequence[str] = (),
    sub_allow: Sequence[str] = (),
    sub_deny: Sequence[str] = (),
) -> bytes:
    return orjson.dumps(
        {
            "name": name,
            "admin": admin,
            "revoked": revoked,
            "account": account,
            "permissions": {
                "pub": {"allow": list(pub_allow), "deny": list(pub_deny)},
                "sub": {"allow": list(sub_allow), "deny": list(sub_deny)},
            },
        }
    )


async def users_bucket(nc: Client, bucket: str = "users") -> Any:
    """The users bucket through plain nats-py (independent of callout's own store code)."""
    js = nc.jetstream()
    try:
        return await js.key_value(bucket)
    except Exception:
        return await js.create_key_value(bucket=bucket, history=5)


async def live_keys(nc: Client, bucket: str = "users") -> list[str]:
    """The bucket's keys that have a live value, sorted, read with plain nats-py: the stream's
    subjects from one STREAM.INFO, then a get per key (deleted keys raise). Not nats-py's
    KeyValue.keys(): it trusts a fresh consumer's first num_pending, which can read 0, and
    then lists nothing."""
    js = nc.jetstream()
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    kv = await js.key_value(bucket)
    keys = []
    for subject in sorted(info.state.subjects or {}):
        key = subject.removeprefix(prefix)
        try:
            await kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # KeyDeletedError included
            continue
        keys.append(key)
    return keys


__all__ = [
    "APP",
    "InProcess",
    "KeyKind",
    "Permissions",
    "Subprocess",
    "callout_cmd",
    "live_keys",
    "policy_for",
    "record",
    "run_cli",
    "seed_files",
    "serve_args",
    "spawn",
    "start_in_process",
    "users_bucket",
    "write_seed",
]


def watch_connection(nc: Any, seed: str) -> Any:
    """The watch's own connection: same server as `nc`, the identity of `seed`, reconnecting."""
    url = nc.connected_url.geturl()

    def connect(callbacks: dict[str, Any]) -> Any:
        return nats_connect(
            url,
            seed,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.1,
            **callbacks,
        )

    return connect


START_TIMEOUT = 30.0  # first run: nats-server start, JetStream, bucket creation


def printed(handle: Subprocess, pattern: str) -> re.Match[str]:
    """A match in the non-JSON text `callout dev` prints on stderr for the human."""
    for line in handle.raw:
        if (m := re.search(pattern, line)) is not None:
            return m
    raise AssertionError(f"{pattern!r} not printed; stderr:\n" + "\n".join(handle.raw))


async def stop_with_ctrl_c(handle: Subprocess) -> int:
    handle.proc.send_signal(signal.SIGINT)
    code = await asyncio.to_thread(handle.proc.wait, 15)
    await asyncio.to_thread(wait_logged, handle, "nats_server_stopped")
    return code


@dataclass
class Wire:
    """What a bystander in the callout account sees: every request (a list, and a queue to take
    them in order), every reply (a queue), and how many replies each request's inbox got."""

    requests: list[Msg] = field(default_factory=list)
    inboxes: list[str] = field(default_factory=list)
    replies: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _requests: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)
    _replies: asyncio.Queue[Msg] = field(default_factory=asyncio.Queue)

    def answered(self) -> int:
        return sum(1 for inbox in self.inboxes if self.replies[inbox] > 0)

    async def request(self) -> Msg:
        """The next request not taken yet."""
        return await asyncio.wait_for(self._requests.get(), 5)

    async def reply(self) -> Msg:
        """The next reply not taken yet."""
        return await asyncio.wait_for(self._replies.get(), 5)


async def watch(nc: Client) -> Wire:
    """Start watching the callout subjects through `nc` (a user of the callout account)."""
    wire = Wire()

    async def on_request(msg: Msg) -> None:
        wire.requests.append(msg)
        wire._requests.put_nowait(msg)
        wire.inboxes.append(msg.reply or "")  # no reply subject: the counts catch it
        wire.changed.set()

    async def on_reply(msg: Msg) -> None:
        wire.replies[msg.subject] += 1
        wire._replies.put_nowait(msg)
        wire.changed.set()

    await nc.subscribe(AUTH_SUBJECT, cb=on_request)
    await nc.subscribe("$SYS._INBOX.>", cb=on_reply)
    await nc.flush()
    return wire


def wait_logged(handle: Subprocess, event: str, timeout: float = 15.0) -> dict[str, Any]:
    """Wait for a JSON log line even if the process has already exited: its last lines may
    still be in the pipe, and `Subprocess.wait_for` gives up as soon as the process is gone.
    Waits on the reader thread's own notification, never on a fixed delay."""

    def found() -> dict[str, Any] | None:
        return next((d for d in handle.lines if d.get("event") == event), None)

    with handle._cond:
        handle._cond.wait_for(lambda: found() is not None, timeout)
        doc = found()
    assert doc is not None, f"no {event!r} line; stderr:\n" + "\n".join(handle.raw[-20:])
    return doc


def kill_quietly(handle: Subprocess) -> None:
    """Teardown for a test that failed half-way: never leave a process behind."""
    if handle.proc.poll() is None:
        handle.kill()


async def start_replicas(args: Sequence[str], n: int = 2) -> list[Subprocess]:
    """`n` service processes, each awaited on its own "ready" line."""
    replicas = [spawn(args) for _ in range(n)]
    try:
        await asyncio.gather(*(r.await_event("ready") for r in replicas))
    except BaseException:
        for replica in replicas:
            replica.kill()
        raise
    return replicas


@contextlib.asynccontextmanager
async def revocable(
    server: Any, files: dict[str, Path], keys: Keys, *names: str
) -> AsyncIterator[tuple[Subprocess, Any, list[tuple[str, str]]]]:
    """A user with a record for each name, and a service (with the system identity, so it can
    kick) whose users cache is live; yields the service, the users bucket and each user's
    (seed, public key)."""
    admin = await nats_connect(server.url, keys.service_seed)
    kv = await users_bucket(admin)
    users = [new_user() for _ in names]
    for name, (_, pub) in zip(names, users, strict=True):
        await kv.put(pub, record(name))
    service = spawn(serve_args(server, files, "--system-nkey-seed-file", str(files["system"])))
    try:
        await service.await_event("users_cache_live")
        yield service, kv, users
    finally:
        service.terminate()
        await admin.close()
