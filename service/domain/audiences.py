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
- free of commas and comma look-alikes (U+FF0C, U+3001, U+FE50, U+FE51, U+FF64): a comma
  separates `AUTH_AUDIENCES`' items, and `orders<U+FF0C>billing` is surely meant as two;
- in Unicode normal form NFC: clients send NFC, and an NFD `é` would never equal theirs;
- a URI (RFC 3986: scheme `:` then URI characters, ASCII only) when it holds a `:`, as
  RFC 7519 requires of a StringOrURI such as `aud`.
"""

from __future__ import annotations

import re
import unicodedata

from authsvc_client.token_check import MAX_AUDIENCE_BYTES

__all__ = ["COMMA_LOOK_ALIKES", "MAX_AUDIENCE_BYTES", "audience_problem", "code_point"]

COMMA_LOOK_ALIKES = frozenset("\uff0c\u3001\ufe50\ufe51\uff64")
"""Characters that look like a comma (full-width, ideographic, small, small ideographic,
half-width ideographic) but separate nothing."""

# RFC 3986: scheme ":" then unreserved, reserved (but the comma) and %XX.
_URI = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+;=]|%[0-9A-Fa-f]{2})*"
)


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
    if ":" in name and _URI.fullmatch(name) is None:
        return "holds ':' but is no URI (a JWT aud value with ':' must be one: scheme:rest, ASCII)"
    return None
