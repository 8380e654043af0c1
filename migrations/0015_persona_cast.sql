-- A cast of personas per conversation (issue 21), beside conversations.persona.
-- No rows: the conversation's single persona is its cast (a cast of one, as before).
CREATE TABLE conversation_cast (
    conversation_id bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    persona         text NOT NULL,
    added_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, persona)
);
