//! Plans at scale: claims prepared while the table was empty still use the
//! claim indexes after a million rows arrive: claim sessions plan each
//! statement once (generic plans, sequential and bitmap scans off), so the
//! plan made on the empty table is the one that runs. And the retention
//! cleanup uses its sent index. Checked with EXPLAIN, never with a timer.

mod common;

use common::PgHarness;
use postbox_core::{ClaimRequest, Store};
use sqlx::Connection;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_prepared_on_empty_table_uses_indexes_after_a_million_rows() {
    let h = PgHarness::new().await;
    let t = h.outbox.qualified_name().to_owned();
    // Every claim statement (see the store's `claim` and the `claim`
    // module), with the parameters a relay with batch 100 binds, and the
    // indexes its plan must use.
    let o = &h.outbox;
    let want: &[(&str, &str, &[&str])] = &[
        ("keyless", "", &["_keyless_idx"]),
        ("keyless_bulk", ", 0", &["_keyless_idx"]),
        ("keyless_held", ", 0", &["_keyless_idx"]),
        (
            "keyed",
            ", 200",
            &["_keyless_idx", "_keyed_idx", "_parked_idx"],
        ),
        (
            "keyed_bulk",
            ", 200",
            &["_keyless_idx", "_keyed_idx", "_parked_idx"],
        ),
        (
            "walk",
            ", 200, '', 100",
            &["_keyless_idx", "_keyed_idx", "_parked_idx", "_head_idx"],
        ),
        ("keyless_tenant", ", 't3'", &["_tenant_idx"]),
        ("keyless_bulk_tenant", ", 0, 't3'", &["_tenant_idx"]),
        ("keyless_held_tenant", ", 0, 't3'", &["_tenant_idx"]),
        ("keyed_tenant", ", 200, 't3'", &["_tenant_idx", "_head_idx"]),
        (
            "keyed_bulk_tenant",
            ", 200, 't3'",
            &["_tenant_idx", "_head_idx"],
        ),
        (
            "walk_tenant",
            ", 200, '', 100, 't3'",
            &["_tenant_idx", "_head_idx"],
        ),
    ];
    let statements = postbox_postgres::PgStore::claim_statements(o);
    assert_eq!(statements.len(), want.len());
    let mut statements: Vec<_> = statements
        .into_iter()
        .zip(want)
        .map(|((name, types, sql), (wname, args, indexes))| {
            assert_eq!(name, *wname);
            (
                name,
                types,
                sql,
                format!("100, 30000000, gen_random_uuid(){args}"),
                *indexes,
            )
        })
        .collect();
    // and the retention cleanup (same sessions): a week, 500 rows
    statements.push((
        "purge_sent",
        "int8, int8",
        postbox_postgres::PgStore::purge_sent_sql_for_explain(o),
        "604800000000, 500".to_owned(),
        &["_sent_idx"][..],
    ));

    // A relay session (same connect options as the store's pool).
    let mut relay =
        sqlx::PgConnection::connect_with(&postbox_postgres::relay_connect_options(h.db.options()))
            .await
            .expect("relay session");
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut relay)
        .await
        .expect("show");
    assert_eq!(mode, "force_generic_plan");
    // relay_connect_options is public, and users build the pools they enqueue
    // on with it: it must leave commits durable (only the store's private
    // claim pool commits without the flush)
    let commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut relay)
        .await
        .expect("show");
    assert_eq!(commit, "on");
    for (name, types, sql, args, _) in &statements {
        sqlx::query(&format!("PREPARE {name}({types}) AS {sql}"))
            .execute(&mut relay)
            .await
            .expect("prepare");
        // executed on the empty table: the plan is made now, and kept
        for _ in 0..3 {
            sqlx::query(&format!("EXECUTE {name}({args})"))
                .execute(&mut relay)
                .await
                .expect("execute on empty table");
        }
    }

    // One million rows through the production trigger: a hot key's backlog
    // of 300k at the front, then 400k over 1000 keys, then 300k keyless;
    // every tenth row of one of 7 tenants.
    sqlx::query(&format!(
        "INSERT INTO {t} (topic, key, payload, tenant)
         SELECT 't', CASE WHEN g <= 300000 THEN 'hot'
                          WHEN g <= 700000 THEN 'k' || (g % 1000)
                          ELSE NULL END,
                '\\x00',
                CASE WHEN g % 10 = 0 THEN 't' || (g % 7) END
           FROM generate_series(1, 1000000) AS g"
    ))
    .execute(&h.app)
    .await
    .expect("load");
    // no ANALYZE: autovacuum may or may not have run (and replan); the plan
    // must be fine either way

    let table = h.outbox.table().as_str();
    for (name, _, _, args, indexes) in &statements {
        let plan: Vec<String> =
            sqlx::query_scalar(&format!("EXPLAIN (COSTS OFF) EXECUTE {name}({args})"))
                .fetch_all(&mut relay)
                .await
                .expect("explain");
        let plan = plan.join("\n");
        assert!(
            !plan.contains(&format!("Seq Scan on {table}")),
            "{name} plan scans the table:\n{plan}"
        );
        for index in *indexes {
            assert!(
                plan.contains(&format!("{table}{index}")),
                "{name} plan does not use {index}:\n{plan}"
            );
        }
        // any tenant's keyed claims find each key's first row in the window
        // with a hash aggregate, not a sort of the window
        if ["keyed", "keyed_bulk", "walk"].contains(name) {
            assert!(
                plan.contains("HashAggregate") && plan.contains("Group Key: hashtextextended("),
                "{name} plan does not hash the window's keys:\n{plan}"
            );
        }
        // the lease `UPDATE` finds the rows it locked by their address
        if !name.contains("held") && *name != "purge_sent" {
            assert!(
                plan.contains(&format!("Tid Scan on {table}")),
                "{name} plan does not lease by address:\n{plan}"
            );
        }
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
