//! `tpd connect`: long-lived, named sessions that outlive the command. It
//! starts a detached `tpd connect --hold` process (its own process group,
//! stderr into `~/.cache/tpd/connect/<name>.log`), shows the progress and
//! warnings it reports as typed events in `<name>.events`
//! (`session::named::Line`), and returns once it reports the session ready
//! there (or the error, after it cleaned up). The held session
//! itself is `crate::session::held`'s; it ends on SIGTERM with the same
//! `Cleanup` as every other exit path; if it was killed, its guardian
//! cleans up the cluster and `tpd quit` the rest.

use std::os::unix::fs::OpenOptionsExt as _;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::checks;
use crate::cli::{ConnectArgs, GlobalArgs};
use crate::cluster::Cluster;
use crate::config::{self, Images};
use crate::error::Hint;
use crate::output::{self, OutputFormat, progress};
use crate::session::held::establish;
use crate::session::named::{
    self as record, Follow, Outcome, Record, checked_name, default_name, events_path, log_path, repair,
};
use crate::session::spec::Spec;

pub async fn run(global: &GlobalArgs, args: ConnectArgs) -> anyhow::Result<ExitCode> {
    if args.hold {
        return hold(global, args).await;
    }
    let spec = Spec::from_connect(&args)?;
    let cluster = crate::cluster::connect(global).await?;
    let name = match &args.name {
        Some(n) => checked_name(n)?,
        None => default_name(&cluster.context, &cluster.namespace),
    };
    match record::read(&name)? {
        Some(r) if record::alive(r.pid) => {
            if r.context != cluster.context || r.namespace != cluster.namespace {
                return Err(Hint::new(
                    format!("session {name:?} is running for context {:?}, namespace {:?}", r.context, r.namespace),
                    format!("use it as it is, end it with `tpd quit {name}`, or pick another name with --name"),
                )
                .into());
            }
            show(global, &r, &format!("session {name:?} is already running (process {})", r.pid));
            return Ok(ExitCode::SUCCESS);
        }
        Some(r) => {
            progress(&format!("session {name:?} was left by a process that ended; cleaning it up first"));
            repair(global, &r).await?;
        }
        None => {}
    }
    let images = Images::resolve(global, &config::load()?);
    let docker = crate::docker::connect().await?;
    checks::image_present(&docker, &images.sidecar, checks::TPD_IMAGE_FIX).await?;
    checks::ports_free(spec.session.publish.iter().map(|p| p.host))?;
    crate::checks::namespace_exists(&cluster).await?;
    let record = spawn_holder(global, &cluster, &images, &name, &spec).await?;
    show(
        global,
        &record,
        &format!("session {name:?} is ready (process {}, log {})", record.pid, log_path(&name).display()),
    );
    Ok(ExitCode::SUCCESS)
}

/// Starts `tpd connect --hold` detached, relays its progress from its
/// events file, and waits for its `ready` or `error`.
async fn spawn_holder(
    global: &GlobalArgs,
    cluster: &Cluster,
    images: &Images,
    name: &str,
    spec: &Spec,
) -> anyhow::Result<Record> {
    record::ensure_dir()?;
    let log = log_path(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let events = events_path(name);
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&events)
        .with_context(|| format!("cannot create {}", events.display()))?;
    let mut follow = Follow::from_end(&events);
    let exe = std::env::current_exe().context("cannot find the tpd executable to start the session's process")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["connect", "--hold", "--name", name, "--context", &cluster.context, "--namespace", &cluster.namespace]);
    cmd.args(["--sidecar-image", &images.sidecar, "--agent-image", &images.agent]);
    if let Some(kubeconfig) = &global.kubeconfig {
        cmd.arg("--kubeconfig").arg(kubeconfig);
    }
    // The log file gets tracing's debug file layer and stderr; progress,
    // warnings and the outcome go to the events file.
    cmd.env("RUST_LOG", "off").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(file);
    // Its own session and process group: the terminal's Ctrl-C and hang-up
    // do not reach it, and it outlives this command.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().context("cannot start the session's background process")?;
    let pid = child.id().unwrap_or_default();
    // The session's spec goes whole on stdin, read to its end by the holder.
    let mut stdin = child.stdin.take().context("no stdin pipe")?;
    stdin.write_all(&serde_json::to_vec(spec)?).await.context("cannot hand the session to its background process")?;
    drop(stdin);
    progress(&format!("starting session {name:?} in the background (process {pid}, log {})", log.display()));
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let outcome = loop {
        tokio::select! {
            _ = tick.tick() => if let Some(o) = follow.echo() {
                break Ok(o);
            },
            status = child.wait() => break follow.echo().ok_or(status),
            _ = interrupt.recv() => {
                eprintln!("tpd: interrupted; the session's process removes what it started");
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
        }
    };
    match outcome {
        Ok(Outcome::Ready { record }) => Ok(record),
        Ok(Outcome::Error { message, help }) => {
            // It cleans up before it exits: show that too.
            let _ = child.wait().await;
            follow.echo();
            eprintln!("tpd: the session's log is {}", log.display());
            Err(Hint::new(
                message,
                help.unwrap_or_else(|| format!("the session's log ({}) has the details", log.display())),
            )
            .into())
        }
        Err(status) => Err(Hint::new(
            format!(
                "the session's background process ended before the session was ready ({})",
                status.map_or_else(|e| e.to_string(), |s| s.to_string())
            ),
            format!("see its log, {}", log.display()),
        )
        .into()),
    }
}

