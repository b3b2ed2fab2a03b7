-- Heartbeats of the running relays, for `postbox status`: one row per relay,
-- upserted every few seconds and deleted on clean shutdown. `{relays}` is a
-- validated, back-quoted identifier. `last_heartbeat` is the database clock
-- (UTC_TIMESTAMP(6)) at the write; `started_at` and `last_claim_at` come from
-- the relay's clock. Re-runnable like every migration here.
CREATE TABLE IF NOT EXISTS {relays} (
  `relay_id` BINARY(16) NOT NULL,
  `host` VARCHAR(255) NOT NULL,
  `pid` BIGINT NOT NULL,
  `version` VARCHAR(64) NOT NULL,
  `started_at` DATETIME(6) NOT NULL,
  `interval_us` BIGINT NOT NULL,
  `last_heartbeat` DATETIME(6) NOT NULL,
  `last_claim_at` DATETIME(6) NULL,
  `leased` BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (`relay_id`)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4
