//! Compiles the control API (`proto/proto/control.proto`) into tonic server
//! and client code with protox (no `protoc` needed), and writes the encoded
//! descriptor set that gRPC server reflection serves.
//!
//! The control API is generated here, not in `edgeloop-proto`, because that
//! crate is the device-side contract with no I/O: devices never link tonic.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "../proto/proto/control.proto";
    println!("cargo:rerun-if-changed={file}");
    let descriptors = protox::compile(["control.proto"], ["../proto/proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("control_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `edgeloop ctl --json` prints the responses as they are.
        .message_attribute(".edgeloop.control.v1", "#[derive(serde::Serialize)]")
        .compile_fds(descriptors)?;
    Ok(())
}
