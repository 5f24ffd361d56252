//! Compiles every `.proto` under `proto/skv` with protox (pure Rust, so no
//! `protoc` is needed to build) and generates tonic/prost code from it.
use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "skv/v1/kv.proto",
        "skv/internal/v1/meta.proto",
        "skv/internal/v1/store.proto",
        "skv/internal/v1/placement.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("skv_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
