//! `tpd connect` and `tpd quit`: long-lived, named sessions that outlive the
//! command. `tpd connect` starts a detached `tpd connect --hold` process (its
//! own process group, stderr into `~/.cache/tpd/connect/<name>.log`), shows
//! the `tpd: ...` progress lines it logs, and returns once it reports the
//! session ready on its stdout pipe (or the error, after it cleaned up).
//! The held session is `tpd run`'s without the developer's container: the
//! guardian, the swap or outbound agent pod with its lease renewal
//! (`run::start_agent`), the relay and the sidecar (`session::start`), plus
//! a Docker network for compose projects. It ends on SIGTERM with the same
//! `Cleanup` as every other exit path; if it was killed, its guardian cleans
//! up the cluster and `tpd quit` the rest.

use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bollard::Docker;
use bollard::models::{NetworkConnectRequest, NetworkCreateRequest};
use bollard::query_parameters::InspectContainerOptions;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tpd_wire::sidecar::Cidr;
use tracing::{info, warn};

use crate::cleanup::Cleanup;
use crate::cli::{ConnectArgs, GlobalArgs, PortPair, QuitArgs, RunArgs, Transport};
use crate::cluster::Cluster;
use crate::compose::session::{self as record, MountRecord, Record, SwapRecord};
use crate::config::{self, Images};
use crate::error::Hint;
use crate::guardian::Guardian;
use crate::output::{OutputFormat, progress};
use crate::swap::apply;
use crate::swap::plan::Target;
use crate::{checks, session};

/// What a session holds, whoever starts it (`tpd connect`, `tpd compose up`).
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub swap: Option<Target>,
    pub force: bool,
    pub ports: Vec<PortPair>,
    pub publish: Vec<PortPair>,
    pub also_proxy: Vec<Cidr>,
    pub transport: Option<Transport>,
    pub no_mounts: bool,
    pub ready_timeout: u64,
}

impl Spec {
    /// At most one swap: one sidecar holds one WireGuard session to one agent.
    pub fn new(swaps: &[Target]) -> Result<Self, Hint> {
        if let [first, second, ..] = swaps {
            return Err(Hint::new(
                format!("a session swaps one Deployment, and {first} and {second} were given"),
                "start one session per Deployment (`tpd connect --name NAME --swap ...` for each)",
            ));
        }
        Ok(Spec { swap: swaps.first().cloned(), ready_timeout: 120, ..Default::default() })
    }

    fn from_args(args: &ConnectArgs) -> Result<Self, Hint> {
        Ok(Spec {
            force: args.force,
            ports: args.ports.clone(),
            publish: args.publish.clone(),
            also_proxy: args.also_proxy.clone(),
            transport: Some(args.transport),
            no_mounts: args.no_mounts,
            ready_timeout: args.ready_timeout,
            ..Spec::new(&args.swap)?
        })
    }

    /// The session machinery takes `tpd run`'s arguments; a session without
    /// a developer's container leaves the container's fields empty.
    fn run_args(&self) -> RunArgs {
        RunArgs {
            image: String::new(),
            swap: self.swap.clone(),
            force: self.force,
            ports: self.ports.clone(),
            env: Vec::new(),
            env_file: Vec::new(),
            volumes: Vec::new(),
            publish: self.publish.clone(),
            interactive: false,
            tty: false,
            name: None,
            memory: None,
            transport: self.transport.unwrap_or(Transport::Portforward),
            also_proxy: self.also_proxy.clone(),
            mount_root: None,
            no_mounts: self.no_mounts,
            volume_timeout: None,
            ready_timeout: self.ready_timeout,
            command: Vec::new(),
        }
    }
}

/// A session that is up: the record compose reads, and what ends it.
#[derive(Debug)]
pub struct Held {
    pub record: Record,
    cleanup: Cleanup,
    guardian: Guardian,
    cluster: Cluster,
    /// Cancels the relay and the lease renewal.
    tasks: CancellationToken,
}

