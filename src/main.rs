//! The `ringtun` binary: logging first, then the command line; everything else lives in the
//! library so tests and the demo drive the same code.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(ringtun::cli::main());
}
