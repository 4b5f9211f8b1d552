"""Command-line flags that also read `CALLOUT_<FLAG_IN_UPPER_SNAKE>` from the environment.

The flag wins over the environment. Repeatable flags take a comma-separated list from the
environment. A flag that is required on the command line is satisfied by its variable.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def env_name(flag: str) -> str:
    return "CALLOUT_" + flag.lstrip("-").replace("-", "_").upper()


def add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """`parser.add_argument` with the flag's environment variable as its default."""
    value = os.environ.get(env_name(flag))
    action = kwargs.get("action")
    if value is not None and value != "":
        if action == "append":
            kwargs["default"] = [v.strip() for v in value.split(",") if v.strip()]
        elif action == "store_true":
            kwargs["default"] = value.strip().lower() in {"1", "true", "yes", "on"}
        else:
            conv = kwargs.get("type", str)
            try:
                kwargs["default"] = conv(value)
            except (TypeError, ValueError) as exc:
                parser.error(f"{env_name(flag)}: {exc}")
        kwargs["required"] = False
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {env_name(flag)}]".strip()
    parser.add_argument(flag, **kwargs)


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


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