/// Starts a session named `name` and returns once its sidecar is ready.
/// On failure (or `shutdown` before it is ready) everything it created is
/// removed before the error is returned.
pub async fn establish(
    global: &GlobalArgs,
    cluster: &Cluster,
    images: &Images,
    name: &str,
    spec: &Spec,
    shutdown: &CancellationToken,
) -> anyhow::Result<Held> {
    let docker = crate::docker::connect().await?;
    checks::image_present(&docker, &images.sidecar, "build tpd's images with `cargo xtask images`").await?;
    checks::ports_free(spec.publish.iter().map(|p| p.first))?;
    if let Some(target) = &spec.swap {
        // Unknown Deployment or ambiguous container: fail before the guardian exists.
        apply::check_target(cluster, target).await?;
    }
    let id = session::new_id();
    info!(session = %id, name, "connect session starting");
    let deployment = spec.swap.as_ref().map(|t| t.name.clone());
    let guardian = Guardian::spawn(global, cluster, &id, deployment.as_deref())?;
    let cleanup = Cleanup {
        client: cluster.client.clone(),
        namespace: cluster.namespace.clone(),
        session: id.clone(),
        deployment,
    };
    let tasks = shutdown.child_token();
    let network = format!("tpd-{id}");
    match start(&docker, cluster, images, name, &id, &network, spec, &tasks).await {
        Ok(record) => Ok(Held { record, cleanup, guardian, cluster: cluster.clone(), tasks }),
        Err(e) => {
            progress("removing what the session had started");
            tasks.cancel();
            if cleanup.run().await.ok {
                guardian.dismiss();
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn start(
    docker: &Docker,
    cluster: &Cluster,
    images: &Images,
    name: &str,
    id: &str,
    network: &str,
    spec: &Spec,
    tasks: &CancellationToken,
) -> anyhow::Result<Record> {
    let args = spec.run_args();
    let (swap, agent_pod) = super::run::start_agent(cluster, &args, images, id, tasks).await?;
    let request = NetworkCreateRequest {
        name: network.to_owned(),
        labels: Some(session::sidecar::labels(id)),
        ..Default::default()
    };
    docker
        .create_network(request)
        .await
        .with_context(|| format!("cannot create the session's Docker network {network}"))?;
    let ctx = session::Context { cluster, args: &args, images, id, agent_pod, swap: swap.as_ref() };
    let started = session::start(&ctx, tasks).await?;
    tokio::spawn(end_when_the_sidecar_stops(
        docker.clone(),
        started.sidecar.id.clone(),
        started.sidecar.name.clone(),
        tasks.clone(),
    ));
    let connect = NetworkConnectRequest { container: started.sidecar.id.clone(), ..Default::default() };
    docker
        .connect_network(network, connect)
        .await
        .with_context(|| format!("cannot attach the sidecar to the network {network}"))?;
    let inspect = docker.inspect_container(&started.sidecar.id, None::<InspectContainerOptions>).await?;
    let sidecar = inspect.name.unwrap_or_default().trim_start_matches('/').to_owned();

    let mut env = session::env::merge(started.status.env, &[], &[])?;
    let mut mounts = Vec::new();
    if let Some(v) = &started.sidecar.volumes {
        env.insert(v.env.0.clone(), v.env.1.clone());
        mounts = v
            .app
            .iter()
            .map(|m| MountRecord {
                source: m.source.clone().unwrap_or_default(),
                target: m.target.clone().unwrap_or_default(),
                read_only: m.read_only.unwrap_or(false),
            })
            .collect();
    }
    let swaps = match (&spec.swap, &swap) {
        (Some(target), Some(swap)) => {
            let local = |remote: u16| spec.ports.iter().find(|p| p.first == remote).map_or(remote, |p| p.second);
            vec![SwapRecord {
                deployment: target.to_string(),
                env: env.into_iter().collect(),
                mounts,
                local_ports: swap.ports.iter().map(|p| local(*p)).collect(),
            }]
        }
        _ => Vec::new(),
    };
    Ok(Record {
        name: name.to_owned(),
        id: id.to_owned(),
        context: cluster.context.clone(),
        namespace: cluster.namespace.clone(),
        sidecar,
        network: network.to_owned(),
        pid: std::process::id(),
        published: spec.publish.iter().map(|p| format!("{}:{}", p.first, p.second)).collect(),
        swaps,
    })
}

impl Held {
    /// Cancelled when the session ends by itself (its swap's lease was lost:
    /// restored by hand or taken over).
    pub fn lost(&self) -> CancellationToken {
        self.tasks.clone()
    }

    /// Ends the session: stops the relay and the lease renewal, restores the
    /// swap, deletes the agent pod, removes the sidecar and the network.
    pub async fn end(self) -> bool {
        self.tasks.cancel();
        let outcome = self.cleanup.run().await;
        if outcome.ok {
            self.guardian.dismiss();
        }
        if let (Some(name), true) = (&self.cleanup.deployment, outcome.restored) {
            let api: Api<Deployment> = Api::namespaced(self.cluster.client.clone(), &self.cluster.namespace);
            progress(&format!("waiting for deployment/{name} to roll back"));
            if let Err(e) = apply::wait_for_rollout(&api, name, Duration::from_secs(60)).await {
                warn!("{e:#}");
            }
        }
        outcome.ok
    }
}

// ---------------------------------------------------------------- tpd connect

/// What the background process reports on its stdout pipe, one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
enum Event {
    Ready { record: Record },
    Error { message: String, help: Option<String> },
}

pub async fn run(global: &GlobalArgs, args: ConnectArgs) -> anyhow::Result<ExitCode> {
    if args.hold {
        return hold(global, args).await;
    }
    let spec = Spec::from_args(&args)?;
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
    checks::image_present(&docker, &images.sidecar, "build tpd's images with `cargo xtask images`").await?;
    checks::ports_free(spec.publish.iter().map(|p| p.first))?;
    crate::checks::namespace_exists(&cluster).await?;
    let record = spawn_holder(global, &cluster, &images, &name, &args).await?;
    show(
        global,
        &record,
        &format!("session {name:?} is ready (process {}, log {})", record.pid, log_path(&name).display()),
    );
    Ok(ExitCode::SUCCESS)
}

/// Session names become file names and appear in commands.
fn checked_name(name: &str) -> Result<String, Hint> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    match ok {
        true => Ok(name.to_owned()),
        false => Err(Hint::new(
            format!("{name:?} is not a valid session name"),
            "use letters, digits, '-', '_' and '.' (at most 63)",
        )),
    }
}

/// `CONTEXT-NAMESPACE`, reduced to the characters a session name may hold.
pub fn default_name(context: &str, namespace: &str) -> String {
    let raw = format!("{context}-{namespace}");
    let mut name: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).collect();
    name = name.trim_start_matches(['.', '-']).to_owned();
    name.truncate(63);
    if name.is_empty() { "default".into() } else { name }
}

/// The session's name from `--name`, or the default for the kubeconfig's
/// context and namespace (read locally; the cluster is not contacted).
pub async fn resolve_name(global: &GlobalArgs, name: Option<&str>) -> anyhow::Result<String> {
    match name {
        Some(n) => Ok(checked_name(n)?),
        None => {
            let cluster = crate::cluster::connect(global).await?;
            Ok(default_name(&cluster.context, &cluster.namespace))
        }
    }
}

pub fn log_path(name: &str) -> PathBuf {
    record::dir().join(format!("{name}.log"))
}

/// Starts `tpd connect --hold` detached, relays its progress from the log,
/// and waits for its `ready` or `error`.
async fn spawn_holder(
    global: &GlobalArgs,
    cluster: &Cluster,
    images: &Images,
    name: &str,
    args: &ConnectArgs,
) -> anyhow::Result<Record> {
    record::ensure_dir()?;
    let log = log_path(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut tail = Tail::new(&log, file.metadata()?.len());
    let exe = std::env::current_exe().context("cannot find the tpd executable to start the session's process")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(["connect", "--hold", "--name", name, "--context", &cluster.context, "--namespace", &cluster.namespace]);
    cmd.args(["--sidecar-image", &images.sidecar, "--agent-image", &images.agent]);
    if let Some(kubeconfig) = &global.kubeconfig {
        cmd.arg("--kubeconfig").arg(kubeconfig);
    }
    for t in &args.swap {
        let spec = match &t.container {
            Some(c) => format!("deployment/{}:{c}", t.name),
            None => format!("deployment/{}", t.name),
        };
        cmd.args(["--swap", &spec]);
    }
    for p in &args.ports {
        cmd.args(["--port", &format!("{}:{}", p.first, p.second)]);
    }
    for p in &args.publish {
        cmd.args(["--publish", &format!("{}:{}", p.first, p.second)]);
    }
    for c in &args.also_proxy {
        cmd.args(["--also-proxy", &c.to_string()]);
    }
    let transport = match args.transport {
        Transport::Auto => "auto",
        Transport::Portforward => "portforward",
        Transport::Udp => "udp",
    };
    cmd.args(["--transport", transport, "--ready-timeout", &args.ready_timeout.to_string()]);
    if args.force {
        cmd.arg("--force");
    }
    if args.no_mounts {
        cmd.arg("--no-mounts");
    }
    // The log file gets tracing's debug file layer; stderr (the same file)
    // carries the `tpd: ...` progress lines and errors only.
    cmd.env("RUST_LOG", "off").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(file);
    // Its own session and process group: the terminal's Ctrl-C and hang-up
    // do not reach it, and it outlives this command.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().context("cannot start the session's background process")?;
    let pid = child.id().unwrap_or_default();
    progress(&format!("starting session {name:?} in the background (process {pid}, log {})", log.display()));
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("no stdout pipe")?).lines();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let event = loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(l)) => match serde_json::from_str::<Event>(&l) {
                    Ok(e) => break Some(e),
                    Err(_) => info!("holder said: {l}"),
                },
                _ => break None,
            },
            _ = tick.tick() => tail.echo(),
            _ = interrupt.recv() => {
                eprintln!("tpd: interrupted; the session's process removes what it started");
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
            }
        }
    };
    tail.echo();
    match event {
        Some(Event::Ready { record }) => Ok(record),
        Some(Event::Error { message, help }) => {
            let _ = child.wait().await;
            tail.echo();
            eprintln!("tpd: the session's log is {}", log.display());
            Err(Hint::new(
                message,
                help.unwrap_or_else(|| format!("the session's log ({}) has the details", log.display())),
            )
            .into())
        }
        None => {
            let status = child.wait().await;
            tail.echo();
            Err(Hint::new(
                format!(
                    "the session's background process ended before the session was ready ({})",
                    status.map_or_else(|e| e.to_string(), |s| s.to_string())
                ),
                format!("see its log, {}", log.display()),
            )
            .into())
        }
    }
}

