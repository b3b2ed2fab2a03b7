-- The per-key probes by status first: "is there an earlier pending row of
-- this key?" and "an earlier dead, parked one?" each read a range of
-- (key_hash, status, kseq) that holds only rows of that status. The index
-- of migration 1, (key_hash, kseq, status, parked), put every earlier row
-- of the key in the way, kept sent rows (`retain_sent`) and unparked dead
-- ones included: with 20,000 kept rows of a key each probe read 20,000
-- index entries. InnoDB adds the index online and drops the old one in
-- place (concurrent inserts and claims go on).
--
-- MySQL has no `ADD INDEX IF NOT EXISTS` (MariaDB has), so to stay
-- re-runnable like every migration here each ALTER is built only when
-- needed. `{table_name}` is the validated, unquoted table name.
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
