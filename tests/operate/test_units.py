"""The operations pieces without a server: metric bookkeeping and label bounds, readiness rules,
the HTTP server's edges, flag parsing, the verdict classifier and the log format of lines
that come from other libraries."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from callout import decision as d
from callout import log, observability, settings
from callout.audit import audit_document, message_for, permissions_hash
from callout.decision import Decision, Request
from callout.health import HttpServer, Readiness, Response, cache_live, parse_address
from callout.metrics import MAX_REASONS, Metrics
from callout.records import Permissions, Rules
from callout.store.memory import MemoryStore
from callout.verdicts import Verdicts, classify
from tests.support.nats import new_user
from tests.support.operate import http_get, samples, value


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`log.setup` reconfigures the root logger (as the CLI does); put it back afterwards."""
    loggers = [logging.getLogger(), logging.getLogger("callout")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def request(client_id: int = 7, server_id: str = "NSERVER") -> Request:
    _, user_nkey = new_user()
    _, client = new_user()
    return Request(
        server_id, user_nkey, client, 0.0, False, None, client_host="10.0.0.9", client_id=client_id
    )


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def page(metrics: Metrics) -> str:
    return metrics.render().decode()


def test_special_reasons_have_their_own_counters() -> None:
    metrics = Metrics()
    for decision in (
        Decision(d.REPLAY, "x"),
        Decision(d.EXPIRED, "late", drop=True),
        Decision(d.OVERLOADED, "backlog"),
        Decision(d.STORE_TIMEOUT, "slow"),
        Decision(d.STORE_UNAVAILABLE, "gone"),
        Decision(d.STORE_UNAVAILABLE, "gone"),
    ):
        metrics.observe(decision, 0.001)
    text = page(metrics)
    assert value(text, "callout_replays_total") == 1
    assert value(text, "callout_requests_expired_total") == 1
    assert value(text, "callout_requests_shed_total") == 1
    assert value(text, "callout_store_errors_total", kind="timeout") == 1
    assert value(text, "callout_store_errors_total", kind="unavailable") == 2
    assert value(text, "callout_decisions_total", decision="drop", reason="request_expired") == 1
    assert value(text, "callout_decisions_total", decision="deny", reason="overloaded") == 1


def test_reason_labels_are_bounded() -> None:
    metrics = Metrics()
    metrics.observe(Decision("UAAAAAAAAAAAAAAAAAAAAAAA user key?"), 0.0)
    metrics.observe(Decision("x" * 41), 0.0)
    for i in range(MAX_REASONS + 10):
        metrics.observe(Decision(f"reason_{chr(97 + i % 26)}{chr(97 + i // 26)}"), 0.0)
    reasons = {
        dict(labels)["reason"]
        for name, labels in samples(page(metrics))
        if name == "callout_decisions_total"
    }
    assert len(reasons) == MAX_REASONS + 1  # the first MAX_REASONS, and `other`
    assert "other" in reasons
    assert not any(" " in r or r.startswith("U") for r in reasons)


def test_scrape_gauges_read_live_values_and_survive_a_broken_reader() -> None:
    metrics = Metrics()
    box = {"n": 3}
    metrics.gauge("test_value", "a value", lambda: box["n"])
    metrics.gauge("test_absent", "left out", lambda: None)
    metrics.gauge("test_broken", "raises", lambda: 1 / 0)
    metrics.state_gauge("test_state", "a state", "state", lambda: "lagging")
    assert value(page(metrics), "test_value") == 3
    box["n"] = 5
    text = page(metrics)
    assert value(text, "test_value") == 5
    assert value(text, "test_state", state="lagging") == 1
    assert "test_absent" not in text and "test_broken" not in text


class CachingStore(MemoryStore):
    state = "live"
    size = 2


def test_cache_gauges_from_a_caching_store() -> None:
    """The watch cache (another module) is read by duck typing: `state` and `size`."""
    metrics = Metrics()
    store = CachingStore(error="down")

    class Ops:
        pass

    ops: Any = Ops()
    ops.metrics, ops.service, ops.store, ops.nc = metrics, None, store, None
    ops.readiness = Readiness(
        connected=lambda: True, subscribed=lambda: True, store=store, probe_timeout=1
    )
    observability._scrape_gauges(ops)
    text = page(metrics)
    assert value(text, "callout_cache_entries") == 2
    assert value(text, "callout_cache_watch_state", state="live") == 1
    store.state = "lagging"
    assert value(page(metrics), "callout_cache_watch_state", state="lagging") == 1


# ---------------------------------------------------------------------------------------------
# readiness
# ---------------------------------------------------------------------------------------------
def readiness(store: Any, *, connected: bool = True, subscribed: bool = True) -> Readiness:
    return Readiness(
        connected=lambda: connected, subscribed=lambda: subscribed, store=store, probe_timeout=0.2
    )


async def test_readiness_rules() -> None:
    ok = MemoryStore()
    assert (await readiness(ok).check()).ready
    status = await readiness(ok, connected=False).check()
    assert not status.ready and status.reason == "not connected to NATS"
    status = await readiness(ok, subscribed=False).check()
    assert not status.ready and "not subscribed" in status.reason

    down = MemoryStore(error="bucket 'users' does not exist")
    status = await readiness(down).check()
    assert not status.ready
    assert "only internal identities" in status.reason and "does not exist" in status.reason

    slow = MemoryStore(delay=5)
    status = await readiness(slow).check()
    assert not status.ready and "did not answer within 0.2s" in status.reason

    # A live cache serves users without the store.
    assert cache_live(CachingStore(error="down"))
    assert (await readiness(CachingStore(error="down")).check()).ready
    not_live = CachingStore(error="down")
    not_live.state = "disconnected"
    assert not (await readiness(not_live).check()).ready


async def test_concurrent_checks_share_one_probe() -> None:
    store = MemoryStore(delay=0.05)
    check = readiness(store)
    results = await asyncio.gather(*(check.check() for _ in range(20)))
    assert all(r.ready for r in results)
    assert store.lookups == 1


async def test_readiness_logs_transitions_only(restore_logging: None) -> None:
    store = MemoryStore()
    check = readiness(store)
    stream = io.StringIO()
    log.setup("info", "json")
    logging.getLogger("callout").handlers[0].setStream(stream)  # type: ignore[attr-defined]
    await check.check()
    await check.check()
    store.error = "gone"
    await check.check()
    await check.check()
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["event"], x["ready"]) for x in lines] == [("readiness", True), ("readiness", False)]
    assert lines[1]["level"] == "warning"


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
async def test_http_server_edges() -> None:
    async def ok() -> Response:
        return Response(200, b"fine\n")

    async def broken() -> Response:
        raise RuntimeError("bug")

    server = HttpServer("127.0.0.1", 0, {"/ok": ok, "/broken": broken})
    await server.start()
    try:
        assert (await http_get(server.port, "/ok")).body == "fine\n"
        assert (await http_get(server.port, "/ok?verbose=1")).status == 200
        head = await http_get(server.port, "/ok", method="HEAD")
        assert head.status == 200 and head.body == ""
        assert (await http_get(server.port, "/nope")).status == 404
        not_allowed = await http_get(server.port, "/ok", method="POST")
        assert not_allowed.status == 405 and not_allowed.headers["allow"] == "GET, HEAD"
        assert (await http_get(server.port, "/broken")).status == 500

        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()
    finally:
        await server.stop()


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert parse_address(":9090") == ("0.0.0.0", 9090)
    assert parse_address("[::1]:9090") == ("::1", 9090)
    for bad in ("9090", "host:", "host:port", "h:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------
def test_flags_parse_and_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLOUT_AUDIT_MAX_AGE", "12h")
    parser = argparse.ArgumentParser()
    settings.add_flags(parser, settings.ObservabilitySettings)
    args = parser.parse_args(
        ["--metrics-addr", "0.0.0.0:9090", "--audit-stream", "AUDIT", "--audit-max-bytes", "2GiB"]
    )
    assert args.metrics_addr == ("0.0.0.0", 9090)
    assert args.audit_stream == "AUDIT"
    assert args.audit_max_age == 12 * 3600
    assert args.audit_max_bytes == 2 << 30
    defaults = parser.parse_args([])
    assert defaults.metrics_addr is None and defaults.audit_stream is None
    assert settings.duration("90") == 90 and settings.duration("500ms") == 0.5
    assert settings.byte_size("100M") == 100 << 20 and settings.byte_size("4096") == 4096
    for bad_age in ("0", "-1d", "soon", "3w"):
        with pytest.raises(argparse.ArgumentTypeError):
            settings.duration(bad_age)
    for bad_size in ("0", "1.5GB", "lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            settings.byte_size(bad_size)
    for bad_name in ("a.b", "a b", "x>", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            settings.stream_name(bad_name)


# ---------------------------------------------------------------------------------------------
# audit documents
# ---------------------------------------------------------------------------------------------
def test_audit_document_fields_and_ids() -> None:
    req = request()
    perms = Permissions(pub=Rules(allow=("orders.>",)))
    admit = Decision(d.ADMIT, "", req, "APP", "alice", perms, req.client_key)
    doc = audit_document(admit, 0.0042, 1_800_000_000.5)
    assert doc == {
        "time": "2027-01-15T08:00:00.500Z",
        "request_id": f"NSERVER.{req.user_nkey}",
        "server": "NSERVER",
        "client": req.client_key,
        "client_ip": "10.0.0.9",
        "client_id": 7,
        "decision": "admit",
        "reason": "admit",
        "detail": None,
        "account": "APP",
        "name": "alice",
        "permissions_hash": permissions_hash(admit),
        "latency_ms": 4.2,
    }
    other = Decision(d.ADMIT, "", req, "APP", "alice", Permissions(), req.client_key)
    assert permissions_hash(other) != permissions_hash(admit)
    deny = Decision(d.UNKNOWN_USER, "no record", req, client_key=req.client_key)
    assert audit_document(deny, 0, 0)["permissions_hash"] is None

    # Same request -> same message id (what the stream de-duplicates on); a replay of it is
    # its own event; a request we could not read has no id to share.
    assert message_for(admit, 0, 0, "p").msg_id == message_for(admit, 1, 1, "p").msg_id
    replay = Decision(d.REPLAY, "again", req, client_key=req.client_key)
    ids = {message_for(replay, 0, 0, "p").msg_id for _ in range(2)}
    assert len(ids) == 2 and all(i.startswith(f"NSERVER.{req.user_nkey}.replay.") for i in ids)
    assert message_for(admit, 0, 0, "callout.audit").subject == "callout.audit.admit"
    garbage = Decision(d.MALFORMED, "not a JWT")
    assert message_for(garbage, 0, 0, "p").msg_id != message_for(garbage, 0, 0, "p").msg_id


# ---------------------------------------------------------------------------------------------
# verdicts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ('No valid account "GHOST" for auth callout response on account "AUTH": account missing',
         "unknown_account"),
        ('Wrong issuer for auth callout response on account "AUTH", expected "A1" got "A2"',
         "wrong_issuer"),
        ("Auth callout signing key is unknown", "wrong_issuer"),
        ('Error validating user JWT: subject ".bad." cannot start or end with a .',
         "invalid_user_jwt"),
        ("auth callout response is not for expected user", "wrong_recipient"),
        ('Authorized user on account "AUTH" outside of valid connect times', "connect_limits"),
        ("Proxy connection required", "proxy_required"),
        ('Error decrypting auth callout response on account "AUTH": nkeys: could not decrypt input',
         "xkey"),
        ("something new", "other"),
    ],
)  # fmt: skip
def test_server_reasons_are_classified(reason: str, kind: str) -> None:
    assert classify(reason) == kind


