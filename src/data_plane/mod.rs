//! The data plane: per-core reactors that accept captured connections, resolve the first
//! connection, and join the sockets with `splice(2)`. The driver layer is the only code that
//! touches io_uring or epoll; flows and pumps are the same state machines under both.

pub mod authorization;
pub mod client_address;
pub mod driver;
pub mod first_connection;
pub mod flow;
pub mod listeners;
pub mod reactor;
pub mod snapshot;
pub mod socket;
pub mod splice;
pub mod timer;

/// Descriptors one flow holds at most: two sockets and two pipes (two descriptors each). The
/// reactors' flow limit is the open-file limit divided by this, and `ringtun probe` reports
/// the same arithmetic.
pub const FDS_PER_FLOW: u64 = 6;
