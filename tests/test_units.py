"""Pure functions, no server: settings parsing, the refresh decision table,
refresh-token helpers and request limits."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from authsvc_client import addresses
from authsvc_client.addresses import HostPort
from authsvc_client.gen.auth.v1 import auth_pb2

from service.api.wire import set_timestamp, timestamp, timestamp_fields
from service.app import print_banner
from service.domain.records import RefreshTokenState
from service.domain.refresh_tokens import (
    ChildTokens,
    Reject,
    Replay,
    RevokeForReuse,
    Rotate,
    decide_refresh,
    derive_child_token,
    hash_token,
    is_well_formed,
    new_refresh_token,
)
from service.errors import (
    FieldViolation,
    InvalidArgument,
    RefreshTokenExpired,
    RefreshTokenInvalid,
    SessionRevoked,
)
from service.request_limits import (
    MAX_PASSWORD_BYTES,
    MAX_SCOPE_BYTES,
    MAX_SCOPES,
    MAX_TOKEN_BYTES,
    MAX_USERNAME_BYTES,
    MIN_PASSWORD_LENGTH,
    RequestCheck,
)
from service.settings import MAX_LEEWAY, Settings, SettingsError

# Settings.from_env

INT_VARS = (
    "AUTH_ACCESS_TTL",
    "AUTH_REFRESH_IDLE_TTL",
    "AUTH_REFRESH_ABSOLUTE_TTL",
    "AUTH_REFRESH_REUSE_GRACE",
    "AUTH_LEEWAY",
    "AUTH_DB_POOL_SIZE",
    "AUTH_TOKEN_CACHE_SIZE",
    "AUTH_KEY_ROTATION_PERIOD",
    "AUTH_EVENT_AGGREGATION_WINDOW",
)
FLOAT_VARS = ("AUTH_DB_TIMEOUT", "AUTH_SHUTDOWN_GRACE", "AUTH_REVOCATION_POLL_INTERVAL")
NUMERIC_VARS = INT_VARS + FLOAT_VARS
KEK_32 = bytes(range(100, 132))


def settings_error(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    return str(caught.value)


def assert_one_line_naming(message: str, variable: str, value: str) -> None:
    assert message.startswith(variable), message
    assert "\n" not in message and "\r" not in message
    assert value not in message, f"the message echoes the value: {message!r}"


def test_defaults_from_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.listen == "127.0.0.1:50051"
    assert settings.database_url is None
    assert settings.data_dir == Path(".authsvc")
    assert settings.issuer == "authsvc"
    assert settings.audience == "authsvc"
    assert settings.signing_alg == "ES256"
    assert settings.kek is None
    assert settings.access_ttl == 900
    assert settings.refresh_idle_ttl == 1_209_600
    assert settings.refresh_absolute_ttl == 2_592_000
    assert settings.refresh_reuse_grace == 10
    assert settings.leeway == 0


def test_every_variable_is_read(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("cert.pem", "key.pem", "ca.pem", "services")}
    for path in files.values():
        path.write_text("x")
    env = {
        "AUTH_LISTEN": "0.0.0.0:6000",
        "AUTH_DATABASE_URL": "postgresql://u:p@db/auth",
        "AUTH_DATA_DIR": "/var/lib/authsvc",
        "AUTH_ISSUER": "https://auth.example",
        "AUTH_AUDIENCE": "api",
        "AUTH_SIGNING_ALG": "RS256",
        "AUTH_KEK": base64.b64encode(KEK_32).decode(),
        "AUTH_ACCESS_TTL": "60",
        "AUTH_REFRESH_IDLE_TTL": "3600",
        "AUTH_REFRESH_ABSOLUTE_TTL": "7200",
        "AUTH_REFRESH_REUSE_GRACE": "0",
        "AUTH_LEEWAY": "5",
        "AUTH_DB_POOL_SIZE": "3",
        "AUTH_DB_TIMEOUT": "2.5",
        "AUTH_SHUTDOWN_GRACE": "0",
        "AUTH_TOKEN_CACHE_SIZE": "0",
        "AUTH_REVOCATION_POLL_INTERVAL": "0.5",
        "AUTH_KEY_ROTATION_PERIOD": "86400",
        "AUTH_METRICS_LISTEN": "0.0.0.0:9464",
        "AUTH_TLS_CERT": str(files["cert.pem"]),
        "AUTH_TLS_KEY": str(files["key.pem"]),
        "AUTH_TLS_CLIENT_CA": str(files["ca.pem"]),
        "AUTH_SERVICE_TOKENS_FILE": str(files["services"]),
        "AUTH_CALLER_AUTH": "validate,admin",
    }
    settings = Settings.from_env(env)
    assert settings == Settings(
        listen="0.0.0.0:6000",
        database_url="postgresql://u:p@db/auth",
        data_dir=Path("/var/lib/authsvc"),
        issuer="https://auth.example",
        audience="api",
        signing_alg="RS256",
        kek=KEK_32,
        access_ttl=60,
        refresh_idle_ttl=3600,
        refresh_absolute_ttl=7200,
        refresh_reuse_grace=0,
        leeway=5,
        db_pool_size=3,
        db_timeout=2.5,
        shutdown_grace=0.0,
        token_cache_size=0,
        revocation_poll_interval=0.5,
        key_rotation_period=86400,
        metrics_listen="0.0.0.0:9464",
        tls_cert=files["cert.pem"],
        tls_key=files["key.pem"],
        tls_client_ca=files["ca.pem"],
        service_tokens_file=files["services"],
        caller_auth=frozenset({"validate", "admin"}),
    )
    # The KEK never shows in a repr (logs, tracebacks).
    assert base64.b64encode(KEK_32).decode() not in repr(settings)
    assert KEK_32.hex() not in repr(settings)


@pytest.mark.parametrize("variable", NUMERIC_VARS)
@pytest.mark.parametrize("value", ["abc", "-1", "12x", "1 2", "ten", "0x10", "-0.5", "nan", "inf"])
def test_a_bad_number_stops_with_one_line_naming_the_variable(variable: str, value: str) -> None:
    message = settings_error({variable: value})
    assert_one_line_naming(message, variable, value)


@pytest.mark.parametrize("variable", INT_VARS)
@pytest.mark.parametrize("value", ["1.5", "1e3", "99999999999999999999"])
def test_whole_seconds_only(variable: str, value: str) -> None:
    message = settings_error({variable: value})
    assert_one_line_naming(message, variable, value)


@pytest.mark.parametrize(
    "variable",
    ["AUTH_ACCESS_TTL", "AUTH_REFRESH_IDLE_TTL", "AUTH_REFRESH_ABSOLUTE_TTL", "AUTH_DB_POOL_SIZE"],
)
def test_zero_is_refused_where_it_makes_no_sense(variable: str) -> None:
    assert settings_error({variable: "0"}).startswith(variable)


def test_zero_is_allowed_where_it_means_off() -> None:
    settings = Settings.from_env(
        {"AUTH_REFRESH_REUSE_GRACE": "0", "AUTH_LEEWAY": "0", "AUTH_TOKEN_CACHE_SIZE": "0"}
    )
    assert settings.refresh_reuse_grace == 0
    assert settings.leeway == 0
    assert settings.token_cache_size == 0


@pytest.mark.parametrize("variable", NUMERIC_VARS)
def test_an_empty_value_means_unset(variable: str) -> None:
    """`AUTH_X=` (as in a compose file) keeps the default rather than failing."""
    assert Settings.from_env({variable: ""}) == Settings()


def test_reuse_grace_has_an_upper_bound() -> None:
    assert Settings.from_env({"AUTH_REFRESH_REUSE_GRACE": "300"}).refresh_reuse_grace == 300
    assert settings_error({"AUTH_REFRESH_REUSE_GRACE": "301"}).startswith(
        "AUTH_REFRESH_REUSE_GRACE"
    )


def test_leeway_has_an_upper_bound() -> None:
    """Revocations are remembered for MAX_LEEWAY past the last token's exp, whatever the
    leeway is: a larger one would let a forgotten revocation's token back in."""
    assert MAX_LEEWAY == 300
    assert Settings.from_env({"AUTH_LEEWAY": "300"}).leeway == 300
    assert_one_line_naming(settings_error({"AUTH_LEEWAY": "301"}), "AUTH_LEEWAY", "301")


