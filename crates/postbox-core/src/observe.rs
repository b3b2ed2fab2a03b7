//! What a relay tells the outside world: metrics through the [`metrics`]
//! facade, and a health snapshot for readiness probes.
//!
//! The relay records into whatever `metrics` recorder the process installed
//! (the `postbox` daemon installs a Prometheus one; a library user plugs in
//! their own exporter, or none, in which case recording costs next to
//! nothing). Names and labels are constants here so dashboards, docs and
//! tests agree on one spelling:
//!
//! | metric | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `postbox_messages_published_total` | counter | `topic` | acknowledged by the broker and recorded as sent |
//! | `postbox_publish_failures_total` | counter | `topic`, `kind` (`transient`/`rejected`) | failed attempts |
//! | `postbox_messages_not_sent_total` | counter | `topic` | messages a publisher did not get to before the publish's deadline, given back without counting an attempt |
//! | `postbox_messages_dead_total` | counter | `topic` | messages that went dead (rejected, attempts exhausted, malformed) |
//! | `postbox_lease_lost_total` | counter | — | outcomes not recorded because the lease had been taken over |
//! | `postbox_claim_errors_total` | counter | — | claims that failed (database unreachable, …) |
//! | `postbox_complete_errors_total` | counter | — | attempts to record a batch's outcomes that failed (retried until the lease would have run out) |
//! | `postbox_commit_to_publish_seconds` | histogram | `topic` | from the row's `created_at` (database clock, at insert) to the broker's acknowledgement (relay clock) |
//! | `postbox_publish_duration_seconds` | histogram | — | one batch's publish call |
//! | `postbox_claim_duration_seconds` | histogram | — | one claim round trip |
//! | `postbox_complete_duration_seconds` | histogram | — | recording one batch's outcomes |
//! | `postbox_batch_size` | histogram | — | rows per non-empty claim |
//! | `postbox_pending`, `postbox_leased`, `postbox_retrying`, `postbox_dead`, `postbox_parked_keys` | gauge | — | the store's counts, sampled every `stats_interval` (the first at a random point of the first interval; less often when a count is slow, see [`crate::STATS_STRETCH`]) |
//! | `postbox_oldest_pending_age_seconds` | gauge | — | age of the oldest pending row (0 when none), same sampling |
//! | `postbox_key_holder_age_seconds` | gauge | — | age of the oldest open transaction holding an outbox key (0 when none), sampled every `stats_interval`; warned about past 30 s |
//! | `postbox_horizon_age_seconds` | gauge | — | age of the oldest transaction holding back the database's cleanup horizon (0 when none), sampled every `stats_interval`; warned about past 10 min |
//! | `postbox_unvacuumed_rows` | gauge | — | rows deleted since the outbox table was last vacuumed (PostgreSQL only), same sampling; keyed claims step over their index entries |
//! | `postbox_leases_held` | gauge | — | rows the relays of this process hold under lease right now (claimed, not yet completed or released) |
//! | `postbox_sent_purged_total` | counter | — | kept sent messages the relay's cleanup deleted once past the store's retention |
//! | `postbox_vacuums_total` | counter | `outcome` (`done`, `skipped`, `yielded`) | `VACUUM`s of the outbox table the relays ran themselves (PostgreSQL, `vacuum_after`) |
//! | `postbox_vacuum_duration_seconds` | histogram | — | how long each of those that was done took |
//!
//! Topic labels are bounded: the first [`RelayOptions::metrics_topic_limit`]
//! distinct topics a relay sees get their own label value, every later one is
//! counted under `topic="_other"`, so a topic per customer cannot blow up the
//! metrics backend.
//!
//! [`RelayOptions::metrics_topic_limit`]: crate::RelayOptions::metrics_topic_limit

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::SharedString;
use tokio::time::Instant;

use crate::store::Stats;