def test_recent_admits_are_bounded() -> None:
    verdicts = Verdicts(None, Metrics(), capacity=3)  # type: ignore[arg-type]
    for cid in range(1, 11):
        req = request(client_id=cid)
        verdicts.observe(Decision(d.ADMIT, "", req, "APP", "", Permissions(), req.client_key), 0)
    assert len(verdicts._admits) == 3
    assert [cid for _, cid in verdicts._admits] == [8, 9, 10]
    # Denies and requests without a connection id are not tracked.
    verdicts.observe(Decision(d.UNKNOWN_USER, "", request(client_id=11)), 0)
    verdicts.observe(Decision(d.ADMIT, "", request(client_id=0), "APP"), 0)
    assert [cid for _, cid in verdicts._admits] == [8, 9, 10]


# ---------------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_lines_from_other_libraries_get_an_event_and_no_traceback(
    fmt: str, restore_logging: None
) -> None:
    stream = io.StringIO()
    log.setup("info", fmt)
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)  # type: ignore[attr-defined]
    try:
        raise ValueError("SUAXXXXSEEDXXXX")  # a traceback could quote anything
    except ValueError:
        # As asyncio's default handler words it: the task's repr, exception text included,
        # on the lines after the first.
        logging.getLogger("asyncio").error(
            "Task exception was never retrieved\n"
            "future: <Task exception=ValueError('SUAXXXXSEEDXXXX')>",
            exc_info=True,
        )
    logging.getLogger("nats.aio.client").info("below WARNING: not shown")
    log.info("ours", n=1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "SUAXXXXSEEDXXXX" not in stream.getvalue()
    if fmt == "json":
        first, second = (orjson.loads(line) for line in lines)
        assert first["event"] == "library" and first["logger"] == "asyncio"
        assert first["message"] == "Task exception was never retrieved"
        assert first["exception"] == "ValueError" and first["level"] == "error"
        assert second["event"] == "ours" and second["n"] == 1
    else:
        assert " library " in lines[0] and "exception=ValueError" in lines[0]
        assert " ours " in lines[1]
