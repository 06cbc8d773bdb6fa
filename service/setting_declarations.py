"""How a setting is declared: `setting()` makes a field of `service.settings.Settings`
that names its variable, its parser (`service.setting_parsers`), its default and its
line in the configuration table (docs/operations.md), and records them as the field's
`Declaration`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from service.setting_parsers import Parser

T = TypeVar("T")


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

    `doc` is its line in the configuration table; `secret` keeps the value out of repr()."""
    declaration = Declaration(variable, parser, " ".join(doc.split()), shown_default)
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        repr=not secret,
        metadata={_DECLARATION: declaration},
    )


def declared_fields(cls: type[Any]) -> Iterator[tuple[str, Declaration[Any]]]:
    """(field name, declaration) of every field of dataclass `cls` made by `setting()`,
    in declaration order."""
    for f in dataclasses.fields(cls):
        declaration = f.metadata.get(_DECLARATION)
        if declaration is not None:
            yield f.name, declaration
