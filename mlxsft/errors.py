"""User-facing errors: what went wrong, where, and a one-line hint to fix it.

Code raises these (or plain ValueError / FileNotFoundError) for mistakes a user can fix; the CLI
prints them as one line and exits non-zero without a traceback. `assert` is for internal invariants.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, printed as `where: problem (hint: ...)`."""

    def __init__(self, problem: str, *, where: str | None = None, hint: str | None = None):
        self.problem = problem
        self.where = where
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        return f"{text} (hint: {self.hint})" if self.hint else text


class DataError(UserError):
    """A bad data row; `where` is `file:line`."""


class ModelError(UserError):
    """A model that cannot be found or loaded."""
