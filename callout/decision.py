"""Every rule that decides admit or deny lives in this module.

Theory of operation
-------------------
nats-server publishes one authorization request per connecting client and waits, up to its
`authorization.timeout`, for one response (docs/protocol.md §0). A request is admitted only
when it passes three gates, in this order; anything else is a deny with exactly one reason
from the table below, answered at once (silence costs the client the full server timeout).

1. **The request is authentic** (`Authorizer.open`). It opens (xkey box, when configured),
   decodes as a v2 `authorization_request` JWT signed by the server that sent it
   (`iss == nats.server_id.id`), is addressed to callouts, and has not expired (by more than
   any plausible clock skew: `EXP_LEEWAY`). A request
   that does not get this far cannot be answered with a signed error (we do not know whom
   to address it to), so it is answered with an empty body, which the server treats as an
   immediate deny (docs/protocol.md §3 check 1). It must also be new: the same server's
   `user_nkey` (fresh per request) or client nonce seen before is a `replay` (never `jti`,
   which repeats, docs/protocol.md §4). A replayed request (same server, same `user_nkey`, or seen
   by the shared replay record) is dropped unanswered, like an expired one: a second reply to
   an inbox the server still listens on can disconnect the client the first one admitted
   (docs/protocol.md §3, "two replies"). A new request reusing a nonce gets a signed error.
2. **The client proved its key.** `connect_opts.sig` must be the signature of
   `connect_opts.nkey` over `client_info.nonce`. nats-server does not check this for keys it
   does not know (docs/protocol.md §1, "The server does not check nkeys it doesn't know"), so if
   we do not, nobody does. This gate applies to internal keys too. A source host whose
   requests keep failing this gate gets its further failures refused as `throttled`; a
   request that passes it is never refused for its host, only for its own key when that
   key keeps failing gate 3 (`throttled`, before any store lookup).
3. **The key is allowed** (`Authorizer.decide`). An internal key (`--internal-key`) is
   admitted without asking the store (nor the shared replay record), so the system can boot
   and recover while the store is down. Any other key needs a record from the store that
   parses, is not revoked and places the user in an allowed account; in soft mode a missing
   record is admitted with the default permissions and logged as `would_deny`. A store (or
   shared replay record) that cannot answer is a deny, never "no record".

The driver is two calls. `Authorizer.start(payload, headers, now, lookup)` runs gates 1 and
2 and, when the answer needs no I/O, gate 3 and the response too: every gate-1/2 deny, an
internal key, and a key the store can answer from memory (`lookup`, a synchronous read that
raises `WouldBlock` when only an awaited one can answer) come back as an `Answer`: the
decision and the bytes to send (None: send nothing). Otherwise it returns a `Pending`, which
says what it waits for (the store, the shared replay record); the I/O shell
(`callout.service`) asks them within the deadline `Request.deadline` gives and calls
`Authorizer.resume(pending, store answer, replay answer, now)` for the `Answer`. Both turn any
exception into an `INTERNAL_ERROR` deny (never an admit, never silence); the shell sheds load
as `OVERLOADED`. Nothing here does I/O; the bounded in-memory records it consults
(`callout.limits`) and its caches are its only state, per instance, and its randomness is
injected, so recorded requests replay through it exactly.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import nacl.public

from callout import jwt, xkey
from callout.keys import (
    CurveKey,
    KeyError_,
    KeyKind,
    SigningKey,
    decode_public,
    is_public,
    keys_equal,
    verify,
)
from callout.limits import FailureLimiter, SeenRequests
from callout.records import UNRESTRICTED, Permissions, RecordError, UserRecord, parse_record
from callout.store.base import TOMBSTONE, StoreError, WouldBlock

# ---------------------------------------------------------------------------------------------
# Reasons. Each decision carries exactly one; it is the `reason` field of the decision log line
# and the `error` text the server logs (never shown to the client, docs/protocol.md §3).
# ---------------------------------------------------------------------------------------------
ADMIT: Final = "admit"  # known user, record allows it
ADMIT_INTERNAL: Final = "internal"  # --internal-key, no store lookup
WOULD_DENY: Final = "would_deny"  # soft mode: no record, admitted with default permissions

# Gate 1: the request itself. The operator's fix is on the server side or in our key config.
OVERSIZE: Final = "request_oversize"  # payload larger than MAX_REQUEST_BYTES
XKEY_REQUIRED: Final = "xkey_required"  # plaintext request but --xkey-seed-file is set
XKEY_UNEXPECTED: Final = "xkey_unexpected"  # encrypted request but no --xkey-seed-file
XKEY_FAILED: Final = "xkey_failed"  # box does not open: server's xkey is not ours
MALFORMED: Final = "request_malformed"  # not a NATS JWT, or a claim of the wrong shape
FORGED: Final = "request_forged"  # signature over the request does not verify
NOT_FOR_US: Final = "request_wrong_audience"  # aud is not nats-authorization-request
WRONG_SERVER: Final = "request_wrong_server"  # iss is not nats.server_id.id / xkey mismatch
EXPIRED: Final = "request_expired"  # past exp: the server has already given up
NOT_YET_VALID: Final = "request_not_yet_valid"  # nbf in the future (clock skew?)
KIND_NOT_ALLOWED: Final = "kind_not_allowed"  # a leafnode (or other kind) not in --allow-kind
REPLAY: Final = "replay"  # (server id, user_nkey) seen: dropped; or (server id, nonce) seen
THROTTLED: Final = "throttled"  # this key or source host keeps failing: denied cheaply
# Gate 2: the client's proof of key.
NO_NKEY: Final = "no_nkey"  # client did not present an nkey (user/pass, token, JWT...)
BAD_NKEY: Final = "bad_nkey"  # connect_opts.nkey is not a user public key
NO_SIGNATURE: Final = "no_signature"  # nkey without sig, or no nonce in the request
BAD_SIGNATURE: Final = "bad_signature"  # sig does not verify over the nonce
# Gate 3: the store and the record.
UNKNOWN_USER: Final = "unknown_user"  # no record for this key
REVOKED: Final = "revoked"  # record says revoked
RECORD_INVALID: Final = "record_invalid"  # record does not parse or has a bad field
ACCOUNT_NOT_ALLOWED: Final = "account_not_allowed"  # record names an account not allowed
STORE_UNAVAILABLE: Final = "store_unavailable"  # bucket/JetStream missing or erroring
STORE_TIMEOUT: Final = "store_timeout"  # no answer within --backend-timeout / request exp
# The shell's own: a bug, never an admit; and load shedding.
INTERNAL_ERROR: Final = "internal_error"
OVERLOADED: Final = "overloaded"  # backlog over --max-backlog: oldest answered with a deny

ADMIT_REASONS: Final = frozenset({ADMIT, ADMIT_INTERNAL, WOULD_DENY})
# Failures that count against the FailureLimiter. A bad signature proves nothing about the
# key it names (anyone can claim a key), so it counts against the source host only. A
# request with no key at all (`CONNECT {}`) counts against nothing: it costs nothing to
# refuse, and counting it would let anyone lock every client behind an address out.
# THROTTLED is not a failure: counting its own refusals would keep a host throttled by the
# retries of the clients behind it, after the failing one stopped.
_HOST_FAILURES: Final = frozenset({BAD_NKEY, NO_SIGNATURE, BAD_SIGNATURE})
_KEY_FAILURES: Final = frozenset({UNKNOWN_USER, REVOKED, RECORD_INVALID, ACCOUNT_NOT_ALLOWED})

# Requests are 1.1-1.5 KB, more with client certificate chains (docs/protocol.md §1): 128 KiB
# leaves room for long chains and stops a flood of huge messages from costing much.
MAX_REQUEST_BYTES: Final = 128 * 1024
# `exp` is the server's clock in whole seconds, truncated (docs/protocol.md §1, "exp ...
# truncated"), and ours may differ by seconds: a request is dropped as expired only when it is
# past exp by more than any plausible skew between the two hosts. Answering in time does not
# depend on it: `Request.deadline` measures from our own receive time.
EXP_LEEWAY: Final = 30.0
# The server's wait as the request states it (exp - iat) is believed up to this: nats-server
# warns above 60 s (docs/protocol.md §3, "Server-side timeout").
MAX_SERVER_TIMEOUT: Final = 120.0
# Taken off the server's wait for the answer's trip back to it.
REPLY_MARGIN: Final = 0.05
_REQUEST_AUDIENCE: Final = "nats-authorization-request"
_RAW_URL = re.compile(r"[A-Za-z0-9_-]+")
# 11 random bytes in base64url = 15 chars today; bound it without betting on the exact size.
_MAX_NONCE = 128
_MAX_SIG_TEXT = 128
# `client_info.kind` as nats-server spells it for the connections it calls out, and the names
# --allow-kind uses (docs/protocol.md §1, client_info). WebSocket and MQTT clients are kind Client
# (their transport is `type`).
CLIENT_KINDS: Final = {"Client": "client", "Leafnode": "leafnode"}


class PolicyError(ValueError):
    """A `Policy` that breaks one of its rules; the message names the flag that sets it."""


# The system account's names in config mode: never placed into, whatever else is configured.
SYSTEM_ACCOUNTS: Final = frozenset({"SYS", "$SYS"})


@dataclass(frozen=True, slots=True)
class AccountSigner:
    """Operator mode: the key that signs one target account's user JWTs. The server places a
    user in the account that issued its JWT (docs/protocol.md §3 check 15), so this key *is* the
    placement: the account's own key, or one of its signing keys."""

    key: SigningKey
    account: str  # the account's public key (A...)

    @property
    def issuer_account(self) -> str | None:
        """Set only when signing with a signing key (docs/protocol.md §5, operator mode)."""
        return None if keys_equal(self.key.public, self.account) else self.account


