#!/usr/bin/env bash
# Two `postbox relay` daemons drain a 2M-row keyed backlog (1,000 keys) into
# stdout (sent to /dev/null), with the relay's own vacuum on or off, and
# report the drain time and which relay vacuumed when (BENCHMARKS.md,
# session 13).
#
#   cargo build --release -p postbox-cli
#   crates/postbox-postgres/bench/two_relays_vacuum.sh --vacuum-after 200000
#   crates/postbox-postgres/bench/two_relays_vacuum.sh
#
# Extra arguments go to both relays. Needs psql and the local PostgreSQL
# (trust auth); creates and drops the database postbox_two_relays.
# Autovacuum is off for the table, so only the relays vacuum it. The
# script polls a pending count once a second, which adds some load.
set -euo pipefail
cd "$(dirname "$0")/../../.."
postbox=${POSTBOX:-target/release/postbox}
db=postbox_two_relays
url=postgres://postgres@127.0.0.1:5432/$db
logs=$(mktemp -d)
sql() { psql -h 127.0.0.1 -U postgres -d "$1" -Atq -c "$2"; }

sql postgres "DROP DATABASE IF EXISTS $db WITH (FORCE)"
sql postgres "CREATE DATABASE $db"
"$postbox" migrate --store "$url" > /dev/null 2>&1
sql "$db" "ALTER TABLE postbox_outbox SET (autovacuum_enabled = false)"
sql "$db" "INSERT INTO postbox_outbox (topic, key, payload)
           SELECT 't', 'k' || (i % 1000), 'x' FROM generate_series(1, 2000000) AS i"
sql "$db" "VACUUM ANALYZE postbox_outbox"
sql "$db" "CHECKPOINT"

start=$(date +%s.%N)
pids=()
for r in a b; do
    NO_COLOR=1 "$postbox" relay --store "$url" --publish stdout --stats-interval off "$@" \
        > /dev/null 2> "$logs/$r.log" &
    pids+=($!)
done
until [ "$(sql "$db" "SELECT count(*) FROM postbox_outbox WHERE status = 'pending'")" = 0 ]; do
    sleep 1
done
end=$(date +%s.%N)
kill -TERM "${pids[@]}"
wait "${pids[@]}" || true

echo "drained 2,000,000 keyed rows in $(echo "$end - $start" | bc) s"
for r in a b; do
    echo "relay $r: $(grep -c 'vacuumed the outbox' "$logs/$r.log" || true) vacuums," \
        "$(grep -c 'stopped its vacuum' "$logs/$r.log" || true) given way"
    grep 'vacuumed the outbox' "$logs/$r.log" | sed -E 's/\x1b\[[0-9;]*m//g' \
        | grep -oE '^[^ ]+|dead_rows=[0-9]+|took_ms=[0-9]+' | paste - - - || true
done
echo "manual vacuums of the table (one is the script's own): $(sql "$db" \
    "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'postbox_outbox'")"
sql postgres "DROP DATABASE $db WITH (FORCE)"
rm -r "$logs"
