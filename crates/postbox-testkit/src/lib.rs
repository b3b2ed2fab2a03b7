//! Test kit for **postbox**: an in-memory [`MemoryStore`], a scriptable
//! [`TestPublisher`], and the store conformance suite
//! ([`store_suite`], [`store_conformance_tests!`]) that every store crate
//! runs against its real database.

mod memory;
pub mod pg_cluster;
pub mod proxy;
mod publisher;
pub mod publisher_suite;
pub mod services;
pub mod store_suite;
pub mod tls;

pub use memory::{MemoryStore, MemoryTx};
pub use pg_cluster::PgCluster;
pub use proxy::{FaultProxy, LossReport, connection_loss_scenario};
pub use publisher::{Behaviour, TestPublisher, key_order_violations};
pub use publisher_suite::{LargePayload, PublisherHarness, Received};
pub use store_suite::StoreHarness;

/// A loopback port nothing listens on: bound, then let go (another process
/// could take it meanwhile, which no test here does).
///
/// # Panics
///
/// If no loopback port can be bound.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("local addr").port()
}

/// `e` and its sources, as `{:#}` of an `anyhow::Error` shows them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}
