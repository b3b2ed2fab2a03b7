//! Runtime choice of store and publisher, made once from URLs.

use std::num::NonZeroU64;
use std::time::Duration;

use anyhow::Context as _;
use postbox_core::{
    Claim, ClaimRequest, CompleteReport, Completion, Filter, GroupBy, GroupStats, ListQuery,
    Message, MessageRecord, NewMessage, PublishOutcome, Publisher, PurgeQuery, RelayHeartbeat,
    RelayRecord, Stats, Store, StoreError, redact_url,
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
                "sqlite" => Self::open_sqlite(url, &args.table, args.retain_sent).await,
                "postgres" | "postgresql" => {
                    Self::open_postgres(url, &args.table, args.retain_sent, args.vacuum_after).await
                }
                "mysql" | "mariadb" => Self::open_mysql(url, &args.table, args.retain_sent).await,
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

    async fn open_sqlite(
        url: &str,
        table: &str,
        retain_sent: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let outbox = SqliteOutbox::new(table)?.retain_sent(retain_sent);
        // `connect`'s two pools: the relay's own (`synchronous = NORMAL`)
        // and the durable one for enqueue and admin commands
        Ok(Self::Sqlite(
            SqliteStore::connect(url).await?.with_outbox(outbox),
        ))
    }

    /// `--table` is `table` or, on PostgreSQL, `schema.table`.
    async fn open_postgres(
        url: &str,
        table: &str,
        retain_sent: Option<Duration>,
        vacuum_after: Option<NonZeroU64>,
    ) -> Result<Self, StoreError> {
        let outbox = match table.split_once('.') {
            Some((schema, table)) => PgOutbox::with_schema(schema, table)?,
            None => PgOutbox::new(table)?,
        }
        .retain_sent(retain_sent)
        .vacuum_after(vacuum_after);
        Ok(Self::Postgres(PgStore::connect_with(url, outbox).await?))
    }

    async fn open_mysql(
        url: &str,
        table: &str,
        retain_sent: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let outbox = MySqlOutbox::new(table)?.retain_sent(retain_sent);
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

    fn notified(&self) -> impl std::future::Future<Output = ()> + Send {
        // the backend's wait is created (subscribed) now, not at first poll
        let woken: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> =
            each_store!(self, s => Box::pin(s.notified()));
        woken
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

    fn parallel_writes(&self) -> bool {
        each_store!(self, s => s.parallel_writes())
    }

    fn sent_retention(&self) -> Option<Duration> {
        each_store!(self, s => s.sent_retention())
    }

    async fn purge_sent(&self, older_than: Duration, limit: usize) -> Result<u64, StoreError> {
        each_store!(self, s => s.purge_sent(older_than, limit).await)
    }

    async fn stats_by(&self, filter: &Filter, by: GroupBy) -> Result<Vec<GroupStats>, StoreError> {
        each_store!(self, s => s.stats_by(filter, by).await)
    }

    async fn heartbeat(&self, heartbeat: &RelayHeartbeat) -> Result<(), StoreError> {
        each_store!(self, s => s.heartbeat(heartbeat).await)
    }

    async fn relays(&self) -> Result<Vec<RelayRecord>, StoreError> {
        each_store!(self, s => s.relays().await)
    }

    async fn remove_relay(&self, relay_id: Uuid) -> Result<bool, StoreError> {
        each_store!(self, s => s.remove_relay(relay_id).await)
    }
}

/// Every publisher the binary knows.
#[derive(Clone)]
pub(crate) enum AnyPublisher {
    Stdout(StdoutPublisher),
    File(FilePublisher),
    Nats(postbox_nats::NatsPublisher),
    Kafka(postbox_kafka::KafkaPublisher),
    RabbitMq(postbox_rabbitmq::RabbitMqPublisher),
    Redis(postbox_redis::RedisPublisher),
    Mqtt(postbox_mqtt::MqttPublisher),
    Http(postbox_http::HttpPublisher),
}

/// The environment variable a webhook publisher given only as `--publish
/// https://…` takes its signing secret from.
pub(crate) const WEBHOOK_SECRET_ENV: &str = "POSTBOX_WEBHOOK_SECRET";

fn scheme_of(url: &str) -> &str {
    url.split_once("://").map_or(url, |(s, _)| s)
}

impl AnyPublisher {
    /// How long after a publish is abandoned the broker client may still
    /// deliver it on its own, where the client keeps retrying in the
    /// background (librdkafka); `None` where dropping the publish stops it.
    pub(crate) fn lands_until(&self) -> Option<(&'static str, Duration)> {
        match self {
            Self::Kafka(p) => Some(("message_timeout_ms", p.message_timeout())),
            _ => None,
        }
    }

    /// Builds the publisher a URL names. A broker that is down is not an
    /// error here: its messages fail transiently until it is back.
    pub(crate) async fn from_url(url: &str) -> anyhow::Result<Self> {
        let bad = |e: &dyn std::fmt::Display| usage(e.to_string());
        Ok(match scheme_of(url) {
            "stdout" => Self::Stdout(StdoutPublisher),
            "file" => Self::File(FilePublisher::from_url(url)?),
            "nats" | "tls" => Self::Nats(
                postbox_nats::NatsPublisher::new(
                    postbox_nats::NatsConfig::from_url(url).map_err(|e| bad(&e))?,
                )
                .await
                .map_err(|e| bad(&e))?,
            ),
            "kafka" => Self::Kafka(
                postbox_kafka::KafkaPublisher::new(
                    postbox_kafka::KafkaConfig::from_url(url).map_err(|e| bad(&e))?,
                )
                .map_err(|e| bad(&e))?,
            ),
            "amqp" | "amqps" => Self::RabbitMq(
                postbox_rabbitmq::RabbitMqPublisher::new(
                    postbox_rabbitmq::RabbitMqConfig::from_url(url).map_err(|e| bad(&e))?,
                )
                .map_err(|e| bad(&e))?,
            ),
            "redis" | "rediss" => Self::Redis(
                postbox_redis::RedisPublisher::new(
                    postbox_redis::RedisConfig::from_url(url).map_err(|e| bad(&e))?,
                )
                .map_err(|e| bad(&e))?,
            ),
            "mqtt" | "mqtts" => Self::Mqtt(
                postbox_mqtt::MqttPublisher::new(
                    postbox_mqtt::MqttConfig::from_url(url).map_err(|e| bad(&e))?,
                )
                .map_err(|e| bad(&e))?,
            ),
            "http" | "https" => {
                let mut config = postbox_http::HttpConfig::from_url(url).map_err(|e| bad(&e))?;
                if let Ok(secret) = std::env::var(WEBHOOK_SECRET_ENV) {
                    config = config.secret(secret);
                }
                Self::Http(postbox_http::HttpPublisher::new(config).map_err(|e| {
                    usage(format!(
                        "{e} (with --publish, the secret comes from {WEBHOOK_SECRET_ENV})"
                    ))
                })?)
            }
            _ => {
                // the scheme only: the rest may carry a token in any form
                let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
                return Err(usage(format!(
                    "unknown publish URL scheme {scheme:?}: use stdout, file:///path.jsonl, nats://, kafka://, amqp://, redis://, mqtt:// or http(s)://"
                )));
            }
        })
    }

    /// Builds a `[publishers.NAME]` table: either only `url`, or `type`
    /// plus the broker crate's own settings.
    pub(crate) async fn from_table(name: &str, table: &toml::Table) -> anyhow::Result<Self> {
        let at = |e: &dyn std::fmt::Display| usage(format!("publishers.{name}: {e}"));
        let Some(kind) = table.get("type") else {
            return match (table.get("url"), table.len()) {
                (Some(toml::Value::String(url)), 1) => {
                    Self::from_url(url).await.map_err(|e| at(&format!("{e:#}")))
                }
                _ => Err(at(
                    &"give either only `url`, or `type` (nats, kafka, rabbitmq, redis, mqtt, http, stdout, file) with that broker's settings",
                )),
            };
        };
        let mut settings = table.clone();
        settings.remove("type");
        let settings = toml::Value::Table(settings);
        fn parse<T: serde::de::DeserializeOwned>(v: toml::Value) -> Result<T, toml::de::Error> {
            v.try_into()
        }
        Ok(match kind.as_str().unwrap_or_default() {
            "stdout" => Self::Stdout(StdoutPublisher),
            "file" => match settings.get("path").and_then(toml::Value::as_str) {
                Some(path) => Self::File(FilePublisher::open(path).map_err(|e| at(&e))?),
                None => return Err(at(&"type = \"file\" needs path = \"/absolute/out.jsonl\"")),
            },
            "nats" => Self::Nats(
                postbox_nats::NatsPublisher::new(parse(settings).map_err(|e| at(&e))?)
                    .await
                    .map_err(|e| at(&e))?,
            ),
            "kafka" => Self::Kafka(
                postbox_kafka::KafkaPublisher::new(parse(settings).map_err(|e| at(&e))?)
                    .map_err(|e| at(&e))?,
            ),
            "rabbitmq" | "amqp" => Self::RabbitMq(
                postbox_rabbitmq::RabbitMqPublisher::new(parse(settings).map_err(|e| at(&e))?)
                    .map_err(|e| at(&e))?,
            ),
            "redis" => Self::Redis(
                postbox_redis::RedisPublisher::new(parse(settings).map_err(|e| at(&e))?)
                    .map_err(|e| at(&e))?,
            ),
            "mqtt" => Self::Mqtt(
                postbox_mqtt::MqttPublisher::new(parse(settings).map_err(|e| at(&e))?)
                    .map_err(|e| at(&e))?,
            ),
            "http" | "webhook" => Self::Http(
                postbox_http::HttpPublisher::new(parse(settings).map_err(|e| at(&e))?)
                    .map_err(|e| at(&e))?,
            ),
            other => {
                return Err(at(&format!(
                    "unknown type {other:?}: use nats, kafka, rabbitmq, redis, mqtt, http, stdout or file"
                )));
            }
        })
    }
}

impl Publisher for AnyPublisher {
    async fn publish(&self, batch: &[Message]) -> Vec<PublishOutcome> {
        match self {
            AnyPublisher::Stdout(p) => p.publish(batch).await,
            AnyPublisher::File(p) => p.publish(batch).await,
            AnyPublisher::Nats(p) => p.publish(batch).await,
            AnyPublisher::Kafka(p) => p.publish(batch).await,
            AnyPublisher::RabbitMq(p) => p.publish(batch).await,
            AnyPublisher::Redis(p) => p.publish(batch).await,
            AnyPublisher::Mqtt(p) => p.publish(batch).await,
            AnyPublisher::Http(p) => p.publish(batch).await,
        }
    }

    async fn publish_until(
        &self,
        batch: &[Message],
        deadline: tokio::time::Instant,
    ) -> Vec<PublishOutcome> {
        match self {
            AnyPublisher::Stdout(p) => p.publish_until(batch, deadline).await,
            AnyPublisher::File(p) => p.publish_until(batch, deadline).await,
            AnyPublisher::Nats(p) => p.publish_until(batch, deadline).await,
            AnyPublisher::Kafka(p) => p.publish_until(batch, deadline).await,
            AnyPublisher::RabbitMq(p) => p.publish_until(batch, deadline).await,
            AnyPublisher::Redis(p) => p.publish_until(batch, deadline).await,
            AnyPublisher::Mqtt(p) => p.publish_until(batch, deadline).await,
            AnyPublisher::Http(p) => p.publish_until(batch, deadline).await,
        }
    }
}
