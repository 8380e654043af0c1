-- Long-term memory (issue 5): durable facts about each user, recalled by cosine similarity.
--
-- Recall is an exact scan of one user's current rows through the B-tree on user_key
-- (recall 1.0, no approximate index). The embedding column is an untyped halfvec and each
-- row names the model that made it, so the embedding model can change without a schema
-- change; vectors of different models are never compared (`memories reembed` moves rows).
CREATE TABLE memories (
    id               bigserial PRIMARY KEY,
    user_key         text NOT NULL,             -- platform:user_id, e.g. 'discord:1234'
    text             text NOT NULL,
    text_hash        text NOT NULL,             -- sha256 of the normalised text, for dedupe
    embed_model      text NOT NULL,             -- e.g. 'ollama:nomic-embed-text'
    embedding        halfvec NOT NULL,
    persona          text,                      -- which persona heard it (audit only)
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_recalled_at timestamptz,
    -- a newer fact that contradicted this one; superseded rows are kept for audit, never
    -- recalled, and deleted together with the fact that replaced them
    superseded_by    bigint REFERENCES memories (id) ON DELETE CASCADE
);
CREATE INDEX memories_user_idx ON memories (user_key);
CREATE UNIQUE INDEX memories_current_hash_idx ON memories (user_key, text_hash)
    WHERE superseded_by IS NULL;
CREATE INDEX memories_superseded_by_idx ON memories (superseded_by)
    WHERE superseded_by IS NOT NULL;

-- Exchanges waiting for fact extraction. A row is written before the extraction runs and
-- deleted when it has finished (or was dropped), so a process that stops mid-way loses
-- nothing: pending rows are drained at the next start.
CREATE TABLE memory_jobs (
    id              bigserial PRIMARY KEY,
    user_key        text NOT NULL,
    author_name     text NOT NULL,
    persona         text NOT NULL,
    model           text NOT NULL,              -- the chat model that extracts
    platform        text NOT NULL,
    conversation_id bigint REFERENCES conversations (id) ON DELETE SET NULL,
    message         text NOT NULL,
    reply           text NOT NULL,
    attempts        integer NOT NULL DEFAULT 0, -- extractions answered with invalid output
    locked_until    timestamptz,                -- a worker holds the job until then
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX memory_jobs_user_idx ON memory_jobs (user_key);