@dataclass(frozen=True, slots=True)
class Policy:
    """Everything the rules depend on besides the request, the clock and the store."""

    issuer: SigningKey
    account: str
    allowed_accounts: frozenset[str]
    xkeys: tuple[CurveKey, ...] = ()
    internal_keys: tuple[str, ...] = ()
    internal_permissions: Permissions = UNRESTRICTED
    default_permissions: Permissions = UNRESTRICTED
    mode: Literal["enforce", "soft"] = "enforce"
    user_ttl: float = 86400.0
    backend_timeout: float = 1.0
    # Never placed, whatever --allowed-account says: the system account and the callout
    # account (a user there could answer auth requests). Config mode has no server-side
    # check on the user JWT's aud (docs/protocol.md §5, "Placing a user in an account").
    forbidden_accounts: frozenset[str] = SYSTEM_ACCOUNTS
    # Operator mode (empty in config mode): target account name -> its signer; and, when the
    # issuer is a signing key of the callout account, that account's public key. Config mode
    # must never set issuer_account: the server refuses it there (docs/protocol.md §3 check 14).
    signers: Mapping[str, AccountSigner] = field(default_factory=dict)
    issuer_account: str | None = None
    # Failures allowed per key / per source host in `fail_window` seconds before that key or
    # host is denied without a store lookup (0: off). See FailureLimiter.
    fail_limit_key: int = 10
    fail_limit_host: int = 100
    fail_window: float = 10.0
    # Operator mode: account public keys never placed into whatever signer names them (the
    # system account's; the callout account's is refused by its issuer key). Placement there
    # is by key (docs/protocol.md §3 check 15), so the name check above cannot see it.
    forbidden_account_keys: frozenset[str] = frozenset()
    # The connection kinds admitted (`CLIENT_KINDS` values): a leafnode connection is a whole
    # server joining the account, not one client, and must be allowed explicitly.
    allowed_kinds: frozenset[str] = frozenset({"client"})

    def __post_init__(self) -> None:
        if not self.allowed_kinds or not self.allowed_kinds <= set(CLIENT_KINDS.values()):
            raise PolicyError(
                f"allowed_kinds must be a non-empty subset of {sorted(CLIENT_KINDS.values())}"
            )
        if not 0 < self.fail_window < float("inf") or not 0 <= self.user_ttl < float("inf"):
            raise PolicyError("fail_window and user_ttl must be finite (fail_window > 0)")
        if not 0 < self.backend_timeout < float("inf"):
            raise PolicyError("--backend-timeout must be > 0")
        if not SYSTEM_ACCOUNTS <= self.forbidden_accounts:
            raise PolicyError(f"the forbidden accounts must include {', '.join(SYSTEM_ACCOUNTS)}")
        # --account places internal keys and soft-mode admits: it obeys the same rule.
        if bad := sorted((self.allowed_accounts | {self.account}) & self.forbidden_accounts):
            raise PolicyError(
                f"refusing to place users in {', '.join(bad)}: the system and callout accounts"
                " are never allowed (--allowed-account / --account)"
            )
        if self.signers:
            self._check_operator_mode()
        elif self.issuer_account is not None:
            raise PolicyError(
                "--account-signer and --issuer-account are for operator mode (--operator)"
            )

    def _check_operator_mode(self) -> None:
        """Operator mode places a user by the key that signs its JWT (docs/protocol.md §3
        check 15), so the name rules above cannot see where a signer puts users: these do."""
        if missing := sorted((self.allowed_accounts | {self.account}) - self.signers.keys()):
            raise PolicyError(
                f"operator mode: no --account-signer for account(s) {', '.join(missing)}"
            )
        if self.issuer_account is not None:
            try:
                decode_public(self.issuer_account, KeyKind.ACCOUNT)
            except KeyError_ as exc:
                raise PolicyError(f"--issuer-account: {exc}") from None
        callout_keys = {self.issuer.public, self.issuer_account or self.issuer.public}
        for name, signer in self.signers.items():
            if signer.account in callout_keys or signer.key.public in callout_keys:
                raise PolicyError(
                    f"--account-signer {name}: that is the callout account's key; users are"
                    " never placed in the callout account"
                )
        if not self.forbidden_account_keys or not all(
            is_public(key, KeyKind.ACCOUNT) for key in self.forbidden_account_keys
        ):
            raise PolicyError(
                "operator mode: --system-account must be the system account's public key"
                " (A..., the server's `system_account`), so no --account-signer can place"
                " users in it"
            )
        for name, signer in self.signers.items():
            if signer.account in self.forbidden_account_keys:
                raise PolicyError(
                    f"--account-signer {name}: that is the system account's key; users are"
                    " never placed in the system account"
                )


