"""The backend list as configured (`BACKENDS` JSON or the YAML file `BACKENDS_FILE`).

    - name: fly-l40s                      # provider name in the ledger and model_calls
      url: https://my-ollama.fly.dev      # Ollama base URL
      models: [llama3.2:3b]               # empty or omitted: any model
      cost: {usd_per_gpu_hour: 0.70}      # or {watts: 250, usd_per_kwh: 0.30}
      wake: {driver: fly, app: my-ollama, machine: 3d8d9…}
      idle_stop: auto                     # seconds idle before it is stopped, or auto
      billing_minimum: 60                 # seconds the provider bills a session at least (0)

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


class Cost(BaseModel):
    model_config = ConfigDict(extra="forbid")

    usd_per_gpu_hour: Decimal | None = Field(default=None, ge=0)
    watts: Decimal | None = Field(default=None, ge=0)
    usd_per_kwh: Decimal | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_way(self) -> Cost:
        by_power = self.watts is not None or self.usd_per_kwh is not None
        if self.usd_per_gpu_hour is not None and by_power:
            raise ValueError("give usd_per_gpu_hour, or watts with usd_per_kwh, not both")
        if by_power and (self.watts is None or self.usd_per_kwh is None):
            raise ValueError("watts and usd_per_kwh go together")
        return self

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
    url: str
    models: list[str] = Field(default_factory=list)
    cost: Cost = Field(default_factory=Cost)
    wake: WakeSpec = Field(default_factory=NoWakeSpec)
    idle_stop: Annotated[float, Field(gt=0)] | Literal["auto"] | None = None  # None: setting
    billing_minimum: float = Field(default=0.0, ge=0)  # seconds; auto counts it in a restart
    keep_alive: str | float | None = None


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
