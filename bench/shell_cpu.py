"""CPU per authorization of the service's whole callback path, against the naive callout's,
in one process, with no network: what each feature costs, beside the simple thing.

    .venv/bin/python -m bench.shell_cpu [--chunk 250] [--rounds 40] [--xkey]
    .venv/bin/python -m bench.shell_cpu --instructions [--chunk 200]   # needs valgrind

Requests are forged like nats-server's (tests/support/forge.py), 50 clients with one record
each. Every variant gets the same prebuilt messages on a connection that only counts what is
published (so nats-py's parsing and socket writes, the same for both, are left out) and is
timed in CPU time of this process. The variants take turns on short rounds of `--chunk`
requests (a fresh instance each), `--rounds` times, and the best round counts: other work on
the machine only ever adds time, and a short round is more likely to miss it.

  naive           bench/naive.py's callback (`Naive.on_message`);
  core            `Authorizer.start` alone, the record in memory;
  callout         `CalloutService._on_message` as `callout serve` runs it by default: the
                  users cache answering from memory, the replay record, the limiter, the
                  decision log line (JSON, to /dev/null) and the observers that
                  `observability.start` installs (metrics, service discovery, server verdicts);
  -log            the same with --log-decisions none;
  -observers      the same without the observers;
  -log-observers  neither.

`--instructions` counts instead of timing: each variant runs in a process of its own under
valgrind's cachegrind, once with `--chunk` requests and once with none, and the difference in
instructions executed, divided by `--chunk`, is its cost per request. Slow (minutes), but
exact and the same on a busy machine as on an idle one: what to compare variants by when
the machine is shared. (Instructions are not time: cache misses and libsodium's vector code
weigh differently; the timed figures say how much.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import nkeys
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.core_cpu import Workload, workload
from bench.naive import Naive
from callout import log
from callout.decision import Authorizer
from callout.discovery import Discovery
from callout.metrics import Metrics
from callout.service import SUBJECT, CalloutService
from callout.store.memory import MemoryStore
from callout.verdicts import Verdicts


class CountingNC:
    """Stands in for the nats-py Client: counts publishes."""

    def __init__(self) -> None:
        self.published = 0

    async def publish(self, subject: str, payload: bytes = b"", **_: Any) -> None:
        self.published += 1


def messages(w: Workload, nc: CountingNC) -> list[Msg]:
    client = cast(Client, nc)
    return [
        Msg(_client=client, subject=SUBJECT, reply=f"$SYS._INBOX.bench.{i:08d}",
            data=f.payload, headers=f.headers)
        for i, f in enumerate(w.forged)
    ]  # fmt: skip


def service(w: Workload, nc: CountingNC, *, logs: bool, observers: bool) -> CalloutService:
    store = MemoryStore(records={f.client.public: w.record for f in w.forged})
    svc = CalloutService(
        cast(Client, nc),
        Authorizer(w.authorizer.policy),
        store,
        log_decisions="all" if logs else "none",
    )
    if observers:
        metrics = Metrics()
        svc.observers += [
            metrics.observe,
            Discovery(cast(Client, nc), svc).observe,
            Verdicts(cast(Client, nc), metrics).observe,
        ]
    return svc


Variant = Callable[[], Awaitable[None]]


def variants(w: Workload, xkey: bool) -> dict[str, Callable[[], Variant]]:
    """name -> a fresh run (a new replay record each time: the same requests are replayed)."""

    def naive() -> Variant:
        issuer = nkeys.from_seed(w.keys.issuer_seed.encode())
        callout = Naive(issuer, "APP", {f.client.public for f in w.forged})
        msgs = messages(w, CountingNC())

        async def run() -> None:
            for m in msgs:
                await callout.on_message(m)

        return run

    def core() -> Variant:
        authorizer = Authorizer(w.authorizer.policy)
        start, now, lookup = authorizer.start, w.now, w.lookup

        async def run() -> None:
            for f in w.forged:
                start(f.payload, f.headers, now, lookup)

        return run

    def shell(logs: bool, observers: bool) -> Callable[[], Variant]:
        def make() -> Variant:
            nc = CountingNC()
            svc = service(w, nc, logs=logs, observers=observers)
            msgs = messages(w, nc)
            svc.clock = lambda: w.now  # the forged requests' clock

            async def run() -> None:
                for m in msgs:
                    await svc._on_message(m)
                assert nc.published == len(msgs) and svc.stats.admitted == len(msgs)

            return run

        return make

    chosen: dict[str, Callable[[], Variant]] = {}
    if not xkey:  # the naive callout has no xkey
        chosen["naive"] = naive
    chosen |= {
        "core": core,
        "callout": shell(True, True),
        "callout-log": shell(False, True),
        "callout-observers": shell(True, False),
        "callout-log-observers": shell(False, False),
    }
    return chosen


async def measure(args: argparse.Namespace) -> None:
    w = workload(args.chunk, args.xkey)
    runs = variants(w, args.xkey)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for name, make in runs.items():
            run = make()
            start = time.process_time()
            await run()
            # Decision lines written at the end of the loop turn are part of the cost.
            await asyncio.sleep(0)
            best[name] = min(best[name], (time.process_time() - start) / args.chunk)
    base = best.get("naive")
    print(f"{args.rounds} rounds of {args.chunk} requests, xkey={args.xkey}, best round:")
    for name, cost in best.items():
        ratio = f"  {cost / base:5.2f}x naive" if base else ""
        print(f"  {name:22} {cost * 1e6:7.1f} us CPU{ratio}")


async def run_one(args: argparse.Namespace) -> None:
    """One variant, `--count` of its requests (0: only the set-up), for --instructions."""
    w = workload(args.chunk, args.xkey)
    run = variants(w, args.xkey)[args.variant]()
    if args.count:
        await run()
        await asyncio.sleep(0)


def instructions(variant: str, count: int, args: argparse.Namespace) -> int:
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
           sys.executable, "-m", "bench.shell_cpu", "--variant", variant, "--count", str(count),
           "--chunk", str(args.chunk)] + (["--xkey"] if args.xkey else [])  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    match = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if match is None:
        raise SystemExit(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def count_instructions(args: argparse.Namespace) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind on PATH")
    names = list(variants(workload(1, args.xkey), args.xkey))
    cost = {}
    for name in names:
        base = instructions(name, 0, args)
        cost[name] = (instructions(name, args.chunk, args) - base) / args.chunk
        print(f"  {name:22} {cost[name] / 1e3:8.1f} k instructions", flush=True)
    if "naive" in cost:
        print("ratios: " + ", ".join(f"{n} {c / cost['naive']:.3f}x" for n, c in cost.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunk", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--xkey", action="store_true")
    parser.add_argument("--instructions", action="store_true", help="count (valgrind)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one run, for --instructions
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--log-file", default=os.devnull, help="where decision lines go")
    args = parser.parse_args()
    if args.instructions:
        print(f"instructions per request ({args.chunk} requests, xkey={args.xkey}):")
        count_instructions(args)
        return
    with open(args.log_file, "w") as out:
        log.setup("info", "json")
        handler = log._HANDLER
        assert handler is not None
        handler.setStream(out)
        try:
            import uvloop  # the service's default event loop

            uvloop.run(run_one(args) if args.variant else measure(args))
        finally:
            handler.setStream(sys.stderr)


if __name__ == "__main__":
    main()
