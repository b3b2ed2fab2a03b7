-- The outbox table. Times are integer microseconds since the Unix epoch.
-- Producers set topic, payload and optionally key, headers (JSON object of
-- strings), tenant, available_at, max_attempts; every other column is postbox's.
CREATE TABLE IF NOT EXISTS {table} (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    -- UUIDv7 for plain-SQL producers: 48-bit ms timestamp, version 7, variant 10xx, random rest
    id           BLOB NOT NULL DEFAULT (unhex(
                     printf('%012x', CAST(unixepoch('subsec') * 1000 AS INTEGER))
                     || '7' || substr(hex(randomblob(2)), 2, 3)
                     || substr('89ab', 1 + (abs(random()) % 4), 1) || substr(hex(randomblob(8)), 2, 15))),
    topic        TEXT NOT NULL,
    key          TEXT,
    payload      BLOB NOT NULL,
    headers      TEXT NOT NULL DEFAULT '{}',
    tenant       TEXT,
    available_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    max_attempts INTEGER,
    created_at   INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    status       TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'dead', 'sent')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    lease_token  BLOB,
    lease_until  INTEGER,
    last_error   TEXT,
    parked       INTEGER NOT NULL DEFAULT 0,
    sent_at      INTEGER
);

-- Claims walk pending rows in seq order.
CREATE INDEX IF NOT EXISTS {index_pending} ON {table} (seq)
    WHERE status = 'pending';

-- "Is there an earlier blocking row of this key?" is one probe here; rows
-- that block a key are the pending ones and the parked dead ones.
CREATE INDEX IF NOT EXISTS {index_keyed} ON {table} (key, seq)
    WHERE key IS NOT NULL AND (status = 'pending' OR parked = 1);

CREATE INDEX IF NOT EXISTS {index_dead} ON {table} (seq) WHERE status = 'dead';
