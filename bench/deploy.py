"""What the benchmarks deploy, built from the product's own parts: keys (`callout.keys`), the
config `callout dev` renders, the nats-server process (`callout.nats_server`), user records
(`callout.records`), the users bucket (`callout.store.kv`) and `callout serve` as a
subprocess awaited on its `ready` log line. Connects are made by `bench.loadgen`'s hand-rolled
client, the one every benchmark measures with."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import ADMITTED, Identity, connect_once, parse_url
from callout.commands.dev import render_config
from callout.decision import Policy
from callout.keys import CurveKey, KeyKind, SigningKey, write_secret
from callout.nats_server import NatsServer, free_port
from callout.records import Permissions, Rules, UserRecord, dump_record
from callout.store import kv as kvstore

APP = "APP"


@dataclass(frozen=True)
class Keys:
    """The deployment's issuer (signs user JWTs), the service's own user and its xkey."""

    issuer: SigningKey
    service: SigningKey
    xkey: CurveKey

    @property
    def issuer_pub(self) -> str:
        return self.issuer.public

    @property
    def service_seed(self) -> str:
        return self.service.seed

    @property
    def xkey_pub(self) -> str:
        return self.xkey.public


def policy(keys: Keys, *, xkey: bool = False) -> Policy:
    """The policy `callout serve` builds for the deployment `callout_server` renders."""
    return Policy(
        issuer=keys.issuer,
        account=APP,
        allowed_accounts=frozenset({APP}),
        xkeys=(keys.xkey,) if xkey else (),
        forbidden_accounts=frozenset({"SYS", "$SYS", "AUTH"}),
    )


def make_keys() -> Keys:
    return Keys(
        SigningKey.generate(KeyKind.ACCOUNT), SigningKey.generate(KeyKind.USER), CurveKey.generate()
    )


def new_user() -> tuple[str, str]:
    """A fresh user nkey: `(seed, public key)`."""
    key = SigningKey.generate(KeyKind.USER)
    return key.seed, key.public


def users(n: int) -> tuple[list[str], list[str]]:
    """`n` fresh users: their seeds, and their public keys in the same order."""
    pairs = [new_user() for _ in range(n)]
    return [seed for seed, _ in pairs], [pub for _, pub in pairs]


def seed_files(keys: Keys, directory: Path) -> dict[str, Path]:
    """The seed files `callout serve` reads, by role: issuer, service, xkey."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, seed in (("issuer", keys.issuer.seed), ("service", keys.service.seed),
                       ("xkey", keys.xkey.seed)):  # fmt: skip
        files[role] = directory / f"{role}.nk"
        write_secret(files[role], seed)
    return files


def callout_server(workdir: Path, keys: Keys, *, xkey: bool = False) -> NatsServer:
    """A nats-server (not started) with the auth callout, encrypted with the xkey if asked."""
    port = free_port()
    config = render_config(
        port, workdir, keys.issuer.public, keys.service.public,
        keys.xkey.public if xkey else None, None,
    )  # fmt: skip
    return NatsServer(config, port=port, workdir=workdir)


async def nats_connect(url: str, seed: str, **options: Any) -> Client:
    """A nats-py connection as `seed`, without reconnects unless `options` ask for them."""
    opts: dict[str, Any] = {"connect_timeout": 5.0, "allow_reconnect": False}
    opts.update(options)
    return await nats.connect(url, nkeys_seed_str=seed, **opts)


def record(name: str, *, pub_allow: Sequence[str] = (), sub_allow: Sequence[str] = ()) -> bytes:
    """A user record: no allow list means unrestricted on that side."""
    permissions = Permissions(pub=Rules(allow=tuple(pub_allow)), sub=Rules(allow=tuple(sub_allow)))
    return dump_record(UserRecord(name=name, permissions=permissions))


async def users_bucket(nc: Client) -> Any:
    """The users bucket, created as the service expects it when missing."""
    await kvstore.ensure_bucket(nc, "users", None)
    return await nc.jetstream().key_value("users")


def callout_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "callout", *args]


def serve_args(
    server: NatsServer, files: dict[str, Path], *extra: str, xkey: bool = False
) -> list[str]:
    args = [
        "serve",
        "--nats-url", server.url,
        "--nkey-seed-file", str(files["service"]),
        "--issuer-seed-file", str(files["issuer"]),
        "--account", APP,
    ]  # fmt: skip
    if xkey:
        args += ["--xkey-seed-file", str(files["xkey"])]
    return [*args, *extra]


class Service:
    """`python -m callout ARGS`, its JSON log lines read off stderr by a thread."""

    def __init__(self, args: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            callout_cmd(*args), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self.lines: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            with self._changed:
                self.lines.append(doc)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _find(self, event: str) -> dict[str, Any] | None:
        return next((d for d in self.lines if d.get("event") == event), None)

    def _wait(self, event: str, within: float) -> dict[str, Any] | None:
        with self._changed:
            self._changed.wait_for(
                lambda: self._find(event) is not None or self.proc.poll() is not None, within
            )
            return self._find(event)

    async def event(self, event: str, within: float = 30.0) -> dict[str, Any]:
        """The first log line of this event, waited for on the reader's notification."""
        doc = await asyncio.to_thread(self._wait, event, within)
        if doc is None:
            self.terminate()
            raise SystemExit(f"callout did not log {event!r}")
        return doc

    def terminate(self, within: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(within)


async def metrics(port: int) -> dict[str, float]:
    """The service's /metrics page, each sample name summed over its labels."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        raw = await reader.read()
    finally:
        writer.close()
    _, _, body = raw.partition(b"\r\n\r\n")
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def admitted(url: str, seed: str, within: float = 10.0) -> bool:
    """One connect by the benchmarks' own client: admitted or not."""
    host, port = parse_url(url)
    outcome, _ = await connect_once(host, port, Identity.from_seed(seed), within)
    return outcome == ADMITTED
