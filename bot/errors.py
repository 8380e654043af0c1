"""Our error tree. Library errors (asyncpg, httpx, ollama, llama.cpp) are translated at the edge.

    BotError                      anything we raise on purpose; `.user_message` is safe to show
    ├── ConfigError               a setting is missing or inconsistent
    ├── PersonaError              a persona file is broken (names file, field and line)
    ├── StorageError              the database cannot be reached or refused a query
    │   └── MigrationError        a migration failed (names the file); nothing was applied
    ├── ModelError                a model call failed
    │   ├── ModelUnavailable      failed before the first token: try another backend
    │   └── ModelInterrupted      failed part-way through a reply
    └── CommandError              a command was used wrongly; the message says how to use it

`user_message(exc)` is the one place that turns any exception into words for a chat user:
known errors get their own plain sentence, anything else an apology. Raw exception text never
reaches a user because it may hold a prompt, a URL with a key, or SQL.
"""

from __future__ import annotations


class BotError(Exception):
    user_message: str = "Sorry, something went wrong on my side. Please try again in a moment."


class ConfigError(BotError):
    user_message = "The bot is not configured correctly; an admin needs to look at its logs."


class PersonaError(BotError):
    user_message = "That persona's file has an error; an admin needs to fix it."


class StorageError(BotError):
    user_message = "I can't reach my memory store right now. Please try again in a moment."


class MigrationError(StorageError):
    pass


class ModelError(BotError):
    user_message = "I couldn't think of a reply just now: my model isn't answering. Try again soon."


class ModelUnavailable(ModelError):
    pass


class ModelInterrupted(ModelError):
    user_message = "My reply was cut off because my model stopped answering. Please try again."


class CommandError(BotError):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.user_message = message


def user_message(exc: BaseException) -> str:
    """Plain words for a chat user, whatever went wrong."""
    if isinstance(exc, BotError):
        return exc.user_message
    return BotError.user_message
