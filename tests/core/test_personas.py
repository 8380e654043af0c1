from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from bot.config import REPO_ROOT
from bot.core.persona_files import PersonaRegistry, check_directory, load_persona_file
from bot.core.personas import Persona
from bot.errors import PersonaError

SHIPPED = REPO_ROOT / "personas"

GOOD = """\
name: {name}
display_name: {display}
description: A test persona.
greeting: Hello!
temperature: 0.5
"""


def write(path: Path, text: str, bump_ns: int = 0) -> Path:
    """Write `text`; with `bump_ns`, move the mtime forward so change detection is reliable."""
    path.write_text(text, encoding="utf-8")
    if bump_ns:
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump_ns))
    return path


def good(name: str = "tess", display: str = "Tess") -> str:
    return GOOD.format(name=name, display=display)


def load_error(path: Path) -> PersonaError:
    with pytest.raises(PersonaError) as info:
        load_persona_file(path)
    return info.value


# Shipped personas


def test_shipped_personas_load() -> None:
    personas, problems = check_directory(SHIPPED)
    assert problems == []
    names = {persona.name for persona in personas}
    assert {"mimi", "sage"} <= names
    mimi = load_persona_file(SHIPPED / "mimi.yaml")
    sage = load_persona_file(SHIPPED / "sage.yaml")
    assert mimi.temperature > sage.temperature
    for persona in (mimi, sage):
        assert persona.greeting and persona.image_style and persona.rules
        assert persona.max_reply_tokens < persona.context_window / 2
        assert persona.include_time is False


def test_defaults_and_hashable(tmp_path: Path) -> None:
    persona = load_persona_file(write(tmp_path / "tess.yaml", good()))
    assert persona.model == "llama3.2:3b"
    assert persona.prompt_template == "system.j2"
    assert persona.include_time is False
    assert persona.rules == [] and persona.aliases == []
    assert {persona: 1}[persona] == 1
    with pytest.raises(Exception):  # noqa: B017 - frozen model
        persona.temperature = 1.0  # type: ignore[misc]


# Error messages


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "x.yaml", "name: x\ndisplay_name: X\nrules:\n  - a\n  b: [\n")
    error = load_error(path)
    message = str(error)
    assert message.startswith(f"{path}:")
    assert "YAML syntax error" in message
    assert error.path == path  # type: ignore[attr-defined]
    assert isinstance(error.line, int) and error.line >= 4  # type: ignore[attr-defined]
    assert message.startswith(f"{path}:{error.line}: YAML syntax error: ")  # type: ignore[attr-defined]


def test_schema_error_names_field_and_line(tmp_path: Path) -> None:
    text = good() + "# a comment\nmodel: llama3.2:3b\ntemperature: 5\n"
    text = text.replace("temperature: 0.5\n", "")
    lines = text.splitlines()
    expected = lines.index("temperature: 5") + 1
    assert expected == 7
    path = write(tmp_path / "tess.yaml", text)
    error = load_error(path)
    assert str(error) == (f"{path}:7: temperature: Input should be less than or equal to 2")
    assert error.line == 7  # type: ignore[attr-defined]
    assert error.field == "temperature"  # type: ignore[attr-defined]


def test_relative_path_stays_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "personas").mkdir()
    write(tmp_path / "personas" / "tess.yaml", good() + "temperature: -1\n")
    error = load_error(Path("personas/tess.yaml"))
    assert str(error).startswith("personas/tess.yaml:")


def test_missing_field_uses_mapping_start_line(tmp_path: Path) -> None:
    text = good().replace("greeting: Hello!\n", "")
    path = write(tmp_path / "tess.yaml", "# comment\n\n" + text)
    error = load_error(path)
    assert str(error) == f"{path}:3: greeting: Field required"


def test_unknown_field(tmp_path: Path) -> None:
    path = write(tmp_path / "tess.yaml", good() + "colour: blue\n")
    error = load_error(path)
    assert str(error) == f"{path}:6: colour: Extra inputs are not permitted"


def test_all_errors_collected_one_per_line(tmp_path: Path) -> None:
    text = good() + "colour: blue\nrules:\n  - fine\n  - [nested]\nrepeat_penalty: 9\n"
    path = write(tmp_path / "tess.yaml", text)
    lines = str(load_error(path)).splitlines()
    assert len(lines) == 3
    assert lines[0] == f"{path}:6: colour: Extra inputs are not permitted"
    assert lines[1].startswith(f"{path}:9: rules[1]: Input should be a valid string")
    assert lines[2].startswith(f"{path}:10: repeat_penalty: ")


def test_reply_tokens_must_fit_context(tmp_path: Path) -> None:
    text = good() + "context_window: 1024\nmax_reply_tokens: 600\n"
    error = load_error(write(tmp_path / "tess.yaml", text))
    assert error.field == "max_reply_tokens"  # type: ignore[attr-defined]
    assert error.line == 7  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("- a\n- b\n", "mapping"),
        ("just a string\n", "mapping"),
    ],
)
def test_non_mapping_document(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path / "tess.yaml", text)
    message = str(load_error(path))
    assert message.startswith(f"{path}:1: ")
    assert needle in message


def test_duplicate_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path / "tess.yaml", good() + "temperature: 0.7\n")
    error = load_error(path)
    assert str(error) == f"{path}:6: temperature: duplicate key (first set on line 5)"


