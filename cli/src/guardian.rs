//! The guardian: a detached `tpd guardian` process that `tpd run` starts
//! before it changes anything. It holds the read end of a pipe whose write
//! end only `tpd run` holds; when `tpd run` ends cleanly it writes `done`
//! first, so an EOF without `done` means it died (SIGKILL, OOM, a forced
//! second Ctrl-C) and the guardian runs the same cleanup in its place.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader as AsyncBufReader};
use tracing::info;

use crate::cleanup::Cleanup;
use crate::cli::{GlobalArgs, GuardianArgs};
use crate::cluster::Cluster;

const READY: &str = "ready";
const DONE: &str = "done";
/// The guardian is ready once connected to the cluster, which the command
/// has just done itself: this only bounds a stalled API server.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// `tpd run`'s end of the pipe.
#[derive(Debug)]
pub struct Guardian {
    stdin: ChildStdin,
}

impl Guardian {
    /// Starts the guardian for `session` and waits until it is connected to
    /// the cluster, so it can act the moment `tpd run` dies.
    pub async fn spawn(
        global: &GlobalArgs,
        cluster: &Cluster,
        session: &str,
        deployment: Option<&str>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the tpd executable to start its guardian")?;
        let mut cmd = Command::new(exe);
        cmd.args(["guardian", "--session", session, "--namespace", &cluster.namespace, "--context", &cluster.context]);
        if let Some(kubeconfig) = &global.kubeconfig {
            cmd.arg("--kubeconfig").arg(kubeconfig);
        }
        if let Some(name) = deployment {
            cmd.args(["--deployment", name]);
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
        // Its own session: the terminal's Ctrl-C and hang-up reach `tpd run`, not the guardian.
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
        }
        let mut child = cmd.spawn().context("cannot start tpd's guardian process")?;
        let stdin = child.stdin.take().context("the guardian has no stdin")?;
        let stdout = child.stdout.take().context("the guardian has no stdout")?;
        // The pipe is read on a blocking thread: this runs inside the runtime.
        let said = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        match tokio::time::timeout(READY_WITHIN, said).await {
            Ok(Ok(Ok(line))) if line.trim() == READY => Ok(Guardian { stdin }),
            outcome => {
                // Killing it ends the read, if it still waits.
                let _ = child.kill();
                let _ = child.wait();
                let why = if outcome.is_err() {
                    format!("did not start within {READY_WITHIN:?}")
                } else {
                    "did not start".into()
                };
                anyhow::bail!("tpd's guardian process {why} (its log is in {})", crate::logging::cache_dir().display())
            }
        }
    }

    /// `tpd run` cleaned up itself: the guardian exits without doing anything.
    pub fn dismiss(mut self) {
        let _ = writeln!(self.stdin, "{DONE}");
    }
}

/// The `tpd guardian` subcommand.
pub async fn run(global: &GlobalArgs, args: &GuardianArgs) -> anyhow::Result<ExitCode> {
    crate::logging::to_file(&format!("{}-guardian", args.session))?;
    let cluster = crate::cluster::connect(global).await?;
    let cleanup = Cleanup::new(&cluster, &args.session, args.deployment.clone());
    println!("{READY}");
    std::io::stdout().flush()?;
    info!(session = %args.session, deployment = ?args.deployment, "guarding");

    let mut lines = AsyncBufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() == DONE {
            info!("tpd run cleaned up itself");
            return Ok(ExitCode::SUCCESS);
        }
    }
    info!("tpd run ended without cleaning up; cleaning up for it");
    let outcome = cleanup.run().await;
    crate::cleanup::sweep_late_arrivals(&args.session).await;
    info!(?outcome, "cleanup finished");
    Ok(if outcome.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
