"""The `authsvc` command: serve, migrate, manage users, signing keys and the shared settings.

Every subcommand reads the same `AUTH_*` configuration, so `authsvc users ...`
run from the directory where `authsvc serve` runs reaches the same database
(the embedded one included).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import replace

from service.app import serve
from service.clock import to_datetime
from service.components import open_components
from service.database import migrate_database
from service.domain.revocation import revoked_count_is_lower_bound
from service.domain.shared_settings import (
    adopt_shared_settings,
    shared_values,
    shown,
    variable_name,
)
from service.domain.usernames import escape_text
from service.domain.users import UserDirectory
from service.errors import InvalidArgument
from service.failures import EXIT_INTERRUPTED, describe
from service.loadtest.commands import add_load_commands, bench_command, load_command
from service.logs import configure_logging, failure_line
from service.metrics import remove_abandoned_multiprocess_dirs
from service.request_limits import RequestCheck
from service.setting_parsers import DAY, HOUR, bounded_argument
from service.settings import (
    MAX_AGE,
    MAX_REPORTED_UNKNOWN,
    WORKERS,
    Settings,
    unknown_variables,
)
from service.supervisor import run_supervisor

log = logging.getLogger(__name__)


def _read_password() -> str:
    """The first line of standard input (prompted for without echo on a terminal), held
    to the rules the admin API applies to a new password."""
    if sys.stdin.isatty():
        line = getpass.getpass("password: ")
    else:
        line = sys.stdin.readline().rstrip("\r\n")
    check = RequestCheck()
    check.new_password("password", line)
    _exit_on_violations(check)
    return line


def _check_new_user(username: str, scopes: list[str]) -> None:
    """The same rules the API applies, so that every user created can log in."""
    check = RequestCheck()
    check.username("username", username, new=True)
    check.scopes("--scope", scopes)
    _exit_on_violations(check)


def _exit_on_violations(check: RequestCheck) -> None:
    try:
        check.done()
    except InvalidArgument as exc:
        details = "; ".join(f"{v.field} {v.description}" for v in exc.violations)
        raise SystemExit(f"authsvc: {details}") from None


def revoked_sessions_text(count: int) -> str:
    """A user-wide revocation's count as the commands print it: "at least N" where the
    count stopped at its limit (it reads a bounded range of the index)."""
    return f"at least {count}" if revoked_count_is_lower_bound(count) else str(count)


async def _with_users(settings: Settings, action: Callable[[UserDirectory], Awaitable[int]]) -> int:
    async with open_components(settings) as components:
        return await action(components.users)


async def _users_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.users_command == "create":
        _check_new_user(args.username, args.scope)
        password = _read_password()

        async def create(users: UserDirectory) -> int:
            user = await users.create(args.username, password, tuple(args.scope))
            print(f"created user {escape_text(user.username)} (subject {user.id})")
            return 0

        return await _with_users(settings, create)
    if args.users_command == "set-password":
        password = _read_password()

        async def set_password(users: UserDirectory) -> int:
            await users.set_password(
                args.username, password, revoke_sessions=not args.keep_sessions
            )
            print(f"password changed for {escape_text(args.username)}")
            return 0

        return await _with_users(settings, set_password)
    if args.users_command == "delete":

        async def delete(users: UserDirectory) -> int:
            revoked = await users.delete(args.username)
            name = escape_text(args.username)
            print(f"deleted {name}; sessions revoked: {revoked_sessions_text(revoked)}")
            return 0

        return await _with_users(settings, delete)
    if args.users_command in ("disable", "enable"):
        disabled = args.users_command == "disable"

        async def set_disabled(users: UserDirectory) -> int:
            revoked = await users.set_disabled(args.username, disabled)
            name = escape_text(args.username)
            print(
                f"{args.users_command}d {name}; sessions revoked: {revoked_sessions_text(revoked)}"
            )
            return 0

        return await _with_users(settings, set_disabled)

    async def list_users(users: UserDirectory) -> int:
        for user in await users.list():
            state = "disabled" if user.disabled else "active"
            # Escaped: a name holding a newline or a tab (possible for users created before
            # such names were refused) must not forge a line or a column.
            name = escape_text(user.username)
            print(f"{name}\t{user.id}\t{state}\t{' '.join(user.scopes)}")
        return 0

    return await _with_users(settings, list_users)


async def _keys_command(settings: Settings, args: argparse.Namespace) -> int:
    """`authsvc keys rotate|list|retire`: the same domain code as the admin API.

    Only `rotate` needs the KEK (it opens the stored keys, then seals a new one);
    `list` and `retire` read and update rows."""
    rotate = args.keys_command == "rotate"
    # A key is made with our AUTH_SIGNING_ALG, and retired by our lifetimes, for every
    # replica: refused with values the replicas do not share.
    acting = args.keys_command in ("rotate", "retire")
    async with open_components(
        settings,
        key_material=rotate,
        acting_for_all=f"refusing to {args.keys_command} keys" if acting else None,
    ) as components:
        keys = components.signing_keys
        if args.keys_command == "rotate":
            info = await keys.rotate(reason="cli", actor="cli")
            print(
                f"created signing key {info.kid} ({info.alg}); every replica signs with it "
                f"from {info.activates_at.isoformat(timespec='seconds')}"
            )
            return 0
        if args.keys_command == "retire":
            retired = await keys.retire_superseded()
            print("retired: " + (", ".join(retired) if retired else "nothing is due"))
            return 0
        for info in await keys.describe():
            when = info.retired_at or info.retires_at
            until = "-" if when is None else when.isoformat(timespec="seconds")
            created = info.created_at.isoformat(timespec="seconds")
            print(f"{info.kid}\t{info.alg}\t{info.state}\tcreated {created}\tretire {until}")
        return 0


_DURATION_UNITS = {"s": 1, "m": 60, "h": HOUR, "d": DAY}
_SINCE_ALLOWED = f"a whole number with s, m, h or d, from 1s to {MAX_AGE // DAY}d"


def _duration(text: str) -> float:
    """Seconds in "90s", "30m", "1h" or "7d", at most MAX_AGE (so that now - it is a date)."""
    number, unit = text[:-1], text[-1:]
    if unit not in _DURATION_UNITS or not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"must be {_SINCE_ALLOWED}")
    if len(number) > 12 or not 1 <= int(number) * _DURATION_UNITS[unit] <= MAX_AGE:
        raise argparse.ArgumentTypeError(f"must be {_SINCE_ALLOWED}")
    return int(number) * _DURATION_UNITS[unit]


async def _events_command(settings: Settings, since: float) -> int:
    async with open_components(settings) as components:
        events = await components.store.events(since=to_datetime(components.clock.now() - since))
    for event in events:
        # Details hold client-chosen text (usernames): escaped, so that it can neither
        # forge lines nor send control sequences to the operator's terminal.
        detail = " ".join(
            f"{k}={v!r}" if not str(v).isprintable() or " " in str(v) else f"{k}={v}"
            for k, v in sorted(event["detail"].items())
        )
        fields = [
            event["occurred_at"].isoformat(timespec="seconds"),
            event["kind"],
            f"subject={escape_text(event['subject'] or '-')}",
            f"session={event['session_id'] or '-'}",
            f"peer={escape_text(event['peer'] or '-')}",
        ]
        if event["occurrences"] > 1:  # repeats counted in one row (the first one's details)
            last = event["last_occurred_at"].isoformat(timespec="seconds")
            fields.append(f"count={event['occurrences']} last={last}")
        print("  ".join(fields) + (f"  {detail}" if detail else ""))
    return 0


async def _settings_command(settings: Settings, args: argparse.Namespace) -> int:
    """`authsvc settings show|adopt`: the settings every replica must share."""
    async with open_components(settings) as components:
        store = components.store
        if args.settings_command == "adopt":
            changed = await adopt_shared_settings(
                store, settings, clock=components.clock, actor="cli"
            )
            if not changed:
                print("nothing to adopt: the shared settings are this environment's already")
            for difference in changed:
                print(
                    f"{difference.variable}: {shown(difference.recorded)} -> "
                    f"{shown(difference.here)}"
                )
            return 0
        recorded = await store.shared_settings()
    for name, value in shared_values(settings).items():
        shared = "(not recorded)" if name not in recorded else shown(recorded[name])
        here = shown(value)
        mark = "" if name not in recorded or recorded[name] == value else "\tdiffers"
        print(f"{variable_name(name)}\t{shared}\there {here}{mark}")
    return 0


async def _migrate_command(settings: Settings) -> int:
    _, applied = await migrate_database(settings)
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="authsvc", description="Authentication service (gRPC auth.v1)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve", help="apply migrations and serve gRPC on AUTH_LISTEN"
    )
    serve_parser.add_argument(
        "--workers",
        type=bounded_argument(WORKERS),
        default=None,
        metavar="N",
        help="server processes sharing the port (default: AUTH_WORKERS, else the CPU count)",
    )
    serve_parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    commands.add_parser("migrate", help="apply pending database migrations")

    users = commands.add_parser("users", help="manage users")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    create = user_commands.add_parser("create", help="create a user")
    create.add_argument("username")
    create.add_argument(
        "--password-stdin",
        action="store_true",
        required=True,
        help="read the password from the first line of standard input",
    )
    create.add_argument(
        "--scope", action="append", default=[], help="a scope the user may be granted (repeatable)"
    )
    set_password = user_commands.add_parser(
        "set-password", help="change a password (ends the user's sessions)"
    )
    set_password.add_argument("username")
    set_password.add_argument("--password-stdin", action="store_true", required=True)
    set_password.add_argument(
        "--keep-sessions", action="store_true", help="do not revoke the user's existing sessions"
    )
    for name, text in (
        ("disable", "disable a user and revoke every session"),
        ("enable", "enable a disabled user"),
        ("delete", "delete a user and revoke every session (the username is free again)"),
    ):
        sub = user_commands.add_parser(name, help=text)
        sub.add_argument("username")
    user_commands.add_parser("list", help="list users")
    keys = commands.add_parser("keys", help="manage the signing keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    key_commands.add_parser(
        "rotate", help="create a signing key; every replica signs with it within a second"
    )
    key_commands.add_parser("list", help="list the signing keys and their states")
    key_commands.add_parser(
        "retire", help="retire superseded keys whose tokens have all expired (the janitor does)"
    )
    events = commands.add_parser("events", help="print security events")
    events.add_argument(
        "--since",
        type=_duration,
        default=_duration("1h"),
        metavar="DURATION",
        help="how far back, e.g. 30m, 1h, 7d (default 1h)",
    )
    shared = commands.add_parser(
        "settings", help="the settings every replica on the database must share"
    )
    shared_commands = shared.add_subparsers(dest="settings_command", required=True)
    shared_commands.add_parser(
        "show", help="the shared values recorded in the database beside this environment's"
    )
    shared_commands.add_parser(
        "adopt",
        help="make this environment's values the shared ones (a security event); replicas "
        "with the old values keep serving but report NOT_SERVING on authsvc.settings",
    )
    add_load_commands(commands)
    return parser


def _exit_on_signal(signum: int, _frame: object) -> None:
    # Until serve installs its graceful handlers, and in the one-shot commands: exit
    # through SystemExit, so that atexit runs (it stops the embedded PostgreSQL) instead
    # of dying on the spot and leaving the cluster behind.
    raise SystemExit(128 + signum)


def _ignore_hangup(_signum: int, _frame: object) -> None:
    log.warning("SIGHUP ignored: authsvc has nothing to reload; SIGTERM stops it")


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr (a JSON object with
    AUTH_LOG_FORMAT=json) and an exit code from `service.failures`."""
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        # A closed terminal or a stray `kill -HUP` must not stop a server (there is no
        # reload), nor a worker: ignored, with a log line, for the whole life of serve.
        signal.signal(signal.SIGHUP, _ignore_hangup)
    configure_logging("text")
    # Until the settings are read, this much of AUTH_LOG_FORMAT says how to report.
    log_format = "json" if os.environ.get("AUTH_LOG_FORMAT") == "json" else "text"
    try:
        settings = Settings.from_env()
        log_format = settings.log_format
        configure_logging(settings.log_format)
        if not (args.command == "serve" and args.worker):  # the supervisor said it once
            _report_unknown_variables()
        return _run(args, settings)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        exit_code, message, unexpected = describe(exc)
        trace = traceback.format_exc() if unexpected else None
        line = failure_line(message, log_format=log_format, exit_code=exit_code, traceback=trace)
        print(line, file=sys.stderr, flush=True)
        return exit_code


