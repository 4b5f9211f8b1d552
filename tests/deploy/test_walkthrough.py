"""The README's "Deploying" section, followed step by step where it can run here: everything
but the docker commands themselves.

The compose topology runs as local processes, from the compose file itself: three nats-server
processes on `deploy/cluster/nats-N.conf` (only addresses and the data directory moved to
loopback and a temporary directory), the init script and `callout serve` with the services'
own environment, their container paths mapped to the files compose would mount
(`tests/support/compose.py`). A `docker compose exec callout CMD` of the docs runs CMD with the
`callout` service's environment.

Steps: setup writes the keys; init creates the R3 bucket and the admin (and is harmless when
run again); two replicas serve; the admin connects; a user is added, read, backed up,
revoked; the bucket is lost and restored from the backup, which never overwrites; the
service's own nkey is rotated with the documented steps, after which the old seed no longer
gets in.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nats
import orjson
import pytest
from nats.aio.client import Client

from tests.support.cluster import READY_TIMEOUT, _healthy, distinct_ports
from tests.support.compose import REPO, LocalCompose, copy_checkout, load_compose, run_setup
from tests.support.nats import NatsServer, free_port, new_user, raw_connect
from tests.support.service import Subprocess, spawn
from tests.support.wait import eventually

pytestmark = pytest.mark.slow

DOCS = (REPO / "README.md").read_text()
EXEC = "docker compose exec callout "
EXEC_T = "docker compose exec -T callout "
SETUP = "python deploy/compose/setup.py"
CONNECT_ADMIN = (
    "callout connect --nats-url nats://127.0.0.1:4222 --nkey-seed-file deploy/compose/keys/admin.nk"
)
ADD = EXEC + "callout users add UABC... --name alice --pub-allow 'orders.>' --sub-allow '_INBOX.>'"
GET = EXEC + "callout users get UABC..."
REVOKE = EXEC + "callout users revoke UABC..."
BACKUP = EXEC_T + "callout users list > users-backup.jsonl"
RESTORE = EXEC_T + "callout users --replicas 3 import - < users-backup.jsonl"
KEYGEN_NEW = "callout keys generate --out deploy/compose/keys/new"
DOCUMENTED = (SETUP, CONNECT_ADMIN, ADD, GET, REVOKE, BACKUP, RESTORE, KEYGEN_NEW)
#: The published client port of nats-1 (compose: "127.0.0.1:4222:4222").
HOST_URL = "nats://127.0.0.1:4222"


def test_the_commands_this_walkthrough_runs_are_the_documented_ones() -> None:
    missing = [command for command in DOCUMENTED if command not in DOCS]
    assert missing == []


def exec_command(documented: str, key: str = "") -> tuple[str, str | None, str | None]:
    """A documented `docker compose exec` line: (command, redirect "<" or ">", file)."""
    assert documented.startswith((EXEC, EXEC_T))
    command = documented.removeprefix(EXEC_T).removeprefix(EXEC).replace("UABC...", key)
    match = re.fullmatch(r"(.*?)(?: ([<>]) (\S+))?", command)
    assert match is not None
    return match.group(1), match.group(2), match.group(3)


def localise(
    text: str, *, port: int, http: int, route: int, routes: dict[str, int], store: Path
) -> str:
    """A node config with its addresses on loopback and its data in `store`; nothing else."""
    replacements = [
        ("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}"),
        ("http: 0.0.0.0:8222", f"http: 127.0.0.1:{http}"),
        ("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{route}"),
        ("store_dir: /data/jetstream", f"store_dir: {orjson.dumps(str(store)).decode()}"),
        *((f"nats://{name}:6222", f"nats://127.0.0.1:{p}") for name, p in routes.items()),
    ]
    for old, new in replacements:
        assert text.count(old) == 1, f"expected {old!r} once in the node config"
        text = text.replace(old, new)
    return text


@dataclass
class Topology:
    """The compose services as local processes."""

    root: Path
    work: Path
    nodes: dict[str, NatsServer] = field(default_factory=dict)
    local: LocalCompose = field(init=False)
    routes: dict[str, int] = field(default_factory=dict)
    replicas: list[Subprocess] = field(default_factory=list)

    def __post_init__(self) -> None:
        compose = load_compose(self.root)
        names = [
            name
            for name, spec in compose["services"].items()
            if spec.get("image", "").startswith("nats:")
        ]
        ports = iter(distinct_ports(3 * len(names)))
        self.routes = {name: next(ports) for name in names}
        for name in names:
            port, http = next(ports), next(ports)
            node = NatsServer("", port=port, workdir=self.work / name, http_port=http)
            self.nodes[name] = node
        self.local = LocalCompose(self.root, {n: node.port for n, node in self.nodes.items()})

    def _config_path(self, name: str) -> Path:
        command = self.local.compose["services"][name]["command"]
        return Path(self.local.host_path(name, command[command.index("--config") + 1]))

    def _prepare(self, name: str) -> None:
        node = self.nodes[name]
        source = self._config_path(name)
        assert node.http_port is not None
        node.config = localise(
            source.read_text(),
            port=node.port,
            http=node.http_port,
            route=self.routes[name],
            routes=self.routes,
            store=self.work / name / "data" / "jetstream",
        )
        # Beside the original, so its `include "keys.conf"` reads the real keys.conf.
        node.conf_path = source.with_name(f"{name}.local.conf")

    async def wait_healthy(self, name: str) -> None:
        node = self.nodes[name]
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
        while not await asyncio.to_thread(_healthy, node.monitor_url):
            assert asyncio.get_running_loop().time() < deadline, f"{name} not healthy"
            await asyncio.sleep(0.05)

    async def up(self) -> None:
        for name in self.nodes:
            self._prepare(name)
        await asyncio.gather(*(node.astart() for node in self.nodes.values()))
        await asyncio.gather(*(self.wait_healthy(name) for name in self.nodes))

    async def rolling_restart(self) -> None:
        """`docker compose restart nats-N`, one node at a time, each healthy before the next."""
        for name, node in self.nodes.items():
            await node.astop()
            self._prepare(name)
            await node.astart()
            await self.wait_healthy(name)

    async def start_callout(self) -> list[Subprocess]:
        """The `callout` service: its replica count, the image's command (`callout serve`)."""
        count = self.local.compose["services"]["callout"]["deploy"]["replicas"]
        envs = [self.replica_env() for _ in range(count)]
        started = [spawn(["serve"], env=env) for env in envs]
        self.replicas += started
        await asyncio.gather(*(r.await_event("ready") for r in started))
        # Each container has its own network namespace; here the replicas share one, so each
        # gets its own metrics port. The image's healthcheck then probes each one's /readyz.
        for env in envs:
            if "CALLOUT_METRICS_ADDR" in env:
                await self.healthy(env)
        return started

    def replica_env(self) -> dict[str, str]:
        env = dict(self.local.env("callout"))
        if "CALLOUT_METRICS_ADDR" in env:
            env["CALLOUT_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
        return env

    async def healthy(self, env: dict[str, str]) -> None:
        """deploy/compose/healthcheck.py, as the HEALTHCHECK runs it, until it passes."""
        script = self.root / "deploy" / "compose" / "healthcheck.py"
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
        while True:
            check = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, str(script)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=False,
            )
            if check.returncode == 0:
                return
            assert asyncio.get_running_loop().time() < deadline, check.stdout
            await asyncio.sleep(0.1)  # the cache loads on its own; polled like the HEALTHCHECK

    def exec(self, documented: str, key: str = "") -> str:
        """A documented `docker compose exec callout ...` line, with its redirect."""
        command, redirect, path = exec_command(documented, key)
        stdin = (self.root / path).read_text() if redirect == "<" and path else None
        result = self.local.run("callout", command, stdin=stdin)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        if redirect == ">" and path:
            (self.root / path).write_text(result.stdout)
        return result.stdout

    def host(self, documented: str) -> Sequence[str]:
        """A host command of the docs, pointed at nats-1's local port."""
        return shlex.split(documented.replace(HOST_URL, self.nodes["nats-1"].url))

    def down(self) -> None:
        for replica in self.replicas:
            replica.kill()
        for node in self.nodes.values():
            node.stop()


