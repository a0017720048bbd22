//! Compiles the .proto files with protox, so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/lifeboat.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .type_attribute(".lifeboat.v1", "#[derive(serde::Serialize)]")
        // The enum twins of string fields stay out of the CLI's JSON: its
        // fields and values are stable (docs/cli.md); the strings carry them.
        .field_attribute(".lifeboat.v1.Check.id", "#[serde(skip)]")
        .field_attribute(".lifeboat.v1.CleanupItem.cleanup_action", "#[serde(skip)]")
        .field_attribute(".lifeboat.v1.MigrationPlan.evidence", "#[serde(skip)]")
        .field_attribute(".lifeboat.v1.MoveRecord.move_state", "#[serde(skip)]")
        .field_attribute(".lifeboat.v1.JobRecord.job_state", "#[serde(skip)]")
        .field_attribute(".lifeboat.v1.JobRecord.job_kind", "#[serde(skip)]")
        .field_attribute(".lifeboat.v1.JobRecord.evidence", "#[serde(skip)]")
        .field_attribute(".lifeboat.v1.HostRecord.host_status", "#[serde(skip)]")
        .compile_fds(fds)?;
    Ok(())
}
