"""Settings: every variable declared once, with bounds that refuse nonsense at start (issue
14, item 9), refusals that name the variable and never echo the value, and the configuration
table of docs/operations.md generated from the declarations."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import difflib
import json
import math
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.cli import build_parser
from service.clock import to_datetime
from service.database import connection_budget_problem
from service.failures import ConfigurationError
from service.loadtest import soak
from service.secrets_box import load_or_create_kek_file
from service.setting_declarations import Declaration
from service.setting_parsers import (
    DAY,
    YEAR,
    Address,
    Choice,
    CommaList,
    CommaSet,
    Number,
    Text,
)
from service.settings import (
    MAX_AGE,
    Settings,
    SettingsError,
    declaration_of,
    declarations,
    unknown_variables,
)
from service.settings_table import configuration_table, with_table
from tests.helpers import COMMA_LOOK_ALIKES, refresh, validate
from tests.live_server import ServerFactory
from tests.test_cli import _authsvc, _server_env
from tests.test_startup_failures import _failure

OPERATIONS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
MARKER = "s3cr3t-MARKER"
# A fixed KEK of random-looking bytes (never all one byte: such a key is refused).
FIXTURE_KEK = "q7V0cS9kJ2mX4bLw8nR1fT6yH3pE5aZuG0iD9oKjM2s="


def refusal(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    return str(caught.value)


def assert_refused(variable: str, value: str) -> str:
    """`variable=value` is refused in one line naming it and what it may be."""
    message = refusal({variable: value})
    # Exactly the declared sentence, whatever the value: nothing of it can be echoed.
    declared = f"{variable}: must be {declaration_of(variable).parser.allowed}"
    if isinstance(declaration_of(variable).parser, Address):
        # An address refusal adds the part at fault ("its port has a leading zero").
        assert message.startswith(f"{declared}: "), message
    else:
        assert message == declared, message
    assert "\n" not in message and "\r" not in message, message
    assert len(message) < 300, message
    return message


def numbers() -> list[tuple[str, Number[Any]]]:
    found = []
    for _, declaration in declarations():
        if isinstance(declaration.parser, Number):
            found.append((declaration.variable, declaration.parser))
    return found


def text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --- the issue's examples ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "bound"),
    [
        # Accepted before: every wrong password then failed with INTERNAL (the throttle's
        # window overflowed a date) and throttling stopped.
        ("AUTH_THROTTLE_WINDOW", "99999999999", "2592000"),
        # Accepted before: the janitor's cut-off date overflowed, every pass failed.
        ("AUTH_EVENT_RETENTION", "99999999999", "315360000"),
        # Accepted before, then a traceback at start (gRPC takes an int32).
        ("AUTH_MAX_MESSAGE_BYTES", "2147483648", "16777216"),
        # Accepted before: busy loops against the database.
        ("AUTH_JANITOR_INTERVAL", "1e-7", "0.05"),
        ("AUTH_REVOCATION_POLL_INTERVAL", "1e-7", "0.05"),
        ("AUTH_DB_TIMEOUT", "1e-7", "0.05"),
        # Accepted before: 100,000 processes, or 5,000 connections per process.
        ("AUTH_WORKERS", "100000", "64"),
        ("AUTH_DB_POOL_SIZE", "5000", "200"),
        ("AUTH_MAX_CONCURRENT_RPCS", "99999999999", "100000"),
        ("AUTH_TOKEN_CACHE_SIZE", "99999999999", "10000000"),
        ("AUTH_KEY_ROTATION_PERIOD", "1", "60"),
        ("AUTH_THROTTLE_MAX_DELAY", "99999999999", "86400"),
        ("AUTH_STREAM_MAX_AGE", "1e300", "86400"),
        ("AUTH_SHUTDOWN_GRACE", "99999999999", "3600"),
        # Accepted before (the bound was 64): a fresh worker holds 65-72 MiB, so every
        # worker was replaced as soon as it served, without end (outside-in review).
        ("AUTH_WORKER_MAX_MEMORY", "64", "256"),
    ],
)
def test_the_issues_examples_are_refused_in_one_line_naming_the_bounds(
    variable: str, value: str, bound: str
) -> None:
    message = assert_refused(variable, value)
    assert bound in message, message


def test_a_bad_value_is_never_echoed_for_any_setting() -> None:
    """One value every parser refuses (a control character in it), holding a marker that
    must not come back: AUTH_KEK and AUTH_DATABASE_URL hold secrets, and any value may be
    huge or hold terminal escapes. Also a 1 MB value: the message stays one short line."""
    for _, declaration in declarations():
        for bad in (f"{MARKER}\x1b[2J:1", f"{MARKER}\x00:1", MARKER * 70_000):
            message = refusal({declaration.variable: bad})
            assert message.startswith(declaration.variable + ": "), message
            assert MARKER not in message and "\x1b" not in message, message
            assert "\n" not in message and len(message) < 300, message


# --- every declared setting has bounds ---------------------------------------------------


def test_every_field_is_declared_once_with_a_variable_and_a_doc() -> None:
    names = [f.name for f in dataclasses.fields(Settings)]
    declared = dict(declarations())
    assert list(declared) == names, "a Settings field without setting(...)"
    variables = [d.variable for d in declared.values()]
    assert len(set(variables)) == len(variables)
    for declaration in declared.values():
        assert declaration.variable.startswith("AUTH_")
        assert declaration.doc and "\n" not in declaration.doc
        assert declaration.parser.allowed
    # The defaults are within their own bounds, and what an empty environment gives.
    Settings().check()
    assert Settings.from_env({}) == Settings()


@pytest.mark.parametrize(("variable", "parser"), numbers(), ids=lambda v: str(v)[:40])
def test_every_number_has_both_bounds_and_refuses_past_them(
    variable: str, parser: Number[Any]
) -> None:
    assert 0 <= parser.low <= parser.high < math.inf
    whole = parser.kind is int
    # The bounds themselves are accepted ...
    for edge in (parser.low, parser.high):
        value = getattr(Settings.from_env({variable: text(edge)}), _field_of(variable))
        assert value == edge
    # ... one step past them is not.
    step = 1 if whole else parser.low / 2
    below = parser.low - step
    if below > 0 or (below == 0 and parser.zero is None):
        assert_refused(variable, text(below))
    assert_refused(variable, text(parser.high + (1 if whole else parser.high / 1000)))
    assert_refused(variable, "-1")
    # 0 only where it means something (off, none, no limit, manual).
    if parser.zero is not None or parser.low == 0:
        assert getattr(Settings.from_env({variable: "0"}), _field_of(variable)) == 0
    else:
        assert_refused(variable, "0")
    # Whole numbers are whole; no number is nan, inf or in exponent form past the bounds.
    for bad in ("nan", "inf", "-inf", "1e999", "0x10", "1_000", "١٢", "+1", "1 000", "9" * 40):
        assert_refused(variable, bad)
    if whole:
        assert_refused(variable, text(parser.low) + ".5")


def _field_of(variable: str) -> str:
    for name, declaration in declarations():
        if declaration.variable == variable:
            return name
    raise KeyError(variable)


def test_no_duration_can_overflow_a_date() -> None:
    """now ± the largest value of any setting in seconds is a date, with decades to spare
    (a throttle window of 99999999999 s used to overflow on every failed login)."""
    now = datetime.now(UTC).timestamp()
    for variable, parser in numbers():
        if parser.unit == "seconds":
            assert parser.high <= MAX_AGE, variable
            assert to_datetime(now - parser.high).year > 1900
            assert to_datetime(now + parser.high).year < 2200
            assert datetime.now(UTC) + timedelta(seconds=parser.high) > datetime.now(UTC)


def test_lifetimes_of_one_second_are_accepted() -> None:
    """Tests and drills run with short lifetimes and windows."""
    one = {
        "AUTH_ACCESS_TTL": "1",
        "AUTH_REFRESH_IDLE_TTL": "1",
        "AUTH_REFRESH_ABSOLUTE_TTL": "1",
        "AUTH_REFRESH_REUSE_GRACE": "1",
        "AUTH_THROTTLE_WINDOW": "1",
        "AUTH_THROTTLE_MAX_DELAY": "1",
        "AUTH_EVENT_RETENTION": "1",
        "AUTH_EVENT_AGGREGATION_WINDOW": "1",
        "AUTH_STREAM_MAX_AGE": "1",
        "AUTH_MIGRATION_TIMEOUT": "1",
        "AUTH_JANITOR_INTERVAL": "0.05",
        "AUTH_REVOCATION_POLL_INTERVAL": "0.5",
        "AUTH_DB_TIMEOUT": "0.5",
        "AUTH_KEY_ROTATION_PERIOD": "60",
    }
    settings = Settings.from_env(one)
    assert (settings.access_ttl, settings.refresh_idle_ttl, settings.throttle_window) == (1, 1, 1)
    assert settings.janitor_interval == 0.05


def test_the_year_long_limits_are_what_the_docs_say() -> None:
    limits = dict(numbers())
    assert limits["AUTH_ACCESS_TTL"].high == DAY
    for variable in ("AUTH_REFRESH_IDLE_TTL", "AUTH_REFRESH_ABSOLUTE_TTL"):
        assert limits[variable].high == YEAR
        assert_refused(variable, str(YEAR + 1))
    assert Settings.from_env({"AUTH_WORKERS": "64"}).workers == 64
    assert 1 <= Settings().workers <= 64


def test_settings_built_in_code_are_checked_too() -> None:
    with pytest.raises(SettingsError, match=r"^AUTH_THROTTLE_WINDOW: "):
        Settings(throttle_window=99_999_999_999).check()
    with pytest.raises(SettingsError, match=r"^AUTH_MAX_MESSAGE_BYTES: "):
        Settings(max_message_bytes=2**31).check()
    with pytest.raises(SettingsError, match=r"^AUTH_JANITOR_INTERVAL: "):
        Settings(janitor_interval=math.nan).check()
    with pytest.raises(SettingsError, match=r"^AUTH_WORKERS: "):
        Settings(workers=True).check()


# --- live: refused at start, and the largest accepted values work ----------------------


@pytest.mark.system
async def test_a_huge_throttle_window_stops_serve_at_start_in_one_line(
    database_url: str, tmp_path: Path
) -> None:
    """Before, `serve` ran with it and every wrong password got INTERNAL."""
    env = _server_env(database_url, tmp_path, AUTH_WORKERS="1", AUTH_THROTTLE_WINDOW="99999999999")
    result = _authsvc("serve", env=env)
    assert result.returncode == 2, result.stderr
    line = _failure(result, "text")
    assert line.startswith("authsvc: AUTH_THROTTLE_WINDOW: "), line
    assert "99999999999" not in line


async def test_a_huge_throttle_window_built_in_code_does_not_start(
    server_factory: ServerFactory,
) -> None:
    with pytest.raises(SettingsError, match=r"^AUTH_THROTTLE_WINDOW: "):
        await server_factory(throttle_window=99_999_999_999)


async def test_the_largest_accepted_values_work(server_factory: ServerFactory) -> None:
    """Every lifetime, window and retention at its upper bound: wrong passwords are
    refused (not INTERNAL) and throttled, a session works, the janitor and the scheduled
    rotation run."""
    server = await server_factory(
        access_ttl=DAY,
        refresh_idle_ttl=YEAR,
        refresh_absolute_ttl=YEAR,
        refresh_reuse_grace=300,
        leeway=300,
        throttle_window=30 * DAY,
        throttle_max_delay=DAY,
        throttle_user_failures=1,
        event_retention=MAX_AGE,
        event_aggregation_window=DAY,
        key_rotation_period=YEAR,
    )
    await server.create_user("edge")
    codes = []
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await server.login("edge", password="not the password")
        codes.append(caught.value.code())
    assert codes[0] == grpc.StatusCode.UNAUTHENTICATED, codes
    assert grpc.StatusCode.INTERNAL not in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, "throttled"
    server.clock.advance(DAY + 1)  # the longest wait is over
    pair = await server.login("edge")
    checked = await validate(server, (await refresh(server, pair.refresh_token)).access_token)
    assert checked.valid
    janitor = server.running.components.janitor
    assert await janitor.run_once() is not None
    server.clock.advance(YEAR)
    assert await janitor.run_once() is not None
    keys = await server.running.components.signing_keys.describe()
    assert len(keys) == 2, "the year-long period rotated the key"


# --- the CLI's numbers have the same kind of bounds --------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--workers", "100000"],
        ["serve", "--workers", "0"],
        ["events", "--since", "99999999999d"],
        ["events", "--since", "0s"],
        ["load", "--processes", "100000"],
        ["load", "--concurrency", "99999999"],
        ["load", "--duration", "nan"],
        ["load", "--duration", "1e-7"],
        ["load", "--rate", "inf"],
        ["load", "--users", "10000000"],
        ["load", "--workers", "100000"],
        ["bench", "--duration", "-1"],
        ["bench", "--rounds", "99999999"],
        ["bench", "--workers", "100000"],
    ],
)
def test_cli_numbers_are_bounded_and_not_echoed(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert argv[-1] not in error, error
    assert "must be" in error, error


@pytest.mark.parametrize("argv", [["--duration", "1e9"], ["--workers", "100000"]])
def test_soak_numbers_are_bounded(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        soak.main(argv)
    assert caught.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_cli_numbers_within_bounds_are_accepted() -> None:
    args = build_parser().parse_args(["serve", "--workers", "64"])
    assert args.workers == 64
    args = build_parser().parse_args(["events", "--since", "3650d"])
    assert args.since == 3650 * DAY
    args = build_parser().parse_args(["load", "--duration", "1.5", "--rate", "0.5"])
    assert (args.duration, args.rate) == (1.5, 0.5)
    assert isinstance(build_parser(), argparse.ArgumentParser)


# --- the configuration table in docs/operations.md is generated from the declarations -----


def test_the_documented_configuration_table_matches_the_declarations() -> None:
    page = OPERATIONS_PAGE.read_text(encoding="utf-8")
    wanted = with_table(page)
    diff = "".join(
        difflib.unified_diff(
            page.splitlines(keepends=True), wanted.splitlines(keepends=True), "docs/operations.md"
        )
    )
    assert not diff, (
        "docs/operations.md's configuration table differs from service/settings.py; run "
        "`make docs` (python -m service.settings_table --write docs/operations.md):\n" + diff
    )
    for _, declaration in declarations():
        assert f"| `{declaration.variable}` |" in configuration_table()


def test_declarations_are_plain_data() -> None:
    declaration = declaration_of("AUTH_ACCESS_TTL")
    assert isinstance(declaration, Declaration)
    assert declaration.parser.parse("60") == 60


def test_the_list_parsers() -> None:
    """For settings with several values (AUTH_CALLER_AUTH; several audiences, later)."""
    audiences = CommaList(Text(256), max_items=3)
    assert audiences.parse("orders,billing") == ("orders", "billing")
    for bad in ("", "orders,,billing", "orders, billing", "a,a", "a,b,c,d", "a,\x07", "a,"):
        with pytest.raises(ValueError, match=r"^1 to 3 items separated by commas") as caught:
            audiences.parse(bad)
        assert "\x07" not in str(caught.value)
    groups = CommaSet(Choice(("validate", "admin")), max_items=2)
    assert groups.parse("admin,validate") == {"admin", "validate"}
    for bad in (" admin ,validate", "admin,validate,", "admin,admin", "validate,tokens"):
        with pytest.raises(ValueError, match="validate, admin"):
            groups.parse(bad)


# --- one strict grammar per kind (the operator review) -----------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # Blanks around a value (a quoted `" 5"` in a unit file) were stripped silently.
        ("AUTH_ACCESS_TTL", " 5"),
        ("AUTH_ACCESS_TTL", "5 "),
        ("AUTH_DB_TIMEOUT", "\t0.5"),
        ("AUTH_LOG_FORMAT", "json "),
        ("AUTH_ISSUER", " https://auth.example.test"),
        ("AUTH_LOGIN_THROTTLE", " on"),
        # A value of blanks only is not the empty value that keeps the default.
        ("AUTH_ACCESS_TTL", "   "),
    ],
)
def test_a_value_with_blanks_around_it_is_refused_naming_the_variable(
    variable: str, value: str
) -> None:
    message = refusal({variable: value})
    allowed = declaration_of(variable).parser.allowed
    assert message == f"{variable}: must be {allowed}, with no white space around it", message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # Exponents and bare points were read as numbers: a duration is plain decimal.
        ("AUTH_DB_TIMEOUT", "1e1"),
        ("AUTH_STREAM_MAX_AGE", "1e3"),
        ("AUTH_STREAM_MAX_AGE", "1E3"),
        ("AUTH_DB_TIMEOUT", ".5"),
        ("AUTH_DB_TIMEOUT", "5."),
        ("AUTH_SHUTDOWN_GRACE", "+5"),
        ("AUTH_ACCESS_TTL", "+5"),
        ("AUTH_ACCESS_TTL", "1e3"),
        # A switch is exactly `on` or `off`, as the table says: yes/0/TRUE were read too.
        ("AUTH_LOGIN_THROTTLE", "yes"),
        ("AUTH_LOGIN_THROTTLE", "no"),
        ("AUTH_LOGIN_THROTTLE", "0"),
        ("AUTH_LOGIN_THROTTLE", "1"),
        ("AUTH_LOGIN_THROTTLE", "true"),
        ("AUTH_LOGIN_THROTTLE", "false"),
        ("AUTH_LOGIN_THROTTLE", "ON"),
        ("AUTH_LOGIN_THROTTLE", "Off"),
    ],
)
def test_loose_spellings_of_numbers_and_switches_are_refused(variable: str, value: str) -> None:
    assert_refused(variable, value)


def test_the_strict_grammar_accepts_what_the_table_shows() -> None:
    settings = Settings.from_env(
        {
            "AUTH_ACCESS_TTL": "60",
            "AUTH_DB_TIMEOUT": "0.5",
            "AUTH_STREAM_MAX_AGE": "1800",
            "AUTH_SHUTDOWN_GRACE": "2.25",
            "AUTH_LOGIN_THROTTLE": "off",
            "AUTH_CALLER_AUTH": "",  # empty: the default, as in a compose file's `AUTH_X=`
        }
    )
    assert (settings.access_ttl, settings.db_timeout, settings.stream_max_age) == (60, 0.5, 1800)
    assert settings.shutdown_grace == 2.25 and settings.login_throttle is False
    assert Settings.from_env({"AUTH_LOGIN_THROTTLE": "on"}).login_throttle is True
    # The table's "allowed" column says the grammar: plain decimal numbers, on or off.
    assert "on or off" in declaration_of("AUTH_LOGIN_THROTTLE").parser.allowed
    assert "decimal" in declaration_of("AUTH_DB_TIMEOUT").parser.allowed


def test_every_value_in_the_deployment_files_still_parses() -> None:
    """deploy/, the docs, .ci and the Makefile set AUTH_* variables; each literal value
    there is accepted by the strict grammar (placeholders and shell expansions aside)."""
    root = OPERATIONS_PAGE.parent.parent
    # `AUTH_X=value` (env files, shell, docs) and `- name: AUTH_X` / `value: v` (Kubernetes).
    assignment = re.compile(r"\b(AUTH_[A-Z0-9_]+)(?:=|\n[ \t]*value:[ \t]*)['\"]?([^'\"\s`)$]+)")
    declared = {d.variable for _, d in declarations()}
    files = [root / "Makefile", root / "README.md"]
    for folder in ("deploy", "docs", ".ci"):
        files += [p for p in (root / folder).rglob("*") if p.is_file()]
    checked = 0
    for path in files:
        for variable, value in assignment.findall(path.read_text(encoding="utf-8")):
            if variable not in declared or value.endswith(":"):  # ":" ends a quoted log line
                continue
            if variable in ("AUTH_KEK", "AUTH_TLS_CERT", "AUTH_TLS_KEY", "AUTH_TLS_CLIENT_CA"):
                continue  # secrets and files this machine does not have
            if variable == "AUTH_SERVICE_TOKENS_FILE":
                continue
            try:
                declaration_of(variable).parser.parse(value)
            except ValueError:
                pytest.fail(f"{path.relative_to(root)}: {variable}={value} is refused")
            checked += 1
    assert checked >= 5, checked


# --- AUTH_* variables no setting declares (the operator review) --------------------------


def test_unknown_auth_variables_are_found_with_the_closest_declared_name() -> None:
    env = {
        "AUTH_ACESS_TTL": "60",  # one letter short
        "AUTH_LOGIN_THROTLE": "off",
        "auth_workers": "2",  # the right name in the wrong case is not read either
        "AUTH_NOTHING_LIKE_IT_AT_ALL": "1",
        "AUTH_ACCESS_TTL": "60",  # declared
        "AUTH_TARGET": "127.0.0.1:50051",  # read by `authsvc load` and `make load`
        "AUTH_PASSWORD": MARKER,  # read by the Node example (examples/node)
        "PATH": "/bin",
    }
    assert unknown_variables(env) == [
        ("AUTH_ACESS_TTL", "AUTH_ACCESS_TTL"),
        ("AUTH_LOGIN_THROTLE", "AUTH_LOGIN_THROTTLE"),
        ("AUTH_NOTHING_LIKE_IT_AT_ALL", None),
        ("auth_workers", "AUTH_WORKERS"),
    ]
    assert unknown_variables({"AUTH_ACCESS_TTL": "60", "HOME": "/"}) == []


@pytest.mark.system
def test_a_misspelled_variable_is_reported_in_one_warning_line_without_its_value(
    database_url: str, tmp_path: Path
) -> None:
    """`AUTH_ACESS_TTL=60` used to be ignored without a word: tokens lived 900 s."""
    env = _server_env(database_url, tmp_path, AUTH_ACESS_TTL=MARKER, AUTH_KEK_FILE=MARKER + "2")
    result = _authsvc("migrate", env=env)
    assert result.returncode == 0, result.stderr
    assert MARKER not in result.stderr, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, result.stderr
    assert "AUTH_ACESS_TTL is not an authsvc setting" in warnings[0], warnings
    assert "did you mean AUTH_ACCESS_TTL?" in warnings[0], warnings
    assert "AUTH_KEK_FILE is not an authsvc setting" in warnings[1], warnings
    # In JSON mode the same, as JSON lines.
    result = _authsvc("migrate", env={**env, "AUTH_LOG_FORMAT": "json"})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    messages = [line["message"] for line in lines if line["level"] == "WARNING"]
    assert any("did you mean AUTH_ACCESS_TTL?" in m for m in messages), messages


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://user:Hunter2Secret@127.0.0.1:99999/x",
        "postgresql://h1:5432,h2:70000/db?target_session_attrs=read-write",
        "postgresql://[::1]:0/x",
        "postgresql://h:5x/x",
    ],
)
def test_a_database_port_out_of_range_is_refused_at_start_without_the_url(url: str) -> None:
    """asyncpg refuses such a port only when connecting, with an OverflowError that made
    every command exit 70 ("a bug") with a traceback: the setting is refused instead,
    naming the variable, never echoing the URL (it holds a password)."""
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"AUTH_DATABASE_URL": url, "AUTH_KEK": FIXTURE_KEK})
    message = str(refused.value)
    assert message.startswith("AUTH_DATABASE_URL: ") and "65535" in message
    assert "Hunter2Secret" not in message and "99999" not in message


def test_database_urls_with_several_hosts_and_ports_in_range_still_parse() -> None:
    for url in (
        "postgresql://u:p@127.0.0.1:5432/x",
        "postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write",
        "postgresql://[::1]:5432/x",
        "postgresql:///db?host=/tmp",
        "postgres://u:p%3A@h/x",
    ):
        assert Settings.from_env({"AUTH_DATABASE_URL": url, "AUTH_KEK": FIXTURE_KEK})


def test_a_decimal_with_too_many_digits_is_refused_saying_how_many_are_allowed() -> None:
    """In range but with 13 digits after the point: the refusal says the limit (it read
    as if the value were out of range)."""
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"AUTH_DB_TIMEOUT": "5.0000000000000"})
    assert "at most 12 digits after the point" in str(refused.value)
    assert Settings.from_env({"AUTH_DB_TIMEOUT": "5.000000000000"}).db_timeout == 5


def test_the_connection_budget_counts_a_pool_and_a_listener_per_worker() -> None:
    settings = dataclasses.replace(Settings.from_env({}), db_pool_size=10, workers=4)
    assert connection_budget_problem(settings, 44) is None
    problem = connection_budget_problem(settings, 43)
    assert problem is not None and "needs up to 44" in problem and "takes 43" in problem


# --- lists: one spelling too (the outside-in review) -------------------------------------


@pytest.mark.parametrize("variable", ["AUTH_AUDIENCES", "AUTH_CALLER_AUTH"])
@pytest.mark.parametrize(
    "value",
    [
        "admin,,validate",  # an empty item was dropped without a word
        "admin, validate",  # blanks around items were stripped
        "admin ,validate",
        "admin,",  # a trailing comma
        ",admin",
        ",",
        "admin,admin",  # a repeat counted once
    ],
)
def test_a_list_setting_takes_items_separated_by_bare_commas_only(
    variable: str, value: str
) -> None:
    # Exactly the declared sentence: nothing of the value comes back.
    assert_refused(variable, value)


def test_the_list_spelling_the_table_shows_is_accepted() -> None:
    settings = Settings.from_env({"AUTH_AUDIENCES": "orders-api,https://billing.example/"})
    assert settings.audiences == {"orders-api", "https://billing.example/"}
    groups = declaration_of("AUTH_CALLER_AUTH").parser
    assert groups.parse("validate,admin") == groups.parse("admin,validate") == {"validate", "admin"}
    for variable in ("AUTH_AUDIENCES", "AUTH_CALLER_AUTH"):
        allowed = declaration_of(variable).parser.allowed
        assert "no blanks" in allowed and "repeated" in allowed, allowed


# --- AUTH_KEK: one spelling, what `openssl rand -base64 32` prints (the outside-in review) ---

KEK_BYTES = bytes([0xFB, 0xFF, 0xBF] * 10 + [0xFB, 0xFF])  # "+" and "/" in standard base64
STANDARD_KEK = base64.b64encode(KEK_BYTES).decode()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(base64.urlsafe_b64encode(KEK_BYTES).decode(), id="url-safe"),
        pytest.param(STANDARD_KEK.rstrip("="), id="unpadded"),
        pytest.param(base64.urlsafe_b64encode(KEK_BYTES).decode().rstrip("="), id="url-unpadded"),
        pytest.param(STANDARD_KEK + "=", id="extra-padding"),
        pytest.param(STANDARD_KEK[:20] + "\n" + STANDARD_KEK[20:], id="line-break"),
        # The last character carries 2 bits beyond the 32 bytes: only one spelling has them 0.
        pytest.param("a" * 43 + "=", id="non-canonical"),
        pytest.param(base64.b64encode(KEK_BYTES[:31]).decode(), id="31-bytes"),
        pytest.param(base64.b64encode(KEK_BYTES + b"!").decode(), id="33-bytes"),
    ],
)
def test_auth_kek_takes_only_standard_padded_base64_of_32_bytes(value: str) -> None:
    assert STANDARD_KEK.count("+") and STANDARD_KEK.count("/")
    message = assert_refused("AUTH_KEK", value)
    assert value not in message and value[:8] not in message


def test_the_kek_openssl_prints_is_accepted() -> None:
    assert Settings.from_env({"AUTH_KEK": STANDARD_KEK}).kek == KEK_BYTES
    assert "openssl rand -base64 32" in declaration_of("AUTH_KEK").parser.allowed


# --- leading zeros (the outside-in review) ------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AUTH_ACCESS_TTL", "0900"),  # 900 to us, 0o900 (invalid) or 0o644-style to a reader
        ("AUTH_WORKERS", "04"),
        ("AUTH_TOKEN_CACHE_SIZE", "00"),  # 0 is allowed here, but spelt `0`
        ("AUTH_THROTTLE_USER_FAILURES", "007"),
        ("AUTH_DB_TIMEOUT", "05"),
        ("AUTH_DB_TIMEOUT", "00.5"),
        ("AUTH_SHUTDOWN_GRACE", "00"),
        ("AUTH_LISTEN", "127.0.0.1:05005"),
        ("AUTH_METRICS_LISTEN", "[::1]:09464"),
        ("AUTH_DATABASE_URL", "postgresql://db:05432/auth"),
        ("AUTH_DATABASE_URL", "postgresql://a:5432,b:06432/auth"),
    ],
)
def test_a_number_with_leading_zeros_is_refused(variable: str, value: str) -> None:
    assert_refused(variable, value)


def test_zero_itself_and_decimals_below_one_are_accepted() -> None:
    settings = Settings.from_env(
        {"AUTH_TOKEN_CACHE_SIZE": "0", "AUTH_DB_TIMEOUT": "0.5", "AUTH_SHUTDOWN_GRACE": "0"}
    )
    assert (settings.token_cache_size, settings.db_timeout, settings.shutdown_grace) == (0, 0.5, 0)
    assert Settings.from_env({"AUTH_ACCESS_TTL": "900"}).access_ttl == 900
    assert Settings.from_env({"AUTH_LISTEN": "127.0.0.1:0"}).listen == "127.0.0.1:0"
    url = "postgresql://a:5432,b:6432/auth"
    assert Settings.from_env({"AUTH_DATABASE_URL": url, "AUTH_KEK": FIXTURE_KEK})


def test_cli_numbers_refuse_leading_zeros_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--workers", "04"])
    assert "must be a whole number from 1 to" in capsys.readouterr().err


# --- trivially weak KEKs (the outside-in review) -----------------------------------------


@pytest.mark.parametrize(
    "key",
    [bytes(32), b"\xff" * 32, b"A" * 32, b"\x01" * 32],
    ids=["all-zero", "all-ff", "all-A", "all-01"],
)
def test_a_kek_of_one_repeated_byte_is_refused_naming_auth_kek_not_its_value(key: bytes) -> None:
    """`"A" * 43 + "="` (32 zero bytes, once our own fixtures' KEK) was taken as a key: a
    placeholder, not a secret. Refused at start, in a message naming AUTH_KEK and saying
    why, without the value."""
    value = base64.b64encode(key).decode()
    message = refusal({"AUTH_KEK": value})
    assert message.startswith("AUTH_KEK: "), message
    assert "repeated" in message and "openssl rand -base64 32" in message, message
    assert value not in message and value[:8] not in message, message
    # Built in code too (the server checks its settings at start).
    with pytest.raises(SettingsError, match=r"^AUTH_KEK: .*repeated"):
        Settings(kek=key).check()


def test_a_kek_file_of_one_repeated_byte_is_refused(tmp_path: Path) -> None:
    """The embedded database's AUTH_DATA_DIR/kek is held to the same rule (one written by
    hand, or zeroed): refused in one line naming the file, not its bytes."""
    path = tmp_path / "kek"
    path.write_bytes(bytes(32))
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match=r"kek: the KEK file holds one byte repeated"):
        load_or_create_kek_file(path)
    path.unlink()
    made = load_or_create_kek_file(path)  # a new one: random, so accepted when read again
    assert load_or_create_kek_file(path) == made and len(set(made)) > 1


def test_a_placeholder_kek_file_refusal_says_how_to_replace_it_and_what_that_costs(
    tmp_path: Path,
) -> None:
    """It said "a placeholder rather than a key" and no more: replacing the file is the fix,
    but what the old KEK sealed (the stored signing keys) no longer opens."""
    path = tmp_path / "kek"
    path.write_bytes(b"\x5a" * 32)
    path.chmod(0o600)
    with pytest.raises(ConfigurationError) as refused:
        load_or_create_kek_file(path)
    message = str(refused.value)
    assert "32 random bytes" in message, message
    assert "head -c 32 /dev/urandom" in message, message
    assert "signing keys" in message and "cannot be opened" in message, message
    assert "docs/operations.md" in message, message
    assert "Z" * 8 not in message and "\n" not in message


@pytest.mark.parametrize("newline", [b"", b"\n"])
def test_a_kek_file_of_base64_text_is_refused_saying_it_holds_raw_bytes(
    tmp_path: Path, newline: bytes
) -> None:
    """`openssl rand -base64 32 > kek` (AUTH_KEK's form) was refused as "expected a 32-byte
    KEK file": it is 32 bytes, once decoded. Say so, and how to write the raw bytes."""
    text = base64.b64encode(bytes(range(1, 33))) + newline
    path = tmp_path / "kek"
    path.write_bytes(text)
    path.chmod(0o600)
    with pytest.raises(ConfigurationError) as refused:
        load_or_create_kek_file(path)
    message = str(refused.value)
    assert "base64 text" in message and "raw 32 bytes" in message, message
    assert "head -c 32 /dev/urandom" in message, message
    assert text.decode().strip() not in message and text.decode()[:8] not in message


def test_a_kek_file_of_another_length_is_refused_saying_its_length(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    path.write_bytes(bytes(range(1, 17)))
    path.chmod(0o600)
    with pytest.raises(ConfigurationError, match=r"raw 32 bytes.*holds 16"):
        load_or_create_kek_file(path)


def test_the_fixture_kek_is_accepted() -> None:
    assert len(Settings.from_env({"AUTH_KEK": FIXTURE_KEK}).kek or b"") == 32


# --- one spelling of an address (the outside-in review) ----------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # Host ::1 port 0, or host ::1:0 and no port? IPv6 is written in brackets.
        ("AUTH_LISTEN", "::1:0"),
        ("AUTH_LISTEN", "::1:50051"),
        ("AUTH_METRICS_LISTEN", "::1:9464"),
        ("AUTH_METRICS_LISTEN", ":::9464"),
        ("AUTH_LISTEN", "[127.0.0.1]:50051"),  # brackets are for IPv6 alone
        ("AUTH_LISTEN", "127.1:50051"),  # 127.0.0.1 to getaddrinfo, not to a reader
        ("AUTH_LISTEN", "127.0.0.1:0080"),
    ],
)
def test_an_ambiguous_address_is_refused(variable: str, value: str) -> None:
    assert_refused(variable, value)


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("AUTH_LISTEN", "127.0.0.1:050051", "its port has a leading zero"),
        ("AUTH_LISTEN", "[::1]:65536", "its port is above 65535"),
        ("AUTH_METRICS_LISTEN", "127.1:0", "its host is numbers but not a dotted quad"),
        ("AUTH_METRICS_LISTEN", ":9464", "its host is empty"),
        ("AUTH_LISTEN", "[127.0.0.1]:0", "brackets are only for an IPv6 host"),
    ],
)
def test_an_address_refusal_names_the_part_at_fault(variable: str, value: str, reason: str) -> None:
    message = refusal({variable: value})
    assert message.startswith(f"{variable}: must be HOST:PORT"), message
    assert "from 0 to 65535 without leading zeros" in message, message
    assert f"): {reason}" in message, message
    assert value not in message


