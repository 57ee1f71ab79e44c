//! One tunnel's life in the reactor: connect, handshake, TLS mode, reading frames (copied or
//! with the zero-copy receiver), session events, writing, keepalive, retirement, closing.

use super::*;

/// The zero-copy receiver's view of the session and the streams (kTLS tunnels).
struct RecvHandler<'a> {
    session: &'a mut hbone_proto::Session,
    stream_map: &'a HashMap<StreamId, FlowKey>,
    flows: &'a mut slab::Slab<StreamFlow>,
    now: Instant,
    records: Vec<&'static str>,
    /// Flows that took payload (their credit is released after the poll).
    touched: Vec<FlowKey>,
    /// Flows whose local socket failed while payload was handed to it (ended after the poll).
    broken: Vec<(FlowKey, i32)>,
    fatal: Option<TunnelError>,
    peer_closed: bool,
}

impl<'a> RecvHandler<'a> {
    fn new(
        session: &'a mut hbone_proto::Session,
        stream_map: &'a HashMap<StreamId, FlowKey>,
        flows: &'a mut slab::Slab<StreamFlow>,
        now: Instant,
    ) -> Self {
        RecvHandler {
            session,
            stream_map,
            flows,
            now,
            records: Vec::new(),
            touched: Vec::new(),
            broken: Vec::new(),
            fatal: None,
            peer_closed: false,
        }
    }

    fn flow(&mut self, stream: StreamId) -> Option<&mut StreamFlow> {
        let key = *self.stream_map.get(&stream)?;
        entry_mut(self.flows, key)
    }

    fn touch(&mut self, key: FlowKey) {
        if !self.touched.contains(&key) {
            self.touched.push(key);
        }
    }

    /// Payload the receiver did not splice (its stream had no sink when the frame began) is
    /// handed to the stream now, in tunnel order, exactly as the copy path does. Never as a
    /// session event delivered after the poll: by then later frames of the same stream may
    /// have been spliced into its sink and would overtake these bytes.
    fn copied_payload(&mut self, stream: StreamId, bytes: &[u8]) -> Result<(), HandlerError> {
        let now = self.now;
        let (released, key, failed) = match self.flow(stream) {
            Some(sf) => {
                sf.last_active = now;
                let key = sf.key;
                match sf.deliver(bytes) {
                    Ok(w) => (w, Some(key), None),
                    // The local socket failed: drop the bytes (credit goes back); the flow
                    // ends after the poll.
                    Err(e) => (
                        bytes.len(),
                        None,
                        Some((key, e.raw_os_error().unwrap_or(libc::EIO))),
                    ),
                }
            }
            None => (bytes.len(), None, None),
        };
        self.session
            .data_consumed(stream, bytes.len())
            .map_err(|_| HandlerError)?;
        if released > 0 {
            let _ = self.session.release_capacity(stream, released);
        }
        if let Some(key) = key {
            self.touch(key);
        }
        if let Some(f) = failed {
            self.broken.push(f);
        }
        Ok(())
    }
}

impl FrameHandler<Pipe> for RecvHandler<'_> {
    fn frame_bytes(&mut self, bytes: &[u8]) -> Result<(), HandlerError> {
        let mut off = 0;
        while off < bytes.len() {
            if let Some((stream, remaining)) = self.session.pending_payload() {
                let n = remaining.min(bytes.len() - off);
                self.copied_payload(stream, &bytes[off..off + n])?;
                off += n;
                continue;
            }
            let n = match self.session.handle_input(&bytes[off..], self.now) {
                Input::Consumed(n) => n,
                Input::DataPayload { consumed, .. } => consumed,
            };
            if self.session.is_closed() {
                return Err(HandlerError);
            }
            if n == 0 {
                break;
            }
            off += n;
        }
        Ok(())
    }

    fn sink(&mut self, stream: StreamId) -> Option<&mut StreamSink<Pipe>> {
        if self.session.pending_payload().map(|(s, _)| s) != Some(stream) {
            return None;
        }
        let key = self.flow(stream)?.key;
        self.touch(key);
        self.flow(stream)?.sink.as_mut()
    }

    fn payload_moved(&mut self, stream: StreamId, n: usize) -> Result<(), HandlerError> {
        self.session
            .data_consumed(stream, n)
            .map_err(|_| HandlerError)
    }

    fn tls_record(&mut self, record_type: u8, payload: &[u8]) -> Result<(), HandlerError> {
        match ktls::control_record(record_type, payload) {
            ControlRecord::Ignore => {
                self.records.push("new_session_ticket");
                Ok(())
            }
            ControlRecord::PeerClosed => {
                self.records.push("close_notify");
                self.peer_closed = true;
                Err(HandlerError)
            }
            ControlRecord::Retire(why) => {
                self.records.push("key_update");
                self.fatal = Some(TunnelError::new("ktls_key_update", why));
                Err(HandlerError)
            }
            ControlRecord::Fatal(why) => {
                self.records.push("alert");
                self.fatal = Some(TunnelError::new("tls_alert", why));
                Err(HandlerError)
            }
        }
    }
}

