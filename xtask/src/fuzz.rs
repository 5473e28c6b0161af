//! `cargo xtask fuzz`: the `wire/fuzz` targets on the pinned stable toolchain.
//!
//! cargo-fuzz needs nightly only for the sanitizers (`-Zsanitizer`); with
//! `--sanitizer none` it passes only stable codegen flags (libFuzzer's
//! coverage and comparison tracing), so the pinned toolchain builds and runs
//! the targets. Debug assertions stay on, so an arithmetic overflow in a
//! decoder is a crash too.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The cargo-fuzz these flags were checked with (CI installs the same).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Per input: a decoder that takes longer than this has a bug (libFuzzer
/// reports it as a timeout artifact).
const INPUT_TIMEOUT_SECS: u32 = 10;

/// What one target's run did.
struct Outcome {
    executions: u64,
    elapsed: Duration,
    /// The input that crashed it, as libFuzzer wrote it.
    artifact: Option<PathBuf>,
}

/// Lists the targets, or builds them once and runs `only` (or each) for `seconds`.
pub fn run(root: &Path, only: Option<&str>, seconds: u32, list: bool) -> Result<()> {
    ensure_cargo_fuzz()?;
    let targets = targets(root)?;
    if list {
        targets.iter().for_each(|t| println!("{t}"));
        return Ok(());
    }
    let chosen: Vec<&String> = match only {
        Some(name) => vec![
            targets
                .iter()
                .find(|t| *t == name)
                .with_context(|| format!("no fuzz target {name:?}; the targets are: {}", targets.join(", ")))?,
        ],
        None => targets.iter().collect(),
    };
    let target_dir = crate::target_dir(root)?.join("fuzz");
    crate::run(fuzz_cmd(root, &target_dir, "build").args(only))?;
    let (mut executions, mut crashed) = (0, Vec::new());
    for target in chosen {
        let outcome = run_target(root, &target_dir, target, seconds)?;
        println!("{}", summary(target, &outcome));
        executions += outcome.executions;
        if let Some(artifact) = outcome.artifact {
            crashed.push(format!("{target} ({})", artifact.display()));
        }
    }
    println!("fuzz: total {executions} executions");
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {}; reproduce with `cargo fuzz run -s none -a TARGET INPUT` in wire/",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// cargo-fuzz is a cargo subcommand the repo cannot vendor; name the install.
fn ensure_cargo_fuzz() -> Result<()> {
    let ok = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        bail!("cargo-fuzz is not installed: run `cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked`");
    }
    Ok(())
}

/// The targets `wire/fuzz/Cargo.toml` declares, as cargo-fuzz lists them.
fn targets(root: &Path) -> Result<Vec<String>> {
    let out = Command::new("cargo").args(["fuzz", "list"]).current_dir(root.join("wire")).output()?;
    if !out.status.success() {
        bail!("cargo fuzz list failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.lines().map(str::to_owned).collect())
}

/// `cargo fuzz <sub>` with the flags every build and run must share, or a
/// run would rebuild with other flags first.
fn fuzz_cmd(root: &Path, target_dir: &Path, sub: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("wire"))
        .args(["fuzz", sub, "--sanitizer", "none", "--debug-assertions", "--target-dir"])
        .arg(target_dir);
    cmd
}

/// Runs one target for `seconds`; its libFuzzer output goes to a log beside
/// the build, read afterwards for the figures.
fn run_target(root: &Path, target_dir: &Path, target: &str, seconds: u32) -> Result<Outcome> {
    let log_path = target_dir.join(format!("{target}.log"));
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let started = Instant::now();
    let status = fuzz_cmd(root, target_dir, "run")
        .arg(target)
        .arg("--")
        .args(libfuzzer_args(root, target, seconds))
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    let elapsed = started.elapsed();
    let text = std::fs::read_to_string(&log_path)?;
    let artifact = crash_artifact(&text).map(|p| root.join("wire").join(p));
    if !status.success() && artifact.is_none() {
        bail!("cargo fuzz run {target} failed ({status}) without a crash input; see {}", log_path.display());
    }
    Ok(Outcome { executions: executions(&text).unwrap_or(0), elapsed, artifact })
}

fn libfuzzer_args(root: &Path, target: &str, seconds: u32) -> Vec<String> {
    let mut args = vec![
        format!("-max_total_time={seconds}"),
        format!("-timeout={INPUT_TIMEOUT_SECS}"),
        "-print_final_stats=1".to_owned(),
    ];
    // Words of a text format (control's JSON) that mutation alone rarely spells.
    let dict = root.join(format!("wire/fuzz/dicts/{target}.dict"));
    if dict.exists() {
        args.push(format!("-dict={}", dict.display()));
    }
    args
}

/// libFuzzer's count of inputs run, from `-print_final_stats`.
fn executions(log: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Where libFuzzer saved the input that crashed (or hung) the target.
fn crash_artifact(log: &str) -> Option<&str> {
    log.lines().find_map(|l| l.split_once("Test unit written to ")).map(|(_, path)| path.trim())
}

fn summary(target: &str, o: &Outcome) -> String {
    let verdict = match &o.artifact {
        Some(path) => format!("CRASH, input {}", path.display()),
        None => "no crash".to_owned(),
    };
    format!("fuzz: {target} {} executions in {} s, {verdict}", o.executions, o.elapsed.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_figures() {
        let log = "#1024 pulse cov: 90\nDone 52 runs in 2 second(s)\nstat::number_of_executed_units: 1234\nstat::peak_rss_mb: 40\n";
        assert_eq!(executions(log), Some(1234));
        assert_eq!(crash_artifact(log), None);
        let crash = "==1== ERROR: libFuzzer: deadly signal\nartifact_prefix='/w/fuzz/artifacts/dns/'; Test unit written to /w/fuzz/artifacts/dns/crash-ab12\n";
        assert_eq!(crash_artifact(crash), Some("/w/fuzz/artifacts/dns/crash-ab12"));
    }
}
