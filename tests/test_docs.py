"""The README is part of the contract: it must name every deny reason and every serve flag."""

from __future__ import annotations

import re
from pathlib import Path

from callout import decision
from callout.cli import parser

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_explains_every_reason() -> None:
    reasons = {
        value
        for name, value in vars(decision).items()
        if name.isupper()
        and isinstance(value, str)
        and not name.startswith("_")
        and re.fullmatch(r"[a-z_]+", value)
    }
    assert "unknown_user" in reasons and len(reasons) > 20
    missing = sorted(r for r in reasons if f"`{r}`" not in README)
    assert not missing, f"README does not explain reasons: {missing}"


def test_readme_documents_every_serve_flag() -> None:
    sub = parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    serve = sub.choices["serve"]
    flags = {
        opt for action in serve._actions for opt in action.option_strings if opt.startswith("--")
    }
    flags -= {"--help"}
    assert "--backend-timeout" in flags
    missing = sorted(f for f in flags if f"`{f}" not in README)
    assert not missing, f"README does not document flags: {missing}"
