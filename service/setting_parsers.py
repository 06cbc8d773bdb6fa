"""Parsers of configuration text: each turns a variable's text into a typed value within
bounds, or refuses it with a message that says what the variable may be and never echoes
the value. `service.settings` declares every setting with one of them; `bounded_argument`
holds command-line options to the same bounds.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from authsvc_client import addresses
from authsvc_client.addresses import AddressRefusal, HostPort, is_port
from authsvc_client.token_check import MAX_AUDIENCE_BYTES

from service.domain.audiences import COMMA_LOOK_ALIKES, audience_problem, code_point
from service.secrets_box import one_repeated_byte

T = TypeVar("T")
N = TypeVar("N", int, float)
V = TypeVar("V")
R = TypeVar("R")

MINUTE = 60
HOUR = 3600
DAY = 86_400
YEAR = 365 * DAY

# A parser's `allowed` says what it accepts; it is the whole of the error message, so no
# error can echo the value. `validate` checks a typed value (a Settings built in code).


class Refusal(ValueError):
    """A refusal that says why the value is refused rather than what the variable may be
    (`allowed`): "holds U+FF0C (FULLWIDTH COMMA), ...". Its words are the parser's own and
    name at most a code point, never the value (a secret, huge, or with control bytes)."""


class Parser(Generic[T]):
    """Turns a variable's text into a value, or refuses it."""

    @property
    def allowed(self) -> str:
        """What the variable may be, e.g. "a whole number of seconds from 1 to 86400"; the
        whole of the error message, so no error can echo the value."""
        raise NotImplementedError

    def parse(self, raw: str) -> T:
        """The value of `raw` (not empty, no white space around it); ValueError if refused."""
        raise NotImplementedError

    def validate(self, value: T) -> None:
        """ValueError unless `value` is one `parse` could have produced."""

    def show(self, value: T) -> str:
        """`value` as the configuration table's default column shows it."""
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

    # One spelling per kind: digits (no sign, no blanks, no leading zero but in 0 itself:
    # 0900 reads as octal to some tools and people); a decimal is such digits with at most
    # one point between digits (0.5, not .5, 5., 00.5 or 5e-1), as the table's column says.
    _WHOLE = re.compile(r"0|[1-9][0-9]{0,18}")
    _DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,18})(?:\.[0-9]{1,12})?")

    def __post_init__(self) -> None:
        assert 0 < self.low <= self.high or (self.low == 0 and self.zero is None)

    @property
    def allowed(self) -> str:
        what = (
            "a whole number"
            if self.kind is int
            else "a plain decimal number (at most 12 digits after the point)"
        )
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
    """Exactly `on` or `off` (lower case): what the configuration table shows."""

    @property
    def allowed(self) -> str:
        return "on or off"

    def parse(self, raw: str) -> bool:
        if raw == "on":
            return True
        if raw == "off":
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
class AudienceName(Parser[str]):
    """An audience (`service.domain.audiences`: the rule Issue holds a client's to);
    `note` is added to a refusal for a comma (AUTH_AUDIENCE: the list is elsewhere)."""

    note: str = ""

    @property
    def allowed(self) -> str:
        return (
            f"an audience: 1 to {MAX_AUDIENCE_BYTES} bytes of NFC text with no comma (or "
            "look-alike), space or invisible character; a URI if it holds ':'"
        )

    def parse(self, raw: str) -> str:
        self.validate(raw)
        return raw

    def validate(self, value: str) -> None:
        if not isinstance(value, str):
            raise ValueError(self.allowed)
        problem = audience_problem(value)
        if problem is None:
            return
        if self.note and "comma" in problem:
            problem += f"; {self.note}"
        raise Refusal(problem)


