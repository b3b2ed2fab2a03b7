//! Bad input (issue 9): URLs, outbox rows and header texts that a user or a
//! careless producer can get wrong. Property-tested where the input space
//! is open (proptest, bounded so CI stays fast); real databases and a real
//! broker where the point is what the relay does with a bad row.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Marks the secret part of a generated URL: it must never come back in an
/// error message or a `Debug` rendering.
const MARK: &str = "Pr1vateXq";

/// Text around the mark, with the characters a user may put in a password
/// unescaped (`@` and `:` included) and some non-ASCII. Not `/ ? #`: by the
/// URL standard these end the user info, so unescaped they make the rest
/// of the "password" a path, query or fragment, not a secret any parser
/// could know about.
fn secret() -> impl Strategy<Value = String> {
    (
        "[A-Za-z0-9@:%!$&'()*+,;=._~ é-]{0,8}",
        "[A-Za-z0-9@:%!$&'()*+,;=._~ é-]{0,8}",
    )
        .prop_map(|(a, b)| format!("{a}{MARK}{b}"))
}

/// A URL of `scheme` with the secret as password, as user name (a NATS
/// token), or in a `password=` / `sasl.password=` (Kafka's) query
/// parameter, and where it was put (0 to 3 in that order), around
/// arbitrary other parts (hosts stay on this machine: nothing here connects,
/// and nothing may look a name up).
fn broker_url(schemes: &'static [&'static str]) -> impl Strategy<Value = (String, u8)> {
    (
        prop::sample::select(schemes),
        secret(),
        prop_oneof![Just(0u8), Just(1), Just(2), Just(3)],
        "[a-z]{0,5}",
        prop_oneof![
            Just("127.0.0.1".to_owned()),
            Just("[::1]".to_owned()),
            Just("localhost".to_owned()),
            Just(String::new()),
            "[a-z0-9.:\\[\\]%-]{0,12}",
        ],
        prop_oneof![
            Just(String::new()),
            Just(":1".to_owned()),
            Just(":99999".to_owned()),
            ":[0-9a-z]{0,6}",
        ],
        "(/|/%2f|/0|/v|/[^ ?#]{0,8}|)",
        "(\\?[a-z_.]{1,16}=[^ #]{0,8}|\\?heartbeat=5|\\?x|)",
    )
        .prop_map(|(scheme, secret, place, user, host, port, path, query)| {
            let url = match place {
                0 => format!("{scheme}://{user}:{secret}@{host}{port}{path}{query}"),
                1 => format!("{scheme}://{secret}@{host}{port}{path}{query}"),
                // in a query a value must be escaped to be one value at all
                2 => format!("{scheme}://{host}{port}{path}?password={}", escape(&secret)),
                _ => format!(
                    "{scheme}://{host}{port}{path}?sasl.password={}",
                    escape(&secret)
                ),
            };
            (url, place)
        })
}

