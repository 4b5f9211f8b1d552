"""Everything an operator watches, wired around a running `CalloutService`: metrics, the
health/metrics HTTP endpoint, NATS service discovery, the audit trail and the server's
verdicts. `callout serve` calls `register_flags` and then `start` / `stop`; nothing here is on
the decision path except the observers, which only count and enqueue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Final

from nats.aio.client import Client

from callout import log
from callout.audit import Audit, AuditConfig
from callout.commands.common import fail
from callout.config import add
from callout.discovery import Discovery
from callout.health import (
    HttpServer,
    Readiness,
    Response,
    Status,
    cache_size,
    cache_state,
    parse_address,
)
from callout.metrics import AUDIT_LOSS_CAUSES, CONTENT_TYPE, Metrics
from callout.service import CalloutService
from callout.store import Store
from callout.verdicts import Verdicts

# Readiness is also evaluated in the background, so the `callout_ready` gauge and the
# `readiness` log line follow the store even when nobody polls /readyz.
MONITOR_INTERVAL: Final = 5.0
DEFAULT_AUDIT_MAX_AGE: Final = 30 * 86400.0
DEFAULT_AUDIT_MAX_BYTES: Final = 1 << 30

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*([kmgt]i?b?|b)?")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


# ---------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------
def address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `12h`, `30d` (or `500ms`); must be > 0."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 30d, 12h, 90s; got {text!r}")
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def byte_size(text: str) -> int:
    """Bytes from `1073741824`, `512MiB`, `1GB`, `100M` (K/M/G/T, powers of 1024); > 0."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size like 1GiB, 512MiB; got {text!r}")
    unit = (match.group(2) or "b")[0]
    value: int = int(match.group(1)) * 1024 ** "bkmgt".index(unit)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def stream_name(text: str) -> str:
    if not _STREAM_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"invalid stream name {text!r}: letters, digits, '-' and '_' only (at most 64)"
        )
    return text


def register_flags(parser: argparse.ArgumentParser) -> None:
    add(
        parser,
        "--metrics-addr",
        type=address,
        metavar="HOST:PORT",
        help="serve /metrics, /healthz and /readyz here (default: off)",
    )
    add(
        parser,
        "--audit-stream",
        type=stream_name,
        metavar="NAME",
        help="publish one audit message per decision to this JetStream stream (default: off)",
    )
    add(
        parser,
        "--audit-max-age",
        type=duration,
        default=DEFAULT_AUDIT_MAX_AGE,
        metavar="DURATION",
        help="audit stream retention by age when creating it, e.g. 30d (default 30d)",
    )
    add(
        parser,
        "--audit-max-bytes",
        type=byte_size,
        default=DEFAULT_AUDIT_MAX_BYTES,
        metavar="SIZE",
        help="audit stream retention by size when creating it, e.g. 1GiB (default 1GiB)",
    )


# ---------------------------------------------------------------------------------------------
# lifecycle
# ---------------------------------------------------------------------------------------------
def subscribed(service: CalloutService) -> bool:
    """Whether the auth subscription exists. nats-py re-subscribes by itself after a reconnect,
    so together with "connected" this means requests reach us."""
    return service.subscribed


@dataclass
class Observability:
    nc: Client
    service: CalloutService
    store: Store
    metrics: Metrics
    readiness: Readiness
    discovery: Discovery
    verdicts: Verdicts
    audit: Audit | None = None
    http: HttpServer | None = None
    _monitor: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    async def stop(self) -> None:
        self.readiness.stopping = True
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.discovery.stop()
        await self.verdicts.stop()
        if self.audit is not None:
            await self.audit.stop()
        if self.http is not None:
            await self.http.stop()

    async def _watch_readiness(self) -> None:
        while True:
            try:
                await self.readiness.check()
            except Exception as exc:  # the monitor must outlive any one failed check
                log.error("readiness_error", exception=type(exc).__name__)
            await asyncio.sleep(MONITOR_INTERVAL)

    # -- HTTP routes ------------------------------------------------------------------------------
    async def metrics_route(self) -> Response:
        return Response(200, self.metrics.render(), CONTENT_TYPE)

    async def healthz_route(self) -> Response:
        return Response(200, b"ok\n")

    async def readyz_route(self) -> Response:
        status = await self.readiness.check()
        prefix = "ready" if status.ready else "not ready"
        text = status.reason if status.reason.startswith("ready") else f"{prefix}: {status.reason}"
        return Response(200 if status.ready else 503, f"{text}\n".encode())


