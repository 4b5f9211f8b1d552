"""`callout serve --record-dir`: every request the service handled, as JSON lines on disk, for
`callout replay` (`callout.recording.replay`) to feed through a new version or a changed policy.

Each file opens with the policy the service decided under, its non-secret part
(`callout.recording.policy`; written again at the top of every file, since a file may be read
alone):

    {"v": 2, "policy": {"account": "APP", "allowed_accounts": ["APP"], "mode": "enforce",
                        "xkeys": ["X..."], "internal_keys": [...], ...}}

then one line per request:

    {"v": 2, "received_at": 1795783152.92, "client": "U...", "encrypted": true,
     "headers": {"Nats-Server-Xkey": "X..."}, "raw": "kept", "token_b64": "...",
     "opened_with": "X...", "request": {...decoded claims, secrets redacted...},
     "decision": {"outcome": "admit", "reason": "admit", "admit": true, "account": "APP",
                  "detail": "", "name": "alice", "permissions": {...}}}

`headers` are exactly as received, and `token_b64` is the request as the server signed it:
the payload itself, or for an encrypted request the box opened, with `opened_with` the
public xkey that opened it. So the replay needs no xkey seed: it seals the token again to a
stand-in of that key (`callout.recording.replay`); and the token reveals nothing the decoded
`request` does not. (Format 1 kept the payload as received, `payload_b64`: a sealed one could
only be replayed with the seed.) A request that carries a password, a token or a JWT
(`connect_opts.pass`, `auth_token`, `jwt`) holds that secret in its payload, encrypted or not,
so its payload is not written at all (`"raw": "redacted"`, `"redaction": "credential"`), nor is
one whose `connect_opts.nkey` is not a public key (it could be a seed); neither is one we
cannot decode (an xkey we do not hold, garbage, oversize), since nothing shows it holds no
secret (`"redaction": "undecodable"`). The decoded `request` has those fields replaced by
"[REDACTED]".

Files are created 0600 in a 0700 directory and named `requests-<UTC time>-p<pid>-<seq>.jsonl`,
so names sort by time; a file is closed and the next one started before it would pass
`max_bytes` (a file holds at least one request line, however long; lines are never split).

Writing never blocks or fails a decision. `record` is called after the response is sent and
only encodes the line (tens of microseconds, on the event loop: bench/record_overhead.py) and
appends it to an in-memory batch; one background task hands batches to a dedicated writer
thread, so a slow or stalled disk never holds the event loop. The batch is bounded
(`max_pending`): past it, and on any write error (disk full, directory gone), lines are dropped
and counted, and a warning is logged at most every `WARN_EVERY` seconds per cause.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import itertools
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from callout import log, xkey
from callout.decision import MAX_REQUEST_BYTES, Decision, Policy
from callout.keys import CurveKey, KeyKind, is_public
from callout.recording import policy as recorded_policy

FORMAT_VERSION: Final = 2
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
DEFAULT_MAX_PENDING: Final = 16 * 1024 * 1024
WARN_EVERY: Final = 10.0
# How long `close` waits for the disk before giving up on what is still queued.
CLOSE_TIMEOUT: Final = 5.0
REDACTED: Final = "[REDACTED]"
# connect_opts fields that are credentials (docs/protocol.md §1, "connect_opts").
SECRET_FIELDS: Final = ("pass", "auth_token", "jwt")
FILE_PREFIX: Final = "requests-"
FILE_SUFFIX: Final = ".jsonl"


class RecordDirError(Exception):
    """--record-dir cannot be used (message for operators)."""


def outcome(decision: Decision) -> str:
    return "drop" if decision.drop else "admit" if decision.admit else "deny"


def decision_document(decision: Decision) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "outcome": outcome(decision),
        "reason": decision.reason,
        "admit": decision.admit,
        "account": decision.account or None,
        "detail": decision.detail,
    }
    if decision.admit:
        doc["name"] = decision.name
        doc["permissions"] = decision.permissions.claims()
    return doc


def open_request(
    payload: bytes, headers: Mapping[str, str] | None, xkeys: tuple[CurveKey, ...]
) -> tuple[bytes, CurveKey | None] | None:
    """The request token (the payload itself, or opened with our xkeys when sealed) and the
    xkey that opened it; None when it is too large or does not open."""
    if len(payload) > MAX_REQUEST_BYTES:
        return None
    if not xkey.is_sealed(payload):
        return payload, None
    header = (headers or {}).get(xkey.HEADER)
    if header is None or not xkeys:
        return None
    try:
        return xkey.open_box(payload, xkey.server_key(header), xkeys)
    except xkey.XkeyError:
        return None


def decode_request(
    payload: bytes, headers: Mapping[str, str] | None, xkeys: tuple[CurveKey, ...]
) -> dict[str, Any] | None:
    """The request's claims, for reading only: opened with our xkeys when sealed, NOT verified
    (the decision already says whether it was authentic). None when it does not decode."""
    opened = open_request(payload, headers, xkeys)
    return None if opened is None else _claims(opened[0])


def _claims(token: bytes) -> dict[str, Any] | None:
    parts = token.split(b".")
    if len(parts) != 3:
        return None
    segment = parts[1]
    try:
        # Lenient on purpose (not jwt.b64url_decode): this only reads, and it is on the loop.
        claims = orjson.loads(base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def redact(claims: dict[str, Any]) -> tuple[dict[str, Any], bool] | None:
    """(claims with the credential fields replaced, whether there was a credential), or None
    when the claims are not shaped like a request (then nothing shows where a secret could be)."""
    nats = claims.get("nats")
    if not isinstance(nats, dict):
        return None
    options = nats.get("connect_opts")
    if options is None:
        return claims, False
    if not isinstance(options, dict):
        return None
    present = [name for name in SECRET_FIELDS if name in options]
    # The client's own text: a confused client can put its seed where its public key goes.
    nkey = options.get("nkey")
    if nkey not in ("", None) and not (isinstance(nkey, str) and is_public(nkey, KeyKind.USER)):
        present.append("nkey")
    if not present:
        return claims, False
    secret = any(options[name] not in ("", None) for name in present)
    options = {**options, **dict.fromkeys(present, REDACTED)}
    return {**claims, "nats": {**nats, "connect_opts": options}}, secret


def record_document(
    payload: bytes,
    headers: Mapping[str, str] | None,
    received: float,
    decision: Decision,
    xkeys: tuple[CurveKey, ...],
) -> dict[str, Any]:
    opened = open_request(payload, headers, xkeys)
    claims = None if opened is None else _claims(opened[0])
    redacted = None if claims is None else redact(claims)
    doc: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "received_at": received,
        "client": decision.client_key,
        "encrypted": xkey.is_sealed(payload) or (headers or {}).get(xkey.HEADER) is not None,
        "headers": dict(headers) if headers is not None else None,
    }
    if redacted is None:
        doc.update(raw="redacted", redaction="undecodable", request=None)
    else:
        request, secret = redacted
        if secret:
            doc.update(raw="redacted", redaction="credential")
        else:
            assert opened is not None
            token, key = opened
            doc.update(raw="kept", token_b64=base64.b64encode(token).decode("ascii"))
            if key is not None:
                doc["opened_with"] = key.public
        doc["request"] = request
    doc["decision"] = decision_document(decision)
    return doc


def header_line(policy: Policy) -> bytes:
    """The first line of every file: the policy's non-secret part."""
    return orjson.dumps(
        {"v": FORMAT_VERSION, "policy": recorded_policy.document(policy)},
        option=orjson.OPT_APPEND_NEWLINE,
    )


