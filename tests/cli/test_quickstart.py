"""The README's quick start as a new user follows it: `callout dev` in a fresh directory (what
`./run dev` runs, with `.venv/bin/callout` where `./run` puts it), then the walkthrough's
commands, read from the README and run as written by bash in that directory: a user refused,
added, admitted (her JWT's expiry shown as a time), kept connected, revoked (the connection
kicked, the reconnect refused), and the session's own recording replayed with no flag but the
users. The README cannot drift from what is run here: the commands are taken from it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.support.nats import free_port
from tests.support.service import START_TIMEOUT, kill_quietly, printed, spawn, stop_with_ctrl_c

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "### Walkthrough: add, connect, revoke, replay"
DOCUMENTED_URL = "nats://127.0.0.1:4222"


def walkthrough() -> list[str]:
    """The commands of the README's walkthrough, in order: every line of its `sh` blocks."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start)
    blocks = re.findall(r"```sh\n(.*?)```", text[start:end], re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def steps() -> dict[str, str]:
    """The walkthrough's commands by role, checked to be exactly these, in this order."""
    commands = walkthrough()
    roles = ["export", "refused", "add", "stay", "revoke", "list", "replay"]
    assert len(commands) == len(roles), commands
    named = dict(zip(roles, commands, strict=True))
    assert named["export"].startswith("export CALLOUT_NATS_URL=")
    assert " connect " in named["refused"] and "--stay" not in named["refused"]
    assert " users add " in named["add"]
    assert " connect " in named["stay"] and named["stay"].endswith(" --stay")
    assert " users revoke " in named["revoke"]
    assert named["list"].endswith(" users list > users.jsonl")
    assert " replay .callout-dev/recordings --users users.jsonl" in named["replay"]
    return named


def test_the_walkthrough_reads_as_the_steps_tested() -> None:
    steps()


def run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def start(command: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """A command left running, as in a terminal of its own."""
    return subprocess.Popen(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], text: str, seen: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} never printed:\n" + "".join(seen))


async def test_dev_then_the_readme_walkthrough_as_written(tmp_path: Path) -> None:
    named = steps()
    home = tmp_path / "clone"
    (home / ".venv" / "bin").mkdir(parents=True)
    (home / ".venv" / "bin" / "callout").symlink_to(Path(sys.executable).parent / "callout")
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    dev = spawn(["dev", "--port", str(port), "--log-format", "json"], cwd=home)
    try:
        await dev.await_event("users_cache_live", timeout=START_TIMEOUT)
        # `./run dev` prints the export line the README shows (on its own port here).
        export = named["export"].replace(DOCUMENTED_URL, url)
        assert printed(dev, r"^\s*(export .*)$").group(1) == export
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLOUT_")}
        for assignment in shlex.split(export)[1:]:
            name, _, value = assignment.partition("=")
            env[name] = value
        alice = (home / ".callout-dev" / "keys" / "alice.pub").read_text().strip()

        refused = await asyncio.to_thread(run, named["refused"], home, env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "was not admitted: nats: 'Authorization Violation'" in refused.stderr
        await dev.await_event("decision", client=alice, decision="deny", reason="unknown_user")

        added = await asyncio.to_thread(run, named["add"], home, env)
        assert added.returncode == 0, added.stderr

        stay = start(named["stay"], home, env)
        try:
            seen: list[str] = []
            await asyncio.to_thread(read_until, stay, "staying connected", seen)
            shown = "".join(seen)
            assert f"connected as {alice}" in shown and '"account": "APP"' in shown
            assert re.search(
                r'"expires": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in \d+h\d\dm\d\ds\)"', shown
            )

            revoked = await asyncio.to_thread(run, named["revoke"], home, env)
            assert revoked.returncode == 0, revoked.stderr
            kicked = await dev.await_event("revoked_sessions", client=alice)
            assert kicked["closed"] == 1
            assert await asyncio.to_thread(stay.wait, 30) == 1
            assert stay.stdout is not None
            rest = stay.stdout.read()
        finally:
            if stay.poll() is None:
                stay.kill()
                stay.wait(10)
        assert rest.splitlines() == [
            "disconnected: the server closed the connection; reconnecting",
            "reconnect refused: Authorization Violation",
            "connection closed: the callout refused the reconnect",
        ], rest

        listed = await asyncio.to_thread(run, named["list"], home, env)
        assert listed.returncode == 0, listed.stderr
        replayed = await asyncio.to_thread(run, named["replay"], home, env)
        assert replayed.returncode == 1, replayed.stdout + replayed.stderr
        lines = replayed.stdout.splitlines()
        changed = [line.split()[1:] for line in lines if line.endswith("CHANGED")]
        assert changed == [
            [alice, "deny:unknown_user", "->", "deny:revoked", "CHANGED"],
            [alice, "admit:admit@APP", "->", "deny:revoked", "CHANGED"],
        ], replayed.stdout
        assert "policy: as recorded" in lines
        assert await stop_with_ctrl_c(dev) == 0
    finally:
        kill_quietly(dev)
