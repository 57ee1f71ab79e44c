//! The data plane: per-core reactors that accept captured connections, resolve the first
//! connection, and join the sockets with `splice(2)`. The driver layer is the only code that
//! touches io_uring or epoll; flows and pumps are the same state machines under both.

pub mod driver;
pub mod first_connection;
pub mod flow;
pub mod hbone_rules;
pub mod ktls;
pub mod listeners;
pub mod reactor;
pub mod record_layer;
pub mod socket;
pub mod splice;
pub mod stream_flow;
pub mod tls;
pub mod tunnel;
pub mod tunnel_io;
pub mod tunnel_pool;