def test_event_aggregation_window_is_one_second_to_a_day() -> None:
    assert (
        Settings.from_env({"AUTH_EVENT_AGGREGATION_WINDOW": "86400"}).event_aggregation_window
        == 86_400
    )
    for bad in ("0", "86401"):
        assert settings_error({"AUTH_EVENT_AGGREGATION_WINDOW": bad}).startswith(
            "AUTH_EVENT_AGGREGATION_WINDOW"
        )


def test_kek_parsing() -> None:
    standard = base64.b64encode(KEK_32).decode()
    url_safe = base64.urlsafe_b64encode(KEK_32).decode().rstrip("=")
    assert Settings.from_env({"AUTH_KEK": standard}).kek == KEK_32

    for value in (
        url_safe,  # one spelling: what `openssl rand -base64 32` prints
        "not base64!!",
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        base64.b64encode(b"secret-kek-material-0123456789ab" * 2).decode(),
        "c2VjcmV0",
    ):
        message = settings_error({"AUTH_KEK": value})
        assert_one_line_naming(message, "AUTH_KEK", value)


@pytest.mark.parametrize("value", ["HS256", "none", "RS512", "eddsa ", "ES256K", "HS256,EdDSA"])
def test_only_asymmetric_signing_algorithms(value: str) -> None:
    message = settings_error({"AUTH_SIGNING_ALG": value})
    assert message.startswith("AUTH_SIGNING_ALG")
    assert "\n" not in message


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
def test_supported_signing_algorithms(alg: str) -> None:
    assert Settings.from_env({"AUTH_SIGNING_ALG": alg}).signing_alg == alg


