"""The value types of bot/config.py's settings, and how they are read from the environment:
Discord id lists and commands as plain words or JSON, the guard's fail policy per platform,
and the API key variables the backends name."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_settings import NoDecode


def _split_ids(value: object) -> object:
    """'1, 2,3' → [1, 2, 3] for the Discord ID lists (a JSON list works too)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [int(part) for part in text.split(",") if part.strip()]
    return value


DiscordIds = Annotated[list[int], NoDecode, BeforeValidator(_split_ids)]


def _split_command(value: object) -> object:
    """'python -m x' (shell words) or '["python", "-m", "x"]' (JSON) → a list of arguments."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        return json.loads(text) if text.startswith("[") else shlex.split(text)
    return value


Command = Annotated[list[str] | None, NoDecode, BeforeValidator(_split_command)]


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("personabot"))


class GuardFailPolicy(BaseModel):
    """What to do when Llama Guard gives no verdict, per platform (GUARD_FAIL_POLICY__CONSOLE)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    console: Literal["open", "closed"] = "open"  # the operator's own terminal
    """with no verdict in the terminal: `open` answers with a notice, `closed` refuses"""
    discord: Literal["open", "closed"] = "closed"
    """the same, for Discord"""
    matrix: Literal["open", "closed"] = "closed"
    """the same, for Matrix"""
    default: Literal["open", "closed"] = "closed"  # any other platform
    """the same, for any other platform"""

    def for_platform(self, platform: str) -> Literal["open", "closed"]:
        known = {"console": self.console, "discord": self.discord, "matrix": self.matrix}
        return known.get(platform, self.default)


def backend_key_variables(backends: Any, backends_file: Path | None) -> list[str]:
    """The variables the backends' `api_key_env` name (BACKENDS or BACKENDS_FILE)."""
    entries: Any = backends
    if not entries and backends_file is not None:
        try:
            entries = yaml.safe_load(backends_file.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return []  # the pool reports the file's problem when it is built
    if isinstance(entries, dict):
        entries = entries.get("backends")
    if not isinstance(entries, list):
        return []
    names = [e.get("api_key_env") for e in entries if isinstance(e, dict)]
    return [n for n in names if isinstance(n, str)]
