"""The one TOML reader every config, recipe, board and prompt file goes through (tomllib on 3.11+, tomli on 3.10)."""

from __future__ import annotations

import sys

from .errors import EdgeMoEError

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # Python 3.10: pyproject.toml depends on tomli there
    import tomli as _toml

TOMLDecodeError = _toml.TOMLDecodeError


def load_toml(text: str, where: str, hint: str = "fix the file's syntax") -> dict:
    """Parse TOML `text` (read from `where`, named in the error); bad syntax is an EdgeMoEError, not a traceback."""
    try:
        return _toml.loads(text)
    except TOMLDecodeError as e:
        raise EdgeMoEError(f"{where} is not valid TOML: {e}", hint) from e
