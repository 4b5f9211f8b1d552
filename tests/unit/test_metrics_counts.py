"""The decision counters are kept as plain numbers and rendered at scrape time: the page must
read exactly as prometheus_client's own Counter and Histogram would have written it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from callout import decision as d
from callout.decision import Decision
from callout.metrics import DURATION_BUCKETS, Metrics


def samples(text: str, prefix: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(prefix)
    }


def test_the_page_reads_as_prometheus_client_would_write_it() -> None:
    # Latencies on bucket bounds (a bucket is "less than or equal"), between them, past the
    # last, and negative (a clock step: counted as 0).
    latencies = [0.0, 0.0005, 0.0007, 0.001, 0.3, 2.0, 2.5, 9.0, -0.1]
    decisions = [Decision(d.ADMIT), Decision(d.UNKNOWN_USER), Decision(d.EXPIRED, drop=True)]
    ours = Metrics()
    registry = CollectorRegistry()
    counter = Counter("callout_decisions", "x", ["decision", "reason"], registry=registry)
    histogram = Histogram(
        "callout_decision_duration_seconds", "x", ["decision"], buckets=DURATION_BUCKETS,
        registry=registry,
    )  # fmt: skip
    for i, latency in enumerate(latencies):
        decision = decisions[i % len(decisions)]
        ours.observe(decision, latency)
        verdict = "drop" if decision.drop else "admit" if decision.admit else "deny"
        counter.labels(verdict, decision.reason).inc()
        histogram.labels(verdict).observe(max(latency, 0.0))
    theirs = generate_latest(registry).decode()
    mine = ours.render().decode()
    for prefix in ("callout_decisions_total", "callout_decision_duration_seconds"):
        expected = samples(theirs, prefix)
        assert expected and samples(mine, prefix) == expected, prefix