/// Counter: messages acknowledged by the broker and recorded as sent.
pub const PUBLISHED_TOTAL: &str = "postbox_messages_published_total";
/// Counter: failed publish attempts, by `kind` (`transient` or `rejected`).
pub const PUBLISH_FAILURES_TOTAL: &str = "postbox_publish_failures_total";
/// Counter: messages a publisher did not get to before the publish's
/// deadline ([`crate::PublishOutcome::NotSent`]); given back, no attempt.
pub const NOT_SENT_TOTAL: &str = "postbox_messages_not_sent_total";
/// Counter: messages that went dead.
pub const DEAD_TOTAL: &str = "postbox_messages_dead_total";
/// Counter: outcomes fenced off because the lease had been taken over.
pub const LEASE_LOST_TOTAL: &str = "postbox_lease_lost_total";
/// Counter: failed claims.
pub const CLAIM_ERRORS_TOTAL: &str = "postbox_claim_errors_total";
/// Counter: attempts to record a batch's outcomes that failed (each is
/// retried until the batch's lease would have run out).
pub const COMPLETE_ERRORS_TOTAL: &str = "postbox_complete_errors_total";
/// Histogram (seconds): row creation to broker acknowledgement.
pub const COMMIT_TO_PUBLISH_SECONDS: &str = "postbox_commit_to_publish_seconds";
/// Histogram (seconds): one batch's publish call.
pub const PUBLISH_DURATION_SECONDS: &str = "postbox_publish_duration_seconds";
/// Histogram (seconds): one claim.
pub const CLAIM_DURATION_SECONDS: &str = "postbox_claim_duration_seconds";
/// Histogram (seconds): recording one batch's outcomes.
pub const COMPLETE_DURATION_SECONDS: &str = "postbox_complete_duration_seconds";
/// Histogram: rows per non-empty claim.
pub const BATCH_SIZE: &str = "postbox_batch_size";
/// Gauge: unsent, not-dead rows (including leased).
pub const PENDING: &str = "postbox_pending";
/// Gauge: rows under an unexpired lease.
pub const LEASED: &str = "postbox_leased";
/// Gauge: rows waiting for a retry.
pub const RETRYING: &str = "postbox_retrying";
/// Gauge: dead rows.
pub const DEAD: &str = "postbox_dead";
/// Gauge: keys held back by a parked dead message.
pub const PARKED_KEYS: &str = "postbox_parked_keys";
/// Gauge (seconds): age of the oldest pending row.
pub const OLDEST_PENDING_AGE_SECONDS: &str = "postbox_oldest_pending_age_seconds";

/// Gauge (seconds): age of the oldest open transaction holding an outbox
/// key (its key's later messages wait for it); 0 when none.
pub const KEY_HOLDER_AGE_SECONDS: &str = "postbox_key_holder_age_seconds";
/// Gauge (seconds): age of the oldest transaction holding back the
/// database's cleanup horizon; 0 when none or unknown.
pub const HORIZON_AGE_SECONDS: &str = "postbox_horizon_age_seconds";
/// Gauge: rows deleted since the outbox table was last vacuumed, on stores
/// that know (PostgreSQL); keyed claims step over their index entries.
/// Sampled with the holdups; not set on other stores.
pub const UNVACUUMED_ROWS: &str = "postbox_unvacuumed_rows";
/// A key held this long by an open transaction is logged as a warning.
pub const KEY_HOLDER_WARN_AFTER: Duration = Duration::from_secs(30);
/// A cleanup horizon held this long is logged as a warning.
pub const HORIZON_WARN_AFTER: Duration = Duration::from_secs(600);
/// Gauge: rows the relays of this process hold under lease right now.
pub const LEASES_HELD: &str = "postbox_leases_held";
/// Counter: kept sent messages deleted by the relay's cleanup once past the
/// store's retention.
pub const SENT_PURGED_TOTAL: &str = "postbox_sent_purged_total";
/// Counter: `VACUUM`s of the outbox table this process's relays ran
/// themselves (PostgreSQL with `vacuum_after`), by `outcome`: `done`,
/// `skipped` when another vacuum held the table, `yielded` when it stopped
/// to let a waiting schema change through.
pub const VACUUMS_TOTAL: &str = "postbox_vacuums_total";
/// Histogram: how long each of those vacuums that was done took.
pub const VACUUM_DURATION_SECONDS: &str = "postbox_vacuum_duration_seconds";