@dataclass(frozen=True)
class DatabaseUrl(Text):
    """A postgresql:// (or postgres://) URL, the only DSN form asyncpg takes."""

    max_bytes: int = 4096

    @property
    def allowed(self) -> str:
        return (
            f"a postgresql:// URL of at most {self.max_bytes} bytes, each host's port "
            "from 1 to 65535, an IPv6 host in brackets without a zone id, no empty host "
            "in a list or before a port"
        )

    def validate(self, value: str) -> None:
        super().validate(value)
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError(self.allowed)
        # Each host the way asyncpg reads it (connect_utils._parse_hostlist): it fails on
        # these only when connecting, with an error that is no setting's. user:password@
        # comes before the hosts.
        hosts = value.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
        if hosts:
            for host in hosts.split(","):
                if not _is_database_host(host, percent_encoded=True):
                    raise ValueError(self.allowed)
                port = host.rpartition("]")[2] if host.startswith("[") else host
                if ":" in port:
                    digits = port.rpartition(":")[2]
                    if digits and not (is_port(digits) and int(digits) > 0):
                        raise ValueError(self.allowed)
            return
        # No host before the path: asyncpg takes the (last) `host=` parameter's list.
        query = urllib.parse.urlsplit(value).query
        given = urllib.parse.parse_qs(query, keep_blank_values=True).get("host")
        if given and given[-1]:
            for host in given[-1].split(","):
                if not _is_database_host(host, percent_encoded=False):
                    raise ValueError(self.allowed)


def _is_database_host(host: str, *, percent_encoded: bool) -> bool:
    """One entry of a database URL's host list that asyncpg can connect to: not empty, a
    socket directory, an IPv6 address in brackets (`::1:5432` fails; a zone id `%eth0`
    fails to resolve), or a name or IPv4 address with an optional port."""
    if not host:
        return False  # IndexError in asyncpg
    if host.startswith("/"):
        return True
    if host.startswith("["):
        inside = re.match(r"\[([^\]]+)\]", host)
        if inside is None:
            return False
        address = inside.group(1)
    else:
        address, _, port = host.partition(":")
        if not address or ":" in port:
            return False
    if percent_encoded:
        address = urllib.parse.unquote(address)
    return "%" not in address


@dataclass(frozen=True)
class Address(Parser[str]):
    """HOST:PORT (an IPv6 host in brackets), port 0 to 65535: `authsvc_client.addresses`,
    the rule the client package holds addresses to. `to_call`: an address to call, where
    port 0 (any free one, when listening) reaches nothing."""

    to_call: bool = False

    @property
    def allowed(self) -> str:
        if self.to_call:
            return f"{addresses.ALLOWED}; port 0 is no address to call"
        return addresses.ALLOWED

    def parse(self, raw: str) -> str:
        self.validate(raw)
        return raw

    def validate(self, value: str) -> None:
        try:
            address = HostPort.parse(value)
        except AddressRefusal as refusal:
            # The part at fault ("its port has a leading zero"), never the text.
            raise Refusal(f"must be {self.allowed}: {refusal.reason}") from None
        if address.port == 0 and self.to_call:
            raise ValueError(self.allowed)


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
    """Standard padded base64 of exactly 32 bytes (`parse_kek`)."""

    @property
    def allowed(self) -> str:
        return (
            "standard base64 with its padding (44 characters) of exactly 32 random bytes "
            "(not one byte repeated), as openssl rand -base64 32 prints"
        )

    def parse(self, raw: str) -> bytes:
        try:
            key = parse_kek(raw)
        except ValueError:
            raise ValueError(self.allowed) from None
        self.validate(key)
        return key

    def validate(self, value: bytes) -> None:
        if not isinstance(value, bytes) or len(value) != 32:
            raise ValueError(self.allowed)
        if one_repeated_byte(value):
            # All zeros (`"A" * 43 + "="`) and the like: a placeholder, not a key.
            raise Refusal(
                "is one byte repeated 32 times, a placeholder rather than a key: make one "
                "with openssl rand -base64 32"
            )

    def show(self, value: bytes) -> str:
        return "(secret)"


def _list_items(raw: str) -> list[str]:
    """The items of a list setting: separated by bare commas, none empty, none with white
    space around it, none repeated (one spelling, as for every setting: `a,,b`, `a, b` or
    a trailing comma are mistakes to be told of, not tidied away). ValueError if not."""
    for character in raw:
        if character in COMMA_LOOK_ALIKES:
            raise Refusal(
                f"holds {code_point(character)}, which looks like a comma but is not one: "
                "items are separated by a plain comma (,)"
            )
    items = raw.split(",")
    if any(not item or item != item.strip() for item in items):
        raise ValueError("not a bare comma-separated list")
    if len(set(items)) != len(items):
        raise ValueError("a repeated item")
    return items