def test_localhost_in_capitals_is_a_loopback_listen_address() -> None:
    """Start-up said "must include admin when AUTH_LISTEN is not a loopback address"."""
    assert Settings.from_env({"AUTH_LISTEN": "LOCALHOST:0"}).listen == "LOCALHOST:0"


@pytest.mark.parametrize("variable", ["AUTH_LISTEN", "AUTH_METRICS_LISTEN"])
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("localhost.:0", "localhost with a trailing dot"),
        ("[::ffff:127.0.0.1]:0", "IPv4-mapped IPv6 address"),
    ],
)
def test_a_listen_address_of_unsure_loopback_is_refused_at_parse(
    variable: str, value: str, reason: str
) -> None:
    """Not the AUTH_CALLER_AUTH refusal (AUTH_LISTEN) nor "invalid argument" at bind
    (AUTH_METRICS_LISTEN): refused where it is read, saying why."""
    message = refusal({variable: value})
    assert message.startswith(f"{variable}: must be HOST:PORT"), message
    assert reason in message, message


@pytest.mark.parametrize(
    ("listen", "metrics"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("[::1]:50051", "[0:0:0:0:0:0:0:1]:50051"),
        ("localhost:50051", "LOCALHOST:50051"),
        ("0.0.0.0:50051", "127.0.0.1:50051"),
        ("[::]:9464", "127.0.0.1:9464"),  # [::] takes IPv4 too
        ("10.0.0.5:9464", "[::]:9464"),
    ],
)
def test_metrics_on_the_grpc_address_is_refused_naming_both(listen: str, metrics: str) -> None:
    """The second bind failed saying AUTH_LISTEN was "in use by another process"."""
    message = refusal({"AUTH_LISTEN": listen, "AUTH_METRICS_LISTEN": metrics})
    assert message.startswith("AUTH_METRICS_LISTEN: must not be AUTH_LISTEN's address"), message
    with pytest.raises(SettingsError, match="AUTH_LISTEN's address"):
        Settings(listen=listen, metrics_listen=metrics).check()


