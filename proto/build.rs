//! Compiles the .proto files with protox (pure Rust), so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "orlydb/v1/types.proto",
        "orlydb/v1/service.proto",
        "orlyacl/v1/acl.proto",
        "orlysync/common/v1/types.proto",
        "orlysync/distributed/v1/service.proto",
        "orlysync/cluster/v1/service.proto",
        "orlysync/relaygroup/v1/service.proto",
        "orlysync/negentropy/v1/service.proto",
    ];
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
