"""Settings: the only place the environment (and `.env`) is read.

Every setting is documented in the README's configuration table; keep the two in step.
Secrets are `SecretStr` so that `repr()`, logs and error messages never show them.
"""

from __future__ import annotations

import json
import shlex
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import BaseModel, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("personabot"))


class GuardFailPolicy(BaseModel):
    """What to do when Llama Guard gives no verdict, per platform (GUARD_FAIL_POLICY__CONSOLE)."""

    console: Literal["open", "closed"] = "open"  # the operator's own terminal
    discord: Literal["open", "closed"] = "closed"
    matrix: Literal["open", "closed"] = "closed"
    default: Literal["open", "closed"] = "closed"  # any other platform

    def for_platform(self, platform: str) -> Literal["open", "closed"]:
        known = {"console": self.console, "discord": self.discord, "matrix": self.matrix}
        return known.get(platform, self.default)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )

    # Storage
    database_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL; unset starts the embedded server in DATA_DIR.",
    )
    data_dir: Path = Field(default_factory=_default_data_dir)

    # Content
    personas_dir: Path = REPO_ROOT / "personas"
    prompts_dir: Path = REPO_ROOT / "prompts"
    migrations_dir: Path = REPO_ROOT / "migrations"
    default_persona: str | None = None
    personas_reload_interval: float = 1.0

    # Models
    ollama_host: str = "http://127.0.0.1:11434"
    ollama_connect_timeout: float = 3.0
    ollama_read_timeout: float = 120.0
    ollama_keep_alive: str = "10m"
    local_model_enabled: bool = True
    local_model_path: Path | None = None
    local_model_threads: int = 2
    local_model_context: int = 2048
    local_model_repeat_penalty: float = 1.3
    local_model_worker_command: Command = Field(
        default=None,
        description="the command that runs the local model's worker process; unset: "
        "`python -P bot/brains/local_worker.py` with this Python",
    )
    local_model_worker_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds the local model's worker may stay silent (loading, or between two "
        "tokens) before it is taken for hung, killed and replaced",
    )
    log_prompts: bool = False

    # Backend pool (issue 6): ordered Ollama backends woken on demand, stopped when idle
    backends: list[dict[str, Any]] | None = Field(
        default=None, description="JSON list of backends; unset: one always-on at OLLAMA_HOST"
    )
    backends_file: Path | None = Field(default=None, description="YAML file with the backends")
    backend_idle_stop: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"  # or seconds
    backend_idle_check_interval: float = Field(default=10.0, gt=0)
    backend_wake_timeout: float = Field(default=180.0, gt=0)
    backend_wake_poll: float = Field(default=2.0, gt=0)
    backend_breaker_base: float = Field(default=5.0, gt=0)
    backend_breaker_max: float = Field(default=300.0, gt=0)
    backend_queue_wait: float = Field(default=600.0, gt=0)  # persona fallback "queue"
    fly_api_url: str = "https://api.machines.dev"

    # Long-term memory (issue 5): facts per user in pgvector, recalled into the prompt
    memory_enabled: bool = True
    memory_embed_model: str = Field(default="nomic-embed-text", description="Ollama model")
    memory_local_embeddings: bool = Field(
        default=True, description="embed with the shipped SmolLM2 GGUF when Ollama is down"
    )
    memory_top_k: int = Field(default=5, ge=1, le=50)
    memory_min_similarity: float = Field(default=0.45, ge=-1.0, le=1.0)
    memory_recency_weight: float = Field(default=0.05, ge=0.0, le=1.0)
    memory_recency_half_life_days: float = Field(default=30.0, gt=0)

    # Spend ledger (issue 7): monthly budgets, the soft alert and the degrade ladder
    budget_monthly_usd: Decimal | None = Field(
        default=None, ge=0, description="global monthly cap in US dollars; unset: no cap"
    )
    budget_kind_caps: dict[str, Decimal] = Field(
        default_factory=dict, description='units per kind per month, e.g. {"image": 300}'
    )
    budget_user_caps: dict[str, Decimal] = Field(
        default_factory=dict, description='units per kind per user per month, e.g. {"image": 20}'
    )
    budget_guild_caps: dict[str, Decimal] = Field(
        default_factory=dict, description="units per kind per guild or Matrix server per month"
    )
    budget_alert_fraction: Decimal = Field(default=Decimal("0.8"), gt=0, le=1)
    budget_degrade_at: list[Decimal] = Field(
        default_factory=lambda: [Decimal("0.75"), Decimal("0.9"), Decimal("0.98")],
        min_length=3,
        max_length=3,
        description="fractions of BUDGET_MONTHLY_USD: free backends only, local only, no paid",
    )

    # Llama Guard moderation (issue 4): checks every message in and every reply out
    guard_enabled: bool = True
    guard_model: str = "llama-guard3:1b"
    guard_host: str | None = Field(default=None, description="unset: OLLAMA_HOST")
    guard_timeout: float = Field(default=10.0, gt=0, description="seconds; slower is unknown")
    guard_fail_policy: GuardFailPolicy = Field(default_factory=GuardFailPolicy)
    guard_stream_mode: Literal["whole", "paragraph"] = "whole"
    guard_keep_text: bool = False
    guard_alerts: bool = True

    # Logging
    log_level: str | None = Field(
        default=None, description="stderr log level; unset: ERROR for chat, WARNING otherwise"
    )
    log_file: bool = True

    # Operations (issue 10): structured logs, the /healthz and /metrics server of `run`
    log_format: Literal["text", "json"] = "text"
    web_enabled: bool = True
    web_host: str = Field(default="127.0.0.1", description="0.0.0.0 inside the container")
    web_port: int = Field(default=8080, ge=0, le=65535)

    # Platform credentials (adapters arrive in later issues)
    discord_token: SecretStr | None = None
    matrix_homeserver: str | None = None
    matrix_user_id: str | None = None
    matrix_password: SecretStr | None = None
    matrix_access_token: SecretStr | None = None
    fal_key: SecretStr | None = None
    fly_api_token: SecretStr | None = None

    # Images (issue 8): /imagine with Fal Flux; the key is FAL_KEY above, prices are the ledger's
    image_default_model: Literal["schnell", "dev"] = "schnell"
    image_timeout: float = Field(default=120.0, gt=0, description="seconds for one picture")
    image_poll_interval: float = Field(default=0.5, gt=0)
    image_download_timeout: float = Field(default=30.0, gt=0)
    image_max_bytes: int = Field(default=20_000_000, gt=0)
    image_rate_per_minute: float = Field(default=2.0, ge=0, description="per user; 0: no limit")
    image_rate_burst: int = Field(default=3, ge=0)
    image_monthly_cap: int = Field(default=50, ge=0, description="per user per month; 0: none")

    # Matrix adapter (issue 9); login is MATRIX_HOMESERVER/_USER_ID/_PASSWORD/_ACCESS_TOKEN above
    matrix_device_name: str = "personabot"
    matrix_allowed_inviters: str = Field(
        default="", description="comma-separated user ids or server names; '*' anyone"
    )
    matrix_admins: str = Field(default="", description="comma-separated user ids")
    matrix_msgtype: Literal["m.notice", "m.text"] = "m.notice"
    matrix_stream: bool = True
    matrix_edit_interval: float = Field(default=1.0, ge=1.0)
    matrix_answer_dms: bool = True
    matrix_answer_bots: bool = False
    matrix_rate_per_minute: float = 6.0
    matrix_rate_burst: int = 5
    matrix_admin_room: str | None = None
    matrix_sync_timeout: float = 30.0
    matrix_encryption: bool = False

    # Discord adapter (issue 3); the bot token is DISCORD_TOKEN above. ID lists: "1,2,3"
    discord_sharded: bool = Field(default=False, description="use an AutoShardedClient")
    discord_shard_count: int | None = Field(default=None, ge=1, description="unset: Discord's")
    discord_command_guilds: DiscordIds = Field(
        default_factory=list, description="sync slash commands to these guilds; empty: globally"
    )
    discord_admin_users: DiscordIds = Field(default_factory=list)
    discord_admin_roles: DiscordIds = Field(default_factory=list)
    discord_allowed_channels: DiscordIds = Field(default_factory=list, description="empty: all")
    discord_blocked_channels: DiscordIds = Field(default_factory=list)
    discord_allowed_roles: DiscordIds = Field(default_factory=list, description="empty: all")
    discord_blocked_roles: DiscordIds = Field(default_factory=list)
    discord_allowed_users: DiscordIds = Field(default_factory=list, description="empty: all")
    discord_blocked_users: DiscordIds = Field(default_factory=list)
    discord_listen_channels: DiscordIds = Field(
        default_factory=list, description="channels where the persona reads every message"
    )
    discord_answer_dms: bool = True
    discord_answer_bots: bool = False
    discord_edit_interval: float = Field(default=1.0, ge=0.2)
    discord_attachment_max_bytes: int = Field(default=32_000, ge=0)
    discord_rate_per_minute: float = Field(default=6.0, ge=0)
    discord_rate_burst: int = Field(default=5, ge=0)
    discord_admin_channel: int | None = Field(default=None, description="admin notices go here")
    discord_shutdown_grace: float = Field(default=15.0, ge=0, le=18, description="runner: 20 s")

    def secret_values(self) -> list[str]:
        """Every configured secret, for the log redaction filter."""
        values: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                raw = value.get_secret_value()
                if raw:
                    values.append(raw)
        return values

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"
