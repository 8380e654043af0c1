"""The reply pipeline every platform shares.

Owns: the engine (one `Incoming` in, a stream of events out), events, conversation history,
prompts, personas, attention (when to speak unasked), the command layer, the model-call log,
per-conversation locks and background work.

May import: `bot.config`, `bot.db`, `bot.errors`, and the brains interface (`bot.brains.base`).
Capabilities (safety, memory, images, spend) reach the engine as objects `bot.app` hands it.
"""
