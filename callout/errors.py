"""The errors a user can fix: each is printed as one line and exits 2, never a traceback."""

from __future__ import annotations

from typing import NoReturn


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


def fail(message: str) -> NoReturn:
    raise UserError(message)
