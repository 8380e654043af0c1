"""Who may talk to the bot where: the DISCORD_* allow and block lists."""

from __future__ import annotations

from bot.adapters.discord.policy import DiscordPolicy
from bot.config import Settings


def test_everyone_everywhere_by_default() -> None:
    policy = DiscordPolicy()
    assert policy.permits(1, [], [10], is_dm=False)
    assert policy.permits(1, [], [10], is_dm=True)
    assert not policy.is_admin(1, [])


def test_blocks_beat_allows_but_admins_pass_everything() -> None:
    policy = DiscordPolicy(
        admin_users=frozenset({9}),
        admin_roles=frozenset({90}),
        blocked_users=frozenset({2}),
        blocked_roles=frozenset({20}),
        blocked_channels=frozenset({30}),
        allowed_users=frozenset({1, 2, 3}),
    )
    assert policy.permits(1, [], [10], is_dm=False)
    assert not policy.permits(2, [], [10], is_dm=False)
    assert not policy.permits(3, [20], [10], is_dm=False)
    assert not policy.permits(1, [], [30], is_dm=False)
    assert not policy.permits(4, [], [10], is_dm=False), "not on the allowed users list"
    assert policy.permits(9, [20], [30], is_dm=False)
    assert policy.is_admin(5, [90]) and policy.permits(5, [90], [30], is_dm=False)


def test_allowed_channels_count_a_threads_parent_and_skip_dms() -> None:
    policy = DiscordPolicy(allowed_channels=frozenset({10}), allowed_roles=frozenset({7}))
    assert policy.permits(1, [7], [55, 10], is_dm=False), "a thread under an allowed channel"
    assert not policy.permits(1, [7], [55], is_dm=False)
    assert not policy.permits(1, [], [10], is_dm=False), "needs an allowed role"
    assert policy.permits(1, [], [99], is_dm=True)


def test_built_from_comma_separated_settings() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        discord_admin_users="1, 2",  # type: ignore[arg-type]
        discord_listen_channels="[5, 6]",  # type: ignore[arg-type]
    )
    policy = DiscordPolicy.from_settings(settings)
    assert policy.admin_users == {1, 2}
    assert policy.listens([6]) and not policy.listens([7])
