//! ringtun: a node proxy for ambient-style service meshes.
//!
//! The tree follows the packet: [`redirection`] captures a workload's connections into the
//! proxy, [`data_plane`] accepts them on per-core reactors, resolves the first connection with
//! [`control_plane`] state and joins the sockets with `splice(2)`; [`observability`] and
//! [`admin`] report what happened; [`lifecycle`] starts and drains the whole; [`kernel_features`]
//! says which kernel facilities each path will get. `ARCHITECTURE.md` has the thread and port map.

pub mod admin;
pub mod app;
pub mod control_plane;
pub mod data_plane;
pub mod exit_code;
pub mod kernel_features;
pub mod lifecycle;
pub mod observability;
pub mod redirection;
#[doc(hidden)]
pub mod testbed;
pub mod tls;
pub mod tunnel;
