"""The backend list as configured (`BACKENDS` JSON or the YAML file `BACKENDS_FILE`).

    - name: fly-l40s                      # provider name in the ledger and model_calls
      url: https://my-ollama.fly.dev      # Ollama base URL
      models: [llama3.2:3b]               # empty or omitted: any model
      cost: {usd_per_gpu_hour: 0.70}      # or {watts: 250, usd_per_kwh: 0.30}
      wake: {driver: fly, app: my-ollama, machine: 3d8d9…}
      idle_stop: auto                     # seconds idle before it is stopped, or auto
      max_context: 8192                   # prompts (plus the reply) longer than this skip it
      billing_minimum: 60                 # seconds the provider bills a session at least (0)

    - name: api                           # any OpenAI-compatible server (vLLM, llama.cpp's
      kind: openai                        #   server, LM Studio, a hosted API)
      url: https://api.example.net/v1     # the base URL, /v1 included
      api_key_env: MY_API_KEY             # the variable holding the key (never the key itself)
      models: {llama3.2:3b: meta-llama/llama-3.2-3b-instruct}   # persona tag -> server's id
      cost: {usd_per_million_input_tokens: 0.05, usd_per_million_output_tokens: 0.08}

Unset, the pool is one always-on backend at `OLLAMA_HOST`: the behaviour before pools existed.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bot.errors import ConfigError

_SECONDS_PER_HOUR = Decimal(3600)
_WATTS_PER_KW = Decimal(1000)
_MILLION = Decimal(1_000_000)


class Cost(BaseModel):
    model_config = ConfigDict(extra="forbid")

    usd_per_gpu_hour: Decimal | None = Field(default=None, ge=0)
    watts: Decimal | None = Field(default=None, ge=0)
    usd_per_kwh: Decimal | None = Field(default=None, ge=0)
    usd_per_million_input_tokens: Decimal | None = Field(default=None, ge=0)
    usd_per_million_output_tokens: Decimal | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_way(self) -> Cost:
        by_power = self.watts is not None or self.usd_per_kwh is not None
        if self.usd_per_gpu_hour is not None and by_power:
            raise ValueError("give usd_per_gpu_hour, or watts with usd_per_kwh, not both")
        if by_power and (self.watts is None or self.usd_per_kwh is None):
            raise ValueError("watts and usd_per_kwh go together")
        by_token = (self.usd_per_million_input_tokens, self.usd_per_million_output_tokens)
        if (by_token[0] is None) != (by_token[1] is None):
            raise ValueError(
                "usd_per_million_input_tokens and usd_per_million_output_tokens go together"
            )
        return self

    def usd_per_token(self) -> tuple[Decimal, Decimal]:
        """(input, output) dollars per token; zero for a backend not billed per token."""
        per_in = self.usd_per_million_input_tokens or Decimal(0)
        per_out = self.usd_per_million_output_tokens or Decimal(0)
        return per_in / _MILLION, per_out / _MILLION

    def usd_per_second(self) -> Decimal:
        if self.usd_per_gpu_hour is not None:
            return self.usd_per_gpu_hour / _SECONDS_PER_HOUR
        if self.watts is not None and self.usd_per_kwh is not None:
            return self.watts / _WATTS_PER_KW * self.usd_per_kwh / _SECONDS_PER_HOUR
        return Decimal(0)


class NoWakeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    driver: Literal["none"] = "none"


class FlyWakeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    driver: Literal["fly"]
    app: str
    machine: str
    api_url: str | None = None  # default: the FLY_API_URL setting
    suspend: bool = False  # suspend instead of stop (resumes in well under a second)


class WolWakeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    driver: Literal["wol"]
    mac: str
    broadcast: str = "255.255.255.255"
    port: int = Field(default=9, ge=1, le=65535)
    stop_command: list[str] | None = None  # e.g. [ssh, gpu-box, sudo, systemctl, suspend]


class CommandWakeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    driver: Literal["command"]
    start: list[str] = Field(min_length=1)
    stop: list[str] | None = None
    timeout: float = Field(default=120.0, gt=0)


WakeSpec = Annotated[
    NoWakeSpec | FlyWakeSpec | WolWakeSpec | CommandWakeSpec, Field(discriminator="driver")
]


class BackendSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    kind: Literal["ollama", "openai"] = "ollama"
    url: str
    # A list of persona model tags; for `openai`, also a mapping tag -> the server's model id.
    models: list[str] | dict[str, str] = Field(default_factory=list)
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    cost: Cost = Field(default_factory=Cost)
    wake: WakeSpec = Field(default_factory=NoWakeSpec)
    idle_stop: Annotated[float, Field(gt=0)] | Literal["auto"] | None = None  # None: setting
    billing_minimum: float = Field(default=0.0, ge=0)  # seconds; auto counts it in a restart
    keep_alive: str | float | None = None
    max_context: int | None = Field(default=None, gt=0)  # tokens: longer requests skip it

    @model_validator(mode="after")
    def _fits_kind(self) -> BackendSpec:
        if self.kind == "ollama":
            if isinstance(self.models, dict):
                raise ValueError("models: a mapping of model ids is for kind: openai")
            if self.api_key_env is not None:
                raise ValueError("api_key_env: is for kind: openai")
            if self.cost.usd_per_million_input_tokens is not None:
                raise ValueError("cost: per-token prices are for kind: openai")
        elif self.keep_alive is not None:
            raise ValueError("keep_alive: is for kind: ollama")
        return self

    def model_ids(self) -> dict[str, str]:
        """Persona model tag -> the id the server knows it by (the tag itself from a list)."""
        if isinstance(self.models, dict):
            return dict(self.models)
        return {m: m for m in self.models}


def parse_backends(raw: Any, source: str) -> list[BackendSpec]:
    """Validate a list of backends; errors name the source, the entry and the field."""
    if isinstance(raw, dict) and "backends" in raw:
        raw = raw["backends"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{source}: expected a non-empty list of backends")
    specs: list[BackendSpec] = []
    for index, entry in enumerate(raw):
        try:
            specs.append(BackendSpec.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"{source}: backend {index + 1}: {problems}") from None
    return specs


def load_backends(
    inline: list[dict[str, Any]] | str | None, path: Path | None
) -> list[BackendSpec] | None:
    """The configured list, or None when neither `BACKENDS` nor `BACKENDS_FILE` is set."""
    if inline:
        data = json.loads(inline) if isinstance(inline, str) else inline
        return parse_backends(data, "BACKENDS")
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"BACKENDS_FILE {path}: cannot be read ({exc})") from None
        return parse_backends(data, str(path))
    return None