async def start(
    nc: Client, service: CalloutService, store: Store, args: argparse.Namespace
) -> Observability:
    metrics = Metrics()
    readiness = Readiness(
        connected=lambda: nc.is_connected,
        subscribed=lambda: subscribed(service),
        store=store,
        probe_timeout=float(getattr(args, "backend_timeout", 1.0)),
    )
    discovery = Discovery(nc, service)
    verdicts = Verdicts(nc, metrics)
    ops = Observability(nc, service, store, metrics, readiness, discovery, verdicts)
    service.observers += [metrics.observe, discovery.observe, verdicts.observe]
    _scrape_gauges(ops)

    # A port already in use is a configuration mistake: report it before starting the rest.
    addr = getattr(args, "metrics_addr", None)
    if addr is not None:
        host, port = addr
        ops.http = HttpServer(
            host,
            port,
            {
                "/metrics": ops.metrics_route,
                "/healthz": ops.healthz_route,
                "/readyz": ops.readyz_route,
            },
        )
        try:
            await ops.http.start()
        except OSError as exc:
            # asyncio re-raises bind errors with a long message; the errno text is the point.
            fail(f"--metrics-addr {host}:{port}: {os.strerror(exc.errno) if exc.errno else exc}")
        log.info("metrics_listening", host=host, port=ops.http.port)
    await discovery.start()
    await verdicts.start()
    stream = getattr(args, "audit_stream", None)
    if stream:
        ops.audit = Audit(
            nc,
            AuditConfig(
                stream=stream,
                max_age=getattr(args, "audit_max_age", DEFAULT_AUDIT_MAX_AGE),
                max_bytes=getattr(args, "audit_max_bytes", DEFAULT_AUDIT_MAX_BYTES),
            ),
            metrics,
        )
        for cause in AUDIT_LOSS_CAUSES:
            metrics.audit_lost.labels(cause=cause)
        # Observe first: decisions made while the stream is being checked wait in the buffer.
        service.observers.append(ops.audit.observe)
        await ops.audit.start()
        audit = ops.audit
        metrics.gauge(
            "callout_audit_buffer_messages",
            "Decisions waiting to be published to the audit stream.",
            lambda: audit.buffered,
        )
    ops._monitor = asyncio.create_task(ops._watch_readiness())
    return ops


def _scrape_gauges(ops: Observability) -> None:
    metrics, service, store, nc = ops.metrics, ops.service, ops.store, ops.nc

    def ready() -> float | None:
        last: Status | None = ops.readiness.last
        return None if last is None else float(last.ready)

    metrics.gauge(
        "callout_inflight_requests", "Requests being handled now.", lambda: service.inflight
    )
    metrics.gauge(
        "callout_backlog_requests",
        "Requests waiting for a free handler (over --max-inflight).",
        lambda: service.backlog,
    )
    metrics.gauge(
        "callout_nats_connected",
        "1 while the service's NATS connection is up.",
        lambda: float(nc.is_connected),
    )
    metrics.gauge(
        "callout_ready",
        "1 when the last readiness check passed (what /readyz answers), 0 when not.",
        ready,
    )
    metrics.gauge(
        "callout_cache_entries",
        "User records held in memory (only with a caching store).",
        lambda: cache_size(store),
    )
    metrics.state_gauge(
        "callout_cache_watch_state",
        "State of the users-bucket watch (only with a caching store): 1 for the current state.",
        "state",
        lambda: cache_state(store),
    )
