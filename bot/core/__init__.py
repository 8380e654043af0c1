"""The reply pipeline every platform shares.

Owns: the engine (one `Incoming` in, a stream of events out), events, conversation history,
prompts, personas and the content categories they enforce, casts and character cards, attention
(when to speak unasked), the command layer, the model-call log, the moderation step (input gate,
output screen, refusals) and its verdicts, the process's own metrics, per-conversation locks and
background work.

May import: `bot.errors`, `bot.config`, `bot.db`, and the brains interface (`bot.brains`).
Never a capability: safety, memory, images and spend reach the engine as objects bot/app.py
hands it, typed by the interfaces in `ports.py` (memory, the draw tool) and
`moderation.GuardPort` (the guard). tests/test_layout.py keeps it so.
"""
