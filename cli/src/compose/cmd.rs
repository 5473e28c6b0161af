//! `tpd compose generate` and `tpd compose -- up`: check everything first
//! (compose installed, the files valid, the session running, the choice
//! possible), so bad input starts nothing; then write or run the override.
//! `up` without `--session` starts a session of its own (`tpd connect`'s
//! machinery, held in this process) and ends it after `compose down`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::generate::{self, Generated, Mount, Request, Swapped};
use super::project::Project;
use super::tool::{self, Tool};
use crate::cli::GlobalArgs;
use crate::cli::{Choice, ComposeAction, ComposeArgs};
use crate::config::{self, Images};
use crate::error::Hint;
use crate::output::progress;
use crate::session::held;
use crate::session::named::{self as session, Record, SwapRecord};
use crate::session::spec::Spec;
use crate::swap::plan::Target;

pub async fn run(global: &GlobalArgs, args: ComposeArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        Some(ComposeAction::Generate(choice)) => {
            let loaded = Loaded::load(&choice).await?;
            let name = session::resolve_name(global, choice.session.as_deref()).await?;
            let record = session::load(&name)?;
            let generated = loaded.generate(&record)?;
            warn_unpublished(&generated, &record);
            print!("{}", generated.yaml);
            Ok(ExitCode::SUCCESS)
        }
        None => up(global, &args.choice, &args.compose_args).await,
    }
}

/// The user's project as compose reads it, and the services chosen; all checked.
#[derive(Debug)]
struct Loaded {
    tool: Tool,
    files: Vec<PathBuf>,
    project: Project,
    pairs: Vec<(String, String)>,
    outbound: Vec<String>,
}

impl Loaded {
    async fn load(choice: &Choice) -> anyhow::Result<Self> {
        let pairs = choice.pairs()?;
        for (deployment, _) in &pairs {
            deployment.parse::<Target>().map_err(|e| Hint::new(e.to_string(), "write --swap deployment/NAME"))?;
        }
        let tool = Tool::detect().await?;
        let files = if choice.files.is_empty() { tool::default_files() } else { choice.files.clone() };
        if files.is_empty() {
            return Err(Hint::new(
                "no compose file here",
                "run tpd in your project's directory, or name the files with -f FILE",
            )
            .into());
        }
        let project = tool.config(&files).await?;
        Ok(Loaded { tool, files, project, pairs, outbound: choice.outbound.clone() })
    }

    /// The override for this project on the session `record` describes.
    fn generate(&self, record: &Record) -> anyhow::Result<Generated> {
        let swapped = self
            .pairs
            .iter()
            .map(|(deployment, service)| swapped(record, deployment, service))
            .collect::<Result<Vec<_>, _>>()?;
        let request = Request {
            project: &self.project,
            session: &record.name,
            sidecar: &record.sidecar,
            network: &record.network,
            flavor: self.tool.flavor,
            swapped: &swapped,
            outbound: &self.outbound,
        };
        Ok(generate::generate(&request).map_err(|e| Hint::new(e.to_string(), e.help()))?)
    }
}

fn warn_unpublished(generated: &Generated, record: &Record) {
    for moved in generated.moved_ports.iter().filter(|m| !record.published.contains(&m.spec)) {
        progress(&format!(
            "{}'s port {} is not published: the sidecar owns the ports of its namespace; start the session with `-p {}` to publish it",
            moved.service, moved.spec, moved.spec
        ));
    }
}

/// Runs `compose up` with the user's files plus the override, streaming its
/// output, then `compose down` of the project on every exit path. Without
/// `--session` the project gets a session of its own, started first and
/// ended last.
async fn up(global: &GlobalArgs, choice: &Choice, compose_args: &[String]) -> anyhow::Result<ExitCode> {
    check_up_args(compose_args)?;
    let loaded = Loaded::load(choice).await?;
    let project = tool::project_name(&loaded.files);
    let Some(name) = &choice.session else {
        return up_in_own_session(global, choice, &loaded, &project, compose_args).await;
    };
    let record = session::load(name)?;
    let generated = loaded.generate(&record)?;
    warn_unpublished(&generated, &record);
    run_compose(&loaded, &project, &record, &generated, compose_args, None).await
}

