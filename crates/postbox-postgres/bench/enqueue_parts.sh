#!/usr/bin/env bash
# What each part of an enqueued row costs a producer: 8 concurrent writers
# (pgbench, prepared statements), one business INSERT plus one keyed outbox
# row per transaction, with `synchronous_commit = off` so that CPU, not the
# disk flush, is measured. Variants of the outbox table, interleaved round by
# round, medians printed with every sample:
#
#   viatrig  the table as `migrate` makes it, row through the trigger (as
#            before migration 6, and as plain-SQL producers still go)
#   inlined  the table as `migrate` makes it, lock and seq in the statement
#            (what `enqueue` sends since migration 6)
#   notrig   no trigger at all (seq from a column default, no key lock)
#   noid     `viatrig` without the unique id index
#   noidx    `viatrig` without any secondary index
#   minimal  (seq bigserial primary key, topic, key, payload)
#
#   crates/postbox-postgres/bench/enqueue_parts.sh [seconds-per-run] [rounds]   (default 6, 5)
#
# Needs psql/pgbench and a trust-auth server at $PGHOST:$PGPORT (127.0.0.1:5432).
# Creates and drops the database postbox_bench_enqueue.
set -euo pipefail
secs=${1:-6}
rounds=${2:-5}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
here=$(cd "$(dirname "$0")" && pwd)
db=postbox_bench_enqueue
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true' EXIT
variants="viatrig inlined notrig noid noidx minimal"

psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
p() { psql -q -d $db -v ON_ERROR_STOP=1 "$@"; }
p -c "CREATE TABLE bench_orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
for s in viatrig inlined notrig noid noidx; do
    p -c "CREATE SCHEMA $s"
    for f in "$here"/../migrations/*.sql; do
        case $f in *_relays.sql) continue ;; esac
        sed -e "s/{schema}/$s/g" -e "s/{t}/outbox/g" "$f" | p
    done
done
p -c "DROP TRIGGER outbox_before_insert ON notrig.outbox" \
  -c "ALTER TABLE notrig.outbox ALTER seq SET DEFAULT nextval('notrig.outbox_seq')" \
  -c "DROP INDEX noid.outbox_id_key" \
  -c "DROP INDEX noidx.outbox_id_key, noidx.outbox_keyless_idx, noidx.outbox_keyed_idx, noidx.outbox_head_idx, noidx.outbox_dead_idx, noidx.outbox_tenant_idx, noidx.outbox_sent_idx, noidx.outbox_parked_idx" \
  -c "CREATE SCHEMA minimal" \
  -c "CREATE TABLE minimal.outbox (seq bigserial PRIMARY KEY, topic text NOT NULL, key text, payload bytea NOT NULL)"
# `viatrig` and its derivatives: every row through the trigger, as before migration 6
for s in viatrig noid noidx; do
    p -c "DROP TRIGGER outbox_before_insert ON $s.outbox" \
      -c "CREATE TRIGGER outbox_before_insert BEFORE INSERT ON $s.outbox FOR EACH ROW EXECUTE FUNCTION $s.outbox_before_insert()"
done

payload="convert_to('{\"order\":' || :k || ',\"customer\":\"customer-1\",\"amount\":42000,\"note\":\"a typical small event body of about two hundred bytes, padded to look like one....................\"}', 'UTF8')"
business="INSERT INTO bench_orders (customer, amount) VALUES ('customer-1', 42);"
cols="(id, topic, key, payload, headers, tenant, available_at, max_attempts)"
vals="gen_random_uuid(), 'orders.created', 'order-' || :k, $payload, '{\"content-type\":\"application/json\"}'::text::jsonb, NULL, COALESCE('epoch'::timestamptz + NULL::int8 * interval '1 microsecond', now()), NULL"
script() { printf '\\set k random(1, 1000000000)\nBEGIN;\n%s\n%s\nEND;\n' "$business" "$2" > "$tmp/$1.sql"; }
printf 'BEGIN;\n%s\nEND;\n' "$business" > "$tmp/business.sql"
for s in viatrig notrig noid noidx; do
    script $s "INSERT INTO $s.outbox $cols VALUES ($vals);"
done
script inlined "INSERT INTO inlined.outbox (seq, id, topic, key, payload, headers, tenant, available_at, max_attempts)
 SELECT nextval('inlined.outbox_seq'), $vals
  WHERE (SELECT count(*) FROM (SELECT pg_advisory_xact_lock('inlined.outbox'::regclass::oid::int4, hashtext('order-' || :k))) AS taken) >= 0;"
script minimal "INSERT INTO minimal.outbox (topic, key, payload) VALUES ('orders.created', 'order-' || :k, $payload);"

export PGOPTIONS="-c synchronous_commit=off"
for r in $(seq "$rounds"); do
    for v in business $variants; do
        p -c "TRUNCATE bench_orders, viatrig.outbox, inlined.outbox, notrig.outbox, noid.outbox, noidx.outbox, minimal.outbox" -c CHECKPOINT
        tps=$(pgbench -n -M prepared -c 8 -j 2 -T "$secs" -f "$tmp/$v.sql" $db 2>&1 | sed -n 's/^tps = \([0-9.]*\) (without.*/\1/p')
        echo "$v $tps" >> "$tmp/samples"
        echo "round $r: $v $tps tps" >&2
    done
done
python3 - "$tmp/samples" <<'PY'
import collections, statistics, sys
d = collections.defaultdict(list)
for line in open(sys.argv[1]):
    k, v = line.split()
    d[k].append(float(v))
b = statistics.median(d["business"])
print("| variant | txn/s (median) | ratio | extra µs per txn | samples |")
print("| --- | --- | --- | --- | --- |")
for k, v in d.items():
    m = statistics.median(v)
    print(f"| {k} | {m:.0f} | {m / b:.2f} | {1e6 / m - 1e6 / b:.1f} | {', '.join(str(round(x)) for x in v)} |")
PY
