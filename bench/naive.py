"""A naive auth callout, written the way one would by hand with nats-py: the simple thing
`bench.runner` measures callout against, in the same run.

    python -m bench.naive --url nats://127.0.0.1:4222 --nkey-seed-file service.nk \
        --issuer-seed-file issuer.nk --users-file users.txt [--account APP]

One subscription in a queue group; each message handled to completion in its callback (no
task per request, so in arrival order); the allowed user keys in an in-memory set; the same
four signature operations as callout (verify the server's request, verify the client's
nonce signature, sign the user JWT, sign the response). Nothing else: no xkey, no store, no
replay record, no limiter, no log line, no metrics, no CRC check of the keys. It does not
import callout and runs under plain `asyncio.run`, as such a script would (`--uvloop` runs it
under uvloop instead, to tell how much of callout's lead is the event loop's).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing
import nats
import nkeys
import orjson
from nats.aio.msg import Msg

HEADER = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=")


def b64d(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def verify_key(public: str) -> nacl.signing.VerifyKey:
    """An nkey public key (base32: prefix byte, 32 bytes, CRC16) as a libsodium verify key."""
    raw = base64.b32decode(public + "=" * (-len(public) % 8))
    return nacl.signing.VerifyKey(raw[1:33])


def encode(claims: dict[str, Any], signer: nkeys.KeyPair) -> bytes:
    body = HEADER + b"." + base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=")
    return body + b"." + base64.urlsafe_b64encode(signer.sign(body)).rstrip(b"=")


class Naive:
    def __init__(self, issuer: nkeys.KeyPair, account: str, allowed: set[str]) -> None:
        self.issuer = issuer
        self.issuer_pub = issuer.public_key.decode()
        self.account = account
        self.allowed = allowed

    def answer(self, token: bytes) -> bytes:
        head, payload, sig = token.split(b".")
        claims = orjson.loads(b64d(payload))
        # 1. the server signed the request
        verify_key(claims["iss"]).verify(head + b"." + payload, b64d(sig))
        request = claims["nats"]
        user_nkey = request["user_nkey"]
        opts = request["connect_opts"]
        nkey = opts.get("nkey", "")
        now = int(time.time())
        error = ""
        try:
            # 2. the client signed the server's nonce with the key it claims
            # Go clients send RawURL base64, nats-py padded standard base64.
            raw = b64d(opts["sig"].rstrip("=").replace("+", "-").replace("/", "_"))
            verify_key(nkey).verify(request["client_info"]["nonce"].encode(), raw)
        except (KeyError, ValueError, nacl.exceptions.BadSignatureError):
            error = "bad signature"
        if not error and nkey not in self.allowed:
            error = "unknown user"
        response: dict[str, Any] = {"type": "authorization_response", "version": 2}
        if error:
            response["error"] = error
        else:
            user = {
                "jti": secrets.token_hex(12),
                "iat": now,
                "iss": self.issuer_pub,
                "sub": user_nkey,
                "aud": self.account,
                "nats": {"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1},
            }
            # 3. the user JWT
            response["jwt"] = encode(user, self.issuer).decode()
        # 4. the response
        return encode(
            {
                "jti": secrets.token_hex(12),
                "iat": now,
                "iss": self.issuer_pub,
                "sub": user_nkey,
                "aud": claims["nats"]["server_id"]["id"],
                "nats": response,
            },
            self.issuer,
        )

    async def on_message(self, msg: Msg) -> None:
        try:
            body = self.answer(msg.data)
        except Exception:
            body = b""  # the server's immediate deny
        await msg.respond(body)


async def serve(a: argparse.Namespace) -> None:
    naive = Naive(
        nkeys.from_seed(Path(a.issuer_seed_file).read_bytes().strip()),  # noqa: ASYNC240
        a.account,
        set(Path(a.users_file).read_text().split()),  # noqa: ASYNC240
    )
    nc = await nats.connect(a.url, nkeys_seed=a.nkey_seed_file, name="naive-callout")
    await nc.subscribe("$SYS.REQ.USER.AUTH", queue="callout", cb=naive.on_message)
    await nc.flush()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("--nkey-seed-file", required=True, help="the service's user seed")
    p.add_argument("--issuer-seed-file", required=True, help="auth_callout issuer account seed")
    p.add_argument("--users-file", required=True, help="allowed user public keys, one a line")
    p.add_argument("--account", default="APP")
    p.add_argument("--uvloop", action="store_true", help="run under uvloop, not asyncio.run")
    a = p.parse_args()
    if a.uvloop:
        import uvloop

        uvloop.run(serve(a))
    else:
        asyncio.run(serve(a))


if __name__ == "__main__":
    main()