/// Percent-encodes everything but ASCII letters and digits.
fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Fails when `text` (an error or a `Debug` rendering made by `parser` from
/// `url`) shows the secret put there at `place`.
fn no_secret(parser: &str, url: &str, place: u8, text: &str) -> Result<(), TestCaseError> {
    let applies = match place {
        // a user name is a token for NATS and for webhooks
        // (`https://TOKEN@host`); elsewhere it is an identity, shown on purpose
        1 => matches!(parser, "NATS" | "HTTP"),
        // `sasl.password` means something to Kafka only
        3 => parser == "Kafka",
        _ => true,
    };
    prop_assert!(
        !applies || !text.contains(MARK),
        "{parser}: {url:?} shows the secret: {text}"
    );
    Ok(())
}

/// Every publisher's URL parser, on any URL of its scheme (and of the other
/// schemes): an error or a config, never a panic, and neither the error nor
/// the config's `Debug` shows the password, token or secret parameter.
/// Publishers that build without connecting are built too.
#[test]
fn publisher_urls_never_panic_nor_show_the_secret() {
    const SCHEMES: &[&str] = &[
        "nats", "tls", "kafka", "amqp", "amqps", "redis", "rediss", "mqtt", "mqtts", "http",
        "https", "file", "ftp", "",
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut runner = TestRunner::new(Config {
        cases: 2048,
        ..Config::default()
    });
    runner
        .run(&broker_url(SCHEMES), |(url, place)| {
            let check = |parser: &str, text: String| no_secret(parser, &url, place, &text);
            match postbox_nats::NatsConfig::from_url(&url) {
                Ok(c) => check("NATS", format!("{c:?}"))?,
                Err(e) => check("NATS", format!("{e} {e:?}"))?,
            }
            match postbox_kafka::KafkaConfig::from_url(&url) {
                Ok(c) => check("Kafka", format!("{c:?}"))?,
                Err(e) => check("Kafka", format!("{e} {e:?}"))?,
            }
            match postbox_rabbitmq::RabbitMqConfig::from_url(&url) {
                Ok(c) => {
                    check("RabbitMQ", format!("{c:?}"))?;
                    match postbox_rabbitmq::RabbitMqPublisher::new(c) {
                        Ok(p) => check("RabbitMQ", format!("{p:?}"))?,
                        Err(e) => check("RabbitMQ", format!("{e} {e:?}"))?,
                    }
                }
                Err(e) => check("RabbitMQ", format!("{e} {e:?}"))?,
            }
            match postbox_redis::RedisConfig::from_url(&url) {
                Ok(c) => {
                    check("Redis", format!("{c:?}"))?;
                    if let Err(e) = postbox_redis::RedisPublisher::new(c) {
                        check("Redis", format!("{e} {e:?}"))?;
                    }
                }
                Err(e) => check("Redis", format!("{e} {e:?}"))?,
            }
            match postbox_mqtt::MqttConfig::from_url(&url) {
                Ok(c) => check("MQTT", format!("{c:?}"))?,
                Err(e) => check("MQTT", format!("{e} {e:?}"))?,
            }
            match postbox_http::HttpConfig::from_url(&url) {
                Ok(c) => {
                    check("HTTP", format!("{c:?}"))?;
                    match postbox_http::HttpPublisher::new(c.unsigned(true)) {
                        Ok(p) => check("HTTP", format!("{p:?}"))?,
                        Err(e) => check("HTTP", format!("{e} {e:?}"))?,
                    }
                }
                Err(e) => check("HTTP", format!("{e} {e:?}"))?,
            }
            Ok(())
        })
        .unwrap();
}

/// A local server that accepts connections and hangs up at once (a
/// database that dies during the handshake). Returns its address.
fn hang_up_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    addr
}

/// A database URL with the secret as password (or in a `password=`
/// parameter), a user that exists or not, a database that exists or not,
/// and query parameters good, bad and unknown, pointing at `servers` only.
fn store_url(
    schemes: &'static [&'static str],
    users: &'static [&'static str],
    databases: &'static [&'static str],
    servers: Vec<String>,
) -> impl Strategy<Value = String> {
    (
        prop::sample::select(schemes),
        prop::sample::select(users),
        secret(),
        any::<bool>(),
        prop::sample::select(servers),
        prop_oneof![prop::sample::select(databases).prop_map(str::to_owned), "[a-z_]{1,8}"],
        prop::collection::vec(
            (
                prop_oneof![
                    Just("sslmode"),
                    Just("ssl-mode"),
                    Just("application_name"),
                    Just("options"),
                    Just("statement-cache-capacity"),
                    Just("charset"),
                    Just("timezone"),
                    Just("x_unknown"),
                ],
                prop_oneof![
                    3 => prop::sample::select(&["disable", "prefer", "DISABLED", "100", "utf8mb4", "+00:00", "postbox"][..])
                        .prop_map(str::to_owned),
                    1 => "[^ ]{0,8}",
                ],
            ),
            0..3,
        ),
    )
        .prop_map(|(scheme, user, secret, in_query, server, db, params)| {
            let mut query: Vec<String> = params
                .iter()
                .map(|(k, v)| format!("{k}={}", escape(v)))
                .collect();
            let userinfo = if in_query {
                query.push(format!("password={}", escape(&secret)));
                format!("{user}@")
            } else {
                format!("{user}:{secret}@")
            };
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            format!("{scheme}://{userinfo}{server}/{db}{query}")
        })
}