/// Bytes a receiver has moved (payload and frame headers), from its counters.
fn moved(stats: &crate::tunnel::io::RecvStats) -> usize {
    (stats.spliced_bytes + stats.buffered_bytes + stats.skipped_bytes + stats.dropped_bytes)
        as usize
        + (stats.spliced_frames + stats.buffered_frames + stats.control_frames) as usize
            * hbone_proto::frame::FRAME_HEADER_LEN
}

/// Adds to `ringtun_hbone_payload_bytes_total{direction,path}` (a free function so callers
/// holding borrows of other reactor fields can use it).
pub(in crate::data_plane::reactor) fn count_payload(
    metrics: &ReactorMetrics,
    direction: &'static str,
    spliced: u64,
    copied: u64,
) {
    for (spliced_path, n) in [(true, spliced), (false, copied)] {
        if n == 0 {
            continue;
        }
        let labels = match (direction == "sent", spliced_path) {
            (true, true) => "direction=\"sent\",path=\"spliced\"",
            (true, false) => "direction=\"sent\",path=\"copied\"",
            (false, true) => "direction=\"received\",path=\"spliced\"",
            (false, false) => "direction=\"received\",path=\"copied\"",
        };
        metrics.hbone("ringtun_hbone_payload_bytes_total", labels, n as i64);
    }
}

/// How long a politely closing tunnel may take to flush and see the peer's FIN.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

