-- The outbox table, its per-key lock table and the trigger that orders keyed rows.
-- `{table}`, `{keys}` and `{trigger}` are replaced by validated, back-quoted identifiers.
-- Statements are separated by a line holding only `-- statement`.
-- MySQL DDL commits implicitly, so every statement is written to be re-runnable.

-- Every column but topic and payload has a default, so a producer in any
-- language can write one plain INSERT (see README.md).
-- * utf8mb4_bin: keys, topics and tenants compare byte for byte ('K' <> 'k').
-- * key_hash: keys are TEXT (any length); the fixed-size hash is what is
--   indexed and what the lock table is keyed by.
-- * kseq: the position of the row within its key, assigned by the trigger
--   below while it holds the key's slot lock (see README.md, "Order per key").
-- * times are DATETIME(6) in UTC, taken from UTC_TIMESTAMP(6) so the
--   session's time_zone never matters.
CREATE TABLE IF NOT EXISTS {table} (
  `seq` BIGINT NOT NULL AUTO_INCREMENT,
  `id` BINARY(16) NOT NULL DEFAULT (UNHEX(REPLACE(UUID(), '-', ''))),
  `topic` TEXT NOT NULL,
  `key` TEXT NULL,
  `key_hash` BINARY(32) GENERATED ALWAYS AS (UNHEX(SHA2(`key`, 256))) STORED,
  `kseq` BIGINT NULL,
  `payload` LONGBLOB NOT NULL,
  `headers` JSON NOT NULL DEFAULT ('{}'),
  `tenant` TEXT NULL,
  `available_at` DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
  `max_attempts` INT NULL,
  `created_at` DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
  `status` VARCHAR(7) NOT NULL DEFAULT 'pending',
  `attempts` INT NOT NULL DEFAULT 0,
  `lease_token` BINARY(16) NULL,
  `lease_until` DATETIME(6) NULL,
  `last_error` TEXT NULL,
  `parked` BOOLEAN NOT NULL DEFAULT FALSE,
  `sent_at` DATETIME(6) NULL,
  PRIMARY KEY (`seq`),
  -- the claim scans pending rows in seq order
  KEY `claim_scan` (`status`, `seq`),
  -- "is there an earlier unfinished row of this key?": covering, one probe per candidate
  KEY `key_order` (`key_hash`, `kseq`, `status`, `parked`),
  KEY `by_id` (`id`),
  CONSTRAINT `status_is_known` CHECK (`status` IN ('pending', 'dead', 'sent'))
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin
-- statement
-- The key locks: 65,536 rows created once, never inserted or deleted again.
-- A keyed row's slot is CRC32(key) mod 65536. The slot row's lock serialises
-- the producers of a key until they commit, and last_kseq hands out kseq.
-- A fixed set of rows means producers only ever UPDATE an existing row by
-- primary key: a record lock, no gap or insert-intention locks, so two
-- producers of one key cannot deadlock each other, and the table never grows.
-- The price: two different keys in one slot also wait for each other.
CREATE TABLE IF NOT EXISTS {keys} (
  `slot` INT UNSIGNED NOT NULL,
  `last_kseq` BIGINT NOT NULL,
  PRIMARY KEY (`slot`)
) ENGINE = InnoDB
-- statement
INSERT IGNORE INTO {keys} (`slot`, `last_kseq`)
SELECT a.i + 16 * b.i + 256 * c.i + 4096 * d.i, 0
FROM (SELECT 0 AS i UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
      UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
      UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
      UNION ALL SELECT 14 UNION ALL SELECT 15) AS a
CROSS JOIN (SELECT 0 AS i UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
      UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
      UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
      UNION ALL SELECT 14 UNION ALL SELECT 15) AS b
CROSS JOIN (SELECT 0 AS i UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
      UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
      UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
      UNION ALL SELECT 14 UNION ALL SELECT 15) AS c
CROSS JOIN (SELECT 0 AS i UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4
      UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9
      UNION ALL SELECT 10 UNION ALL SELECT 11 UNION ALL SELECT 12 UNION ALL SELECT 13
      UNION ALL SELECT 14 UNION ALL SELECT 15) AS d
-- statement
-- Runs for every inserted row, from enqueue and from plain SQL alike. The
-- UPDATE takes an exclusive lock on the key's slot row that InnoDB holds until
-- the inserting transaction ends, so a second producer of the key waits here,
-- and kseq order is the order in which producers of a key got the lock.
CREATE TRIGGER IF NOT EXISTS {trigger} BEFORE INSERT ON {table} FOR EACH ROW
BEGIN
  IF NEW.`key` IS NOT NULL THEN
    UPDATE {keys} SET `last_kseq` = `last_kseq` + 1 WHERE `slot` = MOD(CRC32(NEW.`key`), 65536);
    SET NEW.`kseq` = (SELECT `last_kseq` FROM {keys} WHERE `slot` = MOD(CRC32(NEW.`key`), 65536));
  ELSE
    SET NEW.`kseq` = NULL;
  END IF;
END
