"""Build the backend pool from settings: `BACKENDS` / `BACKENDS_FILE`, or plain `OLLAMA_HOST`."""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import SecretStr

from bot.brains.breaker import CircuitBreaker
from bot.brains.idle import AutoIdle
from bot.brains.ollama_brain import OllamaBrain
from bot.brains.openai_brain import Alert, OpenAIBrain
from bot.brains.pool import Backend, BackendPool, PoolBrain, normalize_model
from bot.brains.sessions import SessionStore
from bot.brains.spec import (
    BackendSpec,
    CommandWakeSpec,
    FlyWakeSpec,
    WolWakeSpec,
    load_backends,
)
from bot.brains.wake import CommandWake, FlyWake, NoWake, WakeDriver, WolWake
from bot.config import Settings
from bot.errors import ConfigError

# A woken machine keeps its model loaded until we stop it: the GPU is paid for anyway.
_KEEP_LOADED = -1


def _idle_stop(value: float | str) -> float | None:
    return None if value == "auto" else float(value)


def backend_specs(settings: Settings) -> list[BackendSpec]:
    specs = load_backends(settings.backends, settings.backends_file)
    if specs is None:
        return [BackendSpec(url=settings.ollama_host)]
    return specs


def build_driver(spec: BackendSpec, settings: Settings) -> WakeDriver:
    wake = spec.wake
    if isinstance(wake, FlyWakeSpec):
        if settings.fly_api_token is None:
            raise ConfigError(
                f"backend {spec.name or spec.url}: the fly driver needs FLY_API_TOKEN"
            )
        return FlyWake(
            app=wake.app,
            machine=wake.machine,
            token=settings.fly_api_token,
            api_url=wake.api_url or settings.fly_api_url,
            suspend=wake.suspend,
        )
    if isinstance(wake, WolWakeSpec):
        try:
            return WolWake(
                mac=wake.mac,
                broadcast=wake.broadcast,
                port=wake.port,
                stop_command=wake.stop_command,
            )
        except ValueError as exc:
            raise ConfigError(f"backend {spec.name or spec.url}: wake.mac: {exc}") from None
    if isinstance(wake, CommandWakeSpec):
        return CommandWake(start=wake.start, stop=wake.stop, timeout=wake.timeout)
    return NoWake()


def api_key_for(spec: BackendSpec, settings: Settings) -> SecretStr | None:
    if spec.api_key_env is None:
        return None
    key = settings.api_key(spec.api_key_env)
    if key is None:
        raise ConfigError(
            f"backend {spec.name or spec.url}: api_key_env names {spec.api_key_env},"
            " which is not set"
        )
    return key


def build_brain(
    spec: BackendSpec, settings: Settings, *, always_on: bool, alert: Alert | None = None
) -> PoolBrain:
    if spec.kind == "openai":
        return OpenAIBrain(
            spec.url,
            name=spec.name,
            api_key=api_key_for(spec, settings),
            key_source=spec.api_key_env,
            model_ids={normalize_model(tag): served for tag, served in spec.model_ids().items()},
            usd_per_token=spec.cost.usd_per_token(),
            connect_timeout=settings.ollama_connect_timeout,
            read_timeout=settings.ollama_read_timeout,
            bad_key_rest=settings.backend_bad_key_rest,
            alert=alert,
        )
    keep_alive = spec.keep_alive
    if keep_alive is None:
        keep_alive = settings.ollama_keep_alive if always_on else _KEEP_LOADED
    brain = OllamaBrain(
        spec.url,
        connect_timeout=settings.ollama_connect_timeout,
        read_timeout=settings.ollama_read_timeout,
        keep_alive=keep_alive,
    )
    if spec.name:
        brain.name = spec.name
    return brain


def build_backend(
    spec: BackendSpec,
    settings: Settings,
    clock: Callable[[], float] = time.monotonic,
    alert: Alert | None = None,
) -> Backend:
    driver = build_driver(spec, settings)
    brain = build_brain(spec, settings, always_on=driver.always_on, alert=alert)
    per_in, per_out = spec.cost.usd_per_token()
    return Backend(
        name=brain.name,
        brain=brain,
        driver=driver,
        models=frozenset(spec.model_ids()),
        usd_per_second=spec.cost.usd_per_second(),
        usd_per_input_token=per_in,
        usd_per_output_token=per_out,
        max_context=spec.max_context,
        idle_stop=_idle_stop(spec.idle_stop or settings.backend_idle_stop),
        auto=AutoIdle(billing_minimum=spec.billing_minimum),
        breaker=CircuitBreaker(
            base=settings.backend_breaker_base, cap=settings.backend_breaker_max, clock=clock
        ),
    )


def build_pool(
    settings: Settings,
    *,
    sessions: SessionStore | None = None,
    clock: Callable[[], float] = time.monotonic,
    alert: Alert | None = None,
) -> BackendPool:
    """The pool; `alert` reaches the admins (a backend refused its API key)."""
    specs = backend_specs(settings)
    backends = [build_backend(spec, settings, clock, alert) for spec in specs]
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ConfigError("BACKENDS: two backends share a name; give each a `name`")
    return BackendPool(
        backends,
        sessions=sessions,
        clock=clock,
        wake_timeout=settings.backend_wake_timeout,
        poll_interval=settings.backend_wake_poll,
    )
