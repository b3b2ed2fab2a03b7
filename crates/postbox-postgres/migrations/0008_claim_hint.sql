-- Where the next backlog claim of any relay should start (see
-- `claim::past_hint`): each held backlog claim sets it past the row numbers
-- it is about to lock, and every other relay's backlog claim starts past
-- it, instead of trying and skipping those locked rows one by one (a lock
-- attempt each, ~1.6 us a row). A sequence, because `setval` is not
-- transactional: the claim's transaction stays open while the relay
-- publishes, and the others must see the hint at once. Only a hint: rows
-- below it that nobody holds are claimed by the scans that start from the
-- front, so a lost or wrong value costs time, never a message. Owned by
-- `seq` like the table's own sequence, so that dropping the table drops it
-- and `TRUNCATE ... RESTART IDENTITY` resets it.
CREATE SEQUENCE IF NOT EXISTS "{schema}"."{t}_claim_hint" AS bigint MINVALUE 0 START 0;
ALTER SEQUENCE "{schema}"."{t}_claim_hint" OWNED BY "{schema}"."{t}".seq;
