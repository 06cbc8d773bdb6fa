"""The configuration table of docs/operations.md, rendered from the declarations in
`service.settings` (`make docs`: `python -m service.settings_table --write docs/operations.md`;
tests/test_settings.py compares).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from service.settings import Settings, declarations

TABLE_START = "<!-- settings-table:start -->"
TABLE_END = "<!-- settings-table:end -->"


def configuration_table() -> str:
    """The configuration table, from the declarations."""
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


def with_table(page: str) -> str:
    """`page` with the text between the table markers replaced by the current table."""
    start = page.index(TABLE_START) + len(TABLE_START)
    end = page.index(TABLE_END, start)
    return page[:start] + "\n" + configuration_table() + page[end:]


def main(argv: list[str]) -> int:
    """`--table`: print the configuration table; `--write PATH`: rewrite PATH's table
    between the markers; `--check PATH`: exit 1 if it differs."""
    if argv == ["--table"]:
        sys.stdout.write(configuration_table())
        return 0
    if len(argv) == 2 and argv[0] in ("--write", "--check"):
        path = Path(argv[1])
        current = path.read_text(encoding="utf-8")
        wanted = with_table(current)
        if argv[0] == "--check":
            if wanted != current:
                sys.stderr.write(f"{path}: the configuration table is out of date\n")
                return 1
            return 0
        path.write_text(wanted, encoding="utf-8")
        return 0
    sys.stderr.write(
        "usage: python -m service.settings_table --table | --write PATH | --check PATH\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
