"""Bad input from the user: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import sys
from typing import NoReturn

from hydra.errors import InstantiationException


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    """Print ``error: message`` to stderr and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def user_error(exc: BaseException) -> str | None:
    """The message of the ValueError/UsageError at the root of ``exc``, if there is one."""
    while exc is not None:
        if isinstance(exc, UsageError | ValueError | FileNotFoundError):
            text = str(exc).strip()
            return text.splitlines()[0] if text else type(exc).__name__
        if not isinstance(exc, InstantiationException):
            return None
        exc = exc.__cause__
    return None