@pytest.mark.parametrize(
    "value", ["nope", "127.0.0.1", ":50051", "127.0.0.1:", "127.0.0.1:99999", "host:port"]
)
def test_a_bad_listen_address(value: str) -> None:
    message = settings_error({"AUTH_LISTEN": value})
    assert message.startswith("AUTH_LISTEN")
    assert "\n" not in message


@pytest.mark.parametrize("value", ["127.0.0.1:0", "[::1]:50051", "localhost:65535"])
def test_good_listen_addresses(value: str) -> None:
    assert Settings.from_env({"AUTH_LISTEN": value}).listen == value


def test_transport_settings_that_do_not_fit_stop_start_up(tmp_path: Path) -> None:
    readable = tmp_path / "file.pem"
    readable.write_text("x")
    path = str(readable)
    cases = {
        "AUTH_TLS_KEY": {"AUTH_TLS_CERT": path},
        "AUTH_TLS_CLIENT_CA": {"AUTH_TLS_CLIENT_CA": path},
        "AUTH_CALLER_AUTH": {"AUTH_CALLER_AUTH": "validate"},
        "AUTH_SERVICE_TOKENS_FILE": {"AUTH_SERVICE_TOKENS_FILE": str(tmp_path / "missing")},
        "AUTH_METRICS_LISTEN": {"AUTH_METRICS_LISTEN": "9464"},
    }
    for variable, env in cases.items():
        assert_one_line_naming(settings_error(env), variable, str(tmp_path))
    # The admin API may not be open beyond loopback.
    message = settings_error({"AUTH_LISTEN": "0.0.0.0:50051"})
    assert message.startswith("AUTH_CALLER_AUTH") and "admin" in message
    guarded = {"AUTH_CALLER_AUTH": "admin", "AUTH_SERVICE_TOKENS_FILE": path}
    assert Settings.from_env({"AUTH_LISTEN": "0.0.0.0:50051", **guarded}).caller_auth == {"admin"}
    message = settings_error({"AUTH_CALLER_AUTH": "validate,tokens", "AUTH_TLS_CLIENT_CA": path})
    # An unknown group is not echoed (the value may be anything): the known ones are named.
    assert_one_line_naming(message, "AUTH_CALLER_AUTH", "tokens")
    assert "validate, admin" in message
    # A client CA alone names no service: every guarded call would be refused.
    tls = {"AUTH_TLS_CERT": path, "AUTH_TLS_KEY": path, "AUTH_TLS_CLIENT_CA": path}
    message = settings_error({"AUTH_CALLER_AUTH": "validate", **tls})
    assert message.startswith("AUTH_CALLER_AUTH") and "AUTH_SERVICE_TOKENS_FILE" in message


