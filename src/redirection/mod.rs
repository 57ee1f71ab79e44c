//! Capture: the iptables/nftables rules that hand a workload's connections to ringtun, the
//! original destination of a captured socket, socket marks, and sockets made inside a pod's
//! network namespace.

pub mod cli;
pub mod netns;
pub mod original_dst;
pub mod rules;
