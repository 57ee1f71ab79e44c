//! HBONE tunnels: one mutual-TLS HTTP/2 connection to a peer node's port 15008, carrying one
//! CONNECT stream per proxied connection (DESIGN.md §4).
//!
//! [`connection::Tunnel`] is the object that owns a tunnel — socket, TLS, session, streams —
//! and turns events into actions for the reactor. Its parts: [`transport`] (the byte stream
//! after TLS, kernel or user space), [`streams`] (one stream and its local socket), [`sink`]
//! (a stream's one queue toward its socket), [`frames`] (zero-copy outgoing DATA frames),
//! [`error`]. Beside it: [`pool`] decides which tunnel a new outbound connection takes,
//! [`inbound_rules`] checks each CONNECT a peer sends and builds the ones we send. The HTTP/2
//! protocol itself is `hbone-proto`; TLS setup is [`crate::tls`].

pub mod connection;
pub mod error;
pub mod frames;
pub mod inbound_rules;
pub mod pool;
pub mod sink;
pub mod streams;
pub mod transport;

#[cfg(test)]
mod tests;
