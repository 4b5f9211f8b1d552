"""A TCP proxy of our own between the service and nats-server, for fault injection.

The service connects to `FaultProxy.url`; every connection is relayed to the server. The fault
is switched at run time and applies to connections already open as well as new ones:

- `delay(s)` / `drop()`: slow down or lose the service's *store traffic*, i.e. the messages it
  publishes to `$JS.` and `$KV.` subjects (KV lookups, stream probes, consumer creation, replay
  records). Everything else, the auth requests coming in and the service's replies going out,
  passes untouched, so a client measures exactly what a slow or silent JetStream costs it.
  This needs the stream cut into protocol messages (`_Frames`); the reordering it causes (a
  delayed PUB overtaken by later ones) is what a slow JetStream looks like from the client
  anyway: the request reached the server, the answer comes late. With `inbound=True` the
  messages the server sends the service are held back too, all but the auth requests: a
  JetStream that has stalled, answers and the users watch's deliveries included.
  With `store_only=False` the whole link is delayed or black-holed instead, in both
  directions (bytes dropped, not stalled: a black-holed connection is closed by `heal()`).
- `half_close(toward)`: send FIN to one side of every open connection (`"service"`: the service
  reads EOF; `"server"`: the server does) while the other direction stays open, and relay the
  close of whichever end reacts. New connections are relayed normally.
- `heal()`: back to relaying everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from typing import Literal

Side = Literal["service", "server"]
_STORE_PREFIXES = (b"$JS.", b"$KV.")
_AUTH_SUBJECT = b"$SYS.REQ.USER.AUTH"


@dataclass
class Fault:
    delay: float = 0.0
    drop: bool = False
    store_only: bool = True
    inbound: bool = False

    def applies(self, subject: bytes | None, *, from_server: bool) -> bool:
        """Whether this fault touches a message on `subject` (None: not a message)."""
        if not self.store_only:
            return True
        if subject is None:
            return False
        if from_server:
            return self.inbound and subject != _AUTH_SUBJECT
        return subject.startswith(_STORE_PREFIXES)


class _Frames:
    """Cuts a NATS protocol stream into whole messages: an op line, plus the payload for PUB /
    HPUB (client side) and MSG / HMSG (server side); its size is the op line's last field."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes]]:
        """(subject or None, frame bytes) for every complete message buffered so far."""
        self._buf += data
        frames: list[tuple[bytes | None, bytes]] = []
        while True:
            end = self._buf.find(b"\r\n")
            if end < 0:
                return frames
            line = bytes(self._buf[:end])
            size = 0
            subject: bytes | None = None
            op = line[:5].upper()
            if op.startswith((b"PUB ", b"HPUB ", b"MSG ", b"HMSG ")):
                fields = line.split()
                subject = fields[1]
                size = int(fields[-1]) + 2  # payload and its CRLF
            total = end + 2 + size
            if len(self._buf) < total:
                return frames
            frames.append((subject, bytes(self._buf[:total])))
            del self._buf[:total]


@dataclass
class _Link:
    service: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    server: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    blackholed: bool = False
    last_due: dict[int, float] = field(default_factory=dict)

    def close(self) -> None:
        for _, writer in (self.service, self.server):
            writer.close()


@dataclass
class Stats:
    connections: int = 0
    delayed: int = 0
    dropped: int = 0
    # The messages the fault held back or lost, so a test can tell which lookups the service
    # had started (a lookup names the user's key) before it moved on.
    faulted: list[bytes] = field(default_factory=list)

    def touched(self, text: str) -> bool:
        needle = text.encode()
        return any(needle in frame for frame in self.faulted)


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self.fault = Fault()
        self.stats = Stats()
        self._links: list[_Link] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
            for task in link.tasks:
                task.cancel()
        self._links.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- switching faults ---------------------------------------------------------------------
    def delay(self, seconds: float, *, store_only: bool = True, inbound: bool = False) -> None:
        self.fault = Fault(delay=seconds, store_only=store_only, inbound=inbound)

    def drop(self, *, store_only: bool = True) -> None:
        self.fault = Fault(drop=True, store_only=store_only)
        if not store_only:
            for link in self._links:
                link.blackholed = True

    def heal(self) -> None:
        self.fault = Fault()
        # A black-holed stream lost bytes mid-message: it cannot resume, only be closed.
        for link in [link for link in self._links if link.blackholed]:
            link.close()

    def half_close(self, toward: Side) -> int:
        """FIN toward one side of every open connection; returns how many were cut."""
        count = 0
        for link in self._links:
            _, writer = link.service if toward == "service" else link.server
            if writer.can_write_eof() and not writer.is_closing():
                with contextlib.suppress(OSError):
                    writer.write_eof()
                    count += 1
        return count

    # -- relaying -----------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        for _, w in (upstream, (reader, writer)):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link((reader, writer), upstream)
        link.blackholed = self.fault.drop and not self.fault.store_only
        self.stats.connections += 1
        self._links.append(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, from_server=False)),
            asyncio.create_task(self._pump(link, from_server=True)),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        link.close()
        with contextlib.suppress(ValueError):
            self._links.remove(link)

    def _send(
        self,
        link: _Link,
        writer: asyncio.StreamWriter,
        subject: bytes | None,
        data: bytes,
        *,
        from_server: bool,
    ) -> None:
        fault = self.fault
        applies = fault.applies(subject, from_server=from_server)
        if link.blackholed or (fault.drop and applies):
            self.stats.dropped += 1
            if subject is not None:
                self.stats.faulted.append(data)
            return
        if fault.delay > 0 and applies:
            self.stats.delayed += 1
            if subject is not None:
                self.stats.faulted.append(data)
            loop = asyncio.get_running_loop()
            # Strictly increasing release times keep delayed messages in their order.
            due = max(loop.time() + fault.delay, link.last_due.get(id(writer), 0.0) + 1e-6)
            link.last_due[id(writer)] = due
            loop.call_at(due, self._write, writer, data)
            return
        self._write(writer, data)

    @staticmethod
    def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
        # The far end may have gone, or been half-closed, meanwhile: the bytes are lost.
        if not writer.is_closing():
            with contextlib.suppress(RuntimeError, OSError):
                writer.write(data)

    async def _pump(self, link: _Link, *, from_server: bool) -> None:
        reader, _ = link.server if from_server else link.service
        _, writer = link.service if from_server else link.server
        frames = _Frames()
        while data := await reader.read(65536):
            for subject, frame in frames.feed(data):
                self._send(link, writer, subject, frame, from_server=from_server)
            await writer.drain()
        # This side closed (or half-closed) its end: pass the FIN on.
        with contextlib.suppress(OSError):
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
