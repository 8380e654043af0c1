"""Character cards in: V2 and V3, PNG and JSON, made here; broken cards refused by field."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path

import pytest

from bot.cli import main
from bot.core.cards import CardError, import_card, read_card
from bot.core.persona_files import PersonaRegistry, load_persona_file
from bot.errors import PersonaError
from tests.fakes.fal import make_png


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def card_png(cards: dict[str, dict], picture: bytes | None = None) -> bytes:
    """A PNG picture with each card as a tEXt chunk (keyword, NUL, base64 of the JSON)."""
    png = picture or make_png(4, 4)
    iend = png.rindex(b"IEND") - 4
    texts = b"".join(
        _chunk(b"tEXt", key.encode() + b"\x00" + base64.b64encode(json.dumps(card).encode()))
        for key, card in cards.items()
    )
    return png[:iend] + texts + png[iend:]


def v2(name: str = "Aria", **data: object) -> dict:
    fields = {
        "name": name,
        "description": "{{char}} is a travelling bard who collects stories.",
        "personality": "curious, warm, a little vain",
        "scenario": "{{char}} meets {{user}} at an inn.",
        "first_mes": "Well met, {{user}}! Care for a song?",
        "mes_example": "<START>\n{{user}}: Hi\n{{char}}: Hello, friend!\n<START>\n{{user}}: Sing!\n"
        "{{char}}: Gladly.",
        "creator_notes": "Best with a warm model.\nSecond line.",
        "system_prompt": "",
        "post_history_instructions": "",
        "alternate_greetings": [],
        "tags": ["fantasy"],
        "creator": "someone",
        "character_version": "1.0",
        "extensions": {},
    }
    fields.update(data)
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": fields}


def v3(name: str = "Bram", **data: object) -> dict:
    card = v2(name, **data)
    card["spec"], card["spec_version"] = "chara_card_v3", "3.0"
    for key, empty in (("nickname", ""), ("group_only_greetings", []), ("assets", [])):
        card["data"].setdefault(key, empty)
    return card


def test_v2_png_card_becomes_a_valid_persona_with_its_picture(tmp_path: Path) -> None:
    source = tmp_path / "aria.png"
    source.write_bytes(card_png({"chara": v2()}))
    personas = tmp_path / "personas"
    personas.mkdir()
    imported = import_card(source, personas)
    persona = load_persona_file(personas / "aria.yaml")
    assert imported.name == persona.name == "aria"
    assert persona.display_name == "Aria"
    assert persona.description.startswith("Aria is a travelling bard")
    assert "Personality: curious, warm, a little vain" in persona.description
    assert persona.scenario == "Aria meets the user at an inn."
    assert persona.greeting == "Well met, there! Care for a song?"
    assert persona.examples == ["User: Hi\nAria: Hello, friend!", "User: Sing!\nAria: Gladly."]
    assert persona.avatar == "aria.png"
    avatar = (personas / "aria.png").read_bytes()
    assert avatar.startswith(b"\x89PNG") and b"chara" not in avatar, "the picture, no card"
    text = (personas / "aria.yaml").read_text()
    assert "# Creator notes:\n#   Best with a warm model.\n#   Second line." in text


def test_v3_chunk_wins_over_v2_in_one_png(tmp_path: Path) -> None:
    source = tmp_path / "both.png"
    source.write_bytes(card_png({"chara": v2("Old"), "ccv3": v3("New")}))
    card, picture = read_card(source)
    assert card["spec"] == "chara_card_v3" and card["data"]["name"] == "New"
    assert picture is not None


@pytest.mark.parametrize("card", [v2("Cora"), v3("Cora"), v2("Cora")["data"]])
def test_json_cards_v2_v3_and_v1(tmp_path: Path, card: dict) -> None:
    source = tmp_path / "cora.json"
    source.write_text(json.dumps(card))
    import_card(source, tmp_path)
    persona = load_persona_file(tmp_path / "cora.yaml")
    assert persona.name == "cora" and persona.avatar == ""


def test_v3_icon_url_and_lorebook_side_file(tmp_path: Path) -> None:
    book = {"name": "world", "entries": [{"keys": ["inn"], "content": "The inn is old."}]}
    card = v3("Dara", character_book=book, nickname="Dee")
    card["data"]["assets"] = [
        {"type": "icon", "uri": "https://example.org/dee.png", "name": "main"}
    ]
    source = tmp_path / "dara.json"
    source.write_text(json.dumps(card))
    out = tmp_path / "personas"
    out.mkdir()
    import_card(source, out)
    persona = load_persona_file(out / "dara.yaml")
    assert persona.display_name == "Dee" and persona.aliases == ["Dara"]
    assert persona.avatar == "https://example.org/dee.png"
    assert json.loads((out / "dara.lorebook.json").read_text()) == book


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "not valid JSON"),
        (json.dumps(v2("")).encode(), "data.name"),
        (json.dumps(v2("Eve", first_mes="", alternate_greetings=[])).encode(), "data.first_mes"),
        (json.dumps(v2("Eve", description="", personality="")).encode(), "data.description"),
        (json.dumps(v2("Eve", description=7)).encode(), "data.description must be text"),
        (json.dumps({"spec": "chara_card_v9", "data": {}}).encode(), "unknown card spec"),
        (json.dumps([1, 2]).encode(), "JSON object"),
        (make_png(), "no character card"),
        (card_png({"chara": v2()})[:60], "cut short"),
    ],
)
def test_broken_cards_are_refused_naming_what_is_wrong(
    tmp_path: Path, content: bytes, words: str
) -> None:
    source = tmp_path / "card.bin"
    source.write_bytes(content)
    with pytest.raises(CardError, match=words):
        import_card(source, tmp_path)
    assert not list(tmp_path.glob("*.yaml")), "nothing is written for a broken card"


def test_a_card_that_fails_persona_validation_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "long.json"
    source.write_text(json.dumps(v2("Fay", first_mes="   ")))
    with pytest.raises(CardError):
        import_card(source, tmp_path)
    assert not (tmp_path / "fay.yaml").exists()


def test_never_overwrites_without_force(tmp_path: Path) -> None:
    source = tmp_path / "aria.json"
    source.write_text(json.dumps(v2()))
    (tmp_path / "aria.yaml").write_text("mine")
    with pytest.raises(CardError, match=r"already exists.*--force"):
        import_card(source, tmp_path)
    assert (tmp_path / "aria.yaml").read_text() == "mine"
    import_card(source, tmp_path, force=True)
    assert load_persona_file(tmp_path / "aria.yaml").display_name == "Aria"


def test_cli_import_then_the_registry_serves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "gil.png"
    source.write_bytes(card_png({"ccv3": v3("Gil")}))
    out = tmp_path / "personas"
    out.mkdir()
    assert main(["personas", "import", str(source), "--dir", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["personas", "import", str(source), "--dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    registry = PersonaRegistry(out)
    assert registry.load_all() == []
    found = registry.find("gil")
    assert found is not None and found.avatar == "gil.png"


def test_an_avatar_file_must_exist_beside_the_persona(tmp_path: Path) -> None:
    source = tmp_path / "card.png"
    source.write_bytes(card_png({"chara": v2("Hal")}))
    out = tmp_path / "personas"
    out.mkdir()
    import_card(source, out)
    (out / "hal.png").unlink()
    with pytest.raises(PersonaError, match="avatar"):
        load_persona_file(out / "hal.yaml")
