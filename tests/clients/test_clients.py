"""nats.go and the JS client through callout (see tests/support/clients.py): admitted; denied
(the client sees `Authorization Violation`, the service logged the actionable reason); a
publish outside the record's allow list refused by the server; and a connection kicked by a
revocation, whose automatic reconnect the callout denies."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from nats.aio.msg import Msg

from tests.support.admission import jwt_claims
from tests.support.clients import Client, Deployment
from tests.support.nats import AUTH_SUBJECT, nats_connect, new_user
from tests.support.service import record, users_bucket, write_seed


def events(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def run(client: Client, url: str, seed: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    done = subprocess.run(
        client.command(url, seed, *args),
        env={**os.environ, **client.env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert not done.stderr.strip(), done.stderr
    return done.returncode, events(done.stdout)


def start(client: Client, url: str, seed: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        client.command(url, seed, *args),
        env={**os.environ, **client.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def first_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "no output"
    doc: dict[str, Any] = json.loads(line)
    return doc


def user(deployment: Deployment, name: str) -> tuple[Path, str]:
    seed, public = new_user()
    return write_seed(deployment.seeds / f"{name}-{public[:8]}.nk", seed), public


async def test_admitted(client: Client, deployment: Deployment) -> None:
    seed, alice = user(deployment, "alice")
    admin = await nats_connect(deployment.server.url, deployment.keys.service_seed)
    requests: list[dict[str, Any]] = []

    async def bystander(msg: Msg) -> None:
        requests.append(jwt_claims(msg.data))

    try:
        await (await users_bucket(admin)).put(alice, record("alice"))
        await admin.subscribe(AUTH_SUBJECT, cb=bystander)
        await admin.flush()
        code, seen = await asyncio.to_thread(run, client, deployment.server.url, seed, "connect")
        await admin.flush()
    finally:
        await admin.close()
    assert code == 0, seen
    assert [e["event"] for e in seen] == ["connected", "closed"]
    await deployment.service.await_event("decision", client=alice, decision="admit")
    # Each client signs the nonce in its own base64 form; callout took it.
    (sig,) = [
        r["nats"]["connect_opts"]["sig"]
        for r in requests
        if r["nats"]["connect_opts"].get("nkey") == alice
    ]
    if client.name == "go":
        assert len(sig) == 86 and "=" not in sig, "nats.go sends raw URL base64"
    else:
        assert len(sig) == 88 and sig.endswith("=="), "nats.js sends padded base64"


async def test_denied(client: Client, deployment: Deployment) -> None:
    seed, stranger = user(deployment, "stranger")
    code, seen = await asyncio.to_thread(run, client, deployment.server.url, seed, "connect")
    assert code == 1
    (failed,) = seen
    assert failed["event"] == "connect_failed"
    assert "authorization violation" in failed["error"].lower(), failed
    logged = await deployment.service.await_event("decision", client=stranger, decision="deny")
    assert logged["reason"] == "unknown_user"


async def test_publish_outside_the_allow_list_is_refused(
    client: Client, deployment: Deployment
) -> None:
    seed, bob = user(deployment, "bob")
    await deployment.put(bob, record("bob", pub_allow=["orders.>"]))
    code, seen = await asyncio.to_thread(
        run, client, deployment.server.url, seed, "publish", "secret.plans"
    )
    assert code == 0, seen
    (error,) = [e for e in seen if e["event"] == "async_error"]
    if client.name == "go":
        assert error["error"] == 'nats: Permissions Violation for Publish to "secret.plans"'
    else:  # nats.js names the server's -ERR by its code
        assert error["error"] == "PERMISSIONS_VIOLATION", error
    # Allowed subjects still go through: the same client publishing inside its list.
    code, seen = await asyncio.to_thread(
        run, client, deployment.server.url, seed, "publish", "orders.new"
    )
    assert [e["event"] for e in seen] == ["connected", "no_error", "closed"], seen


async def test_a_kicked_client_is_denied_when_it_reconnects(
    client: Client, deployment: Deployment
) -> None:
    seed, carol = user(deployment, "carol")
    admin = await nats_connect(deployment.server.url, deployment.keys.service_seed)
    try:
        kv = await users_bucket(admin)
        await kv.put(carol, record("carol"))
        proc = start(client, deployment.server.url, seed, "stay")
        try:
            assert (await asyncio.to_thread(first_line, proc))["event"] == "connected"
            admitted = await deployment.service.await_event(
                "decision", client=carol, decision="admit"
            )
            await kv.put(carol, record("carol", revoked=True))
            kicked = await deployment.service.await_event("revoked_sessions", client=carol)
            assert kicked["closed"] == 1
            out, err = await asyncio.to_thread(proc.communicate, timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    finally:
        await admin.close()
    assert not err.strip(), err
    seen = events(out)
    names = [e["event"] for e in seen]
    assert names[0] == "disconnected" and names[-1] == "closed", seen
    assert "reconnected" not in names and "still_connected" not in names
    # The reconnect went through the callout and was denied as revoked.
    denied = await deployment.service.await_event(
        "decision", client=carol, decision="deny", reason="revoked"
    )
    assert denied["cid"] != admitted["cid"]  # a new connection: the client's reconnect
    assert "authorization violation" in json.dumps(seen).lower(), seen
