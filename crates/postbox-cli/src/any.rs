//! Runtime choice of store and publisher, made once from URLs.

use std::time::Duration;

use anyhow::Context as _;
use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Filter, ListQuery, Message, MessageRecord,
    NewMessage, PublishOutcome, Publisher, PurgeQuery, Stats, Store, StoreError, redact_url,
};
use postbox_jsonl::{FilePublisher, StdoutPublisher};
use postbox_mysql::{MySqlOutbox, MySqlStore};
use postbox_postgres::{PgOutbox, PgStore};
use postbox_sqlite::{SqliteOutbox, SqliteStore};
use uuid::Uuid;

use crate::cli::StoreArgs;
use crate::usage;

/// Every store the binary knows.
#[derive(Debug, Clone)]
pub(crate) enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PgStore),
    MySql(MySqlStore),
}

macro_rules! each_store {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e,
            AnyStore::Postgres($s) => $e,
            AnyStore::MySql($s) => $e,
        }
    };
}

/// How long a command waits for an unreachable database.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Patience {
    /// One-shot commands: a few seconds, then exit 1.
    Brief,
    /// The relay: forever, with backoff.
    Forever,
}

impl AnyStore {
    /// Opens the store a URL names, retrying an unreachable database as
    /// `patience` allows.
    pub(crate) async fn open(args: &StoreArgs, patience: Patience) -> anyhow::Result<Self> {
        let url = args.url.as_str();
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        let backoff =
            postbox_core::RetryPolicy::new(Duration::from_millis(200), Duration::from_secs(10));
        let started = tokio::time::Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let opened = match scheme {
                "sqlite" => Self::open_sqlite(url, &args.table).await,
                "postgres" | "postgresql" => Self::open_postgres(url, &args.table).await,
                "mysql" | "mariadb" => Self::open_mysql(url, &args.table).await,
                _ => {
                    return Err(usage(format!(
                        "unknown store URL scheme in {:?}: use sqlite://path.db, postgres://… or mysql://…",
                        redact_url(url)
                    )));
                }
            };
            match opened {
                Err(e) if e.is_transient() => {
                    let wait = backoff.delay_with(attempt, 0.5 + fastrand::f64() / 2.0);
                    if matches!(patience, Patience::Brief)
                        && started.elapsed() + wait > Duration::from_secs(5)
                    {
                        return Err(anyhow::Error::new(e)).with_context(|| {
                            format!("cannot reach the database at {}", redact_url(url))
                        });
                    }
                    tracing::warn!(url = %redact_url(url), error = %e, ?wait, "database unreachable, retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other.map_err(anyhow::Error::new),
            }
        }
    }

    async fn open_sqlite(url: &str, table: &str) -> Result<Self, StoreError> {
        let outbox = SqliteOutbox::new(table)?;
        let store = SqliteStore::connect(url).await?;
        Ok(Self::Sqlite(outbox.store(store.pool().clone())))
    }

    /// `--table` is `table` or, on PostgreSQL, `schema.table`.
    async fn open_postgres(url: &str, table: &str) -> Result<Self, StoreError> {
        let outbox = match table.split_once('.') {
            Some((schema, table)) => PgOutbox::with_schema(schema, table)?,
            None => PgOutbox::new(table)?,
        };
        Ok(Self::Postgres(PgStore::connect_with(url, outbox).await?))
    }

    async fn open_mysql(url: &str, table: &str) -> Result<Self, StoreError> {
        let outbox = MySqlOutbox::new(table)?;
        Ok(Self::MySql(
            MySqlStore::connect(url).await?.with_outbox(outbox),
        ))
    }

    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.outbox().migrate(s.pool()).await,
            AnyStore::Postgres(s) => s.migrate().await,
            AnyStore::MySql(s) => s.outbox().migrate(s.pool()).await,
        }
    }

    pub(crate) async fn enqueue(&self, msg: &NewMessage) -> Result<(), StoreError> {
        match self {
            AnyStore::Sqlite(s) => s.outbox().enqueue(s.pool(), msg).await,
            AnyStore::Postgres(s) => s.outbox().enqueue(s.pool(), msg).await,
            AnyStore::MySql(s) => s.outbox().enqueue(s.pool(), msg).await,
        }
    }
}

impl Store for AnyStore {
    async fn claim(&self, req: &ClaimRequest) -> Result<Claim, StoreError> {
        each_store!(self, s => s.claim(req).await)
    }

    async fn complete(
        &self,
        token: Uuid,
        completions: &[Completion],
    ) -> Result<CompleteReport, StoreError> {
        each_store!(self, s => s.complete(token, completions).await)
    }

    async fn notified(&self) {
        each_store!(self, s => s.notified().await)
    }

    async fn stats(&self, filter: &Filter) -> Result<Stats, StoreError> {
        each_store!(self, s => s.stats(filter).await)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<MessageRecord>, StoreError> {
        each_store!(self, s => s.list(query).await)
    }

    async fn replay(&self, filter: &Filter) -> Result<u64, StoreError> {
        each_store!(self, s => s.replay(filter).await)
    }

    async fn skip(&self, filter: &Filter) -> Result<u64, StoreError> {
        each_store!(self, s => s.skip(filter).await)
    }

    async fn purge(&self, query: &PurgeQuery) -> Result<u64, StoreError> {
        each_store!(self, s => s.purge(query).await)
    }
}

/// Every publisher the binary knows.
#[derive(Debug, Clone)]
pub(crate) enum AnyPublisher {
    Stdout(StdoutPublisher),
    File(FilePublisher),
}

impl AnyPublisher {
    /// Builds the publisher a URL names. A broker that is down is not an
    /// error here: its messages fail transiently until it is back.
    pub(crate) async fn from_url(url: &str) -> anyhow::Result<Self> {
        let scheme = url.split_once("://").map_or(url, |(s, _)| s);
        match scheme {
            "stdout" => Ok(Self::Stdout(StdoutPublisher)),
            "file" => Ok(Self::File(FilePublisher::from_url(url)?)),
            _ => Err(usage(format!(
                "unknown publish URL {:?}: use stdout or file:///path/out.jsonl",
                redact_url(url)
            ))),
        }
    }
}

impl Publisher for AnyPublisher {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        match self {
            AnyPublisher::Stdout(p) => p.publish(batch).await,
            AnyPublisher::File(p) => p.publish(batch).await,
        }
    }
}
