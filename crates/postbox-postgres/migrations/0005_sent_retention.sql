-- Kept sent messages (a store built with `retain_sent`): the relay's cleanup
-- deletes those past the retention, oldest first, 500 per statement
-- (`purge_sent`). This index finds them in `sent_at` order. It is partial, so
-- it holds only kept sent rows: empty, and free for producers and claims,
-- unless a relay keeps sent messages.
--
-- `IF NOT EXISTS`: CREATE INDEX blocks inserts while it reads the table. On a
-- large outbox, build the same index beforehand without blocking writers,
--   CREATE INDEX CONCURRENTLY "<table>_sent_idx" ON "<schema>"."<table>" (sent_at)
--       WHERE status = 'sent';
-- and this migration then only records itself.
CREATE INDEX IF NOT EXISTS "{t}_sent_idx" ON "{schema}"."{t}" (sent_at)
    WHERE status = 'sent';