@pytest.mark.parametrize(
    ("listen", "metrics"),
    [
        ("127.0.0.1:0", "127.0.0.1:0"),  # two free ports
        ("127.0.0.1:50051", "127.0.0.1:9464"),
        ("127.0.0.1:50051", "127.0.0.2:50051"),
        ("127.0.0.1:50051", "[::1]:50051"),  # one port, two families
    ],
)
def test_metrics_on_another_port_or_host_is_accepted(listen: str, metrics: str) -> None:
    settings = Settings.from_env({"AUTH_LISTEN": listen, "AUTH_METRICS_LISTEN": metrics})
    assert (settings.listen, settings.metrics_listen) == (listen, metrics)


def test_bracketed_ipv6_addresses_are_accepted() -> None:
    settings = Settings.from_env({"AUTH_LISTEN": "[::1]:0", "AUTH_METRICS_LISTEN": "[::]:9464"})
    assert (settings.listen, settings.metrics_listen) == ("[::1]:0", "[::]:9464")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:Hunter2Secret@::1:5432/x",
        "postgresql://u:Hunter2Secret@::1/x",
        "postgresql://a:5432,::1:6543/db?target_session_attrs=read-write",
    ],
)
def test_an_unbracketed_ipv6_database_host_is_refused_at_start(url: str) -> None:
    """asyncpg refuses it only when connecting (a ValueError from its port parsing)."""
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"AUTH_DATABASE_URL": url, "AUTH_KEK": FIXTURE_KEK})
    message = str(refused.value)
    assert message.startswith("AUTH_DATABASE_URL: ") and "brackets" in message, message
    assert "Hunter2Secret" not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:Hunter2Secret@/db?host=::1&port=5432",
        "postgresql://u:Hunter2Secret@/db?host=127.0.0.1,::1&port=5432,5433",
        "postgresql://u:Hunter2Secret@/db?host=fe80::1%25eth0&port=5432",
        "postgresql://u:Hunter2Secret@:5432/db",
        "postgresql://u:Hunter2Secret@h1:5432,/db",
        "postgresql://u:Hunter2Secret@h1:5432,,h2:5432/db",
        "postgresql://u:Hunter2Secret@/db?host=h1,,h2",
        "postgresql://u:Hunter2Secret@/db?host=:5432",
        "postgresql://u:Hunter2Secret@[fe80::1%25eth0]:5432/db",
        "postgresql://u:Hunter2Secret@[::1%lo]:5432/db",
        "postgresql://u:Hunter2Secret@[]:5432/db",
        "postgresql://u:Hunter2Secret@/db?host=[fe80::1%25eth0]&port=5432",
        "postgresql://u:Hunter2Secret@/db?host=[::1%lo]:5432",
    ],
)
def test_a_database_host_asyncpg_cannot_connect_to_is_refused_at_start(url: str) -> None:
    """An unbracketed IPv6 address in the `host=` parameter, an empty host before a port
    or in a list, a zone id (asyncpg fails on each only when connecting: gaierror,
    IndexError): refused at start naming the variable, the URL never echoed."""
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"AUTH_DATABASE_URL": url, "AUTH_KEK": FIXTURE_KEK})
    message = str(refused.value)
    assert message.startswith("AUTH_DATABASE_URL: ") and "brackets" in message, message
    assert "Hunter2Secret" not in message and "eth0" not in message


