"""Reading `docker-compose.yml` and the `Dockerfile` the way Docker would, so the tests can check
what they reference and run their services as local processes (no Docker engine in CI).

`LocalCompose` maps a service's container view onto a checkout: container paths of secrets,
configs and bind mounts to the host files they come from, image paths copied by the Dockerfile
to the repository files, and the nats-N host names to the loopback ports of local servers.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = "docker-compose.yml"
BIN = Path(sys.executable).parent
#: What a checkout must hold for the compose file (the rest of the repo is not needed).
COMPOSE_TREE = ("docker-compose.yml", "Dockerfile", ".dockerignore", "deploy")
#: What `python deploy/compose/setup.py` writes (git-ignored; never copied from a checkout).
GENERATED = (
    "deploy/compose/keys/issuer.nk",
    "deploy/compose/keys/service.nk",
    "deploy/compose/keys/xkey.nk",
    "deploy/compose/keys/admin.nk",
    "deploy/compose/keys/admin.pub",
    "deploy/cluster/keys.conf",
)


def load_compose(root: Path = REPO) -> dict[str, Any]:
    doc: dict[str, Any] = YAML(typ="safe").load((root / COMPOSE_FILE).read_text())
    return doc


def copy_checkout(dest: Path) -> Path:
    """The compose-relevant part of the repository, without anything setup.py generates (a
    developer may have run it in the working tree)."""
    generated = {REPO / g for g in GENERATED} | {REPO / "deploy/compose/keys"}

    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if Path(directory, n) in generated or n == "__pycache__"}

    dest.mkdir(parents=True, exist_ok=True)
    for name in COMPOSE_TREE:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy2(source, dest / name)
    return dest


def run_setup(root: Path) -> subprocess.CompletedProcess[str]:
    """`python deploy/compose/setup.py`, as documented, in the checkout `root`."""
    return subprocess.run(
        [sys.executable, "deploy/compose/setup.py"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def referenced_files(compose: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(what, relative path) of every host file or directory the compose file needs."""
    for kind in ("secrets", "configs"):
        for name, spec in (compose.get(kind) or {}).items():
            if "file" in spec:
                yield f"{kind}.{name}", spec["file"]
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            yield f"services.{name}.build", context
            yield f"services.{name}.build", f"{context}/{dockerfile or 'Dockerfile'}"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and source.startswith((".", "/")):
                yield f"services.{name}.volumes", source
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            path = env_file if isinstance(env_file, str) else env_file["path"]
            yield f"services.{name}.env_file", path


# -- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int


def dockerfile_instructions(path: Path = REPO / "Dockerfile") -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped; `stage` counts FROMs."""
    out: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        out.append(Instruction(keyword.upper(), " ".join(args.split()), stage))
    return out


def image_copies(instructions: Sequence[Instruction]) -> dict[str, str]:
    """Image path -> repository path for the final stage's `COPY <repo files> <dir>/`."""
    final = max(i.stage for i in instructions)
    mapping: dict[str, str] = {}
    for ins in instructions:
        if ins.stage != final or ins.keyword != "COPY" or ins.args.startswith("--from"):
            continue
        *sources, target = ins.args.split()
        for source in sources:
            image_path = target + Path(source).name if target.endswith("/") else target
            mapping[image_path] = source
    return mapping


# -- running services as local processes -------------------------------------------------------


@dataclass
class LocalCompose:
    """A compose service's command and environment, with container paths and host names mapped
    onto the checkout `root` and the local servers `ports` ({"nats-1": 4321, ...})."""

    root: Path
    ports: Mapping[str, int]
    compose: dict[str, Any] = field(init=False)
    copies: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.compose = load_compose(self.root)
        self.copies = image_copies(dockerfile_instructions(self.root / "Dockerfile"))

    def mounts(self, service: str) -> dict[str, Path]:
        """Container path -> host path of the service's secrets, configs and bind mounts."""
        spec = self.compose["services"][service]
        out: dict[str, Path] = {}
        for kind, default_dir in (("secrets", "/run/secrets/"), ("configs", "/")):
            for entry in spec.get(kind) or []:
                source = entry if isinstance(entry, str) else entry["source"]
                target = source if isinstance(entry, str) else entry.get("target", source)
                target = target if target.startswith("/") else default_dir + target
                out[target] = self.root / self.compose[kind][source]["file"]
        for volume in spec.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                out[target] = self.root / source
        for image_path, repo_path in self.copies.items():
            out[image_path] = self.root / repo_path
        return out

    def host_path(self, service: str, container_path: str) -> str:
        for target, host in sorted(self.mounts(service).items(), key=lambda kv: -len(kv[0])):
            if container_path == target:
                return str(host)
            if container_path.startswith(target.rstrip("/") + "/"):
                return str(host / container_path[len(target.rstrip("/")) + 1 :])
        return container_path

    def _local(self, service: str, value: str) -> str:
        for name, port in self.ports.items():
            value = re.sub(rf"nats://{re.escape(name)}:4222\b", f"nats://127.0.0.1:{port}", value)
        return ",".join(
            self.host_path(service, part) if part.startswith("/") else part
            for part in value.split(",")
        )

    def env(self, service: str) -> dict[str, str]:
        """The service's environment (compose `environment`), mapped, over ours; plus PATH so
        `callout` resolves to this interpreter's console script."""
        spec = self.compose["services"][service].get("environment") or {}
        items = spec.items() if isinstance(spec, dict) else (e.split("=", 1) for e in spec)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLOUT_")}
        env.update({k: self._local(service, str(v)) for k, v in items})
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def argv(self, service: str, command: Sequence[str]) -> list[str]:
        """A command as the container would run it, as a local argv."""
        program, *args = command
        mapped = [self.host_path(service, a) if a.startswith("/") else a for a in args]
        if program == "callout":
            return [sys.executable, "-m", "callout", *mapped]
        if program == "python":
            return [sys.executable, *mapped]
        return [program, *mapped]

    def run(
        self, service: str, command: str | Sequence[str], *, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`docker compose exec SERVICE COMMAND` (or `run`), locally."""
        words = shlex.split(command) if isinstance(command, str) else list(command)
        return subprocess.run(
            self.argv(service, words),
            input=stdin,
            env=self.env(service),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins
