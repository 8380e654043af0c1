"""Llama Guard: the prompt format (Meta's, built by us and sent raw), the model call, verdicts
and their records, and the guard as the pipeline's moderation step is built with it.

Owns: `guard` (calls the model, parses verdicts, records them), `prompt`, `verdict`,
`moderation` (builds the guard and the core's moderation around it; vets memories).
May import: `bot.core` (personas, calls, categories, verdicts, the moderation step), `bot.brains`,
`bot.ops.notify`, config, errors. The core never imports this package.
"""