def file_name(at: float, pid: int, seq: int) -> str:
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{FILE_PREFIX}{stamp}-p{pid}-{seq:06d}{FILE_SUFFIX}"


def prepare_dir(path: Path) -> Path:
    """Create the directory 0700, or accept an existing one only if it is ours alone: the
    recordings hold client keys, addresses and names."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise RecordDirError(f"--record-dir {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RecordDirError(f"--record-dir {path} is not a directory")
    if info.st_mode & 0o077:
        raise RecordDirError(
            f"--record-dir {path} is accessible by group or others"
            f" (mode {stat.S_IMODE(info.st_mode):o}); chmod 700 it"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise RecordDirError(f"--record-dir {path} is not writable")
    return path


@dataclass
class _Files:
    """The writer thread's side: the open file and rotation. Touched by that thread only."""

    directory: Path
    max_bytes: int
    header: bytes = b""  # written first in every file
    fd: int = -1
    size: int = 0
    requests: int = 0  # request lines in the open file
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    files: int = 0

    def _open(self) -> None:
        while True:
            name = file_name(time.time(), os.getpid(), next(self.seq))
            try:
                # O_EXCL: never append to someone else's file, whatever the name says.
                self.fd = os.open(
                    self.directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
                    0o600,
                )  # fmt: skip
            except FileExistsError:
                continue
            self.size = self.requests = 0
            self.files += 1
            if self.header:
                self._write_all(self.header)
            return

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)

    def write(self, lines: list[bytes]) -> tuple[int, OSError | None]:
        """Write whole lines, rotating before a file would pass max_bytes. Returns how many
        lines were written, and the error that stopped it (the rest are lost)."""
        written = 0
        chunk: list[bytes] = []
        chunk_size = 0
        try:
            for line in lines:
                used = self.size + chunk_size
                # A file holds at least one request, so a line longer than max_bytes still fits.
                held = self.requests + len(chunk)
                if self.fd < 0 or (held and used + len(line) > self.max_bytes):
                    if chunk:
                        self._write_all(b"".join(chunk))
                        written += len(chunk)
                        self.requests += len(chunk)
                        chunk, chunk_size = [], 0
                    self.close()
                    self._open()
                chunk.append(line)
                chunk_size += len(line)
            if chunk:
                self._write_all(b"".join(chunk))
                written += len(chunk)
                self.requests += len(chunk)
        except OSError as exc:
            # A partial line may now end this file (the replay skips it); start a new file.
            self.close()
            return written, exc
        return written, None

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            self.size += n
            view = view[n:]


