-- Scheduled jobs run once across replicas (issue 10): the last claimed run of each job.
-- A replica claims a run only if no replica started the job within half its period.
CREATE TABLE scheduler_runs (
    name text PRIMARY KEY,
    started_at timestamptz NOT NULL,
    finished_at timestamptz,
    holder text NOT NULL
);