def forbidden_accounts(system_account: str, callout_account: str) -> frozenset[str]:
    """The accounts never placed into, by name, whatever --allowed-account says."""
    return SYSTEM_ACCOUNTS | {system_account, callout_account}


# Request and Decision are values, never changed once built, but not `frozen`: a frozen
# dataclass's __init__ sets each field through object.__setattr__, five times the cost, and
# both are built for every request.
@dataclass(slots=True)
class Request:
    """A request that passed gates 1 and 2: authentic, and the client holds its key."""

    server_id: str
    user_nkey: str
    client_key: str
    exp: float
    internal: bool
    # When the request was encrypted: the server's curve key and the one of ours that opened
    # it, to encrypt the response back the same way.
    xkeys: tuple[nacl.public.PublicKey, CurveKey] | None
    client_host: str = ""
    client_id: int = 0
    client_name: str = ""
    nonce: str = ""
    opened_at: float = 0.0
    # How long the server waits for this answer, as the request says (exp - iat, whole
    # seconds); 0 when iat is missing or implausible.
    server_timeout: float = 0.0

    def deadline(self, received: float, backend_timeout: float) -> float:
        """When the store must have answered: --backend-timeout, and never past the server's
        own wait, so a deny is still heard by a server that is still waiting. Measured from
        our receive time with the span the request states (exp - iat), never by comparing
        the server's exp with our clock: a host seconds ahead of its server would time every
        lookup out at once, one behind would answer after the server gave up."""
        if self.server_timeout > 0:
            return received + min(backend_timeout, self.server_timeout - REPLY_MARGIN)
        return min(received + backend_timeout, self.exp)


