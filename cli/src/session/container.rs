//! The developer's container, as `docker run` would start it, but in the
//! sidecar's network namespace and with the remote env and volumes:
//! output streamed (or a raw TTY with resize), stdin with `-i`, and its exit
//! code returned so `tpd run` exits with it.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::Context as _;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, InspectContainerOptions, KillContainerOptions,
    ResizeContainerTTYOptions, WaitContainerOptions,
};
use futures::StreamExt;
use nix::sys::termios;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Context;
use super::env::Env;
use super::sidecar::{self, Sidecar};

pub async fn run(
    docker: &Docker,
    ctx: &Context<'_>,
    sidecar: &Sidecar,
    mut env: Env,
    shutdown: &CancellationToken,
) -> anyhow::Result<i64> {
    let args = ctx.args;
    if let Some(v) = &sidecar.volumes {
        env.insert(v.env.0.clone(), v.env.1.clone());
    }
    let host = HostConfig {
        network_mode: Some(format!("container:{}", sidecar.id)),
        binds: Some(args.volumes.clone()),
        mounts: sidecar.volumes.as_ref().map(|v| v.app.clone()),
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(args.image.clone()),
        cmd: (!args.command.is_empty()).then(|| args.command.clone()),
        env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(sidecar::labels(ctx.id)),
        tty: Some(args.tty),
        open_stdin: Some(args.interactive),
        stdin_once: Some(args.interactive),
        attach_stdin: Some(args.interactive),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        host_config: Some(host),
        ..Default::default()
    };
    let name = args.name.clone().unwrap_or_else(|| format!("tpd-{}", ctx.id));
    let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
    let id = docker
        .create_container(Some(options), body)
        .await
        .with_context(|| format!("cannot create your container {name}"))?
        .id;
    let attach = AttachContainerOptions {
        stream: true,
        stdin: args.interactive,
        stdout: true,
        stderr: true,
        logs: true,
        detach_keys: None,
    };
    let io = docker.attach_container(&id, Some(attach)).await.context("cannot attach to your container")?;
    let _raw = if args.tty { RawMode::enable() } else { None };
    docker.start_container(&id, None).await.with_context(|| format!("cannot start your container {name}"))?;
    if args.tty {
        tokio::spawn(follow_window_size(docker.clone(), id.clone()));
    }
    if args.interactive {
        let mut input = io.input;
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut input).await;
            // End of our stdin: half-close, so the container's stdin ends too.
            let _ = input.shutdown().await;
        });
    }
    let output = tokio::spawn(stream_output(io.output));

    let mut wait = docker.wait_container(&id, None::<WaitContainerOptions>);
    tokio::select! {
        r = wait.next() => {
            // What the container wrote last is still on its way.
            let _ = tokio::time::timeout(OUTPUT_DRAIN, output).await;
            let code = exit_code(r);
            if let Some(why) = ended_badly(docker, &id, code).await {
                eprintln!("tpd: your container {name} {why}; ending the session");
            }
            Ok(code)
        }
        () = shutdown.cancelled() => {
            debug!("stopping your container");
            let _ = docker.kill_container(&id, None::<KillContainerOptions>).await;
            Ok(130)
        }
    }
}

/// How long the output may take to arrive after the container exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

fn exit_code(r: Option<Result<bollard::models::ContainerWaitResponse, bollard::errors::Error>>) -> i64 {
    match r {
        Some(Ok(w)) => w.status_code,
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
        _ => 1,
    }
}

/// Why the container ended, unless it exited with 0: killed by a signal, by
/// the kernel for memory, removed, or its own exit code.
async fn ended_badly(docker: &Docker, id: &str, code: i64) -> Option<String> {
    if code == 0 {
        return None;
    }
    let state = match docker.inspect_container(id, None::<InspectContainerOptions>).await {
        Ok(c) => c.state,
        Err(e) if crate::docker::is_not_found(&e) => return Some("was removed".into()),
        Err(_) => None,
    };
    if state.as_ref().and_then(|s| s.oom_killed) == Some(true) {
        return Some(format!("was killed for lack of memory (OOM, exit code {code})"));
    }
    match code {
        129..=159 => Some(format!("was killed by signal {} (exit code {code})", code - 128)),
        _ => Some(format!("exited with code {code}")),
    }
}

async fn stream_output(
    mut output: std::pin::Pin<Box<dyn futures::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
) {
    while let Some(Ok(chunk)) = output.next().await {
        let _ = match chunk {
            LogOutput::StdErr { message } => {
                std::io::stderr().write_all(&message).and_then(|()| std::io::stderr().flush())
            }
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                std::io::stdout().write_all(&message).and_then(|()| std::io::stdout().flush())
            }
            LogOutput::StdIn { .. } => Ok(()),
        };
    }
}

/// Keeps the container's TTY the size of ours.
async fn follow_window_size(docker: Docker, id: String) {
    let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
        return;
    };
    loop {
        if let Some((w, h)) = terminal_size() {
            let _ = docker.resize_container_tty(&id, ResizeContainerTTYOptions { w: w.into(), h: h.into() }).await;
        }
        if winch.recv().await.is_none() {
            return;
        }
    }
}

fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we pass.
    let rc = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Our terminal in raw mode while the container's TTY is attached; restored on drop.
struct RawMode(termios::Termios);

impl RawMode {
    fn enable() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), termios::SetArg::TCSANOW, &self.0);
    }
}
