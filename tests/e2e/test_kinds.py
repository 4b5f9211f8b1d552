"""Connection kinds against a real nats-server: a leafnode whose remote authenticates with a
user's nkey (nats-server 2.15 calls such a leaf out like a client, `client_info.kind`
"Leafnode") is denied `kind_not_allowed` unless `--allow-kind` names leafnodes: admitted on
the user's record alone, a whole server would join the account as that user."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from callout.decision import Decision
from tests.support.admission import SERVICE_ERROR, deployment
from tests.support.nats import Keys, NatsServer, ServerFactory, free_port, new_user


def leaf(workdir: Path, hub_leaf_port: int, seed: str) -> NatsServer:
    """A plain server (no callout, no JetStream) whose one leaf remote signs with `seed`."""
    port = free_port()
    config = "\n".join(
        [
            f'listen: "127.0.0.1:{port}"',
            'server_name: "LEAF"',
            "leafnodes {",
            f'  remotes: [ {{ url: "nats-leaf://127.0.0.1:{hub_leaf_port}", nkey: "{seed}" }} ]',
            "}",
        ]
    )
    return NatsServer(config, port=port, workdir=workdir)


async def decided(decisions: list[Decision], key: str) -> Decision:
    async with asyncio.timeout(10):
        while True:
            for decision in decisions:
                if decision.client_key == key:
                    return decision
            await asyncio.sleep(0.01)


async def run_leaf(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path, **policy: Any
) -> tuple[Decision, str | None]:
    leaf_port = free_port()
    server = nats_server(extra=f'leafnodes {{ listen: "127.0.0.1:{leaf_port}" }}')
    seed, pub = new_user()
    async with deployment(server, keys, **policy) as dep:
        assert dep.svc is not None
        decisions: list[Decision] = []
        dep.svc.service.observers.append(lambda d, _: decisions.append(d))
        await dep.put(pub, b'{"name": "edge"}')
        spoke = leaf(tmp_path / "leaf", leaf_port, seed).start()
        try:
            decision = await decided(decisions, pub)
            reason = None
            if not decision.admit:
                reason = await dep.reason(pub)
        finally:
            with contextlib.suppress(Exception):
                spoke.stop()
    return decision, reason


async def test_a_leafnode_on_a_user_s_key_is_denied_by_default(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path
) -> None:
    decision, reason = await run_leaf(nats_server, keys, tmp_path)
    assert decision.reason == "kind_not_allowed"
    assert reason == SERVICE_ERROR + "kind_not_allowed"


async def test_a_leafnode_is_admitted_when_allowed(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path
) -> None:
    decision, reason = await run_leaf(
        nats_server, keys, tmp_path, allowed_kinds=frozenset({"client", "leafnode"})
    )
    assert decision.reason == "admit" and reason is None
