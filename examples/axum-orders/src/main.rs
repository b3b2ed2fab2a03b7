//! An axum service that takes orders.
//!
//! `POST /orders` writes the order row **and** its `orders.created` event in
//! one sqlx transaction: the event exists if and only if the order does. A
//! [`Relay`] running in the same process publishes committed events (here
//! to stdout as JSON lines); the handler calls [`RelayWaker::wake`] after
//! the commit so the event goes out at once instead of at the next poll.
//!
//! ```text
//! DATABASE_URL=postgres://127.0.0.1/test cargo run -p postbox-example-axum
//! curl -s localhost:3000/orders -H 'content-type: application/json' \
//!      -d '{"customer":"ada","amount_cents":4200}'
//! ```

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use postbox::jsonl::StdoutPublisher;
use postbox::postgres::{PgOutbox, PgStore};
use postbox::{CancellationToken, NewMessage, Relay, RelayWaker, StoreError};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// What the handlers share: the application's pool, the outbox table the
/// events go to, and the waker of the in-process relay.
#[derive(Clone)]
struct App {
    pool: PgPool,
    outbox: PgOutbox,
    waker: RelayWaker,
    /// Schema of the `orders` table (its own per test).
    schema: String,
}

/// The request body of `POST /orders`.
#[derive(Debug, Deserialize)]
struct NewOrder {
    customer: String,
    amount_cents: i64,
}

/// The event published for each order.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct OrderCreated {
    order_id: i64,
    customer: String,
    amount_cents: i64,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox: {0}")]
    Outbox(#[from] StoreError),
    #[error("event: {0}")]
    Encode(#[from] serde_json::Error),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        // a CHECK constraint of the orders table: the client's mistake
        if let AppError::Database(sqlx::Error::Database(e)) = &self
            && e.is_check_violation()
        {
            return (StatusCode::UNPROCESSABLE_ENTITY, "amount_cents must be > 0").into_response();
        }
        tracing::error!(error = %self, "order not taken");
        (StatusCode::INTERNAL_SERVER_ERROR, "order not taken").into_response()
    }
}

/// `POST /orders`: the order and its event, one transaction.
async fn create_order(
    State(app): State<App>,
    Json(order): Json<NewOrder>,
) -> Result<(StatusCode, Json<OrderCreated>), AppError> {
    let mut tx = app.pool.begin().await?;
    let order_id: i64 = sqlx::query_scalar(&format!(
        "INSERT INTO {}.orders (customer, amount_cents) VALUES ($1, $2) RETURNING id",
        app.schema
    ))
    .bind(&order.customer)
    .bind(order.amount_cents)
    .fetch_one(&mut *tx)
    .await?;
    let event = OrderCreated {
        order_id,
        customer: order.customer,
        amount_cents: order.amount_cents,
    };
    // keyed by customer: one customer's events are published in order
    let message = NewMessage::json("orders.created", &event)?.key(event.customer.clone());
    app.outbox.enqueue(&mut *tx, &message).await?;
    tx.commit().await?;
    // after the commit, never before: a woken relay must find the row
    app.waker.wake();
    Ok((StatusCode::CREATED, Json(event)))
}

fn router(app: App) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .with_state(app)
}

