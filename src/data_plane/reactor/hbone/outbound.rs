//! Outbound: flows checked out of the per-reactor tunnel pool, client tunnels opened from the
//! source pod's namespace, CONNECT streams opened on them.

use super::*;

impl Reactor {
    /// A captured connection whose route is an HBONE tunnel: queue it on the pool.
    pub(in crate::data_plane::reactor) fn start_outbound_stream(
        &mut self,
        fd: OwnedFd,
        res: Resolution,
        mut record: FlowRecord,
        netns: Option<NetNs>,
        now: Instant,
    ) {
        let Some(h) = self.hbone.as_ref() else {
            if !self.warned_tunnel {
                self.warned_tunnel = true;
                log::warn!(
                    "reactor {}: {} needs an HBONE tunnel but node.tls is not configured; such \
                     connections are refused (hbone_tunnel_unavailable)",
                    self.id,
                    record.destination
                );
            }
            return self.refuse(fd, FailureKind::TunnelUnavailable, None, record, now);
        };
        let oc = match outbound_connect(&self.state.registry, &res, record.client) {
            Ok(oc) => oc,
            Err(e) => {
                log::warn!(
                    "reactor {}: no CONNECT for {}: {e}",
                    self.id,
                    record.destination
                );
                return self.refuse(fd, FailureKind::TunnelUnavailable, None, record, now);
            }
        };
        if !h.creds.client.contains_key(&oc.source_identity) {
            log::warn!(
                "reactor {}: no certificate for {} (source of {}); refused",
                self.id,
                oc.source_identity,
                record.destination
            );
            return self.refuse(fd, FailureKind::TunnelUnavailable, None, record, now);
        }
        record.upstream = res.upstream;
        let _ = socket::set_nodelay(fd.as_raw_fd());
        let counters = self
            .metrics
            .tcp_counters(crate::data_plane::reactor::tcp_labels(&res, &self.state));
        let raw = fd.as_raw_fd();
        let key = self.insert_stream(|key| {
            let mut sf = StreamFlow::new(
                key,
                fd,
                Side::Downstream,
                StreamPhase::WaitingTunnel,
                counters,
                record,
                now,
            );
            sf.request = Some(oc.request.clone());
            sf.target = Some(TunnelTarget {
                peer: oc.peer,
                source: res.source.expect("outbound_connect checked the source"),
                source_id: oc.source_identity.clone(),
                expected: oc.expected_identity.clone(),
                netns: netns.clone(),
            });
            sf
        });
        if let Err(e) = self.driver.register(key, Side::Downstream, raw) {
            log::warn!("reactor {}: cannot watch a captured socket: {e}", self.id);
            return self.finish_stream(
                key,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::SocketSetup,
                },
            );
        }
        self.push_timer(
            key,
            now + self.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
        self.checkout(key, &oc.pool_key(), now);
    }

    /// Takes a stream for the flow from the pool: on an open tunnel now, on a connecting one
    /// later, or on a new tunnel to the flow's target.
    pub(in crate::data_plane::reactor) fn checkout(
        &mut self,
        key: FlowKey,
        pool_key: &PoolKey,
        now: Instant,
    ) {
        let checkout = self.hbone_state().pool.checkout(pool_key, key, now);
        let outcome = match checkout {
            Checkout::Reuse(_) => "reuse",
            Checkout::Open(_) => "open",
            Checkout::Wait(_) => "wait",
            Checkout::Refuse(_) => "refuse",
        };
        self.metrics.hbone(
            "ringtun_hbone_pool_total",
            &format!("outcome=\"{outcome}\""),
            1,
        );
        let broken = |kind| StreamEnd::TunnelBroken { kind };
        match checkout {
            Checkout::Reuse(tid) => {
                self.set_pool(key, tid, true);
                match self.hbone_state().by_pool_id.get(&tid).copied() {
                    Some(tkey) => self.open_stream_on(key, tkey, now),
                    None => self.finish_stream(key, broken(FailureKind::TunnelFailed)),
                }
            }
            Checkout::Wait(tid) => self.set_pool(key, tid, false),
            Checkout::Open(tid) => {
                self.set_pool(key, tid, false);
                let Some(tt) = self.stream_mut(key).and_then(|sf| sf.target.clone()) else {
                    return self.pool_tunnel_failed(tid);
                };
                let peer = tt.peer;
                if let Err(e) = self.start_client_tunnel(tid, tt, now) {
                    log::warn!("reactor {}: cannot open a tunnel to {peer}: {e}", self.id);
                    self.pool_tunnel_failed(tid);
                }
            }
            Checkout::Refuse(r) => {
                log::warn!(
                    "reactor {}: tunnel pool refused a flow: {}",
                    self.id,
                    r.label()
                );
                self.finish_stream(key, broken(FailureKind::TunnelPoolFull));
            }
        }
    }

    pub(in crate::data_plane::reactor) fn set_pool(
        &mut self,
        key: FlowKey,
        tid: TunnelId,
        reserved: bool,
    ) {
        if let Some(sf) = self.stream_mut(key) {
            sf.pool_id = Some(tid);
            sf.reserved = reserved;
        }
    }