@dataclass(slots=True)
class Decision:
    reason: str
    detail: str = ""
    request: Request | None = None
    # Set on admit:
    account: str = ""
    name: str = ""
    permissions: Permissions = UNRESTRICTED
    # Enough of an unauthenticated request to log it (never trusted for a decision).
    client_key: str = ""
    # True: send nothing. Only for requests the server has certainly given up on, and replays
    # (an answer to one could be a second reply to a request already answered).
    drop: bool = False

    @property
    def admit(self) -> bool:
        return self.reason in ADMIT_REASONS

    @property
    def grant(self) -> Grant | None:
        return Grant(self.account, self.permissions) if self.admit else None


# The store's answer, as the shell saw it.
@dataclass(frozen=True, slots=True)
class Found:
    value: bytes


@dataclass(frozen=True, slots=True)
class Missing:
    """No record and no delete marker: the key never had a record (as far as the store knows)."""


@dataclass(frozen=True, slots=True)
class Deleted:
    """The key's last write deleted its record: it had one, and it was taken away."""


@dataclass(frozen=True, slots=True)
class Unavailable:
    detail: str


@dataclass(frozen=True, slots=True)
class TimedOut:
    pass


StoreAnswer = Found | Missing | Deleted | Unavailable | TimedOut


def store_answer(value: bytes | None) -> StoreAnswer:
    """A store lookup's value as the rules see it (`callout.store.Store.get`)."""
    if value is None:
        return Missing()
    if value is TOMBSTONE:
        return Deleted()
    return Found(value)


@dataclass(frozen=True, slots=True)
class Grant:
    """What an admit gave a connection: the account it was placed in and its permissions."""

    account: str
    permissions: Permissions


@dataclass(frozen=True, slots=True)
class FirstSight:
    """The shared replay record (--replay-bucket) had not seen this request."""


@dataclass(frozen=True, slots=True)
class SeenBefore:
    """Another replica (or we) answered this request already."""


ReplayAnswer = FirstSight | SeenBefore | Unavailable | TimedOut

# A synchronous store read (`Store.get_nowait`): the record, None for none; raises WouldBlock
# when only the awaited read can answer, StoreError when the store cannot.
Lookup = Callable[[str], bytes | None]


@dataclass(frozen=True, slots=True)
class Answer:
    """What to do with one request: `body` is the response to send, None to send nothing (a
    request the server has certainly given up on)."""

    decision: Decision
    body: bytes | None


@dataclass(frozen=True, slots=True)
class Pending:
    """A request that passed gates 1 and 2 and waits for I/O before gate 3."""

    request: Request
    # The store's answer when it came from memory; None: the store must be asked.
    store: StoreAnswer | None
    # The shared replay record (--replay-bucket) must be asked.
    replay: bool

    @property
    def wants_store(self) -> bool:
        return self.store is None


def _b64_signature(text: str) -> bytes | None:
    """Client sigs come as RawURL base64 (Go) or padded standard base64 (nats-py); the server
    tries RawURL then Std (docs/protocol.md §1, "Encoding"). Strict: stray characters are
    garbage."""
    try:
        if _RAW_URL.fullmatch(text):
            if len(text) % 4 == 1:
                return None
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _parse_record(value: bytes) -> UserRecord | RecordError:
    try:
        return parse_record(value)
    except RecordError as exc:
        return exc


def _uniform(random: bytes) -> float:
    """A float in [-1, 1) from 8 random bytes (53 of their bits: a double's precision)."""
    return (int.from_bytes(random, "big") >> 11) / (1 << 52) - 1.0


# Parsed records kept per Authorizer (see `_record`).
_RECORD_CACHE: Final = 16384
_JTI_BYTES: Final = 12
_XKEY_NONCE: Final = 24


def _is_internal(client_key: str, internal_keys: tuple[str, ...]) -> bool:
    # Compare against every configured key without stopping at the first match.
    found = False
    for key in internal_keys:
        found |= keys_equal(client_key, key)
    return found


