-- Money never leaks (issue 16): one owner per machine across processes, GPU time booked while
-- the machine is up.
--
-- A backend session is now opened when a machine is woken (or found up) and closed when it is
-- stopped; while it is open (stopped_at IS NULL) there is at most one per backend, shared by
-- every process that uses the machine. Its GPU time goes to the ledger in increments
-- (request id `backend-session:<id>:<from, epoch ms>`), up to `booked_until`.
ALTER TABLE backend_sessions ALTER COLUMN stopped_at DROP NOT NULL;
ALTER TABLE backend_sessions ALTER COLUMN gpu_seconds SET DEFAULT 0;
ALTER TABLE backend_sessions ALTER COLUMN cost_usd SET DEFAULT 0;
ALTER TABLE backend_sessions ALTER COLUMN reason SET DEFAULT 'open';
ALTER TABLE backend_sessions ADD COLUMN booked_until timestamptz;   -- ledgered up to here
ALTER TABLE backend_sessions ADD COLUMN last_used timestamptz;      -- any process's last request
ALTER TABLE backend_sessions ADD COLUMN stopping_by text;           -- the process stopping it
CREATE UNIQUE INDEX backend_sessions_one_open ON backend_sessions (backend)
    WHERE stopped_at IS NULL;

-- Leases: requests in flight on a backend, per process. A process renews its rows while it
-- runs; a row not renewed for a while belongs to a process that died and holds nothing.
CREATE TABLE backend_leases (
    backend    text NOT NULL,
    holder     text NOT NULL,                 -- host:pid:random of the process
    in_flight  integer NOT NULL CHECK (in_flight >= 0),
    renewed_at timestamptz NOT NULL,
    PRIMARY KEY (backend, holder)
);
