//! `tpd`: run a local Docker container as if it were a pod of a remote
//! Kubernetes cluster. This crate owns the user-facing command line and the
//! orchestration of Kubernetes (kube-rs) and Docker (bollard); it is the only
//! piece that talks to either API.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod checks;
mod cleanup;
mod cli;
mod cluster;
mod commands;
mod compose;
mod config;
mod docker;
mod error;
mod guardian;
mod logging;
mod mounts;
mod output;
mod remote_env;
mod session;
mod swap;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let verbose = cli.global.verbose;
    logging::init(verbose);
    match commands::dispatch(cli).await {
        Ok(code) => code,
        Err(err) => error::report(&err, verbose),
    }
}
