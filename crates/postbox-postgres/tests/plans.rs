//! Plans at scale: a claim prepared while the table was empty still uses
//! the claim indexes after a million rows arrive (custom plans on relay
//! sessions), checked with EXPLAIN, never with a timer.

mod common;

use common::PgHarness;
use postbox_core::{ClaimRequest, Store};
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_prepared_on_empty_table_uses_indexes_after_a_million_rows() {
    let h = PgHarness::new().await;
    let t = h.outbox.qualified_name().to_owned();
    let claim_sql = postbox_postgres::PgStore::claim_sql_for_explain(&h.outbox);

    // A relay session (same connect options as the store's pool).
    let mut relay =
        sqlx::PgConnection::connect_with(&postbox_postgres::relay_connect_options(h.db.options()))
            .await
            .expect("relay session");
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut relay)
        .await
        .expect("show");
    assert_eq!(mode, "force_custom_plan");
    sqlx::query(&format!(
        "PREPARE claim(int8, int8, uuid, text, int8, text, int4) AS {claim_sql}"
    ))
    .execute(&mut relay)
    .await
    .expect("prepare");
    // executed on the empty table more often than the 5 custom plans after
    // which PostgreSQL would otherwise settle on a generic plan
    for _ in 0..8 {
        sqlx::query("EXECUTE claim(100, 30000000, gen_random_uuid(), NULL, 200, NULL, 100)")
            .execute(&mut relay)
            .await
            .expect("execute on empty table");
    }

    // One million rows through the production trigger: a hot key's backlog
    // of 300k at the front, then 400k over 1000 keys, then 300k keyless.
    sqlx::query(&format!(
        "INSERT INTO {t} (topic, key, payload)
         SELECT 't', CASE WHEN g <= 300000 THEN 'hot'
                          WHEN g <= 700000 THEN 'k' || (g % 1000)
                          ELSE NULL END,
                '\\x00'
           FROM generate_series(1, 1000000) AS g"
    ))
    .execute(&h.app)
    .await
    .expect("load");
    // no ANALYZE: autovacuum may or may not have run; the custom plan must
    // be fine either way

    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN (COSTS OFF) EXECUTE claim(100, 30000000, gen_random_uuid(), NULL, 200, NULL, 100)",
    )
    .fetch_all(&mut relay)
    .await
    .expect("explain");
    let plan = plan.join("\n");
    let table = h.outbox.table().as_str();
    assert!(
        !plan.contains(&format!("Seq Scan on {table}")),
        "claim plan scans the table:\n{plan}"
    );
    for index in ["_keyless_idx", "_keyed_idx", "_head_idx"] {
        assert!(
            plan.contains(&format!("{table}{index}")),
            "claim plan does not use {index}:\n{plan}"
        );
    }

    // and the claim is right: the hot head plus other keys' heads plus keyless
    let c = h
        .store
        .claim(&ClaimRequest::new(100, std::time::Duration::from_secs(30)))
        .await
        .expect("claim");
    assert_eq!(c.messages.len(), 100);
    let hot = c
        .messages
        .iter()
        .filter(|m| m.key.as_deref() == Some("hot"))
        .count();
    assert_eq!(hot, 1, "exactly the hot key's head");
    assert!(
        c.messages
            .iter()
            .any(|m| m.key.as_deref().is_some_and(|k| k.starts_with('k'))),
        "other keys starved"
    );
    let mut keys: Vec<_> = c.messages.iter().filter_map(|m| m.key.clone()).collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "two messages of one key in a claim");
}
