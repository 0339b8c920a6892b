"""User-facing errors.

`SpinError` carries one line that names the problem, where it is (file, row, field) and what to do.
The CLI prints it as `spinlm: error: <message>` and exits non-zero with no stack trace (unless `--debug`).
Library code raises it for anything a user can fix; everything else is a bug and keeps its traceback.
"""


class SpinError(Exception):
    """A problem the user can fix; the message is one line: what, where, and what to do."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")
