"""Character cards in: `python -m bot personas import FILE` writes a persona YAML from a card.

Reads the community's interchange format for characters (SillyTavern and others):
- Character Card V2: `{"spec": "chara_card_v2", "data": {...}}`, in a PNG's `tEXt` chunk named
  `chara` (base64 of the JSON) or as the JSON itself;
- Character Card V3: `{"spec": "chara_card_v3", "data": {...}}`, in a `tEXt` chunk named `ccv3`
  (preferred when a PNG carries both, as the V3 spec says) or as JSON;
- V1 cards (the fields at the top level, no `spec`) are read too.

What the persona keeps: name (as the slug and display name), description and personality,
scenario, first message (the greeting), example messages (examples in the prompt), the card's
picture as the avatar, creator notes as a comment. An embedded lorebook (`character_book`) goes to
a side file, `NAME.lorebook.json`, for the knowledge work that will follow. The result is
validated exactly like a hand-written persona; nothing is overwritten without `force`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bot.core.persona_files import PersonaFileError, load_persona_file
from bot.errors import PersonaError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_CHUNKS = ("ccv3", "chara")  # V3 first: "if both exist, apps SHOULD use ccv3"
_EXAMPLE_SPLIT = re.compile(r"<START>", re.IGNORECASE)


class CardError(PersonaError):
    """A character card that cannot become a persona; the message names the field."""


@dataclass
class ImportedPersona:
    """What an import wrote: the persona file and its side files."""

    name: str
    path: Path
    written: list[Path] = field(default_factory=list)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if not data.startswith(PNG_SIGNATURE):
        raise CardError("not a PNG file")
    chunks, offset = [], len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        if len(body) != length:
            raise CardError("the PNG is cut short")
        chunks.append((kind, body))
        offset += 12 + length
        if kind == b"IEND":
            break
    return chunks


def _text_chunks(chunks: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    """tEXt (and zTXt) chunks by keyword."""
    found: dict[str, bytes] = {}
    for kind, body in chunks:
        if kind not in (b"tEXt", b"zTXt") or b"\x00" not in body:
            continue
        keyword, _, value = body.partition(b"\x00")
        if kind == b"zTXt":
            try:
                value = zlib.decompress(value[1:])  # one byte of compression method first
            except zlib.error:
                continue
        found.setdefault(keyword.decode("latin-1"), value)
    return found


def _strip_card_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """The picture alone: the PNG without the card's text chunks (the avatar file)."""
    out = [PNG_SIGNATURE]
    for kind, body in chunks:
        if kind in (b"tEXt", b"zTXt") and body.partition(b"\x00")[0].decode("latin-1") in (
            *CARD_CHUNKS,
            "chara-ext-asset_",
        ):
            continue
        out.append(struct.pack(">I", len(body)) + kind + body)
        out.append(struct.pack(">I", zlib.crc32(kind + body)))
    return b"".join(out)


def read_card(path: Path) -> tuple[dict[str, Any], bytes | None]:
    """The card's JSON and, for a PNG card, its picture without the card chunks."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CardError(f"cannot read {path}: {exc.strerror or exc}") from None
    picture = None
    if raw.startswith(PNG_SIGNATURE):
        chunks = _png_chunks(raw)
        texts = _text_chunks(chunks)
        keyword = next((k for k in CARD_CHUNKS if k in texts), None)
        if keyword is None:
            raise CardError("the PNG has no character card in it (no 'ccv3' or 'chara' chunk)")
        try:
            text = base64.b64decode(texts[keyword], validate=False).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CardError(f"the PNG's {keyword!r} chunk is not base64 of UTF-8 JSON") from None
        picture = _strip_card_chunks(chunks)
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise CardError("not a PNG and not UTF-8 JSON") from None
    try:
        card = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError(f"the card is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(card, dict):
        raise CardError("the card must be a JSON object")
    return card, picture


def card_data(card: dict[str, Any]) -> dict[str, Any]:
    """The card's fields, whatever its version (V2 and V3 keep them under `data`)."""
    spec = card.get("spec")
    if spec in ("chara_card_v2", "chara_card_v3"):
        data = card.get("data")
        if not isinstance(data, dict):
            raise CardError(f"{spec} card has no 'data' object")
        return data
    if spec is not None:
        raise CardError(f"unknown card spec {spec!r} (expected chara_card_v2 or chara_card_v3)")
    return card  # V1: the fields at the top level


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CardError(f"data.{key} must be text, got {type(value).__name__}")
    return value.strip()


def slug(name: str) -> str:
    text = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    return text or "character"