/// `up` without `--session`: the same session `tpd connect` holds, held by
/// this process (and its guardian) for as long as compose runs.
async fn up_in_own_session(
    global: &GlobalArgs,
    choice: &Choice,
    loaded: &Loaded,
    project: &str,
    compose_args: &[String],
) -> anyhow::Result<ExitCode> {
    let targets = loaded
        .pairs
        .iter()
        .map(|(d, _)| d.parse::<Target>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Hint::new(e.to_string(), "write --swap deployment/NAME"))?;
    let (swaps, intercept) = match choice.intercept {
        Some(_) => (&[][..], targets.first()),
        None => (&targets[..], None),
    };
    let mut spec = Spec::new(swaps)?;
    spec.session.ports = choice.ports.clone();
    spec.session.pod_ports = choice.pod_ports.clone();
    spec.session.volume_cache = choice.volume_cache;
    let spec = spec.intercepting(intercept, &choice.filter)?;
    // The choice is checked against a provisional session before anything starts.
    let provisional = Record {
        name: project.to_owned(),
        id: String::new(),
        context: String::new(),
        namespace: String::new(),
        sidecar: "tpd-sidecar".into(),
        network: "tpd-network".into(),
        pid: std::process::id(),
        published: Vec::new(),
        swaps: targets
            .iter()
            .map(|t| SwapRecord {
                deployment: t.to_string(),
                env: Default::default(),
                mounts: Vec::new(),
                local_ports: Vec::new(),
                intercept: spec.intercept.as_ref().map(|i| i.filter.to_string()),
            })
            .collect(),
    };
    loaded.generate(&provisional)?;
    let cluster = crate::session::cluster(global).await?;
    let images = Images::resolve(global, &config::load()?);
    let shutdown = CancellationToken::new();
    let starting = Arc::new(AtomicBool::new(true));
    tokio::spawn(cancel_on_signal(shutdown.clone(), starting.clone()));
    progress(&format!("starting a session for project {project} (it ends with compose)"));
    let held = held::establish(global, &cluster, &images, project, &spec, &shutdown).await;
    starting.store(false, Ordering::SeqCst);
    let held = held?;
    let result = async {
        if shutdown.is_cancelled() {
            anyhow::bail!("interrupted before compose started");
        }
        let generated = loaded.generate(&held.record)?;
        warn_unpublished(&generated, &held.record);
        run_compose(loaded, project, &held.record, &generated, compose_args, Some(held.lost())).await
    }
    .await;
    progress(&format!("ending the session of project {project}"));
    held.end().await;
    result
}

/// Ctrl-C or SIGTERM while the session starts: stop starting it (the
/// session removes what it had started). Once it has started, compose
/// gets the terminal's signals and `wait_forwarding_signals` handles them.
async fn cancel_on_signal(token: CancellationToken, starting: Arc<AtomicBool>) {
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return;
    };
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        if starting.load(Ordering::SeqCst) && !token.is_cancelled() {
            eprintln!("tpd: interrupted; removing what the session had started");
            token.cancel();
        }
    }
}

async fn run_compose(
    loaded: &Loaded,
    project: &str,
    record: &Record,
    generated: &Generated,
    compose_args: &[String],
    lost: Option<CancellationToken>,
) -> anyhow::Result<ExitCode> {
    let override_file = OverrideFile::write(&record.name, project, &generated.yaml)?;
    let mut files = loaded.files.clone();
    files.push(override_file.0.clone());
    progress(&format!(
        "{} up: project {project} on session {:?} (sidecar {})",
        loaded.tool.display(),
        record.name,
        record.sidecar
    ));
    let mut child = loaded
        .tool
        .spawn(project, &files, compose_args)
        .with_context(|| format!("cannot start `{}`", loaded.tool.display()))?;
    let status = wait_forwarding_signals(&mut child, lost).await;
    progress(&format!("{} down: removing what project {project} started", loaded.tool.display()));
    let down = loaded.tool.down(project, &files).await;
    drop(override_file);
    if !down.as_ref().is_ok_and(|s| s.success()) {
        let why = down.map_or_else(|e| e.to_string(), |s| s.to_string());
        let tool = loaded.tool.display();
        eprintln!("tpd: `{tool} down` failed ({why}); remove the project with `{tool} -p {project} down`");
    }
    let status = status.context("lost the compose process")?;
    Ok(ExitCode::from(status.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(130)))
}

