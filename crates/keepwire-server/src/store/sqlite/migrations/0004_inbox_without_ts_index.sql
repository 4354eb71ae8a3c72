-- Every message wrote one entry per member into this index as well: a tenth
-- of the writer's work under group fanout, for a periodic age trim only.
-- The trim now walks each user's inbox in sequence order instead (entries
-- are appended in commit order, so their times rise with the sequence).
DROP INDEX IF EXISTS inbox_by_ts;
