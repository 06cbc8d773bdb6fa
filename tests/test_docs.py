"""The documentation: a short README from which every docs section is one click away, links
that resolve, and the figures section of docs/performance.md that `make bench` writes itself.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from service.loadtest.bench_page import (
    RESULTS_END,
    RESULTS_START,
    BenchReport,
    Machine,
    MissingMarkers,
    results_section,
    with_results,
    write_results,
)
from tests.test_cli import _authsvc, _env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(2)) for m in re.finditer(r"^(#{1,6}) (.+)$", text, re.MULTILINE)}


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


def test_the_readme_is_a_front_door_under_150_lines() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_docs_pages_the_issue_names_exist() -> None:
    names = {page.name for page in PAGES}
    for name in (
        "api.md",
        "design.md",
        "operations.md",
        "security.md",
        "clients.md",
        "performance.md",
    ):
        assert name in names, name


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not ours to check offline
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (linked.suffix != ".md" or anchor not in _anchors(linked)):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_section_is_one_click_from_the_readme() -> None:
    """Each page, and each of its `##` sections, is linked from README.md itself."""
    linked = {target.removeprefix("docs/") for target in _links(README)}
    missing = []
    for page in PAGES:
        if page.name not in linked:
            missing.append(page.name)
        text = FENCE.sub("", page.read_text(encoding="utf-8"))
        for heading in re.findall(r"^## (.+)$", text, re.MULTILINE):
            if f"{page.name}#{_slug(heading)}" not in linked:
                missing.append(f"{page.name}#{_slug(heading)}")
    assert not missing, "not linked from README.md: " + ", ".join(missing)


# --- the figures section `make bench` writes ------------------------------------------------

FAKE_REPORT = BenchReport(
    tables="| benchmark | req/s |\n|---|---:|\n| health | 1,234 |",
    setup="server: 2 workers, load: 2 processes x 32 concurrent calls in all",
    machine=Machine(
        cpu_model="Example CPU 9000 (x86_64)", cores=2, python="3.11.7", postgresql="16.4"
    ),
    finished_at=datetime(2027, 1, 2, 3, 4, tzinfo=UTC),
)
COMMAND = "authsvc bench --duration 6 --rounds 3 --write-docs docs/performance.md"


def test_the_figures_section_names_the_command_the_date_and_the_machine() -> None:
    section = results_section(FAKE_REPORT, COMMAND)
    assert f"`{COMMAND}`" in section
    assert "2027-01-02 03:04 UTC" in section
    for fact in ("Example CPU 9000 (x86_64)", "2 cores", "Python 3.11.7", "PostgreSQL 16.4"):
        assert fact in section, fact
    assert "| health | 1,234 |" in section
    assert "server: 2 workers" in section


def test_writing_the_figures_keeps_the_prose_around_them(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    before = "# Performance\n\nProse before.\n\n"
    after = "\n\nProse after, [a link](#figures).\n"
    page.write_text(f"{before}{RESULTS_START}\nold figures\n{RESULTS_END}{after}")

    write_results(page, FAKE_REPORT, COMMAND)
    once = page.read_text()
    assert once.startswith(before + RESULTS_START + "\n")
    assert once.endswith(RESULTS_END + after)
    assert "old figures" not in once
    assert "| health | 1,234 |" in once

    # A second run replaces the first run's figures instead of adding to them.
    write_results(page, FAKE_REPORT, COMMAND)
    assert page.read_text() == once
    assert once.count(RESULTS_START) == once.count(RESULTS_END) == 1


def test_a_page_without_the_markers_is_refused() -> None:
    for page in ("no markers", f"{RESULTS_END}\n{RESULTS_START}\n", f"{RESULTS_START} only"):
        with pytest.raises(MissingMarkers):
            with_results(page, "figures")


def test_the_performance_page_has_one_figures_section_and_its_figures_are_labelled() -> None:
    page = (DOCS / "performance.md").read_text(encoding="utf-8")
    assert page.count(RESULTS_START) == page.count(RESULTS_END) == 1
    section = page[page.index(RESULTS_START) : page.index(RESULTS_END)]
    # Either what `make bench` writes, or the earlier run's figures, said to be from it.
    assert section.lstrip(RESULTS_START).lstrip().startswith(("Written by `", "From an earlier"))


def test_bench_refuses_a_page_without_markers_before_benchmarking(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# no markers here\n")
    result = _authsvc("bench", "--write-docs", str(page), env=_env())
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--write-docs" in lines[0] and RESULTS_START in lines[0]
    assert page.read_text() == "# no markers here\n"
    assert "| benchmark |" not in result.stdout  # it stopped before running anything
