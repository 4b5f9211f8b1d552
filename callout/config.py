"""Command-line flags that also read `CALLOUT_<FLAG_IN_UPPER_SNAKE>` from the environment.

The flag wins over the environment. Repeatable flags take a comma-separated list from the
environment. A flag that is required on the command line is satisfied by its variable.

Both are parsed as strictly as each other: a variable's value goes through the flag's type
and `choices` (argparse checks neither for defaults), a boolean variable must be a boolean
word, and a value with leading or trailing whitespace, or an empty item in a list, is an
error. Any mistake is one line naming the flag or the variable, at start: a value that is
silently read as something else ("soft " as enforce, "bogus" as off) is a configuration
nobody chose.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, NoReturn

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class Parser(argparse.ArgumentParser):
    """argparse, with every usage mistake reported in one line (the flag it names, and where
    to look), not a usage block that pushes the reason off the screen."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def env_name(flag: str) -> str:
    return "CALLOUT_" + flag.lstrip("-").replace("-", "_").upper()


def add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """`parser.add_argument` with the flag's environment variable as its default."""
    name = env_name(flag)
    value = os.environ.get(name)
    action = kwargs.get("action")
    if value is not None and value != "":

        def bad(why: str) -> NoReturn:
            parser.error(f"{name}={value[:80]!r}: {why}")

        def convert(text: str) -> Any:
            try:
                out = kwargs.get("type", str)(text)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                bad(str(exc) or "invalid value")
            choices = kwargs.get("choices")
            if choices is not None and out not in choices:
                bad(f"must be one of {', '.join(str(c) for c in choices)}")
            return out

        if value != value.strip():
            bad("leading or trailing whitespace")
        if action == "append":
            items = [item.strip() for item in value.split(",")]
            if not all(items):
                bad("an empty item in the comma-separated list")
            kwargs["default"] = [convert(item) for item in items]
        elif action == "store_true":
            word = value.lower()
            if word not in _TRUE | _FALSE:
                bad(f"must be one of {', '.join(sorted(_TRUE | _FALSE))}")
            kwargs["default"] = word in _TRUE
        else:
            kwargs["default"] = convert(value)
        kwargs["required"] = False
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {name}]".strip()
    parser.add_argument(flag, **kwargs)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def bounded_seconds(low: float, high: float, *, zero: bool = False) -> Any:
    """A number of seconds in (low, high], or 0 when `zero` allows it (0 = "none")."""

    def parse(text: str) -> float:
        value = _finite(text)
        if zero and value == 0:
            return value
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"must be > {low:g} and <= {high:g}, got {text}")
        return value

    return parse


def replicas(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 5:
        raise argparse.ArgumentTypeError(f"must be 1..5, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value