@asynccontextmanager
async def topology(tmp_path: Path) -> AsyncIterator[Topology]:
    root = copy_checkout(tmp_path / "checkout")
    setup = run_setup(root)  # SETUP
    assert setup.returncode == 0, setup.stderr
    top = Topology(root, tmp_path / "run")
    try:
        await top.up()
        yield top
    finally:
        top.down()


async def service_connection(top: Topology) -> Client:
    seed = (top.root / "deploy/compose/keys/service.nk").read_text().strip()
    return await nats.connect(
        servers=[node.url for node in top.nodes.values()], nkeys_seed_str=seed, connect_timeout=5
    )


async def admitted(top: Topology, seed: str, *, attempts: int = 1) -> bool:
    """Connect through nats-3. Right after a node restart a connect can be lost (its replica
    reconnecting, the bucket changing leader) and clients retry: `attempts` > 1 does too."""
    for _ in range(attempts):
        if (await raw_connect(top.nodes["nats-3"].url, seed, timeout=5)).admitted:
            return True
    return False


def users(listing: str) -> dict[str, dict[str, object]]:
    return {doc.pop("key"): doc for doc in map(orjson.loads, listing.splitlines())}


def list_users(top: Topology, documented: str, count: int) -> dict[str, dict[str, object]]:
    """`callout users list`, which must list `count` users in one pass."""
    listed = users(top.exec(documented))
    assert len(listed) == count, listed
    return listed


