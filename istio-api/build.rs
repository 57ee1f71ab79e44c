//! Generates the message types from `proto/` with protox (no system `protoc`) and prost-build.

use std::error::Error;

const PROTOS: &[&str] = &[
    "proto/discovery.proto",
    "proto/status.proto",
    "proto/workload.proto",
    "proto/authorization.proto",
    "proto/ca.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    prost_build::Config::new()
        .disable_comments(["."])
        // A push holds up to 100,000 addresses: each is as large as its own variant, not as
        // the largest (a workload is over 600 bytes unboxed).
        .boxed(".istio.workload.Address.type.workload")
        .boxed(".istio.workload.Address.type.service")
        .compile_fds(descriptors)?;
    Ok(())
}
