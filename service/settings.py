"""Configuration: one frozen dataclass, built from `AUTH_*` environment variables.

Parsing is strict: a bad value raises `SettingsError` whose message is one line
naming the variable, and start-up stops there.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

SIGNING_ALGORITHMS = ("EdDSA", "ES256", "RS256")

T = TypeVar("T")

_TEN_YEARS = 315_360_000

MAX_LEEWAY = 300
"""The largest `AUTH_LEEWAY` accepted, seconds. Revocations are remembered for this much
past the last access token's `exp`, whatever the leeway is now, so that raising the leeway
later (up to here) can never bring a forgotten revocation's token back."""


MAX_SESSIONS_PER_USER = 10_000
"""The largest `AUTH_MAX_SESSIONS_PER_USER` accepted: a login reads that many index entries
of the user's sessions to find the oldest beyond it."""


class SettingsError(ValueError):
    """A configuration variable has a value we cannot use."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the service reads from its environment."""

    listen: str = "127.0.0.1:50051"
    """Address the gRPC server binds (`AUTH_LISTEN`); port 0 picks a free one."""

    database_url: str | None = None
    """PostgreSQL DSN (`AUTH_DATABASE_URL`); unset runs an embedded PostgreSQL."""

    data_dir: Path = Path(".authsvc")
    """Where the embedded PostgreSQL and the generated KEK live (`AUTH_DATA_DIR`)."""

    issuer: str = "authsvc"
    """The `iss` claim of every access token (`AUTH_ISSUER`)."""

    audience: str = "authsvc"
    """The default `aud` claim when Issue names none (`AUTH_AUDIENCE`)."""

    signing_alg: str = "ES256"
    """JWS algorithm for new signing keys (`AUTH_SIGNING_ALG`): ES256, EdDSA or RS256.

    ES256 by measurement: the fastest verification after RS256 (whose 3072-bit signing
    costs milliseconds per token) and the most widely supported by JOSE libraries."""

    kek: bytes | None = field(default=None, repr=False)
    """Key-encryption key for private keys at rest (`AUTH_KEK`, base64 of 32 bytes)."""

    access_ttl: int = 900
    """Access-token lifetime in seconds (`AUTH_ACCESS_TTL`)."""

    refresh_idle_ttl: int = 1_209_600
    """A refresh token unused this long expires (`AUTH_REFRESH_IDLE_TTL`)."""

    refresh_absolute_ttl: int = 2_592_000
    """No session outlives this, however often it rotates (`AUTH_REFRESH_ABSOLUTE_TTL`)."""

    refresh_reuse_grace: int = 10
    """Seconds after a rotation in which the parent may be presented again (0: off)."""

    leeway: int = 0
    """Clock skew in seconds allowed on exp/nbf/iat checks (`AUTH_LEEWAY`; at most
    `MAX_LEEWAY`)."""

    db_pool_size: int = 10
    """Maximum connections per server process (`AUTH_DB_POOL_SIZE`)."""

    db_timeout: float = 5.0
    """Seconds a database call may take, pool wait included (`AUTH_DB_TIMEOUT`)."""

    migration_timeout: float = 600.0
    """Seconds migrating may take (`AUTH_MIGRATION_TIMEOUT`; 0: no limit): the wait for the
    migration lock another replica holds, and each migration statement. Apart from
    AUTH_DB_TIMEOUT, because a migration on a large table takes longer than any call."""

    shutdown_grace: float = 5.0
    """Seconds in-flight calls get to finish on SIGTERM (`AUTH_SHUTDOWN_GRACE`)."""

    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Server processes for `serve` (`AUTH_WORKERS`; default: the number of CPUs)."""

    max_message_bytes: int = 64 * 1024
    """Largest request accepted, bytes (`AUTH_MAX_MESSAGE_BYTES`): above any valid request
    (tokens are capped at 8 KiB), small enough that huge messages cannot exhaust memory."""

    max_concurrent_rpcs: int = 1000
    """Unary calls one process serves at once; more are refused with RESOURCE_EXHAUSTED
    (`AUTH_MAX_CONCURRENT_RPCS`). Streams do not count: they have their own budget."""

    max_streams: int = 1000
    """Streams (health Watch, reflection, any streaming RPC) one process holds open at once;
    more are refused with RESOURCE_EXHAUSTED (`AUTH_MAX_STREAMS`)."""

    max_streams_per_peer: int = 32
    """Streams one client address (IPv6: one /64) may hold open in one process, over all its
    connections (`AUTH_MAX_STREAMS_PER_PEER`)."""

    stream_max_age: float = 1800.0
    """Seconds a stream may stay open; then it ends with UNAVAILABLE so its slot comes back
    and the client opens a new one (`AUTH_STREAM_MAX_AGE`)."""

    token_cache_size: int = 100_000
    """Verified access tokens remembered per process (`AUTH_TOKEN_CACHE_SIZE`; 0: off)."""

    login_throttle: bool = True
    """Throttle failed logins per username and per address (`AUTH_LOGIN_THROTTLE`: on/off)."""

    throttle_user_failures: int = 5
    """Failed logins a username gets free within the window (`AUTH_THROTTLE_USER_FAILURES`)."""

    throttle_peer_failures: int = 20
    """Failed logins an address gets free within the window (`AUTH_THROTTLE_PEER_FAILURES`)."""

    throttle_max_delay: int = 900
    """The longest wait a throttled key is given, seconds (`AUTH_THROTTLE_MAX_DELAY`)."""

    throttle_window: int = 3600
    """A key's failures are forgotten after this long without one (`AUTH_THROTTLE_WINDOW`)."""

    log_format: str = "text"
    """`text` (readable) or `json` (one object per line) (`AUTH_LOG_FORMAT`)."""

    janitor_interval: float = 60.0
    """Seconds between clean-up runs (`AUTH_JANITOR_INTERVAL`); one replica at a time runs it."""

    event_retention: int = 7_776_000
    """Security events are kept this long, seconds (`AUTH_EVENT_RETENTION`; default 90 days)."""

    event_aggregation_window: int = 300
    """Repeats of an event a client can trigger cheaply (throttled or failed logins, token
    replays, refused admin calls) from one source share one stored row (with a count) and
    at most one log line per this many seconds (`AUTH_EVENT_AGGREGATION_WINDOW`)."""

    max_sessions_per_user: int = 100
    """Sessions one user may hold (`AUTH_MAX_SESSIONS_PER_USER`, 1 to 10000): a login beyond
    it revokes the user's oldest session(s), so one account cannot grow without end."""

    revocation_poll_interval: float = 5.0
    """Seconds between safety-net polls of revoked sessions (`AUTH_REVOCATION_POLL_INTERVAL`)."""

    key_rotation_period: int = 0
    """Rotate the signing key when the newest is this many seconds old
    (`AUTH_KEY_ROTATION_PERIOD`; 0: only by hand). Checked on each janitor run."""

    metrics_listen: str | None = None
    """Serve Prometheus metrics on http://HOST:PORT/metrics (`AUTH_METRICS_LISTEN`; unset: off)."""

    tls_cert: Path | None = None
    """PEM certificate chain of the gRPC server (`AUTH_TLS_CERT`; with `AUTH_TLS_KEY`)."""

    tls_key: Path | None = None
    """PEM private key of the gRPC server (`AUTH_TLS_KEY`)."""

    tls_client_ca: Path | None = None
    """PEM CA bundle: only clients with a certificate it signed may connect
    (`AUTH_TLS_CLIENT_CA`: mutual TLS; needs AUTH_TLS_CERT)."""

    service_tokens_file: Path | None = None
    """The calling services and their credentials (`AUTH_SERVICE_TOKENS_FILE`; see README)."""

    caller_auth: frozenset[str] = frozenset()
    """Call groups that only known services may make (`AUTH_CALLER_AUTH`, comma-separated:
    `validate`, `admin`; empty: off, allowed only on a loopback address)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `environ` (default: the process environment)."""
        env = os.environ if environ is None else environ
        reader = _EnvReader(env)
        settings = cls(
            listen=reader.get("AUTH_LISTEN", _address, cls.listen),
            database_url=reader.get("AUTH_DATABASE_URL", _nonempty, None),
            data_dir=reader.get("AUTH_DATA_DIR", lambda s: Path(_nonempty(s)), cls.data_dir),
            issuer=reader.get("AUTH_ISSUER", _nonempty, cls.issuer),
            audience=reader.get("AUTH_AUDIENCE", _nonempty, cls.audience),
            signing_alg=reader.get("AUTH_SIGNING_ALG", _algorithm, cls.signing_alg),
            kek=reader.get("AUTH_KEK", parse_kek, None),
            access_ttl=reader.get("AUTH_ACCESS_TTL", _positive_int, cls.access_ttl),
            refresh_idle_ttl=reader.get(
                "AUTH_REFRESH_IDLE_TTL", _positive_int, cls.refresh_idle_ttl
            ),
            refresh_absolute_ttl=reader.get(
                "AUTH_REFRESH_ABSOLUTE_TTL", _positive_int, cls.refresh_absolute_ttl
            ),
            refresh_reuse_grace=reader.get(
                "AUTH_REFRESH_REUSE_GRACE", _non_negative_int, cls.refresh_reuse_grace
            ),
            leeway=reader.get("AUTH_LEEWAY", _non_negative_int, cls.leeway),
            db_pool_size=reader.get("AUTH_DB_POOL_SIZE", _positive_int, cls.db_pool_size),
            db_timeout=reader.get("AUTH_DB_TIMEOUT", _positive_float, cls.db_timeout),
            migration_timeout=reader.get(
                "AUTH_MIGRATION_TIMEOUT", _non_negative_float, cls.migration_timeout
            ),
            shutdown_grace=reader.get(
                "AUTH_SHUTDOWN_GRACE", _non_negative_float, cls.shutdown_grace
            ),
            workers=reader.get("AUTH_WORKERS", _positive_int, os.cpu_count() or 1),
            max_message_bytes=reader.get(
                "AUTH_MAX_MESSAGE_BYTES", _positive_int, cls.max_message_bytes
            ),
            max_concurrent_rpcs=reader.get(
                "AUTH_MAX_CONCURRENT_RPCS", _positive_int, cls.max_concurrent_rpcs
            ),
            max_streams=reader.get("AUTH_MAX_STREAMS", _positive_int, cls.max_streams),
            max_streams_per_peer=reader.get(
                "AUTH_MAX_STREAMS_PER_PEER", _positive_int, cls.max_streams_per_peer
            ),
            stream_max_age=reader.get("AUTH_STREAM_MAX_AGE", _positive_float, cls.stream_max_age),
            token_cache_size=reader.get(
                "AUTH_TOKEN_CACHE_SIZE", _non_negative_int, cls.token_cache_size
            ),
            login_throttle=reader.get("AUTH_LOGIN_THROTTLE", _switch, cls.login_throttle),
            throttle_user_failures=reader.get(
                "AUTH_THROTTLE_USER_FAILURES", _non_negative_int, cls.throttle_user_failures
            ),
            throttle_peer_failures=reader.get(
                "AUTH_THROTTLE_PEER_FAILURES", _non_negative_int, cls.throttle_peer_failures
            ),
            throttle_max_delay=reader.get(
                "AUTH_THROTTLE_MAX_DELAY", _positive_int, cls.throttle_max_delay
            ),
            throttle_window=reader.get("AUTH_THROTTLE_WINDOW", _positive_int, cls.throttle_window),
            log_format=reader.get("AUTH_LOG_FORMAT", _log_format, cls.log_format),
            janitor_interval=reader.get(
                "AUTH_JANITOR_INTERVAL", _positive_float, cls.janitor_interval
            ),
            event_retention=reader.get("AUTH_EVENT_RETENTION", _positive_int, cls.event_retention),
            event_aggregation_window=reader.get(
                "AUTH_EVENT_AGGREGATION_WINDOW", _positive_int, cls.event_aggregation_window
            ),
            max_sessions_per_user=reader.get(
                "AUTH_MAX_SESSIONS_PER_USER", _positive_int, cls.max_sessions_per_user
            ),
            revocation_poll_interval=reader.get(
                "AUTH_REVOCATION_POLL_INTERVAL", _positive_float, cls.revocation_poll_interval
            ),
            key_rotation_period=reader.get(
                "AUTH_KEY_ROTATION_PERIOD", _non_negative_int, cls.key_rotation_period
            ),
            metrics_listen=reader.get("AUTH_METRICS_LISTEN", _address, None),
            tls_cert=reader.get("AUTH_TLS_CERT", _readable_file, None),
            tls_key=reader.get("AUTH_TLS_KEY", _readable_file, None),
            tls_client_ca=reader.get("AUTH_TLS_CLIENT_CA", _readable_file, None),
            service_tokens_file=reader.get("AUTH_SERVICE_TOKENS_FILE", _readable_file, None),
            caller_auth=reader.get("AUTH_CALLER_AUTH", _call_groups, cls.caller_auth),
        )
        if settings.refresh_reuse_grace > 300:
            raise SettingsError("AUTH_REFRESH_REUSE_GRACE: at most 300 seconds")
        if settings.leeway > MAX_LEEWAY:
            raise SettingsError(f"AUTH_LEEWAY: at most {MAX_LEEWAY} seconds")
        if settings.max_sessions_per_user > MAX_SESSIONS_PER_USER:
            raise SettingsError(f"AUTH_MAX_SESSIONS_PER_USER: at most {MAX_SESSIONS_PER_USER}")
        if settings.event_aggregation_window > 86_400:
            raise SettingsError("AUTH_EVENT_AGGREGATION_WINDOW: at most 86400 seconds (a day)")
        for name, value in (
            ("AUTH_ACCESS_TTL", settings.access_ttl),
            ("AUTH_REFRESH_IDLE_TTL", settings.refresh_idle_ttl),
            ("AUTH_REFRESH_ABSOLUTE_TTL", settings.refresh_absolute_ttl),
        ):
            if value > _TEN_YEARS:
                raise SettingsError(f"{name}: at most {_TEN_YEARS} seconds (ten years)")
        if settings.max_message_bytes < 16 * 1024:
            raise SettingsError("AUTH_MAX_MESSAGE_BYTES: at least 16384 (valid requests need it)")
        if settings.db_pool_size < 2:
            # Creating the first key holds one connection while it uses another.
            raise SettingsError("AUTH_DB_POOL_SIZE: at least 2")
        settings.check_transport()
        return settings

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
        if "admin" not in self.caller_auth and not is_loopback(self.listen):
            raise SettingsError(
                "AUTH_CALLER_AUTH: must include admin when AUTH_LISTEN is not a loopback "
                "address (the admin API would be open to the network)"
            )


