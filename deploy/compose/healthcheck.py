"""Container healthcheck for `callout serve` (the image's HEALTHCHECK runs it).

With CALLOUT_METRICS_ADDR set (compose sets it), healthy means the service's own `/readyz`
answers 200: connected, subscribed, and the users store reachable or its cache live. A replica
that can only serve internal identities (store down) reports unhealthy, with the reason.

Without it, the fallback: healthy (exit 0) while some process in the container holds an
ESTABLISHED TCP connection to a port of one of the NATS servers in CALLOUT_NATS_URL: in the
callout container that process is the service, so this proves it is alive and connected
(nats-py drops the socket while it
reconnects). It reads the container's own /proc/net/tcp{,6}, so it needs no tools the slim
image lacks (ps, ss, curl) and sends nothing to NATS.

That fallback cannot tell that the subscription is live or that the store answers.
Standard library only: it runs with the image's Python and nothing else.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from urllib.parse import urlsplit

DEFAULT_PORT = 4222
TCP_ESTABLISHED = "01"  # the `st` column of /proc/net/tcp (include/net/tcp_states.h)
TABLES = ("/proc/net/tcp", "/proc/net/tcp6")


def nats_ports(urls: str) -> set[int]:
    """Ports of a comma-separated NATS URL list, as `callout serve --nats-url` takes it."""
    ports: set[int] = set()
    for url in urls.split(","):
        url = url.strip()
        if not url:
            continue
        if "://" not in url:
            url = "nats://" + url
        try:
            port = urlsplit(url).port
        except ValueError:
            continue
        ports.add(port or DEFAULT_PORT)
    return ports


def established_remote_ports(tables: Iterable[str] = TABLES) -> set[int]:
    ports: set[int] = set()
    for table in tables:
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue  # no IPv6 in this container, for instance
        for row in rows:
            fields = row.split()
            # sl local_address rem_address st ...; addresses are HEXIP:HEXPORT
            if len(fields) > 3 and fields[3] == TCP_ESTABLISHED:
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


def readyz(addr: str) -> int:
    """Probe /readyz on the port of --metrics-addr (HOST:PORT, or :PORT for all interfaces)."""
    port = addr.rsplit(":", 1)[-1]
    url = f"http://127.0.0.1:{port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {exc.read().decode('utf-8', 'replace').strip()[:200]}")
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}")
    return 1


def main() -> int:
    metrics = os.environ.get("CALLOUT_METRICS_ADDR", "")
    if metrics:
        return readyz(metrics)
    wanted = nats_ports(os.environ.get("CALLOUT_NATS_URL", "")) or {DEFAULT_PORT}
    if established_remote_ports() & wanted:
        return 0
    print(f"unhealthy: no established connection to a NATS port {sorted(wanted)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