async def test_deploying_walkthrough(tmp_path: Path) -> None:
    async with topology(tmp_path) as top:
        root = top.root
        admin_public = (root / "deploy/compose/keys/admin.pub").read_text().strip()

        # init: the bucket with 3 replicas and the admin; harmless the second time.
        init = top.local.compose["services"]["init"]["entrypoint"]
        first = top.local.run("init", init)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"admin {admin_public} added" in first.stdout
        again = top.local.run("init", init)
        assert again.returncode == 0 and "already present" in again.stdout
        nc = await service_connection(top)
        try:
            info = orjson.loads((await nc.request("$JS.API.STREAM.INFO.KV_users", b"")).data)
            assert info["config"]["num_replicas"] == 3
        finally:
            await nc.close()

        # Two replicas serve; the admin gets in, into APP.
        await top.start_callout()
        connect = await asyncio.to_thread(top.local.run, "callout", top.host(CONNECT_ADMIN))
        assert connect.returncode == 0, connect.stderr
        assert f"connected as {admin_public}" in connect.stdout
        assert '"account": "APP"' in connect.stdout

        # Add a user, read it back, back up, revoke.
        alice_seed, alice = new_user()
        assert not await admitted(top, alice_seed)
        top.exec(ADD, alice)
        assert await admitted(top, alice_seed)
        record = orjson.loads(top.exec(GET, alice))
        assert record["name"] == "alice"
        assert record["permissions"]["pub"]["allow"] == ["orders.>"]
        backup = list_users(top, BACKUP, 2)
        assert users((root / "users-backup.jsonl").read_text()) == backup
        assert set(backup) == {admin_public, alice}
        top.exec(REVOKE, alice)
        assert not await admitted(top, alice_seed)

        # The bucket is lost; the backup brings back what it held, and a second restore
        # changes nothing.
        nc = await service_connection(top)
        try:
            await nc.jetstream().delete_key_value("users")
        finally:
            await nc.close()
        assert orjson.loads(top.exec(RESTORE))["added"] == 2
        assert list_users(top, BACKUP.replace("users-backup", "after-restore"), 2) == backup
        again_restored = orjson.loads(top.exec(RESTORE))
        assert again_restored["unchanged"] == 2 and again_restored["written"] == 0
        assert await admitted(top, alice_seed)  # the backup predates the revocation
        # A restore never overwrites: revoked after the backup, alice stays revoked.
        top.exec(REVOKE, alice)
        command, _, _ = exec_command(RESTORE)
        result = top.local.run("callout", command, stdin=(root / "users-backup.jsonl").read_text())
        assert result.returncode == 1 and alice in result.stderr
        assert not await admitted(top, alice_seed)

        await rotate_service_nkey(top)


async def rotate_service_nkey(top: Topology) -> None:
    """the README's "Deploying" section, "Rotate the service's own nkey", steps 1-4."""
    root = top.root
    keys_conf = root / "deploy/cluster/keys.conf"
    old_seed = (root / "deploy/compose/keys/service.nk").read_text().strip()
    old_public = re.search(r'CALLOUT_AUTH_USERS: \[ "(U[A-Z2-7]+)" \]', keys_conf.read_text())
    assert old_public is not None
    old = old_public.group(1)

    generated = top.local.run("callout", top.host(KEYGEN_NEW))  # 1
    assert generated.returncode == 0, generated.stderr
    new = orjson.loads(generated.stdout)["service"]

    text = keys_conf.read_text()  # 2: both keys in both lists, rolling restart
    text = text.replace(f'{{ nkey: "{old}" }} ]', f'{{ nkey: "{old}" }}, {{ nkey: "{new}" }} ]')
    text = text.replace(f'[ "{old}" ]', f'[ "{old}", "{new}" ]')
    assert text.count(new) == 2
    keys_conf.write_text(text)
    await top.rolling_restart()

    old_replicas = list(top.replicas)  # 3: the new seed in place, replicas recreated
    os.replace(root / "deploy/compose/keys/new/service.nk", root / "deploy/compose/keys/service.nk")
    new_replicas = await top.start_callout()
    for replica in old_replicas:
        assert await asyncio.to_thread(replica.terminate) == 0

    text = keys_conf.read_text()  # 4: the old key out of both lists, rolling restart
    text = text.replace(f'{{ nkey: "{old}" }}, ', "").replace(f'"{old}", ', "")
    assert old not in text
    keys_conf.write_text(text)
    await top.rolling_restart()

    admin_seed = (root / "deploy/compose/keys/admin.nk").read_text().strip()
    assert await admitted(top, admin_seed, attempts=3)

    # The old seed is no longer an auth_users identity: called out, and unknown. Right after
    # the restart its lookup may still time out (the stream changing leader), a deny too;
    # a client tries again, as for the admin above.
    def old_reasons() -> list[str]:
        lines = [d for r in new_replicas for d in r.events("decision")]
        return [d["reason"] for d in lines if d["client"] == old]

    for attempt in range(1, 4):
        assert not await admitted(top, old_seed)
        await eventually(lambda n=attempt: len(old_reasons()) == n)
        if old_reasons()[-1] == "unknown_user":
            break
    assert old_reasons()[-1] == "unknown_user", old_reasons()
    assert set(old_reasons()) <= {"unknown_user", "store_timeout", "store_unavailable"}
