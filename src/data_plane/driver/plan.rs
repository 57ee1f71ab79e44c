//! Which driver a reactor runs: the configured choice checked against what the kernel offers
//! (probed once per process), and the construction of the chosen driver on each reactor
//! thread, falling back to epoll where `auto` allows it.

use std::io;

use super::epoll::EpollDriver;
use super::interface::Driver;
use super::uring::UringDriver;
use crate::control_plane::config::DriverChoice;

/// What one reactor should run, decided once per process (see [`plan`]).
#[derive(Debug, Clone)]
pub enum DriverPlan {
    IoUring {
        multishot_accept: bool,
        fall_back: bool,
    },
    Epoll {
        reason: String,
    },
}

/// Turns the configured choice into a plan, probing the ring once. A forced `io_uring` that the
/// kernel cannot give is an error; `auto` falls back to epoll and says why.
pub fn plan(choice: DriverChoice) -> Result<(DriverPlan, String), String> {
    use crate::kernel_features::{decide_driver, Driver as Probed};
    match choice {
        DriverChoice::Epoll => Ok((
            DriverPlan::Epoll {
                reason: "forced by configuration".into(),
            },
            "forced by configuration".into(),
        )),
        DriverChoice::IoUring | DriverChoice::Auto => {
            let d = decide_driver();
            match (d.driver, choice) {
                (Probed::IoUring, _) => Ok((
                    DriverPlan::IoUring {
                        multishot_accept: d.multishot_accept,
                        fall_back: choice == DriverChoice::Auto,
                    },
                    d.reason,
                )),
                (Probed::Epoll, DriverChoice::Auto) => Ok((
                    DriverPlan::Epoll {
                        reason: d.reason.clone(),
                    },
                    d.reason,
                )),
                (Probed::Epoll, _) => Err(format!(
                    "io_uring was asked for but is unusable: {}",
                    d.reason
                )),
            }
        }
    }
}

/// Creates one reactor's driver from the plan; if the ring cannot be set up on this thread
/// (memory limits can differ from the probe's), `auto` still falls back to epoll.
pub fn create(plan: &DriverPlan, entries: u32) -> io::Result<(Box<dyn Driver>, Option<String>)> {
    match plan {
        DriverPlan::Epoll { reason } => Ok((Box::new(EpollDriver::new()?), Some(reason.clone()))),
        DriverPlan::IoUring {
            multishot_accept,
            fall_back,
        } => match UringDriver::new(entries, *multishot_accept) {
            Ok(d) => {
                // One line per reactor (the logger names the thread): which request modes
                // this ring runs; `ringtun_io_uring_accepts_total{mode}` counts what they did.
                log::info!("{}", uring_modes(*multishot_accept));
                Ok((Box::new(d), None))
            }
            Err(e) if *fall_back => {
                let reason = crate::kernel_features::io_uring_setup_error(&e);
                Ok((Box::new(EpollDriver::new()?), Some(reason)))
            }
            Err(e) => Err(io::Error::new(
                e.kind(),
                crate::kernel_features::io_uring_setup_error(&e),
            )),
        },
    }
}

/// The io_uring driver's request modes, as its start-up line states them. Readiness is a
/// one-shot `PollAdd` on every kernel, also where multishot poll exists (5.13+): the flows
/// rely on its level check when armed (`Driver::arming_checks_level`).
fn uring_modes(multishot_accept: bool) -> &'static str {
    if multishot_accept {
        "io_uring driver: multishot accept (one request per listener keeps accepting); \
         readiness by one-shot PollAdd, re-armed per event"
    } else {
        "io_uring driver: single-shot accept, re-armed after every connection (the kernel \
         refused multishot accept, which arrived in 5.19); readiness by one-shot PollAdd, \
         re-armed per event"
    }
}
