-- Foundation: conversations, their messages, and every model call.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE conversations (
    id          bigserial PRIMARY KEY,
    platform    text NOT NULL,
    external_id text NOT NULL,
    persona     text,                       -- assigned persona; NULL means the default
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (platform, external_id)
);

CREATE TABLE messages (
    id              bigserial PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role            text NOT NULL CHECK (role IN ('user', 'assistant')),
    author_id       text NOT NULL,
    author_name     text NOT NULL,
    persona         text NOT NULL,
    content         text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_conversation_idx ON messages (conversation_id, id DESC);

-- One row per call to any model (chat, and later guard and embeddings), successful or not.
CREATE TABLE model_calls (
    id                bigserial PRIMARY KEY,
    at                timestamptz NOT NULL DEFAULT now(),
    purpose           text NOT NULL DEFAULT 'chat',
    backend           text NOT NULL,        -- 'ollama:<host>' or 'local'
    model             text NOT NULL,
    platform          text,
    conversation_id   bigint REFERENCES conversations (id) ON DELETE SET NULL,
    user_key          text,
    persona           text,
    options           jsonb NOT NULL DEFAULT '{}',
    prompt_tokens     integer,
    completion_tokens integer,
    total_ms          double precision,
    load_ms           double precision,
    prompt_eval_ms    double precision,
    eval_ms           double precision,
    ok                boolean NOT NULL,
    error             text,
    prompt            jsonb                 -- the full prompt, only when LOG_PROMPTS is on
);
CREATE INDEX model_calls_at_idx ON model_calls (at);