/// Creates the business table (the outbox's own schema comes from
/// `PgStore::migrate`).
async fn create_orders_table(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(pool)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {schema}.orders (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             customer text NOT NULL,
             amount_cents bigint NOT NULL CHECK (amount_cents > 0),
             created_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(pool)
    .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://127.0.0.1/test".to_owned());
    let addr: SocketAddr = std::env::var("LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:3000".to_owned())
        .parse()?;

    // the relay's store: pools of its own, tuned for claims
    let store = PgStore::connect(&url).await?;
    store.migrate().await?;
    // the application's pool, for its own transactions
    let pool = PgPool::connect(&url).await?;
    create_orders_table(&pool, "public").await?;

    let relay = Relay::builder(store.clone(), StdoutPublisher).build()?;
    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn({
        let relay = relay.clone();
        let shutdown = shutdown.clone();
        async move { relay.run(shutdown).await }
    });

    let app = App {
        pool,
        outbox: store.outbox().clone(),
        waker: relay.waker(),
        schema: "public".to_owned(),
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "taking orders: POST /orders");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;

    // stop claiming, finish what is in flight, release the rest
    shutdown.cancel();
    let report = relay_task.await?;
    tracing::info!(sent = report.sent, "relay stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::Request;
    use postbox::Message;
    use postbox_testkit::TestPublisher;
    use tower::ServiceExt;

    use super::*;

    /// A schema of its own on the local server: outbox and orders.
    async fn app() -> (App, Relay<PgStore, TestPublisher>, TestPublisher) {
        let addr = postbox_testkit::services::POSTGRES.require().await;
        let url = format!("postgres://postgres@{addr}/test");
        let schema = format!("axum_example_{:012x}", fastrand::u64(..1 << 48));
        let outbox = PgOutbox::with_schema(&schema, "outbox").expect("outbox name");
        let store = PgStore::connect_with(&url, outbox).await.expect("connect");
        store.migrate().await.expect("migrate");
        let pool = PgPool::connect(&url).await.expect("app pool");
        create_orders_table(&pool, &schema)
            .await
            .expect("orders table");
        let publisher = TestPublisher::recording();
        let relay = Relay::builder(store.clone(), publisher.clone())
            // no poll to speak of: only the waker makes delivery prompt
            .poll_interval(Duration::from_secs(3600))
            .build()
            .expect("relay");
        let app = App {
            pool,
            outbox: store.outbox().clone(),
            waker: relay.waker(),
            schema,
        };
        (app, relay, publisher)
    }

    async fn post_order(app: &App, body: &str) -> StatusCode {
        let request = Request::post("/orders")
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .expect("request");
        router(app.clone())
            .oneshot(request)
            .await
            .expect("response")
            .status()
    }

    async fn delivered_within(publisher: &TestPublisher, n: usize) -> Vec<Message> {
        let got = publisher.delivered_within(n, Duration::from_secs(30)).await;
        assert!(
            got.len() >= n,
            "{} of {n} events delivered within 30 s (the poll is 1 h: a wake was lost): {:?}",
            got.len(),
            got.iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                .collect::<Vec<_>>()
        );
        got
    }

    #[tokio::test]
    async fn an_order_and_its_event_commit_together_and_the_waker_publishes_it() {
        let (app, relay, publisher) = app().await;
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let relay = relay.clone();
            let shutdown = shutdown.clone();
            async move { relay.run(shutdown).await }
        });

        assert_eq!(
            post_order(&app, r#"{"customer":"ada","amount_cents":4200}"#).await,
            StatusCode::CREATED
        );
        // refused by the CHECK constraint: its event must never go out
        assert_eq!(
            post_order(&app, r#"{"customer":"bob","amount_cents":-1}"#).await,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            post_order(&app, r#"{"customer":"ada","amount_cents":99}"#).await,
            StatusCode::CREATED
        );

        let got = delivered_within(&publisher, 2).await;
        let events: Vec<OrderCreated> = got
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).expect("event json"))
            .collect();
        assert_eq!(
            events.iter().map(|e| e.amount_cents).collect::<Vec<_>>(),
            [4200, 99],
            "ada's events in order, bob's rolled-back one absent"
        );
        assert!(got.iter().all(|m| m.key.as_deref() == Some("ada")));
        assert_eq!(got[0].topic, "orders.created");

        let orders: i64 =
            sqlx::query_scalar(&format!("SELECT count(*) FROM {}.orders", app.schema))
                .fetch_one(&app.pool)
                .await
                .expect("count orders");
        assert_eq!(orders, 2);

        shutdown.cancel();
        let report = running.await.expect("relay task");
        assert_eq!(report.sent, 2);
        assert_eq!(publisher.delivered().len(), 2, "nothing else was published");
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", app.schema))
            .execute(&app.pool)
            .await
            .expect("drop schema");
    }
}
