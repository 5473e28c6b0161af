//! The developer's container, as `docker run` would start it, but in the
//! sidecar's network namespace and with the remote env and volumes:
//! output streamed (or a raw TTY with resize), stdin with `-i`, and its exit
//! code returned so `tpd run` exits with it.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use anyhow::Context as _;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, KillContainerOptions, ResizeContainerTTYOptions,
};
use futures::StreamExt;
use nix::sys::termios;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::env::Env;
use super::sidecar::{self, Sidecar};
use crate::cli::RunArgs;

pub async fn run(
    docker: &Docker,
    session: &str,
    args: &RunArgs,
    sidecar: &Sidecar,
    mut env: Env,
    shutdown: &CancellationToken,
) -> anyhow::Result<i64> {
    if let Some(v) = &sidecar.volumes {
        env.insert(v.env.0.clone(), v.env.1.clone());
    }
    let host = HostConfig {
        network_mode: Some(format!("container:{}", sidecar.id)),
        binds: Some(args.volumes.clone()),
        mounts: sidecar.volumes.as_ref().map(|v| v.app.clone()),
        memory: args.memory,
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(args.image.clone()),
        cmd: (!args.command.is_empty()).then(|| args.command.clone()),
        env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(sidecar::labels(session)),
        tty: Some(args.tty),
        open_stdin: Some(args.interactive),
        stdin_once: Some(args.interactive),
        attach_stdin: Some(args.interactive),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        host_config: Some(host),
        ..Default::default()
    };
    let name = args.name.clone().unwrap_or_else(|| format!("tpd-{session}"));
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
    let raw = if args.tty { RawMode::enable() } else { None };
    docker.start_container(&id, None).await.with_context(|| format!("cannot start your container {name}"))?;
    if args.tty {
        tokio::spawn(follow_window_size(docker.clone(), id.clone()));
    }
    if args.interactive {
        tokio::spawn(forward_stdin(io.input));
    }
    let output = tokio::spawn(stream_output(io.output));

    tokio::select! {
        ended = crate::docker::wait_ended(docker, &id) => {
            // What the container wrote last is still on its way.
            let _ = tokio::time::timeout(OUTPUT_DRAIN, output).await;
            // Our own lines start at the left margin again, not mid-line.
            drop(raw);
            if let Some(why) = ended.why() {
                eprintln!("tpd: your container {name} {why}; ending the session");
            }
            Ok(ended.code())
        }
        () = shutdown.cancelled() => {
            drop(raw);
            debug!("stopping your container");
            let _ = docker.kill_container(&id, None::<KillContainerOptions>).await;
            Ok(130)
        }
    }
}

/// How long the output may take to arrive after the container exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Copies our stdin into the container's until either ends. The blocking
/// reads run on a plain thread of their own: a read on tokio's blocking pool
/// cannot be cancelled, and the runtime would wait at exit for a keypress
/// that ends it; a plain thread dies with the process.
async fn forward_stdin(mut input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let reader = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match std::io::stdin().read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    if reader.is_err() {
        return;
    }
    while let Some(chunk) = rx.recv().await {
        if input.write_all(&chunk).await.is_err() {
            return;
        }
    }
    // End of our stdin: half-close, so the container's stdin ends too.
    let _ = input.shutdown().await;
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
