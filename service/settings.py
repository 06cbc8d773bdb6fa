"""Configuration: one frozen dataclass, built from `AUTH_*` environment variables.

Each setting is declared once, as a field of `Settings`:

    access_ttl: int = setting(
        "AUTH_ACCESS_TTL", seconds(1, DAY), default=900, doc="access-token lifetime"
    )

naming its variable, its parser (which carries the bounds), its default and its doc.
`Settings.from_env` reads every declared variable, `Settings.check` validates a built
value (also run by the server at start, so settings made in code are held to the same
bounds), and `service.settings_table` renders the configuration table of
docs/operations.md from the declarations (`make docs` rewrites it; a test compares). The
parsers are in `service.setting_parsers`, `setting()` in `service.setting_declarations`.

Parsing is strict, one spelling per kind: whole numbers are digits with no leading
zero (but 0 itself); durations and other fractional numbers plain decimals (0.5; no sign,
exponent, bare point or leading zero); switches exactly
`on` or `off`; lists items separated by bare commas (no blanks, no empty or repeated
item); no white space around any value (an empty value keeps the default). A bad
value raises `SettingsError` whose message is one line naming
the variable and what it may be, and start-up stops there. The value itself is never
echoed: AUTH_KEK and AUTH_DATABASE_URL hold secrets, and any value may be huge or hold
control characters. Every number has a lower and an upper bound, chosen so that a value
inside them cannot break anything later (an overflowing date, gRPC's int32 limits, a
busy loop, thousands of processes or connections).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authsvc_client.addresses import HostPort
from authsvc_client.token_check import MAX_LEEWAY_SECONDS

from service.setting_declarations import Declaration, declared_fields, setting
from service.setting_parsers import (
    DAY,
    HOUR,
    MINUTE,
    YEAR,
    Address,
    AudienceName,
    Choice,
    CommaSet,
    DatabaseUrl,
    Directory,
    Kek,
    ReadableFile,
    Refusal,
    Switch,
    Text,
    count,
    duration,
    seconds,
)

SIGNING_ALGORITHMS = ("EdDSA", "ES256", "RS256")
CALL_GROUPS = ("validate", "admin")

MAX_LEEWAY = MAX_LEEWAY_SECONDS
"""The largest `AUTH_LEEWAY` accepted, seconds. Revocations are remembered for this much
past the last access token's `exp`, whatever the leeway is now, so that raising the leeway
later (up to here) can never bring a forgotten revocation's token back."""

# An audience (`AUTH_AUDIENCE`, each of `AUTH_AUDIENCES`, Issue's field) is held to one
# rule, service.domain.audiences; its longest (MAX_AUDIENCE_BYTES) is the client package's.
MAX_AGE = 10 * YEAR
"""No duration goes beyond this: now ± any setting stays far inside datetime's years
1..9999, so no date arithmetic can overflow (a clean-up cut-off, a throttle window)."""

MAX_WORKERS = 64


MAX_SESSIONS_PER_USER = 10_000
"""The largest `AUTH_MAX_SESSIONS_PER_USER` accepted: a login reads that many index entries
of the user's sessions to find the oldest beyond it."""


