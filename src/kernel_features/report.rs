//! The shape of `ringtun probe`: the [`KernelReport`] every probe fills in, its JSON form
//! (serde, one object) and its table form (one row per facility with an
//! "ok / fallback: … / unavailable: why" column). This file only describes and renders; the
//! probing lives in the sibling modules.

use std::fmt;

use serde::Serialize;

use super::ktls::KtlsReport;
use super::KtlsCipher;

/// Everything ringtun learned about the kernel it runs on, in one serialisable value.
#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    /// `uname -r`.
    pub kernel_release: String,
    /// RLIMIT_NOFILE: every flow holds four fds (two sockets, a pipe pair), so this caps flows.
    pub open_files_limit: OpenFilesLimit,
    /// Whether the process may raise limits (pipe sizes beyond pipe-max-size, RLIMIT_NOFILE).
    pub cap_sys_resource: bool,
    /// Needed for IP_TRANSPARENT, SO_MARK and loading the tls module on demand.
    pub cap_net_admin: bool,
    pub io_uring: IoUringReport,
    pub driver: DriverReport,
    /// Inline `splice(2)` socket → pipe → socket: the data path's fast path.
    pub splice: Availability,
    pub ktls: KtlsReport,
    pub tproxy: TproxyReport,
    /// Inbound connections can reach applications in this namespace from the client's
    /// address: IP_TRANSPARENT, and the capture rules route the replies back
    /// (`node.deliver_client_address`).
    pub client_address: Availability,
    pub original_dst: OriginalDstReport,
    /// SO_REUSEPORT, which gives every reactor its own listener on the same port.
    pub reuseport: Availability,
    /// `/proc/sys/fs/pipe-max-size` in bytes, if readable.
    pub pipe_max_size: Option<u64>,
    /// `/proc/sys/fs/pipe-user-pages-soft` in pages, if readable (0 = no limit).
    pub pipe_user_pages_soft: Option<u64>,
    /// Whether F_SETPIPE_SZ to 1 MiB succeeded on a fresh pipe.
    pub pipe_resize_1mib: Availability,
    /// SO_MARK 0x539, which keeps the proxy's own traffic out of the capture rules.
    pub so_mark: Availability,
}

/// Soft and hard RLIMIT_NOFILE; `u64::MAX` means unlimited (RLIM_INFINITY).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct OpenFilesLimit {
    pub soft: u64,
    pub hard: u64,
}

/// A yes/no facility and, when no, why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Availability {
    pub available: bool,
    pub reason: Option<String>,
}

impl Availability {
    pub fn yes() -> Self {
        Self {
            available: true,
            reason: None,
        }
    }

    pub fn no(reason: impl Into<String>) -> Self {
        Self {
            available: false,
            reason: Some(reason.into()),
        }
    }
}

/// What io_uring offers this process.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IoUringReport {
    /// A ring could be created.
    pub available: bool,
    /// Why not, from io_uring_setup's errno.
    pub reason: Option<String>,
    /// `kernel.io_uring_disabled` (0 allowed, 1 io_uring_group only, 2 nobody), if readable.
    pub io_uring_disabled: Option<u64>,
    pub opcodes: IoUringOpcodes,
    /// Anything odd seen while probing (a probe that could not decide, a failed register).
    pub notes: Vec<String>,
}

/// Support for each operation ringtun submits. `accept_multishot` and `poll_add_multishot` are
/// request flags, proven by submitting them; the rest come from IORING_REGISTER_PROBE.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct IoUringOpcodes {
    pub accept: bool,
    pub accept_multishot: bool,
    pub connect: bool,
    pub poll_add: bool,
    pub poll_add_multishot: bool,
    pub poll_remove: bool,
    pub async_cancel: bool,
    pub timeout: bool,
    pub link_timeout: bool,
    /// Reported for completeness only: DESIGN.md §2 keeps IORING_OP_SPLICE off the data path.
    pub splice: bool,
}

