"""Bad clients in a loop, in a process of their own (`python -m tests.support.badclients`), so
their CPU does not count against the latency a test measures for real clients in its own
event loop (it does count against the machine, as a real brute force would).

Two kinds, each connecting over and over until `--duration` is up:
- `--unknown N`: N clients sharing `--unknown-keys` keys that have no record (a misconfigured
  fleet: instances deployed with the same wrong key), each from its own address
  `--unknown-net`.1, .2, ...;
- `--bad-sig M`: M clients claiming the keys given with `--claim` (real users' keys) and
  signing the nonce with a key of their own (a brute force on those users), from
  `--bad-sig-from`.

The loops stop at `--duration` or as soon as stdin is closed, whichever comes first: a test
closes it when it has measured what it needs, so the measurement is always made while the
loops run.

Each connection comes from a loopback source address of its own choosing (127.0.0.0/8 is all
local on Linux), so nats-server reports that address as the client's host: that is how a test
gives bad clients and real clients different hosts on one machine. Prints one JSON line when
the loops start and one with the counts at the end; `admitted` must stay 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import threading
import time
from dataclasses import dataclass

import nkeys

from tests.support.nats import new_user


async def connect_from(
    port: int,
    source: str,
    seed: str,
    *,
    claim: str | None = None,
    bare: bool = False,
    timeout: float = 5.0,
) -> tuple[bool, float]:
    """One nkey CONNECT to 127.0.0.1:`port` from `source`; (admitted, seconds from CONNECT to
    the server's PONG or -ERR). `claim`: the key named in CONNECT, when not the signer's;
    `bare`: a CONNECT with no credentials at all (`seed` unused)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), timeout
    )
    try:
        info = json.loads((await asyncio.wait_for(reader.readline(), timeout))[5:])
        kp = nkeys.from_seed(seed.encode())
        sig = base64.urlsafe_b64encode(kp.sign(info["nonce"].encode())).rstrip(b"=").decode()
        connect = {"verbose": False, "pedantic": False, "protocol": 1, "lang": "badclients",
                   "nkey": claim or kp.public_key.decode(), "sig": sig}  # fmt: skip
        if bare:
            connect = {"verbose": False, "pedantic": False, "protocol": 1}
        start = time.monotonic()
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if line.startswith(b"PONG"):
                return True, time.monotonic() - start
            if line.startswith(b"-ERR") or not line:
                return False, time.monotonic() - start
    finally:
        writer.close()


@dataclass
class Counts:
    attempts: int = 0
    admitted: int = 0
    errors: int = 0


async def loop(port: int, source: str, seed: str, claim: str | None, until: float,
               stop: asyncio.Event, counts: Counts) -> None:  # fmt: skip
    while time.monotonic() < until and not stop.is_set():
        counts.attempts += 1
        try:
            admitted, _ = await connect_from(port, source, seed, claim=claim)
        except (OSError, TimeoutError, ValueError):
            counts.errors += 1
            continue
        counts.admitted += admitted


async def main(args: argparse.Namespace) -> None:
    until = time.monotonic() + args.duration
    counts = Counts()
    stop = asyncio.Event()
    loop_ = asyncio.get_running_loop()

    def wait_for_eof() -> None:
        sys.stdin.buffer.read()
        loop_.call_soon_threadsafe(stop.set)

    threading.Thread(target=wait_for_eof, daemon=True).start()
    unknown = [new_user()[0] for _ in range(args.unknown_keys or args.unknown)]
    claims = args.claim or [new_user()[1]]
    # (source address, signing seed, claimed key) of every client
    clients = [
        (f"{args.unknown_net}.{i + 1}", unknown[i % len(unknown)], None)
        for i in range(args.unknown)
    ]
    clients += [
        (args.bad_sig_from, new_user()[0], claims[i % len(claims)]) for i in range(args.bad_sig)
    ]
    loops = [
        loop(args.port, source, seed, claim, until, stop, counts) for source, seed, claim in clients
    ]
    print(json.dumps({"event": "started"}), flush=True)
    await asyncio.gather(*loops)
    print(json.dumps({"event": "done", **vars(counts)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--unknown", type=int, default=0)
    parser.add_argument("--unknown-keys", type=int, default=0)
    parser.add_argument("--unknown-net", default="127.0.1")
    parser.add_argument("--bad-sig", type=int, default=0)
    parser.add_argument("--bad-sig-from", default="127.0.0.2")
    parser.add_argument("--claim", action="append")
    asyncio.run(main(parser.parse_args(sys.argv[1:])))
