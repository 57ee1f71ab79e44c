//! Facts about this process the kernel holds: who it runs as, its open-file limit, and the
//! clock tick `/proc/<pid>/stat` counts CPU time in.

use std::io;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use super::io_error;

/// Running with effective uid 0.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `RLIMIT_NOFILE`: (soft, hard).
pub fn open_files_limit() -> io::Result<(u64, u64)> {
    getrlimit(Resource::RLIMIT_NOFILE).map_err(io_error)
}

/// Sets `RLIMIT_NOFILE`; raising the soft limit up to the hard one needs no privilege.
pub fn set_open_files_limit(soft: u64, hard: u64) -> io::Result<()> {
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(io_error)
}

/// Clock ticks per second (`_SC_CLK_TCK`), the unit of `/proc/<pid>/stat`'s CPU times.
/// Pins the calling thread to `cpu` (`sched_setaffinity`).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(io_error)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(io_error)
}

pub fn clock_ticks_per_second() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as u64,
        // Linux has reported 100 on every architecture since 2.6 (USER_HZ).
        _ => 100,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_reads_back_as_set() {
        let (soft, hard) = open_files_limit().unwrap();
        assert!(soft <= hard);
        set_open_files_limit(soft, hard).unwrap();
        assert_eq!(open_files_limit().unwrap(), (soft, hard));
        assert_eq!(clock_ticks_per_second(), 100);
    }
}