# decide_refresh

NOW = datetime(2030, 3, 1, 12, 0, tzinfo=UTC)
GRACE = timedelta(seconds=10)
IDLE = timedelta(days=14)
CHILD_HASH = hashlib.sha256(b"child").digest()


def token_state(**changes: object) -> RefreshTokenState:
    """An unused token of a live session, issued an hour ago."""
    state = RefreshTokenState(
        token_hash=hashlib.sha256(b"parent").digest(),
        session_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        issued_at=NOW - timedelta(hours=1),
        expires_at=NOW + timedelta(days=13),
        used_at=None,
        child_hash=None,
        child_expires_at=None,
        child_used=False,
        session_scopes=("read",),
        session_audience="authsvc",
        session_expires_at=NOW + timedelta(days=29),
        session_revoked=False,
        user_scopes=("read",),
        user_disabled=False,
    )
    return replace(state, **changes)  # type: ignore[arg-type]


def used_state(used_ago: timedelta, **changes: object) -> RefreshTokenState:
    """A token rotated `used_ago`, whose child exists."""
    base: dict[str, object] = {
        "used_at": NOW - used_ago,
        "child_hash": CHILD_HASH,
        "child_expires_at": NOW - used_ago + IDLE,
    }
    return token_state(**{**base, **changes})


def decide(
    state: RefreshTokenState | None, *, grace: timedelta = GRACE, now: datetime = NOW
) -> object:
    return decide_refresh(
        state,
        now=now,
        grace=grace,
        idle_ttl=IDLE,
        child_hash=CHILD_HASH,
        audiences=frozenset({"authsvc", "orders"}),
    )


SECOND = timedelta(seconds=1)