    pub(in crate::data_plane::reactor) fn start_client_tunnel(
        &mut self,
        tid: TunnelId,
        target: TunnelTarget,
        now: Instant,
    ) -> io::Result<()> {
        let TunnelTarget {
            peer,
            source,
            source_id,
            expected,
            netns,
        } = target;
        let h = self.hbone.as_mut().expect("hbone configured");
        let cfg = match h.client_configs.get(&(source_id.clone(), expected.clone())) {
            Some(c) => Arc::clone(c),
            None => {
                let client = h
                    .creds
                    .client
                    .get(&source_id)
                    .ok_or_else(|| io::Error::other("no client certificate"))?;
                let c = client.config_for(&expected).map_err(io::Error::other)?;
                h.client_configs
                    .insert((source_id.clone(), expected.clone()), Arc::clone(&c));
                c
            }
        };
        let conn =
            ClientConnection::new(cfg, tls::server_name(peer.ip())).map_err(io::Error::other)?;
        let mark = self.state.config.node.socket_mark;
        let fd = in_netns(netns.as_ref(), || socket::outbound_socket(&peer, mark))??;
        let raw = fd.as_raw_fd();
        let budget = self.hbone_state().record_budget;
        let tkey = self.insert_tunnel(|key| {
            Tunnel::new(
                key,
                fd,
                Role::Client {
                    pool_id: tid,
                    peer,
                    expected,
                    source,
                },
                Connection::Client(conn),
                budget,
                now,
            )
        });
        self.hbone_state().by_pool_id.insert(tid, tkey);
        self.metrics
            .hbone("ringtun_hbone_handshakes_total", "role=\"client\"", 1);
        self.push_timer(
            tkey,
            now + self.state.config.node.timeouts.connect,
            TimerKind::Connect,
        );
        let started = self
            .driver
            .connect(tkey, raw, peer)
            .and_then(|_| self.driver.register(tkey, Side::Upstream, raw));
        if let Err(e) = started {
            self.fail_tunnel(tkey, TunnelError::new("connect", e.to_string()));
        }
        Ok(())
    }

    /// The pool gave up on a tunnel that never got a slab entry: reset its waiters.
    pub(in crate::data_plane::reactor) fn pool_tunnel_failed(&mut self, tid: TunnelId) {
        let failed = self.hbone_state().pool.tunnel_failed(tid);
        if let Ok(failed) = failed {
            for w in failed.waiters {
                self.finish_stream(
                    w,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                );
            }
        }
    }

    /// Sends the flow's CONNECT on an open tunnel.
    pub(in crate::data_plane::reactor) fn open_stream_on(
        &mut self,
        key: FlowKey,
        tkey: FlowKey,
        now: Instant,
    ) {
        let Some(request) = self.stream_mut(key).and_then(|sf| sf.request.take()) else {
            return;
        };
        let opened = match self.tunnel_mut(tkey) {
            Some(t) if t.phase == Phase::Open => t
                .session
                .as_mut()
                .map(|s| s.open_stream(&request).map_err(|e| e.to_string())),
            _ => None,
        };
        match opened {
            Some(Ok(sid)) => {
                if let Some(t) = self.tunnel_mut(tkey) {
                    t.streams.insert(sid, key);
                }
                if let Some(sf) = self.stream_mut(key) {
                    sf.stream = Some(sid);
                    sf.tunnel = Some(tkey);
                    sf.phase = StreamPhase::AwaitingResponse;
                }
                self.flush_tunnel(tkey, now);
            }
            Some(Err(e)) => {
                log::warn!("reactor {}: cannot open a stream: {e}", self.id);
                self.finish_stream(
                    key,
                    StreamEnd::TunnelBroken {
                        kind: FailureKind::TunnelFailed,
                    },
                );
            }
            None => self.finish_stream(
                key,
                StreamEnd::TunnelBroken {
                    kind: FailureKind::TunnelFailed,
                },
            ),
        }
    }

    /// Checks a flow out of the pool again (its tunnel drained or allowed fewer streams).
    pub(in crate::data_plane::reactor) fn retry_checkout(&mut self, key: FlowKey, now: Instant) {
        let Some(tt) = self.stream_mut(key).and_then(|sf| sf.target.clone()) else {
            return;
        };
        let pool_key = PoolKey {
            source: tt.source_id,
            peer: tt.peer,
            expected: tt.expected,
        };
        self.checkout(key, &pool_key, now);
    }

    /// Acts on the pool's decisions: tunnels it let go are closed.
    pub(in crate::data_plane::reactor) fn process_pool_events(&mut self, _now: Instant) {
        loop {
            let Some(h) = self.hbone.as_mut() else { return };
            let Some(PoolEvent::Close { tunnel, reason }) = h.pool.poll_event() else {
                return;
            };
            let Some(tkey) = h.by_pool_id.get(&tunnel).copied() else {
                continue;
            };
            log::debug!(
                "reactor {}: closing pooled tunnel ({})",
                self.id,
                reason.label()
            );
            self.close_tunnel(tkey, Some(reason.label()));
        }
    }
}
