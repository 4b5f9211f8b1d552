"""The xkey rotation of the README's "Deploying" section, walked through on the 3-node cluster
(key rotation without an outage):

1. the servers encrypt callout requests to xkey A; the service runs with A and B
   (`--xkey-seed-file A --xkey-seed-file B`);
2. node by node, the config moves to B and the node is restarted (nats-server 2.15 cannot
   reload `auth_callout`), waiting for it to be healthy before the next;
3. the service replicas are replaced, one at a time, by replicas holding only B.

A prober connects an allowed user through every running node the whole time, and after each
step every node admits it. A bystander in the callout account opens every request with A and
with B, which shows each node really switched: its requests open with A up to its restart and
with B after, never with neither. Nothing is denied for anything to do with the xkey. What a
rolling restart costs anyway is counted, not hidden: a request lost with a restarting node or
a replica being replaced gets no answer (the server denies it at its timeout, the client
retries), and a store lookup that fails while the users stream changes leader is denied
(`store_timeout`); the client retries both.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nacl.exceptions
import nacl.public
import orjson
import pytest
from nats.aio.msg import Msg

from tests.support.cluster import (
    Cluster,
    admin_connection,
    connect_via,
    create_users_bucket,
    decisions,
    running_cluster,
)
from tests.support.nats import (
    AUTH_SUBJECT,
    Keys,
    NatsServer,
    RawProtocolError,
    decode_curve_public,
    decode_curve_seed,
    new_curve,
    new_user,
)
from tests.support.service import (
    Subprocess,
    record,
    serve_args,
    start_replicas,
    users_bucket,
    write_seed,
)

pytestmark = pytest.mark.slow

XKEY_HEADER = "Nats-Server-Xkey"
#: Pause between probes: enough of them to cover every step, without starving a 2-core box.
PACE = 0.01


def open_with(seed: str, msg: Msg) -> bytes | None:
    """The request JWT if the request was encrypted to the curve key of `seed` (docs/protocol.md
    §2), else None."""
    server = (msg.headers or {}).get(XKEY_HEADER)
    if server is None or not msg.data.startswith(b"xkv1"):
        return None
    box = nacl.public.Box(
        nacl.public.PrivateKey(decode_curve_seed(seed)),
        nacl.public.PublicKey(decode_curve_public(server)),
    )
    try:
        return bytes(box.decrypt(msg.data[28:], msg.data[4:28]))
    except nacl.exceptions.CryptoError:
        return None


def sender(jwt: bytes) -> str:
    """The name of the server that sent a request (`nats.server_id.name`)."""
    claims = orjson.loads(base64.urlsafe_b64decode(jwt.split(b".")[1] + b"=="))
    name: str = claims["nats"]["server_id"]["name"]
    return name


@dataclass
class Prober:
    """Connects `seed` through every node not being restarted, until stopped."""

    cluster: Cluster
    seed: str
    down: set[int] = field(default_factory=set)
    admitted: int = 0
    unanswered: list[str | None] = field(default_factory=list)  # failed attempts
    node_gone: int = 0  # the node went down under a connect already under way
    stopped: bool = False

    async def admit(self, node: NatsServer) -> None:
        """Connect through `node` until admitted (a client retrying), at most 3 times."""
        for _ in range(3):
            result = await connect_via(node, self.seed)
            if result.admitted:
                self.admitted += 1
                return
            self.unanswered.append(result.error)
        raise AssertionError(f"not admitted through {node.url}: {self.unanswered[-3:]}")

    async def run(self) -> None:
        n = 0
        while not self.stopped:
            up = [i for i in self.cluster.running() if i not in self.down]
            node = self.cluster.nodes[up[n % len(up)]]
            n += 1
            try:
                result = await connect_via(node, self.seed)
            except (OSError, RawProtocolError):
                result = None
            await asyncio.sleep(PACE)  # probe rate, not synchronisation
            if result is None:
                self.node_gone += 1
                continue
            if result.admitted:
                self.admitted += 1
            elif result.error == "connection closed":
                self.node_gone += 1
            else:
                self.unanswered.append(result.error)


async def replace_replica(
    old: Subprocess, args: list[str], started: list[Subprocess]
) -> Subprocess:
    """Start the new replica (added to `started`), wait until it serves, then stop the old one
    gracefully (it answers what it has taken): at no moment is the queue group empty."""
    (new,) = await start_replicas(args, 1)
    started.append(new)
    rc = await asyncio.to_thread(old.terminate)
    assert rc == 0, "\n".join(old.raw[-30:])
    return new


async def test_xkey_rotation_node_by_node_admits_throughout(
    tmp_path: Path,
    files: dict[str, Path],
    keys: Keys,
    record_property: Callable[[str, object], None],
) -> None:
    seed_a = files["xkey"]
    new_seed, new_public = new_curve()
    seed_b = write_seed(tmp_path / "keys" / "xkey-new.nk", new_seed)
    user_seed, user = new_user()
    async with running_cluster(tmp_path, keys, xkey=True) as cluster:
        await create_users_bucket(cluster, files)
        nc = await admin_connection(cluster)
        replicas: list[Subprocess] = []
        every_replica: list[Subprocess] = []
        prober = Prober(cluster, user_seed)
        probing: asyncio.Task[None] | None = None
        try:
            await (await users_bucket(nc)).put(user, record("rotating", admin=True))
            # (server name, key the request opened with) of every request, in order
            opened: list[tuple[str, str]] = []

            async def on_request(msg: Msg) -> None:
                for label, seed in (("A", keys.xkey_seed), ("B", new_seed)):
                    if (jwt := open_with(seed, msg)) is not None:
                        opened.append((sender(jwt), label))
                        return
                opened.append(("?", "neither"))

            await nc.subscribe(AUTH_SUBJECT, cb=on_request)
            await nc.flush()
            both = serve_args(cluster.urls, files, xkeys=[seed_a, seed_b])
            replicas = await start_replicas(both)
            every_replica += replicas

            for node in cluster.nodes:  # every node's requests open with A to begin with
                await prober.admit(node)
            probing = asyncio.create_task(prober.run())

            for i in range(3):
                prober.down.add(i)
                await cluster.restart(i, xkey=new_public)
                prober.down.discard(i)
                # Every node admits, whichever key it is on now.
                for node in cluster.nodes:
                    await prober.admit(node)

            only_b = serve_args(cluster.urls, files, xkeys=[seed_b])
            for k, old in enumerate(replicas):
                replicas[k] = await replace_replica(old, only_b, every_replica)
            for node in cluster.nodes:
                await prober.admit(node)
        finally:
            prober.stopped = True
            if probing is not None:
                await probing
            for replica in every_replica:
                replica.kill()
            await nc.close()

    record_property("probes_admitted", prober.admitted)
    record_property("probes_unanswered", len(prober.unanswered))
    record_property("probes_node_gone", prober.node_gone)
    assert prober.admitted >= 10
    # Lost with a restarting node or a replica being replaced: no answer, never a deny.
    assert set(prober.unanswered) <= {"Authorization Violation"}
    lines = decisions(every_replica)
    assert len(lines) >= prober.admitted
    # The only denies are store lookups that failed while a node restarted (the users stream
    # changing leader): never a deny that has anything to do with the xkey.
    denies = Counter(d["reason"] for d in lines if d["decision"] != "admit")
    record_property("service_denies", dict(denies))
    assert set(denies) <= {"store_timeout", "store_unavailable"}
    # Each node sent requests encrypted to A until its restart, to B after: never back to A,
    # never to anything else.
    assert ("?", "neither") not in opened
    for name in ("n1", "n2", "n3"):
        sequence = "".join(label for sender_name, label in opened if sender_name == name)
        assert re.fullmatch("A+B+", sequence), (name, sequence)