DECISIONS: list[tuple[str, RefreshTokenState | None, timedelta, object]] = [
    ("unknown token", None, GRACE, Reject(RefreshTokenInvalid)),
    ("revoked session", token_state(session_revoked=True), GRACE, Reject(SessionRevoked)),
    ("disabled user", token_state(user_disabled=True), GRACE, Reject(SessionRevoked)),
    (
        "revoked session, parent replayed within grace (a retry, not theft)",
        used_state(SECOND, session_revoked=True),
        GRACE,
        Reject(SessionRevoked),
    ),
    (
        "revoked session, rotated token outside grace: still reported as reuse",
        used_state(timedelta(minutes=5), session_revoked=True),
        GRACE,
        RevokeForReuse(),
    ),
    (
        "grace off, family already revoked by a concurrent reuse: reuse",
        used_state(timedelta(0), session_revoked=True),
        timedelta(0),
        RevokeForReuse(),
    ),
    ("idle expired", token_state(expires_at=NOW - SECOND), GRACE, Reject(RefreshTokenExpired)),
    ("idle expiry is exclusive", token_state(expires_at=NOW), GRACE, Reject(RefreshTokenExpired)),
    (
        "absolute expiry",
        token_state(session_expires_at=NOW - SECOND),
        GRACE,
        Reject(RefreshTokenExpired),
    ),
    (
        "absolute expiry is exclusive",
        token_state(session_expires_at=NOW),
        GRACE,
        Reject(RefreshTokenExpired),
    ),
    (
        "unused: child lives idle_ttl",
        token_state(),
        GRACE,
        Rotate(child_hash=CHILD_HASH, child_expires_at=NOW + IDLE),
    ),
    (
        "unused: child capped by the session",
        token_state(session_expires_at=NOW + timedelta(days=2)),
        GRACE,
        Rotate(child_hash=CHILD_HASH, child_expires_at=NOW + timedelta(days=2)),
    ),
    (
        "unused, one second before idle expiry",
        token_state(expires_at=NOW + SECOND),
        GRACE,
        Rotate(child_hash=CHILD_HASH, child_expires_at=NOW + IDLE),
    ),
    ("used within grace, child unused", used_state(SECOND), GRACE, Replay()),
    ("used just now", used_state(timedelta(0)), GRACE, Replay()),
    (
        "used within grace, child used",
        used_state(SECOND, child_used=True),
        GRACE,
        RevokeForReuse(),
    ),
    (
        "used within grace, another child",
        used_state(SECOND, child_hash=hashlib.sha256(b"other").digest()),
        GRACE,
        RevokeForReuse(),
    ),
    ("used outside grace", used_state(timedelta(minutes=5)), GRACE, RevokeForReuse()),
    ("grace ends exactly at used_at + grace", used_state(GRACE), GRACE, RevokeForReuse()),
    ("grace 0: any replay is reuse", used_state(timedelta(0)), timedelta(0), RevokeForReuse()),
    ("grace 0, a second later", used_state(SECOND), timedelta(0), RevokeForReuse()),
    (
        "grace 0, the winner's clock read came after ours: still reuse",
        used_state(-SECOND),
        timedelta(0),
        RevokeForReuse(),
    ),
    (
        "reuse outranks expiry: an expired rotated token still kills the family",
        used_state(timedelta(days=20), expires_at=NOW - timedelta(days=6)),
        GRACE,
        RevokeForReuse(),
    ),
    (
        "within grace but the child has expired",
        used_state(SECOND, child_expires_at=NOW),
        GRACE,
        Reject(RefreshTokenExpired),
    ),
    (
        "another configured audience",
        token_state(session_audience="orders"),
        GRACE,
        Rotate(child_hash=CHILD_HASH, child_expires_at=NOW + IDLE),
    ),
    (
        "an audience no longer configured",
        token_state(session_audience="payments-admin-api"),
        GRACE,
        Reject(RefreshTokenInvalid),
    ),
    (
        "an audience no longer configured, parent replayed within grace",
        used_state(SECOND, session_audience="payments-admin-api"),
        GRACE,
        Reject(RefreshTokenInvalid),
    ),
    (
        "an audience no longer configured does not hide reuse",
        used_state(timedelta(minutes=5), session_audience="payments-admin-api"),
        GRACE,
        RevokeForReuse(),
    ),
]


@pytest.mark.parametrize(
    ("state", "grace", "expected"),
    [case[1:] for case in DECISIONS],
    ids=[case[0] for case in DECISIONS],
)
def test_decide_refresh(
    state: RefreshTokenState | None, grace: timedelta, expected: object
) -> None:
    assert decide(state, grace=grace) == expected


def test_grace_window_edges() -> None:
    just_used = used_state(timedelta(0))
    assert decide(just_used, now=NOW + GRACE - timedelta(microseconds=1)) == Replay()
    assert decide(just_used, now=NOW + GRACE) == RevokeForReuse()


# Refresh-token helpers

SECRET_A = bytes(32)
SECRET_B = bytes([1]) * 32


def test_new_refresh_tokens_are_256_bit_url_safe_and_unique() -> None:
    tokens = {new_refresh_token() for _ in range(200)}
    assert len(tokens) == 200
    for token in tokens:
        assert is_well_formed(token)
        assert len(base64.urlsafe_b64decode(token + "=")) == 32


def test_derive_child_token_is_deterministic_per_parent_and_secret() -> None:
    parent = new_refresh_token()
    child = derive_child_token(parent, SECRET_A)
    assert derive_child_token(parent, SECRET_A) == child
    assert is_well_formed(child)
    assert child != parent
    assert derive_child_token(parent, SECRET_B) != child
    assert derive_child_token(new_refresh_token(), SECRET_A) != child
    # Grandchildren keep deriving (a chain never repeats a token).
    chain = [parent]
    for _ in range(20):
        chain.append(derive_child_token(chain[-1], SECRET_A))
    assert len(set(chain)) == len(chain)


