//! What a task did over time, kept in its durable record: a downsampled series of its progress
//! reports (loss, learning rate, tokens/s, sequences scored...) and one record per attempt (who
//! held it, when, how it ended). Pure data; the machine fills it from events and their times.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Millis;

/// Points kept per distillation before the series is thinned (every other point dropped, the
/// sampling stride doubled); other tasks keep a quarter of it. A task's record stays a few tens
/// of kilobytes however long it runs.
pub const MAX_POINTS: usize = 128;

/// One progress report: its time and metrics (without the `progress.` prefix).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ProgressPoint {
    pub time_ms: Millis,
    #[serde(with = "super::finite_metrics", default)]
    pub metrics: BTreeMap<String, f64>,
}

/// A task's progress reports, downsampled: every `stride`-th report is kept, and the latest one
/// always (in `tail` until it is a sampled one), so a chart reaches the end of the run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ProgressSeries {
    pub points: Vec<ProgressPoint>,
    pub tail: Option<ProgressPoint>,
    /// Reports seen in all.
    pub seen: u64,
    /// Keep one report in `stride` (a power of two).
    pub stride: u64,
}

impl Default for ProgressSeries {
    fn default() -> Self {
        ProgressSeries {
            points: Vec::new(),
            tail: None,
            seen: 0,
            stride: 1,
        }
    }
}

impl ProgressSeries {
    /// Adds a report. Reports of `max` points at most are kept, evenly spaced in report count.
    pub fn push(&mut self, p: ProgressPoint, max: usize) {
        // Even, so the point that triggers a thinning (index `max`) is one of those kept.
        let max = max.max(2) & !1;
        if self.seen.is_multiple_of(self.stride) {
            self.points.push(p);
            self.tail = None;
            if self.points.len() > max {
                let kept: Vec<ProgressPoint> = std::mem::take(&mut self.points)
                    .into_iter()
                    .step_by(2)
                    .collect();
                self.points = kept;
                self.stride *= 2;
            }
        } else {
            self.tail = Some(p);
        }
        self.seen += 1;
    }

    /// The kept points in time order, the latest report last.
    pub fn all(&self) -> impl Iterator<Item = &ProgressPoint> {
        self.points.iter().chain(self.tail.iter())
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty() && self.tail.is_none()
    }
}

/// How an attempt ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Succeeded,
    Failed,
    Lost,
    Revoked,
    Cancelled,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Succeeded => "succeeded",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Lost => "lost",
            AttemptOutcome::Revoked => "revoked",
            AttemptOutcome::Cancelled => "cancelled",
        }
    }
}

/// One lease of a task: the workers of its ranks, when it started and how it ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AttemptRecord {
    pub lease_id: u64,
    /// Worker id of each rank.
    pub workers: Vec<String>,
    pub start_ms: Millis,
    pub end_ms: Option<Millis>,
    pub outcome: Option<AttemptOutcome>,
}

/// Attempts kept per task (the oldest are dropped past it; counters keep the totals).
pub const MAX_ATTEMPTS_KEPT: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(i: u64) -> ProgressPoint {
        ProgressPoint {
            time_ms: i,
            metrics: [("step".to_string(), i as f64)].into(),
        }
    }

    #[test]
    fn a_long_series_is_thinned_evenly_and_keeps_first_and_latest() {
        let mut s = ProgressSeries::default();
        for i in 0..1000 {
            s.push(pt(i), 16);
            assert!(s.points.len() <= 16, "{}", s.points.len());
        }
        let steps: Vec<u64> = s.all().map(|p| p.time_ms).collect();
        assert_eq!(steps[0], 0);
        assert_eq!(*steps.last().unwrap(), 999);
        // Evenly spaced by the stride (all but the tail).
        let stride = s.stride;
        assert!(stride >= 64, "{stride}");
        for w in s.points.windows(2) {
            assert_eq!(w[1].time_ms - w[0].time_ms, stride);
        }
        assert!(steps.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_short_series_keeps_every_point() {
        let mut s = ProgressSeries::default();
        for i in 0..10 {
            s.push(pt(i), 16);
        }
        assert_eq!(s.all().count(), 10);
        assert_eq!(s.stride, 1);
    }
}
