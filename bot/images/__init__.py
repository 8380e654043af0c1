"""Pictures: the image service behind `/imagine` and the draw_image tool, the Fal client,
the image store and its limits.

Owns: `service`, `fal`, `store`, `commands` (`/imagine`), `draw_tool`.
May import: `bot.spend`, `bot.safety`, `bot.core` types, config, errors.
"""
