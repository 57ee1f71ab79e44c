//! Inbound: tunnels accepted on 15008, each CONNECT checked, connected upstream, answered.

use super::*;

impl Reactor {
    /// A connection accepted on a 15008 listener: start the TLS server handshake.
    pub(in crate::data_plane::reactor) fn accept_tunnel(
        &mut self,
        fd: OwnedFd,
        workload: WorkloadId,
        netns: Option<NetNs>,
        now: Instant,
    ) {
        let raw = fd.as_raw_fd();
        let (local, peer) = match (socket::local_addr(raw), socket::peer_addr(raw)) {
            (Ok(l), Ok(p)) => (l, p),
            _ => return socket::close_with_reset(fd),
        };
        let Some(h) = self.hbone.as_ref() else {
            return socket::close_with_reset(fd);
        };
        let entry = self.state.registry.workload(workload);
        let config = SpiffeId::parse(&entry.identity)
            .ok()
            .and_then(|id| h.creds.server.get(&id).cloned());
        let Some(config) = config else {
            log::warn!(
                "reactor {}: tunnel to {local} refused: no server certificate for {}",
                self.id,
                entry.identity
            );
            self.metrics.hbone(
                "ringtun_hbone_tunnel_failures_total",
                "role=\"server\",reason=\"no_certificate\"",
                1,
            );
            return socket::close_with_reset(fd);
        };
        if self.tunnels.len() + self.flows.len() + self.streams.len() >= self.max_flows {
            self.metrics.failure(FailureKind::FlowLimit);
            return socket::close_with_reset(fd);
        }
        let conn = match ServerConnection::new(config) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("reactor {}: TLS server setup failed: {e}", self.id);
                return socket::close_with_reset(fd);
            }
        };
        let _ = socket::set_nodelay(raw);
        let budget = self.hbone_state().record_budget;
        let tkey = self.insert_tunnel(|key| {
            Tunnel::new(
                key,
                fd,
                Role::Server {
                    workload,
                    local,
                    peer,
                    netns,
                },
                Connection::Server(conn),
                budget,
                now,
            )
        });
        self.metrics
            .hbone("ringtun_hbone_handshakes_total", "role=\"server\"", 1);
        if let Err(e) = self.driver.register(tkey, Side::Upstream, raw) {
            return self.fail_tunnel(tkey, TunnelError::new("register", e.to_string()));
        }
        self.push_timer(
            tkey,
            now + self.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
        self.drive_tunnel(tkey, now);
    }

    /// A CONNECT arrived on a server tunnel: check it, then connect to the destination.
    pub(in crate::data_plane::reactor) fn inbound_request(
        &mut self,
        tkey: FlowKey,
        sid: StreamId,
        request: ConnectRequest,
        now: Instant,
    ) {
        let Some(t) = self.tunnel_mut(tkey) else {
            return;
        };
        let Role::Server {
            local,
            peer,
            ref netns,
            ..
        } = t.role
        else {
            return;
        };
        let netns = netns.clone();
        let peer_identity = t.peer_identity.clone();
        let h = self.hbone.as_ref().expect("hbone configured");
        let decision = h.rules.check(&self.state.registry, &request, local);
        let (workload, upstream) = match decision {
            InboundDecision::Accept { workload, upstream } => (workload, upstream),
            InboundDecision::Reject { status, reason } => {
                log::debug!(
                    "reactor {}: CONNECT {} from {peer} refused with {status}: {}",
                    self.id,
                    request.authority,
                    reason.label()
                );
                return self.answer_and_close(tkey, sid, status);
            }
        };
        let mark = self.state.config.node.socket_mark;
        let made = in_netns(netns.as_ref(), || socket::outbound_socket(&upstream, mark));
        let fd = match made {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) | Err(e) => {
                log::warn!(
                    "reactor {}: cannot make a socket for {upstream}: {e}",
                    self.id
                );
                return self.answer_and_close(tkey, sid, 503);
            }
        };
        let w = &self.state.registry.workload(workload).workload;
        let labels = TcpLabels {
            reporter: "destination",
            source_workload: "unknown".into(),
            source_workload_namespace: peer_identity
                .as_ref()
                .map(|p| p.namespace().to_string())
                .unwrap_or_else(|| "unknown".into()),
            destination_workload: w.name.clone(),
            destination_workload_namespace: w.namespace.clone(),
            destination_service: "unknown".into(),
        };
        let mut record = FlowRecord::new(self.id, "inbound_hbone");
        record.source_workload = peer_identity
            .as_ref()
            .map(|p| p.to_uri())
            .unwrap_or_else(|| "unknown".into());
        record.client = peer;
        record.original_dst = local;
        record.destination = format!("workload:{}/{}", w.namespace, w.name);
        record.route = "hbone";
        record.upstream = upstream;
        record.destination_identity = Some(self.state.registry.workload(workload).identity.clone());
        let counters = self.metrics.tcp_counters(labels);
        let raw = fd.as_raw_fd();
        let key = self.insert_stream(|key| {
            let mut sf = StreamFlow::new(
                key,
                fd,
                Side::Upstream,
                StreamPhase::Connecting,
                counters,
                record,
                now,
            );
            sf.tunnel = Some(tkey);
            sf.stream = Some(sid);
            sf
        });
        if let Some(t) = self.tunnel_mut(tkey) {
            t.streams.insert(sid, key);
        }
        let started = self
            .driver
            .connect(key, raw, upstream)
            .and_then(|_| self.driver.register(key, Side::Upstream, raw));
        if let Err(e) = started {
            log::warn!("reactor {}: cannot connect to {upstream}: {e}", self.id);
            return self.stream_connected(key, Err(e.raw_os_error().unwrap_or(libc::EIO)), now);
        }
        self.push_timer(
            key,
            now + self.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
    }

    /// Answers a CONNECT that will not be served (400/503 ...) and ends the stream.
    pub(in crate::data_plane::reactor) fn answer_and_close(
        &mut self,
        tkey: FlowKey,
        sid: StreamId,
        status: u16,
    ) {
        self.metrics.hbone(
            "ringtun_hbone_streams_total",
            &format!("role=\"server\",status=\"{status}\""),
            1,
        );
        if let Some(s) = self.tunnel_mut(tkey).and_then(|t| t.session.as_mut()) {
            let _ = s.send_response(sid, status, true);
            // The client may still be sending: tell it to stop (NO_ERROR, RFC 9113 §8.1).
            let _ = s.reset(sid, ErrorCode::NO_ERROR);
        }
        self.flush_tunnel(tkey, Instant::now());
    }

    /// The inbound stream's upstream connect finished.
    pub(in crate::data_plane::reactor) fn stream_connected(
        &mut self,
        key: FlowKey,
        result: Result<(), i32>,
        now: Instant,
    ) {
        let Some(sf) = self.stream_mut(key) else {
            return;
        };
        if sf.phase != StreamPhase::Connecting {
            return;
        }
        let (tkey, sid) = (sf.tunnel, sf.stream);
        let (Some(tkey), Some(sid)) = (tkey, sid) else {
            return;
        };
        match result {
            Ok(()) => {
                sf.phase = StreamPhase::Open;
                sf.last_active = now;
                sf.counters.opened.fetch_add(1, Relaxed);
                self.maybe_zero_copy(key);
                let answered = self
                    .tunnel_mut(tkey)
                    .and_then(|t| t.session.as_mut())
                    .map(|s| s.send_response(sid, 200, false).is_ok())
                    .unwrap_or(false);
                if !answered {
                    return self.finish_stream(
                        key,
                        StreamEnd::TunnelBroken {
                            kind: FailureKind::StreamReset,
                        },
                    );
                }
                self.metrics.hbone(
                    "ringtun_hbone_streams_total",
                    "role=\"server\",status=\"200\"",
                    1,
                );
                self.push_timer(
                    key,
                    now + self.state.config.node.timeouts.idle,
                    TimerKind::Idle,
                );
                self.flush_tunnel(tkey, now);
                self.drive_stream(key, now);
            }
            Err(errno) => {
                // 503 and the stream is over; the flow never opened.
                if let Some(t) = self.tunnel_mut(tkey) {
                    t.streams.remove(&sid);
                }
                self.answer_and_close(tkey, sid, 503);
                if let Some(sf) = self.stream_mut(key) {
                    sf.stream_gone = true;
                }
                self.finish_stream(
                    key,
                    StreamEnd::LocalBroken {
                        kind: FailureKind::from_connect_errno(errno),
                        errno,
                    },
                );
            }
        }
    }
}
