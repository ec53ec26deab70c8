//! Generates the etcd subset from `proto/etcd_kv.proto` with the vendored `protoc`: the client, and
//! the server that `cluster::floor` implements.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(true)
        .compile_with_config(config, &["proto/etcd_kv.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
