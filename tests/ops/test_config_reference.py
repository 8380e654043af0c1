"""docs/configuration.md is generated from Settings: every setting documented, the page current."""

from __future__ import annotations

from bot.config import Settings
from bot.ops.config_reference import (
    INDEX,
    PAGE,
    README,
    index_page,
    missing_descriptions,
    render,
    splice,
)


def test_every_setting_has_documentation() -> None:
    assert missing_descriptions() == []


def test_the_configuration_page_is_current() -> None:
    page = PAGE.read_text(encoding="utf-8")
    assert splice(page, render()) == page, "run: python -m bot config-reference --write"


def test_rows_show_variables_defaults_and_nested_settings() -> None:
    table = render()
    assert "| `BUDGET_DEGRADE_AT` | `[0.75, 0.9, 0.98]` |" in table
    assert "| `GUARD_FAIL_POLICY__CONSOLE` | `open` |" in table
    assert "| `PERSONAS_DIR` | `personas/` of the checkout |" in table
    secret_rows = [line for line in table.splitlines() if line.startswith("| `FAL_KEY`")]
    assert secret_rows and "never logged" in secret_rows[0]
    documented = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    fields = {name.upper() for name in Settings.model_fields if name != "guard_fail_policy"}
    assert fields <= documented


def test_the_docs_home_page_is_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    page = INDEX.read_text(encoding="utf-8")
    assert page == index_page(readme), "run: python -m bot config-reference --write"
    assert "](docs/" not in page and "](backends.md#the-local-cpu-model)" in page
