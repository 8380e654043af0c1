"""Llama Guard moderation: the prompt format, verdicts, the content categories, and the
moderation step the engine runs on what comes in and what goes out.

Owns: `guard` (calls the model, parses verdicts), `categories` (S1-S14), `moderation` (policy).
May import: `bot.core` types (personas, calls), `bot.brains`, `bot.ops.notify`, config, errors.
"""
