//! io_uring probing: can this process create a ring, which opcodes does the kernel register,
//! and do the multishot flags work. Opcodes come from IORING_REGISTER_PROBE; multishot accept
//! and poll are request flags the probe cannot show, so they are proven by submitting them
//! against a real loopback listener and pipe, then cancelled and every completion reaped
//! (accepted fds closed) under a deadline, so the probe neither hangs nor leaks.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use nix::errno::Errno;

use super::report::{Driver, DriverReport, IoUringOpcodes, IoUringReport};
use super::sys::{self, errno_text, io_errno, PROBE_TIMEOUT};

/// Small: the probe never has more than three operations in flight.
const RING_ENTRIES: u32 = 8;

const UD_ACCEPT: u64 = 1;
const UD_POLL: u64 = 2;
const UD_CANCEL: u64 = 3;

const IO_URING_DISABLED: &str = "/proc/sys/kernel/io_uring_disabled";

/// Why io_uring_setup failed, in words an operator can act on.
pub(crate) fn setup_error_reason(errno: Errno) -> String {
    let disabled = sys::read_u64(IO_URING_DISABLED);
    let seccomp = sys::seccomp_filtered();
    match errno {
        Errno::ENOSYS if seccomp => {
            "io_uring_setup returned ENOSYS under a seccomp filter: the container profile \
             blocks io_uring (or the kernel was built without it)"
                .into()
        }
        Errno::ENOSYS => "kernel built without io_uring (CONFIG_IO_URING off)".into(),
        Errno::EPERM => match disabled {
            Some(2) => {
                "io_uring disabled for all processes by sysctl kernel.io_uring_disabled=2".into()
            }
            Some(1) => "sysctl kernel.io_uring_disabled=1: only CAP_SYS_ADMIN or members of \
                        kernel.io_uring_group may create rings"
                .into(),
            _ if seccomp => "io_uring_setup denied (EPERM) by this process's seccomp filter \
                             (container runtimes' default profiles block io_uring)"
                .into(),
            _ => "io_uring_setup denied (EPERM) by a seccomp filter or LSM policy".into(),
        },
        Errno::ENOMEM => "no memory for the ring: locked memory limit (RLIMIT_MEMLOCK, \
                          `ulimit -l`) or the cgroup memory limit is too low"
            .into(),
        Errno::EMFILE | Errno::ENFILE => {
            "no free file descriptor for the ring (open-file limit reached)".into()
        }
        other => format!("io_uring_setup failed: {}", errno_text(other)),
    }
}

/// `None` when this process can create an io_uring instance, otherwise the reason it cannot.
pub fn io_uring_unavailable_reason() -> Option<String> {
    match IoUring::new(RING_ENTRIES) {
        Ok(_ring) => None,
        Err(e) => Some(setup_error_reason(io_errno(&e))),
    }
}

/// The full io_uring section of the report.
pub(crate) fn probe_io_uring() -> IoUringReport {
    let io_uring_disabled = sys::read_u64(IO_URING_DISABLED);
    let mut ring = match IoUring::new(RING_ENTRIES) {
        Ok(ring) => ring,
        Err(e) => {
            return IoUringReport {
                available: false,
                reason: Some(setup_error_reason(io_errno(&e))),
                io_uring_disabled,
                opcodes: IoUringOpcodes::default(),
                notes: Vec::new(),
            }
        }
    };
    let mut notes = Vec::new();
    let mut probe = Probe::new();
    // IORING_REGISTER_PROBE arrived in 5.6; before that no opcode can be confirmed.
    let registered = match ring.submitter().register_probe(&mut probe) {
        Ok(()) => true,
        Err(e) => {
            notes.push(format!(
                "IORING_REGISTER_PROBE failed ({}): opcodes reported unsupported",
                errno_text(io_errno(&e))
            ));
            false
        }
    };
    let has = |code: u8| registered && probe.is_supported(code);
    let mut opcodes = IoUringOpcodes {
        accept: has(opcode::Accept::CODE),
        accept_multishot: false,
        connect: has(opcode::Connect::CODE),
        poll_add: has(opcode::PollAdd::CODE),
        poll_add_multishot: false,
        poll_remove: has(opcode::PollRemove::CODE),
        async_cancel: has(opcode::AsyncCancel::CODE),
        timeout: has(opcode::Timeout::CODE),
        link_timeout: has(opcode::LinkTimeout::CODE),
        splice: has(opcode::Splice::CODE),
    };
    // Both multishot probes need a way to stop the operation again.
    if opcodes.accept && opcodes.async_cancel {
        opcodes.accept_multishot = settle(
            "multishot accept",
            probe_multishot_accept(&mut ring),
            &mut notes,
        );
    }
    if opcodes.poll_add && opcodes.async_cancel {
        opcodes.poll_add_multishot = settle(
            "multishot poll",
            probe_multishot_poll(&mut ring),
            &mut notes,
        );
    }
    IoUringReport {
        available: true,
        reason: None,
        io_uring_disabled,
        opcodes,
        notes,
    }
}

