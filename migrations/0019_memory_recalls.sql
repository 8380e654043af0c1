-- Recall writes nothing into `memories` (issue 22). Each recall used to stamp the facts it
-- found with `last_recalled_at`, an UPDATE of their rows: on a table whose pages are full
-- (bulk-loaded, or simply old) few such updates are HOT, so each one added a new version of the
-- row and an entry to every index, the 1.5 KB entries of the covering `memories_recall_idx`
-- too, and cleared the page's bit in the visibility map, sending the next index-only recall
-- back to the table until a vacuum came by. The stamp now lives in a narrow table of its own,
-- written in batches when replies are quiet (bot/memory/service.py), and `memories` changes
-- only when facts are learned, replaced or forgotten.
--
-- No foreign key: its check would take a KEY SHARE lock on the fact's row, which writes that
-- row's header and dirties its page all the same. A trigger removes the stamps of deleted facts
-- instead; the stamp is written only for a fact that exists (bot/memory/store.py).
CREATE TABLE memory_recalls (
    memory_id        bigint PRIMARY KEY,
    last_recalled_at timestamptz NOT NULL
) WITH (fillfactor = 70);  -- room on each page, so a new stamp is a HOT update

INSERT INTO memory_recalls (memory_id, last_recalled_at)
    SELECT id, last_recalled_at FROM memories WHERE last_recalled_at IS NOT NULL;

ALTER TABLE memories DROP COLUMN last_recalled_at;

CREATE FUNCTION memory_recalls_forget() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM memory_recalls WHERE memory_id IN (SELECT id FROM gone);
    RETURN NULL;
END
$$;

CREATE TRIGGER memories_forget_recalls AFTER DELETE ON memories
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION memory_recalls_forget();
