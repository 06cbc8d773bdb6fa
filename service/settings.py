"""Configuration: one frozen dataclass, built from `AUTH_*` environment variables.

Each setting is declared once, as a field of `Settings`:

    access_ttl: int = setting(
        "AUTH_ACCESS_TTL", seconds(1, DAY), default=900, doc="access-token lifetime"
    )

naming its variable, its parser (which carries the bounds), its default and its doc.
`Settings.from_env` reads every declared variable, `Settings.check` validates a built
value (also run by the server at start, so settings made in code are held to the same
bounds), and `configuration_table()` renders the README's table
(`python -m service.settings --write-readme README.md` rewrites it; a test compares).

Parsing is strict: a bad value raises `SettingsError` whose message is one line naming
the variable and what it may be, and start-up stops there. The value itself is never
echoed: AUTH_KEK and AUTH_DATABASE_URL hold secrets, and any value may be huge or hold
control characters. Every number has a lower and an upper bound, chosen so that a value
inside them cannot break anything later (an overflowing date, gRPC's int32 limits, a
busy loop, thousands of processes or connections).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from service import addresses
from service.addresses import HostPort

SIGNING_ALGORITHMS = ("EdDSA", "ES256", "RS256")
CALL_GROUPS = ("validate", "admin")

T = TypeVar("T")
N = TypeVar("N", int, float)

MINUTE = 60
HOUR = 3600
DAY = 86_400
YEAR = 365 * DAY

MAX_LEEWAY = 300
"""The largest `AUTH_LEEWAY` accepted, seconds. Revocations are remembered for this much
past the last access token's `exp`, whatever the leeway is now, so that raising the leeway
later (up to here) can never bring a forgotten revocation's token back."""

MAX_AUDIENCE_BYTES = 256
"""The longest audience (`AUTH_AUDIENCE`, `AUTH_AUDIENCES` entries, Issue's field), bytes."""

MAX_AGE = 10 * YEAR
"""No duration goes beyond this: now ± any setting stays far inside datetime's years
1..9999, so no date arithmetic can overflow (a clean-up cut-off, a throttle window)."""

MAX_WORKERS = 64

README_TABLE_START = "<!-- settings-table:start -->"
README_TABLE_END = "<!-- settings-table:end -->"


class SettingsError(ValueError):
    """A configuration variable has a value we cannot use."""


# --- Parsers: text to a typed value, within bounds ---------------------------------------
#
# A parser's `allowed` says what it accepts; it is the whole of the error message, so no
# error can echo the value. `validate` checks a typed value (a Settings built in code).


class Parser(Generic[T]):
    """Turns a variable's text into a value, or refuses it."""

    @property
    def allowed(self) -> str:
        """What the variable may be, e.g. "a whole number of seconds from 1 to 86400"; the
        whole of the error message, so no error can echo the value."""
        raise NotImplementedError

    def parse(self, raw: str) -> T:
        """The value of `raw` (stripped, not empty); ValueError if refused."""
        raise NotImplementedError

    def validate(self, value: T) -> None:
        """ValueError unless `value` is one `parse` could have produced."""

    def show(self, value: T) -> str:
        """`value` as the README's default column shows it."""
        return f"`{value}`"


