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

/// Descriptors one flow holds: its two sockets (a tunnel stream holds one; a tunnel counts as a
/// flow). Pipes are not per flow: each reactor has a fixed budget of them
/// (`splice.pipes_per_reactor`), lent to flows only while bytes are in flight. The reactors'
/// flow limit is what the open-file limit leaves after the pipes, divided by this
/// (`app::reactor_budget`); `ringtun probe` reports the same arithmetic.
pub const FDS_PER_FLOW: u64 = 2;
