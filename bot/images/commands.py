"""The `imagine` command: Discord `/imagine`, Matrix `!imagine`, the terminal's `/imagine`.

Arguments are words of the prompt plus optional `size:`, `model:` and `seed:` words (Discord's
options arrive as `prompt:…`, `size:…`). The result carries the picture as a file attachment,
spoilered when it was drawn without Fal's safety checker (IMAGE_NSFW_SAFETY_CHECKER_OFF in a
channel marked NSFW).
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.core.commands import CommandContext, CommandResult, Commands
from bot.errors import CommandError
from bot.images.presets import MAX_PROMPT_CHARS, MODELS, SIZES, USAGE
from bot.images.service import ImageRequest, ImageService

_SHORT = {endpoint: name for name, endpoint in MODELS.items()}


@dataclass(frozen=True)
class ImagineOptions:
    prompt: str
    size: str = "square"
    model: str | None = None
    seed: int | None = None


def parse_imagine_args(args: list[str]) -> ImagineOptions:
    """`a red fox size:portrait model:dev seed:7` → options. Raises CommandError with usage."""
    words: list[str] = []
    options: dict[str, str] = {}
    for arg in args:
        key, value = _option(arg)
        if key == "prompt":
            words.append(value)  # as written: "prompt:E=mc2" draws "E=mc2"
        elif key is not None:
            options[key] = value.strip().lower()
        else:
            words.append(arg)
    prompt = " ".join(w for w in words if w.strip()).strip()
    if not prompt:
        raise CommandError(f"Tell me what to draw. Usage: {USAGE}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise CommandError(f"That's a long prompt: keep it under {MAX_PROMPT_CHARS} characters.")
    size = options.get("size", "square")
    if size not in SIZES:
        raise CommandError(f"Size must be one of {', '.join(SIZES)}. Usage: {USAGE}")
    model = options.get("model")
    if model is not None and model not in MODELS and model not in MODELS.values():
        raise CommandError(f"Model must be one of {', '.join(MODELS)}. Usage: {USAGE}")
    seed: int | None = None
    if "seed" in options:
        try:
            seed = int(options["seed"])
        except ValueError:
            raise CommandError(f"The seed must be a whole number. Usage: {USAGE}") from None
        if not 0 <= seed < 2**31:
            raise CommandError("The seed must be between 0 and 2147483647.")
    return ImagineOptions(prompt, size, model, seed)


def _option(word: str) -> tuple[str | None, str]:
    """("size", "portrait") for `size:portrait` or `size=portrait`; (None, word) for a word
    of the prompt, such as "E=mc2" or a bare "size:" ("shoe size: 10")."""
    cut = min((i for i in (word.find(":"), word.find("=")) if i >= 0), default=-1)
    if cut < 0:
        return None, word
    key, value = word[:cut].lower(), word[cut + 1 :]
    if key not in ("size", "model", "seed", "prompt") or not value.strip():
        return None, word
    return key, value


def register_imagine_command(commands: Commands, images: ImageService) -> None:
    async def imagine(context: CommandContext, args: list[str]) -> CommandResult:
        options = parse_imagine_args(args)
        persona = await commands.engine.persona_for(context.platform, context.conversation)
        result = await images.generate(
            ImageRequest(
                platform=context.platform,
                conversation=context.conversation,
                author_id=context.author_id,
                prompt=options.prompt,
                persona=persona,
                size=options.size,
                model=options.model,
                seed=options.seed,
                nsfw_allowed=context.nsfw,
                guild=context.guild,
                progress=context.progress,
            )
        )
        model = _SHORT.get(result.model, result.model)
        text = (
            f"{persona.display_name} drew “{options.prompt}” "
            f"({result.size}, {model}, seed {result.seed})"
        )
        return CommandResult(text, attachment=result.path, spoiler=result.spoiler)

    commands.register("imagine", USAGE, "draw a picture in this persona's style", imagine)