def _number(value: float) -> str:
    """A number as written in a variable: 86400, 0.05 (never 8.64e+04)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _human(amount: float) -> str | None:
    """Seconds in the largest unit that divides them (1209600: "14 d"); None below a minute."""
    for size, unit in ((YEAR, "y"), (DAY, "d"), (HOUR, "h"), (MINUTE, "min")):
        if amount >= size and amount % size == 0:
            return f"{_number(amount // size)} {unit}"
    return None


@dataclass(frozen=True)
class Number(Parser[N]):
    """A number from `low` to `high`; with `zero`, 0 too, meaning what `zero` says."""

    kind: type[N]
    low: N
    high: N
    unit: str = ""
    zero: str | None = None

    _WHOLE = re.compile(r"[0-9]{1,19}")
    _DECIMAL = re.compile(
        r"(?:[0-9]{1,19}(?:\.[0-9]{0,12})?|\.[0-9]{1,12})(?:[eE][-+]?[0-9]{1,3})?"
    )

    def __post_init__(self) -> None:
        assert 0 < self.low <= self.high or (self.low == 0 and self.zero is None)

    @property
    def allowed(self) -> str:
        what = "a whole number" if self.kind is int else "a number"
        if self.unit:
            what += f" of {self.unit}"
        low, high = self._with_unit(self.low), self._with_unit(self.high)
        if self.zero is not None:
            return f"{what}: 0 ({self.zero}) or from {low} to {high}"
        return f"{what} from {low} to {high}"

    def _with_unit(self, value: N) -> str:
        human = _human(value) if self.unit == "seconds" else None
        return _number(value) + (f" ({human})" if human else "")

    def parse(self, raw: str) -> N:
        pattern = self._WHOLE if self.kind is int else self._DECIMAL
        if not pattern.fullmatch(raw):
            raise ValueError(self.allowed)
        value = self.kind(raw)
        self.validate(value)
        return value

    def validate(self, value: N) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(self.allowed)
        if self.kind is int and not isinstance(value, int):
            raise ValueError(self.allowed)
        if not math.isfinite(value):
            raise ValueError(self.allowed)
        if value == 0 and self.zero is not None:
            return
        if not self.low <= value <= self.high:
            raise ValueError(self.allowed)

    def show(self, value: N) -> str:
        if value == 0 and self.zero is not None:
            return f"`0` ({self.zero})"
        human = _human(value) if self.unit == "seconds" else None
        return f"`{_number(value)}`" + (f" ({human})" if human else "")


def seconds(low: int, high: int, *, zero: str | None = None) -> Number[int]:
    """Whole seconds from `low` to `high` (and 0 if `zero` says what 0 means)."""
    return Number(int, low, high, "seconds", zero)


def duration(low: float, high: float, *, zero: str | None = None) -> Number[float]:
    """Seconds, fractions allowed, from `low` to `high` (and 0 if `zero` says what it means)."""
    return Number(float, float(low), float(high), "seconds", zero)


def count(low: int, high: int, *, zero: str | None = None, unit: str = "") -> Number[int]:
    """A whole number from `low` to `high` (and 0 if `zero` says what 0 means)."""
    return Number(int, low, high, unit, zero)


@dataclass(frozen=True)
class Choice(Parser[str]):
    """One of `options`, exactly."""

    options: tuple[str, ...]

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(self.options)

    def parse(self, raw: str) -> str:
        self.validate(raw)
        return raw

    def validate(self, value: str) -> None:
        if value not in self.options:
            raise ValueError(self.allowed)


@dataclass(frozen=True)
class Switch(Parser[bool]):
    """on/off (also true/false, yes/no, 1/0)."""

    @property
    def allowed(self) -> str:
        return "on or off"

    def parse(self, raw: str) -> bool:
        value = raw.lower()
        if value in ("on", "true", "1", "yes"):
            return True
        if value in ("off", "false", "0", "no"):
            return False
        raise ValueError(self.allowed)

    def validate(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ValueError(self.allowed)

    def show(self, value: bool) -> str:
        return "`on`" if value else "`off`"


@dataclass(frozen=True)
class Text(Parser[str]):
    """Printable text (no control characters) of 1 to `max_bytes` bytes in UTF-8."""

    max_bytes: int

    @property
    def allowed(self) -> str:
        return f"printable text of at most {self.max_bytes} bytes"

    def parse(self, raw: str) -> str:
        self.validate(raw)
        return raw

    def validate(self, value: str) -> None:
        if not (
            isinstance(value, str)
            and value
            and value.isprintable()
            and len(value.encode("utf-8", "surrogatepass")) <= self.max_bytes
        ):
            raise ValueError(self.allowed)


@dataclass(frozen=True)
class Word(Text):
    """Printable text without white space (an audience: compared exactly, listed with
    commas)."""

    @property
    def allowed(self) -> str:
        return f"printable text without spaces of at most {self.max_bytes} bytes"

    def validate(self, value: str) -> None:
        try:
            super().validate(value)
        except ValueError:
            raise ValueError(self.allowed) from None
        if any(c.isspace() for c in value):
            raise ValueError(self.allowed)


@dataclass(frozen=True)
class DatabaseUrl(Text):
    """A postgresql:// (or postgres://) URL, the only DSN form asyncpg takes."""

    max_bytes: int = 4096

    @property
    def allowed(self) -> str:
        return f"a postgresql:// URL of at most {self.max_bytes} bytes"

    def validate(self, value: str) -> None:
        super().validate(value)
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(self.allowed)


