-- Images (issue 8): one row per /imagine (or draw_image) request, whatever became of it.
CREATE TABLE images (
    id          bigserial PRIMARY KEY,
    request_id  text NOT NULL UNIQUE,           -- ours; also the ledger's request id
    fal_request_id text,                        -- Fal's queue request id, once submitted
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    platform    text NOT NULL,
    user_key    text NOT NULL,                  -- platform:author id
    conversation text NOT NULL,
    guild       text,
    persona     text NOT NULL,
    prompt      text NOT NULL,                  -- as the user wrote it
    full_prompt text NOT NULL,                  -- with the persona's image style
    model       text NOT NULL,                  -- Fal endpoint, e.g. fal-ai/flux/schnell
    size        text NOT NULL,                  -- our preset: square, portrait, landscape
    width       integer,
    height      integer,
    seed        bigint NOT NULL,
    megapixels  integer NOT NULL,               -- billed units, rounded up
    cost        numeric(12, 6) NOT NULL DEFAULT 0,  -- what was charged (0 for failures)
    status      text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'ok', 'failed', 'refused_prompt', 'refused_nsfw')),
    nsfw        boolean NOT NULL DEFAULT false, -- Fal's has_nsfw_concepts
    spoiler     boolean NOT NULL DEFAULT false,
    file_path   text,
    error       text                            -- our error class, never raw remote text
);
CREATE INDEX images_user_idx ON images (user_key, created_at DESC);
