//! Test fixtures for TLS: a development CA and credentials for any identity, client and
//! server configs as the tunnels build them, and a real handshake between two non-blocking
//! loopback sockets.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::{ClientConfig, ServerConfig};

use super::handshake::{Established, Handshake, HandshakeError, Progress};
use super::{server_config, server_name, ClientTls};
use crate::control_plane::certs::{
    DevCa, TrustBundle, WorkloadCredentials, CA_VALIDITY, DEFAULT_LEAF_VALIDITY,
};
use crate::control_plane::identity::SpiffeId;

pub(crate) struct Pki {
    pub ca: DevCa,
    pub bundle: TrustBundle,
}

impl Pki {
    pub(crate) fn new(trust_domain: &str) -> Self {
        let ca = DevCa::generate(trust_domain, SystemTime::now(), CA_VALIDITY).expect("ca");
        let bundle = ca.trust_bundle(Path::new("test-ca.pem")).expect("bundle");
        Self { ca, bundle }
    }

    pub(crate) fn creds(&self, id: &str) -> WorkloadCredentials {
        let id = SpiffeId::parse(id).expect("test id");
        self.ca
            .issue(&id, SystemTime::now(), DEFAULT_LEAF_VALIDITY)
            .expect("leaf")
            .credentials(&id)
    }
}

pub(crate) const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
pub(crate) const SERVER: &str = "spiffe://cluster.local/ns/prod/sa/server";

pub(crate) fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("test id")
}

/// A client config for `creds` expecting `expected`, and a server config for `server`.
pub(crate) fn configs(
    pki: &Pki,
    client: &WorkloadCredentials,
    server: &WorkloadCredentials,
    expected: &str,
) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
    let client = ClientTls::new(client, &pki.bundle)
        .expect("client tls")
        .config_for(&id(expected))
        .expect("client config");
    let server = server_config(server, &pki.bundle, "cluster.local").expect("server config");
    (client, server)
}

/// One end of a test handshake: how it ended, and its socket.
pub(crate) type HandedOver = (Result<Established, HandshakeError>, TcpStream);

/// Runs both ends of a handshake on non-blocking sockets, polling, until both are done.
pub(crate) fn handshake_pair(
    cc: Arc<ClientConfig>,
    sc: Arc<ServerConfig>,
    before_finish: impl FnOnce(&TcpStream, &TcpStream),
) -> (HandedOver, HandedOver) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client_sock = TcpStream::connect(addr).expect("connect");
    let (server_sock, _) = listener.accept().expect("accept");
    client_sock.set_nonblocking(true).unwrap();
    server_sock.set_nonblocking(true).unwrap();
    let mut client = Some(Handshake::client(
        UnbufferedClientConnection::new(cc, server_name(addr.ip())).expect("client"),
    ));
    let mut server = Some(Handshake::server(
        UnbufferedServerConnection::new(sc).expect("server"),
    ));
    let (mut c_done, mut s_done) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c_done.is_none() || s_done.is_none() {
        assert!(Instant::now() < deadline, "handshake stuck");
        for (hs, fd, done) in [
            (&mut client, client_sock.as_raw_fd(), &mut c_done),
            (&mut server, server_sock.as_raw_fd(), &mut s_done),
        ] {
            if let Some(h) = hs.as_mut() {
                match h.advance(fd) {
                    Ok(Progress::Done) => *done = Some(Ok(hs.take().expect("present"))),
                    Ok(_) => {}
                    Err(e) => {
                        *done = Some(Err(e));
                        *hs = None;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    before_finish(&client_sock, &server_sock);
    let finish =
        |r: Option<Result<Handshake, HandshakeError>>| r.expect("done").and_then(Handshake::finish);
    ((finish(c_done), client_sock), (finish(s_done), server_sock))
}
