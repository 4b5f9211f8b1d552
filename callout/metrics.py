"""Prometheus metrics: counters and histograms fed by the decision observer, gauges read from
the running service at scrape time.

Label values are bounded by construction: `decision` is admit/deny/drop, `reason` is one of
the reason constants of `callout.decision` (never a user key, a subject or an error text), and
every other label is a fixed vocabulary defined here. A reason that does not look like one of
our constants, or any past the first `MAX_REASONS`, is counted as `other`, so a bug can never
turn a label into a cardinality explosion.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from callout import __version__
from callout.decision import EXPIRED, OVERLOADED, REPLAY, STORE_TIMEOUT, STORE_UNAVAILABLE, Decision

# The classic text format: what every Prometheus version reads, and all our names fit it.
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
# `<name>_created` series double the page and say only when the process started.
disable_created_metrics()  # type: ignore[no-untyped-call]
MAX_REASONS: Final = 64
_REASON = re.compile(r"[a-z][a-z_]{0,39}")
# Sub-millisecond for a cached or internal admit, up to past the server's default 2 s timeout.
DURATION_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip

STORE_ERROR_KINDS: Final = {STORE_UNAVAILABLE: "unavailable", STORE_TIMEOUT: "timeout"}
# Why an audit message did not reach the stream (callout.audit).
AUDIT_LOSS_CAUSES: Final = ("buffer_full", "timeout", "no_stream", "error", "shutdown")
# What nats-server rejected in an answer we admitted (callout.verdicts.classify).
REJECTION_KINDS: Final = (
    "unknown_account",
    "wrong_issuer",
    "invalid_user_jwt",
    "wrong_recipient",
    "connect_limits",
    "proxy_required",
    "xkey",
    "other",
)


def outcome(decision: Decision) -> str:
    return "drop" if decision.drop else "admit" if decision.admit else "deny"


@dataclass(frozen=True, slots=True)
class _ScrapeGauge:
    name: str
    help: str
    read: Callable[[], float | None]


@dataclass(frozen=True, slots=True)
class _ScrapeStateGauge:
    """An enum as a gauge: one series per known state, 1 for the current one."""

    name: str
    help: str
    label: str
    read: Callable[[], str | None]


class _ScrapeCollector:
    """Values that live in the service (in-flight, backlog...) read when Prometheus scrapes,
    so nothing has to keep a copy up to date on the decision path."""

    def __init__(self) -> None:
        self.gauges: list[_ScrapeGauge | _ScrapeStateGauge] = []

    def collect(self) -> Iterable[Metric]:
        for gauge in self.gauges:
            try:
                if isinstance(gauge, _ScrapeGauge):
                    value = gauge.read()
                    if value is not None:
                        yield GaugeMetricFamily(gauge.name, gauge.help, value=float(value))
                    continue
                state = gauge.read()
                if state is None:
                    continue
                family = GaugeMetricFamily(gauge.name, gauge.help, labels=[gauge.label])
                family.add_metric([state], 1.0)
                yield family
            except Exception:  # noqa: S112 - a broken reader must not break the whole scrape
                continue

    def describe(self) -> Iterable[Metric]:
        # Registration must not call the readers (the service may not be started yet).
        return ()


_SPECIAL_REASONS: Final = (*STORE_ERROR_KINDS, REPLAY, EXPIRED, OVERLOADED)
# The `le` label of each bucket, as prometheus_client writes it.
_BUCKET_NAMES: Final = (
    *(floatToGoString(b) for b in DURATION_BUCKETS),  # type: ignore[no-untyped-call]
    "+Inf",
)


class _DecisionCounts:
    """The decision counters and the duration histogram, kept as plain numbers and turned into
    metric families at scrape time: `observe` runs once per request on the event loop, where
    prometheus_client's per-series locks and bucket walk cost more than the count itself."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, str], int] = {}
        # Per outcome: observations per bucket (the last is +Inf, not cumulative), and the sum.
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}
        # The reasons with counters of their own, counted by the reason itself (not its label).
        self.special = dict.fromkeys(_SPECIAL_REASONS, 0)

    def add(self, verdict: str, reason: str, label: str, latency: float) -> None:
        key = (verdict, label)
        self.decisions[key] = self.decisions.get(key, 0) + 1
        if reason in self.special:
            self.special[reason] += 1
        buckets = self.buckets.get(verdict)
        if buckets is None:
            buckets = self.buckets[verdict] = [0] * (len(DURATION_BUCKETS) + 1)
            self.sums[verdict] = 0.0
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound >= it.
        buckets[bisect.bisect_left(DURATION_BUCKETS, latency)] += 1
        self.sums[verdict] += latency

    def collect(self) -> Iterable[Metric]:
        decisions = CounterMetricFamily(
            "callout_decisions",
            "Authorization requests decided, by outcome (admit/deny/drop) and reason.",
            labels=["decision", "reason"],
        )
        for labels, count in self.decisions.items():
            decisions.add_metric(list(labels), count)
        yield decisions
        duration = HistogramMetricFamily(
            "callout_decision_duration_seconds",
            "Time from receiving a request to sending its answer, by outcome.",
            labels=["decision"],
        )
        for verdict, counts in self.buckets.items():
            cumulative, total = [], 0
            for bound, count in zip(_BUCKET_NAMES, counts, strict=True):
                total += count
                cumulative.append((bound, float(total)))
            duration.add_metric([verdict], cumulative, self.sums[verdict])
        yield duration
        errors = CounterMetricFamily(
            "callout_store_errors",
            "Store lookups that failed (unavailable) or missed their deadline (timeout).",
            labels=["kind"],
        )
        for reason, kind in STORE_ERROR_KINDS.items():
            errors.add_metric([kind], self.special[reason])
        yield errors
        for name, help_text, reason in (
            (
                "callout_replays",
                "Requests seen before: dropped unanswered (the same request again), or denied"
                " (a new request reusing a client nonce).",
                REPLAY,
            ),
            (
                "callout_requests_expired",
                "Requests dropped unanswered because the server had already given up on them.",
                EXPIRED,
            ),
            (
                "callout_requests_shed",
                "Requests denied at once because the backlog was over --max-backlog.",
                OVERLOADED,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=self.special[reason])

    def describe(self) -> Iterable[Metric]:
        return ()


class Metrics:
    """One registry per service instance (tests run several in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._counts = _DecisionCounts()
        r.register(self._counts)
        self.server_rejections = Counter(
            "callout_server_rejections",
            "Connections we admitted that nats-server then rejected, by kind of problem.",
            ["kind"],
            registry=r,
        )
        self.audit_published = Counter(
            "callout_audit_published",
            "Audit messages stored in the audit stream (acknowledged by JetStream).",
            registry=r,
        )
        self.audit_duplicates = Counter(
            "callout_audit_duplicates",
            "Audit messages the stream dropped as duplicates (a retried publish already stored).",
            registry=r,
        )
        self.audit_lost = Counter(
            "callout_audit_lost",
            "Audit messages that never reached the audit stream, by cause.",
            ["cause"],
            registry=r,
        )
        info = Gauge("callout_info", "Always 1; the version as a label.", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        # Series that should read 0 rather than be absent until their first event.
        for kind in REJECTION_KINDS:
            self.server_rejections.labels(kind=kind)
        self._reasons: set[str] = set()
        self._scrape = _ScrapeCollector()
        r.register(self._scrape)

    # -- decisions ------------------------------------------------------------------------------
    def observe(self, decision: Decision, latency: float) -> None:
        """`CalloutService.observers` entry: counts one decision. Never blocks."""
        reason = decision.reason
        label = reason if reason in self._reasons else self._reason_label(reason)
        self._counts.add(outcome(decision), reason, label, max(latency, 0.0))

    def _reason_label(self, reason: str) -> str:
        if reason in self._reasons:
            return reason
        if len(self._reasons) >= MAX_REASONS or not _REASON.fullmatch(reason):
            return "other"
        self._reasons.add(reason)
        return reason

    # -- scrape-time gauges ---------------------------------------------------------------------
    def gauge(self, name: str, help_text: str, read: Callable[[], float | None]) -> None:
        """A gauge whose value is `read()` at scrape time (None: leave it out)."""
        self._scrape.gauges.append(_ScrapeGauge(name, help_text, read))

    def state_gauge(
        self, name: str, help_text: str, label: str, read: Callable[[], str | None]
    ) -> None:
        """`name{label="<read()>"} 1` at scrape time (None: leave it out)."""
        self._scrape.gauges.append(_ScrapeStateGauge(name, help_text, label, read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
