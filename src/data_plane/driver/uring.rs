//! The io_uring driver (default): multishot accept, connect, one-shot `PollAdd` readiness and
//! `Timeout` wakeups, all on one ring owned by one reactor thread. Splice is deliberately not
//! submitted here (DESIGN.md §2: `IORING_OP_SPLICE` is forced onto io-wq workers and is slower
//! than copying); the flow splices inline after a readiness completion.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::backoff::AcceptBackoff;
use super::interface::{armed_bit, Driver, DriverKind, Event, FlowKey, Interest, Side};
use super::token::{self, Op};
use crate::sys::socket::SockAddr;

pub struct UringDriver {
    ring: IoUring,
    /// Listener fds by index; `None` once unwatched (a finished multishot is then not re-armed).
    listeners: Vec<Option<RawFd>>,
    /// Listeners resting after an accept error, with when to re-arm them.
    backoff: AcceptBackoff,
    waker: Option<RawFd>,
    /// Connect addresses live here until their completion: the kernel reads them asynchronously.
    connect_addrs: HashMap<u64, Box<SockAddr>>,
    /// The wakeup timer's timespec. The kernel copies a timeout's timespec when it consumes the
    /// entry (the submit after the push), not when the timeout fires, so this one box serves
    /// every timer: a new deadline overwrites it only in a later `wait`, after the submit that
    /// handed the previous entry over. (If that submit failed, the still-queued entry reads the
    /// newer deadline when it is consumed: a valid timespec either way, only the other wait.)
    timer: Box<types::Timespec>,
    timer_in_flight: Option<Instant>,
    /// Kernels before 5.19 have no multishot accept: re-arm a single-shot accept instead.
    multishot_accept: bool,
    /// Requests submitted whose last completion has not been reaped. Each one may hold a file
    /// (an armed accept keeps its listening socket alive after close(2)), see
    /// [`Self::cancel_in_flight`].
    in_flight: usize,
}

/// How long a stopping reactor waits for its cancelled requests to complete.
const QUIESCE_LIMIT: Duration = Duration::from_secs(2);

impl UringDriver {
    pub fn new(entries: u32, multishot_accept: bool) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        Ok(UringDriver {
            ring,
            listeners: Vec::new(),
            backoff: AcceptBackoff::default(),
            waker: None,
            connect_addrs: HashMap::new(),
            timer: Box::new(types::Timespec::new()),
            timer_in_flight: None,
            multishot_accept,
            in_flight: 0,
        })
    }

    /// Queues one request. The one `unsafe` call of the driver's submissions: the ring reads
    /// what an entry points to after this returns, so every pointer must stay valid until the
    /// kernel has read it. The driver keeps that promise by construction — connect addresses
    /// live in `connect_addrs` until their completion (older kernels read them when the connect
    /// is issued, possibly from a worker), timespecs (the wakeup timer in `self.timer`, the
    /// quiesce deadline on `quiesce`'s frame) until the submit that consumes their entry, which
    /// is when the kernel copies a timespec — not by anything a wrapper could check, so the
    /// allowance stays here, on this function alone (ARCHITECTURE.md, "unsafe").
    #[allow(unsafe_code)]
    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every pointer an entry carries stays valid as long as the kernel may read
            // it: a connect's sockaddr in `connect_addrs` until its completion; a timespec
            // (`timer`, or `quiesce`'s deadline on its frame) until the submit that consumes
            // the entry, when the kernel copies it.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                return;
            }
            // Submission queue full: hand what we have to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                log::error!("io_uring submit failed while the queue was full: {e}");
                return;
            }
        }
    }

    fn arm_accept(&mut self, listener: usize, fd: RawFd) {
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let e = if self.multishot_accept {
            opcode::AcceptMulti::new(types::Fd(fd)).flags(flags).build()
        } else {
            opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
                .flags(flags)
                .build()
        }
        .user_data(token::simple(Op::Accept, listener as u32));
        self.push(e);
    }

    /// Cancels every request still in flight and reaps their completions, so the files they
    /// hold are released before the reactor thread ends. Without this the ring's teardown does
    /// it asynchronously, after the thread is gone: a listening socket whose accept was still
    /// armed keeps listening for that while, `SO_REUSEPORT` hands it connections meant for the
    /// next node sharing the port (a restart, the demo's second act), and the kernel resets them
    /// when the socket finally closes.
    ///
    /// Flow sockets' polls were removed when their flows closed; what is left is long-lived:
    /// accepts, the waker's poll, the wakeup timer. One `ASYNC_CANCEL_ANY` (5.19) catches
    /// everything; the cancels by tag cover older kernels. Gives up after [`QUIESCE_LIMIT`].
    fn cancel_in_flight(&mut self, late: &mut Vec<Event>) {
        let accepts = self.listeners.len();
        self.listeners.clear();
        self.waker = None;
        if self.in_flight == 0 {
            return;
        }
        let cancel = |e: squeue::Entry| e.user_data(token::simple(Op::Cancel, 0));
        self.push(cancel(
            opcode::AsyncCancel2::new(types::CancelBuilder::any()).build(),
        ));
        let tags = (0..accepts)
            .map(|l| token::simple(Op::Accept, l as u32))
            .chain([token::simple(Op::Waker, 0), token::simple(Op::Timer, 0)]);
        for tag in tags {
            self.push(cancel(opcode::AsyncCancel::new(tag).build()));
        }
        // Submitted after the cancels, so they do not cancel it: ends the wait below if some
        // request never completes.
        let limit = types::Timespec::new()
            .sec(QUIESCE_LIMIT.as_secs())
            .nsec(QUIESCE_LIMIT.subsec_nanos());
        if let Err(e) = self.ring.submit() {
            log::warn!("io_uring: cannot cancel the requests still in flight: {e}");
            return;
        }
        let until = Instant::now() + QUIESCE_LIMIT;
        self.push(
            opcode::Timeout::new(&limit as *const _)
                .build()
                .user_data(token::simple(Op::Timer, 1)),
        );
        // Until `until` has passed the deadline timer is one of the requests in flight, and it
        // ends the last wait if some other request never completes.
        let mut events = Vec::new();
        while Instant::now() < until {
            if self.in_flight <= 1 {
                return;
            }
            if let Err(e) = self.wait(None, &mut events) {
                log::warn!("io_uring: waiting for cancelled requests failed: {e}");
                return;
            }
            // Connections accepted meanwhile go back to the reactor, which refuses them.
            late.extend(
                events
                    .drain(..)
                    .filter(|e| matches!(e, Event::Accepted { .. })),
            );
        }
        log::warn!("io_uring: requests still in flight {QUIESCE_LIMIT:?} after cancelling them");
    }

    fn arm_waker(&mut self, fd: RawFd) {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(token::simple(Op::Waker, 0));
        self.push(e);
    }
}

