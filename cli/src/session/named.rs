//! Named, long-lived sessions: their names, the record a session started
//! by `tpd connect` (or held by `tpd compose`) leaves on disk while it
//! runs, which `tpd connect` (show), `tpd compose`, `tpd quit` and `tpd
//! status` read, the session's log, and the repair of a session whose
//! process died.
//!
//! The record is the seam with the session machinery (`crate::session`,
//! `crate::guardian`): the detached process that holds a connect session
//! (relay, lease renewal, sidecar) writes it, mode 0600, to
//! `dir()/<name>.json` once the sidecar is ready, and removes it when it has
//! cleaned up; SIGTERM to `pid` asks it to end and restore, like Ctrl-C
//! does for `tpd run`. See docs/compose.md for the format.
//!
//! [`super::held`] holds such sessions; `crate::commands::connect` writes
//! the record.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::cleanup::Cleanup;
use crate::cli::GlobalArgs;
use crate::cluster::Cluster;
use crate::error::Hint;
use crate::output::Note;
use crate::swap::plan::Target;

/// A running connect session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// The session id its containers, pods and network are labelled with.
    pub id: String,
    pub context: String,
    pub namespace: String,
    /// The sidecar container; `docker run --network container:<sidecar>` joins it.
    pub sidecar: String,
    /// The user-defined Docker network the sidecar is attached to.
    pub network: String,
    /// The detached process holding the session.
    pub pid: u32,
    /// Ports the sidecar publishes on the host (`HOST:CONTAINER`).
    #[serde(default)]
    pub published: Vec<String>,
    #[serde(default)]
    pub swaps: Vec<SwapRecord>,
}

/// A Deployment the session swapped or intercepted, and what its replacement gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapRecord {
    /// `deployment/NAME`.
    pub deployment: String,
    /// The remote container's env; secrets, so the record is mode 0600.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Remote volumes on the host (`source`) and where the container sees them.
    #[serde(default)]
    pub mounts: Vec<MountRecord>,
    /// Local ports the agent forwards cluster traffic to.
    #[serde(default)]
    pub local_ports: Vec<u16>,
    /// Set when the session intercepts the Deployment rather than swaps
    /// it: the filter of the requests it takes (`x-dev=alice`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercept: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Where connect sessions leave their records (`$XDG_CACHE_HOME/tpd/connect`).
pub fn dir() -> PathBuf {
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("tpd").join("connect")
}

fn path(name: &str) -> PathBuf {
    dir().join(format!("{name}.json"))
}

/// The record of session `name`, whether its process still runs or not.
pub fn read(name: &str) -> anyhow::Result<Option<Record>> {
    let path = path(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let record =
        serde_json::from_str(&text).with_context(|| format!("{} is not a tpd session record", path.display()))?;
    Ok(Some(record))
}

/// The running session called `name`.
pub fn load(name: &str) -> anyhow::Result<Record> {
    let Some(record) = read(name)? else {
        return Err(Hint::new(format!("no tpd session named {name:?} is running"), no_session_help(name)).into());
    };
    if !alive(record.pid) {
        return Err(Hint::new(
            format!("tpd session {name:?} is no longer running (its process {} ended)", record.pid),
            format!("`tpd quit {name}` cleans up what it left; then start it again with `tpd connect --name {name}`"),
        )
        .into());
    }
    Ok(record)
}

/// Creates the records' directory (mode 0700: records and logs hold the remote env).
pub fn ensure_dir() -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes the record, mode 0600, atomically (readers never see half a file).
pub fn write(record: &Record) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    ensure_dir()?;
    let path = path(&record.name);
    let tmp = dir().join(format!(".{}.json.{}", record.name, std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(serde_json::to_string_pretty(record)?.as_bytes())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
}

/// Removes the record of session `name`.
pub fn remove(name: &str) {
    let _ = std::fs::remove_file(path(name));
}

/// The names of the running sessions.
pub fn list() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| {
            e.ok()?.file_name().to_str()?.strip_suffix(".json").filter(|n| !n.starts_with('.')).map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

fn no_session_help(name: &str) -> String {
    let running = list();
    if running.is_empty() {
        format!("start one with `tpd connect --name {name}` (add `--swap deployment/NAME` to swap a Deployment)")
    } else {
        format!("running sessions: {}; or start one with `tpd connect --name {name}`", running.join(", "))
    }
}

/// Whether the process holding a session still lives (a zombie that no
/// one has reaped yet counts as ended).
pub fn alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None).is_err() {
        return false;
    }
    // /proc/PID/stat: "PID (COMM) STATE ...", COMM may hold spaces and parentheses.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_none_or(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

/// Session names become file names and appear in commands.
pub fn checked_name(name: &str) -> Result<String, Hint> {
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
    dir().join(format!("{name}.log"))
}

/// The events file of session `name`: what its background process
/// reports, one JSON [`Line`] each, for `tpd connect` and `tpd quit`.
pub fn events_path(name: &str) -> PathBuf {
    dir().join(format!("{name}.events"))
}

/// How a session's background process ends its start.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Outcome {
    Ready { record: Record },
    Error { message: String, help: Option<String> },
}

/// A line of an events file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Line {
    Note(Note),
    Outcome(Outcome),
}

