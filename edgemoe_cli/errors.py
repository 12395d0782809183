"""The one exception type a user mistake becomes: edgemoe_cli.cli.main prints it as one line and exits 2."""

from __future__ import annotations


class EdgeMoEError(Exception):
    """A problem the user can fix: what is wrong (`message`) and what to do about it (`hint`)."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
