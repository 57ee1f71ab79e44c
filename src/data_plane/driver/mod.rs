//! Readiness drivers: the only code that talks to io_uring or epoll. A reactor asks a driver to
//! accept on listeners, connect sockets, watch sockets for readiness and sleep until a deadline;
//! the driver answers with [`Event`]s. Both drivers run the same connection state machines, so the
//! data path behaves the same whichever one the kernel allows.
//!
//! Bytes never move through a driver: `splice(2)` is called inline by the flow after readiness.

pub mod backoff;
pub mod epoll;
pub mod interface;
pub mod plan;
pub mod token;
pub mod uring;

// Declarations and re-exports only: the drivers implement `interface`, and `plan` constructs
// them, so nothing here may be defined that they use (see tests/layout).
pub use interface::{armed_bit, Driver, DriverKind, Event, FlowKey, Interest, Side};
pub use plan::{create, plan, DriverPlan};