impl Reactor {
    pub(in crate::data_plane::reactor) fn tunnel_connected(
        &mut self,
        tkey: FlowKey,
        result: Result<(), i32>,
        now: Instant,
    ) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        if t.phase != Phase::Connecting {
            return;
        }
        match result {
            Ok(()) => {
                t.phase = Phase::Handshaking;
                self.drive_tunnel(tkey, now);
            }
            Err(errno) => self.fail_tunnel(
                tkey,
                TunnelError::new("connect", io::Error::from_raw_os_error(errno).to_string()),
            ),
        }
    }

    pub(in crate::data_plane::reactor) fn tunnel_ready(
        &mut self,
        tkey: FlowKey,
        interest: Interest,
        now: Instant,
    ) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        t.armed &= !driver::armed_bit(Side::Upstream, interest);
        self.drive_tunnel(tkey, now);
    }

    /// Handshake, then reading, session events and writing, as far as the socket allows.
    pub(in crate::data_plane::reactor) fn drive_tunnel(&mut self, tkey: FlowKey, now: Instant) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        t.queued = false;
        match t.phase {
            Phase::Connecting => return,
            Phase::Handshaking => match t.handshake() {
                Ok(Handshake::WantRead) => return self.arm_tunnel(tkey, Interest::Read),
                Ok(Handshake::WantWrite) => return self.arm_tunnel(tkey, Interest::Write),
                Ok(Handshake::Done) => {
                    if let Err(e) = self.establish(tkey, now) {
                        return self.fail_tunnel(tkey, e);
                    }
                }
                Err(e) => return self.fail_tunnel(tkey, e),
            },
            Phase::Open => {}
            Phase::Closing => return self.finish_close(tkey),
        }
        let budget = self.state.config.node.splice.max_bytes_per_wakeup;
        let mut read = 0usize;
        let mut records = Vec::new();
        loop {
            if let Err(e) = self.process_input(tkey, now) {
                return self.fail_tunnel(tkey, e);
            }
            self.process_session_events(tkey, now);
            let Some(t) = self.tunnel_mut(tkey) else {
                return;
            };
            if t.peer_eof || t.session.as_ref().is_none_or(|s| s.is_closed()) {
                break;
            }
            if read >= budget {
                if !t.queued {
                    t.queued = true;
                    self.runnable.push(tkey);
                }
                break;
            }
            if t.receiver.is_none() && t.zero_copy_rx_ready() {
                let max_frame = hbone_proto::Settings::default().max_frame_size as usize;
                t.receiver = Some(FrameReceiver::new(max_frame, true));
            }
            if t.receiver.is_some() {
                match self.receive_frames(tkey, budget - read, now) {
                    Ok((RecvStatus::WantRead, n)) => {
                        let _ = n;
                        self.process_session_events(tkey, now);
                        self.arm_tunnel(tkey, Interest::Read);
                        break;
                    }
                    Ok((RecvStatus::Yield, n)) => read += n.max(1),
                    Ok((RecvStatus::Eof, _)) => {
                        if let Some(t) = self.tunnel_mut(tkey) {
                            t.peer_eof = true;
                        }
                    }
                    Err(e) => return self.fail_tunnel(tkey, e),
                }
                continue;
            }
            match t.fill(&mut records) {
                Ok(Fill::Got(n)) => read += n,
                Ok(Fill::WouldBlock) => {
                    self.arm_tunnel(tkey, Interest::Read);
                    break;
                }
                Ok(Fill::Eof) => {
                    t.peer_eof = true;
                }
                Err(e) => {
                    self.count_records(&records);
                    return self.fail_tunnel(tkey, e);
                }
            }
        }
        self.count_records(&records);
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        if t.peer_eof {
            // The peer will send nothing more. Streams that already got everything both ways
            // finish delivering their tail; any other stream is cut off and reset (counted).
            let role = t.role.label();
            let unfinished = self.unfinished_streams(tkey);
            if unfinished > 0 {
                let id = self.id;
                log::info!(
                    "reactor {id}: peer closed a {role} tunnel with {unfinished} unfinished streams; resetting them"
                );
                self.metrics.hbone(
                    "ringtun_hbone_tunnel_failures_total",
                    &format!("role=\"{role}\",reason=\"peer_closed\""),
                    1,
                );
            }
            return self.close_tunnel(tkey, Some("peer_closed"));
        }
        if t.session.as_ref().is_some_and(|s| s.is_closed()) {
            return self.fail_tunnel(tkey, TunnelError::new("http2", "session closed"));
        }
        self.flush_tunnel(tkey, now);
        self.schedule_session_timer(tkey);
    }

    /// kTLS: reads frames with the zero-copy receiver; DATA payload is spliced into the
    /// streams' pipes. Returns the receiver's status and the bytes it moved.
    pub(in crate::data_plane::reactor) fn receive_frames(
        &mut self,
        tkey: FlowKey,
        budget: usize,
        now: Instant,
    ) -> Result<(RecvStatus, usize), TunnelError> {
        let Reactor {
            tunnels,
            streams,
            pool,
            ..
        } = self;
        let Some(t) = entry_mut(tunnels, tkey) else {
            return Ok((RecvStatus::WantRead, 0));
        };
        let fd = t.raw();
        let Some(mut receiver) = t.receiver.take() else {
            return Ok((RecvStatus::WantRead, 0));
        };
        let before = moved(&receiver.stats);
        let before_stats = receiver.stats;
        let Some(session) = t.session.as_mut() else {
            t.receiver = Some(receiver);
            return Ok((RecvStatus::WantRead, 0));
        };
        let mut handler = RecvHandler::new(session, &t.streams, streams, now);
        let r = receiver.poll(fd, pool, &mut handler, budget);
        let n = moved(&receiver.stats) - before;
        let RecvHandler {
            records,
            touched,
            broken,
            fatal,
            peer_closed,
            ..
        } = handler;
        let after_stats = receiver.stats;
        t.receiver = Some(receiver);
        self.count_records(&records);
        self.count_payload(
            "received",
            after_stats.spliced_bytes - before_stats.spliced_bytes,
            (after_stats.buffered_bytes + after_stats.skipped_bytes)
                - (before_stats.buffered_bytes + before_stats.skipped_bytes),
        );
        for skey in touched {
            self.release_delivered(skey, now);
        }
        for (skey, errno) in broken {
            self.finish_stream(skey, self.local_broken(skey, errno));
        }
        match r {
            Ok(status) => Ok((status, n)),
            Err(_) if peer_closed => Ok((RecvStatus::Eof, n)),
            Err(_) if fatal.is_some() => Err(fatal.expect("checked")),
            Err(RecvError::Handler) => Err(TunnelError::new("http2", "session closed")),
            Err(RecvError::Truncated) => Err(TunnelError::new(
                "peer_closed",
                "peer closed inside a frame",
            )),
            Err(RecvError::Tunnel(errno)) => Err(TunnelError::new(
                "ktls_read",
                io::Error::from_raw_os_error(errno).to_string(),
            )),
            Err(RecvError::Pipe(errno)) => Err(TunnelError::new(
                "pipe",
                io::Error::from_raw_os_error(errno).to_string(),
            )),
            Err(RecvError::FrameTooLarge(len)) => Err(TunnelError::new(
                "frame_size",
                format!("peer sent a {len}-byte frame"),
            )),
            Err(RecvError::SpillLimit(sid)) => Err(TunnelError::new(
                "flow_control",
                format!("peer overran stream {sid:?}'s window"),
            )),
            Err(RecvError::BadPadding) => Err(TunnelError::new("protocol", "bad DATA padding")),
        }
    }

    /// Counts DATA payload by path (`ringtun_hbone_payload_bytes_total`).
    pub(in crate::data_plane::reactor) fn count_payload(
        &self,
        direction: &'static str,
        spliced: u64,
        copied: u64,
    ) {
        count_payload(&self.metrics, direction, spliced, copied);
    }

    pub(in crate::data_plane::reactor) fn count_records(&self, records: &[&'static str]) {
        for r in records {
            self.metrics.hbone(
                "ringtun_hbone_tls_records_total",
                &format!("kind=\"{r}\""),
                1,
            );
        }
    }

    pub(in crate::data_plane::reactor) fn establish(
        &mut self,
        tkey: FlowKey,
        now: Instant,
    ) -> Result<(), TunnelError> {
        let (support, allow, zero_copy) = {
            let h = self.hbone.as_ref().expect("hbone configured");
            (h.creds.ktls.clone(), h.allow_ktls, h.zero_copy)
        };
        let t = self.tunnel_mut(tkey).expect("tunnel present");
        t.establish(&support, allow, zero_copy, now)?;
        let role = t.role.label();
        let mode = t.mode.clone().expect("mode set by establish");
        let cipher = t.cipher;
        let peer_id = t
            .peer_identity
            .as_ref()
            .map(|p| p.to_uri())
            .unwrap_or_default();
        let (peer, pool_id) = match &t.role {
            Role::Client { peer, pool_id, .. } => (*peer, Some(*pool_id)),
            Role::Server { peer, .. } => (*peer, None),
        };
        let line = format!("{role} tunnels use {mode}");
        let id = self.id;
        let h = self.hbone_state();
        if h.logged_modes.insert(line.clone()) {
            log::info!("reactor {id}: {line}");
        }
        // Once per tunnel: which TLS it runs and why (tunnels are pooled, so this is rare).
        let t = &self.tunnels[crate::data_plane::reactor::slot(tkey)];
        let path = match (t.is_kernel_tls(), t.zero_copy) {
            (true, true) => ", payload spliced",
            (true, false) => ", payload copied (node.hbone.zero_copy is off)",
            (false, _) => "",
        };
        log::info!("reactor {id}: {role} tunnel with {peer} ({peer_id}) established: {mode}{path}");
        self.metrics.hbone(
            "ringtun_hbone_tunnels_total",
            &format!(
                "role=\"{role}\",tls=\"{}\",cipher=\"{}\"",
                mode.label(),
                cipher.map_or("unknown", |c| c.name())
            ),
            1,
        );
        self.metrics
            .hbone("ringtun_hbone_tunnels_open", &format!("role=\"{role}\""), 1);
        if let Some(tid) = pool_id {
            let ready = self.hbone_state().pool.tunnel_ready(tid, u32::MAX, now);
            if let Ok(ready) = ready {
                for w in ready.granted {
                    if let Some(sf) = self.stream_mut(w) {
                        sf.reserved = true;
                    }
                    self.open_stream_on(w, tkey, now);
                }
                for w in ready.retry {
                    self.retry_checkout(w, now);
                }
                for w in ready.refused {
                    self.finish_stream(
                        w,
                        StreamEnd::TunnelBroken {
                            kind: FailureKind::TunnelFailed,
                        },
                    );
                }
            }
            self.process_pool_events(now);
        }
        Ok(())
    }

    /// Feeds received plaintext to the session; DATA payload goes straight to its stream.
    pub(in crate::data_plane::reactor) fn process_input(
        &mut self,
        tkey: FlowKey,
        now: Instant,
    ) -> Result<(), TunnelError> {
        loop {
            let Some(t) = entry_mut(&mut self.tunnels, tkey) else {
                return Ok(());
            };
            let Some((session, input, streams)) = t.session_input() else {
                return Ok(());
            };
            if input.is_empty() || session.is_closed() {
                return Ok(());
            }
            if let Some((sid, remaining)) = session.pending_payload() {
                let n = remaining.min(input.len());
                let skey = streams.get(&sid).copied();
                let sf = skey.and_then(|k| entry_mut(&mut self.streams, k));
                let (released, failed) = match sf {
                    Some(sf) => match sf.deliver(&input[..n]) {
                        Ok(w) => {
                            sf.last_active = now;
                            (w, None)
                        }
                        // The local socket failed: drop the bytes (credit goes back) and end
                        // the flow below.
                        Err(e) => (n, Some((sf.key, e.raw_os_error().unwrap_or(libc::EIO)))),
                    },
                    None => (n, None),
                };
                session
                    .data_consumed(sid, n)
                    .map_err(|e| TunnelError::new("internal", e.to_string()))?;
                if released > 0 {
                    let _ = session.release_capacity(sid, released);
                }
                t.consume_input(n);
                self.count_payload("received", 0, n as u64);
                if let Some((skey, errno)) = failed {
                    self.finish_stream(skey, self.local_broken(skey, errno));
                } else if let Some(skey) = skey {
                    self.release_delivered(skey, now);
                }
                continue;
            }
            let consumed = match session.handle_input(input, now) {
                Input::Consumed(n) => n,
                Input::DataPayload { consumed, .. } => consumed,
            };
            t.consume_input(consumed);
            if consumed == 0 {
                return Ok(());
            }
        }
    }

    pub(in crate::data_plane::reactor) fn process_session_events(
        &mut self,
        tkey: FlowKey,
        now: Instant,
    ) {
        loop {
            let Some(t) = self.tunnel_mut(tkey) else {
                return;
            };
            let Some(ev) = t.session.as_mut().and_then(|s| s.poll_event()) else {
                return;
            };
            match ev {
                SessionEvent::Request { stream, request } => {
                    self.inbound_request(tkey, stream, request, now)
                }
                SessionEvent::InvalidRequest { stream, error } => {
                    self.answer_and_close(tkey, stream, error.status())
                }
                SessionEvent::Response { stream, response } => {
                    let Some(skey) = t.streams.get(&stream).copied() else {
                        continue;
                    };
                    let status = response.status;
                    self.metrics.hbone(
                        "ringtun_hbone_streams_total",
                        &format!("role=\"client\",status=\"{status}\""),
                        1,
                    );
                    if status == 200 {
                        if let Some(sf) = self.stream_mut(skey) {
                            sf.phase = StreamPhase::Open;
                            sf.last_active = now;
                            sf.counters.opened.fetch_add(1, Relaxed);
                        }
                        self.maybe_zero_copy(skey);
                        self.push_timer(
                            skey,
                            now + self.state.config.node.timeouts.idle,
                            TimerKind::Idle,
                        );
                        self.drive_stream(skey, now);
                    } else {
                        log::debug!(
                            "reactor {}: CONNECT answered {status}; client reset",
                            self.id
                        );
                        self.finish_stream(
                            skey,
                            StreamEnd::TunnelBroken {
                                kind: FailureKind::ConnectRejected,
                            },
                        );
                    }
                }
                SessionEvent::Data { stream, data } => {
                    // Only if payload was fed through handle_input; deliver it the same way.
                    let Some(skey) = t.streams.get(&stream).copied() else {
                        continue;
                    };
                    let r = self.stream_mut(skey).map(|sf| sf.deliver(&data));
                    match r {
                        Some(Ok(w)) => {
                            if let Some(s) = self.tunnel_mut(tkey).and_then(|t| t.session.as_mut())
                            {
                                let _ = s.release_capacity(stream, w);
                            }
                            self.release_delivered(skey, now);
                        }
                        Some(Err(e)) => {
                            let end =
                                self.local_broken(skey, e.raw_os_error().unwrap_or(libc::EIO));
                            self.finish_stream(skey, end);
                        }
                        None => {}
                    }
                }
                SessionEvent::StreamEnd { stream } => {
                    let Some(skey) = t.streams.get(&stream).copied() else {
                        continue;
                    };
                    if let Some(sf) = self.stream_mut(skey) {
                        sf.remote_eof = true;
                    }
                    self.drive_stream(skey, now);
                }
                SessionEvent::Reset { stream, code, .. } => {
                    let Some(skey) = t.streams.remove(&stream) else {
                        continue;
                    };
                    if let Some(sf) = self.stream_mut(skey) {
                        sf.stream_gone = true;
                    }
                    if code.is_eof() {
                        if let Some(sf) = self.stream_mut(skey) {
                            sf.remote_eof = true;
                            // We can no longer send: the local socket's input is moot.
                            sf.local_eof = true;
                        }
                        self.drive_stream(skey, now);
                    } else {
                        log::debug!("reactor {}: stream reset by the peer ({code:?})", self.id);
                        self.finish_stream(
                            skey,
                            StreamEnd::TunnelBroken {
                                kind: FailureKind::StreamReset,
                            },
                        );
                    }
                }
                SessionEvent::SendCapacity { .. } => self.wake_blocked(tkey, true),
                SessionEvent::GoAway { .. } => {
                    if let Role::Client { pool_id, .. } = t.role {
                        t.retiring = true;
                        let retry = self.hbone_state().pool.goaway_received(pool_id);
                        for w in retry.unwrap_or_default() {
                            self.retry_checkout(w, now);
                        }
                    }
                }
                SessionEvent::Drained => {
                    if t.writer.is_some() {
                        // Closing now would cut the frame in flight (the kernel matrix saw a
                        // stream lose its last 81 bytes and END_STREAM that way).
                        t.close_when_written = true;
                        continue;
                    }
                    return self.close_tunnel(tkey, None);
                }
                SessionEvent::ConnectionError(e) => {
                    return self.fail_tunnel(tkey, TunnelError::new("http2", e.to_string()));
                }
            }
        }
    }

    /// Writes what the tunnel holds; wakes streams waiting for room; retires a tunnel past its
    /// record budget.
    pub(in crate::data_plane::reactor) fn flush_tunnel(&mut self, tkey: FlowKey, now: Instant) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        if t.phase != Phase::Open {
            return;
        }
        if t.writer.is_some() {
            // A zero-copy frame is half written: its stream finishes it, then the rest goes.
            return self.wake_blocked(tkey, false);
        }
        match t.flush() {
            Ok(true) => {
                if t.close_when_written {
                    return self.close_tunnel(tkey, None);
                }
                if !t.blocked.is_empty() {
                    self.wake_blocked(tkey, false);
                }
            }
            Ok(false) => self.arm_tunnel(tkey, Interest::Write),
            Err(e) => return self.fail_tunnel(tkey, e),
        }
        let id = self.id;
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        if t.budget.should_retire() && !t.retiring {
            t.retiring = true;
            let records = t.budget.records_sent();
            let role = t.role.label();
            log::info!(
                "reactor {id}: {role} tunnel sent {records} TLS records (budget reached); retiring it"
            );
            match t.role {
                Role::Client { pool_id, .. } => {
                    let retry = self.hbone_state().pool.retire(pool_id);
                    for w in retry.unwrap_or_default() {
                        self.retry_checkout(w, now);
                    }
                    self.process_pool_events(now);
                }
                Role::Server { .. } => {
                    if let Some(s) = t.session.as_mut() {
                        s.goaway();
                    }
                    let _ = t.flush();
                }
            }
            self.metrics.hbone(
                "ringtun_hbone_tunnels_closed_total",
                &format!("role=\"{role}\",reason=\"record_budget\""),
                1,
            );
        }
    }

    /// Requeues the streams waiting for room in the tunnel; with `credit`, also those waiting
    /// for flow-control credit.
    pub(in crate::data_plane::reactor) fn wake_blocked(&mut self, tkey: FlowKey, credit: bool) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        let mut blocked = std::mem::take(&mut t.blocked);
        if credit {
            blocked.append(&mut t.waiting_credit);
        }
        for skey in blocked {
            if let Some(sf) = self.stream_mut(skey) {
                sf.blocked = false;
                if !sf.queued {
                    sf.queued = true;
                    self.runnable.push(skey);
                }
            }
        }
    }

    pub(in crate::data_plane::reactor) fn arm_tunnel(&mut self, tkey: FlowKey, interest: Interest) {
        let Some(t) = entry_mut(&mut self.tunnels, tkey) else {
            return;
        };
        let bit = driver::armed_bit(Side::Upstream, interest);
        if t.armed & bit == 0 && self.driver.arm(tkey, Side::Upstream, interest, t.raw()) {
            t.armed |= bit;
        }
    }

    pub(in crate::data_plane::reactor) fn schedule_session_timer(&mut self, tkey: FlowKey) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        let next = t.session.as_ref().and_then(|s| s.poll_timeout());
        if let Some(at) = next {
            if t.timer_at != Some(at) {
                t.timer_at = Some(at);
                self.push_timer(tkey, at, TimerKind::Session);
            }
        }
    }

    pub(in crate::data_plane::reactor) fn tunnel_timer(
        &mut self,
        tkey: FlowKey,
        timer: Timer,
        now: Instant,
    ) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        match timer.kind {
            // The peer did not finish closing in time.
            TimerKind::Connect if t.phase == Phase::Closing => self.remove_tunnel(tkey, true),
            TimerKind::Connect if t.phase != Phase::Open => self.fail_tunnel(
                tkey,
                TunnelError::new(
                    "handshake_timeout",
                    "connect and TLS handshake took too long",
                ),
            ),
            TimerKind::Session if t.timer_at == Some(timer.at) => {
                t.timer_at = None;
                if let Some(s) = t.session.as_mut() {
                    s.handle_timeout(now);
                }
                self.process_session_events(tkey, now);
                if self
                    .tunnel_mut(tkey)
                    .is_some_and(|t| t.session.as_ref().is_some_and(|s| s.is_closed()))
                {
                    return self.fail_tunnel(
                        tkey,
                        TunnelError::new("keepalive", "peer did not answer PING"),
                    );
                }
                if self.server_idle_expired(tkey, now) {
                    return self.close_tunnel(tkey, Some("idle"));
                }
                self.flush_tunnel(tkey, now);
                self.schedule_session_timer(tkey);
            }
            _ => {}
        }
    }

    /// Server tunnels close after 2 × `pool_idle_timeout` without streams (the keepalive
    /// timer, every 10 s, is the clock): the client's pool normally closes its end first, but
    /// a peer that never does must not hold a tunnel slot on 15008 for ever.
    fn server_idle_expired(&mut self, tkey: FlowKey, now: Instant) -> bool {
        let limit = self.state.config.node.hbone.pool_idle_timeout * 2;
        let Some(t) = self.tunnel_mut(tkey) else {
            return false;
        };
        if !matches!(t.role, Role::Server { .. }) || t.phase != Phase::Open {
            return false;
        }
        if !t.streams.is_empty() {
            t.idle_since = None;
            return false;
        }
        let since = *t.idle_since.get_or_insert(now);
        now.duration_since(since) >= limit
    }

    /// A tunnel failed: log, count, reset its flows, hand its waiters back.
    pub(in crate::data_plane::reactor) fn fail_tunnel(&mut self, tkey: FlowKey, e: TunnelError) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        let role = t.role.label();
        let peer = match &t.role {
            Role::Client { peer, expected, .. } => format!("{peer} (expecting {expected})"),
            Role::Server { peer, local, .. } => format!("{peer} → {local}"),
        };
        let level = if t.phase == Phase::Open {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        let state = t.describe_io();
        log::log!(
            level,
            "reactor {}: {role} tunnel {peer} failed: {e} ({state})",
            self.id
        );
        self.metrics.hbone(
            "ringtun_hbone_tunnel_failures_total",
            &format!("role=\"{role}\",reason=\"{}\"", e.label),
            1,
        );
        self.close_tunnel_inner(tkey, true, e.label);
    }

    /// Closes a tunnel gracefully (GOAWAY, close_notify) or, with `Some(reason)` from the pool,
    /// because it is idle or drained.
    pub(in crate::data_plane::reactor) fn close_tunnel(
        &mut self,
        tkey: FlowKey,
        reason: Option<&'static str>,
    ) {
        self.close_tunnel_inner(tkey, false, reason.unwrap_or("closed"));
    }

    pub(in crate::data_plane::reactor) fn close_tunnel_inner(
        &mut self,
        tkey: FlowKey,
        failed: bool,
        reason: &'static str,
    ) {
        let id = self.id;
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        log::debug!(
            "reactor {id}: closing {} tunnel ({reason}, failed: {failed}, phase {:?}, {} bytes queued)",
            t.role.label(),
            t.phase,
            t.out_pending()
        );
        if t.phase == Phase::Closing {
            // Already closing politely; a failure now just ends it.
            if failed {
                self.remove_tunnel(tkey, true);
            }
            return;
        }
        let role = t.role.label();
        let was_open = t.phase == Phase::Open;
        let streams: Vec<FlowKey> = std::mem::take(&mut t.streams).into_values().collect();
        t.blocked.clear();
        t.waiting_credit.clear();
        if was_open {
            self.metrics.hbone(
                "ringtun_hbone_tunnels_open",
                &format!("role=\"{role}\""),
                -1,
            );
        }
        self.metrics.hbone(
            "ringtun_hbone_tunnels_closed_total",
            &format!("role=\"{role}\",reason=\"{reason}\""),
            1,
        );
        let t = self.tunnel_mut(tkey).expect("present");
        if let Role::Client { pool_id, .. } = t.role {
            let h = self.hbone_state();
            h.by_pool_id.remove(&pool_id);
            if h.pool.state(pool_id) != crate::tunnel::pool::TunnelState::Closed {
                if let Ok(f) = h.pool.tunnel_failed(pool_id) {
                    for w in f.waiters {
                        self.finish_stream(
                            w,
                            StreamEnd::TunnelBroken {
                                kind: FailureKind::TunnelFailed,
                            },
                        );
                    }
                }
            }
        }
        let now = Instant::now();
        for skey in streams {
            let mut finished_both_ways = false;
            if let Some(sf) = self.stream_mut(skey) {
                finished_both_ways = sf.phase == StreamPhase::Open && sf.remote_eof && sf.local_eof;
                sf.stream_gone = true;
                sf.reserved = false;
                sf.tunnel = None;
                sf.blocked = false;
            }
            if !failed && finished_both_ways {
                // Every byte and both END_STREAMs crossed; the flow may still be writing the
                // tail to its local socket. Let it finish on its own.
                self.drive_stream(skey, now);
                continue;
            }
            self.finish_stream(
                skey,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::TunnelFailed,
                },
            );
        }
        if failed || !was_open {
            return self.remove_tunnel(tkey, failed);
        }
        // Politely: GOAWAY, everything queued written, close_notify, FIN, then read until the
        // peer closes too (closing with unread bytes would send a reset that can destroy data
        // still in flight to the peer). Bounded by a timer.
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        t.phase = Phase::Closing;
        if let Some(s) = t.session.as_mut() {
            s.goaway();
        }
        self.push_timer(tkey, now + CLOSE_LINGER, TimerKind::Connect);
        self.finish_close(tkey);
    }

    /// Streams on the tunnel that have not exchanged both END_STREAMs.
    pub(in crate::data_plane::reactor) fn unfinished_streams(&self, tkey: FlowKey) -> usize {
        let Some(t) = entry(&self.tunnels, tkey) else {
            return 0;
        };
        t.streams
            .values()
            .filter(|k| entry(&self.streams, **k).is_some_and(|f| !(f.remote_eof && f.local_eof)))
            .count()
    }

    /// Closing: flush, then close_notify and FIN once, then discard input until EOF.
    pub(in crate::data_plane::reactor) fn finish_close(&mut self, tkey: FlowKey) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        t.writer = None;
        match if t.fin_sent { Ok(true) } else { t.flush() } {
            Ok(true) => {}
            Ok(false) => return self.arm_tunnel(tkey, Interest::Write),
            Err(e) => {
                log::debug!("reactor {}: closing tunnel: {e}", self.id);
                return self.remove_tunnel(tkey, true);
            }
        }
        if !t.fin_sent {
            t.fin_sent = true;
            t.send_close_notify();
            // SAFETY: plain syscall on a socket we own.
            unsafe { libc::shutdown(t.raw(), libc::SHUT_WR) };
        }
        let mut scratch = [0u8; 16 * 1024];
        loop {
            match crate::tls::ktls::recv_record(t.raw(), &mut scratch, libc::MSG_DONTWAIT) {
                Ok(r)
                    if r.len == 0
                        && r.record_type == crate::tls::ktls::CONTENT_APPLICATION_DATA =>
                {
                    return self.remove_tunnel(tkey, false)
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.arm_tunnel(tkey, Interest::Read)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("reactor {}: closing tunnel: {e}", self.id);
                    return self.remove_tunnel(tkey, false);
                }
            }
        }
    }

    /// Takes the tunnel out of the slab and closes its socket (with a reset when it failed).
    pub(in crate::data_plane::reactor) fn remove_tunnel(&mut self, tkey: FlowKey, reset: bool) {
        let id = self.id;
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        log::debug!(
            "reactor {id}: {} tunnel fd {} removed (reset: {reset}, {} bytes were queued)",
            t.role.label(),
            t.raw(),
            t.out_pending()
        );
        let mut t = self.tunnels.remove(crate::data_plane::reactor::slot(tkey));
        self.driver
            .release(tkey, t.armed, t.phase == Phase::Connecting);
        if let Some(sf_keys) = (!t.streams.is_empty()).then(|| std::mem::take(&mut t.streams)) {
            for skey in sf_keys.into_values() {
                if let Some(sf) = self.stream_mut(skey) {
                    sf.tunnel = None;
                    sf.stream_gone = true;
                }
                self.finish_stream(
                    skey,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                );
            }
        }
        if reset {
            socket::close_with_reset(t.fd);
        } else {
            drop(t.fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data_plane::splice::PipePool;
    use crate::observability::metrics::TcpCounters;
    use crate::tunnel::io::FlushStatus;
    use hbone_proto::Settings;
    use std::io::{Read, Write};
    use std::time::Duration;

    use crate::data_plane::socket::tcp_pair;

    /// Feeds what `from` has queued to `to`; false if it had nothing.
    fn transfer(
        from: &mut hbone_proto::Session,
        to: &mut hbone_proto::Session,
        now: Instant,
    ) -> bool {
        let mut buf = Vec::new();
        from.poll_transmit(&mut buf);
        let mut off = 0;
        while off < buf.len() {
            let n = match to.handle_input(&buf[off..], now) {
                Input::Consumed(n) => n,
                Input::DataPayload { consumed, .. } => consumed,
            };
            assert!(n > 0, "session stalled on control frames");
            off += n;
        }
        !buf.is_empty()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
            .collect()
    }

    /// The reordering the kernel matrix caught with zero-copy on (issue 3): an outbound stream
    /// gets its sink when the reactor processes the CONNECT answer, after the poll that read
    /// it. A DATA frame that began in that poll goes through user space; the rest of it arrives
    /// in the next poll, after the sink exists, and the frames behind it are spliced. The rest
    /// of the first frame must reach the local socket before them. (It used to become a
    /// session event delivered after the poll, behind frames the sink had already written.)
    #[test]
    fn payload_begun_before_the_sink_existed_is_not_overtaken_by_spliced_frames() {
        let now = Instant::now();
        let mut client = hbone_proto::Session::client(Settings::default(), now);
        let mut server = hbone_proto::Session::server(Settings::default(), now);
        while transfer(&mut client, &mut server, now) | transfer(&mut server, &mut client, now) {}
        let sid = client
            .open_stream(&ConnectRequest::new("10.0.0.2:80".parse().unwrap()))
            .unwrap();
        transfer(&mut client, &mut server, now);
        let server_sid = loop {
            match server.poll_event() {
                Some(SessionEvent::Request { stream, .. }) => break stream,
                Some(_) => continue,
                None => panic!("no CONNECT at the server"),
            }
        };
        while client.poll_event().is_some() {}

        // On the wire: HEADERS 200, then three DATA frames.
        let payloads = [pattern(60_000, 1), pattern(50_000, 2), pattern(40_000, 3)];
        let expected: Vec<u8> = payloads.concat();
        server.send_response(server_sid, 200, false).unwrap();
        let mut wire = Vec::new();
        server.poll_transmit(&mut wire);
        let split = wire.len() + hbone_proto::frame::FRAME_HEADER_LEN + 1000; // answer, first header, 1000 bytes
        for p in &payloads {
            server.send_data(server_sid, p, false, &mut wire).unwrap();
        }

        let (mut tunnel_w, tunnel_r) = tcp_pair();
        tunnel_r.set_nonblocking(true).unwrap();
        let (local_w, mut local_r) = tcp_pair();
        local_w.set_nonblocking(true).unwrap();
        let mut flows = slab::Slab::new();
        let entry = flows.vacant_entry();
        let slot = entry.key();
        let key = crate::data_plane::reactor::make_key(Kind::Stream, slot, 1);
        entry.insert(StreamFlow::new(
            key,
            OwnedFd::from(local_w),
            Side::Downstream,
            StreamPhase::AwaitingResponse,
            Arc::new(TcpCounters::default()),
            FlowRecord::new(0, "outbound"),
            now,
        ));
        let stream_map = HashMap::from([(sid, key)]);
        let mut pool = PipePool::new(1 << 20, 4);
        let mut receiver = FrameReceiver::new(Settings::default().max_frame_size as usize, false);
        let reader = std::thread::spawn(move || {
            local_r
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while got.len() < 150_000 {
                match local_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            got
        });
        let mut poll = |receiver: &mut FrameReceiver,
                        session: &mut hbone_proto::Session,
                        flows: &mut slab::Slab<StreamFlow>| {
            let mut handler = RecvHandler::new(session, &stream_map, flows, now);
            let status = receiver
                .poll(tunnel_r.as_raw_fd(), &mut pool, &mut handler, usize::MAX)
                .expect("receiver");
            assert!(handler.broken.is_empty());
            status
        };

        tunnel_w.write_all(&wire[..split]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            poll(&mut receiver, &mut client, &mut flows),
            RecvStatus::WantRead
        );
        // After the poll the reactor handles the answer: the stream opens with its sink.
        assert!(matches!(
            client.poll_event(),
            Some(SessionEvent::Response { .. })
        ));
        flows[slot].use_zero_copy(Settings::default().initial_stream_window as usize);

        let rest = wire[split..].to_vec();
        let writer = std::thread::spawn(move || tunnel_w.write_all(&rest).unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while flows[slot].pending_local() > 0
            || !writer.is_finished()
            || !receiver.at_frame_boundary()
        {
            assert!(Instant::now() < deadline, "payload did not drain");
            poll(&mut receiver, &mut client, &mut flows);
            // As the reactor does after a poll: copied payload that became a session event.
            while let Some(ev) = client.poll_event() {
                if let SessionEvent::Data { data, .. } = ev {
                    flows[slot].deliver(&data).expect("local socket");
                }
            }
            let sink = flows[slot].sink.as_mut().expect("sink");
            if sink.flush().expect("local socket") == FlushStatus::WantWrite {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        writer.join().unwrap();
        let got = reader.join().unwrap();
        assert_eq!(
            got.len(),
            expected.len(),
            "bytes missing at the local socket"
        );
        if let Some(at) = got.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!("stream reordered: first difference at offset {at}");
        }
        assert!(receiver.stats.spliced_frames >= 1, "{:?}", receiver.stats);
    }
}