/// Follows a log file from an offset and echoes its `tpd: ` lines (progress
/// and cleanup reports) to stderr.
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl Tail {
    fn new(path: &Path, offset: u64) -> Self {
        Tail { path: path.to_owned(), offset, partial: String::new() }
    }

    fn echo(&mut self) {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        let Ok(n) = file.read_to_end(&mut buf) else {
            return;
        };
        self.offset += n as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            let line = line.trim_end();
            if line.starts_with("tpd: ") || line.starts_with("warning: ") {
                eprintln!("{line}");
            }
        }
    }
}

/// The background process: holds the session until SIGTERM (or SIGINT,
/// SIGHUP, or the swap's lease lost), then cleans up.
async fn hold(global: &GlobalArgs, args: ConnectArgs) -> anyhow::Result<ExitCode> {
    let name = checked_name(args.name.as_deref().context("--hold needs --name")?)?;
    let _ = crate::logging::to_file(&format!("connect/{name}"));
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
        let spec = Spec::from_args(&args)?;
        let cluster = super::cluster(global).await?;
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
            report(&Event::Error { message, help });
            return Ok(ExitCode::FAILURE);
        }
    };
    if let Err(e) = record::write(&held.record) {
        eprintln!("error: {e:#}");
        let message = format!("{e:#}");
        held.end().await;
        report(&Event::Error { message, help: None });
        return Ok(ExitCode::FAILURE);
    }
    report(&Event::Ready { record: held.record.clone() });
    // Nobody reads stdout any more; later writes must not fail.
    if let Ok(null) = std::fs::File::options().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null);
    }
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

