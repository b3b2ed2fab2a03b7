//! The store conformance suite on a real PostgreSQL server, one fresh
//! database per test.

mod common;

async fn harness() -> common::PgHarness {
    common::PgHarness::new().await
}

postbox_testkit::store_conformance_tests!(harness);
