"""The official Go client (nats.go) and the JS client (npm `nats`) connecting through callout
against a real nats-server: they sign the nonce in their own base64 forms and handle
`Authorization Violation`, permission errors and reconnects their own way.

Each client is a small program (`go/main.go`, `js/client.js`) that prints what happens to it
as JSON lines. `./run test` installs what they need (Debian's golang-go and
golang-github-nats-io-go-nats-dev; the JS client with `npm ci` from the committed lock file
into build/clients/js); the Go program is built once per test session into build/clients/go,
in GOPATH mode, offline. Without Go or node the tests are skipped with the reason, except in
CI (CI=true), where a missing client is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.nats import Keys, NatsServer, nats_connect
from tests.support.service import Subprocess, users_bucket

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parents[1] / "clients"
BUILD = REPO / "build" / "clients"
GOPATH_SYSTEM = Path("/usr/share/gocode")
NATS_GO = GOPATH_SYSTEM / "src" / "github.com" / "nats-io" / "nats.go"


class Missing(Exception):
    """A client cannot run here; the message says why (and what installs it)."""


@dataclass(frozen=True)
class Client:
    name: str
    argv: list[str]  # the program; then URL, SEEDFILE, COMMAND [ARG]
    env: dict[str, str]

    def command(self, url: str, seed: Path, *args: str) -> list[str]:
        if self.name == "go":
            return [*self.argv, "-url", url, "-seed", str(seed), *args]
        return [*self.argv, url, str(seed), *args]


def go_client() -> Client:
    """Build the Go program (only when main.go is newer than the binary)."""
    go = shutil.which("go")
    if go is None or not NATS_GO.is_dir():
        raise Missing(
            "no Go with nats.go (apt-get install golang-go golang-github-nats-io-go-nats-dev)"
        )
    source = HERE / "go" / "main.go"
    binary = BUILD / "go" / "client"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPATH": f"{GOPATH_SYSTEM}:{BUILD / 'gopath'}",
            "GOFLAGS": "",
            "GOCACHE": str(BUILD / "gocache"),
        }
        built = subprocess.run(
            [go, "build", "-o", str(binary), str(source)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if built.returncode != 0:
            raise RuntimeError(f"go build failed:\n{built.stderr}")
    return Client("go", [str(binary)], {})


def js_client() -> Client:
    node = shutil.which("node")
    modules = BUILD / "js" / "node_modules"
    if node is None or not (modules / "nats").is_dir():
        raise Missing("no node with the nats package (./run test installs it with npm ci)")
    return Client("js", [node, str(HERE / "js" / "client.js")], {"NODE_PATH": str(modules)})


@dataclass
class Deployment:
    server: NatsServer
    service: Subprocess
    keys: Keys
    seeds: Path  # a directory for client seed files

    async def put(self, key: str, value: bytes) -> None:
        """Write one record to the users bucket, as the service identity."""
        admin = await nats_connect(self.server.url, self.keys.service_seed)
        try:
            await (await users_bucket(admin)).put(key, value)
        finally:
            await admin.close()
