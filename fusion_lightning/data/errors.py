"""Errors for bad log input: each names the file, the row/line and the field."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowIssue:
    """One problem with one source row; `file`/`row` locate it (row is 1-based for line files)."""

    file: str
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: row {self.row}: field {self.field!r}: {self.message}"


class LogFormatError(ValueError):
    """A whole file cannot be used: unreadable, truncated, or missing required columns."""

    def __init__(self, file: str, message: str, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field = file, row, field
        where = file + (f": row {row}" if row is not None else "") + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")


class LogValidationError(ValueError):
    """Rows failed validation; the message lists the first issues and how many there are."""

    def __init__(self, issues: list[RowIssue], shown: int = 5):
        self.issues = issues
        head = "; ".join(str(i) for i in issues[:shown])
        more = f" (and {len(issues) - shown} more; data.on_error=quarantine sets bad rows aside)" if len(
            issues
        ) > shown else ""
        rows = len({(i.file, i.row) for i in issues})
        super().__init__(f"{rows} invalid log row(s), {len(issues)} problem(s): {head}{more}")
