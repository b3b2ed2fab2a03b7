//! Shared test plumbing: a fresh database per test on the local server.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use postbox_core::{Claim, CompleteReport, Completion, Disposition, NewMessage, Store};
use postbox_postgres::{PgOutbox, PgStore};
use postbox_testkit::StoreHarness;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

/// A database created for one test and dropped (best effort) at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

/// The admin URL of the local server: role `postgres` (trust auth), or
/// `root` if that is the one that works.
pub async fn admin_url() -> String {
    let addr = postbox_testkit::services::POSTGRES.require().await;
    for role in ["postgres", "root"] {
        let url = format!("postgres://{role}@{addr}/test");
        if sqlx::PgConnection::connect(&url).await.is_ok() {
            return url;
        }
    }
    panic!(
        "PostgreSQL at {addr} accepts neither role postgres nor root on database test (trust auth expected)"
    );
}

impl TestDb {
    pub async fn create() -> Self {
        let admin_url = admin_url().await;
        let name = format!("postbox_test_{:016x}", fastrand::u64(..));
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("admin connect");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create database");
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => unreachable!(),
        };
        Self {
            name,
            url,
            admin_url,
        }
    }

    pub fn options(&self) -> PgConnectOptions {
        self.url.parse().expect("url")
    }

    /// A plain pool, as an application would have.
    pub async fn app_pool(&self, size: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(30))
            .connect(&self.url)
            .await
            .expect("app pool")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // best effort, on its own thread: Drop cannot await
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut c)
                                .await;
                    }
                });
            }
        })
        .join();
    }
}

/// The conformance harness: a fresh database, migrated, with a relay store.
pub struct PgHarness {
    pub db: TestDb,
    pub store: PgStore,
    pub app: PgPool,
    pub outbox: PgOutbox,
}

impl PgHarness {
    pub async fn new() -> Self {
        Self::with_outbox(PgOutbox::default()).await
    }

    /// `SELECT <what> FROM <the outbox table> <rest>` as one `int8`.
    pub async fn scalar(&self, what: &str, rest: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT {what} FROM {} {rest}",
            self.outbox.qualified_name()
        ))
        .fetch_one(&self.app)
        .await
        .expect("scalar query")
    }

    pub async fn with_outbox(outbox: PgOutbox) -> Self {
        let db = TestDb::create().await;
        let store = PgStore::connect_with(&db.url, outbox.clone())
            .await
            .expect("connect");
        store.migrate().await.expect("migrate");
        let app = db.app_pool(8).await;
        Self {
            db,
            store,
            app,
            outbox,
        }
    }
}

impl StoreHarness for PgHarness {
    type Store = PgStore;

    fn store(&self) -> PgStore {
        self.store.clone()
    }

    async fn enqueue(&self, msgs: Vec<NewMessage>) {
        let mut tx = self.app.begin().await.expect("begin");
        // alternate the two producer paths so both are under the suite
        if msgs.len().is_multiple_of(2) {
            self.outbox
                .enqueue_batch(&mut *tx, &msgs)
                .await
                .expect("enqueue_batch");
        } else {
            for m in &msgs {
                self.outbox.enqueue(&mut *tx, m).await.expect("enqueue");
            }
        }
        tx.commit().await.expect("commit");
    }

    async fn enqueue_rolled_back(&self, msgs: Vec<NewMessage>) {
        let mut tx = self.app.begin().await.expect("begin");
        self.outbox
            .enqueue_batch(&mut *tx, &msgs)
            .await
            .expect("enqueue_batch");
        tx.rollback().await.expect("rollback");
    }

    async fn advance(&self, by: Duration) {
        let us = i64::try_from(by.as_micros()).expect("duration");
        sqlx::query(&format!(
            "UPDATE {} SET available_at = available_at - $1 * interval '1 microsecond',
                           lease_until = lease_until - $1 * interval '1 microsecond',
                           created_at = created_at - $1 * interval '1 microsecond',
                           sent_at = sent_at - $1 * interval '1 microsecond'",
            self.outbox.qualified_name()
        ))
        .bind(us)
        .execute(&self.app)
        .await
        .expect("advance");
        // heartbeats are stamped on the database clock too
        sqlx::query(&format!(
            "UPDATE {}.\"{}_relays\" SET last_heartbeat = last_heartbeat - $1 * interval '1 microsecond'",
            self.outbox.schema().quoted(),
            self.outbox.table().as_str()
        ))
        .bind(us)
        .execute(&self.app)
        .await
        .expect("advance heartbeats");
    }

    fn retaining_store(&self, keep: Duration) -> PgStore {
        self.store.clone().retain_sent(Some(keep))
    }
}

/// Records `disposition` for every message of `claim`; returns what that
/// applied.
pub async fn complete_all(
    store: &PgStore,
    claim: &Claim,
    disposition: Disposition,
) -> CompleteReport {
    let done: Vec<_> = claim
        .messages
        .iter()
        .map(|m| Completion::new(m.seq, disposition.clone()))
        .collect();
    store
        .complete(claim.lease.token, &done)
        .await
        .expect("complete")
}

/// A dead letter that parks its key.
pub fn parked() -> Disposition {
    Disposition::Dead {
        error: "rejected".into(),
        park: true,
    }
}
