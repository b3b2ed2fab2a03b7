//! Tenant fairness: claims rotate across the tenants that have pending
//! messages, so that one tenant's backlog of a million messages does not
//! starve the others.
//!
//! The relay asks the store now and then for the tenants with pending work
//! ([`Store::pending_tenants`](crate::Store::pending_tenants)) and then
//! claims for each of them in turn, followed by one claim for any tenant
//! (which also serves messages without a tenant, oldest first). With
//! tenants `a`, `b`, `c` the claims go `a, b, c, any, a, b, c, any, …`, so
//! each tenant gets at least one claim in `tenants + 1`, however far behind
//! the others its messages were written. A store that cannot tell its
//! tenants (the trait's default) gets oldest-first claims only, as does a
//! relay restricted to one tenant.
//!
//! When the "any tenant" claim comes back empty nothing is claimable for
//! any tenant, and going through the tenants again would only repeat that
//! (a tenant counts as pending while its messages wait for a retry, a
//! delay or a parked key). The rotation then stays on "any tenant" until a
//! claim returns messages, so an idle relay makes one claim per poll
//! whatever the number of tenants.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How many tenants a rotation holds at most; the rest are served by the
/// "any tenant" claims, oldest first.
pub(crate) const MAX_TENANTS: usize = 1_000;

/// The rotation's state, shared by the relay's workers.
#[derive(Debug, Default)]
pub(crate) struct Rotation {
    inner: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    tenants: Vec<String>,
    /// Index of the next claim's scope: `0..tenants.len()` a tenant,
    /// `tenants.len()` any tenant.
    next: usize,
    refreshed: Option<Instant>,
    /// The last "any tenant" claim came back empty, and no claim has
    /// returned messages since: claims are for any tenant.
    idle: bool,
}

impl Rotation {
    /// Whether the tenant list is older than `every` (or was never read).
    pub(crate) fn stale(&self, every: Duration) -> bool {
        self.lock().refreshed.is_none_or(|at| at.elapsed() >= every)
    }

    /// Replaces the tenant list, keeping the rotation's place as well as it
    /// can (the next tenant after the one served last).
    pub(crate) fn refresh(&self, mut tenants: Vec<String>) {
        tenants.sort();
        tenants.dedup();
        tenants.truncate(MAX_TENANTS);
        let mut s = self.lock();
        let last = s
            .next
            .checked_sub(1)
            .and_then(|i| s.tenants.get(i))
            .cloned();
        // after "any" (or before the first claim) the rotation starts over
        s.next = last.map_or(0, |last| tenants.partition_point(|t| *t <= last));
        s.tenants = tenants;
        s.refreshed = Some(Instant::now());
    }

    /// The tenants in the rotation.
    pub(crate) fn tenants(&self) -> Vec<String> {
        self.lock().tenants.clone()
    }

    /// Tells the rotation what a claim found (`rotated`: it was for one of
    /// the rotation's tenants): an empty claim for any tenant makes the
    /// rotation idle, a claim that returned messages busy again.
    pub(crate) fn claimed(&self, rotated: bool, empty: bool) {
        let mut s = self.lock();
        if !empty {
            s.idle = false;
        } else if !rotated {
            s.idle = true;
        }
    }

    /// The scope of the next claim: `Some(tenant)` or `None` for any tenant.
    pub(crate) fn next(&self) -> Option<String> {
        let mut s = self.lock();
        if s.idle {
            return None;
        }
        let n = s.tenants.len();
        let at = s.next.min(n);
        s.next = if at >= n { 0 } else { at + 1 };
        s.tenants.get(at).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn rotates_through_tenants_then_any() {
        let r = Rotation::default();
        assert_eq!(r.next(), None, "no tenants known: any tenant");
        r.refresh(names(&["b", "a", "c"]));
        let got: Vec<_> = (0..8).map(|_| r.next()).collect();
        let a = |s: &str| Some(s.to_owned());
        assert_eq!(
            got,
            [a("a"), a("b"), a("c"), None, a("a"), a("b"), a("c"), None]
        );
    }

    #[test]
    fn a_refresh_continues_after_the_last_tenant_served() {
        let r = Rotation::default();
        r.refresh(names(&["a", "b", "c"]));
        assert_eq!(r.next().as_deref(), Some("a"));
        assert_eq!(r.next().as_deref(), Some("b"));
        // b finished, d arrived
        r.refresh(names(&["a", "c", "d"]));
        assert_eq!(r.next().as_deref(), Some("c"));
        assert_eq!(r.next().as_deref(), Some("d"));
        assert_eq!(r.next(), None);
    }

    #[test]
    fn an_empty_claim_for_any_tenant_stops_the_rotation_until_one_returns_messages() {
        let r = Rotation::default();
        r.refresh(names(&["a", "b"]));
        assert_eq!(r.next().as_deref(), Some("a"));
        r.claimed(true, true);
        assert_eq!(r.next().as_deref(), Some("b"));
        r.claimed(true, true);
        assert_eq!(r.next(), None);
        r.claimed(false, true);
        assert_eq!(r.next(), None, "idle: any tenant");
        assert_eq!(r.next(), None, "idle: any tenant");
        r.claimed(false, false);
        assert_eq!(r.next().as_deref(), Some("a"), "busy: the rotation goes on");
    }

    proptest! {
        /// Within any window of `tenants + 1` consecutive claims, every
        /// tenant and "any" get exactly one, whatever refreshes with the
        /// same list happen in between.
        #[test]
        fn every_tenant_once_per_round(
            tenants in proptest::collection::btree_set("[a-z]{1,4}", 0..12),
            start in 0usize..30,
            refresh_at in proptest::collection::vec(any::<bool>(), 60),
        ) {
            let list: Vec<String> = tenants.into_iter().collect();
            let r = Rotation::default();
            r.refresh(list.clone());
            for _ in 0..start {
                r.next();
            }
            let round = list.len() + 1;
            let mut seen = Vec::new();
            for refresh in refresh_at.iter().take(round * 3) {
                if *refresh {
                    r.refresh(list.clone());
                }
                seen.push(r.next());
            }
            for window in seen.windows(round) {
                let mut w: Vec<_> = window.to_vec();
                w.sort();
                let mut want: Vec<Option<String>> = list.iter().cloned().map(Some).collect();
                want.push(None);
                want.sort();
                prop_assert_eq!(w, want);
            }
        }
    }
}
