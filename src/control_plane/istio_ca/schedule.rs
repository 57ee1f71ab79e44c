//! When to ask istiod's CA, per identity, on a clock the caller passes in (so the timing is
//! tested without waiting).
//!
//! The rules are ztunnel's: an identity is wanted while a local mesh workload has it; a wanted
//! identity without a certificate is asked for at once, one with a certificate at half its
//! lifetime (counted from notBefore); a failure is retried after 0.5 s, doubling up to 150 s,
//! each wait varied by up to ±20 % so identities that failed together do not retry together;
//! the old certificate keeps serving until it expires; at most [`MAX_IN_FLIGHT`] requests are
//! out at once. An identity no longer wanted is forgotten, and an answer for it is dropped.
//! A failure is the identity's alone: [`Schedule::status`] says which identities fail and why,
//! for the log, the metrics and the admin endpoint.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::control_plane::identity::SpiffeId;

/// Requests out at once (ztunnel: 8).
pub const MAX_IN_FLIGHT: usize = 8;
pub const FIRST_RETRY: Duration = Duration::from_millis(500);
pub const MAX_RETRY: Duration = Duration::from_secs(150);
/// A certificate is never renewed sooner than this after it arrived (a CA handing out
/// certificates of a second or less would otherwise be asked in a loop).
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Entry {
    /// (notAfter, when to renew) of the certificate held.
    held: Option<(SystemTime, SystemTime)>,
    in_flight: bool,
    failures: u32,
    retry_at: Option<SystemTime>,
    last_error: Option<String>,
}

/// One identity's state, for the admin endpoint and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub id: SpiffeId,
    /// The certificate held can be used at the time asked.
    pub valid: bool,
    pub not_after: Option<SystemTime>,
    pub renew_at: Option<SystemTime>,
    pub in_flight: bool,
    /// Failures since the last success.
    pub failures: u32,
    pub last_error: Option<String>,
    pub retry_at: Option<SystemTime>,
}

#[derive(Debug, Default)]
pub struct Schedule {
    entries: BTreeMap<SpiffeId, Entry>,
}

impl Schedule {
    pub fn new() -> Schedule {
        Schedule::default()
    }

    /// The identities local mesh workloads have now. Returns those forgotten (their
    /// certificates are to be dropped).
    pub fn set_wanted(&mut self, wanted: impl IntoIterator<Item = SpiffeId>) -> Vec<SpiffeId> {
        let mut keep: BTreeMap<SpiffeId, Entry> = BTreeMap::new();
        for id in wanted {
            let entry = self.entries.remove(&id).unwrap_or_default();
            keep.insert(id, entry);
        }
        let forgotten = std::mem::replace(&mut self.entries, keep);
        forgotten.into_keys().collect()
    }

    /// The identities to ask for now, marked in flight; never more than [`MAX_IN_FLIGHT`]
    /// out at once. Those without any certificate go first.
    pub fn due(&mut self, now: SystemTime) -> Vec<SpiffeId> {
        let out = self.entries.values().filter(|e| e.in_flight).count();
        let room = MAX_IN_FLIGHT.saturating_sub(out);
        let is_due = |e: &Entry| {
            !e.in_flight
                && e.retry_at.is_none_or(|t| t <= now)
                && e.held.is_none_or(|(_, renew)| renew <= now)
        };
        let mut due: Vec<(bool, SpiffeId)> = self
            .entries
            .iter()
            .filter(|(_, e)| is_due(e))
            .map(|(id, e)| (e.held.is_some(), id.clone()))
            .collect();
        due.sort(); // `false` (nothing held) first, then by identity
        due.truncate(room);
        for (_, id) in &due {
            if let Some(e) = self.entries.get_mut(id) {
                e.in_flight = true;
            }
        }
        due.into_iter().map(|(_, id)| id).collect()
    }

    /// A certificate for `id` arrived. Returns false when `id` is no longer wanted (drop it).
    pub fn issued(
        &mut self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
        now: SystemTime,
    ) -> bool {
        let Some(e) = self.entries.get_mut(id) else {
            return false;
        };
        let half = not_after
            .duration_since(not_before)
            .unwrap_or(Duration::ZERO)
            / 2;
        let renew = (not_before + half).max(now + MIN_RENEWAL_INTERVAL);
        *e = Entry {
            held: Some((not_after, renew)),
            ..Entry::default()
        };
        true
    }