def _str(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise _Malformed(f"{key} missing or not a string")
    return value


class _Malformed(Exception):
    pass


def _placeable(policy: Policy, account: str) -> bool:
    if account in policy.forbidden_accounts or account not in policy.allowed_accounts:
        return False
    if not policy.signers:
        return True
    # Operator mode: an account we hold no signer for cannot be placed into, nor one whose
    # key is forbidden, whatever name the signer was given.
    signer = policy.signers.get(account)
    return signer is not None and signer.account not in policy.forbidden_account_keys


def _record_grant(policy: Policy, record: UserRecord) -> Grant | tuple[str, str]:
    """What a parsed record grants, or the deny (reason, detail)."""
    if record.revoked:
        return REVOKED, "record is revoked"
    account = record.account or policy.account
    if not _placeable(policy, account):
        return ACCOUNT_NOT_ALLOWED, f"record names account {account!r}"
    # admin: full access within its account, as internal identities get by default.
    return Grant(account, UNRESTRICTED if record.admin else record.permissions)


def still_admits(policy: Policy, granted: Grant, answer: StoreAnswer) -> bool:
    """Whether a live connection admitted with `granted` may keep it now that the store says
    `answer` (a change to its record, or a reload of the whole bucket): only when the answer
    would admit the user again into the same account with the same or wider permissions, or
    the record says to keep its sessions. Anything else — revoked, deleted, invalid, placed
    elsewhere, narrowed, or wider in a way `Permissions.covers` cannot prove — ends it: a
    needless kick costs a reconnect, a missed one leaves access that was taken away."""
    match answer:
        case Found(value):
            record = _parse_record(value)
            if isinstance(record, RecordError):
                return False
            if record.keep_sessions:
                return True
            now = _record_grant(policy, record)
            if not isinstance(now, Grant):
                return False
        case Missing() if policy.mode == "soft" and _placeable(policy, policy.account):
            now = Grant(policy.account, policy.default_permissions)
        case _:
            return False
    return now.account == granted.account and now.permissions.covers(granted.permissions)


@dataclass(slots=True)
class Authorizer:
    """The sans-I/O core: request bytes + clock + store answer in, response bytes out."""

    policy: Policy
    seen: SeenRequests = field(default_factory=SeenRequests)
    seen_nonces: SeenRequests = field(default_factory=SeenRequests)
    # n -> n random bytes: the JWT ids, the spread of user JWT expiries, xkey nonces.
    random: Callable[[int], bytes] = secrets.token_bytes
    failures_by_key: FailureLimiter = field(init=False)
    failures_by_host: FailureLimiter = field(init=False)
    _records: dict[bytes, UserRecord | RecordError] = field(init=False, repr=False)
    _boxes: xkey.Boxes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        policy = self.policy
        self.failures_by_key = FailureLimiter(policy.fail_limit_key, policy.fail_window)
        self.failures_by_host = FailureLimiter(policy.fail_limit_host, policy.fail_window)
        self._records = {}
        self._boxes = xkey.Boxes()

    # -- the driver -----------------------------------------------------------------------------
    def start(
        self,
        payload: bytes,
        headers: Mapping[str, str] | None,
        now: float,
        lookup: Lookup | None = None,
        *,
        replay: bool = False,
        valid_at: float | None = None,
    ) -> Answer | Pending:
        """One request, as far as it goes without I/O. `lookup` reads the store without waiting
        (None: every lookup waits); `replay`: the shared replay record must be asked too;
        `valid_at`: the clock the request itself is judged by (`open`), `now` unless given."""
        request: Request | None = None
        try:
            opened = self.open(payload, headers, now, valid_at=valid_at)
            if isinstance(opened, Decision):
                return self._answer(opened, now)
            request = opened
            if request.internal:
                return self._answer(self.decide(request, None), now)
            known: StoreAnswer | None = None
            if lookup is not None:
                try:
                    value = lookup(request.client_key)
                except WouldBlock:
                    pass
                except StoreError as exc:
                    known = Unavailable(str(exc))
                else:
                    known = store_answer(value)
            if known is None or replay:
                return Pending(request, known, replay)
            return self._answer(self.decide(request, known), now)
        except Exception as exc:  # fail closed: a bug must deny, never admit or go silent
            return self._failure(request, f"{type(exc).__name__} in the decision core", now)

    def resume(
        self,
        pending: Pending,
        from_store: StoreAnswer | None,
        replay_answer: ReplayAnswer | None,
        now: float,
    ) -> Answer:
        """Gate 3 for a `Pending`, with what the store and the shared replay record answered
        (each None when it was not asked; the store's answer from memory, when `start` had
        it, is used instead of `from_store`)."""
        try:
            answer = pending.store if pending.store is not None else from_store
            decision = self.decide(pending.request, answer, replay_answer)
            return self._answer(decision, now)
        except Exception as exc:  # fail closed, as in start
            return self._failure(pending.request, f"{type(exc).__name__} in the decision core", now)

    def abort(self, pending: Pending, detail: str, now: float) -> Answer:
        """The shell could not get a `Pending` its answers (a bug in its I/O): a deny."""
        return self._failure(pending.request, detail, now)

    def _answer(self, decision: Decision, now: float) -> Answer:
        return Answer(decision, None if decision.drop else self.respond(decision, now))

    def _failure(self, request: Request | None, detail: str, now: float) -> Answer:
        decision = self.fail(request, detail)
        try:
            return Answer(decision, self.respond(decision, now))
        except Exception:
            return Answer(decision, b"")  # the empty body is still an immediate deny

    # -- gate 1 and 2 -------------------------------------------------------------------------
    def open(
        self,
        payload: bytes,
        headers: Mapping[str, str] | None,
        now: float,
        *,
        valid_at: float | None = None,
    ) -> Request | Decision:
        """`now` is the policy's clock (the failure limits, `Request.opened_at`); `valid_at`
        the clock the request itself is judged by (exp, nbf, the replay memory), `now` unless
        given. They differ only in a replay that decides recorded requests at another time."""
        policy = self.policy
        if len(payload) > MAX_REQUEST_BYTES:
            return Decision(OVERSIZE, f"{len(payload)} bytes")
        header_xkey = (headers or {}).get(xkey.HEADER)
        xkeys: tuple[nacl.public.PublicKey, CurveKey] | None = None
        token = payload
        sealed = xkey.is_sealed(payload)
        if sealed or header_xkey is not None:
            if not policy.xkeys:
                return Decision(XKEY_UNEXPECTED, "request is encrypted; configure --xkey-seed-file")
            if not sealed or header_xkey is None:
                return Decision(
                    XKEY_FAILED, f"{xkey.HEADER} header and xkv1 payload must come together"
                )
            try:
                server_xkey = xkey.server_key(header_xkey)
                token, ours = xkey.open_box(payload, server_xkey, policy.xkeys, self._boxes)
                xkeys = (server_xkey, ours)
            except xkey.XkeyError as exc:
                return Decision(XKEY_FAILED, str(exc))
        try:
            claims = jwt.decode(token, KeyKind.SERVER).claims
        except jwt.TokenError as exc:
            return Decision(FORGED if exc.signature else MALFORMED, exc.detail)
        try:
            return self._check_claims(
                claims, header_xkey, xkeys, now, now if valid_at is None else valid_at
            )
        except _Malformed as exc:
            return Decision(MALFORMED, str(exc))

    def _check_claims(
        self,
        claims: dict[str, Any],
        header_xkey: str | None,
        xkeys: tuple[nacl.public.PublicKey, CurveKey] | None,
        now: float,
        valid_at: float,
    ) -> Request | Decision:
        nats = claims.get("nats")
        if not isinstance(nats, dict):
            raise _Malformed("nats claims missing")
        version = nats.get("version")
        if nats.get("type") != "authorization_request" or type(version) is not int or version != 2:
            raise _Malformed("not a v2 authorization_request")
        server = nats.get("server_id")
        if not isinstance(server, dict):
            raise _Malformed("server_id missing")
        server_id = _str(server, "id")
        user_nkey = _str(nats, "user_nkey")
        issuer = _str(claims, "iss")
        exp = claims.get("exp")
        if type(exp) is not int:
            raise _Malformed("exp missing or not an integer")
        iat = claims.get("iat")
        span = exp - iat if type(iat) is int else 0
        server_timeout = float(span) if 0 < span <= MAX_SERVER_TIMEOUT else 0.0
        client_info = nats.get("client_info") or {}
        connect_opts = nats.get("connect_opts") or {}
        if not isinstance(client_info, dict) or not isinstance(connect_opts, dict):
            raise _Malformed("client_info / connect_opts not objects")
        host = client_info.get("host", "")
        cid = client_info.get("id", 0)
        cname = connect_opts.get("name", "")
        if not isinstance(host, str) or type(cid) is not int or not isinstance(cname, str):
            raise _Malformed("client_info.host, client_info.id or connect_opts.name mistyped")
        cname = cname[:128]
        claimed = connect_opts.get("nkey")
        claimed = claimed if isinstance(claimed, str) else ""
        # What we may log and audit as the client: only a well-formed public key. The field
        # is the client's own text; a confused client could put its seed there.
        shown = claimed if is_public(claimed, KeyKind.USER) else ""

        def deny(reason: str, detail: str) -> Decision:
            return Decision(reason, detail, client_key=shown)

        # The request is signed by `iss`; it must be the server that says it sent it, or
        # any server key could speak for any other (docs/protocol.md §4, "Verifying the request").
        if not keys_equal(issuer, server_id):
            return deny(WRONG_SERVER, "iss is not nats.server_id.id")
        if claims.get("aud") != _REQUEST_AUDIENCE:
            return deny(NOT_FOR_US, "aud is not nats-authorization-request")
        if header_xkey is not None and server.get("xkey") != header_xkey:
            return deny(WRONG_SERVER, "server_id.xkey does not match the Nats-Server-Xkey header")
        if valid_at > exp + EXP_LEEWAY:
            return Decision(
                EXPIRED, f"expired {valid_at - exp:.1f}s ago", client_key=shown, drop=True
            )
        nbf = claims.get("nbf")
        if nbf is not None and type(nbf) is not int:
            raise _Malformed("nbf is not an integer")
        if nbf is not None and valid_at + EXP_LEEWAY < nbf:
            return deny(NOT_YET_VALID, "nbf is in the future")
        try:
            decode_public(user_nkey, KeyKind.USER)
        except KeyError_:
            raise _Malformed("user_nkey is not a user public key") from None

        sig_text, nonce = connect_opts.get("sig"), client_info.get("nonce")
        nonce = nonce if isinstance(nonce, str) else ""

        # Gate 1 passed: from here on, deny with a signed error response.
        def refuse(reason: str, detail: str, *, drop: bool = False) -> Decision:
            request = Request(
                server_id, user_nkey, shown, float(exp), False, xkeys, host, cid, cname,
                nonce[:_MAX_NONCE], now, server_timeout,
            )  # fmt: skip
            if drop:
                return Decision(reason, detail, request, client_key=shown, drop=True)
            if reason in _HOST_FAILURES:
                # A host that keeps failing is refused as `throttled` (not counted again: the
                # retries of the clients behind it must not keep it throttled); this never
                # touches a request whose signature verifies, see below.
                if self.failures_by_host.throttled(host, now):
                    return Decision(
                        THROTTLED, f"host over its failure rate ({reason})", request,
                        client_key=shown,
                    )  # fmt: skip
                self.failures_by_host.failed(host, now)
            return Decision(reason, detail, request, client_key=shown)

        if self.policy.xkeys and xkeys is None:
            return refuse(
                XKEY_REQUIRED, "request is plaintext: the server has no auth_callout xkey"
            )
        until = exp + EXP_LEEWAY
        if not self.seen.first_sight(server_id, user_nkey, until, valid_at):
            # The same request again: never answered. If the server still listens on its
            # inbox, a second reply there can disconnect the client the first one admitted
            # (docs/protocol.md §3, "two replies"). Dropped, logged and counted instead.
            return refuse(REPLAY, "this server's user_nkey was seen before", drop=True)
        if nonce and not self.seen_nonces.first_sight(server_id, nonce, until, valid_at):
            # A new request (its own user_nkey and inbox, which only the server can sign) for
            # a nonce already used: the server calling a connection out again (a config
            # reload does), or a CONNECT replayed to it. A deny to the fresh inbox is safe
            # and spares the client the server's timeout.
            return refuse(REPLAY, "this server's client nonce was answered before")

        # Gate 2: the client's signature over the nonce, before any limiter: a client whose
        # signature verifies is never refused for its host (a NAT, a load balancer or a proxy
        # in front of it may carry a failing client too). A request with no key at all costs
        # nothing and proves nothing: it counts against no one.
        if not claimed:
            return refuse(NO_NKEY, "client presented no nkey")
        try:
            client_raw = decode_public(claimed, KeyKind.USER)
        except KeyError_ as exc:
            return refuse(BAD_NKEY, str(exc))
        if not isinstance(sig_text, str) or not sig_text or not nonce:
            return refuse(NO_SIGNATURE, "no sig, or no nonce in the request")
        if len(sig_text) > _MAX_SIG_TEXT or len(nonce) > _MAX_NONCE:
            return refuse(BAD_SIGNATURE, "sig or nonce too long")
        signature = _b64_signature(sig_text)
        if signature is None or len(signature) != 64:
            return refuse(BAD_SIGNATURE, "sig is not base64 of 64 bytes")
        if not verify(client_raw, nonce.encode(), signature):
            return refuse(BAD_SIGNATURE, "sig does not verify over the nonce")
        # A leafnode is a whole server joining the account on a user's key: only when allowed.
        kind = client_info.get("kind")
        if (CLIENT_KINDS.get(kind) if isinstance(kind, str) else None) not in (
            self.policy.allowed_kinds
        ):
            shown_kind = kind[:40] if isinstance(kind, str) else type(kind).__name__
            return refuse(KIND_NOT_ALLOWED, f"connection kind {shown_kind!r} not in --allow-kind")
        # Only the key's holder can make it fail from here on (unknown, revoked...): a key
        # that keeps failing is refused without a store lookup. Internal keys are exempt:
        # they are how operators get in during an incident.
        internal = _is_internal(claimed, self.policy.internal_keys)
        if not internal and self.failures_by_key.throttled(claimed, now):
            return refuse(THROTTLED, "key over its failure rate")
        return Request(
            server_id=server_id,
            user_nkey=user_nkey,
            client_key=claimed,
            exp=float(exp),
            internal=internal,
            xkeys=xkeys,
            client_host=host,
            client_id=cid,
            client_name=cname,
            nonce=nonce,
            opened_at=now,
            server_timeout=server_timeout,
        )

    # -- gate 3 -------------------------------------------------------------------------------
    def decide(
        self, request: Request, answer: StoreAnswer | None, replay: ReplayAnswer | None = None
    ) -> Decision:
        """`answer` is None only for internal keys, which are never looked up. `replay` is the
        shared replay record's answer (--replay-bucket), None when there is none."""
        decision = self._decide(request, answer, replay)
        if decision.reason in _KEY_FAILURES:
            self.failures_by_key.failed(request.client_key, request.opened_at)
            self.failures_by_host.failed(request.client_host, request.opened_at)
        return decision

    def _decide(
        self, request: Request, answer: StoreAnswer | None, replay: ReplayAnswer | None
    ) -> Decision:
        policy = self.policy
        # The default account is checked like a record's: never SYS or the callout account,
        # whatever the configuration says (the CLI refuses it too; this is the rule).
        if (request.internal or isinstance(answer, Missing)) and not self._placeable(
            policy.account
        ):
            return Decision(
                ACCOUNT_NOT_ALLOWED,
                f"default account {policy.account!r} may not be placed into",
                request,
                client_key=request.client_key,
            )
        if request.internal:
            return Decision(
                ADMIT_INTERNAL,
                "",
                request,
                policy.account,
                "internal",
                policy.internal_permissions,
                request.client_key,
            )
        # The shared replay record fails closed like the store, except for internal keys.
        match replay:
            case SeenBefore():
                return Decision(REPLAY, "answered before (shared replay record)", request,
                                client_key=request.client_key, drop=True)  # fmt: skip
            case Unavailable(detail):
                return Decision(STORE_UNAVAILABLE, f"replay record: {detail}", request,
                                client_key=request.client_key)  # fmt: skip
            case TimedOut():
                return Decision(STORE_TIMEOUT, "replay record did not answer in time", request,
                                client_key=request.client_key)  # fmt: skip
        match answer:
            case Found(value):
                record = self._record(value)
                if isinstance(record, RecordError):
                    return Decision(
                        RECORD_INVALID, str(record), request, client_key=request.client_key
                    )
                return self._decide_record(request, record)
            case Deleted():
                # Soft mode too: a deleted record was a decision to take access away, and
                # admitting with the default permissions could widen it.
                return Decision(
                    UNKNOWN_USER,
                    "record was deleted",
                    request,
                    client_key=request.client_key,
                )
            case Missing():
                if policy.mode == "soft":
                    return Decision(
                        WOULD_DENY,
                        "no record; soft mode admits",
                        request,
                        policy.account,
                        "",
                        policy.default_permissions,
                        request.client_key,
                    )
                return Decision(
                    UNKNOWN_USER, "no record for this key", request, client_key=request.client_key
                )
            case Unavailable(detail):
                return Decision(STORE_UNAVAILABLE, detail, request, client_key=request.client_key)
            case TimedOut():
                return Decision(
                    STORE_TIMEOUT,
                    "store did not answer in time",
                    request,
                    client_key=request.client_key,
                )
            case None:
                return Decision(
                    INTERNAL_ERROR,
                    "no store answer for a non-internal key",
                    request,
                    client_key=request.client_key,
                )

    def _decide_record(self, request: Request, record: UserRecord) -> Decision:
        grant = _record_grant(self.policy, record)
        if isinstance(grant, Grant):
            return Decision(
                ADMIT, "", request, grant.account, record.name, grant.permissions,
                request.client_key,
            )  # fmt: skip
        reason, detail = grant
        return Decision(reason, detail, request, client_key=request.client_key)

    def _record(self, value: bytes) -> UserRecord | RecordError:
        """Records are immutable values and the same ones come back connect after connect; the
        parse (JSON, every subject checked) is kept by the bytes themselves, bounded."""
        record = self._records.get(value)
        if record is None:
            if len(self._records) >= _RECORD_CACHE:
                del self._records[next(iter(self._records))]  # the oldest parse
            record = self._records[value] = _parse_record(value)
        return record

    def _placeable(self, account: str) -> bool:
        return _placeable(self.policy, account)

    def fail(self, request: Request | None, detail: str) -> Decision:
        """The shell's catch-all: any exception becomes a deny."""
        return Decision(
            INTERNAL_ERROR, detail, request, client_key=request.client_key if request else ""
        )

    # -- the response -------------------------------------------------------------------------
    def respond(self, decision: Decision, now: float, jitter: float | None = None) -> bytes:
        """The response bytes for `decision`. `jitter` in [-1, 1] scales the ±10% spread of the
        user JWT's exp (random when None), so JWTs issued in one reconnect storm do not all
        expire together."""
        request = decision.request
        if request is None:
            # We cannot address a signed error: the empty body is the server's immediate deny.
            return b""
        policy = self.policy
        issued = int(now)
        nats: dict[str, Any] = {"type": "authorization_response", "version": 2}
        # One draw for the whole response: the response's jti, and for an admit the user
        # JWT's jti and its expiry's spread.
        random = self.random(2 * _JTI_BYTES + 8 if decision.admit else _JTI_BYTES)
        if decision.admit:
            if jitter is None:
                jitter = _uniform(random[2 * _JTI_BYTES :])
            user_nats: dict[str, Any] = {
                **decision.permissions.claims(),
                "subs": -1,
                "data": -1,
                "payload": -1,
                "type": "user",
                "version": 2,
            }
            signer = policy.signers.get(decision.account)
            if signer is None:
                # Config mode: the issuer signs, and `aud` (the account *name*) places the user.
                user_signer, audience = policy.issuer, decision.account
            else:
                user_signer, audience = signer.key, signer.account
                if signer.issuer_account is not None:
                    user_nats["issuer_account"] = signer.issuer_account
            user: dict[str, Any] = {
                "jti": random[_JTI_BYTES : 2 * _JTI_BYTES].hex(),
                "iat": issued,
                "iss": user_signer.public,
                "sub": request.user_nkey,
                "aud": audience,
                "nats": user_nats,
            }
            if decision.name:
                user["name"] = decision.name
            if policy.user_ttl > 0:
                user["exp"] = int(now + policy.user_ttl * (1.0 + 0.1 * jitter))
            nats["jwt"] = jwt.encode(user, user_signer).decode()
        else:
            nats["error"] = decision.reason
        if policy.issuer_account is not None:
            nats["issuer_account"] = policy.issuer_account
        response = {
            "jti": random[:_JTI_BYTES].hex(),
            "iat": issued,
            "iss": policy.issuer.public,
            "sub": request.user_nkey,
            "aud": request.server_id,
            "nats": nats,
        }
        body = jwt.encode(response, policy.issuer)
        if request.xkeys is not None:
            server_key, ours = request.xkeys
            return xkey.seal(body, ours, server_key, self._boxes, self.random(_XKEY_NONCE))
        return body
