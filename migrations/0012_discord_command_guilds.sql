-- Discord slash commands (issue 17): the guilds whose command set the bot last synced, so that
-- changing DISCORD_COMMAND_GUILDS, or switching back to global commands, removes the old sets
-- (Discord keeps a guild's commands until they are overwritten).
CREATE TABLE discord_command_guilds (
    guild_id  bigint PRIMARY KEY,
    synced_at timestamptz NOT NULL DEFAULT now()
);
