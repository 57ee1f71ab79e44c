//! Flow-control windows (RFC 9113 §5.2, §6.9).
//!
//! Send side: [`SendWindow`] is the credit the peer granted; it may go negative only when the
//! peer lowers SETTINGS_INITIAL_WINDOW_SIZE while data is in flight (RFC 9113 §6.9.2), never
//! through our own sends, and never exceeds 2^31−1.
//! Receive side: [`RecvWindow`] tracks what we granted, what arrived and has not yet been
//! released by the caller (bytes still on their way to the destination), and what was released
//! but not yet announced in a WINDOW_UPDATE. Credit goes back to the peer only on release.

/// The largest window RFC 9113 allows.
//= rfc9113#section-6.9.1
//# A sender MUST NOT allow a flow-control window to exceed 2^31-1
//# octets.
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// The window every stream and the connection start with, before SETTINGS say otherwise.
//= rfc9113#section-6.9.2
//# When an HTTP/2 connection is first established, new streams are
//# created with an initial flow-control window size of 65,535 octets.
//# The connection flow-control window is also 65,535 octets.
pub const DEFAULT_WINDOW: u32 = 65_535;

/// Why a window change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowError {
    /// The change would take the window above 2^31−1.
    Overflow,
    /// More bytes than the window holds.
    Exceeded,
}

/// Credit the peer granted us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendWindow(i64);

impl SendWindow {
    pub fn new(initial: u32) -> SendWindow {
        SendWindow(initial as i64)
    }

    /// Bytes that may be sent now (0 when the window is negative).
    pub fn available(&self) -> usize {
        self.0.max(0) as usize
    }

    pub fn value(&self) -> i64 {
        self.0
    }

    /// Takes credit for `n` bytes about to be sent.
    pub fn consume(&mut self, n: usize) -> Result<(), WindowError> {
        if n > self.available() {
            return Err(WindowError::Exceeded);
        }
        self.0 -= n as i64;
        Ok(())
    }

    /// A WINDOW_UPDATE increment, or the difference a new SETTINGS_INITIAL_WINDOW_SIZE makes.
    //= rfc9113#section-6.9.2
    //# A change to SETTINGS_INITIAL_WINDOW_SIZE can cause the available
    //# space in a flow-control window to become negative.
    pub fn adjust(&mut self, delta: i64) -> Result<(), WindowError> {
        let new = self.0 + delta;
        if new > MAX_WINDOW {
            return Err(WindowError::Overflow);
        }
        self.0 = new;
        Ok(())
    }
}

/// Credit we granted the peer, and the bytes the caller still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecvWindow {
    /// What the peer may still send.
    window: i64,
    /// Received and not yet released by the caller.
    unreleased: u64,
    /// Released and not yet announced in a WINDOW_UPDATE.
    pending: u64,
    /// The window we aim to keep granted; updates go out once half of it is pending.
    target: u32,
}

impl RecvWindow {
    /// `advertised` is the window the peer starts with; `target` what we want to grant.
    pub fn new(advertised: u32, target: u32) -> RecvWindow {
        RecvWindow {
            window: advertised as i64,
            unreleased: 0,
            pending: 0,
            target,
        }
    }

    pub fn window(&self) -> i64 {
        self.window
    }

    pub fn unreleased(&self) -> u64 {
        self.unreleased
    }

    /// The peer sent `n` flow-controlled bytes.
    //= rfc9113#section-6.9.1
    //# A receiver MAY respond with a stream
    //# error (Section 5.4.2) or connection error (Section 5.4.1) of type
    //# FLOW_CONTROL_ERROR if it is unable to accept a frame.
    pub fn receive(&mut self, n: usize) -> Result<(), WindowError> {
        if n as i64 > self.window {
            return Err(WindowError::Exceeded);
        }
        self.window -= n as i64;
        self.unreleased += n as u64;
        Ok(())
    }

    /// The caller (or the session, for padding and discarded frames) is done with `n` bytes.
    /// Returns the WINDOW_UPDATE increment to send now, if enough credit is pending.
    pub fn release(&mut self, n: usize) -> Result<Option<u32>, WindowError> {
        if n as u64 > self.unreleased {
            return Err(WindowError::Exceeded);
        }
        self.unreleased -= n as u64;
        self.pending += n as u64;
        if self.pending == 0 || self.pending < (self.target as u64 / 2).max(1) {
            return Ok(None);
        }
        Ok(self.take_pending())
    }

