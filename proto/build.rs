//! Compiles `proto/*.proto` with protox (a protobuf compiler written in Rust),
//! so a fresh machine needs no `protoc` installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/edgeloop.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