def test_derive_child_token_is_hmac_sha256_of_the_parent_text() -> None:
    # Children of tokens issued before an upgrade must come out the same (a replay within
    # the grace window compares them with the stored child's hash).
    parent = "A" * 43
    expected = hmac.new(SECRET_A, parent.encode("ascii"), hashlib.sha256).digest()
    assert derive_child_token(parent, SECRET_A) == base64.urlsafe_b64encode(expected).rstrip(
        b"="
    ).decode("ascii")
    assert derive_child_token(parent, b"k" * 32) == "XKmPkbURfV5h9HK89Aj3mDXVDtn8mheGgJAjZo1e1eI"


def test_hash_token_is_sha256_of_the_token_text() -> None:
    token = new_refresh_token()
    digest = hash_token(token)
    assert len(digest) == 32
    assert digest == hashlib.sha256(token.encode("ascii")).digest()
    assert hash_token(token) == digest
    assert hash_token(new_refresh_token()) != digest


@pytest.mark.parametrize(
    "token",
    [
        "",
        "A" * 42,
        "A" * 44,
        "A" * 42 + "=",
        "A" * 42 + "+",
        "A" * 42 + "/",
        "A" * 42 + ".",
        "A" * 42 + "é",
        "A" * 43 + "\n",
        " " + "A" * 43,
        "A" * 21 + " " + "A" * 21,
    ],
)
def test_is_well_formed_rejects(token: str) -> None:
    assert not is_well_formed(token)


def test_is_well_formed_accepts_the_alphabet() -> None:
    assert is_well_formed("A" * 43)
    assert is_well_formed("-_" * 21 + "z")
    assert is_well_formed("0123456789abcdefghijklmnopqrstuvwxyzABCDEFG")


# RequestCheck limits, counted in UTF-8 bytes


def violations(check: RequestCheck) -> list[FieldViolation]:
    with pytest.raises(InvalidArgument) as caught:
        check.done()
    return caught.value.violations


