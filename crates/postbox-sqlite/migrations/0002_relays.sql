-- Heartbeats of the running relays (one row each, upserted every few
-- seconds, deleted on clean shutdown) for `postbox status`. Times are integer
-- microseconds since the Unix epoch: `last_heartbeat` on SQLite's clock,
-- `started_at` and `last_claim_at` on the relay's.
CREATE TABLE IF NOT EXISTS {relays} (
    relay_id       BLOB    PRIMARY KEY,
    host           TEXT    NOT NULL,
    pid            INTEGER NOT NULL,
    version        TEXT    NOT NULL,
    started_at     INTEGER NOT NULL,
    interval_us    INTEGER NOT NULL,
    last_heartbeat INTEGER NOT NULL,
    last_claim_at  INTEGER,
    leased         INTEGER NOT NULL DEFAULT 0
);
