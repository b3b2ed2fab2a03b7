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
