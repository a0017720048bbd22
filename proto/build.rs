//! Compiles the .proto files with protox, so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/lifeboat.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .type_attribute(".lifeboat.v1", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
