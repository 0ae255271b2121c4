//! Log lines for events that come in floods (refused peers, connections
//! failing together when a TiDB dies or no TiDB can take them): the first
//! at once, then at most one line per interval saying how many were not
//! logged. A normal run stays quiet and a problem stays loud, without a
//! line per connection.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Admits one line per `every`; counts the rest into the next line.
#[derive(Debug)]
pub struct Flood {
    every: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    unlogged: u64,
}

impl Flood {
    /// A limiter of one line per `every`.
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(State {
                last: None,
                unlogged: 0,
            }),
        }
    }

    /// One event happened: `Some(n)` when it should be logged now, `n`
    /// events having gone unlogged since the last line; `None` when it is
    /// counted into the next line instead.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.last.is_some_and(|t| now.duration_since(t) < self.every) {
            s.unlogged += 1;
            return None;
        }
        s.last = Some(now);
        Some(std::mem::take(&mut s.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_one_line_per_interval_with_a_count() {
        let f = Flood::new(Duration::from_secs(1));
        assert_eq!(f.admit(), Some(0), "the first is logged at once");
        assert_eq!(f.admit(), None);
        assert_eq!(f.admit(), None);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(f.admit(), None);
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(
            f.admit(),
            Some(3),
            "the next line counts the three held back"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(f.admit(), Some(0));
    }
}
