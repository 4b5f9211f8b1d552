"""A connect-storm load generator that speaks the NATS client protocol itself.

    .venv/bin/python -m bench.loadgen --url nats://127.0.0.1:4222 --seed-file seeds.txt \
        [--connects 2000] [--concurrency 50] [--timeout 10]
    .venv/bin/python -m bench.loadgen --cross-check [--connects 300]

One connect is: open TCP, read INFO, sign its nonce with the user's ed25519 key, send
CONNECT + PING in one write, wait for PONG (admitted), -ERR or EOF (denied), or the timeout;
then close. Latency runs from before the TCP open to that answer: what a connecting client
waits for. `--concurrency` connects are in flight at once until `--connects` are done.

Everything per user is computed once (the 64-byte ed25519 secret, the CONNECT bytes up to the
signature), the nonce is cut out of INFO without a JSON parse and the signature comes
straight from libsodium, so a connect costs the client one signature and a few small
allocations: the client must not be what limits the figures.

`--cross-check` starts its own no-callout nats-server, connects the same users with this
generator and with nats-py (allowed users and unknown ones, at concurrency 1) and checks that
both count the same admits, and shows both p50s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
import nkeys

ADMITTED = 0
DENIED = 1  # -ERR (e.g. 'Authorization Violation', also the server's callout timeout) or EOF
TIMEOUT = 2  # no answer within the client's timeout
ERROR = 3  # the connection failed before an answer (refused, reset, no nonce in INFO)
OUTCOMES = ("admitted", "denied", "timeout", "error")

LAG_PROBE = 0.02  # seconds between event-loop lag probes

_NONCE = b'"nonce":"'
_CONNECT_TAIL = b'"}\r\nPING\r\n'


@dataclass(frozen=True, slots=True)
class Identity:
    """One user, ready to sign: the secret key and the CONNECT bytes before the signature."""

    public: str
    secret: bytes  # libsodium's 64-byte ed25519 secret key (seed + public)
    connect_head: bytes

    @classmethod
    def from_seed(cls, seed: str) -> Identity:
        kp = nkeys.from_seed(seed.encode("ascii"))
        public = kp.public_key.decode("ascii")
        raw_seed = nkeys.decode_seed(seed.encode("ascii"))[1]
        _, secret = nacl.bindings.crypto_sign_seed_keypair(raw_seed)
        head = (
            'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"lang":"bench",'
            f'"version":"0","nkey":"{public}","sig":"'
        ).encode("ascii")
        return cls(public, secret, head)

    def connect_bytes(self, nonce: bytes) -> bytes:
        # crypto_sign returns signature + message; Go clients send the raw URL base64 form.
        sig = nacl.bindings.crypto_sign(nonce, self.secret)[:64]
        return self.connect_head + base64.urlsafe_b64encode(sig).rstrip(b"=") + _CONNECT_TAIL


def identities(seeds: Sequence[str]) -> list[Identity]:
    return [Identity.from_seed(s) for s in seeds]


def parse_url(url: str) -> tuple[str, int]:
    if not url.startswith("nats://"):
        raise ValueError(f"expected nats://host:port, got {url!r}")
    host, _, port = url[len("nats://") :].rsplit("@", 1)[-1].rpartition(":")
    return host, int(port)


async def connect_once(
    host: str, port: int, ident: Identity, per_connect: float, errors: Counter[str] | None = None
) -> tuple[int, float]:
    """One connect; returns ``(outcome, seconds)``. Deny texts are counted in ``errors``."""
    start = time.perf_counter()
    writer: asyncio.StreamWriter | None = None
    outcome = ERROR
    try:
        async with asyncio.timeout(per_connect):
            reader, writer = await asyncio.open_connection(host, port)
            info = await reader.readline()
            at = info.find(_NONCE)
            if at < 0:
                if errors is not None:
                    errors["no nonce in INFO" if info else "closed before INFO"] += 1
                return ERROR, time.perf_counter() - start
            at += len(_NONCE)
            writer.write(ident.connect_bytes(info[at : info.index(b'"', at)]))
            while True:
                line = await reader.readline()
                if line.startswith(b"PONG"):
                    outcome = ADMITTED
                    break
                if not line or line.startswith(b"-ERR"):
                    outcome = DENIED
                    if errors is not None:
                        errors[line[5:].strip().strip(b"'").decode() if line else "EOF"] += 1
                    break
                if line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                # INFO updates and +OK: keep reading
    except TimeoutError:
        outcome = TIMEOUT
    except (OSError, ValueError) as exc:  # ValueError: INFO without a closing quote
        outcome = ERROR
        if errors is not None:
            errors[type(exc).__name__] += 1
    finally:
        elapsed = time.perf_counter() - start
        if writer is not None:
            writer.close()
    return outcome, elapsed


@dataclass
class Result:
    """One run: per-connect latency and outcome (index = connect number), wall and CPU time."""

    connects: int
    concurrency: int
    latencies: list[float]
    outcomes: bytearray
    wall: float
    cpu: float  # this process, user + system seconds
    errors: Counter[str] = field(default_factory=Counter)
    loop_lag_p99: float = 0.0  # seconds; see `loop_lag`

    def count(self, outcome: int) -> int:
        return self.outcomes.count(outcome)

    @property
    def admitted(self) -> int:
        return self.count(ADMITTED)

    @property
    def not_admitted(self) -> int:
        return self.connects - self.admitted

    @property
    def rate(self) -> float:
        return self.connects / self.wall if self.wall > 0 else 0.0

    def pct(self, q: float) -> float:
        return percentile(self.latencies, q)

    def summary(self) -> dict[str, object]:
        return {
            "connects": self.connects,
            "concurrency": self.concurrency,
            "conn_per_s": round(self.rate, 1),
            "p50_ms": round(self.pct(0.50) * 1e3, 3),
            "p90_ms": round(self.pct(0.90) * 1e3, 3),
            "p99_ms": round(self.pct(0.99) * 1e3, 3),
            **{name: self.count(i) for i, name in enumerate(OUTCOMES)},
            "client_cpu_ms_per_conn": round(self.cpu * 1e3 / max(1, self.connects), 4),
            "client_lag_p99_ms": round(self.loop_lag_p99 * 1e3, 1),
            "errors": dict(self.errors),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure is a latency someone saw)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def run(
    url: str,
    users: Sequence[Identity],
    connects: int,
    concurrency: int,
    per_connect: float = 10.0,
) -> Result:
    """``connects`` connects, ``concurrency`` at a time, cycling through ``users``."""
    host, port = parse_url(url)
    latencies = [0.0] * connects
    outcomes = bytearray(connects)
    errors: Counter[str] = Counter()
    todo = iter(range(connects))  # shared by the workers: each index is taken once
    n = len(users)

    async def worker() -> None:
        for i in todo:
            ident = users[i % n]
            outcomes[i], latencies[i] = await connect_once(host, port, ident, per_connect, errors)

    lags: list[float] = []
    probe = asyncio.create_task(loop_lag(lags))
    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, connects))))
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    probe.cancel()
    result = Result(connects, concurrency, latencies, outcomes, wall, cpu, errors)
    result.loop_lag_p99 = percentile(lags, 0.99) if lags else 0.0
    return result


async def loop_lag(lags: list[float], every: float = LAG_PROBE) -> None:
    """How late this event loop wakes a sleeper. When it lags, the client itself delays
    every step of every connect (a CONNECT sent late can even earn the server's
    'Authentication Timeout'): the figures then measure the client, not the server."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(every)
        lags.append(time.perf_counter() - start - every)


