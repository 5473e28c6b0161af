//! Named, long-lived sessions as compose sees them: the record a session
//! started by `tpd connect` leaves on disk while it runs, which
//! `tpd connect` (show), `tpd compose` and `tpd quit` read.
//!
//! The record is the seam with the session machinery (`crate::session`,
//! `crate::guardian`): the detached process that holds a connect session
//! (relay, lease renewal, sidecar) writes it, mode 0600, to
//! `dir()/<name>.json` once the sidecar is ready, and removes it when it has
//! cleaned up; SIGTERM to `pid` asks it to end and restore, like Ctrl-C
//! does for `tpd run`. See docs/compose.md for the format.
//!
//! `crate::commands::connect` holds such sessions and writes the record.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::generate::{Mount, Swapped};
use crate::error::Hint;
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

/// A Deployment the session swapped, and what its replacement gets.
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

impl Record {
    /// The generator's view of a swap of this session, for compose `service`.
    pub fn swapped(&self, deployment: &str, service: &str) -> Result<Swapped, Hint> {
        let same = |a: &str, b: &str| match (a.parse::<Target>(), b.parse::<Target>()) {
            (Ok(a), Ok(b)) => a.name == b.name,
            _ => a == b,
        };
        let swap = self.swaps.iter().find(|s| same(&s.deployment, deployment)).ok_or_else(|| {
            let held: Vec<&str> = self.swaps.iter().map(|s| s.deployment.as_str()).collect();
            Hint::new(
                format!(
                    "session {:?} does not swap {deployment} (it swaps: {})",
                    self.name,
                    if held.is_empty() { "nothing".into() } else { held.join(", ") }
                ),
                format!(
                    "end it with `tpd quit {}` and start it again with `tpd connect --name {} --swap {deployment}`",
                    self.name, self.name
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
