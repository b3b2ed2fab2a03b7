//! Durations for people, in the units the flags take: `1d`, `1d 12h`,
//! `2m 30s`, `250ms`.
//!
//! `humantime::format_duration` writes `1day` and turns `90d` into
//! `2months 29days 2h 52m 48s` (its months are 30.44 days); this stops at
//! days, and what it writes is what `--older-than` and friends accept.

use std::time::Duration;

/// `d` as days, hours, minutes, seconds and the fraction's milli-, micro-
/// and nanoseconds, largest first, zero units left out; `0s` for zero.
pub(crate) fn duration(d: Duration) -> String {
    const UNITS: [(&str, u64); 4] = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)];
    let mut parts = Vec::new();
    let mut secs = d.as_secs();
    for (unit, size) in UNITS {
        let n = secs / size;
        secs %= size;
        if n > 0 {
            parts.push(format!("{n}{unit}"));
        }
    }
    let nanos = d.subsec_nanos();
    for (unit, n) in [
        ("ms", nanos / 1_000_000),
        ("us", nanos / 1_000 % 1_000),
        ("ns", nanos % 1_000),
    ] {
        if n > 0 {
            parts.push(format!("{n}{unit}"));
        }
    }
    if parts.is_empty() {
        "0s".to_owned()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_not_months_in_the_flags_units() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(86_400), "1d"),
            (Duration::from_secs(90 * 86_400), "90d"),
            (Duration::from_secs(36 * 3_600), "1d 12h"),
            (Duration::from_secs(150), "2m 30s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1_500), "1s 500ms"),
            (Duration::new(3_661, 1_001_001), "1h 1m 1s 1ms 1us 1ns"),
        ];
        for (d, shown) in cases {
            assert_eq!(duration(d), shown, "{d:?}");
            // what is shown is what a flag takes
            assert_eq!(humantime::parse_duration(shown).ok(), Some(d), "{shown}");
        }
    }
}