/// The holder's session, as `tpd connect` wrote it on its stdin.
async fn read_spec() -> anyhow::Result<Spec> {
    let mut json = String::new();
    tokio::io::stdin().read_to_string(&mut json).await.context("cannot read the session's spec from stdin")?;
    serde_json::from_str(&json)
        .context("`tpd connect --hold` reads the session's spec as JSON on stdin; `tpd connect` starts it")
}

/// The background process: holds the session until SIGTERM (or SIGINT,
/// SIGHUP, or the swap's lease lost), then cleans up.
async fn hold(global: &GlobalArgs, args: ConnectArgs) -> anyhow::Result<ExitCode> {
    let name = checked_name(args.name.as_deref().context("--hold needs --name")?)?;
    let _ = crate::logging::to_file(&format!("connect/{name}"));
    let events = std::fs::OpenOptions::new().append(true).create(true).open(events_path(&name));
    output::notes_to(events.with_context(|| format!("cannot open {}", events_path(&name).display()))?);
    progress(&format!("session {name:?}: process {} starting", std::process::id()));
    let shutdown = CancellationToken::new();
    for kind in [SignalKind::terminate(), SignalKind::interrupt(), SignalKind::hangup()] {
        let mut sig = signal(kind)?;
        let token = shutdown.clone();
        tokio::spawn(async move {
            if sig.recv().await.is_some() {
                token.cancel();
            }
        });
    }
    let established = async {
        let spec = read_spec().await?;
        let cluster = crate::session::cluster(global).await?;
        let images = Images::resolve(global, &config::load()?);
        establish(global, &cluster, &images, &name, &spec, &shutdown).await
    }
    .await;
    let held = match established {
        Ok(held) => held,
        Err(e) => {
            let help = e.chain().find_map(|c| c.downcast_ref::<Hint>()).map(|h| h.help.clone());
            let message = crate::error::one_line(&e);
            eprintln!("error: {message}");
            output::event(&Outcome::Error { message, help });
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Err(e) = record::write(&held.record) {
        eprintln!("error: {e:#}");
        let message = format!("{e:#}");
        held.end().await;
        output::event(&Outcome::Error { message, help: None });
        return Ok(ExitCode::FAILURE);
    }
    output::event(&Outcome::Ready { record: held.record.clone() });
    info!(sidecar = %held.record.sidecar, network = %held.record.network, "session {name:?} is ready");
    // The tasks' token is a child of `shutdown`: a signal or a lost lease.
    held.lost().cancelled().await;
    progress(&format!("session {name:?} is ending: restoring the cluster and removing the session's containers"));
    let ok = held.end().await;
    record::remove(&name);
    match ok {
        true => progress(&format!("cleanup of session {name:?} finished")),
        false => progress(&format!("cleanup of session {name:?} finished with errors (see above)")),
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// How a running session is shown: the sidecar's name on stdout (for
/// `docker run --network container:$(tpd connect)`), the rest on stderr.
fn show(global: &GlobalArgs, r: &Record, headline: &str) {
    if global.output == OutputFormat::Json {
        println!("{}", serde_json::to_string(&public(r)).unwrap_or_default());
        return;
    }
    progress(headline);
    progress(&format!("  context {}, namespace {}", r.context, r.namespace));
    for s in &r.swaps {
        let ports = s.local_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        match &s.intercept {
            None => progress(&format!(
                "  swaps {}: its cluster traffic arrives in the session on port(s) {ports}",
                s.deployment
            )),
            Some(takes) => {
                progress(&format!("  intercepts {}: {takes} arrive in the session on port(s) {ports}", s.deployment))
            }
        }
    }
    if !r.published.is_empty() {
        progress(&format!("  publishes {}", r.published.join(", ")));
    }
    progress(&format!("  join it:  docker run --network container:{} IMAGE", r.sidecar));
    progress(&format!("  compose:  tpd compose --session {} ... -- up", r.name));
    progress(&format!("  end it:   tpd quit {}", r.name));
    println!("{}", r.sidecar);
}

/// The record without the remote env (which may hold secrets).
fn public(r: &Record) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    for s in v["swaps"].as_array_mut().into_iter().flatten() {
        if let Some(o) = s.as_object_mut() {
            o.remove("env");
        }
    }
    v
}
