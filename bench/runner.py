"""Connect throughput, latency and CPU through the callout, against the no-callout limit.

    .venv/bin/python -m bench.runner                      # the full run, a few minutes
    .venv/bin/python -m bench.runner --quick              # smoke run, under a minute
    .venv/bin/python -m bench.runner --scenarios LIMIT,plain --service-args='--max-inflight 64'
    .venv/bin/python -m bench.runner --json out.json --profile-service /tmp/svc.prof
    .venv/bin/python -m bench.runner --py-spy /tmp/svc.spy        # py-spy on each service

One run starts one fresh nats-server per scenario, all on loopback:
  LIMIT  the same users as static nkey users in the server config: no callout at all;
  naive  bench/naive.py: a hand-written nats-py callout with the users in a set, no features;
  plain  `python -m callout serve` (a subprocess, default flags: the users cache, the replay
         record, the limiter and the decision log line on; --metrics-addr set) with the users
         in a real KV bucket;
  xkey   the same with xkey encryption on;
  naive-uvloop  (only when asked for) the naive callout under uvloop;
  plain-nolog   (only when asked for) plain with --log-decisions none;
  plain-asyncio (only when asked for) plain with --event-loop asyncio.
Load comes from bench.loadgen (hand-rolled client protocol, one process, asyncio).

Phases: at concurrency 1 (latency) and 50 (throughput), --connects connects each, repeated
--repeats times, interleaved (LIMIT, naive, plain, xkey, LIMIT, ...) so drift hits every scenario
alike; the table shows medians. Then a storm per scenario: --storm-connects at
--storm-concurrency. Every user is allowed, so any connect not admitted counts as an allowed
user denied. CPU per connection is the /proc/<pid>/stat utime+stime delta of the server and
the service (after they go quiet, so work left over from a phase is counted in it) and this
process's own os.times(), divided by the phase's connects. A phase disturbed by other work
on the machine (over 10 % of the CPUs) is run again, up to --busy-retries times.
bench/README.md explains every column and records the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import pstats
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import deploy
from bench.loadgen import ADMITTED, Identity, Result, connect_once, identities, limit_config
from bench.loadgen import run as load
from callout.nats_server import NatsServer, free_port

SCENARIOS = ("LIMIT", "naive", "plain", "xkey")
# Not in the default run: the naive callout under uvloop (how much of the lead is the loop's),
# plain without its decision log line (what the line costs) and plain under asyncio.
EXTRA_SCENARIOS = ("naive-uvloop", "plain-nolog", "plain-asyncio")
REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPUS = os.cpu_count() or 1
READY_TIMEOUT = 30.0
WARMUP = 200
QUIET_PCT = 10.0  # background CPU (% of the machine) above which a phase is flagged

# The service's targets: ratios to LIMIT measured in the same run, CPU per authorization, the storm.
TARGET_RATE_C50 = 0.40
TARGET_P50_C1 = 2.3
TARGET_SERVICE_MS = {"plain": 0.20, "xkey": 0.25}
TARGET_STORM_P99_S = 1.5


def proc_cpu(pid: int | None, user: bool = True, system: bool = True) -> float:
    """utime + stime of a live process (all its threads), in seconds; or either alone."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) * user + int(fields[12]) * system) / CLK_TCK