LIST_SPELLING = "separated by commas (no blanks, no empty or repeated item)"


def _list_items_or_refusal(raw: str, allowed: str) -> list[str]:
    """`_list_items`, its refusal a Refusal (a comma look-alike) or ValueError(allowed)."""
    try:
        return _list_items(raw)
    except Refusal:
        raise
    except ValueError:
        raise ValueError(allowed) from None


def _item(read: Callable[[V], R], item: V) -> R:
    """`read(item)`, a Refusal of it said of "an item"."""
    try:
        return read(item)
    except Refusal as refusal:
        raise Refusal(f"an item {refusal}") from None


def _validate_items(parser: Parser[T], items: Iterable[T], allowed: str) -> None:
    for item in items:
        try:
            _item(parser.validate, item)
        except Refusal:
            raise
        except ValueError:
            raise ValueError(allowed) from None


@dataclass(frozen=True)
class CommaSet(Parser[frozenset[T]]):
    """Items separated by bare commas (`_list_items`), each read by `item`, at most
    `max_items` of them, in no particular order."""

    item: Parser[T]
    max_items: int

    @property
    def allowed(self) -> str:
        return f"at most {self.max_items} items {LIST_SPELLING}, each {self.item.allowed}"

    def parse(self, raw: str) -> frozenset[T]:
        items = _list_items_or_refusal(raw, self.allowed)
        try:
            value = frozenset(_item(self.item.parse, item) for item in items)
        except Refusal:
            raise
        except ValueError:
            raise ValueError(self.allowed) from None
        self.validate(value)
        return value

    def validate(self, value: frozenset[T]) -> None:
        if not isinstance(value, AbstractSet) or len(value) > self.max_items:
            raise ValueError(self.allowed)
        _validate_items(self.item, value, self.allowed)

    def show(self, value: frozenset[T]) -> str:
        return f"`{','.join(sorted(map(str, value)))}`" if value else "empty"


@dataclass(frozen=True)
class CommaList(Parser[tuple[T, ...]]):
    """Items in order, separated by bare commas (`_list_items`), each read by `item`, 1 to
    `max_items` of them (e.g. several accepted audiences: `CommaList(Text(256),
    max_items=32)`)."""

    item: Parser[T]
    max_items: int

    @property
    def allowed(self) -> str:
        return f"1 to {self.max_items} items {LIST_SPELLING}, each {self.item.allowed}"

    def parse(self, raw: str) -> tuple[T, ...]:
        items = _list_items_or_refusal(raw, self.allowed)
        try:
            value = tuple(_item(self.item.parse, item) for item in items)
        except Refusal:
            raise
        except ValueError:
            raise ValueError(self.allowed) from None
        self.validate(value)
        return value

    def validate(self, value: tuple[T, ...]) -> None:
        if not isinstance(value, tuple) or not 1 <= len(value) <= self.max_items:
            raise ValueError(self.allowed)
        if len(set(value)) != len(value):
            raise ValueError(self.allowed)
        _validate_items(self.item, value, self.allowed)

    def show(self, value: tuple[T, ...]) -> str:
        return f"`{','.join(map(str, value))}`"


def bounded_argument(parser: Parser[T]) -> Callable[[str], T]:
    """An argparse `type` from a parser: the same bounds, and a one-line refusal that does
    not echo the value (`authsvc serve --workers`, the load-testing options)."""

    def parse(text: str) -> T:
        try:
            return parser.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {parser.allowed}") from None

    return parse


def parse_kek(raw: str) -> bytes:
    """Decode a key-encryption key: standard base64 with its padding (`+`, `/`, `=`), of
    exactly 32 bytes, in the one spelling that encodes them, as `openssl rand -base64 32`
    prints it. URL-safe, unpadded or non-canonical spellings (spare bits set), line breaks
    and anything else are refused: the same key has one spelling everywhere it is stored."""
    try:
        key = base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be base64 of 32 random bytes") from None
    if len(key) != 32 or base64.b64encode(key).decode("ascii") != raw:
        raise ValueError("must be standard padded base64 of exactly 32 bytes")
    return key
