//! Compiles the wire contract in proto/ with protoc (Debian's protobuf-compiler;
//! set PROTOC to use another).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/keyward/v1/keyward.proto",
                "proto/keyward/v1/jwks.proto",
                "proto/keyward/v1/audit.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