@dataclass(frozen=True)
class Address(Parser[str]):
    """HOST:PORT (an IPv6 host in brackets), port 0 to 65535 (`service.addresses`)."""

    @property
    def allowed(self) -> str:
        return addresses.ALLOWED

    def parse(self, raw: str) -> str:
        self.validate(raw)
        return raw

    def validate(self, value: str) -> None:
        HostPort.parse(value)


@dataclass(frozen=True)
class Directory(Parser[Path]):
    """A directory path (created when needed)."""

    @property
    def allowed(self) -> str:
        return "a directory path of at most 4096 bytes"

    def parse(self, raw: str) -> Path:
        path = Path(raw)
        self.validate(path)
        return path

    def validate(self, value: Path) -> None:
        text = str(value)
        if not text or not text.isprintable() or len(os.fsencode(text)) > 4096:
            raise ValueError(self.allowed)


@dataclass(frozen=True)
class ReadableFile(Parser[Path]):
    """The path of a file this process can read (checked when parsed)."""

    @property
    def allowed(self) -> str:
        return "the path of a readable file"

    def parse(self, raw: str) -> Path:
        path = Path(raw)
        Directory().validate(path)
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ValueError(self.allowed)
        return path

    def validate(self, value: Path) -> None:
        try:
            Directory().validate(value)
        except ValueError:
            raise ValueError(self.allowed) from None


