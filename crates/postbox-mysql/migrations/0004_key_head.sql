-- The per-key probes by status first: an earlier pending row of the key,
-- and its earlier dead rows, each read from a range of (key_hash, status, kseq)
-- that holds only rows of that status. The index of migration 1,
-- (key_hash, kseq, status, parked), put every earlier row of the key in the
-- way, kept sent rows (`retain_sent`) included: with 20,000 kept rows of a
-- key each probe read 20,000 index entries. InnoDB adds the index online and
-- drops the old one in place, but each ALTER needs a moment of exclusive
-- metadata lock, and while it waits for one (behind a transaction that
-- touched the table) inserts queue behind it. So it waits at most 10 s, and
-- the migration fails instead: run it again later.
--
-- MySQL has no `ADD INDEX IF NOT EXISTS` (MariaDB has), so to stay
-- re-runnable like every migration here each ALTER is built only when
-- needed. `{table_name}` is the validated, unquoted table name.
SET @postbox_lock_wait_timeout = @@SESSION.lock_wait_timeout
-- statement
SET SESSION lock_wait_timeout = 10
-- statement
SET @postbox_add_index = (
  SELECT IF(COUNT(*) = 0,
            'ALTER TABLE {table} ADD INDEX `key_head` (`key_hash`, `status`, `kseq`, `parked`)',
            'DO 0')
    FROM information_schema.statistics
   WHERE table_schema = DATABASE() AND table_name = '{table_name}' AND index_name = 'key_head')
-- statement
PREPARE postbox_add_index FROM @postbox_add_index
-- statement
EXECUTE postbox_add_index
-- statement
DEALLOCATE PREPARE postbox_add_index
-- statement
SET @postbox_drop_index = (
  SELECT IF(COUNT(*) > 0,
            'ALTER TABLE {table} DROP INDEX `key_order`',
            'DO 0')
    FROM information_schema.statistics
   WHERE table_schema = DATABASE() AND table_name = '{table_name}' AND index_name = 'key_order')
-- statement
PREPARE postbox_drop_index FROM @postbox_drop_index
-- statement
EXECUTE postbox_drop_index
-- statement
DEALLOCATE PREPARE postbox_drop_index
-- statement
SET SESSION lock_wait_timeout = @postbox_lock_wait_timeout
