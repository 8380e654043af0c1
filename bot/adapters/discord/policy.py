"""Who may talk to the bot where, and who is an admin, from the DISCORD_* ID settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bot.config import Settings


@dataclass(frozen=True)
class DiscordPolicy:
    admin_users: frozenset[int] = frozenset()
    admin_roles: frozenset[int] = frozenset()
    allowed_channels: frozenset[int] = frozenset()  # empty: every channel
    blocked_channels: frozenset[int] = frozenset()
    allowed_roles: frozenset[int] = frozenset()  # empty: every role (and none)
    blocked_roles: frozenset[int] = frozenset()
    allowed_users: frozenset[int] = frozenset()  # empty: everyone
    blocked_users: frozenset[int] = frozenset()
    listen_channels: frozenset[int] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> DiscordPolicy:
        return cls(
            admin_users=frozenset(settings.discord_admin_users),
            admin_roles=frozenset(settings.discord_admin_roles),
            allowed_channels=frozenset(settings.discord_allowed_channels),
            blocked_channels=frozenset(settings.discord_blocked_channels),
            allowed_roles=frozenset(settings.discord_allowed_roles),
            blocked_roles=frozenset(settings.discord_blocked_roles),
            allowed_users=frozenset(settings.discord_allowed_users),
            blocked_users=frozenset(settings.discord_blocked_users),
            listen_channels=frozenset(settings.discord_listen_channels),
        )

    def is_admin(self, user_id: int, role_ids: Iterable[int]) -> bool:
        return user_id in self.admin_users or not self.admin_roles.isdisjoint(role_ids)

    def permits(
        self, user_id: int, role_ids: Iterable[int], channel_ids: Iterable[int], *, is_dm: bool
    ) -> bool:
        """May this user talk to the bot here? `channel_ids`: the channel and its parent."""
        roles, channels = set(role_ids), set(channel_ids)
        if self.is_admin(user_id, roles):
            return True
        if user_id in self.blocked_users or not self.blocked_roles.isdisjoint(roles):
            return False
        if self.allowed_users and user_id not in self.allowed_users:
            return False
        return is_dm or self._permits_here(roles, channels)

    def _permits_here(self, roles: set[int], channels: set[int]) -> bool:
        if not self.blocked_channels.isdisjoint(channels):
            return False
        if self.allowed_channels and self.allowed_channels.isdisjoint(channels):
            return False
        return not (self.allowed_roles and self.allowed_roles.isdisjoint(roles))

    def listens(self, channel_ids: Iterable[int]) -> bool:
        return not self.listen_channels.isdisjoint(channel_ids)