def _macros(text: str, display: str, user: str = "the user") -> str:
    """Cards write {{char}} and {{user}}; the persona speaks of itself by name."""
    text = re.sub(r"\{\{\s*char\s*\}\}|<BOT>", display, text, flags=re.IGNORECASE)
    return re.sub(r"\{\{\s*user\s*\}\}|<USER>", user, text, flags=re.IGNORECASE)


def _examples(text: str, display: str) -> list[str]:
    blocks = [_macros(b.strip(), display, "User") for b in _EXAMPLE_SPLIT.split(text)]
    return [b for b in blocks if b]


def persona_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The persona YAML's fields from a card's data; a missing essential names its field."""
    name = _text(data, "name")
    if not name:
        raise CardError("data.name is missing or empty: a card needs a name")
    display = _text(data, "nickname") or name
    description = _macros(_text(data, "description"), display)
    personality = _macros(_text(data, "personality"), display)
    if personality:
        description = f"{description}\n\nPersonality: {personality}".strip()
    if not description:
        raise CardError("data.description and data.personality are both empty")
    greeting = _text(data, "first_mes")
    if not greeting:
        alternates = data.get("alternate_greetings") or []
        greeting = next((g.strip() for g in alternates if isinstance(g, str) and g.strip()), "")
    if not greeting:
        raise CardError("data.first_mes is empty: the persona needs a greeting")
    fields: dict[str, Any] = {
        "name": slug(name),
        "display_name": display,
        "description": description,
        "greeting": _macros(greeting, display, "there"),
    }
    scenario = _macros(_text(data, "scenario"), display)
    if scenario:
        fields["scenario"] = scenario
    examples = _examples(_text(data, "mes_example"), display)
    if examples:
        fields["examples"] = examples
    if display.lower() != name.lower():
        fields["aliases"] = [name]
    return fields


def _avatar_url(data: dict[str, Any]) -> str | None:
    """A V3 card's icon asset, when it is an https URL."""
    for asset in data.get("assets") or []:
        if isinstance(asset, dict) and asset.get("type") == "icon":
            uri = asset.get("uri")
            if isinstance(uri, str) and uri.startswith("https://"):
                return uri
    return None


def _header(data: dict[str, Any], source: Path) -> str:
    lines = [f"# Imported from the character card {source.name}."]
    creator = _text(data, "creator")
    if creator:
        lines.append(f"# Creator: {creator}")
    notes = _text(data, "creator_notes")
    if notes:
        lines.append("# Creator notes:")
        lines += [f"#   {line}".rstrip() for line in notes.splitlines()]
    dropped = [k for k in ("system_prompt", "post_history_instructions") if _text(data, k)]
    if dropped:
        lines.append(f"# Not imported (write them as rules if you want them): {', '.join(dropped)}")
    return "\n".join(lines) + "\n"


def import_card(source: Path, directory: Path, *, force: bool = False) -> ImportedPersona:
    """Write `directory/NAME.yaml` (and the avatar and lorebook beside it) from a card."""
    card, picture = read_card(source)
    data = card_data(card)
    fields = persona_fields(data)
    name = fields["name"]
    target = directory / f"{name}.yaml"
    files: dict[Path, bytes] = {}
    if picture is not None:
        fields["avatar"] = f"{name}.png"
        files[directory / f"{name}.png"] = picture
    elif (url := _avatar_url(data)) is not None:
        fields["avatar"] = url
    book = data.get("character_book")
    if isinstance(book, dict) and book:
        files[directory / f"{name}.lorebook.json"] = json.dumps(book, indent=2).encode()
    body = yaml.safe_dump(fields, sort_keys=False, allow_unicode=True, width=100)
    files = {target: (_header(data, source) + body).encode(), **files}
    existing = [p for p in files if p.exists()]
    if existing and not force:
        shown = ", ".join(p.name for p in existing)
        raise CardError(f"{shown} already exists in {directory}; use --force to replace it")
    _validate(files, target)
    for path, content in files.items():
        path.write_bytes(content)
    return ImportedPersona(name, target, list(files))


def _validate(files: dict[Path, bytes], target: Path) -> None:
    """Validate the YAML like any persona file (its avatar beside it) before writing anything."""
    with tempfile.TemporaryDirectory() as scratch:
        for path, content in files.items():
            (Path(scratch) / path.name).write_bytes(content)
        try:
            load_persona_file(Path(scratch) / target.name)
        except PersonaFileError as exc:
            problems = "; ".join(problem.render(target) for problem in exc.problems)
            raise CardError(f"the card does not make a valid persona: {problems}") from None
