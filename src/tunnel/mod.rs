//! HBONE tunnels: one mutual-TLS HTTP/2 connection to a peer node's port 15008, carrying one
//! CONNECT stream per proxied connection (DESIGN.md §4). `connection` is one tunnel, `io` moves
//! DATA frames between streams' local sockets and the tunnel, `pool` decides which tunnel a new
//! outbound connection takes, `inbound_rules` checks each CONNECT a peer sends, `stream_flow` is
//! a connection carried by a stream. The HTTP/2 protocol itself is `hbone-proto`; TLS is
//! [`crate::tls`].

pub mod connection;
pub mod inbound_rules;
pub mod io;
pub mod pool;
pub mod stream_flow;
