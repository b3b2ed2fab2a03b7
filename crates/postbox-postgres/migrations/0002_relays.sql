-- Heartbeats of the running relays, for `postbox status`: one row per relay,
-- upserted every few seconds and deleted on clean shutdown. `last_heartbeat`
-- is the database clock at the write; `started_at` and `last_claim_at` come
-- from the relay's clock. `{schema}` and `{t}` are validated identifiers.
--
-- fillfactor 50: every heartbeat rewrites its row; the free room keeps those
-- updates HOT (no index change), so the table stays a few pages however long
-- the relays run.
CREATE TABLE "{schema}"."{t}_relays" (
    relay_id       uuid        NOT NULL,
    host           text        NOT NULL,
    pid            bigint      NOT NULL,
    version        text        NOT NULL,
    started_at     timestamptz NOT NULL,
    interval_us    bigint      NOT NULL,
    last_heartbeat timestamptz NOT NULL DEFAULT now(),
    last_claim_at  timestamptz,
    leased         bigint      NOT NULL DEFAULT 0,
    CONSTRAINT "{t}_relays_pkey" PRIMARY KEY (relay_id)
) WITH (fillfactor = 50);
