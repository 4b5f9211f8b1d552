"""CPU cost of the sans-I/O core per authorization (open + decide + respond), no I/O.

    .venv/bin/python -m bench.core_cpu [--requests 5000] [--xkey] [--profile]

Requests are forged like nats-server's (tests/unit/forge.py) with one record per client.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from callout.decision import Authorizer, Found, Request
from tests.harness import make_keys
from tests.service import policy_for, record
from tests.unit.forge import ClientKey, ServerIdentity, forge_request


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--xkey", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    keys = make_keys()
    server = ServerIdentity.generate()
    clients = [ClientKey.generate() for _ in range(50)]
    now = time.time()
    seal = keys.xkey_pub if args.xkey else None
    forged = [
        forge_request(server, keys.issuer_pub, now=now, client=clients[i % 50], seal_to=seal)
        for i in range(args.requests)
    ]
    authorizer = Authorizer(policy_for(keys, xkey=args.xkey))
    answer = Found(record("bench", pub_allow=["a.>"], sub_allow=["_INBOX.>"]))

    def run() -> None:
        for f in forged:
            opened = authorizer.open(f.payload, f.headers, now)
            assert isinstance(opened, Request), opened
            authorizer.respond(authorizer.decide(opened, answer), now)

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
