"""Throw-away certificates for TLS tests, made with the `openssl` command line (the
`cryptography` package is not a dependency): a CA, a server certificate for 127.0.0.1 and
localhost, client certificates, and a second, unrelated CA to be wrong with.

P-256 keys: generated in milliseconds, where RSA would dominate the test's run time.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "2"
_CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise FileNotFoundError("the TLS tests need the openssl command line tool")
    done = subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=30
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed:\n{done.stderr}")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def new_ca(directory: Path, name: str) -> Pair:
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *_CURVE,
        "-keyout", str(pair.key), "-out", str(pair.cert), "-days", _DAYS,
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return pair


def issue(ca: Pair, directory: Path, name: str, *, server: bool) -> Pair:
    """A leaf certificate signed by `ca`: for 127.0.0.1/localhost (server) or a client."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = Pair(directory / f"{name}.pem", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    if server:
        lines += ["extendedKeyUsage=serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    else:
        lines += ["extendedKeyUsage=clientAuth", f"subjectAltName=DNS:{name}"]
    extensions.write_text("\n".join(lines) + "\n")
    _openssl(
        "req", "-new", *_CURVE, "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pair.cert), "-days", _DAYS, "-extfile", str(extensions),
        cwd=directory,
    )  # fmt: skip
    pair.key.chmod(0o600)
    return pair


@dataclass(frozen=True)
class Pki:
    ca: Pair
    server: Pair
    client: Pair  # the service's client certificate
    user: Pair  # the connecting users' client certificate
    rogue_ca: Pair  # a CA that signed nothing here: verifying against it fails

    def client_context(self, pair: Pair | None = None) -> ssl.SSLContext:
        """What a nats-py client needs: trust our CA, and present `pair` for mutual TLS."""
        context = ssl.create_default_context(cafile=str(self.ca.cert))
        if pair is not None:
            context.load_cert_chain(str(pair.cert), str(pair.key))
        return context


def make_pki(directory: Path) -> Pki:
    ca = new_ca(directory, "ca")
    return Pki(
        ca=ca,
        server=issue(ca, directory, "server", server=True),
        client=issue(ca, directory, "callout", server=False),
        user=issue(ca, directory, "user", server=False),
        rogue_ca=new_ca(directory / "rogue", "rogue-ca"),
    )
