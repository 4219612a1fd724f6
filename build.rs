//! Code generation only: compiles `proto/` with a vendored `protoc` so that a fresh machine
//! needs no system package. `$PROTOC`, when set, wins.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let well_known = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Maps as BTreeMap: encoding must be deterministic, because a retry's content is compared
    // by the digest of its encoding (idempotency) and leaves are hashed.
    config.btree_map(["."]);
    // `prost::Name` on every message: the codec names the message a request failed to
    // decode as, and tells requests from responses by it.
    config.enable_type_names();

    tonic_prost_build::configure()
        // A request that does not decode is INVALID_ARGUMENT, not tonic's INTERNAL.
        .codec_path("crate::grpc::codec::ProtoCodec")
        .file_descriptor_set_path(out_dir.join("audit_ledger_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                PathBuf::from("proto/audit/ledger/v1/ledger.proto"),
                PathBuf::from("proto/audit/ledger/v1/compliance.proto"),
                PathBuf::from("proto/audit/ledger/v1/access.proto"),
            ],
            &[PathBuf::from("proto"), well_known],
        )?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
