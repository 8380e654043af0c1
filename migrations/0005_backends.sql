-- Inference backends (issue 6): every wake-to-stop interval of a backend, priced.
-- Each row is also written to the spend ledger as `gpu_seconds` (ledgered = true once it is).
CREATE TABLE backend_sessions (
    id             bigserial PRIMARY KEY,
    backend        text NOT NULL,
    started_at     timestamptz NOT NULL,
    stopped_at     timestamptz NOT NULL,
    gpu_seconds    numeric(14, 3) NOT NULL CHECK (gpu_seconds >= 0),
    usd_per_second numeric(20, 12) NOT NULL,
    cost_usd       numeric(20, 10) NOT NULL,
    reason         text NOT NULL,          -- idle, shutdown, wake failed
    ledgered       boolean NOT NULL DEFAULT false
);
CREATE INDEX backend_sessions_stopped_idx ON backend_sessions (stopped_at);