/// The label value for topics past the limit.
pub const OTHER_TOPIC: &str = "_other";

/// Histogram bucket bounds (seconds, ascending) for the latency histograms
/// above: [`COMMIT_TO_PUBLISH_SECONDS`], [`PUBLISH_DURATION_SECONDS`],
/// [`CLAIM_DURATION_SECONDS`], [`COMPLETE_DURATION_SECONDS`] and
/// [`VACUUM_DURATION_SECONDS`]. They run from 1 ms (a claim on an idle
/// table) to 30 min (commit to publish while a broker is down and retries
/// back off); an exporter's default buckets, often 5 ms to 10 s, put every
/// outage in the overflow bucket.
///
/// The `postbox` daemon uses these for every histogram but
/// [`BATCH_SIZE`]; with `metrics-exporter-prometheus`, as it does:
///
/// ```ignore
/// use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
/// use postbox_core::observe;
///
/// let handle = PrometheusBuilder::new()
///     .set_buckets(observe::LATENCY_BUCKETS)?
///     .set_buckets_for_metric(
///         Matcher::Full(observe::BATCH_SIZE.to_owned()),
///         observe::BATCH_SIZE_BUCKETS,
///     )?
///     .install_recorder()?;
/// observe::describe();
/// ```
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0,
];

/// Histogram bucket bounds (rows, ascending) for [`BATCH_SIZE`]: 1 to
/// 10,000 rows per claim. The `postbox` daemon uses these for it (see
/// [`LATENCY_BUCKETS`]).
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// Hands out `topic` label values, at most `limit` distinct ones.
#[derive(Debug)]
pub(crate) struct TopicLabels {
    limit: usize,
    seen: Mutex<HashSet<Arc<str>>>,
}

impl TopicLabels {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// The label for `topic`: itself while there is room, else `_other`.
    pub(crate) fn label(&self, topic: &str) -> SharedString {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = seen.get(topic) {
            return SharedString::from(Arc::clone(t));
        }
        if seen.len() < self.limit {
            let t: Arc<str> = Arc::from(topic);
            seen.insert(Arc::clone(&t));
            return SharedString::from(t);
        }
        SharedString::const_str(OTHER_TOPIC)
    }
}

