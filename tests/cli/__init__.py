"""CLI contract tests: `python -m callout ...` as a subprocess against a real nats-server."""

from __future__ import annotations

from typing import Any

from tests.service import Subprocess


def wait_logged(handle: Subprocess, event: str, timeout: float = 15.0) -> dict[str, Any]:
    """Wait for a JSON log line even if the process has already exited: its last lines may
    still be in the pipe, and `Subprocess.wait_for` gives up as soon as the process is gone.
    Waits on the reader thread's own notification, never on a fixed delay."""

    def found() -> dict[str, Any] | None:
        return next((d for d in handle.lines if d.get("event") == event), None)

    with handle._cond:
        handle._cond.wait_for(lambda: found() is not None, timeout)
        doc = found()
    assert doc is not None, f"no {event!r} line; stderr:\n" + "\n".join(handle.raw[-20:])
    return doc


def kill_quietly(handle: Subprocess) -> None:
    """Teardown for a test that failed half-way: never leave a process behind."""
    if handle.proc.poll() is None:
        handle.kill()
