"""How long the users cache takes to load, and what it costs in memory per user.

    .venv/bin/python -m bench.cache_load [--users 100000]

Fills a real KV bucket on a fresh nats-server, then starts a WatchedStore and times the
initial load until it is live; memory is the traced allocation growth across the load
(tracemalloc), divided by the number of users.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import tracemalloc
from pathlib import Path

from bench.deploy import callout_server, make_keys, nats_connect, new_user, record, users_bucket
from callout.store.watch import WatchedStore


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--memory", action="store_true", help="trace memory (slows the load)")
    args = parser.parse_args()
    keys = make_keys()
    with tempfile.TemporaryDirectory() as tmp:
        server = callout_server(Path(tmp), keys).start()
        try:
            nc = await nats_connect(server.url, keys.service_seed)
            kv = await users_bucket(nc)
            pubs = [new_user()[1] for _ in range(args.users)]
            fill = time.monotonic()
            for i in range(0, len(pubs), 500):
                await asyncio.gather(
                    *(kv.put(p, record(p[:12], sub_allow=["_INBOX.>"])) for p in pubs[i : i + 500])
                )
            print(f"filled {len(pubs)} records in {time.monotonic() - fill:.1f}s")
            if args.memory:
                tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            store = WatchedStore(
                nc,
                "users",
                connect=lambda callbacks: nats_connect(server.url, keys.service_seed, **callbacks),
            )
            start = time.monotonic()
            store.start()
            await asyncio.wait_for(store.live_event.wait(), 600)
            elapsed = time.monotonic() - start
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            print(
                f"{store.size} users live in {elapsed:.2f}s ({store.size / elapsed:,.0f} users/s)"
            )
            if args.memory:
                print(f"{grown / store.size:.0f} bytes per user ({grown / 2**20:.1f} MiB traced)")
            await store.stop()
            await nc.close()
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
