//! The MySQL store passes the store conformance suite against the real MariaDB.

mod common;

use common::harness;

postbox_testkit::store_conformance_tests!(harness);
