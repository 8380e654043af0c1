"""Discord: the gateway adapter, slash commands, channel policy, rendering and replies.

Translation only: Discord events become `Incoming`, engine events become messages.
May import: `bot.core`, the capabilities' commands, `bot.app`.
"""