@dataclass(frozen=True)
class Kek(Parser[bytes]):
    """Base64 (standard or URL-safe) of exactly 32 bytes."""

    @property
    def allowed(self) -> str:
        return "base64 of exactly 32 random bytes (openssl rand -base64 32)"

    def parse(self, raw: str) -> bytes:
        try:
            return parse_kek(raw)
        except ValueError:
            raise ValueError(self.allowed) from None

    def validate(self, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != 32:
            raise ValueError(self.allowed)

    def show(self, value: bytes) -> str:
        return "(secret)"


@dataclass(frozen=True)
class CommaSet(Parser[frozenset[T]]):
    """Comma-separated items, each read by `item`, at most `max_items` of them; blanks
    around items and empty items are ignored, repeats count once."""

    item: Parser[T]
    max_items: int

    @property
    def allowed(self) -> str:
        return f"a comma-separated list of at most {self.max_items} items, each {self.item.allowed}"

    def parse(self, raw: str) -> frozenset[T]:
        try:
            value = frozenset(self.item.parse(p.strip()) for p in raw.split(",") if p.strip())
        except ValueError:
            raise ValueError(self.allowed) from None
        self.validate(value)
        return value

    def validate(self, value: frozenset[T]) -> None:
        if not isinstance(value, AbstractSet) or len(value) > self.max_items:
            raise ValueError(self.allowed)
        for item in value:
            try:
                self.item.validate(item)
            except ValueError:
                raise ValueError(self.allowed) from None

    def show(self, value: frozenset[T]) -> str:
        return f"`{','.join(sorted(map(str, value)))}`" if value else "empty"


@dataclass(frozen=True)
class CommaList(Parser[tuple[T, ...]]):
    """Comma-separated items in order, each read by `item`, 1 to `max_items` of them
    (e.g. several accepted audiences: `CommaList(Text(256), max_items=32)`); blanks around
    items are ignored, an empty item or a repeat is refused."""

    item: Parser[T]
    max_items: int

    @property
    def allowed(self) -> str:
        return (
            f"a comma-separated list of 1 to {self.max_items} distinct items, "
            f"each {self.item.allowed}"
        )

    def parse(self, raw: str) -> tuple[T, ...]:
        try:
            value = tuple(self.item.parse(piece.strip()) for piece in raw.split(","))
        except ValueError:
            raise ValueError(self.allowed) from None
        self.validate(value)
        return value

    def validate(self, value: tuple[T, ...]) -> None:
        if not isinstance(value, tuple) or not 1 <= len(value) <= self.max_items:
            raise ValueError(self.allowed)
        if len(set(value)) != len(value):
            raise ValueError(self.allowed)
        for item in value:
            try:
                self.item.validate(item)
            except ValueError:
                raise ValueError(self.allowed) from None

    def show(self, value: tuple[T, ...]) -> str:
        return f"`{','.join(map(str, value))}`"


# --- Declarations ----------------------------------------------------------------------


@dataclass(frozen=True)
class Declaration(Generic[T]):
    """What `setting()` records about a field: its variable, parser and doc."""

    variable: str
    parser: Parser[T]
    doc: str
    shown_default: str | None = None


_DECLARATION = "authsvc.setting"


@overload
def setting(
    variable: str,
    parser: Parser[T],
    *,
    default: T,
    doc: str,
    shown_default: str | None = None,
    secret: bool = False,
) -> T: ...
@overload
def setting(
    variable: str,
    parser: Parser[T],
    *,
    default: None,
    doc: str,
    shown_default: str | None = None,
    secret: bool = False,
) -> T | None: ...
@overload
def setting(
    variable: str,
    parser: Parser[T],
    *,
    default_factory: Callable[[], T],
    doc: str,
    shown_default: str | None = None,
    secret: bool = False,
) -> T: ...
def setting(
    variable: str,
    parser: Parser[Any],
    *,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    doc: str,
    shown_default: str | None = None,
    secret: bool = False,
) -> Any:
    """A field of `Settings` read from `variable` by `parser` (unset or empty: the default).

    `doc` is the README's description; `secret` keeps the value out of repr()."""
    declaration = Declaration(variable, parser, " ".join(doc.split()), shown_default)
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        repr=not secret,
        metadata={_DECLARATION: declaration},
    )


WORKERS = count(1, MAX_WORKERS)
"""Server processes: AUTH_WORKERS and every `--workers` option."""


