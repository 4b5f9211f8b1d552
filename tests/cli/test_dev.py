"""`callout dev`, the embedded default:
a bundled nats-server, keys generated on first run and kept in the data dir, a demo user,
the service, and the exact command to connect as the demo user; Ctrl-C stops both.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import subprocess
from pathlib import Path

from tests.support.nats import free_port, raw_connect
from tests.support.service import (
    START_TIMEOUT,
    Subprocess,
    kill_quietly,
    printed,
    spawn,
    stop_with_ctrl_c,
)


def start_dev(data_dir: Path, port: int) -> Subprocess:
    return spawn(["dev", "--data-dir", str(data_dir), "--port", str(port), "--log-format", "json"])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def nats_server_pids(conf: Path) -> list[int]:
    """Processes whose command line names this config file: the bundled nats-server."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(conf).encode() in argv and any(a.endswith(b"nats-server") for a in argv):
            pids.append(int(proc.name))
    return pids


async def connect_as_demo(port: int, data: Path) -> bool:
    seed = (data / "keys" / "demo.nk").read_text().strip()
    result = await raw_connect(f"nats://127.0.0.1:{port}", seed)
    return result.admitted


async def test_dev_prints_a_working_connect_command_and_ctrl_c_stops_everything(
    tmp_path: Path,
) -> None:
    data = tmp_path / "dev"
    port = free_port()
    handle = start_dev(data, port)
    try:
        await handle.await_event("ready", timeout=START_TIMEOUT)
        assert len(handle.events("keys_generated")) == 1  # first run makes the keys
        demo = printed(handle, r"demo user (U[A-Z2-7]{55})").group(1)
        command = printed(handle, r"^\s*(\S+ connect --nats-url .*)$").group(1).strip()
        assert f"127.0.0.1:{port}" in command

        # Exactly what a user would paste.
        result = await asyncio.to_thread(
            subprocess.run,
            shlex.split(command),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        first, _, rest = result.stdout.partition("\n")
        assert first == f"connected as {demo}"
        info = json.loads(rest)
        assert info["account"] == "APP"
        await handle.await_event("decision", client=demo, decision="admit")

        conf = data / "nats.conf"
        assert nats_server_pids(conf), "the bundled nats-server should be running"
        assert port_open(port)
        assert await stop_with_ctrl_c(handle) == 0
    finally:
        kill_quietly(handle)
    events = [d["event"] for d in handle.lines]
    assert events.index("ready") < events.index("stopped") < events.index("nats_server_stopped")
    assert not port_open(port)
    assert nats_server_pids(conf) == []
    assert not any("Traceback" in line for line in handle.raw)


async def test_dev_second_run_on_the_same_data_dir_reuses_the_keys(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    port = free_port()
    first = start_dev(data, port)
    try:
        await first.await_event("ready", timeout=START_TIMEOUT)
        demo = printed(first, r"demo user (U[A-Z2-7]{55})").group(1)
        assert await connect_as_demo(port, data)
        assert await stop_with_ctrl_c(first) == 0
    finally:
        kill_quietly(first)
    keys_dir = data / "keys"
    seeds = {p.name: p.read_text() for p in keys_dir.iterdir()}
    assert set(seeds) >= {"issuer.nk", "service.nk", "xkey.nk", "demo.nk"}

    port = free_port()
    second = start_dev(data, port)
    try:
        await second.await_event("ready", timeout=START_TIMEOUT)
        assert printed(second, r"demo user (U[A-Z2-7]{55})").group(1) == demo
        assert second.events("keys_generated") == []
        assert {p.name: p.read_text() for p in keys_dir.iterdir()} == seeds
        # The same issuer and demo record: the demo user still gets in.
        assert await connect_as_demo(port, data)
        await second.await_event("decision", client=demo, decision="admit")
        assert await stop_with_ctrl_c(second) == 0
    finally:
        kill_quietly(second)


async def test_dev_ctrl_c_as_soon_as_ready_exits_0(tmp_path: Path) -> None:
    """Ctrl-C at any moment after the advertised "ready" is a clean stop, not a
    KeyboardInterrupt (exit 130) that skips the service's own shutdown."""
    data = tmp_path / "dev"
    port = free_port()
    handle = start_dev(data, port)
    try:
        await handle.await_event("ready", timeout=START_TIMEOUT)
        code = await stop_with_ctrl_c(handle)
    finally:
        kill_quietly(handle)
    assert not port_open(port)
    assert nats_server_pids(data / "nats.conf") == []
    assert code == 0, "\n".join(handle.raw[-10:])
    assert [d["event"] for d in handle.lines].count("stopped") == 1