/// The reactor driver ringtun's `auto` choice would pick.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    IoUring,
    Epoll,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DriverReport {
    pub selected: Driver,
    pub reason: String,
}

/// Whether a TPROXY'd inbound connection can be accepted.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TproxyReport {
    /// IP_TRANSPARENT could be set and the TPROXY target is present or loadable.
    pub available: bool,
    /// IP_TRANSPARENT setsockopt succeeded (needs CAP_NET_ADMIN).
    pub ip_transparent: bool,
    pub ip_transparent_reason: Option<String>,
    pub target: TproxyTarget,
    /// Where `target` was read from.
    pub target_evidence: String,
}

/// What the system says about the iptables TPROXY target / nft tproxy expression.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TproxyTarget {
    /// Registered right now (loaded module or built in).
    Present,
    /// Not registered, but a module file exists and iptables will load it on first use.
    Loadable,
    /// Nothing found in any place we looked.
    Unknown,
}

impl fmt::Display for TproxyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TproxyTarget::Present => "present",
            TproxyTarget::Loadable => "loadable",
            TproxyTarget::Unknown => "unknown",
        })
    }
}

/// SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST, needed by the outbound (REDIRECT) capture.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OriginalDstReport {
    /// Same as `ipv4.available`: outbound capture works for IPv4.
    pub available: bool,
    pub ipv4: Availability,
    pub ipv6: Availability,
}

/// The table's last column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    Fallback(String),
    Unavailable(String),
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Ok => f.write_str("ok"),
            Status::Fallback(how) => write!(f, "fallback: {how}"),
            Status::Unavailable(why) => write!(f, "unavailable: {why}"),
        }
    }
}

/// Widest the detail column is padded to.
const MAX_DETAIL_WIDTH: usize = 60;

