//! Listeners resting after an accept error (EMFILE, ENFILE, …). Such an error repeats at once
//! while its cause lasts, so instead of spinning the driver stops accepting on that listener for
//! a moment and re-arms it when the rest is over. Both drivers share this bookkeeping.

use std::time::{Duration, Instant};

pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub struct AcceptBackoff {
    resting: Vec<(usize, Instant)>,
}

impl AcceptBackoff {
    pub fn rest(&mut self, listener: usize, now: Instant) {
        self.resting.push((listener, now + ACCEPT_BACKOFF));
    }

    pub fn forget(&mut self, listener: usize) {
        self.resting.retain(|(l, _)| *l != listener);
    }

    /// Removes and returns the listeners whose rest is over; shortens `timeout` so the wait
    /// ends when the next one is due.
    pub fn due(&mut self, now: Instant, timeout: &mut Option<Duration>) -> Vec<usize> {
        let mut due = Vec::new();
        self.resting.retain(|&(l, at)| {
            if at <= now {
                due.push(l);
                false
            } else {
                let left = at - now;
                *timeout = Some(timeout.map_or(left, |t| t.min(left)));
                true
            }
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resting_listener_comes_back_after_the_backoff_and_bounds_the_wait() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        b.rest(3, t0);
        let mut timeout = None;
        assert!(b.due(t0, &mut timeout).is_empty());
        assert_eq!(timeout, Some(ACCEPT_BACKOFF));
        let mut timeout = None;
        assert_eq!(b.due(t0 + ACCEPT_BACKOFF, &mut timeout), vec![3]);
        assert_eq!(timeout, None);
        assert!(b.due(t0 + ACCEPT_BACKOFF, &mut None).is_empty());
    }
}
