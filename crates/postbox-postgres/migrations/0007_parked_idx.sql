-- The dead rows that hold their key back. Keyed claims find heads within
-- their window (the oldest pending keyed rows: a row is its key's head when
-- it is the key's first row there) and then ask this index, usually empty,
-- whether a parked row still holds the key. That replaces one probe of
-- `head_idx` per candidate, whose cost grew with the backlog (a descent into
-- a large index, cache misses and all: 1-2 us per probe at 10k rows, 6-7 us
-- at 1M). Rows that are not parked (every row a producer inserts) only
-- have the predicate evaluated.
CREATE INDEX "{t}_parked_idx" ON "{schema}"."{t}" (key, seq)
    WHERE parked;
