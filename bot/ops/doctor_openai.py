"""Doctor checks for an OpenAI-compatible backend (`kind: openai`): `GET /v1/models` with its
key says whether the key works, whether each mapped model id exists there, and which of the
models the personas (and memory, and the guard) need it can serve."""

from __future__ import annotations

from bot.brains.build import api_key_for
from bot.brains.openai_brain import OpenAIBrain
from bot.brains.pool import normalize_model
from bot.brains.spec import BackendSpec
from bot.config import Settings
from bot.errors import ConfigError, ModelUnavailable
from bot.ops.diagnostics import Check

LIST_TIMEOUT = 5.0


async def served_models(spec: BackendSpec, settings: Settings) -> set[str] | str:
    """The model ids the server lists, or why it could not be asked (never the key)."""
    try:
        key = api_key_for(spec, settings)
    except ConfigError as exc:
        return str(exc).split(": ", 1)[-1]
    brain = OpenAIBrain(
        spec.url,
        name=spec.name,
        api_key=key,
        key_source=spec.api_key_env,
        connect_timeout=LIST_TIMEOUT,
        read_timeout=LIST_TIMEOUT,
    )
    try:
        return set(await brain.served_models())
    except ModelUnavailable as exc:
        return str(exc).split(": ", 1)[-1]
    finally:
        await brain.aclose()


def openai_check(
    name: str, spec: BackendSpec, result: set[str] | str, needed: dict[str, str]
) -> tuple[Check, set[str] | None]:
    """The backend's row, and the (normalised) persona model tags it can serve, if it answered."""
    label = f"backend {name}"
    if isinstance(result, str):
        fix = f"check the URL {spec.url} (it ends in /v1)"
        if "API key" in result or "not set" in result:
            fix = f"set a working key in {spec.api_key_env or 'api_key_env'}"
        return Check("FAIL", label, result, fix), None
    listed = set(result)
    ids = {normalize_model(tag): served for tag, served in spec.model_ids().items()}
    if ids:
        missing = sorted(f"{sid} (for {tag})" for tag, sid in ids.items() if sid not in listed)
        served_tags = {tag for tag, served in ids.items() if served in listed}
    else:  # no mapping: persona tags are sent as they are
        missing = []
        served_tags = {normalize_model(m) for m in listed}
    if missing:
        detail = f"the key works, but it lists no model {', '.join(missing)}"
        fix = "use ids from its GET /v1/models in the backend's `models`"
        return Check("FAIL", label, detail, fix), served_tags
    can = sorted(m for m in needed if normalize_model(m) in served_tags)
    if not can:
        detail = f"answers ({len(listed)} models listed) but serves none of the personas' models"
        return Check("warn", label, detail, "map a persona's model to one of its ids"), served_tags
    return Check("ok", label, f"key accepted; serves {', '.join(can)}"), served_tags
