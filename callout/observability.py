"""Everything an operator watches, wired around a running `CalloutService`: metrics, the
health/metrics HTTP endpoint, NATS service discovery, the audit trail and the server's
verdicts, as `ObservabilitySettings` ask. `callout serve` calls `start` and `Observability.stop`;
nothing here is on the decision path except the observers, which only count and enqueue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from typing import Final

from nats.aio.client import Client

from callout import log
from callout.audit import Audit, AuditConfig
from callout.discovery import Discovery
from callout.errors import fail
from callout.health import (
    HttpServer,
    Readiness,
    Response,
    Status,
    cache_size,
    cache_state,
)
from callout.metrics import AUDIT_LOSS_CAUSES, CONTENT_TYPE, Metrics
from callout.service import CalloutService
from callout.settings import ObservabilitySettings
from callout.store import Store
from callout.verdicts import Verdicts

# Readiness is also evaluated in the background, so the `callout_ready` gauge and the
# `readiness` log line follow the store even when nobody polls /readyz.
MONITOR_INTERVAL: Final = 5.0


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
    nc: Client,
    service: CalloutService,
    store: Store,
    settings: ObservabilitySettings,
    *,
    probe_timeout: float,
) -> Observability:
    """Wire everything `settings` asks for around a started service; readiness probes the
    store within `probe_timeout` (the policy's --backend-timeout)."""
    metrics = Metrics()
    readiness = Readiness(
        connected=lambda: nc.is_connected,
        subscribed=lambda: subscribed(service),
        store=store,
        probe_timeout=probe_timeout,
    )
    discovery = Discovery(nc, service)
    verdicts = Verdicts(nc, metrics)
    ops = Observability(nc, service, store, metrics, readiness, discovery, verdicts)
    service.observers += [metrics.observe, discovery.observe, verdicts.observe]
    _scrape_gauges(ops)

    # A port already in use is a configuration mistake: report it before starting the rest.
    addr = settings.metrics_addr
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
    stream = settings.audit_stream
    if stream:
        ops.audit = Audit(
            nc,
            AuditConfig(
                stream=stream,
                max_age=settings.audit_max_age,
                max_bytes=settings.audit_max_bytes,
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
