"""How long `callout users import-sqlite` takes for a large allowlist, and its peak memory.

    .venv/bin/python -m bench.import_sqlite [--rows 100000]

Generates an SQLite table of `--rows` users (the old control plane's shape: its own column
names, permissions as JSON in every third row), starts a fresh nats-server with JetStream, and
runs the CLI as a child process, reading its peak RSS from `os.wait4` (that child only).
The CLI is started by a small launcher process, not by this one: a child's ru_maxrss counts
the parent's pages it was forked with, and this process holds the generated keys.

- baseline, same run: the CLI's floor (`export` of an empty bucket: interpreter + imports),
  and the same records written straight with nats-py, 64 puts in flight, no checks at all;
- import-sqlite into an empty bucket, then again (all unchanged), and a dry run;
- export of the imported bucket.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.deploy import callout_cmd, callout_server, make_keys, nats_connect, new_user, seed_files
from callout import migrate


@dataclass
class Run:
    seconds: float
    max_rss_mib: float
    stdout: bytes
    stderr: bytes
    code: int


LAUNCHER = """
import os, subprocess, sys, time
start = time.monotonic()
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{time.monotonic() - start} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_child(args: list[str], out: Path) -> Run:
    """The CLI as a grandchild (see above); its wall time, peak RSS and exit status."""
    measured = out.with_suffix(".rusage")
    with open(out, "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
        subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(measured), *callout_cmd(*args)],
            stdout=stdout,
            stderr=stderr,
            check=True,
        )
    seconds, max_rss_kib, code = measured.read_text().split()
    return Run(
        float(seconds),
        int(max_rss_kib) / 1024,  # ru_maxrss is in KiB on Linux
        out.read_bytes(),
        out.with_suffix(".err").read_bytes(),
        int(code),
    )


def make_db(path: Path, pubs: list[str]) -> None:
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE allowlist (id INTEGER PRIMARY KEY, nkey TEXT, display_name TEXT,"
        " is_admin INTEGER, disabled INTEGER, perms TEXT, created_at TEXT)"
    )
    db.executemany(
        "INSERT INTO allowlist VALUES (?, ?, ?, ?, ?, ?, '2020-01-01')",
        (
            (
                i,
                pub.lower() if i % 2 else pub,
                f"user-{i}",
                int(i % 50 == 0),
                int(i % 7 == 0),
                orjson.dumps({"sub": {"allow": [f"svc{i}.>", "_INBOX.>"]}}).decode()
                if i % 3
                else None,
            )
            for i, pub in enumerate(pubs, 1)
        ),
    )
    db.commit()
    db.close()


async def raw_puts(url: str, seed: str, db_path: Path) -> float:
    """The floor for writing: the same records, plain puts, no reads, no checks."""
    source = migrate.SqliteSource(
        str(db_path),
        "allowlist",
        {
            "key": "nkey",
            "name": "display_name",
            "admin": "is_admin",
            "revoked": "disabled",
            "permissions": "perms",
        },
    )
    items = [row for row in source if isinstance(row, migrate.Item)]
    nc = await nats_connect(url, seed)
    kv = await nc.jetstream().create_key_value(bucket="baseline", history=5)
    shared = iter(items)

    async def worker() -> None:
        for item in shared:
            await kv.put(item.key, item.value)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(migrate.IN_FLIGHT)))
    elapsed = time.monotonic() - start
    await nc.close()
    return elapsed


def summary(run: Run) -> str:
    if run.code not in (0, 1):
        sys.exit(f"the CLI failed ({run.code}): {run.stderr.decode()[-2000:]}")
    doc = orjson.loads(run.stdout.splitlines()[-1])
    return ", ".join(f"{n} {doc[n]}" for n in migrate.COUNTS if doc[n])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    keys = make_keys()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        start = time.monotonic()
        pubs = [new_user()[1] for _ in range(args.rows)]
        db_path = tmp / "old.db"
        make_db(db_path, pubs)
        size = db_path.stat().st_size / 2**20
        print(
            f"{args.rows} rows in {db_path.name} ({size:.1f} MiB), {time.monotonic() - start:.1f}s"
        )
        server = callout_server(tmp / "server", keys).start()
        try:
            files = seed_files(keys, tmp / "keys")
            base = ["users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"])]
            flags = [
                "--table", "allowlist", "--key-column", "nkey", "--name-column", "display_name",
                "--admin-column", "is_admin", "--revoked-column", "disabled",
                "--permissions-column", "perms",
            ]  # fmt: skip
            raw = asyncio.run(raw_puts(server.url, keys.service_seed, db_path))
            run_child([*base, "--users-bucket", "empty", "import", "/dev/null"], tmp / "mk.out")
            floor = run_child([*base, "--users-bucket", "empty", "export"], tmp / "floor.out")
            first = run_child([*base, "import-sqlite", str(db_path), *flags], tmp / "first.out")
            first_summary = summary(first)
            again = run_child([*base, "import-sqlite", str(db_path), *flags], tmp / "again.out")
            again_summary = summary(again)
            dry = run_child(
                [
                    *base,
                    "--users-bucket",
                    "dry",
                    "import-sqlite",
                    str(db_path),
                    *flags,
                    "--dry-run",
                ],
                tmp / "dry.out",
            )
            dry_summary = summary(dry)
            export = run_child([*base, "export"], tmp / "export.out")
            exported = len(export.stdout.splitlines())
        finally:
            server.stop()
    print(f"baseline: nats-py puts, {migrate.IN_FLIGHT} in flight: {raw:.2f}s")
    print(f"baseline: CLI floor (export of an empty bucket): {floor.max_rss_mib:.0f} MiB peak")
    print(f"{'run':<28}{'seconds':>9}{'rows/s':>10}{'x puts':>8}{'peak MiB':>10}  result")
    for name, run, result in (
        ("import-sqlite (empty)", first, first_summary),
        ("import-sqlite (again)", again, again_summary),
        ("import-sqlite --dry-run", dry, dry_summary),
        ("export", export, f"{exported} lines"),
    ):
        print(
            f"{name:<28}{run.seconds:>9.2f}{args.rows / run.seconds:>10,.0f}"
            f"{run.seconds / raw:>8.2f}{run.max_rss_mib:>10.0f}  {result}"
        )


if __name__ == "__main__":
    main()
