//! `tpd`: run a local Docker container as if it were a pod of a remote
//! Kubernetes cluster. This crate owns the user-facing command line and the
//! orchestration of Kubernetes (kube-rs) and Docker (bollard); it is the only
//! piece that talks to either API.
//!
//! The `tpd` binary (`main.rs`) only calls [`run`]. The library is there so
//! that tests use the CLI's own pieces: the e2e tests give containers the
//! mounts [`mounts::plan`] gives them in a session.

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
mod intercept;
mod logging;
pub mod mounts;
mod output;
mod remote_env;
mod rollout;
mod session;
mod swap;

use std::process::ExitCode;

use clap::Parser;

/// The `tpd` command: parses the command line, runs the command and
/// reports its error; returns the exit code.
pub async fn run() -> ExitCode {
    let cli = cli::Cli::parse();
    let verbose = cli.global.verbose;
    logging::init(verbose);
    match commands::dispatch(cli).await {
        Ok(code) => code,
        Err(err) => error::report(&err, verbose),
    }
}