/// Registers a help text and unit for every metric above with the installed
/// recorder (Prometheus shows them as `# HELP`). Call it once, after
/// installing the recorder; recording works without it.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        PUBLISHED_TOTAL,
        Unit::Count,
        "Messages acknowledged by the broker and recorded as sent."
    );
    describe_counter!(
        PUBLISH_FAILURES_TOTAL,
        Unit::Count,
        "Failed publish attempts, by kind (transient: retried; rejected: dead at once)."
    );
    describe_counter!(
        NOT_SENT_TOTAL,
        Unit::Count,
        "Messages a publisher did not get to before the publish's deadline; given back without counting an attempt."
    );
    describe_counter!(
        DEAD_TOTAL,
        Unit::Count,
        "Messages that went dead (rejected, attempts exhausted, malformed row)."
    );
    describe_counter!(
        LEASE_LOST_TOTAL,
        Unit::Count,
        "Outcomes not recorded because another relay had taken the lease over (will be delivered again)."
    );
    describe_counter!(
        CLAIM_ERRORS_TOTAL,
        Unit::Count,
        "Claims that failed (database unreachable, schema missing)."
    );
    describe_counter!(
        COMPLETE_ERRORS_TOTAL,
        Unit::Count,
        "Attempts to record outcomes that failed (retried until the lease would have run out)."
    );
    describe_histogram!(
        COMMIT_TO_PUBLISH_SECONDS,
        Unit::Seconds,
        "From the row's creation (database clock) to the broker's acknowledgement."
    );
    describe_histogram!(
        PUBLISH_DURATION_SECONDS,
        Unit::Seconds,
        "One batch's publish call."
    );
    describe_histogram!(
        CLAIM_DURATION_SECONDS,
        Unit::Seconds,
        "One claim round trip."
    );
    describe_histogram!(
        COMPLETE_DURATION_SECONDS,
        Unit::Seconds,
        "Recording one batch's outcomes."
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Rows per non-empty claim.");
    describe_gauge!(
        PENDING,
        Unit::Count,
        "Unsent, not-dead rows in the outbox, leased ones included (sampled)."
    );
    describe_gauge!(
        LEASED,
        Unit::Count,
        "Rows under an unexpired lease (sampled)."
    );
    describe_gauge!(RETRYING, Unit::Count, "Rows waiting for a retry (sampled).");
    describe_gauge!(DEAD, Unit::Count, "Dead rows (sampled).");
    describe_gauge!(
        PARKED_KEYS,
        Unit::Count,
        "Keys held back by a parked dead message (sampled)."
    );
    describe_gauge!(
        OLDEST_PENDING_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest pending row, 0 when none (sampled)."
    );
    describe_gauge!(
        KEY_HOLDER_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest open transaction holding an outbox key (its later messages wait); 0 when none."
    );
    describe_gauge!(
        HORIZON_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest transaction holding back the database's cleanup horizon; 0 when none or unknown."
    );
    describe_gauge!(
        UNVACUUMED_ROWS,
        Unit::Count,
        "Rows deleted since the outbox table was last vacuumed (PostgreSQL; sampled)."
    );
    describe_gauge!(
        LEASES_HELD,
        Unit::Count,
        "Rows the relays of this process hold under lease right now."
    );
    describe_counter!(
        SENT_PURGED_TOTAL,
        Unit::Count,
        "Kept sent messages deleted by the relay's cleanup once past the store's retention."
    );
    describe_counter!(
        VACUUMS_TOTAL,
        Unit::Count,
        "VACUUMs of the outbox table run by the relays themselves (PostgreSQL, vacuum_after), by outcome (done, skipped, yielded)."
    );
    describe_histogram!(
        VACUUM_DURATION_SECONDS,
        Unit::Seconds,
        "How long each VACUUM the relays completed took."
    );
}

/// Sets the holdup gauges from one `holdups` sample and warns, naming the
/// process and its age, about holders past their threshold.
pub(crate) fn record_holdups(h: &crate::store::Holdups) {
    let age = |holder: &Option<crate::store::Holder>| {
        holder.as_ref().and_then(|x| x.age).unwrap_or_default()
    };
    let key_age = age(&h.key_holder);
    let horizon_age = age(&h.horizon);
    metrics::gauge!(KEY_HOLDER_AGE_SECONDS).set(key_age.as_secs_f64());
    metrics::gauge!(HORIZON_AGE_SECONDS).set(horizon_age.as_secs_f64());
    if let Some(rows) = h.unvacuumed_rows {
        metrics::gauge!(UNVACUUMED_ROWS).set(rows as f64);
    }
    if let Some(k) = h
        .key_holder
        .as_ref()
        .filter(|_| key_age >= KEY_HOLDER_WARN_AFTER)
    {
        tracing::warn!(
            pid = k.pid,
            age = ?key_age,
            holder = %k.description,
            "an open transaction holds outbox keys: their later messages wait until it commits or rolls back"
        );
    }
    if let Some(x) = h
        .horizon
        .as_ref()
        .filter(|_| horizon_age >= HORIZON_WARN_AFTER)
    {
        tracing::warn!(
            pid = x.pid,
            age = ?horizon_age,
            holder = %x.description,
            "a long transaction holds back the database's cleanup horizon: the outbox's deleted rows pile up and claims slow down until it ends"
        );
    }
}

