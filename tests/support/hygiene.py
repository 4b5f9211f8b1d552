"""The log-hygiene scanner: what a seed, a JWT, a signature or an xkey-sealed payload looks like
in text, and `scan`, which names every such leak (and every given secret) found."""

from __future__ import annotations

import re
from collections.abc import Iterable

KNOWN_LEAKS: set[str] = set()


SEED = re.compile(r"S[OANCUX][A-Z2-7]{56}")


JWT = re.compile(r"eyJ")


# A sealed payload starts with b"xkv1" and a random nonce. The word itself in the core's fixed
# detail texts ("payload is not an xkv1 box") names the format and is followed by a space.
XKV = re.compile(r"xkv1(?! )")


def scan(text: str, secrets: Iterable[str] = ()) -> list[str]:
    """Every place `text` shows something that must never be logged."""
    found = [f"seed {m.group()[:6]}... at {m.start()}" for m in SEED.finditer(text)]
    found += [
        f"JWT at {m.start()}: {text[m.start() : m.start() + 24]!r}" for m in JWT.finditer(text)
    ]
    for pattern in B64_RUNS:
        found += [f"base64 run of {len(m.group())} at {m.start()}" for m in pattern.finditer(text)]
    found += [f"xkv1 at {m.start()}" for m in XKV.finditer(text)]
    found += [f"known secret {s[:6]}..." for s in sorted(secrets) if s and s in text]
    return found


# A signature is 86 (RawURL) or 88 (padded standard) characters of one base64 alphabet. Runs
# are taken per alphabet so that a file path (which mixes '/' with '-' or '_') is not one.
B64_RUNS = (re.compile(r"[A-Za-z0-9+/]{80,}={0,2}"), re.compile(r"[A-Za-z0-9_-]{80,}"))
