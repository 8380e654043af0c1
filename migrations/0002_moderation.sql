-- Llama Guard moderation (issue 4): one row per verdict on a message, a reply or an image
-- prompt, whatever it was. The user's text is kept only when GUARD_KEEP_TEXT is on.
CREATE TABLE moderation_verdicts (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    kind            text NOT NULL CHECK (kind IN ('input', 'output', 'image_prompt')),
    -- what the model said; 'unknown' when it could not be reached, was too slow, or its
    -- answer was malformed (then `policy` says what was done and `reason` why)
    verdict         text NOT NULL CHECK (verdict IN ('safe', 'unsafe', 'unknown')),
    categories      text[] NOT NULL DEFAULT '{}',   -- e.g. {S1,S10}
    blocked         boolean NOT NULL,               -- the text was stopped
    policy          text CHECK (policy IN ('open', 'closed')),
    reason          text,
    latency_ms      double precision,
    model           text NOT NULL,                  -- e.g. 'llama-guard3:1b'
    backend         text NOT NULL,                  -- 'ollama:<host>'
    platform        text NOT NULL,
    conversation    text,                           -- the platform's channel or room id
    conversation_id bigint REFERENCES conversations (id) ON DELETE SET NULL,
    user_key        text,
    persona         text NOT NULL,
    text            text                            -- only with GUARD_KEEP_TEXT=true
);
CREATE INDEX moderation_verdicts_at_idx ON moderation_verdicts (at);
CREATE INDEX moderation_verdicts_blocked_idx ON moderation_verdicts (at) WHERE blocked;