    /// Asking for `id` failed. `jitter` in [-1, 1] scales the ±20 % variation (the caller's
    /// random draw; tests pass fixed values). Returns when it will be asked again, or `None`
    /// when it is no longer wanted.
    pub fn failed(
        &mut self,
        id: &SpiffeId,
        reason: &str,
        now: SystemTime,
        jitter: f64,
    ) -> Option<SystemTime> {
        let e = self.entries.get_mut(id)?;
        e.in_flight = false;
        e.failures = e.failures.saturating_add(1);
        e.last_error = Some(reason.to_string());
        let base = FIRST_RETRY
            .saturating_mul(1u32 << (e.failures - 1).min(16))
            .min(MAX_RETRY);
        let factor = 1.0 + 0.2 * jitter.clamp(-1.0, 1.0);
        let wait = Duration::from_millis((base.as_millis() as f64 * factor).round() as u64);
        let at = now + wait;
        e.retry_at = Some(at);
        Some(at)
    }

    /// The earliest time something falls due (a renewal or a retry); `None` when nothing
    /// waits for time (all in flight, or nothing wanted). An identity due already gives a
    /// time in the past.
    pub fn next_wakeup(&self) -> Option<SystemTime> {
        self.entries
            .values()
            .filter(|e| !e.in_flight)
            .map(|e| {
                let renew = e.held.map(|(_, r)| r);
                match (renew, e.retry_at) {
                    (Some(r), Some(t)) => r.max(t),
                    (Some(r), None) => r,
                    (None, Some(t)) => t,
                    (None, None) => SystemTime::UNIX_EPOCH,
                }
            })
            .min()
    }

    /// Every wanted identity's state at `now`.
    pub fn status(&self, now: SystemTime) -> Vec<Status> {
        self.entries
            .iter()
            .map(|(id, e)| Status {
                id: id.clone(),
                valid: e.held.is_some_and(|(not_after, _)| not_after > now),
                not_after: e.held.map(|(a, _)| a),
                renew_at: e.held.map(|(_, r)| r),
                in_flight: e.in_flight,
                failures: e.failures,
                last_error: e.last_error.clone(),
                retry_at: e.retry_at,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "ns", sa).unwrap()
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn a_certificate_is_renewed_at_half_its_lifetime_from_not_before() {
        let mut s = Schedule::new();
        s.set_wanted([id("a")]);
        assert_eq!(s.due(t0()), [id("a")]);
        assert!(s.due(t0()).is_empty(), "in flight: not asked twice");
        assert_eq!(s.next_wakeup(), None);
        // Issued backdated 5 minutes, for 24 hours.
        let not_before = t0() - Duration::from_secs(300);
        assert!(s.issued(&id("a"), not_before, not_before + 24 * HOUR, t0()));
        let renew = not_before + 12 * HOUR;
        assert_eq!(s.next_wakeup(), Some(renew));
        assert!(s.due(renew - Duration::from_secs(1)).is_empty());
        assert_eq!(s.due(renew), [id("a")]);
        let st = &s.status(renew)[0];
        assert!(st.valid && st.in_flight);
        assert_eq!(st.renew_at, Some(renew));
    }

    #[test]
    fn failures_back_off_from_half_a_second_doubling_to_150_s_and_keep_the_old_certificate() {
        let mut s = Schedule::new();
        s.set_wanted([id("a")]);
        s.due(t0());
        s.issued(&id("a"), t0(), t0() + 2 * HOUR, t0());
        let mut now = t0() + HOUR;
        let mut waits = Vec::new();
        for _ in 0..11 {
            assert_eq!(s.due(now), [id("a")]);
            let at = s.failed(&id("a"), "unauthenticated", now, 0.0).unwrap();
            assert_eq!(s.next_wakeup(), Some(at));
            assert!(s.due(at - Duration::from_millis(1)).is_empty());
            waits.push(at.duration_since(now).unwrap().as_millis());
            now = at;
        }
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 16_000, 32_000, 64_000, 128_000, 150_000, 150_000]
        );
        let st = &s.status(now)[0];
        assert!(st.valid, "the old certificate still serves");
        assert_eq!(st.failures, 11);
        assert_eq!(st.last_error.as_deref(), Some("unauthenticated"));
        // Past its notAfter it is no longer valid, and still retried.
        let later = t0() + 3 * HOUR;
        assert!(!s.status(later)[0].valid);
        assert_eq!(s.due(later), [id("a")]);
        // A success clears the failures.
        s.issued(&id("a"), later, later + 2 * HOUR, later);
        let st = &s.status(later)[0];
        assert_eq!(
            (st.failures, st.last_error.clone(), st.retry_at),
            (0, None, None)
        );
    }