def _report_unknown_variables() -> None:
    """One warning line per AUTH_* variable no setting declares (a misspelt setting would
    otherwise be ignored without a word), with the closest declared name; never a value."""
    unknown = unknown_variables(os.environ)
    for name, close in unknown[:MAX_REPORTED_UNKNOWN]:
        log.warning(
            "%s is not an authsvc setting and is ignored%s",
            escape_text(name, limit=100),
            f"; did you mean {close}?" if close else "",
        )
    if len(unknown) > MAX_REPORTED_UNKNOWN:
        log.warning(
            "%d more AUTH_* variables are not authsvc settings and are ignored",
            len(unknown) - MAX_REPORTED_UNKNOWN,
        )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        workers = settings.workers if args.workers is None else args.workers
        settings = replace(settings, workers=workers)
        if not args.worker:
            remove_abandoned_multiprocess_dirs()
            # Even one worker runs under the supervisor, which replaces it when its memory
            # passes AUTH_WORKER_MAX_MEMORY or its heartbeat stops (docs/security.md).
            return run_supervisor(settings, workers)
        asyncio.run(serve(settings))
        return 0
    if args.command == "migrate":
        return asyncio.run(_migrate_command(settings))
    if args.command == "events":
        return asyncio.run(_events_command(settings, args.since))
    if args.command == "load":
        return load_command(args)
    if args.command == "bench":
        return bench_command(args)
    if args.command == "keys":
        return asyncio.run(_keys_command(settings, args))
    if args.command == "settings":
        return asyncio.run(_settings_command(settings, args))
    return asyncio.run(_users_command(settings, args))