/// Follows an events file from an offset: prints its notes as they come
/// and hands over the outcome.
pub struct Follow {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl Follow {
    /// From the file's current end: what a process writes from now on.
    pub fn from_end(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map_or(0, |m| m.len());
        Follow { path: path.to_owned(), offset, partial: String::new() }
    }

    /// Prints the notes written since the last call; returns the outcome,
    /// if one was written.
    pub fn echo(&mut self) -> Option<Outcome> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return None;
        };
        let mut buf = Vec::new();
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() || file.read_to_end(&mut buf).is_err() {
            return None;
        }
        self.offset += buf.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&buf));
        let mut outcome = None;
        while let Some(end) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=end).collect();
            match serde_json::from_str::<Line>(&line) {
                Ok(Line::Note(note)) => eprintln!("{note}"),
                Ok(Line::Outcome(o)) => outcome = Some(o),
                Err(e) => tracing::debug!("not an event: {e}: {line}"),
            }
        }
        outcome
    }
}

/// The cleanup of a session whose process died: the same `Cleanup` its
/// guardian runs (which may already have done it, network included), then
/// the record goes.
pub async fn repair(global: &GlobalArgs, r: &Record) -> anyhow::Result<()> {
    let cluster = cluster_of(global, r).await?;
    let deployment = r.swaps.first().and_then(|s| s.deployment.parse::<Target>().ok()).map(|t| t.name);
    let cleanup = Cleanup::new(&cluster, &r.id, deployment);
    let mut outcome = cleanup.run().await;
    if !outcome.ok {
        // The guardian may have been restoring at the same moment: once more.
        tokio::time::sleep(Duration::from_secs(1)).await;
        outcome = cleanup.run().await;
    }
    if !outcome.ok {
        anyhow::bail!("the cleanup of session {:?} failed (see above); run `tpd quit {}` again", r.name, r.name);
    }
    remove(&r.name);
    Ok(())
}

/// The cluster a record was made for.
pub async fn cluster_of(global: &GlobalArgs, r: &Record) -> anyhow::Result<Cluster> {
    let mut g = global.clone();
    g.context = Some(r.context.clone());
    g.namespace = Some(r.namespace.clone());
    Ok(crate::cluster::connect(&g).await?)
}

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
    list()
        .into_iter()
        .filter_map(|n| read(&n).ok().flatten())
        .map(|r| SessionSummary {
            running: alive(r.pid),
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

    /// What the background process writes and `tpd connect`/`tpd quit` read.
    #[test]
    fn events_round_trip() {
        let e = Outcome::Error { message: "boom".into(), help: Some("fix".into()) };
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.starts_with("{\"event\":\"error\""), "{line}");
        assert!(matches!(serde_json::from_str::<Line>(&line).unwrap(), Line::Outcome(Outcome::Error { .. })));
        let note = serde_json::to_string(&Note::Progress { message: "swapping".into() }).unwrap();
        assert!(matches!(serde_json::from_str::<Line>(&note).unwrap(), Line::Note(_)));
    }

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
}
