"""A three-node nats-server cluster on loopback, with JetStream and the auth callout, for the
cluster tests.

Each node is a `tests.support.nats.NatsServer` whose config is `render_config` (the same accounts
and `auth_callout` block as every other test) plus a `cluster {}` block routing to all three nodes
and an HTTP port for `/healthz`. Nodes are named n1..n3: that is the name JetStream reports as a
stream's `cluster.leader`.

Readiness is the servers' own signal: `/healthz` answers 200 once a node's JetStream is caught
up with the cluster (meta leader known, streams current). Before the first JetStream leader is
elected there is no event a client can wait on, so start-up polls it with a deadline, as the
single-server harness polls for "Server is ready".
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import orjson
from nats.aio.client import Client

from tests.support.nats import (
    Keys,
    NatsServer,
    NatsServerError,
    RawResult,
    raw_connect,
    render_config,
)
from tests.support.service import Subprocess, run_cli, seed_files

CLUSTER_NAME = "callout-test"
#: Client-side bound on one connect: above the servers' authorization timeout, so a connect
#: nobody answers ends in the server's "Authorization Violation", not a client timeout.
CONNECT_TIMEOUT = 5.0
READY_TIMEOUT = 20.0
USERS_STREAM = "KV_users"
STREAM_NOT_MATCH = 10060  # JSStreamNotMatchErr: "expected stream does not match"


def distinct_ports(n: int) -> list[int]:
    """`n` different ports that were free a moment ago (all held open while picking, so no
    two are the same; `free_port` alone may hand out one port twice)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _healthy(monitor_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{monitor_url}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class NoLeader(AssertionError):
    """STREAM.INFO answered, naming no leader."""


@dataclass
class Cluster:
    keys: Keys
    workdir: Path
    xkey: str | bool = False
    auth_timeout: float = 2.0
    sys_nkey: str | None = None
    nodes: list[NatsServer] = field(default_factory=list)
    route_ports: list[int] = field(default_factory=list)
    #: xkey each node's config currently names (False: no encryption)
    node_xkeys: list[str | bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = distinct_ports(9)
        self.route_ports = ports[6:]
        for i in range(3):
            port, http_port = ports[2 * i], ports[2 * i + 1]
            workdir = self.workdir / f"n{i + 1}"
            store_dir = workdir / "js"
            node = NatsServer(
                "", port=port, workdir=workdir, http_port=http_port, store_dir=store_dir
            )
            self.nodes.append(node)
            self.node_xkeys.append(self.xkey)
            node.config = self.render(i)

    def render(self, i: int) -> str:
        node = self.nodes[i]
        routes = ", ".join(f'"nats://127.0.0.1:{p}"' for p in self.route_ports)
        cluster = (
            f'cluster {{\n  name: "{CLUSTER_NAME}"\n'
            f'  listen: "127.0.0.1:{self.route_ports[i]}"\n  routes: [ {routes} ]\n}}'
        )
        return render_config(
            port=node.port,
            keys=self.keys,
            store_dir=node.store_dir,
            server_name=self.name(i),
            http_port=node.http_port,
            auth_timeout=self.auth_timeout,
            xkey=self.node_xkeys[i],
            sys_nkey=self.sys_nkey,
            extra=cluster,
        )

    @staticmethod
    def name(i: int) -> str:
        return f"n{i + 1}"

    def index(self, name: str) -> int:
        return int(name.removeprefix("n")) - 1

    @property
    def urls(self) -> str:
        """All three client URLs, comma-separated, as `--nats-url` takes them."""
        return ",".join(node.url for node in self.nodes)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(*(node.astart() for node in self.nodes))
        await asyncio.gather(*(self.wait_healthy(i) for i in range(3)))

    def repick_ports(self) -> None:
        """New ports for every node (before a first start that lost a port to another
        process between picking and binding)."""
        self.stop()
        ports = distinct_ports(9)
        self.route_ports = ports[6:]
        for i, node in enumerate(self.nodes):
            node.port, node.http_port = ports[2 * i], ports[2 * i + 1]
        for i, node in enumerate(self.nodes):
            node.config = self.render(i)

    async def wait_healthy(self, i: int, timeout: float = READY_TIMEOUT) -> None:
        node = self.nodes[i]
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(_healthy, node.monitor_url):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name(i)} not healthy within {timeout}s")
            await asyncio.sleep(0.05)

    async def restart(self, i: int, *, xkey: str | bool | None = None) -> None:
        """Graceful restart (SIGTERM, as `docker compose restart`), optionally with another
        xkey, then wait until the node is healthy (caught up) again."""
        if xkey is not None:
            self.node_xkeys[i] = xkey
        node = self.nodes[i]
        await node.astop()
        node.config = self.render(i)
        await node.astart()
        await self.wait_healthy(i)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def running(self) -> list[int]:
        return [i for i, node in enumerate(self.nodes) if node.is_running()]

    # -- JetStream ----------------------------------------------------------------------

    async def wait_reachable(self, i: int, prefix: str, timeout: float = READY_TIMEOUT) -> None:
        """Until a publish on `prefix` through node `i` reaches the stream.

        The stream's leader subscribes to its subjects once elected, and that interest reaches
        the other nodes over the routes a moment later; a publish through a node it has not
        reached yet finds no responders (nats-py's NoStreamResponseError). The interest
        becomes visible to clients by no event, so this probes, with a deadline. The probe
        names another stream in Nats-Expected-Stream: the stream refuses it, storing nothing,
        and its refusal is the answer that proves the path."""
        nc = await nats.connect(
            servers=[self.nodes[i].url],
            nkeys_seed_str=self.keys.service_seed,
            connect_timeout=5,
            allow_reconnect=False,
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    msg = await nc.request(
                        f"{prefix}readiness-probe",
                        b"",
                        timeout=2,
                        headers={"Nats-Expected-Stream": "not-this-stream"},
                    )
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    # A timeout: the answer was slow (a busy box), not a refusal; ask again.
                    assert time.monotonic() < deadline, f"{prefix}> unreachable via {self.name(i)}"
                    await asyncio.sleep(0.05)
                    continue
                answer = orjson.loads(msg.data)
                assert answer.get("error", {}).get("err_code") == STREAM_NOT_MATCH, answer
                return
        finally:
            await nc.close()

    async def wait_direct_gets(self, stream: str = USERS_STREAM, timeout: float = 15.0) -> None:
        """Until every node's replica of `stream` serves direct gets. A follower joins the
        direct-get queue group only once it has caught up with the leader, checked about
        every 2 s after the stream is created (nats-server 2.15); until then a direct get
        reaches the leader alone. Seen in each node's subscriptions (`/subsz`), by polling:
        the server announces it by no event."""
        query = urllib.parse.urlencode(
            {"subs": "1", "acc": "AUTH", "test": f"$JS.API.DIRECT.GET.{stream}"}
        )

        def serves(node: NatsServer) -> bool:
            with urllib.request.urlopen(f"{node.monitor_url}/subsz?{query}", timeout=2) as r:
                doc = orjson.loads(r.read())
            return any(sub.get("qgroup") == "_sys_" for sub in doc.get("subscriptions_list") or [])

        deadline = time.monotonic() + timeout
        while not all([await asyncio.to_thread(serves, node) for node in self.nodes]):
            assert time.monotonic() < deadline, f"{stream}: not every replica serves direct gets"
            await asyncio.sleep(0.1)

    async def stream_info(self, nc: Client, stream: str = USERS_STREAM) -> dict[str, Any]:
        msg = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2)
        info: dict[str, Any] = orjson.loads(msg.data)
        assert "error" not in info, info
        return info

    async def stream_leader(self, nc: Client, stream: str = USERS_STREAM) -> int:
        """Index of the node leading `stream` ($JS.API.STREAM.INFO -> cluster.leader)."""
        info = await self.stream_info(nc, stream)
        leader = info.get("cluster", {}).get("leader")
        if leader is None:  # answered between two leaders (an election under way)
            raise NoLeader(f"{stream} has no leader")
        return self.index(leader)


@contextlib.asynccontextmanager
async def running_cluster(
    workdir: Path,
    keys: Keys,
    *,
    xkey: str | bool = False,
    auth_timeout: float = 2.0,
    sys_nkey: str | None = None,
) -> AsyncIterator[Cluster]:
    cluster = Cluster(keys, workdir, xkey=xkey, auth_timeout=auth_timeout, sys_nkey=sys_nkey)
    try:
        for attempt in range(3):
            try:
                await cluster.start()
                break
            except NatsServerError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                cluster.repick_ports()
        yield cluster
    finally:
        cluster.stop()


async def create_users_bucket(cluster: Cluster, files: dict[str, Path]) -> None:
    """The R3 bucket, created the way operators do: `callout users --replicas 3` (list), and
    writable through every node before the test writes to it."""
    result = run_cli(
        "users",
        "--nats-url", cluster.urls,
        "--nkey-seed-file", str(files["service"]),
        "--replicas", "3",
        "list",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    await asyncio.gather(*(cluster.wait_reachable(i, "$KV.users.") for i in range(3)))


async def admin_connection(cluster: Cluster) -> Client:
    """A service-identity connection (an auth_users key: admitted without the callout)."""
    return await nats.connect(
        servers=[node.url for node in cluster.nodes],
        nkeys_seed_str=cluster.keys.service_seed,
        connect_timeout=5,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )


def decisions(replicas: Sequence[Subprocess]) -> list[dict[str, Any]]:
    return [line for replica in replicas for line in replica.events("decision")]


async def connect_via(node: NatsServer, seed: str) -> RawResult:
    return await raw_connect(node.url, seed, timeout=CONNECT_TIMEOUT)


__all__ = [
    "Cluster",
    "admin_connection",
    "connect_via",
    "create_users_bucket",
    "decisions",
    "running_cluster",
    "seed_files",
]