/// An inconclusive multishot probe counts as unsupported (the reactor then re-arms single
/// shots, which always works) and leaves a note saying why.
fn settle(what: &str, verdict: Result<bool, String>, notes: &mut Vec<String>) -> bool {
    verdict.unwrap_or_else(|why| {
        notes.push(format!("{what}: {why}; treated as unsupported"));
        false
    })
}

/// Which driver `auto` picks, given what the ring offers.
pub(crate) fn choose_driver(io: &IoUringReport) -> DriverReport {
    if !io.available {
        return DriverReport {
            selected: Driver::Epoll,
            reason: io
                .reason
                .clone()
                .unwrap_or_else(|| "io_uring unavailable".into()),
        };
    }
    let ops = &io.opcodes;
    let required = [
        ("accept", ops.accept),
        ("connect", ops.connect),
        ("poll_add", ops.poll_add),
        ("poll_remove", ops.poll_remove),
        ("async_cancel", ops.async_cancel),
        ("timeout", ops.timeout),
        ("link_timeout", ops.link_timeout),
    ];
    let missing: Vec<&str> = required
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        return DriverReport {
            selected: Driver::Epoll,
            reason: format!(
                "io_uring lacks {} (a newer kernel has them)",
                missing.join(", ")
            ),
        };
    }
    // Readiness is a one-shot PollAdd on every kernel (the reactor relies on its level check
    // when armed), so only the accept mode differs between kernels.
    let reason = if ops.accept_multishot {
        "every opcode ringtun uses; multishot accept".into()
    } else {
        "every opcode ringtun uses; single-shot accept re-armed per connection (no multishot \
         accept before 5.19)"
            .into()
    };
    DriverReport {
        selected: Driver::IoUring,
        reason,
    }
}

/// Queues one SQE and submits it.
fn submit(ring: &mut IoUring, entry: &squeue::Entry) -> Result<(), String> {
    // SAFETY: the probe's entries carry only fds, flags and user_data — no pointers into user
    // memory — and every fd they name outlives the operation (cancelled and reaped before the
    // fd is dropped).
    let pushed = unsafe { ring.submission().push(entry) };
    pushed.map_err(|_| "submission queue full".to_owned())?;
    ring.submit()
        .map(drop)
        .map_err(|e| format!("io_uring_enter: {}", errno_text(io_errno(&e))))
}

/// Completions available now, or after waiting at most until `deadline` (in short slices).
fn next_cqes(ring: &mut IoUring, deadline: Instant) -> Vec<cqueue::Entry> {
    let ready: Vec<cqueue::Entry> = ring.completion().collect();
    let remaining = deadline.saturating_duration_since(Instant::now());
    if !ready.is_empty() || remaining.is_zero() {
        return ready;
    }
    let slice = remaining.min(Duration::from_millis(100));
    if ring.params().is_feature_ext_arg() {
        let ts = types::Timespec::from(slice);
        let args = types::SubmitArgs::new().timespec(&ts);
        // ETIME (slice over) and EINTR just mean: look at the queue again.
        let _ = ring.submitter().submit_with_args(1, &args);
    } else {
        // Pre-5.11 kernels: the ring fd polls readable when completions are posted.
        let _ = sys::wait_readable(ring, slice);
        let _ = ring.submit();
    }
    ring.completion().collect()
}

