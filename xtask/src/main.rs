//! `cargo xtask`: project automation, in Rust so it runs wherever cargo does.
//!
//! - `images`: the sidecar and agent images (static binaries, FROM scratch).
//! - `test`: everything the test suite needs, then the whole suite.
//! - `demo`: the main job end to end on the sandbox cluster.
//! - `bench <tunnel|volumes|session|intercept|sandbox|soak|wan>`: printed figures, never a failure.
//! - `fuzz [TARGET]`: the `wire` decoders' fuzz targets, on the stable toolchain.

mod bench;
mod demo;
mod fuzz;
mod images;
mod prereqs;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Build, test, demo and benchmark tpd")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Build the tpd/sidecar and tpd/agent images and print their sizes.
    Images {
        /// Tag them TAG instead of this version, e.g. to compare two builds
        /// (`TPD_AGENT_IMAGE=tpd/agent:TAG …`) without replacing the images tests use.
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
    },
    /// Build the images the tests use (busybox, echo, debian).
    TestImages,
    /// Install missing host tools, build all images, run the whole test suite.
    Test {
        /// Extra arguments for `cargo test`, and after `--` for the tests
        /// (e.g. `-p tpd-e2e --test swap -- --nocapture`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build everything, start a sandbox cluster, swap a Deployment for a local container, restore it.
    Demo,
    /// Print benchmark figures (compared with a baseline from the same run).
    Bench {
        #[arg(value_enum)]
        which: bench::Which,
        /// One JSON object per figure instead of a table.
        #[arg(long)]
        json: bool,
        /// How long `soak` runs.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        #[command(flatten)]
        wan: bench::wan::Flags,
    },
    /// Fuzz the wire decoders (wire/fuzz) for a while each; fails on a crash.
    Fuzz {
        /// Only this target (default: every one, in turn).
        target: Option<String>,
        /// How long each target runs.
        #[arg(long, default_value_t = 20, value_name = "N")]
        seconds: u32,
        /// Print the target names and exit.
        #[arg(long)]
        list: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run_task(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_task(task: Task) -> Result<()> {
    let root = tpd_e2e::images::workspace_root();
    match task {
        Task::Images { tag } => images::build(&root, tag.as_deref().unwrap_or(tpd_wire::VERSION)).map(drop),
        Task::TestImages => test_images(&root),
        Task::Test { args } => test(&root, &args),
        Task::Demo => demo::run(&root),
        Task::Bench { which, json, minutes, wan } => bench::run(which, json, minutes, &wan, &root),
        Task::Fuzz { target, seconds, list } => fuzz::run(&root, target.as_deref(), seconds, list),
    }
}

fn test_images(root: &Path) -> Result<()> {
    run(cargo(root).args(["run", "--quiet", "-p", "tpd-e2e", "--bin", "tpd-test-images"]))
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    prereqs::ensure()?;
    images::build(root, tpd_wire::VERSION)?;
    test_images(root)?;
    run(cargo(root).args(["build", "--workspace", "--bins"]))?;
    let (cargo_args, test_args) = split_test_args(args);
    run(cargo(root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_args)
        .args(["--", "--include-ignored"])
        .args(test_args))
}

/// `cargo test`'s own arguments and the test binaries' (after `--`). The
/// tests that need Docker, root or FUSE are `#[ignore]`d so that a plain
/// `cargo test --workspace` runs anywhere in seconds; this task runs them too.
fn split_test_args(args: &[String]) -> (&[String], &[String]) {
    match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[]),
    }
}

/// A `cargo` command rooted at the workspace.
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// Runs a command with inherited output; a failure names the command.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Cargo's target directory, honouring CARGO_TARGET_DIR.
fn target_dir(root: &Path) -> Result<PathBuf> {
    let out = cargo(root).args(["metadata", "--format-version", "1", "--no-deps"]).output()?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading cargo metadata")?;
    meta["target_directory"].as_str().map(PathBuf::from).context("cargo metadata has no target_directory")
}