def test_name_must_match_stem(tmp_path: Path) -> None:
    path = write(tmp_path / "other.yaml", good())
    error = load_error(path)
    message = str(error)
    assert message.startswith(f"{path}:1: name: ")
    assert "other" in message
    registry = PersonaRegistry(tmp_path)
    problems = registry.load_all()
    assert [str(problem) for problem in problems] == [message]
    assert registry.names() == []


def test_bad_name_slug(tmp_path: Path) -> None:
    path = write(tmp_path / "Tess.yaml", good(name="Tess"))
    error = load_error(path)
    assert error.field == "name"  # type: ignore[attr-defined]
    assert "slug" in str(error)


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    write(tmp_path / "tess.yaml", good())
    write(tmp_path / "tess.yml", good(display="Tess Two"))
    write(tmp_path / "sam.yaml", good(name="sam", display="Sam"))
    personas, problems = check_directory(tmp_path)
    assert sorted(persona.name for persona in personas) == ["sam", "tess"]
    assert len(problems) == 1
    assert "duplicate persona name 'tess'" in str(problems[0])
    assert "tess.yml" in str(problems[0])


def test_check_directory_missing(tmp_path: Path) -> None:
    personas, problems = check_directory(tmp_path / "nope")
    assert personas == []
    assert len(problems) == 1 and "nope" in str(problems[0])


# Registry


def test_registry_lookup_and_default(tmp_path: Path) -> None:
    write(tmp_path / "tess.yaml", good())
    write(tmp_path / "sam.yml", good(name="sam", display="Sam"))
    write(tmp_path / "notes.txt", "not a persona")
    registry = PersonaRegistry(tmp_path)
    assert registry.load_all() == []
    assert registry.names() == ["sam", "tess"]
    assert [persona.name for persona in registry.all()] == ["sam", "tess"]
    assert registry.get("TESS").display_name == "Tess"
    assert registry.find("nobody") is None
    with pytest.raises(KeyError):
        registry.get("nobody")
    assert registry.default("tess").name == "tess"
    assert registry.default("nobody").name == "sam"
    assert registry.default(None).name == "sam"


def test_registry_default_when_empty(tmp_path: Path) -> None:
    registry = PersonaRegistry(tmp_path)
    assert registry.load_all() == []
    with pytest.raises(PersonaError, match="no personas loaded from"):
        registry.default(None)


def test_load_all_keeps_good_personas(tmp_path: Path) -> None:
    write(tmp_path / "tess.yaml", good())
    write(tmp_path / "bad.yaml", "name: bad\n")
    registry = PersonaRegistry(tmp_path)
    problems = registry.load_all()
    assert len(problems) == 1 and "bad.yaml" in str(problems[0])
    assert registry.names() == ["tess"]


def test_hot_reload(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "tess.yaml", good())
    registry = PersonaRegistry(tmp_path)
    assert registry.load_all() == []
    assert registry.get("tess").display_name == "Tess"
    assert registry.reload_changed() == []

    write(path, good(display="Tess v2"), bump_ns=1_000_000_000)
    assert registry.reload_changed() == []
    assert registry.get("tess").display_name == "Tess v2"

    broken = good(display="Tess v3").replace("temperature: 0.5", "temperature: 5")
    with caplog.at_level(logging.WARNING, logger="bot.core.personas"):
        write(path, broken, bump_ns=2_000_000_000)
        problems = registry.reload_changed()
    assert len(problems) == 1
    assert "temperature" in str(problems[0]) and str(path) in str(problems[0])
    assert registry.get("tess").display_name == "Tess v2"
    assert any(
        record.levelno == logging.WARNING and "last good version" in record.getMessage()
        for record in caplog.records
    )
    assert registry.reload_changed() == []  # no change since: no repeated error

    write(path, good(display="Tess v4"), bump_ns=3_000_000_000)
    assert registry.reload_changed() == []
    assert registry.get("tess").display_name == "Tess v4"

    new = write(tmp_path / "sam.yaml", good(name="sam", display="Sam"))
    assert registry.reload_changed() == []
    assert registry.names() == ["sam", "tess"]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bot.core.personas"):
        path.unlink()
        assert registry.reload_changed() == []
    assert registry.find("tess") is None
    assert registry.names() == ["sam"]
    assert any("deleted" in record.getMessage() for record in caplog.records)
    assert new.exists()


def test_same_size_edit_detected_by_mtime(tmp_path: Path) -> None:
    path = write(tmp_path / "tess.yaml", good(display="Tess A"))
    registry = PersonaRegistry(tmp_path)
    registry.load_all()
    write(path, good(display="Tess B"), bump_ns=1_000)
    registry.reload_changed()
    assert registry.get("tess").display_name == "Tess B"


async def test_watch_picks_up_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "tess.yaml", good())
    registry = PersonaRegistry(tmp_path)
    assert registry.load_all() == []
    task = asyncio.create_task(registry.watch(0.05))
    try:
        write(path, good(display="Tess watched"), bump_ns=1_000_000_000)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if registry.get("tess").display_name == "Tess watched":
                break
        assert registry.get("tess").display_name == "Tess watched"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()


def test_persona_model_is_strict(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="Extra inputs"):
        Persona.model_validate(
            {"name": "a", "display_name": "A", "description": "d", "greeting": "g", "x": 1}
        )
    with pytest.raises(PersonaError):
        load_persona_file(write(tmp_path / "tess.yaml", good() + "prompt_template: ../x.j2\n"))
