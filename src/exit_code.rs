//! The process exit codes every subcommand returns, after sysexits(3) where one fits: scripts and
//! supervisors tell a bad configuration (fix the file) from a missing privilege (run as root)
//! from a failure (look at the log). Kept apart from the command line so the library's
//! entry points (`app`, `redirection::cli`) can return them without depending on it.

/// Success.
pub const OK: i32 = 0;
/// Anything else that went wrong (the log or stderr says what).
pub const FAILURE: i32 = 1;
/// A bad configuration file or bad usage (sysexits `EX_USAGE`): nothing was started or changed.
pub const CONFIG: i32 = 64;
/// Needs a privilege it does not have, usually root (sysexits `EX_NOPERM`).
pub const NOPERM: i32 = 77;
