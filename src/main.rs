//! The `ringtun` binary: the command line and the demo, over the library's public API. Logging
//! starts first (in `cli`); the proxy itself lives in the library, so the tests drive the same
//! code the binary runs.

#![forbid(unsafe_code)]

mod cli;
mod demo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(cli::main());
}
