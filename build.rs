//! Generates the gRPC code for proto/ (src/proto.rs includes it). protox parses the .proto
//! files in Rust, so that building meshlet needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = protox::compile(["meshlet/identity/v1/identity.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(files)?;
    Ok(())
}
