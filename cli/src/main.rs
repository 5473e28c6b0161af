//! The `tpd` binary; the command lives in the library (`lib.rs`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tpd::run().await
}
