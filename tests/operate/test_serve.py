"""`callout serve` as a process with every operations feature on: the flags (and their
environment variables) reach the running service, the endpoints answer, the audit stream
fills, and the process's stderr is JSON lines that each carry an event name and no secret
(issue: "Structured logging ... every line has an event name; no secrets (a test checks)").
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import orjson

from tests.support.hygiene import scan
from tests.support.nats import Keys, NatsServer, nats_connect, new_user, raw_connect
from tests.support.operate import gather, http_get, scrape, value
from tests.support.service import record, serve_args, spawn, users_bucket
from tests.support.wait import eventually


async def test_serve_with_metrics_audit_and_discovery(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    seed, pub = new_user()
    internal_seed, internal = new_user()
    stranger_seed, _ = new_user()
    admin = await nats_connect(server.url, keys.service_seed)
    try:
        await (await users_bucket(admin)).put(pub, record("u"))
        args = serve_args(server, files, "--internal-key", internal, "--audit-stream", "AUDIT")
        svc = spawn(args, env={"CALLOUT_METRICS_ADDR": "127.0.0.1:0"})
        sigs: list[str] = []
        try:
            await svc.await_event("ready")
            port = (await svc.await_event("metrics_listening"))["port"]
            assert isinstance(port, int) and port > 0

            async def ready() -> bool:
                return (await http_get(port, "/readyz")).status == 200

            await eventually(ready)
            for who, admitted in ((seed, True), (internal_seed, True), (stranger_seed, False)):
                result = await raw_connect(server.url, who)
                assert result.admitted is admitted
                sigs.append(result.connect["sig"])

            expected = {("admit", "admit"), ("admit", "internal"), ("deny", "unknown_user")}

            async def counted() -> bool:
                page = await scrape(port)
                return all(
                    value(page, "callout_decisions_total", decision=d, reason=r) == 1
                    for d, r in expected
                )

            await eventually(counted)
            (ping,) = await gather(admin, "$SRV.PING.callout", 1)
            assert ping["name"] == "callout"

            js = admin.jetstream()

            async def audited() -> bool:
                return (await js.stream_info("AUDIT")).state.messages == 3

            await eventually(audited)
            assert svc.terminate() == 0
            svc.wait_for("stopped")
        finally:
            svc.kill()
    finally:
        await admin.close()

    for line in svc.raw:
        doc = orjson.loads(line)  # every line: one JSON object with an event name
        assert isinstance(doc, dict) and isinstance(doc.get("event"), str) and doc["event"]
    stderr = "\n".join(svc.raw)
    secrets = {keys.service_seed, keys.issuer_seed, seed, internal_seed, stranger_seed, *sigs}
    assert scan(stderr, secrets) == []
    events = {doc["event"] for doc in svc.lines}
    assert {"ready", "metrics_listening", "discovery_registered", "audit_stream_created"} <= events


async def test_metrics_port_in_use_is_a_one_line_usage_error(
    server: NatsServer, keys: Keys, files: dict[str, Path]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = spawn(serve_args(server, files, "--metrics-addr", f"127.0.0.1:{port}"))
        try:
            code = await asyncio.to_thread(svc.proc.wait, 30)
        finally:
            svc.kill()
    assert code == 2
    errors = [line for line in svc.raw if line.startswith("callout: error:")]
    assert errors == [f"callout: error: --metrics-addr 127.0.0.1:{port}: Address already in use"]
    assert not any("Traceback" in line for line in svc.raw)