@pytest.mark.parametrize("limit", [MAX_TOKEN_BYTES, MAX_USERNAME_BYTES, MAX_PASSWORD_BYTES, 256])
@pytest.mark.parametrize("char", ["a", "é", "€", "🔑"])
def test_text_limits_count_utf8_bytes(limit: int, char: str) -> None:
    width = len(char.encode())
    fits = char * (limit // width) + "a" * (limit % width)
    assert len(fits.encode()) == limit
    check = RequestCheck()
    assert check.text("field", fits, limit=limit) == fits
    check.done()

    over = fits + "a"
    check = RequestCheck()
    check.text("field", over, limit=limit)
    [violation] = violations(check)
    assert violation.field == "field"
    assert str(limit) in violation.description

    if width > 1:
        # Fewer characters than the limit, more bytes: still too long.
        sneaky = char * (limit // width + 1)
        assert len(sneaky) <= limit < len(sneaky.encode())
        check = RequestCheck()
        check.text("field", sneaky, limit=limit)
        assert [v.field for v in violations(check)] == ["field"]


def test_required_and_optional_text() -> None:
    check = RequestCheck()
    check.text("audience", "", limit=256, required=False)
    check.done()
    check = RequestCheck()
    check.text("password.username", "", limit=MAX_USERNAME_BYTES)
    check.text("password.password", "", limit=MAX_PASSWORD_BYTES)
    found = violations(check)
    assert [v.field for v in found] == ["password.username", "password.password"]
    assert all(v.description == "is required" for v in found)


def test_new_password_limits() -> None:
    """The rules the admin API and `authsvc users` share for a password to set."""
    check = RequestCheck()
    assert check.new_password("password", "x" * MIN_PASSWORD_LENGTH) == "x" * MIN_PASSWORD_LENGTH
    check.new_password("password", "é" * (MAX_PASSWORD_BYTES // 2))
    check.done()
    for password, description in (
        ("", "is required"),
        ("x" * (MIN_PASSWORD_LENGTH - 1), f"must be at least {MIN_PASSWORD_LENGTH} characters"),
        ("é" * (MAX_PASSWORD_BYTES // 2 + 1), f"is longer than {MAX_PASSWORD_BYTES} bytes"),
        ("pass\x00word", "must not contain NUL characters"),
    ):
        check = RequestCheck()
        check.new_password("password", password)
        assert [(v.field, v.description) for v in violations(check)] == [("password", description)]


def test_scope_limits() -> None:
    check = RequestCheck()
    scopes = [f"s{i}" for i in range(MAX_SCOPES)]
    assert check.scopes("scopes", scopes) == tuple(scopes)
    check.done()

    check = RequestCheck()
    check.scopes("scopes", [*scopes, "one-more"])
    assert [v.field for v in violations(check)] == ["scopes"]

    check = RequestCheck()
    longest = "x" * MAX_SCOPE_BYTES
    assert check.scopes("scopes", [longest]) == (longest,)
    check.done()

    check = RequestCheck()
    check.scopes("scopes", ["ok", longest + "x"])
    assert [v.field for v in violations(check)] == ["scopes[1]"]


@pytest.mark.parametrize("scope", ["has space", 'quo"te', "back\\slash", "é", "tab\t", ""])
def test_scope_characters(scope: str) -> None:
    check = RequestCheck()
    check.scopes("required_scopes", ["read", scope])
    assert [v.field for v in violations(check)] == ["required_scopes[1]"]


def test_scopes_keep_order_and_drop_duplicates() -> None:
    check = RequestCheck()
    assert check.scopes("scopes", ["b", "a", "b", "c", "a"]) == ("b", "a", "c")
    check.done()


def test_all_violations_are_reported_at_once() -> None:
    check = RequestCheck()
    check.text("password.username", "u" * (MAX_USERNAME_BYTES + 1), limit=MAX_USERNAME_BYTES)
    check.text("password.password", "", limit=MAX_PASSWORD_BYTES)
    check.scopes("scopes", ["bad scope"])
    check.missing("password")
    error_fields = [v.field for v in violations(check)]
    assert error_fields == ["password.username", "password.password", "scopes[0]", "password"]


@pytest.mark.parametrize(
    ("text", "host", "port", "loopback"),
    [
        ("127.0.0.1:50051", "127.0.0.1", 50051, True),
        ("[::1]:0", "::1", 0, True),
        ("LOCALHOST:9464", "LOCALHOST", 9464, True),
        ("localhost:80", "localhost", 80, True),
        ("0.0.0.0:6000", "0.0.0.0", 6000, False),
        ("auth.internal:65535", "auth.internal", 65535, False),
    ],
)
def test_host_port_is_parsed_and_written_back(
    text: str, host: str, port: int, loopback: bool
) -> None:
    address = HostPort.parse(text)
    assert (address.host, address.port, address.is_loopback) == (host, port, loopback)
    # Written back with an IPv6 host in brackets, so it parses to the same again.
    assert HostPort.parse(str(address)) == address
    assert str(address.with_port(1)).endswith(":1")


@pytest.mark.parametrize(
    "text",
    [
        "localhost",
        "127.0.0.1",
        ":50051",
        "127.0.0.1:http",
        "127.0.0.1:65536",
        "a b:1",
        "-x:1",
        "::1:9464",  # IPv6 only in brackets: host ::1 port 9464, or host ::1:9464?
        "127.0.0.1:0080",  # one spelling of a port, as the settings have
        "[::ffff:127.0.0.1]:9464",  # IPv4 in IPv6 clothing: written 127.0.0.1:9464
    ],
)
def test_host_port_refuses_what_is_not_host_and_port(text: str) -> None:
    with pytest.raises(ValueError, match=r"^HOST:PORT") as refused:
        HostPort.parse(text)
    message = str(refused.value)
    assert message.startswith(f"{addresses.ALLOWED}: "), message
    assert text not in message.split(": ", 1)[1]  # the text itself is never echoed


def test_the_text_banner_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    """Tooling parses these lines ("serving on", "metrics on"): byte for byte as before."""
    print_banner(
        Settings(), "127.0.0.1:50051", workers=2, metrics="127.0.0.1:9464", has_users=False
    )
    assert capsys.readouterr().out == (
        "create a first user (in another terminal, same directory):\n"
        "  .venv/bin/authsvc users create alice --scope read --password-stdin\n"
        "metrics on http://127.0.0.1:9464/metrics\n"
        "authsvc serving on 127.0.0.1:50051 (2 workers, database: embedded PostgreSQL in "
        ".authsvc/postgres)\n"
    )


def test_the_first_user_hint_names_the_database_the_server_uses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Followed as printed, the command must reach the server's database, not the default
    data directory's."""
    print_banner(
        Settings(data_dir=Path("/srv/auth data")), "127.0.0.1:1", workers=1, has_users=False
    )
    assert (
        "  AUTH_DATA_DIR='/srv/auth data' .venv/bin/authsvc users create alice"
        in capsys.readouterr().out
    )
    print_banner(
        Settings(database_url="postgresql://db.internal/authsvc"),
        "127.0.0.1:1",
        workers=1,
        has_users=False,
    )
    out = capsys.readouterr().out
    assert "with the same AUTH_* environment" in out
    assert "db.internal" not in out  # a URL may carry a password: never printed


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_banner_gives_no_first_user_hint_once_users_exist(
    capsys: pytest.CaptureFixture[str], log_format: str
) -> None:
    settings = Settings(log_format=log_format)
    print_banner(settings, "127.0.0.1:50051", workers=1, metrics="127.0.0.1:9464", has_users=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines  # the metrics line and the serving line, nothing else
    assert "metrics on http://127.0.0.1:9464/metrics" in lines[0]
    assert "authsvc serving on 127.0.0.1:50051 (1 worker," in lines[1]
    assert not any("first user" in line or "users create" in line for line in lines)


def test_the_json_banner_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    print_banner(Settings(log_format="json"), "[::1]:50051", workers=1, has_users=False)
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2, lines
    for record in records:
        assert {"time", "level", "logger", "message", "pid"} <= record.keys()
    assert "users create alice" in records[0]["message"]
    serving = records[1]
    assert (serving["address"], serving["port"], serving["workers"]) == ("[::1]:50051", 50051, 1)
    assert serving["database"] == "embedded PostgreSQL in .authsvc/postgres"
    # What the loaders' pattern (service/loadtest/local.py) finds in the line itself.
    found = re.search(r"authsvc serving on (\S+):(\d+)", lines[1])
    assert found is not None and found.groups() == ("[::1]", "50051"), lines[1]


@pytest.mark.parametrize("seconds", [0, 1, 1700000900, 1700086400.123456, 1.999999999, -1.5])
def test_set_timestamp_writes_what_timestamp_builds(seconds: float) -> None:
    """Responses write their times in place (set_timestamp): the same bytes as a Timestamp
    built from timestamp_fields, the field set even at the epoch."""
    built = auth_pb2.TokenPair(access_token_expires_at=timestamp_fields(seconds))
    written = auth_pb2.TokenPair()
    set_timestamp(written.access_token_expires_at, seconds)
    assert written.HasField("access_token_expires_at")
    assert written.SerializeToString() == built.SerializeToString()
    assert written.access_token_expires_at == timestamp(seconds)


def test_child_tokens_derive_what_derive_child_token_does() -> None:
    """The keyed HMAC made once gives each parent the child derive_child_token gives it,
    whatever was derived before (the keyed state is copied, never consumed)."""
    children = ChildTokens(SECRET_A)
    parents = [new_refresh_token() for _ in range(5)]
    for parent in [*parents, *parents]:
        assert children.derive(parent) == derive_child_token(parent, SECRET_A)
    assert ChildTokens(SECRET_B).derive(parents[0]) != children.derive(parents[0])