def default_workers() -> int:
    """The CPU count, at most MAX_WORKERS."""
    return min(os.cpu_count() or 1, MAX_WORKERS)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service reads from its environment (one declaration per variable)."""

    listen: str = setting(
        "AUTH_LISTEN",
        Address(),
        default="127.0.0.1:50051",
        doc="gRPC address; port 0 picks a free one",
    )
    database_url: str | None = setting(
        "AUTH_DATABASE_URL",
        DatabaseUrl(),
        default=None,
        secret=True,
        doc="PostgreSQL DSN; unset runs an embedded PostgreSQL in `AUTH_DATA_DIR`",
    )
    data_dir: Path = setting(
        "AUTH_DATA_DIR",
        Directory(),
        default=Path(".authsvc"),
        doc="embedded PostgreSQL data and the generated KEK file",
    )
    issuer: str = setting(
        "AUTH_ISSUER",
        Text(256),
        default="authsvc",
        doc="the `iss` claim of every access token",
    )
    audience: str = setting(
        "AUTH_AUDIENCE",
        Text(MAX_AUDIENCE_BYTES),
        default="authsvc",
        doc="the `aud` claim when Issue names none",
    )
    audiences: frozenset[str] = setting(
        "AUTH_AUDIENCES",
        CommaSet(Word(MAX_AUDIENCE_BYTES), max_items=64),
        default=frozenset(),
        doc="""further audiences Issue may name (comma-separated); any other is refused, so a
        client cannot mint tokens for every service that trusts authsvc""",
    )
    # ES256 by measurement: the fastest verification after RS256 (whose 3072-bit signing
    # costs milliseconds per token) and the most widely supported by JOSE libraries.
    signing_alg: str = setting(
        "AUTH_SIGNING_ALG",
        Choice(SIGNING_ALGORITHMS),
        default="ES256",
        doc="JWS algorithm for new signing keys (RS256 keys have 3072 bits)",
    )
    kek: bytes | None = setting(
        "AUTH_KEK",
        Kek(),
        default=None,
        secret=True,
        shown_default="`AUTH_DATA_DIR/kek` (embedded database only)",
        doc="""key-encryption key sealing private keys at rest (`openssl rand -base64 32`);
        required with `AUTH_DATABASE_URL`, the same on every replica. Only `serve` and
        `keys rotate` need it""",
    )
    access_ttl: int = setting(
        "AUTH_ACCESS_TTL",
        seconds(1, DAY),
        default=900,
        doc="access-token lifetime, seconds",
    )
    refresh_idle_ttl: int = setting(
        "AUTH_REFRESH_IDLE_TTL",
        seconds(1, YEAR),
        default=14 * DAY,
        doc="a refresh token unused this long expires, seconds",
    )
    refresh_absolute_ttl: int = setting(
        "AUTH_REFRESH_ABSOLUTE_TTL",
        seconds(1, YEAR),
        default=30 * DAY,
        doc="no session outlives this, however often it rotates, seconds",
    )
    refresh_reuse_grace: int = setting(
        "AUTH_REFRESH_REUSE_GRACE",
        seconds(1, 300, zero="off"),
        default=10,
        doc="seconds after a rotation in which the parent may be replayed for its same child",
    )
    leeway: int = setting(
        "AUTH_LEEWAY",
        seconds(1, MAX_LEEWAY, zero="none"),
        default=0,
        doc="""clock skew allowed on `exp`/`iat`/`nbf`, seconds (capped: see below the
        table)""",
    )
    clock_check_interval: float = setting(
        "AUTH_CLOCK_CHECK_INTERVAL",
        duration(0.05, HOUR),
        default=30.0,
        doc="seconds between readings of the database's clock, the time every decision uses",
    )
    clock_skew_warn: float = setting(
        "AUTH_CLOCK_SKEW_WARN",
        duration(0.001, 30),  # at most the default AUTH_CLOCK_SKEW_MAX, which it must not pass
        default=1.0,
        doc="log a warning while this host's clock is further than this from the database's",
    )
    clock_skew_max: float = setting(
        "AUTH_CLOCK_SKEW_MAX",
        duration(1, DAY, zero="never"),
        default=30.0,
        doc="""past this many seconds between this host's clock and the database's, `serve`
        refuses to start and a running replica reports NOT_SERVING (at least
        `AUTH_CLOCK_SKEW_WARN`)""",
    )
    workers: int = setting(
        "AUTH_WORKERS",
        WORKERS,
        default_factory=default_workers,
        shown_default=f"CPU count (at most {MAX_WORKERS})",
        doc="server processes for `serve` (also `serve --workers N`)",
    )
    max_concurrent_rpcs: int = setting(
        "AUTH_MAX_CONCURRENT_RPCS",
        count(1, 100_000),
        default=1000,
        doc="""unary calls in progress per process; more are refused with
        RESOURCE_EXHAUSTED / `TOO_MANY_CALLS` (streams do not count)""",
    )
    max_streams: int = setting(
        "AUTH_MAX_STREAMS",
        count(1, 100_000),
        default=1000,
        doc="""streams (health `Watch`, reflection, any streaming RPC) open per process;
        more are refused with RESOURCE_EXHAUSTED / `TOO_MANY_STREAMS`""",
    )
    max_streams_per_peer: int = setting(
        "AUTH_MAX_STREAMS_PER_PEER",
        count(1, 100_000),
        default=32,
        doc="""streams one client address (IPv6: one /64) may hold per process, over all
        its connections; raise it if many clients reach us through one proxy or NAT
        address""",
    )
    stream_max_age: float = setting(
        "AUTH_STREAM_MAX_AGE",
        duration(0.5, DAY),
        default=1800.0,
        doc="""seconds a stream may stay open; then it ends with UNAVAILABLE /
        `STREAM_MAX_AGE` and the client opens a new one""",
    )
    # At least 16 KiB: valid requests need it (tokens are capped at 8 KiB). At most
    # 16 MiB: far below gRPC's int32 limit (2 GiB), and no request comes near it.
    max_message_bytes: int = setting(
        "AUTH_MAX_MESSAGE_BYTES",
        count(16 * 1024, 16 * 1024 * 1024, unit="bytes"),
        default=64 * 1024,
        doc="largest request accepted; larger ones get RESOURCE_EXHAUSTED",
    )
    # At least 2: creating the first key holds one connection while it uses another.
    db_pool_size: int = setting(
        "AUTH_DB_POOL_SIZE",
        count(2, 200),
        default=10,
        doc="connections per server process",
    )
    db_timeout: float = setting(
        "AUTH_DB_TIMEOUT",
        duration(0.05, 600),
        default=5.0,
        doc="seconds the wait for a pooled connection may take, and each statement",
    )
    shutdown_grace: float = setting(
        "AUTH_SHUTDOWN_GRACE",
        duration(0.05, HOUR, zero="none"),
        default=5.0,
        doc="seconds in-flight calls get on SIGTERM (SIGINT, SIGQUIT)",
    )
    # Apart from AUTH_DB_TIMEOUT: a migration on a large table takes longer than any call.
    migration_timeout: float = setting(
        "AUTH_MIGRATION_TIMEOUT",
        duration(1, DAY, zero="no limit"),
        default=600.0,
        doc="""seconds migrating may take: the wait for another replica's migration lock
        (a line every 5 s names the session holding it), and each migration statement""",
    )
    token_cache_size: int = setting(
        "AUTH_TOKEN_CACHE_SIZE",
        count(1, 10_000_000, zero="off"),
        default=100_000,
        doc="verified access tokens remembered per process",
    )
    revocation_poll_interval: float = setting(
        "AUTH_REVOCATION_POLL_INTERVAL",
        duration(0.05, HOUR),
        default=5.0,
        doc="seconds between safety-net polls of revocations",
    )
    log_format: str = setting(
        "AUTH_LOG_FORMAT",
        Choice(("text", "json")),
        default="text",
        doc="`text` (readable) or `json` (one object per line: time, level, logger, message, pid)",
    )
    janitor_interval: float = setting(
        "AUTH_JANITOR_INTERVAL",
        duration(0.05, DAY),
        default=60.0,
        doc="seconds between clean-up passes (one replica at a time)",
    )
    event_retention: int = setting(
        "AUTH_EVENT_RETENTION",
        seconds(1, MAX_AGE),
        default=90 * DAY,
        doc="security events (and retired signing keys) are kept this long, seconds",
    )
    event_aggregation_window: int = setting(
        "AUTH_EVENT_AGGREGATION_WINDOW",
        seconds(1, DAY),
        default=300,
        doc="""repeats of an event a client can trigger at will (throttled or failed
        logins, token replays, refused admin calls) share one row (counted) and one log line
        per source and this many seconds
        ([below](#security-events-that-clients-can-repeat))""",
    )
    login_throttle: bool = setting(
        "AUTH_LOGIN_THROTTLE",
        Switch(),
        default=True,
        doc="throttle failed logins per username and per address",
    )
    throttle_user_failures: int = setting(
        "AUTH_THROTTLE_USER_FAILURES",
        count(0, 1_000_000),
        default=5,
        doc="failed logins a username gets free per window",
    )
    throttle_peer_failures: int = setting(
        "AUTH_THROTTLE_PEER_FAILURES",
        count(0, 1_000_000),
        default=20,
        doc="failed logins an address gets free per window",
    )
    throttle_max_delay: int = setting(
        "AUTH_THROTTLE_MAX_DELAY",
        seconds(1, DAY),
        default=900,
        doc="the longest wait a throttled key is given, seconds",
    )
    throttle_window: int = setting(
        "AUTH_THROTTLE_WINDOW",
        seconds(1, 30 * DAY),
        default=HOUR,
        doc="a key's failures are forgotten after this long without one, seconds",
    )
    metrics_listen: str | None = setting(
        "AUTH_METRICS_LISTEN",
        Address(),
        default=None,
        shown_default="unset (off)",
        doc="""`HOST:PORT` serving Prometheus `/metrics`; with `--workers`, the supervisor
        serves the sum of all workers""",
    )
    tls_cert: Path | None = setting(
        "AUTH_TLS_CERT",
        ReadableFile(),
        default=None,
        shown_default="unset (plaintext)",
        doc="""PEM certificate chain of the gRPC server (with `AUTH_TLS_KEY`): the port
        speaks TLS only""",
    )
    tls_key: Path | None = setting(
        "AUTH_TLS_KEY",
        ReadableFile(),
        default=None,
        doc="PEM private key of the gRPC server (with `AUTH_TLS_CERT`)",
    )
    tls_client_ca: Path | None = setting(
        "AUTH_TLS_CLIENT_CA",
        ReadableFile(),
        default=None,
        doc="""PEM CA bundle: mutual TLS, only clients with a certificate it signed can
        connect (needs `AUTH_TLS_CERT`)""",
    )
    service_tokens_file: Path | None = setting(
        "AUTH_SERVICE_TOKENS_FILE",
        ReadableFile(),
        default=None,
        doc="""the known calling services and their credentials
        ([below](#tls-and-the-services-that-call-authsvc)); needed by `AUTH_CALLER_AUTH`""",
    )
    caller_auth: frozenset[str] = setting(
        "AUTH_CALLER_AUTH",
        CommaSet(Choice(CALL_GROUPS), max_items=len(CALL_GROUPS)),
        default=frozenset(),
        shown_default="empty (off)",
        doc="""call groups only known services may make: `validate`, `admin`; must include
        `admin` unless `AUTH_LISTEN` is a loopback address""",
    )
    key_rotation_period: int = setting(
        "AUTH_KEY_ROTATION_PERIOD",
        seconds(MINUTE, YEAR, zero="manual"),
        default=0,
        doc="""rotate the signing key when the newest is this many seconds old (checked each
        janitor pass)""",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, declaration in declarations():
            raw = env.get(declaration.variable)
            if raw is None or not raw.strip():
                continue  # `AUTH_X=` (as in a compose file) keeps the default
            try:
                values[name] = declaration.parser.parse(raw.strip())
            except ValueError:
                raise _refused(declaration) from None
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Every value within its bounds and the settings fitting together: run by
        `from_env`, and by the server at start for settings built in code."""
        for name, declaration in declarations():
            value = getattr(self, name)
            if value is None:
                continue
            try:
                declaration.parser.validate(value)
            except ValueError:
                raise _refused(declaration) from None
        if 0 < self.clock_skew_max < self.clock_skew_warn:
            raise SettingsError("AUTH_CLOCK_SKEW_MAX: at least AUTH_CLOCK_SKEW_WARN (or 0: never)")
        self.check_transport()

    def check_transport(self) -> None:
        """The TLS and caller settings fit together (also run by the server at start)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingsError("AUTH_TLS_KEY: AUTH_TLS_CERT and AUTH_TLS_KEY go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SettingsError("AUTH_TLS_CLIENT_CA: needs AUTH_TLS_CERT and AUTH_TLS_KEY")
        if self.caller_auth and self.service_tokens_file is None:
            # Client certificates identify services only through their cert: lines there.
            raise SettingsError(
                "AUTH_CALLER_AUTH: needs AUTH_SERVICE_TOKENS_FILE (it lists the calling "
                "services, by token or by certificate name)"
            )
        if "admin" not in self.caller_auth and not HostPort.parse(self.listen).is_loopback:
            raise SettingsError(
                "AUTH_CALLER_AUTH: must include admin when AUTH_LISTEN is not a loopback "
                "address (the admin API would be open to the network)"
            )


def bounded_argument(parser: Parser[T]) -> Callable[[str], T]:
    """An argparse `type` from a parser: the same bounds, and a one-line refusal that does
    not echo the value (`authsvc serve --workers`, the load-testing options)."""

    def parse(text: str) -> T:
        try:
            return parser.parse(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {parser.allowed}") from None

    return parse


def _refused(declaration: Declaration[Any]) -> SettingsError:
    # Only the declaration's words: the value may be a secret, huge, or hold control bytes.
    return SettingsError(f"{declaration.variable}: must be {declaration.parser.allowed}")


def declarations() -> Iterator[tuple[str, Declaration[Any]]]:
    """(field name, declaration) of every setting, in declaration order."""
    for f in dataclasses.fields(Settings):
        declaration = f.metadata.get(_DECLARATION)
        if declaration is not None:
            yield f.name, declaration


def declaration_of(variable: str) -> Declaration[Any]:
    """The declaration of `variable` (KeyError if none)."""
    for _, declaration in declarations():
        if declaration.variable == variable:
            return declaration
    raise KeyError(variable)


def configuration_table() -> str:
    """The README's configuration table, from the declarations."""
    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    defaults = {f.name: f for f in dataclasses.fields(Settings)}
    for name, declaration in declarations():
        spec = defaults[name]
        if declaration.shown_default is not None:
            shown = declaration.shown_default
        elif spec.default is None:
            shown = "unset"
        else:
            shown = declaration.parser.show(spec.default)
        cells = (f"`{declaration.variable}`", shown, declaration.parser.allowed, declaration.doc)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"


def with_table(readme: str) -> str:
    """`readme` with the text between the table markers replaced by the current table."""
    start = readme.index(README_TABLE_START) + len(README_TABLE_START)
    end = readme.index(README_TABLE_END, start)
    return readme[:start] + "\n" + configuration_table() + readme[end:]


def parse_kek(raw: str) -> bytes:
    """Decode a base64 key-encryption key; it must be exactly 32 bytes."""
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        try:
            key = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            raise ValueError("must be base64 of 32 random bytes") from None
    if len(key) != 32:
        raise ValueError("must be base64 of exactly 32 bytes")
    return key


def main(argv: list[str]) -> int:
    """`--table`: print the configuration table; `--write-readme PATH`: rewrite PATH's
    table between the markers; `--check-readme PATH`: exit 1 if it differs."""
    if argv == ["--table"]:
        sys.stdout.write(configuration_table())
        return 0
    if len(argv) == 2 and argv[0] in ("--write-readme", "--check-readme"):
        path = Path(argv[1])
        current = path.read_text(encoding="utf-8")
        wanted = with_table(current)
        if argv[0] == "--check-readme":
            if wanted != current:
                sys.stderr.write(f"{path}: the configuration table is out of date\n")
                return 1
            return 0
        path.write_text(wanted, encoding="utf-8")
        return 0
    sys.stderr.write("usage: python -m service.settings --table | --write-readme PATH\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