/// Sets the store gauges from one `stats` sample.
pub(crate) fn record_stats(stats: &Stats, oldest_age: Option<Duration>) {
    metrics::gauge!(PENDING).set(stats.pending as f64);
    metrics::gauge!(LEASED).set(stats.leased as f64);
    metrics::gauge!(RETRYING).set(stats.retrying as f64);
    metrics::gauge!(DEAD).set(stats.dead as f64);
    metrics::gauge!(PARKED_KEYS).set(stats.parked_keys as f64);
    metrics::gauge!(OLDEST_PENDING_AGE_SECONDS).set(oldest_age.map_or(0.0, |d| d.as_secs_f64()));
}

/// Whether a relay can do its work right now, for a readiness probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// How long ago the last claim succeeded; `None` before the first one.
    pub last_claim_ok: Option<Duration>,
    /// The error of the latest claim, when it failed (the database is not
    /// reachable or the schema is missing).
    pub store_error: Option<String>,
    /// Why the latest batch failed as a whole, when every message in it came
    /// back `Transient` (the broker is unreachable or timing out). Cleared by
    /// the next batch with any acknowledged message.
    pub publisher_error: Option<String>,
}

impl Health {
    /// Ready: the latest claim succeeded and the publisher is not failing.
    pub fn is_ready(&self) -> bool {
        self.last_claim_ok.is_some() && self.store_error.is_none() && self.publisher_error.is_none()
    }
}

/// What the relay remembers for [`Health`].
#[derive(Debug, Default)]
pub(crate) struct HealthState {
    last_claim_ok: Option<Instant>,
    store_error: Option<String>,
    publisher_error: Option<String>,
}

impl HealthState {
    pub(crate) fn claim_ok(&mut self) {
        self.last_claim_ok = Some(Instant::now());
        self.store_error = None;
    }

    pub(crate) fn claim_failed(&mut self, error: String) {
        self.store_error = Some(error);
    }

    pub(crate) fn publisher(&mut self, error: Option<String>) {
        self.publisher_error = error;
    }

    pub(crate) fn snapshot(&self) -> Health {
        Health {
            last_claim_ok: self.last_claim_ok.map(|t| t.elapsed()),
            store_error: self.store_error.clone(),
            publisher_error: self.publisher_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_ascend_from_a_millisecond_to_half_an_hour() {
        for buckets in [LATENCY_BUCKETS, BATCH_SIZE_BUCKETS] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
            assert!(buckets.first().is_some_and(|b| *b > 0.0), "{buckets:?}");
        }
        assert_eq!(LATENCY_BUCKETS.first(), Some(&0.001));
        assert_eq!(LATENCY_BUCKETS.last(), Some(&1800.0));
        assert_eq!(BATCH_SIZE_BUCKETS.last(), Some(&10000.0));
    }

    #[test]
    fn topic_labels_are_bounded() {
        let labels = TopicLabels::new(2);
        assert_eq!(labels.label("a"), SharedString::from("a"));
        assert_eq!(labels.label("b"), SharedString::from("b"));
        assert_eq!(labels.label("c"), SharedString::from(OTHER_TOPIC));
        // topics already seen keep their own label
        assert_eq!(labels.label("a"), SharedString::from("a"));
    }

    #[test]
    fn health_needs_a_claim_and_no_errors() {
        let mut h = HealthState::default();
        assert!(!h.snapshot().is_ready(), "not ready before the first claim");
        h.claim_ok();
        assert!(h.snapshot().is_ready());
        h.publisher(Some("broker down".into()));
        assert!(!h.snapshot().is_ready());
        h.publisher(None);
        h.claim_failed("database unavailable".into());
        let s = h.snapshot();
        assert!(!s.is_ready());
        assert_eq!(s.store_error.as_deref(), Some("database unavailable"));
        h.claim_ok();
        assert!(h.snapshot().is_ready());
    }
}