class _EnvReader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return parse(raw.strip())
        except ValueError as exc:
            # The value itself is not echoed: AUTH_KEK and AUTH_DATABASE_URL hold secrets.
            raise SettingsError(f"{name}: {exc}") from None


def _nonempty(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty")
    return raw


def _positive_int(raw: str) -> int:
    value = _non_negative_int(raw)
    if value == 0:
        raise ValueError("must be a positive whole number")
    return value


def _non_negative_int(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 12:
        raise ValueError("must be a whole number of seconds (0 or more)")
    return int(raw)


def _non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not (value >= 0 and value < 1e9):
        raise ValueError("must be a number of seconds (0 or more)")
    return value


def _positive_float(raw: str) -> float:
    value = _non_negative_float(raw)
    if value == 0:
        raise ValueError("must be more than 0 seconds")
    return value


def _log_format(raw: str) -> str:
    if raw not in ("text", "json"):
        raise ValueError("must be text or json")
    return raw


def _switch(raw: str) -> bool:
    value = raw.lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ValueError("must be on or off")


def _algorithm(raw: str) -> str:
    if raw not in SIGNING_ALGORITHMS:
        raise ValueError(f"must be one of {', '.join(SIGNING_ALGORITHMS)}")
    return raw


def _address(raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT, for example 127.0.0.1:50051")
    return raw


CALL_GROUPS = ("validate", "admin")


def _call_groups(raw: str) -> frozenset[str]:
    groups = frozenset(g.strip() for g in raw.split(",") if g.strip())
    unknown = groups - set(CALL_GROUPS)
    if unknown:
        raise ValueError(f"unknown group(s) {', '.join(sorted(unknown))}; known: validate, admin")
    return groups


def _readable_file(raw: str) -> Path:
    path = Path(raw)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError("must name a readable file")
    return path


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT binds only the loopback interface."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
