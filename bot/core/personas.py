"""A persona: what one YAML file in `personas/` may say, and how each field is checked.

Reading the files, naming the line of a problem, and hot reload are bot/core/persona_files.py.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from bot.core.categories import CATEGORIES as GUARD_CATEGORIES
from bot.core.categories import normalize_code

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
PERSONA_SUFFIXES = frozenset({".yaml", ".yml"})


class Persona(BaseModel):
    """One persona, exactly as written in its YAML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    display_name: str
    description: str
    prompt_template: str = "system.j2"
    model: str = "llama3.2:3b"
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    context_window: int = Field(default=4096, ge=512, le=131072)
    max_reply_tokens: int = Field(default=400, ge=16, le=8192)
    greeting: str
    image_style: str = ""
    repeat_penalty: float = Field(default=1.1, ge=1.0, le=2.0)
    include_time: bool = False
    rules: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    # The situation the persona is in, and example exchanges that show its voice (both from
    # character cards; optional), written into the prompt after the description.
    scenario: str = ""
    examples: list[str] = Field(default_factory=list)
    # Its face: a picture file in personas/ or an https URL (optional).
    avatar: str = ""
    memory: bool = True  # long-term memory (issue 5): recall and learn facts about users
    # Where a fact is recalled (issue 15): "place", only where it was learned (a DM, a server,
    # a Matrix room, the terminal); "user", wherever the user talks to this persona.
    memory_scope: Literal["place", "user"] = "place"
    # A cast (issue 21): what this persona learns about a member is its own (other personas
    # do not recall it) unless it shares it with every persona; facts from before are shared.
    share_memories: bool = False
    # A cast (issue 21): its own monthly cap in US dollars over what it spends (pictures,
    # per-token APIs), with the bot's degrade ladder (BUDGET_DEGRADE_AT) and refusals; and its
    # own rate per member: messages a minute after a burst (0: no limit of its own).
    budget_usd_month: Decimal | None = Field(default=None, gt=0)
    rate_limit_per_minute: float = Field(default=0.0, ge=0.0)
    rate_limit_burst: int = Field(default=3, ge=1, le=100)
    draw: bool = True  # images (issue 8): the model may call the draw_image tool in chat
    # Attention (issue 3): after being addressed, keep following the conversation with a
    # probability starting at attention_start and falling to 0 over attention_window seconds.
    attention_window: float = Field(default=300.0, gt=0)
    attention_start: float = Field(default=0.6, ge=0.0, le=1.0)
    # A cast (issue 21): how many persona turns may follow one human message before this
    # persona stops answering other personas in the channel.
    max_persona_turns: int = Field(default=2, ge=0, le=10)
    # Backends (issue 6): when every backend for `model` is down, answer with the local CPU
    # model (with a notice), apologise, or queue: wait for one to come back (BACKEND_QUEUE_WAIT).
    fallback: Literal["local", "apologise", "queue"] = "local"
    # Llama Guard (issue 4): the categories (S1 to S14) that block for this persona (S4 always
    # does); whether an NSFW channel relaxes S12; an in-character line for refused messages.
    guard_block: list[str] = Field(default_factory=lambda: list(GUARD_CATEGORIES))
    allow_nsfw: bool = False
    refusal: str = ""

    def __hash__(self) -> int:
        # The default frozen hash fails on the list fields; equal personas share a name.
        return hash((type(self), self.name))

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise PydanticCustomError(
                "persona_name",
                "must be a lowercase slug of a-z, 0-9, '_' and '-' (like 'mimi'), got {value!r}",
                {"value": value},
            )
        return value

    @field_validator("display_name", "description", "greeting", "model")
    @classmethod
    def _check_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("blank", "must not be empty")
        return value

    @field_validator("rules", "aliases")
    @classmethod
    def _check_items_not_blank(cls, value: list[str]) -> list[str]:
        if any(not item.strip() for item in value):
            raise PydanticCustomError("blank_item", "entries must not be empty")
        return value

    @field_validator("guard_block")
    @classmethod
    def _check_guard_block(cls, value: list[str]) -> list[str]:
        codes = [normalize_code(item) for item in value]
        wrong = [item for item, code in zip(value, codes, strict=True) if code is None]
        if wrong:
            raise PydanticCustomError(
                "guard_category",
                "unknown Llama Guard categories {wrong}; use codes S1 to S14",
                {"wrong": ", ".join(map(repr, wrong))},
            )
        return list(dict.fromkeys(code for code in codes if code is not None))

    @field_validator("avatar")
    @classmethod
    def _check_avatar(cls, value: str) -> str:
        if not value or value.startswith("https://"):
            return value
        picture = PurePosixPath(value)
        if picture.is_absolute() or ".." in picture.parts or "\\" in value or "/" in value:
            raise PydanticCustomError(
                "avatar", "must be a picture file in the personas directory or an https URL"
            )
        if picture.suffix.lower() not in {".png", ".jpg", ".jpeg", ".gif", ".webp"}:
            raise PydanticCustomError("avatar", "must be a .png, .jpg, .gif or .webp picture")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        template = PurePosixPath(value)
        if not value.strip() or template.is_absolute() or ".." in template.parts or "\\" in value:
            raise PydanticCustomError("template", "must be a file name in the prompts directory")
        return value

    @field_validator("max_reply_tokens")
    @classmethod
    def _check_reply_fits(cls, value: int, info: ValidationInfo) -> int:
        window = info.data.get("context_window")
        if isinstance(window, int) and value >= window / 2:
            raise PydanticCustomError(
                "reply_too_long",
                "must be less than half of context_window ({window}), got {value}",
                {"window": window, "value": value},
            )
        return value


def has_local_avatar(persona: Persona) -> bool:
    """The avatar is a picture file in the personas directory (not an https URL)."""
    return bool(persona.avatar) and not persona.avatar.startswith("https://")