impl Drop for UringDriver {
    fn drop(&mut self) {
        // Normally a no-op: the reactor quiesced the ring before returning. On an early error
        // path it did not; a connection accepted then is still refused, not ended as if served.
        let mut late = Vec::new();
        self.cancel_in_flight(&mut late);
        for ev in late {
            if let Event::Accepted { fd, .. } = ev {
                crate::data_plane::socket::close_with_reset(fd);
            }
        }
    }
}

impl Driver for UringDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::IoUring
    }

    fn watch_listener(&mut self, listener: usize, fd: RawFd) -> io::Result<()> {
        if self.listeners.len() <= listener {
            self.listeners.resize(listener + 1, None);
        }
        self.listeners[listener] = Some(fd);
        self.arm_accept(listener, fd);
        Ok(())
    }

    fn unwatch_listener(&mut self, listener: usize, _fd: RawFd) {
        if let Some(slot) = self.listeners.get_mut(listener) {
            *slot = None;
        }
        self.backoff.forget(listener);
        let e = opcode::AsyncCancel::new(token::simple(Op::Accept, listener as u32))
            .build()
            .user_data(token::simple(Op::Cancel, 0));
        self.push(e);
    }

    fn quiesce(&mut self, late: &mut Vec<Event>) {
        self.cancel_in_flight(late);
    }

    fn watch_waker(&mut self, fd: RawFd) -> io::Result<()> {
        self.waker = Some(fd);
        self.arm_waker(fd);
        Ok(())
    }

    fn register(&mut self, _flow: FlowKey, _side: Side, _fd: RawFd) -> io::Result<()> {
        Ok(())
    }

    fn connect(&mut self, flow: FlowKey, fd: RawFd, addr: SocketAddr) -> io::Result<()> {
        let ud = token::flow(Op::Connect, flow, Side::Upstream, Interest::Write);
        let boxed = Box::new(SockAddr::new(addr));
        let e = opcode::Connect::new(types::Fd(fd), boxed.as_ptr(), boxed.byte_len())
            .build()
            .user_data(ud);
        self.connect_addrs.insert(ud, boxed);
        self.push(e);
        Ok(())
    }

    fn arm(&mut self, flow: FlowKey, side: Side, interest: Interest, fd: RawFd) -> bool {
        let e = opcode::PollAdd::new(types::Fd(fd), interest.poll_mask())
            .build()
            .user_data(token::flow(Op::Poll, flow, side, interest));
        self.push(e);
        true
    }

    fn arming_checks_level(&self) -> bool {
        // A one-shot PollAdd runs vfs_poll when submitted and completes at once if ready.
        true
    }

    fn release(&mut self, flow: FlowKey, armed: u8, connecting: bool) {
        for side in [Side::Downstream, Side::Upstream] {
            for interest in [Interest::Read, Interest::Write] {
                if armed & armed_bit(side, interest) != 0 {
                    let e = opcode::PollRemove::new(token::flow(Op::Poll, flow, side, interest))
                        .build()
                        .user_data(token::simple(Op::Cancel, 0));
                    self.push(e);
                }
            }
        }
        if connecting {
            let e = opcode::AsyncCancel::new(token::flow(
                Op::Connect,
                flow,
                Side::Upstream,
                Interest::Write,
            ))
            .build()
            .user_data(token::simple(Op::Cancel, 0));
            self.push(e);
        }
    }

    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()> {
        let now = Instant::now();
        // Re-arm listeners whose rest is over, and never sleep past the next one.
        let mut timeout = timeout;
        for l in self.backoff.due(now, &mut timeout) {
            if let Some(Some(fd)) = self.listeners.get(l).copied() {
                self.arm_accept(l, fd);
            }
        }
        let wait_for = match timeout {
            Some(t) if t.is_zero() => 0,
            Some(t) => {
                let deadline = now + t;
                // One count-1 timeout ends at the first completion, so they never pile up; only
                // add one when none in flight would fire early enough.
                if self.timer_in_flight.is_none_or(|d| d > deadline) {
                    *self.timer = types::Timespec::new()
                        .sec(t.as_secs())
                        .nsec(t.subsec_nanos());
                    let e = opcode::Timeout::new(&*self.timer as *const _)
                        .count(1)
                        .build()
                        .user_data(token::simple(Op::Timer, 0));
                    self.push(e);
                    self.timer_in_flight = Some(deadline);
                }
                1
            }
            None => 1,
        };
        match self.ring.submit_and_wait(wait_for) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::ETIME)
                ) => {}
            Err(e) => return Err(e),
        }
        let mut rearm_accept = Vec::new();
        let mut rearm_waker = false;
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            let res = cqe.result();
            let d = token::decode(ud);
            let more = cqueue::more(cqe.flags());
            if !more {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            match d.op {
                Some(Op::Accept) => {
                    let l = d.index as usize;
                    if res >= 0 {
                        crate::observability::metrics::IO_URING_ACCEPTS
                            .count(self.multishot_accept);
                        // The ring's second promise: an accept completion's result is a new
                        // descriptor no one else owns. Only the ring knows that, so the
                        // adoption stays here rather than behind a safe function anyone could
                        // call with any number.
                        // SAFETY: a successful accept completion hands us a new descriptor;
                        // the OwnedFd becomes its only owner.
                        #[allow(unsafe_code)]
                        let fd = unsafe { OwnedFd::from_raw_fd(res) };
                        events.push(Event::Accepted { listener: l, fd });
                    } else if res != -libc::ECANCELED {
                        events.push(Event::AcceptFailed {
                            listener: l,
                            errno: -res,
                        });
                    }
                    if !more && res != -libc::ECANCELED {
                        rearm_accept.push((l, res < 0));
                    }
                }
                Some(Op::Connect) => {
                    self.connect_addrs.remove(&ud);
                    let result = if res >= 0 { Ok(()) } else { Err(-res) };
                    events.push(Event::Connected {
                        flow: d.key,
                        result,
                    });
                }
                Some(Op::Poll) => {
                    if res != -libc::ECANCELED {
                        events.push(Event::Ready {
                            flow: d.key,
                            side: d.side,
                            interest: d.interest,
                        });
                    }
                }
                Some(Op::Waker) => {
                    rearm_waker = true;
                    events.push(Event::Woken);
                }
                Some(Op::Timer) => self.timer_in_flight = None,
                Some(Op::Cancel) | None => {}
            }
        }
        let now = Instant::now();
        for (l, failed) in rearm_accept {
            if let Some(Some(fd)) = self.listeners.get(l).copied() {
                if failed {
                    self.backoff.rest(l, now);
                } else {
                    self.arm_accept(l, fd);
                }
            }
        }
        if rearm_waker {
            if let Some(fd) = self.waker {
                self.arm_waker(fd);
            }
        }
        Ok(())
    }
}
