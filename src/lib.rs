//! ringtun: a node proxy for ambient-style service meshes.
//!
//! The tree follows the packet: [`redirection`] captures a workload's connections into the
//! proxy, [`data_plane`] accepts them on per-core reactors, resolves the first connection with
//! [`control_plane`] state and joins the sockets with `splice(2)`; [`observability`] and
//! [`admin`] report what happened; [`lifecycle`] starts and drains the whole; [`kernel_features`]
//! says which kernel facilities each path will get; [`sys`] is the one place that calls the OS
//! below std. `ARCHITECTURE.md` has the thread and port map.
//!
//! `unsafe` is denied everywhere but in [`sys`] and the modules below that say why they still
//! have it. The `ringtun` binary (the command line and the demo) is a separate crate over this
//! library's public API; `testbed` is test support for it and `tests/`, hidden from the docs.

#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod control_plane;
pub mod data_plane;
pub mod exit_code;
#[doc(hidden)]
pub mod fuzzing;
// Not yet behind `sys`: the kernel-matrix work edits these probes now; they move into `sys`
// after it lands.
#[allow(unsafe_code)]
pub mod kernel_features;
pub mod lifecycle;
pub mod observability;
pub mod redirection;
#[allow(unsafe_code)]
pub mod sys;
#[doc(hidden)]
pub mod testbed;
pub mod tls;
pub mod tunnel;
