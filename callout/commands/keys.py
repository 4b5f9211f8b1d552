"""`callout keys generate`: the three seeds a deployment needs, as 0600 files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from callout.errors import fail
from callout.keys import CurveKey, KeyKind, SigningKey, write_secret
from callout.settings import KeysSettings, add_flags, from_args

KEY_FILES = {"issuer": "issuer.nk", "service": "service.nk", "xkey": "xkey.nk"}


def generate_keys(out: Path) -> dict[str, str]:
    """Write the three seeds (0600) into `out`; refuse to overwrite. Returns the public keys."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = [name for name in KEY_FILES.values() if (out / name).exists()]
    if existing:
        fail(f"{out} already holds {', '.join(existing)}; refusing to overwrite keys")
    issuer, service, xk = (
        SigningKey.generate(KeyKind.ACCOUNT),
        SigningKey.generate(KeyKind.USER),
        CurveKey.generate(),
    )
    write_secret(out / KEY_FILES["issuer"], issuer.seed)
    write_secret(out / KEY_FILES["service"], service.seed)
    write_secret(out / KEY_FILES["xkey"], xk.seed)
    return {"issuer": issuer.public, "service": service.public, "xkey": xk.public}


def keys(args: argparse.Namespace) -> int:
    settings = from_args(KeysSettings, args)
    publics = generate_keys(Path(settings.out))
    sys.stdout.write(orjson.dumps({**publics, "dir": settings.out}).decode() + "\n")
    print(
        "put these in nats.conf: auth_callout { issuer: "
        f"{publics['issuer']}, auth_users: [{publics['service']}], xkey: {publics['xkey']} }}",
        file=sys.stderr,
    )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("keys", help="key material")
    actions = p.add_subparsers(dest="action", required=True)
    g = actions.add_parser("generate", help="issuer, service and xkey seeds as 0600 files")
    add_flags(g, KeysSettings)
    p.set_defaults(run=keys)