# ---------------------------------------------------------------------------------------------
# nats-py, for the cross-check only
# ---------------------------------------------------------------------------------------------


async def natspy_once(url: str, seed: str, per_connect: float) -> tuple[int, float]:
    import nats
    import nats.errors

    async def quiet(exc: Exception) -> None:
        return None

    start = time.perf_counter()
    try:
        nc = await nats.connect(
            url,
            nkeys_seed_str=seed,
            connect_timeout=per_connect,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=quiet,
        )
    except (TimeoutError, nats.errors.TimeoutError):
        return TIMEOUT, time.perf_counter() - start
    except nats.errors.NoServersError:
        return ERROR, time.perf_counter() - start
    except Exception as exc:
        if "authorization violation" in str(exc).lower():
            return DENIED, time.perf_counter() - start
        return ERROR, time.perf_counter() - start
    elapsed = time.perf_counter() - start
    await nc.close()
    return ADMITTED, elapsed


async def run_natspy(url: str, seeds: Sequence[str], connects: int, per_connect: float) -> Result:
    """Sequential nats-py connects (concurrency 1), same accounting as ``run``."""
    latencies = [0.0] * connects
    outcomes = bytearray(connects)
    cpu0, t0 = _cpu(), time.perf_counter()
    for i in range(connects):
        outcomes[i], latencies[i] = await natspy_once(url, seeds[i % len(seeds)], per_connect)
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    return Result(connects, 1, latencies, outcomes, wall, cpu)


