//! The flows on tunnel streams: bytes between the local socket and the stream (copied, or
//! spliced on kTLS tunnels), half-close, resets, timers, the end of a flow.

use super::*;

/// DATA frame headers for one stream's zero-copy sender. Called only between frames, so the
/// session's own frames (HEADERS, WINDOW_UPDATE, PING ACK...) are written first, right here;
/// if the socket cannot take them the header is refused and the sender waits.
struct FrameHeaders<'a> {
    tunnel: &'a mut Tunnel,
    stream: StreamId,
}

impl DataFrameHeaders for FrameHeaders<'_> {
    fn credit(&mut self) -> usize {
        self.tunnel
            .session
            .as_ref()
            .map_or(0, |s| s.send_capacity(self.stream))
    }

    fn max_frame_size(&mut self) -> usize {
        self.tunnel
            .session
            .as_ref()
            .map_or(0, |s| s.peer_max_frame_size() as usize)
    }

    fn data_frame_header(
        &mut self,
        len: usize,
        end_stream: bool,
    ) -> Option<[u8; hbone_proto::frame::FRAME_HEADER_LEN]> {
        let writer = self.tunnel.writer.take();
        let flushed = matches!(self.tunnel.flush(), Ok(true));
        self.tunnel.writer = writer;
        if !flushed {
            return None;
        }
        let header = self
            .tunnel
            .session
            .as_mut()?
            .data_frame_header(self.stream, len, end_stream)
            .ok()?;
        self.tunnel
            .charge_written(hbone_proto::frame::FRAME_HEADER_LEN);
        Some(header)
    }
}

impl Reactor {
    pub(in crate::data_plane::reactor) fn stream_ready(
        &mut self,
        skey: FlowKey,
        side: Side,
        interest: Interest,
        now: Instant,
    ) {
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        sf.armed &= !driver::armed_bit(side, interest);
        if sf.phase == StreamPhase::Open {
            self.drive_stream(skey, now);
        } else if interest == Interest::Read && sf.local_side == Side::Downstream {
            // Waiting for a tunnel: a client that resets now is noticed at the next step.
        }
    }

