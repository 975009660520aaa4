"""The user-facing error type for configuration problems (import-free, so every module can raise it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration problem, reported as one line naming the key or file.

    A line break inside a user-supplied value (a key, a path) would split the CLI's one-line
    report, so it is escaped here rather than trusted to every caller.
    """

    def __init__(self, message: object) -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))
