-- Per conversation, the history page a gap fill still has to fetch (so a
-- fill cut short by a crash or a lost connection completes): the next page
-- goes below `before`, and the device held everything up to `known` when the
-- fill started (keepwire_core::BackfillDue).
CREATE TABLE backfill (
    conv   INTEGER PRIMARY KEY,
    before INTEGER NOT NULL,
    known  INTEGER NOT NULL
);
