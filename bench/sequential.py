"""Sequential connect latency through the callout, against the no-callout limit, in one run.

    .venv/bin/python -m bench.sequential [--connects 2000] [--users 100]

Scenarios, each on its own fresh nats-server on loopback:
  LIMIT   the same users as static nkey users in the server config (no callout at all);
  plain   `callout serve` (a subprocess) with the users in a real KV bucket;
  xkey    the same, with xkey encryption on.
Clients speak the NATS protocol by hand (bench.loadgen's client: INFO, sign the nonce,
CONNECT, PING, wait for PONG), one at a time, so the figure is the latency a single
connecting client sees. Prints p50/p90/p99, connects per second and ratios to LIMIT.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench import deploy
from callout.nats_server import NatsServer, free_port


def limit_config(port: int, users: list[str]) -> str:
    nkeys = ", ".join(f'{{ nkey: "{u}" }}' for u in users)
    return f'listen: "127.0.0.1:{port}"\naccounts {{ APP {{ users: [ {nkeys} ] }} }}\n'


async def measure(url: str, seeds: list[str], connects: int) -> list[float]:
    latencies: list[float] = []
    denied = 0
    for i in range(connects):
        start = time.perf_counter()
        ok = await deploy.admitted(url, seeds[i % len(seeds)])
        latencies.append(time.perf_counter() - start)
        denied += not ok
    if denied:
        raise SystemExit(f"{denied} allowed users were denied: the benchmark is void")
    return latencies


async def scenario(
    name: str, workdir: Path, keys: deploy.Keys, seeds: list[str], pubs: list[str], connects: int
) -> list[float]:
    if name == "LIMIT":
        port = free_port()
        server = NatsServer(limit_config(port, pubs), port=port, workdir=workdir / name).start()
        try:
            return await measure(server.url, seeds, connects)
        finally:
            server.stop()
    xkey = name == "xkey"
    server = deploy.callout_server(workdir / name, keys, xkey=xkey).start()
    service = None
    try:
        admin = await deploy.nats_connect(server.url, keys.service_seed)
        kv = await deploy.users_bucket(admin)
        for pub in pubs:
            await kv.put(pub, deploy.record("bench"))
        await admin.close()
        files = deploy.seed_files(keys, workdir / name / "keys")
        service = deploy.Service(deploy.serve_args(server, files, xkey=xkey))
        await service.event("ready")
        return await measure(server.url, seeds, connects)
    finally:
        if service is not None:
            service.terminate()
        server.stop()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--connects", type=int, default=2000)
    parser.add_argument("--users", type=int, default=100)
    args = parser.parse_args()
    keys = deploy.make_keys()
    seeds, pubs = deploy.users(args.users)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("LIMIT", "plain", "xkey"):
            results[name] = await scenario(name, Path(tmp), keys, seeds, pubs, args.connects)
    base = statistics.median(results["LIMIT"])
    print(
        f"{args.connects} sequential connects per scenario, {args.users} users,"
        f" {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{'scenario':8} {'conn/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p50/LIMIT':>10}"
    )
    for name, values in results.items():
        rate = len(values) / sum(values)
        print(
            f"{name:8} {rate:8.0f} {pct(values, 0.5) * 1e3:8.2f} {pct(values, 0.9) * 1e3:8.2f}"
            f" {pct(values, 0.99) * 1e3:8.2f} {statistics.median(values) / base:10.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
