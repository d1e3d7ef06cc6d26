//! Compiles the `.proto` files with `protox` (pure Rust), so no `protoc` is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/parasync/ps/v1/ps.proto", "proto/parasync/collective/v1/rendezvous.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Written here because `compile_fds` skips it; gRPC reflection serves this set.
    std::fs::write(out.join("parasync_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().bytes(".").codec_path("crate::codec::PsCodec").compile_fds(fds)?;
    Ok(())
}
