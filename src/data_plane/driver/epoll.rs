//! The epoll driver: the fallback where io_uring cannot be set up (ENOSYS, EPERM from
//! `kernel.io_uring_disabled` or a seccomp profile) or when forced with `--driver epoll`.
//! Flow sockets are registered once, edge-triggered for both directions; listeners and the
//! waker are level-triggered. Connect is a non-blocking `connect(2)` finished on writability.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::backoff::AcceptBackoff;
use super::interface::{Driver, DriverKind, Event, FlowKey, Interest, Side};
use super::token::{self, Op};
use crate::sys::epoll::{Epoll, EpollEvent};
use crate::sys::socket;

/// Accepts per listener per wakeup, so one busy listener cannot starve established flows.
const ACCEPT_BATCH: usize = 64;

pub struct EpollDriver {
    epoll: Epoll,
    listeners: Vec<Option<RawFd>>,
    backoff: AcceptBackoff,
    /// Flows whose connect is in progress, with the upstream fd to read `SO_ERROR` from.
    connecting: HashMap<FlowKey, RawFd>,
    /// Completions known before waiting (a connect that finished at once).
    ready: Vec<Event>,
    buf: Vec<EpollEvent>,
}

impl EpollDriver {
    pub fn new() -> io::Result<Self> {
        Ok(EpollDriver {
            epoll: Epoll::new()?,
            listeners: Vec::new(),
            backoff: AcceptBackoff::default(),
            connecting: HashMap::new(),
            ready: Vec::new(),
            buf: vec![EpollEvent { events: 0, u64: 0 }; 256],
        })
    }

    fn accept_batch(&mut self, listener: usize, fd: RawFd, events: &mut Vec<Event>) {
        for _ in 0..ACCEPT_BATCH {
            let e = match socket::accept(fd) {
                Ok(s) => {
                    events.push(Event::Accepted { listener, fd: s });
                    continue;
                }
                Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
            };
            match e {
                libc::EAGAIN => return,
                libc::EINTR | libc::ECONNABORTED => continue,
                _ => {
                    events.push(Event::AcceptFailed { listener, errno: e });
                    // Level-triggered: stop watching for a moment instead of spinning.
                    let _ = self.epoll.delete(fd);
                    self.backoff.rest(listener, Instant::now());
                    return;
                }
            }
        }
    }
}

impl Driver for EpollDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Epoll
    }

    fn watch_listener(&mut self, listener: usize, fd: RawFd) -> io::Result<()> {
        if self.listeners.len() <= listener {
            self.listeners.resize(listener + 1, None);
        }
        self.listeners[listener] = Some(fd);
        self.epoll.add(
            fd,
            libc::EPOLLIN as u32,
            token::simple(Op::Accept, listener as u32),
        )
    }

    fn unwatch_listener(&mut self, listener: usize, fd: RawFd) {
        if let Some(slot) = self.listeners.get_mut(listener) {
            *slot = None;
        }
        self.backoff.forget(listener);
        let _ = self.epoll.delete(fd);
    }

    fn watch_waker(&mut self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .add(fd, libc::EPOLLIN as u32, token::simple(Op::Waker, 0))
    }

    fn register(&mut self, flow: FlowKey, side: Side, fd: RawFd) -> io::Result<()> {
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        self.epoll.add(
            fd,
            events,
            token::flow(Op::Poll, flow, side, Interest::Read),
        )
    }

    fn connect(&mut self, flow: FlowKey, fd: RawFd, addr: SocketAddr) -> io::Result<()> {
        let e = match socket::connect(fd, addr) {
            Ok(()) => {
                self.ready.push(Event::Connected {
                    flow,
                    result: Ok(()),
                });
                return Ok(());
            }
            Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
        };
        if e == libc::EINPROGRESS {
            self.connecting.insert(flow, fd);
        } else {
            self.ready.push(Event::Connected {
                flow,
                result: Err(e),
            });
        }
        Ok(())
    }

    fn arm(&mut self, _flow: FlowKey, _side: Side, _interest: Interest, _fd: RawFd) -> bool {
        // Registered edge-triggered for both directions once: nothing to arm, nothing to disarm.
        false
    }

    fn arming_checks_level(&self) -> bool {
        false
    }

    fn release(&mut self, flow: FlowKey, _armed: u8, _connecting: bool) {
        // Closing the socket removes it from the epoll set.
        self.connecting.remove(&flow);
    }

    fn wait(&mut self, timeout: Option<Duration>, events: &mut Vec<Event>) -> io::Result<()> {
        let now = Instant::now();
        let mut timeout = timeout;
        for l in self.backoff.due(now, &mut timeout) {
            if let Some(Some(fd)) = self.listeners.get(l).copied() {
                let _ = self.epoll.add(
                    fd,
                    libc::EPOLLIN as u32,
                    token::simple(Op::Accept, l as u32),
                );
            }
        }
        if !self.ready.is_empty() {
            timeout = Some(Duration::ZERO);
        }
        let ms = match timeout {
            None => -1,
            // Round up so a 0.3 ms deadline does not become a busy loop of zero-timeout waits.
            Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
        };
        let n = self.epoll.wait(&mut self.buf, ms);
        events.append(&mut self.ready);
        for k in 0..n? {
            let ev = self.buf[k];
            let (bits, data) = (ev.events, ev.u64);
            let d = token::decode(data);
            match d.op {
                Some(Op::Accept) => {
                    let l = d.index as usize;
                    if let Some(Some(fd)) = self.listeners.get(l).copied() {
                        self.accept_batch(l, fd, events);
                    }
                }
                Some(Op::Waker) => events.push(Event::Woken),
                Some(Op::Poll) => {
                    if d.side == Side::Upstream {
                        if let Some(fd) = self.connecting.remove(&d.key) {
                            let err = take_socket_error(fd);
                            let result = if err == 0 { Ok(()) } else { Err(err) };
                            events.push(Event::Connected {
                                flow: d.key,
                                result,
                            });
                            continue;
                        }
                    }
                    let err = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
                    if bits & ((libc::EPOLLIN | libc::EPOLLRDHUP) as u32 | err) != 0 {
                        events.push(Event::Ready {
                            flow: d.key,
                            side: d.side,
                            interest: Interest::Read,
                        });
                    }
                    if bits & (libc::EPOLLOUT as u32 | err) != 0 {
                        events.push(Event::Ready {
                            flow: d.key,
                            side: d.side,
                            interest: Interest::Write,
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// `SO_ERROR` of a socket: 0 when its connect succeeded, else its errno (or the errno of
/// asking).
pub fn take_socket_error(fd: RawFd) -> i32 {
    socket::take_error(fd).unwrap_or_else(|e| e.raw_os_error().unwrap_or(libc::EIO))
}