    /// Moves bytes both ways between the local socket and the stream; finishes the flow when
    /// both directions are done.
    pub(in crate::data_plane::reactor) fn drive_stream(&mut self, skey: FlowKey, now: Instant) {
        let budget = self.state.config.node.splice.max_bytes_per_wakeup;
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        sf.queued = false;
        if sf.phase != StreamPhase::Open {
            return;
        }
        let (side, local) = (sf.local_side, sf.local.as_raw_fd());
        // Tunnel → local: what waits in the buffer.
        if sf.pending_local() > 0 {
            match sf.flush_local() {
                Ok(n) => {
                    if n > 0 {
                        sf.last_active = now;
                        if let (Some(tkey), Some(sid)) = (sf.tunnel, sf.stream) {
                            if let Some(s) = self.tunnel_mut(tkey).and_then(|t| t.session.as_mut())
                            {
                                let _ = s.release_capacity(sid, n);
                            }
                            self.flush_tunnel(tkey, now);
                        }
                    }
                }
                Err(e) => {
                    let end = self.local_broken(skey, e.raw_os_error().unwrap_or(libc::EIO));
                    return self.finish_stream(skey, end);
                }
            }
        }
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        // With a sink, it is the stream's only queue (the copy queue above is empty).
        if let Some(sink) = sf.sink.as_mut() {
            if let Err(e) = sink.flush() {
                let end = self.local_broken(skey, e.0);
                return self.finish_stream(skey, end);
            }
            self.release_delivered(skey, now);
        }
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        if sf.pending_local() > 0 {
            self.arm_stream(skey, side, Interest::Write);
        } else if sf.remote_eof && !sf.local_shut {
            sf.local_shut = true;
            log::debug!(
                "reactor {}: stream flow fd {local} shut down for writing",
                self.id
            );
            // SAFETY: plain syscall on a socket we own.
            unsafe { libc::shutdown(local, libc::SHUT_WR) };
        }
        // Local → tunnel.
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        if !sf.local_eof && !sf.stream_gone && !sf.blocked {
            let (tkey, sid) = (sf.tunnel, sf.stream);
            let (Some(tkey), Some(sid)) = (tkey, sid) else {
                return;
            };
            if self.stream_mut(skey).is_some_and(|sf| sf.sender.is_some()) {
                self.send_zero_copy(skey, tkey, sid, now);
                if self.stream_mut(skey).is_some_and(|sf| sf.is_complete()) {
                    self.finish_stream(skey, StreamEnd::Clean);
                }
                return;
            }
            let mut moved = 0usize;
            loop {
                let Some(t) = entry_mut(&mut self.tunnels, tkey) else {
                    return self.finish_stream(
                        skey,
                        StreamEnd::TunnelBroken {
                            kind: FailureKind::TunnelFailed,
                        },
                    );
                };
                let credit = t.session.as_ref().map_or(0, |s| s.send_capacity(sid));
                let room = t.out_room();
                if credit == 0 || room < 16 * 1024 {
                    if credit == 0 {
                        t.waiting_credit.push(skey);
                    } else {
                        t.blocked.push(skey);
                    }
                    if let Some(sf) = self.stream_mut(skey) {
                        sf.blocked = true;
                    }
                    break;
                }
                if moved >= budget {
                    if let Some(sf) = self.stream_mut(skey) {
                        if !sf.queued {
                            sf.queued = true;
                            self.runnable.push(skey);
                        }
                    }
                    break;
                }
                match t.append_data_from(local, sid, credit.min(room)) {
                    Ok(0) => {
                        let _ = t.session.as_mut().map(|s| s.finish(sid));
                        if let Some(sf) = self.stream_mut(skey) {
                            sf.local_eof = true;
                        }
                        break;
                    }
                    Ok(n) => {
                        moved += n;
                        self.count_payload("sent", 0, n as u64);
                        if let Some(sf) = self.stream_mut(skey) {
                            sf.count_from_local(n);
                            sf.last_active = now;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.arm_stream(skey, side, Interest::Read);
                        break;
                    }
                    Err(e) => {
                        let end = self.local_broken(skey, e.raw_os_error().unwrap_or(libc::EIO));
                        self.flush_tunnel(tkey, now);
                        return self.finish_stream(skey, end);
                    }
                }
            }
            self.flush_tunnel(tkey, now);
        }
        if self.stream_mut(skey).is_some_and(|sf| sf.is_complete()) {
            self.finish_stream(skey, StreamEnd::Clean);
        }
    }

    /// A stream that just opened on a kTLS tunnel moves its bytes by splice from now on.
    pub(in crate::data_plane::reactor) fn maybe_zero_copy(&mut self, skey: FlowKey) {
        let Some(tkey) = self.stream_mut(skey).and_then(|sf| sf.tunnel) else {
            return;
        };
        if !self
            .tunnel_mut(tkey)
            .is_some_and(|t| t.is_kernel_tls() && t.zero_copy)
        {
            return;
        }
        let window = hbone_proto::Settings::default().initial_stream_window as usize;
        if let Some(sf) = self.stream_mut(skey) {
            sf.use_zero_copy(window);
        }
    }

    /// kTLS: the stream's bytes go local socket → pipe → tunnel as DATA frames, the payload
    /// spliced and encrypted by the kernel. One stream at a time owns the socket mid-frame.
    pub(in crate::data_plane::reactor) fn send_zero_copy(
        &mut self,
        skey: FlowKey,
        tkey: FlowKey,
        sid: StreamId,
        now: Instant,
    ) {
        let budget = self.state.config.node.splice.max_bytes_per_wakeup;
        let Reactor {
            tunnels,
            streams,
            pool,
            ..
        } = self;
        let Some(t) = entry_mut(tunnels, tkey) else {
            return self.finish_stream(
                skey,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::TunnelFailed,
                },
            );
        };
        let Some(sf) = entry_mut(streams, skey) else {
            return;
        };
        if t.writer.is_some_and(|w| w != skey) {
            // Another stream is mid-frame; it wakes us when done.
            t.blocked.push(skey);
            sf.blocked = true;
            return;
        }
        let local = sf.local.as_raw_fd();
        let tunnel_fd = t.raw();
        let Some(sender) = sf.sender.as_mut() else {
            return;
        };
        let (frames, bytes) = (sender.stats.frames, sender.stats.payload_bytes);
        let r = sender.send(
            local,
            tunnel_fd,
            pool,
            &mut FrameHeaders {
                tunnel: t,
                stream: sid,
            },
            budget,
        );
        let sent = (sender.stats.payload_bytes - bytes) as usize;
        let new_frames = sender.stats.frames - frames;
        let mid_frame = sender.mid_frame();
        let _ = new_frames;
        t.charge_written(sent);
        t.writer = mid_frame.then_some(skey);
        if sent > 0 {
            sf.count_from_local(sent);
            sf.last_active = now;
        }
        tunnel_driver::count_payload(&self.metrics, "sent", sent as u64, 0);
        let side = sf.local_side;
        let wrote_out = t.out_pending() > 0;
        match r {
            Ok(SendStatus::WantRead) => self.arm_stream(skey, side, Interest::Read),
            Ok(SendStatus::WantWrite) => {
                t.blocked.push(skey);
                sf.blocked = true;
                self.arm_tunnel(tkey, Interest::Write);
            }
            Ok(SendStatus::WantCredit) => {
                t.waiting_credit.push(skey);
                sf.blocked = true;
            }
            Ok(SendStatus::Yield) => {
                if !sf.queued {
                    sf.queued = true;
                    self.runnable.push(skey);
                }
            }
            Ok(SendStatus::Done) => sf.local_eof = true,
            // The session's own frames could not all be written first: wait for the socket.
            Err(SendError::HeaderRefused) if wrote_out => {
                t.blocked.push(skey);
                sf.blocked = true;
                self.arm_tunnel(tkey, Interest::Write);
            }
            Err(SendError::HeaderRefused) => {
                return self.finish_stream(
                    skey,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::StreamReset,
                    },
                )
            }
            Err(SendError::Source(errno)) => {
                let end = self.local_broken(skey, errno);
                return self.finish_stream(skey, end);
            }
            Err(SendError::Pipe(errno)) => {
                return self.finish_stream(
                    skey,
                    StreamEnd::LocalBroken {
                        kind: FailureKind::PipeUnavailable,
                        errno,
                    },
                )
            }
            Err(SendError::Tunnel(errno)) => {
                return self.fail_tunnel(
                    tkey,
                    TunnelError::new("write", io::Error::from_raw_os_error(errno).to_string()),
                )
            }
        }
        if !mid_frame {
            // Frame boundary: the session's frames and waiting streams may write now.
            self.flush_tunnel(tkey, now);
        }
    }

    /// Gives the peer credit for the bytes a stream's sink delivered; waits for the local
    /// socket when bytes are left.
    pub(in crate::data_plane::reactor) fn release_delivered(
        &mut self,
        skey: FlowKey,
        now: Instant,
    ) {
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        let delivered = sf.sink.as_mut().map_or(0, |s| s.take_delivered());
        if delivered > 0 {
            sf.last_active = now;
            sf.count_toward_local(delivered);
            if let (Some(tkey), Some(sid)) = (sf.tunnel, sf.stream) {
                if let Some(s) = self.tunnel_mut(tkey).and_then(|t| t.session.as_mut()) {
                    let _ = s.release_capacity(sid, delivered);
                }
            }
        }
        self.want_local_write(skey);
    }

    /// Arms the local socket for writing if bytes wait for it.
    pub(in crate::data_plane::reactor) fn want_local_write(&mut self, skey: FlowKey) {
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        if sf.pending_local() > 0 {
            let side = sf.local_side;
            self.arm_stream(skey, side, Interest::Write);
        } else if sf.remote_eof && !sf.local_shut {
            // Everything arrived and left: deliver the EOF now.
            if !sf.queued {
                sf.queued = true;
                self.runnable.push(skey);
            }
        }
    }

    pub(in crate::data_plane::reactor) fn stream_timer(
        &mut self,
        skey: FlowKey,
        timer: Timer,
        now: Instant,
    ) {
        let idle = self.state.config.node.timeouts.idle;
        let Some(sf) = self.stream_mut(skey) else {
            return;
        };
        match timer.kind {
            TimerKind::Connect => match sf.phase {
                StreamPhase::Connecting => self.stream_connected(skey, Err(libc::ETIMEDOUT), now),
                StreamPhase::WaitingTunnel | StreamPhase::AwaitingResponse => self.finish_stream(
                    skey,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::UpstreamConnectTimeout,
                    },
                ),
                StreamPhase::Open => {}
            },
            TimerKind::Idle => {
                let due = sf.last_active + idle;
                if due <= now {
                    self.finish_stream(skey, StreamEnd::Cut(CloseKind::IdleTimeout));
                } else {
                    self.push_timer(skey, due, TimerKind::Idle);
                }
            }
            TimerKind::Session => {}
        }
    }

    /// Removes a stream flow: gives its stream back (reset unless it ended cleanly), its pool
    /// reservation back, closes the local socket (reset when the tunnel side broke), logs it.
    pub(in crate::data_plane::reactor) fn finish_stream(&mut self, skey: FlowKey, end: StreamEnd) {
        if self.stream_mut(skey).is_none() {
            return;
        }
        let mut sf = self.streams.remove(crate::data_plane::reactor::slot(skey));
        log::debug!(
            "reactor {}: stream flow fd {} ends: {end:?}",
            self.id,
            sf.local.as_raw_fd()
        );
        sf.release_pipes(&mut self.pool);
        self.driver
            .release(skey, sf.armed, sf.phase == StreamPhase::Connecting);
        self.metrics.flows_open.fetch_sub(1, Relaxed);
        let now = Instant::now();
        if let (Some(tkey), Some(sid)) = (sf.tunnel, sf.stream) {
            if let Some(t) = self.tunnel_mut(tkey) {
                let ours = t.streams.get(&sid) == Some(&skey);
                if ours {
                    t.streams.remove(&sid);
                }
                if ours && !sf.stream_gone && end != StreamEnd::Clean {
                    let code = match end {
                        StreamEnd::LocalBroken { .. } => ErrorCode::CONNECT_ERROR,
                        _ => ErrorCode::CANCEL,
                    };
                    if let Some(s) = t.session.as_mut() {
                        let _ = s.reset(sid, code);
                    }
                }
                t.blocked.retain(|k| *k != skey);
                t.waiting_credit.retain(|k| *k != skey);
                if t.writer == Some(skey) {
                    // A half-written DATA frame cannot be finished: the tunnel is unusable.
                    t.writer = None;
                    self.fail_tunnel(
                        tkey,
                        TunnelError::new(
                            "stream_ended_mid_frame",
                            "a stream ended inside its DATA frame",
                        ),
                    );
                }
                self.flush_tunnel(tkey, now);
            }
        }
        if let Some(tid) = sf.pool_id {
            let h = self.hbone_state();
            if sf.reserved {
                let _ = h.pool.stream_closed(tid, now);
            } else {
                h.pool.cancel_wait(tid, &skey);
            }
            self.process_pool_events(now);
        }
        let was_open = sf.phase == StreamPhase::Open;
        if was_open {
            sf.counters.closed.fetch_add(1, Relaxed);
        }
        let (close, failure, errno) = match end {
            StreamEnd::Clean => {
                drop(sf.local);
                (CloseKind::Clean, None, None)
            }
            StreamEnd::Cut(kind) => {
                socket::close_with_reset(sf.local);
                (kind, None, None)
            }
            StreamEnd::LocalBroken { kind, errno } => {
                drop(sf.local);
                self.metrics.failure(kind);
                let close = CloseKind::broken(was_open);
                (close, Some(kind), Some(errno).filter(|e| *e != 0))
            }
            StreamEnd::TunnelBroken { kind } => {
                socket::close_with_reset(sf.local);
                self.metrics.failure(kind);
                let close = CloseKind::broken(was_open);
                (close, Some(kind), None)
            }
        };
        self.metrics.closed(close);
        let mut record = sf.record;
        record.set_end(close, failure, errno, sf.started.elapsed());
        access_log::emit(&record, self.observer.as_ref());
    }

    pub(in crate::data_plane::reactor) fn local_broken(
        &self,
        skey: FlowKey,
        errno: i32,
    ) -> StreamEnd {
        let side = entry(&self.streams, skey)
            .map(|f| f.local_side)
            .unwrap_or(Side::Downstream);
        StreamEnd::LocalBroken {
            kind: match side {
                Side::Downstream => FailureKind::DownstreamReset,
                Side::Upstream => FailureKind::UpstreamReset,
            },
            errno,
        }
    }

    pub(in crate::data_plane::reactor) fn arm_stream(
        &mut self,
        skey: FlowKey,
        side: Side,
        interest: Interest,
    ) {
        let Some(sf) = entry_mut(&mut self.streams, skey) else {
            return;
        };
        if !sf.is_armed(side, interest)
            && self.driver.arm(skey, side, interest, sf.local.as_raw_fd())
        {
            sf.armed |= driver::armed_bit(side, interest);
        }
    }
}