/// Waits for compose. The terminal's Ctrl-C reaches compose as well (same
/// process group) and compose stops its containers itself (twice: it forces);
/// tpd only stays alive for the cleanup. SIGTERM is passed on to compose,
/// and sent to it when the session ends under it (`lost`: its swap was
/// restored or taken over).
async fn wait_forwarding_signals(
    child: &mut tokio::process::Child,
    lost: Option<CancellationToken>,
) -> std::io::Result<std::process::ExitStatus> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let lost = lost.unwrap_or_default();
    let stop = |child: &tokio::process::Child| {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
    };
    let mut stopped = false;
    loop {
        tokio::select! {
            status = child.wait() => return status,
            _ = interrupt.recv() => eprintln!("tpd: waiting for compose to stop, then taking the project down"),
            _ = terminate.recv() => stop(child),
            () = lost.cancelled(), if !stopped => {
                eprintln!("tpd: the session ended under compose; stopping the project");
                stopped = true;
                stop(child);
            }
        }
    }
}

/// Only `up` in the foreground: tpd takes the project down when it ends.
fn check_up_args(args: &[String]) -> Result<(), Hint> {
    if args.first().map(String::as_str) != Some("up") {
        return Err(Hint::new(
            "tpd compose runs `up` only (it takes the project down again when it ends)",
            "write `tpd compose ... -- up [ARGS]`; for other compose commands use `tpd compose generate > docker-compose.tpd.yml` and `docker compose -f ... -f docker-compose.tpd.yml`",
        ));
    }
    if args.iter().any(|a| a == "-d" || a == "--detach") {
        return Err(Hint::new(
            "tpd compose does not run detached projects: it takes the project down when it ends",
            "drop -d, or use `tpd compose generate > docker-compose.tpd.yml` and run `docker compose ... up -d` yourself",
        ));
    }
    Ok(())
}

/// The override of one `tpd compose up` (mode 0600: it holds the remote
/// env), removed when dropped.
#[derive(Debug)]
struct OverrideFile(PathBuf);

impl OverrideFile {
    fn write(session: &str, project: &str, yaml: &str) -> anyhow::Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        session::ensure_dir()?;
        let path = session::dir().join(format!("{session}-{project}-{}.yml", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.write_all(yaml.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(OverrideFile(path))
    }
}

impl Drop for OverrideFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(Path::new(&self.0));
    }
}

/// The generator's view of a swap of the session `record` describes, for compose `service`.
fn swapped(record: &Record, deployment: &str, service: &str) -> Result<Swapped, Hint> {
    let same = |a: &str, b: &str| match (a.parse::<Target>(), b.parse::<Target>()) {
        (Ok(a), Ok(b)) => a.name == b.name,
        _ => a == b,
    };
    let swap = record.swaps.iter().find(|s| same(&s.deployment, deployment)).ok_or_else(|| {
        let held: Vec<&str> = record.swaps.iter().map(|s| s.deployment.as_str()).collect();
        Hint::new(
            format!(
                "session {:?} does not swap {deployment} (it swaps: {})",
                record.name,
                if held.is_empty() { "nothing".into() } else { held.join(", ") }
            ),
            format!(
                "end it with `tpd quit {}` and start it again with `tpd connect --name {} --swap {deployment}`",
                record.name, record.name
            ),
        )
    })?;
    Ok(Swapped {
        service: service.to_string(),
        deployment: deployment.to_string(),
        env: swap.env.clone(),
        mounts: swap
            .mounts
            .iter()
            .map(|m| Mount { source: m.source.clone(), target: m.target.clone(), read_only: m.read_only })
            .collect(),
        local_ports: swap.local_ports.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_foreground_up_is_run() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_up_args(&args(&["up", "--build", "--abort-on-container-exit"])).is_ok());
        assert!(check_up_args(&args(&[])).is_err());
        assert!(check_up_args(&args(&["down"])).is_err());
        assert!(check_up_args(&args(&["up", "-d"])).is_err());
    }
}
