-- Discord adapter (issue 3): shared rate-limit buckets and the message → conversation map.

-- Token buckets for per-user rate limits, in Postgres so every shard and process shares them.
-- `tokens` is what was left at `updated_at`; refills are computed on use (see bot/ratelimit.py).
CREATE TABLE rate_buckets (
    key        text PRIMARY KEY,
    tokens     double precision NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rate_buckets_updated_idx ON rate_buckets (updated_at);

-- Which conversation a platform message belongs to: the bot's replies and the messages they
-- answered. A reply to one of them, or a thread started from one, continues that conversation.
CREATE TABLE platform_messages (
    platform     text NOT NULL,
    message_id   text NOT NULL,
    conversation text NOT NULL,              -- conversations.external_id
    from_bot     boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (platform, message_id)
);
CREATE INDEX platform_messages_created_idx ON platform_messages (created_at);
