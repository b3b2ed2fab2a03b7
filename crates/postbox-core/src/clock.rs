//! An injectable wall clock, so timing logic runs on paused tokio time in tests.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that follows tokio's clock: with `tokio::time::pause()` it stands
/// still and moves only with `tokio::time::advance` or auto-advance, so
/// lease and retry deadlines can be crossed in a test without sleeping.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: SystemTime,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Starts at the system's current time.
    pub fn new() -> Self {
        Self {
            origin: SystemTime::now(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.origin + self.start.elapsed()
    }
}

/// A shared handle to any clock.
pub type SharedClock = Arc<dyn Clock>;

/// Time elapsed from `earlier` to `later`, zero if `later` is before it.
pub fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}
