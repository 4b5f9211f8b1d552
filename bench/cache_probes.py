"""What keeping the users cache confirmed costs while nothing happens: the watch thread's probes
against the simplest version of the same job, measured in the same run.

    .venv/bin/python -m bench.cache_probes [--seconds 10] [--users 1000]

On a fresh nats-server with a filled bucket, three phases of `--seconds` each:
- idle: no client at all (the server's own background CPU);
- simple: one STREAM.INFO every 250 ms on the event loop, the cache's probe before the
  contract (a 2 s staleness bound);
- simple20: the same loop every 20 ms, the probe rate the contract needs, with nothing else
  (no thread, no watch, no bookkeeping);
- cache: a live WatchedStore (the leader probe every 20 ms, pipelined, on its own thread).

For each: the server's CPU (from /proc), this process's CPU, and the JetStream API requests the
server counted (`$JS.API` total from its account info). The cache's figures are printed as
ratios against the simple loop's, less the idle phase's server CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import orjson
from nats.aio.client import Client

from bench.deploy import callout_server, make_keys, nats_connect, new_user, record, users_bucket
from callout.store.watch import WatchedStore

TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def api_total(nc: Client) -> int:
    doc = orjson.loads((await nc.request("$JS.API.INFO", b"", timeout=5)).data)
    return int(doc["api"]["total"])


async def phase(nc: Client, pid: int, seconds: float) -> tuple[float, float, int]:
    """(server CPU s, own CPU s, API requests) over `seconds`, less the measuring calls."""
    api0, srv0, own0 = await api_total(nc), server_cpu(pid), time.process_time()
    await asyncio.sleep(seconds)  # the phase runs meanwhile
    srv, own = server_cpu(pid) - srv0, time.process_time() - own0
    return srv, own, await api_total(nc) - api0 - 1


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=1000)
    args = parser.parse_args()
    keys = make_keys()
    with tempfile.TemporaryDirectory() as tmp:
        server = callout_server(Path(tmp), keys).start()
        assert server.pid is not None
        try:
            nc = await nats_connect(server.url, keys.service_seed)
            kv = await users_bucket(nc)
            pubs = [new_user()[1] for _ in range(args.users)]
            await asyncio.gather(*(kv.put(p, record(p[:12])) for p in pubs))
            results = {"idle": await phase(nc, server.pid, args.seconds)}

            async def simple(every: float) -> None:
                while True:
                    await nc.request("$JS.API.STREAM.INFO.KV_users", b"", timeout=1)
                    await asyncio.sleep(every)

            for name, every in (("simple", 0.25), ("simple20", 0.02)):
                task = asyncio.create_task(simple(every))
                results[name] = await phase(nc, server.pid, args.seconds)
                task.cancel()

            store = WatchedStore(
                nc,
                "users",
                connect=lambda callbacks: nats_connect(server.url, keys.service_seed, **callbacks),
            )
            store.start()
            await asyncio.wait_for(store.live_event.wait(), 60)
            results["cache"] = await phase(nc, server.pid, args.seconds)
            await store.stop()
            await nc.close()
        finally:
            server.stop()
    idle = results["idle"][0]
    print(f"{args.seconds:g} s per phase, {args.users} users")
    print(f"{'phase':<8} {'server CPU ms/s':>16} {'own CPU ms/s':>13} {'API req/s':>10}")
    for name, (srv, own, api) in results.items():
        s = args.seconds
        print(f"{name:<8} {srv / s * 1000:>16.2f} {own / s * 1000:>13.2f} {api / s:>10.1f}")
    simple, cache = results["simple"], results["cache"]
    naive = results["simple20"]
    print(
        f"cache / simple20: server CPU over idle"
        f" x{max(cache[0] - idle, 1e-9) / max(naive[0] - idle, 1e-9):.1f},"
        f" own CPU x{cache[1] / max(naive[1], 1e-9):.1f}"
    )
    server_ratio = max(cache[0] - idle, 1e-9) / max(simple[0] - idle, 1e-9)
    own_ratio = cache[1] / max(simple[1], 1e-9)
    api_ratio = cache[2] / max(simple[2], 1)
    print(
        f"cache / simple: server CPU over idle x{server_ratio:.1f},"
        f" own CPU x{own_ratio:.1f}, API requests x{api_ratio:.1f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