fn status_of(a: &Availability, fallback: Option<&str>) -> Status {
    match (a.available, fallback) {
        (true, _) => Status::Ok,
        (false, Some(how)) => Status::Fallback(format!(
            "{how} ({})",
            a.reason.as_deref().unwrap_or("not supported")
        )),
        (false, None) => {
            Status::Unavailable(a.reason.clone().unwrap_or_else(|| "not supported".into()))
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn limit_text(n: u64) -> String {
    if n == u64::MAX {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

impl KernelReport {
    /// One `(facility, detail, status)` row per line of the human table.
    pub fn rows(&self) -> Vec<(String, String, Status)> {
        let mut rows: Vec<(String, String, Status)> = Vec::new();
        let mut row = |name: &str, detail: String, status: Status| {
            rows.push((name.to_owned(), detail, status));
        };

        row("kernel release", self.kernel_release.clone(), Status::Ok);
        let nofile = self.open_files_limit;
        // What the data path spends per flow: its two sockets (pipes are a per-reactor budget,
        // lent only while bytes are in flight; `run` logs the exact split).
        let per_flow = crate::data_plane::FDS_PER_FLOW;
        row(
            "open files (RLIMIT_NOFILE)",
            format!(
                "soft {}, hard {} (~{} flows at {per_flow} fds each, less the pipe budget)",
                limit_text(nofile.soft),
                limit_text(nofile.hard),
                if nofile.soft == u64::MAX {
                    "unlimited".into()
                } else {
                    (nofile.soft / per_flow).to_string()
                }
            ),
            Status::Ok,
        );
        row(
            "CAP_SYS_RESOURCE",
            yes_no(self.cap_sys_resource).into(),
            Status::Ok,
        );
        row(
            "CAP_NET_ADMIN",
            yes_no(self.cap_net_admin).into(),
            Status::Ok,
        );

        let io = &self.io_uring;
        let sysctl = io
            .io_uring_disabled
            .map_or("sysctl unreadable".to_owned(), |v| {
                format!("io_uring_disabled={v}")
            });
        row(
            "io_uring",
            sysctl,
            if io.available {
                Status::Ok
            } else {
                Status::Fallback(format!(
                    "epoll driver ({})",
                    io.reason.as_deref().unwrap_or("ring setup failed")
                ))
            },
        );
        let ops = &io.opcodes;
        let op_rows: [(&str, bool, Option<&str>); 10] = [
            ("accept", ops.accept, None),
            (
                "accept multishot",
                ops.accept_multishot,
                Some("single-shot accept re-armed per connection"),
            ),
            ("connect", ops.connect, None),
            ("poll_add", ops.poll_add, None),
            ("poll_add multishot", ops.poll_add_multishot, None),
            ("poll_remove", ops.poll_remove, None),
            ("async_cancel", ops.async_cancel, None),
            ("timeout", ops.timeout, None),
            ("link_timeout", ops.link_timeout, None),
            ("splice (IORING_OP)", ops.splice, None),
        ];
        for (name, supported, fallback) in op_rows {
            let status = match (io.available, supported, fallback, name) {
                (false, _, _, _) => Status::Unavailable("no io_uring".into()),
                (true, true, _, _) => Status::Ok,
                (true, false, Some(how), _) => Status::Fallback(how.into()),
                (true, false, None, "splice (IORING_OP)" | "poll_add multishot") => {
                    Status::Unavailable("not supported; unused by design".into())
                }
                (true, false, None, _) => Status::Unavailable("opcode not supported".into()),
            };
            let detail = if name.starts_with("splice") {
                "not used: inline splice(2) instead (DESIGN §2)".to_owned()
            } else if name == "poll_add multishot" {
                "not used: one-shot PollAdd re-armed per event, by design".to_owned()
            } else if name == "accept multishot" && supported {
                "used: one accept request per listener".to_owned()
            } else {
                String::new()
            };
            row(&format!("  {name}"), detail, status);
        }
        for note in &io.notes {
            row("  note", note.clone(), Status::Ok);
        }

        let driver = &self.driver;
        // The reason goes in the status column for epoll so the detail column stays narrow.
        match driver.selected {
            Driver::IoUring => row("driver", format!("io_uring: {}", driver.reason), Status::Ok),
            Driver::Epoll => row(
                "driver",
                "epoll".into(),
                Status::Fallback(format!("epoll readiness driver ({})", driver.reason)),
            ),
        }

        row(
            "splice(2)",
            "socket -> pipe -> socket, non-blocking".into(),
            status_of(&self.splice, Some("user-space copy")),
        );

        let report = &self.ktls;
        let k = &report.support;
        let user_tls = "user-space TLS (ringtun's record layer)";
        let ktls_status = |ok: bool| match (ok, &k.reason) {
            (true, _) => Status::Ok,
            (false, Some(why)) => Status::Fallback(format!("{user_tls}; {why}")),
            (false, None) => Status::Fallback(user_tls.into()),
        };
        row("kTLS TX", "TCP_ULP tls + TLS_TX".into(), ktls_status(k.tx));
        row("kTLS RX", "TLS_RX".into(), ktls_status(k.rx));
        // Each direction's ciphers, as the kernel answered them one by one.
        let names = |list: &[KtlsCipher]| {
            if list.is_empty() {
                "none".to_owned()
            } else {
                list.iter().map(|c| c.name()).collect::<Vec<_>>().join(", ")
            }
        };
        for (name, list) in [
            ("kTLS TX ciphers", &k.ciphers),
            ("kTLS RX ciphers", &k.rx_ciphers),
        ] {
            let refused: Vec<&str> = report
                .refusals
                .iter()
                .filter(|r| {
                    r.contains(if name.contains("TX") {
                        " TLS_TX: "
                    } else {
                        " TLS_RX: "
                    })
                })
                .map(String::as_str)
                .collect();
            row(
                name,
                names(list),
                match (k.tx || k.rx, refused.is_empty()) {
                    (false, _) => Status::Unavailable("no kTLS".into()),
                    (true, true) => Status::Ok,
                    (true, false) => {
                        Status::Unavailable(format!("refused: {}", refused.join("; ")))
                    }
                },
            );
        }
        // What an HBONE tunnel gets for each suite it may negotiate.
        let per_cipher: Vec<String> = [KtlsCipher::Aes128Gcm, KtlsCipher::Aes256Gcm]
            .iter()
            .map(|c| {
                let mode = if k.offloads(*c) {
                    "kTLS, spliced payload"
                } else {
                    "user space"
                };
                format!("{}: {mode}", c.name())
            })
            .collect();
        let all_kernel = k.offloads(KtlsCipher::Aes128Gcm) && k.offloads(KtlsCipher::Aes256Gcm);
        row(
            "HBONE tunnels",
            per_cipher.join("; "),
            if all_kernel {
                Status::Ok
            } else {
                Status::Fallback(user_tls.into())
            },
        );
        row(
            "kTLS rekey (TLS 1.3 KeyUpdate)",
            format!("TX {}, RX {}", report.rekey_tx, report.rekey_rx),
            match k.rekey {
                super::ktls::Rekey::Supported => Status::Ok,
                _ => Status::Fallback("rotate tunnels before the AES-GCM record limit".into()),
            },
        );
        row("  rekey attempt", report.rekey_evidence.clone(), Status::Ok);

        let t = &self.tproxy;
        row(
            "tproxy IP_TRANSPARENT",
            String::new(),
            if t.ip_transparent {
                Status::Ok
            } else {
                Status::Unavailable(
                    t.ip_transparent_reason
                        .clone()
                        .unwrap_or_else(|| "not supported".into()),
                )
            },
        );
        row(
            "tproxy target",
            format!("{} ({})", t.target, t.target_evidence),
            match t.target {
                TproxyTarget::Present | TproxyTarget::Loadable => Status::Ok,
                TproxyTarget::Unknown => Status::Unavailable(
                    "TPROXY target not found (iptables loads it on first use if the kernel has it)"
                        .into(),
                ),
            },
        );
        row(
            "client address to applications",
            "in this namespace".into(),
            status_of(
                &self.client_address,
                Some("applications see the workload's own address"),
            ),
        );
        row(
            "SO_ORIGINAL_DST (IPv4)",
            String::new(),
            status_of(&self.original_dst.ipv4, None),
        );
        row(
            "IP6T_SO_ORIGINAL_DST (IPv6)",
            String::new(),
            status_of(&self.original_dst.ipv6, None),
        );
        row(
            "SO_REUSEPORT",
            "two listeners on one port".into(),
            status_of(&self.reuseport, Some("one shared listener")),
        );
        row(
            "pipe-max-size",
            self.pipe_max_size
                .map_or("unreadable".into(), |v| format!("{v} bytes")),
            Status::Ok,
        );
        row(
            "pipe-user-pages-soft",
            self.pipe_user_pages_soft
                .map_or("unreadable".into(), |v| format!("{v} pages")),
            Status::Ok,
        );
        row(
            "F_SETPIPE_SZ 1 MiB",
            String::new(),
            status_of(&self.pipe_resize_1mib, Some("default 64 KiB pipes")),
        );
        row("SO_MARK", "0x539".into(), status_of(&self.so_mark, None));
        rows
    }

    /// The aligned, human-readable table `ringtun probe` prints.
    pub fn to_table(&self) -> String {
        let rows = self.rows();
        let w0 = rows
            .iter()
            .map(|r| r.0.chars().count())
            .max()
            .unwrap_or(0)
            .max(8);
        // Capped so one long detail (an unreadable-file list) does not push every status off
        // screen; a longer detail simply overflows its cell.
        let w1 = rows
            .iter()
            .map(|r| r.1.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(6, MAX_DETAIL_WIDTH);
        let mut out = format!("{:<w0$}  {:<w1$}  status\n", "facility", "detail");
        for (name, detail, status) in rows {
            let line = format!("{name:<w0$}  {detail:<w1$}  {status}");
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}