/// Tracks one multishot operation until the kernel says it is over.
struct InFlight {
    user_data: u64,
    /// First completion's verdict: `Ok(true)` multishot active, `Ok(false)` rejected.
    verdict: Option<Result<bool, String>>,
    /// The kernel posted the final completion (no IORING_CQE_F_MORE).
    finished: bool,
    /// The cancel request's own completion arrived.
    cancel_done: bool,
    /// Accept completions carry fds that now belong to us.
    owns_fds: bool,
}

impl InFlight {
    fn new(user_data: u64, owns_fds: bool) -> Self {
        Self {
            user_data,
            verdict: None,
            finished: false,
            cancel_done: false,
            owns_fds,
        }
    }

    /// Takes a completion's fields rather than the entry so the verdict logic is testable.
    fn handle(&mut self, user_data: u64, res: i32, flags: u32) {
        if user_data == UD_CANCEL {
            self.cancel_done = true;
            return;
        }
        if user_data != self.user_data {
            return;
        }
        let more = cqueue::more(flags);
        if res >= 0 && self.owns_fds {
            // SAFETY: a successful accept completion hands us a new fd nobody else owns;
            // wrapping it in OwnedFd closes it exactly once.
            drop(unsafe { OwnedFd::from_raw_fd(res) });
        }
        if !more {
            self.finished = true;
        }
        if self.verdict.is_none() {
            self.verdict = Some(match res {
                // A multishot request that is still armed flags its completion with F_MORE; a
                // kernel that ignored the flag would complete it once, without F_MORE.
                r if r >= 0 => Ok(more),
                r if r == -libc::EINVAL => Ok(false),
                r => Err(format!(
                    "first completion failed: {}",
                    errno_text(Errno::from_raw(-r))
                )),
            });
        }
    }

    /// Reaps until `stop` holds or the deadline passes.
    fn reap(&mut self, ring: &mut IoUring, deadline: Instant, stop: fn(&Self) -> bool) {
        while !stop(self) && Instant::now() < deadline {
            for cqe in next_cqes(ring, deadline) {
                self.handle(cqe.user_data(), cqe.result(), cqe.flags());
            }
        }
    }

    /// Cancels the operation if it is still armed and reaps until it is gone.
    fn cancel(&mut self, ring: &mut IoUring, cancel: squeue::Entry) {
        if self.finished {
            return;
        }
        if submit(ring, &cancel.user_data(UD_CANCEL)).is_err() {
            // Without a cancel the final CQE never comes; dropping the ring cancels instead.
            return;
        }
        let deadline = Instant::now() + PROBE_TIMEOUT;
        self.reap(ring, deadline, |s| s.finished && s.cancel_done);
    }

    fn into_verdict(self) -> Result<bool, String> {
        self.verdict
            .unwrap_or_else(|| Err(format!("no completion within {PROBE_TIMEOUT:?}")))
    }
}

/// Submits a multishot accept on a loopback listener and connects once: IORING_CQE_F_MORE on
/// the completion proves the flag; EINVAL means the kernel predates it (5.19).
fn probe_multishot_accept(ring: &mut IoUring) -> Result<bool, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| format!("loopback listener: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("loopback listener: {e}"))?;
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data(UD_ACCEPT);
    submit(ring, &accept)?;
    let mut op = InFlight::new(UD_ACCEPT, true);
    // Kept alive until the operation is cancelled so the accepted peer stays valid.
    let _client = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT);
    op.reap(ring, Instant::now() + PROBE_TIMEOUT, |s| {
        s.verdict.is_some()
    });
    op.cancel(ring, opcode::AsyncCancel::new(UD_ACCEPT).build());
    op.into_verdict()
}