    #[test]
    fn a_retry_varies_by_at_most_a_fifth() {
        let mut s = Schedule::new();
        s.set_wanted([id("a")]);
        for (jitter, want_ms) in [(-1.0, 400), (1.0, 600), (5.0, 600), (-0.5, 450)] {
            s.set_wanted([]);
            s.set_wanted([id("a")]);
            s.due(t0());
            let at = s.failed(&id("a"), "slow", t0(), jitter).unwrap();
            assert_eq!(at.duration_since(t0()).unwrap().as_millis(), want_ms);
        }
    }

    #[test]
    fn a_failure_is_the_identitys_alone() {
        let mut s = Schedule::new();
        s.set_wanted([id("a"), id("b")]);
        assert_eq!(s.due(t0()), [id("a"), id("b")]);
        s.failed(&id("a"), "wrong identity in the chain", t0(), 0.0);
        s.issued(&id("b"), t0(), t0() + HOUR, t0());
        let st = s.status(t0());
        assert!(!st[0].valid && st[0].failures == 1);
        assert!(st[1].valid && st[1].failures == 0);
        assert_eq!(s.next_wakeup(), Some(t0() + Duration::from_millis(500)));
    }

    #[test]
    fn no_more_than_eight_requests_are_out_and_new_identities_go_first() {
        let mut s = Schedule::new();
        let ids: Vec<_> = (0..20).map(|i| id(&format!("sa-{i:02}"))).collect();
        s.set_wanted(ids.clone());
        let first = s.due(t0());
        assert_eq!(first, ids[..MAX_IN_FLIGHT]);
        assert!(s.due(t0()).is_empty());
        for i in &first[..3] {
            s.issued(i, t0(), t0() + HOUR, t0());
        }
        assert_eq!(s.due(t0()), ids[8..11]);
        // At renewal time a renewal waits behind an identity that has nothing.
        let renew = t0() + HOUR / 2;
        for i in &ids[3..11] {
            s.issued(i, t0(), t0() + HOUR, t0());
        }
        let next = s.due(renew);
        assert_eq!(next.len(), MAX_IN_FLIGHT);
        assert_eq!(next[..MAX_IN_FLIGHT], ids[11..19]);
    }

    #[test]
    fn an_identity_no_longer_wanted_is_forgotten_and_its_answer_dropped() {
        let mut s = Schedule::new();
        s.set_wanted([id("a"), id("b")]);
        s.due(t0());
        let forgotten = s.set_wanted([id("b")]);
        assert_eq!(forgotten, [id("a")]);
        assert!(!s.issued(&id("a"), t0(), t0() + HOUR, t0()));
        assert_eq!(s.failed(&id("a"), "x", t0(), 0.0), None);
        assert_eq!(s.status(t0()).len(), 1);
        // b stays in flight across the change.
        assert!(s.status(t0())[0].in_flight);
    }

    #[test]
    fn a_very_short_certificate_is_not_renewed_in_a_loop() {
        let mut s = Schedule::new();
        s.set_wanted([id("a")]);
        s.due(t0());
        s.issued(&id("a"), t0(), t0() + Duration::from_millis(200), t0());
        assert_eq!(s.next_wakeup(), Some(t0() + MIN_RENEWAL_INTERVAL));
    }
}
