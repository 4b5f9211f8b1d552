"""NATS service discovery: `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` (the micro protocol, v1
schemas `io.nats.micro.v1.*_response`), so `nats micro ls/info/stats` and other tooling find
every replica in the callout account.

nats-py's `nats.micro.Service` is not used to run it: its endpoints always make their own
subscription and run their handler inline, one message after another, while the auth
subscription has to stay on `CalloutService`'s concurrent handler (docs/protocol.md §9, "Reconnect
storms"). So the three verbs are answered here, describing the endpoint `CalloutService`
owns; the response documents are built with nats-py's own micro schema classes, so what we
send is exactly what its micro client parses.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import (
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
)
from nats.nuid import NUID

from callout import __version__, log
from callout.decision import INTERNAL_ERROR, Decision
from callout.service import SUBJECT, CalloutService

NAME: Final = "callout"
ENDPOINT: Final = "authorize"
DESCRIPTION: Final = "NATS auth callout: admits nkey clients listed in a JetStream KV bucket"
PREFIX: Final = "$SRV"
VERBS: Final = ("PING", "INFO", "STATS")


class Discovery:
    def __init__(self, nc: Client, service: CalloutService) -> None:
        self._nc = nc
        self._service = service
        self.id = NUID().next().decode()
        self._started = datetime.now(UTC).replace(tzinfo=None)
        self._subs: list[Subscription] = []
        # Sums for the endpoint stats, from the decision observer.
        self._decided = 0
        self._processing_ns = 0
        self._errors = 0
        self._last_error = ""

    def subjects(self, verb: str) -> tuple[str, ...]:
        """The three subjects a verb is answered on: all services, this kind, this instance."""
        return (f"{PREFIX}.{verb}", f"{PREFIX}.{verb}.{NAME}", f"{PREFIX}.{verb}.{NAME}.{self.id}")

    async def start(self) -> None:
        handlers = {"PING": self._ping, "INFO": self._info, "STATS": self._stats}
        for verb in VERBS:
            for subject in self.subjects(verb):
                # No queue group: every replica answers, that is how tooling counts them.
                self._subs.append(await self._nc.subscribe(subject, cb=handlers[verb]))
        await self._nc.flush()
        log.info("discovery_registered", name=NAME, id=self.id, version=__version__)

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # a closed connection has no subscriptions to remove
                log.debug("discovery_unsubscribe_failed", exception=type(exc).__name__)

    def observe(self, decision: Decision, latency: float) -> None:
        self._decided += 1
        self._processing_ns += int(max(latency, 0.0) * 1e9)
        if decision.reason == INTERNAL_ERROR:
            self._errors += 1
            self._last_error = f"{INTERNAL_ERROR}: {decision.detail}"[:200]

    # -- the documents --------------------------------------------------------------------------
    def ping(self) -> ServicePing:
        return ServicePing(id=self.id, name=NAME, version=__version__, metadata={})

    def info(self) -> ServiceInfo:
        service = self._service
        return ServiceInfo(
            id=self.id,
            name=NAME,
            version=__version__,
            description=DESCRIPTION,
            endpoints=[
                EndpointInfo(name=ENDPOINT, subject=SUBJECT, queue_group=service.queue, metadata={})
            ],
            metadata={},
        )

    def stats(self) -> ServiceStats:
        service = self._service
        stats = service.stats
        endpoint = EndpointStats(
            name=ENDPOINT,
            subject=SUBJECT,
            queue_group=service.queue,
            num_requests=stats.requests,
            num_errors=self._errors + stats.errors,
            processing_time=self._processing_ns,
            average_processing_time=self._processing_ns // self._decided if self._decided else 0,
            last_error=self._last_error,
            data={
                "admitted": stats.admitted,
                "denied": stats.denied,
                "dropped": stats.dropped,
                "shed": stats.shed,
                "reply_errors": stats.errors,
                "inflight": service.inflight,
                "backlog": service.backlog,
            },
        )
        return ServiceStats(
            id=self.id,
            name=NAME,
            version=__version__,
            started=self._started,
            endpoints=[endpoint],
            metadata={},
        )

    # -- handlers -------------------------------------------------------------------------------
    async def _ping(self, msg: Msg) -> None:
        await self._respond(msg, self.ping().to_dict())

    async def _info(self, msg: Msg) -> None:
        await self._respond(msg, self.info().to_dict())

    async def _stats(self, msg: Msg) -> None:
        await self._respond(msg, self.stats().to_dict())

    async def _respond(self, msg: Msg, doc: dict[str, object]) -> None:
        if not msg.reply:
            return
        try:
            await self._nc.publish(msg.reply, orjson.dumps(doc))
        except Exception as exc:
            log.warning("discovery_reply_failed", exception=type(exc).__name__)