    /// Announces all pending credit now (used when creating the connection).
    pub fn take_pending(&mut self) -> Option<u32> {
        // Never grant beyond 2^31-1 in total.
        let room = (MAX_WINDOW - self.window).max(0) as u64;
        let inc = self.pending.min(room);
        if inc == 0 {
            return None;
        }
        self.pending -= inc;
        self.window += inc as i64;
        Some(inc as u32)
    }

    /// Grants credit beyond what was advertised (the connection window's initial update).
    pub fn grant(&mut self, n: u32) {
        self.pending += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn send_window_refuses_sends_beyond_credit() {
        let mut w = SendWindow::new(10);
        assert_eq!(w.consume(11), Err(WindowError::Exceeded));
        w.consume(10).unwrap();
        assert_eq!(w.available(), 0);
    }

    #[test]
    fn send_window_refuses_growth_past_2_31_minus_1() {
        let mut w = SendWindow::new(DEFAULT_WINDOW);
        assert_eq!(
            w.adjust(MAX_WINDOW - DEFAULT_WINDOW as i64 + 1),
            Err(WindowError::Overflow)
        );
        w.adjust(MAX_WINDOW - DEFAULT_WINDOW as i64).unwrap();
        assert_eq!(w.value(), MAX_WINDOW);
    }

    #[test]
    fn settings_decrease_may_make_send_window_negative() {
        let mut w = SendWindow::new(100);
        w.consume(80).unwrap();
        w.adjust(-50).unwrap();
        assert_eq!(w.value(), -30);
        assert_eq!(w.available(), 0);
        assert_eq!(w.consume(1), Err(WindowError::Exceeded));
    }

    #[test]
    fn recv_window_updates_after_half_is_released() {
        let mut w = RecvWindow::new(100, 100);
        w.receive(60).unwrap();
        assert_eq!(w.release(40), Ok(None));
        assert_eq!(w.release(10), Ok(Some(50)));
        assert_eq!(w.window(), 90);
        assert_eq!(w.release(11), Err(WindowError::Exceeded));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send(u32),
        Update(u32),
        SettingsDelta(i32),
    }

    proptest! {
        /// Our own sends never take a window below zero and nothing takes it above 2^31-1;
        /// only a SETTINGS change may make it negative.
        #[test]
        fn send_window_stays_within_bounds(ops in proptest::collection::vec(
            prop_oneof![
                (0u32..1 << 22).prop_map(Op::Send),
                (1u32..1 << 31).prop_map(Op::Update),
                any::<i32>().prop_map(Op::SettingsDelta),
            ], 0..64))
        {
            let mut w = SendWindow::new(DEFAULT_WINDOW);
            for op in ops {
                let before = w.value();
                match op {
                    Op::Send(n) => {
                        let r = w.consume(n as usize);
                        prop_assert!(r.is_ok() == (n as i64 <= before.max(0)));
                        prop_assert!(w.value() >= 0 || w.value() == before);
                    }
                    Op::Update(n) => { let _ = w.adjust(n as i64); }
                    Op::SettingsDelta(d) => { let _ = w.adjust(d as i64); }
                }
                prop_assert!(w.value() <= MAX_WINDOW);
            }
        }

        /// Granted credit (window) + bytes held by the caller + released-but-unannounced
        /// always equals what we meant to grant: the peer never gets credit early.
        #[test]
        fn recv_window_conserves_credit(ops in proptest::collection::vec((any::<bool>(), 0u32..70_000), 0..64)) {
            let target = 1 << 16;
            let mut w = RecvWindow::new(target, target);
            for (is_recv, n) in ops {
                if is_recv {
                    let ok = w.receive(n as usize).is_ok();
                    prop_assert_eq!(ok, n as i64 <= w.window() + if ok { n as i64 } else { 0 });
                } else {
                    let _ = w.release(n as usize);
                }
                prop_assert!(w.window() >= 0);
                prop_assert!(w.window() <= MAX_WINDOW);
                prop_assert_eq!(w.window() as u64 + w.unreleased() + w.pending, target as u64);
            }
        }
    }
}