def _idle() -> None:
    pass


@dataclass
class RecorderStats:
    recorded: int = 0  # lines written
    dropped: dict[str, int] = field(default_factory=dict)  # by cause

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class Recorder:
    """Called by `CalloutService` once per handled request, on the event loop. `policy` is the
    one the service decides with: its non-secret part heads every file, and its xkeys open
    the requests (`xkeys` is for a recorder without a policy, whose files then carry none)."""

    def __init__(
        self,
        directory: Path,
        *,
        policy: Policy | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        xkeys: tuple[CurveKey, ...] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.directory = prepare_dir(directory)
        self.max_pending = max_pending
        self.xkeys = policy.xkeys if policy is not None else xkeys
        self.stats = RecorderStats()
        header = header_line(policy) if policy is not None else b""
        self._files = _Files(self.directory, max_bytes, header)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="callout-recorder"
        )
        self._warned: dict[str, float] = {}

    @property
    def files(self) -> int:
        return self._files.files

    def record(
        self,
        payload: bytes,
        headers: Mapping[str, str] | None,
        received: float,
        decision: Decision,
    ) -> None:
        """Encode and queue one line. Never raises, never waits."""
        try:
            if self._closing:
                self._drop("closed", 1)
                return
            line = orjson.dumps(
                record_document(payload, headers, received, decision, self.xkeys),
                option=orjson.OPT_APPEND_NEWLINE,
            )
            if self._pending_bytes + len(line) > self.max_pending:
                self._drop("backlog", 1)
                return
            self._pending.append(line)
            self._pending_bytes += len(line)
            if self._flusher is None:
                self._wake = asyncio.Event()
                self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
            assert self._wake is not None
            self._wake.set()
        except Exception as exc:  # a recorder bug must never reach the decision path
            self._drop("error", 1, type(exc).__name__)

    def _drop(self, cause: str, count: int, detail: str = "") -> None:
        dropped = self.stats.dropped
        dropped[cause] = dropped.get(cause, 0) + count
        now = time.monotonic()
        if now - self._warned.get(cause, -WARN_EVERY) >= WARN_EVERY:
            self._warned[cause] = now
            fields: dict[str, object] = {"cause": cause, "dropped": dropped[cause]}
            if detail:
                fields["detail"] = detail[:200]
            log.warning("record_dropped", **fields)

    async def _flush_forever(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            if self._closing and not self._pending:
                return

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            loop = asyncio.get_running_loop()
            try:
                written, error = await loop.run_in_executor(
                    self._executor, self._files.write, batch
                )
            except Exception as exc:  # a bug in the writer: keep the flusher alive
                self._drop("error", len(batch), type(exc).__name__)
                continue
            self.stats.recorded += written
            if error is not None:
                self._drop("write_error", len(batch) - written, error.strerror or str(error))

    async def flush(self) -> None:
        """Return once every line recorded so far has been written, or counted as dropped."""
        await self._flush()
        # The writer runs one job at a time, in order: this one ends after the flusher's.
        await asyncio.get_running_loop().run_in_executor(self._executor, _idle)

    async def close(self) -> None:
        """Write what is queued, close the file and the thread. Call once the service stopped."""
        self._closing = True
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if self._flusher is not None:
                    assert self._wake is not None
                    self._wake.set()
                    await self._flusher
                await asyncio.get_running_loop().run_in_executor(self._executor, self._files.close)
        except TimeoutError:
            # A hung disk (e.g. a dead NFS server) must not hang the shutdown.
            self._drop("closed", len(self._pending), "the disk did not take the last lines")
        self._executor.shutdown(wait=False)
        log.info(
            "recording_stopped",
            directory=str(self.directory),
            recorded=self.stats.recorded,
            dropped=self.stats.dropped_total,
            files=self.files,
        )


__all__ = [
    "DEFAULT_MAX_BYTES",
    "REDACTED",
    "RecordDirError",
    "Recorder",
    "decode_request",
    "header_line",
    "open_request",
    "record_document",
    "redact",
]