/// Store URLs, as `postbox --store` opens them: on PostgreSQL and MariaDB,
/// whatever the user, password, database and parameters, connecting gives a
/// store or an error, never a panic, and neither the error nor the store's
/// `Debug` shows the password.
#[test]
fn store_urls_never_panic_nor_show_the_password() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (pg, my) = rt.block_on(async {
        (
            postbox_testkit::services::POSTGRES.require().await,
            postbox_testkit::services::MARIADB.require().await,
        )
    });
    let dead = hang_up_server();
    let check = |url: &str, text: String| -> Result<(), TestCaseError> {
        prop_assert!(!text.contains(MARK), "{url:?} shows the password: {text}");
        Ok(())
    };
    let runner = || {
        TestRunner::new(Config {
            cases: 96,
            ..Config::default()
        })
    };
    runner()
        .run(
            &store_url(
                &["postgres", "postgresql"],
                &["postgres", "root", "nobody", ""],
                &["postgres", "template1"],
                vec![pg.clone(), dead.clone()],
            ),
            |url| {
                rt.block_on(async {
                    match postbox_postgres::PgStore::connect(&url).await {
                        Ok(store) => check(&url, format!("{store:?}")),
                        Err(e) => check(&url, format!("{e} | {e:?}")),
                    }
                })
            },
        )
        .unwrap();
    runner()
        .run(
            &store_url(
                &["mysql", "mariadb"],
                &["root", "nobody", ""],
                &["mysql", "information_schema"],
                vec![my.clone(), dead.clone()],
            ),
            |url| {
                rt.block_on(async {
                    match postbox_mysql::MySqlStore::connect(&url).await {
                        Ok(store) => check(&url, format!("{store:?}")),
                        Err(e) => check(&url, format!("{e} | {e:?}")),
                    }
                })
            },
        )
        .unwrap();
}

