//! Compiles `proto/covd/v1/*.proto` with protox (pure Rust, no system `protoc`) and generates
//! the tonic client and server into `OUT_DIR`, plus the encoded descriptor set that server
//! reflection serves. Also compiles the storage schema, `proto/covd/store/v1/records.proto`
//! (messages only: what the data directory keeps, see `src/persist/records.rs`).

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["covd/v1/covd.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("covd_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // prost's codec, answering malformed messages INVALID_ARGUMENT (src/rpc/codec.rs).
        .codec_path("crate::rpc::ProtoCodec")
        // The daemon keeps a delta as the bytes it came in (see src/rpc/frame.rs).
        .extern_path(".covd.v1.IngestRequest", "crate::rpc::frame::IngestRequest")
        .compile_fds(fds)?;
    let records = protox::compile(["covd/store/v1/records.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        // Maps in key order: a record encodes the same bytes every time.
        .btree_map(".")
        .compile_fds(records)?;
    Ok(())
}
