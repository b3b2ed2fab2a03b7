-- The outbox table, its sequence, indexes and the ordering trigger.
-- `{schema}` and `{t}` are replaced by validated identifiers (letters, digits,
-- underscores only), always inside double quotes here.

-- `seq` has no column default on purpose: the BEFORE INSERT trigger assigns
-- it AFTER taking the key's advisory lock, so per key `seq` order is commit
-- order (a default would be evaluated before the trigger runs).
CREATE SEQUENCE "{schema}"."{t}_seq" AS bigint;

CREATE TABLE "{schema}"."{t}" (
    seq          bigint      NOT NULL,
    -- UUIDv7 for plain-SQL producers (PostgreSQL 15 has no uuidv7()): the
    -- random v4 with its first 48 bits replaced by Unix milliseconds and the
    -- version nibble set to 7. `enqueue` always sends its own id.
    id           uuid        NOT NULL DEFAULT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
                                 placing substring(int8send((extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)
                                 from 1 for 6), 52, 1), 53, 1), 'hex')::uuid,
    -- the producer's transaction id: diagnostics only, ordering does not use it
    txid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    topic        text        NOT NULL,
    key          text,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}',
    tenant       text,
    available_at timestamptz NOT NULL DEFAULT now(),
    max_attempts integer,
    created_at   timestamptz NOT NULL DEFAULT now(),
    status       text        NOT NULL DEFAULT 'pending'
                             CONSTRAINT "{t}_status_check" CHECK (status IN ('pending', 'dead', 'sent')),
    attempts     integer     NOT NULL DEFAULT 0,
    lease_token  uuid,
    lease_until  timestamptz,
    last_error   text,
    -- a dead keyed row that holds its key back
    parked       boolean     NOT NULL DEFAULT false,
    sent_at      timestamptz,
    CONSTRAINT "{t}_pkey" PRIMARY KEY (seq)
);

ALTER SEQUENCE "{schema}"."{t}_seq" OWNED BY "{schema}"."{t}".seq;

-- idempotency: one row per message id; also serves `Filter::ids`
CREATE UNIQUE INDEX "{t}_id_key" ON "{schema}"."{t}" (id);

-- Claim indexes. Each is partial so it holds only the rows a claim can want
-- and stays small however many dead rows pile up.
--   keyless claims: oldest first, FOR UPDATE SKIP LOCKED
CREATE INDEX "{t}_keyless_idx" ON "{schema}"."{t}" (seq)
    WHERE key IS NULL AND status = 'pending';
--   keyed claims, window over the oldest keyed rows
CREATE INDEX "{t}_keyed_idx" ON "{schema}"."{t}" (seq)
    WHERE key IS NOT NULL AND status = 'pending';
--   the rows that block their key (pending, leased, delayed, or dead and
--   parked): the first entry of each key is its head. Serves the "no earlier
--   blocking row" probe and the walk over distinct keys.
CREATE INDEX "{t}_head_idx" ON "{schema}"."{t}" (key, seq)
    WHERE key IS NOT NULL AND (status = 'pending' OR parked);
--   admin: dead letters
CREATE INDEX "{t}_dead_idx" ON "{schema}"."{t}" (seq)
    WHERE status = 'dead';

-- Per-key ordering. A keyed insert first takes a transaction-scoped advisory
-- lock on (this table's oid, hashtext(key)), then takes its `seq`. Writers of
-- the same key therefore queue until the earlier one commits or rolls back,
-- so a key's rows become visible in `seq` order and a visible head never gets
-- a lower-seq sibling later. Keyless inserts take no lock. The lock's first
-- half is the table oid so `pg_locks` shows exactly which locks are postbox's
-- (classid = table oid, objsubid = 2).
CREATE FUNCTION "{schema}"."{t}_before_insert"() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.key IS NOT NULL THEN
        PERFORM pg_catalog.pg_advisory_xact_lock(TG_RELID::int4, pg_catalog.hashtext(NEW.key));
    END IF;
    NEW.seq := pg_catalog.nextval('"{schema}"."{t}_seq"');
    RETURN NEW;
END
$fn$;

CREATE TRIGGER "{t}_before_insert" BEFORE INSERT ON "{schema}"."{t}"
    FOR EACH ROW EXECUTE FUNCTION "{schema}"."{t}_before_insert"();
