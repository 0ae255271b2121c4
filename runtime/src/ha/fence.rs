//! How long the owner may keep the virtual IP without hearing from PD: a
//! pure function of keep-alive answers and the time, so the rule that two
//! proxies never hold the address at once is one small, tested thing.
//!
//! etcd expires a lease `ttl` seconds after it last renewed it, and it
//! renewed it no earlier than the keep-alive was sent. So the lease is
//! certainly alive until `sent + ttl`, and no other proxy can be elected
//! before then. The owner gives the address up a [`margin`] earlier, to
//! leave time for removing it and for clocks that run at slightly
//! different rates.

use std::time::Duration;

use tokio::time::Instant;

/// How long before the lease can have expired the address is given up: a
/// quarter of the TTL, at most 1 s (removing it takes milliseconds).
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 4).min(Duration::from_secs(1))
}

/// Until when this proxy may hold the address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fence {
    until: Option<Instant>,
}

impl Fence {
    /// A keep-alive sent at `sent` was answered with `ttl` seconds (0 or
    /// less: the lease is gone).
    pub fn handle_renewed(&mut self, sent: Instant, ttl: i64) {
        if ttl <= 0 {
            self.until = None;
            return;
        }
        let ttl = Duration::from_secs(ttl as u64);
        let valid = ttl - margin(ttl);
        let until = sent + valid;
        // An answer to an older keep-alive never shortens the fence.
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    /// The lease is gone (revoked, expired, or a new one replaces it).
    pub fn handle_lost(&mut self) {
        self.until = None;
    }

    /// Whether the address may be held at `now`.
    #[must_use]
    pub fn may_hold(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// When holding stops being allowed, if it is allowed now.
    #[must_use]
    pub fn poll_deadline(&self) -> Option<Instant> {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_allows_holding_until_ttl_minus_the_margin_after_sending() {
        let t0 = Instant::now();
        let mut f = Fence::default();
        assert!(!f.may_hold(t0));
        f.handle_renewed(t0, 2);
        assert!(f.may_hold(t0 + Duration::from_millis(1499)));
        assert!(!f.may_hold(t0 + Duration::from_millis(1500)));
        assert_eq!(f.poll_deadline(), Some(t0 + Duration::from_millis(1500)));
        // PD's etcd may answer a longer TTL than asked: the margin stays 1 s.
        f.handle_renewed(t0, 5);
        assert_eq!(f.poll_deadline(), Some(t0 + Duration::from_secs(4)));
    }

    #[test]
    fn a_lost_lease_or_a_zero_ttl_ends_holding_at_once() {
        let t0 = Instant::now();
        let mut f = Fence::default();
        f.handle_renewed(t0, 3);
        f.handle_renewed(t0 + Duration::from_millis(10), 0);
        assert!(!f.may_hold(t0 + Duration::from_millis(10)));
        f.handle_renewed(t0, 5);
        f.handle_lost();
        assert!(!f.may_hold(t0));
    }

    #[test]
    fn a_late_answer_to_an_older_keep_alive_does_not_shorten_the_fence() {
        let t0 = Instant::now();
        let mut f = Fence::default();
        f.handle_renewed(t0 + Duration::from_secs(1), 2);
        f.handle_renewed(t0, 2);
        assert!(f.may_hold(t0 + Duration::from_millis(2400)));
    }
}
