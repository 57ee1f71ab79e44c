//! Node configuration: the YAML file an operator writes (`version: 1`), parsed into a raw tree
//! that remembers where every value came from, then validated into the types of `model`.
//!
//! Boundary: this module never binds a port or opens a namespace; it only reads text and says,
//! all at once and each with its place in the file, everything that is wrong with it.
//! [`load`] takes text; [`load_file`] reads a file and puts its name in front of every error
//! (`ringtun check-config`, `run`, `certs` and `redirect --config` all load through it).

mod checker;
mod default;
mod file;
mod model;
mod parse;
mod policies;
mod validate;

// This file declares and re-exports, and defines nothing the files below use: the types are
// defined in `model`, so `validate` and `parse` (which use them) and this facade (which
// re-exports their functions) never depend on each other in a circle.
pub use default::DEFAULT_CONFIG_YAML;
pub use file::{check_file, check_file_text, load_file, FileError};
pub use model::*;
pub use validate::DEFAULT_HBONE;
pub use validate::{check, load};

/// `<integer><unit>` (unit ms, s, m or h) greater than zero, or why not: the file's duration
/// syntax, for command-line flags that take one (`ringtun certs --validity`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, &'static str> {
    validate::parse_duration(text)
}