/// Submits a multishot poll on a pipe and makes it readable: F_MORE proves the flag (5.13);
/// EINVAL means unsupported. Stopped with IORING_OP_POLL_REMOVE, the op the reactor uses.
fn probe_multishot_poll(ring: &mut IoUring) -> Result<bool, String> {
    let (read_end, write_end) = sys::pipe().map_err(|e| format!("pipe: {}", errno_text(e)))?;
    let poll = opcode::PollAdd::new(types::Fd(read_end.as_raw_fd()), libc::POLLIN as u32)
        .multi(true)
        .build()
        .user_data(UD_POLL);
    submit(ring, &poll)?;
    let mut op = InFlight::new(UD_POLL, false);
    nix::unistd::write(&write_end, b"x").map_err(|e| format!("pipe write: {}", errno_text(e)))?;
    op.reap(ring, Instant::now() + PROBE_TIMEOUT, |s| {
        s.verdict.is_some()
    });
    op.cancel(ring, opcode::PollRemove::new(UD_POLL).build());
    op.into_verdict()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_probe_agrees_with_unavailable_reason() {
        let report = probe_io_uring();
        assert_eq!(report.available, io_uring_unavailable_reason().is_none());
        assert_eq!(report.available, report.reason.is_none());
    }

    #[test]
    fn multishot_implies_the_base_opcode() {
        let ops = probe_io_uring().opcodes;
        assert!(!ops.accept_multishot || ops.accept);
        assert!(!ops.poll_add_multishot || ops.poll_add);
    }

    /// IORING_CQE_F_MORE from linux/io_uring.h.
    const F_MORE: u32 = 1 << 1;

    #[test]
    fn einval_on_first_completion_means_no_multishot() {
        let mut op = InFlight::new(UD_POLL, false);
        op.handle(UD_POLL, -libc::EINVAL, 0);
        assert!(op.finished);
        assert_eq!(op.into_verdict(), Ok(false));
    }

    #[test]
    fn f_more_on_first_completion_means_multishot() {
        let mut op = InFlight::new(UD_POLL, false);
        op.handle(UD_POLL, libc::POLLIN as i32, F_MORE);
        assert!(!op.finished, "still armed: must be cancelled");
        op.handle(UD_CANCEL, 0, 0);
        op.handle(UD_POLL, -libc::ECANCELED, 0);
        assert!(op.finished && op.cancel_done);
        assert_eq!(op.into_verdict(), Ok(true));
    }

    #[test]
    fn a_single_shot_success_is_not_multishot() {
        // A kernel that ignored the flag completes once, without F_MORE.
        let mut op = InFlight::new(UD_POLL, false);
        op.handle(UD_POLL, libc::POLLIN as i32, 0);
        assert_eq!(op.into_verdict(), Ok(false));
    }

    #[test]
    fn silence_is_inconclusive_not_supported() {
        let op = InFlight::new(UD_ACCEPT, true);
        assert!(op.into_verdict().is_err());
    }

    #[test]
    fn epoll_is_chosen_when_no_ring_can_be_made() {
        let io = IoUringReport {
            available: false,
            reason: Some("kernel built without io_uring (CONFIG_IO_URING off)".into()),
            io_uring_disabled: None,
            opcodes: IoUringOpcodes::default(),
            notes: Vec::new(),
        };
        let d = choose_driver(&io);
        assert_eq!(d.selected, Driver::Epoll);
        assert!(d.reason.contains("without io_uring"));
    }

    #[test]
    fn missing_link_timeout_forces_epoll() {
        let io = IoUringReport {
            available: true,
            reason: None,
            io_uring_disabled: Some(0),
            opcodes: IoUringOpcodes {
                accept: true,
                connect: true,
                poll_add: true,
                poll_remove: true,
                async_cancel: true,
                timeout: true,
                ..IoUringOpcodes::default()
            },
            notes: Vec::new(),
        };
        let d = choose_driver(&io);
        assert_eq!(d.selected, Driver::Epoll);
        assert!(d.reason.contains("link_timeout"), "{}", d.reason);
    }

    #[test]
    fn sysctl_two_is_named_in_the_eperm_reason() {
        // Only meaningful when the host has the sysctl set; otherwise checks the generic text.
        let reason = setup_error_reason(Errno::EPERM);
        match sys::read_u64(IO_URING_DISABLED) {
            Some(2) => assert!(reason.contains("io_uring_disabled=2")),
            Some(1) => assert!(reason.contains("io_uring_disabled=1")),
            _ => assert!(reason.contains("EPERM")),
        }
    }
}
