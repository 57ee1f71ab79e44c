//! Kernel feature probing: what the running kernel and this process's privileges give each
//! ringtun path (io_uring and its multishot flags, inline splice, kTLS, TPROXY, original
//! destination, SO_REUSEPORT, pipe sizing, SO_MARK), learned by trying each facility — never
//! from the kernel version — and reported by `ringtun probe [--json]`. Probes follow quinn-udp's
//! habit: try, classify the errno (ENOPROTOOPT/EOPNOTSUPP mean "unsupported", not an error),
//! degrade, and let callers remember. Every probe closes what it opens and is bounded in time.
//!
//! Other modules ask the narrow questions: [`io_uring_unavailable_reason`] (driver choice) and
//! [`ktls_support`] (tunnels). Probing is not data-path work; nothing here runs per flow.

pub(crate) mod ktls;
mod net;
mod report;
mod ring;
mod sys;

use std::io::Write;

pub use ktls::{ktls_support, KtlsCipher, KtlsReport, KtlsSupport, Rekey};
pub use report::{
    Availability, Driver, DriverReport, IoUringOpcodes, IoUringReport, KernelReport,
    OpenFilesLimit, OriginalDstReport, Status, TproxyReport, TproxyTarget,
};
pub use ring::io_uring_unavailable_reason;

/// What the reactors should run, decided once at start-up from a real probe of the ring.
#[derive(Debug, Clone)]
pub struct DriverDecision {
    pub driver: Driver,
    /// Multishot accept works (5.19+); otherwise the ring re-arms a single-shot accept.
    pub multishot_accept: bool,
    /// Why this driver: logged once and shown in `ringtun probe`.
    pub reason: String,
}

/// The `auto` choice: io_uring when a ring can be made with every opcode ringtun uses,
/// epoll otherwise, with the reason.
pub fn decide_driver() -> DriverDecision {
    let io = ring::probe_io_uring();
    let d = ring::choose_driver(&io);
    DriverDecision {
        driver: d.selected,
        multishot_accept: io.opcodes.accept_multishot,
        reason: d.reason,
    }
}

/// Why `io_uring_setup` failed, from its error, in words an operator can act on.
pub fn io_uring_setup_error(e: &std::io::Error) -> String {
    ring::setup_error_reason(sys::io_errno(e))
}

/// Runs every probe afresh and gathers the answers.
pub fn probe() -> KernelReport {
    let kernel_release = sys::kernel_release();
    let (soft, hard) = sys::nofile_limit().unwrap_or((0, 0));
    let io_uring = ring::probe_io_uring();
    let driver = ring::choose_driver(&io_uring);
    let tproxy = net::probe_tproxy(&kernel_release);
    KernelReport {
        open_files_limit: OpenFilesLimit { soft, hard },
        cap_sys_resource: sys::has_cap(sys::CAP_SYS_RESOURCE),
        cap_net_admin: sys::has_cap(sys::CAP_NET_ADMIN),
        io_uring,
        driver,
        splice: net::probe_splice(),
        ktls: ktls::probe_ktls(),
        tproxy,
        client_address: net::probe_client_address(),
        original_dst: net::probe_original_dst(),
        reuseport: net::probe_reuseport(),
        pipe_max_size: sys::read_u64("/proc/sys/fs/pipe-max-size"),
        pipe_user_pages_soft: sys::read_u64("/proc/sys/fs/pipe-user-pages-soft"),
        pipe_resize_1mib: net::probe_pipe_resize(),
        so_mark: net::probe_so_mark(),
        kernel_release,
    }
}

/// `ringtun probe`: prints the report as a table, or as one JSON object with `json`. Returns
/// the exit code: 0 once the report is printed (missing features are findings, not failures),
/// 1 if stdout cannot be written.
pub fn print_report(json: bool) -> i32 {
    let report = probe();
    let text = if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("ringtun probe: cannot encode the report as JSON: {e}");
                return 1;
            }
        }
    } else {
        report.to_table()
    };
    // writeln!, not println!: a closed pipe (`ringtun probe | head`) must not panic.
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0)
    }

    #[test]
    fn probe_twice_leaves_the_fd_table_unchanged() {
        // Other tests in this binary open fds on other threads at the same time, so one
        // mismatch may be theirs; a real leak shows on every attempt (the count keeps growing).
        let mut last = (0, 0);
        for _ in 0..8 {
            let before = open_fds();
            let _first = probe();
            let _second = probe();
            let after = open_fds();
            if before == after {
                return;
            }
            last = (before, after);
        }
        panic!(
            "fd count changed on every attempt: before {} after {}",
            last.0, last.1
        );
    }

    #[test]
    fn json_has_every_top_level_key() {
        let value = serde_json::to_value(probe()).expect("serialize");
        let object = value.as_object().expect("one JSON object");
        for key in [
            "kernel_release",
            "open_files_limit",
            "cap_sys_resource",
            "io_uring",
            "driver",
            "splice",
            "ktls",
            "tproxy",
            "client_address",
            "original_dst",
            "reuseport",
            "pipe_max_size",
            "pipe_user_pages_soft",
            "pipe_resize_1mib",
            "so_mark",
        ] {
            assert!(object.contains_key(key), "missing {key} in {value}");
        }
        for op in [
            "accept",
            "accept_multishot",
            "connect",
            "poll_add",
            "poll_add_multishot",
            "poll_remove",
            "async_cancel",
            "timeout",
            "link_timeout",
            "splice",
        ] {
            assert!(value["io_uring"]["opcodes"][op].is_boolean(), "opcode {op}");
        }
    }

    #[test]
    fn open_files_limit_matches_getrlimit() {
        let limit = probe().open_files_limit;
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .expect("getrlimit");
        assert_eq!((limit.soft, limit.hard), (soft, hard));
    }

    #[test]
    fn driver_follows_ring_availability() {
        let r = probe();
        if !r.io_uring.available {
            assert_eq!(r.driver.selected, Driver::Epoll);
        }
        assert_eq!(
            r.io_uring.available,
            io_uring_unavailable_reason().is_none()
        );
    }

    #[test]
    fn table_gives_every_fallback_a_reason() {
        let r = probe();
        let table = r.to_table();
        assert!(table.contains("kTLS TX"));
        if let Some(why) = &r.ktls.support.reason {
            assert!(table.contains(why.as_str()), "{table}");
        }
        assert!(!table.contains("fallback: \n") && !table.contains("unavailable: \n"));
    }
}
