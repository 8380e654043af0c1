-- Matrix adapter (issue 9): login device, sync position, catch-up marker, handled events.

-- One row per bot account. `next_batch` is the sync token after the last processed sync;
-- `caught_up_ts` is the catch-up marker: the server time (ms) of the newest event seen so far.
-- After a start, everything up to the first sync is history and is never answered.
CREATE TABLE matrix_state (
    account      text PRIMARY KEY,               -- the bot's user id
    device_id    text,
    next_batch   text,
    caught_up_ts bigint,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Events the bot has handled (claimed before acting, so a replayed event is never handled
-- twice) and the events it sent, with the conversation each belongs to, so a reply to one of
-- them continues that conversation.
CREATE TABLE matrix_events (
    account      text NOT NULL,
    event_id     text NOT NULL,
    room_id      text NOT NULL,
    conversation text NOT NULL,                  -- conversations.external_id
    from_bot     boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, event_id)
);
CREATE INDEX matrix_events_created_idx ON matrix_events (created_at);
