-- The prompt's history window (issue 22): the id of the first message the prompt keeps. It moves
-- in steps (when the history outgrows its budget, to half of it), not by one message a turn, so
-- the beginning of the prompt stays byte-identical and a model's prompt cache can reuse it.
-- NULL: from the conversation's first message.
ALTER TABLE conversations ADD COLUMN history_from bigint;
