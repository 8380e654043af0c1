-- Safety boundary (issue 15).
--
-- Memory scope: where a fact was learned. 'console' (the terminal), '<platform>:guild:<id>' (a
-- Discord server, a Matrix server's rooms), '<platform>:conv:<id>' (a direct message, or a room
-- outside any server). A fact is recalled and listed only in its scope unless the persona says
-- `memory_scope: user`. Rows from before this migration have no scope (NULL): they are recalled
-- only under `memory_scope: user`, and /memories counts them among the facts kept elsewhere.
ALTER TABLE memories ADD COLUMN scope text;
ALTER TABLE memory_jobs ADD COLUMN scope text;
CREATE INDEX memories_user_scope_idx ON memories (user_key, scope);
-- The same fact said in two places is kept in each (dedupe is per place).
DROP INDEX memories_current_hash_idx;
CREATE UNIQUE INDEX memories_current_hash_idx ON memories (user_key, (coalesce(scope, '')), text_hash)
    WHERE superseded_by IS NULL;

-- Deletions: the platform's id of the message a history row, a pending extraction and a fact
-- came from, so that a message deleted (or edited) on the platform is deleted (or replaced) here.
ALTER TABLE messages ADD COLUMN platform_message_id text;
CREATE INDEX messages_platform_message_idx ON messages (conversation_id, platform_message_id)
    WHERE platform_message_id IS NOT NULL;
ALTER TABLE memory_jobs ADD COLUMN message_id bigint;  -- messages.id of the user's message
-- messages.id a fact was drawn from; NULL when it was said in more than one message (or before
-- this migration): deleting one message then leaves it, as it is not drawn only from that one.
ALTER TABLE memories ADD COLUMN source_message_id bigint;

-- A fact extracted for memory is judged by the input guard before it is stored.
ALTER TABLE moderation_verdicts DROP CONSTRAINT moderation_verdicts_kind_check;
ALTER TABLE moderation_verdicts ADD CONSTRAINT moderation_verdicts_kind_check
    CHECK (kind IN ('input', 'output', 'image_prompt', 'memory'));
