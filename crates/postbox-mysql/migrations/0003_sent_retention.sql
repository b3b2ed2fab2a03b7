-- Kept sent messages (a store built with `retain_sent`): the relay's cleanup
-- deletes those past the retention, oldest first, 500 per statement
-- (`DELETE ... WHERE status = 'sent' AND sent_at <= ? ORDER BY sent_at, seq
-- LIMIT ?`). This index reads exactly those rows in that order; unsent rows
-- sit in it under their own status with sent_at NULL, away from the range.
-- InnoDB adds the index online (concurrent inserts and claims go on).
--
-- MySQL has no `ADD INDEX IF NOT EXISTS` (MariaDB has), so to stay
-- re-runnable like every migration here the ALTER is built only when the
-- index is missing. `{table_name}` is the validated, unquoted table name.
SET @postbox_add_index = (
  SELECT IF(COUNT(*) = 0,
            'ALTER TABLE {table} ADD INDEX `sent_age` (`status`, `sent_at`)',
            'DO 0')
    FROM information_schema.statistics
   WHERE table_schema = DATABASE() AND table_name = '{table_name}' AND index_name = 'sent_age')
-- statement
PREPARE postbox_add_index FROM @postbox_add_index
-- statement
EXECUTE postbox_add_index
-- statement
DEALLOCATE PREPARE postbox_add_index
