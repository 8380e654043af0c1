-- Spend ledger (issue 7): prices with their sources, one row per cost event, budget locks, alerts.

-- Prices: one row per (kind, provider pattern, model) from an effective date. A change is a new
-- row with a later effective_from; ledger rows copy the unit price they were charged at, so a
-- price change never rewrites the past. `provider` is a LIKE pattern ('fal', 'fly%', '%').
-- `model` NULL means "any model of that provider". The most specific row wins, then the latest
-- effective_from that is not after the event.
CREATE TABLE prices (
    id             bigserial PRIMARY KEY,
    kind           text NOT NULL CHECK (kind IN ('gpu_seconds', 'image', 'chat_tokens',
                                                 'embed_tokens', 'moderation_tokens')),
    provider       text NOT NULL,
    model          text,
    unit_price     numeric NOT NULL CHECK (unit_price >= 0),   -- US dollars per unit
    unit           text NOT NULL,                              -- what one unit is, in words
    effective_from timestamptz NOT NULL,
    source         text NOT NULL,                              -- where the figure comes from
    UNIQUE NULLS NOT DISTINCT (kind, provider, model, effective_from)
);

INSERT INTO prices (kind, provider, model, unit_price, unit, effective_from, source) VALUES
    ('chat_tokens', '%', NULL, 0, 'token', '2025-01-01T00:00Z',
     'Self-hosted models (Ollama, the local llama.cpp model) cost nothing per token; their '
     'compute is counted as gpu_seconds.'),
    ('embed_tokens', '%', NULL, 0, 'token', '2025-01-01T00:00Z',
     'Self-hosted embedding models cost nothing per token; compute is counted as gpu_seconds.'),
    ('moderation_tokens', '%', NULL, 0, 'token', '2025-01-01T00:00Z',
     'Llama Guard runs on our own Ollama or CPU; compute is counted as gpu_seconds.'),
    ('gpu_seconds', 'ollama:%', NULL, 0, 'second', '2025-01-01T00:00Z',
     'A home GPU: electricity is not metered here. Add a row to count it.'),
    ('gpu_seconds', 'local', NULL, 0, 'second', '2025-01-01T00:00Z',
     'The bot''s own CPU.'),
    ('gpu_seconds', 'fly%', NULL, 0.000416666667, 'second', '2025-01-01T00:00Z',
     'https://fly.io/docs/about/pricing/ (GPUs: A10 at $1.50 per hour, billed per second); '
     'used when the GPU type is not named.'),
    ('gpu_seconds', 'fly%', 'a10', 0.000416666667, 'second', '2025-01-01T00:00Z',
     'https://fly.io/docs/about/pricing/ (A10: $1.50 per hour, billed per second).'),
    ('gpu_seconds', 'fly%', 'l40s', 0.000347222222, 'second', '2025-01-01T00:00Z',
     'https://fly.io/docs/about/pricing/ (L40S: $1.25 per hour, billed per second).'),
    ('gpu_seconds', 'fly%', 'a100-40gb', 0.000694444444, 'second', '2025-01-01T00:00Z',
     'https://fly.io/docs/about/pricing/ (A100 40GB PCIe: $2.50 per hour).'),
    ('gpu_seconds', 'fly%', 'a100-80gb', 0.000972222222, 'second', '2025-01-01T00:00Z',
     'https://fly.io/docs/about/pricing/ (A100 80GB SXM: $3.50 per hour).'),
    ('image', 'fal', 'fal-ai/flux/schnell', 0.003, 'megapixel', '2025-01-01T00:00Z',
     'https://fal.ai/models/fal-ai/flux/schnell ($0.003 per megapixel, rounded up; a '
     '1024x1024 picture is 1 megapixel).'),
    ('image', 'fal', 'fal-ai/flux/dev', 0.025, 'megapixel', '2025-01-01T00:00Z',
     'https://fal.ai/models/fal-ai/flux/dev ($0.025 per megapixel, rounded up; a 1024x1024 '
     'picture is 1 megapixel).'),
    ('image', 'fal', NULL, 0.025, 'megapixel', '2025-01-01T00:00Z',
     'Fal models not listed here are charged like flux/dev until they get a row of their own.');

-- The ledger: one row per cost event. Rows are never deleted; a row may change only while it
-- is 'reserved' (to 'settled' with its final units, or to 'released' at no cost).
CREATE TABLE ledger (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL,
    month       date NOT NULL,                -- first day of the UTC month of `at`
    kind        text NOT NULL CHECK (kind IN ('gpu_seconds', 'image', 'chat_tokens',
                                              'embed_tokens', 'moderation_tokens')),
    provider    text NOT NULL,                -- backend name: 'ollama:host', 'local', 'fal', ...
    model       text,
    units       numeric NOT NULL CHECK (units >= 0),
    unit_price  numeric NOT NULL CHECK (unit_price >= 0),
    cost        numeric NOT NULL CHECK (cost >= 0),
    price_id    bigint REFERENCES prices (id),  -- NULL when the caller gave the price
    user_key    text,
    platform    text,
    guild       text,                         -- Discord guild or Matrix server/room
    persona     text,
    request_id  text NOT NULL UNIQUE,         -- a retry with the same id never charges twice
    status      text NOT NULL CHECK (status IN ('reserved', 'settled', 'released')),
    settled_at  timestamptz,
    CHECK (month = date_trunc('month', at AT TIME ZONE 'UTC')::date)
);
CREATE INDEX ledger_month_kind_idx ON ledger (month, kind);
CREATE INDEX ledger_month_user_idx ON ledger (month, user_key, kind);
CREATE INDEX ledger_month_guild_idx ON ledger (month, guild, kind);
CREATE INDEX ledger_month_at_idx ON ledger (month, at);

CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'ledger rows are never deleted (request %)', OLD.request_id;
    END IF;
    IF OLD.status <> 'reserved' THEN
        RAISE EXCEPTION 'ledger row % is final (%)', OLD.request_id, OLD.status;
    END IF;
    IF (NEW.at, NEW.month, NEW.kind, NEW.provider, NEW.model, NEW.unit_price, NEW.user_key,
        NEW.platform, NEW.guild, NEW.persona, NEW.request_id)
       IS DISTINCT FROM
       (OLD.at, OLD.month, OLD.kind, OLD.provider, OLD.model, OLD.unit_price, OLD.user_key,
        OLD.platform, OLD.guild, OLD.persona, OLD.request_id) THEN
        RAISE EXCEPTION 'only status, units and cost of a reserved ledger row may change';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_append_only();

-- One row per budget scope and month; reservations lock these rows (FOR UPDATE, in scope
-- order) so that concurrent reservations from any number of processes take turns.
CREATE TABLE budget_scopes (
    month date NOT NULL,
    scope text NOT NULL,                      -- 'global', 'kind:image', 'user:<key>:image', ...
    PRIMARY KEY (month, scope)
);

-- Soft alerts and degrade notices sent, so each goes out once per month per scope.
CREATE TABLE budget_alerts (
    month   date NOT NULL,
    scope   text NOT NULL,
    sent_at timestamptz NOT NULL DEFAULT now(),
    text    text NOT NULL,
    PRIMARY KEY (month, scope)
);
