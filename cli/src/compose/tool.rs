//! The user's compose tool: the v2 plugin (`docker compose`) where it is
//! installed, else docker-compose v1. tpd drives it as a user would, because
//! compose has no API: reading the project (`config`), `up` with the user's
//! files plus the override, and `down` of what it started.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use tokio::process::{Child, Command};

use super::generate::Flavor;
use super::project::Project;
use crate::error::Hint;

/// An installed compose and how to call it.
#[derive(Debug, Clone)]
pub struct Tool {
    program: &'static str,
    prefix: &'static [&'static str],
    pub flavor: Flavor,
}

impl Tool {
    /// Finds compose: v2 first (what Docker ships today), then v1.
    pub async fn detect() -> Result<Self, Hint> {
        let candidates = [
            Tool { program: "docker", prefix: &["compose"], flavor: Flavor::V2 },
            Tool { program: "docker-compose", prefix: &[], flavor: Flavor::V1 },
        ];
        for tool in candidates {
            let ok = tool.command().arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().await;
            if ok.is_ok_and(|s| s.success()) {
                return Ok(tool);
            }
        }
        Err(Hint::new(
            "neither `docker compose` (v2) nor `docker-compose` (v1) is installed",
            "install the compose plugin (Debian/Ubuntu: `apt-get install docker-compose-plugin`, or `docker-compose`), then check with `docker compose version`",
        ))
    }

    /// How the user would type it, for messages.
    pub fn display(&self) -> String {
        std::iter::once(self.program).chain(self.prefix.iter().copied()).collect::<Vec<_>>().join(" ")
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(self.program);
        cmd.args(self.prefix).kill_on_drop(true);
        cmd
    }

    /// `compose [-p P] -f F... SUBCOMMAND ARGS...`, output inherited.
    fn with_files(&self, project: Option<&str>, files: &[PathBuf]) -> Command {
        let mut cmd = self.command();
        if let Some(p) = project {
            cmd.args(["-p", p]);
        }
        for f in files {
            cmd.arg("-f").arg(f);
        }
        cmd
    }

    /// The project as compose itself merges and interpolates the user's files.
    pub async fn config(&self, files: &[PathBuf]) -> anyhow::Result<Project> {
        let out = self.with_files(None, files).arg("config").stdin(Stdio::null()).output().await?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(Hint::new(
                format!("`{} config` rejected your compose files: {}", self.display(), stderr.trim()),
                "fix the files until `docker compose config` (or `docker-compose config`) accepts them",
            )
            .into());
        }
        Ok(Project::parse(&String::from_utf8_lossy(&out.stdout))?)
    }

    /// Starts `compose ... ARGS` with the terminal's stdio.
    pub fn spawn(&self, project: &str, files: &[PathBuf], args: &[String]) -> std::io::Result<Child> {
        self.with_files(Some(project), files).args(args).spawn()
    }

    /// `down` of the project tpd started, so nothing of it stays behind. In
    /// its own process group: a Ctrl-C at the terminal must not abort it.
    pub async fn down(&self, project: &str, files: &[PathBuf]) -> std::io::Result<ExitStatus> {
        let mut cmd = self.with_files(Some(project), files);
        cmd.args(["down", "--remove-orphans", "--timeout", "3"]).stdin(Stdio::null()).process_group(0);
        cmd.status().await
    }
}

/// The compose project name the user's files would get (compose's default:
/// the first file's directory name, lowercased, [a-z0-9_-] only).
pub fn project_name(files: &[PathBuf]) -> String {
    let first = files.first().map(PathBuf::as_path).unwrap_or(Path::new("docker-compose.yml"));
    let dir = std::path::absolute(first)
        .ok()
        .and_then(|p| p.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()));
    let name: String = dir
        .unwrap_or_default()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    if name.is_empty() { "tpd".into() } else { name }
}

/// The files compose reads when none are given.
pub fn default_files() -> Vec<PathBuf> {
    let base = ["compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let over = [
        "compose.override.yaml",
        "compose.override.yml",
        "docker-compose.override.yml",
        "docker-compose.override.yaml",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    base.into_iter().chain(over).collect()
}
