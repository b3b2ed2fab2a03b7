#!/usr/bin/env bash
# What an outbox row costs the server, part by part: one backend inserts
# `rows` rows, one statement per row, in a plpgsql loop (no client, no round
# trip), and the backend's own CPU time (/proc/<pid>/schedstat, so the
# server must run on this machine) is divided by the rows. CPU time rather
# than wall time because this machine's hypervisor steals up to a third of
# the wall clock. Variants, interleaved round by round; min, first quartile
# and median per variant:
#
#   bare      the outbox's columns, primary key only
#   check     bare + the CHECK on `status` (as in migration 1)
#   domain    bare with `status` a domain carrying that CHECK
#   false1    bare + one partial index a keyed row does not enter
#   false5    bare + the five partial indexes a keyed row does not enter
#             (keyless, dead, parked, tenant, sent)
#   false5chk false5 + the CHECK
#   id        bare + the unique `id` index
#   keyed     bare + the keyed claim index
#   head      bare + the head index `(key, seq)`
#   headc     bare + the head index on `key COLLATE "C"`
#   outbox    the table as `migrate` makes it
#
# Every row is keyed ('order-<n>'), carries one header and gets `seq` from
# the table's sequence in the statement, as `enqueue` does (the key's
# advisory lock is left out: in one transaction of many rows they would
# pile up, and it is the same for every variant).
#
#   crates/postbox-postgres/bench/insert_cpu.sh [rows] [rounds]   (default 20000, 10)
#
# Needs psql and a trust-auth server at $PGHOST:$PGPORT (127.0.0.1:5432) on
# this machine. Creates and drops the database postbox_bench_insert_cpu.
set -euo pipefail
rows=${1:-20000}
rounds=${2:-10}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
here=$(cd "$(dirname "$0")" && pwd)
db=postbox_bench_insert_cpu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true' EXIT
variants="bare check domain false1 false5 false5chk id keyed head headc outbox"

psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
p() { psql -q -d $db -v ON_ERROR_STOP=1 "$@"; }
for f in "$here"/../migrations/*.sql; do
    sed -e "s/{schema}/public/g" -e "s/{t}/outbox/g" "$f" | p
done
chk="CHECK (status IN ('pending', 'dead', 'sent'))"
like() { echo "CREATE TABLE $1 (LIKE outbox INCLUDING DEFAULTS) WITH (fillfactor = 50); ALTER TABLE $1 ADD PRIMARY KEY (seq);"; }
false5() {
    echo "CREATE INDEX ON $1 (seq) WHERE key IS NULL AND status = 'pending';
          CREATE INDEX ON $1 (seq) WHERE status = 'dead';
          CREATE INDEX ON $1 (key, seq) WHERE parked;
          CREATE INDEX ON $1 (tenant, seq) WHERE tenant IS NOT NULL AND status = 'pending';
          CREATE INDEX ON $1 (sent_at) WHERE status = 'sent';"
}
p <<SQL
$(like bare)
$(like "\"check\"") ALTER TABLE "check" ADD $chk;
CREATE DOMAIN status_domain AS text ${chk/status/VALUE};
$(like domain) ALTER TABLE domain ALTER COLUMN status TYPE status_domain;
$(like false1) CREATE INDEX ON false1 (seq) WHERE status = 'dead';
$(like false5) $(false5 false5)
$(like false5chk) $(false5 false5chk) ALTER TABLE false5chk ADD $chk;
$(like id) CREATE UNIQUE INDEX ON id (id);
$(like keyed) CREATE INDEX ON keyed (seq) WHERE key IS NOT NULL AND status = 'pending';
$(like head) CREATE INDEX ON head (key, seq) WHERE key IS NOT NULL AND (status = 'pending' OR parked);
$(like headc) CREATE INDEX ON headc (key COLLATE "C", seq) WHERE key IS NOT NULL AND (status = 'pending' OR parked);
SQL
{
    echo 'CREATE FUNCTION ins(tbl text, n int) RETURNS void LANGUAGE plpgsql AS $f$'
    echo 'DECLARE k text; BEGIN FOR i IN 1..n LOOP k := '"'order-'"' || i; CASE tbl'
    for v in $variants; do
        echo "WHEN '$v' THEN INSERT INTO \"$v\" (seq, id, topic, key, payload, headers, tenant, available_at, max_attempts)
              VALUES (nextval('outbox_seq'), gen_random_uuid(), 'orders.created', k,
                      '\\x7b226f72646572223a2031323334357d'::bytea,
                      '{\"content-type\":\"application/json\"}'::text::jsonb, NULL, now(), NULL);"
    done
    echo 'END CASE; END LOOP; END $f$;'
} | p

tables=$(for v in $variants; do printf '"%s",' "$v"; done)
for r in $(seq "$rounds"); do
    for v in $variants; do
        # the backend's CPU time (ns, first field of schedstat) around the loop
        p -At <<SQL
TRUNCATE ${tables%,};
SELECT pg_backend_pid() AS pid \gset
\setenv BPID :pid
\! cut -d' ' -f1 /proc/\$BPID/schedstat > $tmp/before
\o /dev/null
SELECT ins('$v', $rows);
\o
\! echo "$v \$(( (\$(cut -d' ' -f1 /proc/\$BPID/schedstat) - \$(cat $tmp/before)) / $rows ))" >> $tmp/samples
SQL
    done
done
echo "ns of backend CPU per row ($rows rows x $rounds rounds): min, first quartile, median"
for v in $variants; do
    grep "^$v " "$tmp/samples" | cut -d' ' -f2 | sort -n | awk -v v="$v" '
        { a[NR] = $1 }
        END { printf "%-10s %7d %7d %7d\n", v, a[1], a[int((NR + 3) / 4)], a[int((NR + 1) / 2)] }'
done
