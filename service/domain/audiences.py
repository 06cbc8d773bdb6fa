"""What an audience name may be: one rule for the settings that configure audiences
(`AUTH_AUDIENCE`, each item of `AUTH_AUDIENCES`) and for the audience a client names in
Issue, so that no configured name is one a client could never ask for, and a client asking
for an impossible one is told why.

An audience becomes a JWT `aud` value and is compared exactly, character for character,
by every verifier. So it is:
- 1 to MAX_AUDIENCE_BYTES bytes of UTF-8;
- free of separators and invisible characters (Unicode categories Z* and C*: spaces,
  line and paragraph separators, controls, format characters such as U+200B or U+202E,
  private-use and unassigned code points): a name holding one looks like another, or like
  two;
- free of commas and comma look-alikes (`COMMA_LOOK_ALIKES`: U+FF0C, U+3001, U+FE50, U+FE51,
  U+FF64, U+201A, U+060C, U+2E34, U+A4FE, U+1363, U+07F8, U+2E41, U+2E4C): a comma separates
  `AUTH_AUDIENCES`' items, and `orders<U+FF0C>billing` is surely meant as two;
- in Unicode normal form NFC: clients send NFC, and an NFD `é` would never equal theirs;
- a URI (RFC 3986: scheme `:` then an authority, path, query and fragment each of its
  own characters, ASCII only, `%` only in %XX) when it holds a `:`, as RFC 7519 requires
  of a StringOrURI such as `aud`; a refusal names the part and the character.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from authsvc_client.token_check import MAX_AUDIENCE_BYTES

__all__ = ["COMMA_LOOK_ALIKES", "MAX_AUDIENCE_BYTES", "audience_problem", "code_point"]

COMMA_LOOK_ALIKES = frozenset(
    "\uff0c\u3001\ufe50\ufe51\uff64\u201a\u060c\u2e34\ua4fe\u1363\u07f8\u2e41\u2e4c"
)
"""Characters that look like a comma but separate nothing: full-width, ideographic, small,
small ideographic, half-width ideographic; single low-9 quotation mark; Arabic, raised,
Lisu, Ethiopic, NKo, reversed and medieval commas."""

# RFC 3986's pieces (the comma, a sub-delim, is refused before: it separates audiences).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SUB_DELIMS = frozenset("!$&'()*+,;=")
_URI_CHARACTERS = _UNRESERVED | _SUB_DELIMS | frozenset(":/?#[]@%")
_PCHAR = _UNRESERVED | _SUB_DELIMS | frozenset(":@%")  # %: checked as %XX beforehand
_ALLOWED_IN = {
    "userinfo": _UNRESERVED | _SUB_DELIMS | frozenset(":%"),
    "host": _UNRESERVED | _SUB_DELIMS | frozenset("%"),
    "path": _PCHAR | frozenset("/"),
    "query": _PCHAR | frozenset("/?"),
    "fragment": _PCHAR | frozenset("/?"),
}
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_IP_FUTURE = re.compile(r"[vV][0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+;=:]+")


def code_point(character: str) -> str:
    """`U+FF0C (FULLWIDTH COMMA)`: a character named without printing it (it may be
    invisible, or move the text after it)."""
    name = unicodedata.name(character, "")
    return f"U+{ord(character):04X}" + (f" ({name})" if name else "")


def audience_problem(name: str) -> str | None:
    """What is wrong with `name` as an audience (a phrase to follow the setting's or the
    field's name, e.g. "holds U+0020 (SPACE), ..."), or None if nothing is."""
    if not name:
        return "is empty"
    if len(name) > MAX_AUDIENCE_BYTES or len(name.encode("utf-8", "surrogatepass")) > (
        MAX_AUDIENCE_BYTES
    ):
        return f"is longer than {MAX_AUDIENCE_BYTES} bytes"
    for character in name:
        if character in COMMA_LOOK_ALIKES:
            return (
                f"holds {code_point(character)}, which looks like a comma but is not one "
                "(an audience holds no comma)"
            )
        if character == ",":
            return "holds a comma (an audience holds none)"
        if unicodedata.category(character)[0] in "ZC":
            return (
                f"holds {code_point(character)}, a separator or invisible character "
                f"(Unicode category {unicodedata.category(character)})"
            )
    if unicodedata.normalize("NFC", name) != name:
        return "is not in Unicode normal form NFC"
    if ":" in name:
        wrong = _uri_problem(name)
        if wrong is not None:
            return (
                f"holds ':' but is no URI (RFC 3986, as a JWT aud value with ':' must be): {wrong}"
            )
    return None


def _uri_problem(name: str) -> str | None:
    """What keeps `name` from being an RFC 3986 URI (scheme ":" hier-part ["?" query]
    ["#" fragment]), naming the part and the character, or None."""
    scheme, _, rest = name.partition(":")
    if _SCHEME.fullmatch(scheme) is None:
        return "its scheme (before the first ':') is a letter, then letters, digits, + - or ."
    for character in name:
        if character not in _URI_CHARACTERS:
            encode = " (percent-encode its UTF-8)" if ord(character) > 0x7F else ""
            return f"it holds {code_point(character)}, which no URI holds{encode}"
    if _BAD_PERCENT.search(name) is not None:
        return "it holds a '%' that begins no percent-encoding (% and two hex digits)"
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    parts = [("fragment", fragment), ("query", query)]
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        userinfo, _, host_and_port = authority.rpartition("@")
        wrong = _host_and_port_problem(host_and_port)
        if wrong is not None:
            return wrong
        parts += [("userinfo", userinfo), ("path", slash + path)]
    else:
        parts.append(("path", rest))
    for part, text in parts:
        for character in text:
            if character not in _ALLOWED_IN[part]:
                return f"its {part} holds {code_point(character)}"
    return None


def _host_and_port_problem(text: str) -> str | None:
    """What is wrong with an authority's host[:port], or None."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            return f"its host holds {code_point('[')} that no ']' closes"
        literal, after = text[1:close], text[close + 1 :]
        if _IP_FUTURE.fullmatch(literal) is None:
            try:
                ipaddress.IPv6Address(literal)
            except ValueError:
                return "its host in brackets is no IPv6 address"
            if "%" in literal:
                return "its host in brackets is no IPv6 address (a zone id is no part of one)"
        if after and not after.startswith(":"):
            return f"its host holds {code_point(after[0])} after its ']'"
        port = after[1:]
    else:
        host, _, port = text.partition(":")
        for character in host:
            if character not in _ALLOWED_IN["host"]:
                where = " (brackets enclose an IPv6 address, all of the host)"
                return f"its host holds {code_point(character)}" + (
                    where if character in "[]" else ""
                )
    if port and not (port.isascii() and port.isdigit()):
        return "its port (after the host's ':') is not digits"
    return None