/// Ends the held session (through its tasks' token, as a lost lease does)
/// when the sidecar stops: nothing joined to it reaches the cluster any more.
async fn end_when_the_sidecar_stops(docker: Docker, id: String, name: String, tasks: CancellationToken) {
    tokio::select! {
        why = session::sidecar::stopped(&docker, &id, &name) => {
            tracing::warn!("{why}; ending the session");
            tasks.cancel();
        }
        () = tasks.cancelled() => {}
    }
}

fn report(event: &Event) {
    let line = serde_json::to_string(event).unwrap_or_default();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
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
        let ports: Vec<String> = s.local_ports.iter().map(u16::to_string).collect();
        progress(&format!(
            "  swaps {}: its cluster traffic arrives in the session on port(s) {}",
            s.deployment,
            ports.join(", ")
        ));
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

// ---------------------------------------------------------------- tpd quit

pub async fn quit(global: &GlobalArgs, args: &QuitArgs) -> anyhow::Result<ExitCode> {
    let names = match (&args.name, args.all) {
        (_, true) => record::list(),
        (name, false) => vec![resolve_name(global, name.as_deref()).await?],
    };
    if names.is_empty() {
        progress("no tpd connect session is running on this machine");
        return Ok(ExitCode::SUCCESS);
    }
    let mut ok = true;
    for name in names {
        match quit_one(global, &name).await {
            Ok(()) => {}
            Err(e) if !args.all => return Err(e),
            Err(e) => {
                eprintln!("tpd: session {name:?}: {e:#}");
                ok = false;
            }
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// How long `tpd quit` waits for a session to clean up (its steps have
/// their own deadlines; the rollback wait is the longest).
const QUIT_DEADLINE: Duration = Duration::from_secs(120);

async fn quit_one(global: &GlobalArgs, name: &str) -> anyhow::Result<()> {
    let Some(r) = record::read(name)? else {
        let running = record::list();
        let help = match running.is_empty() {
            true => "`tpd status` lists this machine's sessions".to_owned(),
            false => format!("running sessions: {}", running.join(", ")),
        };
        return Err(Hint::new(format!("no tpd session named {name:?} is running"), help).into());
    };
    if record::alive(r.pid) {
        let log = log_path(name);
        let mut tail = Tail::new(&log, std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0));
        progress(&format!("ending session {name:?} (process {})", r.pid));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid as i32), nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("cannot signal the session's process {}", r.pid))?;
        let started = Instant::now();
        while record::alive(r.pid) {
            if started.elapsed() > QUIT_DEADLINE {
                tail.echo();
                return Err(Hint::new(
                    format!("session {name:?} did not end within {} s", QUIT_DEADLINE.as_secs()),
                    format!(
                        "see {}; `kill -9 {}` and `tpd quit {name}` again clean up without it",
                        log.display(),
                        r.pid
                    ),
                )
                .into());
            }
            tail.echo();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tail.echo();
    }
    if record::read(name)?.is_some() {
        progress(&format!("the process that held session {name:?} ({}) is gone; cleaning up what it left", r.pid));
        repair(global, &r).await?;
    }
    report_restored(global, &r).await;
    progress(&format!("session {name:?} ended"));
    Ok(())
}

/// The cleanup of a session whose process died: the same `Cleanup` its
/// guardian runs (which may already have done it, network included), then
/// the record goes.
async fn repair(global: &GlobalArgs, r: &Record) -> anyhow::Result<()> {
    let cluster = cluster_of(global, r).await?;
    let deployment = r.swaps.first().and_then(|s| s.deployment.parse::<Target>().ok()).map(|t| t.name);
    let cleanup = Cleanup {
        client: cluster.client.clone(),
        namespace: cluster.namespace.clone(),
        session: r.id.clone(),
        deployment,
    };
    let mut outcome = cleanup.run().await;
    if !outcome.ok {
        // The guardian may have been restoring at the same moment: once more.
        tokio::time::sleep(Duration::from_secs(1)).await;
        outcome = cleanup.run().await;
    }
    if !outcome.ok {
        anyhow::bail!("the cleanup of session {:?} failed (see above); run `tpd quit {}` again", r.name, r.name);
    }
    record::remove(&r.name);
    Ok(())
}

/// The cluster a record was made for.
async fn cluster_of(global: &GlobalArgs, r: &Record) -> anyhow::Result<Cluster> {
    let mut g = global.clone();
    g.context = Some(r.context.clone());
    g.namespace = Some(r.namespace.clone());
    Ok(crate::cluster::connect(&g).await?)
}

/// Says, from the cluster's current state, what the session left swapped.
async fn report_restored(global: &GlobalArgs, r: &Record) {
    let Ok(cluster) = cluster_of(global, r).await else {
        return;
    };
    let api: Api<Deployment> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    for s in &r.swaps {
        let Ok(target) = s.deployment.parse::<Target>() else {
            continue;
        };
        match api.get_opt(&target.name).await {
            Ok(Some(d)) => match crate::swap::record::Record::read(&d) {
                Ok(Some(rec)) if rec.session == r.id => {
                    progress(&format!("{target} is STILL swapped by this session: `tpd restore {target}`"))
                }
                Ok(Some(rec)) => progress(&format!("{target} is restored (and now swapped by {})", rec.holder)),
                _ => progress(&format!("{target} is restored as it was")),
            },
            Ok(None) => progress(&format!("{target} no longer exists")),
            Err(e) => progress(&format!("cannot read {target}: {e}")),
        }
    }
}

// ---------------------------------------------------------------- tpd status

/// This machine's connect sessions, for `tpd status`.
#[derive(Debug, Serialize)]
pub struct SessionSummary {
    pub name: String,
    pub running: bool,
    pub pid: u32,
    pub context: String,
    pub namespace: String,
    pub sidecar: String,
    pub swaps: Vec<String>,
}

pub fn summaries() -> Vec<SessionSummary> {
    record::list()
        .into_iter()
        .filter_map(|n| record::read(&n).ok().flatten())
        .map(|r| SessionSummary {
            running: record::alive(r.pid),
            swaps: r.swaps.iter().map(|s| s.deployment.clone()).collect(),
            name: r.name,
            pid: r.pid,
            context: r.context,
            namespace: r.namespace,
            sidecar: r.sidecar,
        })
        .collect()
}

impl std::fmt::Display for SessionSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.running {
            format!("running (process {})", self.pid)
        } else {
            format!("ENDED (process {} is gone): `tpd quit {}`", self.pid, self.name)
        };
        let swaps =
            if self.swaps.is_empty() { "outbound only".to_owned() } else { format!("swaps {}", self.swaps.join(", ")) };
        write!(f, "{}  {state}  {}/{}  {swaps}  sidecar {}", self.name, self.context, self.namespace, self.sidecar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_file_and_command_safe() {
        assert_eq!(default_name("sandbox", "default"), "sandbox-default");
        assert_eq!(
            default_name("arn:aws:eks:eu-west-1:1:cluster/prod", "team a"),
            "arn-aws-eks-eu-west-1-1-cluster-prod-team-a"
        );
        assert_eq!(default_name("..", "x"), "x");
        assert!(checked_name(&default_name(&"c".repeat(100), "ns")).is_ok());
        assert!(checked_name("dev").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a b"] {
            assert!(checked_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn one_swap_per_session() {
        let t = |s: &str| s.parse::<Target>().unwrap();
        assert!(Spec::new(&[]).unwrap().swap.is_none());
        assert_eq!(Spec::new(&[t("deployment/a")]).unwrap().swap, Some(t("deployment/a")));
        let err = Spec::new(&[t("deployment/a"), t("deployment/b")]).unwrap_err();
        assert!(err.message.contains("deployment/a and deployment/b"), "{}", err.message);
    }

    #[test]
    fn events_round_trip() {
        let e = Event::Error { message: "boom".into(), help: Some("fix".into()) };
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.starts_with("{\"event\":\"error\""), "{line}");
        assert!(matches!(serde_json::from_str::<Event>(&line).unwrap(), Event::Error { .. }));
    }
}
