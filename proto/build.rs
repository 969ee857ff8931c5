//! Compiles the protobuf contract with protox (no system protoc) and generates tonic code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/trellis/v1/types.proto",
        "proto/trellis/v1/discovery.proto",
        "proto/trellis/v1/ca.proto",
        "proto/trellis/v1/admin.proto",
        "proto/trellis/v1/raft.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
