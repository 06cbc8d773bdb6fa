"""Why `authsvc` could not start or run a command: one line for the operator, and an exit code.

The exit codes (docs/operations.md, "The `authsvc` command"):

0 done; 1 the command was refused (no such user, a name taken, ...); 2 the configuration
(a setting, AUTH_KEK missing or wrong, a file, the listen address); 3 the database cannot be
reached or did not answer in time; 4 the database schema does not fit this binary;
70 an unexpected error (a bug: its traceback follows the line); 130 interrupted.
"""

from __future__ import annotations

EXIT_REFUSED = 1
EXIT_CONFIGURATION = 2
EXIT_DATABASE_UNREACHABLE = 3
EXIT_SCHEMA_MISMATCH = 4
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class StartupError(Exception):
    """A failure an operator can fix, with the line that says how and the exit code."""

    exit_code = EXIT_CONFIGURATION

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigurationError(StartupError):
    """A setting, a file or the environment does not let us run (exit 2)."""


class KekMissing(ConfigurationError):
    """Key material must be opened or created and AUTH_KEK is not set with a database URL."""

    def __init__(self) -> None:
        super().__init__(
            "AUTH_KEK is not set: with AUTH_DATABASE_URL, set AUTH_KEK to the base64 "
            "key-encryption key every replica shares (a new one: openssl rand -base64 32)"
        )


class DatabaseUnreachable(StartupError):
    """The database cannot be reached, refused us, or did not answer in time (exit 3)."""

    exit_code = EXIT_DATABASE_UNREACHABLE


class SchemaMismatch(StartupError):
    """The database schema is newer than this binary knows, or older than it needs (exit 4)."""

    exit_code = EXIT_SCHEMA_MISMATCH


def describe(exc: BaseException) -> tuple[int, str, bool]:
    """The exit code, the one-line message and whether a traceback should follow (only for
    the unexpected: those are bugs)."""
    # Imported here: the modules that raise these import this one.
    from service.errors import AuthError, DatabaseUnavailable
    from service.settings import SettingsError

    if isinstance(exc, StartupError):
        return exc.exit_code, _one_line(str(exc)), False
    if isinstance(exc, SettingsError):
        return EXIT_CONFIGURATION, _one_line(str(exc)), False
    if isinstance(exc, DatabaseUnavailable):
        return EXIT_DATABASE_UNREACHABLE, _one_line(exc.message), False
    if isinstance(exc, AuthError):
        return EXIT_REFUSED, _one_line(exc.message), False
    detail = _one_line(f"{type(exc).__name__}: {exc}")
    return EXIT_INTERNAL, f"unexpected error (a bug; the traceback follows): {detail}", True


def _one_line(text: str) -> str:
    return " ".join(text.split())
