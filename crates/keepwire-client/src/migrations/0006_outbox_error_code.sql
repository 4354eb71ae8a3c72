-- A failed send's error code in a column of its own (it was kept as
-- "code: message" in `error`); `error` keeps only the message.
ALTER TABLE outbox ADD COLUMN error_code TEXT;
UPDATE outbox
   SET error_code = substr(error, 1, instr(error, ': ') - 1),
       error = substr(error, instr(error, ': ') + 2)
 WHERE status = 'failed' AND instr(error, ': ') > 1;
UPDATE outbox SET error_code = 'internal' WHERE status = 'failed' AND error_code IS NULL;
