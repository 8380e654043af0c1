"""Settings: the only place the environment (and `.env`) is read.

Every setting is documented in the README's configuration table; keep the two in step.
Secrets are `SecretStr` so that `repr()`, logs and error messages never show them.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("personabot"))


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
    log_prompts: bool = False

    # Logging
    log_level: str | None = Field(
        default=None, description="stderr log level; unset: ERROR for chat, WARNING otherwise"
    )
    log_file: bool = True

    # Platform credentials (adapters arrive in later issues)
    discord_token: SecretStr | None = None
    matrix_homeserver: str | None = None
    matrix_user_id: str | None = None
    matrix_password: SecretStr | None = None
    matrix_access_token: SecretStr | None = None
    fal_key: SecretStr | None = None
    fly_api_token: SecretStr | None = None

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
