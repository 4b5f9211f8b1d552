"""What `--record-dir` costs the event loop, against the decision core itself, in one run.

    .venv/bin/python -m bench.record_overhead [--requests 5000] [--xkey] [--dir DIR]

Requests are forged like nats-server's (tests/support/forge.py). Measured per request, in CPU
time of the calling thread (the event loop's, in the service):
  core          Authorizer.start, the record in memory (what the service does anyway: the
                baseline);
  record        Recorder.record: decode (and open the xkey box), redact, encode the line and
                queue it (what the service adds on the loop);
  sync append   the alternative: encode + one os.write per line, on the loop (page cache; a
                slow or stalled disk makes this unbounded, which is why it is not used);
and, wall clock, how fast the writer thread drains the queued lines to disk (lines/s).
`--dir` picks the disk (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import orjson

from bench.core_cpu import workload
from callout.recording.writer import Recorder, record_document


async def measure(args: argparse.Namespace, directory: Path) -> None:
    w = workload(args.requests, args.xkey)
    keys, forged, now = w.keys, w.forged, w.now
    start = time.thread_time()
    decisions = [w.authorize(f).decision for f in forged]
    core = (time.thread_time() - start) / args.requests

    xkeys = (keys.xkey,) if args.xkey else ()
    recorded = sync = float("inf")
    drain = 0.0
    line_bytes = 0.0
    # Best of three, alternating, so neither variant gets the warm caches alone.
    for run in range(3):
        # The whole run is queued before the loop gets a turn: room for all of it.
        target = directory / f"async{run}"
        recorder = Recorder(
            target, policy=w.authorizer.policy, max_bytes=64 << 20, max_pending=1 << 30
        )
        start = time.thread_time()
        for f, decision in zip(forged, decisions, strict=True):
            recorder.record(f.payload, f.headers, now, decision)
        recorded = min(recorded, (time.thread_time() - start) / args.requests)
        wall = time.perf_counter()
        await recorder.close()
        drain = max(drain, args.requests / (time.perf_counter() - wall))
        assert recorder.stats.recorded == args.requests, recorder.stats
        line_bytes = sum(p.stat().st_size for p in target.iterdir()) / args.requests

        fd = os.open(directory / f"sync{run}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        start = time.thread_time()
        for f, decision in zip(forged, decisions, strict=True):
            line = orjson.dumps(
                record_document(f.payload, f.headers, now, decision, xkeys),
                option=orjson.OPT_APPEND_NEWLINE,
            )
            os.write(fd, line)
        sync = min(sync, (time.thread_time() - start) / args.requests)
        os.close(fd)

    print(f"{args.requests} requests, xkey={args.xkey}, {line_bytes:.0f} bytes per line")
    print(f"  core (Authorizer.start)     {core * 1e6:8.1f} us CPU")
    print(f"  record (on the loop)        {recorded * 1e6:8.1f} us CPU  {recorded / core:6.1%}")
    print(f"  sync append (alternative)   {sync * 1e6:8.1f} us CPU  {sync / core:6.1%}")
    print(f"  writer thread drained       {drain:8.0f} lines/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--xkey", action="store_true")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        asyncio.run(measure(args, Path(tmp)))


if __name__ == "__main__":
    main()
