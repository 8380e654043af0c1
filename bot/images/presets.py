"""What a picture can be: Fal's Flux models, our size presets, how Fal counts megapixels, the
persona's style added to a prompt, and the usage line the commands show."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODELS = {"schnell": "fal-ai/flux/schnell", "dev": "fal-ai/flux/dev"}
MEGAPIXEL = 1024 * 1024  # Fal bills a 1024x1024 picture as one megapixel


@dataclass(frozen=True)
class SizePreset:
    fal_name: str
    width: int
    height: int


SIZES = {
    "square": SizePreset("square_hd", 1024, 1024),
    "portrait": SizePreset("portrait_4_3", 768, 1024),
    "landscape": SizePreset("landscape_4_3", 1024, 768),
}
USAGE = "imagine PROMPT [size:square|portrait|landscape] [model:schnell|dev] [seed:N]"
MAX_PROMPT_CHARS = 1000  # the member's (or the model's) words, before the persona's style


def megapixels(width: int, height: int) -> int:
    """Billed megapixels: Fal rounds up to whole megapixels."""
    return max(1, math.ceil(width * height / MEGAPIXEL))


def with_style(prompt: str, style: str) -> str:
    style = style.strip()
    return f"{prompt.strip()}, {style}" if style else prompt.strip()
