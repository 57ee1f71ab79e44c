//! Generates the message types and gRPC stubs from `proto/` with protox (no system `protoc`),
//! prost-build and tonic-prost-build.

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
    // The schema as a FileDescriptorSet (imports included), for peers that build their
    // messages at run time from it: the Python fake istiod of the tests.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    let mut messages = prost_build::Config::new();
    messages
        .disable_comments(["."])
        // A push holds up to 100,000 addresses: each is as large as its own variant, not as
        // the largest (a workload is over 600 bytes unboxed).
        .boxed(".istio.workload.Address.type.workload")
        .boxed(".istio.workload.Address.type.service");
    // Messages as prost-build makes them, plus a client and a server stub per service (the
    // server for the in-process fake istiod of the tests).
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds_with_config(descriptors, messages)?;
    Ok(())
}
