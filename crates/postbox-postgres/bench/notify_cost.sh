#!/usr/bin/env bash
# Measures what the outbox row and a NOTIFY cost a producer: 8 concurrent
# writers (pgbench, prepared statements), one business INSERT per transaction.
#
#   crates/postbox-postgres/bench/notify_cost.sh [seconds-per-run]   (default 15)
#
# Needs psql/pgbench and a trust-auth server at $PGHOST:$PGPORT (127.0.0.1:5432).
# Creates and drops the database postbox_bench_notify.
set -euo pipefail
secs=${1:-15}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
here=$(cd "$(dirname "$0")" && pwd)
db=postbox_bench_notify
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true' EXIT

psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
sed -e 's/{schema}/public/g' -e 's/{t}/postbox_outbox/g' "$here/../migrations/0001_outbox.sql" | psql -q -d $db -v ON_ERROR_STOP=1
psql -q -d $db -v ON_ERROR_STOP=1 <<'SQL'
CREATE TABLE orders (id bigserial PRIMARY KEY, customer int NOT NULL, total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
-- the per-row NOTIFY variant
CREATE FUNCTION notify_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('postbox_outbox', ''); RETURN NULL; END $$;
-- the statement-level NOTIFY variant
CREATE FUNCTION notify_stmt() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('postbox_outbox', ''); RETURN NULL; END $$;
SQL

cat > "$tmp/business.sql" <<'SQL'
\set c random(1, 100000)
BEGIN;
INSERT INTO orders (customer, total) VALUES (:c, 42.5);
COMMIT;
SQL
cat > "$tmp/keyless.sql" <<'SQL'
\set c random(1, 100000)
BEGIN;
INSERT INTO orders (customer, total) VALUES (:c, 42.5);
INSERT INTO postbox_outbox (topic, payload, headers) VALUES ('orders.created', convert_to('{"customer":' || :c || ',"total":42.5,"note":"a typical small event body of about two hundred bytes, padded to look like one.........................."}', 'UTF8'), '{"content-type":"application/json"}');
COMMIT;
SQL
sed 's/(topic, payload, headers) VALUES (/(topic, key, payload, headers) VALUES (/; s/VALUES ('"'"'orders.created'"'"', /VALUES ('"'"'orders.created'"'"', '"'"'customer-'"'"' || :c, /' "$tmp/keyless.sql" > "$tmp/keyed.sql"

run() { # name script
    local tps
    tps=$(pgbench -n -M prepared -c 8 -j 2 -T "$secs" -f "$2" $db 2>/dev/null | awk '/^tps/ {print $3; exit}')
    printf '%-44s %10.0f txn/s %8.1f us/txn\n' "$1" "$tps" "$(echo "8000000/$tps" | bc -l)"
    echo "$1 $tps" >> "$tmp/results"
}
run "business row only" "$tmp/business.sql"
run "+ outbox row, keyless" "$tmp/keyless.sql"
run "+ outbox row, keyed (advisory lock)" "$tmp/keyed.sql"
psql -q -d $db -c "CREATE TRIGGER n AFTER INSERT ON postbox_outbox FOR EACH ROW EXECUTE FUNCTION notify_row()"
run "+ keyed outbox row + NOTIFY (row trigger)" "$tmp/keyed.sql"
psql -q -d $db -c "DROP TRIGGER n ON postbox_outbox" -c "CREATE TRIGGER n AFTER INSERT ON postbox_outbox FOR EACH STATEMENT EXECUTE FUNCTION notify_stmt()"
run "+ keyed outbox row + NOTIFY (stmt trigger)" "$tmp/keyed.sql"
psql -q -d $db -c "DROP TRIGGER n ON postbox_outbox"
run "business row only (again)" "$tmp/business.sql"
base=$(awk 'NR==1 {print $NF}' "$tmp/results")
echo "ratios to 'business row only':"
awk -v b="$base" '{ t=$NF; $NF=""; printf "  %-44s %.2f\n", $0, t/b }' "$tmp/results"