class SettingsError(ValueError):
    """A configuration variable has a value we cannot use."""


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
        doc="""PostgreSQL DSN (several hosts with `target_session_attrs=read-write` follow a
        failover: [failover](failover.md)); unset runs an embedded PostgreSQL in
        `AUTH_DATA_DIR`""",
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
        AudienceName(note="AUTH_AUDIENCE names one audience, further ones go in AUTH_AUDIENCES"),
        default="authsvc",
        doc="the `aud` claim when Issue names none",
    )
    audiences: frozenset[str] = setting(
        "AUTH_AUDIENCES",
        CommaSet(AudienceName(), max_items=64),
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
    worker_max_memory: int = setting(
        "AUTH_WORKER_MAX_MEMORY",
        # A fresh worker holds ~70 MiB, one with 100k revocations ~220 (performance.md):
        # a lower ceiling would replace workers as soon as they serve.
        count(256, 1_048_576, zero="never", unit="MiB"),
        default=1024,
        doc="""MiB of resident memory past which `serve`'s supervisor replaces a worker (one
        or several): a new one starts beside it, then it is told to stop (SIGTERM: it drains
        its calls); killed past 1.5 times this. A bound on what a leak below our code costs
        (gRPC's, docs/security.md)""",
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
    watch_heartbeat: float = setting(
        "AUTH_WATCH_HEARTBEAT",
        duration(0.05, 60),
        default=1.0,
        doc="""seconds between WatchRevocations heartbeats at most (an update with `sent_at`
        only, when nothing else was sent): how soon a verifier learns the stream still
        flows""",
    )
    watch_queue_bytes: int = setting(
        "AUTH_WATCH_QUEUE_BYTES",
        count(1024, 1024 * 1024 * 1024, unit="bytes"),
        default=16 * 1024 * 1024,
        doc="""revocation updates one WatchRevocations stream may have waiting to be sent
        (the watcher does not read fast enough); past it the stream ends with
        RESOURCE_EXHAUSTED / `WATCHER_TOO_SLOW`. Updates are shared by all streams, so
        this also bounds the memory of all slow watchers together""",
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
    max_sessions_per_user: int = setting(
        "AUTH_MAX_SESSIONS_PER_USER",
        count(1, 10_000),
        default=100,
        doc="""sessions one user may hold; a login beyond it revokes the user's oldest, so one
        account cannot grow without end""",
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
        doc="""`HOST:PORT` serving Prometheus `/metrics` (`[::]` takes IPv4 too, as
        `AUTH_LISTEN` does), not `AUTH_LISTEN`'s address; with `--workers`, the supervisor
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
            if not raw:
                continue  # `AUTH_X=` (as in a compose file) keeps the default
            if raw != raw.strip():
                # Not stripped: a stray blank (a quoted `" 5"`) is a mistake to be told of.
                raise SettingsError(
                    f"{declaration.variable}: must be {declaration.parser.allowed}, "
                    "with no white space around it"
                )
            try:
                values[name] = declaration.parser.parse(raw)
            except ValueError as error:
                raise _refused(declaration, error) from None
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
            except ValueError as error:
                raise _refused(declaration, error) from None
        if 0 < self.clock_skew_max < self.clock_skew_warn:
            raise SettingsError("AUTH_CLOCK_SKEW_MAX: at least AUTH_CLOCK_SKEW_WARN (or 0: never)")
        if self.metrics_listen is not None and _overlap(self.listen, self.metrics_listen):
            # Else the second bind fails as "in use by another process": it is in use by us.
            raise SettingsError(
                "AUTH_METRICS_LISTEN: must not be AUTH_LISTEN's address (the same port on "
                "the same or a wildcard host): give the metrics another port"
            )
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


def _overlap(first: str, second: str) -> bool:
    """Whether two listen addresses would bind the same socket address: the same port (not
    0, any free one) on the same host or with a wildcard host (`[::]` takes IPv4 too)."""
    one, other = HostPort.parse(first), HostPort.parse(second)
    if one.port == 0 or one.port != other.port:
        return False
    a, b = one.ip, other.ip
    if a is None or b is None:
        return one.host.lower().removesuffix(".") == other.host.lower().removesuffix(".")
    if a == b:
        return True
    if any(host.is_unspecified and host.version == 6 for host in (a, b)):
        return True
    return any(host.is_unspecified for host in (a, b)) and a.version == b.version


def _refused(declaration: Declaration[Any], error: ValueError) -> SettingsError:
    # Only the parser's words: the value may be a secret, huge, or hold control bytes.
    if isinstance(error, Refusal):
        return SettingsError(f"{declaration.variable}: {error}")
    return SettingsError(f"{declaration.variable}: must be {declaration.parser.allowed}")


def declarations() -> Iterator[tuple[str, Declaration[Any]]]:
    """(field name, declaration) of every setting, in declaration order."""
    return declared_fields(Settings)


def declaration_of(variable: str) -> Declaration[Any]:
    """The declaration of `variable` (KeyError if none)."""
    for _, declaration in declarations():
        if declaration.variable == variable:
            return declaration
    raise KeyError(variable)


OTHER_AUTH_VARIABLES = frozenset(
    {"AUTH_TARGET", "AUTH_USERNAME", "AUTH_PASSWORD", "AUTH_DEADLINE_MS"}
)
"""AUTH_* variables that are not settings but are read by other tools beside the server,
so their presence is no mistake: AUTH_TARGET by `authsvc load` and `make load`, the rest by
the Node example (examples/node)."""

MAX_REPORTED_UNKNOWN = 20
"""Unknown AUTH_* variables named one line each; past this, one line counts the rest."""


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """(name, closest declared variable or None) of every variable of `environ` that looks
    like a setting (AUTH_ in any case) but that no setting declares, in name order: a
    misspelling is otherwise ignored without a word. Names only: values may be secrets."""
    declared = [declaration.variable for _, declaration in declarations()]
    known = set(declared) | OTHER_AUTH_VARIABLES
    # Compared without the shared prefix (which would make every name look close), and
    # at most 64 characters of it (the comparison's cost grows with the product).
    suffixes = {variable.removeprefix("AUTH_"): variable for variable in declared}
    found: list[tuple[str, str | None]] = []
    for name in sorted(environ):
        if name in known or not name.upper().startswith("AUTH_"):
            continue
        close = difflib.get_close_matches(name.upper()[5:69], list(suffixes), n=1, cutoff=0.75)
        found.append((name, suffixes[close[0]] if close else None))
    return found
