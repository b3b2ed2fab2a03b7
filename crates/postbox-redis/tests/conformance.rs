//! The shared publisher conformance suite against the real Redis.

mod common;

use common::harness;

postbox_testkit::publisher_conformance_tests!(harness);