def test_database_hosts_asyncpg_connects_to_still_parse() -> None:
    """The spellings asyncpg 0.32 reaches (checked against a listener on loopback)."""
    for url in (
        "postgresql://u:p@/db?host=[::1]&port=5432",
        "postgresql://u:p@/db?host=[::1]:5432",
        "postgresql://u:p@/db?host=%5B::1%5D&port=5432",
        "postgresql://u:p@/db?host=127.0.0.1,[::1]&port=5432,5433",
        "postgresql://u:p@/db?host=127.0.0.1:5432",
        "postgresql://u:p@/db?host=/var/run/postgresql",
        "postgresql://u:p@/db",
        "postgresql:///db",
        # asyncpg takes the authority's hosts and ignores host= then.
        "postgresql://u:p@127.0.0.1:5432/db?host=::1",
        "postgresql://u:p@%2Fvar%2Frun%2Fpostgresql/db",
    ):
        assert Settings.from_env({"AUTH_DATABASE_URL": url, "AUTH_KEK": FIXTURE_KEK}), url


def test_the_load_target_is_an_address_in_its_one_spelling(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for bad in ("::1:50051", "127.0.0.1:050051"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["load", "--target", bad])
        assert "HOST:PORT" in capsys.readouterr().err
    args = build_parser().parse_args(["load", "--target", "[::1]:50051"])
    assert args.target == "[::1]:50051"


@pytest.mark.parametrize("target", ["[::1]:0", "127.0.0.1:0", "localhost:0"])
def test_the_load_target_refuses_port_0_which_no_call_reaches(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Port 0 binds any free port, but no call reaches it: every call of the run failed."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["load", "--target", target])
    assert "port 0" in capsys.readouterr().err
    monkeypatch.setenv("AUTH_TARGET", target)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["load"])
    assert "port 0" in capsys.readouterr().err


# --- list settings: comma look-alikes (the outside-in review) ----------------------------


@pytest.mark.parametrize("comma", COMMA_LOOK_ALIKES, ids=lambda c: f"U+{ord(c):04X}")
def test_a_list_with_a_comma_look_alike_is_refused_saying_so(comma: str) -> None:
    """`validate<U+FF0C>admin` (a full-width comma) is no list of two: the refusal says which
    character it is and that items are separated by a plain comma."""
    for variable, value in (
        ("AUTH_CALLER_AUTH", f"validate{comma}admin"),
        ("AUTH_AUDIENCES", f"orders{comma}billing"),
        ("AUTH_AUDIENCES", f"orders,billing{comma}shipping"),
    ):
        message = refusal({variable: value, "AUTH_SERVICE_TOKENS_FILE": __file__})
        assert message.startswith(f"{variable}: "), message
        assert f"U+{ord(comma):04X}" in message and "plain comma" in message, message
        assert "orders" not in message and "\n" not in message, message
