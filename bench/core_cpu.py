"""CPU cost of the sans-I/O core per authorization (`Authorizer.start` with the record in
memory: open, decide and respond), no I/O.

    .venv/bin/python -m bench.core_cpu [--requests 5000] [--xkey] [--profile]

Requests are forged like nats-server's (tests/support/forge.py) with one record per client.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from dataclasses import dataclass

from bench.deploy import Keys, make_keys, policy, record
from callout.decision import Answer, Authorizer
from tests.support.forge import ClientKey, Forged, ServerIdentity, forge_request


@dataclass
class Workload:
    """`requests` forged requests from 50 clients, the authorizer that opens them, and the
    store's record for each (one record, read from memory): what `bench.record_overhead`
    measures against too."""

    keys: Keys
    authorizer: Authorizer
    forged: list[Forged]
    record: bytes
    now: float

    def lookup(self, key: str) -> bytes:
        return self.record

    def authorize(self, forged: Forged) -> Answer:
        answer = self.authorizer.start(forged.payload, forged.headers, self.now, self.lookup)
        assert isinstance(answer, Answer) and answer.decision.admit, answer
        return answer


def workload(requests: int, xkey: bool) -> Workload:
    keys = make_keys()
    server = ServerIdentity.generate()
    clients = [ClientKey.generate() for _ in range(50)]
    now = time.time()
    seal = keys.xkey_pub if xkey else None
    forged = [
        forge_request(server, keys.issuer_pub, now=now, client=clients[i % 50], seal_to=seal)
        for i in range(requests)
    ]
    authorizer = Authorizer(policy(keys, xkey=xkey))
    stored = record("bench", pub_allow=["a.>"], sub_allow=["_INBOX.>"])
    return Workload(keys, authorizer, forged, stored, now)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--xkey", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    w = workload(args.requests, args.xkey)

    def run() -> None:
        for f in w.forged:
            w.authorize(f)

    profiler = cProfile.Profile() if args.profile else None
    start = time.process_time()
    if profiler:
        profiler.runcall(run)
    else:
        run()
    cpu = time.process_time() - start
    print(
        f"{args.requests} authorizations, xkey={args.xkey}:"
        f" {cpu / args.requests * 1e3:.3f} ms CPU each"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
