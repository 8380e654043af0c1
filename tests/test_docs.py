"""The README's links lead somewhere; the docs site itself is checked by `mkdocs build --strict`."""

from __future__ import annotations

import re

from bot.config import REPO_ROOT


def test_readme_links_to_files_that_exist() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to its docs pages"
    missing = [t for t in local if not (REPO_ROOT / t).exists()]
    assert missing == []


def test_readme_stays_short_and_keeps_two_quick_start_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 300
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = quick.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make run", "make test"]


def test_every_docs_page_is_in_the_site_navigation() -> None:
    nav = (REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (REPO_ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []
