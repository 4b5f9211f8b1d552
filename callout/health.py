"""Readiness, and the small HTTP server for `/metrics`, `/healthz` and `/readyz`.

Ready means this replica can admit the users it is meant to admit: connected to NATS, the
auth subscription live, and user records available, either from the store (a probe lookup
answers within the deadline) or from an in-memory cache that is live. Connected and
subscribed but without records is *degraded*: internal identities are still admitted, every
other user is denied `store_unavailable`. Routing traffic to a degraded replica denies users,
so it reports not ready (503) with that reason in the body.

The server is deliberately minimal (no web framework): one request per connection, GET or
HEAD, bounded request size and time. It shares the event loop with the decisions and does
little work per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

from callout import log
from callout.store import Store, StoreError

# Looked up by the readiness probe. Not a user public key, so it can never have a record: the
# probe only proves the store answers ("no record" is an answer).
PROBE_KEY: Final = "CALLOUT_READINESS_PROBE"
LIVE_STATES: Final = frozenset({"live"})
REQUEST_TIMEOUT: Final = 5.0
MAX_LINE: Final = 8192
MAX_HEADERS: Final = 100


# ---------------------------------------------------------------------------------------------
# The store's cache, duck-typed: a store that keeps records in memory (a KV watch) exposes
# `state` (a str or an enum; "live" = records are current and served from memory), `size`
# (records held) and optionally `live` (a bool that wins over `state`), as
# `callout.store.watch.WatchedStore` does. A store without them has no cache.
# ---------------------------------------------------------------------------------------------
def cache_state(store: object) -> str | None:
    state = getattr(store, "state", None)
    if state is None or callable(state):
        return None
    if isinstance(state, enum.Enum):
        state = state.value if isinstance(state.value, str) else state.name
    return str(state).lower()


def cache_size(store: object) -> int | None:
    size = getattr(store, "size", None)
    if callable(size):
        size = size()
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def cache_live(store: object) -> bool:
    live = getattr(store, "live", None)
    if isinstance(live, bool):
        return live
    return cache_state(store) in LIVE_STATES


@dataclass(frozen=True, slots=True)
class Status:
    ready: bool
    reason: str


class Readiness:
    """Evaluates readiness on demand. Concurrent checks share one store probe, so a flood of
    `/readyz` requests costs at most one lookup in flight."""

    def __init__(
        self,
        *,
        connected: Callable[[], bool],
        subscribed: Callable[[], bool],
        store: Store,
        probe_timeout: float,
    ) -> None:
        self._connected = connected
        self._subscribed = subscribed
        self._store = store
        self._timeout = probe_timeout
        self._probe: asyncio.Task[Status] | None = None
        self.last: Status | None = None
        self.stopping = False

    async def check(self) -> Status:
        status = await self._evaluate()
        if status != self.last:
            if status.ready:
                log.info("readiness", ready=True, reason=status.reason)
            else:
                log.warning("readiness", ready=False, reason=status.reason)
        self.last = status
        return status

    async def _evaluate(self) -> Status:
        if self.stopping:
            return Status(False, "stopping")
        if not self._connected():
            return Status(False, "not connected to NATS")
        if not self._subscribed():
            return Status(False, "not subscribed to $SYS.REQ.USER.AUTH")
        if cache_live(self._store):
            return Status(True, "ready (records served from the live cache)")
        if self._probe is None:
            self._probe = asyncio.create_task(self._probe_store())
            self._probe.add_done_callback(self._probe_done)
        # shield: one caller going away (a closed HTTP connection) must not cancel the probe
        # the others are waiting on.
        return await asyncio.shield(self._probe)

    def _probe_done(self, _task: asyncio.Task[Status]) -> None:
        self._probe = None

    async def _probe_store(self) -> Status:
        degraded = "degraded: only internal identities can be admitted; users store"
        try:
            async with asyncio.timeout(self._timeout):
                await self._store.get(PROBE_KEY)
        except TimeoutError:
            return Status(False, f"{degraded} did not answer within {self._timeout:g}s")
        except StoreError as exc:
            return Status(False, f"{degraded} unavailable: {str(exc)[:200]}")
        except Exception as exc:
            return Status(False, f"{degraded} failed: {type(exc).__name__}")
        return Status(True, "ready")


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Awaitable[Response]]
_PHRASES: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def parse_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[v6]:PORT`, `:PORT` = all interfaces) -> (host, port). ValueError if not."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port  # noqa: S104 - ":PORT" asks for every interface


class HttpServer:
    def __init__(self, host: str, port: int, routes: Mapping[str, Route]) -> None:
        self.host = host
        self.port = port
        self._routes = dict(routes)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_LINE)
        # Port 0 asks the OS for a free port; report the one we got.
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    method, path = await _read_request(reader)
            except _BadRequest:
                await _write(writer, Response(400, b"bad request\n"), head=False)
                return
            route = self._routes.get(path)
            if route is None:
                response = Response(404, b"not found\n")
            elif method not in ("GET", "HEAD"):
                response = Response(405, b"method not allowed\n")
            else:
                try:
                    response = await route()
                except Exception as exc:
                    log.error("http_error", path=path, exception=type(exc).__name__)
                    response = Response(500, b"internal error\n")
            await _write(writer, response, head=method == "HEAD")
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away or was too slow: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str]:
    try:
        request_line = await reader.readline()
        for _ in range(MAX_HEADERS + 1):
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
        else:
            raise _BadRequest
    except ValueError:  # a line over the stream limit
        raise _BadRequest from None
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest
    return parts[0], parts[1].split("?", 1)[0]


async def _write(writer: asyncio.StreamWriter, response: Response, *, head: bool) -> None:
    lines = [
        f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, '')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if response.status == 405:
        lines.append("Allow: GET, HEAD")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(response.body)
    await writer.drain()