def machine_busy() -> float:
    """Non-idle CPU seconds of the whole machine, all CPUs (steal counts: a neighbour's use)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Scenario:
    name: str
    server: NatsServer
    service: subprocess.Popen[bytes] | None = None
    service_log: Path | None = None
    profile: Path | None = None
    spy: subprocess.Popen[bytes] | None = None
    spy_out: Path | None = None

    @property
    def service_pid(self) -> int | None:
        return self.service.pid if self.service is not None else None

    def cpu(self) -> tuple[float, float]:
        return proc_cpu(self.server.pid), proc_cpu(self.service_pid)

    def service_tail(self) -> str:
        """The service's last 20 lines that are not routine (decision lines, info)."""
        if self.service_log is None or not self.service_log.exists():
            return ""
        lines = [
            line
            for line in self.service_log.read_text(errors="replace").splitlines()
            if not line.startswith("{") or '"level":"info"' not in line
        ]
        return "\n".join(lines[-20:])

    def log_size(self) -> int:
        return self.service_log.stat().st_size if self.service_log is not None else 0

    def decisions_since(self, offset: int) -> dict[str, int] | None:
        """The service's decision lines written since `offset`, counted by outcome and reason
        ("deny store_timeout": 12): what the callout did with the phase's requests. Of the
        connects not admitted, those it admitted or never answered (or answered too late)
        ended at the server's 2 s timeout. None for a service without decision lines."""
        if self.service_log is None or self.name.startswith("naive"):
            return None
        counts: Counter[str] = Counter()
        with self.service_log.open("rb") as log:
            log.seek(offset)
            for line in log:
                if b'"event":"decision"' in line:
                    doc = json.loads(line)
                    counts[f"{doc['decision']} {doc['reason']}"] += 1
        return dict(counts.most_common())

    def check_alive(self) -> None:
        if not self.server.is_running():
            raise SystemExit(f"{self.name}: nats-server died")
        if self.service is not None and self.service.poll() is not None:
            raise SystemExit(
                f"{self.name}: the service exited ({self.service.returncode}):\n"
                + self.service_tail()
            )

    def stop(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.terminate()
            try:
                self.service.wait(30)  # a profiled service writes its profile on the way out
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()
        if self.spy is not None:
            try:
                self.spy.wait(30)  # py-spy writes its samples once the service has exited
            except subprocess.TimeoutExpired:
                self.spy.kill()
        self.server.stop()


@dataclass
class Options:
    connects: int
    repeats: int
    concurrencies: tuple[int, ...]
    storm_connects: int
    storm_concurrency: int
    users: int
    timeout: float
    scenarios: tuple[str, ...]
    service_args: list[str]
    service_src: Path
    service_rev: str | None
    profile: Path | None
    spy: Path | None
    json: Path | None
    quiet_wait: float
    keep: Path | None
    busy_retries: int


async def seed_bucket(url: str, keys: deploy.Keys, pubs: Sequence[str]) -> None:
    admin = await deploy.nats_connect(url, keys.service_seed)
    try:
        kv = await deploy.users_bucket(admin)
        for at in range(0, len(pubs), 200):
            chunk = pubs[at : at + 200]
            await asyncio.gather(
                *(kv.put(p, deploy.record(f"bench{at + i}")) for i, p in enumerate(chunk))
            )
    finally:
        await admin.close()


async def wait_admitted(scenario: Scenario, ident: Identity) -> None:
    """The service logs "ready" at info only; at warning, a known user getting in is the signal."""
    host, port = scenario.server.url[len("nats://") :].rsplit(":", 1)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        scenario.check_alive()
        outcome, _ = await connect_once(host, int(port), ident, 5.0)
        if outcome == ADMITTED:
            return
        if time.monotonic() > deadline:
            raise SystemExit(
                f"{scenario.name}: no admit within {READY_TIMEOUT}s\n{scenario.service_tail()}"
            )
        await asyncio.sleep(0.05)  # polling with a deadline: the service gives no other signal


def spawn_service(cmd: list[str], src: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        # `python -m` puts the working directory first on sys.path: `src` picks the code.
        return subprocess.Popen(cmd, cwd=src, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


async def start_scenario(
    name: str,
    workdir: Path,
    keys: deploy.Keys,
    pubs: Sequence[str],
    ids: Sequence[Identity],
    o: Options,
) -> Scenario:
    workdir = workdir / name
    if name == "LIMIT":
        port = free_port()
        server = NatsServer(limit_config(port, pubs), port=port, workdir=workdir)
        scenario = Scenario(name, await asyncio.to_thread(server.start))
    else:
        xkey = name == "xkey"
        server = await asyncio.to_thread(deploy.callout_server(workdir, keys, xkey=xkey).start)
        scenario = Scenario(name, server)
        files = deploy.seed_files(keys, workdir / "keys")
        cmd = [sys.executable]
        if o.profile is not None:
            scenario.profile = o.profile.with_name(f"{o.profile.stem}.{name}{o.profile.suffix}")
            cmd += ["-m", "cProfile", "-o", str(scenario.profile)]
        scenario.service_log = workdir / "service.log"
        if name.startswith("naive"):
            # The simple thing, from this checkout whatever --service-src says: its allowed
            # users are the same keys, in its in-memory set.
            users = workdir / "users.txt"
            users.write_text("\n".join(pubs) + "\n")
            cmd += ["-m", "bench.naive", "--url", server.url,
                    "--nkey-seed-file", str(files["service"]),
                    "--issuer-seed-file", str(files["issuer"]),
                    "--users-file", str(users)]  # fmt: skip
            if name == "naive-uvloop":
                cmd.append("--uvloop")
            scenario.service = spawn_service(cmd, REPO, scenario.service_log)
        else:
            await seed_bucket(server.url, keys, pubs)
            # Default flags, so every default feature is on (the decision log line
            # included), and metrics served as an operator would.
            cmd += ["-m", "callout", *deploy.serve_args(server, files, xkey=xkey)]
            cmd += ["--metrics-addr", f"127.0.0.1:{free_port()}", *o.service_args]
            if name == "plain-nolog":
                cmd += ["--log-decisions", "none"]
            elif name == "plain-asyncio":
                cmd += ["--event-loop", "asyncio"]
            scenario.service = spawn_service(cmd, o.service_src, scenario.service_log)
        if o.spy is not None:
            scenario.spy_out = o.spy.with_name(f"{o.spy.name}.{name}.txt")
            scenario.spy = start_spy(scenario.service.pid, scenario.spy_out)
    await wait_admitted(scenario, ids[0])
    warm = await load(server.url, ids, min(WARMUP, o.connects), 10, o.timeout)
    if warm.not_admitted:
        print(f"warning: {name}: {warm.not_admitted} of the warm-up connects not admitted")
    return scenario


async def settle(scenario: Scenario, limit: float = 10.0) -> None:
    """Wait until the server and the service stop using CPU (leftovers of the last phase)."""
    deadline = time.monotonic() + limit
    before = sum(scenario.cpu())
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = sum(scenario.cpu())
        if now - before <= 1.5 / CLK_TCK:  # at most a clock tick of background work
            return
        before = now


async def wait_quiet(scenarios: Sequence[Scenario], limit: float) -> float:
    """Wait (at most `limit` s) until the machine is nearly idle; returns the last background %.

    Other work on the box (a test suite, another benchmark) competes with the server, the
    service and the client for the same CPUs and makes the figures meaningless.
    """
    deadline = time.monotonic() + limit
    while True:
        busy0, t0 = machine_busy(), time.perf_counter()
        ours0 = own_cpu() + sum(sum(s.cpu()) for s in scenarios)
        await asyncio.sleep(0.5)
        ours = own_cpu() + sum(sum(s.cpu()) for s in scenarios) - ours0
        pct = 100 * max(0.0, machine_busy() - busy0 - ours) / ((time.perf_counter() - t0) * CPUS)
        if pct <= QUIET_PCT or time.monotonic() > deadline:
            return pct


async def phase(
    scenario: Scenario,
    everyone: Sequence[Scenario],
    ids: Sequence[Identity],
    kind: str,
    connects: int,
    conc: int,
    o: Options,
) -> dict[str, Any]:
    scenario.check_alive()
    await settle(scenario)
    await wait_quiet(everyone, o.quiet_wait)
    logged = scenario.log_size()
    kernel0 = proc_cpu(scenario.service_pid, user=False)
    server0, service0 = scenario.cpu()
    busy0, own0, t0 = machine_busy(), own_cpu(), time.perf_counter()
    result: Result = await load(scenario.server.url, ids, connects, conc, o.timeout)
    await settle(scenario)
    server1, service1 = scenario.cpu()
    busy1, own1, t1 = machine_busy(), own_cpu(), time.perf_counter()
    ours = (server1 - server0) + (service1 - service0) + (own1 - own0)
    per = 1e3 / connects
    row: dict[str, Any] = {"scenario": scenario.name, "kind": kind, **result.summary()}
    row["not_admitted"] = result.not_admitted
    row["server_cpu_ms_per_conn"] = round((server1 - server0) * per, 4)
    row["service_cpu_ms_per_conn"] = (
        round((service1 - service0) * per, 4) if scenario.service else None
    )
    # The kernel's part of the service's CPU: its socket reads and writes (on loopback, the
    # TCP work of both ends of a write is charged to the writer) and its log writes.
    kernel = proc_cpu(scenario.service_pid, user=False) - kernel0
    row["service_kernel_ms_per_conn"] = round(kernel * per, 4) if scenario.service else None
    row["wall_s"] = round(result.wall, 3)
    row["service_decisions"] = scenario.decisions_since(logged)
    # CPU the machine spent on anything but this benchmark: a busy box makes a void run.
    other = max(0.0, busy1 - busy0 - ours)
    row["background_pct"] = round(100 * other / ((t1 - t0) * CPUS), 1)
    return row


def schedule(o: Options) -> list[tuple[int, str, int, int, str]]:
    """(repeat, kind, connects, concurrency, scenario): every repeat runs each concurrency for
    every scenario in turn, so drift and background noise hit all scenarios alike; the storms
    come last, once per scenario."""
    plan = [
        (repeat, f"c{conc}", o.connects, conc, name)
        for repeat in range(o.repeats)
        for conc in o.concurrencies
        for name in o.scenarios
    ]
    if o.storm_connects:
        plan += [(0, "storm", o.storm_connects, o.storm_concurrency, n) for n in o.scenarios]
    return plan


async def steady_phase(
    scenario: Scenario,
    everyone: Sequence[Scenario],
    ids: Sequence[Identity],
    kind: str,
    connects: int,
    conc: int,
    o: Options,
) -> dict[str, Any]:
    """A phase, run again (up to --busy-retries times) while other work disturbed it; the
    least disturbed attempt counts."""
    best = await phase(scenario, everyone, ids, kind, connects, conc, o)
    attempts = 1
    while best["background_pct"] > QUIET_PCT and attempts <= o.busy_retries:
        row = await phase(scenario, everyone, ids, kind, connects, conc, o)
        attempts += 1
        if row["background_pct"] < best["background_pct"]:
            best = row
        if row["background_pct"] <= QUIET_PCT:
            break
    best["attempts"] = attempts
    return best


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for key in (
        "conn_per_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "client_cpu_ms_per_conn",
        "server_cpu_ms_per_conn",
        "service_cpu_ms_per_conn",
        "service_kernel_ms_per_conn",
        "background_pct",
        "client_lag_p99_ms",
    ):
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    # Any allowed user denied in any repeat counts: these are totals, not medians.
    for key in ("admitted", "denied", "timeout", "error", "not_admitted", "connects"):
        out[key] = sum(r[key] for r in rows)
    if rows[0].get("service_decisions") is not None:
        decided: Counter[str] = Counter()
        for r in rows:
            decided.update(r["service_decisions"] or {})
        out["service_decisions"] = dict(decided.most_common())
    out["repeats"] = len(rows)
    return out


def summarise(phases: list[dict[str, Any]], o: Options) -> list[dict[str, Any]]:
    kinds = [f"c{c}" for c in o.concurrencies] + (["storm"] if o.storm_connects else [])
    rows = []
    for kind in kinds:
        base = None
        for name in o.scenarios:
            group = [p for p in phases if p["scenario"] == name and p["kind"] == kind]
            if not group:
                continue
            row = medians(group)
            if name == "LIMIT":
                base = row
            row["rate_x_limit"] = round(row["conn_per_s"] / base["conn_per_s"], 3) if base else None
            row["p50_x_limit"] = round(row["p50_ms"] / base["p50_ms"], 3) if base else None
            rows.append(row)
    return rows


def fmt(value: Any, spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'scenario':13} {'phase':>6} {'conn/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
        f" {'denied':>6} {'srv ms/c':>8} {'svc ms/c':>8} {'of it sys':>9} {'cli ms/c':>8}"
        f" {'rate/L':>6} {'p50/L':>6}"
        f" {'lag ms':>6} {'bg %':>5}"
    )
    lines = [head]
    for r in rows:
        kind = r["kind"] if r["kind"] != "storm" else f"s{r['concurrency']}"
        lines.append(
            f"{r['scenario']:13} {kind:>6}"
            f" {r['conn_per_s']:7.0f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f}"
            f" {r['not_admitted']:6d} {fmt(r['server_cpu_ms_per_conn'], '8.3f')}"
            f" {fmt(r['service_cpu_ms_per_conn'], '8.3f')}"
            f" {fmt(r.get('service_kernel_ms_per_conn'), '9.3f')}"
            f" {r['client_cpu_ms_per_conn']:8.3f}"
            f" {fmt(r['rate_x_limit'], '6.2f')} {fmt(r['p50_x_limit'], '6.2f')}"
            f" {r['client_lag_p99_ms']:6.1f} {r['background_pct']:5.1f}"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def find(name: str, kind: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["scenario"] == name and r["kind"] == kind), None)

    checks: list[dict[str, Any]] = []

    def check(name: str, what: str, value: Any, target: str, met: bool) -> None:
        checks.append(
            {"scenario": name, "what": what, "value": value, "target": target, "met": met}
        )

    for name in ("plain", "xkey"):
        if (r := find(name, "c50")) and r["rate_x_limit"] is not None:
            v = r["rate_x_limit"]
            check(name, "c=50 conn/s ÷ LIMIT", v, f">= {TARGET_RATE_C50}", v >= TARGET_RATE_C50)
        if (r := find(name, "c1")) and r["p50_x_limit"] is not None:
            v = r["p50_x_limit"]
            check(name, "c=1 p50 ÷ LIMIT", v, f"<= {TARGET_P50_C1}", v <= TARGET_P50_C1)
        if (r := find(name, "c50")) and r["service_cpu_ms_per_conn"] is not None:
            v, limit = r["service_cpu_ms_per_conn"], TARGET_SERVICE_MS[name]
            check(name, "service CPU ms/auth (c=50)", v, f"<= {limit}", v <= limit)
        if r := find(name, "storm"):
            check(
                name, "storm allowed users denied", r["not_admitted"], "== 0", not r["not_admitted"]
            )
            v = r["p99_ms"] / 1e3
            check(
                name, "storm p99 s", round(v, 3), f"< {TARGET_STORM_P99_S}", v < TARGET_STORM_P99_S
            )
        # The simple thing to beat: the naive callout (bench/naive.py) of this run, every figure.
        for kind, key, what, higher in NAIVE_FIGURES:
            ours, naive = find(name, kind), find("naive", kind)
            if ours is None or naive is None or ours[key] is None or naive[key] is None:
                continue
            v, base = ours[key], naive[key]
            met = v >= base if higher else v <= base
            check(name, what, v, f"{'>=' if higher else '<='} {base} (naive)", met)
    return checks


# (phase, column, what, higher is better): the figures callout must match or beat the naive
# loop on.
NAIVE_FIGURES = (
    ("c50", "conn_per_s", "vs naive: c=50 conn/s", True),
    ("c1", "p50_ms", "vs naive: c=1 p50 ms", False),
    ("c50", "service_cpu_ms_per_conn", "vs naive: service CPU ms/auth", False),
    ("storm", "not_admitted", "vs naive: storm users denied", False),
    ("storm", "p99_ms", "vs naive: storm p99 ms", False),
)


# Wrappers whose cumulative time is "everything" (start-up, the event loop, its idle wait).
PROFILE_WRAPPERS = (
    "<frozen runpy>",
    "<string>",
    "builtins.exec",
    "__main__.py",
    "cli.py:",
    "runners.py:",
    "base_events.py:",
    "selectors.py:",
    "events.py:",
    "_contextvars.Context",
    "select.epoll",
)


def profile_report(path: Path, top: int = 15) -> str:
    """Top entries by cumulative and by own time, without the wrappers and the idle wait.

    cProfile's clock is wall time: the epoll wait is idle time, and on a busy machine a
    preempted function is charged for the time it waited for a CPU.
    """
    stats: Any = pstats.Stats(str(path))
    rows = []
    for (file, line, func), (_cc, calls, own, cum, _callers) in stats.stats.items():
        name = func if file == "~" else f"{Path(file).name}:{line}({func})"
        rows.append((name, calls, own, cum))
    idle = sum(own for name, _, own, _ in rows if "select.epoll" in name)
    busy = stats.total_tt - idle
    out = [
        f"--- {path.name}: {stats.total_tt:.1f} s profiled, {idle:.1f} s of it idle in epoll,"
        f" {busy:.2f} s busy ---"
    ]
    inner = [r for r in rows if not any(w in r[0] for w in PROFILE_WRAPPERS)]
    working = [r for r in rows if "select.epoll" not in r[0]]
    for title, key, chosen in (("cumulative", 3, inner), ("tottime", 2, working)):
        out.append(f"top {top} by {title} (% = {title} / busy time):")
        out.append(f"{'ncalls':>8} {'tottime':>8} {'cumtime':>8} {'%':>6}  function")
        for row in sorted(chosen, key=lambda r: r[key], reverse=True)[:top]:
            name, calls, own, cum = row
            out.append(f"{calls:8d} {own:8.3f} {cum:8.3f} {100 * row[key] / busy:6.1f}  {name}")
    return "\n".join(out) + "\n"


def start_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling the service from outside (no instrumentation: unlike cProfile it does
    not slow the Python it measures), native frames included so libsodium shows, as collapsed
    stacks: one line per distinct stack with its sample count (flamegraph.pl reads it)."""
    binary = shutil.which("py-spy")
    assert binary is not None  # checked in parse()
    cmd = [binary, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
           "--rate", "250", "--native"]  # fmt: skip
    with out.with_suffix(".log").open("wb") as log:  # why it failed, if it does (ptrace)
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def _frame(frame: str) -> tuple[str, bool]:
    """("file:function", is Python) from "function (path/file.py:line)": one entry per
    function, whatever the line."""
    name, _, where = frame.partition(" (")
    file = Path(where.rstrip(")").rsplit(":", 1)[0]).name
    return (f"{file}:{name}" if file else name), file.endswith(".py")


# py-spy counts a thread blocked in a native call as busy when it walks native frames:
# stacks ending in the event loop's wait are idle time, left out.
SPY_IDLE_LEAVES = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "select"})
# Frames on (nearly) every stack, from `python -m` down into uvloop's run loop: left out of
# the inclusive list, where they would fill the top.
SPY_WRAPPERS = ("<frozen runpy>", "__main__.py:", "cli.py:main", "cli.py:_run", "__init__.py:run",
                "runners.py:", "libc.so", "loop.c:", "core.c:", "object.h:", "queue.h:",
                "loop-watcher.c:", "_asynciomodule.c:")  # fmt: skip


def spy_report(path: Path, top: int = 15) -> str:
    """Top entries of py-spy's collapsed stacks, as % of the busy samples: inclusive (the
    function anywhere in the stack), and own time by the innermost Python function, native
    code (libsodium, the socket calls) counted in its Python caller."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    busy = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw = stack.split(";")
        if raw[-1].partition(" (")[0] in SPY_IDLE_LEAVES:
            idle += count
            continue
        frames = [_frame(f) for f in raw]
        busy += count
        python = [name for name, is_python in frames if is_python]
        innermost = python[-1] if python else frames[-1][0]
        own[innermost] = own.get(innermost, 0) + count
        for name in {name for name, _ in frames if not name.startswith(SPY_WRAPPERS)}:
            inclusive[name] = inclusive.get(name, 0) + count
    out = [f"--- {path.name}: {busy} busy samples at 250 Hz (py-spy --native; {idle} idle"
           " in the event loop's wait left out) ---"]  # fmt: skip
    for title, table_ in (("inclusive", inclusive), ("own (Python function)", own)):
        out.append(f"top {top} by {title}:")
        for name, n in sorted(table_.items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
            out.append(f"{100 * n / max(busy, 1):6.1f} %  {name}")
    return "\n".join(out) + "\n"


def git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def checkout(rev: str, into: Path) -> str:
    """Extract the `callout` package at `rev` into `into`; returns the full commit id."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if not commit:
        raise SystemExit(f"--service-rev {rev!r}: no such commit")
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "callout"], capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return commit


def describe_code(src: Path, commit: str | None) -> str:
    """Which callout the service runs: a commit, or the working tree at its commit."""
    done = subprocess.run(
        [sys.executable, "-c", "import callout; print(callout.__file__)"],
        cwd=src, capture_output=True, text=True, check=False,
    )  # fmt: skip
    where = done.stdout.strip()
    if commit is not None:
        return f"commit {commit[:12]} ({where})"
    return f"{where} at {git('describe', '--always', '--dirty') or 'unknown'}"


@contextlib.contextmanager
def workdir(keep: Path | None) -> Iterator[str]:
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="callout-bench-") as tmp:
            yield tmp
    else:
        keep.mkdir(parents=True, exist_ok=True)
        yield str(keep)


def raise_fd_limit(need: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"the storm needs about {need} open files; the hard limit is {hard}")
    # Children (nats-server, the service) inherit it.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--connects", type=int, help="per phase (default 2000; --quick 300)")
    p.add_argument("--repeats", type=int, help="interleaved repeats (default 3; --quick 1)")
    p.add_argument("--concurrency", default="1,50", help="phases, comma-separated ('': none)")
    p.add_argument("--storm-connects", type=int, help="default 9000 (--quick 600); 0: no storm")
    p.add_argument("--storm-concurrency", type=int, help="default 3000 (--quick 300)")
    p.add_argument("--users", type=int, help="distinct users (default 1000; --quick 100)")
    p.add_argument("--timeout", type=float, default=10.0, help="client per-connect timeout")
    p.add_argument("--quick", action="store_true", help="small numbers for a smoke run")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    p.add_argument("--service-args", default="", help="extra `callout serve` arguments")
    code = p.add_mutually_exclusive_group()
    code.add_argument("--service-src", type=Path, default=REPO, help="run the callout found here")
    code.add_argument("--service-rev", help="run the callout of this git commit (e.g. HEAD)")
    p.add_argument("--profile-service", type=Path, help="cProfile the service into FILE.<name>")
    p.add_argument("--py-spy", type=Path, help="py-spy each service into FILE.<name>.txt")
    p.add_argument("--json", type=Path, help="save every phase and the summary here")
    p.add_argument(
        "--busy-retries",
        type=int,
        default=2,
        help="run a phase again up to N times while other work used over 10 %% of the CPUs",
    )
    p.add_argument("--keep", type=Path, help="work in this directory and keep it (logs, configs)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each phase, wait up to this many seconds for other CPU use to stop",
    )
    a = p.parse_args(argv)
    scenarios = tuple(s.strip() for s in a.scenarios.split(",") if s.strip())
    if bad := [s for s in scenarios if s not in SCENARIOS + EXTRA_SCENARIOS]:
        p.error(f"unknown scenario(s) {bad}; choose from {SCENARIOS + EXTRA_SCENARIOS}")
    if a.py_spy is not None and shutil.which("py-spy") is None:
        p.error("--py-spy needs py-spy on PATH (pip install py-spy)")

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else quick if a.quick else full

    o = Options(
        connects=pick(a.connects, 2000, 300),
        repeats=pick(a.repeats, 3, 1),
        concurrencies=tuple(int(c) for c in a.concurrency.split(",") if c.strip()),
        storm_connects=pick(a.storm_connects, 9000, 600),
        storm_concurrency=pick(a.storm_concurrency, 3000, 300),
        users=pick(a.users, 1000, 100),
        timeout=a.timeout,
        scenarios=scenarios,
        service_args=shlex.split(a.service_args),
        service_src=a.service_src.resolve(),
        service_rev=a.service_rev,
        profile=a.profile_service.resolve() if a.profile_service else None,
        spy=a.py_spy.resolve() if a.py_spy else None,
        json=a.json,
        quiet_wait=a.quiet_wait,
        keep=a.keep.resolve() if a.keep else None,
        busy_retries=a.busy_retries,
    )
    return o


async def main(argv: Sequence[str] | None = None) -> int:
    o = parse(argv)
    raise_fd_limit(o.storm_concurrency + 1000)
    keys = deploy.make_keys()
    users = [deploy.new_user() for _ in range(o.users)]
    pubs = [p for _, p in users]
    ids = identities([s for s, _ in users])
    phases: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "service_args": o.service_args,
        "connects": o.connects,
        "repeats": o.repeats,
        "concurrencies": list(o.concurrencies),
        "storm": [o.storm_connects, o.storm_concurrency],
        "users": o.users,
        "timeout_s": o.timeout,
        "profiled": o.profile is not None,
        "quiet_wait_s": o.quiet_wait,
        "busy_retries": o.busy_retries,
    }
    started = time.monotonic()
    scenarios: dict[str, Scenario] = {}
    with workdir(o.keep) as tmp:
        commit = None
        if o.service_rev is not None:
            o.service_src = Path(tmp) / "code"
            commit = checkout(o.service_rev, o.service_src)
        meta["service_code"] = describe_code(o.service_src, commit)
        print(f"service code: {meta['service_code']}", flush=True)
        try:
            for name in o.scenarios:
                scenarios[name] = await start_scenario(name, Path(tmp), keys, pubs, ids, o)
            everyone = list(scenarios.values())
            for repeat, kind, connects, conc, name in schedule(o):
                row = await steady_phase(scenarios[name], everyone, ids, kind, connects, conc, o)
                row["repeat"] = repeat
                phases.append(row)
                print(f"  {name:13} {kind:6} repeat {repeat + 1}: {row['conn_per_s']:7.0f} conn/s,"
                      f" p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms,"
                      f" {row['not_admitted']} not admitted, bg {row['background_pct']:.0f} %"
                      + (f" (attempt {row['attempts']})" if row["attempts"] > 1 else ""),
                      flush=True)  # fmt: skip
                if row["not_admitted"]:
                    print(f"  {'':13} {'':6} the clients saw {row['errors']};"
                          f" the service decided {row['service_decisions']}")  # fmt: skip
            # A healthy service logs nothing above info: show what it warned about (before
            # stopping it, which logs a disconnect).
            for scenario in scenarios.values():
                if tail := scenario.service_tail():
                    print(f"{scenario.name}: the service logged (last lines):\n{tail}")
        finally:
            for scenario in scenarios.values():
                with contextlib.suppress(Exception):
                    scenario.stop()
        rows = summarise(phases, o)
        checks = targets(rows)
        print()
        print(
            f"callout bench {meta['date']}: {meta['cpus']} CPUs, {o.users} users,"
            f" {o.connects} connects x {o.repeats} repeats (medians; denied = total),"
            f" storm {o.storm_connects} @ c={o.storm_concurrency}, client timeout {o.timeout:g} s"
        )
        print(f"service: {meta['service_code']} {' '.join(o.service_args)}")
        if o.profile is not None:
            print("NOTE: the service ran under cProfile; its CPU and the ratios are inflated")
        print(table(rows))
        print()
        for c in checks:
            print(
                f"{c['scenario']:13} {c['what']:30} {c['value']!s:>8}  target {c['target']:18}"
                f" {'met' if c['met'] else 'MISSED'}"
            )
        busy = [p for p in phases if p["background_pct"] > QUIET_PCT]
        if busy:
            print(
                f"WARNING: {len(busy)} of {len(phases)} phases ran with more than {QUIET_PCT:g} %"
                " of the machine busy with other work (bg % column): the figures are suspect"
            )
        print(f"({time.monotonic() - started:.0f} s)")
        if o.profile is not None:
            for scenario in scenarios.values():
                if scenario.profile is not None and scenario.profile.exists():
                    print(profile_report(scenario.profile))
        for scenario in scenarios.values():
            if scenario.spy_out is None:
                continue
            if scenario.spy_out.exists():
                print(spy_report(scenario.spy_out))
            else:
                print(f"WARNING: py-spy wrote no {scenario.spy_out.name}; its output:")
                print(scenario.spy_out.with_suffix(".log").read_text(errors="replace"))
    if o.json is not None:
        o.json.write_text(
            json.dumps(
                {"meta": meta, "summary": rows, "targets": checks, "phases": phases}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
