"""Usernames and other client-chosen text: the canonical key that makes `alice`, `Alice`
and the full-width letters U+FF41... one account, the rules for new usernames, and the
escaping that keeps such text from forging lines or sending control sequences where it is shown or
stored (user agents, peers, names printed by the CLI)."""

from __future__ import annotations

import unicodedata

# Characters that do not show as themselves: controls (Cc), format characters such as
# zero-width spaces and bidi overrides (Cf), line and paragraph separators (Zl, Zp),
# private-use (Co), lone surrogates (Cs) and unassigned code points (Cn).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})
# Letters and marks that show as nothing (Unicode's default-ignorable code points outside
# the categories above, and the blank braille cell): a name made of them looks empty.
_BLANK_CHARACTERS = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u2800\u3164\uffa0"
)

MAX_USERNAME_KEY_BYTES = 1024
"""The canonical key of a username, in UTF-8 bytes. NFKC can expand a character up to 18
times; a key this long still fits a PostgreSQL index entry (2704 bytes) with room."""


def username_key(username: str) -> str:
    """What usernames are compared by: Unicode NFKC, then case-folded, then NFKC again (the
    fold can leave text that is not in normal form). `Alice`, `ALICE` and the full-width
    letters U+FF41... all give `alice`."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", username).casefold())


def username_key_too_long(username: str) -> bool:
    """No user can have a key this long; refused before it reaches the store."""
    return len(username_key(username).encode("utf-8", "surrogatepass")) > MAX_USERNAME_KEY_BYTES


def new_username_problem(username: str) -> str | None:
    """Why `username` may not name a new user (a FieldViolation description), or None.

    Refused: empty, leading or trailing white space, characters that do not show as
    themselves (see `_HIDDEN_CATEGORIES`: newlines, ANSI escapes, zero-width and bidi
    characters, ...), and names whose canonical key is over MAX_USERNAME_KEY_BYTES."""
    if not username:
        return "is required"
    if any(unicodedata.category(c) in _HIDDEN_CATEGORIES for c in username):
        return "must not contain control, format, separator or unassigned characters"
    if any(c in _BLANK_CHARACTERS for c in username):
        return "must not contain characters that show as nothing"
    key = username_key(username)
    # White space inside a name (after NFKC, any kind is a plain space) is allowed; other
    # spaces that NFKC keeps would look like one and compare unlike it.
    if any(c.isspace() and c != " " for c in key):
        return "must not contain white space other than a plain space"
    if username != username.strip() or key != key.strip():
        return "must not start or end with white space"
    if len(key.encode("utf-8")) > MAX_USERNAME_KEY_BYTES:
        return f"is longer than {MAX_USERNAME_KEY_BYTES} bytes once normalised"
    return None


def escape_text(text: str, *, limit: int | None = None) -> str:
    """`text` with every character that does not show as itself, and the backslash,
    written as a Python-style escape (`\\n`, `\\x1b`, `\\u200b`, `\\\\`), so that it can
    neither forge lines nor drive a terminal, and an escape cannot be mistaken for the
    character. With `limit`, at most that many characters of output, never cutting an
    escape in two."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        # Printable ASCII shows as itself (only the backslash is escaped): the common case
        # (every call's peer address and user agent) without a step per character.
        return text if limit is None else text[:limit]
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = _escape_char(char)
        if limit is not None and size + len(piece) > limit:
            break
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    if unicodedata.category(char) not in _HIDDEN_CATEGORIES:
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
