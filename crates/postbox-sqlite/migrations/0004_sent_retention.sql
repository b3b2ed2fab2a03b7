-- Kept sent messages (a store built with `retain_sent`): the cleanup deletes
-- those past the retention, oldest first, a few hundred per statement. This
-- partial index holds only sent rows, in `sent_at` order, so each cleanup
-- statement reads just the rows it deletes and costs nothing while no row is
-- kept.
CREATE INDEX IF NOT EXISTS {index_sent} ON {table} (sent_at)
    WHERE status = 'sent';
