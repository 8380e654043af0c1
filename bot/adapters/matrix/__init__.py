"""Matrix: the matrix-nio adapter, `!` commands, room state, rendering and messages.

Translation only: room events become `Incoming`, engine events become messages and edits.
May import: `bot.core`, the capabilities' commands, `bot.app`.
"""
