//! One result line per comparison: printed at once as JSON, and gathered
//! into a readable table at the end.

use std::io::Write;

use serde_json::{Value, json};

/// Which way is better for a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Better {
    /// Throughput: postbox / ceiling, goal is a lower bound.
    Higher,
    /// Cost or latency: the goal is an upper bound.
    Lower,
}

/// A goal a figure is checked against (reported, never asserted).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Goal {
    /// `ratio >= x`.
    RatioAtLeast(f64),
    /// `ratio <= x`.
    RatioAtMost(f64),
    /// `postbox value <= x` (in the line's unit).
    ValueAtMost(f64),
    /// Reported for reference only.
    None,
}

impl Goal {
    fn text(self, unit: &str) -> String {
        match self {
            Goal::RatioAtLeast(x) => format!(">= {x}x"),
            Goal::RatioAtMost(x) => format!("<= {x}x"),
            Goal::ValueAtMost(x) => format!("<= {x} {unit}"),
            Goal::None => "-".to_owned(),
        }
    }

    fn met(self, ratio: f64, value: f64) -> Option<bool> {
        match self {
            Goal::RatioAtLeast(x) => Some(ratio >= x),
            Goal::RatioAtMost(x) => Some(ratio <= x),
            Goal::ValueAtMost(x) => Some(value <= x),
            Goal::None => None,
        }
    }
}

/// One comparison: the ceiling (or reference) and postbox, same run.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    pub(crate) scenario: String,
    pub(crate) variant: String,
    pub(crate) ceiling: String,
    pub(crate) unit: &'static str,
    pub(crate) better: Better,
    /// Median over repeats.
    pub(crate) ceiling_value: Option<f64>,
    /// Median over repeats.
    pub(crate) postbox_value: f64,
    pub(crate) ceiling_samples: Vec<f64>,
    pub(crate) postbox_samples: Vec<f64>,
    pub(crate) goal: Goal,
    pub(crate) extra: Value,
}

impl Line {
    // every field of a result line is required; a builder would only hide that
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        scenario: &str,
        variant: impl Into<String>,
        ceiling: impl Into<String>,
        unit: &'static str,
        better: Better,
        ceiling_samples: Vec<f64>,
        postbox_samples: Vec<f64>,
        goal: Goal,
    ) -> Self {
        Self {
            scenario: scenario.to_owned(),
            variant: variant.into(),
            ceiling: ceiling.into(),
            unit,
            better,
            ceiling_value: (!ceiling_samples.is_empty()).then(|| median(&ceiling_samples)),
            postbox_value: median(&postbox_samples),
            ceiling_samples,
            postbox_samples,
            goal,
            extra: Value::Null,
        }
    }

    pub(crate) fn extra(mut self, extra: Value) -> Self {
        self.extra = extra;
        self
    }

    pub(crate) fn ratio(&self) -> Option<f64> {
        self.ceiling_value
            .filter(|c| *c > 0.0)
            .map(|c| self.postbox_value / c)
    }

    pub(crate) fn met(&self) -> Option<bool> {
        self.goal
            .met(self.ratio().unwrap_or(f64::NAN), self.postbox_value)
    }

    pub(crate) fn json(&self) -> Value {
        let mut v = json!({
            "scenario": self.scenario,
            "variant": self.variant,
            "ceiling": self.ceiling,
            "unit": self.unit,
            "better": if self.better == Better::Higher { "higher" } else { "lower" },
            "ceiling_value": self.ceiling_value.map(round3),
            "postbox_value": round3(self.postbox_value),
            "ratio": self.ratio().map(round3),
            "goal": self.goal.text(self.unit),
            "met": self.met(),
            "ceiling_samples": self.ceiling_samples.iter().copied().map(round3).collect::<Vec<_>>(),
            "postbox_samples": self.postbox_samples.iter().copied().map(round3).collect::<Vec<_>>(),
        });
        if self.unit == "msg/s" {
            v["ceiling_msgs_per_s"] = json!(self.ceiling_value.map(round3));
            v["postbox_msgs_per_s"] = json!(round3(self.postbox_value));
        }
        if !self.extra.is_null() {
            v["extra"] = self.extra.clone();
        }
        v
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Median; 0 for an empty slice.
pub(crate) fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0..=100) by nearest rank; 0 for an empty slice.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints a line as JSON at once (so a long run shows progress) and keeps it.
pub(crate) fn emit(lines: &mut Vec<Line>, line: Line) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.json());
    let _ = out.flush();
    lines.push(line);
}

fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "msg/s" | "txn/s" => format!("{v:.0}"),
        _ => format!("{v:.3}"),
    }
}

/// The readable table of every line.
pub(crate) fn table(lines: &[Line]) -> String {
    let mut rows = vec![[
        "scenario".to_owned(),
        "variant".to_owned(),
        "ceiling / reference".to_owned(),
        "ceiling".to_owned(),
        "postbox".to_owned(),
        "unit".to_owned(),
        "ratio".to_owned(),
        "goal".to_owned(),
        "met".to_owned(),
    ]];
    for l in lines {
        rows.push([
            l.scenario.clone(),
            l.variant.clone(),
            l.ceiling.clone(),
            l.ceiling_value
                .map_or_else(|| "-".to_owned(), |c| fmt_value(c, l.unit)),
            fmt_value(l.postbox_value, l.unit),
            l.unit.to_owned(),
            l.ratio()
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
            l.goal.text(l.unit),
            match l.met() {
                Some(true) => "yes".to_owned(),
                Some(false) => "NO".to_owned(),
                None => "-".to_owned(),
            },
        ]);
    }
    let mut widths = [0usize; 9];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for (i, r) in rows.iter().enumerate() {
        s.push('|');
        for (w, c) in widths.iter().zip(r.iter()) {
            s.push_str(&format!(" {c:<w$} |"));
        }
        s.push('\n');
        if i == 0 {
            s.push('|');
            for w in widths {
                s.push_str(&format!("{}|", "-".repeat(w + 2)));
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentile() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), 50.0);
        assert_eq!(percentile(&sorted, 99.0), 99.0);
        assert_eq!(percentile(&sorted, 100.0), 100.0);
    }

    #[test]
    fn goals() {
        let l = Line::new(
            "x",
            "v",
            "C1",
            "msg/s",
            Better::Higher,
            vec![100.0],
            vec![70.0],
            Goal::RatioAtLeast(0.6),
        );
        assert_eq!(l.met(), Some(true));
        assert!(table(&[l]).contains("0.70"));
    }
}