/// Any JSON value: what a producer may put in `headers` by mistake.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The `headers` column as a producer may fill it: a JSON object of
/// strings (valid), any other JSON, text that is not JSON, or (SQLite
/// only, whose TEXT column takes anything) bytes that are not UTF-8.
fn header_bytes(binary: bool) -> BoxedStrategy<Vec<u8>> {
    let text = prop_oneof![
        prop::collection::btree_map("\\PC{0,6}", "\\PC{0,6}", 0..4)
            .prop_map(|m| serde_json::to_string(&m).unwrap()),
        json_value().prop_map(|v| v.to_string()),
        "\\PC{0,24}",
        Just(r#"{"a": "\ud800"}"#.to_owned()),
        Just(r#"{"a": "b", "a": "c"}"#.to_owned()),
    ]
    .prop_map(String::into_bytes);
    if binary {
        prop_oneof![4 => text, 1 => prop::collection::vec(any::<u8>(), 0..16)].boxed()
    } else {
        text.boxed()
    }
}

/// The three stores, each with a plain-SQL producer's view of its table.
enum Db {
    Sqlite(postbox_sqlite::SqliteStore),
    Postgres(postbox_postgres::PgStore),
    MySql(postbox_mysql::MySqlStore),
}

impl Db {
    /// Writes one row the way a producer in another language would; `false`
    /// when the database refused it (then it is not in the outbox at all).
    async fn insert(&self, payload: &str, key: Option<&str>, headers: &[u8]) -> bool {
        match self {
            Db::Sqlite(s) => {
                // a producer binding bytes where text belongs: stored as-is
                let q = match std::str::from_utf8(headers) {
                    Ok(text) => sqlx::query(
                        "INSERT INTO postbox_outbox (topic, key, payload, headers) VALUES ('t', ?, ?, ?)",
                    )
                    .bind(key)
                    .bind(payload.as_bytes())
                    .bind(text),
                    Err(_) => sqlx::query(
                        "INSERT INTO postbox_outbox (topic, key, payload, headers) VALUES ('t', ?, ?, ?)",
                    )
                    .bind(key)
                    .bind(payload.as_bytes())
                    .bind(headers),
                };
                q.execute(s.pool()).await.is_ok()
            }
            Db::Postgres(s) => sqlx::query(
                "INSERT INTO postbox_outbox (topic, key, payload, headers) VALUES ('t', $1, $2, $3::text::jsonb)",
            )
            .bind(key)
            .bind(payload.as_bytes())
            .bind(String::from_utf8_lossy(headers).as_ref())
            .execute(s.pool())
            .await
            .is_ok(),
            Db::MySql(s) => sqlx::query(
                "INSERT INTO postbox_outbox (topic, `key`, payload, headers) VALUES ('t', ?, ?, ?)",
            )
            .bind(key)
            .bind(payload.as_bytes())
            .bind(String::from_utf8_lossy(headers).as_ref())
            .execute(s.pool())
            .await
            .is_ok(),
        }
    }

    /// The `headers` column of the row with `payload` as the database holds
    /// it (what the store will read), or `None` when there is no such row.
    async fn stored_headers(&self, payload: &str) -> Option<Vec<u8>> {
        match self {
            Db::Sqlite(s) => sqlx::query_scalar(
                "SELECT CAST(headers AS BLOB) FROM postbox_outbox WHERE payload = ?",
            )
            .bind(payload.as_bytes())
            .fetch_optional(s.pool())
            .await
            .unwrap(),
            Db::Postgres(s) => sqlx::query_scalar::<_, String>(
                "SELECT headers::text FROM postbox_outbox WHERE payload = $1",
            )
            .bind(payload.as_bytes())
            .fetch_optional(s.pool())
            .await
            .unwrap()
            .map(String::into_bytes),
            Db::MySql(s) => sqlx::query_scalar(
                "SELECT CAST(headers AS BINARY) FROM postbox_outbox WHERE payload = ?",
            )
            .bind(payload.as_bytes())
            .fetch_optional(s.pool())
            .await
            .unwrap(),
        }
    }

    async fn clear(&self) {
        let sql = "DELETE FROM postbox_outbox";
        match self {
            Db::Sqlite(s) => sqlx::query(sql).execute(s.pool()).await.map(|_| ()),
            Db::Postgres(s) => sqlx::query(sql).execute(s.pool()).await.map(|_| ()),
            Db::MySql(s) => sqlx::query(sql).execute(s.pool()).await.map(|_| ()),
        }
        .unwrap();
    }

    /// Runs a relay over the table until a pass claims nothing; returns
    /// what it published, and the dead rows.
    async fn relay_until_idle(
        &self,
    ) -> (Vec<postbox_core::Message>, Vec<postbox_core::MessageRecord>) {
        match self {
            Db::Sqlite(s) => relay_until_idle(s.clone()).await,
            Db::Postgres(s) => relay_until_idle(s.clone()).await,
            Db::MySql(s) => relay_until_idle(s.clone()).await,
        }
    }
}

async fn relay_until_idle<S: postbox_core::Store + Clone>(
    store: S,
) -> (Vec<postbox_core::Message>, Vec<postbox_core::MessageRecord>) {
    use postbox_core::{Filter, ListQuery, Relay, Status};
    let publisher = postbox_testkit::TestPublisher::recording();
    let relay = Relay::builder(store.clone(), publisher.clone())
        .build()
        .unwrap();
    // Idle after two empty passes in a row: PostgreSQL picks its claim
    // statement from what the previous claim saw, so after a claim that saw
    // no keyed row the next one looks at keyless rows only (and switches).
    let mut empty = 0;
    for _ in 0..100 {
        if relay.tick().await.unwrap().claimed == 0 {
            empty += 1;
            if empty == 2 {
                break;
            }
        } else {
            empty = 0;
        }
    }
    let stats = store.stats(&Filter::all()).await.unwrap();
    assert_eq!(stats.pending, 0, "rows left behind: {stats:?}");
    let dead = store
        .list(&ListQuery::new(Some(Status::Dead), 1000))
        .await
        .unwrap();
    (publisher.delivered(), dead)
}

/// One case: rows with these headers (keyed or not) are written by plain
/// SQL; a relay runs over them. A row whose headers are a JSON object of
/// strings is published once with exactly those headers; any other row is
/// dead with a reason that names the headers; none is left behind, and the
/// relay never fails.
async fn headers_case(
    db: &Db,
    rows: &[(Vec<u8>, bool)],
    seen: &std::cell::Cell<(usize, usize)>,
) -> Result<(), TestCaseError> {
    use std::collections::BTreeMap;
    db.clear().await;
    let mut written = Vec::new();
    for (i, (headers, keyed)) in rows.iter().enumerate() {
        let payload = format!("row-{i}");
        let key = keyed.then(|| format!("k{i}"));
        if db.insert(&payload, key.as_deref(), headers).await {
            let stored = db.stored_headers(&payload).await.unwrap();
            written.push((payload, stored));
        }
    }
    let (delivered, dead) = db.relay_until_idle().await;
    for (payload, stored) in &written {
        let valid = std::str::from_utf8(stored)
            .ok()
            .and_then(|t| serde_json::from_str::<BTreeMap<String, String>>(t).ok());
        let sent: Vec<_> = delivered
            .iter()
            .filter(|m| m.payload == payload.as_bytes())
            .collect();
        let died = dead.iter().find(|d| d.payload == payload.as_bytes());
        let shown = String::from_utf8_lossy(stored);
        let (good, bad) = seen.get();
        seen.set(if valid.is_some() {
            (good + 1, bad)
        } else {
            (good, bad + 1)
        });
        match valid {
            Some(headers) => {
                prop_assert_eq!(sent.len(), 1, "{} ({}) not published once", payload, shown);
                prop_assert_eq!(&sent[0].headers, &headers, "{} headers changed", payload);
                prop_assert!(died.is_none());
            }
            None => {
                prop_assert!(sent.is_empty(), "{payload} ({shown}) was published");
                let reason = died.and_then(|d| d.last_error.clone()).unwrap_or_default();
                prop_assert!(
                    reason.contains("headers"),
                    "{payload} ({shown}): not dead with a reason naming the headers: {reason:?}"
                );
            }
        }
    }
    Ok(())
}

/// Runs [`headers_case`] `cases` times on `db`, and checks that both kinds
/// of rows were tried.
fn headers_property(rt: &tokio::runtime::Runtime, db: &Db, cases: u32, binary: bool) {
    let rows = prop::collection::vec((header_bytes(binary), any::<bool>()), 1..8);
    let seen = std::cell::Cell::new((0, 0));
    TestRunner::new(Config {
        cases,
        ..Config::default()
    })
    .run(&rows, |rows| rt.block_on(headers_case(db, &rows, &seen)))
    .unwrap();
    let (good, bad) = seen.get();
    assert!(
        good >= 10 && bad >= 10,
        "too few rows of one kind: {good} valid, {bad} malformed"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Header decoding on SQLite (whose TEXT column takes any bytes).
#[test]
fn sqlite_header_decoding_dead_letters_what_is_not_an_object_of_strings() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let db = rt.block_on(async {
        let url = format!("sqlite://{}", dir.path().join("h.db").display());
        let store = postbox_sqlite::SqliteStore::connect(&url).await.unwrap();
        store.outbox().migrate(store.pool()).await.unwrap();
        Db::Sqlite(store)
    });
    headers_property(&rt, &db, 128, true);
}

/// Header decoding on PostgreSQL (`jsonb`: any JSON, never invalid text).
#[test]
fn postgres_header_decoding_dead_letters_what_is_not_an_object_of_strings() {
    let rt = runtime();
    let url = rt.block_on(support::pg_database());
    let db = rt.block_on(async {
        let store = postbox_postgres::PgStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        Db::Postgres(store)
    });
    headers_property(&rt, &db, 32, false);
    drop(db);
    rt.block_on(support::drop_database(&url));
}

/// Header decoding on MariaDB (`JSON`: text checked by `JSON_VALID`).
#[test]
fn mysql_header_decoding_dead_letters_what_is_not_an_object_of_strings() {
    let rt = runtime();
    let url = rt.block_on(support::mysql_database());
    let db = rt.block_on(async {
        let store = postbox_mysql::MySqlStore::connect(&url).await.unwrap();
        store.outbox().migrate(store.pool()).await.unwrap();
        Db::MySql(store)
    });
    headers_property(&rt, &db, 32, false);
    drop(db);
    rt.block_on(support::drop_database(&url));
}

/// A value of a text column as a plain-SQL producer writes it.
#[derive(Clone, Debug)]
enum Col {
    Null,
    Text(String),
    /// Bytes that are not UTF-8, stored as TEXT (SQLite takes them).
    NotUtf8(Vec<u8>),
}

/// One row a careless producer writes, and what must become of it.
#[derive(Clone, Debug)]
struct Row {
    topic: Col,
    key: Col,
    payload: Vec<u8>,
    headers: Col,
    tenant: Col,
    /// `None`: delivered once, with these headers; `Some(words)`: dead after
    /// one attempt, with a reason containing every word; `Some([])`: stays
    /// pending (its key is parked by an earlier bad row).
    fate: Fate,
}

#[derive(Clone, Debug, PartialEq)]
enum Fate {
    Delivered,
    Dead(&'static [&'static str]),
    Waits,
}

impl Db {
    async fn insert_row(&self, r: &Row) {
        macro_rules! bind_col {
            ($q:expr, $c:expr) => {
                match $c {
                    Col::Null => $q.bind(None::<String>),
                    Col::Text(t) => $q.bind(t.clone()),
                    Col::NotUtf8(b) => $q.bind(b.clone()),
                }
            };
        }
        match self {
            Db::Sqlite(s) => {
                // CAST(? AS TEXT) keeps the bytes and makes the value TEXT,
                // as a producer in C writing a char* would
                let q = sqlx::query(
                    "INSERT INTO postbox_outbox (topic, key, payload, headers, tenant) VALUES \
                     (CAST(? AS TEXT), CAST(? AS TEXT), ?, coalesce(CAST(? AS TEXT), '{}'), CAST(? AS TEXT))",
                );
                let q = bind_col!(q, &r.topic);
                let q = bind_col!(q, &r.key);
                let q = q.bind(r.payload.clone());
                let q = bind_col!(q, &r.headers);
                let q = bind_col!(q, &r.tenant);
                q.execute(s.pool()).await.unwrap();
            }
            Db::Postgres(s) => {
                let q = sqlx::query(
                    "INSERT INTO postbox_outbox (topic, key, payload, headers, tenant) VALUES \
                     ($1, $2, $3, coalesce($4::text::jsonb, '{}'), $5)",
                );
                let q = bind_col!(q, &r.topic);
                let q = bind_col!(q, &r.key);
                let q = q.bind(r.payload.clone());
                let q = bind_col!(q, &r.headers);
                let q = bind_col!(q, &r.tenant);
                q.execute(s.pool()).await.unwrap();
            }
            Db::MySql(s) => {
                let q = sqlx::query(
                    "INSERT INTO postbox_outbox (topic, `key`, payload, headers, tenant) VALUES \
                     (?, ?, ?, coalesce(?, '{}'), ?)",
                );
                let q = bind_col!(q, &r.topic);
                let q = bind_col!(q, &r.key);
                let q = q.bind(r.payload.clone());
                let q = bind_col!(q, &r.headers);
                let q = bind_col!(q, &r.tenant);
                q.execute(s.pool()).await.unwrap();
            }
        }
    }

    async fn records(&self) -> Vec<postbox_core::MessageRecord> {
        use postbox_core::{ListQuery, Store as _};
        let q = ListQuery::new(None, 1000);
        match self {
            Db::Sqlite(s) => s.list(&q).await,
            Db::Postgres(s) => s.list(&q).await,
            Db::MySql(s) => s.list(&q).await,
        }
        .unwrap()
    }
}

/// The rows of the corrupt-and-oversized test for a store: good rows on
/// keys `a`, `b` and keyless; rows with headers that are not a JSON object
/// of strings, each on a key of its own; a payload of 2 MiB (over NATS's
/// 1 MiB `max_payload`), keyed and keyless; a good row behind a bad one of
/// its key; and, where the column takes them (`not_utf8`), text columns
/// that are not UTF-8.
fn corrupt_rows(topic: &str, not_utf8: bool) -> Vec<Row> {
    let row = |key: Option<&str>, payload: &str, headers: Option<&str>, fate: Fate| Row {
        topic: Col::Text(topic.to_owned()),
        key: key.map_or(Col::Null, |k| Col::Text(k.to_owned())),
        payload: payload.as_bytes().to_vec(),
        headers: headers.map_or(Col::Null, |h| Col::Text(h.to_owned())),
        tenant: Col::Null,
        fate,
    };
    let mut rows = Vec::new();
    for i in 0..30 {
        let key = [Some("a"), Some("b"), None][i % 3];
        rows.push(row(
            key,
            &format!("good-{i}"),
            Some(r#"{"source": "sql"}"#),
            Fate::Delivered,
        ));
    }
    let bad_headers = [
        "[1, 2]",
        r#"{"n": 5}"#,
        r#"{"a": {"b": "c"}}"#,
        r#""just a string""#,
        "null",
        r#"{"a": null}"#,
        "true",
    ];
    for (i, h) in bad_headers.iter().enumerate() {
        let key = format!("bad-headers-{i}");
        rows.push(row(
            Some(&key),
            &format!("bad-headers-{i}"),
            Some(h),
            Fate::Dead(&["malformed", "headers"]),
        ));
    }
    rows.push(row(
        None,
        "bad-headers-keyless",
        Some("[]"),
        Fate::Dead(&["malformed", "headers"]),
    ));
    // a good row behind the bad one of its key: parked, not skipped
    rows.push(row(
        Some("bad-headers-0"),
        "behind-bad-headers-0",
        None,
        Fate::Waits,
    ));
    let big = |prefix: &str| {
        let mut p = format!("{prefix}:").into_bytes();
        p.resize(2 * 1024 * 1024, b'x');
        p
    };
    rows.push(Row {
        payload: big("big-keyed"),
        ..row(Some("big"), "", None, Fate::Dead(&["max_payload"]))
    });
    rows.push(Row {
        payload: big("big-keyless"),
        ..row(None, "", None, Fate::Dead(&["max_payload"]))
    });
    if not_utf8 {
        let bytes = vec![b'k', 0xff, 0xfe, b'!'];
        rows.push(Row {
            headers: Col::NotUtf8(b"{\"a\": \"\xff\"}".to_vec()),
            ..row(
                Some("utf8-headers"),
                "bad-utf8-headers",
                None,
                Fate::Dead(&["malformed", "headers"]),
            )
        });
        rows.push(Row {
            key: Col::NotUtf8(bytes.clone()),
            ..row(
                None,
                "bad-utf8-key",
                None,
                Fate::Dead(&["malformed", "key", "UTF-8"]),
            )
        });
        rows.push(Row {
            topic: Col::NotUtf8(bytes.clone()),
            ..row(
                Some("utf8-topic"),
                "bad-utf8-topic",
                None,
                Fate::Dead(&["malformed", "topic"]),
            )
        });
        rows.push(Row {
            tenant: Col::NotUtf8(bytes),
            ..row(
                Some("utf8-tenant"),
                "bad-utf8-tenant",
                None,
                Fate::Dead(&["malformed", "tenant"]),
            )
        });
    }
    rows
}

/// Writes [`corrupt_rows`] to the store at `url`, runs `postbox relay` to
/// NATS over them, and checks every row's fate: the good ones on the stream
/// once each, every bad one dead after a single attempt with its reason, the
/// row behind a bad one of its key still waiting, and the relay running
/// on, then exiting 0 on SIGTERM.
async fn corrupt_and_oversized_rows_on(url: &str, db: Db, not_utf8: bool) {
    use async_nats::jetstream;
    use futures_util::StreamExt as _;

    let nats = postbox_testkit::services::NATS.require().await;
    let suffix = format!("{:016x}", fastrand::u64(..));
    let topic = format!("bad.{suffix}.events");
    let js = jetstream::new(async_nats::connect(nats.as_str()).await.unwrap());
    let stream_name = format!("POSTBOX_BAD_{suffix}");
    js.create_stream(jetstream::stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("bad.{suffix}.>")],
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();

    let o = support::run(&["migrate", "--store", url]);
    assert_eq!(support::code(&o), 0, "{}", support::stderr(&o));
    let rows = corrupt_rows(&topic, not_utf8);
    for r in &rows {
        db.insert_row(r).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    let mut relay = support::postbox()
        .args(["relay", "--store", url, "--publish"])
        .arg(format!("nats://{nats}"))
        .args([
            "--poll-interval",
            "50ms",
            "--retry-base",
            "50ms",
            "--retry-cap",
            "200ms",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    let expect_sent = rows.iter().filter(|r| r.fate == Fate::Delivered).count();
    let expect_dead = rows
        .iter()
        .filter(|r| matches!(r.fate, Fate::Dead(_)))
        .count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let records = loop {
        let records = db.records().await;
        let dead = records
            .iter()
            .filter(|r| r.status == postbox_core::Status::Dead)
            .count();
        let left = records.len() - dead;
        if dead >= expect_dead && left <= rows.len() - expect_sent - expect_dead {
            break records;
        }
        assert!(
            relay.try_wait().unwrap().is_none(),
            "the relay exited:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "not settled after 120 s: {dead} of {expect_dead} dead, {left} rows left; relay log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    support::signal(&relay, "TERM");
    let status = support::wait_exit(&mut relay, std::time::Duration::from_secs(30));
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "relay exit; log:\n{log_text}");
    assert!(!log_text.contains("panicked"), "{log_text}");

    // the stream: every good row once, nothing else
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut got = Vec::new();
    while (got.len() as u64) < stored {
        let m = tokio::time::timeout(std::time::Duration::from_secs(30), messages.next())
            .await
            .expect("reading the stream back")
            .unwrap()
            .unwrap();
        got.push(String::from_utf8_lossy(&m.payload).into_owned());
    }
    js.delete_stream(&stream_name).await.unwrap();
    let mut want: Vec<String> = rows
        .iter()
        .filter(|r| r.fate == Fate::Delivered)
        .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
        .collect();
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "the stream holds exactly the good rows, once each"
    );

    // every other row: dead after one attempt with its reason, or waiting
    for r in rows.iter().filter(|r| r.fate != Fate::Delivered) {
        let rec = records
            .iter()
            .find(|x| x.payload == r.payload)
            .unwrap_or_else(|| {
                panic!(
                    "row {:?} is gone",
                    String::from_utf8_lossy(&r.payload[..20.min(r.payload.len())])
                )
            });
        let name = String::from_utf8_lossy(&r.payload[..r.payload.len().min(24)]).into_owned();
        match r.fate {
            Fate::Dead(words) => {
                assert_eq!(rec.status, postbox_core::Status::Dead, "{name}: {rec:?}");
                assert_eq!(rec.attempts, 1, "{name} was retried: {:?}", rec.last_error);
                let reason = rec.last_error.clone().unwrap_or_default();
                for w in words {
                    assert!(reason.contains(w), "{name}: reason {reason:?} lacks {w:?}");
                }
            }
            Fate::Waits => {
                assert_eq!(rec.status, postbox_core::Status::Pending, "{name}: {rec:?}");
                assert_eq!(
                    rec.attempts, 0,
                    "{name} was claimed behind a dead row of its key"
                );
            }
            Fate::Delivered => unreachable!(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_corrupt_and_oversized_rows_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bad.db").display());
    let o = support::run(&["migrate", "--store", &url]);
    assert_eq!(support::code(&o), 0, "{}", support::stderr(&o));
    let db = Db::Sqlite(postbox_sqlite::SqliteStore::connect(&url).await.unwrap());
    corrupt_and_oversized_rows_on(&url, db, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_corrupt_and_oversized_rows_are_dead_lettered() {
    let url = support::pg_database().await;
    let o = support::run(&["migrate", "--store", &url]);
    assert_eq!(support::code(&o), 0, "{}", support::stderr(&o));
    let db = Db::Postgres(postbox_postgres::PgStore::connect(&url).await.unwrap());
    corrupt_and_oversized_rows_on(&url, db, false).await;
    support::drop_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_corrupt_and_oversized_rows_are_dead_lettered() {
    let url = support::mysql_database().await;
    let o = support::run(&["migrate", "--store", &url]);
    assert_eq!(support::code(&o), 0, "{}", support::stderr(&o));
    let db = Db::MySql(postbox_mysql::MySqlStore::connect(&url).await.unwrap());
    corrupt_and_oversized_rows_on(&url, db, false).await;
    support::drop_database(&url).await;
}

/// `enqueue` refuses with exit 2, naming the flag, what no relay could
/// deliver as meant, and writes nothing: an empty topic (or key, or
/// tenant), no attempts at all, a delay past 100 years (`--delay
/// 500000000000y` used to panic while adding it to the clock). On SQLite and PostgreSQL; a 100-year delay is
/// accepted on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_refuses_an_empty_topic_no_attempts_and_an_endless_delay() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("o.db").display());
    let pg = support::pg_database().await;
    for url in [&sqlite, &pg] {
        let o = support::run(&["migrate", "--store", url]);
        assert_eq!(support::code(&o), 0, "{}", support::stderr(&o));
        for (extra, named) in [
            (vec!["--topic", ""], "--topic"),
            (vec!["--topic", "t", "--key", ""], "--key"),
            (vec!["--topic", "t", "--tenant", ""], "--tenant"),
            (
                vec!["--topic", "t", "--max-attempts", "0"],
                "--max-attempts",
            ),
            (vec!["--topic", "t", "--delay", "500000000000y"], "--delay"),
            (vec!["--topic", "t", "--delay", "101y"], "--delay"),
        ] {
            let o = support::postbox()
                .args(["enqueue", "--store", url, "--payload", "p"])
                .args(&extra)
                .output()
                .unwrap();
            let err = support::stderr(&o);
            assert_eq!(support::code(&o), 2, "{url} {extra:?}: {err}");
            assert!(err.contains(named), "{url} {extra:?}: {err}");
            assert!(!err.contains("panicked"), "{url} {extra:?}: {err}");
        }
        let status = |url: &str| {
            let o = support::run(&["status", "--store", url, "--json"]);
            assert_eq!(support::code(&o), 0, "{}", support::stderr(&o));
            serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
        };
        assert_eq!(
            status(url)["pending"],
            0,
            "{url}: a refused message was written"
        );
        let o = support::run(&[
            "enqueue",
            "--store",
            url,
            "--topic",
            "t",
            "--payload",
            "p",
            "--max-attempts",
            "1",
            "--delay",
            "100y",
        ]);
        assert_eq!(support::code(&o), 0, "{url}: {}", support::stderr(&o));
        let s = status(url);
        assert_eq!(
            (&s["pending"], &s["delayed"]),
            (&1.into(), &1.into()),
            "{url}: {s}"
        );
    }
    support::drop_database(&pg).await;
}
