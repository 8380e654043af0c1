-- Recall that does not depend on a quiet machine (issue 22). Recall scans one user's current
-- rows exactly. Through memories_user_idx each of those rows is a heap fetch, and a user's rows
-- are spread over the whole table (they were learned over months, among everybody else's): at a
-- million memories ~100 rows cost ~100 random pages, whose time depends on what else the machine
-- reads. This index holds what recall reads (id, created_at, the embedding) next to the keys it
-- filters on, so one user's current memories of one model sit together on a few leaf pages and
-- recall is an index-only scan; the text of only the top k is then read from the table.
--
-- Only vectors of up to 1,024 dimensions are in it: a B-tree entry holds at most 2,704 bytes
-- and a halfvec takes 2 bytes a dimension. Recall of larger vectors (1,536-d models) says
-- nothing about this predicate and goes through memories_user_idx as before.
-- `private_to` (0017: the persona a fact is private to) is in it so that recall filters on the
-- persona asking without reading the table; another column to filter on goes in the same way.
CREATE INDEX memories_recall_idx ON memories (user_key, embed_model, scope)
    INCLUDE (id, created_at, private_to, embedding)
    WHERE superseded_by IS NULL AND vector_dims(embedding) <= 1024;

-- Which models (in which scopes) a user's current memories were embedded with: read before
-- every recall (no memories there: no embedding call), index-only through this narrow index.
CREATE INDEX memories_current_idx ON memories (user_key, embed_model, scope)
    WHERE superseded_by IS NULL;

-- An index-only scan skips the table only for pages the visibility map marks all-visible;
-- `touch` (last_recalled_at) and new rows clear that mark until a vacuum sets it again. The
-- default waits for a fifth of the table to change (200,000 rows at a million): vacuum this
-- table after 1% instead, so the map stays current on a busy table.
ALTER TABLE memories SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02
);