def limit_config(port: int, users: Sequence[str], extra: str = "") -> str:
    """No-callout server: the users as static nkey users of APP (the LIMIT scenario)."""
    nkeys_ = ", ".join(f'{{ nkey: "{u}" }}' for u in users)
    return f'listen: "127.0.0.1:{port}"\naccounts {{ APP {{ users: [ {nkeys_} ] }} }}\n{extra}'


async def cross_check(connects: int, per_connect: float) -> int:
    from bench.deploy import new_user
    from callout.nats_server import NatsServer, free_port

    allowed = [new_user() for _ in range(10)]
    unknown = [new_user() for _ in range(5)]
    # Every third connect is an unknown user, so "agree on admits" also means "agree on denies".
    seeds = [s for pair in zip(allowed[:5], allowed[5:], unknown, strict=True) for s, _ in pair]
    expected = sum(1 for i in range(connects) if i % 3 != 2)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = limit_config(port, [p for _, p in allowed])
        with NatsServer(config, port=port, workdir=Path(tmp)) as server:
            ours = await run(server.url, identities(seeds), connects, 1, per_connect)
            theirs = await run_natspy(server.url, seeds, connects, per_connect)
    print(f"cross-check: {connects} connects at c=1 on a no-callout server, {expected} allowed")
    print(f"{'client':8} {'admitted':>9} {'denied':>7} {'other':>6} {'p50 ms':>8} {'p90 ms':>8}")
    for name, r in (("loadgen", ours), ("nats-py", theirs)):
        other = r.count(TIMEOUT) + r.count(ERROR)
        print(
            f"{name:8} {r.admitted:9} {r.count(DENIED):7} {other:6}"
            f" {r.pct(0.5) * 1e3:8.3f} {r.pct(0.9) * 1e3:8.3f}"
        )
    ratio = theirs.pct(0.5) / ours.pct(0.5)
    print(f"nats-py p50 / loadgen p50 = {ratio:.2f}")
    agree = ours.admitted == theirs.admitted == expected
    print("admitted counts agree" if agree else "MISMATCH in admitted counts")
    return 0 if agree else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", help="nats://host:port (not with --cross-check)")
    p.add_argument("--seed-file", type=Path, help="user seeds (SU...), one a line")
    p.add_argument("--connects", type=int, default=None, help="default 2000 (300 cross-check)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10.0, help="per connect, seconds")
    p.add_argument("--cross-check", action="store_true", help="compare with nats-py, then exit")
    args = p.parse_args(argv)
    if args.cross_check:
        return asyncio.run(cross_check(args.connects or 300, args.timeout))
    if not args.url or not args.seed_file:
        p.error("--url and --seed-file are required (or --cross-check)")
    seeds = [ln.strip() for ln in args.seed_file.read_text().splitlines() if ln.strip()]
    result = asyncio.run(
        run(args.url, identities(seeds), args.connects or 2000, args.concurrency, args.timeout)
    )
    print(" ".join(f"{k}={v}" for k, v in result.summary().items()))
    return 0 if result.not_admitted == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
