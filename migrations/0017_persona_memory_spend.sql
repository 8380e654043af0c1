-- A cast (issue 21): memories and spend per persona. Additive only.
--
-- private_to: the persona a fact is private to. NULL: shared, recalled by every persona in the
-- place (rows from before this migration, and what a persona with `share_memories: true`
-- learns). A persona recalls the shared facts and its own, never another persona's.
ALTER TABLE memories ADD COLUMN private_to text;
ALTER TABLE memory_jobs ADD COLUMN private_to text;
-- Dedupe is per place and per keeper: the same fact learned by two personas is kept by each.
DROP INDEX memories_current_hash_idx;
CREATE UNIQUE INDEX memories_current_hash_idx
    ON memories (user_key, (coalesce(scope, '')), (coalesce(private_to, '')), text_hash)
    WHERE superseded_by IS NULL;

-- A persona's own monthly cap (`budget_usd_month`) sums the month's rows of that persona.
CREATE INDEX ledger_month_persona_idx ON ledger (month, persona, kind);
