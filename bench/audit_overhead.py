"""What the audit trail costs a decision, healthy and broken, in one run.

    .venv/bin/python -m bench.audit_overhead [--connects 2000] [--concurrency 50]

Scenarios, each a `callout serve` subprocess on its own fresh nats-server (JetStream on):
  off        no --audit-stream (the baseline);
  healthy    --audit-stream AUDIT, the stream created by the service;
  no_stream  a stream named AUDIT exists but takes other subjects: every publish fails at once
             (no responders) and is counted lost;
  silent     the same, plus a subscriber on the audit subjects that never answers: every
             publish waits for its ack deadline, outstanding publishes hit their cap and the
             buffer overflows (the worst case: a JetStream that hangs).
Each scenario runs `--connects` sequential connects (latency a lone client sees), then the same
number at `--concurrency` (throughput). Clients speak the protocol by hand
(bench.loadgen's client). Prints client-side p50/p99, connects per second, the service's own
mean decision latency (from /metrics), audit messages published and lost, and ratios to `off`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import deploy
from bench.sequential import pct

SCENARIOS = ("off", "healthy", "no_stream", "silent")
# A subscriber on the audit subjects that never answers: publishes find interest, so no
# "no responders", and never get an ack.
BLACK_HOLE = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1], nkeys_seed_str=sys.argv[2])
    async def drop(msg):
        pass
    await nc.subscribe("callout.audit.>", cb=drop)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@dataclass
class Result:
    sequential: list[float]
    concurrent_rate: float
    service_mean_ms: float
    cpu_ms_per_connect: float
    published: float
    lost: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sequential(url: str, seeds: list[str], n: int) -> list[float]:
    latencies = []
    for i in range(n):
        start = time.perf_counter()
        ok = await deploy.admitted(url, seeds[i % len(seeds)])
        latencies.append(time.perf_counter() - start)
        if not ok:
            raise SystemExit("an allowed user was denied: the run is void")
    return latencies


async def concurrent(url: str, seeds: list[str], n: int, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)
    denied = 0

    async def one(i: int) -> None:
        nonlocal denied
        async with gate:
            denied += not await deploy.admitted(url, seeds[i % len(seeds)])

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.perf_counter() - start
    if denied:
        raise SystemExit(f"{denied} allowed users were denied: the run is void")
    return n / elapsed


async def scenario(
    name: str,
    workdir: Path,
    keys: deploy.Keys,
    seeds: list[str],
    pubs: list[str],
    args: argparse.Namespace,
) -> Result:
    server = deploy.callout_server(workdir / name, keys).start()
    service = None
    hole: subprocess.Popen[bytes] | None = None
    admin = await deploy.nats_connect(server.url, keys.service_seed)
    try:
        kv = await deploy.users_bucket(admin)
        for pub in pubs:
            await kv.put(pub, deploy.record("bench"))
        extra = ["--metrics-addr", "127.0.0.1:0"]
        if name != "off":
            extra += ["--audit-stream", "AUDIT"]
        if name in ("no_stream", "silent"):
            await admin.jetstream().add_stream(name="AUDIT", subjects=["elsewhere.>"])
        if name == "silent":
            # In its own process: receiving every audit message must not cost the load generator.
            hole = subprocess.Popen(  # noqa: ASYNC220 - set-up, before anything is measured
                [sys.executable, "-c", BLACK_HOLE, server.url, keys.service_seed],
                stdout=subprocess.PIPE,
            )
            assert hole.stdout is not None
            if hole.stdout.readline().strip() != b"ready":
                raise SystemExit("the black-hole subscriber did not start")
        files = deploy.seed_files(keys, workdir / name / "keys")
        service = deploy.Service(deploy.serve_args(server, files, *extra))
        await service.event("ready")
        port = (await service.event("metrics_listening"))["port"]
        cpu_before = cpu_seconds(service.proc.pid)
        latencies = await sequential(server.url, seeds, args.connects)
        rate = await concurrent(server.url, seeds, args.connects, args.concurrency)
        cpu = (cpu_seconds(service.proc.pid) - cpu_before) / (2 * args.connects) * 1e3
        values = await deploy.metrics(port)
        count = values.get("callout_decision_duration_seconds_count", 0.0)
        total = values.get("callout_decision_duration_seconds_sum", 0.0)
        published = values.get("callout_audit_published_total", 0.0)
        lost = values.get("callout_audit_lost_total", 0.0)
        return Result(latencies, rate, total / count * 1e3, cpu, published, lost)
    finally:
        if service is not None:
            service.terminate(within=20)
        if hole is not None:
            hole.kill()
            hole.wait()
        await admin.close()
        server.stop()


def median(values: list[float]) -> float:
    return statistics.median(values)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connects", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keys = deploy.make_keys()
    seeds, pubs = deploy.users(args.users)
    runs: dict[str, list[Result]] = {name: [] for name in SCENARIOS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            # Interleaved, and rotated each repeat, so a drift of the machine hits every scenario.
            order = SCENARIOS[repeat % len(SCENARIOS) :] + SCENARIOS[: repeat % len(SCENARIOS)]
            for name in order:
                workdir = Path(tmp) / f"{repeat}"
                runs[name].append(await scenario(name, workdir, keys, seeds, pubs, args))
    print(
        f"{args.connects} sequential + {args.connects} at c={args.concurrency} connects per"
        f" scenario, {args.users} users, medians of {args.repeats} interleaved repeats,"
        f" {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{'scenario':10} {'p50 ms':>7} {'p99 ms':>7} {'p50/off':>8} {'conn/s':>7}"
        f" {'rate/off':>9} {'svc ms':>7} {'cpu ms/conn':>12} {'published':>10} {'lost':>6}"
    )
    base_p50 = median([median(r.sequential) for r in runs["off"]])
    base_rate = median([r.concurrent_rate for r in runs["off"]])
    for name, results in runs.items():
        p50 = median([median(r.sequential) for r in results])
        p99 = median([pct(r.sequential, 0.99) for r in results])
        rate = median([r.concurrent_rate for r in results])
        print(
            f"{name:10} {p50 * 1e3:7.2f} {p99 * 1e3:7.2f} {p50 / base_p50:8.2f} {rate:7.0f}"
            f" {rate / base_rate:9.2f} {median([r.service_mean_ms for r in results]):7.3f}"
            f" {median([r.cpu_ms_per_connect for r in results]):12.3f}"
            f" {median([r.published for r in results]):10.0f}"
            f" {median([r.lost for r in results]):6.0f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
