//! Exponential backoff with full jitter.

use std::time::Duration;

/// How long to wait before attempt `n + 1` after attempt `n` failed.
///
/// The wait is drawn uniformly from `[0, min(cap, base · 2^(n-1))]` ("full
/// jitter", as in the AWS architecture blog's analysis): retries from many
/// relays spread out instead of arriving in waves.
///
/// ```
/// use std::time::Duration;
/// use postbox_core::RetryPolicy;
///
/// let policy = RetryPolicy::new(Duration::from_millis(500), Duration::from_secs(60));
/// assert_eq!(policy.ceiling(1), Duration::from_millis(500));
/// assert_eq!(policy.ceiling(3), Duration::from_secs(2));
/// assert_eq!(policy.ceiling(40), Duration::from_secs(60));
/// assert!(policy.delay(3) <= Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    base: Duration,
    cap: Duration,
}

impl RetryPolicy {
    /// A policy with first ceiling `base`, doubling per attempt up to `cap`.
    /// A `cap` below `base` is raised to `base`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
        }
    }

    /// Retries at once, every time (for tests and for publishers that do
    /// their own pacing).
    pub fn immediate() -> Self {
        Self::new(Duration::ZERO, Duration::ZERO)
    }

    /// The first ceiling.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest wait.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The largest wait after failed attempt `attempt` (1-based):
    /// `min(cap, base · 2^(attempt-1))`, without overflow for any attempt.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(63);
        let factor = 1u64 << exp;
        let nanos = self.base.as_nanos().saturating_mul(u128::from(factor));
        let cap = self.cap.as_nanos();
        let n = nanos.min(cap);
        Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
    }

    /// A jittered wait after failed attempt `attempt`, using `unit`, a
    /// number in `[0, 1)`, as the random draw.
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.ceiling(attempt).mul_f64(unit)
    }

    /// A jittered wait after failed attempt `attempt`.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, fastrand::f64())
    }
}

impl Default for RetryPolicy {
    /// 1 s doubling to 5 min.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delay_never_exceeds_ceiling_or_cap(base_ms in 0u64..10_000, cap_ms in 0u64..1_000_000, attempt in 0u32..10_000, unit in 0.0f64..1.0) {
            let p = RetryPolicy::new(Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let d = p.delay_with(attempt, unit);
            prop_assert!(d <= p.ceiling(attempt));
            prop_assert!(p.ceiling(attempt) <= p.cap());
        }

        #[test]
        fn ceiling_grows_monotonically_until_cap(base_ms in 1u64..10_000, cap_ms in 0u64..10_000_000, attempt in 1u32..200) {
            let p = RetryPolicy::new(Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let now = p.ceiling(attempt);
            let next = p.ceiling(attempt + 1);
            prop_assert!(next >= now);
            // doubles exactly until it reaches the cap
            if now.saturating_mul(2) <= p.cap() {
                prop_assert_eq!(next, now * 2);
            } else {
                prop_assert_eq!(next, p.cap());
            }
        }

        #[test]
        fn first_ceiling_is_base(base_ms in 0u64..10_000, extra in 0u64..10_000) {
            let p = RetryPolicy::new(Duration::from_millis(base_ms), Duration::from_millis(base_ms + extra));
            prop_assert_eq!(p.ceiling(1), Duration::from_millis(base_ms));
        }

        #[test]
        fn jitter_spans_the_whole_range(base_ms in 1u64..10_000, attempt in 1u32..30) {
            let p = RetryPolicy::new(Duration::from_millis(base_ms), Duration::from_secs(3600));
            prop_assert_eq!(p.delay_with(attempt, 0.0), Duration::ZERO);
            let top = p.delay_with(attempt, 0.999_999);
            prop_assert!(top >= p.ceiling(attempt).mul_f64(0.999));
        }
    }

    #[test]
    fn bad_unit_is_clamped() {
        let p = RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(10));
        assert_eq!(p.delay_with(1, f64::NAN), Duration::ZERO);
        assert_eq!(p.delay_with(1, 7.0), Duration::from_secs(1));
        assert_eq!(p.delay_with(1, -1.0), Duration::ZERO);
    }
}
