//! Generates the gRPC code from `proto/` with the vendored `protoc`: no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "proto/dossier/v1/kv.proto",
            "proto/dossier/v1/admin.proto",
            "proto/dossier/v1/errors.proto",
            "proto/dossier/v1/records.proto",
            "proto/dossier/raft/v1/raft.proto",
            "proto/google/rpc/status.proto",
            "proto/google/rpc/error_details.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
